use super::*;
use crate::wire::digest::MapDigest;

const NOW: u64 = 1_700_000_000;
const DAY: u64 = 86_400;

/// `unix` as the shell would hand it over, on one monotonic clock
/// that reads `NOW` at its start.
fn at(unix: u64) -> Now {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    Now {
        unix,
        instant: start + std::time::Duration::from_secs(unix.saturating_sub(NOW)),
    }
}

/// The rendezvous's static key in these tests.
fn server() -> PrivateKey {
    PrivateKey::from_bytes([0xa5; 32])
}

/// The TLS exporter value of "the connection" in these tests.
const EXPORTER: [u8; 32] = [0x5a; 32];

fn secret(n: u8) -> PrivateKey {
    PrivateKey::from_bytes([n; 32])
}

fn key(n: u8) -> PublicKey {
    secret(n).public_key()
}

/// A hello from the holder of `secret`, proving it on [`EXPORTER`].
fn hello_as(secret: &PrivateKey, name: &str, token: Option<&str>) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        public_key: secret.public_key(),
        name: name.to_owned(),
        listen_port: 51820,
        token: token.map(str::to_owned),
        candidates: Vec::new(),
        proof: admission::proof(secret, &server().public_key(), &EXPORTER),
        routes: Vec::new(),
        peers_digest: None,
    }
}

/// `hello` as it arrives on a connection from `observed`.
fn arriving(hello: Hello, observed: SocketAddr) -> IncomingHello {
    IncomingHello {
        hello: Ok(hello),
        exporter: EXPORTER,
        observed,
    }
}

fn mesh(cidr: &str) -> MeshInfo {
    MeshInfo {
        id: "test-mesh".into(),
        ipv4: cidr.parse().unwrap(),
        ipv6: ipam::ula_prefix([0x12, 0x34, 0x56, 0x78, 0x9a]),
    }
}

fn registry() -> Registry {
    Registry::new(RegistryState::new(mesh("100.72.0.0/16")), server())
}

fn hello(n: u8, token: Option<&str>) -> Hello {
    Hello {
        candidates: vec![Candidate {
            addr: SocketAddr::from(([10, 0, 0, n], 51820)),
            kind: CandidateKind::Local,
            mapped: None,
        }],
        ..hello_as(&secret(n), &format!("node-{n}"), token)
    }
}

fn observed(n: u8) -> SocketAddr {
    SocketAddr::from(([198, 51, 100, n], 40000 + u16::from(n)))
}

/// The registry's commands until it has none, each commit answered
/// as committed (a single server's store, which nobody else writes)
/// and shown as [`committed`]; commits of presence alone (which server a
/// node is on) are left out.
/// The registry's next command, as the shell runs them: the peer-map
/// changes of a tick go out once nothing else is queued.
fn next_command(reg: &mut Registry) -> Option<Command> {
    reg.poll_command().or_else(|| {
        reg.flush_deltas();
        reg.poll_command()
    })
}

/// A tick's [`Command::PeerDeltas`] as the sends they make, member by
/// member, each member's in order.
fn expand_deltas(members: Vec<DeltaMember>, deltas: &[Delta], out: &mut Vec<Command>) {
    for member in members {
        for delta in deltas.iter().filter(|d| member.wants(d)) {
            out.push(Command::Send {
                conn: member.conn,
                msg: delta.msg.clone(),
            });
        }
    }
}

