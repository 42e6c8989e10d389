//! Observability end to end, on a one-node virtual cluster with the real agent attached: traffic
//! through a NodePort (XDP on the uplink, TC on the Pod veth) shows in `/metrics` as per-Service
//! packets and bytes; Pod -> ClusterIP traffic (socket LB, no per-packet path) shows as socket-LB
//! connects and datagrams for that Service; packets to a Service without endpoints show in
//! `dataplane_drops_total{reason="no_backend"}` (and as socket-LB refusals); `status` reports each
//! map's fill level matching what was programmed, also while the agent is down; the counters are
//! pinned, so they survive an agent restart.
use std::net::SocketAddr;

use dataplane_tests::{
    cluster::{Cluster, ECHO_PORT, Node, Reply, Service, tally},
    require_kernel,
};
use serde_json::Value;


fn scrape(node: &Node) -> String {
    node.metrics().unwrap()
}

/// The value of the sample `name{..}` whose labels include every one of `labels`. Panics if
/// there is none or more than one, showing the family.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    let found: Vec<u64> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix('{')?;
            let (set, value) = rest.split_once("} ")?;
            labels.iter().all(|(k, v)| set.split(',').any(|kv| kv == format!("{k}=\"{v}\""))).then(|| value.trim().parse().unwrap())
        })
        .collect();
    let family: Vec<&str> = text.lines().filter(|l| l.starts_with(name)).collect();
    assert_eq!(found.len(), 1, "{name} with {labels:?}: {found:?} in\n{}", family.join("\n"));
    found[0]
}

fn svc_labels<'a>(namespace: &'a str, service: &'a str, kind: &'a str, protocol: &'a str) -> [(&'a str, &'a str); 4] {
    [("namespace", namespace), ("service", service), ("kind", kind), ("protocol", protocol)]
}

fn all_ok(what: &str, replies: &[Reply]) {
    assert!(replies.iter().all(Reply::is_ok), "{what}: {:?}", tally(replies));
}

fn status(node: &Node) -> Value {
    node.status_report().unwrap()
}

fn fill(status: &Value, map: &str) -> (u64, u64) {
    let row = status["maps"].as_array().unwrap().iter().find(|m| m["name"] == map).unwrap_or_else(|| panic!("{map} in {status:#}"));
    assert!(row["error"].is_null(), "{row}");
    (row["entries"].as_u64().unwrap_or_else(|| panic!("{row}")), row["max_entries"].as_u64().unwrap())
}

fn drops(status: &Value, reason: &str) -> u64 {
    status["drops"].as_array().unwrap().iter().find(|d| d["reason"] == reason).unwrap()["packets"].as_u64().unwrap()
}

