//! The control protocol between meshd and mesh-rendezvous (proto/control.md).
//!
//! Pure: message types and their framing. Messages travel on one
//! bidirectional QUIC stream that the rendezvous opens (it speaks first,
//! and a QUIC stream exists for the peer only once data is sent on it),
//! each as a frame: a 4-byte
//! big-endian length, then that many bytes of UTF-8 JSON. The length is
//! checked against a limit *before* anything is allocated, and the limit is
//! much smaller until the node is admitted.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::digest::MapDigest;
use crate::identity::PublicKey;

/// Bumped on any incompatible change; both hellos carry it.
pub const PROTOCOL_VERSION: u32 = 1;
/// QUIC ALPN of the control protocol.
pub const ALPN: &[u8] = b"meshd/1";
/// ALPN of a link between two servers of one mesh (proto/control.md §14).
pub const LINK_ALPN: &[u8] = b"meshd-link/1";
/// Largest frame before admission: a hello is a few hundred bytes.
pub const MAX_FRAME_UNADMITTED: usize = 16 << 10;
/// Largest frame once admitted: a full peer map of ~10 000 nodes.
pub const MAX_FRAME: usize = 8 << 20;
/// Longest node name accepted (a DNS label is 63; a hostname 253).
pub const MAX_NAME: usize = 253;
/// Most candidate endpoints a node may announce.
pub const MAX_CANDIDATES: usize = 16;
/// Most prefixes a node may advertise.
pub const MAX_ROUTES: usize = 32;
/// Most peers one path report carries (about 80 bytes each: a report of
/// this many stays well inside the rendezvous's 64 KiB frame limit).
pub const MAX_PATH_PEERS: usize = 512;
/// Longest round-trip time a path report may state, in microseconds (60 s).
pub const MAX_RTT_US: u32 = 60_000_000;
/// The feature a `Welcome` names when the server takes `paths` reports
/// (proto/control.md §16). A node sends them to such a server only: one
/// before 0.4.0 ends the session on a message type it does not know.
pub const FEATURE_PATHS: &str = "paths";

/// Server → node, first message on the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHello {
    pub version: u32,
    pub mesh_id: String,
    /// The rendezvous's x25519 static key, for the admission proof.
    pub server_key: PublicKey,
}

/// Node → server, the answer to [`ServerHello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub public_key: PublicKey,
    pub name: String,
    /// The node's WireGuard UDP port (the rendezvous sees the NATed one).
    pub listen_port: u16,
    /// Needed on first contact only; absent once the node is registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Endpoints the node knows for itself: local interface addresses and
    /// the configured public address.
    pub candidates: Vec<Candidate>,
    /// Proof of possession of `public_key`'s private key, bound to this
    /// QUIC connection: see [`admission_proof`](crate::rendezvous::admission).
    pub proof: Proof,
    /// Prefixes behind the node (its pod CIDR) that it asks the mesh to
    /// route to it (proto/control.md §15). Absent from a node before 0.4.0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<IpNet>,
    /// The digest of the peer map the node holds from its last session
    /// ([`MapDigest`]): a server whose map for it has the same digest
    /// welcomes it without one (`peers_unchanged`). Absent on a first
    /// session, and from a node before 0.4.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers_digest: Option<MapDigest>,
}

/// A server → server, first on a link, after the accepting server's
/// `ServerHello`: which server of the mesh connects, and its proof of
/// holding the server key that server announced in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkHello {
    pub version: u32,
    /// The connecting server's name.
    pub server: String,
    pub proof: Proof,
}

/// A MAC over the connection's TLS exporter value, keyed by the static-static DH.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Proof(pub [u8; 32]);

impl std::fmt::Debug for Proof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Proof(..)")
    }
}

impl Serialize for Proof {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Proof {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine as _;
        let s = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)?;
        <[u8; 32]>::try_from(bytes.as_slice())
            .map(Proof)
            .map_err(|_| serde::de::Error::custom("proof must be 32 bytes"))
    }
}

/// Where a node may be reached, and how it was learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Candidate {
    pub addr: SocketAddr,
    pub kind: CandidateKind,
    /// For an `advertised` address that the node's gateway mapped to it
    /// (NAT-PMP, PCP or UPnP IGD): the protocol that did. Absent for a
    /// configured address, and from nodes before 0.4.0; a reader that does
    /// not know the field sees an advertised address, which it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapped: Option<MappingProtocol>,
}

