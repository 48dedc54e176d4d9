//! The rendezvous registry: admission, overlay address allocation and
//! peer-map distribution, as a state machine.
//!
//! Pure: no socket, clock, random source or file. The quinn shell feeds it
//! inputs — a verified [`Hello`], a node's candidates, a disconnect, an
//! operator's request — with the time as `now_unix` (seconds) and any random
//! token secret as an argument, then drains [`Registry::poll_command`] and
//! executes the [`Command`]s: send a message on a connection, close one,
//! persist [`Registry::state`]. Tests are "this input ⇒ these commands".
//!
//! One registry instance processes one input at a time, so two joins that
//! race for the last use of a token, or for the same address, are decided by
//! the order the shell hands them over; exactly one wins.
//!
//! # Join tokens
//!
//! A token reads `<id>.<secret>`: the id names the token in `token list` and
//! `token revoke` and is not secret (like the first half of a kubeadm
//! token); the secret is 32 random bytes in unpadded base64url. Only the
//! SHA-256 of the secret is stored, and a presented secret is compared with
//! it in constant time.
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
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::identity::PublicKey;
use crate::ipam;
use crate::wire::control::{
    Candidate, CandidateKind, Hello, MeshInfo, NatMapping, NodeEntry, RejectReason, ServerMessage,
    MAX_CANDIDATES, MAX_NAME, PROTOCOL_VERSION,
};

/// Longest token id accepted.
pub const MAX_TOKEN_ID: usize = 32;

/// A QUIC connection in the shell; the shell picks the numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn#{}", self.0)
    }
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
}

impl RegistryState {
    /// A new mesh with no nodes, tokens or removals.
    pub fn new(mesh: MeshInfo) -> Self {
        Self { mesh, nodes: BTreeMap::new(), tokens: BTreeMap::new(), removed: BTreeSet::new() }
    }
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

/// What the shell must do, in order.
// Commands are short-lived (queued, then executed at once), so boxing the
// message would cost an allocation each for no lasting saving.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Send `msg` on the connection's control stream.
    Send { conn: ConnId, msg: ServerMessage },
    /// Close the connection (after sending what was queued for it before).
    Close { conn: ConnId, reason: CloseReason },
    /// Save [`Registry::state`] — as it is when this command is polled —
    /// before executing the commands after it, so that no node is told an
    /// address that a crash could forget.
    Persist,
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
}

