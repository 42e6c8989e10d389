//! One YAML (or JSON) document -> typed Kubernetes objects, without a generic value tree.
//!
//! A file is split into its documents at the `---` marker lines, so that a change re-parses only
//! the documents whose text changed (a 2.6 MB file of 1,000 Services is ~2,000 documents; an
//! endpoint flip changes one). Each document is deserialized straight into the k8s-openapi type
//! its `kind` names: the visitor reads keys up to `kind` (buffering the few that come first,
//! usually only `apiVersion`) and hands the rest of the same map to the typed deserializer.
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, forward_to_deserialize_any};
use serde_json::Value;

use super::trim;

/// An object the agent reads; other kinds are skipped.
#[derive(Debug, Clone)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Node(Arc<Node>),
}

/// One document's objects: none (empty document, another kind), one, or a `kind: List`'s items.
#[derive(Debug, Default)]
pub struct Doc(pub Vec<Object>);

/// A document's text in a file, with the line it starts on (1-based) for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocText<'a> {
    pub line: usize,
    pub text: &'a str,
}

/// Whether `line` is a document marker (`---` alone or followed by a space/tab and content).
/// Inside a block scalar or a multi-line flow scalar a line starting with `---` at column 0 is
/// not allowed by YAML (it ends the document), so splitting here never cuts a document in two.
fn is_marker(line: &str) -> bool {
    let line = line.trim_end_matches(['\r', '\n']);
    line == "---" || line.starts_with("--- ") || line.starts_with("---\t")
}

/// Blank lines, comments and directives (`%YAML`): text that belongs to the next document.
fn is_preamble(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#') || t.starts_with('%')
}

/// Splits `text` at its document markers; each part keeps its own marker line. A leading part
/// with only comments, blank lines or directives stays with the first document.
pub fn split(text: &str) -> Vec<DocText<'_>> {
    let mut docs = Vec::new();
    let (mut start, mut start_line) = (0, 1);
    let mut preamble = true;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if is_marker(line) {
            if !preamble {
                docs.push(DocText { line: start_line, text: &text[start..offset] });
                (start, start_line) = (offset, i + 1);
            }
            preamble = false;
        } else if preamble && !is_preamble(line) {
            preamble = false;
        }
        offset += line.len();
    }
    if start < text.len() || docs.is_empty() {
        docs.push(DocText { line: start_line, text: &text[start..] });
    }
    docs
}

impl<'de> Deserialize<'de> for Doc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DocVisitor)
    }
}

struct DocVisitor;

/// The error the visitor gives for a document without `kind`; the caller recognises it by
/// re-reading the document (slow path, errors only), never by this text.
const NO_KIND: &str = "document has no `kind`";

