//! Per-CPU counters: every packet a hook saw, every drop by reason, and what the socket-LB hooks
//! did per Service. All pinned by the agent, so they survive its restarts and `status` reads them.
use aya_ebpf::{macros::map, maps::PerCpuArray};
use dataplane_common::{
    lb::SERVICE_STATS_MAX,
    metrics::{Counter, DROP_REASON_SLOTS, DropReason, HOOK_SLOTS, Hook, SockLbCounter, SockLbOp},
};

#[map(name = "dp_drops_v1")]
static DROPS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(DROP_REASON_SLOTS, 0);

#[map(name = "dp_hooks_v1")]
static HOOKS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(HOOK_SLOTS, 0);

/// Socket-LB operations per Service, indexed by rev-NAT id (the per-packet paths count into
/// `lb_svc_stats_v1`, which the socket hooks never reach for the same traffic).
#[map(name = "lb_sock_stats_v1")]
static SOCK_LB: PerCpuArray<SockLbCounter> = PerCpuArray::with_max_entries(SERVICE_STATS_MAX, 0);

#[inline(always)]
fn bump(map: &PerCpuArray<Counter>, index: u32, bytes: u64) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; no other context writes it while this program runs on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count_hook(hook: Hook, bytes: u64) {
    bump(&HOOKS, hook as u32, bytes);
}

#[inline(always)]
pub fn count_drop(reason: DropReason, bytes: u64) {
    bump(&DROPS, reason as u32, bytes);
}

/// Counts one socket-LB operation for the Service with this rev-NAT id.
#[inline(always)]
pub fn count_sock_lb(rev_nat_id: u32, op: SockLbOp) {
    if let Some(c) = SOCK_LB.get_ptr_mut(rev_nat_id) {
        // SAFETY: per-CPU slot; no other context writes it while this program runs on this CPU.
        unsafe {
            match op {
                SockLbOp::Connect => (*c).connect += 1,
                SockLbOp::Sendmsg => (*c).sendmsg += 1,
                SockLbOp::Refused => (*c).refused += 1,
            }
        }
    }
}
