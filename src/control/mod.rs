//! The local API between `meshd` and `meshctl`.
//!
//! The types here are pure and shared by both sides; [`server`] (meshd,
//! tokio) and [`client`] (meshctl, blocking std) do the I/O on the Unix
//! socket. The protocol is one JSON request line, one JSON response line,
//! each carrying [`API_VERSION`], so a newer meshctl can tell an older meshd
//! apart instead of misreading it.

pub mod client;
pub mod render;
pub mod server;
pub mod uapi;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::engine::paths::PathStatus;
use crate::engine::PeerStatus;

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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    Peers { peers: Vec<PeerInfo> },
    Status(StatusInfo),
    Error { message: String },
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
        Self { version: API_VERSION, body }
    }
}

/// One peer as `meshctl peers --json` prints it. Field names are a public
/// interface: scripts depend on them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer's name in the mesh; null for a static peer.
    pub name: Option<String>,
    pub public_key: String,
    /// The peer's overlay addresses (its host routes for a static peer).
    pub overlay_ips: Vec<String>,
    pub allowed_ips: Vec<String>,
    /// `ip:port` of the direct path, or null (relayed, or unknown).
    pub endpoint: Option<String>,
    /// `direct`, `relay` or `none`.
    pub path: String,
    /// Round-trip time of the direct path by probes, when measured.
    pub rtt_ms: Option<f64>,
    /// Seconds since the last completed handshake, or null if none.
    pub last_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: Option<u16>,
}

impl From<&PeerStatus> for PeerInfo {
    fn from(p: &PeerStatus) -> Self {
        Self {
            name: None,
            public_key: p.public_key.to_string(),
            overlay_ips: p
                .allowed_ips
                .iter()
                .filter(|n| n.prefix_len() == n.max_prefix_len())
                .map(|n| n.addr().to_string())
                .collect(),
            allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
            endpoint: match p.path {
                PathStatus::Direct { addr, .. } => Some(addr.to_string()),
                PathStatus::Relay | PathStatus::Unknown => None,
            },
            path: match p.path {
                PathStatus::Direct { .. } => "direct",
                PathStatus::Relay => "relay",
                PathStatus::Unknown => "none",
            }
            .to_owned(),
            rtt_ms: match p.path {
                PathStatus::Direct { rtt: Some(rtt), .. } => Some((rtt.as_secs_f64() * 1e5).round() / 100.0),
                _ => None,
            },
            last_handshake: p.last_handshake.map(|d| d.as_secs()),
            rx_bytes: p.counters.rx_bytes,
            tx_bytes: p.counters.tx_bytes,
            persistent_keepalive: p.persistent_keepalive,
        }
    }
}

/// This node as `meshctl status --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub name: Option<String>,
    pub public_key: String,
    /// This node's overlay addresses.
    pub overlay_ips: Vec<String>,
    pub interface: String,
    pub listen_port: u16,
    pub addresses: Vec<String>,
    pub peers: usize,
    /// Dropped packets by reason (only reasons seen at least once).
    pub drops: BTreeMap<String, u64>,
    pub cookie_replies_sent: u64,
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
    fn peer_info_has_the_documented_fields() {
        let info = PeerInfo {
            name: Some("a".into()),
            overlay_ips: vec!["100.72.0.2".into()],
            public_key: "k".into(),
            allowed_ips: vec!["100.72.0.2/32".into()],
            endpoint: None,
            path: "relay".into(),
            rtt_ms: None,
            last_handshake: Some(3),
            rx_bytes: 1,
            tx_bytes: 2,
            persistent_keepalive: None,
        };
        let v = serde_json::to_value(&info).unwrap();
        for field in
            ["name", "public_key", "overlay_ips", "allowed_ips", "endpoint", "path", "rtt_ms", "last_handshake", "rx_bytes", "tx_bytes"]
        {
            assert!(v.get(field).is_some(), "missing {field}");
        }
        assert!(v["endpoint"].is_null());
    }
}
