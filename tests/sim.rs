#![cfg(feature = "sim")]
//! Simulation scenarios: whole meshes of engine nodes on a simulated network,
//! in simulated time (`cargo test --features sim --test sim`).
//!
//! Every scenario runs once per seed in [`meshd::sim::SEEDS`]; a failure names its seed,
//! and `MESHD_SIM_SEED=<seed>` reruns just that one.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use meshd::engine::{DropReason, Event};
use meshd::sim::packet::{icmp_echo_request, udp_probe, udp_probe_sized, Inner};
use meshd::sim::{for_each_seed, LinkConfig, NodeId, Sim, TraceEntry};
use rand::{Rng, RngCore};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// Two nodes, configured as each other's peers, with no session yet.
fn two_peers(mut sim: Sim) -> (Sim, NodeId, NodeId) {
    let a = sim.add_node("a", ip("100.72.0.1"), addr("192.0.2.1:51820"));
    let b = sim.add_node("b", ip("100.72.0.2"), addr("198.51.100.2:51820"));
    sim.connect(a, b);
    (sim, a, b)
}

/// Lets `from` start a session with `to` by sending it a packet, waits for
/// that packet to arrive, and empties `to`'s TUN again.
fn establish(sim: &mut Sim, from: NodeId, to: NodeId) {
    sim.send_probe(from, to, u64::MAX);
    sim.run_until(
        |s| s.probes_received(to, from).contains(&u64::MAX),
        secs(10),
    )
    .unwrap_or_else(|e| panic!("{} could not reach {}: {e}", sim.name(from), sim.name(to)));
    sim.take_tun(to);
}

/// Sends probe `seq` each way between `a` and `b`, then lets `interval` pass.
fn exchange(sim: &mut Sim, a: NodeId, b: NodeId, seq: u64, interval: Duration) {
    sim.send_probe(a, b, seq);
    sim.send_probe(b, a, seq);
    sim.run_for(interval);
}

fn all_up_to(n: u64) -> Vec<u64> {
    (0..n).collect()
}

fn endpoint_changes(sim: &Sim, node: NodeId) -> Vec<SocketAddr> {
    sim.events(node)
        .iter()
        .filter_map(|e| match e {
            Event::EndpointChanged { endpoint, .. } => Some(*endpoint),
            _ => None,
        })
        .collect()
}

#[test]
fn two_peers_handshake_and_exchange_data_both_ways() {
    for_each_seed(|seed| {
        let (mut sim, a, b) = two_peers(Sim::new(seed));

        sim.send_probe(a, b, 0);
        sim.run_until(|s| s.probes_received(b, a) == [0], secs(10))
            .unwrap_or_else(|e| panic!("a's first packet never arrived: {e}"));
        for seq in 1..20 {
            exchange(&mut sim, a, b, seq, millis(50));
        }
        sim.run_for(secs(1));

        assert_eq!(sim.probes_received(b, a), all_up_to(20));
        assert_eq!(sim.probes_received(a, b), (1..20).collect::<Vec<_>>());
        assert!(sim.handshakes_completed(a, b) >= 1);
        assert!(sim.handshakes_completed(b, a) >= 1);
        assert!(
            endpoint_changes(&sim, a).is_empty(),
            "a's endpoint for b was configured right"
        );
    });
}

#[test]
fn session_rekeys_after_rekey_after_time_without_losing_data() {
    for_each_seed(|seed| {
        let (mut sim, a, b) = two_peers(Sim::new(seed));
        establish(&mut sim, a, b);

        // Ten packets a second each way for 260 s: past REKEY_AFTER_TIME
        // (120 s, WireGuard paper §6.1) twice.
        let sent = 2600;
        for seq in 0..sent {
            exchange(&mut sim, a, b, seq, millis(100));
        }
        sim.run_for(secs(1));

        assert!(
            sim.handshakes_completed(a, b) >= 2,
            "a completed {} handshakes",
            sim.handshakes_completed(a, b)
        );
        assert!(
            sim.handshakes_completed(b, a) >= 2,
            "b completed {} handshakes",
            sim.handshakes_completed(b, a)
        );
        assert_eq!(sim.probes_received(b, a), all_up_to(sent));
        assert_eq!(sim.probes_received(a, b), all_up_to(sent));
    });
}

