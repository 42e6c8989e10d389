//! Removes what an earlier, killed run left behind: namespaces, cgroups, pins and links whose name
//! carries the prefix and a pid that is no longer alive. Objects of live runs are left alone, so
//! parallel runs do not disturb each other.
use std::{fs, path::Path};

use crate::{PREFIX, cmd::try_run};

/// What one sweep removed, by kind.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub netns: Vec<String>,
    pub cgroups: Vec<String>,
    pub pins: Vec<String>,
    pub links: Vec<String>,
    /// Scratch directories under the temp dir (manifests, CNI state, sockets of a cluster).
    pub dirs: Vec<String>,
}

impl Swept {
    pub fn is_empty(&self) -> bool {
        self.netns.is_empty()
            && self.cgroups.is_empty()
            && self.pins.is_empty()
            && self.links.is_empty()
            && self.dirs.is_empty()
    }
}

/// The pid encoded in `dpt-<pid>-<n>` (or `dpt<pid>...` for length-limited link names), if any.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?.trim_start_matches('-');
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// A leftover: our prefix, and its owner is gone (or `all` is set, for a final clean-up that
/// runs when no test can be alive).
fn is_leftover(name: &str, all: bool) -> bool {
    match owner_pid(name) {
        Some(pid) => all || !Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    }
}

fn leftovers_in(dir: &Path, all: bool) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_leftover(n, all))
        .collect();
    names.sort();
    names
}

/// Sweeps leftovers of dead runs; with `all`, every object with the prefix (use only when no test
/// process can be running, e.g. at the end of `cargo xtask test`).
pub fn sweep_leftovers(all: bool) -> Swept {
    let mut swept = Swept::default();
    for name in leftovers_in(Path::new("/run/netns"), all) {
        if try_run("ip", &["netns", "del", &name]) {
            swept.netns.push(name);
        }
    }
    if let Some(mount) = crate::cgroup::cgroup2_mount() {
        for name in leftovers_in(&mount, all) {
            crate::cgroup::remove_tree(&mount.join(&name));
            swept.cgroups.push(name);
        }
    }
    for name in leftovers_in(Path::new(crate::bpffs::BPFFS), all) {
        if fs::remove_dir_all(Path::new(crate::bpffs::BPFFS).join(&name)).is_ok() {
            swept.pins.push(name);
        }
    }
    let tmp = std::env::temp_dir();
    for name in leftovers_in(&tmp, all) {
        if fs::remove_dir_all(tmp.join(&name)).is_ok() {
            swept.dirs.push(name);
        }
    }
    // The tests never create links in the root namespace; this catches a bug that would.
    for name in leftovers_in(Path::new("/sys/class/net"), all) {
        if try_run("ip", &["link", "del", &name]) {
            swept.links.push(name);
        }
    }
    swept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_our_names_only() {
        assert_eq!(owner_pid("dpt-123-4"), Some(123));
        assert_eq!(owner_pid("dpt77x"), Some(77));
        assert_eq!(owner_pid("dpt-abc"), None);
        assert_eq!(owner_pid("eth0"), None);
        assert_eq!(owner_pid("cni0"), None);
    }

    #[test]
    fn live_owner_is_not_a_leftover() {
        let me = format!("dpt-{}-0", std::process::id());
        assert!(!is_leftover(&me, false));
        assert!(is_leftover(&me, true));
        // pid_max is at most 2^22, so this pid cannot exist.
        assert!(is_leftover("dpt-99999999-0", false));
    }
}
