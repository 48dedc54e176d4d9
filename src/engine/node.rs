//! [`Node`]: the sans-IO WireGuard mesh state machine of one meshd.
//!
//! Pure: no sockets, no clock, no randomness. Inputs are a TUN packet, a
//! datagram with its source, or a timeout, each with `now`; outputs are
//! queued [`Transmit`]s, TUN writes, [`Event`]s and the next deadline, in
//! the shape of quinn-proto:
//!
//! ```text
//!   handle_tun_packet ─┐                  ┌─ poll_transmit  → UDP
//!   handle_datagram  ──┼──▶  Node  ──────┼─ poll_tun       → TUN
//!   handle_timeout   ──┘                  ├─ poll_event     → logs, API
//!                                         └─ poll_timeout   → when to call handle_timeout
//! ```
//!
//! A driver hands it a whole batch of inputs per wakeup, then drains every
//! output and gives the buffers back with [`Node::recycle`]; in steady state
//! nothing is allocated per packet.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use ipnet::IpNet;
use strum::{EnumCount, EnumIter, IntoEnumIterator, IntoStaticStr};

use super::buf::{BufPool, PacketBuf, TUN_HEADROOM};
use super::icmp;
use super::paths::{self, CandidateStatus, Path, PathSet, PathStatus};
use super::peer::{
    Admitted, Decapsulated, Encapsulated, Gate, Peer, PeerCounters, Source, Ticked,
    MSG_HANDSHAKE_INIT,
};
use super::routing::AllowedIps;
use crate::identity::{PrivateKey, PublicKey};
use crate::wire::probe::{self, ProbeKey, ProbeKind, TxId, PROBE_LEN};
use crate::wire::{classify, DatagramKind};

/// boringtun's timers want a tick about every 250 ms (its own device's
/// figure); the WireGuard timers themselves are seconds long.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// The handshake rate limiter counts per second (WireGuard paper §5.3).
const RATE_LIMIT_RESET: Duration = Duration::from_secs(1);
/// WireGuard data overhead: type, index, counter (16) + Poly1305 tag (16).
const DATA_OVERHEAD: usize = 32;
/// A handshake initiation is the largest message a tick or encapsulation
/// may write; boringtun needs at least this much room.
const MIN_BUF: usize = 148;
/// Pool buffers hold an underlay-MTU-sized datagram plus the relay header to come.
const BUF_HEADROOM: usize = 80;
/// Free buffers kept for reuse; more than a few batches' worth is waste.
const POOL_KEEP: usize = 1024;
/// How often to ask an unreachable peer, through the rendezvous, to punch.
const PUNCH_INTERVAL: Duration = Duration::from_secs(10);
/// A punch request for a peer probed in full this recently is ignored: the
/// probes it asks for are already on their way, and a member replaying
/// punch requests must not turn each into a round of probes.
const PUNCH_COOLDOWN: Duration = Duration::from_secs(2);

/// Authenticated traffic within this long proves an endpoint: a peer map
/// entry does not override it. WireGuard's REJECT_AFTER_TIME.
const ENDPOINT_PROOF: Duration = Duration::from_secs(180);
/// boringtun keeps the peer slot in the top 24 bits of a session index.
const MAX_PEERS: usize = 1 << 24;

/// Static settings of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub private_key: PrivateKey,
    /// Overlay addresses of this node.
    pub addresses: Vec<IpNet>,
    pub mtu: u16,
}

/// A peer as configured: key, where to reach it, what it may send.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSpec {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    /// Seconds between keepalives; `None` when off.
    pub persistent_keepalive: Option<u16>,
}

/// A peer's slot in the node. Stable for the peer's lifetime; may be reused
/// after the peer is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerId(u32);

/// One datagram to send over UDP.
#[derive(Debug)]
pub struct Transmit {
    pub dst: SocketAddr,
    pub payload: PacketBuf,
}

/// One WireGuard datagram for the relay to carry to `peer`.
#[derive(Debug)]
pub struct RelayTransmit {
    pub peer: PublicKey,
    pub payload: PacketBuf,
}

/// Where a datagram came from, and so where its answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Udp(SocketAddr),
    /// Through the rendezvous relay, from or to this peer.
    Relay(PublicKey),
}

/// Everything the node emits, kept apart from the peers so a peer can be
/// borrowed while its output is queued.
struct Outputs {
    pool: BufPool,
    transmits: VecDeque<Transmit>,
    relay: VecDeque<RelayTransmit>,
    tun: VecDeque<PacketBuf>,
    events: VecDeque<Event>,
}

impl Outputs {
    fn send(&mut self, via: Via, buf: Vec<u8>, len: usize) {
        let payload = self.pool.finish(buf, len);
        self.send_packet(via, payload);
    }

    fn send_packet(&mut self, via: Via, payload: PacketBuf) {
        match via {
            Via::Udp(dst) => self.transmits.push_back(Transmit { dst, payload }),
            Via::Relay(peer) => self.relay.push_back(RelayTransmit { peer, payload }),
        }
    }

