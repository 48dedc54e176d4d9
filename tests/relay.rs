//! The relay inside mesh-rendezvous over real QUIC on loopback: who may
//! relay, what a member can make the others believe, and what one node's
//! flood costs everyone else. No root needed: the server and every node
//! live on 127.0.0.1.
//!
//! Each test builds a mesh in a temporary state directory, serves it on an
//! ephemeral port and admits members with the library's client
//! ([`client::admit`]); members then speak relay frames
//! ([`meshd::wire::relay`]) on their admitted connections by hand, and
//! strangers speak the control protocol by hand. A member's relay id is its
//! overlay IPv4 address ([`NodeId::of_overlay`]).
//!
//! Nothing here waits on time. A receiver reads until a **marker** frame
//! from a given sender; frames ride QUIC datagrams, which may be lost, so
//! the marker is resent until the receiver has read it, and each sender's
//! frames reach the receiver in the order it sent them (one connection in,
//! one relay queue, one connection out). [`quic::DEADLINE`] only turns a
//! hang into a failure.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod quic;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meshd::rendezvous::admission;
use meshd::wire::control::{RejectReason, ServerMessage};
use meshd::wire::relay::{stream_prefix, NodeId, HEADER_LEN};
use quic::{frame, hello, resend_until, within_deadline, Member, Mesh, Node, RawConnection, HOUR};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The first payload byte says what a frame is; the relay never reads
/// payloads (they would be WireGuard), the receivers of these tests do.
const DATA: u8 = 1;
const MARKER: u8 = 2;
const STRANGER: u8 = 3;
const FLOOD: u8 = 4;

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_cannot_relay_to_a_member() {
    within_deadline(async {
        let mesh = Mesh::init();
        let token = mesh.token(HOUR, None);
        let rendezvous = mesh.serve().await;
        let a = Member::admit(&rendezvous, "a", &token).await;
        let b = Member::admit(&rendezvous, "b", &token).await;

        // One stranger completes the QUIC handshake against the pinned
        // certificate and reads the server's hello, but never says hello.
        let silent = Node::new("silent");
        let silent_conn = RawConnection::open(&silent.endpoint, &rendezvous).await;
        send_stranger_frames(&silent_conn.connection, b.id).await;

        // Another claims to be member a with a proof it cannot make, and
        // relays before and after its hello. Its rejection comes after the
        // rendezvous has read everything it sent before the hello.
        let impostor = Node::new("impostor");
        let mut raw = RawConnection::open(&impostor.endpoint, &rendezvous).await;
        send_stranger_frames(&raw.connection, b.id).await;
        let forged = admission::proof(&impostor.key, &raw.server_hello.server_key, &raw.exporter);
        raw.send_hello(&hello(a.node.public_key(), forged, Some(&token)))
            .await;
        send_stranger_frames(&raw.connection, b.id).await;
        assert_rejected(raw.answer().await, RejectReason::BadProof, "a forged proof");

        // A third proves its own key but has no token.
        let tokenless = Node::new("tokenless");
        let mut raw = RawConnection::open(&tokenless.endpoint, &rendezvous).await;
        send_stranger_frames(&raw.connection, b.id).await;
        let proof = admission::proof(&tokenless.key, &raw.server_hello.server_key, &raw.exporter);
        raw.send_hello(&hello(tokenless.public_key(), proof, None))
            .await;
        send_stranger_frames(&raw.connection, b.id).await;
        assert_rejected(raw.answer().await, RejectReason::BadToken, "no token");

        // The silent stranger tries once more while a member relays.
        send_stranger_frames(&silent_conn.connection, b.id).await;
        const SENT: u32 = 100;
        for seq in 0..SENT {
            a.send(b.id, &numbered(DATA, seq));
        }
        let received = deliver_marker(&a, &b).await;

        for frame in &received {
            assert_eq!(
                (frame.source, frame.tag()),
                (a.id, Some(DATA)),
                "b got a frame that is not one of a's: {frame:?}"
            );
        }
        assert!(
            !received.is_empty(),
            "a's frames reach b, so the test saw the relay working"
        );
        rendezvous.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_send_as_another_node() {
    within_deadline(async {
        let mesh = Mesh::init();
        let token = mesh.token(HOUR, None);
        let rendezvous = mesh.serve().await;
        let a = Member::admit(&rendezvous, "a", &token).await;
        let b = Member::admit(&rendezvous, "b", &token).await;
        let m = Member::admit(&rendezvous, "mallory", &token).await;

        // The only id a node writes is the destination's: naming a, hoping
        // b takes the frame for a's, sends it to a, labelled m.
        m.send(a.id, &numbered(DATA, 1));
        // Addressed to itself: not delivered back.
        m.send(m.id, &numbered(DATA, 2));
        // Frames the relay cannot read: another version, another kind,
        // node 0, a header without payload, less than a header, nothing.
        let mut wrong_version = frame(b.id, &numbered(DATA, 3)).to_vec();
        wrong_version[0] = 0x21;
        let mut wrong_kind = frame(b.id, &numbered(DATA, 4)).to_vec();
        wrong_kind[0] = 0x12;
        let node_zero = [&[0x11, 0, 0, 0, 0][..], &numbered(DATA, 5)].concat();
        let header_only = frame(b.id, &[DATA]).slice(..HEADER_LEN);
        let short = frame(b.id, &[DATA]).slice(..3);
        for bad in [
            Bytes::from(wrong_version),
            Bytes::from(wrong_kind),
            Bytes::from(node_zero),
            header_only,
            short,
            Bytes::new(),
        ] {
            m.send_raw(bad);
        }
        // And the connection still relays.
        for seq in 10..20 {
            m.send(b.id, &numbered(DATA, seq));
        }

        let at_b = deliver_marker(&m, &b).await;
        let seqs: Vec<u32> = at_b
            .iter()
            .map(|f| {
                assert_eq!(f.source, m.id, "b sees m's frames as m's: {f:?}");
                f.seq().expect("a numbered frame")
            })
            .collect();
        assert_eq!(
            seqs,
            (10..20).collect::<Vec<_>>(),
            "b gets exactly the frames m addressed to it, none of the malformed ones"
        );

        let at_a = deliver_marker(&m, &a).await;
        assert_eq!(at_a.len(), 1, "{at_a:?}");
        assert_eq!(
            (at_a[0].source, at_a[0].seq()),
            (m.id, Some(1)),
            "the frame m addressed to a arrives labelled m"
        );

        let at_m = deliver_marker(&b, &m).await;
        assert!(
            at_m.is_empty(),
            "m's frame to itself was not delivered back: {at_m:?}"
        );
        rendezvous.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_node_does_not_starve_the_others() {
    within_deadline(async {
        let mesh = Mesh::init();
        // Low limits, so the flood is far over its rate; a's paced frames
        // (below) stay well within it.
        mesh.set_relay_limits("packets-per-second = 1000\nburst-ms = 100\n");
        let token = mesh.token(HOUR, None);
        let rendezvous = mesh.serve().await;
        let a = Member::admit(&rendezvous, "a", &token).await;
        let b = Member::admit(&rendezvous, "b", &token).await;
        let f = Member::admit(&rendezvous, "flooder", &token).await;

        let mut flood = Flood::start(&f, b.id);
        flood.started().await;
        const SENT: u32 = 300;
        // 500 frames per second, half the rate a may relay.
        let mut pace = tokio::time::interval(Duration::from_millis(2));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for seq in 0..SENT {
            pace.tick().await;
            a.send(b.id, &numbered(DATA, seq));
        }
        let flood_sent = flood.stop().await;
        let received = deliver_marker(&a, &b).await;

        let mut from_a = std::collections::BTreeSet::new();
        let mut from_f = 0u64;
        for frame in &received {
            match frame.source {
                s if s == a.id => {
                    from_a.insert(frame.seq().expect("a's frames are numbered"));
                }
                s if s == f.id => from_f += 1,
                _ => panic!("b got a frame from neither a nor the flooder: {frame:?}"),
            }
        }
        let from_a = from_a.len() as u32;
        assert!(
            from_a * 10 >= SENT * 9,
            "a's frames got through the flood: {from_a} of {SENT} (flooder sent {flood_sent}, {from_f} arrived)"
        );
        assert!(from_f > 0, "the flooder keeps its own rate");
        assert!(
            from_f * 4 < flood_sent,
            "the flood is cut to the flooder's rate: {from_f} of {flood_sent} arrived"
        );
        rendezvous.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// Relay frames
// ---------------------------------------------------------------------------

/// A payload: the tag, then a sequence number.
fn numbered(tag: u8, seq: u32) -> Vec<u8> {
    let mut payload = vec![tag];
    payload.extend_from_slice(&seq.to_be_bytes());
    payload
}

/// A relay frame as a node receives it.
#[derive(Debug)]
struct Received {
    source: NodeId,
    payload: Vec<u8>,
}

impl Received {
    fn tag(&self) -> Option<u8> {
        self.payload.first().copied()
    }

    fn seq(&self) -> Option<u32> {
        let bytes = self.payload.get(1..5)?;
        Some(u32::from_be_bytes(bytes.try_into().ok()?))
    }
}

/// Has `from` send its marker to `to` until `to` reads it; returns what
/// `to` read before it.
async fn deliver_marker(from: &Member, to: &Member) -> Vec<Received> {
    let receiving = receive_until_marker(to, from.id);
    resend_until(from, frame(to.id, &[MARKER]), receiving).await
}

/// Relay frames as they arrive at `to`, up to the first marker from `from`.
async fn receive_until_marker(to: &Member, from: NodeId) -> Vec<Received> {
    let mut received = Vec::new();
    loop {
        let (source, payload) = to.receive().await;
        if source == from && payload == [MARKER] {
            return received;
        }
        received.push(Received { source, payload });
    }
}

/// Relay frames from a connection that was never admitted: datagrams, and
/// one on a relay stream.
async fn send_stranger_frames(connection: &quinn::Connection, to: NodeId) {
    for seq in 0..10 {
        // A closed connection (a rejected stranger) takes nothing more.
        let _ = connection.send_datagram(frame(to, &numbered(STRANGER, seq)));
    }
    let on_stream = frame(to, &numbered(STRANGER, 10));
    if let Ok(mut stream) = connection.open_uni().await {
        let prefix = stream_prefix(on_stream.len()).expect("a small frame");
        let _ = stream.write_all(&prefix).await;
        let _ = stream.write_all(&on_stream).await;
        let _ = stream.finish();
    }
}

/// One member sending tiny relay frames as fast as its connection takes
/// them, on a task of its own.
struct Flood {
    stop: Arc<AtomicBool>,
    started: oneshot::Receiver<()>,
    task: JoinHandle<u64>,
}

impl Flood {
    /// Frames sent before the flood counts as under way.
    const WARM_UP: u64 = 1000;

    fn start(from: &Member, to: NodeId) -> Self {
        let connection = from.connection().clone();
        let stop = Arc::new(AtomicBool::new(false));
        let (started_tx, started) = oneshot::channel();
        let task = tokio::spawn({
            let stop = stop.clone();
            let frame = frame(to, &[FLOOD]);
            async move {
                let mut started_tx = Some(started_tx);
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Waits only while quinn's datagram send buffer is full.
                    connection
                        .send_datagram_wait(frame.clone())
                        .await
                        .expect("the flooder's connection stays up");
                    sent += 1;
                    // A real flooder is another machine; this one shares
                    // the test's runtime with the rendezvous, and leaves it
                    // its turn now and then.
                    if sent % 128 == 0 {
                        tokio::task::yield_now().await;
                    }
                    if sent == Self::WARM_UP {
                        if let Some(tx) = started_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                sent
            }
        });
        Self {
            stop,
            started,
            task,
        }
    }

    async fn started(&mut self) {
        (&mut self.started).await.expect("the flood starts");
    }

    /// Stops the flood; returns how many frames it sent.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the flood task")
    }
}

// ---------------------------------------------------------------------------
// Harness (the rest is in tests/quic)
// ---------------------------------------------------------------------------

fn assert_rejected(answer: ServerMessage, expected: RejectReason, what: &str) {
    match answer {
        ServerMessage::Rejected { reason, .. } if reason == expected => {}
        other => panic!("{what}: expected a {expected:?} rejection, got {other:?}"),
    }
}
