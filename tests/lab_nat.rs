#![cfg(not(feature = "sim"))]
//! The path each pair of nodes settles on, router kind by router kind, in
//! the NAT lab of `deploy/lab` (its routers drop unsolicited inbound on
//! their WAN side as real routers do; deploy/lab/topology lists the
//! kinds): two cone NATs go direct, a cone facing a symmetric NAT is
//! relayed and says why, two nodes behind one NAT go direct over their
//! private addresses with and without hairpinning, a node behind two layers
//! of NAT goes direct with a cone, a dual-stack pair whose IPv4 is behind
//! symmetric NATs goes direct over IPv6 (and says so), a pair behind a
//! router with 30 s UDP mappings is still direct after 70 s idle, and the
//! firewall-less Linux MASQUERADE behaves as its test says. Needs root.
//!
//! Each test builds its own lab with a mesh of the nodes it needs
//! (tests/common's [`MeshLab`], prefix `mln`), prints what it measured
//! (time from the mesh being up to the pair being direct, the probes'
//! RTT), and removes the lab when it ends, failed or not.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use common::lab::{eventually, MeshLab, REACH_DEADLINE, SETTLE_DEADLINE};
use common::topology::topology;

/// The prefix of this file's labs.
const PREFIX: &str = "mln";

/// What `from` reports about `to`: its path, the endpoint of a direct
/// path and the probes' RTT to it.
#[derive(Debug)]
struct Seen {
    path: String,
    endpoint: Option<SocketAddr>,
    family: Option<String>,
    rtt_ms: Option<f64>,
}

fn seen(lab: &MeshLab, from: &str, to: &str) -> Result<Seen, String> {
    let peer = lab.peer(from, to)?;
    Ok(Seen {
        path: peer["path"].as_str().unwrap_or_default().to_owned(),
        endpoint: peer["endpoint"].as_str().and_then(|e| e.parse().ok()),
        family: peer["family"].as_str().map(str::to_owned),
        rtt_ms: peer["rtt_ms"].as_f64(),
    })
}

/// Waits until `a` and `b` reach each other over the overlay and both
/// report a path that `ok` accepts; prints and returns how long that took
/// from `since` and what each side reports.
fn settle(
    lab: &MeshLab,
    since: Instant,
    (a, b): (&str, &str),
    what: &str,
    ok: impl Fn(&Seen) -> bool,
) -> (Seen, Seen) {
    lab.wait_for_reach(a, b);
    let (ab, ba) = eventually(&format!("{a} and {b} both {what}"), SETTLE_DEADLINE, || {
        let (ab, ba) = (seen(lab, a, b)?, seen(lab, b, a)?);
        if ok(&ab) && ok(&ba) {
            Ok((ab, ba))
        } else {
            Err(format!("{a} -> {b}: {ab:?}; {b} -> {a}: {ba:?}"))
        }
    });
    println!(
        "{a} <-> {b}: {what} {:.1} s after the mesh was up; {a} -> {b} {} via {:?} ({:?} ms), \
         {b} -> {a} {} via {:?} ({:?} ms)",
        since.elapsed().as_secs_f64(),
        ab.path,
        ab.endpoint,
        ab.rtt_ms,
        ba.path,
        ba.endpoint,
        ba.rtt_ms
    );
    (ab, ba)
}

fn direct(s: &Seen) -> bool {
    s.path == "direct"
}

fn relayed(s: &Seen) -> bool {
    s.path == "relay"
}

/// A direct path to an address of the lab node `to`'s private subnet.
fn direct_in_subnet_of(to: &'static str) -> impl Fn(&Seen) -> bool {
    let subnet = topology().private_subnet_of(topology().node(to));
    move |s| {
        direct(s)
            && s.endpoint.is_some_and(|e| match e.ip() {
                IpAddr::V4(ip) => subnet.contains(&ip),
                IpAddr::V6(_) => false,
            })
    }
}

