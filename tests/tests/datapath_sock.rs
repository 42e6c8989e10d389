//! Socket-level load balancing with real sockets: the four cgroup programs attached to a test
//! cgroup that the test process enters, sockets opened inside a test network namespace, real
//! listeners as backends. The VIPs have no address and no route: only the rewrite reaches them.
use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd,
    sync::mpsc,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{PerCpuArray, SkStorage},
};
use dataplane_agent::{
    loader::{self, Config},
    maps::{
        Source,
        lb::{BackendSpec, LbMaps, Proto, Scope, ServiceSpec, frontend},
    },
    stats::read_counter,
};
use dataplane_common::{
    lb::{Ip4, SOCK_LB_SLOTS, SOCK_LB4_MAP, ServiceKind, SockLbState},
    metrics::{Counter, DROPS_MAP, DropReason},
};
use dataplane_tests::{
    bpffs::PinDir,
    cgroup::Cgroup,
    netns::NetNs,
    require_kernel, sock_diag,
    sockets::{closing_listener, short_connections},
};

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

/// The socket LB's per-socket state, as user space can read it: looked up by socket.
fn sock_state(ebpf: &Ebpf, socket: &impl std::os::fd::AsRawFd) -> Option<SockLbState<Ip4>> {
    let map: SkStorage<_, SockLbState<Ip4>> = SkStorage::try_from(ebpf.map(SOCK_LB4_MAP).expect("the socket-LB map")).unwrap();
    match map.get(socket, 0) {
        Ok(v) => Some(v),
        Err(aya::maps::MapError::KeyNotFound) => None,
        Err(e) => panic!("reading the socket's storage: {e}"),
    }
}

/// The TCP sockets in the namespace that hold socket-LB state: the kernel's sock_diag dump, the
/// only way to enumerate a socket-storage map.
fn tcp_holders(f: &Fixture) -> Vec<sock_diag::Holder> {
    let map = f.ebpf.map(SOCK_LB4_MAP).expect("the socket-LB map");
    let aya::maps::Map::SkStorage(data) = map else { panic!("{SOCK_LB4_MAP} is not socket storage: {map:?}") };
    let fd = data.fd().as_fd().try_clone_to_owned().unwrap();
    f.ns.run(move || sock_diag::tcp_holders(fd.as_fd()).expect("sock_diag dump"))
}

fn state_of(h: &sock_diag::Holder) -> SockLbState<Ip4> {
    assert_eq!(h.value.len(), std::mem::size_of::<SockLbState<Ip4>>(), "value size");
    // SAFETY: the kernel copied exactly one value of the map's type; every byte pattern is valid.
    unsafe { std::ptr::read_unaligned(h.value.as_ptr().cast()) }
}

fn map_addr(a: SocketAddrV4) -> (u32, u16) {
    (u32::from_ne_bytes(a.ip().octets()), a.port().to_be())
}

