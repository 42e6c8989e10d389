//! The agent's Prometheus metrics: its own (`dataplane_agent_*`: sync latency, counts) and the
//! data path's (`dataplane_*`: drops by reason, packets per hook, per-Service packets, bytes and
//! socket-LB operations), which a collector reads from the pinned counter maps at each scrape.
//!
//! Per-Service series are keyed by the rev-NAT id the data path counts under. The frontend map
//! says which frontend (address, port, protocol) has which id; the desired state says which
//! Service and port a frontend belongs to. Both joins happen here, so neither the data path nor
//! the reconciler needs to know about labels.
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::maps::lb::LbMaps;
use crate::maps::stats::StatsMaps;
use crate::maps::{MapsError, Source};
use crate::model::{DesiredState, FrontendScope, ServiceName};

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    /// Time from a source snapshot to the desired state applied.
    pub sync_seconds: Histogram,
    pub syncs: Counter,
    pub source_errors: Counter,
    /// 1 while the source works, 0 while it fails (and before its first success).
    pub source_up: Gauge,
    pub services: Gauge,
    pub frontends: Gauge,
    pub backends: Gauge,
    pub invalid_services: Gauge,
    pub ready: Gauge,
    /// Entries in the service maps, as the reconciler last wrote them.
    pub map_frontends: Gauge,
    pub map_backends: Gauge,
    /// The data path's counters, read at scrape time (empty until [`Metrics::attach_datapath`]).
    pub datapath: Arc<DataPathCollector>,
    /// The conntrack and affinity GC (`dataplane_ct_gc_*`).
    pub ct_gc: crate::gc::GcMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        // 100 µs .. ~1.6 s: a sync of a few Services takes well under a millisecond, 10k Services
        // a few hundred milliseconds.
        let sync_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        let m = Metrics {
            sync_seconds,
            syncs: Counter::default(),
            source_errors: Counter::default(),
            source_up: Gauge::default(),
            services: Gauge::default(),
            frontends: Gauge::default(),
            backends: Gauge::default(),
            invalid_services: Gauge::default(),
            ready: Gauge::default(),
            map_frontends: Gauge::default(),
            map_backends: Gauge::default(),
            datapath: Arc::default(),
            ct_gc: crate::gc::GcMetrics::default(),
            registry: Registry::default(),
        };
        let mut root = Registry::default();
        let agent = root.sub_registry_with_prefix("dataplane_agent");
        agent.register("sync_duration_seconds", "Time from a source snapshot to the desired state applied", m.sync_seconds.clone());
        agent.register("syncs", "Snapshots applied", m.syncs.clone());
        agent.register("source_errors", "Failures of the source, each distinct error once (watch errors, API server unreachable, bad manifests)", m.source_errors.clone());
        agent.register(
            "source_up",
            "1 while the source works; 0 while it fails (API server unreachable, watch refused, broken manifest) or before its first full read. The data plane keeps the last good state meanwhile",
            m.source_up.clone(),
        );
        agent.register("services", "Services in the desired state", m.services.clone());
        agent.register("frontends", "Frontends (address, port, protocol) in the desired state", m.frontends.clone());
        agent.register("backends", "Backends over all Service ports in the desired state", m.backends.clone());
        agent.register("invalid_services", "Services or parts of Services left out because of errors", m.invalid_services.clone());
        agent.register("ready", "1 after the first full sync", m.ready.clone());
        agent.register("map_frontend_entries", "Frontend entries (per scope) in the service maps", m.map_frontends.clone());
        agent.register("map_backends", "Backends in the service maps", m.map_backends.clone());
        // The data path's series are not the agent's: they keep counting while it is down.
        root.sub_registry_with_prefix("dataplane").register_collector(Box::new(m.datapath.clone()));
        m.ct_gc.register(root.sub_registry_with_prefix("dataplane_ct_gc"));
        Metrics { registry: root, ..m }
    }
}

impl Metrics {
    /// Records a sync. `changed`: the Services the model rebuilt (all of them on the first sync),
    /// whose frontends' labels are refreshed; the others keep theirs.
    pub fn observe(&self, state: &DesiredState, changed: &BTreeSet<ServiceName>, seconds: f64) {
        self.sync_seconds.observe(seconds);
        self.syncs.inc();
        self.services.set(state.services.len() as i64);
        self.frontends.set(state.frontend_count() as i64);
        self.backends.set(state.backend_count() as i64);
        self.invalid_services.set(state.errors.len() as i64);
        self.ready.set(1);
        self.datapath.update_frontends(state, changed);
    }

