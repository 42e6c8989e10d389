//! The cluster as Kubernetes objects: Nodes, Services and EndpointSlices, rendered as JSON for the
//! API server (or the agent's standalone source, `--manifests DIR`). Pure: no I/O here.
use std::net::Ipv4Addr;

use serde_json::{Value, json};

/// Namespace of every Service the harness writes in standalone mode.
pub const NAMESPACE: &str = "default";

/// A Node as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeObject {
    pub name: String,
    pub internal_ip: Ipv4Addr,
    pub pod_cidr: String,
}

pub fn node(n: &NodeObject) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": n.name},
        "spec": {"podCIDR": n.pod_cidr, "podCIDRs": [n.pod_cidr]},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": n.internal_ip.to_string()},
                {"type": "Hostname", "address": n.name},
            ],
            // As a kubelet reports it; nothing here expires it (no node lifecycle controller).
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "dataplane test node"}],
        },
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
}

/// One backend Pod of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub pod: String,
    pub ip: Ipv4Addr,
    pub node: String,
}

/// A Service with one TCP and one UDP port (same number, `port` -> `target_port`), and the
/// EndpointSlice that lists its backends. Built with the methods below.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub kind: ServiceType,
    /// Allocated when the Service is first applied (by the API server, or the harness standalone).
    pub cluster_ip: Option<Ipv4Addr>,
    pub port: u16,
    pub target_port: u16,
    /// Used for both the TCP and the UDP port (Kubernetes allows that); allocated when first
    /// applied.
    pub node_port: Option<u16>,
    pub external_traffic_local: bool,
    pub external_ips: Vec<Ipv4Addr>,
    pub lb_ingress: Vec<Ipv4Addr>,
    /// sessionAffinity ClientIP with this timeout.
    pub affinity_timeout_s: Option<u32>,
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    /// A ClusterIP Service `name` on `port`, to `target_port` of its endpoints.
    pub fn new(name: &str, port: u16, target_port: u16) -> Service {
        Service {
            name: name.to_owned(),
            kind: ServiceType::ClusterIP,
            cluster_ip: None,
            port,
            target_port,
            node_port: None,
            external_traffic_local: false,
            external_ips: Vec::new(),
            lb_ingress: Vec::new(),
            affinity_timeout_s: None,
            endpoints: Vec::new(),
        }
    }

    /// type NodePort (the port is allocated when applied).
    pub fn node_port(mut self) -> Service {
        self.kind = ServiceType::NodePort;
        self
    }

    /// type LoadBalancer with `status.loadBalancer.ingress` IPs.
    pub fn load_balancer(mut self, ingress: &[Ipv4Addr]) -> Service {
        self.kind = ServiceType::LoadBalancer;
        self.lb_ingress = ingress.to_vec();
        self
    }

    /// The ClusterIP frontend, once allocated.
    pub fn vip(&self) -> Ipv4Addr {
        self.cluster_ip.expect("the Service has been applied")
    }

    /// Namespace and labels: in cluster `cluster` (its namespace, handled by its agents only), or
    /// standalone.
    fn meta(&self, cluster: Option<&str>, name: String) -> Value {
        match cluster {
            Some(c) => json!({"name": name, "namespace": c, "labels": {super::objects::PROXY_NAME_LABEL: c}}),
            None => json!({"name": name, "namespace": NAMESPACE, "labels": {}}),
        }
    }

    pub fn external_ips(mut self, ips: &[Ipv4Addr]) -> Service {
        self.external_ips = ips.to_vec();
        self
    }

    pub fn external_traffic_local(mut self) -> Service {
        self.external_traffic_local = true;
        self
    }

    pub fn affinity(mut self, timeout_s: u32) -> Service {
        self.affinity_timeout_s = Some(timeout_s);
        self
    }

    pub fn endpoints(mut self, endpoints: impl IntoIterator<Item = Endpoint>) -> Service {
        self.endpoints = endpoints.into_iter().collect();
        self
    }

    /// The Service object (see [`Service::meta`] for `cluster`).
    pub fn service(&self, cluster: Option<&str>) -> Value {
        let ports: Vec<Value> = ["TCP", "UDP"]
            .iter()
            .map(|proto| {
                let mut p = json!({"name": proto.to_lowercase(), "protocol": proto, "port": self.port, "targetPort": self.target_port});
                if let Some(np) = self.node_port {
                    p["nodePort"] = json!(np);
                }
                p
            })
            .collect();
        let kind = match self.kind {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        };
        // No selector: the harness writes the EndpointSlice itself (the EndpointSlice controller
        // leaves a Service without a selector alone).
        let mut spec = json!({"type": kind, "ipFamilies": ["IPv4"], "ports": ports});
        if let Some(ip) = self.cluster_ip {
            spec["clusterIP"] = json!(ip.to_string());
            spec["clusterIPs"] = json!([ip.to_string()]);
        }
        if self.kind != ServiceType::ClusterIP {
            spec["externalTrafficPolicy"] = json!(if self.external_traffic_local { "Local" } else { "Cluster" });
        }
        if !self.external_ips.is_empty() {
            spec["externalIPs"] = json!(self.external_ips.iter().map(ToString::to_string).collect::<Vec<_>>());
        }
        if let Some(timeout) = self.affinity_timeout_s {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": timeout}});
        }
        let mut svc = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self.meta(cluster, self.name.clone()),
            "spec": spec,
        });
        if !self.lb_ingress.is_empty() {
            let ingress: Vec<Value> = self.lb_ingress.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
            svc["status"] = json!({"loadBalancer": {"ingress": ingress}});
        }
        svc
    }

    /// The EndpointSlice listing every endpoint as ready.
    pub fn endpoint_slice(&self, cluster: Option<&str>) -> Value {
        let namespace = cluster.unwrap_or(NAMESPACE);
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .map(|e| {
                json!({
                    "addresses": [e.ip.to_string()],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": e.node,
                    "targetRef": {"kind": "Pod", "name": e.pod, "namespace": namespace},
                })
            })
            .collect();
        let mut slice = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": self.meta(cluster, format!("{}-slice", self.name)),
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [
                {"name": "tcp", "protocol": "TCP", "port": self.target_port},
                {"name": "udp", "protocol": "UDP", "port": self.target_port},
            ],
        });
        slice["metadata"]["labels"]["kubernetes.io/service-name"] = json!(self.name);
        slice["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] = json!("dpt-harness");
        slice
    }
}

