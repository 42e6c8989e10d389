//! End to end with the real EndpointSlice controller (kube-controller-manager) making the slices
//! from Pods: a selector Service with a named targetPort; Pods made Ready get traffic; a Pod made
//! NotReady leaves the data path within 1 s; a Pod deleted with a grace period and left
//! terminating is handled as kube-proxy handles it: no new connections while a ready endpoint
//! exists, and a fallback to serving-terminating endpoints when none is left
//! (KEP-1669, ProxyTerminatingEndpoints).
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use dataplane_tests::{
    cluster::{Cluster, Reply, objects::PROXY_NAME_LABEL, tally, wait_for},
    require_kernel,
};
use serde_json::json;

/// Waits until every node's maps give `frontend` exactly `want` as backends; returns how long.
fn wait_backends(c: &Cluster, frontend: SocketAddr, want: &[String], timeout: Duration) -> Duration {
    let started = Instant::now();
    let want: BTreeSet<&str> = want.iter().map(String::as_str).collect();
    let mut last = Vec::new();
    let ok = wait_for(&format!("{frontend} -> {want:?} on every node"), timeout, || {
        last = c.nodes.iter().map(|n| n.backends(frontend).unwrap()).collect();
        last.iter().all(|b| b.as_ref().is_some_and(|b| b.iter().map(String::as_str).collect::<BTreeSet<_>>() == want)).then_some(())
    });
    assert!(ok.is_ok(), "{frontend}: the nodes have {last:?}, want {want:?} (after {timeout:?})");
    started.elapsed()
}

fn answered_by(replies: &[Reply]) -> BTreeSet<String> {
    replies
        .iter()
        .map(|r| match r {
            Reply::Ok { pod, .. } => pod.clone(),
            Reply::Err { kind, detail } => panic!("{kind}: {detail} (all: {:?})", tally(replies)),
        })
        .collect()
}

#[test]
fn endpointslice_controller_ready_not_ready_and_terminating_pods() {
    if !require_kernel() {
        return;
    }
    let mut c = Cluster::start(2).unwrap();
    let a = c.add_pod_labeled(0, "web-a", &[("app", "web")]).unwrap();
    let b = c.add_pod_labeled(1, "web-b", &[("app", "web")]).unwrap();
    let client = c.add_pod(0, "client").unwrap();
    let ns = c.namespace().to_owned();
    let api = &c.objects().api_objects().expect("on the API server").api;
    let svc = api
        .apply(&json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": ns, "labels": {PROXY_NAME_LABEL: ns}},
            // targetPort by name: the controller resolves it per Pod from the container port.
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "echo", "protocol": "TCP"}]},
        }))
        .unwrap();
    let vip: std::net::IpAddr = svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    let frontend = SocketAddr::new(vip, 80);
    let ep = |id| c.pod(id).addr(dataplane_tests::cluster::ECHO_PORT).to_string();
    let (ep_a, ep_b) = (ep(a), ep(b));

    // The controller writes the slice from the Ready Pods; the agents program it.
    wait_backends(&c, frontend, &[ep_a.clone(), ep_b.clone()], Duration::from_secs(15));
    let both = answered_by(&c.pod(client).tcp(frontend, 30).unwrap());
    assert_eq!(both, BTreeSet::from(["web-a".to_string(), "web-b".to_string()]), "30 connections over 2 Ready Pods");

    // NotReady: out of the data path within 1 s of the kubelet's report (the controller's and
    // the agents' latency together; both react to watch events, typically in 50-200 ms).
    let took = {
        c.set_pod_ready(b, false).unwrap();
        wait_backends(&c, frontend, std::slice::from_ref(&ep_a), Duration::from_secs(10))
    };
    eprintln!("NotReady -> out of every node's maps in {took:?}");
    assert!(took <= Duration::from_secs(1), "a NotReady Pod left the data path after {took:?}");
    assert_eq!(answered_by(&c.pod(client).tcp(frontend, 20).unwrap()), BTreeSet::from(["web-a".to_string()]));
    c.set_pod_ready(b, true).unwrap();
    wait_backends(&c, frontend, &[ep_a.clone(), ep_b.clone()], Duration::from_secs(10));

    // web-b deleted with a grace period and left terminating (no kubelet finishes it): it is
    // serving but not ready, and a ready endpoint exists, so it gets no new connections.
    c.terminate_pod(b, 300).unwrap();
    wait_backends(&c, frontend, std::slice::from_ref(&ep_a), Duration::from_secs(10));
    assert_eq!(answered_by(&c.pod(client).tcp(frontend, 20).unwrap()), BTreeSet::from(["web-a".to_string()]));

    // Both terminating: no ready endpoint is left, so traffic falls back to the serving
    // terminating ones instead of being refused.
    c.terminate_pod(a, 300).unwrap();
    wait_for("web-a terminating in node-1's maps", Duration::from_secs(10), || {
        let out = c.nodes[0].agent_cli(&["services", "--pin-dir", &c.nodes[0].pins.path().display().to_string()]).unwrap();
        out.lines().any(|l| l.contains(&vip.to_string()) && l.contains(&ep_a) && l.contains(&ep_b) && l.contains("terminating")).then_some(())
    })
    .unwrap();
    let fallback = answered_by(&c.pod(client).tcp(frontend, 30).unwrap());
    assert_eq!(fallback, BTreeSet::from(["web-a".to_string(), "web-b".to_string()]), "serving-terminating fallback");
}
