//! Building test frames and checking frames a program wrote, with etherparse.
use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};

pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

/// L4 choices for [`ipv4`] and [`ipv6`].
#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Udp { sport: u16, dport: u16 },
    /// A SYN with the given sequence number.
    TcpSyn { sport: u16, dport: u16, seq: u32 },
    /// A pure ACK.
    TcpAck { sport: u16, dport: u16, seq: u32, ack: u32 },
    /// A FIN with ACK (a side closing its half).
    TcpFin { sport: u16, dport: u16, seq: u32, ack: u32 },
    /// A RST (no ACK).
    TcpRst { sport: u16, dport: u16, seq: u32 },
    IcmpEcho { id: u16, seq: u16 },
}

fn finish(builder: etherparse::PacketBuilderStep<etherparse::IpHeaders>, l4: L4, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let res = match l4 {
        L4::Udp { sport, dport } => builder.udp(sport, dport).write(&mut out, payload),
        L4::TcpSyn { sport, dport, seq } => builder.tcp(sport, dport, seq, 64240).syn().write(&mut out, payload),
        L4::TcpAck { sport, dport, seq, ack } => builder.tcp(sport, dport, seq, 64240).ack(ack).write(&mut out, payload),
        L4::TcpFin { sport, dport, seq, ack } => builder.tcp(sport, dport, seq, 64240).ack(ack).fin().write(&mut out, payload),
        L4::TcpRst { sport, dport, seq } => builder.tcp(sport, dport, seq, 0).rst().write(&mut out, payload),
        L4::IcmpEcho { id, seq } => builder.icmpv4_echo_request(id, seq).write(&mut out, payload),
    };
    res.expect("etherparse could not serialise the test packet");
    out
}

/// An Ethernet/IPv4 frame MAC_A -> MAC_B with correct checksums.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, l4: L4, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src.octets(), dst.octets(), 64);
    finish(b, l4, payload)
}

/// An Ethernet/IPv6 frame MAC_A -> MAC_B with correct checksums (ICMP is not offered for v6).
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, l4: L4, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv6(src.octets(), dst.octets(), 64);
    finish(b, l4, payload)
}

/// Recomputes the IPv4 header checksum in place (after a test mutated the header on purpose).
pub fn fix_ipv4_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    frame[24] = 0;
    frame[25] = 0;
    let sum = internet_checksum(&frame[14..14 + ihl]);
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
}

/// RFC 1071 one's-complement sum, for headers etherparse cannot rebuild (e.g. bad ones on purpose).
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Parses `frame` and recomputes every checksum it carries (IPv4 header, TCP, UDP, ICMPv4),
/// failing with a description of the first one that is wrong. Non-first fragments carry no L4
/// header and only get the IP check.
pub fn check_checksums(frame: &[u8]) -> Result<(), String> {
    let headers = PacketHeaders::from_ethernet_slice(frame).map_err(|e| format!("unparseable frame: {e}"))?;
    let payload = headers.payload.slice();
    match (&headers.net, &headers.transport) {
        (Some(NetHeaders::Ipv4(ip, _)), transport) => {
            let want = ip.calc_header_checksum();
            if ip.header_checksum != want {
                return Err(format!("IPv4 header checksum {:#06x}, expected {want:#06x}", ip.header_checksum));
            }
            if let Some(t) = transport {
                let mut fixed = t.clone();
                fixed.update_checksum_ipv4(ip, payload).map_err(|e| format!("checksum: {e}"))?;
                compare_l4(t, &fixed)?;
            }
        }
        (Some(NetHeaders::Ipv6(ip, _)), Some(t)) => {
            let mut fixed = t.clone();
            fixed.update_checksum_ipv6(ip, payload).map_err(|e| format!("checksum: {e}"))?;
            compare_l4(t, &fixed)?;
        }
        _ => {}
    }
    Ok(())
}

fn compare_l4(got: &TransportHeader, want: &TransportHeader) -> Result<(), String> {
    let (g, w, what) = match (got, want) {
        (TransportHeader::Tcp(g), TransportHeader::Tcp(w)) => (g.checksum, w.checksum, "TCP"),
        // IPv4 UDP may carry no checksum (0): nothing to verify then.
        (TransportHeader::Udp(g), TransportHeader::Udp(_)) if g.checksum == 0 => return Ok(()),
        (TransportHeader::Udp(g), TransportHeader::Udp(w)) => (g.checksum, w.checksum, "UDP"),
        (TransportHeader::Icmpv4(g), TransportHeader::Icmpv4(w)) => (g.checksum, w.checksum, "ICMPv4"),
        (TransportHeader::Icmpv6(g), TransportHeader::Icmpv6(w)) => (g.checksum, w.checksum, "ICMPv6"),
        _ => return Ok(()),
    };
    if g == w { Ok(()) } else { Err(format!("{what} checksum {g:#06x}, expected {w:#06x}")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    #[test]
    fn built_packets_have_valid_checksums() {
        for l4 in [
            L4::Udp { sport: 1, dport: 2 },
            L4::TcpSyn { sport: 3, dport: 4, seq: 5 },
            L4::TcpAck { sport: 3, dport: 4, seq: 5, ack: 6 },
            L4::IcmpEcho { id: 7, seq: 8 },
        ] {
            let f = ipv4(A, B, l4, b"hello");
            check_checksums(&f).unwrap();
        }
        let f = ipv6("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap(), L4::Udp { sport: 1, dport: 2 }, b"x");
        check_checksums(&f).unwrap();
    }

    #[test]
    fn checker_catches_each_broken_checksum() {
        let mut f = ipv4(A, B, L4::Udp { sport: 1, dport: 2 }, b"hello");
        f[14 + 8] = 1; // TTL changed without fixing the IP checksum
        assert!(check_checksums(&f).unwrap_err().contains("IPv4 header"));
        fix_ipv4_checksum(&mut f);
        check_checksums(&f).unwrap();

        let mut f = ipv4(A, B, L4::TcpSyn { sport: 1, dport: 2, seq: 3 }, b"");
        f[14 + 20] ^= 0xff; // source port changed without fixing the TCP checksum
        assert!(check_checksums(&f).unwrap_err().contains("TCP"));

        let mut f = ipv4(A, B, L4::Udp { sport: 1, dport: 2 }, b"hello");
        f[14 + 20 + 1] ^= 0xff;
        assert!(check_checksums(&f).unwrap_err().contains("UDP"));

        let mut f = ipv4(A, B, L4::IcmpEcho { id: 1, seq: 2 }, b"");
        f[14 + 20 + 4] ^= 0xff;
        assert!(check_checksums(&f).unwrap_err().contains("ICMPv4"));
    }
}
