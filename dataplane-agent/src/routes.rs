//! Native routing between nodes: a route to every other Node's podCIDR(s) through that Node's
//! InternalIP of the same family, and the CNI node file with this node's podCIDRs.
//!
//! Our routes carry their own routing protocol number, so after a restart the agent finds the
//! routes it installed before (and prunes those whose Node is gone) without touching anyone
//! else's routes.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::model::NodeState;

/// The rtm_protocol of our routes (`ip route show proto 212`). Unassigned in iproute2's rt_protos.
pub const ROUTE_PROTOCOL: u8 = 212;

/// Where the CNI plugin reads this node's podCIDRs from.
pub const DEFAULT_NODE_FILE: &str = "/run/dataplane/node.json";

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("opening a netlink socket")]
    Connect(#[source] std::io::Error),
    #[error("listing routes")]
    List(#[source] rtnetlink::Error),
    #[error("route {cidr} via {via}: invalid ({reason})")]
    Invalid { cidr: IpNet, via: IpAddr, reason: String },
    #[error("adding route {cidr} via {via}")]
    Add {
        cidr: IpNet,
        via: IpAddr,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("deleting route {cidr}")]
    Delete {
        cidr: IpNet,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("writing the CNI node file {path}")]
    NodeFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The routes this node should have: each other Node's podCIDR -> its InternalIP of the same
/// family. CIDRs of our own node are never routed elsewhere (a misconfigured duplicate would
/// otherwise steal local Pods' traffic).
pub fn wanted(nodes: &BTreeMap<String, NodeState>, self_name: &str) -> BTreeMap<IpNet, IpAddr> {
    let own: Vec<IpNet> = nodes.get(self_name).map(|n| n.pod_cidrs.clone()).unwrap_or_default();
    let mut out = BTreeMap::new();
    for (name, node) in nodes {
        if name == self_name {
            continue;
        }
        for cidr in &node.pod_cidrs {
            let gw = node.internal_ips.iter().find(|ip| ip.is_ipv6() == matches!(cidr, IpNet::V6(_)));
            if let Some(gw) = gw.filter(|_| !own.iter().any(|o| o.contains(cidr) || cidr.contains(o))) {
                out.insert(cidr.trunc(), *gw);
            }
        }
    }
    out
}

/// What one sync did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RouteChanges {
    pub added: Vec<IpNet>,
    pub removed: Vec<IpNet>,
}

/// Keeps the kernel's routes in step with `wanted`. Owns its netlink connection; create it on
/// the thread/runtime whose network namespace should be programmed.
pub struct RouteSync {
    handle: Handle,
    installed: BTreeMap<IpNet, IpAddr>,
}

impl RouteSync {
    /// Connects and adopts the routes a previous run installed (found by `ROUTE_PROTOCOL`).
    pub async fn new() -> Result<Self, RouteError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(RouteError::Connect)?;
        tokio::spawn(conn);
        let mut installed = BTreeMap::new();
        for filter in [RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(), RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()] {
            let msgs: Vec<RouteMessage> = handle.route().get(filter).execute().try_collect().await.map_err(RouteError::List)?;
            for m in msgs.iter().filter(|m| m.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)) {
                if let Some((cidr, gw)) = parse_route(m) {
                    installed.insert(cidr, gw);
                }
            }
        }
        Ok(RouteSync { handle, installed })
    }

    pub fn installed(&self) -> &BTreeMap<IpNet, IpAddr> {
        &self.installed
    }

    /// Adds or replaces changed routes first, then deletes the ones no longer wanted. Stops at
    /// the first failure; `installed` reflects what did succeed, so the next sync retries the rest.
    pub async fn sync(&mut self, wanted: &BTreeMap<IpNet, IpAddr>) -> Result<RouteChanges, RouteError> {
        let mut changes = RouteChanges::default();
        for (&cidr, &via) in wanted {
            if self.installed.get(&cidr) == Some(&via) {
                continue;
            }
            // `replace`: a gateway change swaps the next hop in one step, with no window without a route.
            let msg = route_message(cidr, Some(via))?;
            self.handle.route().add(msg).replace().execute().await.map_err(|source| RouteError::Add { cidr, via, source })?;
            self.installed.insert(cidr, via);
            changes.added.push(cidr);
        }
        let stale: Vec<IpNet> = self.installed.keys().filter(|c| !wanted.contains_key(c)).copied().collect();
        for cidr in stale {
            let msg = route_message(cidr, None)?;
            match self.handle.route().del(msg).execute().await {
                Ok(()) => {}
                // Already gone (someone removed it by hand): the goal is reached.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_esrch() => {}
                Err(source) => return Err(RouteError::Delete { cidr, source }),
            }
            self.installed.remove(&cidr);
            changes.removed.push(cidr);
        }
        Ok(changes)
    }
}

