//! `cargo xtask demo`: a 3-node virtual cluster on this machine, a sample app behind a ClusterIP
//! and a NodePort Service, real requests through both, and how they were balanced.
//!
//! Everything lives in network namespaces, cgroups and bpffs directories named `dpt-<pid>-<n>`,
//! and is removed at the end, also when a step fails. After a Ctrl-C (no destructors run), the
//! next `cargo xtask test` or `dpt-sweep` removes what is left.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::Instant,
};

use anyhow::Context;
use dataplane_tests::cluster::{CLIENT_IP, Cluster, ECHO_PORT, Reply, Service, tally};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODEPORT_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const NODE_PORT: u16 = 30080;
const REQUESTS: u32 = 30;

fn step(msg: &str) {
    println!("\n== {msg}");
}

fn progress(msg: &str) {
    println!("   .. {msg}");
}

/// One table row per backend: how many requests it answered, and which client address it saw.
fn show(replies: &[Reply]) {
    let counts = tally(replies);
    let mut seen: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for r in replies {
        if let Reply::Ok { pod, client } = r {
            let ip = client.ip().to_string();
            let list = seen.entry(pod).or_default();
            if !list.contains(&ip) {
                list.push(ip);
            }
        }
    }
    for (who, n) in &counts {
        let bar = "#".repeat(*n);
        match seen.get(who.as_str()) {
            Some(ips) => println!("     {who:<8} {n:>3}  {bar:<30} saw client {}", ips.join(", ")),
            None => println!("     {who:<8} {n:>3}  (failed: {})", replies.iter().find_map(|r| match r {
                Reply::Err { kind, detail } if format!("!{kind}") == *who => Some(detail.as_str()),
                _ => None,
            }).unwrap_or("")),
        }
    }
}

fn main() -> anyhow::Result<()> {
    dataplane_tests::kernel_available().map_err(|e| anyhow::anyhow!("the demo needs root and a BPF kernel: {e}"))?;
    let started = Instant::now();
    step("starting a 3-node virtual cluster (network namespaces on one bridge, one agent per node)");
    let mut c = Cluster::start_with(3, progress).context("starting the cluster")?;
    for n in &c.nodes {
        progress(&format!("{} is up: InternalIP {}, podCIDR {}, agent synced", n.name, n.ip, n.pod_cidr));
    }

    step("deploying the sample app: 3 echo Pods (one per node, created by the dataplane-cni plugin) and a client Pod");
    let mut backends = Vec::new();
    for i in 0..3 {
        let id = c.add_pod(i, &format!("echo-{i}")).with_context(|| format!("creating echo-{i}"))?;
        let p = c.pod(id);
        progress(&format!("{} on {} has IP {}", p.name, p.node, p.ip));
        backends.push(id);
    }
    let client = c.add_pod(0, "client").context("creating the client Pod")?;
    progress(&format!("client on node-1 has IP {}", c.pod(client).ip));
    let endpoints: Vec<_> = backends.iter().map(|b| c.endpoint(*b)).collect();
    c.apply(Service::new("echo", CLUSTER_IP, 80, ECHO_PORT).endpoints(endpoints.clone())).context("Service echo")?;
    progress(&format!("Service echo: ClusterIP {CLUSTER_IP}:80 (TCP+UDP) -> :{ECHO_PORT} of the 3 Pods"));
    c.apply(Service::new("echo-nodeport", NODEPORT_CLUSTER_IP, 80, ECHO_PORT).node_port(NODE_PORT).endpoints(endpoints))
        .context("Service echo-nodeport")?;
    progress(&format!("Service echo-nodeport: NodePort {NODE_PORT} on every node -> the same 3 Pods"));

    step("`dataplane-agent services` on node-1 (read from the pinned eBPF maps)");
    let pins = c.nodes[0].pins.path().display().to_string();
    match c.nodes[0].agent_cli(&["services", "--pin-dir", &pins]) {
        Ok(out) => print!("{}", out.lines().map(|l| format!("   {l}\n")).collect::<String>()),
        Err(e) => println!("   (could not run it: {e})"),
    }

    step(&format!("client Pod -> ClusterIP {CLUSTER_IP}:80, {REQUESTS} TCP connections (socket-level LB, no NAT: backends see the Pod's IP)"));
    let vip = SocketAddr::from((CLUSTER_IP, 80));
    show(&c.pod(client).tcp(vip, REQUESTS)?);
    step(&format!("client Pod -> ClusterIP {CLUSTER_IP}:80, {REQUESTS} UDP datagrams (each from a new socket)"));
    show(&c.pod(client).udp(vip, REQUESTS)?);

    for n in &c.nodes {
        step(&format!(
            "external client {CLIENT_IP} -> NodePort {}:{NODE_PORT}, {REQUESTS} TCP connections (XDP on {}'s uplink; remote backends see the node's IP: SNAT)",
            n.ip, n.name
        ));
        show(&c.client.tcp(SocketAddr::from((n.ip, NODE_PORT)), REQUESTS)?);
    }

    step("node-1's /metrics after that traffic: per-Service counters (non-zero series) and drops by reason");
    match c.nodes[0].metrics() {
        Ok(text) => {
            let shown: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("dataplane_service_") || l.starts_with("dataplane_drops_total"))
                .filter(|l| l.rsplit(' ').next().is_some_and(|v| v != "0"))
                .collect();
            for l in &shown {
                println!("   {l}");
            }
            if shown.is_empty() {
                println!("   (no non-zero per-Service or drop series)");
            }
        }
        Err(e) => println!("   (could not scrape it: {e})"),
    }

    step("tearing down: Pods (CNI DEL), agents, namespaces, cgroups, pins");
    drop(c);
    println!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
