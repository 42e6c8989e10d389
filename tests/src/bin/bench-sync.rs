//! `cargo xtask bench sync`: the agent's sync path at 10k ClusterIP Services x 10 endpoints, from
//! the standalone source (issue 5, "Benchmark").
//!
//! The real `dataplane-agent run --manifests DIR` (release, built next to this binary) runs inside
//! a test network namespace with a test pin directory. Measured:
//! - `full_sync_ms`: process start -> `/readyz` 200 with every frontend and backend present in the
//!   pinned maps (checked from here with aya, not taken from the agent's word); median of
//!   `STARTS` starts, each on fresh pins (a restart on existing pins is a different path).
//! - `change_p50_ms` / `change_p99_ms`: one endpoint's `ready` flipped in its file (written
//!   beside and renamed over, as editors and ConfigMap updates do) -> the frontend's active
//!   backend count in the pinned map reflects it; polled from here.
//! - `rss_mib`: the agent's VmHWM after all of the above.
//!
//! Baseline: `iptables-restore` of the ruleset kube-proxy (iptables mode) writes for the same
//! Services and endpoints, into the same test namespace: the time kube-proxy needs to program a
//! full sync on this machine. It is only a loose comparison (kube-proxy's own parse and
//! computation are not in it), so it is reported as a ratio without a goal.
use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use dataplane_agent::maps::{
    Source,
    lb::{Frontend, LbMaps, Proto, Scope},
};
use dataplane_common::lb::{self, FrontendKey, Ip4};
use dataplane_tests::{
    bench::{Report, median, percentile},
    bpffs::PinDir,
    cluster,
    netns::NetNs,
    require_kernel,
    scratch::TempDir,
};

const SERVICES: usize = 10_000;
const ENDPOINTS: usize = 10;
/// A manifests directory split per team/app the way an operator keeps it: 10 files of 1,000
/// Services with their EndpointSlices (~2.6 MB each).
const FILES: usize = 10;
const STARTS: usize = 3;
const CHANGES: usize = 20;
const LISTEN: &str = "127.0.0.1:9964";
/// The agent's poll interval for the directory: part of every change's latency.
const POLL_MS: &str = "10";
const TIMEOUT: Duration = Duration::from_secs(60);

fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i >> 8) as u8, (i & 0xff) as u8)
}

fn endpoint_ip(i: usize, j: usize) -> Ipv4Addr {
    let n = i * ENDPOINTS + j;
    Ipv4Addr::new(10, 128 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

/// One Service and its EndpointSlice, as the API server would hand them out; `not_ready` marks
/// the endpoint whose `ready` condition is false.
fn service_yaml(out: &mut String, i: usize, not_ready: Option<usize>) {
    let ns = format!("team-{}", i % 50);
    write!(
        out,
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\n  namespace: {ns}\n  labels:\n    app: svc-{i}\n\
         spec:\n  type: ClusterIP\n  clusterIP: {ip}\n  clusterIPs:\n  - {ip}\n  ipFamilies:\n  - IPv4\n  ipFamilyPolicy: SingleStack\n\
         \x20 selector:\n    app: svc-{i}\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    targetPort: 8080\n\
         \x20 sessionAffinity: None\n  internalTrafficPolicy: Cluster\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-abcde\n  namespace: {ns}\n\
         \x20 labels:\n    kubernetes.io/service-name: svc-{i}\n    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io\n\
         addressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:\n",
        ip = cluster_ip(i)
    )
    .unwrap();
    for j in 0..ENDPOINTS {
        let ready = not_ready != Some(j);
        write!(
            out,
            "- addresses:\n  - {addr}\n  conditions:\n    ready: {ready}\n    serving: {ready}\n    terminating: false\n\
             \x20 nodeName: node-{node}\n  targetRef:\n    kind: Pod\n    name: svc-{i}-pod-{j}\n    namespace: {ns}\n",
            addr = endpoint_ip(i, j),
            node = j % 20,
        )
        .unwrap();
    }
}

/// The file holding Services `file * per .. (file + 1) * per`, with `flip` (service, endpoint) not ready.
fn file_yaml(file: usize, flip: Option<(usize, usize)>) -> String {
    let per = SERVICES / FILES;
    let mut out = String::with_capacity(1_300_000);
    for i in file * per..(file + 1) * per {
        service_yaml(&mut out, i, flip.filter(|(s, _)| *s == i).map(|(_, e)| e));
    }
    out
}

fn file_path(dir: &Path, file: usize) -> PathBuf {
    dir.join(format!("apps-{file:02}.yaml"))
}

/// Written beside and renamed over: the agent never sees a half-written file.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn write_manifests(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for f in 0..FILES {
        write_atomically(&file_path(dir, f), &file_yaml(f, None));
    }
    std::fs::write(
        dir.join("nodes.yaml"),
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-0\nspec:\n  podCIDR: 10.244.0.0/24\n  podCIDRs:\n  - 10.244.0.0/24\n\
         status:\n  addresses:\n  - type: InternalIP\n    address: 192.168.77.10\n",
    )
    .unwrap();
}

