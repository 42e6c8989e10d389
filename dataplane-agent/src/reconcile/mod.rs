//! The one owner of the service map handles: diffs the desired state against what the maps hold
//! and writes the difference in make-before-break order:
//! backends -> rev-NAT -> frontend entries (each written slots-first by `LbMaps`) -> removals of
//! frontends -> unused rev-NAT and backends. A frontend is therefore never visible with a slot
//! that points at a backend not yet written, and nothing in use is deleted.
//!
//! Ids (service, backend, rev-NAT) are adopted from the maps at start-up, so an agent restarted
//! against pinned maps rewrites nothing that did not change and established flows keep their
//! conntrack entries (which store the rev-NAT id).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddrV4;

use dataplane_common::lb::SERVICE_STATS_MAX;

use crate::maps::MapsError;
use crate::maps::stats::StatsMaps;
use crate::maps::lb::{BackendSpec, Frontend, LbMaps, Proto, Scope, ServiceSpec};

pub mod plan;

pub use plan::{Plan, PlannedBackend, PlannedEntry, Planner, plan};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{what}")]
    Map {
        what: String,
        // Boxed: aya's MapError is large and this error travels through every apply step.
        #[source]
        source: Box<MapsError>,
    },
    #[error("out of {what} ids (all {max} in use)")]
    IdsExhausted { what: &'static str, max: u32 },
}

fn map_err(what: impl Into<String>) -> impl FnOnce(MapsError) -> ReconcileError {
    let what = what.into();
    move |source| ReconcileError::Map { what, source: Box::new(source) }
}

/// Smallest-free id allocation in `1..max`, with a moving hint so that a run of allocations does
/// not rescan from 1 each time.
#[derive(Debug)]
struct Ids {
    what: &'static str,
    max: u32,
    used: BTreeSet<u32>,
    hint: u32,
}

impl Ids {
    fn new(what: &'static str, max: u32) -> Self {
        Ids { what, max, used: BTreeSet::new(), hint: 1 }
    }

    fn take(&mut self) -> Result<u32, ReconcileError> {
        let span = self.max - 1;
        for i in 0..span {
            let id = 1 + (self.hint - 1 + i) % span;
            if self.used.insert(id) {
                self.hint = id;
                return Ok(id);
            }
        }
        Err(ReconcileError::IdsExhausted { what: self.what, max: span })
    }

    fn adopt(&mut self, id: u32) {
        self.used.insert(id);
    }

