//! An in-memory [`Store`] for unit tests of the allocator.
use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;

use super::{Allocation, Store, StoreError};

#[derive(Debug, Default)]
pub struct MemStore {
    held: BTreeMap<IpAddr, Allocation>,
    last: BTreeMap<IpNet, IpAddr>,
}

impl Store for MemStore {
    fn allocations(&self) -> Result<Vec<Allocation>, StoreError> {
        Ok(self.held.values().cloned().collect())
    }

    fn reserve(&mut self, a: &Allocation) -> Result<bool, StoreError> {
        if self.held.contains_key(&a.ip) {
            return Ok(false);
        }
        self.held.insert(a.ip, a.clone());
        Ok(true)
    }

    fn release(&mut self, ip: IpAddr) -> Result<(), StoreError> {
        self.held.remove(&ip);
        Ok(())
    }

    fn last_reserved(&self, pool: &IpNet) -> Result<Option<IpAddr>, StoreError> {
        Ok(self.last.get(pool).copied())
    }

    fn set_last_reserved(&mut self, pool: &IpNet, ip: IpAddr) -> Result<(), StoreError> {
        self.last.insert(*pool, ip);
        Ok(())
    }
}
