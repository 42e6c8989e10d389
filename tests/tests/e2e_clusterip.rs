//! End to end, Pod -> ClusterIP: the node's cgroup socket programs (attached by the agent to the
//! node's cgroup, which holds the Pods' cgroups) pick a backend at connect()/sendmsg() time. Local
//! and remote backends both get a share, over TCP and UDP, with no NAT (the backend sees the client
//! Pod's address); a Service without endpoints refuses.
use std::net::SocketAddr;

use dataplane_tests::{
    cluster::{Cluster, ECHO_PORT, Reply, Service, tally},
    require_kernel,
};

#[test]
fn pod_to_clusterip_tcp_and_udp_reaches_local_and_remote_backends() {
    if !require_kernel() {
        return;
    }
    let mut c = Cluster::start(3).unwrap();
    // Two backends on the client's node, one on each other node.
    let backends = [c.add_pod(0, "web-a").unwrap(), c.add_pod(0, "web-b").unwrap(), c.add_pod(1, "web-c").unwrap(), c.add_pod(2, "web-d").unwrap()];
    let client = c.add_pod(0, "client").unwrap();
    let eps: Vec<_> = backends.iter().map(|b| c.endpoint(*b)).collect();
    let svc = c.apply(Service::new("web", 80, ECHO_PORT).endpoints(eps)).unwrap();
    let client_ip = c.pod(client).ip;
    let vip = SocketAddr::from((svc.vip(), 80));
    for (proto, replies) in [("tcp", c.pod(client).tcp(vip, 60).unwrap()), ("udp", c.pod(client).udp(vip, 60).unwrap())] {
        let counts = tally(&replies);
        eprintln!("{proto}: {counts:?}");
        for r in &replies {
            match r {
                Reply::Ok { client, .. } => assert_eq!(client.ip(), client_ip, "{proto}: backend saw {client}: NAT where there should be none"),
                Reply::Err { kind, detail } => panic!("{proto} to {vip}: {kind}: {detail} (all: {counts:?})"),
            }
        }
        for name in ["web-a", "web-b", "web-c", "web-d"] {
            // 60 requests over 4 backends: a fair picker gives each ~15; 3 is far in the tail.
            assert!(counts.get(name).copied().unwrap_or(0) >= 3, "{proto}: {name} got no fair share: {counts:?}");
        }
    }
}

#[test]
fn service_without_endpoints_refuses() {
    if !require_kernel() {
        return;
    }
    let mut c = Cluster::start(2).unwrap();
    let client = c.add_pod(0, "client").unwrap();
    let vip = SocketAddr::from((c.apply(Service::new("empty", 80, ECHO_PORT)).unwrap().vip(), 80));
    let replies = c.pod(client).tcp(vip, 3).unwrap();
    for r in &replies {
        // Refused at connect() (as kube-proxy's REJECT does), not a silent timeout.
        assert_eq!(r.error_kind(), Some("refused"), "{replies:?}");
    }
    // Once it has an endpoint, the same address answers: the refusal came from "no endpoints".
    let web = c.add_pod(1, "web").unwrap();
    let ep = c.endpoint(web);
    c.apply(Service::new("empty", 80, ECHO_PORT).endpoints([ep])).unwrap();
    let replies = c.pod(client).tcp(vip, 3).unwrap();
    assert_eq!(tally(&replies).get("web"), Some(&3), "{replies:?}");
}

/// The standalone source (`--manifests`, no API server) drives the same data path.
#[test]
fn standalone_manifests_cluster_serves_clusterip() {
    if !require_kernel() {
        return;
    }
    let mut c = Cluster::start_standalone(2).unwrap();
    let web = c.add_pod(1, "web").unwrap();
    let client = c.add_pod(0, "client").unwrap();
    let ep = c.endpoint(web);
    let vip = SocketAddr::from((c.apply(Service::new("web", 80, ECHO_PORT).endpoints([ep])).unwrap().vip(), 80));
    assert_eq!(tally(&c.pod(client).tcp(vip, 5).unwrap()).get("web"), Some(&5));
    c.delete("web").unwrap();
    let after = c.pod(client).tcp(vip, 1).unwrap();
    assert!(!after[0].is_ok(), "a deleted Service's address is not served: {after:?}");
}
