//! Test support for every kernel-touching test: RAII guards for network namespaces, veth pairs,
//! cgroup v2 sub-trees and bpffs pin directories; running code inside a namespace; BPF_PROG_RUN;
//! and a packet builder/checker.
//!
//! Safety rules (../shared/DESIGN.md): nothing here ever touches an interface of the root network
//! namespace or the root cgroup. Every object gets a unique name `dpt-<pid>-<n>` and is removed on
//! drop, also when the test panics; [`sweep::sweep_leftovers`] removes what a killed run left.
pub mod bench;
pub mod bpffs;
pub mod cgroup;
pub mod cluster;
pub mod cmd;
pub mod k8s;
pub mod kube_proxy;
pub mod netns;
pub mod packet;
pub mod prog_run;
pub mod scratch;
pub mod sock_diag;
pub mod sockets;
pub mod sweep;

use std::sync::atomic::{AtomicU32, Ordering};

/// Every object the tests create starts with this; the sweep only ever removes such objects.
pub const PREFIX: &str = "dpt";

/// A name unique to this process and call: `dpt-<pid>-<n>`.
pub fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{PREFIX}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Whether this process can run kernel tests: root, and a kernel that loads BPF programs.
///
/// Kernel tests call [`require_kernel`] instead, which fails loudly rather than skipping: on the
/// machines this project targets, a missing capability is a broken environment, not a reason to pass.
pub fn kernel_available() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("kernel tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)".into());
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err("the kernel has no BTF (/sys/kernel/btf/vmlinux)".into());
    }
    Ok(())
}

/// Panics with the reason when kernel tests cannot run here, unless `DATAPLANE_SKIP_KERNEL_TESTS=1`
/// says to skip them explicitly (then it prints why and returns false).
pub fn require_kernel() -> bool {
    match kernel_available() {
        Ok(()) => true,
        Err(why) if std::env::var("DATAPLANE_SKIP_KERNEL_TESTS").as_deref() == Ok("1") => {
            eprintln!("SKIPPED (DATAPLANE_SKIP_KERNEL_TESTS=1): {why}");
            false
        }
        Err(why) => panic!("kernel tests cannot run: {why} (set DATAPLANE_SKIP_KERNEL_TESTS=1 to skip them)"),
    }
}
