//! Reading the data path's per-CPU counters.
use aya::maps::{MapData, MapError, PerCpuArray};
use dataplane_common::metrics::Counter;

/// Sums one slot of a per-CPU counter array over all CPUs.
pub fn read_counter(map: &PerCpuArray<&MapData, Counter>, index: u32) -> Result<Counter, MapError> {
    let per_cpu = map.get(&index, 0)?;
    Ok(per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    }))
}
