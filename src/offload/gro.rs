//! Receive coalescing (GRO) for an offloading TUN device: TCP, and UDP
//! where the kernel takes UDP super-packets (USO).
//!
//! Pure. The kernel's stack costs about the same per packet whatever the
//! packet's size, so the decrypted segments of one TCP stream are joined
//! back into super-packets of up to 64 KiB before they are written to the
//! TUN: one write, one pass through the stack and one ACK per super-packet
//! instead of per segment. Datagrams of one UDP flow (a VXLAN overlay such
//! as flannel's runs over mesh0 this way) are joined the same way; the
//! kernel cuts them apart again for a socket that did not ask for GRO, but
//! after one write instead of many. Each write carries a virtio-net header:
//! `GSO_TCPV4`/`GSO_TCPV6`/`GSO_UDP_L4` with `NEEDS_CSUM` for a
//! super-packet, an all-zero header (checksum checked by the kernel) for
//! anything else.
//!
//! Rules, those of the kernel's own GRO (`tcp_gro_receive`): segments join
//! when they continue the stream exactly (next sequence number), are no
//! longer than the first, carry only ACK (PSH on the last), and agree on
//! addresses, ports, acknowledgment, TCP options, TOS/traffic class, TTL/hop
//! limit and (IPv4) the DF bit; a shorter or a PSH segment ends the
//! super-packet. UDP datagrams join when they agree on addresses, ports
//! and those IP fields and are no longer than the first; a shorter one ends
//! the super-packet. Anything else is written as it is, and a TCP or UDP
//! packet that can't join first flushes its flow's pending super-packet, so
//! a flow is never reordered.
//!
//! Segments are not checksum-verified before they are joined: they were
//! authenticated by the tunnel's AEAD, which makes the TCP/UDP checksum
//! redundant (the kernel's WireGuard marks decrypted packets
//! `CHECKSUM_UNNECESSARY` for the same reason).

use tun_rs::{
    VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4,
    VIRTIO_NET_HDR_LEN,
};

use super::{
    be16, be32, fold, pseudo_header, put16, VnetHeader, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_PSH,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
};

/// Streams coalesced at once; a further one flushes the oldest.
const MAX_FLOWS: usize = 8;
/// The largest IP packet (IPv4 total length, IPv6 payload length).
const MAX_PACKET: usize = u16::MAX as usize;
/// Segments in one super-packet at most (the kernel's own GRO stops at 64).
const MAX_SEGMENTS: u16 = 64;

const IPV4_DF: u8 = 0x40;

/// Joins TCP segments (and UDP datagrams) into super-packets; see the
/// module documentation. Every output goes to a `write` callback as one TUN
/// write: the virtio-net header followed by the packet.
pub struct Coalescer {
    /// Streams with a super-packet under construction, oldest first.
    flows: Vec<Flow>,
    /// Buffers of finished super-packets, kept for the next ones.
    spare: Vec<Vec<u8>>,
    /// UDP datagrams are joined too (the TUN takes `GSO_UDP_L4`).
    udp: bool,
    /// The virtio-net header in front of every write.
    header: VnetHeader,
}

/// Where a TCP or UDP packet's headers are.
#[derive(Clone, Copy, Debug)]
struct Layout {
    v6: bool,
    udp: bool,
    ip_len: usize,
    /// The transport header: TCP with its options, or UDP's 8 bytes.
    l4_len: usize,
}

impl Layout {
    fn addresses(&self) -> std::ops::Range<usize> {
        if self.v6 {
            8..40
        } else {
            12..20
        }
    }

    fn headers(&self) -> usize {
        self.ip_len + self.l4_len
    }

    fn seq(&self, pkt: &[u8]) -> u32 {
        be32(pkt, self.ip_len + 4)
    }

    fn flags(&self, pkt: &[u8]) -> u8 {
        pkt[self.ip_len + 13]
    }
}

/// What a packet is to the coalescer.
enum Kind {
    /// A TCP segment or UDP datagram that may join a super-packet.
    Segment(Layout),
    /// A well-formed TCP or UDP packet that may not (SYN, FIN, a bare ACK,
    /// an empty datagram, UDP while UDP is not joined, …).
    Unjoinable(Layout),
    /// Anything else, malformed packets included.
    Other,
}

