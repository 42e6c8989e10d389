//! The per-packet service path: reverse NAT of replies, conntrack hits, and new connections to a
//! frontend (backend selection, DNAT, SNAT when needed). Shared by XDP on the uplink and TC.
use aya_ebpf::bindings::BPF_NOEXIST;
use dataplane_common::{
    affinity::AffinityKey,
    ct::{CT_FLAG_EXTERNAL, CT_FLAG_SNAT, CT_FORWARD, CT_REPLY, CtEntry, CtKey},
    lb::{BACKEND_FLAG_LOCAL, ServiceKind, SVC_FLAG_EXT_LOCAL},
    metrics::DropReason,
};

use crate::{
    cfg, ct,
    csum::{IP_DADDR_OFF, IP_SADDR_OFF, L4Csum, Rewrite},
    lb,
    maps::{Family, V4, count_service},
    mem,
    parse::{IPPROTO_TCP, IPPROTO_UDP, Ipv4Meta},
};

/// What the service path did to a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not service traffic (or not translatable): left as it was.
    Untouched,
    /// Rewritten; the local stack routes it on (DNAT to a local or routed backend, reverse NAT
    /// towards a local client).
    Translated,
    /// Rewritten with a node source (SNAT) or a reply towards an external client (its source is
    /// the frontend, a node address for NodePort): the stack would drop it as a martian, so the
    /// caller forwards it itself (FIB lookup and redirect, `fib`).
    Forward,
}

/// Where the traffic came from: the uplink (NodePort/LB/externalIP only, eTP applies) or a pod
/// / the node (any frontend kind, iTP applies, hairpin possible).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    External,
    Internal,
}

type Addr = <V4 as Family>::Addr;

/// A conntrack key with its pad zeroed by word stores (see `mem`: a `[0; 3]` literal costs a
/// `memset` call per key).
#[inline(always)]
fn ct_key(saddr: Addr, daddr: Addr, sport_be: u16, dport_be: u16, proto: u8) -> CtKey<Addr> {
    let mut k: CtKey<Addr> = mem::zeroed();
    k.saddr = saddr;
    k.daddr = daddr;
    k.sport_be = sport_be;
    k.dport_be = dport_be;
    k.proto = proto;
    k
}

#[inline(always)]
fn set_dst<P: Rewrite>(p: &P, m: &Ipv4Meta, addr: u32, port_be: u16) -> Result<(), DropReason> {
    let l4 = L4Csum::for_proto(m.proto, m.l4_off);
    if addr != m.daddr_be {
        p.set_addr(IP_DADDR_OFF, m.daddr_be, addr, l4)?;
    }
    if port_be != m.dport_be {
        p.set_port(m.l4_off + 2, m.dport_be, port_be, l4)?;
    }
    Ok(())
}

#[inline(always)]
fn set_src<P: Rewrite>(p: &P, m: &Ipv4Meta, addr: u32, port_be: u16) -> Result<(), DropReason> {
    let l4 = L4Csum::for_proto(m.proto, m.l4_off);
    if addr != m.saddr_be {
        p.set_addr(IP_SADDR_OFF, m.saddr_be, addr, l4)?;
    }
    if port_be != m.sport_be {
        p.set_port(m.l4_off, m.sport_be, port_be, l4)?;
    }
    Ok(())
}

/// Applies a forward conntrack entry: DNAT to the backend, SNAT when the entry says so.
#[inline(always)]
fn apply_forward<P: Rewrite>(p: &P, m: &Ipv4Meta, e: &CtEntry<Addr>) -> Result<Outcome, DropReason> {
    set_dst(p, m, e.nat_addr, e.nat_port_be)?;
    if e.flags & CT_FLAG_SNAT != 0 {
        set_src(p, m, e.orig_addr, e.orig_port_be)?;
    }
    Ok(if e.flags & CT_FLAG_SNAT != 0 && e.flags & CT_FLAG_EXTERNAL != 0 { Outcome::Forward } else { Outcome::Translated })
}

