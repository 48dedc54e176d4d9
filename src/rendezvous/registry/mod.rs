//! The rendezvous registry: admission, overlay address allocation and
//! peer-map distribution, as a state machine.
//!
//! Pure: no socket, clock, random source or file. The quinn shell feeds it
//! inputs — a node's hello as it arrived ([`IncomingHello`]), its
//! candidates, a disconnect, an operator's request — with the time as `now`
//! and any random token secret as an argument, then drains
//! [`Registry::poll_command`] and executes the [`Command`]s: admit a
//! connection, send a message on one, close one, commit a change to the
//! store. Tests are "this input ⇒ these commands".
//!
//! # The store
//!
//! The registry's state is a replica of the store's records
//! ([`records`]): several servers may share one store (etcd), and the
//! file of a single server is the same records in one document. A change
//! that must be decided once for the whole mesh — a new node's address and
//! name, a token's use, a rename, a removal — is a [`Command::Commit`] of
//! a transaction that holds only if nobody changed what it was decided on;
//! the registry applies it when the shell answers
//! [`Registry::handle_outcome`] with `Committed`, and on a conflict takes
//! the store's current records and decides again. Changes other servers
//! make reach it as [`Registry::handle_store_event`], and its nodes hear
//! of them as they hear of local ones.
//!
//! # Admission
//!
//! The registry is the one place that decides who gets in. The shell hands
//! over what the connection delivered — the decoded hello or why it could
//! not be decoded, the connection's TLS exporter value, the source address —
//! and the registry checks, in this order: the protocol version, the
//! hello's shape, the proof of possession of the key ([`admission`], bound
//! to this connection by the exporter), the name and candidates, a removed
//! key, then for a new node the join token ([`JoinToken`]) and a free
//! address. It answers [`Command::Admitted`] (then the `Welcome`) or a
//! `Rejected` and a close; the shell starts relaying and reading the node's
//! messages only on `Admitted`, and no `Welcome` is ever queued without it.
//!
//! Two joins that race for the last use of a token, or for the same address
//! or name, send transactions that compare the same records; exactly one
//! commits, on one server or across several, and the other is decided
//! again on what the store now holds.
//!
//! # Join tokens
//!
//! A token reads `<id>.<secret>` ([`JoinToken`] has the one format rule):
//! the id names the token in `token list` and `token revoke` and is not
//! secret (like the first half of a kubeadm token); the secret is 32 random
//! bytes in unpadded base64url. Only the SHA-256 of the secret is stored,
//! and a presented secret is compared with it in constant time.
//!
//! # What a member can make the rendezvous do
//!
//! Every message kind an admitted node sends has a rate per connection
//! ([`Limits`]): a message over it is dropped and counted, and a connection
//! that keeps going past a tolerance is closed ([`CloseReason::Flooding`]).
//! A punch is passed on at most at the per-(source, target) rate. A message
//! that changes nothing is neither saved nor broadcast, and what only says
//! where a node is (presence, candidates, NAT) is saved late
//! ([`Command::PersistSoon`], which the shell debounces, then asks for
//! [`Registry::flush`]), while what a node is told must survive a crash (a
//! new node's address, a token's use) is committed before the node hears
//! of it ([`Command::Commit`]). Announced
//! candidates nobody else can use (loopback, link-local, unspecified,
//! multicast, broadcast, inside the mesh's own prefixes) are dropped and
//! counted.
//!
//! # Names and addresses
//!
//! A node's name is a DNS label, bound to its key at first admission and
//! unique in the mesh: a hello's name is made a label (lowercase, the first
//! dot-separated part, other characters as `-`), and a name already taken
//! gets `-2`, `-3`… as Tailscale does; the `Welcome` says which name the
//! node got. A node admitted again keeps its bound name whatever its hello
//! says; only the operator renames ([`Registry::rename_node`]). A removed
//! node's overlay addresses stay quarantined until the operator releases
//! them, so a token holder cannot grind a key onto them.
//!
//! # What a rejected node learns
//!
//! Only a [`ServerMessage::Rejected`] and a close, never mesh information.
//! Token failures share one message whether the id is unknown, the secret
//! wrong, or the token revoked or used up, so a stranger cannot probe which
//! token ids exist. The one exception is "expired", which is said only once
//! the secret has verified: whoever holds the secret was given the token, and
//! telling them to ask for a fresh one is the useful answer.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::admission;
use super::limits::Bucket;
pub use super::limits::{Limits, MessageKind, Rate};
use super::paths::{self as path_matrix, PathMatrix, PathRefusal, PathReport};
use super::store::kv::{Event, KeyValue, Op, Outcome, Revision, Txn};
use super::store::records::{self, Endpoints, Key, NodeIdentity, Presence, ServerRecord, Value};
pub use crate::identity::join_token::MAX_TOKEN_ID;
use crate::identity::JoinToken;
use crate::identity::{PrivateKey, PublicKey};
use crate::ipam;
/// Connections as the shell names them (shared with the relay table).
pub use crate::relay::ConnId;
use crate::wire::control::{
    Candidate, CandidateKind, EncodedEntry, Hello, HelloError, MeshInfo, NatMapping, NodeEntry,
    PathList, PeerList, PortTaken, Proof, RejectReason, RouteDecision, ServerMessage,
    FEATURE_PATHS, MAX_CANDIDATES, MAX_NAME, MAX_ROUTES, PROTOCOL_VERSION,
};
use crate::wire::endpoint::{self, Unusable};
use crate::wire::untrusted::Untrusted;

/// Longest node name: a DNS label (RFC 1035 §2.3.4).
pub const MAX_LABEL: usize = 63;
/// Punch pairs a connection remembers before forgetting those whose bucket
/// is full again (which then hold no information).
const MAX_PUNCH_PAIRS: usize = 256;

/// The time as the shell read it: wall-clock seconds for what is stored
/// (join and last-seen times, token expiry), a monotonic instant for rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub unix: u64,
    pub instant: Instant,
}

/// Everything that must survive a restart of the rendezvous.
///
/// Map keys serialize as strings (public keys in base64), so the JSON form
/// is a plain object per map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryState {
    pub mesh: MeshInfo,
    pub nodes: BTreeMap<PublicKey, NodeRecord>,
    /// By token id.
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Keys removed by an operator; refused forever, token or not.
    pub removed: BTreeSet<PublicKey>,
    /// Removed nodes' overlay addresses, handed to no one until the
    /// operator releases them. Absent in a v0.1.0 file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quarantine: Vec<Quarantined>,
}

impl RegistryState {
    /// A new mesh with no nodes, tokens or removals.
    pub fn new(mesh: MeshInfo) -> Self {
        Self {
            mesh,
            nodes: BTreeMap::new(),
            tokens: BTreeMap::new(),
            removed: BTreeSet::new(),
            quarantine: Vec::new(),
        }
    }

    /// Makes every node's name a DNS label, unique in the mesh, in key
    /// order (the first node keeps a shared name): what a state from
    /// before names were labels and unique (v0.1.0) needs. Whether any
    /// name changed.
    pub fn migrate_names(&mut self) -> bool {
        let mut taken = HashSet::new();
        let mut renamed = Vec::new();
        for (key, record) in &self.nodes {
            let base = dns_label(&record.name);
            let name = unique(&base, |n| taken.contains(n));
            taken.insert(name.clone());
            if name != record.name {
                renamed.push((*key, name));
            }
        }
        for (key, name) in &renamed {
            if let Some(record) = self.nodes.get_mut(key) {
                tracing::warn!(
                    node = %key.short(), old = %Untrusted(&record.name), new = %name,
                    "node name made a unique DNS label; `mesh-rendezvous nodes rename` picks another"
                );
                record.name.clone_from(name);
            }
        }
        !renamed.is_empty()
    }
}

/// A removed node's addresses, held back from new nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub public_key: PublicKey,
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub removed_at: u64,
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    /// Allocated at first admission, then never changed.
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub joined_at: u64,
    /// When the node last said something or disconnected.
    pub last_seen: u64,
    /// Last known candidates, so that peers connecting while this node is
    /// offline still learn where it was last reachable.
    pub candidates: Vec<Candidate>,
    /// The NAT mapping behaviour the node last reported.
    #[serde(default, skip_serializing_if = "NatMapping::is_unknown")]
    pub nat: NatMapping,
    /// The prefixes the node advertises (its pod CIDR), from its last
    /// hello; whether peers route them to it is [`routes::RouteTable`]'s
    /// decision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<AdvertisedRoute>,
    /// Prefixes outside the routable ranges that an operator approved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approved_routes: Vec<IpNet>,
}

/// A prefix a node advertises, and since when (unix seconds, kept while the
/// node keeps advertising it): of two overlapping prefixes the older one is
/// routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertisedRoute {
    pub prefix: IpNet,
    pub since: u64,
}

/// A join token, as stored: the secret itself is never kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    /// Lowercase hex SHA-256 of the 32 secret bytes.
    pub secret_sha256: String,
    pub created_at: u64,
    /// Unusable from this second on.
    pub expires_at: u64,
    /// `None`: any number of joins until it expires.
    pub max_uses: Option<u32>,
    pub uses: u32,
    pub revoked: bool,
    /// A token for a reinstalled node: the new key that joins with it
    /// takes over this node's name and addresses, and this key is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub takes_over: Option<PublicKey>,
}

/// Whether a token can admit a node now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenStatus {
    Usable,
    Expired,
    Revoked,
    UsedUp,
}

impl fmt::Display for TokenStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenStatus::Usable => "usable",
            TokenStatus::Expired => "expired",
            TokenStatus::Revoked => "revoked",
            TokenStatus::UsedUp => "used up",
        })
    }
}

impl TokenRecord {
    /// Revoked wins over expired, expired over used up.
    pub fn status(&self, now_unix: u64) -> TokenStatus {
        if self.revoked {
            TokenStatus::Revoked
        } else if now_unix >= self.expires_at {
            TokenStatus::Expired
        } else if self.max_uses.is_some_and(|max| self.uses >= max) {
            TokenStatus::UsedUp
        } else {
            TokenStatus::Usable
        }
    }
}

/// A node as `nodes list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    pub public_key: PublicKey,
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub online: bool,
    /// The server it is connected to, when online.
    pub server: Option<String>,
    pub joined_at: u64,
    pub last_seen: u64,
    pub candidates: Vec<Candidate>,
}

/// A node's advertised prefixes as `routes list` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRoutes {
    pub public_key: PublicKey,
    pub name: String,
    pub routes: Vec<RouteReport>,
    /// Prefixes an operator approved for it (advertised or not).
    pub approved: Vec<IpNet>,
}

/// One advertised prefix: what became of it, advertised since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteReport {
    #[serde(flatten)]
    pub decision: RouteDecision,
    pub since: u64,
}

/// A node's hello as its connection delivered it: all the registry needs
/// to decide the node's admission.
#[derive(Debug)]
pub struct IncomingHello {
    /// The hello, or why its frame is not one ([`crate::wire::control::decode_hello`]).
    pub hello: Result<Hello, HelloError>,
    /// The connection's TLS exporter value for [`admission::EXPORTER_LABEL`]:
    /// the proof in the hello must have been made for it.
    pub exporter: [u8; 32],
    /// The source address the connection comes from.
    pub observed: SocketAddr,
}

/// What the shell must do, in order.
// Commands are short-lived (queued, then executed at once), so boxing the
// message would cost an allocation each for no lasting saving.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The connection's node is admitted: from now on the shell reads its
    /// messages and relays for it (its relay id is its overlay `ipv4`).
    /// Always queued before the `Welcome` it is told with.
    Admitted {
        conn: ConnId,
        key: PublicKey,
        ipv4: Ipv4Addr,
    },
    /// Send `msg` on the connection's control stream.
    Send { conn: ConnId, msg: ServerMessage },
    /// The peer-map changes since the last [`Registry::flush_deltas`]
    /// (`PeerUpsert`/`PeerRemove`, the latest per node), each for every
    /// node connected here but the one it is about: one write per member
    /// per tick, however many changes the tick had.
    PeerDeltas {
        members: Vec<DeltaMember>,
        deltas: Vec<Delta>,
    },
    /// Close the connection (after sending what was queued for it before).
    Close { conn: ConnId, reason: CloseReason },
    /// Commit `txn` to the store, then answer [`Registry::handle_outcome`]
    /// before executing the commands after it: what follows may depend on
    /// it (a node is told its address only once the address is its own),
    /// and nothing of it is applied before it is committed.
    Commit { id: ProposalId, txn: Txn },
    /// The node with relay id `ipv4` is connected to `server` (another
    /// server of the mesh), or to none but maybe this one (`None`): the
    /// relay reaches it over the link to that server.
    Route {
        ipv4: Ipv4Addr,
        server: Option<String>,
    },
    /// Where nodes are changed in a way a crash may lose without harm
    /// (presence, candidates, NAT: nodes say them again when they
    /// reconnect): call [`Registry::flush`] soon. The shell may debounce
    /// these, so one commit carries a burst of changes.
    PersistSoon,
}

