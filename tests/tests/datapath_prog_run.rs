//! The BPF_PROG_RUN fixture table over every per-packet service path (XDP on the uplink, TC on a
//! pod's veth): each row seeds fresh maps, runs one frame, and checks the verdict, every output
//! byte (with checksums recomputed by etherparse), the drop counter, and the conntrack, affinity
//! and per-service counter state afterwards, with every entry's expiry.
//!
//! Time: entries expire in kernel CLOCK_MONOTONIC seconds (what `bpf_ktime_get_ns` counts), so
//! rows seed expiries relative to `now_s()` (the same clock, read in user space) and check the
//! expiries the run wrote against the clock read just before and after it.
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
    ct::{
        CT_FLAG_EXTERNAL, CT_FLAG_SNAT, CT_FORWARD, CT_REPLY, CT_STATE_ESTABLISHED, CT_STATE_FIN_FWD, CT_STATE_FIN_REV,
        CT_STATE_RST, CtEntry, CtKey, CtLifetimes,
    },
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
    /// A TCP SYN.
    Tcp,
    Udp,
    /// TCP: a pure ACK, a FIN (with ACK), a RST.
    Ack,
    Fin,
    Rst,
}

fn frame(kind: Kind, src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let (sport, dport) = (src.port(), dst.port());
    let l4 = match kind {
        Kind::Tcp => L4::TcpSyn { sport, dport, seq: 7 },
        Kind::Udp => L4::Udp { sport, dport },
        Kind::Ack => L4::TcpAck { sport, dport, seq: 8, ack: 9 },
        Kind::Fin => L4::TcpFin { sport, dport, seq: 8, ack: 9 },
        Kind::Rst => L4::TcpRst { sport, dport, seq: 8 },
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
        state: 0,
        expires_s: 0,
    }
}

/// `f` in TCP state `state` (`CT_STATE_*` bits).
fn st(f: CtFlow, state: u8) -> CtFlow {
    CtFlow { state, ..f }
}

/// `f` in `state`, expiring `offset` seconds from now (negative: already expired), for seeding.
fn aged(f: CtFlow, state: u8, offset: i64) -> CtFlow {
    CtFlow { state, expires_s: (i64::from(now_s()) + offset) as u32, ..f }
}

/// The data path's clock (kernel CLOCK_MONOTONIC seconds), read from user space.
fn now_s() -> u32 {
    dataplane_agent::maps::ct::now_s()
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
        state: f.state,
        _pad: 0,
        // Unless the row says otherwise, a seeded flow is live for an hour: far from any expiry
        // and, for the lifetimes a packet of the table may give it (60 s, 6 h), from a refresh.
        expires_s: if f.expires_s == 0 { now_s() + 3600 } else { f.expires_s },
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
    svc_t(m, fe, proto, kind, flags, affinity_s, id, active, &[]);
}

/// As [`svc`], with serving-but-terminating backends after the ready ones.
#[allow(clippy::too_many_arguments)]
fn svc_t(m: &mut Maps, fe: SocketAddrV4, proto: Proto, kind: ServiceKind, flags: u8, affinity_s: u32, id: u32, active: &[u32], terminating: &[u32]) {
    // NodePort frontends are keyed by address 0, their rev-NAT entry too.
    let key_addr = if kind == ServiceKind::NodePort { SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, fe.port()) } else { fe };
    m.lb.set_rev_nat(id, key_addr).unwrap();
    let spec = ServiceSpec {
        svc_id: id,
        kind,
        flags,
        affinity_timeout_s: affinity_s,
        rev_nat_id: id,
        active: active.to_vec(),
        terminating: terminating.to_vec(),
    };
    m.lb.upsert_service(&frontend(*key_addr.ip(), key_addr.port(), proto, Scope::External), &spec).unwrap();
}

fn backends(m: &mut Maps) {
    for (id, addr, local) in [(1, LOCAL_BE, true), (2, LOCAL_BE2, true), (3, REMOTE_BE, false), (4, POD_AS_BACKEND, true)] {
        m.lb.upsert_backend(id, BackendSpec { addr, local, terminating: false }).unwrap();
    }
}
/// The client pod itself as a backend (hairpin).
const POD_AS_BACKEND: SocketAddrV4 = sa(10, 0, 1, 5, 8080);

/// An affinity entry for backend `backend_id` found in slot `slot` of service entry `svc_id`,
/// expiring `offset` seconds from now.
fn aff(backend_id: u32, svc_id: u32, slot: u32, offset: i64) -> AffinityValue {
    AffinityValue { backend_id, expires_s: (i64::from(now_s()) + offset) as u32, svc_id, slot }
}