/// The agent process, killed on drop (also when the benchmark panics).
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cargo_build(package: &str, bin: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet", "-p", package, "--bin", bin])
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building {bin} failed");
    let path = std::env::current_exe().unwrap().parent().unwrap().join(bin);
    assert!(path.exists(), "{} not found next to the benchmark", path.display());
    path
}

fn start_agent(ns: &NetNs, bin: &Path, manifests: &Path, pins: &Path, state: &Path) -> Agent {
    // setns before exec, not `ip netns exec` (which would hide bpffs): see cluster::proc::command.
    let mut cmd = cluster::proc::command(ns.name(), None, bin, &[]).expect("prepare the agent command");
    cmd.args(["run", "--manifests", manifests.to_str().unwrap(), "--manifests-poll-ms", POLL_MS])
        .args(["--pin-dir", pins.to_str().unwrap(), "--state-dir", state.to_str().unwrap()])
        .args(["--no-node-file", "--listen", LISTEN, "--node-name", "node-0", "--log", "warn"])
        .env_remove("NODE_NAME")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    Agent(cmd.spawn().expect("start dataplane-agent"))
}

/// Status code of `GET path` on the agent, from inside the namespace; `None` while it does not answer.
fn http_status(ns: &NetNs, path: &'static str) -> Option<u16> {
    ns.run(move || {
        let mut s = TcpStream::connect(LISTEN).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        buf.split_whitespace().nth(1)?.parse().ok()
    })
}

fn frontend(i: usize) -> Frontend {
    Frontend { addr: SocketAddrV4::new(cluster_ip(i), 80), proto: Proto::Tcp, scope: Scope::External }
}

/// Entries in a pinned hash map with key `K` and value `V`, counted by walking its keys.
fn count_entries<K: aya::Pod, V: aya::Pod>(pins: &Path, name: &str) -> usize {
    let data = aya::maps::MapData::from_pin(pins.join(name)).unwrap();
    let map: aya::maps::HashMap<_, K, V> = aya::maps::Map::from_map_data(data).unwrap().try_into().unwrap();
    map.keys().collect::<Result<Vec<K>, _>>().unwrap().len()
}

fn vm_hwm_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kib / 1024.0
}

