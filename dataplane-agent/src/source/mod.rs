//! Where the cluster objects come from: the API server (`kube`) or YAML files on disk
//! (`manifests`). Both publish complete snapshots on a `watch` channel; `None` until the first
//! full list (or read) is done, so nothing is programmed from a partial view.
use std::sync::Arc;

use tokio::sync::watch;

use crate::model::ClusterObjects;

pub mod documents;
pub mod filter;
pub mod health;
pub mod kube;
pub mod manifests;
pub mod retry;
pub mod trim;

/// What a source publishes.
#[derive(Debug, Clone, Default)]
pub struct SourceState {
    /// The last complete, valid set of objects; `None` before the first one.
    pub objects: Option<Arc<ClusterObjects>>,
    /// Set while the source fails (its newest attempt failed); `objects` still holds the last
    /// good set.
    pub last_error: Option<String>,
    /// Since when the source has been failing (Unix ms); `None` while it works.
    pub failing_since_unix_ms: Option<u64>,
    /// Whether the API server answered the newest request; `None` for the manifests source and
    /// before the first answer or failure.
    pub api_reachable: Option<bool>,
    /// How many complete lists the objects come from (the kube source counts its initial list
    /// and every relist after a watch was lost). A new count tells the sync loop that objects may
    /// have changed unseen: it reads the maps again and diffs everything.
    pub relists: u64,
}

impl SourceState {
    pub fn is_failing(&self) -> bool {
        self.last_error.is_some()
    }
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub type Publisher = watch::Sender<SourceState>;
pub type Subscriber = watch::Receiver<SourceState>;

pub fn channel() -> (Publisher, Subscriber) {
    watch::channel(SourceState::default())
}
