//! EndpointSlices -> the backends of one Service port, and kube-proxy's choice among them
//! (pkg/proxy/endpointslicecache.go and topology.go `CategorizeEndpoints`).
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{Backend, LABEL_SERVICE_NAME, Protocol, ServiceName, is_ours};

/// The slices of every Service, in slice-name order so that merging is deterministic.
pub(super) struct SliceIndex<'a> {
    by_service: HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
}

/// One endpoint with what the choice between them needs.
#[derive(Debug, Clone)]
pub(super) struct Endpoint {
    pub backend: Backend,
    pub zone_hints: Vec<String>,
}

impl<'a> SliceIndex<'a> {
    pub fn new(slices: &'a [Arc<EndpointSlice>], proxy_name: Option<&str>) -> Self {
        let mut by_service: HashMap<_, Vec<&EndpointSlice>> = HashMap::new();
        for slice in slices.iter().map(|s| &**s) {
            let labels = slice.metadata.labels.as_ref();
            if !is_ours(labels, proxy_name) {
                continue;
            }
            let Some(service) = labels.and_then(|l| l.get(LABEL_SERVICE_NAME)) else { continue };
            let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
            by_service.entry((namespace, service.as_str())).or_default().push(slice);
        }
        for list in by_service.values_mut() {
            list.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        }
        Self { by_service }
    }

    /// The endpoints of one Service port. Slices carry ports by the Service port's *name*
    /// (the EndpointSlice controller resolved a named targetPort to a number per Pod), so a
    /// port is matched by name and protocol, and its number is taken from the slice.
    /// The same address:port in two slices (a Pod moving between slices) appears once; a ready
    /// copy wins over a not-ready one, as in kube-proxy.
    pub fn endpoints(&self, svc: &ServiceName, port_name: &str, protocol: Protocol, node_name: Option<&str>) -> Vec<Endpoint> {
        let mut merged: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
        let slices = self.by_service.get(&(svc.namespace.as_str(), svc.name.as_str()));
        for slice in slices.into_iter().flatten() {
            let family_v6 = match slice.address_type.as_str() {
                "IPv4" => false,
                "IPv6" => true,
                _ => continue, // FQDN slices are not proxied (kube-proxy ignores them too).
            };
            let port = slice.ports.iter().flatten().find(|p| {
                p.name.as_deref().unwrap_or("") == port_name && parse_protocol(p.protocol.as_deref()) == Some(protocol)
            });
            let Some(port) = port.and_then(|p| p.port).and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
                continue;
            };
            for ep in &slice.endpoints {
                // kube-proxy uses the first address only; the API requires exactly one.
                let Some(addr) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else { continue };
                if addr.is_ipv6() != family_v6 {
                    continue;
                }
                let cond = ep.conditions.as_ref();
                // Unknown readiness counts as ready (API docs: "nil should be interpreted as true").
                let ready = cond.and_then(|c| c.ready).unwrap_or(true);
                let endpoint = Endpoint {
                    backend: Backend {
                        addr,
                        port,
                        node_local: node_name.is_some() && ep.node_name.as_deref() == node_name,
                        ready,
                        serving: cond.and_then(|c| c.serving).unwrap_or(ready),
                        terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
                    },
                    zone_hints: ep
                        .hints
                        .as_ref()
                        .and_then(|h| h.for_zones.as_ref())
                        .map(|z| z.iter().map(|z| z.name.clone()).collect())
                        .unwrap_or_default(),
                };
                match merged.get(&(addr, port)) {
                    Some(existing) if existing.backend.ready || !ready => {}
                    _ => {
                        merged.insert((addr, port), endpoint);
                    }
                }
            }
        }
        merged.into_values().collect()
    }
}

pub(super) fn parse_protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

/// The result of kube-proxy's `CategorizeEndpoints`.
#[derive(Debug, Default)]
pub(super) struct Categorized {
    pub cluster: Vec<Backend>,
    pub local: Vec<Backend>,
    pub topology_filtered: bool,
}

/// kube-proxy runs one proxier per IP family, so the fallbacks and the topology decision are
/// taken per family: IPv6 endpoints without hints must not turn off hints for IPv4.
pub(super) fn categorize_per_family(endpoints: &[Endpoint], uses_cluster: bool, uses_local: bool, zone: Option<&str>) -> Categorized {
    let (v4, v6): (Vec<Endpoint>, Vec<Endpoint>) = endpoints.iter().cloned().partition(|e| e.backend.addr.is_ipv4());
    let mut out = categorize(&v4, uses_cluster, uses_local, zone);
    let six = categorize(&v6, uses_cluster, uses_local, zone);
    out.cluster.extend(six.cluster);
    out.local.extend(six.local);
    out.topology_filtered |= six.topology_filtered;
    out
}

/// `uses_cluster`: some frontend follows a Cluster policy; `uses_local`: some frontend follows Local.
fn categorize(endpoints: &[Endpoint], uses_cluster: bool, uses_local: bool, zone: Option<&str>) -> Categorized {
    let mut out = Categorized::default();
    let pick = |f: &dyn Fn(&Endpoint) -> bool| -> Vec<Backend> {
        endpoints.iter().filter(|e| f(e)).map(|e| e.backend.clone()).collect()
    };
    let serving_terminating = |e: &Endpoint| e.backend.serving && e.backend.terminating;
    if uses_cluster {
        let zone = zone.filter(|z| can_use_topology(endpoints, z));
        out.topology_filtered = zone.is_some();
        out.cluster = pick(&|e| e.backend.ready && zone.is_none_or(|z| e.zone_hints.iter().any(|h| h == z)));
        if out.cluster.is_empty() {
            // No ready endpoint: keep connections working on endpoints that are shutting down
            // but still serving (KEP-1669), rather than dropping the traffic.
            out.cluster = pick(&serving_terminating);
        }
    }
    if uses_local {
        out.local = pick(&|e| e.backend.node_local && e.backend.ready);
        if out.local.is_empty() {
            out.local = pick(&|e| e.backend.node_local && serving_terminating(e));
        }
    }
    out
}

/// Hints are used only when every ready endpoint carries zone hints and at least one is meant for
/// our zone; otherwise a half-rolled-out hint set would black-hole a zone (kube-proxy topology.go).
fn can_use_topology(endpoints: &[Endpoint], zone: &str) -> bool {
    let mut ready = endpoints.iter().filter(|e| e.backend.ready).peekable();
    ready.peek().is_some()
        && endpoints.iter().filter(|e| e.backend.ready).all(|e| !e.zone_hints.is_empty())
        && ready.any(|e| e.zone_hints.iter().any(|h| h == zone))
}
