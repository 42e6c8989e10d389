//! A run killed half-way leaves namespaces, cgroups and pins behind; the sweep that `cargo xtask
//! test` runs before and after the tests must remove them, and must leave live runs alone.
use std::{
    path::Path,
    process::{Command, Stdio},
};

use dataplane_agent::loader;
use dataplane_common::metrics::HOOKS_MAP;
use dataplane_tests::{bpffs, cgroup, cmd::run, require_kernel, sweep::sweep_leftovers};

#[test]
fn sweep_removes_what_a_killed_process_left_and_nothing_else() {
    if !require_kernel() {
        return;
    }
    // A stand-in for a test process: it owns the objects (its pid is in their names) and sits in
    // the cgroup, then dies by SIGKILL, so no destructor runs.
    let mut victim = Command::new("sleep").arg("60").stdout(Stdio::null()).spawn().unwrap();
    let name = format!("dpt-{}-0", victim.id());

    run("ip", &["netns", "add", &name]);
    run("ip", &["-n", &name, "link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    let cg = cgroup::cgroup2_mount().unwrap().join(&name);
    std::fs::create_dir(&cg).unwrap();
    std::fs::create_dir(cg.join("child")).unwrap();
    std::fs::write(cg.join("child/cgroup.procs"), victim.id().to_string()).unwrap();
    bpffs::ensure_bpffs();
    let pins = Path::new(bpffs::BPFFS).join(&name);
    std::fs::create_dir(&pins).unwrap();
    let ebpf = loader::load(None).unwrap();
    ebpf.map(HOOKS_MAP).unwrap().pin(pins.join("hooks")).unwrap();
    drop(ebpf);
    let scratch = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(scratch.join("state")).unwrap();

    // A live owner's objects must survive a sweep.
    let live = dataplane_tests::netns::NetNs::new();
    // (Other leftovers of dead runs may be swept here too; only ours and the live one matter.)
    let swept = sweep_leftovers(false);
    for list in [&swept.netns, &swept.cgroups, &swept.pins] {
        assert!(!list.contains(&name) && !list.iter().any(|n| n == live.name()), "swept live objects: {swept:?}");
    }
    assert!(live.path().exists());

    victim.kill().unwrap();
    victim.wait().unwrap();
    let swept = sweep_leftovers(false);
    assert!(swept.netns.contains(&name), "{swept:?}");
    assert!(swept.cgroups.contains(&name), "{swept:?}");
    assert!(swept.pins.contains(&name), "{swept:?}");
    assert!(swept.dirs.contains(&name), "{swept:?}");
    assert!(!scratch.exists(), "scratch directory left");
    assert!(!Path::new("/run/netns").join(&name).exists(), "netns left");
    assert!(!cg.exists(), "cgroup left");
    assert!(!pins.exists(), "pin directory left");
    assert!(live.path().exists(), "the live namespace was removed");
}
