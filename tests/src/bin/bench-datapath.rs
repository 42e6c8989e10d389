//! `cargo xtask bench datapath`: BPF_PROG_RUN nanoseconds per packet of the service path against
//! a floor program (parse + one hash lookup), with 1, 10k and 100k Services in the maps.
//!
//! Paths, all through the XDP uplink program on a LoadBalancer frontend with a local backend:
//! - floor:  `dp_xdp_floor` on the request (parse + one frontend lookup);
//! - miss:   a new connection (conntrack miss, backend selection, two conntrack inserts, DNAT);
//! - hit:    the same flow again (conntrack hit, DNAT);
//! - revnat: the backend's reply (conntrack reply hit, rev-NAT lookup, SNAT back to the frontend,
//!   FIB lookup and redirect towards the outside client).
//!
//! And the conntrack GC: the time (wall and CPU of the one thread) of one sweep of the agent's
//! GC (`maps::batch::sweep_hash` with the conntrack map's expiry test) over 1M entries, all live
//! (what every sweep pays to read the table) and all expired (the worst case: every entry
//! deleted), in a plain 1M-entry hash map of the conntrack key/value (the pinned table is a
//! 256k-entry LRU; it is swept full, half expired, too).
//!
//! Everything runs inside a test network namespace shaped like a node (an uplink veth with a
//! default route via a gateway whose neighbour entry is permanent), so the FIB lookup has a
//! known answer and never consults the host's own routes.
//!
//! Method: every sample is one BPF_PROG_RUN call with repeat = 1, because with repeat > 1 the
//! program re-runs on its own rewritten output (a DNATed packet is no longer the same path) and a
//! miss needs a fresh tuple every time. The kernel's per-run time then includes the same few tens
//! of ns of test-harness overhead for every path, the floor included. Paths are interleaved within
//! each round; a figure is the median over rounds of each round's median.
//!
//! The kernel's clock steps in ~10 ns on the machines we measured, so a single sample is a
//! multiple of ~10 ns; medians of 300 such samples are therefore quantised too (read a change of
//! one step as noise).
//!
//! Reading the miss figure: every miss uses a tuple never seen before, so its conntrack lookup and
//! its two conntrack inserts (LRU, preallocated, 256k entries) touch cold buckets and elements.
//! Measured by compiling parts out (docs/datapath.md): of a ~750-900 ns miss, the two inserts are
//! ~400 ns and the cold lookup ~120-200 ns; with both gone (the lookup made to hit a warm bucket)
//! the miss is ~250 ns, about 2x the floor. A preallocated plain hash map instead of the LRU
//! measured the same.
//!
//! Socket LB (`sock_*` figures): real connect()s through a ClusterIP from a test cgroup in a test
//! namespace (cgroup sock_addr programs have no BPF_PROG_RUN). A sample is the mean cost of 10k
//! TCP connections (connect, accepted and closed by the backend, closed with a RST by the client;
//! the handshake dominates), or of 10k UDP sockets connect()ed and closed (which shows what the
//! connect4 hook itself costs), each interleaved with as many straight to the backend address
//! (the programs run but rewrite nothing). Measured when the socket-LB state is empty and again
//! after 500k more TCP connections: the ratio after/start shows whether a connect pays for the
//! connections made before it (the per-socket state is freed with each socket; the LRU map it
//! replaced was full after 65,536 connects, and every later connect evicted an entry).
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use aya::programs::Xdp;
use dataplane_agent::{
    loader::{self, Config},
    maps::{
        Source,
        batch::sweep_hash,
        ct::CtMap,
        lb::{BackendSpec, LbMaps, Proto, Scope, ServiceSpec, frontend},
    },
};
use dataplane_common::{
    ct::{CtEntry, CtKey},
    lb::ServiceKind,
};
use dataplane_tests::{
    bench::{Report, median},
    cgroup::Cgroup,
    netns::{NetNs, Veth},
    packet::{self, L4},
    prog_run,
    sockets::{closing_listener, short_connections, udp_connects},
};

const ROUNDS: usize = 7;
const PER_ROUND: usize = 300;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

const LB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), 80);
const BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 20), 8080);

fn syn(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    packet::ipv4(*src.ip(), *dst.ip(), L4::TcpSyn { sport: src.port(), dport: dst.port(), seq: 1 }, b"")
}

