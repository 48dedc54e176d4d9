#![cfg(not(feature = "sim"))]
//! Two rendezvous servers of one mesh in the NAT lab of `deploy/lab`, as a
//! mesh spread over clouds runs them: "rv" and "rv2" on public machines of
//! their own, sharing the mesh in a three-member etcd (Debian's
//! `etcd-server`, one member on each server's machine and one on pub1),
//! and a node of every NAT type homed on each. Every node reaches every
//! other, the two symmetric-NAT nodes through the relay; when their
//! server dies they reach each other again within seconds, no address
//! changes, and every node ends up on the surviving server. Needs root.
//!
//! The lab is built by tests/common's [`MeshLab`] under the prefix `mls`
//! (not the `mlm` of tests/lab_mesh.rs, `mlt`, `mlk` nor `mlu`); the
//! servers, etcd and the namespaces are removed when the test ends,
//! failed or not, the servers before etcd.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::lab::{eventually, MeshLab, REACH_DEADLINE, SETTLE_DEADLINE};
use common::topology::topology;

/// The prefix of this file's labs.
const PREFIX: &str = "mls";

/// etcd's members: each server's machine and a public node, as a mesh of
/// two VPSs and a cloud VM keeps its store.
const ETCD_ON: [&str; 3] = ["rv", "rv2", "pub1"];

/// Each node and the server it homes on: a node of every NAT type on
/// each, and the two symmetric-NAT nodes, which only the relay connects,
/// both on the server that dies.
const HOMES: [(&str, &str); 8] = [
    ("pub1", "rv"),
    ("nat11", "rv"),
    ("sym1", "rv"),
    ("sym2", "rv"),
    ("pub2", "rv2"),
    ("cone", "rv2"),
    ("lan1", "rv2"),
    ("lan2", "rv2"),
];

/// The server that dies, and the one its nodes move to.
const VICTIM: &str = "rv";
const SURVIVOR: &str = "rv2";

/// The bar for a relayed pair whose server dies (as in
/// tests/rendezvous_etcd.rs): its nodes notice within the session's idle
/// timeout and race the other servers at once.
const RELAYED_FAILOVER: Duration = Duration::from_secs(5);
/// How long every node of the dead server may take to be on the other.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);

fn nodes() -> impl Iterator<Item = &'static str> {
    HOMES.iter().map(|&(node, _)| node)
}

/// Every (from, to) pair of distinct nodes.
fn pairs() -> impl Iterator<Item = (&'static str, &'static str)> {
    nodes().flat_map(|from| {
        nodes()
            .filter(move |&to| to != from)
            .map(move |to| (from, to))
    })
}

/// The node a mesh name belongs to (`node-<machine>`).
fn machine_of(name: &str) -> Option<&'static str> {
    let machine = name.strip_prefix("node-")?;
    nodes().find(|&n| n == machine)
}

/// The server each online node is on, by machine, as `nodes list --json`
/// at `server` says.
fn homes_seen_by(lab: &MeshLab, server: &str) -> Result<BTreeMap<&'static str, String>, String> {
    let listed = lab.rendezvous_json(server, &["nodes", "list", "--json"])?;
    Ok(listed
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["online"] == true)
        .filter_map(|n| {
            let node = machine_of(n["name"].as_str()?)?;
            Some((node, n["server"].as_str()?.to_owned()))
        })
        .collect())
}

/// `Ok` once `server` lists every node online on the server `expected`
/// names for it.
fn homes_are(
    lab: &MeshLab,
    server: &str,
    expected: &BTreeMap<&'static str, String>,
) -> Result<(), String> {
    match homes_seen_by(lab, server)? {
        seen if &seen == expected => Ok(()),
        seen => Err(format!("{server} lists {seen:?}, not {expected:?}")),
    }
}

/// Pings every other node from every node (each pair until it answers);
/// returns how long the round took.
fn every_pair_pings(lab: &MeshLab) -> Duration {
    let started = Instant::now();
    for (from, to) in pairs() {
        eventually(
            &format!("{from} pings {to} over the overlay"),
            REACH_DEADLINE,
            || lab.ping_once(from, to, &[]),
        );
    }
    started.elapsed()
}

/// Each node's overlay addresses, as `meshctl status` reports them now.
fn overlay_addresses(lab: &MeshLab) -> BTreeMap<&'static str, Vec<IpAddr>> {
    nodes()
        .map(|node| {
            let status = lab
                .meshctl(node, "status")
                .unwrap_or_else(|e| panic!("{e}"));
            let ips = status["overlay_ips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|ip| ip.as_str()?.parse().ok())
                .collect();
            (node, ips)
        })
        .collect()
}