/// A listener on `at` whose accepted connections echo until the peer closes.
fn echo_listener(ns: &NetNs, at: SocketAddrV4) {
    let l = ns.run(move || TcpListener::bind(at).expect("bind"));
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// A UDP socket on `at` that echoes every datagram to its sender; returns a handle on it.
fn udp_echo(ns: &NetNs, at: SocketAddrV4) -> UdpSocket {
    let s = ns.run(move || UdpSocket::bind(at).expect("bind"));
    let handle = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
    handle
}

/// Well above the 65,536 entries of the LRU map the socket-LB state used to live in (issue 12:
/// a long-lived connection showed its backend after ~214k short ones).
const SHORT_CONNECTIONS: usize = 300_000;

/// Socket-LB state lives exactly as long as its socket. A long-lived TCP connection, a connected
/// and an unconnected UDP socket, all opened before 300k short connections through another
/// ClusterIP, still see their VIP afterwards (getpeername, recvfrom). Then the long-lived one is
/// the only TCP socket in the namespace holding state: nothing the short connections left behind,
/// nothing for sockets the LB never rewrote (a direct connection, the backends' own sockets).
#[test]
fn state_lives_as_long_as_its_socket_through_300k_short_connections() {
    if !require_kernel() {
        return;
    }
    let mut f = setup();
    let long_be = SocketAddrV4::new(*B2.ip(), 7070);
    let udp_be = SocketAddrV4::new(*B1.ip(), 5353);
    f.lb.upsert_backend(3, BackendSpec { addr: long_be, local: true, terminating: false }).unwrap();
    f.lb.upsert_backend(4, BackendSpec { addr: udp_be, local: true, terminating: false }).unwrap();
    service(&mut f.lb, 80, Proto::Tcp, 1, vec![1], vec![], 0);
    service(&mut f.lb, 81, Proto::Tcp, 2, vec![3], vec![], 0);
    service(&mut f.lb, 53, Proto::Udp, 3, vec![4], vec![], 0);
    closing_listener(&f.ns, B1);
    echo_listener(&f.ns, long_be);
    let udp_server = udp_echo(&f.ns, udp_be);
    let (long_vip, dns_vip) = (SocketAddrV4::new(VIP, 81), SocketAddrV4::new(VIP, 53));

    // No getpeername on the long-lived sockets before the short connections: a lookup would
    // have marked an LRU entry as used (the old design kept such entries much longer).
    let mut long = connect(&f.ns, long_vip).expect("the long-lived connection");
    let echo = |s: &mut TcpStream, label: &str| {
        s.write_all(label.as_bytes()).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], label.as_bytes(), "the long-lived connection reaches its backend");
    };
    echo(&mut long, "before");
    let direct = connect(&f.ns, long_be).expect("a connection straight to a backend");
    let (connected, unconnected) = f.ns.run(move || {
        let c = UdpSocket::bind("0.0.0.0:0").unwrap();
        c.connect(dns_vip).unwrap();
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        for s in [&c, &u] {
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        }
        (c, u)
    });
    unconnected.send_to(b"u", dns_vip).unwrap();
    let mut buf = [0u8; 8];
    let (_, from) = unconnected.recv_from(&mut buf).expect("unconnected UDP reply");
    assert_eq!(from, SocketAddr::V4(dns_vip), "before: an unconnected socket's reply comes from the VIP");
    let udp_round_trip = |label: &str| {
        connected.send(b"c").unwrap();
        let mut buf = [0u8; 8];
        let (_, from) = connected.recv_from(&mut buf).unwrap_or_else(|e| panic!("{label}: connected UDP reply: {e}"));
        assert_eq!(from, SocketAddr::V4(dns_vip), "{label}: a connected socket's reply comes from the VIP");
        assert_eq!(connected.peer_addr().unwrap(), SocketAddr::V4(dns_vip), "{label}: connected UDP getpeername");
        unconnected.send_to(b"u", dns_vip).unwrap();
        let (_, from) = unconnected.recv_from(&mut buf).unwrap_or_else(|e| panic!("{label}: unconnected UDP reply: {e}"));
        assert_eq!(from, SocketAddr::V4(dns_vip), "{label}: an unconnected socket's reply comes from the VIP");
    };

    let took = short_connections(&f.ns, SocketAddrV4::new(VIP, 80), SHORT_CONNECTIONS);
    eprintln!("{SHORT_CONNECTIONS} short connections through the VIP took {took:?}");

    assert_eq!(long.peer_addr().unwrap(), SocketAddr::V4(long_vip), "getpeername after the short connections");
    echo(&mut long, "after");
    udp_round_trip("after");

    // What user space reads for the long-lived socket: the frontend it asked for, the backend.
    let st = sock_state(&f.ebpf, &long).expect("the long-lived socket has state");
    let (fe, fe_port) = map_addr(long_vip);
    let e = st.by_frontend(fe, fe_port).expect("an entry for its frontend");
    assert_eq!((e.backend, e.backend_port_be, e.backend_id, e.rev_nat_id), (map_addr(long_be).0, map_addr(long_be).1, 3, 2));
    assert_eq!(sock_state(&f.ebpf, &direct), None, "a connection the LB did not rewrite has no state");

    let local = |s: SocketAddr| match s {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("{a}"),
    };
    let tcp = tcp_holders(&f);
    assert_eq!(
        tcp.iter().map(|h| h.local).collect::<Vec<_>>(),
        vec![local(long.local_addr().unwrap())],
        "only the long-lived connection holds state: {tcp:?}"
    );
    assert_eq!(state_of(&tcp[0]), st, "sock_diag and the lookup by socket read the same value");
    // sock_diag reports socket storage for TCP sockets only (the kernel's inet_sk_diag_fill skips
    // it for sockets without a connection sock), so the UDP sockets are looked up one by one.
    let (fe, fe_port) = map_addr(dns_vip);
    for (what, s) in [("connected", &connected), ("unconnected", &unconnected)] {
        let st = sock_state(&f.ebpf, s).unwrap_or_else(|| panic!("the {what} UDP socket has state"));
        assert_eq!(st.by_frontend(fe, fe_port).map(|e| e.backend_id), Some(4), "{what}: {st:?}");
    }
    assert_eq!(sock_state(&f.ebpf, &udp_server), None, "the backend's own socket has no state");
}