    /// Seals a probe from `sender` into a pooled buffer and queues it `via`.
    /// False only if a pool buffer could not hold a probe (it always can).
    fn send_probe(
        &mut self,
        key: &ProbeKey,
        kind: ProbeKind,
        tx: TxId,
        sender: &PublicKey,
        via: Via,
    ) -> bool {
        let mut buf = self.pool.take();
        let Some(out) = buf
            .get_mut(..PROBE_LEN)
            .and_then(|b| <&mut [u8; PROBE_LEN]>::try_from(b).ok())
        else {
            self.pool.give_back(buf);
            return false;
        };
        key.seal(kind, tx, sender, out);
        self.send(via, buf, PROBE_LEN);
        true
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A handshake message from `peer` was accepted: as initiator, its
    /// response arrived (the session is in use); as responder, its
    /// initiation was answered (the session is used once its data arrives).
    HandshakeCompleted { peer: PublicKey },
    /// An authenticated packet from `peer` came from a new address (roaming).
    EndpointChanged {
        peer: PublicKey,
        endpoint: SocketAddr,
    },
    /// The session with `peer` is gone and its keys erased: handshakes went
    /// unanswered for REKEY_ATTEMPT_TIME, or none succeeded for
    /// REJECT_AFTER_TIME × 3. Emitted once per expiry, not on every tick.
    SessionExpired { peer: PublicKey },
    /// Traffic to `peer` now takes `path`.
    PathChanged { peer: PublicKey, path: Path },
    /// No direct path to `peer` answers: ask it, through the rendezvous,
    /// to probe us at the same moment (hole punching).
    PunchWanted { peer: PublicKey },
    /// An authenticated pong from `peer` says it saw our socket at
    /// `seen_at`: an observation of our NAT's mapping (see [`super::nat`]).
    SeenAt {
        peer: PublicKey,
        seen_at: SocketAddr,
    },
    /// The answer to a [`Node::ping`]: which path it came back on, how fast.
    PingReply {
        peer: PublicKey,
        path: Path,
        rtt: Duration,
    },
}

impl Event {
    /// The peer the event is about.
    pub fn peer(&self) -> &PublicKey {
        match self {
            Event::HandshakeCompleted { peer }
            | Event::EndpointChanged { peer, .. }
            | Event::SessionExpired { peer }
            | Event::PathChanged { peer, .. }
            | Event::PunchWanted { peer }
            | Event::SeenAt { peer, .. }
            | Event::PingReply { peer, .. } => peer,
        }
    }
}

/// A [`Node::ping`] waiting for its pong.
#[derive(Debug, Clone, Copy)]
struct UserPing {
    tx: TxId,
    peer: PublicKey,
    /// Where it went: only an answer from there counts.
    via: Via,
    sent: Instant,
}

/// Unanswered user pings kept; the oldest is forgotten beyond this.
const MAX_USER_PINGS: usize = 64;

/// Why [`Node::poll_timeout`] wants to be woken, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutReason {
    PeerTimers,
    RateLimiterReset,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    #[error("peer {0} is already configured")]
    DuplicatePeer(PublicKey),
    #[error("peer {0} is this node's own key")]
    SelfPeer(PublicKey),
    #[error("too many peers (at most {MAX_PEERS})")]
    TooManyPeers,
}

/// Why a packet was dropped. Network input is never an error to the caller:
/// it is counted here and logged at trace.
///
/// The counters are an array of [`DropReason::COUNT`] indexed by the
/// variant, and [`NodeStats::drops`] lists [`DropReason::iter`]: both come
/// from the enum, so a new variant is counted and listed without more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumCount, EnumIter, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum DropReason {
    /// Not a WireGuard message (nor anything else this node speaks).
    #[strum(serialize = "not_wireguard")]
    NotWireGuard,
    /// Malformed WireGuard message (wrong length for its type).
    Malformed,
    /// MAC1 did not verify: not for our key.
    InvalidMac,
    /// A valid handshake from a key that is not a configured peer.
    UnknownPeer,
    /// A message naming a session index no peer has.
    UnknownIndex,
    /// Handshake failed (stale timestamp, wrong key, unexpected message).
    HandshakeFailed,
    /// Data for a session that does not exist (any more).
    NoSession,
    /// AEAD tag or counter check failed.
    DecryptFailed,
    /// A data counter seen before: a replay. boringtun checks the replay
    /// window before decrypting, so a forged packet reusing a seen counter
    /// lands here too, not in `DecryptFailed`.
    Replayed,
    /// The inner source is not in the sending peer's allowed IPs.
    SourceNotAllowed,
    /// A TUN packet for an address no peer owns.
    NoRoute,
    /// A TUN packet for a peer whose endpoint is not known yet.
    NoEndpoint,
    /// A packet larger than the node's buffers.
    Oversized,
    /// A handshake message from a source over its per-second share.
    HandshakeRateLimited,
    /// A TUN packet that is not IPv4/IPv6.
    MalformedInner,
    /// A probe that is malformed, from an unknown key, or fails its MAC.
    BadProbe,
    /// An authentic ping already seen, or older than the peer's recent ones.
    ReplayedProbe,
    /// A pong that answers no ping of ours to the address it came from.
    UnmatchedPong,
    /// A relayed packet that authenticated as another peer than the relay named.
    RelayMismatch,
}

