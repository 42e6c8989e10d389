//! Process helpers shared by the xtask commands.
use std::{
    ffi::OsStr,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default()
}

/// Puts `~/.cargo/bin` on PATH for every child: the eBPF build finds bpf-linker there.
pub fn prepare_env() {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let cargo_bin = format!("{home}/.cargo/bin");
    let path = std::env::var("PATH").unwrap_or_default();
    if !path.split(':').any(|p| p == cargo_bin) {
        set_env("PATH", format!("{cargo_bin}:{path}"));
    }
}

/// Sets a variable in xtask's own environment, so that every child it starts (cargo, nextest, the
/// tests and benchmarks they run) inherits it.
pub fn set_env(key: &str, value: impl AsRef<OsStr>) {
    // SAFETY: xtask calls this only from its main thread while no other thread is running (setup's
    // unpacking threads are joined before), so nothing reads the environment concurrently.
    unsafe { std::env::set_var(key, value) };
}

/// Runs a command with inherited stdio, failing when it fails.
pub fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command quietly and returns its stdout when it succeeds.
pub fn output(prog: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(prog).args(args).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo <args>` in the workspace root, optionally `--release`.
pub fn cargo(args: &[&str], release: bool) -> anyhow::Result<()> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root()).args(args);
    if release {
        cmd.arg("--release");
    }
    exec(&mut cmd)
}

/// Prints a step header the way every command does.
pub fn step(what: &str) {
    eprintln!("\x1b[1m==> {what}\x1b[0m");
}
