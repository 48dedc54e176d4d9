//! Harnesses for the fuzz targets in `fuzz/` and their corpus regression
//! test (`tests/fuzz_corpus.rs`): one function per parser that takes input
//! from the network or a local socket, each taking arbitrary bytes.
//!
//! Pure, no I/O. Not an API: hidden from the docs, free to change with the
//! fuzz targets. Each harness must never panic on any input but through its
//! own `assert!`s, which state what must hold whatever the bytes (a forwarded
//! relay frame names its real source, a decrypted packet comes from the
//! peer's allowed addresses, a coalesced super-packet's virtio header agrees
//! with its packet, …). Living in the library, they are built by every
//! `cargo build --all-targets`, so an API change breaks them there and not
//! only in the fuzz workspace, which the main build never sees.

// A harness reports a broken property by panicking: that is what the fuzzer
// catches (an `expect` is such an assertion). The harnesses are the one
// place outside tests where that is right.
#![allow(clippy::panic, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipnet::IpNet;

use crate::control::uapi::{RequestParser, Step, MAX_LINE};
use crate::control::{Request, MAX_MESSAGE};
use crate::engine::{Node, NodeConfig, PeerSpec};
use crate::identity::{PrivateKey, PublicKey};
use crate::offload::{gro::Coalescer, tso, VnetHeader};
use crate::relay::{Command, RelayLimits, RelayTable};
use crate::rendezvous::registry::ConnId;
use crate::wire::control::{self as control_wire, MAX_FRAME, MAX_FRAME_UNADMITTED};
use crate::wire::probe::{self, ProbeKey};
use crate::wire::reflect::{self, Reflect};
use crate::wire::relay::{self, HEADER_LEN, MAX_FRAME_LEN, STREAM_PREFIX_LEN};

/// A fuzz target's harness: arbitrary bytes in, a panic for a bug.
pub type Harness = fn(&[u8]);

/// Every fuzz target: its name (the `fuzz/fuzz_targets/<name>.rs` file and
/// the `fuzz/corpus/<name>/` directory) and its harness.
pub const TARGETS: [(&str, Harness); 10] = [
    ("probe_open", probe_open),
    ("reflect", reflect),
    ("relay_frame", relay_frame),
    ("stream_framing", stream_framing),
    ("engine_datagram", engine_datagram),
    ("gro", gro),
    ("tso_split", tso_split),
    ("uapi_request", uapi_request),
    ("local_api", local_api),
    ("metrics_head", metrics_head),
];

/// Two fixed static keys: node A (`a`) and node B (`b`).
fn keys() -> (PrivateKey, PrivateKey) {
    (
        PrivateKey::from_bytes([0x11; 32]),
        PrivateKey::from_bytes([0x22; 32]),
    )
}

/// Probes (`wire/probe.rs`): the unauthenticated peek and the MAC check of
/// a node that shares a probe key with the claimed sender. Only the public
/// functions, so a change of the probe layout keeps the target valid.
pub fn probe_open(data: &[u8]) {
    // Derived once: an X25519 per input would be most of the run's time.
    static KEY: std::sync::OnceLock<Option<ProbeKey>> = std::sync::OnceLock::new();
    let peeked = probe::peek(data);
    let _ = probe::is_probe(data);
    let Some(key) = KEY.get_or_init(|| {
        let (a, b) = keys();
        ProbeKey::derive(&b, &a.public_key())
    }) else {
        unreachable!("fixed keys are not low order")
    };
    if let Ok(opened) = key.open(data) {
        // What verifies was readable before verification, and says the same.
        assert_eq!(peeked, Ok(opened), "open accepts what peek refuses");
        assert!(probe::is_probe(data));
    }
}

