//! Pods: a netns wired to its node by the real CNI plugin (run the way a container runtime runs
//! it), a cgroup under the node's cgroup, and the echo server as workload. Also the places test
//! traffic is sent from ([`Host`]): a Pod, or the external client.
use std::{
    io::{BufRead, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;

use super::{
    ClusterError,
    client::{self, Held, Reply},
    proc::{self, Proc},
};
use crate::netns::NetNs;

/// Where client processes run: a netns and, for Pods, the Pod's cgroup (so the node's socket
/// programs see their connects, exactly as they see a real Pod's).
#[derive(Debug, Clone)]
pub struct Host {
    pub netns: String,
    pub cgroup: Option<PathBuf>,
    pub(super) echo: PathBuf,
}

impl Host {
    fn client(&self, args: &[String]) -> Result<Vec<Reply>, ClusterError> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd = proc::command(&self.netns, self.cgroup.as_deref(), &self.echo, &args)?;
        let out = proc::output(&format!("echo-server {}", args.join(" ")), cmd)?;
        Ok(client::parse_lines(&String::from_utf8_lossy(&out.stdout)))
    }

    /// `count` TCP requests to `addr`, each on a fresh connection (timeout 1 s each).
    pub fn tcp(&self, addr: SocketAddr, count: u32) -> Result<Vec<Reply>, ClusterError> {
        self.client(&["tcp".into(), addr.to_string(), count.to_string()])
    }

    /// `count` UDP requests to `addr`, each from a fresh socket (timeout 1 s each).
    pub fn udp(&self, addr: SocketAddr, count: u32) -> Result<Vec<Reply>, ClusterError> {
        self.client(&["udp".into(), addr.to_string(), count.to_string()])
    }

    /// Starts a fresh TCP connection to `addr` every `interval` for `duration`, in the background;
    /// [`Steady::finish`] waits for the end and returns the counts.
    pub fn steady(&self, addr: SocketAddr, duration: Duration, interval: Duration) -> Result<Steady, ClusterError> {
        let args = ["steady".to_string(), addr.to_string(), duration.as_millis().to_string(), interval.as_millis().to_string()];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd = proc::command(&self.netns, self.cgroup.as_deref(), &self.echo, &args)?;
        let p = Proc::spawn(format!("steady {addr}"), cmd, Stdio::piped(), Stdio::piped())?;
        Ok(Steady { proc: p })
    }

    /// Opens `conns` connections to `addr` and keeps asking on each every `interval` for `duration`.
    /// Returns once all are connected; [`Hold::finish`] collects the per-connection reports.
    pub fn hold(&self, addr: SocketAddr, conns: usize, duration: Duration, interval: Duration) -> Result<Hold, ClusterError> {
        let args = [
            "hold".to_string(),
            addr.to_string(),
            conns.to_string(),
            duration.as_millis().to_string(),
            interval.as_millis().to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd = proc::command(&self.netns, self.cgroup.as_deref(), &self.echo, &args)?;
        let mut p = Proc::spawn(format!("hold {addr}"), cmd, Stdio::piped(), Stdio::piped())?;
        let stdout = p.child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("\"connected\"") {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        if rx.recv_timeout(Duration::from_secs(5)).is_err() {
            p.kill();
            let stderr = p.child.stderr.take().map(std::io::read_to_string).and_then(Result::ok).unwrap_or_default();
            return Err(ClusterError::Command { what: format!("hold {addr}"), status: "no connections".into(), stderr, stdout: String::new() });
        }
        Ok(Hold { proc: p, reader: Some(reader) })
    }
}

/// Long-lived connections held by a client process.
#[derive(Debug)]
pub struct Hold {
    proc: Proc,
    reader: Option<std::thread::JoinHandle<String>>,
}

/// A running [`Host::steady`] load.
#[derive(Debug)]
pub struct Steady {
    proc: Proc,
}

/// What a steady load saw.
#[derive(Debug, Clone)]
pub struct SteadyReport {
    pub ok: u64,
    pub failed: u64,
    /// The first failures, with when they happened.
    pub errors: Value,
}

impl Steady {
    pub fn finish(mut self) -> Result<SteadyReport, ClusterError> {
        let stdout = self.proc.child.stdout.take().map(std::io::read_to_string).and_then(Result::ok).unwrap_or_default();
        let _ = self.proc.child.wait();
        let v: Value = serde_json::from_str(stdout.trim()).map_err(|e| ClusterError::Command {
            what: self.proc.what.clone(),
            status: format!("unreadable report: {e}"),
            stderr: String::new(),
            stdout: stdout.clone(),
        })?;
        Ok(SteadyReport { ok: v["ok"].as_u64().unwrap_or(0), failed: v["failed"].as_u64().unwrap_or(u64::MAX), errors: v["errors"].clone() })
    }
}

impl Hold {
    /// Waits for the client to finish and returns each connection's report.
    pub fn finish(mut self) -> Result<Vec<Held>, ClusterError> {
        let status = self.proc.child.wait().map_err(|e| ClusterError::Io { what: "wait for hold".into(), source: e })?;
        let stdout = self.reader.take().and_then(|r| r.join().ok()).unwrap_or_default();
        if !status.success() {
            return Err(ClusterError::Command { what: "hold".into(), status: status.to_string(), stderr: String::new(), stdout });
        }
        Ok(client::parse_held(&stdout))
    }
}

/// How to call the CNI plugin for one node.
#[derive(Debug, Clone)]
pub(super) struct Cni {
    pub binary: PathBuf,
    pub node_netns: String,
    pub config: Value,
}

impl Cni {
    /// Runs the plugin in the node's netns with the CNI_* environment and the config on stdin.
    pub fn call(&self, command: &str, container_id: &str, netns: Option<&str>) -> Result<Value, ClusterError> {
        let mut cmd: Command = proc::command(&self.node_netns, None, &self.binary, &[])?;
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", self.binary.parent().unwrap_or(&self.binary));
        if let Some(ns) = netns {
            cmd.env("CNI_NETNS", format!("/run/netns/{ns}"));
        }
        let what = format!("CNI {command} {container_id}");
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| ClusterError::Io { what: what.clone(), source: e })?;
        child.stdin.take().expect("piped").write_all(self.config.to_string().as_bytes()).map_err(|e| ClusterError::Io { what: what.clone(), source: e })?;
        let out = child.wait_with_output().map_err(|e| ClusterError::Io { what: what.clone(), source: e })?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(ClusterError::Command { what, status: out.status.to_string(), stderr: String::from_utf8_lossy(&out.stderr).into_owned(), stdout });
        }
        if stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&stdout).map_err(|e| ClusterError::Command { what, status: format!("result is not JSON: {e}"), stderr: String::new(), stdout })
    }
}

