//! meshd's packet loop: TUN, UDP socket, relay frames, rendezvous updates
//! and API requests in, the node agent's outputs out.
//!
//! Does I/O, and decides nothing: the loop owns the [`Agent`] (and through
//! it the engine) outright, no lock. Each wakeup it drains a bounded batch
//! from the TUN and from the socket into the engine, hands everything else
//! to the agent's `handle_*`, runs due timers, then flushes every queued
//! transmit, relay frame, TUN write, NAT check, message for the
//! rendezvous, host change and API answer, and hands the buffers back to
//! the engine's pool. QUIC datagrams on the shared socket are passed to
//! quinn ([`super::quic`]) untouched.

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use super::quic::{QuicDatagram, SharedSocket};
use super::tun::Tun;
use super::udp::{canonical, gso_run, UdpSocket, MAX_GSO_SEGMENTS};
use crate::agent::{Agent, HostChange, RequestId, ShellStats, Update};
use crate::control::server::Ask;
use crate::control::{IoCounters, Response};
use crate::engine::Transmit;
use crate::offload::{gro::Coalescer, tso, VnetHeader};
use crate::sockets::QuicSource;
use crate::wire::control::NodeMessage;
use crate::wire::relay::{self, NodeId, RelayKind};
use crate::wire::{classify, DatagramKind};

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

/// The driver's inputs besides the TUN and the socket, and where its
/// outputs other than packets go.
pub struct Inputs {
    pub asks: mpsc::Receiver<Ask>,
    /// What the rendezvous says; `None` without a rendezvous.
    pub updates: Option<mpsc::Receiver<Update>>,
    /// Where QUIC datagrams go; `None` without a rendezvous.
    pub quic: Option<mpsc::Sender<QuicDatagram>>,
    /// quinn's view of the socket, for the sends it had refused; `None`
    /// without a rendezvous.
    pub quic_socket: Option<Arc<SharedSocket>>,
    /// The one source whose QUIC datagrams go there (the rendezvous).
    pub quic_source: Arc<QuicSource>,
    /// Messages for the rendezvous session (punch requests, NAT mapping);
    /// `None` without one.
    pub outbox: Option<mpsc::Sender<NodeMessage>>,
    /// The rendezvous connection while a session is up (for the relay);
    /// `None` without a rendezvous.
    pub relay_connection: Option<watch::Receiver<Option<quinn::Connection>>>,
    /// Frames relayed to us (header naming the source, then the packet).
    pub relay_frames: Option<mpsc::Receiver<Bytes>>,
    /// Changes for the host (mesh0's addresses, the cache), for the task
    /// that brought the node up ([`super::lifecycle`]).
    pub host: mpsc::UnboundedSender<HostChange>,
    /// The routes through mesh0, whenever the routing table changed
    /// ([`crate::netlink::RouteWatch`]); `None` without a watch.
    pub kernel_routes: Option<mpsc::Receiver<Vec<crate::netlink::KernelRoute>>>,
    /// What the port mapper knows, whenever it changes
    /// ([`super::portmap`]); `None` without one.
    pub port_mapping: Option<mpsc::Receiver<crate::control::PortMappingInfo>>,
}

/// Relayed frames queued for the driver before they are dropped.
pub const RELAY_INBOX: usize = 1024;
/// Messages queued for the rendezvous session before they are dropped.
pub const OUTBOX: usize = 64;

pub struct Driver {
    agent: Agent,
    tun: Tun,
    /// The virtio-net header in front of each TUN read and write.
    vnet_header: VnetHeader,
    udp: Arc<UdpSocket>,
    inputs: Inputs,
    /// API requests waiting for the agent's answer.
    replies: HashMap<RequestId, oneshot::Sender<Response>>,
    next_request: u64,
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
    /// Bounds oversized relay frames in flight on streams.
    relay_streams: Arc<Semaphore>,
    /// Relay frames the connection could not take.
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
    fn new(tun: &Tun, header: VnetHeader) -> Self {
        Self {
            read: vec![0; header.size() + usize::from(u16::MAX)],
            // UDP too where the device takes UDP super-packets.
            gro: Coalescer::new(tun.udp_gso(), header),
        }
    }
}