/// What an entry's expiry must be after the run.
#[derive(Clone, Copy, Debug)]
enum Exp {
    /// As seeded: the run did not write it.
    Seeded,
    /// Written by the run: a full lifetime of this many seconds from the run.
    Full(u32),
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
    /// The whole conntrack table afterwards (expiries aside).
    ct: Vec<CtFlow>,
    /// The expiry of each of `ct`'s entries. Empty: entries seeded with the same key are as
    /// seeded, new ones have the full lifetime of their protocol and state (default lifetimes).
    expiry: Vec<Exp>,
    /// (client, rev-NAT id) -> backend id expected in the affinity map afterwards, and its
    /// expiry.
    affinity: Option<(Ipv4Addr, u32, u32, Exp)>,
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
            expiry: vec![],
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
            expiry: vec![],
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
            expiry: vec![],
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
            expiry: vec![],
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
            expiry: vec![],
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
            expiry: vec![],
            affinity: None,
            counted: Some(10),
        },
        Row {
            // Conntrack keys carry no direction (since ct4_v2): one tuple is one side of one flow.
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
            expiry: vec![],
            affinity: None,
            counted: None,
        },
        Row {
            // Without the entry the pick would be random, and a new entry written: `Seeded`
            // fails then, whatever the pick.
            what: "affinity hit: the client's fresh entry picks its backend, far from expiry it is not rewritten",
            prog: Prog::Xdp,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, LB_IP, Proto::Tcp, ServiceKind::LoadBalancer, 0, 100, 13, &[2, 1]);
                m.aff.insert(affinity_key(*CLIENT.ip(), 13), aff(1, 13, 1, 98)).unwrap();
            }),
            input: frame(Tcp, CLIENT, LB_IP),
            verdict: XDP_PASS,
            output: Some(frame(Tcp, CLIENT, LOCAL_BE)),
            drop: None,
            ct: vec![
                ct(false, CLIENT, LB_IP, Proto::Tcp, LOCAL_BE, CLIENT, 1, 13, ext),
                ct(true, LOCAL_BE, CLIENT, Proto::Tcp, LB_IP, CLIENT, 1, 13, ext),
            ],
            expiry: vec![],
            affinity: Some((*CLIENT.ip(), 13, 1, Exp::Seeded)),
            counted: Some(13),
        },
        Row {
            what: "affinity hit with less than timeout - 5 s left: the entry gets the Service's full timeout again",
            prog: Prog::Xdp,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, LB_IP, Proto::Tcp, ServiceKind::LoadBalancer, 0, 100, 13, &[2, 1]);
                m.aff.insert(affinity_key(*CLIENT.ip(), 13), aff(1, 13, 1, 50)).unwrap();
            }),
            input: frame(Tcp, CLIENT, LB_IP),
            verdict: XDP_PASS,
            output: Some(frame(Tcp, CLIENT, LOCAL_BE)),
            drop: None,
            ct: vec![
                ct(false, CLIENT, LB_IP, Proto::Tcp, LOCAL_BE, CLIENT, 1, 13, ext),
                ct(true, LOCAL_BE, CLIENT, Proto::Tcp, LB_IP, CLIENT, 1, 13, ext),
            ],
            expiry: vec![],
            affinity: Some((*CLIENT.ip(), 13, 1, Exp::Full(100))),
            counted: Some(13),
        },
        Row {
            what: "affinity expired: a new backend is chosen and remembered",
            prog: Prog::Xdp,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, LB_IP, Proto::Tcp, ServiceKind::LoadBalancer, 0, 100, 13, &[2]);
                m.aff.insert(affinity_key(*CLIENT.ip(), 13), aff(2, 13, 0, -1)).unwrap();
            }),
            input: frame(Tcp, CLIENT, LB_IP),
            verdict: XDP_PASS,
            output: Some(frame(Tcp, CLIENT, LOCAL_BE2)),
            drop: None,
            ct: vec![
                ct(false, CLIENT, LB_IP, Proto::Tcp, LOCAL_BE2, CLIENT, 2, 13, ext),
                ct(true, LOCAL_BE2, CLIENT, Proto::Tcp, LB_IP, CLIENT, 2, 13, ext),
            ],
            expiry: vec![],
            affinity: Some((*CLIENT.ip(), 13, 2, Exp::Full(100))),
            counted: Some(13),
        },
        Row {
            // Backend 1 still exists (as another Service's, say); its old slot holds backend 2.
            what: "affinity to a backend that left the Service: re-selected although the entry is fresh",
            prog: Prog::Xdp,
            seed: Box::new(move |m| {
                backends(m);
                svc(m, LB_IP, Proto::Tcp, ServiceKind::LoadBalancer, 0, 100, 13, &[2]);
                m.aff.insert(affinity_key(*CLIENT.ip(), 13), aff(1, 13, 0, 98)).unwrap();
            }),
            input: frame(Tcp, CLIENT, LB_IP),
            verdict: XDP_PASS,
            output: Some(frame(Tcp, CLIENT, LOCAL_BE2)),
            drop: None,
            ct: vec![
                ct(false, CLIENT, LB_IP, Proto::Tcp, LOCAL_BE2, CLIENT, 2, 13, ext),
                ct(true, LOCAL_BE2, CLIENT, Proto::Tcp, LB_IP, CLIENT, 2, 13, ext),
            ],
            expiry: vec![],
            affinity: Some((*CLIENT.ip(), 13, 2, Exp::Full(100))),
            counted: Some(13),
        },
        Row {
            // Slot 1 still holds backend 1, but only slot 0 counts while a backend is ready.
            what: "affinity to a backend now terminating while another is ready: re-selected",
            prog: Prog::Xdp,
            seed: Box::new(move |m| {
                backends(m);
                svc_t(m, LB_IP, Proto::Tcp, ServiceKind::LoadBalancer, 0, 100, 13, &[2], &[1]);
                m.aff.insert(affinity_key(*CLIENT.ip(), 13), aff(1, 13, 1, 98)).unwrap();
            }),
            input: frame(Tcp, CLIENT, LB_IP),
            verdict: XDP_PASS,
            output: Some(frame(Tcp, CLIENT, LOCAL_BE2)),
            drop: None,
            ct: vec![
                ct(false, CLIENT, LB_IP, Proto::Tcp, LOCAL_BE2, CLIENT, 2, 13, ext),
                ct(true, LOCAL_BE2, CLIENT, Proto::Tcp, LB_IP, CLIENT, 2, 13, ext),
            ],
            expiry: vec![],
            affinity: Some((*CLIENT.ip(), 13, 2, Exp::Full(100))),
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
            expiry: vec![],
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
            expiry: vec![],
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
            expiry: vec![],
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
            expiry: vec![],
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
            expiry: vec![],
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
            expiry: vec![],
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
            expiry: vec![],
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
            expiry: vec![],
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
            expiry: vec![],
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
            expiry: vec![],
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
            expiry: vec![],
            affinity: None,
            counted: None,
        },
    ];
    rows.extend(lifetime_rows());
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
        expiry: vec![],
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
            expiry: vec![],
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
                expiry: vec![],
                affinity: None,
                counted: None,
            });
        }
    }
    rows
}

