//! Segmentation of the TUN's super-packets, in place.
//!
//! Pure. With offloads the kernel hands meshd TCP (TSO) and UDP (USO)
//! super-packets of up to 64 KiB behind a virtio-net header, and packets
//! whose checksum it left to meshd (`NEEDS_CSUM`). They are cut into
//! MTU-sized segments the way the kernel's own GSO would (the rules and
//! results of tun-rs's `gso_split`, checked against it in the tests), but
//! without copying the payload: segment `i`'s headers are written just in
//! front of its payload, over the tail of segment `i - 1`, which the
//! callback has consumed by then (the engine encrypts each segment into a
//! buffer of its own). Only the headers and checksums are written.

use tun_rs::{
    VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4,
    VIRTIO_NET_HDR_LEN,
};

use super::{
    be16, be32, pseudo_header, put16, put32, IPPROTO_TCP, IPPROTO_UDP, TCP_CWR, TCP_FIN, TCP_PSH,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
};

const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;
/// IP plus transport headers of one segment, at most (IPv4 with options
/// and TCP with options: 60 + 60; IPv6 with extension headers up to this).
const MAX_HEADERS: usize = 192;

/// A read the kernel should never produce; the packet is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed TUN read: {0}")]
pub struct SplitError(&'static str);

/// Hands every packet of one TUN read (virtio-net header first) to `each`,
/// in order: a super-packet as its segments, anything else as it is, with
/// its checksum completed if the kernel left that to us. Returns how many.
pub fn split(read: &mut [u8], mut each: impl FnMut(&[u8])) -> Result<usize, SplitError> {
    if read.len() <= VIRTIO_NET_HDR_LEN {
        return Err(SplitError("shorter than its virtio-net header"));
    }
    let hdr = VirtioNetHdr::decode(&read[..VIRTIO_NET_HDR_LEN])
        .map_err(|_| SplitError("virtio-net header"))?;
    let pkt = &mut read[VIRTIO_NET_HDR_LEN..];
    let gso_type = hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN;
    if gso_type == 0 {
        if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            complete_checksum(
                pkt,
                usize::from(hdr.csum_start),
                usize::from(hdr.csum_offset),
            )?;
        }
        each(pkt);
        return Ok(1);
    }
    let v6 = match pkt[0] >> 4 {
        4 => false,
        6 => true,
        _ => return Err(SplitError("IP version")),
    };
    let tcp = match gso_type {
        VIRTIO_NET_HDR_GSO_TCPV4 if !v6 => true,
        VIRTIO_NET_HDR_GSO_TCPV6 if v6 => true,
        VIRTIO_NET_HDR_GSO_UDP_L4 => false,
        _ => return Err(SplitError("GSO type")),
    };
    // csum_start is where the transport header starts; the kernel's
    // hdr_len is not trusted (on the forward path it can be the whole
    // first segment).
    let ip_len = usize::from(hdr.csum_start);
    if ip_len < if v6 { 40 } else { 20 } {
        return Err(SplitError("transport header inside the IP header"));
    }
    let l4_len = if tcp {
        let offset = pkt.get(ip_len + 12).ok_or(SplitError("TCP header"))?;
        usize::from(offset >> 4) * 4
    } else {
        8
    };
    let hdr_len = ip_len + l4_len;
    let csum_at = ip_len + usize::from(hdr.csum_offset);
    let gso_size = usize::from(hdr.gso_size);
    if (tcp && l4_len < 20)
        || hdr_len > MAX_HEADERS
        || pkt.len() < hdr_len
        || csum_at + 2 > hdr_len
        || gso_size == 0
        || hdr_len + gso_size > usize::from(u16::MAX)
    {
        return Err(SplitError("headers"));
    }
    let mut template = [0u8; MAX_HEADERS];
    template[..hdr_len].copy_from_slice(&pkt[..hdr_len]);
    let template = &template[..hdr_len];
    let addresses = if v6 { 8..40 } else { 12..20 };
    let proto = if tcp { IPPROTO_TCP } else { IPPROTO_UDP };
    let seq = be32(template, ip_len + 4);
    let id = be16(template, 4);

    let len = pkt.len();
    let mut count = 0;
    let mut data_at = hdr_len;
    while data_at < len {
        let end = len.min(data_at + gso_size);
        let start = data_at - hdr_len;
        let segment = &mut pkt[start..end];
        segment[..hdr_len].copy_from_slice(template);
        let total = segment.len();
        let l4_total = (total - ip_len) as u16;
        if v6 {
            put16(segment, 4, (total - 40) as u16);
        } else {
            put16(segment, 2, total as u16);
            put16(segment, 4, id.wrapping_add(count as u16));
            put16(segment, 10, 0);
            let sum = !tun_rs::checksum(&segment[..ip_len], 0);
            put16(segment, 10, sum);
        }
        if tcp {
            put32(
                segment,
                ip_len + 4,
                seq.wrapping_add((count * gso_size) as u32),
            );
            let flags = &mut segment[ip_len + 13];
            if count > 0 {
                // As Linux: CWR only on the first segment.
                *flags &= !TCP_CWR;
            }
            if end != len {
                // FIN and PSH only on the last.
                *flags &= !(TCP_FIN | TCP_PSH);
            }
        } else {
            put16(segment, ip_len + 4, l4_total);
        }
        put16(segment, csum_at, 0);
        let pseudo = pseudo_header(&segment[addresses.clone()], proto, l4_total);
        let mut sum = !tun_rs::checksum(&segment[ip_len..], pseudo);
        if !tcp && sum == 0 {
            sum = u16::MAX;
        }
        put16(segment, csum_at, sum);
        each(segment);
        count += 1;
        data_at = end;
    }
    Ok(count)
}

