//! ADD, CHECK, GC and DEL for each supported cniVersion, in test namespaces: the interfaces,
//! addresses, routes and MTU are as documented, and Pods reach the node and each other over real
//! sockets (and ping), without NAT.
mod common;

use common::{NODE_V4, NODE_V6, Node, links, udp_roundtrip};
use dataplane_tests::{netns::NetNs, require_kernel};
use serde_json::{Value, json};

/// The address of `result`'s IP of the given family, without its prefix.
fn ip_of(result: &Value, v6: bool) -> String {
    result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ip| {
            ip["address"]
                .as_str()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .to_owned()
        })
        .find(|a| a.contains(':') == v6)
        .unwrap()
}

fn check_pod_side(pod: &NetNs, result: &Value) {
    let v4 = ip_of(result, false);
    let v6 = ip_of(result, true);
    let link: Value = serde_json::from_str(&pod.ip(&["-j", "link", "show", "eth0"])).unwrap();
    assert_eq!(link[0]["mtu"], 1400);
    assert_eq!(link[0]["operstate"], "UP");
    assert_eq!(link[0]["address"], result["interfaces"][1]["mac"]);
    let addrs = pod.ip(&["-o", "addr", "show", "eth0"]);
    assert!(addrs.contains(&format!("inet {v4}/32")), "{addrs}");
    assert!(addrs.contains(&format!("inet6 {v6}/128")), "{addrs}");
    let r4 = pod.ip(&["route"]);
    assert!(r4.contains("default via 169.254.1.1 dev eth0"), "{r4}");
    let r6 = pod.ip(&["-6", "route"]);
    assert!(r6.contains("default via fe80::1 dev eth0"), "{r6}");
    let neigh = pod.ip(&["neigh"]);
    let host_mac = result["interfaces"][0]["mac"].as_str().unwrap();
    assert!(
        neigh.contains(&format!("169.254.1.1 dev eth0 lladdr {host_mac} PERMANENT")),
        "{neigh}"
    );
}

