//! Operator requests: tokens, nodes and quarantined addresses.
//!
//! [`apply`] is pure (a request, `now` and a random source in; a response
//! out) and serves both ways the CLI reaches the registry: through the
//! running server's admin socket (`DIR/admin.sock`, so a removed node is cut
//! off at once) or, when no server runs, directly on the stored state.

use std::net::IpAddr;

use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};

use ipnet::IpNet;

use super::paths::PathMatrix;
use super::registry::{NodeRoutes, NodeStatus, Quarantined, Registry};
use crate::control::server::ErrorResponse;
use crate::identity::PublicKey;

pub use crate::control::server::{ApiSocket as AdminSocket, ServerError as AdminError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum AdminRequest {
    CreateToken {
        ttl_secs: u64,
        max_uses: Option<u32>,
        /// A token for one join by a new key that takes over this node
        /// (as for `RemoveNode`): its name and addresses; its old key is
        /// removed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        for_node: Option<String>,
    },
    ListTokens,
    RevokeToken {
        id: String,
    },
    ListNodes,
    /// By name, full public key, or an unambiguous key prefix. Its
    /// addresses stay quarantined unless `release`.
    RemoveNode {
        node: String,
        #[serde(default)]
        release: bool,
    },
    /// Gives a node (as for `RemoveNode`) another name.
    RenameNode {
        node: String,
        name: String,
    },
    /// Every overlay address held: by a node, or quarantined.
    ListAddresses,
    /// The mesh's running servers.
    ListServers,
    /// Releases one quarantined address (with its removed node's other
    /// one), or every one when `None`.
    ReleaseAddresses {
        address: Option<IpAddr>,
    },
    /// Every node's advertised prefixes and what became of each.
    ListRoutes,
    /// The mesh's paths as the nodes connected to this server report them.
    ListPaths,
    /// Routes `prefix` (outside the routable ranges) to `node` (as for
    /// `RemoveNode`), or with `withdraw` takes that approval back.
    ApproveRoute {
        node: String,
        prefix: IpNet,
        #[serde(default)]
        withdraw: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum AdminResponse {
    Token {
        token: String,
        id: String,
        expires_at: u64,
        /// The mesh's servers, for the join line (absent from a server
        /// before 0.4.0, and offline).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        servers: Vec<String>,
    },
    Tokens {
        tokens: Vec<TokenInfo>,
    },
    Nodes {
        nodes: Vec<NodeStatusInfo>,
    },
    Addresses {
        addresses: Vec<AddressInfo>,
    },
    Servers {
        servers: Vec<ServerInfo>,
    },
    Routes {
        nodes: Vec<NodeRoutes>,
    },
    Paths {
        matrix: Box<PathMatrix>,
    },
    Done {
        message: String,
    },
    Error {
        message: String,
    },
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
    /// The server it is connected to, when online (absent from a 0.3.0
    /// server's answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    pub last_seen: u64,
}

/// A running server as `server list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub name: String,
    /// Where nodes reach it (`HOST:PORT`).
    pub public_addr: String,
    /// Nodes connected to it now.
    pub nodes: usize,
}

/// An overlay address pair as `addresses list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressInfo {
    pub ipv4: String,
    pub ipv6: String,
    /// `in_use` or `quarantined`.
    pub status: String,
    /// The node that holds (or held) them.
    pub name: String,
    pub public_key: String,
    /// When its node was removed; `None` while in use.
    pub removed_at: Option<u64>,
}

impl From<&Quarantined> for AddressInfo {
    fn from(q: &Quarantined) -> Self {
        Self {
            ipv4: q.ipv4.to_string(),
            ipv6: q.ipv6.to_string(),
            status: "quarantined".into(),
            name: q.name.clone(),
            public_key: q.public_key.to_string(),
            removed_at: Some(q.removed_at),
        }
    }
}

impl From<NodeStatus> for NodeStatusInfo {
    fn from(n: NodeStatus) -> Self {
        Self {
            public_key: n.public_key.to_string(),
            name: n.name,
            ipv4: n.ipv4.to_string(),
            ipv6: n.ipv6.to_string(),
            online: n.online,
            server: n.server,
            last_seen: n.last_seen,
        }
    }
}

/// Applies one request. The caller executes the registry's commands after.
pub fn apply<R: RngCore + CryptoRng>(
    registry: &mut Registry,
    request: AdminRequest,
    now_unix: u64,
    rng: &mut R,
) -> AdminResponse {
    match request {
        AdminRequest::CreateToken {
            ttl_secs,
            max_uses,
            for_node,
        } => {
            let takes_over = match for_node.as_deref().map(|q| find_node(registry, q)) {
                None => None,
                Some(Ok(key)) => Some(key),
                Some(Err(message)) => return AdminResponse::Error { message },
            };
            let mut secret = [0u8; 32];
            rng.fill_bytes(&mut secret);
            let mut id = [0u8; 4];
            rng.fill_bytes(&mut id);
            let id = hex::encode(id);
            let created = match takes_over {
                Some(node) => {
                    registry.create_takeover_token(secret, id.clone(), ttl_secs, node, now_unix)
                }
                None => registry.create_token(secret, id.clone(), ttl_secs, max_uses, now_unix),
            };
            match created {
                Ok(token) => AdminResponse::Token {
                    token: token.expose().to_owned(),
                    id,
                    expires_at: now_unix.saturating_add(ttl_secs),
                    servers: registry.servers(),
                },
                Err(e) => AdminResponse::Error {
                    message: e.to_string(),
                },
            }
        }
        AdminRequest::ListServers => {
            let nodes = registry.nodes();
            let servers = registry
                .server_list()
                .into_iter()
                .map(|(name, public_addr)| ServerInfo {
                    nodes: nodes
                        .iter()
                        .filter(|n| n.server.as_deref() == Some(name.as_str()))
                        .count(),
                    name,
                    public_addr,
                })
                .collect();
            AdminResponse::Servers { servers }
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
                AdminResponse::Done {
                    message: format!("token {id} revoked"),
                }
            } else {
                AdminResponse::Error {
                    message: format!("no token with id {id:?} (see `token list`)"),
                }
            }
        }
        AdminRequest::ListNodes => AdminResponse::Nodes {
            nodes: registry.nodes().into_iter().map(Into::into).collect(),
        },
        AdminRequest::RemoveNode { node, release } => match find_node(registry, &node) {
            Ok(key) => {
                registry.remove_node(&key, release, now_unix);
                let addresses = if release {
                    "its addresses are free again"
                } else {
                    "its addresses stay quarantined until `addresses release`"
                };
                AdminResponse::Done {
                    message: format!("node {node} ({}) removed; {addresses}", key.short()),
                }
            }
            Err(message) => AdminResponse::Error { message },
        },
        AdminRequest::RenameNode { node, name } => match find_node(registry, &node) {
            Ok(key) => match registry.rename_node(&key, &name) {
                Ok(()) => AdminResponse::Done {
                    message: format!("node {} is now called {name}", key.short()),
                },
                Err(e) => AdminResponse::Error {
                    message: e.to_string(),
                },
            },
            Err(message) => AdminResponse::Error { message },
        },
        AdminRequest::ListAddresses => {
            let in_use = registry.nodes().into_iter().map(|n| AddressInfo {
                ipv4: n.ipv4.to_string(),
                ipv6: n.ipv6.to_string(),
                status: "in_use".into(),
                name: n.name,
                public_key: n.public_key.to_string(),
                removed_at: None,
            });
            let held = registry.quarantined().iter().map(AddressInfo::from);
            AdminResponse::Addresses {
                addresses: in_use.chain(held).collect(),
            }
        }
        AdminRequest::ReleaseAddresses {
            address: Some(address),
        } => match registry.release_address(address) {
            Ok(q) => AdminResponse::Done {
                message: format!(
                    "released {} and {} (held for removed node {})",
                    q.ipv4, q.ipv6, q.name
                ),
            },
            Err(e) => AdminResponse::Error {
                message: e.to_string(),
            },
        },
        AdminRequest::ListRoutes => AdminResponse::Routes {
            nodes: registry.route_report(),
        },
        AdminRequest::ListPaths => AdminResponse::Paths {
            matrix: Box::new(registry.path_matrix()),
        },
        AdminRequest::ApproveRoute {
            node,
            prefix,
            withdraw,
        } => match find_node(registry, &node) {
            Ok(key) => match registry.approve_route(&key, prefix, !withdraw) {
                Ok(()) if withdraw => AdminResponse::Done {
                    message: format!("{prefix} is no longer approved for {node}"),
                },
                Ok(()) => AdminResponse::Done {
                    message: format!(
                        "{prefix} approved for {node}: its peers route it once it advertises it \
                         and no earlier prefix of another node overlaps it (see `routes list`)"
                    ),
                },
                Err(e) => AdminResponse::Error {
                    message: e.to_string(),
                },
            },
            Err(message) => AdminResponse::Error { message },
        },
        AdminRequest::ReleaseAddresses { address: None } => {
            let count = registry.release_all_addresses();
            AdminResponse::Done {
                message: format!("released the addresses of {count} removed nodes"),
            }
        }
    }
}

