//! The registry's state as records of the shared store: one key per node,
//! per node's endpoints, per claimed name and address, per token, removal
//! and quarantined address (DESIGN.md, "Scale and HA").
//!
//! Pure. A claim is a key of its own (`names/web`, `addrs/100.72.0.5`), so
//! that "nobody holds it" is one compare in a transaction ([`super::kv`]).
//! What a node is (name, addresses) and where it is (candidates, NAT, last
//! seen) are separate records: the first changes only by claims and the
//! operator, the second only by the server the node is connected to, so
//! neither write can undo the other.
//!
//! | key                  | value                                   |
//! |----------------------|-----------------------------------------|
//! | `mesh`               | [`MeshInfo`]                            |
//! | `nodes/<key hex>`    | [`NodeIdentity`]                        |
//! | `endpoints/<key hex>`| [`Endpoints`]                           |
//! | `names/<name>`       | the holder's key (hex)                  |
//! | `addrs/<ip>`         | the holder's key (hex), IPv4 and IPv6   |
//! | `tokens/<id>`        | [`TokenRecord`]                         |
//! | `removed/<key hex>`  | `{}`                                    |
//! | `quarantine/<ipv4>`  | [`Quarantined`]                         |
//! | `presence/<key hex>` | [`Presence`], on the server's lease     |
//! | `servers/<name>`     | [`ServerRecord`], on its lease          |
//!
//! Values are JSON. The file store keeps the same state as one document
//! ([`RegistryState`]); [`records`] and [`state_from`] convert.

// Pure: the clock and randomness are inputs (clippy.toml names what is
// forbidden).
#![deny(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::identity::PublicKey;
use crate::rendezvous::registry::{
    AdvertisedRoute, NodeRecord, Quarantined, RegistryState, TokenRecord,
};
use crate::wire::control::{Candidate, MeshInfo, NatMapping};

/// A record's key, relative to the mesh's prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Mesh,
    Node(PublicKey),
    Endpoints(PublicKey),
    Name(String),
    Address(IpAddr),
    Token(String),
    Removed(PublicKey),
    Quarantine(Ipv4Addr),
    /// Which server a node is connected to: written on that server's lease,
    /// so a dead server's nodes go offline by themselves.
    Presence(PublicKey),
    /// A running server and where nodes reach it, on its lease.
    Server(String),
}

impl Key {
    /// The key as stored.
    pub fn path(&self) -> String {
        self.to_string()
    }

    /// A stored key, or `None` for one this version does not know (a later
    /// version's records are left alone, not misread).
    pub fn parse(path: &str) -> Option<Key> {
        if path == "mesh" {
            return Some(Key::Mesh);
        }
        let (kind, rest) = path.split_once('/')?;
        Some(match kind {
            "nodes" => Key::Node(parse_key(rest)?),
            "endpoints" => Key::Endpoints(parse_key(rest)?),
            "names" => Key::Name(rest.to_owned()),
            "addrs" => Key::Address(rest.parse().ok()?),
            "tokens" => Key::Token(rest.to_owned()),
            "removed" => Key::Removed(parse_key(rest)?),
            "quarantine" => Key::Quarantine(rest.parse().ok()?),
            "presence" => Key::Presence(parse_key(rest)?),
            "servers" => Key::Server(rest.to_owned()),
            _ => return None,
        })
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Mesh => f.write_str("mesh"),
            Key::Node(k) => write!(f, "nodes/{}", hex::encode(k.as_bytes())),
            Key::Endpoints(k) => write!(f, "endpoints/{}", hex::encode(k.as_bytes())),
            Key::Name(name) => write!(f, "names/{name}"),
            Key::Address(ip) => write!(f, "addrs/{ip}"),
            Key::Token(id) => write!(f, "tokens/{id}"),
            Key::Removed(k) => write!(f, "removed/{}", hex::encode(k.as_bytes())),
            Key::Quarantine(ip) => write!(f, "quarantine/{ip}"),
            Key::Presence(k) => write!(f, "presence/{}", hex::encode(k.as_bytes())),
            Key::Server(name) => write!(f, "servers/{name}"),
        }
    }
}

