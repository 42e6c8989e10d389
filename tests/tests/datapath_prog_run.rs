//! The BPF_PROG_RUN fixture table over every per-packet service path (XDP on the uplink, TC on a
//! pod's veth): each row seeds fresh maps, runs one frame, and checks the verdict, every output
//! byte (with checksums recomputed by etherparse), the drop counter, and the conntrack, affinity
//! and per-service counter state afterwards.
//!
//! The table runs inside a test namespace: XDP's FIB lookup for SNATed and reply traffic uses
//! that namespace's routes and permanent neighbours, so the rewritten MACs are known.
use std::net::{Ipv4Addr, SocketAddrV4};

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{SchedClassifier, Xdp},
};
use dataplane_agent::{
    loader::{self, Config},
    maps::{
        Source,
        affinity::AffinityMap,
        ct::{CtFlow, CtMap},
        ip4_to_map,
        lb::{BackendSpec, LbMaps, Proto, Scope, ServiceSpec, frontend},
    },
    stats::read_counter,
};
use dataplane_common::{
    affinity::{AffinityKey, AffinityValue},
    ct::{CT_FLAG_EXTERNAL, CT_FLAG_SNAT, CT_FORWARD, CT_REPLY, CtEntry, CtKey},
    lb::{SERVICE_STATS_MAP, SVC_FLAG_EXT_LOCAL, ServiceKind},
    metrics::{Counter, DROPS_MAP, DropReason},
};
use dataplane_tests::{
    netns::{NetNs, Veth},
    packet::{self, L4, MAC_A, MAC_B},
    prog_run, require_kernel,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const fn sa(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), port)
}
/// This node, as configured at load time, and its uplink's MAC.
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
/// The next hop towards the other node's pod CIDR, and the default gateway (towards clients).
const PEER_NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x20];
const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT: SocketAddrV4 = sa(203, 0, 113, 5, 40000);
const NODEPORT: SocketAddrV4 = SocketAddrV4::new(NODE, 30080);
const LB_IP: SocketAddrV4 = sa(198, 51, 100, 7, 80);
const VIP: SocketAddrV4 = sa(10, 96, 0, 10, 80);
const POD: SocketAddrV4 = sa(10, 0, 1, 5, 45000);
const LOCAL_BE: SocketAddrV4 = sa(10, 0, 1, 20, 8080);
const LOCAL_BE2: SocketAddrV4 = sa(10, 0, 1, 21, 8080);
const REMOTE_BE: SocketAddrV4 = sa(10, 0, 2, 30, 8080);
const HAIRPIN_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prog {
    Xdp,
    TcPod,
    /// The XDP path at TC, for uplinks without XDP.
    TcUplink,
}

#[derive(Clone, Copy)]
enum Kind {
    Tcp,
    Udp,
}

fn frame(kind: Kind, src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let l4 = match kind {
        Kind::Tcp => L4::TcpSyn { sport: src.port(), dport: dst.port(), seq: 7 },
        Kind::Udp => L4::Udp { sport: src.port(), dport: dst.port() },
    };
    packet::ipv4(*src.ip(), *dst.ip(), l4, b"payload")
}

fn with_macs(mut f: Vec<u8>, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f
}

/// Expected conntrack entries, as `CtMap::dump` decodes them.
#[allow(clippy::too_many_arguments)]
fn ct(reply: bool, src: SocketAddrV4, dst: SocketAddrV4, proto: Proto, nat: SocketAddrV4, orig: SocketAddrV4, backend_id: u32, rev_nat_id: u32, flags: u8) -> CtFlow {
    CtFlow {
        src,
        dst,
        proto: proto as u8,
        reply,
        nat,
        orig,
        backend_id,
        rev_nat_id,
        snat: flags & CT_FLAG_SNAT != 0,
        external: flags & CT_FLAG_EXTERNAL != 0,
    }
}

