//! A multi-node virtual cluster made of network namespaces, for end-to-end tests and the demo.
//!
//! ```text
//!                 underlay netns: bridge br0 (192.168.200.0/24)
//!      ┌───────────────┬───────────────┬───────────────┬──────────────────┐
//!   node-1 eth0     node-2 eth0     node-3 eth0     client eth0
//!   .11             .12             .13             .100
//!   pods 10.244.1/24 10.244.2/24    10.244.3/24
//! ```
//! Every node is a netns with an uplink veth on the underlay bridge, its own cgroup v2 sub-tree,
//! bpffs pin directory and state directory, and runs its own `dataplane-agent` (inside the node's
//! netns and cgroup) fed by one manifests directory that describes the whole cluster. Pods are
//! created by running the real `dataplane-cni` binary in the node's netns; their workload is
//! `echo-server`, in the Pod's netns and a Pod cgroup under the node's. No namespace has a route
//! to the outside world. Everything is named `dpt-<pid>-<n>` and torn down on drop, also when a
//! test fails; a killed run is removed by the sweep.
//!
//! ```no_run
//! use dataplane_tests::cluster::{Cluster, Service};
//! let mut c = Cluster::start(3).unwrap();
//! let a = c.add_pod(0, "web-0").unwrap();
//! let svc = Service::new("web", "10.96.0.10".parse().unwrap(), 80, 8080).endpoints([c.endpoint(a)]);
//! c.apply(svc).unwrap();
//! let replies = c.pod(a).tcp("10.96.0.10:80".parse().unwrap(), 10).unwrap();
//! ```
pub mod client;
pub mod fabric;
pub mod manifests;
pub mod node;
pub mod pod;
pub mod proc;

use std::{
    collections::BTreeMap,
    fmt, fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

pub use client::{Held, Reply, tally};
pub use manifests::{Endpoint, Service};
pub use node::Node;
pub use pod::{Host, Pod};

use crate::{netns::NetNs, scratch::TempDir};

/// The port every echo server listens on (TCP and UDP).
pub const ECHO_PORT: u16 = 8080;
/// The underlay's addresses: nodes get `.11`, `.12`, ...; the external client `.100`.
pub const UNDERLAY_PREFIX: [u8; 3] = [192, 168, 200];
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 100);

#[derive(Debug)]
pub enum ClusterError {
    Binary { name: &'static str, detail: String },
    Io { what: String, source: std::io::Error },
    Command { what: String, status: String, stderr: String, stdout: String },
    AgentDied { node: String, log: String },
    Timeout { what: String, detail: String },
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::Binary { name, detail } => write!(f, "binary {name}: {detail}"),
            ClusterError::Io { what, source } => write!(f, "{what}: {source}"),
            ClusterError::Command { what, status, stderr, stdout } => {
                write!(f, "{what} failed ({status})\n  stderr: {stderr}\n  stdout: {stdout}")
            }
            ClusterError::AgentDied { node, log } => write!(f, "the agent on {node} exited; its log ends with:\n{log}"),
            ClusterError::Timeout { what, detail } => write!(f, "timed out waiting for {what}\n{detail}"),
        }
    }
}

impl std::error::Error for ClusterError {}

/// Polls `f` every 20 ms until it returns `Some`, or fails after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T, ClusterError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::Timeout { what: what.to_owned(), detail: String::new() });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Index of a Pod in its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodId(usize);

/// The running cluster. Dropping it removes Pods (CNI DEL), stops agents, and deletes every
/// namespace, cgroup, pin and file it made; fields drop in this order.
#[derive(Debug)]
pub struct Cluster {
    pods: Vec<Option<Pod>>,
    pub nodes: Vec<Node>,
    /// The external client, on the underlay and in no node.
    pub client: Host,
    client_ns: NetNs,
    /// XDP links on the bridge ports (see `fabric`); released before the underlay goes.
    fabric: Vec<std::os::fd::OwnedFd>,
    underlay: NetNs,
    services: BTreeMap<String, Service>,
    bins: proc::Binaries,
    manifests: PathBuf,
    dir: TempDir,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

impl Cluster {
    /// Builds the underlay, `nodes` nodes with their agents (waiting until each has synced), and
    /// the external client.
    pub fn start(nodes: usize) -> Result<Cluster, ClusterError> {
        Self::start_with(nodes, |_| {})
    }

