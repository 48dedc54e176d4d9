//! meshd's one event loop: TUN, UDP socket, timers, peer-map changes and
//! API requests in, the engine's outputs out.
//!
//! Does I/O. The loop owns the [`Node`] outright (no lock): each wakeup it
//! drains a bounded batch from the TUN and from the socket into the engine,
//! runs due timers, then flushes every queued transmit, TUN write and event,
//! and hands the buffers back to the engine's pool. QUIC datagrams on the
//! shared socket are passed to quinn ([`super::quic`]) untouched.
//! Its answers to the local API, including the ones that wait for the
//! network (`meshctl ping`, `meshctl netcheck`), are in [`requests`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

mod requests;

use super::quic::{QuicDatagram, QuicSource};
use super::tun::Tun;
use super::udp::{canonical, gso_run, UdpSocket, MAX_GSO_SEGMENTS};
use crate::control::server::Ask;
use crate::control::{IoCounters, Response};
use crate::engine::nat::{MappingObserver, Observer};
use crate::engine::paths::Source;
use crate::engine::{Event, Node, PeerSpec, Transmit};
use crate::identity::PublicKey;
use crate::offload::{gro::Coalescer, tso};
use crate::wire::control::NatMapping;
use crate::wire::reflect::Reflect;
use crate::wire::relay::{self, NodeId, RelayKind};
use crate::wire::{classify, DatagramKind};
use requests::{PendingPing, Reflecting};
use tun_rs::VIRTIO_NET_HDR_LEN;

/// Reads from one source per wakeup before the others get a turn.
const BATCH: usize = 64;
/// Packets read from the TUN (about three TSO super-packets) or datagrams
/// from the socket (a dozen GRO batches) before they are sent on: a
/// pipeline of short batches keeps the next hop busy while this one
/// encrypts, where one long batch leaves it idle (measured: single-stream
/// throughput about 10 % higher than with 64 reads per wakeup).
const TUN_BUDGET: u64 = 128;
const UDP_BUDGET: u64 = 512;
/// Big enough for any datagram (a UDP payload is at most 65507 bytes).
const RECV_BUF: usize = 1 << 16;

/// What the driver reports about itself in `meshctl status`.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: Option<String>,
    pub interface: String,
    pub mtu: u16,
    pub listen_port: u16,
    pub addresses: Vec<String>,
    /// Addresses on the node's other interfaces: being seen at one of
    /// them means there is no NAT.
    pub underlay_ips: Vec<IpAddr>,
}

/// A peer from the rendezvous's map, with what the API shows of it.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshPeer {
    pub spec: PeerSpec,
    pub name: String,
    pub overlay_ips: Vec<IpAddr>,
    /// Where it may be reached; probes pick among them.
    pub candidates: Vec<(SocketAddr, Source)>,
    /// Its NAT's mapping behaviour, as it reported it.
    pub nat: NatMapping,
}

/// What the API shows of a mesh peer besides the engine's state.
#[derive(Debug, Clone)]
struct PeerMeta {
    name: String,
    overlay_ips: Vec<IpAddr>,
    nat: NatMapping,
    /// The port of its local candidates: where its meshd listens.
    port: Option<u16>,
}

/// Changes to the driver's peers and identity, from the node agent.
#[derive(Debug)]
pub enum DriverCommand {
    /// The full peer map: mesh peers not in it go (static peers stay).
    ReplacePeers(Vec<MeshPeer>),
    UpsertPeer(MeshPeer),
    RemovePeer(PublicKey),
    /// The peer is probing us: probe it back now.
    Punch(PublicKey),
    /// This node's name and addresses as the rendezvous assigned them.
    SetInfo(NodeInfo),
    /// The rendezvous sees this node's socket at this address.
    SeenByRendezvous(SocketAddr),
}

/// The driver's inputs besides the TUN and the socket.
pub struct Inputs {
    pub asks: mpsc::Receiver<Ask>,
    pub commands: mpsc::Receiver<DriverCommand>,
    /// Where QUIC datagrams go; `None` without a rendezvous.
    pub quic: Option<mpsc::Sender<QuicDatagram>>,
    /// The one source whose QUIC datagrams go there (the rendezvous).
    pub quic_source: Arc<QuicSource>,
    /// Punch requests for the rendezvous session; `None` without one.
    pub punch: Option<mpsc::Sender<PublicKey>>,
    /// The rendezvous connection while a session is up (for the relay);
    /// `None` without a rendezvous.
    pub relay_connection: Option<watch::Receiver<Option<quinn::Connection>>>,
    /// Frames relayed to us (header naming the source, then the packet).
    pub relay_frames: Option<mpsc::Receiver<Bytes>>,
    /// Where this node's NAT mapping goes for the rendezvous session;
    /// `None` without a rendezvous.
    pub nat: Option<watch::Sender<NatMapping>>,
}

