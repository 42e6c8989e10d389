//! `dataplane-agent doctor`: can this host run the data plane? One pass/fail line per check,
//! each failure with a hint an operator can act on.
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::host;

/// The oldest kernel the project supports (README): cgroup sock_addr hooks incl. recvmsg and
/// getpeername (5.8), bounded loops, BTF. TC attaches through tcx from 6.6, netlink before.
pub const MIN_KERNEL: (u32, u32) = (6, 1);

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    /// What to do about a failure; empty when the check passed.
    pub hint: String,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Check { name, ok: true, detail: detail.into(), hint: String::new() }
    }
    fn fail(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Check { name, ok: false, detail: detail.into(), hint: hint.into() }
    }
}

#[derive(Debug, Clone)]
pub struct DoctorOptions {
    pub pin_dir: PathBuf,
    pub cgroup_root: Option<PathBuf>,
    pub uplinks: Vec<String>,
    /// Load the embedded eBPF object into the kernel (needs root / CAP_BPF+CAP_SYS_ADMIN).
    pub load_object: bool,
}

pub fn run(opts: &DoctorOptions) -> Vec<Check> {
    let mounts = host::mounts().unwrap_or_default();
    let mut checks = vec![kernel(), btf(Path::new("/sys/kernel/btf/vmlinux")), bpffs(&mounts, &opts.pin_dir), cgroup2(&mounts, opts.cgroup_root.as_deref())];
    checks.extend(opts.uplinks.iter().map(|i| uplink(i)));
    if opts.load_object {
        checks.push(load_object(host::bpffs_containing(&mounts, &opts.pin_dir)));
    }
    checks
}

fn kernel() -> Check {
    let release = match nix::sys::utsname::uname() {
        Ok(u) => u.release().to_string_lossy().into_owned(),
        Err(e) => return Check::fail("kernel", format!("uname failed: {e}"), "run on Linux"),
    };
    match host::parse_kernel_version(&release) {
        Some(v) if v >= MIN_KERNEL => Check::pass("kernel", format!("{release} (>= {}.{})", MIN_KERNEL.0, MIN_KERNEL.1)),
        Some(_) => Check::fail(
            "kernel",
            format!("{release} is older than {}.{}", MIN_KERNEL.0, MIN_KERNEL.1),
            "upgrade the node kernel to Linux 6.1 or newer",
        ),
        None => Check::fail("kernel", format!("cannot parse release {release:?}"), "report this kernel release string"),
    }
}

fn btf(path: &Path) -> Check {
    if path.exists() {
        Check::pass("btf", format!("{} present", path.display()))
    } else {
        Check::fail("btf", format!("{} missing", path.display()), "use a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    }
}

fn bpffs(mounts: &[host::Mount], pin_dir: &Path) -> Check {
    match host::bpffs_containing(mounts, pin_dir) {
        Some(m) => Check::pass("bpffs", format!("{} is on the bpffs mounted at {}", pin_dir.display(), m.display())),
        None => Check::fail(
            "bpffs",
            format!("{} is not on a bpf filesystem", pin_dir.display()),
            "mount it: `mount -t bpf bpf /sys/fs/bpf` (in a Pod: a hostPath volume for /sys/fs/bpf with mountPropagation Bidirectional)",
        ),
    }
}

fn cgroup2(mounts: &[host::Mount], root: Option<&Path>) -> Check {
    match (root, host::find_cgroup2(mounts)) {
        (Some(r), Some(m)) if r.starts_with(m) && r.is_dir() => Check::pass("cgroup2", format!("--cgroup-root {} is in the cgroup v2 hierarchy at {}", r.display(), m.display())),
        (Some(r), found) => Check::fail(
            "cgroup2",
            format!("--cgroup-root {} is not a directory inside a cgroup v2 mount (found: {found:?})", r.display()),
            "pass a cgroup v2 directory, e.g. /sys/fs/cgroup or /sys/fs/cgroup/unified on hybrid hosts",
        ),
        (None, Some(m)) => Check::pass("cgroup2", format!("cgroup v2 mounted at {}", m.display())),
        (None, None) => Check::fail("cgroup2", "no cgroup2 mount found", "boot with systemd.unified_cgroup_hierarchy=1 or mount cgroup2 and pass --cgroup-root"),
    }
}

fn uplink(name: &str) -> Check {
    match nix::net::if_::if_nametoindex(name) {
        Ok(idx) => Check::pass("uplink", format!("{name} exists (ifindex {idx})")),
        Err(e) => Check::fail("uplink", format!("{name}: {e}"), "pass the node's uplink interface with --uplink (see `ip link`)"),
    }
}

/// Loads into a scratch pin directory of its own, so a check never touches the pins of a
/// running agent; the directory and its pins are removed afterwards.
fn load_object(bpffs: Option<&Path>) -> Check {
    let scratch = bpffs.map(|m| m.join(format!("dataplane-doctor-{}", std::process::id())));
    if let Some(dir) = &scratch
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        return Check::fail("load", format!("creating {}: {e}", dir.display()), "run as root");
    }
    let result = crate::loader::load(scratch.as_deref());
    if let Some(dir) = &scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    match result {
        Ok(ebpf) => {
            let progs: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
            Check::pass("load", format!("embedded object loaded and verified: programs {}", progs.join(", ")))
        }
        Err(e) => Check::fail(
            "load",
            crate::errors::error_chain(&e),
            "run as root (or with CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); `ulimit -l` may need raising on kernels before 5.11",
        ),
    }
}

/// Text rendering: `PASS name: detail` / `FAIL name: detail` + `  hint: ...`.
pub fn render_text(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        s.push_str(&format!("{} {:8} {}\n", if c.ok { "PASS" } else { "FAIL" }, c.name, c.detail));
        if !c.ok {
            s.push_str(&format!("              hint: {}\n", c.hint));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_carry_hints() {
        let mounts = host::parse_mountinfo("31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n");
        let b = bpffs(&mounts, Path::new("/sys/fs/bpf/dataplane"));
        assert!(!b.ok && b.hint.contains("mount -t bpf"), "{b:?}");
        let c = cgroup2(&mounts, Some(Path::new("/tmp")));
        assert!(!c.ok && c.hint.contains("cgroup v2 directory"), "{c:?}");
        assert!(cgroup2(&mounts, None).ok);
        assert!(!cgroup2(&[], None).ok);
        assert!(!btf(Path::new("/nonexistent/vmlinux")).ok);
        assert!(!uplink("dpt-no-such-if").ok);
        let text = render_text(&[b]);
        assert!(text.starts_with("FAIL bpffs") && text.contains("hint:"), "{text}");
    }
}
