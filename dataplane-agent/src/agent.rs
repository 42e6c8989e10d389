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

/// What `status` shows; also written to `<state dir>/status.json` after every sync and whenever
/// the source starts or stops failing, so that it can be read while the agent (or the API
/// server) is down.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct AgentStatus {
    /// The first full sync is done (it stays true while the source fails: the data plane keeps
    /// serving the last good state).
    pub ready: bool,
    pub source: String,
    /// The source's newest attempt worked (false before its first success).
    pub source_healthy: bool,
    /// Why the source fails, while it does.
    pub source_error: Option<String>,
    /// Since when the source has been failing (Unix ms).
    pub source_failing_since_unix_ms: Option<u64>,
    /// Whether the API server answered the newest request (kube source); `None` for the
    /// manifests source and before the first request ended.
    pub api_reachable: Option<bool>,
    /// Complete lists the objects came from: the initial list and every relist after a lost
    /// watch (a 410 Gone, or a restarted API server).
    pub source_relists: u64,
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

    #[cfg(test)]
    pub(crate) fn set_ready_for_test(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn status(&self) -> AgentStatus {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut AgentStatus)) -> AgentStatus {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        s.clone()
    }

    /// Takes in the source's health; returns the new status when it changed (to be written out).
    /// A new error is counted once, however often the source retries meanwhile.
    pub fn note_source(&self, src: &SourceState) -> Option<AgentStatus> {
        let healthy = !src.is_failing() && src.objects.is_some();
        self.metrics.source_up.set(i64::from(healthy));
        let mut changed = false;
        let status = self.update(|s| {
            if s.source_error != src.last_error && src.last_error.is_some() {
                self.metrics.source_errors.inc();
            }
            changed = s.source_healthy != healthy
                || s.source_error != src.last_error
                || s.source_failing_since_unix_ms != src.failing_since_unix_ms
                || s.api_reachable != src.api_reachable
                || s.source_relists != src.relists;
            if !changed {
                return;
            }
            match &src.last_error {
                Some(e) => s.last_error = Some(e.clone()),
                // Recovered: the source's error is no longer the newest news.
                None if s.last_error.is_some() && s.last_error == s.source_error => s.last_error = None,
                None => {}
            }
            s.source_healthy = healthy;
            s.source_error = src.last_error.clone();
            s.source_failing_since_unix_ms = src.failing_since_unix_ms;
            s.api_reachable = src.api_reachable;
            s.source_relists = src.relists;
        });
        changed.then_some(status)
    }
}