    fn release(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// What one `apply` wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub backends_written: usize,
    pub backends_removed: usize,
    pub frontends_written: usize,
    pub frontends_removed: usize,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// The maps and a mirror of what they hold (`entries`, `backends`, `rev_nat`): read from the
/// maps when created (adoption) and by `readopt` (after a relist), then kept by every write, so
/// a diff never reads the maps back.
pub struct Reconciler {
    lb: LbMaps,
    entries: BTreeMap<Frontend, ServiceSpec>,
    backends: BTreeMap<SocketAddrV4, (u32, BackendSpec)>,
    /// Backend id -> address, and how many frontend entries refer to each id: what tells, after
    /// an incremental apply, which backends nothing uses any more.
    backend_addrs: HashMap<u32, SocketAddrV4>,
    refs: HashMap<u32, u32>,
    rev_nat: BTreeMap<(SocketAddrV4, Proto), u32>,
    svc_ids: Ids,
    backend_ids: Ids,
    rev_nat_ids: Ids,
    stats: Option<StatsMaps>,
}

impl Reconciler {
    /// Takes ownership of the maps and adopts what they hold.
    pub fn new(lb: LbMaps) -> Result<Self, ReconcileError> {
        let mut r = Reconciler {
            lb,
            entries: BTreeMap::new(),
            backends: BTreeMap::new(),
            backend_addrs: HashMap::new(),
            refs: HashMap::new(),
            rev_nat: BTreeMap::new(),
            svc_ids: Ids::new("service", u32::MAX),
            backend_ids: Ids::new("backend", dataplane_common::lb::BACKENDS_MAX + 1),
            rev_nat_ids: Ids::new("rev-NAT", SERVICE_STATS_MAX),
            stats: None,
        };
        r.readopt()?;
        Ok(r)
    }

    /// Also zero a rev-NAT id's per-Service counters when the id is given to a new frontend
    /// (without them, a reused id's series would carry over the old frontend's counts).
    pub fn with_counters(mut self, stats: StatsMaps) -> Self {
        self.stats = Some(stats);
        self
    }

    /// Rebuilds the mirror from the maps (at start, and after a relist: whatever happened to the
    /// maps meanwhile, the next full `apply` diffs against what they really hold).
    pub fn readopt(&mut self) -> Result<(), ReconcileError> {
        self.entries.clear();
        self.backends.clear();
        self.backend_addrs.clear();
        self.refs.clear();
        self.rev_nat.clear();
        self.svc_ids = Ids::new("service", u32::MAX);
        self.backend_ids = Ids::new("backend", dataplane_common::lb::BACKENDS_MAX + 1);
        self.rev_nat_ids = Ids::new("rev-NAT", SERVICE_STATS_MAX);
        let mut duplicate_backends = Vec::new();
        for id in self.lb.backend_ids().map_err(map_err("listing backends"))? {
            let Some(spec) = self.lb.backend(id).map_err(map_err(format!("reading backend {id}")))? else { continue };
            self.backend_ids.adopt(id);
            self.backend_addrs.insert(id, spec.addr);
            match self.backends.get(&spec.addr) {
                // Two ids for one address (a crash between writes): keep the first, drop the other
                // once no entry uses it.
                Some(_) => duplicate_backends.push(id),
                None => {
                    self.backends.insert(spec.addr, (id, spec));
                }
            }
        }
        for fe in self.lb.frontends().map_err(map_err("listing frontends"))? {
            let Some(spec) = self.lb.service(&fe).map_err(map_err(format!("reading frontend {fe:?}")))? else { continue };
            self.svc_ids.adopt(spec.svc_id);
            self.rev_nat_ids.adopt(spec.rev_nat_id);
            self.rev_nat.insert((fe.addr, fe.proto), spec.rev_nat_id);
            self.set_entry(fe, spec);
        }
        // Ids of duplicate backends still referenced stay adopted; unreferenced ones go at the next apply.
        for id in duplicate_backends {
            if !self.refs.contains_key(&id) {
                self.lb.remove_backend(id).map_err(map_err(format!("removing duplicate backend {id}")))?;
                self.backend_ids.release(id);
                self.backend_addrs.remove(&id);
            }
        }
        Ok(())
    }

    pub fn frontend_count(&self) -> usize {
        self.entries.len()
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Records `spec` for `fe` in the mirror (after it was written), keeping the reference counts.
    fn set_entry(&mut self, fe: Frontend, spec: ServiceSpec) -> Option<ServiceSpec> {
        for id in spec.active.iter().chain(&spec.terminating) {
            *self.refs.entry(*id).or_default() += 1;
        }
        let old = self.entries.insert(fe, spec);
        if let Some(old) = &old {
            self.unref(old);
        }
        old
    }

    fn unref(&mut self, old: &ServiceSpec) {
        for id in old.active.iter().chain(&old.terminating) {
            if let Some(n) = self.refs.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(id);
                }
            }
        }
    }

    /// Makes the maps hold exactly `plan`. On error the maps hold a consistent mix of old and new
    /// (every step is make-before-break) and the next `apply` continues from there.
    pub fn apply(&mut self, plan: &Plan) -> Result<Changes, ReconcileError> {
        let mut changes = Changes::default();

        // 1. Backends: new ones and changed flags (local, terminating).
        // Collected once: at 10k Services this is a 100k-entry map, used again for step 5.
        let wanted = plan.backends();
        for b in wanted.values() {
            self.write_backend(b, &mut changes)?;
        }

        // 2 + 3. Rev-NAT entries, then the frontend entries.
        for (fe, entry) in &plan.entries {
            self.write_entry(fe, entry, &mut changes)?;
        }

        // 4. Frontends no longer wanted.
        let stale: Vec<Frontend> = self.entries.keys().filter(|fe| !plan.entries.contains_key(fe)).copied().collect();
        for fe in &stale {
            self.remove_entry(fe, &mut changes)?;
        }

        // 5. Rev-NAT and backends nothing refers to any more.
        let used_rev: BTreeSet<(SocketAddrV4, Proto)> = self.entries.keys().map(|fe| (fe.addr, fe.proto)).collect();
        let stale_rev: Vec<((SocketAddrV4, Proto), u32)> =
            self.rev_nat.iter().filter(|(k, _)| !used_rev.contains(k)).map(|(k, v)| (*k, *v)).collect();
        for (key, id) in stale_rev {
            self.remove_rev_nat(key, id)?;
        }
        let stale_be: Vec<(SocketAddrV4, u32)> =
            self.backends.iter().filter(|(a, _)| !wanted.contains_key(a)).map(|(a, (id, _))| (*a, *id)).collect();
        for (addr, id) in stale_be {
            self.remove_backend(addr, id, &mut changes)?;
        }
        Ok(changes)
    }

    /// Like `apply`, for the frontends in `touched` alone (what `Planner::update` returned): the
    /// rest of `plan` is taken to be in the maps already. Same write order; backends and rev-NAT
    /// entries are removed once no frontend entry refers to them.
    pub fn apply_touched(&mut self, plan: &Plan, touched: &BTreeSet<Frontend>) -> Result<Changes, ReconcileError> {
        let mut changes = Changes::default();
        let entries: Vec<(&Frontend, &PlannedEntry)> = touched.iter().filter_map(|fe| Some((fe, plan.entries.get(fe)?))).collect();
        let wanted: BTreeMap<SocketAddrV4, PlannedBackend> =
            entries.iter().flat_map(|(_, e)| e.active.iter().chain(&e.terminating)).map(|b| (b.addr, *b)).collect();
        for b in wanted.values() {
            self.write_backend(b, &mut changes)?;
        }
        // Backends the old entries used: removed below if nothing uses them any more.
        let mut released: BTreeSet<u32> = BTreeSet::new();
        for fe in touched {
            if let Some(old) = self.entries.get(fe) {
                released.extend(old.active.iter().chain(&old.terminating));
            }
        }
        for (fe, entry) in &entries {
            self.write_entry(fe, entry, &mut changes)?;
        }
        for fe in touched.iter().filter(|fe| !plan.entries.contains_key(fe)) {
            self.remove_entry(fe, &mut changes)?;
            // The internal and external entry of one frontend share the rev-NAT entry.
            let in_use = [Scope::External, Scope::Internal].iter().any(|&scope| self.entries.contains_key(&Frontend { scope, ..*fe }));
            if !in_use && let Some(&id) = self.rev_nat.get(&(fe.addr, fe.proto)) {
                self.remove_rev_nat((fe.addr, fe.proto), id)?;
            }
        }
        for id in released {
            if self.refs.contains_key(&id) {
                continue;
            }
            let Some(&addr) = self.backend_addrs.get(&id) else { continue };
            self.remove_backend(addr, id, &mut changes)?;
        }
        Ok(changes)
    }

    fn write_backend(&mut self, b: &PlannedBackend, changes: &mut Changes) -> Result<(), ReconcileError> {
        let spec = BackendSpec { addr: b.addr, local: b.local, terminating: b.terminating };
        let id = match self.backends.get(&b.addr) {
            Some((_, old)) if *old == spec => return Ok(()),
            Some((id, _)) => *id,
            None => self.backend_ids.take()?,
        };
        if let Err(e) = self.lb.upsert_backend(id, spec) {
            if !self.backends.contains_key(&b.addr) {
                self.backend_ids.release(id);
            }
            return Err(map_err(format!("writing backend {}", b.addr))(e));
        }
        self.backends.insert(b.addr, (id, spec));
        self.backend_addrs.insert(id, b.addr);
        changes.backends_written += 1;
        Ok(())
    }

    fn write_entry(&mut self, fe: &Frontend, entry: &PlannedEntry, changes: &mut Changes) -> Result<(), ReconcileError> {
        let rev_nat_id = match self.rev_nat.get(&(fe.addr, fe.proto)) {
            Some(id) => *id,
            None => {
                let id = self.rev_nat_ids.take()?;
                let reset = self.stats.as_mut().map_or(Ok(()), |s| s.reset_service(id));
                if let Err(e) = reset.and_then(|()| self.lb.set_rev_nat(id, fe.addr)) {
                    self.rev_nat_ids.release(id);
                    return Err(map_err(format!("writing rev-NAT for {}", fe.addr))(e));
                }
                self.rev_nat.insert((fe.addr, fe.proto), id);
                id
            }
        };
        let ids = |set: &[PlannedBackend]| set.iter().map(|b| self.backends[&b.addr].0).collect::<Vec<u32>>();
        let (svc_id, new_id) = match self.entries.get(fe) {
            Some(old) => (old.svc_id, false),
            None => (self.svc_ids.take()?, true),
        };
        let spec = ServiceSpec {
            svc_id,
            kind: entry.kind,
            flags: entry.flags,
            affinity_timeout_s: entry.affinity_timeout_s,
            rev_nat_id,
            active: ids(&entry.active),
            terminating: ids(&entry.terminating),
        };
        if self.entries.get(fe) == Some(&spec) {
            return Ok(());
        }
        if let Err(e) = self.lb.upsert_service(fe, &spec) {
            if new_id {
                self.svc_ids.release(svc_id);
            }
            return Err(map_err(format!("writing frontend {} {:?} ({})", fe.addr, fe.proto, entry.service))(e));
        }
        self.set_entry(*fe, spec);
        changes.frontends_written += 1;
        Ok(())
    }

    fn remove_entry(&mut self, fe: &Frontend, changes: &mut Changes) -> Result<(), ReconcileError> {
        if !self.entries.contains_key(fe) {
            return Ok(());
        }
        self.lb.remove_service(fe).map_err(map_err(format!("removing frontend {} {:?}", fe.addr, fe.proto)))?;
        let spec = self.entries.remove(fe).expect("checked above");
        self.unref(&spec);
        self.svc_ids.release(spec.svc_id);
        changes.frontends_removed += 1;
        Ok(())
    }

    fn remove_rev_nat(&mut self, key: (SocketAddrV4, Proto), id: u32) -> Result<(), ReconcileError> {
        self.lb.remove_rev_nat(id).map_err(map_err(format!("removing rev-NAT {id}")))?;
        self.rev_nat.remove(&key);
        self.rev_nat_ids.release(id);
        Ok(())
    }

    fn remove_backend(&mut self, addr: SocketAddrV4, id: u32, changes: &mut Changes) -> Result<(), ReconcileError> {
        self.lb.remove_backend(id).map_err(map_err(format!("removing backend {addr}")))?;
        self.backends.remove(&addr);
        self.backend_addrs.remove(&id);
        self.backend_ids.release(id);
        changes.backends_removed += 1;
        Ok(())
    }
}

/// One row of `dataplane-agent services`: a frontend entry as the maps hold it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableRow {
    pub frontend: String,
    pub protocol: String,
    pub scope: String,
    pub kind: String,
    pub flags: u8,
    pub affinity_timeout_s: u32,
    pub rev_nat_id: u32,
    pub backends: Vec<String>,
    pub terminating_backends: Vec<String>,
}

