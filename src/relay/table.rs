//! The relay table: which node is on which connection, whether a relay frame
//! may be forwarded, where to, and what that cost.
//!
//! Pure: no socket, clock or channel. The quinn shell tells it which
//! connection each admitted node is on ([`RelayTable::connect`],
//! [`RelayTable::disconnect`], [`RelayTable::remove`]) and hands it every relay
//! frame a node sends — from a DATAGRAM frame or off a relay stream, the same
//! bytes either way — with the connection it arrived on and `now`
//! ([`RelayTable::handle_frame`]). Each frame gets exactly one [`Command`]
//! back: forward these bytes to that connection, or drop the frame (counted
//! by [`DropReason`]). Tests are "this input ⇒ this command".
//!
//! # Who may send what
//!
//! A frame is accepted only from a connection the shell has connected, i.e.
//! one the registry admitted and that is still the node's current one; the
//! node it belongs to is the frame's source, whatever the frame says. The
//! header a node writes names the destination only, and the forwarded frame
//! carries the source's id in its place, so no node can send as another.
//! The payload is passed on byte for byte: it is WireGuard, end-to-end
//! encrypted between the two nodes, and the rendezvous cannot read it.
//!
//! Checks, in order, each with its drop reason: the connection is admitted
//! ([`DropReason::NotAdmitted`]); the frame parses
//! ([`DropReason::Malformed`]); it is not addressed to its own sender
//! ([`DropReason::SelfAddressed`]); the destination is a registered node
//! ([`DropReason::UnknownDestination`]) that is connected now
//! ([`DropReason::DestinationOffline`]); the source is within its rate
//! limits ([`DropReason::RateLimited`]); the destination is within what it
//! may receive ([`DropReason::DestinationLimited`]). Only a frame that passes
//! everything spends rate-limit tokens, the source's and the destination's,
//! and counts towards its (source, destination) pair.
//!
//! # Rate limits and queues
//!
//! Every node has two token buckets for what it sends, bytes (of payload)
//! per second and packets per second ([`RelayLimits`]), each holding up to
//! `burst` worth of its rate. A frame is forwarded only if both buckets can
//! pay for it, so a node flooding the relay gets its rate and no more, while
//! every other node's frames draw on their own buckets and keep flowing.
//!
//! Every node also has two buckets for what it receives, at the
//! destination rates ([`RelayLimits::destination_bytes_per_sec`], by default
//! the same as a source's). Without them, several members each within their
//! own limit could aim their sum at one node, and the relay would deliver
//! n × the per-node rate to it. With them, everything relayed towards one
//! node is held to its destination rate ([`DropReason::DestinationLimited`]),
//! whoever sends it, and other destinations are not affected.
//!
//! So that one source flooding a node cannot take that node's whole budget
//! and starve the others that relay to it, the destination budget is shared
//! fairly: every source that sent towards a node in the last
//! [`SENDER_ACTIVE`] has a share of it, refilled at the destination's rates
//! divided by the number of such sources and holding that fraction of its
//! burst (never less than one largest payload). Shares only matter once the
//! destination's budget is under half full: above that a frame passes if
//! its source's budget and the destination's can pay, below it its source's
//! share must pay too; every forwarded frame spends from all three. So the
//! destination's whole rate is used (a lone source, or one whose co-senders
//! send little, gets all of it that they leave), while a flooder drains it
//! to half and then gets its share only, and every other source still finds
//! its own share of the lower half.
//!
//! Buckets belong to the node, not the connection: reconnecting does not
//! refill them.
//!
//! # Across servers
//!
//! In a mesh of several servers, a node connected to another server is
//! reached through the link to that server ([`RelayTable::connect_link`],
//! [`RelayTable::route`]). A frame for it passes the same checks and
//! budgets here, at the server its source is on, and leaves on the link as a
//! link frame: a relay header naming the destination, then the frame as a
//! destination would get it (its header naming the source). The server at
//! the other end takes the source from that inner header — servers of the
//! mesh vouch for their own nodes, and the link is authenticated — but only
//! for a registered node that is not connected to it (a link cannot speak
//! for a node of the server it reaches, [`DropReason::LinkSpoofed`]), and
//! delivers it within the destination's budget there.
//!
//! The table holds no packets, so it has no queue to bound. The queue in
//! front of it is the shell's, and every connection has its own bounded
//! share of it, so a flooder's frames, which its rate limit refuses only
//! here, cannot crowd out other nodes' frames on the way in
//! ([`DropReason::InboundFull`], see [`crate::relay::server`]). The bounded
//! per-destination queues are in the shell too, which executes each
//! [`Command::Forward`] at once: a frame that fits the destination's current
//! datagram size ([`crate::wire::relay::fits_datagram`]) goes into quinn's
//! datagram send buffer for that connection (`datagram_send_buffer_size`,
//! bounded; when it is full quinn discards the oldest datagrams, which is
//! right for tunnelled IP); a larger frame goes into a bounded queue in
//! front of that connection's relay stream, and when that queue is full the
//! shell drops the frame and reports it with
//! [`RelayTable::count_drop`]`(`[`DropReason::QueueFull`]`)`. The source's
//! rate limit bounds how much of any destination's queue one source can
//! fill, and the destination's bounds what all sources together can.
//!
//! # Counters
//!
//! [`RelayTable::pair_stats`] counts what was forwarded per (source,
//! destination), [`RelayTable::stats`] the totals and the drops by reason.
//! Pair counters only exist for registered nodes and go when a node is
//! removed, so they take memory for at most registered² pairs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use strum::{EnumCount, EnumIter, IntoEnumIterator, IntoStaticStr};

use super::ConnId;
use crate::wire::relay::{self, NodeId, HEADER_LEN, MAX_PAYLOAD};

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// How long a source counts among a destination's senders, sharing its
/// budget, after it last sent a frame towards it (forwarded or not).
pub const SENDER_ACTIVE: Duration = Duration::from_secs(1);

/// Per-node rate limits, set by the operator under `[relay]` in
/// `rendezvous.toml` ([`crate::rendezvous::setup`]). Valid by construction:
/// every rate and the burst are greater than zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    bytes_per_sec: u64,
    packets_per_sec: u64,
    /// What may be relayed towards one node, from all sources together.
    destination_bytes_per_sec: u64,
    destination_packets_per_sec: u64,
    burst: Duration,
}

impl RelayLimits {
    /// 100 MB/s (≈ 0.8 Gbit/s) per node: a relayed TCP stream can carry
    /// more on a fast machine (benches/netns.sh: ≈ 1.5 Gbit/s with the limit
    /// raised), but a relay on a shared VPS link should not give one node
    /// more; `[relay] bytes-per-second` in rendezvous.toml raises it.
    pub const DEFAULT_BYTES_PER_SEC: u64 = 100_000_000;
    /// 100 000 packets/s: 100 MB/s of 1 000-byte packets.
    pub const DEFAULT_PACKETS_PER_SEC: u64 = 100_000;
    /// A bucket holds this long's worth of its rate.
    pub const DEFAULT_BURST: Duration = Duration::from_millis(100);