    /// As [`start`](Self::start), reporting each step to `progress` (for the demo).
    pub fn start_with(nodes: usize, mut progress: impl FnMut(&str)) -> Result<Cluster, ClusterError> {
        assert!((1..=9).contains(&nodes), "1 to 9 nodes");
        let bins = proc::Binaries::locate()?;
        let dir = TempDir::try_new().map_err(|e| ClusterError::Io { what: "create the cluster's scratch directory".into(), source: e })?;
        let manifests = dir.path().join("manifests");
        fs::create_dir(&manifests).map_err(io("mkdir manifests"))?;
        progress("underlay: a bridge in its own network namespace");
        let underlay = NetNs::new();
        underlay.ip(&["link", "add", "br0", "type", "bridge"]);
        underlay.ip(&["link", "set", "br0", "up"]);
        let client_ns = NetNs::new();
        Self::plug(&underlay, &client_ns, "client", CLIENT_IP)?;
        let client = Host { netns: client_ns.name().to_owned(), cgroup: None, echo: bins.echo.clone() };
        let mut cluster = Cluster {
            pods: Vec::new(),
            nodes: Vec::new(),
            client,
            client_ns,
            fabric: Vec::new(),
            underlay,
            services: BTreeMap::new(),
            bins,
            manifests,
            dir,
        };
        for i in 0..nodes {
            let n = i + 1;
            let name = format!("node-{n}");
            let ip = Ipv4Addr::new(UNDERLAY_PREFIX[0], UNDERLAY_PREFIX[1], UNDERLAY_PREFIX[2], 10 + n as u8);
            progress(&format!("{name}: network namespace, uplink {ip} on the underlay, cgroup, bpffs pins"));
            let netns = NetNs::new();
            Self::plug(&cluster.underlay, &netns, &format!("n{n}"), ip)?;
            // No sysctls here: the agent itself turns on ip_forward (and accept_local on the
            // uplink) when it attaches, as it must on a real node.
            let node_dir = cluster.dir.path().join(&name);
            fs::create_dir(&node_dir).map_err(io("mkdir node dir"))?;
            cluster.nodes.push(Node {
                name,
                ip,
                pod_cidr: format!("10.244.{n}.0/24"),
                http_port: 19960 + n as u16,
                agent: None,
                netns,
                cgroup: crate::cgroup::Cgroup::new(),
                pins: crate::bpffs::PinDir::new(),
                dir: node_dir,
                manifests: cluster.manifests.clone(),
                bins: cluster.bins.clone(),
            });
        }
        let ports = (1..=nodes).map(|n| format!("n{n}")).chain(["client".to_string()]).collect();
        cluster.fabric = fabric::pass_on_ports(&cluster.underlay, ports)?;
        cluster.write_nodes()?;
        cluster.write_services()?;
        for node in &mut cluster.nodes {
            progress(&format!("{}: starting dataplane-agent (pins {}, cgroup {})", node.name, node.pins.path().display(), node.cgroup.path().display()));
            node.start_agent()?;
        }
        // The agents install routes to the other nodes' podCIDRs: wait for them, so the first
        // cross-node request does not race the route sync.
        for node in &cluster.nodes {
            let want = nodes - 1;
            wait_for(&format!("{want} pod routes on {}", node.name), Duration::from_secs(10), || {
                let proto = dataplane_agent::routes::ROUTE_PROTOCOL.to_string();
                let routes = node.netns.ip(&["-4", "route", "show", "proto", &proto]);
                let have = routes.lines().filter(|l| l.starts_with("10.244.")).count();
                (have >= want).then_some(())
            })
            .map_err(|e| ClusterError::Timeout { what: e.to_string(), detail: node.netns.ip(&["route"]) })?;
        }
        Ok(cluster)
    }

    /// A veth from the underlay bridge into `ns` (as `eth0`, with `ip`/24, no default route),
    /// sending full checksums like a real wire (see [`fabric::tx_checksum_off`]).
    fn plug(underlay: &NetNs, ns: &NetNs, port: &str, ip: Ipv4Addr) -> Result<(), ClusterError> {
        ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", underlay.name()]);
        underlay.ip(&["link", "set", port, "master", "br0", "up"]);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        fabric::tx_checksum_off(ns, "eth0")
    }

