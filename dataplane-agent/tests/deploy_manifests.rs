//! The install manifests under `manifests/` parse as the Kubernetes types they claim to be, the
//! DaemonSet's arguments are accepted by this binary's CLI, and RBAC grants what the reflectors need.
use std::path::Path;

use clap::Parser;
use dataplane_agent::cli::{Cli, Command};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::ClusterRole;
use serde_json::Value;

fn docs(file: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_multiple::<Value>(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn of_kind<T: serde::de::DeserializeOwned>(file: &str, kind: &str) -> T {
    let doc = docs(file).into_iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind} in {file}"));
    serde_json::from_value(doc).unwrap_or_else(|e| panic!("{file}: {kind}: {e}"))
}

#[test]
fn kustomization_lists_every_manifest() {
    let k = &docs("kustomization.yaml")[0];
    let resources: Vec<&str> = k["resources"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    assert_eq!(resources, ["rbac.yaml", "configmap.yaml", "daemonset.yaml"]);
    for r in resources {
        assert!(!docs(r).is_empty(), "{r} is empty");
    }
}

#[test]
fn daemonset_args_are_valid_for_the_agent() {
    let ds: DaemonSet = of_kind("daemonset.yaml", "DaemonSet");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    let agent = pod.containers.iter().find(|c| c.name == "agent").unwrap();
    let mut argv = agent.command.clone().unwrap();
    argv.extend(agent.args.clone().unwrap());
    // NODE_NAME comes from the Downward API in the cluster; `--routes` requires it.
    argv.push("--node-name=node-a".into());
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let Command::Run(run) = cli.command else { panic!("not `run`: {argv:?}") };
    assert!(run.routes);
    assert_eq!(run.node_file, Path::new("/run/dataplane/node.json"));
    let env: Vec<&str> = agent.env.as_ref().unwrap().iter().map(|e| e.name.as_str()).collect();
    assert!(env.contains(&"NODE_NAME"), "{env:?}");
    let mounts: Vec<&str> = agent.volume_mounts.as_ref().unwrap().iter().map(|m| m.mount_path.as_str()).collect();
    for m in ["/sys/fs/bpf", "/run/dataplane", "/sys/fs/cgroup"] {
        assert!(mounts.contains(&m), "{m} not mounted: {mounts:?}");
    }
}

#[test]
fn install_cni_init_container_runs_the_agent_binary_with_valid_args() {
    let ds: DaemonSet = of_kind("daemonset.yaml", "DaemonSet");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let init = pod.init_containers.unwrap().into_iter().find(|c| c.name == "install-cni").unwrap();
    let mut argv = init.command.clone().unwrap();
    assert_eq!(argv, ["/usr/local/bin/dataplane-agent"], "no shell in the image");
    argv.extend(init.args.clone().unwrap());
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let Command::InstallCni(args) = cli.command else { panic!("not `install-cni`: {argv:?}") };
    let mounts: Vec<&str> = init.volume_mounts.as_ref().unwrap().iter().map(|m| m.mount_path.as_str()).collect();
    for dir in [&args.bin_dir, &args.conf_dir, args.conflist.parent().unwrap()] {
        assert!(mounts.iter().any(|m| Path::new(m) == dir), "{} not mounted: {mounts:?}", dir.display());
    }
}

#[test]
fn cluster_role_grants_list_and_watch_on_what_the_reflectors_watch() {
    let role: ClusterRole = of_kind("rbac.yaml", "ClusterRole");
    let rules = role.rules.unwrap();
    for (group, resource) in [("", "services"), ("", "nodes"), ("discovery.k8s.io", "endpointslices")] {
        let ok = rules.iter().any(|r| {
            r.api_groups.as_ref().is_some_and(|g| g.iter().any(|g| g == group))
                && r.resources.as_ref().is_some_and(|rs| rs.iter().any(|x| x == resource))
                && ["list", "watch"].iter().all(|v| r.verbs.iter().any(|x| x == v))
        });
        assert!(ok, "no list+watch on {group}/{resource}");
    }
}

#[test]
fn cni_conflist_points_at_the_agents_node_file() {
    let cm: ConfigMap = of_kind("configmap.yaml", "ConfigMap");
    let conflist: Value = serde_json::from_str(&cm.data.unwrap()["10-dataplane.conflist"]).unwrap();
    assert_eq!(conflist["cniVersion"], "1.1.0");
    assert_eq!(conflist["plugins"][0]["type"], "dataplane-cni");
    assert_eq!(conflist["plugins"][0]["nodeFile"], dataplane_agent::routes::DEFAULT_NODE_FILE);
}
