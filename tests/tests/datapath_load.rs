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
