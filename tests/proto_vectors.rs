//! Golden vectors of the control protocol (proto/control.md, proto/vectors/).
//!
//! Every frame in `proto/vectors/` is decoded with the real decoder and
//! compared with the value written out below, then re-encoded and compared
//! byte for byte: a change to the wire fails here instead of silently
//! breaking nodes that are already deployed. The files are committed, never
//! generated at test time; an intended wire change means new files, a note in
//! proto/control.md and, if old peers cannot read it, a new
//! `PROTOCOL_VERSION`.
//!
//! The rest checks what proto/control.md promises about hostile input: a
//! header that announces more than the limit is refused before anything is
//! allocated, and truncated or garbage frames are `FrameError::Malformed`,
//! never a panic.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Debug;
use std::path::PathBuf;

use base64::Engine as _;
use blake2::digest::Mac;
use meshd::identity::{PrivateKey, PublicKey};
use meshd::rendezvous::admission;
use meshd::wire::control::{
    decode, decode_frame, decode_hello, encode, Candidate, CandidateKind, EncodedEntry, FrameError,
    Hello, MeshInfo, NatMapping, NodeEntry, NodeMessage, PathEntry, PathState, PeerList, PortTaken,
    Proof, RejectReason, RouteDecision, RouteStatus, ServerHello, ServerMessage, FEATURE_PATHS,
    MAX_FRAME, MAX_FRAME_UNADMITTED, MAX_PATH_PEERS, PROTOCOL_VERSION,
};
use meshd::wire::digest::MapDigest;
use serde::de::DeserializeOwned;
use serde::Serialize;

// ---------------------------------------------------------------------------
// The values the vectors encode.

/// RFC 7748 §6.1 Alice: the node in every vector.
const NODE_PRIVATE: &str = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=";
const NODE_PUBLIC: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
/// RFC 7748 §6.1 Bob: the rendezvous.
const SERVER_PUBLIC: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";
/// Public keys of the private keys 0x11… and 0x22… (32 equal bytes each).
const PEER_A: &str = "e06Qm75//kTEZaIgA31gjuNYl9Me+XLwf3SJLLD3PxM=";
const PEER_B: &str = "D6poTtKIZ7l/Smot7l34zpdOdrcBjj8iocTPJnhXDyA=";

/// 8 random bytes in hex, as `mesh-rendezvous init` draws it.
const MESH_ID: &str = "9f83c2d1e07a4b65";
/// `<id>.<base64url, no padding, of the bytes 0x10..=0x2f>`.
const TOKEN: &str = "k7q2xw.EBESExQVFhcYGRobHB0eHyAhIiMkJSYnKCkqKywtLi8";

/// What the rendezvous accepts from an admitted node (proto/control.md §2).
const RENDEZVOUS_NODE_FRAME: usize = 64 << 10;

/// What `admission_proof.json` yields, and so what `hello.hex` carries.
const PROOF_HEX: &str = "ec0043922b4b2d25c4da468e602e8df8fd2b6fd0983cd39a9173396e1c60b61c";

fn key(s: &str) -> PublicKey {
    s.parse().unwrap()
}

fn cand(addr: &str, kind: CandidateKind) -> Candidate {
    Candidate {
        addr: addr.parse().unwrap(),
        kind,
        mapped: None,
    }
}

fn server_hello() -> ServerHello {
    ServerHello {
        version: 1,
        mesh_id: MESH_ID.into(),
        server_key: key(SERVER_PUBLIC),
    }
}

fn hello() -> Hello {
    Hello {
        version: 1,
        public_key: key(NODE_PUBLIC),
        name: "node-c".into(),
        listen_port: 51820,
        token: Some(TOKEN.into()),
        candidates: vec![
            cand("10.0.0.5:51820", CandidateKind::Local),
            cand("[2001:db8:1::5]:51820", CandidateKind::Local),
            cand("203.0.113.7:51820", CandidateKind::Advertised),
        ],
        proof: Proof(hex(PROOF_HEX).try_into().unwrap()),
        routes: Vec::new(),
        peers_digest: None,
    }
}

/// A reconnect: the node is registered, so no token.
fn hello_registered() -> Hello {
    Hello {
        token: None,
        candidates: vec![cand("10.0.0.5:51820", CandidateKind::Local)],
        ..hello()
    }
}

fn node_c() -> NodeEntry {
    NodeEntry {
        public_key: key(NODE_PUBLIC),
        name: "node-c".into(),
        ipv4: "100.72.13.7".parse().unwrap(),
        ipv6: "fd4b:1d7e:3a9c:9f2e:61aa:7c30:d5b1:e048".parse().unwrap(),
        candidates: vec![
            cand("10.0.0.5:51820", CandidateKind::Local),
            cand("198.51.100.23:40112", CandidateKind::Observed),
            cand("203.0.113.7:51820", CandidateKind::Advertised),
        ],
        nat: NatMapping::Unknown,
        routes: Vec::new(),
    }
}

