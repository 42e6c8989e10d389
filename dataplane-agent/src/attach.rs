//! `run`'s data path: attach the programs (uplink XDP, pod-veth TC, cgroup socket hooks), pin
//! every attachment as a bpf_link under `<pin dir>/links/` and every attached program under
//! `<pin dir>/progs/`, and on restart adopt those links instead of detaching and re-attaching.
//!
//! Why links and not netlink/prog_attach: a pinned bpf_link keeps its program attached after the
//! process that made it exits (SIGTERM or kill -9), and `BPF_LINK_UPDATE` swaps the program
//! behind a link atomically, so a restarted (or upgraded) agent replaces its programs with no
//! moment where the hook is empty. aya 0.14 can update XDP and tcx links in place
//! (`attach_to_link`) but not cgroup links; those are kept as they are (see [`Outcome::Kept`]).
use std::{
    collections::BTreeSet,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};

use crate::loader::programs;

/// Sub-directories of the pin directory.
pub const LINKS_DIR: &str = "links";
pub const PROGS_DIR: &str = "progs";

/// The CNI plugin names a Pod's host-side veth `dp` + 12 lowercase hex digits
/// (`cni::plugin::host_veth_name`); the agent attaches to exactly those.
pub fn is_pod_veth(name: &str) -> bool {
    name.len() == 14 && name.starts_with("dp") && name[2..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[derive(Debug, thiserror::Error)]
pub enum DataPathError {
    #[error("{path:?} is not a directory of a cgroup v2 hierarchy")]
    NotCgroup2 { path: PathBuf },
    #[error("no cgroup2 mount in /proc/self/mountinfo; pass --cgroup-root")]
    NoCgroup2Mount,
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed")]
    Program {
        what: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("{what} failed")]
    Link {
        what: String,
        #[source]
        source: Box<LinkError>,
    },
    #[error("pinning {path:?} failed")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error("could not attach to uplink {iface}: XDP (driver, generic) and TC all failed")]
    Uplink {
        iface: String,
        #[source]
        source: Box<DataPathError>,
    },
    #[error("watching links over netlink failed")]
    Netlink(#[source] std::io::Error),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DataPathError {
    let what = what.into();
    move |source| DataPathError::Io { what, source }
}

/// What happened to one attach point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing was there: attached and pinned.
    Attached,
    /// A pinned link was there: its program was replaced atomically (no gap).
    Updated,
    /// A pinned link was there and is kept with its program (cgroup links: aya cannot update them).
    Kept,
}

/// How the uplink is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UplinkMode {
    XdpDriver,
    XdpGeneric,
    /// A pinned XDP link adopted as it was (its mode is the one it was created with).
    XdpPinned,
    Tc,
}

/// The loaded object plus the pin layout; the one place that attaches.
#[derive(Debug)]
pub struct DataPath {
    ebpf: Ebpf,
    links: PathBuf,
    progs: PathBuf,
    /// Programs pinned under `progs/` by this process (a program is pinned once).
    pinned_progs: BTreeSet<&'static str>,
}

impl DataPath {
    /// Takes a loaded (not necessarily verified) object; creates `links/` and `progs/` under `pin_dir`.
    pub fn new(ebpf: Ebpf, pin_dir: &Path) -> Result<DataPath, DataPathError> {
        let (links, progs) = (pin_dir.join(LINKS_DIR), pin_dir.join(PROGS_DIR));
        for d in [&links, &progs] {
            fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
        }
        Ok(DataPath { ebpf, links, progs, pinned_progs: BTreeSet::new() })
    }

    pub fn link_pin(&self, kind: &str, target: &str) -> PathBuf {
        self.links.join(format!("{kind}-{target}"))
    }

    /// XDP on `iface`: a pinned link is updated to the new program; otherwise driver mode, then
    /// generic (skb) mode, then the TC uplink program, each fall-back logged with its reason.
    pub fn attach_uplink(&mut self, iface: &str) -> Result<UplinkMode, DataPathError> {
        let pin = self.link_pin("xdp", iface);
        if pin.exists() {
            match self.with_prog::<Xdp, _>(programs::XDP_INGRESS, |p| update_xdp(p, &pin)) {
                Ok(()) => {
                    self.pin_prog::<Xdp>(programs::XDP_INGRESS)?;
                    tracing::info!(iface, pin = %pin.display(), "uplink: pinned XDP link adopted, program replaced atomically");
                    return Ok(UplinkMode::XdpPinned);
                }
                Err(e) => {
                    tracing::warn!(iface, error = %crate::errors::error_chain(&e), "uplink: pinned XDP link unusable; removing it and attaching anew");
                    fs::remove_file(&pin).map_err(io(format!("removing {}", pin.display())))?;
                }
            }
        }
        let mut reason = None;
        for (mode, label) in [(XdpMode::Driver, UplinkMode::XdpDriver), (XdpMode::Skb, UplinkMode::XdpGeneric)] {
            match self.with_prog::<Xdp, _>(programs::XDP_INGRESS, |p| new_xdp(p, iface, mode, &pin)) {
                Ok(()) => {
                    self.pin_prog::<Xdp>(programs::XDP_INGRESS)?;
                    tracing::info!(iface, mode = ?label, "uplink: XDP attached");
                    return Ok(label);
                }
                Err(e) => {
                    tracing::warn!(iface, ?mode, error = %crate::errors::error_chain(&e), "uplink: XDP attach failed; falling back");
                    reason = Some(e);
                }
            }
        }
        match self.attach_tc(programs::TC_UPLINK, iface) {
            Ok(_) => Ok(UplinkMode::Tc),
            Err(e) => {
                tracing::warn!(iface, error = %crate::errors::error_chain(&e), "uplink: TC fallback failed too");
                Err(DataPathError::Uplink { iface: iface.to_owned(), source: Box::new(reason.unwrap_or(e)) })
            }
        }
    }

    /// TC ingress program `name` on `iface` (tcx), adopting and updating a pinned link.
    pub fn attach_tc(&mut self, name: &'static str, iface: &str) -> Result<Outcome, DataPathError> {
        let kind = if name == programs::TC_UPLINK { "tc-uplink" } else { "tc" };
        let pin = self.link_pin(kind, iface);
        if pin.exists() {
            match self.with_prog::<SchedClassifier, _>(name, |p| update_tc(p, &pin)) {
                Ok(()) => {
                    self.pin_prog::<SchedClassifier>(name)?;
                    return Ok(Outcome::Updated);
                }
                // A pin left by a veth that is gone (its link is defunct) or a damaged pin.
                Err(e) => {
                    tracing::info!(iface, error = %crate::errors::error_chain(&e), "stale TC link pin; attaching anew");
                    fs::remove_file(&pin).map_err(io(format!("removing {}", pin.display())))?;
                }
            }
        }
        self.with_prog::<SchedClassifier, _>(name, |p| new_tc(p, iface, &pin))?;
        self.pin_prog::<SchedClassifier>(name)?;
        Ok(Outcome::Attached)
    }

    /// The four socket programs on cgroup v2 directory `cgroup` (refused unless it is one).
    /// Pinned links (named after the cgroup's id, so another cgroup gets its own) are kept.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<Outcome, DataPathError> {
        let id = check_cgroup2(cgroup)?;
        let mut outcome = Outcome::Kept;
        let file = fs::File::open(cgroup).map_err(io(format!("opening cgroup {}", cgroup.display())))?;
        for name in programs::SOCK {
            let pin = self.link_pin(name, &format!("cg{id}"));
            if PinnedLink::from_pin(&pin).is_ok() {
                continue;
            }
            let _ = fs::remove_file(&pin);
            self.with_prog::<CgroupSockAddr, _>(name, |p| {
                let what = || format!("attaching {name} to {}", cgroup.display());
                let link_id = p.attach(&file, CgroupAttachMode::Single).map_err(prog_err(what()))?;
                let link: FdLink = p.take_link(link_id).map_err(prog_err(what()))?.try_into().map_err(link_err(what()))?;
                pin_link(link, &pin)
            })?;
            self.pin_prog::<CgroupSockAddr>(name)?;
            outcome = Outcome::Attached;
        }
        if outcome == Outcome::Kept {
            tracing::info!(cgroup = %cgroup.display(), "socket programs: pinned cgroup links kept with the programs they run (aya cannot update a cgroup link in place)");
        }
        Ok(outcome)
    }

    /// Removes the TC pin of a pod veth that is gone (its link went with the device).
    pub fn forget_pod_veth(&self, iface: &str) {
        let _ = fs::remove_file(self.link_pin("tc", iface));
    }

    /// Removes the TC pins of pod veths not in `present` (deleted while the agent was down).
    pub fn prune_pod_pins(&self, present: &BTreeSet<String>) {
        let Ok(dir) = fs::read_dir(&self.links) else { return };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(iface) = name.strip_prefix("tc-")
                && is_pod_veth(iface)
                && !present.contains(iface)
            {
                tracing::info!(iface, "pod veth gone; removing its TC link pin");
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Loads (verifies) program `name` if needed and runs `f` on it.
    fn with_prog<T, R>(&mut self, name: &'static str, f: impl FnOnce(&mut T) -> Result<R, DataPathError>) -> Result<R, DataPathError>
    where
        T: Loadable,
        for<'a> &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        let prog = self.ebpf.program_mut(name).ok_or_else(|| DataPathError::Program {
            what: format!("program {name}"),
            source: Box::new(ProgramError::NotLoaded),
        })?;
        let prog: &mut T = prog.try_into().map_err(prog_err(format!("program {name}")))?;
        if prog.fd_missing() {
            prog.load_it().map_err(prog_err(format!("loading {name}")))?;
        }
        f(prog)
    }

    /// Pins program `name` under `progs/` (replacing a previous agent's pin: the links hold
    /// the programs, the pin is for `status` and bpftool).
    fn pin_prog<T>(&mut self, name: &'static str) -> Result<(), DataPathError>
    where
        T: Loadable,
        for<'a> &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        if self.pinned_progs.contains(name) {
            return Ok(());
        }
        let path = self.progs.join(name);
        let _ = fs::remove_file(&path);
        self.with_prog::<T, _>(name, |p| p.pin_at(&path).map_err(|e| DataPathError::Pin { path: path.clone(), source: Box::new(e) }))?;
        self.pinned_progs.insert(name);
        Ok(())
    }
}