impl DropReason {
    /// A stable name for metrics labels, the API and logs: the variant in
    /// snake_case.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    fn from_wireguard(e: &WireGuardError) -> Self {
        match e {
            WireGuardError::InvalidMac => DropReason::InvalidMac,
            WireGuardError::InvalidPacket | WireGuardError::IncorrectPacketLength => {
                DropReason::Malformed
            }
            WireGuardError::DuplicateCounter => DropReason::Replayed,
            WireGuardError::InvalidAeadTag | WireGuardError::InvalidCounter => {
                DropReason::DecryptFailed
            }
            WireGuardError::NoCurrentSession | WireGuardError::ConnectionExpired => {
                DropReason::NoSession
            }
            WireGuardError::WrongIndex => DropReason::UnknownIndex,
            WireGuardError::DestinationBufferTooSmall => DropReason::Oversized,
            WireGuardError::UnexpectedPacket
            | WireGuardError::WrongPacketType
            | WireGuardError::WrongKey
            | WireGuardError::InvalidTai64nTimestamp
            | WireGuardError::WrongTai64nTimestamp
            | WireGuardError::LockFailed
            | WireGuardError::UnderLoad => DropReason::HandshakeFailed,
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Node-wide counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStats {
    drops: [u64; DropReason::COUNT],
    /// Cookie replies sent because handshakes came in faster than the limit.
    pub cookie_replies_sent: u64,
    /// ICMP unreachable messages written to the TUN.
    pub icmp_unreachable_sent: u64,
}

impl NodeStats {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    pub fn dropped_total(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Every reason with its count, for metrics and the API.
    pub fn drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::iter().map(|r| (r, self.drops[r as usize]))
    }
}

/// A snapshot of one peer for the API and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
    /// Time since the last completed handshake; `None` if there was none.
    pub last_handshake: Option<Duration>,
    pub counters: PeerCounters,
    /// The path traffic takes now.
    pub path: PathStatus,
    /// Every candidate endpoint and what probing it found.
    pub candidates: Vec<CandidateStatus>,
}

pub struct Node {
    private_key: PrivateKey,
    public_key: PublicKey,
    gate: Gate,
    peers: Vec<Option<Peer>>,
    free_slots: Vec<u32>,
    by_key: HashMap<PublicKey, PeerId>,
    routes: AllowedIps<PeerId>,
    out: Outputs,
    /// Whether the relay can carry packets now (the rendezvous session is up).
    relay_available: bool,
    /// Probe transaction ids: unpredictable, so that no pong recorded
    /// earlier (before a restart, say) answers a ping of ours.
    rng: rand::rngs::StdRng,
    /// This node's clock against the Unix epoch: `now` at construction and
    /// the milliseconds since the epoch then. Pings carry the sum.
    epoch: (Instant, u64),
    /// The networks of this node's overlay addresses: never an endpoint.
    mesh_prefixes: Vec<IpNet>,
    /// `meshctl ping`s waiting for their pong.
    user_pings: Vec<UserPing>,
    next_tick: Instant,
    next_reset: Instant,
    /// The latest `now` handed in, for status snapshots.
    now: Instant,
    stats: NodeStats,
    cookie: [u8; 64],
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("public_key", &self.public_key)
            .field("peers", &self.by_key.len())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// A node at `now`, which is `unix_time` since the Unix epoch on the
    /// wall clock (pings carry it; see [`super::paths::PingWindow`]). `seed` feeds every
    /// random choice the node makes: probe ids and the per-source
    /// handshake buckets. The shell passes fresh OS randomness; a simulation
    /// passes its seed.
    pub fn new(config: NodeConfig, seed: [u8; 32], now: Instant, unix_time: Duration) -> Self {
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::from_seed(seed);
        let public_key = config.private_key.public_key();
        let buf_len = usize::from(config.mtu).max(1500) + DATA_OVERHEAD + BUF_HEADROOM;
        Self {
            gate: Gate::new(&config.private_key, (rng.gen(), rng.gen())),
            private_key: config.private_key,
            public_key,
            peers: Vec::new(),
            free_slots: Vec::new(),
            by_key: HashMap::new(),
            routes: AllowedIps::default(),
            out: Outputs {
                pool: BufPool::new(buf_len, POOL_KEEP),
                transmits: VecDeque::new(),
                relay: VecDeque::new(),
                tun: VecDeque::new(),
                events: VecDeque::new(),
            },
            relay_available: false,
            rng,
            epoch: (
                now,
                u64::try_from(unix_time.as_millis()).unwrap_or(u64::MAX),
            ),
            mesh_prefixes: config.addresses.iter().map(IpNet::trunc).collect(),
            user_pings: Vec::new(),
            now,
            next_tick: now + TIMER_TICK,
            next_reset: now + RATE_LIMIT_RESET,
            stats: NodeStats::default(),
            cookie: [0; 64],
        }
    }

    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// Adds a peer. With a known endpoint the handshake starts at once: a
    /// mesh node that restarts is reachable again without waiting for the
    /// other side's KEEPALIVE + REKEY_TIMEOUT (15 s) to notice.
    pub fn add_peer(&mut self, spec: PeerSpec, _now: Instant) -> Result<PeerId, EngineError> {
        if spec.public_key == self.public_key {
            return Err(EngineError::SelfPeer(spec.public_key));
        }
        if self.by_key.contains_key(&spec.public_key) {
            return Err(EngineError::DuplicatePeer(spec.public_key));
        }
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None if self.peers.len() < MAX_PEERS => {
                self.peers.push(None);
                (self.peers.len() - 1) as u32
            }
            None => return Err(EngineError::TooManyPeers),
        };
        let id = PeerId(slot);
        let mut peer = Peer::new(
            &self.private_key,
            spec.public_key,
            slot,
            spec.endpoint,
            spec.allowed_ips.clone(),
            spec.persistent_keepalive,
            self.gate.passthrough(),
        );
        for net in &spec.allowed_ips {
            // Config validation rejects overlaps; a later peer map may move a
            // prefix, and like `wg set` the newest owner wins.
            self.routes.insert(*net, id);
        }
        if let Some(endpoint) = spec.endpoint {
            let mut buf = self.out.pool.take();
            match peer.initiate(&mut buf) {
                Some(len) => send_to(&mut self.out, &mut peer, Via::Udp(endpoint), buf, len),
                None => self.out.pool.give_back(buf),
            }
        }
        tracing::debug!(peer = %spec.public_key.short(), slot, "peer added");
        self.by_key.insert(spec.public_key, id);
        self.peers[slot as usize] = Some(peer);
        self.forget_endpoints_in_the_mesh();
        Ok(id)
    }

