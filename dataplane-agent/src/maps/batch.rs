//! Reading a whole array map in a few syscalls with `BPF_MAP_LOOKUP_BATCH` (Linux 5.6+).
//!
//! aya 0.14 has no batch operations, and reading the 262,145-slot backends array one
//! `BPF_MAP_LOOKUP_ELEM` at a time took about 0.25 s at every agent start and in `status`.
//! This is the one raw `bpf(2)` call in the agent; [`array_entries`] falls back to per-index
//! lookups when the kernel refuses it.
use std::borrow::Borrow;
use std::os::fd::{AsFd, AsRawFd};

use aya::{
    Pod,
    maps::{IterableMap, MapData, MapError, array::Array},
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
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
