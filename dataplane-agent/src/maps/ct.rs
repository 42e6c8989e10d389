//! Conntrack: a dump for `status`/debugging and tests, the garbage collector's sweep, and the
//! migration of an older agent's pinned table.
use std::net::SocketAddrV4;
use std::path::Path;

use aya::maps::{HashMap, Map, MapData};
use dataplane_common::{
    ct::{CT_FLAG_EXTERNAL, CT_FLAG_SNAT, CT_REPLY, CT4_MAP, CtEntry, CtKey, CtLifetimes, expired},
    lb::Ip4,
};

use super::{MapsError, Source, batch, clear, ip4_from_map, op, open};

/// Now in the data path's clock: kernel CLOCK_MONOTONIC, whole seconds (what `bpf_ktime_get_ns()
/// / 1e9` gives the programs, and what `expires_s` of conntrack and affinity entries counts in).
/// The agent must not run in a time namespace that offsets CLOCK_MONOTONIC (containers do not).
pub fn now_s() -> u32 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec for the kernel to fill; CLOCK_MONOTONIC always exists.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    debug_assert_eq!(rc, 0);
    t.tv_sec as u32
}

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
    /// `CT_STATE_*` bits of the flow.
    pub state: u8,
    /// When the entry expires ([`now_s`]'s clock).
    pub expires_s: u32,
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
            state: e.state,
            expires_s: e.expires_s,
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

    /// Deletes every entry that has expired at `now_s` (the data path already treats them as
    /// absent); keeps the live ones.
    pub fn sweep(&mut self, now_s: u32) -> Result<batch::Sweep, MapsError> {
        batch::sweep_hash(&mut self.map, |_, e| expired(e.expires_s, now_s)).map_err(op("sweep", CT4_MAP))
    }
}

/// `BPF_NOEXIST` (include/uapi/linux/bpf.h): insert only if the key is not there.
const BPF_NOEXIST: u64 = 1;

/// The pinned name of the conntrack table before entries had lifetimes.
pub const CT4_V2_MAP: &str = "ct4_v2";

/// A `ct4_v2` entry: [`CtEntry`] without `state` and `expires_s`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct CtEntryV2 {
    nat_addr: Ip4,
    orig_addr: Ip4,
    nat_port_be: u16,
    orig_port_be: u16,
    backend_id: u32,
    rev_nat_id: u32,
    flags: u8,
    dir: u8,
    _pad: [u8; 2],
}
const _: () = assert!(std::mem::size_of::<CtEntryV2>() == 24);
// SAFETY: #[repr(C)], Copy, and the size assert proves it has no padding.
unsafe impl aya::Pod for CtEntryV2 {}

/// Copies the flows of an older agent's pinned `ct4_v2` into the current table under `pin_dir`
/// (where the same tuple is not taken already), then unpins it. Their state is unknown: a TCP
/// flow is taken to be established, and every flow gets its full lifetime from now (the
/// handshake or teardown it may be in shortens it with its next packet). Returns how many were
/// copied; `Ok(0)` without an old table.
///
/// Meant to run after the new object is loaded and before its programs replace the old ones: a
/// flow the old programs create in between is not copied (its next packet is balanced afresh).
pub fn migrate_v2(pin_dir: &Path, lifetimes: &CtLifetimes) -> Result<usize, MapsError> {
    let path = pin_dir.join(CT4_V2_MAP);
    if !path.exists() {
        return Ok(0);
    }
    let old = MapData::from_pin(&path).map_err(|source| MapsError::Pin { path: path.clone(), source })?;
    let old: HashMap<MapData, CtKey<Ip4>, CtEntryV2> =
        Map::from_map_data(old).and_then(HashMap::try_from).map_err(|source| MapsError::Kind { name: CT4_V2_MAP, source })?;
    let mut new = CtMap::open(Source::Pinned(pin_dir))?;
    let now = now_s();
    let mut copied = 0;
    for kv in old.iter() {
        let (k, o) = match kv {
            Ok(kv) => kv,
            // Evicted while walking: the walk goes on from the next key.
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(e) => return Err(op("iterate", CT4_V2_MAP)(e)),
        };
        let state = dataplane_common::ct::ct_next_state(0, k.proto, dataplane_common::ct::TCP_ACK, o.dir);
        let e = CtEntry {
            nat_addr: o.nat_addr,
            orig_addr: o.orig_addr,
            nat_port_be: o.nat_port_be,
            orig_port_be: o.orig_port_be,
            backend_id: o.backend_id,
            rev_nat_id: o.rev_nat_id,
            flags: o.flags,
            dir: o.dir,
            state,
            _pad: 0,
            expires_s: now.saturating_add(lifetimes.lifetime(k.proto, state)),
        };
        match new.map.insert(k, e, BPF_NOEXIST) {
            Ok(()) => copied += 1,
            // Taken by a flow of the new programs: theirs is newer.
            Err(aya::maps::MapError::SyscallError(ref s)) if s.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(op("insert", CT4_MAP)(e)),
        }
    }
    std::fs::remove_file(&path).map_err(|e| MapsError::Invalid {
        what: "old conntrack pin",
        why: format!("copied, but {} could not be removed: {e}", path.display()),
    })?;
    Ok(copied)
}
