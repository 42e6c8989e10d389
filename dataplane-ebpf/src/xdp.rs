//! XDP on the node's uplink: NodePort, LoadBalancer IPs and externalIPs for new connections,
//! conntrack hits, and reverse NAT of replies from remote backends.
//!
//! TC does what XDP cannot: XDP sees only the uplink's ingress, so replies of local backends
//! (which leave through the pod's veth) are reverse-NATed by the TC program on that veth, and an
//! uplink without XDP support uses `dp_tc_uplink`, the same service path at TC ingress.
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use dataplane_common::metrics::{DropReason, Hook};

use crate::{
    csum::Rewrite as _,
    nat::{self, Origin, Outcome},
    parse::{self, L3},
    stats,
};

#[xdp]
pub fn dp_xdp_ingress(ctx: XdpContext) -> u32 {
    let w = ctx.window();
    let len = (w.data_end - w.data) as u64;
    stats::count_hook(Hook::XdpIngress, len);
    match try_xdp_ingress(&ctx, len) {
        Ok(verdict) => verdict,
        Err(reason) => {
            stats::count_drop(reason, len);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_xdp_ingress(ctx: &XdpContext, len: u64) -> Result<u32, DropReason> {
    let L3::Ipv4(meta) = parse::parse(ctx.window(), len as usize)? else {
        return Ok(xdp_action::XDP_PASS);
    };
    match nat::handle(ctx, &meta, Origin::External, len)? {
        Outcome::Untouched | Outcome::Translated => Ok(xdp_action::XDP_PASS),
        Outcome::Forward => Ok(crate::fib::xdp_forward(ctx)),
    }
}

/// The benchmark's floor: the same parsing and one frontend lookup, nothing else. Never attached;
/// `bench-datapath` compares the service path against it.
#[xdp]
pub fn dp_xdp_floor(ctx: XdpContext) -> u32 {
    let w = ctx.window();
    let len = w.data_end - w.data;
    match parse::parse(w, len) {
        Ok(L3::Ipv4(m)) => {
            // The floor passes everything by design; the map lookup is a helper call, which the
            // compiler cannot drop although its result is unused.
            let _ = crate::lb::lookup_service::<crate::maps::V4>(m.daddr_be, m.dport_be, m.proto, false);
            xdp_action::XDP_PASS
        }
        Ok(_) => xdp_action::XDP_PASS,
        Err(reason) => {
            stats::count_drop(reason, len as u64);
            xdp_action::XDP_DROP
        }
    }
}