fn drain(reg: &mut Registry) -> Vec<Command> {
    static REVISION: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(2);
    let mut out = Vec::new();
    while let Some(command) = next_command(reg) {
        match command {
            Command::PeerDeltas { members, deltas } => expand_deltas(members, &deltas, &mut out),
            Command::Commit { id, txn } => {
                let revision = REVISION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                reg.handle_outcome(id, Outcome::Committed { revision }, &[]);
                if txn.keys().iter().any(|k| records::is_durable(k)) {
                    out.push(committed());
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// [`drain`] against a real store: commits can conflict, as when joins
/// race.
fn drain_store(
    reg: &mut Registry,
    store: &mut crate::rendezvous::store::LocalStore,
) -> Vec<Command> {
    std::iter::from_fn(|| {
        let command = reg.poll_command()?;
        Some(match command {
            Command::Commit { id, txn } => {
                let (outcome, fresh) = store.commit(&txn);
                reg.handle_outcome(id, outcome, &fresh);
                committed()
            }
            other => other,
        })
    })
    .collect()
}

/// A [`Command::Commit`], as [`drain`] shows them.
fn committed() -> Command {
    Command::Commit {
        id: ProposalId(0),
        txn: Txn::new(),
    }
}

/// A registry with an unlimited token, returning the token.
fn with_token() -> (Registry, String) {
    let mut reg = registry();
    let token = reg
        .create_token([7; 32], "abc123".into(), DAY, None, NOW)
        .unwrap()
        .expose()
        .to_owned();
    drain(&mut reg);
    (reg, token)
}

/// Admits node `n` on `ConnId(n)` and drains the commands.
fn join(reg: &mut Registry, n: u8, token: &str) -> Vec<Command> {
    reg.handle_hello(
        ConnId(n.into()),
        arriving(hello(n, Some(token)), observed(n)),
        at(NOW),
    );
    let cmds = drain(reg);
    let conn = ConnId(n.into());
    assert!(
        cmds.iter().any(|c| matches!(c,
            Command::Send { conn: to, msg: ServerMessage::Welcome { .. } } if *to == conn)),
        "node {n} not welcomed: {cmds:?}"
    );
    cmds
}

fn welcome(cmds: &[Command]) -> (NodeEntry, Vec<NodeEntry>) {
    cmds.iter()
        .find_map(|c| match c {
            Command::Send {
                msg: ServerMessage::Welcome { node, peers, .. },
                ..
            } => Some((node.clone(), peers.clone().into_entries())),
            _ => None,
        })
        .expect("a welcome")
}

fn assert_rejected_only(cmds: &[Command], conn: ConnId, reason: RejectReason) -> String {
    let [send, close] = cmds else {
        panic!("expected only Rejected({reason:?}) + Close, got {cmds:?}");
    };
    assert_eq!(
        close,
        &Command::Close {
            conn,
            reason: CloseReason::Rejected(reason)
        }
    );
    match send {
        Command::Send {
            conn: to,
            msg: ServerMessage::Rejected { reason: r, message },
        } => {
            assert_eq!((*to, *r), (conn, reason));
            message.clone()
        }
        other => panic!("expected Rejected({reason:?}), got {other:?}"),
    }
}

#[test]
fn a_new_node_with_a_good_token_is_persisted_then_admitted_and_welcomed() {
    let (mut reg, token) = with_token();
    reg.handle_hello(
        ConnId(1),
        arriving(hello(1, Some(&token)), observed(1)),
        at(NOW),
    );
    let cmds = drain(&mut reg);
    assert_eq!(cmds.len(), 3, "{cmds:?}");
    assert_eq!(cmds[0], committed());
    let expected_v4 = ipam::ipv4_candidates(&key(1), reg.state().mesh.ipv4)
        .next()
        .unwrap();
    let expected_v6 = ipam::ipv6_for(&key(1), reg.state().mesh.ipv6);
    assert_eq!(
        cmds[1],
        Command::Admitted {
            conn: ConnId(1),
            key: key(1),
            ipv4: expected_v4
        }
    );
    match &cmds[2] {
        Command::Send {
            conn,
            msg:
                ServerMessage::Welcome {
                    node,
                    mesh,
                    observed: obs,
                    peers,
                    servers,
                    ..
                },
        } => {
            assert!(servers.is_empty(), "a server not announced names none");
            assert_eq!(*conn, ConnId(1));
            assert_eq!(node.public_key, key(1));
            assert_eq!(node.name, "node-1");
            assert_eq!((node.ipv4, node.ipv6), (expected_v4, expected_v6));
            assert_eq!(*mesh, reg.state().mesh);
            assert_eq!(*obs, observed(1));
            assert!(peers.is_empty());
        }
        other => panic!("expected a welcome, got {other:?}"),
    }
    assert_eq!(reg.state().tokens["abc123"].uses, 1);
    assert_eq!(reg.state().nodes[&key(1)].joined_at, NOW);
    assert!(reg.is_online(&key(1)));
}

#[test]
fn welcome_lists_every_other_node_with_its_last_known_candidates() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    join(&mut reg, 2, &token);
    reg.handle_disconnect(ConnId(2), at(NOW + 5));
    drain(&mut reg);
    let (me, peers) = welcome(&join(&mut reg, 3, &token));
    assert_eq!(me.public_key, key(3));
    let keys: Vec<_> = peers.iter().map(|p| p.public_key).collect();
    assert_eq!(keys, vec![key(1), key(2)]);
    let offline = &peers[1];
    assert!(offline.candidates.contains(&Candidate {
        addr: observed(2),
        kind: CandidateKind::Observed,
        mapped: None
    }));
    assert!(offline.candidates.contains(&Candidate {
        addr: SocketAddr::from(([10, 0, 0, 2], 51820)),
        kind: CandidateKind::Local,
        mapped: None
    }));
}

#[test]
fn a_join_is_announced_to_every_other_online_node() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    join(&mut reg, 2, &token);
    let cmds = join(&mut reg, 3, &token);
    let (me, _) = welcome(&cmds);
    let upserts: Vec<_> = cmds
        .iter()
        .filter_map(|c| match c {
            Command::Send {
                conn,
                msg: ServerMessage::PeerUpsert { peer },
            } => Some((*conn, peer.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(upserts, vec![(ConnId(1), me.clone()), (ConnId(2), me)]);
}

#[test]
fn rejections_queue_only_rejected_and_close_and_change_nothing() {
    let mut reg = registry();
    let unlimited = reg
        .create_token([1; 32], "open".into(), DAY, None, NOW)
        .unwrap()
        .expose()
        .to_owned();
    let expired = reg
        .create_token([2; 32], "old".into(), 10, None, NOW - 100)
        .unwrap()
        .expose()
        .to_owned();
    let revoked = reg
        .create_token([3; 32], "gone".into(), DAY, None, NOW)
        .unwrap()
        .expose()
        .to_owned();
    drain(&mut reg);
    reg.revoke_token("gone");
    let used = reg
        .create_token([4; 32], "once".into(), DAY, Some(1), NOW)
        .unwrap()
        .expose()
        .to_owned();
    drain(&mut reg);
    join(&mut reg, 1, &used);
    join(&mut reg, 2, &unlimited);
    reg.remove_node(&key(2), false, NOW);
    drain(&mut reg);
    let wrong_secret = format!("open.{}", URL_SAFE_NO_PAD.encode([9u8; 32]));

    let mut cases: Vec<(&str, Hello, RejectReason)> = vec![
        (
            "wrong secret",
            hello(10, Some(&wrong_secret)),
            RejectReason::BadToken,
        ),
        (
            "unknown id",
            hello(10, Some("nosuch.AAAA")),
            RejectReason::BadToken,
        ),
        ("no dot", hello(10, Some("garbage")), RejectReason::BadToken),
        (
            "bad base64",
            hello(10, Some("open.!!!")),
            RejectReason::BadToken,
        ),
        ("no token", hello(10, None), RejectReason::BadToken),
        ("expired", hello(10, Some(&expired)), RejectReason::BadToken),
        ("revoked", hello(10, Some(&revoked)), RejectReason::BadToken),
        ("used up", hello(10, Some(&used)), RejectReason::BadToken),
        ("removed", hello(2, Some(&unlimited)), RejectReason::Removed),
    ];
    let mut v = hello(10, Some(&unlimited));
    v.version = PROTOCOL_VERSION + 1;
    cases.push(("version", v, RejectReason::Version));
    for name in [
        String::new(),
        "x".repeat(MAX_NAME + 1),
        "evil\nname".into(),
        "a\u{7f}".into(),
    ] {
        let mut h = hello(10, Some(&unlimited));
        h.name = name;
        cases.push(("bad name", h, RejectReason::BadHello));
    }
    let mut many = hello(10, Some(&unlimited));
    many.candidates = (0..=MAX_CANDIDATES as u16)
        .map(|p| Candidate {
            addr: SocketAddr::from(([10, 0, 0, 1], 1000 + p)),
            kind: CandidateKind::Local,
            mapped: None,
        })
        .collect();
    cases.push(("too many candidates", many, RejectReason::BadHello));

    let before = reg.state().clone();
    for (what, h, reason) in cases {
        reg.handle_hello(ConnId(99), arriving(h.clone(), observed(10)), at(NOW));
        let cmds = drain(&mut reg);
        let message = assert_rejected_only(&cmds, ConnId(99), reason);
        assert!(
            !message.contains("100.72") && !message.contains("test-mesh"),
            "{what}: {message}"
        );
        assert_eq!(reg.state(), &before, "{what} changed the state");
        assert!(!reg.is_online(&h.public_key), "{what}");
    }
}

#[test]
fn refused_hellos_are_counted_by_reason_and_admissions_are_not() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    reg.handle_hello(ConnId(2), arriving(hello(2, None), observed(2)), at(NOW));
    reg.handle_hello(
        ConnId(3),
        arriving(hello(3, Some("nosuch.AAAA")), observed(3)),
        at(NOW),
    );
    let mut newer = hello(4, Some(&token));
    newer.version = PROTOCOL_VERSION + 1;
    reg.handle_hello(ConnId(4), arriving(newer.clone(), observed(4)), at(NOW));
    let mut elsewhere = arriving(hello(5, Some(&token)), observed(5));
    elsewhere.exporter = [0x77; 32];
    reg.handle_hello(ConnId(5), elsewhere, at(NOW));
    // One the shell refused before there was a hello: a frame too large.
    reg.count_rejection(RejectReason::BadHello);
    drain(&mut reg);
    let counts: Vec<(RejectReason, u64)> = reg.rejections().collect();
    assert_eq!(
        counts,
        vec![
            (RejectReason::Version, 1),
            (RejectReason::BadProof, 1),
            (RejectReason::BadToken, 2),
            (RejectReason::Removed, 0),
            (RejectReason::BadHello, 1),
        ]
    );
}

#[test]
fn a_proven_hello_with_a_good_token_is_admitted_before_it_is_welcomed() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    reg.handle_hello(
        ConnId(2),
        arriving(hello(2, Some(&token)), observed(2)),
        at(NOW),
    );
    let cmds = drain(&mut reg);
    let admitted = cmds
        .iter()
        .position(|c| matches!(c, Command::Admitted { conn, key: k, .. } if *conn == ConnId(2) && *k == key(2)));
    let welcomed = cmds.iter().position(|c| {
        matches!(c, Command::Send { conn, msg: ServerMessage::Welcome { .. } } if *conn == ConnId(2))
    });
    assert!(
        matches!((admitted, welcomed), (Some(a), Some(w)) if a < w),
        "{cmds:?}"
    );
    let (me, _) = welcome(&cmds);
    assert!(cmds.contains(&Command::Admitted {
        conn: ConnId(2),
        key: key(2),
        ipv4: me.ipv4
    }));
}

#[test]
fn a_hello_of_another_version_is_rejected_naming_both_versions_whatever_its_proof() {
    let (mut reg, token) = with_token();
    // One the shell could not decode: a newer node's hello.
    let unreadable = IncomingHello {
        hello: Err(HelloError::Version { theirs: Some(2) }),
        exporter: EXPORTER,
        observed: observed(1),
    };
    reg.handle_hello(ConnId(1), unreadable, at(NOW));
    let message = assert_rejected_only(&drain(&mut reg), ConnId(1), RejectReason::Version);
    assert_eq!(
        message, "this rendezvous speaks protocol version 1, the node 2; upgrade the older side",
        "as proto/vectors/rejected_version.hex"
    );
    let nameless = IncomingHello {
        hello: Err(HelloError::Version { theirs: None }),
        exporter: EXPORTER,
        observed: observed(1),
    };
    reg.handle_hello(ConnId(2), nameless, at(NOW));
    let message = assert_rejected_only(&drain(&mut reg), ConnId(2), RejectReason::Version);
    assert!(message.contains("names none"), "{message}");
    // A decoded one of another version, its proof made for nothing:
    // the version is what it learns.
    let mut other = hello(3, Some(&token));
    other.version = PROTOCOL_VERSION + 1;
    other.proof = crate::wire::control::Proof([0; 32]);
    reg.handle_hello(ConnId(3), arriving(other, observed(3)), at(NOW));
    assert_rejected_only(&drain(&mut reg), ConnId(3), RejectReason::Version);
    assert_eq!(reg.state().tokens["abc123"].uses, 0);
}

#[test]
fn a_malformed_hello_is_rejected_as_bad_hello() {
    let mut reg = registry();
    let malformed = IncomingHello {
        hello: Err(HelloError::Malformed("not a JSON object".into())),
        exporter: EXPORTER,
        observed: observed(1),
    };
    reg.handle_hello(ConnId(1), malformed, at(NOW));
    let message = assert_rejected_only(&drain(&mut reg), ConnId(1), RejectReason::BadHello);
    assert_eq!(message, "malformed hello");
}

#[test]
fn a_proof_for_another_connection_another_key_or_a_low_order_key_is_rejected_and_spends_nothing() {
    let (mut reg, token) = with_token();
    let before = reg.state().clone();
    // Lifted from another connection: made for another exporter value.
    let mut replayed = arriving(hello(1, Some(&token)), observed(1));
    replayed.exporter = [0x77; 32];
    // Made by node 2's key, claiming node 3's.
    let mut borrowed = hello(2, Some(&token));
    borrowed.public_key = key(3);
    // A key whose shared secret anyone can compute.
    let mut low_order = hello(4, Some(&token));
    low_order.public_key = PublicKey::from_bytes([0; 32]);
    let cases = [
        ("replayed", replayed),
        ("borrowed", arriving(borrowed, observed(2))),
        ("low order", arriving(low_order, observed(4))),
    ];
    for (n, (what, incoming)) in (10u64..).zip(cases) {
        let claimed = incoming.hello.as_ref().map(|h| h.public_key).unwrap();
        reg.handle_hello(ConnId(n), incoming, at(NOW));
        let message = assert_rejected_only(&drain(&mut reg), ConnId(n), RejectReason::BadProof);
        assert!(message.contains("cannot prove"), "{what}: {message}");
        assert!(!reg.is_online(&claimed), "{what}");
        assert_eq!(reg.state(), &before, "{what} changed the state");
    }
}

#[test]
fn a_spent_single_use_token_is_rejected_and_its_one_admission_stands() {
    let mut reg = registry();
    let once = reg
        .create_token([4; 32], "once".into(), DAY, Some(1), NOW)
        .unwrap()
        .expose()
        .to_owned();
    drain(&mut reg);
    join(&mut reg, 1, &once);
    reg.handle_hello(
        ConnId(2),
        arriving(hello(2, Some(&once)), observed(2)),
        at(NOW),
    );
    let message = assert_rejected_only(&drain(&mut reg), ConnId(2), RejectReason::BadToken);
    assert_eq!(message, TOKEN_REFUSED);
    assert!(reg.is_online(&key(1)) && !reg.is_online(&key(2)));
    assert_eq!(reg.state().tokens["once"].uses, 1);
}

#[test]
fn no_welcome_is_ever_queued_without_admitted_before_it() {
    let (mut reg, token) = with_token();
    let mut spent = reg
        .create_token([5; 32], "one".into(), DAY, Some(1), NOW)
        .unwrap()
        .expose()
        .to_owned();
    drain(&mut reg);
    let mut replayed = arriving(hello(9, Some(&token)), observed(9));
    replayed.exporter = [0x77; 32];
    let mut inputs = vec![
        arriving(hello(1, Some(&spent)), observed(1)),
        arriving(hello(2, Some(&spent)), observed(2)),
        arriving(hello(3, Some(&token)), observed(3)),
        // Node 1 again, superseding its first connection.
        arriving(hello(1, None), observed(1)),
        arriving(hello(4, None), observed(4)),
        replayed,
    ];
    spent.push('x');
    inputs.push(arriving(hello(5, Some(&spent)), observed(5)));
    for (n, incoming) in (1u64..).zip(inputs) {
        reg.handle_hello(ConnId(n), incoming, at(NOW));
        let cmds = drain(&mut reg);
        for (i, c) in cmds.iter().enumerate() {
            if let Command::Send {
                conn,
                msg: ServerMessage::Welcome { .. },
            } = c
            {
                assert!(
                    cmds[..i]
                        .iter()
                        .any(|a| matches!(a, Command::Admitted { conn: to, .. } if to == conn)),
                    "a welcome without an admission: {cmds:?}"
                );
            }
        }
        let admitted = cmds
            .iter()
            .filter(|c| matches!(c, Command::Admitted { .. }))
            .count();
        assert!(admitted <= 1, "{cmds:?}");
    }
    assert!(reg.is_online(&key(1)) && reg.is_online(&key(3)));
    assert!(!reg.is_online(&key(2)) && !reg.is_online(&key(4)));
    assert!(!reg.is_online(&key(5)) && !reg.is_online(&key(9)));
}

#[test]
fn token_failures_do_not_reveal_whether_the_token_id_exists() {
    let (mut reg, _) = with_token();
    let wrong = format!("abc123.{}", URL_SAFE_NO_PAD.encode([9u8; 32]));
    let unknown = format!("zzz999.{}", URL_SAFE_NO_PAD.encode([9u8; 32]));
    reg.handle_hello(
        ConnId(1),
        arriving(hello(1, Some(&wrong)), observed(1)),
        at(NOW),
    );
    let a = assert_rejected_only(&drain(&mut reg), ConnId(1), RejectReason::BadToken);
    reg.handle_hello(
        ConnId(2),
        arriving(hello(2, Some(&unknown)), observed(2)),
        at(NOW),
    );
    let b = assert_rejected_only(&drain(&mut reg), ConnId(2), RejectReason::BadToken);
    assert_eq!(a, b);
    assert!(!a.contains("abc123"));
}

#[test]
fn a_token_is_expired_from_its_expiry_second_on() {
    let mut reg = registry();
    let token = reg
        .create_token([5; 32], "short".into(), 60, None, NOW)
        .unwrap()
        .expose()
        .to_owned();
    drain(&mut reg);
    reg.handle_hello(
        ConnId(1),
        arriving(hello(1, Some(&token)), observed(1)),
        at(NOW + 60),
    );
    let message = assert_rejected_only(&drain(&mut reg), ConnId(1), RejectReason::BadToken);
    assert_eq!(message, TOKEN_EXPIRED);
    reg.handle_hello(
        ConnId(2),
        arriving(hello(1, Some(&token)), observed(1)),
        at(NOW + 59),
    );
    assert_eq!(welcome(&drain(&mut reg)).0.public_key, key(1));
}

#[test]
fn a_removed_node_is_refused_even_with_a_valid_token() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    assert!(reg.remove_node(&key(1), false, NOW));
    drain(&mut reg);
    reg.handle_hello(
        ConnId(5),
        arriving(hello(1, Some(&token)), observed(1)),
        at(NOW),
    );
    assert_rejected_only(&drain(&mut reg), ConnId(5), RejectReason::Removed);
    assert_eq!(reg.state().tokens["abc123"].uses, 1);
}

#[test]
fn a_single_use_token_admits_exactly_one_of_twenty_concurrent_joins() {
    let mut reg = registry();
    let mut store = crate::rendezvous::store::LocalStore::new(reg.state());
    let token = reg
        .create_token([8; 32], "once".into(), DAY, Some(1), NOW)
        .unwrap()
        .expose()
        .to_owned();
    drain_store(&mut reg, &mut store);
    // All twenty decided before the store answers any: each claims the
    // token's one use, and only the first commit holds.
    for n in 1..=20u8 {
        reg.handle_hello(
            ConnId(n.into()),
            arriving(hello(n, Some(&token)), observed(n)),
            at(NOW),
        );
    }
    let cmds = drain_store(&mut reg, &mut store);
    let welcomes = cmds
        .iter()
        .filter(|c| {
            matches!(
                c,
                Command::Send {
                    msg: ServerMessage::Welcome { .. },
                    ..
                }
            )
        })
        .count();
    let rejects = cmds
        .iter()
        .filter(|c| {
            matches!(
                c,
                Command::Send {
                    msg: ServerMessage::Rejected { .. },
                    ..
                }
            )
        })
        .count();
    assert_eq!((welcomes, rejects), (1, 19));
    assert_eq!(reg.state().nodes.len(), 1);
    assert_eq!(reg.state().tokens["once"].uses, 1);
}

#[test]
fn a_multi_use_token_counts_its_uses() {
    let mut reg = registry();
    let token = reg
        .create_token([8; 32], "three".into(), DAY, Some(3), NOW)
        .unwrap()
        .expose()
        .to_owned();
    drain(&mut reg);
    for n in 1..=3 {
        join(&mut reg, n, &token);
    }
    assert_eq!(reg.state().tokens["three"].status(NOW), TokenStatus::UsedUp);
    reg.handle_hello(
        ConnId(4),
        arriving(hello(4, Some(&token)), observed(4)),
        at(NOW),
    );
    assert_rejected_only(&drain(&mut reg), ConnId(4), RejectReason::BadToken);
}

#[test]
fn a_known_node_rejoins_without_a_token_and_keeps_its_address_and_name() {
    let (mut reg, token) = with_token();
    let (first, _) = welcome(&join(&mut reg, 1, &token));
    reg.handle_disconnect(ConnId(1), at(NOW + 1));
    drain(&mut reg);
    reg.revoke_token("abc123");
    drain(&mut reg);
    let mut again = hello(1, None);
    again.name = "renamed".into();
    reg.handle_hello(ConnId(7), arriving(again.clone(), observed(1)), at(NOW + 2));
    let (second, _) = welcome(&drain(&mut reg));
    assert_eq!((second.ipv4, second.ipv6), (first.ipv4, first.ipv6));
    assert_eq!(
        second.name, "node-1",
        "the name is bound to the key at first admission"
    );
    assert_eq!(reg.state().nodes[&key(1)].name, "node-1");
    assert_eq!(reg.state().tokens["abc123"].uses, 1);
    assert_eq!(reg.state().nodes[&key(1)].joined_at, NOW);
}

#[test]
fn a_token_sent_by_a_known_node_is_not_spent() {
    let mut reg = registry();
    let token = reg
        .create_token([8; 32], "two".into(), DAY, Some(2), NOW)
        .unwrap()
        .expose()
        .to_owned();
    drain(&mut reg);
    join(&mut reg, 1, &token);
    reg.handle_hello(
        ConnId(9),
        arriving(hello(1, Some(&token)), observed(1)),
        at(NOW),
    );
    drain(&mut reg);
    assert_eq!(reg.state().tokens["two"].uses, 1);
}

#[test]
fn addresses_survive_a_save_load_round_trip_and_a_restart() {
    let (mut reg, token) = with_token();
    let addrs: Vec<_> = (1..=5)
        .map(|n| {
            let (e, _) = welcome(&join(&mut reg, n, &token));
            (e.ipv4, e.ipv6)
        })
        .collect();
    let json = serde_json::to_string(reg.state()).unwrap();
    let loaded: RegistryState = serde_json::from_str(&json).unwrap();
    assert_eq!(&loaded, reg.state());

    let mut restarted = Registry::new(loaded, server());
    for n in 1..=5u8 {
        restarted.handle_hello(
            ConnId(100 + u64::from(n)),
            arriving(hello(n, None), observed(n)),
            at(NOW + 60),
        );
        let (e, _) = welcome(&drain(&mut restarted));
        assert_eq!((e.ipv4, e.ipv6), addrs[usize::from(n - 1)]);
    }
}

#[test]
fn a_key_gets_the_same_address_in_any_registry_without_collisions() {
    let (mut a, token_a) = with_token();
    let (mut b, token_b) = with_token();
    join(&mut b, 2, &token_b);
    let (in_a, _) = welcome(&join(&mut a, 1, &token_a));
    let (in_b, _) = welcome(&join(&mut b, 1, &token_b));
    assert_eq!((in_a.ipv4, in_a.ipv6), (in_b.ipv4, in_b.ipv6));
}

#[test]
fn collisions_take_the_next_free_address_and_a_full_mesh_refuses_without_spending_the_token() {
    // A /29 has six usable addresses; nine keys must collide.
    let mut reg = Registry::new(RegistryState::new(mesh("10.9.8.0/29")), server());
    let token = reg
        .create_token([8; 32], "many".into(), DAY, Some(7), NOW)
        .unwrap()
        .expose()
        .to_owned();
    drain(&mut reg);
    let mut taken = BTreeSet::new();
    for n in 1..=6u8 {
        let (e, _) = welcome(&join(&mut reg, n, &token));
        let expected = ipam::ipv4_candidates(&key(n), reg.state().mesh.ipv4)
            .find(|a| !taken.contains(a))
            .unwrap();
        assert_eq!(e.ipv4, expected, "node {n}");
        assert!(taken.insert(e.ipv4), "node {n} got a taken address");
    }
    assert_eq!(taken.len(), 6);
    reg.handle_hello(
        ConnId(7),
        arriving(hello(7, Some(&token)), observed(7)),
        at(NOW),
    );
    let message = assert_rejected_only(&drain(&mut reg), ConnId(7), RejectReason::BadToken);
    assert!(message.contains("no free overlay address"), "{message}");
    assert_eq!(reg.state().tokens["many"].uses, 6);

    // Removing a node and releasing its address frees it for the next one.
    let freed = reg.state().nodes[&key(3)].ipv4;
    reg.remove_node(&key(3), true, NOW);
    drain(&mut reg);
    let (e, _) = welcome(&join(&mut reg, 7, &token));
    assert_eq!(e.ipv4, freed);
}

#[test]
fn an_ipv6_collision_takes_the_next_alternative() {
    let (mut reg, token) = with_token();
    let wanted = ipam::ipv6_for(&key(1), reg.state().mesh.ipv6);
    reg.claims.insert(Key::Address(wanted.into()), key(50));
    reg.state.nodes.insert(
        key(50),
        NodeRecord {
            name: "squatter".into(),
            ipv4: "100.72.0.1".parse().unwrap(),
            ipv6: wanted,
            joined_at: NOW,
            last_seen: NOW,
            candidates: Vec::new(),
            nat: NatMapping::Unknown,
            routes: Vec::new(),
            approved_routes: Vec::new(),
        },
    );
    let (e, _) = welcome(&join(&mut reg, 1, &token));
    assert_ne!(e.ipv6, wanted);
    assert_eq!(
        Some(e.ipv6),
        ipam::ipv6_candidates(&key(1), reg.state().mesh.ipv6).nth(1)
    );
}

#[test]
fn removal_is_persisted_broadcast_and_closes_the_node() {
    let (mut reg, token) = with_token();
    for n in 1..=3 {
        join(&mut reg, n, &token);
    }
    assert!(reg.remove_node(&key(2), false, NOW));
    let cmds = drain(&mut reg);
    assert_eq!(
        cmds,
        vec![
            committed(),
            Command::Send {
                conn: ConnId(2),
                msg: ServerMessage::Rejected {
                    reason: RejectReason::Removed,
                    message: "this node was removed from the mesh".into(),
                },
            },
            Command::Close {
                conn: ConnId(2),
                reason: CloseReason::Removed
            },
            // The others in the order of their keys: key(3) < key(1).
            Command::Send {
                conn: ConnId(3),
                msg: ServerMessage::PeerRemove { public_key: key(2) }
            },
            Command::Send {
                conn: ConnId(1),
                msg: ServerMessage::PeerRemove { public_key: key(2) }
            },
        ]
    );
    assert!(reg.state().removed.contains(&key(2)));
    assert!(!reg.state().nodes.contains_key(&key(2)));
    assert!(!reg.is_online(&key(2)));

    // Its connection no longer counts as admitted.
    reg.handle_candidates(ConnId(2), Vec::new(), at(NOW));
    assert!(drain(&mut reg).is_empty());
    // And it is not in later welcomes.
    reg.handle_hello(ConnId(9), arriving(hello(1, None), observed(1)), at(NOW));
    let (_, peers) = welcome(&drain(&mut reg));
    assert_eq!(
        peers.iter().map(|p| p.public_key).collect::<Vec<_>>(),
        vec![key(3)]
    );
}

#[test]
fn removing_an_unknown_node_does_nothing() {
    let mut reg = registry();
    assert!(!reg.remove_node(&key(1), false, NOW));
    assert!(drain(&mut reg).is_empty());
    assert!(reg.state().removed.is_empty());
}

#[test]
fn a_candidate_change_is_saved_soon_and_announced_to_the_others() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    join(&mut reg, 2, &token);
    let new = Candidate {
        addr: SocketAddr::from(([192, 0, 2, 1], 51820)),
        kind: CandidateKind::Advertised,
        mapped: None,
    };
    reg.handle_candidates(ConnId(1), vec![new], at(NOW + 10));
    let cmds = drain(&mut reg);
    let expected = vec![
        new,
        Candidate {
            addr: observed(1),
            kind: CandidateKind::Observed,
            mapped: None,
        },
    ];
    let upsert = |peer| Command::Send {
        conn: ConnId(2),
        msg: ServerMessage::PeerUpsert { peer },
    };
    let mut entry = node_entry(&key(1), &reg.state().nodes[&key(1)], &RouteTable::default());
    entry.candidates.clone_from(&expected);
    assert_eq!(cmds, vec![Command::PersistSoon, upsert(entry)]);
    assert_eq!(reg.state().nodes[&key(1)].candidates, expected);
    assert_eq!(reg.state().nodes[&key(1)].last_seen, NOW + 10);

    // The same list again changes nothing.
    reg.handle_candidates(ConnId(1), vec![new], at(NOW + 20));
    assert!(drain(&mut reg).is_empty());
}

#[test]
fn a_connection_that_moves_to_a_new_address_moves_its_observed_candidate_and_the_others_hear_it() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    join(&mut reg, 2, &token);
    let local = Candidate {
        addr: SocketAddr::from(([10, 0, 0, 1], 51820)),
        kind: CandidateKind::Local,
        mapped: None,
    };
    reg.handle_candidates(ConnId(1), vec![local], at(NOW + 1));
    drain(&mut reg);

    // The router got a new public address; quinn moved the connection.
    let moved = SocketAddr::from(([203, 0, 113, 99], 51820));
    reg.handle_migrated(ConnId(1), moved, at(NOW + 10));
    let cmds = drain(&mut reg);
    let expected = vec![
        Candidate {
            addr: moved,
            kind: CandidateKind::Observed,
            mapped: None,
        },
        local,
    ];
    assert_eq!(reg.state().nodes[&key(1)].candidates, expected);
    let mut entry = node_entry(&key(1), &reg.state().nodes[&key(1)], &RouteTable::default());
    entry.candidates.clone_from(&expected);
    assert_eq!(
        cmds,
        vec![
            Command::PersistSoon,
            Command::Send {
                conn: ConnId(2),
                msg: ServerMessage::PeerUpsert { peer: entry },
            }
        ]
    );
    assert_eq!(reg.counters().migrations, 1);
    // Its next candidate list keeps the new observed address.
    reg.handle_candidates(ConnId(1), vec![local], at(NOW + 20));
    assert!(drain(&mut reg).is_empty());
    assert_eq!(reg.state().nodes[&key(1)].candidates, expected);

    // The same address again, or a connection never admitted: nothing.
    reg.handle_migrated(ConnId(1), moved, at(NOW + 30));
    reg.handle_migrated(ConnId(9), moved, at(NOW + 30));
    assert!(drain(&mut reg).is_empty());
    assert_eq!(reg.counters().migrations, 1);
}

#[test]
fn a_nat_report_reaches_the_other_nodes_once_and_is_kept() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    join(&mut reg, 2, &token);
    drain(&mut reg);
    reg.handle_nat(ConnId(1), NatMapping::EndpointDependent, at(NOW + 1));
    let cmds = drain(&mut reg);
    assert!(
        cmds.iter().any(|c| matches!(c, Command::PersistSoon)),
        "{cmds:?}"
    );
    let upserts: Vec<_> = cmds
        .iter()
        .filter_map(|c| match c {
            Command::Send {
                conn,
                msg: ServerMessage::PeerUpsert { peer },
            } => Some((*conn, peer.nat)),
            _ => None,
        })
        .collect();
    assert_eq!(upserts, vec![(ConnId(2), NatMapping::EndpointDependent)]);
    reg.handle_nat(ConnId(1), NatMapping::EndpointDependent, at(NOW + 2));
    assert!(
        drain(&mut reg).is_empty(),
        "the same report again changes nothing"
    );
    reg.handle_nat(ConnId(42), NatMapping::None, at(NOW + 3));
    assert!(
        drain(&mut reg).is_empty(),
        "a connection that is not admitted is ignored"
    );
    let (_, peers) = welcome(&join(&mut reg, 3, &token));
    assert_eq!(
        peers[0].nat,
        NatMapping::EndpointDependent,
        "a later joiner learns it too"
    );
}

#[test]
fn candidates_from_a_connection_that_is_not_admitted_are_ignored() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    let before = reg.state().clone();
    let c = Candidate {
        addr: SocketAddr::from(([192, 0, 2, 1], 1)),
        kind: CandidateKind::Local,
        mapped: None,
    };
    reg.handle_candidates(ConnId(42), vec![c], at(NOW));
    reg.handle_hello(
        ConnId(43),
        arriving(hello(9, Some("bad.token")), observed(9)),
        at(NOW),
    );
    drain(&mut reg);
    reg.handle_candidates(ConnId(43), vec![c], at(NOW));
    assert!(drain(&mut reg).is_empty());
    assert_eq!(reg.state(), &before);
}

