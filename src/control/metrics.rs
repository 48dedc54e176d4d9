//! Prometheus metrics: meshd's and mesh-rendezvous's counters in the text
//! exposition format, served on `GET /metrics` over HTTP.
//!
//! [`Exposition`], [`render_node`], [`render_rendezvous`], [`parse_head`]
//! and [`response`] are pure: fixed input, fixed text. [`MetricsServer`] is
//! the thin shell that does the I/O, on a TCP address the operator chose
//! (off unless configured). meshd's numbers come from the driver over the
//! same channel as the JSON API ([`Ask`]), so the engine is never shared
//! behind a lock; mesh-rendezvous asks its registry and relay tasks the
//! same way.
//!
//! The format is Prometheus's text format 0.0.4
//! (<https://prometheus.io/docs/instrumenting/exposition_formats/>): for
//! each family a `# HELP` and a `# TYPE` line, then its samples
//! `name{label="value",…} value`, label values escaped. Names follow
//! Prometheus's conventions: a `meshd_` or `mesh_rendezvous_` prefix, the
//! unit in the name, `_total` on counters. A family is always listed; a
//! sample that has no value yet (no handshake, no RTT measured) is left out
//! rather than reported as zero.
//!
//! A public key never appears beyond its first 8 base64 characters
//! ([`short_key`]), the prefix `meshctl` and the logs show.
//!
//! The HTTP side is small on purpose: one request per connection, a head
//! of at most [`MAX_REQUEST_HEAD`] bytes within [`HEAD_DEADLINE`],
//! [`CONNECTION_DEADLINE`] for the whole exchange, at most
//! [`MAX_PER_SOURCE`] connections from one source and [`MAX_CONNECTIONS`]
//! in all (more are closed at once, so idle connections from one client
//! can't starve the scrapes of another); 404 for any other path, 405 for
//! any other method than GET, 400 for what does not parse.

use std::fmt::{self, Write as _};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::server::Ask;
use super::{PeerInfo, Request, Response, StatusInfo};
use crate::relay::server::RelaySnapshot;
use crate::rendezvous::pending::{AdmissionCounts, Decision, Limits, Pending, Source};
use crate::rendezvous::registry::{Counters, NodeStatus};
use crate::wire::control::RejectReason;

/// A request head (request line and headers) longer than this is refused
/// with 431 before more is read.
pub const MAX_REQUEST_HEAD: usize = 8 << 10;
/// Connections served at once, all sources together; more are closed at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Connections served at once from one source (an IPv4 address or an IPv6
/// /64); more from it are closed at once. A Prometheus server needs one.
pub const MAX_PER_SOURCE: usize = 4;
/// A client has this long to send its request head.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(2);
/// A client has this long to send its request and read the answer.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);
/// The pause after a failed accept (out of file descriptors, mostly).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// What is read and discarded after the answer, so that a client that sent
/// more than a head (a body nobody asked for) is not reset before it has
/// read the answer.
const DRAIN_LIMIT: u64 = 64 << 10;
/// The path metrics are served on.
pub const METRICS_PATH: &str = "/metrics";
/// The media type of the text format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

// ---------------------------------------------------------------------------
// The text format
// ---------------------------------------------------------------------------

/// A metric family's type, as its `# TYPE` line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// A sample's value: counts print exactly, measurements as Prometheus
/// parses floats (`NaN`, `+Inf`, `-Inf`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v)
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::Int(u64::try_from(v).unwrap_or(u64::MAX))
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(u64::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) if v.is_nan() => f.write_str("NaN"),
            Value::Float(v) if v == f64::INFINITY => f.write_str("+Inf"),
            Value::Float(v) if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            // Rust prints the shortest text that reads back as the same
            // float, and never an exponent.
            Value::Float(v) => write!(f, "{v}"),
        }
    }
}

/// Text in the exposition format, built family by family.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines. Its samples follow
    /// through the returned [`Family`]; each name must be started once.
    pub fn family(&mut self, name: &'static str, kind: Kind, help: &str) -> Family<'_> {
        self.text.push_str("# HELP ");
        self.text.push_str(name);
        self.text.push(' ');
        escape(help, false, &mut self.text);
        self.text.push_str("\n# TYPE ");
        self.text.push_str(name);
        self.text.push(' ');
        self.text.push_str(kind.as_str());
        self.text.push('\n');
        Family {
            text: &mut self.text,
            name,
        }
    }

    pub fn finish(self) -> String {
        self.text
    }
}

/// The family last started; see [`Exposition::family`].
pub struct Family<'a> {
    text: &'a mut String,
    name: &'static str,
}

