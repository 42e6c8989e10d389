//! kube source: reflectors on Services, EndpointSlices (discovery.k8s.io/v1) and Nodes.
//!
//! Nothing is published until all three have completed their initial list (`InitDone`), so the
//! data plane is never programmed from a partial view. The reflector stores swap in a relist
//! atomically at `InitDone`, so objects a relist no longer has (deleted while a watch was down,
//! or during a 410 Gone) vanish from the next snapshot and `reconcile` prunes them.
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::time::Instant;

use super::{Publisher, SourceState};
use crate::model::ClusterObjects;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Service = 0,
    EndpointSlice = 1,
    Node = 2,
}

/// What one event means for the published state.
enum Step {
    /// The store changed (or finished its initial list).
    Changed { init_done: bool },
    /// Mid-list progress: the store has not changed yet.
    Nothing,
    Error(String),
}

fn step<K>(kind: Kind, ev: Result<watcher::Event<K>, watcher::Error>) -> (Kind, Step) {
    let s = match ev {
        Ok(watcher::Event::InitDone) => Step::Changed { init_done: true },
        Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Step::Changed { init_done: false },
        Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => Step::Nothing,
        Err(e) => Step::Error(format!("{kind:?} watch: {}", crate::errors::error_chain(&e))),
    };
    (kind, s)
}

fn reflect<K>(client: &Client, kind: Kind, trim: fn(&mut K)) -> (Store<K>, impl Stream<Item = (Kind, Step)> + Send + 'static)
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store::<K>();
    // Bookmarks are on by default: a re-watch resumes from the newest resourceVersion instead of
    // relisting. `default_backoff` retries failed lists/watches without hammering the server.
    let stream = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        // The store keeps every object: only what the model reads (see `trim`).
        .modify(trim)
        .reflect(writer)
        .map(move |ev| step(kind, ev));
    (reader, stream)
}

/// Runs until `tx` has no receivers. `debounce` coalesces bursts of events (a rollout touches
/// many slices) into one snapshot; it bounds the added latency, it does not wait for quiet.
pub async fn run(client: Client, tx: Publisher, debounce: Duration) {
    let (services, s1) = reflect::<Service>(&client, Kind::Service, super::trim::service);
    let (slices, s2) = reflect::<EndpointSlice>(&client, Kind::EndpointSlice, super::trim::endpoint_slice);
    let (nodes, s3) = reflect::<Node>(&client, Kind::Node, super::trim::node);
    let mut events = pin!(futures::stream::select(futures::stream::select(s1, s2), s3));

    let mut synced = [false; 3];
    let mut relists = 0;
    let mut deadline: Option<Instant> = None;
    loop {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, events.next()).await {
                Ok(ev) => ev,
                Err(_) => {
                    deadline = None;
                    if synced.iter().all(|s| *s) {
                        let objects = ClusterObjects { services: services.state(), endpoint_slices: slices.state(), nodes: nodes.state() };
                        tx.send_replace(SourceState { objects: Some(Arc::new(objects)), last_error: None, relists });
                    }
                    continue;
                }
            },
            None => events.next().await,
        };
        if tx.is_closed() {
            return;
        }
        let Some((kind, s)) = next else { return };
        match s {
            Step::Changed { init_done } => {
                // Every list (the initial one, and each after a lost watch) is a relist.
                relists += u64::from(init_done);
                if init_done && !synced[kind as usize] {
                    synced[kind as usize] = true;
                    tracing::info!(?kind, "initial list complete");
                }
                deadline.get_or_insert_with(|| Instant::now() + debounce);
            }
            Step::Nothing => {}
            Step::Error(msg) => {
                // The reflector keeps its store and the watcher retries with backoff: the data
                // plane keeps the last good state meanwhile.
                tracing::warn!(error = %msg, "watch failed; retrying");
                tx.send_modify(|st| st.last_error = Some(msg));
            }
        }
    }
}
