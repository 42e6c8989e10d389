//! Reading a whole map in a few syscalls with `BPF_MAP_LOOKUP_BATCH`, and deleting many keys
//! with `BPF_MAP_DELETE_BATCH` (Linux 5.6+).
//!
//! aya 0.14 has no batch operations, and reading the 262,145-slot backends array one
//! `BPF_MAP_LOOKUP_ELEM` at a time took about 0.25 s at every agent start and in `status`.
//! These are the raw `bpf(2)` calls in the agent; [`array_entries`] and [`sweep_hash`] fall back
//! to one syscall per element when the kernel refuses them.
use std::borrow::Borrow;
use std::os::fd::{AsFd, AsRawFd};

use aya::{
    Pod,
    maps::{HashMap, IterableMap, MapData, MapError, array::Array},
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// Entries per syscall: 1 MiB of values for 16-byte entries.
const CHUNK: u32 = 65_536;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every `(index, value)` of the array, in index order: batched where the kernel allows it,
/// else one lookup per index.
pub fn array_entries<T: Borrow<MapData>, V: Pod>(array: &Array<T, V>) -> Result<Vec<(u32, V)>, MapError> {
    match read_batch(array) {
        Ok(all) => Ok(all),
        Err(_) => (0..array.len()).map(|i| Ok((i, array.get(&i, 0)?))).collect(),
    }
}

/// Every `(index, value)` of the array through `BPF_MAP_LOOKUP_BATCH` only, or the errno the
/// kernel returned (public so that a test can show the batch path itself works).
pub fn read_batch<T: Borrow<MapData>, V: Pod>(array: &Array<T, V>) -> Result<Vec<(u32, V)>, std::io::Error> {
    let fd = array.map().fd().as_fd().as_raw_fd();
    let mut out = Vec::new();
    let mut keys = vec![0u32; CHUNK as usize];
    // SAFETY: V is Pod (plain bytes, any bit pattern valid); the kernel fills whole entries.
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; CHUNK as usize];
    let (mut in_batch, mut out_batch) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &in_batch as *const u32 as u64 },
            out_batch: &mut out_batch as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: attr points at buffers of `count` keys and values of the map's key and value
        // sizes (u32 and V, checked by aya when the Array was made), alive for the call.
        let ret = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &mut attr as *mut BatchAttr, std::mem::size_of::<BatchAttr>())
        };
        // ENOENT: the last chunk (its entries, if any, are still returned).
        let done = ret < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT);
        if ret < 0 && !done {
            return Err(std::io::Error::last_os_error());
        }
        let n = attr.count as usize;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        if done || n == 0 {
            return Ok(out);
        }
        in_batch = out_batch;
        first = false;
    }
}

fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> Result<(), std::io::Error> {
    // SAFETY: `attr` is a valid `union bpf_attr` prefix for the batch commands; the pointers in
    // it are the caller's, checked there.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut BatchAttr, std::mem::size_of::<BatchAttr>()) };
    if ret < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// What one [`sweep_hash`] saw and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Entries read.
    pub seen: u64,
    /// Entries deleted (of those the predicate picked, the ones still there to delete).
    pub deleted: u64,
    /// Whether the batch syscalls were used (else one syscall per element).
    pub batched: bool,
}

/// Hash-map entries per `BPF_MAP_LOOKUP_BATCH` (the kernel refuses a chunk that splits a bucket
/// with ENOSPC; then the chunk doubles).
const HASH_CHUNK: u32 = 8_192;

