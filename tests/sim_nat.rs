#![cfg(feature = "sim")]
//! Path selection through simulated NATs: direct paths found by probing and
//! hole punching, the relay when none works, and failover between the two
//! without touching the WireGuard session
//! (`cargo test --features sim --test sim_nat`).
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

use ipnet::IpNet;
use meshd::engine::paths::{Path, PathStatus};
use meshd::engine::Event;
use meshd::sim::{for_each_seed, LinkConfig, NatConfig, NodeId, RelayConfig, Sim, TraceEntry};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// Which NAT a node sits behind.
#[derive(Debug, Clone, Copy)]
enum Behind {
    PortRestrictedCone,
    Symmetric,
}

/// Node number `n` (1-based) behind a NAT of its own: public address
/// 203.0.113.n, private subnet 10.0.n.0/24, socket at 10.0.n.2:51820.
fn node_behind(sim: &mut Sim, n: u8, nat: Behind) -> NodeId {
    let public = IpAddr::from([203, 0, 113, n]);
    let subnet: IpNet = format!("10.0.{n}.0/24").parse().unwrap();
    let config = match nat {
        Behind::PortRestrictedCone => NatConfig::port_restricted_cone(public, subnet),
        Behind::Symmetric => NatConfig::symmetric(public, subnet),
    };
    let nat = sim.net_mut().add_nat(config);
    let private = SocketAddr::new(IpAddr::from([10, 0, n, 2]), 51820);
    sim.add_node_behind(
        nat,
        &format!("node{n}"),
        ip(&format!("100.72.0.{n}")),
        private,
    )
}

/// Two mesh peers behind NATs of kinds `na` and `nb`, introduced by the
/// rendezvous: each knows the other's candidates and the relay is up.
fn introduced_pair(mut sim: Sim, na: Behind, nb: Behind) -> (Sim, NodeId, NodeId) {
    let a = node_behind(&mut sim, 1, na);
    let b = node_behind(&mut sim, 2, nb);
    sim.connect(a, b);
    sim.introduce(a, b);
    (sim, a, b)
}

fn path(sim: &Sim, node: NodeId, peer: NodeId) -> PathStatus {
    sim.node(node)
        .peer_status(&sim.public_key(peer))
        .map_or(PathStatus::Unknown, |s| s.path)
}

fn is_direct(sim: &Sim, node: NodeId, peer: NodeId) -> bool {
    matches!(path(sim, node, peer), PathStatus::Direct { .. })
}

fn both_direct(sim: &Sim, a: NodeId, b: NodeId) -> bool {
    is_direct(sim, a, b) && is_direct(sim, b, a)
}

fn both_relayed(sim: &Sim, a: NodeId, b: NodeId) -> bool {
    path(sim, a, b) == PathStatus::Relay && path(sim, b, a) == PathStatus::Relay
}

/// The paths `node` switched to for `peer`, oldest first.
fn path_changes(sim: &Sim, node: NodeId, peer: NodeId) -> Vec<Path> {
    let key = sim.public_key(peer);
    sim.events(node)
        .iter()
        .filter_map(|e| match e {
            Event::PathChanged { peer, path } if *peer == key => Some(*path),
            _ => None,
        })
        .collect()
}

/// Whether `changes` holds a direct path, later the relay, later a direct
/// path again.
fn went_direct_relay_direct(changes: &[Path]) -> bool {
    let is_direct = |p: &Path| matches!(p, Path::Direct(_));
    let Some(first) = changes.iter().position(is_direct) else {
        return false;
    };
    let Some(relay) = changes[first..].iter().position(|p| *p == Path::Relay) else {
        return false;
    };
    changes[first + relay..].iter().any(is_direct)
}

fn relayed_datagrams(sim: &Sim) -> usize {
    sim.trace()
        .iter()
        .filter(|e| matches!(e, TraceEntry::Relayed { .. }))
        .count()
}

/// Sends probes from `from` to `to`, one every 250 ms, until one arrives,
/// then empties `to`'s TUN.
fn reach(sim: &mut Sim, from: NodeId, to: NodeId, within: Duration) {
    let deadline = sim.elapsed() + within;
    let mut seq = 1_000_000;
    while sim.probes_received(to, from).is_empty() {
        assert!(
            sim.elapsed() < deadline,
            "{} could not reach {} within {within:?} (seed {})",
            sim.name(from),
            sim.name(to),
            sim.seed()
        );
        sim.send_probe(from, to, seq);
        seq += 1;
        sim.run_for(millis(250));
    }
    sim.take_tun(to);
}

/// Sends `count` probes each way, 100 ms apart, then lets them land;
/// returns how many arrived at `a` and at `b`.
fn exchange(sim: &mut Sim, a: NodeId, b: NodeId, count: u64) -> (usize, usize) {
    sim.take_tun(a);
    sim.take_tun(b);
    for seq in 0..count {
        sim.send_probe(a, b, seq);
        sim.send_probe(b, a, seq);
        sim.run_for(millis(100));
    }
    sim.run_for(secs(1));
    (
        sim.probes_received(a, b).len(),
        sim.probes_received(b, a).len(),
    )
}

