//! Stand-in attachment of the data path, for as long as `dataplane-agent run` only programs the
//! pinned maps and does not attach the programs itself (docs/agent.md, "Not done yet": it has no
//! `--uplink` / `--cgroup-root`). Then the harness does what the DaemonSet's data path set-up
//! would: with the project's own loader (`dataplane_agent::loader`) and the node's configuration,
//! it loads the object *re-using the maps the node's agent pinned*, and attaches XDP to the
//! node's uplink, the socket programs to the node's cgroup, and TC ingress to each Pod's host-side
//! veth. The agent still computes and writes every map entry; only the attach step is ours, and
//! only for the parts the agent lacks (checked per flag).
//!
//! The attachments are held by this process (not pinned), so they live exactly as long as the
//! cluster value. Once the agent attaches by itself this module is not used (see
//! [`super::Cluster::start`]).
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf,
    programs::{CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode},
};
use dataplane_agent::loader::{self, Config};

use super::ClusterError;
use crate::netns::NetNs;

fn err(what: String) -> impl FnOnce(String) -> ClusterError {
    move |detail| ClusterError::Command { what, status: "data path attach failed".into(), stderr: detail, stdout: String::new() }
}

/// The data path of one node, loaded and attached by the harness.
#[derive(Debug)]
pub struct HarnessDataPath {
    ebpf: Arc<Mutex<Ebpf>>,
    netns: PathBuf,
    /// Whether Pods' veths get TC ingress from us (when we attached XDP, i.e. the agent does not).
    pods: bool,
}

impl HarnessDataPath {
    /// Loads the object with the node's address, re-using the maps pinned in `pins`, and attaches
    /// what the agent does not: XDP (driver mode) to `uplink` when given (then also TC ingress to
    /// Pods' veths, see [`attach_pod`](Self::attach_pod)), the four socket programs to `cgroup`
    /// when given.
    pub fn attach(netns: &NetNs, pins: &Path, uplink: Option<&str>, cgroup: Option<&Path>, node_ip: Ipv4Addr) -> Result<HarnessDataPath, ClusterError> {
        let (pins, cgroup, uplink) = (pins.to_path_buf(), cgroup.map(Path::to_path_buf), uplink.map(str::to_owned));
        let what = format!("attaching the data path in {}", netns.name());
        let pods = uplink.is_some();
        if let Some(uplink) = &uplink {
            // The XDP program hands a rewritten packet whose next hop is not resolved yet to the
            // stack, which must then accept a source that is one of its own addresses (xdp.rs).
            netns.exec(&["sysctl", "-qw", &format!("net.ipv4.conf.{uplink}.accept_local=1")]);
        }
        let ebpf = netns
            .run(move || -> Result<Ebpf, String> {
                let cfg = Config { node_ips: vec![node_ip], ..Config::default() };
                let mut ebpf = loader::load_with(Some(&pins), &cfg).map_err(|e| format!("{e:?}"))?;
                if let Some(uplink) = &uplink {
                    let xdp: &mut Xdp = ebpf.program_mut(loader::programs::XDP_INGRESS).unwrap().try_into().map_err(|e| format!("{e}"))?;
                    xdp.load().map_err(|e| format!("load XDP: {e:?}"))?;
                    loader::attach_xdp(&mut ebpf, uplink, XdpMode::Driver).map_err(|e| format!("{e:?}"))?;
                    let tc: &mut SchedClassifier = ebpf.program_mut(loader::programs::TC_INGRESS).unwrap().try_into().map_err(|e| format!("{e}"))?;
                    tc.load().map_err(|e| format!("load TC: {e:?}"))?;
                }
                if let Some(cgroup) = &cgroup {
                    for name in loader::programs::SOCK {
                        let p: &mut CgroupSockAddr = ebpf.program_mut(name).unwrap().try_into().map_err(|e| format!("{e}"))?;
                        p.load().map_err(|e| format!("load {name}: {e:?}"))?;
                    }
                    loader::attach_sock(&mut ebpf, cgroup).map_err(|e| format!("{e:?}"))?;
                }
                Ok(ebpf)
            })
            .map_err(err(what))?;
        Ok(HarnessDataPath { ebpf: Arc::new(Mutex::new(ebpf)), netns: netns.path(), pods })
    }

    /// Attaches TC ingress to a Pod's host-side veth (reverse NAT of replies, hairpin, and the
    /// per-packet fallback for traffic the socket programs do not see).
    pub fn attach_pod(&self, host_veth: &str) -> Result<(), ClusterError> {
        if !self.pods {
            return Ok(());
        }
        let ebpf = self.ebpf.clone();
        let (netns, veth) = (self.netns.clone(), host_veth.to_owned());
        let what = format!("attaching TC ingress to {host_veth}");
        std::thread::spawn(move || -> Result<(), String> {
            let file = std::fs::File::open(&netns).map_err(|e| e.to_string())?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
            let mut ebpf = ebpf.lock().unwrap_or_else(|p| p.into_inner());
            loader::attach_tc(&mut ebpf, loader::programs::TC_INGRESS, &veth, TcAttachType::Ingress).map_err(|e| format!("{e:?}"))
        })
        .join()
        .unwrap_or_else(|_| Err("attach thread panicked".into()))
        .map_err(err(what))
    }
}
