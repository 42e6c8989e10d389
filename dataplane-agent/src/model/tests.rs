//! Table-driven tests of the model: each case is a set of objects (as the API server would send
//! them, written as JSON) and the expected desired state in a compact one-line-per-port form.
use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::*;

const NODE: &str = "node-a";

fn svc(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": spec})
}

fn with(mut obj: Value, path: &str, value: Value) -> Value {
    let mut cur = &mut obj;
    let parts: Vec<&str> = path.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        cur = cur.as_object_mut().unwrap().entry(*p).or_insert_with(|| json!({}));
    }
    cur[parts[parts.len() - 1]] = value;
    obj
}

/// An endpoint: `addr`, node, then `r`/`s`/`t` condition letters (upper case = true) or "" for none.
fn ep(addr: &str, node: &str, conds: &str) -> Value {
    let mut e = json!({"addresses": [addr], "nodeName": node});
    for c in conds.chars() {
        let key = match c.to_ascii_lowercase() {
            'r' => "ready",
            's' => "serving",
            't' => "terminating",
            _ => panic!("bad condition letter {c}"),
        };
        e = with(e, &format!("conditions.{key}"), json!(c.is_ascii_uppercase()));
    }
    e
}

fn slice(name: &str, service: &str, family: &str, ports: Value, endpoints: Vec<Value>) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {LABEL_SERVICE_NAME: service}},
        "addressType": family, "ports": ports, "endpoints": endpoints,
    })
}

fn node(name: &str, internal: &[&str], external: &[&str], cidrs: &[&str], zone: Option<&str>) -> Value {
    let mut addrs: Vec<Value> = internal.iter().map(|a| json!({"type": "InternalIP", "address": a})).collect();
    addrs.extend(external.iter().map(|a| json!({"type": "ExternalIP", "address": a})));
    addrs.push(json!({"type": "Hostname", "address": name}));
    let mut n = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "spec": {"podCIDRs": cidrs}, "status": {"addresses": addrs}});
    if let Some(z) = zone {
        n = with(n, "metadata.labels", json!({LABEL_TOPOLOGY_ZONE: z}));
    }
    n
}

fn objects(values: Vec<Value>) -> ClusterObjects {
    let mut o = ClusterObjects::default();
    for v in values {
        match v["kind"].as_str().unwrap() {
            "Service" => o.services.push(Arc::new(serde_json::from_value(v).unwrap())),
            "EndpointSlice" => o.endpoint_slices.push(Arc::new(serde_json::from_value(v).unwrap())),
            "Node" => o.nodes.push(Arc::new(serde_json::from_value(v).unwrap())),
            k => panic!("unexpected kind {k}"),
        }
    }
    o
}

fn backends(list: &[Backend]) -> String {
    let items: Vec<String> = list
        .iter()
        .map(|b| {
            let addr = if b.addr.is_ipv6() { format!("[{}]", b.addr) } else { b.addr.to_string() };
            let mut s = format!("{addr}:{}", b.port);
            for (flag, txt) in [(b.node_local, "L"), (!b.ready, "!r"), (!b.serving, "!s"), (b.terminating, "T")] {
                if flag {
                    s.push_str(txt);
                }
            }
            s
        })
        .collect();
    items.join(" ")
}

/// One line per Service port (or per ExternalName Service), then one per error.
fn summary(state: &DesiredState) -> Vec<String> {
    let mut out = Vec::new();
    for (name, s) in &state.services {
        let kind = match &s.kind {
            ServiceKind::ExternalName { external_name } => {
                out.push(format!("{name} ExternalName {external_name}"));
                continue;
            }
            k => format!("{k:?}"),
        };
        for p in &s.ports {
            let fes: Vec<String> = p
                .frontends
                .iter()
                .map(|f| {
                    let addr = if f.addr.is_ipv6() { format!("[{}]", f.addr) } else { f.addr.to_string() };
                    format!("{addr}:{} {:?}{}", f.port, f.scope, if f.local_only { "/local" } else { "" })
                })
                .collect();
            let mut line = format!("{name} {kind} {}/{:?}:{}", p.name, p.protocol, p.port);
            if let Some(t) = p.affinity_timeout_s {
                line.push_str(&format!(" affinity={t}"));
            }
            if p.topology_filtered {
                line.push_str(" topology");
            }
            line.push_str(&format!(" fe=[{}] cluster=[{}]", fes.join(", "), backends(&p.cluster_backends)));
            if !p.local_backends.is_empty() {
                line.push_str(&format!(" local=[{}]", backends(&p.local_backends)));
            }
            out.push(line);
        }
    }
    out.extend(state.errors.iter().map(|e| format!("error: {e}")));
    out
}

