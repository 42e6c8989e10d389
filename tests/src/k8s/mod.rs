//! A real Kubernetes control plane for tests, the demo and benchmarks, the way envtest gives
//! controller projects one: etcd and kube-apiserver (and, when asked, kube-controller-manager for
//! EndpointSlices made from Pods) from the real v1.34.9 binaries, started on demand in a network
//! namespace of their own, with fresh certificates, and torn down by a guard.
//!
//! ```text
//!  test process (root netns)          control plane netns (lo only)
//!  kube client ── 127.0.0.1:<free> ──forwarder──> kube-apiserver 127.0.0.1:6443 ── etcd 127.0.0.1:2379
//!  cluster underlay netns                 ▲        kube-controller-manager (endpointslice, serviceaccount, namespace)
//!  agents ── 192.168.200.1:6443 ──forwarder┘
//! ```
//! The binaries come from `$DATAPLANE_K8S_BIN_DIR`, which `cargo xtask setup` sets (it unpacks and
//! verifies them); a test that needs them fails loudly without them.
//!
//! One control plane serves a whole test run ([`shared`]): `cargo xtask test` starts one
//! (`dpt-control-plane`) and passes it to every test through `DATAPLANE_TEST_CONTROL_PLANE`; a test
//! run another way starts one for its process. Tests keep out of each other's way through a
//! namespace each, and agents that only see their own cluster's Services and Nodes (labels).
//! Tests that stop or break the API server start a private one with [`ControlPlane::start`].
pub mod api;
pub mod forward;
pub mod pki;

use std::{
    fmt, fs,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    cgroup::Cgroup,
    cluster::proc::{self, Proc},
    netns::NetNs,
    scratch::TempDir,
};
pub use api::Api;
pub use forward::{Forwarder, Upstream};

/// The Kubernetes version of the binaries.
pub const VERSION: &str = "v1.34.9";
/// The variable naming the directory with the binaries.
pub const BIN_DIR_ENV: &str = "DATAPLANE_K8S_BIN_DIR";
/// The variable naming a running shared control plane's directory (its `cp.json`).
pub const SHARED_ENV: &str = "DATAPLANE_TEST_CONTROL_PLANE";
/// The Service CIDR: a /12 holds the largest benchmark (30k Services) with room to spare.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// Where each cluster's agents reach the API server: an address on their own underlay.
pub const UNDERLAY_API_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 1);
pub const API_PORT: u16 = 6443;
const ETCD_CLIENT: &str = "127.0.0.1:2379";
/// The agent's ServiceAccount, as `manifests/rbac.yaml` defines it.
pub const AGENT_SA: (&str, &str) = ("kube-system", "dataplane-agent");

#[derive(Debug)]
pub struct K8sError(pub String);

impl fmt::Display for K8sError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for K8sError {}

fn err(what: impl fmt::Display) -> K8sError {
    K8sError(what.to_string())
}

/// The directory of the binaries, checked to hold all five.
pub fn bin_dir() -> Result<PathBuf, K8sError> {
    let dir = std::env::var_os(BIN_DIR_ENV).map(PathBuf::from).unwrap_or_else(|| {
        // A test run without xtask still finds what `cargo xtask setup` unpacked.
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/k8s").join(VERSION).join("bin")
    });
    let missing: Vec<&str> = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-proxy", "kubectl"]
        .into_iter()
        .filter(|b| !dir.join(b).is_file())
        .collect();
    if missing.is_empty() {
        return Ok(dir);
    }
    Err(err(format!(
        "the Kubernetes {VERSION} binaries {missing:?} are not in {} (set {BIN_DIR_ENV}, or run `cargo xtask setup`, which unpacks them)",
        dir.display()
    )))
}

/// What a client needs to use a control plane, also across processes (`cp.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Access {
    /// The control plane's network namespace (`/run/netns/<name>`).
    pub netns: String,
    /// Admin kubeconfig for the calling process's namespace (through the loopback forwarder).
    pub admin_kubeconfig: PathBuf,
    pub ca_cert: PathBuf,
    /// A token of the agent's ServiceAccount (TokenRequest), bound by `manifests/rbac.yaml`.
    pub agent_token: String,
    pub bin_dir: PathBuf,
}

impl Access {
    /// The API server as seen from inside the control plane's namespace.
    pub fn upstream(&self) -> Upstream {
        Upstream { netns: Some(PathBuf::from("/run/netns").join(&self.netns)), addr: SocketAddr::from(([127, 0, 0, 1], API_PORT)) }
    }

    /// A client with admin rights.
    pub fn admin(&self) -> Result<Api, K8sError> {
        Api::connect(&self.admin_kubeconfig)
    }

