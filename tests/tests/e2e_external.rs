//! End to end, from outside the cluster: an external client on the underlay reaches NodePorts on
//! every node (XDP on the node's uplink picks a backend; traffic to a remote backend is SNATed to
//! the entry node), externalTrafficPolicy Local answers only where a backend runs and keeps the
//! client's address, and LoadBalancer ingress IPs and externalIPs routed to a node are served.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use dataplane_tests::{
    cluster::{CLIENT_IP, Cluster, ECHO_PORT, Reply, Service, tally},
    require_kernel,
};

/// Every reply OK; returns them as (pod, client IP seen).
fn answered(what: &str, replies: &[Reply]) -> Vec<(String, IpAddr)> {
    replies
        .iter()
        .map(|r| match r {
            Reply::Ok { pod, client } => (pod.clone(), client.ip()),
            Reply::Err { kind, detail } => panic!("{what}: {kind}: {detail} (all: {:?})", tally(replies)),
        })
        .collect()
}

#[test]
fn nodeport_on_every_node_reaches_local_and_remote_backends() {
    if !require_kernel() {
        return;
    }
    let mut c = Cluster::start(3).unwrap();
    let a = c.add_pod(0, "web-1").unwrap();
    let b = c.add_pod(1, "web-2").unwrap();
    let eps = [c.endpoint(a), c.endpoint(b)];
    let node_port = c.apply(Service::new("web", 80, ECHO_PORT).node_port().endpoints(eps)).unwrap().node_port.unwrap();
    let home = |pod: &str| if pod == "web-1" { 0 } else { 1 };
    for (i, node) in c.nodes.iter().enumerate() {
        let addr = SocketAddr::from((node.ip, node_port));
        let tcp = answered(&format!("tcp to {}", node.name), &c.client.tcp(addr, 30).unwrap());
        let udp = answered(&format!("udp to {}", node.name), &c.client.udp(addr, 10).unwrap());
        let pods: BTreeSet<&str> = tcp.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(pods, BTreeSet::from(["web-1", "web-2"]), "tcp via {}", node.name);
        for (pod, seen) in tcp.iter().chain(&udp) {
            // A local backend sees the client; a remote one sees the entry node (SNAT), so that
            // its reply comes back through the node that holds the connection's NAT state.
            let want = if home(pod) == i { IpAddr::V4(CLIENT_IP) } else { IpAddr::V4(node.ip) };
            assert_eq!(*seen, want, "{pod} via {} saw {seen}", node.name);
        }
    }
}

#[test]
fn external_traffic_policy_local_answers_only_on_backend_nodes_and_keeps_client_ip() {
    if !require_kernel() {
        return;
    }
    let mut c = Cluster::start(3).unwrap();
    let a = c.add_pod(1, "local-a").unwrap();
    let b = c.add_pod(1, "local-b").unwrap();
    let eps = [c.endpoint(a), c.endpoint(b)];
    let node_port = c.apply(Service::new("web", 80, ECHO_PORT).node_port().external_traffic_local().endpoints(eps)).unwrap().node_port.unwrap();
    let replies = c.client.tcp(SocketAddr::from((c.nodes[1].ip, node_port)), 30).unwrap();
    let on_backend_node = answered(&c.nodes[1].name, &replies);
    let counts = tally(&replies);
    assert!(counts.contains_key("local-a") && counts.contains_key("local-b"), "both local backends answer: {counts:?}");
    for (pod, seen) in &on_backend_node {
        assert_eq!(*seen, IpAddr::V4(CLIENT_IP), "{pod} saw {seen}: eTP Local must keep the client address");
    }
    for i in [0, 2] {
        let replies = c.client.tcp(SocketAddr::from((c.nodes[i].ip, node_port)), 2).unwrap();
        assert!(replies.iter().all(|r| !r.is_ok()), "{} has no backend and must not answer: {replies:?}", c.nodes[i].name);
    }
}

#[test]
fn load_balancer_ingress_ip_and_external_ip_are_served() {
    if !require_kernel() {
        return;
    }
    let mut c = Cluster::start(3).unwrap();
    let a = c.add_pod(1, "web-2").unwrap();
    let b = c.add_pod(2, "web-3").unwrap();
    let lb = Ipv4Addr::new(192, 168, 201, 10);
    let ext = Ipv4Addr::new(192, 168, 202, 10);
    let eps = [c.endpoint(a), c.endpoint(b)];
    c.apply(
        Service::new("web", 80, ECHO_PORT).load_balancer(&[lb]).external_ips(&[ext]).endpoints(eps),
    )
    .unwrap();
    // An upstream router would send the LoadBalancer IP to node-1 and the externalIP to node-3.
    c.client_route(lb, 0);
    c.client_route(ext, 2);
    for ip in [lb, ext] {
        let replies = c.client.tcp(SocketAddr::from((ip, 80)), 30).unwrap();
        let pods: BTreeSet<String> = answered(&format!("tcp to {ip}"), &replies).into_iter().map(|(p, _)| p).collect();
        assert_eq!(pods, BTreeSet::from(["web-2".to_string(), "web-3".to_string()]), "{ip}: {:?}", tally(&replies));
        answered(&format!("udp to {ip}"), &c.client.udp(SocketAddr::from((ip, 80)), 5).unwrap());
    }
    // The frontends are exactly these ports: another port on the same address is not served.
    let other = c.client.tcp(SocketAddr::from((lb, 81)), 1).unwrap();
    assert!(!other[0].is_ok(), "{other:?}");
}
