//! The kernel side of an attachment, through rtnetlink: a veth pair whose host end stays in the
//! node's namespace and whose other end is created directly inside the Pod's, the Pod's addresses,
//! its gateway neighbour and default route, and the node's host routes to the Pod.
//!
//! Addressing (routed, no bridge; like Calico): the Pod gets its address as a /32 (/128) and a
//! default route via a link-local gateway, 169.254.1.1 for IPv4 and fe80::1 for IPv6, which is
//! pinned to the host end's MAC by a permanent neighbour entry, so the Pod never has to resolve it
//! and the node needs no proxy ARP and spends no pool address on a gateway. The node reaches the Pod
//! through a /32 (/128) route on the host end. Every packet leaving the Pod is therefore routed by
//! the node, which is where the data plane's TC programs see it.
//!
//! Namespace work happens on a dedicated OS thread that enters the Pod's namespace (`setns`
//! changes only the calling thread), with its own netlink socket opened there.
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use futures::TryStreamExt;
use nix::sched::{CloneFlags, setns};
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder,
    packet_route::{
        address::{AddressAttribute, AddressFlags},
        link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage},
        route::{RouteAddress, RouteAttribute, RouteScope},
    },
};

/// The Pod's IPv4 gateway: link-local, answered by nobody, pinned by a static neighbour entry.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The Pod's IPv6 gateway, likewise.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The gateway of the family of `ip`.
pub fn gateway_for(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => GATEWAY_V4.into(),
        IpAddr::V6(_) => GATEWAY_V6.into(),
    }
}

/// The all-addresses prefix length of `ip`'s family (32 or 128).
pub fn host_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("netlink runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("netlink: {what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("bad route for {ip}: {reason}")]
    Route { ip: IpAddr, reason: String },
    #[error("sysctl {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {name} does not exist")]
    LinkMissing { name: String },
    #[error("{0}")]
    Check(String),
}

/// The errno of a netlink NACK, if that is what `e` is.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn nl_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetnsError {
    let what = what.into();
    move |source| NetnsError::Netlink { what, source }
}

/// A netlink connection bound to the namespace of the thread that made it, with the small runtime
/// that drives it. Blocking calls: the plugin is a short-lived, sequential process.
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Netlink")
    }
}

/// One interface as the plugin reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub mac: Vec<u8>,
    pub mtu: u32,
}

