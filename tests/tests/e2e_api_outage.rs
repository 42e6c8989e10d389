//! The agents against a real API server that goes away: each test runs its own control plane,
//! since it kills or cuts it.
//!
//! - Outage: the API server is SIGKILLed for 60 s while new connections flow steadily through a
//!   ClusterIP (socket LB) and a NodePort (XDP, to a backend on another node). Not one fails;
//!   `/readyz`, `status` and `/metrics` say the API server is unreachable meanwhile; a Service
//!   created once the server is back is programmed within 1 s of it being ready.
//! - Compaction: etcd's history is compacted past what the agents have seen and their watch
//!   connections are cut, so their watches resume from a compacted resourceVersion and get 410
//!   Gone; they relist at once and converge, with no connection lost.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use dataplane_tests::{
    cluster::{Cluster, ECHO_PORT, Node, Service, Source, SteadyReport, wait_for},
    k8s::{ControlPlane, Options},
    require_kernel,
};
use serde_json::json;

/// A new connection every 20 ms on each load: 50/s, a few thousand over an outage.
const INTERVAL: Duration = Duration::from_millis(20);

fn no_failures(what: &str, r: &SteadyReport) {
    eprintln!("{what}: {} connections, {} failed", r.ok, r.failed);
    assert!(r.ok > 0, "{what}: no connection succeeded");
    assert_eq!(r.failed, 0, "{what}: failed connections, first ones: {}", r.errors);
}

fn source_up(node: &Node) -> Option<f64> {
    let text = node.metrics().ok()?;
    text.lines().find_map(|l| l.strip_prefix("dataplane_agent_source_up ")).and_then(|v| v.trim().parse().ok())
}

#[test]
fn api_server_down_for_60_s_loses_no_connection_and_recovers_within_1_s() {
    if !require_kernel() {
        return;
    }
    let mut cp = ControlPlane::start(Options { controller_manager: false, watch_cache: true }).unwrap();
    let mut c = Cluster::start_with(2, Source::Api(&cp.access), |_| {}).unwrap();
    let web = c.add_pod(1, "web").unwrap();
    let client = c.add_pod(0, "client").unwrap();
    let ep = c.endpoint(web);
    let svc = c.apply(Service::new("web", 80, ECHO_PORT).node_port().endpoints([ep.clone()])).unwrap();
    let outage = Duration::from_secs(60);
    let load_for = outage + Duration::from_secs(15);
    let cluster_ip = c.pod(client).steady(SocketAddr::from((svc.vip(), 80)), load_for, INTERVAL).unwrap();
    let node_port = c.client.steady(SocketAddr::from((c.nodes[0].ip, svc.node_port.unwrap())), load_for, INTERVAL).unwrap();
    std::thread::sleep(Duration::from_secs(2));

    let killed = Instant::now();
    cp.kill_apiserver();
    // The agents notice when their watches break and their retries fail.
    for node in &c.nodes {
        wait_for(&format!("{} to report the API server unreachable", node.name), Duration::from_secs(15), || {
            let (code, body) = node.http("/readyz").ok()?;
            (code == 503 && body.contains("unreachable")).then_some(())
        })
        .unwrap();
        let st = node.status_report().unwrap();
        assert_eq!(st["status"]["api_reachable"], false, "status while the API server is down: {st:#}");
        assert!(st["status"]["last_error"].is_string(), "status names the error: {st:#}");
        assert_eq!(source_up(node), Some(0.0), "dataplane_agent_source_up on {}", node.name);
    }
    eprintln!("agents reported the outage {:?} after the kill", killed.elapsed());
    std::thread::sleep(outage.saturating_sub(killed.elapsed()));

    cp.start_apiserver().unwrap();
    let ready = cp.wait_ready(Duration::from_secs(30)).unwrap();
    // A Service created right after: every agent must have it in its maps within 1 s of ready.
    let late = c.apply(Service::new("late", 80, ECHO_PORT).endpoints([ep])).unwrap();
    let took = ready.elapsed();
    eprintln!("a Service created after the API server returned was programmed on every node {took:?} after it was ready");
    assert!(took <= Duration::from_secs(1), "new Service programmed {took:?} after the API server was ready");
    assert!(c.pod(client).tcp(SocketAddr::from((late.vip(), 80)), 3).unwrap().iter().all(|r| r.is_ok()));
    for node in &c.nodes {
        wait_for(&format!("{} ready again", node.name), Duration::from_secs(5), || (node.http("/readyz").ok()?.0 == 200).then_some(())).unwrap();
        assert_eq!(source_up(node), Some(1.0));
        assert_eq!(node.status_report().unwrap()["status"]["api_reachable"], true);
    }
    no_failures("Pod -> ClusterIP during the outage", &cluster_ip.finish().unwrap());
    no_failures("client -> NodePort (remote backend) during the outage", &node_port.finish().unwrap());
}

#[test]
fn etcd_compaction_410_gone_relists_at_once_and_loses_nothing() {
    if !require_kernel() {
        return;
    }
    // Without the watch cache, watches are served by etcd, whose compaction decides what a
    // resumed watch may still see.
    let cp = ControlPlane::start(Options { controller_manager: false, watch_cache: false }).unwrap();
    let mut c = Cluster::start_with(1, Source::Api(&cp.access), |_| {}).unwrap();
    let a = c.add_pod(0, "web-a").unwrap();
    let b = c.add_pod(0, "web-b").unwrap();
    let client = c.add_pod(0, "client").unwrap();
    let (ep_a, ep_b) = (c.endpoint(a), c.endpoint(b));
    let svc = c.apply(Service::new("web", 80, ECHO_PORT).endpoints([ep_a.clone()])).unwrap();
    let load = c.pod(client).steady(SocketAddr::from((svc.vip(), 80)), Duration::from_secs(12), INTERVAL).unwrap();
    let relists_before = c.nodes[0].status_report().unwrap()["status"]["source_relists"].as_u64();

    // Move etcd on with objects the agents do not watch, then compact everything before now:
    // the revision each agent watch would resume from is gone.
    let api = &c.objects().api_objects().unwrap().api;
    for i in 0..20 {
        api.apply(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("churn-{i}"), "namespace": c.namespace()}, "data": {"i": i.to_string()}}))
            .unwrap();
    }
    let rev = cp.compact_etcd().unwrap();
    eprintln!("etcd compacted at revision {rev}");
    // A change the agents can only learn through a relist, then a network blip.
    let svc_b = Service::new("web", 80, ECHO_PORT).endpoints([ep_a, ep_b]);
    let cut = Instant::now();
    c.objects().api_objects().unwrap().cut_connections();
    c.apply(svc_b).unwrap();
    let took = cut.elapsed();
    eprintln!("410 Gone -> relisted and programmed the change in {took:?}");
    let log = std::fs::read_to_string(c.nodes[0].agent_log()).unwrap();
    assert!(log.contains("410 Gone"), "the agent saw no 410:\n{}", c.nodes[0].log_tail());
    let relists_after = c.nodes[0].status_report().unwrap()["status"]["source_relists"].as_u64();
    assert!(relists_after > relists_before, "relists {relists_before:?} -> {relists_after:?}");
    // "At once": no backoff wait; a list and a sync on a small cluster take milliseconds.
    assert!(took <= Duration::from_secs(3), "converged {took:?} after the cut");
    no_failures("Pod -> ClusterIP across the compaction", &load.finish().unwrap());
}