struct Flow {
    /// Room for the virtio-net header, the first segment's headers, then
    /// the payload of every segment.
    buf: Vec<u8>,
    /// Where the packet starts in `buf` (the virtio-net header's size).
    at: usize,
    layout: Layout,
    gso_size: usize,
    segments: u16,
    next_seq: u32,
    /// False once a short or PSH segment has ended the super-packet.
    open: bool,
}

impl Flow {
    fn packet(&self) -> &[u8] {
        &self.buf[self.at..]
    }

    /// Whether `pkt` belongs to this flow's stream (same direction).
    fn same_stream(&self, pkt: &[u8], layout: &Layout) -> bool {
        let own = self.packet();
        self.layout.v6 == layout.v6
            && self.layout.udp == layout.udp
            && own[self.layout.addresses()] == pkt[layout.addresses()]
            && own[self.layout.ip_len..self.layout.ip_len + 4]
                == pkt[layout.ip_len..layout.ip_len + 4]
    }

    /// Whether segment `pkt` (of this stream) can be appended.
    fn can_append(&self, pkt: &[u8], layout: &Layout) -> bool {
        let own = self.packet();
        let payload = pkt.len() - layout.headers();
        let l = &self.layout;
        let fits = self.open
            && self.segments < MAX_SEGMENTS
            && payload <= self.gso_size
            && own.len() + payload <= MAX_PACKET
            && ip_fields_match(own, pkt, l.v6);
        if l.udp {
            return fits;
        }
        fits && layout.seq(pkt) == self.next_seq
            && layout.l4_len == l.l4_len
            // Acknowledgment number, then the options.
            && own[l.ip_len + 8..l.ip_len + 12] == pkt[layout.ip_len + 8..layout.ip_len + 12]
            && own[l.ip_len + 20..l.headers()] == pkt[layout.ip_len + 20..layout.headers()]
    }

    fn append(&mut self, pkt: &[u8], layout: &Layout) {
        let payload = &pkt[layout.headers()..];
        self.buf.extend_from_slice(payload);
        self.segments += 1;
        self.next_seq = self.next_seq.wrapping_add(payload.len() as u32);
        let psh = !layout.udp && layout.flags(pkt) & TCP_PSH != 0;
        if psh {
            let at = self.at + self.layout.ip_len + 13;
            self.buf[at] |= TCP_PSH;
        }
        if psh || payload.len() < self.gso_size {
            self.open = false;
        }
    }

    /// Fixes the headers of a super-packet and writes its virtio header.
    fn seal(&mut self) {
        let l = self.layout;
        let mut hdr = VirtioNetHdr::default();
        if self.segments > 1 {
            let total = self.buf.len() - self.at;
            let pkt = &mut self.buf[self.at..];
            if l.v6 {
                put16(pkt, 4, (total - 40) as u16);
            } else {
                put16(pkt, 2, total as u16);
                put16(pkt, 10, 0);
                let sum = !tun_rs::checksum(&pkt[..l.ip_len], 0);
                put16(pkt, 10, sum);
            }
            // CHECKSUM_PARTIAL: the checksum field holds the pseudo-header
            // sum, the kernel (or nobody, on local delivery) adds the rest.
            let l4_total = (total - l.ip_len) as u16;
            let (proto, csum_offset, gso_type) = match (l.udp, l.v6) {
                (true, _) => (IPPROTO_UDP, 6, VIRTIO_NET_HDR_GSO_UDP_L4),
                (false, false) => (IPPROTO_TCP, 16, VIRTIO_NET_HDR_GSO_TCPV4),
                (false, true) => (IPPROTO_TCP, 16, VIRTIO_NET_HDR_GSO_TCPV6),
            };
            if l.udp {
                put16(pkt, l.ip_len + 4, l4_total);
            }
            let pseudo = pseudo_header(&pkt[l.addresses()], proto, l4_total);
            put16(pkt, l.ip_len + csum_offset, fold(pseudo));
            hdr.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
            hdr.gso_type = gso_type;
            hdr.hdr_len = l.headers() as u16;
            hdr.gso_size = self.gso_size as u16;
            hdr.csum_start = l.ip_len as u16;
            hdr.csum_offset = csum_offset as u16;
        }
        // Ten bytes into at least ten: can't fail. A longer header's other
        // fields stay zero (the buffer is zeroed when a flow starts).
        let _ = hdr.encode(&mut self.buf[..VIRTIO_NET_HDR_LEN]);
    }
}

