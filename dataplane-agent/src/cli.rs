//! Command line: `dataplane-agent run|status|services|doctor|cleanup`, each with `--output json`.
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "dataplane-agent", version, about = "eBPF service proxy and routing agent for one Kubernetes node")]
pub struct Cli {
    /// Output format of the command's result.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Log filter (tracing-subscriber EnvFilter syntax).
    #[arg(long, global = true, env = "DATAPLANE_LOG", default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch the cluster (or a manifests directory) and keep the node programmed.
    Run(Box<RunArgs>),
    /// Show the agent's sync state, counts, last error and pinned objects (works while it is down).
    Status(StatusArgs),
    /// The frontend -> backends table, read from the pinned maps (works while the agent is down).
    Services(ServicesArgs),
    /// Check that this host can run the data plane.
    Doctor(DoctorArgs),
    /// Remove what `run` leaves in place on exit: the pinned links (detaching the data path),
    /// programs and maps, the node file, status.json and, with `--routes`, the routes it installed.
    /// Stop the agent first. `dataplane-agent --cleanup` (kube-proxy's spelling) does the same.
    #[command(long_flag_alias = "cleanup")]
    Cleanup(CleanupArgs),
    /// Install the CNI plugin and its network configuration on the node (the DaemonSet's init
    /// container): each file written beside its destination and renamed over it; a bad conflist
    /// is refused before anything is written.
    InstallCni(InstallCniArgs),
    /// Remove what a kube-proxy left on this node (iptables chains of both backends and families,
    /// its nftables tables, IPVS virtual servers, kube-ipvs0 and its ipsets), once its DaemonSet
    /// is gone, so that its rules no longer catch Service traffic. The kubelet's chains stay.
    CleanupKubeProxy(CleanupKubeProxyArgs),
}

#[derive(Debug, Args)]
pub struct CleanupKubeProxyArgs {
    /// Say what would be removed and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct InstallCniArgs {
    /// The plugin binary to install (its file name is kept).
    #[arg(long, default_value = "/usr/local/bin/dataplane-cni", value_name = "PATH")]
    pub plugin: PathBuf,
    /// Where the container runtime looks for CNI plugins.
    #[arg(long, default_value = "/opt/cni/bin", value_name = "DIR")]
    pub bin_dir: PathBuf,
    /// The network configuration list to install.
    #[arg(long, value_name = "PATH")]
    pub conflist: PathBuf,
    /// Where the container runtime reads CNI configurations.
    #[arg(long, default_value = "/etc/cni/net.d", value_name = "DIR")]
    pub conf_dir: PathBuf,
    /// The installed configuration's file name (runtimes take the first in lexical order).
    #[arg(long, default_value = "10-dataplane.conflist", value_name = "NAME")]
    pub conf_name: String,
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    #[arg(long, default_value = "/sys/fs/bpf/dataplane", value_name = "DIR")]
    pub pin_dir: PathBuf,
    #[arg(long, default_value = crate::routes::DEFAULT_NODE_FILE, value_name = "PATH")]
    pub node_file: PathBuf,
    #[arg(long, default_value = "/run/dataplane", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Also delete the routes to other nodes' podCIDRs (those tagged with the agent's routing protocol).
    #[arg(long)]
    pub routes: bool,
}

