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

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    /// CLOCK_MONOTONIC (bpf_ktime_get_ns) of the last connection that used it.
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);

pub const AFFINITY_MAX: u32 = 65_536;
pub const AFFINITY4_MAP: &str = "lb4_affin_v1";

crate::impl_pod!(AffinityKey<Ip4>, AffinityKey<Ip6>, AffinityValue);