/// Relayed frames queued for the driver before they are dropped.
pub const RELAY_INBOX: usize = 1024;

pub struct Driver {
    node: Node,
    tun: Tun,
    udp: Arc<UdpSocket>,
    inputs: Inputs,
    info: NodeInfo,
    /// Names, overlay addresses and NAT behaviour of mesh peers.
    meta: HashMap<PublicKey, PeerMeta>,
    /// Where others see our socket: our NAT's mapping behaviour.
    observer: MappingObserver,
    /// The rendezvous's QUIC address, once a session was up.
    rendezvous_addr: Option<SocketAddr>,
    /// The NAT check in flight, and where the last answer saw us (and how fast).
    reflecting: Option<Reflecting>,
    reflector_seen: Option<(SocketAddr, std::time::Duration)>,
    pending_pings: Vec<PendingPing>,
    /// `meshctl netcheck`s waiting, with their deadlines.
    pending_netcheck: Vec<(Instant, oneshot::Sender<Response>)>,
    /// Peers from the config file: a peer map never removes them.
    static_peers: HashSet<PublicKey>,
    buf: Vec<u8>,
    /// System calls of the packet path and the packets they carried; the
    /// errors among them are logged at powers of two, so a dead route logs
    /// a few lines, not one per packet.
    io: IoCounters,
    /// QUIC datagrams dropped because quinn was not keeping up.
    quic_dropped: u64,
    /// QUIC-looking datagrams dropped because they did not come from the
    /// rendezvous.
    quic_foreign: u64,
    /// The rendezvous connection the relay uses now.
    relay_connection: Option<quinn::Connection>,
    /// Relay ids (overlay IPv4) of mesh peers, both ways.
    relay_ids: HashMap<NodeId, PublicKey>,
    /// Bounds oversized relay frames in flight on streams.
    relay_streams: Arc<Semaphore>,
    relay_dropped: u64,
    /// The transmits of one flush, kept to reuse the allocation.
    tx_batch: Vec<Transmit>,
    tun_buffers: TunBuffers,
    /// Where relay frames are written before they go to quinn.
    relay_chunk: BytesMut,
    /// Where QUIC packets from the socket are copied before they go to quinn.
    quic_chunk: BytesMut,
}

/// Bytes allocated at a time for the owned packets quinn wants.
const CHUNK: usize = 64 << 10;

/// Copies `parts` into `chunk` and cuts them off as one owned [`Bytes`]:
/// quinn needs an owned buffer per datagram, and this costs one allocation
/// per [`CHUNK`] bytes (about 45 full-size packets) instead of one per packet.
fn cut_from_chunk(chunk: &mut BytesMut, parts: &[&[u8]]) -> Bytes {
    let needed = parts.iter().map(|p| p.len()).sum::<usize>();
    if chunk.capacity() - chunk.len() < needed {
        chunk.reserve(CHUNK.max(needed));
    }
    for part in parts {
        chunk.extend_from_slice(part);
    }
    chunk.split().freeze()
}

/// Buffers of the TUN's reads and writes, allocated once.
struct TunBuffers {
    /// One raw read: virtio header and a packet of up to 64 KiB.
    read: Vec<u8>,
    /// Joins the TCP segments of one flush into super-packets.
    gro: Coalescer,
}

impl TunBuffers {
    fn new(tun: &Tun) -> Self {
        Self {
            read: vec![0; VIRTIO_NET_HDR_LEN + usize::from(u16::MAX)],
            // UDP too where the device takes UDP super-packets.
            gro: Coalescer::new(tun.udp_gso()),
        }
    }
}

