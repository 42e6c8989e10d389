//! `install-cni`: puts the CNI plugin binary and its network configuration on the node, as the
//! DaemonSet's init container. Each file is written beside its destination and renamed over it,
//! so a container runtime never sees a half-written plugin or config; the config is checked first,
//! so a bad one changes nothing on the node.
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a CNI network configuration list: {why}")]
    BadConflist { path: PathBuf, why: String },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What was installed where.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Installed {
    pub plugin: PathBuf,
    pub conflist: PathBuf,
    /// The conflist's network name and plugin types, as the runtime will read them.
    pub network: String,
    pub plugins: Vec<String>,
}

/// Checks `text` as a conflist (CNI spec 1.x): a `cniVersion`, a `name`, and a non-empty
/// `plugins` list whose entries each name a `type`. Returns the name and the types.
pub fn check_conflist(text: &str) -> Result<(String, Vec<String>), String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).filter(|s| !s.is_empty());
    field("cniVersion").ok_or("no cniVersion")?;
    let name = field("name").ok_or("no network name")?.to_owned();
    let plugins = v.get("plugins").and_then(|p| p.as_array()).filter(|p| !p.is_empty()).ok_or("no plugins list")?;
    let types = plugins
        .iter()
        .enumerate()
        .map(|(i, p)| p.get("type").and_then(|t| t.as_str()).filter(|t| !t.is_empty()).map(str::to_owned).ok_or(format!("plugins[{i}] has no type")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name, types))
}

/// Writes `bytes` as `dir/name` with `mode`: into `.name.new` in the same directory, synced,
/// then renamed over the old file.
fn put(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<PathBuf, InstallError> {
    let dest = dir.join(name);
    let tmp = dir.join(format!(".{name}.new"));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, &dest)
    })();
    result.map_err(|source| {
        let _ = fs::remove_file(&tmp);
        InstallError::Write { path: dest.clone(), source }
    })?;
    Ok(dest)
}

/// Installs `plugin` into `bin_dir` (named as its file name) and `conflist` into `conf_dir` as
/// `conf_name`. The conflist is checked before anything is written.
pub fn install(plugin: &Path, bin_dir: &Path, conflist: &Path, conf_dir: &Path, conf_name: &str) -> Result<Installed, InstallError> {
    let read = |p: &Path| fs::read(p).map_err(|source| InstallError::Read { path: p.to_path_buf(), source });
    let conf = read(conflist)?;
    let text = String::from_utf8(conf.clone()).map_err(|_| InstallError::BadConflist { path: conflist.to_path_buf(), why: "not UTF-8".into() })?;
    let (network, plugins) = check_conflist(&text).map_err(|why| InstallError::BadConflist { path: conflist.to_path_buf(), why })?;
    let binary = read(plugin)?;
    let name = plugin.file_name().and_then(|n| n.to_str()).unwrap_or("dataplane-cni");
    let plugin = put(bin_dir, name, &binary, 0o755)?;
    // The config goes last: a runtime that sees it must find the plugin already in place.
    let conflist = put(conf_dir, conf_name, &conf, 0o644)?;
    Ok(Installed { plugin, conflist, network, plugins })
}

#[cfg(test)]
mod tests {
    use super::check_conflist;

    #[test]
    fn conflists_are_checked() {
        let ok = r#"{"cniVersion":"1.1.0","name":"dataplane","plugins":[{"type":"dataplane-cni"},{"type":"portmap"}]}"#;
        assert_eq!(check_conflist(ok), Ok(("dataplane".into(), vec!["dataplane-cni".into(), "portmap".into()])));
        for (bad, why) in [
            ("{", "not JSON"),
            (r#"{"name":"x","plugins":[{"type":"a"}]}"#, "no cniVersion"),
            (r#"{"cniVersion":"1.1.0","plugins":[{"type":"a"}]}"#, "no network name"),
            (r#"{"cniVersion":"1.1.0","name":"x","plugins":[]}"#, "no plugins list"),
            (r#"{"cniVersion":"1.1.0","name":"x","type":"a"}"#, "no plugins list"),
            (r#"{"cniVersion":"1.1.0","name":"x","plugins":[{"type":"a"},{}]}"#, "plugins[1] has no type"),
        ] {
            let err = check_conflist(bad).unwrap_err();
            assert!(err.starts_with(why), "{bad}: {err}");
        }
    }
}