impl Family<'_> {
    /// One sample. Label names are the caller's constants; label values
    /// may be anything (a peer's name) and are escaped.
    pub fn sample(
        &mut self,
        labels: &[(&'static str, &str)],
        value: impl Into<Value>,
    ) -> &mut Self {
        self.text.push_str(self.name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (name, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                self.text.push_str(name);
                self.text.push_str("=\"");
                escape(value, true, self.text);
                self.text.push('"');
            }
            self.text.push('}');
        }
        // Writing into a String cannot fail.
        let _ = writeln!(self.text, " {}", value.into());
        self
    }
}

/// The format's escapes: backslash and line feed everywhere, the double
/// quote in label values.
fn escape(text: &str, quote: bool, out: &mut String) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// The first 8 base64 characters of a key: enough to tell nodes apart,
/// as `meshctl` and the logs show them.
pub fn short_key(key: &str) -> String {
    key.chars().take(8).collect()
}

// ---------------------------------------------------------------------------
// meshd
// ---------------------------------------------------------------------------

/// The paths a peer's traffic can take, as [`PeerInfo::path`] names them.
const PATHS: [&str; 3] = ["direct", "relay", "none"];

/// meshd's metrics from what `meshctl status` and `meshctl peers` show.
/// `now_unix` turns the API's "seconds since the last handshake" into the
/// time it happened, which is what Prometheus prefers to a growing age.
///
/// Every peer sample is labelled `peer` (its name, its short key for a
/// static peer), `public_key` (short) and `address` (its first overlay
/// address).
pub fn render_node(status: &StatusInfo, peers: &[PeerInfo], now_unix: u64) -> String {
    let mut out = Exposition::new();
    let node_key = status.public_key.short();
    let node_address = status
        .overlay_ips
        .first()
        .map(ToString::to_string)
        .unwrap_or_default();
    out.family(
        "meshd_info",
        Kind::Gauge,
        "This node: its name, short public key and first overlay address; always 1.",
    )
    .sample(
        &[
            ("node", status.name.as_deref().unwrap_or(&node_key)),
            ("public_key", &node_key),
            ("address", &node_address),
        ],
        1u64,
    );
    out.family(
        "meshd_peers",
        Kind::Gauge,
        "Peers this node has, configured or from the rendezvous.",
    )
    .sample(&[], status.peers);
    let mut connected = out.family(
        "meshd_rendezvous_connected",
        Kind::Gauge,
        "1 while the session with the rendezvous is up; absent without a rendezvous.",
    );
    if let Some(rendezvous) = &status.rendezvous {
        connected.sample(&[], rendezvous.connected);
    }
    let mut rtt = out.family(
        "meshd_rendezvous_rtt_seconds",
        Kind::Gauge,
        "Smoothed round-trip time of the QUIC session with the rendezvous.",
    );
    if let Some(ms) = status.rendezvous.as_ref().and_then(|r| r.rtt_ms) {
        rtt.sample(&[], seconds(ms));
    }
    let mut drops = out.family(
        "meshd_dropped_packets_total",
        Kind::Counter,
        "Packets this node dropped, by reason.",
    );
    for (reason, count) in &status.drops {
        drops.sample(&[("reason", reason)], *count);
    }
    out.family(
        "meshd_cookie_replies_sent_total",
        Kind::Counter,
        "WireGuard cookie replies sent while under load.",
    )
    .sample(&[], status.cookie_replies_sent);
    let io = &status.io;
    let ops = io.ops();
    let mut calls = out.family(
        "meshd_io_calls_total",
        Kind::Counter,
        "System calls of the packet path, by operation (packets per call shows the offloads at work).",
    );
    for op in &ops {
        calls.sample(&[("op", op.name)], op.calls);
    }
    let mut packets = out.family(
        "meshd_io_packets_total",
        Kind::Counter,
        "Packets the packet path's system calls carried, by operation.",
    );
    for op in &ops {
        packets.sample(&[("op", op.name)], op.packets);
    }
    out.family(
        "meshd_io_errors_total",
        Kind::Counter,
        "Failed TUN writes and UDP sends (each a lost packet or batch).",
    )
    .sample(&[("op", "tun_write")], io.tun_write_errors)
    .sample(&[("op", "udp_send")], io.udp_send_errors);

    let labels: Vec<PeerLabels> = peers.iter().map(peer_labels).collect();
    let by_peer = PerPeer {
        peers,
        labels: &labels,
    };
    by_peer.family(
        &mut out,
        "meshd_peer_rx_bytes_total",
        Kind::Counter,
        "Bytes of authenticated WireGuard datagrams received from the peer.",
        |p| Some(p.rx_bytes.into()),
    );
    by_peer.family(
        &mut out,
        "meshd_peer_tx_bytes_total",
        Kind::Counter,
        "Bytes of WireGuard datagrams sent to the peer.",
        |p| Some(p.tx_bytes.into()),
    );
    by_peer.family(
        &mut out,
        "meshd_peer_rx_packets_total",
        Kind::Counter,
        "Authenticated WireGuard datagrams received from the peer.",
        |p| Some(p.rx_packets.into()),
    );
    by_peer.family(
        &mut out,
        "meshd_peer_tx_packets_total",
        Kind::Counter,
        "WireGuard datagrams sent to the peer.",
        |p| Some(p.tx_packets.into()),
    );
    by_peer.family(
        &mut out,
        "meshd_peer_handshakes_total",
        Kind::Counter,
        "WireGuard handshakes completed with the peer.",
        |p| Some(p.handshakes.into()),
    );
    by_peer.family(
        &mut out,
        "meshd_peer_last_handshake_timestamp_seconds",
        Kind::Gauge,
        "Unix time of the last completed handshake with the peer, to the second; absent before the first.",
        |p| p.last_handshake.map(|ago| now_unix.saturating_sub(ago).into()),
    );
    by_peer.family(
        &mut out,
        "meshd_peer_online",
        Kind::Gauge,
        "1 while the last handshake with the peer is younger than 180 s (WireGuard's REJECT_AFTER_TIME).",
        |p| Some(p.online.into()),
    );
    by_peer.family(
        &mut out,
        "meshd_peer_rtt_seconds",
        Kind::Gauge,
        "Round-trip time of the direct path to the peer by authenticated probes; absent while relayed or unmeasured.",
        |p| p.rtt_ms.map(|ms| seconds(ms).into()),
    );
    let mut path = out.family(
        "meshd_peer_path",
        Kind::Gauge,
        "The path traffic to the peer takes now: 1 for the current one of direct, relay and none, 0 for the others.",
    );
    for (peer, labels) in peers.iter().zip(&labels) {
        for name in PATHS {
            path.sample(
                &[
                    ("peer", &labels.peer),
                    ("public_key", &labels.key),
                    ("address", &labels.address),
                    ("path", name),
                ],
                peer.path.as_str() == name,
            );
        }
    }
    out.finish()
}

/// Seconds from the API's milliseconds, to the microsecond, so that
/// 0.42 ms reads 0.00042 and not a neighbouring float.
fn seconds(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1e6
}

/// The label values that name a peer.
struct PeerLabels {
    /// Its name, its short key for a static peer.
    peer: String,
    key: String,
    /// Its first overlay address.
    address: String,
}

fn peer_labels(peer: &PeerInfo) -> PeerLabels {
    let key = peer.public_key.short();
    PeerLabels {
        peer: peer.name.clone().unwrap_or_else(|| key.clone()),
        address: peer
            .overlay_ips
            .first()
            .map(ToString::to_string)
            .unwrap_or_default(),
        key,
    }
}

/// Families with one sample per peer.
struct PerPeer<'a> {
    peers: &'a [PeerInfo],
    labels: &'a [PeerLabels],
}

