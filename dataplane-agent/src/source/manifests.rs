//! Standalone source: Kubernetes YAML (or JSON) files in a directory, several documents per file,
//! `kind: List` accepted (what `kubectl get -o yaml` writes). Re-read when a file changes; a file
//! that does not parse is reported and the last good state is kept, as a whole: a half-applied
//! directory could drop Services whose objects sit in the broken file.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::{Publisher, SourceState};
use crate::model::ClusterObjects;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading manifest directory {dir}")]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid YAML")]
    Yaml {
        path: PathBuf,
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    #[error("{path}: document {index} has no `kind`")]
    MissingKind { path: PathBuf, index: usize },
    #[error("{path}: document {index} ({kind} {name:?}) does not match the {kind} schema")]
    Schema {
        path: PathBuf,
        index: usize,
        kind: String,
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file directly in `dir`, in name order.
/// Kinds other than Service, EndpointSlice and Node are ignored (a directory may hold a whole app).
pub fn load_dir(dir: &Path) -> Result<ClusterObjects, ManifestError> {
    DirCache::default().load(dir)
}

/// Size, mtime and inode: what tells a file changed without reading it (an editor that writes a
/// new file and renames it over the old one changes the inode).
type Stamp = (u64, Option<SystemTime>, u64);

fn stamp(path: &Path) -> Result<Stamp, ManifestError> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).map_err(|source| ManifestError::ReadFile { path: path.to_path_buf(), source })?;
    Ok((md.len(), md.modified().ok(), md.ino()))
}

/// The parsed objects of each file, so a change re-parses only the files that changed (parsing
/// dominates: a 1.2 MB file of 1,000 Services takes ~0.4 s).
#[derive(Debug, Default)]
pub struct DirCache {
    files: BTreeMap<PathBuf, (Stamp, Arc<ClusterObjects>)>,
}

impl DirCache {
    /// The whole directory's objects. On error the cache is unchanged, so the next call retries.
    pub fn load(&mut self, dir: &Path) -> Result<ClusterObjects, ManifestError> {
        let mut listing = Vec::new();
        for path in manifest_files(dir)? {
            let st = stamp(&path)?;
            let cached = self.files.get(&path).filter(|(old, _)| *old == st).map(|(_, objects)| objects.clone());
            listing.push((path, st, cached));
        }
        let stale: Vec<&Path> = listing.iter().filter(|(_, _, c)| c.is_none()).map(|(p, _, _)| p.as_path()).collect();
        let mut parsed = parse_files(&stale).into_iter();
        let mut files = BTreeMap::new();
        for (path, st, cached) in listing {
            let objects = match cached {
                Some(objects) => objects,
                // In name order, so the error reported is the first broken file's.
                None => parsed.next().expect("one result per stale file")?,
            };
            files.insert(path, (st, objects));
        }
        self.files = files;
        let mut all = ClusterObjects::default();
        for (_, objects) in self.files.values() {
            all.services.extend(objects.services.iter().cloned());
            all.endpoint_slices.extend(objects.endpoint_slices.iter().cloned());
            all.nodes.extend(objects.nodes.iter().cloned());
        }
        Ok(all)
    }
}

/// Reads and parses `paths`, spread over the available cores: at start-up every file is new, and
/// YAML parsing is the bulk of the start-up time (~0.4 s per 1.2 MB file). Results in input order.
fn parse_files(paths: &[&Path]) -> Vec<Result<Arc<ClusterObjects>, ManifestError>> {
    let parse = |path: &Path| -> Result<Arc<ClusterObjects>, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::ReadFile { path: path.to_path_buf(), source })?;
        let mut objects = ClusterObjects::default();
        add_documents(path, &text, &mut objects)?;
        Ok(Arc::new(objects))
    };
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(paths.len());
    if workers <= 1 {
        return paths.iter().map(|p| parse(p)).collect();
    }
    let mut results: Vec<Option<Result<Arc<ClusterObjects>, ManifestError>>> = (0..paths.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let parse = &parse;
                // Worker w takes files w, w + workers, ...: sizes in a directory are similar enough.
                scope.spawn(move || paths.iter().enumerate().skip(w).step_by(workers).map(|(i, p)| (i, parse(p))).collect::<Vec<_>>())
            })
            .collect();
        for h in handles {
            // A panic in a parser is a bug; re-raise it here rather than report a half-read directory.
            for (i, r) in h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)) {
                results[i] = Some(r);
            }
        }
    });
    results.into_iter().map(|r| r.expect("every file parsed by one worker")).collect()
}

fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let read_err = |source| ManifestError::ReadDir { dir: dir.to_path_buf(), source };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        // Editors' swap and backup files have other extensions and are skipped.
        if matches!(ext, "yaml" | "yml" | "json") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// serde-saphyr's default budget (1,024 documents, 250,000 nodes per file) guards against hostile