#[test]
fn too_many_candidates_from_an_admitted_node_are_ignored() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    let before = reg.state().clone();
    let many = (0..=MAX_CANDIDATES as u16)
        .map(|p| Candidate {
            addr: SocketAddr::from(([10, 0, 0, 1], 2000 + p)),
            kind: CandidateKind::Local,
            mapped: None,
        })
        .collect();
    reg.handle_candidates(ConnId(1), many, at(NOW));
    assert!(drain(&mut reg).is_empty());
    assert_eq!(reg.state(), &before);
}

#[test]
fn candidates_are_ordered_advertised_observed_local_without_duplicates() {
    let obs = SocketAddr::from(([203, 0, 113, 5], 40000));
    let local = |a: [u8; 4], p| Candidate {
        addr: SocketAddr::from((a, p)),
        kind: CandidateKind::Local,
        mapped: None,
    };
    let announced = vec![
        local([10, 0, 0, 1], 51820),
        Candidate {
            addr: SocketAddr::from(([203, 0, 113, 9], 51820)),
            kind: CandidateKind::Advertised,
            mapped: None,
        },
        local([203, 0, 113, 5], 40000), // same as observed: kept once, as observed
        // Not the node's to say:
        Candidate {
            addr: SocketAddr::from(([1, 2, 3, 4], 5)),
            kind: CandidateKind::Observed,
            mapped: None,
        },
        local([10, 0, 0, 1], 51820),
        local([0, 0, 0, 0], 51820),
        local([10, 0, 0, 2], 0),
        local([172, 16, 0, 1], 51820),
    ];
    let merged = registry().merge_candidates(&announced, obs);
    assert_eq!(
        merged,
        vec![
            Candidate {
                addr: SocketAddr::from(([203, 0, 113, 9], 51820)),
                kind: CandidateKind::Advertised,
                mapped: None
            },
            Candidate {
                addr: obs,
                kind: CandidateKind::Observed,
                mapped: None
            },
            local([10, 0, 0, 1], 51820),
            local([172, 16, 0, 1], 51820),
        ]
    );
}

#[test]
fn an_ipv4_mapped_observed_address_is_reported_as_ipv4() {
    let (mut reg, token) = with_token();
    let mapped: SocketAddr = "[::ffff:198.51.100.7]:4000".parse().unwrap();
    reg.handle_hello(ConnId(1), arriving(hello(1, Some(&token)), mapped), at(NOW));
    let cmds = drain(&mut reg);
    let obs = cmds.iter().find_map(|c| match c {
        Command::Send {
            msg: ServerMessage::Welcome { observed, .. },
            ..
        } => Some(*observed),
        _ => None,
    });
    assert_eq!(obs, Some(SocketAddr::from(([198, 51, 100, 7], 4000))));
}

