//! The `dataplane-agent` binary: flag errors, `run` with the manifests source end to end (HTTP
//! endpoints, CNI node file, status file, re-read on change, SIGTERM), `status` and `doctor`.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dataplane_tests::scratch::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_dataplane-agent");

fn agent(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env_remove("NODE_NAME").output().unwrap()
}

/// Kills the agent if the test fails before stopping it.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn bad_flags_get_clear_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--listen", "not-an-address"], "invalid value 'not-an-address' for '--listen <LISTEN>'"),
        (&["run", "--routes"], "--node-name <NODE_NAME>"),
        (&["run", "--manifests-poll-ms", "1"], "invalid value '1' for '--manifests-poll-ms <MS>'"),
        (&["run", "--nodeport-addresses", "1.2.3.4,bogus"], "invalid value 'bogus' for '--nodeport-addresses <IP,..>'"),
        (
            &["run", "--node-selector", "pool in (a,b)"],
            "invalid value 'pool in (a,b)' for '--node-selector <SELECTOR>': \"pool in (a,b)\": set-based requirements (in, notin) are not supported",
        ),
        (&["run", "--node-selector", "pool=a b"], "\"pool=a b\": \"a b\" is not a valid label value"),
        (&["run", "--node-selector", "pool=blue,"], "label selector \"pool=blue,\" has an empty requirement"),
        (&["run", "--service-proxy-name", "my proxy"], "invalid value 'my proxy' for '--service-proxy-name <NAME>'"),
        (&["run", "--api-retry-max-ms", "0"], "invalid value '0' for '--api-retry-max-ms <MS>'"),
        (&["run", "--manifests", "/tmp", "--kubeconfig", "/tmp/k"], "'--manifests <DIR>' cannot be used with '--kubeconfig <PATH>'"),
        (&["doctor", "--output", "yaml"], "invalid value 'yaml' for '--output <OUTPUT>'"),
        (&["frobnicate"], "unrecognized subcommand 'frobnicate'"),
    ];
    for (args, want) in cases {
        let out = agent(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: want {want:?} in:\n{stderr}");
    }
    // Valid flags, bad value found at start-up: exit 1 with the reason.
    let out = agent(&["run", "--no-maps", "--manifests", "/nonexistent/dpt-manifests", "--listen", "127.0.0.1:0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: --manifests /nonexistent/dpt-manifests: No such file or directory"), "{stderr}");
    let out = agent(&["run", "--no-maps", "--kubeconfig", "/nonexistent/dpt-kubeconfig", "--listen", "127.0.0.1:0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: --kubeconfig /nonexistent/dpt-kubeconfig: "), "{stderr}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A plain HTTP/1.1 GET; returns (status code, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let code = resp.split(' ').nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, body) = get(port, "/metrics")?;
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn copy_golden(case: &str, to: &Path) {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    std::fs::copy(golden.join("nodes.yaml"), to.join("nodes.yaml")).unwrap();
    std::fs::copy(golden.join(case).join("input").join(format!("{case}.yaml")), to.join(format!("{case}.yaml"))).unwrap();
}

#[test]
fn run_with_manifests_programs_maps_serves_health_metrics_status_and_node_file() {
    if !dataplane_tests::require_kernel() {
        return;
    }
    let pins = dataplane_tests::bpffs::PinDir::new();
    let pin_dir = pins.path().to_str().unwrap().to_string();
    let tmp = TempDir::new();
    let manifests = tmp.0.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    copy_golden("coredns", &manifests);
    let state_dir = tmp.0.join("state");
    let node_file = tmp.0.join("node.json");
    let port = free_port();
    let mut child = Agent(
        Command::new(BIN)
            .args(["run", "--manifests", manifests.to_str().unwrap(), "--manifests-poll-ms", "20", "--node-name", "node-a"])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--state-dir", state_dir.to_str().unwrap(), "--node-file", node_file.to_str().unwrap()])
            .args(["--pin-dir", &pin_dir])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("/readyz", || get(port, "/readyz").is_some_and(|(c, _)| c == 200));
    assert_eq!(get(port, "/healthz").unwrap(), (200, "ok\n".to_string()));
    assert_eq!(metric(port, "dataplane_agent_services"), Some(1.0));
    assert_eq!(metric(port, "dataplane_agent_frontends"), Some(3.0));
    assert!(metric(port, "dataplane_agent_sync_duration_seconds_count").unwrap() >= 1.0);
    assert_eq!(std::fs::read_to_string(&node_file).unwrap(), "{\"podCIDRs\":[\"10.244.0.0/24\",\"fd00:10:244::/64\"]}\n");
    // The CNI plugin's STATUS waits for this file (docs/cni.md).
    assert!(tmp.0.join("ready").exists(), "the CNI readiness file after the first sync");
    assert_eq!(metric(port, "dataplane_agent_map_frontend_entries"), Some(3.0));
    let out = agent(&["services", "--pin-dir", &pin_dir]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.lines().any(|l| l.starts_with("10.96.0.10:53") && l.contains("UDP") && l.contains("10.244.0.3:53 (local)")), "{table}");

    // A change on disk is picked up; a broken file is reported and changes nothing.
    copy_golden("ingress-lb-local", &manifests);
    wait_for("3 services", || metric(port, "dataplane_agent_services") == Some(3.0));
    std::fs::write(manifests.join("zz-broken.yaml"), "kind: [").unwrap();
    wait_for("source error", || metric(port, "dataplane_agent_source_errors_total").is_some_and(|v| v >= 1.0));
    assert_eq!(metric(port, "dataplane_agent_services"), Some(3.0));

    let out = agent(&["status", "--output", "json", "--state-dir", state_dir.to_str().unwrap(), "--pin-dir", tmp.0.join("no-pins").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["status"]["ready"], true);
    assert_eq!(status["status"]["services"], 3);
    assert_eq!(status["status"]["source"], format!("manifests:{}", manifests.display()));

    // SIGTERM: a clean exit (the data plane, once attached, stays pinned).
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.0.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let start = Instant::now();
    let code = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "agent did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "{code:?}");
    // `status` and `services` still work with the agent gone; the maps were not flushed.
    let out = agent(&["status", "--state-dir", state_dir.to_str().unwrap(), "--pin-dir", "/nonexistent"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("services:  3"), "{text}");
    let out = agent(&["services", "--output", "json", "--pin-dir", &pin_dir]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 15, "{rows:#}");

    // Only `cleanup` removes what the agent leaves behind.
    let out = agent(&["cleanup", "--output", "json", "--pin-dir", &pin_dir, "--node-file", node_file.to_str().unwrap(), "--state-dir", state_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let removed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Every pinned map, the pin directory, the node file, the CNI readiness file and status.json.
    assert_eq!(removed["removed"].as_array().unwrap().len(), dataplane_agent::loader::PINNED_MAPS.len() + 1 + 3, "{removed:#}");
    assert!(!pins.path().exists() && !node_file.exists() && !state_dir.join("status.json").exists());
    assert!(!tmp.0.join("ready").exists(), "cleanup removes the CNI readiness file");
    let again = agent(&["--cleanup", "--pin-dir", &pin_dir, "--node-file", node_file.to_str().unwrap(), "--state-dir", state_dir.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to remove"), "cleanup is idempotent, also spelled --cleanup as in kube-proxy");
}

#[test]
fn a_failed_apply_is_retried_without_a_source_change() {
    let tmp = TempDir::new();
    let manifests = tmp.0.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    copy_golden("coredns", &manifests);
    // The node file's parent is a regular file: writing it fails until the blocker goes.
    let blocker = tmp.0.join("blocker");
    std::fs::write(&blocker, "").unwrap();
    let node_file = blocker.join("node.json");
    let port = free_port();
    let _agent = Agent(
        Command::new(BIN)
            .args(["run", "--no-maps", "--manifests", manifests.to_str().unwrap(), "--node-name", "node-a"])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--state-dir", tmp.0.join("state").to_str().unwrap()])
            .args(["--node-file", node_file.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the failed apply in /status", || {
        get(port, "/status").is_some_and(|(_, b)| b.contains("writing the CNI node file"))
    });
    std::fs::remove_file(&blocker).unwrap();
    wait_for("the node file after a retry", || node_file.exists());
    wait_for("the error cleared", || get(port, "/status").is_some_and(|(_, b)| b.contains("\"last_error\": null")));
}

#[test]
fn services_without_pins_explains() {
    let out = agent(&["services", "--pin-dir", "/nonexistent/dpt-pins"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("opening the service maps pinned under /nonexistent/dpt-pins"), "{stderr}");
}

#[test]
fn status_without_a_status_file_says_so() {
    let tmp = TempDir::new();
    let out = agent(&["status", "--state-dir", tmp.0.to_str().unwrap(), "--pin-dir", "/nonexistent"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("no status at"));
    std::fs::write(tmp.0.join("status.json"), "{oops").unwrap();
    let out = agent(&["status", "--state-dir", tmp.0.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a status file"));
}

#[test]
fn doctor_passes_on_this_host_and_reports_a_missing_uplink() {
    if !dataplane_tests::require_kernel() {
        return;
    }
    let out = agent(&["doctor", "--output", "json"]);
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = checks.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["kernel", "btf", "bpffs", "cgroup2", "load"]);
    assert!(out.status.success(), "{checks:#}");

    let out = agent(&["doctor", "--skip-load", "--uplink", "dpt-no-such-if"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FAIL uplink") && text.contains("hint: pass the node's uplink interface"), "{text}");
}
