//! The local API between `meshd` and `meshctl`.
//!
//! The types here are pure and shared by both sides; [`server`] (meshd,
//! tokio) and [`client`] (meshctl, blocking std) do the I/O on the Unix
//! socket. The protocol is one JSON request line, one JSON response line,
//! each carrying [`API_VERSION`], so a newer meshctl can tell an older meshd
//! apart instead of misreading it.

pub mod client;
pub mod diagnose;
pub mod metrics;
pub mod render;
pub mod server;
pub mod uapi;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::engine::paths::{CandidateStatus, PathStatus, Source};
use crate::engine::PeerStatus;
use crate::identity::PublicKey;
use crate::wire::control::{MappingProtocol, NatMapping, PortTaken, RouteStatus};

/// Bumped on any incompatible change of [`Request`] or [`Response`].
pub const API_VERSION: u32 = 1;
/// Neither side reads a line longer than this: a bound before allocating.
pub const MAX_MESSAGE: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Every peer with its session and traffic state.
    Peers,
    /// This node.
    Status,
    /// One probe to a peer (by name, overlay address or the start of its
    /// key) over its current path; answered by [`Response::Pong`].
    Ping { peer: String },
    /// Reachability of the rendezvous and this node's NAT behaviour.
    Netcheck,
    /// The prefixes this node advertises, with the mesh's decisions, and
    /// the prefixes behind each peer. meshd before 0.4.0 answers
    /// [`Response::Error`] ("unknown request").
    Routes,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    Peers { peers: Vec<PeerInfo> },
    Status(Box<StatusInfo>),
    Pong(PingInfo),
    Netcheck(Box<NetcheckInfo>),
    Routes(Box<RoutesInfo>),
    Error { message: String },
}

/// `meshctl routes --json`: prefixes behind nodes (pod CIDRs), routed over
/// mesh0 without encapsulation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesInfo {
    /// The prefixes this node advertises (`routes`, `--advertise-routes`),
    /// in the config's order, each with the mesh's decision.
    pub advertised: Vec<AdvertisedRoute>,
    /// The peers with prefixes behind them that the mesh accepted, by name:
    /// mesh0 routes these to them, and takes them as sources from them only.
    pub peers: Vec<PeerRoutes>,
    /// The peers with prefixes the cluster routes to them on mesh0 (a
    /// kernel route via the peer's overlay address: flannel host-gw, BGP),
    /// by name: taken as theirs too. Absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub learned: Vec<PeerRoutes>,
    /// Routes on mesh0 that name no peer, with why: traffic to them goes
    /// nowhere. Absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unusable: Vec<crate::agent::learned::Unusable>,
}

/// One prefix this node advertises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertisedRoute {
    pub prefix: IpNet,
    /// What the rendezvous decided (`{"status": "accepted"}`,
    /// `{"status": "overlaps", "node": …, "prefix": …}`, …); null while it
    /// has not said.
    pub decision: Option<RouteStatus>,
    /// The decision in words, with what to do about a refusal.
    pub explanation: String,
}

/// A peer's prefixes that the mesh accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRoutes {
    /// The peer's name in the mesh.
    pub name: Option<String>,
    pub public_key: PublicKey,
    pub routes: Vec<IpNet>,
}

/// The answer to one `meshctl ping`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PingInfo {
    /// The peer's name, or its short key for a static peer.
    pub peer: String,
    pub overlay_ip: Option<IpAddr>,
    /// The path the answer came back on ([`PeerPath::Direct`] or
    /// [`PeerPath::Relay`]); null when no answer came in time.
    pub path: Option<PeerPath>,
    /// The direct endpoint that answered.
    pub endpoint: Option<SocketAddr>,
    pub rtt_ms: Option<f64>,
}

