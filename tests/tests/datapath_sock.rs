//! Socket-level load balancing with real sockets: the four cgroup programs attached to a test
//! cgroup that the test process enters, sockets opened inside a test network namespace, real
//! listeners as backends. The VIPs have no address and no route: only the rewrite reaches them.
use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::mpsc,
    time::{Duration, Instant},
};

use aya::{Ebpf, maps::PerCpuArray};
use dataplane_agent::{
    loader::{self, Config},
    maps::{
        Source,
        lb::{BackendSpec, LbMaps, Proto, Scope, ServiceSpec, frontend},
    },
    stats::read_counter,
};
use dataplane_common::{
    lb::ServiceKind,
    metrics::{Counter, DROPS_MAP, DropReason},
};
use dataplane_tests::{cgroup::Cgroup, netns::NetNs, require_kernel};

const B1: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 1), 8080);
const B2: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 2), 8080);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

struct Fixture {
    // Field order is drop order: programs detach before the cgroup is removed, the namespace last.
    ebpf: Ebpf,
    lb: LbMaps,
    _cgroup: Cgroup,
    ns: NetNs,
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// `Cgroup::enter` moves the whole process: tests sharing a process (plain `cargo test`) must
/// take turns. Under nextest each test has its own process and this never waits.
static ONE_CGROUP_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A namespace with the backend addresses on its loopback, the socket programs attached to a
/// fresh cgroup, and the test process inside that cgroup.
fn setup() -> Fixture {
    let serial = ONE_CGROUP_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ns = NetNs::new();
    for b in [B1, B2] {
        ns.ip(&["addr", "add", &format!("{}/32", b.ip()), "dev", "lo"]);
    }
    let mut ebpf = loader::load_with(None, &Config::default()).expect("load");
    loader::verify_all(&mut ebpf).expect("verify");
    let mut cgroup = Cgroup::new();
    loader::attach_sock(&mut ebpf, cgroup.path()).expect("attach the socket programs to the test cgroup");
    cgroup.enter();
    let mut lb = LbMaps::open(Source::Ebpf(&mut ebpf)).expect("open the service maps");
    lb.upsert_backend(1, BackendSpec { addr: B1, local: true, terminating: false }).unwrap();
    lb.upsert_backend(2, BackendSpec { addr: B2, local: true, terminating: false }).unwrap();
    Fixture { ebpf, lb, _cgroup: cgroup, ns, _serial: serial }
}

fn service(lb: &mut LbMaps, port: u16, proto: Proto, id: u32, active: Vec<u32>, terminating: Vec<u32>, affinity_s: u32) {
    let vip = SocketAddrV4::new(VIP, port);
    lb.set_rev_nat(id, vip).unwrap();
    let spec = ServiceSpec {
        svc_id: id,
        kind: ServiceKind::ClusterIp,
        flags: 0,
        affinity_timeout_s: affinity_s,
        rev_nat_id: id,
        active,
        terminating,
    };
    lb.upsert_service(&frontend(VIP, port, proto, Scope::External), &spec).unwrap();
}

/// TCP listeners on both backends; each accepted connection reports which backend took it and
/// the peer it saw, and is echoed.
fn tcp_backends(ns: &NetNs) -> mpsc::Receiver<(SocketAddrV4, SocketAddr)> {
    let (tx, rx) = mpsc::channel();
    for b in [B1, B2] {
        let l = ns.run(move || TcpListener::bind(b).expect("bind backend"));
        let tx = tx.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let peer = s.peer_addr().unwrap();
                let mut buf = [0u8; 64];
                if let Ok(n) = s.read(&mut buf) {
                    let _ = s.write_all(&buf[..n]);
                }
                if tx.send((b, peer)).is_err() {
                    return;
                }
            }
        });
    }
    rx
}

fn connect(ns: &NetNs, to: SocketAddrV4) -> std::io::Result<TcpStream> {
    ns.run(move || TcpStream::connect_timeout(&to.into(), Duration::from_secs(3)))
}

fn drops(ebpf: &Ebpf, reason: DropReason) -> u64 {
    let arr: PerCpuArray<_, Counter> = PerCpuArray::try_from(ebpf.map(DROPS_MAP).unwrap()).unwrap();
    read_counter(&arr, reason as u32).unwrap().packets
}

#[test]
fn tcp_connect_to_a_vip_reaches_a_backend_and_getpeername_returns_the_vip() {
    if !require_kernel() {
        return;
    }
    let mut f = setup();
    service(&mut f.lb, 80, Proto::Tcp, 1, vec![1, 2], vec![], 0);
    let accepted = tcp_backends(&f.ns);
    let vip = SocketAddrV4::new(VIP, 80);
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..24 {
        let mut s = connect(&f.ns, vip).expect("connect to the VIP is rewritten to a backend");
        assert_eq!(s.peer_addr().unwrap(), SocketAddr::V4(vip), "getpeername shows the VIP, not the backend");
        let msg = format!("hello {i}");
        s.write_all(msg.as_bytes()).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], msg.as_bytes(), "echo through the rewritten connection");
        let (backend, peer) = accepted.recv_timeout(Duration::from_secs(3)).expect("a backend accepted");
        assert_eq!(peer, s.local_addr().unwrap(), "the backend sees the client's own address (no SNAT)");
        seen.insert(backend);
    }
    // Random selection over 24 connects: both backends are used (all on one: p = 2^-23).
    assert_eq!(seen.len(), 2, "both backends used: {seen:?}");
    // A port that is not a frontend is left alone (and refused by the stack: nothing listens).
    let err = connect(&f.ns, SocketAddrV4::new(*B1.ip(), 9)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
}