fn tcp(name: &str, port: u16) -> Value {
    json!({"name": name, "port": port, "protocol": "TCP"})
}

fn web() -> Value {
    svc("web", json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}))
}

fn web_eps(endpoints: Vec<Value>) -> Value {
    slice("web-abc", "web", "IPv4", json!([tcp("http", 8080)]), endpoints)
}

fn this_node() -> Value {
    node(NODE, &["192.168.1.10"], &["203.0.113.10"], &["10.244.0.0/24"], Some("zone-a"))
}

struct Case {
    name: &'static str,
    objects: Vec<Value>,
    expect: &'static [&'static str],
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "ClusterIP with ready endpoints, local one flagged",
            objects: vec![web(), web_eps(vec![ep("10.244.0.5", NODE, "R"), ep("10.244.1.5", "node-b", "")])],
            expect: &["default/web ClusterIP http/TCP:80 fe=[10.96.0.10:80 ClusterIP] cluster=[10.244.0.5:8080L 10.244.1.5:8080]"],
        },
        Case {
            name: "no endpoints at all",
            objects: vec![web()],
            expect: &["default/web ClusterIP http/TCP:80 fe=[10.96.0.10:80 ClusterIP] cluster=[]"],
        },
        Case {
            name: "only terminating endpoints: the serving ones are used, the non-serving ones never",
            objects: vec![web(), web_eps(vec![ep("10.244.1.5", "node-b", "rST"), ep("10.244.1.6", "node-b", "rsT")])],
            expect: &["default/web ClusterIP http/TCP:80 fe=[10.96.0.10:80 ClusterIP] cluster=[10.244.1.5:8080!rT]"],
        },
        Case {
            name: "ready endpoints exclude terminating and not-ready ones",
            objects: vec![
                web(),
                web_eps(vec![ep("10.244.1.5", "node-b", "RS"), ep("10.244.1.6", "node-b", "rST"), ep("10.244.1.7", "node-b", "rs")]),
            ],
            expect: &["default/web ClusterIP http/TCP:80 fe=[10.96.0.10:80 ClusterIP] cluster=[10.244.1.5:8080]"],
        },
        Case {
            name: "the same endpoint in two slices during a move: once, the ready copy wins",
            objects: vec![
                web(),
                slice("web-a", "web", "IPv4", json!([tcp("http", 8080)]), vec![ep("10.244.1.5", "node-b", "r")]),
                slice("web-b", "web", "IPv4", json!([tcp("http", 8080)]), vec![ep("10.244.1.5", "node-b", "R"), ep("10.244.1.6", "node-b", "R")]),
            ],
            expect: &["default/web ClusterIP http/TCP:80 fe=[10.96.0.10:80 ClusterIP] cluster=[10.244.1.5:8080 10.244.1.6:8080]"],
        },
        Case {
            name: "targetPort by name: the number comes from the slice port with the Service port's name",
            objects: vec![
                svc("web", json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": "web"}]})),
                slice("web-a", "web", "IPv4", json!([tcp("http", 8081)]), vec![ep("10.244.1.5", "node-b", "")]),
                slice("web-b", "web", "IPv4", json!([tcp("http", 9090)]), vec![ep("10.244.1.6", "node-b", "")]),
            ],
            expect: &["default/web ClusterIP http/TCP:80 fe=[10.96.0.10:80 ClusterIP] cluster=[10.244.1.5:8081 10.244.1.6:9090]"],
        },
        Case {
            name: "a named port that matches nothing gets no backends; the other port still does",
            objects: vec![
                svc("web", json!({"clusterIP": "10.96.0.10", "ports": [
                    {"name": "http", "port": 80, "targetPort": "web"}, {"name": "admin", "port": 9000, "targetPort": "nope"}]})),
                slice("web-a", "web", "IPv4", json!([tcp("http", 8080)]), vec![ep("10.244.1.5", "node-b", "")]),
            ],
            expect: &[
                "default/web ClusterIP admin/Tcp:9000 fe=[10.96.0.10:9000 ClusterIP] cluster=[]",
                "default/web ClusterIP http/Tcp:80 fe=[10.96.0.10:80 ClusterIP] cluster=[10.244.1.5:8080]",
            ],
        },
        Case {
            name: "several ports, TCP and UDP with the same number, SCTP reported and skipped",
            objects: vec![
                svc("dns", json!({"clusterIP": "10.96.0.53", "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                    {"name": "sig", "port": 3868, "protocol": "SCTP"}]})),
                slice("dns-a", "dns", "IPv4",
                    json!([{"name": "dns", "port": 53, "protocol": "UDP"}, tcp("dns-tcp", 53), {"name": "sig", "port": 3868, "protocol": "SCTP"}]),
                    vec![ep("10.244.1.2", "node-b", "R")]),
            ],
            expect: &[
                "default/dns ClusterIP dns/Udp:53 fe=[10.96.0.53:53 ClusterIP] cluster=[10.244.1.2:53]",
                "default/dns ClusterIP dns-tcp/Tcp:53 fe=[10.96.0.53:53 ClusterIP] cluster=[10.244.1.2:53]",
                "error: default/dns: port \"sig\" uses SCTP, which this data plane does not support; port skipped",
            ],
        },
        Case {
            name: "NodePort on this node's InternalIP and ExternalIP, same-family only",
            objects: vec![
                this_node(),
                with(with(web(), "spec.type", json!("NodePort")), "spec.ports", json!([{"name": "http", "port": 80, "nodePort": 30080}])),
                web_eps(vec![ep("10.244.0.5", NODE, "")]),
            ],
            expect: &["default/web NodePort http/TCP:80 fe=[10.96.0.10:80 ClusterIP, 192.168.1.10:30080 NodePort, 203.0.113.10:30080 NodePort] cluster=[10.244.0.5:8080L]"],
        },
        Case {
            name: "NodePort without an allocated nodePort is reported",
            objects: vec![this_node(), with(web(), "spec.type", json!("NodePort"))],
            expect: &[
                "default/web NodePort http/TCP:80 fe=[10.96.0.10:80 ClusterIP] cluster=[]",
                "error: default/web: port \"http\" has no nodePort allocated; NodePort skipped",
            ],
        },
        Case {
            name: "LoadBalancer: ingress IPs, ipMode Proxy and hostname-only skipped, other family ignored",
            objects: vec![
                this_node(),
                with(
                    with(with(web(), "spec.type", json!("LoadBalancer")), "spec.allocateLoadBalancerNodePorts", json!(false)),
                    "status.loadBalancer.ingress",
                    json!([{"ip": "198.51.100.7"}, {"ip": "198.51.100.8", "ipMode": "Proxy"}, {"hostname": "lb.example.com"}, {"ip": "2001:db8::7"}]),
                ),
            ],
            expect: &["default/web LoadBalancer http/TCP:80 fe=[10.96.0.10:80 ClusterIP, 198.51.100.7:80 LoadBalancer] cluster=[]"],
        },
        Case {
            name: "externalIPs on a ClusterIP Service; a bad one is reported, the good one kept",
            objects: vec![with(web(), "spec.externalIPs", json!(["198.51.100.20", "not-an-ip"]))],
            expect: &[
                "default/web ClusterIP http/TCP:80 fe=[10.96.0.10:80 ClusterIP, 198.51.100.20:80 ExternalIP] cluster=[]",
                "error: default/web: externalIPs \"not-an-ip\" is not an IP address; address skipped",
            ],
        },
        Case {
            name: "ExternalName has no frontends",
            objects: vec![svc("ext", json!({"type": "ExternalName", "externalName": "db.example.com", "ports": [tcp("pg", 5432)]}))],
            expect: &["default/ext ExternalName db.example.com"],
        },
        Case {
            name: "headless: no frontends, ready endpoints kept for DNS",
            objects: vec![
                svc("db", json!({"clusterIP": "None", "ports": [tcp("pg", 5432)]})),
                slice("db-a", "db", "IPv4", json!([tcp("pg", 5432)]), vec![ep("10.244.1.9", "node-b", "R"), ep("10.244.1.10", "node-b", "r")]),
            ],
            expect: &["default/db Headless pg/Tcp:5432 fe=[] cluster=[10.244.1.9:5432]"],
        },
        Case {
            name: "sessionAffinity ClientIP: default and explicit timeouts",
            objects: vec![
                with(web(), "spec.sessionAffinity", json!("ClientIP")),
                with(
                    with(svc("api", json!({"clusterIP": "10.96.0.11", "ports": [tcp("https", 443)]})), "spec.sessionAffinity", json!("ClientIP")),
                    "spec.sessionAffinityConfig",
                    json!({"clientIP": {"timeoutSeconds": 60}}),
                ),
            ],
            expect: &[
                "default/api ClusterIP https/Tcp:443 affinity=60 fe=[10.96.0.11:443 ClusterIP] cluster=[]",
                "default/web ClusterIP http/TCP:80 affinity=10800 fe=[10.96.0.10:80 ClusterIP] cluster=[]",
            ],
        },
        Case {
            name: "externalTrafficPolicy Local: external frontends use local endpoints only, the ClusterIP all",
            objects: vec![
                this_node(),
                with(
                    with(web(), "spec.type", json!("NodePort")),
                    "spec.ports",
                    json!([{"name": "http", "port": 80, "nodePort": 30080}]),
                ),
                web_eps(vec![ep("10.244.0.5", NODE, "R"), ep("10.244.1.5", "node-b", "R")]),
            ]
            .into_iter()
            .map(|v| if v["kind"] == "Service" { with(v, "spec.externalTrafficPolicy", json!("Local")) } else { v })
            .collect(),
            expect: &["default/web NodePort http/TCP:80 fe=[10.96.0.10:80 ClusterIP, 192.168.1.10:30080 NodePort/local, 203.0.113.10:30080 NodePort/local] cluster=[10.244.0.5:8080L 10.244.1.5:8080] local=[10.244.0.5:8080L]"],
        },
        Case {
            name: "externalTrafficPolicy Local on a Service with no external frontend means nothing",
            objects: vec![with(web(), "spec.externalTrafficPolicy", json!("Local")), web_eps(vec![ep("10.244.0.5", NODE, "")])],
            expect: &["default/web ClusterIP http/TCP:80 fe=[10.96.0.10:80 ClusterIP] cluster=[10.244.0.5:8080L]"],
        },
        Case {
            name: "internalTrafficPolicy Local: local ready, else local serving-terminating; no cluster set",
            objects: vec![
                this_node(),
                with(web(), "spec.internalTrafficPolicy", json!("Local")),
                web_eps(vec![ep("10.244.0.5", NODE, "rST"), ep("10.244.1.5", "node-b", "R")]),
            ],
            expect: &["default/web ClusterIP http/TCP:80 fe=[10.96.0.10:80 ClusterIP/local] cluster=[] local=[10.244.0.5:8080L!rT]"],
        },
        Case {
            name: "topology hints used when every ready endpoint has them and one is for our zone",
            objects: vec![
                this_node(),
                web(),
                web_eps(vec![
                    with(ep("10.244.0.5", NODE, "R"), "hints", json!({"forZones": [{"name": "zone-a"}]})),
                    with(ep("10.244.1.5", "node-b", "R"), "hints", json!({"forZones": [{"name": "zone-b"}]})),
                    ep("10.244.1.6", "node-b", "r"),
                ]),
            ],
            expect: &["default/web ClusterIP http/TCP:80 topology fe=[10.96.0.10:80 ClusterIP] cluster=[10.244.0.5:8080L]"],
        },
        Case {
            name: "topology hints ignored when one ready endpoint lacks them",
            objects: vec![
                this_node(),
                web(),
                web_eps(vec![with(ep("10.244.0.5", NODE, "R"), "hints", json!({"forZones": [{"name": "zone-a"}]})), ep("10.244.1.5", "node-b", "R")]),
            ],
            expect: &["default/web ClusterIP http/TCP:80 fe=[10.96.0.10:80 ClusterIP] cluster=[10.244.0.5:8080L 10.244.1.5:8080]"],
        },
        Case {
            name: "topology hints ignored when none is for our zone",
            objects: vec![
                this_node(),
                web(),
                web_eps(vec![with(ep("10.244.1.5", "node-b", "R"), "hints", json!({"forZones": [{"name": "zone-b"}]}))]),
            ],
            expect: &["default/web ClusterIP http/TCP:80 fe=[10.96.0.10:80 ClusterIP] cluster=[10.244.1.5:8080]"],
        },
        Case {
            name: "service-proxy-name label: another proxy's Service is left alone",
            objects: vec![with(web(), "metadata.labels", json!({LABEL_SERVICE_PROXY_NAME: "other-proxy"}))],
            expect: &[],
        },
        Case {
            name: "headless label on a slice (as the EndpointSlice controller sets it): endpoints kept for DNS",
            objects: vec![
                svc("db", json!({"clusterIP": "None", "ports": [tcp("pg", 5432)]})),
                with(
                    slice("db-a", "db", "IPv4", json!([tcp("pg", 5432)]), vec![ep("10.244.1.9", "node-b", "R")]),
                    "metadata.labels",
                    json!({LABEL_SERVICE_NAME: "db", LABEL_HEADLESS: ""}),
                ),
            ],
            expect: &["default/db Headless pg/Tcp:5432 fe=[] cluster=[10.244.1.9:5432]"],
        },
        Case {
            name: "dual-stack: one frontend and one backend set per family",
            objects: vec![
                svc("web", json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"], "ipFamilies": ["IPv4", "IPv6"],
                    "ports": [{"name": "http", "port": 80}]})),
                slice("web-4", "web", "IPv4", json!([tcp("http", 8080)]), vec![ep("10.244.1.5", "node-b", "")]),
                slice("web-6", "web", "IPv6", json!([tcp("http", 8080)]), vec![ep("fd00:244:1::5", "node-b", ""), ep("10.244.1.99", "node-b", "")]),
            ],
            expect: &["default/web ClusterIP http/TCP:80 fe=[10.96.0.10:80 ClusterIP, [fd00:96::10]:80 ClusterIP] cluster=[10.244.1.5:8080 [fd00:244:1::5]:8080]"],
        },
        Case {
            name: "dual-stack topology is decided per family: hinted IPv4 filtered, unhinted IPv6 not",
            objects: vec![
                this_node(),
                svc("web", json!({"clusterIPs": ["10.96.0.10", "fd00:96::10"], "ports": [{"name": "http", "port": 80}]})),
                slice("web-4", "web", "IPv4", json!([tcp("http", 8080)]), vec![
                    with(ep("10.244.0.5", NODE, ""), "hints", json!({"forZones": [{"name": "zone-a"}]})),
                    with(ep("10.244.1.5", "node-b", ""), "hints", json!({"forZones": [{"name": "zone-b"}]})),
                ]),
                slice("web-6", "web", "IPv6", json!([tcp("http", 8080)]), vec![ep("fd00:244:1::5", "node-b", "")]),
            ],
            expect: &["default/web ClusterIP http/TCP:80 topology fe=[10.96.0.10:80 ClusterIP, [fd00:96::10]:80 ClusterIP] cluster=[10.244.0.5:8080L [fd00:244:1::5]:8080]"],
        },
        Case {
            name: "FQDN slices are not proxied",
            objects: vec![web(), slice("web-f", "web", "FQDN", json!([tcp("http", 8080)]), vec![ep("host.example.com", "node-b", "")])],
            expect: &["default/web ClusterIP http/TCP:80 fe=[10.96.0.10:80 ClusterIP] cluster=[]"],
        },
        Case {
            name: "a bad Service is reported and does not affect the others",
            objects: vec![
                web(),
                svc("bad-ip", json!({"clusterIP": "10.96.0.300", "ports": [tcp("x", 1)]})),
                svc("bad-type", json!({"type": "Magic", "clusterIP": "10.96.0.12", "ports": [tcp("x", 1)]})),
                svc("bad-affinity", json!({"clusterIP": "10.96.0.13", "sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}, "ports": [tcp("x", 1)]})),
                svc("bad-affinity2", json!({"clusterIP": "10.96.0.14", "sessionAffinity": "Cookie", "ports": [tcp("x", 1)]})),
                svc("bad-policy", json!({"clusterIP": "10.96.0.15", "internalTrafficPolicy": "Nearest", "ports": [tcp("x", 1)]})),
                svc("dup-port", json!({"clusterIP": "10.96.0.16", "ports": [tcp("x", 1), tcp("x", 2)]})),
                svc("no-ip", json!({"ports": [tcp("x", 1)]})),
                svc("no-extname", json!({"type": "ExternalName"})),
                svc("bad-port", json!({"clusterIP": "10.96.0.17", "ports": [{"name": "x", "port": 70000}, tcp("y", 2)]})),
                json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "no-spec", "namespace": "default"}}),
            ],
            expect: &[
                "default/bad-port ClusterIP y/Tcp:2 fe=[10.96.0.17:2 ClusterIP] cluster=[]",
                "default/web ClusterIP http/TCP:80 fe=[10.96.0.10:80 ClusterIP] cluster=[]",
                "error: default/bad-affinity2: unknown sessionAffinity \"Cookie\"; Service skipped",
                "error: default/bad-affinity: sessionAffinity timeout 0s is outside 1..=86400; Service skipped",
                "error: default/bad-ip: cluster IP \"10.96.0.300\" is not an IP address; Service skipped",
                "error: default/bad-policy: unknown internalTrafficPolicy \"Nearest\"; Service skipped",
                "error: default/bad-port: port \"x\" number 70000 is outside 1..=65535; port skipped",
                "error: default/bad-type: unknown type \"Magic\"; Service skipped",
                "error: default/dup-port: two ports named \"x\" with protocol Tcp; Service skipped",
                "error: default/no-extname: type ExternalName without spec.externalName; Service skipped",
                "error: default/no-ip: no cluster IP allocated; Service skipped",
                "error: default/no-spec: has no spec; Service skipped",
            ],
        },
    ]
}

