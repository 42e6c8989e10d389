//! cgroup v2 sub-trees that remove themselves (and kill what is left in them).
use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on most hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones), read from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        // Fields: id parent major:minor root mountpoint opts ... - fstype source superopts
        let (pre, post) = line.split_once(" - ")?;
        let mountpoint = pre.split_whitespace().nth(4)?;
        (post.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mountpoint))
    })
}

/// The calling process's cgroup v2 path, relative to the mount (`0::/...` in /proc/self/cgroup).
fn own_cgroup() -> PathBuf {
    let text = fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    let rel = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/");
    PathBuf::from(rel.trim_start_matches('/'))
}

/// A cgroup `dpt-<pid>-<n>` directly under the cgroup v2 mount. Never the root cgroup itself.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    /// Set when the test process itself moved in: where to move it back before removal.
    return_to: Option<PathBuf>,
}

impl Cgroup {
    pub fn new() -> Cgroup {
        let mount = cgroup2_mount().expect("no cgroup v2 mount in /proc/self/mountinfo");
        let path = mount.join(crate::unique_name());
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Cgroup { path, return_to: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves a process in.
    pub fn add_pid(&self, pid: u32) {
        fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", self.path.display()));
    }

    /// Moves the test process itself in (its sockets then see the cgroup's socket programs).
    /// It is moved back to where it was before the cgroup is removed.
    pub fn enter(&mut self) {
        if self.return_to.is_none() {
            let mount = cgroup2_mount().expect("cgroup v2 mount");
            self.return_to = Some(mount.join(own_cgroup()));
        }
        self.add_pid(std::process::id());
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

/// Kills every process in `path` and its children, then removes the directories, deepest first.
pub fn remove_tree(path: &Path) {
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    // cgroup.kill (Linux >= 5.14) SIGKILLs everything inside, including children cgroups.
    let _ = fs::write(path.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                eprintln!("warning: cannot remove cgroup {}: {e}", path.display());
                return;
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Some(home) = &self.return_to {
            // Must leave before cgroup.kill, or the kill would take the test process with it.
            if let Err(e) = fs::write(home.join("cgroup.procs"), std::process::id().to_string()) {
                eprintln!("warning: cannot move back to {}: {e}; leaving {} for the sweep", home.display(), self.path.display());
                return;
            }
        }
        remove_tree(&self.path);
    }
}
