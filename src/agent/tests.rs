//! The agent alone: this input ⇒ these outputs, in simulated time (an
//! `Instant` origin moved by hand; no sleeps).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;
use crate::control::{NetcheckInfo, PeerInfo, StatusInfo};
use crate::identity::PrivateKey;
use crate::wire::relay::{encode_header, RelayKind, HEADER_LEN};

const RENDEZVOUS: &str = "198.51.100.1:443";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn key(n: u8) -> PrivateKey {
    PrivateKey::from_bytes([n; 32])
}

fn public(n: u8) -> PublicKey {
    key(n).public_key()
}

/// Node `n`'s socket: 192.0.2.n:51820, public.
fn underlay(n: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::from([192, 0, 2, n]), 51820)
}

fn mesh() -> MeshInfo {
    MeshInfo {
        id: "m".into(),
        ipv4: "100.72.0.0/16".parse().unwrap(),
        ipv6: "fd00:1::/48".parse().unwrap(),
    }
}

/// Node `n` as the rendezvous lists it: 100.72.0.n, reachable at its socket.
fn entry(n: u8) -> NodeEntry {
    NodeEntry {
        public_key: public(n),
        name: format!("node-{n}"),
        ipv4: Ipv4Addr::new(100, 72, 0, n),
        ipv6: Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, u16::from(n)),
        candidates: vec![Candidate {
            addr: underlay(n),
            kind: CandidateKind::Local,
            mapped: None,
        }],
        nat: NatMapping::Unknown,
        routes: Vec::new(),
    }
}

fn welcome(n: u8, peers: &[u8]) -> Update {
    Update::Welcome {
        node: entry(n),
        mesh: mesh(),
        observed: addr("203.0.113.7:40000"),
        peers: peers.iter().map(|p| entry(*p)).collect(),
        routes: Vec::new(),
        paths: false,
        port_taken: None,
    }
}

fn config(n: u8, static_peers: Vec<PeerSpec>) -> AgentConfig {
    AgentConfig {
        node: NodeConfig {
            private_key: key(n),
            addresses: Vec::new(),
            mtu: 1380,
        },
        static_peers,
        name: Some(format!("host-{n}")),
        interface: "mesh0".into(),
        listen_port: 51820,
        underlay_ips: vec![underlay(n).ip()],
        rendezvous: true,
        routes: Vec::new(),
        advertise_endpoint: None,
    }
}

fn agent(n: u8, now: Instant) -> Agent {
    Agent::new(
        config(n, Vec::new()),
        [n; 32],
        now,
        Duration::from_secs(1_764_864_000),
    )
    .unwrap()
}

fn static_peer(n: u8) -> PeerSpec {
    PeerSpec {
        public_key: public(n),
        endpoint: Some(underlay(n)),
        allowed_ips: vec!["10.99.0.0/24".parse().unwrap()],
        persistent_keepalive: None,
    }
}

fn peer_keys(agent: &Agent) -> Vec<PublicKey> {
    let mut keys: Vec<PublicKey> = agent.node().peers().map(|p| p.public_key).collect();
    keys.sort();
    keys
}

fn sorted(mut keys: Vec<PublicKey>) -> Vec<PublicKey> {
    keys.sort();
    keys
}

fn host_changes(agent: &mut Agent) -> Vec<HostChange> {
    std::iter::from_fn(|| agent.poll_host_change()).collect()
}

fn messages(agent: &mut Agent) -> Vec<NodeMessage> {
    std::iter::from_fn(|| agent.poll_rendezvous_message()).collect()
}

fn answers(agent: &mut Agent) -> Vec<(RequestId, Response)> {
    std::iter::from_fn(|| agent.poll_api_answer()).collect()
}

fn nat_checks(agent: &mut Agent) -> Vec<NatCheck> {
    std::iter::from_fn(|| agent.poll_nat_check()).collect()
}

fn drop_transmits(agent: &mut Agent) -> usize {
    let mut n = 0;
    while let Some(t) = agent.node_mut().poll_transmit() {
        agent.node_mut().recycle(t.payload);
        n += 1;
    }
    n
}

fn ask(agent: &mut Agent, id: u64, request: Request, now: Instant) -> Vec<(RequestId, Response)> {
    agent.handle_api(RequestId(id), request, &ShellStats::default(), now);
    answers(agent)
}

fn status(agent: &mut Agent, now: Instant) -> StatusInfo {
    match ask(agent, 99, Request::Status, now).as_slice() {
        [(_, Response::Status(status))] => (**status).clone(),
        other => panic!("expected a status, got {other:?}"),
    }
}

fn peers(agent: &mut Agent, now: Instant) -> Vec<PeerInfo> {
    match ask(agent, 98, Request::Peers, now).as_slice() {
        [(_, Response::Peers { peers })] => peers.clone(),
        other => panic!("expected peers, got {other:?}"),
    }
}

fn netcheck(answers: &[(RequestId, Response)]) -> NetcheckInfo {
    match answers {
        [(_, Response::Netcheck(info))] => (**info).clone(),
        other => panic!("expected one netcheck answer, got {other:?}"),
    }
}