/// `meshctl netcheck`: what the rendezvous sees of this node, from two of
/// its ports, and what that means for direct paths.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetcheckInfo {
    /// The rendezvous's QUIC address; null for a node without one.
    pub rendezvous: Option<SocketAddr>,
    /// Whether the QUIC session (control and relay) is up, and its RTT.
    pub quic_connected: bool,
    pub quic_rtt_ms: Option<f64>,
    /// Where the rendezvous's QUIC port sees this node.
    pub quic_seen_at: Option<SocketAddr>,
    /// The rendezvous's second port, which answers NAT checks over UDP.
    pub reflector: Option<SocketAddr>,
    /// Where that port sees this node; null when it did not answer.
    pub reflector_seen_at: Option<SocketAddr>,
    pub reflector_rtt_ms: Option<f64>,
    /// The NAT mapping behaviour the two ports show.
    pub mapping: NatMapping,
    /// What all observations (rendezvous and peers) show.
    pub mapping_from_peers: NatMapping,
    /// Whether hole punching is likely to work from here.
    pub hole_punching: HolePunching,
    /// What it all means, in plain words.
    pub explanation: String,
    /// Port mapping on the node's gateway, as in `status`. Absent for a
    /// node without a rendezvous, and from meshd before 0.4.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_mapping: Option<PortMappingInfo>,
}

/// A message on the socket: the payload with the protocol version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub version: u32,
    #[serde(flatten)]
    pub body: T,
}

impl<T> Envelope<T> {
    pub fn new(body: T) -> Self {
        Self {
            version: API_VERSION,
            body,
        }
    }
}

/// One peer as `meshctl peers --json` prints it. Field names are a public
/// interface: scripts depend on them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer's name in the mesh; null for a static peer.
    pub name: Option<String>,
    pub public_key: PublicKey,
    /// The peer's overlay addresses (its host routes for a static peer).
    pub overlay_ips: Vec<IpAddr>,
    pub allowed_ips: Vec<IpNet>,
    /// `ip:port` of the direct path, or null (relayed, or unknown).
    pub endpoint: Option<SocketAddr>,
    pub path: PeerPath,
    /// The address family of the direct path. Absent when there is none,
    /// and from meshd before 0.4.0 (the endpoint says it too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<Family>,
    /// Round-trip time of the direct path by probes, when measured.
    pub rtt_ms: Option<f64>,
    /// Seconds since the last completed handshake, or null if none.
    pub last_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// WireGuard datagrams received (authenticated) and sent; handshakes
    /// completed. Absent from an older meshd, read as 0.
    #[serde(default)]
    pub rx_packets: u64,
    #[serde(default)]
    pub tx_packets: u64,
    #[serde(default)]
    pub handshakes: u64,
    pub persistent_keepalive: Option<u16>,
    /// A handshake completed within the last 3 minutes (WireGuard's
    /// REJECT_AFTER_TIME): the peer is there.
    pub online: bool,
    /// The peer's NAT mapping behaviour as it reported it.
    pub nat: NatMapping,
    /// Every candidate endpoint and what probing it found.
    pub candidates: Vec<CandidateInfo>,
    /// For a relayed peer: why, what was tried, what would make it direct.
    pub relay_reason: Option<String>,
    /// Prefixes behind the peer that the mesh accepted (its pod CIDR),
    /// also in `allowed_ips`. Absent when none, and from meshd before 0.4.0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<IpNet>,
    /// Prefixes the cluster routes to the peer on mesh0 (a kernel route via
    /// its overlay address), also in `allowed_ips`. Absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub learned_routes: Vec<IpNet>,
    /// Seconds since the peer's addresses (its candidates) last changed
    /// while this node knew it: it roamed, its router got a new address.
    /// Absent when they never changed, and from meshd before 0.4.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses_changed_s: Option<u64>,
}

/// One candidate endpoint of a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateInfo {
    pub endpoint: SocketAddr,
    pub source: CandidateSource,
    pub alive: bool,
    pub rtt_ms: Option<f64>,
    pub probes_sent: u64,
    pub probes_answered: u64,
}

impl From<&CandidateStatus> for CandidateInfo {
    fn from(c: &CandidateStatus) -> Self {
        Self {
            endpoint: c.addr,
            source: c.source.into(),
            alive: c.alive,
            rtt_ms: c.rtt.map(millis),
            probes_sent: c.pings,
            probes_answered: c.pongs,
        }
    }
}

