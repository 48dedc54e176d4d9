//! ICMP "destination unreachable" for packets no peer can take.
//!
//! Pure. Kernel WireGuard answers a packet for an address no peer owns with
//! ICMP host unreachable (RFC 792) / ICMPv6 address unreachable (RFC 4443
//! §3.1) so that `ping` and `connect()` fail at once instead of timing out;
//! meshd does the same. No error is sent about an ICMP error, a non-first
//! fragment, or a multicast/unspecified source (RFC 1122 §3.2.2, RFC 4443 §2.4e).
//!
//! The error claims to come from the unreachable destination itself: it is
//! written *into* the TUN, and the kernel drops packets arriving with one of
//! its own addresses as source, so the node's overlay address can't be used.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const ICMP_HEADER: usize = 8;
/// RFC 4443 §2.4c: the error must not exceed the minimum IPv6 MTU.
const IPV6_MIN_MTU: usize = 1280;
/// RFC 1812 §4.3.2.3: quote as much as fits in 576 bytes.
const IPV4_MAX_ERROR: usize = 576;

/// Writes an unreachable message about `original` into `out` and returns its
/// length, or `None` when no message must be sent or `original` is malformed.
pub fn unreachable(original: &[u8], out: &mut [u8]) -> Option<usize> {
    match original.first()? >> 4 {
        4 => unreachable_v4(original, out),
        6 => unreachable_v6(original, out),
        _ => None,
    }
}

/// Whether a packet may be answered with an ICMP error at all.
pub fn is_multicast_or_broadcast(dst: IpAddr) -> bool {
    match dst {
        IpAddr::V4(a) => a.is_multicast() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_multicast(),
    }
}

fn unreachable_v4(original: &[u8], out: &mut [u8]) -> Option<usize> {
    let ihl = usize::from(original.first()? & 0x0f) * 4;
    if ihl < IPV4_HEADER || original.len() < ihl {
        return None;
    }
    let frag_offset = u16::from_be_bytes([original[6], original[7]]) & 0x1fff;
    let orig_src = Ipv4Addr::new(original[12], original[13], original[14], original[15]);
    let orig_dst = Ipv4Addr::new(original[16], original[17], original[18], original[19]);
    if frag_offset != 0
        || orig_src.is_unspecified()
        || orig_src.is_multicast()
        || orig_src.is_broadcast()
        || is_multicast_or_broadcast(IpAddr::V4(orig_dst))
    {
        return None;
    }
    // ICMP errors about ICMP errors are forbidden; only echo and other
    // informational types (0, 8, 13–18) may be answered.
    if original[9] == 1 {
        let icmp_type = *original.get(ihl)?;
        if !matches!(icmp_type, 0 | 8 | 13..=18) {
            return None;
        }
    }

    let quote = original
        .len()
        .min(IPV4_MAX_ERROR - IPV4_HEADER - ICMP_HEADER);
    let total = IPV4_HEADER + ICMP_HEADER + quote;
    let out = out.get_mut(..total)?;
    out.fill(0);
    out[0] = 0x45;
    out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    out[8] = 64; // TTL
    out[9] = 1; // ICMP
    out[12..16].copy_from_slice(&orig_dst.octets());
    out[16..20].copy_from_slice(&orig_src.octets());
    let ip_sum = checksum(&[&out[..IPV4_HEADER]], 0);
    out[10..12].copy_from_slice(&ip_sum.to_be_bytes());

    let icmp = &mut out[IPV4_HEADER..];
    icmp[0] = 3; // destination unreachable
    icmp[1] = 1; // host unreachable
    icmp[ICMP_HEADER..].copy_from_slice(&original[..quote]);
    let sum = checksum(&[icmp], 0);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    Some(total)
}