    /// Serves the API server on `addr` inside network namespace `netns` (a cluster's underlay).
    pub fn expose(&self, netns: &NetNs, addr: SocketAddr) -> Result<Forwarder, K8sError> {
        Forwarder::start(Some(netns.path()), addr, self.upstream()).map_err(|e| err(format!("API forwarder on {addr} in {}: {e}", netns.name())))
    }

    /// Writes a kubeconfig that authenticates as the agent's ServiceAccount to `server`.
    pub fn write_agent_kubeconfig(&self, path: &Path, server: SocketAddr) -> Result<(), K8sError> {
        write_kubeconfig(path, server, &self.ca_cert, Credentials::Token(&self.agent_token))
    }

    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.admin_kubeconfig);
        cmd
    }
}

enum Credentials<'a> {
    Token(&'a str),
    Cert { cert: PathBuf, key: PathBuf },
}

fn write_kubeconfig(path: &Path, server: SocketAddr, ca: &Path, creds: Credentials) -> Result<(), K8sError> {
    let user = match creds {
        Credentials::Token(t) => serde_json::json!({"token": t}),
        Credentials::Cert { cert, key } => serde_json::json!({"client-certificate": cert, "client-key": key}),
    };
    let cfg = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "dpt", "cluster": {"server": format!("https://{server}"), "certificate-authority": ca}}],
        "users": [{"name": "dpt", "user": user}],
        "contexts": [{"name": "dpt", "context": {"cluster": "dpt", "user": "dpt"}}],
        "current-context": "dpt",
    });
    // JSON is YAML: every kubeconfig reader takes it.
    fs::write(path, serde_json::to_vec_pretty(&cfg).unwrap_or_default()).map_err(|e| err(format!("write {}: {e}", path.display())))
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Also run kube-controller-manager (EndpointSlices from Pods, ServiceAccounts, namespace deletion).
    pub controller_manager: bool,
    /// The API server's watch cache. Off, watches go to etcd, so an etcd compaction makes a
    /// resumed watch fail with 410 Gone (with the cache, the cache's own window decides).
    pub watch_cache: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { controller_manager: true, watch_cache: true }
    }
}