impl Candidate {
    /// A candidate of `kind` learnt any way but port mapping.
    pub fn new(addr: SocketAddr, kind: CandidateKind) -> Self {
        Self {
            addr,
            kind,
            mapped: None,
        }
    }
}

/// The protocol a node's gateway mapped its UDP port with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MappingProtocol {
    /// The Port Control Protocol (RFC 6887).
    Pcp,
    /// NAT Port Mapping Protocol (RFC 6886).
    NatPmp,
    /// UPnP Internet Gateway Device (WANIPConnection's AddPortMapping).
    Upnp,
    /// A word this release does not know (a later release's protocol):
    /// read, never written.
    #[serde(other)]
    Other,
}

impl MappingProtocol {
    /// The word in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pcp => "pcp",
            Self::NatPmp => "nat_pmp",
            Self::Upnp => "upnp",
            Self::Other => "other",
        }
    }
}

impl std::fmt::Display for MappingProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pcp => "PCP",
            Self::NatPmp => "NAT-PMP",
            Self::Upnp => "UPnP IGD",
            Self::Other => "another protocol",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CandidateKind {
    /// Configured with `--advertise-endpoint` (the 1:1 NAT case).
    Advertised,
    /// The source address the rendezvous observed (server-reflexive).
    Observed,
    /// An address on one of the node's interfaces.
    Local,
}

/// One node as the peer map carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub public_key: PublicKey,
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub candidates: Vec<Candidate>,
    /// How the node's NAT maps its socket, as the node last reported it;
    /// left out of the message while unknown.
    #[serde(default, skip_serializing_if = "NatMapping::is_unknown")]
    pub nat: NatMapping,
    /// Prefixes behind the node that the mesh accepted: peers route them to
    /// it and take them as sources from it only. Absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<IpNet>,
}

/// One [`NodeEntry`] as the wire carries it, encoded once (a server
/// encodes each entry when it changes and splices the same JSON into
/// every welcome).
#[derive(Debug, Clone)]
pub struct EncodedEntry(Arc<RawValue>);

impl EncodedEntry {
    /// `entry`'s JSON. `None` only if it cannot be encoded, which a
    /// `NodeEntry` always can.
    pub fn new(entry: &NodeEntry) -> Option<Self> {
        serde_json::value::to_raw_value(entry)
            .ok()
            .map(|raw| Self(Arc::from(raw)))
    }

    /// The JSON, exactly as it goes on the wire.
    pub fn json(&self) -> &str {
        self.0.get()
    }

    /// The entry again; `None` only for JSON that is not an entry, which
    /// [`EncodedEntry::new`] never makes.
    pub fn decode(&self) -> Option<NodeEntry> {
        serde_json::from_str(self.json()).ok()
    }
}

/// A welcome's peer map: the entries as a node decodes them, or as a
/// server sends them, each entry's JSON encoded when it last changed
/// ([`EncodedEntry`]), so that a welcome to one of N nodes costs a copy of
/// the map rather than N encodings. Both are the same JSON array on the
/// wire, and equal when they hold the same entries.
#[derive(Debug, Clone)]
pub enum PeerList {
    Entries(Vec<NodeEntry>),
    Encoded(Vec<EncodedEntry>),
}

impl PeerList {
    pub fn len(&self) -> usize {
        match self {
            Self::Entries(entries) => entries.len(),
            Self::Encoded(encoded) => encoded.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries, decoding the encoded ones.
    pub fn into_entries(self) -> Vec<NodeEntry> {
        match self {
            Self::Entries(entries) => entries,
            Self::Encoded(encoded) => encoded.iter().filter_map(EncodedEntry::decode).collect(),
        }
    }
}

impl Default for PeerList {
    fn default() -> Self {
        Self::Entries(Vec::new())
    }
}

impl From<Vec<NodeEntry>> for PeerList {
    fn from(entries: Vec<NodeEntry>) -> Self {
        Self::Entries(entries)
    }
}

impl FromIterator<NodeEntry> for PeerList {
    fn from_iter<I: IntoIterator<Item = NodeEntry>>(entries: I) -> Self {
        Self::Entries(entries.into_iter().collect())
    }
}

impl PartialEq for PeerList {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Entries(a), Self::Entries(b)) => a == b,
            (Self::Encoded(a), Self::Encoded(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.json() == b.json())
            }
            _ => self.clone().into_entries() == other.clone().into_entries(),
        }
    }
}

impl Eq for PeerList {}

