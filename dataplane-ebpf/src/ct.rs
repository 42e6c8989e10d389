//! Conntrack lookups and lifetimes, as cilium's `bpf/lib/conntrack.h`: an entry counts only
//! until its `expires_s`; traffic pushes the expiry out at a bounded write rate, and TCP's
//! handshake and teardown pick the lifetime (the rules are pure functions in
//! `dataplane_common::ct`, unit-tested in user space).
//!
//! Time is kernel CLOCK_MONOTONIC in seconds (`bpf_ktime_get_ns() / 1e9`), which user space reads
//! with `clock_gettime(CLOCK_MONOTONIC)`: the agent's GC compares the same numbers. The clock
//! read is a helper call on every conntrack lookup; `bpf_ktime_get_coarse_ns` is a helper call
//! too (no cheaper, measured). `bpf_jiffies64`, which the verifier inlines and cilium prefers,
//! would need the agent to probe `CONFIG_HZ` and the jiffies epoch (docs/datapath.md).
use aya_ebpf::helpers::bpf_ktime_get_ns;
use dataplane_common::ct::{CT_FORWARD, CtEntry, CtKey, ct_reopens, expired};

use crate::{cfg, maps::Family, mem};

/// Now, in the unit of `expires_s`.
#[inline(always)]
pub fn now_s() -> u32 {
    // SAFETY: helper without arguments.
    (unsafe { bpf_ktime_get_ns() } / 1_000_000_000) as u32
}

/// The live entry of `key`, as a pointer into the map (for in-place updates) and a copy. An
/// expired entry counts as absent, and so does a forward entry of a closing flow that a new SYN
/// reopens: either way the caller takes a new-connection decision and overwrites it.
#[inline(always)]
pub fn lookup<F: Family>(key: &CtKey<F::Addr>, now: u32, tcp_flags: u8) -> Option<(*mut CtEntry<F::Addr>, CtEntry<F::Addr>)> {
    let ptr = F::ct().get_ptr_mut(key)?;
    // SAFETY: a value pointer the map returned; copied out at once.
    let e = unsafe { *ptr };
    if expired(e.expires_s, now) || ct_reopens(e.state, e.dir, tcp_flags) {
        return None;
    }
    Some((ptr, e))
}

/// Accounts a packet to the flow of entry `e` (at `ptr`): when its state changes or its expiry
/// is due for a refresh (`CtLifetimes::update`), writes the new state and expiry in place into
/// this entry and into the flow's other entry, so both sides of a flow live and die together.
/// Most packets write nothing.
#[inline(always)]
pub fn touch<F: Family>(ptr: *mut CtEntry<F::Addr>, e: &CtEntry<F::Addr>, proto: u8, tcp_flags: u8, now: u32) {
    let Some((state, expires_s)) = cfg::ct_lifetimes().update(e.state, e.expires_s, e.dir, proto, tcp_flags, now) else {
        return;
    };
    // SAFETY: the map's value pointer (entries are never freed under a running program; a racing
    // writer on another CPU writes the same kind of values: last one wins, both are valid).
    unsafe {
        (*ptr).state = state;
        (*ptr).expires_s = expires_s;
    }
    let peer = peer_key::<F>(e, proto);
    if let Some(p) = F::ct().get_ptr_mut(&peer) {
        // SAFETY: as above.
        unsafe {
            // Only the other side of this very flow (a reused tuple may belong to another one).
            if (*p).dir != e.dir && (*p).backend_id == e.backend_id && (*p).rev_nat_id == e.rev_nat_id {
                (*p).state = state;
                (*p).expires_s = expires_s;
            }
        }
    }
}

/// The key of the other entry of `e`'s flow. Forward entries hold the translated tuple (backend,
/// new source) in their NAT fields, reply entries the original one (frontend, client).
#[inline(always)]
fn peer_key<F: Family>(e: &CtEntry<F::Addr>, proto: u8) -> CtKey<F::Addr> {
    let mut k: CtKey<F::Addr> = mem::zeroed();
    if e.dir == CT_FORWARD {
        k.saddr = e.nat_addr;
        k.daddr = e.orig_addr;
        k.sport_be = e.nat_port_be;
        k.dport_be = e.orig_port_be;
    } else {
        k.saddr = e.orig_addr;
        k.daddr = e.nat_addr;
        k.sport_be = e.orig_port_be;
        k.dport_be = e.nat_port_be;
    }
    k.proto = proto;
    k
}
