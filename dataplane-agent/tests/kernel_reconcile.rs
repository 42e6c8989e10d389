//! The reconciler against the real, pinned service maps: golden YAML in -> the map dump out,
//! idempotent re-apply, adoption after a restart with nothing rewritten, and pruning.
use std::path::Path;

use dataplane_agent::maps::{Source, lb::LbMaps};
use dataplane_agent::model::{self, ClusterObjects, ModelConfig};
use dataplane_agent::reconcile::{self, Reconciler};
use dataplane_agent::{loader, source::manifests};
use dataplane_tests::{bpffs::PinDir, require_kernel};

fn objects(cases: &[&str]) -> ClusterObjects {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut objects = ClusterObjects::default();
    let nodes = root.join("nodes.yaml");
    manifests::add_documents(&nodes, &std::fs::read_to_string(&nodes).unwrap(), &mut objects).unwrap();
    for case in cases {
        let path = root.join(case).join("input").join(format!("{case}.yaml"));
        manifests::add_documents(&path, &std::fs::read_to_string(&path).unwrap(), &mut objects).unwrap();
    }
    objects
}

fn plan(cases: &[&str]) -> reconcile::Plan {
    let config = ModelConfig { node_name: Some("node-a".into()), ..Default::default() };
    reconcile::plan(&model::build(&objects(cases), &config))
}

/// The maps as `services` shows them, one line per frontend entry, sorted as text.
fn dump(pins: &Path) -> Vec<String> {
    let lb = LbMaps::open(Source::Pinned(pins)).unwrap();
    let mut lines: Vec<String> = reconcile::table(&lb)
        .unwrap()
        .into_iter()
        .map(|r| {
            format!("{} {} {} {} flags={} aff={} -> [{}] term=[{}]", r.frontend, r.protocol, r.scope, r.kind, r.flags, r.affinity_timeout_s,
                r.backends.join(", "), r.terminating_backends.join(", "))
        })
        .collect();
    lines.sort();
    lines
}

#[test]
fn reconcile_programs_adopts_and_prunes_the_pinned_maps() {
    if !require_kernel() {
        return;
    }
    let pins = PinDir::new();
    // The data path's object holds the maps (as an attached agent would); the reconciler opens
    // them from the pins, as after a restart.
    let _datapath = loader::load(Some(pins.path())).expect("load the object with pinned maps");

    let mut r = Reconciler::new(LbMaps::open(Source::Pinned(pins.path())).unwrap()).unwrap();
    let first = plan(&["coredns", "ingress-lb-local"]);
    let changes = r.apply(&first).unwrap();
    assert_eq!(changes.frontends_written, first.entries.len());
    assert_eq!(
        dump(pins.path()),
        [
            // ingress-nginx: eTP Local -> external entries hold the local endpoint only; internal
            // entries (pods hitting the NodePort / LB IP) all endpoints.
            "0.0.0.0:30080 TCP External NodePort flags=5 aff=0 -> [10.244.0.20:8080 (local)] term=[]",
            "0.0.0.0:30080 TCP Internal NodePort flags=5 aff=0 -> [10.244.0.20:8080 (local), 10.244.1.20:8080] term=[]",
            "0.0.0.0:30443 TCP External NodePort flags=5 aff=0 -> [10.244.0.20:8443 (local)] term=[]",
            "0.0.0.0:30443 TCP Internal NodePort flags=5 aff=0 -> [10.244.0.20:8443 (local), 10.244.1.20:8443] term=[]",
            "10.96.0.10:53 TCP External ClusterIp flags=0 aff=0 -> [10.244.0.3:53 (local)] term=[]",
            "10.96.0.10:53 UDP External ClusterIp flags=0 aff=0 -> [10.244.0.3:53 (local)] term=[]",
            "10.96.0.10:9153 TCP External ClusterIp flags=0 aff=0 -> [10.244.0.3:9153 (local)] term=[]",
            "10.96.120.5:443 TCP External ClusterIp flags=0 aff=0 -> [10.244.0.20:8443 (local), 10.244.1.20:8443] term=[]",
            "10.96.120.5:80 TCP External ClusterIp flags=0 aff=0 -> [10.244.0.20:8080 (local), 10.244.1.20:8080] term=[]",
            "10.96.7.7:7777 UDP External ClusterIp flags=0 aff=300 -> [] term=[]",
            "198.51.100.10:443 TCP External LoadBalancer flags=5 aff=0 -> [10.244.0.20:8443 (local)] term=[]",
            "198.51.100.10:443 TCP Internal LoadBalancer flags=5 aff=0 -> [10.244.0.20:8443 (local), 10.244.1.20:8443] term=[]",
            "198.51.100.10:80 TCP External LoadBalancer flags=5 aff=0 -> [10.244.0.20:8080 (local)] term=[]",
            "198.51.100.10:80 TCP Internal LoadBalancer flags=5 aff=0 -> [10.244.0.20:8080 (local), 10.244.1.20:8080] term=[]",
            "198.51.100.11:7777 UDP External LoadBalancer flags=0 aff=300 -> [] term=[]",
        ]
    );
    assert!(r.apply(&first).unwrap().is_empty(), "re-applying the same plan writes nothing");

    // Restart: a new reconciler adopts every id from the pins and has nothing to write.
    drop(r);
    let mut r = Reconciler::new(LbMaps::open(Source::Pinned(pins.path())).unwrap()).unwrap();
    assert_eq!(r.frontend_count(), first.entries.len());
    assert!(r.apply(&first).unwrap().is_empty(), "a restart must not rewrite unchanged entries");

    // ingress-nginx and game go: their frontends, rev-NAT entries and backends are pruned.
    let second = plan(&["coredns"]);
    let changes = r.apply(&second).unwrap();
    assert_eq!(changes.frontends_removed, first.entries.len() - second.entries.len());
    assert_eq!(changes.backends_removed, 4);
    assert_eq!(dump(pins.path()).len(), 3);
    let lb = LbMaps::open(Source::Pinned(pins.path())).unwrap();
    assert_eq!(lb.backend_ids().unwrap().len(), 2, "only kube-dns's backends remain");
}