impl Driver {
    pub fn new(
        agent: Agent,
        tun: Tun,
        vnet_header: VnetHeader,
        udp: Arc<UdpSocket>,
        inputs: Inputs,
    ) -> Self {
        let tun_buffers = TunBuffers::new(&tun, vnet_header);
        Self {
            agent,
            tun,
            vnet_header,
            udp,
            inputs,
            replies: HashMap::new(),
            next_request: 0,
            buf: vec![0; RECV_BUF],
            io: IoCounters::default(),
            quic_dropped: 0,
            quic_foreign: 0,
            relay_connection: None,
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
        // Peers configured with a keepalive may already have handshakes
        // queued, and a cached peer map its host changes.
        self.flush(Instant::now()).await;
        loop {
            let (deadline, reason) = self.agent.poll_timeout();
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                r = self.tun.readable() => r?,
                r = self.udp.readable() => r?,
                Some(ask) = self.inputs.asks.recv() => self.answer(ask),
                Some(connection) = relay_changed(&mut self.inputs.relay_connection) => {
                    tracing::info!(available = connection.is_some(), max_datagram = ?connection.as_ref().and_then(|c| c.max_datagram_size()), "relay");
                    let now = Instant::now();
                    match &connection {
                        // A new session: the agent checks the NAT from the
                        // rendezvous's second port too.
                        Some(c) => self.agent.handle_session_up(canonical(c.remote_address()), Some(c.rtt()), now),
                        None => self.agent.handle_session_down(now),
                    }
                    self.relay_connection = connection;
                }
                Some(update) = recv_opt(&mut self.inputs.updates) => {
                    self.agent.handle_update(update, Instant::now());
                }
                Some(routes) = recv_opt(&mut self.inputs.kernel_routes) => {
                    self.agent.handle_kernel_routes(&routes, Instant::now());
                }
                Some(info) = recv_opt(&mut self.inputs.port_mapping) => {
                    self.agent.handle_port_mapping(info);
                }
                Some(frame) = recv_opt(&mut self.inputs.relay_frames) => {
                    let now = Instant::now();
                    self.agent.handle_relay_frame(&frame, now);
                    // The rest that is waiting, as one batch: one flush and
                    // coalesced TUN writes for all of them.
                    for _ in 1..UDP_BUDGET {
                        let Some(frame) = self.inputs.relay_frames.as_mut().and_then(|rx| rx.try_recv().ok()) else {
                            break;
                        };
                        self.agent.handle_relay_frame(&frame, now);
                    }
                }
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
                self.agent.handle_timeout(now);
            }
            self.flush(now).await;
        }
    }

    /// Hands an API request to the agent; its answer goes back in [`Driver::flush`].
    fn answer(&mut self, (request, reply): Ask) {
        let id = RequestId(self.next_request);
        self.next_request = self.next_request.wrapping_add(1);
        self.replies.insert(id, reply);
        let shell = ShellStats {
            io: IoCounters {
                quic_send_errors: self
                    .inputs
                    .quic_socket
                    .as_ref()
                    .map_or(0, |s| s.send_errors()),
                ..self.io
            },
            quic_not_rendezvous: self.quic_foreign,
            quic_queue_full: self.quic_dropped,
            rendezvous_rtt: self.relay_connection.as_ref().map(quinn::Connection::rtt),
        };
        self.agent.handle_api(id, request, &shell, Instant::now());
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
                    let node = self.agent.node_mut();
                    if !offload {
                        self.io.tun_read_packets += 1;
                        node.handle_tun_packet(read, now);
                        continue;
                    }
                    let header = self.vnet_header;
                    match tso::split(read, header, |packet| node.handle_tun_packet(packet, now)) {
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
        let node = self.agent.node_mut();
        batch.extend(std::iter::from_fn(|| node.poll_transmit()));
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
        let node = self.agent.node_mut();
        for t in batch.drain(..) {
            node.recycle(t.payload);
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
        let node = self.agent.node_mut();
        while let Some(packet) = node.poll_tun() {
            io.tun_written_packets += 1;
            let (mut frame, start) = packet.into_framed();
            if offload {
                gro.push(&mut frame, start, &mut write);
            } else if let Some(bytes) = frame.get(start..) {
                write(bytes);
            }
            node.recycle_vec(frame);
        }
        gro.finish(&mut write);
    }

    /// One datagram of the receive buffer, demultiplexed by its first bytes.
    fn udp_datagram(&mut self, from: SocketAddr, range: std::ops::Range<usize>, now: Instant) {
        let Some(datagram) = self.buf.get(range) else {
            return;
        };
        match (classify(datagram), &self.inputs.quic) {
            (DatagramKind::Reflect, _) => self.agent.handle_reflect_datagram(from, datagram, now),
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
            _ => self.agent.node_mut().handle_datagram(from, datagram, now),
        }
    }

    /// Everything the agent queued: the engine's events (which the agent
    /// acts on), transmits, relay frames, TUN writes, NAT checks, messages
    /// for the rendezvous, host changes and API answers.
    async fn flush(&mut self, now: Instant) {
        self.agent.handle_engine_events(now);
        // The agent logged them; nothing else here wants them.
        while self.agent.poll_event().is_some() {}
        self.send_transmits().await;
        while let Some(t) = self.agent.poll_relay() {
            self.send_relayed(t.to, t.payload.as_slice());
            self.agent.recycle(t.payload);
        }
        self.write_tun();
        while let Some(check) = self.agent.poll_nat_check() {
            if let Err(e) = self.udp.try_send_to(&check.payload, check.dst) {
                tracing::debug!(target = %check.dst, error = %e, "NAT check not sent");
            }
        }
        while let Some(message) = self.agent.poll_rendezvous_message() {
            // Best effort: a full queue means requests are already pending.
            if let Some(outbox) = &self.inputs.outbox {
                let _ = outbox.try_send(message);
            }
        }
        while let Some(change) = self.agent.poll_host_change() {
            let _ = self.inputs.host.send(change);
        }
        while let Some((id, response)) = self.agent.poll_api_answer() {
            // The client may have gone; nothing to do then.
            if let Some(reply) = self.replies.remove(&id) {
                let _ = reply.send(response);
            }
        }
    }

    /// One WireGuard packet to relay node `node`: a datagram when it fits,
    /// else its own stream, so no packet is dropped for its size.
    fn send_relayed(&mut self, node: NodeId, packet: &[u8]) {
        let Some(connection) = &self.relay_connection else {
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

/// The next item of a channel that may not exist (then never).
async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
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
