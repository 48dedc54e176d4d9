//! Criterion benches of meshd's TUN offload code (`src/offload`),
//! each next to a baseline measured in the same run:
//!
//! - `split`: one TCP super-packet as the kernel hands it over (48
//!   segments of 1340 bytes, IPv4, checksum left to us) cut into segments:
//!   meshd's in-place `tso::split` against tun-rs's copying `gso_split`.
//! - `split-tunnel`: the same super-packet inside a VXLAN tunnel (outer
//!   IPv4 and UDP with a checksum, VXLAN, inner Ethernet), as the kernel
//!   hands it over with UDP-tunnel GSO, against the plain one of the first
//!   group: the cost of giving every segment its outer headers.
//! - `coalesce`: 48 decrypted segments of one TCP stream (one 64 KiB
//!   super-packet's worth), in buffers of the
//!   engine's pool size, turned into TUN writes: `gro::Coalescer` (one
//!   super-packet) against framing each packet for a write of its own (what
//!   meshd did before, and what tun-rs's GRO does with such buffers). This
//!   is the userspace side only: the kernel's cost per write, which the
//!   coalescer saves 47 times out of 48, is what `benches/netns.sh` shows.
//!
//! `cargo bench --bench offload` (add `-- --warm-up-time 1 --measurement-time 3`
//! for a short run). Honesty: before timing, each variant's output is
//! checked (segment count and bytes; one write of all the payload), and every
//! timed call's result goes through `black_box`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "bench code: a broken setup is a panic"
)]

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput};
use meshd::offload::{gro::Coalescer, tso, VnetHeader};
use tun_rs::{VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_LEN};

const SEGMENTS: usize = 48;
const MSS: usize = 1340;
/// IPv4 + TCP with timestamps.
const HEADERS: usize = 20 + 32;
/// The engine's headroom in front of a packet bound for the TUN.
const HEADROOM: usize = 16;

/// IPv4 + TCP headers for `payload` bytes at `seq`, checksum field as `csum`.
fn headers(total: usize, seq: u32, csum: u16) -> Vec<u8> {
    let mut h = vec![0u8; HEADERS];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    h[6] = 0x40;
    h[8] = 64;
    h[9] = 6;
    h[12..20].copy_from_slice(&[100, 72, 0, 1, 100, 72, 0, 2]);
    let ip = !tun_rs::checksum(&h[..20], 0);
    h[10..12].copy_from_slice(&ip.to_be_bytes());
    h[20..22].copy_from_slice(&40000u16.to_be_bytes());
    h[22..24].copy_from_slice(&5201u16.to_be_bytes());
    h[24..28].copy_from_slice(&seq.to_be_bytes());
    h[28..32].copy_from_slice(&1u32.to_be_bytes());
    h[32] = 8 << 4;
    h[33] = 0x10;
    h[34..36].copy_from_slice(&512u16.to_be_bytes());
    h[36..38].copy_from_slice(&csum.to_be_bytes());
    h[40..52].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3]);
    h
}

/// A TSO read: virtio header, headers of the whole, 48 × 1340 bytes.
fn super_packet() -> Vec<u8> {
    let total = HEADERS + SEGMENTS * MSS;
    let hdr = VirtioNetHdr {
        flags: 1, // NEEDS_CSUM
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
        hdr_len: HEADERS as u16,
        gso_size: MSS as u16,
        csum_start: 20,
        csum_offset: 16,
    };
    let mut read = vec![0u8; VIRTIO_NET_HDR_LEN];
    hdr.encode(&mut read).expect("ten bytes");
    read.extend(headers(total, 1, 0));
    read.extend((0..SEGMENTS * MSS).map(|i| i as u8));
    read
}

/// 48 segments of one stream, each in a pool-sized buffer behind headroom.
fn decrypted_segments() -> Vec<Vec<u8>> {
    (0..SEGMENTS as u32)
        .map(|i| {
            let mut frame = vec![0u8; HEADROOM];
            frame.reserve(1500);
            frame.extend(headers(HEADERS + MSS, 1 + i * MSS as u32, 0));
            frame.extend((0..MSS).map(|j| (j as u32 + i) as u8));
            frame
        })
        .collect()
}

