//! `manifests/` as a user applies it, checked by the real API server (server-side dry run:
//! defaulting, validation and admission run, nothing is stored), and a broken copy refused.
use std::process::Command;

use dataplane_tests::{k8s, scratch::TempDir};

fn kubectl_apply_dry_run(dir: &std::path::Path) -> std::process::Output {
    let access = k8s::shared().unwrap();
    let mut cmd: Command = access.kubectl();
    cmd.args(["apply", "--dry-run=server", "-k"]).arg(dir);
    cmd.output().unwrap()
}

#[test]
fn kubectl_apply_dry_run_server_accepts_the_manifests_and_refuses_a_broken_copy() {
    let manifests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let out = kubectl_apply_dry_run(&manifests);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for what in ["serviceaccount/dataplane-agent", "clusterrole.rbac.authorization.k8s.io/dataplane-agent", "configmap/dataplane-config", "daemonset.apps/dataplane-agent"] {
        assert!(stdout.contains(what), "{what} not in:\n{stdout}");
    }

    // The same manifests with a field the API does not have: the server refuses it, so the
    // check above is the server's and not a formality.
    let broken = TempDir::new();
    for e in std::fs::read_dir(&manifests).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, broken.path().join(p.file_name().unwrap())).unwrap();
    }
    let ds = broken.path().join("daemonset.yaml");
    let text = std::fs::read_to_string(&ds).unwrap().replace("hostNetwork: true", "hostNetwork: true\n      hostNetworking: true");
    std::fs::write(&ds, text).unwrap();
    let out = kubectl_apply_dry_run(broken.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a DaemonSet with an unknown field was accepted");
    assert!(stderr.contains("hostNetworking"), "{stderr}");
}