fn node_a() -> NodeEntry {
    NodeEntry {
        public_key: key(PEER_A),
        name: "node-a".into(),
        ipv4: "100.72.201.3".parse().unwrap(),
        ipv6: "fd4b:1d7e:3a9c:41c0:8e12:b7f4:20d9:6a35".parse().unwrap(),
        candidates: vec![
            cand("192.0.2.10:51820", CandidateKind::Advertised),
            cand("192.0.2.10:51820", CandidateKind::Observed),
        ],
        nat: NatMapping::Unknown,
        routes: Vec::new(),
    }
}

fn node_b() -> NodeEntry {
    NodeEntry {
        public_key: key(PEER_B),
        name: "node-b.example.internal".into(),
        ipv4: "100.72.88.41".parse().unwrap(),
        ipv6: "fd4b:1d7e:3a9c:e703:5c6d:19ab:f082:4471".parse().unwrap(),
        candidates: vec![
            cand("192.168.1.20:51820", CandidateKind::Local),
            cand("[2001:db8:2::b]:51820", CandidateKind::Observed),
        ],
        nat: NatMapping::Unknown,
        routes: Vec::new(),
    }
}

fn welcome() -> ServerMessage {
    ServerMessage::Welcome {
        node: node_c(),
        mesh: MeshInfo {
            id: MESH_ID.into(),
            ipv4: "100.72.0.0/16".parse().unwrap(),
            ipv6: "fd4b:1d7e:3a9c::/48".parse().unwrap(),
        },
        observed: "198.51.100.23:40112".parse().unwrap(),
        peers: vec![node_a(), node_b()].into(),
        // As a server before 0.4.0 sends it: the vector predates the list.
        servers: Vec::new(),
        routes: Vec::new(),
        features: Vec::new(),
        port_taken: None,
        peers_unchanged: false,
    }
}

fn rejected() -> ServerMessage {
    ServerMessage::Rejected {
        reason: RejectReason::BadToken,
        message: "join token not accepted (unknown, wrong, revoked or used up); ask the operator \
                  for a new one"
            .into(),
    }
}

fn rejected_version() -> ServerMessage {
    ServerMessage::Rejected {
        reason: RejectReason::Version,
        message: "this rendezvous speaks protocol version 1, the node 2; upgrade the older side"
            .into(),
    }
}

fn peer_upsert() -> ServerMessage {
    let mut peer = node_b();
    peer.candidates
        .push(cand("198.51.100.77:61002", CandidateKind::Observed));
    ServerMessage::PeerUpsert { peer }
}