/// Loads fresh programs and fills the maps with `services` frontends (the measured one among them).
fn setup(services: u32) -> (aya::Ebpf, LbMaps, CtMap) {
    let cfg = Config { node_ips: vec![Ipv4Addr::new(192, 168, 1, 10)], ..Config::default() };
    let mut ebpf = loader::load_with(None, &cfg).expect("load");
    loader::verify_all(&mut ebpf).expect("verify");
    let mut lb = LbMaps::open(Source::Ebpf(&mut ebpf)).expect("service maps");
    let ct = CtMap::open(Source::Ebpf(&mut ebpf)).expect("conntrack map");
    for b in 1..=16u32 {
        let addr = SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 20 + b as u8 - 1), 8080);
        lb.upsert_backend(b, BackendSpec { addr, local: true, terminating: false }).unwrap();
    }
    let spec = |id: u32, backends: Vec<u32>| ServiceSpec {
        svc_id: id,
        kind: ServiceKind::LoadBalancer,
        flags: 0,
        affinity_timeout_s: 0,
        rev_nat_id: id,
        active: backends,
        terminating: vec![],
    };
    lb.set_rev_nat(1, LB).unwrap();
    lb.upsert_service(&frontend(*LB.ip(), LB.port(), Proto::Tcp, Scope::External), &spec(1, vec![1])).unwrap();
    for i in 2..=services {
        // ClusterIP-like fillers spread over 10.96.0.0/12, two backends each.
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i);
        lb.set_rev_nat(i, SocketAddrV4::new(ip, 80)).unwrap();
        let fe = frontend(ip, 80, Proto::Tcp, Scope::External);
        lb.upsert_service(&fe, &spec(i, vec![1 + i % 16, 1 + (i + 1) % 16])).unwrap();
    }
    (ebpf, lb, ct)
}

fn ns(prog: &Xdp, frame: &[u8], verdict: u32, expect: Option<&[u8]>) -> f64 {
    let out = prog_run::run(prog, frame);
    assert_eq!(out.verdict, verdict, "unexpected verdict");
    if let Some(want) = expect {
        assert_eq!(out.data, want, "the path did not rewrite as expected");
    }
    out.ns_per_run as f64
}

fn mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn main() {
    dataplane_tests::kernel_available().unwrap_or_else(|e| panic!("bench-datapath needs the kernel: {e}"));
    let node = NetNs::new();
    let peer = NetNs::new();
    let _uplink = Veth::new(&node, "up0", &peer, "eth0");
    node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    node.ip(&["link", "set", "up0", "address", &mac(NODE_MAC)]);
    node.ip(&["addr", "add", "192.168.1.10/24", "dev", "up0"]);
    node.ip(&["neigh", "add", "192.168.1.1", "lladdr", &mac(GATEWAY_MAC), "dev", "up0", "nud", "permanent"]);
    node.ip(&["route", "add", "default", "via", "192.168.1.1", "dev", "up0"]);
    let mut report = node.run(measure);
    sock_connect(&mut report);
    report.finish();
}

/// Connections per sample, samples per phase, and the connections made between the phases.
const SOCK_SAMPLE: usize = 10_000;
const SOCK_ROUNDS: usize = 5;
const SOCK_CHURN: usize = 500_000;

/// The socket LB's connect() cost at the start and after [`SOCK_CHURN`] connections, against
/// connections that are not rewritten. Runs the programs on a cgroup of its own, entered by this
/// process for the duration.
fn sock_connect(report: &mut Report) {
    let ns = NetNs::new();
    let backend = SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 1), 8080);
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
    ns.ip(&["addr", "add", "10.200.0.1/32", "dev", "lo"]);
    let mut ebpf = loader::load_with(None, &Config::default()).expect("load");
    loader::verify_all(&mut ebpf).expect("verify");
    let mut cgroup = Cgroup::new();
    loader::attach_sock(&mut ebpf, cgroup.path()).expect("attach the socket programs to the bench cgroup");
    cgroup.enter();
    let mut lb = LbMaps::open(Source::Ebpf(&mut ebpf)).expect("service maps");
    lb.upsert_backend(1, BackendSpec { addr: backend, local: true, terminating: false }).unwrap();
    lb.set_rev_nat(1, vip).unwrap();
    let spec = ServiceSpec {
        svc_id: 1,
        kind: ServiceKind::ClusterIp,
        flags: 0,
        affinity_timeout_s: 0,
        rev_nat_id: 1,
        active: vec![1],
        terminating: vec![],
    };
    lb.upsert_service(&frontend(*vip.ip(), vip.port(), Proto::Tcp, Scope::External), &spec).unwrap();
    let udp = ServiceSpec { svc_id: 2, rev_nat_id: 2, ..spec };
    lb.set_rev_nat(2, vip).unwrap();
    lb.upsert_service(&frontend(*vip.ip(), vip.port(), Proto::Udp, Scope::External), &udp).unwrap();
    closing_listener(&ns, backend);
    let per_connect = |d: Duration| d.as_nanos() as f64 / SOCK_SAMPLE as f64;
    // Medians over the rounds of: TCP via the VIP, TCP direct, UDP via the VIP, UDP direct.
    let phase = || {
        let mut samples: [Vec<f64>; 4] = Default::default();
        for _ in 0..SOCK_ROUNDS {
            samples[0].push(per_connect(short_connections(&ns, vip, SOCK_SAMPLE)));
            samples[1].push(per_connect(short_connections(&ns, backend, SOCK_SAMPLE)));
            samples[2].push(per_connect(udp_connects(&ns, vip, SOCK_SAMPLE)));
            samples[3].push(per_connect(udp_connects(&ns, backend, SOCK_SAMPLE)));
        }
        samples.map(|mut s| median(&mut s))
    };
    let start = phase();
    let churn = short_connections(&ns, vip, SOCK_CHURN);
    let after = phase();
    report.figure("sock_churn_500k_s", churn.as_secs_f64());
    for (i, what) in ["tcp_connect", "tcp_connect_direct", "udp_connect", "udp_connect_direct"].iter().enumerate() {
        report.figure(&format!("sock_{what}_start_ns"), start[i]);
        report.figure(&format!("sock_{what}_after_500k_ns"), after[i]);
    }
    for (i, what) in [(0, "tcp_connect"), (2, "udp_connect")] {
        report.ratio(&format!("sock_{what}_after_500k_vs_start"), after[i] / start[i]);
        report.ratio(&format!("sock_{what}_vs_direct"), after[i] / after[i + 1]);
        // "Does not grow": within the noise between runs (up to ~1.3x here).
        report.goal(&format!("sock_{what}_after_500k_vs_start"), "<= 1.3");
    }
    drop(lb);
    // Programs detach before the cgroup goes (and this process leaves it).
    drop(ebpf);
    drop(cgroup);
}

