//! The desired state kept up to date from successive snapshots, rebuilding only the Services
//! whose objects changed. `build` (the whole cluster at once) stays the reference: a
//! `ModelCache` fed any sequence of snapshots holds what `build` gives for the last one (tests).
//!
//! Changes are found by identity first: the sources hand out the same `Arc` for an object that
//! did not change (the manifests cache per document, the kube reflector store per object), so a
//! snapshot is compared by pointer, and only objects with a new pointer are compared by value
//! (a relist re-fetches every object: equal ones are not rebuilt).
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::endpoints::SliceIndex;
use super::{ClusterObjects, DesiredState, LABEL_SERVICE_NAME, ModelConfig, ServiceError, ServiceName, is_ours, node, service};

/// What one `update` changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changed {
    /// Services whose desired state was rebuilt (added, changed or removed); the state may be
    /// equal to the old one (e.g. a slice change that touched no ready endpoint).
    pub services: BTreeSet<ServiceName>,
    /// The Node set changed (routes, the CNI node file).
    pub nodes: bool,
}

/// Objects of one kind by key, with the pointer index that makes an unchanged snapshot cheap.
#[derive(Debug)]
struct Objects<K, T> {
    by_key: HashMap<K, Arc<T>>,
    /// `Arc` address -> key, for the objects in `by_key` (which keeps them alive, so an address
    /// cannot be reused by a new object while it is listed here).
    by_ptr: HashMap<usize, K>,
}

impl<K, T> Default for Objects<K, T> {
    fn default() -> Self {
        Objects { by_key: HashMap::new(), by_ptr: HashMap::new() }
    }
}

/// One object added (old `None`), changed, or removed (new `None`): (key, old, new).
type Change<K, T> = (K, Option<Arc<T>>, Option<Arc<T>>);

/// A slice's (namespace, name).
type SliceKey = (String, String);

fn addr<T>(a: &Arc<T>) -> usize {
    Arc::as_ptr(a) as usize
}

impl<K: Clone + Eq + std::hash::Hash, T: PartialEq> Objects<K, T> {
    /// Replaces the set with `new`; returns (key, old, new) for every object added, changed or
    /// removed. Objects keyed the same twice in `new`: the last wins, as in `build`.
    fn update(&mut self, new: &[Arc<T>], key_of: impl Fn(&T) -> K) -> Vec<Change<K, T>> {
        let mut seen: HashSet<usize> = HashSet::with_capacity(new.len());
        let mut candidates: Vec<(K, &Arc<T>)> = Vec::new();
        for obj in new {
            if self.by_ptr.contains_key(&addr(obj)) {
                seen.insert(addr(obj));
            } else {
                candidates.push((key_of(obj), obj));
            }
        }
        // A key twice in the snapshot (two manifests define one Service): which copy wins depends
        // on the order, which the pointer shortcut does not see; take the plain route.
        let mut keys = HashSet::with_capacity(candidates.len());
        let duplicate = candidates.iter().any(|(key, _)| {
            !keys.insert(key.clone()) || self.by_key.get(key).is_some_and(|old| seen.contains(&addr(old)))
        });
        if duplicate {
            return self.replace_all(new, key_of);
        }
        let mut out = Vec::new();
        for (key, obj) in candidates {
            let old = self.by_key.insert(key.clone(), obj.clone());
            self.by_ptr.insert(addr(obj), key.clone());
            seen.insert(addr(obj));
            if let Some(old) = &old {
                // The old object's address leaves the index before the old `Arc` may be dropped.
                self.by_ptr.remove(&addr(old));
                if **old == **obj {
                    continue;
                }
            }
            out.push((key, old, Some(obj.clone())));
        }
        // Listed before, absent now (keys replaced above already left `by_ptr`).
        let gone: Vec<usize> = self.by_ptr.keys().filter(|p| !seen.contains(p)).copied().collect();
        for p in gone {
            let key = self.by_ptr.remove(&p).expect("listed above");
            if let Some(old) = self.by_key.remove(&key) {
                out.push((key, Some(old), None));
            }
        }
        out
    }

    /// `update` without the pointer shortcut: every object keyed, the last of a key wins.
    fn replace_all(&mut self, new: &[Arc<T>], key_of: impl Fn(&T) -> K) -> Vec<Change<K, T>> {
        let mut by_key: HashMap<K, Arc<T>> = HashMap::with_capacity(new.len());
        for obj in new {
            by_key.insert(key_of(obj), obj.clone());
        }
        let mut out = Vec::new();
        for (key, obj) in &by_key {
            match self.by_key.get(key) {
                Some(old) if Arc::ptr_eq(old, obj) || **old == **obj => {}
                old => out.push((key.clone(), old.cloned(), Some(obj.clone()))),
            }
        }
        for (key, old) in &self.by_key {
            if !by_key.contains_key(key) {
                out.push((key.clone(), Some(old.clone()), None));
            }
        }
        self.by_ptr = by_key.iter().map(|(k, o)| (addr(o), k.clone())).collect();
        self.by_key = by_key;
        out
    }
}

fn service_key(s: &Service) -> ServiceName {
    ServiceName {
        namespace: s.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        name: s.metadata.name.clone().unwrap_or_default(),
    }
}

/// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name` label).
fn slice_service(s: &EndpointSlice) -> Option<ServiceName> {
    let name = s.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    Some(ServiceName { namespace: s.metadata.namespace.clone().unwrap_or_else(|| "default".into()), name: name.clone() })
}

fn slice_key(s: &EndpointSlice) -> SliceKey {
    (s.metadata.namespace.clone().unwrap_or_else(|| "default".into()), s.metadata.name.clone().unwrap_or_default())
}

/// The desired state and what it was computed from.
#[derive(Debug)]
pub struct ModelCache {
    config: ModelConfig,
    services: Objects<ServiceName, Service>,
    slices: Objects<SliceKey, EndpointSlice>,
    nodes: Objects<String, Node>,
    /// The slices of each Service, in slice key order (a Vec: most Services have one slice).
    slices_of: HashMap<ServiceName, Vec<(SliceKey, Arc<EndpointSlice>)>>,
    /// What Services are built against: this node's zone and NodePort addresses.
    context: (Option<String>, Vec<std::net::IpAddr>),
    /// Warnings and errors per Service; `state.errors` is their sorted union.
    errors: BTreeMap<ServiceName, Vec<ServiceError>>,
    state: DesiredState,
}

impl ModelCache {
    pub fn new(config: ModelConfig) -> Self {
        ModelCache {
            config,
            services: Objects::default(),
            slices: Objects::default(),
            nodes: Objects::default(),
            slices_of: HashMap::new(),
            context: (None, Vec::new()),
            errors: BTreeMap::new(),
            state: DesiredState::default(),
        }
    }

    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// Brings the state in line with `objects`, rebuilding what changed.
    pub fn update(&mut self, objects: &ClusterObjects) -> Changed {
        let mut changed = Changed::default();
        let mut dirty: BTreeSet<ServiceName> = BTreeSet::new();

        for (key, _, _) in self.services.update(&objects.services, service_key) {
            dirty.insert(key);
        }
        for (key, old, new) in self.slices.update(&objects.endpoint_slices, slice_key) {
            if let Some(svc) = old.as_deref().and_then(slice_service) {
                let list = self.slices_of.entry(svc.clone()).or_default();
                list.retain(|(k, _)| *k != key);
                if list.is_empty() {
                    self.slices_of.remove(&svc);
                }
                dirty.insert(svc);
            }
            if let Some(new) = new
                && let Some(svc) = slice_service(&new)
            {
                let list = self.slices_of.entry(svc.clone()).or_default();
                match list.binary_search_by(|(k, _)| k.cmp(&key)) {
                    Ok(i) => list[i].1 = new,
                    Err(i) => list.insert(i, (key, new)),
                }
                dirty.insert(svc);
            }
        }
        if !self.nodes.update(&objects.nodes, |n| n.metadata.name.clone().unwrap_or_default()).is_empty() {
            changed.nodes = true;
            // Same order as `build` sees them, so duplicates resolve the same way.
            self.state.nodes = node::nodes(&objects.nodes);
        }
        let context = self.context();
        if context != self.context {
            // This node's zone or NodePort addresses: topology hints and NodePort frontends of
            // every Service depend on them.
            self.context = context;
            dirty.extend(self.services.by_key.keys().cloned());
            dirty.extend(self.state.services.keys().cloned());
        }

        for name in &dirty {
            self.rebuild(name);
        }
        if !dirty.is_empty() {
            let mut errors: Vec<ServiceError> = self.errors.values().flatten().cloned().collect();
            errors.sort_by_key(ToString::to_string);
            self.state.errors = errors;
        }
        changed.services = dirty;
        changed
    }

    fn context(&self) -> (Option<String>, Vec<std::net::IpAddr>) {
        let this_node = self.config.node_name.as_deref().and_then(|n| self.state.nodes.get(n));
        let addresses = match &self.config.node_port_addresses {
            Some(addrs) => addrs.clone(),
            None => this_node.map(|n| n.addresses.clone()).unwrap_or_default(),
        };
        (this_node.and_then(|n| n.zone.clone()), addresses)
    }

    fn rebuild(&mut self, name: &ServiceName) {
        self.state.services.remove(name);
        self.errors.remove(name);
        let Some(svc) = self.services.by_key.get(name) else { return };
        if !is_ours(svc.metadata.labels.as_ref(), self.config.service_proxy_name.as_deref()) {
            return;
        }
        let slices: Vec<Arc<EndpointSlice>> = self.slices_of.get(name).into_iter().flatten().map(|(_, s)| s.clone()).collect();
        let index = SliceIndex::new(&slices, self.config.service_proxy_name.as_deref());
        let ctx = service::Context {
            node_name: self.config.node_name.as_deref(),
            zone: self.context.0.as_deref(),
            node_port_addresses: self.context.1.clone(),
        };
        match service::build(name, svc, &index, &ctx) {
            Ok((built, warnings)) => {
                if !warnings.is_empty() {
                    self.errors.insert(name.clone(), warnings);
                }
                self.state.services.insert(name.clone(), built);
            }
            Err(e) => {
                self.errors.insert(name.clone(), vec![e]);
            }
        }
    }
}
