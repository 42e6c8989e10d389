//! `run`: source -> model -> reconcile (service maps) -> routes, CNI node file, metrics, status.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::model::{self, DesiredState, ModelCache, ModelConfig};
use crate::reconcile::{self, Planner, Reconciler};
use crate::routes::{self, RouteSync};
use crate::source::{SourceState, Subscriber};

/// What `status` shows; also written to `<state dir>/status.json` after every sync so that it
/// can be read while the agent is down.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentStatus {
    pub ready: bool,
    pub source: String,
    pub syncs: u64,
    pub last_sync_unix_ms: Option<u64>,
    pub last_sync_duration_ms: Option<f64>,
    pub services: usize,
    pub frontends: usize,
    pub backends: usize,
    pub routes: usize,
    /// Frontend entries and backends in the service maps (0 with `--no-maps`).
    pub map_frontends: usize,
    pub map_backends: usize,
    /// IPv6 frontends not programmed (the IPv6 service maps do not exist yet).
    pub skipped_ipv6_frontends: usize,
    /// The newest source or apply error; cleared by the next successful sync.
    pub last_error: Option<String>,
    /// Services (or parts) left out, with why.
    pub service_errors: Vec<String>,
}

#[derive(Debug)]
pub struct AgentState {
    pub metrics: Metrics,
    ready: AtomicBool,
    status: Mutex<AgentStatus>,
}

