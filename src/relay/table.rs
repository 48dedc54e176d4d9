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
//! limits ([`DropReason::RateLimited`]). Only a frame that passes everything
//! spends rate-limit tokens and counts towards its (source, destination) pair.
//!
//! # Rate limits and queues
//!
//! Every node has two token buckets, bytes (of payload) per second and
//! packets per second ([`RelayLimits`]), each holding up to `burst` worth of
//! its rate. A frame is forwarded only if both buckets can pay for it, so a
//! node flooding the relay gets its rate and no more, while every other
//! node's frames draw on their own buckets and keep flowing. Buckets belong
//! to the node, not the connection: reconnecting does not refill them.
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
//! [`RelayTable::count_drop`]`(`[`DropReason::QueueFull`]`)`. The rate limit
//! bounds how much of any destination's queue one source can fill. It does
//! not share a congested destination fairly among several sources; each
//! source is only capped at its own rate.
//!
//! # Counters
//!
//! [`RelayTable::pair_stats`] counts what was forwarded per (source,
//! destination), [`RelayTable::stats`] the totals and the drops by reason.
//! Pair counters only exist for registered nodes and go when a node is
//! removed, so they take memory for at most registered² pairs.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::rendezvous::registry::ConnId;
use crate::wire::relay::{self, NodeId, HEADER_LEN, MAX_PAYLOAD};

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Per-node rate limits, set by the operator under `[relay]` in
/// `rendezvous.toml` ([`crate::rendezvous::setup`]). Valid by construction:
/// every rate and the burst are greater than zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    bytes_per_sec: u64,
    packets_per_sec: u64,
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

    pub fn new(bytes_per_sec: u64, packets_per_sec: u64, burst: Duration) -> Result<Self, LimitsError> {
        if bytes_per_sec == 0 {
            return Err(LimitsError::Zero { what: "bytes per second" });
        }
        if packets_per_sec == 0 {
            return Err(LimitsError::Zero { what: "packets per second" });
        }
        if burst.is_zero() {
            return Err(LimitsError::Zero { what: "burst" });
        }
        Ok(Self { bytes_per_sec, packets_per_sec, burst })
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    pub fn packets_per_sec(&self) -> u64 {
        self.packets_per_sec
    }

    pub fn burst(&self) -> Duration {
        self.burst
    }

    /// Never less than one largest payload, or a large packet could never pass.
    fn byte_capacity(&self) -> u64 {
        burst_of(self.bytes_per_sec, self.burst).max(MAX_PAYLOAD as u64)
    }

    fn packet_capacity(&self) -> u64 {
        burst_of(self.packets_per_sec, self.burst).max(1)
    }
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            bytes_per_sec: Self::DEFAULT_BYTES_PER_SEC,
            packets_per_sec: Self::DEFAULT_PACKETS_PER_SEC,
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

/// Why a relay frame was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// The shell's queue towards the destination was full (counted by the
    /// shell through [`RelayTable::count_drop`]).
    QueueFull,
    /// The source's share of the shell's queue into the table was full: it
    /// sends faster than the relay forwards (counted by the shell through
    /// [`RelayTable::count_drops`]).
    InboundFull,
}

impl DropReason {
    pub const ALL: [DropReason; 8] = [
        DropReason::NotAdmitted,
        DropReason::Malformed,
        DropReason::SelfAddressed,
        DropReason::UnknownDestination,
        DropReason::DestinationOffline,
        DropReason::RateLimited,
        DropReason::QueueFull,
        DropReason::InboundFull,
    ];

