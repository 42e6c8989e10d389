//! Typed user-space wrappers, one per map family: the only code that knows the byte layout of
//! keys and values. Addresses and ports are `std::net` types here, network order in the maps.
//!
//! Each wrapper opens its maps either from a loaded `Ebpf` (taking them out of it) or from the
//! pin directory (an agent that restarts re-uses what the data path is forwarding with).
pub mod affinity;
pub mod ct;
pub mod batch;
pub mod lb;
pub mod stats;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Map, MapData, MapError},
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name} is not in the object (or was already taken)")]
    Missing { name: &'static str },
    #[error("opening pinned map {path:?}")]
    Pin {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("map {name} has an unexpected type or layout")]
    Kind {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{op} on map {name} failed")]
    Op {
        op: &'static str,
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
}

/// Where a wrapper gets its maps from.
pub enum Source<'a> {
    /// Takes the maps out of a loaded object.
    Ebpf(&'a mut Ebpf),
    /// Opens the pins under this directory.
    Pinned(&'a Path),
}

pub(crate) fn open(src: &mut Source<'_>, name: &'static str) -> Result<Map, MapsError> {
    match src {
        Source::Ebpf(ebpf) => ebpf.take_map(name).ok_or(MapsError::Missing { name }),
        Source::Pinned(dir) => {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).map_err(|source| MapsError::Pin { path: path.clone(), source })?;
            Map::from_map_data(data).map_err(|source| MapsError::Pin { path, source })
        }
    }
}

/// An address in the maps' representation (network order as the kernel's `__be32`).
pub fn ip4_to_map(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn ip4_from_map(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

pub(crate) fn op(op: &'static str, name: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Op { op, name, source }
}

/// Removes every entry of a hash map (keys are collected first: deleting while iterating would
/// restart the walk). Returns how many were removed.
pub(crate) fn clear<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<usize, MapsError> {
    let keys = map.keys().collect::<Result<Vec<K>, _>>().map_err(op("iterate", name))?;
    for k in &keys {
        match map.remove(k) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(op("remove", name)(e)),
        }
    }
    Ok(keys.len())
}

/// Whether a lookup error only means "no such key".
pub(crate) fn is_not_found(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_stored_in_network_order() {
        let ip = Ipv4Addr::new(10, 96, 0, 1);
        assert_eq!(ip4_to_map(ip).to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(ip4_from_map(ip4_to_map(ip)), ip);
    }
}