fn full_cycle(version: &str) {
    if !require_kernel() {
        return;
    }
    let node = Node::new();
    let conf = node.conf(version, json!({}));
    let (pod_a, pod_b) = (NetNs::new(), NetNs::new());

    let a = node
        .cmd("ADD", "ctr-a", "eth0", Some(&pod_a), &conf)
        .expect_ok()
        .json
        .unwrap();
    let b = node
        .cmd("ADD", "ctr-b", "eth0", Some(&pod_b), &conf)
        .expect_ok()
        .json
        .unwrap();

    // The result has the shape of the config's version.
    assert_eq!(a["cniVersion"], version);
    assert_eq!(a["interfaces"][1]["name"], "eth0");
    assert_eq!(
        a["interfaces"][1]["sandbox"],
        pod_a.path().display().to_string()
    );
    assert_eq!(a["ips"].as_array().unwrap().len(), 2);
    assert_eq!(a["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(a["ips"][0]["interface"], 1);
    assert_eq!(
        a["ips"][0].get("version").is_some(),
        version == "0.4.0",
        "{a}"
    );
    assert_eq!(
        a["interfaces"][0].get("mtu").is_some(),
        version == "1.1.0",
        "{a}"
    );
    assert_eq!(ip_of(&a, false), "10.244.1.1");
    assert_eq!(
        ip_of(&b, false),
        "10.244.1.2",
        "round-robin hands out the next address"
    );
    check_pod_side(&pod_a, &a);
    check_pod_side(&pod_b, &b);

    // The node: one routed veth per Pod, host routes to the Pods, no bridge.
    let host_a = a["interfaces"][0]["name"].as_str().unwrap();
    let host_links = node.host_links();
    assert_eq!(host_links.len(), 2, "{host_links:?}");
    assert!(host_links.contains(&host_a.to_owned()));
    let routes = node.ns.ip(&["route"]);
    assert!(
        routes.contains(&format!("10.244.1.1 dev {host_a}")),
        "{routes}"
    );
    let routes6 = node.ns.ip(&["-6", "route"]);
    assert!(
        routes6.contains(&format!("fd00:10:244:1::1 dev {host_a}")),
        "{routes6}"
    );
    let link: Value =
        serde_json::from_str(&node.ns.ip(&["-j", "-d", "link", "show", host_a])).unwrap();
    assert_eq!(link[0]["mtu"], 1400);
    assert_eq!(link[0]["linkinfo"]["info_kind"], "veth");
    assert!(link[0].get("master").is_none(), "routed, not bridged");

    // Real traffic: Pod -> node and Pod -> Pod, IPv4 and IPv6, source addresses kept (no NAT).
    let (a4, a6, b4, b6) = (
        ip_of(&a, false),
        ip_of(&a, true),
        ip_of(&b, false),
        ip_of(&b, true),
    );
    pod_a.exec(&["ping", "-c", "1", "-W", "5", NODE_V4]);
    pod_a.exec(&["ping", "-c", "1", "-W", "5", &b4]);
    pod_b.exec(&["ping", "-6", "-c", "1", "-W", "5", NODE_V6]);
    udp_roundtrip(&pod_a, &node.ns, format!("{NODE_V4}:7001").parse().unwrap());
    udp_roundtrip(&pod_a, &pod_b, format!("{b4}:7002").parse().unwrap());
    udp_roundtrip(&pod_b, &pod_a, format!("[{a6}]:7003").parse().unwrap());
    udp_roundtrip(
        &pod_a,
        &node.ns,
        format!("[{NODE_V6}]:7004").parse().unwrap(),
    );
    udp_roundtrip(&pod_a, &pod_b, format!("[{b6}]:7005").parse().unwrap());
    let receiver = pod_b.run(move || std::net::UdpSocket::bind(format!("{b4}:7006")).unwrap());
    receiver
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let sender = pod_a.run(|| std::net::UdpSocket::bind("0.0.0.0:0").unwrap());
    sender
        .send_to(b"x", receiver.local_addr().unwrap())
        .unwrap();
    let (_, from) = receiver.recv_from(&mut [0u8; 4]).unwrap();
    assert_eq!(
        from.ip().to_string(),
        a4,
        "the Pod's own address arrives: no NAT on the way"
    );

    // CHECK with the ADD result as prevResult.
    let mut check_conf = conf.clone();
    check_conf["prevResult"] = a.clone();
    node.cmd("CHECK", "ctr-a", "eth0", Some(&pod_a), &check_conf)
        .expect_ok();
    // CHECK notices a removed address.
    pod_a.ip(&["addr", "del", &format!("{a4}/32"), "dev", "eth0"]);
    node.cmd("CHECK", "ctr-a", "eth0", Some(&pod_a), &check_conf)
        .expect_code(105);

    // GC keeps the valid attachments and releases the rest (with its veth).
    if version == "1.1.0" {
        let gc = |valid: Value| node.conf(version, json!({"cni.dev/valid-attachments": valid}));
        let both = json!([{"containerID": "ctr-a", "ifname": "eth0"}, {"containerID": "ctr-b", "ifname": "eth0"}]);
        node.call(
            &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
            gc(both).to_string().as_bytes(),
        )
        .expect_ok();
        assert_eq!(node.allocations().len(), 4);
        let only_a = json!([{"containerID": "ctr-a", "ifname": "eth0"}]);
        node.call(&[("CNI_COMMAND", "GC")], gc(only_a).to_string().as_bytes())
            .expect_ok();
        let left = node.allocations();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(
            left.iter().all(|(_, owner)| owner.starts_with("ctr-a\n")),
            "{left:?}"
        );
        assert!(links(&pod_b).is_empty(), "GC removed ctr-b's veth");
    }

    // DEL is idempotent: twice, after the namespace is gone, for unknown containers.
    node.cmd("DEL", "ctr-a", "eth0", Some(&pod_a), &conf)
        .expect_ok();
    node.cmd("DEL", "ctr-a", "eth0", Some(&pod_a), &conf)
        .expect_ok();
    drop(pod_b);
    node.cmd("DEL", "ctr-b", "eth0", None, &conf).expect_ok();
    node.cmd("DEL", "never-added", "eth0", None, &conf)
        .expect_ok();
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(node.host_links().is_empty(), "{:?}", node.host_links());
    assert!(links(&pod_a).is_empty());
    let routes = node.ns.ip(&["route"]);
    assert!(!routes.contains("10.244.1."), "{routes}");
    let log = std::fs::read_to_string(node.dir.0.join("cni.log")).unwrap();
    assert!(
        log.contains("allocated"),
        "logs go to the configured file: {log}"
    );
}

#[test]
fn full_cycle_cni_0_4_0() {
    full_cycle("0.4.0");
}

#[test]
fn full_cycle_cni_1_0_0() {
    full_cycle("1.0.0");
}

#[test]
fn full_cycle_cni_1_1_0() {
    full_cycle("1.1.0");
}

/// Chained after another plugin: its prevResult comes back first, ours after it.
#[test]
fn chained_add_passes_prev_result_through() {
    if !require_kernel() {
        return;
    }
    let node = Node::new();
    let pod = NetNs::new();
    let prev = json!({"cniVersion": "1.1.0", "interfaces": [{"name": "lo0", "sandbox": pod.path()}],
                      "ips": [{"address": "192.0.2.9/32", "interface": 0}], "routes": [], "dns": {"nameservers": ["10.96.0.10"]}});
    let conf = node.conf("1.1.0", json!({"prevResult": prev}));
    let r = node
        .cmd("ADD", "chained", "eth0", Some(&pod), &conf)
        .expect_ok()
        .json
        .unwrap();
    assert_eq!(r["interfaces"][0]["name"], "lo0");
    assert_eq!(r["interfaces"][2]["name"], "eth0");
    assert_eq!(r["ips"][0]["address"], "192.0.2.9/32");
    assert_eq!(
        r["ips"][1]["interface"], 2,
        "our IPs point at our interface after the shift"
    );
    assert_eq!(r["dns"]["nameservers"][0], "10.96.0.10");
    node.cmd("DEL", "chained", "eth0", Some(&pod), &conf)
        .expect_ok();
}

/// IPv6 single-stack: one address, the fe80::1 gateway, and traffic both ways.
#[test]
fn ipv6_only_node() {
    if !require_kernel() {
        return;
    }
    let node = Node::new();
    let conf = node.conf("1.1.0", json!({"podCIDRs": ["fd00:10:244:9::/120"]}));
    let pod = NetNs::new();
    let r = node
        .cmd("ADD", "v6", "eth0", Some(&pod), &conf)
        .expect_ok()
        .json
        .unwrap();
    assert_eq!(r["ips"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["ips"][0]["address"], "fd00:10:244:9::1/128");
    assert_eq!(r["ips"][0]["gateway"], "fe80::1");
    assert_eq!(r["routes"], json!([{"dst": "::/0", "gw": "fe80::1"}]));
    assert!(
        !pod.ip(&["route"]).contains("default"),
        "no IPv4 route without an IPv4 pool"
    );
    pod.exec(&["ping", "-6", "-c", "1", "-W", "5", NODE_V6]);
    udp_roundtrip(&node.ns, &pod, "[fd00:10:244:9::1]:7010".parse().unwrap());
    node.cmd("DEL", "v6", "eth0", Some(&pod), &conf).expect_ok();
    assert!(node.allocations().is_empty());
}