impl Serialize for PeerList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Entries(entries) => entries.serialize(s),
            Self::Encoded(encoded) => s.collect_seq(encoded.iter().map(|e| &*e.0)),
        }
    }
}

impl<'de> Deserialize<'de> for PeerList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<NodeEntry>::deserialize(d).map(Self::Entries)
    }
}

/// What the mesh decided about one prefix a node advertised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteDecision {
    pub prefix: IpNet,
    #[serde(flatten)]
    pub status: RouteStatus,
}

/// Whether an advertised prefix is routed to its node, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RouteStatus {
    /// Peers route it to the node.
    Accepted,
    /// Outside the mesh's routable ranges: waits for
    /// `mesh-rendezvous routes approve NODE PREFIX`.
    AwaitingApproval,
    /// Overlaps the prefix `held` that `node` advertised first (not
    /// `prefix`: that names the decision's own prefix).
    Overlaps { node: String, held: IpNet },
    /// Overlaps the mesh's own overlay prefixes.
    OverlapsMesh,
    /// Not a network address (host bits set) or a default route.
    Invalid,
}

impl RouteStatus {
    /// Plain words for operators.
    pub fn describe(&self) -> String {
        match self {
            RouteStatus::Accepted => "accepted".into(),
            RouteStatus::AwaitingApproval => "outside the mesh's routable ranges: waits for \
                 `mesh-rendezvous routes approve NODE PREFIX`"
                .into(),
            RouteStatus::Overlaps { node, held } => {
                format!("overlaps {held}, which {node} advertised first")
            }
            RouteStatus::OverlapsMesh => "overlaps the mesh's overlay addresses".into(),
            RouteStatus::Invalid => "not a network (host bits set) or a default route".into(),
        }
    }
}

/// How a node's NAT maps its UDP socket to public addresses (RFC 4787
/// §4.1), as the node infers it from where the rendezvous and its peers see
/// it. It decides whether hole punching can work, and `meshctl` uses it to
/// explain why a pair of nodes is relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NatMapping {
    /// Not enough observations yet.
    #[default]
    Unknown,
    /// Seen at an address on its own interface: no NAT at all.
    None,
    /// One public address and port whatever the destination (a "cone"):
    /// peers can reach the address the rendezvous saw.
    EndpointIndependent,
    /// A different public port per destination (a "symmetric" NAT): the
    /// address the rendezvous saw is useless to anyone else.
    EndpointDependent,
}

impl NatMapping {
    pub fn is_unknown(&self) -> bool {
        *self == NatMapping::Unknown
    }

    /// Plain words for operators.
    pub fn describe(self) -> &'static str {
        match self {
            NatMapping::Unknown => "not known yet",
            NatMapping::None => "no NAT (public address on the interface)",
            NatMapping::EndpointIndependent => "endpoint-independent (cone)",
            NatMapping::EndpointDependent => "endpoint-dependent (symmetric)",
        }
    }
}

/// Two nodes behind one NAT that listen on the same UDP port share the
/// public port too: the router keeps it for whichever of them talked to a
/// peer first and gives the other a new port for that peer, on which the
/// peer's own router drops everything. The rendezvous sees one node at the
/// public address and port the other's port needs, and names a free port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortTaken {
    /// The node seen at the public address and port this node needs.
    pub by: String,
    /// A UDP port that no node behind that public address uses.
    pub port: u16,
}

/// The mesh's address plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshInfo {
    pub id: String,
    pub ipv4: Ipv4Net,
    pub ipv6: Ipv6Net,
}

/// Server → node after the hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Admitted: the node's own entry, the mesh, and every other node.
    Welcome {
        node: NodeEntry,
        mesh: MeshInfo,
        observed: SocketAddr,
        peers: PeerList,
        /// Every server of the mesh (`HOST:PORT`), this one first: where
        /// the node goes when this one is lost. Absent from a server
        /// before 0.4.0.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        servers: Vec<String>,
        /// What became of each prefix the node's hello advertised. Absent
        /// when it advertised none.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        routes: Vec<RouteDecision>,
        /// Optional node messages this server takes ([`FEATURE_PATHS`]).
        /// Absent from a server before 0.4.0, which takes none.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
        /// Another node behind the same public address holds the public
        /// port this node's UDP port needs there ([`PortTaken`]). Absent
        /// when none does, and from a server before 0.4.0.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port_taken: Option<Box<PortTaken>>,
        /// `peers` is left empty because the node's hello offered the
        /// digest of exactly the map the server holds for it: the node
        /// keeps the map it has. Absent (false) otherwise, and from a
        /// server before 0.4.0.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        peers_unchanged: bool,
    },
    /// Not admitted; the connection closes after this.
    Rejected {
        reason: RejectReason,
        message: String,
    },
    /// A node joined, reconnected, or changed its candidates.
    PeerUpsert { peer: NodeEntry },
    /// A node was removed from the mesh.
    PeerRemove { public_key: PublicKey },
    /// `peer` cannot reach this node directly and is probing it now: probe
    /// `peer`'s candidates at once, so both NATs open at the same moment.
    Punch { peer: PublicKey },
    /// What the mesh decided about this node's advertised prefixes changed
    /// (an operator approved one, a holder left). Sent only to nodes that
    /// advertised prefixes, so only to nodes that know it.
    Routes { routes: Vec<RouteDecision> },
}

