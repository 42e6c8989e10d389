//! Shared by the CNI kernel tests: a "node" that is itself a test network namespace (the plugin
//! runs inside it through `ip netns exec`, never in the root namespace), a private IPAM/log
//! directory, and helpers to call the real plugin binary and to look at what it left behind.
#![allow(dead_code)]

use std::{
    io::Write,
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use dataplane_tests::netns::NetNs;
use serde_json::{Value, json};

pub const PLUGIN: &str = env!("CARGO_BIN_EXE_dataplane-cni");
/// The node's own addresses (on its loopback), which Pods must reach.
pub const NODE_V4: &str = "10.200.0.1";
pub const NODE_V6: &str = "fd00:200::1";

pub use dataplane_tests::scratch::TempDir;

/// The node: a test namespace with addresses on its loopback and a private plugin state dir.
pub struct Node {
    pub ns: NetNs,
    pub dir: TempDir,
    pub network: String,
}

impl Node {
    pub fn new() -> Node {
        let ns = NetNs::new();
        ns.ip(&["addr", "add", &format!("{NODE_V4}/32"), "dev", "lo"]);
        ns.ip(&["addr", "add", &format!("{NODE_V6}/128"), "dev", "lo"]);
        Node {
            ns,
            dir: TempDir::new(),
            network: "dpt-net".into(),
        }
    }

    /// A network config with this node's private paths; `extra` is merged over it.
    pub fn conf(&self, version: &str, extra: Value) -> Value {
        let mut c = json!({
            "cniVersion": version,
            "name": self.network,
            "type": "dataplane-cni",
            "mtu": 1400,
            "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"],
            "dataDir": self.dir.0.join("ipam"),
            "logFile": self.dir.0.join("cni.log"),
            "readinessFile": self.dir.0.join("ready"),
            "nodeFile": self.dir.0.join("node.json"),
        });
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    }

    pub fn store_dir(&self) -> PathBuf {
        self.dir.0.join("ipam").join(&self.network)
    }

    /// Address files in the store, with their contents (bookkeeping files left out).
    pub fn allocations(&self) -> Vec<(String, String)> {
        let Ok(rd) = std::fs::read_dir(self.store_dir()) else {
            return Vec::new();
        };
        let mut v: Vec<(String, String)> = rd
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.parse::<std::net::IpAddr>().is_ok())
            })
            .map(|e| {
                (
                    e.file_name().into_string().unwrap(),
                    std::fs::read_to_string(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// Starts the plugin inside the node namespace with `env` and `stdin`.
    pub fn spawn(&self, env: &[(&str, &str)], stdin: &[u8]) -> Child {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns.name(), PLUGIN])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start the plugin");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child
    }

    pub fn call(&self, env: &[(&str, &str)], stdin: &[u8]) -> Outcome {
        Outcome::from(self.spawn(env, stdin).wait_with_output().unwrap())
    }

    /// ADD/DEL/CHECK for (container, ifname) in `pod`.
    pub fn cmd(
        &self,
        command: &str,
        container: &str,
        ifname: &str,
        pod: Option<&NetNs>,
        conf: &Value,
    ) -> Outcome {
        let netns = pod.map(|p| p.path().display().to_string());
        let mut env = vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", container),
            ("CNI_IFNAME", ifname),
            ("CNI_PATH", "/opt/cni/bin"),
        ];
        if let Some(n) = &netns {
            env.push(("CNI_NETNS", n));
        }
        self.call(&env, conf.to_string().as_bytes())
    }

    /// Host-side links other than loopback.
    pub fn host_links(&self) -> Vec<String> {
        links(&self.ns)
    }

    /// Everything a bad input must leave as it was: the store and the kernel state of the node.
    pub fn snapshot(&self, pods: &[&NetNs]) -> String {
        let mut s = format!("{:?}\n", self.allocations());
        for ns in std::iter::once(&self.ns).chain(pods.iter().copied()) {
            s.push_str(&kernel_state(ns));
        }
        s
    }
}

