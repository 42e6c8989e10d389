//! The desired state: what the data plane should do for every Service, computed from Kubernetes
//! Service, EndpointSlice and Node objects. Pure: no I/O, no clocks, no map handles. `reconcile`
//! maps this onto the eBPF maps; `source` feeds it.
//!
//! The rules follow kube-proxy (pkg/proxy: servicechangetracker, endpointslicecache, topology.go)
//! so that a cluster behaves the same after kube-proxy is replaced.
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Serialize;

mod endpoints;
mod incremental;
mod node;
mod service;
#[cfg(test)]
mod tests;

pub use incremental::{Changed, ModelCache};
pub use node::NodeState;
pub use service::ServiceError;

/// Label on Services (and EndpointSlices) that hands them to another proxy implementation.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label the EndpointSlice controller puts on the slices of headless Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label linking an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The Node label holding its zone, which topology hints refer to.
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";

/// Everything the model is computed from: the objects as the API server (or the manifests) has them.
/// `Arc`s because the kube reflector stores hand out `Arc`s: a snapshot costs no deep copy.
#[derive(Debug, Clone, Default)]
pub struct ClusterObjects {
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub nodes: Vec<Arc<Node>>,
}

/// Per-node settings that change what the model produces.
#[derive(Debug, Clone, Default)]
pub struct ModelConfig {
    /// This node's name: decides which endpoints are local, which Node's addresses carry
    /// NodePorts and which zone topology hints are matched against.
    pub node_name: Option<String>,
    /// Services labelled `service.kubernetes.io/service-proxy-name` with this value are ours;
    /// any other value hands the Service to another proxy (kube-proxy skips every labelled one).
    pub service_proxy_name: Option<String>,
    /// Addresses NodePorts are served on. `None`: this Node's InternalIP and ExternalIP addresses
    /// (kube-proxy's `--nodeport-addresses primary`).
    pub node_port_addresses: Option<Vec<IpAddr>>,
}

/// `namespace/name` of a Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IANA protocol number, as the maps key frontends by it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

/// How a Service is exposed; decides which frontends exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "PascalCase")]
pub enum ServiceKind {
    ClusterIP,
    NodePort,
    LoadBalancer,
    /// No frontends: DNS answers a CNAME to `external_name`.
    ExternalName { external_name: String },
    /// `clusterIP: None`: no frontends; DNS answers with the endpoints.
    Headless,
}

/// Where a frontend address comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "PascalCase")]
pub enum FrontendScope {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalIP,
}

impl FrontendScope {
    /// Frontends reachable from outside the cluster follow externalTrafficPolicy; the ClusterIP
    /// follows internalTrafficPolicy.
    pub fn is_external(self) -> bool {
        !matches!(self, FrontendScope::ClusterIP)
    }
}

/// One address:port:protocol the data plane answers on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: FrontendScope,
    /// true: only this node's endpoints (`local_backends`) serve this frontend.
    pub local_only: bool,
}

/// One endpoint of a Service port, after de-duplication across slices.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    /// On this node (endpoint `nodeName` equals ours).
    pub node_local: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// One port of a Service with its frontends and the backends that serve them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePortState {
    /// The Service port's name ("" for a single unnamed port); endpoints are matched by it.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub frontends: Vec<Frontend>,
    /// sessionAffinity ClientIP: stickiness timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
    /// Backends for frontends with `local_only == false`: ready endpoints (filtered by topology
    /// hints when usable), else the serving-and-terminating ones.
    pub cluster_backends: Vec<Backend>,
    /// Backends for `local_only` frontends: this node's ready endpoints, else its serving-and-terminating ones.
    pub local_backends: Vec<Backend>,
    /// Topology hints narrowed `cluster_backends` to this node's zone.
    pub topology_filtered: bool,
}

