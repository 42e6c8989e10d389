//! bpffs pin directories that remove themselves.
use std::{
    fs,
    path::{Path, PathBuf},
};

pub const BPFFS: &str = "/sys/fs/bpf";

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there yet (a no-op on most hosts).
pub fn ensure_bpffs() {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounted = info.lines().any(|l| {
        l.split_once(" - ").is_some_and(|(pre, post)| {
            pre.split_whitespace().nth(4) == Some(BPFFS) && post.starts_with("bpf ")
        })
    });
    if !mounted {
        crate::cmd::run("mount", &["-t", "bpf", "bpf", BPFFS]);
    }
}

/// A directory `/sys/fs/bpf/dpt-<pid>-<n>`; everything pinned under it is unpinned on drop.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new() -> PinDir {
        ensure_bpffs();
        let path = Path::new(BPFFS).join(crate::unique_name());
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        PinDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Unlinking a pin drops the kernel object once nothing else holds it.
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("warning: cannot remove {}: {e}", self.path.display());
        }
    }
}