#[inline(always)]
pub fn handle<P: Rewrite>(p: &P, m: &Ipv4Meta, origin: Origin, len: u64) -> Result<Outcome, DropReason> {
    if m.fragment || (m.proto != IPPROTO_TCP && m.proto != IPPROTO_UDP) {
        return Ok(Outcome::Untouched);
    }
    // One lookup of the packet's own tuple answers both questions (the entry says which side
    // of its flow the tuple is), so a request does not first miss on a reply key. An expired
    // entry counts as absent (`ct::lookup`).
    let fkey = ct_key(m.saddr_be, m.daddr_be, m.sport_be, m.dport_be, m.proto);
    let now = ct::now_s();
    if let Some((ptr, e)) = ct::lookup::<V4>(&fkey, now, m.tcp_flags) {
        if e.dir == CT_REPLY {
            // 1. A reply of a translated flow: restore the frontend as source (and the client
            //    as destination when the request was SNATed).
            // SAFETY: as above.
            let rn = unsafe { V4::rev_nat().get(&e.rev_nat_id).copied() }.ok_or(DropReason::RevNatMissing)?;
            let fe_addr = if rn.addr != 0 { rn.addr } else { e.nat_addr };
            set_src(p, m, fe_addr, rn.port_be)?;
            if e.flags & CT_FLAG_SNAT != 0 {
                set_dst(p, m, e.orig_addr, e.orig_port_be)?;
            }
            ct::touch::<V4>(ptr, &e, m.proto, m.tcp_flags, now);
            count_service(e.rev_nat_id, len);
            return Ok(if e.flags & CT_FLAG_EXTERNAL != 0 { Outcome::Forward } else { Outcome::Translated });
        }
        // 2. A known connection keeps its backend, as long as that backend still exists; a
        //    removed one is re-selected below and its entry overwritten.
        if lb::still_there::<V4>(e.backend_id, e.nat_addr, e.nat_port_be) {
            let out = apply_forward(p, m, &e)?;
            ct::touch::<V4>(ptr, &e, m.proto, m.tcp_flags, now);
            count_service(e.rev_nat_id, len);
            return Ok(out);
        }
    }
    // 3. A new connection to a frontend?
    let internal = origin == Origin::Internal;
    let svc = match lb::lookup_service::<V4>(m.daddr_be, m.dport_be, m.proto, internal) {
        Some(s) => s,
        // NodePort frontends are keyed by address 0: any of the node's addresses.
        None if cfg::is_node_ip(m.daddr_be) && cfg::in_nodeport_range(m.dport_be) => {
            match lb::lookup_service::<V4>(0, m.dport_be, m.proto, internal) {
                Some(s) => s,
                None => return Ok(Outcome::Untouched),
            }
        }
        None => return Ok(Outcome::Untouched),
    };
    // ClusterIPs are not reachable from outside the cluster (as with kube-proxy's rules, which
    // only match ClusterIPs for traffic that is routed to them from pods/nodes).
    if origin == Origin::External && svc.kind == ServiceKind::ClusterIp as u8 {
        return Ok(Outcome::Untouched);
    }
    let client = AffinityKey { netns_cookie: [0; 2], client: m.saddr_be, rev_nat_id: svc.rev_nat_id };
    let (backend_id, be) = lb::select_backend::<V4>(&svc, client)?;
    let local = be.flags & BACKEND_FLAG_LOCAL != 0;
    let ext_local = svc.flags & SVC_FLAG_EXT_LOCAL != 0;
    if origin == Origin::External && ext_local && !local {
        return Err(DropReason::NoLocalBackend);
    }
    let mut flags = if origin == Origin::External { CT_FLAG_EXTERNAL } else { 0 };
    let (mut snat_addr, snat_port) = (m.saddr_be, m.sport_be);
    if origin == Origin::External && !local && !ext_local {
        // The remote backend must answer through this node so the reply can be reverse-NATed:
        // SNAT to the node address the request came to (NodePort), else the primary one.
        snat_addr = if cfg::is_node_ip(m.daddr_be) { m.daddr_be } else { cfg::primary_node_ip().unwrap_or(m.daddr_be) };
        flags |= CT_FLAG_SNAT;
    } else if origin == Origin::Internal && be.addr == m.saddr_be {
        // Hairpin: a pod reaching itself through its Service must not see its own source.
        snat_addr = cfg::hairpin_snat_ip();
        flags |= CT_FLAG_SNAT;
    }
    // The client's source port is kept; a collision with another flow's reply tuple would need
    // a port allocator (cilium's SNAT map), which this path does not have yet: refuse to create
    // an ambiguous entry rather than hijack the other flow's replies.
    let rkey = ct_key(be.addr, snat_addr, be.port_be, snat_port, m.proto);
    let (state, expires_s) = cfg::ct_lifetimes().create(m.proto, m.tcp_flags, now);
    let reply = CtEntry {
        nat_addr: m.daddr_be,
        orig_addr: m.saddr_be,
        nat_port_be: m.dport_be,
        orig_port_be: m.sport_be,
        backend_id,
        rev_nat_id: svc.rev_nat_id,
        flags,
        dir: CT_REPLY,
        state,
        _pad: 0,
        expires_s,
    };
    let fwd = CtEntry {
        nat_addr: be.addr,
        orig_addr: snat_addr,
        nat_port_be: be.port_be,
        orig_port_be: snat_port,
        backend_id,
        rev_nat_id: svc.rev_nat_id,
        flags,
        dir: CT_FORWARD,
        state,
        _pad: 0,
        expires_s,
    };
    // The reply entry first: once the forward entry exists, a reply may arrive. BPF_NOEXIST
    // makes the common case one map operation; only when the tuple is taken is it looked at.
    if V4::ct().insert(&rkey, &reply, BPF_NOEXIST as u64).is_err() {
        // SAFETY: copied out at once.
        match unsafe { V4::ct().get(&rkey).copied() } {
            // The same client re-selected (its forward entry expired, was evicted, or its
            // backend changed), or an expired flow held the tuple: overwrite it. A live entry
            // of another flow keeps it. Gone meanwhile (evicted, or deleted by the GC): take it.
            Some(other)
                if dataplane_common::ct::expired(other.expires_s, now)
                    || (other.dir == CT_REPLY && other.orig_addr == m.saddr_be && other.orig_port_be == m.sport_be) =>
            {
                V4::ct().insert(&rkey, &reply, 0).map_err(|_| DropReason::MapUpdateFailed)?;
            }
            Some(_) => return Err(DropReason::SnatCollision),
            None => V4::ct().insert(&rkey, &reply, 0).map_err(|_| DropReason::MapUpdateFailed)?,
        }
    }
    // Overwrites only a forward entry whose backend is gone, or one that `ct::lookup` counted
    // as absent (expired, or a closing flow reopened): a live reply entry with this tuple would
    // have been found by the lookup above.
    V4::ct().insert(&fkey, &fwd, 0).map_err(|_| DropReason::MapUpdateFailed)?;
    count_service(svc.rev_nat_id, len);
    apply_forward(p, m, &fwd)
}
