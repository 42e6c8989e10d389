//! The service, conntrack and affinity maps, and the per-family accessors the generic code uses.
//!
//! [`Family`] is what makes IPv6 a second instance rather than a copy: the selection, conntrack
//! and NAT bookkeeping in `lb` and `ct` are written once over `F: Family`; an IPv6 family adds
//! its own `lb6_*` statics and an `impl Family for V6` block.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use dataplane_common::{
    affinity::{AFFINITY_MAX, AffinityKey, AffinityValue},
    ct::{CT_MAX, CtEntry, CtKey},
    lb::{
        BACKENDS_ARRAY_LEN, Backend, FRONTENDS_MAX, FrontendKey, Ip4, REV_NAT_MAX, RevNat, SERVICE_STATS_MAX, SLOTS_MAX,
        Service, SlotKey, SockLbState,
    },
    metrics::Counter,
};

#[map(name = "lb4_fe_v1")]
static FRONTENDS4: HashMap<FrontendKey<Ip4>, Service> = HashMap::with_max_entries(FRONTENDS_MAX, BPF_F_NO_PREALLOC);
#[map(name = "lb4_slots_v1")]
static SLOTS4: HashMap<SlotKey, u32> = HashMap::with_max_entries(SLOTS_MAX, BPF_F_NO_PREALLOC);
/// Indexed by backend id: an array lookup is inlined by the verifier (no hash, no helper call),
/// which is most of what the conntrack hit path's backend-still-there check used to cost.
#[map(name = "lb4_be_v2")]
static BACKENDS4: Array<Backend<Ip4>> = Array::with_max_entries(BACKENDS_ARRAY_LEN, 0);
#[map(name = "lb4_revnat_v1")]
static REV_NAT4: HashMap<u32, RevNat<Ip4>> = HashMap::with_max_entries(REV_NAT_MAX, BPF_F_NO_PREALLOC);
#[map(name = "ct4_v3")]
static CT4: LruHashMap<CtKey<Ip4>, CtEntry<Ip4>> = LruHashMap::with_max_entries(CT_MAX, 0);
#[map(name = "lb4_affin_v2")]
static AFFINITY4: LruHashMap<AffinityKey<Ip4>, AffinityValue> = LruHashMap::with_max_entries(AFFINITY_MAX, 0);
/// Socket-local storage: one [`SockLbState`] per socket the socket LB rewrote, freed with the
/// socket. A BTF-defined map: the kernel needs the value's BTF type for `SK_STORAGE`.
#[btf_map(name = "lb4_sklb_v1")]
static SOCK_LB4: SkStorage<SockLbState<Ip4>> = SkStorage::new();

/// Per-service packets/bytes, indexed by rev-NAT id. Pinned, so counters survive an agent restart.
#[map(name = "lb_svc_stats_v1")]
static SERVICE_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(SERVICE_STATS_MAX, 0);

pub trait Family {
    type Addr: Copy + Default + PartialEq + 'static;
    fn frontends() -> &'static HashMap<FrontendKey<Self::Addr>, Service>;
    fn slots() -> &'static HashMap<SlotKey, u32>;
    fn backends() -> &'static Array<Backend<Self::Addr>>;
    fn rev_nat() -> &'static HashMap<u32, RevNat<Self::Addr>>;
    fn ct() -> &'static LruHashMap<CtKey<Self::Addr>, CtEntry<Self::Addr>>;
    fn affinity() -> &'static LruHashMap<AffinityKey<Self::Addr>, AffinityValue>;
    fn sock_lb() -> &'static SkStorage<SockLbState<Self::Addr>>;
}

pub struct V4;

impl Family for V4 {
    type Addr = Ip4;
    #[inline(always)]
    fn frontends() -> &'static HashMap<FrontendKey<Ip4>, Service> {
        &FRONTENDS4
    }
    #[inline(always)]
    fn slots() -> &'static HashMap<SlotKey, u32> {
        &SLOTS4
    }
    #[inline(always)]
    fn backends() -> &'static Array<Backend<Ip4>> {
        &BACKENDS4
    }
    #[inline(always)]
    fn rev_nat() -> &'static HashMap<u32, RevNat<Ip4>> {
        &REV_NAT4
    }
    #[inline(always)]
    fn ct() -> &'static LruHashMap<CtKey<Ip4>, CtEntry<Ip4>> {
        &CT4
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey<Ip4>, AffinityValue> {
        &AFFINITY4
    }
    #[inline(always)]
    fn sock_lb() -> &'static SkStorage<SockLbState<Ip4>> {
        &SOCK_LB4
    }
}

/// Counts one packet of `bytes` for the service with this rev-NAT id.
#[inline(always)]
pub fn count_service(rev_nat_id: u32, bytes: u64) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(rev_nat_id) {
        // SAFETY: per-CPU slot; nothing else writes it while this program runs on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}