/// Milliseconds with two decimals.
pub(crate) fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

/// A peer is online while its last handshake is younger than this.
pub const ONLINE_WITHIN: u64 = 180;

impl From<&PeerStatus> for PeerInfo {
    fn from(p: &PeerStatus) -> Self {
        Self {
            name: None,
            public_key: p.public_key,
            overlay_ips: p
                .allowed_ips
                .iter()
                .filter(|n| n.prefix_len() == n.max_prefix_len())
                .map(IpNet::addr)
                .collect(),
            allowed_ips: p.allowed_ips.clone(),
            endpoint: match p.path {
                PathStatus::Direct { addr, .. } => Some(addr),
                PathStatus::Relay | PathStatus::Unknown => None,
            },
            path: match p.path {
                PathStatus::Direct { .. } => PeerPath::Direct,
                PathStatus::Relay => PeerPath::Relay,
                PathStatus::Unknown => PeerPath::None,
            },
            family: match p.path {
                PathStatus::Direct { addr, .. } => Some(Family::of(addr)),
                PathStatus::Relay | PathStatus::Unknown => None,
            },
            rtt_ms: match p.path {
                PathStatus::Direct { rtt, .. } => rtt.map(millis),
                PathStatus::Relay | PathStatus::Unknown => None,
            },
            last_handshake: p.last_handshake.map(|d| d.as_secs()),
            rx_bytes: p.counters.rx_bytes,
            tx_bytes: p.counters.tx_bytes,
            rx_packets: p.counters.rx_packets,
            tx_packets: p.counters.tx_packets,
            handshakes: p.counters.handshakes,
            persistent_keepalive: p.persistent_keepalive,
            online: p
                .last_handshake
                .is_some_and(|d| d.as_secs() < ONLINE_WITHIN),
            nat: NatMapping::Unknown,
            candidates: p.candidates.iter().map(CandidateInfo::from).collect(),
            relay_reason: None,
            routes: Vec::new(),
            learned_routes: Vec::new(),
            addresses_changed_s: None,
        }
    }
}

/// This node as `meshctl status --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub name: Option<String>,
    pub public_key: PublicKey,
    /// This node's overlay addresses.
    pub overlay_ips: Vec<IpAddr>,
    pub interface: String,
    /// mesh0's MTU; 0 from an older meshd that did not say.
    #[serde(default)]
    pub mtu: u16,
    pub listen_port: u16,
    /// The overlay addresses with the mesh's prefix length, as on mesh0.
    pub addresses: Vec<IpNet>,
    pub peers: usize,
    /// Peers by the path they take now, and those with no recent handshake.
    pub peers_direct: usize,
    pub peers_relayed: usize,
    pub peers_offline: usize,
    /// This node's NAT mapping behaviour, inferred from where the
    /// rendezvous and peers see it.
    pub nat: NatMapping,
    /// Where others see this node's socket; each one reads
    /// `203.0.113.41:3947 (rendezvous)` in the JSON.
    pub seen_at: Vec<SeenAt>,
    /// The rendezvous session; null for a node with static peers only.
    pub rendezvous: Option<RendezvousInfo>,
    /// Dropped packets by reason (only reasons seen at least once).
    pub drops: BTreeMap<String, u64>,
    pub cookie_replies_sent: u64,
    /// How well the packet path batches; zeros from an older meshd.
    #[serde(default)]
    pub io: IoCounters,
    /// Port mapping on the node's gateway: which protocols answered and
    /// the address mapped. Absent for a node without a rendezvous, and
    /// from meshd before 0.4.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_mapping: Option<PortMappingInfo>,
    /// Another node behind the same NAT holds the public port this
    /// node's UDP port needs (the rendezvous saw it there), and this node
    /// stays on its port (`advertise-endpoint` pins it): peers that the
    /// other node talks to reach this one through the relay only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_taken: Option<PortTaken>,
    /// `advertise-endpoint` names another public address than the one the
    /// rendezvous sees this node at. Absent when they agree, without
    /// `advertise-endpoint`, and from meshd before 0.4.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised_elsewhere: Option<AdvertisedElsewhere>,
}

