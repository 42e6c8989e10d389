//! Loading the embedded eBPF object with its load-time configuration, and attaching its programs.
//!
//! With a pin directory the service, conntrack and affinity maps ([`PINNED_MAPS`]) live under it,
//! so that the data path keeps forwarding (and conntrack survives) while the agent restarts; a
//! restarted agent re-uses them. Without one every map is private to the returned `Ebpf` (tests).
//! Load-time constants go through `EbpfLoader::override_global` (aya's `set_global`).
use std::{
    fs::File,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode, tc,
    },
};
use dataplane_common::{affinity, ct, lb, metrics};

/// The eBPF object built by `build.rs` (package `dataplane-ebpf`, bin `dataplane`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane"));

/// Program names in the object, as the attach code and `status` refer to them.
pub mod programs {
    /// XDP on the uplink: NodePort / LoadBalancer / externalIP, reverse NAT of remote replies.
    pub const XDP_INGRESS: &str = "dp_xdp_ingress";
    /// Parsing plus one frontend lookup: the benchmark's floor, never attached.
    pub const XDP_FLOOR: &str = "dp_xdp_floor";
    /// TC ingress on the host side of a pod's veth: ClusterIP per-packet LB, reverse NAT, hairpin.
    pub const TC_INGRESS: &str = "dp_tc_ingress";
    /// TC ingress on the uplink, where XDP cannot run: the XDP path at TC.
    pub const TC_UPLINK: &str = "dp_tc_uplink";
    /// TC egress: counts only.
    pub const TC_EGRESS: &str = "dp_tc_egress";
    pub const SOCK_CONNECT4: &str = "dp_sock_connect4";
    pub const SOCK_SENDMSG4: &str = "dp_sock_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "dp_sock_recvmsg4";
    pub const SOCK_GETPEERNAME4: &str = "dp_sock_getpeername4";
    pub const XDP: [&str; 2] = [XDP_INGRESS, XDP_FLOOR];
    pub const TC: [&str; 3] = [TC_INGRESS, TC_UPLINK, TC_EGRESS];
    pub const SOCK: [&str; 4] = [SOCK_CONNECT4, SOCK_SENDMSG4, SOCK_RECVMSG4, SOCK_GETPEERNAME4];
}

/// As many node addresses as the programs can hold (`cfg::NODE_IPS_MAX` on the eBPF side).
pub const NODE_IPS_MAX: usize = 4;

