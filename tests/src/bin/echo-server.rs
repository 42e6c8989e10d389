//! The virtual cluster's Pod workload, and the client that talks to it.
//!
//! `echo-server serve NAME PORT`: TCP and UDP on 0.0.0.0:PORT. Every TCP line and every UDP
//! datagram is answered with `NAME CLIENT_IP:CLIENT_PORT` (the client address the server saw, so
//! a test can tell NAT from no NAT). Prints `ready` once both sockets are bound.
//!
//! Clients print one JSON line per attempt (see `dataplane_tests::cluster::client::Reply`):
//! - `echo-server tcp ADDR COUNT [TIMEOUT_MS]`: COUNT fresh connections, one line each.
//! - `echo-server udp ADDR COUNT [TIMEOUT_MS]`: COUNT datagrams, each from a fresh socket.
//! - `echo-server hold ADDR CONNS MILLIS INTERVAL_MS`: CONNS connections kept open for MILLIS,
//!   each asking every INTERVAL_MS; prints `{"connected":CONNS}` once all are up, then one line
//!   per connection at the end with its backend, request count and first error (a connection
//!   whose backend changed counts as failed: the connection was silently re-routed).
//!
//! - `echo-server steady ADDR MILLIS INTERVAL_MS`: a fresh TCP connection every INTERVAL_MS for
//!   MILLIS (one request each, timeout 3 s), then one line: `{"ok":N,"failed":M,"errors":[..]}`
//!   with the first failures and when they happened (ms since start).
//!
//! Clients run as separate processes so that they can be placed in a Pod's netns *and cgroup*:
//! the node's cgroup socket programs only see processes inside the node's cgroup sub-tree.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::{Duration, Instant},
};