/// Node → server once admitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeMessage {
    /// The node's own candidates changed (an interface address came or went).
    Candidates { candidates: Vec<Candidate> },
    /// This node is probing `peer`; ask `peer` to probe back now.
    Punch { peer: PublicKey },
    /// What this node has learnt of its NAT's mapping behaviour; the
    /// rendezvous passes it on in the node's peer-map entry.
    Nat { mapping: NatMapping },
    /// The path to each peer as this node sees it now, for the operator's
    /// picture of the mesh (`mesh-rendezvous paths`). Sent only to a server
    /// whose `Welcome` names [`FEATURE_PATHS`], when something changed, at
    /// most every few seconds.
    Paths { peers: PathList },
}

/// How a node reaches one peer now (proto/control.md §16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathState {
    /// Straight to an IPv4 endpoint of the peer.
    DirectV4,
    /// Straight to an IPv6 endpoint of the peer.
    DirectV6,
    /// Through the rendezvous's relay.
    Relay,
    /// No path, or no WireGuard handshake within the last 180 s.
    Down,
}

impl PathState {
    pub const ALL: [PathState; 4] = [Self::DirectV4, Self::DirectV6, Self::Relay, Self::Down];

    /// Its word on the wire and in `mesh-rendezvous paths --json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DirectV4 => "direct_v4",
            Self::DirectV6 => "direct_v6",
            Self::Relay => "relay",
            Self::Down => "down",
        }
    }

    pub fn is_direct(self) -> bool {
        matches!(self, Self::DirectV4 | Self::DirectV6)
    }
}

impl fmt::Display for PathState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One peer in a `paths` report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathEntry {
    pub peer: PublicKey,
    pub path: PathState,
    /// The direct path's round-trip time by probes, in microseconds; absent
    /// when not measured (and for the relay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_us: Option<u32>,
}

/// The entries of a `paths` report. An entry this version cannot read (a
/// bad key, a path word it does not know, a wrong type) is skipped and
/// counted in `unreadable`, so one such entry costs the report nothing
/// else; it is written back without them.
#[derive(Debug, Clone, Default)]
pub struct PathList {
    pub entries: Vec<PathEntry>,
    /// Entries skipped while reading.
    pub unreadable: usize,
}

/// Two lists are equal when they say the same: what was skipped while
/// reading one is not part of it (it is not written back either).
impl PartialEq for PathList {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl Eq for PathList {}

impl From<Vec<PathEntry>> for PathList {
    fn from(entries: Vec<PathEntry>) -> Self {
        Self {
            entries,
            unreadable: 0,
        }
    }
}

impl Serialize for PathList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.entries.serialize(s)
    }
}

impl<'de> Deserialize<'de> for PathList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = PathList;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of path entries")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<PathList, A::Error> {
                let mut list = PathList::default();
                // Each element as any JSON value first (bounded by the
                // frame), then as an entry if it is one.
                while let Some(value) = seq.next_element::<serde_json::Value>()? {
                    match PathEntry::deserialize(value) {
                        Ok(entry) => list.entries.push(entry),
                        Err(_) => list.unreadable = list.unreadable.saturating_add(1),
                    }
                }
                Ok(list)
            }
        }
        d.deserialize_seq(Entries)
    }
}

/// Why a node was not admitted. Deliberately coarse: a stranger learns
/// nothing about the mesh from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Protocol versions differ.
    Version,
    /// The proof of key possession did not verify.
    BadProof,
    /// Unknown node and no usable token (missing, wrong, expired, revoked, used up).
    BadToken,
    /// The node was removed from the mesh.
    Removed,
    /// The hello was malformed (name too long, too many candidates…).
    BadHello,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("frame is not a valid message: {0}")]
    Malformed(String),
}

