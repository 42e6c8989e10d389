//! The dataplane CNI plugin (spec 1.1): IP-per-Pod IPAM from the node's podCIDRs, a routed veth
//! into the Pod's network namespace, and a CNI error object for every failure. See docs/cni.md.
#![forbid(unsafe_code)]

pub mod commands;
pub mod ipam;
pub mod netns;
pub mod plugin;
pub mod spec;