/// A small IPv4/UDP packet from `src` to `dst`, as an application writes
/// it to mesh0.
fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let payload = b"hello";
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = p[..20]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    p[10..12].copy_from_slice(&(!(folded as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&9u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

/// The NAT check answer the rendezvous's second port gives to `check`.
fn reflect_answer(check: &NatCheck, observed: SocketAddr) -> [u8; REFLECT_LEN] {
    let Ok(Reflect::Request { tx }) = Reflect::parse(&check.payload) else {
        panic!("not a NAT check request");
    };
    Reflect::Response { tx, observed }.encode()
}

/// Runs every timeout of `agent` up to `until`, calling `each` after each.
fn advance(agent: &mut Agent, until: Instant, each: &mut impl FnMut(&mut Agent)) {
    loop {
        let (next, _) = agent.poll_timeout();
        if next > until {
            return;
        }
        agent.handle_timeout(next);
        each(agent);
    }
}

/// Two agents whose sockets reach each other directly: what one sends to
/// the other's underlay address is handed over at once.
struct Pair {
    a: Agent,
    b: Agent,
}

impl Pair {
    fn new(now: Instant) -> Self {
        let mut a = agent(1, now);
        let mut b = agent(2, now);
        a.handle_update(welcome(1, &[2]), now);
        b.handle_update(welcome(2, &[1]), now);
        Self { a, b }
    }

    /// Hands every transmit over until neither has anything left to send.
    fn pump(&mut self, now: Instant) {
        loop {
            let mut moved = false;
            for (from, to, src) in [(0, 1, underlay(1)), (1, 0, underlay(2))] {
                let (sender, receiver) = if from == 0 {
                    (&mut self.a, &mut self.b)
                } else {
                    (&mut self.b, &mut self.a)
                };
                let _ = to;
                while let Some(t) = sender.node_mut().poll_transmit() {
                    receiver
                        .node_mut()
                        .handle_datagram(src, t.payload.as_slice(), now);
                    sender.node_mut().recycle(t.payload);
                    moved = true;
                }
                sender.handle_engine_events(now);
                receiver.handle_engine_events(now);
                while let Some(packet) = receiver.node_mut().poll_tun() {
                    receiver.node_mut().recycle(packet);
                }
            }
            if !moved {
                return;
            }
        }
    }
}

// --- the peer map -------------------------------------------------------------

#[test]
fn a_welcome_installs_the_peers_and_emits_the_addresses_change() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_update(welcome(1, &[2, 3]), now);

    assert_eq!(peer_keys(&a), sorted(vec![public(2), public(3)]));
    let changes = host_changes(&mut a);
    let addresses: Vec<IpNet> = vec![
        "100.72.0.1/16".parse().unwrap(),
        "fd00:1::1/48".parse().unwrap(),
    ];
    assert_eq!(changes[0], HostChange::Registered);
    assert_eq!(changes[1], HostChange::Addresses(addresses.clone()));
    assert!(
        matches!(&changes[2], HostChange::SaveCache(c) if c.peers.len() == 2),
        "{changes:?}"
    );
    assert_eq!(changes.len(), 3);
    assert_eq!(a.addresses(), addresses.as_slice());
    assert_eq!(
        a.peer_meta(&public(2)).map(|m| m.name.as_str()),
        Some("node-2")
    );
    assert_eq!(
        a.relay_id_of(&public(3)),
        NodeId::of_overlay(Ipv4Addr::new(100, 72, 0, 3))
    );
}

#[test]
fn the_same_addresses_again_change_nothing_on_the_host_but_the_cache() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_update(welcome(1, &[2]), now);
    host_changes(&mut a);

    a.handle_update(welcome(1, &[2, 3]), now);

    let changes = host_changes(&mut a);
    assert!(
        !changes
            .iter()
            .any(|c| matches!(c, HostChange::Addresses(_))),
        "{changes:?}"
    );
}

#[test]
fn a_welcome_saying_our_port_is_taken_asks_the_host_to_move_and_status_says_so() {
    let now = Instant::now();
    let mut a = agent(1, now);
    let taken = crate::wire::control::PortTaken {
        by: "node-2".into(),
        port: 51821,
    };
    let Update::Welcome {
        node,
        mesh,
        observed,
        peers,
        routes,
        paths,
        ..
    } = welcome(1, &[2])
    else {
        unreachable!()
    };
    a.handle_update(
        Update::Welcome {
            node,
            mesh,
            observed,
            peers,
            routes,
            paths,
            port_taken: Some(taken.clone()),
        },
        now,
    );
    let changes = host_changes(&mut a);
    assert_eq!(
        changes[1],
        HostChange::PortTaken(taken.clone()),
        "{changes:?}"
    );
    assert_eq!(status(&mut a, now).port_taken, Some(taken));

    // A later welcome that says nothing: the port is ours again.
    a.handle_update(welcome(1, &[2]), now);
    assert!(!host_changes(&mut a)
        .iter()
        .any(|c| matches!(c, HostChange::PortTaken(_))));
    assert_eq!(status(&mut a, now).port_taken, None);
}

#[test]
fn a_peer_whose_addresses_change_is_shown_as_moved_from_then_on() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_update(welcome(1, &[2]), now);
    let changed = |a: &Agent, at| {
        a.peer_infos(at)
            .into_iter()
            .find(|p| p.public_key == public(2))
            .and_then(|p| p.addresses_changed_s)
    };
    assert_eq!(changed(&a, now), None, "first heard: no news");
    // The same addresses with another name change nothing.
    a.handle_update(
        Update::Upsert(NodeEntry {
            name: "renamed".into(),
            ..entry(2)
        }),
        now,
    );
    assert_eq!(changed(&a, now), None);

    let later = now + Duration::from_secs(5);
    let mut moved = entry(2);
    moved.candidates[0].addr = addr("203.0.113.99:51820");
    a.handle_update(Update::Upsert(moved.clone()), later);
    assert_eq!(changed(&a, later + Duration::from_secs(7)), Some(7));
    // Heard again unchanged: still since then.
    a.handle_update(Update::Upsert(moved), later + Duration::from_secs(9));
    assert_eq!(changed(&a, later + Duration::from_secs(10)), Some(10));
}

#[test]
fn the_cached_peer_map_installs_peers_without_claiming_registration() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_cached(
        NodeCache {
            mesh: mesh(),
            node: entry(1),
            peers: vec![entry(2)],
        },
        now,
    );
    assert_eq!(peer_keys(&a), vec![public(2)]);
    let changes = host_changes(&mut a);
    assert!(!changes.contains(&HostChange::Registered), "{changes:?}");
    assert!(matches!(changes[0], HostChange::Addresses(_)));
}

#[test]
fn a_full_peer_map_removes_mesh_peers_not_in_it_but_keeps_static_peers() {
    let now = Instant::now();
    let mut a = Agent::new(
        config(1, vec![static_peer(9)]),
        [1; 32],
        now,
        Duration::ZERO,
    )
    .unwrap();
    a.handle_update(welcome(1, &[2, 3]), now);
    assert_eq!(peer_keys(&a), sorted(vec![public(2), public(3), public(9)]));

    a.handle_update(welcome(1, &[3]), now);

    assert_eq!(peer_keys(&a), sorted(vec![public(3), public(9)]));
    assert_eq!(a.relay_id_of(&public(2)), None, "its relay id went with it");
}