/// input; manifests are the operator's own, and one `kubectl get -o yaml` dump of a large cluster
/// (10k Services with their slices) exceeds it. Raised, still bounded: anchors/aliases keep their
/// defaults (the "billion laughs" guard) and scalar text stays capped at 64 MiB per file.
fn parse_options() -> serde_saphyr::Options {
    // Both types are non-exhaustive: start from the defaults and raise the three limits.
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = 1 << 20;
    budget.max_nodes = 1 << 26;
    budget.max_events = 1 << 28;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// Parses one file's documents into `objects`.
pub fn add_documents(path: &Path, text: &str, objects: &mut ClusterObjects) -> Result<(), ManifestError> {
    let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(text, parse_options())
        .map_err(|e| ManifestError::Yaml { path: path.to_path_buf(), source: Box::new(e) })?;
    let mut index = 0;
    for doc in docs {
        index += 1;
        if doc.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        let items = if doc.get("kind").and_then(Value::as_str) == Some("List") {
            doc.get("items").and_then(Value::as_array).cloned().unwrap_or_default()
        } else {
            vec![doc]
        };
        for item in items {
            add_object(path, index, item, objects)?;
        }
    }
    Ok(())
}

fn add_object(path: &Path, index: usize, doc: Value, objects: &mut ClusterObjects) -> Result<(), ManifestError> {
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .ok_or(ManifestError::MissingKind { path: path.to_path_buf(), index })?
        .to_string();
    let name = doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string();
    let schema = |source| ManifestError::Schema { path: path.to_path_buf(), index, kind: kind.clone(), name: name.clone(), source };
    match kind.as_str() {
        "Service" => objects.services.push(Arc::new(serde_json::from_value(doc).map_err(schema)?)),
        "EndpointSlice" => objects.endpoint_slices.push(Arc::new(serde_json::from_value(doc).map_err(schema)?)),
        "Node" => objects.nodes.push(Arc::new(serde_json::from_value(doc).map_err(schema)?)),
        _ => {}
    }
    Ok(())
}

fn fingerprint(dir: &Path) -> Result<Vec<(PathBuf, Stamp)>, ManifestError> {
    manifest_files(dir)?.into_iter().map(|p| Ok((p.clone(), stamp(&p)?))).collect()
}

/// Polls `dir` every `interval` and publishes a new snapshot whenever its content changed.
/// Polling (rather than inotify) also works on the bind mounts and ConfigMap volumes where the
/// files are swapped by symlink, and costs a few `stat` calls per interval.
pub async fn run(dir: PathBuf, interval: Duration, tx: Publisher) {
    let mut last_fp = None;
    let mut cache = DirCache::default();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // An unchanged listing (or the same listing error, e.g. the directory is gone) means
        // nothing new to read or report.
        let fp = fingerprint(&dir).map_err(|e| e.to_string());
        if last_fp.as_ref() == Some(&fp) {
            continue;
        }
        let result = cache.load(&dir);
        publish(&tx, result);
        last_fp = Some(fp);
        if tx.is_closed() {
            return;
        }
    }
}

/// Applies one read attempt to the published state: success replaces the objects, failure only
/// records the error so the data plane keeps the last good state.
pub fn publish(tx: &Publisher, result: Result<ClusterObjects, ManifestError>) {
    tx.send_modify(|state: &mut SourceState| match result {
        Ok(objects) => {
            state.objects = Some(Arc::new(objects));
            state.last_error = None;
        }
        Err(e) => {
            let msg = crate::errors::error_chain(&e);
            tracing::warn!(error = %msg, "manifests not applied; keeping the last good state");
            state.last_error = Some(msg);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: 10.96.0.1\n  ports:\n  - port: 80\n---\n")
    }

    /// Several new files are parsed on several threads; the result keeps name order, and the
    /// error reported is the first broken file's whichever worker found it.
    #[test]
    fn parallel_parse_keeps_name_order_and_reports_the_first_broken_file() {
        let dir = std::env::temp_dir().join(format!("dpt-{}-manifests-par", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..6 {
            std::fs::write(dir.join(format!("f{i}.yaml")), service(&format!("s{i}"))).unwrap();
        }
        let names = |o: &ClusterObjects| o.services.iter().map(|s| s.metadata.name.clone().unwrap()).collect::<Vec<_>>();
        let mut cache = DirCache::default();
        assert_eq!(names(&cache.load(&dir).unwrap()), ["s0", "s1", "s2", "s3", "s4", "s5"]);
        std::fs::write(dir.join("f1.yaml"), "kind: [").unwrap();
        std::fs::write(dir.join("f4.yaml"), "kind: [").unwrap();
        std::fs::write(dir.join("f2.yaml"), service("s2b")).unwrap();
        let err = cache.load(&dir).unwrap_err();
        assert!(matches!(&err, ManifestError::Yaml { path, .. } if path.ends_with("f1.yaml")), "{err}");
        // The cache kept the last good state, so fixing the files gives the new content.
        std::fs::write(dir.join("f1.yaml"), service("s1")).unwrap();
        std::fs::write(dir.join("f4.yaml"), service("s4")).unwrap();
        assert_eq!(names(&cache.load(&dir).unwrap()), ["s0", "s1", "s2b", "s3", "s4", "s5"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