/// Conntrack lifetimes: expiry, refresh at a bounded rate, TCP state (handshake, half-close,
/// close, RST, reopen), on a NodePort flow CLIENT -> LOCAL_BE (backend 1, rev-NAT 10) whose two
/// entries are seeded with the state and expiry each row needs. Default lifetimes.
fn lifetime_rows() -> Vec<Row> {
    use Kind::*;
    let l = CtLifetimes::default();
    let (syn, est, close) = (l.tcp_syn_s, l.tcp_established_s, l.tcp_close_s);
    let ext = CT_FLAG_EXTERNAL;
    let (e, ff, fr, rst) = (CT_STATE_ESTABLISHED, CT_STATE_FIN_FWD, CT_STATE_FIN_REV, CT_STATE_RST);
    let fwd = move |be: SocketAddrV4, id: u32| ct(false, CLIENT, NODEPORT, Proto::Tcp, be, CLIENT, id, 10, ext);
    let rev = move |be: SocketAddrV4, id: u32| ct(true, be, CLIENT, Proto::Tcp, NODEPORT, CLIENT, id, 10, ext);
    // The flow to LOCAL_BE, both entries in `state`, expiring `offset` s from now; the slots of
    // the NodePort hold `slots`.
    let seeded = move |state: u8, offset: i64, slots: &'static [u32]| -> Box<dyn Fn(&mut Maps)> {
        Box::new(move |m: &mut Maps| {
            backends(m);
            svc(m, NODEPORT, Proto::Tcp, ServiceKind::NodePort, 0, 0, 10, slots);
            for f in [fwd(LOCAL_BE, 1), rev(LOCAL_BE, 1)] {
                let (k, v) = ct_entry(&aged(f, state, offset));
                m.ct.insert(k, v).unwrap();
            }
        })
    };
    // A client packet of the flow, forwarded to LOCAL_BE.
    let from_client = |kind: Kind| (frame(kind, CLIENT, NODEPORT), XDP_PASS, Some(frame(kind, CLIENT, LOCAL_BE)));
    let row = |what: &'static str, seed: Box<dyn Fn(&mut Maps)>, (input, verdict, output): (Vec<u8>, u32, Option<Vec<u8>>), ct: Vec<CtFlow>, expiry: Vec<Exp>| Row {
        what,
        prog: Prog::Xdp,
        seed,
        input,
        verdict,
        output,
        drop: None,
        // Every row of this helper forwards the packet on the flow.
        counted: Some(10),
        ct,
        expiry,
        affinity: None,
    };
    let both = |state: u8| vec![st(fwd(LOCAL_BE, 1), state), st(rev(LOCAL_BE, 1), state)];
    let mut rows = vec![
        // The slots now hold backend 2 only: a new decision shows.
        row(
            "expired conntrack entry: counted as absent, the packet is a new connection",
            seeded(e, -1, &[2]),
            (frame(Tcp, CLIENT, NODEPORT), XDP_PASS, Some(frame(Tcp, CLIENT, LOCAL_BE2))),
            vec![fwd(LOCAL_BE2, 2), st(rev(LOCAL_BE, 1), e), rev(LOCAL_BE2, 2)],
            vec![Exp::Full(syn), Exp::Seeded, Exp::Full(syn)],
        ),
        row(
            "refresh: a busy established flow 100 s from expiry gets its full lifetime again, on both entries",
            seeded(e, 100, &[1]),
            from_client(Ack),
            both(e),
            vec![Exp::Full(est), Exp::Full(est)],
        ),
        row(
            "no refresh: an established flow within the refresh slack of its full lifetime is not rewritten",
            seeded(e, i64::from(est) - 2, &[1]),
            from_client(Ack),
            both(e),
            vec![Exp::Seeded, Exp::Seeded],
        ),
        row(
            "handshake done: the first packet without SYN makes both entries established",
            seeded(0, 55, &[1]),
            from_client(Ack),
            both(e),
            vec![Exp::Full(est), Exp::Full(est)],
        ),
        row(
            "SYN retransmitted within the slack: nothing written",
            seeded(0, i64::from(syn) - 1, &[1]),
            from_client(Tcp),
            both(0),
            vec![Exp::Seeded, Exp::Seeded],
        ),
        row(
            "FIN from the client alone: half-closed, the flow keeps the established lifetime",
            seeded(e, 100, &[1]),
            from_client(Fin),
            both(e | ff),
            vec![Exp::Full(est), Exp::Full(est)],
        ),
        row(
            "RST: both entries get the close lifetime at once",
            seeded(e, 100, &[1]),
            from_client(Rst),
            both(e | rst),
            vec![Exp::Full(close), Exp::Full(close)],
        ),
        row(
            "closing flow: its last packets (an ACK) do not extend it",
            seeded(e | rst, 3, &[1]),
            from_client(Ack),
            both(e | rst),
            vec![Exp::Seeded, Exp::Seeded],
        ),
        row(
            "a new SYN on a closing flow reopens the tuple: a new decision (slots now hold backend 2)",
            seeded(e | ff | fr, 8, &[2]),
            (frame(Tcp, CLIENT, NODEPORT), XDP_PASS, Some(frame(Tcp, CLIENT, LOCAL_BE2))),
            vec![fwd(LOCAL_BE2, 2), st(rev(LOCAL_BE, 1), e | ff | fr), rev(LOCAL_BE2, 2)],
            vec![Exp::Full(syn), Exp::Seeded, Exp::Full(syn)],
        ),
    ];
    rows.push(Row {
        // The reply of a local backend at its veth: the FIN that completes the close also
        // reaches the forward entry (the flow's two entries live and die together).
        what: "FIN from the backend after the client's: both entries get the close lifetime",
        prog: Prog::TcPod,
        seed: seeded(e | ff, 21_000, &[1]),
        input: frame(Fin, LOCAL_BE, CLIENT),
        verdict: TC_ACT_REDIRECT,
        output: Some(with_macs(frame(Fin, NODEPORT, CLIENT), GATEWAY_MAC, NODE_MAC)),
        drop: None,
        ct: both(e | ff | fr),
        expiry: vec![Exp::Full(close), Exp::Full(close)],
        affinity: None,
        counted: Some(10),
    });
    rows.push(Row {
        what: "expired reply entry: counted as absent, the reply passes untranslated",
        prog: Prog::TcPod,
        seed: seeded(e, -1, &[1]),
        input: frame(Ack, LOCAL_BE, CLIENT),
        verdict: TC_ACT_OK,
        output: None,
        drop: None,
        ct: both(e),
        expiry: vec![Exp::Seeded, Exp::Seeded],
        affinity: None,
        counted: None,
    });
    rows.push(Row {
        // As the collision row of the main table, but the other flow is dead.
        what: "new connection whose reply tuple is an expired flow's: the dead entry gives way",
        prog: Prog::Xdp,
        seed: Box::new(move |m| {
            backends(m);
            svc(m, NODEPORT, Proto::Tcp, ServiceKind::NodePort, 0, 0, 10, &[1]);
            let (k, v) = ct_entry(&aged(ct(false, LOCAL_BE, CLIENT, Proto::Tcp, REMOTE_BE, LOCAL_BE, 2, 12, 0), CT_STATE_ESTABLISHED, -1));
            m.ct.insert(k, v).unwrap();
        }),
        input: frame(Tcp, CLIENT, NODEPORT),
        verdict: XDP_PASS,
        output: Some(frame(Tcp, CLIENT, LOCAL_BE)),
        drop: None,
        ct: vec![fwd(LOCAL_BE, 1), rev(LOCAL_BE, 1)],
        expiry: vec![Exp::Full(syn), Exp::Full(syn)],
        affinity: None,
        counted: Some(10),
    });
    rows
}