    fn write_json(&self, file: &str, value: &serde_json::Value) -> Result<(), ClusterError> {
        // Written aside and renamed in: the agents poll the directory and must never read half a file.
        let tmp = self.manifests.join(format!(".{file}.tmp"));
        fs::write(&tmp, serde_json::to_vec_pretty(value).unwrap_or_default()).map_err(io(format!("write {}", tmp.display())))?;
        fs::rename(&tmp, self.manifests.join(file)).map_err(io(format!("rename {file}")))
    }

    fn write_nodes(&self) -> Result<(), ClusterError> {
        let nodes = self
            .nodes
            .iter()
            .map(|n| manifests::node(&manifests::NodeObject { name: n.name.clone(), internal_ip: n.ip, pod_cidr: n.pod_cidr.clone() }))
            .collect();
        self.write_json("nodes.json", &manifests::list(nodes))
    }

    fn write_services(&self) -> Result<(), ClusterError> {
        let items = self.services.values().flat_map(|s| [s.service(), s.endpoint_slice()]).collect();
        self.write_json("services.json", &manifests::list(items))
    }

    /// Adds or replaces a Service (by name) and waits until every agent has synced it.
    pub fn apply(&mut self, svc: Service) -> Result<(), ClusterError> {
        self.services.insert(svc.name.clone(), svc);
        self.sync()
    }

    /// Removes a Service and waits until every agent has synced.
    pub fn delete(&mut self, name: &str) -> Result<(), ClusterError> {
        self.services.remove(name);
        self.sync()
    }

    /// Writes the Services file and waits for every running agent's next sync.
    fn sync(&mut self) -> Result<(), ClusterError> {
        let since = node::now_ms();
        self.write_services()?;
        for node in &mut self.nodes {
            if node.agent.is_some() {
                node.wait_synced(since, Duration::from_secs(10))?;
            }
        }
        Ok(())
    }

    /// Creates Pod `name` on node `node` (0-based) through the CNI plugin, with its echo server.
    pub fn add_pod(&mut self, node: usize, name: &str) -> Result<PodId, ClusterError> {
        let n = &self.nodes[node];
        let config = serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "dpt-cluster",
            "type": "dataplane-cni",
            // The node file the agent writes from the Node's podCIDRs (the CNI/agent contract).
            "nodeFile": n.node_file(),
            "readinessFile": n.dir.join("ready"),
            "dataDir": n.dir.join("ipam"),
            "logFile": n.dir.join("cni.log"),
        });
        let cni = pod::Cni { binary: self.bins.cni.clone(), node_netns: n.netns.name().to_owned(), config };
        let pod = Pod::create(name, &n.name, n.cgroup.path(), cni, self.bins.echo.clone(), ECHO_PORT)?;
        // The agent attaches TC ingress to the new veth when netlink reports it; wait for its
        // pinned link so the Pod's first packet does not race the attach.
        let pin = n.pod_link_pin(&pod.host_veth);
        wait_for(&format!("the agent on {} to attach TC to {}", n.name, pod.host_veth), Duration::from_secs(5), || pin.exists().then_some(()))
            .map_err(|e| ClusterError::Timeout { what: e.to_string(), detail: n.log_tail() })?;
        self.pods.push(Some(pod));
        Ok(PodId(self.pods.len() - 1))
    }

    /// Deletes a Pod (server stopped, CNI DEL); its id is not reused.
    pub fn remove_pod(&mut self, id: PodId) {
        self.pods[id.0] = None;
    }

    pub fn pod(&self, id: PodId) -> &Pod {
        self.pods[id.0].as_ref().expect("pod was removed")
    }

    /// The Pod as a Service endpoint.
    pub fn endpoint(&self, id: PodId) -> Endpoint {
        let p = self.pod(id);
        Endpoint { pod: p.name.clone(), ip: p.ip, node: p.node.clone() }
    }

    /// Routes `ip` from the external client through node `node` (as an upstream router would
    /// route a LoadBalancer or external IP to a node).
    pub fn client_route(&self, ip: Ipv4Addr, node: usize) {
        self.client_ns.ip(&["route", "replace", &format!("{ip}/32"), "via", &self.nodes[node].ip.to_string()]);
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