    /// Reads the data path's counters from the maps pinned under `pin_dir` from now on.
    pub fn attach_datapath(&self, pin_dir: &Path) -> Result<(), MapsError> {
        self.datapath.attach(StatsMaps::open(Source::Pinned(pin_dir))?, LbMaps::open(Source::Pinned(pin_dir))?);
        Ok(())
    }

    /// The OpenMetrics text. Reads the data path's maps (one lookup per Service frontend), so
    /// callers on an async runtime run it on a blocking thread.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut s, &self.registry).expect("encode metrics");
        s
    }
}

/// The labels of one Service frontend's series.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FrontendLabels {
    pub namespace: Arc<str>,
    pub service: Arc<str>,
    /// The Service port's name ("" for a single unnamed port).
    pub port: Arc<str>,
    /// `TCP` or `UDP`.
    pub protocol: &'static str,
    /// `ClusterIP`, `NodePort`, `LoadBalancer` or `ExternalIP`: which address the frontend is.
    pub kind: &'static str,
    /// `address:port` as the maps hold it (NodePorts: `0.0.0.0:<nodePort>`, any node address).
    pub frontend: String,
}

/// A frontend as the maps key it, minus the scope (both scopes of a frontend share its rev-NAT
/// id): address, port, IP protocol number.
type FrontendId = (SocketAddrV4, u8);

/// Which Service port each IPv4 frontend of the desired state belongs to. Kept up to date per
/// Service (`update`), so a sync that changed one Service costs one Service's work here, not a
/// walk over all of them (at 10k Services a full build takes 6-10 ms).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FrontendIndex {
    by_frontend: HashMap<FrontendId, FrontendLabels>,
    /// The frontends each Service holds in `by_frontend`, to drop them when it changes.
    by_service: HashMap<ServiceName, Vec<FrontendId>>,
}

impl FrontendIndex {
    pub fn build(state: &DesiredState) -> FrontendIndex {
        let mut index = FrontendIndex::default();
        index.update(state, state.services.keys());
        index
    }

    /// Refreshes the entries of `changed` Services from `state` (a Service absent from it loses
    /// its entries).
    pub fn update<'a>(&mut self, state: &DesiredState, changed: impl IntoIterator<Item = &'a ServiceName> + Clone) {
        // All removals first: a frontend can move from one changed Service to another (one
        // deleted, one created on its address) in either name order.
        for name in changed.clone() {
            for key in self.by_service.remove(name).unwrap_or_default() {
                self.by_frontend.remove(&key);
            }
        }
        for name in changed {
            let Some(svc) = state.services.get(name) else { continue };
            // Shared by the Service's frontends rather than copied per series.
            let (namespace, service): (Arc<str>, Arc<str>) = (name.namespace.as_str().into(), name.name.as_str().into());
            let mut owned = Vec::new();
            for port in &svc.ports {
                let port_name: Arc<str> = port.name.as_str().into();
                for fe in &port.frontends {
                    // IPv6 frontends are not programmed yet (no IPv6 service maps), so never counted.
                    let IpAddr::V4(addr) = fe.addr else { continue };
                    let (addr, kind) = match fe.scope {
                        FrontendScope::ClusterIP => (addr, "ClusterIP"),
                        // As `reconcile::plan` keys them: one wildcard entry per NodePort.
                        FrontendScope::NodePort => (Ipv4Addr::UNSPECIFIED, "NodePort"),
                        FrontendScope::LoadBalancer => (addr, "LoadBalancer"),
                        FrontendScope::ExternalIP => (addr, "ExternalIP"),
                    };
                    let key = SocketAddrV4::new(addr, fe.port);
                    let protocol = match fe.protocol {
                        crate::model::Protocol::Tcp => "TCP",
                        crate::model::Protocol::Udp => "UDP",
                    };
                    let id = (key, fe.protocol.number());
                    // A frontend claimed by two Services keeps the labels of the one that took
                    // it first; the other gets no series for it.
                    if let std::collections::hash_map::Entry::Vacant(v) = self.by_frontend.entry(id) {
                        v.insert(FrontendLabels {
                            namespace: namespace.clone(),
                            service: service.clone(),
                            port: port_name.clone(),
                            protocol,
                            kind,
                            frontend: key.to_string(),
                        });
                        owned.push(id);
                    }
                }
            }
            if !owned.is_empty() {
                self.by_service.insert(name.clone(), owned);
            }
        }
    }

    pub fn get(&self, addr: SocketAddrV4, proto: u8) -> Option<&FrontendLabels> {
        self.by_frontend.get(&(addr, proto))
    }

    pub fn len(&self) -> usize {
        self.by_frontend.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_frontend.is_empty()
    }
}