/// ESRCH: the kernel's "no such route" on delete.
fn libc_esrch() -> i32 {
    nix::errno::Errno::ESRCH as i32
}

fn route_message(cidr: IpNet, via: Option<IpAddr>) -> Result<RouteMessage, RouteError> {
    let invalid = |reason: String| RouteError::Invalid { cidr, via: via.unwrap_or(cidr.addr()), reason };
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(cidr.addr(), cidr.prefix_len())
        .map_err(|e| invalid(e.to_string()))?;
    if let Some(gw) = via {
        b = b.gateway(gw).map_err(|e| invalid(e.to_string()))?;
    }
    Ok(b.protocol(RouteProtocol::Other(ROUTE_PROTOCOL)).build())
}

fn parse_route(m: &RouteMessage) -> Option<(IpNet, IpAddr)> {
    let addr = |a: &RouteAddress| match a {
        RouteAddress::Inet(v4) => Some(IpAddr::from(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::from(*v6)),
        _ => None,
    };
    let (mut dst, mut gw) = (None, None);
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = addr(d),
            RouteAttribute::Gateway(g) => gw = addr(g),
            _ => {}
        }
    }
    Some((IpNet::new(dst?, m.header.destination_prefix_length).ok()?, gw?))
}

/// The node file's content: `{"podCIDRs": [...]}`.
pub fn node_file_json(pod_cidrs: &[IpNet]) -> String {
    serde_json::json!({ "podCIDRs": pod_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>() }).to_string() + "\n"
}

/// Writes the CNI node file if its content differs; write-then-rename so the CNI plugin never
/// reads half a file. Returns whether it changed.
pub fn write_node_file(path: &Path, pod_cidrs: &[IpNet]) -> Result<bool, RouteError> {
    let err = |source| RouteError::NodeFile { path: path.to_path_buf(), source };
    let content = node_file_json(pod_cidrs);
    if std::fs::read_to_string(path).ok().as_deref() == Some(content.as_str()) {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, &content).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(ips: &[&str], cidrs: &[&str]) -> NodeState {
        NodeState {
            internal_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            addresses: vec![],
            pod_cidrs: cidrs.iter().map(|s| s.parse().unwrap()).collect(),
            zone: None,
        }
    }

    #[test]
    fn wanted_routes_per_family_skip_self_and_overlaps() {
        let nodes: BTreeMap<String, NodeState> = [
            ("a".to_string(), node(&["192.168.1.10"], &["10.244.0.0/24"])),
            ("b".to_string(), node(&["192.168.1.11", "fd00::11"], &["10.244.1.0/24", "fd00:244:1::/64"])),
            ("c".to_string(), node(&["fd00::12"], &["10.244.2.0/24"])),       // no IPv4 next hop
            ("d".to_string(), node(&["192.168.1.13"], &["10.244.0.0/16"])),    // overlaps ours
        ]
        .into_iter()
        .collect();
        let w = wanted(&nodes, "a");
        let got: Vec<(String, String)> = w.iter().map(|(c, g)| (c.to_string(), g.to_string())).collect();
        assert_eq!(got, [("10.244.1.0/24".into(), "192.168.1.11".into()), ("fd00:244:1::/64".into(), "fd00::11".into())]);
    }

    #[test]
    fn node_file_format() {
        let cidrs = ["10.244.1.0/24".parse().unwrap(), "fd00:244:1::/64".parse().unwrap()];
        assert_eq!(node_file_json(&cidrs), "{\"podCIDRs\":[\"10.244.1.0/24\",\"fd00:244:1::/64\"]}\n");
    }
}
