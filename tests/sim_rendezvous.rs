#![cfg(feature = "sim")]
//! The whole mesh end to end in simulated time: node agents, the real
//! rendezvous registry and the real relay table, through simulated NATs
//! (`cargo test --features sim --test sim_rendezvous`): joining with a
//! token, peer-map deltas, punching through the registry, relay failover
//! and back, an operator's removal, and a rendezvous restart.
//!
//! Every scenario runs once per seed in [`meshd::sim::SEEDS`]; a failure
//! names its seed, and `MESHD_SIM_SEED=<seed>` reruns just that one.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use meshd::agent::HostChange;
use meshd::control::{Request, Response};
use meshd::engine::paths::PathStatus;
use meshd::sim::{for_each_seed, LinkConfig, NatConfig, NodeId, Sim, TraceEntry};
use meshd::wire::control::RejectReason;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn path(sim: &Sim, node: NodeId, peer: NodeId) -> PathStatus {
    sim.node(node)
        .peer_status(&sim.public_key(peer))
        .map_or(PathStatus::Unknown, |s| s.path)
}

fn both_direct(sim: &Sim, a: NodeId, b: NodeId) -> bool {
    matches!(path(sim, a, b), PathStatus::Direct { .. })
        && matches!(path(sim, b, a), PathStatus::Direct { .. })
}

fn both_relayed(sim: &Sim, a: NodeId, b: NodeId) -> bool {
    path(sim, a, b) == PathStatus::Relay && path(sim, b, a) == PathStatus::Relay
}

fn knows(sim: &Sim, node: NodeId, peer: NodeId) -> bool {
    sim.node(node).peer_status(&sim.public_key(peer)).is_some()
}

/// `from` sends probes to `to` until one arrives (each retry 250 ms
/// later), within `within`.
fn reach(sim: &mut Sim, from: NodeId, to: NodeId, within: Duration) {
    let start = sim.elapsed();
    let mut seq = 10_000;
    loop {
        sim.send_probe(from, to, seq);
        sim.run_for(millis(250));
        if sim.probes_received(to, from).contains(&seq) {
            return;
        }
        assert!(
            sim.elapsed() - start < within,
            "{} never reached {} within {within:?} (seed {})",
            sim.name(from),
            sim.name(to),
            sim.seed()
        );
        seq += 1;
    }
}

/// `n` numbered probes each way; how many arrived each way.
fn exchange(sim: &mut Sim, a: NodeId, b: NodeId, n: u64) -> (usize, usize) {
    let (before_b, before_a) = (
        sim.probes_received(b, a).len(),
        sim.probes_received(a, b).len(),
    );
    for seq in 0..n {
        sim.send_probe(a, b, 1_000_000 + seq);
        sim.send_probe(b, a, 1_000_000 + seq);
        sim.run_for(millis(20));
    }
    sim.run_for(secs(1));
    (
        sim.probes_received(b, a).len() - before_b,
        sim.probes_received(a, b).len() - before_a,
    )
}

/// Node number `n` behind a port-restricted cone NAT of its own: public
/// 203.0.113.n, socket at 10.0.n.2:51820.
fn behind_cone(sim: &mut Sim, n: u8) -> meshd::sim::NatId {
    let public = IpAddr::from([203, 0, 113, n]);
    let subnet: IpNet = format!("10.0.{n}.0/24").parse().unwrap();
    sim.net_mut()
        .add_nat(NatConfig::port_restricted_cone(public, subnet))
}

fn private(n: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::from([10, 0, n, 2]), 51820)
}

fn status(sim: &mut Sim, id: NodeId) -> meshd::control::StatusInfo {
    match sim.api(id, Request::Status).as_slice() {
        [Response::Status(status)] => (**status).clone(),
        other => panic!("expected a status, got {other:?}"),
    }
}