/// `advertise-endpoint` and where the rendezvous sees the node instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertisedElsewhere {
    pub advertised: SocketAddr,
    pub seen: SocketAddr,
}

/// What the node's default gateway said to port mapping (PCP, NAT-PMP,
/// UPnP IGD), as `meshctl status` and `netcheck` show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMappingInfo {
    /// The default gateway asked; null before the first probe or without one.
    pub gateway: Option<IpAddr>,
    /// The protocols it answered on the last probe, preferred first.
    pub answered: Vec<MappingProtocol>,
    /// The protocol of the mapping held now; null without one.
    pub protocol: Option<MappingProtocol>,
    /// Where the internet reaches this node's UDP port through the mapping,
    /// announced to peers as a candidate; null without one.
    pub external: Option<SocketAddr>,
    /// The lifetime the gateway granted, in seconds (renewed at half).
    pub lifetime_s: Option<u64>,
    /// Why there is no mapping, or why the last renewal failed.
    pub error: Option<String>,
}

/// The packet path's system calls and the packets they carried: packets per
/// call shows whether the offloads work (TUN reads of TSO super-packets,
/// coalesced TUN writes, UDP GSO sends and GRO receives). Counted since
/// meshd started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoCounters {
    pub tun_reads: u64,
    pub tun_read_packets: u64,
    pub tun_writes: u64,
    pub tun_written_packets: u64,
    pub tun_write_errors: u64,
    pub udp_sends: u64,
    pub udp_sent_datagrams: u64,
    pub udp_send_errors: u64,
    /// QUIC packets (the rendezvous session, the relay) the kernel refused
    /// to send, taken as lost: no route for a moment, a firewall's reject.
    /// Absent while none (and for meshd before 0.4.0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub quic_send_errors: u64,
    pub udp_receives: u64,
    pub udp_received_datagrams: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One operation of [`IoCounters`], as the metrics and `meshctl status`
/// show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoOp {
    /// The metrics label, e.g. `tun_read`.
    pub name: &'static str,
    /// For people, e.g. `TUN read`.
    pub label: &'static str,
    pub calls: u64,
    pub packets: u64,
}

impl IoCounters {
    /// The four operations with their calls and packets: one list for
    /// every view, so none misses one.
    pub fn ops(&self) -> [IoOp; 4] {
        let op = |name, label, calls, packets| IoOp {
            name,
            label,
            calls,
            packets,
        };
        [
            op(
                "tun_read",
                "TUN read",
                self.tun_reads,
                self.tun_read_packets,
            ),
            op(
                "tun_write",
                "TUN write",
                self.tun_writes,
                self.tun_written_packets,
            ),
            op(
                "udp_send",
                "UDP send",
                self.udp_sends,
                self.udp_sent_datagrams,
            ),
            op(
                "udp_receive",
                "UDP receive",
                self.udp_receives,
                self.udp_received_datagrams,
            ),
        ]
    }
}

/// The node's session with its rendezvous.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RendezvousInfo {
    pub connected: bool,
    /// The QUIC connection's smoothed RTT while connected.
    pub rtt_ms: Option<f64>,
}

/// The path a peer's traffic takes now, or the one a ping's answer came
/// back on. The JSON has the words of [`PeerPath::as_str`]; adding one is
/// an incompatible change (an older meshctl could not read it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerPath {
    /// Straight to the peer's endpoint.
    Direct,
    /// Through the rendezvous's relay.
    Relay,
    /// No path known yet (no handshake, no relay).
    #[default]
    None,
}

impl PeerPath {
    /// Every path, in the order the metrics list them.
    pub const ALL: [Self; 3] = [Self::Direct, Self::Relay, Self::None];

