#![cfg(feature = "sim")]
//! Path probes under attack: recorded probes replayed after a restart, a
//! recorded ping replayed from many source ports, and a punch storm
//! (`cargo test --features sim --test sim_probe_replay`; proto/probe.md,
//! "Replay").
//!
//! The attacker sits on the internet: it has seen every probe two nodes
//! exchanged and can send anything from any address, but holds no key.
//! Every scenario runs once per seed in [`meshd::sim::SEEDS`].
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

use std::net::SocketAddr;
use std::time::Duration;

use meshd::engine::paths::{Path, PathStatus, MAX_UNCONFIRMED};
use meshd::engine::{DropReason, Event};
use meshd::sim::{for_each_seed, Datagram, LinkConfig, NodeId, Sim};
use meshd::wire::probe;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const ATTACKER: &str = "203.0.113.66";

/// Two public nodes introduced by the rendezvous (relay up), direct to
/// each other, with every datagram between them recorded.
fn direct_pair_recorded(seed: u64) -> (Sim, NodeId, NodeId, Vec<Datagram>) {
    let mut sim = Sim::new(seed);
    let a = sim.add_node(
        "node-a",
        "100.72.0.1".parse().unwrap(),
        addr("198.51.100.1:51820"),
    );
    let b = sim.add_node(
        "node-b",
        "100.72.0.2".parse().unwrap(),
        addr("198.51.100.2:51820"),
    );
    sim.connect(a, b);
    sim.introduce(a, b);
    sim.net_mut().start_capture();
    sim.run_until(|s| is_direct(s, a, b) && is_direct(s, b, a), secs(30))
        .unwrap_or_else(|e| panic!("never direct: {e} (seed {seed})"));
    // Several rounds of probes on the live path to record.
    sim.run_for(secs(20));
    let recorded = sim
        .net()
        .captured()
        .iter()
        .map(|c| c.datagram.clone())
        .collect();
    (sim, a, b, recorded)
}

fn is_direct(sim: &Sim, node: NodeId, peer: NodeId) -> bool {
    matches!(path(sim, node, peer), PathStatus::Direct { .. })
}

fn path(sim: &Sim, node: NodeId, peer: NodeId) -> PathStatus {
    sim.node(node)
        .peer_status(&sim.public_key(peer))
        .map_or(PathStatus::Unknown, |s| s.path)
}

/// Probes among `recorded` sent to `to`, pings if `pings`, else pongs.
fn probes_to(recorded: &[Datagram], to: SocketAddr, pings: bool) -> Vec<Datagram> {
    let want = |d: &Datagram| match probe::peek(&d.payload) {
        Ok(p) => matches!(p.kind, probe::ProbeKind::Ping { .. }) == pings,
        Err(_) => false,
    };
    recorded
        .iter()
        .filter(|d| d.dst == to && want(d))
        .cloned()
        .collect()
}

/// `node` restarts and comes back with the peer map it had: `peer` with
/// its candidates, relay up.
fn restart(sim: &mut Sim, node: NodeId, peer: NodeId) {
    sim.restart(node);
    let spec = sim.peer_spec(peer);
    sim.add_peer(node, spec).expect("peer again");
    sim.introduce(node, peer);
}

fn direct_paths_taken(sim: &Sim, node: NodeId, peer: NodeId) -> Vec<SocketAddr> {
    let key = sim.public_key(peer);
    sim.events(node)
        .iter()
        .filter_map(|e| match e {
            Event::PathChanged {
                peer,
                path: Path::Direct(addr),
            } if *peer == key => Some(*addr),
            _ => None,
        })
        .collect()
}

#[test]
fn replayed_pongs_after_a_restart_move_no_path() {
    for_each_seed(|seed| {
        let (mut sim, a, b, recorded) = direct_pair_recorded(seed);
        let addr_a = sim.addr(a);
        let pongs = probes_to(&recorded, addr_a, false);
        assert!(
            pongs.len() >= 10,
            "recorded {} pongs (seed {seed})",
            pongs.len()
        );

        // The direct path dies for good, and node-a restarts: from now on
        // only the relay can carry a's traffic to b.
        sim.set_link_between(a, b, LinkConfig::default().loss(1.0));
        restart(&mut sim, a, b);

        // For 30 s, every recorded pong arrives at a again, four times a
        // second, as b sent it and from an address of the attacker's.
        let attacker = addr(&format!("{ATTACKER}:4444"));
        for _ in 0..120 {
            for pong in &pongs {
                sim.inject(pong.src, addr_a, &pong.payload);
                sim.inject(attacker, addr_a, &pong.payload);
            }
            sim.run_for(Duration::from_millis(250));
        }

        assert_eq!(
            direct_paths_taken(&sim, a, b),
            [],
            "a dead path was taken for alive (seed {seed})"
        );
        assert_eq!(path(&sim, a, b), PathStatus::Relay, "seed {seed}");
        let unmatched = sim.node(a).stats().dropped(DropReason::UnmatchedPong);
        assert!(
            unmatched >= 120 * pongs.len() as u64,
            "{unmatched} pongs counted as unmatched (seed {seed})"
        );
    });
}