/// Start -> ready and all programmed; returns the time and the running agent.
fn timed_start(ns: &NetNs, bin: &Path, manifests: &Path, pins: &Path, state: &Path) -> (f64, Agent) {
    let started = Instant::now();
    let mut agent = start_agent(ns, bin, manifests, pins, state);
    loop {
        if let Some(status) = agent.0.try_wait().unwrap() {
            panic!("dataplane-agent exited during start: {status}");
        }
        assert!(started.elapsed() < TIMEOUT, "agent not ready after {TIMEOUT:?}");
        if http_status(ns, "/readyz") == Some(200) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = started.elapsed().as_secs_f64() * 1000.0;
    let frontends = count_entries::<FrontendKey<Ip4>, lb::Service>(pins, lb::FRONTENDS4_MAP);
    // The backends map is an array indexed by id: count the ids in use, not its slots.
    let backends = LbMaps::open(Source::Pinned(pins)).unwrap().backend_ids().unwrap().len();
    assert_eq!(
        (frontends, backends),
        (SERVICES, SERVICES * ENDPOINTS),
        "ready, but the pinned maps do not hold every frontend and backend"
    );
    (took, agent)
}

/// Flips endpoint `e` of Service `svc` (not ready when `down`), and times until the pinned
/// frontend entry shows the new active count.
fn timed_change(lb: &LbMaps, manifests: &Path, svc: usize, e: usize, down: bool) -> f64 {
    let per = SERVICES / FILES;
    let text = file_yaml(svc / per, down.then_some((svc, e)));
    let want = if down { ENDPOINTS - 1 } else { ENDPOINTS } as u16;
    let fe = frontend(svc);
    write_atomically(&file_path(manifests, svc / per), &text);
    let started = Instant::now();
    loop {
        let entry = lb.service_entry(&fe).unwrap().expect("frontend present");
        if entry.active == want {
            return started.elapsed().as_secs_f64() * 1000.0;
        }
        assert!(started.elapsed() < TIMEOUT, "change to svc-{svc} not visible after {TIMEOUT:?}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// kube-proxy's iptables-mode nat table for the same Services (chains and rules shaped as
/// pkg/proxy/iptables/proxier.go writes them: KUBE-SERVICES -> KUBE-SVC-* with probability
/// rules -> KUBE-SEP-* with masquerade mark and DNAT), as one `iptables-restore` input.
fn kube_proxy_ruleset() -> String {
    let mut chains = String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-NODEPORTS - [0:0]\n");
    let mut rules = String::from(
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    for i in 0..SERVICES {
        let ns = format!("team-{}", i % 50);
        let svc_chain = format!("KUBE-SVC-{:016X}", 0x5356_0000_0000_0000u64 | i as u64);
        writeln!(chains, ":{svc_chain} - [0:0]").unwrap();
        writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{ns}/svc-{i}:http cluster IP\" -m tcp -p tcp -d {}/32 --dport 80 -j {svc_chain}",
            cluster_ip(i)
        )
        .unwrap();
        writeln!(
            rules,
            "-A {svc_chain} -m comment --comment \"{ns}/svc-{i}:http cluster IP\" -m tcp -p tcp -d {}/32 --dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ",
            cluster_ip(i)
        )
        .unwrap();
        for j in 0..ENDPOINTS {
            let sep = format!("KUBE-SEP-{:016X}", 0x5345_0000_0000_0000u64 | (i * ENDPOINTS + j) as u64);
            writeln!(chains, ":{sep} - [0:0]").unwrap();
            let addr = endpoint_ip(i, j);
            let left = ENDPOINTS - j;
            if left > 1 {
                writeln!(
                    rules,
                    "-A {svc_chain} -m comment --comment \"{ns}/svc-{i}:http -> {addr}:8080\" -m statistic --mode random --probability {:.11} -j {sep}",
                    1.0 / left as f64
                )
                .unwrap();
            } else {
                writeln!(rules, "-A {svc_chain} -m comment --comment \"{ns}/svc-{i}:http -> {addr}:8080\" -j {sep}").unwrap();
            }
            writeln!(rules, "-A {sep} -m comment --comment \"{ns}/svc-{i}:http\" -s {addr}/32 -j KUBE-MARK-MASQ").unwrap();
            writeln!(rules, "-A {sep} -m comment --comment \"{ns}/svc-{i}:http\" -m tcp -p tcp -j DNAT --to-destination {addr}:8080").unwrap();
        }
    }
    rules.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n");
    chains + &rules
}

/// One `iptables-restore` of the whole ruleset into `ns` (a fresh namespace each time, so every
/// run starts from empty tables as a kube-proxy start would).
fn timed_iptables_restore(ruleset: &str) -> f64 {
    let ns = NetNs::new();
    let mut cmd = cluster::proc::command(ns.name(), None, Path::new("iptables-restore"), &[]).expect("prepare iptables-restore");
    cmd.arg("-w").stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().expect("start iptables-restore");
    child.stdin.take().unwrap().write_all(ruleset.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let took = started.elapsed().as_secs_f64() * 1000.0;
    assert!(out.status.success(), "iptables-restore failed: {}", String::from_utf8_lossy(&out.stderr));
    took
}

fn main() {
    assert!(require_kernel(), "the sync benchmark needs root and a BPF-capable kernel");
    let bin = cargo_build("dataplane-agent", "dataplane-agent");
    let tmp = TempDir::new();
    let manifests = tmp.0.join("manifests");
    write_manifests(&manifests);
    let ns = NetNs::new();
    println!("{SERVICES} Services x {ENDPOINTS} endpoints in {FILES} files; agent {}", bin.display());

    let ruleset = kube_proxy_ruleset();
    let mut full = Vec::new();
    let mut iptables = Vec::new();
    let mut last = None;
    for n in 0..STARTS {
        // Interleaved with the agent's starts so both see the same machine state.
        iptables.push(timed_iptables_restore(&ruleset));
        drop(last.take()); // the previous agent and its pins go before the next start
        let pins = PinDir::new();
        let (ms, agent) = timed_start(&ns, &bin, &manifests, pins.path(), &tmp.0.join(format!("state-{n}")));
        println!("start {n}: {ms:.0} ms to ready with all entries; iptables-restore {:.0} ms", iptables[n]);
        full.push(ms);
        last = Some((agent, pins));
    }
    let (agent, pins) = last.as_ref().unwrap();
    let lb = LbMaps::open(Source::Pinned(pins.path())).unwrap();
    let mut changes = Vec::new();
    for c in 0..CHANGES {
        // A different Service (and file) each time; the same one is flipped down then back up.
        let svc = (c / 2 * 337 + 11) % SERVICES;
        changes.push(timed_change(&lb, &manifests, svc, c % ENDPOINTS, c % 2 == 0));
    }
    assert!(agent_alive(agent), "the agent died during the changes");
    let rss = vm_hwm_mib(agent.0.id());

    let full_ms = median(&mut full);
    let ipt_ms = median(&mut iptables);
    let mut report = Report::new("sync");
    report
        .figure("full_sync_ms", full_ms)
        .goal("full_sync_ms", "<= 2000")
        .figure("change_p50_ms", percentile(&mut changes, 50.0))
        .figure("change_p99_ms", percentile(&mut changes, 99.0))
        .goal("change_p99_ms", "<= 50")
        .figure("rss_mib", rss)
        .goal("rss_mib", "<= 150")
        .figure("iptables_restore_full_ms", ipt_ms)
        .ratio("full_sync_vs_iptables_restore", full_ms / ipt_ms);
    report.finish();
}

fn agent_alive(agent: &Agent) -> bool {
    std::fs::metadata(format!("/proc/{}", agent.0.id())).is_ok()
        && !std::fs::read_to_string(format!("/proc/{}/stat", agent.0.id())).unwrap_or_default().contains(") Z ")
}