#[test]
fn handshake_completes_under_30_percent_loss() {
    for_each_seed(|seed| {
        let lossy = LinkConfig::default().loss(0.3);
        let (mut sim, a, b) = two_peers(Sim::with_link(seed, lossy));

        // A packet a second until one gets through: that takes a handshake
        // whose initiation and response both survived, then the data.
        for seq in 0..90 {
            sim.send_probe(a, b, seq);
            sim.run_for(secs(1));
            if !sim.probes_received(b, a).is_empty() {
                break;
            }
        }

        assert!(
            !sim.probes_received(b, a).is_empty(),
            "nothing got through in 90 s"
        );
        assert!(sim.handshakes_completed(a, b) >= 1);
        assert!(sim.handshakes_completed(b, a) >= 1);
        assert!(sim.net().stats().lost > 0, "the network did lose datagrams");

        // Once the network heals, everything arrives.
        sim.net_mut().set_default_link(LinkConfig::default());
        for seq in 100..110 {
            exchange(&mut sim, a, b, seq, millis(100));
        }
        sim.run_for(secs(1));

        let healed: Vec<u64> = (100..110).collect();
        let since_healing = |probes: Vec<u64>| -> Vec<u64> {
            probes.into_iter().filter(|seq| *seq >= 100).collect()
        };
        assert_eq!(since_healing(sim.probes_received(b, a)), healed);
        assert_eq!(since_healing(sim.probes_received(a, b)), healed);
    });
}

#[test]
fn nat_rebinding_keeps_the_session() {
    for_each_seed(|seed| {
        let (mut sim, a, b) = two_peers(Sim::new(seed));
        establish(&mut sim, a, b);
        let rebound = addr("203.0.113.9:61000");

        let interval = millis(100);
        let rebind_at = 30;
        let settled_by = rebind_at + 10; // one second later
        for seq in 0..100 {
            if seq == rebind_at {
                sim.rebind(b, rebound);
            }
            exchange(&mut sim, a, b, seq, interval);
        }
        sim.run_for(secs(1));

        assert_eq!(endpoint_changes(&sim, a), [rebound]);
        assert!(sim.events(a).contains(&Event::EndpointChanged {
            peer: sim.public_key(b),
            endpoint: rebound
        }));
        assert_eq!(sim.endpoint_of(a, b), Some(rebound));
        assert_eq!(
            sim.probes_received(a, b),
            all_up_to(100),
            "b's packets never had a stale address"
        );
        let at_b = sim.probes_received(b, a);
        let late: Vec<u64> = at_b.iter().copied().filter(|s| *s >= settled_by).collect();
        assert_eq!(
            late,
            (settled_by..100).collect::<Vec<_>>(),
            "a's packets reach b's new address"
        );
        assert!(
            sim.net().stats().unroutable <= 2,
            "at most what was in flight to the old address is lost"
        );
    });
}