#[test]
fn a_recorded_ping_replayed_from_many_ports_adds_no_candidate_and_bounded_probes() {
    for_each_seed(|seed| {
        let (mut sim, a, b, recorded) = direct_pair_recorded(seed);
        let addr_a = sim.addr(a);
        let pings = probes_to(&recorded, addr_a, true);
        assert!(!pings.is_empty(), "seed {seed}");
        restart(&mut sim, a, b);

        // Each recorded ping, again and again, from 500 ports of the
        // attacker's (and from b's own address: a plain replay).
        let mut injected = 0u64;
        for round in 0..20u16 {
            for (i, ping) in pings.iter().enumerate() {
                let port = 2000 + ((round as usize * pings.len() + i) % 500) as u16;
                sim.inject(addr(&format!("{ATTACKER}:{port}")), addr_a, &ping.payload);
                sim.inject(ping.src, addr_a, &ping.payload);
                injected += 2;
            }
            sim.run_for(secs(1));
        }
        sim.run_for(secs(60));

        let status = sim
            .node(a)
            .peer_status(&sim.public_key(b))
            .expect("b is a peer");
        let attacker_ip = ATTACKER.parse::<std::net::IpAddr>().unwrap();
        let shown: Vec<_> = status
            .candidates
            .iter()
            .filter(|c| c.addr.ip() == attacker_ip)
            .collect();
        assert!(
            shown.is_empty(),
            "attacker addresses became candidates: {shown:?} (seed {seed})"
        );
        assert!(
            direct_paths_taken(&sim, a, b)
                .iter()
                .all(|p| p.ip() != attacker_ip),
            "seed {seed}"
        );
        // Most copies are refused as replays; what a answered or probed
        // towards the attacker is bounded however long the replay goes on.
        let replayed = sim.node(a).stats().dropped(DropReason::ReplayedProbe);
        assert!(
            replayed * 2 >= injected,
            "only {replayed} of {injected} refused as replays (seed {seed})"
        );
        eprintln!("seed {seed}: {replayed} of {injected} replayed pings refused");
        let to_attacker = sim
            .net()
            .captured()
            .iter()
            .filter(|c| c.datagram.src == addr_a && c.datagram.dst.ip() == attacker_ip)
            .count();
        // At most one pong per recorded ping (each is fresh once, to a node
        // that just started), and a few probes per unconfirmed address.
        let bound = 3 * pings.len() + MAX_UNCONFIRMED * 3;
        eprintln!(
            "seed {seed}: {to_attacker} datagrams to the attacker's addresses (bound {bound})"
        );
        assert!(
            to_attacker <= bound,
            "{to_attacker} datagrams to the attacker, bound {bound} (seed {seed})"
        );
    });
}

#[test]
fn a_punch_storm_costs_a_bounded_number_of_probes() {
    for_each_seed(|seed| {
        let (mut sim, a, b, _) = direct_pair_recorded(seed);
        let key_b = sim.public_key(b);
        let addr_a = sim.addr(a);
        let probes_from_a = |sim: &Sim| {
            (sim.net().captured().iter())
                .filter(|c| c.datagram.src == addr_a && probe::is_probe(&c.datagram.payload))
                .count()
        };
        // A quiet second first, as the baseline.
        let before = probes_from_a(&sim);
        sim.run_for(secs(10));
        let quiet = probes_from_a(&sim) - before;

        // A member asks a, through the rendezvous, to punch b 100 times a
        // second for 10 s.
        let before = probes_from_a(&sim);
        let mut honoured = 0;
        for _ in 0..100 {
            for _ in 0..10 {
                if sim.with_node(a, |n, now| n.punch(&key_b, now)) {
                    honoured += 1;
                }
            }
            sim.run_for(Duration::from_millis(100));
        }
        let stormy = probes_from_a(&sim) - before;
        eprintln!("seed {seed}: {honoured} of 1000 punches honoured; {stormy} probes in the storm, {quiet} in a quiet 10 s");
        // b has two candidates for a (observed and local: the same address
        // here), so each honoured punch is a round of one or two pings.
        assert!(
            honoured <= 6,
            "{honoured} punches honoured in 10 s (seed {seed})"
        );
        assert!(
            stormy <= quiet + 12,
            "{stormy} probes in the storm, {quiet} in a quiet 10 s (seed {seed})"
        );
    });
}
