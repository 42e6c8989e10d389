// This file exists so that `dataplane-ebpf` has a library target: dataplane-agent lists it as a
// build-dependency so that cargo re-runs the agent's build script when the eBPF sources change.
#![no_std]