/// One change in a [`Command::PeerDeltas`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The node it is about, which is not sent it.
    pub subject: PublicKey,
    /// When it was made, in the registry's order of changes.
    pub seq: u64,
    pub msg: ServerMessage,
}

/// A node a [`Command::PeerDeltas`] goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaMember {
    pub conn: ConnId,
    pub key: PublicKey,
    /// It was welcomed during the tick, with every change up to this one
    /// in its welcome: those are not sent again.
    pub knows: u64,
}

impl DeltaMember {
    /// Whether `delta` is for this member.
    pub fn wants(&self, delta: &Delta) -> bool {
        delta.subject != self.key && delta.seq > self.knows
    }
}

/// What a server is called when it is the mesh's only one.
pub const DEFAULT_SERVER_NAME: &str = "rendezvous";

/// A transaction the registry asked the shell to commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProposalId(pub u64);

impl fmt::Display for ProposalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// How often a join is decided again after its claims lost a race before
/// the node is told to come back later.
const JOIN_ATTEMPTS: u32 = 3;

/// Writes per transaction at most (etcd refuses more than 128 by default).
pub const MAX_TXN_OPS: usize = 64;

/// A committed write as the event a watcher of the store sees.
fn committed(op: &Op, revision: Revision) -> Event {
    match op {
        Op::Put { key, value, .. } => Event::Put(KeyValue {
            key: key.clone(),
            value: value.clone(),
            revision,
        }),
        Op::Delete { key } => Event::Delete {
            key: key.clone(),
            revision,
        },
    }
}

/// A change to the registry's replica that this server's nodes hear of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Change {
    /// A node was added, renamed, or moved: a `PeerUpsert`.
    Upsert(PublicKey),
    /// A node was removed: a `PeerRemove`, and the node is cut off.
    Removed(PublicKey),
}

/// A commit not answered yet.
#[derive(Debug)]
struct InFlight {
    txn: Txn,
    /// The join it decides, if it is one.
    join: Option<PendingJoin>,
}

/// A node whose admission waits for its claims to commit.
#[derive(Debug)]
struct PendingJoin {
    conn: ConnId,
    hello: Hello,
    observed: SocketAddr,
    now: Now,
    /// Decisions made so far, this one included.
    attempt: u32,
}

/// Why the registry closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The hello was refused; a [`ServerMessage::Rejected`] precedes this.
    Rejected(RejectReason),
    /// The same node connected again; the newer connection wins.
    Superseded,
    /// An operator removed the node.
    Removed,
    /// The node kept sending messages over their rate.
    Flooding,
    /// The node's join lost its race for the store's records too often;
    /// it is to come back later, like after any lost connection.
    Contended,
    /// The server is going away (shutting down or restarting): the node is
    /// to come back after a short jitter, not its backoff.
    GoingAway,
}

impl CloseReason {
    /// A QUIC application error code for the close frame.
    pub fn code(self) -> u32 {
        match self {
            CloseReason::Superseded => 1,
            CloseReason::Removed => 2,
            CloseReason::Flooding => 3,
            CloseReason::Contended => 4,
            CloseReason::GoingAway => 5,
            CloseReason::Rejected(RejectReason::Version) => 10,
            CloseReason::Rejected(RejectReason::BadProof) => 11,
            CloseReason::Rejected(RejectReason::BadToken) => 12,
            CloseReason::Rejected(RejectReason::Removed) => 13,
            CloseReason::Rejected(RejectReason::BadHello) => 14,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Rejected(reason) => write!(f, "rejected ({reason:?})"),
            CloseReason::Superseded => f.write_str("superseded by a newer connection"),
            CloseReason::Removed => f.write_str("node removed"),
            CloseReason::Flooding => f.write_str("too many messages"),
            CloseReason::Contended => f.write_str("the join lost its race for the store; retry"),
            CloseReason::GoingAway => {
                f.write_str("the rendezvous is going away; come back shortly")
            }
        }
    }
}

/// Operator requests the registry refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error(
        "token id {id:?} is invalid: use 1 to {MAX_TOKEN_ID} characters from \
         a-z, A-Z, 0-9, '-' and '_'"
    )]
    InvalidTokenId { id: String },
    #[error("a token with id {id:?} already exists; pick another id or revoke that one")]
    DuplicateTokenId { id: String },
    #[error("a token usable zero times admits no one; leave the use limit unset for unlimited")]
    ZeroUses,
    #[error(
        "{name:?} is not a valid node name: use 1 to {MAX_LABEL} characters from a-z, 0-9 and '-', \
         not starting or ending with '-'"
    )]
    InvalidName { name: String },
    #[error("the name {name:?} belongs to another node; rename or remove that one first")]
    NameTaken { name: String },
    #[error("no registered node has the key {key}")]
    UnknownNode { key: String },
    #[error("{address} is not quarantined (see `addresses list`)")]
    NotQuarantined { address: IpAddr },
    #[error(
        "{prefix} is not a prefix a node can stand behind (host bits set, a default route, \
         loopback, link-local or multicast)"
    )]
    InvalidRoute { prefix: IpNet },
}

/// An admitted connection, with what it may still send.
#[derive(Debug, Clone)]
struct Session {
    key: PublicKey,
    observed: SocketAddr,
    /// Per [`MessageKind`], as [`MessageKind::ALL`].
    buckets: [Bucket; MessageKind::ALL.len()],
    /// Punches towards each target.
    pairs: HashMap<PublicKey, Bucket>,
    /// Messages over their rate this connection may still send.
    tolerance: Bucket,
}

impl Session {
    fn new(key: PublicKey, observed: SocketAddr, limits: &Limits, now: Instant) -> Self {
        Self {
            key,
            observed,
            buckets: MessageKind::ALL.map(|kind| Bucket::full(limits.of(kind), now)),
            pairs: HashMap::new(),
            tolerance: Bucket::full(limits.tolerance, now),
        }
    }
}

/// Why an announced candidate was dropped, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CandidateRefusal {
    /// Port 0.
    PortZero,
    /// `0.0.0.0` or `::`.
    Unspecified,
    /// `127.0.0.0/8` or `::1`: the peer itself.
    Loopback,
    /// `169.254.0.0/16` or `fe80::/10`: meaningless off the link.
    LinkLocal,
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// Inside the mesh's own IPv4 prefix or ULA: a path through the mesh
    /// cannot carry the mesh.
    MeshPrefix,
    /// Announced as `observed`, which only the rendezvous may say.
    ClaimedObserved,
}

impl CandidateRefusal {
    pub const ALL: [CandidateRefusal; 8] = [
        CandidateRefusal::PortZero,
        CandidateRefusal::Unspecified,
        CandidateRefusal::Loopback,
        CandidateRefusal::LinkLocal,
        CandidateRefusal::Multicast,
        CandidateRefusal::Broadcast,
        CandidateRefusal::MeshPrefix,
        CandidateRefusal::ClaimedObserved,
    ];

    /// A stable name for metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            CandidateRefusal::PortZero => "port_zero",
            CandidateRefusal::Unspecified => "unspecified",
            CandidateRefusal::Loopback => "loopback",
            CandidateRefusal::LinkLocal => "link_local",
            CandidateRefusal::Multicast => "multicast",
            CandidateRefusal::Broadcast => "broadcast",
            CandidateRefusal::MeshPrefix => "mesh_prefix",
            CandidateRefusal::ClaimedObserved => "claimed_observed",
        }
    }

    fn index(self) -> usize {
        match self {
            CandidateRefusal::PortZero => 0,
            CandidateRefusal::Unspecified => 1,
            CandidateRefusal::Loopback => 2,
            CandidateRefusal::LinkLocal => 3,
            CandidateRefusal::Multicast => 4,
            CandidateRefusal::Broadcast => 5,
            CandidateRefusal::MeshPrefix => 6,
            CandidateRefusal::ClaimedObserved => 7,
        }
    }
}

/// What the registry counted since it was made; for metrics, not persisted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Messages dropped for being over their kind's rate, as [`MessageKind::ALL`].
    over_rate: [u64; MessageKind::ALL.len()],
    /// Punches dropped by the per-(source, target) rate.
    pub punch_pair_limited: u64,
    /// Connections closed as [`CloseReason::Flooding`].
    pub closed_flooding: u64,
    /// Joins closed as [`CloseReason::Contended`].
    pub joins_contended: u64,
    /// Welcomes that named a [`PortTaken`].
    pub ports_taken: u64,
    /// Node connections that moved to a new address.
    pub migrations: u64,
    /// Welcomes sent without the peer map: the node offered the digest of
    /// the one it holds, and it was this server's.
    pub welcomes_unchanged: u64,
    /// Announced candidates dropped, as [`CandidateRefusal::ALL`].
    refused: [u64; CandidateRefusal::ALL.len()],
    /// Entries of path reports dropped, as [`PathRefusal::ALL`].
    path_entries: [u64; PathRefusal::ALL.len()],
}

impl Counters {
    /// Messages dropped for being over their rate, by kind.
    pub fn over_rate(&self) -> impl Iterator<Item = (MessageKind, u64)> + '_ {
        MessageKind::ALL
            .iter()
            .copied()
            .zip(self.over_rate.iter().copied())
    }

    /// Announced candidates dropped, by reason.
    pub fn candidates_refused(&self) -> impl Iterator<Item = (CandidateRefusal, u64)> + '_ {
        CandidateRefusal::ALL
            .iter()
            .copied()
            .zip(self.refused.iter().copied())
    }

    /// Entries of path reports dropped (or their RTT), by reason.
    pub fn path_entries_dropped(&self) -> impl Iterator<Item = (PathRefusal, u64)> + '_ {
        PathRefusal::ALL
            .iter()
            .copied()
            .zip(self.path_entries.iter().copied())
    }

    fn refuse(&mut self, why: CandidateRefusal) {
        if let Some(count) = self.refused.get_mut(why.index()) {
            *count = count.saturating_add(1);
        }
    }

    fn limit(&mut self, kind: MessageKind) {
        if let Some(count) = self.over_rate.get_mut(kind_index(kind)) {
            *count = count.saturating_add(1);
        }
    }
}

fn kind_index(kind: MessageKind) -> usize {
    match kind {
        MessageKind::Candidates => 0,
        MessageKind::Nat => 1,
        MessageKind::Punch => 2,
        MessageKind::Paths => 3,
    }
}

/// Why a hello was refused, for the node and for the log.
struct Refusal {
    reason: RejectReason,
    message: String,
    /// The precise cause, logged but not sent.
    cause: String,
    /// The node's short key, for the log; `-` when the hello was unreadable.
    key: String,
}

impl Refusal {
    fn new(reason: RejectReason, message: impl Into<String>, cause: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            cause: cause.into(),
            key: "-".into(),
        }
    }

    fn of(mut self, key: &PublicKey) -> Self {
        self.key = key.short();
        self
    }
}

/// The refusal of a hello of another protocol version (`None`: it names
/// none a number can say): both versions, so the operator knows which side
/// to upgrade (proto/control.md §6).
fn refuse_version(theirs: Option<u64>) -> Refusal {
    let theirs = theirs.map_or_else(|| "names none".to_owned(), |v| v.to_string());
    Refusal::new(
        RejectReason::Version,
        format!(
            "this rendezvous speaks protocol version {PROTOCOL_VERSION}, the node {theirs}; \
             upgrade the older side"
        ),
        format!("version {theirs}"),
    )
}

/// The refusal of a hello frame that is not one.
fn refuse_undecodable(error: &HelloError) -> Refusal {
    match error {
        HelloError::Version { theirs } => refuse_version(*theirs),
        // Bounded already: the decoder quotes no more of the peer's text.
        HelloError::Malformed(_) => {
            Refusal::new(RejectReason::BadHello, "malformed hello", error.to_string())
        }
    }
}