fn ct_entry(f: &CtFlow) -> (CtKey<u32>, CtEntry<u32>) {
    let k = CtKey {
        saddr: ip4_to_map(*f.src.ip()),
        daddr: ip4_to_map(*f.dst.ip()),
        sport_be: f.src.port().to_be(),
        dport_be: f.dst.port().to_be(),
        proto: f.proto,
        _pad: [0; 3],
    };
    let e = CtEntry {
        nat_addr: ip4_to_map(*f.nat.ip()),
        orig_addr: ip4_to_map(*f.orig.ip()),
        nat_port_be: f.nat.port().to_be(),
        orig_port_be: f.orig.port().to_be(),
        backend_id: f.backend_id,
        rev_nat_id: f.rev_nat_id,
        flags: (if f.snat { CT_FLAG_SNAT } else { 0 }) | (if f.external { CT_FLAG_EXTERNAL } else { 0 }),
        dir: if f.reply { CT_REPLY } else { CT_FORWARD },
        _pad: [0; 2],
    };
    (k, e)
}

struct Maps {
    lb: LbMaps,
    ct: CtMap,
    aff: AffinityMap,
}

/// A service with one frontend; rev-NAT id = svc id = `id`.
#[allow(clippy::too_many_arguments)]
fn svc(m: &mut Maps, fe: SocketAddrV4, proto: Proto, kind: ServiceKind, flags: u8, affinity_s: u32, id: u32, active: &[u32]) {
    // NodePort frontends are keyed by address 0, their rev-NAT entry too.
    let key_addr = if kind == ServiceKind::NodePort { SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, fe.port()) } else { fe };
    m.lb.set_rev_nat(id, key_addr).unwrap();
    let spec = ServiceSpec { svc_id: id, kind, flags, affinity_timeout_s: affinity_s, rev_nat_id: id, active: active.to_vec(), terminating: vec![] };
    m.lb.upsert_service(&frontend(*key_addr.ip(), key_addr.port(), proto, Scope::External), &spec).unwrap();
}

fn backends(m: &mut Maps) {
    for (id, addr, local) in [(1, LOCAL_BE, true), (2, LOCAL_BE2, true), (3, REMOTE_BE, false), (4, POD_AS_BACKEND, true)] {
        m.lb.upsert_backend(id, BackendSpec { addr, local, terminating: false }).unwrap();
    }
}
/// The client pod itself as a backend (hairpin).
const POD_AS_BACKEND: SocketAddrV4 = sa(10, 0, 1, 5, 8080);

fn monotonic_ns() -> u64 {
    // bpf_ktime_get_ns is CLOCK_MONOTONIC.
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) }, 0);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn affinity_key(client: Ipv4Addr, rev_nat_id: u32) -> AffinityKey<u32> {
    AffinityKey { netns_cookie: [0; 2], client: ip4_to_map(client), rev_nat_id }
}

struct Row {
    what: &'static str,
    prog: Prog,
    seed: Box<dyn Fn(&mut Maps)>,
    input: Vec<u8>,
    verdict: u32,
    /// `None`: the input unchanged.
    output: Option<Vec<u8>>,
    drop: Option<DropReason>,
    /// The whole conntrack table afterwards.
    ct: Vec<CtFlow>,
    /// (client, rev-NAT id) -> backend id expected in the affinity map afterwards, and whether
    /// its timestamp must have been refreshed by this run.
    affinity: Option<(Ipv4Addr, u32, u32)>,
    /// rev-NAT id whose per-service counter must show this packet.
    counted: Option<u32>,
}

