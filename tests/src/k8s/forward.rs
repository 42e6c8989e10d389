//! A TCP forwarder from a listening address in one network namespace to the API server in the
//! control plane's namespace: the front door of the virtual cluster's API, like the load balancer
//! in front of a real cluster's API servers.
//!
//! Each cluster's nodes reach the API server at an address of their own underlay, and many
//! clusters (parallel tests) share one control plane, so plain routing would need one address
//! plan per cluster. A forwarder keeps every underlay private and lets a test cut every open
//! connection at once ([`Forwarder::cut`]), as a network blip or an API load balancer failover
//! does. It never sends anything outside the namespaces the tests made.
use std::{
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
};

use nix::sched::{CloneFlags, setns};

/// Where a forwarder connects to: an address inside a network namespace (by path), or in the
/// caller's own namespace.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub netns: Option<PathBuf>,
    pub addr: SocketAddr,
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    /// Every connection, both halves: closed by `cut` and on drop.
    open: Mutex<Vec<TcpStream>>,
}

/// Accepts on its listener until dropped; each connection gets an upstream connection and two
/// copying threads.
#[derive(Debug)]
pub struct Forwarder {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<thread::JoinHandle<()>>,
}

/// Runs `f` on a thread that entered `netns` (or the caller's namespace), so the sockets it opens
/// belong there.
pub(crate) fn in_netns<T: Send + 'static>(netns: Option<PathBuf>, f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    thread::spawn(move || {
        if let Some(path) = netns {
            let file = std::fs::File::open(&path)?;
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        }
        f()
    })
    .join()
    .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
}

impl Forwarder {
    /// Listens on `listen` inside `listen_netns` (None: the caller's namespace; port 0 picks a
    /// free port) and forwards to `upstream`.
    pub fn start(listen_netns: Option<PathBuf>, listen: SocketAddr, upstream: Upstream) -> io::Result<Forwarder> {
        let listener = in_netns(listen_netns, move || TcpListener::bind(listen))?;
        // Polled, so that drop can stop the loop without a wake-up connection (which would have
        // to be made from the listener's namespace).
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let accept = thread::Builder::new().name("dpt-forward".into()).spawn(move || {
            while !s.stop.load(Ordering::Acquire) {
                let down = match listener.accept() {
                    Ok((down, _)) => down,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(std::time::Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => continue,
                };
                if down.set_nonblocking(false).is_err() {
                    continue;
                }
                let up = upstream.clone();
                let s = s.clone();
                // Connecting may take a moment (or fail while the API server is down): not on
                // the accept thread.
                thread::spawn(move || {
                    let Ok(up) = in_netns(up.netns, move || TcpStream::connect(up.addr)) else {
                        // Refused upstream: the client sees its connection closed at once, as
                        // it would behind a load balancer with no healthy server.
                        let _ = down.shutdown(Shutdown::Both);
                        return;
                    };
                    let _ = down.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    let (Ok(down2), Ok(up2)) = (down.try_clone(), up.try_clone()) else { return };
                    if let Ok(mut open) = s.open.lock() {
                        open.retain(|c| c.peer_addr().is_ok());
                        open.extend(down.try_clone().ok());
                        open.extend(up.try_clone().ok());
                    }
                    thread::spawn(move || pipe(down2, up2));
                    pipe(up, down);
                });
            }
        })?;
        Ok(Forwarder { addr, shared, accept: Some(accept) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every open connection (new ones are still accepted).
    pub fn cut(&self) {
        if let Ok(mut open) = self.shared.open.lock() {
            for c in open.drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Copies `from` to `to` until either side ends, then closes both directions of both.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.cut();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}