#[test]
fn nodes_join_through_the_registry_with_a_token_and_reach_each_other() {
    for_each_seed(|seed| {
        let mut sim = Sim::new(seed);
        let token = sim.create_token("ci");
        let a = sim.join_node("node-a", addr("198.51.100.1:51820"), &token);
        let b = sim.join_node("node-b", addr("198.51.100.2:51820"), &token);

        sim.run_until(|s| knows(s, a, b) && knows(s, b, a), secs(5))
            .unwrap_or_else(|e| panic!("the peer maps never met: {e}"));

        for id in [a, b] {
            assert!(
                sim.host_changes(id)
                    .iter()
                    .any(|c| matches!(c, HostChange::Addresses(_))),
                "{} got its addresses from the registry",
                sim.name(id)
            );
            assert!(sim.host_changes(id).contains(&HostChange::Registered));
            assert!(sim.overlay(id).is_ipv4() && !sim.overlay(id).is_unspecified());
        }
        assert_ne!(sim.overlay(a), sim.overlay(b));
        reach(&mut sim, a, b, secs(10));
        reach(&mut sim, b, a, secs(10));
        sim.run_until(|s| both_direct(s, a, b), secs(30))
            .unwrap_or_else(|e| panic!("two public nodes never went direct: {e}"));
    });
}

