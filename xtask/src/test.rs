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

/// The control plane the kernel and integration tests share: `dpt-control-plane` (tests crate),
/// which tears itself down when its standard input closes, that is when this guard drops or
/// xtask dies.
struct SharedControlPlane {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl SharedControlPlane {
    fn start() -> anyhow::Result<SharedControlPlane> {
        let dir = std::env::temp_dir().join(format!("dpt-{}-xtask-cp", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let child = Command::new("cargo")
            .current_dir(root())
            .args(["run", "--quiet", "-p", "dataplane-tests", "--bin", "dpt-control-plane", "--"])
            .arg(&dir)
            .stdin(std::process::Stdio::piped())
            .spawn()?;
        let mut cp = SharedControlPlane { child, dir };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !cp.dir.join("cp.json").exists() {
            if let Some(status) = cp.child.try_wait()? {
                anyhow::bail!("dpt-control-plane exited ({status}) before its control plane was ready");
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("dpt-control-plane not ready within 120 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok(cp)
    }
}

impl Drop for SharedControlPlane {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn run(extra: &[String]) -> anyhow::Result<()> {
    step("test: building (includes the eBPF object)");
    exec(Command::new("cargo").current_dir(root()).args(["build", "--all-targets"]))?;
    step("test: sweeping leftovers of earlier runs");
    sweep(false)?;
    step("test: unit tests");
    let unit = nextest("kind(lib) | kind(bin) | kind(proc-macro)", extra);
    step("test: starting the shared control plane (etcd, kube-apiserver, kube-controller-manager)");
    let cp = SharedControlPlane::start()?;
    // nextest and every test process inherit it.
    crate::util::set_env("DATAPLANE_TEST_CONTROL_PLANE", &cp.dir);
    step("test: kernel and integration tests");
    let integration = nextest("kind(test)", extra);
    drop(cp);
    // Tests killed in this run (timeouts) leave objects owned by dead pids: remove them now.
    sweep(true)?;
    unit?;
    integration
}