/// `CHECKSUM_PARTIAL`: the field holds the pseudo-header sum; add the rest.
fn complete_checksum(pkt: &mut [u8], start: usize, offset: usize) -> Result<(), SplitError> {
    let at = start + offset;
    if at + 2 > pkt.len() {
        return Err(SplitError("checksum field outside the packet"));
    }
    let initial = u64::from(be16(pkt, at));
    put16(pkt, at, 0);
    let sum = !tun_rs::checksum(&pkt[start..], initial);
    put16(pkt, at, sum);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::fold;
    use super::*;

    /// A super-packet as the kernel hands it over: headers of the first
    /// segment (lengths of the whole), the pseudo-header sum in the
    /// checksum field, `payload` bytes of data.
    fn super_packet(v6: bool, tcp: bool, payload: usize, gso_size: u16, flags: u8) -> Vec<u8> {
        let ip_len = if v6 { 40 } else { 20 };
        let l4_len = if tcp { 32 } else { 8 };
        let total = ip_len + l4_len + payload;
        let mut p = vec![0u8; VIRTIO_NET_HDR_LEN + total];
        let proto = if tcp { IPPROTO_TCP } else { IPPROTO_UDP };
        {
            let q = &mut p[VIRTIO_NET_HDR_LEN..];
            if v6 {
                q[0] = 0x60;
                put16(q, 4, (total - 40) as u16);
                q[6] = proto;
                q[7] = 64;
                q[23] = 1;
                q[39] = 2;
            } else {
                q[0] = 0x45;
                put16(q, 2, total as u16);
                put16(q, 4, 0xfffe); // wraps while segmenting
                q[6] = 0x40;
                q[8] = 64;
                q[9] = proto;
                q[12..20].copy_from_slice(&[100, 72, 0, 1, 100, 72, 0, 2]);
                let sum = !tun_rs::checksum(&q[..20], 0);
                put16(q, 10, sum);
            }
            put16(q, ip_len, 40000);
            put16(q, ip_len + 2, 5201);
            if tcp {
                put32(q, ip_len + 4, 0xffff_f000); // wraps too
                q[ip_len + 12] = 8 << 4;
                q[ip_len + 13] = flags;
                q[ip_len + 20..ip_len + 32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3]);
            } else {
                put16(q, ip_len + 4, (l4_len + payload) as u16);
            }
            for (i, b) in q[ip_len + l4_len..].iter_mut().enumerate() {
                *b = (i * 7 + i / 251) as u8;
            }
            let addresses = if v6 { 8..40 } else { 12..20 };
            let partial = fold(pseudo_header(&q[addresses], proto, (total - ip_len) as u16));
            put16(q, ip_len + if tcp { 16 } else { 6 }, partial);
        }
        let hdr = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: match (tcp, v6) {
                (true, false) => VIRTIO_NET_HDR_GSO_TCPV4,
                (true, true) => VIRTIO_NET_HDR_GSO_TCPV6,
                (false, _) => VIRTIO_NET_HDR_GSO_UDP_L4,
            },
            hdr_len: (ip_len + l4_len) as u16,
            gso_size,
            csum_start: ip_len as u16,
            csum_offset: if tcp { 16 } else { 6 },
        };
        hdr.encode(&mut p[..VIRTIO_NET_HDR_LEN]).unwrap();
        p
    }

    fn ours(read: &[u8]) -> Result<Vec<Vec<u8>>, SplitError> {
        let mut read = read.to_vec();
        let mut out = Vec::new();
        let n = split(&mut read, |s| out.push(s.to_vec()))?;
        assert_eq!(n, out.len());
        Ok(out)
    }

    /// tun-rs's copying splitter, the reference.
    fn reference(read: &[u8]) -> Vec<Vec<u8>> {
        let hdr = VirtioNetHdr::decode(&read[..VIRTIO_NET_HDR_LEN]).unwrap();
        let mut input = read[VIRTIO_NET_HDR_LEN..].to_vec();
        let mut bufs = vec![vec![0u8; 2000]; 200];
        let mut sizes = vec![0; 200];
        let v6 = input[0] >> 4 == 6;
        let n = tun_rs::gso_split(&mut input, hdr, &mut bufs, &mut sizes, 0, v6).unwrap();
        (0..n).map(|i| bufs[i][..sizes[i]].to_vec()).collect()
    }

    #[test]
    fn super_packets_split_exactly_as_the_reference_does() {
        for v6 in [false, true] {
            for tcp in [true, false] {
                for (payload, gso) in [
                    (1340 * 48, 1340),
                    (1340 * 10 + 77, 1340),
                    (500, 1340),
                    (1, 1340),
                    (150, 1),
                ] {
                    for flags in [0x10, 0x18, 0x19, 0x98] {
                        let read = super_packet(v6, tcp, payload, gso, flags);
                        let want = reference(&read);
                        assert_eq!(
                            ours(&read).unwrap(),
                            want,
                            "v6={v6} tcp={tcp} payload={payload} flags={flags:#x}"
                        );
                        if !tcp {
                            break;
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_plain_packet_gets_its_checksum_completed() {
        // One segment's worth, announced as no GSO.
        let mut read = super_packet(false, true, 100, 1340, 0x18);
        read[1] = 0;
        let got = ours(&read).unwrap();
        let want = reference(&super_packet(false, true, 100, 1340, 0x18));
        assert_eq!(got, want);
        // Without NEEDS_CSUM the packet is passed on untouched.
        read[0] = 0;
        assert_eq!(
            ours(&read).unwrap(),
            vec![read[VIRTIO_NET_HDR_LEN..].to_vec()]
        );
    }

    #[test]
    fn malformed_reads_are_errors_not_panics() {
        let good = super_packet(false, true, 5000, 1340, 0x10);
        assert!(ours(&good[..VIRTIO_NET_HDR_LEN]).is_err());
        for cut in VIRTIO_NET_HDR_LEN + 1..VIRTIO_NET_HDR_LEN + 60 {
            let _ = ours(&good[..cut]);
        }
        let mutate = |at: usize, v: u8| {
            let mut r = good.clone();
            r[at] = v;
            ours(&r)
        };
        assert!(mutate(1, 0x42).is_err(), "unknown GSO type");
        assert!(
            mutate(1, VIRTIO_NET_HDR_GSO_TCPV6).is_err(),
            "IPv4 packet, IPv6 GSO"
        );
        let mut zero_gso = good.clone();
        zero_gso[4..6].fill(0);
        assert!(ours(&zero_gso).is_err(), "gso_size 0");
        assert!(mutate(6, 4).is_err(), "csum_start inside the IP header");
        assert!(mutate(VIRTIO_NET_HDR_LEN, 0x75).is_err(), "IP version 7");
        assert!(
            mutate(VIRTIO_NET_HDR_LEN + 20 + 12, 0x20).is_err(),
            "TCP header of 8 bytes"
        );
        assert!(mutate(8, 200).is_err(), "checksum field beyond the headers");
        // Every byte of the header area set to every extreme: never a panic.
        for at in 0..VIRTIO_NET_HDR_LEN + 60 {
            for v in [0, 1, 0x7f, 0x80, 0xff] {
                let _ = mutate(at, v);
            }
        }
    }
}