/// The NAT check (`wire/reflect.rs`): parse, and the reflector's answer.
pub fn reflect(data: &[u8]) {
    if let Ok(parsed) = Reflect::parse(data) {
        assert_eq!(
            Reflect::parse(&parsed.encode()),
            Ok(parsed),
            "a parsed NAT check re-encodes to itself"
        );
    }
    let from = SocketAddr::from(([198, 51, 100, 7], 40_000));
    if let Some(reply) = reflect::answer(data, from) {
        assert!(
            matches!(Reflect::parse(data), Ok(Reflect::Request { .. })),
            "only a request is answered"
        );
        match Reflect::parse(&reply) {
            Ok(Reflect::Response { observed, .. }) => assert_eq!(observed, from),
            other => panic!("the reflector's answer does not parse as a response: {other:?}"),
        }
    }
}

/// Relay frames (`wire/relay.rs`) and the relay table that forwards them:
/// a frame parses and re-encodes to the same bytes, and whatever the table
/// forwards parses and names the connection's node as its source.
pub fn relay_frame(data: &[u8]) {
    if let Ok((header, payload)) = relay::parse(data) {
        let mut out = Vec::new();
        assert!(relay::encode_frame(header, payload, &mut out).is_ok());
        assert_eq!(out, data, "a parsed relay frame re-encodes to its bytes");
    }
    let Some((&conn, frame)) = data.split_first() else {
        return;
    };
    let mut table = RelayTable::new(RelayLimits::default());
    for id in 1..=3u32 {
        if let Some(node) = relay::NodeId::new(id) {
            table.connect(node, ConnId(id.into()));
        }
    }
    let from = ConnId(u64::from(conn % 5));
    match table.handle_frame(from, Bytes::copy_from_slice(frame), Instant::now()) {
        Command::Forward {
            to,
            frame: forwarded,
        } => {
            let (header, payload) =
                relay::parse(&forwarded).unwrap_or_else(|e| panic!("forwarded frame: {e}"));
            assert_eq!(
                Some(header.node),
                table.node_of(from),
                "a forwarded frame names its sender"
            );
            assert!(table.node_of(to).is_some());
            assert_eq!(
                payload,
                &frame[HEADER_LEN..],
                "the payload is passed on unchanged"
            );
        }
        Command::Drop { .. } => {}
    }
}

/// Stream framing: relay frames on a relay stream (`relay/stream.rs`, by
/// [`relay::stream_frame_len`] and [`relay::decode_stream_frame`]) and
/// control frames (`wire/control.rs`: [`control_wire::frame_len`]), read
/// the way the readers do: four bytes of length, checked before anything
/// is allocated, then the frame. The first byte picks where the input is
/// cut into reads.
pub fn stream_framing(data: &[u8]) {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    // Relay: a buffered reader, fed in reads of `cut` bytes (at least one).
    let step = usize::from(cut).max(1);
    let mut buf = Vec::new();
    let mut fed = 0;
    while fed < stream.len() {
        let end = (fed + step).min(stream.len());
        buf.extend_from_slice(&stream[fed..end]);
        fed = end;
        loop {
            match relay::decode_stream_frame(&buf) {
                Ok(Some(frame)) => {
                    assert!(
                        frame.consumed > STREAM_PREFIX_LEN + HEADER_LEN
                            && frame.consumed <= buf.len()
                    );
                    assert!(frame.consumed <= STREAM_PREFIX_LEN + MAX_FRAME_LEN);
                    buf.drain(..frame.consumed);
                }
                Ok(None) => {
                    // Waiting for more never needs more than one frame's worth.
                    assert!(buf.len() < STREAM_PREFIX_LEN + MAX_FRAME_LEN);
                    break;
                }
                Err(_) => {
                    buf.clear();
                    break;
                }
            }
        }
    }
    // The same stream read with read_exact: prefix, check, then the body.
    let mut rest = stream;
    while let Some((prefix, after)) = rest.split_first_chunk::<STREAM_PREFIX_LEN>() {
        let Ok(len) = relay::stream_frame_len(*prefix) else {
            break;
        };
        assert!(len <= MAX_FRAME_LEN);
        let Some(frame) = after.get(..len) else { break };
        let _ = relay::parse(frame);
        rest = &after[len..];
    }
    // Control frames: the length is checked against the limit before the
    // body is read; a body decodes or is refused.
    for max in [MAX_FRAME_UNADMITTED, MAX_FRAME] {
        let mut rest = stream;
        while let Some((header, after)) = rest.split_first_chunk::<4>() {
            let Ok(len) = control_wire::frame_len(*header, max) else {
                break;
            };
            assert!(
                len <= max,
                "frame_len let {len} bytes through a limit of {max}"
            );
            let Some(body) = after.get(..len) else { break };
            let _ = control_wire::decode::<control_wire::NodeMessage>(body);
            let _ = control_wire::decode::<control_wire::ServerMessage>(body);
            rest = &after[len..];
        }
    }
}