#[test]
fn an_upsert_adds_or_updates_a_peer_and_a_remove_takes_it_away() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_update(welcome(1, &[2]), now);
    host_changes(&mut a);

    let mut renamed = entry(3);
    a.handle_update(Update::Upsert(renamed.clone()), now);
    renamed.name = "node-3-renamed".into();
    a.handle_update(Update::Upsert(renamed), now);

    assert_eq!(peer_keys(&a), sorted(vec![public(2), public(3)]));
    assert_eq!(
        a.peer_meta(&public(3)).map(|m| m.name.as_str()),
        Some("node-3-renamed")
    );
    let cached = host_changes(&mut a);
    assert!(
        matches!(cached.last(), Some(HostChange::SaveCache(c)) if c.peers.len() == 2),
        "the cache has the peer once: {cached:?}"
    );

    a.handle_update(Update::Remove(public(2)), now);
    assert_eq!(peer_keys(&a), vec![public(3)]);
    assert!(
        matches!(host_changes(&mut a).last(), Some(HostChange::SaveCache(c)) if c.peers.len() == 1)
    );
}

#[test]
fn an_upsert_of_this_node_itself_is_ignored() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_update(welcome(1, &[2]), now);
    host_changes(&mut a);

    a.handle_update(Update::Upsert(entry(1)), now);

    assert_eq!(peer_keys(&a), vec![public(2)]);
    assert_eq!(host_changes(&mut a), vec![]);
}

// --- the relay ----------------------------------------------------------------

#[test]
fn a_relay_frame_from_an_unknown_id_is_dropped_and_counted() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_update(welcome(1, &[2]), now);
    let mut frame = [0u8; HEADER_LEN + 4];
    let mut header = [0u8; HEADER_LEN];
    let stranger = NodeId::of_overlay(Ipv4Addr::new(100, 72, 0, 77)).unwrap();
    encode_header(RelayKind::Packet, stranger, &mut header);
    frame[..HEADER_LEN].copy_from_slice(&header);

    a.handle_relay_frame(&frame, now);
    a.handle_relay_frame(b"\xff", now);

    assert_eq!(a.relay_dropped(), 2, "one unknown id, one malformed frame");
    assert_eq!(
        a.node().stats().dropped_total(),
        0,
        "the engine never saw them"
    );
}

#[test]
fn packets_for_a_relayed_peer_leave_addressed_by_its_relay_id() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_session_up(addr(RENDEZVOUS), None, now);
    a.handle_update(welcome(1, &[2]), now);
    // Nothing direct is proven, so traffic (here, a `meshctl ping`'s
    // probe) takes the relay.
    let asked = ask(
        &mut a,
        1,
        Request::Ping {
            peer: "node-2".into(),
        },
        now,
    );
    assert_eq!(asked, vec![], "the ping waits for its pong");

    let mut relayed = Vec::new();
    while let Some(t) = a.poll_relay() {
        relayed.push(t.to);
        a.recycle(t.payload);
    }

    let id = NodeId::of_overlay(Ipv4Addr::new(100, 72, 0, 2)).unwrap();
    assert!(
        !relayed.is_empty() && relayed.iter().all(|to| *to == id),
        "{relayed:?}"
    );
}

// --- punching -----------------------------------------------------------------

#[test]
fn a_punch_request_probes_the_peer() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_update(welcome(1, &[2]), now);
    drop_transmits(&mut a);

    a.handle_update(Update::Punch(public(2)), now + Duration::from_secs(10));

    assert!(drop_transmits(&mut a) > 0, "probes towards node-2");
}

#[test]
fn a_peer_without_a_live_direct_path_makes_a_punch_message_while_the_session_is_up() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_session_up(addr(RENDEZVOUS), None, now);
    assert_eq!(messages(&mut a), vec![], "the NAT mapping is not known yet");

    a.handle_update(Update::Upsert(entry(2)), now);

    assert_eq!(
        messages(&mut a),
        vec![NodeMessage::Punch { peer: public(2) }]
    );
}

#[test]
fn without_a_session_no_punch_message_is_queued() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_update(Update::Upsert(entry(2)), now);
    assert_eq!(messages(&mut a), vec![]);
}

// --- the NAT mapping --------------------------------------------------------------

#[test]
fn a_change_of_the_nat_mapping_makes_one_nat_message_not_one_per_observation() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_session_up(addr(RENDEZVOUS), None, now);
    let first_check = nat_checks(&mut a);
    // The rendezvous sees us at 203.0.113.7:40000: one observation, unknown.
    a.handle_update(welcome(1, &[]), now);
    assert_eq!(messages(&mut a), vec![]);

    // Its NAT-check port sees the same address: endpoint-independent.
    let answer = reflect_answer(&first_check[0], addr("203.0.113.7:40000"));
    a.handle_reflect_datagram(first_check[0].dst, &answer, now);
    assert_eq!(
        messages(&mut a),
        vec![NodeMessage::Nat {
            mapping: NatMapping::EndpointIndependent
        }]
    );

    // The same answer to a second check: no change, no message.
    a.handle_api(RequestId(1), Request::Netcheck, &ShellStats::default(), now);
    let second = nat_checks(&mut a);
    let answer = reflect_answer(&second[0], addr("203.0.113.7:40000"));
    a.handle_reflect_datagram(second[0].dst, &answer, now);
    assert_eq!(messages(&mut a), vec![]);
    assert_eq!(a.nat_reported(), NatMapping::EndpointIndependent);
}

#[test]
fn the_nat_check_is_asked_again_every_half_minute_or_so_while_a_session_is_up() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_session_up(addr(RENDEZVOUS), None, now);
    let first = nat_checks(&mut a);
    let answer = reflect_answer(&first[0], addr("203.0.113.7:40000"));
    a.handle_reflect_datagram(first[0].dst, &answer, now);

    // Between 25 and 35 s on, one more check; none before.
    let mut turns = 0;
    let due = loop {
        let (at, reason) = a.poll_timeout();
        if reason == TimeoutReason::NatRecheck {
            break at;
        }
        a.handle_timeout(at);
        assert!(nat_checks(&mut a).is_empty());
        turns += 1;
        assert!(turns < 1000 && at < now + Duration::from_secs(35));
    };
    let after = due.saturating_duration_since(now);
    assert!(
        after >= Duration::from_secs(25) && after <= Duration::from_secs(35),
        "{after:?}"
    );
    a.handle_timeout(due);
    let again = nat_checks(&mut a);
    assert_eq!(again.len(), 1);
    // The router got a new address: the answer says so, and the status.
    let answer = reflect_answer(&again[0], addr("203.0.113.99:40000"));
    a.handle_reflect_datagram(again[0].dst, &answer, due);
    let seen = status(&mut a, due).seen_at;
    assert!(
        seen.iter().any(|s| s.addr == addr("203.0.113.99:40000")),
        "{seen:?}"
    );

    // No session, no checks.
    a.handle_session_down(due);
    assert_ne!(a.poll_timeout().1, TimeoutReason::NatRecheck);
}

