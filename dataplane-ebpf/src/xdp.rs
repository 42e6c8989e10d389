//! XDP on the node's uplink: NodePort, LoadBalancer IPs and externalIPs for new connections,
//! conntrack hits, and reverse NAT of replies from remote backends.
//!
//! TC does what XDP cannot: XDP sees only the uplink's ingress, so replies of local backends
//! (which leave through the pod's veth) are reverse-NATed by the TC program on that veth, and an
//! uplink without XDP support uses `dp_tc_uplink`, the same service path at TC ingress.
use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    macros::xdp,
    programs::XdpContext,
};
use dataplane_common::metrics::{DropReason, Hook};

use crate::{
    csum::Rewrite as _,
    nat::{self, Origin, Outcome},
    parse::{self, EthHdr, Ipv4Hdr, L3, ETH_HLEN},
    stats,
};

#[xdp]
pub fn dp_xdp_ingress(ctx: XdpContext) -> u32 {
    let w = ctx.window();
    let len = (w.data_end - w.data) as u64;
    stats::count_hook(Hook::XdpIngress, len);
    match try_xdp_ingress(&ctx, len) {
        Ok(verdict) => verdict,
        Err(reason) => {
            stats::count_drop(reason, len);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_xdp_ingress(ctx: &XdpContext, len: u64) -> Result<u32, DropReason> {
    let L3::Ipv4(meta) = parse::parse(ctx.window(), len as usize)? else {
        return Ok(xdp_action::XDP_PASS);
    };
    match nat::handle(ctx, &meta, Origin::External, len)? {
        Outcome::Untouched | Outcome::Translated => Ok(xdp_action::XDP_PASS),
        Outcome::Forward => Ok(forward(ctx)),
    }
}

const AF_INET: u8 = 2;

/// Sends a rewritten packet out by a FIB lookup: the stack would drop it as a martian (its
/// source is now a node address, or it is a reply to an outside client with a frontend source).
/// Without a resolved neighbour the packet goes to the stack, which resolves it (the uplink
/// then needs `accept_local`, as cilium documents for its XDP fallback).
#[inline(always)]
fn forward(ctx: &XdpContext) -> u32 {
    let w = ctx.window();
    let (Some(eth), Some(ip)) = (parse::ptr_at::<EthHdr>(w, 0), parse::ptr_at::<Ipv4Hdr>(w, ETH_HLEN)) else {
        return xdp_action::XDP_PASS;
    };
    let (eth, ip) = (eth as *mut EthHdr, ip as *mut Ipv4Hdr);
    // SAFETY: an all-zero bpf_fib_lookup is a valid input; fields are filled below.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: `ip` was bounds-checked by ptr_at.
    unsafe {
        p.l4_protocol = (*ip).proto;
        p.__bindgen_anon_1.tot_len = u16::from_be((*ip).tot_len_be);
        p.__bindgen_anon_2.tos = (*ip).tos;
        p.__bindgen_anon_3.ipv4_src = (*ip).saddr_be;
        p.__bindgen_anon_4.ipv4_dst = (*ip).daddr_be;
    }
    // SAFETY: valid context and parameter block of the size passed.
    let rc = unsafe {
        fib_lookup(ctx.ctx.cast(), &mut p, core::mem::size_of::<bpf_fib_lookup>() as i32, 0)
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: `eth` was bounds-checked by ptr_at.
    unsafe {
        (*eth).dst = p.dmac;
        (*eth).src = p.smac;
    }
    if p.ifindex == ctx.ingress_ifindex() as u32 {
        xdp_action::XDP_TX
    } else {
        // SAFETY: plain helper call; returns XDP_REDIRECT on success, XDP_ABORTED otherwise.
        unsafe { bpf_redirect(p.ifindex, 0) as u32 }
    }
}

/// The benchmark's floor: the same parsing and one frontend lookup, nothing else. Never attached;
/// `bench-datapath` compares the service path against it.
#[xdp]
pub fn dp_xdp_floor(ctx: XdpContext) -> u32 {
    let w = ctx.window();
    let len = w.data_end - w.data;
    match parse::parse(w, len) {
        Ok(L3::Ipv4(m)) => {
            // The floor passes everything by design; the map lookup is a helper call, which the
            // compiler cannot drop although its result is unused.
            let _ = crate::lb::lookup_service::<crate::maps::V4>(m.daddr_be, m.dport_be, m.proto, false);
            xdp_action::XDP_PASS
        }
        Ok(_) => xdp_action::XDP_PASS,
        Err(reason) => {
            stats::count_drop(reason, len as u64);
            xdp_action::XDP_DROP
        }
    }
}
