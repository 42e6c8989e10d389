//! One node: a netns with an uplink on the underlay, a cgroup v2 sub-tree, a bpffs pin directory,
//! a state directory, and the agent process that programs it.
use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde_json::Value;

use super::{
    ClusterError, wait_for,
    proc::{self, Binaries, Proc},
};
use crate::{bpffs::PinDir, cgroup::Cgroup, netns::NetNs};

/// The node's interface on the underlay, where XDP/TC attach.
pub const UPLINK: &str = "eth0";

#[derive(Debug)]
pub struct Node {
    /// `node-<n>`: the Kubernetes Node name.
    pub name: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: String,
    /// Port of the agent's /healthz, /status, /metrics on the node's loopback.
    pub http_port: u16,
    pub(super) agent: Option<Proc>,
    pub netns: NetNs,
    pub cgroup: Cgroup,
    pub pins: PinDir,
    /// State directory: agent status, CNI node file, IPAM store, logs.
    pub dir: PathBuf,
    /// The flags naming the agent's source (kubeconfig and filters, or a manifests directory).
    pub(super) source_flags: Vec<(&'static str, Option<String>)>,
    /// Flags a test added ([`super::Cluster::start_with_agent_flags`]), after the harness's own.
    pub(super) extra_flags: Vec<(&'static str, Option<String>)>,
    pub(super) bins: Binaries,
}

impl Node {
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn node_file(&self) -> PathBuf {
        self.dir.join("node.json")
    }

    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// Every `run` flag the harness passes, with its value. `--uplink` and `--cgroup-root` make the
    /// agent attach the data path itself: XDP on the uplink, the socket programs on the node's
    /// cgroup (never the host's root cgroup), TC on every Pod veth the CNI plugin creates.
    pub fn wanted_flags(&self) -> Vec<(&'static str, Option<String>)> {
        let s = |p: &Path| Some(p.display().to_string());
        let mut flags = self.source_flags.clone();
        flags.extend([
            ("--node-name", Some(self.name.clone())),
            ("--routes", None),
            ("--listen", Some(format!("127.0.0.1:{}", self.http_port))),
            ("--state-dir", s(&self.state_dir())),
            ("--node-file", s(&self.node_file())),
            ("--pin-dir", s(self.pins.path())),
            ("--cgroup-root", s(self.cgroup.path())),
            ("--uplink", Some(UPLINK.into())),
        ]);
        flags.extend(self.extra_flags.iter().cloned());
        flags
    }

    /// The agent command line (after the program name).
    pub fn agent_args(&self) -> Vec<String> {
        let mut args = vec!["run".to_string()];
        for (flag, value) in self.wanted_flags() {
            args.push(flag.into());
            args.extend(value);
        }
        args
    }

    /// The pinned bpf_link through which the agent attached TC ingress to a Pod's host veth.
    pub fn pod_link_pin(&self, host_veth: &str) -> PathBuf {
        self.pins.path().join(dataplane_agent::attach::LINKS_DIR).join(format!("tc-{host_veth}"))
    }

    /// Starts the agent inside the node's netns and an `agent` cgroup under the node's cgroup
    /// (so killing the node's cgroup takes it along), and waits until it has synced once.
    pub fn start_agent(&mut self) -> Result<(), ClusterError> {
        let cg = self.cgroup.path().join("agent");
        if !cg.exists() {
            fs::create_dir(&cg).map_err(|e| ClusterError::Io { what: format!("mkdir {}", cg.display()), source: e })?;
        }
        let args = self.agent_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = fs::File::options()
            .create(true)
            .append(true)
            .open(self.agent_log())
            .map_err(|e| ClusterError::Io { what: "agent log".into(), source: e })?;
        let mut cmd = proc::command(self.netns.name(), Some(&cg), &self.bins.agent, &args)?;
        // Plain text in the log file (tracing-subscriber honours NO_COLOR).
        cmd.env("NO_COLOR", "1");
        let since = now_ms();
        let log2 = log.try_clone().map_err(|e| ClusterError::Io { what: "agent log".into(), source: e })?;
        self.agent = Some(Proc::spawn(format!("agent on {}", self.name), cmd, Stdio::from(log), Stdio::from(log2))?);
        self.wait_synced(since, Duration::from_secs(20))
    }

    /// SIGKILLs the agent (the data plane stays programmed through its pins).
    pub fn kill_agent(&mut self) {
        if let Some(mut p) = self.agent.take() {
            p.kill();
        }
    }

    /// The agent's `status.json`, if written yet.
    pub fn status(&self) -> Option<Value> {
        let bytes = fs::read(self.state_dir().join("status.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Waits until the agent reports a sync that ended at or after `since_ms` (Unix ms; see
    /// [`now_ms`]), so one that saw every change made before `since_ms`. Fails early if it died.
    pub fn wait_synced(&mut self, since_ms: u64, timeout: Duration) -> Result<(), ClusterError> {
        let what = format!("agent on {} to sync", self.name);
        wait_for(&what, timeout, || {
            if let Some(agent) = self.agent.as_mut()
                && !agent.alive()
            {
                return Some(Err(ClusterError::AgentDied { node: self.name.clone(), log: self.log_tail() }));
            }
            let s = self.status()?;
            (s["last_sync_unix_ms"].as_u64().unwrap_or(0) >= since_ms && s["ready"] == true).then_some(Ok(()))
        })
        .map_err(|e| match e {
            ClusterError::Timeout { what, .. } => ClusterError::Timeout { what, detail: self.log_tail() },
            e => e,
        })?
    }

    /// The last lines the agent logged.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.agent_log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// The agent's `/metrics` text, fetched from inside the node (it listens on the node's loopback).
    pub fn metrics(&self) -> Result<String, ClusterError> {
        match self.http("/metrics")? {
            (200, body) => Ok(body),
            (code, body) => Err(ClusterError::Io { what: format!("GET /metrics from the agent on {}", self.name), source: std::io::Error::other(format!("{code}: {body}")) }),
        }
    }

    /// `GET path` from the agent's HTTP endpoint, inside the node: status code and body.
    pub fn http(&self, path: &str) -> Result<(u16, String), ClusterError> {
        use std::io::{Read, Write};
        let port = self.http_port;
        let what = format!("GET {path} from the agent on {}", self.name);
        let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
        let resp = self.netns.run(move || -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(request.as_bytes())?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)?;
            Ok(resp)
        });
        let resp = resp.map_err(|e| ClusterError::Io { what: what.clone(), source: e })?;
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        Ok((code, body.to_owned()))
    }

    /// The backends (`ip:port`) of frontend `addr` (TCP) in the node's maps; `None` when it has no
    /// such frontend.
    pub fn backends(&self, addr: std::net::SocketAddr) -> Result<Option<Vec<String>>, ClusterError> {
        use dataplane_agent::maps::{Source, lb::LbMaps};
        let fail = |e: String| ClusterError::Command { what: format!("reading the maps of {}", self.name), status: "error".into(), stderr: e, stdout: String::new() };
        let lb = LbMaps::open(Source::Pinned(self.pins.path())).map_err(|e| fail(e.to_string()))?;
        let rows = dataplane_agent::reconcile::table(&lb).map_err(|e| fail(e.to_string()))?;
        let frontend = addr.to_string();
        Ok(rows.into_iter().find(|r| r.protocol == "TCP" && r.frontend == frontend).map(|r| {
            r.backends.iter().map(|b| b.trim_end_matches(" (local)").to_owned()).collect()
        }))
    }

    /// `dataplane-agent status --output json` for this node (read from its state dir and pins, so
    /// it works while the agent is down).
    pub fn status_report(&self) -> Result<Value, ClusterError> {
        let (pins, state) = (self.pins.path().display().to_string(), self.state_dir().display().to_string());
        let out = self.agent_cli(&["status", "--output", "json", "--pin-dir", &pins, "--state-dir", &state])?;
        serde_json::from_str(&out).map_err(|e| ClusterError::Command {
            what: "dataplane-agent status --output json".into(),
            status: format!("not JSON: {e}"),
            stderr: String::new(),
            stdout: out,
        })
    }

    /// `dataplane-agent <args>` run inside the node (e.g. `services`), returning its stdout.
    pub fn agent_cli(&self, args: &[&str]) -> Result<String, ClusterError> {
        let cmd = proc::command(self.netns.name(), None, &self.bins.agent, args)?;
        let out = proc::output(&format!("dataplane-agent {}", args.join(" ")), cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Now, in Unix milliseconds (the unit of the agent's `last_sync_unix_ms`).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Drop for Node {
    fn drop(&mut self) {
        // The agent goes first; then netns, cgroup (kills what is left inside) and pins.
        self.kill_agent();
    }
}