    /// Adds `spec`, or updates the peer with its key without touching its
    /// session: allowed IPs are replaced, and the endpoint is replaced only
    /// when the current one is not proven by recent authenticated traffic
    /// (a path the peer itself uses beats what a map says).
    pub fn upsert_peer(&mut self, spec: PeerSpec, now: Instant) -> Result<PeerId, EngineError> {
        let Some(&id) = self.by_key.get(&spec.public_key) else {
            return self.add_peer(spec, now);
        };
        let Some(peer) = self.peers.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return self.add_peer(spec, now);
        };
        let moved = peer.allowed_ips != spec.allowed_ips;
        if moved {
            self.routes.remove_value(id);
            for net in &spec.allowed_ips {
                self.routes.insert(*net, id);
            }
            peer.allowed_ips = spec.allowed_ips;
        }
        let proven = peer
            .last_authenticated
            .is_some_and(|at| now.saturating_duration_since(at) < ENDPOINT_PROOF);
        if spec.endpoint.is_some() && spec.endpoint != peer.endpoint && !proven {
            tracing::debug!(peer = %peer.key.short(), endpoint = ?spec.endpoint, "endpoint from peer map");
            peer.endpoint = spec.endpoint;
        }
        if moved {
            self.forget_endpoints_in_the_mesh();
        }
        Ok(id)
    }

    /// More of the address space is the mesh's than this node's own
    /// addresses say (the mesh's prefixes, once the rendezvous told them):
    /// never an endpoint from now on.
    pub fn set_mesh_prefixes(&mut self, prefixes: &[IpNet]) {
        let mut changed = false;
        for net in prefixes.iter().map(IpNet::trunc) {
            if !self.mesh_prefixes.contains(&net) {
                self.mesh_prefixes.push(net);
                changed = true;
            }
        }
        if changed {
            self.forget_endpoints_in_the_mesh();
        }
    }

    /// Forgets, for every mesh peer, the candidates and the direct path that
    /// now lie inside the mesh ([`may_be_endpoint`]): a peer's prefix was
    /// added, or the mesh's prefixes became known. Static peers keep what
    /// their operator configured.
    fn forget_endpoints_in_the_mesh(&mut self) {
        let (prefixes, routes) = (&self.mesh_prefixes, &self.routes);
        for peer in self.peers.iter_mut().flatten() {
            let Some(paths) = peer.paths.as_mut() else {
                continue;
            };
            paths.forget_unless(|addr| may_be_endpoint(prefixes, routes, addr));
            if peer
                .endpoint
                .is_some_and(|e| !may_be_endpoint(prefixes, routes, e))
            {
                tracing::info!(peer = %peer.key.short(), endpoint = ?peer.endpoint, "endpoint lies inside the mesh now: forgotten");
                peer.endpoint = None;
            }
        }
    }

    /// Removes a peer, its routes and its sessions. Returns whether it existed.
    pub fn remove_peer(&mut self, key: &PublicKey) -> bool {
        let Some(id) = self.by_key.remove(key) else {
            return false;
        };
        self.routes.remove_value(id);
        self.peers[id.0 as usize] = None;
        self.free_slots.push(id.0);
        true
    }

    /// One packet read from the TUN: route, encrypt, queue for the network.
    pub fn handle_tun_packet(&mut self, packet: &[u8], _now: Instant) {
        let Some(dst) = inner_destination(packet) else {
            return self.drop_packet(DropReason::MalformedInner);
        };
        let Some(id) = self.routes.lookup(dst) else {
            return self.unreachable(packet, dst, DropReason::NoRoute);
        };
        let Some(peer) = self.peers.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return self.unreachable(packet, dst, DropReason::NoRoute);
        };
        let Some(via) = peer.route() else {
            return self.unreachable(packet, dst, DropReason::NoEndpoint);
        };
        if packet.len() + DATA_OVERHEAD > self.out.pool.buf_len() {
            return self.drop_packet(DropReason::Oversized);
        }
        let mut buf = self.out.pool.take();
        match peer.encapsulate(packet, &mut buf) {
            Encapsulated::Network(len) => send_to(&mut self.out, peer, via, buf, len),
            Encapsulated::Queued => self.out.pool.give_back(buf),
            Encapsulated::Error(e) => {
                self.out.pool.give_back(buf);
                self.drop_packet(DropReason::from_wireguard(&e));
            }
        }
    }

    /// One datagram from the network, with the address it came from.
    pub fn handle_datagram(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        match classify(datagram) {
            DatagramKind::WireGuard => self.receive(Via::Udp(from), datagram, now),
            DatagramKind::Probe => self.handle_probe(Via::Udp(from), datagram, now),
            DatagramKind::Quic | DatagramKind::Reflect | DatagramKind::Unknown => {
                self.drop_packet(DropReason::NotWireGuard)
            }
        }
    }

    /// One WireGuard datagram the relay carried from `peer` (as the
    /// rendezvous vouches; the WireGuard session is what authenticates it).
    pub fn handle_relayed(&mut self, peer: PublicKey, datagram: &[u8], now: Instant) {
        match classify(datagram) {
            DatagramKind::WireGuard => self.receive(Via::Relay(peer), datagram, now),
            DatagramKind::Probe => self.handle_probe(Via::Relay(peer), datagram, now),
            DatagramKind::Quic | DatagramKind::Reflect | DatagramKind::Unknown => {
                self.drop_packet(DropReason::NotWireGuard)
            }
        }
    }

    fn receive(&mut self, origin: Via, datagram: &[u8], now: Instant) {
        self.now = self.now.max(now);
        if datagram.len() + TUN_HEADROOM > self.out.pool.buf_len() {
            return self.drop_packet(DropReason::Oversized);
        }
        // Relayed handshakes share one cookie identity: the relay's; their
        // share of handshakes is counted per peer the relay vouches for.
        let (source_ip, source) = match origin {
            Via::Udp(from) => (from.ip(), Source::Addr(from.ip())),
            Via::Relay(peer) => (
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                Source::Relayed(peer),
            ),
        };
        let id = match self
            .gate
            .admit(source_ip, source, datagram, &mut self.cookie)
        {
            Admitted::FromKey(key) => match self.by_key.get(&key) {
                Some(id) => *id,
                None => return self.drop_packet(DropReason::UnknownPeer),
            },
            Admitted::ForSlot(slot) => PeerId(slot),
            Admitted::CookieReply(len) => {
                // Under load: prove the source address first (WireGuard
                // paper §5.4.7). The endpoint does not move for this.
                let mut buf = self.out.pool.take();
                buf[..len].copy_from_slice(&self.cookie[..len]);
                self.stats.cookie_replies_sent += 1;
                self.out.send(origin, buf, len);
                return;
            }
            Admitted::Throttled => return self.drop_packet(DropReason::HandshakeRateLimited),
            Admitted::Rejected(e) => return self.drop_packet(DropReason::from_wireguard(&e)),
        };
        let Some(peer) = self.peers.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return self.drop_packet(DropReason::UnknownIndex);
        };
        if matches!(origin, Via::Relay(claimed) if claimed != peer.key) {
            return count_drop(&mut self.stats, DropReason::RelayMismatch);
        }

        let mut buf = self.out.pool.take();
        // Decrypted packets land behind TUN_HEADROOM, where the driver can
        // put a TUN header without moving them.
        let Some(room) = buf.get_mut(TUN_HEADROOM..) else {
            self.out.pool.give_back(buf);
            return self.drop_packet(DropReason::Oversized);
        };
        let authenticated = match peer.decapsulate(source_ip, datagram, room) {
            Decapsulated::Tunnel { len, src } => {
                // Cryptokey routing, inbound half (WireGuard paper §2): the
                // inner source must be one this peer may use.
                if self.routes.lookup(src) != Some(id) {
                    self.out.pool.give_back(buf);
                    return count_drop(&mut self.stats, DropReason::SourceNotAllowed);
                }
                self.out
                    .tun
                    .push_back(self.out.pool.finish_at(buf, TUN_HEADROOM, len));
                true
            }
            Decapsulated::Network { len, authenticated } => {
                if authenticated {
                    peer.counters.handshakes += 1;
                    peer.expired = false;
                    peer.pings_seen.restart();
                    self.out
                        .events
                        .push_back(Event::HandshakeCompleted { peer: peer.key });
                }
                let reply = self.out.pool.finish_at(buf, TUN_HEADROOM, len);
                send_packet(&mut self.out, peer, origin, reply);
                authenticated
            }
            Decapsulated::Done { authenticated } => {
                self.out.pool.give_back(buf);
                authenticated
            }
            Decapsulated::Error(e) => {
                self.out.pool.give_back(buf);
                return count_drop(&mut self.stats, DropReason::from_wireguard(&e));
            }
        };
        if !authenticated {
            return;
        }
        peer.counters.rx_bytes += datagram.len() as u64;
        peer.counters.rx_packets += 1;
        peer.last_authenticated = Some(now);
        match (origin, &mut peer.paths) {
            // A peer with candidate paths: where it sent from is one more
            // candidate (peer-reflexive), proven by probes before use.
            (Via::Udp(from), Some(paths)) => {
                if may_be_endpoint(&self.mesh_prefixes, &self.routes, from) {
                    paths.learn(from, now);
                }
            }
            // Roaming (WireGuard paper §2.1): the endpoint follows the
            // source of authenticated packets only, never cookie replies or
            // garbage.
            (Via::Udp(from), None) => {
                if peer.endpoint != Some(from) {
                    tracing::debug!(peer = %peer.key.short(), %from, "endpoint changed");
                    peer.endpoint = Some(from);
                    self.out.events.push_back(Event::EndpointChanged {
                        peer: peer.key,
                        endpoint: from,
                    });
                }
            }
            (Via::Relay(_), _) => {}
        }
        // Just answered an initiation: our new session becomes usable only
        // once the initiator's first data (or keepalive) arrives on it. A
        // flush now would make boringtun start an initiation of its own,
        // overwriting the one the initiator may be answering: when both
        // sides start at once, that is a storm of crossing handshakes.
        if datagram.first() == Some(&MSG_HANDSHAKE_INIT) {
            return;
        }
        // Packets queued behind the handshake can go now.
        loop {
            let mut buf = self.out.pool.take();
            match peer.flush_queued(&mut buf) {
                Some(len) => send_to(&mut self.out, peer, origin, buf, len),
                None => {
                    self.out.pool.give_back(buf);
                    break;
                }
            }
        }
    }

    /// Runs the timers that are due: WireGuard's (keepalives, rekeys,
    /// handshake retries, expiry) and the rate limiter's reset.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = self.now.max(now);
        if now >= self.next_reset {
            self.gate.reset_count();
            self.next_reset = now + RATE_LIMIT_RESET;
        }
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TIMER_TICK;
        for slot in 0..self.peers.len() {
            let Some(mut peer) = self.peers[slot].take() else {
                continue;
            };
            let mut buf = self.out.pool.take();
            match peer.tick(&mut buf) {
                Ticked::Nothing => self.out.pool.give_back(buf),
                Ticked::Network(len) => match peer.route() {
                    Some(via) => send_to(&mut self.out, &mut peer, via, buf, len),
                    None => self.out.pool.give_back(buf),
                },
                Ticked::Expired => {
                    self.out.pool.give_back(buf);
                    // boringtun says so on every tick until a new handshake:
                    // the event is for the change of state only.
                    if !peer.expired {
                        peer.expired = true;
                        tracing::debug!(peer = %peer.key.short(), "session keys erased");
                        self.out
                            .events
                            .push_back(Event::SessionExpired { peer: peer.key });
                    }
                }
                Ticked::Error(e) => {
                    self.out.pool.give_back(buf);
                    tracing::trace!(peer = %peer.key.short(), error = ?e, "timer error");
                }
            }
            self.probe_peer(&mut peer, now, false);
            self.peers[slot] = Some(peer);
        }
    }

    /// The next datagram to send. Call after every `handle_*` until `None`;
    /// pass the payload back to [`Node::recycle`] once sent.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.transmits.pop_front()
    }

    /// The next packet to write to the TUN. Call after every `handle_*`
    /// until `None`; pass it back to [`Node::recycle`] once written.
    pub fn poll_tun(&mut self) -> Option<PacketBuf> {
        self.out.tun.pop_front()
    }

    /// The next event. Call after every `handle_*` until `None`.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.out.events.pop_front()
    }

    /// When [`Node::handle_timeout`] must be called next, and why. Changes
    /// only when a `handle_*` call ran, so call it after each batch.
    pub fn poll_timeout(&self) -> (Instant, TimeoutReason) {
        if self.next_reset < self.next_tick {
            (self.next_reset, TimeoutReason::RateLimiterReset)
        } else {
            (self.next_tick, TimeoutReason::PeerTimers)
        }
    }

    /// Returns an emitted buffer to the pool.
    #[inline]
    pub fn recycle(&mut self, buf: PacketBuf) {
        self.out.pool.recycle(buf);
    }

    /// Returns the buffer of a packet taken apart with
    /// [`PacketBuf::into_framed`] (and perhaps grown by coalescing).
    #[inline]
    pub fn recycle_vec(&mut self, buf: Vec<u8>) {
        self.out.pool.give_back(buf);
    }

    pub fn peer_status(&self, key: &PublicKey) -> Option<PeerStatus> {
        let id = self.by_key.get(key)?;
        self.peers
            .get(id.0 as usize)?
            .as_ref()
            .map(|p| status_of(p, self.now))
    }

    /// Every peer, in no particular order.
    pub fn peers(&self) -> impl Iterator<Item = PeerStatus> + '_ {
        self.peers.iter().flatten().map(|p| status_of(p, self.now))
    }

    /// Sends the probes that are due to `peer`, re-evaluates its path, and
    /// asks for a punch when nothing direct answers.
    fn probe_peer(&mut self, peer: &mut Peer, now: Instant, force: bool) {
        let (Some(paths), Some(key)) = (peer.paths.as_mut(), peer.probe_key.as_ref()) else {
            return;
        };
        if force {
            peer.last_forced = Some(now);
        }
        let rng = &mut self.rng;
        let pings = paths.due_pings(now, force, || rand::Rng::gen(rng));
        let ping = ProbeKind::Ping {
            sent_ms: Some(unix_ms(self.epoch, now)),
        };
        for (to, tx) in pings {
            self.out
                .send_probe(key, ping, tx, &self.public_key, Via::Udp(to));
        }
        if let Some(path) = paths.select(now) {
            tracing::debug!(peer = %peer.key.short(), ?path, "path changed");
            if let Path::Direct(addr) = path {
                peer.endpoint = Some(addr);
            }
            self.out.events.push_back(Event::PathChanged {
                peer: peer.key,
                path,
            });
        }
        let punch_due = peer
            .last_punch
            .is_none_or(|t| now.saturating_duration_since(t) >= PUNCH_INTERVAL);
        if !paths.has_live_direct(now) && punch_due {
            peer.last_punch = Some(now);
            self.out
                .events
                .push_back(Event::PunchWanted { peer: peer.key });
        }
    }

    /// A probe that arrived by `origin`: answer a ping, credit a pong.
    /// Through the relay, the rendezvous vouches for the sender, so a probe
    /// claiming another sender is dropped; such probes answer `meshctl ping`
    /// on a relayed path and teach nothing about addresses.
    fn handle_probe(&mut self, origin: Via, datagram: &[u8], now: Instant) {
        let Ok(claimed) = probe::peek(datagram) else {
            return self.drop_packet(DropReason::BadProbe);
        };
        if matches!(origin, Via::Relay(peer) if peer != claimed.sender) {
            return self.drop_packet(DropReason::BadProbe);
        }
        let Some(&id) = self.by_key.get(&claimed.sender) else {
            return self.drop_packet(DropReason::BadProbe);
        };
        let Some(mut peer) = self.peers.get_mut(id.0 as usize).and_then(Option::take) else {
            return self.drop_packet(DropReason::BadProbe);
        };
        match peer.probe_key.as_ref().map(|k| k.open(datagram)) {
            // A stale or repeated ping is a recording: neither answered nor
            // learnt from (proto/probe.md, "Replay").
            Some(Ok(probe)) => match probe.kind {
                ProbeKind::Ping { sent_ms } if !peer.pings_seen.accept(sent_ms, probe.tx) => {
                    count_drop(&mut self.stats, DropReason::ReplayedProbe);
                }
                ProbeKind::Ping { .. } => {
                    let observed = match origin {
                        Via::Udp(from) => {
                            // Unconfirmed until a ping of ours is answered from it.
                            if let Some(paths) = peer.paths.as_mut().filter(|_| {
                                may_be_endpoint(&self.mesh_prefixes, &self.routes, from)
                            }) {
                                paths.learn(from, now);
                            }
                            from
                        }
                        // Nothing was observed: the relay hides the source.
                        Via::Relay(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
                    };
                    if let Some(key) = peer.probe_key.as_ref() {
                        self.out.send_probe(
                            key,
                            ProbeKind::Pong { observed },
                            probe.tx,
                            &self.public_key,
                            origin,
                        );
                    }
                }
                ProbeKind::Pong { observed } => {
                    let user_ping = (self.user_pings.iter())
                        .position(|p| p.tx == probe.tx && p.peer == peer.key && p.via == origin);
                    if let Some(i) = user_ping {
                        let ping = self.user_pings.swap_remove(i);
                        let path = match origin {
                            Via::Udp(from) => Path::Direct(from),
                            Via::Relay(_) => Path::Relay,
                        };
                        let rtt = now.saturating_duration_since(ping.sent);
                        self.out.events.push_back(Event::PingReply {
                            peer: peer.key,
                            path,
                            rtt,
                        });
                    }
                    // Only from the address pinged: the relay proves no path.
                    let answered = match origin {
                        Via::Udp(from) => peer
                            .paths
                            .as_mut()
                            .is_some_and(|p| p.on_pong(probe.tx, from, now)),
                        Via::Relay(_) => false,
                    };
                    if answered {
                        self.out.events.push_back(Event::SeenAt {
                            peer: peer.key,
                            seen_at: observed,
                        });
                        // Re-evaluate at once: an upgrade should not wait a tick.
                        self.probe_peer(&mut peer, now, false);
                    } else if user_ping.is_none() {
                        count_drop(&mut self.stats, DropReason::UnmatchedPong);
                    }
                }
            },
            Some(Err(_)) | None => count_drop(&mut self.stats, DropReason::BadProbe),
        }
        self.peers[id.0 as usize] = Some(peer);
    }

    /// `meshctl ping`: one probe to `key` over the path its traffic takes
    /// now (direct or relayed), answered by [`Event::PingReply`], and a
    /// round of probes to every candidate, so that a better path is found
    /// (and reported by [`Event::PathChanged`]) while the user watches.
    /// Returns false for an unknown peer or one with nowhere to send.
    pub fn ping(&mut self, key: &PublicKey, now: Instant) -> bool {
        let Some(&id) = self.by_key.get(key) else {
            return false;
        };
        let Some(mut peer) = self.peers.get_mut(id.0 as usize).and_then(Option::take) else {
            return false;
        };
        let via = match peer.paths.as_ref().and_then(PathSet::current) {
            Some(Path::Direct(addr)) => Some(Via::Udp(addr)),
            Some(Path::Relay) => Some(Via::Relay(peer.key)),
            None => peer.endpoint.map(Via::Udp),
        };
        let sent = match (via, peer.probe_key.as_ref()) {
            (Some(via), Some(key)) => {
                let tx = rand::Rng::gen(&mut self.rng);
                let ping = ProbeKind::Ping {
                    sent_ms: Some(unix_ms(self.epoch, now)),
                };
                let sent = self.out.send_probe(key, ping, tx, &self.public_key, via);
                if sent {
                    if self.user_pings.len() >= MAX_USER_PINGS {
                        self.user_pings.remove(0);
                    }
                    self.user_pings.push(UserPing {
                        tx,
                        peer: peer.key,
                        via,
                        sent: now,
                    });
                }
                sent
            }
            _ => false,
        };
        self.probe_peer(&mut peer, now, true);
        self.peers[id.0 as usize] = Some(peer);
        sent
    }

    /// Gives a peer from the peer map its candidate endpoints; from now on
    /// probes choose its path (see [`super::paths`]).
    pub fn set_candidates(
        &mut self,
        key: &PublicKey,
        candidates: Vec<(SocketAddr, paths::Source)>,
        now: Instant,
    ) {
        let Some(&id) = self.by_key.get(key) else {
            return;
        };
        let Some(mut peer) = self.peers.get_mut(id.0 as usize).and_then(Option::take) else {
            return;
        };
        let candidates = candidates
            .into_iter()
            .filter(|(addr, _)| may_be_endpoint(&self.mesh_prefixes, &self.routes, *addr));
        let paths = peer.paths.get_or_insert_with(PathSet::new);
        paths.set_relay_available(self.relay_available);
        paths.set_candidates(candidates);
        self.probe_peer(&mut peer, now, false);
        self.peers[id.0 as usize] = Some(peer);
    }

    /// Whether the relay can carry packets (the rendezvous session is up).
    pub fn set_relay_available(&mut self, available: bool, now: Instant) {
        self.relay_available = available;
        for slot in 0..self.peers.len() {
            let Some(mut peer) = self.peers[slot].take() else {
                continue;
            };
            if let Some(paths) = peer.paths.as_mut() {
                paths.set_relay_available(available);
            }
            self.probe_peer(&mut peer, now, false);
            self.peers[slot] = Some(peer);
        }
    }

    /// The peer asked, through the rendezvous, that we probe it now.
    /// Ignored (returns false) when a full round went to it within
    /// [`PUNCH_COOLDOWN`]: those probes are already on their way.
    pub fn punch(&mut self, key: &PublicKey, now: Instant) -> bool {
        let Some(&id) = self.by_key.get(key) else {
            return false;
        };
        let Some(mut peer) = self.peers.get_mut(id.0 as usize).and_then(Option::take) else {
            return false;
        };
        let recent = peer
            .last_forced
            .is_some_and(|t| now.saturating_duration_since(t) < PUNCH_COOLDOWN);
        if !recent {
            self.probe_peer(&mut peer, now, true);
        }
        self.peers[id.0 as usize] = Some(peer);
        !recent
    }

    /// The next datagram for the relay. Call after every `handle_*` until
    /// `None`; pass the payload back to [`Node::recycle`] once sent.
    pub fn poll_relay(&mut self) -> Option<RelayTransmit> {
        self.out.relay.pop_front()
    }

    fn drop_packet(&mut self, reason: DropReason) {
        count_drop(&mut self.stats, reason);
    }

    /// Drops a TUN packet and tells the sender, as kernel WireGuard does.
    fn unreachable(&mut self, packet: &[u8], dst: IpAddr, reason: DropReason) {
        self.drop_packet(reason);
        if icmp::is_multicast_or_broadcast(dst) {
            return;
        }
        let mut buf = self.out.pool.take();
        match buf
            .get_mut(TUN_HEADROOM..)
            .and_then(|room| icmp::unreachable(packet, room))
        {
            Some(len) => {
                self.stats.icmp_unreachable_sent += 1;
                self.out
                    .tun
                    .push_back(self.out.pool.finish_at(buf, TUN_HEADROOM, len));
            }
            None => self.out.pool.give_back(buf),
        }
    }
}