#[test]
fn status_says_when_the_rendezvous_sees_the_node_elsewhere_than_it_advertises() {
    let now = Instant::now();
    let mut a = Agent::new(
        AgentConfig {
            advertise_endpoint: Some(addr("198.51.100.7:51820")),
            ..config(1, Vec::new())
        },
        [1; 32],
        now,
        Duration::ZERO,
    )
    .unwrap();
    a.handle_session_up(addr(RENDEZVOUS), None, now);
    let check = nat_checks(&mut a);
    // Seen where it says: nothing to say.
    a.handle_update(welcome(1, &[]), now);
    let answer = reflect_answer(&check[0], addr("198.51.100.7:51820"));
    a.handle_reflect_datagram(check[0].dst, &answer, now);
    assert_eq!(status(&mut a, now).advertised_elsewhere, None);

    // Its public address changed; the config did not.
    a.handle_api(RequestId(1), Request::Netcheck, &ShellStats::default(), now);
    let check = nat_checks(&mut a);
    let answer = reflect_answer(&check[0], addr("203.0.113.99:51820"));
    a.handle_reflect_datagram(check[0].dst, &answer, now);
    answers(&mut a);
    assert_eq!(
        status(&mut a, now).advertised_elsewhere,
        Some(crate::control::AdvertisedElsewhere {
            advertised: addr("198.51.100.7:51820"),
            seen: addr("203.0.113.99:51820"),
        })
    );
}

#[test]
fn the_next_session_hears_the_known_nat_mapping_at_once() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_session_up(addr(RENDEZVOUS), None, now);
    let check = nat_checks(&mut a);
    a.handle_update(welcome(1, &[]), now);
    let answer = reflect_answer(&check[0], addr("203.0.113.7:40000"));
    a.handle_reflect_datagram(check[0].dst, &answer, now);
    a.handle_session_down(now);
    messages(&mut a);

    a.handle_session_up(addr(RENDEZVOUS), None, now);

    assert_eq!(
        messages(&mut a),
        vec![NodeMessage::Nat {
            mapping: NatMapping::EndpointIndependent
        }]
    );
}

#[test]
fn a_nat_check_answer_from_elsewhere_or_with_another_id_is_ignored() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_session_up(addr(RENDEZVOUS), None, now);
    let check = nat_checks(&mut a);
    let answer = reflect_answer(&check[0], addr("203.0.113.7:40000"));

    a.handle_reflect_datagram(addr("198.51.100.66:444"), &answer, now);
    let other = Reflect::Response {
        tx: [7; 12],
        observed: addr("203.0.113.7:40000"),
    }
    .encode();
    a.handle_reflect_datagram(check[0].dst, &other, now);
    a.handle_reflect_datagram(check[0].dst, b"garbage", now);

    assert!(status(&mut a, now).seen_at.is_empty());
}

// --- meshctl ping -------------------------------------------------------------------

#[test]
fn a_ping_is_answered_by_the_pong_with_its_path() {
    let now = Instant::now();
    let mut pair = Pair::new(now);
    pair.pump(now);
    answers(&mut pair.a);

    pair.a.handle_api(
        RequestId(5),
        Request::Ping {
            peer: "node-2".into(),
        },
        &ShellStats::default(),
        now,
    );
    assert_eq!(answers(&mut pair.a), vec![], "it waits for the pong");
    pair.pump(now);

    match answers(&mut pair.a).as_slice() {
        [(RequestId(5), Response::Pong(info))] => {
            assert_eq!(info.peer, "node-2");
            assert_eq!(info.overlay_ip, Some("100.72.0.2".parse().unwrap()));
            assert_eq!(info.path, Some(PeerPath::Direct));
            assert_eq!(info.endpoint, Some(underlay(2)));
        }
        other => panic!("expected the pong, got {other:?}"),
    }
}

#[test]
fn a_ping_without_a_pong_times_out_with_no_path() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_update(welcome(1, &[2]), now);
    a.handle_api(
        RequestId(5),
        Request::Ping {
            peer: "100.72.0.2".into(),
        },
        &ShellStats::default(),
        now,
    );
    drop_transmits(&mut a);
    let mut early = Vec::new();
    let just_before = now + PING_TIMEOUT - Duration::from_millis(1);
    advance(&mut a, just_before, &mut |a| {
        early.extend(answers(a));
        drop_transmits(a);
    });
    assert_eq!(early, vec![], "no answer before the ping's deadline");
    assert_eq!(a.poll_timeout().0, now + PING_TIMEOUT, "wakes for the ping");

    advance(&mut a, now + PING_TIMEOUT, &mut |_| {});

    match answers(&mut a).as_slice() {
        [(RequestId(5), Response::Pong(info))] => {
            assert_eq!(info.peer, "node-2");
            assert_eq!(info.path, None);
            assert_eq!(info.rtt_ms, None);
        }
        other => panic!("expected an empty pong, got {other:?}"),
    }
    assert_ne!(a.poll_timeout().1, TimeoutReason::Ping);
}

#[test]
fn a_ping_for_no_known_peer_is_an_error_at_once() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_update(welcome(1, &[2]), now);
    let got = ask(
        &mut a,
        5,
        Request::Ping {
            peer: "nobody".into(),
        },
        now,
    );
    assert!(
        matches!(got.as_slice(), [(RequestId(5), Response::Error { message })] if message.contains("no peer matches 'nobody'")),
        "{got:?}"
    );
}

// --- meshctl netcheck -------------------------------------------------------------------

