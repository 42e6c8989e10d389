//! Which objects a source passes on: the Services (and their EndpointSlices) this proxy handles,
//! and the Nodes it routes to. The kube source sends the selectors to the API server; the
//! manifests source applies the same ones on read, so both sources agree.
use std::collections::BTreeMap;

use kube::core::{Expression, Selector, SelectorExt};

use crate::model::{ClusterObjects, LABEL_SERVICE_PROXY_NAME};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("label selector {selector:?} has an empty requirement")]
    Empty { selector: String },
    #[error("{requirement:?}: set-based requirements (in, notin) are not supported; use key=value, key!=value, key or !key")]
    SetBased { requirement: String },
    #[error("{requirement:?}: {key:?} is not a valid label key (an optional DNS subdomain prefix and '/', then at most 63 of [A-Za-z0-9._-], alphanumeric at both ends)")]
    Key { requirement: String, key: String },
    #[error("{requirement:?}: {value:?} is not a valid label value (at most 63 of [A-Za-z0-9._-], alphanumeric at both ends, or empty)")]
    Value { requirement: String, value: String },
}

/// What both sources filter on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// `--service-proxy-name`.
    pub service_proxy_name: Option<String>,
    /// `--node-selector`; empty selects every Node.
    pub nodes: Selector,
}

impl Filter {
    /// The selector for Services and EndpointSlices (the EndpointSlice controller copies a
    /// Service's labels onto its slices, so one selector fits both).
    pub fn services(&self) -> Selector {
        service_selector(self.service_proxy_name.as_deref())
    }

    /// Keeps what the selectors match (for the manifests source; the API server does this for
    /// the kube source).
    pub fn apply(&self, mut objects: ClusterObjects) -> ClusterObjects {
        let services = self.services();
        let empty = BTreeMap::new();
        objects.services.retain(|s| services.matches(s.metadata.labels.as_ref().unwrap_or(&empty)));
        objects.endpoint_slices.retain(|s| services.matches(s.metadata.labels.as_ref().unwrap_or(&empty)));
        if !self.nodes.selects_all() {
            objects.nodes.retain(|n| self.nodes.matches(n.metadata.labels.as_ref().unwrap_or(&empty)));
        }
        objects
    }
}

/// kube-proxy's rule: without a proxy name, every Service that names one is another proxy's
/// (`!service.kubernetes.io/service-proxy-name`); with one, only the Services that name it.
/// Headless Services are not filtered out (kube-proxy does): DNS needs their endpoints.
pub fn service_selector(proxy_name: Option<&str>) -> Selector {
    let label = LABEL_SERVICE_PROXY_NAME.to_string();
    Selector::from(match proxy_name {
        None => Expression::DoesNotExist(label),
        Some(name) => Expression::Equal(label, name.to_string()),
    })
}

/// Parses an equality-based label selector: comma-separated `key=value` (or `==`), `key!=value`,
/// `key`, `!key`, all of which must hold. An empty string selects everything.
pub fn parse_selector(s: &str) -> Result<Selector, SelectorError> {
    let mut selector = Selector::default();
    if s.trim().is_empty() {
        return Ok(selector);
    }
    // Before splitting: a set's own commas would cut it into pieces that mean nothing.
    if s.contains('(') || s.split([' ', ',']).any(|w| w == "in" || w == "notin") {
        return Err(SelectorError::SetBased { requirement: s.to_string() });
    }
    for raw in s.split(',') {
        let requirement = raw.trim();
        if requirement.is_empty() {
            return Err(SelectorError::Empty { selector: s.to_string() });
        }
        let expr = if let Some((k, v)) = requirement.split_once("!=") {
            Expression::NotEqual(key(requirement, k)?, value(requirement, v)?)
        } else if let Some((k, v)) = requirement.split_once("==").or_else(|| requirement.split_once('=')) {
            Expression::Equal(key(requirement, k)?, value(requirement, v)?)
        } else if let Some(k) = requirement.strip_prefix('!') {
            Expression::DoesNotExist(key(requirement, k)?)
        } else {
            Expression::Exists(key(requirement, requirement)?)
        };
        selector.extend(expr);
    }
    Ok(selector)
}

/// A label value, as `--service-proxy-name` must be one.
pub fn parse_label_value(s: &str) -> Result<String, SelectorError> {
    value(s, s)
}

fn key(requirement: &str, k: &str) -> Result<String, SelectorError> {
    let k = k.trim();
    let valid = match k.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_name(name),
        None => is_name(k),
    };
    if valid { Ok(k.to_string()) } else { Err(SelectorError::Key { requirement: requirement.to_string(), key: k.to_string() }) }
}

fn value(requirement: &str, v: &str) -> Result<String, SelectorError> {
    let v = v.trim();
    if v.is_empty() || is_name(v) {
        Ok(v.to_string())
    } else {
        Err(SelectorError::Value { requirement: requirement.to_string(), value: v.to_string() })
    }
}