/// Whether `from`'s candidate of `to` at `to`'s public (router) address
/// answered probes: the hairpin works.
fn public_candidate_answers(lab: &MeshLab, from: &str, to: &str) -> Result<bool, String> {
    let public = topology().node(to).public;
    let peer = lab.peer(from, to)?;
    let candidates = peer["candidates"].as_array().cloned().unwrap_or_default();
    let at_public: Vec<&serde_json::Value> = candidates
        .iter()
        .filter(|c| {
            c["endpoint"]
                .as_str()
                .and_then(|e| e.parse::<SocketAddr>().ok())
                .is_some_and(|e| e.ip() == IpAddr::V4(public))
        })
        .collect();
    if at_public.is_empty() {
        return Err(format!(
            "{from} has no candidate of {to} at {public}: {candidates:?}"
        ));
    }
    Ok(at_public
        .iter()
        .any(|c| c["probes_answered"].as_u64().unwrap_or(0) > 0))
}

#[test]
fn two_cone_nats_that_drop_unsolicited_inbound_go_direct() {
    let lab = MeshLab::with_mesh_of(PREFIX, &["cone", "cone2", "lan1"]);
    let up = Instant::now();
    for (a, b) in [("cone", "cone2"), ("cone", "lan1"), ("cone2", "lan1")] {
        let (ab, ba) = settle(&lab, up, (a, b), "direct", direct);
        for (s, to) in [(&ab, b), (&ba, a)] {
            let endpoint = s.endpoint.expect("a direct path has an endpoint");
            assert_eq!(
                endpoint.ip(),
                IpAddr::V4(topology().node(to).public),
                "{to} is reached at its router's public address"
            );
        }
    }
    // Neither side took the other for a symmetric NAT on the way.
    for node in ["cone", "cone2", "lan1"] {
        let status = lab.meshctl(node, "status").unwrap();
        assert_eq!(status["nat"], "endpoint_independent", "{node}: {status}");
    }
}

#[test]
fn a_cone_facing_a_symmetric_nat_is_relayed_and_says_why() {
    let lab = MeshLab::with_mesh_of(PREFIX, &["cone", "sym1", "pub1"]);
    let up = Instant::now();
    settle(&lab, up, ("cone", "sym1"), "relayed", relayed);
    // The symmetric node still reaches a public node directly (its
    // packets' source is learnt), and the cone too.
    settle(&lab, up, ("sym1", "pub1"), "direct", direct);
    settle(&lab, up, ("cone", "pub1"), "direct", direct);
    eventually("cone says why sym1 is relayed", SETTLE_DEADLINE, || {
        let peer = lab.peer("cone", "sym1")?;
        match peer["relay_reason"].as_str() {
            Some(r)
                if r.starts_with(
                    "node-sym1's NAT is endpoint-dependent (symmetric) and this node's NAT \
                     admits only answers from addresses it sent to",
                ) =>
            {
                Ok(())
            }
            other => Err(format!("relay_reason {other:?}")),
        }
    });
}

#[test]
fn two_nodes_behind_one_nat_go_direct_over_private_addresses_with_and_without_hairpinning() {
    let lab = MeshLab::with_mesh_of(PREFIX, &["lan1", "lan2", "hair1", "hair2"]);
    let up = Instant::now();
    settle(
        &lab,
        up,
        ("lan1", "lan2"),
        "direct",
        direct_in_subnet_of("lan2"),
    );
    settle(
        &lab,
        up,
        ("hair1", "hair2"),
        "direct",
        direct_in_subnet_of("hair2"),
    );
    // The hairpinning router loops the public candidate back; the other
    // takes it for itself, and the private address is all that works.
    eventually(
        "hair1 and hair2 reach each other at their public address too",
        SETTLE_DEADLINE,
        || match (
            public_candidate_answers(&lab, "hair1", "hair2")?,
            public_candidate_answers(&lab, "hair2", "hair1")?,
        ) {
            (true, true) => Ok(()),
            got => Err(format!("answered: {got:?}")),
        },
    );
    for (from, to) in [("lan1", "lan2"), ("lan2", "lan1")] {
        let peer = lab.peer(from, to).unwrap();
        let tried = peer["candidates"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| {
                c["endpoint"]
                    .as_str()
                    .is_some_and(|e| e.starts_with(&topology().node(to).public.to_string()))
            })
            .map(|c| c["probes_sent"].as_u64().unwrap_or(0))
            .sum::<u64>();
        assert!(tried > 0, "{from} probed {to}'s public address: {peer}");
        assert!(
            !public_candidate_answers(&lab, from, to).unwrap(),
            "a router without hairpinning answered {from}'s probes to {to}'s public address: {peer}"
        );
    }
    // Private addresses win over the hairpin, which would load the router.
    settle(
        &lab,
        up,
        ("hair1", "hair2"),
        "direct",
        direct_in_subnet_of("hair2"),
    );
}

