//! What the binary does with one invocation: read the `CNI_*` environment and the config on stdin,
//! validate both before touching anything, dispatch the command, and turn every failure into a CNI
//! error object with the right code.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;

use crate::{
    commands,
    ipam::{IpamError, StoreError},
    netns::NetnsError,
    spec::{Code, ErrorObject, NetConf, NodeFile, SUPPORTED_VERSIONS, Version, VersionInfo},
};

/// A debug switch: `ipam`, `veth` or `pod` makes ADD fail right after that step, so tests can show
/// that the rollback leaves nothing behind. Documented in docs/cni.md; never set it in production.
pub const FAIL_AFTER_VAR: &str = "DATAPLANE_CNI_DEBUG_FAIL_AFTER";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{0}")]
    InvalidEnv(String),
    #[error("cannot decode the network configuration: {0}")]
    Decode(#[source] serde_json::Error),
    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),
    #[error("{0}")]
    IncompatibleVersion(String),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("the node's pod CIDRs are not known yet: {0}")]
    NoPools(String),
    #[error("{0}")]
    NotAvailable(String),
    #[error("CHECK failed: {0}")]
    Check(String),
    #[error("injected failure after {0} ({FAIL_AFTER_VAR})")]
    Injected(String),
}

impl From<StoreError> for PluginError {
    fn from(e: StoreError) -> Self {
        PluginError::Ipam(e.into())
    }
}

impl PluginError {
    pub fn code(&self) -> Code {
        match self {
            PluginError::InvalidEnv(_) => Code::InvalidEnvironment,
            PluginError::Decode(_) => Code::Decoding,
            PluginError::InvalidConfig(_) => Code::InvalidConfig,
            PluginError::IncompatibleVersion(_) => Code::IncompatibleVersion,
            PluginError::Ipam(IpamError::Exhausted { .. }) => Code::PoolExhausted,
            PluginError::Ipam(IpamError::AlreadyAttached { .. }) => Code::AlreadyAttached,
            PluginError::Ipam(IpamError::Store(_)) => Code::Store,
            PluginError::Netns(NetnsError::Open { .. } | NetnsError::Enter { .. }) => {
                Code::NetnsNotFound
            }
            PluginError::Netns(NetnsError::Check(_)) | PluginError::Check(_) => Code::CheckFailed,
            PluginError::Netns(_) => Code::Netlink,
            // The agent has not written the node file yet: the runtime should retry shortly.
            PluginError::NoPools(_) => Code::TryAgain,
            PluginError::NotAvailable(_) => Code::NotAvailable,
            PluginError::Injected(_) => Code::Injected,
        }
    }

    pub fn to_object(&self, cni_version: &str) -> ErrorObject {
        let mut details = String::new();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            details.push_str(&s.to_string());
            source = s.source();
            if source.is_some() {
                details.push_str(": ");
            }
        }
        ErrorObject {
            cni_version: cni_version.to_owned(),
            code: self.code() as u32,
            msg: self.to_string(),
            details,
        }
    }
}

/// The `CNI_*` variables, validated for the command.
#[derive(Debug, Clone)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
}

fn valid_container_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Linux interface names: 1-15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

impl Env {
    /// Reads the variables through `get` (the process environment in `main`).
    pub fn read(get: impl Fn(&str) -> Option<String>) -> Result<Env, PluginError> {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        let command = get("CNI_COMMAND")
            .ok_or_else(|| PluginError::InvalidEnv("CNI_COMMAND is not set".into()))?;
        let command = Command::parse(&command)
            .ok_or_else(|| PluginError::InvalidEnv(format!("unknown CNI_COMMAND {command:?}")))?;
        let needs_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        let required = |k: &str| {
            get(k)
                .ok_or_else(|| PluginError::InvalidEnv(format!("{k} is required for {command:?}")))
        };
        let (container_id, ifname) = if needs_attachment {
            (required("CNI_CONTAINERID")?, required("CNI_IFNAME")?)
        } else {
            (String::new(), String::new())
        };
        if needs_attachment && !valid_container_id(&container_id) {
            return Err(PluginError::InvalidEnv(format!(
                "CNI_CONTAINERID {container_id:?} has invalid characters"
            )));
        }
        if needs_attachment && !valid_ifname(&ifname) {
            return Err(PluginError::InvalidEnv(format!(
                "CNI_IFNAME {ifname:?} is not a valid interface name"
            )));
        }
        // DEL may come after the namespace is gone; ADD and CHECK cannot work without it.
        let netns = match command {
            Command::Add | Command::Check => Some(PathBuf::from(required("CNI_NETNS")?)),
            _ => get("CNI_NETNS").map(PathBuf::from),
        };
        Ok(Env {
            command,
            container_id,
            netns,
            ifname,
        })
    }
}