#[test]
fn garbage_datagrams_are_dropped_and_counted_without_disturbing_sessions() {
    for_each_seed(|seed| {
        let (mut sim, a, b) = two_peers(Sim::new(seed));
        let attacker = addr("203.0.113.66:6666");
        let attacker_sink = sim.add_sink(attacker);
        sim.net_mut().start_capture();
        establish(&mut sim, a, b);
        for seq in 0..10 {
            exchange(&mut sim, a, b, seq, millis(100));
        }
        let wireguard_seen: Vec<Vec<u8>> = sim
            .net()
            .captured()
            .iter()
            .filter(|c| c.datagram.dst == sim.addr(a))
            .map(|c| c.datagram.payload.clone())
            .collect();
        let data_seen: Vec<&Vec<u8>> = wireguard_seen
            .iter()
            .filter(|p| p.first() == Some(&4) && p.len() > 32)
            .collect();
        assert!(!data_seen.is_empty());
        let drops_before = sim.node(a).stats().dropped_total();

        let mut injected = 0u64;
        for seq in 10..110 {
            for _ in 0..10 {
                let garbage = match injected % 4 {
                    // Up to the largest UDP payload a 1500-byte path carries.
                    0 => random_bytes(&mut sim, 0..=1472),
                    1 => {
                        // Looks like WireGuard: type 1..=4, three zero bytes, wrong length.
                        let mut g = random_bytes(&mut sim, 4..=300);
                        g[0] = sim.rng().gen_range(1..=4);
                        g[1..4].fill(0);
                        g
                    }
                    2 => {
                        let i = sim.rng().gen_range(0..wireguard_seen.len());
                        let whole = &wireguard_seen[i];
                        let cut = sim.rng().gen_range(0..whole.len());
                        whole[..cut].to_vec()
                    }
                    _ => {
                        let i = sim.rng().gen_range(0..data_seen.len());
                        let mut flipped = data_seen[i].clone();
                        let bit = sim.rng().gen_range(0..flipped.len() * 8);
                        flipped[bit / 8] ^= 1 << (bit % 8);
                        flipped
                    }
                };
                sim.inject(attacker, sim.addr(a), &garbage);
                injected += 1;
                sim.run_for(millis(10));
            }
            sim.send_probe(a, b, seq);
            sim.send_probe(b, a, seq);
        }
        sim.run_for(secs(1));

        let stats = sim.node(a).stats();
        assert_eq!(
            stats.dropped_total() - drops_before,
            injected,
            "every garbage datagram is counted once"
        );
        assert!(stats.dropped(DropReason::NotWireGuard) > 0);
        assert!(stats.dropped(DropReason::Malformed) > 0);
        assert!(stats.dropped(DropReason::DecryptFailed) + stats.dropped(DropReason::Replayed) > 0);
        assert_eq!(
            sim.endpoint_of(a, b),
            Some(sim.addr(b)),
            "the endpoint never follows garbage"
        );
        assert!(endpoint_changes(&sim, a).is_empty());
        assert!(
            sim.sink(attacker_sink).is_empty(),
            "garbage is never answered"
        );
        assert_eq!(sim.probes_received(a, b), all_up_to(110));
        assert_eq!(sim.probes_received(b, a), all_up_to(110));
        assert!(
            sim.tun(a)
                .iter()
                .all(|p| Inner::parse(p).and_then(|i| i.probe_seq()).is_some()),
            "nothing but b's probes reached a's TUN"
        );
    });
}

/// An attacker with a key of its own that knows `victim`'s public key: its
/// initiations carry a valid MAC1 and would each cost the victim a DH.
fn attacker_of(sim: &mut Sim, victim: NodeId) -> Tunn {
    let mut secret = [0u8; 32];
    sim.rng().fill_bytes(&mut secret);
    let victim = boringtun::x25519::PublicKey::from(*sim.public_key(victim).as_bytes());
    Tunn::new(
        boringtun::x25519::StaticSecret::from(secret),
        victim,
        None,
        None,
        0,
        None,
    )
}

/// A fresh handshake initiation from `tunn`.
fn initiation(tunn: &mut Tunn) -> Vec<u8> {
    let mut buf = [0u8; 256];
    match tunn.format_handshake_initiation(&mut buf, true) {
        TunnResult::WriteToNetwork(init) => init.to_vec(),
        _ => panic!("boringtun formats an initiation"),
    }
}

#[test]
fn handshake_flood_gets_cookie_replies_while_the_session_keeps_passing_data() {
    for_each_seed(|seed| {
        let (mut sim, a, b) = two_peers(Sim::new(seed));
        establish(&mut sim, a, b);
        let attacker = addr("203.0.113.66:6666");
        let attacker_sink = sim.add_sink(attacker);

        let mut attacker_tunn = attacker_of(&mut sim, a);

        // 1000 initiations in one second, with data flowing both ways.
        for i in 0..1000u64 {
            let init = initiation(&mut attacker_tunn);
            sim.inject(attacker, sim.addr(a), &init);
            if i % 100 == 0 {
                sim.send_probe(a, b, i / 100);
                sim.send_probe(b, a, i / 100);
            }
            sim.run_for(millis(1));
        }
        // And afterwards.
        for seq in 10..20 {
            exchange(&mut sim, a, b, seq, millis(100));
        }
        sim.run_for(secs(1));

        let cookies = sim.node(a).stats().cookie_replies_sent;
        assert!(cookies > 0, "a flood gets cookie replies");
        let replies = sim.sink(attacker_sink);
        assert_eq!(
            replies.len() as u64,
            cookies,
            "cookie replies go to the flooding address"
        );
        assert!(replies
            .iter()
            .all(|d| d.payload.first() == Some(&3) && d.payload.len() == 64));
        assert!(
            sim.node(a).stats().dropped(DropReason::UnknownPeer) > 0,
            "the rest were looked at and refused"
        );
        assert_eq!(sim.probes_received(b, a), all_up_to(20));
        assert_eq!(sim.probes_received(a, b), all_up_to(20));
        assert_eq!(sim.endpoint_of(a, b), Some(sim.addr(b)));

        // More than a second after the flood, the limiter has reset: a new
        // legitimate peer's handshake needs no cookie.
        sim.run_for(secs(2));
        let c = sim.add_node("c", ip("100.72.0.3"), addr("192.0.2.3:51820"));
        sim.connect(a, c);
        sim.send_probe(c, a, 1);
        sim.run_for(secs(1));

        assert_eq!(sim.node(a).stats().cookie_replies_sent, cookies);
        assert!(sim.handshakes_completed(c, a) >= 1);
        assert_eq!(sim.probes_received(a, c), [1]);
    });
}