impl Coalescer {
    /// `udp`: join UDP datagrams too; only for a TUN that takes UDP
    /// super-packets (`GSO_UDP_L4`, Linux 6.2 and later). `header`: the
    /// virtio-net header the device was given.
    pub fn new(udp: bool, header: VnetHeader) -> Self {
        Self {
            flows: Vec::with_capacity(MAX_FLOWS),
            spare: Vec::new(),
            udp,
            header,
        }
    }

    /// Offers the packet at `frame[start..]`; `start` must leave room for
    /// the virtio-net header in front of it (else it is not written).
    /// Writes (through `write`) whatever this packet completes or can't
    /// join; the rest waits for the next packet or [`Self::finish`].
    pub fn push(&mut self, frame: &mut [u8], start: usize, write: &mut impl FnMut(&[u8])) {
        let Some(header_at) = start.checked_sub(self.header.size()) else {
            return;
        };
        let Some(pkt) = frame.get(start..) else {
            return;
        };
        match classify(pkt, self.udp) {
            Kind::Segment(layout) => {
                if let Some(i) = self.flows.iter().position(|f| f.same_stream(pkt, &layout)) {
                    if self.flows[i].can_append(pkt, &layout) {
                        self.flows[i].append(pkt, &layout);
                        return;
                    }
                    self.flush(i, write);
                }
                self.start_flow(pkt, layout, write);
            }
            Kind::Unjoinable(layout) => {
                if let Some(i) = self.flows.iter().position(|f| f.same_stream(pkt, &layout)) {
                    self.flush(i, write);
                }
                write_plain(&mut frame[header_at..], start - header_at, write);
            }
            Kind::Other => write_plain(&mut frame[header_at..], start - header_at, write),
        }
    }

    /// Writes every pending super-packet: the end of a batch.
    pub fn finish(&mut self, write: &mut impl FnMut(&[u8])) {
        while !self.flows.is_empty() {
            self.flush(0, write);
        }
    }

    fn start_flow(&mut self, pkt: &[u8], layout: Layout, write: &mut impl FnMut(&[u8])) {
        if self.flows.len() == MAX_FLOWS {
            self.flush(0, write);
        }
        let at = self.header.size();
        let mut buf = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(at + MAX_PACKET));
        buf.clear();
        buf.resize(at, 0);
        buf.extend_from_slice(pkt);
        let payload = pkt.len() - layout.headers();
        let (next_seq, open) = if layout.udp {
            (0, true)
        } else {
            (
                layout.seq(pkt).wrapping_add(payload as u32),
                layout.flags(pkt) & TCP_PSH == 0,
            )
        };
        self.flows.push(Flow {
            buf,
            at,
            layout,
            gso_size: payload,
            segments: 1,
            next_seq,
            open,
        });
    }

    fn flush(&mut self, i: usize, write: &mut impl FnMut(&[u8])) {
        let mut flow = self.flows.remove(i);
        flow.seal();
        write(&flow.buf);
        self.spare.push(flow.buf);
    }
}

/// Writes a packet as it is, behind an all-zero virtio-net header of
/// `header_len` bytes.
fn write_plain(framed: &mut [u8], header_len: usize, write: &mut impl FnMut(&[u8])) {
    framed[..header_len].fill(0);
    write(framed);
}

/// `udp`: whether UDP datagrams may join (else they are unjoinable).
fn classify(pkt: &[u8], udp: bool) -> Kind {
    let Some(&first) = pkt.first() else {
        return Kind::Other;
    };
    let (v6, ip_len, proto) = match first >> 4 {
        4 => {
            // No IP options, a whole (unfragmented) packet.
            if first & 0x0f != 5
                || pkt.len() < 20
                || usize::from(be16(pkt, 2)) != pkt.len()
                || be16(pkt, 6) & 0x3fff != 0
            {
                return Kind::Other;
            }
            (false, 20, pkt[9])
        }
        6 => {
            if pkt.len() < 40 || usize::from(be16(pkt, 4)) != pkt.len() - 40 {
                return Kind::Other;
            }
            (true, 40, pkt[6])
        }
        _ => return Kind::Other,
    };
    match proto {
        IPPROTO_TCP => {
            if pkt.len() < ip_len + 20 {
                return Kind::Other;
            }
            let l4_len = usize::from(pkt[ip_len + 12] >> 4) * 4;
            if l4_len < 20 || pkt.len() < ip_len + l4_len {
                return Kind::Other;
            }
            let layout = Layout {
                v6,
                udp: false,
                ip_len,
                l4_len,
            };
            let flags = layout.flags(pkt);
            let payload = pkt.len() - layout.headers();
            if payload > 0 && (flags == TCP_ACK || flags == TCP_ACK | TCP_PSH) {
                Kind::Segment(layout)
            } else {
                Kind::Unjoinable(layout)
            }
        }
        IPPROTO_UDP => {
            if pkt.len() < ip_len + 8 || usize::from(be16(pkt, ip_len + 4)) != pkt.len() - ip_len {
                return Kind::Other;
            }
            let layout = Layout {
                v6,
                udp: true,
                ip_len,
                l4_len: 8,
            };
            if udp && pkt.len() > layout.headers() {
                Kind::Segment(layout)
            } else {
                Kind::Unjoinable(layout)
            }
        }
        _ => Kind::Other,
    }
}

