//! The standalone source: reading a directory of YAML, re-reading on change, and keeping the
//! last good state when a file is broken.
use std::time::Duration;

use dataplane_agent::source::filter::{Filter, parse_selector};
use dataplane_agent::source::{self, manifests};

use dataplane_tests::scratch::TempDir;

/// Writes `name` in `dir` write-then-rename, as editors and ConfigMap volumes do, so the reader
/// never sees half a file.
fn write(dir: &TempDir, name: &str, text: &str) {
    let tmp = dir.0.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.0.join(name)).unwrap();
}

const SVC_A: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: default}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
const SVC_B: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: default}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";

fn names(state: &source::SourceState) -> Vec<String> {
    let mut v: Vec<String> =
        state.objects.as_ref().unwrap().services.iter().map(|s| s.metadata.name.clone().unwrap()).collect();
    v.sort();
    v
}

#[test]
fn reads_multi_document_files_lists_and_ignores_other_kinds() {
    let dir = TempDir::new();
    write(&dir, "1.yaml", &format!("{SVC_A}---\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: x}}\n"));
    write(&dir, "2.yml", &format!("apiVersion: v1\nkind: List\nitems:\n- {}", SVC_B.replace('\n', "\n  ")));
    write(&dir, "notes.txt", "not a manifest");
    let objects = manifests::load_dir(&dir.0).unwrap();
    assert_eq!(objects.services.len(), 2);
}

#[test]
fn only_changed_files_are_parsed_again() {
    let dir = TempDir::new();
    write(&dir, "a.yaml", SVC_A);
    write(&dir, "b.yaml", SVC_B);
    let mut cache = manifests::DirCache::default();
    let first = cache.load(&dir.0).unwrap();
    write(&dir, "b.yaml", &SVC_B.replace("10.96.0.2", "10.96.0.22"));
    let second = cache.load(&dir.0).unwrap();
    assert!(std::sync::Arc::ptr_eq(&first.services[0], &second.services[0]), "unchanged a.yaml was parsed again");
    assert_eq!(second.services[1].spec.as_ref().unwrap().cluster_ip.as_deref(), Some("10.96.0.22"));
    write(&dir, "a.yaml", "kind: [");
    assert!(cache.load(&dir.0).is_err());
    write(&dir, "a.yaml", SVC_A);
    let third = cache.load(&dir.0).unwrap();
    assert!(std::sync::Arc::ptr_eq(&second.services[1], &third.services[1]), "a failed load must keep the cache");
}

#[test]
fn a_large_dump_in_one_file_is_read() {
    // More documents and nodes than serde-saphyr's default budget allows in one file.
    let dir = TempDir::new();
    let docs: Vec<String> = (0..3000).map(|i| SVC_A.replace("name: a,", &format!("name: s{i},"))).collect();
    write(&dir, "big.yaml", &docs.join("---\n"));
    assert_eq!(manifests::load_dir(&dir.0).unwrap().services.len(), 3000);
}

#[test]
fn bad_input_gets_a_clear_error() {
    let cases: &[(&str, &str)] = &[
        ("key: [unclosed", "not valid YAML"),
        ("apiVersion: v1\nmetadata: {name: x}\n", "document 1 has no `kind`"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: 80}\n", "document 1 (Service \"x\") does not match the Service schema"),
    ];
    for (text, want) in cases {
        let dir = TempDir::new();
        write(&dir, "bad.yaml", text);
        let err = manifests::load_dir(&dir.0).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains("bad.yaml"), "{text:?}: got {err:?}, want {want:?}");
    }
    let missing = manifests::load_dir(std::path::Path::new("/nonexistent/dpt-manifests")).unwrap_err();
    assert!(missing.to_string().contains("reading manifest directory"), "{missing}");
}

async fn next(rx: &mut source::Subscriber) -> source::SourceState {
    tokio::time::timeout(Duration::from_secs(5), rx.changed()).await.expect("no update within 5s").unwrap();
    rx.borrow_and_update().clone()
}

