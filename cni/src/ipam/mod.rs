//! IP address management: a round-robin allocator over the node's pod CIDRs, on top of a [`Store`]
//! that records who holds which address.
//!
//! The allocator is pure logic over the trait, so it is unit-tested against [`mem::MemStore`]; the
//! plugin uses [`file::FileStore`], which keeps one file per address and serialises processes
//! with an `flock` on the directory for as long as it is open. (host-local `allocator.go`)
pub mod file;
pub mod mem;

use std::{collections::HashSet, net::IpAddr, path::PathBuf};

use ipnet::IpNet;

use crate::spec::Attachment;

/// One address held by one attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub ip: IpAddr,
    pub container_id: String,
    pub ifname: String,
}

impl Allocation {
    fn belongs_to(&self, container_id: &str, ifname: &str) -> bool {
        self.container_id == container_id && self.ifname == ifname
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("IPAM store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where allocations live. Callers hold the store exclusively while they use it (the file store
/// takes a lock when opened), so a read followed by a write sees no other writer in between.
pub trait Store {
    fn allocations(&self) -> Result<Vec<Allocation>, StoreError>;
    /// Records `a`; `Ok(false)` when its address is already held (nothing is changed then).
    fn reserve(&mut self, a: &Allocation) -> Result<bool, StoreError>;
    /// Forgets the address; releasing a free address is not an error.
    fn release(&mut self, ip: IpAddr) -> Result<(), StoreError>;
    /// The address last handed out from `pool`, where round-robin resumes.
    fn last_reserved(&self, pool: &IpNet) -> Result<Option<IpAddr>, StoreError>;
    fn set_last_reserved(&mut self, pool: &IpNet, ip: IpAddr) -> Result<(), StoreError>;
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("pool {pool} is exhausted ({size} addresses, all allocated)")]
    Exhausted { pool: IpNet, size: u128 },
    #[error("container {container_id} interface {ifname} already holds {ips:?}")]
    AlreadyAttached {
        container_id: String,
        ifname: String,
        ips: Vec<IpAddr>,
    },
}

/// Addresses as integers, so one code path serves IPv4 and IPv6.
fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a).into(),
        IpAddr::V6(a) => a.into(),
    }
}

fn from_u128(like: &IpNet, n: u128) -> IpAddr {
    match like {
        // Truncation cannot happen: n lies within an IPv4 network.
        IpNet::V4(_) => IpAddr::V4((n as u32).into()),
        IpNet::V6(_) => IpAddr::V6(n.into()),
    }
}

/// The first and last address pods may get, inclusive. IPv4 keeps the network and broadcast
/// addresses out (except in /31 and /32); IPv6 keeps the subnet-router anycast address (::0) out.
/// The gateway is link-local (see `netns`), so no pool address is spent on it.
pub fn usable_range(pool: &IpNet) -> (u128, u128) {
    let (first, last) = (to_u128(pool.network()), to_u128(pool.broadcast()));
    match pool {
        IpNet::V4(n) if n.prefix_len() <= 30 => (first + 1, last - 1),
        IpNet::V6(n) if n.prefix_len() <= 126 => (first + 1, last),
        _ => (first, last),
    }
}

fn pool_size(pool: &IpNet) -> u128 {
    let (first, last) = usable_range(pool);
    (last - first).saturating_add(1)
}

/// Gives `(container_id, ifname)` one address from each pool, round-robin after the last address
/// handed out, so a just-released address is not reused at once. All or nothing: when a later pool
/// fails, the addresses already taken are released again.
pub fn allocate(
    store: &mut impl Store,
    pools: &[IpNet],
    container_id: &str,
    ifname: &str,
) -> Result<Vec<IpAddr>, IpamError> {
    let existing = store.allocations()?;
    let held: Vec<IpAddr> = existing
        .iter()
        .filter(|a| a.belongs_to(container_id, ifname))
        .map(|a| a.ip)
        .collect();
    if !held.is_empty() {
        return Err(IpamError::AlreadyAttached {
            container_id: container_id.into(),
            ifname: ifname.into(),
            ips: held,
        });
    }
    let taken: HashSet<IpAddr> = existing.iter().map(|a| a.ip).collect();
    let mut got = Vec::with_capacity(pools.len());
    for pool in pools {
        match allocate_one(store, pool, &taken, container_id, ifname) {
            Ok(ip) => got.push(ip),
            Err(e) => {
                for ip in got {
                    store.release(ip)?;
                }
                return Err(e);
            }
        }
    }
    Ok(got)
}

fn allocate_one(
    store: &mut impl Store,
    pool: &IpNet,
    taken: &HashSet<IpAddr>,
    container_id: &str,
    ifname: &str,
) -> Result<IpAddr, IpamError> {
    let (first, last) = usable_range(pool);
    let size = pool_size(pool);
    let used = taken.iter().filter(|ip| pool.contains(*ip)).count() as u128;
    if used >= size {
        return Err(IpamError::Exhausted { pool: *pool, size });
    }
    let start = match store.last_reserved(pool)?.map(to_u128) {
        Some(n) if n >= first && n < last => n + 1,
        _ => first,
    };
    // At most `used + 1` candidates are looked at: only taken addresses are skipped.
    let mut n = start;
    for _ in 0..=used {
        let ip = from_u128(pool, n);
        if !taken.contains(&ip) {
            let a = Allocation {
                ip,
                container_id: container_id.into(),
                ifname: ifname.into(),
            };
            if store.reserve(&a)? {
                store.set_last_reserved(pool, ip)?;
                return Ok(ip);
            }
        }
        n = if n >= last { first } else { n + 1 };
    }
    Err(IpamError::Exhausted { pool: *pool, size })
}

