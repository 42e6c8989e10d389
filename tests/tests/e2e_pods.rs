//! End to end, Pod paths without Services: Pods created by the real CNI plugin on a 3-node
//! virtual cluster reach each other on the same node and across nodes (through the routes the
//! agents install to other nodes' podCIDRs), and the server sees the client Pod's own address.
use std::path::PathBuf;

use dataplane_tests::{
    cluster::{Cluster, ECHO_PORT, Reply},
    require_kernel,
};

#[test]
fn pod_to_pod_same_node_and_across_nodes_without_nat() {
    if !require_kernel() {
        return;
    }
    let mut c = Cluster::start(3).unwrap();
    let client = c.add_pod(0, "client").unwrap();
    let same = c.add_pod(0, "same-node").unwrap();
    let remote = c.add_pod(1, "remote").unwrap();
    let third = c.add_pod(2, "third").unwrap();
    let client_ip = c.pod(client).ip;
    // Each Pod's address is in its node's podCIDR.
    for (id, cidr) in [(client, "10.244.1."), (same, "10.244.1."), (remote, "10.244.2."), (third, "10.244.3.")] {
        assert!(c.pod(id).ip.to_string().starts_with(cidr), "{} got {}", c.pod(id).name, c.pod(id).ip);
    }
    for target in [same, remote, third] {
        let t = c.pod(target);
        for (proto, replies) in [("tcp", c.pod(client).tcp(t.addr(ECHO_PORT), 3).unwrap()), ("udp", c.pod(client).udp(t.addr(ECHO_PORT), 3).unwrap())] {
            assert_eq!(replies.len(), 3);
            for r in replies {
                match r {
                    Reply::Ok { pod, client } => {
                        assert_eq!(pod, t.name, "{proto} to {} answered by another pod", t.name);
                        assert_eq!(client.ip(), client_ip, "{proto} to {}: the server saw {client}, not the client Pod (NAT?)", t.name);
                    }
                    Reply::Err { kind, detail } => panic!("{proto} client -> {} ({}): {kind}: {detail}", t.name, t.ip),
                }
            }
        }
    }
    // And back: a Pod on another node reaches the client Pod, again seen with its own address.
    let back = c.pod(third).tcp(c.pod(client).addr(ECHO_PORT), 1).unwrap();
    assert_eq!(back[0].pod(), Some("client"), "{back:?}");
    assert_eq!(back[0].client().unwrap().ip(), c.pod(third).ip);

    // Teardown leaves nothing behind: namespaces, cgroups, pins, files, processes.
    let mut paths: Vec<PathBuf> = c.nodes.iter().flat_map(|n| [n.netns.path(), n.cgroup.path().to_path_buf(), n.pins.path().to_path_buf()]).collect();
    paths.extend([client, same, remote, third].map(|p| PathBuf::from("/run/netns").join(c.pod(p).netns())));
    paths.push(PathBuf::from("/run/netns").join(&c.client.netns));
    paths.push(c.dir().to_path_buf());
    assert!(paths.iter().all(|p| p.exists()), "{paths:?}");
    // Children are listed per thread that forked them (the test runs on a libtest thread).
    let children = || -> String {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .map(|t| std::fs::read_to_string(t.path().join("children")).unwrap_or_default())
            .collect()
    };
    assert!(!children().trim().is_empty(), "agents and echo servers are this process's children");
    drop(c);
    let left: Vec<_> = paths.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(children().trim(), "", "child processes still running");
}