#[test]
fn a_netcheck_is_answered_when_the_nat_check_port_answers() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_session_up(addr(RENDEZVOUS), None, now);
    a.handle_update(welcome(1, &[]), now);
    nat_checks(&mut a);

    a.handle_api(RequestId(3), Request::Netcheck, &ShellStats::default(), now);
    let checks = nat_checks(&mut a);
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0].dst, addr("198.51.100.1:444"));
    assert_eq!(answers(&mut a), vec![]);

    let later = now + Duration::from_millis(30);
    let answer = reflect_answer(&checks[0], addr("203.0.113.7:40000"));
    a.handle_reflect_datagram(checks[0].dst, &answer, later);

    let info = netcheck(&answers(&mut a));
    assert_eq!(info.rendezvous, Some(RENDEZVOUS.parse().unwrap()));
    assert!(info.quic_connected);
    assert_eq!(
        info.quic_seen_at,
        Some("203.0.113.7:40000".parse().unwrap())
    );
    assert_eq!(
        info.reflector_seen_at,
        Some("203.0.113.7:40000".parse().unwrap())
    );
    assert_eq!(info.reflector_rtt_ms, Some(30.0));
    assert_eq!(info.mapping, NatMapping::EndpointIndependent);
}

#[test]
fn an_unanswered_nat_check_is_sent_once_more_and_the_netcheck_times_out() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_session_up(addr(RENDEZVOUS), None, now);
    nat_checks(&mut a);
    a.handle_api(RequestId(3), Request::Netcheck, &ShellStats::default(), now);
    let first = nat_checks(&mut a);

    let ms = Duration::from_millis(1);
    advance(&mut a, now + REFLECT_RETRY - ms, &mut |_| {});
    assert_eq!(nat_checks(&mut a), vec![]);
    advance(&mut a, now + REFLECT_RETRY, &mut |_| {});
    assert_eq!(nat_checks(&mut a), first, "the same check once more");
    advance(&mut a, now + NETCHECK_TIMEOUT - ms, &mut |_| {});
    assert_eq!(answers(&mut a), vec![]);
    assert_eq!(
        a.poll_timeout().0,
        now + NETCHECK_TIMEOUT,
        "wakes for the netcheck"
    );

    advance(&mut a, now + NETCHECK_TIMEOUT, &mut |_| {});
    assert_eq!(nat_checks(&mut a), vec![], "not a third time");

    let info = netcheck(&answers(&mut a));
    assert_eq!(info.reflector, Some("198.51.100.1:444".parse().unwrap()));
    assert_eq!(info.reflector_seen_at, None);
    assert_eq!(info.mapping, NatMapping::Unknown);
}

#[test]
fn a_netcheck_before_any_session_is_answered_at_once() {
    let now = Instant::now();
    let mut a = agent(1, now);
    let info = netcheck(&ask(&mut a, 3, Request::Netcheck, now));
    assert_eq!(info.rendezvous, None);
    assert!(!info.quic_connected);
}

#[test]
fn a_netcheck_without_a_rendezvous_is_an_error() {
    let now = Instant::now();
    let mut config = config(1, Vec::new());
    config.rendezvous = false;
    let mut a = Agent::new(config, [1; 32], now, Duration::ZERO).unwrap();
    let got = ask(&mut a, 3, Request::Netcheck, now);
    assert!(
        matches!(got.as_slice(), [(RequestId(3), Response::Error { .. })]),
        "{got:?}"
    );
}

// --- status -------------------------------------------------------------------------

#[test]
fn status_counts_direct_relayed_and_offline_peers() {
    let now = Instant::now();
    let mut pair = Pair::new(now);
    // node-3 is listed but never answers; the relay is up for it.
    pair.a.handle_session_up(addr(RENDEZVOUS), None, now);
    pair.a.handle_update(Update::Upsert(entry(3)), now);
    // Traffic to node-2 makes a WireGuard session; probes prove the direct path.
    let packet = ipv4_udp(Ipv4Addr::new(100, 72, 0, 1), Ipv4Addr::new(100, 72, 0, 2));
    pair.a.node_mut().handle_tun_packet(&packet, now);
    pair.pump(now);
    while let Some(t) = pair.a.poll_relay() {
        pair.a.recycle(t.payload);
    }

    let status = status(&mut pair.a, now);

    assert_eq!(status.peers, 2);
    assert_eq!(status.peers_direct, 1, "{:?}", peers(&mut pair.a, now));
    assert_eq!(status.peers_relayed, 1);
    assert_eq!(
        status.peers_offline, 1,
        "node-3 never completed a handshake"
    );
    assert_eq!(status.name.as_deref(), Some("node-1"));
    assert_eq!(
        status.overlay_ips,
        [
            "100.72.0.1".parse::<IpAddr>().unwrap(),
            "fd00:1::1".parse().unwrap()
        ]
    );
    assert_eq!(
        status.addresses,
        [
            "100.72.0.1/16".parse::<IpNet>().unwrap(),
            "fd00:1::1/48".parse().unwrap()
        ]
    );
    assert_eq!(
        status.rendezvous,
        Some(crate::control::RendezvousInfo {
            connected: true,
            rtt_ms: None
        })
    );
    let peers = peers(&mut pair.a, now);
    assert_eq!(
        peers.iter().map(|p| p.name.as_deref()).collect::<Vec<_>>(),
        [Some("node-2"), Some("node-3")],
        "sorted by name"
    );
    assert!(peers[1].relay_reason.is_some(), "a relayed peer says why");
}

#[test]
fn the_status_shows_what_the_shell_counted() {
    let now = Instant::now();
    let mut a = agent(1, now);
    let shell = ShellStats {
        quic_not_rendezvous: 4,
        rendezvous_rtt: Some(Duration::from_millis(12)),
        ..ShellStats::default()
    };
    a.handle_session_up(addr(RENDEZVOUS), None, now);
    a.handle_api(RequestId(1), Request::Status, &shell, now);
    let got = answers(&mut a);
    let [(_, Response::Status(status))] = got.as_slice() else {
        panic!("{got:?}");
    };
    assert_eq!(status.drops.get("quic_not_rendezvous"), Some(&4));
    assert!(!status.drops.contains_key("quic_queue_full"));
    assert_eq!(
        status.rendezvous.as_ref().and_then(|r| r.rtt_ms),
        Some(12.0)
    );
    assert_eq!(status.name.as_deref(), Some("host-1"), "no welcome yet");
}

