//! The real Kubernetes binaries the tests, the demo and the benchmarks run (kube-apiserver, etcd,
//! kube-controller-manager, kube-proxy, kubectl), handed to every child as `DATAPLANE_K8S_BIN_DIR`.
//!
//! Where they come from, first found wins:
//! 1. `$DATAPLANE_K8S_BIN_DIR`, used as it is once all five are found there and executable;
//! 2. `../shared/k8s/bin` from the workspace root (../shared/k8s/README.md): `NAME.xz` and the
//!    `SHA256SUMS` of the unpacked files. Each is unpacked (`xz -dc`, all five at once) into
//!    `target/k8s/v1.34.9/bin` through a temporary file that is renamed into place only once its
//!    SHA-256 (`sha256sum`) matches, and is skipped when a stamp (its `SHA256SUMS` line, size and
//!    mtime) shows it is already there;
//! 3. neither: an error naming the official release archives to unpack by hand.
use std::{
    collections::BTreeMap,
    fs,
    io,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::UNIX_EPOCH,
};

use anyhow::{Context as _, bail, ensure};

use crate::util::{root, set_env, step};

pub const VERSION: &str = "v1.34.9";
/// The variable the tests read; setup sets it for every child of xtask.
pub const ENV: &str = "DATAPLANE_K8S_BIN_DIR";
pub const BINARIES: [&str; 5] = ["kube-apiserver", "etcd", "kube-controller-manager", "kube-proxy", "kubectl"];
const SERVER_ARCHIVE: &str = "https://dl.k8s.io/v1.34.9/kubernetes-server-linux-amd64.tar.gz";
const ETCD_ARCHIVE: &str =
    "https://github.com/etcd-io/etcd/releases/download/v3.6.5/etcd-v3.6.5-linux-amd64.tar.gz";
const SUMS: &str = "SHA256SUMS";

/// Finds or unpacks the binaries and exports their directory as `DATAPLANE_K8S_BIN_DIR`.
pub fn setup(did: &mut Vec<String>) -> anyhow::Result<()> {
    let dir = match std::env::var_os(ENV).filter(|v| !v.is_empty()) {
        Some(dir) => given(Path::new(&dir))?,
        None => {
            let shared = root().join("../shared/k8s/bin");
            let shared = fs::canonicalize(&shared).unwrap_or(shared);
            let dest = root().join("target/k8s").join(VERSION).join("bin");
            let n = unpack_all(&shared, &dest)?;
            if n > 0 {
                did.push(format!("unpacked {} into {} (checksums verified)", binaries(n), shown(&dest)));
            }
            dest
        }
    };
    set_env(ENV, &dir);
    Ok(())
}

/// "1 Kubernetes v1.34.9 binary", "5 Kubernetes v1.34.9 binaries".
fn binaries(n: usize) -> String {
    format!("{n} Kubernetes {VERSION} {}", if n == 1 { "binary" } else { "binaries" })
}

/// `path` relative to the workspace root when it is inside it.
fn shown(path: &Path) -> String {
    path.strip_prefix(root()).unwrap_or(path).display().to_string()
}

/// What to do when there is nothing to use.
fn fetch_hint() -> String {
    format!(
        "get the official release archives of Kubernetes {VERSION}:\n  \
         {SERVER_ARCHIVE}\n    (kube-apiserver, kube-controller-manager, kube-proxy and kubectl are under \
         kubernetes/server/bin/)\n  \
         {ETCD_ARCHIVE}\n    (etcd is under etcd-v3.6.5-linux-amd64/)\n\
         unpack those five binaries into one directory and set {ENV} to it"
    )
}

/// Source 1: a directory given by the user, checked and made absolute (the tests run in other
/// working directories).
fn given(dir: &Path) -> anyhow::Result<PathBuf> {
    let abs = fs::canonicalize(dir)
        .with_context(|| format!("{ENV}={}: cannot use that directory", dir.display()))?;
    let mut wrong = Vec::new();
    for name in BINARIES {
        match fs::metadata(abs.join(name)) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
            Ok(_) => wrong.push(format!("{name} (not an executable file)")),
            Err(_) => wrong.push(format!("{name} (missing)")),
        }
    }
    if !wrong.is_empty() {
        bail!(
            "{ENV}={} lacks Kubernetes {VERSION} binaries: {}; it must hold all of {}",
            dir.display(),
            wrong.join(", "),
            BINARIES.join(", ")
        );
    }
    Ok(abs)
}