#[test]
fn a_second_connection_of_the_same_node_supersedes_the_first() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    join(&mut reg, 2, &token);
    reg.handle_hello(
        ConnId(11),
        arriving(hello(1, None), observed(1)),
        at(NOW + 1),
    );
    let cmds = drain(&mut reg);
    assert_eq!(
        cmds[0],
        Command::Close {
            conn: ConnId(1),
            reason: CloseReason::Superseded
        }
    );
    assert!(cmds.iter().any(|c| matches!(
        c,
        Command::Send {
            conn: ConnId(11),
            msg: ServerMessage::Welcome { .. }
        }
    )));
    // Back with nothing new: its peers keep the entry they have.
    assert!(!cmds.iter().any(|c| matches!(
        c,
        Command::Send {
            conn: ConnId(2),
            msg: ServerMessage::PeerUpsert { .. }
        }
    )));
    assert!(!cmds.iter().any(|c| matches!(
        c,
        Command::Send {
            conn: ConnId(1),
            ..
        }
    )));

    // The old connection's end does not take the node offline.
    reg.handle_disconnect(ConnId(1), at(NOW + 2));
    assert!(drain(&mut reg).is_empty());
    assert!(reg.is_online(&key(1)));
    // And it no longer speaks for the node.
    reg.handle_candidates(ConnId(1), Vec::new(), at(NOW + 3));
    assert!(drain(&mut reg).is_empty());
}

#[test]
fn a_disconnect_marks_the_node_offline_without_a_broadcast() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    join(&mut reg, 2, &token);
    reg.handle_disconnect(ConnId(1), at(NOW + 30));
    assert_eq!(
        drain(&mut reg),
        vec![Command::PersistSoon],
        "presence may be saved late"
    );
    assert!(!reg.is_online(&key(1)));
    assert_eq!(reg.state().nodes[&key(1)].last_seen, NOW + 30);
    let listed: Vec<_> = reg
        .nodes()
        .into_iter()
        .map(|n| (n.public_key, n.online))
        .collect();
    assert_eq!(listed, vec![(key(1), false), (key(2), true)]);
    // A rejected connection's end is nothing.
    reg.handle_disconnect(ConnId(77), at(NOW + 31));
    assert!(drain(&mut reg).is_empty());
}

#[test]
fn a_second_hello_on_an_admitted_connection_is_ignored() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    reg.handle_hello(
        ConnId(1),
        arriving(hello(2, Some(&token)), observed(2)),
        at(NOW),
    );
    assert!(drain(&mut reg).is_empty());
    assert!(!reg.state().nodes.contains_key(&key(2)));
}

#[test]
fn only_the_hash_of_a_token_secret_is_stored() {
    let mut reg = registry();
    let token = reg
        .create_token([0xab; 32], "k8s-join".into(), DAY, Some(2), NOW)
        .unwrap()
        .expose()
        .to_owned();
    assert_eq!(drain(&mut reg), vec![committed()]);
    let (id, secret) = token.split_once('.').unwrap();
    assert_eq!(id, "k8s-join");
    assert_eq!(URL_SAFE_NO_PAD.decode(secret).unwrap(), vec![0xab; 32]);
    let json = serde_json::to_string(reg.state()).unwrap();
    assert!(!json.contains(secret));
    let record = &reg.state().tokens["k8s-join"];
    assert_eq!(record.secret_sha256, sha256_hex(&[0xab; 32]));
    assert_eq!((record.created_at, record.expires_at), (NOW, NOW + DAY));
    assert_eq!(record.status(NOW), TokenStatus::Usable);
}

#[test]
fn token_ids_must_be_valid_unique_and_tokens_usable() {
    let mut reg = registry();
    for bad in ["", "has.dot", "space d", &"x".repeat(MAX_TOKEN_ID + 1)] {
        assert_eq!(
            reg.create_token([1; 32], bad.into(), DAY, None, NOW),
            Err(RegistryError::InvalidTokenId { id: bad.into() })
        );
    }
    reg.create_token([1; 32], "dup".into(), DAY, None, NOW)
        .unwrap();
    drain(&mut reg);
    assert_eq!(
        reg.create_token([2; 32], "dup".into(), DAY, None, NOW),
        Err(RegistryError::DuplicateTokenId { id: "dup".into() })
    );
    assert_eq!(
        reg.create_token([2; 32], "zero".into(), DAY, Some(0), NOW),
        Err(RegistryError::ZeroUses)
    );
    assert_eq!(reg.tokens().count(), 1);
}

#[test]
fn revoking_a_token_is_persisted_once_and_unknown_ids_are_reported() {
    let (mut reg, _) = with_token();
    assert!(reg.revoke_token("abc123"));
    assert_eq!(drain(&mut reg), vec![committed()]);
    assert!(reg.revoke_token("abc123"));
    assert!(drain(&mut reg).is_empty());
    assert!(!reg.revoke_token("nosuch"));
    assert_eq!(
        reg.tokens().next().map(|t| t.status(NOW)),
        Some(TokenStatus::Revoked)
    );
}

#[test]
fn state_serializes_public_keys_as_json_object_keys() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    reg.remove_node(&key(1), false, NOW);
    drain(&mut reg);
    join(&mut reg, 2, &token);
    let value = serde_json::to_value(reg.state()).unwrap();
    assert!(value["nodes"].get(key(2).to_string()).is_some(), "{value}");
    assert_eq!(value["removed"][0], serde_json::json!(key(1).to_string()));
    assert!(value["tokens"]["abc123"].is_object());
}

#[test]
fn close_codes_are_distinct() {
    let all = [
        CloseReason::Superseded,
        CloseReason::Removed,
        CloseReason::Rejected(RejectReason::Version),
        CloseReason::Rejected(RejectReason::BadProof),
        CloseReason::Rejected(RejectReason::BadToken),
        CloseReason::Rejected(RejectReason::Removed),
        CloseReason::Rejected(RejectReason::BadHello),
        CloseReason::Flooding,
    ];
    let codes: BTreeSet<_> = all.iter().map(|r| r.code()).collect();
    assert_eq!(codes.len(), all.len());
}

// -----------------------------------------------------------------------
// What a member can make the rendezvous do
// -----------------------------------------------------------------------

/// The default limits, except that nothing refills within a test: each
/// budget is exactly its burst.
fn no_refill() -> Limits {
    let hour = std::time::Duration::from_secs(3600);
    let d = Limits::default();
    Limits {
        candidates: Rate::new(d.candidates.burst, hour),
        nat: Rate::new(d.nat.burst, hour),
        punch: Rate::new(d.punch.burst, hour),
        punch_pair: Rate::new(d.punch_pair.burst, hour),
        paths: Rate::new(d.paths.burst, hour),
        tolerance: Rate::new(d.tolerance.burst, hour),
    }
}

fn with_limits(limits: Limits) -> (Registry, String) {
    let mut reg =
        Registry::with_limits(RegistryState::new(mesh("100.72.0.0/16")), server(), limits);
    let token = reg
        .create_token([7; 32], "abc123".into(), DAY, None, NOW)
        .unwrap()
        .expose()
        .to_owned();
    drain(&mut reg);
    (reg, token)
}

fn local(port: u16) -> Candidate {
    Candidate {
        addr: SocketAddr::from(([192, 0, 2, 1], port)),
        kind: CandidateKind::Local,
        mapped: None,
    }
}

#[test]
fn a_candidate_storm_is_held_to_its_rate_and_the_flooder_is_closed() {
    let limits = no_refill();
    let (mut reg, token) = with_limits(limits);
    join(&mut reg, 1, &token);
    join(&mut reg, 2, &token);
    let (mut saves, mut upserts, mut closes, mut handled) = (0, 0, Vec::new(), 0);
    for i in 0..2_000u16 {
        // Each list differs from the one before: every one is a change.
        reg.handle_candidates(ConnId(1), vec![local(1000 + i % 2)], at(NOW));
        handled += 1;
        for cmd in drain(&mut reg) {
            match cmd {
                Command::Commit { .. } | Command::PersistSoon => saves += 1,
                Command::Send {
                    conn: ConnId(2),
                    msg: ServerMessage::PeerUpsert { .. },
                } => upserts += 1,
                Command::Close { conn, reason } => closes.push((conn, reason)),
                other => panic!("unexpected {other:?}"),
            }
        }
        if !closes.is_empty() {
            break;
        }
    }
    let burst = limits.candidates.burst as usize;
    // One save per message within the rate, and one for going offline.
    assert_eq!(
        (saves, upserts),
        (burst + 1, burst),
        "only the messages within the rate are saved and sent"
    );
    assert_eq!(closes, vec![(ConnId(1), CloseReason::Flooding)]);
    assert_eq!(
        handled,
        burst + limits.tolerance.burst as usize + 1,
        "closed once past the tolerance"
    );
    assert!(!reg.is_online(&key(1)), "its connection is gone");
    reg.handle_candidates(ConnId(1), vec![local(7)], at(NOW));
    assert!(drain(&mut reg).is_empty(), "and speaks for no one any more");
    let over: Vec<_> = reg.counters().over_rate().collect();
    let dropped = (limits.tolerance.burst + 1).into();
    assert_eq!(
        over,
        vec![
            (MessageKind::Candidates, dropped),
            (MessageKind::Nat, 0),
            (MessageKind::Punch, 0),
            (MessageKind::Paths, 0)
        ]
    );
    assert_eq!(reg.counters().closed_flooding, 1);
}

#[test]
fn messages_over_the_rate_are_dropped_and_the_budget_refills() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    join(&mut reg, 2, &token);
    let rate = Limits::default().nat;
    let mappings = [
        NatMapping::EndpointDependent,
        NatMapping::EndpointIndependent,
    ];
    // Each in a tick of its own (in one tick, the latest would stand for
    // them all): every one within the rate is sent.
    let mut sent = 0;
    for i in 0..rate.burst {
        reg.handle_nat(ConnId(1), mappings[i as usize % 2], at(NOW));
        sent += drain(&mut reg)
            .iter()
            .filter(|c| matches!(c, Command::Send { .. }))
            .count();
    }
    assert_eq!(sent, rate.burst as usize);
    reg.handle_nat(ConnId(1), NatMapping::None, at(NOW));
    assert!(drain(&mut reg).is_empty(), "over the rate: dropped");
    assert_eq!(
        reg.state().nodes[&key(1)].nat,
        mappings[(rate.burst as usize - 1) % 2]
    );
    reg.handle_nat(ConnId(1), NatMapping::None, at(NOW + rate.every.as_secs()));
    assert!(
        !drain(&mut reg).is_empty(),
        "one more once the interval passed"
    );
    assert_eq!(reg.state().nodes[&key(1)].nat, NatMapping::None);
    assert!(
        reg.is_online(&key(1)),
        "a few over the rate do not close the connection"
    );
}