/// Walks every entry of a hash (or LRU hash) map and deletes those `dead` picks: chunk by chunk,
/// read with `BPF_MAP_LOOKUP_BATCH` and the picked keys of each chunk deleted with
/// `BPF_MAP_DELETE_BATCH` before the next chunk is read, so an entry is deleted within a
/// chunk's time (well under a millisecond) of being judged. Where the kernel has no batch
/// operations, every key is read and judged, then deleted one by one.
///
/// The kernel has no compare-and-delete: an entry the data path rewrote between the read and the
/// delete is deleted all the same. Callers pick only entries that are dead for the data path
/// too (expired), which it rewrites only when a new packet with that very tuple arrives.
pub fn sweep_hash<K: Pod, V: Pod>(map: &mut HashMap<MapData, K, V>, mut dead: impl FnMut(&K, &V) -> bool) -> Result<Sweep, MapError> {
    match sweep_hash_batched(map, &mut dead) {
        Ok(s) => Ok(s),
        // A kernel without batch operations refuses the first lookup, before anything was
        // deleted. 524: the kernel-internal ENOTSUPP some kernels leak for unsupported operations.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | 524)) => {
            sweep_hash_single(map, &mut dead)
        }
        Err(e) => Err(MapError::SyscallError(aya::sys::SyscallError { call: "bpf_map_lookup_batch", io_error: e })),
    }
}

fn sweep_hash_single<K: Pod, V: Pod>(map: &mut HashMap<MapData, K, V>, dead: &mut impl FnMut(&K, &V) -> bool) -> Result<Sweep, MapError> {
    let mut sweep = Sweep::default();
    let mut doomed = Vec::new();
    for kv in map.iter() {
        let (k, v) = kv?;
        sweep.seen += 1;
        if dead(&k, &v) {
            doomed.push(k);
        }
    }
    for k in &doomed {
        match map.remove(k) {
            Ok(()) => sweep.deleted += 1,
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(sweep)
}

fn sweep_hash_batched<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>, dead: &mut impl FnMut(&K, &V) -> bool) -> Result<Sweep, std::io::Error> {
    let fd = map.map().fd().as_fd().as_raw_fd() as u32;
    let mut sweep = Sweep { batched: true, ..Sweep::default() };
    let mut chunk = HASH_CHUNK;
    // SAFETY (both): K and V are Pod (plain bytes, any bit pattern valid).
    let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; chunk as usize];
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; chunk as usize];
    let mut doomed: Vec<K> = Vec::with_capacity(chunk as usize);
    let (mut in_batch, mut out_batch) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &in_batch as *const u32 as u64 },
            out_batch: &mut out_batch as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk,
            map_fd: fd,
            ..Default::default()
        };
        // Buffers of `chunk` keys and values of the map's key and value sizes (K and V, checked
        // by aya when the HashMap was made); the batch token of a hash map is a u32 bucket index.
        let done = match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
            Ok(()) => false,
            // The last chunk (its entries, if any, are still returned).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            // One bucket holds more entries than the chunk: retry it with a bigger one.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && chunk < (1 << 20) => {
                chunk *= 2;
                keys.resize(chunk as usize, keys[0]);
                values.resize(chunk as usize, values[0]);
                continue;
            }
            Err(e) => return Err(e),
        };
        let n = attr.count as usize;
        sweep.seen += n as u64;
        doomed.clear();
        doomed.extend(keys[..n].iter().zip(&values[..n]).filter(|(k, v)| dead(k, v)).map(|(k, _)| *k));
        sweep.deleted += delete_batch(fd, &doomed)?;
        if done || n == 0 {
            return Ok(sweep);
        }
        in_batch = out_batch;
        first = false;
    }
}

/// Deletes `keys` with `BPF_MAP_DELETE_BATCH`; a key that is gone already (evicted, or deleted
/// by someone else) is skipped. Returns how many were deleted.
fn delete_batch<K: Pod>(fd: u32, keys: &[K]) -> Result<u64, std::io::Error> {
    let mut deleted = 0u64;
    let mut rest = keys;
    while !rest.is_empty() {
        let mut attr = BatchAttr { keys: rest.as_ptr() as u64, count: rest.len() as u32, map_fd: fd, ..Default::default() };
        // The kernel reads `count` keys of the map's key size (K) from `keys`.
        let res = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        // On an error `count` says how many keys before the failing one were deleted.
        let n = (attr.count as usize).min(rest.len());
        deleted += n as u64;
        match res {
            Ok(()) => return Ok(deleted),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[(n + 1).min(rest.len())..],
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}
