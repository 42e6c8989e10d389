//! Session affinity entries: read and seed (tests, and restoring state), clear per service, and
//! the garbage collector's sweep.
use aya::maps::{HashMap, MapData};
use dataplane_common::{
    affinity::{AFFINITY4_MAP, AffinityKey, AffinityValue},
    ct::expired,
    lb::Ip4,
};

use super::{MapsError, Source, batch, clear, is_not_found, op, open};

/// The pinned name of the affinity table before entries carried an expiry and their slot. Its
/// entries are not carried over (they lack the slot): the loader unpins it, and each client of
/// an affinity Service is balanced afresh once.
pub const AFFINITY4_V1_MAP: &str = "lb4_affin_v1";

pub struct AffinityMap {
    map: HashMap<MapData, AffinityKey<Ip4>, AffinityValue>,
}

impl AffinityMap {
    pub fn open(mut src: Source<'_>) -> Result<AffinityMap, MapsError> {
        let map = open(&mut src, AFFINITY4_MAP)?;
        let map = HashMap::try_from(map).map_err(|source| MapsError::Kind { name: AFFINITY4_MAP, source })?;
        Ok(AffinityMap { map })
    }

    pub fn get(&self, k: &AffinityKey<Ip4>) -> Result<Option<AffinityValue>, MapsError> {
        match self.map.get(k, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(op("lookup", AFFINITY4_MAP)(e)),
        }
    }

    pub fn insert(&mut self, k: AffinityKey<Ip4>, v: AffinityValue) -> Result<(), MapsError> {
        self.map.insert(k, v, 0).map_err(op("insert", AFFINITY4_MAP))
    }

    pub fn entries(&self) -> Result<Vec<(AffinityKey<Ip4>, AffinityValue)>, MapsError> {
        self.map.iter().collect::<Result<Vec<_>, _>>().map_err(op("iterate", AFFINITY4_MAP))
    }

    pub fn clear(&mut self) -> Result<usize, MapsError> {
        clear(&mut self.map, AFFINITY4_MAP)
    }

    /// Deletes every entry that has expired at `now_s` (no connection refreshed it within its
    /// Service's timeout); keeps the live ones.
    pub fn sweep(&mut self, now_s: u32) -> Result<batch::Sweep, MapsError> {
        batch::sweep_hash(&mut self.map, |_, v| expired(v.expires_s, now_s)).map_err(op("sweep", AFFINITY4_MAP))
    }

    /// Drops every entry of one service (when its affinity is turned off or it is deleted).
    pub fn clear_service(&mut self, rev_nat_id: u32) -> Result<usize, MapsError> {
        let keys: Vec<_> = self.entries()?.into_iter().filter(|(k, _)| k.rev_nat_id == rev_nat_id).map(|(k, _)| k).collect();
        for k in &keys {
            match self.map.remove(k) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(op("remove", AFFINITY4_MAP)(e)),
            }
        }
        Ok(keys.len())
    }
}