#[tokio::test]
async fn rereads_on_change_and_keeps_last_good_state_on_bad_yaml() {
    let dir = TempDir::new();
    write(&dir, "svc.yaml", SVC_A);
    let (tx, mut rx) = source::channel();
    let task = tokio::spawn(manifests::run(dir.0.clone(), Duration::from_millis(20), Filter::default(), tx));
    let first = next(&mut rx).await;
    assert_eq!(names(&first), ["a"]);

    write(&dir, "svc.yaml", &format!("{SVC_A}---\n{SVC_B}"));
    let mut state = next(&mut rx).await;
    assert_eq!(names(&state), ["a", "b"]);

    write(&dir, "svc.yaml", "kind: Service\nspec: [oops");
    state = next(&mut rx).await;
    assert!(state.last_error.as_deref().unwrap().contains("not valid YAML"), "{:?}", state.last_error);
    assert_eq!(names(&state), ["a", "b"], "a broken file must not change the published objects");

    write(&dir, "svc.yaml", SVC_B);
    state = next(&mut rx).await;
    assert_eq!(names(&state), ["b"]);
    assert!(state.last_error.is_none());
    task.abort();
}

/// The manifests source passes on what the kube source would get from the API server with the
/// same flags: another proxy's Services and slices and the Nodes outside `--node-selector` are
/// left out; headless slices are kept.
#[tokio::test]
async fn filters_like_the_api_server_would() {
    let dir = TempDir::new();
    let svc = |name: &str, labels: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default, labels: {{{labels}}}}}\nspec: {{clusterIP: None, ports: [{{port: 80}}]}}\n---\n")
    };
    let slice = |name: &str, labels: &str| {
        format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: default, labels: {{{labels}}}}}\naddressType: IPv4\nendpoints: []\n---\n")
    };
    let node = |name: &str, pool: &str| format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{pool: {pool}}}}}\n---\n");
    let proxy = "service.kubernetes.io/service-proxy-name";
    let headless = "service.kubernetes.io/headless: ''";
    write(&dir, "all.yaml", &[
        svc("plain", ""),
        svc("ours", &format!("{proxy}: dp")),
        svc("mesh", &format!("{proxy}: mesh")),
        slice("plain-1", &format!("kubernetes.io/service-name: plain, {headless}")),
        slice("ours-1", &format!("kubernetes.io/service-name: ours, {proxy}: dp")),
        slice("mesh-1", &format!("kubernetes.io/service-name: mesh, {proxy}: mesh")),
        node("a", "blue"),
        node("b", "green"),
    ].concat());
    let names = |s: &source::SourceState| {
        let o = s.objects.as_ref().unwrap();
        let n = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| m.name.clone().unwrap();
        (
            o.services.iter().map(|s| n(&s.metadata)).collect::<Vec<_>>(),
            o.endpoint_slices.iter().map(|s| n(&s.metadata)).collect::<Vec<_>>(),
            o.nodes.iter().map(|s| n(&s.metadata)).collect::<Vec<_>>(),
        )
    };
    for (filter, want) in [
        (Filter::default(), (vec!["plain"], vec!["plain-1"], vec!["a", "b"])),
        (Filter { service_proxy_name: Some("dp".into()), nodes: parse_selector("pool=blue").unwrap() }, (vec!["ours"], vec!["ours-1"], vec!["a"])),
    ] {
        let (tx, mut rx) = source::channel();
        let task = tokio::spawn(manifests::run(dir.0.clone(), Duration::from_millis(20), filter, tx));
        let state = next(&mut rx).await;
        let (s, e, n) = names(&state);
        assert_eq!((s, e, n), (want.0.iter().map(|s| s.to_string()).collect(), want.1.iter().map(|s| s.to_string()).collect(), want.2.iter().map(|s| s.to_string()).collect()));
        task.abort();
    }
}