impl AgentState {
    pub fn new(source: String) -> Self {
        AgentState {
            metrics: Metrics::default(),
            ready: AtomicBool::new(false),
            status: Mutex::new(AgentStatus { source, ..Default::default() }),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn status(&self) -> AgentStatus {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut AgentStatus)) -> AgentStatus {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        s.clone()
    }
}

/// The parts of `run` that act on the node besides the maps.
#[derive(Debug, Clone, Default)]
pub struct Actions {
    pub model: ModelConfig,
    /// Program routes to other nodes' podCIDRs (needs `model.node_name`).
    pub routes: bool,
    /// Write this node's podCIDRs for the CNI plugin.
    pub node_file: Option<PathBuf>,
    /// Where `status.json` goes.
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Routes(#[from] routes::RouteError),
    #[error("programming the service maps")]
    Maps(#[from] reconcile::ReconcileError),
    #[error("writing {path}")]
    Status {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Applies every new snapshot until the source goes away. A failed apply is reported (status,
/// metrics, log) and retried (after `RETRY`, or with the next snapshot); it never stops the loop.
///
/// Incremental: the model rebuilds the Services whose objects changed, the planner re-plans
/// them, and the reconciler diffs their frontend entries alone against its mirror of the maps.
/// Everything is diffed (against a mirror read again from the maps) on the first snapshot,
/// after a relist, and after a failed apply.
pub async fn sync_loop(mut rx: Subscriber, actions: Actions, mut maps: Option<Reconciler>, state: Arc<AgentState>) {
    let mut routes = None;
    let mut last_applied: Option<Arc<model::ClusterObjects>> = None;
    let mut last_source_error: Option<String> = None;
    let mut model = ModelCache::new(actions.model.clone());
    let mut planner = Planner::default();
    let mut applied_relists: Option<u64> = None;
    // Set when the maps may differ from the mirror in more than the next change: diff everything.
    let mut diff_all = true;
    loop {
        let snapshot: SourceState = rx.borrow_and_update().clone();
        // Counted once per distinct error, not once per loop turn (retries turn the loop too).
        if snapshot.last_error != last_source_error {
            if let Some(err) = &snapshot.last_error {
                state.metrics.source_errors.inc();
                state.update(|s| s.last_error = Some(err.clone()));
            }
            last_source_error = snapshot.last_error.clone();
        }
        if let Some(objects) = snapshot.objects.filter(|o| last_applied.as_ref().is_none_or(|l| !Arc::ptr_eq(l, o))) {
            let started = Instant::now();
            // The reconciler adopted the maps when it was created: the first snapshot needs no re-read.
            let relisted = applied_relists.is_some_and(|n| n != snapshot.relists);
            let changed = model.update(&objects);
            let touched = planner.update(model.state(), &changed.services);
            let desired = model.state();
            let plan = planner.plan();
            // Maps first: Services are what traffic depends on; a route failure must not hold them back.
            let programmed = match maps.as_mut() {
                None => Ok(()),
                Some(r) if relisted => r.readopt().and_then(|()| r.apply(plan)).map(drop),
                Some(r) if diff_all => r.apply(plan).map(drop),
                Some(r) => r.apply_touched(plan, &touched).map(drop),
            };
            let applied = match programmed {
                Ok(()) => apply(desired, &actions, &mut routes).await,
                Err(e) => Err(ApplyError::from(e)),
            };
            // A failed write leaves the maps between old and new: the retry diffs everything.
            diff_all = applied.is_err();
            if applied.is_ok() {
                applied_relists = Some(snapshot.relists);
            }
            let took = started.elapsed();
            tracing::debug!(services = changed.services.len(), frontends = touched.len(), relisted, ms = took.as_secs_f64() * 1000.0, "synced");
            state.metrics.observe(desired, &changed.services, took.as_secs_f64());
            let status = state.update(|s| {
                s.ready = true;
                s.syncs += 1;
                s.last_sync_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).ok().map(|d| d.as_millis() as u64);
                s.last_sync_duration_ms = Some(took.as_secs_f64() * 1000.0);
                s.services = desired.services.len();
                s.frontends = desired.frontend_count();
                s.backends = desired.backend_count();
                s.routes = routes.as_ref().map_or(0, |r: &RouteSync| r.installed().len());
                s.map_frontends = maps.as_ref().map_or(0, Reconciler::frontend_count);
                s.map_backends = maps.as_ref().map_or(0, Reconciler::backend_count);
                s.skipped_ipv6_frontends = plan.skipped.ipv6_frontends;
                s.service_errors = desired.errors.iter().map(ToString::to_string).collect();
                s.last_error = match &applied {
                    Ok(()) => snapshot.last_error.clone(),
                    Err(e) => Some(crate::errors::error_chain(e)),
                };
            });
            state.metrics.map_frontends.set(status.map_frontends as i64);
            state.metrics.map_backends.set(status.map_backends as i64);
            if let Err(e) = &applied {
                tracing::warn!(error = %crate::errors::error_chain(e), "apply failed; retrying");
            }
            if let Some(dir) = &actions.state_dir
                && let Err(e) = write_status(dir, &status)
            {
                tracing::warn!(error = %crate::errors::error_chain(&e), "status file not written");
            }
            state.ready.store(true, Ordering::Release);
            if applied.is_ok()
                && let Some(node_file) = &actions.node_file
            {
                // The CNI plugin's STATUS answers "not ready" (code 50) until this file exists, so
                // the runtime starts no Pod before the data plane is programmed (docs/cni.md).
                let ready = readiness_file(node_file);
                if !ready.exists()
                    && let Err(e) = std::fs::write(&ready, b"")
                {
                    tracing::warn!(path = %ready.display(), error = %e, "CNI readiness file not written");
                }
            }
            // A failed apply is retried after RETRY even when the source stays quiet (a watch
            // can be silent for minutes); a new snapshot retries sooner.
            last_applied = applied.is_ok().then_some(objects);
        }
        let changed = match last_applied {
            Some(_) => rx.changed().await,
            None => match tokio::time::timeout(RETRY, rx.changed()).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            },
        };
        if changed.is_err() {
            return;
        }
    }
}

/// The CNI readiness file: `ready` beside the node file (`/run/dataplane/ready` by default, the
/// plugin's default `readinessFile`).
pub fn readiness_file(node_file: &std::path::Path) -> PathBuf {
    node_file.with_file_name("ready")
}

/// How soon a failed apply is tried again.
pub const RETRY: std::time::Duration = std::time::Duration::from_secs(1);

async fn apply(desired: &DesiredState, actions: &Actions, routes: &mut Option<RouteSync>) -> Result<(), ApplyError> {
    let Some(node) = actions.model.node_name.as_deref() else { return Ok(()) };
    if let Some(path) = &actions.node_file {
        // Only once our Node (and so its podCIDRs) is known: an empty file would make the CNI
        // plugin fail every Pod instead of waiting.
        if let Some(me) = desired.nodes.get(node).filter(|n| !n.pod_cidrs.is_empty())
            && routes::write_node_file(path, &me.pod_cidrs)?
        {
            tracing::info!(path = %path.display(), cidrs = ?me.pod_cidrs, "CNI node file written");
        }
    }
    if actions.routes {
        let sync = match routes {
            Some(r) => r,
            None => routes.insert(RouteSync::new().await?),
        };
        let changes = sync.sync(&routes::wanted(&desired.nodes, node)).await?;
        if !changes.added.is_empty() || !changes.removed.is_empty() {
            tracing::info!(added = ?changes.added, removed = ?changes.removed, "routes updated");
        }
    }
    Ok(())
}

pub const STATUS_FILE: &str = "status.json";

pub fn write_status(dir: &Path, status: &AgentStatus) -> Result<(), ApplyError> {
    let path = dir.join(STATUS_FILE);
    let err = |source| ApplyError::Status { path: path.clone(), source };
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(format!(".{STATUS_FILE}.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(status).unwrap_or_default()).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)
}
