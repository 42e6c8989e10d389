//! Counters the data path keeps in per-CPU arrays (the bpf target has no atomic fetch_add on this
//! toolchain, so exact counts need per-CPU slots that user space sums).

/// A packets/bytes pair. Values are summed across CPUs by the reader.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);
crate::impl_pod!(Counter);

/// Why a program dropped a packet. The discriminant is the index into [`DROPS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Shorter than an Ethernet header.
    TruncatedEthernet = 0,
    /// IPv4 header cut short, or its total length exceeds the frame.
    TruncatedIpv4 = 1,
    /// IHL below 5 or version not 4.
    BadIpv4Header = 2,
    /// TCP header cut short, or its data offset is below 5.
    TruncatedTcp = 3,
    /// UDP header cut short.
    TruncatedUdp = 4,
    /// ICMP header cut short.
    TruncatedIcmp = 5,
    /// A Service frontend matched but it has no usable backend.
    NoBackend = 6,
    /// A map update failed (map full, or the kernel refused it).
    MapUpdateFailed = 7,
    /// A checksum or packet rewrite helper failed.
    RewriteFailed = 8,
    /// IPv6 header cut short.
    TruncatedIpv6 = 9,
    /// An externalTrafficPolicy: Local frontend's slot held a backend on another node.
    NoLocalBackend = 10,
    /// A conntrack reply entry whose rev-NAT entry is gone: forwarding it would leak the backend.
    RevNatMissing = 11,
    /// A service slot names a backend id that is not in the backend map.
    BackendMissing = 12,
    /// A new flow's reply tuple (after SNAT) is already taken by another flow.
    SnatCollision = 13,
}

impl DropReason {
    /// Every reason, in index order, for readers that print a table.
    pub const ALL: [DropReason; 14] = [
        DropReason::TruncatedEthernet,
        DropReason::TruncatedIpv4,
        DropReason::BadIpv4Header,
        DropReason::TruncatedTcp,
        DropReason::TruncatedUdp,
        DropReason::TruncatedIcmp,
        DropReason::NoBackend,
        DropReason::MapUpdateFailed,
        DropReason::RewriteFailed,
        DropReason::TruncatedIpv6,
        DropReason::NoLocalBackend,
        DropReason::RevNatMissing,
        DropReason::BackendMissing,
        DropReason::SnatCollision,
    ];

    /// A stable snake_case name, used as a metrics label.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::TruncatedEthernet => "truncated_ethernet",
            DropReason::TruncatedIpv4 => "truncated_ipv4",
            DropReason::BadIpv4Header => "bad_ipv4_header",
            DropReason::TruncatedTcp => "truncated_tcp",
            DropReason::TruncatedUdp => "truncated_udp",
            DropReason::TruncatedIcmp => "truncated_icmp",
            DropReason::NoBackend => "no_backend",
            DropReason::MapUpdateFailed => "map_update_failed",
            DropReason::RewriteFailed => "rewrite_failed",
            DropReason::TruncatedIpv6 => "truncated_ipv6",
            DropReason::NoLocalBackend => "no_local_backend",
            DropReason::RevNatMissing => "rev_nat_missing",
            DropReason::BackendMissing => "backend_missing",
            DropReason::SnatCollision => "snat_collision",
        }
    }
}

/// Number of slots in [`DROPS_MAP`]; leaves room for new reasons without a layout change.
pub const DROP_REASON_SLOTS: u32 = 32;
const _: () = assert!(DropReason::ALL.len() as u32 <= DROP_REASON_SLOTS);

/// Which attach point saw a packet: the index into [`HOOKS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    XdpIngress = 0,
    TcIngress = 1,
    TcEgress = 2,
    SockConnect4 = 3,
    SockSendmsg4 = 4,
    SockRecvmsg4 = 5,
    SockGetpeername4 = 6,
}

impl Hook {
    pub const ALL: [Hook; 7] = [
        Hook::XdpIngress,
        Hook::TcIngress,
        Hook::TcEgress,
        Hook::SockConnect4,
        Hook::SockSendmsg4,
        Hook::SockRecvmsg4,
        Hook::SockGetpeername4,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Hook::XdpIngress => "xdp_ingress",
            Hook::TcIngress => "tc_ingress",
            Hook::TcEgress => "tc_egress",
            Hook::SockConnect4 => "sock_connect4",
            Hook::SockSendmsg4 => "sock_sendmsg4",
            Hook::SockRecvmsg4 => "sock_recvmsg4",
            Hook::SockGetpeername4 => "sock_getpeername4",
        }
    }
}

/// Number of slots in [`HOOKS_MAP`].
pub const HOOK_SLOTS: u32 = 8;
const _: () = assert!(Hook::ALL.len() as u32 <= HOOK_SLOTS);

/// Per-CPU array of [`Counter`], indexed by [`DropReason`].
pub const DROPS_MAP: &str = "dp_drops_v1";
/// Per-CPU array of [`Counter`], indexed by [`Hook`]: every packet each hook saw.
pub const HOOKS_MAP: &str = "dp_hooks_v1";

/// What the socket-LB hooks (cgroup `connect4`/`sendmsg4`) did for one Service: the value of
/// [`SOCK_LB_STATS_MAP`], indexed by rev-NAT id like the per-Service packet counters. The socket
/// hooks see operations, not packets, so there are no byte counts: traffic balanced at connect()
/// never crosses a per-packet program (it needs no NAT).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLbCounter {
    /// connect() calls translated to a backend (TCP connections, connected UDP sockets).
    pub connect: u64,
    /// sendmsg() calls (unconnected UDP datagrams) translated to a backend.
    pub sendmsg: u64,
    /// connect()/sendmsg() refused with ECONNREFUSED because the Service had no usable backend.
    pub refused: u64,
}
const _: () = assert!(core::mem::size_of::<SockLbCounter>() == 24);
crate::impl_pod!(SockLbCounter);

/// Which [`SockLbCounter`] field a socket operation bumps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockLbOp {
    Connect,
    Sendmsg,
    Refused,
}

/// Per-CPU array of [`SockLbCounter`] indexed by rev-NAT id (`lb::SERVICE_STATS_MAX` slots).
pub const SOCK_LB_STATS_MAP: &str = "lb_sock_stats_v1";
