//! Where the virtual cluster's objects live: a real API server (the default), or a manifests
//! directory the agents read with `--manifests` (standalone mode, no Kubernetes binaries).
//!
//! On the API server each cluster keeps to itself, so that many clusters (parallel tests) share
//! one control plane: its Services and EndpointSlices live in a namespace of their own and carry
//! `service.kubernetes.io/service-proxy-name=<cluster>`, the label Kubernetes gives a Service
//! handled by a proxy other than kube-proxy, and its agents run with `--service-proxy-name
//! <cluster>`; its Nodes carry `dataplane.test/cluster=<cluster>` and its agents run with
//! `--node-selector`. ClusterIPs and NodePorts are allocated by the API server, as in any cluster.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use serde_json::{Value, json};

use super::{
    ClusterError,
    manifests::{self, NodeObject, Service},
};
use crate::{
    k8s::{self, Access, Api, Forwarder},
    netns::NetNs,
};

/// The label that ties Nodes to their virtual cluster.
pub const CLUSTER_LABEL: &str = "dataplane.test/cluster";
/// Kubernetes' label for Services that a proxy other than kube-proxy handles.
pub const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

pub(super) fn k8s_err(e: k8s::K8sError) -> ClusterError {
    ClusterError::Command { what: "Kubernetes API".into(), status: "error".into(), stderr: e.to_string(), stdout: String::new() }
}

/// The cluster's objects on the API server.
#[derive(Debug)]
pub struct ApiObjects {
    pub access: Access,
    pub api: Api,
    /// The cluster's name: its namespace, its proxy name and its Nodes' label value.
    pub name: String,
    /// The agents' kubeconfig (the agent's ServiceAccount token, server on the underlay).
    pub kubeconfig: PathBuf,
    /// The API server's front door on the underlay; dropped last of this struct.
    door: Forwarder,
}

#[derive(Debug)]
pub enum Objects {
    Api(Box<ApiObjects>),
    /// Standalone: one directory of JSON files; the harness allocates ClusterIPs and NodePorts.
    Manifests { dir: PathBuf, next_ip: u32, next_port: u16 },
}

