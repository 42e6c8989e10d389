//! `cargo xtask bench cni`: ADD+DEL latency of our plugin against Debian's reference `bridge` +
//! `host-local` (package containernetworking-plugins), in the same run, interleaved, on the same
//! set-up: a node that is a test namespace and a Pod namespace, both made here and removed after.
//!
//! Both plugins are exec'd the way a runtime does it, as a fresh process per command, from a thread
//! that has entered the node namespace (children inherit it), so neither pays for `ip netns exec`.
//! Figures are in microseconds of wall time per ADD+DEL pair; p50 and p99 over every iteration.
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use dataplane_tests::{
    bench::{Report, percentile},
    netns::NetNs,
    require_kernel,
};
use serde_json::{Value, json};

const ITERATIONS: usize = 150;
const WARMUP: usize = 5;
const REFERENCE_DIR: &str = "/usr/lib/cni";

/// Our plugin's release binary, built first so the benchmark never times a stale one.
fn our_plugin() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "dataplane-cni",
            "--bin",
            "dataplane-cni",
        ])
        .status()
        .expect("run cargo build for dataplane-cni");
    assert!(status.success(), "building dataplane-cni failed");
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().join("dataplane-cni");
    assert!(
        bin.exists(),
        "{} not found next to the benchmark",
        bin.display()
    );
    bin
}

struct Plugin {
    label: &'static str,
    exe: PathBuf,
    conf: Value,
}

/// Runs one command; panics with the plugin's output if it fails (a benchmark of failures is
/// worthless).
fn invoke(p: &Plugin, command: &str, id: &str, netns: &Path) {
    let mut child = Command::new(&p.exe)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", REFERENCE_DIR)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", p.exe.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(p.conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{} {command} failed: {} {}",
        p.label,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One ADD+DEL pair, in microseconds, and the ADD alone.
fn add_del(p: &Plugin, id: &str, netns: &Path) -> (f64, f64) {
    let t = Instant::now();
    invoke(p, "ADD", id, netns);
    let add = t.elapsed();
    invoke(p, "DEL", id, netns);
    (t.elapsed().as_secs_f64() * 1e6, add.as_secs_f64() * 1e6)
}

fn main() {
    if !require_kernel() {
        return;
    }
    let reference = Path::new(REFERENCE_DIR).join("bridge");
    assert!(
        reference.exists() && Path::new(REFERENCE_DIR).join("host-local").exists(),
        "the reference plugins are missing: apt-get install containernetworking-plugins (cargo xtask setup)"
    );
    let ours = our_plugin();
    let state = std::env::temp_dir().join(dataplane_tests::unique_name());
    std::fs::create_dir_all(&state).unwrap();

    let node = NetNs::new();
    let pod_ours = NetNs::new();
    let pod_ref = NetNs::new();
    let plugins = [
        Plugin {
            label: "ours",
            exe: ours,
            conf: json!({
                "cniVersion": "1.0.0", "name": "bench-ours", "type": "dataplane-cni", "mtu": 1500,
                "podCIDRs": ["10.244.5.0/24"],
                "dataDir": state.join("ours"), "logFile": state.join("ours.log"),
            }),
        },
        Plugin {
            label: "ref",
            exe: reference,
            conf: json!({
                "cniVersion": "1.0.0", "name": "bench-ref", "type": "bridge", "bridge": "cni-bench0",
                "isGateway": true, "ipMasq": false, "mtu": 1500,
                "ipam": {"type": "host-local", "subnet": "10.245.0.0/24", "dataDir": state.join("ref")},
            }),
        },
    ];
    let pods = [pod_ours.path(), pod_ref.path()];

    // Interleaved: ours, reference, ours, ... so drift on the machine hits both alike.
    let samples = node.run(move || {
        let mut pair: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut add: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for i in 0..WARMUP + ITERATIONS {
            for (k, p) in plugins.iter().enumerate() {
                let (both, a) = add_del(p, &format!("bench-{i}"), &pods[k]);
                if i >= WARMUP {
                    pair[k].push(both);
                    add[k].push(a);
                }
            }
        }
        (pair, add)
    });
    let (mut pair, mut add) = samples;
    let _ = std::fs::remove_dir_all(&state);

    let mut report = Report::new("cni");
    let del: Vec<Vec<f64>> = (0..2)
        .map(|k| {
            pair[k]
                .iter()
                .zip(&add[k])
                .map(|(both, a)| both - a)
                .collect()
        })
        .collect();
    let [mut del_ours, mut del_ref] = [del[0].clone(), del[1].clone()];
    let (o50, o99) = (
        percentile(&mut pair[0], 50.0),
        percentile(&mut pair[0], 99.0),
    );
    let (r50, r99) = (
        percentile(&mut pair[1], 50.0),
        percentile(&mut pair[1], 99.0),
    );
    report
        .figure("ours_add_del_p50_us", o50)
        .figure("ours_add_del_p99_us", o99)
        .figure("ref_add_del_p50_us", r50)
        .figure("ref_add_del_p99_us", r99)
        .figure("ours_add_p50_us", percentile(&mut add[0], 50.0))
        .figure("ref_add_p50_us", percentile(&mut add[1], 50.0))
        .figure("ours_del_p50_us", percentile(&mut del_ours, 50.0))
        .figure("ref_del_p50_us", percentile(&mut del_ref, 50.0))
        .figure("iterations", ITERATIONS as f64)
        .ratio("ours_vs_ref_add_del_p50", o50 / r50)
        .ratio("ours_vs_ref_add_del_p99", o99 / r99)
        .goal("ours_vs_ref_add_del_p50", "<= 0.5")
        .goal("ours_vs_ref_add_del_p99", "<= 0.5");
    report.finish();
}