/// The few program operations `with_prog`/`pin_prog` need, over the three program types.
pub trait Loadable {
    fn fd_missing(&self) -> bool;
    fn load_it(&mut self) -> Result<(), ProgramError>;
    fn pin_at(&mut self, path: &Path) -> Result<(), aya::pin::PinError>;
}

macro_rules! loadable {
    ($t:ty) => {
        impl Loadable for $t {
            fn fd_missing(&self) -> bool {
                self.fd().is_err()
            }
            fn load_it(&mut self) -> Result<(), ProgramError> {
                self.load()
            }
            fn pin_at(&mut self, path: &Path) -> Result<(), aya::pin::PinError> {
                self.pin(path)
            }
        }
    };
}
loadable!(Xdp);
loadable!(SchedClassifier);
loadable!(CgroupSockAddr);

fn prog_err(what: String) -> impl FnOnce(ProgramError) -> DataPathError {
    move |source| DataPathError::Program { what, source: Box::new(source) }
}

fn link_err(what: String) -> impl FnOnce(LinkError) -> DataPathError {
    move |source| DataPathError::Link { what, source: Box::new(source) }
}

fn pin_link(link: FdLink, pin: &Path) -> Result<(), DataPathError> {
    // Dropping the PinnedLink closes our descriptor; the pin keeps the link (and program) alive.
    link.pin(pin).map(drop).map_err(|e| DataPathError::Pin { path: pin.to_path_buf(), source: Box::new(e) })
}

