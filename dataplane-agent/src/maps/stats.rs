//! The data path's counters (drops by reason, packets per hook, per-Service packets and socket-LB
//! operations) and every pinned map's fill level. Read-only: the programs write the counters; the
//! agent and `status` read them, from a loaded object or from the pins (also while the agent is down).
use std::path::Path;

use aya::Pod;
use aya::maps::{Array, HashMap, Map, MapData, MapError, MapType, PerCpuArray, PerCpuValues};
use dataplane_common::{
    affinity::{AFFINITY4_MAP, AffinityKey, AffinityValue},
    ct::{CT4_MAP, CtEntry, CtKey},
    lb::{
        BACKENDS4_MAP, Backend, FRONTENDS4_MAP, FrontendKey, Ip4, REV_NAT4_MAP, RevNat, SERVICE_STATS_MAP, SLOTS4_MAP,
        SOCK_LB4_MAP, Service, SlotKey,
    },
    metrics::{Counter, DROPS_MAP, DropReason, HOOKS_MAP, Hook, SOCK_LB_STATS_MAP, SockLbCounter},
};

use super::{MapsError, Source, op, open};

/// The four counter arrays.
pub struct StatsMaps {
    drops: PerCpuArray<MapData, Counter>,
    hooks: PerCpuArray<MapData, Counter>,
    services: PerCpuArray<MapData, Counter>,
    sock_lb: PerCpuArray<MapData, SockLbCounter>,
}

impl std::fmt::Debug for StatsMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsMaps").finish_non_exhaustive()
    }
}

fn per_cpu<V: Pod>(src: &mut Source<'_>, name: &'static str) -> Result<PerCpuArray<MapData, V>, MapsError> {
    PerCpuArray::try_from(open(src, name)?).map_err(|source| MapsError::Kind { name, source })
}

fn sum_counters(values: &PerCpuValues<Counter>) -> Counter {
    values.iter().fold(Counter::default(), |acc, c| Counter { packets: acc.packets + c.packets, bytes: acc.bytes + c.bytes })
}

fn sum_sock(values: &PerCpuValues<SockLbCounter>) -> SockLbCounter {
    values.iter().fold(SockLbCounter::default(), |acc, c| SockLbCounter {
        connect: acc.connect + c.connect,
        sendmsg: acc.sendmsg + c.sendmsg,
        refused: acc.refused + c.refused,
    })
}

fn zeros<V: Pod + Default>(cpus: usize) -> Result<PerCpuValues<V>, MapsError> {
    PerCpuValues::try_from(vec![V::default(); cpus]).map_err(|e| MapsError::Invalid { what: "per-CPU values", why: e.to_string() })
}

impl StatsMaps {
    pub fn open(mut src: Source<'_>) -> Result<StatsMaps, MapsError> {
        Ok(StatsMaps {
            drops: per_cpu(&mut src, DROPS_MAP)?,
            hooks: per_cpu(&mut src, HOOKS_MAP)?,
            services: per_cpu(&mut src, SERVICE_STATS_MAP)?,
            sock_lb: per_cpu(&mut src, SOCK_LB_STATS_MAP)?,
        })
    }

    /// Every drop reason with its count (summed over CPUs), in index order.
    pub fn drops(&self) -> Result<Vec<(DropReason, Counter)>, MapsError> {
        DropReason::ALL
            .iter()
            .map(|r| Ok((*r, sum_counters(&self.drops.get(&(*r as u32), 0).map_err(op("lookup", DROPS_MAP))?))))
            .collect()
    }

    /// Every hook with the packets (socket hooks: calls) it saw.
    pub fn hooks(&self) -> Result<Vec<(Hook, Counter)>, MapsError> {
        Hook::ALL
            .iter()
            .map(|h| Ok((*h, sum_counters(&self.hooks.get(&(*h as u32), 0).map_err(op("lookup", HOOKS_MAP))?))))
            .collect()
    }

    /// Packets and bytes the per-packet paths (XDP/TC) forwarded for the Service frontend with this
    /// rev-NAT id, both directions. An id past the array is refused (the data path cannot count it).
    pub fn service(&self, rev_nat_id: u32) -> Result<Counter, MapsError> {
        Ok(sum_counters(&self.services.get(&rev_nat_id, 0).map_err(op("lookup", SERVICE_STATS_MAP))?))
    }

    /// Zeroes the counters of a rev-NAT id about to be given to a new frontend, so that its
    /// series does not start with the counts of the frontend that held the id before.
    pub fn reset_service(&mut self, rev_nat_id: u32) -> Result<(), MapsError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| MapsError::Invalid { what: "possible CPUs", why: e.to_string() })?;
        self.services.set(rev_nat_id, zeros(cpus)?, 0).map_err(op("update", SERVICE_STATS_MAP))?;
        self.sock_lb.set(rev_nat_id, zeros(cpus)?, 0).map_err(op("update", SOCK_LB_STATS_MAP))
    }

    /// What the socket-LB hooks did for the Service frontend with this rev-NAT id.
    pub fn sock_lb(&self, rev_nat_id: u32) -> Result<SockLbCounter, MapsError> {
        Ok(sum_sock(&self.sock_lb.get(&rev_nat_id, 0).map_err(op("lookup", SOCK_LB_STATS_MAP))?))
    }
}

