//! Failures: every bad input gets a CNI error object with its code, a non-zero exit, and changes
//! nothing on disk or in the kernel; injected failures after each step of ADD are rolled back;
//! STATUS reports 50 when the agent is not ready or the pool is exhausted.
mod common;

use common::{Node, links, write};
use dataplane_tests::{netns::NetNs, require_kernel};
use serde_json::json;

#[test]
fn bad_inputs_get_their_code_and_change_nothing() {
    if !require_kernel() {
        return;
    }
    let node = Node::new();
    // A /30 holds two Pods: after two ADDs the pool is exhausted.
    let conf = node.conf("1.1.0", json!({"podCIDRs": ["10.244.9.0/30"]}));
    let (pod1, pod2, pod3) = (NetNs::new(), NetNs::new(), NetNs::new());
    node.cmd("ADD", "c1", "eth0", Some(&pod1), &conf)
        .expect_ok();
    node.cmd("ADD", "c2", "eth0", Some(&pod2), &conf)
        .expect_ok();
    let pods = [&pod1, &pod2, &pod3];
    let before = node.snapshot(&pods);
    let netns3 = pod3.path().display().to_string();
    let add_env = |id: &'static str, netns: &str| -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", "ADD".into()),
            ("CNI_CONTAINERID", id.into()),
            ("CNI_NETNS", netns.into()),
            ("CNI_IFNAME", "eth0".into()),
            ("CNI_PATH", "/opt/cni/bin".into()),
        ]
    };
    let without = |key: &str| -> Vec<(&'static str, String)> {
        add_env("c3", &netns3)
            .into_iter()
            .filter(|(k, _)| *k != key)
            .collect()
    };
    let with_version = |v: &str| {
        node.conf(v, json!({"podCIDRs": ["10.244.9.0/30"]}))
            .to_string()
    };
    let bad_cidr = node
        .conf("1.1.0", json!({"podCIDRs": ["10.244.9.0/33"]}))
        .to_string();
    let host_bits = node
        .conf("1.1.0", json!({"podCIDRs": ["10.244.9.1/30"]}))
        .to_string();
    let good = conf.to_string();

    // (what, environment, stdin, expected code)
    type Env = Vec<(&'static str, String)>;
    let cases: Vec<(&str, Env, String, u64)> = vec![
        (
            "malformed JSON",
            add_env("c3", &netns3),
            "{\"cniVersion\": \"1.1.0\", ".into(),
            6,
        ),
        (
            "missing CNI_COMMAND",
            without("CNI_COMMAND"),
            good.clone(),
            4,
        ),
        (
            "missing CNI_CONTAINERID",
            without("CNI_CONTAINERID"),
            good.clone(),
            4,
        ),
        ("missing CNI_NETNS", without("CNI_NETNS"), good.clone(), 4),
        ("missing CNI_IFNAME", without("CNI_IFNAME"), good.clone(), 4),
        (
            "unknown cniVersion",
            add_env("c3", &netns3),
            with_version("0.3.1"),
            1,
        ),
        (
            "future cniVersion",
            add_env("c3", &netns3),
            with_version("9.9.9"),
            1,
        ),
        ("bad CIDR", add_env("c3", &netns3), bad_cidr, 7),
        ("CIDR with host bits", add_env("c3", &netns3), host_bits, 7),
        ("exhausted pool", add_env("c3", &netns3), good.clone(), 100),
        (
            "netns that does not exist",
            add_env("c3", "/run/netns/dpt-does-not-exist"),
            good.clone(),
            102,
        ),
        (
            "second ADD for the same container",
            add_env("c1", &netns3),
            good.clone(),
            101,
        ),
    ];
    for (what, env, stdin, code) in cases {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = node.call(&env, stdin.as_bytes());
        let err = out.expect_code(code);
        eprintln!("{what}: {err}");
        assert_eq!(node.snapshot(&pods), before, "{what} changed something");
    }
    assert!(links(&pod3).is_empty());
    node.cmd("DEL", "c1", "eth0", Some(&pod1), &conf)
        .expect_ok();
    node.cmd("DEL", "c2", "eth0", Some(&pod2), &conf)
        .expect_ok();
}

