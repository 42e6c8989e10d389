//! Bounds-checked header parsing shared by the XDP and TC entries.
//!
//! Every access goes through [`ptr_at`], whose comparison against `data_end` is what lets the
//! verifier accept the load that follows.
use core::mem::size_of;

use dataplane_common::metrics::DropReason;

pub const ETH_HLEN: usize = 14;
/// Ethernet + the longest IPv4 header + the longest TCP header: all the parser ever reads.
pub const MAX_HEADERS: usize = ETH_HLEN + 60 + 60;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The linear packet window of a context: `[data, data_end)`.
#[derive(Clone, Copy)]
pub struct Window {
    pub data: usize,
    pub data_end: usize,
}

/// A pointer to a `T` at `off`, or `None` when the window is too short.
#[inline(always)]
pub fn ptr_at<T>(w: Window, off: usize) -> Option<*const T> {
    // Required by the verifier: an explicit check against data_end before every access.
    if w.data + off + size_of::<T>() > w.data_end {
        return None;
    }
    Some((w.data + off) as *const T)
}

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto_be: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len_be: u16,
    pub id_be: u16,
    pub frag_off_be: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check_be: u16,
    pub saddr_be: u32,
    pub daddr_be: u32,
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub ver_tc_flow: [u8; 4],
    pub payload_len_be: u16,
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// The part of TCP and UDP headers that both share: the ports.
#[repr(C)]
pub struct Ports {
    pub src_be: u16,
    pub dst_be: u16,
}

/// What a packet is, as far as the data path cares.
#[allow(dead_code)]
pub enum L3 {
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed untouched.
    Other,
    Ipv4(Ipv4Meta),
    Ipv6,
}

pub struct Ipv4Meta {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub proto: u8,
    /// Offset of the L4 header from `data`.
    pub l4_off: usize,
    /// Source and destination ports (TCP/UDP) in network order; zero for other protocols and for
    /// non-first fragments, which carry no L4 header.
    pub sport_be: u16,
    pub dport_be: u16,
    /// TCP flags (FIN, SYN, RST, ACK, ...: the header's 14th byte); 0 for other protocols.
    pub tcp_flags: u8,
    /// A non-first fragment: there is no L4 header to look at.
    pub later_fragment: bool,
    /// Any fragment (more-fragments set, or a non-zero offset). The service path does not
    /// translate fragments: the later ones carry no ports to match, and translating only the
    /// first would split the datagram.
    pub fragment: bool,
}

const IP_OFFSET_MASK: u16 = 0x1fff;
const IP_MF: u16 = 0x2000;

/// Parses Ethernet, then IPv4 with its L4 ports. Malformed headers are an error with a reason.
///
/// `frame_len` is the whole frame's length, which for a TC skb can exceed the linear window:
/// the IP total length is checked against it, the headers against the window.
#[inline(always)]
pub fn parse(w: Window, frame_len: usize) -> Result<L3, DropReason> {
    let eth: *const EthHdr = ptr_at(w, 0).ok_or(DropReason::TruncatedEthernet)?;
    // SAFETY: ptr_at checked the bounds.
    let proto = u16::from_be(unsafe { (*eth).proto_be });
    match proto {
        ETH_P_IP => parse_ipv4(w, frame_len).map(L3::Ipv4),
        ETH_P_IPV6 => {
            let _: *const Ipv6Hdr = ptr_at(w, ETH_HLEN).ok_or(DropReason::TruncatedIpv6)?;
            Ok(L3::Ipv6)
        }
        _ => Ok(L3::Other),
    }
}

#[inline(always)]
fn parse_ipv4(w: Window, frame_len: usize) -> Result<Ipv4Meta, DropReason> {
    let ip: *const Ipv4Hdr = ptr_at(w, ETH_HLEN).ok_or(DropReason::TruncatedIpv4)?;
    // SAFETY: ptr_at checked the bounds of the fixed header.
    let (ver_ihl, tot_len, frag, proto, saddr_be, daddr_be) = unsafe {
        (
            (*ip).ver_ihl,
            u16::from_be((*ip).tot_len_be) as usize,
            u16::from_be((*ip).frag_off_be),
            (*ip).proto,
            (*ip).saddr_be,
            (*ip).daddr_be,
        )
    };
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ver_ihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() || tot_len < ihl {
        return Err(DropReason::BadIpv4Header);
    }
    // The datagram must fit the frame (a shorter one is padding, which is fine).
    if ETH_HLEN + tot_len > frame_len {
        return Err(DropReason::TruncatedIpv4);
    }
    let l4_off = ETH_HLEN + ihl;
    let mut meta = Ipv4Meta {
        saddr_be,
        daddr_be,
        proto,
        l4_off,
        sport_be: 0,
        dport_be: 0,
        tcp_flags: 0,
        later_fragment: frag & IP_OFFSET_MASK != 0,
        fragment: frag & (IP_OFFSET_MASK | IP_MF) != 0,
    };
    if meta.later_fragment {
        return Ok(meta);
    }
    match proto {
        IPPROTO_TCP => {
            // 20 bytes: the fixed TCP header; its data offset must not point inside it.
            let tcp: *const [u8; 20] = ptr_at(w, l4_off).ok_or(DropReason::TruncatedTcp)?;
            // SAFETY: ptr_at checked the bounds.
            let (doff, flags) = unsafe { (((*tcp)[12] >> 4) as usize * 4, (*tcp)[13]) };
            if doff < 20 || w.data + l4_off + doff > w.data_end {
                return Err(DropReason::TruncatedTcp);
            }
            meta.tcp_flags = flags;
            read_ports(w, l4_off, &mut meta);
        }
        IPPROTO_UDP => {
            let _: *const [u8; 8] = ptr_at(w, l4_off).ok_or(DropReason::TruncatedUdp)?;
            read_ports(w, l4_off, &mut meta);
        }
        IPPROTO_ICMP => {
            let _: *const [u8; 8] = ptr_at(w, l4_off).ok_or(DropReason::TruncatedIcmp)?;
        }
        _ => {}
    }
    Ok(meta)
}

#[inline(always)]
fn read_ports(w: Window, l4_off: usize, meta: &mut Ipv4Meta) {
    if let Some(p) = ptr_at::<Ports>(w, l4_off) {
        // SAFETY: ptr_at checked the bounds.
        unsafe {
            meta.sport_be = (*p).src_be;
            meta.dport_be = (*p).dst_be;
        }
    }
}