/// A parsed, validated config with its pools (when they can be known).
#[derive(Debug)]
pub struct Config {
    pub conf: NetConf,
    pub version: Version,
}

impl Config {
    /// Decodes stdin: not JSON is code 6, an unknown version 1, a wrong field or value 7.
    pub fn parse(stdin: &[u8]) -> Result<Config, PluginError> {
        let value: serde_json::Value =
            serde_json::from_slice(stdin).map_err(PluginError::Decode)?;
        let version = value
            .get("cniVersion")
            .and_then(|v| v.as_str())
            .ok_or_else(|| PluginError::InvalidConfig("cniVersion is missing".into()))?;
        let version = Version::parse(version).ok_or_else(|| {
            PluginError::IncompatibleVersion(format!(
                "cniVersion {version:?} is not supported (supported: {})",
                SUPPORTED_VERSIONS.join(", ")
            ))
        })?;
        let conf: NetConf =
            serde_json::from_value(value).map_err(|e| PluginError::InvalidConfig(e.to_string()))?;
        if conf.name.is_empty() || conf.name.contains('/') || conf.name.starts_with('.') {
            return Err(PluginError::InvalidConfig(format!(
                "network name {:?} is not usable",
                conf.name
            )));
        }
        if let Some(mtu) = conf.mtu
            && !(68..=65535).contains(&mtu)
        {
            return Err(PluginError::InvalidConfig(format!(
                "mtu {mtu} is outside 68..=65535"
            )));
        }
        if let Some(cidrs) = &conf.pod_cidrs {
            parse_pools(cidrs).map_err(PluginError::InvalidConfig)?;
        }
        Ok(Config { conf, version })
    }

    /// The pools: the config's `podCIDRs`, else the node file the agent writes.
    pub fn pools(&self) -> Result<Vec<IpNet>, PluginError> {
        if let Some(cidrs) = &self.conf.pod_cidrs {
            return parse_pools(cidrs).map_err(PluginError::InvalidConfig);
        }
        let path = &self.conf.node_file;
        let text = std::fs::read(path).map_err(|e| PluginError::NoPools(format!("{path}: {e}")))?;
        let node: NodeFile = serde_json::from_slice(&text)
            .map_err(|e| PluginError::InvalidConfig(format!("node file {path}: {e}")))?;
        parse_pools(&node.pod_cidrs)
            .map_err(|e| PluginError::InvalidConfig(format!("node file {path}: {e}")))
    }

    /// The IPAM store directory of this network.
    pub fn store_dir(&self) -> PathBuf {
        Path::new(&self.conf.data_dir).join(&self.conf.name)
    }
}

/// Parses pod CIDRs: at least one, at most one per family, each a network address with its
/// prefix (`10.244.1.0/24`, not `10.244.1.7/24`).
pub fn parse_pools(cidrs: &[String]) -> Result<Vec<IpNet>, String> {
    if cidrs.is_empty() {
        return Err("podCIDRs is empty".into());
    }
    let mut pools: Vec<IpNet> = Vec::new();
    for c in cidrs {
        let net: IpNet = c.parse().map_err(|e| format!("podCIDR {c:?}: {e}"))?;
        if net.trunc() != net {
            return Err(format!(
                "podCIDR {c:?} has host bits set (did you mean {}?)",
                net.trunc()
            ));
        }
        if pools
            .iter()
            .any(|p| p.addr().is_ipv4() == net.addr().is_ipv4())
        {
            return Err(format!("podCIDR {c:?}: only one pool per address family"));
        }
        pools.push(net);
    }
    Ok(pools)
}

