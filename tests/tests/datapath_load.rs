//! The service data path's object loads with its configuration, every program passes the
//! verifier, and pinned maps are re-used by a second load (what an agent restart relies on).
use aya::maps::HashMap;
use dataplane_agent::loader::{self, Config};
use dataplane_common::lb::{FRONTENDS4_MAP, FrontendKey, Ip4, Service};
use dataplane_tests::{bpffs::PinDir, require_kernel};

#[test]
fn every_program_passes_the_verifier_and_pinned_maps_survive_a_reload() {
    if !require_kernel() {
        return;
    }
    let pins = PinDir::new();
    let cfg = Config { node_ips: vec!["10.99.0.2".parse().unwrap()], ..Config::default() };
    let mut first = loader::load_with(Some(pins.path()), &cfg).expect("load");
    loader::verify_all(&mut first).expect("verifier accepts every program");
    for name in loader::PINNED_MAPS {
        assert!(pins.path().join(name).exists(), "{name} is pinned");
    }
    let key = FrontendKey::<Ip4> { addr: u32::from_ne_bytes([10, 96, 0, 1]), port_be: 80u16.to_be(), proto: 6, scope: 0 };
    let svc = Service { svc_id: 7, active: 1, rev_nat_id: 3, ..Service::default() };
    {
        let mut fe: HashMap<_, FrontendKey<Ip4>, Service> = HashMap::try_from(first.map_mut(FRONTENDS4_MAP).unwrap()).unwrap();
        fe.insert(key, svc, 0).unwrap();
    }
    drop(first);
    let second = loader::load_with(Some(pins.path()), &cfg).expect("reload re-uses the pins");
    let fe: HashMap<_, FrontendKey<Ip4>, Service> = HashMap::try_from(second.map(FRONTENDS4_MAP).unwrap()).unwrap();
    assert_eq!(fe.get(&key, 0).unwrap(), svc, "the entry written before the reload is still there");
}

/// The typed service-map wrapper refuses bad input with a reason and writes nothing; good input
/// round-trips, and a shrinking update drops the slots it no longer counts.
#[test]
fn service_map_wrapper_refuses_bad_input_and_changes_nothing() {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use dataplane_agent::maps::{
        MapsError, Source,
        lb::{BackendSpec, LbMaps, Proto, Scope, ServiceSpec, frontend},
    };
    use dataplane_common::lb::ServiceKind;

    if !require_kernel() {
        return;
    }
    let mut ebpf = loader::load(None).expect("load");
    let mut lb = LbMaps::open(Source::Ebpf(&mut ebpf)).unwrap();
    let be = |last: u8| BackendSpec { addr: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 80), local: false, terminating: false };
    lb.upsert_backend(1, be(1)).unwrap();
    lb.upsert_backend(2, be(2)).unwrap();
    let fe = frontend(Ipv4Addr::new(10, 96, 0, 1), 80, Proto::Tcp, Scope::External);
    let spec = |active: Vec<u32>, rev: u32| ServiceSpec {
        svc_id: 5,
        kind: ServiceKind::ClusterIp,
        flags: 0,
        affinity_timeout_s: 0,
        rev_nat_id: rev,
        active,
        terminating: vec![],
    };
    let invalid = |r: Result<(), MapsError>| matches!(r, Err(MapsError::Invalid { .. }));
    assert!(invalid(lb.upsert_backend(0, be(3))), "backend id 0");
    let past_the_array = dataplane_common::lb::BACKENDS_MAX + 1;
    assert!(invalid(lb.upsert_backend(past_the_array, be(3))), "backend id past the array");
    assert!(invalid(lb.upsert_backend(3, BackendSpec { addr: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 3), 0), ..be(3) })), "port 0");
    assert!(invalid(lb.upsert_backend(3, BackendSpec { addr: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 80), ..be(3) })));
    assert!(invalid(lb.upsert_service(&fe, &spec(vec![1, 9], 1))), "unknown backend 9");
    assert!(invalid(lb.upsert_service(&fe, &spec(vec![1], 0))), "rev-NAT id 0");
    assert!(invalid(lb.set_rev_nat(u32::MAX, SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 80))));
    assert_eq!(lb.backend_ids().unwrap(), vec![1, 2], "refused backends were not written");
    assert!(lb.frontends().unwrap().is_empty(), "refused services were not written");

    lb.upsert_service(&fe, &spec(vec![1, 2], 1)).unwrap();
    assert_eq!(lb.service(&fe).unwrap().unwrap(), spec(vec![1, 2], 1));
    lb.upsert_service(&fe, &spec(vec![2], 1)).unwrap();
    assert_eq!(lb.service(&fe).unwrap().unwrap().active, vec![2], "shrunk to one backend");
    lb.remove_service(&fe).unwrap();
    assert!(lb.service(&fe).unwrap().is_none());
    lb.remove_service(&fe).expect("removing an absent service is not an error");

    // Backends live in an array indexed by id: a removed one reads as free, its id is no longer
    // listed, and removing a free id is refused like a hash map's delete of a missing key.
    let top = dataplane_common::lb::BACKENDS_MAX;
    lb.upsert_backend(top, be(9)).expect("the highest id fits the array");
    assert_eq!(lb.backend(top).unwrap(), Some(be(9)));
    lb.remove_backend(1).unwrap();
    assert_eq!(lb.backend(1).unwrap(), None, "a removed backend reads as absent");
    assert_eq!(lb.backend_ids().unwrap(), vec![2, top]);
    assert!(lb.remove_backend(1).is_err(), "removing a free id");
    assert_eq!(lb.backend(top + 1).unwrap(), None, "an id past the array is simply absent");
    lb.clear().unwrap();
    assert!(lb.backend_ids().unwrap().is_empty(), "clear frees every backend");
}