/// Source 2: unpacks what `dest` lacks from the xz files in `shared`. Returns how many it unpacked.
fn unpack_all(shared: &Path, dest: &Path) -> anyhow::Result<usize> {
    let needed = std::iter::once(SUMS.to_string()).chain(BINARIES.iter().map(|b| format!("{b}.xz")));
    let missing: Vec<String> = needed.filter(|f| !shared.join(f).is_file()).collect();
    if !missing.is_empty() {
        let what = if shared.is_dir() {
            format!("{} lacks {}", shared.display(), missing.join(", "))
        } else {
            format!("there is no {}", shared.display())
        };
        bail!("no Kubernetes {VERSION} binaries: {ENV} is not set and {what}; {}", fetch_hint());
    }
    let sums_path = shared.join(SUMS);
    let text = fs::read_to_string(&sums_path).with_context(|| format!("reading {}", sums_path.display()))?;
    let sums = parse_sums(&text).with_context(|| format!("reading {}", sums_path.display()))?;
    fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    sweep_temporaries(dest);
    let mut todo = Vec::new();
    for name in BINARIES {
        let Some(sha) = sums.get(name) else { bail!("{} has no line for {name}", sums_path.display()) };
        if !current(dest, name, sha)? {
            todo.push((name, sha.as_str()));
        }
    }
    if todo.is_empty() {
        return Ok(0);
    }
    step(&format!("setup: unpacking {} from {}", binaries(todo.len()), shared.display()));
    // One thread (and one xz) per binary: 3 s on 2 cores instead of 5 s one after the other.
    let results: Vec<anyhow::Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = todo
            .iter()
            .map(|&(name, sha)| s.spawn(move || install(&shared.join(format!("{name}.xz")), dest, name, sha)))
            .collect();
        let joined = handles.into_iter().map(|h| h.join());
        joined.map(|r| r.unwrap_or_else(|_| Err(anyhow::anyhow!("unpacking thread panicked")))).collect()
    });
    for r in results {
        r?;
    }
    Ok(todo.len())
}

/// `SHA256SUMS` as `sha256sum` writes it: `<64 hex digits> <space or *><name>` a line. Returns
/// lower-case hex by name.
fn parse_sums(text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut sums = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        let parsed = line.split_once(' ').and_then(|(hex, rest)| {
            let name = rest.strip_prefix([' ', '*'])?;
            let ok = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) && !name.is_empty();
            ok.then(|| (name.to_string(), hex.to_ascii_lowercase()))
        });
        let Some((name, hex)) = parsed else {
            bail!("line {}: expected `<sha256 hex>  <file name>`, found {line:?}", i + 1)
        };
        if let Some(old) = sums.insert(name.clone(), hex.clone())
            && old != hex
        {
            bail!("line {}: {name} listed twice with different checksums", i + 1);
        }
    }
    Ok(sums)
}

fn stamp_path(dest: &Path, name: &str) -> PathBuf {
    dest.join(format!(".{name}.sha256"))
}

/// The stamp of an installed binary: its SHA256SUMS line, and the size and mtime it had when it was
/// verified, so that a binary replaced or rewritten since is noticed without hashing it again.
fn stamp(name: &str, sha: &str, meta: &fs::Metadata) -> String {
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).unwrap_or_default();
    format!("{sha}  {name}\n{} {}\n", meta.len(), mtime.as_nanos())
}

/// Whether `dest/name` is installed with checksum `sha`: by its stamp, or else by hashing it (and
/// then writing the stamp).
fn current(dest: &Path, name: &str, sha: &str) -> anyhow::Result<bool> {
    let bin = dest.join(name);
    let Ok(meta) = fs::metadata(&bin) else { return Ok(false) };
    if !meta.is_file() || meta.permissions().mode() & 0o777 != 0o755 {
        return Ok(false);
    }
    if fs::read_to_string(stamp_path(dest, name)).is_ok_and(|s| s == stamp(name, sha, &meta)) {
        return Ok(true);
    }
    if sha256(&bin)? != sha {
        return Ok(false);
    }
    write_stamp(dest, name, sha, &meta)?;
    Ok(true)
}

