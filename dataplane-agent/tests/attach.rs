//! The agent's own attach step (`attach.rs`) against the kernel, inside a test netns and a test
//! cgroup: first attach pins links, a second agent (a restart) adopts them without re-creating
//! them, stale pod-veth pins are replaced, bad cgroups are refused, `cleanup` detaches.
use std::{collections::BTreeMap, path::Path, process::Command};

use dataplane_agent::{
    attach::{self, DataPath, DataPathError, Outcome, UplinkMode},
    loader::{self, Config, programs},
};
use dataplane_tests::{bpffs::PinDir, cgroup::Cgroup, netns::NetNs, require_kernel};

const UPLINK: &str = "up0";
const POD_VETH: &str = "dp0000000000a1";

fn setup() -> (NetNs, PinDir, Cgroup) {
    let ns = NetNs::new();
    ns.ip(&["link", "add", UPLINK, "type", "veth", "peer", "name", "up0p"]);
    ns.ip(&["link", "add", POD_VETH, "type", "veth", "peer", "name", "podp"]);
    for l in [UPLINK, "up0p", POD_VETH, "podp"] {
        ns.ip(&["link", "set", l, "up"]);
    }
    (ns, PinDir::new(), Cgroup::new())
}

/// One agent start: load (re-using pins) and attach everything; returns the outcomes.
fn agent_start(ns: &NetNs, pins: &Path, cgroup: &Path) -> (UplinkMode, Outcome, Outcome) {
    let (pins, cgroup) = (pins.to_path_buf(), cgroup.to_path_buf());
    ns.run(move || {
        let ebpf = loader::load_with(Some(&pins), &Config::default()).unwrap();
        let mut dp = DataPath::new(ebpf, &pins).unwrap();
        let up = dp.attach_uplink(UPLINK).unwrap();
        let tc = dp.attach_tc(programs::TC_INGRESS, POD_VETH).unwrap();
        let cg = dp.attach_cgroup(&cgroup).unwrap();
        (up, tc, cg)
        // `dp` (and the object) dropped here, like a process exiting.
    })
}

fn links(pins: &Path) -> BTreeMap<String, (u32, u32)> {
    attach::pinned_attachments(pins)
        .into_iter()
        .map(|a| {
            assert_eq!(a.error, None, "{a:?}");
            (a.pin, (a.link_id.unwrap(), a.program_id.unwrap()))
        })
        .collect()
}

fn xdp_prog_id(ns: &NetNs) -> Option<u32> {
    let out = ns.ip(&["-d", "link", "show", UPLINK]);
    let at = out.find("prog/xdp id ")?;
    out[at + 12..].split_whitespace().next()?.parse().ok()
}

#[test]
fn attached_links_outlive_the_agent_and_a_restart_adopts_them() {
    if !require_kernel() {
        return;
    }
    let (ns, pins, cg) = setup();
    assert_eq!(agent_start(&ns, pins.path(), cg.path()), (UplinkMode::XdpDriver, Outcome::Attached, Outcome::Attached));
    let first = links(pins.path());
    let cg_id = {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(cg.path()).unwrap().ino()
    };
    let mut want: Vec<String> = programs::SOCK.iter().map(|p| format!("{p}-cg{cg_id}")).collect();
    want.extend([format!("tc-{POD_VETH}"), format!("xdp-{UPLINK}")]);
    want.sort();
    assert_eq!(first.keys().cloned().collect::<Vec<_>>(), want);
    // The process's handles are gone; the pinned link still holds XDP on the uplink.
    assert_eq!(xdp_prog_id(&ns), Some(first[&format!("xdp-{UPLINK}")].1));

    // Restart: same links; XDP and TC swapped to the new programs in place, cgroup links kept.
    assert_eq!(agent_start(&ns, pins.path(), cg.path()), (UplinkMode::XdpPinned, Outcome::Updated, Outcome::Kept));
    let second = links(pins.path());
    assert_eq!(second.keys().collect::<Vec<_>>(), first.keys().collect::<Vec<_>>());
    for (pin, (link, prog)) in &first {
        assert_eq!(second[pin].0, *link, "{pin} was re-created");
        if pin.starts_with("dp_sock_") {
            assert_eq!(second[pin].1, *prog, "{pin}");
        } else {
            assert_ne!(second[pin].1, *prog, "{pin} still runs the old program");
        }
    }
    assert_eq!(xdp_prog_id(&ns), Some(second[&format!("xdp-{UPLINK}")].1));

    // A veth deleted while the agent was down leaves a dead pin: pruned by the scan, and a
    // veth re-created under the same name gets a fresh link.
    ns.ip(&["link", "del", POD_VETH]);
    ns.ip(&["link", "add", POD_VETH, "type", "veth", "peer", "name", "podp"]);
    let (_, tc, _) = agent_start(&ns, pins.path(), cg.path());
    assert_eq!(tc, Outcome::Attached, "the stale pin was not replaced");
    assert_ne!(links(pins.path())[&format!("tc-{POD_VETH}")].0, first[&format!("tc-{POD_VETH}")].0);

    // cleanup: removing the pins detaches.
    let removed = attach::remove_pins(pins.path()).unwrap();
    assert!(removed.len() >= 8, "{removed:?}");
    assert!(attach::pinned_attachments(pins.path()).is_empty());
    assert_eq!(xdp_prog_id(&ns), None, "XDP still attached after cleanup");
}

#[test]
fn pins_of_vanished_pod_veths_are_pruned() {
    if !require_kernel() {
        return;
    }
    let (ns, pins, cg) = setup();
    agent_start(&ns, pins.path(), cg.path());
    let p = pins.path().to_path_buf();
    ns.run(move || {
        let dp = DataPath::new(loader::load(Some(&p)).unwrap(), &p).unwrap();
        dp.prune_pod_pins(&Default::default());
    });
    let left = links(pins.path());
    assert!(!left.keys().any(|k| k.starts_with("tc-")), "{left:?}");
    assert!(left.contains_key(&format!("xdp-{UPLINK}")), "only pod veth pins go: {left:?}");
}

#[test]
fn a_cgroup_root_that_is_not_cgroup2_is_refused_and_nothing_is_attached() {
    if !require_kernel() {
        return;
    }
    let pins = PinDir::new();
    let p = pins.path().to_path_buf();
    let mut dp = DataPath::new(loader::load(Some(&p)).unwrap(), &p).unwrap();
    let tmp = std::env::temp_dir();
    for bad in [Path::new("/nonexistent/dpt"), Path::new("/proc"), tmp.as_path(), Path::new("/etc/hostname")] {
        let err = dp.attach_cgroup(bad).unwrap_err();
        assert!(matches!(err, DataPathError::NotCgroup2 { .. }), "{bad:?}: {err:?}");
    }
    assert!(attach::pinned_attachments(&p).is_empty());

    // The binary refuses it too, before loading anything (exit 1, the reason on stderr).
    let manifests = tempdir();
    let out = Command::new(env!("CARGO_BIN_EXE_dataplane-agent"))
        .args(["run", "--manifests", manifests.to_str().unwrap(), "--listen", "127.0.0.1:0", "--no-node-file"])
        .args(["--pin-dir", p.to_str().unwrap(), "--state-dir", manifests.to_str().unwrap(), "--cgroup-root", "/proc"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&manifests);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a directory of a cgroup v2 hierarchy"), "{stderr}");
    assert!(attach::pinned_attachments(&p).is_empty());
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(dataplane_tests::unique_name());
    std::fs::create_dir_all(&d).unwrap();
    d
}