    /// Limits with the destination rates equal to the source rates.
    pub fn new(
        bytes_per_sec: u64,
        packets_per_sec: u64,
        burst: Duration,
    ) -> Result<Self, LimitsError> {
        if bytes_per_sec == 0 {
            return Err(LimitsError::Zero {
                what: "bytes per second",
            });
        }
        if packets_per_sec == 0 {
            return Err(LimitsError::Zero {
                what: "packets per second",
            });
        }
        if burst.is_zero() {
            return Err(LimitsError::Zero { what: "burst" });
        }
        Ok(Self {
            bytes_per_sec,
            packets_per_sec,
            destination_bytes_per_sec: bytes_per_sec,
            destination_packets_per_sec: packets_per_sec,
            burst,
        })
    }

    /// These limits with other rates towards one node (from all sources
    /// together) than from one node.
    pub fn with_destination(
        self,
        bytes_per_sec: u64,
        packets_per_sec: u64,
    ) -> Result<Self, LimitsError> {
        if bytes_per_sec == 0 {
            return Err(LimitsError::Zero {
                what: "destination bytes per second",
            });
        }
        if packets_per_sec == 0 {
            return Err(LimitsError::Zero {
                what: "destination packets per second",
            });
        }
        Ok(Self {
            destination_bytes_per_sec: bytes_per_sec,
            destination_packets_per_sec: packets_per_sec,
            ..self
        })
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    pub fn packets_per_sec(&self) -> u64 {
        self.packets_per_sec
    }

    /// Payload bytes per second relayed towards one node, all sources together.
    pub fn destination_bytes_per_sec(&self) -> u64 {
        self.destination_bytes_per_sec
    }

    /// Packets per second relayed towards one node, all sources together.
    pub fn destination_packets_per_sec(&self) -> u64 {
        self.destination_packets_per_sec
    }

    pub fn burst(&self) -> Duration {
        self.burst
    }

    /// What one node may send.
    fn source_budget(&self) -> Budget {
        Budget::full(self.bytes_per_sec, self.packets_per_sec, self.burst)
    }

    /// What may be sent to one node.
    fn destination_budget(&self) -> Budget {
        Budget::full(
            self.destination_bytes_per_sec,
            self.destination_packets_per_sec,
            self.burst,
        )
    }
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            bytes_per_sec: Self::DEFAULT_BYTES_PER_SEC,
            packets_per_sec: Self::DEFAULT_PACKETS_PER_SEC,
            destination_bytes_per_sec: Self::DEFAULT_BYTES_PER_SEC,
            destination_packets_per_sec: Self::DEFAULT_PACKETS_PER_SEC,
            burst: Self::DEFAULT_BURST,
        }
    }
}

fn burst_of(rate: u64, burst: Duration) -> u64 {
    let tokens = u128::from(rate).saturating_mul(burst.as_nanos()) / NANOS_PER_SEC;
    u64::try_from(tokens).unwrap_or(u64::MAX)
}

/// Relay limits that would stop all relaying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    #[error("relay limit {what} is zero, which would stop all relaying; set it above zero")]
    Zero { what: &'static str },
}

/// What the shell does with one relay frame.
#[derive(Clone, PartialEq, Eq)]
pub enum Command {
    /// Send `frame` to connection `to`: as a DATAGRAM if it fits that
    /// connection's datagram size, else as a stream frame. Its header names
    /// the source node.
    Forward { to: ConnId, frame: Bytes },
    /// Nothing to send; already counted under `reason`. Worth a trace line.
    Drop { reason: DropReason },
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Forward { to, frame } => {
                write!(f, "Forward {{ to: {to}, frame: {} bytes }}", frame.len())
            }
            Command::Drop { reason } => write!(f, "Drop {{ reason: {reason} }}"),
        }
    }
}

/// Why a relay frame was not forwarded. The counters are an array of
/// [`DropReason::COUNT`] indexed by the variant, listed by
/// [`DropReason::iter`]: both come from the enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EnumCount, EnumIter, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum DropReason {
    /// From a connection that is not (or no longer) an admitted node's.
    NotAdmitted,
    /// Not a relay frame this version reads.
    Malformed,
    /// Addressed to its own sender.
    SelfAddressed,
    /// Names a node id the registry never assigned (or that was removed).
    UnknownDestination,
    /// The destination is registered but not connected.
    DestinationOffline,
    /// The source is over its bytes or packets rate.
    RateLimited,
    /// The destination is over what may be relayed to it per second, from
    /// all sources together.
    DestinationLimited,
    /// The shell's queue towards the destination was full (counted by the
    /// shell through [`RelayTable::count_drop`]).
    QueueFull,
    /// The source's share of the shell's queue into the table was full: it
    /// sends faster than the relay forwards (counted by the shell through
    /// [`RelayTable::count_drops`]).
    InboundFull,
    /// From a link to another server, naming as its source a node that is
    /// not that server's to speak for (unknown, or connected here).
    LinkSpoofed,
}

impl DropReason {
    /// A stable name for metrics labels and logs: the variant in snake_case.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Traffic forwarded: packets, and bytes of payload (headers not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PairStats {
    pub packets: u64,
    pub bytes: u64,
}

impl PairStats {
    fn add(&mut self, payload_len: usize) {
        self.packets += 1;
        self.bytes += payload_len as u64;
    }
}

/// Relay-wide counters since the table was made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStats {
    drops: [u64; DropReason::COUNT],
    /// Everything forwarded, including pairs whose nodes were removed since.
    pub forwarded: PairStats,
}

impl RelayStats {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    pub fn dropped_total(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Every reason with its count, for metrics.
    pub fn drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::iter().map(|r| (r, self.drops[r as usize]))
    }
}

/// A token bucket in nano-tokens, so that refilling by elapsed nanoseconds
/// times a per-second rate is exact integer arithmetic.
#[derive(Debug, Clone)]
struct TokenBucket {
    rate_per_sec: u64,
    capacity_nanos: u128,
    nanos: u128,
    /// `None` until first used: the bucket starts full.
    last: Option<Instant>,
}

impl TokenBucket {
    fn full(rate_per_sec: u64, capacity: u64) -> Self {
        let capacity_nanos = u128::from(capacity) * NANOS_PER_SEC;
        Self {
            rate_per_sec,
            capacity_nanos,
            nanos: capacity_nanos,
            last: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        match self.last {
            // A clock that steps back refills nothing and keeps the later mark.
            Some(last) if now <= last => {}
            Some(last) => {
                let added = (now - last)
                    .as_nanos()
                    .saturating_mul(u128::from(self.rate_per_sec));
                self.nanos = self.nanos.saturating_add(added).min(self.capacity_nanos);
                self.last = Some(now);
            }
            None => self.last = Some(now),
        }
    }

    fn can_take(&self, tokens: u64) -> bool {
        self.nanos >= u128::from(tokens) * NANOS_PER_SEC
    }

    fn take(&mut self, tokens: u64) {
        self.nanos = self
            .nanos
            .saturating_sub(u128::from(tokens) * NANOS_PER_SEC);
    }
}

/// A bytes bucket and a packets bucket: a frame passes only if both can pay.
#[derive(Debug, Clone)]
struct Budget {
    bytes: TokenBucket,
    packets: TokenBucket,
}

impl Budget {
    /// A byte bucket never holds less than one largest payload, or a large
    /// packet could never pass.
    fn full(bytes_per_sec: u64, packets_per_sec: u64, burst: Duration) -> Self {
        Self {
            bytes: TokenBucket::full(
                bytes_per_sec,
                burst_of(bytes_per_sec, burst).max(MAX_PAYLOAD as u64),
            ),
            packets: TokenBucket::full(packets_per_sec, burst_of(packets_per_sec, burst).max(1)),
        }
    }

