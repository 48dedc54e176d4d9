//! Criterion benches of the engine's packet path: encapsulate (TUN packet →
//! WireGuard datagram) and decapsulate (datagram → TUN packet) through
//! [`Node`], one packet at a time and in batches of 64, at 64, 512 and 1380
//! bytes of inner IPv4 packet.
//!
//! `cargo bench --bench engine` (add `-- --warm-up-time 1 --measurement-time 3`
//! for a short run). No I/O: two nodes complete a real handshake in memory
//! first, then only the engine calls are timed. At the end a table gives
//! each result in packets/s and Gbit/s of inner packets.
//!
//! Honesty: every timed encapsulation must yield exactly one datagram and
//! every timed decapsulation exactly one TUN packet (WireGuard rejects
//! replays, so each decapsulation gets a datagram of its own, captured from
//! the peer before the clock starts). Both are counted inside and checked
//! outside the timed loop, and the first round trip is compared byte by byte.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "bench code: a broken setup is a panic"
)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use criterion::{BenchmarkId, Criterion, Throughput};
use ipnet::IpNet;
use meshd::engine::{Node, NodeConfig, PeerSpec};
use meshd::identity::PrivateKey;

/// Inner IPv4 packet sizes: a small packet, a medium one, and a full
/// `mesh0` MTU packet (DESIGN.md: 1380).
const SIZES: [usize; 3] = [64, 512, 1380];
/// Packets per batch in the batch benches: a driver's wakeup-sized batch.
const BATCH: usize = 64;
/// Datagrams captured from node A per untimed refill of the decapsulate
/// benches; bounds the memory held (about 1.4 KB each).
const CHUNK: usize = 4096;
const MTU: u16 = 1380;

const A_OVERLAY: [u8; 4] = [100, 72, 0, 1];
const B_OVERLAY: [u8; 4] = [100, 72, 0, 2];

fn a_underlay() -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], 51820))
}

fn b_underlay() -> SocketAddr {
    SocketAddr::from(([198, 51, 100, 2], 51820))
}

/// Two engine nodes with an established WireGuard session from A to B.
struct Pair {
    a: Node,
    b: Node,
}

impl Pair {
    /// A configures B with an endpoint (so it initiates at once), B
    /// configures A without one (it learns it from the handshake). One data
    /// packet from A confirms the session on B's side.
    fn established() -> Self {
        let now = Instant::now();
        let ka = PrivateKey::generate(&mut rand::rngs::OsRng);
        let kb = PrivateKey::generate(&mut rand::rngs::OsRng);
        let (pa, pb) = (ka.public_key(), kb.public_key());
        let node = |key: PrivateKey, overlay: [u8; 4]| {
            Node::new(
                NodeConfig {
                    private_key: key,
                    addresses: vec![host(overlay)],
                    mtu: MTU,
                },
                [7; 32],
                now,
                std::time::Duration::from_secs(1_764_864_000),
            )
        };
        let mut pair = Pair {
            a: node(ka, A_OVERLAY),
            b: node(kb, B_OVERLAY),
        };
        pair.a
            .add_peer(
                PeerSpec {
                    public_key: pb,
                    endpoint: Some(b_underlay()),
                    allowed_ips: vec![host(B_OVERLAY)],
                    persistent_keepalive: None,
                },
                now,
            )
            .expect("A adds B");
        pair.b
            .add_peer(
                PeerSpec {
                    public_key: pa,
                    endpoint: None,
                    allowed_ips: vec![host(A_OVERLAY)],
                    persistent_keepalive: None,
                },
                now,
            )
            .expect("B adds A");
        pair.shuttle(now);
        // The round trip that proves the session, compared byte by byte.
        let packet = ipv4_packet(SIZES[0]);
        pair.a.handle_tun_packet(&packet, now);
        pair.shuttle(now);
        let tun = pair.b.poll_tun().expect("B decrypts A's first packet");
        assert_eq!(tun.as_slice(), &packet[..], "B's TUN packet is what A sent");
        pair.b.recycle(tun);
        assert!(pair.b.poll_tun().is_none());
        while pair.a.poll_event().is_some() {}
        while pair.b.poll_event().is_some() {}
        pair
    }

