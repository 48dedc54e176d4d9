//! meshd's Prometheus metrics: what `meshctl status` and `meshctl peers`
//! show, as families of the text format ([`crate::metrics`]), served on the
//! metrics address when one is configured.
//!
//! [`render_node`] is pure: fixed input, fixed text. [`MetricsServer::serve_node`]
//! asks the driver for the numbers over the same channel as the JSON API
//! ([`Ask`]), so the engine is never shared behind a lock.
//!
//! A public key never appears beyond its first 8 base64 characters
//! ([`short_key`]), the prefix `meshctl` and the logs show.

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use tokio::sync::{mpsc, oneshot};

use super::server::Ask;
use super::{PeerInfo, Request, Response, StatusInfo};
pub use crate::identity::short_key;
use crate::metrics::{family, Kind, Value, NO_LABELS};
pub use crate::metrics::{MetricsError, MetricsServer};

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
    crate::metrics::render(NodeMetrics {
        status: status.clone(),
        peers: peers.to_vec(),
        now_unix,
    })
}

/// One scrape's numbers.
#[derive(Debug)]
struct NodeMetrics {
    status: StatusInfo,
    peers: Vec<PeerInfo>,
    now_unix: u64,
}

impl Collector for NodeMetrics {
    fn encode(&self, mut out: DescriptorEncoder) -> std::fmt::Result {
        let status = &self.status;
        let node_key = status.public_key.short();
        let node_address = status
            .overlay_ips
            .first()
            .map(ToString::to_string)
            .unwrap_or_default();
        let node_name = status.name.clone().unwrap_or_else(|| node_key.clone());
        family(
            &mut out,
            "meshd_info",
            Kind::Gauge,
            "This node: its name, short public key and first overlay address; always 1.",
            [(
                [
                    ("node", node_name.as_str()),
                    ("public_key", &node_key),
                    ("address", &node_address),
                ],
                Value::from(1u64),
            )],
        )?;
        family(
            &mut out,
            "meshd_peers",
            Kind::Gauge,
            "Peers this node has, configured or from the rendezvous.",
            [(NO_LABELS, status.peers.into())],
        )?;
        family(
            &mut out,
            "meshd_rendezvous_connected",
            Kind::Gauge,
            "1 while the session with the rendezvous is up; absent without a rendezvous.",
            status
                .rendezvous
                .as_ref()
                .map(|r| (NO_LABELS, r.connected.into())),
        )?;
        family(
            &mut out,
            "meshd_rendezvous_rtt_seconds",
            Kind::Gauge,
            "Smoothed round-trip time of the QUIC session with the rendezvous.",
            status
                .rendezvous
                .as_ref()
                .and_then(|r| r.rtt_ms)
                .map(|ms| (NO_LABELS, seconds(ms).into())),
        )?;
        family(
            &mut out,
            "meshd_dropped_packets_total",
            Kind::Counter,
            "Packets this node dropped, by reason.",
            status
                .drops
                .iter()
                .map(|(reason, count)| ([("reason", reason.to_string())], (*count).into())),
        )?;
        family(
            &mut out,
            "meshd_cookie_replies_sent_total",
            Kind::Counter,
            "WireGuard cookie replies sent while under load.",
            [(NO_LABELS, status.cookie_replies_sent.into())],
        )?;
        let io = &status.io;
        let ops = io.ops();
        family(
            &mut out,
            "meshd_io_calls_total",
            Kind::Counter,
            "System calls of the packet path, by operation (packets per call shows the offloads at work).",
            ops.iter().map(|op| ([("op", op.name)], op.calls.into())),
        )?;
        family(
            &mut out,
            "meshd_io_packets_total",
            Kind::Counter,
            "Packets the packet path's system calls carried, by operation.",
            ops.iter().map(|op| ([("op", op.name)], op.packets.into())),
        )?;
        family(
            &mut out,
            "meshd_io_errors_total",
            Kind::Counter,
            "Failed TUN writes, UDP sends and QUIC sends (each a lost packet or batch).",
            [
                ([("op", "tun_write")], io.tun_write_errors.into()),
                ([("op", "udp_send")], io.udp_send_errors.into()),
                ([("op", "quic_send")], io.quic_send_errors.into()),
            ],
        )?;
        self.encode_peers(&mut out)
    }
}