#[test]
fn udp_round_trip_sees_the_vip_as_its_peer() {
    if !require_kernel() {
        return;
    }
    let mut f = setup();
    service(&mut f.lb, 53, Proto::Udp, 2, vec![1], vec![], 0);
    let server = f.ns.run(|| UdpSocket::bind(B1).unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = server.recv_from(&mut buf) {
            let _ = server.send_to(&buf[..n], from);
        }
    });
    let vip = SocketAddrV4::new(VIP, 53);
    // Unconnected: sendmsg4 rewrites the destination, recvmsg4 the source of the reply.
    let client = f.ns.run(move || {
        let c = UdpSocket::bind("0.0.0.0:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c
    });
    for i in 0..5 {
        let msg = format!("q{i}");
        client.send_to(msg.as_bytes(), vip).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = client.recv_from(&mut buf).expect("reply from the backend");
        assert_eq!(&buf[..n], msg.as_bytes());
        assert_eq!(from, SocketAddr::V4(vip), "the reply appears to come from the VIP");
    }
    // Unconnected datagrams from one socket stick to one backend (two ready ones here).
    let servers: Vec<_> = [B1, B2]
        .map(|b| {
            let s = f.ns.run(move || UdpSocket::bind(SocketAddrV4::new(*b.ip(), 5454)).unwrap());
            s.set_nonblocking(true).unwrap();
            s
        })
        .into();
    f.lb.upsert_backend(3, BackendSpec { addr: SocketAddrV4::new(*B1.ip(), 5454), local: true, terminating: false }).unwrap();
    f.lb.upsert_backend(4, BackendSpec { addr: SocketAddrV4::new(*B2.ip(), 5454), local: true, terminating: false }).unwrap();
    service(&mut f.lb, 54, Proto::Udp, 6, vec![3, 4], vec![], 0);
    let sticky = f.ns.run(|| UdpSocket::bind("0.0.0.0:0").unwrap());
    for _ in 0..16 {
        sticky.send_to(b"d", SocketAddrV4::new(VIP, 54)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut counts = [0usize; 2];
    for (i, s) in servers.iter().enumerate() {
        let mut buf = [0u8; 8];
        while s.recv_from(&mut buf).is_ok() {
            counts[i] += 1;
        }
    }
    counts.sort();
    assert_eq!(counts, [0, 16], "all datagrams of one socket went to one backend");
    // Connected: connect4 rewrites once; peer_addr (getpeername) and recv show the VIP.
    let connected = f.ns.run(move || {
        let c = UdpSocket::bind("0.0.0.0:0").unwrap();
        c.connect(vip).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c
    });
    assert_eq!(connected.peer_addr().unwrap(), SocketAddr::V4(vip));
    connected.send(b"connected").unwrap();
    let mut buf = [0u8; 64];
    let n = connected.recv(&mut buf).expect("reply on the connected socket");
    assert_eq!(&buf[..n], b"connected");
}

#[test]
fn a_service_with_no_endpoint_refuses_at_once() {
    if !require_kernel() {
        return;
    }
    let mut f = setup();
    service(&mut f.lb, 81, Proto::Tcp, 3, vec![], vec![], 0);
    let before = drops(&f.ebpf, DropReason::NoBackend);
    let start = Instant::now();
    let err = connect(&f.ns, SocketAddrV4::new(VIP, 81)).expect_err("connect must fail");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}: ECONNREFUSED, not EPERM or a timeout");
    assert!(start.elapsed() < Duration::from_millis(500), "refused at once, took {:?}", start.elapsed());
    assert_eq!(drops(&f.ebpf, DropReason::NoBackend), before + 1, "counted as no_backend");
    // A UDP frontend without endpoints refuses datagrams the same way.
    service(&mut f.lb, 81, Proto::Udp, 5, vec![], vec![], 0);
    let err = f
        .ns
        .run(|| UdpSocket::bind("0.0.0.0:0").unwrap().send_to(b"x", SocketAddrV4::new(VIP, 81)))
        .expect_err("UDP service without endpoints");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn terminating_backends_serve_only_when_none_is_ready_and_affinity_sticks() {
    if !require_kernel() {
        return;
    }
    let mut f = setup();
    let accepted = tcp_backends(&f.ns);
    let round = |n: usize| {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..n {
            let mut s = connect(&f.ns, SocketAddrV4::new(VIP, 82)).expect("connect");
            s.write_all(b"x").unwrap();
            let (b, _) = accepted.recv_timeout(Duration::from_secs(3)).unwrap();
            seen.insert(b);
        }
        seen
    };
    // B1 ready, B2 terminating: only B1.
    service(&mut f.lb, 82, Proto::Tcp, 4, vec![1], vec![2], 0);
    assert_eq!(round(12), [B1].into());
    // No ready backend: fall back to the serving-terminating one.
    service(&mut f.lb, 82, Proto::Tcp, 4, vec![], vec![2], 0);
    assert_eq!(round(6), [B2].into());
    // Affinity: two ready backends, every connection from this namespace sticks to one.
    service(&mut f.lb, 82, Proto::Tcp, 4, vec![1, 2], vec![], 60);
    assert_eq!(round(16).len(), 1, "sessionAffinity ClientIP keeps one backend");
}
