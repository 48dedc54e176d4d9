//! What an admitted member can make the rendezvous do, tried as an attacker
//! would, over real QUIC on loopback: a storm of candidate messages is held
//! to its rate, costs a bounded number of store writes and peer-map
//! updates, and ends with the storming connection closed. No root needed.
//!
//! Nothing here waits on time: every step waits for a message, and
//! [`quic::DEADLINE`] only turns a hang into a failure.

mod quic;

use std::net::SocketAddr;

use meshd::identity::PublicKey;
use meshd::rendezvous::admission;
use meshd::rendezvous::client::{Session, Update};
use meshd::rendezvous::stream::write_frame;
use meshd::wire::control::{Candidate, CandidateKind, NodeMessage, ServerMessage};
use quic::{hello, within_deadline, Member, Mesh, Node, RawConnection, HOUR};

/// The storm: 2,000 candidate lists, each different from the one before.
const STORM: usize = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_candidate_storm_is_rate_limited_and_closed() {
    within_deadline(async {
        let mesh = Mesh::with_metrics();
        let token = mesh.token(HOUR, None);
        let rendezvous = mesh.serve().await;
        let mut observer = Member::admit(&rendezvous, "observer", &token).await;

        // The attacker speaks the protocol by hand, as a member may.
        let attacker = Node::new("attacker");
        let mut raw = RawConnection::open(&attacker.endpoint, &rendezvous).await;
        let proof = admission::proof(&attacker.key, &raw.server_hello.server_key, &raw.exporter);
        raw.send_hello(&hello(attacker.public_key(), proof, Some(&token))).await;
        assert!(matches!(raw.answer().await, ServerMessage::Welcome { .. }), "the attacker is a member");
        let writes_before = store_writes(&rendezvous).await;

        let mut sent = 0;
        for i in 0..STORM {
            let port = 1000 + u16::try_from(i % 2).expect("0 or 1");
            let candidates = vec![Candidate { addr: SocketAddr::from(([192, 0, 2, 1], port)), kind: CandidateKind::Local }];
            if write_frame(&mut raw.send, &NodeMessage::Candidates { candidates }).await.is_err() {
                break;
            }
            sent += 1;
        }
        let closed = raw.connection.closed().await;

        // A node that joins now is the observer's marker: every update the
        // storm caused was queued for it before this one.
        let sentinel = Member::admit(&rendezvous, "sentinel", &token).await;
        let upserts = upserts_of(&mut observer.session, attacker.public_key(), sentinel.node.public_key()).await;
        let writes = store_writes(&rendezvous).await - writes_before;
        eprintln!("sent {sent} messages; the observer got {upserts} updates; {writes} store writes; closed: {closed}");

        match closed {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, quinn::VarInt::from_u32(3), "closed as flooding: {close:?}");
            }
            other => panic!("the rendezvous closes a flooding member, got {other}"),
        }
        // The candidates budget is 10 with one more every 2 s, and the
        // test's deadline is 60 s: at most 40 changes get through.
        assert!(upserts <= 40, "{upserts} peer-map updates from a storm of {sent}");
        // The joining sentinel is one durable write, the changes at most
        // one debounced write each (at most one a second in fact).
        assert!(writes <= 1 + 40, "{writes} store writes from a storm of {sent}");
        rendezvous.stop().await;
    })
    .await;
}

/// Counts the observer's updates for `attacker` until `sentinel` arrives.
async fn upserts_of(session: &mut Session, attacker: PublicKey, sentinel: PublicKey) -> usize {
    let mut count = 0;
    loop {
        match session.next().await.expect("the observer's session stays up") {
            Some(Update::Upsert(peer)) if peer.public_key == sentinel => return count,
            Some(Update::Upsert(peer)) if peer.public_key == attacker => count += 1,
            Some(_) => {}
            None => panic!("the observer's session ended"),
        }
    }
}

/// `mesh_rendezvous_store_writes_total` from a scrape.
async fn store_writes(rendezvous: &quic::Rendezvous) -> u64 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(rendezvous.metrics()).await.expect("connect to the metrics");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: rv\r\n\r\n").await.expect("send a scrape");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read the scrape");
    answer
        .lines()
        .find_map(|l| l.strip_prefix("mesh_rendezvous_store_writes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