fn split_benches(c: &mut Criterion) {
    let read = super_packet();
    // Checked once, untimed: both cut it into the same 48 segments.
    let mut ours = Vec::new();
    tso::split(&mut read.clone(), VnetHeader::Legacy, |s| {
        ours.push(s.to_vec())
    })
    .expect("a valid super-packet");
    let mut bufs = vec![vec![0u8; 1500]; 64];
    let mut sizes = vec![0; 64];
    let n = tun_rs::gso_split(
        &mut read[VIRTIO_NET_HDR_LEN..].to_vec(),
        header(&read),
        &mut bufs,
        &mut sizes,
        0,
        false,
    )
    .expect("tun-rs splits it");
    assert_eq!(ours.len(), SEGMENTS);
    assert!((0..n)
        .map(|i| &bufs[i][..sizes[i]])
        .eq(ours.iter().map(Vec::as_slice)));

    let mut group = c.benchmark_group("split");
    group.throughput(Throughput::Bytes((SEGMENTS * MSS) as u64));
    group.bench_function("meshd tso::split (in place)", |b| {
        b.iter_batched_ref(
            || read.clone(),
            |r| {
                let mut bytes = 0;
                let count = tso::split(r, VnetHeader::Legacy, |s| bytes += black_box(s).len())
                    .expect("valid");
                black_box((count, bytes))
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("tun-rs gso_split (baseline)", |b| {
        b.iter_batched_ref(
            || read[VIRTIO_NET_HDR_LEN..].to_vec(),
            |input| {
                black_box(
                    tun_rs::gso_split(input, header(&read), &mut bufs, &mut sizes, 0, false)
                        .expect("valid"),
                )
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// VXLAN's header and the inner Ethernet header.
const TUNNEL: usize = 8 + 14;

/// [`super_packet`] inside a VXLAN tunnel over IPv4, behind the 24-byte
/// header: outer IPv4, outer UDP (checksum asked for), VXLAN, Ethernet.
fn tunnel_super_packet() -> Vec<u8> {
    let plain = super_packet();
    let inner = &plain[VIRTIO_NET_HDR_LEN..];
    let inner_nh = 20 + 8 + TUNNEL;
    let total = inner_nh + inner.len();
    let mut hdr = header(&plain);
    hdr.flags |= 8; // UDP_TUNNEL_CSUM
    hdr.gso_type |= 0x20; // UDP tunnel over IPv4
    hdr.hdr_len += inner_nh as u16;
    hdr.csum_start += inner_nh as u16;
    let mut read = vec![0u8; VnetHeader::Tunnel.size()];
    hdr.encode(&mut read).expect("ten bytes");
    read[20..22].copy_from_slice(&20u16.to_ne_bytes());
    read[22..24].copy_from_slice(&(inner_nh as u16).to_ne_bytes());
    let mut outer = [0u8; 28];
    outer[0] = 0x45;
    outer[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    outer[6] = 0x40;
    outer[8] = 64;
    outer[9] = 17;
    outer[12..20].copy_from_slice(&[100, 64, 0, 1, 100, 64, 0, 2]);
    outer[20..22].copy_from_slice(&51000u16.to_be_bytes());
    outer[22..24].copy_from_slice(&8472u16.to_be_bytes());
    outer[24..26].copy_from_slice(&((total - 20) as u16).to_be_bytes());
    read.extend(outer);
    read.extend([8, 0, 0, 0, 0, 0, 1, 0]);
    read.extend([2, 0, 0, 0, 0, 0xbb, 2, 0, 0, 0, 0, 0xaa, 8, 0]);
    read.extend_from_slice(inner);
    read
}

fn tunnel_split_benches(c: &mut Criterion) {
    let plain = super_packet();
    let read = tunnel_super_packet();
    // Checked once, untimed: the same 48 segments, each behind its own
    // 50 bytes of outer headers.
    let mut inner = Vec::new();
    tso::split(&mut plain.clone(), VnetHeader::Legacy, |s| {
        inner.push(s.to_vec())
    })
    .expect("a valid super-packet");
    let mut ours = Vec::new();
    tso::split(&mut read.clone(), VnetHeader::Tunnel, |s| {
        ours.push(s.to_vec())
    })
    .expect("a valid tunnel super-packet");
    assert_eq!(ours.len(), SEGMENTS);
    assert!(ours
        .iter()
        .zip(&inner)
        .all(|(o, i)| o[20 + 8 + TUNNEL..] == i[..]));

    let mut group = c.benchmark_group("split-tunnel");
    group.throughput(Throughput::Bytes((SEGMENTS * MSS) as u64));
    for (name, read, header) in [
        (
            "meshd tso::split, VXLAN super-packet",
            &read,
            VnetHeader::Tunnel,
        ),
        (
            "meshd tso::split, plain super-packet (baseline)",
            &plain,
            VnetHeader::Legacy,
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched_ref(
                || read.clone(),
                |r| {
                    let mut bytes = 0;
                    let count =
                        tso::split(r, header, |s| bytes += black_box(s).len()).expect("valid");
                    black_box((count, bytes))
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn header(read: &[u8]) -> VirtioNetHdr {
    VirtioNetHdr::decode(&read[..VIRTIO_NET_HDR_LEN]).expect("ten bytes")
}

fn coalesce_benches(c: &mut Criterion) {
    let mut frames = decrypted_segments();
    let mut coalescer = Coalescer::new(true, VnetHeader::Legacy);
    // Checked once, untimed: one write holding every payload byte.
    let mut writes = Vec::new();
    for f in &mut frames {
        coalescer.push(f, HEADROOM, &mut |w: &[u8]| writes.push(w.len()));
    }
    coalescer.finish(&mut |w: &[u8]| writes.push(w.len()));
    assert_eq!(writes, [VIRTIO_NET_HDR_LEN + HEADERS + SEGMENTS * MSS]);

    let mut group = c.benchmark_group("coalesce");
    group.throughput(Throughput::Elements(SEGMENTS as u64));
    group.bench_function("meshd gro::Coalescer (one write)", |b| {
        b.iter(|| {
            let mut written = 0;
            let mut write = |w: &[u8]| written += black_box(w).len();
            for f in &mut frames {
                coalescer.push(f, HEADROOM, &mut write);
            }
            coalescer.finish(&mut write);
            black_box(written)
        })
    });
    group.bench_function("one write per packet (baseline)", |b| {
        b.iter(|| {
            let mut written = 0;
            for f in &mut frames {
                let framed = &mut f[HEADROOM - VIRTIO_NET_HDR_LEN..];
                framed[..VIRTIO_NET_HDR_LEN].fill(0);
                written += black_box(&framed[..]).len();
            }
            black_box(written)
        })
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    split_benches(&mut c);
    tunnel_split_benches(&mut c);
    coalesce_benches(&mut c);
    c.final_summary();
}
