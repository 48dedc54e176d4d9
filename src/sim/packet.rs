//! Inner (overlay) IP packets for simulations: what an application would
//! write to `mesh0`.
//!
//! No I/O. Tests send numbered UDP *probes* from one overlay address to
//! another and read the numbers back out of what a node wrote to its TUN,
//! so they can say exactly which packets arrived. ICMP echo requests and a
//! small checked parser cover the ICMP cases. Builders produce well-formed
//! IPv4 (RFC 791) and IPv6 (RFC 8200) packets with correct lengths and
//! checksums; the parser never panics on any input.

use std::net::IpAddr;

use crate::engine::icmp::checksum;

/// Marks a UDP payload as a simulation probe.
pub const PROBE_MAGIC: [u8; 4] = *b"msim";
/// Probe payload length when none is asked for: magic and a sequence number.
pub const PROBE_MIN_PAYLOAD: usize = PROBE_MAGIC.len() + 8;
/// UDP port probes are sent from and to (RFC 4727's experimental range).
pub const PROBE_PORT: u16 = 1021;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const UDP_HEADER: usize = 8;

/// A UDP probe numbered `seq`, with a payload of [`PROBE_MIN_PAYLOAD`] bytes.
///
/// # Panics
///
/// When `src` and `dst` are of different families.
pub fn udp_probe(src: IpAddr, dst: IpAddr, seq: u64) -> Vec<u8> {
    udp_probe_sized(src, dst, seq, PROBE_MIN_PAYLOAD)
}

/// A UDP probe numbered `seq` whose UDP payload is `payload_len` bytes
/// (at least [`PROBE_MIN_PAYLOAD`]), for MTU tests.
///
/// # Panics
///
/// When `src` and `dst` are of different families.
pub fn udp_probe_sized(src: IpAddr, dst: IpAddr, seq: u64, payload_len: usize) -> Vec<u8> {
    let mut payload = vec![0u8; payload_len.max(PROBE_MIN_PAYLOAD)];
    payload[..4].copy_from_slice(&PROBE_MAGIC);
    payload[4..12].copy_from_slice(&seq.to_be_bytes());
    let mut udp = vec![0u8; UDP_HEADER + payload.len()];
    udp[0..2].copy_from_slice(&PROBE_PORT.to_be_bytes());
    udp[2..4].copy_from_slice(&PROBE_PORT.to_be_bytes());
    let udp_len = udp.len() as u16;
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[UDP_HEADER..].copy_from_slice(&payload);
    let sum = match transport_checksum(src, dst, PROTO_UDP, &udp) {
        // RFC 768: a computed zero is sent as all ones.
        0 => 0xffff,
        s => s,
    };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    ip_packet(src, dst, PROTO_UDP, &udp)
}

/// An ICMP (v4) or ICMPv6 echo request with identifier `id` and sequence `seq`.
///
/// # Panics
///
/// When `src` and `dst` are of different families.
pub fn icmp_echo_request(src: IpAddr, dst: IpAddr, id: u16, seq: u16) -> Vec<u8> {
    let (proto, echo_type) = match src {
        IpAddr::V4(_) => (PROTO_ICMP, 8),
        IpAddr::V6(_) => (PROTO_ICMPV6, 128),
    };
    let mut icmp = vec![0u8; 8 + 16];
    icmp[0] = echo_type;
    icmp[4..6].copy_from_slice(&id.to_be_bytes());
    icmp[6..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in icmp[8..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let sum = match src {
        IpAddr::V4(_) => checksum(&[&icmp], 0),
        IpAddr::V6(_) => transport_checksum(src, dst, proto, &icmp),
    };
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    ip_packet(src, dst, proto, &icmp)
}

fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, body: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = IPV4_HEADER + body.len();
            let mut p = vec![0u8; total];
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[6] = 0x40; // don't fragment
            p[8] = 64;
            p[9] = proto;
            p[12..16].copy_from_slice(&s.octets());
            p[16..20].copy_from_slice(&d.octets());
            let sum = checksum(&[&p[..IPV4_HEADER]], 0);
            p[10..12].copy_from_slice(&sum.to_be_bytes());
            p[IPV4_HEADER..].copy_from_slice(body);
            p
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = vec![0u8; IPV6_HEADER + body.len()];
            p[0] = 0x60;
            p[4..6].copy_from_slice(&(body.len() as u16).to_be_bytes());
            p[6] = proto;
            p[7] = 64;
            p[8..24].copy_from_slice(&s.octets());
            p[24..40].copy_from_slice(&d.octets());
            p[IPV6_HEADER..].copy_from_slice(body);
            p
        }
        _ => panic!("an inner packet needs one address family, got {src} -> {dst}"),
    }
}

