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
use crate::model::{DesiredState, FrontendScope};

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    /// Time from a source snapshot to the desired state applied.
    pub sync_seconds: Histogram,
    pub syncs: Counter,
    pub source_errors: Counter,
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
            services: Gauge::default(),
            frontends: Gauge::default(),
            backends: Gauge::default(),
            invalid_services: Gauge::default(),
            ready: Gauge::default(),
            map_frontends: Gauge::default(),
            map_backends: Gauge::default(),
            datapath: Arc::default(),
            registry: Registry::default(),
        };
        let mut root = Registry::default();
        let agent = root.sub_registry_with_prefix("dataplane_agent");
        agent.register("sync_duration_seconds", "Time from a source snapshot to the desired state applied", m.sync_seconds.clone());
        agent.register("syncs", "Snapshots applied", m.syncs.clone());
        agent.register("source_errors", "Failed reads of the source (watch errors, bad manifests)", m.source_errors.clone());
        agent.register("services", "Services in the desired state", m.services.clone());
        agent.register("frontends", "Frontends (address, port, protocol) in the desired state", m.frontends.clone());
        agent.register("backends", "Backends over all Service ports in the desired state", m.backends.clone());
        agent.register("invalid_services", "Services or parts of Services left out because of errors", m.invalid_services.clone());
        agent.register("ready", "1 after the first full sync", m.ready.clone());
        agent.register("map_frontend_entries", "Frontend entries (per scope) in the service maps", m.map_frontends.clone());
        agent.register("map_backends", "Backends in the service maps", m.map_backends.clone());
        // The data path's series are not the agent's: they keep counting while it is down.
        root.sub_registry_with_prefix("dataplane").register_collector(Box::new(m.datapath.clone()));
        Metrics { registry: root, ..m }
    }
}

impl Metrics {
    pub fn observe(&self, state: &DesiredState, seconds: f64) {
        self.sync_seconds.observe(seconds);
        self.syncs.inc();
        self.services.set(state.services.len() as i64);
        self.frontends.set(state.frontend_count() as i64);
        self.backends.set(state.backend_count() as i64);
        self.invalid_services.set(state.errors.len() as i64);
        self.ready.set(1);
        self.datapath.set_frontends(FrontendIndex::build(state));
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

/// Which Service port each IPv4 frontend of the desired state belongs to.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FrontendIndex(HashMap<FrontendId, FrontendLabels>);

impl FrontendIndex {
    /// Runs after every sync, so it shares the Service's strings between its frontends rather
    /// than copying them per series.
    pub fn build(state: &DesiredState) -> FrontendIndex {
        let mut index = HashMap::with_capacity(state.frontend_count());
        for (name, svc) in &state.services {
            let (namespace, service): (Arc<str>, Arc<str>) = (name.namespace.as_str().into(), name.name.as_str().into());
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
                    // Two Services cannot own one frontend (the model refuses the second), but
                    // if they did the first in name order keeps the series, as in the maps.
                    index.entry((key, fe.protocol.number())).or_insert_with(|| FrontendLabels {
                        namespace: namespace.clone(),
                        service: service.clone(),
                        port: port_name.clone(),
                        protocol,
                        kind,
                        frontend: key.to_string(),
                    });
                }
            }
        }
        FrontendIndex(index)
    }