    /// Refills to `now`; whether one payload of `len` bytes can be paid for.
    fn can_pay(&mut self, len: u64, now: Instant) -> bool {
        self.bytes.refill(now);
        self.packets.refill(now);
        self.bytes.can_take(len) && self.packets.can_take(1)
    }

    fn pay(&mut self, len: u64) {
        self.bytes.take(len);
        self.packets.take(1);
    }
}

/// One source's share of a destination's budget (see the module docs), in
/// nano-tokens as [`TokenBucket`].
#[derive(Debug, Clone)]
struct Share {
    source: NodeId,
    bytes_nanos: u128,
    packets_nanos: u128,
    /// When the source last sent towards the destination, and the share
    /// was last refilled.
    last: Instant,
}

/// A registered node.
#[derive(Debug, Clone)]
struct NodeState {
    /// Its current connection, while it is online here.
    conn: Option<ConnId>,
    /// The link to the server it is connected to, while it is online there.
    via: Option<ConnId>,
    /// What it may send through the relay.
    sent: Budget,
    /// What may be relayed to it, from all sources together.
    received: Budget,
    /// The sources that sent towards it in the last [`SENDER_ACTIVE`], each
    /// with its share of `received`. At most one per registered node.
    senders: Vec<Share>,
}

impl NodeState {
    fn new(limits: &RelayLimits) -> Self {
        Self {
            conn: None,
            via: None,
            sent: limits.source_budget(),
            received: limits.destination_budget(),
            senders: Vec::new(),
        }
    }

    /// Refills this node's budget and `source`'s share of it to `now`
    /// (forgetting sources quiet for [`SENDER_ACTIVE`]); the share's index if
    /// both can pay for a payload of `len` bytes.
    fn can_receive(
        &mut self,
        limits: &RelayLimits,
        source: NodeId,
        len: u64,
        now: Instant,
    ) -> Option<usize> {
        // A clock that steps back keeps everyone (saturating: zero elapsed).
        self.senders.retain(|s| {
            s.source == source || now.saturating_duration_since(s.last) <= SENDER_ACTIVE
        });
        let index = match self.senders.iter().position(|s| s.source == source) {
            Some(index) => index,
            None => {
                // A newcomer starts with a full share, so it gets through as
                // soon as the destination's budget has room.
                self.senders.push(Share {
                    source,
                    bytes_nanos: u128::MAX,
                    packets_nanos: u128::MAX,
                    last: now,
                });
                self.senders.len() - 1
            }
        };
        let senders = self.senders.len() as u128;
        let bytes_rate = u128::from(limits.destination_bytes_per_sec) / senders;
        let packets_rate = u128::from(limits.destination_packets_per_sec) / senders;
        let bytes_cap =
            (self.received.bytes.capacity_nanos / senders).max(MAX_PAYLOAD as u128 * NANOS_PER_SEC);
        let packets_cap = (self.received.packets.capacity_nanos / senders).max(NANOS_PER_SEC);
        let can_pay = self.received.can_pay(len, now);
        let uncontended = self.received.bytes.nanos >= self.received.bytes.capacity_nanos / 2
            && self.received.packets.nanos >= self.received.packets.capacity_nanos / 2;
        let share = self.senders.get_mut(index)?;
        if now > share.last {
            let elapsed = (now - share.last).as_nanos();
            share.bytes_nanos = share
                .bytes_nanos
                .saturating_add(elapsed.saturating_mul(bytes_rate));
            share.packets_nanos = share
                .packets_nanos
                .saturating_add(elapsed.saturating_mul(packets_rate));
            share.last = now;
        }
        share.bytes_nanos = share.bytes_nanos.min(bytes_cap);
        share.packets_nanos = share.packets_nanos.min(packets_cap);
        let share_can_pay = share.bytes_nanos >= u128::from(len) * NANOS_PER_SEC
            && share.packets_nanos >= NANOS_PER_SEC;
        (can_pay && (uncontended || share_can_pay)).then_some(index)
    }

    /// Spends what [`Self::can_receive`] found room for.
    fn receive(&mut self, share: usize, len: u64) {
        self.received.pay(len);
        if let Some(share) = self.senders.get_mut(share) {
            share.bytes_nanos = share
                .bytes_nanos
                .saturating_sub(u128::from(len) * NANOS_PER_SEC);
            share.packets_nanos = share.packets_nanos.saturating_sub(NANOS_PER_SEC);
        }
    }
}

/// The relay state machine. See the module docs.
#[derive(Debug)]
pub struct RelayTable {
    limits: RelayLimits,
    nodes: HashMap<NodeId, NodeState>,
    /// Admitted connections and whose they are; each is its node's `conn`.
    conns: HashMap<ConnId, NodeId>,
    /// Links to the mesh's other servers.
    links: HashSet<ConnId>,
    pairs: BTreeMap<(NodeId, NodeId), PairStats>,
    stats: RelayStats,
}

impl RelayTable {
    /// An empty table: no node registered or online.
    pub fn new(limits: RelayLimits) -> Self {
        Self {
            limits,
            nodes: HashMap::new(),
            conns: HashMap::new(),
            links: HashSet::new(),
            pairs: BTreeMap::new(),
            stats: RelayStats::default(),
        }
    }

    pub fn limits(&self) -> &RelayLimits {
        &self.limits
    }

    /// A node the registry knows, online or not: frames to it while it is
    /// offline count as [`DropReason::DestinationOffline`], not unknown. The
    /// shell registers every node of the registry's state at start-up and
    /// each node it admits later. Registering again changes nothing.
    pub fn register(&mut self, node: NodeId) {
        let limits = self.limits;
        self.nodes
            .entry(node)
            .or_insert_with(|| NodeState::new(&limits));
    }

    /// `node` was admitted on `conn` (registering it if need be). A previous
    /// connection of the node stops being able to relay, as the registry
    /// supersedes it; a node `conn` was previously connected as goes offline.
    pub fn connect(&mut self, node: NodeId, conn: ConnId) {
        if let Some(previous) = self.conns.insert(conn, node) {
            if previous != node {
                if let Some(state) = self.nodes.get_mut(&previous) {
                    state.conn = None;
                }
            }
        }
        self.register(node);
        if let Some(state) = self.nodes.get_mut(&node) {
            if let Some(old) = state.conn.replace(conn) {
                if old != conn {
                    tracing::debug!(%node, %old, new = %conn, "relay connection superseded");
                    self.conns.remove(&old);
                }
            }
        }
    }