const TOKEN_MISSING: &str =
    "this node is not registered: join with a token from `mesh-rendezvous token create`";
const TOKEN_REFUSED: &str = "join token not accepted (unknown, wrong, revoked or used up); \
     ask the operator for a new one";
const TOKEN_EXPIRED: &str = "join token expired; ask the operator for a new one";

/// The registry state machine. See the module docs.
#[derive(Debug)]
pub struct Registry {
    state: RegistryState,
    /// The rendezvous's static key: the other half of every admission proof.
    server_key: PrivateKey,
    /// Admitted connections only; a rejected one leaves no trace.
    sessions: HashMap<ConnId, Session>,
    /// Each online node's current connection.
    online: BTreeMap<PublicKey, ConnId>,
    /// This server's name among the mesh's servers.
    server_name: String,
    /// Nodes connected to another server, and which.
    elsewhere: HashMap<PublicKey, String>,
    /// Where nodes reach this server, once announced.
    public_addr: Option<String>,
    /// The mesh's running servers (this one included once announced), by
    /// name: where each is reached.
    servers: BTreeMap<String, ServerRecord>,
    commands: VecDeque<Command>,
    /// The store revision each record was last written at, as far as this
    /// replica knows: what a change compares to say "nobody changed it
    /// since". Deleted records keep theirs, so a late event cannot bring
    /// them back.
    revisions: HashMap<String, Revision>,
    /// Who holds each name and address (nodes, and removed nodes whose
    /// addresses are quarantined).
    claims: HashMap<Key, PublicKey>,
    /// Commits sent and not answered yet.
    in_flight: HashMap<ProposalId, InFlight>,
    next_proposal: u64,
    /// Nodes whose endpoints changed since the last [`Registry::flush`].
    dirty: BTreeSet<PublicKey>,
    /// Whether this server holds its session with the store: without it,
    /// it admits no one (its claims could not be decided) and keeps no
    /// node (its presence is gone from the store).
    store_up: bool,
    /// The server is shutting down ([`Registry::handle_shutdown`]): no
    /// one is admitted any more.
    going_away: bool,
    /// Peer-map changes not yet sent: the latest per node they are about
    /// (a `PeerUpsert` or a `PeerRemove`). See [`Registry::flush_deltas`].
    deltas: BTreeMap<PublicKey, (u64, ServerMessage)>,
    /// The number of the latest peer-map change.
    delta_seq: u64,
    /// Connections welcomed since the last flush, with the latest change
    /// their welcome included.
    welcomed_in_tick: HashMap<ConnId, u64>,
    /// What the nodes were told of each node, encoded and as digests: made
    /// at the first welcome, then kept by every change announced.
    told: Option<Told>,
    /// A [`Command::PersistSoon`] is queued and not yet polled: one is
    /// enough.
    persist_soon_queued: bool,
    /// Hellos refused since this registry was made, indexed as
    /// [`REJECT_REASONS`]; for metrics, not persisted.
    rejections: [u64; REJECT_REASONS.len()],
    limits: Limits,
    counters: Counters,
    /// Where advertised prefixes may be routed without approval (the same
    /// on every server of the mesh).
    routable: Vec<IpNet>,
    /// What became of every node's advertised prefixes.
    routes: RouteTable,
    /// Records that routes are decided on changed since they were last
    /// decided.
    routes_stale: bool,
    /// The latest path report of each node connected here (memory only:
    /// see [`path_matrix`]).
    path_reports: BTreeMap<PublicKey, PathReport>,
}

/// Every [`RejectReason`], in the order metrics list them.
pub const REJECT_REASONS: [RejectReason; 5] = [
    RejectReason::Version,
    RejectReason::BadProof,
    RejectReason::BadToken,
    RejectReason::Removed,
    RejectReason::BadHello,
];

/// Where `reason` is in [`REJECT_REASONS`].
fn reject_index(reason: RejectReason) -> usize {
    match reason {
        RejectReason::Version => 0,
        RejectReason::BadProof => 1,
        RejectReason::BadToken => 2,
        RejectReason::Removed => 3,
        RejectReason::BadHello => 4,
    }
}

impl Registry {
    /// A registry over loaded (or fresh) state with the default
    /// [`Limits`]; every node starts offline. Its records are taken to be
    /// at revision 1, as [`MemoryKv::with_entries`] stores them.
    /// `server_key` is the rendezvous's static key, which nodes prove
    /// theirs against.
    ///
    /// [`MemoryKv::with_entries`]: super::store::kv::MemoryKv::with_entries
    pub fn new(state: RegistryState, server_key: PrivateKey) -> Self {
        Self::with_limits(state, server_key, Limits::default())
    }

    /// [`Registry::new`] with other rates.
    pub fn with_limits(state: RegistryState, server_key: PrivateKey, limits: Limits) -> Self {
        let records = records::records(&state);
        let revisions = records.iter().map(|(key, _)| (key.path(), 1)).collect();
        let claims = records
            .into_iter()
            .filter_map(|(key, value)| match value {
                Value::Holder(holder) => Some((key, holder)),
                _ => None,
            })
            .collect();
        Self {
            state,
            server_key,
            sessions: HashMap::new(),
            online: BTreeMap::new(),
            server_name: DEFAULT_SERVER_NAME.to_owned(),
            elsewhere: HashMap::new(),
            public_addr: None,
            servers: BTreeMap::new(),
            commands: VecDeque::new(),
            revisions,
            claims,
            in_flight: HashMap::new(),
            next_proposal: 0,
            dirty: BTreeSet::new(),
            store_up: true,
            going_away: false,
            deltas: BTreeMap::new(),
            delta_seq: 0,
            welcomed_in_tick: HashMap::new(),
            told: None,
            persist_soon_queued: false,
            rejections: [0; REJECT_REASONS.len()],
            limits,
            counters: Counters::default(),
            routable: Vec::new(),
            routes: RouteTable::default(),
            routes_stale: false,
            path_reports: BTreeMap::new(),
        }
        .with_routes_decided()
    }

    fn with_routes_decided(mut self) -> Self {
        self.routes = RouteTable::decide(&self.state.nodes, &self.state.mesh, &self.routable);
        self
    }

    /// The ranges advertised prefixes may be routed in without an
    /// operator's approval (`[routes] routable` in rendezvous.toml; the
    /// same on every server, or servers decide differently).
    pub fn set_routable(&mut self, ranges: Vec<IpNet>) {
        self.routable = ranges;
        self.redecide_routes(None);
    }

    /// Decides every advertised prefix again: nodes whose routed prefixes
    /// changed are announced to their peers, and this server's nodes whose
    /// decisions changed hear of them (but `welcoming`, whose `Welcome`
    /// carries them).
    fn redecide_routes(&mut self, welcoming: Option<PublicKey>) {
        let table = RouteTable::decide(&self.state.nodes, &self.state.mesh, &self.routable);
        let changes = self.routes.changes(&table);
        if changes == routes::RouteChanges::default() {
            return;
        }
        self.routes = table;
        for key in changes.decisions {
            if Some(key) == welcoming {
                continue;
            }
            if let Some(conn) = self.online.get(&key).copied() {
                let routes = self.routes.decisions(&key).to_vec();
                self.push(Command::Send {
                    conn,
                    msg: ServerMessage::Routes { routes },
                });
            }
        }
        let announce = changes
            .accepted
            .into_iter()
            .filter(|key| Some(*key) != welcoming)
            .map(Change::Upsert)
            .collect();
        self.announce(announce);
    }

    /// Every node's advertised prefixes, what became of each, and since
    /// when it was advertised: `mesh-rendezvous routes list`.
    pub fn route_report(&self) -> Vec<NodeRoutes> {
        self.state
            .nodes
            .iter()
            .filter(|(_, r)| !r.routes.is_empty() || !r.approved_routes.is_empty())
            .map(|(key, record)| NodeRoutes {
                public_key: *key,
                name: record.name.clone(),
                routes: record
                    .routes
                    .iter()
                    .zip(self.routes.decisions(key))
                    .map(|(advertised, decision)| RouteReport {
                        since: advertised.since,
                        decision: decision.clone(),
                    })
                    .collect(),
                approved: record.approved_routes.clone(),
            })
            .collect()
    }

    /// Approves (or with `approve: false` withdraws the approval of) a
    /// prefix outside the routable ranges for one node; the node's peers
    /// route it once committed, if no older prefix overlaps it.
    pub fn approve_route(
        &mut self,
        key: &PublicKey,
        prefix: IpNet,
        approve: bool,
    ) -> Result<(), RegistryError> {
        if routes::is_invalid(&prefix) {
            return Err(RegistryError::InvalidRoute { prefix });
        }
        let Some(record) = self.state.nodes.get(key) else {
            return Err(RegistryError::UnknownNode {
                key: key.to_string(),
            });
        };
        let mut identity = NodeIdentity::of(record);
        identity.approved_routes.retain(|p| *p != prefix);
        if approve {
            identity.approved_routes.push(prefix);
            identity.approved_routes.sort_unstable();
        }
        if identity.approved_routes == record.approved_routes {
            return Ok(());
        }
        tracing::info!(node = %key.short(), name = %record.name, %prefix, approve, "route approval changed");
        let node = Key::Node(*key);
        let txn = Txn::new()
            .unchanged(node.path(), self.revision(&node))
            .put(node.path(), records::encode(&Value::Node(identity)));
        self.propose(txn, None);
        Ok(())
    }

    /// Names this server among the mesh's servers (in presence records and
    /// `nodes list`).
    pub fn set_server_name(&mut self, name: impl Into<String>) {
        self.server_name = name.into();
    }

    /// Announces this server in the store (on its lease): nodes of every
    /// server learn where it is reached, `public_addr`, at their next
    /// `Welcome`.
    pub fn announce_server(&mut self, public_addr: &str, now_unix: u64) {
        self.public_addr = Some(public_addr.to_owned());
        let record = ServerRecord {
            public_addr: public_addr.to_owned(),
            since: now_unix,
            server_key: Some(self.server_key.public_key()),
        };
        self.servers
            .insert(self.server_name.clone(), record.clone());
        let txn = Txn::new().put_leased(
            Key::Server(self.server_name.clone()).path(),
            records::encode(&Value::Server(record)),
        );
        self.propose(txn, None);
    }

    /// The mesh's running servers by name, and where each is reached.
    pub fn server_list(&self) -> Vec<(String, String)> {
        self.servers
            .iter()
            .map(|(name, record)| (name.clone(), record.public_addr.clone()))
            .collect()
    }

    /// Every running server's key, by name.
    pub fn server_keys(&self) -> BTreeMap<String, PublicKey> {
        self.servers
            .iter()
            .filter_map(|(name, r)| Some((name.clone(), r.server_key?)))
            .collect()
    }

    /// This server's name.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// The other running servers this one keeps a link to (those whose
    /// name sorts after its own: of two servers, the first connects), with
    /// where each is reached and its key.
    pub fn link_targets(&self) -> Vec<(String, String, PublicKey)> {
        self.servers
            .iter()
            .filter(|(name, _)| **name > self.server_name)
            .filter_map(|(name, r)| Some((name.clone(), r.public_addr.clone(), r.server_key?)))
            .collect()
    }

    /// Whether `proof` on a link's connection (its TLS `exporter`) was made
    /// by the holder of the key running server `server` announced.
    pub fn verify_link(&self, server: &str, exporter: &[u8; 32], proof: &Proof) -> bool {
        let Some(key) = self.servers.get(server).and_then(|r| r.server_key) else {
            return false;
        };
        server != self.server_name && admission::verify(&self.server_key, &key, exporter, proof)
    }

    /// Where each node connected to another server is: its relay id (its
    /// overlay IPv4) and that server's name.
    pub fn routes(&self) -> Vec<(Ipv4Addr, String)> {
        self.elsewhere
            .iter()
            .filter_map(|(key, server)| Some((self.state.nodes.get(key)?.ipv4, server.clone())))
            .collect()
    }

    /// Where nodes reach the mesh's servers, this one first.
    pub fn servers(&self) -> Vec<String> {
        let own = self.servers.get(&self.server_name);
        own.into_iter()
            .chain(
                self.servers
                    .iter()
                    .filter(|(name, _)| **name != self.server_name)
                    .map(|(_, record)| record),
            )
            .map(|record| record.public_addr.clone())
            .collect()
    }

