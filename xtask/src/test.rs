//! `cargo xtask test`: unit tests, then kernel and integration tests, with a leftover sweep around
//! them so that a run killed half-way is cleaned up by the next one.
use std::process::Command;

use crate::util::{root, exec, step};

fn nextest(filter: &str, extra: &[String]) -> anyhow::Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .args(["nextest", "run", "--no-fail-fast", "--no-tests=warn", "-E", filter])
        .args(extra);
    exec(&mut cmd)
}

/// Removes namespaces, cgroups, pins and links left by test processes that are no longer alive.
/// `quiet`: print only when something was removed, so the run ends with nextest's summary line.
fn sweep(quiet: bool) -> anyhow::Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root()).args(["run", "--quiet", "-p", "dataplane-tests", "--bin", "dpt-sweep"]);
    if quiet {
        cmd.args(["--", "--quiet"]);
    }
    exec(&mut cmd)
}

pub fn run(extra: &[String]) -> anyhow::Result<()> {
    step("test: building (includes the eBPF object)");
    exec(Command::new("cargo").current_dir(root()).args(["build", "--all-targets"]))?;
    step("test: sweeping leftovers of earlier runs");
    sweep(false)?;
    step("test: unit tests");
    let unit = nextest("kind(lib) | kind(bin) | kind(proc-macro)", extra);
    step("test: kernel and integration tests");
    let integration = nextest("kind(test)", extra);
    // Tests killed in this run (timeouts) leave objects owned by dead pids: remove them now.
    sweep(true)?;
    unit?;
    integration
}
