//! kube source: reflectors on Services, EndpointSlices (discovery.k8s.io/v1) and Nodes.
//!
//! Nothing is published until all three have completed their initial list (`InitDone`), so the
//! data plane is never programmed from a partial view. The reflector stores swap in a relist
//! atomically at `InitDone`, so objects a relist no longer has (deleted while a watch was down,
//! or during a 410 Gone) vanish from the next snapshot and `reconcile` prunes them.
//!
//! Retries (see `retry`): a 410 Gone relists at once. Any other failure waits a capped, jittered
//! exponential delay, then probes with a one-item list before the watcher tries again, so a
//! server that is down sees one request per watch per retry. A probe that gets an answer marks
//! the server reachable; the watch counts as working again at its next event, or once it has
//! stayed up for `SETTLE` (a resumed watch is silent until something changes). Errors never
//! change the objects: the data plane keeps the last good state.
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::core::Selector;
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::time::Instant;

use super::filter::Filter;
use super::health::Health;
use super::retry::{self, Backoff, Outcome, RetryConfig};
use super::{Publisher, now_unix_ms};
use crate::model::ClusterObjects;

/// How long a probe may take before the server counts as unreachable: far longer than a
/// one-item list takes, shorter than the client's connect timeout, so a server whose packets
/// are dropped is still retried at the usual pace.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// A retried watch that stays up this long after a good probe counts as working: a watch the
/// server refuses fails within a round trip, an accepted one is silent until the next change.
pub const SETTLE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Coalesces bursts of events (a rollout touches many slices) into one snapshot; it bounds
    /// the added latency, it does not wait for quiet.
    pub debounce: Duration,
    pub retry: RetryConfig,
    pub filter: Filter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Service = 0,
    EndpointSlice = 1,
    Node = 2,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }
}

/// What one turn of a watch means for the published state.
enum Step {
    /// The store changed (or finished a list).
    Changed { init_done: bool },
    /// The watch works; the store has not changed yet (a list page, a watch that stayed up).
    Working,
    /// The server answered (a probe, a 410), which does not show the watch works yet.
    Answered,
    /// Nothing to report (a list starts).
    Nothing,
    Failed { error: String, reachable: bool },
}

/// One resource's watcher, store writer and retry state. The watcher is re-created (which
/// starts with a fresh list) when the server says its resourceVersion is gone: kube's watcher
/// relists by itself only for a 410 inside a watch stream, not for one answering the watch request.
struct Watch<K: kube::Resource<DynamicType = ()> + Clone + 'static> {
    kind: Kind,
    api: Api<K>,
    config: watcher::Config,
    trim: fn(&mut K),
    writer: Writer<K>,
    events: BoxStream<'static, watcher::Result<watcher::Event<K>>>,
    backoff: Backoff,
    /// Set after a failure: wait this long, then probe.
    retry_in: Option<Duration>,
    /// Set after a good probe: the watch counts as working if it has not failed by then.
    settle_at: Option<Instant>,
    /// A 410 came and nothing succeeded since: a second one backs off instead of relisting at once.
    gone_since_success: bool,
    /// The last failure got no answer.
    unreachable: bool,
}