/// How full one pinned map is.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MapFill {
    pub name: String,
    /// The kernel's map type (`HashMap`, `LruHashMap`, `Array`, `PerCpuArray`, ...).
    pub map_type: Option<String>,
    pub max_entries: Option<u32>,
    /// Entries in use: keys of a hash map, non-empty slots of an array. `None` for the per-CPU
    /// counter arrays, whose every slot always exists (their size is fixed; see `max_entries`),
    /// and for per-socket storage (see `per_socket`).
    pub entries: Option<u64>,
    /// `entries / max_entries` in percent, where both are known.
    pub percent: Option<f64>,
    /// Why the map could not be read (no pin, wrong type).
    pub error: Option<String>,
    /// Socket-local storage ([`PER_SOCKET_MAPS`]): one value per socket, freed with the socket.
    /// It has no capacity to fill, and user space cannot enumerate it (only look a socket up).
    #[serde(default)]
    pub per_socket: bool,
}

fn percent(entries: Option<u64>, max_entries: Option<u32>) -> Option<f64> {
    match (entries, max_entries) {
        (Some(n), Some(max)) if max > 0 => Some(n as f64 * 100.0 / f64::from(max)),
        _ => None,
    }
}

/// Counts the entries of a hash map (keys) or an array (slots that are not all zero, which is
/// how the data path marks a free id).
fn count<K: Pod, V: Pod + Default + PartialEq>(map: &Map) -> Result<u64, MapError> {
    match map {
        Map::Array(_) => {
            let a: Array<&MapData, V> = Array::try_from(map)?;
            let empty = V::default();
            Ok(super::batch::array_entries(&a)?.iter().filter(|(_, v)| *v != empty).count() as u64)
        }
        _ => {
            let h: HashMap<&MapData, K, V> = HashMap::try_from(map)?;
            h.keys().try_fold(0, |n, k| k.map(|_| n + 1))
        }
    }
}

type Counting = fn(&Map) -> Result<u64, MapError>;

/// How to count the entries of the map pinned as `name`: with the key and value types its
/// contract gives it. `None` for the per-CPU counter arrays (and maps this build does not know).
fn entry_counter(name: &str) -> Option<Counting> {
    Some(match name {
        FRONTENDS4_MAP => count::<FrontendKey<Ip4>, Service>,
        SLOTS4_MAP => count::<SlotKey, u32>,
        BACKENDS4_MAP => count::<u32, Backend<Ip4>>,
        REV_NAT4_MAP => count::<u32, RevNat<Ip4>>,
        CT4_MAP => count::<CtKey<Ip4>, CtEntry<Ip4>>,
        AFFINITY4_MAP => count::<AffinityKey<Ip4>, AffinityValue>,
        _ => return None,
    })
}

/// Per-CPU arrays of counters: fixed size, every slot exists, so they have no fill level.
pub const COUNTER_ARRAYS: [&str; 4] = [DROPS_MAP, HOOKS_MAP, SERVICE_STATS_MAP, SOCK_LB_STATS_MAP];

/// Socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`): no fill level, reported as per-socket.
pub const PER_SOCKET_MAPS: [&str; 1] = [SOCK_LB4_MAP];

/// The fill level of each of `names` pinned under `pin_dir`. A map that cannot be read gets its
/// error in the row; the others are still reported.
pub fn fill_levels(pin_dir: &Path, names: &[&str]) -> Vec<MapFill> {
    names.iter().map(|name| fill_level(pin_dir, name)).collect()
}

fn fill_level(pin_dir: &Path, name: &str) -> MapFill {
    let per_socket = PER_SOCKET_MAPS.contains(&name);
    let mut row =
        MapFill { name: name.to_owned(), map_type: None, max_entries: None, entries: None, percent: None, error: None, per_socket };
    let path = pin_dir.join(name);
    let data = match MapData::from_pin(&path) {
        Ok(d) => d,
        Err(e) => {
            row.error = Some(match &e {
                MapError::SyscallError(s) if s.io_error.kind() == std::io::ErrorKind::NotFound => "not pinned".to_owned(),
                _ => crate::errors::error_chain(&e),
            });
            return row;
        }
    };
    if let Ok(info) = data.info() {
        // Socket storage has max_entries 0: it is not a capacity.
        row.max_entries = (!per_socket).then(|| info.max_entries());
        row.map_type = info.map_type().ok().map(|t: MapType| format!("{t:?}"));
    }
    let Some(counting) = entry_counter(name) else { return row };
    match Map::from_map_data(data).and_then(|map| counting(&map)) {
        Ok(n) => row.entries = Some(n),
        Err(e) => row.error = Some(crate::errors::error_chain(&e)),
    }
    row.percent = percent(row.entries, row.max_entries);
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pinned_map_has_a_fill_level_or_is_a_counter_array() {
        // A map added to PINNED_MAPS must be taught to `entry_counter`, else `status` would
        // show it without a fill level.
        for name in crate::loader::PINNED_MAPS {
            let kinds = [entry_counter(name).is_some(), COUNTER_ARRAYS.contains(&name), PER_SOCKET_MAPS.contains(&name)];
            assert_eq!(kinds.iter().filter(|k| **k).count(), 1, "{name}: {kinds:?}");
        }
        for name in COUNTER_ARRAYS.iter().chain(&PER_SOCKET_MAPS) {
            assert!(crate::loader::PINNED_MAPS.contains(name), "{name} is pinned");
        }
    }

    #[test]
    fn percent_needs_both_numbers() {
        assert_eq!(percent(Some(50), Some(200)), Some(25.0));
        assert_eq!(percent(None, Some(200)), None);
        assert_eq!(percent(Some(1), Some(0)), None);
    }

    #[test]
    fn a_missing_pin_is_reported_per_map() {
        let rows = fill_levels(Path::new("/nonexistent/dpt"), &[FRONTENDS4_MAP, DROPS_MAP]);
        assert_eq!(rows.len(), 2);
        for row in &rows {
            assert_eq!(row.error.as_deref(), Some("not pinned"), "{row:?}");
            assert_eq!((row.entries, row.max_entries), (None, None));
        }
    }
}
