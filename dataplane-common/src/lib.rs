//! The contract between the eBPF programs and user space.
//!
//! One module per map family. Every type that crosses the boundary is `#[repr(C)]`, has no implicit
//! padding (explicit `_pad` fields, checked by `const` asserts on its size) and says its byte order in
//! its field names. Pinned map names carry a version suffix: a layout change gets a new name.
#![no_std]

pub mod affinity;
pub mod ct;
pub mod lb;
pub mod metrics;

/// Implements `aya::Pod` for map types when the `user` feature is on.
///
/// Only types whose every byte is a field (no implicit padding) may be passed here: `Pod` promises aya
/// that any byte pattern is a valid value and that reading the bytes leaks nothing uninitialised.
#[macro_export]
macro_rules! impl_pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is #[repr(C)], Copy, and its size assert proves it has no padding.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
