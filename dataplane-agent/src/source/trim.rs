//! Drops the parts of objects the agent never reads, as soon as they arrive: both sources keep
//! every object for as long as it exists (the reflector stores, the manifests cache), and at 10k
//! Services these parts are most of the memory (a Node's image list alone runs to tens of kB;
//! `last-applied-configuration` annotations repeat the whole object).
//!
//! Kept: what `model` reads (names, namespaces, labels, Service spec and load-balancer status,
//! slice ports and endpoints with their conditions, node name, hostname, zone and hints; Node
//! podCIDRs, addresses and labels) and the identity fields (uid, resourceVersion).
use k8s_openapi::api::core::v1::{LoadBalancerStatus, Node, NodeStatus, Service, ServiceStatus};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn meta(m: &mut ObjectMeta) {
    m.annotations = None;
    m.managed_fields = None;
    m.owner_references = None;
    m.finalizers = None;
    m.creation_timestamp = None;
    m.deletion_grace_period_seconds = None;
    m.generate_name = None;
}

pub fn service(s: &mut Service) {
    meta(&mut s.metadata);
    if let Some(spec) = &mut s.spec {
        // Pods are selected by the EndpointSlice controller, not by the proxy.
        spec.selector = None;
    }
    if let Some(status) = s.status.take() {
        let load_balancer = status.load_balancer.map(|lb| LoadBalancerStatus { ingress: lb.ingress });
        s.status = Some(ServiceStatus { load_balancer, ..Default::default() });
    }
}

pub fn endpoint_slice(s: &mut EndpointSlice) {
    meta(&mut s.metadata);
    for ep in &mut s.endpoints {
        ep.target_ref = None;
        ep.deprecated_topology = None;
    }
}

pub fn node(n: &mut Node) {
    meta(&mut n.metadata);
    if let Some(status) = n.status.take() {
        n.status = Some(NodeStatus { addresses: status.addresses, ..Default::default() });
    }
    if let Some(spec) = &mut n.spec {
        spec.taints = None;
        spec.config_source = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn what_the_model_reads_is_kept() {
        let mut s: Service = serde_json::from_value(json!({
            "metadata": {"name": "a", "namespace": "n", "labels": {"x": "y"}, "annotations": {"big": "..."}, "resourceVersion": "7"},
            "spec": {"clusterIP": "10.96.0.1", "selector": {"app": "a"}, "ports": [{"port": 80}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}, "conditions": []}})).unwrap();
        service(&mut s);
        assert_eq!(s.metadata.labels.as_ref().unwrap()["x"], "y");
        assert_eq!(s.metadata.resource_version.as_deref(), Some("7"));
        assert!(s.metadata.annotations.is_none() && s.spec.as_ref().unwrap().selector.is_none());
        assert_eq!(s.spec.as_ref().unwrap().cluster_ip.as_deref(), Some("10.96.0.1"));
        let ingress = s.status.as_ref().unwrap().load_balancer.as_ref().unwrap().ingress.as_ref().unwrap();
        assert_eq!(ingress[0].ip.as_deref(), Some("198.51.100.1"));
        assert!(s.status.as_ref().unwrap().conditions.is_none());

        let mut sl: EndpointSlice = serde_json::from_value(json!({"metadata": {"name": "a-1"}, "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"], "hostname": "h", "nodeName": "n1", "zone": "z",
                           "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "p"},
                           "hints": {"forZones": [{"name": "z"}]}}]})).unwrap();
        endpoint_slice(&mut sl);
        let ep = &sl.endpoints[0];
        assert!(ep.target_ref.is_none());
        assert_eq!((ep.hostname.as_deref(), ep.node_name.as_deref(), ep.zone.as_deref()), (Some("h"), Some("n1"), Some("z")));
        assert!(ep.conditions.as_ref().unwrap().ready.unwrap() && ep.hints.is_some());

        let mut n: Node = serde_json::from_value(json!({"metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z"}},
            "spec": {"podCIDRs": ["10.244.0.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.1"}], "images": [{"names": ["x"]}]}})).unwrap();
        node(&mut n);
        assert_eq!(n.status.as_ref().unwrap().addresses.as_ref().unwrap().len(), 1);
        assert!(n.status.as_ref().unwrap().images.is_none());
        assert_eq!(n.spec.as_ref().unwrap().pod_cidrs.as_ref().unwrap().len(), 1);
        assert!(n.metadata.labels.is_some());
    }
}