/// Releases what `(container_id, ifname)` holds; returns the addresses (empty when none: DEL of an
/// unknown container succeeds).
pub fn release(
    store: &mut impl Store,
    container_id: &str,
    ifname: &str,
) -> Result<Vec<IpAddr>, IpamError> {
    let mut freed = Vec::new();
    for a in store.allocations()? {
        if a.belongs_to(container_id, ifname) {
            store.release(a.ip)?;
            freed.push(a.ip);
        }
    }
    Ok(freed)
}

/// GC: releases every allocation whose attachment is not in `valid`; returns what it released.
pub fn gc(store: &mut impl Store, valid: &[Attachment]) -> Result<Vec<Allocation>, IpamError> {
    let mut freed = Vec::new();
    for a in store.allocations()? {
        if !valid
            .iter()
            .any(|v| a.belongs_to(&v.container_id, &v.ifname))
        {
            store.release(a.ip)?;
            freed.push(a);
        }
    }
    Ok(freed)
}

/// The first pool with no free address left, if any (for STATUS).
pub fn exhausted_pool(store: &impl Store, pools: &[IpNet]) -> Result<Option<IpNet>, IpamError> {
    let all = store.allocations()?;
    Ok(pools
        .iter()
        .find(|pool| all.iter().filter(|a| pool.contains(&a.ip)).count() as u128 >= pool_size(pool))
        .copied())
}

#[cfg(test)]
mod tests {
    use super::{mem::MemStore, *};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn usable_ranges_skip_network_broadcast_and_anycast() {
        let r = usable_range(&net("10.0.0.0/30"));
        assert_eq!((r.0 as u32, r.1 as u32), (0x0a00_0001, 0x0a00_0002));
        assert_eq!(pool_size(&net("10.0.0.0/24")), 254);
        assert_eq!(pool_size(&net("10.0.0.7/32")), 1);
        assert_eq!(pool_size(&net("fd00::/120")), 255);
        assert_eq!(pool_size(&net("::/0")), u128::MAX);
    }

    #[test]
    fn one_address_per_family_and_round_robin() {
        let pools = [net("10.0.0.0/29"), net("fd00::/125")];
        let mut s = MemStore::default();
        let a = allocate(&mut s, &pools, "c1", "eth0").unwrap();
        assert_eq!(
            a,
            vec![
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        let b = allocate(&mut s, &pools, "c2", "eth0").unwrap();
        assert_eq!(b[0], "10.0.0.2".parse::<IpAddr>().unwrap());
        release(&mut s, "c1", "eth0").unwrap();
        // The released .1 is not handed out again straight away.
        let c = allocate(&mut s, &pools, "c3", "eth0").unwrap();
        assert_eq!(c[0], "10.0.0.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn wraps_around_and_reports_exhaustion_without_change() {
        let pools = [net("10.0.0.0/30")]; // .1 and .2
        let mut s = MemStore::default();
        allocate(&mut s, &pools, "a", "eth0").unwrap();
        allocate(&mut s, &pools, "b", "eth0").unwrap();
        assert_eq!(exhausted_pool(&s, &pools).unwrap(), Some(pools[0]));
        let before = s.allocations().unwrap();
        assert!(matches!(
            allocate(&mut s, &pools, "c", "eth0"),
            Err(IpamError::Exhausted { size: 2, .. })
        ));
        assert_eq!(s.allocations().unwrap(), before);
        release(&mut s, "a", "eth0").unwrap();
        assert_eq!(
            allocate(&mut s, &pools, "c", "eth0").unwrap()[0],
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn second_add_for_same_attachment_is_refused() {
        let pools = [net("10.0.0.0/24")];
        let mut s = MemStore::default();
        allocate(&mut s, &pools, "a", "eth0").unwrap();
        assert!(matches!(
            allocate(&mut s, &pools, "a", "eth0"),
            Err(IpamError::AlreadyAttached { .. })
        ));
        // Another interface of the same container is a different attachment.
        allocate(&mut s, &pools, "a", "net1").unwrap();
        assert_eq!(s.allocations().unwrap().len(), 2);
    }

    #[test]
    fn failure_in_a_later_pool_releases_the_earlier_ones() {
        let pools = [net("10.0.0.0/24"), net("fd00::1/128")];
        let mut s = MemStore::default();
        allocate(&mut s, &pools, "a", "eth0").unwrap();
        assert!(matches!(
            allocate(&mut s, &pools, "b", "eth0"),
            Err(IpamError::Exhausted { .. })
        ));
        assert_eq!(
            s.allocations().unwrap().len(),
            2,
            "b's IPv4 address was given back"
        );
    }

    #[test]
    fn gc_keeps_only_valid_attachments() {
        let pools = [net("10.0.0.0/24")];
        let mut s = MemStore::default();
        for id in ["a", "b", "c"] {
            allocate(&mut s, &pools, id, "eth0").unwrap();
        }
        let valid = [Attachment {
            container_id: "b".into(),
            ifname: "eth0".into(),
        }];
        let freed = gc(&mut s, &valid).unwrap();
        assert_eq!(freed.len(), 2);
        let left = s.allocations().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].container_id, "b");
    }
}
