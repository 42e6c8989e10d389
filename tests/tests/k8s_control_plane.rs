//! The test control plane itself: real etcd + kube-apiserver + kube-controller-manager in a
//! namespace of the test, ready in ≤ 10 s, and the agent's ServiceAccount holding exactly the
//! rights `manifests/rbac.yaml` grants.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use dataplane_tests::{
    k8s::{Api, ControlPlane, Options},
    netns::NetNs,
    require_kernel,
    scratch::TempDir,
};
use serde_json::json;

#[test]
fn control_plane_starts_within_10_s_and_the_agent_has_exactly_its_rbac() {
    if !require_kernel() {
        return;
    }
    let started = Instant::now();
    let cp = ControlPlane::start(Options::default()).unwrap();
    let took = started.elapsed();
    // The budget the suite plans with; a cold start measures 4-6 s on 2 busy cores.
    assert!(took <= Duration::from_secs(10), "control plane ready after {took:?}");

    let admin = cp.access.admin().unwrap();
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "rbac-check"}});
    admin.apply(&ns).unwrap();
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "rbac-check"},
        "spec": {"ports": [{"port": 80, "protocol": "TCP"}]},
    });
    let stored = admin.apply(&svc).unwrap();
    // The API server defaulted and allocated what the harness left out.
    assert_eq!(stored["spec"]["type"], "ClusterIP");
    assert!(stored["spec"]["clusterIP"].as_str().unwrap().starts_with("10."), "{stored}");

    // The agent's identity, seen from a namespace that is not the control plane's, through a
    // forwarder as the virtual cluster's nodes see it.
    let underlay = NetNs::new();
    underlay.ip(&["addr", "add", "192.168.200.1/24", "dev", "lo"]);
    let addr: SocketAddr = "192.168.200.1:6443".parse().unwrap();
    let _door = cp.access.expose(&underlay, addr).unwrap();
    let tmp = TempDir::new();
    let kc = tmp.path().join("agent.kubeconfig");
    cp.access.write_agent_kubeconfig(&kc, addr).unwrap();
    // Inside the underlay, as an agent on a node: its connections are made there.
    underlay.run(move || {
        let agent = Api::connect(&kc).unwrap();
        let can = |verb: &str, resource: &str| -> bool {
            let (resource, group) = resource.split_once('.').unwrap_or((resource, ""));
            let review = json!({
                "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                "spec": {"resourceAttributes": {"verb": verb, "resource": resource, "group": group}},
            });
            let req = http::Request::post("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews")
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&review).unwrap())
                .unwrap();
            let out: serde_json::Value = agent.block_on(agent.client().request(req)).unwrap();
            out["status"]["allowed"] == true
        };
        for (verb, res) in [("list", "services"), ("watch", "services"), ("list", "endpointslices.discovery.k8s.io"), ("watch", "nodes")] {
            assert!(can(verb, res), "the agent must be allowed to {verb} {res}");
        }
        for (verb, res) in [("create", "services"), ("delete", "endpointslices.discovery.k8s.io"), ("list", "secrets"), ("list", "pods")] {
            assert!(!can(verb, res), "manifests/rbac.yaml must not let the agent {verb} {res}");
        }
        // And a real list with the token works end to end.
        let services: kube::Api<k8s_openapi::api::core::v1::Service> = kube::Api::all(agent.client());
        let list = agent.block_on(services.list(&Default::default())).unwrap();
        assert!(list.items.iter().any(|s| s.metadata.name.as_deref() == Some("web")));
    });
}