/// Name of the host end of the veth for an attachment: `dp` + 12 hex digits of an FNV-1a hash of
/// (network, container ID, ifname). Stable, so DEL and GC find it without any state, and within
/// the 15-byte limit.
pub fn host_veth_name(network: &str, container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in network
        .bytes()
        .chain([0])
        .chain(container_id.bytes())
        .chain([0])
        .chain(ifname.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("dp{:012x}", h & 0xffff_ffff_ffff)
}

/// Fails ADD after `step` when the debug variable asks for it.
pub fn inject(step: &str) -> Result<(), PluginError> {
    match std::env::var(FAIL_AFTER_VAR) {
        Ok(v) if v == step => Err(PluginError::Injected(step.into())),
        _ => Ok(()),
    }
}

/// One invocation: what to print on stdout, or the error object (the caller exits non-zero).
pub fn run(get_env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<String, ErrorObject> {
    // Until the config's version is known, errors carry the version we implement.
    let fallback = crate::spec::CURRENT_VERSION;
    let env = Env::read(get_env).map_err(|e| e.to_object(fallback))?;
    if env.command == Command::Version {
        return Ok(serde_json::to_string(&VersionInfo::default()).expect("serialisable"));
    }
    let config = Config::parse(stdin).map_err(|e| e.to_object(fallback))?;
    if matches!(env.command, Command::Status | Command::Gc) && config.version < Version::V1_1_0 {
        let e = PluginError::IncompatibleVersion(format!(
            "{:?} needs cniVersion 1.1.0, the config has {}",
            env.command,
            config.version.as_str()
        ));
        return Err(e.to_object(config.version.as_str()));
    }
    init_logging(&config.conf.log_file);
    let version = config.version.as_str();
    tracing::info!(command = ?env.command, container = %env.container_id, ifname = %env.ifname, network = %config.conf.name, "invoked");
    let out = match env.command {
        Command::Add => commands::add(&env, &config),
        Command::Del => commands::del(&env, &config).map(|()| String::new()),
        Command::Check => commands::check(&env, &config).map(|()| String::new()),
        Command::Status => commands::status(&config).map(|()| String::new()),
        Command::Gc => commands::gc(&config).map(|()| String::new()),
        Command::Version => unreachable!("answered above"),
    };
    out.map_err(|e| {
        tracing::error!(command = ?env.command, container = %env.container_id, code = e.code() as u32, "{e}");
        e.to_object(version)
    })
}

/// Logs go to the configured file, never to stdout (the runtime's channel). A log file that cannot
/// be opened is not a reason to fail the Pod.
fn init_logging(path: &str) {
    let path = Path::new(path);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        .with_target(false)
        .try_init();
}

/// The addresses of the result `prev` that belong to interface `ifname` (for CHECK).
pub fn result_ips(prev: &crate::spec::CniResult, ifname: &str) -> Vec<IpAddr> {
    prev.ips
        .iter()
        .filter(|ip| {
            ip.interface
                .and_then(|i| prev.interfaces.get(i))
                .is_some_and(|i| i.name == ifname)
        })
        .map(|ip| ip.address.addr())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn env_errors_are_code_4() {
        for pairs in [
            vec![],
            vec![("CNI_COMMAND", "FROB")],
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
            ],
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c"),
                ("CNI_NETNS", "/x"),
            ],
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", "eth0"),
            ],
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c/../x"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
            ],
            vec![
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", "a-very-long-ifname"),
            ],
        ] {
            let e = Env::read(env(&pairs)).unwrap_err();
            assert_eq!(e.code(), Code::InvalidEnvironment, "{pairs:?}: {e}");
        }
        let ok = Env::read(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap();
        assert_eq!(ok.netns, None, "DEL without a namespace is fine");
    }

    #[test]
    fn config_errors_have_their_codes() {
        let cases: [(&str, Code); 6] = [
            ("{not json", Code::Decoding),
            (
                r#"{"cniVersion":"0.3.1","name":"n","type":"t"}"#,
                Code::IncompatibleVersion,
            ),
            (r#"{"name":"n","type":"t"}"#, Code::InvalidConfig),
            (
                r#"{"cniVersion":"1.1.0","name":"n","type":"t","podCIDRs":["10.0.0.0/33"]}"#,
                Code::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","type":"t","podCIDRs":["10.0.0.1/24"]}"#,
                Code::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","type":"t","mtu":20}"#,
                Code::InvalidConfig,
            ),
        ];
        for (text, code) in cases {
            assert_eq!(
                Config::parse(text.as_bytes()).unwrap_err().code(),
                code,
                "{text}"
            );
        }
        let two_v4 = vec!["10.0.0.0/24".to_string(), "10.1.0.0/24".to_string()];
        assert!(parse_pools(&two_v4).is_err());
    }

    #[test]
    fn version_needs_no_config_and_errors_are_objects() {
        let out = run(env(&[("CNI_COMMAND", "VERSION")]), b"").unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["0.4.0", "1.0.0", "1.1.0"])
        );
        let err = run(env(&[("CNI_COMMAND", "STATUS")]), b"[1,").unwrap_err();
        assert_eq!(err.code, 6);
        assert!(!err.msg.is_empty());
        let old = br#"{"cniVersion":"1.0.0","name":"n","type":"t","podCIDRs":["10.0.0.0/24"]}"#;
        for command in ["STATUS", "GC"] {
            let err = run(env(&[("CNI_COMMAND", command)]), old).unwrap_err();
            assert_eq!(
                (err.code, err.cni_version.as_str()),
                (1, "1.0.0"),
                "{command}"
            );
        }
    }

    #[test]
    fn host_veth_names_are_stable_short_and_distinct() {
        let a = host_veth_name("net", "c1", "eth0");
        assert_eq!(a, host_veth_name("net", "c1", "eth0"));
        assert_eq!(a.len(), 14);
        assert_ne!(a, host_veth_name("net", "c1", "eth1"));
        assert_ne!(a, host_veth_name("net", "c2", "eth0"));
    }
}