/// An agent upgraded from the hash-map backends (`lb4_be_v1`) keeps every backend at its id: the
/// pinned slots and conntrack entries refer to those ids. The old pin is copied into the array
/// (without overwriting an id the array already uses) and removed.
#[test]
fn backends_pinned_by_an_older_agent_are_migrated_at_their_ids() {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use dataplane_agent::maps::{
        Source,
        lb::{BACKENDS4_V1_MAP, BackendSpec, LbMaps},
    };
    use dataplane_common::lb::{BACKEND_FLAG_LOCAL, Backend};

    if !require_kernel() {
        return;
    }
    let pins = PinDir::new();
    drop(loader::load(Some(pins.path())).expect("load"));
    let spec = |last: u8| BackendSpec { addr: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 8080), local: true, terminating: false };
    LbMaps::open(Source::Pinned(pins.path())).unwrap().upsert_backend(7, spec(70)).unwrap();

    let mut old: HashMap<aya::maps::MapData, u32, Backend<Ip4>> = HashMap::create(16, 0).unwrap();
    let raw = |last: u8| Backend::<Ip4> {
        addr: u32::from_ne_bytes([10, 0, 0, last]),
        port_be: 8080u16.to_be(),
        flags: BACKEND_FLAG_LOCAL,
        state: 0,
    };
    old.insert(3, raw(3), 0).unwrap();
    old.insert(7, raw(7), 0).unwrap();
    old.pin(pins.path().join(BACKENDS4_V1_MAP)).unwrap();

    let lb = LbMaps::open(Source::Pinned(pins.path())).expect("open migrates");
    assert_eq!(lb.backend(3).unwrap(), Some(spec(3)), "copied at its id");
    assert_eq!(lb.backend(7).unwrap(), Some(spec(70)), "an id the array already uses is kept");
    assert_eq!(lb.backend_ids().unwrap(), vec![3, 7]);
    assert!(!pins.path().join(BACKENDS4_V1_MAP).exists(), "the old pin is removed");
    drop(lb);
    let again = LbMaps::open(Source::Pinned(pins.path())).expect("a second open has nothing to migrate");
    assert_eq!(again.backend_ids().unwrap(), vec![3, 7]);

    // The batch read itself (not its per-index fall-back) works on this kernel and crosses its
    // 64k-entry chunks up to the last index.
    let top = dataplane_common::lb::BACKENDS_MAX;
    drop(again);
    LbMaps::open(Source::Pinned(pins.path())).unwrap().upsert_backend(top, spec(9)).unwrap();
    let pinned = aya::maps::MapData::from_pin(pins.path().join(dataplane_common::lb::BACKENDS4_MAP)).unwrap();
    let array: aya::maps::Array<_, Backend<Ip4>> = aya::maps::Array::try_from(aya::maps::Map::from_map_data(pinned).unwrap()).unwrap();
    let batched = dataplane_agent::maps::batch::read_batch(&array).expect("BPF_MAP_LOOKUP_BATCH on the backends array");
    assert_eq!(batched.len(), dataplane_common::lb::BACKENDS_ARRAY_LEN as usize);
    let present: Vec<u32> = batched.iter().filter(|(_, b)| b.is_present()).map(|(id, _)| *id).collect();
    assert_eq!(present, vec![3, 7, top]);
    assert_eq!(batched[top as usize].1, raw(9), "values line up with their indexes");
}

/// An agent upgraded from the socket LB's LRU maps keyed by socket cookie (`lb4_sknat_v1`,
/// `lb4_skfwd_v1`) unpins them: their state now lives in per-socket storage, which `status`
/// reports as such rather than as a fill level (it has no capacity, and cannot be enumerated).
#[test]
fn the_socket_lb_lru_pins_of_an_older_agent_are_removed_and_socket_storage_is_per_socket() {
    use dataplane_agent::maps::stats::fill_levels;
    use dataplane_common::lb::SOCK_LB4_MAP;

    if !require_kernel() {
        return;
    }
    let pins = PinDir::new();
    for name in loader::OBSOLETE_PINS {
        let old: HashMap<aya::maps::MapData, u32, u32> = HashMap::create(16, 0).unwrap();
        old.pin(pins.path().join(name)).unwrap();
    }
    let ebpf = loader::load(Some(pins.path())).expect("load");
    for name in loader::OBSOLETE_PINS {
        assert!(!pins.path().join(name).exists(), "{name} is unpinned");
    }
    assert!(matches!(ebpf.map(SOCK_LB4_MAP), Some(aya::maps::Map::SkStorage(_))), "{SOCK_LB4_MAP} is socket storage");
    drop(ebpf);
    let rows = fill_levels(pins.path(), &loader::PINNED_MAPS);
    let row = rows.iter().find(|r| r.name == SOCK_LB4_MAP).unwrap();
    assert!(row.per_socket && row.error.is_none(), "{row:?}");
    assert_eq!((row.entries, row.max_entries, row.percent), (None, None, None), "no fill level: {row:?}");
    assert_eq!(row.map_type.as_deref(), Some("SkStorage"));
    assert!(rows.iter().all(|r| r.error.is_none()), "every pinned map reads: {rows:#?}");
}
