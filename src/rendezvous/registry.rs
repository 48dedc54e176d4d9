//! The rendezvous registry: admission, overlay address allocation and
//! peer-map distribution, as a state machine.
//!
//! Pure: no socket, clock, random source or file. The quinn shell feeds it
//! inputs — a node's hello as it arrived ([`IncomingHello`]), its
//! candidates, a disconnect, an operator's request — with the time as `now`
//! and any random token secret as an argument, then drains
//! [`Registry::poll_command`] and executes the [`Command`]s: admit a
//! connection, send a message on one, close one, persist
//! [`Registry::state`]. Tests are "this input ⇒ these commands".
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
//! One registry instance processes one input at a time, so two joins that
//! race for the last use of a token, or for the same address, are decided by
//! the order the shell hands them over; exactly one wins.
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
//! ([`Command::PersistSoon`], which the shell debounces), while what a node
//! is told must survive a crash (a new node's address, a token's use) is
//! saved before the node hears of it ([`Command::Persist`]). Announced
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
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::admission;
use super::limits::Bucket;
pub use super::limits::{Limits, MessageKind, Rate};
pub use crate::identity::join_token::MAX_TOKEN_ID;
use crate::identity::JoinToken;
use crate::identity::{PrivateKey, PublicKey};
use crate::ipam;
/// Connections as the shell names them (shared with the relay table).
pub use crate::relay::ConnId;
use crate::wire::control::{
    Candidate, CandidateKind, Hello, HelloError, MeshInfo, NatMapping, NodeEntry, RejectReason,
    ServerMessage, MAX_CANDIDATES, MAX_NAME, PROTOCOL_VERSION,
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
    pub joined_at: u64,
    pub last_seen: u64,
    pub candidates: Vec<Candidate>,
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
    /// Close the connection (after sending what was queued for it before).
    Close { conn: ConnId, reason: CloseReason },
    /// Save [`Registry::state`] — as it is when this command is polled —
    /// before executing the commands after it, so that no node is told an
    /// address that a crash could forget.
    Persist,
    /// The state changed in a way a crash may lose without harm (presence,
    /// candidates, NAT: nodes say them again when they reconnect): save it
    /// soon. The shell may debounce these and write only the latest state.
    PersistSoon,
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
}

