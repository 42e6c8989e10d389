//! The conntrack and affinity GC against real pinned maps: expired entries are deleted, live ones
//! kept exactly, across several batch chunks; and an older agent's conntrack (`ct4_v2`) is
//! carried into the current table at load, its affinity table (`lb4_affin_v1`) dropped.
use std::collections::BTreeSet;

use aya::maps::HashMap;
use dataplane_agent::{
    gc::Gc,
    loader::{self, Config},
    maps::{
        Source,
        affinity::{AFFINITY4_V1_MAP, AffinityMap},
        ct::{self, CT4_V2_MAP, CtMap},
    },
};
use dataplane_common::{
    affinity::{AffinityKey, AffinityValue},
    ct::{CT_FORWARD, CT_REPLY, CT_STATE_ESTABLISHED, CT4_MAP, CtEntry, CtKey, CtLifetimes},
};
use dataplane_tests::{bpffs::PinDir, require_kernel};

fn key(i: u32) -> CtKey<u32> {
    CtKey { saddr: 0x0a00_0000 + i, daddr: 0x0a60_0001, sport_be: (1024 + (i % 50_000) as u16).to_be(), dport_be: 80u16.to_be(), proto: 6, _pad: [0; 3] }
}

fn entry(expires_s: u32) -> CtEntry<u32> {
    CtEntry { nat_addr: 1, orig_addr: 2, nat_port_be: 3, orig_port_be: 4, backend_id: 5, rev_nat_id: 6, flags: 0, dir: CT_FORWARD, state: 0, _pad: 0, expires_s }
}

#[test]
fn gc_deletes_expired_entries_and_keeps_live_ones() {
    if !require_kernel() {
        return;
    }
    let pins = PinDir::new();
    drop(loader::load(Some(pins.path())).expect("load"));
    let now = ct::now_s();
    // 20k flows: more than two of the sweep's 8192-entry chunks. A third expired long ago, a
    // third expire at `now` (expiry is inclusive), a third are live.
    let mut live = BTreeSet::new();
    {
        let mut ctm = CtMap::open(Source::Pinned(pins.path())).unwrap();
        for i in 0..20_000u32 {
            let expires = match i % 3 {
                0 => now.saturating_sub(100),
                1 => now,
                _ => {
                    live.insert(i);
                    now + 600
                }
            };
            ctm.insert(key(i), entry(expires)).unwrap();
        }
        let mut aff = AffinityMap::open(Source::Pinned(pins.path())).unwrap();
        for i in 0..100u32 {
            let k = AffinityKey { netns_cookie: [0; 2], client: i, rev_nat_id: 7 };
            let expires_s = if i < 40 { now.saturating_sub(1) } else { now + 600 };
            aff.insert(k, AffinityValue { backend_id: 1, expires_s, svc_id: 1, slot: 0 }).unwrap();
        }
    }
    let mut gc = Gc::open(pins.path()).unwrap();
    let r = gc.sweep(now).unwrap();
    assert!(r.conntrack.batched, "BPF_MAP_LOOKUP_BATCH/DELETE_BATCH work on the LRU conntrack map here");
    assert_eq!((r.conntrack.seen, r.conntrack.deleted), (20_000, 20_000 - live.len() as u64), "{r:?}");
    assert_eq!((r.affinity.seen, r.affinity.deleted), (100, 40), "{r:?}");

    let ctm = CtMap::open(Source::Pinned(pins.path())).unwrap();
    let left: BTreeSet<u32> = ctm.raw().keys().map(|k| k.unwrap().saddr - 0x0a00_0000).collect();
    assert_eq!(left, live, "exactly the live flows are left");
    for i in live.iter().take(10) {
        assert_eq!(ctm.raw().get(&key(*i), 0).unwrap(), entry(now + 600), "a live entry is untouched");
    }
    let aff = AffinityMap::open(Source::Pinned(pins.path())).unwrap();
    assert!(aff.entries().unwrap().iter().all(|(k, v)| k.client >= 40 && v.expires_s == now + 600));

    // Nothing more to do until time passes; then the rest goes.
    let again = gc.sweep(now).unwrap();
    assert_eq!((again.conntrack.deleted, again.affinity.deleted), (0, 0));
    let later = gc.sweep(now + 600).unwrap();
    assert_eq!((later.conntrack.seen, later.conntrack.deleted), (live.len() as u64, live.len() as u64));
    assert_eq!(later.affinity.deleted, 60);
    assert_eq!(CtMap::open(Source::Pinned(pins.path())).unwrap().dump().unwrap(), vec![]);
}

/// A `ct4_v2` value: `CtEntry` before `state` and `expires_s`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct CtEntryV2 {
    nat_addr: u32,
    orig_addr: u32,
    nat_port_be: u16,
    orig_port_be: u16,
    backend_id: u32,
    rev_nat_id: u32,
    flags: u8,
    dir: u8,
    _pad: [u8; 2],
}
// SAFETY: #[repr(C)], 24 bytes, no padding.
unsafe impl aya::Pod for CtEntryV2 {}

#[test]
fn an_older_agents_conntrack_is_carried_over_and_its_affinity_dropped() {
    if !require_kernel() {
        return;
    }
    let pins = PinDir::new();
    let mut old: HashMap<aya::maps::MapData, CtKey<u32>, CtEntryV2> = HashMap::create(16, 0).unwrap();
    let v2 = |dir: u8| CtEntryV2 { nat_addr: 11, orig_addr: 12, nat_port_be: 13, orig_port_be: 14, backend_id: 15, rev_nat_id: 16, flags: 1, dir, _pad: [0; 2] };
    let udp = CtKey { proto: 17, ..key(2) };
    old.insert(key(1), v2(CT_FORWARD), 0).unwrap();
    old.insert(udp, v2(CT_REPLY), 0).unwrap();
    old.pin(pins.path().join(CT4_V2_MAP)).unwrap();
    let old_aff: HashMap<aya::maps::MapData, u32, u32> = HashMap::create(4, 0).unwrap();
    old_aff.pin(pins.path().join(AFFINITY4_V1_MAP)).unwrap();

    let lifetimes = CtLifetimes { tcp_established_s: 7200, other_s: 30, ..CtLifetimes::default() };
    let before = ct::now_s();
    drop(loader::load_with(Some(pins.path()), &Config { ct: lifetimes, ..Config::default() }).expect("load"));
    let after = ct::now_s();
    assert!(!pins.path().join(CT4_V2_MAP).exists(), "the old conntrack pin is removed");
    assert!(!pins.path().join(AFFINITY4_V1_MAP).exists(), "the old affinity pin is removed");
    assert!(pins.path().join(CT4_MAP).exists());

    let ctm = CtMap::open(Source::Pinned(pins.path())).unwrap();
    let tcp = ctm.raw().get(&key(1), 0).unwrap();
    assert_eq!((tcp.nat_addr, tcp.orig_addr, tcp.nat_port_be, tcp.orig_port_be), (11, 12, 13, 14));
    assert_eq!((tcp.backend_id, tcp.rev_nat_id, tcp.flags, tcp.dir), (15, 16, 1, CT_FORWARD));
    assert_eq!(tcp.state, CT_STATE_ESTABLISHED, "a TCP flow of unknown state is taken as established");
    assert!((before + 7200..=after + 7200).contains(&tcp.expires_s), "{tcp:?}");
    let u = ctm.raw().get(&udp, 0).unwrap();
    assert_eq!((u.state, u.dir), (0, CT_REPLY));
    assert!((before + 30..=after + 30).contains(&u.expires_s), "{u:?}");
    assert_eq!(ctm.dump().unwrap().len(), 2);
}