impl PerPeer<'_> {
    /// A family whose sample for each peer is `value` of it, if any.
    fn family(
        &self,
        out: &mut Exposition,
        name: &'static str,
        kind: Kind,
        help: &str,
        value: impl Fn(&PeerInfo) -> Option<Value>,
    ) {
        let mut family = out.family(name, kind, help);
        for (peer, labels) in self.peers.iter().zip(self.labels) {
            if let Some(v) = value(peer) {
                family.sample(
                    &[
                        ("peer", &labels.peer),
                        ("public_key", &labels.key),
                        ("address", &labels.address),
                    ],
                    v,
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// mesh-rendezvous
// ---------------------------------------------------------------------------

/// What mesh-rendezvous reports, gathered from its registry and relay tasks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RendezvousMetrics {
    /// Every registered node, with whether it is connected.
    pub nodes: Vec<NodeStatus>,
    /// Hellos refused since the server started, by reason.
    pub admission_failures: Vec<(RejectReason, u64)>,
    /// Connections turned away before admission started, and Retries.
    pub admission: AdmissionCounts,
    pub relay: RelaySnapshot,
    /// The registry's rate limits and refused candidates.
    pub registry: Counters,
    /// Saves of the registry to its store.
    pub store_writes: u64,
}

/// A rejection reason as a label value: its name on the wire.
fn reject_label(reason: RejectReason) -> &'static str {
    match reason {
        RejectReason::Version => "version",
        RejectReason::BadProof => "bad_proof",
        RejectReason::BadToken => "bad_token",
        RejectReason::Removed => "removed",
        RejectReason::BadHello => "bad_hello",
    }
}

/// mesh-rendezvous's metrics. Relay pairs are labelled `source` and
/// `destination` with the two nodes' overlay addresses, which are their
/// relay ids; relayed bytes are payload bytes (WireGuard datagrams), without
/// the relay header.
pub fn render_rendezvous(metrics: &RendezvousMetrics) -> String {
    let mut out = Exposition::new();
    out.family(
        "mesh_rendezvous_nodes",
        Kind::Gauge,
        "Nodes registered in the mesh.",
    )
    .sample(&[], metrics.nodes.len());
    out.family(
        "mesh_rendezvous_nodes_connected",
        Kind::Gauge,
        "Registered nodes connected now.",
    )
    .sample(&[], metrics.nodes.iter().filter(|n| n.online).count());
    let mut connected = out.family(
        "mesh_rendezvous_node_connected",
        Kind::Gauge,
        "1 while the node is connected, 0 otherwise.",
    );
    for node in &metrics.nodes {
        let address = node.ipv4.to_string();
        connected.sample(
            &[
                ("node", &node.name),
                ("public_key", &node.public_key.short()),
                ("address", &address),
            ],
            node.online,
        );
    }
    let mut failures = out.family(
        "mesh_rendezvous_admission_failures_total",
        Kind::Counter,
        "Hellos refused since the server started, by reason.",
    );
    for (reason, count) in &metrics.admission_failures {
        failures.sample(&[("reason", reject_label(*reason))], *count);
    }
    let admission = &metrics.admission;
    out.family(
        "mesh_rendezvous_admissions_pending",
        Kind::Gauge,
        "Connections in admission now.",
    )
    .sample(&[], admission.pending);
    out.family(
        "mesh_rendezvous_connections_refused_total",
        Kind::Counter,
        "Connections refused before admission: their source had too many pending, or the table was full.",
    )
    .sample(&[("reason", "per_source")], admission.refused_per_source)
    .sample(&[("reason", "table_full")], admission.refused_table_full);
    out.family(
        "mesh_rendezvous_address_validations_total",
        Kind::Counter,
        "QUIC Retry packets sent because many admissions were pending.",
    )
    .sample(&[], admission.validations);
    let stats = &metrics.relay.stats;
    out.family(
        "mesh_rendezvous_relay_packets_total",
        Kind::Counter,
        "Packets relayed between nodes.",
    )
    .sample(&[], stats.forwarded.packets);
    out.family(
        "mesh_rendezvous_relay_bytes_total",
        Kind::Counter,
        "Payload bytes relayed between nodes.",
    )
    .sample(&[], stats.forwarded.bytes);
    let pairs: Vec<(String, String, u64, u64)> = metrics
        .relay
        .pairs
        .iter()
        .map(|((from, to), s)| {
            (
                Ipv4Addr::from(from.get()).to_string(),
                Ipv4Addr::from(to.get()).to_string(),
                s.packets,
                s.bytes,
            )
        })
        .collect();
    let mut packets = out.family(
        "mesh_rendezvous_relay_pair_packets_total",
        Kind::Counter,
        "Packets relayed from one node to another.",
    );
    for (source, destination, count, _) in &pairs {
        packets.sample(&[("source", source), ("destination", destination)], *count);
    }
    let mut bytes = out.family(
        "mesh_rendezvous_relay_pair_bytes_total",
        Kind::Counter,
        "Payload bytes relayed from one node to another.",
    );
    for (source, destination, _, count) in &pairs {
        bytes.sample(&[("source", source), ("destination", destination)], *count);
    }
    let mut drops = out.family(
        "mesh_rendezvous_relay_dropped_packets_total",
        Kind::Counter,
        "Relay frames not forwarded, by reason.",
    );
    for (reason, count) in stats.drops() {
        drops.sample(&[("reason", reason.as_str())], count);
    }
    render_registry_counters(&mut out, metrics);
    out.finish()
}

/// The registry's write and rate-limit counters.
fn render_registry_counters(out: &mut Exposition, metrics: &RendezvousMetrics) {
    let counters = &metrics.registry;
    out.family(
        "mesh_rendezvous_store_writes_total",
        Kind::Counter,
        "Saves of the registry to its store.",
    )
    .sample(&[], metrics.store_writes);
    let mut over = out.family(
        "mesh_rendezvous_messages_over_rate_total",
        Kind::Counter,
        "Node messages dropped for being over their rate, by kind.",
    );
    for (kind, count) in counters.over_rate() {
        over.sample(&[("kind", kind.as_str())], count);
    }
    out.family(
        "mesh_rendezvous_punches_pair_limited_total",
        Kind::Counter,
        "Punches dropped by the rate per (requester, target) pair.",
    )
    .sample(&[], counters.punch_pair_limited);
    out.family(
        "mesh_rendezvous_connections_closed_flooding_total",
        Kind::Counter,
        "Node connections closed for sending messages over their rate.",
    )
    .sample(&[], counters.closed_flooding);
    let mut refused = out.family(
        "mesh_rendezvous_candidates_refused_total",
        Kind::Counter,
        "Candidates announced by nodes and dropped, by reason.",
    );
    for (reason, count) in counters.candidates_refused() {
        refused.sample(&[("reason", reason.as_str())], count);
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// The statuses this server answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    HeadTooLarge,
    /// The process could not gather its numbers (it is shutting down).
    Unavailable,
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::HeadTooLarge => 431,
            Status::Unavailable => 503,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::HeadTooLarge => "Request Header Fields Too Large",
            Status::Unavailable => "Service Unavailable",
        }
    }

    /// The body of a refusal: what to do instead.
    fn explanation(self) -> &'static str {
        match self {
            Status::Ok => "",
            Status::BadRequest => "not an HTTP/1 request\n",
            Status::NotFound => "metrics are at /metrics\n",
            Status::MethodNotAllowed => "only GET is served\n",
            Status::HeadTooLarge => "request head too large\n",
            Status::Unavailable => "metrics unavailable: the process is shutting down\n",
        }
    }
}