// --- prefixes behind nodes ------------------------------------------------------

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Node `n` with pod CIDRs the mesh accepted.
fn entry_with_routes(n: u8, routes: &[&str]) -> NodeEntry {
    NodeEntry {
        routes: routes.iter().map(|r| net(r)).collect(),
        ..entry(n)
    }
}

fn welcome_with(n: u8, peers: Vec<NodeEntry>, decisions: Vec<RouteDecision>) -> Update {
    Update::Welcome {
        node: entry(n),
        mesh: mesh(),
        observed: addr("203.0.113.7:40000"),
        peers,
        routes: decisions,
        paths: false,
        port_taken: None,
    }
}

fn route_changes(agent: &mut Agent) -> Vec<Vec<IpNet>> {
    host_changes(agent)
        .into_iter()
        .filter_map(|c| match c {
            HostChange::Routes(routes) => Some(routes),
            _ => None,
        })
        .collect()
}

fn routes_info(agent: &mut Agent, now: Instant) -> crate::control::RoutesInfo {
    match ask(agent, 97, Request::Routes, now).as_slice() {
        [(_, Response::Routes(info))] => (**info).clone(),
        other => panic!("expected routes, got {other:?}"),
    }
}

#[test]
fn a_peers_accepted_routes_become_its_allowed_ips_beside_its_overlay_addresses() {
    let now = Instant::now();
    let mut a = agent(1, now);
    let b = entry_with_routes(2, &["10.244.2.0/24", "fd00:244:2::/64"]);
    a.handle_update(welcome_with(1, vec![b, entry(3)], Vec::new()), now);

    let allowed = a.node().peer_status(&public(2)).unwrap().allowed_ips;
    assert_eq!(
        allowed,
        vec![
            net("100.72.0.2/32"),
            net("fd00:1::2/128"),
            net("10.244.2.0/24"),
            net("fd00:244:2::/64"),
        ]
    );
    let infos = peers(&mut a, now);
    let b = infos.iter().find(|p| p.public_key == public(2)).unwrap();
    assert_eq!(b.routes, vec![net("10.244.2.0/24"), net("fd00:244:2::/64")]);
    assert_eq!(b.overlay_ips.len(), 2, "a pod CIDR is no overlay address");
    let c = infos.iter().find(|p| p.public_key == public(3)).unwrap();
    assert!(c.routes.is_empty());
}

#[test]
fn the_union_of_peers_prefixes_goes_to_the_host_sorted_once_and_only_when_it_changes() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_update(welcome(1, &[2]), now);
    assert_eq!(
        route_changes(&mut a),
        Vec::<Vec<IpNet>>::new(),
        "no prefixes, no change"
    );

    a.handle_update(
        Update::Upsert(entry_with_routes(3, &["10.244.3.0/24"])),
        now,
    );
    a.handle_update(
        Update::Upsert(entry_with_routes(2, &["10.244.4.0/24", "10.244.2.0/24"])),
        now,
    );
    assert_eq!(
        route_changes(&mut a),
        vec![
            vec![net("10.244.3.0/24")],
            vec![
                net("10.244.2.0/24"),
                net("10.244.3.0/24"),
                net("10.244.4.0/24")
            ],
        ]
    );

    // A peer-map update that moves no prefix: a new peer, a rename, the
    // same map again.
    a.handle_update(Update::Upsert(entry(4)), now);
    let renamed = NodeEntry {
        name: "node-3-renamed".into(),
        ..entry_with_routes(3, &["10.244.3.0/24"])
    };
    a.handle_update(Update::Upsert(renamed), now);
    assert_eq!(route_changes(&mut a), Vec::<Vec<IpNet>>::new());

    // Withdrawn by the mesh, then the peer gone.
    a.handle_update(
        Update::Upsert(entry_with_routes(2, &["10.244.2.0/24"])),
        now,
    );
    assert_eq!(
        route_changes(&mut a),
        vec![vec![net("10.244.2.0/24"), net("10.244.3.0/24")]]
    );
    assert_eq!(
        a.node().peer_status(&public(2)).unwrap().allowed_ips.len(),
        3,
        "the withdrawn prefix left its allowed IPs"
    );
    a.handle_update(Update::Remove(public(3)), now);
    assert_eq!(route_changes(&mut a), vec![vec![net("10.244.2.0/24")]]);

    // A full map without the last prefix clears them all.
    a.handle_update(welcome(1, &[2, 4]), now);
    assert_eq!(route_changes(&mut a), vec![Vec::<IpNet>::new()]);
}

#[test]
fn the_cached_peer_map_routes_its_prefixes_at_start_after_the_addresses() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_cached(
        NodeCache {
            mesh: mesh(),
            node: entry(1),
            peers: vec![entry_with_routes(2, &["10.244.2.0/24"])],
        },
        now,
    );
    let changes = host_changes(&mut a);
    let addresses = changes
        .iter()
        .position(|c| matches!(c, HostChange::Addresses(_)));
    let routes = changes
        .iter()
        .position(|c| *c == HostChange::Routes(vec![net("10.244.2.0/24")]));
    assert!(
        matches!((addresses, routes), (Some(a), Some(r)) if a < r),
        "{changes:?}"
    );
    assert!(
        matches!(changes.last(), Some(HostChange::SaveCache(c)) if c.peers[0].routes == vec![net("10.244.2.0/24")]),
        "the cache keeps the prefixes: {changes:?}"
    );
}

#[test]
fn a_default_route_or_one_inside_the_overlay_prefixes_is_not_routed_to_a_peer() {
    let now = Instant::now();
    let mut a = agent(1, now);
    let b = entry_with_routes(
        2,
        &[
            "0.0.0.0/0",
            "100.72.9.0/24",
            "100.0.0.0/8",
            "10.244.2.7/24",
            "10.244.2.0/24",
        ],
    );
    a.handle_update(welcome_with(1, vec![b], Vec::new()), now);
    assert_eq!(route_changes(&mut a), vec![vec![net("10.244.2.0/24")]]);
    assert_eq!(
        a.peer_meta(&public(2)).map(|m| m.routes.clone()),
        Some(vec![net("10.244.2.0/24")])
    );
}

/// Hands `from`'s datagrams to `to` as if sent from `from_addr`; whether
/// there were any.
fn carry(from: &mut Agent, to: &mut Agent, from_addr: SocketAddr, now: Instant) -> bool {
    let mut moved = false;
    while let Some(t) = from.node_mut().poll_transmit() {
        to.node_mut()
            .handle_datagram(from_addr, t.payload.as_slice(), now);
        from.node_mut().recycle(t.payload);
        moved = true;
    }
    moved
}

