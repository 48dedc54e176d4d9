//! What an admitted member can make the rendezvous do, tried as an attacker
//! would, over real QUIC on loopback: a storm of candidate messages is held
//! to its rate, costs a bounded number of store writes and peer-map
//! updates, and ends with the storming connection closed; a taken name is
//! not shared; a removed node's address is not handed out again; a
//! hostile path report is cut down to what is true of members, and a storm
//! of reports closes the member. No root needed.
//!
//! Nothing here waits on time: every step waits for a message, and
//! [`quic::DEADLINE`] only turns a hang into a failure.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod quic;

use std::net::SocketAddr;

use meshd::identity::PublicKey;
use meshd::rendezvous::admin::{AdminRequest, AdminResponse};
use meshd::rendezvous::client::{Session, Update};
use meshd::rendezvous::stream::write_frame;
use meshd::wire::control::{
    Candidate, CandidateKind, NodeMessage, PathState, ServerMessage, FEATURE_PATHS,
};
use quic::{within_deadline, Member, Mesh, Node, RawConnection, HOUR};
use serde_json::json;

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
        let (mut raw, answer) = RawConnection::admit(&attacker, &rendezvous, &token).await;
        assert!(matches!(answer, ServerMessage::Welcome { .. }), "the attacker is a member");
        let writes_before = store_writes(&rendezvous).await;

        let mut sent = 0;
        for i in 0..STORM {
            let port = 1000 + u16::try_from(i % 2).expect("0 or 1");
            let addr = SocketAddr::from(([192, 0, 2, 1], port));
            let candidates = vec![Candidate { addr, kind: CandidateKind::Local, mapped: None }];
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_name_is_not_shared_and_only_the_operator_renames() {
    within_deadline(async {
        let mesh = Mesh::init();
        let token = mesh.token(HOUR, None);
        let rendezvous = mesh.serve().await;
        let (first, first_welcome) = join_as(&rendezvous, "node-a", &token).await;
        let (second, second_welcome) = join_as(&rendezvous, "node-a", &token).await;
        assert_eq!(first_welcome.node.name, "node-a");
        assert_eq!(second_welcome.node.name, "node-a-2", "the welcome says which name the node got");
        let (_odd, odd_welcome) = join_as(&rendezvous, "Node_A.example.com", &token).await;
        assert_eq!(odd_welcome.node.name, "node-a-3", "names are DNS labels");

        // The first node comes back calling itself like the second: it keeps its own name.
        let again = quic::Node::with_key("node-a-2", first.key.clone());
        let (_again_session, again_welcome) = again.join(&rendezvous, None).await.expect("a member reconnects");
        assert_eq!(again_welcome.node.name, "node-a");

        let rename = |node: &str, name: &str| AdminRequest::RenameNode { node: node.into(), name: name.into() };
        let refused = rendezvous.admin(rename("node-a", "node-a-2")).await;
        let taken = matches!(&refused, AdminResponse::Error { message } if message.contains("belongs to another node"));
        assert!(taken, "{refused:?}");
        let removed = rendezvous.admin(AdminRequest::RemoveNode { node: "node-a".into(), release: false }).await;
        assert!(matches!(removed, AdminResponse::Done { .. }), "a name names one node: {removed:?}");
        let nodes = rendezvous.nodes().await;
        let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(!nodes.iter().any(|n| n.public_key == first.public_key().to_string()), "the first node is gone");
        let renamed = rendezvous.admin(rename("node-a-2", "node-a")).await;
        assert!(matches!(renamed, AdminResponse::Done { .. }), "{renamed:?}");
        let renamed_node = second.with_new_endpoint();
        let (_s, welcome) = renamed_node.join(&rendezvous, None).await.expect("the renamed node reconnects");
        assert_eq!(welcome.node.name, "node-a", "the operator's name wins");
        rendezvous.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_nodes_address_is_quarantined_until_released() {
    within_deadline(async {
        let mesh = Mesh::init();
        let token = mesh.token(HOUR, None);
        let rendezvous = mesh.serve().await;
        let (victim, victim_welcome) = join_as(&rendezvous, "victim", &token).await;
        rendezvous.remove_node("victim").await;
        drop(victim);

        let held = addresses(&rendezvous).await;
        assert_eq!(held.len(), 1, "{held:?}");
        assert_eq!(held[0].status, "quarantined");
        assert_eq!(held[0].ipv4, victim_welcome.node.ipv4.to_string());

        // Released, the address is free again: the admin request names it.
        let address = Some(std::net::IpAddr::V4(victim_welcome.node.ipv4));
        let released = rendezvous
            .admin(AdminRequest::ReleaseAddresses { address })
            .await;
        assert!(
            matches!(released, AdminResponse::Done { .. }),
            "{released:?}"
        );
        assert!(addresses(&rendezvous).await.is_empty());
        let again = rendezvous
            .admin(AdminRequest::ReleaseAddresses { address })
            .await;
        assert!(matches!(again, AdminResponse::Error { .. }), "{again:?}");
        rendezvous.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_path_report_is_cut_to_members_and_a_report_storm_closes_the_member() {
    within_deadline(async {
        let mesh = Mesh::with_metrics();
        let token = mesh.token(HOUR, None);
        let rendezvous = mesh.serve().await;
        let peer = Member::admit(&rendezvous, "peer", &token).await;
        let attacker = Node::new("attacker");
        let (mut raw, answer) = RawConnection::admit(&attacker, &rendezvous, &token).await;
        let ServerMessage::Welcome { features, .. } = answer else {
            panic!("the attacker is a member: {answer:?}")
        };
        assert_eq!(
            features,
            [FEATURE_PATHS],
            "the server says it takes path reports"
        );

        // Written by hand: one true entry, then a second word on the same
        // peer, a key that is no member, the attacker itself, entries this
        // version cannot read, and far more entries than any node sends.
        let (me, them) = (
            attacker.public_key().to_string(),
            peer.node.public_key().to_string(),
        );
        let stranger = Node::new("stranger").public_key().to_string();
        let mut entries = vec![
            json!({"peer": them, "path": "direct_v4", "rtt_us": 700}),
            json!({"peer": them, "path": "relay"}),
            json!({"peer": stranger, "path": "relay"}),
            json!({"peer": me, "path": "direct_v6"}),
            json!("garbage"),
            json!({"peer": them, "path": "teleport"}),
        ];
        entries.extend((0..600).map(|_| json!({"peer": stranger, "path": "down"})));
        let report = json!({"type": "paths", "peers": entries});
        write_frame(&mut raw.send, &report)
            .await
            .expect("the report goes out");

        let matrix = loop {
            match rendezvous.admin(AdminRequest::ListPaths).await {
                AdminResponse::Paths { matrix } if !matrix.paths.is_empty() => break matrix,
                AdminResponse::Paths { .. } => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                other => panic!("paths: {other:?}"),
            }
        };
        let cells: Vec<(&str, &str, PathState, Option<f64>)> = matrix
            .paths
            .iter()
            .map(|c| (c.from.as_str(), c.to.as_str(), c.path, c.rtt_ms))
            .collect();
        // (The hand-made hello names its node "hand-written".)
        assert_eq!(
            cells,
            [("hand-written", "peer", PathState::DirectV4, Some(0.7))],
            "only what is true of a member stays"
        );
        let scrape = scrape(&rendezvous).await;
        let dropped = |reason: &str| {
            metric(
                &scrape,
                &format!("mesh_rendezvous_path_entries_dropped_total{{reason=\"{reason}\"}}"),
            )
        };
        // 606 entries, 2 unreadable; of the other 604 the first 512 are
        // looked at: one kept, one duplicate, the rest strangers or itself.
        assert_eq!(
            ["unreadable", "too_many", "unknown_peer", "duplicate"].map(dropped),
            [2, 604 - 512, 512 - 2, 1],
            "{scrape}"
        );

        // A storm of reports: over the rate, dropped, and closed as flooding.
        let small = json!({"type": "paths", "peers": [{"peer": them, "path": "relay"}]});
        let mut sent = 0;
        while write_frame(&mut raw.send, &small).await.is_ok() && sent < 10_000 {
            sent += 1;
        }
        match raw.connection.closed().await {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(
                    close.error_code,
                    quinn::VarInt::from_u32(3),
                    "closed as flooding: {close:?}"
                );
            }
            other => panic!("the rendezvous closes a member storming reports, got {other}"),
        }
        let over = metric(
            &scrape_of(&rendezvous).await,
            "mesh_rendezvous_messages_over_rate_total{kind=\"paths\"}",
        );
        eprintln!("sent {sent} reports; {over} over the rate");
        assert!(
            over > 0 && over <= 51,
            "{over} reports over the rate before the close"
        );
        // Its report went with its connection: nothing stale stays.
        match rendezvous.admin(AdminRequest::ListPaths).await {
            AdminResponse::Paths { matrix } => {
                assert!(matrix.paths.is_empty(), "{:?}", matrix.paths)
            }
            other => panic!("paths: {other:?}"),
        }
        rendezvous.stop().await;
    })
    .await;
}

async fn scrape(rendezvous: &quic::Rendezvous) -> String {
    scrape_of(rendezvous).await
}

/// The value of the sample `name{labels}` in a scrape, 0 when absent.
fn metric(scrape: &str, sample: &str) -> u64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A whole scrape of the rendezvous's metrics.
async fn scrape_of(rendezvous: &quic::Rendezvous) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(rendezvous.metrics())
        .await
        .expect("connect to the metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: rv\r\n\r\n")
        .await
        .expect("send a scrape");
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .await
        .expect("read the scrape");
    answer
}

async fn join_as(rendezvous: &quic::Rendezvous, name: &str, token: &str) -> (Node, quic::Welcomed) {
    let node = Node::new(name);
    let (session, welcome) = node
        .join(rendezvous, Some(token))
        .await
        .unwrap_or_else(|e| panic!("{name} joins: {e}"));
    // Online or not, a registered node keeps its name and addresses.
    drop(session);
    (node, welcome)
}

async fn addresses(rendezvous: &quic::Rendezvous) -> Vec<meshd::rendezvous::admin::AddressInfo> {
    match rendezvous.admin(AdminRequest::ListAddresses).await {
        AdminResponse::Addresses { addresses } => addresses
            .into_iter()
            .filter(|a| a.status != "in_use")
            .collect(),
        other => panic!("addresses list: {other:?}"),
    }
}

/// Counts the observer's updates for `attacker` until `sentinel` arrives.
async fn upserts_of(session: &mut Session, attacker: PublicKey, sentinel: PublicKey) -> usize {
    let mut count = 0;
    loop {
        match session
            .next()
            .await
            .expect("the observer's session stays up")
        {
            Some(Update::Upsert(peer)) if peer.public_key == sentinel => return count,
            Some(Update::Upsert(peer)) if peer.public_key == attacker => count += 1,
            Some(_) => {}
            None => panic!("the observer's session ended"),
        }
    }
}

/// `mesh_rendezvous_store_writes_total` from a scrape.
async fn store_writes(rendezvous: &quic::Rendezvous) -> u64 {
    metric(
        &scrape_of(rendezvous).await,
        "mesh_rendezvous_store_writes_total",
    )
}
