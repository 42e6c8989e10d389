//! Processes of the virtual cluster: started inside a network namespace (`ip netns exec`) and,
//! where given, a cgroup; killed and reaped on drop. Also where the binaries are found.
use std::{
    fs::File,
    io::Write as _,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
};

use super::ClusterError;

/// The binaries the cluster runs, found next to the running executable: test binaries live in
/// `target/<profile>/deps/`, `demo` in `target/<profile>/`, and `cargo build --bins` puts every
/// package's binaries in `target/<profile>/`. `DPT_BIN_DIR` overrides the directory.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub agent: PathBuf,
    pub cni: PathBuf,
    pub echo: PathBuf,
}

impl Binaries {
    pub fn locate() -> Result<Binaries, ClusterError> {
        let dirs: Vec<PathBuf> = match std::env::var_os("DPT_BIN_DIR") {
            Some(dir) => vec![PathBuf::from(dir)],
            None => {
                let exe = std::env::current_exe().map_err(|e| ClusterError::Binary { name: "current executable", detail: e.to_string() })?;
                exe.ancestors().skip(1).take(2).map(Path::to_path_buf).collect()
            }
        };
        let find = |name: &'static str| {
            dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()).ok_or_else(|| ClusterError::Binary {
                name,
                detail: format!("not found in {dirs:?}; build it first (`cargo build --bins`) or set DPT_BIN_DIR"),
            })
        };
        Ok(Binaries { agent: find("dataplane-agent")?, cni: find("dataplane-cni")?, echo: find("echo-server")? })
    }
}

/// `program args...` started inside network namespace `netns` (by name, `/run/netns/<name>`) and,
/// when given, cgroup `cgroup` (a cgroup v2 directory): both are entered between fork and exec, so
/// the program and everything it starts are inside from their first instruction.
///
/// Not `ip netns exec`: that also mounts a fresh sysfs over `/sys` in a private mount namespace,
/// which hides `/sys/fs/bpf` and `/sys/fs/cgroup` from the agent.
pub fn command(netns: &str, cgroup: Option<&Path>, program: &Path, args: &[&str]) -> Result<Command, ClusterError> {
    let ns_path = Path::new("/run/netns").join(netns);
    // Opened before the fork: between fork and exec the child only issues setns(2) and write(2),
    // which are async-signal-safe (no allocation, no locks).
    let ns = File::open(&ns_path).map_err(|e| ClusterError::Io { what: format!("open {}", ns_path.display()), source: e })?;
    let procs = match cgroup {
        Some(cg) => {
            let path = cg.join("cgroup.procs");
            Some(File::options().write(true).open(&path).map_err(|e| ClusterError::Io { what: format!("open {}", path.display()), source: e })?)
        }
        None => None,
    };
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: see above; the closure owns the two files and only makes the two system calls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(mut f) = procs.as_ref() {
                // "0" moves the writing process itself.
                f.write_all(b"0")?;
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// A child process that is SIGKILLed and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    pub what: String,
    pub child: Child,
}

impl Proc {
    pub fn spawn(what: impl Into<String>, mut cmd: Command, stdout: Stdio, stderr: Stdio) -> Result<Proc, ClusterError> {
        let what = what.into();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| ClusterError::Io { what: format!("start {what}"), source: e })?;
        Ok(Proc { what, child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a command to completion and returns its output, failing with its stderr.
pub fn output(what: &str, mut cmd: Command) -> Result<Output, ClusterError> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| ClusterError::Io { what: format!("run {what}"), source: e })?;
    if !out.status.success() {
        return Err(ClusterError::Command {
            what: what.to_owned(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        });
    }
    Ok(out)
}