#[test]
fn replayed_data_packet_from_another_address_does_not_move_the_endpoint() {
    for_each_seed(|seed| {
        let (mut sim, a, b) = two_peers(Sim::new(seed));
        establish(&mut sim, a, b);
        sim.net_mut().start_capture();
        sim.send_probe(b, a, 1);
        sim.run_for(secs(1));
        let data = sim
            .net()
            .captured()
            .iter()
            .find(|c| {
                c.datagram.src == sim.addr(b)
                    && c.datagram.payload.first() == Some(&4)
                    && c.datagram.payload.len() > 32
            })
            .expect("b's data packet was captured")
            .datagram
            .payload
            .clone();

        sim.inject(addr("203.0.113.66:51820"), sim.addr(a), &data);
        sim.run_for(secs(1));
        sim.send_probe(b, a, 2);
        sim.run_for(secs(1));

        assert_eq!(sim.node(a).stats().dropped(DropReason::Replayed), 1);
        assert_eq!(sim.endpoint_of(a, b), Some(sim.addr(b)));
        assert!(endpoint_changes(&sim, a).is_empty());
        assert_eq!(
            sim.probes_received(a, b),
            [1, 2],
            "the replay was not delivered twice"
        );
    });
}

#[test]
fn a_packet_to_an_overlay_address_no_peer_owns_gets_icmp_host_unreachable() {
    for_each_seed(|seed| {
        let (mut sim, a, _b) = two_peers(Sim::new(seed));
        let nowhere = ip("100.72.0.99");
        let sent_before = sim.net().stats().sent;

        let packet = udp_probe(sim.overlay(a), nowhere, 1);
        sim.send_tun(a, &packet);

        let tun = sim.tun(a);
        assert_eq!(tun.len(), 1);
        let icmp = Inner::parse(&tun[0]).expect("a well-formed IPv4 packet");
        assert_eq!(icmp.icmp_type_code(), Some((3, 1)), "ICMP host unreachable");
        assert_eq!(icmp.dst, sim.overlay(a), "it goes back to the sender");
        assert_eq!(&icmp.body[8..], &packet[..], "it quotes the original");
        assert_eq!(sim.node(a).stats().dropped(DropReason::NoRoute), 1);
        assert_eq!(
            sim.net().stats().sent,
            sent_before,
            "nothing went to the network"
        );
    });
}

#[test]
fn a_packet_for_a_peer_with_no_known_endpoint_gets_icmp_host_unreachable() {
    for_each_seed(|seed| {
        let mut sim = Sim::new(seed);
        let a = sim.add_node("a", ip("100.72.0.1"), addr("192.0.2.1:51820"));
        let b = sim.add_node("b", ip("100.72.0.2"), addr("198.51.100.2:51820"));
        let mut spec = sim.peer_spec(b);
        spec.endpoint = None;
        sim.add_peer(a, spec).unwrap();

        let ping = icmp_echo_request(sim.overlay(a), sim.overlay(b), 7, 1);
        sim.send_tun(a, &ping);
        sim.run_for(secs(1));

        let icmp: Vec<_> = sim
            .tun(a)
            .iter()
            .filter_map(|p| Inner::parse(p)?.icmp_type_code())
            .collect();
        assert_eq!(icmp, [(3, 1)], "ping fails at once instead of timing out");
        assert_eq!(sim.node(a).stats().dropped(DropReason::NoEndpoint), 1);
    });
}