fn rows() -> Vec<Row> {
    use Kind::*;
    let ext = CT_FLAG_EXTERNAL;
    let snat = CT_FLAG_SNAT;
    let np_syn = frame(Tcp, CLIENT, NODEPORT);
    let mut rows = vec![
        Row {
            what: "NodePort, local backend: DNAT only, the client address is kept",
            prog: Prog::Xdp,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, NODEPORT, Proto::Tcp, ServiceKind::NodePort, 0, 0, 10, &[1]);
            }),
            input: np_syn.clone(),
            verdict: XDP_PASS,
            output: Some(frame(Tcp, CLIENT, LOCAL_BE)),
            drop: None,
            ct: vec![
                ct(false, CLIENT, NODEPORT, Proto::Tcp, LOCAL_BE, CLIENT, 1, 10, ext),
                ct(true, LOCAL_BE, CLIENT, Proto::Tcp, NODEPORT, CLIENT, 1, 10, ext),
            ],
            affinity: None,
            counted: Some(10),
        },
        Row {
            what: "NodePort, remote backend: DNAT + SNAT to the node, FIB redirect",
            prog: Prog::Xdp,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, NODEPORT, Proto::Tcp, ServiceKind::NodePort, 0, 0, 10, &[3]);
            }),
            input: np_syn.clone(),
            verdict: XDP_REDIRECT,
            output: Some(with_macs(frame(Tcp, SocketAddrV4::new(NODE, CLIENT.port()), REMOTE_BE), PEER_NODE_MAC, NODE_MAC)),
            drop: None,
            ct: vec![
                ct(false, CLIENT, NODEPORT, Proto::Tcp, REMOTE_BE, SocketAddrV4::new(NODE, CLIENT.port()), 3, 10, ext | snat),
                ct(true, REMOTE_BE, SocketAddrV4::new(NODE, CLIENT.port()), Proto::Tcp, NODEPORT, CLIENT, 3, 10, ext | snat),
            ],
            affinity: None,
            counted: Some(10),
        },
        Row {
            what: "reply from the remote backend: reverse NAT to the client, FIB redirect",
            prog: Prog::Xdp,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, NODEPORT, Proto::Tcp, ServiceKind::NodePort, 0, 0, 10, &[3]);
                let f = ct(true, REMOTE_BE, SocketAddrV4::new(NODE, CLIENT.port()), Proto::Tcp, NODEPORT, CLIENT, 3, 10, ext | snat);
                let (k, e) = ct_entry(&f);
                m.ct.insert(k, e).unwrap();
            }),
            input: frame(Tcp, REMOTE_BE, SocketAddrV4::new(NODE, CLIENT.port())),
            verdict: XDP_REDIRECT,
            output: Some(with_macs(frame(Tcp, NODEPORT, CLIENT), GATEWAY_MAC, NODE_MAC)),
            drop: None,
            ct: vec![ct(true, REMOTE_BE, SocketAddrV4::new(NODE, CLIENT.port()), Proto::Tcp, NODEPORT, CLIENT, 3, 10, ext | snat)],
            affinity: None,
            counted: Some(10),
        },
        Row {
            what: "LoadBalancer IP with externalTrafficPolicy Local, no local backend: dropped",
            prog: Prog::Xdp,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, LB_IP, Proto::Tcp, ServiceKind::LoadBalancer, SVC_FLAG_EXT_LOCAL, 0, 11, &[3]);
            }),
            input: frame(Tcp, CLIENT, LB_IP),
            verdict: XDP_DROP,
            output: None,
            drop: Some(DropReason::NoLocalBackend),
            ct: vec![],
            affinity: None,
            counted: None,
        },
        Row {
            what: "externalIP with externalTrafficPolicy Local, local backend: no SNAT",
            prog: Prog::Xdp,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, LB_IP, Proto::Udp, ServiceKind::ExternalIp, SVC_FLAG_EXT_LOCAL, 0, 12, &[1]);
            }),
            input: frame(Udp, CLIENT, LB_IP),
            verdict: XDP_PASS,
            output: Some(frame(Udp, CLIENT, LOCAL_BE)),
            drop: None,
            ct: vec![
                ct(false, CLIENT, LB_IP, Proto::Udp, LOCAL_BE, CLIENT, 1, 12, ext),
                ct(true, LOCAL_BE, CLIENT, Proto::Udp, LB_IP, CLIENT, 1, 12, ext),
            ],
            affinity: None,
            counted: Some(12),
        },
        Row {
            what: "conntrack hit: an established flow keeps its backend although the slots changed",
            prog: Prog::Xdp,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, NODEPORT, Proto::Tcp, ServiceKind::NodePort, 0, 0, 10, &[2]);
                let (k, e) = ct_entry(&ct(false, CLIENT, NODEPORT, Proto::Tcp, LOCAL_BE, CLIENT, 1, 10, ext));
                m.ct.insert(k, e).unwrap();
            }),
            input: np_syn.clone(),
            verdict: XDP_PASS,
            output: Some(frame(Tcp, CLIENT, LOCAL_BE)),
            drop: None,
            ct: vec![ct(false, CLIENT, NODEPORT, Proto::Tcp, LOCAL_BE, CLIENT, 1, 10, ext)],
            affinity: None,
            counted: Some(10),
        },
        Row {
            // Conntrack keys carry no direction (ct4_v2): one tuple is one side of one flow.
            what: "new connection whose reply tuple is another flow's forward tuple: refused, nothing written",
            prog: Prog::Xdp,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, NODEPORT, Proto::Tcp, ServiceKind::NodePort, 0, 0, 10, &[1]);
                let (k, e) = ct_entry(&ct(false, LOCAL_BE, CLIENT, Proto::Tcp, REMOTE_BE, LOCAL_BE, 2, 12, 0));
                m.ct.insert(k, e).unwrap();
            }),
            input: np_syn.clone(),
            verdict: XDP_DROP,
            output: None,
            drop: Some(DropReason::SnatCollision),
            ct: vec![ct(false, LOCAL_BE, CLIENT, Proto::Tcp, REMOTE_BE, LOCAL_BE, 2, 12, 0)],
            affinity: None,
            counted: None,
        },
        Row {
            what: "affinity hit: the client's fresh entry wins over the slots",
            prog: Prog::Xdp,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, LB_IP, Proto::Tcp, ServiceKind::LoadBalancer, 0, 100, 13, &[2]);
                let v = AffinityValue { last_used_ns: monotonic_ns(), backend_id: 1, _pad: 0 };
                m.aff.insert(affinity_key(*CLIENT.ip(), 13), v).unwrap();
            }),
            input: frame(Tcp, CLIENT, LB_IP),
            verdict: XDP_PASS,
            output: Some(frame(Tcp, CLIENT, LOCAL_BE)),
            drop: None,
            ct: vec![
                ct(false, CLIENT, LB_IP, Proto::Tcp, LOCAL_BE, CLIENT, 1, 13, ext),
                ct(true, LOCAL_BE, CLIENT, Proto::Tcp, LB_IP, CLIENT, 1, 13, ext),
            ],
            affinity: Some((*CLIENT.ip(), 13, 1)),
            counted: Some(13),
        },
        Row {
            what: "affinity expired: a new backend is chosen and remembered",
            prog: Prog::Xdp,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, LB_IP, Proto::Tcp, ServiceKind::LoadBalancer, 0, 100, 13, &[2]);
                let v = AffinityValue { last_used_ns: monotonic_ns() - 200_000_000_000, backend_id: 1, _pad: 0 };
                m.aff.insert(affinity_key(*CLIENT.ip(), 13), v).unwrap();
            }),
            input: frame(Tcp, CLIENT, LB_IP),
            verdict: XDP_PASS,
            output: Some(frame(Tcp, CLIENT, LOCAL_BE2)),
            drop: None,
            ct: vec![
                ct(false, CLIENT, LB_IP, Proto::Tcp, LOCAL_BE2, CLIENT, 2, 13, ext),
                ct(true, LOCAL_BE2, CLIENT, Proto::Tcp, LB_IP, CLIENT, 2, 13, ext),
            ],
            affinity: Some((*CLIENT.ip(), 13, 2)),
            counted: Some(13),
        },
        Row {
            what: "a ClusterIP is not reachable from outside: untouched",
            prog: Prog::Xdp,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, VIP, Proto::Tcp, ServiceKind::ClusterIp, 0, 0, 1, &[1]);
            }),
            input: frame(Tcp, CLIENT, VIP),
            verdict: XDP_PASS,
            output: None,
            drop: None,
            ct: vec![],
            affinity: None,
            counted: None,
        },
        Row {
            what: "ClusterIP miss: not a frontend, untouched",
            prog: Prog::TcPod,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, VIP, Proto::Tcp, ServiceKind::ClusterIp, 0, 0, 1, &[3]);
            }),
            input: frame(Tcp, POD, sa(10, 96, 0, 99, 80)),
            verdict: TC_ACT_OK,
            output: None,
            drop: None,
            ct: vec![],
            affinity: None,
            counted: None,
        },
        Row {
            what: "ClusterIP hit from a pod: DNAT to a remote backend, no SNAT",
            prog: Prog::TcPod,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, VIP, Proto::Udp, ServiceKind::ClusterIp, 0, 0, 1, &[3]);
            }),
            input: frame(Udp, POD, VIP),
            verdict: TC_ACT_OK,
            output: Some(frame(Udp, POD, REMOTE_BE)),
            drop: None,
            ct: vec![
                ct(false, POD, VIP, Proto::Udp, REMOTE_BE, POD, 3, 1, 0),
                ct(true, REMOTE_BE, POD, Proto::Udp, VIP, POD, 3, 1, 0),
            ],
            affinity: None,
            counted: Some(1),
        },
        Row {
            what: "ClusterIP reply: reverse NAT to the VIP",
            prog: Prog::TcPod,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, VIP, Proto::Tcp, ServiceKind::ClusterIp, 0, 0, 1, &[1]);
                let (k, e) = ct_entry(&ct(true, LOCAL_BE, POD, Proto::Tcp, VIP, POD, 1, 1, 0));
                m.ct.insert(k, e).unwrap();
            }),
            input: frame(Tcp, LOCAL_BE, POD),
            verdict: TC_ACT_OK,
            output: Some(frame(Tcp, VIP, POD)),
            drop: None,
            ct: vec![ct(true, LOCAL_BE, POD, Proto::Tcp, VIP, POD, 1, 1, 0)],
            affinity: None,
            counted: Some(1),
        },
        Row {
            what: "hairpin: a pod reaching itself through its Service is SNATed to the hairpin address",
            prog: Prog::TcPod,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, VIP, Proto::Tcp, ServiceKind::ClusterIp, 0, 0, 1, &[4]);
            }),
            input: frame(Tcp, POD, VIP),
            verdict: TC_ACT_OK,
            output: Some(frame(Tcp, SocketAddrV4::new(HAIRPIN_IP, POD.port()), POD_AS_BACKEND)),
            drop: None,
            ct: vec![
                ct(false, POD, VIP, Proto::Tcp, POD_AS_BACKEND, SocketAddrV4::new(HAIRPIN_IP, POD.port()), 4, 1, snat),
                ct(true, POD_AS_BACKEND, SocketAddrV4::new(HAIRPIN_IP, POD.port()), Proto::Tcp, VIP, POD, 4, 1, snat),
            ],
            affinity: None,
            counted: Some(1),
        },
        Row {
            what: "hairpin reply: back to the pod from the VIP",
            prog: Prog::TcPod,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, VIP, Proto::Tcp, ServiceKind::ClusterIp, 0, 0, 1, &[4]);
                let f = ct(true, POD_AS_BACKEND, SocketAddrV4::new(HAIRPIN_IP, POD.port()), Proto::Tcp, VIP, POD, 4, 1, snat);
                let (k, e) = ct_entry(&f);
                m.ct.insert(k, e).unwrap();
            }),
            input: frame(Tcp, POD_AS_BACKEND, SocketAddrV4::new(HAIRPIN_IP, POD.port())),
            verdict: TC_ACT_OK,
            output: Some(frame(Tcp, VIP, POD)),
            drop: None,
            ct: vec![ct(true, POD_AS_BACKEND, SocketAddrV4::new(HAIRPIN_IP, POD.port()), Proto::Tcp, VIP, POD, 4, 1, snat)],
            affinity: None,
            counted: Some(1),
        },
        Row {
            what: "NodePort reply from a local backend at its veth: reverse NAT, FIB redirect to the client",
            prog: Prog::TcPod,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, NODEPORT, Proto::Tcp, ServiceKind::NodePort, 0, 0, 10, &[1]);
                let (k, e) = ct_entry(&ct(true, LOCAL_BE, CLIENT, Proto::Tcp, NODEPORT, CLIENT, 1, 10, ext));
                m.ct.insert(k, e).unwrap();
            }),
            input: frame(Tcp, LOCAL_BE, CLIENT),
            verdict: TC_ACT_REDIRECT,
            output: Some(with_macs(frame(Tcp, NODEPORT, CLIENT), GATEWAY_MAC, NODE_MAC)),
            drop: None,
            ct: vec![ct(true, LOCAL_BE, CLIENT, Proto::Tcp, NODEPORT, CLIENT, 1, 10, ext)],
            affinity: None,
            counted: Some(10),
        },
        Row {
            what: "NodePort at the TC uplink fallback: same DNAT as XDP",
            prog: Prog::TcUplink,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, NODEPORT, Proto::Tcp, ServiceKind::NodePort, 0, 0, 10, &[1]);
            }),
            input: np_syn.clone(),
            verdict: TC_ACT_OK,
            output: Some(frame(Tcp, CLIENT, LOCAL_BE)),
            drop: None,
            ct: vec![
                ct(false, CLIENT, NODEPORT, Proto::Tcp, LOCAL_BE, CLIENT, 1, 10, ext),
                ct(true, LOCAL_BE, CLIENT, Proto::Tcp, NODEPORT, CLIENT, 1, 10, ext),
            ],
            affinity: None,
            counted: Some(10),
        },
        Row {
            what: "a ClusterIP is not exposed at the TC uplink either",
            prog: Prog::TcUplink,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, VIP, Proto::Tcp, ServiceKind::ClusterIp, 0, 0, 1, &[1]);
            }),
            input: frame(Tcp, CLIENT, VIP),
            verdict: TC_ACT_OK,
            output: None,
            drop: None,
            ct: vec![],
            affinity: None,
            counted: None,
        },
        Row {
            what: "reply whose rev-NAT entry is gone: dropped, not leaked with the backend address",
            prog: Prog::TcPod,
            seed: Box::new(move |m| {
                let (k, e) = ct_entry(&ct(true, LOCAL_BE, POD, Proto::Tcp, VIP, POD, 1, 99, 0));
                m.ct.insert(k, e).unwrap();
            }),
            input: frame(Tcp, LOCAL_BE, POD),
            verdict: TC_ACT_SHOT,
            output: None,
            drop: Some(DropReason::RevNatMissing),
            ct: vec![ct(true, LOCAL_BE, POD, Proto::Tcp, VIP, POD, 1, 99, 0)],
            affinity: None,
            counted: None,
        },
        Row {
            what: "ClusterIP without endpoints: dropped as no_backend",
            prog: Prog::TcPod,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, VIP, Proto::Tcp, ServiceKind::ClusterIp, 0, 0, 1, &[]);
            }),
            input: frame(Tcp, POD, VIP),
            verdict: TC_ACT_SHOT,
            output: None,
            drop: Some(DropReason::NoBackend),
            ct: vec![],
            affinity: None,
            counted: None,
        },
    ];
    // A ClusterIP packet with IP options: the L4 header moves by 4 bytes, the rewrite follows.
    let with_options = |f: Vec<u8>| {
        let mut f = f;
        f.splice(34..34, [1u8, 1, 1, 0]);
        f[14] = 0x46;
        let tot = u16::from_be_bytes([f[16], f[17]]) + 4;
        f[16..18].copy_from_slice(&tot.to_be_bytes());
        packet::fix_ipv4_checksum(&mut f);
        f
    };
    rows.push(Row {
        what: "ClusterIP hit with IP options",
        prog: Prog::TcPod,
        seed: Box::new(move |m| {
            backends(m);
            svc(m, VIP, Proto::Tcp, ServiceKind::ClusterIp, 0, 0, 1, &[1]);
        }),
        input: with_options(frame(Tcp, POD, VIP)),
        verdict: TC_ACT_OK,
        output: Some(with_options(frame(Tcp, POD, LOCAL_BE))),
        drop: None,
        ct: vec![
            ct(false, POD, VIP, Proto::Tcp, LOCAL_BE, POD, 1, 1, 0),
            ct(true, LOCAL_BE, POD, Proto::Tcp, VIP, POD, 1, 1, 0),
        ],
        affinity: None,
        counted: Some(1),
    });
    // Fragments to a frontend are not translated per packet (no L4 ports on later ones).
    for (what, frag_field) in [("first fragment (MF) to a ClusterIP: untouched", 0x2000u16), ("later fragment to a ClusterIP: untouched", 0x0010)] {
        let mut f = frame(Udp, POD, VIP);
        f[20..22].copy_from_slice(&frag_field.to_be_bytes());
        packet::fix_ipv4_checksum(&mut f);
        rows.push(Row {
            what,
            prog: Prog::TcPod,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, VIP, Proto::Udp, ServiceKind::ClusterIp, 0, 0, 1, &[1]);
            }),
            input: f,
            verdict: TC_ACT_OK,
            output: None,
            drop: None,
            ct: vec![],
            affinity: None,
            counted: None,
        });
    }
    // Malformed frames, on both programs, with a NodePort service seeded so a parse bug that
    // let them through would show up as a translation.
    let syn = frame(Tcp, CLIENT, NODEPORT);
    let udp = frame(Udp, CLIENT, NODEPORT);
    let truncated_l4 = |f: &[u8], l4_len: usize| {
        let mut f = f[..34 + l4_len].to_vec();
        f[16..18].copy_from_slice(&(20 + l4_len as u16).to_be_bytes());
        packet::fix_ipv4_checksum(&mut f);
        f
    };
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x44;
    let mut arp = syn.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let malformed: Vec<(&'static str, Vec<u8>, Option<DropReason>)> = vec![
        ("truncated IPv4 header", syn[..30].to_vec(), Some(DropReason::TruncatedIpv4)),
        ("truncated TCP header", truncated_l4(&syn, 10), Some(DropReason::TruncatedTcp)),
        ("truncated UDP header", truncated_l4(&udp, 4), Some(DropReason::TruncatedUdp)),
        ("bad IHL", bad_ihl, Some(DropReason::BadIpv4Header)),
        ("non-IP frame (ARP ethertype)", arp, None),
    ];
    for (what, input, reason) in malformed {
        for prog in [Prog::Xdp, Prog::TcPod, Prog::TcUplink] {
            // The kernel refuses TC runs on IPv4 frames shorter than 34 bytes.
            if prog != Prog::Xdp && input.len() < 34 {
                continue;
            }
            let (verdict, drop) = match (prog, reason) {
                (Prog::Xdp, Some(r)) => (XDP_DROP, Some(r)),
                (Prog::Xdp, None) => (XDP_PASS, None),
                (_, Some(r)) => (TC_ACT_SHOT, Some(r)),
                (_, None) => (TC_ACT_OK, None),
            };
            rows.push(Row {
                what,
                prog,
                seed: Box::new(move |m| {
                    backends(m);
                    svc(m, NODEPORT, Proto::Tcp, ServiceKind::NodePort, 0, 0, 10, &[1]);
                    svc(m, NODEPORT, Proto::Udp, ServiceKind::NodePort, 0, 0, 11, &[1]);
                }),
                input: input.clone(),
                verdict,
                output: None,
                drop,
                ct: vec![],
                affinity: None,
                counted: None,
            });
        }
    }
    rows
}