/// Whether a record outlives the server that wrote it: everything but
/// presence and the server list, which the file of a single server does
/// not keep.
pub fn is_durable(path: &str) -> bool {
    !matches!(Key::parse(path), Some(Key::Presence(_) | Key::Server(_)))
}

fn parse_key(hex_key: &str) -> Option<PublicKey> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut bytes).ok()?;
    Some(PublicKey::from_bytes(bytes))
}

/// What a node is: bound at its first admission, changed only by the
/// operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub joined_at: u64,
    /// Prefixes outside the routable ranges that an operator approved for
    /// this node (`mesh-rendezvous routes approve`). Absent before v0.4.0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approved_routes: Vec<IpNet>,
}

/// Where a node is, as the server it is connected to last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    pub last_seen: u64,
    pub candidates: Vec<Candidate>,
    #[serde(default, skip_serializing_if = "NatMapping::is_unknown")]
    pub nat: NatMapping,
    /// The prefixes the node advertises. Absent before v0.4.0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<AdvertisedRoute>,
}

impl NodeIdentity {
    pub fn of(record: &NodeRecord) -> Self {
        Self {
            name: record.name.clone(),
            ipv4: record.ipv4,
            ipv6: record.ipv6,
            joined_at: record.joined_at,
            approved_routes: record.approved_routes.clone(),
        }
    }
}

impl Endpoints {
    pub fn of(record: &NodeRecord) -> Self {
        Self {
            last_seen: record.last_seen,
            candidates: record.candidates.clone(),
            nat: record.nat,
            routes: record.routes.clone(),
        }
    }
}

/// A node connected to a server, since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub server: String,
    pub since: u64,
}

/// A running server of the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    /// `HOST:PORT`, as join lines name it.
    pub public_addr: String,
    pub since: u64,
    /// Its static key: what the other servers' links prove theirs against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_key: Option<PublicKey>,
}

/// A record's value, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Mesh(MeshInfo),
    Node(NodeIdentity),
    Endpoints(Endpoints),
    /// Who holds a name or an address.
    Holder(PublicKey),
    Token(TokenRecord),
    Removed,
    Quarantine(Quarantined),
    Presence(Presence),
    Server(ServerRecord),
}

#[derive(Debug, thiserror::Error)]
#[error("record {key} is not what this version reads: {source}")]
pub struct DecodeError {
    pub key: String,
    pub source: serde_json::Error,
}

#[derive(Serialize, Deserialize)]
struct Empty {}

/// Decodes the value stored under `key`.
pub fn decode(key: &Key, bytes: &[u8]) -> Result<Value, DecodeError> {
    let wrap = |source| DecodeError {
        key: key.path(),
        source,
    };
    Ok(match key {
        Key::Mesh => Value::Mesh(serde_json::from_slice(bytes).map_err(wrap)?),
        Key::Node(_) => Value::Node(serde_json::from_slice(bytes).map_err(wrap)?),
        Key::Endpoints(_) => Value::Endpoints(serde_json::from_slice(bytes).map_err(wrap)?),
        Key::Name(_) | Key::Address(_) => {
            let hex_key: String = serde_json::from_slice(bytes).map_err(wrap)?;
            match parse_key(&hex_key) {
                Some(k) => Value::Holder(k),
                None => {
                    let source = serde::de::Error::custom("not a public key in hex");
                    return Err(wrap(source));
                }
            }
        }
        Key::Token(_) => Value::Token(serde_json::from_slice(bytes).map_err(wrap)?),
        Key::Removed(_) => {
            let Empty {} = serde_json::from_slice(bytes).map_err(wrap)?;
            Value::Removed
        }
        Key::Quarantine(_) => Value::Quarantine(serde_json::from_slice(bytes).map_err(wrap)?),
        Key::Presence(_) => Value::Presence(serde_json::from_slice(bytes).map_err(wrap)?),
        Key::Server(_) => Value::Server(serde_json::from_slice(bytes).map_err(wrap)?),
    })
}

