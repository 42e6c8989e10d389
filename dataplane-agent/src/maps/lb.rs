//! The service tables: frontends, backend slots, backends, rev-NAT.
//!
//! Write order avoids transient drops (CONVENTIONS "Map types"): on add, backends before slots
//! before the frontend entry; on delete the reverse. Every input is checked before the first
//! write, so a refused call changes nothing.
use std::net::{Ipv4Addr, SocketAddrV4};

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use dataplane_common::lb::{
    BACKEND_ACTIVE, BACKEND_FLAG_LOCAL, BACKEND_TERMINATING, BACKENDS_MAX, BACKENDS4_MAP, Backend, FRONTENDS4_MAP,
    FrontendKey,
    Ip4, REV_NAT4_MAP, RevNat, SCOPE_EXT, SCOPE_INT, SERVICE_STATS_MAX, SLOTS4_MAP, Service, ServiceKind, SlotKey,
};

use super::{MapsError, Source, clear, ip4_from_map, ip4_to_map, is_not_found, op, open};

/// The pinned name of the backends map before it became an array (see [`LbMaps::open`]).
pub const BACKENDS4_V1_MAP: &str = "lb4_be_v1";

/// L4 protocol of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp = 6,
    Udp = 17,
    Sctp = 132,
}

impl Proto {
    fn from_u8(v: u8) -> Option<Proto> {
        match v {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            132 => Some(Proto::Sctp),
            _ => None,
        }
    }
}

/// Which backend set a frontend entry holds (see `dataplane_common::lb::SCOPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    External,
    Internal,
}

/// A frontend. NodePort frontends have the address 0.0.0.0 (any node address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: SocketAddrV4,
    pub proto: Proto,
    pub scope: Scope,
}

impl Frontend {
    pub fn key(&self) -> FrontendKey<Ip4> {
        FrontendKey {
            addr: ip4_to_map(*self.addr.ip()),
            port_be: self.addr.port().to_be(),
            proto: self.proto as u8,
            scope: match self.scope {
                Scope::External => SCOPE_EXT,
                Scope::Internal => SCOPE_INT,
            },
        }
    }

    fn from_key(k: &FrontendKey<Ip4>) -> Option<Frontend> {
        Some(Frontend {
            addr: SocketAddrV4::new(ip4_from_map(k.addr), u16::from_be(k.port_be)),
            proto: Proto::from_u8(k.proto)?,
            scope: if k.scope == SCOPE_INT { Scope::Internal } else { Scope::External },
        })
    }
}

/// What a frontend maps to, in user-space terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Names the slots; unique per frontend entry.
    pub svc_id: u32,
    pub kind: ServiceKind,
    /// `dataplane_common::lb::SVC_FLAG_*` bits.
    pub flags: u8,
    pub affinity_timeout_s: u32,
    pub rev_nat_id: u32,
    /// Ready backends (ids), then serving-but-terminating ones.
    pub active: Vec<u32>,
    pub terminating: Vec<u32>,
}

/// A backend, in user-space terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: SocketAddrV4,
    pub local: bool,
    pub terminating: bool,
}

impl BackendSpec {
    fn to_map(self) -> Backend<Ip4> {
        Backend {
            addr: ip4_to_map(*self.addr.ip()),
            port_be: self.addr.port().to_be(),
            flags: if self.local { BACKEND_FLAG_LOCAL } else { 0 },
            state: if self.terminating { BACKEND_TERMINATING } else { BACKEND_ACTIVE },
        }
    }

    fn from_map(b: &Backend<Ip4>) -> BackendSpec {
        BackendSpec {
            addr: SocketAddrV4::new(ip4_from_map(b.addr), u16::from_be(b.port_be)),
            local: b.flags & BACKEND_FLAG_LOCAL != 0,
            terminating: b.state == BACKEND_TERMINATING,
        }
    }
}

