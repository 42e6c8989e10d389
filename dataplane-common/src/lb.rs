//! Service load-balancing tables, shaped like cilium's `bpf/lib/lb.h`.
//!
//! A frontend (address, port, protocol, scope) maps to a [`Service`] entry that says how many
//! backends it has; its backends sit in numbered slots `(svc_id, slot) -> backend id`, and each
//! backend id maps to a [`Backend`]. A reverse-NAT id per frontend lets replies (and socket
//! `recvmsg`/`getpeername`) be rewritten back to the frontend, and is stored in conntrack entries.
//!
//! Every address-carrying type is generic over the address representation `A` ([`Ip4`] now,
//! [`Ip6`] later), so IPv6 is a second instance of the same layout with its own pinned names.
//! All fields are 1-, 2- or 4-byte aligned so that no instance has implicit padding.

/// An IPv4 address in network byte order, as the kernel hands it to programs.
pub type Ip4 = u32;
/// An IPv6 address in network byte order, four big-endian words (`in6_addr` as the kernel sees it).
pub type Ip6 = [u32; 4];

/// `scope` of a [`FrontendKey`]: the entry external traffic uses (and all traffic, unless the
/// service has [`SVC_FLAG_TWO_SCOPES`]).
pub const SCOPE_EXT: u8 = 0;
/// `scope` of a [`FrontendKey`]: the entry for traffic from inside the cluster (pods, the node
/// itself), present only when the external and internal backend sets differ (eTP/iTP Local).
pub const SCOPE_INT: u8 = 1;

/// A frontend: the address, port and protocol clients connect to. NodePort frontends use the
/// address 0 ("any node address"); the programs check the node addresses and the NodePort range
/// they are configured with at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FrontendKey<A> {
    pub addr: A,
    pub port_be: u16,
    /// IPPROTO_TCP / IPPROTO_UDP / IPPROTO_SCTP.
    pub proto: u8,
    /// [`SCOPE_EXT`] or [`SCOPE_INT`].
    pub scope: u8,
}
const _: () = assert!(core::mem::size_of::<FrontendKey<Ip4>>() == 8);
const _: () = assert!(core::mem::size_of::<FrontendKey<Ip6>>() == 20);

/// Service kinds (the `kind` byte of [`Service`]).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    ClusterIp = 0,
    NodePort = 1,
    LoadBalancer = 2,
    ExternalIp = 3,
}

impl ServiceKind {
    pub const fn from_u8(v: u8) -> Option<ServiceKind> {
        match v {
            0 => Some(ServiceKind::ClusterIp),
            1 => Some(ServiceKind::NodePort),
            2 => Some(ServiceKind::LoadBalancer),
            3 => Some(ServiceKind::ExternalIp),
            _ => None,
        }
    }
}

/// externalTrafficPolicy: Local. External traffic keeps its client address (no SNAT) and the
/// external-scope slots hold only node-local backends; the programs refuse a non-local one.
pub const SVC_FLAG_EXT_LOCAL: u8 = 1 << 0;
/// internalTrafficPolicy: Local. The internal-scope slots hold only node-local backends.
pub const SVC_FLAG_INT_LOCAL: u8 = 1 << 1;
/// An entry with [`SCOPE_INT`] exists for this frontend; internal traffic must use it.
pub const SVC_FLAG_TWO_SCOPES: u8 = 1 << 2;

/// The service entry a frontend maps to.
///
/// Backend slots `0 .. active` hold ready backends; slots `active .. active + terminating` hold
/// backends that are serving but terminating, used only when there is no ready one (as
/// kube-proxy does). Both zero: the service has no usable endpoint (connect is refused).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Names this entry's slots in the slot map (unique per frontend and scope).
    pub svc_id: u32,
    pub active: u16,
    pub terminating: u16,
    /// sessionAffinity ClientIP timeout in seconds; 0 = no affinity.
    pub affinity_timeout_s: u32,
    /// Key of the reverse-NAT entry (and the per-service counter slot).
    pub rev_nat_id: u32,
    /// A [`ServiceKind`] as `u8`.
    pub kind: u8,
    /// `SVC_FLAG_*` bits.
    pub flags: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Service>() == 20);

/// Key of the slot map: slot `slot` of service `svc_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotKey {
    pub svc_id: u32,
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<SlotKey>() == 8);

/// `state` of a [`Backend`].
pub const BACKEND_ACTIVE: u8 = 0;
pub const BACKEND_TERMINATING: u8 = 1;

/// The backend is on this node (its traffic needs no SNAT and is allowed under eTP Local).
pub const BACKEND_FLAG_LOCAL: u8 = 1 << 0;

/// A backend, by id: entry `id` of an array map (as katran's reals), so the per-packet lookup is
/// an index the verifier inlines rather than a hash. An all-zero entry is a free id: a backend
/// always has an address and a port (the agent refuses 0 for either), see [`Backend::is_present`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend<A> {
    pub addr: A,
    pub port_be: u16,
    /// `BACKEND_FLAG_*` bits.
    pub flags: u8,
    /// [`BACKEND_ACTIVE`] or [`BACKEND_TERMINATING`].
    pub state: u8,
}
const _: () = assert!(core::mem::size_of::<Backend<Ip4>>() == 8);