    /// A registry over the records a shared store holds, at their
    /// revisions.
    pub fn from_records(
        records: &[super::store::kv::KeyValue],
        server_key: PrivateKey,
        limits: Limits,
    ) -> Result<Self, records::StateError> {
        let state = records::state_from(
            records
                .iter()
                .map(|kv| (kv.key.as_str(), kv.value.as_slice())),
        )?;
        let mut registry = Self::with_limits(state, server_key, limits);
        registry.revisions = records
            .iter()
            .map(|kv| (kv.key.clone(), kv.revision))
            .collect();
        registry.claims = records
            .iter()
            .filter_map(|kv| {
                let key = Key::parse(&kv.key)?;
                match records::decode(&key, &kv.value).ok()? {
                    Value::Holder(holder) => Some((key, holder)),
                    _ => None,
                }
            })
            .collect();
        registry.servers = records
            .iter()
            .filter_map(|kv| {
                let key @ Key::Server(_) = Key::parse(&kv.key)? else {
                    return None;
                };
                match (
                    key,
                    records::decode(&Key::Server(String::new()), &kv.value).ok()?,
                ) {
                    (Key::Server(name), Value::Server(s)) => Some((name, s)),
                    _ => None,
                }
            })
            .collect();
        registry.elsewhere = records
            .iter()
            .filter_map(|kv| {
                let Key::Presence(key) = Key::parse(&kv.key)? else {
                    return None;
                };
                match records::decode(&Key::Presence(key), &kv.value).ok()? {
                    Value::Presence(p) => Some((key, p.server)),
                    _ => None,
                }
            })
            .collect();
        Ok(registry)
    }

    /// Everything to persist.
    pub fn state(&self) -> &RegistryState {
        &self.state
    }

    /// A node's hello on `conn`, as the connection delivered it: decides
    /// the node's admission (see the module docs).
    ///
    /// Queues either a `Rejected` and a close, or — a known node —
    /// [`Command::Admitted`], the `Welcome` for `conn`, and a `PeerUpsert`
    /// for every other online node, or — a new node — the
    /// [`Command::Commit`] of its claims (address, name, the token's use),
    /// after which [`Registry::handle_outcome`] goes on. An older
    /// connection of the same node is closed as superseded. A second hello
    /// on a connection is ignored.
    pub fn handle_hello(&mut self, conn: ConnId, incoming: IncomingHello, now: Now) {
        if self.sessions.contains_key(&conn) || self.joining(conn) {
            tracing::debug!(%conn, "second hello on a connection ignored");
            return;
        }
        if self.going_away {
            self.push(Command::Close {
                conn,
                reason: CloseReason::GoingAway,
            });
            return;
        }
        if !self.store_up {
            tracing::debug!(%conn, "hello while the store is out of reach; the node is to retry");
            self.push(Command::Close {
                conn,
                reason: CloseReason::Contended,
            });
            return;
        }
        let IncomingHello {
            hello,
            exporter,
            observed,
        } = incoming;
        let checked = hello.map_err(|e| refuse_undecodable(&e)).and_then(|hello| {
            match self.check_hello(&hello, &exporter) {
                Ok(()) => Ok(hello),
                Err(refusal) => Err(refusal.of(&hello.public_key)),
            }
        });
        match checked {
            Ok(hello) => self.decide(PendingJoin {
                conn,
                hello,
                observed: canonical(observed),
                now,
                attempt: 1,
            }),
            Err(refusal) => self.reject(conn, refusal),
        }
    }

    /// Whether a join on `conn` waits for its commit.
    fn joining(&self, conn: ConnId) -> bool {
        self.in_flight
            .values()
            .any(|f| f.join.as_ref().is_some_and(|j| j.conn == conn))
    }

    /// Decides a checked hello on what the replica holds now: refused,
    /// known (welcomed at once), or new (its claims go to the store).
    fn decide(&mut self, join: PendingJoin) {
        let key = join.hello.public_key;
        match self.standing(&join.hello, join.observed, join.now.unix) {
            Err(refusal) => self.reject(join.conn, refusal.of(&key)),
            Ok(None) => self.welcome(join.conn, &join.hello, join.observed, false, join.now),
            Ok(Some(txn)) => self.propose(txn, Some(join)),
        }
    }

    fn reject(&mut self, conn: ConnId, refusal: Refusal) {
        tracing::info!(%conn, node = %refusal.key, cause = %refusal.cause, "hello rejected");
        self.count_rejection(refusal.reason);
        self.push(Command::Send {
            conn,
            msg: ServerMessage::Rejected {
                reason: refusal.reason,
                message: refusal.message,
            },
        });
        self.push(Command::Close {
            conn,
            reason: CloseReason::Rejected(refusal.reason),
        });
    }

    /// An admitted node goes online on `conn`: its record says where it is
    /// now, an older connection is superseded, and it is told the mesh.
    /// `joined`: its record was just committed (with its candidates).
    fn welcome(
        &mut self,
        conn: ConnId,
        hello: &Hello,
        observed: SocketAddr,
        joined: bool,
        now: Now,
    ) {
        let key = hello.public_key;
        // What every member was last told of this node: its entry as the
        // record says before this hello (each change is sent as it happens).
        let told = (!joined)
            .then(|| self.state.nodes.get(&key))
            .flatten()
            .map(|record| node_entry(&key, record, &self.routes));
        let candidates = (!joined).then(|| self.merge_candidates(&hello.candidates, observed));
        let Some(record) = self.state.nodes.get_mut(&key) else {
            return;
        };
        if let Some(candidates) = candidates {
            record.candidates = candidates;
        }
        record.last_seen = now.unix;
        let advertised = advertised_routes(&record.routes, &hello.routes, now.unix);
        let routes_changed = advertised != record.routes;
        record.routes = advertised;
        if joined {
            tracing::info!(
                node = %key.short(), name = %record.name, ipv4 = %record.ipv4,
                ipv6 = %record.ipv6, "node joined"
            );
            if record.name != hello.name {
                tracing::info!(node = %key.short(), asked = %Untrusted(&hello.name), name = %record.name, "node name adjusted");
            }
        } else if record.name != dns_label(&hello.name) {
            tracing::debug!(
                node = %key.short(), asked = %Untrusted(&hello.name), name = %record.name,
                "a known node keeps its bound name"
            );
        }
        if routes_changed {
            self.redecide_routes(Some(key));
        }
        let Some(record) = self.state.nodes.get(&key) else {
            return;
        };
        let entry = node_entry(&key, record, &self.routes);

        if let Some(old) = self.online.insert(key, conn) {
            self.sessions.remove(&old);
            tracing::debug!(node = %key.short(), %old, new = %conn, "connection superseded");
            self.push(Command::Close {
                conn: old,
                reason: CloseReason::Superseded,
            });
        }
        self.sessions
            .insert(conn, Session::new(key, observed, &self.limits, now.instant));
        if !joined || routes_changed {
            self.touch(key);
        }
        self.elsewhere.remove(&key);
        let presence = Presence {
            server: self.server_name.clone(),
            since: now.unix,
        };
        let txn = Txn::new().put_leased(
            Key::Presence(key).path(),
            records::encode(&Value::Presence(presence)),
        );
        self.propose(txn, None);
        self.push(Command::Admitted {
            conn,
            key,
            ipv4: entry.ipv4,
        });

        // A node back with the map this server holds for it (a restart's
        // nodes, a lost session) is not sent it again: at thousands of
        // nodes the maps are what a restart would spend its time on.
        let peers_unchanged = hello
            .peers_digest
            .is_some_and(|offered| offered == self.told().digest_without(&key));
        let peers = if peers_unchanged {
            self.counters.welcomes_unchanged = self.counters.welcomes_unchanged.saturating_add(1);
            PeerList::default()
        } else {
            self.welcome_peers(&key)
        };
        let port_taken = self.port_taken(&key, observed, hello.listen_port);
        if let Some(taken) = &port_taken {
            tracing::info!(
                node = %key.short(), name = %entry.name, %observed, by = %taken.by,
                suggested = taken.port,
                "another node behind the same NAT holds this node's port"
            );
            self.counters.ports_taken = self.counters.ports_taken.saturating_add(1);
        }
        // Its welcome has every change so far: the tick's are not sent
        // to it again.
        self.welcomed_in_tick.insert(conn, self.delta_seq);
        self.push(Command::Send {
            conn,
            msg: ServerMessage::Welcome {
                node: entry.clone(),
                mesh: self.state.mesh.clone(),
                observed,
                peers,
                servers: self.servers(),
                routes: self.routes.decisions(&key).to_vec(),
                features: vec![FEATURE_PATHS.to_owned()],
                port_taken: port_taken.map(Box::new),
                peers_unchanged,
            },
        });
        // A node back with nothing new (a restarted server's nodes coming
        // back, a reconnect after a lost session) costs its peers nothing:
        // they keep its entry while it is away.
        if told.as_ref() != Some(&entry) {
            self.announce_delta(ServerMessage::PeerUpsert { peer: entry });
        }
    }

    /// Sends `txn` to the store; `join` goes on once it is answered.
    fn propose(&mut self, txn: Txn, join: Option<PendingJoin>) {
        let id = ProposalId(self.next_proposal);
        self.next_proposal = self.next_proposal.wrapping_add(1);
        self.in_flight.insert(
            id,
            InFlight {
                txn: txn.clone(),
                join,
            },
        );
        self.push(Command::Commit { id, txn });
    }

    /// The store's answer to [`Command::Commit`] `id`. Committed: the
    /// change is applied and this server's nodes hear of it (a joining node
    /// is welcomed). Otherwise nothing of it is applied; `fresh` is what
    /// the store holds now under the keys it touched (a key that is absent
    /// as a delete at the read's revision), and a join is decided again on
    /// that — up to [`JOIN_ATTEMPTS`] times, then the node is told to come
    /// back later ([`CloseReason::Contended`]).
    pub fn handle_outcome(&mut self, id: ProposalId, outcome: Outcome, fresh: &[Event]) {
        let Some(InFlight { txn, join }) = self.in_flight.remove(&id) else {
            tracing::debug!(%id, "outcome of an unknown commit ignored");
            return;
        };
        match outcome {
            Outcome::Committed { revision } => {
                let mut changes: Vec<Change> = txn
                    .ops
                    .iter()
                    .filter_map(|op| self.apply_event(&committed(op, revision)))
                    .collect();
                if let Some(join) = join {
                    let key = join.hello.public_key;
                    // The welcome tells the others itself, after what else
                    // changed (a node taken over leaves before its
                    // successor, with its addresses, arrives).
                    changes.retain(|c| *c != Change::Upsert(key));
                    self.announce(changes);
                    self.redecide_routes_if_stale();
                    self.welcome(join.conn, &join.hello, join.observed, true, join.now);
                } else {
                    self.announce(changes);
                    self.redecide_routes_if_stale();
                }
            }
            Outcome::Conflict | Outcome::Malformed | Outcome::Unavailable => {
                if outcome == Outcome::Malformed {
                    tracing::error!(%id, ?txn, "the store refused a malformed transaction");
                }
                let changes = fresh.iter().filter_map(|e| self.apply_event(e)).collect();
                self.announce(changes);
                self.redecide_routes_if_stale();
                let Some(mut join) = join else {
                    return;
                };
                if join.attempt >= JOIN_ATTEMPTS || outcome != Outcome::Conflict {
                    tracing::info!(
                        conn = %join.conn, node = %join.hello.public_key.short(),
                        attempts = join.attempt,
                        "join lost its race for the store's records; the node is to retry"
                    );
                    self.counters.joins_contended = self.counters.joins_contended.saturating_add(1);
                    self.push(Command::Close {
                        conn: join.conn,
                        reason: CloseReason::Contended,
                    });
                } else {
                    join.attempt += 1;
                    self.decide(join);
                }
            }
        }
    }

    /// This server lost its session with the store (its lease ended, so
    /// the store no longer says its nodes are here): every node connected
    /// here is closed to go to a server that has one, and no one is
    /// admitted until [`Registry::handle_store_back`].
    pub fn handle_store_lost(&mut self) {
        if !self.store_up {
            return;
        }
        self.store_up = false;
        tracing::warn!(
            nodes = self.online.len(),
            "lost the session with the store: closing every node's connection, admitting no one"
        );
        self.close_every_session(CloseReason::Contended);
    }