#[test]
fn a_packet_from_a_peers_prefix_is_delivered_and_one_from_elsewhere_is_dropped_and_counted() {
    let now = Instant::now();
    let mut a = agent(1, now);
    let mut b = agent(2, now);
    a.handle_update(
        welcome_with(
            1,
            vec![entry_with_routes(2, &["10.244.2.0/24"])],
            Vec::new(),
        ),
        now,
    );
    b.handle_update(welcome(2, &[1]), now);
    let pod_b = Ipv4Addr::new(10, 244, 2, 5);
    let spoofed = Ipv4Addr::new(10, 244, 9, 5);
    let overlay_a = Ipv4Addr::new(100, 72, 0, 1);

    // b writes two packets to its mesh0: one from its pod, one from a pod
    // that is not its own. Each side's datagrams reach the other until
    // both are quiet (the handshake, then the data).
    b.node_mut()
        .handle_tun_packet(&ipv4_udp(pod_b, overlay_a), now);
    b.node_mut()
        .handle_tun_packet(&ipv4_udp(spoofed, overlay_a), now);
    let mut delivered = Vec::new();
    for _ in 0..10 {
        let moved =
            carry(&mut b, &mut a, underlay(2), now) | carry(&mut a, &mut b, underlay(1), now);
        while let Some(p) = a.node_mut().poll_tun() {
            let s = p.as_slice();
            delivered.push(Ipv4Addr::new(s[12], s[13], s[14], s[15]));
            a.node_mut().recycle(p);
        }
        if !moved {
            break;
        }
    }

    assert_eq!(delivered, vec![pod_b]);
    assert_eq!(
        status(&mut a, now).drops.get("source_not_allowed"),
        Some(&1),
        "the spoofed packet is counted by its reason"
    );
}

#[test]
fn the_meshs_decisions_from_the_welcome_and_later_are_kept_and_shown() {
    let now = Instant::now();
    let mut config = config(1, Vec::new());
    config.routes = vec![
        net("10.244.1.0/24"),
        net("192.168.7.0/24"),
        net("10.244.0.0/16"),
    ];
    let mut a = Agent::new(config, [1; 32], now, Duration::ZERO).unwrap();

    let before = routes_info(&mut a, now);
    assert_eq!(before.advertised.len(), 3);
    assert!(before.advertised.iter().all(|r| r.decision.is_none()));
    assert!(
        before.advertised[0]
            .explanation
            .contains("waiting for the rendezvous"),
        "{before:?}"
    );

    let decisions = vec![
        RouteDecision {
            prefix: net("10.244.1.0/24"),
            status: RouteStatus::Accepted,
        },
        RouteDecision {
            prefix: net("192.168.7.0/24"),
            status: RouteStatus::AwaitingApproval,
        },
        RouteDecision {
            prefix: net("10.244.0.0/16"),
            status: RouteStatus::Overlaps {
                node: "node-2".into(),
                held: net("10.244.2.0/24"),
            },
        },
    ];
    a.handle_update(
        welcome_with(1, vec![entry_with_routes(2, &["10.244.2.0/24"])], decisions),
        now,
    );
    let info = routes_info(&mut a, now);
    let prefixes: Vec<IpNet> = info.advertised.iter().map(|r| r.prefix).collect();
    assert_eq!(
        prefixes,
        vec![
            net("10.244.1.0/24"),
            net("192.168.7.0/24"),
            net("10.244.0.0/16")
        ]
    );
    assert_eq!(info.advertised[0].decision, Some(RouteStatus::Accepted));
    assert_eq!(
        info.advertised[1].explanation,
        "outside the mesh's routable ranges: waiting for approval (on the rendezvous: \
         mesh-rendezvous routes approve node-1 192.168.7.0/24)"
    );
    assert!(
        info.advertised[2].explanation.contains("10.244.2.0/24")
            && info.advertised[2].explanation.contains("node-2"),
        "{info:?}"
    );
    assert_eq!(info.peers.len(), 1);
    assert_eq!(info.peers[0].name.as_deref(), Some("node-2"));
    assert_eq!(info.peers[0].routes, vec![net("10.244.2.0/24")]);

    // The operator approved one; the rendezvous says so later.
    a.handle_update(
        Update::Routes(vec![
            RouteDecision {
                prefix: net("10.244.1.0/24"),
                status: RouteStatus::Accepted,
            },
            RouteDecision {
                prefix: net("192.168.7.0/24"),
                status: RouteStatus::Accepted,
            },
        ]),
        now,
    );
    let info = routes_info(&mut a, now);
    assert_eq!(info.advertised[1].decision, Some(RouteStatus::Accepted));
    assert_eq!(info.advertised[2].decision, None);
    assert!(
        info.advertised[2].explanation.contains("older than 0.4.0"),
        "{info:?}"
    );
}

/// A kernel route on mesh0.
fn kernel_route(prefix: &str, gateway: Option<&str>) -> crate::netlink::KernelRoute {
    crate::netlink::KernelRoute {
        prefix: net(prefix),
        oif: Some(7),
        gateway: gateway.map(|g| g.parse().unwrap()),
        // RTPROT_BIRD
        protocol: 12,
    }
}