/// What a complete request head asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    Metrics,
    Refused(Status),
}

/// Reads a request head received so far: `None` while the empty line that
/// ends it has not arrived and there is room for more. Only the request
/// line matters; headers are skipped.
pub fn parse_head(received: &[u8]) -> Option<Asked> {
    let Some(end) = head_end(received) else {
        return (received.len() >= MAX_REQUEST_HEAD)
            .then_some(Asked::Refused(Status::HeadTooLarge));
    };
    let head = received.get(..end).unwrap_or_default();
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return Some(Asked::Refused(Status::BadRequest));
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Some(Asked::Refused(Status::BadRequest));
    };
    if method.is_empty() || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return Some(Asked::Refused(Status::BadRequest));
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Some(if path != METRICS_PATH {
        Asked::Refused(Status::NotFound)
    } else if method != "GET" {
        Asked::Refused(Status::MethodNotAllowed)
    } else {
        Asked::Metrics
    })
}

/// Where the head ends: after the first empty line (CRLF or bare LF).
fn head_end(received: &[u8]) -> Option<usize> {
    let crlf = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let lf = received
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A whole response: status line, headers, `body` (the metrics for 200,
/// else the status's explanation). The connection closes after it.
pub fn response(status: Status, body: &str) -> Vec<u8> {
    let body = if status == Status::Ok {
        body
    } else {
        status.explanation()
    };
    let content_type = if status == Status::Ok {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let allow = if status == Status::MethodNotAllowed {
        "Allow: GET\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{body}",
        status.code(),
        status.reason(),
        body.len()
    )
    .into_bytes()
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr}: {source}{hint}", hint = bind_hint(source))]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another process listens there; choose another metrics address)"
        }
        std::io::ErrorKind::AddrNotAvailable => " (not an address of this host)",
        _ => "",
    }
}

/// The bound metrics listener.
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(Self { listener })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves meshd's metrics, asking the driver for each scrape.
    pub async fn serve_node(self, asks: mpsc::Sender<Ask>) {
        self.serve(move || {
            let asks = asks.clone();
            async move { node_text(&asks).await }
        })
        .await
    }

    /// Accepts connections for ever, answering each scrape with what
    /// `render` returns; `None` answers 503. A connection past
    /// [`MAX_PER_SOURCE`] or [`MAX_CONNECTIONS`] is closed unanswered.
    pub async fn serve<F, Fut>(self, render: F)
    where
        F: Fn() -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Option<String>> + Send,
    {
        // The rendezvous's admission table, without Retry: every TCP
        // client has completed its handshake, so its address is real.
        let limits = Limits {
            per_source: MAX_PER_SOURCE,
            validate_above: usize::MAX,
            max: MAX_CONNECTIONS,
        };
        let mut serving = Pending::new(limits);
        let (done_tx, mut done) = mpsc::unbounded_channel::<Source>();
        loop {
            let (stream, peer) = tokio::select! {
                Some(source) = done.recv() => {
                    serving.done(source);
                    continue;
                }
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let source = Source::of(peer);
            if let Decision::Refuse(why) = serving.offer(source, true) {
                tracing::trace!(%peer, ?why, "metrics connection refused");
                continue;
            }
            let (render, done_tx) = (render.clone(), done_tx.clone());
            tokio::spawn(async move {
                if tokio::time::timeout(CONNECTION_DEADLINE, handle(stream, render))
                    .await
                    .is_err()
                {
                    tracing::debug!(%peer, "metrics client timed out");
                }
                let _ = done_tx.send(source);
            });
        }
    }
}