const _: () = assert!(core::mem::size_of::<Backend<Ip6>>() == 20);

impl<A: PartialEq + Default> Backend<A> {
    /// Whether this array entry holds a backend (a free id reads as all zeroes).
    #[inline(always)]
    pub fn is_present(&self) -> bool {
        self.port_be != 0 && self.addr != A::default()
    }
}

/// What a reply is rewritten back to: the frontend. A NodePort frontend has address 0 here; its
/// replies take the node address the request arrived on from the conntrack entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNat<A> {
    pub addr: A,
    pub port_be: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<RevNat<Ip4>>() == 8);
const _: () = assert!(core::mem::size_of::<RevNat<Ip6>>() == 20);

/// One Service frontend the socket LB rewrote a socket's destination for: the frontend the
/// application asked for and the backend it got. `recvmsg` and `getpeername` show `frontend` for `backend`;
/// an unconnected UDP socket's next datagram to `frontend` goes to `backend` again.
/// `backend_id == 0` marks a free slot (backend ids start at 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLbEntry<A> {
    pub frontend: A,
    pub backend: A,
    pub frontend_port_be: u16,
    pub backend_port_be: u16,
    pub backend_id: u32,
    pub rev_nat_id: u32,
}
const _: () = assert!(core::mem::size_of::<SockLbEntry<Ip4>>() == 20);
const _: () = assert!(core::mem::size_of::<SockLbEntry<Ip6>>() == 44);

/// How many Services one socket's state holds. A connected socket (TCP, connected UDP) needs
/// one; an unconnected UDP socket needs one per Service it has datagrams in flight with. A
/// power of two, so that the FIFO index is a mask the verifier can bound.
pub const SOCK_LB_SLOTS: usize = 4;
const _: () = assert!(SOCK_LB_SLOTS.is_power_of_two());

/// The socket-LB state of one socket: the value of the socket-local storage [`SOCK_LB4_MAP`]
/// (`BPF_MAP_TYPE_SK_STORAGE`). The kernel creates it on the socket's first rewrite and frees it
/// with the socket, so it can neither fill up nor outlive (or be evicted from under) its socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLbState<A> {
    pub slots: [SockLbEntry<A>; SOCK_LB_SLOTS],
    /// The slot a new frontend takes when none is free (first in, first out).
    pub next: u32,
}
const _: () = assert!(core::mem::size_of::<SockLbState<Ip4>>() == 84);
const _: () = assert!(core::mem::size_of::<SockLbState<Ip6>>() == 180);

impl<A: Copy + PartialEq> SockLbState<A> {
    /// The entry for datagrams to this frontend.
    #[inline(always)]
    pub fn by_frontend(&self, addr: A, port_be: u16) -> Option<SockLbEntry<A>> {
        self.slots
            .iter()
            .find(|e| e.backend_id != 0 && e.frontend == addr && e.frontend_port_be == port_be)
            .copied()
    }

    /// The entry whose backend is `addr:port_be`: what a reply from it, or the peer of a
    /// connected socket, is shown as.
    #[inline(always)]
    pub fn by_backend(&self, addr: A, port_be: u16) -> Option<SockLbEntry<A>> {
        self.slots.iter().find(|e| e.backend_id != 0 && e.backend == addr && e.backend_port_be == port_be).copied()
    }

    /// Records `entry` (its `backend_id` must not be 0): in the slot that already has its
    /// frontend, else in a free slot, else in the next slot in turn (round robin: the oldest while
    /// no slot was freed in between). Any other slot with the same
    /// backend is freed: a backend address can be shown as one frontend only, the latest (as
    /// one socket's connect or datagram to it last asked for).
    #[inline(always)]
    pub fn record(&mut self, entry: SockLbEntry<A>) {
        let mut same = SOCK_LB_SLOTS;
        let mut free = SOCK_LB_SLOTS;
        for (i, e) in self.slots.iter().enumerate() {
            if e.backend_id == 0 {
                if free == SOCK_LB_SLOTS {
                    free = i;
                }
            } else if e.frontend == entry.frontend && e.frontend_port_be == entry.frontend_port_be {
                same = i;
            }
        }
        let at = if same < SOCK_LB_SLOTS {
            same
        } else if free < SOCK_LB_SLOTS {
            free
        } else {
            let oldest = self.next as usize & (SOCK_LB_SLOTS - 1);
            self.next = (oldest as u32 + 1) & (SOCK_LB_SLOTS as u32 - 1);
            oldest
        };
        for (i, e) in self.slots.iter_mut().enumerate() {
            if i != at && e.backend_id != 0 && e.backend == entry.backend && e.backend_port_be == entry.backend_port_be {
                *e = SockLbEntry { backend_id: 0, ..*e };
            }
        }
        // The mask is for the verifier's sake: `at` is below SOCK_LB_SLOTS on every path.
        self.slots[at & (SOCK_LB_SLOTS - 1)] = entry;
    }
}