    /// The server is going away (SIGTERM: a shutdown or a restart): every
    /// node connected here is closed with [`CloseReason::GoingAway`], which
    /// tells it to come back shortly, and no one is admitted any more. Its
    /// presence is not written away node by node (thousands of commits on
    /// the way out): a single server's presence is not saved, and on etcd
    /// it goes with this server's lease. Persist with [`Registry::flush`]
    /// after this, once.
    pub fn handle_shutdown(&mut self) {
        if self.going_away {
            return;
        }
        self.going_away = true;
        tracing::info!(
            nodes = self.online.len(),
            "going away: closing every node's session (they come back shortly)"
        );
        self.close_every_session(CloseReason::GoingAway);
    }

    /// Closes every node connected here with `reason`; none is online here
    /// any more.
    fn close_every_session(&mut self, reason: CloseReason) {
        let conns: Vec<ConnId> = self.online.values().copied().collect();
        self.online.clear();
        self.sessions.clear();
        for conn in conns {
            self.push(Command::Close { conn, reason });
        }
    }

    /// The session with the store is back: nodes are admitted again, and
    /// this server is announced again (its record went with its lease).
    pub fn handle_store_back(&mut self, now_unix: u64) {
        if self.store_up {
            return;
        }
        tracing::info!("the store is back: admitting nodes again");
        self.store_up = true;
        if let Some(addr) = self.public_addr.clone() {
            self.announce_server(&addr, now_unix);
        }
    }

    /// Whether this server holds its session with the store.
    pub fn store_up(&self) -> bool {
        self.store_up
    }

    /// A fresh read of every record (after the store forgot the history a
    /// watch needed): the replica becomes what the store holds at
    /// `revision`, and this server's nodes hear of what changed.
    pub fn handle_snapshot(&mut self, records: &[KeyValue], revision: Revision) {
        let present: HashSet<&str> = records.iter().map(|kv| kv.key.as_str()).collect();
        let mut events: Vec<Event> = records.iter().cloned().map(Event::Put).collect();
        // What the replica holds and the store no longer does.
        let mut gone: Vec<String> = records::records(&self.state)
            .into_iter()
            .map(|(key, _)| key.path())
            .chain(self.elsewhere.keys().map(|k| Key::Presence(*k).path()))
            .chain(
                self.servers
                    .keys()
                    .map(|name| Key::Server(name.clone()).path()),
            )
            .filter(|path| !present.contains(path.as_str()))
            .collect();
        gone.sort_unstable();
        gone.dedup();
        events.extend(gone.into_iter().map(|key| Event::Delete { key, revision }));
        self.handle_store_events(&events);
    }

    /// Changes another server made to the store (the shell watches it), in
    /// revision order: the replica follows, and this server's nodes hear of
    /// what concerns them. Events this replica has seen already (its own
    /// commits among them) change nothing.
    pub fn handle_store_events(&mut self, events: &[Event]) {
        let changes = events.iter().filter_map(|e| self.apply_event(e)).collect();
        self.announce(changes);
        self.redecide_routes_if_stale();
    }

    /// After records that routes are decided on changed (a node's
    /// prefixes or approvals, a node gone).
    fn redecide_routes_if_stale(&mut self) {
        if std::mem::take(&mut self.routes_stale) {
            self.redecide_routes(None);
        }
    }

    /// Applies one record's new value (or its deletion) to the replica.
    fn apply_event(&mut self, event: &Event) -> Option<Change> {
        let path = event.key();
        let revision = event.revision();
        if self
            .revisions
            .get(path)
            .is_some_and(|known| *known >= revision)
        {
            return None;
        }
        self.revisions.insert(path.to_owned(), revision);
        let key = Key::parse(path)?;
        let value = match event {
            Event::Put(kv) => match records::decode(&key, &kv.value) {
                Ok(value) => Some(value),
                Err(e) => {
                    tracing::warn!(error = %e, "store record ignored");
                    return None;
                }
            },
            Event::Delete { .. } => None,
        };
        self.apply_value(key, value)
    }

    fn apply_value(&mut self, key: Key, value: Option<Value>) -> Option<Change> {
        match (key, value) {
            (Key::Node(k), Some(Value::Node(identity))) => match self.state.nodes.get_mut(&k) {
                Some(record) if NodeIdentity::of(record) == identity => None,
                Some(record) => {
                    if record.approved_routes != identity.approved_routes {
                        record.approved_routes = identity.approved_routes;
                        self.routes_stale = true;
                    }
                    // The name orders nothing, but `Overlaps` names holders.
                    self.routes_stale |= record.name != identity.name && !record.routes.is_empty();
                    let renamed = record.name != identity.name
                        || record.ipv4 != identity.ipv4
                        || record.ipv6 != identity.ipv6
                        || record.joined_at != identity.joined_at;
                    record.name = identity.name;
                    record.ipv4 = identity.ipv4;
                    record.ipv6 = identity.ipv6;
                    record.joined_at = identity.joined_at;
                    renamed.then_some(Change::Upsert(k))
                }
                None => {
                    self.routes_stale |= !identity.approved_routes.is_empty();
                    let record = records::node_record(identity, None);
                    self.state.nodes.insert(k, record);
                    Some(Change::Upsert(k))
                }
            },
            (Key::Node(k), None) => {
                let record = self.state.nodes.remove(&k)?;
                self.routes_stale |= !record.routes.is_empty();
                Some(Change::Removed(k))
            }
            (Key::Endpoints(k), Some(Value::Endpoints(at))) => {
                // Where a node connected here is, this server knows best.
                if self.online.contains_key(&k) {
                    return None;
                }
                let record = self.state.nodes.get_mut(&k)?;
                let moved = record.candidates != at.candidates || record.nat != at.nat;
                if record.routes != at.routes {
                    record.routes = at.routes;
                    self.routes_stale = true;
                }
                record.candidates = at.candidates;
                record.nat = at.nat;
                record.last_seen = record.last_seen.max(at.last_seen);
                moved.then_some(Change::Upsert(k))
            }
            (key @ (Key::Name(_) | Key::Address(_)), Some(Value::Holder(holder))) => {
                self.claims.insert(key, holder);
                None
            }
            (key @ (Key::Name(_) | Key::Address(_)), None) => {
                self.claims.remove(&key);
                None
            }
            (Key::Token(id), Some(Value::Token(token))) => {
                self.state.tokens.insert(id, token);
                None
            }
            (Key::Token(id), None) => {
                self.state.tokens.remove(&id);
                None
            }
            (Key::Removed(k), Some(_)) => {
                self.state.removed.insert(k);
                None
            }
            (Key::Removed(k), None) => {
                self.state.removed.remove(&k);
                None
            }
            (Key::Quarantine(ip), Some(Value::Quarantine(q))) => {
                self.state.quarantine.retain(|held| held.ipv4 != ip);
                self.state.quarantine.push(q);
                self.state
                    .quarantine
                    .sort_by_key(|q| (q.removed_at, q.ipv4));
                None
            }
            (Key::Quarantine(ip), None) => {
                self.state.quarantine.retain(|held| held.ipv4 != ip);
                None
            }
            (Key::Presence(k), Some(Value::Presence(p))) => {
                if p.server == self.server_name {
                    return None;
                }
                // The node connected to another server: that one has it now.
                if let Some(conn) = self.online.remove(&k) {
                    tracing::debug!(node = %k.short(), server = %p.server, %conn, "node moved to another server");
                    self.sessions.remove(&conn);
                    self.push(Command::Close {
                        conn,
                        reason: CloseReason::Superseded,
                    });
                }
                if let Some(record) = self.state.nodes.get(&k) {
                    self.push(Command::Route {
                        ipv4: record.ipv4,
                        server: Some(p.server.clone()),
                    });
                }
                self.elsewhere.insert(k, p.server);
                None
            }
            (Key::Presence(k), None) => {
                if self.elsewhere.remove(&k).is_some() {
                    if let Some(record) = self.state.nodes.get(&k) {
                        self.push(Command::Route {
                            ipv4: record.ipv4,
                            server: None,
                        });
                    }
                }
                None
            }
            (Key::Server(name), Some(Value::Server(record))) => {
                self.servers.insert(name, record);
                None
            }
            (Key::Server(name), None) => {
                if name != self.server_name {
                    self.servers.remove(&name);
                }
                None
            }
            // The mesh never changes; endpoints of a removed node go with
            // it; `decode` gives each key its own kind of value.
            _ => None,
        }
    }

    /// Tells this server's nodes what changed, once per node.
    fn announce(&mut self, changes: Vec<Change>) {
        let mut seen = HashSet::new();
        for change in changes {
            if !seen.insert(change) {
                continue;
            }
            match change {
                Change::Upsert(key) => {
                    let Some(record) = self.state.nodes.get(&key) else {
                        continue;
                    };
                    let msg = ServerMessage::PeerUpsert {
                        peer: node_entry(&key, record, &self.routes),
                    };
                    self.announce_delta(msg);
                }
                Change::Removed(key) => self.cut_off(key),
            }
        }
    }

    /// A removed node: cut off if it is connected here, and gone from every
    /// other node's peer map.
    fn cut_off(&mut self, key: PublicKey) {
        self.dirty.remove(&key);
        if let Some(conn) = self.online.remove(&key) {
            self.sessions.remove(&conn);
            self.push(Command::Send {
                conn,
                msg: ServerMessage::Rejected {
                    reason: RejectReason::Removed,
                    message: "this node was removed from the mesh".into(),
                },
            });
            self.push(Command::Close {
                conn,
                reason: CloseReason::Removed,
            });
        }
        self.announce_delta(ServerMessage::PeerRemove { public_key: key });
    }

    /// The revision this replica last saw `key` written at (0: never,
    /// which no stored record has, so a compare on it fails and the store
    /// is read again).
    fn revision(&self, key: &Key) -> Revision {
        self.revisions.get(&key.path()).copied().unwrap_or(0)
    }

    /// Where `key` is changed: saved with the next [`Registry::flush`].
    fn touch(&mut self, key: PublicKey) {
        self.dirty.insert(key);
        self.persist_soon();
    }

    /// Commits where the nodes changed since the last flush are (their
    /// endpoints records), in transactions of at most [`MAX_TXN_OPS`]
    /// writes. Call when a [`Command::PersistSoon`] comes due and before
    /// the shell stops.
    pub fn flush(&mut self) {
        let dirty: Vec<PublicKey> = std::mem::take(&mut self.dirty).into_iter().collect();
        for chunk in dirty.chunks(MAX_TXN_OPS) {
            let mut txn = Txn::new();
            for key in chunk {
                if let Some(record) = self.state.nodes.get(key) {
                    let value = records::encode(&Value::Endpoints(Endpoints::of(record)));
                    txn = txn.put(Key::Endpoints(*key).path(), value);
                }
            }
            if !txn.ops.is_empty() {
                self.propose(txn, None);
            }
        }
    }

    /// An admitted node's new candidate list. Ignored from a connection
    /// that is not admitted, over the rate ([`Limits::candidates`]), and
    /// when the list is longer than [`MAX_CANDIDATES`]. A change is saved
    /// soon and sent to every other online node; the same list again
    /// changes nothing.
    pub fn handle_candidates(&mut self, conn: ConnId, candidates: Vec<Candidate>, now: Now) {
        if !self.within_rate(conn, MessageKind::Candidates, now) {
            return;
        }
        let Some(session) = self.sessions.get(&conn) else {
            return;
        };
        let (key, observed) = (session.key, session.observed);
        if candidates.len() > MAX_CANDIDATES {
            tracing::debug!(%conn, count = candidates.len(), "too many candidates; ignored");
            return;
        }
        let merged = self.merge_candidates(&candidates, observed);
        let Some(record) = self.state.nodes.get_mut(&key) else {
            return;
        };
        record.last_seen = now.unix;
        if merged == record.candidates {
            return;
        }
        record.candidates = merged;
        let entry = node_entry(&key, record, &self.routes);
        self.touch(key);
        self.announce_delta(ServerMessage::PeerUpsert { peer: entry });
    }