fn peer_upsert_nat() -> ServerMessage {
    let ServerMessage::PeerUpsert { mut peer } = peer_upsert() else {
        unreachable!("peer_upsert is an upsert")
    };
    peer.nat = NatMapping::EndpointDependent;
    ServerMessage::PeerUpsert { peer }
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

/// A reconnect advertising the node's pod CIDRs.
fn hello_routes() -> Hello {
    Hello {
        routes: vec![net("10.244.3.0/24"), net("fd10:244:0:3::/64")],
        ..hello_registered()
    }
}

/// A peer with an accepted pod CIDR.
fn peer_upsert_routes() -> ServerMessage {
    let ServerMessage::PeerUpsert { mut peer } = peer_upsert() else {
        unreachable!("peer_upsert is an upsert")
    };
    peer.routes = vec![net("10.244.1.0/24")];
    ServerMessage::PeerUpsert { peer }
}

/// What became of a node's prefixes, one of each kind that carries data.
fn routes() -> ServerMessage {
    ServerMessage::Routes {
        routes: vec![
            RouteDecision {
                prefix: net("10.244.3.0/24"),
                status: RouteStatus::Accepted,
            },
            RouteDecision {
                prefix: net("192.168.40.0/24"),
                status: RouteStatus::AwaitingApproval,
            },
            RouteDecision {
                prefix: net("10.244.0.0/20"),
                status: RouteStatus::Overlaps {
                    node: "node-a".into(),
                    held: net("10.244.1.0/24"),
                },
            },
        ],
    }
}

fn peer_remove() -> ServerMessage {
    ServerMessage::PeerRemove {
        public_key: key(PEER_A),
    }
}

fn candidates() -> NodeMessage {
    NodeMessage::Candidates {
        candidates: vec![
            cand("10.0.0.6:51820", CandidateKind::Local),
            cand("203.0.113.7:51820", CandidateKind::Advertised),
        ],
    }
}

fn nat() -> NodeMessage {
    NodeMessage::Nat {
        mapping: NatMapping::EndpointDependent,
    }
}

fn paths() -> NodeMessage {
    NodeMessage::Paths {
        peers: vec![
            PathEntry {
                peer: key(PEER_B),
                path: PathState::DirectV6,
                rtt_us: Some(840),
            },
            PathEntry {
                peer: key(PEER_A),
                path: PathState::Relay,
                rtt_us: None,
            },
            PathEntry {
                peer: key(NODE_PUBLIC),
                path: PathState::Down,
                rtt_us: None,
            },
        ]
        .into(),
    }
}

// ---------------------------------------------------------------------------
// Reading the vector files.

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("proto/vectors")
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    assert!(s.len() % 2 == 0, "odd number of hex digits");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn frame_file(name: &str) -> Vec<u8> {
    let path = vectors_dir().join(format!("{name}.hex"));
    hex(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// The frame in `<name>.hex` decodes (under `max`) to `expected`, uses every
/// byte, re-encodes to the same bytes, and agrees with the readable
/// `<name>.json` next to it.
fn golden<T>(name: &str, max: usize, expected: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let frame = frame_file(name);
    let (msg, used) = decode_frame::<T>(&frame, max).unwrap_or_else(|e| panic!("{name}.hex: {e}"));
    assert_eq!(&msg, expected, "{name}.hex decodes to something else");
    assert_eq!(used, frame.len(), "{name}.hex has bytes after its frame");
    assert_eq!(
        encode(&msg),
        frame,
        "{name}.hex: re-encoding gives other bytes"
    );

    let readable = std::fs::read_to_string(vectors_dir().join(format!("{name}.json"))).unwrap();
    let readable: serde_json::Value = serde_json::from_str(&readable).unwrap();
    let body: serde_json::Value = serde_json::from_slice(&frame[4..]).unwrap();
    assert_eq!(readable, body, "{name}.json does not match {name}.hex");
}

// ---------------------------------------------------------------------------
// Golden frames.

#[test]
fn server_hello_vector_decodes_and_reencodes_byte_for_byte() {
    golden("server_hello", MAX_FRAME_UNADMITTED, &server_hello());
}

#[test]
fn hello_vector_decodes_and_reencodes_byte_for_byte() {
    golden("hello", MAX_FRAME_UNADMITTED, &hello());
    golden(
        "hello_registered",
        MAX_FRAME_UNADMITTED,
        &hello_registered(),
    );
    // Prefixes behind the node (0.4.0); absent when there are none.
    golden("hello_routes", MAX_FRAME_UNADMITTED, &hello_routes());
}

#[test]
fn welcome_vector_decodes_and_reencodes_byte_for_byte() {
    golden("welcome", MAX_FRAME, &welcome());
}

#[test]
fn rejected_vectors_decode_and_reencode_byte_for_byte() {
    // The node reads the answer to its hello under the admitted limit.
    golden("rejected", MAX_FRAME, &rejected());
    golden("rejected_version", MAX_FRAME, &rejected_version());
}

#[test]
fn peer_delta_vectors_decode_and_reencode_byte_for_byte() {
    golden("peer_upsert", MAX_FRAME, &peer_upsert());
    golden("peer_remove", MAX_FRAME, &peer_remove());
    // A node's NAT behaviour rides its entry, and is absent while unknown.
    golden("peer_upsert_nat", MAX_FRAME, &peer_upsert_nat());
    // Accepted prefixes ride the entry too, absent when there are none.
    golden("peer_upsert_routes", MAX_FRAME, &peer_upsert_routes());
}

#[test]
fn routes_vector_decodes_and_reencodes_byte_for_byte() {
    // `prefix` is the decision's own prefix; an overlap names the other
    // node's as `held`, never as a second `prefix` key.
    golden("routes", MAX_FRAME, &routes());
}

#[test]
fn candidates_vector_decodes_and_reencodes_byte_for_byte() {
    golden("candidates", RENDEZVOUS_NODE_FRAME, &candidates());
    golden("nat", RENDEZVOUS_NODE_FRAME, &nat());
}

#[test]
fn paths_vector_decodes_and_reencodes_byte_for_byte() {
    golden("paths", RENDEZVOUS_NODE_FRAME, &paths());
}

#[test]
fn a_full_path_report_fits_the_rendezvous_frame_limit() {
    // The longest words, the largest RTT: the node never sends more.
    let peers: Vec<PathEntry> = (0..MAX_PATH_PEERS)
        .map(|_| PathEntry {
            peer: key(PEER_A),
            path: PathState::DirectV6,
            rtt_us: Some(u32::MAX),
        })
        .collect();
    let frame = encode(&NodeMessage::Paths {
        peers: peers.into(),
    });
    assert!(frame.len() < RENDEZVOUS_NODE_FRAME, "{} bytes", frame.len());
}

#[test]
fn a_path_entry_this_version_cannot_read_is_skipped_and_counted() {
    let mut v = body_of("paths");
    let peers = v["peers"].as_array_mut().unwrap();
    peers.push(serde_json::json!({"peer": PEER_A, "path": "direct_v5"}));
    peers.push(serde_json::json!({"peer": "not a key", "path": "relay"}));
    peers.push(serde_json::json!({"peer": PEER_A, "path": "relay", "rtt_us": -1}));
    peers.push(serde_json::json!(17));
    peers.push(serde_json::json!({"peer": PEER_A, "path": "relay", "future": [1]}));
    let NodeMessage::Paths { peers } = decode::<NodeMessage>(&serde_json::to_vec(&v).unwrap())
        .expect("one unreadable entry does not make the message unreadable")
    else {
        panic!("not paths")
    };
    let NodeMessage::Paths { peers: golden } = paths() else {
        unreachable!()
    };
    let mut expected = golden.entries.clone();
    // Unknown fields are ignored, as everywhere.
    expected.push(PathEntry {
        peer: key(PEER_A),
        path: PathState::Relay,
        rtt_us: None,
    });
    assert_eq!((&peers.entries, peers.unreadable), (&expected, 4));
    // What was skipped is not written back: the message re-encodes to what
    // it could read, which reads back equal to it.
    let read = NodeMessage::Paths { peers };
    let (again, _) = decode_frame::<NodeMessage>(&encode(&read), MAX_FRAME).unwrap();
    assert_eq!(again, read);
    let NodeMessage::Paths { peers: again } = again else {
        unreachable!()
    };
    assert_eq!((again.entries, again.unreadable), (expected, 0));
    // Not an array at all is a malformed message.
    let mut v = body_of("paths");
    v["peers"] = serde_json::json!({"peer": PEER_A});
    assert!(decode::<NodeMessage>(&serde_json::to_vec(&v).unwrap()).is_err());
}

#[test]
fn a_welcome_names_its_features_and_a_taken_port_and_a_node_before_them_ignores_the_fields() {
    let ServerMessage::Welcome {
        node,
        mesh,
        observed,
        peers,
        servers,
        routes,
        ..
    } = welcome()
    else {
        unreachable!()
    };
    let newer = ServerMessage::Welcome {
        node,
        mesh,
        observed,
        peers,
        servers,
        routes,
        features: vec![FEATURE_PATHS.to_owned(), "from_the_future".to_owned()],
        port_taken: Some(Box::new(PortTaken {
            by: "lan1".into(),
            port: 51821,
        })),
        peers_unchanged: true,
    };
    let body = serde_json::to_value(&newer).unwrap();
    assert_eq!(body["peers_unchanged"], serde_json::json!(true));
    assert_eq!(
        body["features"],
        serde_json::json!(["paths", "from_the_future"])
    );
    assert_eq!(
        decode::<ServerMessage>(&serde_json::to_vec(&body).unwrap()).unwrap(),
        newer
    );
    assert_eq!(
        body["port_taken"],
        serde_json::json!({"by": "lan1", "port": 51821})
    );
    // The vector, from a server without features, has no such field.
    assert!(body_of("welcome").get("features").is_none());
    assert!(body_of("welcome").get("port_taken").is_none());
    assert!(body_of("welcome").get("peers_unchanged").is_none());
}

#[test]
fn a_hello_offers_the_digest_of_the_map_it_holds_as_64_hex_digits() {
    let digest: MapDigest = serde_json::from_value(serde_json::json!("01".repeat(32))).unwrap();
    let offering = Hello {
        peers_digest: Some(digest),
        ..hello()
    };
    let body = serde_json::to_value(&offering).unwrap();
    assert_eq!(body["peers_digest"], serde_json::json!("01".repeat(32)));
    assert_eq!(
        decode_hello(&serde_json::to_vec(&body).unwrap()).unwrap(),
        offering
    );
    // The vector, from a node on its first session, has none.
    assert!(body_of("hello").get("peers_digest").is_none());
    let mut short = body.clone();
    short["peers_digest"] = serde_json::json!("0101");
    assert!(decode_hello(&serde_json::to_vec(&short).unwrap()).is_err());
}

#[test]
fn vectors_speak_the_current_protocol_version() {
    // A version bump must come with new vectors (and the old ones kept
    // under a versioned name if old peers are still supported).
    assert_eq!(PROTOCOL_VERSION, 1);
    assert_eq!(server_hello().version, PROTOCOL_VERSION);
    assert_eq!(hello().version, PROTOCOL_VERSION);
}

#[test]
fn every_frame_file_has_a_golden_test() {
    let mut names: Vec<String> = std::fs::read_dir(vectors_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_suffix(".hex").map(str::to_owned))
        .collect();
    names.sort();
    let mut tested = ALL.to_vec();
    tested.sort();
    assert_eq!(names, tested);
}

#[test]
fn vector_keys_and_token_are_the_documented_ones() {
    let node: PrivateKey = NODE_PRIVATE.parse().unwrap();
    assert_eq!(node.public_key(), key(NODE_PUBLIC));
    assert_eq!(PrivateKey::from_bytes([0x11; 32]).public_key(), key(PEER_A));
    assert_eq!(PrivateKey::from_bytes([0x22; 32]).public_key(), key(PEER_B));
    let (id, secret) = TOKEN.split_once('.').unwrap();
    assert_eq!(id, "k7q2xw");
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(secret)
        .unwrap();
    assert_eq!(secret, (0x10..=0x2f).collect::<Vec<u8>>());
}

#[test]
fn json_spelling_matches_the_specification() {
    // proto/control.md spells these out; an implementer in another language
    // copies them from there.
    for (reason, text) in [
        (RejectReason::Version, "version"),
        (RejectReason::BadProof, "bad_proof"),
        (RejectReason::BadToken, "bad_token"),
        (RejectReason::Removed, "removed"),
        (RejectReason::BadHello, "bad_hello"),
    ] {
        assert_eq!(serde_json::to_value(reason).unwrap(), text);
    }
    for (kind, text) in [
        (CandidateKind::Advertised, "advertised"),
        (CandidateKind::Observed, "observed"),
        (CandidateKind::Local, "local"),
    ] {
        assert_eq!(serde_json::to_value(kind).unwrap(), text);
    }
    let body = serde_json::to_value(peer_remove()).unwrap();
    assert_eq!(body["type"], "peer_remove");
    assert_eq!(body["public_key"], PEER_A);
}

// ---------------------------------------------------------------------------
// Admission proof.

fn proof_vector() -> serde_json::Value {
    let text = std::fs::read_to_string(vectors_dir().join("admission_proof.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn field_hex(v: &serde_json::Value, name: &str) -> Vec<u8> {
    hex(v[name]
        .as_str()
        .unwrap_or_else(|| panic!("admission_proof.json lacks {name}")))
}

fn bytes32(b: &[u8]) -> [u8; 32] {
    b.try_into().expect("32 bytes")
}

/// proto/control.md "Admission proof", written out independently of
/// `meshd::rendezvous::admission`: BLAKE2s-256 in keyed mode (RFC 7693), key
/// = X25519(node private, server public), message = label ‖ exporter ‖ node
/// public key.
fn spec_proof(node_private: [u8; 32], server_public: [u8; 32], exporter: &[u8; 32]) -> [u8; 32] {
    let secret = x25519_dalek::StaticSecret::from(node_private);
    let node_public = x25519_dalek::PublicKey::from(&secret);
    let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(server_public));
    assert!(shared.was_contributory());
    let mut mac = blake2::Blake2sMac256::new_from_slice(shared.as_bytes()).unwrap();
    mac.update(b"meshd admission v1");
    mac.update(exporter);
    mac.update(node_public.as_bytes());
    mac.finalize().into_bytes().into()
}

#[test]
fn admission_proof_vector_matches_the_specification() {
    let v = proof_vector();
    let node_private: PrivateKey = v["node_private_key"].as_str().unwrap().parse().unwrap();
    let node_public: PublicKey = v["node_public_key"].as_str().unwrap().parse().unwrap();
    let server_private: PrivateKey = v["server_private_key"].as_str().unwrap().parse().unwrap();
    let server_public: PublicKey = v["server_public_key"].as_str().unwrap().parse().unwrap();
    assert_eq!(node_private.to_base64(), NODE_PRIVATE);
    assert_eq!(node_private.public_key(), node_public);
    assert_eq!(server_private.public_key(), server_public);
    assert_eq!(node_public, key(NODE_PUBLIC));
    assert_eq!(server_public, key(SERVER_PUBLIC));
    assert_eq!(v["label"], "meshd admission v1");
    assert_eq!(v["exporter_label"], "EXPORTER-meshd-admission");
    assert_eq!(v["exporter_context_hex"], "");

    // Both ends reach the same key: the node from its private key, the
    // rendezvous from its own.
    let node_private_bytes = bytes32(&field_hex(&v, "node_private_key_hex"));
    let shared = field_hex(&v, "shared_secret_hex");
    let from_node = x25519_dalek::StaticSecret::from(node_private_bytes)
        .diffie_hellman(&x25519_dalek::PublicKey::from(*server_public.as_bytes()));
    let from_server =
        x25519_dalek::StaticSecret::from(bytes32(&field_hex(&v, "server_private_key_hex")))
            .diffie_hellman(&x25519_dalek::PublicKey::from(*node_public.as_bytes()));
    assert_eq!(from_node.as_bytes().as_slice(), shared);
    assert_eq!(from_server.as_bytes().as_slice(), shared);

    let exporter = bytes32(&field_hex(&v, "exporter_hex"));
    let mut message = b"meshd admission v1".to_vec();
    message.extend_from_slice(&exporter);
    message.extend_from_slice(node_public.as_bytes());
    assert_eq!(field_hex(&v, "mac_message_hex"), message);

    let expected = field_hex(&v, "proof_hex");
    assert_eq!(
        spec_proof(node_private_bytes, *server_public.as_bytes(), &exporter).as_slice(),
        expected
    );
    assert_eq!(
        base64::engine::general_purpose::STANDARD.encode(&expected),
        v["proof_base64"].as_str().unwrap()
    );
    // hello.hex carries this very proof.
    assert_eq!(hello().proof, Proof(bytes32(&expected)));
}

#[test]
fn admission_module_agrees_with_the_vector() {
    let v = proof_vector();
    let node_private: PrivateKey = v["node_private_key"].as_str().unwrap().parse().unwrap();
    let server_private: PrivateKey = v["server_private_key"].as_str().unwrap().parse().unwrap();
    let exporter = bytes32(&field_hex(&v, "exporter_hex"));
    let expected = Proof(bytes32(&field_hex(&v, "proof_hex")));
    assert_eq!(
        admission::EXPORTER_LABEL,
        v["exporter_label"].as_str().unwrap().as_bytes()
    );

    let made = admission::proof(&node_private, &server_private.public_key(), &exporter);
    assert_eq!(made, expected);
    assert!(admission::verify(
        &server_private,
        &node_private.public_key(),
        &exporter,
        &made
    ));

    let mut other_connection = exporter;
    other_connection[0] ^= 0x80;
    assert!(!admission::verify(
        &server_private,
        &node_private.public_key(),
        &other_connection,
        &made
    ));
}

#[test]
fn admission_proof_from_another_connection_does_not_match() {
    let v = proof_vector();
    let node_private = bytes32(&field_hex(&v, "node_private_key_hex"));
    let server_public = bytes32(&field_hex(&v, "server_public_key_hex"));
    let exporter = bytes32(&field_hex(&v, "exporter_hex"));
    let proof = spec_proof(node_private, server_public, &exporter);
    let mut other = exporter;
    other[31] ^= 1;
    assert_ne!(spec_proof(node_private, server_public, &other), proof);
    // …nor does one made with another node's key for the same connection.
    assert_ne!(spec_proof([0x11; 32], server_public, &exporter), proof);
}

// ---------------------------------------------------------------------------
// Limits: checked before allocating.

/// Tracks the largest single allocation made on the current thread, so a
/// test can show that an oversized header is refused without allocating its
/// announced length.
struct PeakAlloc;

thread_local! {
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = PEAK.try_with(|p| p.set(p.get().max(size)));
}

// SAFETY: every call is forwarded to `System` unchanged; the thread-local
// is const-initialised and has no destructor, so touching it never allocates.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `layout`, passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` came from this allocator, that is from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

#[test]
fn oversized_header_is_refused_before_allocating() {
    for (announced, max) in [
        (MAX_FRAME_UNADMITTED + 1, MAX_FRAME_UNADMITTED),
        (MAX_FRAME, MAX_FRAME_UNADMITTED),
        (MAX_FRAME + 1, MAX_FRAME),
        (u32::MAX as usize, MAX_FRAME),
    ] {
        // Only the header is there: the verdict must come from it alone.
        let header = (announced as u32).to_be_bytes();
        PEAK.with(|p| p.set(0));
        let result = decode_frame::<ServerMessage>(&header, max);
        let peak = PEAK.with(|p| p.get());
        assert_eq!(
            result.unwrap_err(),
            FrameError::TooLarge {
                len: announced,
                max
            }
        );
        assert!(
            peak < 1024,
            "refusing a {announced}-byte header allocated {peak} bytes"
        );
    }
}

#[test]
fn frame_of_exactly_the_limit_is_accepted() {
    // Pad a real body with JSON whitespace up to the limit.
    let frame = encode(&candidates());
    let mut body = frame[4..].to_vec();
    body.resize(MAX_FRAME_UNADMITTED, b' ');
    let mut exact = (body.len() as u32).to_be_bytes().to_vec();
    exact.extend_from_slice(&body);
    assert_eq!(
        decode_frame::<NodeMessage>(&exact, MAX_FRAME_UNADMITTED).unwrap(),
        (candidates(), 4 + MAX_FRAME_UNADMITTED)
    );
    body.push(b' ');
    let mut over = (body.len() as u32).to_be_bytes().to_vec();
    over.extend_from_slice(&body);
    assert_eq!(
        decode_frame::<NodeMessage>(&over, MAX_FRAME_UNADMITTED),
        Err(FrameError::TooLarge {
            len: MAX_FRAME_UNADMITTED + 1,
            max: MAX_FRAME_UNADMITTED
        })
    );
}

/// A server welcomes with each entry's JSON as encoded when it changed:
/// the same bytes as the entries encoded with the message, and the same
/// message to the node that decodes them.
#[test]
fn a_welcome_of_entries_encoded_beforehand_is_the_same_frame() {
    let mut spliced = welcome();
    let ServerMessage::Welcome { peers, .. } = &mut spliced else {
        unreachable!()
    };
    *peers = PeerList::Encoded(
        [node_a(), node_b()]
            .iter()
            .map(|e| EncodedEntry::new(e).unwrap())
            .collect(),
    );
    assert_eq!(encode(&spliced), encode(&welcome()));
    assert_eq!(spliced, welcome(), "equal whichever form the peers take");
    let decoded: ServerMessage = decode_frame(&encode(&spliced), MAX_FRAME).unwrap().0;
    assert_eq!(decoded, welcome());
    let ServerMessage::Welcome { peers, .. } = decoded else {
        unreachable!()
    };
    assert_eq!(peers.into_entries(), [node_a(), node_b()]);
    let mut other = welcome();
    let ServerMessage::Welcome { peers, .. } = &mut other else {
        unreachable!()
    };
    *peers = PeerList::Encoded(vec![EncodedEntry::new(&node_a()).unwrap()]);
    assert_ne!(other, welcome(), "a missing entry shows");
}

#[test]
fn large_peer_map_needs_the_admitted_limit() {
    let peers = (0..200u32)
        .map(|i| NodeEntry {
            name: format!("node-{i:04}"),
            ..node_a()
        })
        .collect();
    let ServerMessage::Welcome {
        node,
        mesh,
        observed,
        ..
    } = welcome()
    else {
        unreachable!()
    };
    let big = ServerMessage::Welcome {
        node,
        mesh,
        observed,
        peers,
        servers: Vec::new(),
        routes: Vec::new(),
        features: Vec::new(),
        port_taken: None,
        peers_unchanged: false,
    };
    let frame = encode(&big);
    assert!(frame.len() > MAX_FRAME_UNADMITTED);
    assert!(matches!(
        decode_frame::<ServerMessage>(&frame, MAX_FRAME_UNADMITTED),
        Err(FrameError::TooLarge { .. })
    ));
    assert_eq!(
        decode_frame::<ServerMessage>(&frame, MAX_FRAME).unwrap(),
        (big, frame.len())
    );
}

// ---------------------------------------------------------------------------
// Hostile input: Malformed, never a panic.

/// Decodes `frame` as every message type under both limits and returns each
/// verdict. Panics only if a decoder does.
fn decode_as_anything(frame: &[u8]) -> Vec<Result<(), FrameError>> {
    let mut out = Vec::new();
    for max in [MAX_FRAME_UNADMITTED, MAX_FRAME] {
        out.push(decode_frame::<ServerHello>(frame, max).map(drop));
        out.push(decode_frame::<Hello>(frame, max).map(drop));
        out.push(decode_frame::<ServerMessage>(frame, max).map(drop));
        out.push(decode_frame::<NodeMessage>(frame, max).map(drop));
    }
    out
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

const ALL: [&str; 15] = [
    "server_hello",
    "hello",
    "hello_registered",
    "welcome",
    "rejected",
    "rejected_version",
    "peer_upsert",
    "peer_remove",
    "peer_upsert_nat",
    "candidates",
    "nat",
    "hello_routes",
    "peer_upsert_routes",
    "routes",
    "paths",
];

#[test]
fn truncated_frames_are_malformed() {
    for name in ALL {
        let frame = frame_file(name);
        for end in 0..frame.len() {
            // Cut off mid-stream: the header promises more than is there.
            for r in decode_as_anything(&frame[..end]) {
                assert!(
                    matches!(r, Err(FrameError::Malformed(_))),
                    "{name}[..{end}]: {r:?}"
                );
            }
            // Cut off and re-framed: a consistent header around half a body.
            if end > 4 {
                for r in decode_as_anything(&framed(&frame[4..end])) {
                    assert!(
                        matches!(r, Err(FrameError::Malformed(_))),
                        "{name} body[..{end}]"
                    );
                }
            }
        }
    }
}

#[test]
fn garbage_bodies_are_malformed() {
    // Far deeper than serde_json's recursion limit, well under the limit.
    let deep = "[".repeat(10_000);
    let bodies: Vec<&[u8]> = vec![
        b"",
        b"null",
        b"{}",
        b"[]",
        b"42",
        b"\xff\xfe\x00garbage",
        b"{\"type\":\"no_such_message\"}",
        b"{\"type\":\"welcome\"}",
        b"{\"type\":7}",
        b"{\"version\":1,\"mesh_id\":\"m\",\"server_key\":\"AAAA\"}",
        b"{\"version\":-1,\"mesh_id\":\"m\",\"server_key\":\"hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=\"}",
        b"{\"type\":\"peer_remove\",\"public_key\":\"hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo\"}",
        b"{\"type\":\"candidates\",\"candidates\":[{\"addr\":\"300.1.2.3:1\",\"kind\":\"local\"}]}",
        b"{\"type\":\"candidates\",\"candidates\":[{\"addr\":\"1.2.3.4:65536\",\"kind\":\"local\"}]}",
        b"{\"type\":\"candidates\",\"candidates\":[{\"addr\":\"1.2.3.4\",\"kind\":\"local\"}]}",
        b"{\"type\":\"candidates\",\"candidates\":[{\"addr\":\"1.2.3.4:1\",\"kind\":\"relay\"}]}",
        b"{\"type\":\"rejected\",\"reason\":\"bad_token\",\"message\":\"\\ud800\"}",
        b"{\"type\":\"rejected\",\"reason\":\"bad_token\",\"message\":\"x\",\"message\":\"y\"}",
        b"{\"type\":\"rejected\",\"reason\":\"bad_token\",\"message\":\"x\"} trailing",
        deep.as_bytes(),
    ];
    for body in bodies {
        for r in decode_as_anything(&framed(body)) {
            assert!(
                matches!(r, Err(FrameError::Malformed(_))),
                "{:?} was not malformed: {r:?}",
                String::from_utf8_lossy(&body[..body.len().min(60)])
            );
        }
    }
}

#[test]
fn corrupted_vectors_never_panic() {
    // A tiny deterministic fuzz over the golden frames; fuzz/ does the real one.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for name in ALL {
        let frame = frame_file(name);
        for _ in 0..200 {
            let mut f = frame.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() as usize) % f.len();
                f[i] ^= 1 << (next() % 8);
            }
            let _ = decode_as_anything(&f);
        }
    }
}

// ---------------------------------------------------------------------------
// Compatibility rules stated in proto/control.md.

fn body_of(name: &str) -> serde_json::Value {
    serde_json::from_slice(&frame_file(name)[4..]).unwrap()
}

#[test]
fn unknown_fields_are_ignored() {
    let mut v = body_of("hello");
    v["future_field"] = serde_json::json!({"anything": [1, 2, 3]});
    assert_eq!(
        decode::<Hello>(&serde_json::to_vec(&v).unwrap()).unwrap(),
        hello()
    );
    let mut v = body_of("welcome");
    v["peers"][0]["future_field"] = serde_json::json!(true);
    assert_eq!(
        decode::<ServerMessage>(&serde_json::to_vec(&v).unwrap()).unwrap(),
        welcome()
    );
}

#[test]
fn another_version_still_decodes_so_it_can_be_rejected_politely() {
    let mut v = body_of("hello");
    v["version"] = serde_json::json!(2);
    let h = decode::<Hello>(&serde_json::to_vec(&v).unwrap()).unwrap();
    assert_eq!(h.version, 2);
}

#[test]
fn absent_or_null_token_means_none() {
    let mut v = body_of("hello");
    v["token"] = serde_json::Value::Null;
    assert_eq!(
        decode::<Hello>(&serde_json::to_vec(&v).unwrap())
            .unwrap()
            .token,
        None
    );
    v.as_object_mut().unwrap().remove("token");
    assert_eq!(
        decode::<Hello>(&serde_json::to_vec(&v).unwrap())
            .unwrap()
            .token,
        None
    );
    let frame = encode(&hello_registered());
    assert!(!String::from_utf8_lossy(&frame[4..]).contains("token"));
}

#[test]
fn type_tag_may_come_anywhere_and_whitespace_is_free() {
    let body = format!("{{ \"public_key\" : \"{PEER_A}\" ,\n \"type\" : \"peer_remove\" }}");
    assert_eq!(
        decode::<ServerMessage>(body.as_bytes()).unwrap(),
        peer_remove()
    );
}

#[test]
fn proof_must_be_32_bytes_of_padded_standard_base64() {
    let with_proof = |p: &str| {
        let mut v = body_of("hello");
        v["proof"] = serde_json::json!(p);
        decode::<Hello>(&serde_json::to_vec(&v).unwrap())
    };
    let good = base64::engine::general_purpose::STANDARD.encode(hex(PROOF_HEX));
    assert_eq!(with_proof(&good).unwrap(), hello());
    let short = base64::engine::general_purpose::STANDARD.encode([0u8; 31]);
    let unpadded = good.trim_end_matches('=');
    let url_safe = base64::engine::general_purpose::URL_SAFE.encode(hex(PROOF_HEX));
    assert_ne!(
        url_safe, good,
        "the vector proof should exercise the URL-safe alphabet"
    );
    for bad in [
        short.as_str(),
        unpadded,
        url_safe.as_str(),
        "",
        "not base64",
    ] {
        assert!(
            matches!(with_proof(bad), Err(FrameError::Malformed(_))),
            "{bad:?}"
        );
    }
}

fn probe_vectors() -> serde_json::Value {
    let text = std::fs::read_to_string(vectors_dir().join("probe.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// proto/probe.md "Authentication", written out independently of
/// `meshd::wire::probe`: key = BLAKE2s-256("meshd probe v1" ‖ X25519(own,
/// peer)); MAC = BLAKE2s-128 keyed with it (RFC 7693) over bytes 0..71.
fn spec_probe_mac(own_private: [u8; 32], peer_public: [u8; 32], body: &[u8]) -> [u8; 16] {
    use blake2::Digest as _;
    let shared = x25519_dalek::StaticSecret::from(own_private)
        .diffie_hellman(&x25519_dalek::PublicKey::from(peer_public));
    let mut h = blake2::Blake2s256::new();
    h.update(b"meshd probe v1");
    h.update(shared.as_bytes());
    let key: [u8; 32] = h.finalize().into();
    let mut mac = <blake2::Blake2sMac<blake2::digest::consts::U16> as blake2::digest::KeyInit>::new_from_slice(&key).unwrap();
    mac.update(body);
    mac.finalize().into_bytes().into()
}

#[test]
fn probe_vectors_match_the_specification_and_the_code() {
    use meshd::wire::probe::{self, ProbeKey, ProbeKind, PROBE_LEN};
    let v = probe_vectors();
    let sender: PrivateKey = v["sender_private"].as_str().unwrap().parse().unwrap();
    let receiver = key(v["receiver_public"].as_str().unwrap());
    let tx: [u8; 12] = hex(v["tx"].as_str().unwrap()).try_into().unwrap();
    let observed = |name: &str| v[name]["observed"].as_str().unwrap().parse().unwrap();
    let cases = [
        (
            "ping",
            ProbeKind::Ping {
                sent_ms: v["ping"]["sent_ms"].as_u64(),
            },
        ),
        ("ping_0_1", ProbeKind::Ping { sent_ms: None }),
        (
            "pong",
            ProbeKind::Pong {
                observed: observed("pong"),
            },
        ),
        (
            "pong_v6",
            ProbeKind::Pong {
                observed: observed("pong_v6"),
            },
        ),
    ];
    let seal_key = ProbeKey::derive(&sender, &receiver).unwrap();
    for (name, kind) in cases {
        let wire = hex(v[name]["hex"].as_str().unwrap());
        assert_eq!(wire.len(), PROBE_LEN, "{name}");
        // The MAC as the specification computes it.
        let private = base64::engine::general_purpose::STANDARD
            .decode(v["sender_private"].as_str().unwrap())
            .unwrap();
        let spec = spec_probe_mac(bytes32(&private), *receiver.as_bytes(), &wire[..71]);
        assert_eq!(wire[71..], spec, "{name}: MAC");
        // The code seals exactly these bytes…
        let mut buf = [0u8; PROBE_LEN];
        assert_eq!(
            seal_key.seal(kind, tx, &sender.public_key(), &mut buf),
            &wire[..],
            "{name}: sealed"
        );
        // …and the receiver, deriving its key from its own side, reads them back.
        let probe = probe::peek(&wire).unwrap();
        assert_eq!(
            (probe.kind, probe.tx, probe.sender),
            (kind, tx, sender.public_key()),
            "{name}"
        );
    }
}
