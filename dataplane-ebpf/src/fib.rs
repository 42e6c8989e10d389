//! Forwarding a rewritten packet ourselves, by FIB lookup and redirect.
//!
//! Needed when the stack would refuse it: after reverse NAT a reply to an outside client carries
//! the frontend as its source, which for NodePort is a node address, and after SNAT a request to a
//! remote backend does too; the stack drops packets arriving with a local source as martians.
use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup, xdp_action},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::{TcContext, XdpContext},
};

use crate::{
    csum::Rewrite,
    mem,
    parse::{self, ETH_HLEN, EthHdr, Ipv4Hdr, Window},
};

const AF_INET: u8 = 2;

/// Lookup parameters for the IPv4 packet in `w`, arriving on `ifindex`, written into `p` (zeroed
/// by the caller with `mem::zeroed_in`). Filled in place: returning the 64-byte block by value
/// (in an `Option`) made LLVM zero part of the copy with a byte-by-byte `memset` call.
#[inline(always)]
fn fill_params(w: Window, ifindex: u32, p: &mut bpf_fib_lookup) -> Option<()> {
    let ip = parse::ptr_at::<Ipv4Hdr>(w, ETH_HLEN)?;
    p.family = AF_INET;
    p.ifindex = ifindex;
    // SAFETY: `ip` was bounds-checked by ptr_at.
    unsafe {
        p.l4_protocol = (*ip).proto;
        p.__bindgen_anon_1.tot_len = u16::from_be((*ip).tot_len_be);
        p.__bindgen_anon_2.tos = (*ip).tos;
        p.__bindgen_anon_3.ipv4_src = (*ip).saddr_be;
        p.__bindgen_anon_4.ipv4_dst = (*ip).daddr_be;
    }
    Some(())
}

/// XDP: rewrite the MACs and transmit (same interface) or redirect. Without a resolved
/// neighbour the packet goes to the stack, which resolves it (the uplink then needs
/// `accept_local` for SNATed packets, as cilium documents for its XDP fallback).
#[inline(always)]
pub fn xdp_forward(ctx: &XdpContext) -> u32 {
    let w = ctx.window();
    let ingress = ctx.ingress_ifindex() as u32;
    let mut slot = MaybeUninit::uninit();
    let p: &mut bpf_fib_lookup = mem::zeroed_in(&mut slot);
    let (Some(eth), Some(())) = (parse::ptr_at::<EthHdr>(w, 0), fill_params(w, ingress, p)) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: valid context and a parameter block of the size passed.
    let rc = unsafe { fib_lookup(ctx.ctx.cast(), p, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return xdp_action::XDP_PASS;
    }
    let eth = eth as *mut EthHdr;
    // SAFETY: `eth` was bounds-checked by ptr_at.
    unsafe {
        (*eth).dst = p.dmac;
        (*eth).src = p.smac;
    }
    if p.ifindex == ingress {
        xdp_action::XDP_TX
    } else {
        // SAFETY: plain helper call; returns XDP_REDIRECT on success, XDP_ABORTED otherwise.
        unsafe { bpf_redirect(p.ifindex, 0) as u32 }
    }
}

/// TC: rewrite the MACs and redirect; with no neighbour entry yet, let the kernel resolve it
/// (`bpf_redirect_neigh`). Any other lookup result leaves the packet to the stack.
#[inline(always)]
pub fn tc_forward(ctx: &TcContext) -> i32 {
    // SAFETY: the skb the kernel passed.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    let mut slot = MaybeUninit::uninit();
    let p: &mut bpf_fib_lookup = mem::zeroed_in(&mut slot);
    if fill_params(ctx.window(), ingress, p).is_none() {
        return TC_ACT_OK;
    }
    // SAFETY: valid context and a parameter block of the size passed.
    let rc = unsafe { fib_lookup(ctx.skb.skb.cast(), p, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        if ctx.store(0, &p.dmac, 0).is_err() || ctx.store(6, &p.smac, 0).is_err() {
            return TC_ACT_OK;
        }
        // SAFETY: plain helper call; returns TC_ACT_REDIRECT on success.
        return unsafe { bpf_redirect(p.ifindex, 0) as i32 };
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // SAFETY: a null parameter block asks the kernel to look the next hop up itself.
        return unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) as i32 };
    }
    TC_ACT_OK
}
