//! Network namespaces and veth pairs that remove themselves.
use std::{fs::File, path::PathBuf};

use nix::sched::{CloneFlags, setns};

use crate::cmd::{run, try_run};

/// A named network namespace (`/run/netns/<name>`), deleted on drop with everything in it.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `dpt-<pid>-<n>` with its loopback up. It has no route anywhere.
    pub fn new() -> NetNs {
        let name = crate::unique_name();
        run("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> args...`, panicking on failure; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a command inside the namespace (`ip netns exec`), panicking on failure.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `f` on a fresh OS thread that has entered this namespace, and returns its result.
    ///
    /// `setns` changes the calling thread only, so a dedicated thread keeps the caller (and any
    /// async runtime worker) in its own namespace. Sockets opened and interfaces resolved by name
    /// inside `f` belong to this namespace. Panics in `f` are propagated.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        let handle = std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            setns(&file, CloneFlags::CLONE_NEWNET).expect("setns(CLONE_NEWNET)");
            f()
        });
        match handle.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys its interfaces (and the peer ends of its veths).
        try_run("ip", &["netns", "del", &self.name]);
    }
}

/// A veth pair whose ends live in two test namespaces. Created directly inside them, so no end is
/// ever in the root namespace, not even for a moment.
#[derive(Debug)]
pub struct Veth {
    ns: String,
    name: String,
}

impl Veth {
    /// Creates `a_name` in `a` and `b_name` in `b`, both up.
    pub fn new(a: &NetNs, a_name: &str, b: &NetNs, b_name: &str) -> Veth {
        a.ip(&["link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b.name()]);
        let veth = Veth { ns: a.name().to_owned(), name: a_name.to_owned() };
        a.ip(&["link", "set", a_name, "up"]);
        b.ip(&["link", "set", b_name, "up"]);
        veth
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Deleting one end deletes both; harmless when the namespace is already gone.
        try_run("ip", &["-n", &self.ns, "link", "del", &self.name]);
    }
}