/// Case expectations write the protocol as `TCP` where the Service port has no explicit protocol
/// field and `Tcp` otherwise only for readability of the table; normalise before comparing.
fn norm(s: &str) -> String {
    s.replace("/TCP:", "/Tcp:").replace("/UDP:", "/Udp:")
}

#[test]
fn table() {
    let config = ModelConfig { node_name: Some(NODE.into()), ..Default::default() };
    let mut failures = Vec::new();
    for case in cases() {
        let state = build(&objects(case.objects), &config);
        let got: Vec<String> = summary(&state).iter().map(|s| norm(s)).collect();
        let want: Vec<String> = case.expect.iter().map(|s| norm(s)).collect();
        if got != want {
            failures.push(format!("case {:?}\n  want: {want:#?}\n  got:  {got:#?}", case.name));
        }
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn service_changing_type_changes_frontends() {
    let config = ModelConfig { node_name: Some(NODE.into()), ..Default::default() };
    let base = with(web(), "spec.ports", json!([{"name": "http", "port": 80, "nodePort": 30080}]));
    let fe_scopes = |svc: Value| -> Vec<(FrontendScope, String)> {
        let state = build(&objects(vec![this_node(), svc]), &config);
        assert!(state.errors.is_empty(), "{:?}", state.errors);
        let s = &state.services[&ServiceName { namespace: "default".into(), name: "web".into() }];
        s.ports.iter().flat_map(|p| &p.frontends).map(|f| (f.scope, f.addr.to_string())).collect()
    };
    assert_eq!(fe_scopes(base.clone()), vec![(FrontendScope::ClusterIP, "10.96.0.10".into())]);
    assert_eq!(fe_scopes(with(base.clone(), "spec.type", json!("NodePort"))).len(), 3);
    let lb = with(with(base.clone(), "spec.type", json!("LoadBalancer")), "status.loadBalancer.ingress", json!([{"ip": "198.51.100.7"}]));
    assert_eq!(fe_scopes(lb).len(), 4);
    let ext = with(with(base, "spec.type", json!("ExternalName")), "spec.externalName", json!("x.example.com"));
    assert!(fe_scopes(ext).is_empty());
}

#[test]
fn explicit_node_port_addresses_and_proxy_name() {
    let objs = objects(vec![
        this_node(),
        with(
            with(with(web(), "spec.type", json!("NodePort")), "spec.ports", json!([{"name": "http", "port": 80, "nodePort": 30080}])),
            "metadata.labels",
            json!({LABEL_SERVICE_PROXY_NAME: "dataplane"}),
        ),
    ]);
    let config = ModelConfig {
        node_name: Some(NODE.into()),
        service_proxy_name: Some("dataplane".into()),
        node_port_addresses: Some(vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()]),
    };
    let got = summary(&build(&objs, &config));
    assert_eq!(got, vec!["default/web NodePort http/Tcp:80 fe=[10.96.0.10:80 ClusterIP, 192.0.2.1:30080 NodePort] cluster=[]"]);
}

#[test]
fn nodes_carry_pod_cidrs_internal_ips_and_zone() {
    let state = build(
        &objects(vec![
            this_node(),
            node("node-b", &["192.168.1.11", "fd00::11"], &[], &["10.244.1.0/24", "fd00:244:1::/64", "bogus"], None),
            with(node("node-c", &[], &[], &[], None), "spec", json!({"podCIDR": "10.244.2.0/24"})),
        ]),
        &ModelConfig::default(),
    );
    let b = &state.nodes["node-b"];
    assert_eq!(b.internal_ips, vec!["192.168.1.11".parse::<IpAddr>().unwrap(), "fd00::11".parse().unwrap()]);
    assert_eq!(b.pod_cidrs, vec!["10.244.1.0/24".parse().unwrap(), "fd00:244:1::/64".parse().unwrap()]);
    assert_eq!(state.nodes[NODE].zone.as_deref(), Some("zone-a"));
    assert_eq!(state.nodes[NODE].addresses.len(), 2);
    assert_eq!(state.nodes["node-c"].pod_cidrs, vec!["10.244.2.0/24".parse().unwrap()]);
}

#[test]
fn backends_for_picks_by_frontend_policy() {
    let config = ModelConfig { node_name: Some(NODE.into()), ..Default::default() };
    let svc = with(
        with(with(web(), "spec.type", json!("NodePort")), "spec.ports", json!([{"name": "http", "port": 80, "nodePort": 30080}])),
        "spec.externalTrafficPolicy",
        json!("Local"),
    );
    let state = build(&objects(vec![this_node(), svc, web_eps(vec![ep("10.244.0.5", NODE, ""), ep("10.244.1.5", "node-b", "")])]), &config);
    let port = &state.services.values().next().unwrap().ports[0];
    for fe in &port.frontends {
        let n = port.backends_for(fe).len();
        assert_eq!(n, if fe.scope == FrontendScope::NodePort { 1 } else { 2 }, "{fe:?}");
    }
    assert_eq!(state.frontend_count(), 3);
    assert_eq!(state.backend_count(), 2);
}

/// A `ModelCache` fed the table's cases one after another (each reached from two different
/// states: forwards, then backwards) holds exactly what a full `build` gives for each.
#[test]
fn incremental_updates_match_a_full_build() {
    let config = ModelConfig { node_name: Some(NODE.into()), ..Default::default() };
    let mut cache = ModelCache::new(config.clone());
    let cases = cases();
    for case in cases.iter().chain(cases.iter().rev()) {
        let objs = objects(case.objects.clone());
        cache.update(&objs);
        assert_eq!(cache.state(), &build(&objs, &config), "case {:?}", case.name);
    }
}

fn named(name: &str) -> ServiceName {
    ServiceName { namespace: "default".into(), name: name.into() }
}

/// Three Services with a slice each, as `Arc`s that later snapshots re-use the way the sources do.
fn three_services() -> ClusterObjects {
    let mut values = vec![this_node(), node("node-b", &["192.168.1.11"], &[], &["10.244.1.0/24"], Some("zone-b"))];
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        values.push(svc(name, json!({"type": "NodePort", "clusterIP": format!("10.96.0.{}", i + 1),
            "ports": [{"name": "http", "port": 80, "nodePort": 30080 + i}]})));
        values.push(slice(&format!("{name}-1"), name, "IPv4", json!([tcp("http", 8080)]),
            vec![ep(&format!("10.244.1.{}", i + 1), "node-b", ""), ep(&format!("10.244.0.{}", i + 1), NODE, "")]));
    }
    objects(values)
}