#[test]
fn punches_are_passed_on_at_the_pair_rate_and_a_punch_storm_is_closed() {
    let limits = no_refill();
    let (mut reg, token) = with_limits(limits);
    for n in 1..=3 {
        join(&mut reg, n, &token);
    }
    let punch = |to: u64, from: u8| Command::Send {
        conn: ConnId(to),
        msg: ServerMessage::Punch { peer: key(from) },
    };
    for _ in 0..5 {
        reg.handle_punch(ConnId(1), &key(2), at(NOW));
    }
    let pair = limits.punch_pair.burst as usize;
    assert_eq!(
        drain(&mut reg),
        vec![punch(2, 1); pair],
        "the pair's burst, then nothing"
    );
    assert_eq!(reg.counters().punch_pair_limited, 5 - pair as u64);
    reg.handle_punch(ConnId(1), &key(3), at(NOW));
    assert_eq!(
        drain(&mut reg),
        vec![punch(3, 1)],
        "another target has a budget of its own"
    );
    reg.handle_punch(ConnId(2), &key(1), at(NOW));
    assert_eq!(
        drain(&mut reg),
        vec![punch(1, 2)],
        "and so has another requester"
    );

    // A storm of 2,000 punches at one target: still the pair's burst
    // (spent above), and the connection closed once past its budget.
    let mut forwarded = 0;
    let mut closed = false;
    for _ in 0..2_000 {
        reg.handle_punch(ConnId(1), &key(2), at(NOW));
        for cmd in drain(&mut reg) {
            match cmd {
                Command::Send {
                    msg: ServerMessage::Punch { .. },
                    ..
                } => forwarded += 1,
                Command::Close {
                    conn: ConnId(1),
                    reason: CloseReason::Flooding,
                } => closed = true,
                Command::PersistSoon => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(forwarded, 0);
    assert!(closed, "a punch storm closes the connection");
}

#[test]
fn the_pair_rate_lets_a_node_punch_every_ten_seconds() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    join(&mut reg, 2, &token);
    for t in (0..120).step_by(10) {
        reg.handle_punch(ConnId(1), &key(2), at(NOW + t));
        assert_eq!(drain(&mut reg).len(), 1, "punch at +{t}s");
    }
    assert_eq!(reg.counters().punch_pair_limited, 0);
}

#[test]
fn candidates_nobody_can_use_are_dropped_and_counted() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    let mesh_v4 = SocketAddr::from((reg.state().mesh.ipv4.network(), 51820));
    let mesh_v6 = SocketAddr::new(IpAddr::V6(reg.state().mesh.ipv6.network()), 51820);
    let announced: Vec<Candidate> = [
        "127.0.0.1:51820",
        "[::1]:51820",
        "169.254.10.1:51820",
        "[fe80::1]:51820",
        "0.0.0.0:51820",
        "[::]:51820",
        "224.0.0.1:51820",
        "[ff02::1]:51820",
        "255.255.255.255:51820",
        "[::ffff:127.0.0.1]:51820",
        "192.0.2.7:0",
        &mesh_v4.to_string(),
        &mesh_v6.to_string(),
        "10.1.2.3:51820",
        "[2001:db8::7]:51820",
    ]
    .iter()
    .map(|a| Candidate {
        addr: a.parse().unwrap(),
        kind: CandidateKind::Local,
        mapped: None,
    })
    .collect();
    reg.handle_candidates(ConnId(1), announced, at(NOW));
    drain(&mut reg);
    let kept: Vec<String> = reg.state().nodes[&key(1)]
        .candidates
        .iter()
        .map(|c| c.addr.to_string())
        .collect();
    assert_eq!(
        kept,
        vec![
            observed(1).to_string(),
            "10.1.2.3:51820".into(),
            "[2001:db8::7]:51820".into()
        ]
    );
    let refused: Vec<(&str, u64)> = reg
        .counters()
        .candidates_refused()
        .map(|(r, n)| (r.as_str(), n))
        .collect();
    assert_eq!(
        refused,
        vec![
            ("port_zero", 1),
            ("unspecified", 2),
            ("loopback", 3),
            ("link_local", 2),
            ("multicast", 2),
            ("broadcast", 1),
            ("mesh_prefix", 2),
            ("claimed_observed", 0),
        ]
    );
}

#[test]
fn names_are_made_dns_labels() {
    for (asked, label) in [
        ("node-1", "node-1"),
        ("Worker_01.example.com", "worker-01"),
        ("--a  b--", "a-b"),
        ("日本", "node"),
        (".hidden", "hidden"),
        ("...", "node"),
    ] {
        assert_eq!(dns_label(asked), label, "{asked:?}");
    }
    let long = "x".repeat(300);
    assert_eq!(dns_label(&long).len(), MAX_LABEL);
    assert!(
        is_dns_label("node-2") && !is_dns_label("Node") && !is_dns_label("-a") && !is_dns_label("")
    );
}

#[test]
fn a_taken_name_gets_a_suffix_and_the_welcome_says_which() {
    let (mut reg, token) = with_token();
    let named = |reg: &mut Registry, n: u8, name: &str| {
        let mut h = hello(n, Some(&token));
        h.name = name.into();
        reg.handle_hello(ConnId(n.into()), arriving(h.clone(), observed(n)), at(NOW));
        welcome(&drain(reg)).0.name
    };
    assert_eq!(named(&mut reg, 1, "node-a"), "node-a");
    assert_eq!(named(&mut reg, 2, "node-a"), "node-a-2");
    assert_eq!(named(&mut reg, 3, "NODE-A.lab"), "node-a-3");
    assert_eq!(named(&mut reg, 4, &"y".repeat(70)), "y".repeat(MAX_LABEL));
    assert_eq!(
        named(&mut reg, 5, &"y".repeat(70)),
        format!("{}-2", "y".repeat(MAX_LABEL - 2))
    );
    let names: BTreeSet<String> = reg.nodes().into_iter().map(|n| n.name).collect();
    assert_eq!(names.len(), 5, "{names:?}");
}

#[test]
fn a_readmitted_node_keeps_its_bound_name_and_only_the_operator_renames() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    join(&mut reg, 2, &token);
    let mut claim = hello(1, None);
    claim.name = "node-2".into();
    reg.handle_hello(
        ConnId(11),
        arriving(claim.clone(), observed(1)),
        at(NOW + 1),
    );
    assert_eq!(
        welcome(&drain(&mut reg)).0.name,
        "node-1",
        "a hello cannot take another's name"
    );

    assert_eq!(
        reg.rename_node(&key(1), "node-2"),
        Err(RegistryError::NameTaken {
            name: "node-2".into()
        })
    );
    assert!(matches!(
        reg.rename_node(&key(1), "Bad Name"),
        Err(RegistryError::InvalidName { .. })
    ));
    assert!(
        drain(&mut reg).is_empty(),
        "a refused rename changes nothing"
    );
    reg.rename_node(&key(1), "db-1").unwrap();
    let cmds = drain(&mut reg);
    assert_eq!(cmds[0], committed());
    assert!(
        matches!(&cmds[1..], [Command::Send { conn: ConnId(2), msg: ServerMessage::PeerUpsert { peer } }]
        if peer.name == "db-1"),
        "{cmds:?}"
    );

    // The operator's rename wins over the next hello too.
    reg.handle_hello(
        ConnId(12),
        arriving(hello(1, None), observed(1)),
        at(NOW + 2),
    );
    assert_eq!(welcome(&drain(&mut reg)).0.name, "db-1");
}

#[test]
fn a_state_with_shared_or_odd_names_loads_with_unique_labels() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    join(&mut reg, 2, &token);
    join(&mut reg, 3, &token);
    let mut state = reg.state().clone();
    // As v0.1.0 kept them: whatever each hello said.
    for (n, name) in [(1, "Node-A"), (2, "node-a"), (3, "node-a.lab")] {
        state.nodes.get_mut(&key(n)).unwrap().name = name.into();
    }
    assert!(state.migrate_names(), "names changed, to be saved");
    let mut loaded = Registry::new(state, server());
    assert!(drain(&mut loaded).is_empty());
    let names: Vec<String> = loaded.nodes().into_iter().map(|n| n.name).collect();
    assert_eq!(
        names,
        vec!["node-a", "node-a-2", "node-a-3"],
        "in key order"
    );
    let mut again = Registry::new(loaded.state().clone(), server());
    assert!(
        drain(&mut again).is_empty(),
        "a second load changes nothing"
    );
}

/// A key whose first address choice in `mesh` is `wanted`, as a token
/// holder would grind one.
fn ground_key(wanted: Ipv4Addr, mesh: ipnet::Ipv4Net) -> PrivateKey {
    (0..=u16::MAX)
        .map(|i| {
            let mut bytes = [0xee; 32];
            bytes[..2].copy_from_slice(&i.to_be_bytes());
            PrivateKey::from_bytes(bytes)
        })
        .find(|k| ipam::ipv4_candidates(&k.public_key(), mesh).next() == Some(wanted))
        .expect("a /24 is quick to grind")
}

#[test]
fn a_removed_nodes_addresses_are_quarantined_until_the_operator_releases_them() {
    let mut reg = Registry::new(RegistryState::new(mesh("10.9.8.0/24")), server());
    let token = reg
        .create_token([8; 32], "many".into(), DAY, None, NOW)
        .unwrap()
        .expose()
        .to_owned();
    drain(&mut reg);
    let (victim, _) = welcome(&join(&mut reg, 1, &token));
    assert!(reg.remove_node(&key(1), false, NOW + 5));
    drain(&mut reg);
    assert_eq!(
        reg.quarantined(),
        &[Quarantined {
            public_key: key(1),
            name: "node-1".into(),
            ipv4: victim.ipv4,
            ipv6: victim.ipv6,
            removed_at: NOW + 5
        }]
    );

    let grinder = ground_key(victim.ipv4, reg.state().mesh.ipv4);
    let h = hello_as(&grinder, "node-0", Some(&token));
    reg.handle_hello(ConnId(20), arriving(h.clone(), observed(20)), at(NOW + 6));
    let (got, _) = welcome(&drain(&mut reg));
    assert_ne!(
        got.ipv4, victim.ipv4,
        "a ground key does not get the removed node's address"
    );
    assert_ne!(got.ipv6, victim.ipv6);

    assert_eq!(
        reg.release_address(IpAddr::V4(got.ipv4)),
        Err(RegistryError::NotQuarantined {
            address: IpAddr::V4(got.ipv4)
        })
    );
    let released = reg.release_address(IpAddr::V6(victim.ipv6)).unwrap();
    assert_eq!(released.ipv4, victim.ipv4, "either address releases both");
    assert_eq!(drain(&mut reg), vec![committed()]);
    assert!(reg.quarantined().is_empty());
    reg.remove_node(&grinder.public_key(), true, NOW + 7);
    drain(&mut reg);
    assert!(
        reg.quarantined().is_empty(),
        "removed with release: nothing held"
    );
    let h = hello_as(&grinder, "again", Some(&token));
    reg.handle_hello(ConnId(21), arriving(h.clone(), observed(20)), at(NOW + 8));
    assert_rejected_only(&drain(&mut reg), ConnId(21), RejectReason::Removed);
}

#[test]
fn a_strangers_token_id_is_logged_bounded() {
    let huge = "x".repeat(15_000);
    let (reg, _) = with_token();
    let refusal = reg
        .check_token(Some(&format!("{huge}.secret")), NOW)
        .err()
        .unwrap();
    assert!(refusal.cause.len() < 150, "{}", refusal.cause);
}

// --- several servers on one store -------------------------------------------

/// Two servers' registries over one store, as two `mesh-rendezvous` on one
/// etcd: each commits to it and follows what the other wrote.
struct TwoServers {
    kv: crate::rendezvous::store::kv::MemoryKv,
    servers: [Registry; 2],
    /// The last revision each server has followed.
    seen: [Revision; 2],
}

impl TwoServers {
    fn new(state: RegistryState) -> Self {
        let entries = records::records(&state)
            .into_iter()
            .map(|(key, value)| (key.path(), records::encode(&value)));
        let kv = crate::rendezvous::store::kv::MemoryKv::with_entries(entries);
        let seen = kv.revision();
        let mut servers = [
            Registry::new(state.clone(), server()),
            Registry::new(state, server()),
        ];
        servers[0].set_server_name("rv-a");
        servers[1].set_server_name("rv-b");
        Self {
            kv,
            servers,
            seen: [seen, seen],
        }
    }

    fn server(&mut self, i: usize) -> &mut Registry {
        &mut self.servers[i]
    }

    /// Server `i`'s commands until it has none, its commits made to the
    /// store (a lost race answered with the store's current records).
    fn run(&mut self, i: usize) -> Vec<Command> {
        let lease = crate::rendezvous::store::kv::LeaseId(i as i64);
        let mut out = Vec::new();
        while let Some(command) = next_command(&mut self.servers[i]) {
            match command {
                Command::PeerDeltas { members, deltas } => {
                    expand_deltas(members, &deltas, &mut out)
                }
                Command::Commit { id, txn } => {
                    let outcome = self.kv.txn(&txn, lease);
                    let fresh = match outcome {
                        Outcome::Committed { .. } => Vec::new(),
                        _ => self.kv.current(txn.keys()),
                    };
                    self.servers[i].handle_outcome(id, outcome, &fresh);
                    out.push(committed());
                }
                other => out.push(other),
            }
        }
        out
    }

    /// Server `i` follows the store's changes since it last did.
    fn follow(&mut self, i: usize) -> Vec<Command> {
        let events = self.kv.events_after(self.seen[i]).to_vec();
        self.seen[i] = self.kv.revision();
        self.servers[i].handle_store_events(&events);
        self.run(i)
    }
}

fn welcomed(cmds: &[Command]) -> Vec<NodeEntry> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Send {
                msg: ServerMessage::Welcome { node, .. },
                ..
            } => Some(node.clone()),
            _ => None,
        })
        .collect()
}

fn rejected(cmds: &[Command]) -> Vec<RejectReason> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Send {
                msg: ServerMessage::Rejected { reason, .. },
                ..
            } => Some(*reason),
            _ => None,
        })
        .collect()
}

/// A mesh with one token, as both servers load it.
fn shared_mesh(cidr: &str, max_uses: Option<u32>) -> (TwoServers, String) {
    let mut reg = Registry::new(RegistryState::new(mesh(cidr)), server());
    let token = reg
        .create_token([7; 32], "shared".into(), DAY, max_uses, NOW)
        .unwrap()
        .expose()
        .to_owned();
    drain(&mut reg);
    (TwoServers::new(reg.state().clone()), token)
}

#[test]
fn a_single_use_token_presented_at_two_servers_at_once_admits_exactly_one() {
    let (mut mesh, token) = shared_mesh("100.72.0.0/16", Some(1));
    // Both decide before either commits: each sees the token unused.
    for (i, n) in [(0, 1u8), (1, 2u8)] {
        mesh.server(i).handle_hello(
            ConnId(n.into()),
            arriving(hello(n, Some(&token)), observed(n)),
            at(NOW),
        );
    }
    let first = mesh.run(0);
    let second = mesh.run(1);
    assert_eq!(welcomed(&first).len(), 1, "{first:?}");
    assert!(welcomed(&second).is_empty(), "{second:?}");
    assert_eq!(rejected(&second), [RejectReason::BadToken]);
    // The loser's replica learnt the token is used up, not guessed it,
    // and learns the winner from the store.
    assert_eq!(mesh.server(1).state().tokens["shared"].uses, 1);
    mesh.follow(1);
    assert_eq!(mesh.server(1).state().nodes.len(), 1);
}

