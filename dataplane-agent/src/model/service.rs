//! One Service (+ its endpoints) -> its frontends and backends, with validation.
use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort};

use super::endpoints::{SliceIndex, categorize_per_family, parse_protocol};
use super::{Frontend, FrontendScope, Protocol, ServiceKind, ServiceName, ServicePortState, ServiceState};

/// kube-proxy's default and the API server's bounds for `sessionAffinityConfig.clientIP.timeoutSeconds`.
const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10800;
const MAX_AFFINITY_TIMEOUT_S: i32 = 86400;

/// Why a Service (or a part of it) is left out. Each message names the Service and says what was
/// dropped; the rest of the cluster's Services are computed as usual.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("{service}: has no spec; Service skipped")]
    MissingSpec { service: ServiceName },
    #[error("{service}: unknown type {value:?}; Service skipped")]
    UnknownType { service: ServiceName, value: String },
    #[error("{service}: type ExternalName without spec.externalName; Service skipped")]
    MissingExternalName { service: ServiceName },
    #[error("{service}: cluster IP {value:?} is not an IP address; Service skipped")]
    BadClusterIp { service: ServiceName, value: String },
    #[error("{service}: no cluster IP allocated; Service skipped")]
    NoClusterIp { service: ServiceName },
    #[error("{service}: unknown sessionAffinity {value:?}; Service skipped")]
    UnknownAffinity { service: ServiceName, value: String },
    #[error("{service}: sessionAffinity timeout {value}s is outside 1..={MAX_AFFINITY_TIMEOUT_S}; Service skipped")]
    BadAffinityTimeout { service: ServiceName, value: i32 },
    #[error("{service}: unknown {field} {value:?}; Service skipped")]
    UnknownTrafficPolicy { service: ServiceName, field: &'static str, value: String },
    #[error("{service}: two ports named {port:?} with protocol {protocol:?}; Service skipped")]
    DuplicatePort { service: ServiceName, port: String, protocol: Protocol },
    #[error("{service}: port {port:?} uses {protocol}, which this data plane does not support; port skipped")]
    UnsupportedProtocol { service: ServiceName, port: String, protocol: String },
    #[error("{service}: port {port:?} number {value} is outside 1..=65535; port skipped")]
    BadPort { service: ServiceName, port: String, value: i32 },
    #[error("{service}: port {port:?} nodePort {value} is outside 1..=65535; NodePort skipped")]
    BadNodePort { service: ServiceName, port: String, value: i32 },
    #[error("{service}: port {port:?} has no nodePort allocated; NodePort skipped")]
    MissingNodePort { service: ServiceName, port: String },
    #[error("{service}: {field} {value:?} is not an IP address; address skipped")]
    BadAddress { service: ServiceName, field: &'static str, value: String },
}

/// What the model needs to know about the node it runs on.
pub(super) struct Context<'a> {
    pub node_name: Option<&'a str>,
    pub zone: Option<&'a str>,
    pub node_port_addresses: Vec<IpAddr>,
}

