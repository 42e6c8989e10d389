//! 200 ADDs at once from separate plugin processes on one node, then 200 DELs at once: every Pod
//! gets its own address, the store's lock and O_EXCL files hold, and nothing leaks.
mod common;

use std::{collections::HashSet, time::Instant};

use common::Node;
use dataplane_tests::{netns::NetNs, require_kernel};
use serde_json::json;

const PODS: usize = 200;

fn run_all(node: &Node, command: &str, pods: &[NetNs], conf: &str) -> Vec<common::Outcome> {
    let children: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            let id = format!("par-{i}");
            let netns = pod.path().display().to_string();
            let env = [
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", id.as_str()),
                ("CNI_NETNS", netns.as_str()),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/opt/cni/bin"),
            ];
            node.spawn(&env, conf.as_bytes())
        })
        .collect();
    children
        .into_iter()
        .map(|c| common::Outcome::from(c.wait_with_output().unwrap()))
        .collect()
}

#[test]
fn parallel_adds_and_dels_from_200_processes() {
    if !require_kernel() {
        return;
    }
    let node = Node::new();
    let conf = node
        .conf(
            "1.1.0",
            json!({"podCIDRs": ["10.244.3.0/24", "fd00:10:244:3::/120"]}),
        )
        .to_string();
    let pods: Vec<NetNs> = (0..PODS).map(|_| NetNs::new()).collect();

    let t = Instant::now();
    let adds = run_all(&node, "ADD", &pods, &conf);
    eprintln!("{PODS} parallel ADDs: {:?}", t.elapsed());
    let mut seen = HashSet::new();
    for out in adds {
        let r = out.expect_ok().json.unwrap();
        for ip in r["ips"].as_array().unwrap() {
            let addr = ip["address"].as_str().unwrap().to_owned();
            assert!(seen.insert(addr.clone()), "{addr} was handed out twice");
        }
    }
    assert_eq!(seen.len(), 2 * PODS);
    assert_eq!(node.allocations().len(), 2 * PODS);
    assert_eq!(node.host_links().len(), PODS);
    let owners: HashSet<String> = node
        .allocations()
        .into_iter()
        .map(|(_, owner)| owner)
        .collect();
    assert_eq!(
        owners.len(),
        PODS,
        "each attachment holds exactly one address per family"
    );

    let t = Instant::now();
    for out in run_all(&node, "DEL", &pods, &conf) {
        out.expect_ok();
    }
    eprintln!("{PODS} parallel DELs: {:?}", t.elapsed());
    assert!(
        node.allocations().is_empty(),
        "leaked: {:?}",
        node.allocations()
    );
    assert!(
        node.host_links().is_empty(),
        "leaked links: {:?}",
        node.host_links()
    );
    let routes = node.ns.ip(&["route"]);
    assert!(!routes.contains("10.244.3."), "leaked routes: {routes}");
}
