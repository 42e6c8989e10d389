//! `cargo xtask demo`: builds everything and runs the demo binary of the tests crate.
use std::process::Command;

use crate::util::{root, exec, step};

pub fn run(standalone: bool) -> anyhow::Result<()> {
    step("demo: building the data plane (eBPF object, agent, CNI plugin)");
    exec(Command::new("cargo").current_dir(root()).args(["build", "--release", "--bins"]))?;
    step("demo: starting");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root()).args(["run", "--release", "--quiet", "-p", "dataplane-tests", "--bin", "demo"]);
    if standalone {
        cmd.args(["--", "--standalone"]);
    }
    exec(&mut cmd)
}