#[derive(Debug, Args)]
pub struct ServicesArgs {
    /// bpffs directory holding the data plane's pins.
    #[arg(long, default_value = "/sys/fs/bpf/dataplane", value_name = "DIR")]
    pub pin_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Read Services, EndpointSlices and Nodes from YAML files in DIR instead of the API server.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// How often the manifests directory is checked for changes.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=60_000), value_name = "MS")]
    pub manifests_poll_ms: u64,
    /// Coalesce API events arriving within this window into one sync.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=5_000), value_name = "MS")]
    pub debounce_ms: u64,
    /// kubeconfig file for the API server (default: KUBECONFIG or ~/.kube/config, else the
    /// in-cluster service account).
    #[arg(long, value_name = "PATH", conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,
    /// Longest wait between retries of a failed list/watch (they start at ~100 ms and double).
    /// This is how late, at most, the agent notices an API server that is back; a short cap
    /// means up to one attempt per watch per interval from every node while the server is down
    /// (cheap when the connection is refused).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=300_000), value_name = "MS")]
    pub api_retry_max_ms: u64,
    /// Route to the Nodes matching this label selector only (e.g. one node pool): `key=value`,
    /// `key!=value`, `key`, `!key`, comma-separated (all must hold). This node must match it.
    #[arg(long, value_name = "SELECTOR", value_parser = crate::source::filter::parse_selector)]
    pub node_selector: Option<kube::core::Selector>,
    /// This node's name (the DaemonSet passes spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Address of /healthz, /readyz, /metrics and /status.
    #[arg(long, default_value = "127.0.0.1:9964")]
    pub listen: SocketAddr,
    /// Handle only the Services labelled service.kubernetes.io/service-proxy-name=NAME. Without
    /// it, as kube-proxy: every Service without that label.
    #[arg(long, value_name = "NAME", value_parser = crate::source::filter::parse_label_value)]
    pub service_proxy_name: Option<String>,
    /// Addresses NodePorts are served on (default: this Node's InternalIP and ExternalIP).
    #[arg(long, value_delimiter = ',', value_name = "IP,..")]
    pub nodeport_addresses: Option<Vec<IpAddr>>,
    /// Install routes to other nodes' podCIDRs through their InternalIPs.
    #[arg(long, requires = "node_name")]
    pub routes: bool,
    /// Where this node's podCIDRs are written for the CNI plugin.
    #[arg(long, default_value = crate::routes::DEFAULT_NODE_FILE, value_name = "PATH")]
    pub node_file: PathBuf,
    /// Do not write the CNI node file.
    #[arg(long)]
    pub no_node_file: bool,
    /// Directory for status.json.
    #[arg(long, default_value = "/run/dataplane", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// bpffs directory of the pinned maps; created (with the maps) when missing, re-used otherwise.
    #[arg(long, default_value = "/sys/fs/bpf/dataplane", value_name = "DIR")]
    pub pin_dir: PathBuf,
    /// Compute and serve the desired state without touching the eBPF maps.
    #[arg(long)]
    pub no_maps: bool,
    /// Uplink interface to attach XDP to (driver mode, else generic, else TC); repeatable. Also
    /// sets ip_forward=1 and accept_local=1 on it. With `--uplink` or `--cgroup-root` the agent
    /// attaches the data path (uplinks, socket programs, Pod veths); with neither, only the maps.
    /// From config: env DATAPLANE_UPLINKS (comma-separated; the DaemonSet can fill it from the ConfigMap).
    #[arg(long, env = "DATAPLANE_UPLINKS", value_delimiter = ',', value_name = "IFNAME", conflicts_with = "no_maps")]
    pub uplink: Vec<String>,
    /// cgroup v2 directory the socket programs attach to (default when attaching: the cgroup2 mount point).
    #[arg(long, env = "DATAPLANE_CGROUP_ROOT", value_name = "DIR", conflicts_with = "no_maps")]
    pub cgroup_root: Option<PathBuf>,
    /// This node's IPv4 address(es) NodePorts answer on in the data path (default: the uplinks' addresses).
    #[arg(long, value_name = "IP")]
    pub node_ip: Vec<std::net::Ipv4Addr>,
    #[command(flatten)]
    pub conntrack: ConntrackArgs,
}

/// Conntrack lifetimes (load-time settings of the data path) and its garbage collector. Values
/// are seconds, or a number with a unit: `90`, `90s`, `5m`, `6h`, `1d`.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Conntrack (per-packet NAT paths: NodePort, LoadBalancer, externalIP, TC fallback)")]
pub struct ConntrackArgs {
    /// Lifetime of a TCP flow that has not got past its SYNs (cilium's bpf-ct-timeout-regular-tcp-syn).
    #[arg(long, default_value = "60s", value_parser = parse_seconds, value_name = "DURATION")]
    pub ct_timeout_tcp_syn: u32,
    /// Idle lifetime of an established TCP flow, also after one side's FIN (half-close).
    #[arg(long, default_value = "6h", value_parser = parse_seconds, value_name = "DURATION")]
    pub ct_timeout_tcp_established: u32,
    /// Lifetime of a TCP flow after a RST, or a FIN from both sides (cilium's bpf-ct-timeout-regular-tcp-fin).
    #[arg(long, default_value = "10s", value_parser = parse_seconds, value_name = "DURATION")]
    pub ct_timeout_tcp_close: u32,
    /// Idle lifetime of a UDP flow (and of any other non-TCP protocol the path comes to track).
    #[arg(long, default_value = "60s", value_parser = parse_seconds, value_name = "DURATION")]
    pub ct_timeout_udp: u32,
    /// How often expired conntrack and session-affinity entries are deleted from the maps; 0: never
    /// (the LRU tables then only evict when full). Expired entries count as absent either way.
    #[arg(long, default_value = "30s", value_parser = parse_gc_interval, value_name = "DURATION")]
    pub ct_gc_interval: u32,
}

