#![cfg(not(feature = "sim"))]
//! The mesh's paths at a glance, in the NAT lab of `deploy/lab`: every node
//! reports its paths to the rendezvous, and `mesh-rendezvous paths`
//! shows, for every ordered pair, what that node's own `meshctl peers`
//! says — the public and 1:1-NAT pairs direct, the two symmetric NATs
//! relayed — with the share of pairs direct; `--dot` draws one edge per
//! ordered pair, the relayed ones dashed and red, and Graphviz's `dot`
//! renders it. Needs root.
//!
//! The lab is tests/common's [`MeshLab`] under the prefix `mlg` (see
//! tests/lab_mesh.rs for the others'); it is removed when the test ends,
//! failed or not.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use common::lab::{eventually, MeshLab, REACH_DEADLINE, SETTLE_DEADLINE};
use common::topology::{topology, Kind};
use common::{output, utf8};

/// The prefix of this file's namespaces.
const PREFIX: &str = "mlg";

/// Public, 1:1 NAT and the two symmetric NATs: every pair with a public or
/// 1:1 side goes direct, the symmetric pair through the relay.
const NODES: [&str; 5] = ["pub1", "pub2", "nat11", "sym1", "sym2"];

fn mesh_name(node: &str) -> String {
    format!("node-{node}")
}

/// The path the design promises for a pair of these nodes.
fn expected(a: &str, b: &str) -> &'static str {
    let reachable = |n: &str| matches!(topology().node(n).kind, Kind::Public | Kind::OneToOne);
    if reachable(a) || reachable(b) {
        "direct"
    } else {
        "relay"
    }
}

/// What a node's own `meshctl peers --json` entry says, in the matrix's
/// words: direct by the endpoint's family, relay, or down (no path, or no
/// handshake for 3 minutes).
fn cell_of_peer(peer: &serde_json::Value) -> Result<String, String> {
    if peer["online"] != true {
        return Ok("down".into());
    }
    match peer["path"].as_str() {
        Some("direct") => {
            let endpoint: SocketAddr = peer["endpoint"]
                .as_str()
                .and_then(|e| e.parse().ok())
                .ok_or_else(|| format!("a direct peer without an endpoint: {peer}"))?;
            Ok(if endpoint.ip().to_canonical().is_ipv4() {
                "direct_v4".into()
            } else {
                "direct_v6".into()
            })
        }
        Some("relay") => Ok("relay".into()),
        Some("none") => Ok("down".into()),
        other => Err(format!("path {other:?} in {peer}")),
    }
}

/// What each side says of each ordered pair: (from, to) → cell.
type Cells = BTreeMap<(String, String), String>;

/// (from, to) → cell, from every node's own `meshctl peers --json`.
fn what_nodes_say(lab: &MeshLab) -> Result<Cells, String> {
    let mut said = BTreeMap::new();
    for from in NODES {
        let peers = lab.meshctl(from, "peers")?;
        for peer in peers.as_array().into_iter().flatten() {
            let to = peer["name"]
                .as_str()
                .ok_or(format!("a nameless peer: {peer}"))?;
            said.insert((mesh_name(from), to.to_owned()), cell_of_peer(peer)?);
        }
    }
    Ok(said)
}

/// (from, to) → cell, from `mesh-rendezvous paths --json`, with the matrix.
fn what_the_matrix_says(lab: &MeshLab) -> Result<(Cells, serde_json::Value), String> {
    let matrix = lab.rendezvous_json("rv", &["paths", "--json"])?;
    let mut said = BTreeMap::new();
    for cell in matrix["paths"].as_array().into_iter().flatten() {
        let (Some(from), Some(to), Some(path)) = (
            cell["from"].as_str(),
            cell["to"].as_str(),
            cell["path"].as_str(),
        ) else {
            return Err(format!("a malformed cell: {cell}"));
        };
        said.insert((from.to_owned(), to.to_owned()), path.to_owned());
    }
    Ok((said, matrix))
}