/// The IP header fields segments of one super-packet must share.
fn ip_fields_match(a: &[u8], b: &[u8], v6: bool) -> bool {
    if v6 {
        // Version, traffic class, flow label; hop limit.
        a[..4] == b[..4] && a[7] == b[7]
    } else {
        // TOS; DF; TTL.
        a[1] == b[1] && a[6] & IPV4_DF == b[6] & IPV4_DF && a[8] == b[8]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP segment a → b with a valid IP header; `flags` as on the wire.
    fn segment(v6: bool, sport: u16, seq: u32, payload: &[u8], flags: u8) -> Vec<u8> {
        let tcp_len = 32; // with a timestamp option, as Linux sends
        let ip_len = if v6 { 40 } else { 20 };
        let total = ip_len + tcp_len + payload.len();
        let mut p = vec![0u8; total];
        if v6 {
            p[0] = 0x60;
            put16(&mut p, 4, (total - 40) as u16);
            p[6] = IPPROTO_TCP;
            p[7] = 64;
            p[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            p[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            p[0] = 0x45;
            put16(&mut p, 2, total as u16);
            put16(&mut p, 4, 7);
            p[6] = IPV4_DF;
            p[8] = 64;
            p[9] = IPPROTO_TCP;
            p[12..16].copy_from_slice(&[100, 72, 0, 1]);
            p[16..20].copy_from_slice(&[100, 72, 0, 2]);
            let c = !tun_rs::checksum(&p[..20], 0);
            put16(&mut p, 10, c);
        }
        let t = ip_len;
        put16(&mut p, t, sport);
        put16(&mut p, t + 2, 5201);
        p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        p[t + 8..t + 12].copy_from_slice(&777u32.to_be_bytes());
        p[t + 12] = ((tcp_len / 4) as u8) << 4;
        p[t + 13] = flags;
        put16(&mut p, t + 14, 512);
        p[t + 20..t + 32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3]);
        p[t + tcp_len..].copy_from_slice(payload);
        // A full TCP checksum, as the sender's stack computes it.
        let a = if v6 { 8..40 } else { 12..20 };
        let pseudo = pseudo_header(&p[a], IPPROTO_TCP, (total - ip_len) as u16);
        let c = !tun_rs::checksum(&p[t..], pseudo);
        put16(&mut p, t + 16, c);
        p
    }

    /// A UDP datagram a → b (VXLAN's port) with valid headers.
    fn datagram(v6: bool, sport: u16, payload: &[u8]) -> Vec<u8> {
        // A TCP segment's IP header, then UDP in place of TCP.
        let ip_len = if v6 { 40 } else { 20 };
        let mut p = segment(v6, sport, 0, &[], TCP_ACK)[..ip_len].to_vec();
        let total = ip_len + 8 + payload.len();
        p[if v6 { 6 } else { 9 }] = IPPROTO_UDP;
        if v6 {
            put16(&mut p, 4, (total - 40) as u16);
        } else {
            put16(&mut p, 2, total as u16);
            put16(&mut p, 10, 0);
            let c = !tun_rs::checksum(&p[..20], 0);
            put16(&mut p, 10, c);
        }
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&8472u16.to_be_bytes());
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        let a = if v6 { 8..40 } else { 12..20 };
        let pseudo = pseudo_header(&p[a], IPPROTO_UDP, (total - ip_len) as u16);
        let c = !tun_rs::checksum(&p[ip_len..], pseudo);
        put16(&mut p, ip_len + 6, c);
        p
    }

    fn framed(pkt: &[u8]) -> Vec<u8> {
        let mut f = vec![0xee; 16];
        f.extend_from_slice(pkt);
        f
    }

    /// Pushes every packet as one batch; returns each write.
    fn run(packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
        run_with(packets, true)
    }

    fn run_with(packets: &[Vec<u8>], udp: bool) -> Vec<Vec<u8>> {
        let mut c = Coalescer::new(udp, VnetHeader::Legacy);
        let mut out = Vec::new();
        let mut write = |w: &[u8]| out.push(w.to_vec());
        for p in packets {
            let mut f = framed(p);
            c.push(&mut f, 16, &mut write);
        }
        c.finish(&mut write);
        out
    }

    fn header(w: &[u8]) -> VirtioNetHdr {
        VirtioNetHdr::decode(&w[..VIRTIO_NET_HDR_LEN]).unwrap()
    }

    fn payload(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i * 31 + j) as u8).collect()
    }

    /// Segments a super-packet back the way the kernel would (with
    /// tun-rs's splitter, independent of this crate) into plain packets.
    fn split(w: &[u8]) -> Vec<Vec<u8>> {
        let hdr = header(w);
        if hdr.gso_type == 0 {
            return vec![w[VIRTIO_NET_HDR_LEN..].to_vec()];
        }
        let mut input = w[VIRTIO_NET_HDR_LEN..].to_vec();
        let mut bufs = vec![vec![0u8; 2000]; 128];
        let mut sizes = vec![0; 128];
        let n = tun_rs::gso_split(
            &mut input,
            hdr,
            &mut bufs,
            &mut sizes,
            0,
            hdr.gso_type == VIRTIO_NET_HDR_GSO_TCPV6,
        )
        .unwrap();
        (0..n).map(|i| bufs[i][..sizes[i]].to_vec()).collect()
    }

    fn tcp_payload(p: &[u8]) -> &[u8] {
        let ip = if p[0] >> 4 == 6 { 40 } else { 20 };
        &p[ip + usize::from(p[ip + 12] >> 4) * 4..]
    }

    #[test]
    fn a_stream_becomes_one_super_packet_that_splits_back_into_the_same_segments() {
        for v6 in [false, true] {
            let segs: Vec<_> = (0..10u32)
                .map(|i| {
                    segment(
                        v6,
                        40000,
                        1000 + i * 1300,
                        &payload(i as usize, 1300),
                        TCP_ACK,
                    )
                })
                .collect();
            let out = run(&segs);
            assert_eq!(out.len(), 1, "v6={v6}");
            let hdr = header(&out[0]);
            assert_eq!(hdr.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM);
            assert_eq!(
                hdr.gso_type,
                if v6 {
                    VIRTIO_NET_HDR_GSO_TCPV6
                } else {
                    VIRTIO_NET_HDR_GSO_TCPV4
                }
            );
            assert_eq!(hdr.gso_size, 1300);
            assert_eq!(usize::from(hdr.hdr_len), if v6 { 72 } else { 52 });
            assert_eq!(hdr.csum_start, if v6 { 40 } else { 20 });
            assert_eq!(hdr.csum_offset, 16);
            let pkt = &out[0][VIRTIO_NET_HDR_LEN..];
            if !v6 {
                assert_eq!(usize::from(be16(pkt, 2)), pkt.len());
                assert_eq!(
                    tun_rs::checksum(&pkt[..20], 0),
                    0xffff,
                    "IPv4 header checksum"
                );
            } else {
                assert_eq!(usize::from(be16(pkt, 4)), pkt.len() - 40);
            }
            // Segmented again, the stream is byte for byte what was sent
            // (the splitter recomputes each segment's checksums).
            let back = split(&out[0]);
            assert_eq!(back.len(), segs.len());
            for (b, s) in back.iter().zip(&segs) {
                assert_eq!(tcp_payload(b), tcp_payload(s));
                let ip = if v6 { 40 } else { 20 };
                assert_eq!(
                    b[ip..ip + 16],
                    s[ip..ip + 16],
                    "ports, seq, ack, offset, flags, window"
                );
            }
        }
    }

    #[test]
    fn a_gap_a_short_segment_or_psh_ends_the_super_packet() {
        let p = |i| payload(i, 1000);
        // Gap: 3 then 2 (seq jumps over one segment).
        let gap = vec![
            segment(false, 1, 0, &p(0), TCP_ACK),
            segment(false, 1, 1000, &p(1), TCP_ACK),
            segment(false, 1, 2000, &p(2), TCP_ACK),
            segment(false, 1, 4000, &p(4), TCP_ACK),
            segment(false, 1, 5000, &p(5), TCP_ACK),
        ];
        let out = run(&gap);
        let counts: Vec<_> = out.iter().map(|w| split(w).len()).collect();
        assert_eq!(counts, [3, 2]);
        // Short: a 500-byte segment is the last of its super-packet.
        let short = vec![
            segment(false, 1, 0, &p(0), TCP_ACK),
            segment(false, 1, 1000, &payload(1, 500), TCP_ACK),
            segment(false, 1, 1500, &p(2), TCP_ACK),
        ];
        assert_eq!(
            run(&short)
                .iter()
                .map(|w| split(w).len())
                .collect::<Vec<_>>(),
            [2, 1]
        );
        // PSH: ends it, and is kept on the last segment.
        let psh = vec![
            segment(false, 1, 0, &p(0), TCP_ACK),
            segment(false, 1, 1000, &p(1), TCP_ACK | TCP_PSH),
            segment(false, 1, 2000, &p(2), TCP_ACK),
        ];
        let out = run(&psh);
        assert_eq!(out.len(), 2);
        let first = split(&out[0]);
        assert_eq!(first.len(), 2);
        assert_eq!(first[1][20 + 13], TCP_ACK | TCP_PSH);
        assert_eq!(first[0][20 + 13], TCP_ACK);
    }

    #[test]
    fn interleaved_streams_are_each_coalesced_in_order() {
        let mut packets = Vec::new();
        for i in 0..6u32 {
            packets.push(segment(
                false,
                1,
                i * 1000,
                &payload(i as usize, 1000),
                TCP_ACK,
            ));
            packets.push(segment(
                true,
                2,
                i * 1000,
                &payload(100 + i as usize, 1000),
                TCP_ACK,
            ));
        }
        let out = run(&packets);
        assert_eq!(out.len(), 2);
        for (w, port) in out.iter().zip([1u16, 2]) {
            let segs = split(w);
            assert_eq!(segs.len(), 6);
            let ip = if port == 2 { 40 } else { 20 };
            for (i, s) in segs.iter().enumerate() {
                assert_eq!(be16(s, ip), port);
                assert_eq!(be32(s, ip + 4), i as u32 * 1000);
            }
        }
    }

    #[test]
    fn other_packets_pass_unchanged_and_a_streams_own_control_packet_flushes_it_first() {
        let udp = {
            let mut p = segment(false, 1, 0, b"dns?", TCP_ACK);
            p[9] = 17;
            p
        };
        let fin = segment(false, 1, 2000, b"", TCP_ACK | 0x01);
        let packets = vec![
            segment(false, 1, 0, &payload(0, 1000), TCP_ACK),
            udp.clone(),
            segment(false, 1, 1000, &payload(1, 1000), TCP_ACK),
            fin.clone(),
        ];
        let out = run(&packets);
        assert_eq!(out.len(), 3);
        // The UDP packet first (the stream was still open), behind a zero header.
        assert_eq!(&out[0][..VIRTIO_NET_HDR_LEN], &[0; VIRTIO_NET_HDR_LEN]);
        assert_eq!(&out[0][VIRTIO_NET_HDR_LEN..], &udp[..]);
        // Then the stream's two segments, then its FIN.
        assert_eq!(split(&out[1]).len(), 2);
        assert_eq!(&out[2][VIRTIO_NET_HDR_LEN..], &fin[..]);
    }

    #[test]
    fn a_udp_flow_becomes_one_super_packet_where_the_tun_takes_them() {
        for v6 in [false, true] {
            let mut datagrams: Vec<_> = (0..10)
                .map(|i| datagram(v6, 40000, &payload(i, 1200)))
                .collect();
            datagrams.push(datagram(v6, 40000, &payload(10, 300)));
            // A shorter datagram ends it: this one goes on its own.
            datagrams.push(datagram(v6, 40000, &payload(11, 1200)));
            let out = run(&datagrams);
            assert_eq!(out.len(), 2, "v6={v6}");
            let hdr = header(&out[0]);
            assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_UDP_L4);
            assert_eq!(
                (hdr.gso_size, hdr.csum_offset, hdr.flags),
                (1200, 6, VIRTIO_NET_HDR_F_NEEDS_CSUM)
            );
            let ip = if v6 { 40 } else { 20 };
            let pkt = &out[0][VIRTIO_NET_HDR_LEN..];
            assert_eq!(
                usize::from(be16(pkt, ip + 4)),
                pkt.len() - ip,
                "UDP length of the whole"
            );
            let back = split(&out[0]);
            assert_eq!(back.len(), 11);
            for (b, d) in back.iter().zip(&datagrams) {
                assert_eq!(b[ip..ip + 6], d[ip..ip + 6], "ports and length");
                assert_eq!(b[ip + 8..], d[ip + 8..]);
            }
            assert_eq!(&out[1][VIRTIO_NET_HDR_LEN..], &datagrams[11][..]);
            // Without USO on the device, each datagram is written as it is.
            let plain = run_with(&datagrams, false);
            assert_eq!(plain.len(), datagrams.len());
            assert!(plain
                .iter()
                .zip(&datagrams)
                .all(|(w, d)| w[VIRTIO_NET_HDR_LEN..] == d[..]));
        }
    }

    #[test]
    fn a_single_segment_is_written_unchanged() {
        let s = segment(false, 1, 0, &payload(0, 1000), TCP_ACK);
        let out = run(std::slice::from_ref(&s));
        assert_eq!(out, vec![[&[0u8; VIRTIO_NET_HDR_LEN][..], &s[..]].concat()]);
    }

    #[test]
    fn super_packets_stay_within_64_kib() {
        let segs: Vec<_> = (0..120u32)
            .map(|i| segment(false, 1, i * 1300, &payload(i as usize, 1300), TCP_ACK))
            .collect();
        let out = run(&segs);
        assert!(out.len() >= 3);
        assert!(out
            .iter()
            .all(|w| w.len() - VIRTIO_NET_HDR_LEN <= MAX_PACKET));
        assert_eq!(out.iter().map(|w| split(w).len()).sum::<usize>(), 120);
    }

    #[test]
    fn segments_that_differ_in_ack_options_or_ttl_are_not_joined() {
        let base = |seq| segment(false, 1, seq, &payload(0, 1000), TCP_ACK);
        let mut ack = base(1000);
        ack[20 + 8..20 + 12].copy_from_slice(&778u32.to_be_bytes());
        let mut opt = base(1000);
        opt[20 + 31] = 4;
        let mut ttl = base(1000);
        ttl[8] = 63;
        for second in [ack, opt, ttl] {
            assert_eq!(run(&[base(0), second]).len(), 2);
        }
    }

    /// Random interleavings of streams (IPv4 and IPv6, full and short
    /// segments, PSH, gaps) and other packets: split back, every stream's
    /// segments come out complete and in order, and nothing else changes.
    #[test]
    fn random_batches_come_back_out_segment_for_segment_in_stream_order() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..300 {
            let mut seqs = [0u32; 4];
            let mut packets = Vec::new();
            for _ in 0..next(150) + 1 {
                let stream = next(5) as usize;
                if stream == 4 {
                    // A datagram of a UDP flow, or (one time in three) a
                    // packet of another protocol.
                    let mut udp = datagram(false, 9, &payload(packets.len(), next(1300) as usize));
                    if next(3) == 0 {
                        udp[9] = 1;
                    }
                    packets.push(udp);
                    continue;
                }
                let len = if next(6) == 0 { 1 + next(1299) } else { 1300 } as usize;
                let flags = if next(10) == 0 {
                    TCP_ACK | TCP_PSH
                } else {
                    TCP_ACK
                };
                if next(20) == 0 {
                    seqs[stream] += 1300; // a lost segment: a gap
                }
                let v6 = stream % 2 == 1;
                packets.push(segment(
                    v6,
                    1000 + stream as u16,
                    seqs[stream],
                    &payload(packets.len(), len),
                    flags,
                ));
                seqs[stream] += len as u32;
            }
            let out = run(&packets);
            assert!(out
                .iter()
                .all(|w| w.len() - VIRTIO_NET_HDR_LEN <= MAX_PACKET));
            let back: Vec<Vec<u8>> = out.iter().flat_map(|w| split(w)).collect();
            assert_eq!(back.len(), packets.len());
            // Per stream (and for the other packets), the same packets in
            // the same order; only the PSH flag may move to a later segment
            // of its super-packet, so flags are left out of the comparison.
            let key = |p: &[u8]| {
                let v6 = p[0] >> 4 == 6;
                let ip = if v6 { 40 } else { 20 };
                (p[0] >> 4, p[if v6 { 6 } else { 9 }], be16(p, ip))
            };
            let strip = |p: &[u8]| {
                let v6 = p[0] >> 4 == 6;
                let ip = if v6 { 40 } else { 20 };
                let mut q = p.to_vec();
                // The splitter numbers IPv4 ids from the first segment and
                // recomputes checksums; PSH may have moved.
                match p[if v6 { 6 } else { 9 }] {
                    IPPROTO_TCP => {
                        q[ip + 13] &= !TCP_PSH;
                        q[ip + 16..ip + 18].fill(0);
                    }
                    IPPROTO_UDP => q[ip + 6..ip + 8].fill(0),
                    _ => {}
                }
                if ip == 20 {
                    q[4..6].fill(0);
                    q[10..12].fill(0);
                }
                q
            };
            for k in [
                (4, 6, 1000),
                (6, 6, 1001),
                (4, 6, 1002),
                (6, 6, 1003),
                (4, 17, 9),
                (4, 1, 9),
            ] {
                let sent: Vec<_> = packets
                    .iter()
                    .filter(|p| key(p) == k)
                    .map(|p| strip(p))
                    .collect();
                let got: Vec<_> = back
                    .iter()
                    .filter(|p| key(p) == k)
                    .map(|p| strip(p))
                    .collect();
                assert_eq!(got, sent, "stream {k:?}");
            }
        }
    }

    #[test]
    fn malformed_and_truncated_packets_pass_through_without_panicking() {
        let good = segment(false, 1, 0, &payload(0, 100), TCP_ACK);
        let good6 = segment(true, 1, 0, &payload(0, 100), TCP_ACK);
        let mut cases: Vec<Vec<u8>> = Vec::new();
        for g in [&good, &good6] {
            for cut in 0..g.len() {
                cases.push(g[..cut].to_vec());
            }
        }
        let mut bad_len = good.clone();
        put16(&mut bad_len, 2, 9999);
        cases.push(bad_len);
        let mut bad_offset = good.clone();
        bad_offset[20 + 12] = 0xf0; // a 60-byte TCP header in a 32-byte one
        cases.push(bad_offset);
        let mut fragment = good.clone();
        fragment[6] |= 0x20;
        cases.push(fragment);
        for case in cases {
            let out = run(&[case.clone(), good.clone()]);
            assert_eq!(out.len(), 2);
            assert_eq!(&out[0][VIRTIO_NET_HDR_LEN..], &case[..]);
        }
        // No headroom for the header: nothing written.
        let mut c = Coalescer::new(true, VnetHeader::Legacy);
        let mut n = 0;
        c.push(&mut good.clone(), 4, &mut |_| n += 1);
        assert_eq!(n, 0);
    }

    #[test]
    fn behind_the_tunnel_header_writes_carry_24_bytes_the_last_14_zero() {
        let mut c = Coalescer::new(true, VnetHeader::Tunnel);
        let mut out = Vec::new();
        let mut write = |w: &[u8]| out.push(w.to_vec());
        let segs: Vec<_> = (0..4u32)
            .map(|i| {
                segment(
                    false,
                    40000,
                    1 + i * 1300,
                    &payload(i as usize, 1300),
                    TCP_ACK,
                )
            })
            .collect();
        let lone = segment(false, 40001, 7, &[], TCP_ACK);
        for p in segs.iter().chain([&lone]) {
            let mut f = vec![0xee; 24];
            f.extend_from_slice(p);
            c.push(&mut f, 24, &mut write);
        }
        c.finish(&mut write);
        assert_eq!(out.len(), 2);
        for w in &out {
            assert!(w[VIRTIO_NET_HDR_LEN..24].iter().all(|&b| b == 0));
        }
        // The bare ACK, alone, behind an all-zero header.
        assert_eq!(out[0], [&[0u8; 24][..], &lone[..]].concat());
        // The stream: the same super-packet as behind the legacy header.
        let legacy = run(&segs);
        assert_eq!(legacy.len(), 1);
        assert_eq!(
            out[1][..VIRTIO_NET_HDR_LEN],
            legacy[0][..VIRTIO_NET_HDR_LEN]
        );
        assert_eq!(out[1][24..], legacy[0][VIRTIO_NET_HDR_LEN..]);
        // Too little headroom for 24 bytes: nothing written.
        let mut n = 0;
        c.push(&mut framed(&segs[0]), 16, &mut |_| n += 1);
        assert_eq!(n, 0);
    }
}