/// Load-time configuration of the data path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The node's IPv4 addresses: NodePort answers on these, and external traffic to a remote
    /// backend is SNATed to the one it arrived on (else the first).
    pub node_ips: Vec<Ipv4Addr>,
    /// The NodePort range, inclusive (kube-apiserver `--service-node-port-range`).
    pub nodeport_min: u16,
    pub nodeport_max: u16,
    /// The source a pod sees when its own Service sent its packet back to it (hairpin).
    pub hairpin_snat_ip: Ipv4Addr,
    /// Conntrack lifetimes per protocol and TCP state.
    pub ct: ct::CtLifetimes,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_ips: Vec::new(),
            nodeport_min: 30000,
            nodeport_max: 32767,
            // cilium's IPV4_LOOPBACK default: link-local, never a pod or node address.
            hairpin_snat_ip: Ipv4Addr::new(169, 254, 42, 1),
            ct: ct::CtLifetimes::default(),
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_ips.len() > NODE_IPS_MAX {
            return Err(ConfigError::TooManyNodeIps { count: self.node_ips.len(), max: NODE_IPS_MAX });
        }
        if let Some(ip) = self.node_ips.iter().find(|ip| ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast()) {
            return Err(ConfigError::BadNodeIp { ip: *ip });
        }
        if self.nodeport_min == 0 || self.nodeport_min > self.nodeport_max {
            return Err(ConfigError::BadNodePortRange { min: self.nodeport_min, max: self.nodeport_max });
        }
        if self.hairpin_snat_ip.is_unspecified() || self.node_ips.contains(&self.hairpin_snat_ip) {
            return Err(ConfigError::BadHairpinIp { ip: self.hairpin_snat_ip });
        }
        let c = &self.ct;
        for (which, seconds) in [("TCP SYN", c.tcp_syn_s), ("TCP established", c.tcp_established_s), ("TCP close", c.tcp_close_s), ("UDP", c.other_s)] {
            if seconds == 0 || seconds > ct::CT_LIFETIME_MAX_S {
                return Err(ConfigError::BadCtLifetime { which, seconds });
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{count} node addresses given, the data path holds at most {max}")]
    TooManyNodeIps { count: usize, max: usize },
    #[error("{ip} cannot be a node address")]
    BadNodeIp { ip: Ipv4Addr },
    #[error("NodePort range {min}-{max} is empty or starts at 0")]
    BadNodePortRange { min: u16, max: u16 },
    #[error("hairpin SNAT address {ip} is unspecified or a node address")]
    BadHairpinIp { ip: Ipv4Addr },
    #[error("conntrack lifetime ({which}) of {seconds} s is not in 1..={max} s", max = ct::CT_LIFETIME_MAX_S)]
    BadCtLifetime { which: &'static str, seconds: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("invalid data path configuration")]
    Config(#[from] ConfigError),
    #[error("pin directory {pin_dir:?} is not a directory")]
    PinDir { pin_dir: PathBuf },
    #[error("loading the eBPF object (pin directory {pin_dir:?}) failed")]
    Load {
        pin_dir: Option<PathBuf>,
        // Boxed: aya's errors are large and would make every Result in this module large.
        #[source]
        source: Box<EbpfError>,
    },
    #[error("the verifier refused program {name}")]
    Verify {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("program {name} is not in the object or has another type")]
    NoProgram { name: &'static str },
    #[error("attaching {name} to {target} failed")]
    Attach {
        name: &'static str,
        target: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("cannot open cgroup {path:?}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Maps that outlive the agent: service tables, conntrack, affinity, the socket LB's per-socket
/// storage, and the counters (drops, hooks, per-Service), so that counts survive a restart and
/// `status` can read them while the agent is down.
pub const PINNED_MAPS: [&str; 11] = [
    lb::FRONTENDS4_MAP,
    lb::SLOTS4_MAP,
    lb::BACKENDS4_MAP,
    lb::REV_NAT4_MAP,
    lb::SOCK_LB4_MAP,
    ct::CT4_MAP,
    affinity::AFFINITY4_MAP,
    metrics::DROPS_MAP,
    metrics::HOOKS_MAP,
    lb::SERVICE_STATS_MAP,
    metrics::SOCK_LB_STATS_MAP,
];

/// Pins of maps that older agents made and this layout no longer has: the socket LB's LRU maps
/// keyed by socket cookie (reverse NAT, UDP stickiness), replaced by [`lb::SOCK_LB4_MAP`].
/// [`load_with`] unpins them; socket programs an older agent left attached (cgroup links are
/// kept across restarts) hold their maps by reference and go on working.
pub const OBSOLETE_PINS: [&str; 2] = ["lb4_sknat_v1", "lb4_skfwd_v1"];

/// Loads the object with the default configuration; see [`load_with`].
pub fn load(pin_dir: Option<&Path>) -> Result<Ebpf, LoadError> {
    load_with(pin_dir, &Config::default())
}

/// Loads the object into the kernel with `cfg`, re-using (or creating) the pinned maps under
/// `pin_dir` when given, and removing the [`OBSOLETE_PINS`] there once it loaded. Programs are
/// neither verified ([`verify_all`]) nor attached. Bad configuration or a missing pin directory is
/// refused before anything reaches the kernel (a directory off bpffs makes the pinning fail, and
/// the maps created so far are freed).
pub fn load_with(pin_dir: Option<&Path>, cfg: &Config) -> Result<Ebpf, LoadError> {
    cfg.validate()?;
    let pin_paths: Vec<(&str, PathBuf)> = match pin_dir {
        Some(dir) if !dir.is_dir() => return Err(LoadError::PinDir { pin_dir: dir.to_path_buf() }),
        Some(dir) => PINNED_MAPS.iter().map(|name| (*name, dir.join(name))).collect(),
        None => Vec::new(),
    };
    let mut node_ips = [0u32; NODE_IPS_MAX];
    for (slot, ip) in node_ips.iter_mut().zip(&cfg.node_ips) {
        // The programs compare against packet fields, which are in network order.
        *slot = u32::from_ne_bytes(ip.octets());
    }
    let count = cfg.node_ips.len() as u32;
    let hairpin = u32::from_ne_bytes(cfg.hairpin_snat_ip.octets());
    let mut loader = EbpfLoader::new();
    for (name, path) in &pin_paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader
        .override_global("NODE_IPS", &node_ips, true)
        .override_global("NODE_IP_COUNT", &count, true)
        .override_global("NODEPORT_MIN", &cfg.nodeport_min, true)
        .override_global("NODEPORT_MAX", &cfg.nodeport_max, true)
        .override_global("HAIRPIN_SNAT_IP", &hairpin, true)
        .override_global("CT_LIFETIME_TCP_SYN_S", &cfg.ct.tcp_syn_s, true)
        .override_global("CT_LIFETIME_TCP_ESTABLISHED_S", &cfg.ct.tcp_established_s, true)
        .override_global("CT_LIFETIME_TCP_CLOSE_S", &cfg.ct.tcp_close_s, true)
        .override_global("CT_LIFETIME_OTHER_S", &cfg.ct.other_s, true);
    let ebpf = loader
        .load(EBPF_OBJECT)
        .map_err(|source| LoadError::Load { pin_dir: pin_dir.map(Path::to_path_buf), source: Box::new(source) })?;
    if let Some(dir) = pin_dir {
        migrate_ct_pins(dir, &cfg.ct);
    }
    if let Some(dir) = pin_dir {
        for name in OBSOLETE_PINS {
            let path = dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(pin = %path.display(), "removed the pin of a map this version no longer uses"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // A pin left behind costs its memory, not correctness.
                Err(e) => tracing::warn!(pin = %path.display(), error = %e, "cannot remove an obsolete map pin"),
            }
        }
    }
    Ok(ebpf)
}

/// Carries an older agent's conntrack (`ct4_v2`) into the current table and unpins it, and unpins
/// its affinity table (`lb4_affin_v1`, not carried over: see `maps::affinity`). A failure costs
/// the old flows their NAT state (their next packet is balanced afresh), not the start.
fn migrate_ct_pins(dir: &Path, lifetimes: &ct::CtLifetimes) {
    match crate::maps::ct::migrate_v2(dir, lifetimes) {
        Ok(0) => {}
        Ok(n) => tracing::info!(flows = n, from = crate::maps::ct::CT4_V2_MAP, to = ct::CT4_MAP, "conntrack carried over"),
        Err(e) => tracing::warn!(error = %crate::errors::error_chain(&e), "older conntrack not carried over"),
    }
    let old = dir.join(crate::maps::affinity::AFFINITY4_V1_MAP);
    match std::fs::remove_file(&old) {
        Ok(()) => tracing::info!(pin = %old.display(), "older session affinity table dropped"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(pin = %old.display(), error = %e, "cannot remove the older session affinity pin"),
    }
}

/// Loads (has the verifier check) every program of the object.
pub fn verify_all(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    fn verify<T>(ebpf: &mut Ebpf, name: &'static str, load: impl FnOnce(&mut T) -> Result<(), ProgramError>) -> Result<(), LoadError>
    where
        for<'a> &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        let prog = ebpf.program_mut(name).ok_or_else(|| LoadError::Verify { name, source: Box::new(ProgramError::NotLoaded) })?;
        let prog: &mut T = prog.try_into().map_err(|source| LoadError::Verify { name, source: Box::new(source) })?;
        load(prog).map_err(|source| LoadError::Verify { name, source: Box::new(source) })
    }
    for name in programs::XDP {
        verify::<Xdp>(ebpf, name, |p| p.load())?;
    }
    for name in programs::TC {
        verify::<SchedClassifier>(ebpf, name, |p| p.load())?;
    }
    for name in programs::SOCK {
        verify::<CgroupSockAddr>(ebpf, name, |p| p.load())?;
    }
    Ok(())
}

/// Attaches the XDP program to `iface` (resolved in the caller's network namespace).
pub fn attach_xdp(ebpf: &mut Ebpf, iface: &str, mode: XdpMode) -> Result<(), AttachError> {
    let name = programs::XDP_INGRESS;
    let prog: &mut Xdp =
        ebpf.program_mut(name).and_then(|p| p.try_into().ok()).ok_or(AttachError::NoProgram { name })?;
    prog.attach(iface, mode)
        .map(drop)
        .map_err(|source| AttachError::Attach { name, target: iface.to_owned(), source: Box::new(source) })
}

/// Attaches TC program `name` (one of [`programs::TC`]) to `iface` in direction `kind`. Uses tcx
/// where the kernel has it; on older kernels adds the clsact qdisc first (already present is fine).
pub fn attach_tc(ebpf: &mut Ebpf, name: &'static str, iface: &str, kind: TcAttachType) -> Result<(), AttachError> {
    let prog: &mut SchedClassifier =
        ebpf.program_mut(name).and_then(|p| p.try_into().ok()).ok_or(AttachError::NoProgram { name })?;
    let attach = |prog: &mut SchedClassifier| prog.attach(iface, kind);
    match attach(prog) {
        Ok(_) => Ok(()),
        Err(first) => {
            // Legacy path: netlink TC needs a clsact qdisc ("exists" is not an error).
            let _ = tc::qdisc_add_clsact(iface);
            attach(prog)
                .map(drop)
                .map_err(|_| AttachError::Attach { name, target: iface.to_owned(), source: Box::new(first) })
        }
    }
}

/// Attaches the four socket programs to the cgroup v2 directory `cgroup`. Never pass the root
/// cgroup in tests (../shared/DESIGN.md safety rules).
pub fn attach_sock(ebpf: &mut Ebpf, cgroup: &Path) -> Result<(), AttachError> {
    let file = File::open(cgroup).map_err(|source| AttachError::Cgroup { path: cgroup.to_path_buf(), source })?;
    for name in programs::SOCK {
        let prog: &mut CgroupSockAddr =
            ebpf.program_mut(name).and_then(|p| p.try_into().ok()).ok_or(AttachError::NoProgram { name })?;
        prog.attach(&file, CgroupAttachMode::Single).map(drop).map_err(|source| AttachError::Attach {
            name,
            target: cgroup.display().to_string(),
            source: Box::new(source),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn bad_configs_are_refused_with_their_reason() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let c = Config { node_ips: vec![ip("10.0.0.1"); 5], ..Config::default() };
        assert_eq!(c.validate(), Err(ConfigError::TooManyNodeIps { count: 5, max: 4 }));
        let c = Config { node_ips: vec![ip("0.0.0.0")], ..Config::default() };
        assert_eq!(c.validate(), Err(ConfigError::BadNodeIp { ip: ip("0.0.0.0") }));
        let c = Config { nodeport_min: 40000, nodeport_max: 30000, ..Config::default() };
        assert_eq!(c.validate(), Err(ConfigError::BadNodePortRange { min: 40000, max: 30000 }));
        let c = Config { nodeport_min: 0, ..Config::default() };
        assert!(matches!(c.validate(), Err(ConfigError::BadNodePortRange { .. })));
        let c = Config { node_ips: vec![ip("169.254.42.1")], ..Config::default() };
        assert_eq!(c.validate(), Err(ConfigError::BadHairpinIp { ip: ip("169.254.42.1") }));
    }

    #[test]
    fn conntrack_lifetimes_must_be_in_range() {
        let with = |l: ct::CtLifetimes| Config { ct: l, ..Config::default() };
        let d = ct::CtLifetimes::default();
        assert_eq!(with(ct::CtLifetimes { tcp_close_s: 0, ..d }).validate(), Err(ConfigError::BadCtLifetime { which: "TCP close", seconds: 0 }));
        let too_long = ct::CT_LIFETIME_MAX_S + 1;
        assert_eq!(with(ct::CtLifetimes { other_s: too_long, ..d }).validate(), Err(ConfigError::BadCtLifetime { which: "UDP", seconds: too_long }));
        with(ct::CtLifetimes { tcp_syn_s: 1, tcp_established_s: ct::CT_LIFETIME_MAX_S, ..d }).validate().unwrap();
    }

    #[test]
    fn load_refuses_a_missing_pin_dir_before_touching_the_kernel() {
        let err = load(Some(Path::new("/nonexistent/dpt"))).unwrap_err();
        assert!(matches!(err, LoadError::PinDir { .. }), "{err:?}");
        let bad = Config { nodeport_min: 2, nodeport_max: 1, ..Config::default() };
        assert!(matches!(load_with(None, &bad), Err(LoadError::Config(_))));
    }
}