impl Driver {
    pub fn new(node: Node, tun: Tun, udp: Arc<UdpSocket>, inputs: Inputs, info: NodeInfo) -> Self {
        let static_peers = node.peers().map(|p| p.public_key).collect();
        let tun_buffers = TunBuffers::new(&tun);
        Self {
            node,
            tun,
            udp,
            inputs,
            info,
            meta: HashMap::new(),
            observer: MappingObserver::new(),
            rendezvous_addr: None,
            reflecting: None,
            reflector_seen: None,
            pending_pings: Vec::new(),
            pending_netcheck: Vec::new(),
            static_peers,
            buf: vec![0; RECV_BUF],
            io: IoCounters::default(),
            quic_dropped: 0,
            quic_foreign: 0,
            relay_connection: None,
            relay_ids: HashMap::new(),
            relay_streams: Arc::new(Semaphore::new(RELAY_STREAMS)),
            relay_dropped: 0,
            tx_batch: Vec::new(),
            tun_buffers,
            relay_chunk: BytesMut::new(),
            quic_chunk: BytesMut::new(),
        }
    }

    /// Runs until `shutdown` completes or the TUN or socket fails for good.
    pub async fn run(&mut self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        tokio::pin!(shutdown);
        // Peers configured with a keepalive may already have handshakes queued.
        self.flush().await;
        loop {
            let (deadline, reason) = self.node.poll_timeout();
            let pending = self.pending_deadline();
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                r = self.tun.readable() => r?,
                r = self.udp.readable() => r?,
                Some(ask) = self.inputs.asks.recv() => self.answer(ask),
                Some(command) = self.inputs.commands.recv() => self.apply(command),
                Some(frame) = recv_frame(&mut self.inputs.relay_frames) => {
                    self.relayed(frame);
                    // The rest that is waiting, as one batch: one flush and
                    // coalesced TUN writes for all of them.
                    for _ in 1..UDP_BUDGET {
                        let Some(frame) = self.inputs.relay_frames.as_mut().and_then(|rx| rx.try_recv().ok()) else {
                            break;
                        };
                        self.relayed(frame);
                    }
                }
                Some(connection) = relay_changed(&mut self.inputs.relay_connection) => {
                    tracing::info!(available = connection.is_some(), max_datagram = ?connection.as_ref().and_then(|c| c.max_datagram_size()), "relay");
                    let now = Instant::now();
                    self.node.set_relay_available(connection.is_some(), now);
                    if let Some(c) = &connection {
                        // A new session: check the NAT from the rendezvous's second port too.
                        self.rendezvous_addr = Some(canonical(c.remote_address()));
                        self.send_reflect(now);
                    }
                    self.relay_connection = connection;
                }
                () = sleep_until_opt(pending) => self.expire_pending(Instant::now()),
                () = tokio::time::sleep_until(deadline.into()) => {
                    tracing::trace!(?reason, "timeout");
                }
            }
            // Whatever woke us, serve both directions: a busy TUN must not
            // starve the socket, nor the other way round.
            self.read_tun()?;
            self.read_udp()?;
            let now = Instant::now();
            if now >= deadline {
                self.node.handle_timeout(now);
            }
            self.flush().await;
        }
    }

    /// Reads the TUN: with offloads one read may be a TCP or UDP
    /// super-packet of up to 64 KiB, cut into MTU-sized segments in place
    /// ([`tso::split`]) and each handed to the engine.
    fn read_tun(&mut self) -> io::Result<()> {
        let now = Instant::now();
        let offload = self.tun.tcp_gso();
        let until = self.io.tun_read_packets + TUN_BUDGET;
        for _ in 0..BATCH {
            if self.io.tun_read_packets >= until {
                break;
            }
            let read = &mut self.tun_buffers.read;
            match self.tun.try_recv(read) {
                Ok(len) => {
                    self.io.tun_reads += 1;
                    let Some(read) = read.get_mut(..len) else {
                        continue;
                    };
                    let node = &mut self.node;
                    if !offload {
                        self.io.tun_read_packets += 1;
                        node.handle_tun_packet(read, now);
                        continue;
                    }
                    match tso::split(read, |packet| node.handle_tun_packet(packet, now)) {
                        Ok(n) => self.io.tun_read_packets += n as u64,
                        // A read the kernel should never produce: that packet
                        // is lost, the device is fine.
                        Err(e) => tracing::debug!(error = %e, "TUN read dropped"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn read_udp(&mut self) -> io::Result<()> {
        let now = Instant::now();
        let until = self.io.udp_received_datagrams + UDP_BUDGET;
        for _ in 0..BATCH {
            if self.io.udp_received_datagrams >= until {
                break;
            }
            match self.udp.try_recv_batch(&mut self.buf) {
                Ok(received) => {
                    // With UDP GRO one receive may hold several datagrams of
                    // one flow, `stride` bytes each.
                    self.io.udp_receives += 1;
                    let mut start = 0;
                    while start < received.len {
                        let end = received.len.min(start + received.stride.max(1));
                        self.io.udp_received_datagrams += 1;
                        self.udp_datagram(received.from, start..end, now);
                        start = end;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ICMP port unreachable from a peer that is down surfaces
                // here as ECONNREFUSED on Linux: not our socket's problem.
                Err(e) if is_transient(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends what the engine queued for the network: each run of
    /// equal-sized datagrams to one destination (a TCP stream's segments)
    /// as one GSO send, anything else one by one.
    async fn send_transmits(&mut self) {
        let mut batch = std::mem::take(&mut self.tx_batch);
        batch.extend(std::iter::from_fn(|| self.node.poll_transmit()));
        let mut start = 0;
        while start < batch.len() {
            let run = &batch[start..];
            let n = if self.udp.gso() {
                gso_run(run, |t| (t.dst, t.payload.len()))
            } else {
                1
            };
            let dst = run[0].dst;
            self.io.udp_sends += 1;
            self.io.udp_sent_datagrams += n as u64;
            let sent = if n > 1 {
                // On the stack: gso_run never makes a run longer than this.
                let mut segments = [IoSlice::new(&[]); MAX_GSO_SEGMENTS];
                for (slot, t) in segments.iter_mut().zip(&run[..n]) {
                    *slot = IoSlice::new(t.payload.as_slice());
                }
                let segment_len = u16::try_from(run[0].payload.len()).unwrap_or(u16::MAX);
                match send_segments(
                    &self.udp,
                    &segments[..n.min(MAX_GSO_SEGMENTS)],
                    segment_len,
                    dst,
                )
                .await
                {
                    Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                        // GSO just turned out unavailable: this run one by one.
                        self.io.udp_sends += n as u64 - 1;
                        let mut last = Ok(0);
                        for t in &run[..n] {
                            last = send_one(&self.udp, t.payload.as_slice(), t.dst).await;
                        }
                        last
                    }
                    other => other,
                }
            } else {
                send_one(&self.udp, run[0].payload.as_slice(), dst).await
            };
            if let Err(e) = sent {
                self.io.udp_send_errors += 1;
                if self.io.udp_send_errors.is_power_of_two() {
                    tracing::debug!(%dst, error = %e, count = self.io.udp_send_errors, "send failed");
                }
            }
            start += n;
        }
        for t in batch.drain(..) {
            self.node.recycle(t.payload);
        }
        self.tx_batch = batch;
    }

    /// Writes what the engine decrypted to the TUN. With offloads, the
    /// segments of one TCP stream are joined into super-packets first
    /// ([`Coalescer`]), so the kernel's stack sees a few big packets, not
    /// many small ones; the virtio header goes into each packet's headroom.
    /// A TUN write does not block (the device's send buffer is unbounded),
    /// so one that fails is a lost packet, counted and logged.
    fn write_tun(&mut self) {
        let offload = self.tun.tcp_gso();
        let gro = &mut self.tun_buffers.gro;
        let (tun, io) = (&self.tun, &mut self.io);
        let mut write = |bytes: &[u8]| {
            io.tun_writes += 1;
            if let Err(e) = tun.try_send(bytes) {
                io.tun_write_errors += 1;
                if io.tun_write_errors.is_power_of_two() {
                    tracing::debug!(error = %e, count = io.tun_write_errors, "TUN write failed");
                }
            }
        };
        while let Some(packet) = self.node.poll_tun() {
            io.tun_written_packets += 1;
            let (mut frame, start) = packet.into_framed();
            if offload {
                gro.push(&mut frame, start, &mut write);
            } else if let Some(bytes) = frame.get(start..) {
                write(bytes);
            }
            self.node.recycle_vec(frame);
        }
        gro.finish(&mut write);
    }

    /// One datagram of the receive buffer, demultiplexed by its first bytes.
    fn udp_datagram(&mut self, from: SocketAddr, range: std::ops::Range<usize>, now: Instant) {
        let Some(datagram) = self.buf.get(range) else {
            return;
        };
        match (classify(datagram), &self.inputs.quic) {
            (DatagramKind::Reflect, _) => {
                let answer = Reflect::parse(datagram);
                self.reflected(from, answer);
            }
            (DatagramKind::Quic, Some(_)) if !self.inputs.quic_source.admits(from) => {
                self.quic_foreign += 1
            }
            (DatagramKind::Quic, Some(quic)) => {
                let d = QuicDatagram {
                    from,
                    data: cut_from_chunk(&mut self.quic_chunk, &[datagram]),
                };
                if quic.try_send(d).is_err() {
                    self.quic_dropped += 1;
                }
            }
            _ => self.node.handle_datagram(from, datagram, now),
        }
    }

    async fn flush(&mut self) {
        self.send_transmits().await;
        while let Some(t) = self.node.poll_relay() {
            self.send_relayed(t.peer, t.payload.as_slice());
            self.node.recycle(t.payload);
        }
        self.write_tun();
        while let Some(event) = self.node.poll_event() {
            // Every event concerns one peer: its log lines carry the peer's
            // span (short key and name), so an operator can follow one peer.
            let _span = self.peer_span(event.peer()).entered();
            match event {
                Event::HandshakeCompleted { peer } => {
                    tracing::debug!(peer = %peer.short(), "handshake completed");
                }
                Event::EndpointChanged { peer, endpoint } => {
                    tracing::info!(peer = %peer.short(), %endpoint, "peer endpoint changed");
                }
                Event::SessionExpired { peer } => {
                    // Once per expiry (the node says so on the change only).
                    tracing::info!(
                        peer = %peer.short(),
                        "no WireGuard session: handshakes went unanswered for 90 s or none succeeded for 9 minutes; \
                         keys erased, the next packet for this peer starts a new handshake"
                    );
                }
                Event::PathChanged { peer, path } => {
                    let name = self.meta.get(&peer).map(|m| m.name.as_str()).unwrap_or("");
                    tracing::info!(peer = %peer.short(), %name, ?path, "path changed");
                }
                Event::PunchWanted { peer } => {
                    // Best effort: a full queue means requests are already pending.
                    if let Some(punch) = &self.inputs.punch {
                        let _ = punch.try_send(peer);
                    }
                }
                Event::SeenAt { peer, seen_at } => self.seen(Observer::Peer(peer), seen_at),
                Event::PingReply { peer, path, rtt } => self.ping_replied(peer, path, rtt),
            }
        }
    }

    /// A frame the rendezvous relayed to us: header naming the source peer.
    fn relayed(&mut self, frame: Bytes) {
        let Ok((header, payload)) = relay::parse(&frame) else {
            self.relay_dropped += 1;
            return;
        };
        match self.relay_ids.get(&header.node) {
            Some(&peer) => self.node.handle_relayed(peer, payload, Instant::now()),
            None => self.relay_dropped += 1,
        }
    }

    /// One WireGuard packet to `peer` through the relay: a datagram when it
    /// fits, else its own stream, so no packet is dropped for its size.
    fn send_relayed(&mut self, peer: PublicKey, packet: &[u8]) {
        let (Some(connection), Some(node)) = (&self.relay_connection, self.relay_id_of(&peer))
        else {
            self.relay_dropped += 1;
            return;
        };
        if packet.is_empty() || packet.len() > relay::MAX_PAYLOAD {
            self.relay_dropped += 1;
            return;
        }
        let mut header = [0u8; relay::HEADER_LEN];
        relay::encode_header(RelayKind::Packet, node, &mut header);
        let frame = cut_from_chunk(&mut self.relay_chunk, &[&header, packet]);
        if relay::fits_datagram(packet.len(), connection.max_datagram_size()) {
            match connection.send_datagram(frame.clone()) {
                Ok(()) => return,
                Err(quinn::SendDatagramError::TooLarge) => {}
                Err(_) => {
                    self.relay_dropped += 1;
                    return;
                }
            }
        }
        if !crate::relay::stream::send_on_stream(connection, &self.relay_streams, frame) {
            self.relay_dropped += 1;
        }
    }

    /// Records where `observer` sees us, and reports a change of our NAT
    /// mapping behaviour to the rendezvous session.
    fn seen(&mut self, observer: Observer, seen_at: SocketAddr) {
        let now = Instant::now();
        self.observer.observe(observer, seen_at, now);
        let mapping = self.nat_mapping(now);
        if let Some(nat) = &self.inputs.nat {
            nat.send_if_modified(|reported| {
                let changed = *reported != mapping;
                if changed {
                    tracing::info!(nat = mapping.describe(), "NAT mapping behaviour");
                    *reported = mapping;
                }
                changed
            });
        }
    }

    fn peer_span(&self, peer: &PublicKey) -> tracing::Span {
        let name = self.meta.get(peer).map_or("", |m| m.name.as_str());
        tracing::info_span!("peer", key = %peer.short(), %name)
    }

    fn nat_mapping(&self, now: Instant) -> NatMapping {
        self.observer.mapping(&self.info.underlay_ips, now)
    }

    fn relay_id_of(&self, peer: &PublicKey) -> Option<NodeId> {
        let ips = &self.meta.get(peer)?.overlay_ips;
        ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => NodeId::of_overlay(*v4),
            IpAddr::V6(_) => None,
        })
    }

    fn apply(&mut self, command: DriverCommand) {
        let now = Instant::now();
        match command {
            DriverCommand::ReplacePeers(peers) => {
                let keep: HashSet<PublicKey> = peers.iter().map(|p| p.spec.public_key).collect();
                let gone: Vec<PublicKey> = self
                    .node
                    .peers()
                    .map(|p| p.public_key)
                    .filter(|k| !keep.contains(k) && !self.static_peers.contains(k))
                    .collect();
                for key in gone {
                    self.remove_peer(key);
                }
                for peer in peers {
                    self.upsert_peer(peer, now);
                }
            }
            DriverCommand::UpsertPeer(peer) => self.upsert_peer(peer, now),
            DriverCommand::RemovePeer(key) => self.remove_peer(key),
            DriverCommand::Punch(key) => {
                if !self.node.punch(&key, now) {
                    tracing::debug!(peer = %key.short(), "punch request ignored: probed it moments ago");
                }
            }
            DriverCommand::SetInfo(info) => self.info = info,
            DriverCommand::SeenByRendezvous(addr) => self.seen(Observer::Rendezvous, addr),
        }
    }

    fn upsert_peer(&mut self, peer: MeshPeer, now: Instant) {
        let key = peer.spec.public_key;
        let added = self.node.peer_status(&key).is_none();
        match self.node.upsert_peer(peer.spec, now) {
            Ok(_) => {
                if added {
                    tracing::info!(peer = %key.short(), name = %peer.name, "peer joined");
                }
                let port = peer
                    .candidates
                    .iter()
                    .find(|(_, s)| *s == Source::Local)
                    .map(|(a, _)| a.port());
                self.node.set_candidates(&key, peer.candidates, now);
                let meta = PeerMeta {
                    name: peer.name,
                    overlay_ips: peer.overlay_ips,
                    nat: peer.nat,
                    port,
                };
                self.meta.insert(key, meta);
                if let Some(id) = self.relay_id_of(&key) {
                    self.relay_ids.insert(id, key);
                }
            }
            Err(e) => {
                tracing::warn!(peer = %key.short(), error = %e, "cannot add peer from the peer map")
            }
        }
    }

    fn remove_peer(&mut self, key: PublicKey) {
        if self.node.remove_peer(&key) {
            self.relay_ids.retain(|_, k| *k != key);
            let name = self.meta.remove(&key).map(|m| m.name).unwrap_or_default();
            tracing::info!(peer = %key.short(), %name, "peer left");
        }
    }
}

/// Relay streams in flight at once from this node.
const RELAY_STREAMS: usize = 64;

async fn send_one(udp: &UdpSocket, datagram: &[u8], dst: SocketAddr) -> io::Result<usize> {
    match udp.try_send_to(datagram, dst) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => udp.send_to(datagram, dst).await,
        r => r,
    }
}

/// A GSO send, waiting while the socket buffer is full.
async fn send_segments(
    udp: &UdpSocket,
    segments: &[IoSlice<'_>],
    segment_len: u16,
    dst: SocketAddr,
) -> io::Result<usize> {
    loop {
        match udp.try_send_segments(segments, segment_len, dst) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => udp.writable().await?,
            r => return r,
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

async fn recv_frame(frames: &mut Option<mpsc::Receiver<Bytes>>) -> Option<Bytes> {
    match frames {
        Some(frames) => frames.recv().await,
        None => std::future::pending().await,
    }
}

/// The relay connection after it changed (`None` inside: the session ended).
async fn relay_changed(
    connection: &mut Option<watch::Receiver<Option<quinn::Connection>>>,
) -> Option<Option<quinn::Connection>> {
    match connection {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(rx.borrow_and_update().clone()),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH)
    )
}