impl ConntrackArgs {
    pub fn lifetimes(&self) -> dataplane_common::ct::CtLifetimes {
        dataplane_common::ct::CtLifetimes {
            tcp_syn_s: self.ct_timeout_tcp_syn,
            tcp_established_s: self.ct_timeout_tcp_established,
            tcp_close_s: self.ct_timeout_tcp_close,
            other_s: self.ct_timeout_udp,
        }
    }
}

/// `90`, `90s`, `5m`, `6h`, `1d` -> seconds, within 1 s ..= a year (what the data path accepts).
pub fn parse_seconds(v: &str) -> Result<u32, String> {
    let s = parse_duration(v)?;
    if s == 0 || s > dataplane_common::ct::CT_LIFETIME_MAX_S {
        return Err(format!("{s} s is not in 1..={} s", dataplane_common::ct::CT_LIFETIME_MAX_S));
    }
    Ok(s)
}

fn parse_gc_interval(v: &str) -> Result<u32, String> {
    let s = parse_duration(v)?;
    if s > 86_400 {
        return Err(format!("{s} s is more than a day"));
    }
    Ok(s)
}

fn parse_duration(v: &str) -> Result<u32, String> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, unit) = v.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("{v:?} is not a duration (e.g. 90, 90s, 5m, 6h, 1d)"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{v:?}: unknown unit {unit:?} (s, m, h or d)")),
    };
    u32::try_from(n.saturating_mul(mult)).map_err(|_| format!("{v:?} is too long"))
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(long, default_value = "/run/dataplane", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// bpffs directory holding the data plane's pins.
    #[arg(long, default_value = "/sys/fs/bpf/dataplane", value_name = "DIR")]
    pub pin_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[arg(long, default_value = "/sys/fs/bpf/dataplane", value_name = "DIR")]
    pub pin_dir: PathBuf,
    /// cgroup v2 directory the socket programs attach to (default: the cgroup2 mount).
    #[arg(long, value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,
    /// Uplink interface(s) XDP/TC attach to; checked for existence.
    #[arg(long, value_name = "IFNAME")]
    pub uplink: Vec<String>,
    /// Skip loading the embedded eBPF object.
    #[arg(long)]
    pub skip_load: bool,
}

#[cfg(test)]
mod conntrack_flag_tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    fn run(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let cli = Cli::try_parse_from(["dataplane-agent", "run"].iter().chain(args))?;
        match cli.command {
            Command::Run(r) => Ok(*r),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn conntrack_defaults_are_ciliums() {
        let r = run(&[]).unwrap();
        assert_eq!(r.conntrack.lifetimes(), dataplane_common::ct::CtLifetimes::default());
        assert_eq!(r.conntrack.ct_gc_interval, 30);
    }

    #[test]
    fn conntrack_flags_take_seconds_or_units() {
        let r = run(&["--ct-timeout-tcp-established", "2h", "--ct-timeout-tcp-syn", "90", "--ct-timeout-tcp-close", "5s", "--ct-timeout-udp", "2m", "--ct-gc-interval", "0"]).unwrap();
        let l = r.conntrack.lifetimes();
        assert_eq!((l.tcp_established_s, l.tcp_syn_s, l.tcp_close_s, l.other_s), (7200, 90, 5, 120));
        assert_eq!(r.conntrack.ct_gc_interval, 0, "0 turns the GC off");
        assert_eq!(parse_seconds("1d"), Ok(86_400));
        for bad in ["0", "6x", "h", "-5", "366d", "99999999999999"] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
        assert!(run(&["--ct-gc-interval", "2d"]).is_err());
        let err = run(&["--ct-timeout-udp", "0"]).unwrap_err().to_string();
        assert!(err.contains("invalid value '0' for '--ct-timeout-udp <DURATION>'"), "{err}");
    }

    #[test]
    fn run_help_groups_the_conntrack_flags() {
        let mut cmd = Cli::command();
        let help = cmd.find_subcommand_mut("run").unwrap().render_help().to_string();
        let group = help.split_once("Conntrack (").map(|(_, g)| g).unwrap_or_else(|| panic!("{help}"));
        for flag in ["--ct-timeout-tcp-syn", "--ct-timeout-tcp-established", "--ct-timeout-tcp-close", "--ct-timeout-udp", "--ct-gc-interval"] {
            assert!(group.contains(flag), "{flag} under the Conntrack heading:\n{help}");
        }
        assert!(group.contains("[default: 6h]"), "{help}");
    }
}