/// Real datagrams of A kept for the engine harness's replays.
const MAX_REAL: usize = 64;

const A_OVERLAY: [u8; 4] = [100, 72, 0, 1];
const B_OVERLAY: [u8; 4] = [100, 72, 0, 2];

fn host(ip: [u8; 4]) -> IpNet {
    IpNet::from(IpAddr::from(ip))
}

/// Node B of the engine harness, with node A as its one peer; and A, to
/// make real handshakes and data packets.
struct EnginePair {
    a: Node,
    b: Node,
    a_key: PublicKey,
    a_addr: SocketAddr,
    b_addr: SocketAddr,
}

impl EnginePair {
    fn new(now: Instant) -> Self {
        let (ka, kb) = keys();
        let (a_key, b_key) = (ka.public_key(), kb.public_key());
        let a_addr = SocketAddr::from(([192, 0, 2, 1], 51820));
        let b_addr = SocketAddr::from(([198, 51, 100, 2], 51820));
        let node = |private_key, overlay| {
            let config = NodeConfig {
                private_key,
                addresses: vec![host(overlay)],
                mtu: 1380,
            };
            // A fixed seed and wall clock: a crashing input reproduces.
            Node::new(
                config,
                [0x5e; 32],
                now,
                std::time::Duration::from_secs(1_764_864_000),
            )
        };
        let mut pair = Self {
            a: node(ka, A_OVERLAY),
            b: node(kb, B_OVERLAY),
            a_key,
            a_addr,
            b_addr,
        };
        let spec = |public_key, endpoint, overlay| PeerSpec {
            public_key,
            endpoint,
            allowed_ips: vec![host(overlay)],
            persistent_keepalive: None,
        };
        // Fixed keys and addresses: a failure here is a harness bug.
        let added = pair
            .a
            .add_peer(spec(b_key, Some(b_addr), B_OVERLAY), now)
            .is_ok()
            && pair.b.add_peer(spec(a_key, None, A_OVERLAY), now).is_ok();
        assert!(added, "the engine harness cannot configure its peers");
        pair
    }

    /// A's datagrams towards B, as they would cross the wire.
    fn sent_by_a(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(t) = self.a.poll_transmit() {
            out.push(t.payload.as_slice().to_vec());
            self.a.recycle(t.payload);
        }
        out
    }

    /// Hands B's datagrams to A, and drains everything else B produced,
    /// checking what B writes to its TUN: only packets from A's allowed
    /// addresses (WireGuard's cryptokey routing).
    fn drain_b(&mut self, now: Instant) {
        while let Some(t) = self.b.poll_transmit() {
            if t.dst == self.a_addr {
                self.a
                    .handle_datagram(self.b_addr, t.payload.as_slice(), now);
            }
            self.b.recycle(t.payload);
        }
        while let Some(packet) = self.b.poll_tun() {
            let source = inner_source(packet.as_slice());
            assert_eq!(
                source,
                Some(IpAddr::from(A_OVERLAY)),
                "B's TUN got a packet not from A's allowed IPs"
            );
            self.b.recycle(packet);
        }
        while self.b.poll_relay().is_some() {}
        while self.b.poll_event().is_some() {}
        while self.a.poll_relay().is_some() {}
        while self.a.poll_event().is_some() {}
        while let Some(packet) = self.a.poll_tun() {
            self.a.recycle(packet);
        }
    }
}

