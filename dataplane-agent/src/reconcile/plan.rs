//! Pure: the desired state -> the frontend entries the service maps should hold, in map terms
//! (scopes, flags, backend sets) but without ids. `Reconciler` assigns ids and writes.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use dataplane_common::lb::{SVC_FLAG_EXT_LOCAL, SVC_FLAG_INT_LOCAL, SVC_FLAG_TWO_SCOPES, ServiceKind};

use crate::maps::lb::{Frontend, Proto, Scope};
use crate::model::{self, Backend, DesiredState, FrontendScope, ServiceName};

/// A backend as the maps hold it (identity: the address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PlannedBackend {
    pub addr: SocketAddrV4,
    pub local: bool,
    pub terminating: bool,
}

/// One frontend entry (address, port, protocol, scope) and what it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedEntry {
    pub kind: ServiceKind,
    pub flags: u8,
    pub affinity_timeout_s: u32,
    /// Ready backends, then serving-but-terminating ones (the model picked one of the two sets;
    /// the data path uses the terminating slots only when there is no ready one).
    pub active: Vec<PlannedBackend>,
    pub terminating: Vec<PlannedBackend>,
    /// For `services` and logs.
    pub service: ServiceName,
}

/// Frontends the maps cannot hold yet, counted so the operator sees them (`status`, metrics).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The IPv6 service tables do not exist yet in the map contract.
    pub ipv6_frontends: usize,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub entries: BTreeMap<Frontend, PlannedEntry>,
    pub skipped: Skipped,
}

impl Plan {
    /// Every distinct backend address the plan uses.
    pub fn backends(&self) -> BTreeMap<SocketAddrV4, PlannedBackend> {
        self.entries.values().flat_map(|e| e.active.iter().chain(&e.terminating)).map(|b| (b.addr, *b)).collect()
    }
}