#[test]
fn an_update_to_one_service_rebuilds_only_it() {
    let config = ModelConfig { node_name: Some(NODE.into()), ..Default::default() };
    let mut cache = ModelCache::new(config.clone());
    let mut objs = three_services();
    assert_eq!(cache.update(&objs).services.len(), 3);
    assert_eq!(cache.update(&objs), Changed::default(), "the same snapshot again changes nothing");

    // b's slice: one endpoint not ready.
    let slice_b = slice("b-1", "b", "IPv4", json!([tcp("http", 8080)]), vec![ep("10.244.1.2", "node-b", "r"), ep("10.244.0.2", NODE, "")]);
    objs.endpoint_slices[1] = Arc::new(serde_json::from_value(slice_b).unwrap());
    let changed = cache.update(&objs);
    assert_eq!(changed.services, BTreeSet::from([named("b")]));
    assert!(!changed.nodes);
    assert_eq!(cache.state(), &build(&objs, &config));

    // Equal content in a new `Arc` (a relist): nothing to rebuild.
    let copy = (*objs.services[0]).clone();
    objs.services[0] = Arc::new(copy);
    assert_eq!(cache.update(&objs), Changed::default());

    // The slice moves to Service c (label changed): both are rebuilt; then b's Service goes.
    let moved = slice("b-1", "c", "IPv4", json!([tcp("http", 8080)]), vec![ep("10.244.9.9", "node-b", "")]);
    objs.endpoint_slices[1] = Arc::new(serde_json::from_value(moved).unwrap());
    assert_eq!(cache.update(&objs).services, BTreeSet::from([named("b"), named("c")]));
    assert_eq!(cache.state(), &build(&objs, &config));
    objs.services.remove(1);
    assert_eq!(cache.update(&objs).services, BTreeSet::from([named("b")]));
    assert!(!cache.state().services.contains_key(&named("b")));
    assert_eq!(cache.state(), &build(&objs, &config));
}