fn inner_source(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => packet
            .get(12..16)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(IpAddr::from),
        6 => packet
            .get(8..24)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .map(IpAddr::from),
        _ => None,
    }
}

/// An IPv4/UDP packet from A to B, `len` bytes of payload.
fn a_to_b_packet(len: usize) -> Vec<u8> {
    let total = 28 + len;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&A_OVERLAY);
    p[16..20].copy_from_slice(&B_OVERLAY);
    p[20..22].copy_from_slice(&1000u16.to_be_bytes());
    p[22..24].copy_from_slice(&2000u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + len) as u16).to_be_bytes());
    p
}

/// The engine's datagram path (`engine::Node::handle_datagram`, and
/// `handle_relayed`) of a node with one configured peer. The input is a
/// list of steps, each an operation byte and a two-byte length, then that
/// many bytes: a raw datagram from the peer's address, from another
/// address, or through the relay; one of the peer's real datagrams
/// (handshake initiation, then data packets) as sent, or with the step's
/// bytes XORed into it; or time passing. Whatever B decrypts and writes
/// to its TUN must come from the peer's allowed addresses.
pub fn engine_datagram(data: &[u8]) {
    let start = Instant::now();
    let mut now = start;
    let mut pair = EnginePair::new(now);
    // A's real traffic: its handshake initiation, and once B answered,
    // data packets of a few sizes.
    pair.a.handle_tun_packet(&a_to_b_packet(64), now);
    let mut real = pair.sent_by_a();
    let mut rest = data;
    let mut next_real = 0usize;
    while let Some((&op, after)) = rest.split_first() {
        let Some((len, after)) = after.split_first_chunk::<2>() else {
            break;
        };
        let len = usize::from(u16::from_le_bytes(*len)).min(after.len());
        let (chunk, after) = after.split_at(len);
        rest = after;
        match op % 8 {
            0 => pair.b.handle_datagram(pair.a_addr, chunk, now),
            1 => pair
                .b
                .handle_datagram(SocketAddr::from(([203, 0, 113, 9], 4444)), chunk, now),
            2 => pair.b.handle_relayed(pair.a_key, chunk, now),
            3 | 4 if !real.is_empty() => {
                let mut datagram = real[next_real % real.len()].clone();
                next_real += 1;
                if op % 8 == 3 {
                    // The first two bytes of the chunk say where to XOR the rest.
                    let at = chunk.first().map_or(0, |&b| usize::from(b));
                    for (i, x) in chunk.iter().skip(1).enumerate() {
                        let n = datagram.len().max(1);
                        if let Some(byte) = datagram.get_mut((at + i) % n) {
                            *byte ^= x;
                        }
                    }
                }
                pair.b.handle_datagram(pair.a_addr, &datagram, now);
            }
            5 => {
                let ms = chunk.iter().fold(0u64, |acc, &b| {
                    acc.wrapping_mul(256).wrapping_add(u64::from(b))
                });
                now += Duration::from_millis(ms % 200_000);
                pair.b.handle_timeout(now);
                pair.a.handle_timeout(now);
            }
            6 => {
                // More real traffic from A: data once the session is up.
                pair.a
                    .handle_tun_packet(&a_to_b_packet(chunk.len().min(1300)), now);
            }
            _ => pair.b.handle_datagram(pair.a_addr, chunk, now),
        }
        pair.drain_b(now);
        // What A sent since, once B's response reached it: its queued data
        // packet first. Kept up to a bound, as material for later steps.
        let more = pair.sent_by_a();
        if real.len() < MAX_REAL {
            real.extend(more);
        }
    }
}