fn v4(addr: IpAddr) -> Option<Ipv4Addr> {
    match addr {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

fn split(backends: &[Backend]) -> (Vec<PlannedBackend>, Vec<PlannedBackend>) {
    let planned = |b: &Backend| {
        Some(PlannedBackend { addr: SocketAddrV4::new(v4(b.addr)?, b.port), local: b.node_local, terminating: b.terminating })
    };
    let active = backends.iter().filter(|b| b.ready).filter_map(planned).collect();
    let terminating = backends.iter().filter(|b| !b.ready).filter_map(planned).collect();
    (active, terminating)
}

/// The whole plan. Where two Services claim one frontend, the last in name order has it.
pub fn plan(desired: &DesiredState) -> Plan {
    let mut out = Plan::default();
    for (name, svc) in &desired.services {
        out.skipped.ipv6_frontends += plan_service(name, svc, &mut out.entries);
    }
    out
}

/// One Service's frontend entries into `out`; returns how many IPv6 frontends were skipped.
fn plan_service(name: &ServiceName, svc: &model::ServiceState, out: &mut BTreeMap<Frontend, PlannedEntry>) -> usize {
    let mut ipv6_frontends = 0;
    {
        for port in &svc.ports {
            for fe in &port.frontends {
                let Some(addr) = v4(fe.addr) else {
                    ipv6_frontends += 1;
                    continue;
                };
                let proto = match fe.protocol {
                    model::Protocol::Tcp => Proto::Tcp,
                    model::Protocol::Udp => Proto::Udp,
                };
                let (kind, addr) = match fe.scope {
                    FrontendScope::ClusterIP => (ServiceKind::ClusterIp, addr),
                    // One wildcard entry per NodePort: the programs match any node address.
                    FrontendScope::NodePort => (ServiceKind::NodePort, Ipv4Addr::UNSPECIFIED),
                    FrontendScope::LoadBalancer => (ServiceKind::LoadBalancer, addr),
                    FrontendScope::ExternalIP => (ServiceKind::ExternalIp, addr),
                };
                let mut flags = 0;
                if svc.external_traffic_local && fe.scope.is_external() {
                    flags |= SVC_FLAG_EXT_LOCAL;
                }
                if svc.internal_traffic_local {
                    flags |= SVC_FLAG_INT_LOCAL;
                }
                // What outside traffic gets (the frontend's own policy), and what traffic from
                // inside the cluster gets: iTP decides for it, even on an external address.
                let external = port.backends_for(fe);
                let internal = if svc.internal_traffic_local { &port.local_backends } else { &port.cluster_backends };
                let entry = |flags: u8, set: &[Backend]| {
                    let (active, terminating) = split(set);
                    PlannedEntry {
                        kind,
                        flags,
                        affinity_timeout_s: port.affinity_timeout_s.unwrap_or(0),
                        active,
                        terminating,
                        service: name.clone(),
                    }
                };
                let key = |scope| Frontend { addr: SocketAddrV4::new(addr, fe.port), proto, scope };
                if fe.scope.is_external() && external != internal.as_slice() {
                    flags |= SVC_FLAG_TWO_SCOPES;
                    out.insert(key(Scope::Internal), entry(flags, internal));
                }
                out.insert(key(Scope::External), entry(flags, external));
            }
        }
    }
    ipv6_frontends
}

/// The plan kept up to date Service by Service: `update` re-plans the Services the model rebuilt
/// and says which frontend entries may have changed, so `Reconciler::apply_touched` looks at
/// those alone. `plan` stays the reference (a `Planner` holds what it gives; tests).
#[derive(Debug, Default)]
pub struct Planner {
    plan: Plan,
    /// The frontends each Service claims, and its skipped IPv6 frontends.
    claims: HashMap<ServiceName, (Vec<Frontend>, usize)>,
    /// The Services claiming each frontend, in name order; the last one's entry is planned.
    owners: HashMap<Frontend, Vec<ServiceName>>,
}

impl Planner {
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Plans every Service of `desired` from scratch.
    pub fn reset(&mut self, desired: &DesiredState) {
        *self = Planner::default();
        self.update(desired, desired.services.keys());
    }

    /// Re-plans `services` (changed, added or removed in `desired`); returns the frontends whose
    /// entry may have changed (added, changed or gone).
    pub fn update<'a>(&mut self, desired: &DesiredState, services: impl IntoIterator<Item = &'a ServiceName>) -> BTreeSet<Frontend> {
        let mut touched = BTreeSet::new();
        // Vecs, not the maps `plan_service` fills: at start-up every Service is here at once.
        let mut fresh: HashMap<&ServiceName, Vec<(Frontend, PlannedEntry)>> = HashMap::new();
        for name in services {
            if let Some((frontends, ipv6)) = self.claims.remove(name) {
                self.plan.skipped.ipv6_frontends -= ipv6;
                for fe in frontends {
                    if let Some(owners) = self.owners.get_mut(&fe) {
                        owners.retain(|o| o != name);
                    }
                    touched.insert(fe);
                }
            }
            let Some(svc) = desired.services.get(name) else { continue };
            let mut entries = BTreeMap::new();
            let ipv6 = plan_service(name, svc, &mut entries);
            self.plan.skipped.ipv6_frontends += ipv6;
            for fe in entries.keys() {
                let owners = self.owners.entry(*fe).or_default();
                if let Err(at) = owners.binary_search(name) {
                    owners.insert(at, name.clone());
                }
                touched.insert(*fe);
            }
            self.claims.insert(name.clone(), (entries.keys().copied().collect(), ipv6));
            fresh.insert(name, entries.into_iter().collect());
        }
        for fe in &touched {
            let Some(winner) = self.owners.get(fe).and_then(|o| o.last()) else {
                self.owners.remove(fe);
                self.plan.entries.remove(fe);
                continue;
            };
            let entry = match fresh.get_mut(winner) {
                Some(entries) => entries.iter().position(|(f, _)| f == fe).map(|i| entries.swap_remove(i).1),
                // The frontend fell back to a Service that did not change: plan it again.
                None => desired.services.get(winner).and_then(|svc| {
                    let mut entries = BTreeMap::new();
                    plan_service(winner, svc, &mut entries);
                    entries.remove(fe)
                }),
            };
            let entry = entry.expect("an owner plans the frontends it claims");
            self.plan.entries.insert(*fe, entry);
        }
        touched
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{self, ClusterObjects, ModelConfig};
    use serde_json::json;
    use std::sync::Arc;

    /// A NodePort Service with one local and one remote endpoint, with the given policies.
    fn desired(etp: &str, itp: &str, cluster_ips: &[&str]) -> DesiredState {
        let svc = json!({"metadata": {"name": "web", "namespace": "default"}, "spec": {
            "type": "NodePort", "clusterIPs": cluster_ips, "externalTrafficPolicy": etp, "internalTrafficPolicy": itp,
            "sessionAffinity": "ClientIP", "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}});
        let slice = json!({"metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.0.5"], "nodeName": "me"},
                          {"addresses": ["10.244.1.5"], "nodeName": "other", "conditions": {"ready": false, "serving": true, "terminating": true}},
                          {"addresses": ["10.244.1.6"], "nodeName": "other"}]});
        let objects = ClusterObjects {
            services: vec![Arc::new(serde_json::from_value(svc).unwrap())],
            endpoint_slices: vec![Arc::new(serde_json::from_value(slice).unwrap())],
            nodes: vec![],
        };
        let config = ModelConfig { node_name: Some("me".into()), node_port_addresses: Some(vec!["192.168.1.10".parse().unwrap()]), ..Default::default() };
        model::build(&objects, &config)
    }

    fn summary(p: &Plan) -> Vec<String> {
        p.entries
            .iter()
            .map(|(fe, e)| {
                let addrs = |s: &[PlannedBackend]| s.iter().map(|b| format!("{}{}", b.addr, if b.local { "L" } else { "" })).collect::<Vec<_>>().join(",");
                format!("{} {:?} {:?} {:?} flags={} aff={} [{}]", fe.addr, fe.proto, fe.scope, e.kind, e.flags, e.affinity_timeout_s, addrs(&e.active))
            })
            .collect()
    }

    #[test]
    fn cluster_policies_give_one_entry_per_frontend() {
        let p = plan(&desired("Cluster", "Cluster", &["10.96.0.10"]));
        assert_eq!(
            summary(&p),
            [
                "0.0.0.0:30080 Tcp External NodePort flags=0 aff=10800 [10.244.0.5:8080L,10.244.1.6:8080]",
                "10.96.0.10:80 Tcp External ClusterIp flags=0 aff=10800 [10.244.0.5:8080L,10.244.1.6:8080]",
            ]
        );
        assert_eq!(p.backends().len(), 2, "the not-ready terminating endpoint is not used while ready ones exist");
    }

    #[test]
    fn external_local_adds_an_internal_scope_entry() {
        let p = plan(&desired("Local", "Cluster", &["10.96.0.10"]));
        let two = SVC_FLAG_EXT_LOCAL | SVC_FLAG_TWO_SCOPES;
        assert_eq!(
            summary(&p),
            [
                format!("0.0.0.0:30080 Tcp External NodePort flags={two} aff=10800 [10.244.0.5:8080L]"),
                format!("0.0.0.0:30080 Tcp Internal NodePort flags={two} aff=10800 [10.244.0.5:8080L,10.244.1.6:8080]"),
                "10.96.0.10:80 Tcp External ClusterIp flags=0 aff=10800 [10.244.0.5:8080L,10.244.1.6:8080]".to_string(),
            ]
        );
    }

    #[test]
    fn internal_local_restricts_the_cluster_ip() {
        let p = plan(&desired("Cluster", "Local", &["10.96.0.10"]));
        let two = SVC_FLAG_INT_LOCAL | SVC_FLAG_TWO_SCOPES;
        // NodePort traffic from outside uses all endpoints; from inside, iTP Local applies.
        assert_eq!(
            summary(&p),
            [
                format!("0.0.0.0:30080 Tcp External NodePort flags={two} aff=10800 [10.244.0.5:8080L,10.244.1.6:8080]"),
                format!("0.0.0.0:30080 Tcp Internal NodePort flags={two} aff=10800 [10.244.0.5:8080L]"),
                format!("10.96.0.10:80 Tcp External ClusterIp flags={SVC_FLAG_INT_LOCAL} aff=10800 [10.244.0.5:8080L]"),
            ]
        );
    }

    /// Two Services claiming one frontend: the last in name order has it, and when it goes the
    /// other one gets it back; a `Planner` fed the changes holds what `plan` gives.
    #[test]
    fn planner_follows_plan_through_changes_and_claims() {
        let base = desired("Cluster", "Cluster", &["10.96.0.10"]);
        let web = base.services.keys().next().unwrap().clone();
        let other = ServiceName { namespace: "default".into(), name: "zz-other".into() };
        let mut state = base.clone();
        let mut planner = Planner::default();
        planner.reset(&state);
        assert_eq!(planner.plan(), &plan(&state));

        // zz-other claims web's ClusterIP (same address and port): it wins the entry.
        let mut clash = state.services[&web].clone();
        clash.ports[0].frontends.retain(|f| f.scope == model::FrontendScope::ClusterIP);
        clash.ports[0].cluster_backends.truncate(1);
        state.services.insert(other.clone(), clash);
        let touched = planner.update(&state, [&other]);
        assert_eq!(touched.len(), 1);
        assert_eq!(planner.plan(), &plan(&state));
        assert_eq!(planner.plan().entries.values().filter(|e| e.service == other).count(), 1);

        // web changes (its NodePort entry goes to a single backend); zz-other keeps the ClusterIP.
        state.services.get_mut(&web).unwrap().ports[0].cluster_backends.truncate(1);
        planner.update(&state, [&web]);
        assert_eq!(planner.plan(), &plan(&state));

        // zz-other goes: web gets its ClusterIP entry back without being re-planned itself.
        state.services.remove(&other);
        let touched = planner.update(&state, [&other]);
        assert_eq!(touched.len(), 1);
        assert_eq!(planner.plan(), &plan(&state));
        assert!(planner.plan().entries.values().all(|e| e.service == web));

        state.services.clear();
        planner.update(&state, [&web]);
        assert_eq!(planner.plan(), &Plan::default());
    }

    #[test]
    fn ipv6_frontends_are_counted_not_written() {
        let p = plan(&desired("Cluster", "Cluster", &["10.96.0.10", "fd00::10"]));
        assert_eq!(p.skipped.ipv6_frontends, 1);
        assert_eq!(p.entries.len(), 2);
    }
}