#[test]
fn a_three_node_mesh_exchanges_data_between_all_pairs() {
    for_each_seed(|seed| {
        let mut sim = Sim::new(seed);
        let nodes = [
            sim.add_node("a", ip("100.72.0.1"), addr("192.0.2.1:51820")),
            sim.add_node("b", ip("100.72.0.2"), addr("198.51.100.2:51820")),
            sim.add_node("c", ip("100.72.0.3"), addr("203.0.113.3:51820")),
        ];
        let [a, b, c] = nodes;
        sim.set_link_between(a, c, LinkConfig::with_latency(millis(80)));
        sim.connect_all();
        establish(&mut sim, a, b);
        establish(&mut sim, a, c);
        establish(&mut sim, b, c);

        for seq in 0..20 {
            for from in nodes {
                for to in nodes.into_iter().filter(|to| *to != from) {
                    sim.send_probe(from, to, seq);
                }
            }
            sim.run_for(millis(50));
        }
        sim.run_for(secs(1));

        for from in nodes {
            for to in nodes.into_iter().filter(|to| *to != from) {
                assert_eq!(
                    sim.probes_received(to, from),
                    all_up_to(20),
                    "{} -> {}",
                    sim.name(from),
                    sim.name(to)
                );
                assert!(sim.handshakes_completed(from, to) >= 1);
            }
        }
        assert_eq!(sim.node(b).peers().count(), 2);
    });
}

#[test]
fn datagrams_larger_than_the_path_mtu_are_dropped_by_the_network_and_counted() {
    for_each_seed(|seed| {
        let (mut sim, a, b) = two_peers(Sim::with_link(seed, LinkConfig::default().mtu(1280)));
        establish(&mut sim, a, b);

        // 1380-byte inner packet + 32 bytes of WireGuard + 28 of IPv4/UDP.
        let big = udp_probe_sized(sim.overlay(a), sim.overlay(b), 1, 1380 - 28);
        sim.send_tun(a, &big);
        sim.send_probe(a, b, 2);
        sim.run_for(secs(1));

        assert_eq!(sim.net().stats().too_big, 1);
        assert_eq!(sim.probes_received(b, a), [2]);
    });
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    fn lossy_mesh(seed: u64) -> (Vec<TraceEntry>, meshd::sim::NetStats) {
        let link = LinkConfig::default().loss(0.2).jitter(millis(15));
        let mut sim = Sim::with_link(seed, link);
        let nodes = [
            sim.add_node("a", ip("100.72.0.1"), addr("192.0.2.1:51820")),
            sim.add_node("b", ip("100.72.0.2"), addr("198.51.100.2:51820")),
            sim.add_node("c", ip("100.72.0.3"), addr("203.0.113.3:51820")),
        ];
        sim.connect_all();
        for seq in 0..100 {
            let from = nodes[sim.rng().gen_range(0..3)];
            let to = nodes[sim.rng().gen_range(0..3)];
            if from != to {
                sim.send_probe(from, to, seq);
            }
            sim.run_for(millis(200));
        }
        sim.rebind(nodes[1], addr("198.51.100.2:40000"));
        for seq in 100..150 {
            sim.send_probe(nodes[1], nodes[0], seq);
            sim.run_for(millis(100));
        }
        (sim.trace().to_vec(), sim.net().stats())
    }

    for_each_seed(|seed| {
        let (first_trace, first_stats) = lossy_mesh(seed);
        let (second_trace, second_stats) = lossy_mesh(seed);
        assert_eq!(first_stats, second_stats);
        assert_eq!(first_trace, second_trace);
        let (other_trace, _) = lossy_mesh(seed + 1000);
        assert_ne!(
            first_trace, other_trace,
            "a different seed gives a different run"
        );
    });
}

fn random_bytes(sim: &mut Sim, len: std::ops::RangeInclusive<usize>) -> Vec<u8> {
    let len = sim.rng().gen_range(len);
    let mut bytes = vec![0u8; len];
    sim.rng().fill_bytes(&mut bytes);
    bytes
}

