//! Connection tracking for the per-packet NAT paths (TC on pod veths, XDP/TC on the uplink).
//!
//! Every translated flow has two LRU entries: the forward one, keyed by the tuple the client sent
//! (before NAT), remembers the backend; the reply one, keyed by the tuple the backend answers
//! with (after NAT), remembers what to restore. Both carry the rev-NAT id, as in cilium.
//!
//! The direction is in the value, not the key: a packet's own tuple is looked up once, and the
//! entry says whether it is a request or a reply. With the direction in the key every request
//! first had to miss on its reply key (one more hash lookup on the hit and miss paths). A tuple
//! can thus be only one of the two; the program refuses to create a flow whose reply tuple is
//! already some other flow's (forward or reply) tuple.
use crate::lb::{Ip4, Ip6};

/// `dir` of a [`CtEntry`].
pub const CT_FORWARD: u8 = 0;
pub const CT_REPLY: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CtKey<Ip4>>() == 16);
const _: () = assert!(core::mem::size_of::<CtKey<Ip6>>() == 40);

/// The source was rewritten too (NodePort to a remote backend, or hairpin): forward entries
/// carry the new source in `orig_*`; reply entries restore the client from `orig_*`.
pub const CT_FLAG_SNAT: u8 = 1 << 0;
/// The flow came in from outside through the uplink (NodePort/LB/externalIP).
pub const CT_FLAG_EXTERNAL: u8 = 1 << 1;

/// A conntrack entry.
///
/// Forward: `nat_addr:nat_port` is the backend (new destination); with [`CT_FLAG_SNAT`],
/// `orig_addr:orig_port` is the new source. Reply: `nat_addr:nat_port` is the frontend the reply
/// must appear to come from (the address is used when the rev-NAT entry has none, i.e. NodePort);
/// with [`CT_FLAG_SNAT`], `orig_addr:orig_port` is the client to restore as destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry<A> {
    pub nat_addr: A,
    pub orig_addr: A,
    pub nat_port_be: u16,
    pub orig_port_be: u16,
    pub backend_id: u32,
    pub rev_nat_id: u32,
    /// `CT_FLAG_*` bits.
    pub flags: u8,
    /// [`CT_FORWARD`] or [`CT_REPLY`]: which side of the flow the key is.
    pub dir: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CtEntry<Ip4>>() == 24);
const _: () = assert!(core::mem::size_of::<CtEntry<Ip6>>() == 48);

pub const CT_MAX: u32 = 262_144;
/// `_v2`: `dir` moved from the key to the value (v1 entries would be misread).
pub const CT4_MAP: &str = "ct4_v2";

crate::impl_pod!(CtKey<Ip4>, CtKey<Ip6>, CtEntry<Ip4>, CtEntry<Ip6>);
