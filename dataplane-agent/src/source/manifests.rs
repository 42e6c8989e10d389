//! Standalone source: Kubernetes YAML (or JSON) files in a directory, several documents per file,
//! `kind: List` accepted (what `kubectl get -o yaml` writes). Re-read when a file changes; a file
//! that does not parse is reported and the last good state is kept, as a whole: a half-applied
//! directory could drop Services whose objects sit in the broken file.
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::documents::{self, Doc, DocText, Object};
use super::filter::Filter;
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
    #[error("{path}: document {index} (line {line}) is not valid YAML")]
    Yaml {
        path: PathBuf,
        index: usize,
        line: usize,
        #[source]
        source: Box<serde_norway::Error>,
    },
    #[error("{path}: document {index} has no `kind` (line {line})")]
    MissingKind { path: PathBuf, index: usize, line: usize },
    #[error("{path}: document {index} ({kind} {name:?}) does not match the {kind} schema (line {line})")]
    Schema {
        path: PathBuf,
        index: usize,
        line: usize,
        kind: String,
        name: String,
        #[source]
        source: Box<serde_norway::Error>,
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

/// A document's identity for the cache: a hash of its text and its length. The text itself is
/// not kept (it would double the memory the objects take).
type DocKey = (u64, usize);

fn doc_key(text: &str) -> DocKey {
    let mut h = std::hash::DefaultHasher::new();
    text.hash(&mut h);
    (h.finish(), text.len())
}

/// One file as last read: its stamp and its documents' objects, in order.
#[derive(Debug, Clone)]
struct CachedFile {
    stamp: Stamp,
    docs: Vec<(DocKey, Arc<[Object]>)>,
}

/// The parsed objects of each document of each file. A changed file is read again, but only its
/// changed documents are parsed (parsing dominates: ~2,000 documents per 2.6 MB file), and the
/// objects of unchanged documents are the same `Arc`s as before, which is what lets the model
/// see which objects changed without comparing them.
#[derive(Debug, Default)]
pub struct DirCache {
    files: BTreeMap<PathBuf, CachedFile>,
}

impl DirCache {
    /// The whole directory's objects. On error the cache is unchanged, so the next call retries.
    pub fn load(&mut self, dir: &Path) -> Result<ClusterObjects, ManifestError> {
        let mut files = BTreeMap::new();
        for path in manifest_files(dir)? {
            let st = stamp(&path)?;
            let old = self.files.get(&path);
            let file = match old {
                Some(f) if f.stamp == st => CachedFile { stamp: st, docs: f.docs.clone() },
                // One file at a time: its text is dropped before the next is read, and a broken
                // file stops the load (the first broken file in name order is the one reported).
                _ => read_file(&path, st, old)?,
            };
            files.insert(path, file);
        }
        self.files = files;
        let mut all = ClusterObjects::default();
        for object in self.files.values().flat_map(|f| &f.docs).flat_map(|(_, objs)| objs.iter()) {
            match object {
                Object::Service(s) => all.services.push(s.clone()),
                Object::EndpointSlice(s) => all.endpoint_slices.push(s.clone()),
                Object::Node(n) => all.nodes.push(n.clone()),
            }
        }
        Ok(all)
    }
}

/// Reads `path` and parses the documents that `old` (its last good version) does not have.
fn read_file(path: &Path, stamp: Stamp, old: Option<&CachedFile>) -> Result<CachedFile, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::ReadFile { path: path.to_path_buf(), source })?;
    let known: HashMap<DocKey, &Arc<[Object]>> = old.into_iter().flat_map(|f| f.docs.iter().map(|(k, o)| (*k, o))).collect();
    let docs: Vec<(DocKey, DocText<'_>)> = documents::split(&text).into_iter().map(|d| (doc_key(d.text), d)).collect();
    let new: Vec<(usize, DocText<'_>)> =
        docs.iter().enumerate().filter(|(_, (key, _))| !known.contains_key(key)).map(|(i, (_, d))| (i, *d)).collect();
    let mut parsed = parse_parallel(path, &new).into_iter();
    let mut out = Vec::with_capacity(docs.len());
    for (key, _) in &docs {
        let objects = match known.get(key) {
            Some(objects) => Arc::clone(objects),
            // In document order, so the error reported is the first broken document's.
            None => parsed.next().expect("one result per new document")?,
        };
        out.push((*key, objects));
    }
    Ok(CachedFile { stamp, docs: out })
}

/// Parses `docs` (index in the file, text) on the available cores (at start-up every document
/// of every file is new, and parsing is most of the start-up time); results in input order.
fn parse_parallel(path: &Path, docs: &[(usize, DocText<'_>)]) -> Vec<Result<Arc<[Object]>, ManifestError>> {
    let parse = |(i, doc): &(usize, DocText<'_>)| parse_doc(path, i + 1, *doc);
    // Below a few hundred documents a thread costs more than it saves.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(docs.len() / 256 + 1);
    if workers <= 1 {
        return docs.iter().map(parse).collect();
    }
    let chunk = docs.len().div_ceil(workers);
    std::thread::scope(|scope| {
        let handles: Vec<_> = docs.chunks(chunk).map(|part| scope.spawn(move || part.iter().map(parse).collect::<Vec<_>>())).collect();
        // A panic in a parser is a bug; re-raise it here rather than report a half-read directory.
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })
}

/// One document -> its objects. On failure the document is read again as a generic tree, only to
/// say what is wrong: not YAML at all, no `kind`, or not the schema of its kind.
fn parse_doc(path: &Path, index: usize, doc: DocText<'_>) -> Result<Arc<[Object]>, ManifestError> {
    let typed_err = match serde_norway::from_str::<Doc>(doc.text) {
        Ok(d) => return Ok(d.0.into()),
        Err(e) => e,
    };
    let (path, line) = (path.to_path_buf(), doc.line);
    let value = match serde_norway::from_str::<Value>(doc.text) {
        Ok(v) => v,
        Err(source) => return Err(ManifestError::Yaml { path, index, line, source: Box::new(source) }),
    };
    let Some(kind) = value.get("kind").and_then(Value::as_str) else {
        return Err(ManifestError::MissingKind { path, index, line });
    };
    let name = value.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string();
    Err(ManifestError::Schema { path, index, line, kind: kind.to_string(), name, source: Box::new(typed_err) })
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

/// Parses one file's documents into `objects` (tests and tools; the agent uses `DirCache`).
pub fn add_documents(path: &Path, text: &str, objects: &mut ClusterObjects) -> Result<(), ManifestError> {
    for (i, doc) in documents::split(text).into_iter().enumerate() {
        for object in parse_doc(path, i + 1, doc)?.iter() {
            match object {
                Object::Service(s) => objects.services.push(s.clone()),
                Object::EndpointSlice(s) => objects.endpoint_slices.push(s.clone()),
                Object::Node(n) => objects.nodes.push(n.clone()),
            }
        }
    }
    Ok(())
}

fn fingerprint(dir: &Path) -> Result<Vec<(PathBuf, Stamp)>, ManifestError> {
    manifest_files(dir)?.into_iter().map(|p| Ok((p.clone(), stamp(&p)?))).collect()
}

/// Polls `dir` every `interval` and publishes a new snapshot, of the objects `filter` passes,
/// whenever its content changed. Polling (rather than inotify) also works on the bind mounts and
/// ConfigMap volumes where the files are swapped by symlink, and costs a few `stat` calls per interval.
pub async fn run(dir: PathBuf, interval: Duration, filter: Filter, tx: Publisher) {
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
        let started = std::time::Instant::now();
        let result = cache.load(&dir);
        tracing::debug!(ms = started.elapsed().as_secs_f64() * 1000.0, ok = result.is_ok(), "manifests read");
        publish(&tx, result.map(|objects| filter.apply(objects)));
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
            state.failing_since_unix_ms = None;
        }
        Err(e) => {
            let msg = crate::errors::error_chain(&e);
            tracing::warn!(error = %msg, "manifests not applied; keeping the last good state");
            state.last_error = Some(msg);
            state.failing_since_unix_ms.get_or_insert_with(super::now_unix_ms);
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