#[test]
fn a_service_that_changes_type_is_rebuilt_alone() {
    let config = ModelConfig { node_name: Some(NODE.into()), ..Default::default() };
    let mut cache = ModelCache::new(config.clone());
    let mut objs = three_services();
    cache.update(&objs);
    for (type_, frontends) in [("ClusterIP", 1), ("LoadBalancer", 3), ("NodePort", 3)] {
        let mut s = (*objs.services[0]).clone();
        s.spec.as_mut().unwrap().type_ = Some(type_.into());
        objs.services[0] = Arc::new(s);
        assert_eq!(cache.update(&objs).services, BTreeSet::from([named("a")]), "{type_}");
        assert_eq!(cache.state(), &build(&objs, &config), "{type_}");
        assert_eq!(cache.state().services[&named("a")].ports[0].frontends.len(), frontends, "{type_}");
    }
    let mut s = (*objs.services[0]).clone();
    let spec = s.spec.as_mut().unwrap();
    (spec.type_, spec.external_name) = (Some("ExternalName".into()), Some("a.example.com".into()));
    objs.services[0] = Arc::new(s);
    cache.update(&objs);
    assert!(cache.state().services[&named("a")].ports.is_empty());
    assert_eq!(cache.state(), &build(&objs, &config));
}

#[test]
fn node_changes_rebuild_services_only_when_this_node_changed() {
    let config = ModelConfig { node_name: Some(NODE.into()), ..Default::default() };
    let mut cache = ModelCache::new(config.clone());
    let mut objs = three_services();
    cache.update(&objs);
    // Another node's podCIDR: routes change, no Service does.
    objs.nodes[1] = Arc::new(serde_json::from_value(node("node-b", &["192.168.1.11"], &[], &["10.244.7.0/24"], Some("zone-b"))).unwrap());
    let changed = cache.update(&objs);
    assert!(changed.nodes && changed.services.is_empty(), "{changed:?}");
    assert_eq!(cache.state(), &build(&objs, &config));
    // This node's addresses carry every NodePort: all Services are rebuilt.
    objs.nodes[0] = Arc::new(serde_json::from_value(node(NODE, &["192.168.1.20"], &[], &["10.244.0.0/24"], Some("zone-a"))).unwrap());
    let changed = cache.update(&objs);
    assert_eq!(changed.services.len(), 3);
    assert_eq!(cache.state(), &build(&objs, &config));
    // A duplicate Service (two manifests define it): the last wins, as in `build`.
    let mut dup = (*objs.services[2]).clone();
    dup.metadata.name = Some("a".into());
    objs.services.push(Arc::new(dup));
    cache.update(&objs);
    assert_eq!(cache.state(), &build(&objs, &config));
    cache.update(&objs);
    assert_eq!(cache.state(), &build(&objs, &config));
}