    /// The word in the JSON and in the metrics' `path` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Relay => "relay",
            Self::None => "none",
        }
    }
}

impl fmt::Display for PeerPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The address family of an underlay path: a dual-stack pair may go
/// direct over either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    /// The family of `addr`; an IPv4 address mapped into IPv6 is IPv4.
    pub fn of(addr: SocketAddr) -> Self {
        match addr.ip().to_canonical() {
            IpAddr::V4(_) => Self::Ipv4,
            IpAddr::V6(_) => Self::Ipv6,
        }
    }

    /// The word in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ipv4 => "IPv4",
            Self::Ipv6 => "IPv6",
        })
    }
}

/// How a peer's candidate endpoint became known (the engine's [`Source`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CandidateSource {
    /// The peer's operator configured it (`--advertise-endpoint`).
    Advertised,
    /// Where the rendezvous sees the peer.
    Observed,
    /// An address on one of the peer's interfaces.
    Local,
    /// Where the peer's authenticated packets came from.
    Learned,
    /// A port the peer's gateway mapped to it (PCP, NAT-PMP, UPnP IGD).
    Mapped,
}

impl CandidateSource {
    /// The word in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Advertised => "advertised",
            Self::Observed => "observed",
            Self::Local => "local",
            Self::Learned => "learned",
            Self::Mapped => "mapped",
        }
    }
}

impl fmt::Display for CandidateSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Source> for CandidateSource {
    fn from(source: Source) -> Self {
        match source {
            Source::Advertised => Self::Advertised,
            Source::Observed => Self::Observed,
            Source::Local => Self::Local,
            Source::Learned => Self::Learned,
            Source::Mapped => Self::Mapped,
        }
    }
}

/// Whether hole punching is likely to work from this node, by what the
/// rendezvous's two ports see (`meshctl netcheck`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HolePunching {
    /// The NAT keeps one public port for every destination.
    Likely,
    /// The NAT picks a new public port per destination.
    Unlikely,
    /// No NAT: the node is seen at an address of its own.
    #[serde(rename = "not needed")]
    NotNeeded,
    /// Not enough answers to tell.
    #[default]
    Unknown,
}

impl HolePunching {
    /// The words in the JSON and in `meshctl netcheck`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Likely => "likely",
            Self::Unlikely => "unlikely",
            Self::NotNeeded => "not needed",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for HolePunching {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one observer sees this node's socket (its NAT's public side).
///
/// The JSON is the string 0.2.0 wrote, `203.0.113.41:3947 (rendezvous)`,
/// which this type writes and reads: the address, a space, the observer in
/// brackets (see [`SeenBy`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeenAt {
    pub addr: SocketAddr,
    pub by: SeenBy,
}

/// Who saw this node at a [`SeenAt`] address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SeenBy {
    /// The rendezvous's QUIC port: `(rendezvous)`.
    Rendezvous,
    /// The rendezvous's NAT-check port: `(rendezvous NAT check)`.
    Reflector,
    /// A peer, by its name (its short key for a static peer): `(node-b)`.
    /// A peer named `rendezvous` reads back as [`SeenBy::Rendezvous`]: the
    /// words are 0.2.0's and cannot tell them apart.
    Peer(String),
}

impl SeenBy {
    fn as_str(&self) -> &str {
        match self {
            Self::Rendezvous => "rendezvous",
            Self::Reflector => "rendezvous NAT check",
            Self::Peer(name) => name,
        }
    }

    /// Whether the rendezvous (either of its ports) is the observer.
    pub fn is_rendezvous(&self) -> bool {
        match self {
            Self::Rendezvous | Self::Reflector => true,
            Self::Peer(_) => false,
        }
    }
}

impl fmt::Display for SeenAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.addr, self.by.as_str())
    }
}

/// Why a `seen_at` entry does not read as `ADDR (OBSERVER)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeenAtError {
    #[error("{0:?} is not `ADDRESS:PORT (OBSERVER)`")]
    Form(String),
    #[error("{0:?} does not start with an address and port")]
    Addr(String),
}