/// Opens the pinned link without removing the pin (so a crash right here loses nothing).
fn open_pinned(pin: &Path) -> Result<FdLink, DataPathError> {
    PinnedLink::from_pin(pin).map(FdLink::from).map_err(link_err(format!("opening pinned link {}", pin.display())))
}

fn update_xdp(p: &mut Xdp, pin: &Path) -> Result<(), DataPathError> {
    let what = || format!("updating XDP link {}", pin.display());
    let link = XdpLink::try_from(open_pinned(pin)?).map_err(link_err(what()))?;
    p.attach_to_link(link).map(drop).map_err(prog_err(what()))
}

fn new_xdp(p: &mut Xdp, iface: &str, mode: XdpMode, pin: &Path) -> Result<(), DataPathError> {
    let what = || format!("attaching XDP ({mode:?}) to {iface}");
    let id = p.attach(iface, mode).map_err(prog_err(what()))?;
    let link: FdLink = p.take_link(id).map_err(prog_err(what()))?.try_into().map_err(link_err(what()))?;
    pin_link(link, pin)
}

fn update_tc(p: &mut SchedClassifier, pin: &Path) -> Result<(), DataPathError> {
    let what = || format!("updating TC link {}", pin.display());
    let link = SchedClassifierLink::try_from(open_pinned(pin)?).map_err(link_err(what()))?;
    p.attach_to_link(link).map(drop).map_err(prog_err(what()))
}

