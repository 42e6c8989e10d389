//! Conntrack: a dump for `status`/debugging and tests, and removal of one flow.
use std::net::SocketAddrV4;

use aya::maps::{HashMap, MapData};
use dataplane_common::{
    ct::{CT_FLAG_EXTERNAL, CT_FLAG_SNAT, CT_REPLY, CT4_MAP, CtEntry, CtKey},
    lb::Ip4,
};

use super::{MapsError, Source, clear, ip4_from_map, op, open};

/// One conntrack entry, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtFlow {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
    pub reply: bool,
    /// Forward: the backend. Reply: the frontend (address 0 when rev-NAT has it).
    pub nat: SocketAddrV4,
    /// Forward: the SNAT source. Reply: the client to restore. Meaningful with `snat`.
    pub orig: SocketAddrV4,
    pub backend_id: u32,
    pub rev_nat_id: u32,
    pub snat: bool,
    pub external: bool,
}

fn sa(addr: u32, port_be: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip4_from_map(addr), u16::from_be(port_be))
}

impl CtFlow {
    pub fn decode(k: &CtKey<Ip4>, e: &CtEntry<Ip4>) -> CtFlow {
        CtFlow {
            src: sa(k.saddr, k.sport_be),
            dst: sa(k.daddr, k.dport_be),
            proto: k.proto,
            reply: e.dir == CT_REPLY,
            nat: sa(e.nat_addr, e.nat_port_be),
            orig: sa(e.orig_addr, e.orig_port_be),
            backend_id: e.backend_id,
            rev_nat_id: e.rev_nat_id,
            snat: e.flags & CT_FLAG_SNAT != 0,
            external: e.flags & CT_FLAG_EXTERNAL != 0,
        }
    }
}

pub struct CtMap {
    map: HashMap<MapData, CtKey<Ip4>, CtEntry<Ip4>>,
}

impl CtMap {
    pub fn open(mut src: Source<'_>) -> Result<CtMap, MapsError> {
        let map = open(&mut src, CT4_MAP)?;
        let map = HashMap::try_from(map).map_err(|source| MapsError::Kind { name: CT4_MAP, source })?;
        Ok(CtMap { map })
    }

    /// Every entry, sorted (forward before reply, then by tuple).
    pub fn dump(&self) -> Result<Vec<CtFlow>, MapsError> {
        let mut out = Vec::new();
        for kv in self.map.iter() {
            let (k, e) = kv.map_err(op("iterate", CT4_MAP))?;
            out.push(CtFlow::decode(&k, &e));
        }
        out.sort_by_key(|f| (f.reply, f.src, f.dst, f.proto));
        Ok(out)
    }

    pub fn insert(&mut self, k: CtKey<Ip4>, e: CtEntry<Ip4>) -> Result<(), MapsError> {
        self.map.insert(k, e, 0).map_err(op("insert", CT4_MAP))
    }

    /// Forgets every flow (established connections are re-balanced on their next packet).
    pub fn clear(&mut self) -> Result<usize, MapsError> {
        clear(&mut self.map, CT4_MAP)
    }

    pub fn raw(&self) -> &HashMap<MapData, CtKey<Ip4>, CtEntry<Ip4>> {
        &self.map
    }
}