/// The receive coalescer (`offload/gro.rs`). The input is a list
/// of packets (two-byte length, then the packet; the first byte of the
/// input says whether UDP is joined, bit 0, and whether the virtio-net
/// header is the 24-byte tunnel one, bit 1). Every packet is written exactly once,
/// alone or inside a super-packet, and every write's virtio-net header
/// agrees with its packet.
pub fn gro(data: &[u8]) {
    use tun_rs::{
        VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
        VIRTIO_NET_HDR_GSO_UDP_L4, VIRTIO_NET_HDR_LEN,
    };
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let header = if mode & 2 == 2 {
        VnetHeader::Tunnel
    } else {
        VnetHeader::Legacy
    };
    let hl = header.size();
    let mut coalescer = Coalescer::new(mode & 1 == 1, header);
    let mut inputs: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut pushed = 0usize;
    let mut written = 0usize;
    let mut check = |out: &[u8], inputs: &mut HashMap<Vec<u8>, usize>| {
        assert!(out.len() > hl, "a write without a packet");
        let hdr = VirtioNetHdr::decode(&out[..VIRTIO_NET_HDR_LEN])
            .unwrap_or_else(|_| panic!("virtio header"));
        assert!(
            out[VIRTIO_NET_HDR_LEN..hl].iter().all(|&b| b == 0),
            "the tunnel header's own fields are zero"
        );
        let pkt = &out[hl..];
        if hdr.gso_type == 0 {
            assert!(
                out[..hl].iter().all(|&b| b == 0),
                "a plain write's header is all zero"
            );
            // A packet written alone is written as it came.
            match inputs.get_mut(pkt) {
                Some(n) if *n > 0 => *n -= 1,
                _ => panic!("a plain write of {} bytes that was not pushed", pkt.len()),
            }
            written += 1;
            return;
        }
        let v6 = pkt[0] >> 4 == 6;
        let (ip_len, csum_offset) = match hdr.gso_type {
            VIRTIO_NET_HDR_GSO_TCPV4 => {
                assert!(!v6);
                (usize::from(pkt[0] & 0x0f) * 4, 16)
            }
            VIRTIO_NET_HDR_GSO_TCPV6 => {
                assert!(v6);
                (40, 16)
            }
            VIRTIO_NET_HDR_GSO_UDP_L4 => (
                if v6 {
                    40
                } else {
                    usize::from(pkt[0] & 0x0f) * 4
                },
                6,
            ),
            other => panic!("unknown GSO type {other}"),
        };
        let hdr_len = usize::from(hdr.hdr_len);
        let gso_size = usize::from(hdr.gso_size);
        assert_eq!(
            usize::from(hdr.csum_start),
            ip_len,
            "csum_start is the transport header"
        );
        assert_eq!(usize::from(hdr.csum_offset), csum_offset);
        assert!(
            hdr_len > ip_len && hdr_len < pkt.len(),
            "hdr_len {hdr_len} of a {}-byte packet",
            pkt.len()
        );
        assert!(gso_size > 0, "a super-packet with gso_size 0");
        let ip_total = if v6 {
            40 + usize::from(u16::from_be_bytes([pkt[4], pkt[5]]))
        } else {
            usize::from(u16::from_be_bytes([pkt[2], pkt[3]]))
        };
        assert_eq!(
            ip_total,
            pkt.len(),
            "the IP length field is the super-packet's length"
        );
        if hdr.gso_type == VIRTIO_NET_HDR_GSO_UDP_L4 {
            let udp_len = usize::from(u16::from_be_bytes([pkt[ip_len + 4], pkt[ip_len + 5]]));
            assert_eq!(
                udp_len,
                pkt.len() - ip_len,
                "the UDP length field is the super-packet's"
            );
        }
        let payload = pkt.len() - hdr_len;
        let segments = payload.div_ceil(gso_size);
        assert!(segments >= 2, "a super-packet of {segments} segment");
        assert!(segments <= 64);
        written += segments;
    };
    // Each packet sits behind room for the virtio header, as the driver's.
    let mut frame = Vec::new();
    while let Some((len, after)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_le_bytes(*len)).min(after.len());
        let (pkt, after) = after.split_at(len);
        rest = after;
        if pkt.is_empty() {
            continue;
        }
        *inputs.entry(pkt.to_vec()).or_default() += 1;
        pushed += 1;
        frame.clear();
        frame.resize(hl, 0xee);
        frame.extend_from_slice(pkt);
        let mut outs: Vec<Vec<u8>> = Vec::new();
        coalescer.push(&mut frame, hl, &mut |out: &[u8]| outs.push(out.to_vec()));
        for out in outs {
            check(&out, &mut inputs);
        }
    }
    let mut outs: Vec<Vec<u8>> = Vec::new();
    coalescer.finish(&mut |out: &[u8]| outs.push(out.to_vec()));
    for out in outs {
        check(&out, &mut inputs);
    }
    assert_eq!(written, pushed, "every packet is written exactly once");
}