#[test]
fn peers_that_initiate_at_the_same_moment_settle_without_a_handshake_storm() {
    for_each_seed(|seed| {
        let (mut sim, a, b) = two_peers(Sim::new(seed));

        for seq in 0..10 {
            exchange(&mut sim, a, b, seq, millis(50));
        }
        sim.run_for(secs(1));

        assert_eq!(sim.probes_received(b, a), all_up_to(10));
        assert_eq!(sim.probes_received(a, b), all_up_to(10));
        // Each side answers the other's initiation and completes its own.
        assert_eq!(sim.handshakes_completed(a, b), 2);
        assert_eq!(sim.handshakes_completed(b, a), 2);
        assert_eq!(sim.node(a).stats().dropped_total(), 0);
        assert_eq!(sim.node(b).stats().dropped_total(), 0);
    });
}

#[test]
fn a_source_holding_a_valid_cookie_is_held_to_its_share_of_handshakes() {
    for_each_seed(|seed| {
        let (mut sim, a, b) = two_peers(Sim::new(seed));
        establish(&mut sim, a, b);
        let attacker = addr("203.0.113.66:6666");
        let attacker_sink = sim.add_sink(attacker);
        let mut attacker_tunn = attacker_of(&mut sim, a);

        // The attacker first earns a cookie for its address, as anyone can:
        // it pushes a over its limit, and takes the cookie reply to its
        // last initiation.
        for _ in 0..=100 {
            let init = initiation(&mut attacker_tunn);
            sim.inject(attacker, sim.addr(a), &init);
        }
        sim.run_for(millis(200));
        let cookie_reply = sim
            .sink(attacker_sink)
            .last()
            .expect("a cookie reply")
            .payload
            .clone();
        let mut out = [0u8; 256];
        assert!(
            matches!(
                attacker_tunn.decapsulate(None, &cookie_reply, &mut out),
                TunnResult::Done
            ),
            "the attacker holds a valid cookie (seed {seed})"
        );

        // Then 1000 initiations a second for 8 s, each with a valid MAC2,
        // while a and b exchange data and a new peer c joins.
        let before = sim.node(a).stats().dropped(DropReason::UnknownPeer);
        let c = sim.add_node("c", ip("100.72.0.3"), addr("192.0.2.3:51820"));
        sim.connect(a, c);
        for i in 0..8000u64 {
            let init = initiation(&mut attacker_tunn);
            sim.inject(attacker, sim.addr(a), &init);
            if i % 100 == 0 {
                sim.send_probe(a, b, i / 100);
                sim.send_probe(b, a, i / 100);
                sim.send_probe(c, a, i / 100);
            }
            sim.run_for(millis(1));
        }
        sim.run_for(secs(1));

        // Each second, the interface's own budget (100) reaches the DH and
        // the key lookup; past it, this source gets no more.
        let looked_at = sim.node(a).stats().dropped(DropReason::UnknownPeer) - before;
        assert!(
            looked_at <= 9 * 120,
            "{looked_at} of 8000 initiations cost a DH (seed {seed})"
        );
        assert!(
            sim.node(a)
                .stats()
                .dropped(DropReason::HandshakeRateLimited)
                >= 6000,
            "seed {seed}"
        );
        assert_eq!(sim.probes_received(b, a), all_up_to(80), "seed {seed}");
        assert!(
            sim.handshakes_completed(c, a) >= 1,
            "a new peer still gets in (seed {seed})"
        );
        assert!(!sim.probes_received(a, c).is_empty(), "seed {seed}");
    });
}

#[test]
fn a_peer_that_stays_offline_expires_once_not_on_every_tick() {
    for_each_seed(|seed| {
        let (mut sim, a, b) = two_peers(Sim::new(seed));
        // b is unreachable from the start: a's handshakes go unanswered.
        sim.set_link_between(a, b, LinkConfig::default().loss(1.0));
        sim.send_probe(a, b, 1);
        sim.run_for(secs(600));
        let expiries = (sim.events(a).iter())
            .filter(|e| matches!(e, Event::SessionExpired { .. }))
            .count();
        assert_eq!(expiries, 1, "seed {seed}");
    });
}