#[test]
fn concurrent_joins_at_two_servers_never_share_an_address_or_a_name() {
    // Six host addresses, twelve nodes all called "node": every address
    // and name is raced for.
    let (mut mesh, token) = shared_mesh("100.72.0.0/29", None);
    let mut welcomes = Vec::new();
    let mut full = 0;
    // Nodes told to retry (a lost race) come back on a new connection, as
    // meshd does, at the other server.
    let mut pending: Vec<u8> = (1..=12).collect();
    for round in 0..10u64 {
        for &n in &pending {
            let i = usize::from(n % 2) ^ (round as usize % 2);
            let hello = Hello {
                name: "node".into(),
                ..hello(n, Some(&token))
            };
            let conn = ConnId(round * 100 + u64::from(n));
            mesh.server(i)
                .handle_hello(conn, arriving(hello, observed(n)), at(NOW));
        }
        let mut cmds = mesh.run(0);
        cmds.extend(mesh.run(1));
        mesh.follow(0);
        mesh.follow(1);
        welcomes.extend(welcomed(&cmds));
        full += rejected(&cmds).len();
        pending.retain(|&n| {
            let done = |c: &Command| match c {
                Command::Send { conn, msg } => {
                    conn.0 % 100 == u64::from(n)
                        && matches!(
                            msg,
                            ServerMessage::Welcome { .. } | ServerMessage::Rejected { .. }
                        )
                }
                _ => false,
            };
            !cmds.iter().any(done)
        });
        if pending.is_empty() {
            break;
        }
    }
    assert!(pending.is_empty(), "{pending:?} never decided");
    let addresses: HashSet<Ipv4Addr> = welcomes.iter().map(|e| e.ipv4).collect();
    let names: HashSet<&str> = welcomes.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(welcomes.len(), 6, "every address taken once: {welcomes:?}");
    assert_eq!(addresses.len(), 6);
    assert_eq!(names.len(), 6);
    assert_eq!(full, 6, "the rest are told the mesh is full");
    for i in 0..2 {
        let held: HashSet<Ipv4Addr> = mesh.server(i).nodes().iter().map(|n| n.ipv4).collect();
        assert_eq!(held, addresses, "server {i} knows every node");
    }
}

#[test]
fn a_join_at_one_server_reaches_the_nodes_of_the_other() {
    let (mut mesh, token) = shared_mesh("100.72.0.0/16", None);
    mesh.server(1).handle_hello(
        ConnId(2),
        arriving(hello(2, Some(&token)), observed(2)),
        at(NOW),
    );
    mesh.run(1);
    mesh.follow(0);
    mesh.server(0).handle_hello(
        ConnId(1),
        arriving(hello(1, Some(&token)), observed(1)),
        at(NOW),
    );
    let (_, peers) = welcome(&mesh.run(0));
    assert_eq!(peers.len(), 1, "node 1 learns node 2 from the store");
    let told = mesh.follow(1);
    assert!(
        told.iter().any(|c| matches!(c,
            Command::Send { conn: ConnId(2), msg: ServerMessage::PeerUpsert { peer } }
            if peer.public_key == key(1))),
        "node 2, on the other server, hears of node 1: {told:?}"
    );
    // Following again changes nothing: each change is told once.
    assert!(mesh.follow(1).is_empty());
    assert!(mesh.follow(0).is_empty());
}

#[test]
fn a_node_removed_at_one_server_is_cut_off_at_the_other() {
    let (mut mesh, token) = shared_mesh("100.72.0.0/16", None);
    for (i, n) in [(0, 1u8), (1, 2u8)] {
        mesh.server(i).handle_hello(
            ConnId(n.into()),
            arriving(hello(n, Some(&token)), observed(n)),
            at(NOW),
        );
        mesh.run(i);
        mesh.follow(0);
        mesh.follow(1);
    }
    assert!(mesh.server(0).remove_node(&key(2), false, NOW));
    mesh.run(0);
    let told = mesh.follow(1);
    assert!(
        told.contains(&Command::Close {
            conn: ConnId(2),
            reason: CloseReason::Removed
        }),
        "{told:?}"
    );
    assert!(!mesh.server(1).is_online(&key(2)));
    assert_eq!(mesh.server(1).quarantined().len(), 1);
    // Its key is refused at either server from now on.
    mesh.server(1).handle_hello(
        ConnId(9),
        arriving(hello(2, Some(&token)), observed(2)),
        at(NOW),
    );
    assert_eq!(rejected(&mesh.run(1)), [RejectReason::Removed]);
}

#[test]
fn a_rename_racing_for_a_name_at_two_servers_is_taken_once() {
    let (mut mesh, token) = shared_mesh("100.72.0.0/16", None);
    for (i, n) in [(0, 1u8), (1, 2u8)] {
        mesh.server(i).handle_hello(
            ConnId(n.into()),
            arriving(hello(n, Some(&token)), observed(n)),
            at(NOW),
        );
        mesh.run(i);
        mesh.follow(0);
        mesh.follow(1);
    }
    mesh.server(0).rename_node(&key(1), "db").unwrap();
    mesh.server(1).rename_node(&key(2), "db").unwrap();
    mesh.run(0);
    mesh.run(1);
    mesh.follow(0);
    mesh.follow(1);
    let names = |reg: &Registry| -> Vec<(PublicKey, String)> {
        reg.nodes()
            .into_iter()
            .map(|n| (n.public_key, n.name))
            .collect()
    };
    let seen = names(mesh.server(0));
    assert_eq!(
        seen.iter().filter(|(_, n)| n == "db").count(),
        1,
        "{seen:?}"
    );
    assert_eq!(seen, names(mesh.server(1)), "both servers agree");
}

#[test]
fn every_server_sees_which_server_a_node_is_on_and_a_dead_servers_nodes_go_offline() {
    let (mut mesh, token) = shared_mesh("100.72.0.0/16", None);
    let on = |mesh: &mut TwoServers, i: usize, n: u8| {
        let node = mesh
            .server(i)
            .nodes()
            .into_iter()
            .find(|s| s.public_key == key(n))
            .unwrap();
        (node.online, node.server)
    };
    mesh.server(0).handle_hello(
        ConnId(1),
        arriving(hello(1, Some(&token)), observed(1)),
        at(NOW),
    );
    mesh.run(0);
    mesh.follow(1);
    assert_eq!(on(&mut mesh, 1, 1), (true, Some("rv-a".into())));
    assert_eq!(on(&mut mesh, 0, 1), (true, Some("rv-a".into())));

    // It moves: connected to rv-b, the stale connection at rv-a is closed.
    mesh.server(1).handle_hello(
        ConnId(11),
        arriving(hello(1, None), observed(1)),
        at(NOW + 1),
    );
    mesh.run(1);
    let told = mesh.follow(0);
    assert!(
        told.contains(&Command::Close {
            conn: ConnId(1),
            reason: CloseReason::Superseded
        }),
        "{told:?}"
    );
    // rv-a's disconnect does not take the node's presence at rv-b away.
    mesh.server(0).handle_disconnect(ConnId(1), at(NOW + 2));
    mesh.run(0);
    mesh.follow(1);
    mesh.follow(0);
    assert_eq!(on(&mut mesh, 0, 1), (true, Some("rv-b".into())));
    assert_eq!(on(&mut mesh, 1, 1), (true, Some("rv-b".into())));

    // rv-b dies: its lease ends, and its nodes go offline everywhere else.
    mesh.kv.expire(crate::rendezvous::store::kv::LeaseId(1));
    mesh.follow(0);
    assert_eq!(on(&mut mesh, 0, 1), (false, None));
}

#[test]
fn a_welcome_names_every_running_server_this_one_first_and_a_dead_one_goes() {
    let (mut mesh, token) = shared_mesh("100.72.0.0/16", None);
    mesh.server(0).announce_server("rv-a.example:7443", NOW);
    mesh.server(1).announce_server("rv-b.example:7443", NOW);
    mesh.run(0);
    mesh.run(1);
    mesh.follow(0);
    mesh.follow(1);
    assert_eq!(
        mesh.server(1).servers(),
        ["rv-b.example:7443", "rv-a.example:7443"]
    );
    mesh.server(0).handle_hello(
        ConnId(1),
        arriving(hello(1, Some(&token)), observed(1)),
        at(NOW),
    );
    let welcome = mesh.run(0);
    let servers = welcome.iter().find_map(|c| match c {
        Command::Send {
            msg: ServerMessage::Welcome { servers, .. },
            ..
        } => Some(servers.clone()),
        _ => None,
    });
    assert_eq!(servers.unwrap(), ["rv-a.example:7443", "rv-b.example:7443"]);
    // rv-b's lease ends: it is no longer named.
    mesh.kv.expire(crate::rendezvous::store::kv::LeaseId(1));
    mesh.follow(0);
    assert_eq!(mesh.server(0).servers(), ["rv-a.example:7443"]);
}

#[test]
fn a_new_key_with_a_token_for_a_node_takes_over_its_name_and_addresses_and_the_old_key_is_removed()
{
    let (mut reg, token) = with_token();
    let (old, _) = welcome(&join(&mut reg, 1, &token));
    join(&mut reg, 3, &token);
    let rebuilt = reg
        .create_takeover_token([9; 32], "rebuilt".into(), DAY, key(1), NOW)
        .unwrap()
        .expose()
        .to_owned();
    drain(&mut reg);

    reg.handle_hello(
        ConnId(2),
        arriving(hello(2, Some(&rebuilt)), observed(2)),
        at(NOW + 5),
    );
    let cmds = drain(&mut reg);
    let (new, _) = welcome(&cmds);
    assert_eq!(new.public_key, key(2));
    assert_eq!(
        (new.name.as_str(), new.ipv4, new.ipv6),
        (old.name.as_str(), old.ipv4, old.ipv6)
    );
    // The old key's connection is cut off as removed.
    assert!(cmds.contains(&Command::Close {
        conn: ConnId(1),
        reason: CloseReason::Removed
    }));
    // Node 3 hears the old key leave before the new one, with its
    // addresses, arrives.
    let to_3: Vec<&ServerMessage> = cmds
        .iter()
        .filter_map(|c| match c {
            Command::Send {
                conn: ConnId(3),
                msg,
            } => Some(msg),
            _ => None,
        })
        .collect();
    assert!(
        matches!(to_3.as_slice(), [
            ServerMessage::PeerRemove { public_key },
            ServerMessage::PeerUpsert { peer },
        ] if *public_key == key(1) && peer.public_key == key(2)),
        "{to_3:?}"
    );
    assert!(reg.state().removed.contains(&key(1)));
    assert!(
        reg.quarantined().is_empty(),
        "the addresses moved, not held back"
    );

    // The old key is refused; the token is spent.
    reg.handle_hello(
        ConnId(11),
        arriving(hello(1, None), observed(1)),
        at(NOW + 6),
    );
    assert_rejected_only(&drain(&mut reg), ConnId(11), RejectReason::Removed);
    reg.handle_hello(
        ConnId(4),
        arriving(hello(4, Some(&rebuilt)), observed(4)),
        at(NOW + 7),
    );
    assert_rejected_only(&drain(&mut reg), ConnId(4), RejectReason::BadToken);
}

#[test]
fn a_takeover_token_for_a_node_that_is_gone_admits_no_one() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    let rebuilt = reg
        .create_takeover_token([9; 32], "rebuilt".into(), DAY, key(1), NOW)
        .unwrap()
        .expose()
        .to_owned();
    drain(&mut reg);
    assert!(reg.remove_node(&key(1), false, NOW));
    drain(&mut reg);
    reg.handle_hello(
        ConnId(2),
        arriving(hello(2, Some(&rebuilt)), observed(2)),
        at(NOW),
    );
    assert_rejected_only(&drain(&mut reg), ConnId(2), RejectReason::BadToken);
    assert_eq!(
        reg.create_takeover_token([8; 32], "late".into(), DAY, key(1), NOW),
        Err(RegistryError::UnknownNode {
            key: key(1).to_string()
        })
    );
}

// --- prefixes behind nodes --------------------------------------------------

use crate::wire::control::RouteStatus;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Node `n`'s hello advertising `routes`, on `ConnId(conn)`, at `unix`.
fn advertise(
    reg: &mut Registry,
    n: u8,
    conn: u64,
    routes: &[&str],
    token: &str,
    unix: u64,
) -> Vec<Command> {
    let hello = Hello {
        routes: routes.iter().map(|r| net(r)).collect(),
        ..hello(n, Some(token))
    };
    reg.handle_hello(ConnId(conn), arriving(hello, observed(n)), at(unix));
    drain(reg)
}

fn decisions_in_welcome(cmds: &[Command]) -> Vec<RouteDecision> {
    cmds.iter()
        .find_map(|c| match c {
            Command::Send {
                msg: ServerMessage::Welcome { routes, .. },
                ..
            } => Some(routes.clone()),
            _ => None,
        })
        .expect("a welcome")
}

/// The `Routes` messages sent to `conn`.
fn routes_told(cmds: &[Command], conn: u64) -> Vec<Vec<RouteDecision>> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Send {
                conn: to,
                msg: ServerMessage::Routes { routes },
            } if *to == ConnId(conn) => Some(routes.clone()),
            _ => None,
        })
        .collect()
}

/// The routes of `peer` in the upserts sent to `conn`.
fn upserted_routes(cmds: &[Command], conn: u64, peer: u8) -> Vec<Vec<IpNet>> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Send {
                conn: to,
                msg: ServerMessage::PeerUpsert { peer: entry },
            } if *to == ConnId(conn) && entry.public_key == key(peer) => Some(entry.routes.clone()),
            _ => None,
        })
        .collect()
}

fn decision(prefix: &str, status: RouteStatus) -> RouteDecision {
    RouteDecision {
        prefix: net(prefix),
        status,
    }
}

fn with_pod_range() -> (Registry, String) {
    let (mut reg, token) = with_token();
    reg.set_routable(vec![net("10.244.0.0/16")]);
    assert!(drain(&mut reg).is_empty());
    (reg, token)
}

