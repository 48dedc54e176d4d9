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
//!
//! With UDP-tunnel GSO ([`VnetHeader::Tunnel`]) a super-packet may also be
//! a whole tunnel's worth: outer IP, outer UDP, the tunnel's own header
//! (VXLAN's 8 bytes and the inner Ethernet header, Geneve's, …), then an
//! inner TCP or UDP super-packet. That is what flannel's VXLAN device sends
//! over mesh0. The inner packet is cut exactly as a plain one would be and
//! every segment gets its own outer headers: IPv4 length, ID and checksum
//! (or IPv6 payload length), UDP length, and the outer UDP checksum where
//! the tunnel uses one, derived from the inner checksum (local checksum
//! offload: the sum over a transport header and payload whose checksum is
//! right is the negated pseudo-header sum), so the payload is summed once.
//! The tunnel's own header is copied unchanged.

use tun_rs::{
    VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4,
    VIRTIO_NET_HDR_LEN,
};

use super::{
    be16, be32, fold, pseudo_header, put16, put32, VnetHeader, IPPROTO_TCP, IPPROTO_UDP, TCP_CWR,
    TCP_FIN, TCP_PSH, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM,
    VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4, VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6, VNET_INNER_NH_OFFSET,
    VNET_OUTER_TH_OFFSET,
};

const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;
const VIRTIO_NET_HDR_GSO_UDP_TUNNEL: u8 =
    VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4 | VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6;
/// Every header of one segment, at most: IP plus transport (IPv4 with
/// options and TCP with options: 60 + 60; IPv6 with extension headers up
/// to this), and in a tunnel the outer IP and UDP headers and the tunnel's
/// own in front of those.
const MAX_HEADERS: usize = 256;

