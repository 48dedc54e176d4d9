//! Operator requests: tokens and nodes.
//!
//! [`apply`] is pure (a request, `now` and a random source in; a response
//! out) and serves both ways the CLI reaches the registry: through the
//! running server's admin socket (`DIR/admin.sock`, so a removed node is cut
//! off at once) or, when no server runs, directly on the stored state.

use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};

use super::registry::{NodeStatus, Registry};
use crate::control::server::ErrorResponse;
use crate::identity::PublicKey;

pub use crate::control::server::{ApiSocket as AdminSocket, ServerError as AdminError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum AdminRequest {
    CreateToken { ttl_secs: u64, max_uses: Option<u32> },
    ListTokens,
    RevokeToken { id: String },
    ListNodes,
    /// By name, full public key, or an unambiguous key prefix.
    RemoveNode { node: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum AdminResponse {
    Token { token: String, id: String, expires_at: u64 },
    Tokens { tokens: Vec<TokenInfo> },
    Nodes { nodes: Vec<NodeStatusInfo> },
    Done { message: String },
    Error { message: String },
}

impl ErrorResponse for AdminResponse {
    fn error(message: String) -> Self {
        AdminResponse::Error { message }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub max_uses: Option<u32>,
    pub uses: u32,
    pub status: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatusInfo {
    pub public_key: String,
    pub name: String,
    pub ipv4: String,
    pub ipv6: String,
    pub online: bool,
    pub last_seen: u64,
}

impl From<NodeStatus> for NodeStatusInfo {
    fn from(n: NodeStatus) -> Self {
        Self {
            public_key: n.public_key.to_string(),
            name: n.name,
            ipv4: n.ipv4.to_string(),
            ipv6: n.ipv6.to_string(),
            online: n.online,
            last_seen: n.last_seen,
        }
    }
}

/// Applies one request. The caller executes the registry's commands after.
pub fn apply<R: RngCore + CryptoRng>(registry: &mut Registry, request: AdminRequest, now_unix: u64, rng: &mut R) -> AdminResponse {
    match request {
        AdminRequest::CreateToken { ttl_secs, max_uses } => {
            let mut secret = [0u8; 32];
            rng.fill_bytes(&mut secret);
            let mut id = [0u8; 4];
            rng.fill_bytes(&mut id);
            let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
            match registry.create_token(secret, id.clone(), ttl_secs, max_uses, now_unix) {
                Ok(token) => AdminResponse::Token { token, id, expires_at: now_unix.saturating_add(ttl_secs) },
                Err(e) => AdminResponse::Error { message: e.to_string() },
            }
        }
        AdminRequest::ListTokens => AdminResponse::Tokens {
            tokens: registry
                .tokens()
                .map(|t| TokenInfo {
                    id: t.id.clone(),
                    created_at: t.created_at,
                    expires_at: t.expires_at,
                    max_uses: t.max_uses,
                    uses: t.uses,
                    status: t.status(now_unix).to_string(),
                })
                .collect(),
        },
        AdminRequest::RevokeToken { id } => {
            if registry.revoke_token(&id) {
                AdminResponse::Done { message: format!("token {id} revoked") }
            } else {
                AdminResponse::Error { message: format!("no token with id {id:?} (see `token list`)") }
            }
        }
        AdminRequest::ListNodes => AdminResponse::Nodes { nodes: registry.nodes().into_iter().map(Into::into).collect() },
        AdminRequest::RemoveNode { node } => match find_node(registry, &node) {
            Ok(key) => {
                registry.remove_node(&key);
                AdminResponse::Done { message: format!("node {node} ({}) removed", key.short()) }
            }
            Err(message) => AdminResponse::Error { message },
        },
    }
}

fn find_node(registry: &Registry, query: &str) -> Result<PublicKey, String> {
    let nodes = registry.nodes();
    let matches: Vec<&NodeStatus> = nodes
        .iter()
        .filter(|n| n.name == query || n.public_key.to_string().starts_with(query))
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.public_key),
        [] => Err(format!("no node named {query:?} or with a key starting so (see `nodes list`)")),
        many => Err(format!(
            "{query:?} matches {} nodes; use the full public key",
            many.len()
        )),
    }
}

/// Applies `request` to the stored state directly, for when no server runs.
pub fn apply_offline<R: RngCore + CryptoRng>(
    dir: &std::path::Path,
    request: AdminRequest,
    now_unix: u64,
    rng: &mut R,
) -> Result<AdminResponse, super::setup::SetupError> {
    use super::registry::Command;
    use super::store::Store as _;
    let loaded = super::setup::load(dir)?;
    let mut store = loaded.store;
    let mut registry = Registry::new(loaded.state);
    let response = apply(&mut registry, request, now_unix, rng);
    while let Some(command) = registry.poll_command() {
        match command {
            Command::Persist => store.save(registry.state())?,
            // No connections exist without a server.
            Command::Send { .. } | Command::Close { .. } => {}
        }
    }
    Ok(response)
}