#[test]
fn injected_failures_are_rolled_back() {
    if !require_kernel() {
        return;
    }
    let node = Node::new();
    let conf = node.conf("1.1.0", json!({}));
    let pod = NetNs::new();
    let before = node.snapshot(&[&pod]);
    for step in ["ipam", "veth", "pod"] {
        let netns = pod.path().display().to_string();
        let env = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "doomed"),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            (dataplane_cni::plugin::FAIL_AFTER_VAR, step),
        ];
        node.call(&env, conf.to_string().as_bytes())
            .expect_code(199);
        assert!(
            node.allocations().is_empty(),
            "after {step}: {:?}",
            node.allocations()
        );
        assert!(
            node.host_links().is_empty(),
            "after {step}: {:?}",
            node.host_links()
        );
        assert!(links(&pod).is_empty(), "after {step}: {:?}", links(&pod));
        assert_eq!(node.snapshot(&[&pod]), before, "after {step}");
        let log = std::fs::read_to_string(node.dir.0.join("cni.log")).unwrap();
        assert!(log.contains("rolled back: IPAM allocation"), "{log}");
    }
    // The same attachment then succeeds: nothing of the failed attempts is in the way.
    node.cmd("ADD", "doomed", "eth0", Some(&pod), &conf)
        .expect_ok();
    node.cmd("DEL", "doomed", "eth0", Some(&pod), &conf)
        .expect_ok();
}

#[test]
fn status_and_the_node_file() {
    if !require_kernel() {
        return;
    }
    let node = Node::new();
    // Pools from the node file the agent writes, not from the config.
    let conf = node.conf("1.1.0", json!({"podCIDRs": null}));
    let status = || node.call(&[("CNI_COMMAND", "STATUS")], conf.to_string().as_bytes());
    let pod1 = NetNs::new();
    let pod2 = NetNs::new();

    status().expect_code(50); // no readiness file
    write(&node.dir.0.join("ready"), "");
    status().expect_code(50); // no node file: pools unknown
    node.cmd("ADD", "p1", "eth0", Some(&pod1), &conf)
        .expect_code(11); // try again later
    assert!(node.allocations().is_empty());

    write(
        &node.dir.0.join("node.json"),
        r#"{"podCIDRs": ["10.244.7.0/31"]}"#,
    );
    status().expect_ok();
    let r = node
        .cmd("ADD", "p1", "eth0", Some(&pod1), &conf)
        .expect_ok()
        .json
        .unwrap();
    assert_eq!(
        r["ips"][0]["address"], "10.244.7.0/32",
        "a /31 has two usable addresses"
    );
    node.cmd("ADD", "p2", "eth0", Some(&pod2), &conf)
        .expect_ok();
    status().expect_code(50); // exhausted
    node.cmd("DEL", "p2", "eth0", Some(&pod2), &conf)
        .expect_ok();
    status().expect_ok();

    write(
        &node.dir.0.join("node.json"),
        r#"{"podCIDRs": ["not-a-cidr"]}"#,
    );
    node.cmd("ADD", "p3", "eth0", Some(&pod2), &conf)
        .expect_code(7);
    node.cmd("DEL", "p1", "eth0", Some(&pod1), &conf)
        .expect_ok();
    assert!(node.allocations().is_empty());
}

#[test]
fn version_and_old_configs() {
    if !require_kernel() {
        return;
    }
    let node = Node::new();
    let out = node
        .call(&[("CNI_COMMAND", "VERSION")], b"")
        .expect_ok()
        .json
        .unwrap();
    assert_eq!(out["cniVersion"], "1.1.0");
    assert_eq!(out["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
    // GC without the list of valid attachments would release everything: refused.
    let conf = node.conf("1.1.0", json!({}));
    node.call(&[("CNI_COMMAND", "GC")], conf.to_string().as_bytes())
        .expect_code(7);
}