    pub fn get(&self, addr: SocketAddrV4, proto: u8) -> Option<&FrontendLabels> {
        self.0.get(&(addr, proto))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
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

/// Reads the data path's counter maps at scrape time.
#[derive(Default)]
pub struct DataPathCollector {
    inner: Mutex<CollectorState>,
}

#[derive(Default)]
struct CollectorState {
    maps: Option<(StatsMaps, LbMaps)>,
    index: Arc<FrontendIndex>,
    /// Bumped with every new index: the series list below is valid for one generation.
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
        s.maps = Some((stats, lb));
        s.series = None;
    }

    /// A new desired state was applied: rev-NAT ids and labels may have changed.
    pub fn set_frontends(&self, index: FrontendIndex) {
        let mut s = self.state();
        s.index = Arc::new(index);
        s.generation += 1;
        s.series = None;
    }

    /// The per-Service series, joined once per applied desired state (the frontend map changes
    /// only when one is applied) rather than once per scrape.
    fn series(s: &mut CollectorState) -> Result<Arc<Vec<ServiceSeries>>, MapsError> {
        if let Some((generation, series)) = &s.series
            && *generation == s.generation
        {
            return Ok(series.clone());
        }
        let Some((_, lb)) = &s.maps else { return Ok(Arc::default()) };
        let series = Arc::new(service_series(lb, &s.index)?);
        s.series = Some((s.generation, series.clone()));
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
        let mut s = self.state();
        let Some((stats, _)) = &s.maps else { return Ok(()) };
        // A map that cannot be read leaves its series out of this scrape (and says why in the
        // log); the rest is still served.
        match stats.drops() {
            Ok(drops) => {
                let rows: Vec<(Label, _)> = drops.iter().map(|(r, c)| ([("reason", r.name())], *c)).collect();
                counter_family(&mut encoder, "drops", "Packets (socket hooks: operations) the data path dropped or refused, by reason", rows.iter().map(|(l, c)| (l, c.packets)))?;
                counter_family(&mut encoder, "drop_bytes", "Bytes of the packets the data path dropped, by reason (0 for socket operations)", rows.iter().map(|(l, c)| (l, c.bytes)))?;
            }
            Err(e) => tracing::warn!(error = %crate::errors::error_chain(&e), "drop counters not read"),
        }
        match stats.hooks() {
            Ok(hooks) => {
                let rows: Vec<(Label, _)> = hooks.iter().map(|(h, c)| ([("hook", h.name())], *c)).collect();
                counter_family(&mut encoder, "hook_packets", "Packets each attached program saw (socket hooks: calls)", rows.iter().map(|(l, c)| (l, c.packets)))?;
                counter_family(&mut encoder, "hook_bytes", "Bytes of the packets each attached program saw (0 for socket hooks)", rows.iter().map(|(l, c)| (l, c.bytes)))?;
            }
            Err(e) => tracing::warn!(error = %crate::errors::error_chain(&e), "hook counters not read"),
        }
        let series = match Self::series(&mut s) {
            Ok(series) => series,
            Err(e) => {
                tracing::warn!(error = %crate::errors::error_chain(&e), "frontend map not read; no per-Service series");
                return Ok(());
            }
        };
        let Some((stats, _)) = &s.maps else { return Ok(()) };
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
            "Packets the per-packet paths (XDP/TC: NodePort, LoadBalancer, externalIPs, Pod veth fallback) forwarded for this Service frontend, both directions",
            packets.iter().map(|(l, c)| (*l, c.packets)),
        )?;
        counter_family(&mut encoder, "service_bytes", "Bytes of those packets", packets.iter().map(|(l, c)| (*l, c.bytes)))?;
        counter_family(
            &mut encoder,
            "service_socket_connects",
            "connect() calls from this node's Pods and host the socket-LB hooks sent to a backend of this frontend (TCP connections, connected UDP sockets); their packets and bytes are not visible at the socket hook",
            socket.iter().map(|(l, c)| (*l, c.connect)),
        )?;
        counter_family(
            &mut encoder,
            "service_socket_datagrams",
            "Unconnected UDP sendmsg() calls the socket-LB hooks sent to a backend of this frontend (bytes not visible at the socket hook)",
            socket.iter().map(|(l, c)| (*l, c.sendmsg)),
        )?;
        counter_family(
            &mut encoder,
            "service_socket_refused",
            "connect()/sendmsg() calls to this frontend refused with ECONNREFUSED because it had no usable backend",
            socket.iter().map(|(l, c)| (*l, c.refused)),
        )?;
        Ok(())
    }
}
