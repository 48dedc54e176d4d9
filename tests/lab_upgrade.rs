#![cfg(not(feature = "sim"))]
//! A live mesh upgraded one machine at a time from the previous release
//! (DESIGN.md, "Rolling upgrades"): the previous release's binaries, built
//! from its commit by tests/run.sh, start the mesh in the NAT lab; then one
//! node runs this tree's meshd under the old rendezvous (it must not send
//! what that server does not know: a path report would end its session),
//! then the rendezvous is replaced by this tree's on the same state
//! directory, then the other nodes one after another. At every step every
//! pair still reaches every other, the pairs that went direct stay direct
//! (probes of both releases answer each other), and the relayed pair still
//! relays; the new rendezvous shows the paths the new nodes report, and at
//! the end every pair's. Needs root.
//!
//! Runs only where `MESHD_PREVIOUS_RELEASE` names the previous release's
//! binaries (tests/run.sh sets it); without it the test says so and passes
//! nothing off as tested.
//!
//! Namespaces are prefixed `mlu`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod common;

use common::lab::{eventually, MeshLab, Release, REACH_DEADLINE};

/// Public nodes (direct to everyone) and two symmetric NATs (relayed
/// between themselves).
const NODES: [&str; 4] = ["pub1", "pub2", "sym1", "sym2"];
const PREFIX: &str = "mlu";

fn every_pair_reaches(lab: &MeshLab, step: &str) {
    for from in NODES {
        for to in NODES.iter().copied().filter(|&to| to != from) {
            eventually(
                &format!("{step}: {from} pings {to}"),
                REACH_DEADLINE,
                || lab.ping_once(from, to, &[]),
            );
        }
    }
}

fn expected_paths(lab: &MeshLab, step: &str) {
    lab.wait_for_paths("pub1", "pub2", "direct");
    lab.wait_for_paths("pub1", "sym1", "direct");
    lab.wait_for_paths("sym1", "sym2", "relay");
    eprintln!("{step}: pub1-pub2 direct, pub1-sym1 direct, sym1-sym2 relayed");
}

#[test]
fn a_mesh_of_the_previous_release_upgrades_one_machine_at_a_time_without_losing_a_pair() {
    let Some(previous) = Release::previous() else {
        eprintln!(
            "SKIPPED: MESHD_PREVIOUS_RELEASE is not set; tests/run.sh builds the previous release and sets it"
        );
        return;
    };
    let current = Release::current();
    let lab = MeshLab::with_mesh_of_release(PREFIX, &NODES, &previous);
    every_pair_reaches(&lab, &format!("all on {}", previous.name));
    expected_paths(&lab, &format!("all on {}", previous.name));

    // A new node under the old rendezvous keeps its one session: its
    // welcome names no feature, so it sends no path report (which the old
    // server would answer by ending the session, and the node would be
    // admitted again).
    lab.restart_meshd("pub1", &current);
    every_pair_reaches(&lab, "pub1 upgraded under the old rendezvous");
    expected_paths(&lab, "pub1 upgraded under the old rendezvous");
    let admissions = lab
        .log("pub1")
        .matches("admitted by the rendezvous")
        .count();
    assert_eq!(
        admissions,
        1,
        "pub1's session was never ended:\n{}",
        lab.log("pub1")
    );

    // The rendezvous: it reads the previous release's state directory.
    lab.restart_rendezvous(&current);
    every_pair_reaches(&lab, "rendezvous upgraded");
    expected_paths(&lab, "rendezvous upgraded");
    // The new node reports its paths; the old ones have no row.
    eventually(
        "the new rendezvous has pub1's paths",
        REACH_DEADLINE,
        || {
            let matrix = lab.rendezvous_json("rv", &["paths", "--json"])?;
            let from: Vec<&str> = matrix["paths"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["from"].as_str())
                .collect();
            if from.len() == NODES.len() - 1 && from.iter().all(|f| *f == "node-pub1") {
                Ok(())
            } else {
                Err(format!("{matrix}"))
            }
        },
    );

    // Then the other nodes, one at a time; a mixed pair must keep working
    // both ways (a new node's timed pings to an old one, an old one's to a
    // new).
    for (i, node) in ["sym1", "pub2", "sym2"].into_iter().enumerate() {
        lab.restart_meshd(node, &current);
        let step = format!("{} node(s) upgraded, the last {node}", i + 2);
        every_pair_reaches(&lab, &step);
        expected_paths(&lab, &step);
    }
    // All new: every ordered pair reported, the symmetric pair the only
    // one not direct.
    eventually("every node reports its paths", REACH_DEADLINE, || {
        let matrix = lab.rendezvous_json("rv", &["paths", "--json"])?;
        let cells = matrix["paths"].as_array().map_or(0, Vec::len);
        if cells == NODES.len() * (NODES.len() - 1) && matrix["pairs_direct"] == 5 {
            Ok(())
        } else {
            Err(format!("{matrix}"))
        }
    });
    lab.assert_all_running();
}