/// Encodes `msg` as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing these plain types cannot fail.
    let body = serde_json::to_vec(msg).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The length a frame header announces, checked against `max`.
pub fn frame_len(header: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes a frame body (without its length header).
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Decodes the first frame in `buf` (header included) and returns the
/// message with the number of bytes it took, so the caller can go on with
/// whatever follows.
///
/// The announced length is checked against `max` before the body is looked
/// at, so an oversized header is [`FrameError::TooLarge`] even when only its
/// four bytes are present. A buffer that ends before the header or the body
/// does is [`FrameError::Malformed`]: this is for a buffer that should hold
/// whole frames (vectors, fuzzing, a datagram); a stream reader uses
/// [`frame_len`] and reads exactly that many bytes instead.
pub fn decode_frame<T: for<'de> Deserialize<'de>>(
    buf: &[u8],
    max: usize,
) -> Result<(T, usize), FrameError> {
    let Some((header, rest)) = buf.split_first_chunk::<4>() else {
        return Err(FrameError::Malformed(format!(
            "truncated header: {} of 4 bytes",
            buf.len()
        )));
    };
    let len = frame_len(*header, max)?;
    let Some(body) = rest.get(..len) else {
        return Err(FrameError::Malformed(format!(
            "truncated body: {} of {len} bytes",
            rest.len()
        )));
    };
    Ok((decode(body)?, 4 + len))
}

/// Why a hello was refused before anything else was looked at.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HelloError {
    /// The node speaks another version (`None`: it names none, or not as a
    /// number). Checked before the rest, so a newer node whose hello this
    /// version cannot read still learns why it is turned away.
    #[error("the node speaks protocol version {theirs:?}, not {PROTOCOL_VERSION}")]
    Version { theirs: Option<u64> },
    /// Not one JSON object, a duplicate key anywhere in it, or not a hello.
    #[error("malformed hello: {0}")]
    Malformed(String),
}

/// Decodes a `Hello` frame body (proto/control.md §5, §6): the version
/// first, then the whole hello, refusing a key that appears twice in any
/// object (serde_json's `Value` would keep the last one silently, so two
/// readers could disagree on what was said).
pub fn decode_hello(body: &[u8]) -> Result<Hello, HelloError> {
    /// Only the version; other fields are skipped unread.
    #[derive(Deserialize)]
    struct VersionOnly {
        #[serde(default)]
        version: Option<serde_json::Value>,
    }
    // serde quotes the peer's text in some errors ("unknown variant …").
    let malformed =
        |e: serde_json::Error| HelloError::Malformed(super::untrusted::bounded(&e.to_string()));
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(HelloError::Malformed("not a JSON object".into()));
    }
    let probe: VersionOnly = serde_json::from_slice(body).map_err(malformed)?;
    let theirs = probe.version.as_ref().and_then(serde_json::Value::as_u64);
    if theirs != Some(u64::from(PROTOCOL_VERSION)) {
        return Err(HelloError::Version { theirs });
    }
    serde_json::from_slice::<UniqueKeys>(body).map_err(malformed)?;
    serde_json::from_slice(body).map_err(malformed)
}

/// Any JSON value, accepted only if no object in it repeats a key. Depth
/// stays within serde_json's recursion limit (128).
struct UniqueKeys;

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueKeysVisitor)
    }
}

struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_i64<E>(self, _: i64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_u64<E>(self, _: u64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_f64<E>(self, _: f64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_str<E>(self, _: &str) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_unit<E>(self) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueKeys, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(UniqueKeys)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
        let mut seen = std::collections::BTreeSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                // The key is the peer's text: only its length goes in the error.
                let len = key.len();
                return Err(serde::de::Error::custom(format!(
                    "a key of {len} bytes appears twice in one object"
                )));
            }
            map.next_value::<UniqueKeys>()?;
            seen.insert(key);
        }
        Ok(UniqueKeys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates() -> NodeMessage {
        NodeMessage::Candidates {
            candidates: vec![Candidate {
                addr: "192.0.2.1:51820".parse().unwrap(),
                kind: CandidateKind::Local,
                mapped: None,
            }],
        }
    }

    #[test]
    fn decode_frame_takes_one_frame_and_says_how_much() {
        let mut buf = encode(&candidates());
        let one = buf.len();
        buf.extend_from_slice(&encode(&candidates()));
        let (msg, used) = decode_frame::<NodeMessage>(&buf, MAX_FRAME_UNADMITTED).unwrap();
        assert_eq!((msg, used), (candidates(), one));
    }

    #[test]
    fn decode_frame_checks_the_limit_before_the_body() {
        let header = (MAX_FRAME_UNADMITTED as u32 + 1).to_be_bytes();
        assert_eq!(
            decode_frame::<NodeMessage>(&header, MAX_FRAME_UNADMITTED),
            Err(FrameError::TooLarge {
                len: MAX_FRAME_UNADMITTED + 1,
                max: MAX_FRAME_UNADMITTED
            })
        );
    }

    #[test]
    fn decode_frame_calls_short_buffers_malformed() {
        let frame = encode(&candidates());
        for end in 0..frame.len() {
            assert!(matches!(
                decode_frame::<NodeMessage>(&frame[..end], MAX_FRAME),
                Err(FrameError::Malformed(_))
            ));
        }
    }

    fn hello_json() -> String {
        let proof = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]);
        let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [9u8; 32]);
        format!(
            r#"{{"version":1,"public_key":"{key}","name":"node-a","listen_port":51820,"candidates":[],"proof":"{proof}"}}"#
        )
    }

    #[test]
    fn a_hello_decodes_with_its_fields() {
        let hello = decode_hello(hello_json().as_bytes()).unwrap();
        assert_eq!(
            (hello.version, hello.name.as_str(), hello.listen_port),
            (1, "node-a", 51820)
        );
    }

    #[test]
    fn a_duplicate_key_is_refused_at_the_top_and_inside_a_candidate() {
        let twice =
            hello_json().replace(r#""name":"node-a","#, r#""name":"node-a","name":"node-b","#);
        assert!(
            matches!(
                decode_hello(twice.as_bytes()),
                Err(HelloError::Malformed(_))
            ),
            "{twice}"
        );
        let candidate = r#"{"addr":"192.0.2.1:1","kind":"local","addr":"192.0.2.9:1"}"#;
        let nested = hello_json().replace(
            r#""candidates":[]"#,
            &format!(r#""candidates":[{candidate}]"#),
        );
        assert!(
            matches!(
                decode_hello(nested.as_bytes()),
                Err(HelloError::Malformed(_))
            ),
            "{nested}"
        );
        let unknown =
            hello_json().replace(r#""version":1,"#, r#""version":1,"extra":1,"extra":2,"#);
        assert!(
            matches!(
                decode_hello(unknown.as_bytes()),
                Err(HelloError::Malformed(_))
            ),
            "{unknown}"
        );
    }

    #[test]
    fn an_unknown_field_once_is_ignored() {
        let newer = hello_json().replace(r#""version":1,"#, r#""version":1,"capabilities":["x"],"#);
        assert!(decode_hello(newer.as_bytes()).is_ok());
    }

    #[test]
    fn the_version_is_read_before_the_rest_of_the_hello() {
        let v2 = r#"{"version":2,"something":"this version cannot read"}"#;
        assert_eq!(
            decode_hello(v2.as_bytes()),
            Err(HelloError::Version { theirs: Some(2) })
        );
        assert_eq!(
            decode_hello(br#"{"name":"x"}"#),
            Err(HelloError::Version { theirs: None })
        );
        assert_eq!(
            decode_hello(br#"{"version":"1"}"#),
            Err(HelloError::Version { theirs: None })
        );
    }

    #[test]
    fn what_is_not_one_json_object_is_malformed() {
        for body in [&b""[..], b"[1]", b"{", b"{} {}", b"\xff", b"null"] {
            assert!(
                matches!(decode_hello(body), Err(HelloError::Malformed(_))),
                "{body:?}"
            );
        }
        let twice = br#"{"version":1,"version":1}"#;
        assert!(matches!(decode_hello(twice), Err(HelloError::Malformed(_))));
    }

    #[test]
    fn a_refusal_does_not_repeat_the_peers_text() {
        let long = "k".repeat(10_000);
        let body = hello_json().replace(
            r#""version":1,"#,
            &format!(r#""version":1,"{long}":1,"{long}":2,"#),
        );
        let Err(HelloError::Malformed(message)) = decode_hello(body.as_bytes()) else {
            panic!("refused")
        };
        assert!(message.len() < 200, "{message}");
    }
}
