//! The cluster as Kubernetes objects: Nodes, Services and EndpointSlices, rendered as the JSON the
//! agent's standalone source reads (`--manifests DIR`). Pure: no I/O here.
use std::net::Ipv4Addr;

use serde_json::{Value, json};

/// Namespace of every Service the harness writes.
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
        "status": {"addresses": [
            {"type": "InternalIP", "address": n.internal_ip.to_string()},
            {"type": "Hostname", "address": n.name},
        ]},
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
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    /// Used for both the TCP and the UDP port (Kubernetes allows that).
    pub node_port: Option<u16>,
    pub external_traffic_local: bool,
    pub external_ips: Vec<Ipv4Addr>,
    pub lb_ingress: Vec<Ipv4Addr>,
    /// sessionAffinity ClientIP with this timeout.
    pub affinity_timeout_s: Option<u32>,
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    /// A ClusterIP Service `name` on `cluster_ip:port`, to `target_port` of its endpoints.
    pub fn new(name: &str, cluster_ip: Ipv4Addr, port: u16, target_port: u16) -> Service {
        Service {
            name: name.to_owned(),
            kind: ServiceType::ClusterIP,
            cluster_ip,
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

    pub fn node_port(mut self, port: u16) -> Service {
        self.kind = ServiceType::NodePort;
        self.node_port = Some(port);
        self
    }

    /// type LoadBalancer with this NodePort and `status.loadBalancer.ingress` IPs.
    pub fn load_balancer(mut self, node_port: u16, ingress: &[Ipv4Addr]) -> Service {
        self.kind = ServiceType::LoadBalancer;
        self.node_port = Some(node_port);
        self.lb_ingress = ingress.to_vec();
        self
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

    /// The Service object.
    pub fn service(&self) -> Value {
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
        let mut spec = json!({
            "type": kind,
            "clusterIP": self.cluster_ip.to_string(),
            "clusterIPs": [self.cluster_ip.to_string()],
            "ipFamilies": ["IPv4"],
            "ports": ports,
            "selector": {"app": self.name},
        });
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
            "metadata": {"name": self.name, "namespace": NAMESPACE},
            "spec": spec,
        });
        if !self.lb_ingress.is_empty() {
            let ingress: Vec<Value> = self.lb_ingress.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
            svc["status"] = json!({"loadBalancer": {"ingress": ingress}});
        }
        svc
    }

    /// The EndpointSlice listing every endpoint as ready.
    pub fn endpoint_slice(&self) -> Value {
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .map(|e| {
                json!({
                    "addresses": [e.ip.to_string()],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": e.node,
                    "targetRef": {"kind": "Pod", "name": e.pod, "namespace": NAMESPACE},
                })
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{}-slice", self.name),
                "namespace": NAMESPACE,
                "labels": {"kubernetes.io/service-name": self.name},
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [
                {"name": "tcp", "protocol": "TCP", "port": self.target_port},
                {"name": "udp", "protocol": "UDP", "port": self.target_port},
            ],
        })
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
        let svc = Service::new("web", ip("10.96.0.10"), 80, 8080)
            .load_balancer(30080, &[ip("192.168.201.1")])
            .external_ips(&[ip("192.168.202.1")])
            .external_traffic_local()
            .affinity(3)
            .endpoints([Endpoint { pod: "web-0".into(), ip: ip("10.244.1.2"), node: "node-1".into() }]);
        let s = svc.service();
        assert_eq!(s["spec"]["type"], "LoadBalancer");
        assert_eq!(s["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(s["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(s["spec"]["ports"][1]["protocol"], "UDP");
        assert_eq!(s["spec"]["ports"][1]["nodePort"], 30080);
        assert_eq!(s["spec"]["externalTrafficPolicy"], "Local");
        assert_eq!(s["spec"]["externalIPs"][0], "192.168.202.1");
        assert_eq!(s["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"], 3);
        assert_eq!(s["status"]["loadBalancer"]["ingress"][0]["ip"], "192.168.201.1");
        let e = svc.endpoint_slice();
        assert_eq!(e["metadata"]["labels"]["kubernetes.io/service-name"], "web");
        assert_eq!(e["endpoints"][0]["nodeName"], "node-1");
        assert_eq!(e["ports"][0]["port"], 8080);
    }

    #[test]
    fn cluster_ip_service_has_no_node_port_or_policy() {
        let s = Service::new("db", ip("10.96.0.11"), 5432, 5432).service();
        assert_eq!(s["spec"]["type"], "ClusterIP");
        assert!(s["spec"]["ports"][0].get("nodePort").is_none());
        assert!(s["spec"].get("externalTrafficPolicy").is_none());
        assert!(s.get("status").is_none());
    }
}