/// A node by its name (unique) or else its full key or a key prefix.
fn find_node(registry: &Registry, query: &str) -> Result<PublicKey, String> {
    let nodes = registry.nodes();
    if let Some(named) = nodes.iter().find(|n| n.name == query) {
        return Ok(named.public_key);
    }
    let matches: Vec<&NodeStatus> = nodes
        .iter()
        .filter(|n| n.public_key.to_string().starts_with(query))
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.public_key),
        [] => Err(format!(
            "no node named {query:?} or with a key starting so (see `nodes list`)"
        )),
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
    use super::store::kv::Outcome;
    use super::store::Store as _;
    let loaded = super::setup::load(dir)?;
    let super::setup::Backend::File { mut store, state } = loaded.backend else {
        return Err(super::setup::SetupError::NeedsServer {
            dir: dir.to_owned(),
        });
    };
    let mut local = super::store::LocalStore::new(&state);
    let mut registry = Registry::new(state, loaded.server_key);
    registry.set_routable(loaded.config.routes.routable.clone());
    let response = apply(&mut registry, request, now_unix, rng);
    let mut changed = false;
    while let Some(command) = registry.poll_command() {
        match command {
            Command::Commit { id, txn } => {
                let (outcome, fresh) = local.commit(&txn);
                changed |= matches!(outcome, Outcome::Committed { .. });
                registry.handle_outcome(id, outcome, &fresh);
            }
            Command::PersistSoon => changed = true,
            // No connections or links exist without a server.
            Command::Admitted { .. }
            | Command::Send { .. }
            | Command::PeerDeltas { .. }
            | Command::Close { .. }
            | Command::Route { .. } => {}
        }
    }
    if changed {
        store.save(registry.state())?;
    }
    Ok(response)
}