impl CloseReason {
    /// A QUIC application error code for the close frame.
    pub fn code(self) -> u32 {
        match self {
            CloseReason::Superseded => 1,
            CloseReason::Removed => 2,
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
}

/// An admitted connection.
#[derive(Debug, Clone, Copy)]
struct Session {
    key: PublicKey,
    observed: SocketAddr,
}

/// Why a hello was refused, for the node and for the log.
struct Refusal {
    reason: RejectReason,
    message: String,
    /// The precise cause, logged but not sent.
    cause: String,
}

impl Refusal {
    fn new(reason: RejectReason, message: impl Into<String>, cause: impl Into<String>) -> Self {
        Self { reason, message: message.into(), cause: cause.into() }
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
    /// Admitted connections only; a rejected one leaves no trace.
    sessions: HashMap<ConnId, Session>,
    /// Each online node's current connection.
    online: BTreeMap<PublicKey, ConnId>,
    commands: VecDeque<Command>,
    /// A [`Command::Persist`] is queued and not yet polled: one is enough,
    /// since it saves the state as of when it is polled.
    persist_queued: bool,
    /// Hellos refused since this registry was made, indexed as
    /// [`REJECT_REASONS`]; for metrics, not persisted.
    rejections: [u64; REJECT_REASONS.len()],
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
    /// A registry over loaded (or fresh) state; every node starts offline.
    pub fn new(state: RegistryState) -> Self {
        Self {
            state,
            sessions: HashMap::new(),
            online: BTreeMap::new(),
            commands: VecDeque::new(),
            persist_queued: false,
            rejections: [0; REJECT_REASONS.len()],
        }
    }

    /// Everything to persist.
    pub fn state(&self) -> &RegistryState {
        &self.state
    }

    /// A node's hello on `conn`, which the shell has already checked for
    /// proof of possession of `hello.public_key` (the proof needs the TLS
    /// exporter, which only the shell has): this takes it as given.
    /// `observed` is the source address the connection comes from.
    ///
    /// Queues either a `Rejected` and a close, or (admitted) a persist, the
    /// `Welcome` for `conn`, and a `PeerUpsert` for every other online node;
    /// an older connection of the same node is closed as superseded.
    /// A second hello on an already admitted connection is ignored.
    pub fn handle_hello(
        &mut self,
        conn: ConnId,
        hello: &Hello,
        observed: SocketAddr,
        now_unix: u64,
    ) {
        if self.sessions.contains_key(&conn) {
            tracing::debug!(%conn, "second hello on an admitted connection ignored");
            return;
        }
        let key = hello.public_key;
        if let Err(refusal) = self.admit(hello, now_unix) {
            tracing::info!(%conn, node = %key.short(), cause = %refusal.cause, "hello rejected");
            self.count_rejection(refusal.reason);
            self.push(Command::Send {
                conn,
                msg: ServerMessage::Rejected { reason: refusal.reason, message: refusal.message },
            });
            self.push(Command::Close { conn, reason: CloseReason::Rejected(refusal.reason) });
            return;
        }

        // Admitted: the record exists now. Refresh what the hello says.
        let observed = SocketAddr::new(observed.ip().to_canonical(), observed.port());
        let Some(record) = self.state.nodes.get_mut(&key) else {
            return;
        };
        record.name.clone_from(&hello.name);
        record.candidates = merge_candidates(&hello.candidates, observed);
        record.last_seen = now_unix;
        let entry = node_entry(&key, record);

        if let Some(old) = self.online.insert(key, conn) {
            self.sessions.remove(&old);
            tracing::debug!(node = %key.short(), %old, new = %conn, "connection superseded");
            self.push(Command::Close { conn: old, reason: CloseReason::Superseded });
        }
        self.sessions.insert(conn, Session { key, observed });
        self.persist();

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
    /// that is not admitted, and when the list is longer than
    /// [`MAX_CANDIDATES`]. A change is persisted and sent to every other
    /// online node.
    pub fn handle_candidates(&mut self, conn: ConnId, candidates: Vec<Candidate>, now_unix: u64) {
        let Some(session) = self.sessions.get(&conn).copied() else {
            tracing::trace!(%conn, "candidates from a connection that is not admitted");
            return;
        };
        if candidates.len() > MAX_CANDIDATES {
            tracing::debug!(%conn, count = candidates.len(), "too many candidates; ignored");
            return;
        }
        let Some(record) = self.state.nodes.get_mut(&session.key) else {
            return;
        };
        record.last_seen = now_unix;
        let merged = merge_candidates(&candidates, session.observed);
        if merged == record.candidates {
            return;
        }
        record.candidates = merged;
        let entry = node_entry(&session.key, record);
        self.persist();
        self.broadcast_except(conn, &ServerMessage::PeerUpsert { peer: entry });
    }

    /// An admitted node reports its NAT's mapping behaviour. A change is
    /// persisted and sent to every other online node, like candidates.
    pub fn handle_nat(&mut self, conn: ConnId, mapping: NatMapping, now_unix: u64) {
        let Some(session) = self.sessions.get(&conn).copied() else {
            tracing::trace!(%conn, "NAT report from a connection that is not admitted");
            return;
        };
        let Some(record) = self.state.nodes.get_mut(&session.key) else {
            return;
        };
        record.last_seen = now_unix;
        if record.nat == mapping {
            return;
        }
        record.nat = mapping;
        let entry = node_entry(&session.key, record);
        self.persist();
        self.broadcast_except(conn, &ServerMessage::PeerUpsert { peer: entry });
    }

    /// An admitted node asks `peer` to probe it now (hole punching). Passed
    /// on only between two online members; anything else is ignored.
    pub fn handle_punch(&mut self, conn: ConnId, peer: &PublicKey) {
        let Some(session) = self.sessions.get(&conn).copied() else { return };
        if session.key == *peer {
            return;
        }
        if let Some(&target) = self.online.get(peer) {
            self.commands.push_back(Command::Send { conn: target, msg: ServerMessage::Punch { peer: session.key } });
        }
    }

    /// The shell's connection ended (for any reason, including one this
    /// registry asked for). An admitted node goes offline; its peers keep
    /// its last candidates, so nothing is broadcast.
    pub fn handle_disconnect(&mut self, conn: ConnId, now_unix: u64) {
        let Some(session) = self.sessions.remove(&conn) else {
            return;
        };
        if self.online.get(&session.key) == Some(&conn) {
            self.online.remove(&session.key);
        }
        if let Some(record) = self.state.nodes.get_mut(&session.key) {
            record.last_seen = now_unix;
            self.persist();
        }
    }

    /// Removes a node for good: its record goes, its key is refused from now
    /// on, every online node gets a `PeerRemove`, and the node itself, if
    /// online, a `Rejected { Removed }` and a close. Its addresses become
    /// free. `false` (and nothing queued) if `key` is not a registered node.
    pub fn remove_node(&mut self, key: &PublicKey) -> bool {
        if self.state.nodes.remove(key).is_none() {
            return false;
        }
        self.state.removed.insert(*key);
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
            self.push(Command::Close { conn, reason: CloseReason::Removed });
        }
        let msg = ServerMessage::PeerRemove { public_key: *key };
        let conns: Vec<ConnId> = self.online.values().copied().collect();
        for conn in conns {
            self.push(Command::Send { conn, msg: msg.clone() });
        }
        true
    }

    /// Creates a join token and returns it in full (`<id>.<secret>`, the
    /// only time the secret exists outside the caller). `secret` must come
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
    ) -> Result<String, RegistryError> {
        if !valid_token_id(&id) {
            return Err(RegistryError::InvalidTokenId { id });
        }
        if self.state.tokens.contains_key(&id) {
            return Err(RegistryError::DuplicateTokenId { id });
        }
        if max_uses == Some(0) {
            return Err(RegistryError::ZeroUses);
        }
        let token = format!("{id}.{}", URL_SAFE_NO_PAD.encode(secret));
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
    /// refusals; the shell reports those it makes before the registry sees
    /// the hello (a version it cannot read, a malformed hello, a failed
    /// proof), so that one place has them all.
    pub fn count_rejection(&mut self, reason: RejectReason) {
        if let Some(count) = self.rejections.get_mut(reject_index(reason)) {
            *count = count.saturating_add(1);
        }
    }

    /// Hellos refused since this registry was made, for every reason.
    pub fn rejections(&self) -> impl Iterator<Item = (RejectReason, u64)> + '_ {
        REJECT_REASONS.iter().zip(&self.rejections).map(|(reason, count)| (*reason, *count))
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
        if cmd == Command::Persist {
            self.persist_queued = false;
        }
        Some(cmd)
    }

    /// Checks the hello and, for a new node, the token and a free address;
    /// on success the node's record exists (created for a new node, with
    /// the token's use counted). On failure nothing has changed.
    fn admit(&mut self, hello: &Hello, now_unix: u64) -> Result<(), Refusal> {
        if hello.version != PROTOCOL_VERSION {
            return Err(Refusal::new(
                RejectReason::Version,
                format!(
                    "this rendezvous speaks protocol version {PROTOCOL_VERSION}, the node {}; \
                     upgrade the older side",
                    hello.version
                ),
                format!("version {}", hello.version),
            ));
        }
        if let Err(problem) = check_name(&hello.name) {
            return Err(Refusal::new(RejectReason::BadHello, problem.clone(), problem));
        }
        if hello.candidates.len() > MAX_CANDIDATES {
            let problem = format!(
                "{} candidates announced; at most {MAX_CANDIDATES} are accepted",
                hello.candidates.len()
            );
            return Err(Refusal::new(RejectReason::BadHello, problem.clone(), problem));
        }
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
            return Ok(());
        }

        let token_id = self.check_token(hello.token.as_deref(), now_unix)?;
        let (ipv4, ipv6) = self.allocate(&key)?;
        if let Some(token) = self.state.tokens.get_mut(&token_id) {
            token.uses = token.uses.saturating_add(1);
        }
        tracing::info!(
            node = %key.short(), name = %hello.name, %ipv4, %ipv6, token = %token_id,
            "node joined"
        );
        self.state.nodes.insert(
            key,
            NodeRecord {
                name: hello.name.clone(),
                ipv4,
                ipv6,
                joined_at: now_unix,
                last_seen: now_unix,
                candidates: Vec::new(),
                nat: NatMapping::Unknown,
            },
        );
        Ok(())
    }

    /// The id of the usable token `presented` names, or why not.
    fn check_token(&self, presented: Option<&str>, now_unix: u64) -> Result<String, Refusal> {
        let refused = |cause: String| Refusal::new(RejectReason::BadToken, TOKEN_REFUSED, cause);
        let Some(presented) = presented else {
            return Err(Refusal::new(RejectReason::BadToken, TOKEN_MISSING, "no token"));
        };
        let Some((id, secret)) = presented.trim().split_once('.') else {
            return Err(refused("malformed token".into()));
        };
        let Some(record) = self.state.tokens.get(id) else {
            return Err(refused(format!("unknown token id {id:?}")));
        };
        // A secret that is not base64 hashes as empty and cannot match.
        let secret = URL_SAFE_NO_PAD.decode(secret).unwrap_or_default();
        let presented_hash = sha256_hex(&secret);
        // subtle compares equal-length slices in constant time; the length
        // (64 hex digits) is no secret.
        let matches: bool = presented_hash.as_bytes().ct_eq(record.secret_sha256.as_bytes()).into();
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

    /// The first IPv4 candidate of `key` that no other node holds, and
    /// likewise for IPv6 (where a collision is a 2^-80 event, checked all
    /// the same).
    fn allocate(&self, key: &PublicKey) -> Result<(Ipv4Addr, Ipv6Addr), Refusal> {
        let others = self.state.nodes.iter().filter(|(k, _)| *k != key).map(|(_, r)| r);
        let (mut taken4, mut taken6) = (HashSet::new(), HashSet::new());
        for r in others {
            taken4.insert(r.ipv4);
            taken6.insert(r.ipv6);
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
                     nodes before more can join",
                    mesh.ipv4
                ),
                format!("mesh {} full", mesh.ipv4),
            )),
        }
    }

    fn broadcast_except(&mut self, except: ConnId, msg: &ServerMessage) {
        let conns: Vec<ConnId> = self.online.values().copied().filter(|c| *c != except).collect();
        for conn in conns {
            self.push(Command::Send { conn, msg: msg.clone() });
        }
    }

    fn persist(&mut self) {
        if !self.persist_queued {
            self.persist_queued = true;
            self.commands.push_back(Command::Persist);
        }
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

/// The node's announced candidates plus the observed one, ordered
/// Advertised, Observed, Local (stable within a kind), one per address.
/// "Observed" is the rendezvous's to say, so the node's own claims of that
/// kind are dropped, as are addresses nobody can send to.
fn merge_candidates(announced: &[Candidate], observed: SocketAddr) -> Vec<Candidate> {
    let mut all: Vec<Candidate> = announced
        .iter()
        .filter(|c| c.kind != CandidateKind::Observed && reachable(c.addr))
        .map(|c| Candidate { addr: canonical(c.addr), kind: c.kind })
        .collect();
    all.push(Candidate { addr: observed, kind: CandidateKind::Observed });
    all.sort_by_key(|c| c.kind);
    let mut seen = HashSet::new();
    all.retain(|c| seen.insert(c.addr));
    all
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn reachable(addr: SocketAddr) -> bool {
    addr.port() != 0 && !addr.ip().is_unspecified() && !addr.ip().is_multicast()
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

fn valid_token_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_TOKEN_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for b in digest {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::control::Proof;

    const NOW: u64 = 1_700_000_000;
    const DAY: u64 = 86_400;

    fn key(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    fn mesh(cidr: &str) -> MeshInfo {
        MeshInfo {
            id: "test-mesh".into(),
            ipv4: cidr.parse().unwrap(),
            ipv6: ipam::ula_prefix([0x12, 0x34, 0x56, 0x78, 0x9a]),
        }
    }

    fn registry() -> Registry {
        Registry::new(RegistryState::new(mesh("100.72.0.0/16")))
    }

    fn hello(n: u8, token: Option<&str>) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            public_key: key(n),
            name: format!("node-{n}"),
            listen_port: 51820,
            token: token.map(str::to_owned),
            candidates: vec![Candidate {
                addr: SocketAddr::from(([10, 0, 0, n], 51820)),
                kind: CandidateKind::Local,
            }],
            proof: Proof([0; 32]),
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
        let token = reg.create_token([7; 32], "abc123".into(), DAY, None, NOW).unwrap();
        drain(&mut reg);
        (reg, token)
    }

    /// Admits node `n` on `ConnId(n)` and drains the commands.
    fn join(reg: &mut Registry, n: u8, token: &str) -> Vec<Command> {
        reg.handle_hello(ConnId(n.into()), &hello(n, Some(token)), observed(n), NOW);
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
                Command::Send { msg: ServerMessage::Welcome { node, peers, .. }, .. } => {
                    Some((node.clone(), peers.clone()))
                }
                _ => None,
            })
            .expect("a welcome")
    }

    fn assert_rejected_only(cmds: &[Command], conn: ConnId, reason: RejectReason) -> String {
        let [send, close] = cmds else {
            panic!("expected only Rejected({reason:?}) + Close, got {cmds:?}");
        };
        assert_eq!(close, &Command::Close { conn, reason: CloseReason::Rejected(reason) });
        match send {
            Command::Send { conn: to, msg: ServerMessage::Rejected { reason: r, message } } => {
                assert_eq!((*to, *r), (conn, reason));
                message.clone()
            }
            other => panic!("expected Rejected({reason:?}), got {other:?}"),
        }
    }

    #[test]
    fn a_new_node_with_a_good_token_is_persisted_then_welcomed() {
        let (mut reg, token) = with_token();
        reg.handle_hello(ConnId(1), &hello(1, Some(&token)), observed(1), NOW);
        let cmds = drain(&mut reg);
        assert_eq!(cmds.len(), 2, "{cmds:?}");
        assert_eq!(cmds[0], Command::Persist);
        let expected_v4 = ipam::ipv4_candidates(&key(1), reg.state().mesh.ipv4).next().unwrap();
        let expected_v6 = ipam::ipv6_for(&key(1), reg.state().mesh.ipv6);
        match &cmds[1] {
            Command::Send {
                conn,
                msg: ServerMessage::Welcome { node, mesh, observed: obs, peers },
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
        reg.handle_disconnect(ConnId(2), NOW + 5);
        drain(&mut reg);
        let (me, peers) = welcome(&join(&mut reg, 3, &token));
        assert_eq!(me.public_key, key(3));
        let keys: Vec<_> = peers.iter().map(|p| p.public_key).collect();
        assert_eq!(keys, vec![key(1), key(2)]);
        let offline = &peers[1];
        assert!(offline
            .candidates
            .contains(&Candidate { addr: observed(2), kind: CandidateKind::Observed }));
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
                Command::Send { conn, msg: ServerMessage::PeerUpsert { peer } } => {
                    Some((*conn, peer.clone()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(upserts, vec![(ConnId(1), me.clone()), (ConnId(2), me)]);
    }

    #[test]
    fn rejections_queue_only_rejected_and_close_and_change_nothing() {
        let mut reg = registry();
        let unlimited = reg.create_token([1; 32], "open".into(), DAY, None, NOW).unwrap();
        let expired = reg.create_token([2; 32], "old".into(), 10, None, NOW - 100).unwrap();
        let revoked = reg.create_token([3; 32], "gone".into(), DAY, None, NOW).unwrap();
        reg.revoke_token("gone");
        let used = reg.create_token([4; 32], "once".into(), DAY, Some(1), NOW).unwrap();
        drain(&mut reg);
        join(&mut reg, 1, &used);
        join(&mut reg, 2, &unlimited);
        reg.remove_node(&key(2));
        drain(&mut reg);
        let wrong_secret = format!("open.{}", URL_SAFE_NO_PAD.encode([9u8; 32]));

        let mut cases: Vec<(&str, Hello, RejectReason)> = vec![
            ("wrong secret", hello(10, Some(&wrong_secret)), RejectReason::BadToken),
            ("unknown id", hello(10, Some("nosuch.AAAA")), RejectReason::BadToken),
            ("no dot", hello(10, Some("garbage")), RejectReason::BadToken),
            ("bad base64", hello(10, Some("open.!!!")), RejectReason::BadToken),
            ("no token", hello(10, None), RejectReason::BadToken),
            ("expired", hello(10, Some(&expired)), RejectReason::BadToken),
            ("revoked", hello(10, Some(&revoked)), RejectReason::BadToken),
            ("used up", hello(10, Some(&used)), RejectReason::BadToken),
            ("removed", hello(2, Some(&unlimited)), RejectReason::Removed),
        ];
        let mut v = hello(10, Some(&unlimited));
        v.version = PROTOCOL_VERSION + 1;
        cases.push(("version", v, RejectReason::Version));
        for name in [String::new(), "x".repeat(MAX_NAME + 1), "evil\nname".into(), "a\u{7f}".into()]
        {
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
            reg.handle_hello(ConnId(99), &h, observed(10), NOW);
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
        reg.handle_hello(ConnId(2), &hello(2, None), observed(2), NOW);
        reg.handle_hello(ConnId(3), &hello(3, Some("nosuch.AAAA")), observed(3), NOW);
        let mut newer = hello(4, Some(&token));
        newer.version = PROTOCOL_VERSION + 1;
        reg.handle_hello(ConnId(4), &newer, observed(4), NOW);
        // One the shell refused before the registry saw it.
        reg.count_rejection(RejectReason::BadProof);
        drain(&mut reg);
        let counts: Vec<(RejectReason, u64)> = reg.rejections().collect();
        assert_eq!(
            counts,
            vec![
                (RejectReason::Version, 1),
                (RejectReason::BadProof, 1),
                (RejectReason::BadToken, 2),
                (RejectReason::Removed, 0),
                (RejectReason::BadHello, 0),
            ]
        );
    }

    #[test]
    fn token_failures_do_not_reveal_whether_the_token_id_exists() {
        let (mut reg, _) = with_token();
        let wrong = format!("abc123.{}", URL_SAFE_NO_PAD.encode([9u8; 32]));
        let unknown = format!("zzz999.{}", URL_SAFE_NO_PAD.encode([9u8; 32]));
        reg.handle_hello(ConnId(1), &hello(1, Some(&wrong)), observed(1), NOW);
        let a = assert_rejected_only(&drain(&mut reg), ConnId(1), RejectReason::BadToken);
        reg.handle_hello(ConnId(2), &hello(2, Some(&unknown)), observed(2), NOW);
        let b = assert_rejected_only(&drain(&mut reg), ConnId(2), RejectReason::BadToken);
        assert_eq!(a, b);
        assert!(!a.contains("abc123"));
    }

    #[test]
    fn a_token_is_expired_from_its_expiry_second_on() {
        let mut reg = registry();
        let token = reg.create_token([5; 32], "short".into(), 60, None, NOW).unwrap();
        drain(&mut reg);
        reg.handle_hello(ConnId(1), &hello(1, Some(&token)), observed(1), NOW + 60);
        let message = assert_rejected_only(&drain(&mut reg), ConnId(1), RejectReason::BadToken);
        assert_eq!(message, TOKEN_EXPIRED);
        reg.handle_hello(ConnId(2), &hello(1, Some(&token)), observed(1), NOW + 59);
        assert_eq!(welcome(&drain(&mut reg)).0.public_key, key(1));
    }

    #[test]
    fn a_removed_node_is_refused_even_with_a_valid_token() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        assert!(reg.remove_node(&key(1)));
        drain(&mut reg);
        reg.handle_hello(ConnId(5), &hello(1, Some(&token)), observed(1), NOW);
        assert_rejected_only(&drain(&mut reg), ConnId(5), RejectReason::Removed);
        assert_eq!(reg.state().tokens["abc123"].uses, 1);
    }

    #[test]
    fn a_single_use_token_admits_exactly_one_of_twenty_concurrent_joins() {
        let mut reg = registry();
        let token = reg.create_token([8; 32], "once".into(), DAY, Some(1), NOW).unwrap();
        drain(&mut reg);
        for n in 1..=20u8 {
            reg.handle_hello(ConnId(n.into()), &hello(n, Some(&token)), observed(n), NOW);
        }
        let cmds = drain(&mut reg);
        let welcomes = cmds
            .iter()
            .filter(|c| matches!(c, Command::Send { msg: ServerMessage::Welcome { .. }, .. }))
            .count();
        let rejects = cmds
            .iter()
            .filter(|c| matches!(c, Command::Send { msg: ServerMessage::Rejected { .. }, .. }))
            .count();
        assert_eq!((welcomes, rejects), (1, 19));
        assert_eq!(reg.state().nodes.len(), 1);
        assert_eq!(reg.state().tokens["once"].uses, 1);
    }

    #[test]
    fn a_multi_use_token_counts_its_uses() {
        let mut reg = registry();
        let token = reg.create_token([8; 32], "three".into(), DAY, Some(3), NOW).unwrap();
        drain(&mut reg);
        for n in 1..=3 {
            join(&mut reg, n, &token);
        }
        assert_eq!(reg.state().tokens["three"].status(NOW), TokenStatus::UsedUp);
        reg.handle_hello(ConnId(4), &hello(4, Some(&token)), observed(4), NOW);
        assert_rejected_only(&drain(&mut reg), ConnId(4), RejectReason::BadToken);
    }

    #[test]
    fn a_known_node_rejoins_without_a_token_and_keeps_its_address() {
        let (mut reg, token) = with_token();
        let (first, _) = welcome(&join(&mut reg, 1, &token));
        reg.handle_disconnect(ConnId(1), NOW + 1);
        drain(&mut reg);
        reg.revoke_token("abc123");
        drain(&mut reg);
        let mut again = hello(1, None);
        again.name = "renamed".into();
        reg.handle_hello(ConnId(7), &again, observed(1), NOW + 2);
        let (second, _) = welcome(&drain(&mut reg));
        assert_eq!((second.ipv4, second.ipv6), (first.ipv4, first.ipv6));
        assert_eq!(second.name, "renamed");
        assert_eq!(reg.state().tokens["abc123"].uses, 1);
        assert_eq!(reg.state().nodes[&key(1)].joined_at, NOW);
    }

    #[test]
    fn a_token_sent_by_a_known_node_is_not_spent() {
        let mut reg = registry();
        let token = reg.create_token([8; 32], "two".into(), DAY, Some(2), NOW).unwrap();
        drain(&mut reg);
        join(&mut reg, 1, &token);
        reg.handle_hello(ConnId(9), &hello(1, Some(&token)), observed(1), NOW);
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

        let mut restarted = Registry::new(loaded);
        for n in 1..=5u8 {
            restarted.handle_hello(
                ConnId(100 + u64::from(n)),
                &hello(n, None),
                observed(n),
                NOW + 60,
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
        let mut reg = Registry::new(RegistryState::new(mesh("10.9.8.0/29")));
        let token = reg.create_token([8; 32], "many".into(), DAY, Some(7), NOW).unwrap();
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
        reg.handle_hello(ConnId(7), &hello(7, Some(&token)), observed(7), NOW);
        let message = assert_rejected_only(&drain(&mut reg), ConnId(7), RejectReason::BadToken);
        assert!(message.contains("no free overlay address"), "{message}");
        assert_eq!(reg.state().tokens["many"].uses, 6);

        // Removing a node frees its address for the next one.
        let freed = reg.state().nodes[&key(3)].ipv4;
        reg.remove_node(&key(3));
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
        assert_eq!(Some(e.ipv6), ipam::ipv6_candidates(&key(1), reg.state().mesh.ipv6).nth(1));
    }

    #[test]
    fn removal_is_persisted_broadcast_and_closes_the_node() {
        let (mut reg, token) = with_token();
        for n in 1..=3 {
            join(&mut reg, n, &token);
        }
        assert!(reg.remove_node(&key(2)));
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
                Command::Close { conn: ConnId(2), reason: CloseReason::Removed },
                Command::Send {
                    conn: ConnId(1),
                    msg: ServerMessage::PeerRemove { public_key: key(2) }
                },
                Command::Send {
                    conn: ConnId(3),
                    msg: ServerMessage::PeerRemove { public_key: key(2) }
                },
            ]
        );
        assert!(reg.state().removed.contains(&key(2)));
        assert!(!reg.state().nodes.contains_key(&key(2)));
        assert!(!reg.is_online(&key(2)));

        // Its connection no longer counts as admitted.
        reg.handle_candidates(ConnId(2), Vec::new(), NOW);
        assert!(drain(&mut reg).is_empty());
        // And it is not in later welcomes.
        reg.handle_hello(ConnId(9), &hello(1, None), observed(1), NOW);
        let (_, peers) = welcome(&drain(&mut reg));
        assert_eq!(peers.iter().map(|p| p.public_key).collect::<Vec<_>>(), vec![key(3)]);
    }

    #[test]
    fn removing_an_unknown_node_does_nothing() {
        let mut reg = registry();
        assert!(!reg.remove_node(&key(1)));
        assert!(drain(&mut reg).is_empty());
        assert!(reg.state().removed.is_empty());
    }

    #[test]
    fn a_candidate_change_is_persisted_and_announced_to_the_others() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        join(&mut reg, 2, &token);
        let new = Candidate {
            addr: SocketAddr::from(([192, 0, 2, 1], 51820)),
            kind: CandidateKind::Advertised,
        };
        reg.handle_candidates(ConnId(1), vec![new], NOW + 10);
        let cmds = drain(&mut reg);
        let expected = vec![new, Candidate { addr: observed(1), kind: CandidateKind::Observed }];
        let upsert =
            |peer| Command::Send { conn: ConnId(2), msg: ServerMessage::PeerUpsert { peer } };
        let mut entry = node_entry(&key(1), &reg.state().nodes[&key(1)]);
        entry.candidates.clone_from(&expected);
        assert_eq!(cmds, vec![Command::Persist, upsert(entry)]);
        assert_eq!(reg.state().nodes[&key(1)].candidates, expected);
        assert_eq!(reg.state().nodes[&key(1)].last_seen, NOW + 10);

        // The same list again changes nothing.
        reg.handle_candidates(ConnId(1), vec![new], NOW + 20);
        assert!(drain(&mut reg).is_empty());
    }

    #[test]
    fn a_nat_report_reaches_the_other_nodes_once_and_is_kept() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        join(&mut reg, 2, &token);
        drain(&mut reg);
        reg.handle_nat(ConnId(1), NatMapping::EndpointDependent, NOW + 1);
        let cmds = drain(&mut reg);
        assert!(cmds.iter().any(|c| matches!(c, Command::Persist)), "{cmds:?}");
        let upserts: Vec<_> = cmds
            .iter()
            .filter_map(|c| match c {
                Command::Send { conn, msg: ServerMessage::PeerUpsert { peer } } => Some((*conn, peer.nat)),
                _ => None,
            })
            .collect();
        assert_eq!(upserts, vec![(ConnId(2), NatMapping::EndpointDependent)]);
        reg.handle_nat(ConnId(1), NatMapping::EndpointDependent, NOW + 2);
        assert!(drain(&mut reg).is_empty(), "the same report again changes nothing");
        reg.handle_nat(ConnId(42), NatMapping::None, NOW + 3);
        assert!(drain(&mut reg).is_empty(), "a connection that is not admitted is ignored");
        let (_, peers) = welcome(&join(&mut reg, 3, &token));
        assert_eq!(peers[0].nat, NatMapping::EndpointDependent, "a later joiner learns it too");
    }

    #[test]
    fn candidates_from_a_connection_that_is_not_admitted_are_ignored() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        let before = reg.state().clone();
        let c =
            Candidate { addr: SocketAddr::from(([192, 0, 2, 1], 1)), kind: CandidateKind::Local };
        reg.handle_candidates(ConnId(42), vec![c], NOW);
        reg.handle_hello(ConnId(43), &hello(9, Some("bad.token")), observed(9), NOW);
        drain(&mut reg);
        reg.handle_candidates(ConnId(43), vec![c], NOW);
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
        reg.handle_candidates(ConnId(1), many, NOW);
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
            Candidate { addr: SocketAddr::from(([1, 2, 3, 4], 5)), kind: CandidateKind::Observed },
            local([10, 0, 0, 1], 51820),
            local([0, 0, 0, 0], 51820),
            local([10, 0, 0, 2], 0),
            local([172, 16, 0, 1], 51820),
        ];
        let merged = merge_candidates(&announced, obs);
        assert_eq!(
            merged,
            vec![
                Candidate {
                    addr: SocketAddr::from(([203, 0, 113, 9], 51820)),
                    kind: CandidateKind::Advertised
                },
                Candidate { addr: obs, kind: CandidateKind::Observed },
                local([10, 0, 0, 1], 51820),
                local([172, 16, 0, 1], 51820),
            ]
        );
    }

    #[test]
    fn an_ipv4_mapped_observed_address_is_reported_as_ipv4() {
        let (mut reg, token) = with_token();
        let mapped: SocketAddr = "[::ffff:198.51.100.7]:4000".parse().unwrap();
        reg.handle_hello(ConnId(1), &hello(1, Some(&token)), mapped, NOW);
        let cmds = drain(&mut reg);
        let obs = cmds.iter().find_map(|c| match c {
            Command::Send { msg: ServerMessage::Welcome { observed, .. }, .. } => Some(*observed),
            _ => None,
        });
        assert_eq!(obs, Some(SocketAddr::from(([198, 51, 100, 7], 4000))));
    }

    #[test]
    fn a_second_connection_of_the_same_node_supersedes_the_first() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        join(&mut reg, 2, &token);
        reg.handle_hello(ConnId(11), &hello(1, None), observed(1), NOW + 1);
        let cmds = drain(&mut reg);
        assert_eq!(cmds[0], Command::Close { conn: ConnId(1), reason: CloseReason::Superseded });
        assert!(cmds.iter().any(|c| matches!(
            c,
            Command::Send { conn: ConnId(11), msg: ServerMessage::Welcome { .. } }
        )));
        assert!(cmds.iter().any(|c| matches!(
            c,
            Command::Send { conn: ConnId(2), msg: ServerMessage::PeerUpsert { .. } }
        )));
        assert!(!cmds.iter().any(|c| matches!(c, Command::Send { conn: ConnId(1), .. })));

        // The old connection's end does not take the node offline.
        reg.handle_disconnect(ConnId(1), NOW + 2);
        assert!(drain(&mut reg).is_empty());
        assert!(reg.is_online(&key(1)));
        // And it no longer speaks for the node.
        reg.handle_candidates(ConnId(1), Vec::new(), NOW + 3);
        assert!(drain(&mut reg).is_empty());
    }

    #[test]
    fn a_disconnect_marks_the_node_offline_without_a_broadcast() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        join(&mut reg, 2, &token);
        reg.handle_disconnect(ConnId(1), NOW + 30);
        assert_eq!(drain(&mut reg), vec![Command::Persist]);
        assert!(!reg.is_online(&key(1)));
        assert_eq!(reg.state().nodes[&key(1)].last_seen, NOW + 30);
        let listed: Vec<_> = reg.nodes().into_iter().map(|n| (n.public_key, n.online)).collect();
        assert_eq!(listed, vec![(key(1), false), (key(2), true)]);
        // A rejected connection's end is nothing.
        reg.handle_disconnect(ConnId(77), NOW + 31);
        assert!(drain(&mut reg).is_empty());
    }

    #[test]
    fn a_second_hello_on_an_admitted_connection_is_ignored() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        reg.handle_hello(ConnId(1), &hello(2, Some(&token)), observed(2), NOW);
        assert!(drain(&mut reg).is_empty());
        assert!(!reg.state().nodes.contains_key(&key(2)));
    }

    #[test]
    fn only_the_hash_of_a_token_secret_is_stored() {
        let mut reg = registry();
        let token = reg.create_token([0xab; 32], "k8s-join".into(), DAY, Some(2), NOW).unwrap();
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
        reg.create_token([1; 32], "dup".into(), DAY, None, NOW).unwrap();
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
        assert_eq!(reg.tokens().next().map(|t| t.status(NOW)), Some(TokenStatus::Revoked));
    }

    #[test]
    fn state_serializes_public_keys_as_json_object_keys() {
        let (mut reg, token) = with_token();
        join(&mut reg, 1, &token);
        reg.remove_node(&key(1));
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
        ];
        let codes: BTreeSet<_> = all.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), all.len());
    }
}