    /// `conn` is a link to another server of the mesh: frames from it are
    /// link frames, and [`RelayTable::route`] sends nodes' frames to it.
    pub fn connect_link(&mut self, conn: ConnId) {
        self.links.insert(conn);
    }

    /// `node` is connected to another server, reached over `link` (`None`:
    /// to no server this one has a link to, or to none). A node connected
    /// here is reached here whatever this says.
    pub fn route(&mut self, node: NodeId, link: Option<ConnId>) {
        self.register(node);
        if let Some(state) = self.nodes.get_mut(&node) {
            state.via = link.filter(|l| self.links.contains(l));
        }
    }

    /// `conn` closed. Its node goes offline unless it has a newer
    /// connection; a link's nodes are unreachable until routed again.
    pub fn disconnect(&mut self, conn: ConnId) {
        if self.links.remove(&conn) {
            for state in self.nodes.values_mut() {
                if state.via == Some(conn) {
                    state.via = None;
                }
            }
            return;
        }
        let Some(node) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(state) = self.nodes.get_mut(&node) {
            if state.conn == Some(conn) {
                state.conn = None;
            }
        }
    }

    /// An operator removed `node`: it is unknown from now on, its connection
    /// can no longer relay, and its pair counters are gone.
    pub fn remove(&mut self, node: NodeId) {
        if let Some(state) = self.nodes.remove(&node) {
            if let Some(conn) = state.conn {
                self.conns.remove(&conn);
            }
        }
        for state in self.nodes.values_mut() {
            state.senders.retain(|share| share.source != node);
        }
        self.pairs
            .retain(|(src, dst), _| *src != node && *dst != node);
    }

    /// The node admitted on `conn`, if any.
    pub fn node_of(&self, conn: ConnId) -> Option<NodeId> {
        self.conns.get(&conn).copied()
    }

    /// The connection `node` is online on, if any.
    pub fn conn_of(&self, node: NodeId) -> Option<ConnId> {
        self.nodes.get(&node).and_then(|state| state.conn)
    }

    /// One relay frame from connection `from`, out of a DATAGRAM frame or a
    /// relay stream (a stream frame's body, without its length prefix).
    /// Returns what to do with it; a drop is already counted.
    pub fn handle_frame(&mut self, from: ConnId, frame: Bytes, now: Instant) -> Command {
        if self.links.contains(&from) {
            return self.handle_link_frame(from, frame, now);
        }
        let Some(&source) = self.conns.get(&from) else {
            return self.drop_frame(from, DropReason::NotAdmitted);
        };
        let (header, payload_len) = match relay::parse(&frame) {
            Ok((header, payload)) => (header, payload.len()),
            Err(error) => {
                tracing::trace!(%from, %source, %error, "malformed relay frame");
                return self.drop_frame(from, DropReason::Malformed);
            }
        };
        let destination = header.node;
        if destination == source {
            return self.drop_frame(from, DropReason::SelfAddressed);
        }
        let (to, remote) = match self.nodes.get(&destination) {
            None => return self.drop_frame(from, DropReason::UnknownDestination),
            Some(NodeState { conn: Some(to), .. }) => (*to, false),
            Some(NodeState {
                via: Some(link), ..
            }) => (*link, true),
            Some(NodeState { conn: None, .. }) => {
                return self.drop_frame(from, DropReason::DestinationOffline);
            }
        };
        // Both budgets must be able to pay before either does, so a frame
        // one of them refuses costs the other nothing.
        let len = payload_len as u64;
        let Some(sender) = self.nodes.get_mut(&source) else {
            // `conns` only names registered nodes; stay safe if that ever breaks.
            return self.drop_frame(from, DropReason::NotAdmitted);
        };
        if !sender.sent.can_pay(len, now) {
            return self.drop_frame(from, DropReason::RateLimited);
        }
        let limits = self.limits;
        let Some(receiver) = self.nodes.get_mut(&destination) else {
            return self.drop_frame(from, DropReason::UnknownDestination);
        };
        let Some(share) = receiver.can_receive(&limits, source, len, now) else {
            return self.drop_frame(from, DropReason::DestinationLimited);
        };
        receiver.receive(share, len);
        if let Some(sender) = self.nodes.get_mut(&source) {
            sender.sent.pay(len);
        }
        self.pairs
            .entry((source, destination))
            .or_default()
            .add(payload_len);
        self.stats.forwarded.add(payload_len);
        tracing::trace!(%source, %destination, %to, remote, len = payload_len, "relay frame forwarded");
        let frame = with_source(frame, header.kind, source);
        let frame = if remote {
            link_frame(header.kind, destination, &frame)
        } else {
            frame
        };
        Command::Forward { to, frame }
    }

    /// A link frame from another server (see the module docs): delivered
    /// to its destination here, if the source is one that server may speak
    /// for and the destination's budget here can pay.
    fn handle_link_frame(&mut self, from: ConnId, frame: Bytes, now: Instant) -> Command {
        let Ok((outer, inner)) = relay::parse(&frame) else {
            return self.drop_frame(from, DropReason::Malformed);
        };
        let Ok((header, payload)) = relay::parse(inner) else {
            return self.drop_frame(from, DropReason::Malformed);
        };
        let (destination, source, len) = (outer.node, header.node, payload.len());
        match self.nodes.get(&source) {
            Some(NodeState { conn: None, .. }) => {}
            _ => return self.drop_frame(from, DropReason::LinkSpoofed),
        }
        let to = match self.nodes.get(&destination) {
            None => return self.drop_frame(from, DropReason::UnknownDestination),
            Some(NodeState { conn: Some(to), .. }) => *to,
            Some(NodeState { conn: None, .. }) => {
                return self.drop_frame(from, DropReason::DestinationOffline);
            }
        };
        let limits = self.limits;
        let Some(receiver) = self.nodes.get_mut(&destination) else {
            return self.drop_frame(from, DropReason::UnknownDestination);
        };
        let Some(share) = receiver.can_receive(&limits, source, len as u64, now) else {
            return self.drop_frame(from, DropReason::DestinationLimited);
        };
        receiver.receive(share, len as u64);
        self.pairs
            .entry((source, destination))
            .or_default()
            .add(len);
        self.stats.forwarded.add(len);
        let inner = frame.slice(HEADER_LEN..);
        Command::Forward { to, frame: inner }
    }

    /// Counts a frame the shell dropped after the table forwarded it
    /// ([`DropReason::QueueFull`], or a destination connection that closed
    /// under it: [`DropReason::DestinationOffline`]). The frame stays in its
    /// pair's counters, which count what the table handed over.
    pub fn count_drop(&mut self, reason: DropReason) {
        self.count_drops(reason, 1);
    }

    /// Counts `count` frames the shell dropped before they reached the
    /// table ([`DropReason::InboundFull`]), or after, as [`Self::count_drop`].
    pub fn count_drops(&mut self, reason: DropReason, count: u64) {
        let counter = &mut self.stats.drops[reason as usize];
        *counter = counter.saturating_add(count);
    }

    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Forwarded traffic per (source, destination), ordered by source then
    /// destination; only pairs that carried something appear.
    pub fn pair_stats(&self) -> impl Iterator<Item = ((NodeId, NodeId), PairStats)> + '_ {
        self.pairs.iter().map(|(pair, stats)| (*pair, *stats))
    }

