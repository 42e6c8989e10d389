//! `dpt-control-plane DIR`: starts a real control plane (etcd, kube-apiserver,
//! kube-controller-manager) for a whole test run, writes `DIR/cp.json` when it is ready, and tears
//! everything down when its standard input closes (its parent, `cargo xtask test` or a test
//! process, exited or closed the pipe). Tests find it through `DATAPLANE_TEST_CONTROL_PLANE=DIR`.
use std::{io::Read as _, path::PathBuf, process::ExitCode};

use dataplane_tests::k8s::{ControlPlane, Options, write_access};

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: dpt-control-plane DIR");
        return ExitCode::from(2);
    };
    let cp = match ControlPlane::start(Options::default()) {
        Ok(cp) => cp,
        Err(e) => {
            eprintln!("dpt-control-plane: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = write_access(&dir, &cp.access) {
        eprintln!("dpt-control-plane: {e}");
        return ExitCode::FAILURE;
    }
    // Blocks until the parent closes the pipe (or exits); then `cp` drops and cleans up.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(cp);
    let _ = std::fs::remove_file(dir.join(dataplane_tests::k8s::ACCESS_FILE));
    ExitCode::SUCCESS
}