/// An unconnected UDP socket with datagrams in flight to as many Services as its state holds gets
/// every reply from the right VIP; one more Service takes the oldest slot, and every Service still
/// answers from its VIP when the socket sends before it reads. A connected UDP socket's replies
/// come from the VIP too.
#[test]
fn unconnected_udp_to_several_services_gets_each_reply_from_its_vip() {
    if !require_kernel() {
        return;
    }
    let mut f = setup();
    let services = SOCK_LB_SLOTS as u16 + 1;
    for i in 0..services {
        // Alternating backend addresses, one port per Service: every reply's source is distinct.
        let be = SocketAddrV4::new(*[B1, B2][usize::from(i % 2)].ip(), 6000 + i);
        let id = 10 + u32::from(i);
        f.lb.upsert_backend(id, BackendSpec { addr: be, local: true, terminating: false }).unwrap();
        service(&mut f.lb, 600 + i, Proto::Udp, id, vec![id], vec![], 0);
        udp_echo(&f.ns, be);
    }
    let vip = |i: u16| SocketAddrV4::new(VIP, 600 + i);
    let sock = f.ns.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s
    });
    let recv = |n: usize| {
        let mut got = Vec::new();
        for _ in 0..n {
            let mut buf = [0u8; 8];
            let (len, from) = sock.recv_from(&mut buf).expect("a reply");
            got.push((u16::from_be_bytes(buf[..len].try_into().unwrap()), from));
        }
        got.sort();
        got
    };
    // All slots in flight at once: send to each, then read every reply.
    for i in 0..SOCK_LB_SLOTS as u16 {
        sock.send_to(&i.to_be_bytes(), vip(i)).unwrap();
    }
    let want: Vec<_> = (0..SOCK_LB_SLOTS as u16).map(|i| (i, SocketAddr::V4(vip(i)))).collect();
    assert_eq!(recv(SOCK_LB_SLOTS), want, "each reply from its own VIP");
    // Round robin over one Service more than the slots, each reply read before the next send.
    for round in 0..3 {
        for i in 0..services {
            sock.send_to(&i.to_be_bytes(), vip(i)).unwrap();
            assert_eq!(recv(1), vec![(i, SocketAddr::V4(vip(i)))], "round {round}");
        }
    }
    let st = sock_state(&f.ebpf, &sock).expect("state");
    assert_eq!(st.slots.iter().filter(|e| e.backend_id != 0).count(), SOCK_LB_SLOTS, "{st:?}");

    // Connected: recvfrom and getpeername show the VIP, and the state is the socket's own.
    let connected = f.ns.run(move || {
        let c = UdpSocket::bind("0.0.0.0:0").unwrap();
        c.connect(vip(0)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c
    });
    connected.send(&7u16.to_be_bytes()).unwrap();
    let mut buf = [0u8; 8];
    let (_, from) = connected.recv_from(&mut buf).expect("reply on the connected socket");
    assert_eq!(from, SocketAddr::V4(vip(0)));
    assert_eq!(connected.peer_addr().unwrap(), SocketAddr::V4(vip(0)));
    let own = sock_state(&f.ebpf, &connected).expect("state");
    assert_eq!(own.slots.iter().filter(|e| e.backend_id != 0).count(), 1, "{own:?}");
}

/// The state is in a pinned map: programs loaded again from the pins (a restarted agent) still
/// show the VIP for a connection made before.
#[test]
fn socket_state_survives_a_reload_from_the_pins() {
    if !require_kernel() {
        return;
    }
    let _serial = ONE_CGROUP_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ns = NetNs::new();
    ns.ip(&["addr", "add", &format!("{}/32", B1.ip()), "dev", "lo"]);
    let pins = PinDir::new();
    let mut cgroup = Cgroup::new();
    let mut first = loader::load_with(Some(pins.path()), &Config::default()).expect("load");
    loader::verify_all(&mut first).expect("verify");
    loader::attach_sock(&mut first, cgroup.path()).expect("attach");
    cgroup.enter();
    let mut lb = LbMaps::open(Source::Pinned(pins.path())).unwrap();
    lb.upsert_backend(1, BackendSpec { addr: B1, local: true, terminating: false }).unwrap();
    service(&mut lb, 80, Proto::Tcp, 1, vec![1], vec![], 0);
    echo_listener(&ns, B1);
    let vip = SocketAddrV4::new(VIP, 80);
    let s = connect(&ns, vip).expect("connect");
    // The first programs detach with their object; until the second attach, the socket shows
    // its backend (nothing rewrites getpeername).
    drop(first);
    assert_eq!(s.peer_addr().unwrap(), SocketAddr::V4(B1), "no program: the backend shows");
    let mut second = loader::load_with(Some(pins.path()), &Config::default()).expect("reload from the pins");
    loader::verify_all(&mut second).expect("verify");
    loader::attach_sock(&mut second, cgroup.path()).expect("attach again");
    assert_eq!(s.peer_addr().unwrap(), SocketAddr::V4(vip), "the reloaded programs read the pinned state");
}
