//! Per-CPU counters: every packet a hook saw, and every drop by reason.
use aya_ebpf::{macros::map, maps::PerCpuArray};
use dataplane_common::metrics::{Counter, DROP_REASON_SLOTS, DropReason, HOOK_SLOTS, Hook};

#[map(name = "dp_drops_v1")]
static DROPS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(DROP_REASON_SLOTS, 0);

#[map(name = "dp_hooks_v1")]
static HOOKS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(HOOK_SLOTS, 0);

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