impl<K> Watch<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    fn restart(&mut self) {
        self.events = watcher(self.api.clone(), self.config.clone()).boxed();
    }

    async fn next(&mut self) -> Step {
        if let Some(delay) = self.retry_in.take() {
            tokio::time::sleep(delay).await;
            return self.probe().await;
        }
        let next = match self.settle_at {
            Some(at) => match tokio::time::timeout_at(at, self.events.next()).await {
                Ok(next) => next,
                Err(_) => {
                    self.succeeded();
                    return Step::Working;
                }
            },
            None => self.events.next().await,
        };
        match next {
            // kube's watcher does not end; if it ever did, start over.
            None => {
                self.restart();
                Step::Nothing
            }
            Some(Ok(ev)) => {
                // The store keeps every object: only what the model reads (see `trim`).
                let ev = ev.modify(self.trim);
                self.writer.apply_watcher_event(&ev);
                match ev {
                    watcher::Event::Init => Step::Nothing,
                    watcher::Event::InitApply(_) => {
                        self.succeeded();
                        Step::Working
                    }
                    watcher::Event::InitDone => {
                        self.succeeded();
                        Step::Changed { init_done: true }
                    }
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => {
                        self.succeeded();
                        Step::Changed { init_done: false }
                    }
                }
            }
            Some(Err(e)) => self.failed(retry::classify(&e), retry::describe(&e)),
        }
    }

    fn succeeded(&mut self) {
        self.backoff.reset();
        self.settle_at = None;
        self.gone_since_success = false;
    }

    fn failed(&mut self, outcome: Outcome, error: String) -> Step {
        self.settle_at = None;
        if outcome == Outcome::Gone {
            self.restart();
            if !self.gone_since_success {
                self.gone_since_success = true;
                tracing::info!(kind = self.kind.name(), "resourceVersion expired (410 Gone); relisting");
                return Step::Answered;
            }
        }
        // The first answer after none: the server is back and likely still starting (403 until
        // its RBAC caches fill, 429 until its watch caches do); retry soon rather than at the cap.
        if outcome == Outcome::Answered && self.unreachable {
            self.backoff.reset();
        }
        self.unreachable = outcome == Outcome::Unreachable;
        self.retry_in = Some(self.backoff.next_delay());
        Step::Failed { error, reachable: !self.unreachable }
    }

    /// A one-item list with the watch's selector (the same permissions and path as its list).
    async fn probe(&mut self) -> Step {
        let mut lp = ListParams::default().limit(1);
        lp.label_selector = self.config.label_selector.clone();
        match tokio::time::timeout(PROBE_TIMEOUT, self.api.list_metadata(&lp)).await {
            Ok(Ok(_)) => {
                // Back after an outage (see `failed`). A server that answers but keeps refusing
                // the watch still backs off: only the first answer resets.
                if self.unreachable {
                    self.backoff.reset();
                    self.unreachable = false;
                }
                self.settle_at = Some(Instant::now() + SETTLE);
                Step::Answered
            }
            Ok(Err(e)) => self.failed(retry::classify_client(&e), retry::describe_client(&e)),
            Err(_) => self.failed(Outcome::Unreachable, format!("no answer from the API server within {PROBE_TIMEOUT:?}")),
        }
    }
}

fn watch<K>(client: &Client, kind: Kind, trim: fn(&mut K), selector: &Selector, retry: RetryConfig) -> (Store<K>, impl Stream<Item = (Kind, Step)> + Send + 'static)
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store::<K>();
    // Bookmarks are on by default: a re-watch resumes from the newest resourceVersion instead of relisting.
    let mut config = watcher::Config::default();
    if !selector.selects_all() {
        config = config.labels_from(selector);
    }
    let api = Api::<K>::all(client.clone());
    let w = Watch {
        kind,
        events: watcher(api.clone(), config.clone()).boxed(),
        api,
        config,
        trim,
        writer,
        backoff: Backoff::new(retry),
        retry_in: None,
        settle_at: None,
        gone_since_success: false,
        unreachable: false,
    };
    let stream = futures::stream::unfold(w, |mut w| async move {
        let step = w.next().await;
        Some(((w.kind, step), w))
    });
    (reader, stream)
}

/// Runs until `tx` has no receivers.
pub async fn run(client: Client, tx: Publisher, opts: Options) {
    let services_selector = opts.filter.services();
    let (services, s1) = watch::<Service>(&client, Kind::Service, super::trim::service, &services_selector, opts.retry);
    let (slices, s2) = watch::<EndpointSlice>(&client, Kind::EndpointSlice, super::trim::endpoint_slice, &services_selector, opts.retry);
    let (nodes, s3) = watch::<Node>(&client, Kind::Node, super::trim::node, &opts.filter.nodes, opts.retry);
    let mut events = pin!(futures::stream::select(futures::stream::select(s1, s2), s3));

    let mut health = Health::default();
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
                        tx.send_modify(|st| {
                            st.objects = Some(Arc::new(objects));
                            st.relists = relists;
                        });
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
                working(&mut health, kind);
                // Every list (the initial one, and each after a lost watch) is a relist.
                relists += u64::from(init_done);
                if init_done && !synced[kind as usize] {
                    synced[kind as usize] = true;
                    tracing::info!(kind = kind.name(), "initial list complete");
                }
                deadline.get_or_insert_with(|| Instant::now() + opts.debounce);
            }
            Step::Working => working(&mut health, kind),
            Step::Answered => health.answered(),
            Step::Nothing => {}
            Step::Failed { error, reachable } => {
                if health.failed(kind.name(), error.clone(), reachable, now_unix_ms()) {
                    tracing::warn!(kind = kind.name(), %error, reachable, "watch failed; retrying, the data plane keeps the last good state");
                } else {
                    tracing::debug!(kind = kind.name(), %error, "watch still failing");
                }
            }
        }
        tx.send_if_modified(|st| health.publish(st));
    }
}

fn working(health: &mut Health, kind: Kind) {
    if health.working(kind.name()) {
        tracing::info!(kind = kind.name(), "watch works again");
    }
}