/// Whether `addr` may be a peer's endpoint: a routable address
/// ([`super::paths::is_routable_endpoint`]) outside the mesh's own
/// prefixes, which only ever exist inside the tunnel.
/// Whether a mesh peer may be reached at `addr`: not an address nobody can
/// use, not in the mesh's overlay prefixes, and not one that cryptokey
/// routing sends into the tunnel (a peer's address, or a prefix behind a
/// peer such as its pod CIDR, whose bridge address the peer announces as
/// a local candidate): WireGuard packets to it would be carried by the
/// tunnel they are meant to carry.
fn may_be_endpoint(mesh_prefixes: &[IpNet], routes: &AllowedIps<PeerId>, addr: SocketAddr) -> bool {
    super::paths::is_routable_endpoint(addr)
        && !mesh_prefixes.iter().any(|net| net.contains(&addr.ip()))
        && routes.lookup(addr.ip()).is_none()
}

/// `now` on the wall clock, in milliseconds since the Unix epoch, from the
/// node's `epoch`: monotonic for the life of the node, whatever the system
/// clock does meanwhile.
fn unix_ms(epoch: (Instant, u64), now: Instant) -> u64 {
    let since =
        u64::try_from(now.saturating_duration_since(epoch.0).as_millis()).unwrap_or(u64::MAX);
    epoch.1.saturating_add(since)
}

