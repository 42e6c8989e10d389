//! The dataplane agent library: the embedded eBPF object, its loader and the typed map readers.
pub mod loader;
pub mod maps;
pub mod stats;
pub mod model;
pub mod errors;
pub mod source;
