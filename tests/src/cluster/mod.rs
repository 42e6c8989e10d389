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
//! netns and cgroup) on its kube source: a real API server (see [`crate::k8s`]), which the agents
//! reach at 192.168.200.1:6443 on the underlay, as the agent's ServiceAccount. Nodes, Services,
//! EndpointSlices and Pods are API objects; a Pod is bound to its node and its status patched as
//! a kubelet would. [`Cluster::start_standalone`] feeds the agents a manifests directory instead.
//! Pods are created by running the real `dataplane-cni` binary in the node's netns; their workload
//! is `echo-server`, in the Pod's netns and a Pod cgroup under the node's. No namespace has a
//! route to the outside world. Everything is named `dpt-<pid>-<n>` and torn down on drop, also
//! when a test fails; a killed run is removed by the sweep.
//!
//! ```no_run
//! use dataplane_tests::cluster::{Cluster, Service};
//! let mut c = Cluster::start(3).unwrap();
//! let a = c.add_pod(0, "web-0").unwrap();
//! let web = c.apply(Service::new("web", 80, 8080).endpoints([c.endpoint(a)])).unwrap();
//! let replies = c.pod(a).tcp((web.vip(), 80).into(), 10).unwrap();
//! ```
pub mod client;
pub mod fabric;
pub mod manifests;
pub mod node;
pub mod objects;
pub mod programmed;
pub mod pod;
pub mod proc;

use std::{
    collections::BTreeMap,
    fmt, fs,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

pub use client::{Held, Reply, tally};
pub use manifests::{Endpoint, Service};
pub use node::Node;
pub use objects::Objects;
pub use pod::{Host, Pod, Steady, SteadyReport};

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
    /// Deleted Services whose frontends the agents have not yet been seen to remove.
    deleted: Vec<Service>,
    bins: proc::Binaries,
    /// Where the objects live: dropped after the nodes (their agents stop first) and before the
    /// underlay (the API front door is in it).
    objects: Objects,
    dir: TempDir,
}

