//! ADD, DEL, CHECK, STATUS and GC. (bridge `cmdAdd`/`cmdDel`, host-local)
use std::{net::IpAddr, path::Path};

use ipnet::IpNet;

use crate::{
    ipam::{self, file::FileStore},
    netns::{self, Netlink, NetnsError, gateway_for, host_prefix, mac_string},
    plugin::{Config, Env, PluginError, host_veth_name, inject, result_ips},
    spec::{CniResult, Dns, Interface, IpConfig, Route},
};

/// Undo steps of an ADD in progress, run newest first when it is dropped before [`commit`]:
/// every early return (`?`) of ADD rolls back what it did so far.
///
/// [`commit`]: Rollback::commit
#[derive(Default)]
struct Rollback<'a> {
    steps: Vec<(&'static str, Undo<'a>)>,
}

type Undo<'a> = Box<dyn FnOnce() -> Result<(), PluginError> + 'a>;

impl<'a> Rollback<'a> {
    fn push(&mut self, what: &'static str, undo: impl FnOnce() -> Result<(), PluginError> + 'a) {
        self.steps.push((what, Box::new(undo)));
    }

    fn commit(mut self) {
        self.steps.clear();
    }
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        while let Some((what, undo)) = self.steps.pop() {
            match undo() {
                Ok(()) => tracing::info!("rolled back: {what}"),
                Err(e) => tracing::error!("rollback of {what} failed: {e}"),
            }
        }
    }
}

fn release(config: &Config, env: &Env) -> Result<Vec<IpAddr>, PluginError> {
    let mut store = FileStore::open(&config.store_dir())?;
    Ok(ipam::release(&mut store, &env.container_id, &env.ifname)?)
}

pub fn add(env: &Env, config: &Config) -> Result<String, PluginError> {
    let pools = config.pools()?;
    let netns_path = env
        .netns
        .as_deref()
        .expect("Env::read requires CNI_NETNS for ADD");
    // Opened before anything changes: a missing namespace fails with nothing to undo.
    let ns = netns::open_netns(netns_path)?;
    let host_name = host_veth_name(&config.conf.name, &env.container_id, &env.ifname);
    let nl = Netlink::current()?;
    let mut rollback = Rollback::default();

    // The lock is held only while allocating, not across the netlink work, so parallel ADDs of
    // one node overlap everywhere except here.
    let ips = {
        let mut store = FileStore::open(&config.store_dir())?;
        ipam::allocate(&mut store, &pools, &env.container_id, &env.ifname)?
    };
    rollback.push("IPAM allocation", || release(config, env).map(drop));
    tracing::info!(?ips, "allocated");
    inject("ipam")?;

    nl.create_veth(&host_name, &env.ifname, &ns, config.conf.mtu)?;
    rollback.push("veth pair", || {
        nl.delete_link(&host_name)
            .map(drop)
            .map_err(PluginError::from)
    });
    inject("veth")?;

    let host = nl
        .link(&host_name)?
        .ok_or_else(|| NetnsError::LinkMissing {
            name: host_name.clone(),
        })?;
    let pod = netns::in_netns(&ns, netns_path, || {
        Netlink::current()?.configure_pod(&env.ifname, &ips, &host.mac)
    })?;
    inject("pod")?;
    nl.configure_host(&host_name, &ips)?;
    netns::enable_forwarding(&ips)?;
    rollback.commit();

    let ours = CniResult {
        cni_version: String::new(),
        interfaces: vec![
            Interface {
                name: host_name,
                mac: mac_string(&host.mac),
                mtu: Some(host.mtu),
                sandbox: None,
            },
            Interface {
                name: env.ifname.clone(),
                mac: mac_string(&pod.mac),
                mtu: Some(pod.mtu),
                sandbox: Some(netns_path.display().to_string()),
            },
        ],
        ips: ips
            .iter()
            .map(|&ip| IpConfig {
                version: None,
                address: IpNet::new(ip, host_prefix(ip)).expect("host prefix is valid"),
                gateway: Some(gateway_for(ip)),
                interface: Some(1),
            })
            .collect(),
        routes: netns::gateways(&ips)
            .into_iter()
            .map(|gw| Route {
                dst: IpNet::new(unspecified_like(gw), 0).expect("prefix 0 is valid"),
                gw: Some(gw),
            })
            .collect(),
        dns: Dns::default(),
    };
    // Chained after another plugin: keep what it reported and add ours after it.
    let result = match &config.conf.prev_result {
        Some(prev) => serde_json::from_value::<CniResult>(prev.clone())
            .map_err(|e| PluginError::InvalidConfig(format!("prevResult: {e}")))?
            .append(ours),
        None => ours,
    };
    Ok(serde_json::to_string(&result.for_version(config.version)).expect("serialisable"))
}

fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// Idempotent: a missing namespace, link or allocation is not an error. Deleting the host end
/// removes the Pod end, its addresses and routes, and the node's host routes with it.
pub fn del(env: &Env, config: &Config) -> Result<(), PluginError> {
    let host_name = host_veth_name(&config.conf.name, &env.container_id, &env.ifname);
    let deleted = Netlink::current()?.delete_link(&host_name)?;
    let freed = release(config, env)?;
    tracing::info!(link_deleted = deleted, ?freed, "deleted");
    Ok(())
}

/// Verifies that the attachment is as ADD left it, against the `prevResult` the runtime passes.
pub fn check(env: &Env, config: &Config) -> Result<(), PluginError> {
    let prev = config
        .conf
        .prev_result
        .as_ref()
        .ok_or_else(|| PluginError::InvalidConfig("CHECK needs prevResult".into()))?;
    let prev: CniResult = serde_json::from_value(prev.clone())
        .map_err(|e| PluginError::InvalidConfig(format!("prevResult: {e}")))?;
    let mut want = result_ips(&prev, &env.ifname);
    want.sort();
    if want.is_empty() {
        return Err(PluginError::Check(format!(
            "prevResult has no address for {}",
            env.ifname
        )));
    }
    let held = {
        let store = FileStore::open(&config.store_dir())?;
        let mut held: Vec<IpAddr> = ipam::Store::allocations(&store)?
            .into_iter()
            .filter(|a| a.container_id == env.container_id && a.ifname == env.ifname)
            .map(|a| a.ip)
            .collect();
        held.sort();
        held
    };
    if held != want {
        return Err(PluginError::Check(format!(
            "IPAM holds {held:?} for this attachment, prevResult says {want:?}"
        )));
    }
    let host_name = host_veth_name(&config.conf.name, &env.container_id, &env.ifname);
    let nl = Netlink::current()?;
    let host = nl
        .link(&host_name)?
        .ok_or_else(|| PluginError::Check(format!("host veth {host_name} is missing")))?;
    for &ip in &want {
        let routed = nl.routes(ip)?.iter().any(|r| {
            r.dst == Some(ip) && r.prefix_len == host_prefix(ip) && r.oif == Some(host.index)
        });
        if !routed {
            return Err(PluginError::Check(format!(
                "no host route to {ip} via {host_name}"
            )));
        }
    }
    let netns_path = env
        .netns
        .as_deref()
        .expect("Env::read requires CNI_NETNS for CHECK");
    let ns = netns::open_netns(netns_path)?;
    let mtu = config.conf.mtu;
    netns::in_netns(&ns, netns_path, || {
        let nl = Netlink::current()?;
        let link = nl
            .link(&env.ifname)?
            .ok_or_else(|| NetnsError::Check(format!("{} is missing", env.ifname)))?;
        if let Some(mtu) = mtu
            && link.mtu != mtu
        {
            return Err(NetnsError::Check(format!(
                "{} has MTU {}, config says {mtu}",
                env.ifname, link.mtu
            )));
        }
        let have = nl.addresses(link.index)?;
        for &ip in &want {
            if !have.contains(&ip) {
                return Err(NetnsError::Check(format!(
                    "{} lacks address {ip}",
                    env.ifname
                )));
            }
            let gw = gateway_for(ip);
            let default = nl
                .routes(ip)?
                .iter()
                .any(|r| r.prefix_len == 0 && r.gateway == Some(gw) && r.oif == Some(link.index));
            if !default {
                return Err(NetnsError::Check(format!(
                    "no default route via {gw} on {}",
                    env.ifname
                )));
            }
        }
        Ok(())
    })?;
    Ok(())
}

/// Ready to serve ADD: the agent says it is ready, the pools are known, and none is exhausted.
pub fn status(config: &Config) -> Result<(), PluginError> {
    let ready = &config.conf.readiness_file;
    if !Path::new(ready).exists() {
        return Err(PluginError::NotAvailable(format!(
            "the agent is not ready ({ready} does not exist)"
        )));
    }
    let pools = config
        .pools()
        .map_err(|e| PluginError::NotAvailable(e.to_string()))?;
    let store = FileStore::open(&config.store_dir())?;
    if let Some(pool) = ipam::exhausted_pool(&store, &pools)? {
        return Err(PluginError::NotAvailable(format!(
            "pool {pool} is exhausted"
        )));
    }
    Ok(())
}

/// Releases every allocation (and its host veth, if any is left) not listed in
/// `cni.dev/valid-attachments`.
pub fn gc(config: &Config) -> Result<(), PluginError> {
    let valid =
        config.conf.valid_attachments.as_deref().ok_or_else(|| {
            PluginError::InvalidConfig("GC needs cni.dev/valid-attachments".into())
        })?;
    let freed = {
        let mut store = FileStore::open(&config.store_dir())?;
        ipam::gc(&mut store, valid)?
    };
    if !freed.is_empty() {
        let nl = Netlink::current()?;
        for a in &freed {
            nl.delete_link(&host_veth_name(
                &config.conf.name,
                &a.container_id,
                &a.ifname,
            ))?;
        }
    }
    tracing::info!(released = freed.len(), "gc");
    Ok(())
}