fn new_tc(p: &mut SchedClassifier, iface: &str, pin: &Path) -> Result<(), DataPathError> {
    // tcx (kernel >= 6.6) gives a bpf_link; the legacy netlink attachment could not be pinned,
    // and an agent restart would then detach it, so it is not used as a silent fall-back.
    let what = || format!("attaching TC ingress (tcx) to {iface}");
    let id = p.attach(iface, TcAttachType::Ingress).map_err(prog_err(what()))?;
    let link: FdLink = p.take_link(id).map_err(prog_err(what()))?.try_into().map_err(link_err(what()))?;
    pin_link(link, pin)
}

/// Refuses anything but a directory on a cgroup2 filesystem; returns its cgroup id (inode).
pub fn check_cgroup2(path: &Path) -> Result<u64, DataPathError> {
    use std::os::unix::fs::MetadataExt as _;
    let not = || DataPathError::NotCgroup2 { path: path.to_path_buf() };
    let meta = fs::metadata(path).map_err(|_| not())?;
    let fs = nix::sys::statfs::statfs(path).map_err(|_| not())?;
    if !meta.is_dir() || fs.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        return Err(not());
    }
    Ok(meta.ino())
}

/// The cgroup to attach to: the flag, else the cgroup2 mount (a real node: every Pod is below it).
pub fn cgroup_root(flag: Option<&Path>) -> Result<PathBuf, DataPathError> {
    match flag {
        Some(p) => Ok(p.to_path_buf()),
        None => {
            let mounts = crate::host::mounts().map_err(io("reading /proc/self/mountinfo"))?;
            crate::host::find_cgroup2(&mounts).map(Path::to_path_buf).ok_or(DataPathError::NoCgroup2Mount)
        }
    }
}

/// The sysctls the data path needs, in the agent's network namespace: forwarding (XDP/TC FIB
/// lookups and routed pod traffic), and `accept_local` on each uplink: XDP hands a rewritten
/// packet whose next hop is not resolved yet to the stack, whose source may then be one of the
/// node's own addresses (SNAT to the node), which the stack drops as martian without it.
pub fn set_sysctls(uplinks: &[String]) -> Result<(), DataPathError> {
    let mut writes = vec![("/proc/sys/net/ipv4/ip_forward".to_string(), "1")];
    writes.extend(uplinks.iter().map(|u| (format!("/proc/sys/net/ipv4/conf/{u}/accept_local"), "1")));
    for (path, value) in writes {
        fs::write(&path, value).map_err(io(format!("setting {path} = {value}")))?;
        tracing::info!(sysctl = %path, value, "set");
    }
    Ok(())
}

/// The IPv4 addresses of `ifaces` (the default node addresses NodePorts answer on).
pub fn interface_ipv4s(ifaces: &[String]) -> Result<Vec<Ipv4Addr>, DataPathError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| DataPathError::Io { what: "listing interface addresses".into(), source: e.into() })?;
    let mut out = Vec::new();
    for a in addrs {
        if ifaces.contains(&a.interface_name)
            && let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in())
            && !out.contains(&sin.ip())
        {
            out.push(sin.ip());
        }
    }
    Ok(out)
}

/// One pinned link as `status` shows it, read from bpffs (works while the agent is down).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct PinnedAttachment {
    /// The pin's file name: `<kind>-<target>` (`xdp-eth0`, `tc-dp0123456789ab`, `dp_sock_connect4-cg1234`).
    pub pin: String,
    pub link_id: Option<u32>,
    pub link_type: Option<String>,
    pub program_id: Option<u32>,
    pub program: Option<String>,
    /// Why the link could not be read, if so.
    pub error: Option<String>,
}

/// Reads every link pinned under `<pin_dir>/links`.
pub fn pinned_attachments(pin_dir: &Path) -> Vec<PinnedAttachment> {
    let Ok(dir) = fs::read_dir(pin_dir.join(LINKS_DIR)) else { return Vec::new() };
    let mut names: Vec<String> = dir.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let programs: Vec<aya::programs::ProgramInfo> = aya::programs::loaded_programs().flatten().collect();
    names
        .into_iter()
        .map(|pin| {
            let path = pin_dir.join(LINKS_DIR).join(&pin);
            match PinnedLink::from_pin(&path).map(FdLink::from).and_then(|l| l.info()) {
                Ok(info) => {
                    let prog = programs.iter().find(|p| p.id() == info.program_id());
                    PinnedAttachment {
                        pin,
                        link_id: Some(info.id()),
                        link_type: info.link_type().ok().map(|t| format!("{t:?}")),
                        program_id: Some(info.program_id()),
                        program: prog.and_then(|p| p.name_as_str()).map(str::to_owned),
                        error: None,
                    }
                }
                Err(e) => PinnedAttachment { pin, link_id: None, link_type: None, program_id: None, program: None, error: Some(crate::errors::error_chain(&e)) },
            }
        })
        .collect()
}

