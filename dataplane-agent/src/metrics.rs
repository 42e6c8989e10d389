//! The agent's Prometheus metrics. Per-Service packet counters and drops by reason come from the
//! data path's maps and are added by `reconcile` once it owns them.
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::DesiredState;

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
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("dataplane_agent");
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
            registry: Registry::default(),
        };
        registry.register("sync_duration_seconds", "Time from a source snapshot to the desired state applied", m.sync_seconds.clone());
        registry.register("syncs", "Snapshots applied", m.syncs.clone());
        registry.register("source_errors", "Failed reads of the source (watch errors, bad manifests)", m.source_errors.clone());
        registry.register("services", "Services in the desired state", m.services.clone());
        registry.register("frontends", "Frontends (address, port, protocol) in the desired state", m.frontends.clone());
        registry.register("backends", "Backends over all Service ports in the desired state", m.backends.clone());
        registry.register("invalid_services", "Services or parts of Services left out because of errors", m.invalid_services.clone());
        registry.register("ready", "1 after the first full sync", m.ready.clone());
        registry.register("map_frontend_entries", "Frontend entries (per scope) in the service maps", m.map_frontends.clone());
        registry.register("map_backends", "Backends in the service maps", m.map_backends.clone());
        Metrics { registry, ..m }
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
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut s, &self.registry).expect("encode metrics");
        s
    }
}
