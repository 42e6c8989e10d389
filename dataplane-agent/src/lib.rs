//! The dataplane agent library: the embedded eBPF object, its loader and the typed map readers.
pub mod loader;
pub mod attach;
pub mod maps;
pub mod stats;
pub mod model;
pub mod errors;
pub mod source;
pub mod agent;
pub mod cli;
pub mod doctor;
pub mod host;
pub mod http;
pub mod install;
pub mod kube_proxy_cleanup;
pub mod metrics;
pub mod routes;
pub mod reconcile;
