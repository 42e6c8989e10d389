//! Real-socket load inside a test namespace: a backend that accepts and closes at full speed, and
//! a client making many short connections (the socket-LB tests and the datapath benchmark).
use std::{
    net::{SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use nix::sys::socket::{setsockopt, sockopt};

use crate::netns::NetNs;

/// A listener on `at` (inside `ns`) with two threads accepting and closing. Its backlog is raised
/// to 4096 (the namespace's `somaxconn`), so that acceptors falling behind for a moment do not make
/// a SYN wait for its retransmission.
pub fn closing_listener(ns: &NetNs, at: SocketAddrV4) {
    let l = ns.run(move || TcpListener::bind(at).unwrap_or_else(|e| panic!("bind {at}: {e}")));
    // SAFETY: listen(2) again on a listening socket only changes its backlog.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 4096) }, 0, "listen");
    for _ in 0..2 {
        let l = l.try_clone().expect("clone the listener");
        std::thread::spawn(move || {
            for s in l.incoming() {
                drop(s);
            }
        });
    }
}

/// Makes `n` connections to `to` from inside `ns`, one after the other, each closed at once;
/// returns how long they took. The client closes with a RST (SO_LINGER 0): no TIME_WAIT, so the
/// ephemeral ports never run out however many connections are made.
pub fn short_connections(ns: &NetNs, to: SocketAddrV4, n: usize) -> Duration {
    ns.run(move || {
        let start = Instant::now();
        for i in 0..n {
            let s = TcpStream::connect(to).unwrap_or_else(|e| panic!("connection {i} of {n} to {to}: {e}"));
            setsockopt(&s, sockopt::Linger, &libc::linger { l_onoff: 1, l_linger: 0 }).expect("SO_LINGER");
        }
        start.elapsed()
    })
}

/// Makes `n` UDP sockets inside `ns`, one after the other, each connect()ed to `to` and closed:
/// the cost of a connect that sends nothing (no handshake hides what the socket hooks cost).
pub fn udp_connects(ns: &NetNs, to: SocketAddrV4, n: usize) -> Duration {
    ns.run(move || {
        let start = Instant::now();
        for i in 0..n {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap_or_else(|e| panic!("UDP socket {i} of {n}: {e}"));
            s.connect(to).unwrap_or_else(|e| panic!("UDP connect {i} of {n} to {to}: {e}"));
        }
        start.elapsed()
    })
}