/// TSO/USO splitting of a TUN read (`offload/tso.rs`), the read taken
/// behind either virtio-net header: the count returned is the packets
/// handed out, none empty, none longer than the read.
pub fn tso_split(data: &[u8]) {
    for header in [VnetHeader::Legacy, VnetHeader::Tunnel] {
        let mut read = data.to_vec();
        let mut handed = 0usize;
        let max = data.len();
        let result = tso::split(&mut read, header, |pkt| {
            assert!(
                !pkt.is_empty() && pkt.len() <= max,
                "a {}-byte packet out of a {max}-byte read",
                pkt.len()
            );
            handed += 1;
        });
        if let Ok(count) = result {
            assert_eq!(count, handed, "split's count is what it handed out");
        }
    }
}

/// The UAPI request parser (`control/uapi.rs`), fed the input line by line
/// as the socket reads it (lines cut at `MAX_LINE` + 1 bytes, as its reader does).
pub fn uapi_request(data: &[u8]) {
    let mut parser = RequestParser::new();
    let mut rest = data;
    while !rest.is_empty() {
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |i| i + 1)
            .min(MAX_LINE + 1);
        let (line, after) = rest.split_at(end);
        rest = after;
        match parser.push_line(line) {
            Step::NeedLine | Step::Get => {}
            Step::Refuse(refusal) => {
                let _ = refusal.reply();
                if refusal.ends_connection() {
                    return;
                }
            }
        }
    }
}

/// The local API's request parsing (`control/server.rs`): one JSON line,
/// versioned.
pub fn local_api(data: &[u8]) {
    let line = data.get(..data.len().min(MAX_MESSAGE + 1)).unwrap_or(data);
    let _ = crate::control::server::parse::<Request>(line);
    let _ = crate::control::server::parse::<crate::rendezvous::admin::AdminRequest>(line);
}

/// The metrics endpoint (`metrics/http.rs`): the input is what a client
/// sends before it closes its side; hyper reads it, the endpoint answers.
/// The exchange ends (the client's EOF ends it at the latest), the answer
/// is HTTP or nothing, and metrics are served only for a `GET`.
pub fn metrics_head(data: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let data = data
        .get(..data.len().min(2 * crate::metrics::http::MAX_REQUEST_HEAD))
        .unwrap_or(data);
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return;
    };
    let answer = runtime.block_on(async {
        let (mut client, mut server) = tokio::io::duplex(64 << 10);
        let serving =
            crate::metrics::http::serve_one(&mut server, || async { Some("x 1\n".to_owned()) });
        let asking = async {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut answer = Vec::new();
            let _ = client.read_to_end(&mut answer).await;
            answer
        };
        let exchange = async { tokio::join!(serving, asking).1 };
        tokio::time::timeout(crate::metrics::http::CONNECTION_DEADLINE, exchange).await
    });
    let answer = answer.expect("the exchange ends once the client has closed its side");
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1."),
        "not an HTTP answer: {:?}",
        String::from_utf8_lossy(&answer)
    );
    if answer.starts_with(b"HTTP/1.1 200 ") || answer.starts_with(b"HTTP/1.0 200 ") {
        assert!(
            // HTTP/1 allows empty lines before the request line.
            data.trim_ascii_start().starts_with(b"GET "),
            "metrics served for a request that is not a GET"
        );
    }
}

