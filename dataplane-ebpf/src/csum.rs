//! Header rewrites with incremental checksum updates (RFC 1624), one interface over XDP (direct
//! packet writes, checksums computed here) and TC (kernel helpers, which also keep skb checksum
//! state right: a CHECKSUM_PARTIAL skb's L4 field holds only the pseudo-header sum, so ports must
//! not be folded into it, which `bpf_l4_csum_replace` knows and a hand-written update does not).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use dataplane_common::metrics::DropReason;

use crate::parse::{ETH_HLEN, IPPROTO_UDP, Window};

/// Where the L4 checksum is, and whether it is UDP's (where 0 means "none" and must stay 0).
#[derive(Clone, Copy)]
pub struct L4Csum {
    pub off: usize,
    pub udp: bool,
}

impl L4Csum {
    #[inline(always)]
    pub fn for_proto(proto: u8, l4_off: usize) -> L4Csum {
        if proto == IPPROTO_UDP { L4Csum { off: l4_off + 6, udp: true } } else { L4Csum { off: l4_off + 16, udp: false } }
    }
}

pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP_DADDR_OFF: usize = ETH_HLEN + 16;

/// A packet whose IPv4 addresses and L4 ports can be rewritten. Values are raw network-order
/// words as they sit in the packet.
pub trait Rewrite {
    fn window(&self) -> Window;
    /// Replaces the IPv4 address at `off`, fixing the IP header and the L4 pseudo-header sum.
    fn set_addr(&self, off: usize, old: u32, new: u32, l4: L4Csum) -> Result<(), DropReason>;
    /// Replaces the port at `off`, fixing the L4 checksum.
    fn set_port(&self, off: usize, old: u16, new: u16, l4: L4Csum) -> Result<(), DropReason>;
}

#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), over 16-bit words of `old`/`new` in packet order.
/// One's-complement sums are byte-order independent, so raw loads work on any host order.
#[inline(always)]
pub fn update4(check: u16, old: u32, new: u32) -> u16 {
    let s = (!check) as u32
        + (!(old as u16)) as u32
        + (!((old >> 16) as u16)) as u32
        + (new as u16) as u32
        + ((new >> 16) as u16) as u32;
    !fold(s)
}

#[inline(always)]
pub fn update2(check: u16, old: u16, new: u16) -> u16 {
    !fold((!check) as u32 + (!old) as u32 + new as u32)
}

#[inline(always)]
fn at<T>(w: Window, off: usize) -> Result<*mut T, DropReason> {
    crate::parse::ptr_at::<T>(w, off).map(|p| p as *mut T).ok_or(DropReason::RewriteFailed)
}

impl Rewrite for XdpContext {
    #[inline(always)]
    fn window(&self) -> Window {
        Window { data: self.data(), data_end: self.data_end() }
    }

    #[inline(always)]
    fn set_addr(&self, off: usize, old: u32, new: u32, l4: L4Csum) -> Result<(), DropReason> {
        let w = self.window();
        let field: *mut u32 = at(w, off)?;
        let ip_csum: *mut u16 = at(w, IP_CSUM_OFF)?;
        let l4_csum: *mut u16 = at(w, l4.off)?;
        // SAFETY: each pointer was bounds-checked against data_end by `at`.
        unsafe {
            field.write_unaligned(new);
            ip_csum.write_unaligned(update4(ip_csum.read_unaligned(), old, new));
            fix_l4(l4_csum, l4.udp, |c| update4(c, old, new));
        }
        Ok(())
    }

    #[inline(always)]
    fn set_port(&self, off: usize, old: u16, new: u16, l4: L4Csum) -> Result<(), DropReason> {
        let w = self.window();
        let field: *mut u16 = at(w, off)?;
        let l4_csum: *mut u16 = at(w, l4.off)?;
        // SAFETY: bounds-checked by `at`.
        unsafe {
            field.write_unaligned(new);
            fix_l4(l4_csum, l4.udp, |c| update2(c, old, new));
        }
        Ok(())
    }
}

/// UDP over IPv4 may carry no checksum (0), which stays 0; a computed 0 is sent as 0xffff.
///
/// # Safety
/// `p` must point inside the packet.
#[inline(always)]
unsafe fn fix_l4(p: *mut u16, udp: bool, f: impl Fn(u16) -> u16) {
    // SAFETY: the caller's promise.
    let c = unsafe { p.read_unaligned() };
    if udp && c == 0 {
        return;
    }
    let n = f(c);
    // SAFETY: as above.
    unsafe { p.write_unaligned(if udp && n == 0 { 0xffff } else { n }) };
}

impl Rewrite for TcContext {
    #[inline(always)]
    fn window(&self) -> Window {
        Window { data: self.data(), data_end: self.data_end() }
    }

    #[inline(always)]
    fn set_addr(&self, off: usize, old: u32, new: u32, l4: L4Csum) -> Result<(), DropReason> {
        let mangled = if l4.udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
        self.l4_csum_replace(l4.off, old as u64, new as u64, BPF_F_PSEUDO_HDR as u64 | mangled | 4)
            .map_err(|_| DropReason::RewriteFailed)?;
        self.l3_csum_replace(IP_CSUM_OFF, old as u64, new as u64, 4).map_err(|_| DropReason::RewriteFailed)?;
        self.store(off, &new, 0).map_err(|_| DropReason::RewriteFailed)
    }

    #[inline(always)]
    fn set_port(&self, off: usize, old: u16, new: u16, l4: L4Csum) -> Result<(), DropReason> {
        let mangled = if l4.udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
        self.l4_csum_replace(l4.off, old as u64, new as u64, mangled | 2).map_err(|_| DropReason::RewriteFailed)?;
        self.store(off, &new, 0).map_err(|_| DropReason::RewriteFailed)
    }
}