/// Removes every pinned link and program (detaching the data path), then the two directories.
pub fn remove_pins(pin_dir: &Path) -> Result<Vec<PathBuf>, DataPathError> {
    let mut removed = Vec::new();
    for sub in [LINKS_DIR, PROGS_DIR] {
        let dir = pin_dir.join(sub);
        let entries = match fs::read_dir(&dir) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(format!("reading {}", dir.display()))(e)),
        };
        for entry in entries.flatten() {
            fs::remove_file(entry.path()).map_err(io(format!("removing {}", entry.path().display())))?;
            removed.push(entry.path());
        }
        fs::remove_dir(&dir).map_err(io(format!("removing {}", dir.display())))?;
        removed.push(dir);
    }
    Ok(removed)
}

/// Attaches TC ingress to every Pod veth now present and to each one created later (netlink
/// RTNLGRP_LINK), and drops the pins of those deleted. Runs until the netlink socket closes.
/// Subscribes before the initial dump so that no veth created in between is missed.
pub async fn watch_pod_veths(dp: std::sync::Arc<std::sync::Mutex<DataPath>>) -> Result<(), DataPathError> {
    use futures::{StreamExt as _, TryStreamExt as _};
    use rtnetlink::packet_core::NetlinkPayload;
    use rtnetlink::packet_route::{RouteNetlinkMessage, link::{LinkAttribute, LinkMessage}};

    fn name(m: &LinkMessage) -> Option<String> {
        m.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
    }
    // ifindex per veth attached by this process: NEWLINK also comes for every state change.
    let mut attached: std::collections::BTreeMap<String, u32> = Default::default();
    let mut attach = |m: &LinkMessage| {
        let Some(iface) = name(m).filter(|n| is_pod_veth(n)) else { return };
        if attached.get(&iface) == Some(&m.header.index) {
            return;
        }
        let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        match dp.attach_tc(programs::TC_INGRESS, &iface) {
            Ok(outcome) => {
                tracing::info!(iface, ?outcome, "pod veth: TC ingress attached");
                attached.insert(iface, m.header.index);
            }
            Err(e) => tracing::warn!(iface, error = %crate::errors::error_chain(&e), "pod veth: TC attach failed"),
        }
    };
    let (conn, handle, mut events) =
        rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link]).map_err(DataPathError::Netlink)?;
    tokio::spawn(conn);
    let mut present = BTreeSet::new();
    let mut dump = handle.link().get().execute();
    while let Some(m) = dump.try_next().await.map_err(|e| DataPathError::Netlink(std::io::Error::other(e)))? {
        if let Some(n) = name(&m).filter(|n| is_pod_veth(n)) {
            present.insert(n);
        }
        attach(&m);
    }
    dp.lock().unwrap_or_else(|p| p.into_inner()).prune_pod_pins(&present);
    while let Some((msg, _)) = events.next().await {
        match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => attach(&m),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => {
                if let Some(iface) = name(&m).filter(|n| is_pod_veth(n)) {
                    // The device took its tcx link along; only the pin is left.
                    dp.lock().unwrap_or_else(|p| p.into_inner()).forget_pod_veth(&iface);
                    tracing::info!(iface, "pod veth deleted");
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_veth_names_follow_the_cni_plugin() {
        assert!(is_pod_veth("dp0123456789ab"));
        for n in ["dp0123456789aB", "dp0123456789a", "eth0", "xp0123456789ab", "dp0123456789abc", "dp01234567zz9a"] {
            assert!(!is_pod_veth(n), "{n}");
        }
    }

    #[test]
    fn cgroup_check_refuses_what_is_not_a_cgroup2_directory() {
        for p in ["/nonexistent/dpt", "/proc", "/etc/hostname"] {
            assert!(matches!(check_cgroup2(Path::new(p)), Err(DataPathError::NotCgroup2 { .. })), "{p}");
        }
    }
}