/// Builds one Service. `Err`: the Service is left out entirely. `Ok` may carry warnings about
/// parts (a port, an address) that were left out.
pub(super) fn build(
    name: &ServiceName,
    svc: &Service,
    slices: &SliceIndex<'_>,
    ctx: &Context<'_>,
) -> Result<(ServiceState, Vec<ServiceError>), ServiceError> {
    let service = || name.clone();
    let spec = svc.spec.as_ref().ok_or_else(|| ServiceError::MissingSpec { service: service() })?;
    let mut warnings = Vec::new();

    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    let mut kind = match type_ {
        "ClusterIP" => ServiceKind::ClusterIP,
        "NodePort" => ServiceKind::NodePort,
        "LoadBalancer" => ServiceKind::LoadBalancer,
        "ExternalName" => {
            let external_name = spec
                .external_name
                .clone()
                .filter(|n| !n.is_empty())
                .ok_or_else(|| ServiceError::MissingExternalName { service: service() })?;
            // ExternalName Services are DNS-only: no frontends, no endpoints.
            let state = ServiceState {
                kind: ServiceKind::ExternalName { external_name },
                external_traffic_local: false,
                internal_traffic_local: false,
                ports: Vec::new(),
            };
            return Ok((state, warnings));
        }
        other => return Err(ServiceError::UnknownType { service: service(), value: other.to_string() }),
    };

    // `clusterIPs` (dual-stack) supersedes `clusterIP`, whose value equals clusterIPs[0].
    let raw_ips: Vec<&String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    let headless = raw_ips.first().is_some_and(|ip| ip.as_str() == "None");
    let cluster_ips: Vec<IpAddr> = if headless {
        kind = ServiceKind::Headless;
        Vec::new()
    } else {
        let ips = raw_ips
            .iter()
            .map(|ip| ip.parse().map_err(|_| ServiceError::BadClusterIp { service: service(), value: ip.to_string() }))
            .collect::<Result<Vec<IpAddr>, _>>()?;
        if ips.is_empty() {
            return Err(ServiceError::NoClusterIp { service: service() });
        }
        ips
    };
    // A per-family proxy (kube-proxy) only sees a Service in the families it has a cluster IP
    // of; external addresses of another family are ignored the same way.
    let families: BTreeSet<bool> = cluster_ips.iter().map(IpAddr::is_ipv6).collect();
    let in_family = |ip: &IpAddr| families.contains(&ip.is_ipv6());

    let affinity_timeout_s = match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => None,
        "ClientIP" => {
            let t = spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref()).and_then(|c| c.timeout_seconds);
            match t {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(v) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&v) => Some(v as u32),
                Some(v) => return Err(ServiceError::BadAffinityTimeout { service: service(), value: v }),
            }
        }
        other => return Err(ServiceError::UnknownAffinity { service: service(), value: other.to_string() }),
    };
    let policy_local = |field: &'static str, value: Option<&str>| match value.unwrap_or("Cluster") {
        "Cluster" => Ok(false),
        "Local" => Ok(true),
        other => Err(ServiceError::UnknownTrafficPolicy { service: service(), field, value: other.to_string() }),
    };
    let etp_local = policy_local("externalTrafficPolicy", spec.external_traffic_policy.as_deref())?;
    let internal_local = policy_local("internalTrafficPolicy", spec.internal_traffic_policy.as_deref())?;

    let mut parse_addrs = |field: &'static str, values: Vec<&String>| -> Vec<IpAddr> {
        let mut out = Vec::new();
        for v in values {
            match v.parse::<IpAddr>() {
                Ok(ip) if in_family(&ip) => out.push(ip),
                Ok(_) => {}
                Err(_) => warnings.push(ServiceError::BadAddress { service: service(), field, value: v.clone() }),
            }
        }
        out
    };
    let external_ips = parse_addrs("externalIPs", spec.external_ips.iter().flatten().collect());
    let lb_ips = if kind == ServiceKind::LoadBalancer {
        let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
        // ipMode Proxy: the load balancer proxies to the node address, so the VIP must not be
        // captured on the node (KEP-1860); hostname-only ingresses have no VIP either.
        let vips = ingress.into_iter().flatten().filter(|i| i.ip_mode.as_deref() != Some("Proxy")).filter_map(|i| i.ip.as_ref());
        parse_addrs("status.loadBalancer.ingress.ip", vips.collect())
    } else {
        Vec::new()
    };
    let node_port_addrs: Vec<IpAddr> = ctx.node_port_addresses.iter().copied().filter(in_family).collect();

    let ports = checked_ports(name, spec.ports.as_deref().unwrap_or_default(), &mut warnings)?;
    let node_ports = matches!(kind, ServiceKind::NodePort | ServiceKind::LoadBalancer);
    let externally_accessible = !external_ips.is_empty()
        || !lb_ips.is_empty()
        || (node_ports && ports.iter().any(|(p, ..)| p.node_port.is_some()));
    // externalTrafficPolicy only means something for a Service reachable from outside.
    let external_local = etp_local && externally_accessible;
    let uses_cluster = !internal_local || (externally_accessible && !external_local);
    let uses_local = internal_local || external_local;

    let mut out_ports = Vec::new();
    for (port, number, protocol) in ports {
        let port_name = port.name.clone().unwrap_or_default();
        let mut frontends = Vec::new();
        let mut add = |addrs: &[IpAddr], port: u16, scope: FrontendScope| {
            let local_only = if scope.is_external() { external_local } else { internal_local };
            frontends.extend(addrs.iter().map(|&addr| Frontend { addr, port, protocol, scope, local_only }));
        };
        add(&cluster_ips, number, FrontendScope::ClusterIP);
        add(&external_ips, number, FrontendScope::ExternalIP);
        add(&lb_ips, number, FrontendScope::LoadBalancer);
        if node_ports {
            match port.node_port {
                Some(np) => match u16::try_from(np).ok().filter(|p| *p != 0) {
                    Some(np) => add(&node_port_addrs, np, FrontendScope::NodePort),
                    None => warnings.push(ServiceError::BadNodePort { service: service(), port: port_name.clone(), value: np }),
                },
                // A LoadBalancer may opt out of NodePorts; a NodePort Service without one is broken.
                None if kind == ServiceKind::NodePort || spec.allocate_load_balancer_node_ports != Some(false) => {
                    warnings.push(ServiceError::MissingNodePort { service: service(), port: port_name.clone() })
                }
                None => {}
            }
        }
        frontends.sort();
        frontends.dedup();

        let endpoints = slices.endpoints(name, &port_name, protocol, ctx.node_name);
        let chosen = if kind == ServiceKind::Headless {
            // DNS answers with the ready endpoints; no traffic policy or topology applies.
            categorize_per_family(&endpoints, true, false, None)
        } else {
            categorize_per_family(&endpoints, uses_cluster, uses_local, ctx.zone)
        };
        out_ports.push(ServicePortState {
            name: port_name,
            protocol,
            port: number,
            frontends,
            affinity_timeout_s,
            cluster_backends: chosen.cluster,
            local_backends: chosen.local,
            topology_filtered: chosen.topology_filtered,
        });
    }
    out_ports.sort_by(|a, b| (&a.name, a.protocol).cmp(&(&b.name, b.protocol)));
    Ok((
        ServiceState { kind, external_traffic_local: external_local, internal_traffic_local: internal_local, ports: out_ports },
        warnings,
    ))
}

/// The Service's ports with a valid number and a protocol we forward; others are reported and
/// skipped. Two ports with the same name and protocol would share endpoints ambiguously: reject.
fn checked_ports<'p>(
    name: &ServiceName,
    ports: &'p [ServicePort],
    warnings: &mut Vec<ServiceError>,
) -> Result<Vec<(&'p ServicePort, u16, Protocol)>, ServiceError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for p in ports {
        let port_name = p.name.clone().unwrap_or_default();
        let Some(protocol) = parse_protocol(p.protocol.as_deref()) else {
            warnings.push(ServiceError::UnsupportedProtocol {
                service: name.clone(),
                port: port_name,
                protocol: p.protocol.clone().unwrap_or_default(),
            });
            continue;
        };
        let Some(number) = u16::try_from(p.port).ok().filter(|n| *n != 0) else {
            warnings.push(ServiceError::BadPort { service: name.clone(), port: port_name, value: p.port });
            continue;
        };
        if !seen.insert((port_name.clone(), protocol)) {
            return Err(ServiceError::DuplicatePort { service: name.clone(), port: port_name, protocol });
        }
        out.push((p, number, protocol));
    }
    Ok(out)
}
