//! The conntrack and session-affinity garbage collector: every `--ct-gc-interval` it deletes the
//! entries whose `expires_s` has passed from the pinned maps (cilium's `pkg/maps/ctmap/gc`).
//!
//! The data path already treats an expired entry as absent, so the GC changes no forwarding
//! decision: it frees the slots, so that the LRU tables evict dead flows rather than live ones
//! when they fill, and so that `status` fill levels and `dataplane_ct_gc_alive_entries` count
//! live flows. It runs on its own OS thread: a sweep is a few hundred blocking syscalls.
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::maps::{
    MapsError, Source,
    affinity::AffinityMap,
    batch::Sweep,
    ct::{self, CtMap},
};

/// The `table` label of the GC's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    /// `conntrack` or `affinity`.
    pub table: &'static str,
}

const CONNTRACK: TableLabel = TableLabel { table: "conntrack" };
const AFFINITY: TableLabel = TableLabel { table: "affinity" };

/// `dataplane_ct_gc_*`.
#[derive(Debug, Clone)]
pub struct GcMetrics {
    pub runs: Counter,
    pub errors: Counter,
    pub deleted: Family<TableLabel, Counter>,
    pub alive: Family<TableLabel, Gauge>,
    pub duration: Histogram,
}

impl Default for GcMetrics {
    fn default() -> Self {
        GcMetrics {
            runs: Counter::default(),
            errors: Counter::default(),
            deleted: Family::default(),
            alive: Family::default(),
            // 1 ms .. ~16 s: an empty table takes well under a millisecond, 1M entries ~0.5 s.
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
        }
    }
}

impl GcMetrics {
    /// Registers the series under `registry` (the caller's prefix: `dataplane_ct_gc`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("runs", "Sweeps of the conntrack and affinity tables", self.runs.clone());
        registry.register("errors", "Sweeps that failed (the next one tries again)", self.errors.clone());
        registry.register("deleted_entries", "Expired entries the GC deleted, per table", self.deleted.clone());
        registry.register("alive_entries", "Entries left after the last sweep (live flows, or client choices), per table", self.alive.clone());
        registry.register("duration_seconds", "Time one sweep of both tables took", self.duration.clone());
    }

    fn observe(&self, r: &GcReport) {
        self.runs.inc();
        self.duration.observe(r.duration.as_secs_f64());
        for (label, s) in [(CONNTRACK, r.conntrack), (AFFINITY, r.affinity)] {
            self.deleted.get_or_create(&label).inc_by(s.deleted);
            self.alive.get_or_create(&label).set(s.seen.saturating_sub(s.deleted) as i64);
        }
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    pub conntrack: Sweep,
    pub affinity: Sweep,
    pub duration: Duration,
}

/// The two tables the GC sweeps.
pub struct Gc {
    ct: CtMap,
    affinity: AffinityMap,
}

impl std::fmt::Debug for Gc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gc").finish_non_exhaustive()
    }
}

impl Gc {
    /// Opens the tables pinned under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Gc, MapsError> {
        Ok(Gc { ct: CtMap::open(Source::Pinned(pin_dir))?, affinity: AffinityMap::open(Source::Pinned(pin_dir))? })
    }

    /// Deletes the entries of both tables that have expired at `now_s` (the data path's clock,
    /// [`ct::now_s`]).
    pub fn sweep(&mut self, now_s: u32) -> Result<GcReport, MapsError> {
        let started = Instant::now();
        let conntrack = self.ct.sweep(now_s)?;
        let affinity = self.affinity.sweep(now_s)?;
        Ok(GcReport { conntrack, affinity, duration: started.elapsed() })
    }
}

/// Starts the GC thread: a sweep every `interval` (the first one `interval` after the start),
/// for as long as the process runs. A failed sweep is logged and counted; the next one tries
/// again with the maps opened anew.
pub fn spawn(pin_dir: &Path, interval: Duration, metrics: GcMetrics) -> std::io::Result<JoinHandle<()>> {
    let pin_dir: PathBuf = pin_dir.to_path_buf();
    std::thread::Builder::new().name("ct-gc".into()).spawn(move || {
        let mut gc: Option<Gc> = None;
        loop {
            std::thread::sleep(interval);
            let result = match gc.as_mut() {
                Some(g) => g.sweep(ct::now_s()),
                None => Gc::open(&pin_dir).and_then(|g| gc.insert(g).sweep(ct::now_s())),
            };
            match result {
                Ok(r) => {
                    metrics.observe(&r);
                    tracing::debug!(
                        ct_deleted = r.conntrack.deleted,
                        ct_alive = r.conntrack.seen.saturating_sub(r.conntrack.deleted),
                        affinity_deleted = r.affinity.deleted,
                        ms = r.duration.as_secs_f64() * 1000.0,
                        "conntrack GC sweep"
                    );
                }
                Err(e) => {
                    metrics.errors.inc();
                    gc = None;
                    tracing::warn!(error = %crate::errors::error_chain(&e), "conntrack GC sweep failed; retrying at the next interval");
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_shows_in_the_metrics() {
        let m = crate::metrics::Metrics::default();
        let report = GcReport {
            conntrack: Sweep { seen: 10, deleted: 4, batched: true },
            affinity: Sweep { seen: 3, deleted: 3, batched: true },
            duration: Duration::from_millis(2),
        };
        m.ct_gc.observe(&report);
        m.ct_gc.observe(&GcReport { conntrack: Sweep { seen: 6, deleted: 1, batched: true }, ..report });
        let text = m.encode();
        for line in [
            "dataplane_ct_gc_runs_total 2",
            "dataplane_ct_gc_deleted_entries_total{table=\"conntrack\"} 5",
            "dataplane_ct_gc_deleted_entries_total{table=\"affinity\"} 6",
            "dataplane_ct_gc_alive_entries{table=\"conntrack\"} 5",
            "dataplane_ct_gc_alive_entries{table=\"affinity\"} 0",
            "dataplane_ct_gc_duration_seconds_count 2",
            "dataplane_ct_gc_errors_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
        }
    }
}
