//! The kube source against a mocked API server (tower-test): list and watch responses shaped
//! like a real kube-apiserver's (list items without kind/apiVersion, newline-delimited watch
//! events, BOOKMARK and ERROR/410 Status objects). The mock answers requests in the order the
//! test releases replies, so each step of the list/watch protocol is observed on its own. The
//! retry tests run on paused time: the delays are measured on tokio's clock, without waiting.
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dataplane_agent::source::filter::{Filter, parse_selector};
use dataplane_agent::source::{self, SourceState, kube as kube_source};
use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Verb {
    List,
    Watch,
    /// The one-item list the source sends before retrying a failed watch.
    Probe,
}

type Key = (&'static str, Verb); // (resource plural, verb)

enum Reply {
    /// A list: the JSON body.
    List(Value),
    /// A watch: its events, then the body ends (as when the server's timeoutSeconds expire).
    Watch(Vec<Value>),
    /// An HTTP error status with a Status body.
    Status(u16, Value),
    /// No answer: the connection is refused.
    Refused,
}

struct MockApi {
    replies: mpsc::UnboundedSender<(Key, Reply)>,
    /// Every request, with the (tokio) time it arrived.
    requests: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl MockApi {
    /// Starts the mock server task; requests with no reply queued are held open, like a quiet watch.
    fn start() -> (kube::Client, MockApi) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let (tx, mut rx) = mpsc::unbounded_channel::<(Key, Reply)>();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        tokio::spawn(async move {
            let mut queued: HashMap<Key, VecDeque<Reply>> = HashMap::new();
            let mut waiting: HashMap<Key, VecDeque<tower_test::mock::SendResponse<Response<Body>>>> = HashMap::new();
            loop {
                tokio::select! {
                    req = handle.next_request() => {
                        let Some((req, send)) = req else { return };
                        let uri = decode(&req.uri().to_string());
                        log.lock().unwrap().push((Instant::now(), uri.clone()));
                        let key = key_of(&uri);
                        match queued.get_mut(&key).and_then(VecDeque::pop_front) {
                            Some(reply) => respond(send, reply),
                            None => waiting.entry(key).or_default().push_back(send),
                        }
                    }
                    Some((key, reply)) = rx.recv() => {
                        match waiting.get_mut(&key).and_then(VecDeque::pop_front) {
                            Some(send) => respond(send, reply),
                            None => queued.entry(key).or_default().push_back(reply),
                        }
                    }
                }
            }
        });
        (kube::Client::new(service, "default"), MockApi { replies: tx, requests })
    }

    /// Queues a reply; returns the time it was released (a waiting request gets it at once).
    fn reply(&self, key: Key, reply: Reply) -> Instant {
        self.replies.send((key, reply)).unwrap();
        Instant::now()
    }

    async fn wait_for_request(&self, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for_nth(1, pred).await.1
    }

    /// The `n`th request (from 1) matching `pred`, with its arrival time.
    async fn wait_for_nth(&self, n: usize, pred: impl Fn(&str) -> bool) -> (Instant, String) {
        for _ in 0..500 {
            if let Some(r) = self.requests.lock().unwrap().iter().filter(|(_, r)| pred(r)).nth(n - 1) {
                return r.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("request {n} not seen; got {:#?}", self.requests.lock().unwrap());
    }

    fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.requests.lock().unwrap().iter().filter(|(_, r)| pred(r)).count()
    }
}

/// Enough percent-decoding to read label selectors in a request's query.
fn decode(uri: &str) -> String {
    uri.replace("%21", "!").replace("%2F", "/").replace("%3D", "=").replace("%2C", ",")
}

fn key_of(uri: &str) -> Key {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let plural = ["services", "endpointslices", "nodes"].into_iter().find(|p| path.ends_with(p)).unwrap_or_else(|| panic!("unexpected request {uri}"));
    let verb = if query.contains("watch=true") {
        Verb::Watch
    } else if query.split('&').any(|p| p == "limit=1") {
        Verb::Probe
    } else {
        Verb::List
    };
    (plural, verb)
}

fn is(key: Key) -> impl Fn(&str) -> bool {
    move |uri| key_of(uri) == key
}

fn respond(send: tower_test::mock::SendResponse<Response<Body>>, reply: Reply) {
    let (code, body) = match reply {
        Reply::List(v) => (200, serde_json::to_vec(&v).unwrap()),
        Reply::Watch(events) => (200, events.iter().flat_map(|e| {
            let mut line = serde_json::to_vec(e).unwrap();
            line.push(b'\n');
            line
        }).collect()),
        Reply::Status(code, v) => (code, serde_json::to_vec(&v).unwrap()),
        Reply::Refused => {
            send.send_error(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
            return;
        }
    };
    send.send_response(Response::builder().status(code).header("content-type", "application/json").body(Body::from(body)).unwrap());
}

fn meta(name: &str, ns: Option<&str>, rv: u32) -> Value {
    let mut m = json!({"name": name, "uid": format!("uid-{name}"), "resourceVersion": rv.to_string(),
        "creationTimestamp": "2026-11-22T05:00:00Z"});
    if let Some(ns) = ns {
        m["namespace"] = json!(ns);
    }
    m
}

fn service(name: &str, ip: &str, port: u16, rv: u32) -> Value {
    json!({"metadata": meta(name, Some("default"), rv),
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}], "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster"},
        "status": {"loadBalancer": {}}})
}