/// RFC 768 / RFC 8200 §8.1 checksum over the pseudo-header and `body`.
fn transport_checksum(src: IpAddr, dst: IpAddr, proto: u8, body: &[u8]) -> u16 {
    let len = body.len() as u32;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => checksum(
            &[
                &s.octets(),
                &d.octets(),
                &[0, proto],
                &(len as u16).to_be_bytes(),
                body,
            ],
            0,
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => checksum(
            &[
                &s.octets(),
                &d.octets(),
                &len.to_be_bytes(),
                &[0, 0, 0, proto],
                body,
            ],
            0,
        ),
        _ => panic!("an inner packet needs one address family, got {src} -> {dst}"),
    }
}

/// The parts of an inner packet a test looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inner<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 protocol / IPv6 next header.
    pub protocol: u8,
    /// Everything after the IP header, cut to the length the header claims.
    pub body: &'a [u8],
}

impl<'a> Inner<'a> {
    /// Parses an IPv4 or IPv6 packet; `None` for anything malformed.
    pub fn parse(packet: &'a [u8]) -> Option<Self> {
        match packet.first()? >> 4 {
            4 => {
                let ihl = usize::from(packet[0] & 0x0f) * 4;
                let total = usize::from(u16::from_be_bytes(packet.get(2..4)?.try_into().ok()?));
                if ihl < IPV4_HEADER || total < ihl {
                    return None;
                }
                let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
                let dst: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
                Some(Self {
                    src: src.into(),
                    dst: dst.into(),
                    protocol: *packet.get(9)?,
                    body: packet.get(ihl..total)?,
                })
            }
            6 => {
                let len = usize::from(u16::from_be_bytes(packet.get(4..6)?.try_into().ok()?));
                let src: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
                let dst: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
                Some(Self {
                    src: src.into(),
                    dst: dst.into(),
                    protocol: *packet.get(6)?,
                    body: packet.get(IPV6_HEADER..IPV6_HEADER + len)?,
                })
            }
            _ => None,
        }
    }

    /// The sequence number, if this is a probe built by [`udp_probe`].
    pub fn probe_seq(&self) -> Option<u64> {
        if self.protocol != PROTO_UDP {
            return None;
        }
        let payload = self.body.get(UDP_HEADER..)?;
        if payload.get(..4)? != PROBE_MAGIC {
            return None;
        }
        Some(u64::from_be_bytes(payload.get(4..12)?.try_into().ok()?))
    }

    /// `(type, code)` if this is an ICMP or ICMPv6 message.
    pub fn icmp_type_code(&self) -> Option<(u8, u8)> {
        match self.protocol {
            PROTO_ICMP | PROTO_ICMPV6 => Some((*self.body.first()?, *self.body.get(1)?)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_v4_probe_carries_its_sequence_number_with_valid_checksums() {
        let p = udp_probe(ip("100.72.0.1"), ip("100.72.0.2"), 42);
        let inner = Inner::parse(&p).unwrap();
        assert_eq!((inner.src, inner.dst), (ip("100.72.0.1"), ip("100.72.0.2")));
        assert_eq!(inner.probe_seq(), Some(42));
        assert_eq!(checksum(&[&p[..20]], 0), 0);
        let IpAddr::V4(s) = inner.src else {
            unreachable!()
        };
        let IpAddr::V4(d) = inner.dst else {
            unreachable!()
        };
        let len = (inner.body.len() as u16).to_be_bytes();
        assert_eq!(
            checksum(&[&s.octets(), &d.octets(), &[0, 17], &len, inner.body], 0),
            0
        );
    }

    #[test]
    fn a_v6_probe_round_trips() {
        let p = udp_probe_sized(ip("fd7a::1"), ip("fd7a::2"), 7, 200);
        let inner = Inner::parse(&p).unwrap();
        assert_eq!(inner.probe_seq(), Some(7));
        assert_eq!(inner.body.len(), 208);
    }

    #[test]
    fn an_echo_request_is_icmp_type_8() {
        let p = icmp_echo_request(ip("100.72.0.1"), ip("100.72.0.2"), 1, 1);
        let inner = Inner::parse(&p).unwrap();
        assert_eq!(inner.icmp_type_code(), Some((8, 0)));
        assert_eq!(checksum(&[inner.body], 0), 0);
    }

    #[test]
    fn parsing_truncated_packets_never_panics() {
        let p = udp_probe(ip("100.72.0.1"), ip("100.72.0.2"), 1);
        let q = udp_probe(ip("fd7a::1"), ip("fd7a::2"), 1);
        for len in 0..p.len() {
            assert_eq!(Inner::parse(&p[..len]), None);
        }
        for len in 0..q.len() {
            assert_eq!(Inner::parse(&q[..len]), None);
        }
    }
}