/// The IPv4 service tables.
pub struct LbMaps {
    frontends: HashMap<aya::maps::MapData, FrontendKey<Ip4>, Service>,
    slots: HashMap<aya::maps::MapData, SlotKey, u32>,
    /// Indexed by backend id; an all-zero entry is a free id (see `Backend::is_present`).
    backends: Array<aya::maps::MapData, Backend<Ip4>>,
    rev_nat: HashMap<aya::maps::MapData, u32, RevNat<Ip4>>,
}

fn typed<K: aya::Pod, V: aya::Pod>(
    map: Map,
    name: &'static str,
) -> Result<HashMap<aya::maps::MapData, K, V>, MapsError> {
    HashMap::try_from(map).map_err(|source| MapsError::Kind { name, source })
}

impl LbMaps {
    /// Opens the tables. From a pin directory that still holds the hash-map backends of an
    /// older agent (`lb4_be_v1`), their entries are first copied into the array, at the same
    /// ids (the pinned slots and conntrack entries refer to them), and the old pin is removed.
    pub fn open(mut src: Source<'_>) -> Result<LbMaps, MapsError> {
        let pin_dir = match &src {
            Source::Pinned(dir) => Some(dir.to_path_buf()),
            Source::Ebpf(_) => None,
        };
        let mut maps = LbMaps {
            frontends: typed(open(&mut src, FRONTENDS4_MAP)?, FRONTENDS4_MAP)?,
            slots: typed(open(&mut src, SLOTS4_MAP)?, SLOTS4_MAP)?,
            backends: Array::try_from(open(&mut src, BACKENDS4_MAP)?)
                .map_err(|source| MapsError::Kind { name: BACKENDS4_MAP, source })?,
            rev_nat: typed(open(&mut src, REV_NAT4_MAP)?, REV_NAT4_MAP)?,
        };
        if let Some(dir) = pin_dir {
            maps.migrate_backends_v1(&dir)?;
        }
        Ok(maps)
    }

    /// Copies `lb4_be_v1` (hash, id -> backend) into the array where the id is still free, then
    /// unpins it. Ids past the array cannot have been written by an agent of either layout.
    fn migrate_backends_v1(&mut self, dir: &std::path::Path) -> Result<(), MapsError> {
        let path = dir.join(BACKENDS4_V1_MAP);
        if !path.exists() {
            return Ok(());
        }
        let old = MapData::from_pin(&path).map_err(|source| MapsError::Pin { path: path.clone(), source })?;
        let old: HashMap<MapData, u32, Backend<Ip4>> = Map::from_map_data(old)
            .and_then(HashMap::try_from)
            .map_err(|source| MapsError::Kind { name: BACKENDS4_V1_MAP, source })?;
        for kv in old.iter() {
            let (id, b) = kv.map_err(op("iterate", BACKENDS4_V1_MAP))?;
            if b.is_present() && self.backend(id)?.is_none() && check_backend_id(id).is_ok() {
                self.backends.set(id, b, 0).map_err(op("insert", BACKENDS4_MAP))?;
            }
        }
        std::fs::remove_file(&path).map_err(|e| MapsError::Invalid {
            what: "old backends pin",
            why: format!("copied, but {} could not be removed: {e}", path.display()),
        })
    }

    pub fn upsert_backend(&mut self, id: u32, b: BackendSpec) -> Result<(), MapsError> {
        check_backend_id(id)?;
        // Also what keeps a backend from looking like a free (all-zero) array entry.
        if b.addr.ip().is_unspecified() || b.addr.port() == 0 {
            return Err(MapsError::Invalid { what: "backend address", why: format!("{} has no address or port", b.addr) });
        }
        self.backends.set(id, b.to_map(), 0).map_err(op("insert", BACKENDS4_MAP))
    }

    /// Removes a backend (writes the free, all-zero entry). The caller removes it from every
    /// service first (`upsert_service`). A free id is refused, as a hash map's delete would.
    pub fn remove_backend(&mut self, id: u32) -> Result<(), MapsError> {
        if self.backend(id)?.is_none() {
            return Err(op("remove", BACKENDS4_MAP)(MapError::KeyNotFound));
        }
        self.backends.set(id, Backend::default(), 0).map_err(op("remove", BACKENDS4_MAP))
    }