#[test]
fn the_path_matrix_shows_what_every_node_says_and_draws_the_relay() {
    let started = Instant::now();
    let lab = MeshLab::with_mesh_of(PREFIX, &NODES);
    for from in NODES {
        for to in NODES.into_iter().filter(|&to| to != from) {
            eventually(
                &format!("{from} pings {to} over the overlay"),
                REACH_DEADLINE,
                || lab.ping_once(from, to, &[]),
            );
        }
    }

    // Every pair on its path, and the matrix agreeing with every node for
    // every ordered pair: reports follow a change within about 5 s.
    let ordered = NODES.len() * (NODES.len() - 1);
    let matrix = eventually(
        "the matrix shows what every node says of every peer",
        SETTLE_DEADLINE,
        || {
            let nodes = what_nodes_say(&lab)?;
            for ((from, to), cell) in &nodes {
                let want = expected(&from["node-".len()..], &to["node-".len()..]);
                if !cell.starts_with(want) {
                    return Err(format!("{from} -> {to} is {cell}, not {want} yet"));
                }
            }
            let (cells, matrix) = what_the_matrix_says(&lab)?;
            if nodes.len() != ordered || cells != nodes {
                return Err(format!("the nodes say {nodes:?}, the matrix {cells:?}"));
            }
            Ok(matrix)
        },
    );
    let pairs = NODES.len() * (NODES.len() - 1) / 2;
    let direct = (0..NODES.len())
        .flat_map(|i| (i + 1..NODES.len()).map(move |j| (NODES[i], NODES[j])))
        .filter(|(a, b)| expected(a, b) == "direct")
        .count();
    assert_eq!(
        ["pairs", "pairs_reported", "pairs_direct"].map(|k| matrix[k].as_u64()),
        [pairs, pairs, direct].map(|n| Some(n as u64)),
        "{matrix}"
    );
    let rtts = matrix["paths"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["path"].as_str().is_some_and(|p| p.starts_with("direct")))
        .filter(|c| c["rtt_ms"].as_f64().is_some_and(|r| r > 0.0))
        .count();
    assert!(rtts > 0, "no direct cell has an RTT: {matrix}");

    // The table: a row per node, and the share direct.
    let table = lab
        .rendezvous_admin("rv", &["paths"], &common::lab::Release::current())
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{table}");
    let share = format!(
        "direct: {direct} of {pairs} pairs ({:.0} %)",
        100.0 * direct as f64 / pairs as f64
    );
    assert!(table.contains(&share), "{share:?} in\n{table}");
    for node in NODES {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("{} ", mesh_name(node))))
            .unwrap_or_else(|| panic!("no row for {node} in\n{table}"));
        assert_eq!(
            row.split_whitespace().next(),
            Some(mesh_name(node).as_str())
        );
    }

    // The graph: one edge per ordered pair, the relayed ones marked.
    let dot = lab
        .rendezvous_admin("rv", &["paths", "--dot"], &common::lab::Release::current())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut edges: BTreeMap<(String, String), String> = BTreeMap::new();
    for line in dot.lines().filter(|l| l.contains(" -> ")) {
        let (ends, attributes) = line
            .trim()
            .split_once(" [")
            .expect("an edge has attributes");
        let (from, to) = ends.split_once(" -> ").expect("an edge");
        let unquote = |s: &str| s.trim().trim_matches('"').to_owned();
        let previous = edges.insert((unquote(from), unquote(to)), attributes.to_owned());
        assert!(previous.is_none(), "two edges {from} -> {to} in\n{dot}");
    }
    assert_eq!(edges.len(), ordered, "{dot}");
    for ((from, to), attributes) in &edges {
        let relayed = expected(&from["node-".len()..], &to["node-".len()..]) == "relay";
        let marked = attributes.contains("style=dashed") && attributes.contains("color=red");
        assert_eq!(marked, relayed, "{from} -> {to}: [{attributes}");
        if !relayed {
            assert!(
                attributes.contains("style=solid"),
                "{from} -> {to}: [{attributes}"
            );
        }
    }
    // Graphviz reads it and draws every node.
    let dot_file = lab.dir().join("paths.dot");
    std::fs::write(&dot_file, &dot).unwrap();
    let svg = output("dot", &["-Tsvg", utf8(&dot_file)]);
    assert!(
        svg.status.success(),
        "dot -Tsvg: {}",
        String::from_utf8_lossy(&svg.stderr)
    );
    // (Graphviz writes a `-` in SVG text as `&#45;`.)
    let svg = String::from_utf8_lossy(&svg.stdout).replace("&#45;", "-");
    for node in NODES {
        assert!(svg.contains(&mesh_name(node)), "{node} in the SVG");
    }
    eprintln!("paths test took {:?}", started.elapsed());
}