#[test]
fn a_node_behind_two_layers_of_nat_goes_direct_with_a_cone_and_a_public_node() {
    let lab = MeshLab::with_mesh_of(PREFIX, &["cgn", "cone", "pub1", "sym1"]);
    let up = Instant::now();
    let router = topology().router_of("cgn");
    assert_ne!(router.uplink, "inet", "cgn's router is behind another NAT");
    settle(&lab, up, ("cgn", "cone"), "direct", direct);
    settle(&lab, up, ("cgn", "pub1"), "direct", direct);
    // Two cone NATs in a row are still a cone; a symmetric NAT on the other
    // side is as out of reach as from any cone.
    settle(&lab, up, ("cgn", "sym1"), "relayed", relayed);
    let (seen, _) = settle(&lab, up, ("pub1", "cgn"), "direct", direct);
    assert_eq!(
        seen.endpoint.map(|e| e.ip()),
        Some(IpAddr::V4(topology().node("cgn").public)),
        "cgn is seen at the carrier-grade NAT's public address"
    );
}

#[test]
fn a_dual_stack_pair_behind_symmetric_ipv4_nats_goes_direct_over_ipv6() {
    let lab = MeshLab::with_mesh_of(PREFIX, &["v6a", "v6b", "pub1"]);
    let up = Instant::now();
    let over_ipv6 = |s: &Seen| {
        direct(s) && s.family.as_deref() == Some("ipv6") && s.endpoint.is_some_and(|e| e.is_ipv6())
    };
    let (ab, ba) = settle(&lab, up, ("v6a", "v6b"), "direct over IPv6", over_ipv6);
    assert_eq!(
        ab.endpoint.map(|e| e.ip()),
        topology().node("v6b").address6.map(IpAddr::V6)
    );
    assert_eq!(
        ba.endpoint.map(|e| e.ip()),
        topology().node("v6a").address6.map(IpAddr::V6)
    );
    // Their IPv4 is symmetric-NATed: no IPv4 path between them would do.
    for node in ["v6a", "v6b"] {
        eventually(
            &format!("{node} knows its IPv4 NAT is symmetric"),
            SETTLE_DEADLINE,
            || {
                let status = lab.meshctl(node, "status")?;
                match status["nat"].as_str() {
                    Some("endpoint_dependent") => Ok(()),
                    got => Err(format!("nat {got:?}")),
                }
            },
        );
    }
    // With a public IPv4-only node, IPv4.
    settle(&lab, up, ("v6a", "pub1"), "direct over IPv4", |s| {
        direct(s) && s.family.as_deref() == Some("ipv4")
    });
    let table = common::run(
        common::MESHCTL,
        &["--socket", common::utf8(&lab.socket("v6a")), "peers"],
    );
    assert!(
        table.contains(&format!(
            "direct IPv6 [{}]:",
            topology().node("v6b").address6.unwrap()
        )),
        "meshctl peers shows the family of the path:\n{table}"
    );

    // IPv6 breaks (the router's firewall drops it): the pair falls back to
    // what IPv4 allows it, the relay, and returns to IPv6 when it heals.
    let block = |action: &str| {
        lab.run_in("r-v6a", &["ip6tables", action, "FORWARD", "-j", "DROP"]);
    };
    block("-I");
    let broken = Instant::now();
    settle(&lab, broken, ("v6a", "v6b"), "relayed", relayed);
    block("-D");
    let healed = Instant::now();
    settle(&lab, healed, ("v6a", "v6b"), "direct over IPv6", over_ipv6);
}

