//! The per-packet service path with real traffic: XDP on a node's uplink and TC on its pod veths,
//! all inside test namespaces (client, node, two pods), real TCP sockets end to end. No socket
//! programs here: this is the path for traffic the socket hooks did not translate.
//!
//! ```text
//!  client ns            node ns (XDP on up0, TC ingress on pa0/pb0)      pod-a / pod-b ns
//!  eth0 192.168.1.1 --- up0 192.168.1.10     pa0 ------------------------ eth0 10.0.1.5/32
//!                                            pb0 ------------------------ eth0 10.0.1.20/32
//! ```
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::mpsc,
    time::Duration,
};

use aya::{Ebpf, programs::{TcAttachType, XdpMode}};
use dataplane_agent::{
    loader::{self, Config},
    maps::{
        Source,
        ct::CtMap,
        lb::{BackendSpec, LbMaps, Proto, Scope, ServiceSpec, frontend},
    },
};
use dataplane_common::lb::ServiceKind;
use dataplane_tests::{
    netns::{NetNs, Veth},
    require_kernel,
};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 5);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);
const BACKEND: SocketAddrV4 = SocketAddrV4::new(POD_B, 8080);
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
const NODEPORT: SocketAddrV4 = SocketAddrV4::new(NODE, 30080);

struct Cluster {
    // Drop order: programs first, then links and namespaces.
    ebpf: Ebpf,
    lb: LbMaps,
    ct: CtMap,
    _links: Vec<Veth>,
    client: NetNs,
    node: NetNs,
    pod_a: NetNs,
    pod_b: NetNs,
}

fn mac(last: u8) -> String {
    format!("02:00:00:00:01:{last:02x}")
}

/// A pod: `/32` address, everything via a link-local gateway that is the node's veth end (whose
/// MAC is a permanent neighbour, as CNI plugins like calico set it up).
fn pod(node: &NetNs, ip: Ipv4Addr, host_if: &str, n: u8) -> (NetNs, Veth) {
    let ns = NetNs::new();
    let veth = Veth::new(node, host_if, &ns, "eth0");
    node.ip(&["link", "set", host_if, "address", &mac(0x80 + n)]);
    ns.ip(&["link", "set", "eth0", "address", &mac(n)]);
    ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
    ns.ip(&["neigh", "add", "169.254.1.1", "lladdr", &mac(0x80 + n), "dev", "eth0", "nud", "permanent"]);
    ns.ip(&["route", "add", "default", "via", "169.254.1.1", "dev", "eth0", "onlink"]);
    node.ip(&["route", "add", &format!("{ip}/32"), "dev", host_if]);
    node.ip(&["neigh", "add", &ip.to_string(), "lladdr", &mac(n), "dev", host_if, "nud", "permanent"]);
    (ns, veth)
}

fn cluster() -> Cluster {
    let client = NetNs::new();
    let node = NetNs::new();
    node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let uplink = Veth::new(&node, "up0", &client, "eth0");
    node.ip(&["addr", "add", "192.168.1.10/24", "dev", "up0"]);
    client.ip(&["addr", "add", "192.168.1.1/24", "dev", "eth0"]);
    let (pod_a, va) = pod(&node, POD_A, "pa0", 1);
    let (pod_b, vb) = pod(&node, POD_B, "pb0", 2);
    let mut ebpf = node.run(|| {
        let cfg = Config { node_ips: vec![NODE], ..Config::default() };
        let mut ebpf = loader::load_with(None, &cfg).expect("load");
        loader::verify_all(&mut ebpf).expect("verify");
        loader::attach_xdp(&mut ebpf, "up0", XdpMode::Driver).expect("XDP on the test uplink");
        for veth in ["pa0", "pb0"] {
            loader::attach_tc(&mut ebpf, loader::programs::TC_INGRESS, veth, TcAttachType::Ingress).expect("TC on a pod veth");
        }
        ebpf
    });
    let mut lb = LbMaps::open(Source::Ebpf(&mut ebpf)).unwrap();
    let ct = CtMap::open(Source::Ebpf(&mut ebpf)).unwrap();
    lb.upsert_backend(1, BackendSpec { addr: BACKEND, local: true, terminating: false }).unwrap();
    Cluster { ebpf, lb, ct, _links: vec![uplink, va, vb], client, node, pod_a, pod_b }
}

fn service(lb: &mut LbMaps, fe: SocketAddrV4, kind: ServiceKind, id: u32) {
    let key = if kind == ServiceKind::NodePort { SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, fe.port()) } else { fe };
    lb.set_rev_nat(id, key).unwrap();
    let spec = ServiceSpec { svc_id: id, kind, flags: 0, affinity_timeout_s: 0, rev_nat_id: id, active: vec![1], terminating: vec![] };
    lb.upsert_service(&frontend(*key.ip(), key.port(), Proto::Tcp, Scope::External), &spec).unwrap();
}

/// An echo listener on the backend pod; reports the peer of each connection.
fn echo_backend(ns: &NetNs) -> mpsc::Receiver<SocketAddr> {
    let (tx, rx) = mpsc::channel();
    let l = ns.run(|| TcpListener::bind(BACKEND).expect("bind the backend"));
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let _ = tx.send(s.peer_addr().unwrap());
            let mut buf = [0u8; 64];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

/// Connects from `ns` to `to`, sends a line and reads the echo; returns the local address used.
fn round_trip(ns: &NetNs, to: SocketAddrV4) -> SocketAddr {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(3)).unwrap_or_else(|e| panic!("connect {to}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).expect("echo through the service");
        assert_eq!(&buf, b"ping");
        s.local_addr().unwrap()
    })
}

#[test]
fn nodeport_from_outside_reaches_a_local_backend_with_the_client_address_kept() {
    if !require_kernel() {
        return;
    }
    let mut c = cluster();
    service(&mut c.lb, NODEPORT, ServiceKind::NodePort, 10);
    let peers = echo_backend(&c.pod_b);
    let local = round_trip(&c.client, NODEPORT);
    let seen = peers.recv_timeout(Duration::from_secs(3)).unwrap();
    assert_eq!(seen, local, "eTP Cluster with a local backend: no SNAT, the backend sees the client");
    assert_eq!(seen.ip(), std::net::IpAddr::V4(CLIENT));
    let flows = c.ct.dump().unwrap();
    assert!(flows.iter().any(|f| !f.reply && f.dst == NODEPORT && f.nat == BACKEND), "forward entry: {flows:?}");
    assert!(flows.iter().any(|f| f.reply && f.src == BACKEND && f.nat == NODEPORT), "reply entry: {flows:?}");
    drop(c.ebpf);
}

#[test]
fn clusterip_from_a_pod_without_socket_lb_is_translated_per_packet_and_hairpin_works() {
    if !require_kernel() {
        return;
    }
    let mut c = cluster();
    service(&mut c.lb, VIP, ServiceKind::ClusterIp, 1);
    let peers = echo_backend(&c.pod_b);
    // pod-a -> VIP: DNAT at pa0, reverse NAT of the replies at pb0.
    let local = round_trip(&c.pod_a, VIP);
    assert_eq!(peers.recv_timeout(Duration::from_secs(3)).unwrap(), local, "the backend sees pod-a's own address");
    // pod-b -> VIP -> pod-b itself: SNATed to the hairpin address so pod-b accepts it.
    round_trip(&c.pod_b, VIP);
    let seen = peers.recv_timeout(Duration::from_secs(3)).unwrap();
    assert_eq!(seen.ip(), std::net::IpAddr::V4(Ipv4Addr::new(169, 254, 42, 1)), "hairpin source");
    let _ = (&c.node, &c.client);
}
