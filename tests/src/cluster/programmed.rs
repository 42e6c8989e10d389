//! Has an agent programmed what the harness applied? Read from the node's pinned maps (the truth
//! the data path uses), not from what the agent says about itself: events from the API server
//! arrive on separate watches in no fixed order, so "a sync happened after the write" alone does
//! not mean the write was in it.
use std::{collections::BTreeSet, path::Path};

use dataplane_agent::{
    maps::{Source, lb::LbMaps},
    reconcile::{self, TableRow},
};

use super::manifests::Service;

/// What one Service must look like in the maps.
#[derive(Debug)]
struct Want {
    name: String,
    /// `ip:port` of the ClusterIP frontend.
    frontend: String,
    /// Every endpoint as `ip:targetPort` (the harness writes ready endpoints only).
    backends: BTreeSet<String>,
    affinity_timeout_s: u32,
    /// Ports and addresses that must have a frontend too (NodePort, LoadBalancer, externalIPs).
    also: Vec<Extra>,
}

#[derive(Debug)]
enum Extra {
    /// A NodePort: a frontend on this port (on whatever node addresses).
    Port(u16),
    /// A LoadBalancer or external IP frontend, `ip:port`.
    Addr(String),
}

/// The frontends every agent must have (and must no longer have) after a harness step.
#[derive(Debug)]
pub struct Expected {
    present: Vec<Want>,
    /// ClusterIP frontends of deleted Services.
    absent: Vec<String>,
}

impl Expected {
    pub fn new<'a>(services: impl IntoIterator<Item = &'a Service>, deleted: &[Service]) -> Expected {
        let present = services
            .into_iter()
            .map(|s| {
                let mut also: Vec<Extra> = s.node_port.map(Extra::Port).into_iter().collect();
                also.extend(s.lb_ingress.iter().chain(&s.external_ips).map(|ip| Extra::Addr(format!("{ip}:{}", s.port))));
                Want {
                    name: s.name.clone(),
                    frontend: format!("{}:{}", s.vip(), s.port),
                    backends: s.endpoints.iter().map(|e| format!("{}:{}", e.ip, s.target_port)).collect(),
                    affinity_timeout_s: s.affinity_timeout_s.unwrap_or(0),
                    also,
                }
            })
            .collect();
        let absent = deleted.iter().filter_map(|s| s.cluster_ip.map(|ip| format!("{ip}:{}", s.port))).collect();
        Expected { present, absent }
    }

    /// `Ok` when the maps under `pins` match; otherwise what differs.
    pub fn check(&self, pins: &Path) -> Result<(), String> {
        let lb = LbMaps::open(Source::Pinned(pins)).map_err(|e| format!("opening the maps under {}: {e}", pins.display()))?;
        let rows = reconcile::table(&lb).map_err(|e| format!("reading the maps: {e}"))?;
        let tcp = |r: &&TableRow| r.protocol == "TCP";
        for w in &self.present {
            let Some(row) = rows.iter().filter(tcp).find(|r| r.frontend == w.frontend) else {
                return Err(format!("{}: no frontend {}", w.name, w.frontend));
            };
            // `(local)` marks a backend on this node.
            let have: BTreeSet<String> = row.backends.iter().map(|b| b.trim_end_matches(" (local)").to_owned()).collect();
            if have != w.backends {
                return Err(format!("{}: {} has backends {have:?}, want {:?}", w.name, w.frontend, w.backends));
            }
            if row.affinity_timeout_s != w.affinity_timeout_s {
                return Err(format!("{}: affinity {} s, want {} s", w.name, row.affinity_timeout_s, w.affinity_timeout_s));
            }
            for extra in &w.also {
                let found = match extra {
                    Extra::Port(p) => rows.iter().filter(tcp).any(|r| r.frontend.ends_with(&format!(":{p}"))),
                    Extra::Addr(a) => rows.iter().filter(tcp).any(|r| &r.frontend == a),
                };
                if !found {
                    return Err(format!("{}: no frontend for {extra:?}", w.name));
                }
            }
        }
        if let Some(gone) = self.absent.iter().find(|a| rows.iter().any(|r| &r.frontend == *a)) {
            return Err(format!("deleted frontend {gone} still programmed"));
        }
        Ok(())
    }
}