impl CloseReason {
    /// A QUIC application error code for the close frame.
    pub fn code(self) -> u32 {
        match self {
            CloseReason::Superseded => 1,
            CloseReason::Removed => 2,
            CloseReason::Flooding => 3,
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
    /// Announced candidates dropped, as [`CandidateRefusal::ALL`].
    refused: [u64; CandidateRefusal::ALL.len()],
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
    commands: VecDeque<Command>,
    /// A [`Command::Persist`] is queued and not yet polled: one is enough,
    /// since it saves the state as of when it is polled.
    persist_queued: bool,
    /// Likewise for [`Command::PersistSoon`].
    persist_soon_queued: bool,
    /// Hellos refused since this registry was made, indexed as
    /// [`REJECT_REASONS`]; for metrics, not persisted.
    rejections: [u64; REJECT_REASONS.len()],
    limits: Limits,
    counters: Counters,
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
    /// [`Limits`]; every node starts offline.
    ///
    /// A state from before names were labels and unique (v0.1.0) gets them
    /// here, in key order (the first node keeps a shared name), and a
    /// [`Command::Persist`] is queued to save that.
    /// `server_key` is the rendezvous's static key, which nodes prove
    /// theirs against.
    pub fn new(state: RegistryState, server_key: PrivateKey) -> Self {
        Self::with_limits(state, server_key, Limits::default())
    }

    /// [`Registry::new`] with other rates.
    pub fn with_limits(state: RegistryState, server_key: PrivateKey, limits: Limits) -> Self {
        let mut registry = Self {
            state,
            server_key,
            sessions: HashMap::new(),
            online: BTreeMap::new(),
            commands: VecDeque::new(),
            persist_queued: false,
            persist_soon_queued: false,
            rejections: [0; REJECT_REASONS.len()],
            limits,
            counters: Counters::default(),
        };
        registry.migrate_names();
        registry
    }

    /// Makes every stored name a label and unique.
    fn migrate_names(&mut self) {
        let mut taken = HashSet::new();
        let mut renamed = Vec::new();
        for (key, record) in &self.state.nodes {
            let base = dns_label(&record.name);
            let name = unique(&base, |n| taken.contains(n));
            taken.insert(name.clone());
            if name != record.name {
                renamed.push((*key, name));
            }
        }
        if renamed.is_empty() {
            return;
        }
        for (key, name) in renamed {
            if let Some(record) = self.state.nodes.get_mut(&key) {
                tracing::warn!(
                    node = %key.short(), old = %Untrusted(&record.name), new = %name,
                    "node name made a unique DNS label; `mesh-rendezvous nodes rename` picks another"
                );
                record.name = name;
            }
        }
        self.persist();
    }

    /// Everything to persist.
    pub fn state(&self) -> &RegistryState {
        &self.state
    }

    /// A node's hello on `conn`, as the connection delivered it: decides
    /// the node's admission (see the module docs).
    ///
    /// Queues either a `Rejected` and a close, or (admitted) a persist —
    /// [`Command::Persist`] for a new node, whose address and token use
    /// must be durable before it hears of them, [`Command::PersistSoon`]
    /// for a known one — then [`Command::Admitted`], the `Welcome` for
    /// `conn`, and a `PeerUpsert` for every other online node; an older
    /// connection of the same node is closed as superseded. A second hello
    /// on an already admitted connection is ignored.
    pub fn handle_hello(&mut self, conn: ConnId, incoming: IncomingHello, now: Now) {
        if self.sessions.contains_key(&conn) {
            tracing::debug!(%conn, "second hello on an admitted connection ignored");
            return;
        }
        let IncomingHello {
            hello,
            exporter,
            observed,
        } = incoming;
        let verdict = hello.map_err(|e| refuse_undecodable(&e)).and_then(|hello| {
            let joined = self.admit(&hello, &exporter, now.unix)?;
            Ok((hello, joined))
        });
        let (hello, joined) = match verdict {
            Ok(admitted) => admitted,
            Err(refusal) => {
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
                return;
            }
        };

        // Admitted: the record exists now. Refresh where the node is; its
        // name stays the one bound to its key.
        let key = hello.public_key;
        let observed = SocketAddr::new(observed.ip().to_canonical(), observed.port());
        let candidates = self.merge_candidates(&hello.candidates, observed);
        let Some(record) = self.state.nodes.get_mut(&key) else {
            return;
        };
        record.candidates = candidates;
        record.last_seen = now.unix;
        if !joined && record.name != dns_label(&hello.name) {
            tracing::debug!(
                node = %key.short(), asked = %Untrusted(&hello.name), name = %record.name,
                "a known node keeps its bound name"
            );
        }
        let entry = node_entry(&key, record);

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
        if joined {
            self.persist();
        } else {
            self.persist_soon();
        }
        self.push(Command::Admitted {
            conn,
            key,
            ipv4: entry.ipv4,
        });

        let peers = self
            .state
            .nodes
            .iter()
            .filter(|(k, _)| **k != key)
            .map(|(k, r)| node_entry(k, r))
            .collect();
        self.push(Command::Send {
            conn,
            msg: ServerMessage::Welcome {
                node: entry.clone(),
                mesh: self.state.mesh.clone(),
                observed,
                peers,
            },
        });
        self.broadcast_except(conn, &ServerMessage::PeerUpsert { peer: entry });
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
        let entry = node_entry(&key, record);
        self.persist_soon();
        self.broadcast_except(conn, &ServerMessage::PeerUpsert { peer: entry });
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
        let entry = node_entry(&key, record);
        self.persist_soon();
        self.broadcast_except(conn, &ServerMessage::PeerUpsert { peer: entry });
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

    /// The shell's connection ended (for any reason, including one this
    /// registry asked for). An admitted node goes offline; its peers keep
    /// its last candidates, so nothing is broadcast.
    pub fn handle_disconnect(&mut self, conn: ConnId, now: Now) {
        let Some(session) = self.sessions.remove(&conn) else {
            return;
        };
        if self.online.get(&session.key) == Some(&conn) {
            self.online.remove(&session.key);
        }
        if let Some(record) = self.state.nodes.get_mut(&session.key) {
            record.last_seen = now.unix;
            self.persist_soon();
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
    /// online, a `Rejected { Removed }` and a close. Its addresses stay
    /// quarantined ([`Registry::release_address`]) unless `release`.
    /// `false` (and nothing queued) if `key` is not a registered node.
    pub fn remove_node(&mut self, key: &PublicKey, release: bool, now_unix: u64) -> bool {
        let Some(record) = self.state.nodes.remove(key) else {
            return false;
        };
        self.state.removed.insert(*key);
        if !release {
            self.state.quarantine.push(Quarantined {
                public_key: *key,
                name: record.name,
                ipv4: record.ipv4,
                ipv6: record.ipv6,
                removed_at: now_unix,
            });
        }
        self.persist();
        if let Some(conn) = self.online.remove(key) {
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
        let msg = ServerMessage::PeerRemove { public_key: *key };
        let conns: Vec<ConnId> = self.online.values().copied().collect();
        for conn in conns {
            self.push(Command::Send {
                conn,
                msg: msg.clone(),
            });
        }
        true
    }

    /// Removed nodes' addresses that no new node gets, oldest removal first.
    pub fn quarantined(&self) -> &[Quarantined] {
        &self.state.quarantine
    }

    /// Hands a quarantined address (IPv4 or IPv6) back to the pool, with
    /// the other address of the same removed node.
    pub fn release_address(&mut self, address: IpAddr) -> Result<Quarantined, RegistryError> {
        let position = self.state.quarantine.iter().position(|q| match address {
            IpAddr::V4(v4) => q.ipv4 == v4,
            IpAddr::V6(v6) => q.ipv6 == v6,
        });
        let Some(position) = position else {
            return Err(RegistryError::NotQuarantined { address });
        };
        let released = self.state.quarantine.remove(position);
        self.persist();
        Ok(released)
    }

    /// Releases every quarantined address; how many removed nodes' worth.
    pub fn release_all_addresses(&mut self) -> usize {
        let count = self.state.quarantine.len();
        if count > 0 {
            self.state.quarantine.clear();
            self.persist();
        }
        count
    }

    /// Gives a node another name: a DNS label no other node has. The node's
    /// peers hear of it now, the node itself at its next `Welcome`.
    pub fn rename_node(&mut self, key: &PublicKey, name: &str) -> Result<(), RegistryError> {
        if !is_dns_label(name) {
            return Err(RegistryError::InvalidName {
                name: name.to_owned(),
            });
        }
        if self
            .state
            .nodes
            .iter()
            .any(|(k, r)| k != key && r.name == name)
        {
            return Err(RegistryError::NameTaken {
                name: name.to_owned(),
            });
        }
        let Some(record) = self.state.nodes.get_mut(key) else {
            return Err(RegistryError::UnknownNode {
                key: key.to_string(),
            });
        };
        if record.name == name {
            return Ok(());
        }
        tracing::info!(node = %key.short(), old = %record.name, new = %name, "node renamed");
        record.name = name.to_owned();
        let msg = ServerMessage::PeerUpsert {
            peer: node_entry(key, record),
        };
        self.persist();
        let own = self.online.get(key).copied();
        let conns: Vec<ConnId> = self
            .online
            .values()
            .copied()
            .filter(|c| Some(*c) != own)
            .collect();
        for conn in conns {
            self.push(Command::Send {
                conn,
                msg: msg.clone(),
            });
        }
        Ok(())
    }

    /// Creates a join token and returns it in full (`<id>.<secret>`, the
    /// only time the secret exists outside the caller; its `Debug` hides it). `secret` must come
    /// from a cryptographic random source; `id` is public, 1 to
    /// [`MAX_TOKEN_ID`] of `[A-Za-z0-9_-]`. Valid for `ttl_secs` from
    /// `now_unix`, for at most `max_uses` joins (`None`: unlimited).
    pub fn create_token(
        &mut self,
        secret: [u8; 32],
        id: String,
        ttl_secs: u64,
        max_uses: Option<u32>,
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
        };
        self.state.tokens.insert(id, record);
        self.persist();
        Ok(token)
    }

    /// Revokes a token; `false` if no token has this id. Nodes that joined
    /// with it stay.
    pub fn revoke_token(&mut self, id: &str) -> bool {
        let Some(token) = self.state.tokens.get_mut(id) else {
            return false;
        };
        if !token.revoked {
            token.revoked = true;
            self.persist();
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
                online: self.online.contains_key(key),
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
            Command::Persist => self.persist_queued = false,
            Command::PersistSoon => self.persist_soon_queued = false,
            Command::Admitted { .. } | Command::Send { .. } | Command::Close { .. } => {}
        }
        Some(cmd)
    }

    /// Checks the hello, its proof for this connection (`exporter`) and,
    /// for a new node, the token and a free address; on success the node's
    /// record exists (created for a new node, with the token's use counted
    /// and its name bound), and the answer says whether it was created. On
    /// failure nothing has changed.
    fn admit(
        &mut self,
        hello: &Hello,
        exporter: &[u8; 32],
        now_unix: u64,
    ) -> Result<bool, Refusal> {
        let key = hello.public_key;
        self.check_hello(hello, exporter)
            .and_then(|()| self.admit_key(hello, now_unix))
            .map_err(|refusal| refusal.of(&key))
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

    /// The key's standing: removed, known, or new with a usable token and
    /// a free address (then its record is made).
    fn admit_key(&mut self, hello: &Hello, now_unix: u64) -> Result<bool, Refusal> {
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
            return Ok(false);
        }

        let token_id = self.check_token(hello.token.as_deref(), now_unix)?;
        let (ipv4, ipv6) = self.allocate(&key)?;
        if let Some(token) = self.state.tokens.get_mut(&token_id) {
            token.uses = token.uses.saturating_add(1);
        }
        let name = unique(&dns_label(&hello.name), |n| {
            self.state.nodes.values().any(|r| r.name == n)
        });
        if name != hello.name {
            tracing::info!(node = %key.short(), asked = %Untrusted(&hello.name), %name, "node name adjusted");
        }
        tracing::info!(node = %key.short(), %name, %ipv4, %ipv6, token = %token_id, "node joined");
        self.state.nodes.insert(
            key,
            NodeRecord {
                name,
                ipv4,
                ipv6,
                joined_at: now_unix,
                last_seen: now_unix,
                candidates: Vec::new(),
                nat: NatMapping::Unknown,
            },
        );
        Ok(true)
    }

    /// The id of the usable token `presented` names, or why not.
    fn check_token(&self, presented: Option<&str>, now_unix: u64) -> Result<String, Refusal> {
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
            TokenStatus::Usable => Ok(record.id.clone()),
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
        let others = self
            .state
            .nodes
            .iter()
            .filter(|(k, _)| *k != key)
            .map(|(_, r)| (r.ipv4, r.ipv6));
        let held = self.state.quarantine.iter().map(|q| (q.ipv4, q.ipv6));
        let (mut taken4, mut taken6) = (HashSet::new(), HashSet::new());
        for (v4, v6) in others.chain(held) {
            taken4.insert(v4);
            taken6.insert(v6);
        }
        let mesh = &self.state.mesh;
        let ipv4 = ipam::ipv4_candidates(key, mesh.ipv4).find(|a| !taken4.contains(a));
        let ipv6 = ipam::ipv6_candidates(key, mesh.ipv6).find(|a| !taken6.contains(a));
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

    fn broadcast_except(&mut self, except: ConnId, msg: &ServerMessage) {
        let conns: Vec<ConnId> = self
            .online
            .values()
            .copied()
            .filter(|c| *c != except)
            .collect();
        for conn in conns {
            self.push(Command::Send {
                conn,
                msg: msg.clone(),
            });
        }
    }

    fn persist(&mut self) {
        if !self.persist_queued {
            self.persist_queued = true;
            self.commands.push_back(Command::Persist);
        }
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
                None => all.push(Candidate { addr, kind: c.kind }),
            }
        }
        all.push(Candidate {
            addr: observed,
            kind: CandidateKind::Observed,
        });
        all.sort_by_key(|c| c.kind);
        let mut seen = HashSet::new();
        all.retain(|c| seen.insert(c.addr));
        all
    }

    fn push(&mut self, cmd: Command) {
        self.commands.push_back(cmd);
    }
}

fn node_entry(key: &PublicKey, record: &NodeRecord) -> NodeEntry {
    NodeEntry {
        public_key: *key,
        name: record.name.clone(),
        ipv4: record.ipv4,
        ipv6: record.ipv6,
        candidates: record.candidates.clone(),
        nat: record.nat,
    }
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
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;
    const DAY: u64 = 86_400;

    /// `unix` as the shell would hand it over, on one monotonic clock
    /// that reads `NOW` at its start.
    fn at(unix: u64) -> Now {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let start = *START.get_or_init(Instant::now);
        Now {
            unix,
            instant: start + std::time::Duration::from_secs(unix.saturating_sub(NOW)),
        }
    }

    /// The rendezvous's static key in these tests.
    fn server() -> PrivateKey {
        PrivateKey::from_bytes([0xa5; 32])
    }

    /// The TLS exporter value of "the connection" in these tests.
    const EXPORTER: [u8; 32] = [0x5a; 32];

    fn secret(n: u8) -> PrivateKey {
        PrivateKey::from_bytes([n; 32])
    }

    fn key(n: u8) -> PublicKey {
        secret(n).public_key()
    }

    /// A hello from the holder of `secret`, proving it on [`EXPORTER`].
    fn hello_as(secret: &PrivateKey, name: &str, token: Option<&str>) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            public_key: secret.public_key(),
            name: name.to_owned(),
            listen_port: 51820,
            token: token.map(str::to_owned),
            candidates: Vec::new(),
            proof: admission::proof(secret, &server().public_key(), &EXPORTER),
        }
    }

    /// `hello` as it arrives on a connection from `observed`.
    fn arriving(hello: Hello, observed: SocketAddr) -> IncomingHello {
        IncomingHello {
            hello: Ok(hello),
            exporter: EXPORTER,
            observed,
        }
    }

    fn mesh(cidr: &str) -> MeshInfo {
        MeshInfo {
            id: "test-mesh".into(),
            ipv4: cidr.parse().unwrap(),
            ipv6: ipam::ula_prefix([0x12, 0x34, 0x56, 0x78, 0x9a]),
        }
    }

    fn registry() -> Registry {
        Registry::new(RegistryState::new(mesh("100.72.0.0/16")), server())
    }

    fn hello(n: u8, token: Option<&str>) -> Hello {
        Hello {
            candidates: vec![Candidate {
                addr: SocketAddr::from(([10, 0, 0, n], 51820)),
                kind: CandidateKind::Local,
            }],
            ..hello_as(&secret(n), &format!("node-{n}"), token)
        }
    }

    fn observed(n: u8) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, n], 40000 + u16::from(n)))
    }

    fn drain(reg: &mut Registry) -> Vec<Command> {
        std::iter::from_fn(|| reg.poll_command()).collect()
    }

    /// A registry with an unlimited token, returning the token.
    fn with_token() -> (Registry, String) {
        let mut reg = registry();
        let token = reg
            .create_token([7; 32], "abc123".into(), DAY, None, NOW)
            .unwrap()
            .expose()
            .to_owned();
        drain(&mut reg);
        (reg, token)
    }

    /// Admits node `n` on `ConnId(n)` and drains the commands.
    fn join(reg: &mut Registry, n: u8, token: &str) -> Vec<Command> {
        reg.handle_hello(
            ConnId(n.into()),
            arriving(hello(n, Some(token)), observed(n)),
            at(NOW),
        );
        let cmds = drain(reg);
        let conn = ConnId(n.into());
        assert!(
            cmds.iter().any(|c| matches!(c,
                Command::Send { conn: to, msg: ServerMessage::Welcome { .. } } if *to == conn)),
            "node {n} not welcomed: {cmds:?}"
        );
        cmds
    }

    fn welcome(cmds: &[Command]) -> (NodeEntry, Vec<NodeEntry>) {
        cmds.iter()
            .find_map(|c| match c {
                Command::Send {
                    msg: ServerMessage::Welcome { node, peers, .. },
                    ..
                } => Some((node.clone(), peers.clone())),
                _ => None,
            })
            .expect("a welcome")
    }

    fn assert_rejected_only(cmds: &[Command], conn: ConnId, reason: RejectReason) -> String {
        let [send, close] = cmds else {
            panic!("expected only Rejected({reason:?}) + Close, got {cmds:?}");
        };
        assert_eq!(
            close,
            &Command::Close {
                conn,
                reason: CloseReason::Rejected(reason)
            }
        );
        match send {
            Command::Send {
                conn: to,
                msg: ServerMessage::Rejected { reason: r, message },
            } => {
                assert_eq!((*to, *r), (conn, reason));
                message.clone()
            }
            other => panic!("expected Rejected({reason:?}), got {other:?}"),
        }
    }

    #[test]
    fn a_new_node_with_a_good_token_is_persisted_then_admitted_and_welcomed() {
        let (mut reg, token) = with_token();
        reg.handle_hello(
            ConnId(1),
            arriving(hello(1, Some(&token)), observed(1)),
            at(NOW),
        );
        let cmds = drain(&mut reg);
        assert_eq!(cmds.len(), 3, "{cmds:?}");
        assert_eq!(cmds[0], Command::Persist);
        let expected_v4 = ipam::ipv4_candidates(&key(1), reg.state().mesh.ipv4)
            .next()
            .unwrap();
        let expected_v6 = ipam::ipv6_for(&key(1), reg.state().mesh.ipv6);
        assert_eq!(
            cmds[1],
            Command::Admitted {
                conn: ConnId(1),
                key: key(1),
                ipv4: expected_v4
            }
        );
        match &cmds[2] {
            Command::Send {
                conn,
                msg:
                    ServerMessage::Welcome {
                        node,
                        mesh,
                        observed: obs,
                        peers,
                    },
            } => {
                assert_eq!(*conn, ConnId(1));
                assert_eq!(node.public_key, key(1));
                assert_eq!(node.name, "node-1");
                assert_eq!((node.ipv4, node.ipv6), (expected_v4, expected_v6));
                assert_eq!(*mesh, reg.state().mesh);
                assert_eq!(*obs, observed(1));
                assert!(peers.is_empty());
            }
            other => panic!("expected a welcome, got {other:?}"),
        }
        assert_eq!(reg.state().tokens["abc123"].uses, 1);
        assert_eq!(reg.state().nodes[&key(1)].joined_at, NOW);
        assert!(reg.is_online(&key(1)));
    }

    #[test]
    fn welcome_lists_every_other_node_with_its_last_known_candidates() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        join(&mut reg, 2, &token);
        reg.handle_disconnect(ConnId(2), at(NOW + 5));
        drain(&mut reg);
        let (me, peers) = welcome(&join(&mut reg, 3, &token));
        assert_eq!(me.public_key, key(3));
        let keys: Vec<_> = peers.iter().map(|p| p.public_key).collect();
        assert_eq!(keys, vec![key(1), key(2)]);
        let offline = &peers[1];
        assert!(offline.candidates.contains(&Candidate {
            addr: observed(2),
            kind: CandidateKind::Observed
        }));
        assert!(offline.candidates.contains(&Candidate {
            addr: SocketAddr::from(([10, 0, 0, 2], 51820)),
            kind: CandidateKind::Local
        }));
    }

    #[test]
    fn a_join_is_announced_to_every_other_online_node() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        join(&mut reg, 2, &token);
        let cmds = join(&mut reg, 3, &token);
        let (me, _) = welcome(&cmds);
        let upserts: Vec<_> = cmds
            .iter()
            .filter_map(|c| match c {
                Command::Send {
                    conn,
                    msg: ServerMessage::PeerUpsert { peer },
                } => Some((*conn, peer.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(upserts, vec![(ConnId(1), me.clone()), (ConnId(2), me)]);
    }

    #[test]
    fn rejections_queue_only_rejected_and_close_and_change_nothing() {
        let mut reg = registry();
        let unlimited = reg
            .create_token([1; 32], "open".into(), DAY, None, NOW)
            .unwrap()
            .expose()
            .to_owned();
        let expired = reg
            .create_token([2; 32], "old".into(), 10, None, NOW - 100)
            .unwrap()
            .expose()
            .to_owned();
        let revoked = reg
            .create_token([3; 32], "gone".into(), DAY, None, NOW)
            .unwrap()
            .expose()
            .to_owned();
        reg.revoke_token("gone");
        let used = reg
            .create_token([4; 32], "once".into(), DAY, Some(1), NOW)
            .unwrap()
            .expose()
            .to_owned();
        drain(&mut reg);
        join(&mut reg, 1, &used);
        join(&mut reg, 2, &unlimited);
        reg.remove_node(&key(2), false, NOW);
        drain(&mut reg);
        let wrong_secret = format!("open.{}", URL_SAFE_NO_PAD.encode([9u8; 32]));

        let mut cases: Vec<(&str, Hello, RejectReason)> = vec![
            (
                "wrong secret",
                hello(10, Some(&wrong_secret)),
                RejectReason::BadToken,
            ),
            (
                "unknown id",
                hello(10, Some("nosuch.AAAA")),
                RejectReason::BadToken,
            ),
            ("no dot", hello(10, Some("garbage")), RejectReason::BadToken),
            (
                "bad base64",
                hello(10, Some("open.!!!")),
                RejectReason::BadToken,
            ),
            ("no token", hello(10, None), RejectReason::BadToken),
            ("expired", hello(10, Some(&expired)), RejectReason::BadToken),
            ("revoked", hello(10, Some(&revoked)), RejectReason::BadToken),
            ("used up", hello(10, Some(&used)), RejectReason::BadToken),
            ("removed", hello(2, Some(&unlimited)), RejectReason::Removed),
        ];
        let mut v = hello(10, Some(&unlimited));
        v.version = PROTOCOL_VERSION + 1;
        cases.push(("version", v, RejectReason::Version));
        for name in [
            String::new(),
            "x".repeat(MAX_NAME + 1),
            "evil\nname".into(),
            "a\u{7f}".into(),
        ] {
            let mut h = hello(10, Some(&unlimited));
            h.name = name;
            cases.push(("bad name", h, RejectReason::BadHello));
        }
        let mut many = hello(10, Some(&unlimited));
        many.candidates = (0..=MAX_CANDIDATES as u16)
            .map(|p| Candidate {
                addr: SocketAddr::from(([10, 0, 0, 1], 1000 + p)),
                kind: CandidateKind::Local,
            })
            .collect();
        cases.push(("too many candidates", many, RejectReason::BadHello));

        let before = reg.state().clone();
        for (what, h, reason) in cases {
            reg.handle_hello(ConnId(99), arriving(h.clone(), observed(10)), at(NOW));
            let cmds = drain(&mut reg);
            let message = assert_rejected_only(&cmds, ConnId(99), reason);
            assert!(
                !message.contains("100.72") && !message.contains("test-mesh"),
                "{what}: {message}"
            );
            assert_eq!(reg.state(), &before, "{what} changed the state");
            assert!(!reg.is_online(&h.public_key), "{what}");
        }
    }

    #[test]
    fn refused_hellos_are_counted_by_reason_and_admissions_are_not() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        reg.handle_hello(ConnId(2), arriving(hello(2, None), observed(2)), at(NOW));
        reg.handle_hello(
            ConnId(3),
            arriving(hello(3, Some("nosuch.AAAA")), observed(3)),
            at(NOW),
        );
        let mut newer = hello(4, Some(&token));
        newer.version = PROTOCOL_VERSION + 1;
        reg.handle_hello(ConnId(4), arriving(newer.clone(), observed(4)), at(NOW));
        let mut elsewhere = arriving(hello(5, Some(&token)), observed(5));
        elsewhere.exporter = [0x77; 32];
        reg.handle_hello(ConnId(5), elsewhere, at(NOW));
        // One the shell refused before there was a hello: a frame too large.
        reg.count_rejection(RejectReason::BadHello);
        drain(&mut reg);
        let counts: Vec<(RejectReason, u64)> = reg.rejections().collect();
        assert_eq!(
            counts,
            vec![
                (RejectReason::Version, 1),
                (RejectReason::BadProof, 1),
                (RejectReason::BadToken, 2),
                (RejectReason::Removed, 0),
                (RejectReason::BadHello, 1),
            ]
        );
    }

    #[test]
    fn a_proven_hello_with_a_good_token_is_admitted_before_it_is_welcomed() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        reg.handle_hello(
            ConnId(2),
            arriving(hello(2, Some(&token)), observed(2)),
            at(NOW),
        );
        let cmds = drain(&mut reg);
        let admitted = cmds
            .iter()
            .position(|c| matches!(c, Command::Admitted { conn, key: k, .. } if *conn == ConnId(2) && *k == key(2)));
        let welcomed = cmds.iter().position(|c| {
            matches!(c, Command::Send { conn, msg: ServerMessage::Welcome { .. } } if *conn == ConnId(2))
        });
        assert!(
            matches!((admitted, welcomed), (Some(a), Some(w)) if a < w),
            "{cmds:?}"
        );
        let (me, _) = welcome(&cmds);
        assert!(cmds.contains(&Command::Admitted {
            conn: ConnId(2),
            key: key(2),
            ipv4: me.ipv4
        }));
    }

    #[test]
    fn a_hello_of_another_version_is_rejected_naming_both_versions_whatever_its_proof() {
        let (mut reg, token) = with_token();
        // One the shell could not decode: a newer node's hello.
        let unreadable = IncomingHello {
            hello: Err(HelloError::Version { theirs: Some(2) }),
            exporter: EXPORTER,
            observed: observed(1),
        };
        reg.handle_hello(ConnId(1), unreadable, at(NOW));
        let message = assert_rejected_only(&drain(&mut reg), ConnId(1), RejectReason::Version);
        assert_eq!(
            message,
            "this rendezvous speaks protocol version 1, the node 2; upgrade the older side",
            "as proto/vectors/rejected_version.hex"
        );
        let nameless = IncomingHello {
            hello: Err(HelloError::Version { theirs: None }),
            exporter: EXPORTER,
            observed: observed(1),
        };
        reg.handle_hello(ConnId(2), nameless, at(NOW));
        let message = assert_rejected_only(&drain(&mut reg), ConnId(2), RejectReason::Version);
        assert!(message.contains("names none"), "{message}");
        // A decoded one of another version, its proof made for nothing:
        // the version is what it learns.
        let mut other = hello(3, Some(&token));
        other.version = PROTOCOL_VERSION + 1;
        other.proof = crate::wire::control::Proof([0; 32]);
        reg.handle_hello(ConnId(3), arriving(other, observed(3)), at(NOW));
        assert_rejected_only(&drain(&mut reg), ConnId(3), RejectReason::Version);
        assert_eq!(reg.state().tokens["abc123"].uses, 0);
    }

    #[test]
    fn a_malformed_hello_is_rejected_as_bad_hello() {
        let mut reg = registry();
        let malformed = IncomingHello {
            hello: Err(HelloError::Malformed("not a JSON object".into())),
            exporter: EXPORTER,
            observed: observed(1),
        };
        reg.handle_hello(ConnId(1), malformed, at(NOW));
        let message = assert_rejected_only(&drain(&mut reg), ConnId(1), RejectReason::BadHello);
        assert_eq!(message, "malformed hello");
    }

    #[test]
    fn a_proof_for_another_connection_another_key_or_a_low_order_key_is_rejected_and_spends_nothing(
    ) {
        let (mut reg, token) = with_token();
        let before = reg.state().clone();
        // Lifted from another connection: made for another exporter value.
        let mut replayed = arriving(hello(1, Some(&token)), observed(1));
        replayed.exporter = [0x77; 32];
        // Made by node 2's key, claiming node 3's.
        let mut borrowed = hello(2, Some(&token));
        borrowed.public_key = key(3);
        // A key whose shared secret anyone can compute.
        let mut low_order = hello(4, Some(&token));
        low_order.public_key = PublicKey::from_bytes([0; 32]);
        let cases = [
            ("replayed", replayed),
            ("borrowed", arriving(borrowed, observed(2))),
            ("low order", arriving(low_order, observed(4))),
        ];
        for (n, (what, incoming)) in (10u64..).zip(cases) {
            let claimed = incoming.hello.as_ref().map(|h| h.public_key).unwrap();
            reg.handle_hello(ConnId(n), incoming, at(NOW));
            let message = assert_rejected_only(&drain(&mut reg), ConnId(n), RejectReason::BadProof);
            assert!(message.contains("cannot prove"), "{what}: {message}");
            assert!(!reg.is_online(&claimed), "{what}");
            assert_eq!(reg.state(), &before, "{what} changed the state");
        }
    }

    #[test]
    fn a_spent_single_use_token_is_rejected_and_its_one_admission_stands() {
        let mut reg = registry();
        let once = reg
            .create_token([4; 32], "once".into(), DAY, Some(1), NOW)
            .unwrap()
            .expose()
            .to_owned();
        drain(&mut reg);
        join(&mut reg, 1, &once);
        reg.handle_hello(
            ConnId(2),
            arriving(hello(2, Some(&once)), observed(2)),
            at(NOW),
        );
        let message = assert_rejected_only(&drain(&mut reg), ConnId(2), RejectReason::BadToken);
        assert_eq!(message, TOKEN_REFUSED);
        assert!(reg.is_online(&key(1)) && !reg.is_online(&key(2)));
        assert_eq!(reg.state().tokens["once"].uses, 1);
    }

    #[test]
    fn no_welcome_is_ever_queued_without_admitted_before_it() {
        let (mut reg, token) = with_token();
        let mut spent = reg
            .create_token([5; 32], "one".into(), DAY, Some(1), NOW)
            .unwrap()
            .expose()
            .to_owned();
        drain(&mut reg);
        let mut replayed = arriving(hello(9, Some(&token)), observed(9));
        replayed.exporter = [0x77; 32];
        let mut inputs = vec![
            arriving(hello(1, Some(&spent)), observed(1)),
            arriving(hello(2, Some(&spent)), observed(2)),
            arriving(hello(3, Some(&token)), observed(3)),
            // Node 1 again, superseding its first connection.
            arriving(hello(1, None), observed(1)),
            arriving(hello(4, None), observed(4)),
            replayed,
        ];
        spent.push('x');
        inputs.push(arriving(hello(5, Some(&spent)), observed(5)));
        for (n, incoming) in (1u64..).zip(inputs) {
            reg.handle_hello(ConnId(n), incoming, at(NOW));
            let cmds = drain(&mut reg);
            for (i, c) in cmds.iter().enumerate() {
                if let Command::Send {
                    conn,
                    msg: ServerMessage::Welcome { .. },
                } = c
                {
                    assert!(
                        cmds[..i]
                            .iter()
                            .any(|a| matches!(a, Command::Admitted { conn: to, .. } if to == conn)),
                        "a welcome without an admission: {cmds:?}"
                    );
                }
            }
            let admitted = cmds
                .iter()
                .filter(|c| matches!(c, Command::Admitted { .. }))
                .count();
            assert!(admitted <= 1, "{cmds:?}");
        }
        assert!(reg.is_online(&key(1)) && reg.is_online(&key(3)));
        assert!(!reg.is_online(&key(2)) && !reg.is_online(&key(4)));
        assert!(!reg.is_online(&key(5)) && !reg.is_online(&key(9)));
    }

    #[test]
    fn token_failures_do_not_reveal_whether_the_token_id_exists() {
        let (mut reg, _) = with_token();
        let wrong = format!("abc123.{}", URL_SAFE_NO_PAD.encode([9u8; 32]));
        let unknown = format!("zzz999.{}", URL_SAFE_NO_PAD.encode([9u8; 32]));
        reg.handle_hello(
            ConnId(1),
            arriving(hello(1, Some(&wrong)), observed(1)),
            at(NOW),
        );
        let a = assert_rejected_only(&drain(&mut reg), ConnId(1), RejectReason::BadToken);
        reg.handle_hello(
            ConnId(2),
            arriving(hello(2, Some(&unknown)), observed(2)),
            at(NOW),
        );
        let b = assert_rejected_only(&drain(&mut reg), ConnId(2), RejectReason::BadToken);
        assert_eq!(a, b);
        assert!(!a.contains("abc123"));
    }

    #[test]
    fn a_token_is_expired_from_its_expiry_second_on() {
        let mut reg = registry();
        let token = reg
            .create_token([5; 32], "short".into(), 60, None, NOW)
            .unwrap()
            .expose()
            .to_owned();
        drain(&mut reg);
        reg.handle_hello(
            ConnId(1),
            arriving(hello(1, Some(&token)), observed(1)),
            at(NOW + 60),
        );
        let message = assert_rejected_only(&drain(&mut reg), ConnId(1), RejectReason::BadToken);
        assert_eq!(message, TOKEN_EXPIRED);
        reg.handle_hello(
            ConnId(2),
            arriving(hello(1, Some(&token)), observed(1)),
            at(NOW + 59),
        );
        assert_eq!(welcome(&drain(&mut reg)).0.public_key, key(1));
    }

    #[test]
    fn a_removed_node_is_refused_even_with_a_valid_token() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        assert!(reg.remove_node(&key(1), false, NOW));
        drain(&mut reg);
        reg.handle_hello(
            ConnId(5),
            arriving(hello(1, Some(&token)), observed(1)),
            at(NOW),
        );
        assert_rejected_only(&drain(&mut reg), ConnId(5), RejectReason::Removed);
        assert_eq!(reg.state().tokens["abc123"].uses, 1);
    }

    #[test]
    fn a_single_use_token_admits_exactly_one_of_twenty_concurrent_joins() {
        let mut reg = registry();
        let token = reg
            .create_token([8; 32], "once".into(), DAY, Some(1), NOW)
            .unwrap()
            .expose()
            .to_owned();
        drain(&mut reg);
        for n in 1..=20u8 {
            reg.handle_hello(
                ConnId(n.into()),
                arriving(hello(n, Some(&token)), observed(n)),
                at(NOW),
            );
        }
        let cmds = drain(&mut reg);
        let welcomes = cmds
            .iter()
            .filter(|c| {
                matches!(
                    c,
                    Command::Send {
                        msg: ServerMessage::Welcome { .. },
                        ..
                    }
                )
            })
            .count();
        let rejects = cmds
            .iter()
            .filter(|c| {
                matches!(
                    c,
                    Command::Send {
                        msg: ServerMessage::Rejected { .. },
                        ..
                    }
                )
            })
            .count();
        assert_eq!((welcomes, rejects), (1, 19));
        assert_eq!(reg.state().nodes.len(), 1);
        assert_eq!(reg.state().tokens["once"].uses, 1);
    }

    #[test]
    fn a_multi_use_token_counts_its_uses() {
        let mut reg = registry();
        let token = reg
            .create_token([8; 32], "three".into(), DAY, Some(3), NOW)
            .unwrap()
            .expose()
            .to_owned();
        drain(&mut reg);
        for n in 1..=3 {
            join(&mut reg, n, &token);
        }
        assert_eq!(reg.state().tokens["three"].status(NOW), TokenStatus::UsedUp);
        reg.handle_hello(
            ConnId(4),
            arriving(hello(4, Some(&token)), observed(4)),
            at(NOW),
        );
        assert_rejected_only(&drain(&mut reg), ConnId(4), RejectReason::BadToken);
    }

    #[test]
    fn a_known_node_rejoins_without_a_token_and_keeps_its_address_and_name() {
        let (mut reg, token) = with_token();
        let (first, _) = welcome(&join(&mut reg, 1, &token));
        reg.handle_disconnect(ConnId(1), at(NOW + 1));
        drain(&mut reg);
        reg.revoke_token("abc123");
        drain(&mut reg);
        let mut again = hello(1, None);
        again.name = "renamed".into();
        reg.handle_hello(ConnId(7), arriving(again.clone(), observed(1)), at(NOW + 2));
        let (second, _) = welcome(&drain(&mut reg));
        assert_eq!((second.ipv4, second.ipv6), (first.ipv4, first.ipv6));
        assert_eq!(
            second.name, "node-1",
            "the name is bound to the key at first admission"
        );
        assert_eq!(reg.state().nodes[&key(1)].name, "node-1");
        assert_eq!(reg.state().tokens["abc123"].uses, 1);
        assert_eq!(reg.state().nodes[&key(1)].joined_at, NOW);
    }

    #[test]
    fn a_token_sent_by_a_known_node_is_not_spent() {
        let mut reg = registry();
        let token = reg
            .create_token([8; 32], "two".into(), DAY, Some(2), NOW)
            .unwrap()
            .expose()
            .to_owned();
        drain(&mut reg);
        join(&mut reg, 1, &token);
        reg.handle_hello(
            ConnId(9),
            arriving(hello(1, Some(&token)), observed(1)),
            at(NOW),
        );
        drain(&mut reg);
        assert_eq!(reg.state().tokens["two"].uses, 1);
    }

    #[test]
    fn addresses_survive_a_save_load_round_trip_and_a_restart() {
        let (mut reg, token) = with_token();
        let addrs: Vec<_> = (1..=5)
            .map(|n| {
                let (e, _) = welcome(&join(&mut reg, n, &token));
                (e.ipv4, e.ipv6)
            })
            .collect();
        let json = serde_json::to_string(reg.state()).unwrap();
        let loaded: RegistryState = serde_json::from_str(&json).unwrap();
        assert_eq!(&loaded, reg.state());

        let mut restarted = Registry::new(loaded, server());
        for n in 1..=5u8 {
            restarted.handle_hello(
                ConnId(100 + u64::from(n)),
                arriving(hello(n, None), observed(n)),
                at(NOW + 60),
            );
            let (e, _) = welcome(&drain(&mut restarted));
            assert_eq!((e.ipv4, e.ipv6), addrs[usize::from(n - 1)]);
        }
    }

    #[test]
    fn a_key_gets_the_same_address_in_any_registry_without_collisions() {
        let (mut a, token_a) = with_token();
        let (mut b, token_b) = with_token();
        join(&mut b, 2, &token_b);
        let (in_a, _) = welcome(&join(&mut a, 1, &token_a));
        let (in_b, _) = welcome(&join(&mut b, 1, &token_b));
        assert_eq!((in_a.ipv4, in_a.ipv6), (in_b.ipv4, in_b.ipv6));
    }

    #[test]
    fn collisions_take_the_next_free_address_and_a_full_mesh_refuses_without_spending_the_token() {
        // A /29 has six usable addresses; nine keys must collide.
        let mut reg = Registry::new(RegistryState::new(mesh("10.9.8.0/29")), server());
        let token = reg
            .create_token([8; 32], "many".into(), DAY, Some(7), NOW)
            .unwrap()
            .expose()
            .to_owned();
        drain(&mut reg);
        let mut taken = BTreeSet::new();
        for n in 1..=6u8 {
            let (e, _) = welcome(&join(&mut reg, n, &token));
            let expected = ipam::ipv4_candidates(&key(n), reg.state().mesh.ipv4)
                .find(|a| !taken.contains(a))
                .unwrap();
            assert_eq!(e.ipv4, expected, "node {n}");
            assert!(taken.insert(e.ipv4), "node {n} got a taken address");
        }
        assert_eq!(taken.len(), 6);
        reg.handle_hello(
            ConnId(7),
            arriving(hello(7, Some(&token)), observed(7)),
            at(NOW),
        );
        let message = assert_rejected_only(&drain(&mut reg), ConnId(7), RejectReason::BadToken);
        assert!(message.contains("no free overlay address"), "{message}");
        assert_eq!(reg.state().tokens["many"].uses, 6);

        // Removing a node and releasing its address frees it for the next one.
        let freed = reg.state().nodes[&key(3)].ipv4;
        reg.remove_node(&key(3), true, NOW);
        drain(&mut reg);
        let (e, _) = welcome(&join(&mut reg, 7, &token));
        assert_eq!(e.ipv4, freed);
    }

    #[test]
    fn an_ipv6_collision_takes_the_next_alternative() {
        let (mut reg, token) = with_token();
        let wanted = ipam::ipv6_for(&key(1), reg.state().mesh.ipv6);
        reg.state.nodes.insert(
            key(50),
            NodeRecord {
                name: "squatter".into(),
                ipv4: "100.72.0.1".parse().unwrap(),
                ipv6: wanted,
                joined_at: NOW,
                last_seen: NOW,
                candidates: Vec::new(),
                nat: NatMapping::Unknown,
            },
        );
        let (e, _) = welcome(&join(&mut reg, 1, &token));
        assert_ne!(e.ipv6, wanted);
        assert_eq!(
            Some(e.ipv6),
            ipam::ipv6_candidates(&key(1), reg.state().mesh.ipv6).nth(1)
        );
    }

    #[test]
    fn removal_is_persisted_broadcast_and_closes_the_node() {
        let (mut reg, token) = with_token();
        for n in 1..=3 {
            join(&mut reg, n, &token);
        }
        assert!(reg.remove_node(&key(2), false, NOW));
        let cmds = drain(&mut reg);
        assert_eq!(
            cmds,
            vec![
                Command::Persist,
                Command::Send {
                    conn: ConnId(2),
                    msg: ServerMessage::Rejected {
                        reason: RejectReason::Removed,
                        message: "this node was removed from the mesh".into(),
                    },
                },
                Command::Close {
                    conn: ConnId(2),
                    reason: CloseReason::Removed
                },
                // The others in the order of their keys: key(3) < key(1).
                Command::Send {
                    conn: ConnId(3),
                    msg: ServerMessage::PeerRemove { public_key: key(2) }
                },
                Command::Send {
                    conn: ConnId(1),
                    msg: ServerMessage::PeerRemove { public_key: key(2) }
                },
            ]
        );
        assert!(reg.state().removed.contains(&key(2)));
        assert!(!reg.state().nodes.contains_key(&key(2)));
        assert!(!reg.is_online(&key(2)));

        // Its connection no longer counts as admitted.
        reg.handle_candidates(ConnId(2), Vec::new(), at(NOW));
        assert!(drain(&mut reg).is_empty());
        // And it is not in later welcomes.
        reg.handle_hello(ConnId(9), arriving(hello(1, None), observed(1)), at(NOW));
        let (_, peers) = welcome(&drain(&mut reg));
        assert_eq!(
            peers.iter().map(|p| p.public_key).collect::<Vec<_>>(),
            vec![key(3)]
        );
    }

    #[test]
    fn removing_an_unknown_node_does_nothing() {
        let mut reg = registry();
        assert!(!reg.remove_node(&key(1), false, NOW));
        assert!(drain(&mut reg).is_empty());
        assert!(reg.state().removed.is_empty());
    }

    #[test]
    fn a_candidate_change_is_saved_soon_and_announced_to_the_others() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        join(&mut reg, 2, &token);
        let new = Candidate {
            addr: SocketAddr::from(([192, 0, 2, 1], 51820)),
            kind: CandidateKind::Advertised,
        };
        reg.handle_candidates(ConnId(1), vec![new], at(NOW + 10));
        let cmds = drain(&mut reg);
        let expected = vec![
            new,
            Candidate {
                addr: observed(1),
                kind: CandidateKind::Observed,
            },
        ];
        let upsert = |peer| Command::Send {
            conn: ConnId(2),
            msg: ServerMessage::PeerUpsert { peer },
        };
        let mut entry = node_entry(&key(1), &reg.state().nodes[&key(1)]);
        entry.candidates.clone_from(&expected);
        assert_eq!(cmds, vec![Command::PersistSoon, upsert(entry)]);
        assert_eq!(reg.state().nodes[&key(1)].candidates, expected);
        assert_eq!(reg.state().nodes[&key(1)].last_seen, NOW + 10);

        // The same list again changes nothing.
        reg.handle_candidates(ConnId(1), vec![new], at(NOW + 20));
        assert!(drain(&mut reg).is_empty());
    }

    #[test]
    fn a_nat_report_reaches_the_other_nodes_once_and_is_kept() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        join(&mut reg, 2, &token);
        drain(&mut reg);
        reg.handle_nat(ConnId(1), NatMapping::EndpointDependent, at(NOW + 1));
        let cmds = drain(&mut reg);
        assert!(
            cmds.iter().any(|c| matches!(c, Command::PersistSoon)),
            "{cmds:?}"
        );
        let upserts: Vec<_> = cmds
            .iter()
            .filter_map(|c| match c {
                Command::Send {
                    conn,
                    msg: ServerMessage::PeerUpsert { peer },
                } => Some((*conn, peer.nat)),
                _ => None,
            })
            .collect();
        assert_eq!(upserts, vec![(ConnId(2), NatMapping::EndpointDependent)]);
        reg.handle_nat(ConnId(1), NatMapping::EndpointDependent, at(NOW + 2));
        assert!(
            drain(&mut reg).is_empty(),
            "the same report again changes nothing"
        );
        reg.handle_nat(ConnId(42), NatMapping::None, at(NOW + 3));
        assert!(
            drain(&mut reg).is_empty(),
            "a connection that is not admitted is ignored"
        );
        let (_, peers) = welcome(&join(&mut reg, 3, &token));
        assert_eq!(
            peers[0].nat,
            NatMapping::EndpointDependent,
            "a later joiner learns it too"
        );
    }

    #[test]
    fn candidates_from_a_connection_that_is_not_admitted_are_ignored() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        let before = reg.state().clone();
        let c = Candidate {
            addr: SocketAddr::from(([192, 0, 2, 1], 1)),
            kind: CandidateKind::Local,
        };
        reg.handle_candidates(ConnId(42), vec![c], at(NOW));
        reg.handle_hello(
            ConnId(43),
            arriving(hello(9, Some("bad.token")), observed(9)),
            at(NOW),
        );
        drain(&mut reg);
        reg.handle_candidates(ConnId(43), vec![c], at(NOW));
        assert!(drain(&mut reg).is_empty());
        assert_eq!(reg.state(), &before);
    }

    #[test]
    fn too_many_candidates_from_an_admitted_node_are_ignored() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        let before = reg.state().clone();
        let many = (0..=MAX_CANDIDATES as u16)
            .map(|p| Candidate {
                addr: SocketAddr::from(([10, 0, 0, 1], 2000 + p)),
                kind: CandidateKind::Local,
            })
            .collect();
        reg.handle_candidates(ConnId(1), many, at(NOW));
        assert!(drain(&mut reg).is_empty());
        assert_eq!(reg.state(), &before);
    }

    #[test]
    fn candidates_are_ordered_advertised_observed_local_without_duplicates() {
        let obs = SocketAddr::from(([203, 0, 113, 5], 40000));
        let local = |a: [u8; 4], p| Candidate {
            addr: SocketAddr::from((a, p)),
            kind: CandidateKind::Local,
        };
        let announced = vec![
            local([10, 0, 0, 1], 51820),
            Candidate {
                addr: SocketAddr::from(([203, 0, 113, 9], 51820)),
                kind: CandidateKind::Advertised,
            },
            local([203, 0, 113, 5], 40000), // same as observed: kept once, as observed
            // Not the node's to say:
            Candidate {
                addr: SocketAddr::from(([1, 2, 3, 4], 5)),
                kind: CandidateKind::Observed,
            },
            local([10, 0, 0, 1], 51820),
            local([0, 0, 0, 0], 51820),
            local([10, 0, 0, 2], 0),
            local([172, 16, 0, 1], 51820),
        ];
        let merged = registry().merge_candidates(&announced, obs);
        assert_eq!(
            merged,
            vec![
                Candidate {
                    addr: SocketAddr::from(([203, 0, 113, 9], 51820)),
                    kind: CandidateKind::Advertised
                },
                Candidate {
                    addr: obs,
                    kind: CandidateKind::Observed
                },
                local([10, 0, 0, 1], 51820),
                local([172, 16, 0, 1], 51820),
            ]
        );
    }

    #[test]
    fn an_ipv4_mapped_observed_address_is_reported_as_ipv4() {
        let (mut reg, token) = with_token();
        let mapped: SocketAddr = "[::ffff:198.51.100.7]:4000".parse().unwrap();
        reg.handle_hello(ConnId(1), arriving(hello(1, Some(&token)), mapped), at(NOW));
        let cmds = drain(&mut reg);
        let obs = cmds.iter().find_map(|c| match c {
            Command::Send {
                msg: ServerMessage::Welcome { observed, .. },
                ..
            } => Some(*observed),
            _ => None,
        });
        assert_eq!(obs, Some(SocketAddr::from(([198, 51, 100, 7], 4000))));
    }

    #[test]
    fn a_second_connection_of_the_same_node_supersedes_the_first() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        join(&mut reg, 2, &token);
        reg.handle_hello(
            ConnId(11),
            arriving(hello(1, None), observed(1)),
            at(NOW + 1),
        );
        let cmds = drain(&mut reg);
        assert_eq!(
            cmds[0],
            Command::Close {
                conn: ConnId(1),
                reason: CloseReason::Superseded
            }
        );
        assert!(cmds.iter().any(|c| matches!(
            c,
            Command::Send {
                conn: ConnId(11),
                msg: ServerMessage::Welcome { .. }
            }
        )));
        assert!(cmds.iter().any(|c| matches!(
            c,
            Command::Send {
                conn: ConnId(2),
                msg: ServerMessage::PeerUpsert { .. }
            }
        )));
        assert!(!cmds.iter().any(|c| matches!(
            c,
            Command::Send {
                conn: ConnId(1),
                ..
            }
        )));

        // The old connection's end does not take the node offline.
        reg.handle_disconnect(ConnId(1), at(NOW + 2));
        assert!(drain(&mut reg).is_empty());
        assert!(reg.is_online(&key(1)));
        // And it no longer speaks for the node.
        reg.handle_candidates(ConnId(1), Vec::new(), at(NOW + 3));
        assert!(drain(&mut reg).is_empty());
    }

    #[test]
    fn a_disconnect_marks_the_node_offline_without_a_broadcast() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        join(&mut reg, 2, &token);
        reg.handle_disconnect(ConnId(1), at(NOW + 30));
        assert_eq!(
            drain(&mut reg),
            vec![Command::PersistSoon],
            "presence may be saved late"
        );
        assert!(!reg.is_online(&key(1)));
        assert_eq!(reg.state().nodes[&key(1)].last_seen, NOW + 30);
        let listed: Vec<_> = reg
            .nodes()
            .into_iter()
            .map(|n| (n.public_key, n.online))
            .collect();
        assert_eq!(listed, vec![(key(1), false), (key(2), true)]);
        // A rejected connection's end is nothing.
        reg.handle_disconnect(ConnId(77), at(NOW + 31));
        assert!(drain(&mut reg).is_empty());
    }

    #[test]
    fn a_second_hello_on_an_admitted_connection_is_ignored() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        reg.handle_hello(
            ConnId(1),
            arriving(hello(2, Some(&token)), observed(2)),
            at(NOW),
        );
        assert!(drain(&mut reg).is_empty());
        assert!(!reg.state().nodes.contains_key(&key(2)));
    }

    #[test]
    fn only_the_hash_of_a_token_secret_is_stored() {
        let mut reg = registry();
        let token = reg
            .create_token([0xab; 32], "k8s-join".into(), DAY, Some(2), NOW)
            .unwrap()
            .expose()
            .to_owned();
        assert_eq!(drain(&mut reg), vec![Command::Persist]);
        let (id, secret) = token.split_once('.').unwrap();
        assert_eq!(id, "k8s-join");
        assert_eq!(URL_SAFE_NO_PAD.decode(secret).unwrap(), vec![0xab; 32]);
        let json = serde_json::to_string(reg.state()).unwrap();
        assert!(!json.contains(secret));
        let record = &reg.state().tokens["k8s-join"];
        assert_eq!(record.secret_sha256, sha256_hex(&[0xab; 32]));
        assert_eq!((record.created_at, record.expires_at), (NOW, NOW + DAY));
        assert_eq!(record.status(NOW), TokenStatus::Usable);
    }

    #[test]
    fn token_ids_must_be_valid_unique_and_tokens_usable() {
        let mut reg = registry();
        for bad in ["", "has.dot", "space d", &"x".repeat(MAX_TOKEN_ID + 1)] {
            assert_eq!(
                reg.create_token([1; 32], bad.into(), DAY, None, NOW),
                Err(RegistryError::InvalidTokenId { id: bad.into() })
            );
        }
        reg.create_token([1; 32], "dup".into(), DAY, None, NOW)
            .unwrap();
        assert_eq!(
            reg.create_token([2; 32], "dup".into(), DAY, None, NOW),
            Err(RegistryError::DuplicateTokenId { id: "dup".into() })
        );
        assert_eq!(
            reg.create_token([2; 32], "zero".into(), DAY, Some(0), NOW),
            Err(RegistryError::ZeroUses)
        );
        assert_eq!(reg.tokens().count(), 1);
    }

    #[test]
    fn revoking_a_token_is_persisted_once_and_unknown_ids_are_reported() {
        let (mut reg, _) = with_token();
        assert!(reg.revoke_token("abc123"));
        assert_eq!(drain(&mut reg), vec![Command::Persist]);
        assert!(reg.revoke_token("abc123"));
        assert!(drain(&mut reg).is_empty());
        assert!(!reg.revoke_token("nosuch"));
        assert_eq!(
            reg.tokens().next().map(|t| t.status(NOW)),
            Some(TokenStatus::Revoked)
        );
    }

    #[test]
    fn state_serializes_public_keys_as_json_object_keys() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        reg.remove_node(&key(1), false, NOW);
        drain(&mut reg);
        join(&mut reg, 2, &token);
        let value = serde_json::to_value(reg.state()).unwrap();
        assert!(value["nodes"].get(key(2).to_string()).is_some(), "{value}");
        assert_eq!(value["removed"][0], serde_json::json!(key(1).to_string()));
        assert!(value["tokens"]["abc123"].is_object());
    }

    #[test]
    fn close_codes_are_distinct() {
        let all = [
            CloseReason::Superseded,
            CloseReason::Removed,
            CloseReason::Rejected(RejectReason::Version),
            CloseReason::Rejected(RejectReason::BadProof),
            CloseReason::Rejected(RejectReason::BadToken),
            CloseReason::Rejected(RejectReason::Removed),
            CloseReason::Rejected(RejectReason::BadHello),
            CloseReason::Flooding,
        ];
        let codes: BTreeSet<_> = all.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), all.len());
    }

    // -----------------------------------------------------------------------
    // What a member can make the rendezvous do
    // -----------------------------------------------------------------------

    /// The default limits, except that nothing refills within a test: each
    /// budget is exactly its burst.
    fn no_refill() -> Limits {
        let hour = std::time::Duration::from_secs(3600);
        let d = Limits::default();
        Limits {
            candidates: Rate::new(d.candidates.burst, hour),
            nat: Rate::new(d.nat.burst, hour),
            punch: Rate::new(d.punch.burst, hour),
            punch_pair: Rate::new(d.punch_pair.burst, hour),
            tolerance: Rate::new(d.tolerance.burst, hour),
        }
    }

    fn with_limits(limits: Limits) -> (Registry, String) {
        let mut reg =
            Registry::with_limits(RegistryState::new(mesh("100.72.0.0/16")), server(), limits);
        let token = reg
            .create_token([7; 32], "abc123".into(), DAY, None, NOW)
            .unwrap()
            .expose()
            .to_owned();
        drain(&mut reg);
        (reg, token)
    }

    fn local(port: u16) -> Candidate {
        Candidate {
            addr: SocketAddr::from(([192, 0, 2, 1], port)),
            kind: CandidateKind::Local,
        }
    }

    #[test]
    fn a_candidate_storm_is_held_to_its_rate_and_the_flooder_is_closed() {
        let limits = no_refill();
        let (mut reg, token) = with_limits(limits);
        join(&mut reg, 1, &token);
        join(&mut reg, 2, &token);
        let (mut saves, mut upserts, mut closes, mut handled) = (0, 0, Vec::new(), 0);
        for i in 0..2_000u16 {
            // Each list differs from the one before: every one is a change.
            reg.handle_candidates(ConnId(1), vec![local(1000 + i % 2)], at(NOW));
            handled += 1;
            for cmd in drain(&mut reg) {
                match cmd {
                    Command::Persist | Command::PersistSoon => saves += 1,
                    Command::Send {
                        conn: ConnId(2),
                        msg: ServerMessage::PeerUpsert { .. },
                    } => upserts += 1,
                    Command::Close { conn, reason } => closes.push((conn, reason)),
                    other => panic!("unexpected {other:?}"),
                }
            }
            if !closes.is_empty() {
                break;
            }
        }
        let burst = limits.candidates.burst as usize;
        // One save per message within the rate, and one for going offline.
        assert_eq!(
            (saves, upserts),
            (burst + 1, burst),
            "only the messages within the rate are saved and sent"
        );
        assert_eq!(closes, vec![(ConnId(1), CloseReason::Flooding)]);
        assert_eq!(
            handled,
            burst + limits.tolerance.burst as usize + 1,
            "closed once past the tolerance"
        );
        assert!(!reg.is_online(&key(1)), "its connection is gone");
        reg.handle_candidates(ConnId(1), vec![local(7)], at(NOW));
        assert!(drain(&mut reg).is_empty(), "and speaks for no one any more");
        let over: Vec<_> = reg.counters().over_rate().collect();
        let dropped = (limits.tolerance.burst + 1).into();
        assert_eq!(
            over,
            vec![
                (MessageKind::Candidates, dropped),
                (MessageKind::Nat, 0),
                (MessageKind::Punch, 0)
            ]
        );
        assert_eq!(reg.counters().closed_flooding, 1);
    }

    #[test]
    fn messages_over_the_rate_are_dropped_and_the_budget_refills() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        join(&mut reg, 2, &token);
        let rate = Limits::default().nat;
        let mappings = [
            NatMapping::EndpointDependent,
            NatMapping::EndpointIndependent,
        ];
        for i in 0..rate.burst {
            reg.handle_nat(ConnId(1), mappings[i as usize % 2], at(NOW));
        }
        assert_eq!(
            drain(&mut reg)
                .iter()
                .filter(|c| matches!(c, Command::Send { .. }))
                .count(),
            rate.burst as usize
        );
        reg.handle_nat(ConnId(1), NatMapping::None, at(NOW));
        assert!(drain(&mut reg).is_empty(), "over the rate: dropped");
        assert_eq!(
            reg.state().nodes[&key(1)].nat,
            mappings[(rate.burst as usize - 1) % 2]
        );
        reg.handle_nat(ConnId(1), NatMapping::None, at(NOW + rate.every.as_secs()));
        assert!(
            !drain(&mut reg).is_empty(),
            "one more once the interval passed"
        );
        assert_eq!(reg.state().nodes[&key(1)].nat, NatMapping::None);
        assert!(
            reg.is_online(&key(1)),
            "a few over the rate do not close the connection"
        );
    }

    #[test]
    fn punches_are_passed_on_at_the_pair_rate_and_a_punch_storm_is_closed() {
        let limits = no_refill();
        let (mut reg, token) = with_limits(limits);
        for n in 1..=3 {
            join(&mut reg, n, &token);
        }
        let punch = |to: u64, from: u8| Command::Send {
            conn: ConnId(to),
            msg: ServerMessage::Punch { peer: key(from) },
        };
        for _ in 0..5 {
            reg.handle_punch(ConnId(1), &key(2), at(NOW));
        }
        let pair = limits.punch_pair.burst as usize;
        assert_eq!(
            drain(&mut reg),
            vec![punch(2, 1); pair],
            "the pair's burst, then nothing"
        );
        assert_eq!(reg.counters().punch_pair_limited, 5 - pair as u64);
        reg.handle_punch(ConnId(1), &key(3), at(NOW));
        assert_eq!(
            drain(&mut reg),
            vec![punch(3, 1)],
            "another target has a budget of its own"
        );
        reg.handle_punch(ConnId(2), &key(1), at(NOW));
        assert_eq!(
            drain(&mut reg),
            vec![punch(1, 2)],
            "and so has another requester"
        );

        // A storm of 2,000 punches at one target: still the pair's burst
        // (spent above), and the connection closed once past its budget.
        let mut forwarded = 0;
        let mut closed = false;
        for _ in 0..2_000 {
            reg.handle_punch(ConnId(1), &key(2), at(NOW));
            for cmd in drain(&mut reg) {
                match cmd {
                    Command::Send {
                        msg: ServerMessage::Punch { .. },
                        ..
                    } => forwarded += 1,
                    Command::Close {
                        conn: ConnId(1),
                        reason: CloseReason::Flooding,
                    } => closed = true,
                    Command::PersistSoon => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(forwarded, 0);
        assert!(closed, "a punch storm closes the connection");
    }

    #[test]
    fn the_pair_rate_lets_a_node_punch_every_ten_seconds() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        join(&mut reg, 2, &token);
        for t in (0..120).step_by(10) {
            reg.handle_punch(ConnId(1), &key(2), at(NOW + t));
            assert_eq!(drain(&mut reg).len(), 1, "punch at +{t}s");
        }
        assert_eq!(reg.counters().punch_pair_limited, 0);
    }

    #[test]
    fn candidates_nobody_can_use_are_dropped_and_counted() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        let mesh_v4 = SocketAddr::from((reg.state().mesh.ipv4.network(), 51820));
        let mesh_v6 = SocketAddr::new(IpAddr::V6(reg.state().mesh.ipv6.network()), 51820);
        let announced: Vec<Candidate> = [
            "127.0.0.1:51820",
            "[::1]:51820",
            "169.254.10.1:51820",
            "[fe80::1]:51820",
            "0.0.0.0:51820",
            "[::]:51820",
            "224.0.0.1:51820",
            "[ff02::1]:51820",
            "255.255.255.255:51820",
            "[::ffff:127.0.0.1]:51820",
            "192.0.2.7:0",
            &mesh_v4.to_string(),
            &mesh_v6.to_string(),
            "10.1.2.3:51820",
            "[2001:db8::7]:51820",
        ]
        .iter()
        .map(|a| Candidate {
            addr: a.parse().unwrap(),
            kind: CandidateKind::Local,
        })
        .collect();
        reg.handle_candidates(ConnId(1), announced, at(NOW));
        drain(&mut reg);
        let kept: Vec<String> = reg.state().nodes[&key(1)]
            .candidates
            .iter()
            .map(|c| c.addr.to_string())
            .collect();
        assert_eq!(
            kept,
            vec![
                observed(1).to_string(),
                "10.1.2.3:51820".into(),
                "[2001:db8::7]:51820".into()
            ]
        );
        let refused: Vec<(&str, u64)> = reg
            .counters()
            .candidates_refused()
            .map(|(r, n)| (r.as_str(), n))
            .collect();
        assert_eq!(
            refused,
            vec![
                ("port_zero", 1),
                ("unspecified", 2),
                ("loopback", 3),
                ("link_local", 2),
                ("multicast", 2),
                ("broadcast", 1),
                ("mesh_prefix", 2),
                ("claimed_observed", 0),
            ]
        );
    }

    #[test]
    fn names_are_made_dns_labels() {
        for (asked, label) in [
            ("node-1", "node-1"),
            ("Worker_01.example.com", "worker-01"),
            ("--a  b--", "a-b"),
            ("日本", "node"),
            (".hidden", "hidden"),
            ("...", "node"),
        ] {
            assert_eq!(dns_label(asked), label, "{asked:?}");
        }
        let long = "x".repeat(300);
        assert_eq!(dns_label(&long).len(), MAX_LABEL);
        assert!(
            is_dns_label("node-2")
                && !is_dns_label("Node")
                && !is_dns_label("-a")
                && !is_dns_label("")
        );
    }

    #[test]
    fn a_taken_name_gets_a_suffix_and_the_welcome_says_which() {
        let (mut reg, token) = with_token();
        let named = |reg: &mut Registry, n: u8, name: &str| {
            let mut h = hello(n, Some(&token));
            h.name = name.into();
            reg.handle_hello(ConnId(n.into()), arriving(h.clone(), observed(n)), at(NOW));
            welcome(&drain(reg)).0.name
        };
        assert_eq!(named(&mut reg, 1, "node-a"), "node-a");
        assert_eq!(named(&mut reg, 2, "node-a"), "node-a-2");
        assert_eq!(named(&mut reg, 3, "NODE-A.lab"), "node-a-3");
        assert_eq!(named(&mut reg, 4, &"y".repeat(70)), "y".repeat(MAX_LABEL));
        assert_eq!(
            named(&mut reg, 5, &"y".repeat(70)),
            format!("{}-2", "y".repeat(MAX_LABEL - 2))
        );
        let names: BTreeSet<String> = reg.nodes().into_iter().map(|n| n.name).collect();
        assert_eq!(names.len(), 5, "{names:?}");
    }

    #[test]
    fn a_readmitted_node_keeps_its_bound_name_and_only_the_operator_renames() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        join(&mut reg, 2, &token);
        let mut claim = hello(1, None);
        claim.name = "node-2".into();
        reg.handle_hello(
            ConnId(11),
            arriving(claim.clone(), observed(1)),
            at(NOW + 1),
        );
        assert_eq!(
            welcome(&drain(&mut reg)).0.name,
            "node-1",
            "a hello cannot take another's name"
        );

        assert_eq!(
            reg.rename_node(&key(1), "node-2"),
            Err(RegistryError::NameTaken {
                name: "node-2".into()
            })
        );
        assert!(matches!(
            reg.rename_node(&key(1), "Bad Name"),
            Err(RegistryError::InvalidName { .. })
        ));
        assert!(
            drain(&mut reg).is_empty(),
            "a refused rename changes nothing"
        );
        reg.rename_node(&key(1), "db-1").unwrap();
        let cmds = drain(&mut reg);
        assert_eq!(cmds[0], Command::Persist);
        assert!(
            matches!(&cmds[1..], [Command::Send { conn: ConnId(2), msg: ServerMessage::PeerUpsert { peer } }]
            if peer.name == "db-1"),
            "{cmds:?}"
        );

        // The operator's rename wins over the next hello too.
        reg.handle_hello(
            ConnId(12),
            arriving(hello(1, None), observed(1)),
            at(NOW + 2),
        );
        assert_eq!(welcome(&drain(&mut reg)).0.name, "db-1");
    }

    #[test]
    fn a_state_with_shared_or_odd_names_loads_with_unique_labels() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        join(&mut reg, 2, &token);
        join(&mut reg, 3, &token);
        let mut state = reg.state().clone();
        // As v0.1.0 kept them: whatever each hello said.
        for (n, name) in [(1, "Node-A"), (2, "node-a"), (3, "node-a.lab")] {
            state.nodes.get_mut(&key(n)).unwrap().name = name.into();
        }
        let mut loaded = Registry::new(state, server());
        assert_eq!(
            drain(&mut loaded),
            vec![Command::Persist],
            "the new names are saved"
        );
        let names: Vec<String> = loaded.nodes().into_iter().map(|n| n.name).collect();
        assert_eq!(
            names,
            vec!["node-a", "node-a-2", "node-a-3"],
            "in key order"
        );
        let mut again = Registry::new(loaded.state().clone(), server());
        assert!(
            drain(&mut again).is_empty(),
            "a second load changes nothing"
        );
    }

    /// A key whose first address choice in `mesh` is `wanted`, as a token
    /// holder would grind one.
    fn ground_key(wanted: Ipv4Addr, mesh: ipnet::Ipv4Net) -> PrivateKey {
        (0..=u16::MAX)
            .map(|i| {
                let mut bytes = [0xee; 32];
                bytes[..2].copy_from_slice(&i.to_be_bytes());
                PrivateKey::from_bytes(bytes)
            })
            .find(|k| ipam::ipv4_candidates(&k.public_key(), mesh).next() == Some(wanted))
            .expect("a /24 is quick to grind")
    }

    #[test]
    fn a_removed_nodes_addresses_are_quarantined_until_the_operator_releases_them() {
        let mut reg = Registry::new(RegistryState::new(mesh("10.9.8.0/24")), server());
        let token = reg
            .create_token([8; 32], "many".into(), DAY, None, NOW)
            .unwrap()
            .expose()
            .to_owned();
        drain(&mut reg);
        let (victim, _) = welcome(&join(&mut reg, 1, &token));
        assert!(reg.remove_node(&key(1), false, NOW + 5));
        drain(&mut reg);
        assert_eq!(
            reg.quarantined(),
            &[Quarantined {
                public_key: key(1),
                name: "node-1".into(),
                ipv4: victim.ipv4,
                ipv6: victim.ipv6,
                removed_at: NOW + 5
            }]
        );

        let grinder = ground_key(victim.ipv4, reg.state().mesh.ipv4);
        let h = hello_as(&grinder, "node-0", Some(&token));
        reg.handle_hello(ConnId(20), arriving(h.clone(), observed(20)), at(NOW + 6));
        let (got, _) = welcome(&drain(&mut reg));
        assert_ne!(
            got.ipv4, victim.ipv4,
            "a ground key does not get the removed node's address"
        );
        assert_ne!(got.ipv6, victim.ipv6);

        assert_eq!(
            reg.release_address(IpAddr::V4(got.ipv4)),
            Err(RegistryError::NotQuarantined {
                address: IpAddr::V4(got.ipv4)
            })
        );
        let released = reg.release_address(IpAddr::V6(victim.ipv6)).unwrap();
        assert_eq!(released.ipv4, victim.ipv4, "either address releases both");
        assert_eq!(drain(&mut reg), vec![Command::Persist]);
        assert!(reg.quarantined().is_empty());
        reg.remove_node(&grinder.public_key(), true, NOW + 7);
        drain(&mut reg);
        assert!(
            reg.quarantined().is_empty(),
            "removed with release: nothing held"
        );
        let h = hello_as(&grinder, "again", Some(&token));
        reg.handle_hello(ConnId(21), arriving(h.clone(), observed(20)), at(NOW + 8));
        assert_rejected_only(&drain(&mut reg), ConnId(21), RejectReason::Removed);
    }

    #[test]
    fn a_strangers_token_id_is_logged_bounded() {
        let huge = "x".repeat(15_000);
        let (reg, _) = with_token();
        let refusal = reg
            .check_token(Some(&format!("{huge}.secret")), NOW)
            .err()
            .unwrap();
        assert!(refusal.cause.len() < 150, "{}", refusal.cause);
    }
}
