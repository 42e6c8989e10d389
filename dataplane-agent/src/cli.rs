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
