//! `dataplane-agent install-cni`, run as the DaemonSet's init container runs it: installs the
//! plugin (executable) and the conflist, again over an older copy, and refuses bad input without
//! touching the node.
use std::{os::unix::fs::PermissionsExt as _, path::Path, process::Command};

const CONFLIST: &str = r#"{"cniVersion":"1.1.0","name":"dataplane","plugins":[{"type":"dataplane-cni","nodeFile":"/run/dataplane/node.json"}]}"#;

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dataplane-agent")).args(args).output().unwrap()
}

fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn installs_plugin_and_conflist_atomically_and_refuses_bad_input() {
    let tmp = std::env::temp_dir().join(format!("dp-install-cni-{}", std::process::id()));
    let (src, bin, conf) = (tmp.join("src"), tmp.join("opt-cni-bin"), tmp.join("etc-cni-net.d"));
    for d in [&src, &bin, &conf] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(src.join("dataplane-cni"), b"plugin v2").unwrap();
    std::fs::write(src.join("good.conflist"), CONFLIST).unwrap();
    std::fs::write(bin.join("dataplane-cni"), b"plugin v1").unwrap();
    let s = |p: &Path| p.display().to_string();
    let args = |conflist: &Path| {
        vec!["install-cni".to_string(), "--plugin".into(), s(&src.join("dataplane-cni")), "--bin-dir".into(), s(&bin), "--conflist".into(), s(conflist), "--conf-dir".into(), s(&conf)]
    };
    let run = |conflist: &Path| {
        let a = args(conflist);
        agent(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let out = run(&src.join("good.conflist"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(bin.join("dataplane-cni")).unwrap(), b"plugin v2", "the older plugin is replaced");
    assert_eq!(std::fs::metadata(bin.join("dataplane-cni")).unwrap().permissions().mode() & 0o777, 0o755);
    assert_eq!(std::fs::read_to_string(conf.join("10-dataplane.conflist")).unwrap(), CONFLIST);
    // No temporary file is left beside them.
    assert_eq!(listing(&bin).len(), 1);
    assert_eq!(listing(&conf).len(), 1);
    // Idempotent.
    assert!(run(&src.join("good.conflist")).status.success());

    let before = (listing(&bin), listing(&conf));
    for (name, text) in [("not-json", "{"), ("no-plugins", r#"{"cniVersion":"1.1.0","name":"x"}"#), ("no-type", r#"{"cniVersion":"1.1.0","name":"x","plugins":[{}]}"#)] {
        std::fs::write(src.join(name), text).unwrap();
        let out = run(&src.join(name));
        assert!(!out.status.success(), "{name} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is not a CNI network configuration list"), "{name}: {err}");
        assert_eq!((listing(&bin), listing(&conf)), before, "{name} changed the node");
    }
    let out = run(&src.join("missing.conflist"));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("missing.conflist"));
    assert_eq!((listing(&bin), listing(&conf)), before);
    std::fs::remove_dir_all(&tmp).unwrap();
}