/// Where the agents get the cluster's objects from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// The control plane every test of this run shares ([`crate::k8s::shared`]).
    SharedApi,
    /// A control plane of the caller's (tests that stop or break it).
    Api(&'a crate::k8s::Access),
    /// A manifests directory (`--manifests`): no Kubernetes binaries.
    Manifests,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

impl Cluster {
    /// Builds the underlay, `nodes` nodes with their agents on the shared API server (waiting
    /// until each has synced), and the external client.
    pub fn start(nodes: usize) -> Result<Cluster, ClusterError> {
        Self::start_with(nodes, Source::SharedApi, |_| {})
    }

    /// As [`start`](Self::start), with the agents reading a manifests directory.
    pub fn start_standalone(nodes: usize) -> Result<Cluster, ClusterError> {
        Self::start_with(nodes, Source::Manifests, |_| {})
    }

    /// As [`start`](Self::start) on `source`, reporting each step to `progress` (for the demo).
    pub fn start_with(nodes: usize, source: Source, progress: impl FnMut(&str)) -> Result<Cluster, ClusterError> {
        Self::start_configured(nodes, source, &[], progress)
    }

    /// As [`start`](Self::start), with `flags` (name, value) added to every agent's command line
    /// after the harness's own (e.g. `("--ct-gc-interval", Some("1"))`). They stay in place when
    /// a test restarts an agent.
    pub fn start_with_agent_flags(nodes: usize, flags: &[(&'static str, Option<&str>)]) -> Result<Cluster, ClusterError> {
        Self::start_configured(nodes, Source::SharedApi, flags, |_| {})
    }

    fn start_configured(
        nodes: usize,
        source: Source,
        agent_flags: &[(&'static str, Option<&str>)],
        mut progress: impl FnMut(&str),
    ) -> Result<Cluster, ClusterError> {
        assert!((1..=9).contains(&nodes), "1 to 9 nodes");
        let bins = proc::Binaries::locate()?;
        let dir = TempDir::try_new().map_err(|e| ClusterError::Io { what: "create the cluster's scratch directory".into(), source: e })?;
        progress("underlay: a bridge in its own network namespace");
        let underlay = NetNs::new();
        underlay.ip(&["link", "add", "br0", "type", "bridge"]);
        underlay.ip(&["link", "set", "br0", "up"]);
        // The cluster's name: unique in this run, as the underlay's is.
        let name = underlay.name().to_owned();
        let objects = match source {
            Source::Manifests => Objects::manifests(dir.path())?,
            Source::SharedApi => {
                progress("control plane: the real kube-apiserver shared by this run");
                let access = crate::k8s::shared().map_err(objects::k8s_err)?;
                Objects::api(access, &name, &underlay, dir.path())?
            }
            Source::Api(access) => Objects::api(access, &name, &underlay, dir.path())?,
        };
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
            deleted: Vec::new(),
            bins,
            objects,
            dir,
        };
        for i in 0..nodes {
            let n = i + 1;
            let name = match cluster.objects.api_objects() {
                // Node names are cluster-wide on an API server that many clusters share.
                Some(a) => format!("{}-node-{n}", a.name),
                None => format!("node-{n}"),
            };
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
                source_flags: cluster.objects.agent_flags(),
                extra_flags: agent_flags.iter().map(|(f, v)| (*f, v.map(str::to_owned))).collect(),
                bins: cluster.bins.clone(),
            });
        }
        let ports = (1..=nodes).map(|n| format!("n{n}")).chain(["client".to_string()]).collect();
        cluster.fabric = fabric::pass_on_ports(&cluster.underlay, ports)?;
        cluster.write_nodes()?;
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

    fn write_nodes(&self) -> Result<(), ClusterError> {
        let nodes: Vec<_> = self
            .nodes
            .iter()
            .map(|n| manifests::NodeObject { name: n.name.clone(), internal_ip: n.ip, pod_cidr: n.pod_cidr.clone() })
            .collect();
        self.objects.write_nodes(&nodes)
    }

    /// Adds or replaces a Service (by name; a new one gets its ClusterIP and NodePort allocated),
    /// and waits until every agent has programmed it. Returns it as applied.
    pub fn apply(&mut self, mut svc: Service) -> Result<Service, ClusterError> {
        if let Some(old) = self.services.get(&svc.name) {
            // What the allocator gave stays the Service's, as on a real API server.
            svc.cluster_ip = svc.cluster_ip.or(old.cluster_ip);
            svc.node_port = svc.node_port.or(old.node_port);
        }
        let since = node::now_ms();
        let others: Vec<&Service> = self.services.values().collect();
        self.objects.apply_service(&mut svc, &others)?;
        self.services.insert(svc.name.clone(), svc.clone());
        self.deleted.retain(|d| d.name != svc.name);
        self.wait_programmed(since)?;
        Ok(svc)
    }

    /// The Service `name` as last applied.
    pub fn service(&self, name: &str) -> &Service {
        &self.services[name]
    }

    /// Removes a Service and waits until every agent has removed its frontends.
    pub fn delete(&mut self, name: &str) -> Result<(), ClusterError> {
        let Some(svc) = self.services.remove(name) else { return Ok(()) };
        let since = node::now_ms();
        let rest: Vec<&Service> = self.services.values().collect();
        self.objects.delete_service(&svc, &rest)?;
        self.deleted.push(svc);
        self.wait_programmed(since)
    }

    /// Waits until every running agent's maps hold what the harness applied (see
    /// [`programmed`]) and it has reported a sync that ended at or after `since_ms`.
    fn wait_programmed(&mut self, since_ms: u64) -> Result<(), ClusterError> {
        let want = programmed::Expected::new(self.services.values(), &self.deleted);
        for node in &mut self.nodes {
            if node.agent.is_none() {
                continue;
            }
            let pins = node.pins.path().to_path_buf();
            wait_for(&format!("the agent on {} to program the Services", node.name), Duration::from_secs(15), || {
                want.check(&pins).is_ok().then_some(())
            })
            .map_err(|_| ClusterError::Timeout {
                what: format!("the agent on {} to program the Services", node.name),
                detail: format!("{}\n{}", want.check(&pins).err().unwrap_or_default(), node.log_tail()),
            })?;
            node.wait_synced(since_ms, Duration::from_secs(10))?;
        }
        self.deleted.clear();
        Ok(())
    }

    /// Creates Pod `name` on node `node` (0-based) through the CNI plugin, with its echo server,
    /// labelled `app=<name>`.
    pub fn add_pod(&mut self, node: usize, name: &str) -> Result<PodId, ClusterError> {
        self.add_pod_labeled(node, name, &[("app", name)])
    }

    /// As [`add_pod`](Self::add_pod) with these labels. On the API server the Pod is an object
    /// bound to its node (`spec.nodeName`), with a container port named `echo`, and once the CNI
    /// plugin has wired it and its server listens, its status says Running and Ready with its IP,
    /// as a kubelet would report it.
    pub fn add_pod_labeled(&mut self, node: usize, name: &str, labels: &[(&str, &str)]) -> Result<PodId, ClusterError> {
        if let Some(a) = self.objects.api_objects() {
            a.api.apply(&self.pod_object(node, name, labels)).map_err(objects::k8s_err)?;
        }
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
        let id = PodId(self.pods.len() - 1);
        self.set_pod_ready(id, true)?;
        Ok(id)
    }

    fn pod_object(&self, node: usize, name: &str, labels: &[(&str, &str)]) -> serde_json::Value {
        let namespace = self.objects.api_objects().map(|a| a.name.as_str()).unwrap_or(manifests::NAMESPACE);
        let labels: serde_json::Map<String, serde_json::Value> = labels.iter().map(|(k, v)| (k.to_string(), (*v).into())).collect();
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "nodeName": self.nodes[node].name,
                "automountServiceAccountToken": false,
                "containers": [{"name": "echo", "image": "dataplane.test/echo-server",
                                "ports": [{"name": "echo", "containerPort": ECHO_PORT, "protocol": "TCP"},
                                          {"name": "echo-udp", "containerPort": ECHO_PORT, "protocol": "UDP"}]}],
            },
        })
    }

    /// Patches the Pod's status Ready (or not), as a kubelet does when its readiness probe passes
    /// or fails. Nothing to do standalone.
    pub fn set_pod_ready(&self, id: PodId, ready: bool) -> Result<(), ClusterError> {
        let Some(a) = self.objects.api_objects() else { return Ok(()) };
        let p = self.pod(id);
        let node = self.nodes.iter().find(|n| n.name == p.node).map(|n| n.ip.to_string()).unwrap_or_default();
        let cond = |t: &str, ok: bool| serde_json::json!({"type": t, "status": if ok { "True" } else { "False" }});
        let status = serde_json::json!({
            "phase": "Running",
            "hostIP": node, "hostIPs": [{"ip": node}],
            "podIP": p.ip.to_string(), "podIPs": [{"ip": p.ip.to_string()}],
            "conditions": [cond("PodScheduled", true), cond("Initialized", true), cond("ContainersReady", ready), cond("Ready", ready)],
            "containerStatuses": [{
                "name": "echo", "ready": ready, "started": true, "restartCount": 0,
                "image": "dataplane.test/echo-server", "imageID": "",
                "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
            }],
        });
        let obj = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": p.name, "namespace": a.name}});
        a.api.patch_status(&obj, status).map_err(objects::k8s_err)
    }

    /// Deletes the Pod's API object with a grace period and leaves its workload running: with no
    /// kubelet to finish the deletion, it stays terminating, as a Pod draining its connections does.
    pub fn terminate_pod(&self, id: PodId, grace_s: u32) -> Result<(), ClusterError> {
        let Some(a) = self.objects.api_objects() else { return Ok(()) };
        let obj = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": self.pod(id).name, "namespace": a.name}});
        a.api.delete(&obj, Some(grace_s)).map_err(objects::k8s_err)
    }

    /// Deletes a Pod (its API object at once, server stopped, CNI DEL); its id is not reused.
    pub fn remove_pod(&mut self, id: PodId) {
        if let (Some(a), Some(p)) = (self.objects.api_objects(), &self.pods[id.0]) {
            let obj = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": p.name, "namespace": a.name}});
            let _ = a.api.delete(&obj, Some(0));
        }
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

    /// The namespace of the cluster's Services and Pods.
    pub fn namespace(&self) -> &str {
        self.objects.api_objects().map_or(manifests::NAMESPACE, |a| a.name.as_str())
    }

    /// The cluster's objects and, on an API server, the client the harness uses.
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