    /// An admitted node's QUIC connection moved to another address (its
    /// router got a new public address, or the node a new network): the
    /// observed candidate follows, is saved soon, and every other online
    /// node hears it as a peer-map change, so that peers probe the new
    /// address while the relay bridges the gap. quinn validates a new
    /// path before it moves a connection there, so `observed` answered
    /// from where it claims to be. Ignored for a connection not admitted.
    pub fn handle_migrated(&mut self, conn: ConnId, observed: SocketAddr, now: Now) {
        let observed = canonical(observed);
        let Some(session) = self.sessions.get_mut(&conn) else {
            return;
        };
        if session.observed == observed {
            return;
        }
        let (key, from) = (session.key, session.observed);
        session.observed = observed;
        let Some(record) = self.state.nodes.get_mut(&key) else {
            return;
        };
        tracing::info!(node = %key.short(), name = %record.name, %from, to = %observed, "node's connection moved to a new address");
        self.counters.migrations = self.counters.migrations.saturating_add(1);
        let announced: Vec<Candidate> = record
            .candidates
            .iter()
            .filter(|c| c.kind != CandidateKind::Observed)
            .cloned()
            .collect();
        let merged = self.merge_candidates(&announced, observed);
        let Some(record) = self.state.nodes.get_mut(&key) else {
            return;
        };
        record.last_seen = now.unix;
        record.candidates = merged;
        let entry = node_entry(&key, record, &self.routes);
        self.touch(key);
        self.announce_delta(ServerMessage::PeerUpsert { peer: entry });
    }

    /// An admitted node reports its NAT's mapping behaviour. Within the rate
    /// ([`Limits::nat`]), a change is saved soon and sent to every other
    /// online node, like candidates.
    pub fn handle_nat(&mut self, conn: ConnId, mapping: NatMapping, now: Now) {
        if !self.within_rate(conn, MessageKind::Nat, now) {
            return;
        }
        let Some(key) = self.sessions.get(&conn).map(|s| s.key) else {
            return;
        };
        let Some(record) = self.state.nodes.get_mut(&key) else {
            return;
        };
        record.last_seen = now.unix;
        if record.nat == mapping {
            return;
        }
        record.nat = mapping;
        let entry = node_entry(&key, record, &self.routes);
        self.touch(key);
        self.announce_delta(ServerMessage::PeerUpsert { peer: entry });
    }

    /// An admitted node asks `peer` to probe it now (hole punching). Passed
    /// on only between two online members, within the connection's punch
    /// rate ([`Limits::punch`]) and the pair's ([`Limits::punch_pair`]):
    /// each punch makes `peer` probe every candidate of the requester.
    /// Anything else is ignored.
    pub fn handle_punch(&mut self, conn: ConnId, peer: &PublicKey, now: Now) {
        if !self.within_rate(conn, MessageKind::Punch, now) {
            return;
        }
        let rate = self.limits.punch_pair;
        let Some(session) = self.sessions.get_mut(&conn) else {
            return;
        };
        if session.key == *peer {
            return;
        }
        let Some(&target) = self.online.get(peer) else {
            return;
        };
        if session.pairs.len() >= MAX_PUNCH_PAIRS {
            session
                .pairs
                .retain(|_, bucket| !bucket.is_full(rate, now.instant));
        }
        let bucket = session
            .pairs
            .entry(*peer)
            .or_insert_with(|| Bucket::full(rate, now.instant));
        if !bucket.take(rate, now.instant) {
            tracing::debug!(%conn, peer = %peer.short(), "punch over the pair's rate; dropped");
            self.counters.punch_pair_limited = self.counters.punch_pair_limited.saturating_add(1);
            return;
        }
        let from = session.key;
        self.push(Command::Send {
            conn: target,
            msg: ServerMessage::Punch { peer: from },
        });
    }

    /// An admitted node's paths to its peers. Within the rate
    /// ([`Limits::paths`]), the report is checked ([`path_matrix::check`]:
    /// members only, once each, at most
    /// [`MAX_PATH_PEERS`](crate::wire::control::MAX_PATH_PEERS), what does
    /// not pass dropped and counted) and replaces the node's previous one,
    /// in memory only; nothing is saved or sent on.
    pub fn handle_paths(&mut self, conn: ConnId, peers: PathList, now: Now) {
        if !self.within_rate(conn, MessageKind::Paths, now) {
            return;
        }
        let Some(key) = self.sessions.get(&conn).map(|s| s.key) else {
            return;
        };
        let nodes = &self.state.nodes;
        let peers = path_matrix::check(
            &key,
            peers,
            |k| nodes.contains_key(k),
            &mut self.counters.path_entries,
        );
        self.path_reports.insert(
            key,
            PathReport {
                at: now.unix,
                peers,
            },
        );
    }

    /// The mesh's paths as the reports of the nodes connected here say.
    pub fn path_matrix(&self) -> PathMatrix {
        path_matrix::assemble(&self.server_name, &self.nodes(), &self.path_reports)
    }

    /// The shell's connection ended (for any reason, including one this
    /// registry asked for). An admitted node goes offline; its peers keep
    /// its last candidates, so nothing is broadcast.
    pub fn handle_disconnect(&mut self, conn: ConnId, now: Now) {
        // A join still waiting for its commit completes without a
        // welcome: its claims hold, and the node comes back as known.
        for flight in self.in_flight.values_mut() {
            if flight.join.as_ref().is_some_and(|j| j.conn == conn) {
                flight.join = None;
            }
        }
        let Some(session) = self.sessions.remove(&conn) else {
            return;
        };
        if self.online.get(&session.key) == Some(&conn) {
            self.online.remove(&session.key);
            // What it said is stale from now on; its next session reports again.
            self.path_reports.remove(&session.key);
            // Unless another server has the node by now.
            let presence = Key::Presence(session.key);
            let txn = Txn::new()
                .unchanged(presence.path(), self.revision(&presence))
                .delete(presence.path());
            self.propose(txn, None);
        }
        if let Some(record) = self.state.nodes.get_mut(&session.key) {
            record.last_seen = now.unix;
            self.touch(session.key);
        }
    }

    /// Spends one message of `kind` from `conn`'s budget. `false` (and the
    /// message is to be dropped) when the connection is not admitted or
    /// over the rate; past the tolerance the connection is closed too.
    fn within_rate(&mut self, conn: ConnId, kind: MessageKind, now: Now) -> bool {
        let (rate, tolerance) = (self.limits.of(kind), self.limits.tolerance);
        let Some(session) = self.sessions.get_mut(&conn) else {
            tracing::trace!(%conn, %kind, "message from a connection that is not admitted");
            return false;
        };
        let Some(bucket) = session.buckets.get_mut(kind_index(kind)) else {
            return false;
        };
        if bucket.take(rate, now.instant) {
            return true;
        }
        self.counters.limit(kind);
        if session.tolerance.take(tolerance, now.instant) {
            tracing::debug!(%conn, %kind, "message over its rate; dropped");
            return false;
        }
        tracing::warn!(
            %conn, node = %session.key.short(), %kind,
            "node keeps sending messages over their rate; closing its connection"
        );
        self.counters.closed_flooding = self.counters.closed_flooding.saturating_add(1);
        self.handle_disconnect(conn, now);
        self.push(Command::Close {
            conn,
            reason: CloseReason::Flooding,
        });
        false
    }

    /// Removes a node for good: its record goes, its key is refused from now
    /// on, every online node gets a `PeerRemove`, and the node itself, if
    /// online, a `Rejected { Removed }` and a close — once the removal is
    /// committed. Its addresses stay quarantined
    /// ([`Registry::release_address`]) unless `release`. `false` (and
    /// nothing queued) if `key` is not a registered node.
    pub fn remove_node(&mut self, key: &PublicKey, release: bool, now_unix: u64) -> bool {
        let Some(record) = self.state.nodes.get(key) else {
            return false;
        };
        let node = Key::Node(*key);
        let mut txn = Txn::new()
            .unchanged(node.path(), self.revision(&node))
            .delete(node.path())
            .delete(Key::Endpoints(*key).path())
            .put(Key::Removed(*key).path(), records::encode(&Value::Removed));
        let name = Key::Name(record.name.clone());
        if self.claims.get(&name) == Some(key) {
            txn = txn.delete(name.path());
        }
        let (v4, v6) = (
            Key::Address(record.ipv4.into()),
            Key::Address(record.ipv6.into()),
        );
        if release {
            txn = txn.delete(v4.path()).delete(v6.path());
        } else {
            let held = Quarantined {
                public_key: *key,
                name: record.name.clone(),
                ipv4: record.ipv4,
                ipv6: record.ipv6,
                removed_at: now_unix,
            };
            txn = txn.put(
                Key::Quarantine(record.ipv4).path(),
                records::encode(&Value::Quarantine(held)),
            );
        }
        self.propose(txn, None);
        true
    }

    /// Removed nodes' addresses that no new node gets, oldest removal first.
    pub fn quarantined(&self) -> &[Quarantined] {
        &self.state.quarantine
    }

    /// Hands a quarantined address (IPv4 or IPv6) back to the pool, with
    /// the other address of the same removed node, once committed.
    pub fn release_address(&mut self, address: IpAddr) -> Result<Quarantined, RegistryError> {
        let held = self.state.quarantine.iter().find(|q| match address {
            IpAddr::V4(v4) => q.ipv4 == v4,
            IpAddr::V6(v6) => q.ipv6 == v6,
        });
        let Some(held) = held.cloned() else {
            return Err(RegistryError::NotQuarantined { address });
        };
        let txn = self.release(&held, Txn::new());
        self.propose(txn, None);
        Ok(held)
    }

    /// Releases every quarantined address; how many removed nodes' worth.
    pub fn release_all_addresses(&mut self) -> usize {
        let held = self.state.quarantine.clone();
        // Three writes each.
        for chunk in held.chunks(MAX_TXN_OPS / 3) {
            let txn = chunk.iter().fold(Txn::new(), |txn, q| self.release(q, txn));
            self.propose(txn, None);
        }
        held.len()
    }

    /// `txn` and the release of `held`'s addresses.
    fn release(&self, held: &Quarantined, txn: Txn) -> Txn {
        let quarantine = Key::Quarantine(held.ipv4);
        txn.unchanged(quarantine.path(), self.revision(&quarantine))
            .delete(quarantine.path())
            .delete(Key::Address(held.ipv4.into()).path())
            .delete(Key::Address(held.ipv6.into()).path())
    }

    /// Gives a node another name: a DNS label no other node has. The node's
    /// peers hear of it once it is committed, the node itself at its next
    /// `Welcome`.
    pub fn rename_node(&mut self, key: &PublicKey, name: &str) -> Result<(), RegistryError> {
        if !is_dns_label(name) {
            return Err(RegistryError::InvalidName {
                name: name.to_owned(),
            });
        }
        let claim = Key::Name(name.to_owned());
        if self.claims.get(&claim).is_some_and(|holder| holder != key) {
            return Err(RegistryError::NameTaken {
                name: name.to_owned(),
            });
        }
        let Some(record) = self.state.nodes.get(key) else {
            return Err(RegistryError::UnknownNode {
                key: key.to_string(),
            });
        };
        if record.name == name {
            return Ok(());
        }
        tracing::info!(node = %key.short(), old = %record.name, new = %name, "node renamed");
        let node = Key::Node(*key);
        let identity = NodeIdentity {
            name: name.to_owned(),
            ..NodeIdentity::of(record)
        };
        let old = Key::Name(record.name.clone());
        let mut txn = Txn::new()
            .unchanged(node.path(), self.revision(&node))
            .absent(claim.path())
            .put(node.path(), records::encode(&Value::Node(identity)))
            .put(claim.path(), records::encode(&Value::Holder(*key)));
        if self.claims.get(&old) == Some(key) {
            txn = txn.delete(old.path());
        }
        self.propose(txn, None);
        Ok(())
    }

    /// Creates a join token and returns it in full (`<id>.<secret>`, the
    /// only time the secret exists outside the caller; its `Debug` hides
    /// it); it is usable once committed. `secret` must come from a
    /// cryptographic random source; `id` is public, 1 to [`MAX_TOKEN_ID`]
    /// of `[A-Za-z0-9_-]`. Valid for `ttl_secs` from `now_unix`, for at
    /// most `max_uses` joins (`None`: unlimited).
    pub fn create_token(
        &mut self,
        secret: [u8; 32],
        id: String,
        ttl_secs: u64,
        max_uses: Option<u32>,
        now_unix: u64,
    ) -> Result<JoinToken, RegistryError> {
        self.new_token(secret, id, ttl_secs, max_uses, None, now_unix)
    }