/// A `kind: List` of objects: one file the agent reads as a whole.
pub fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn service_renders_every_field_the_tests_use() {
        let mut svc = Service::new("web", 80, 8080)
            .load_balancer(&[ip("192.168.201.1")])
            .external_ips(&[ip("192.168.202.1")])
            .external_traffic_local()
            .affinity(3)
            .endpoints([Endpoint { pod: "web-0".into(), ip: ip("10.244.1.2"), node: "node-1".into() }]);
        svc.cluster_ip = Some(ip("10.96.0.10"));
        svc.node_port = Some(30080);
        let s = svc.service(Some("c1"));
        assert_eq!(s["metadata"]["namespace"], "c1");
        assert_eq!(s["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"], "c1");
        assert_eq!(s["spec"]["type"], "LoadBalancer");
        assert_eq!(s["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(s["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(s["spec"]["ports"][1]["protocol"], "UDP");
        assert_eq!(s["spec"]["ports"][1]["nodePort"], 30080);
        assert_eq!(s["spec"]["externalTrafficPolicy"], "Local");
        assert_eq!(s["spec"]["externalIPs"][0], "192.168.202.1");
        assert_eq!(s["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"], 3);
        assert_eq!(s["status"]["loadBalancer"]["ingress"][0]["ip"], "192.168.201.1");
        let e = svc.endpoint_slice(Some("c1"));
        assert_eq!(e["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"], "c1");
        assert_eq!(e["metadata"]["labels"]["kubernetes.io/service-name"], "web");
        assert_eq!(e["endpoints"][0]["nodeName"], "node-1");
        assert_eq!(e["ports"][0]["port"], 8080);
    }

    #[test]
    fn cluster_ip_service_has_no_node_port_or_policy() {
        let s = Service::new("db", 5432, 5432).service(None);
        assert_eq!(s["spec"]["type"], "ClusterIP");
        assert!(s["spec"].get("clusterIP").is_none(), "left to the allocator");
        assert!(s["spec"]["ports"][0].get("nodePort").is_none());
        assert!(s["spec"].get("externalTrafficPolicy").is_none());
        assert!(s.get("status").is_none());
    }
}
