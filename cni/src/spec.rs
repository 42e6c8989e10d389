//! CNI spec types: the network configuration we read, the result and error objects we print, and
//! the well-known error codes. Spec 1.1.0, with the result shapes of 1.0.0 and 0.4.0 for older
//! runtimes.
//!
//! Own serde types rather than the `cni-plugin` crate: that crate stops at spec 1.0 (no STATUS,
//! no GC, no `cni.dev/valid-attachments`), so it cannot describe what this plugin must answer.
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Versions whose configs we accept, oldest first; results are shaped for the config's version.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];
/// The version we implement, and answer VERSION with.
pub const CURRENT_VERSION: &str = "1.1.0";

/// The spec's result/error shapes differ only between 0.4.0 and 1.x; this says which one to emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        match s {
            "0.4.0" => Some(Version::V0_4_0),
            "1.0.0" => Some(Version::V1_0_0),
            "1.1.0" => Some(Version::V1_1_0),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }
}

/// Error codes of the spec (1-99) and of this plugin (100+). Documented in docs/cni.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decoding = 6,
    InvalidConfig = 7,
    TryAgain = 11,
    NotAvailable = 50,
    LimitedConnectivity = 51,
    /// Every address of a pool is allocated.
    PoolExhausted = 100,
    /// ADD for a (container ID, ifname) that already has an allocation, without a DEL in between.
    AlreadyAttached = 101,
    /// CNI_NETNS does not name a network namespace.
    NetnsNotFound = 102,
    /// A netlink request failed (veth, address, route, neighbour).
    Netlink = 103,
    /// The IPAM store on disk could not be read or written.
    Store = 104,
    /// CHECK found the attachment not as ADD left it.
    CheckFailed = 105,
    /// A bug: the plugin panicked. Reported like any other failure, never as silence.
    Internal = 198,
    /// A failure injected through the debug variable (tests of the rollback).
    Injected = 199,
}

/// The error object printed on stdout for every failure.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorObject {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

/// `{"containerID", "ifname"}` as listed in GC's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network configuration on stdin: the spec's fields plus this plugin's own (camelCase).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// MTU of both veth ends; the kernel default (1500) when absent.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// The node's pod CIDRs (at most one per family). When absent they are read from `node_file`.
    #[serde(default, rename = "podCIDRs")]
    pub pod_cidrs: Option<Vec<String>>,
    /// Written by the agent from `Node.spec.podCIDRs`: `{"podCIDRs": ["10.244.1.0/24", ...]}`.
    #[serde(default = "defaults::node_file")]
    pub node_file: String,
    /// The agent creates this file when its data plane is programmed; STATUS reports 50 without it.
    #[serde(default = "defaults::readiness_file")]
    pub readiness_file: String,
    /// IPAM store root; one directory per network name below it.
    #[serde(default = "defaults::data_dir")]
    pub data_dir: String,
    /// Log file; the plugin never logs to stdout (that is the runtime's channel).
    #[serde(default = "defaults::log_file")]
    pub log_file: String,
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

pub mod defaults {
    pub const NODE_FILE: &str = "/run/dataplane/node.json";
    pub const READINESS_FILE: &str = "/run/dataplane/ready";
    pub const DATA_DIR: &str = "/var/lib/cni/dataplane";
    pub const LOG_FILE: &str = "/var/log/dataplane-cni.log";

    pub fn node_file() -> String {
        NODE_FILE.into()
    }
    pub fn readiness_file() -> String {
        READINESS_FILE.into()
    }
    pub fn data_dir() -> String {
        DATA_DIR.into()
    }
    pub fn log_file() -> String {
        LOG_FILE.into()
    }
}

/// The node file the agent writes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeFile {
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// Since 1.1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for the container side; absent for the host side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IpConfig {
    /// "4" or "6": only in 0.4.0 results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// The ADD result (and the `prevResult` of CHECK and of chained plugins).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CniResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

impl CniResult {
    /// Shapes the result for `version`: 0.4.0 carries an IP `version`, 1.1.0 an interface `mtu`.
    pub fn for_version(mut self, version: Version) -> CniResult {
        self.cni_version = version.as_str().to_owned();
        for ip in &mut self.ips {
            ip.version = (version == Version::V0_4_0).then(|| {
                if ip.address.addr().is_ipv4() {
                    "4"
                } else {
                    "6"
                }
                .to_owned()
            });
        }
        if version < Version::V1_1_0 {
            for iface in &mut self.interfaces {
                iface.mtu = None;
            }
        }
        self
    }

    /// Appends `other` after this result (chaining): its IP `interface` indices are shifted past ours.
    pub fn append(mut self, other: CniResult) -> CniResult {
        let offset = self.interfaces.len();
        self.interfaces.extend(other.interfaces);
        self.ips.extend(other.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + offset);
            ip
        }));
        self.routes.extend(other.routes);
        self
    }
}

/// The answer to VERSION.
#[derive(Debug, Serialize)]
pub struct VersionInfo {
    #[serde(rename = "cniVersion")]
    pub cni_version: &'static str,
    #[serde(rename = "supportedVersions")]
    pub supported_versions: [&'static str; 3],
}

impl Default for VersionInfo {
    fn default() -> Self {
        VersionInfo {
            cni_version: CURRENT_VERSION,
            supported_versions: SUPPORTED_VERSIONS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result() -> CniResult {
        serde_json::from_str(
            r#"{"cniVersion":"1.1.0","interfaces":[{"name":"dp1","mac":"aa:bb:cc:dd:ee:ff","mtu":1400},
               {"name":"eth0","sandbox":"/run/netns/x"}],
               "ips":[{"address":"10.1.0.5/32","gateway":"169.254.1.1","interface":1},
                      {"address":"fd00::5/128","gateway":"fe80::1","interface":1}],
               "routes":[{"dst":"0.0.0.0/0","gw":"169.254.1.1"}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn results_take_the_shape_of_their_version() {
        let old = serde_json::to_value(result().for_version(Version::V0_4_0)).unwrap();
        assert_eq!(old["cniVersion"], "0.4.0");
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["ips"][1]["version"], "6");
        assert!(old["interfaces"][0].get("mtu").is_none());
        let new = serde_json::to_value(result().for_version(Version::V1_1_0)).unwrap();
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["interfaces"][0]["mtu"], 1400);
        let v1 = serde_json::to_value(result().for_version(Version::V1_0_0)).unwrap();
        assert!(v1["interfaces"][0].get("mtu").is_none());
    }

    #[test]
    fn chained_results_keep_interface_indices_right() {
        let merged = result().append(result());
        assert_eq!(merged.interfaces.len(), 4);
        assert_eq!(merged.ips[2].interface, Some(3));
        assert_eq!(merged.routes.len(), 2);
    }

    #[test]
    fn config_defaults_and_gc_attachments() {
        let conf: NetConf = serde_json::from_str(
            r#"{"cniVersion":"1.1.0","name":"n","type":"dataplane-cni",
                "cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(conf.node_file, defaults::NODE_FILE);
        assert_eq!(conf.readiness_file, defaults::READINESS_FILE);
        assert_eq!(conf.valid_attachments.unwrap()[0].container_id, "c1");
        assert!(Version::parse("0.3.1").is_none());
    }
}