/// The SHA-256 of a file, by coreutils' `sha256sum` (about 1 s for all five binaries; a Rust hasher in
/// xtask's unoptimised dev build took 10 s of CPU).
fn sha256(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum")
        .arg("--")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("cannot run `sha256sum` (coreutils)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.split_whitespace().next().unwrap_or_default();
    ensure!(
        out.status.success() && hex.len() == 64,
        "sha256sum {} failed ({}): {}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(hex.to_ascii_lowercase())
}

fn write_stamp(dest: &Path, name: &str, sha: &str, meta: &fs::Metadata) -> anyhow::Result<()> {
    let tmp = Temporary::new(dest, &format!("{name}.sha256"));
    fs::write(&tmp.0, stamp(name, sha, meta)).with_context(|| format!("writing {}", tmp.0.display()))?;
    tmp.rename_to(&stamp_path(dest, name))
}

/// A file `dest/.NAME.tmp.PID` that is removed unless it was renamed into place.
struct Temporary(PathBuf);

impl Temporary {
    fn new(dest: &Path, name: &str) -> Self {
        Temporary(dest.join(format!(".{name}.tmp.{}", std::process::id())))
    }

    fn rename_to(self, to: &Path) -> anyhow::Result<()> {
        fs::rename(&self.0, to).with_context(|| format!("renaming {} to {}", self.0.display(), to.display()))?;
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for Temporary {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Removes temporary files left by an xtask that was killed while unpacking (its pid is gone).
fn sweep_temporaries(dest: &Path) {
    let Ok(entries) = fs::read_dir(dest) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((_, pid)) = name.to_str().and_then(|n| n.strip_prefix('.')?.rsplit_once(".tmp.")) else {
            continue;
        };
        if pid.parse::<u32>().is_ok_and(|pid| !Path::new("/proc").join(pid.to_string()).exists()) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Unpacks `xz` into `dest/name` (mode 755) if its SHA-256 is `sha`. xz writes a temporary file in
/// `dest`, which is hashed and synced before it is renamed into place: a failed, truncated or corrupt
/// unpack leaves `dest/name` as it was (or absent) and no temporary file.
fn install(xz: &Path, dest: &Path, name: &str, sha: &str) -> anyhow::Result<()> {
    let tmp = Temporary::new(dest, name);
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp.0)
        .with_context(|| format!("creating {}", tmp.0.display()))?;
    let out = Command::new("xz")
        .args(["-d", "-c", "--"])
        .arg(xz)
        .stdin(Stdio::null())
        .stdout(file.try_clone().with_context(|| format!("opening {}", tmp.0.display()))?)
        .stderr(Stdio::piped())
        .output()
        .context("cannot run `xz` (Debian package xz-utils)")?;
    ensure!(
        out.status.success(),
        "xz -dc {} failed ({}): {}",
        xz.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let got = sha256(&tmp.0)?;
    ensure!(
        got == sha,
        "{}: unpacked {name} has SHA-256 {got}, but SHA256SUMS says {sha}; not installing it",
        xz.display()
    );
    // Synced before the rename, so that a crash cannot leave a renamed file whose data never landed.
    file.sync_all().with_context(|| format!("writing {}", tmp.0.display()))?;
    drop(file);
    fs::set_permissions(&tmp.0, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod 755 {}", tmp.0.display()))?;
    let bin = dest.join(name);
    match fs::remove_file(stamp_path(dest, name)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing the stamp of {}", bin.display()));
        }
        _ => {}
    }
    tmp.rename_to(&bin)?;
    let meta = fs::metadata(&bin).with_context(|| format!("reading {}", bin.display()))?;
    write_stamp(dest, name, sha, &meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test, removed when dropped.
    struct Dir(PathBuf);

    impl Dir {
        fn new(test: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("xtask-k8s-{}-{test}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("bin")).unwrap();
            Dir(dir)
        }

        /// Writes `data` xz-compressed to `name.xz` (with the xz command) and returns its path.
        fn xz(&self, name: &str, data: &[u8]) -> PathBuf {
            let plain = self.0.join(name);
            fs::write(&plain, data).unwrap();
            let status = Command::new("xz").args(["-z", "-f"]).arg(&plain).status().unwrap();
            assert!(status.success());
            self.0.join(format!("{name}.xz"))
        }

        fn bin(&self) -> PathBuf {
            self.0.join("bin")
        }

        /// Every file name in bin/, hidden ones included, sorted.
        fn listing(&self) -> Vec<String> {
            let mut names: Vec<String> =
                fs::read_dir(self.bin()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            names.sort();
            names
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// The SHA-256 of `data`, through the same `sha256()` as the code under test, checked once
    /// against a known value in `hashes_like_sha256sum`.
    fn sha(data: &[u8]) -> String {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let f = std::env::temp_dir().join(format!("xtask-k8s-{}-sha-{n}", std::process::id()));
        fs::write(&f, data).unwrap();
        let sum = sha256(&f).unwrap();
        fs::remove_file(&f).unwrap();
        sum
    }

    #[test]
    fn hashes_like_sha256sum() {
        assert_eq!(sha(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(sha(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    const A: &str = "85c3a40fc962610ec3e0b55db8efcfe701fa7368f5a4f7c09b6ab6dc5554db1d";
    const B: &str = "F2144E8877016D07ADF1668D8CF001CBA241E68D16A660FB09D28510D1EA17FE";

    #[test]
    fn parses_sha256sum_output() {
        let text = format!("{A}  etcd\n\n{B} *kube-apiserver\r\n{A}  dir/with space\n{A}  etcd\n");
        let sums = parse_sums(&text).unwrap();
        assert_eq!(sums.len(), 3);
        assert_eq!(sums["etcd"], A);
        assert_eq!(sums["kube-apiserver"], B.to_ascii_lowercase());
        assert_eq!(sums["dir/with space"], A);
        assert!(parse_sums("").unwrap().is_empty());
    }

    #[test]
    fn refuses_malformed_sums() {
        for bad in [
            format!("{A}etcd"),
            format!("{A} etcd"),
            format!("{}  etcd", &A[..63]),
            format!("{}g  etcd", &A[..63]),
            format!("{A}  "),
            "etcd".to_string(),
            format!("{A}  etcd\n{}  etcd", &B.to_ascii_lowercase()),
        ] {
            assert!(parse_sums(&bad).is_err(), "accepted {bad:?}");
        }
        let err = parse_sums(&format!("{A}  etcd\nnonsense")).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn installs_verified_binary_and_then_skips_it() {
        let dir = Dir::new("install");
        let data = b"#!/bin/sh\necho fake kube-apiserver\n".repeat(1000);
        let xz = dir.xz("kube-apiserver", &data);
        let sum = sha(&data);
        assert!(!current(&dir.bin(), "kube-apiserver", &sum).unwrap());
        install(&xz, &dir.bin(), "kube-apiserver", &sum).unwrap();
        let bin = dir.bin().join("kube-apiserver");
        assert_eq!(fs::read(&bin).unwrap(), data);
        assert_eq!(fs::metadata(&bin).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(dir.listing(), [".kube-apiserver.sha256", "kube-apiserver"]);
        // The stamp says it is there; without the stamp, hashing says so and writes the stamp again.
        assert!(current(&dir.bin(), "kube-apiserver", &sum).unwrap());
        fs::remove_file(stamp_path(&dir.bin(), "kube-apiserver")).unwrap();
        assert!(current(&dir.bin(), "kube-apiserver", &sum).unwrap());
        assert_eq!(dir.listing(), [".kube-apiserver.sha256", "kube-apiserver"]);
        // Another expected checksum (a new SHA256SUMS) means it must be unpacked again.
        assert!(!current(&dir.bin(), "kube-apiserver", &sha(b"other")).unwrap());
    }

    #[test]
    fn notices_a_rewritten_binary() {
        let dir = Dir::new("rewritten");
        let data = b"the real binary".to_vec();
        let sum = sha(&data);
        install(&dir.xz("kubectl", &data), &dir.bin(), "kubectl", &sum).unwrap();
        let bin = dir.bin().join("kubectl");
        fs::write(&bin, b"the real binarx").unwrap(); // same size, new mtime and content
        assert!(!current(&dir.bin(), "kubectl", &sum).unwrap());
        install(&dir.xz("kubectl", &data), &dir.bin(), "kubectl", &sum).unwrap();
        assert_eq!(fs::read(&bin).unwrap(), data);
        assert!(current(&dir.bin(), "kubectl", &sum).unwrap());
    }

    #[test]
    fn refuses_wrong_checksum_and_leaves_nothing() {
        let dir = Dir::new("corrupt");
        let xz = dir.xz("etcd", b"not the etcd SHA256SUMS names");
        let err = install(&xz, &dir.bin(), "etcd", &sha(b"the real etcd")).unwrap_err().to_string();
        assert!(err.contains("SHA-256"), "{err}");
        assert!(dir.listing().is_empty(), "{:?}", dir.listing());
    }

    #[test]
    fn refuses_truncated_xz_and_keeps_the_old_binary() {
        let dir = Dir::new("truncated");
        let old = b"old kube-proxy".to_vec();
        install(&dir.xz("kube-proxy", &old), &dir.bin(), "kube-proxy", &sha(&old)).unwrap();
        // Incompressible data, so that half the .xz holds a good part of it.
        let mut data = Vec::new();
        let mut x: u64 = 1;
        for _ in 0..200_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            data.push((x >> 56) as u8);
        }
        let xz = dir.xz("kube-proxy", &data);
        let full = fs::read(&xz).unwrap();
        fs::write(&xz, &full[..full.len() / 2]).unwrap();
        let err = install(&xz, &dir.bin(), "kube-proxy", &sha(&data)).unwrap_err().to_string();
        assert!(err.contains("xz -dc"), "{err}");
        assert_eq!(fs::read(dir.bin().join("kube-proxy")).unwrap(), old);
        assert_eq!(dir.listing(), [".kube-proxy.sha256", "kube-proxy"]);
        assert!(current(&dir.bin(), "kube-proxy", &sha(&old)).unwrap());
    }

    #[test]
    fn sweeps_temporaries_of_dead_processes_only() {
        let dir = Dir::new("sweep");
        let dead = dir.bin().join(".etcd.tmp.4194304"); // above pid_max's limit: never a live pid
        let live = dir.bin().join(format!(".etcd.tmp.{}", std::process::id()));
        let other = dir.bin().join("etcd");
        for f in [&dead, &live, &other] {
            fs::write(f, b"x").unwrap();
        }
        sweep_temporaries(&dir.bin());
        assert_eq!(dir.listing(), [format!(".etcd.tmp.{}", std::process::id()), "etcd".to_string()]);
    }

    #[test]
    fn given_directory_must_hold_all_five_executables() {
        let dir = Dir::new("given");
        for name in BINARIES {
            let f = dir.bin().join(name);
            fs::write(&f, b"#!/bin/sh\n").unwrap();
            fs::set_permissions(&f, fs::Permissions::from_mode(0o755)).unwrap();
        }
        assert_eq!(given(&dir.bin()).unwrap(), fs::canonicalize(dir.bin()).unwrap());
        fs::remove_file(dir.bin().join("etcd")).unwrap();
        fs::set_permissions(dir.bin().join("kubectl"), fs::Permissions::from_mode(0o644)).unwrap();
        let err = given(&dir.bin()).unwrap_err().to_string();
        assert!(err.contains("etcd (missing)") && err.contains("kubectl (not an executable file)"), "{err}");
        assert!(!err.contains("kube-proxy ("), "{err}");
        assert!(given(&dir.0.join("nope")).is_err());
    }

    #[test]
    fn without_a_source_names_the_release_archives() {
        let dir = Dir::new("nosource");
        let err = format!("{:#}", unpack_all(&dir.0.join("absent"), &dir.bin()).unwrap_err());
        assert!(err.contains(SERVER_ARCHIVE) && err.contains(ETCD_ARCHIVE) && err.contains(ENV), "{err}");
        fs::create_dir(dir.0.join("partial")).unwrap();
        fs::write(dir.0.join("partial/SHA256SUMS"), "").unwrap();
        let err = format!("{:#}", unpack_all(&dir.0.join("partial"), &dir.bin()).unwrap_err());
        assert!(err.contains("lacks kube-apiserver.xz, etcd.xz"), "{err}");
    }
}
