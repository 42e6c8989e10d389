//! The IPAM store on disk: `<dir>/<ip>` holds `<container id>\n<ifname>\n` for each allocated
//! address, `<dir>/last_reserved.<pool>` the address round-robin resumes after.
//!
//! Crash safety (host-local `disk/backend.go`): an address file is created with
//! `O_CREAT|O_EXCL`, so two writers can never both hold one address, and it is fsynced together
//! with the directory before the address is handed out, so a crash never forgets an allocation
//! that a Pod already uses (releases are not synced: see `release`). Every process holds an
//! exclusive `flock` on the directory while the store is open, which makes the allocator's
//! read-then-write sequence atomic across processes.
use std::{
    fs::{self, File, OpenOptions},
    io::{ErrorKind, Write},
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use nix::fcntl::{Flock, FlockArg};

use super::{Allocation, Store, StoreError};

const LAST_PREFIX: &str = "last_reserved.";

#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    /// The open directory, locked; dropping it unlocks.
    lock: Flock<File>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

impl FileStore {
    /// Opens (creating it if needed) the store in `dir` and waits for its exclusive lock.
    pub fn open(dir: &Path) -> Result<FileStore, StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let handle = File::open(dir).map_err(io_err(dir))?;
        let lock =
            Flock::lock(handle, FlockArg::LockExclusive).map_err(|(_, errno)| StoreError::Io {
                path: dir.to_owned(),
                source: errno.into(),
            })?;
        Ok(FileStore {
            dir: dir.to_owned(),
            lock,
        })
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        self.lock.sync_all().map_err(io_err(&self.dir))
    }

    fn last_path(&self, pool: &IpNet) -> PathBuf {
        self.dir.join(format!(
            "{LAST_PREFIX}{}",
            pool.to_string().replace('/', "_")
        ))
    }

    fn read_record(path: &Path, ip: IpAddr) -> Result<Allocation, StoreError> {
        let text = fs::read_to_string(path).map_err(io_err(path))?;
        let mut lines = text.lines();
        let container_id = lines.next().unwrap_or_default().trim().to_owned();
        let ifname = lines.next().unwrap_or_default().trim().to_owned();
        Ok(Allocation {
            ip,
            container_id,
            ifname,
        })
    }
}

impl Store for FileStore {
    fn allocations(&self) -> Result<Vec<Allocation>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            // Only files named by an address are records; temporary and bookkeeping files are not.
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<IpAddr>().ok())
            else {
                continue;
            };
            match Self::read_record(&entry.path(), ip) {
                Ok(a) => out.push(a),
                // Released by someone else between read_dir and read: cannot happen under the
                // lock, but is harmless if a human removed it.
                Err(StoreError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by_key(|a| a.ip);
        Ok(out)
    }

    fn reserve(&mut self, a: &Allocation) -> Result<bool, StoreError> {
        let path = self.dir.join(a.ip.to_string());
        let mut file = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let written = file
            .write_all(format!("{}\n{}\n", a.container_id, a.ifname).as_bytes())
            .and_then(|()| file.sync_all());
        if let Err(e) = written {
            let _ = fs::remove_file(&path);
            return Err(io_err(&path)(e));
        }
        self.sync_dir()?;
        Ok(true)
    }

    fn release(&mut self, ip: IpAddr) -> Result<(), StoreError> {
        // No fsync here: a release lost in a crash only keeps an address held, which the runtime's
        // DEL retry or GC releases again; it can never hand an address out twice. (An allocation
        // lost in a crash could, which is why `reserve` syncs.)
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn last_reserved(&self, pool: &IpNet) -> Result<Option<IpAddr>, StoreError> {
        let path = self.last_path(pool);
        match fs::read_to_string(&path) {
            // A damaged hint only costs round-robin order, never correctness: start over.
            Ok(text) => Ok(text.trim().parse().ok()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn set_last_reserved(&mut self, pool: &IpNet, ip: IpAddr) -> Result<(), StoreError> {
        // Write-then-rename so a reader never sees half a hint. It needs no fsync of its own: the
        // address file fsynced just before is what correctness rests on.
        let path = self.last_path(pool);
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, ip.to_string()).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam;

    fn tempdir() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dp-cni-store-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn records_survive_reopening_and_are_exclusive() {
        let dir = tempdir();
        let pools: [IpNet; 2] = [
            "10.1.0.0/24".parse().unwrap(),
            "fd00:1::/64".parse().unwrap(),
        ];
        {
            let mut s = FileStore::open(&dir).unwrap();
            ipam::allocate(&mut s, &pools, "c1", "eth0").unwrap();
        }
        let mut s = FileStore::open(&dir).unwrap();
        let all = s.allocations().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].container_id, "c1");
        assert_eq!(all[0].ifname, "eth0");
        assert_eq!(
            fs::read_to_string(dir.join("10.1.0.1")).unwrap(),
            "c1\neth0\n"
        );
        let dup = Allocation {
            ip: all[0].ip,
            container_id: "c2".into(),
            ifname: "eth0".into(),
        };
        assert!(!s.reserve(&dup).unwrap(), "O_EXCL refuses a held address");
        assert_eq!(
            fs::read_to_string(dir.join("10.1.0.1")).unwrap(),
            "c1\neth0\n"
        );
        // Round-robin state survives too.
        let next = ipam::allocate(&mut s, &pools, "c2", "eth0").unwrap();
        assert_eq!(next[0].to_string(), "10.1.0.2");
        ipam::release(&mut s, "c1", "eth0").unwrap();
        assert!(!dir.join("10.1.0.1").exists());
        drop(s);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lock_serialises_threads() {
        let dir = tempdir();
        let pool: IpNet = "10.2.0.0/24".parse().unwrap();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    (0..10)
                        .map(|j| {
                            let mut s = FileStore::open(&dir).unwrap();
                            ipam::allocate(&mut s, &[pool], &format!("c{i}-{j}"), "eth0").unwrap()
                                [0]
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<IpAddr> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 80, "no address handed out twice");
        fs::remove_dir_all(&dir).unwrap();
    }
}