impl ServicePortState {
    /// The backends a frontend of this port forwards to.
    pub fn backends_for(&self, frontend: &Frontend) -> &[Backend] {
        if frontend.local_only { &self.local_backends } else { &self.cluster_backends }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceState {
    #[serde(flatten)]
    pub kind: ServiceKind,
    pub external_traffic_local: bool,
    pub internal_traffic_local: bool,
    pub ports: Vec<ServicePortState>,
}

/// The whole desired state. Maps are sorted so that dumps are stable.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DesiredState {
    pub services: BTreeMap<ServiceName, ServiceState>,
    /// Every Node, for routes to other nodes' podCIDRs.
    pub nodes: BTreeMap<String, NodeState>,
    /// Services left out entirely or in part, each with why. Other Services are unaffected.
    #[serde(serialize_with = "serialize_errors")]
    pub errors: Vec<ServiceError>,
}

fn serialize_errors<S: serde::Serializer>(errors: &[ServiceError], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(errors.iter().map(ToString::to_string))
}

impl DesiredState {
    /// Number of (frontend, backend) pairs the data plane will hold, for metrics.
    pub fn backend_count(&self) -> usize {
        self.services
            .values()
            .flat_map(|s| &s.ports)
            .map(|p| p.cluster_backends.len().max(p.local_backends.len()))
            .sum()
    }

    pub fn frontend_count(&self) -> usize {
        self.services.values().flat_map(|s| &s.ports).map(|p| p.frontends.len()).sum()
    }

    /// A stable, human-readable JSON rendering (golden tests, `services --output json`).
    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string_pretty(&self.dump()).expect("desired state serializes")
    }

    fn dump(&self) -> serde_json::Value {
        serde_json::json!({
            "services": self.services.iter().map(|(k, v)| (k.to_string(), v)).collect::<BTreeMap<_, _>>(),
            "nodes": &self.nodes,
            "errors": self.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })
    }
}

/// Computes the desired state. Never fails as a whole: a bad Service is reported in
/// `DesiredState::errors` and left out, the rest is computed as usual.
pub fn build(objects: &ClusterObjects, config: &ModelConfig) -> DesiredState {
    let nodes = node::nodes(&objects.nodes);
    let this_node = config.node_name.as_deref().and_then(|n| nodes.get(n));
    let zone = this_node.and_then(|n| n.zone.clone());
    let ctx = service::Context {
        node_name: config.node_name.as_deref(),
        zone: zone.as_deref(),
        node_port_addresses: match &config.node_port_addresses {
            Some(addrs) => addrs.clone(),
            None => this_node.map(|n| n.addresses.clone()).unwrap_or_default(),
        },
    };
    let slices = endpoints::SliceIndex::new(&objects.endpoint_slices, config.service_proxy_name.as_deref());

    let mut state = DesiredState { nodes, ..Default::default() };
    for svc in &objects.services {
        if !is_ours(svc.metadata.labels.as_ref(), config.service_proxy_name.as_deref()) {
            continue;
        }
        let name = ServiceName {
            namespace: svc.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            name: svc.metadata.name.clone().unwrap_or_default(),
        };
        match service::build(&name, svc, &slices, &ctx) {
            Ok((built, mut warnings)) => {
                state.errors.append(&mut warnings);
                state.services.insert(name, built);
            }
            Err(e) => state.errors.push(e),
        }
    }
    state.errors.sort_by_key(ToString::to_string);
    state
}

/// kube-proxy watches with `!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`;
/// we accept the label naming this agent's proxy name, and keep headless slices (they have no
/// frontends, and DNS needs their endpoints). The sources filter the same way (`source::filter`);
/// this keeps the model right for objects from anywhere else.
fn is_ours(labels: Option<&BTreeMap<String, String>>, proxy_name: Option<&str>) -> bool {
    let Some(labels) = labels else { return true };
    match labels.get(LABEL_SERVICE_PROXY_NAME) {
        None => true,
        Some(v) => Some(v.as_str()) == proxy_name,
    }
}
