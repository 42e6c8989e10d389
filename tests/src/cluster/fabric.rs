//! The underlay "fabric": what the switch ports of the virtual cluster need so that it behaves like
//! a wire for the data path.
//!
//! A node's uplink is a veth whose peer is a port of the underlay bridge. When XDP on the uplink
//! answers with XDP_TX (NodePort to a backend on another node: the packet goes back out the same
//! uplink), veth queues the frame on the peer's ring but only schedules the peer's NAPI when the
//! peer has an XDP program of its own (`veth_xdp_flush`, drivers/net/veth.c): without one the
//! frame sits there until unrelated traffic drains the ring. A physical NIC has no such
//! dependency. So every bridge port gets the smallest XDP program there is, `return XDP_PASS`,
//! which changes no packet. It is loaded from two raw instructions through bpf(2), because aya
//! only loads programs from an object file.
use std::{
    ffi::CString,
    os::fd::{FromRawFd as _, OwnedFd},
};

use super::ClusterError;
use crate::netns::NetNs;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_PASS: u64 = 2;

/// `union bpf_attr` for BPF_PROG_LOAD, up to the fields used (the kernel zero-fills the rest).
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// `union bpf_attr` for BPF_LINK_CREATE.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a live, fully initialised repr(C) value of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, std::mem::size_of::<T>() as u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches `return XDP_PASS` to each of `ports` in `netns`; the links live as long as the
/// returned descriptors.
pub fn pass_on_ports(netns: &NetNs, ports: Vec<String>) -> Result<Vec<OwnedFd>, ClusterError> {
    let ns = netns.name().to_owned();
    netns
        .run(move || -> std::io::Result<Vec<OwnedFd>> {
            // r0 = XDP_PASS (BPF_ALU64|BPF_MOV|BPF_K, imm in the upper 32 bits); exit.
            let insns: [u64; 2] = [0xb7 | (XDP_PASS << 32), 0x95];
            let license = CString::new("GPL").unwrap_or_default();
            let mut name = [0u8; 16];
            name[..8].copy_from_slice(b"dpt_pass");
            let prog = bpf(
                BPF_PROG_LOAD,
                &ProgLoadAttr {
                    prog_type: BPF_PROG_TYPE_XDP,
                    insn_cnt: insns.len() as u32,
                    insns: insns.as_ptr() as u64,
                    license: license.as_ptr() as u64,
                    log_level: 0,
                    log_size: 0,
                    log_buf: 0,
                    kern_version: 0,
                    prog_flags: 0,
                    prog_name: name,
                },
            )?;
            let mut links = Vec::new();
            for port in ports {
                let cname = CString::new(port.clone()).unwrap_or_default();
                // SAFETY: a NUL-terminated name; resolved in this thread's (the underlay's) netns.
                let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
                if ifindex == 0 {
                    return Err(std::io::Error::last_os_error());
                }
                use std::os::fd::AsRawFd as _;
                links.push(bpf(
                    BPF_LINK_CREATE,
                    &LinkCreateAttr { prog_fd: prog.as_raw_fd() as u32, target_ifindex: ifindex, attach_type: BPF_XDP, flags: 0 },
                )?);
            }
            Ok(links)
        })
        .map_err(|e| ClusterError::Io { what: format!("attaching XDP_PASS to the bridge ports in {ns}"), source: e })
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_STXCSUM: u32 = 0x17;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut EthtoolValue,
    _pad: [u8; 16],
}

/// Turns transmit checksum offload off on `ifname` in `netns` (`ethtool -K <if> tx off`, through
/// the ethtool ioctl so that the tests need no ethtool binary).
///
/// Why: a veth passes locally generated packets on with CHECKSUM_PARTIAL, the L4 checksum field
/// holding only the pseudo-header sum and the skb saying "finish it later". XDP works on the raw
/// bytes, and a frame it sends back out (XDP_TX, redirect) loses that skb state, so the receiver
/// checks a half-done checksum and drops the packet. A packet that comes off a real wire always
/// carries its full checksum; with offload off, the virtual cluster's senders (the external
/// client, nodes, Pods) produce exactly that.
pub fn tx_checksum_off(netns: &NetNs, ifname: &str) -> Result<(), ClusterError> {
    let name = ifname.to_owned();
    netns
        .run(move || -> std::io::Result<()> {
            // SAFETY: plain socket(2); the descriptor is owned right away.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: a fresh descriptor nothing else owns.
            let sock = unsafe { OwnedFd::from_raw_fd(fd) };
            let mut value = EthtoolValue { cmd: ETHTOOL_STXCSUM, data: 0 };
            let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: &mut value, _pad: [0; 16] };
            let bytes = name.as_bytes();
            req.name[..bytes.len().min(libc::IFNAMSIZ - 1)].copy_from_slice(&bytes[..bytes.len().min(libc::IFNAMSIZ - 1)]);
            use std::os::fd::AsRawFd as _;
            // SAFETY: `req` and `value` outlive the call; the kernel reads/writes only their fields.
            if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut req as *mut IfReq) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
        .map_err(|e| ClusterError::Io { what: format!("tx checksum offload off on {ifname} in {}", netns.name()), source: e })
}
