//! What the `echo-server` clients print, parsed; and helpers to summarise many replies.
use std::{collections::BTreeMap, net::SocketAddr};

use serde_json::Value;

/// One request's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Answered by Pod `pod`, which saw the client as `client`.
    Ok { pod: String, client: SocketAddr },
    /// Failed: `kind` is `refused`, `timeout`, `reset`, `unreachable`, `wrong-source`, `bad-reply` or `other`.
    Err { kind: String, detail: String },
}

impl Reply {
    pub fn parse(line: &str) -> Reply {
        let bad = |detail: String| Reply::Err { kind: "bad-reply".into(), detail };
        let Ok(v) = serde_json::from_str::<Value>(line) else { return bad(line.to_owned()) };
        match (v["pod"].as_str(), v["client"].as_str().and_then(|c| c.parse().ok())) {
            (Some(pod), Some(client)) => Reply::Ok { pod: pod.to_owned(), client },
            _ => Reply::Err {
                kind: v["error"].as_str().unwrap_or("bad-reply").to_owned(),
                detail: v["detail"].as_str().map_or_else(|| line.to_owned(), str::to_owned),
            },
        }
    }

    pub fn pod(&self) -> Option<&str> {
        match self {
            Reply::Ok { pod, .. } => Some(pod),
            Reply::Err { .. } => None,
        }
    }

    /// The client address the server saw.
    pub fn client(&self) -> Option<SocketAddr> {
        match self {
            Reply::Ok { client, .. } => Some(*client),
            Reply::Err { .. } => None,
        }
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, Reply::Ok { .. })
    }

    pub fn error_kind(&self) -> Option<&str> {
        match self {
            Reply::Err { kind, .. } => Some(kind),
            Reply::Ok { .. } => None,
        }
    }
}

pub fn parse_lines(stdout: &str) -> Vec<Reply> {
    stdout.lines().filter(|l| !l.trim().is_empty()).map(Reply::parse).collect()
}

/// Replies per answering Pod, and the failures by kind (`!<kind>`), sorted by name.
pub fn tally(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in replies {
        let key = match r {
            Reply::Ok { pod, .. } => pod.clone(),
            Reply::Err { kind, .. } => format!("!{kind}"),
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

/// One long-lived connection's end report from `echo-server hold`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub pod: String,
    pub asked: u64,
    /// The first failure (kind and detail), if the connection broke or was re-routed.
    pub failed: Option<String>,
}

pub fn parse_held(stdout: &str) -> Vec<Held> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("asked").is_some())
        .map(|v| Held {
            pod: v["backend"]["pod"].as_str().unwrap_or("?").to_owned(),
            asked: v["asked"].as_u64().unwrap_or(0),
            failed: (!v["failed"].is_null()).then(|| v["failed"].to_string()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_answers_and_errors() {
        let out = r#"{"pod":"web-0","client":"10.244.1.2:4000"}
{"error":"refused","detail":"Connection refused (os error 111)"}
not json
"#;
        let r = parse_lines(out);
        assert_eq!(r[0], Reply::Ok { pod: "web-0".into(), client: "10.244.1.2:4000".parse().unwrap() });
        assert_eq!(r[1].error_kind(), Some("refused"));
        assert_eq!(r[2].error_kind(), Some("bad-reply"));
        let t = tally(&r);
        assert_eq!(t["web-0"], 1);
        assert_eq!(t["!refused"], 1);
    }

    #[test]
    fn parses_held_connections() {
        let out = r#"{"connected":2}
{"backend":{"pod":"a","client":"1.2.3.4:5"},"asked":10,"failed":null}
{"backend":{"pod":"b","client":"1.2.3.4:6"},"asked":3,"failed":{"error":"reset","detail":"x"}}
"#;
        let h = parse_held(out);
        assert_eq!(h.len(), 2);
        assert_eq!(h[0], Held { pod: "a".into(), asked: 10, failed: None });
        assert!(h[1].failed.as_deref().unwrap().contains("reset"));
    }
}