/// An expiry written during a run between `t0` and `t1` (data-path seconds) is `exp`.
fn check_expiry(what: &str, actual: u32, seeded: Option<u32>, exp: Exp, t0: u32, t1: u32) {
    match exp {
        Exp::Seeded => assert_eq!(Some(actual), seeded, "{what}: expiry as seeded (not rewritten)"),
        Exp::Full(l) => assert!(
            (t0 + l..=t1 + l).contains(&actual),
            "{what}: expiry {actual} is not now + {l} s (now was {t0}..={t1}; seeded {seeded:?})"
        ),
    }
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
    let seeded_affinity = row.affinity.and_then(|(c, r, _, _)| maps.aff.get(&affinity_key(c, r)).unwrap());
    let seeded_ct = maps.ct.dump().unwrap();
    let t0 = now_s();
    let out = match row.prog {
        Prog::Xdp => prog_run::run::<Xdp>(ebpf.program(name).unwrap().try_into().unwrap(), &row.input),
        Prog::TcPod | Prog::TcUplink => prog_run::run::<SchedClassifier>(ebpf.program(name).unwrap().try_into().unwrap(), &row.input),
    };
    let t1 = now_s();
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
    let after = maps.ct.dump().unwrap();
    let without_expiry: Vec<CtFlow> = after.iter().map(|f| CtFlow { expires_s: 0, ..*f }).collect();
    assert_eq!(without_expiry, row.ct, "{what}: conntrack afterwards");
    assert!(row.expiry.is_empty() || row.expiry.len() == row.ct.len(), "{what}: one expiry per entry");
    let lifetimes = CtLifetimes::default();
    for (i, f) in after.iter().enumerate() {
        let seeded = seeded_ct.iter().find(|s| (s.src, s.dst, s.proto) == (f.src, f.dst, f.proto)).map(|s| s.expires_s);
        let exp = match (row.expiry.get(i), seeded) {
            (Some(e), _) => *e,
            (None, Some(_)) => Exp::Seeded,
            (None, None) => Exp::Full(lifetimes.lifetime(f.proto, f.state)),
        };
        check_expiry(&format!("{what}: conntrack entry {i} ({f:?})"), f.expires_s, seeded, exp, t0, t1);
    }
    if let Some((client, rev, backend, exp)) = row.affinity {
        let v = maps.aff.get(&affinity_key(client, rev)).unwrap().expect("affinity entry");
        assert_eq!(v.backend_id, backend, "{what}: affinity backend");
        assert_eq!(v.svc_id, rev, "{what}: affinity service entry (svc id = rev-NAT id in this table)");
        if matches!(exp, Exp::Seeded) {
            assert_eq!(Some(v), seeded_affinity, "{what}: affinity entry not rewritten");
        }
        check_expiry(&format!("{what}: affinity ({v:?}, seeded {seeded_affinity:?})"), v.expires_s, seeded_affinity.map(|s| s.expires_s), exp, t0, t1);
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
