//! The kube source against a mocked API server (tower-test): list and watch responses shaped
//! like a real kube-apiserver's (list items without kind/apiVersion, newline-delimited watch
//! events, BOOKMARK and ERROR/410 Status objects). The mock answers requests in the order the
//! test releases replies, so each step of the list/watch protocol is observed on its own.
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dataplane_agent::source::{self, SourceState, kube as kube_source};
use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::mpsc;

type Key = (&'static str, bool); // (resource plural, is watch)

enum Reply {
    /// A list: the JSON body.
    List(Value),
    /// A watch: its events, then the body ends (as when the server's timeoutSeconds expire).
    Watch(Vec<Value>),
}

struct MockApi {
    replies: mpsc::UnboundedSender<(Key, Reply)>,
    requests: Arc<Mutex<Vec<String>>>,
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
                        let uri = req.uri().to_string();
                        log.lock().unwrap().push(uri.clone());
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

    fn reply(&self, key: Key, reply: Reply) {
        self.replies.send((key, reply)).unwrap();
    }

    async fn wait_for_request(&self, pred: impl Fn(&str) -> bool) -> String {
        for _ in 0..500 {
            if let Some(r) = self.requests.lock().unwrap().iter().find(|r| pred(r)) {
                return r.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("request not seen; got {:#?}", self.requests.lock().unwrap());
    }
}

fn key_of(uri: &str) -> Key {
    let path = uri.split('?').next().unwrap();
    let plural = ["services", "endpointslices", "nodes"].into_iter().find(|p| path.ends_with(p)).unwrap_or_else(|| panic!("unexpected request {uri}"));
    (plural, uri.contains("watch=true"))
}

fn respond(send: tower_test::mock::SendResponse<Response<Body>>, reply: Reply) {
    let body = match reply {
        Reply::List(v) => serde_json::to_vec(&v).unwrap(),
        Reply::Watch(events) => events.iter().flat_map(|e| {
            let mut line = serde_json::to_vec(e).unwrap();
            line.push(b'\n');
            line
        }).collect(),
    };
    send.send_response(Response::builder().status(200).header("content-type", "application/json").body(Body::from(body)).unwrap());
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
    let task = tokio::spawn(kube_source::run(client, tx, Duration::from_millis(5)));

    // Initial lists of Services and EndpointSlices, but not yet Nodes: nothing may be published.
    api.reply(("services", false), list("ServiceList", "v1", 10, vec![service("a", "10.96.0.1", 80, 5), service("b", "10.96.0.2", 80, 6)]));
    api.reply(("endpointslices", false), list("EndpointSliceList", "discovery.k8s.io/v1", 10, vec![json!({
        "metadata": with_labels(meta("a-xyz", Some("default"), 7), json!({"kubernetes.io/service-name": "a"})),
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": "node-b"}]})]));
    api.wait_for_request(|r| r.contains("endpointslices") && !r.contains("watch=true")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.borrow().objects.is_none(), "published before every initial list completed");

    api.reply(("nodes", false), list("NodeList", "v1", 10, vec![json!({"metadata": meta("node-b", None, 8),
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.11"}]}})]));
    let s = state_where(&mut rx, |_| true).await;
    assert_eq!(service_ports(&s), [("a".into(), 80), ("b".into(), 80)]);
    assert_eq!(s.objects.as_ref().unwrap().endpoint_slices.len(), 1);
    assert_eq!(s.objects.as_ref().unwrap().nodes.len(), 1);

    // A watch with an add, an update, a delete and a bookmark; then the server ends the watch.
    let watch = api.wait_for_request(|r| r.starts_with("/api/v1/services?") && r.contains("watch=true")).await;
    assert!(watch.contains("resourceVersion=10") && watch.contains("allowWatchBookmarks=true"), "{watch}");
    api.reply(("services", true), Reply::Watch(vec![
        svc_event("ADDED", service("c", "10.96.0.3", 80, 11)),
        svc_event("MODIFIED", service("a", "10.96.0.1", 81, 12)),
        svc_event("DELETED", service("b", "10.96.0.2", 80, 13)),
        svc_event("BOOKMARK", json!({"metadata": {"resourceVersion": "20"}})),
    ]));
    let s = state_where(&mut rx, |s| service_ports(s).len() == 2 && service_ports(s)[0].1 == 81).await;
    assert_eq!(service_ports(&s), [("a".into(), 81), ("c".into(), 80)]);

    // The re-watch resumes from the bookmark, and is answered with 410 Gone.
    api.wait_for_request(|r| r.contains("services?") && r.contains("watch=true") && r.contains("resourceVersion=20")).await;
    api.reply(("services", true), Reply::Watch(vec![json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
        "metadata": {}, "status": "Failure", "message": "too old resource version: 20 (35)", "reason": "Expired", "code": 410}})]));
    let errored = next_state(&mut rx).await;
    assert!(errored.last_error.as_deref().unwrap_or("").contains("too old resource version"), "{:?}", errored.last_error);
    assert_eq!(service_ports(&errored), [("a".into(), 81), ("c".into(), 80)], "an error must not change the objects");

    // The relist no longer has `c` (deleted while the watch was down): it must vanish.
    api.reply(("services", false), list("ServiceList", "v1", 40, vec![service("a", "10.96.0.1", 81, 12)]));
    let s = state_where(&mut rx, |s| service_ports(s).len() == 1).await;
    assert_eq!(service_ports(&s), [("a".into(), 81)]);
    assert!(s.last_error.is_none());
    let lists = api.requests.lock().unwrap().iter().filter(|r| r.starts_with("/api/v1/services?") && !r.contains("watch=true")).count();
    assert_eq!(lists, 2, "one initial list and one relist after 410");
    task.abort();
}

fn with_labels(mut meta: Value, labels: Value) -> Value {
    meta["labels"] = labels;
    meta
}