    /// A stable name for metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NotAdmitted => "not_admitted",
            DropReason::Malformed => "malformed",
            DropReason::SelfAddressed => "self_addressed",
            DropReason::UnknownDestination => "unknown_destination",
            DropReason::DestinationOffline => "destination_offline",
            DropReason::RateLimited => "rate_limited",
            DropReason::QueueFull => "queue_full",
            DropReason::InboundFull => "inbound_full",
        }
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
    drops: [u64; DropReason::ALL.len()],
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
        DropReason::ALL.iter().map(|r| (*r, self.drops[*r as usize]))
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
        Self { rate_per_sec, capacity_nanos, nanos: capacity_nanos, last: None }
    }

    fn refill(&mut self, now: Instant) {
        match self.last {
            // A clock that steps back refills nothing and keeps the later mark.
            Some(last) if now <= last => {}
            Some(last) => {
                let added = (now - last).as_nanos().saturating_mul(u128::from(self.rate_per_sec));
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
        self.nanos = self.nanos.saturating_sub(u128::from(tokens) * NANOS_PER_SEC);
    }
}

/// A registered node.
#[derive(Debug, Clone)]
struct NodeState {
    /// Its current connection, while it is online.
    conn: Option<ConnId>,
    bytes: TokenBucket,
    packets: TokenBucket,
}

impl NodeState {
    fn new(limits: &RelayLimits) -> Self {
        Self {
            conn: None,
            bytes: TokenBucket::full(limits.bytes_per_sec, limits.byte_capacity()),
            packets: TokenBucket::full(limits.packets_per_sec, limits.packet_capacity()),
        }
    }

    /// Spends the tokens for one payload if both buckets have them.
    fn admit(&mut self, payload_len: usize, now: Instant) -> bool {
        self.bytes.refill(now);
        self.packets.refill(now);
        let len = payload_len as u64;
        if !(self.bytes.can_take(len) && self.packets.can_take(1)) {
            return false;
        }
        self.bytes.take(len);
        self.packets.take(1);
        true
    }
}

/// The relay state machine. See the module docs.
#[derive(Debug)]
pub struct RelayTable {
    limits: RelayLimits,
    nodes: HashMap<NodeId, NodeState>,
    /// Admitted connections and whose they are; each is its node's `conn`.
    conns: HashMap<ConnId, NodeId>,
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
        self.nodes.entry(node).or_insert_with(|| NodeState::new(&limits));
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

    /// `conn` closed. Its node goes offline unless it has a newer connection.
    pub fn disconnect(&mut self, conn: ConnId) {
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
        self.pairs.retain(|(src, dst), _| *src != node && *dst != node);
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
        let to = match self.nodes.get(&destination) {
            None => return self.drop_frame(from, DropReason::UnknownDestination),
            Some(NodeState { conn: None, .. }) => {
                return self.drop_frame(from, DropReason::DestinationOffline);
            }
            Some(NodeState { conn: Some(to), .. }) => *to,
        };
        let Some(sender) = self.nodes.get_mut(&source) else {
            // `conns` only names registered nodes; stay safe if that ever breaks.
            return self.drop_frame(from, DropReason::NotAdmitted);
        };
        if !sender.admit(payload_len, now) {
            return self.drop_frame(from, DropReason::RateLimited);
        }
        self.pairs.entry((source, destination)).or_default().add(payload_len);
        self.stats.forwarded.add(payload_len);
        tracing::trace!(%source, %destination, %to, len = payload_len, "relay frame forwarded");
        Command::Forward { to, frame: with_source(frame, header.kind, source) }
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

/// The frame with its header naming `source`: in place when the shell
/// handed over the only reference to the bytes, else in a copy.
fn with_source(frame: Bytes, kind: relay::RelayKind, source: NodeId) -> Bytes {
    let mut out = frame.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..]));
    if let Some(header) = out.first_chunk_mut::<HEADER_LEN>() {
        relay::encode_header(kind, source, header);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::relay::{encode_frame, parse, RelayHeader, RelayKind};

    fn node(id: u32) -> NodeId {
        NodeId::new(id).unwrap()
    }

    /// What node `from` writes to reach `to`.
    fn frame_to(to: u32, payload: &[u8]) -> Bytes {
        let mut out = Vec::new();
        encode_frame(RelayHeader { kind: RelayKind::Packet, node: node(to) }, payload, &mut out).unwrap();
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
        RelayHeader { kind: RelayKind::Packet, node: node(id) }
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

    #[test]
    fn a_node_cannot_send_as_another() {
        let now = Instant::now();
        let mut table = table_with(3, RelayLimits::default());
        // Node 1 sends on its own connection; whatever it writes, node 2
        // receives a frame naming node 1, the owner of connection 1.
        for dst in [2, 3] {
            let (_, header, _) = forwarded(table.handle_frame(ConnId(1), frame_to(dst, &payload(64)), now));
            assert_eq!(header.node, node(1));
        }
        // A connection nobody was admitted on cannot relay at all.
        let cmd = table.handle_frame(ConnId(99), frame_to(2, &payload(64)), now);
        assert_eq!(cmd, Command::Drop { reason: DropReason::NotAdmitted });
    }

    #[test]
    fn a_shared_frame_buffer_is_copied_not_rewritten_under_its_owner() {
        let now = Instant::now();
        let mut table = table_with(2, RelayLimits::default());
        let frame = frame_to(2, &payload(64));
        let kept = frame.clone();
        let (_, header, _) = forwarded(table.handle_frame(ConnId(1), frame, now));
        assert_eq!(header.node, node(1));
        assert_eq!(parse(&kept).unwrap().0.node, node(2), "the caller's bytes are untouched");
    }

    #[test]
    fn a_superseded_connection_can_no_longer_relay_and_its_late_close_keeps_the_node_online() {
        let now = Instant::now();
        let mut table = table_with(2, RelayLimits::default());
        table.connect(node(2), ConnId(20));
        let cmd = table.handle_frame(ConnId(2), frame_to(1, &payload(64)), now);
        assert_eq!(cmd, Command::Drop { reason: DropReason::NotAdmitted });
        table.disconnect(ConnId(2));
        assert_eq!(table.conn_of(node(2)), Some(ConnId(20)));
        let (to, _, _) = forwarded(table.handle_frame(ConnId(1), frame_to(2, &payload(64)), now));
        assert_eq!(to, ConnId(20));
        let (_, header, _) = forwarded(table.handle_frame(ConnId(20), frame_to(1, &payload(64)), now));
        assert_eq!(header, source(2));
    }

    #[test]
    fn unknown_and_offline_destinations_are_dropped_and_counted() {
        let now = Instant::now();
        let mut table = table_with(2, RelayLimits::default());
        table.register(node(5));
        assert_eq!(
            table.handle_frame(ConnId(1), frame_to(4, &payload(64)), now),
            Command::Drop { reason: DropReason::UnknownDestination }
        );
        assert_eq!(
            table.handle_frame(ConnId(1), frame_to(5, &payload(64)), now),
            Command::Drop { reason: DropReason::DestinationOffline }
        );
        table.disconnect(ConnId(2));
        assert_eq!(
            table.handle_frame(ConnId(1), frame_to(2, &payload(64)), now),
            Command::Drop { reason: DropReason::DestinationOffline }
        );
        assert_eq!(
            table.handle_frame(ConnId(2), frame_to(1, &payload(64)), now),
            Command::Drop { reason: DropReason::NotAdmitted },
            "a disconnected node cannot send either"
        );
        assert_eq!(
            table.handle_frame(ConnId(1), frame_to(1, &payload(64)), now),
            Command::Drop { reason: DropReason::SelfAddressed }
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
            Command::Drop { reason: DropReason::UnknownDestination }
        );
        assert_eq!(
            table.handle_frame(ConnId(2), frame_to(1, &payload(64)), now),
            Command::Drop { reason: DropReason::NotAdmitted }
        );
        let pairs: Vec<_> = table.pair_stats().map(|(pair, _)| pair).collect();
        assert_eq!(pairs, vec![(node(3), node(1))]);
        assert_eq!(table.stats().forwarded.packets, 2, "totals keep what was forwarded");
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
        // At the same instant node 2 still gets every packet through.
        for _ in 0..50 {
            let (to, header, _) = forwarded(table.handle_frame(ConnId(2), frame_to(3, &p), start));
            assert_eq!((to, header), (ConnId(3), source(2)));
        }
        // And node 1's bucket refills with time: 10 ms buys 10 packets.
        let later = start + Duration::from_millis(10);
        let refilled = (0..100)
            .filter(|_| matches!(table.handle_frame(ConnId(1), frame_to(3, &p), later), Command::Forward { .. }))
            .count();
        assert_eq!(refilled, 10);
        assert_eq!(table.stats().dropped(DropReason::RateLimited), 900 + 90);
    }

    #[test]
    fn large_packets_are_limited_by_bytes_and_a_full_sized_one_always_fits_the_bucket() {
        // A second of 10 000 bytes/s is less than one largest payload, but a
        // bucket always holds at least one, so no packet is too big to ever pass.
        let limits = RelayLimits::new(10_000, 1_000_000, Duration::from_secs(1)).unwrap();
        let start = Instant::now();
        let mut table = table_with(2, limits);
        let outcomes: Vec<bool> = (0..10)
            .map(|_| matches!(table.handle_frame(ConnId(1), frame_to(2, &payload(20_000)), start), Command::Forward { .. }))
            .collect();
        // MAX_PAYLOAD (65 535) of burst pays for three 20 000-byte packets.
        assert_eq!(outcomes.iter().filter(|f| **f).count(), 3);
        assert!(matches!(
            table.handle_frame(ConnId(1), frame_to(2, &payload(MAX_PAYLOAD)), start + Duration::from_secs(7)),
            Command::Forward { .. }
        ));
    }

    #[test]
    fn a_clock_that_steps_back_refills_nothing() {
        let limits = RelayLimits::new(1_000_000, 10, Duration::from_millis(100)).unwrap();
        let start = Instant::now() + Duration::from_secs(10);
        let mut table = table_with(2, limits);
        assert!(matches!(table.handle_frame(ConnId(1), frame_to(2, &payload(64)), start), Command::Forward { .. }));
        let earlier = start - Duration::from_secs(5);
        assert_eq!(
            table.handle_frame(ConnId(1), frame_to(2, &payload(64)), earlier),
            Command::Drop { reason: DropReason::RateLimited }
        );
        assert_eq!(
            table.handle_frame(ConnId(1), frame_to(2, &payload(64)), start),
            Command::Drop { reason: DropReason::RateLimited }
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
                    let (header, _) = parse(&frame).unwrap_or_else(|e| panic!("seed {seed:#x} round {round}: {e}"));
                    assert_eq!(Some(header.node), table.node_of(conn), "seed {seed:#x} round {round}");
                    assert!(table.node_of(to).is_some());
                }
                Command::Drop { .. } => {}
            }
            commands += 1;
        }
        let stats = table.stats();
        assert_eq!(commands, rounds);
        assert_eq!(stats.forwarded.packets + stats.dropped_total(), rounds, "every frame is accounted for");
        assert!(stats.dropped(DropReason::Malformed) > 0);
        assert_eq!(
            table.handle_frame(ConnId(1), Bytes::from_static(&[0x11, 0, 0, 0]), now),
            Command::Drop { reason: DropReason::Malformed }
        );
    }

    #[test]
    fn pair_counters_add_up() {
        let now = Instant::now();
        let mut table = table_with(3, RelayLimits::default());
        let sends: [(u32, u32, usize); 6] = [(1, 2, 100), (1, 2, 200), (2, 1, 50), (3, 2, 1420), (1, 3, 7), (1, 2, 300)];
        for (from, to, len) in sends {
            forwarded(table.handle_frame(ConnId(from.into()), frame_to(to, &payload(len)), now));
        }
        // Drops count nowhere in the pairs.
        table.handle_frame(ConnId(1), frame_to(9, &payload(999)), now);
        let pairs: Vec<_> = table.pair_stats().collect();
        assert_eq!(
            pairs,
            vec![
                ((node(1), node(2)), PairStats { packets: 3, bytes: 600 }),
                ((node(1), node(3)), PairStats { packets: 1, bytes: 7 }),
                ((node(2), node(1)), PairStats { packets: 1, bytes: 50 }),
                ((node(3), node(2)), PairStats { packets: 1, bytes: 1420 }),
            ]
        );
        let total = pairs.iter().fold(PairStats::default(), |mut sum, (_, s)| {
            sum.packets += s.packets;
            sum.bytes += s.bytes;
            sum
        });
        assert_eq!(total, table.stats().forwarded);
        assert_eq!(total, PairStats { packets: 6, bytes: 2077 });
    }

    #[test]
    fn shell_drops_are_counted_with_the_tables() {
        let mut table = table_with(1, RelayLimits::default());
        table.count_drop(DropReason::QueueFull);
        table.count_drops(DropReason::InboundFull, 40);
        table.count_drops(DropReason::InboundFull, 2);
        table.count_drops(DropReason::Malformed, 0);
        let drops: Vec<_> = table.stats().drops().filter(|(_, n)| *n > 0).collect();
        assert_eq!(drops, vec![(DropReason::QueueFull, 1), (DropReason::InboundFull, 42)]);
        assert_eq!(table.stats().dropped_total(), 43);
    }

    #[test]
    fn limits_that_would_stop_all_relaying_are_refused() {
        let second = Duration::from_secs(1);
        assert_eq!(RelayLimits::new(0, 1, second), Err(LimitsError::Zero { what: "bytes per second" }));
        assert_eq!(RelayLimits::new(1, 0, second), Err(LimitsError::Zero { what: "packets per second" }));
        assert_eq!(RelayLimits::new(1, 1, Duration::ZERO), Err(LimitsError::Zero { what: "burst" }));
        let defaults = RelayLimits::default();
        assert_eq!((defaults.bytes_per_sec(), defaults.packets_per_sec()), (100_000_000, 100_000));
    }

    #[test]
    fn commands_print_frame_lengths_not_contents() {
        let cmd = Command::Forward { to: ConnId(2), frame: frame_to(2, &payload(64)) };
        assert_eq!(format!("{cmd:?}"), "Forward { to: conn#2, frame: 69 bytes }");
    }
}
