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
///
/// `state` and `expires_s` belong to the flow, not to one side: the program writes both entries
/// of a flow together (see [`CtLifetimes::update`]), so a flow lives as long as either direction
/// has traffic.
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
    /// `CT_STATE_*` bits: where the flow's TCP handshake and teardown are.
    pub state: u8,
    pub _pad: u8,
    /// When the entry stops counting: kernel CLOCK_MONOTONIC seconds (`bpf_ktime_get_ns() /
    /// 1e9`; user space: `clock_gettime(CLOCK_MONOTONIC)`). At or past it the entry is treated
    /// as absent by the programs and deleted by the agent's GC.
    pub expires_s: u32,
}
const _: () = assert!(core::mem::size_of::<CtEntry<Ip4>>() == 28);
const _: () = assert!(core::mem::size_of::<CtEntry<Ip6>>() == 52);

/// `state` of a [`CtEntry`]: a packet without SYN was seen (cilium's `seen_non_syn`): the flow
/// is established and gets the long TCP lifetime.
pub const CT_STATE_ESTABLISHED: u8 = 1 << 0;
/// The client (forward side) sent a FIN.
pub const CT_STATE_FIN_FWD: u8 = 1 << 1;
/// The backend (reply side) sent a FIN.
pub const CT_STATE_FIN_REV: u8 = 1 << 2;
/// Either side sent a RST.
pub const CT_STATE_RST: u8 = 1 << 3;

/// TCP header flags, as in the 14th byte of the header.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const IPPROTO_TCP: u8 = 6;

/// Whether a flow in `state` is closing: a RST, or a FIN from both sides (cilium's
/// `rx_closing && tx_closing`). One FIN alone is a half-close: the other side may go on sending
/// for as long as it likes, so the flow keeps its established lifetime.
#[inline(always)]
pub const fn ct_closing(state: u8) -> bool {
    state & CT_STATE_RST != 0 || state & (CT_STATE_FIN_FWD | CT_STATE_FIN_REV) == (CT_STATE_FIN_FWD | CT_STATE_FIN_REV)
}

/// The flow state after a packet of protocol `proto` with TCP flags `tcp_flags` (0 for other
/// protocols) going in direction `dir` ([`CT_FORWARD`]: client to backend).
#[inline(always)]
pub const fn ct_next_state(state: u8, proto: u8, tcp_flags: u8, dir: u8) -> u8 {
    if proto != IPPROTO_TCP {
        return state;
    }
    let mut s = state;
    if tcp_flags & TCP_SYN == 0 {
        s |= CT_STATE_ESTABLISHED;
    }
    if tcp_flags & TCP_FIN != 0 {
        s |= if dir == CT_FORWARD { CT_STATE_FIN_FWD } else { CT_STATE_FIN_REV };
    }
    if tcp_flags & TCP_RST != 0 {
        s |= CT_STATE_RST;
    }
    s
}

/// A new SYN (no ACK) on a forward entry whose flow is closing: the client reuses the tuple for
/// a new connection (cilium's `CT_REOPENED`), which gets a new backend decision.
#[inline(always)]
pub const fn ct_reopens(state: u8, dir: u8, tcp_flags: u8) -> bool {
    dir == CT_FORWARD && ct_closing(state) && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// How long, at most, the remaining lifetime of a busy entry may drop below a full one before a
/// packet rewrites it (cilium's `CT_REPORT_INTERVAL`, 5 s): this bounds the writes per entry to
/// one per this many seconds (or per quarter lifetime, when that is shorter; see
/// [`ct_needs_refresh`]), instead of one per packet.
pub const CT_REFRESH_INTERVAL_S: u32 = 5;

/// Whether an entry expiring at `expires_s` is rewritten at `now_s` for a full lifetime of
/// `lifetime_s`: when its remaining lifetime has dropped below the full one by more than the
/// slack, `min(CT_REFRESH_INTERVAL_S, lifetime_s / 4)`. A busy entry therefore never has less
/// than 3/4 of its lifetime left.
#[inline(always)]
pub const fn ct_needs_refresh(expires_s: u32, now_s: u32, lifetime_s: u32) -> bool {
    let quarter = lifetime_s / 4;
    let slack = if quarter < CT_REFRESH_INTERVAL_S { quarter } else { CT_REFRESH_INTERVAL_S };
    expires_s.saturating_add(slack) < now_s.saturating_add(lifetime_s)
}

/// Whether an entry (conntrack or affinity) expiring at `expires_s` has expired at `now_s`.
#[inline(always)]
pub const fn expired(expires_s: u32, now_s: u32) -> bool {
    expires_s <= now_s
}

/// The lifetimes of conntrack entries, in seconds, per protocol and state. The programs get them
/// as load-time globals; defaults as cilium's BPF datapath (`bpf/node_config.h`:
/// `CT_SYN_TIMEOUT`, `CT_CONNECTION_LIFETIME_TCP`, `CT_CLOSE_TIMEOUT`,
/// `CT_CONNECTION_LIFETIME_NONTCP`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtLifetimes {
    /// TCP before any packet without SYN was seen (half-open).
    pub tcp_syn_s: u32,
    /// TCP once established (also half-closed: one FIN).
    pub tcp_established_s: u32,
    /// TCP after a RST or a FIN from both sides.
    pub tcp_close_s: u32,
    /// Every other protocol the path tracks (UDP; SCTP and ICMP when tracked).
    pub other_s: u32,
}