impl std::str::FromStr for SeenAt {
    type Err = SeenAtError;

    fn from_str(s: &str) -> Result<Self, SeenAtError> {
        let form = || SeenAtError::Form(s.to_owned());
        // An address and port never holds a space or a bracket-open.
        let (addr, by) = s.split_once(" (").ok_or_else(form)?;
        let by = by.strip_suffix(')').ok_or_else(form)?;
        let addr = addr.parse().map_err(|_| SeenAtError::Addr(s.to_owned()))?;
        let by = match by {
            "rendezvous" => SeenBy::Rendezvous,
            "rendezvous NAT check" => SeenBy::Reflector,
            "" => return Err(form()),
            name => SeenBy::Peer(name.to_owned()),
        };
        Ok(Self { addr, by })
    }
}

impl Serialize for SeenAt {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SeenAt {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The all-zero key stands in for "not set" in a default value (tests and
/// `..Default::default()`); meshd always fills in a real one.
fn no_key() -> PublicKey {
    PublicKey::from_bytes([0; 32])
}

impl Default for PeerInfo {
    fn default() -> Self {
        Self {
            name: None,
            public_key: no_key(),
            overlay_ips: Vec::new(),
            allowed_ips: Vec::new(),
            endpoint: None,
            path: PeerPath::default(),
            family: None,
            rtt_ms: None,
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            rx_packets: 0,
            tx_packets: 0,
            handshakes: 0,
            persistent_keepalive: None,
            online: false,
            nat: NatMapping::default(),
            candidates: Vec::new(),
            relay_reason: None,
            routes: Vec::new(),
            learned_routes: Vec::new(),
            addresses_changed_s: None,
        }
    }
}

impl Default for StatusInfo {
    fn default() -> Self {
        Self {
            name: None,
            public_key: no_key(),
            overlay_ips: Vec::new(),
            interface: String::new(),
            mtu: 0,
            listen_port: 0,
            addresses: Vec::new(),
            peers: 0,
            peers_direct: 0,
            peers_relayed: 0,
            peers_offline: 0,
            nat: NatMapping::default(),
            seen_at: Vec::new(),
            rendezvous: None,
            drops: BTreeMap::new(),
            cookie_replies_sent: 0,
            io: IoCounters::default(),
            port_mapping: None,
            port_taken: None,
            advertised_elsewhere: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_version_on_the_wire() {
        let line = serde_json::to_string(&Envelope::new(Request::Peers)).unwrap();
        assert_eq!(line, r#"{"version":1,"request":"peers"}"#);
        let back: Envelope<Request> = serde_json::from_str(&line).unwrap();
        assert_eq!(back.body, Request::Peers);
    }

    #[test]
    fn a_peer_from_an_older_meshd_without_packet_counters_reads_as_zero() {
        let mut v = serde_json::to_value(PeerInfo {
            rx_packets: 5,
            handshakes: 2,
            ..PeerInfo::default()
        })
        .unwrap();
        for field in ["rx_packets", "tx_packets", "handshakes"] {
            v.as_object_mut().unwrap().remove(field);
        }
        let back: PeerInfo = serde_json::from_value(v).unwrap();
        assert_eq!(
            (back.rx_packets, back.tx_packets, back.handshakes),
            (0, 0, 0)
        );
    }

    #[test]
    fn peer_info_has_the_documented_fields() {
        let info = PeerInfo {
            name: Some("a".into()),
            overlay_ips: vec!["100.72.0.2".parse().unwrap()],
            public_key: "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
                .parse()
                .unwrap(),
            allowed_ips: vec!["100.72.0.2/32".parse().unwrap()],
            endpoint: None,
            path: PeerPath::Relay,
            family: None,
            rtt_ms: None,
            last_handshake: Some(3),
            rx_bytes: 1,
            tx_bytes: 2,
            rx_packets: 3,
            tx_packets: 4,
            handshakes: 1,
            persistent_keepalive: None,
            online: true,
            nat: NatMapping::EndpointDependent,
            candidates: vec![],
            relay_reason: Some("both sides are behind endpoint-dependent NAT".into()),
            routes: vec!["10.244.3.0/24".parse().unwrap()],
            learned_routes: vec!["10.245.3.0/24".parse().unwrap()],
            addresses_changed_s: None,
        };
        let v = serde_json::to_value(&info).unwrap();
        for field in [
            "name",
            "public_key",
            "overlay_ips",
            "allowed_ips",
            "endpoint",
            "path",
            "rtt_ms",
            "last_handshake",
            "rx_bytes",
            "tx_bytes",
            "rx_packets",
            "tx_packets",
            "handshakes",
            "online",
            "nat",
            "candidates",
            "relay_reason",
            "routes",
            "learned_routes",
        ] {
            assert!(v.get(field).is_some(), "missing {field}");
        }
        assert!(v["endpoint"].is_null());
        assert_eq!(v["nat"], "endpoint_dependent");
        assert_eq!(v["path"], "relay");
        assert_eq!(v["overlay_ips"][0], "100.72.0.2");
    }

    /// Each word as a JSON string, through serde.
    fn word<T: Serialize>(value: T) -> String {
        serde_json::to_value(value)
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn every_enum_is_written_in_the_words_of_0_2_0_and_reads_back() {
        for path in PeerPath::ALL {
            assert_eq!(word(path), path.to_string());
            assert_eq!(
                serde_json::from_value::<PeerPath>(word(path).into()).unwrap(),
                path
            );
        }
        assert_eq!(PeerPath::ALL.map(word), ["direct", "relay", "none"]);
        let sources = [
            CandidateSource::Advertised,
            CandidateSource::Observed,
            CandidateSource::Local,
            CandidateSource::Learned,
        ];
        assert_eq!(
            sources.map(word),
            ["advertised", "observed", "local", "learned"]
        );
        for source in sources {
            assert_eq!(word(source), source.to_string());
        }
        let punching = [
            HolePunching::Likely,
            HolePunching::Unlikely,
            HolePunching::NotNeeded,
            HolePunching::Unknown,
        ];
        assert_eq!(
            punching.map(word),
            ["likely", "unlikely", "not needed", "unknown"]
        );
        for p in punching {
            assert_eq!(word(p), p.to_string());
            assert_eq!(
                serde_json::from_value::<HolePunching>(word(p).into()).unwrap(),
                p
            );
        }
    }

    #[test]
    fn seen_at_is_written_as_the_address_and_the_observer_in_brackets() {
        let at = |by| SeenAt {
            addr: "203.0.113.41:3947".parse().unwrap(),
            by,
        };
        for (seen, text) in [
            (at(SeenBy::Rendezvous), "203.0.113.41:3947 (rendezvous)"),
            (
                at(SeenBy::Reflector),
                "203.0.113.41:3947 (rendezvous NAT check)",
            ),
            (
                at(SeenBy::Peer("node-b".into())),
                "203.0.113.41:3947 (node-b)",
            ),
            (
                at(SeenBy::Peer("D6poTtKI".into())),
                "203.0.113.41:3947 (D6poTtKI)",
            ),
        ] {
            assert_eq!(word(&seen), text);
            assert_eq!(serde_json::from_value::<SeenAt>(text.into()).unwrap(), seen);
        }
        let v6: SeenAt = "[2001:db8::1]:51820 (node-b)".parse().unwrap();
        assert_eq!(
            v6.addr,
            "[2001:db8::1]:51820".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn a_seen_at_entry_that_is_not_address_and_observer_is_an_error_not_a_panic() {
        for bad in [
            "",
            "203.0.113.41:3947",
            "203.0.113.41:3947 (rendezvous",
            "203.0.113.41:3947 ()",
            "203.0.113.41 (rendezvous)",
            "not an address (node-b)",
            " (",
        ] {
            assert!(bad.parse::<SeenAt>().is_err(), "{bad:?} reads as a SeenAt");
            assert!(serde_json::from_value::<SeenAt>(bad.into()).is_err());
        }
    }
}
