//! `cargo xtask demo`: a real Kubernetes control plane (kube-apiserver, etcd,
//! kube-controller-manager v1.34.9) and a 3-node virtual cluster on this machine whose agents run
//! on the API server; a sample app behind a ClusterIP and a NodePort Service, real requests through
//! both, and how they were balanced. `--standalone` runs the same with the agents reading a
//! manifests directory instead (no Kubernetes binaries).
//!
//! Everything lives in network namespaces, cgroups and bpffs directories named `dpt-<pid>-<n>`,
//! and is removed at the end, also when a step fails. After a Ctrl-C (no destructors run), the
//! next `cargo xtask test` or `dpt-sweep` removes what is left.
use std::{collections::BTreeMap, net::SocketAddr, time::Instant};

use anyhow::Context;
use dataplane_tests::{
    cluster::{CLIENT_IP, Cluster, ECHO_PORT, Reply, Service, Source, tally},
    k8s::{ControlPlane, Options},
};

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
    let standalone = std::env::args().skip(1).any(|a| a == "--standalone");
    let started = Instant::now();
    let cp = if standalone {
        None
    } else {
        step("starting a real control plane: etcd, kube-apiserver and kube-controller-manager v1.34.9, in their own network namespace");
        let cp = ControlPlane::start(Options::default()).context("starting the control plane")?;
        progress("manifests/rbac.yaml applied; the agents authenticate as ServiceAccount kube-system/dataplane-agent");
        Some(cp)
    };
    let source = cp.as_ref().map_or(Source::Manifests, |cp| Source::Api(&cp.access));
    step(match source {
        Source::Manifests => "starting a 3-node virtual cluster (network namespaces on one bridge, one agent per node reading a manifests directory)",
        _ => "starting a 3-node virtual cluster (network namespaces on one bridge, one agent per node on the API server)",
    });
    let mut c = Cluster::start_with(3, source, progress).context("starting the cluster")?;
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
    progress(&format!("client on {} has IP {}", c.nodes[0].name, c.pod(client).ip));
    let endpoints: Vec<_> = backends.iter().map(|b| c.endpoint(*b)).collect();
    let cluster_ip = c.apply(Service::new("echo", 80, ECHO_PORT).endpoints(endpoints.clone())).context("Service echo")?.vip();
    progress(&format!("Service echo: ClusterIP {cluster_ip}:80 (TCP+UDP) -> :{ECHO_PORT} of the 3 Pods"));
    let node_port = c
        .apply(Service::new("echo-nodeport", 80, ECHO_PORT).node_port().endpoints(endpoints))
        .context("Service echo-nodeport")?
        .node_port
        .context("no NodePort allocated")?;
    progress(&format!("Service echo-nodeport: NodePort {node_port} on every node -> the same 3 Pods"));

    if let Some(cp) = &cp {
        step(&format!("`kubectl get nodes,pods,services,endpointslices -n {}` on the real API server", c.namespace()));
        let mut cmd = cp.access.kubectl();
        cmd.args(["get", "nodes,pods,services,endpointslices", "-o", "wide", "-n", c.namespace()]);
        match cmd.output() {
            Ok(out) => print!("{}", String::from_utf8_lossy(&out.stdout).lines().map(|l| format!("   {l}\n")).collect::<String>()),
            Err(e) => println!("   (could not run kubectl: {e})"),
        }
    }

    step("`dataplane-agent services` on node-1 (read from the pinned eBPF maps)");
    let pins = c.nodes[0].pins.path().display().to_string();
    match c.nodes[0].agent_cli(&["services", "--pin-dir", &pins]) {
        Ok(out) => print!("{}", out.lines().map(|l| format!("   {l}\n")).collect::<String>()),
        Err(e) => println!("   (could not run it: {e})"),
    }

    step(&format!("client Pod -> ClusterIP {cluster_ip}:80, {REQUESTS} TCP connections (socket-level LB, no NAT: backends see the Pod's IP)"));
    let vip = SocketAddr::from((cluster_ip, 80));
    show(&c.pod(client).tcp(vip, REQUESTS)?);
    step(&format!("client Pod -> ClusterIP {cluster_ip}:80, {REQUESTS} UDP datagrams (each from a new socket)"));
    show(&c.pod(client).udp(vip, REQUESTS)?);

    for n in &c.nodes {
        step(&format!(
            "external client {CLIENT_IP} -> NodePort {}:{node_port}, {REQUESTS} TCP connections (XDP on {}'s uplink; remote backends see the node's IP: SNAT)",
            n.ip, n.name
        ));
        show(&c.client.tcp(SocketAddr::from((n.ip, node_port)), REQUESTS)?);
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

    step("tearing down: Pods (CNI DEL), agents, namespaces, cgroups, pins, the control plane");
    drop(c);
    drop(cp);
    println!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
