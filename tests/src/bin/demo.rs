//! The demo `cargo xtask demo` runs: a client and a node, each in its own network namespace, the
//! data plane's XDP and TC programs attached to the node's interface, real UDP and TCP traffic,
//! and the per-hook counters the programs kept.
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode},
};
use dataplane_agent::{loader, stats::read_counter};
use dataplane_common::metrics::{Counter, DROPS_MAP, DropReason, HOOKS_MAP, Hook};
use dataplane_tests::netns::{NetNs, Veth};

fn attach_all(ebpf: &mut Ebpf, ifname: &str) -> anyhow::Result<()> {
    let xdp: &mut Xdp = ebpf.program_mut(loader::programs::XDP_INGRESS).unwrap().try_into()?;
    xdp.load()?;
    xdp.attach(ifname, XdpMode::Driver)?;
    for (name, kind) in [(loader::programs::TC_INGRESS, TcAttachType::Ingress), (loader::programs::TC_EGRESS, TcAttachType::Egress)] {
        let tc: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into()?;
        tc.load()?;
        tc.attach(ifname, kind)?;
    }
    Ok(())
}

fn sum(ebpf: &Ebpf, map: &str, index: u32) -> anyhow::Result<Counter> {
    let arr: PerCpuArray<_, Counter> = PerCpuArray::try_from(ebpf.map(map).unwrap())?;
    Ok(read_counter(&arr, index)?)
}

fn main() -> anyhow::Result<()> {
    dataplane_tests::kernel_available().map_err(|e| anyhow::anyhow!("the demo needs the kernel: {e}"))?;
    println!("creating namespaces `client` (10.99.0.1) and `node` (10.99.0.2), joined by a veth pair");
    let client = NetNs::new();
    let node = NetNs::new();
    let _veth = Veth::new(&client, "eth0", &node, "eth0");
    client.ip(&["addr", "add", "10.99.0.1/24", "dev", "eth0"]);
    node.ip(&["addr", "add", "10.99.0.2/24", "dev", "eth0"]);

    println!("loading the data plane's eBPF object; attaching XDP (driver mode) and TC ingress/egress to node/eth0");
    let ebpf = node.run(|| -> anyhow::Result<Ebpf> {
        let mut ebpf = loader::load(None)?;
        attach_all(&mut ebpf, "eth0")?;
        Ok(ebpf)
    })?;

    let udp_server = node.run(|| UdpSocket::bind("10.99.0.2:5353"))?;
    let tcp_server = node.run(|| TcpListener::bind("10.99.0.2:8080"))?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = tcp_server.accept()?;
        let mut buf = [0u8; 1024];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            s.write_all(&buf[..n])?;
        }
    });
    let client_udp = client.run(|| UdpSocket::bind("10.99.0.1:0"))?;
    client_udp.set_read_timeout(Some(Duration::from_secs(3)))?;
    udp_server.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut buf = [0u8; 1500];
    for i in 0..100 {
        client_udp.send_to(format!("datagram {i}").as_bytes(), "10.99.0.2:5353")?;
        udp_server.recv_from(&mut buf)?;
    }
    println!("sent 100 UDP datagrams client -> node:5353; all arrived");
    let mut tcp = client.run(|| TcpStream::connect("10.99.0.2:8080"))?;
    let payload = vec![0x5a; 64 * 1024];
    tcp.write_all(&payload)?;
    let mut back = vec![0u8; payload.len()];
    tcp.read_exact(&mut back)?;
    drop(tcp);
    echo.join().expect("echo thread")?;
    println!("echoed 64 KiB over TCP client -> node:8080; bytes matched: {}", back == payload);

    println!("\ncounters kept by the programs (summed over CPUs):");
    println!("  {:<14} {:>10} {:>12}", "hook", "packets", "bytes");
    for hook in Hook::ALL {
        let c = sum(&ebpf, HOOKS_MAP, hook as u32)?;
        println!("  {:<14} {:>10} {:>12}", hook.name(), c.packets, c.bytes);
    }
    let drops: u64 = DropReason::ALL.iter().map(|r| sum(&ebpf, DROPS_MAP, *r as u32).map(|c| c.packets)).sum::<anyhow::Result<u64>>()?;
    println!("  drops (all reasons): {drops}");
    println!("\ntearing down: namespaces, links and programs are removed");
    Ok(())
}