/// Splits a 64-bit cookie into the two words the map keys carry.
pub const fn cookie_words(cookie: u64) -> [u32; 2] {
    [cookie as u32, (cookie >> 32) as u32]
}

/// Capacities. Service tables are allocated on demand (`BPF_F_NO_PREALLOC`): they are written by
/// the agent and only read per packet.
pub const FRONTENDS_MAX: u32 = 262_144;
pub const SLOTS_MAX: u32 = 1_048_576;
/// Backend ids are `1..=BACKENDS_MAX`; the backends array has one more entry, 0, never used.
pub const BACKENDS_MAX: u32 = 262_144;
/// `max_entries` of the backends array (id 0 is reserved, so ids index it directly).
pub const BACKENDS_ARRAY_LEN: u32 = BACKENDS_MAX + 1;
pub const REV_NAT_MAX: u32 = 262_144;
/// Per-service counters are an array indexed by rev-NAT id, so ids must stay below this.
pub const SERVICE_STATS_MAX: u32 = 262_144;

pub const FRONTENDS4_MAP: &str = "lb4_fe_v1";
pub const SLOTS4_MAP: &str = "lb4_slots_v1";
/// `_v2`: an array indexed by backend id (v1 was a hash map; a pin of one kind cannot be reused
/// as the other).
pub const BACKENDS4_MAP: &str = "lb4_be_v2";
pub const REV_NAT4_MAP: &str = "lb4_revnat_v1";
/// Socket-local storage (socket -> [`SockLbState`]): what `recvmsg`/`getpeername` show instead of
/// the backend, and the backend an unconnected UDP socket's datagrams to a frontend stick to (as
/// kube-proxy's conntrack keeps a UDP flow on one backend). It replaces the LRU hash maps
/// `lb4_sknat_v1` and `lb4_skfwd_v1` keyed by socket cookie, which were never cleaned.
pub const SOCK_LB4_MAP: &str = "lb4_sklb_v1";
/// Per-CPU array of [`crate::metrics::Counter`] indexed by rev-NAT id (family-independent).
pub const SERVICE_STATS_MAP: &str = "lb_svc_stats_v1";

crate::impl_pod!(
    FrontendKey<Ip4>,
    FrontendKey<Ip6>,
    Service,
    SlotKey,
    Backend<Ip4>,
    Backend<Ip6>,
    RevNat<Ip4>,
    RevNat<Ip6>,
    SockLbEntry<Ip4>,
    SockLbEntry<Ip6>,
    SockLbState<Ip4>,
    SockLbState<Ip6>,
);

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fe: u32, be: u32, id: u32) -> SockLbEntry<Ip4> {
        SockLbEntry { frontend: fe, backend: be, frontend_port_be: 80, backend_port_be: 8080, backend_id: id, rev_nat_id: fe }
    }

    #[test]
    fn a_socket_state_finds_its_entries_both_ways() {
        let mut st = SockLbState::<Ip4>::default();
        assert_eq!(st.by_backend(0, 0), None, "a free slot matches nothing, not even the all-zero address");
        st.record(entry(1, 11, 7));
        st.record(entry(2, 12, 8));
        assert_eq!(st.by_frontend(1, 80), Some(entry(1, 11, 7)));
        assert_eq!(st.by_backend(12, 8080), Some(entry(2, 12, 8)));
        assert_eq!(st.by_backend(12, 8081), None, "the port is part of the match");
        // A frontend balanced anew replaces its own slot.
        st.record(entry(1, 13, 9));
        assert_eq!(st.by_frontend(1, 80), Some(entry(1, 13, 9)));
        assert_eq!(st.by_backend(11, 8080), None);
        assert_eq!(st.slots.iter().filter(|e| e.backend_id != 0).count(), 2);
    }

    #[test]
    fn a_full_socket_state_replaces_the_oldest_and_a_backend_shows_one_frontend() {
        let mut st = SockLbState::<Ip4>::default();
        for fe in 1..=SOCK_LB_SLOTS as u32 {
            st.record(entry(fe, 10 + fe, fe));
        }
        st.record(entry(9, 19, 9));
        assert_eq!(st.by_frontend(1, 80), None, "the first in went first");
        for fe in [2, 3, 4, 9] {
            assert!(st.by_frontend(fe, 80).is_some(), "{fe}");
        }
        st.record(entry(10, 20, 10));
        assert_eq!(st.by_frontend(2, 80), None, "then the second");
        // Two frontends reaching the same backend: the backend shows the latest one.
        st.record(entry(3, 20, 11));
        assert_eq!(st.by_backend(20, 8080).map(|e| e.frontend), Some(3));
        assert_eq!(st.by_frontend(10, 80), None, "the older frontend's slot was freed");
        assert!(st.next < SOCK_LB_SLOTS as u32);
    }
}