/// A label name or value: at most 63 of `[A-Za-z0-9._-]`, alphanumeric first and last.
fn is_name(s: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    !s.is_empty()
        && s.len() <= 63
        && alnum(s.chars().next())
        && alnum(s.chars().last())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// RFC 1123 subdomain: dot-separated lowercase labels, at most 253 characters.
fn is_dns_subdomain(s: &str) -> bool {
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && l.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    s.len() <= 253 && s.split('.').all(label)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;

    #[test]
    fn service_selectors_are_kube_proxys() {
        assert_eq!(service_selector(None).to_string(), "!service.kubernetes.io/service-proxy-name");
        assert_eq!(service_selector(Some("dataplane")).to_string(), "service.kubernetes.io/service-proxy-name=dataplane");
        let f = Filter { service_proxy_name: Some("dp".into()), ..Default::default() };
        assert_eq!(f.services().to_string(), "service.kubernetes.io/service-proxy-name=dp");
    }

    #[test]
    fn equality_selectors_parse_and_print_back() {
        for (input, printed) in [
            ("", ""),
            ("pool=blue", "pool=blue"),
            ("pool==blue", "pool=blue"),
            (" pool = blue , !spot, zone!=a,example.com/vc", "pool=blue,!spot,zone!=a,example.com/vc"),
            ("node-role.kubernetes.io/worker=", "node-role.kubernetes.io/worker="),
        ] {
            assert_eq!(parse_selector(input).unwrap().to_string(), printed, "{input:?}");
        }
    }

    #[test]
    fn anything_else_is_refused_with_the_reason() {
        let err = |s: &str| parse_selector(s).unwrap_err();
        assert!(matches!(err("pool in (a,b)"), SelectorError::SetBased { .. }));
        assert!(matches!(err("pool notin (a)"), SelectorError::SetBased { .. }));
        assert!(matches!(err("a=b,,c"), SelectorError::Empty { .. }));
        assert!(matches!(err("a=b,"), SelectorError::Empty { .. }));
        assert!(matches!(err("-a=b"), SelectorError::Key { .. }));
        assert!(matches!(err("Ex_ample.com/a=b"), SelectorError::Key { .. }));
        assert!(matches!(err("a>1"), SelectorError::Key { .. }));
        assert!(matches!(err("a=b c"), SelectorError::Value { .. }));
        assert!(matches!(err(&format!("a={}", "x".repeat(64))), SelectorError::Value { .. }));
        assert!(parse_label_value("my proxy").is_err());
        assert_eq!(parse_label_value("dataplane").unwrap(), "dataplane");
    }

    fn object<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn names(objects: &ClusterObjects) -> (Vec<String>, Vec<String>, Vec<String>) {
        let n = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| m.name.clone().unwrap();
        (
            objects.services.iter().map(|s| n(&s.metadata)).collect(),
            objects.endpoint_slices.iter().map(|s| n(&s.metadata)).collect(),
            objects.nodes.iter().map(|s| n(&s.metadata)).collect(),
        )
    }

    #[test]
    fn filter_keeps_what_the_selectors_match() {
        let proxy = |name: &str, value: Option<&str>| {
            let labels = value.map_or(json!({}), |v| json!({LABEL_SERVICE_PROXY_NAME: v}));
            json!({"metadata": {"name": name, "namespace": "default", "labels": labels}})
        };
        let slice = |name: &str, value: Option<&str>| {
            let mut v = proxy(name, value);
            v["addressType"] = json!("IPv4");
            v["endpoints"] = json!([]);
            v
        };
        let objects = ClusterObjects {
            services: vec![object(proxy("plain", None)), object(proxy("ours", Some("dp"))), object(proxy("mesh", Some("mesh")))],
            endpoint_slices: vec![object(slice("plain-1", None)), object(slice("ours-1", Some("dp"))), object(slice("mesh-1", Some("mesh")))],
            nodes: vec![
                object(json!({"metadata": {"name": "a", "labels": {"pool": "blue"}}})),
                object(json!({"metadata": {"name": "b", "labels": {"pool": "green"}}})),
                object(json!({"metadata": {"name": "c"}})),
            ],
        };
        let all = names(&Filter::default().apply(objects.clone()));
        assert_eq!(all, (vec!["plain".into()], vec!["plain-1".into()], vec!["a".into(), "b".into(), "c".into()]));
        let f = Filter { service_proxy_name: Some("dp".into()), nodes: parse_selector("pool=blue").unwrap() };
        assert_eq!(names(&f.apply(objects.clone())), (vec!["ours".into()], vec!["ours-1".into()], vec!["a".into()]));
        let f = Filter { service_proxy_name: None, nodes: parse_selector("pool!=blue").unwrap() };
        assert_eq!(names(&f.apply(objects)).2, ["b", "c"]);
    }
}