impl Default for CtLifetimes {
    fn default() -> Self {
        CtLifetimes { tcp_syn_s: 60, tcp_established_s: 21_600, tcp_close_s: 10, other_s: 60 }
    }
}

impl CtLifetimes {
    /// The lifetime of a flow of protocol `proto` in `state`.
    #[inline(always)]
    pub const fn lifetime(&self, proto: u8, state: u8) -> u32 {
        if proto != IPPROTO_TCP {
            self.other_s
        } else if ct_closing(state) {
            self.tcp_close_s
        } else if state & CT_STATE_ESTABLISHED != 0 {
            self.tcp_established_s
        } else {
            self.tcp_syn_s
        }
    }

    /// What a packet does to its (live) flow: the `(state, expires_s)` to write to both of the
    /// flow's entries, or `None` when nothing needs writing. A state change (established, a FIN,
    /// a RST) is written at once, with the new state's lifetime from now; otherwise the expiry is
    /// pushed out only when [`ct_needs_refresh`] says so. A closing flow is never extended: its
    /// close lifetime runs out whatever its last packets (final ACKs, retransmitted FINs) do.
    #[inline(always)]
    pub const fn update(&self, state: u8, expires_s: u32, dir: u8, proto: u8, tcp_flags: u8, now_s: u32) -> Option<(u8, u32)> {
        let next = ct_next_state(state, proto, tcp_flags, dir);
        let lifetime = self.lifetime(proto, next);
        if next != state {
            return Some((next, now_s.saturating_add(lifetime)));
        }
        if ct_closing(state) || !ct_needs_refresh(expires_s, now_s, lifetime) {
            return None;
        }
        Some((state, now_s.saturating_add(lifetime)))
    }

    /// `(state, expires_s)` of a flow created by a packet with these flags (in the forward
    /// direction).
    #[inline(always)]
    pub const fn create(&self, proto: u8, tcp_flags: u8, now_s: u32) -> (u8, u32) {
        let state = ct_next_state(0, proto, tcp_flags, CT_FORWARD);
        (state, now_s.saturating_add(self.lifetime(proto, state)))
    }
}

/// The upper bound of every configurable lifetime (a year): keeps `now + lifetime` far from
/// `u32::MAX` seconds of uptime.
pub const CT_LIFETIME_MAX_S: u32 = 365 * 24 * 3600;

pub const CT_MAX: u32 = 262_144;
/// `_v3`: `state` and `expires_s` added (v2: `dir` moved from the key to the value). An agent
/// finding a pinned `ct4_v2` copies its entries in and unpins it (the agent's `maps::ct`).
pub const CT4_MAP: &str = "ct4_v3";

crate::impl_pod!(CtKey<Ip4>, CtKey<Ip6>, CtEntry<Ip4>, CtEntry<Ip6>);

#[cfg(test)]
mod tests {
    use super::*;

    const L: CtLifetimes = CtLifetimes { tcp_syn_s: 60, tcp_established_s: 21_600, tcp_close_s: 10, other_s: 60 };
    const TCP: u8 = 6;
    const UDP: u8 = 17;

    #[test]
    fn defaults_are_ciliums_bpf_defaults() {
        assert_eq!(CtLifetimes::default(), L);
    }

    #[test]
    fn tcp_state_follows_handshake_and_teardown() {
        let est = CT_STATE_ESTABLISHED;
        assert_eq!(ct_next_state(0, TCP, TCP_SYN, CT_FORWARD), 0, "SYN");
        assert_eq!(ct_next_state(0, TCP, TCP_SYN | TCP_ACK, CT_REPLY), 0, "SYN-ACK");
        assert_eq!(ct_next_state(0, TCP, TCP_ACK, CT_FORWARD), est, "the handshake's ACK");
        let half = ct_next_state(est, TCP, TCP_FIN | TCP_ACK, CT_FORWARD);
        assert_eq!(half, est | CT_STATE_FIN_FWD);
        assert!(!ct_closing(half), "one FIN is a half-close");
        let closed = ct_next_state(half, TCP, TCP_FIN | TCP_ACK, CT_REPLY);
        assert!(ct_closing(closed), "FIN from both sides");
        assert!(!ct_closing(ct_next_state(half, TCP, TCP_FIN, CT_FORWARD)), "the same side's FIN again");
        assert!(ct_closing(ct_next_state(0, TCP, TCP_RST, CT_REPLY)), "RST closes at once");
        assert_eq!(ct_next_state(0, UDP, TCP_FIN | TCP_RST, CT_FORWARD), 0, "no TCP state for other protocols");
    }

