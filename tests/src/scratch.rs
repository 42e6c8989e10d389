//! Scratch directories under the system temp dir, named `dpt-<pid>-<n>` (so the sweep finds what a
//! killed run left) and removed on drop.
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn try_new() -> std::io::Result<TempDir> {
        let path = std::env::temp_dir().join(crate::unique_name());
        std::fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }

    /// Like [`TempDir::try_new`], panicking on failure (for tests).
    pub fn new() -> TempDir {
        Self::try_new().unwrap_or_else(|e| panic!("cannot create a scratch directory: {e}"))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
