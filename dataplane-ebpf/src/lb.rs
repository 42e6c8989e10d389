//! Frontend lookup and backend selection, generic over the address family.
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use dataplane_common::{
    affinity::{AffinityKey, AffinityValue},
    lb::{BACKEND_ACTIVE, Backend, FrontendKey, SCOPE_EXT, SCOPE_INT, SVC_FLAG_TWO_SCOPES, Service, SlotKey},
    metrics::DropReason,
};

use crate::maps::Family;

/// The service entry for a frontend. `internal` traffic (pods, the node itself) uses the
/// internal-scope entry when the service has one (eTP/iTP Local make the two sets differ).
#[inline(always)]
pub fn lookup_service<F: Family>(addr: F::Addr, port_be: u16, proto: u8, internal: bool) -> Option<Service> {
    let key = FrontendKey { addr, port_be, proto, scope: SCOPE_EXT };
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    let svc = unsafe { *F::frontends().get(&key)? };
    if internal && svc.flags & SVC_FLAG_TWO_SCOPES != 0 {
        let key = FrontendKey { scope: SCOPE_INT, ..key };
        // SAFETY: as above.
        if let Some(int) = unsafe { F::frontends().get(&key) } {
            return Some(*int);
        }
    }
    Some(svc)
}

/// Whether the service has any endpoint to send to (ready, or serving-terminating).
#[inline(always)]
pub fn has_backends(svc: &Service) -> bool {
    svc.active as u32 + svc.terminating as u32 != 0
}

/// The backend with this id, if the id is in use (a free array entry is all zeroes).
#[inline(always)]
pub fn backend<F: Family>(id: u32) -> Option<Backend<F::Addr>> {
    F::backends().get(id).copied().filter(Backend::is_present)
}

/// Picks a backend for a new connection: the client's affinity entry while it is fresh and its
/// backend still usable, else a random ready backend, else a random serving-terminating one.
#[inline(always)]
pub fn select_backend<F: Family>(
    svc: &Service,
    client: AffinityKey<F::Addr>,
) -> Result<(u32, Backend<F::Addr>), DropReason> {
    if !has_backends(svc) {
        return Err(DropReason::NoBackend);
    }
    let affinity = svc.affinity_timeout_s != 0;
    // SAFETY: helper without arguments.
    let now = if affinity { unsafe { bpf_ktime_get_ns() } } else { 0 };
    if affinity {
        // SAFETY: copied out at once.
        if let Some(v) = unsafe { F::affinity().get(&client).copied() } {
            let fresh = now.wrapping_sub(v.last_used_ns) <= svc.affinity_timeout_s as u64 * 1_000_000_000;
            if fresh {
                if let Some(be) = backend::<F>(v.backend_id) {
                    // A terminating backend keeps its clients only while nothing is ready.
                    if be.state == BACKEND_ACTIVE || svc.active == 0 {
                        let v = AffinityValue { last_used_ns: now, ..v };
                        // Best effort: a failed refresh only shortens the affinity.
                        let _ = F::affinity().insert(&client, &v, 0);
                        return Ok((v.backend_id, be));
                    }
                }
            }
        }
    }
    let (base, n) = if svc.active != 0 { (0, svc.active as u32) } else { (svc.active as u32, svc.terminating as u32) };
    // Never true (checked above), but the compiler cannot see it and would emit a panic path.
    if n == 0 {
        return Err(DropReason::NoBackend);
    }
    // SAFETY: helper without arguments.
    let slot = base + unsafe { bpf_get_prandom_u32() } % n;
    // SAFETY: copied out at once.
    let id = unsafe { F::slots().get(&SlotKey { svc_id: svc.svc_id, slot }).copied() }
        .ok_or(DropReason::BackendMissing)?;
    let be = backend::<F>(id).ok_or(DropReason::BackendMissing)?;
    if affinity {
        let v = AffinityValue { last_used_ns: now, backend_id: id, _pad: 0 };
        // Best effort: without the entry the next connection is balanced afresh.
        let _ = F::affinity().insert(&client, &v, 0);
    }
    Ok((id, be))
}

/// The backend a conntrack entry points to, if it still exists at the same address: established
/// connections keep their backend while others come and go; a removed one is re-selected.
#[inline(always)]
pub fn still_there<F: Family>(id: u32, addr: F::Addr, port_be: u16) -> bool {
    match backend::<F>(id) {
        Some(be) => be.addr == addr && be.port_be == port_be,
        None => false,
    }
}
