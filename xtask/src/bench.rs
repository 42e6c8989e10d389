//! `cargo xtask bench <name>`: each benchmark is a binary `bench-<name>` of the tests crate, run in
//! release mode; it prints a table and writes target/bench/<name>.json.
use std::process::Command;

use anyhow::bail;
use clap::ValueEnum;

use crate::util::{root, exec, step};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Name {
    /// BPF_PROG_RUN ns per packet: LB miss/hit/reverse-NAT against a parse-only floor.
    Datapath,
    /// CNI ADD+DEL latency against Debian's bridge + host-local.
    Cni,
    /// Agent: objects loaded to maps programmed, single-change latency, RSS.
    Sync,
    /// Service routing against kube-proxy's iptables and nftables rules.
    Services,
    /// DNS answers from the agent against a plain forwarder.
    Dns,
    /// Every benchmark above that exists.
    All,
}

const ALL: [Name; 5] = [Name::Datapath, Name::Cni, Name::Sync, Name::Services, Name::Dns];

fn bin(name: Name) -> String {
    format!("bench-{}", format!("{name:?}").to_lowercase())
}

fn exists(name: Name) -> bool {
    root().join("tests/src/bin").join(format!("{}.rs", bin(name))).exists()
}

fn run_one(name: Name) -> anyhow::Result<()> {
    step(&format!("bench {name:?}: building in release mode and running"));
    exec(Command::new("cargo")
        .current_dir(root())
        .args(["run", "--release", "--quiet", "-p", "dataplane-tests", "--bin", &bin(name)]))
}

pub fn run(name: Name) -> anyhow::Result<()> {
    if let Name::All = name {
        let available: Vec<Name> = ALL.into_iter().filter(|n| exists(*n)).collect();
        for n in &available {
            run_one(*n)?;
        }
        let missing: Vec<Name> = ALL.into_iter().filter(|n| !exists(*n)).collect();
        if !missing.is_empty() {
            eprintln!("not built yet, so not run: {missing:?}");
        }
        return Ok(());
    }
    if !exists(name) {
        bail!("benchmark {name:?} does not exist yet (no tests/src/bin/{}.rs); see README's status", bin(name));
    }
    run_one(name)
}