fn measure() -> Report {
    let mut report = Report::new("datapath");
    for (label, services) in [("1", 1u32), ("10k", 10_000), ("100k", 100_000)] {
        let (ebpf, _lb, ct) = setup(services);
        let lb_prog: &Xdp = ebpf.program(loader::programs::XDP_INGRESS).unwrap().try_into().unwrap();
        let floor_prog: &Xdp = ebpf.program(loader::programs::XDP_FLOOR).unwrap().try_into().unwrap();
        let client = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 5), 40000);
        let request = syn(client, LB);
        let dnat = syn(client, BACKEND);
        let reply = syn(BACKEND, client);
        let mut reply_nat = syn(LB, client);
        reply_nat[0..6].copy_from_slice(&GATEWAY_MAC);
        reply_nat[6..12].copy_from_slice(&NODE_MAC);
        // Establish the flow the hit and revnat paths use.
        ns(lb_prog, &request, XDP_PASS, Some(&dnat));
        let mut rounds: [Vec<f64>; 4] = Default::default();
        let mut next_port: u32 = 0;
        for _ in 0..ROUNDS {
            let mut samples: [Vec<f64>; 4] = Default::default();
            for _ in 0..PER_ROUND {
                samples[0].push(ns(floor_prog, &request, XDP_PASS, Some(&request)));
                // A fresh tuple every time: a new source address/port pair.
                next_port += 1;
                let src = SocketAddrV4::new(Ipv4Addr::from(0xc633_6400 + (next_port >> 14)), 1024 + (next_port & 0x3fff) as u16);
                samples[1].push(ns(lb_prog, &syn(src, LB), XDP_PASS, Some(&syn(src, BACKEND))));
                samples[2].push(ns(lb_prog, &request, XDP_PASS, Some(&dnat)));
                samples[3].push(ns(lb_prog, &reply, XDP_REDIRECT, Some(&reply_nat)));
            }
            for (r, s) in rounds.iter_mut().zip(samples.iter_mut()) {
                r.push(median(s));
            }
        }
        let flows = ct.dump().expect("conntrack dump").len();
        assert!(flows >= 2 * (ROUNDS * PER_ROUND), "every miss created its entries ({flows})");
        let [floor, miss, hit, revnat] = rounds.map(|mut r| median(&mut r));
        report.figure(&format!("floor_{label}_ns"), floor);
        report.figure(&format!("miss_{label}_ns"), miss);
        report.figure(&format!("hit_{label}_ns"), hit);
        report.figure(&format!("revnat_{label}_ns"), revnat);
        report.ratio(&format!("miss_{label}_vs_floor"), miss / floor);
        report.ratio(&format!("hit_{label}_vs_floor"), hit / floor);
        report.ratio(&format!("revnat_{label}_vs_floor"), revnat / floor);
        report.goal(&format!("miss_{label}_vs_floor"), "<= 2.0");
        report.goal(&format!("hit_{label}_vs_floor"), "<= 1.5");
    }
    gc_sweeps(&mut report);
    for path in ["floor", "miss", "hit", "revnat"] {
        let one = report.figures[&format!("{path}_1_ns")];
        let big = report.figures[&format!("{path}_100k_ns")];
        report.ratio(&format!("{path}_100k_vs_1"), big / one);
        // "No growth beyond noise": noise between runs here is up to ~1.3x (../shared/TOOLCHAIN.md).
        report.goal(&format!("{path}_100k_vs_1"), "<= 1.3");
    }
    report
}