async fn handle<F, Fut>(mut stream: TcpStream, render: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<String>>,
{
    let mut received = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head = async {
        loop {
            if let Some(asked) = parse_head(&received) {
                return Some(asked);
            }
            let room = MAX_REQUEST_HEAD
                .saturating_sub(received.len())
                .min(chunk.len());
            let buf = chunk.get_mut(..room)?;
            match stream.read(buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => received.extend_from_slice(buf.get(..n).unwrap_or_default()),
            }
        }
    };
    let Ok(Some(asked)) = tokio::time::timeout(HEAD_DEADLINE, head).await else {
        return;
    };
    let answer = match asked {
        Asked::Metrics => match render().await {
            Some(text) => response(Status::Ok, &text),
            None => response(Status::Unavailable, ""),
        },
        Asked::Refused(status) => {
            tracing::debug!(status = status.code(), "metrics request refused");
            response(status, "")
        }
    };
    if stream.write_all(&answer).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let _ = tokio::io::copy(&mut (&mut stream).take(DRAIN_LIMIT), &mut tokio::io::sink()).await;
}

async fn node_text(asks: &mpsc::Sender<Ask>) -> Option<String> {
    let Response::Status(status) = ask(asks, Request::Status).await? else {
        return None;
    };
    let Response::Peers { peers } = ask(asks, Request::Peers).await? else {
        return None;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Some(render_node(&status, &peers, now))
}

async fn ask(asks: &mpsc::Sender<Ask>, request: Request) -> Option<Response> {
    let (tx, rx) = oneshot::channel();
    asks.send((request, tx)).await.ok()?;
    rx.await.ok()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::control::{IoCounters, RendezvousInfo};
    use crate::identity::PublicKey;
    use crate::relay::{DropReason, NodeId, RelayLimits, RelayTable};
    use crate::rendezvous::registry::ConnId;
    use crate::wire::control::NatMapping;

    const KEY_A: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
    const KEY_B: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";
    const KEY_C: &str = "YCZ0bo7QbVkq0SRbjWV0Wj7nfSY6fC3hqJmNtZOaTFw=";

    fn status() -> StatusInfo {
        StatusInfo {
            name: Some("node-a".into()),
            public_key: KEY_A.parse().unwrap(),
            overlay_ips: vec!["100.72.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            interface: "mesh0".into(),
            listen_port: 51820,
            peers: 2,
            rendezvous: Some(RendezvousInfo {
                connected: true,
                rtt_ms: Some(12.5),
            }),
            drops: BTreeMap::from([("no_route".to_owned(), 3), ("bad_packet".to_owned(), 1)]),
            cookie_replies_sent: 0,
            io: IoCounters {
                tun_reads: 2,
                tun_read_packets: 90,
                tun_writes: 3,
                tun_written_packets: 120,
                tun_write_errors: 0,
                udp_sends: 4,
                udp_sent_datagrams: 100,
                udp_send_errors: 1,
                udp_receives: 5,
                udp_received_datagrams: 130,
            },
            nat: NatMapping::Unknown,
            ..StatusInfo::default()
        }
    }

    fn peers() -> Vec<PeerInfo> {
        vec![
            PeerInfo {
                name: Some("node-b".into()),
                public_key: KEY_B.parse().unwrap(),
                overlay_ips: vec!["100.72.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
                path: crate::control::PeerPath::Direct,
                rtt_ms: Some(0.42),
                last_handshake: Some(5),
                rx_bytes: 2048,
                tx_bytes: 1024,
                rx_packets: 12,
                tx_packets: 10,
                handshakes: 1,
                online: true,
                ..PeerInfo::default()
            },
            PeerInfo {
                name: None,
                public_key: KEY_C.parse().unwrap(),
                overlay_ips: vec!["100.72.0.3".parse().unwrap()],
                path: crate::control::PeerPath::Relay,
                ..PeerInfo::default()
            },
        ]
    }

    #[test]
    fn a_node_with_a_direct_and_a_relayed_peer_renders_as_this_text() {
        let text = render_node(&status(), &peers(), 1_700_000_000);
        let expected = r#"# HELP meshd_info This node: its name, short public key and first overlay address; always 1.
# TYPE meshd_info gauge
meshd_info{node="node-a",public_key="hSDwCYkw",address="100.72.0.1"} 1
# HELP meshd_peers Peers this node has, configured or from the rendezvous.
# TYPE meshd_peers gauge
meshd_peers 2
# HELP meshd_rendezvous_connected 1 while the session with the rendezvous is up; absent without a rendezvous.
# TYPE meshd_rendezvous_connected gauge
meshd_rendezvous_connected 1
# HELP meshd_rendezvous_rtt_seconds Smoothed round-trip time of the QUIC session with the rendezvous.
# TYPE meshd_rendezvous_rtt_seconds gauge
meshd_rendezvous_rtt_seconds 0.0125
# HELP meshd_dropped_packets_total Packets this node dropped, by reason.
# TYPE meshd_dropped_packets_total counter
meshd_dropped_packets_total{reason="bad_packet"} 1
meshd_dropped_packets_total{reason="no_route"} 3
# HELP meshd_cookie_replies_sent_total WireGuard cookie replies sent while under load.
# TYPE meshd_cookie_replies_sent_total counter
meshd_cookie_replies_sent_total 0
# HELP meshd_io_calls_total System calls of the packet path, by operation (packets per call shows the offloads at work).
# TYPE meshd_io_calls_total counter
meshd_io_calls_total{op="tun_read"} 2
meshd_io_calls_total{op="tun_write"} 3
meshd_io_calls_total{op="udp_send"} 4
meshd_io_calls_total{op="udp_receive"} 5
# HELP meshd_io_packets_total Packets the packet path's system calls carried, by operation.
# TYPE meshd_io_packets_total counter
meshd_io_packets_total{op="tun_read"} 90
meshd_io_packets_total{op="tun_write"} 120
meshd_io_packets_total{op="udp_send"} 100
meshd_io_packets_total{op="udp_receive"} 130
# HELP meshd_io_errors_total Failed TUN writes and UDP sends (each a lost packet or batch).
# TYPE meshd_io_errors_total counter
meshd_io_errors_total{op="tun_write"} 0
meshd_io_errors_total{op="udp_send"} 1
# HELP meshd_peer_rx_bytes_total Bytes of authenticated WireGuard datagrams received from the peer.
# TYPE meshd_peer_rx_bytes_total counter
meshd_peer_rx_bytes_total{peer="node-b",public_key="3p7bfXt9",address="100.72.0.2"} 2048
meshd_peer_rx_bytes_total{peer="YCZ0bo7Q",public_key="YCZ0bo7Q",address="100.72.0.3"} 0
# HELP meshd_peer_tx_bytes_total Bytes of WireGuard datagrams sent to the peer.
# TYPE meshd_peer_tx_bytes_total counter
meshd_peer_tx_bytes_total{peer="node-b",public_key="3p7bfXt9",address="100.72.0.2"} 1024
meshd_peer_tx_bytes_total{peer="YCZ0bo7Q",public_key="YCZ0bo7Q",address="100.72.0.3"} 0
# HELP meshd_peer_rx_packets_total Authenticated WireGuard datagrams received from the peer.
# TYPE meshd_peer_rx_packets_total counter
meshd_peer_rx_packets_total{peer="node-b",public_key="3p7bfXt9",address="100.72.0.2"} 12
meshd_peer_rx_packets_total{peer="YCZ0bo7Q",public_key="YCZ0bo7Q",address="100.72.0.3"} 0
# HELP meshd_peer_tx_packets_total WireGuard datagrams sent to the peer.
# TYPE meshd_peer_tx_packets_total counter
meshd_peer_tx_packets_total{peer="node-b",public_key="3p7bfXt9",address="100.72.0.2"} 10
meshd_peer_tx_packets_total{peer="YCZ0bo7Q",public_key="YCZ0bo7Q",address="100.72.0.3"} 0
# HELP meshd_peer_handshakes_total WireGuard handshakes completed with the peer.
# TYPE meshd_peer_handshakes_total counter
meshd_peer_handshakes_total{peer="node-b",public_key="3p7bfXt9",address="100.72.0.2"} 1
meshd_peer_handshakes_total{peer="YCZ0bo7Q",public_key="YCZ0bo7Q",address="100.72.0.3"} 0
# HELP meshd_peer_last_handshake_timestamp_seconds Unix time of the last completed handshake with the peer, to the second; absent before the first.
# TYPE meshd_peer_last_handshake_timestamp_seconds gauge
meshd_peer_last_handshake_timestamp_seconds{peer="node-b",public_key="3p7bfXt9",address="100.72.0.2"} 1699999995
# HELP meshd_peer_online 1 while the last handshake with the peer is younger than 180 s (WireGuard's REJECT_AFTER_TIME).
# TYPE meshd_peer_online gauge
meshd_peer_online{peer="node-b",public_key="3p7bfXt9",address="100.72.0.2"} 1
meshd_peer_online{peer="YCZ0bo7Q",public_key="YCZ0bo7Q",address="100.72.0.3"} 0
# HELP meshd_peer_rtt_seconds Round-trip time of the direct path to the peer by authenticated probes; absent while relayed or unmeasured.
# TYPE meshd_peer_rtt_seconds gauge
meshd_peer_rtt_seconds{peer="node-b",public_key="3p7bfXt9",address="100.72.0.2"} 0.00042
# HELP meshd_peer_path The path traffic to the peer takes now: 1 for the current one of direct, relay and none, 0 for the others.
# TYPE meshd_peer_path gauge
meshd_peer_path{peer="node-b",public_key="3p7bfXt9",address="100.72.0.2",path="direct"} 1
meshd_peer_path{peer="node-b",public_key="3p7bfXt9",address="100.72.0.2",path="relay"} 0
meshd_peer_path{peer="node-b",public_key="3p7bfXt9",address="100.72.0.2",path="none"} 0
meshd_peer_path{peer="YCZ0bo7Q",public_key="YCZ0bo7Q",address="100.72.0.3",path="direct"} 0
meshd_peer_path{peer="YCZ0bo7Q",public_key="YCZ0bo7Q",address="100.72.0.3",path="relay"} 1
meshd_peer_path{peer="YCZ0bo7Q",public_key="YCZ0bo7Q",address="100.72.0.3",path="none"} 0
"#;
        assert_eq!(text, expected);
    }

    #[test]
    fn a_node_without_a_rendezvous_lists_the_family_without_a_sample() {
        let status = StatusInfo {
            rendezvous: None,
            ..status()
        };
        let text = render_node(&status, &[], 0);
        assert!(
            text.contains(
                "# TYPE meshd_rendezvous_connected gauge\n# HELP meshd_rendezvous_rtt_seconds"
            ),
            "{text}"
        );
        assert!(!text.contains("\nmeshd_rendezvous_connected "), "{text}");
        assert!(!text.contains("meshd_peer_path{"), "{text}");
    }

    fn rendezvous_metrics() -> RendezvousMetrics {
        let node = |key: &str, name: &str, last: u8, online| NodeStatus {
            public_key: key.parse::<PublicKey>().unwrap(),
            name: name.into(),
            ipv4: Ipv4Addr::new(100, 72, 0, last),
            ipv6: "fd00::1".parse().unwrap(),
            online,
            joined_at: 0,
            last_seen: 0,
            candidates: vec![],
        };
        let (a, b) = (
            NodeId::new(0x6448_0001).unwrap(),
            NodeId::new(0x6448_0002).unwrap(),
        );
        let mut table = RelayTable::new(RelayLimits::default());
        table.connect(a, ConnId(1));
        table.connect(b, ConnId(2));
        let frame = |to: NodeId, len: usize| {
            let header = crate::wire::relay::RelayHeader {
                kind: crate::wire::relay::RelayKind::Packet,
                node: to,
            };
            let mut out = Vec::new();
            crate::wire::relay::encode_frame(header, &vec![4; len], &mut out).unwrap();
            bytes::Bytes::from(out)
        };
        let now = std::time::Instant::now();
        table.handle_frame(ConnId(1), frame(b, 100), now);
        table.handle_frame(ConnId(1), frame(b, 60), now);
        table.handle_frame(ConnId(2), frame(a, 40), now);
        table.handle_frame(ConnId(2), frame(b, 40), now);
        table.count_drops(DropReason::InboundFull, 7);
        RendezvousMetrics {
            nodes: vec![
                node(KEY_A, "node-a", 1, true),
                node(KEY_B, "say \"hi\"\\\n", 2, false),
            ],
            admission_failures: vec![(RejectReason::BadToken, 2), (RejectReason::BadProof, 1)],
            admission: AdmissionCounts {
                pending: 3,
                refused_per_source: 40,
                refused_table_full: 0,
                validations: 5,
            },
            relay: RelaySnapshot::of(&table),
            registry: Counters::default(),
            store_writes: 5,
        }
    }

    #[test]
    fn a_rendezvous_with_two_nodes_and_relayed_traffic_renders_as_this_text() {
        let text = render_rendezvous(&rendezvous_metrics());
        let expected = r#"# HELP mesh_rendezvous_nodes Nodes registered in the mesh.
# TYPE mesh_rendezvous_nodes gauge
mesh_rendezvous_nodes 2
# HELP mesh_rendezvous_nodes_connected Registered nodes connected now.
# TYPE mesh_rendezvous_nodes_connected gauge
mesh_rendezvous_nodes_connected 1
# HELP mesh_rendezvous_node_connected 1 while the node is connected, 0 otherwise.
# TYPE mesh_rendezvous_node_connected gauge
mesh_rendezvous_node_connected{node="node-a",public_key="hSDwCYkw",address="100.72.0.1"} 1
mesh_rendezvous_node_connected{node="say \"hi\"\\\n",public_key="3p7bfXt9",address="100.72.0.2"} 0
# HELP mesh_rendezvous_admission_failures_total Hellos refused since the server started, by reason.
# TYPE mesh_rendezvous_admission_failures_total counter
mesh_rendezvous_admission_failures_total{reason="bad_token"} 2
mesh_rendezvous_admission_failures_total{reason="bad_proof"} 1
# HELP mesh_rendezvous_admissions_pending Connections in admission now.
# TYPE mesh_rendezvous_admissions_pending gauge
mesh_rendezvous_admissions_pending 3
# HELP mesh_rendezvous_connections_refused_total Connections refused before admission: their source had too many pending, or the table was full.
# TYPE mesh_rendezvous_connections_refused_total counter
mesh_rendezvous_connections_refused_total{reason="per_source"} 40
mesh_rendezvous_connections_refused_total{reason="table_full"} 0
# HELP mesh_rendezvous_address_validations_total QUIC Retry packets sent because many admissions were pending.
# TYPE mesh_rendezvous_address_validations_total counter
mesh_rendezvous_address_validations_total 5
# HELP mesh_rendezvous_relay_packets_total Packets relayed between nodes.
# TYPE mesh_rendezvous_relay_packets_total counter
mesh_rendezvous_relay_packets_total 3
# HELP mesh_rendezvous_relay_bytes_total Payload bytes relayed between nodes.
# TYPE mesh_rendezvous_relay_bytes_total counter
mesh_rendezvous_relay_bytes_total 200
# HELP mesh_rendezvous_relay_pair_packets_total Packets relayed from one node to another.
# TYPE mesh_rendezvous_relay_pair_packets_total counter
mesh_rendezvous_relay_pair_packets_total{source="100.72.0.1",destination="100.72.0.2"} 2
mesh_rendezvous_relay_pair_packets_total{source="100.72.0.2",destination="100.72.0.1"} 1
# HELP mesh_rendezvous_relay_pair_bytes_total Payload bytes relayed from one node to another.
# TYPE mesh_rendezvous_relay_pair_bytes_total counter
mesh_rendezvous_relay_pair_bytes_total{source="100.72.0.1",destination="100.72.0.2"} 160
mesh_rendezvous_relay_pair_bytes_total{source="100.72.0.2",destination="100.72.0.1"} 40
# HELP mesh_rendezvous_relay_dropped_packets_total Relay frames not forwarded, by reason.
# TYPE mesh_rendezvous_relay_dropped_packets_total counter
mesh_rendezvous_relay_dropped_packets_total{reason="not_admitted"} 0
mesh_rendezvous_relay_dropped_packets_total{reason="malformed"} 0
mesh_rendezvous_relay_dropped_packets_total{reason="self_addressed"} 1
mesh_rendezvous_relay_dropped_packets_total{reason="unknown_destination"} 0
mesh_rendezvous_relay_dropped_packets_total{reason="destination_offline"} 0
mesh_rendezvous_relay_dropped_packets_total{reason="rate_limited"} 0
mesh_rendezvous_relay_dropped_packets_total{reason="destination_limited"} 0
mesh_rendezvous_relay_dropped_packets_total{reason="queue_full"} 0
mesh_rendezvous_relay_dropped_packets_total{reason="inbound_full"} 7
# HELP mesh_rendezvous_store_writes_total Saves of the registry to its store.
# TYPE mesh_rendezvous_store_writes_total counter
mesh_rendezvous_store_writes_total 5
# HELP mesh_rendezvous_messages_over_rate_total Node messages dropped for being over their rate, by kind.
# TYPE mesh_rendezvous_messages_over_rate_total counter
mesh_rendezvous_messages_over_rate_total{kind="candidates"} 0
mesh_rendezvous_messages_over_rate_total{kind="nat"} 0
mesh_rendezvous_messages_over_rate_total{kind="punch"} 0
# HELP mesh_rendezvous_punches_pair_limited_total Punches dropped by the rate per (requester, target) pair.
# TYPE mesh_rendezvous_punches_pair_limited_total counter
mesh_rendezvous_punches_pair_limited_total 0
# HELP mesh_rendezvous_connections_closed_flooding_total Node connections closed for sending messages over their rate.
# TYPE mesh_rendezvous_connections_closed_flooding_total counter
mesh_rendezvous_connections_closed_flooding_total 0
# HELP mesh_rendezvous_candidates_refused_total Candidates announced by nodes and dropped, by reason.
# TYPE mesh_rendezvous_candidates_refused_total counter
mesh_rendezvous_candidates_refused_total{reason="port_zero"} 0
mesh_rendezvous_candidates_refused_total{reason="unspecified"} 0
mesh_rendezvous_candidates_refused_total{reason="loopback"} 0
mesh_rendezvous_candidates_refused_total{reason="link_local"} 0
mesh_rendezvous_candidates_refused_total{reason="multicast"} 0
mesh_rendezvous_candidates_refused_total{reason="broadcast"} 0
mesh_rendezvous_candidates_refused_total{reason="mesh_prefix"} 0
mesh_rendezvous_candidates_refused_total{reason="claimed_observed"} 0
"#;
        assert_eq!(text, expected);
    }

    /// A sample as Prometheus reads it: name, unescaped labels, value.
    type Sample = (String, Vec<(String, String)>, f64);

    fn is_name(s: &str, colon: bool) -> bool {
        s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
    }

    /// One line as Prometheus's text parser reads it: `Ok(None)` for a
    /// blank line or a well-formed `# HELP`/`# TYPE` comment, else the sample.
    fn parse_line(line: &str) -> Result<Option<Sample>, String> {
        if line.is_empty() {
            return Ok(None);
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            return match (words.next(), words.next(), words.next()) {
                (Some("HELP"), Some(name), Some(_)) if is_name(name, true) => Ok(None),
                (Some("TYPE"), Some(name), Some("counter" | "gauge")) if is_name(name, true) => {
                    Ok(None)
                }
                _ => Err(format!("not a HELP or TYPE comment: {line:?}")),
            };
        }
        let chars: Vec<char> = line.chars().collect();
        let mut i = chars
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric() || **c == '_' || **c == ':')
            .count();
        let name: String = chars[..i].iter().collect();
        if !is_name(&name, true) {
            return Err(format!("bad metric name in {line:?}"));
        }
        let mut labels = Vec::new();
        if chars.get(i) == Some(&'{') {
            i += 1;
            loop {
                let start = i;
                while chars
                    .get(i)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
                {
                    i += 1;
                }
                let label: String = chars[start..i].iter().collect();
                if !is_name(&label, false) || chars.get(i..i + 2) != Some(&['=', '"'][..]) {
                    return Err(format!("expected label=\"…\" at {start} in {line:?}"));
                }
                i += 2;
                let mut value = String::new();
                loop {
                    match chars.get(i) {
                        Some('\\') => {
                            value.push(match chars.get(i + 1) {
                                Some('\\') => '\\',
                                Some('"') => '"',
                                Some('n') => '\n',
                                other => return Err(format!("bad escape {other:?} in {line:?}")),
                            });
                            i += 2;
                        }
                        Some('"') => break,
                        Some('\n') | None => {
                            return Err(format!("unterminated label value in {line:?}"))
                        }
                        Some(c) => {
                            value.push(*c);
                            i += 1;
                        }
                    }
                }
                labels.push((label, value));
                i += 1;
                match chars.get(i) {
                    Some(',') => i += 1,
                    Some('}') => {
                        i += 1;
                        break;
                    }
                    _ => return Err(format!("expected ',' or '}}' at {i} in {line:?}")),
                }
            }
        }
        if chars.get(i) != Some(&' ') {
            return Err(format!("expected a space before the value in {line:?}"));
        }
        let value: String = chars[i + 1..].iter().collect();
        let value = match value.as_str() {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse::<f64>()
                .map_err(|e| format!("value {v:?} in {line:?}: {e}"))?,
        };
        Ok(Some((name, labels, value)))
    }

    fn parse(text: &str) -> Vec<Sample> {
        assert!(text.ends_with('\n'), "the text ends with a line feed");
        text.lines()
            .filter_map(|line| parse_line(line).unwrap_or_else(|e| panic!("{e}\n{text}")))
            .collect()
    }

    #[test]
    fn every_line_is_a_comment_a_blank_or_a_sample_and_label_values_read_back_as_given() {
        let awkward = "a \"quoted\" \\ name\nwith a line feed, {braces}=";
        let mut peers = peers();
        peers[0].name = Some(awkward.into());
        let mut status = status();
        status.drops.insert("odd\"reason".into(), 9);
        for text in [
            render_node(&status, &peers, 1_700_000_000),
            render_rendezvous(&rendezvous_metrics()),
        ] {
            let samples = parse(&text);
            assert!(samples.len() > 10, "{text}");
            for (name, ..) in &samples {
                assert!(
                    text.contains(&format!("# TYPE {name} ")),
                    "{name} has a TYPE line"
                );
            }
        }
        let samples = parse(&render_node(&status, &peers, 0));
        let rx = samples
            .iter()
            .find(|(name, ..)| name == "meshd_peer_rx_bytes_total")
            .unwrap();
        assert_eq!(rx.1[0], ("peer".to_owned(), awkward.to_owned()));
        assert_eq!(rx.2, 2048.0);
        assert!(samples.iter().any(|(_, labels, v)| labels
            == &[("reason".to_owned(), "odd\"reason".to_owned())]
            && *v == 9.0));
        let named = parse(&render_rendezvous(&rendezvous_metrics()));
        assert!(named
            .iter()
            .any(|(_, labels, _)| labels.iter().any(|(_, v)| v == "say \"hi\"\\\n")));
    }

    #[test]
    fn no_key_appears_beyond_its_short_prefix() {
        for text in [
            render_node(&status(), &peers(), 0),
            render_rendezvous(&rendezvous_metrics()),
        ] {
            for key in [KEY_A, KEY_B, KEY_C] {
                assert!(
                    !text.contains(&key[..9]),
                    "{key} is cut to 8 characters:\n{text}"
                );
            }
        }
    }

    #[test]
    fn help_text_escapes_backslashes_and_line_feeds_and_values_print_as_prometheus_reads_them() {
        let mut out = Exposition::new();
        out.family("x", Kind::Gauge, "a \\ and a\nline feed, \"quotes\" kept")
            .sample(&[], f64::NAN)
            .sample(&[("k", "v")], f64::INFINITY)
            .sample(&[], f64::NEG_INFINITY)
            .sample(&[], 0.25)
            .sample(&[], u64::MAX)
            .sample(&[], true);
        assert_eq!(
            out.finish(),
            "# HELP x a \\\\ and a\\nline feed, \"quotes\" kept\n# TYPE x gauge\n\
             x NaN\nx{k=\"v\"} +Inf\nx -Inf\nx 0.25\nx 18446744073709551615\nx 1\n"
        );
    }

    #[test]
    fn only_get_of_the_metrics_path_is_served_and_everything_else_gets_its_status() {
        let cases: [(&[u8], Asked); 12] = [
            (
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
                Asked::Metrics,
            ),
            (b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n", Asked::Metrics),
            (b"GET /metrics HTTP/1.1\n\n", Asked::Metrics),
            (b"GET / HTTP/1.1\r\n\r\n", Asked::Refused(Status::NotFound)),
            (
                b"GET /metrics/ HTTP/1.1\r\n\r\n",
                Asked::Refused(Status::NotFound),
            ),
            (
                b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
                Asked::Refused(Status::MethodNotAllowed),
            ),
            (
                b"HEAD /metrics HTTP/1.1\r\n\r\n",
                Asked::Refused(Status::MethodNotAllowed),
            ),
            (
                b"get /metrics HTTP/1.1\r\n\r\n",
                Asked::Refused(Status::MethodNotAllowed),
            ),
            (b"GET /metrics\r\n\r\n", Asked::Refused(Status::BadRequest)),
            (
                b"GET  /metrics HTTP/1.1\r\n\r\n",
                Asked::Refused(Status::BadRequest),
            ),
            (
                b"GET http://x/metrics HTTP/1.1\r\n\r\n",
                Asked::Refused(Status::BadRequest),
            ),
            (
                b"\xff\xfe /metrics HTTP/1.1\r\n\r\n",
                Asked::Refused(Status::BadRequest),
            ),
        ];
        for (head, expected) in cases {
            assert_eq!(
                parse_head(head),
                Some(expected),
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn a_head_is_incomplete_until_its_empty_line_and_refused_once_it_fills_the_limit() {
        assert_eq!(parse_head(b""), None);
        assert_eq!(parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        let mut long = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_REQUEST_HEAD - 1, b'a');
        assert_eq!(parse_head(&long), None);
        long.push(b'a');
        assert_eq!(
            parse_head(&long),
            Some(Asked::Refused(Status::HeadTooLarge))
        );
    }

    #[test]
    fn responses_carry_their_status_type_length_and_close() {
        let ok = String::from_utf8(response(Status::Ok, "x 1\n")).unwrap();
        assert_eq!(
            ok,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
             Content-Length: 4\r\nConnection: close\r\n\r\nx 1\n"
        );
        let refused = String::from_utf8(response(Status::MethodNotAllowed, "ignored")).unwrap();
        assert_eq!(
            refused,
            "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 19\r\nAllow: GET\r\nConnection: close\r\n\r\nonly GET is served\n"
        );
        for status in [
            Status::BadRequest,
            Status::NotFound,
            Status::HeadTooLarge,
            Status::Unavailable,
        ] {
            let text = String::from_utf8(response(status, "")).unwrap();
            let body = status.explanation();
            assert!(
                text.starts_with(&format!("HTTP/1.1 {} ", status.code())),
                "{text}"
            );
            assert!(
                text.ends_with(&format!(
                    "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )),
                "{text}"
            );
        }
    }

    /// One request over TCP; the whole answer, read to its end.
    async fn request(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn the_server_answers_a_scrape_refuses_the_rest_and_says_when_it_has_no_numbers() {
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let scrapes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = scrapes.clone();
        let task = tokio::spawn(server.serve(move || {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { (n == 0).then(|| "x 1\n".to_owned()) }
        }));
        let ok = request(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nx 1\n"),
            "{ok}"
        );
        let unavailable = request(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(unavailable.starts_with("HTTP/1.1 503 "), "{unavailable}");
        let post = request(
            addr,
            b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        let elsewhere = request(addr, b"GET /secrets HTTP/1.1\r\n\r\n").await;
        assert!(elsewhere.starts_with("HTTP/1.1 404 "), "{elsewhere}");
        let huge = request(addr, &[b'A'; 3 * MAX_REQUEST_HEAD]).await;
        assert!(huge.starts_with("HTTP/1.1 431 "), "{huge}");
        assert_eq!(
            scrapes.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "only the two scrapes rendered"
        );
        task.abort();
    }
}