/// A rev-NAT id the reconciler hands to a new frontend starts its per-Service counters at zero,
/// whatever a frontend that held the id before left there; ids it does not take are untouched.
#[test]
fn a_new_rev_nat_id_starts_with_zeroed_service_counters() {
    use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
    use dataplane_agent::maps::stats::StatsMaps;
    use dataplane_common::{lb::SERVICE_STATS_MAP, metrics::Counter};
    if !require_kernel() {
        return;
    }
    let pins = PinDir::new();
    let _datapath = loader::load(Some(pins.path())).expect("load the object with pinned maps");
    // Leftover counts, as a removed frontend would leave them, on the first ids the allocator gives.
    let data = MapData::from_pin(pins.path().join(SERVICE_STATS_MAP)).unwrap();
    let mut counters: PerCpuArray<MapData, Counter> = PerCpuArray::try_from(Map::from_map_data(data).unwrap()).unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    let stale = Counter { packets: 7, bytes: 700 };
    for id in 1..64 {
        counters.set(id, PerCpuValues::try_from(vec![stale; cpus]).unwrap(), 0).unwrap();
    }

    let stats = || StatsMaps::open(Source::Pinned(pins.path())).unwrap();
    let mut r = Reconciler::new(LbMaps::open(Source::Pinned(pins.path())).unwrap()).unwrap().with_counters(stats());
    r.apply(&plan(&["coredns"])).unwrap();
    let lb = LbMaps::open(Source::Pinned(pins.path())).unwrap();
    let ids: std::collections::BTreeSet<u32> =
        lb.frontends().unwrap().iter().map(|fe| lb.service(fe).unwrap().unwrap().rev_nat_id).collect();
    assert!(!ids.is_empty());
    for id in &ids {
        assert_eq!(stats().service(*id).unwrap(), Counter::default(), "rev-NAT id {id} kept a previous frontend's counts");
        assert_eq!(stats().sock_lb(*id).unwrap(), Default::default(), "rev-NAT id {id}");
    }
    let untouched = (1..64).find(|id| !ids.contains(id)).unwrap();
    let sum = Counter { packets: stale.packets * cpus as u64, bytes: stale.bytes * cpus as u64 };
    assert_eq!(stats().service(untouched).unwrap(), sum, "an id nobody took keeps its counts");
}