    pub fn backend(&self, id: u32) -> Result<Option<BackendSpec>, MapsError> {
        if id == 0 || id > BACKENDS_MAX {
            return Ok(None);
        }
        let b = self.backends.get(&id, 0).map_err(op("lookup", BACKENDS4_MAP))?;
        Ok(b.is_present().then(|| BackendSpec::from_map(&b)))
    }

    pub fn set_rev_nat(&mut self, id: u32, frontend: SocketAddrV4) -> Result<(), MapsError> {
        check_rev_nat_id(id)?;
        let v = RevNat { addr: ip4_to_map(*frontend.ip()), port_be: frontend.port().to_be(), _pad: [0; 2] };
        self.rev_nat.insert(id, v, 0).map_err(op("insert", REV_NAT4_MAP))
    }

    pub fn remove_rev_nat(&mut self, id: u32) -> Result<(), MapsError> {
        self.rev_nat.remove(&id).map_err(op("remove", REV_NAT4_MAP))
    }

    pub fn rev_nat(&self, id: u32) -> Result<Option<SocketAddrV4>, MapsError> {
        match self.rev_nat.get(&id, 0) {
            Ok(v) => Ok(Some(SocketAddrV4::new(ip4_from_map(v.addr), u16::from_be(v.port_be)))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(op("lookup", REV_NAT4_MAP)(e)),
        }
    }

    /// Writes the slots, then the frontend entry, then drops slots the new entry no longer
    /// counts. Every backend id must exist already.
    pub fn upsert_service(&mut self, fe: &Frontend, spec: &ServiceSpec) -> Result<(), MapsError> {
        check_rev_nat_id(spec.rev_nat_id)?;
        if spec.svc_id == 0 {
            return Err(MapsError::Invalid { what: "service id", why: "0 is reserved".into() });
        }
        let (active, terminating) = (count(&spec.active)?, count(&spec.terminating)?);
        for id in spec.active.iter().chain(&spec.terminating) {
            if self.backend(*id)?.is_none() {
                return Err(MapsError::Invalid { what: "service backends", why: format!("backend {id} does not exist") });
            }
        }
        let old = self.service_entry(fe)?;
        for (slot, id) in spec.active.iter().chain(&spec.terminating).enumerate() {
            let key = SlotKey { svc_id: spec.svc_id, slot: slot as u32 };
            self.slots.insert(key, *id, 0).map_err(op("insert", SLOTS4_MAP))?;
        }
        let entry = Service {
            svc_id: spec.svc_id,
            active,
            terminating,
            affinity_timeout_s: spec.affinity_timeout_s,
            rev_nat_id: spec.rev_nat_id,
            kind: spec.kind as u8,
            flags: spec.flags,
            _pad: [0; 2],
        };
        self.frontends.insert(fe.key(), entry, 0).map_err(op("insert", FRONTENDS4_MAP))?;
        let new_len = u32::from(active) + u32::from(terminating);
        if let Some(old) = old {
            let old_len = u32::from(old.active) + u32::from(old.terminating);
            let from = if old.svc_id == spec.svc_id { new_len } else { 0 };
            self.remove_slots(old.svc_id, from, old_len)?;
        }
        Ok(())
    }

    /// Removes the frontend entry, then its slots. Absent is not an error.
    pub fn remove_service(&mut self, fe: &Frontend) -> Result<(), MapsError> {
        let Some(old) = self.service_entry(fe)? else { return Ok(()) };
        self.frontends.remove(&fe.key()).map_err(op("remove", FRONTENDS4_MAP))?;
        self.remove_slots(old.svc_id, 0, u32::from(old.active) + u32::from(old.terminating))
    }

    fn remove_slots(&mut self, svc_id: u32, from: u32, to: u32) -> Result<(), MapsError> {
        for slot in from..to {
            match self.slots.remove(&SlotKey { svc_id, slot }) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(op("remove", SLOTS4_MAP)(e)),
            }
        }
        Ok(())
    }