    /// Carries datagrams both ways until neither node has any left.
    fn shuttle(&mut self, now: Instant) {
        loop {
            let mut moved = false;
            while let Some(t) = self.a.poll_transmit() {
                assert_eq!(t.dst, b_underlay());
                self.b
                    .handle_datagram(a_underlay(), t.payload.as_slice(), now);
                self.a.recycle(t.payload);
                moved = true;
            }
            while let Some(t) = self.b.poll_transmit() {
                assert_eq!(t.dst, a_underlay());
                self.a
                    .handle_datagram(b_underlay(), t.payload.as_slice(), now);
                self.b.recycle(t.payload);
                moved = true;
            }
            if !moved {
                break;
            }
        }
    }

    /// Encrypts `n` copies of `packet` on A, untimed, into `out`: fresh
    /// datagrams (each with its own counter) for B to decapsulate.
    fn capture(&mut self, packet: &[u8], n: usize, out: &mut Captured) {
        out.clear();
        let now = Instant::now();
        for _ in 0..n {
            self.a.handle_tun_packet(packet, now);
            let t = self.a.poll_transmit().expect("A encapsulates");
            out.push(t.payload.as_slice());
            self.a.recycle(t.payload);
        }
        assert!(self.a.poll_transmit().is_none());
    }
}

/// Captured datagrams, back to back in one buffer.
#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Captured {
    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    fn push(&mut self, datagram: &[u8]) {
        self.bytes.extend_from_slice(datagram);
        self.ends.push(self.bytes.len());
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(s, e)| &self.bytes[s..e])
    }
}

fn host(octets: [u8; 4]) -> IpNet {
    IpNet::new(octets.into(), 32).expect("/32 is a valid prefix")
}