#[test]
fn a_pair_behind_a_router_with_30_s_mappings_is_still_direct_after_70_s_idle() {
    let router = topology().router_of("cone2");
    let timeout = router
        .udp_timeout
        .expect("cone2's router has short UDP mappings");
    assert!(timeout <= Duration::from_secs(30), "{timeout:?}");
    let lab = MeshLab::with_mesh_of(PREFIX, &["cone2", "cone"]);
    let up = Instant::now();
    let (before, _) = settle(&lab, up, ("cone2", "cone"), "direct", direct);
    let mapping = |lab: &MeshLab| {
        lab.run_in(
            router.name,
            &[
                "conntrack",
                "-L",
                "-p",
                "udp",
                "--orig-src",
                &topology().node("cone2").address.to_string(),
                "--orig-port-src",
                "51820",
            ],
        )
    };
    println!(
        "{}'s mappings of cone2:51820 before:\n{}",
        router.name,
        mapping(&lab)
    );

    // No traffic over the overlay for more than twice the mapping's life:
    // only meshd's own keepalives and probes cross the router.
    let idle = timeout * 2 + Duration::from_secs(10);
    thread::sleep(idle);

    let entries = mapping(&lab);
    println!("after {idle:?} idle:\n{entries}");
    let after = seen(&lab, "cone2", "cone").unwrap();
    assert_eq!(
        after.path, "direct",
        "still direct after {idle:?}: {after:?}"
    );
    assert_eq!(after.endpoint, before.endpoint, "on the same endpoint");
    let from_cone = seen(&lab, "cone", "cone2").unwrap();
    assert_eq!(from_cone.path, "direct", "{from_cone:?}");
    lab.ping_once("cone", "cone2", &[])
        .unwrap_or_else(|e| panic!("the first ping after {idle:?} idle passes: {e}"));
    assert!(
        entries
            .lines()
            .any(|l| l.contains(&format!("dport={}", 51820))),
        "the router still holds the mapping: {entries}"
    );
}

/// `router`'s conntrack entries for UDP, as `conntrack -L` prints them.
fn udp_flows(lab: &MeshLab, router: &str) -> String {
    lab.run_in(router, &["conntrack", "-L", "-p", "udp"])
}

/// Drops what `router` forwards from its LAN to `to` (before its NAT
/// maps it), or stops dropping it.
fn hold_back(lab: &MeshLab, router: &str, to: &str, action: &str) {
    lab.run_in(
        router,
        &[
            "iptables", action, "FORWARD", "-i", "lan", "-d", to, "-j", "DROP",
        ],
    );
}

// Item 4 of the firewall-less MASQUERADE: which probe reaches the bare
// router first decides the pair. Measured in the lab by hand first: a
// datagram from the cone with TTL 2 leaves its router with TTL 1 and the
// bare router, one hop further, takes it for itself (a router checks the
// TTL only of what it forwards), so a low-TTL opener cannot die between
// the two NATs here; one with TTL 1 dies in the sender's own router before
// its NAT maps it. What does work is the bare side's node sending first,
// at any TTL: the cone's firewall drops that datagram without keeping it.
// The two tests below set the order each way.

#[test]
fn the_firewall_less_masquerade_goes_direct_when_its_node_sends_first() {
    let bare_public = topology().node("bare").public.to_string();
    let cone_public = topology().node("cone").public.to_string();
    let bare_address = topology().node("bare").address;
    // The cone's packets to the bare router wait, from before either meshd
    // starts, until bare's own mapping towards the cone is there (bare's
    // first probes, dropped by the cone's firewall) and kept port 51820.
    let (lab, ()) = MeshLab::with_mesh_of_prepared(PREFIX, &["bare", "cone"], |lab| {
        hold_back(lab, "r-cone", &bare_public, "-I");
    });
    eventually(
        "bare has a mapping towards the cone on port 51820",
        REACH_DEADLINE,
        || {
            let flows = udp_flows(&lab, "r-bare");
            if flows.lines().any(|l| {
                l.contains(&format!(
                    "src={bare_address} dst={cone_public} sport=51820 dport=51820 "
                )) && l.contains(&format!(
                    "src={cone_public} dst={bare_public} sport=51820 dport=51820 "
                ))
            }) {
                Ok(())
            } else {
                Err(flows)
            }
        },
    );
    hold_back(&lab, "r-cone", &bare_public, "-D");
    let up = Instant::now();
    settle(&lab, up, ("bare", "cone"), "direct", direct);
}