/// One Service frontend's series: where the data path counts it, and its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSeries {
    pub rev_nat_id: u32,
    pub labels: FrontendLabels,
}

/// Joins the frontend map (frontend -> rev-NAT id) with the desired state's frontends. Frontends
/// the desired state does not know (orphans a sync is about to remove) get no series.
pub fn service_series(lb: &LbMaps, index: &FrontendIndex) -> Result<Vec<ServiceSeries>, MapsError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for fe in lb.frontends()? {
        let id = (fe.addr, fe.proto as u8);
        if !seen.insert(id) {
            continue; // the internal-scope entry of a frontend already listed
        }
        let Some(labels) = index.get(fe.addr, fe.proto as u8) else { continue };
        let Some(entry) = lb.service_entry(&fe)? else { continue };
        out.push(ServiceSeries { rev_nat_id: entry.rev_nat_id, labels: labels.clone() });
    }
    Ok(out)
}

/// Reads the data path's counter maps at scrape time. Its lock is held only to swap snapshots:
/// a scrape reading thousands of counters never holds up the sync loop's `observe`.
#[derive(Default)]
pub struct DataPathCollector {
    inner: Mutex<CollectorState>,
}

type DataPathMaps = Arc<(StatsMaps, LbMaps)>;

#[derive(Default)]
struct CollectorState {
    maps: Option<DataPathMaps>,
    /// Copy-on-write: a scrape holds a clone while it joins; `observe` then copies it once.
    index: Arc<FrontendIndex>,
    /// Bumped with every index change: the cached series list is valid for one generation.
    generation: u64,
    series: Option<(u64, Arc<Vec<ServiceSeries>>)>,
}

impl fmt::Debug for DataPathCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataPathCollector").finish_non_exhaustive()
    }
}

impl DataPathCollector {
    fn state(&self) -> std::sync::MutexGuard<'_, CollectorState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn attach(&self, stats: StatsMaps, lb: LbMaps) {
        let mut s = self.state();
        s.maps = Some(Arc::new((stats, lb)));
        s.generation += 1;
    }

    /// A sync applied `state`: the `changed` Services' frontends (and rev-NAT ids) may differ.
    pub fn update_frontends(&self, state: &DesiredState, changed: &BTreeSet<ServiceName>) {
        let mut s = self.state();
        if changed.is_empty() {
            // Rev-NAT ids change only with frontends, frontends only with Services.
            return;
        }
        Arc::make_mut(&mut s.index).update(state, changed);
        s.generation += 1;
    }

    /// The per-Service series, joined once per index change rather than once per scrape (the
    /// frontend map changes only when a sync changes Services).
    fn series(&self, maps: &DataPathMaps) -> Result<Arc<Vec<ServiceSeries>>, MapsError> {
        let (generation, index) = {
            let s = self.state();
            if let Some((generation, series)) = &s.series
                && *generation == s.generation
            {
                return Ok(series.clone());
            }
            (s.generation, s.index.clone())
        };
        let series = Arc::new(service_series(&maps.1, &index)?);
        let mut s = self.state();
        if s.generation == generation {
            s.series = Some((generation, series.clone()));
        }
        Ok(series)
    }
}