#[derive(Debug)]
pub struct Pod {
    pub name: String,
    /// The node's name (`node-<n>`).
    pub node: String,
    pub ip: Ipv4Addr,
    /// The node-side end of the Pod's veth (named by the CNI plugin).
    pub host_veth: String,
    pub host: Host,
    server: Option<Proc>,
    cni: Cni,
    netns: NetNs,
}

impl Pod {
    /// CNI ADD for a new netns on the node, then the echo server on `port` in the Pod's cgroup.
    pub(super) fn create(name: &str, node: &str, node_cgroup: &std::path::Path, cni: Cni, echo: PathBuf, port: u16) -> Result<Pod, ClusterError> {
        let netns = NetNs::new();
        let cgroup = node_cgroup.join(format!("pod-{name}"));
        std::fs::create_dir(&cgroup).map_err(|e| ClusterError::Io { what: format!("mkdir {}", cgroup.display()), source: e })?;
        let host = Host { netns: netns.name().to_owned(), cgroup: Some(cgroup), echo };
        let result = cni.call("ADD", netns.name(), Some(netns.name()))?;
        // From here on `Pod`'s Drop runs CNI DEL, also when a later step fails.
        let host_veth = result["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i.get("sandbox").is_none())
            .and_then(|i| i["name"].as_str())
            .unwrap_or_default()
            .to_owned();
        let mut pod = Pod { name: name.to_owned(), node: node.to_owned(), ip: Ipv4Addr::UNSPECIFIED, host_veth, host, server: None, cni, netns };
        pod.ip = result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
            .next()
            .ok_or_else(|| ClusterError::Command { what: format!("CNI ADD {name}"), status: "no IPv4 address in the result".into(), stderr: String::new(), stdout: result.to_string() })?;
        // The Pod's replies may cross XDP on another node (NodePort): full checksums, as from a wire.
        super::fabric::tx_checksum_off(&pod.netns, "eth0")?;
        pod.start_server(port)?;
        Ok(pod)
    }

    fn start_server(&mut self, port: u16) -> Result<(), ClusterError> {
        let port = port.to_string();
        let cmd = proc::command(&self.host.netns, self.host.cgroup.as_deref(), &self.host.echo, &["serve", &self.name, &port])?;
        let mut p = Proc::spawn(format!("echo server {}", self.name), cmd, Stdio::piped(), Stdio::inherit())?;
        let stdout = p.child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(line) if line.trim() == "ready" => {
                self.server = Some(p);
                Ok(())
            }
            other => Err(ClusterError::Command {
                what: format!("echo server {}", self.name),
                status: "did not report ready".into(),
                stderr: String::new(),
                stdout: format!("{other:?}"),
            }),
        }
    }

    /// This Pod's netns name.
    pub fn netns(&self) -> &str {
        self.netns.name()
    }

    /// The Pod's echo server address.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }
}

impl std::ops::Deref for Pod {
    type Target = Host;
    fn deref(&self) -> &Host {
        &self.host
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.server.take();
        // As the runtime would on Pod deletion: the plugin removes the veth and frees the address.
        if let Err(e) = self.cni.call("DEL", self.netns.name(), Some(self.netns.name())) {
            eprintln!("warning: {e}");
        }
        if let Some(cg) = &self.host.cgroup {
            // Empty once the server is gone; the node's cgroup removal catches what is left.
            let _ = std::fs::remove_dir(cg);
        }
    }
}