/// A running control plane. Dropping it stops every process and removes its namespace, cgroup and
/// files.
#[derive(Debug)]
pub struct ControlPlane {
    pub access: Access,
    /// Loopback of the calling process's namespace -> the API server.
    front: Forwarder,
    kcm: Option<Proc>,
    apiserver: Option<Proc>,
    etcd: Option<Proc>,
    opts: Options,
    cgroup: Cgroup,
    netns: NetNs,
    dir: TempDir,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver (and the controller manager), waits until the API server is
    /// ready, applies `manifests/rbac.yaml` and gets the agent's token.
    pub fn start(opts: Options) -> Result<ControlPlane, K8sError> {
        let bin_dir = bin_dir()?;
        let dir = TempDir::try_new().map_err(|e| err(format!("control plane scratch dir: {e}")))?;
        let netns = NetNs::new();
        let cgroup = Cgroup::new();
        let d = dir.path();
        pki::write(d, &[IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V4(UNDERLAY_API_IP), "10.96.0.1".parse().unwrap()])
            .map_err(|e| err(format!("certificates: {e}")))?;
        let front = Forwarder::start(None, SocketAddr::from(([127, 0, 0, 1], 0)), Upstream {
            netns: Some(netns.path()),
            addr: SocketAddr::from(([127, 0, 0, 1], API_PORT)),
        })
        .map_err(|e| err(format!("loopback forwarder: {e}")))?;
        let admin_cert = Credentials::Cert { cert: d.join(pki::ADMIN_CERT), key: d.join(pki::ADMIN_KEY) };
        write_kubeconfig(&d.join("admin.kubeconfig"), front.addr(), &d.join(pki::CA_CERT), admin_cert)?;
        let local_cert = Credentials::Cert { cert: d.join(pki::ADMIN_CERT), key: d.join(pki::ADMIN_KEY) };
        write_kubeconfig(&d.join("local.kubeconfig"), SocketAddr::from(([127, 0, 0, 1], API_PORT)), &d.join(pki::CA_CERT), local_cert)?;
        let access = Access {
            netns: netns.name().to_owned(),
            admin_kubeconfig: d.join("admin.kubeconfig"),
            ca_cert: d.join(pki::CA_CERT),
            agent_token: String::new(),
            bin_dir,
        };
        let mut cp = ControlPlane { access, front, kcm: None, apiserver: None, etcd: None, opts, cgroup, netns, dir };
        let started = Instant::now();
        cp.start_etcd()?;
        cp.start_apiserver()?;
        cp.wait_ready(Duration::from_secs(30))?;
        if opts.controller_manager {
            cp.start_controller_manager()?;
        }
        cp.apply_rbac()?;
        cp.access.agent_token = cp.token(AGENT_SA)?;
        eprintln!("control plane: ready in {:.1} s ({})", started.elapsed().as_secs_f64(), cp.dir.path().display());
        Ok(cp)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    fn spawn(&self, name: &str, args: &[String]) -> Result<Proc, K8sError> {
        let log = fs::File::options().create(true).append(true).open(self.dir().join(format!("{name}.log"))).map_err(|e| err(format!("{name} log: {e}")))?;
        let log2 = log.try_clone().map_err(|e| err(format!("{name} log: {e}")))?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = proc::command(self.netns.name(), Some(self.cgroup.path()), &self.access.bin_dir.join(name), &args).map_err(err)?;
        cmd.current_dir(self.dir());
        Proc::spawn(name, cmd, Stdio::from(log), Stdio::from(log2)).map_err(err)
    }

    fn start_etcd(&mut self) -> Result<(), K8sError> {
        let d = self.dir().to_path_buf();
        let config = format!(
            "name: dpt\ndata-dir: {}\nlisten-client-urls: http://{ETCD_CLIENT}\nadvertise-client-urls: http://{ETCD_CLIENT}\n\
             listen-peer-urls: http://127.0.0.1:2380\ninitial-advertise-peer-urls: http://127.0.0.1:2380\n\
             initial-cluster: dpt=http://127.0.0.1:2380\nunsafe-no-fsync: true\nlog-level: warn\n",
            d.join("etcd").display()
        );
        fs::write(d.join("etcd.yaml"), config).map_err(|e| err(format!("etcd config: {e}")))?;
        self.etcd = Some(self.spawn("etcd", &["--config-file".into(), d.join("etcd.yaml").display().to_string()])?);
        Ok(())
    }

    fn apiserver_args(&self) -> Vec<String> {
        let d = self.dir();
        let f = |n: &str| d.join(n).display().to_string();
        let mut args = vec![
            format!("--etcd-servers=http://{ETCD_CLIENT}"),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={API_PORT}"),
            format!("--tls-cert-file={}", f(pki::SERVING_CERT)),
            format!("--tls-private-key-file={}", f(pki::SERVING_KEY)),
            format!("--client-ca-file={}", f(pki::CA_CERT)),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", f(pki::SA_PUB)),
            format!("--service-account-signing-key-file={}", f(pki::SA_KEY)),
            "--authorization-mode=Node,RBAC".into(),
            // As kubeadm, kind and managed clusters run it: node agents (ours, kube-proxy, CNIs)
            // need privileged containers.
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
        ];
        if !self.opts.watch_cache {
            args.push("--watch-cache=false".into());
        }
        args
    }

    /// Starts (or restarts) the API server on the same etcd.
    pub fn start_apiserver(&mut self) -> Result<(), K8sError> {
        let args = self.apiserver_args();
        self.apiserver = Some(self.spawn("kube-apiserver", &args)?);
        Ok(())
    }

    /// SIGKILLs the API server (etcd and the controller manager stay).
    pub fn kill_apiserver(&mut self) {
        if let Some(mut p) = self.apiserver.take() {
            p.kill();
        }
    }

    /// Waits until `/readyz` answers `ok`; returns when it did.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Instant, K8sError> {
        let deadline = Instant::now() + timeout;
        let api = self.access.admin()?;
        loop {
            if let Some(p) = self.apiserver.as_mut()
                && !p.alive()
            {
                return Err(err(format!("kube-apiserver exited:\n{}", self.log_tail("kube-apiserver"))));
            }
            if api.readyz() {
                return Ok(Instant::now());
            }
            if Instant::now() >= deadline {
                return Err(err(format!("kube-apiserver not ready after {timeout:?}:\n{}", self.log_tail("kube-apiserver"))));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_controller_manager(&mut self) -> Result<(), K8sError> {
        let args = vec![
            format!("--kubeconfig={}", self.dir().join("local.kubeconfig").display()),
            // Only what the tests need: slices from Pods, the `default` ServiceAccount every Pod
            // needs, and namespace deletion (each test's namespace goes at its end).
            "--controllers=endpointslice,serviceaccount,namespace".into(),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--secure-port=10257".into(),
            "--endpointslice-updates-batch-period=0s".into(),
        ];
        self.kcm = Some(self.spawn("kube-controller-manager", &args)?);
        Ok(())
    }

    fn apply_rbac(&self) -> Result<(), K8sError> {
        let rbac = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/rbac.yaml");
        let mut cmd = self.access.kubectl();
        cmd.args(["apply", "-f"]).arg(&rbac);
        proc::output("kubectl apply -f manifests/rbac.yaml", cmd).map_err(err)?;
        Ok(())
    }

    /// A token for ServiceAccount `(namespace, name)` through the TokenRequest API.
    fn token(&self, (ns, name): (&str, &str)) -> Result<String, K8sError> {
        let mut cmd = self.access.kubectl();
        cmd.args(["create", "token", name, "-n", ns, "--duration=24h"]);
        let out = proc::output(&format!("kubectl create token {name}"), cmd).map_err(err)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Compacts etcd's history up to its current revision (what the API server does every 5
    /// minutes), so that a watch resumed from an older resourceVersion gets 410 Gone. Returns the
    /// revision.
    pub fn compact_etcd(&self) -> Result<u64, K8sError> {
        let ns = self.netns.path();
        let (code, body) = etcd_post(ns.clone(), "/v3/kv/range", r#"{"key":"AA==","range_end":"AA=="}"#)?;
        let rev = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["header"]["revision"].as_str().and_then(|r| r.parse::<u64>().ok()))
            .ok_or_else(|| err(format!("etcd range answered {code}: {body}")))?;
        let (code, body) = etcd_post(ns, "/v3/kv/compaction", &format!(r#"{{"revision":"{rev}","physical":true}}"#))?;
        if code != 200 {
            return Err(err(format!("etcd compaction answered {code}: {body}")));
        }
        Ok(rev)
    }

    pub fn log_tail(&self, name: &str) -> String {
        let text = fs::read_to_string(self.dir().join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Closes every connection clients have open through the loopback forwarder.
    pub fn cut_front(&self) {
        self.front.cut();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Clients first (they would retry), then the API server, then its store.
        self.kcm.take();
        self.apiserver.take();
        self.etcd.take();
    }
}

/// One plain HTTP/1.0 request from inside the control plane's namespace.
fn http_in_netns(netns: PathBuf, addr: SocketAddr, request: String) -> std::io::Result<String> {
    forward::in_netns(Some(netns), move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request.as_bytes())?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        Ok(resp)
    })
}

fn etcd_post(netns: PathBuf, path: &str, body: &str) -> Result<(u16, String), K8sError> {
    let req = format!("POST {path} HTTP/1.0\r\nHost: etcd\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let resp = http_in_netns(netns, ETCD_CLIENT.parse().unwrap(), req).map_err(|e| err(format!("etcd {path}: {e}")))?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((code, body.to_owned()))
}

/// The control plane every test in this run shares: the one named by `DATAPLANE_TEST_CONTROL_PLANE`
/// (started by `cargo xtask test`), or one this process starts through `dpt-control-plane`, which
/// goes away when this process exits (its stdin closes).
pub fn shared() -> Result<&'static Access, K8sError> {
    static SHARED: OnceLock<Result<Access, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            if let Some(dir) = std::env::var_os(SHARED_ENV) {
                return read_access(Path::new(&dir)).map_err(|e| e.0);
            }
            spawn_shared().map_err(|e| e.0)
        })
        .as_ref()
        .map_err(err)
}

/// The file a `dpt-control-plane` writes once its control plane is ready.
pub const ACCESS_FILE: &str = "cp.json";

pub fn read_access(dir: &Path) -> Result<Access, K8sError> {
    let path = dir.join(ACCESS_FILE);
    let bytes = fs::read(&path).map_err(|e| err(format!("read {}: {e}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| err(format!("{}: {e}", path.display())))
}

fn spawn_shared() -> Result<Access, K8sError> {
    let bins = proc::Binaries::locate().map_err(err)?;
    let exe = bins.agent.with_file_name("dpt-control-plane");
    // The directory must outlive this function: it lives as long as the process.
    let dir = Box::leak(Box::new(TempDir::try_new().map_err(|e| err(format!("scratch dir: {e}")))?));
    let child = Command::new(&exe)
        .arg(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| err(format!("start {}: {e} (build it with `cargo build --bins`)", exe.display())))?;
    // Never waited for: when this process exits, the pipe closes and the child tears down.
    let child = Box::leak(Box::new(child));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(a) = read_access(dir.path()) {
            return Ok(a);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(err(format!("dpt-control-plane exited ({status}) before it was ready")));
        }
        if Instant::now() >= deadline {
            return Err(err("dpt-control-plane not ready within 60 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes `access` to `dir/cp.json` atomically (aside, then renamed in).
pub fn write_access(dir: &Path, access: &Access) -> Result<(), K8sError> {
    let tmp = dir.join(".cp.json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(access).unwrap_or_default()).map_err(|e| err(format!("write {}: {e}", tmp.display())))?;
    fs::rename(&tmp, dir.join(ACCESS_FILE)).map_err(|e| err(format!("rename {}: {e}", tmp.display())))
}