/// CPU time (user + system) this thread has used.
fn thread_cpu() -> std::time::Duration {
    // SAFETY: getrusage fills a plain struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid rusage to fill.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
    let tv = |t: libc::timeval| std::time::Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn ct_key(i: u32) -> CtKey<u32> {
    CtKey { saddr: 0x0a00_0000 + i, daddr: 0xc633_6407, sport_be: (1024 + (i & 0x7fff) as u16).to_be(), dport_be: 80u16.to_be(), proto: 6, _pad: [0; 3] }
}

fn ct_entry(expires_s: u32) -> CtEntry<u32> {
    CtEntry { nat_addr: 1, orig_addr: 2, nat_port_be: 3, orig_port_be: 4, backend_id: 5, rev_nat_id: 6, flags: 0, dir: 0, state: 1, _pad: 0, expires_s }
}

/// One GC sweep of `map` at `now`: (wall ms, CPU ms, entries seen, entries deleted).
fn sweep_once(map: &mut aya::maps::HashMap<aya::maps::MapData, CtKey<u32>, CtEntry<u32>>, now: u32) -> (f64, f64, u64, u64) {
    let (t, c) = (std::time::Instant::now(), thread_cpu());
    let s = sweep_hash(map, |_, e| dataplane_common::ct::expired(e.expires_s, now)).expect("sweep");
    assert!(s.batched, "the batch syscalls work here");
    ((t.elapsed().as_secs_f64()) * 1e3, (thread_cpu() - c).as_secs_f64() * 1e3, s.seen, s.deleted)
}

fn gc_sweeps(report: &mut Report) {
    const N: u32 = 1 << 20;
    const REPS: usize = 3;
    let now = dataplane_agent::maps::ct::now_s();
    let mut map: aya::maps::HashMap<aya::maps::MapData, CtKey<u32>, CtEntry<u32>> =
        aya::maps::HashMap::create(N, 0).expect("a 1M-entry hash map");
    let fill = |map: &mut aya::maps::HashMap<_, _, _>, expires: u32| {
        for i in 0..N {
            map.insert(ct_key(i), ct_entry(expires), 0).unwrap();
        }
    };
    fill(&mut map, now + 3600);
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..REPS {
        let (w, c, seen, deleted) = sweep_once(&mut map, now);
        assert_eq!((seen, deleted), (u64::from(N), 0));
        wall.push(w);
        cpu.push(c);
    }
    report.figure("gc_sweep_1m_live_ms", median(&mut wall));
    report.figure("gc_sweep_1m_live_cpu_ms", median(&mut cpu));
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..REPS {
        fill(&mut map, now - 1);
        let (w, c, seen, deleted) = sweep_once(&mut map, now);
        assert_eq!((seen, deleted), (u64::from(N), u64::from(N)));
        wall.push(w);
        cpu.push(c);
    }
    report.figure("gc_sweep_1m_expired_ms", median(&mut wall));
    report.figure("gc_sweep_1m_expired_cpu_ms", median(&mut cpu));
    report.goal("gc_sweep_1m_expired_cpu_ms", "<= 1000");
    drop(map);

    // The pinned table itself (LRU, 256k), full, every other entry expired.
    let cfg = Config::default();
    let mut ebpf = loader::load_with(None, &cfg).expect("load");
    let mut ct = CtMap::open(Source::Ebpf(&mut ebpf)).expect("conntrack map");
    let mut wall = Vec::new();
    let mut seen_total = 0;
    for _ in 0..REPS {
        for i in 0..dataplane_common::ct::CT_MAX {
            ct.insert(ct_key(i), ct_entry(if i % 2 == 0 { now - 1 } else { now + 3600 })).unwrap();
        }
        let t = std::time::Instant::now();
        let s = ct.sweep(now).expect("sweep");
        wall.push(t.elapsed().as_secs_f64() * 1e3);
        seen_total += s.seen;
    }
    report.figure("gc_sweep_ct_256k_half_expired_ms", median(&mut wall));
    report.figure("gc_sweep_ct_256k_entries_seen", (seen_total / REPS as u64) as f64);
}