    #[test]
    fn lifetime_per_protocol_and_state() {
        assert_eq!(L.lifetime(TCP, 0), 60);
        assert_eq!(L.lifetime(TCP, CT_STATE_ESTABLISHED), 21_600);
        assert_eq!(L.lifetime(TCP, CT_STATE_ESTABLISHED | CT_STATE_FIN_REV), 21_600);
        assert_eq!(L.lifetime(TCP, CT_STATE_FIN_FWD | CT_STATE_FIN_REV), 10);
        assert_eq!(L.lifetime(TCP, CT_STATE_RST), 10);
        assert_eq!(L.lifetime(UDP, 0), 60);
        assert_eq!(L.create(TCP, TCP_SYN, 1000), (0, 1060));
        assert_eq!(L.create(TCP, TCP_ACK, 1000), (CT_STATE_ESTABLISHED, 22_600), "a flow first seen mid-stream");
        assert_eq!(L.create(UDP, 0, 1000), (0, 1060));
    }

    #[test]
    fn refresh_is_bounded_by_the_slack() {
        // Long lifetimes: at most one write per CT_REFRESH_INTERVAL_S.
        let now = 1000;
        assert!(!ct_needs_refresh(now + 21_600, now, 21_600), "just written");
        assert!(!ct_needs_refresh(now + 21_600 - 5, now, 21_600), "5 s below full: not yet");
        assert!(ct_needs_refresh(now + 21_600 - 6, now, 21_600), "6 s below full");
        // Short lifetimes: a quarter of the lifetime, so a busy flow never gets near expiry.
        assert!(!ct_needs_refresh(now + 4, now, 5), "slack 1 s for a 5 s lifetime");
        assert!(ct_needs_refresh(now + 3, now, 5));
        assert!(ct_needs_refresh(now - 1, now, 5), "expired");
        assert!(ct_needs_refresh(0, now, 1), "a 1 s lifetime has no slack");
    }

    #[test]
    fn update_writes_state_changes_at_once_and_refreshes_rarely() {
        let est = CT_STATE_ESTABLISHED;
        let now = 1000;
        assert_eq!(L.update(0, now + 50, CT_FORWARD, TCP, TCP_ACK, now), Some((est, now + 21_600)), "established");
        assert_eq!(L.update(est, now + 21_598, CT_FORWARD, TCP, TCP_ACK, now), None, "within the slack");
        assert_eq!(L.update(est, now + 100, CT_REPLY, TCP, TCP_ACK, now), Some((est, now + 21_600)), "refresh");
        let closing = est | CT_STATE_FIN_FWD | CT_STATE_FIN_REV;
        assert_eq!(L.update(est | CT_STATE_FIN_FWD, now + 21_000, CT_REPLY, TCP, TCP_FIN | TCP_ACK, now), Some((closing, now + 10)));
        assert_eq!(L.update(closing, now + 2, CT_FORWARD, TCP, TCP_ACK, now), None, "a closing flow is not extended");
        assert_eq!(L.update(est, now + 100, CT_FORWARD, TCP, TCP_RST, now), Some((est | CT_STATE_RST, now + 10)));
        assert_eq!(L.update(0, now + 59, CT_FORWARD, UDP, 0, now), None);
        assert_eq!(L.update(0, now + 20, CT_REPLY, UDP, 0, now), Some((0, now + 60)));
    }

    #[test]
    fn a_new_syn_reopens_only_a_closing_forward_entry() {
        let closing = CT_STATE_ESTABLISHED | CT_STATE_RST;
        assert!(ct_reopens(closing, CT_FORWARD, TCP_SYN));
        assert!(!ct_reopens(closing, CT_FORWARD, TCP_SYN | TCP_ACK), "a SYN-ACK is not a new connection");
        assert!(!ct_reopens(closing, CT_REPLY, TCP_SYN), "replies never open flows");
        assert!(!ct_reopens(CT_STATE_ESTABLISHED, CT_FORWARD, TCP_SYN), "a live flow keeps its backend");
    }

    #[test]
    fn expiry_is_inclusive() {
        assert!(expired(1000, 1000));
        assert!(!expired(1001, 1000));
    }
}
