//! End to end, behaviour over time: session affinity within and after its timeout, removing a
//! backend under load, and restarting (kill -9) an agent under steady load.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use dataplane_tests::{
    cluster::{Cluster, ECHO_PORT, PodId, Service, tally},
    require_kernel,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const NODE_PORT: u16 = 30090;

fn three_backends(c: &mut Cluster) -> Vec<PodId> {
    (0..3).map(|i| c.add_pod(i, &format!("web-{}", i + 1)).unwrap()).collect()
}

#[test]
fn session_affinity_sticks_within_its_timeout_and_moves_after() {
    if !require_kernel() {
        return;
    }
    let mut c = Cluster::start(3).unwrap();
    let backends = three_backends(&mut c);
    let client = c.add_pod(0, "client").unwrap();
    let eps: Vec<_> = backends.iter().map(|b| c.endpoint(*b)).collect();
    let timeout_s = 1;
    c.apply(Service::new("sticky", VIP, 80, ECHO_PORT).affinity(timeout_s).endpoints(eps)).unwrap();
    let vip = SocketAddr::from((VIP, 80));
    let mut chosen = Vec::new();
    // After each idle gap longer than the timeout the client gets a fresh pick; with 3 backends
    // eight picks all landing on one backend has probability (1/3)^7 < 0.1%.
    for round in 0..8 {
        let replies = c.pod(client).tcp(vip, 10).unwrap();
        let counts = tally(&replies);
        assert_eq!(counts.len(), 1, "round {round}: within the timeout every connection goes to one backend: {counts:?}");
        let pod = replies[0].pod().unwrap_or_else(|| panic!("round {round}: {replies:?}")).to_owned();
        chosen.push(pod);
        if chosen.iter().collect::<BTreeSet<_>>().len() > 1 {
            break;
        }
        std::thread::sleep(Duration::from_secs(timeout_s as u64) * 2 + Duration::from_millis(200));
    }
    assert!(chosen.iter().collect::<BTreeSet<_>>().len() > 1, "the affinity never expired: {chosen:?}");
}

#[test]
fn removed_backend_gets_no_new_connections_within_1s_while_others_live_on() {
    if !require_kernel() {
        return;
    }
    let mut c = Cluster::start(3).unwrap();
    let backends = three_backends(&mut c);
    let client = c.add_pod(0, "client").unwrap();
    let eps: Vec<_> = backends.iter().map(|b| c.endpoint(*b)).collect();
    c.apply(Service::new("web", VIP, 80, ECHO_PORT).endpoints(eps.clone())).unwrap();
    let vip = SocketAddr::from((VIP, 80));
    let held = c.pod(client).hold(vip, 9, Duration::from_millis(3000), Duration::from_millis(50)).unwrap();

    let started = Instant::now();
    c.apply(Service::new("web", VIP, 80, ECHO_PORT).endpoints(eps[..2].to_vec())).unwrap();
    let synced = started.elapsed();
    let after = c.pod(client).tcp(vip, 30).unwrap();
    let counts = tally(&after);
    assert!(synced < Duration::from_secs(1), "every agent synced the removal only after {synced:?}");
    assert!(!counts.contains_key("web-3"), "the removed backend still got new connections: {counts:?}");
    assert!(after.iter().all(|r| r.is_ok()), "{counts:?}");

    let held = held.finish().unwrap();
    let survivors: Vec<_> = held.iter().filter(|h| h.pod != "web-3").collect();
    assert!(!survivors.is_empty(), "no held connection landed on a remaining backend: {held:?}");
    for h in survivors {
        assert_eq!(h.failed, None, "a connection to {} broke: {h:?}", h.pod);
        assert!(h.asked > 20, "{h:?}");
    }
}

#[test]
fn agent_restart_under_load_loses_no_connection() {
    if !require_kernel() {
        return;
    }
    // While the harness stands in for attaching the programs (tests/src/cluster/datapath.rs) the
    // attachments belong to the test process and survive the kill by construction; what this then
    // checks is that the restarted agent adopts the pinned maps (no flush, no re-numbering that
    // would break conntrack or affinity). Once the agent attaches (and pins its links) itself, the
    // same test covers link adoption too.
    let mut c = Cluster::start(3).unwrap();
    let backends = three_backends(&mut c);
    let client = c.add_pod(0, "client").unwrap();
    let eps: Vec<_> = backends.iter().map(|b| c.endpoint(*b)).collect();
    c.apply(Service::new("web", VIP, 80, ECHO_PORT).node_port(NODE_PORT).endpoints(eps)).unwrap();
    let vip = SocketAddr::from((VIP, 80));
    let nodeport = SocketAddr::from((c.nodes[0].ip, NODE_PORT));
    // Long-lived connections through both paths of node-1: socket LB (Pod -> ClusterIP) and XDP
    // with conntrack and SNAT (external client -> NodePort, some to remote backends).
    let duration = Duration::from_millis(4000);
    let pod_conns = c.pod(client).hold(vip, 6, duration, Duration::from_millis(50)).unwrap();
    let ext_conns = c.client.hold(nodeport, 6, duration, Duration::from_millis(50)).unwrap();

    c.nodes[0].kill_agent();
    // While the agent is down the pinned programs and maps keep serving new connections too.
    let during = [c.pod(client).tcp(vip, 10).unwrap(), c.client.tcp(nodeport, 10).unwrap()].concat();
    c.nodes[0].start_agent().unwrap();
    let after = [c.pod(client).tcp(vip, 10).unwrap(), c.client.tcp(nodeport, 10).unwrap()].concat();
    assert!(during.iter().all(|r| r.is_ok()), "new connections while the agent was down: {:?}", tally(&during));
    assert!(after.iter().all(|r| r.is_ok()), "new connections after the restart: {:?}", tally(&after));

    for (path, held) in [("pod -> ClusterIP", pod_conns.finish().unwrap()), ("client -> NodePort", ext_conns.finish().unwrap())] {
        assert_eq!(held.len(), 6, "{path}: {held:?}");
        for h in &held {
            assert_eq!(h.failed, None, "{path}: a connection broke across the agent restart: {h:?}");
        }
    }
}