fn count_drop(stats: &mut NodeStats, reason: DropReason) {
    tracing::trace!(%reason, "dropped packet");
    stats.drops[reason as usize] += 1;
}

/// Queues a WireGuard datagram to `peer` and counts it.
fn send_to(out: &mut Outputs, peer: &mut Peer, via: Via, buf: Vec<u8>, len: usize) {
    let payload = out.pool.finish(buf, len);
    send_packet(out, peer, via, payload);
}

/// Queues a finished WireGuard datagram to `peer` and counts it.
fn send_packet(out: &mut Outputs, peer: &mut Peer, via: Via, payload: PacketBuf) {
    peer.counters.tx_bytes += payload.len() as u64;
    peer.counters.tx_packets += 1;
    out.send_packet(via, payload);
}

fn status_of(peer: &Peer, now: Instant) -> PeerStatus {
    let path = match (&peer.paths, peer.endpoint) {
        (Some(paths), _) => paths.status(now),
        (None, Some(addr)) => PathStatus::Direct { addr, rtt: None },
        (None, None) => PathStatus::Unknown,
    };
    PeerStatus {
        path,
        public_key: peer.key,
        endpoint: peer.endpoint,
        allowed_ips: peer.allowed_ips.clone(),
        persistent_keepalive: peer.persistent_keepalive,
        last_handshake: peer.last_handshake(),
        counters: peer.counters,
        candidates: peer
            .paths
            .as_ref()
            .map(|p| p.candidates(now))
            .unwrap_or_default(),
    }
}

