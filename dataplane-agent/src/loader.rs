//! Loading the embedded eBPF object.
use std::path::Path;

use aya::{Ebpf, EbpfError, EbpfLoader};

/// The eBPF object built by `build.rs` (package `dataplane-ebpf`, bin `dataplane`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane"));

/// Program names in the object, as the attach code and `status` refer to them.
pub mod programs {
    pub const XDP_INGRESS: &str = "dp_xdp_ingress";
    pub const TC_INGRESS: &str = "dp_tc_ingress";
    pub const TC_EGRESS: &str = "dp_tc_egress";
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the eBPF object (pin directory {pin_dir:?}) failed")]
    Load {
        pin_dir: Option<std::path::PathBuf>,
        #[source]
        source: EbpfError,
    },
}

/// Loads the object into the kernel. Maps declared as pinned are pinned under (and re-used from)
/// `pin_dir` when given; the programs are verified but not attached.
pub fn load(pin_dir: Option<&Path>) -> Result<Ebpf, LoadError> {
    let mut loader = EbpfLoader::new();
    if let Some(dir) = pin_dir {
        loader.default_map_pin_directory(dir);
    }
    loader.load(EBPF_OBJECT).map_err(|source| LoadError::Load {
        pin_dir: pin_dir.map(Path::to_path_buf),
        source,
    })
}