    fn new_token(
        &mut self,
        secret: [u8; 32],
        id: String,
        ttl_secs: u64,
        max_uses: Option<u32>,
        takes_over: Option<PublicKey>,
        now_unix: u64,
    ) -> Result<JoinToken, RegistryError> {
        let Some(token) = JoinToken::new(&id, &secret) else {
            return Err(RegistryError::InvalidTokenId { id });
        };
        if self.state.tokens.contains_key(&id) {
            return Err(RegistryError::DuplicateTokenId { id });
        }
        if max_uses == Some(0) {
            return Err(RegistryError::ZeroUses);
        }
        let record = TokenRecord {
            id: id.clone(),
            secret_sha256: sha256_hex(&secret),
            created_at: now_unix,
            expires_at: now_unix.saturating_add(ttl_secs),
            max_uses,
            uses: 0,
            revoked: false,
            takes_over,
        };
        let path = Key::Token(id).path();
        let txn = Txn::new()
            .absent(path.clone())
            .put(path, records::encode(&Value::Token(record)));
        self.propose(txn, None);
        Ok(token)
    }

    /// [`Registry::create_token`] for one join by a new key that takes over
    /// `node` (a rebuilt machine): the new key gets its name and overlay
    /// addresses, and `node`'s key is removed, so kubelet, etcd and
    /// certificates that know the old addresses keep working.
    pub fn create_takeover_token(
        &mut self,
        secret: [u8; 32],
        id: String,
        ttl_secs: u64,
        node: PublicKey,
        now_unix: u64,
    ) -> Result<JoinToken, RegistryError> {
        if !self.state.nodes.contains_key(&node) {
            return Err(RegistryError::UnknownNode {
                key: node.to_string(),
            });
        }
        self.new_token(secret, id, ttl_secs, Some(1), Some(node), now_unix)
    }

    /// Revokes a token (once committed); `false` if no token has this id.
    /// Nodes that joined with it stay.
    pub fn revoke_token(&mut self, id: &str) -> bool {
        let Some(token) = self.state.tokens.get(id) else {
            return false;
        };
        if !token.revoked {
            let revoked = TokenRecord {
                revoked: true,
                ..token.clone()
            };
            let key = Key::Token(id.to_owned());
            let txn = Txn::new()
                .unchanged(key.path(), self.revision(&key))
                .put(key.path(), records::encode(&Value::Token(revoked)));
            self.propose(txn, None);
        }
        true
    }

    /// All tokens, by id; [`TokenRecord::status`] says which are usable.
    pub fn tokens(&self) -> impl Iterator<Item = &TokenRecord> + '_ {
        self.state.tokens.values()
    }

    /// All registered nodes, by public key, with whether each is online.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        self.state
            .nodes
            .iter()
            .map(|(key, r)| NodeStatus {
                public_key: *key,
                name: r.name.clone(),
                ipv4: r.ipv4,
                ipv6: r.ipv6,
                online: self.online.contains_key(key) || self.elsewhere.contains_key(key),
                server: if self.online.contains_key(key) {
                    Some(self.server_name.clone())
                } else {
                    self.elsewhere.get(key).cloned()
                },
                joined_at: r.joined_at,
                last_seen: r.last_seen,
                candidates: r.candidates.clone(),
            })
            .collect()
    }

    /// Counts a hello refused for `reason`. The registry counts its own
    /// refusals; the shell reports the one it makes before there is a
    /// hello to hand over (a frame over the size limit), so that one place
    /// has them all.
    pub fn count_rejection(&mut self, reason: RejectReason) {
        if let Some(count) = self.rejections.get_mut(reject_index(reason)) {
            *count = count.saturating_add(1);
        }
    }

    /// Hellos refused since this registry was made, for every reason.
    pub fn rejections(&self) -> impl Iterator<Item = (RejectReason, u64)> + '_ {
        REJECT_REASONS
            .iter()
            .zip(&self.rejections)
            .map(|(reason, count)| (*reason, *count))
    }

    /// Rate limits and refused candidates, counted since this registry was made.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The nodes with a session here: what a flush of peer-map changes
    /// writes to.
    pub fn members(&self) -> usize {
        self.online.len()
    }

    /// Whether `key` has an admitted connection now.
    pub fn is_online(&self, key: &PublicKey) -> bool {
        self.online.contains_key(key)
    }

    /// The next thing for the shell to do. Call after every `handle_*`,
    /// `remove_node`, `create_token` and `revoke_token` until it returns
    /// `None`, executing commands in the order returned.
    pub fn poll_command(&mut self) -> Option<Command> {
        let cmd = self.commands.pop_front()?;
        match cmd {
            Command::PersistSoon => self.persist_soon_queued = false,
            Command::Admitted { .. }
            | Command::Send { .. }
            | Command::PeerDeltas { .. }
            | Command::Close { .. }
            | Command::Route { .. }
            | Command::Commit { .. } => {}
        }
        Some(cmd)
    }

    /// Everything about the hello itself, before any state is looked at.
    fn check_hello(&self, hello: &Hello, exporter: &[u8; 32]) -> Result<(), Refusal> {
        if hello.version != PROTOCOL_VERSION {
            return Err(refuse_version(Some(u64::from(hello.version))));
        }
        if !admission::verify(&self.server_key, &hello.public_key, exporter, &hello.proof) {
            return Err(Refusal::new(
                RejectReason::BadProof,
                "this node cannot prove it holds its key",
                "admission proof failed",
            ));
        }
        if let Err(problem) = check_name(&hello.name) {
            return Err(Refusal::new(
                RejectReason::BadHello,
                problem.clone(),
                problem,
            ));
        }
        if hello.routes.len() > MAX_ROUTES {
            let problem = format!(
                "{} routes advertised; at most {MAX_ROUTES} are accepted",
                hello.routes.len()
            );
            return Err(Refusal::new(
                RejectReason::BadHello,
                problem.clone(),
                problem,
            ));
        }
        if hello.candidates.len() > MAX_CANDIDATES {
            let problem = format!(
                "{} candidates announced; at most {MAX_CANDIDATES} are accepted",
                hello.candidates.len()
            );
            return Err(Refusal::new(
                RejectReason::BadHello,
                problem.clone(),
                problem,
            ));
        }
        Ok(())
    }

    /// The key's standing: removed, known (`None`), or new with a usable
    /// token, a free address and a name: then the transaction that claims
    /// them, with the node's record and the token's use.
    fn standing(
        &mut self,
        hello: &Hello,
        observed: SocketAddr,
        now_unix: u64,
    ) -> Result<Option<Txn>, Refusal> {
        let key = hello.public_key;
        if self.state.removed.contains(&key) {
            return Err(Refusal::new(
                RejectReason::Removed,
                "this node was removed from the mesh; to join again, generate a new key \
                 and use a new join token",
                "removed key",
            ));
        }
        if self.state.nodes.contains_key(&key) {
            // Known node: no token needed, and one sent anyway is not spent.
            return Ok(None);
        }

        let token = self.check_token(hello.token.as_deref(), now_unix)?;
        if let Some(old) = token.takes_over {
            return self
                .take_over(hello, old, token, observed, now_unix)
                .map(Some);
        }
        let (ipv4, ipv6) = self.allocate(&key)?;
        let name = unique(&dns_label(&hello.name), |n| {
            self.claims.contains_key(&Key::Name(n.to_owned()))
        });
        let candidates = self.merge_candidates(&hello.candidates, observed);
        let identity = NodeIdentity {
            name: name.clone(),
            ipv4,
            ipv6,
            joined_at: now_unix,
            approved_routes: Vec::new(),
        };
        let at = Endpoints {
            last_seen: now_unix,
            candidates,
            nat: NatMapping::Unknown,
            routes: Vec::new(),
        };
        let token_key = Key::Token(token.id.clone());
        let spent = TokenRecord {
            uses: token.uses.saturating_add(1),
            ..token
        };
        let holder = records::encode(&Value::Holder(key));
        let (node, removed) = (Key::Node(key), Key::Removed(key));
        let (v4, v6) = (Key::Address(ipv4.into()), Key::Address(ipv6.into()));
        let name = Key::Name(name);
        let txn = Txn::new()
            .absent(node.path())
            .absent(removed.path())
            .absent(name.path())
            .absent(v4.path())
            .absent(v6.path())
            .unchanged(token_key.path(), self.revision(&token_key))
            .put(node.path(), records::encode(&Value::Node(identity)))
            .put(
                Key::Endpoints(key).path(),
                records::encode(&Value::Endpoints(at)),
            )
            .put(name.path(), holder.clone())
            .put(v4.path(), holder.clone())
            .put(v6.path(), holder)
            .put(token_key.path(), records::encode(&Value::Token(spent)));
        Ok(Some(txn))
    }

    /// The transaction of a new key joining with a token for a node it
    /// takes over: the node's name and addresses pass to the new key, and
    /// the old key is removed, in one commit.
    fn take_over(
        &mut self,
        hello: &Hello,
        old: PublicKey,
        token: TokenRecord,
        observed: SocketAddr,
        now_unix: u64,
    ) -> Result<Txn, Refusal> {
        let key = hello.public_key;
        let Some(record) = self.state.nodes.get(&old) else {
            return Err(Refusal::new(
                RejectReason::BadToken,
                TOKEN_REFUSED,
                format!("token {:?} was for a node that is gone", token.id),
            ));
        };
        let identity = NodeIdentity {
            name: record.name.clone(),
            ipv4: record.ipv4,
            ipv6: record.ipv6,
            joined_at: now_unix,
            // The rebuilt machine stands where the old one stood.
            approved_routes: record.approved_routes.clone(),
        };
        tracing::info!(
            node = %key.short(), old = %old.short(), name = %identity.name,
            "a new key takes over a node"
        );
        let candidates = self.merge_candidates(&hello.candidates, observed);
        let at = Endpoints {
            last_seen: now_unix,
            candidates,
            nat: NatMapping::Unknown,
            routes: Vec::new(),
        };
        let token_key = Key::Token(token.id.clone());
        let spent = TokenRecord {
            uses: token.uses.saturating_add(1),
            ..token
        };
        let holder = records::encode(&Value::Holder(key));
        let (node, previous) = (Key::Node(key), Key::Node(old));
        let txn = Txn::new()
            .absent(node.path())
            .absent(Key::Removed(key).path())
            .unchanged(previous.path(), self.revision(&previous))
            .unchanged(token_key.path(), self.revision(&token_key))
            .delete(previous.path())
            .delete(Key::Endpoints(old).path())
            .put(Key::Removed(old).path(), records::encode(&Value::Removed))
            .put(Key::Name(identity.name.clone()).path(), holder.clone())
            .put(Key::Address(identity.ipv4.into()).path(), holder.clone())
            .put(Key::Address(identity.ipv6.into()).path(), holder)
            .put(node.path(), records::encode(&Value::Node(identity)))
            .put(
                Key::Endpoints(key).path(),
                records::encode(&Value::Endpoints(at)),
            )
            .put(token_key.path(), records::encode(&Value::Token(spent)));
        Ok(txn)
    }

    /// The usable token `presented` names, or why not.
    fn check_token(&self, presented: Option<&str>, now_unix: u64) -> Result<TokenRecord, Refusal> {
        let refused = |cause: String| Refusal::new(RejectReason::BadToken, TOKEN_REFUSED, cause);
        let Some(presented) = presented else {
            return Err(Refusal::new(
                RejectReason::BadToken,
                TOKEN_MISSING,
                "no token",
            ));
        };
        // Blanks around it were never part of a token (0.1.0 and 0.2.0
        // registries trimmed them too).
        let token: JoinToken = match presented.trim().parse() {
            Ok(token) => token,
            Err(e) => return Err(refused(format!("malformed token: {e}"))),
        };
        let id = token.id();
        let Some(record) = self.state.tokens.get(id) else {
            return Err(refused(format!("unknown token id \"{}\"", Untrusted(id))));
        };
        // A secret that is not 32 bytes of base64 hashes as empty and
        // cannot match.
        let secret = URL_SAFE_NO_PAD.decode(token.secret()).unwrap_or_default();
        let presented_hash = sha256_hex(&secret);
        // subtle compares equal-length slices in constant time; the length
        // (64 hex digits) is no secret.
        let matches: bool = presented_hash
            .as_bytes()
            .ct_eq(record.secret_sha256.as_bytes())
            .into();
        if !matches {
            return Err(refused(format!("wrong secret for token {id:?}")));
        }
        match record.status(now_unix) {
            TokenStatus::Usable => Ok(record.clone()),
            TokenStatus::Expired => Err(Refusal::new(
                RejectReason::BadToken,
                TOKEN_EXPIRED,
                format!("token {id:?} expired"),
            )),
            status @ (TokenStatus::Revoked | TokenStatus::UsedUp) => {
                Err(refused(format!("token {id:?} {status}")))
            }
        }
    }

    /// The first IPv4 candidate of `key` that no other node holds and no
    /// quarantine holds back, and likewise for IPv6 (where a collision is a
    /// 2^-80 event, checked all the same).
    fn allocate(&self, key: &PublicKey) -> Result<(Ipv4Addr, Ipv6Addr), Refusal> {
        let free = |ip: IpAddr| {
            self.claims
                .get(&Key::Address(ip))
                .is_none_or(|holder| holder == key)
        };
        let mesh = &self.state.mesh;
        let ipv4 = ipam::ipv4_candidates(key, mesh.ipv4).find(|a| free((*a).into()));
        let ipv6 = ipam::ipv6_candidates(key, mesh.ipv6).find(|a| free((*a).into()));
        match (ipv4, ipv6) {
            (Some(v4), Some(v6)) => Ok((v4, v6)),
            // The token was valid; there is no dedicated wire reason for a
            // full mesh, and the token is not spent, so the node can retry
            // once the operator has removed nodes.
            _ => Err(Refusal::new(
                RejectReason::BadToken,
                format!(
                    "the mesh has no free overlay address in {}; the operator must remove \
                     nodes (and release their addresses) before more can join",
                    mesh.ipv4
                ),
                format!("mesh {} full", mesh.ipv4),
            )),
        }
    }

    /// A change of the peer map, for every node connected here but the
    /// one it is about: kept until [`Registry::flush_deltas`], the latest
    /// per node.
    fn announce_delta(&mut self, msg: ServerMessage) {
        let subject = match &msg {
            ServerMessage::PeerUpsert { peer } => {
                if let Some(told) = &mut self.told {
                    told.upsert(peer);
                }
                peer.public_key
            }
            ServerMessage::PeerRemove { public_key } => {
                if let Some(told) = &mut self.told {
                    told.remove(public_key);
                }
                *public_key
            }
            _ => return,
        };
        self.delta_seq += 1;
        self.deltas.insert(subject, (self.delta_seq, msg));
    }

    /// Whether peer-map changes wait for [`Registry::flush_deltas`]; the
    /// shell flushes them a short tick after the first.
    pub fn has_deltas(&self) -> bool {
        !self.deltas.is_empty()
    }

    /// Queues the peer-map changes gathered since the last flush as one
    /// [`Command::PeerDeltas`]: a burst of joins or reconnects costs each
    /// member one write per tick, not one per change. Also done before any
    /// other message to a node, which must not overtake them (a punch names
    /// a peer whose new candidates may be among them).
    pub fn flush_deltas(&mut self) {
        if self.deltas.is_empty() {
            return;
        }
        let deltas: Vec<Delta> = std::mem::take(&mut self.deltas)
            .into_iter()
            .map(|(subject, (seq, msg))| Delta { subject, seq, msg })
            .collect();
        let welcomed = std::mem::take(&mut self.welcomed_in_tick);
        let members: Vec<DeltaMember> = self
            .online
            .iter()
            .map(|(key, conn)| DeltaMember {
                conn: *conn,
                key: *key,
                knows: welcomed.get(conn).copied().unwrap_or(0),
            })
            .collect();
        if !members.is_empty() {
            self.commands
                .push_back(Command::PeerDeltas { members, deltas });
        }
    }

    /// What the nodes were told (see [`told_of`]).
    fn told(&mut self) -> &Told {
        told_of(&mut self.told, &self.state.nodes, &self.routes)
    }

    /// Every entry but `key`'s, in key order, as the nodes were told them:
    /// copied, not encoded again.
    fn welcome_peers(&mut self, key: &PublicKey) -> PeerList {
        let (nodes, routes) = (&self.state.nodes, &self.routes);
        let told = told_of(&mut self.told, nodes, routes);
        let others = || nodes.iter().filter(|(k, _)| *k != key);
        let peers: Vec<EncodedEntry> = others()
            .filter_map(|(k, record)| {
                told.get(k)
                    .cloned()
                    .or_else(|| EncodedEntry::new(&node_entry(k, record, routes)))
            })
            .collect();
        debug_assert!(
            others().zip(&peers).all(|((k, record), told)| {
                told.decode().as_ref() == Some(&node_entry(k, record, routes))
            }),
            "every change of a record is announced, so what was told is what the records say"
        );
        PeerList::Encoded(peers)
    }

    fn persist_soon(&mut self) {
        if !self.persist_soon_queued {
            self.persist_soon_queued = true;
            self.commands.push_back(Command::PersistSoon);
        }
    }

    /// The node's announced candidates plus the observed one, ordered
    /// Advertised, Observed, Local (stable within a kind), one per address.
    /// "Observed" is the rendezvous's to say, so the node's own claims of
    /// that kind are dropped, as are addresses no peer can use; each
    /// dropped one is counted.
    fn merge_candidates(
        &mut self,
        announced: &[Candidate],
        observed: SocketAddr,
    ) -> Vec<Candidate> {
        let mut all = Vec::with_capacity(announced.len() + 1);
        for c in announced {
            let addr = canonical(c.addr);
            let refusal = if c.kind == CandidateKind::Observed {
                Some(CandidateRefusal::ClaimedObserved)
            } else {
                refuse_candidate(addr, &self.state.mesh)
            };
            match refusal {
                Some(why) => {
                    tracing::trace!(%addr, reason = why.as_str(), "announced candidate dropped");
                    self.counters.refuse(why);
                }
                // Only an advertised address can have been mapped.
                None => all.push(Candidate {
                    addr,
                    kind: c.kind,
                    mapped: c.mapped.filter(|_| c.kind == CandidateKind::Advertised),
                }),
            }
        }
        all.push(Candidate {
            addr: observed,
            kind: CandidateKind::Observed,
            mapped: None,
        });
        all.sort_by_key(|c| c.kind);
        let mut seen = HashSet::new();
        all.retain(|c| seen.insert(c.addr));
        all
    }

    /// Whether another node is seen at the public address and port that
    /// `key`'s UDP port (`listen_port`) needs behind its NAT, and if so
    /// who, and a port above `listen_port` that no node seen behind that
    /// address uses (as its public or its local port). One pass over the
    /// records, which the welcome's peer map makes anyway; records, not
    /// sessions, so a node on another server of the mesh counts too.
    fn port_taken(
        &self,
        key: &PublicKey,
        observed: SocketAddr,
        listen_port: u16,
    ) -> Option<PortTaken> {
        let wanted = SocketAddr::new(observed.ip(), listen_port);
        let mut holder = None;
        let mut used = HashSet::new();
        for (k, record) in &self.state.nodes {
            let seen = record
                .candidates
                .iter()
                .find(|c| c.kind == CandidateKind::Observed);
            let Some(seen) = seen.filter(|c| k != key && c.addr.ip() == observed.ip()) else {
                continue;
            };
            if seen.addr == wanted {
                holder = Some(record.name.clone());
            }
            used.extend(
                record
                    .candidates
                    .iter()
                    .filter(|c| matches!(c.kind, CandidateKind::Observed | CandidateKind::Local))
                    .map(|c| c.addr.port()),
            );
        }
        let by = holder?;
        let port = (listen_port.checked_add(1)?..=u16::MAX).find(|p| !used.contains(p))?;
        Some(PortTaken { by, port })
    }

    fn push(&mut self, cmd: Command) {
        // A direct message must not overtake the peer-map changes before
        // it; a welcome carries the whole map, so it may.
        if matches!(&cmd, Command::Send { msg, .. } if !matches!(msg, ServerMessage::Welcome { .. }))
        {
            self.flush_deltas();
        }
        self.commands.push_back(cmd);
    }
}

