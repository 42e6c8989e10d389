//! End to end: conntrack lifetimes and the agent's GC on a real cluster. With short lifetimes
//! (`--ct-timeout-*`) and a GC every second, the conntrack table of a node that took a burst of
//! NodePort connections goes back to empty, while connections that stay busy for longer than
//! the established lifetime keep working (their traffic refreshes their entries).
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use dataplane_common::ct::CT4_MAP;
use dataplane_tests::{
    cluster::{Cluster, ECHO_PORT, Node, Service, tally},
    require_kernel,
};

/// Entries in the node's conntrack table, as `dataplane-agent status --output json` reads them
/// from the pins.
fn ct_entries(node: &Node) -> u64 {
    let v = node.status_report().unwrap();
    let row = v["maps"].as_array().unwrap().iter().find(|m| m["name"] == CT4_MAP).cloned();
    row.and_then(|m| m["entries"].as_u64()).unwrap_or_else(|| panic!("no fill level for {CT4_MAP}: {}", v["maps"]))
}

/// The value of the series `name{labels}` in `/metrics` text (0 when absent).
fn sample(text: &str, name: &str, labels: &str) -> f64 {
    let prefix = if labels.is_empty() { format!("{name} ") } else { format!("{name}{{{labels}}} ") };
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

/// Polls `f` every 200 ms until it holds, or fails after `timeout` with the last value.
fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> (bool, String)) {
    let deadline = Instant::now() + timeout;
    loop {
        let (ok, detail) = f();
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "{what} within {timeout:?}: {detail}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn short_lifetimes_empty_the_conntrack_table_after_a_burst_and_keep_busy_connections() {
    if !require_kernel() {
        return;
    }
    let flags = [
        ("--ct-timeout-tcp-syn", Some("5")),
        ("--ct-timeout-tcp-established", Some("5s")),
        ("--ct-timeout-tcp-close", Some("2")),
        ("--ct-timeout-udp", Some("3")),
        ("--ct-gc-interval", Some("1")),
    ];
    let mut c = Cluster::start_with_agent_flags(2, &flags).unwrap();
    let a = c.add_pod(0, "web-1").unwrap();
    let b = c.add_pod(1, "web-2").unwrap();
    let eps = [c.endpoint(a), c.endpoint(b)];
    let node_port = c.apply(Service::new("web", 80, ECHO_PORT).node_port().endpoints(eps)).unwrap().node_port.unwrap();
    let addr = SocketAddr::from((c.nodes[0].ip, node_port));

    // Two connections kept busy (a request every 200 ms) for 20 s: four times the established
    // lifetime, so they live only if their traffic refreshes their entries.
    let held_for = Duration::from_secs(20);
    let held = c.client.hold(addr, 2, held_for, Duration::from_millis(200)).unwrap();
    let started = Instant::now();
    // The burst: 200 TCP connections (to a local and a remote, SNATed backend) and 50 UDP
    // flows (each from a fresh socket): two conntrack entries each.
    let tcp = c.client.tcp(addr, 200).unwrap();
    let udp = c.client.udp(addr, 50).unwrap();
    assert!(tcp.iter().chain(&udp).all(|r| r.is_ok()), "tcp {:?} udp {:?}", tally(&tcp), tally(&udp));
    let node = &c.nodes[0];
    let after_burst = ct_entries(node);
    // Closed TCP flows have 2 s left and may already be gone; the UDP ones have 3 s.
    assert!(after_burst >= 4 + 10, "conntrack after the burst: {after_burst} entries");

    // Back to the two held connections (two entries each) well before they end.
    eventually("the burst's entries deleted", Duration::from_secs(10), || {
        let n = ct_entries(node);
        (n <= 4, format!("{n} entries"))
    });
    assert!(started.elapsed() < held_for, "the held connections ended before the check: {:?}", started.elapsed());
    let metrics = node.metrics().unwrap();
    let deleted = sample(&metrics, "dataplane_ct_gc_deleted_entries_total", "table=\"conntrack\"");
    assert!(deleted >= 2.0 * 250.0 - 4.0, "deleted {deleted}\n{metrics}");
    assert_eq!(sample(&metrics, "dataplane_ct_gc_errors_total", ""), 0.0, "{metrics}");
    assert!(sample(&metrics, "dataplane_ct_gc_runs_total", "") >= 3.0, "{metrics}");
    assert!(metrics.contains("dataplane_ct_gc_duration_seconds_count"), "{metrics}");

    for h in held.finish().unwrap() {
        assert_eq!(h.failed, None, "a busy connection lost its conntrack entry: {h:?}");
        assert!(h.asked >= 50, "{h:?}");
    }
    // Closed now: after the close lifetime the table is empty.
    eventually("the held connections' entries deleted", Duration::from_secs(8), || {
        let n = ct_entries(node);
        (n == 0, format!("{n} entries"))
    });
    let metrics = node.metrics().unwrap();
    assert_eq!(sample(&metrics, "dataplane_ct_gc_alive_entries", "table=\"conntrack\""), 0.0, "{metrics}");
}