/// The destination of an inner IP packet, if it is one.
#[inline]
pub fn inner_destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let b: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        6 => {
            let b: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

// Keep the minimum buffer assumption checked at compile time.
const _: () = assert!(1500 + DATA_OVERHEAD + BUF_HEADROOM >= MIN_BUF);

#[cfg(test)]
mod tests {
    use super::*;

    /// The names before the counters came from the enum: metrics and the
    /// API show them, so they never change.
    const NAMES: [&str; 19] = [
        "not_wireguard",
        "malformed",
        "invalid_mac",
        "unknown_peer",
        "unknown_index",
        "handshake_failed",
        "no_session",
        "decrypt_failed",
        "replayed",
        "source_not_allowed",
        "no_route",
        "no_endpoint",
        "oversized",
        "handshake_rate_limited",
        "malformed_inner",
        "bad_probe",
        "replayed_probe",
        "unmatched_pong",
        "relay_mismatch",
    ];

    #[test]
    fn every_drop_reason_keeps_its_name_and_is_listed_once_in_declaration_order() {
        let names: Vec<&str> = DropReason::iter().map(DropReason::as_str).collect();
        assert_eq!(names, NAMES);
        assert_eq!(DropReason::COUNT, NAMES.len());
        for reason in DropReason::iter() {
            assert_eq!(reason.to_string(), reason.as_str());
        }
    }

    #[test]
    fn every_drop_reason_counts_in_a_slot_of_its_own() {
        let mut stats = NodeStats::default();
        for (n, reason) in DropReason::iter().enumerate() {
            for _ in 0..=n {
                count_drop(&mut stats, reason);
            }
        }
        for (n, (reason, count)) in stats.drops().enumerate() {
            assert_eq!(count, n as u64 + 1, "{reason}");
            assert_eq!(stats.dropped(reason), count);
        }
        let total: u64 = (1..=DropReason::COUNT as u64).sum();
        assert_eq!(stats.dropped_total(), total);
    }
}