#[test]
fn advertised_prefixes_are_decided_in_the_welcome_and_routed_by_peers() {
    let (mut reg, token) = with_pod_range();
    join(&mut reg, 1, &token);
    let cmds = advertise(
        &mut reg,
        2,
        2,
        &["10.244.2.0/24", "192.168.0.0/24", "10.244.2.0/24"],
        &token,
        NOW,
    );
    assert_eq!(
        decisions_in_welcome(&cmds),
        [
            decision("10.244.2.0/24", RouteStatus::Accepted),
            decision("192.168.0.0/24", RouteStatus::AwaitingApproval),
        ]
    );
    assert_eq!(upserted_routes(&cmds, 1, 2), [vec![net("10.244.2.0/24")]]);
    // A peer joining later learns them in its welcome.
    let cmds = join(&mut reg, 3, &token);
    let (_, peers) = welcome(&cmds);
    let two = peers.iter().find(|p| p.public_key == key(2)).unwrap();
    assert_eq!(two.routes, [net("10.244.2.0/24")]);
    // The same prefixes again change nothing.
    let cmds = advertise(
        &mut reg,
        2,
        12,
        &["10.244.2.0/24", "192.168.0.0/24"],
        &token,
        NOW + 60,
    );
    assert!(routes_told(&cmds, 12).is_empty());
    assert!(
        upserted_routes(&cmds, 1, 2).is_empty(),
        "a reconnect with nothing new is not sent to peers: {cmds:?}"
    );
    assert_eq!(
        reg.state().nodes[&key(2)].routes[0].since,
        NOW,
        "kept since first advertised"
    );
}

#[test]
fn an_overlapping_prefix_is_refused_naming_its_holder_and_routed_once_withdrawn() {
    let (mut reg, token) = with_pod_range();
    join(&mut reg, 1, &token);
    advertise(&mut reg, 2, 2, &["10.244.2.0/24"], &token, NOW);
    let cmds = advertise(&mut reg, 3, 3, &["10.244.0.0/20"], &token, NOW + 1);
    let refused = RouteStatus::Overlaps {
        node: "node-2".into(),
        held: net("10.244.2.0/24"),
    };
    assert_eq!(
        decisions_in_welcome(&cmds),
        [decision("10.244.0.0/20", refused.clone())]
    );
    assert!(upserted_routes(&cmds, 1, 3).iter().all(Vec::is_empty));
    assert!(refused.describe().contains("node-2"));

    // Node 2 comes back without the prefix: node 3's is routed, and node 3
    // hears of it.
    let cmds = advertise(&mut reg, 2, 12, &[], &token, NOW + 2);
    assert_eq!(
        routes_told(&cmds, 3),
        [vec![decision("10.244.0.0/20", RouteStatus::Accepted)]]
    );
    assert_eq!(upserted_routes(&cmds, 1, 3), [vec![net("10.244.0.0/20")]]);
    assert_eq!(upserted_routes(&cmds, 1, 2), [Vec::<IpNet>::new()]);
    // Node 2 asks again: node 3 holds it now.
    let cmds = advertise(&mut reg, 2, 22, &["10.244.2.0/24"], &token, NOW + 3);
    assert!(matches!(
        &decisions_in_welcome(&cmds)[0].status,
        RouteStatus::Overlaps { node, .. } if node == "node-3"
    ));
}

#[test]
fn an_operator_approves_a_prefix_outside_the_routable_ranges() {
    let (mut reg, token) = with_pod_range();
    join(&mut reg, 1, &token);
    advertise(&mut reg, 2, 2, &["192.168.0.0/24"], &token, NOW);
    assert!(reg
        .approve_route(&key(2), net("192.168.0.1/24"), true)
        .is_err());
    assert!(reg
        .approve_route(&key(9), net("192.168.0.0/24"), true)
        .is_err());
    reg.approve_route(&key(2), net("192.168.0.0/24"), true)
        .unwrap();
    let cmds = drain(&mut reg);
    assert_eq!(
        routes_told(&cmds, 2),
        [vec![decision("192.168.0.0/24", RouteStatus::Accepted)]]
    );
    assert_eq!(upserted_routes(&cmds, 1, 2), [vec![net("192.168.0.0/24")]]);
    let report = reg.route_report();
    assert_eq!(report[0].approved, [net("192.168.0.0/24")]);
    assert_eq!(report[0].routes[0].since, NOW);
    // Approving twice changes nothing; withdrawing the approval withdraws
    // the route.
    reg.approve_route(&key(2), net("192.168.0.0/24"), true)
        .unwrap();
    assert!(drain(&mut reg).is_empty());
    reg.approve_route(&key(2), net("192.168.0.0/24"), false)
        .unwrap();
    let cmds = drain(&mut reg);
    assert_eq!(upserted_routes(&cmds, 1, 2), [Vec::<IpNet>::new()]);
}

#[test]
fn more_routes_than_allowed_are_a_bad_hello() {
    let (mut reg, token) = with_pod_range();
    let routes: Vec<String> = (0..=MAX_ROUTES)
        .map(|i| format!("10.244.{i}.0/24"))
        .collect();
    let routes: Vec<&str> = routes.iter().map(String::as_str).collect();
    let cmds = advertise(&mut reg, 2, 2, &routes, &token, NOW);
    let message = assert_rejected_only(&cmds, ConnId(2), RejectReason::BadHello);
    assert!(message.contains("routes"), "{message}");
}

#[test]
fn routes_survive_a_restart_with_their_decisions() {
    let (mut reg, token) = with_pod_range();
    advertise(&mut reg, 2, 2, &["10.244.2.0/24"], &token, NOW);
    reg.flush();
    drain(&mut reg);
    let json = serde_json::to_string(reg.state()).unwrap();
    let state: RegistryState = serde_json::from_str(&json).unwrap();
    let mut again = Registry::new(state, server());
    again.set_routable(vec![net("10.244.0.0/16")]);
    drain(&mut again);
    let cmds = join(&mut again, 1, &token);
    let (_, peers) = welcome(&cmds);
    assert_eq!(peers[0].routes, [net("10.244.2.0/24")]);
}

#[test]
fn two_servers_decide_overlapping_prefixes_alike() {
    let (mut mesh, token) = shared_mesh("100.72.0.0/16", None);
    for i in 0..2 {
        mesh.server(i).set_routable(vec![net("10.244.0.0/16")]);
    }
    // Node 1 on server a, node 2 on server b; node 3 on b advertises first,
    // node 4 on a a moment later, overlapping.
    for (i, n) in [(0, 1u8), (1, 2), (1, 3), (0, 4)] {
        let routes = match n {
            3 => vec![net("10.244.8.0/24")],
            4 => vec![net("10.244.8.0/22")],
            _ => Vec::new(),
        };
        let hello = Hello {
            routes,
            ..hello(n, Some(&token))
        };
        mesh.server(i).handle_hello(
            ConnId(n.into()),
            arriving(hello, observed(n)),
            at(NOW + u64::from(n)),
        );
        mesh.run(i);
        mesh.server(i).flush();
        mesh.run(i);
        mesh.follow(0);
        mesh.follow(1);
    }
    for i in 0..2 {
        let report = mesh.server(i).route_report();
        let by_name: BTreeMap<&str, &RouteStatus> = report
            .iter()
            .map(|n| (n.name.as_str(), &n.routes[0].decision.status))
            .collect();
        assert_eq!(by_name["node-3"], &RouteStatus::Accepted, "server {i}");
        assert!(
            matches!(by_name["node-4"], RouteStatus::Overlaps { node, .. } if node == "node-3"),
            "server {i}"
        );
    }
    // Node 3 withdraws at server b: node 4, on server a, is told its
    // prefix is routed now, and node 1 routes it.
    let hello = hello(3, None);
    mesh.server(1)
        .handle_hello(ConnId(13), arriving(hello, observed(3)), at(NOW + 10));
    mesh.run(1);
    mesh.server(1).flush();
    mesh.run(1);
    let cmds = mesh.follow(0);
    assert_eq!(
        routes_told(&cmds, 4),
        [vec![decision("10.244.8.0/22", RouteStatus::Accepted)]]
    );
    assert_eq!(upserted_routes(&cmds, 1, 4), [vec![net("10.244.8.0/22")]]);
}

#[test]
fn going_away_closes_every_session_as_such_writes_no_presence_and_admits_no_one() {
    let (mut reg, token) = with_token();
    for n in 1..=3 {
        join(&mut reg, n, &token);
    }
    reg.handle_shutdown();
    let cmds = drain(&mut reg);
    let mut closed: Vec<ConnId> = cmds
        .iter()
        .filter_map(|c| match c {
            Command::Close {
                conn,
                reason: CloseReason::GoingAway,
            } => Some(*conn),
            _ => None,
        })
        .collect();
    closed.sort();
    assert_eq!(closed, [ConnId(1), ConnId(2), ConnId(3)]);
    assert_eq!(cmds.len(), 3, "only the closes: {cmds:?}");
    // The connections ending afterwards cost nothing: no presence write,
    // nothing broadcast, nobody left to tell.
    for n in 1..=3 {
        reg.handle_disconnect(ConnId(n), at(NOW + 1));
    }
    let mut commits = 0;
    while let Some(command) = reg.poll_command() {
        assert!(
            matches!(command, Command::PersistSoon),
            "after going away, a disconnect queued {command:?}"
        );
        commits += 1;
    }
    assert_eq!(commits, 0);
    // A hello now is sent away the same way.
    reg.handle_hello(
        ConnId(9),
        arriving(hello(1, None), observed(1)),
        at(NOW + 2),
    );
    let cmds = drain(&mut reg);
    assert!(
        matches!(
            cmds.as_slice(),
            [Command::Close {
                conn: ConnId(9),
                reason: CloseReason::GoingAway
            }]
        ),
        "{cmds:?}"
    );
    assert_eq!(CloseReason::GoingAway.code(), 5);
}

#[test]
fn a_reconnect_is_sent_to_peers_only_when_the_entry_changed() {
    let (mut reg, token) = with_token();
    join(&mut reg, 1, &token);
    join(&mut reg, 2, &token);
    let upserts_to_2 = |cmds: &[Command]| {
        cmds.iter()
            .filter(|c| {
                matches!(c, Command::Send { conn: ConnId(2), msg: ServerMessage::PeerUpsert { peer } } if peer.public_key == key(1))
            })
            .count()
    };
    // The same node, same candidates, same address seen: nothing to tell.
    reg.handle_disconnect(ConnId(1), at(NOW + 1));
    drain(&mut reg);
    reg.handle_hello(
        ConnId(21),
        arriving(hello(1, None), observed(1)),
        at(NOW + 2),
    );
    assert_eq!(upserts_to_2(&drain(&mut reg)), 0);
    // Back from another public address (its router's changed): told.
    let moved = SocketAddr::from(([198, 51, 100, 99], 40000));
    reg.handle_hello(ConnId(22), arriving(hello(1, None), moved), at(NOW + 3));
    let cmds = drain(&mut reg);
    assert_eq!(upserts_to_2(&cmds), 1, "{cmds:?}");
    let (me, _) = welcome(&cmds);
    assert!(me.candidates.iter().any(|c| c.addr == moved), "{me:?}");
}

// -----------------------------------------------------------------------
// Path reports
// -----------------------------------------------------------------------

#[test]
fn a_path_report_is_kept_in_memory_sent_nowhere_and_gone_with_its_connection() {
    use crate::wire::control::{PathEntry, PathState, FEATURE_PATHS};
    let (mut reg, token) = with_token();
    let cmds = join(&mut reg, 1, &token);
    let features = cmds.iter().find_map(|c| match c {
        Command::Send {
            msg: ServerMessage::Welcome { features, .. },
            ..
        } => Some(features.clone()),
        _ => None,
    });
    assert_eq!(features, Some(vec![FEATURE_PATHS.to_owned()]));
    join(&mut reg, 2, &token);

    let report = vec![PathEntry {
        peer: key(2),
        path: PathState::Relay,
        rtt_us: None,
    }];
    reg.handle_paths(ConnId(1), report.into(), at(NOW));
    assert_eq!(drain(&mut reg), vec![], "nothing saved, nothing sent");
    let matrix = reg.path_matrix();
    let cells: Vec<(&str, &str, PathState)> = matrix
        .paths
        .iter()
        .map(|c| (c.from.as_str(), c.to.as_str(), c.path))
        .collect();
    let (n1, n2) = (&matrix.nodes[0].name, &matrix.nodes[1].name);
    let (from, to) = if matrix.nodes[0].public_key == key(1) {
        (n1.as_str(), n2.as_str())
    } else {
        (n2.as_str(), n1.as_str())
    };
    assert_eq!(cells, [(from, to, PathState::Relay)]);
    assert_eq!(
        (matrix.pairs, matrix.pairs_reported, matrix.pairs_direct),
        (1, 1, 0)
    );

    // From a connection that is not admitted: ignored.
    reg.handle_paths(ConnId(9), vec![].into(), at(NOW));
    assert_eq!(reg.path_matrix().paths.len(), 1);
    // The node leaves: its report goes with it.
    reg.handle_disconnect(ConnId(1), at(NOW));
    drain(&mut reg);
    assert!(reg.path_matrix().paths.is_empty());
}

// -----------------------------------------------------------------------
// Peer-map changes, one write per member per tick
// -----------------------------------------------------------------------

/// Every command queued now, without the shell's tick.
fn queued(reg: &mut Registry) -> Vec<Command> {
    std::iter::from_fn(|| reg.poll_command()).collect()
}