/// Encodes a value as stored.
pub fn encode(value: &Value) -> Vec<u8> {
    let json = match value {
        Value::Mesh(v) => serde_json::to_vec(v),
        Value::Node(v) => serde_json::to_vec(v),
        Value::Endpoints(v) => serde_json::to_vec(v),
        Value::Holder(k) => serde_json::to_vec(&hex::encode(k.as_bytes())),
        Value::Token(v) => serde_json::to_vec(v),
        Value::Removed => serde_json::to_vec(&Empty {}),
        Value::Quarantine(v) => serde_json::to_vec(v),
        Value::Presence(v) => serde_json::to_vec(v),
        Value::Server(v) => serde_json::to_vec(v),
    };
    // Serializing these plain structs into memory cannot fail.
    json.unwrap_or_default()
}

/// Every record of `state`, in key order.
pub fn records(state: &RegistryState) -> Vec<(Key, Value)> {
    let mut out = vec![(Key::Mesh, Value::Mesh(state.mesh.clone()))];
    for (key, record) in &state.nodes {
        out.push((Key::Node(*key), Value::Node(NodeIdentity::of(record))));
        out.push((
            Key::Endpoints(*key),
            Value::Endpoints(Endpoints::of(record)),
        ));
        out.push((Key::Name(record.name.clone()), Value::Holder(*key)));
        out.push((Key::Address(record.ipv4.into()), Value::Holder(*key)));
        out.push((Key::Address(record.ipv6.into()), Value::Holder(*key)));
    }
    for (id, token) in &state.tokens {
        out.push((Key::Token(id.clone()), Value::Token(token.clone())));
    }
    for key in &state.removed {
        out.push((Key::Removed(*key), Value::Removed));
    }
    for q in &state.quarantine {
        out.push((Key::Quarantine(q.ipv4), Value::Quarantine(q.clone())));
        // Held back from new nodes by the same claims a node holds.
        out.push((Key::Address(q.ipv4.into()), Value::Holder(q.public_key)));
        out.push((Key::Address(q.ipv6.into()), Value::Holder(q.public_key)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Why records do not make a state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the store holds no mesh record: not a mesh, or the wrong key prefix")]
    NoMesh,
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// The state `records` describe. Claims are not part of the state (they
/// follow from its nodes and quarantine); endpoints of a node that has no
/// record are ignored, as are keys this version does not know.
pub fn state_from<'a>(
    records: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<RegistryState, StateError> {
    let mut mesh = None;
    let mut identities = BTreeMap::new();
    let mut endpoints = BTreeMap::new();
    let mut tokens = BTreeMap::new();
    let mut removed = BTreeSet::new();
    let mut quarantine = Vec::new();
    for (path, bytes) in records {
        let Some(key) = Key::parse(path) else {
            continue;
        };
        match (&key, decode(&key, bytes)?) {
            (_, Value::Mesh(m)) => mesh = Some(m),
            (Key::Node(k), Value::Node(n)) => {
                identities.insert(*k, n);
            }
            (Key::Endpoints(k), Value::Endpoints(e)) => {
                endpoints.insert(*k, e);
            }
            (Key::Token(id), Value::Token(t)) => {
                tokens.insert(id.clone(), t);
            }
            (Key::Removed(k), Value::Removed) => {
                removed.insert(*k);
            }
            (_, Value::Quarantine(q)) => quarantine.push(q),
            _ => {}
        }
    }
    let mesh = mesh.ok_or(StateError::NoMesh)?;
    let nodes = identities
        .into_iter()
        .map(|(key, id)| {
            let at = endpoints.remove(&key);
            (key, node_record(id, at))
        })
        .collect();
    quarantine.sort_by_key(|q: &Quarantined| (q.removed_at, q.ipv4));
    Ok(RegistryState {
        mesh,
        nodes,
        tokens,
        removed,
        quarantine,
    })
}

/// A node's record from its two halves (a node not seen yet has no
/// endpoints record).
pub fn node_record(identity: NodeIdentity, endpoints: Option<Endpoints>) -> NodeRecord {
    let endpoints = endpoints.unwrap_or(Endpoints {
        last_seen: identity.joined_at,
        candidates: Vec::new(),
        nat: NatMapping::Unknown,
        routes: Vec::new(),
    });
    NodeRecord {
        name: identity.name,
        ipv4: identity.ipv4,
        ipv6: identity.ipv6,
        joined_at: identity.joined_at,
        last_seen: endpoints.last_seen,
        candidates: endpoints.candidates,
        nat: endpoints.nat,
        routes: endpoints.routes,
        approved_routes: identity.approved_routes,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use crate::wire::control::CandidateKind;

    fn key(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    fn sample() -> RegistryState {
        let mut state = RegistryState::new(MeshInfo {
            id: "m1".into(),
            ipv4: "100.72.0.0/16".parse().unwrap(),
            ipv6: "fd00:1:2::/48".parse().unwrap(),
        });
        state.nodes.insert(
            key(1),
            NodeRecord {
                name: "web".into(),
                ipv4: "100.72.0.5".parse().unwrap(),
                ipv6: "fd00:1:2::5".parse().unwrap(),
                joined_at: 10,
                last_seen: 20,
                candidates: vec![Candidate {
                    addr: "203.0.113.9:51820".parse().unwrap(),
                    kind: CandidateKind::Observed,
                    mapped: None,
                }],
                nat: NatMapping::EndpointIndependent,
                routes: Vec::new(),
                approved_routes: Vec::new(),
            },
        );
        state.tokens.insert(
            "t1".into(),
            TokenRecord {
                id: "t1".into(),
                secret_sha256: "00".repeat(32),
                created_at: 1,
                expires_at: 100,
                max_uses: Some(1),
                uses: 1,
                revoked: false,
                takes_over: None,
            },
        );
        state.removed.insert(key(2));
        state.quarantine.push(Quarantined {
            public_key: key(2),
            name: "old".into(),
            ipv4: "100.72.0.6".parse().unwrap(),
            ipv6: "fd00:1:2::6".parse().unwrap(),
            removed_at: 15,
        });
        state
    }

    fn stored(state: &RegistryState) -> Vec<(String, Vec<u8>)> {
        records(state)
            .iter()
            .map(|(k, v)| (k.path(), encode(v)))
            .collect()
    }

    #[test]
    fn a_state_survives_the_trip_through_records() {
        let state = sample();
        let stored = stored(&state);
        let back = state_from(stored.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).unwrap();
        assert_eq!(back, state);
    }

    #[test]
    fn every_name_and_address_is_a_claim_of_its_own() {
        let paths: Vec<String> = stored(&sample()).into_iter().map(|(k, _)| k).collect();
        for claim in [
            "names/web",
            "addrs/100.72.0.5",
            "addrs/fd00:1:2::5",
            // A quarantined address stays claimed by the removed node.
            "addrs/100.72.0.6",
            "addrs/fd00:1:2::6",
        ] {
            assert!(paths.iter().any(|p| p == claim), "{claim} in {paths:?}");
        }
        assert!(!paths.iter().any(|p| p == "names/old"));
    }

    #[test]
    fn keys_read_back_as_written() {
        for key in [
            Key::Mesh,
            Key::Node(key(7)),
            Key::Endpoints(key(7)),
            Key::Name("db-2".into()),
            Key::Address("100.72.3.4".parse().unwrap()),
            Key::Address("fd00::1".parse().unwrap()),
            Key::Token("abc_-1".into()),
            Key::Removed(key(8)),
            Key::Quarantine("100.72.0.6".parse().unwrap()),
            Key::Presence(key(9)),
            Key::Server("rv-2".into()),
        ] {
            assert_eq!(Key::parse(&key.path()), Some(key));
        }
    }

    #[test]
    fn keys_of_a_later_version_are_left_alone() {
        assert_eq!(Key::parse("routes/10.244.0.0_24"), None);
        assert_eq!(Key::parse("nodes/not-hex"), None);
        assert_eq!(Key::parse("addrs/not-an-ip"), None);
        let mut stored = stored(&sample());
        stored.push(("routes/x".into(), b"whatever".to_vec()));
        assert!(state_from(stored.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).is_ok());
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_it() {
        let mut stored = stored(&sample());
        let node = stored
            .iter_mut()
            .find(|(k, _)| k.starts_with("nodes/"))
            .unwrap();
        node.1 = b"{".to_vec();
        let err = state_from(stored.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).unwrap_err();
        assert!(err.to_string().contains("nodes/0101"), "{err}");
    }

    #[test]
    fn records_without_a_mesh_are_not_a_mesh() {
        let err = state_from(
            [("removed/".to_owned() + &"01".repeat(32), b"{}".to_vec())]
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice())),
        )
        .unwrap_err();
        assert!(matches!(err, StateError::NoMesh));
    }
}
