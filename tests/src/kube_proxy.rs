//! The real kube-proxy (the v1.34.9 binary of [`crate::k8s::bin_dir`]) as the comparison peer of
//! the agent: started inside a test network namespace (entered between fork and exec, see
//! [`crate::cluster::proc::command`]), its rules read back from the kernel with `nft` /
//! `iptables` run inside that namespace, and removed again with `kube-proxy --cleanup`.
//!
//! Safety (../shared/DESIGN.md): every command here runs inside the namespace it is given, which
//! the caller created; kube-proxy is told to leave the host's conntrack sysctls alone
//! (`--conntrack-*=0`), and the sysctls it does write (`route_localnet`) are per namespace.
use std::{
    collections::HashMap,
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use crate::{
    cluster::proc::{self, Proc},
    k8s::pki,
    netns::NetNs,
};

/// kube-proxy's `--proxy-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Nftables,
    Iptables,
}

impl Mode {
    pub fn flag(self) -> &'static str {
        match self {
            Mode::Nftables => "nftables",
            Mode::Iptables => "iptables",
        }
    }

    /// Short name for figures (`kp_nft_...`, `kp_ipt_...`).
    pub fn short(self) -> &'static str {
        match self {
            Mode::Nftables => "nft",
            Mode::Iptables => "ipt",
        }
    }
}

/// Writes a kubeconfig for `server` that authenticates with the control plane's admin client
/// certificate (group `system:masters`), as a cluster's kube-proxy kubeconfig would with its own.
pub fn write_admin_kubeconfig(path: &Path, server: SocketAddr, cp_dir: &Path, ca: &Path) -> std::io::Result<()> {
    let cfg = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "dpt", "cluster": {"server": format!("https://{server}"), "certificate-authority": ca}}],
        "users": [{"name": "dpt", "user": {
            "client-certificate": cp_dir.join(pki::ADMIN_CERT),
            "client-key": cp_dir.join(pki::ADMIN_KEY),
        }}],
        "contexts": [{"name": "dpt", "context": {"cluster": "dpt", "user": "dpt"}}],
        "current-context": "dpt",
    });
    fs::write(path, serde_json::to_vec_pretty(&cfg).unwrap_or_default())
}

#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    pub kubeconfig: PathBuf,
    /// `--hostname-override`: a Node that exists in the API.
    pub node_name: String,
    pub cluster_cidr: String,
    /// stdout and stderr go here.
    pub log: PathBuf,
}

impl Options {
    /// Flags as a node would run it, minus what would touch the host: the conntrack sysctls are
    /// left as they are, and the metrics and health servers listen on the namespace's loopback.
    /// Everything else (sync periods, min-sync-period 1 s, ...) is kube-proxy's default.
    pub fn args(&self) -> Vec<String> {
        vec![
            format!("--kubeconfig={}", self.kubeconfig.display()),
            format!("--proxy-mode={}", self.mode.flag()),
            format!("--hostname-override={}", self.node_name),
            format!("--cluster-cidr={}", self.cluster_cidr),
            "--conntrack-max-per-core=0".into(),
            "--conntrack-min=0".into(),
            "--conntrack-tcp-timeout-established=0".into(),
            "--conntrack-tcp-timeout-close-wait=0".into(),
            "--metrics-bind-address=127.0.0.1:10249".into(),
            "--healthz-bind-address=127.0.0.1:10256".into(),
            "-v=2".into(),
        ]
    }
}

/// A running kube-proxy; SIGKILLed on drop (its rules stay until [`cleanup`] or the namespace goes).
#[derive(Debug)]
pub struct KubeProxy {
    pub mode: Mode,
    proc: Proc,
}