/// What the plugin configures in a namespace, without what the kernel changes on its own after a
/// link comes up (carrier, operstate, tentative link-local addresses).
pub fn kernel_state(ns: &NetNs) -> String {
    let mut s = String::new();
    let links: Value = serde_json::from_str(&ns.ip(&["-j", "-d", "link"])).unwrap();
    for l in links.as_array().unwrap() {
        s.push_str(&format!(
            "link {} {} mtu {} {}\n",
            l["ifname"], l["address"], l["mtu"], l["linkinfo"]["info_kind"]
        ));
    }
    let addrs: Value = serde_json::from_str(&ns.ip(&["-j", "addr"])).unwrap();
    for l in addrs.as_array().unwrap() {
        for a in l["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["scope"] != "link")
        {
            s.push_str(&format!(
                "addr {} {}/{}\n",
                l["ifname"], a["local"], a["prefixlen"]
            ));
        }
    }
    s.push_str(&ns.ip(&["route"]));
    // The kernel adds fe80::/64 once linkwatch reports the carrier, which may lag the plugin.
    let v6 = ns.ip(&["-6", "route"]);
    s.extend(
        v6.lines()
            .filter(|l| !l.starts_with("fe80::/64"))
            .map(|l| format!("{l}\n")),
    );
    s.extend(
        ns.ip(&["neigh"])
            .lines()
            .filter(|l| l.contains("PERMANENT"))
            .map(|l| format!("{l}\n")),
    );
    s
}

pub fn links(ns: &NetNs) -> Vec<String> {
    let out: Value = serde_json::from_str(&ns.ip(&["-j", "link"])).unwrap();
    out.as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_owned())
        .filter(|n| n != "lo")
        .collect()
}

/// What one plugin run printed and returned. Stdout must be empty or one JSON document: logs
/// never go there.
#[derive(Debug)]
pub struct Outcome {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
    pub json: Option<Value>,
}

impl From<Output> for Outcome {
    fn from(o: Output) -> Outcome {
        let stdout = String::from_utf8(o.stdout).unwrap();
        let json = (!stdout.trim().is_empty()).then(|| {
            serde_json::from_str(&stdout)
                .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {stdout}"))
        });
        Outcome {
            ok: o.status.success(),
            stdout,
            stderr: String::from_utf8_lossy(&o.stderr).into(),
            json,
        }
    }
}

impl Outcome {
    pub fn expect_ok(self) -> Outcome {
        assert!(self.ok, "plugin failed: {} {}", self.stdout, self.stderr);
        self
    }

    /// Asserts a failure with a CNI error object carrying `code`.
    pub fn expect_code(self, code: u64) -> Value {
        assert!(
            !self.ok,
            "expected error code {code}, but the plugin succeeded: {}",
            self.stdout
        );
        let err = self
            .json
            .unwrap_or_else(|| panic!("no error object on stdout: {}", self.stderr));
        assert_eq!(err["code"], code, "{err}");
        assert!(err["msg"].as_str().is_some_and(|m| !m.is_empty()), "{err}");
        assert!(err["cniVersion"].is_string(), "{err}");
        err
    }
}

/// One UDP datagram from `from` to `to_addr` (bound in `to`) and its echo back: real sockets in
/// the two namespaces.
pub fn udp_roundtrip(from: &NetNs, to: &NetNs, to_addr: SocketAddr) {
    let server = to.run(move || UdpSocket::bind(to_addr).expect("bind the server"));
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let any: SocketAddr = if to_addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .unwrap();
    let client = from.run(move || UdpSocket::bind(any).unwrap());
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.send_to(b"hello", to_addr).unwrap();
    let mut buf = [0u8; 16];
    let (n, peer) = server
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no datagram reached {to_addr}: {e}"));
    assert_eq!(&buf[..n], b"hello");
    server.send_to(b"back", peer).unwrap();
    let (n, _) = client
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no reply from {to_addr}: {e}"));
    assert_eq!(&buf[..n], b"back");
}

pub fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}