fn counter(ebpf: &Ebpf, map: &str, index: u32) -> Counter {
    let arr: PerCpuArray<_, Counter> = PerCpuArray::try_from(ebpf.map(map).unwrap()).unwrap();
    read_counter(&arr, index).unwrap()
}

fn all_counters(ebpf: &Ebpf, map: &str, n: u32) -> Vec<Counter> {
    (0..n).map(|i| counter(ebpf, map, i)).collect()
}

/// Runs one row on emptied maps and checks everything it promises; counters are compared as
/// deltas over the run.
fn check(ebpf: &Ebpf, maps: &mut Maps, row: &Row) {
    let name = match row.prog {
        Prog::Xdp => loader::programs::XDP_INGRESS,
        Prog::TcPod => loader::programs::TC_INGRESS,
        Prog::TcUplink => loader::programs::TC_UPLINK,
    };
    maps.lb.clear().unwrap();
    maps.ct.clear().unwrap();
    maps.aff.clear().unwrap();
    (row.seed)(maps);
    let drops_before = all_counters(ebpf, DROPS_MAP, DropReason::ALL.len() as u32);
    let svc_before = row.counted.map(|rev| counter(ebpf, SERVICE_STATS_MAP, rev));
    let seeded_affinity = row.affinity.and_then(|(c, r, _)| maps.aff.get(&affinity_key(c, r)).unwrap());
    let before = monotonic_ns();
    let out = match row.prog {
        Prog::Xdp => prog_run::run::<Xdp>(ebpf.program(name).unwrap().try_into().unwrap(), &row.input),
        Prog::TcPod | Prog::TcUplink => prog_run::run::<SchedClassifier>(ebpf.program(name).unwrap().try_into().unwrap(), &row.input),
    };
    let what = format!("{:?}: {}", row.prog, row.what);
    assert_eq!(out.verdict, row.verdict, "{what}: verdict");
    let want = row.output.clone().unwrap_or_else(|| row.input.clone());
    assert_eq!(out.data, want, "{what}: output bytes");
    if row.drop.is_none() && row.input.len() >= 34 {
        packet::check_checksums(&out.data).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    for reason in DropReason::ALL {
        let n = counter(ebpf, DROPS_MAP, reason as u32).packets - drops_before[reason as usize].packets;
        assert_eq!(n, u64::from(row.drop == Some(reason)), "{what}: drop counter {reason:?}");
    }
    assert_eq!(maps.ct.dump().unwrap(), row.ct, "{what}: conntrack afterwards");
    if let Some((client, rev, backend)) = row.affinity {
        let v = maps.aff.get(&affinity_key(client, rev)).unwrap().expect("affinity entry");
        assert_eq!(v.backend_id, backend, "{what}: affinity backend");
        assert!(v.last_used_ns >= before, "{what}: affinity refreshed ({v:?}, seeded {seeded_affinity:?})");
    }
    if let (Some(rev), Some(b)) = (row.counted, svc_before) {
        let c = counter(ebpf, SERVICE_STATS_MAP, rev);
        assert_eq!((c.packets - b.packets, c.bytes - b.bytes), (1, row.input.len() as u64), "{what}: per-service counter");
    }
}

#[test]
fn prog_run_fixture_table_covers_every_service_path() {
    if !require_kernel() {
        return;
    }
    // The node's uplink, with a route to the other node's pod CIDR and a default gateway, both
    // with permanent neighbours so the FIB lookup in XDP has known answers.
    let node = NetNs::new();
    let peer = NetNs::new();
    let _veth = Veth::new(&node, "up0", &peer, "eth0");
    let mac = |m: [u8; 6]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    node.ip(&["link", "set", "up0", "address", &mac(NODE_MAC)]);
    // A Kubernetes node forwards; the FIB helper refuses lookups for a non-forwarding device.
    node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    node.ip(&["addr", "add", "192.168.1.10/24", "dev", "up0"]);
    node.ip(&["neigh", "add", "192.168.1.20", "lladdr", &mac(PEER_NODE_MAC), "dev", "up0", "nud", "permanent"]);
    node.ip(&["neigh", "add", "192.168.1.1", "lladdr", &mac(GATEWAY_MAC), "dev", "up0", "nud", "permanent"]);
    node.ip(&["route", "add", "10.0.2.0/24", "via", "192.168.1.20", "dev", "up0"]);
    node.ip(&["route", "add", "default", "via", "192.168.1.1", "dev", "up0"]);
    let _ = (MAC_A, MAC_B);
    let count = node.run(|| {
        let cfg = Config { node_ips: vec![NODE], ..Config::default() };
        let mut ebpf = loader::load_with(None, &cfg).expect("load");
        loader::verify_all(&mut ebpf).expect("verify");
        let mut maps = Maps {
            lb: LbMaps::open(Source::Ebpf(&mut ebpf)).unwrap(),
            ct: CtMap::open(Source::Ebpf(&mut ebpf)).unwrap(),
            aff: AffinityMap::open(Source::Ebpf(&mut ebpf)).unwrap(),
        };
        let rows = rows();
        for row in &rows {
            check(&ebpf, &mut maps, row);
        }
        rows.len()
    });
    assert!(count >= 25, "the table has {count} rows");
}