#[test]
fn a_bad_token_is_refused_and_the_node_gets_no_address() {
    for_each_seed(|seed| {
        let mut sim = Sim::new(seed);
        sim.create_token("ci");
        let a = sim.join_node(
            "node-a",
            addr("198.51.100.1:51820"),
            "ci.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        );
        sim.run_for(secs(1));
        assert_eq!(sim.rejected(a), Some(RejectReason::BadToken));
        assert!(sim.overlay(a).is_unspecified());
        assert!(sim.host_changes(a).is_empty());
    });
}

#[test]
fn a_node_joining_later_reaches_the_others_by_a_peer_map_delta() {
    for_each_seed(|seed| {
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
        sim.introduce(a, b);
        reach(&mut sim, a, b, secs(10));
        let peers_of_a = sim.node(a).peers().count();

        let token = sim.create_token("late");
        let c = sim.join_node("node-c", addr("198.51.100.3:51820"), &token);
        sim.run_until(|s| knows(s, a, c) && knows(s, b, c), secs(5))
            .unwrap_or_else(|e| panic!("the others never heard of node-c: {e}"));

        assert_eq!(sim.node(a).peers().count(), peers_of_a + 1);
        reach(&mut sim, c, a, secs(10));
        reach(&mut sim, a, c, secs(10));
        reach(&mut sim, b, c, secs(10));
    });
}

#[test]
fn peers_behind_cone_nats_punch_through_via_the_registry() {
    for_each_seed(|seed| {
        let mut sim = Sim::new(seed);
        let token = sim.create_token("ci");
        let (nat1, nat2) = (behind_cone(&mut sim, 1), behind_cone(&mut sim, 2));
        let a = sim.join_node_behind(nat1, "node1", private(1), &token);
        let b = sim.join_node_behind(nat2, "node2", private(2), &token);

        sim.run_until(|s| both_direct(s, a, b), secs(30))
            .unwrap_or_else(|e| panic!("never went direct: {e}"));
        // The punch requests may arrive after the probes already met.
        sim.run_for(secs(1));

        let punched = sim
            .trace()
            .iter()
            .filter(|e| matches!(e, TraceEntry::Punched { .. }))
            .count();
        assert!(punched > 0, "the registry passed punch requests on");
        assert_eq!(exchange(&mut sim, a, b, 10), (10, 10));
    });
}

#[test]
fn the_relay_table_carries_traffic_when_the_direct_path_dies_and_it_comes_back() {
    for_each_seed(|seed| {
        let mut sim = Sim::new(seed);
        let token = sim.create_token("ci");
        let (nat1, nat2) = (behind_cone(&mut sim, 1), behind_cone(&mut sim, 2));
        let a = sim.join_node_behind(nat1, "node1", private(1), &token);
        let b = sim.join_node_behind(nat2, "node2", private(2), &token);
        sim.run_until(|s| both_direct(s, a, b), secs(30))
            .unwrap_or_else(|e| panic!("never went direct: {e}"));
        let forwarded_before = sim.relay_table().stats().forwarded.packets;

        sim.set_link_between(a, b, LinkConfig::default().loss(1.0));
        let start = sim.elapsed();
        let mut seq = 0;
        while !both_relayed(&sim, a, b) {
            assert!(
                sim.elapsed() - start < secs(15),
                "still not on the relay after 15 s (seed {seed})"
            );
            sim.send_probe(a, b, seq);
            sim.send_probe(b, a, seq);
            seq += 1;
            sim.run_for(millis(250));
        }
        assert_eq!(exchange(&mut sim, a, b, 10), (10, 10));
        assert!(
            sim.relay_table().stats().forwarded.packets >= forwarded_before + 20,
            "the relay table forwarded the exchange"
        );

        sim.set_link_between(a, b, LinkConfig::default());
        sim.run_until(|s| both_direct(s, a, b), secs(30))
            .unwrap_or_else(|e| panic!("never went back to the direct path: {e}"));
        assert_eq!(exchange(&mut sim, a, b, 10), (10, 10));
    });
}

#[test]
fn a_node_the_operator_removes_disappears_from_every_peer_map() {
    for_each_seed(|seed| {
        let mut sim = Sim::new(seed);
        let token = sim.create_token("ci");
        let a = sim.join_node("node-a", addr("198.51.100.1:51820"), &token);
        let b = sim.join_node("node-b", addr("198.51.100.2:51820"), &token);
        let c = sim.join_node("node-c", addr("198.51.100.3:51820"), &token);
        sim.run_until(|s| knows(s, a, c) && knows(s, b, c), secs(5))
            .unwrap_or_else(|e| panic!("node-c never joined: {e}"));

        assert!(sim.remove_node(c));
        sim.run_for(secs(1));

        assert!(!knows(&sim, a, c) && !knows(&sim, b, c));
        assert!(knows(&sim, a, b), "the others stay");
        assert_eq!(sim.rejected(c), Some(RejectReason::Removed));
        assert!(!sim.has_session(c));

        sim.connect_rendezvous(c);
        sim.run_for(secs(1));
        assert_eq!(
            sim.rejected(c),
            Some(RejectReason::Removed),
            "refused for good"
        );
    });
}

#[test]
fn rendezvous_restart_keeps_established_tunnels() {
    for_each_seed(|seed| {
        let mut sim = Sim::new(seed);
        let token = sim.create_token("ci");
        let (nat1, nat2) = (behind_cone(&mut sim, 1), behind_cone(&mut sim, 2));
        let a = sim.join_node_behind(nat1, "node1", private(1), &token);
        let b = sim.join_node_behind(nat2, "node2", private(2), &token);
        sim.run_until(|s| both_direct(s, a, b), secs(30))
            .unwrap_or_else(|e| panic!("never went direct: {e}"));
        let overlays = (sim.overlay(a), sim.overlay(b));
        let handshakes = (
            sim.handshakes_completed(a, b),
            sim.handshakes_completed(b, a),
        );

        sim.restart_rendezvous();
        assert!(!sim.has_session(a) && !sim.has_session(b));
        assert_eq!(exchange(&mut sim, a, b, 10), (10, 10), "while it is down");
        sim.run_for(secs(2));
        sim.connect_rendezvous(a);
        sim.connect_rendezvous(b);
        sim.run_for(secs(1));

        assert!(sim.has_session(a) && sim.has_session(b));
        assert_eq!(
            status(&mut sim, a).rendezvous.map(|r| r.connected),
            Some(true)
        );
        assert_eq!(
            (sim.overlay(a), sim.overlay(b)),
            overlays,
            "the same addresses"
        );
        assert!(both_direct(&sim, a, b));
        assert_eq!(
            (
                sim.handshakes_completed(a, b),
                sim.handshakes_completed(b, a)
            ),
            handshakes,
            "the WireGuard sessions never broke"
        );
        assert_eq!(exchange(&mut sim, a, b, 10), (10, 10));
    });
}