fn counter_family<'a, L: EncodeLabelSet + 'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (&'a L, u64)>,
) -> Result<(), fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in rows {
        ConstCounter::new(value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

type Label = [(&'static str, &'static str); 1];

impl Collector for DataPathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(maps) = self.state().maps.clone() else { return Ok(()) };
        let stats = &maps.0;
        // A map that cannot be read leaves its series out of this scrape (and says why in the
        // log); the rest is still served.
        match stats.drops() {
            Ok(drops) => {
                let rows: Vec<(Label, _)> = drops.iter().map(|(r, c)| ([("reason", r.name())], *c)).collect();
                counter_family(&mut encoder, "drops", "Packets (socket hooks: operations) the data path dropped or refused, by reason.", rows.iter().map(|(l, c)| (l, c.packets)))?;
                counter_family(&mut encoder, "drop_bytes", "Bytes of the packets the data path dropped, by reason (0 for socket operations).", rows.iter().map(|(l, c)| (l, c.bytes)))?;
            }
            Err(e) => tracing::warn!(error = %crate::errors::error_chain(&e), "drop counters not read"),
        }
        match stats.hooks() {
            Ok(hooks) => {
                let rows: Vec<(Label, _)> = hooks.iter().map(|(h, c)| ([("hook", h.name())], *c)).collect();
                counter_family(&mut encoder, "hook_packets", "Packets each attached program saw (socket hooks: calls).", rows.iter().map(|(l, c)| (l, c.packets)))?;
                counter_family(&mut encoder, "hook_bytes", "Bytes of the packets each attached program saw (0 for socket hooks).", rows.iter().map(|(l, c)| (l, c.bytes)))?;
            }
            Err(e) => tracing::warn!(error = %crate::errors::error_chain(&e), "hook counters not read"),
        }
        let series = match self.series(&maps) {
            Ok(series) => series,
            Err(e) => {
                tracing::warn!(error = %crate::errors::error_chain(&e), "frontend map not read; no per-Service series");
                return Ok(());
            }
        };
        let mut packets = Vec::with_capacity(series.len());
        let mut socket = Vec::with_capacity(series.len());
        for row in series.iter() {
            match (stats.service(row.rev_nat_id), stats.sock_lb(row.rev_nat_id)) {
                (Ok(p), Ok(k)) => {
                    packets.push((&row.labels, p));
                    socket.push((&row.labels, k));
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(rev_nat_id = row.rev_nat_id, error = %crate::errors::error_chain(&e), "service counters not read");
                }
            }
        }
        counter_family(
            &mut encoder,
            "service_packets",
            "Packets the per-packet paths (XDP/TC: NodePort, LoadBalancer, externalIPs, Pod veth fallback) forwarded for this Service frontend, both directions.",
            packets.iter().map(|(l, c)| (*l, c.packets)),
        )?;
        counter_family(&mut encoder, "service_bytes", "Bytes (with the Ethernet header) of the packets in dataplane_service_packets_total.", packets.iter().map(|(l, c)| (*l, c.bytes)))?;
        counter_family(
            &mut encoder,
            "service_socket_connects",
            "connect() calls from this node's Pods and host the socket-LB hooks sent to a backend of this frontend (TCP connections, connected UDP sockets); their packets and bytes are not visible at the socket hook.",
            socket.iter().map(|(l, c)| (*l, c.connect)),
        )?;
        counter_family(
            &mut encoder,
            "service_socket_datagrams",
            "Unconnected UDP sendmsg() calls the socket-LB hooks sent to a backend of this frontend (bytes not visible at the socket hook).",
            socket.iter().map(|(l, c)| (*l, c.sendmsg)),
        )?;
        counter_family(
            &mut encoder,
            "service_socket_refused",
            "connect()/sendmsg() calls to this frontend refused with ECONNREFUSED because it had no usable backend.",
            socket.iter().map(|(l, c)| (*l, c.refused)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{self, ClusterObjects, ModelConfig};
    use serde_json::json;

    /// A LoadBalancer Service with two named ports (TCP and UDP), an externalIP and an IPv6
    /// cluster IP, plus a second ClusterIP Service.
    fn desired() -> DesiredState {
        let lb = json!({"metadata": {"name": "web", "namespace": "shop"}, "spec": {
            "type": "LoadBalancer", "clusterIPs": ["10.96.0.10", "fd00::10"], "ipFamilies": ["IPv4", "IPv6"],
            "externalIPs": ["192.0.2.7"],
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}, {"name": "dns", "protocol": "UDP", "port": 53, "nodePort": 30053}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}});
        let other = json!({"metadata": {"name": "db", "namespace": "default"}, "spec": {
            "clusterIPs": ["10.96.0.11"], "ports": [{"port": 5432}]}});
        let objects = ClusterObjects {
            services: vec![Arc::new(serde_json::from_value(lb).unwrap()), Arc::new(serde_json::from_value(other).unwrap())],
            endpoint_slices: vec![],
            nodes: vec![],
        };
        let config = ModelConfig { node_name: Some("me".into()), node_port_addresses: Some(vec!["192.168.1.10".parse().unwrap()]), ..Default::default() };
        model::build(&objects, &config)
    }

    #[test]
    fn every_programmed_frontend_has_its_service_port_and_kind() {
        let state = desired();
        let index = FrontendIndex::build(&state);
        let plan = crate::reconcile::plan(&state);
        assert!(!plan.entries.is_empty());
        for (fe, entry) in &plan.entries {
            let labels = index.get(fe.addr, fe.proto as u8).unwrap_or_else(|| panic!("{fe:?} has no labels"));
            assert_eq!((&*labels.namespace, &*labels.service), (entry.service.namespace.as_str(), entry.service.name.as_str()));
            assert_eq!(labels.frontend, fe.addr.to_string());
        }
        // IPv4 only: ClusterIP, NodePort, LoadBalancer, externalIP for each of web's two ports, and db's one.
        assert_eq!(index.len(), 9);
        let sa = |s: &str| s.parse::<SocketAddrV4>().unwrap();
        let l = index.get(sa("0.0.0.0:30053"), 17).unwrap();
        assert_eq!((&*l.port, l.protocol, l.kind), ("dns", "UDP", "NodePort"));
        let l = index.get(sa("198.51.100.1:80"), 6).unwrap();
        assert_eq!((&*l.namespace, &*l.service, &*l.port, l.kind), ("shop", "web", "http", "LoadBalancer"));
        assert_eq!(index.get(sa("192.0.2.7:80"), 6).unwrap().kind, "ExternalIP");
        assert_eq!(index.get(sa("10.96.0.11:5432"), 6).unwrap().port.as_ref(), "");
        assert!(index.get(sa("10.96.0.10:80"), 17).is_none(), "no UDP frontend on the TCP port");
    }

    #[test]
    fn an_update_of_the_changed_services_equals_a_full_build() {
        let before = desired();
        let mut index = FrontendIndex::build(&before);
        // db goes away, web's http port is renamed, a new Service takes db's cluster IP.
        let web = json!({"metadata": {"name": "web", "namespace": "shop"}, "spec": {
            "type": "NodePort", "clusterIPs": ["10.96.0.10"], "ports": [{"name": "www", "port": 80, "nodePort": 30080}]}});
        let cache = json!({"metadata": {"name": "cache", "namespace": "default"}, "spec": {
            "clusterIPs": ["10.96.0.11"], "ports": [{"name": "redis", "port": 5432}]}});
        let objects = ClusterObjects {
            services: vec![Arc::new(serde_json::from_value(web).unwrap()), Arc::new(serde_json::from_value(cache).unwrap())],
            endpoint_slices: vec![],
            nodes: vec![],
        };
        let config = ModelConfig { node_name: Some("me".into()), node_port_addresses: Some(vec!["192.168.1.10".parse().unwrap()]), ..Default::default() };
        let after = model::build(&objects, &config);
        let changed: BTreeSet<ServiceName> = before.services.keys().chain(after.services.keys()).cloned().collect();
        index.update(&after, &changed);
        assert_eq!(index, FrontendIndex::build(&after));
        let sa = |s: &str| s.parse::<SocketAddrV4>().unwrap();
        assert_eq!(&*index.get(sa("10.96.0.11:5432"), 6).unwrap().service, "cache");
        assert_eq!(&*index.get(sa("0.0.0.0:30080"), 6).unwrap().port, "www");
        assert!(index.get(sa("198.51.100.1:80"), 6).is_none(), "the LoadBalancer frontend is gone");
        // Unchanged Services are not looked at: an update naming none changes nothing.
        let kept = index.clone();
        index.update(&before, &BTreeSet::new());
        assert_eq!(index, kept);
    }

    #[test]
    fn without_data_path_maps_only_the_agent_series_are_served() {
        let m = Metrics::default();
        let state = desired();
        m.observe(&state, &state.services.keys().cloned().collect(), 0.001);
        let text = m.encode();
        assert!(text.contains("dataplane_agent_syncs_total 1"), "{text}");
        assert!(!text.contains("dataplane_drops"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