fn list(kind: &str, api_version: &str, rv: u32, items: Vec<Value>) -> Reply {
    Reply::List(json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}, "items": items}))
}

fn event(type_: &str, kind: &str, api_version: &str, mut obj: Value) -> Value {
    obj["kind"] = json!(kind);
    obj["apiVersion"] = json!(api_version);
    json!({"type": type_, "object": obj})
}

fn svc_event(type_: &str, obj: Value) -> Value {
    event(type_, "Service", "v1", obj)
}

async fn next_state(rx: &mut source::Subscriber) -> SourceState {
    tokio::time::timeout(Duration::from_secs(10), rx.changed()).await.expect("no update within 10s").unwrap();
    rx.borrow_and_update().clone()
}

/// Waits for a published state with objects that satisfies `pred` (errors may be published between).
async fn state_where(rx: &mut source::Subscriber, pred: impl Fn(&SourceState) -> bool) -> SourceState {
    loop {
        let s = next_state(rx).await;
        if s.objects.is_some() && pred(&s) {
            return s;
        }
    }
}

fn service_ports(s: &SourceState) -> Vec<(String, i32)> {
    let mut v: Vec<(String, i32)> = s.objects.as_ref().unwrap().services.iter()
        .map(|s| (s.metadata.name.clone().unwrap(), s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn list_watch_bookmark_410_relist_prunes() {
    let (client, api) = MockApi::start();
    let (tx, mut rx) = source::channel();
    let filter = Filter { nodes: parse_selector("pool=blue").unwrap(), ..Default::default() };
    let task = tokio::spawn(kube_source::run(client, tx, kube_source::Options { debounce: Duration::from_millis(5), filter, ..Default::default() }));

    // Initial lists of Services and EndpointSlices, but not yet Nodes: nothing may be published.
    api.reply(("services", Verb::List), list("ServiceList", "v1", 10, vec![service("a", "10.96.0.1", 80, 5), service("b", "10.96.0.2", 80, 6)]));
    api.reply(("endpointslices", Verb::List), list("EndpointSliceList", "discovery.k8s.io/v1", 10, vec![json!({
        "metadata": with_labels(meta("a-xyz", Some("default"), 7), json!({"kubernetes.io/service-name": "a"})),
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": "node-b"}]})]));
    api.wait_for_request(|r| r.contains("endpointslices") && !r.contains("watch=true")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.borrow().objects.is_none(), "published before every initial list completed");

    api.reply(("nodes", Verb::List), list("NodeList", "v1", 10, vec![json!({"metadata": meta("node-b", None, 8),
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.11"}]}})]));
    let s = state_where(&mut rx, |_| true).await;
    assert_eq!(service_ports(&s), [("a".into(), 80), ("b".into(), 80)]);
    assert_eq!(s.objects.as_ref().unwrap().endpoint_slices.len(), 1);
    assert_eq!(s.objects.as_ref().unwrap().nodes.len(), 1);

    // A watch with an add, an update, a delete and a bookmark; then the server ends the watch.
    let watch = api.wait_for_request(|r| r.starts_with("/api/v1/services?") && r.contains("watch=true")).await;
    assert!(watch.contains("resourceVersion=10") && watch.contains("allowWatchBookmarks=true"), "{watch}");
    api.reply(("services", Verb::Watch), Reply::Watch(vec![
        svc_event("ADDED", service("c", "10.96.0.3", 80, 11)),
        svc_event("MODIFIED", service("a", "10.96.0.1", 81, 12)),
        svc_event("DELETED", service("b", "10.96.0.2", 80, 13)),
        svc_event("BOOKMARK", json!({"metadata": {"resourceVersion": "20"}})),
    ]));
    let s = state_where(&mut rx, |s| service_ports(s).len() == 2 && service_ports(s)[0].1 == 81).await;
    assert_eq!(service_ports(&s), [("a".into(), 81), ("c".into(), 80)]);

    // The re-watch resumes from the bookmark, and is answered with 410 Gone.
    api.wait_for_request(|r| r.contains("services?") && r.contains("watch=true") && r.contains("resourceVersion=20")).await;
    api.reply(("services", Verb::Watch), Reply::Watch(vec![json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
        "metadata": {}, "status": "Failure", "message": "too old resource version: 20 (35)", "reason": "Expired", "code": 410}})]));
    // A 410 is routine, not a failure: the source relists, and says nothing is wrong.
    api.wait_for_nth(2, is(("services", Verb::List))).await;
    assert_eq!(rx.borrow().last_error, None);
    assert_eq!(service_ports(&rx.borrow()), [("a".into(), 81), ("c".into(), 80)], "the objects stay until the relist is done");

    // The relist no longer has `c` (deleted while the watch was down): it must vanish.
    api.reply(("services", Verb::List), list("ServiceList", "v1", 40, vec![service("a", "10.96.0.1", 81, 12)]));
    let s = state_where(&mut rx, |s| service_ports(s).len() == 1).await;
    assert_eq!(service_ports(&s), [("a".into(), 81)]);
    assert!(s.last_error.is_none());
    assert_eq!(api.count(is(("services", Verb::List))), 2, "one initial list and one relist after 410");
    // kube-proxy's selector on Services and EndpointSlices (headless ones included); --node-selector on Nodes.
    for (plural, selector) in [("services", "labelSelector=!service.kubernetes.io/service-proxy-name&"), ("endpointslices", "labelSelector=!service.kubernetes.io/service-proxy-name&"), ("nodes", "labelSelector=pool=blue&")] {
        let first = api.wait_for_request(is((plural, Verb::List))).await;
        assert!(first.contains(selector), "{first}");
    }
    task.abort();
}

fn with_labels(mut meta: Value, labels: Value) -> Value {
    meta["labels"] = labels;
    meta
}

/// Answers the three initial lists (one Service `a`) and waits for the first snapshot.
async fn initial_lists(api: &MockApi, rx: &mut source::Subscriber) {
    api.reply(("services", Verb::List), list("ServiceList", "v1", 10, vec![service("a", "10.96.0.1", 80, 5)]));
    api.reply(("endpointslices", Verb::List), list("EndpointSliceList", "discovery.k8s.io/v1", 10, vec![]));
    api.reply(("nodes", Verb::List), list("NodeList", "v1", 10, vec![]));
    state_where(rx, |_| true).await;
}

fn start(client: kube::Client) -> (source::Subscriber, tokio::task::JoinHandle<()>) {
    let (tx, rx) = source::channel();
    let opts = kube_source::Options { debounce: Duration::from_millis(5), ..Default::default() };
    (rx, tokio::spawn(kube_source::run(client, tx, opts)))
}

fn gone() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "too old resource version: 10 (35)", "reason": "Expired", "code": 410})
}

fn too_many() -> Reply {
    Reply::Status(429, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "storage is (re)initializing", "reason": "TooManyRequests", "code": 429}))
}

/// Milliseconds from `from` to `to` on tokio's (paused) clock.
fn ms(from: Instant, to: Instant) -> f64 {
    to.duration_since(from).as_secs_f64() * 1000.0
}

#[tokio::test(start_paused = true)]
async fn gone_relists_at_once_in_either_form() {
    let (client, api) = MockApi::start();
    let (mut rx, task) = start(client);
    initial_lists(&api, &mut rx).await;

    // In the watch stream (what a kube-apiserver sends).
    api.wait_for_request(is(("services", Verb::Watch))).await;
    let sent = api.reply(("services", Verb::Watch), Reply::Watch(vec![json!({"type": "ERROR", "object": gone()})]));
    let (at, _) = api.wait_for_nth(2, is(("services", Verb::List))).await;
    assert_eq!(ms(sent, at), 0.0, "the relist waits for nothing");
    api.reply(("services", Verb::List), list("ServiceList", "v1", 40, vec![service("a", "10.96.0.1", 80, 5)]));

    // As the HTTP status of the watch request (kube's watcher alone would retry that watch from
    // the same expired resourceVersion forever).
    api.wait_for_nth(2, is(("services", Verb::Watch))).await;
    let sent = api.reply(("services", Verb::Watch), Reply::Status(410, gone()));
    let (at, _) = api.wait_for_nth(3, is(("services", Verb::List))).await;
    assert_eq!(ms(sent, at), 0.0);
    assert_eq!(api.count(is(("services", Verb::Probe))), 0, "no retry delay, no probe");
    api.reply(("services", Verb::List), list("ServiceList", "v1", 50, vec![]));
    let s = state_where(&mut rx, |s| service_ports(s).is_empty()).await;
    assert_eq!((s.last_error, s.failing_since_unix_ms, s.relists), (None, None, 5), "3 initial lists and 2 relists");
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn no_answer_backs_off_probes_and_recovers_with_small_delays_again() {
    let (client, api) = MockApi::start();
    let (mut rx, task) = start(client);
    initial_lists(&api, &mut rx).await;
    let watch = is(("services", Verb::Watch));
    let probe = is(("services", Verb::Probe));

    // The server goes away: the watch fails, the source reports it, keeps the objects and
    // probes after 50-100 ms, then 100-200, then 200-400 (jittered doublings from 100 ms).
    api.wait_for_request(&watch).await;
    let mut sent = api.reply(("services", Verb::Watch), Reply::Refused);
    let s = state_where(&mut rx, |s| s.last_error.is_some()).await;
    assert!(s.last_error.as_deref().unwrap().starts_with("Service watch: no answer from the API server: "), "{:?}", s.last_error);
    assert_eq!(s.api_reachable, Some(false));
    assert!(s.failing_since_unix_ms.is_some());
    assert_eq!(service_ports(&s), [("a".into(), 80)], "an outage changes no object");
    for (n, step) in [(1, 100.0), (2, 200.0), (3, 400.0)] {
        let (at, uri) = api.wait_for_nth(n, &probe).await;
        let waited = ms(sent, at);
        assert!(waited >= step / 2.0 && waited <= step, "probe {n} after {waited} ms (step {step} ms)");
        assert!(uri.contains("labelSelector=!service.kubernetes.io/service-proxy-name"), "the probe uses the watch's selector: {uri}");
        assert_eq!(api.count(&watch), 1, "while the server is down only the probes reach it");
        sent = api.reply(("services", Verb::Probe), if n < 3 { Reply::Refused } else { too_many() });
    }
    // The first answer after none (a server still starting): retried soon again, 50-100 ms.
    let s = state_where(&mut rx, |s| s.api_reachable == Some(true)).await;
    assert_eq!(s.last_error.as_deref(), Some("Service watch: the API server answered 429 TooManyRequests: storage is (re)initializing"));
    let (at, _) = api.wait_for_nth(4, &probe).await;
    assert!((50.0..=100.0).contains(&ms(sent, at)), "{} ms", ms(sent, at));
    sent = api.reply(("services", Verb::Probe), list("PartialObjectMetadataList", "meta.k8s.io/v1", 10, vec![]));

    // The probe is answered: the watch is retried at once and, once it has stayed up for
    // SETTLE, counts as working (a resumed watch is silent until something changes).
    let (at, uri) = api.wait_for_nth(2, &watch).await;
    assert!(rx.borrow().last_error.is_some(), "the retried watch is not confirmed yet");
    assert_eq!(ms(sent, at), 0.0);
    assert!(uri.contains("resourceVersion=10"), "resumes where it was: {uri}");
    let s = state_where(&mut rx, |s| s.last_error.is_none()).await;
    assert_eq!((s.api_reachable, s.failing_since_unix_ms), (Some(true), None));
    assert!(ms(sent, Instant::now()) >= kube_source::SETTLE.as_secs_f64() * 1000.0);

    // A success resets the delays: the next failure is retried after 50-100 ms again.
    sent = api.reply(("services", Verb::Watch), Reply::Status(500, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "etcd hiccup", "reason": "InternalError", "code": 500})));
    let s = state_where(&mut rx, |s| s.last_error.is_some()).await;
    assert_eq!(s.last_error.as_deref(), Some("Service watch: the API server answered 500 InternalError: etcd hiccup"));
    assert_eq!(s.api_reachable, Some(true), "an error answer is an answer");
    let (at, _) = api.wait_for_nth(5, &probe).await;
    assert!((50.0..=100.0).contains(&ms(sent, at)), "{} ms", ms(sent, at));

    // An event also proves the watch works: healthy with no settle wait.
    sent = api.reply(("services", Verb::Probe), list("PartialObjectMetadataList", "meta.k8s.io/v1", 10, vec![]));
    api.wait_for_nth(3, &watch).await;
    api.reply(("services", Verb::Watch), Reply::Watch(vec![svc_event("ADDED", service("c", "10.96.0.3", 80, 11))]));
    let s = state_where(&mut rx, |s| s.last_error.is_none() && service_ports(s).len() == 2).await;
    assert_eq!(service_ports(&s), [("a".into(), 80), ("c".into(), 80)]);
    assert!(ms(sent, Instant::now()) < kube_source::SETTLE.as_secs_f64() * 1000.0);
    task.abort();
}
