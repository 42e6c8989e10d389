//! The incremental sync path against the real, pinned service maps: model -> planner ->
//! `apply_touched`. After every step the maps must hold what a full `apply` of the whole plan
//! gives, which a fresh reconciler (adopting the pins) checks by having nothing to write.
use std::path::Path;
use std::sync::Arc;

use dataplane_agent::maps::{Source, lb::LbMaps};
use dataplane_agent::model::{ClusterObjects, ModelCache, ModelConfig};
use dataplane_agent::reconcile::{self, Changes, Planner, Reconciler};
use dataplane_agent::{loader, source::manifests};
use dataplane_tests::{bpffs::PinDir, require_kernel};

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nspec: {podCIDR: 10.244.0.0/24}\n\
                    status: {addresses: [{type: InternalIP, address: 192.168.1.10}]}\n";

/// Service `i` (ClusterIP 10.96.0.i, or `type_`) with endpoints 10.244.<i>.1..=n, the first `down` not ready.
fn service(i: u8, type_: &str, n: u8, down: u8) -> String {
    let mut y = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\n\
         spec: {{type: {type_}, clusterIP: 10.96.0.{i}, ports: [{{name: http, port: 80, nodePort: 3008{i}}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: s{i}-1, namespace: default, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
    );
    for e in 1..=n {
        y += &format!("- {{addresses: [10.244.{i}.{e}], nodeName: node-b, conditions: {{ready: {}}}}}\n", e > down);
    }
    y
}

fn objects(docs: &[String]) -> ClusterObjects {
    let mut objects = ClusterObjects::default();
    manifests::add_documents(Path::new("test.yaml"), &(NODE.to_string() + &docs.concat()), &mut objects).unwrap();
    objects
}

fn config() -> ModelConfig {
    ModelConfig { node_name: Some("node-a".into()), ..Default::default() }
}

/// What the sync loop does per snapshot, with the snapshots' unchanged objects re-used as `Arc`s
/// (as the sources hand them out).
struct Sync {
    model: ModelCache,
    planner: Planner,
    r: Reconciler,
    objects: ClusterObjects,
}

impl Sync {
    fn start(pins: &Path, objects: ClusterObjects) -> (Sync, Changes) {
        let mut s = Sync {
            model: ModelCache::new(config()),
            planner: Planner::default(),
            r: Reconciler::new(LbMaps::open(Source::Pinned(pins)).unwrap()).unwrap(),
            objects,
        };
        let changed = s.model.update(&s.objects);
        s.planner.update(s.model.state(), &changed.services);
        let changes = s.r.apply(s.planner.plan()).unwrap();
        (s, changes)
    }

    /// Replaces Service `i`'s objects (a Service and its slice, at 2i and 2i in the lists).
    fn set(&mut self, i: usize, yaml: &str) -> (usize, Changes) {
        let new = objects(&[yaml.to_string()]);
        self.objects.services[i] = new.services[0].clone();
        self.objects.endpoint_slices[i] = new.endpoint_slices[0].clone();
        self.step()
    }

    /// One snapshot through the incremental path: (Services rebuilt, what was written).
    fn step(&mut self) -> (usize, Changes) {
        let changed = self.model.update(&self.objects);
        let touched = self.planner.update(self.model.state(), &changed.services);
        (changed.services.len(), self.r.apply_touched(self.planner.plan(), &touched).unwrap())
    }
}

/// A reconciler started fresh on the pins, given the full plan of `objects`, writes nothing.
fn assert_maps_hold_full_plan(pins: &Path, objects: &ClusterObjects) {
    let mut fresh = Reconciler::new(LbMaps::open(Source::Pinned(pins)).unwrap()).unwrap();
    let full = reconcile::plan(&dataplane_agent::model::build(objects, &config()));
    assert_eq!(fresh.apply(&full).unwrap(), Changes::default(), "the maps differ from the full plan");
    assert_eq!(fresh.frontend_count(), full.entries.len());
    assert_eq!(fresh.backend_count(), full.backends().len(), "an unused backend was left behind");
}

#[test]
fn an_update_to_one_service_touches_only_it_and_a_restart_writes_nothing() {
    assert!(require_kernel());
    let pins = PinDir::new();
    let _datapath = loader::load(Some(pins.path())).expect("load the object with pinned maps");
    let docs: Vec<String> = (1..=5).map(|i| service(i, "ClusterIP", 3, 0)).collect();
    let (mut sync, first) = Sync::start(pins.path(), objects(&docs));
    assert_eq!((first.frontends_written, first.backends_written), (5, 15));

    // One endpoint of s3 goes not-ready (and not serving): s3's entry is rewritten without it
    // and its backend removed; nothing else is written.
    let (rebuilt, changes) = sync.set(2, &service(3, "ClusterIP", 3, 1));
    assert_eq!(rebuilt, 1);
    assert_eq!(changes, Changes { frontends_written: 1, backends_removed: 1, ..Default::default() });
    assert_maps_hold_full_plan(pins.path(), &sync.objects);

    // s4 loses an endpoint: its backend is removed, the others stay.
    let (_, changes) = sync.set(3, &service(4, "ClusterIP", 2, 0));
    assert_eq!(changes, Changes { frontends_written: 1, backends_removed: 1, ..Default::default() });
    assert_maps_hold_full_plan(pins.path(), &sync.objects);

    // The same snapshot again, and a restart on the pins: nothing written.
    assert_eq!(sync.step(), (0, Changes::default()));
    let objects = sync.objects.clone();
    drop(sync);
    let (mut restarted, writes) = Sync::start(pins.path(), objects);
    assert_eq!(writes, Changes::default(), "a restart must adopt the maps, not rewrite them");
    assert_eq!(restarted.step(), (0, Changes::default()));
}

#[test]
fn a_service_that_changes_type_gains_and_loses_its_node_port() {
    assert!(require_kernel());
    let pins = PinDir::new();
    let _datapath = loader::load(Some(pins.path())).expect("load the object with pinned maps");
    let docs: Vec<String> = (1..=3).map(|i| service(i, "ClusterIP", 2, 0)).collect();
    let (mut sync, _) = Sync::start(pins.path(), objects(&docs));
    let lb = LbMaps::open(Source::Pinned(pins.path())).unwrap();

    let (_, changes) = sync.set(1, &service(2, "NodePort", 2, 0));
    assert_eq!(changes, Changes { frontends_written: 1, ..Default::default() }, "the NodePort entry is added");
    assert_eq!(lb.frontends().unwrap().len(), 4);
    assert_maps_hold_full_plan(pins.path(), &sync.objects);

    let (_, changes) = sync.set(1, &service(2, "ExternalName", 2, 0).replace("type: ExternalName,", "type: ExternalName, externalName: x.example.com,"));
    assert_eq!(changes, Changes { frontends_removed: 2, backends_removed: 2, ..Default::default() });
    assert_eq!(lb.frontends().unwrap().len(), 2);
    assert_maps_hold_full_plan(pins.path(), &sync.objects);

    let (_, changes) = sync.set(1, &service(2, "ClusterIP", 2, 0));
    assert_eq!(changes, Changes { frontends_written: 1, backends_written: 2, ..Default::default() });
    assert_maps_hold_full_plan(pins.path(), &sync.objects);
}

#[test]
fn a_relist_prunes_what_the_mirror_did_not_know() {
    assert!(require_kernel());
    let pins = PinDir::new();
    let _datapath = loader::load(Some(pins.path())).expect("load the object with pinned maps");
    let docs: Vec<String> = (1..=3).map(|i| service(i, "ClusterIP", 2, 0)).collect();
    let (mut sync, _) = Sync::start(pins.path(), objects(&docs));

    // Another writer (an older agent that crashed mid-way, a person with bpftool) leaves an
    // entry the mirror does not know: incremental steps do not see it...
    let stray = objects(&[service(9, "ClusterIP", 1, 0)]);
    let mut other = Reconciler::new(LbMaps::open(Source::Pinned(pins.path())).unwrap()).unwrap();
    let mut with_stray = sync.objects.clone();
    with_stray.services.push(stray.services[0].clone());
    with_stray.endpoint_slices.push(stray.endpoint_slices[0].clone());
    other.apply(&reconcile::plan(&dataplane_agent::model::build(&with_stray, &config()))).unwrap();
    sync.objects.services[0] = Arc::new((*sync.objects.services[0]).clone()); // equal content: no change
    assert_eq!(sync.step(), (0, Changes::default()));
    let lb = LbMaps::open(Source::Pinned(pins.path())).unwrap();
    assert_eq!(lb.frontends().unwrap().len(), 4);

    // ...a relist re-reads the maps and diffs everything: the stray entry and its backend go.
    sync.r.readopt().unwrap();
    let changes = sync.r.apply(sync.planner.plan()).unwrap();
    assert_eq!(changes, Changes { frontends_removed: 1, backends_removed: 1, ..Default::default() });
    assert_maps_hold_full_plan(pins.path(), &sync.objects);
}