impl NodeMetrics {
    /// The families with one sample per peer.
    fn encode_peers(&self, out: &mut DescriptorEncoder) -> std::fmt::Result {
        let labels: Vec<PeerLabels> = self.peers.iter().map(PeerLabels::of).collect();
        let per_peer = |value: &dyn Fn(&PeerInfo) -> Option<Value>| {
            self.peers
                .iter()
                .zip(&labels)
                .filter_map(move |(peer, labels)| Some((labels.set(), value(peer)?)))
                .collect::<Vec<_>>()
        };
        family(
            out,
            "meshd_peer_rx_bytes_total",
            Kind::Counter,
            "Bytes of authenticated WireGuard datagrams received from the peer.",
            per_peer(&|p| Some(p.rx_bytes.into())),
        )?;
        family(
            out,
            "meshd_peer_tx_bytes_total",
            Kind::Counter,
            "Bytes of WireGuard datagrams sent to the peer.",
            per_peer(&|p| Some(p.tx_bytes.into())),
        )?;
        family(
            out,
            "meshd_peer_rx_packets_total",
            Kind::Counter,
            "Authenticated WireGuard datagrams received from the peer.",
            per_peer(&|p| Some(p.rx_packets.into())),
        )?;
        family(
            out,
            "meshd_peer_tx_packets_total",
            Kind::Counter,
            "WireGuard datagrams sent to the peer.",
            per_peer(&|p| Some(p.tx_packets.into())),
        )?;
        family(
            out,
            "meshd_peer_handshakes_total",
            Kind::Counter,
            "WireGuard handshakes completed with the peer.",
            per_peer(&|p| Some(p.handshakes.into())),
        )?;
        let now_unix = self.now_unix;
        family(
            out,
            "meshd_peer_last_handshake_timestamp_seconds",
            Kind::Gauge,
            "Unix time of the last completed handshake with the peer, to the second; absent before the first.",
            per_peer(&|p| p.last_handshake.map(|ago| now_unix.saturating_sub(ago).into())),
        )?;
        family(
            out,
            "meshd_peer_online",
            Kind::Gauge,
            "1 while the last handshake with the peer is younger than 180 s (WireGuard's REJECT_AFTER_TIME).",
            per_peer(&|p| Some(p.online.into())),
        )?;
        family(
            out,
            "meshd_peer_rtt_seconds",
            Kind::Gauge,
            "Round-trip time of the direct path to the peer by authenticated probes; absent while relayed or unmeasured.",
            per_peer(&|p| p.rtt_ms.map(|ms| seconds(ms).into())),
        )?;
        family(
            out,
            "meshd_peer_path",
            Kind::Gauge,
            "The path traffic to the peer takes now: 1 for the current one of direct, relay and none, 0 for the others.",
            self.peers.iter().zip(&labels).flat_map(|(peer, labels)| {
                let path = peer.path.to_string();
                PATHS.into_iter().map(move |name| {
                    let [peer, key, address] = labels.set();
                    ([peer, key, address, ("path", name)], (path == name).into())
                })
            }),
        )
    }
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

impl PeerLabels {
    fn of(peer: &PeerInfo) -> Self {
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

    fn set(&self) -> [(&'static str, &str); 3] {
        [
            ("peer", &self.peer),
            ("public_key", &self.key),
            ("address", &self.address),
        ]
    }
}

impl MetricsServer {
    /// Serves meshd's metrics, asking the driver for each scrape.
    pub async fn serve_node(self, asks: mpsc::Sender<Ask>) {
        self.serve(move || {
            let asks = asks.clone();
            async move { node_text(&asks).await }
        })
        .await
    }
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

    use super::*;
    use crate::control::{IoCounters, RendezvousInfo};
    use crate::metrics::scrape;
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
                quic_send_errors: 2,
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
# HELP meshd_io_errors_total Failed TUN writes, UDP sends and QUIC sends (each a lost packet or batch).
# TYPE meshd_io_errors_total counter
meshd_io_errors_total{op="tun_write"} 0
meshd_io_errors_total{op="udp_send"} 1
meshd_io_errors_total{op="quic_send"} 2
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

    #[test]
    fn the_scrape_reads_back_as_the_nodes_state_by_an_independent_parser() {
        let (status, peers) = (status(), peers());
        let scrape = scrape::parse(&render_node(&status, &peers, 1_700_000_000));
        let value = |name, labels: &[(&str, &str)]| scrape.value(name, labels);
        assert_eq!(value("meshd_peers", &[]), Some(status.peers as f64));
        for (reason, count) in &status.drops {
            assert_eq!(
                value("meshd_dropped_packets_total", &[("reason", reason)]),
                Some(*count as f64)
            );
        }
        for op in status.io.ops() {
            assert_eq!(
                value("meshd_io_calls_total", &[("op", op.name)]),
                Some(op.calls as f64)
            );
            assert_eq!(
                value("meshd_io_packets_total", &[("op", op.name)]),
                Some(op.packets as f64)
            );
        }
        for peer in &peers {
            let key = peer.public_key.short();
            let labels = [("public_key", key.as_str())];
            let counters = [
                ("meshd_peer_rx_bytes_total", peer.rx_bytes),
                ("meshd_peer_tx_bytes_total", peer.tx_bytes),
                ("meshd_peer_rx_packets_total", peer.rx_packets),
                ("meshd_peer_tx_packets_total", peer.tx_packets),
                ("meshd_peer_handshakes_total", peer.handshakes),
            ];
            for (name, count) in counters {
                assert_eq!(value(name, &labels), Some(count as f64), "{name} of {key}");
            }
            assert_eq!(
                value("meshd_peer_online", &labels),
                Some(f64::from(u8::from(peer.online)))
            );
            // Through Display: the API's path may become a typed value.
            let current = peer.path.to_string();
            for path in PATHS {
                let on = value("meshd_peer_path", &[labels[0], ("path", path)]);
                assert_eq!(
                    on,
                    Some(f64::from(u8::from(current == path))),
                    "{key} {path}"
                );
            }
            assert_eq!(
                value("meshd_peer_rtt_seconds", &labels),
                peer.rtt_ms.map(seconds)
            );
        }
        assert_eq!(
            scrape.samples("meshd_peer_path").len(),
            PATHS.len() * peers.len()
        );
    }

    #[test]
    fn label_values_read_back_as_given_however_awkward() {
        let awkward = "a \"quoted\" \\ name\nwith a line feed, {braces}=";
        let mut peers = peers();
        peers[0].name = Some(awkward.into());
        let mut status = status();
        status.drops.insert("odd\"reason".into(), 9);
        let scrape = scrape::parse(&render_node(&status, &peers, 0));
        assert_eq!(
            scrape.value("meshd_peer_rx_bytes_total", &[("peer", awkward)]),
            Some(2048.0)
        );
        assert_eq!(
            scrape.value("meshd_dropped_packets_total", &[("reason", "odd\"reason")]),
            Some(9.0)
        );
    }

    #[test]
    fn no_key_appears_beyond_its_short_prefix() {
        let text = render_node(&status(), &peers(), 0);
        for key in [KEY_A, KEY_B, KEY_C] {
            assert!(
                !text.contains(&key[..9]),
                "{key} is cut to 8 characters:\n{text}"
            );
        }
    }
}