impl Objects {
    /// On the API server `access` names: exposes it on the underlay at 192.168.200.1:6443
    /// (the address is added to the underlay bridge) and creates the cluster's namespace.
    pub fn api(access: &Access, name: &str, underlay: &NetNs, dir: &Path) -> Result<Objects, ClusterError> {
        underlay.ip(&["addr", "add", &format!("{}/24", k8s::UNDERLAY_API_IP), "dev", "br0"]);
        let door = access.expose(underlay, SocketAddr::from((k8s::UNDERLAY_API_IP, k8s::API_PORT))).map_err(k8s_err)?;
        let kubeconfig = dir.join("agent.kubeconfig");
        access.write_agent_kubeconfig(&kubeconfig, door.addr()).map_err(k8s_err)?;
        let api = access.admin().map_err(k8s_err)?;
        api.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})).map_err(k8s_err)?;
        // Every Pod needs it; the controller manager's serviceaccount controller would make it
        // too, but not at once (and a private control plane may run without it).
        api.apply(&json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": name}})).map_err(k8s_err)?;
        Ok(Objects::Api(Box::new(ApiObjects { access: access.clone(), api, name: name.to_owned(), kubeconfig, door })))
    }

    pub fn manifests(dir: &Path) -> Result<Objects, ClusterError> {
        let dir = dir.join("manifests");
        fs::create_dir(&dir).map_err(|e| ClusterError::Io { what: format!("mkdir {}", dir.display()), source: e })?;
        write_services(&dir, &[])?;
        // Far from what the API server would allocate first, and from the tests' own addresses.
        Ok(Objects::Manifests { dir, next_ip: u32::from(Ipv4Addr::new(10, 96, 100, 1)), next_port: 30100 })
    }

    /// The agent's flags that name its source.
    pub fn agent_flags(&self) -> Vec<(&'static str, Option<String>)> {
        match self {
            Objects::Api(a) => vec![
                ("--kubeconfig", Some(a.kubeconfig.display().to_string())),
                ("--service-proxy-name", Some(a.name.clone())),
                ("--node-selector", Some(format!("{CLUSTER_LABEL}={}", a.name))),
                // Events of one harness step arrive together; a short window keeps syncs few.
                ("--debounce-ms", Some("10".into())),
            ],
            Objects::Manifests { dir, .. } => {
                vec![("--manifests", Some(dir.display().to_string())), ("--manifests-poll-ms", Some("50".into()))]
            }
        }
    }

    pub fn api_objects(&self) -> Option<&ApiObjects> {
        match self {
            Objects::Api(a) => Some(a),
            Objects::Manifests { .. } => None,
        }
    }

    /// Writes the Nodes (with their InternalIP in the status, as a kubelet reports it).
    pub fn write_nodes(&self, nodes: &[NodeObject]) -> Result<(), ClusterError> {
        match self {
            Objects::Api(a) => {
                for n in nodes {
                    let mut obj = manifests::node(n);
                    let status = obj.as_object_mut().and_then(|o| o.remove("status")).unwrap_or_default();
                    obj["metadata"]["labels"] = json!({ CLUSTER_LABEL: a.name });
                    let stored = a.api.apply(&obj).map_err(k8s_err)?;
                    a.api.patch_status(&stored, status).map_err(k8s_err)?;
                }
                Ok(())
            }
            Objects::Manifests { dir, .. } => {
                write_json(dir, "nodes.json", &manifests::list(nodes.iter().map(manifests::node).collect()))
            }
        }
    }

    /// Gives `svc` its ClusterIP and NodePort where it has none yet.
    fn allocate(&mut self, svc: &mut Service) -> Result<(), ClusterError> {
        match self {
            Objects::Api(a) => {
                if svc.cluster_ip.is_some() && (svc.kind == manifests::ServiceType::ClusterIP || svc.node_port.is_some()) {
                    return Ok(());
                }
                // One port first: the API server gives TCP and UDP separate NodePorts when asked
                // to pick, and the harness serves both protocols on one.
                let mut first = svc.service(Some(&a.name));
                if let Some(ports) = first["spec"]["ports"].as_array_mut() {
                    ports.truncate(1);
                }
                let stored = a.api.apply(&first).map_err(k8s_err)?;
                svc.cluster_ip = stored["spec"]["clusterIP"].as_str().and_then(|s| s.parse().ok());
                if svc.kind != manifests::ServiceType::ClusterIP {
                    svc.node_port = stored["spec"]["ports"][0]["nodePort"].as_u64().map(|p| p as u16);
                }
                Ok(())
            }
            Objects::Manifests { next_ip, next_port, .. } => {
                if svc.cluster_ip.is_none() {
                    svc.cluster_ip = Some(Ipv4Addr::from(*next_ip));
                    *next_ip += 1;
                }
                if svc.kind != manifests::ServiceType::ClusterIP && svc.node_port.is_none() {
                    svc.node_port = Some(*next_port);
                    *next_port += 1;
                }
                Ok(())
            }
        }
    }

    /// Creates or updates `svc` and its EndpointSlice; `all` is every Service of the cluster
    /// after the change (the manifests file holds them all).
    pub fn apply_service(&mut self, svc: &mut Service, all: &[&Service]) -> Result<(), ClusterError> {
        self.allocate(svc)?;
        match self {
            Objects::Api(a) => {
                a.api.apply(&svc.service(Some(&a.name))).map_err(k8s_err)?;
                a.api.apply(&svc.endpoint_slice(Some(&a.name))).map_err(k8s_err)?;
                if !svc.lb_ingress.is_empty() {
                    // Written by a cloud's controller on a real cluster: the status subresource.
                    let obj = svc.service(Some(&a.name));
                    a.api.patch_status(&obj, obj["status"].clone()).map_err(k8s_err)?;
                }
                Ok(())
            }
            Objects::Manifests { dir, .. } => {
                let mut all: Vec<&Service> = all.iter().copied().filter(|s| s.name != svc.name).collect();
                all.push(svc);
                write_services(dir, &all)
            }
        }
    }

    pub fn delete_service(&mut self, svc: &Service, all: &[&Service]) -> Result<(), ClusterError> {
        match self {
            Objects::Api(a) => {
                a.api.delete(&svc.endpoint_slice(Some(&a.name)), None).map_err(k8s_err)?;
                a.api.delete(&svc.service(Some(&a.name)), None).map_err(k8s_err)
            }
            Objects::Manifests { dir, .. } => write_services(dir, all),
        }
    }
}

impl ApiObjects {
    /// Closes every connection the agents have open to the API server (a network blip, or a
    /// failover of the load balancer in front of it); they reconnect at once.
    pub fn cut_connections(&self) {
        self.door.cut();
    }
}

impl Drop for ApiObjects {
    fn drop(&mut self) {
        // The namespace controller removes what is in it; Nodes are cluster-scoped.
        let _ = self.api.delete(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.name}}), None);
        if let Ok(nodes) = self.api.list_cluster("v1", "Node", &format!("{CLUSTER_LABEL}={}", self.name)) {
            for n in nodes {
                let _ = self.api.delete(&n, None);
            }
        }
        self.door.cut();
    }
}

fn write_services(dir: &Path, all: &[&Service]) -> Result<(), ClusterError> {
    let items = all.iter().flat_map(|s| [s.service(None), s.endpoint_slice(None)]).collect();
    write_json(dir, "services.json", &manifests::list(items))
}

fn write_json(dir: &Path, file: &str, value: &Value) -> Result<(), ClusterError> {
    // Written aside and renamed in: the agents poll the directory and must never read half a file.
    let tmp = dir.join(format!(".{file}.tmp"));
    fs::write(&tmp, serde_json::to_vec_pretty(value).unwrap_or_default())
        .map_err(|e| ClusterError::Io { what: format!("write {}", tmp.display()), source: e })?;
    fs::rename(&tmp, dir.join(file)).map_err(|e| ClusterError::Io { what: format!("rename {file}"), source: e })
}
