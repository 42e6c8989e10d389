//! sessionAffinity: ClientIP. An LRU from (client, service) to the backend it was last given.
//!
//! The per-packet paths identify the client by its address; the socket hooks, which run before
//! the socket has a source address, by its network namespace cookie (as cilium does), with the
//! address left 0.
use crate::lb::{Ip4, Ip6};

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey<A> {
    /// Network namespace cookie (socket hooks) or `[0, 0]` (per-packet paths).
    pub netns_cookie: [u32; 2],
    /// Client address (per-packet paths) or 0 (socket hooks).
    pub client: A,
    pub rev_nat_id: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey<Ip4>>() == 16);
const _: () = assert!(core::mem::size_of::<AffinityKey<Ip6>>() == 28);

/// The backend a client was given, where it was found, and until when the choice holds.
///
/// `svc_id` and `slot` are the service entry and slot the backend was picked from: a client
/// keeps it only while that slot still holds it (so a backend that left the Service, or whose
/// id was freed and given to another backend, is never used again), and only within the
/// Service's timeout. A backend that stays in the Service but moves to another slot (the
/// agent rewrote the slots) costs the client its affinity once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    /// CLOCK_MONOTONIC seconds (`bpf_ktime_get_ns() / 1e9`), as conntrack's `expires_s`: the
    /// last connection that refreshed it plus the Service's timeout.
    pub expires_s: u32,
    pub svc_id: u32,
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);

impl AffinityValue {
    /// Whether the entry still holds at `now_s` for a Service whose timeout is now `timeout_s`.
    /// An entry that outlives the current timeout (the Service's timeout was lowered) does not.
    #[inline(always)]
    pub const fn fresh(&self, now_s: u32, timeout_s: u32) -> bool {
        now_s < self.expires_s && self.expires_s - now_s <= timeout_s
    }
}

pub const AFFINITY_MAX: u32 = 65_536;
/// `_v2`: an expiry and the slot the backend was found in instead of a last-use timestamp (v1
/// entries are dropped on upgrade: a client loses its affinity once).
pub const AFFINITY4_MAP: &str = "lb4_affin_v2";

crate::impl_pod!(AffinityKey<Ip4>, AffinityKey<Ip6>, AffinityValue);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_until_expiry_and_never_longer_than_the_current_timeout() {
        let v = AffinityValue { backend_id: 1, expires_s: 1100, svc_id: 1, slot: 0 };
        assert!(v.fresh(1000, 100));
        assert!(v.fresh(1099, 100));
        assert!(!v.fresh(1100, 100), "expired");
        assert!(!v.fresh(2000, 100), "long expired");
        assert!(!v.fresh(1000, 10), "the Service's timeout was lowered below what is left");
    }
}