#[test]
fn cone_to_cone_connects_directly() {
    for_each_seed(|seed| {
        let (mut sim, a, b) = introduced_pair(
            Sim::new(seed),
            Behind::PortRestrictedCone,
            Behind::PortRestrictedCone,
        );

        sim.run_until(|s| both_direct(s, a, b), secs(30))
            .unwrap_or_else(|e| panic!("the cones never found a direct path: {e}"));

        // Each talks to the other's NAT mapping, the address the
        // rendezvous saw, not to the private address.
        let (public_a, public_b) = (sim.observed_addr(a), sim.observed_addr(b));
        assert!(matches!(path(&sim, a, b), PathStatus::Direct { addr, .. } if addr == public_b));
        assert!(matches!(path(&sim, b, a), PathStatus::Direct { addr, .. } if addr == public_a));

        reach(&mut sim, a, b, secs(10));
        let relayed_before = relayed_datagrams(&sim);
        assert_eq!(exchange(&mut sim, a, b, 10), (10, 10));
        assert_eq!(
            relayed_datagrams(&sim),
            relayed_before,
            "data on a direct path does not touch the relay"
        );
    });
}

#[test]
fn symmetric_to_symmetric_goes_through_the_relay() {
    for_each_seed(|seed| {
        let (mut sim, a, b) = introduced_pair(Sim::new(seed), Behind::Symmetric, Behind::Symmetric);

        reach(&mut sim, a, b, secs(10));
        reach(&mut sim, b, a, secs(10));
        // Long enough for several rounds of upgrade probes and punches.
        sim.run_for(secs(30));

        assert!(
            both_relayed(&sim, a, b),
            "paths: {:?}, {:?}",
            path(&sim, a, b),
            path(&sim, b, a)
        );
        for (node, peer) in [(a, b), (b, a)] {
            assert!(
                path_changes(&sim, node, peer)
                    .iter()
                    .all(|p| *p == Path::Relay),
                "{} never tried a direct path that cannot work: {:?}",
                sim.name(node),
                path_changes(&sim, node, peer)
            );
        }
        let relayed_before = relayed_datagrams(&sim);
        assert_eq!(exchange(&mut sim, a, b, 10), (10, 10));
        assert!(relayed_datagrams(&sim) >= relayed_before + 20);
    });
}

#[test]
fn losing_the_direct_path_fails_over_to_the_relay_and_recovers() {
    for_each_seed(|seed| {
        let (mut sim, a, b) = introduced_pair(
            Sim::new(seed),
            Behind::PortRestrictedCone,
            Behind::PortRestrictedCone,
        );
        sim.run_until(|s| both_direct(s, a, b), secs(30))
            .unwrap_or_else(|e| panic!("never went direct: {e}"));
        reach(&mut sim, a, b, secs(10));
        reach(&mut sim, b, a, secs(10));
        let handshakes = (
            sim.handshakes_completed(a, b),
            sim.handshakes_completed(b, a),
        );

        // The direct link goes dark; data keeps being sent all along.
        sim.set_link_between(a, b, LinkConfig::default().loss(1.0));
        let mut seq = 0;
        let failed_over = sim.elapsed();
        while !both_relayed(&sim, a, b) {
            assert!(
                sim.elapsed() - failed_over < secs(15),
                "still not on the relay after 15 s (seed {seed}): {:?}, {:?}",
                path(&sim, a, b),
                path(&sim, b, a)
            );
            sim.send_probe(a, b, seq);
            sim.send_probe(b, a, seq);
            seq += 1;
            sim.run_for(millis(250));
        }
        let relayed_before = relayed_datagrams(&sim);
        assert_eq!(
            exchange(&mut sim, a, b, 10),
            (10, 10),
            "data flows through the relay"
        );
        assert!(relayed_datagrams(&sim) >= relayed_before + 20);

        // The link heals: upgrade probing finds the direct path again.
        sim.set_link_between(a, b, LinkConfig::default());
        sim.run_until(|s| both_direct(s, a, b), secs(30))
            .unwrap_or_else(|e| panic!("never went back to the direct path: {e}"));
        assert_eq!(
            exchange(&mut sim, a, b, 10),
            (10, 10),
            "data flows directly again"
        );

        assert_eq!(
            (
                sim.handshakes_completed(a, b),
                sim.handshakes_completed(b, a)
            ),
            handshakes,
            "switching paths kept the WireGuard session"
        );
        for (node, peer) in [(a, b), (b, a)] {
            let changes = path_changes(&sim, node, peer);
            assert!(
                went_direct_relay_direct(&changes),
                "{} went direct, then relay, then direct again: {changes:?}",
                sim.name(node)
            );
        }
    });
}

#[test]
fn hole_punching_with_probe_loss_still_converges() {
    for_each_seed(|seed| {
        let (mut sim, a, b) = introduced_pair(
            Sim::with_link(seed, LinkConfig::default().loss(0.3)),
            Behind::PortRestrictedCone,
            Behind::PortRestrictedCone,
        );

        sim.run_until(|s| both_direct(s, a, b), secs(60))
            .unwrap_or_else(|e| panic!("punching through 30% loss never converged: {e}"));

        // Each handshake attempt (REKEY_TIMEOUT, 5 s apart) needs both of
        // its messages through the loss; a dozen attempts all but surely do.
        reach(&mut sim, a, b, secs(60));
        reach(&mut sim, b, a, secs(60));
    });
}

#[test]
fn the_same_seed_gives_the_same_trace_through_nats_and_the_relay() {
    fn run(seed: u64) -> Vec<TraceEntry> {
        let (mut sim, a, b) = introduced_pair(
            Sim::with_link(seed, LinkConfig::default().loss(0.1)),
            Behind::Symmetric,
            Behind::PortRestrictedCone,
        );
        sim.set_relay(RelayConfig::default().loss(0.1));
        for seq in 0..60 {
            sim.send_probe(a, b, seq);
            sim.send_probe(b, a, seq);
            sim.run_for(millis(500));
        }
        sim.trace().to_vec()
    }
    for_each_seed(|seed| {
        let trace = run(seed);
        assert!(trace
            .iter()
            .any(|e| matches!(e, TraceEntry::Relayed { .. })));
        assert_eq!(trace, run(seed));
    });
}