#[test]
fn nodes_of_every_nat_on_two_servers_reach_each_other_and_a_relayed_pair_outlives_its_server() {
    let started = Instant::now();
    let lab = MeshLab::with_servers_on_etcd(PREFIX, &ETCD_ON, &HOMES);
    eprintln!(
        "two servers on a three-member etcd and {} nodes up in {:.1} s",
        HOMES.len(),
        started.elapsed().as_secs_f64()
    );

    // 1. Each node is on the server its join line named, as both servers
    // see it; and each learnt every server of the mesh from its welcome,
    // which it needs to fail over.
    let homes: BTreeMap<&'static str, String> = HOMES
        .iter()
        .map(|&(node, server)| (node, server.to_owned()))
        .collect();
    for server in [VICTIM, SURVIVOR] {
        eventually(
            &format!("{server} lists every node online at its home"),
            REACH_DEADLINE,
            || homes_are(&lab, server, &homes),
        );
    }
    eprintln!("homes: {homes:?}");
    let addresses: Vec<String> = topology()
        .rendezvous_machines
        .iter()
        .map(|m| m.address.to_string())
        .collect();
    for node in nodes() {
        eventually(
            &format!("{node}'s welcome named every server ({addresses:?})"),
            REACH_DEADLINE,
            || {
                let log = lab.log(node);
                let admitted = log
                    .lines()
                    .rfind(|l| l.contains("admitted by the rendezvous"))
                    .ok_or("not admitted yet")?;
                let servers = admitted
                    .split_once("servers=")
                    .map(|(_, rest)| rest)
                    .ok_or_else(|| format!("no server list in {admitted:?}"))?;
                match addresses.iter().all(|a| servers.contains(a.as_str())) {
                    true => Ok(()),
                    false => Err(format!("welcome: {admitted}")),
                }
            },
        );
    }

    // 2. Every node reaches every other; the symmetric pair through the
    // relay (of their common server), and pairs of nodes homed on
    // different servers with no direct path through both servers.
    let took = every_pair_pings(&lab);
    eprintln!(
        "{} directed pairs ping each other; the round took {:.1} s",
        pairs().count(),
        took.as_secs_f64()
    );
    lab.wait_for_paths("sym1", "sym2", "relay");
    let settled = eventually(
        "every pair has a path",
        SETTLE_DEADLINE,
        || -> Result<Vec<String>, String> {
            let mut relayed = Vec::new();
            for (from, to) in pairs() {
                match lab.path(from, to)? {
                    (path, _) if path == "relay" => relayed.push(format!("{from}->{to}")),
                    (path, _) if path == "direct" => {}
                    (path, endpoint) => {
                        return Err(format!("{from} -> {to}: {path} via {endpoint:?}"))
                    }
                }
            }
            Ok(relayed)
        },
    );
    let across: Vec<&String> = settled
        .iter()
        .filter(|pair| {
            let (from, to) = pair.split_once("->").unwrap_or_default();
            homes.get(from) != homes.get(to)
        })
        .collect();
    eprintln!(
        "relayed pairs: {settled:?}; of them across the two servers: {across:?}; the other {} direct",
        pairs().count() - settled.len()
    );

    // 3. The symmetric pair's server dies: the pair is back within
    // seconds, through the other server's relay.
    let before = overlay_addresses(&lab);
    lab.ping_once("sym1", "sym2", &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let killed = Instant::now();
    lab.kill(VICTIM);
    // A request every 100 ms until the first answer (`-c 1` with a
    // deadline), so that the time measured is within 0.1 s of when the
    // relay carried the pair again.
    eventually(
        "sym1 reaches sym2 again after its server died",
        REACH_DEADLINE,
        || lab.ping_once("sym1", "sym2", &["-i", "0.1", "-w", "10"]),
    );
    let back = killed.elapsed();
    eprintln!(
        "sym1 reached sym2 again {:.2} s after their server {VICTIM} was killed",
        back.as_secs_f64()
    );
    eventually(
        "sym2 reaches sym1 again after its server died",
        REACH_DEADLINE,
        || lab.ping_once("sym2", "sym1", &[]),
    );
    assert!(
        back <= RELAYED_FAILOVER,
        "sym1 reached sym2 again only {back:?} after the kill, not within {RELAYED_FAILOVER:?}"
    );

    let all_on_survivor: BTreeMap<&'static str, String> =
        nodes().map(|node| (node, SURVIVOR.to_owned())).collect();
    eventually(
        &format!("every node is homed on {SURVIVOR}"),
        FAILOVER_DEADLINE,
        || homes_are(&lab, SURVIVOR, &all_on_survivor),
    );
    eprintln!(
        "every node was homed on {SURVIVOR} {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );
    lab.wait_for_paths("sym1", "sym2", "relay");
    assert_eq!(
        overlay_addresses(&lab),
        before,
        "no node's overlay address changed"
    );
    let took = every_pair_pings(&lab);
    eprintln!(
        "after the failover the {} directed pairs ping each other again; the round took {:.1} s",
        pairs().count(),
        took.as_secs_f64()
    );
    eprintln!("the test took {:.1} s", started.elapsed().as_secs_f64());
}