    /// The raw entry of a frontend.
    pub fn service_entry(&self, fe: &Frontend) -> Result<Option<Service>, MapsError> {
        match self.frontends.get(&fe.key(), 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(op("lookup", FRONTENDS4_MAP)(e)),
        }
    }

    /// A frontend's entry with its backend ids read back from the slots.
    pub fn service(&self, fe: &Frontend) -> Result<Option<ServiceSpec>, MapsError> {
        let Some(s) = self.service_entry(fe)? else { return Ok(None) };
        let mut ids = Vec::new();
        for slot in 0..u32::from(s.active) + u32::from(s.terminating) {
            let id = self.slots.get(&SlotKey { svc_id: s.svc_id, slot }, 0).map_err(op("lookup", SLOTS4_MAP))?;
            ids.push(id);
        }
        let terminating = ids.split_off(usize::from(s.active));
        Ok(Some(ServiceSpec {
            svc_id: s.svc_id,
            kind: ServiceKind::from_u8(s.kind).ok_or_else(|| MapsError::Invalid {
                what: "service kind in the map",
                why: format!("{}", s.kind),
            })?,
            flags: s.flags,
            affinity_timeout_s: s.affinity_timeout_s,
            rev_nat_id: s.rev_nat_id,
            active: ids,
            terminating,
        }))
    }

    /// Every frontend in the map (entries with an unknown protocol are skipped).
    pub fn frontends(&self) -> Result<Vec<Frontend>, MapsError> {
        let mut out = Vec::new();
        for k in self.frontends.keys() {
            let k = k.map_err(op("iterate", FRONTENDS4_MAP))?;
            out.extend(Frontend::from_key(&k));
        }
        out.sort();
        Ok(out)
    }

    /// Empties all four tables, frontends first (the reverse of the add order).
    pub fn clear(&mut self) -> Result<(), MapsError> {
        clear(&mut self.frontends, FRONTENDS4_MAP)?;
        clear(&mut self.slots, SLOTS4_MAP)?;
        for id in self.backend_ids()? {
            self.backends.set(id, Backend::default(), 0).map_err(op("remove", BACKENDS4_MAP))?;
        }
        clear(&mut self.rev_nat, REV_NAT4_MAP)?;
        Ok(())
    }

    /// Every backend id in use, sorted. Reads the whole array (a few batch syscalls): meant for
    /// start-up and tools, not for a sync loop.
    pub fn backend_ids(&self) -> Result<Vec<u32>, MapsError> {
        let all = super::batch::array_entries(&self.backends).map_err(op("lookup", BACKENDS4_MAP))?;
        Ok(all.into_iter().filter(|(id, b)| *id != 0 && b.is_present()).map(|(id, _)| id).collect())
    }
}

fn count(ids: &[u32]) -> Result<u16, MapsError> {
    u16::try_from(ids.len())
        .map_err(|_| MapsError::Invalid { what: "service backends", why: format!("{} is more than 65535", ids.len()) })
}

fn check_backend_id(id: u32) -> Result<(), MapsError> {
    if id == 0 || id > BACKENDS_MAX {
        return Err(MapsError::Invalid { what: "backend id", why: format!("{id} is not in 1..={BACKENDS_MAX}") });
    }
    Ok(())
}

fn check_rev_nat_id(id: u32) -> Result<(), MapsError> {
    if id == 0 || id >= SERVICE_STATS_MAX {
        return Err(MapsError::Invalid { what: "rev-NAT id", why: format!("{id} is not in 1..{SERVICE_STATS_MAX}") });
    }
    Ok(())
}

/// A convenience for callers that build frontends from parts.
pub fn frontend(ip: Ipv4Addr, port: u16, proto: Proto, scope: Scope) -> Frontend {
    Frontend { addr: SocketAddrV4::new(ip, port), proto, scope }
}
