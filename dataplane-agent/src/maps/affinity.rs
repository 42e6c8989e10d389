//! Session affinity entries: read and seed (tests, and restoring state), and clear per service.
use aya::maps::{HashMap, MapData};
use dataplane_common::{
    affinity::{AFFINITY4_MAP, AffinityKey, AffinityValue},
    lb::Ip4,
};

use super::{MapsError, Source, clear, is_not_found, op, open};

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
