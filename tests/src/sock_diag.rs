//! Which TCP sockets of the calling thread's network namespace hold a value in a socket-local
//! storage map (`BPF_MAP_TYPE_SK_STORAGE`), and that value: the kernel's sock_diag dump with
//! `INET_DIAG_REQ_SK_BPF_STORAGES` (what `ss --bpf-map-id` asks). Such a map cannot be iterated
//! from user space (no `get_next_key`); this is how a test counts its entries. TCP only: the
//! kernel (`inet_sk_diag_fill`) reports the storage of connection sockets only, not UDP's.
//!
//! Run it inside the namespace (`NetNs::run`): sock_diag answers for the caller's namespace.
use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = 0x3fff;
/// `INET_DIAG_REQ_SK_BPF_STORAGES` (request) and `SK_DIAG_BPF_STORAGE_REQ_MAP_FD` inside it.
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
/// `INET_DIAG_SK_BPF_STORAGES` (reply), `SK_DIAG_BPF_STORAGE` in it, then map id and value.
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
/// `struct nlmsghdr`, `struct inet_diag_req_v2`, `struct inet_diag_msg`.
const NLMSG_HDR_LEN: usize = 16;
const REQ_LEN: usize = 56;
const MSG_LEN: usize = 72;

/// One socket with a value in the map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
    /// The kernel's TCP state (`TCP_ESTABLISHED` = 1, ...).
    pub state: u8,
    pub value: Vec<u8>,
}

/// The IPv4 TCP sockets, in every state, that hold a value in the socket-storage map `map`.
pub fn tcp_holders(map: BorrowedFd<'_>) -> io::Result<Vec<Holder>> {
    // SAFETY: plain socket(2); the fd is owned below.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };

    let mut req = Vec::with_capacity(NLMSG_HDR_LEN + REQ_LEN + 12);
    req.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    req.extend_from_slice(&[libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req.extend_from_slice(&[0u8; 48]); // inet_diag_sockid: no filter
    // Nested: the map whose values to report.
    req.extend_from_slice(&12u16.to_ne_bytes());
    req.extend_from_slice(&(INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED).to_ne_bytes());
    req.extend_from_slice(&8u16.to_ne_bytes());
    req.extend_from_slice(&SK_DIAG_BPF_STORAGE_REQ_MAP_FD.to_ne_bytes());
    req.extend_from_slice(&(map.as_raw_fd() as u32).to_ne_bytes());
    let len = req.len() as u32;
    req[..4].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: a zeroed sockaddr_nl addressed to the kernel (pid 0).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: the buffer and address outlive the call.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&raw const kernel).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }

    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: the buffer outlives the call and has its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= NLMSG_HDR_LEN {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
            if len < NLMSG_HDR_LEN || len > rest.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
            }
            let body = &rest[NLMSG_HDR_LEN..len];
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let code = i32::from_ne_bytes(body[0..4].try_into().unwrap());
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                }
                SOCK_DIAG_BY_FAMILY if body.len() >= MSG_LEN => {
                    if let Some(value) = storage_value(&body[MSG_LEN..]) {
                        let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
                        let ip = |at: usize| Ipv4Addr::new(body[at], body[at + 1], body[at + 2], body[at + 3]);
                        out.push(Holder {
                            state: body[1],
                            local: SocketAddrV4::new(ip(8), port(4)),
                            remote: SocketAddrV4::new(ip(24), port(6)),
                            value,
                        });
                    }
                }
                _ => {}
            }
            rest = &rest[((len + 3) & !3).min(rest.len())..];
        }
    }
}

/// Netlink attributes `(type, payload)` of `buf`.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[((len + 3) & !3).min(buf.len())..];
        Some((kind, payload))
    })
}

/// The value in the map asked for, from the attributes after an `inet_diag_msg`.
fn storage_value(msg_attrs: &[u8]) -> Option<Vec<u8>> {
    let (_, storages) = attrs(msg_attrs).find(|(k, _)| *k == INET_DIAG_SK_BPF_STORAGES)?;
    let (_, storage) = attrs(storages).find(|(k, _)| *k == SK_DIAG_BPF_STORAGE)?;
    let (_, value) = attrs(storage).find(|(k, _)| *k == SK_DIAG_BPF_STORAGE_MAP_VALUE)?;
    Some(value.to_vec())
}