fn unreachable_v6(original: &[u8], out: &mut [u8]) -> Option<usize> {
    if original.len() < IPV6_HEADER {
        return None;
    }
    let orig_src = Ipv6Addr::from(<[u8; 16]>::try_from(&original[8..24]).ok()?);
    let orig_dst = Ipv6Addr::from(<[u8; 16]>::try_from(&original[24..40]).ok()?);
    if orig_src.is_unspecified() || orig_src.is_multicast() || orig_dst.is_multicast() {
        return None;
    }
    // ICMPv6 error messages are types 0–127 (RFC 4443 §2.1).
    if original[6] == 58 && *original.get(IPV6_HEADER)? < 128 {
        return None;
    }

    let quote = original.len().min(IPV6_MIN_MTU - IPV6_HEADER - ICMP_HEADER);
    let payload_len = ICMP_HEADER + quote;
    let total = IPV6_HEADER + payload_len;
    let out = out.get_mut(..total)?;
    out.fill(0);
    out[0] = 0x60;
    out[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
    out[6] = 58; // ICMPv6
    out[7] = 64; // hop limit
    out[8..24].copy_from_slice(&orig_dst.octets());
    out[24..40].copy_from_slice(&orig_src.octets());

    let (header, icmp) = out.split_at_mut(IPV6_HEADER);
    icmp[0] = 1; // destination unreachable
    icmp[1] = 3; // address unreachable
    icmp[ICMP_HEADER..].copy_from_slice(&original[..quote]);
    // Pseudo-header: source, destination, upper-layer length, next header.
    let pseudo = u32::from_be_bytes([0, 0, 0, 58]) as u64 + payload_len as u64;
    let sum = checksum(&[&header[8..40], icmp], pseudo);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    Some(total)
}

/// RFC 1071 Internet checksum over `parts` plus an initial sum.
pub fn checksum(parts: &[&[u8]], initial: u64) -> u16 {
    let mut sum = initial;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u64::from(*last) << 8;
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_v4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[8] = 64;
        p[9] = 1;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20] = 8;
        p
    }

    #[test]
    fn v4_unreachable_is_well_formed() {
        let orig = echo_v4([100, 72, 0, 1], [100, 72, 0, 9]);
        let mut out = [0u8; 1500];
        let n = unreachable(&orig, &mut out).unwrap();
        let msg = &out[..n];
        assert_eq!(msg[9], 1);
        assert_eq!(
            &msg[12..16],
            &[100, 72, 0, 9],
            "from the unreachable address"
        );
        assert_eq!(&msg[16..20], &[100, 72, 0, 1], "back to the sender");
        assert_eq!((msg[20], msg[21]), (3, 1));
        assert_eq!(&msg[28..], &orig[..]);
        assert_eq!(checksum(&[&msg[..20]], 0), 0, "IPv4 header checksum");
        assert_eq!(checksum(&[&msg[20..]], 0), 0, "ICMP checksum");
    }

    #[test]
    fn no_error_about_an_error() {
        let mut orig = echo_v4([100, 72, 0, 1], [100, 72, 0, 9]);
        orig[20] = 3;
        let mut out = [0u8; 1500];
        assert_eq!(unreachable(&orig, &mut out), None);
    }

    #[test]
    fn v6_unreachable_checksums() {
        let mut orig = vec![0u8; 48];
        orig[0] = 0x60;
        orig[4..6].copy_from_slice(&8u16.to_be_bytes());
        orig[6] = 58;
        orig[8..24].copy_from_slice(&"fd7a::1".parse::<Ipv6Addr>().unwrap().octets());
        orig[24..40].copy_from_slice(&"fd7a::9".parse::<Ipv6Addr>().unwrap().octets());
        orig[40] = 128; // echo request
        let mut out = [0u8; 1500];
        let n = unreachable(&orig, &mut out).unwrap();
        let msg = &out[..n];
        assert_eq!((msg[40], msg[41]), (1, 3));
        let pseudo = 58u64 + (n - 40) as u64;
        assert_eq!(checksum(&[&msg[8..40], &msg[40..]], pseudo), 0);
    }

    #[test]
    fn truncated_input_never_panics() {
        let mut out = [0u8; 1500];
        for len in 0..48 {
            let mut p = vec![0x45u8; len];
            let _ = unreachable(&p, &mut out);
            if let Some(b) = p.first_mut() {
                *b = 0x60;
            }
            let _ = unreachable(&p, &mut out);
        }
    }
}