impl KubeProxy {
    pub fn start(ns: &NetNs, bin: &Path, opts: &Options) -> Result<KubeProxy, String> {
        let log = fs::File::options().create(true).append(true).open(&opts.log).map_err(|e| format!("{}: {e}", opts.log.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let args = opts.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd = proc::command(ns.name(), None, bin, &args).map_err(|e| e.to_string())?;
        let proc = Proc::spawn(format!("kube-proxy --proxy-mode={}", opts.mode.flag()), cmd, Stdio::from(log), Stdio::from(log2))
            .map_err(|e| e.to_string())?;
        Ok(KubeProxy { mode: opts.mode, proc })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn alive(&mut self) -> bool {
        self.proc.alive()
    }
}

/// Runs `program args...` inside `ns`; its stdout, or its stderr as the error.
pub fn run_in(ns: &NetNs, program: &str, args: &[&str]) -> Result<String, String> {
    let cmd = proc::command(ns.name(), None, Path::new(program), args).map_err(|e| e.to_string())?;
    let out = proc::output(&format!("{program} {}", args.join(" ")), cmd).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `kube-proxy --cleanup` inside `ns` with the same flags it ran with (it removes the rules of
/// every mode).
pub fn cleanup(ns: &NetNs, bin: &Path, opts: &Options) -> Result<(), String> {
    let mut args = opts.args();
    args.push("--cleanup".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = proc::command(ns.name(), None, bin, &args).map_err(|e| e.to_string())?;
    let log = fs::File::options().create(true).append(true).open(&opts.log).map_err(|e| e.to_string())?;
    cmd.stdout(Stdio::from(log.try_clone().map_err(|e| e.to_string())?)).stderr(Stdio::from(log));
    let status = cmd.stdin(Stdio::null()).status().map_err(|e| format!("kube-proxy --cleanup: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("kube-proxy --cleanup: {status} (see {})", opts.log.display())) }
}

/// Lines of the namespace's whole netfilter ruleset (`nft list ruleset`, which also shows what
/// iptables-nft wrote) that are kube-proxy's: its `kube-proxy` tables and `KUBE-*` chains.
pub fn leftovers(ns: &NetNs) -> Result<Vec<String>, String> {
    let text = run_in(ns, "nft", &["list", "ruleset"])?;
    Ok(text.lines().filter(|l| l.contains("kube-proxy") || l.contains("KUBE-")).map(|l| l.trim().to_owned()).collect())
}

/// The service chain of every ClusterIP frontend, from the one place kube-proxy dispatches
/// on them: the `service-ips` verdict map of `table ip kube-proxy` (nftables), or the
/// `KUBE-SERVICES` chain of the nat table (iptables). Cheap enough to poll during a start.
pub fn service_chains(ns: &NetNs, mode: Mode) -> Result<HashMap<SocketAddrV4, String>, String> {
    match mode {
        Mode::Nftables => {
            let text = match run_in(ns, "nft", &["list", "map", "ip", "kube-proxy", "service-ips"]) {
                Ok(t) => t,
                // Not created yet.
                Err(e) if e.contains("No such file") => return Ok(HashMap::new()),
                Err(e) => return Err(e),
            };
            Ok(parse_nft_service_ips(&text))
        }
        Mode::Iptables => {
            let text = match run_in(ns, "iptables", &["-w", "-t", "nat", "-S", "KUBE-SERVICES"]) {
                Ok(t) => t,
                // Not created yet; or, while kube-proxy sets its tables up, iptables-nft may
                // call the chain "incompatible" for a moment.
                Err(e) if e.contains("No chain") || e.contains("does not exist") || e.contains("incompatible") => return Ok(HashMap::new()),
                Err(e) => return Err(e),
            };
            Ok(parse_iptables_services(&text))
        }
    }
}

/// `10.96.0.1 . tcp . 443 : goto service-...-default/kubernetes/tcp/https, ...`
fn parse_nft_service_ips(text: &str) -> HashMap<SocketAddrV4, String> {
    let Some(start) = text.find("elements = {") else { return HashMap::new() };
    let body = &text[start + "elements = {".len()..];
    let body = &body[..body.find('}').unwrap_or(body.len())];
    let mut out = HashMap::new();
    for el in body.split(',') {
        let Some((key, verdict)) = el.split_once(':') else { continue };
        let parts: Vec<&str> = key.split('.').map(str::trim).collect();
        // An IPv4 address has dots of its own: a.b.c.d . proto . port
        if parts.len() != 6 {
            continue;
        }
        let Ok(ip) = parts[..4].join(".").parse::<Ipv4Addr>() else { continue };
        let Ok(port) = parts[5].parse::<u16>() else { continue };
        let Some(chain) = verdict.trim().strip_prefix("goto ") else { continue };
        out.insert(SocketAddrV4::new(ip, port), chain.trim().to_owned());
    }
    out
}

/// `-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment "..." -m tcp --dport 443 -j KUBE-SVC-...`
fn parse_iptables_services(text: &str) -> HashMap<SocketAddrV4, String> {
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| l.starts_with("-A KUBE-SERVICES ")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |flag: &str| words.iter().position(|w| *w == flag).and_then(|i| words.get(i + 1)).copied();
        let (Some(dst), Some(port), Some(chain)) = (after("-d"), after("--dport"), after("-j")) else { continue };
        if !chain.starts_with("KUBE-SVC-") {
            continue;
        }
        let (Ok(ip), Ok(port)) = (dst.trim_end_matches("/32").parse::<Ipv4Addr>(), port.parse::<u16>()) else { continue };
        out.insert(SocketAddrV4::new(ip, port), chain.to_owned());
    }
    out
}

/// The whole of kube-proxy's IPv4 rules as text: `nft list table ip kube-proxy` or
/// `iptables-save -t nat`. Seconds at 100k endpoints, and it loads the machine: not for polling.
pub fn listing(ns: &NetNs, mode: Mode) -> Result<String, String> {
    match mode {
        Mode::Nftables => run_in(ns, "nft", &["list", "table", "ip", "kube-proxy"]),
        Mode::Iptables => run_in(ns, "iptables-save", &["-t", "nat"]),
    }
}

/// Every DNAT destination in a [`listing`] (one per service port and endpoint): `dnat to a:p` in
/// the endpoint chains (nftables), `-j DNAT --to-destination a:p` in the `KUBE-SEP-*` chains
/// (iptables).
pub fn dnat_destinations(listing: &str, mode: Mode) -> Vec<SocketAddrV4> {
    match mode {
        Mode::Nftables => listing.split("dnat to ").skip(1).filter_map(|p| p.split_whitespace().next()?.parse().ok()).collect(),
        Mode::Iptables => listing
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SEP-"))
            .filter_map(|l| l.split_once("--to-destination ")?.1.split_whitespace().next()?.parse().ok())
            .collect(),
    }
}

/// What one rule of a service chain sends to: its `goto endpoint-*` verdicts (the `numgen`
/// vmap, nftables) or its `jump KUBE-SEP-*` / `-j KUBE-SEP-*` (iptables).
fn endpoint_refs(rule: &str) -> usize {
    rule.matches("goto endpoint-").count() + rule.matches("jump KUBE-SEP-").count() + rule.matches("-j KUBE-SEP-").count()
}

/// How many endpoints service chain `chain` sends to in a [`listing`].
pub fn chain_endpoints(listing: &str, mode: Mode, chain: &str) -> usize {
    match mode {
        Mode::Nftables => {
            let Some(start) = listing.find(&format!("chain {chain} {{")) else { return 0 };
            let body = &listing[start..];
            let body = &body[..body.find("\n\t}").unwrap_or(body.len())];
            endpoint_refs(body)
        }
        Mode::Iptables => {
            let prefix = format!("-A {chain} ");
            listing.lines().filter(|l| l.starts_with(&prefix)).map(endpoint_refs).sum()
        }
    }
}

/// The nf_tables generation of a network namespace (`NFT_MSG_GETGEN`): it moves on with every
/// committed transaction (kube-proxy writes each sync as one, nftables or iptables-nft), and
/// asking costs one netlink round trip, so it can be polled while kube-proxy works.
#[derive(Debug)]
pub struct NftGen {
    fd: OwnedFd,
    seq: u32,
}

impl NftGen {
    pub fn open(ns: &NetNs) -> std::io::Result<NftGen> {
        let fd = ns.run(|| {
            // SAFETY: plain socket(2); the result is checked before it is owned.
            let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_NETFILTER) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: a fresh descriptor that nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })?;
        Ok(NftGen { fd, seq: 0 })
    }

    pub fn id(&mut self) -> std::io::Result<u32> {
        const NFNL_SUBSYS_NFTABLES: u16 = 10;
        const NFT_MSG_GETGEN: u16 = 16;
        const NFTA_GEN_ID: u16 = 1;
        self.seq = self.seq.wrapping_add(1);
        // nlmsghdr (16 bytes) + nfgenmsg (family, version, res_id).
        let mut req = [0u8; 20];
        req[0..4].copy_from_slice(&20u32.to_ne_bytes());
        req[4..6].copy_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
        req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
        req[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        // SAFETY: the buffer outlives the call.
        if unsafe { libc::send(self.fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = [0u8; 512];
        loop {
            // SAFETY: the buffer outlives the call and recv writes at most its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let msg = &buf[..n as usize];
            if msg.len() < 20 {
                return Err(std::io::Error::other("short netlink answer"));
            }
            let ty = u16::from_ne_bytes([msg[4], msg[5]]);
            let seq = u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]);
            if seq != self.seq {
                continue;
            }
            if ty == libc::NLMSG_ERROR as u16 {
                let code = i32::from_ne_bytes([msg[16], msg[17], msg[18], msg[19]]);
                return Err(std::io::Error::from_raw_os_error(-code));
            }
            // Attributes after the headers: (len u16, type u16, value, padded to 4).
            let mut at = 20;
            while at + 4 <= msg.len() {
                let len = usize::from(u16::from_ne_bytes([msg[at], msg[at + 1]]));
                let kind = u16::from_ne_bytes([msg[at + 2], msg[at + 3]]) & 0x3fff;
                if len < 4 || at + len > msg.len() {
                    break;
                }
                if kind == NFTA_GEN_ID && len >= 8 {
                    return Ok(u32::from_be_bytes([msg[at + 4], msg[at + 5], msg[at + 6], msg[at + 7]]));
                }
                at += (len + 3) & !3;
            }
            return Err(std::io::Error::other("no NFTA_GEN_ID in the answer"));
        }
    }
}

/// What the monitor has seen: transactions (`NFT_MSG_NEWGEN` ends each), and for each chain
/// that a transaction rewrote, how many endpoints it sends to after it.
#[derive(Debug, Default)]
struct Seen {
    generations: u64,
    last_commit: Option<Instant>,
    /// The transaction being read: rules added per chain (endpoint references they hold
    /// themselves, sets they look up), chains that lost rules, endpoint references per set.
    added: HashMap<String, Vec<(usize, Vec<String>)>>,
    touched: std::collections::HashSet<String>,
    set_refs: HashMap<String, usize>,
    /// chain -> (generation, endpoints, when the transaction's end arrived).
    rewritten: HashMap<String, (u64, usize, Instant)>,
    lost: u64,
    ended: Option<String>,
}

impl Seen {
    fn commit(&mut self, now: Instant) {
        self.generations += 1;
        self.last_commit = Some(now);
        let g = self.generations;
        let added = std::mem::take(&mut self.added);
        for chain in std::mem::take(&mut self.touched).into_iter().chain(added.keys().cloned()) {
            let n = added.get(&chain).map_or(0, |rules| {
                rules.iter().map(|(own, sets)| own + sets.iter().map(|s| self.set_refs.get(s).copied().unwrap_or(0)).sum::<usize>()).sum()
            });
            self.rewritten.insert(chain, (g, n, now));
        }
        self.set_refs.clear();
    }
}

/// Occurrences of `needle` in `hay`.
fn count_bytes(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// The NUL-terminated names starting with `prefix` in `hay` (anonymous set names in a rule).
fn names_with(hay: &[u8], prefix: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = hay[at..].windows(prefix.len()).position(|w| w == prefix) {
        let start = at + i;
        let end = hay[start..].iter().position(|b| *b == 0).map_or(hay.len(), |e| start + e);
        out.push(String::from_utf8_lossy(&hay[start..end]).into_owned());
        at = end;
    }
    out
}

/// The string attribute `kind` among the attributes in `attrs`.
fn attr_str(attrs: &[u8], kind: u16) -> Option<String> {
    let mut at = 0;
    while at + 4 <= attrs.len() {
        let len = usize::from(u16::from_ne_bytes([attrs[at], attrs[at + 1]]));
        let k = u16::from_ne_bytes([attrs[at + 2], attrs[at + 3]]) & 0x3fff;
        if len < 4 || at + len > attrs.len() {
            return None;
        }
        if k == kind {
            let v = &attrs[at + 4..at + len];
            return Some(String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or(v)).into_owned());
        }
        at += (len + 3) & !3;
    }
    None
}

/// Takes in one nf_tables notification.
fn note(seen: &mut Seen, msg: &[u8], now: Instant) {
    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NEWRULE: u16 = 6;
    const DELRULE: u16 = 8;
    const NEWSETELEM: u16 = 12;
    const NEWGEN: u16 = 15;
    let ty = u16::from_ne_bytes([msg[4], msg[5]]);
    if ty >> 8 != NFNL_SUBSYS_NFTABLES || msg.len() < 20 {
        return;
    }
    // Attributes follow nlmsghdr (16) and nfgenmsg (4); for rules: 1 table, 2 chain; for set
    // elements: 1 table, 2 set.
    let attrs = &msg[20..];
    match ty & 0xff {
        NEWRULE => {
            let Some(chain) = attr_str(attrs, 2) else { return };
            // What a service chain's rule sends to: a jump to a KUBE-SEP-* chain (iptables-nft
            // writes -j as a native verdict, with the chain's name), or goto endpoint-* verdicts
            // in an anonymous verdict map (nftables), whose elements come in the same transaction.
            let own = count_bytes(attrs, b"KUBE-SEP-");
            let sets = names_with(attrs, b"__map");
            seen.added.entry(chain).or_default().push((own, sets));
        }
        DELRULE => {
            if let Some(chain) = attr_str(attrs, 2) {
                seen.touched.insert(chain);
            }
        }
        NEWSETELEM => {
            if let Some(set) = attr_str(attrs, 2) {
                *seen.set_refs.entry(set).or_default() += count_bytes(attrs, b"endpoint-");
            }
        }
        NEWGEN => seen.commit(now),
        _ => {}
    }
}

/// A netlink socket on the nf_tables notifications of a test namespace: every committed change
/// to its ruleset, as it is committed, read straight from the kernel (not `nft monitor`, which
/// first reads the whole ruleset: minutes at 100k chains). kube-proxy rewrites a changed
/// service chain whole (flush, then its rules) in one transaction, in both modes, so the rules
/// a transaction adds to a chain are its new content.
#[derive(Debug)]
pub struct Monitor {
    seen: Arc<(Mutex<Seen>, Condvar)>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Monitor {
    pub fn start(ns: &NetNs) -> Result<Monitor, String> {
        const NFNLGRP_NFTABLES: u32 = 7;
        let fd = ns
            .run(|| {
                // SAFETY: plain socket(2); the result is checked before it is owned.
                let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_NETFILTER) };
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: a fresh descriptor that nothing else owns.
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            })
            .map_err(|e| format!("netlink socket: {e}"))?;
        let raw = fd.as_raw_fd();
        // A kube-proxy sync of a few Services is a few hundred messages; room for far more.
        let size: libc::c_int = 64 << 20;
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        // SAFETY: setsockopt(2) and bind(2) with values that live across the calls.
        unsafe {
            libc::setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, (&raw const size).cast(), size_of::<libc::c_int>() as u32);
            libc::setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const timeout).cast(), size_of::<libc::timeval>() as u32);
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            addr.nl_groups = 1 << (NFNLGRP_NFTABLES - 1);
            if libc::bind(raw, (&raw const addr).cast(), size_of::<libc::sockaddr_nl>() as u32) != 0 {
                return Err(format!("bind to the nf_tables group: {}", std::io::Error::last_os_error()));
            }
        }
        let seen = Arc::new((Mutex::new(Seen::default()), Condvar::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: the buffer outlives the call and recv writes at most its length.
                let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                let now = Instant::now();
                let (lock, cv) = &*s;
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EAGAIN | libc::EINTR) => continue,
                        Some(libc::ENOBUFS) => {
                            lock.lock().unwrap().lost += 1;
                            continue;
                        }
                        _ => {
                            lock.lock().unwrap().ended = Some(format!("netlink: {e}"));
                            cv.notify_all();
                            return;
                        }
                    }
                }
                let mut seen = lock.lock().unwrap();
                let mut at = 0;
                let n = n as usize;
                while at + 16 <= n {
                    let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
                    if len < 16 || at + len > n {
                        break;
                    }
                    note(&mut seen, &buf[at..at + len], now);
                    at += (len + 3) & !3;
                }
                cv.notify_all();
            }
        });
        Ok(Monitor { seen, stop, reader: Some(reader) })
    }

    /// Transactions seen so far.
    pub fn generations(&self) -> u64 {
        self.seen.0.lock().unwrap().generations
    }

    /// Times the socket overflowed (notifications lost).
    pub fn lost(&self) -> u64 {
        self.seen.0.lock().unwrap().lost
    }

    /// Waits until nothing has been committed for `quiet` (at most `limit`).
    pub fn wait_quiet(&self, quiet: Duration, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let last = self.seen.0.lock().unwrap().last_commit;
            let since = last.map_or(quiet, |t| t.elapsed());
            if since >= quiet || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep((quiet - since).min(deadline.saturating_duration_since(Instant::now())));
        }
    }

    /// Waits for a transaction after generation `after` that leaves `chain` sending to `want`
    /// endpoints; returns when its end arrived.
    pub fn wait_chain(&self, chain: &str, after: u64, want: usize, timeout: Duration) -> Result<Instant, String> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.seen;
        let mut seen = lock.lock().unwrap();
        loop {
            if let Some(&(g, n, t)) = seen.rewritten.get(chain)
                && g > after
                && n == want
            {
                return Ok(t);
            }
            if let Some(e) = &seen.ended {
                return Err(e.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let last = seen.rewritten.get(chain).copied();
                return Err(format!("{chain}: no transaction leaving {want} endpoints within {timeout:?} (last rewrite: {last:?}, overflows: {})", seen.lost));
            }
            seen = cv.wait_timeout(seen, left).unwrap().0;
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_ips_map_is_parsed() {
        let text = "table ip kube-proxy {\n\tmap service-ips {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t\tcomment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\"\n\t\telements = { 10.96.0.1 . tcp . 443 : goto service-2QRHZV4L-default/kubernetes/tcp/https,\n\t\t\t     10.100.0.2 . tcp . 80 : goto service-ABCDEFGH-team-1/svc-1/tcp/http }\n\t}\n}\n";
        let m = parse_nft_service_ips(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[&"10.100.0.2:80".parse().unwrap()], "service-ABCDEFGH-team-1/svc-1/tcp/http");
    }

    #[test]
    fn kube_services_chain_is_parsed() {
        let text = "-N KUBE-SERVICES\n-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment \"default/kubernetes:https cluster IP\" -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y\n-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";
        let m = parse_iptables_services(text);
        assert_eq!(m.len(), 1);
        assert_eq!(m[&"10.96.0.1:443".parse().unwrap()], "KUBE-SVC-NPX46M4PTMTKRN6Y");
    }
}
