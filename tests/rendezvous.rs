//! The rendezvous control plane over real QUIC on loopback: admission by
//! join token and proof of key possession, stable addresses, peer-map
//! deltas, removal, restart, and what an unadmitted stranger can and cannot
//! do. No root needed: every server and node lives on 127.0.0.1.
//!
//! Each test builds a mesh in a temporary state directory, serves it on an
//! ephemeral port and plays nodes with their own QUIC endpoints. Nodes use
//! the library's client ([`client::admit`]); the attacks speak the protocol
//! by hand. Nothing here waits on time: every step waits for a message, and
//! [`quic::DEADLINE`] only turns a hang into a failure.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod quic;

use std::net::IpAddr;

use meshd::identity::PublicKey;
use meshd::rendezvous::admission;
use meshd::rendezvous::client::{self, ClientError, Session, Update};
use meshd::rendezvous::stream::read_frame;
use meshd::rendezvous::tls::CertHash;
use meshd::wire::control::{
    CandidateKind, MeshInfo, NodeEntry, RejectReason, ServerMessage, MAX_FRAME,
};
use quic::{hello, welcomed, within_deadline, Mesh, Node, RawConnection, HOUR};

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_good_token_is_admitted_with_an_address_in_the_mesh() {
    within_deadline(async {
        let mesh = Mesh::init();
        let token = mesh.token(HOUR, Some(1));
        let rendezvous = mesh.serve().await;
        let node = Node::new("node-a");

        let (_session, welcome) = node
            .join(&rendezvous, Some(&token))
            .await
            .expect("a good token admits");

        assert_eq!(
            welcome.mesh, mesh.info,
            "the welcome carries the mesh's address plan"
        );
        assert_eq!(welcome.node.public_key, node.public_key());
        assert_eq!(welcome.node.name, "node-a");
        assert!(
            mesh.info.ipv4.contains(&welcome.node.ipv4),
            "{} outside {}",
            welcome.node.ipv4,
            mesh.info.ipv4
        );
        assert!(
            mesh.info.ipv6.contains(&welcome.node.ipv6),
            "{} outside {}",
            welcome.node.ipv6,
            mesh.info.ipv6
        );
        assert_eq!(
            welcome.observed,
            node.local_addr(),
            "the rendezvous reports the address it sees"
        );
        assert!(
            welcome.peers.is_empty(),
            "the first node has no peers: {:?}",
            welcome.peers
        );

        let nodes = rendezvous.nodes().await;
        assert_eq!(nodes.len(), 1, "{nodes:?}");
        assert_eq!(nodes[0].public_key, node.public_key().to_string());
        assert_eq!(nodes[0].ipv4, welcome.node.ipv4.to_string());
        assert_eq!(nodes[0].ipv6, welcome.node.ipv6.to_string());
        assert!(nodes[0].online, "an admitted node with a session is online");

        rendezvous.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_joins_with_one_single_use_token_admit_exactly_one() {
    within_deadline(async {
        let mesh = Mesh::init();
        let token = mesh.token(HOUR, Some(1));
        let rendezvous = mesh.serve().await;

        let mut joins = tokio::task::JoinSet::new();
        for i in 0..20u8 {
            // Each racer from an address of its own: one source may have
            // only a few admissions pending at once (rendezvous::pending).
            let node = Node::on(
                &format!("racer-{i}"),
                std::net::Ipv4Addr::new(127, 0, 1, i + 1),
            );
            let config = rendezvous.client_config(&node, Some(&token));
            joins.spawn(async move {
                let result = client::admit(&node.endpoint, &config, &node.key, Vec::new()).await;
                // The node goes back with its result, so the winner's
                // endpoint and session stay up until every racer is in.
                (node, result)
            });
        }
        let mut admitted = Vec::new();
        let mut refused = Vec::new();
        while let Some(joined) = joins.join_next().await {
            let (node, result) = joined.expect("a join task panicked");
            match result {
                Ok((session, update)) => admitted.push((node, session, welcomed(update))),
                Err(e) => refused.push(e),
            }
        }

        assert_eq!(
            admitted.len(),
            1,
            "exactly one racer gets in; refusals: {refused:?}"
        );
        assert_eq!(refused.len(), 19);
        for error in &refused {
            let (reason, _) = rejection(error);
            assert_eq!(reason, RejectReason::BadToken, "{error}");
        }
        let nodes = rendezvous.nodes().await;
        assert_eq!(nodes.len(), 1, "{nodes:?}");
        assert_eq!(nodes[0].public_key, admitted[0].0.public_key().to_string());
        let tokens = rendezvous.tokens().await;
        assert_eq!(tokens.len(), 1);
        assert_eq!(tokens[0].uses, 1, "the token was spent once: {tokens:?}");

        rendezvous.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_expired_revoked_and_used_up_tokens_are_rejected_and_learn_nothing() {
    within_deadline(async {
        let mesh = Mesh::init();
        let good = mesh.token(HOUR, Some(1));
        let (good_id, good_secret) = good.split_once('.').expect("a token reads <id>.<secret>");
        let expired = mesh.token(0, None);
        let revoked = mesh.token(HOUR, None);
        mesh.revoke(token_id(&revoked));
        let rendezvous = mesh.serve().await;

        // Spends the single use of `good`.
        let first = Node::new("first");
        let (_first_session, first_welcome) = first
            .join(&rendezvous, Some(&good))
            .await
            .expect("the good token admits its first node");

        let wrong_secret = format!("{good_id}.{}", flip_last_char(good_secret));
        let unknown_id = format!("nosuchid.{good_secret}");
        let cases = [
            ("no token at all", None),
            ("a wrong secret", Some(wrong_secret.as_str())),
            ("an unknown id", Some(unknown_id.as_str())),
            ("an expired token", Some(expired.as_str())),
            ("a revoked token", Some(revoked.as_str())),
            ("a used up token", Some(good.as_str())),
            ("garbage", Some("not a token")),
        ];
        for (what, token) in cases {
            let stranger = Node::new("stranger");
            let error = match stranger.join(&rendezvous, token).await {
                Ok(_) => panic!("{what} admitted a node"),
                Err(e) => e,
            };
            let (reason, message) = rejection(&error);
            assert_eq!(reason, RejectReason::BadToken, "{what}: {error}");
            assert_learns_nothing(message, &mesh.info, &first_welcome.node, what);
        }

        let nodes = rendezvous.nodes().await;
        assert_eq!(
            nodes.len(),
            1,
            "only the first node is registered: {nodes:?}"
        );
        rendezvous.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_hash_is_refused() {
    within_deadline(async {
        let mesh = Mesh::init();
        let token = mesh.token(HOUR, Some(1));
        let rendezvous = mesh.serve().await;
        let node = Node::new("misled");
        let mut config = rendezvous.client_config(&node, Some(&token));
        config.pin = CertHash::of(b"some other server's certificate");

        let result = client::admit(&node.endpoint, &config, &node.key, Vec::new()).await;

        match result {
            Err(ClientError::CertificateMismatch { .. }) => {}
            Err(other) => panic!("expected a certificate mismatch, got {other:?}"),
            Ok(_) => panic!("a node with the wrong pin was admitted"),
        }
        assert!(rendezvous.nodes().await.is_empty(), "nothing was admitted");
        assert_eq!(
            rendezvous.tokens().await[0].uses,
            0,
            "the token was not spent"
        );
        rendezvous.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_its_private_key_cannot_register_under_its_public_key() {
    within_deadline(async {
        let mesh = Mesh::init();
        let victim_token = mesh.token(HOUR, Some(1));
        let attacker_token = mesh.token(HOUR, Some(1));
        let rendezvous = mesh.serve().await;
        let victim = Node::new("victim");
        let (_victim_session, _) = victim
            .join(&rendezvous, Some(&victim_token))
            .await
            .expect("the victim joins");
        let attacker = Node::new("attacker");

        // The attacker knows the victim's public key, not its private key,
        // and proves what it can: possession of its own key.
        let mut raw = RawConnection::open(&attacker.endpoint, &rendezvous).await;
        let forged = admission::proof(&attacker.key, &raw.server_hello.server_key, &raw.exporter);
        raw.send_hello(&hello(victim.public_key(), forged, Some(&attacker_token)))
            .await;

        match raw.answer().await {
            ServerMessage::Rejected {
                reason: RejectReason::BadProof,
                ..
            } => {}
            other => panic!("a forged proof got {other:?}"),
        }
        let nodes = rendezvous.nodes().await;
        assert_eq!(nodes.len(), 1, "{nodes:?}");
        assert_eq!(nodes[0].name, "victim", "the victim's record is untouched");
        assert!(nodes[0].online, "the victim's session was not superseded");
        assert_eq!(
            rendezvous
                .tokens()
                .await
                .iter()
                .map(|t| t.uses)
                .sum::<u32>(),
            1,
            "only the victim's token was spent"
        );
        rendezvous.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_from_another_connection_is_rejected() {
    within_deadline(async {
        let mesh = Mesh::init();
        let token = mesh.token(HOUR, None);
        let rendezvous = mesh.serve().await;
        let node = Node::new("node-a");

        let mut first = RawConnection::open(&node.endpoint, &rendezvous).await;
        let proof = admission::proof(&node.key, &first.server_hello.server_key, &first.exporter);
        first
            .send_hello(&hello(node.public_key(), proof, Some(&token)))
            .await;
        match first.answer().await {
            ServerMessage::Welcome { .. } => {}
            other => {
                panic!("the proof made for the first connection should admit it, got {other:?}")
            }
        }

        // Someone who captured that hello replays it on a connection of their own.
        let replayer = Node::new("replayer");
        let mut second = RawConnection::open(&replayer.endpoint, &rendezvous).await;
        second
            .send_hello(&hello(node.public_key(), proof, Some(&token)))
            .await;

        match second.answer().await {
            ServerMessage::Rejected {
                reason: RejectReason::BadProof,
                ..
            } => {}
            other => panic!("a replayed proof got {other:?}"),
        }
        let nodes = rendezvous.nodes().await;
        assert_eq!(nodes.len(), 1, "{nodes:?}");
        assert!(
            nodes[0].online,
            "the first connection was not superseded by the replay"
        );
        rendezvous.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_node_reconnects_without_a_token_and_keeps_its_address() {
    within_deadline(async {
        let mesh = Mesh::init();
        let token = mesh.token(HOUR, Some(1));
        let rendezvous = mesh.serve().await;
        let node = Node::new("node-a");
        let (session, first) = node
            .join(&rendezvous, Some(&token))
            .await
            .expect("the token admits");
        drop(session);

        // The same key from a new socket, as after a reboot.
        let rebooted = node.with_new_endpoint();
        let (_session, again) = rebooted
            .join(&rendezvous, None)
            .await
            .expect("a registered node needs no token");

        assert_eq!(again.node.ipv4, first.node.ipv4);
        assert_eq!(again.node.ipv6, first.node.ipv6);
        assert_eq!(
            again.observed,
            rebooted.local_addr(),
            "the rendezvous sees the new socket"
        );
        assert_eq!(rendezvous.nodes().await.len(), 1, "still one node");
        assert_eq!(
            rendezvous.tokens().await[0].uses,
            1,
            "reconnecting spends no token"
        );
        rendezvous.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_hear_of_joins_and_removals() {
    within_deadline(async {
        let mesh = Mesh::init();
        let token = mesh.token(HOUR, None);
        let rendezvous = mesh.serve().await;
        let (a, b) = (Node::new("node-a"), Node::new("node-b"));

        let (mut a_session, a_welcome) = a.join(&rendezvous, Some(&token)).await.expect("A joins");
        let (mut b_session, b_welcome) = b.join(&rendezvous, Some(&token)).await.expect("B joins");

        assert_eq!(
            next_update(&mut a_session).await,
            Update::Upsert(b_welcome.node.clone()),
            "A hears of B"
        );
        let b_peers: Vec<(PublicKey, _, _)> = b_welcome
            .peers
            .iter()
            .map(|p| (p.public_key, p.ipv4, p.ipv6))
            .collect();
        assert_eq!(
            b_peers,
            [(a.public_key(), a_welcome.node.ipv4, a_welcome.node.ipv6)],
            "B's welcome lists A"
        );

        rendezvous.remove_node(&b.public_key().to_string()).await;

        assert_eq!(
            next_update(&mut a_session).await,
            Update::Remove(b.public_key()),
            "A hears B is gone"
        );
        let cut_off = b_session.next().await;
        match cut_off {
            Err(ref e @ ClientError::Rejected { .. }) => {
                assert_eq!(rejection(e).0, RejectReason::Removed, "{e}")
            }
            other => panic!("B's session should end with a removal, got {other:?}"),
        }
        let error = match b.join(&rendezvous, Some(&token)).await {
            Ok(_) => panic!("a removed node got back in with a usable token"),
            Err(e) => e,
        };
        assert_eq!(rejection(&error).0, RejectReason::Removed, "{error}");
        let nodes = rendezvous.nodes().await;
        assert_eq!(
            nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["node-a"]
        );
        rendezvous.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_connection_moves_is_announced_at_its_new_address() {
    within_deadline(async {
        let mesh = Mesh::init();
        let token = mesh.token(HOUR, None);
        let rendezvous = mesh.serve().await;
        let (a, b) = (Node::new("node-a"), Node::new("node-b"));
        let (mut a_session, _) = a.join(&rendezvous, Some(&token)).await.expect("A joins");
        let (_b_session, b_welcome) = b.join(&rendezvous, Some(&token)).await.expect("B joins");
        assert_eq!(
            next_update(&mut a_session).await,
            Update::Upsert(b_welcome.node.clone()),
            "A hears of B"
        );

        // B's router hands it a new port: its QUIC session goes on from a
        // new socket (its keepalive is the first packet from there).
        let moved = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let new_at = moved.local_addr().unwrap();
        b.endpoint.rebind(moved).unwrap();

        loop {
            match next_update(&mut a_session).await {
                Update::Upsert(entry) if entry.public_key == b.public_key() => {
                    let observed: Vec<_> = entry
                        .candidates
                        .iter()
                        .filter(|c| c.kind == CandidateKind::Observed)
                        .map(|c| c.addr)
                        .collect();
                    if observed == [new_at] {
                        break;
                    }
                }
                _ => {}
            }
        }
        rendezvous.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_rendezvous_keeps_every_address() {
    within_deadline(async {
        let mesh = Mesh::init();
        let token = mesh.token(HOUR, Some(3));
        let rendezvous = mesh.serve().await;
        let nodes = [
            Node::new("node-a"),
            Node::new("node-b"),
            Node::new("node-c"),
        ];
        let mut before = Vec::new();
        let mut sessions = Vec::new();
        for node in &nodes {
            let (session, welcome) = node
                .join(&rendezvous, Some(&token))
                .await
                .expect("the token admits three");
            before.push((welcome.node.ipv4, welcome.node.ipv6));
            sessions.push(session);
        }

        rendezvous.stop().await;
        drop(sessions);
        let rendezvous = mesh.serve().await;

        let mut after = Vec::new();
        let mut last_peers = Vec::new();
        for node in &nodes {
            let (_session, welcome) = node
                .join(&rendezvous, None)
                .await
                .expect("registered nodes are known after a restart");
            after.push((welcome.node.ipv4, welcome.node.ipv6));
            last_peers = welcome.peers;
        }
        assert_eq!(after, before, "every node keeps its addresses");
        let mut peers: Vec<_> = last_peers.iter().map(|p| (p.ipv4, p.ipv6)).collect();
        peers.sort();
        let mut expected = before[..2].to_vec();
        expected.sort();
        assert_eq!(
            peers, expected,
            "the peer map after a restart has the same addresses"
        );
        rendezvous.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unadmitted_connection_cannot_send_a_huge_frame() {
    within_deadline(async {
        const HUGE: usize = 100_000_000;
        let mesh = Mesh::init();
        let token = mesh.token(HOUR, None);
        let rendezvous = mesh.serve().await;
        let stranger = Node::new("stranger");

        let mut raw = RawConnection::open(&stranger.endpoint, &rendezvous).await;
        let announced = u32::try_from(HUGE)
            .expect("fits a frame header")
            .to_be_bytes();
        raw.send
            .write_all(&announced)
            .await
            .expect("the header goes out");
        // A server that honoured the header would read all of it; one that
        // checks the limit stops reading, and the writes fail.
        let chunk = vec![b' '; 64 << 10];
        let mut sent = 0;
        let refused = loop {
            if sent >= HUGE {
                break false;
            }
            if raw.send.write_all(&chunk).await.is_err() {
                break true;
            }
            sent += chunk.len();
        };
        assert!(
            refused,
            "the rendezvous took all {HUGE} bytes of a frame from an unadmitted connection"
        );
        let answer = read_frame::<ServerMessage>(&mut raw.recv, MAX_FRAME).await;
        assert!(
            answer.is_err(),
            "no answer but a closed connection, got {answer:?}"
        );
        raw.connection.closed().await;

        let node = Node::new("node-a");
        node.join(&rendezvous, Some(&token))
            .await
            .expect("the rendezvous still admits others");
        rendezvous.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// Harness (the rest is in tests/quic)
// ---------------------------------------------------------------------------

fn token_id(token: &str) -> &str {
    token.split_once('.').map_or(token, |(id, _)| id)
}

fn flip_last_char(secret: &str) -> String {
    let mut s = secret.to_owned();
    let last = s.pop().expect("a non-empty secret");
    // Both stay in the unpadded base64url alphabet.
    s.push(if last == 'A' { 'B' } else { 'A' });
    s
}

async fn next_update(session: &mut Session) -> Update {
    match session.next().await {
        Ok(Some(update)) => update,
        Ok(None) => panic!("the rendezvous closed the session"),
        Err(e) => panic!("the session failed: {e}"),
    }
}

/// The reason and message of a rejection; any other error fails the test.
fn rejection(error: &ClientError) -> (RejectReason, &str) {
    match error {
        ClientError::Rejected {
            reason, message, ..
        } => (*reason, message),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// A rejection message names no mesh id and no address at all.
fn assert_learns_nothing(message: &str, mesh: &MeshInfo, member: &NodeEntry, what: &str) {
    assert!(
        !message.contains(&mesh.id),
        "{what}: the rejection names the mesh id: {message}"
    );
    for secret in [
        member.ipv4.to_string(),
        member.ipv6.to_string(),
        member.public_key.to_string(),
    ] {
        assert!(
            !message.contains(&secret),
            "{what}: the rejection names a member: {message}"
        );
    }
    let addresses: Vec<&str> = message
        .split(|c: char| !(c.is_ascii_hexdigit() || c == '.' || c == ':'))
        .filter(|word| word.parse::<IpAddr>().is_ok())
        .collect();
    assert!(
        addresses.is_empty(),
        "{what}: the rejection names addresses {addresses:?}: {message}"
    );
}