/// What the nodes were told, made from the records the first time it is
/// needed: every change since was announced, so the records are what was
/// told.
fn told_of<'a>(
    told: &'a mut Option<Told>,
    nodes: &BTreeMap<PublicKey, NodeRecord>,
    routes: &RouteTable,
) -> &'a Told {
    told.get_or_insert_with(|| {
        let mut told = Told::default();
        for (key, record) in nodes {
            told.upsert(&node_entry(key, record, routes));
        }
        told
    })
}

fn node_entry(key: &PublicKey, record: &NodeRecord, routes: &RouteTable) -> NodeEntry {
    NodeEntry {
        public_key: *key,
        name: record.name.clone(),
        ipv4: record.ipv4,
        ipv6: record.ipv6,
        candidates: record.candidates.clone(),
        routes: routes.accepted(key).to_vec(),
        nat: record.nat,
    }
}

/// A hello's prefixes as the record keeps them: each once, in the order
/// advertised, with the time it was first advertised (kept from `before`
/// while the node keeps advertising it).
fn advertised_routes(
    before: &[AdvertisedRoute],
    hello: &[IpNet],
    now_unix: u64,
) -> Vec<AdvertisedRoute> {
    let mut routes: Vec<AdvertisedRoute> = Vec::with_capacity(hello.len());
    for prefix in hello {
        if routes.iter().any(|r| r.prefix == *prefix) {
            continue;
        }
        let since = before
            .iter()
            .find(|r| r.prefix == *prefix)
            .map_or(now_unix, |r| r.since);
        routes.push(AdvertisedRoute {
            prefix: *prefix,
            since,
        });
    }
    routes
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Why no peer can use `addr` (already canonical), if so.
fn refuse_candidate(addr: SocketAddr, mesh: &MeshInfo) -> Option<CandidateRefusal> {
    if let Some(unusable) = endpoint::unusable(addr) {
        return Some(match unusable {
            Unusable::PortZero => CandidateRefusal::PortZero,
            Unusable::Unspecified => CandidateRefusal::Unspecified,
            Unusable::Loopback => CandidateRefusal::Loopback,
            Unusable::Multicast => CandidateRefusal::Multicast,
            Unusable::LinkLocal => CandidateRefusal::LinkLocal,
            Unusable::Broadcast => CandidateRefusal::Broadcast,
        });
    }
    let in_mesh = match addr.ip() {
        IpAddr::V4(v4) => mesh.ipv4.contains(&v4),
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(mesh.ipv6.contains(&v6), |v4| mesh.ipv4.contains(&v4)),
    };
    in_mesh.then_some(CandidateRefusal::MeshPrefix)
}

/// `name` made a DNS label (RFC 1035 §2.3.1, lowercase): its first
/// dot-separated part, lowercased, every other character as `-`, runs of
/// `-` as one, none at either end, at most [`MAX_LABEL`] characters;
/// `node` if nothing is left.
pub fn dns_label(name: &str) -> String {
    let first = name.split('.').find(|part| !part.is_empty()).unwrap_or("");
    let mut label = String::with_capacity(first.len().min(MAX_LABEL));
    for c in first.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if c == '-' && (label.is_empty() || label.ends_with('-')) {
            continue;
        }
        if label.len() == MAX_LABEL {
            break;
        }
        label.push(c);
    }
    while label.ends_with('-') {
        label.pop();
    }
    if label.is_empty() {
        label.push_str("node");
    }
    label
}

/// Whether `name` is already a DNS label as [`dns_label`] makes them.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty() && dns_label(name) == name
}

/// `base`, or `base-2`, `base-3`… (shortened to stay a label), whichever
/// `taken` says is free first.
fn unique(base: &str, taken: impl Fn(&str) -> bool) -> String {
    if !taken(base) {
        return base.to_owned();
    }
    (2u64..)
        .map(|n| {
            let suffix = format!("-{n}");
            let keep = base.len().min(MAX_LABEL - suffix.len());
            // A label is ASCII, so any byte index is a character boundary.
            format!(
                "{}{suffix}",
                base.get(..keep).unwrap_or(base).trim_end_matches('-')
            )
        })
        .find(|candidate| !taken(candidate))
        .unwrap_or_else(|| base.to_owned())
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the node name is empty".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "the node name is {} bytes long; at most {MAX_NAME} are accepted",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("the node name contains control characters".into());
    }
    Ok(())
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests;

pub mod routes;
use routes::RouteTable;
mod told;
use told::Told;
