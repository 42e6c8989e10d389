//! TC programs. `dp_tc_ingress` sits on the host side of each pod's veth (packets leaving the
//! pod): ClusterIP load balancing for what the socket hooks did not translate, conntrack, reverse
//! NAT of backend replies, hairpin. `dp_tc_uplink` is the same path for the uplink where XDP cannot
//! run. `dp_tc_egress` only counts.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use dataplane_common::metrics::{DropReason, Hook};

use crate::{
    nat::{self, Origin, Outcome},
    parse::{self, L3, Window},
    stats,
};

#[classifier]
pub fn dp_tc_ingress(ctx: TcContext) -> i32 {
    run(&ctx, Hook::TcIngress, Some(Origin::Internal))
}

#[classifier]
pub fn dp_tc_uplink(ctx: TcContext) -> i32 {
    run(&ctx, Hook::TcIngress, Some(Origin::External))
}

#[classifier]
pub fn dp_tc_egress(ctx: TcContext) -> i32 {
    run(&ctx, Hook::TcEgress, None)
}

#[inline(always)]
fn run(ctx: &TcContext, hook: Hook, origin: Option<Origin>) -> i32 {
    let len = ctx.len() as u64;
    stats::count_hook(hook, len);
    // Headers of a GSO or paged skb may sit outside the linear area: pull what the parser reads
    // (Ethernet + the largest IPv4 and TCP headers). Failure only means a shorter frame, which
    // the parser's bounds checks then judge.
    let _ = ctx.pull_data(core::cmp::min(ctx.len(), parse::MAX_HEADERS as u32));
    match try_tc(ctx, len, origin) {
        Ok(verdict) => verdict,
        Err(reason) => {
            stats::count_drop(reason, len);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn try_tc(ctx: &TcContext, len: u64, origin: Option<Origin>) -> Result<i32, DropReason> {
    let w = Window { data: ctx.data(), data_end: ctx.data_end() };
    let l3 = parse::parse(w, len as usize)?;
    if let (L3::Ipv4(meta), Some(origin)) = (l3, origin) {
        if nat::handle(ctx, &meta, origin, len)? == Outcome::Forward {
            return Ok(crate::fib::tc_forward(ctx));
        }
    }
    Ok(TC_ACT_OK)
}