#[test]
fn routes_via_a_peers_overlay_address_are_learned_as_its_prefixes_and_forgotten_when_gone() {
    let now = Instant::now();
    let mut a = agent(1, now);
    a.handle_update(welcome(1, &[2, 3]), now);
    host_changes(&mut a);
    let routes = [
        kernel_route("10.245.2.0/24", Some("100.72.0.2")),
        kernel_route("fd10:245:0:2::/64", Some("fd00:1::2")),
        kernel_route("10.245.9.0/24", None),
    ];
    a.handle_kernel_routes(&routes, now);
    let allowed = a.node().peer_status(&public(2)).unwrap().allowed_ips;
    assert!(allowed.contains(&net("10.245.2.0/24")) && allowed.contains(&net("fd10:245:0:2::/64")));
    assert!(!a
        .node()
        .peer_status(&public(3))
        .unwrap()
        .allowed_ips
        .contains(&net("10.245.2.0/24")));
    // The kernel routes them already: no route change for the host.
    assert!(route_changes(&mut a).is_empty());
    let info = routes_info(&mut a, now);
    assert_eq!(info.learned.len(), 1);
    assert_eq!(info.learned[0].name.as_deref(), Some("node-2"));
    assert_eq!(info.unusable.len(), 1);
    assert_eq!(info.unusable[0].prefix, net("10.245.9.0/24"));
    let infos = peers(&mut a, now);
    let b = infos.iter().find(|p| p.public_key == public(2)).unwrap();
    assert_eq!(b.learned_routes.len(), 2);
    // A later peer-map update keeps what was learned.
    a.handle_update(Update::Upsert(entry(2)), now);
    let allowed = a.node().peer_status(&public(2)).unwrap().allowed_ips;
    assert!(allowed.contains(&net("10.245.2.0/24")));

    // BIRD withdraws it: the prefix is no longer the peer's.
    a.handle_kernel_routes(&[], now);
    let allowed = a.node().peer_status(&public(2)).unwrap().allowed_ips;
    assert_eq!(allowed, vec![net("100.72.0.2/32"), net("fd00:1::2/128")]);
    assert!(routes_info(&mut a, now).learned.is_empty());
}

#[test]
fn meshds_own_routes_on_mesh0_are_neither_learned_nor_listed_as_unusable() {
    let now = Instant::now();
    let mut a = agent(1, now);
    let b = entry_with_routes(2, &["10.244.2.0/24"]);
    a.handle_update(welcome_with(1, vec![b], Vec::new()), now);
    let routes = [
        kernel_route("10.244.2.0/24", None),
        kernel_route("100.72.0.0/16", None),
    ];
    a.handle_kernel_routes(&routes, now);
    let info = routes_info(&mut a, now);
    assert!(
        info.learned.is_empty() && info.unusable.is_empty(),
        "{info:?}"
    );
}

#[test]
fn an_address_inside_the_mesh_or_a_peers_prefix_is_never_an_endpoint() {
    // Node 2 announces its pod bridge (inside its own accepted prefix) and
    // an overlay address as local candidates; sent there, WireGuard packets
    // would travel inside the tunnel they are meant to carry.
    let now = Instant::now();
    let mut a = agent(1, now);
    let mut two = entry_with_routes(2, &["10.244.2.0/24"]);
    two.candidates = vec![
        Candidate {
            addr: addr("10.244.2.1:51820"),
            kind: CandidateKind::Local,
            mapped: None,
        },
        Candidate {
            addr: addr("100.72.0.2:51820"),
            kind: CandidateKind::Local,
            mapped: None,
        },
        Candidate {
            addr: underlay(2),
            kind: CandidateKind::Observed,
            mapped: None,
        },
    ];
    a.handle_update(
        welcome_with(1, vec![two.clone(), entry(3)], Vec::new()),
        now,
    );
    let tried: Vec<SocketAddr> = peers(&mut a, now)
        .into_iter()
        .find(|p| p.public_key == public(2))
        .unwrap()
        .candidates
        .iter()
        .map(|c| c.endpoint)
        .collect();
    assert_eq!(tried, vec![underlay(2)]);
    // Node 3's prefix comes to cover an address node 2 announced earlier:
    // forgotten.
    let mut two = entry(2);
    two.candidates.push(Candidate {
        addr: addr("10.77.0.9:51820"),
        kind: CandidateKind::Local,
        mapped: None,
    });
    a.handle_update(Update::Upsert(two), now);
    let count = |a: &mut Agent| {
        peers(a, now)
            .into_iter()
            .find(|p| p.public_key == public(2))
            .unwrap()
            .candidates
            .len()
    };
    assert_eq!(count(&mut a), 2);
    a.handle_update(Update::Upsert(entry_with_routes(3, &["10.77.0.0/16"])), now);
    assert_eq!(count(&mut a), 1);
}

#[test]
fn paths_are_reported_only_to_a_server_that_takes_them_and_only_when_changed() {
    use crate::wire::control::{PathEntry, PathState};
    let now = Instant::now();
    let with_paths = |paths| match welcome(1, &[2, 3]) {
        Update::Welcome {
            node,
            mesh,
            observed,
            peers,
            routes,
            port_taken,
            ..
        } => Update::Welcome {
            node,
            mesh,
            observed,
            peers,
            routes,
            paths,
            port_taken,
        },
        other => other,
    };
    let paths_sent = |a: &mut Agent| -> Vec<Vec<PathEntry>> {
        messages(a)
            .into_iter()
            .filter_map(|m| match m {
                NodeMessage::Paths { peers } => Some(peers.entries),
                _ => None,
            })
            .collect()
    };

    // A server before 0.4.0: nothing, however long.
    let mut old = agent(1, now);
    old.handle_session_up(addr(RENDEZVOUS), None, now);
    old.handle_update(with_paths(false), now);
    advance(&mut old, now + Duration::from_secs(30), &mut |_| {});
    assert_eq!(paths_sent(&mut old), Vec::<Vec<PathEntry>>::new());

    // A server that takes them: one report at once, every mesh peer down
    // (no handshake yet), sorted by key.
    let mut a = agent(1, now);
    a.handle_session_up(addr(RENDEZVOUS), None, now);
    a.handle_update(with_paths(true), now);
    assert_eq!(a.poll_timeout(), (now, TimeoutReason::PathReport));
    a.handle_timeout(now);
    let mut expected: Vec<PathEntry> = [2, 3]
        .map(|n| PathEntry {
            peer: public(n),
            path: PathState::Down,
            rtt_us: None,
        })
        .into();
    expected.sort_by_key(|e| e.peer);
    assert_eq!(paths_sent(&mut a), vec![expected]);
    // Nothing changed: nothing more, however long.
    advance(&mut a, now + Duration::from_secs(30), &mut |_| {});
    assert_eq!(paths_sent(&mut a), Vec::<Vec<PathEntry>>::new());
    // A new session: its server hears again; a lost one stops the reports.
    a.handle_update(Update::Disconnected, now + Duration::from_secs(30));
    assert_ne!(a.poll_timeout().1, TimeoutReason::PathReport);
    let later = now + Duration::from_secs(31);
    a.handle_update(with_paths(true), later);
    a.handle_timeout(later);
    assert_eq!(paths_sent(&mut a).len(), 1);
}