/// The frontend -> backends table, read from the maps alone (works on the pins while the agent is down).
pub fn table(lb: &LbMaps) -> Result<Vec<TableRow>, ReconcileError> {
    let mut rows = Vec::new();
    for fe in lb.frontends().map_err(map_err("listing frontends"))? {
        let Some(spec) = lb.service(&fe).map_err(map_err(format!("reading frontend {fe:?}")))? else { continue };
        let resolve = |ids: &[u32]| -> Result<Vec<String>, ReconcileError> {
            ids.iter()
                .map(|id| {
                    let b = lb.backend(*id).map_err(map_err(format!("reading backend {id}")))?;
                    Ok(match b {
                        Some(b) => format!("{}{}", b.addr, if b.local { " (local)" } else { "" }),
                        None => format!("<missing backend {id}>"),
                    })
                })
                .collect()
        };
        rows.push(TableRow {
            frontend: fe.addr.to_string(),
            protocol: format!("{:?}", fe.proto).to_uppercase(),
            scope: format!("{:?}", fe.scope),
            kind: format!("{:?}", spec.kind),
            flags: spec.flags,
            affinity_timeout_s: spec.affinity_timeout_s,
            rev_nat_id: spec.rev_nat_id,
            backends: resolve(&spec.active)?,
            terminating_backends: resolve(&spec.terminating)?,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_reused_and_bounded() {
        let mut ids = Ids::new("x", 4); // 1..=3
        assert_eq!((ids.take().unwrap(), ids.take().unwrap(), ids.take().unwrap()), (1, 2, 3));
        assert!(matches!(ids.take(), Err(ReconcileError::IdsExhausted { what: "x", max: 3 })));
        ids.release(2);
        assert_eq!(ids.take().unwrap(), 2);
        let mut adopted = Ids::new("y", 10);
        adopted.adopt(1);
        adopted.adopt(2);
        assert_eq!(adopted.take().unwrap(), 3);
    }
}