impl<'de> Visitor<'de> for DocVisitor {
    type Value = Doc;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a Kubernetes object (a mapping with `kind`)")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Doc, E> {
        Ok(Doc::default()) // an empty document, e.g. between two `---`
    }

    fn visit_none<E: de::Error>(self) -> Result<Doc, E> {
        Ok(Doc::default())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Doc, A::Error> {
        // Keys before `kind` are kept (as values) and replayed to the typed deserializer.
        let mut before: Vec<(String, Value)> = Vec::new();
        let kind = loop {
            let Some(key) = map.next_key::<String>()? else { return Err(de::Error::custom(NO_KIND)) };
            if key == "kind" {
                break map.next_value::<String>()?;
            }
            let value = map.next_value::<Value>()?;
            before.push((key, value));
        };
        let replay = |before: Vec<(String, Value)>, map| Replay { before: before.into_iter(), kind: Some(kind.clone()), value: None, rest: map };
        let object = match kind.as_str() {
            "Service" => Object::Service(Arc::new(trimmed(Service::deserialize(replay(before, map))?, trim::service))),
            "EndpointSlice" => {
                Object::EndpointSlice(Arc::new(trimmed(EndpointSlice::deserialize(replay(before, map))?, trim::endpoint_slice)))
            }
            "Node" => Object::Node(Arc::new(trimmed(Node::deserialize(replay(before, map))?, trim::node))),
            "List" => {
                let mut items = Vec::new();
                // `items` may come before `kind` (then it is among the buffered keys) or after.
                if let Some((_, v)) = before.into_iter().find(|(k, _)| k == "items") {
                    let list = Vec::<Doc>::deserialize(v).map_err(de::Error::custom)?;
                    items.extend(list.into_iter().flat_map(|d| d.0));
                }
                while let Some(key) = map.next_key::<String>()? {
                    if key == "items" {
                        items.extend(map.next_value::<Vec<Doc>>()?.into_iter().flat_map(|d| d.0));
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                return Ok(Doc(items));
            }
            _ => {
                // A whole app may sit in the directory; other kinds are read past, not kept.
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                return Ok(Doc::default());
            }
        };
        Ok(Doc(vec![object]))
    }
}

fn trimmed<T>(mut object: T, trim: fn(&mut T)) -> T {
    trim(&mut object);
    object
}

/// The document's map again, as a deserializer: the buffered keys, `kind`, then the rest.
struct Replay<A> {
    before: std::vec::IntoIter<(String, Value)>,
    kind: Option<String>,
    value: Option<Value>,
    rest: A,
}

impl<'de, A: MapAccess<'de>> Deserializer<'de> for Replay<A> {
    type Error = A::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, A::Error> {
        visitor.visit_map(self)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Replay<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        let (key, value) = match self.before.next() {
            Some(kv) => kv,
            None => match self.kind.take() {
                Some(kind) => ("kind".to_string(), Value::String(kind)),
                None => return self.rest.next_key_seed(seed),
            },
        };
        self.value = Some(value);
        seed.deserialize(Value::String(key)).map(Some).map_err(de::Error::custom)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        match self.value.take() {
            Some(v) => seed.deserialize(v).map_err(de::Error::custom),
            None => self.rest.next_value_seed(seed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(text: &str) -> Vec<(usize, &str)> {
        split(text).into_iter().map(|d| (d.line, d.text)).collect()
    }

    #[test]
    fn split_keeps_markers_with_their_document_and_the_preamble_with_the_first() {
        assert_eq!(parts("a: 1\n"), [(1, "a: 1\n")]);
        assert_eq!(parts(""), [(1, "")]);
        assert_eq!(parts("a: 1\n---\nb: 2\n"), [(1, "a: 1\n"), (2, "---\nb: 2\n")]);
        assert_eq!(parts("# c\n%YAML 1.2\n---\na: 1\n--- \nb: 2"), [(1, "# c\n%YAML 1.2\n---\na: 1\n"), (5, "--- \nb: 2")]);
        assert_eq!(parts("---\na: |\n  ---\n  x\n----\n"), [(1, "---\na: |\n  ---\n  x\n----\n")], "indented or longer is no marker");
        assert_eq!(parts("a: 1\n---\n"), [(1, "a: 1\n"), (2, "---\n")]);
    }

    fn doc(text: &str) -> Result<Vec<Object>, serde_norway::Error> {
        serde_norway::from_str::<Doc>(text).map(|d| d.0)
    }

    #[test]
    fn typed_objects_in_any_key_order() {
        let first = doc("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1}\n").unwrap();
        let later = doc("metadata: {name: a}\nspec: {clusterIP: 10.96.0.1}\napiVersion: v1\nkind: Service\n").unwrap();
        for objs in [first, later] {
            let [Object::Service(s)] = objs.as_slice() else { panic!("{objs:?}") };
            assert_eq!(s.metadata.name.as_deref(), Some("a"));
            assert_eq!(s.spec.as_ref().unwrap().cluster_ip.as_deref(), Some("10.96.0.1"));
        }
        let node = doc("{\"kind\": \"Node\", \"apiVersion\": \"v1\", \"metadata\": {\"name\": \"n\"}}").unwrap();
        assert!(matches!(node.as_slice(), [Object::Node(n)] if n.metadata.name.as_deref() == Some("n")));
    }

    #[test]
    fn lists_other_kinds_and_empty_documents() {
        let list = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Service, metadata: {name: a}}\n\
                    - {apiVersion: apps/v1, kind: Deployment, metadata: {name: d}}\n\
                    - {apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, addressType: IPv4, endpoints: [], metadata: {name: e}}\n";
        let objs = doc(list).unwrap();
        assert!(matches!(objs.as_slice(), [Object::Service(_), Object::EndpointSlice(_)]), "{objs:?}");
        let items_first = doc("items: [{kind: Node, metadata: {name: n}}]\nkind: List\n").unwrap();
        assert!(matches!(items_first.as_slice(), [Object::Node(_)]));
        assert!(doc("apiVersion: apps/v1\nkind: Deployment\nspec: {replicas: 3}\n").unwrap().is_empty());
        assert!(doc("").unwrap().is_empty());
        assert!(doc("---\n# only a comment\n").unwrap().is_empty());
    }

    #[test]
    fn wrong_shapes_are_errors() {
        assert!(doc("apiVersion: v1\nmetadata: {name: x}\n").is_err(), "no kind");
        assert!(doc("- a\n- b\n").is_err(), "not a mapping");
        assert!(doc("apiVersion: v2\nkind: Service\n").is_err(), "a Service of another apiVersion");
        assert!(doc("kind: Service\nspec: {ports: 80}\n").is_err(), "schema");
    }
}