#[test]
fn the_firewall_less_masquerade_keeps_a_pair_relayed_when_the_peers_probe_arrives_first() {
    let bare_public = topology().node("bare").public.to_string();
    let cone_public = topology().node("cone").public.to_string();
    // bare's packets to the cone and to pub1 wait, from before any meshd
    // starts, until a probe of each has reached the bare router: it takes
    // them for itself and keeps the flows. pub1, public, answers bare from
    // wherever bare's packets come, so it is the one that can tell bare
    // where its mapping went.
    let peers_first = [
        ("cone", cone_public.clone()),
        ("pub1", topology().node("pub1").public.to_string()),
    ];
    let (lab, ()) = MeshLab::with_mesh_of_prepared(PREFIX, &["bare", "cone", "pub1"], |lab| {
        for (_, public) in &peers_first {
            hold_back(lab, "r-bare", public, "-I");
        }
    });
    for (peer, public) in &peers_first {
        let unsolicited = format!("src={public} dst={bare_public} sport=51820 dport=51820");
        eventually(
            &format!("the bare router keeps {peer}'s unsolicited probe as a flow"),
            REACH_DEADLINE,
            || {
                let flows = udp_flows(&lab, "r-bare");
                if flows.lines().any(|l| l.contains(&unsolicited)) {
                    Ok(())
                } else {
                    Err(flows)
                }
            },
        );
    }
    for (_, public) in &peers_first {
        hold_back(&lab, "r-bare", public, "-D");
    }
    let unsolicited = format!("src={cone_public} dst={bare_public} sport=51820 dport=51820");
    let up = Instant::now();
    settle(&lab, up, ("bare", "cone"), "relayed", relayed);
    // bare's own traffic to the cone now leaves from another port, which
    // the cone's NAT (it sent to port 51820) does not admit.
    let bare_address = topology().node("bare").address;
    let moved = eventually(
        "bare's mapping towards the cone moves to another port",
        SETTLE_DEADLINE,
        || {
            let flows = udp_flows(&lab, "r-bare");
            // "src=<bare> dst=<cone> sport=51820 dport=51820 … src=<cone>
            // dst=<bare's router> sport=51820 dport=<the public port>"
            let public_port = flows
                .lines()
                .filter(|l| {
                    l.contains(&format!(
                        "src={bare_address} dst={cone_public} sport=51820 "
                    ))
                })
                .filter_map(|l| {
                    l.rsplit("dport=")
                        .next()?
                        .split_whitespace()
                        .next()?
                        .parse::<u16>()
                        .ok()
                })
                .find(|&port| port != 51820);
            public_port.ok_or(flows)
        },
    );
    println!(
        "the bare router holds {unsolicited} (the cone's probe), and maps bare:51820 to the cone \
         from port {moved}"
    );
    eventually("bare says why the cone is relayed", SETTLE_DEADLINE, || {
        let peer = lab.peer("bare", "cone")?;
        match peer["relay_reason"].as_str() {
            Some(r)
                if r.starts_with(
                    "this node's NAT keeps one public port for the rendezvous's two ports",
                ) && r.contains("Linux MASQUERADE with no firewall") =>
            {
                Ok(())
            }
            other => Err(format!("relay_reason {other:?}")),
        }
    });
    // The cone keeps probing the bare router's port 51820 more often than
    // the router forgets an unanswered flow (30 s): it never heals alone.
    thread::sleep(Duration::from_secs(40));
    let still = seen(&lab, "bare", "cone").unwrap();
    assert_eq!(still.path, "relay", "{still:?}");
    let flows = udp_flows(&lab, "r-bare");
    assert!(
        flows.lines().any(|l| l.contains(&unsolicited)),
        "the cone's flow is still held: {flows}"
    );
}
