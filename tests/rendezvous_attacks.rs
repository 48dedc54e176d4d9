//! What a stranger on the internet (and a flaky network) can do to the
//! rendezvous's transport, replayed over real QUIC and TCP on loopback: a
//! control frame split across packets while other events fire, one source
//! holding hundreds of pending admissions, many sources past the Retry
//! threshold, a hello that repeats a key, idle connections to the metrics
//! endpoint, a member that never reads its control stream. No root needed.
//!
//! Attackers bind 127.0.0.2 and up, members 127.0.0.1, so the rendezvous
//! sees them as different sources (all of 127.0.0.0/8 is loopback on
//! Linux). Every attack is bounded in count and ends with its test. The
//! pauses between the pieces of a split frame are the attack itself (they
//! put each piece in a packet of its own), not a wait for something to
//! happen: every step that depends on the other side waits for a message,
//! and [`quic::DEADLINE`] only turns a hang into a failure.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod quic;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use meshd::identity::PrivateKey;
use meshd::rendezvous::admission;
use meshd::rendezvous::client::{self, Channels, ClientConfig, RelayLink, Update};
use meshd::rendezvous::stream::{read_frame, write_frame};
use meshd::rendezvous::tls::{self, CertHash};
use meshd::sockets::QuicSource;
use meshd::wire::control::{
    encode, Candidate, CandidateKind, Hello, LinkHello, MeshInfo, NatMapping, NodeEntry,
    NodeMessage, PeerList, RejectReason, ServerHello, ServerMessage, MAX_FRAME_UNADMITTED,
    PROTOCOL_VERSION,
};
use meshd::wire::relay::NodeId;
use quic::{
    frame, within_deadline, Member, Mesh, Node, RawConnection, Rendezvous, HOUR, LISTEN_PORT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

/// Pending admissions one source may hold (`rendezvous::pending::Limits`).
const PER_SOURCE: usize = 8;
/// Pending admissions past which unvalidated addresses get a Retry.
const VALIDATE_ABOVE: usize = 32;
/// The pause that puts each piece of a split frame in a packet of its own.
const PIECE_GAP: Duration = Duration::from_millis(2);

// ---------------------------------------------------------------------------
// Control-stream framing (issue 13, item 5)
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_message_split_across_packets_reaches_the_rendezvous_whole_while_relay_datagrams_arrive(
) {
    within_deadline(async {
        let mesh = Mesh::init();
        let token = mesh.token(HOUR, None);
        let rendezvous = mesh.serve().await;
        let mut watcher = Member::admit(&rendezvous, "watcher", &token).await;

        // The splitter is admitted by hand, so the test writes its bytes.
        let splitter = Node::new("splitter");
        let (mut raw, answer) = RawConnection::admit(&splitter, &rendezvous, &token).await;
        let own_id = match answer {
            ServerMessage::Welcome { node, .. } => {
                NodeId::of_overlay(node.ipv4).expect("a relay id")
            }
            other => panic!("the splitter should be admitted, got {other:?}"),
        };

        let moved: SocketAddr = "203.0.113.7:51820".parse().expect("an address");
        let message = NodeMessage::Candidates {
            candidates: vec![Candidate {
                addr: moved,
                kind: CandidateKind::Local,
                mapped: None,
            }],
        };
        let bytes = encode(&message);
        // Between the pieces, relay datagrams (addressed to itself, so the
        // relay drops them) wake the rendezvous's connection loop, whose
        // frame read is dropped each time the datagram branch wins.
        let splitting = async {
            for piece in bytes.chunks(1) {
                raw.send.write_all(piece).await.expect("the piece goes out");
                tokio::time::sleep(PIECE_GAP).await;
                raw.connection
                    .send_datagram(frame(own_id, b"busy"))
                    .expect("a datagram goes out");
                tokio::time::sleep(PIECE_GAP).await;
            }
        };
        splitting.await;

        let heard = async {
            loop {
                match watcher.session.next().await {
                    Ok(Some(Update::Upsert(peer))) if peer.public_key == splitter.public_key() => {
                        if peer.candidates.iter().any(|c| c.addr == moved) {
                            return Ok(());
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return Err("the watcher's session closed".to_owned()),
                    Err(e) => return Err(format!("the watcher's session failed: {e}")),
                }
            }
        };
        tokio::select! {
            result = heard => result.expect("the watcher hears of the splitter's new candidates"),
            reason = raw.connection.closed() => {
                panic!("the rendezvous dropped the splitter (the frame lost bytes): {reason}")
            }
        }
        rendezvous.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_message_split_across_packets_reaches_the_node_whole_while_relay_datagrams_arrive()
{
    within_deadline(async {
        let fake = FakeRendezvous::bind().await;
        let node = Node::new("node");
        let (updates_tx, mut updates) = mpsc::channel(16);
        let (_outbox_tx, outbox) = mpsc::channel(1);
        let (relay_conn, _relay_conn_rx) = watch::channel(None);
        // Room for one frame: the rest are dropped, as a full queue would.
        let (relay_frames, _relayed) = mpsc::channel(1);
        let channels = Channels {
            updates: updates_tx,
            outbox,
            relay: RelayLink {
                connection: relay_conn,
                frames: relay_frames,
            },
            quic_source: Arc::new(QuicSource::default()),
            extra_routes: None,
            mapped: None,
            interfaces: None,
        };
        let config = ClientConfig {
            token: Some(
                "k7q2xw.EBESExQVFhcYGRobHB0eHyAhIiMkJSYnKCkqKywtLi8"
                    .parse()
                    .expect("a join token"),
            ),
            ..fake.config()
        };
        let session = tokio::spawn(client::run(
            node.endpoint.clone(),
            config,
            node.key.clone(),
            Vec::new,
            channels,
            true,
        ));

        let (connection, mut send, _recv) = fake.admit(&node).await;
        match updates.recv().await {
            Some(Update::Welcome { .. }) => {}
            other => panic!("the node should be welcomed first, got {other:?}"),
        }
        let peer = entry(
            &PrivateKey::generate(&mut rand::rngs::OsRng),
            "far-away-peer",
            9,
        );
        let bytes = encode(&ServerMessage::PeerUpsert { peer: peer.clone() });
        let splitting = async {
            for piece in bytes.chunks(1) {
                send.write_all(piece).await.expect("the piece goes out");
                tokio::time::sleep(PIECE_GAP).await;
                connection
                    .send_datagram(frame(NodeId::new(9).expect("an id"), b"relayed"))
                    .expect("a datagram");
                tokio::time::sleep(PIECE_GAP).await;
            }
        };
        splitting.await;
        match updates.recv().await {
            Some(Update::Upsert(got)) => assert_eq!(got, peer),
            other => panic!(
                "the node should hear of the peer whole, got {other:?} (the frame lost bytes)"
            ),
        }
        session.abort();
    })
    .await;
}

/// A server (or whoever holds its certificate) that welcomes a node
/// "without the map" when the node offered none cannot leave it holding an
/// empty map that looks whole: the node refuses that welcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_without_the_map_to_a_node_that_holds_none_is_refused() {
    within_deadline(async {
        let fake = FakeRendezvous::bind().await;
        let node = Node::new("node");
        let config = fake.config();
        let (admitted, _held) = tokio::join!(
            client::admit(&node.endpoint, &config, &node.key, Vec::new()),
            fake.admit_saying(&node, true)
        );
        match admitted {
            Err(client::ClientError::Protocol { reason, .. }) => {
                assert!(reason.contains("does not hold"), "{reason}");
            }
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("admitted with an empty map it did not ask for"),
        }
    })
    .await;
}

/// A node admitted by the fake rendezvous, whose welcome the test writes as
/// `pieces` pieces `gap` apart: the node's admission as it ended.
async fn admit_with_a_welcome_in_pieces(
    pieces: usize,
    gap: Duration,
    stop_after: Option<usize>,
) -> Result<(), client::ClientError> {
    let fake = FakeRendezvous::bind().await;
    let node = Node::new("node");
    let config = fake.config();
    let server = async {
        let (connection, mut send, recv) = fake.hello_of(&node).await;
        // A map of 2,000 peers: a welcome of a few hundred kilobytes.
        let mut welcome = welcome_for(&node, &connection, false);
        if let ServerMessage::Welcome { peers, .. } = &mut welcome {
            *peers = (0..2000u32)
                .map(|n| {
                    let key = PrivateKey::from_bytes([(n % 251) as u8 + 1; 32]);
                    entry(&key, &format!("peer-{n}"), (n % 250) as u8 + 1)
                })
                .collect();
        }
        let bytes = encode(&welcome);
        let size = bytes.len().div_ceil(pieces);
        for (i, piece) in bytes.chunks(size).enumerate() {
            if stop_after.is_some_and(|stop| i == stop) {
                break;
            }
            send.write_all(piece).await.expect("a piece goes out");
            tokio::time::sleep(gap).await;
        }
        (connection, send, recv)
    };
    let (admitted, _held) = tokio::join!(
        client::admit(&node.endpoint, &config, &node.key, Vec::new()),
        server
    );
    admitted.map(|_| ())
}

/// A large welcome from a busy server (or over a slow link) that takes
/// longer than the handshake deadline but keeps coming is taken, not
/// abandoned and asked for again (which would cost the server the whole
/// map again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_that_keeps_coming_for_longer_than_the_handshake_deadline_is_taken() {
    within_deadline(async {
        let started = std::time::Instant::now();
        let admitted = admit_with_a_welcome_in_pieces(8, Duration::from_secs(2), None).await;
        assert!(admitted.is_ok(), "{admitted:?}");
        assert!(
            started.elapsed() > Duration::from_secs(10),
            "slower than the handshake deadline"
        );
    })
    .await;
}

/// A welcome that stops coming is given up 10 s after its last byte: the
/// node goes on (next server, or again), never waits forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_that_stops_halfway_is_given_up() {
    within_deadline(async {
        let started = std::time::Instant::now();
        match admit_with_a_welcome_in_pieces(4, Duration::from_millis(100), Some(2)).await {
            Err(client::ClientError::Connect { reason, .. }) => {
                assert!(reason.contains("stopped after"), "{reason}");
            }
            other => panic!("expected the welcome given up, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(20));
    })
    .await;
}

// ---------------------------------------------------------------------------
// Admission under a flood (issue 13, item 2)
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_holding_hundreds_of_pending_connections_does_not_keep_a_member_out() {
    within_deadline(async {
        const ATTEMPTS: usize = 300;
        let mesh = Mesh::with_metrics();
        let token = mesh.token(HOUR, None);
        let rendezvous = mesh.serve().await;

        let attacker = Attacker::on(Ipv4Addr::new(127, 0, 0, 2));
        let held = attacker.hold(&rendezvous, ATTEMPTS).await;
        let open = held.iter().filter(|c| c.close_reason().is_none()).count();
        assert!(
            open <= PER_SOURCE,
            "one source holds {open} pending admissions"
        );
        assert!(open > 0, "a source gets its share");

        let member = Node::new("member");
        let (_session, welcome) = member
            .join(&rendezvous, Some(&token))
            .await
            .expect("the member is admitted");
        assert!(mesh.info.ipv4.contains(&welcome.node.ipv4));
        let refused = scrape(
            &rendezvous,
            "mesh_rendezvous_connections_refused_total",
            &[("reason", "per_source")],
        )
        .await;
        assert!(
            refused >= (ATTEMPTS - PER_SOURCE) as f64,
            "refusals counted: {refused}"
        );
        drop(held);
        rendezvous.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_threshold_new_addresses_are_validated_with_a_retry_and_a_member_still_gets_in() {
    within_deadline(async {
        let mesh = Mesh::with_metrics();
        let token = mesh.token(HOUR, None);
        let rendezvous = mesh.serve().await;

        // Enough sources, each at its cap, to pass the threshold.
        let sources = VALIDATE_ABOVE / PER_SOURCE + 1;
        let mut held = Vec::new();
        let mut attackers = Vec::new();
        for i in 0..sources {
            let attacker = Attacker::on(Ipv4Addr::new(127, 0, 0, 2 + i as u8));
            held.extend(attacker.hold(&rendezvous, PER_SOURCE).await);
            attackers.push(attacker);
        }
        let member = Node::new("member");
        member
            .join(&rendezvous, Some(&token))
            .await
            .expect("the member is admitted after a Retry");
        let retries = scrape(
            &rendezvous,
            "mesh_rendezvous_address_validations_total",
            &[],
        )
        .await;
        assert!(retries >= 1.0, "Retries sent: {retries}");
        drop(held);
        rendezvous.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// The hello (issue 13, fuzzing item: duplicate keys)
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_that_names_the_node_twice_is_refused_as_malformed() {
    within_deadline(async {
        let mesh = Mesh::init();
        let token = mesh.token(HOUR, None);
        let rendezvous = mesh.serve().await;
        let node = Node::new("node-a");
        let mut raw = RawConnection::open(&node.endpoint, &rendezvous).await;
        let proof = admission::proof(&node.key, &raw.server_hello.server_key, &raw.exporter);
        let hello = Hello {
            name: "node-a".into(),
            ..quic::hello(node.public_key(), proof, Some(&token))
        };
        // Valid in every other way: only the second "name" is wrong.
        let json = serde_json::to_string(&hello).expect("a hello serializes");
        let twice = json.replacen(
            r#""name":"node-a","#,
            r#""name":"node-a","name":"node-b","#,
            1,
        );
        assert_ne!(json, twice);
        let mut bytes = (twice.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(twice.as_bytes());
        raw.send
            .write_all(&bytes)
            .await
            .expect("the hello goes out");
        match raw.answer().await {
            ServerMessage::Rejected {
                reason: RejectReason::BadHello,
                ..
            } => {}
            other => panic!("a hello with two names got {other:?}"),
        }
        assert!(rendezvous.nodes().await.is_empty(), "nobody was registered");
        rendezvous.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// The metrics endpoint (issue 13, item 6)
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_one_source_do_not_starve_the_metrics_endpoint() {
    within_deadline(async {
        /// What the old server allowed in all: its slots held for 5 s each.
        const IDLE: usize = 8;
        /// How long the scrape may wait: well under the 5 s an idle
        /// connection held a slot for, far above what a free server takes.
        const PATIENCE: Duration = Duration::from_secs(3);
        let mesh = Mesh::with_metrics();
        let rendezvous = mesh.serve().await;
        let mut idle = Vec::new();
        for _ in 0..IDLE {
            let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
            socket
                .bind("127.0.0.2:0".parse().expect("an address"))
                .expect("bind 127.0.0.2");
            idle.push(socket.connect(rendezvous.metrics()).await.expect("connect"));
        }
        let answer = tokio::time::timeout(PATIENCE, http_get(rendezvous.metrics(), "/metrics"))
            .await
            .expect("the scrape is answered although another source holds idle connections");
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        drop(idle);
        rendezvous.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// A stranger's QUIC endpoint on an address of its own.
struct Attacker {
    endpoint: quinn::Endpoint,
}

impl Attacker {
    fn on(ip: Ipv4Addr) -> Self {
        let endpoint =
            quinn::Endpoint::client(SocketAddr::from((ip, 0))).expect("an attacker endpoint");
        Self { endpoint }
    }

    /// Opens `attempts` connections at once and never says hello; returns
    /// those whose handshake completed (the refused ones fail at once).
    async fn hold(&self, rendezvous: &Rendezvous, attempts: usize) -> Vec<quinn::Connection> {
        let config = tls::client_config(rendezvous.pin).expect("a client configuration");
        let mut tries = tokio::task::JoinSet::new();
        for _ in 0..attempts {
            let connecting = self
                .endpoint
                .connect_with(config.clone(), rendezvous.addr, tls::SERVER_NAME)
                .expect("connect");
            tries.spawn(async move { connecting.await.ok() });
        }
        let mut held = Vec::new();
        while let Some(result) = tries.join_next().await {
            held.extend(result.expect("a connection attempt"));
        }
        held
    }
}

/// A rendezvous played by the test, to send a node whatever bytes it likes.
struct FakeRendezvous {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    pin: CertHash,
    key: PrivateKey,
}

impl FakeRendezvous {
    async fn bind() -> Self {
        let (cert, cert_key) = tls::generate_certificate().expect("a certificate");
        let pin = CertHash::of(&cert);
        let config = tls::server_config(vec![cert], cert_key).expect("a server configuration");
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
        let endpoint = quinn::Endpoint::new(
            tls::endpoint_config(),
            Some(config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .expect("a server endpoint");
        let addr = endpoint.local_addr().expect("its address");
        Self {
            endpoint,
            addr,
            pin,
            key: PrivateKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// A registered node's configuration for this rendezvous.
    fn config(&self) -> ClientConfig {
        ClientConfig {
            servers: vec![self.addr.to_string()],
            pin: self.pin,
            name: "node".into(),
            listen_port: LISTEN_PORT,
            token: None,
            routes: Vec::new(),
        }
    }

    /// Accepts `node`, reads its hello and welcomes it; the connection and
    /// the control stream, for the test's own frames (dropping the
    /// receiving side would stop the node's sending side).
    async fn admit(
        &self,
        node: &Node,
    ) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
        self.admit_saying(node, false).await
    }

    /// [`FakeRendezvous::admit`], its welcome saying `peers_unchanged`.
    async fn admit_saying(
        &self,
        node: &Node,
        peers_unchanged: bool,
    ) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
        let (connection, mut send, recv) = self.hello_of(node).await;
        let welcome = welcome_for(node, &connection, peers_unchanged);
        write_frame(&mut send, &welcome).await.expect("the welcome");
        (connection, send, recv)
    }

    /// Accepts `node` and reads its hello; the welcome is the test's.
    async fn hello_of(
        &self,
        node: &Node,
    ) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
        let incoming = self.endpoint.accept().await.expect("the node connects");
        let connection = incoming.await.expect("the handshake");
        let (mut send, mut recv) = connection.open_bi().await.expect("the control stream");
        let hello = ServerHello {
            version: PROTOCOL_VERSION,
            mesh_id: "0123456789abcdef".into(),
            server_key: self.key.public_key(),
        };
        write_frame(&mut send, &hello)
            .await
            .expect("the server hello");
        let hello: Hello = read_frame(&mut recv, MAX_FRAME_UNADMITTED)
            .await
            .expect("the node's hello");
        assert_eq!(hello.public_key, node.public_key());
        (connection, send, recv)
    }
}

/// A welcome for `node` on `connection`, with no peers.
fn welcome_for(
    node: &Node,
    connection: &quinn::Connection,
    peers_unchanged: bool,
) -> ServerMessage {
    ServerMessage::Welcome {
        node: entry(&node.key, "node", 5),
        mesh: MeshInfo {
            id: "0123456789abcdef".into(),
            ipv4: "100.72.0.0/16".parse().expect("a network"),
            ipv6: "fd00:1:2::/48".parse().expect("a network"),
        },
        observed: connection.remote_address(),
        peers: PeerList::default(),
        servers: Vec::new(),
        routes: Vec::new(),
        features: Vec::new(),
        port_taken: None,
        peers_unchanged,
    }
}

/// A peer-map entry for `key` with overlay address 100.72.0.`last`.
fn entry(key: &PrivateKey, name: &str, last: u8) -> NodeEntry {
    NodeEntry {
        public_key: key.public_key(),
        name: name.into(),
        ipv4: Ipv4Addr::new(100, 72, 0, last),
        ipv6: format!("fd00:1:2::{last}").parse().expect("an address"),
        candidates: vec![Candidate {
            addr: "198.51.100.4:51820".parse().expect("an address"),
            kind: CandidateKind::Local,
            mapped: None,
        }],
        nat: NatMapping::Unknown,
        routes: Vec::new(),
    }
}

/// The value of the one sample of `name` with `labels` in a scrape, read
/// by a parser that is not ours (`openmetrics-parser`).
async fn scrape(rendezvous: &Rendezvous, name: &str, labels: &[(&str, &str)]) -> f64 {
    use openmetrics_parser::PrometheusValue;

    let answer = http_get(rendezvous.metrics(), "/metrics").await;
    let (_, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    let exposition = openmetrics_parser::prometheus::parse_prometheus(body)
        .unwrap_or_else(|e| panic!("not the text format: {e:?}\n{body}"));
    exposition
        .families
        .get(name)
        .and_then(|family| {
            family.iter_samples().find(|sample| {
                let set = sample.get_labelset().expect("a sample of a family");
                labels
                    .iter()
                    .all(|(k, v)| set.get_label_value(k) == Some(*v))
            })
        })
        .map(|sample| match &sample.value {
            PrometheusValue::Counter(counter) => counter.value.as_f64(),
            PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n) => n.as_f64(),
            other => panic!("{name} is a counter or a gauge, not {other:?}"),
        })
        .unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{answer}"))
}

/// One GET from 127.0.0.1; the whole answer.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics endpoint");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: rv\r\n\r\n").as_bytes())
        .await
        .expect("send a request");
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .await
        .expect("read the answer");
    answer
}

// ---------------------------------------------------------------------------
// Links between servers (issue 15)
// ---------------------------------------------------------------------------

/// A stranger, or a member, that speaks the link protocol (as if it were
/// another server of the mesh, to inject relay frames "from" any node) is
/// refused: it holds no server key the store announced. Its link frames
/// reach no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_claims_to_be_another_server_without_its_key_is_refused() {
    within_deadline(async {
        let mesh = Mesh::init();
        let token = mesh.token(HOUR, None);
        let rendezvous = mesh.serve().await;
        let victim = Member::admit(&rendezvous, "victim", &token).await;
        let victim_id = victim.id;

        for claimed in ["rendezvous", "rv-other", ""] {
            let stranger = Node::on("stranger", Ipv4Addr::new(127, 0, 0, 9));
            let config = tls::link_client_config(rendezvous.pin).expect("a link configuration");
            let connection = stranger
                .endpoint
                .connect_with(config, rendezvous.addr, tls::SERVER_NAME)
                .expect("connect")
                .await
                .expect("the QUIC handshake: the stranger pinned the right certificate");
            let (mut send, mut recv) = connection
                .accept_bi()
                .await
                .expect("the server speaks first");
            let hello: ServerHello = read_frame(&mut recv, MAX_FRAME_UNADMITTED)
                .await
                .expect("a server hello");
            let mut exporter = [0u8; 32];
            connection
                .export_keying_material(&mut exporter, admission::EXPORTER_LABEL, &[])
                .unwrap();
            // A proof with a key of its own: valid as a proof, for a key
            // no server announced.
            let link_hello = LinkHello {
                version: PROTOCOL_VERSION,
                server: claimed.into(),
                proof: admission::proof(&stranger.key, &hello.server_key, &exporter),
            };
            write_frame(&mut send, &link_hello).await.unwrap();
            // Link frames "from" a node to the victim: none may arrive.
            let inner = frame(victim_id, b"\x04\0\0\0forged");
            for _ in 0..10 {
                let _ = connection.send_datagram(frame(victim_id, &inner));
            }
            let closed = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
            assert!(
                closed.is_ok(),
                "the server closes a link it cannot verify ({claimed:?})"
            );
        }
        let nothing = tokio::time::timeout(Duration::from_millis(500), victim.receive()).await;
        assert!(nothing.is_err(), "no forged frame reached the victim");
        rendezvous.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// A member that reads nothing (issue 19)
// ---------------------------------------------------------------------------

/// A member with a token that never reads its control stream, behind a
/// receive window smaller than its welcome: the server's write to it waits
/// for ever. Once the operator removes it, the server cuts it off (before,
/// the waiting write held the session, and the removed node stayed
/// connected for as long as it liked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_reads_nothing_is_cut_off_once_removed() {
    within_deadline(async {
        let mesh = Mesh::init();
        let token = mesh.token(HOUR, None);
        let rendezvous = mesh.serve().await;
        // Peers, so that the welcome is larger than the window.
        let mut peers = Vec::new();
        for i in 0..6 {
            let node = Node::new(&format!("peer-{i}"));
            let (session, _) = node.join(&rendezvous, Some(&token)).await.expect("joins");
            peers.push((node, session));
        }

        let silent = Node::new("silent");
        let mut config = tls::client_config(rendezvous.pin).unwrap();
        let mut transport = quinn::TransportConfig::default();
        transport
            .stream_receive_window(512u32.into())
            .receive_window(4096u32.into())
            .keep_alive_interval(Some(Duration::from_secs(1)))
            .max_idle_timeout(Some(Duration::from_secs(30).try_into().unwrap()));
        config.transport_config(Arc::new(transport));
        let mut raw = RawConnection::open_with(&silent.endpoint, &rendezvous, config).await;
        let proof = admission::proof(&silent.key, &raw.server_hello.server_key, &raw.exporter);
        raw.send_hello(&quic::hello(silent.public_key(), proof, Some(&token)))
            .await;
        let silent_key = silent.public_key().to_string();
        // Admitted (its welcome waits on its window), and never read.
        loop {
            let nodes = rendezvous.nodes().await;
            if nodes.iter().any(|n| n.public_key == silent_key && n.online) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        rendezvous.remove_node(&silent_key).await;
        tokio::time::timeout(Duration::from_secs(10), raw.connection.closed())
            .await
            .expect("the server cuts the removed member off");
        // The others are still served.
        let late = Node::new("late");
        late.join(&rendezvous, Some(&token))
            .await
            .expect("a node joins after it");
        rendezvous.stop().await;
    })
    .await;
}