/// A read the kernel should never produce; the packet is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed TUN read: {0}")]
pub struct SplitError(&'static str);

/// The outer headers of a UDP-tunnel super-packet.
#[derive(Clone, Copy)]
struct Outer {
    v6: bool,
    /// Where the outer UDP header starts (the outer IP header's length).
    th: usize,
    /// Where the inner IP header starts.
    inner_nh: usize,
    /// The outer UDP checksum is to be filled in (else it is zero).
    csum: bool,
}

impl Outer {
    /// Reads the tunnel fields of a virtio header whose GSO type has the
    /// tunnel bits `tunnel`.
    fn parse(head: &[u8], hdr: &VirtioNetHdr, tunnel: u8, pkt: &[u8]) -> Result<Self, SplitError> {
        let (Some(th), Some(inner_nh)) = (
            head.get(VNET_OUTER_TH_OFFSET..VNET_OUTER_TH_OFFSET + 2),
            head.get(VNET_INNER_NH_OFFSET..VNET_INNER_NH_OFFSET + 2),
        ) else {
            return Err(SplitError(
                "UDP-tunnel GSO behind a header without its offsets",
            ));
        };
        // The kernel writes the header in the host's byte order (a TUN's
        // legacy header) unless told otherwise, as tun-rs reads the rest.
        let th = usize::from(u16::from_ne_bytes([th[0], th[1]]));
        let inner_nh = usize::from(u16::from_ne_bytes([inner_nh[0], inner_nh[1]]));
        let v6 = match tunnel {
            VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4 => false,
            VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6 => true,
            _ => return Err(SplitError("UDP tunnel over both IPv4 and IPv6")),
        };
        if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 {
            return Err(SplitError("UDP-tunnel GSO without NEEDS_CSUM"));
        }
        if pkt.first().map(|b| b >> 4) != Some(if v6 { 6 } else { 4 }) {
            return Err(SplitError("outer IP version"));
        }
        if th < if v6 { 40 } else { 20 } || inner_nh < th + 8 {
            return Err(SplitError("tunnel offsets"));
        }
        Ok(Self {
            v6,
            th,
            inner_nh,
            csum: hdr.flags & VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM != 0,
        })
    }

    /// Fixes the outer headers of `segment`, the `count`th, whose inner
    /// transport header starts at `inner_th` and whose inner checksum is
    /// complete, `inner_pseudo` being the inner pseudo-header sum it was
    /// computed with.
    fn fix(&self, segment: &mut [u8], count: usize, id: u16, inner_th: usize, inner_pseudo: u64) {
        let total = segment.len();
        if self.v6 {
            put16(segment, 4, (total - 40) as u16);
        } else {
            put16(segment, 2, total as u16);
            put16(segment, 4, id.wrapping_add(count as u16));
            put16(segment, 10, 0);
            let sum = !tun_rs::checksum(&segment[..self.th], 0);
            put16(segment, 10, sum);
        }
        let udp_len = (total - self.th) as u16;
        put16(segment, self.th + 4, udp_len);
        put16(segment, self.th + 6, 0);
        if !self.csum {
            return;
        }
        let addresses = if self.v6 { 8..40 } else { 12..20 };
        let pseudo = pseudo_header(&segment[addresses], IPPROTO_UDP, udp_len);
        let sum = if (inner_th - self.th) % 2 == 0 {
            // The inner transport header and payload, checksum included,
            // sum to the inverse of their pseudo-header's sum.
            let inner = u64::from(!fold(inner_pseudo));
            !tun_rs::checksum(&segment[self.th..inner_th], pseudo + inner)
        } else {
            // Odd-length tunnel headers put the inner words out of step.
            !tun_rs::checksum(&segment[self.th..], pseudo)
        };
        put16(segment, self.th + 6, if sum == 0 { u16::MAX } else { sum });
    }
}

/// Hands every packet of one TUN read (a virtio-net header of `header`'s
/// size first) to `each`, in order: a super-packet as its segments,
/// anything else as it is, with its checksum completed if the kernel left
/// that to us. Returns how many.
pub fn split(
    read: &mut [u8],
    header: VnetHeader,
    mut each: impl FnMut(&[u8]),
) -> Result<usize, SplitError> {
    if read.len() <= header.size() {
        return Err(SplitError("shorter than its virtio-net header"));
    }
    let (head, pkt) = read.split_at_mut(header.size());
    let hdr = VirtioNetHdr::decode(&head[..VIRTIO_NET_HDR_LEN])
        .map_err(|_| SplitError("virtio-net header"))?;
    if hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN == 0 {
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
    let tunnel = hdr.gso_type & VIRTIO_NET_HDR_GSO_UDP_TUNNEL;
    let outer = match tunnel {
        0 => None,
        _ => Some(Outer::parse(head, &hdr, tunnel, pkt)?),
    };
    // The packet that is cut: the whole read, or the tunnel's inner one.
    let nh = outer.map_or(0, |o| o.inner_nh);
    let v6 = match pkt.get(nh).map(|b| b >> 4) {
        Some(4) => false,
        Some(6) => true,
        _ => return Err(SplitError("IP version")),
    };
    let tcp = match hdr.gso_type & !(VIRTIO_NET_HDR_GSO_ECN | VIRTIO_NET_HDR_GSO_UDP_TUNNEL) {
        VIRTIO_NET_HDR_GSO_TCPV4 if !v6 => true,
        VIRTIO_NET_HDR_GSO_TCPV6 if v6 => true,
        VIRTIO_NET_HDR_GSO_UDP_L4 => false,
        _ => return Err(SplitError("GSO type")),
    };
    // csum_start is where the transport header starts; the kernel's
    // hdr_len is not trusted (on the forward path it can be the whole
    // first segment).
    let th = usize::from(hdr.csum_start);
    if th < nh + if v6 { 40 } else { 20 } {
        return Err(SplitError("transport header inside the IP header"));
    }
    let l4_len = if tcp {
        let offset = pkt.get(th + 12).ok_or(SplitError("TCP header"))?;
        usize::from(offset >> 4) * 4
    } else {
        8
    };
    let hdr_len = th + l4_len;
    let csum_at = th + usize::from(hdr.csum_offset);
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
    let addresses = if v6 {
        nh + 8..nh + 40
    } else {
        nh + 12..nh + 20
    };
    let proto = if tcp { IPPROTO_TCP } else { IPPROTO_UDP };
    let seq = be32(template, th + 4);
    let id = be16(template, nh + 4);
    let outer_id = be16(template, 4);

    let len = pkt.len();
    let mut count = 0;
    let mut data_at = hdr_len;
    while data_at < len {
        let end = len.min(data_at + gso_size);
        let start = data_at - hdr_len;
        let segment = &mut pkt[start..end];
        segment[..hdr_len].copy_from_slice(template);
        let total = segment.len();
        let l4_total = (total - th) as u16;
        if v6 {
            put16(segment, nh + 4, (total - nh - 40) as u16);
        } else {
            put16(segment, nh + 2, (total - nh) as u16);
            put16(segment, nh + 4, id.wrapping_add(count as u16));
            put16(segment, nh + 10, 0);
            let sum = !tun_rs::checksum(&segment[nh..th], 0);
            put16(segment, nh + 10, sum);
        }
        if tcp {
            put32(segment, th + 4, seq.wrapping_add((count * gso_size) as u32));
            let flags = &mut segment[th + 13];
            if count > 0 {
                // As Linux: CWR only on the first segment.
                *flags &= !TCP_CWR;
            }
            if end != len {
                // FIN and PSH only on the last.
                *flags &= !(TCP_FIN | TCP_PSH);
            }
        } else {
            put16(segment, th + 4, l4_total);
        }
        put16(segment, csum_at, 0);
        let pseudo = pseudo_header(&segment[addresses.clone()], proto, l4_total);
        let mut sum = !tun_rs::checksum(&segment[th..], pseudo);
        if !tcp && sum == 0 {
            sum = u16::MAX;
        }
        put16(segment, csum_at, sum);
        if let Some(outer) = &outer {
            outer.fix(segment, count, outer_id, th, pseudo);
        }
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
        let n = split(&mut read, VnetHeader::Legacy, |s| out.push(s.to_vec()))?;
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

    /// The tunnel's own header between outer UDP and inner IP: VXLAN's 8
    /// bytes and an Ethernet header, as flannel's VXLAN device writes them.
    const VXLAN: [u8; 22] = [
        0x08, 0, 0, 0, 0, 0, 1, 0, // VXLAN, VNI 1
        0x02, 0, 0, 0, 0, 0xbb, 0x02, 0, 0, 0, 0, 0xaa, 0x08, 0x00, // Ethernet, IPv4
    ];

    /// A UDP-tunnel read as the kernel hands it over with UDP-tunnel GSO:
    /// the 24-byte header, outer IP (`outer_v6`), outer UDP (checksum
    /// asked for if `csum`), `tunnel` bytes, then `inner` (a legacy read's
    /// packet, its virtio header dropped), whose GSO fields are reused.
    fn tunnel_read(outer_v6: bool, csum: bool, tunnel: &[u8], inner: &[u8]) -> Vec<u8> {
        let inner_hdr = VirtioNetHdr::decode(&inner[..VIRTIO_NET_HDR_LEN]).unwrap();
        let inner = &inner[VIRTIO_NET_HDR_LEN..];
        let ip_len = if outer_v6 { 40 } else { 20 };
        let inner_nh = ip_len + 8 + tunnel.len();
        let total = inner_nh + inner.len();
        let mut outer = vec![0u8; ip_len + 8];
        if outer_v6 {
            outer[0] = 0x60;
            put16(&mut outer, 4, (total - 40) as u16);
            outer[6] = IPPROTO_UDP;
            outer[7] = 64;
            outer[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            outer[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            outer[0] = 0x45;
            put16(&mut outer, 2, total as u16);
            put16(&mut outer, 4, 0xffff); // wraps while segmenting
            outer[6] = 0x40;
            outer[8] = 64;
            outer[9] = IPPROTO_UDP;
            outer[12..20].copy_from_slice(&[100, 64, 0, 1, 100, 64, 0, 2]);
        }
        put16(&mut outer, ip_len, 51000);
        put16(&mut outer, ip_len + 2, 8472);
        put16(&mut outer, ip_len + 4, (total - ip_len) as u16);
        // Whatever the kernel left in the outer checksum: meshd rewrites it.
        put16(&mut outer, ip_len + 6, 0x1234);
        let hdr = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM
                | if csum {
                    VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM
                } else {
                    0
                },
            gso_type: inner_hdr.gso_type
                | if outer_v6 {
                    VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6
                } else {
                    VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4
                },
            hdr_len: inner_hdr.hdr_len + inner_nh as u16,
            gso_size: inner_hdr.gso_size,
            csum_start: inner_hdr.csum_start + inner_nh as u16,
            csum_offset: inner_hdr.csum_offset,
        };
        let mut read = vec![0u8; VnetHeader::Tunnel.size()];
        hdr.encode(&mut read[..VIRTIO_NET_HDR_LEN]).unwrap();
        read[VNET_OUTER_TH_OFFSET..VNET_OUTER_TH_OFFSET + 2]
            .copy_from_slice(&(ip_len as u16).to_ne_bytes());
        read[VNET_INNER_NH_OFFSET..VNET_INNER_NH_OFFSET + 2]
            .copy_from_slice(&(inner_nh as u16).to_ne_bytes());
        read.extend_from_slice(&outer);
        read.extend_from_slice(tunnel);
        read.extend_from_slice(inner);
        read
    }

    /// What each segment of a tunnel read must be, built independently:
    /// the inner super-packet cut on its own (checked against tun-rs
    /// above), each piece behind a copy of the outer headers with its own
    /// lengths, IPv4 ID and header checksum, and an outer UDP checksum
    /// summed over the whole datagram (or zero).
    fn tunnel_reference(read: &[u8], inner: &[u8], csum: bool) -> Vec<Vec<u8>> {
        let hl = VnetHeader::Tunnel.size();
        let th = usize::from(u16::from_ne_bytes([read[20], read[21]]));
        let nh = usize::from(u16::from_ne_bytes([read[22], read[23]]));
        let v6 = read[hl] >> 4 == 6;
        let template = &read[hl..hl + nh];
        let id = be16(template, 4);
        ours(inner)
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, piece)| {
                let mut seg = [template, &piece[..]].concat();
                let total = seg.len();
                if v6 {
                    put16(&mut seg, 4, (total - 40) as u16);
                } else {
                    put16(&mut seg, 2, total as u16);
                    put16(&mut seg, 4, id.wrapping_add(i as u16));
                    put16(&mut seg, 10, 0);
                    let sum = !tun_rs::checksum(&seg[..th], 0);
                    put16(&mut seg, 10, sum);
                }
                put16(&mut seg, th + 4, (total - th) as u16);
                put16(&mut seg, th + 6, 0);
                if csum {
                    let addresses = if v6 { 8..40 } else { 12..20 };
                    let pseudo = pseudo_header(&seg[addresses], IPPROTO_UDP, (total - th) as u16);
                    let sum = !tun_rs::checksum(&seg[th..], pseudo);
                    put16(&mut seg, th + 6, if sum == 0 { u16::MAX } else { sum });
                }
                seg
            })
            .collect()
    }

    fn ours_tunnel(read: &[u8]) -> Result<Vec<Vec<u8>>, SplitError> {
        let mut read = read.to_vec();
        let mut out = Vec::new();
        let n = split(&mut read, VnetHeader::Tunnel, |s| out.push(s.to_vec()))?;
        assert_eq!(n, out.len());
        Ok(out)
    }

    #[test]
    fn tunnel_super_packets_split_into_whole_tunnel_packets() {
        // An odd-length tunnel header puts the inner words out of step
        // with the outer checksum's: summed the long way, same result.
        let odd_tunnel = [0x42u8; 9];
        for outer_v6 in [false, true] {
            for csum in [true, false] {
                for tunnel in [&VXLAN[..], &odd_tunnel[..]] {
                    for inner_v6 in [false, true] {
                        for tcp in [true, false] {
                            for (payload, gso) in
                                [(1280 * 40, 1280), (1280 * 3 + 5, 1280), (90, 1280)]
                            {
                                let mut inner = super_packet(inner_v6, tcp, payload, gso, 0x18);
                                if inner_v6 {
                                    inner[VIRTIO_NET_HDR_LEN + 8..VIRTIO_NET_HDR_LEN + 40]
                                        .rotate_left(3);
                                }
                                let read = tunnel_read(outer_v6, csum, tunnel, &inner);
                                let got = ours_tunnel(&read).unwrap();
                                assert_eq!(
                                    got,
                                    tunnel_reference(&read, &inner, csum),
                                    "outer_v6={outer_v6} csum={csum} tunnel={} inner_v6={inner_v6} tcp={tcp} payload={payload}",
                                    tunnel.len()
                                );
                                assert_eq!(got.len(), payload.div_ceil(usize::from(gso)));
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_legacy_read_behind_the_tunnel_header_splits_as_before() {
        for tcp in [true, false] {
            let legacy = super_packet(false, tcp, 1340 * 7 + 3, 1340, 0x10);
            let mut read = vec![0u8; VnetHeader::Tunnel.size()];
            read[..VIRTIO_NET_HDR_LEN].copy_from_slice(&legacy[..VIRTIO_NET_HDR_LEN]);
            read.extend_from_slice(&legacy[VIRTIO_NET_HDR_LEN..]);
            assert_eq!(ours_tunnel(&read).unwrap(), reference(&legacy));
        }
    }

    #[test]
    fn malformed_tunnel_reads_are_errors_not_panics() {
        let inner = super_packet(false, true, 1280 * 6, 1280, 0x10);
        let good = tunnel_read(false, true, &VXLAN, &inner);
        assert!(ours_tunnel(&good).is_ok());
        // Behind the 10-byte header there are no tunnel offsets.
        let legacy = [
            &good[..VIRTIO_NET_HDR_LEN],
            &good[VnetHeader::Tunnel.size()..],
        ]
        .concat();
        assert!(ours(&legacy).is_err(), "UDP-tunnel GSO in a legacy header");
        let mutate = |at: usize, v: u8| {
            let mut r = good.clone();
            r[at] = v;
            ours_tunnel(&r)
        };
        assert!(
            mutate(1, good[1] | VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6).is_err(),
            "both tunnel bits"
        );
        assert!(
            mutate(1, VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6 | 1).is_err(),
            "outer IPv4 as IPv6"
        );
        assert!(
            mutate(1, VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4).is_err(),
            "tunnel without an inner GSO type"
        );
        assert!(mutate(0, 0).is_err(), "without NEEDS_CSUM");
        assert!(
            mutate(VNET_OUTER_TH_OFFSET, 8).is_err(),
            "outer UDP inside the outer IP header"
        );
        assert!(
            mutate(VNET_INNER_NH_OFFSET, 24).is_err(),
            "inner IP inside the outer UDP header"
        );
        assert!(
            mutate(VNET_INNER_NH_OFFSET, 60).is_err(),
            "inner IP header where there is none"
        );
        assert!(
            mutate(6, 60).is_err(),
            "inner transport inside the inner IP header"
        );
        assert!(
            mutate(VNET_INNER_NH_OFFSET + 1, 0xff).is_err(),
            "inner IP past the read"
        );
        // Every byte of the headers set to every extreme: never a panic.
        for at in 0..VnetHeader::Tunnel.size() + 120 {
            for v in [0, 1, 0x7f, 0x80, 0xff] {
                let _ = mutate(at, v);
            }
        }
    }
}