impl AgentStatus {
    /// One line on the source's health, for `/readyz` and `status`; `None` while it works.
    pub fn source_problem(&self, now_unix_ms: u64) -> Option<String> {
        let error = self.source_error.as_deref()?;
        let what = if self.api_reachable == Some(false) { "API server unreachable" } else { "source failing" };
        let since = match self.source_failing_since_unix_ms {
            Some(t) => format!(" for {} s", now_unix_ms.saturating_sub(t) / 1000),
            None => String::new(),
        };
        Some(format!("{what}{since}: {error}"))
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
    let mut model = ModelCache::new(actions.model.clone());
    let mut planner = Planner::default();
    let mut applied_relists: Option<u64> = None;
    // Set when the maps may differ from the mirror in more than the next change: diff everything.
    let mut diff_all = true;
    let mut node_missing = false;
    loop {
        let snapshot: SourceState = rx.borrow_and_update().clone();
        // Written now, not at the next sync: during an outage there is no sync to wait for.
        if let Some(status) = state.note_source(&snapshot)
            && let Some(dir) = &actions.state_dir
            && let Err(e) = write_status(dir, &status)
        {
            tracing::warn!(error = %crate::errors::error_chain(&e), "status file not written");
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
            let missing = missing_node(&actions.model, desired);
            if missing.is_some() != node_missing {
                node_missing = missing.is_some();
                match &missing {
                    Some(msg) => tracing::warn!("{msg}"),
                    None => tracing::info!("this node is among the Nodes again"),
                }
            }
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
                    Ok(()) => snapshot.last_error.clone().or(missing),
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

/// Set when `--node-name` names a Node the source does not have (a typo, or a Node outside
/// `--node-selector`): NodePorts, local endpoints and this node's podCIDRs depend on it.
fn missing_node(config: &ModelConfig, desired: &DesiredState) -> Option<String> {
    let name = config.node_name.as_deref()?;
    (!desired.nodes.contains_key(name)).then(|| {
        format!("this node {name:?} (--node-name) is not among the Nodes the source has: is it misspelt, or outside --node-selector?")
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn failing(error: &str, reachable: bool) -> SourceState {
        SourceState {
            objects: Some(Arc::default()),
            last_error: Some(error.into()),
            failing_since_unix_ms: Some(1_000),
            api_reachable: Some(reachable),
            relists: 1,
        }
    }

    #[test]
    fn source_health_transitions_reach_the_status_once_each() {
        let state = AgentState::new("kube".into());
        // Before the first list: nothing known, nothing to write.
        assert_eq!(state.note_source(&SourceState::default()), None);
        let s = state.status();
        assert!(!s.source_healthy && s.source_problem(5_000).is_none());

        let working = SourceState { objects: Some(Arc::default()), api_reachable: Some(true), relists: 1, ..Default::default() };
        let s = state.note_source(&working).expect("healthy is news");
        assert_eq!((s.source_healthy, s.api_reachable, s.last_error.as_deref()), (true, Some(true), None));
        assert_eq!(state.note_source(&working), None, "no change, no write");

        let down = failing("Node watch: no answer from the API server: refused", false);
        let s = state.note_source(&down).expect("failing is news");
        assert_eq!((s.source_healthy, s.api_reachable, s.source_failing_since_unix_ms), (false, Some(false), Some(1_000)));
        assert_eq!(s.last_error, s.source_error);
        assert_eq!(s.source_problem(62_500).unwrap(), "API server unreachable for 61 s: Node watch: no answer from the API server: refused");
        assert_eq!(state.note_source(&down), None);
        assert_eq!(state.metrics.source_errors.get(), 1, "counted once while it lasts");
        assert_eq!(state.metrics.source_up.get(), 0);

        // Answers again, but a watch is still refused: reachable, still failing, a new error.
        let s = state.note_source(&failing("Service watch: the API server answered 403 Forbidden: no", true)).unwrap();
        assert_eq!(s.source_problem(2_000).unwrap(), "source failing for 1 s: Service watch: the API server answered 403 Forbidden: no");
        assert_eq!(state.metrics.source_errors.get(), 2);

        // Recovered: the source's error leaves last_error too.
        let s = state.note_source(&working).unwrap();
        assert_eq!((s.source_healthy, s.source_error.as_deref(), s.last_error.as_deref(), s.source_failing_since_unix_ms), (true, None, None, None));
        assert_eq!(state.metrics.source_up.get(), 1);
    }

    #[test]
    fn recovery_keeps_an_apply_error() {
        let state = AgentState::new("kube".into());
        state.note_source(&failing("Node watch: down", false));
        state.update(|s| s.last_error = Some("programming the service maps".into()));
        let s = state.note_source(&SourceState { objects: Some(Arc::default()), api_reachable: Some(true), ..Default::default() }).unwrap();
        assert_eq!(s.last_error.as_deref(), Some("programming the service maps"));
    }

    #[test]
    fn a_node_outside_the_selector_is_reported() {
        let config = ModelConfig { node_name: Some("node-a".into()), ..Default::default() };
        let mut desired = DesiredState::default();
        let msg = missing_node(&config, &desired).unwrap();
        assert!(msg.contains("\"node-a\" (--node-name) is not among the Nodes") && msg.contains("--node-selector"), "{msg}");
        let node = model::NodeState { internal_ips: vec![], addresses: vec![], pod_cidrs: vec![], zone: None };
        desired.nodes.insert("node-a".into(), node);
        assert_eq!(missing_node(&config, &desired), None);
        assert_eq!(missing_node(&ModelConfig::default(), &DesiredState::default()), None);
    }

    #[test]
    fn an_old_status_file_still_reads() {
        let s: AgentStatus = serde_json::from_str(r#"{"ready": true, "source": "kube", "syncs": 3}"#).unwrap();
        assert!(s.ready && s.api_reachable.is_none() && s.source_problem(0).is_none());
    }
}