use serde_json::json;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["serve", name, port] => serve(name, parse(port, "PORT")),
        ["tcp", addr, count, rest @ ..] => tcp(parse(addr, "ADDR"), parse(count, "COUNT"), timeout(rest)),
        ["udp", addr, count, rest @ ..] => udp(parse(addr, "ADDR"), parse(count, "COUNT"), timeout(rest)),
        ["hold", addr, conns, millis, interval] => {
            hold(parse(addr, "ADDR"), parse(conns, "CONNS"), parse(millis, "MILLIS"), parse(interval, "INTERVAL_MS"))
        }
        ["steady", addr, millis, interval] => steady(parse(addr, "ADDR"), parse(millis, "MILLIS"), parse(interval, "INTERVAL_MS")),
        _ => {
            eprintln!(
                "usage: echo-server serve NAME PORT | tcp ADDR COUNT [TIMEOUT_MS] | udp ADDR COUNT [TIMEOUT_MS] | hold ADDR CONNS MILLIS INTERVAL_MS | steady ADDR MILLIS INTERVAL_MS"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo-server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse<T: std::str::FromStr>(s: &str, what: &str) -> T {
    s.parse().unwrap_or_else(|_| {
        eprintln!("echo-server: {what} {s:?} is not valid");
        std::process::exit(2)
    })
}

fn timeout(rest: &[&str]) -> Duration {
    Duration::from_millis(rest.first().map_or(1000, |s| parse(s, "TIMEOUT_MS")))
}

fn serve(name: &str, port: u16) -> std::io::Result<()> {
    let tcp = TcpListener::bind(("0.0.0.0", port))?;
    let udp = UdpSocket::bind(("0.0.0.0", port))?;
    let udp_name = name.to_owned();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("{udp_name} {peer}").as_bytes(), peer);
        }
    });
    println!("ready");
    std::io::stdout().flush()?;
    for stream in tcp.incoming() {
        let Ok(stream) = stream else { continue };
        let name = name.to_owned();
        std::thread::spawn(move || {
            let Ok(peer) = stream.peer_addr() else { return };
            let Ok(mut out) = stream.try_clone() else { return };
            for line in BufReader::new(stream).lines() {
                if line.is_err() || out.write_all(format!("{name} {peer}\n").as_bytes()).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

/// An answer `NAME CLIENT` as JSON, or the error's kind.
fn answer(line: &str) -> serde_json::Value {
    match line.trim().split_once(' ') {
        Some((pod, client)) => json!({"pod": pod, "client": client}),
        None => json!({"error": "bad-reply", "detail": line}),
    }
}

fn error(e: &std::io::Error) -> serde_json::Value {
    use std::io::ErrorKind::*;
    let kind = match e.kind() {
        ConnectionRefused => "refused",
        TimedOut | WouldBlock => "timeout",
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => "reset",
        HostUnreachable | NetworkUnreachable => "unreachable",
        _ => "other",
    };
    json!({"error": kind, "detail": e.to_string()})
}

fn print(v: serde_json::Value) {
    println!("{v}");
}

fn ask(stream: &mut TcpStream, reader: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    stream.write_all(b"hello\n")?;
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
    }
    Ok(line)
}

fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<(TcpStream, BufReader<TcpStream>)> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let reader = BufReader::new(stream.try_clone()?);
    Ok((stream, reader))
}

fn tcp(addr: SocketAddr, count: u32, timeout: Duration) -> std::io::Result<()> {
    for _ in 0..count {
        let v = match connect(addr, timeout).and_then(|(mut s, mut r)| ask(&mut s, &mut r)) {
            Ok(line) => answer(&line),
            Err(e) => error(&e),
        };
        print(v);
    }
    Ok(())
}

fn udp(addr: SocketAddr, count: u32, timeout: Duration) -> std::io::Result<()> {
    let mut buf = [0u8; 2048];
    for _ in 0..count {
        let mut attempt = || -> std::io::Result<String> {
            // A fresh socket per datagram: a new source port, so a new load-balancing decision.
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            sock.set_read_timeout(Some(timeout))?;
            sock.send_to(b"hello", addr)?;
            let (n, from) = sock.recv_from(&mut buf)?;
            // The socket layer must make the reply look as if it came from the address we asked.
            if from != addr {
                return Ok(format!("{} from {from}", String::from_utf8_lossy(&buf[..n])));
            }
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        };
        let v = match attempt() {
            Ok(line) if line.contains(" from ") => json!({"error": "wrong-source", "detail": line}),
            Ok(line) => answer(&line),
            Err(e) => error(&e),
        };
        print(v);
    }
    Ok(())
}

fn hold(addr: SocketAddr, conns: usize, millis: u64, interval_ms: u64) -> std::io::Result<()> {
    let timeout = Duration::from_secs(1);
    let mut open = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (mut s, mut r) = connect(addr, timeout)?;
        let first = ask(&mut s, &mut r)?;
        open.push((s, r, answer(&first), 1u64, None::<serde_json::Value>));
    }
    println!("{}", json!({"connected": conns}));
    std::io::stdout().flush()?;
    let end = Instant::now() + Duration::from_millis(millis);
    while Instant::now() < end {
        for (s, r, backend, asked, failed) in open.iter_mut() {
            if failed.is_some() {
                continue;
            }
            match ask(s, r) {
                Ok(line) if answer(&line) == *backend => *asked += 1,
                Ok(line) => *failed = Some(json!({"error": "moved", "detail": line})),
                Err(e) => *failed = Some(error(&e)),
            }
        }
        std::thread::sleep(Duration::from_millis(interval_ms));
    }
    for (_, _, backend, asked, failed) in open {
        print(json!({"backend": backend, "asked": asked, "failed": failed}));
    }
    Ok(())
}

fn steady(addr: SocketAddr, millis: u64, interval_ms: u64) -> std::io::Result<()> {
    let start = Instant::now();
    let end = start + Duration::from_millis(millis);
    let (mut ok, mut failed, mut errors) = (0u64, 0u64, Vec::new());
    let mut next = start;
    while Instant::now() < end {
        // 3 s, not 1 s: on 2 busy cores a scheduling stall alone can hold a reply past 1 s; a
        // refused, reset or unanswered connection still fails.
        match connect(addr, Duration::from_secs(3)).and_then(|(mut s, mut r)| ask(&mut s, &mut r)) {
            Ok(_) => ok += 1,
            Err(e) => {
                failed += 1;
                if errors.len() < 10 {
                    let mut v = error(&e);
                    v["at_ms"] = json!(start.elapsed().as_millis() as u64);
                    errors.push(v);
                }
            }
        }
        // A fixed schedule, not a fixed pause: a slow attempt does not thin out the load.
        next += Duration::from_millis(interval_ms);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    print(json!({"ok": ok, "failed": failed, "errors": errors}));
    Ok(())
}