#[test]
fn changes_of_one_tick_reach_each_member_once_the_latest_per_node_never_its_own() {
    let (mut reg, token) = with_token();
    for n in 1..=3 {
        join(&mut reg, n, &token);
    }
    reg.handle_nat(ConnId(1), NatMapping::EndpointDependent, at(NOW));
    reg.handle_nat(ConnId(1), NatMapping::EndpointIndependent, at(NOW));
    reg.handle_nat(ConnId(2), NatMapping::None, at(NOW));
    assert!(
        !queued(&mut reg)
            .iter()
            .any(|c| matches!(c, Command::Send { .. } | Command::PeerDeltas { .. })),
        "nothing goes out before the tick"
    );
    assert!(reg.has_deltas());
    reg.flush_deltas();
    let cmds = queued(&mut reg);
    let [Command::PeerDeltas { members, deltas }] = cmds.as_slice() else {
        panic!("one batch for the tick: {cmds:?}");
    };
    assert_eq!(members.len(), 3, "every member");
    let about: Vec<(PublicKey, NatMapping)> = deltas
        .iter()
        .map(|d| match &d.msg {
            ServerMessage::PeerUpsert { peer } => {
                assert_eq!(peer.public_key, d.subject);
                (d.subject, peer.nat)
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(about.len(), 2, "one change per node: {about:?}");
    assert!(
        about.contains(&(key(1), NatMapping::EndpointIndependent)),
        "the latest"
    );
    assert!(about.contains(&(key(2), NatMapping::None)));
    // As sent: node 1 hears of node 2 only, node 3 of both.
    let sent = drain_batch(members.clone(), deltas);
    assert_eq!(sent[&ConnId(1)], [key(2)]);
    assert_eq!(sent[&ConnId(2)], [key(1)]);
    assert_eq!(sent[&ConnId(3)].len(), 2);
    assert!(!reg.has_deltas());
}

/// Who hears of whom, from one batch.
fn drain_batch(members: Vec<DeltaMember>, deltas: &[Delta]) -> BTreeMap<ConnId, Vec<PublicKey>> {
    let mut out = Vec::new();
    expand_deltas(members, deltas, &mut out);
    let mut heard: BTreeMap<ConnId, Vec<PublicKey>> = BTreeMap::new();
    for c in out {
        if let Command::Send { conn, msg } = c {
            let about = match msg {
                ServerMessage::PeerUpsert { peer } => peer.public_key,
                ServerMessage::PeerRemove { public_key } => public_key,
                other => panic!("{other:?}"),
            };
            heard.entry(conn).or_default().push(about);
        }
    }
    heard
}

#[test]
fn a_punch_never_overtakes_the_changes_before_it() {
    let (mut reg, token) = with_token();
    for n in 1..=2 {
        join(&mut reg, n, &token);
    }
    // Node 2's new candidates, then its request to punch node 1: node 1
    // must know them when it is told to punch.
    let fresh = vec![Candidate {
        addr: SocketAddr::from(([198, 51, 100, 77], 41000)),
        kind: CandidateKind::Local,
        mapped: None,
    }];
    reg.handle_candidates(ConnId(2), fresh, at(NOW));
    reg.handle_punch(ConnId(2), &key(1), at(NOW));
    let cmds = queued(&mut reg);
    let batch = cmds
        .iter()
        .position(|c| matches!(c, Command::PeerDeltas { .. }))
        .expect("the change went out with the punch");
    let punch = cmds
        .iter()
        .position(|c| {
            matches!(
                c,
                Command::Send {
                    msg: ServerMessage::Punch { .. },
                    ..
                }
            )
        })
        .expect("a punch");
    assert!(batch < punch, "{cmds:?}");
}

#[test]
fn a_member_back_in_the_middle_of_a_tick_misses_nothing() {
    let (mut reg, token) = with_token();
    for n in 1..=2 {
        join(&mut reg, n, &token);
    }
    reg.handle_nat(ConnId(1), NatMapping::EndpointIndependent, at(NOW));
    // Node 2 reconnects before the tick: its welcome has node 1's latest,
    // so the tick's change is not sent to it again.
    reg.handle_disconnect(ConnId(2), at(NOW));
    reg.handle_hello(
        ConnId(12),
        arriving(hello(2, None), observed(2)),
        at(NOW + 1),
    );
    let cmds = drain(&mut reg);
    let (_, peers) = welcome(&cmds);
    let one = peers.iter().find(|p| p.public_key == key(1)).unwrap();
    assert_eq!(one.nat, NatMapping::EndpointIndependent, "in the welcome");
    assert!(
        !cmds.iter().any(|c| matches!(
            c,
            Command::Send {
                conn: ConnId(12),
                msg: ServerMessage::PeerUpsert { .. }
            }
        )),
        "the map is sent once: {cmds:?}"
    );
    // A change after its welcome, in the same tick, does reach it.
    reg.handle_nat(ConnId(1), NatMapping::EndpointDependent, at(NOW + 2));
    let cmds = drain(&mut reg);
    assert!(cmds.iter().any(|c| matches!(c,
        Command::Send { conn: ConnId(12), msg: ServerMessage::PeerUpsert { peer } }
        if peer.public_key == key(1) && peer.nat == NatMapping::EndpointDependent)));
    assert!(
        !cmds.iter().any(|c| matches!(
            c,
            Command::Send {
                conn: ConnId(2),
                ..
            }
        )),
        "nothing to the old connection"
    );
}

#[test]
fn a_node_removed_after_a_change_in_the_same_tick_ends_removed_at_every_member() {
    let (mut reg, token) = with_token();
    for n in 1..=2 {
        join(&mut reg, n, &token);
    }
    reg.handle_nat(ConnId(1), NatMapping::EndpointIndependent, at(NOW));
    assert!(reg.remove_node(&key(1), false, NOW));
    let cmds = drain(&mut reg);
    let to_2: Vec<&ServerMessage> = cmds
        .iter()
        .filter_map(|c| match c {
            Command::Send {
                conn: ConnId(2),
                msg,
            } => Some(msg),
            _ => None,
        })
        .collect();
    // The removed node's own rejection flushes the tick first, so the
    // change may still arrive; the removal comes last.
    assert!(
        matches!(to_2.last(), Some(ServerMessage::PeerRemove { public_key }) if *public_key == key(1)),
        "{to_2:?}"
    );
}

/// What the welcome on `conn` said about the node's port.
fn port_taken_in(cmds: &[Command], conn: ConnId) -> Option<PortTaken> {
    cmds.iter()
        .find_map(|c| match c {
            Command::Send {
                conn: to,
                msg: ServerMessage::Welcome { port_taken, .. },
            } if *to == conn => Some(port_taken.as_deref().cloned()),
            _ => None,
        })
        .expect("a welcome")
}

/// Node `n` behind the NAT at 198.51.100.1, listening on `port`, as
/// seen from the rendezvous at `public_port`.
fn behind_one_nat(
    reg: &mut Registry,
    n: u8,
    token: &str,
    port: u16,
    public_port: u16,
) -> Option<PortTaken> {
    let hello = Hello {
        listen_port: port,
        candidates: vec![Candidate {
            addr: SocketAddr::from(([192, 168, 50, n], port)),
            kind: CandidateKind::Local,
            mapped: None,
        }],
        ..hello(n, Some(token))
    };
    let conn = ConnId(n.into());
    let seen = SocketAddr::from(([198, 51, 100, 1], public_port));
    reg.handle_hello(conn, arriving(hello, seen), at(NOW));
    port_taken_in(&drain(reg), conn)
}

#[test]
fn a_node_behind_the_nat_of_one_that_holds_its_port_is_told_a_free_one() {
    let (mut reg, token) = with_token();
    // node-1 holds the public 51820; node-2, on 51820 too, got 10472.
    assert_eq!(behind_one_nat(&mut reg, 1, &token, 51820, 51820), None);
    let taken = behind_one_nat(&mut reg, 2, &token, 51820, 10472);
    assert_eq!(
        taken,
        Some(PortTaken {
            by: "node-1".into(),
            port: 51821
        })
    );
    assert_eq!(reg.counters().ports_taken, 1);
    // node-2 comes back on 51821, as told, and keeps it at the NAT; a
    // third node on 51820 is told a port that neither of them uses.
    let hello3 = Hello {
        listen_port: 51820,
        candidates: vec![Candidate {
            addr: SocketAddr::from(([192, 168, 50, 3], 51820)),
            kind: CandidateKind::Local,
            mapped: None,
        }],
        ..hello(3, Some(&token))
    };
    reg.handle_disconnect(ConnId(2), at(NOW));
    drain(&mut reg);
    assert_eq!(behind_one_nat(&mut reg, 2, &token, 51821, 51821), None);
    reg.handle_hello(
        ConnId(3),
        arriving(hello3, SocketAddr::from(([198, 51, 100, 1], 30000))),
        at(NOW),
    );
    assert_eq!(
        port_taken_in(&drain(&mut reg), ConnId(3)),
        Some(PortTaken {
            by: "node-1".into(),
            port: 51822
        })
    );
}

#[test]
fn two_nodes_seen_at_one_public_endpoint_by_two_servers_move_the_later_one() {
    // On two servers each node may keep 51820 towards its own server;
    // the records (which the servers share) show both at one endpoint.
    let (mut reg, token) = with_token();
    assert_eq!(behind_one_nat(&mut reg, 1, &token, 51820, 51820), None);
    assert_eq!(
        behind_one_nat(&mut reg, 2, &token, 51820, 51820),
        Some(PortTaken {
            by: "node-1".into(),
            port: 51821
        })
    );
}

#[test]
fn nodes_behind_one_nat_on_their_own_public_ports_keep_their_ports() {
    // A router that gives each node a public port of its own (a port
    // forward each, the lab's cone-hairpin), or nodes on distinct ports.
    let (mut reg, token) = with_token();
    assert_eq!(behind_one_nat(&mut reg, 1, &token, 51820, 51821), None);
    assert_eq!(behind_one_nat(&mut reg, 2, &token, 51820, 51822), None);
    assert_eq!(behind_one_nat(&mut reg, 3, &token, 51823, 51823), None);
    // A node seen elsewhere at the same port is no sibling.
    assert_eq!(port_taken_in(&join(&mut reg, 4, &token), ConnId(4)), None);
    assert_eq!(reg.counters().ports_taken, 0);
}

/// What `conn` was sent, applied to `held` as the node applies it.
fn hold(held: &mut crate::wire::digest::HeldMap, cmds: &[Command], conn: ConnId) {
    for c in cmds {
        match c {
            Command::Send { conn: to, msg } if *to == conn => match msg {
                ServerMessage::Welcome { peers, .. } => held.replace(&peers.clone().into_entries()),
                ServerMessage::PeerUpsert { peer } => held.upsert(peer),
                ServerMessage::PeerRemove { public_key } => held.remove(public_key),
                _ => {}
            },
            _ => {}
        }
    }
}

/// Nodes 1 to 3 joined, and the map as the node on `conn` holds it.
fn three_joined_as_held_by(conn: ConnId) -> (Registry, crate::wire::digest::HeldMap) {
    let (mut reg, token) = with_token();
    let mut held = crate::wire::digest::HeldMap::default();
    for n in 1..=3 {
        let cmds = join(&mut reg, n, &token);
        hold(&mut held, &cmds, conn);
    }
    (reg, held)
}

fn unchanged(cmds: &[Command]) -> bool {
    cmds.iter().any(|c| {
        matches!(c, Command::Send { msg: ServerMessage::Welcome { peers_unchanged: true, peers, .. }, .. } if peers.is_empty())
    })
}

#[test]
fn a_node_back_with_the_map_the_server_holds_is_welcomed_without_it_and_any_other_gets_it_whole() {
    let (mut reg, mut held) = three_joined_as_held_by(ConnId(1));
    assert_eq!(held.entries().len(), 2, "node 1 heard of 2 and 3");
    let back = |reg: &mut Registry, conn: u64, digest: Option<MapDigest>| {
        let hello = Hello {
            peers_digest: digest,
            ..hello(1, None)
        };
        reg.handle_hello(ConnId(conn), arriving(hello, observed(1)), at(NOW + 5));
        drain(reg)
    };

    let cmds = back(&mut reg, 11, held.digest());
    assert!(unchanged(&cmds), "the map held is the server's: {cmds:?}");
    assert_eq!(reg.counters().welcomes_unchanged, 1);

    // Node 2 changes while node 1 misses it (its session is lost first).
    reg.handle_nat(ConnId(2), NatMapping::EndpointIndependent, at(NOW + 6));
    drain(&mut reg);
    let cmds = back(&mut reg, 12, held.digest());
    assert!(!unchanged(&cmds), "a change missed: the whole map");
    let (_, peers) = welcome(&cmds);
    assert_eq!(peers.len(), 2);
    assert!(peers
        .iter()
        .any(|p| p.public_key == key(2) && p.nat == NatMapping::EndpointIndependent));
    hold(&mut held, &cmds, ConnId(12));

    // A digest that is nobody's map (a forgery, a bug) gets the map too.
    let forged: MapDigest = serde_json::from_value(serde_json::json!("ab".repeat(32))).unwrap();
    assert!(!unchanged(&back(&mut reg, 13, Some(forged))));
    // And the map as held now is the server's again.
    assert!(unchanged(&back(&mut reg, 14, held.digest())));
    assert_eq!(reg.counters().welcomes_unchanged, 2);
}

#[test]
fn a_restarted_server_welcomes_its_nodes_back_without_the_map_they_hold() {
    let (mut reg, mut held) = three_joined_as_held_by(ConnId(3));
    reg.handle_nat(ConnId(1), NatMapping::EndpointDependent, at(NOW + 1));
    let cmds = drain(&mut reg);
    hold(&mut held, &cmds, ConnId(3));
    reg.flush();
    drain(&mut reg);

    let mut restarted = Registry::new(reg.state().clone(), server());
    let hello = Hello {
        peers_digest: held.digest(),
        ..hello(3, None)
    };
    restarted.handle_hello(ConnId(30), arriving(hello, observed(3)), at(NOW + 9));
    let cmds = drain(&mut restarted);
    assert!(unchanged(&cmds), "{cmds:?}");
}
