//! `dataplane-agent cleanup-kube-proxy` against the rules the real kube-proxy v1.34.9 wrote, in
//! iptables and in nftables mode: everything of kube-proxy's goes, the kubelet's chain and
//! someone else's rule stay, and `--dry-run` changes nothing.
use std::{net::SocketAddr, time::Duration};

use dataplane_tests::{
    cluster::{proc, wait_for},
    k8s,
    kube_proxy::{self, KubeProxy, Mode, Options},
    netns::NetNs,
    require_kernel,
    scratch::TempDir,
};
use serde_json::json;

fn agent_in(ns: &NetNs, args: &[&str]) -> String {
    let bins = proc::Binaries::locate().unwrap();
    let cmd = proc::command(ns.name(), None, &bins.agent, args).unwrap();
    String::from_utf8_lossy(&proc::output("dataplane-agent cleanup-kube-proxy", cmd).unwrap().stdout).into_owned()
}

#[test]
fn cleanup_kube_proxy_removes_what_the_real_kube_proxy_wrote_in_both_modes() {
    if !require_kernel() {
        return;
    }
    let access = k8s::shared().unwrap();
    let api = access.admin().unwrap();
    let name = dataplane_tests::unique_name();
    // A Node for --hostname-override, and a Service with an endpoint kube-proxy will program
    // (no service-proxy-name label: kube-proxy's to serve).
    let node = api.apply(&json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {"podCIDR": "10.244.9.0/24", "podCIDRs": ["10.244.9.0/24"]}})).unwrap();
    // kube-proxy waits for its Node's addresses, which a kubelet reports.
    api.patch_status(&node, json!({"addresses": [{"type": "InternalIP", "address": "192.168.200.1"}]})).unwrap();
    api.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})).unwrap();
    api.apply(&json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": name},
        "spec": {"type": "NodePort", "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}))
        .unwrap();
    api.apply(&json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": name, "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.9.9"], "conditions": {"ready": true}}]}))
        .unwrap();

    for mode in [Mode::Iptables, Mode::Nftables] {
        let ns = NetNs::new();
        ns.ip(&["addr", "add", "192.168.200.1/32", "dev", "lo"]);
        let addr: SocketAddr = "192.168.200.1:6443".parse().unwrap();
        let _door = access.expose(&ns, addr).unwrap();
        let tmp = TempDir::new();
        let kubeconfig = tmp.path().join("kubeconfig");
        let cp_dir = access.admin_kubeconfig.parent().unwrap();
        kube_proxy::write_admin_kubeconfig(&kubeconfig, addr, cp_dir, &access.ca_cert).unwrap();
        let opts = Options { mode, kubeconfig, node_name: name.clone(), cluster_cidr: "10.244.0.0/16".into(), log: tmp.path().join("kube-proxy.log") };
        // Someone else's rule and the kubelet's chain, which must survive.
        ns.exec(&["iptables", "-N", "KUBE-FIREWALL"]);
        ns.exec(&["iptables", "-A", "INPUT", "-m", "comment", "--comment", "keep-me", "-j", "ACCEPT"]);
        let mut kp = KubeProxy::start(&ns, &k8s::bin_dir().unwrap().join("kube-proxy"), &opts).unwrap();
        wait_for(&format!("kube-proxy ({}) to program the Service", mode.flag()), Duration::from_secs(30), || {
            assert!(kp.alive(), "kube-proxy exited: {}", std::fs::read_to_string(&opts.log).unwrap_or_default());
            let listing = kube_proxy::listing(&ns, mode).ok()?;
            kube_proxy::dnat_destinations(&listing, mode).iter().any(|d| d.to_string() == "10.244.9.9:8080").then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(&opts.log).unwrap_or_default().lines().rev().take(30).collect::<Vec<_>>().join("\n")));
        drop(kp);
        let written = kube_proxy::leftovers(&ns).unwrap();
        let marker = if mode == Mode::Iptables { "KUBE-SERVICES" } else { "table ip kube-proxy" };
        assert!(written.iter().any(|l| l.contains(marker)), "{}: kube-proxy wrote {written:?}", mode.flag());

        let plan = agent_in(&ns, &["cleanup-kube-proxy", "--dry-run"]);
        assert!(plan.contains("would remove"), "{plan}");
        assert_eq!(kube_proxy::leftovers(&ns).unwrap(), written, "--dry-run changed the rules");

        let done = agent_in(&ns, &["cleanup-kube-proxy"]);
        eprintln!("{}:\n{done}", mode.flag());
        let left: Vec<String> = kube_proxy::leftovers(&ns).unwrap().into_iter().filter(|l| !l.contains("KUBE-FIREWALL")).collect();
        assert!(left.is_empty(), "{}: left behind: {left:?}", mode.flag());
        let rules = ns.exec(&["iptables-save"]);
        assert!(rules.contains(":KUBE-FIREWALL") && rules.contains("keep-me"), "the kubelet's chain or another rule went:\n{rules}");
        // Nothing left to do the second time.
        assert!(agent_in(&ns, &["cleanup-kube-proxy"]).contains("nothing of kube-proxy's found"));
    }
    let _ = api.delete(&node, None);
    let _ = api.delete(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}), None);
}
