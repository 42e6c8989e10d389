//! Facts about the host the agent runs on: kernel release, mounts (bpffs, cgroup v2).
use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`: where, and which filesystem type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fs_type: String,
}

/// Parses mountinfo text (proc(5)): field 5 is the mount point; the filesystem type follows the
/// ` - ` separator, after a variable number of optional fields. Octal escapes (`\040` for a
/// space) in mount points are decoded.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            let fs_type = post.split(' ').next()?;
            Some(Mount { mount_point: PathBuf::from(unescape(mount_point)), fs_type: fs_type.to_string() })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push(u8::from_str_radix(&s[i + 1..i + 4], 8).map(char::from).unwrap_or('?'));
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

pub fn mounts() -> std::io::Result<Vec<Mount>> {
    Ok(parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The cgroup v2 hierarchy's mount point: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones. The first cgroup2 mount wins.
pub fn find_cgroup2(mounts: &[Mount]) -> Option<&Path> {
    mounts.iter().find(|m| m.fs_type == "cgroup2").map(|m| m.mount_point.as_path())
}

/// The bpffs mount that contains `path` (longest matching mount point), if any.
pub fn bpffs_containing<'m>(mounts: &'m [Mount], path: &Path) -> Option<&'m Path> {
    mounts
        .iter()
        .filter(|m| m.fs_type == "bpf" && path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
        .map(|m| m.mount_point.as_path())
}

/// `(major, minor)` from a release string such as `6.18.0-1-amd64`.
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 22 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
40 22 0:33 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:16 - bpf bpf rw,mode=700
41 22 0:34 / /sys/fs/bpf/dp\\040x rw,relatime - bpf bpf rw
";

    #[test]
    fn finds_cgroup2_and_bpffs() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 5);
        assert_eq!(find_cgroup2(&m), Some(Path::new("/sys/fs/cgroup/unified")));
        assert_eq!(bpffs_containing(&m, Path::new("/sys/fs/bpf/dataplane")), Some(Path::new("/sys/fs/bpf")));
        assert_eq!(bpffs_containing(&m, Path::new("/sys/fs/bpf/dp x/maps")), Some(Path::new("/sys/fs/bpf/dp x")));
        assert_eq!(bpffs_containing(&m, Path::new("/run/dataplane")), None);
        assert_eq!(find_cgroup2(&parse_mountinfo("garbage line\n")), None);
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.15.167.4-microsoft-standard-WSL2"), Some((5, 15)));
        assert_eq!(parse_kernel_version("weird"), None);
    }
}
