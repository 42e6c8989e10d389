//! Frontend lookup and backend selection, generic over the address family.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use dataplane_common::{
    affinity::{AffinityKey, AffinityValue},
    ct::ct_needs_refresh,
    lb::{Backend, FrontendKey, SCOPE_EXT, SCOPE_INT, SVC_FLAG_TWO_SCOPES, Service, SlotKey},
    metrics::DropReason,
};

use crate::{ct, maps::Family};

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
/// backend still in the Service's usable slots, else a random ready backend, else a random
/// serving-terminating one.
#[inline(always)]
pub fn select_backend<F: Family>(
    svc: &Service,
    client: AffinityKey<F::Addr>,
) -> Result<(u32, Backend<F::Addr>), DropReason> {
    if !has_backends(svc) {
        return Err(DropReason::NoBackend);
    }
    // Ready slots come first; the terminating ones (after them) count only when nothing is ready.
    let n = if svc.active != 0 { svc.active as u32 } else { svc.terminating as u32 };
    let timeout = svc.affinity_timeout_s;
    let now = if timeout != 0 { ct::now_s() } else { 0 };
    if timeout != 0
        && let Some(ptr) = F::affinity().get_ptr_mut(&client)
    {
        // SAFETY: the map's value pointer; copied out at once.
        let v = unsafe { *ptr };
        if v.fresh(now, timeout)
            && let Some(be) = remembered::<F>(svc, &v, n)
        {
            if ct_needs_refresh(v.expires_s, now, timeout) {
                // SAFETY: as above; a racing writer writes an expiry as good.
                unsafe { (*ptr).expires_s = now + timeout };
            }
            return Ok((v.backend_id, be));
        }
    }
    // Never true (checked above), but the compiler cannot see it and would emit a panic path.
    if n == 0 {
        return Err(DropReason::NoBackend);
    }
    // SAFETY: helper without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % n;
    // SAFETY: copied out at once.
    let id = unsafe { F::slots().get(&SlotKey { svc_id: svc.svc_id, slot }).copied() }
        .ok_or(DropReason::BackendMissing)?;
    let be = backend::<F>(id).ok_or(DropReason::BackendMissing)?;
    if timeout != 0 {
        let v = AffinityValue { backend_id: id, expires_s: now + timeout, svc_id: svc.svc_id, slot };
        // Best effort: without the entry the next connection is balanced afresh.
        let _ = F::affinity().insert(&client, &v, 0);
    }
    Ok((id, be))
}

/// The backend an affinity entry remembers, if it is still usable for this Service: the slot it
/// was picked from (of this very service entry) still holds it and is among the `n` usable ones,
/// and the id still names a backend. A backend that left the Service, or an id freed and reused,
/// fails the slot check.
#[inline(always)]
fn remembered<F: Family>(svc: &Service, v: &AffinityValue, n: u32) -> Option<Backend<F::Addr>> {
    if v.svc_id != svc.svc_id || v.slot >= n {
        return None;
    }
    // SAFETY: copied out at once.
    let id = unsafe { F::slots().get(&SlotKey { svc_id: svc.svc_id, slot: v.slot }).copied() }?;
    if id != v.backend_id {
        return None;
    }
    backend::<F>(id)
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
