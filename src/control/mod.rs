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

use serde::{Deserialize, Serialize};

use crate::engine::paths::{CandidateStatus, PathStatus, Source};
use crate::engine::PeerStatus;
use crate::wire::control::NatMapping;

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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    Peers { peers: Vec<PeerInfo> },
    Status(Box<StatusInfo>),
    Pong(PingInfo),
    Netcheck(Box<NetcheckInfo>),
    Error { message: String },
}

/// The answer to one `meshctl ping`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PingInfo {
    /// The peer's name, or its short key for a static peer.
    pub peer: String,
    pub overlay_ip: Option<String>,
    /// `direct` or `relay`: the path the answer came back on; null when
    /// no answer came in time.
    pub path: Option<String>,
    /// The direct endpoint that answered.
    pub endpoint: Option<String>,
    pub rtt_ms: Option<f64>,
}

/// `meshctl netcheck`: what the rendezvous sees of this node, from two of
/// its ports, and what that means for direct paths.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetcheckInfo {
    /// The rendezvous's QUIC address; null for a node without one.
    pub rendezvous: Option<String>,
    /// Whether the QUIC session (control and relay) is up, and its RTT.
    pub quic_connected: bool,
    pub quic_rtt_ms: Option<f64>,
    /// Where the rendezvous's QUIC port sees this node.
    pub quic_seen_at: Option<String>,
    /// The rendezvous's second port, which answers NAT checks over UDP.
    pub reflector: Option<String>,
    /// Where that port sees this node; null when it did not answer.
    pub reflector_seen_at: Option<String>,
    pub reflector_rtt_ms: Option<f64>,
    /// The NAT mapping behaviour the two ports show.
    pub mapping: NatMapping,
    /// What all observations (rendezvous and peers) show.
    pub mapping_from_peers: NatMapping,
    /// `likely`, `unlikely`, `not needed` or `unknown`.
    pub hole_punching: String,
    /// What it all means, in plain words.
    pub explanation: String,
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
}

/// One candidate endpoint of a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateInfo {
    pub endpoint: String,
    /// `advertised`, `observed`, `local` or `learned`.
    pub source: String,
    pub alive: bool,
    pub rtt_ms: Option<f64>,
    pub probes_sent: u64,
    pub probes_answered: u64,
}

impl From<&CandidateStatus> for CandidateInfo {
    fn from(c: &CandidateStatus) -> Self {
        Self {
            endpoint: c.addr.to_string(),
            source: match c.source {
                Source::Advertised => "advertised",
                Source::Observed => "observed",
                Source::Local => "local",
                Source::Learned => "learned",
            }
            .to_owned(),
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
        }
    }
}

/// This node as `meshctl status --json` prints it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub name: Option<String>,
    pub public_key: String,
    /// This node's overlay addresses.
    pub overlay_ips: Vec<String>,
    pub interface: String,
    /// mesh0's MTU; 0 from an older meshd that did not say.
    #[serde(default)]
    pub mtu: u16,
    pub listen_port: u16,
    pub addresses: Vec<String>,
    pub peers: usize,
    /// Peers by the path they take now, and those with no recent handshake.
    pub peers_direct: usize,
    pub peers_relayed: usize,
    pub peers_offline: usize,
    /// This node's NAT mapping behaviour, inferred from where the
    /// rendezvous and peers see it.
    pub nat: NatMapping,
    /// Where others see this node's socket, e.g. `203.0.113.41:3947 (rendezvous)`.
    pub seen_at: Vec<String>,
    /// The rendezvous session; null for a node with static peers only.
    pub rendezvous: Option<RendezvousInfo>,
    /// Dropped packets by reason (only reasons seen at least once).
    pub drops: BTreeMap<String, u64>,
    pub cookie_replies_sent: u64,
    /// How well the packet path batches; zeros from an older meshd.
    #[serde(default)]
    pub io: IoCounters,
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
    pub udp_receives: u64,
    pub udp_received_datagrams: u64,
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
            overlay_ips: vec!["100.72.0.2".into()],
            public_key: "k".into(),
            allowed_ips: vec!["100.72.0.2/32".into()],
            endpoint: None,
            path: "relay".into(),
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
        ] {
            assert!(v.get(field).is_some(), "missing {field}");
        }
        assert!(v["endpoint"].is_null());
        assert_eq!(v["nat"], "endpoint_dependent");
    }
}