pub fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Netlink {
    /// A connection in the calling thread's current network namespace.
    pub fn current() -> Result<Netlink, NetnsError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(NetnsError::Runtime)?;
        let handle = {
            // The socket registers with the runtime's reactor, so it is made inside it.
            let _inside = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection().map_err(NetnsError::Runtime)?;
            rt.spawn(conn);
            handle
        };
        Ok(Netlink { rt, handle })
    }

    /// The interface called `name`, or `None` when there is none.
    pub fn link(&self, name: &str) -> Result<Option<LinkInfo>, NetnsError> {
        let mut req = std::pin::pin!(
            self.handle
                .link()
                .get()
                .match_name(name.to_owned())
                .execute()
        );
        match self.rt.block_on(req.try_next()) {
            Ok(Some(msg)) => Ok(Some(link_info(&msg))),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl_err(format!("get link {name}"))(e)),
        }
    }

    fn require_link(&self, name: &str) -> Result<LinkInfo, NetnsError> {
        self.link(name)?
            .ok_or_else(|| NetnsError::LinkMissing { name: name.into() })
    }

    /// Creates the veth pair: `host` here, `peer` directly inside the namespace `peer_ns`, both
    /// with `mtu` (kernel default when `None`). Neither end is up yet.
    pub fn create_veth(
        &self,
        host: &str,
        peer: &str,
        peer_ns: &File,
        mtu: Option<u32>,
    ) -> Result<(), NetnsError> {
        let mut peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer)
            .setns_by_fd(peer_ns.as_raw_fd());
        let mut msg =
            LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth).name(host);
        if let Some(mtu) = mtu {
            peer_msg = peer_msg.mtu(mtu);
            msg = msg.mtu(mtu);
        }
        let msg = msg
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build())))
            .build();
        self.rt
            .block_on(self.handle.link().add(msg).execute())
            .map_err(nl_err(format!("create veth {host} (peer {peer})")))
    }

    /// Deletes `name` (and so its veth peer); `false` when it did not exist.
    pub fn delete_link(&self, name: &str) -> Result<bool, NetnsError> {
        let Some(link) = self.link(name)? else {
            return Ok(false);
        };
        match self
            .rt
            .block_on(self.handle.link().del(link.index).execute())
        {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(nl_err(format!("delete link {name}"))(e)),
        }
    }

    fn set_up(&self, index: u32, name: &str) -> Result<(), NetnsError> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(nl_err(format!("set {name} up")))
    }

    /// Pod side: addresses (without duplicate address detection, so they are usable at once), the
    /// link up, a permanent neighbour for each gateway, and default routes through it.
    pub fn configure_pod(
        &self,
        ifname: &str,
        ips: &[IpAddr],
        host_mac: &[u8],
    ) -> Result<LinkInfo, NetnsError> {
        let link = self.require_link(ifname)?;
        for &ip in ips {
            let mut req = self.handle.address().add(link.index, ip, host_prefix(ip));
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
            self.rt
                .block_on(req.execute())
                .map_err(nl_err(format!("add address {ip} to {ifname}")))?;
        }
        self.set_up(link.index, ifname)?;
        for gw in gateways(ips) {
            let req = self
                .handle
                .neighbours()
                .add(link.index, gw)
                .link_layer_address(host_mac);
            self.rt
                .block_on(req.execute())
                .map_err(nl_err(format!("add neighbour {gw} on {ifname}")))?;
            let route = RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(unspecified(gw), 0)
                .and_then(|r| r.gateway(gw))
                .map_err(|e| NetnsError::Route {
                    ip: gw,
                    reason: e.to_string(),
                })?
                .output_interface(link.index)
                .onlink()
                .build();
            match self.rt.block_on(self.handle.route().add(route).execute()) {
                Ok(()) => {}
                // A second attachment of the same Pod: the first one keeps the default route.
                Err(e) if errno(&e) == Some(libc::EEXIST) => {
                    tracing::warn!(
                        "{ifname}: the Pod already has a default route; not adding one via {gw}"
                    );
                }
                Err(e) => return Err(nl_err(format!("add default route via {gw} on {ifname}"))(e)),
            }
        }
        Ok(link)
    }

    /// Host side: the link up and a host route to each Pod address through it.
    pub fn configure_host(&self, name: &str, ips: &[IpAddr]) -> Result<LinkInfo, NetnsError> {
        let link = self.require_link(name)?;
        if ips.iter().any(IpAddr::is_ipv6) {
            // The host end's own link-local address must not wait for DAD before the node can
            // solicit the Pod's address from it.
            write_sysctl(&format!("/proc/sys/net/ipv6/conf/{name}/accept_dad"), "0")?;
        }
        self.set_up(link.index, name)?;
        for &ip in ips {
            let route = RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(ip, host_prefix(ip))
                .map_err(|e| NetnsError::Route {
                    ip,
                    reason: e.to_string(),
                })?
                .output_interface(link.index)
                .scope(RouteScope::Link)
                .build();
            self.rt
                .block_on(self.handle.route().add(route).execute())
                .map_err(nl_err(format!("add host route {ip} via {name}")))?;
        }
        Ok(link)
    }

    /// The addresses on interface `index`.
    pub fn addresses(&self, index: u32) -> Result<Vec<IpAddr>, NetnsError> {
        let req = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let msgs: Vec<_> = self
            .rt
            .block_on(req.try_collect())
            .map_err(nl_err("list addresses"))?;
        Ok(msgs
            .iter()
            .flat_map(|m| &m.attributes)
            .filter_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
            .collect())
    }

    /// The routes of the family of `family_of`.
    pub fn routes(&self, family_of: IpAddr) -> Result<Vec<RouteEntry>, NetnsError> {
        let filter = match family_of {
            IpAddr::V4(_) => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            IpAddr::V6(_) => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        };
        let msgs: Vec<_> = self
            .rt
            .block_on(self.handle.route().get(filter).execute().try_collect())
            .map_err(nl_err("list routes"))?;
        Ok(msgs
            .iter()
            .map(|m| {
                let (mut dst, mut gw, mut oif) = (None, None, None);
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(d) => dst = route_addr(d),
                        RouteAttribute::Gateway(g) => gw = route_addr(g),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                RouteEntry {
                    dst,
                    prefix_len: m.header.destination_prefix_length,
                    gateway: gw,
                    oif,
                }
            })
            .collect())
    }
}

/// One route as CHECK looks at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub dst: Option<IpAddr>,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some((*v4).into()),
        RouteAddress::Inet6(v6) => Some((*v6).into()),
        _ => None,
    }
}

fn link_info(msg: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        mac: Vec::new(),
        mtu: 0,
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::Address(mac) => info.mac = mac.clone(),
            LinkAttribute::Mtu(mtu) => info.mtu = *mtu,
            _ => {}
        }
    }
    info
}

fn unspecified(like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// One gateway per family present in `ips`.
pub fn gateways(ips: &[IpAddr]) -> Vec<IpAddr> {
    let mut gws: Vec<IpAddr> = ips.iter().map(|ip| gateway_for(*ip)).collect();
    gws.dedup();
    gws
}

/// Writes `value` unless the sysctl already holds it (a write costs more than a read, and a
/// read-only /proc/sys that already has the right value is no error).
pub fn write_sysctl(path: &str, value: &str) -> Result<(), NetnsError> {
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(path, value).map_err(|source| NetnsError::Sysctl {
        path: path.into(),
        source,
    })
}

/// Forwarding for each family in `ips`: the node routes every packet of a Pod.
pub fn enable_forwarding(ips: &[IpAddr]) -> Result<(), NetnsError> {
    if ips.iter().any(IpAddr::is_ipv4) {
        write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        write_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
    }
    Ok(())
}

/// Opens a network namespace file (CNI_NETNS) for entering or for creating a link inside it.
pub fn open_netns(path: &Path) -> Result<File, NetnsError> {
    File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_owned(),
        source,
    })
}

/// Runs `f` on a new OS thread that has entered the network namespace `ns`; the caller's thread
/// stays where it is.
pub fn in_netns<T: Send>(
    ns: &File,
    path: &Path,
    f: impl FnOnce() -> Result<T, NetnsError> + Send,
) -> Result<T, NetnsError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(ns, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                path: path.to_owned(),
                source,
            })?;
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
