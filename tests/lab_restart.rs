#![cfg(not(feature = "sim"))]
//! A rendezvous restarted under load, in the NAT lab: a relayed pair of
//! real meshd nodes and a few hundred simulated nodes on the same server.
//! Needs root (network namespaces).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::lab::{eventually, MeshLab, Release};
use common::simnodes::{InNamespace, JoinLine, Watch};

/// Simulated nodes beside the lab's real ones: bounded, for CI.
const SIMULATED: usize = 300;

#[test]
fn a_rendezvous_restarted_under_300_nodes_exits_at_once_and_has_them_and_the_relayed_pair_back() {
    let lab = MeshLab::with_mesh_of("rst", &["pub1", "sym1", "sym2"]);
    lab.wait_for_paths("sym1", "sym2", "relay");
    lab.wait_for_reach("sym1", "sym2");

    // The simulated nodes live on the rendezvous machine itself (each with
    // a loopback source address of its own), so they reach its server
    // without touching the lab's links.
    let release = Release::current();
    let line = lab
        .rendezvous_admin(
            "rv",
            &["token", "create", "--ttl", "1h", "--uses", "1000"],
            &release,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let join = JoinLine::parse(
        line.lines()
            .find(|l| l.starts_with("meshd join "))
            .expect("a join line"),
    );
    let watch = Arc::new(Watch::default());
    let _nodes = InNamespace::start(
        &lab.ns("rv"),
        SIMULATED,
        32,
        "127.0.0.1:7443",
        &join,
        watch.clone(),
    );
    eventually(
        "every simulated node is admitted",
        Duration::from_secs(120),
        || match watch.sessions.load(Ordering::Relaxed) {
            n if n >= SIMULATED => Ok(()),
            n => Err(format!("{n} of {SIMULATED} sessions")),
        },
    );
    let deltas = watch.deltas.load(Ordering::Relaxed);
    // Coming back, each offers the digest of the map it holds, as meshd does.
    watch.offer_digest.store(true, Ordering::Relaxed);

    // SIGTERM, as systemd stops it, then a new server on the same state.
    let sigterm = Instant::now();
    lab.stop("rv");
    let exit = sigterm.elapsed();
    lab.serve_rendezvous("rv", &release);
    let served = sigterm.elapsed();
    // The relayed pair needs both ends back on the server: the relay is
    // there.
    eventually("sym1 reaches sym2 again", Duration::from_secs(30), || {
        lab.ping_once("sym1", "sym2", &[])
    });
    let pair_back = sigterm.elapsed();
    eventually(
        "every simulated node is back",
        Duration::from_secs(30),
        || match watch.readmitted.lock().unwrap().len() {
            n if n >= SIMULATED => Ok(()),
            n => Err(format!("{n} of {SIMULATED} back")),
        },
    );
    let back = watch.back_since(sigterm);
    let all_back = *back.last().unwrap();
    eprintln!(
        "SIGTERM to exit {exit:.2?}; new server serving at {served:.2?}; sym1→sym2 again at \
         {pair_back:.2?}; {SIMULATED} simulated nodes back: p50 {:.2?}, all {all_back:.2?}; \
         {} failed attempts",
        back[back.len() / 2],
        watch.failed.load(Ordering::Relaxed)
    );
    assert!(
        exit <= Duration::from_secs(5),
        "SIGTERM to exit took {exit:?} with {SIMULATED} nodes connected"
    );
    assert!(
        all_back <= Duration::from_secs(20),
        "every node back within 20 s of the SIGTERM: {all_back:?}"
    );
    // Each held the new server's map: none was sent again, to the
    // simulated nodes nor to the real ones.
    assert_eq!(
        watch.unchanged.load(Ordering::Relaxed),
        watch.readmitted.lock().unwrap().len() as u64,
        "every simulated node welcomed back without the map it holds"
    );
    for node in ["pub1", "sym1", "sym2"] {
        eventually(
            &format!("{node} welcomed back without the map it holds"),
            Duration::from_secs(30),
            || {
                let log = lab.log(node);
                let admissions: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("admitted by the rendezvous"))
                    .collect();
                match admissions.as_slice() {
                    [first, .., last]
                        if !first.contains("peers_unchanged=true")
                            && last.contains("peers_unchanged=true") =>
                    {
                        Ok(())
                    }
                    other => Err(format!("its admissions: {other:?}")),
                }
            },
        );
    }
    // Nothing changed for anyone: no entry is sent again.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        watch.deltas.load(Ordering::Relaxed),
        deltas,
        "nodes back with nothing new are not sent to their peers"
    );
    // The real nodes are back too, on the same paths.
    lab.wait_for_paths("sym1", "sym2", "relay");
    lab.wait_for_reach("pub1", "sym1");
}
