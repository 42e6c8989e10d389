//! Socket-level load balancing (cgroup v2 sock_addr hooks): the destination of a connect/sendmsg
//! to a frontend is rewritten to a backend once per socket operation, so that traffic needs no
//! per-packet NAT; recvmsg/getpeername show the frontend again.
//!
//! What a rewrite must remember (the frontend a backend is shown as, and for unconnected UDP the
//! backend a frontend's datagrams stick to) lives in the socket's own local storage
//! ([`SockLbState`], `BPF_MAP_TYPE_SK_STORAGE`): created on the socket's first rewrite, freed by
//! the kernel with the socket. Nothing accumulates, nothing is evicted while the socket lives.
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use dataplane_common::{
    affinity::AffinityKey,
    lb::{Backend, SockLbEntry, SockLbState, cookie_words},
    metrics::{DropReason, Hook, SockLbOp},
};

use crate::{
    cfg, lb,
    maps::{Family, V4},
    stats,
};

/// What a cgroup sock_addr program returns to let the operation proceed / to refuse it.
const SYS_PROCEED: i32 = 1;
const SYS_REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn dp_sock_connect4(ctx: SockAddrContext) -> i32 {
    xlate_fwd(&ctx, Hook::SockConnect4)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn dp_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    xlate_fwd(&ctx, Hook::SockSendmsg4)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn dp_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    xlate_rev(&ctx, Hook::SockRecvmsg4)
}

#[cgroup_sock_addr(getpeername4)]
pub fn dp_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    xlate_rev(&ctx, Hook::SockGetpeername4)
}

#[inline(always)]
fn xlate_fwd(ctx: &SockAddrContext, hook: Hook) -> i32 {
    stats::count_hook(hook, 0);
    match try_xlate_fwd(ctx, hook == Hook::SockSendmsg4) {
        Ok(()) => SYS_PROCEED,
        Err(reason) => {
            stats::count_drop(reason, 0);
            // A frontend without a usable backend fails at once with ECONNREFUSED, like
            // kube-proxy's REJECT rule. Returning 0 alone gives EPERM; bpf_set_retval (5.18+)
            // sets the error the syscall returns, as cilium's try_set_retval does.
            // SAFETY: plain helper call, allowed in cgroup sock_addr programs.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            SYS_REJECT
        }
    }
}

#[inline(always)]
fn try_xlate_fwd(ctx: &SockAddrContext, sendmsg: bool) -> Result<(), DropReason> {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer the kernel passed; these fields are readable in these hooks.
    let (addr, port_be, proto) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol as u8) };
    let svc = match lb::lookup_service::<V4>(addr, port_be, proto, true) {
        Some(s) => s,
        // NodePort reached from the node itself, on one of the node's addresses.
        None if cfg::is_node_ip(addr) && cfg::in_nodeport_range(port_be) => {
            match lb::lookup_service::<V4>(0, port_be, proto, true) {
                Some(s) => s,
                None => return Ok(()),
            }
        }
        None => return Ok(()),
    };
    // An unconnected UDP socket that already sends to this frontend keeps its backend. Looked up
    // without creating: most sockets never get here (connect4 always balances afresh).
    // SAFETY: the context the kernel passed; its `sk` is a full socket in these hooks.
    let existing = if sendmsg { unsafe { V4::sock_lb().get_ptr_mut(ctx) } } else { core::ptr::null_mut() };
    // SAFETY: null or this socket's storage, which lives as long as the socket; the kernel runs
    // connect4 and sendmsg4 with the socket locked, so no other program writes it meanwhile.
    let sticky = unsafe { existing.as_ref() }.and_then(|st| sticky_backend(st, addr, port_be));
    let be = match sticky {
        Some(be) => be,
        None => {
            // Before a socket has a source address the client is its network namespace (cilium
            // does the same for socket-level affinity).
            // SAFETY: plain helper call on the context.
            let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
            let client = AffinityKey { netns_cookie: cookie_words(netns), client: 0, rev_nat_id: svc.rev_nat_id };
            let (id, be) = lb::select_backend::<V4>(&svc, client).inspect_err(|_| {
                // Per Service, so an operator sees which one refuses (the drop counter has only
                // the reason).
                stats::count_sock_lb(svc.rev_nat_id, SockLbOp::Refused);
            })?;
            let state = if existing.is_null() {
                // Created zero-filled (all slots free) on the socket's first rewrite.
                // SAFETY: as above.
                unsafe { V4::sock_lb().get_or_insert_ptr_mut(ctx, None) }
            } else {
                existing
            };
            // Without the entry recvmsg/getpeername would show the backend: fail rather than lie
            // (the kernel refuses storage beyond the socket's optmem limit, or on ENOMEM).
            // SAFETY: as for `existing`.
            let state = unsafe { state.as_mut() }.ok_or(DropReason::MapUpdateFailed)?;
            state.record(SockLbEntry {
                frontend: addr,
                backend: be.addr,
                frontend_port_be: port_be,
                backend_port_be: be.port_be,
                backend_id: id,
                rev_nat_id: svc.rev_nat_id,
            });
            be
        }
    };
    // SAFETY: user_ip4/user_port are writable in connect4/sendmsg4.
    unsafe {
        (*sa).user_ip4 = be.addr;
        (*sa).user_port = be.port_be as u32;
    }
    stats::count_sock_lb(svc.rev_nat_id, if sendmsg { SockLbOp::Sendmsg } else { SockLbOp::Connect });
    Ok(())
}

/// The backend this socket already sends this frontend's datagrams to, while that backend still
/// exists at the same address.
#[inline(always)]
fn sticky_backend(state: &SockLbState<u32>, addr: u32, port_be: u16) -> Option<Backend<u32>> {
    let e = state.by_frontend(addr, port_be)?;
    let be = lb::backend::<V4>(e.backend_id)?;
    (be.addr == e.backend && be.port_be == e.backend_port_be).then_some(be)
}

#[inline(always)]
fn xlate_rev(ctx: &SockAddrContext, hook: Hook) -> i32 {
    stats::count_hook(hook, 0);
    let sa = ctx.sock_addr;
    // Only sockets the socket LB rewrote have state; for the others this is one pointer check.
    // SAFETY: the context the kernel passed; its `sk` is a full socket in these hooks.
    let state = unsafe { V4::sock_lb().get_ptr_mut(ctx) };
    // SAFETY: null or this socket's storage (see `try_xlate_fwd`); the matching entry is copied out.
    if let Some(state) = unsafe { state.as_ref() } {
        // SAFETY: fields readable in recvmsg4/getpeername4.
        let (addr, port_be) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
        if let Some(e) = state.by_backend(addr, port_be) {
            // SAFETY: user_ip4/user_port are writable in recvmsg4/getpeername4.
            unsafe {
                (*sa).user_ip4 = e.frontend;
                (*sa).user_port = e.frontend_port_be as u32;
            }
        }
    }
    // These hooks must return 1: they rewrite, they cannot refuse.
    SYS_PROCEED
}
