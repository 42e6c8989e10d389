//! Routes to other nodes' podCIDRs, programmed over rtnetlink inside a test network namespace:
//! add, gateway change, removal when the Node goes, adoption after a restart, and other routes
//! left alone.
use std::collections::BTreeMap;

use dataplane_agent::model::NodeState;
use dataplane_agent::routes::{self, RouteSync};
use dataplane_tests::{netns::NetNs, require_kernel};

fn node(ips: &[&str], cidrs: &[&str]) -> NodeState {
    NodeState {
        internal_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        addresses: vec![],
        pod_cidrs: cidrs.iter().map(|s| s.parse().unwrap()).collect(),
        zone: None,
    }
}

/// `ip route` lines with our protocol, both families, sorted.
fn our_routes(ns: &NetNs) -> Vec<String> {
    let mut v: Vec<String> = ["-4", "-6"]
        .iter()
        .flat_map(|f| ns.ip(&[f, "route", "show", "proto", &routes::ROUTE_PROTOCOL.to_string()]).lines().map(|l| l.trim().to_string()).collect::<Vec<_>>())
        .collect();
    v.sort();
    v
}

#[test]
fn routes_follow_nodes_and_survive_restart() {
    if !require_kernel() {
        return;
    }
    let ns = NetNs::new();
    // The node's own network: a link holding the InternalIPs' subnets, so gateways are on-link.
    // A veth pair with both ends inside the namespace (this kernel has no dummy module).
    ns.ip(&["link", "add", "dpt-up0", "type", "veth", "peer", "name", "dpt-up1"]);
    ns.ip(&["link", "set", "dpt-up1", "up"]);
    ns.ip(&["addr", "add", "192.168.77.10/24", "dev", "dpt-up0"]);
    ns.ip(&["addr", "add", "fd00:77::10/64", "dev", "dpt-up0", "nodad"]);
    ns.ip(&["link", "set", "dpt-up0", "up"]);
    ns.ip(&["route", "add", "10.99.0.0/16", "via", "192.168.77.1", "proto", "static"]);

    let mut nodes: BTreeMap<String, NodeState> = [
        ("a".to_string(), node(&["192.168.77.10", "fd00:77::10"], &["10.244.0.0/24", "fd00:244::/64"])),
        ("b".to_string(), node(&["192.168.77.11", "fd00:77::11"], &["10.244.1.0/24", "fd00:244:1::/64"])),
        ("c".to_string(), node(&["192.168.77.12"], &["10.244.2.0/24"])),
    ]
    .into_iter()
    .collect();

    let first = nodes.clone();
    let changes = ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut sync = RouteSync::new().await.unwrap();
            assert!(sync.installed().is_empty(), "a fresh namespace has none of our routes");
            sync.sync(&routes::wanted(&first, "a")).await.unwrap()
        })
    });
    assert_eq!(changes.added.len(), 3);
    assert_eq!(
        our_routes(&ns),
        [
            "10.244.1.0/24 via 192.168.77.11 dev dpt-up0",
            "10.244.2.0/24 via 192.168.77.12 dev dpt-up0",
            "fd00:244:1::/64 via fd00:77::11 dev dpt-up0 metric 1024 pref medium",
        ]
    );

    // "Restart": a new RouteSync adopts the routes; node c leaves and b moves to a new address.
    nodes.remove("c");
    nodes.get_mut("b").unwrap().internal_ips = vec!["192.168.77.21".parse().unwrap(), "fd00:77::11".parse().unwrap()];
    let changes = ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut sync = RouteSync::new().await.unwrap();
            assert_eq!(sync.installed().len(), 3, "routes of the previous run are adopted");
            let changes = sync.sync(&routes::wanted(&nodes, "a")).await.unwrap();
            // A second sync with the same input changes nothing.
            assert_eq!(sync.sync(&routes::wanted(&nodes, "a")).await.unwrap(), Default::default());
            changes
        })
    });
    assert_eq!(changes.added, ["10.244.1.0/24".parse().unwrap()]);
    assert_eq!(changes.removed, ["10.244.2.0/24".parse().unwrap()]);
    assert_eq!(
        our_routes(&ns),
        ["10.244.1.0/24 via 192.168.77.21 dev dpt-up0", "fd00:244:1::/64 via fd00:77::11 dev dpt-up0 metric 1024 pref medium"]
    );
    assert!(ns.ip(&["route", "show", "10.99.0.0/16"]).contains("via 192.168.77.1"), "a route that is not ours was touched");
}

#[test]
fn node_file_is_written_atomically_and_only_on_change() {
    let dir = std::env::temp_dir().join(dataplane_tests::unique_name());
    let path = dir.join("sub/node.json");
    let cidrs = ["10.244.1.0/24".parse().unwrap()];
    assert!(routes::write_node_file(&path, &cidrs).unwrap());
    assert!(!routes::write_node_file(&path, &cidrs).unwrap());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"podCIDRs\":[\"10.244.1.0/24\"]}\n");
    let err = routes::write_node_file(std::path::Path::new("/proc/dpt-no/node.json"), &cidrs).unwrap_err();
    assert!(err.to_string().contains("writing the CNI node file /proc/dpt-no/node.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
