//! Socket-level load balancing (cgroup v2 sock_addr hooks): the destination of a connect/sendmsg
//! to a frontend is rewritten to a backend once per socket operation, so that traffic needs no
//! per-packet NAT; recvmsg/getpeername show the frontend again.
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use dataplane_common::{
    affinity::AffinityKey,
    lb::{Backend, SockFwd, SockRev, SockRevKey, cookie_words},
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
    // SAFETY: plain helper calls on the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let be = match sticky_backend(cookie, addr, port_be, sendmsg) {
        Some(be) => be,
        None => {
            // Before a socket has a source address the client is its network namespace (cilium
            // does the same for socket-level affinity).
            // SAFETY: as above.
            let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
            let client = AffinityKey { netns_cookie: cookie_words(netns), client: 0, rev_nat_id: svc.rev_nat_id };
            let (id, be) = lb::select_backend::<V4>(&svc, client).inspect_err(|_| {
                // Per Service, so an operator sees which one refuses (the drop counter has only
                // the reason).
                stats::count_sock_lb(svc.rev_nat_id, SockLbOp::Refused);
            })?;
            if sendmsg {
                let key = SockRevKey { cookie: cookie_words(cookie), addr, port_be, _pad: [0; 2] };
                let fwd = SockFwd { addr: be.addr, port_be: be.port_be, _pad: [0; 2], backend_id: id };
                // Best effort: without it the next datagram is balanced afresh.
                let _ = V4::sock_fwd().insert(&key, &fwd, 0);
            }
            be
        }
    };
    let key = SockRevKey { cookie: cookie_words(cookie), addr: be.addr, port_be: be.port_be, _pad: [0; 2] };
    let rev = SockRev { addr, port_be, _pad: [0; 2], rev_nat_id: svc.rev_nat_id };
    // Without this entry recvmsg/getpeername would show the backend: fail rather than lie.
    V4::sock_rev().insert(&key, &rev, 0).map_err(|_| DropReason::MapUpdateFailed)?;
    // SAFETY: user_ip4/user_port are writable in connect4/sendmsg4.
    unsafe {
        (*sa).user_ip4 = be.addr;
        (*sa).user_port = be.port_be as u32;
    }
    stats::count_sock_lb(svc.rev_nat_id, if sendmsg { SockLbOp::Sendmsg } else { SockLbOp::Connect });
    Ok(())
}

/// The backend an unconnected UDP socket already sends this frontend's datagrams to, while that
/// backend still exists at the same address.
#[inline(always)]
fn sticky_backend(cookie: u64, addr: u32, port_be: u16, sendmsg: bool) -> Option<Backend<u32>> {
    if !sendmsg {
        return None;
    }
    let key = SockRevKey { cookie: cookie_words(cookie), addr, port_be, _pad: [0; 2] };
    // SAFETY: copied out at once.
    let fwd = unsafe { V4::sock_fwd().get(&key).copied() }?;
    let id = fwd.backend_id;
    let be = lb::backend::<V4>(id)?;
    (be.addr == fwd.addr && be.port_be == fwd.port_be).then_some(be)
}

#[inline(always)]
fn xlate_rev(ctx: &SockAddrContext, hook: Hook) -> i32 {
    stats::count_hook(hook, 0);
    let sa = ctx.sock_addr;
    // SAFETY: plain helper call; fields readable in recvmsg4/getpeername4.
    let (cookie, addr, port_be) = unsafe { (bpf_get_socket_cookie(sa.cast()), (*sa).user_ip4, (*sa).user_port as u16) };
    let key = SockRevKey { cookie: cookie_words(cookie), addr, port_be, _pad: [0; 2] };
    // SAFETY: copied out at once.
    if let Some(rev) = unsafe { V4::sock_rev().get(&key).copied() } {
        // SAFETY: user_ip4/user_port are writable in recvmsg4/getpeername4.
        unsafe {
            (*sa).user_ip4 = rev.addr;
            (*sa).user_port = rev.port_be as u32;
        }
    }
    // These hooks must return 1: they rewrite, they cannot refuse.
    SYS_PROCEED
}