/// Seeds for each target's corpus: a few valid inputs and near misses.
/// `tests/fuzz_corpus.rs` writes them to `fuzz/corpus/<target>/` on request.
pub fn seeds(target: &str) -> Vec<(&'static str, Vec<u8>)> {
    let (a, b) = keys();
    let record = |op: u8, bytes: &[u8]| {
        let mut out = vec![op];
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(bytes);
        out
    };
    match target {
        "probe_open" => {
            let Some(key) = ProbeKey::derive(&a, &b.public_key()) else {
                return Vec::new();
            };
            let mut ping = [0u8; probe::PROBE_LEN];
            let ping = key
                .seal(
                    probe::ProbeKind::Ping {
                        sent_ms: Some(1_764_864_000_000),
                    },
                    [7; 12],
                    &a.public_key(),
                    &mut ping,
                )
                .to_vec();
            let mut pong = [0u8; probe::PROBE_LEN];
            let observed = SocketAddr::from(([198, 51, 100, 7], 51820));
            let pong = key
                .seal(
                    probe::ProbeKind::Pong { observed },
                    [8; 12],
                    &a.public_key(),
                    &mut pong,
                )
                .to_vec();
            let mut bad_mac = ping.clone();
            if let Some(last) = bad_mac.last_mut() {
                *last ^= 1;
            }
            vec![
                ("ping", ping),
                ("pong", pong),
                ("bad-mac", bad_mac),
                ("magic-only", probe::MAGIC.to_vec()),
            ]
        }
        "reflect" => {
            let request = Reflect::Request { tx: [3; 12] }.encode().to_vec();
            let observed = SocketAddr::from((Ipv4Addr::new(203, 0, 113, 5), 40_000));
            let response = Reflect::Response {
                tx: [4; 12],
                observed,
            }
            .encode()
            .to_vec();
            vec![
                ("request", request),
                ("response", response),
                ("short", reflect::MAGIC.to_vec()),
            ]
        }
        "relay_frame" => {
            let Some(to) = relay::NodeId::new(2) else {
                return Vec::new();
            };
            let header = relay::RelayHeader {
                kind: relay::RelayKind::Packet,
                node: to,
            };
            let mut frame = vec![1u8];
            let _ = relay::encode_frame(header, &[4, 0, 0, 0, 1, 2, 3, 4], &mut frame);
            let mut self_addressed = vec![2u8];
            self_addressed.extend_from_slice(&frame[1..]);
            vec![
                ("forwarded", frame),
                ("self-addressed", self_addressed),
                ("header-only", vec![1, 0x11, 0, 0, 0, 2]),
            ]
        }
        "stream_framing" => {
            let Some(to) = relay::NodeId::new(7) else {
                return Vec::new();
            };
            let header = relay::RelayHeader {
                kind: relay::RelayKind::Packet,
                node: to,
            };
            let mut two = vec![3u8];
            let _ = relay::encode_stream_frame(header, &[4; 40], &mut two);
            let _ = relay::encode_stream_frame(header, &[1; 3], &mut two);
            let mut control = vec![5u8];
            control.extend_from_slice(&control_wire::encode(
                &control_wire::NodeMessage::Candidates {
                    candidates: Vec::new(),
                },
            ));
            vec![
                ("two-relay-frames", two),
                ("control-frame", control),
                ("huge-length", vec![1, 0xff, 0xff, 0xff, 0xff]),
            ]
        }
        "engine_datagram" => {
            // A's handshake initiation replayed, then mutated; data once up.
            let mut steps = record(4, &[]);
            steps.extend(record(6, &[0; 100]));
            steps.extend(record(4, &[]));
            steps.extend(record(3, &[16, 0xff, 0x01]));
            steps.extend(record(5, &[0x01, 0x00]));
            steps.extend(record(4, &[]));
            let mut garbage = record(0, &[1, 0, 0, 0, 9, 9, 9]);
            garbage.extend(record(2, &[4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
            garbage.extend(record(1, probe::MAGIC.as_slice()));
            vec![("replay-and-mutate", steps), ("garbage", garbage)]
        }
        "gro" => {
            let tcp = |seq: u32, payload: usize, flags: u8| {
                let total = 40 + payload;
                let mut p = vec![0u8; total];
                p[0] = 0x45;
                p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                p[6] = 0x40;
                p[8] = 64;
                p[9] = 6;
                p[12..16].copy_from_slice(&A_OVERLAY);
                p[16..20].copy_from_slice(&B_OVERLAY);
                p[20..22].copy_from_slice(&1000u16.to_be_bytes());
                p[22..24].copy_from_slice(&2000u16.to_be_bytes());
                p[24..28].copy_from_slice(&seq.to_be_bytes());
                p[32] = 5 << 4;
                p[33] = flags;
                p
            };
            let packets = |list: Vec<Vec<u8>>, udp: u8| {
                let mut out = vec![udp];
                for p in list {
                    out.extend_from_slice(&(p.len() as u16).to_le_bytes());
                    out.extend_from_slice(&p);
                }
                out
            };
            let stream = packets(
                vec![tcp(1, 100, 0x10), tcp(101, 100, 0x10), tcp(201, 50, 0x18)],
                0,
            );
            let gap = packets(
                vec![tcp(1, 100, 0x10), tcp(500, 100, 0x10), tcp(600, 100, 0x10)],
                0,
            );
            let udp = packets(
                vec![a_to_b_packet(200), a_to_b_packet(200), a_to_b_packet(120)],
                1,
            );
            vec![("tcp-stream", stream), ("tcp-gap", gap), ("udp-flow", udp)]
        }
        "tso_split" => {
            let mut plain = vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN];
            plain.extend_from_slice(&a_to_b_packet(20));
            // A TCPv4 super-packet of three 100-byte segments.
            let mut tso = vec![
                1u8,
                tun_rs::VIRTIO_NET_HDR_GSO_TCPV4,
                40,
                0,
                100,
                0,
                20,
                0,
                16,
                0,
            ];
            let mut p = vec![0u8; 340];
            p[0] = 0x45;
            p[2..4].copy_from_slice(&340u16.to_be_bytes());
            p[8] = 64;
            p[9] = 6;
            p[12..16].copy_from_slice(&A_OVERLAY);
            p[16..20].copy_from_slice(&B_OVERLAY);
            p[32] = 5 << 4;
            p[33] = 0x18;
            tso.extend_from_slice(&p);
            vec![("plain", plain), ("tcp4-super", tso)]
        }
        "uapi_request" => vec![
            ("get", b"get=1\n\n".to_vec()),
            ("set", b"set=1\nprivate_key=00\n\nget=1\n\n".to_vec()),
            ("bad", b"frob=1\n".to_vec()),
        ],
        "local_api" => vec![
            (
                "status",
                br#"{"version":1,"body":{"type":"status"}}"#.to_vec(),
            ),
            ("peers", br#"{"version":1,"body":"peers"}"#.to_vec()),
            ("old-version", br#"{"version":0}"#.to_vec()),
        ],
        "metrics_head" => vec![
            ("get", b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
            ("post", b"POST /metrics HTTP/1.0\n\n".to_vec()),
            ("not-found", b"GET /?a HTTP/1.1\r\n\r\n".to_vec()),
            (
                "leading-crlf",
                b"\r\nGET /metrics HTTP/1.1\r\n\r\n".to_vec(),
            ),
            ("not-http", b"hello\r\n\r\n".to_vec()),
            ("too-large", {
                let mut head = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
                head.resize(crate::metrics::http::MAX_REQUEST_HEAD + 64, b'a');
                head
            }),
            (
                "unfinished",
                b"GET /metrics HTTP/1.1\r\nHost: x\r\n".to_vec(),
            ),
        ],
        _ => Vec::new(),
    }
}
