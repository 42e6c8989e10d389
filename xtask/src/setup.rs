//! `cargo xtask setup`: installs what a fresh machine lacks and skips what is there.
//!
//! Recipe and pitfalls: ../shared/TOOLCHAIN.md. In short: LLVM 22 (for bpf-linker) from Debian,
//! bpf-linker 0.13 built against it with `LLVM_PREFIX`, and rust-src for the nightly that is
//! already installed. The nightly is never updated: a newer one moves to an LLVM that bpf-linker
//! cannot read. Then the real Kubernetes v1.34.9 binaries (k8s.rs), whose directory every later
//! child of xtask finds in `DATAPLANE_K8S_BIN_DIR`.
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::util::{output, exec, step};

/// Debian packages: LLVM for bpf-linker, and the tools the tests, demo and benchmarks drive.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "iproute2",
    "iputils-ping",
    "netcat-openbsd",
    "containernetworking-plugins",
    "iptables",
    "nftables",
    "bind9-dnsutils",
    "iperf3",
    // `xz -d` for the Kubernetes binaries in ../shared/k8s/bin.
    "xz-utils",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const EBPF_TOOLCHAIN: &str = "nightly";

pub fn run() -> anyhow::Result<()> {
    run_with(true)
}

/// `k8s`: also provide the Kubernetes binaries (everything but the standalone demo needs them).
pub fn run_with(k8s: bool) -> anyhow::Result<()> {
    step("setup: checking what this machine has");
    let mut did = Vec::new();
    packages(&mut did)?;
    bpf_linker(&mut did)?;
    rust_src(&mut did)?;
    nextest(&mut did)?;
    if k8s {
        crate::k8s::setup(&mut did)?;
    }
    if did.is_empty() {
        eprintln!("setup: everything was already installed");
    } else {
        eprintln!("setup: {}", did.join("; "));
    }
    Ok(())
}

fn is_root() -> bool {
    output("id", &["-u"]).is_some_and(|s| s.trim() == "0")
}

fn installed(pkg: &str) -> bool {
    output("dpkg-query", &["-W", "-f=${Status}", pkg]).is_some_and(|s| s.contains("install ok installed"))
}

fn packages(did: &mut Vec<String>) -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {missing:?}; run `cargo xtask setup` as root (or apt-get install them)");
    }
    step(&format!("setup: apt-get install {}", missing.join(" ")));
    exec(Command::new("apt-get").args(["update", "-q"]))?;
    exec(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    did.push(format!("installed {}", missing.join(", ")));
    Ok(())
}

fn bpf_linker(did: &mut Vec<String>) -> anyhow::Result<()> {
    // Running it (not just finding it) also proves its libLLVM is loadable.
    if output("bpf-linker", &["--version"]).is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    step(&format!("setup: cargo install bpf-linker {BPF_LINKER_VERSION} (LLVM 22, ~2 min)"));
    // bpf-linker reads LLVM_PREFIX (not LLVM_SYS_*_PREFIX); /usr/bin/llvm-config is LLVM 14.
    exec(Command::new("cargo")
        .args(["install", "bpf-linker", "--locked", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", LLVM_PREFIX))
    .context("installing bpf-linker")?;
    did.push(format!("installed bpf-linker {BPF_LINKER_VERSION}"));
    Ok(())
}

fn rust_src(did: &mut Vec<String>) -> anyhow::Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"]).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with(EBPF_TOOLCHAIN)) {
        bail!(
            "no `{EBPF_TOOLCHAIN}` toolchain: the eBPF build needs the nightly this machine kind ships \
             (see ../shared/TOOLCHAIN.md); not installing one, since a newer nightly breaks bpf-linker"
        );
    }
    let components =
        output("rustup", &["component", "list", "--installed", "--toolchain", EBPF_TOOLCHAIN]).unwrap_or_default();
    if components.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    step("setup: rustup component add rust-src --toolchain nightly");
    exec(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", EBPF_TOOLCHAIN]))?;
    did.push("added rust-src to nightly".into());
    Ok(())
}

fn nextest(did: &mut Vec<String>) -> anyhow::Result<()> {
    if output("cargo", &["nextest", "--version"]).is_some() {
        return Ok(());
    }
    step("setup: cargo install cargo-nextest");
    exec(Command::new("cargo").args(["install", "cargo-nextest", "--locked"]))?;
    did.push("installed cargo-nextest".into());
    Ok(())
}
