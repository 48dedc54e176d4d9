//! Prometheus metrics over HTTP, scraped the way Prometheus would: the
//! rendezvous on loopback (no root) counts its nodes, the hellos it refused
//! and the bytes it relayed; meshd in a network namespace (root) counts
//! each peer's traffic. Every scrape is read by a parser that is not ours
//! (`openmetrics-parser`), so a malformed line fails the test.
//!
//! Nothing waits on time: relayed frames are resent until the receiver has
//! one (datagrams may be lost), and the relay counts a frame before it
//! forwards it, so a scrape after a delivery sees it. meshd's counters are
//! polled until they grow ([`common::eventually`]); [`quic::DEADLINE`] only
//! turns a hang into a failure.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

#[cfg(not(feature = "sim"))]
mod common;

mod quic;

use std::net::SocketAddr;

use meshd::rendezvous::client::ClientError;
use meshd::rendezvous::server::Server;
use meshd::rendezvous::setup;
use meshd::wire::control::RejectReason;
use quic::{frame, resend_until, within_deadline, Member, Mesh, Rendezvous, HOUR};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendezvous_counts_nodes_refused_hellos_and_relayed_bytes_that_grow_with_traffic() {
    within_deadline(async {
        let mesh = Mesh::with_metrics();
        let token = mesh.token(HOUR, None);
        let rendezvous = mesh.serve().await;

        let before = rendezvous.scrape().await;
        assert_eq!(before.value("mesh_rendezvous_nodes", &[]), Some(0.0));
        assert_eq!(
            before.value("mesh_rendezvous_relay_bytes_total", &[]),
            Some(0.0)
        );
        assert_eq!(
            before.value(
                "mesh_rendezvous_admission_failures_total",
                &[("reason", "bad_token")]
            ),
            Some(0.0)
        );

        let a = Member::admit(&rendezvous, "a", &token).await;
        let b = Member::admit(&rendezvous, "b", &token).await;
        match Member::join(&rendezvous, "stranger", None).await {
            Err(ClientError::Rejected {
                reason: RejectReason::BadToken,
                ..
            }) => {}
            Err(other) => panic!("a node without a token is refused for it, not {other}"),
            Ok(_) => panic!("a node without a token is refused"),
        }

        let (address_a, address_b) = (a.address(), b.address());
        let to_b = [
            ("source", address_a.as_str()),
            ("destination", address_b.as_str()),
        ];
        let to_a = [
            ("source", address_b.as_str()),
            ("destination", address_a.as_str()),
        ];
        relay_until_delivered(&a, &b, 100).await;
        let first = rendezvous.scrape().await;
        assert_eq!(first.value("mesh_rendezvous_nodes", &[]), Some(2.0));
        assert_eq!(
            first.value("mesh_rendezvous_nodes_connected", &[]),
            Some(2.0)
        );
        for member in [&a, &b] {
            assert_eq!(
                first.value(
                    "mesh_rendezvous_node_connected",
                    &[("address", &member.address())]
                ),
                Some(1.0),
                "node {} is listed as connected",
                member.address()
            );
        }
        assert_eq!(
            first.value(
                "mesh_rendezvous_admission_failures_total",
                &[("reason", "bad_token")]
            ),
            Some(1.0)
        );
        let relayed = first
            .value("mesh_rendezvous_relay_pair_bytes_total", &to_b)
            .expect("the pair a → b is listed once it carried something");
        assert!(relayed >= 100.0, "a's 100-byte frame is counted: {relayed}");
        assert!(first.value("mesh_rendezvous_relay_pair_packets_total", &to_b) >= Some(1.0));
        assert_eq!(
            first.value("mesh_rendezvous_relay_pair_bytes_total", &to_a),
            None
        );
        let total = first
            .value("mesh_rendezvous_relay_bytes_total", &[])
            .expect("relayed bytes in total");
        assert!(
            total >= relayed,
            "the total {total} covers the pair's {relayed}"
        );

        relay_until_delivered(&a, &b, 600).await;
        relay_until_delivered(&b, &a, 10).await;
        let second = rendezvous.scrape().await;
        let grown = second
            .value("mesh_rendezvous_relay_pair_bytes_total", &to_b)
            .expect("the pair a → b is still listed");
        assert!(
            grown >= relayed + 600.0,
            "a → b grew by the 600-byte frame: {relayed} → {grown}"
        );
        assert!(second.value("mesh_rendezvous_relay_pair_bytes_total", &to_a) >= Some(10.0));
        assert!(second.value("mesh_rendezvous_relay_bytes_total", &[]) >= Some(total + 610.0));

        rendezvous.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_serves_get_of_metrics_only() {
    within_deadline(async {
        let mesh = Mesh::with_metrics();
        let rendezvous = mesh.serve().await;
        for (request, status) in [
            ("GET /metrics HTTP/1.1\r\nHost: rv\r\n\r\n", "200"),
            ("GET / HTTP/1.1\r\nHost: rv\r\n\r\n", "404"),
            (
                "POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
                "405",
            ),
            ("hello\r\n\r\n", "400"),
        ] {
            let answer = http(rendezvous.metrics(), request).await;
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "{request:?} is answered with {status}: {answer}"
            );
        }
        rendezvous.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_metrics_address_in_use_is_refused_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("its address");
    let mesh = Mesh::with_metrics();
    let config = setup::Layout::new(mesh.path()).config();
    let text = std::fs::read_to_string(&config).expect("read rendezvous.toml");
    let text = text.replace(
        "metrics-address = \"127.0.0.1:0\"",
        &format!("metrics-address = \"{addr}\""),
    );
    std::fs::write(&config, text).expect("write rendezvous.toml");
    let loaded = setup::load(mesh.path()).expect("load the state directory");
    let Err(error) = Server::bind(loaded).await else {
        panic!("the rendezvous cannot serve metrics on {addr}, which is taken");
    };
    let message = error.to_string();
    assert!(
        message.contains(&addr.to_string()) && message.contains("choose another metrics address"),
        "{message}"
    );
}

#[cfg(not(feature = "sim"))]
#[test]
fn meshd_counts_each_peers_traffic_and_the_counters_grow_after_a_ping() {
    use common::{eventually, Lab, DEADLINE};
    use quic::now_unix;

    const METRICS: &str = "127.0.0.1:9586";
    let started = now_unix();
    let lab = Lab::new(2);
    let (a, b) = (lab.node(0), lab.node(1));
    let files = lab.write_meshd_config(0, &[1]);
    let config = std::fs::read_to_string(&files.config).expect("read node a's config");
    // Top-level keys go before the [[peer]] tables.
    std::fs::write(
        &files.config,
        format!("metrics-address = \"{METRICS}\"\n{config}"),
    )
    .expect("write node a's config");
    let meshd_a = lab.start_meshd(0, &files);
    let _meshd_b = lab.start_meshd_with_peers(1, &[0]);

    a.pings(b.overlay);
    let address = b.overlay.to_string();
    let peer_b = [
        ("public_key", &b.key.public[..8]),
        ("address", address.as_str()),
    ];
    let scrape = || {
        let text = scrape_in_namespace(&a.ns, METRICS.parse().expect("an address"));
        Scrape::parse(&text)
    };
    let first = scrape();
    assert_eq!(first.value("meshd_peers", &[]), Some(1.0));
    assert_eq!(first.value("meshd_peer_online", &peer_b), Some(1.0));
    let direct = [peer_b[0], peer_b[1], ("path", "direct")];
    assert_eq!(
        first.value("meshd_peer_path", &direct),
        Some(1.0),
        "node b is reached directly"
    );
    assert!(first.value("meshd_peer_handshakes_total", &peer_b) >= Some(1.0));
    let handshake = first
        .value("meshd_peer_last_handshake_timestamp_seconds", &peer_b)
        .expect("a handshake happened");
    assert!(
        (started as f64..=now_unix() as f64).contains(&handshake),
        "the handshake happened during this test (unix time {started}..): {handshake}"
    );
    let counters = [
        "meshd_peer_rx_bytes_total",
        "meshd_peer_tx_bytes_total",
        "meshd_peer_rx_packets_total",
        "meshd_peer_tx_packets_total",
    ];
    let before: Vec<f64> = counters
        .iter()
        .map(|name| {
            first
                .value(name, &peer_b)
                .unwrap_or_else(|| panic!("{name} for node b"))
        })
        .collect();
    assert!(
        before.iter().all(|v| *v > 0.0),
        "the first ping was counted: {before:?}"
    );
    assert!(
        !first.text.contains(&b.key.public[..9]),
        "node b's key appears only cut to 8 characters"
    );

    // The scrape shows the node's state: between two API snapshots taken
    // around it, every counter lies between the two readings.
    let before_api = (meshd_a.status(), meshd_a.peers());
    let during = scrape();
    let after_api = (meshd_a.status(), meshd_a.peers());
    let peer_json = |peers: &[serde_json::Value]| {
        peers
            .iter()
            .find(|p| p["public_key"] == b.key.public.as_str())
            .cloned()
            .expect("node b in meshctl peers")
    };
    let (then, now) = (peer_json(&before_api.1), peer_json(&after_api.1));
    for (metric, field) in [
        ("meshd_peer_rx_bytes_total", "rx_bytes"),
        ("meshd_peer_tx_bytes_total", "tx_bytes"),
        ("meshd_peer_rx_packets_total", "rx_packets"),
        ("meshd_peer_tx_packets_total", "tx_packets"),
        ("meshd_peer_handshakes_total", "handshakes"),
    ] {
        let shown = during.value(metric, &peer_b).expect(metric);
        let (low, high) = (then[field].as_f64(), now[field].as_f64());
        assert!(
            low <= Some(shown) && Some(shown) <= high,
            "{metric} {shown} lies between the API's {field} {low:?} and {high:?}"
        );
    }
    assert_eq!(
        during.value("meshd_peers", &[]),
        after_api.0["peers"].as_f64(),
        "the API's peer count"
    );
    // The API lists the reasons that counted something.
    let drops = after_api.0["drops"].as_object().expect("drops by reason");
    for (reason, count) in drops {
        let shown = during
            .value("meshd_dropped_packets_total", &[("reason", reason)])
            .unwrap_or_else(|| panic!("drops for {reason} are listed"));
        let low = before_api.0["drops"][reason].as_f64().unwrap_or(0.0);
        assert!(
            (low..=count.as_f64().unwrap_or(f64::MAX)).contains(&shown),
            "drops for {reason}: {shown} between {low} and {count}"
        );
    }

    a.pings(b.overlay);
    eventually("node b's counters grow after a ping", DEADLINE, || {
        let now = scrape();
        let after: Vec<f64> = counters
            .iter()
            .map(|name| now.value(name, &peer_b).unwrap_or_default())
            .collect();
        if after.iter().zip(&before).all(|(now, then)| now > then) {
            Ok(())
        } else {
            Err(format!(
                "{counters:?}: before the ping {before:?}, now {after:?}"
            ))
        }
    });
}

// ---------------------------------------------------------------------------
// Scraping and parsing
// ---------------------------------------------------------------------------

/// A scrape as Prometheus reads it, by a parser that is not ours
/// (`openmetrics-parser`'s reader of the text format 0.0.4).
struct Scrape {
    text: String,
    exposition: openmetrics_parser::MetricsExposition<
        openmetrics_parser::PrometheusType,
        openmetrics_parser::PrometheusValue,
    >,
}

impl Scrape {
    /// Parses the body of a scrape; panics, with the text, where it is not
    /// the format.
    fn parse(text: &str) -> Self {
        let exposition = openmetrics_parser::prometheus::parse_prometheus(text)
            .unwrap_or_else(|e| panic!("not the text format: {e:?}\n{text}"));
        Self {
            text: text.to_owned(),
            exposition,
        }
    }

    /// The value of the one sample of `name` whose labels include `labels`;
    /// `None` if there is none, a panic if there are several.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        use openmetrics_parser::PrometheusValue;

        let family = self.exposition.families.get(name)?;
        let mut matching = family.iter_samples().filter(|sample| {
            let set = sample.get_labelset().expect("a sample of a family");
            labels
                .iter()
                .all(|(k, v)| set.get_label_value(k) == Some(*v))
        });
        let found = matching.next().map(|sample| match &sample.value {
            PrometheusValue::Counter(counter) => counter.value.as_f64(),
            PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n) => n.as_f64(),
            other => panic!("{name} is a counter or a gauge, not {other:?}"),
        });
        assert!(
            matching.next().is_none(),
            "several samples of {name} match {labels:?}:\n{}",
            self.text
        );
        found
    }
}

/// Sends `request` and reads the whole answer (the server closes after one).
async fn http(addr: SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to the metrics address {addr}: {e}"));
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send a request");
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .await
        .expect("read the answer");
    String::from_utf8(answer).expect("a UTF-8 answer")
}

/// The body of a successful scrape, after checking the status and type.
fn body_of(answer: &str) -> &str {
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    assert!(
        head.starts_with("HTTP/1.1 200 OK\r\n"),
        "the scrape succeeds: {answer}"
    );
    assert!(
        head.contains("\r\nContent-Type: text/plain; version=0.0.4"),
        "the answer is in the text format: {head}"
    );
    body
}

/// Scrapes `addr` from inside network namespace `ns`, on a thread of its own.
#[cfg(not(feature = "sim"))]
fn scrape_in_namespace(ns: &str, addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    use std::time::Duration;

    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // Changes the namespace of this thread only.
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect to meshd's metrics at {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("a read timeout");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: meshd\r\n\r\n")
            .expect("send a scrape");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("read the scrape");
        body_of(&answer).to_owned()
    })
    .join()
    .expect("the scraping thread")
}

// ---------------------------------------------------------------------------
// Harness (the rest is in tests/quic)
// ---------------------------------------------------------------------------

impl Rendezvous {
    async fn scrape(&self) -> Scrape {
        let answer = http(self.metrics(), "GET /metrics HTTP/1.1\r\nHost: rv\r\n\r\n").await;
        Scrape::parse(body_of(&answer))
    }
}

impl Member {
    /// The overlay address, which is also the relay id.
    fn address(&self) -> String {
        std::net::Ipv4Addr::from(self.id.get()).to_string()
    }
}

/// Has `from` send a `len`-byte payload to `to` through the relay until
/// `to` has received one: then the relay has counted it. Each call uses
/// its own length, so a resent frame of an earlier call that arrives late
/// is not taken for this one's.
async fn relay_until_delivered(from: &Member, to: &Member, len: usize) {
    let receiving = async {
        loop {
            let (source, payload) = to.receive().await;
            if source == from.id && payload.len() == len {
                return;
            }
        }
    };
    resend_until(from, frame(to.id, &vec![7; len]), receiving).await
}
