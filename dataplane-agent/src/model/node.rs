//! Nodes: their addresses (NodePort frontends, routes) and podCIDRs (routes, the CNI node file).
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use serde::Serialize;

use super::LABEL_TOPOLOGY_ZONE;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeState {
    /// InternalIP addresses, the next hop for routes to this node's podCIDRs.
    pub internal_ips: Vec<IpAddr>,
    /// InternalIP and ExternalIP addresses: where NodePorts are served when this is our node.
    pub addresses: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
    pub zone: Option<String>,
}

/// Unparseable addresses and CIDRs are skipped: the API server validates both, so this only
/// guards against hand-written manifests, and one bad entry must not hide the Node's others.
pub(super) fn nodes(nodes: &[Arc<Node>]) -> BTreeMap<String, NodeState> {
    nodes
        .iter()
        .filter_map(|n| Some((n.metadata.name.clone()?, node_state(n))))
        .collect()
}

fn node_state(node: &Node) -> NodeState {
    let addrs = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    let of_type = |types: &[&str]| -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = addrs
            .into_iter()
            .flatten()
            .filter(|a| types.contains(&a.type_.as_str()))
            .filter_map(|a| a.address.parse().ok())
            .collect();
        v.dedup();
        v
    };
    let spec = node.spec.as_ref();
    // `podCIDRs` supersedes `podCIDR` (which equals podCIDRs[0] when both are set).
    let cidr_strings: Vec<&String> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(list) if !list.is_empty() => list.iter().collect(),
        _ => spec.and_then(|s| s.pod_cidr.as_ref()).into_iter().collect(),
    };
    NodeState {
        internal_ips: of_type(&["InternalIP"]),
        addresses: of_type(&["InternalIP", "ExternalIP"]),
        pod_cidrs: cidr_strings.into_iter().filter_map(|c| c.parse().ok()).collect(),
        zone: node.metadata.labels.as_ref().and_then(|l| l.get(LABEL_TOPOLOGY_ZONE)).cloned(),
    }
}