#[test]
fn metrics_and_status_show_service_traffic_socket_lb_drops_and_fill_levels() {
    if !require_kernel() {
        return;
    }
    let mut c = Cluster::start(1).unwrap();
    let web = c.add_pod(0, "web").unwrap();
    let client = c.add_pod(0, "client").unwrap();
    let ep = c.endpoint(web);
    let web_svc = c.apply(Service::new("web", 80, ECHO_PORT).node_port().endpoints([ep])).unwrap();
    let empty_svc = c.apply(Service::new("empty", 80, ECHO_PORT).node_port()).unwrap();
    let (web_vip, web_node_port) = (web_svc.vip(), web_svc.node_port.unwrap());
    let (empty_vip, empty_node_port) = (empty_svc.vip(), empty_svc.node_port.unwrap());
    let ns = c.namespace().to_owned();
    let node = &c.nodes[0];
    let before = scrape(node);
    let web_np_tcp = svc_labels(&ns, "web", "NodePort", "TCP");
    let web_cip_tcp = svc_labels(&ns, "web", "ClusterIP", "TCP");
    let web_cip_udp = svc_labels(&ns, "web", "ClusterIP", "UDP");
    let empty_cip_tcp = svc_labels(&ns, "empty", "ClusterIP", "TCP");
    let no_backend = [("reason", "no_backend")];

    // External client -> NodePort: XDP DNATs the requests, TC on the Pod veth reverse-NATs the replies.
    all_ok("nodeport", &c.client.tcp(SocketAddr::from((node.ip, web_node_port)), 10).unwrap());
    // Pod -> ClusterIP: the socket hooks pick the backend at connect()/sendmsg().
    all_ok("clusterip tcp", &c.pod(client).tcp(SocketAddr::from((web_vip, 80)), 7).unwrap());
    all_ok("clusterip udp", &c.pod(client).udp(SocketAddr::from((web_vip, 80)), 5).unwrap());
    // No endpoints: the NodePort's datagrams are dropped by XDP, the ClusterIP connect is refused.
    let lost = c.client.udp(SocketAddr::from((node.ip, empty_node_port)), 2).unwrap();
    assert!(lost.iter().all(|r| !r.is_ok()), "{lost:?}");
    let refused = c.pod(client).tcp(SocketAddr::from((empty_vip, 80)), 3).unwrap();
    assert!(refused.iter().all(|r| r.error_kind() == Some("refused")), "{refused:?}");

    let after = scrape(node);
    let delta = |name: &str, labels: &[(&str, &str)]| sample(&after, name, labels) - sample(&before, name, labels);
    // 10 connections: at least SYN, ACK, request, FIN in and SYN-ACK, reply, FIN out each.
    let packets = delta("dataplane_service_packets_total", &web_np_tcp);
    let bytes = delta("dataplane_service_bytes_total", &web_np_tcp);
    assert!(packets >= 60, "NodePort packets {packets}");
    assert!(bytes >= packets * 54, "NodePort bytes {bytes} for {packets} packets (each has Ethernet, IPv4, TCP headers)");
    // Socket-LB traffic never reaches the per-packet counters, and the other way round.
    assert_eq!(delta("dataplane_service_socket_connects_total", &web_cip_tcp), 7);
    assert_eq!(delta("dataplane_service_socket_datagrams_total", &web_cip_udp), 5);
    assert_eq!(delta("dataplane_service_packets_total", &web_cip_tcp), 0);
    assert_eq!(delta("dataplane_service_socket_connects_total", &web_np_tcp), 0);
    assert_eq!(delta("dataplane_service_socket_refused_total", &empty_cip_tcp), 3);
    // 2 datagrams dropped by XDP + 3 refused connects.
    assert_eq!(delta("dataplane_drops_total", &no_backend), 5);
    assert!(delta("dataplane_hook_packets_total", &[("hook", "xdp_ingress")]) >= 30);
    assert_eq!(delta("dataplane_hook_packets_total", &[("hook", "sock_connect4")]), 10);

    // status: fill levels from the pins. Two Services x (ClusterIP + NodePort) x (TCP + UDP):
    // 8 frontend entries and 8 rev-NAT entries; only web's 4 have a slot, all for the one backend.
    let s = status(node);
    assert_eq!(fill(&s, "lb4_fe_v1").0, 8, "{:#}", s["maps"]);
    assert_eq!(fill(&s, "lb4_revnat_v1").0, 8);
    assert_eq!(fill(&s, "lb4_slots_v1").0, 4);
    assert_eq!(fill(&s, dataplane_common::lb::BACKENDS4_MAP).0, 1);
    assert_eq!(s["status"]["map_frontends"], 8, "the agent's own count agrees");
    let (ct, ct_max) = fill(&s, dataplane_common::ct::CT4_MAP);
    assert!(ct >= 2 && ct < ct_max, "conntrack holds the NodePort flows: {ct}/{ct_max}");
    assert!(drops(&s, "no_backend") >= 5);
    let attached: Vec<&str> = s["attached"].as_array().unwrap().iter().filter_map(|a| a["program"].as_str()).collect();
    assert!(attached.contains(&"dp_xdp_ingress") && attached.contains(&"dp_tc_ingress"), "{attached:?}");

    // The agent down: status still reads everything from the pins; a restarted agent serves
    // the counters where they were (they are pinned), and keeps counting.
    c.nodes[0].kill_agent();
    let down = status(&c.nodes[0]);
    assert_eq!(down["maps"], s["maps"], "nothing changed while the agent was down");
    assert_eq!(drops(&down, "no_backend"), drops(&s, "no_backend"));
    c.nodes[0].start_agent().unwrap();
    let restarted = scrape(&c.nodes[0]);
    assert!(sample(&restarted, "dataplane_service_packets_total", &web_np_tcp) >= sample(&after, "dataplane_service_packets_total", &web_np_tcp));
    assert_eq!(sample(&restarted, "dataplane_drops_total", &no_backend), sample(&after, "dataplane_drops_total", &no_backend));
    all_ok("clusterip after restart", &c.pod(client).tcp(SocketAddr::from((web_vip, 80)), 2).unwrap());
    let later = scrape(&c.nodes[0]);
    assert_eq!(
        sample(&later, "dataplane_service_socket_connects_total", &web_cip_tcp) - sample(&after, "dataplane_service_socket_connects_total", &web_cip_tcp),
        2
    );
}
