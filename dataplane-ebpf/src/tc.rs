//! TC on pod veths and the uplink (ingress and egress).
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use dataplane_common::metrics::{DropReason, Hook};

use crate::{
    parse::{self, Window},
    stats,
};

#[classifier]
pub fn dp_tc_ingress(ctx: TcContext) -> i32 {
    run(&ctx, Hook::TcIngress)
}

#[classifier]
pub fn dp_tc_egress(ctx: TcContext) -> i32 {
    run(&ctx, Hook::TcEgress)
}

#[inline(always)]
fn run(ctx: &TcContext, hook: Hook) -> i32 {
    let len = ctx.len() as u64;
    stats::count_hook(hook, len);
    // Headers of a GSO or paged skb may sit outside the linear area: pull what the parser reads
    // (Ethernet + the largest IPv4 and TCP headers). Failure only means a shorter frame, which
    // the parser's bounds checks then judge.
    let _ = ctx.pull_data(core::cmp::min(ctx.len(), parse::MAX_HEADERS as u32));
    let w = Window { data: ctx.data(), data_end: ctx.data_end() };
    match try_tc(w, len as usize) {
        Ok(verdict) => verdict,
        Err(reason) => {
            stats::count_drop(reason, len);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn try_tc(w: Window, frame_len: usize) -> Result<i32, DropReason> {
    let _l3 = parse::parse(w, frame_len)?;
    Ok(TC_ACT_OK)
}
