//! XDP on the node's uplink.
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use dataplane_common::metrics::{DropReason, Hook};

use crate::{
    parse::{self, Window},
    stats,
};

#[xdp]
pub fn dp_xdp_ingress(ctx: XdpContext) -> u32 {
    let w = Window { data: ctx.data(), data_end: ctx.data_end() };
    let len = (w.data_end - w.data) as u64;
    stats::count_hook(Hook::XdpIngress, len);
    match try_xdp_ingress(w, len as usize) {
        Ok(verdict) => verdict,
        Err(reason) => {
            stats::count_drop(reason, len);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_xdp_ingress(w: Window, frame_len: usize) -> Result<u32, DropReason> {
    // Parsing rejects malformed frames; well-formed ones go on to the stack (service handling
    // hooks in here).
    let _l3 = parse::parse(w, frame_len)?;
    Ok(xdp_action::XDP_PASS)
}