/// A valid IPv4/UDP packet of `len` bytes from A's overlay address to B's.
fn ipv4_packet(len: usize) -> Vec<u8> {
    assert!((28..=usize::from(u16::MAX)).contains(&len));
    let mut p = vec![0u8; len];
    p[0] = 0x45; // version 4, 5-word header
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64; // TTL
    p[9] = 17; // UDP
    p[12..16].copy_from_slice(&A_OVERLAY);
    p[16..20].copy_from_slice(&B_OVERLAY);
    let checksum = !ones_complement_sum(&p[..20]);
    p[10..12].copy_from_slice(&checksum.to_be_bytes());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[24..26].copy_from_slice(&((len - 20) as u16).to_be_bytes());
    for (i, b) in p[28..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

fn ones_complement_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn throughput(packets: usize, size: usize) -> Throughput {
    Throughput::Bytes((packets * size) as u64)
}

/// A → B: one TUN packet in, one datagram drained; `batch` of them per
/// iteration.
fn bench_encapsulate(c: &mut Criterion, name: &str, batch: usize) {
    let mut group = c.benchmark_group(name);
    for size in SIZES {
        let packet = ipv4_packet(size);
        group.throughput(throughput(batch, size));
        group.bench_with_input(
            BenchmarkId::from_parameter(size),
            &packet,
            |bench, packet| {
                // A fresh session per benchmark: no bench runs near
                // WireGuard's REJECT_AFTER_TIME (180 s).
                let mut pair = Pair::established();
                let now = Instant::now();
                bench.iter_custom(|iters| {
                    let mut sent = 0u64;
                    let start = Instant::now();
                    for _ in 0..iters {
                        for _ in 0..batch {
                            pair.a.handle_tun_packet(black_box(packet), now);
                        }
                        while let Some(t) = pair.a.poll_transmit() {
                            sent += 1;
                            black_box(t.payload.as_slice());
                            pair.a.recycle(t.payload);
                        }
                    }
                    let elapsed = start.elapsed();
                    assert_eq!(sent, iters * batch as u64, "one datagram per packet");
                    elapsed
                });
            },
        );
    }
    group.finish();
}

/// B decrypts A's datagrams: one datagram in, one TUN packet drained;
/// `batch` of them per iteration. A encrypts them beforehand, untimed.
fn bench_decapsulate(c: &mut Criterion, name: &str, batch: usize) {
    let mut group = c.benchmark_group(name);
    for size in SIZES {
        let packet = ipv4_packet(size);
        group.throughput(throughput(batch, size));
        group.bench_with_input(
            BenchmarkId::from_parameter(size),
            &packet,
            |bench, packet| {
                let mut pair = Pair::established();
                let mut captured = Captured::default();
                bench.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let mut left = iters * batch as u64;
                    while left > 0 {
                        // Whole batches per chunk, so a batch is never split.
                        let n = (left as usize).min(CHUNK / batch * batch);
                        pair.capture(packet, n, &mut captured);
                        let now = Instant::now();
                        let mut written = 0usize;
                        let start = Instant::now();
                        for (i, datagram) in captured.iter().enumerate() {
                            pair.b
                                .handle_datagram(a_underlay(), black_box(datagram), now);
                            if (i + 1) % batch == 0 {
                                while let Some(p) = pair.b.poll_tun() {
                                    written += 1;
                                    black_box(p.as_slice());
                                    pair.b.recycle(p);
                                }
                            }
                        }
                        total += start.elapsed();
                        assert_eq!(
                            written,
                            n,
                            "one TUN packet per datagram (drops: {:?})",
                            pair.b.stats()
                        );
                        left -= n as u64;
                    }
                    total
                });
            },
        );
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_encapsulate(c, "encapsulate", 1);
    bench_decapsulate(c, "decapsulate", 1);
    bench_encapsulate(c, "encapsulate_batch64", BATCH);
    bench_decapsulate(c, "decapsulate_batch64", BATCH);
}

/// Where criterion keeps its results: as criterion itself decides,
/// `$CRITERION_HOME`, else `<target dir>/criterion`.
fn criterion_home() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return home.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("criterion")
}

/// Mean time per iteration (ns) of one benchmark, if it ran since `since`.
fn mean_ns(dir: &Path, since: SystemTime) -> Option<f64> {
    let path = dir.join("new").join("estimates.json");
    let modified = std::fs::metadata(&path).ok()?.modified().ok()?;
    if modified < since {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

/// The results of this run in packets/s and Gbit/s of inner packets.
fn summary(home: &Path, since: SystemTime) {
    let groups = [
        ("encapsulate", 1),
        ("decapsulate", 1),
        ("encapsulate_batch64", BATCH),
        ("decapsulate_batch64", BATCH),
    ];
    let mut rows = Vec::new();
    for (group, batch) in groups {
        for size in SIZES {
            if let Some(ns) = mean_ns(&home.join(group).join(size.to_string()), since) {
                let per_packet = ns / batch as f64;
                let pps = 1e9 / per_packet;
                let gbps = pps * (size * 8) as f64 / 1e9;
                rows.push(format!(
                    "| {group} | {size} | {per_packet:.0} | {:.2} | {gbps:.2} |",
                    pps / 1e6
                ));
            }
        }
    }
    if rows.is_empty() {
        return;
    }
    println!("\n| bench | inner bytes | ns/packet | Mpackets/s | Gbit/s (inner) |");
    println!("|---|---:|---:|---:|---:|");
    for row in rows {
        println!("{row}");
    }
}

fn main() {
    let since = SystemTime::now();
    let home = criterion_home();
    let mut criterion = Criterion::default()
        .output_directory(&home)
        .configure_from_args();
    benches(&mut criterion);
    criterion.final_summary();
    summary(&home, since);
}