    fn drop_frame(&mut self, from: ConnId, reason: DropReason) -> Command {
        tracing::trace!(%from, %reason, "relay frame dropped");
        self.count_drop(reason);
        Command::Drop { reason }
    }
}

/// A frame as it crosses a link: a header naming the destination, then the
/// frame as the destination gets it.
fn link_frame(kind: relay::RelayKind, destination: NodeId, frame: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + frame.len());
    let mut header = [0u8; HEADER_LEN];
    relay::encode_header(kind, destination, &mut header);
    out.extend_from_slice(&header);
    out.extend_from_slice(frame);
    out.freeze()
}

/// The frame with its header naming `source`: in place when the shell
/// handed over the only reference to the bytes, else in a copy.
fn with_source(frame: Bytes, kind: relay::RelayKind, source: NodeId) -> Bytes {
    let mut out = frame
        .try_into_mut()
        .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
    if let Some(header) = out.first_chunk_mut::<HEADER_LEN>() {
        relay::encode_header(kind, source, header);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::relay::{encode_frame, parse, RelayHeader, RelayKind};

    #[test]
    fn every_drop_reason_keeps_its_name_and_counts_in_a_slot_of_its_own() {
        // The names metrics have shown since 0.2.0.
        let names = [
            "not_admitted",
            "malformed",
            "self_addressed",
            "unknown_destination",
            "destination_offline",
            "rate_limited",
            "destination_limited",
            "queue_full",
            "inbound_full",
            // Since 0.4.0.
            "link_spoofed",
        ];
        let listed: Vec<&str> = DropReason::iter().map(DropReason::as_str).collect();
        assert_eq!(listed, names);
        assert_eq!(DropReason::COUNT, names.len());
        let mut table = RelayTable::new(RelayLimits::default());
        for (n, reason) in DropReason::iter().enumerate() {
            table.count_drops(reason, n as u64 + 1);
        }
        for (n, (reason, count)) in table.stats().drops().enumerate() {
            assert_eq!(count, n as u64 + 1, "{reason}");
            assert_eq!(table.stats().dropped(reason), count);
            assert_eq!(reason.to_string(), reason.as_str());
        }
    }

    fn node(id: u32) -> NodeId {
        NodeId::new(id).unwrap()
    }

    /// What node `from` writes to reach `to`.
    fn frame_to(to: u32, payload: &[u8]) -> Bytes {
        let mut out = Vec::new();
        encode_frame(
            RelayHeader {
                kind: RelayKind::Packet,
                node: node(to),
            },
            payload,
            &mut out,
        )
        .unwrap();
        out.into()
    }

    /// A WireGuard-looking payload of `len` bytes.
    fn payload(len: usize) -> Vec<u8> {
        let mut p = vec![0xab; len];
        p[..4].copy_from_slice(&[4, 0, 0, 0]);
        p
    }

    /// Nodes 1..=n, node i online on connection i.
    fn table_with(n: u32, limits: RelayLimits) -> RelayTable {
        let mut table = RelayTable::new(limits);
        for i in 1..=n {
            table.connect(node(i), ConnId(i.into()));
        }
        table
    }

    fn forwarded(cmd: Command) -> (ConnId, RelayHeader, Vec<u8>) {
        match cmd {
            Command::Forward { to, frame } => {
                let (header, payload) = parse(&frame).expect("a forwarded frame parses");
                (to, header, payload.to_vec())
            }
            Command::Drop { reason } => panic!("expected a forward, got a drop: {reason}"),
        }
    }

    fn source(id: u32) -> RelayHeader {
        RelayHeader {
            kind: RelayKind::Packet,
            node: node(id),
        }
    }

    #[test]
    fn a_members_packet_goes_to_the_destinations_connection_naming_the_source() {
        let now = Instant::now();
        let mut table = table_with(3, RelayLimits::default());
        let p = payload(1420);
        let (to, header, body) = forwarded(table.handle_frame(ConnId(1), frame_to(2, &p), now));
        assert_eq!((to, header, body), (ConnId(2), source(1), p.clone()));
        let (to, header, _) = forwarded(table.handle_frame(ConnId(3), frame_to(1, &p), now));
        assert_eq!((to, header), (ConnId(1), source(3)));
        assert_eq!(table.stats().dropped_total(), 0);
    }

    /// Two servers' tables: nodes 1 and 2 on server a (connections 1, 2),
    /// node 3 on server b (connection 3); the link between them is
    /// connection 100 at a and 200 at b, and each routes the other's nodes
    /// over it.
    fn two_servers() -> (RelayTable, RelayTable) {
        let mut a = table_with(2, RelayLimits::default());
        let mut b = RelayTable::new(RelayLimits::default());
        b.connect(node(3), ConnId(3));
        a.connect_link(ConnId(100));
        b.connect_link(ConnId(200));
        a.route(node(3), Some(ConnId(100)));
        for n in [1, 2] {
            b.route(node(n), Some(ConnId(200)));
        }
        (a, b)
    }

    #[test]
    fn a_packet_for_a_node_on_another_server_crosses_the_link_and_arrives_naming_its_source() {
        let now = Instant::now();
        let (mut a, mut b) = two_servers();
        let p = payload(1420);
        let Command::Forward { to, frame } = a.handle_frame(ConnId(1), frame_to(3, &p), now) else {
            panic!("forwarded to the link");
        };
        assert_eq!(to, ConnId(100));
        let (to, header, body) = forwarded(b.handle_frame(ConnId(200), frame, now));
        assert_eq!((to, header, body), (ConnId(3), source(1), p.clone()));
        // And back.
        let Command::Forward { frame, .. } = b.handle_frame(ConnId(3), frame_to(2, &p), now) else {
            panic!("forwarded to the link");
        };
        let (to, header, _) = forwarded(a.handle_frame(ConnId(100), frame, now));
        assert_eq!((to, header), (ConnId(2), source(3)));
    }

    #[test]
    fn a_link_cannot_speak_for_a_node_of_the_server_it_reaches() {
        let now = Instant::now();
        let (_, mut b) = two_servers();
        // A link frame for node 3 "from" node 3 (b's own) or from a node b
        // never heard of.
        for source in [3, 9] {
            let inner =
                super::with_source(frame_to(1, &payload(100)), RelayKind::Packet, node(source));
            let frame = super::link_frame(RelayKind::Packet, node(3), &inner);
            assert_eq!(
                b.handle_frame(ConnId(200), frame, now),
                Command::Drop {
                    reason: DropReason::LinkSpoofed
                }
            );
        }
        // Garbage on a link is malformed, not a crash.
        for junk in [&b"\x10\0\0\0\x03"[..], b"", b"\xff\xff"] {
            assert_eq!(
                b.handle_frame(ConnId(200), Bytes::copy_from_slice(junk), now),
                Command::Drop {
                    reason: DropReason::Malformed
                }
            );
        }
    }

    #[test]
    fn a_lost_link_leaves_its_nodes_unreachable_until_routed_again() {
        let now = Instant::now();
        let (mut a, _) = two_servers();
        a.disconnect(ConnId(100));
        assert_eq!(
            a.handle_frame(ConnId(1), frame_to(3, &payload(100)), now),
            Command::Drop {
                reason: DropReason::DestinationOffline
            }
        );
        // A route over a link that is not up is no route.
        a.route(node(3), Some(ConnId(100)));
        assert!(matches!(
            a.handle_frame(ConnId(1), frame_to(3, &payload(100)), now),
            Command::Drop { .. }
        ));
        a.connect_link(ConnId(101));
        a.route(node(3), Some(ConnId(101)));
        let Command::Forward { to, .. } =
            a.handle_frame(ConnId(1), frame_to(3, &payload(100)), now)
        else {
            panic!("forwarded over the new link");
        };
        assert_eq!(to, ConnId(101));
    }

    #[test]
    fn a_node_cannot_send_as_another() {
        let now = Instant::now();
        let mut table = table_with(3, RelayLimits::default());
        // Node 1 sends on its own connection; whatever it writes, node 2
        // receives a frame naming node 1, the owner of connection 1.
        for dst in [2, 3] {
            let (_, header, _) =
                forwarded(table.handle_frame(ConnId(1), frame_to(dst, &payload(64)), now));
            assert_eq!(header.node, node(1));
        }
        // A connection nobody was admitted on cannot relay at all.
        let cmd = table.handle_frame(ConnId(99), frame_to(2, &payload(64)), now);
        assert_eq!(
            cmd,
            Command::Drop {
                reason: DropReason::NotAdmitted
            }
        );
    }

    #[test]
    fn a_shared_frame_buffer_is_copied_not_rewritten_under_its_owner() {
        let now = Instant::now();
        let mut table = table_with(2, RelayLimits::default());
        let frame = frame_to(2, &payload(64));
        let kept = frame.clone();
        let (_, header, _) = forwarded(table.handle_frame(ConnId(1), frame, now));
        assert_eq!(header.node, node(1));
        assert_eq!(
            parse(&kept).unwrap().0.node,
            node(2),
            "the caller's bytes are untouched"
        );
    }

    #[test]
    fn a_superseded_connection_can_no_longer_relay_and_its_late_close_keeps_the_node_online() {
        let now = Instant::now();
        let mut table = table_with(2, RelayLimits::default());
        table.connect(node(2), ConnId(20));
        let cmd = table.handle_frame(ConnId(2), frame_to(1, &payload(64)), now);
        assert_eq!(
            cmd,
            Command::Drop {
                reason: DropReason::NotAdmitted
            }
        );
        table.disconnect(ConnId(2));
        assert_eq!(table.conn_of(node(2)), Some(ConnId(20)));
        let (to, _, _) = forwarded(table.handle_frame(ConnId(1), frame_to(2, &payload(64)), now));
        assert_eq!(to, ConnId(20));
        let (_, header, _) =
            forwarded(table.handle_frame(ConnId(20), frame_to(1, &payload(64)), now));
        assert_eq!(header, source(2));
    }

    #[test]
    fn unknown_and_offline_destinations_are_dropped_and_counted() {
        let now = Instant::now();
        let mut table = table_with(2, RelayLimits::default());
        table.register(node(5));
        assert_eq!(
            table.handle_frame(ConnId(1), frame_to(4, &payload(64)), now),
            Command::Drop {
                reason: DropReason::UnknownDestination
            }
        );
        assert_eq!(
            table.handle_frame(ConnId(1), frame_to(5, &payload(64)), now),
            Command::Drop {
                reason: DropReason::DestinationOffline
            }
        );
        table.disconnect(ConnId(2));
        assert_eq!(
            table.handle_frame(ConnId(1), frame_to(2, &payload(64)), now),
            Command::Drop {
                reason: DropReason::DestinationOffline
            }
        );
        assert_eq!(
            table.handle_frame(ConnId(2), frame_to(1, &payload(64)), now),
            Command::Drop {
                reason: DropReason::NotAdmitted
            },
            "a disconnected node cannot send either"
        );
        assert_eq!(
            table.handle_frame(ConnId(1), frame_to(1, &payload(64)), now),
            Command::Drop {
                reason: DropReason::SelfAddressed
            }
        );
        let stats = table.stats();
        assert_eq!(stats.dropped(DropReason::UnknownDestination), 1);
        assert_eq!(stats.dropped(DropReason::DestinationOffline), 2);
        assert_eq!(stats.dropped(DropReason::NotAdmitted), 1);
        assert_eq!(stats.dropped(DropReason::SelfAddressed), 1);
        assert_eq!(stats.forwarded, PairStats::default());
        assert_eq!(table.pair_stats().count(), 0);
    }

    #[test]
    fn a_removed_node_is_unknown_cannot_relay_and_loses_its_counters() {
        let now = Instant::now();
        let mut table = table_with(3, RelayLimits::default());
        forwarded(table.handle_frame(ConnId(1), frame_to(2, &payload(64)), now));
        forwarded(table.handle_frame(ConnId(3), frame_to(1, &payload(64)), now));
        table.remove(node(2));
        assert_eq!(
            table.handle_frame(ConnId(1), frame_to(2, &payload(64)), now),
            Command::Drop {
                reason: DropReason::UnknownDestination
            }
        );
        assert_eq!(
            table.handle_frame(ConnId(2), frame_to(1, &payload(64)), now),
            Command::Drop {
                reason: DropReason::NotAdmitted
            }
        );
        let pairs: Vec<_> = table.pair_stats().map(|(pair, _)| pair).collect();
        assert_eq!(pairs, vec![(node(3), node(1))]);
        assert_eq!(
            table.stats().forwarded.packets,
            2,
            "totals keep what was forwarded"
        );
    }

    #[test]
    fn a_flood_from_one_node_is_rate_limited_while_others_keep_flowing() {
        let limits = RelayLimits::new(1_000_000, 1_000, Duration::from_millis(100)).unwrap();
        let start = Instant::now();
        let mut table = table_with(3, limits);
        let p = payload(100);
        // Node 1 floods node 3 with ten times its packet burst, all at once.
        let mut flood_forwarded = 0;
        for _ in 0..1_000 {
            match table.handle_frame(ConnId(1), frame_to(3, &p), start) {
                Command::Forward { .. } => flood_forwarded += 1,
                Command::Drop { reason } => assert_eq!(reason, DropReason::RateLimited),
            }
        }
        assert_eq!(flood_forwarded, 100, "one burst: 100 ms of 1 000 packets/s");
        // At the same instant node 2 still gets every packet through (to
        // another node: node 3 has just received its own burst, see
        // `a_flooder_aimed_at_a_node_gets_its_share_and_other_sources_still_reach_it`).
        for _ in 0..50 {
            let (to, header, _) = forwarded(table.handle_frame(ConnId(2), frame_to(1, &p), start));
            assert_eq!((to, header), (ConnId(1), source(2)));
        }
        // And node 1's bucket refills with time: 10 ms buys 10 packets.
        let later = start + Duration::from_millis(10);
        let refilled = (0..100)
            .filter(|_| {
                matches!(
                    table.handle_frame(ConnId(1), frame_to(3, &p), later),
                    Command::Forward { .. }
                )
            })
            .count();
        assert_eq!(refilled, 10);
        assert_eq!(table.stats().dropped(DropReason::RateLimited), 900 + 90);
    }

    #[test]
    fn a_flooder_aimed_at_a_node_gets_its_share_and_other_sources_still_reach_it() {
        // 1 000 packets/s per source and per destination, 100 ms bursts.
        let limits = RelayLimits::new(1_000_000, 1_000, Duration::from_millis(100)).unwrap();
        let start = Instant::now();
        let mut table = table_with(3, limits);
        let p = payload(100);
        // For one second node 1 sends node 3 ten packets every millisecond,
        // ten times its rate and first every time; node 2 sends node 3 one
        // packet every 4 ms (250 packets/s), within its half of node 3's rate.
        let (mut flooder, mut other) = (0, 0);
        for ms in 0..1_000u64 {
            let now = start + Duration::from_millis(ms);
            for _ in 0..10 {
                if matches!(
                    table.handle_frame(ConnId(1), frame_to(3, &p), now),
                    Command::Forward { .. }
                ) {
                    flooder += 1;
                }
            }
            if ms % 4 == 0
                && matches!(
                    table.handle_frame(ConnId(2), frame_to(3, &p), now),
                    Command::Forward { .. }
                )
            {
                other += 1;
            }
        }
        // Node 3 received its rate and one burst, no more.
        assert!(flooder + other <= 1_000 + 100, "{flooder} + {other}");
        // Node 2 got (nearly) everything through: a destination budget
        // alone, drained by node 1 first every millisecond, let 3 through.
        assert!(other >= 240, "node 2 got {other} of 250 through");
        // And node 1 had what node 2 left, not only half: nothing is wasted.
        assert!(flooder >= 1_000 - 250, "node 1 got {flooder}");
    }

    #[test]
    fn three_sources_each_within_their_limit_are_held_to_the_destinations_limit_and_others_are_not_affected(
    ) {
        // 1 000 packets/s with a 100 ms burst: 100 packets at once, from one
        // node and, by default, towards one node.
        let limits = RelayLimits::new(1_000_000, 1_000, Duration::from_millis(100)).unwrap();
        let start = Instant::now();
        let mut table = table_with(5, limits);
        let p = payload(100);
        // Nodes 1, 2 and 3 each send node 4 sixty packets at once: each well
        // within its own burst, 180 together.
        let mut to_4 = 0;
        for _ in 0..60 {
            for src in 1..=3u32 {
                match table.handle_frame(ConnId(src.into()), frame_to(4, &p), start) {
                    Command::Forward { to, .. } => {
                        assert_eq!(to, ConnId(4));
                        to_4 += 1;
                    }
                    Command::Drop { reason } => assert_eq!(reason, DropReason::DestinationLimited),
                }
            }
        }
        assert_eq!(to_4, 100, "node 4 receives one burst, whoever sends it");
        assert_eq!(table.stats().dropped(DropReason::DestinationLimited), 80);
        assert_eq!(
            table.stats().dropped(DropReason::RateLimited),
            0,
            "no source was over its own limit"
        );
        // At the same instant the same sources still reach node 5: what node 4
        // refused cost them nothing.
        for _ in 0..30 {
            for src in 1..=3u32 {
                let (to, header, _) =
                    forwarded(table.handle_frame(ConnId(src.into()), frame_to(5, &p), start));
                assert_eq!((to, header), (ConnId(5), source(src)));
            }
        }
        // Node 4's budget refills with time: 10 ms buys 10 packets, from all
        // sources together.
        let later = start + Duration::from_millis(10);
        let refilled = (0..30u32)
            .filter(|i| {
                let src = ConnId((1 + i % 3).into());
                matches!(
                    table.handle_frame(src, frame_to(4, &p), later),
                    Command::Forward { .. }
                )
            })
            .count();
        assert_eq!(refilled, 10);
    }

    #[test]
    fn the_destination_limit_can_differ_from_the_source_limit_and_is_counted_in_bytes_too() {
        // A source may send 10 000 packets/s, a node receive 500 packets/s
        // and 100 000 bytes/s (the byte burst is at least one largest payload).
        let limits = RelayLimits::new(100_000_000, 10_000, Duration::from_millis(100))
            .unwrap()
            .with_destination(100_000, 500)
            .unwrap();
        assert_eq!(
            (
                limits.destination_bytes_per_sec(),
                limits.destination_packets_per_sec()
            ),
            (100_000, 500)
        );
        let start = Instant::now();
        let mut table = table_with(3, limits);
        let small = (0..100)
            .filter(|_| {
                matches!(
                    table.handle_frame(ConnId(1), frame_to(2, &payload(10)), start),
                    Command::Forward { .. }
                )
            })
            .count();
        assert_eq!(small, 50, "100 ms of 500 packets/s");
        // Node 3's budget in bytes: MAX_PAYLOAD (65 535) pays for six 10 000-byte packets.
        let large = (0..20)
            .filter(|_| {
                matches!(
                    table.handle_frame(ConnId(1), frame_to(3, &payload(10_000)), start),
                    Command::Forward { .. }
                )
            })
            .count();
        assert_eq!(large, 6);
    }

    #[test]
    fn a_source_over_its_own_limit_spends_nothing_of_the_destinations() {
        let limits = RelayLimits::new(1_000_000, 1_000, Duration::from_millis(100))
            .unwrap()
            .with_destination(1_000_000, 1_500)
            .unwrap();
        let start = Instant::now();
        let mut table = table_with(3, limits);
        let p = payload(100);
        // Node 1 tries 1 000 packets to node 3: 100 pass (its own burst).
        let flood = (0..1_000)
            .filter(|_| {
                matches!(
                    table.handle_frame(ConnId(1), frame_to(3, &p), start),
                    Command::Forward { .. }
                )
            })
            .count();
        assert_eq!(flood, 100);
        assert_eq!(table.stats().dropped(DropReason::RateLimited), 900);
        // Node 3's budget of 150 paid for node 1's 100 only: 50 left for node 2.
        let rest = (0..100)
            .filter(|_| {
                matches!(
                    table.handle_frame(ConnId(2), frame_to(3, &p), start),
                    Command::Forward { .. }
                )
            })
            .count();
        assert_eq!(rest, 50);
        assert_eq!(table.stats().dropped(DropReason::DestinationLimited), 50);
    }

    #[test]
    fn large_packets_are_limited_by_bytes_and_a_full_sized_one_always_fits_the_bucket() {
        // A second of 10 000 bytes/s is less than one largest payload, but a
        // bucket always holds at least one, so no packet is too big to ever pass.
        let limits = RelayLimits::new(10_000, 1_000_000, Duration::from_secs(1)).unwrap();
        let start = Instant::now();
        let mut table = table_with(2, limits);
        let outcomes: Vec<bool> = (0..10)
            .map(|_| {
                matches!(
                    table.handle_frame(ConnId(1), frame_to(2, &payload(20_000)), start),
                    Command::Forward { .. }
                )
            })
            .collect();
        // MAX_PAYLOAD (65 535) of burst pays for three 20 000-byte packets.
        assert_eq!(outcomes.iter().filter(|f| **f).count(), 3);
        assert!(matches!(
            table.handle_frame(
                ConnId(1),
                frame_to(2, &payload(MAX_PAYLOAD)),
                start + Duration::from_secs(7)
            ),
            Command::Forward { .. }
        ));
    }

    #[test]
    fn a_clock_that_steps_back_refills_nothing() {
        let limits = RelayLimits::new(1_000_000, 10, Duration::from_millis(100)).unwrap();
        let start = Instant::now() + Duration::from_secs(10);
        let mut table = table_with(2, limits);
        assert!(matches!(
            table.handle_frame(ConnId(1), frame_to(2, &payload(64)), start),
            Command::Forward { .. }
        ));
        let earlier = start - Duration::from_secs(5);
        assert_eq!(
            table.handle_frame(ConnId(1), frame_to(2, &payload(64)), earlier),
            Command::Drop {
                reason: DropReason::RateLimited
            }
        );
        assert_eq!(
            table.handle_frame(ConnId(1), frame_to(2, &payload(64)), start),
            Command::Drop {
                reason: DropReason::RateLimited
            }
        );
    }

    #[test]
    fn malformed_frames_are_counted_and_random_bytes_never_panic() {
        let seed: u64 = 0x0bad_f00d;
        let mut rng = seed;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let now = Instant::now();
        let mut table = table_with(3, RelayLimits::default());
        let rounds = 20_000u64;
        let mut commands = 0u64;
        for round in 0..rounds {
            let len = (next() % 40) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 {
                // Plausible headers naming nodes 0..=4, so every check runs.
                if let Some(h) = bytes.first_chunk_mut::<HEADER_LEN>() {
                    *h = [0x11, 0, 0, 0, (next() % 5) as u8];
                }
            }
            let conn = ConnId(next() % 5);
            match table.handle_frame(conn, bytes.into(), now) {
                Command::Forward { to, frame } => {
                    let (header, _) = parse(&frame)
                        .unwrap_or_else(|e| panic!("seed {seed:#x} round {round}: {e}"));
                    assert_eq!(
                        Some(header.node),
                        table.node_of(conn),
                        "seed {seed:#x} round {round}"
                    );
                    assert!(table.node_of(to).is_some());
                }
                Command::Drop { .. } => {}
            }
            commands += 1;
        }
        let stats = table.stats();
        assert_eq!(commands, rounds);
        assert_eq!(
            stats.forwarded.packets + stats.dropped_total(),
            rounds,
            "every frame is accounted for"
        );
        assert!(stats.dropped(DropReason::Malformed) > 0);
        assert_eq!(
            table.handle_frame(ConnId(1), Bytes::from_static(&[0x11, 0, 0, 0]), now),
            Command::Drop {
                reason: DropReason::Malformed
            }
        );
    }

    #[test]
    fn pair_counters_add_up() {
        let now = Instant::now();
        let mut table = table_with(3, RelayLimits::default());
        let sends: [(u32, u32, usize); 6] = [
            (1, 2, 100),
            (1, 2, 200),
            (2, 1, 50),
            (3, 2, 1420),
            (1, 3, 7),
            (1, 2, 300),
        ];
        for (from, to, len) in sends {
            forwarded(table.handle_frame(ConnId(from.into()), frame_to(to, &payload(len)), now));
        }
        // Drops count nowhere in the pairs.
        table.handle_frame(ConnId(1), frame_to(9, &payload(999)), now);
        let pairs: Vec<_> = table.pair_stats().collect();
        assert_eq!(
            pairs,
            vec![
                (
                    (node(1), node(2)),
                    PairStats {
                        packets: 3,
                        bytes: 600
                    }
                ),
                (
                    (node(1), node(3)),
                    PairStats {
                        packets: 1,
                        bytes: 7
                    }
                ),
                (
                    (node(2), node(1)),
                    PairStats {
                        packets: 1,
                        bytes: 50
                    }
                ),
                (
                    (node(3), node(2)),
                    PairStats {
                        packets: 1,
                        bytes: 1420
                    }
                ),
            ]
        );
        let total = pairs.iter().fold(PairStats::default(), |mut sum, (_, s)| {
            sum.packets += s.packets;
            sum.bytes += s.bytes;
            sum
        });
        assert_eq!(total, table.stats().forwarded);
        assert_eq!(
            total,
            PairStats {
                packets: 6,
                bytes: 2077
            }
        );
    }

    #[test]
    fn shell_drops_are_counted_with_the_tables() {
        let mut table = table_with(1, RelayLimits::default());
        table.count_drop(DropReason::QueueFull);
        table.count_drops(DropReason::InboundFull, 40);
        table.count_drops(DropReason::InboundFull, 2);
        table.count_drops(DropReason::Malformed, 0);
        let drops: Vec<_> = table.stats().drops().filter(|(_, n)| *n > 0).collect();
        assert_eq!(
            drops,
            vec![(DropReason::QueueFull, 1), (DropReason::InboundFull, 42)]
        );
        assert_eq!(table.stats().dropped_total(), 43);
    }

    #[test]
    fn limits_that_would_stop_all_relaying_are_refused() {
        let second = Duration::from_secs(1);
        assert_eq!(
            RelayLimits::new(0, 1, second),
            Err(LimitsError::Zero {
                what: "bytes per second"
            })
        );
        assert_eq!(
            RelayLimits::new(1, 0, second),
            Err(LimitsError::Zero {
                what: "packets per second"
            })
        );
        assert_eq!(
            RelayLimits::new(1, 1, Duration::ZERO),
            Err(LimitsError::Zero { what: "burst" })
        );
        let limits = RelayLimits::new(1, 1, second).unwrap();
        assert_eq!(
            limits.with_destination(0, 1),
            Err(LimitsError::Zero {
                what: "destination bytes per second"
            })
        );
        assert_eq!(
            limits.with_destination(1, 0),
            Err(LimitsError::Zero {
                what: "destination packets per second"
            })
        );
        let defaults = RelayLimits::default();
        assert_eq!(
            (defaults.bytes_per_sec(), defaults.packets_per_sec()),
            (100_000_000, 100_000)
        );
        assert_eq!(
            (
                defaults.destination_bytes_per_sec(),
                defaults.destination_packets_per_sec()
            ),
            (100_000_000, 100_000),
            "a node may receive what one node may send"
        );
    }

    #[test]
    fn commands_print_frame_lengths_not_contents() {
        let cmd = Command::Forward {
            to: ConnId(2),
            frame: frame_to(2, &payload(64)),
        };
        assert_eq!(
            format!("{cmd:?}"),
            "Forward { to: conn#2, frame: 69 bytes }"
        );
    }
}
