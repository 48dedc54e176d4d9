//! The mesh's paths at a glance: what each node reports of its path to
//! every peer (`NodeMessage::Paths`), checked and kept by the registry, and
//! assembled into the N × N matrix `mesh-rendezvous paths` prints — as a
//! table, as JSON, or as a Graphviz graph.
//!
//! Pure: reports and the node list in, a [`PathMatrix`] and text out.
//!
//! Each server keeps the reports of the nodes connected to it, in memory
//! only: a report is a few seconds old at most and every node sends a
//! fresh one when it connects, so there is nothing worth a store write
//! (with etcd, one per node every few seconds would be most of its load).
//! So on a mesh of several servers, `paths` on one server fills the rows
//! of its own nodes and names the server each other node is on.

// Pure: the clock and randomness are inputs (clippy.toml names what is
// forbidden).
#![deny(clippy::disallowed_methods)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::registry::NodeStatus;
use crate::identity::PublicKey;
use crate::wire::control::{PathEntry, PathList, PathState, MAX_PATH_PEERS, MAX_RTT_US};

/// Why an entry of a report was dropped (or, for [`PathRefusal::BadRtt`],
/// its RTT), for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRefusal {
    /// Not a path entry this version can read.
    Unreadable,
    /// Past [`MAX_PATH_PEERS`] entries.
    TooMany,
    /// Names a key that is no member of the mesh, or the reporter itself.
    UnknownPeer,
    /// Names a peer an earlier entry of the report named.
    Duplicate,
    /// An RTT over [`MAX_RTT_US`], or one for a path that has none (relay,
    /// down): the entry is kept without it.
    BadRtt,
}

impl PathRefusal {
    pub const ALL: [PathRefusal; 5] = [
        Self::Unreadable,
        Self::TooMany,
        Self::UnknownPeer,
        Self::Duplicate,
        Self::BadRtt,
    ];

    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unreadable => "unreadable",
            Self::TooMany => "too_many",
            Self::UnknownPeer => "unknown_peer",
            Self::Duplicate => "duplicate",
            Self::BadRtt => "bad_rtt",
        }
    }

    pub fn index(self) -> usize {
        match self {
            Self::Unreadable => 0,
            Self::TooMany => 1,
            Self::UnknownPeer => 2,
            Self::Duplicate => 3,
            Self::BadRtt => 4,
        }
    }
}

/// A node's latest report as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathReport {
    /// When it arrived (Unix seconds).
    pub at: u64,
    /// One entry per peer, sorted by key.
    pub peers: Vec<PathEntry>,
}

/// Checks a report from `from`: at most [`MAX_PATH_PEERS`] entries, each
/// naming a member (`is_member`) other than `from`, once, with a plausible
/// RTT. What does not pass is dropped and counted in `dropped` (indexed as
/// [`PathRefusal::index`]); the rest is sorted by peer.
pub fn check(
    from: &PublicKey,
    list: PathList,
    is_member: impl Fn(&PublicKey) -> bool,
    dropped: &mut [u64; PathRefusal::ALL.len()],
) -> Vec<PathEntry> {
    let mut count = |why: PathRefusal, n: usize| {
        if let Some(c) = dropped.get_mut(why.index()) {
            *c = c.saturating_add(n as u64);
        }
    };
    count(PathRefusal::Unreadable, list.unreadable);
    let mut entries = list.entries;
    if entries.len() > MAX_PATH_PEERS {
        count(PathRefusal::TooMany, entries.len() - MAX_PATH_PEERS);
        entries.truncate(MAX_PATH_PEERS);
    }
    let mut seen = HashSet::with_capacity(entries.len());
    let mut kept = Vec::with_capacity(entries.len());
    for mut entry in entries {
        if entry.peer == *from || !is_member(&entry.peer) {
            count(PathRefusal::UnknownPeer, 1);
            continue;
        }
        if !seen.insert(entry.peer) {
            count(PathRefusal::Duplicate, 1);
            continue;
        }
        if entry
            .rtt_us
            .is_some_and(|rtt| rtt > MAX_RTT_US || !entry.path.is_direct())
        {
            count(PathRefusal::BadRtt, 1);
            entry.rtt_us = None;
        }
        kept.push(entry);
    }
    kept.sort_by_key(|e| e.peer);
    kept
}

/// One node of the matrix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatrixNode {
    pub name: String,
    pub public_key: PublicKey,
    pub ipv4: Ipv4Addr,
    pub online: bool,
    /// The server it is connected to, when online.
    pub server: Option<String>,
    /// When this server got its latest report (Unix seconds); null when it
    /// has none: the node is offline, on another server, or older than 0.4.0.
    pub reported_at: Option<u64>,
}

/// What `from` says of its path to `to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatrixCell {
    pub from: String,
    pub to: String,
    pub path: PathState,
    /// The direct path's RTT by probes, in milliseconds, when measured.
    pub rtt_ms: Option<f64>,
}

/// The mesh's paths: every node, and every ordered pair a report covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathMatrix {
    /// The server that assembled it: it has the reports of its own nodes.
    pub server: String,
    /// Sorted by name.
    pub nodes: Vec<MatrixNode>,
    /// Sorted by `from`, then `to`.
    pub paths: Vec<MatrixCell>,
    /// Unordered pairs of nodes.
    pub pairs: usize,
    /// Pairs at least one side of which reported.
    pub pairs_reported: usize,
    /// Reported pairs that every reporting side says are direct.
    pub pairs_direct: usize,
    /// Pairs whose two sides both reported and say different things.
    pub pairs_disagreeing: usize,
}

impl PathMatrix {
    /// Share of the reported pairs that are direct, in percent.
    pub fn direct_percent(&self) -> Option<f64> {
        (self.pairs_reported > 0)
            .then(|| 100.0 * self.pairs_direct as f64 / self.pairs_reported as f64)
    }

    /// What `from` says of its path to `to`.
    pub fn cell(&self, from: &str, to: &str) -> Option<&MatrixCell> {
        self.paths.iter().find(|c| c.from == from && c.to == to)
    }
}

/// Builds the matrix from the registry's nodes and the reports this server
/// holds. A report's entry for a node that has left the mesh since is left
/// out.
pub fn assemble(
    server: &str,
    nodes: &[NodeStatus],
    reports: &BTreeMap<PublicKey, PathReport>,
) -> PathMatrix {
    let names: HashMap<PublicKey, &str> = nodes
        .iter()
        .map(|n| (n.public_key, n.name.as_str()))
        .collect();
    let mut matrix_nodes: Vec<MatrixNode> = nodes
        .iter()
        .map(|n| MatrixNode {
            name: n.name.clone(),
            public_key: n.public_key,
            ipv4: n.ipv4,
            online: n.online,
            server: n.server.clone(),
            reported_at: reports.get(&n.public_key).map(|r| r.at),
        })
        .collect();
    matrix_nodes.sort_by(|a, b| a.name.cmp(&b.name));

    let mut cells: Vec<MatrixCell> = Vec::new();
    let mut said: HashMap<(PublicKey, PublicKey), PathState> = HashMap::new();
    for (from, report) in reports {
        let Some(from_name) = names.get(from) else {
            continue;
        };
        for entry in &report.peers {
            let Some(to_name) = names.get(&entry.peer) else {
                continue;
            };
            said.insert((*from, entry.peer), entry.path);
            cells.push(MatrixCell {
                from: (*from_name).to_owned(),
                to: (*to_name).to_owned(),
                path: entry.path,
                rtt_ms: entry.rtt_us.map(|us| f64::from(us / 10) / 100.0),
            });
        }
    }
    cells.sort_by(|a, b| (&a.from, &a.to).cmp(&(&b.from, &b.to)));

    let (mut pairs, mut reported, mut direct, mut disagreeing) = (0, 0, 0, 0);
    for (i, a) in nodes.iter().enumerate() {
        for b in nodes.iter().skip(i + 1) {
            pairs += 1;
            let sides: Vec<PathState> = [
                said.get(&(a.public_key, b.public_key)),
                said.get(&(b.public_key, a.public_key)),
            ]
            .into_iter()
            .flatten()
            .copied()
            .collect();
            if sides.is_empty() {
                continue;
            }
            reported += 1;
            if sides.iter().all(|s| s.is_direct()) {
                direct += 1;
            }
            if let [ab, ba] = sides[..] {
                if ab != ba {
                    disagreeing += 1;
                }
            }
        }
    }
    PathMatrix {
        server: server.to_owned(),
        nodes: matrix_nodes,
        paths: cells,
        pairs,
        pairs_reported: reported,
        pairs_direct: direct,
        pairs_disagreeing: disagreeing,
    }
}

/// A cell as the table shows it: `v4 0.42ms`, `v6`, `relay`, `down`.
fn cell_text(cell: &MatrixCell) -> String {
    let word = match cell.path {
        PathState::DirectV4 => "v4",
        PathState::DirectV6 => "v6",
        PathState::Relay => "relay",
        PathState::Down => "down",
    };
    match cell.rtt_ms {
        Some(rtt) => format!("{word} {}", ms(rtt)),
        None => word.to_owned(),
    }
}

/// Milliseconds as people read them: two decimals below 1 ms, one below
/// 10 ms, none above.
fn ms(rtt: f64) -> String {
    if rtt < 1.0 {
        format!("{rtt:.2}ms")
    } else if rtt < 10.0 {
        format!("{rtt:.1}ms")
    } else {
        format!("{rtt:.0}ms")
    }
}

/// Why a node's row is empty, or `None` when it has a report.
fn no_report(node: &MatrixNode, server: &str) -> Option<String> {
    if node.reported_at.is_some() {
        return None;
    }
    Some(match &node.server {
        _ if !node.online => "offline".to_owned(),
        Some(other) if other != server => {
            format!("on server {other}: run `mesh-rendezvous paths` there")
        }
        _ => "no report yet (or meshd before 0.4.0)".to_owned(),
    })
}

/// The matrix as a table: rows are the reporting side (from), columns the
/// peer (to); then the share of pairs direct, the pairs whose sides
/// disagree, and why rows are empty.
pub fn render_table(matrix: &PathMatrix) -> String {
    let names: Vec<&str> = matrix.nodes.iter().map(|n| n.name.as_str()).collect();
    let corner = "from \\ to";
    let mut rows: Vec<Vec<String>> = Vec::with_capacity(names.len() + 1);
    rows.push(
        std::iter::once(corner.to_owned())
            .chain(names.iter().map(|n| (*n).to_owned()))
            .collect(),
    );
    for from in &names {
        let mut row = vec![(*from).to_owned()];
        for to in &names {
            row.push(if from == to {
                "·".to_owned()
            } else {
                matrix
                    .cell(from, to)
                    .map_or_else(|| "?".to_owned(), cell_text)
            });
        }
        rows.push(row);
    }
    let columns = names.len() + 1;
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}", w = *w))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out.push('\n');
    match matrix.direct_percent() {
        Some(share) => {
            let _ = writeln!(
                out,
                "direct: {} of {} pairs ({share:.0} %); a pair is direct when every side that reported says so",
                matrix.pairs_direct, matrix.pairs_reported
            );
        }
        None => out.push_str("no node has reported its paths to this server yet\n"),
    }
    if matrix.pairs_reported < matrix.pairs {
        let _ = writeln!(
            out,
            "{} of {} pairs not reported by either side",
            matrix.pairs - matrix.pairs_reported,
            matrix.pairs
        );
    }
    for (a, b) in disagreeing(matrix) {
        let _ = writeln!(
            out,
            "{} and {} disagree: {} says {}, {} says {}",
            a.from,
            a.to,
            a.from,
            cell_text(a),
            b.from,
            cell_text(b)
        );
    }
    for node in &matrix.nodes {
        if let Some(why) = no_report(node, &matrix.server) {
            let _ = writeln!(out, "{}: no row: {why}", node.name);
        }
    }
    out
}

/// The pairs whose two sides say different things, each once.
fn disagreeing(matrix: &PathMatrix) -> Vec<(&MatrixCell, &MatrixCell)> {
    matrix
        .paths
        .iter()
        .filter(|c| c.from < c.to)
        .filter_map(|ab| {
            let ba = matrix.cell(&ab.to, &ab.from)?;
            (ab.path != ba.path).then_some((ab, ba))
        })
        .collect()
}

/// A string as a Graphviz ID: quoted, with `"` and `\` escaped, a line
/// break as Graphviz's `\n`, other control characters left out.
fn dot_id(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The matrix as a Graphviz digraph (`dot -Tsvg`): one node per mesh node,
/// one edge per reported ordered pair, from the reporting side; direct
/// edges solid, relayed ones dashed and red, down ones dotted and grey,
/// each labelled with its path and RTT.
pub fn render_dot(matrix: &PathMatrix) -> String {
    let mut out = String::from("digraph mesh {\n");
    let _ = writeln!(
        out,
        "  label={};",
        dot_id(&match matrix.direct_percent() {
            Some(share) => format!(
                "mesh paths from server {}: {} of {} pairs direct ({share:.0} %)",
                matrix.server, matrix.pairs_direct, matrix.pairs_reported
            ),
            None => format!("mesh paths from server {}: no reports", matrix.server),
        })
    );
    out.push_str("  labelloc=t;\n  node [shape=box, fontname=\"monospace\"];\n");
    out.push_str("  edge [fontname=\"monospace\", fontsize=10];\n");
    for node in &matrix.nodes {
        let mut label = format!("{}\n{}", node.name, node.ipv4);
        if let Some(why) = no_report(node, &matrix.server) {
            label.push('\n');
            label.push_str(&why);
        }
        let style = if node.online { "solid" } else { "dashed" };
        let _ = writeln!(
            out,
            "  {} [label={}, style={style}];",
            dot_id(&node.name),
            dot_id(&label)
        );
    }
    for cell in &matrix.paths {
        let (color, style) = match cell.path {
            PathState::DirectV4 | PathState::DirectV6 => ("black", "solid"),
            PathState::Relay => ("red", "dashed"),
            PathState::Down => ("grey", "dotted"),
        };
        let _ = writeln!(
            out,
            "  {} -> {} [label={}, color={color}, fontcolor={color}, style={style}];",
            dot_id(&cell.from),
            dot_id(&cell.to),
            dot_id(&cell_text(cell))
        );
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::PrivateKey;

    fn key(n: u8) -> PublicKey {
        PrivateKey::from_bytes([n; 32]).public_key()
    }

    fn node(n: u8, name: &str) -> NodeStatus {
        NodeStatus {
            public_key: key(n),
            name: name.to_owned(),
            ipv4: Ipv4Addr::new(100, 72, 0, n),
            ipv6: "fd00::1".parse().unwrap(),
            online: true,
            server: Some("rv".into()),
            joined_at: 0,
            last_seen: 0,
            candidates: Vec::new(),
        }
    }

    fn entry(n: u8, path: PathState, rtt_us: Option<u32>) -> PathEntry {
        PathEntry {
            peer: key(n),
            path,
            rtt_us,
        }
    }

    fn report(peers: Vec<PathEntry>) -> PathReport {
        PathReport { at: 100, peers }
    }

    /// a, b public (direct both ways), c symmetric (relayed with a, and
    /// reports nothing), d on another server.
    fn mesh() -> (Vec<NodeStatus>, BTreeMap<PublicKey, PathReport>) {
        let mut d = node(4, "d");
        d.server = Some("rv2".into());
        let nodes = vec![node(2, "b"), node(1, "a"), node(3, "c"), d];
        let mut reports = BTreeMap::new();
        reports.insert(
            key(1),
            report(vec![
                entry(2, PathState::DirectV4, Some(420)),
                entry(3, PathState::Relay, None),
            ]),
        );
        reports.insert(
            key(2),
            report(vec![
                entry(1, PathState::DirectV6, Some(12_345)),
                entry(3, PathState::Down, None),
            ]),
        );
        (nodes, reports)
    }

    #[test]
    fn the_matrix_has_what_each_side_says_and_counts_pairs() {
        let (nodes, reports) = mesh();
        let m = assemble("rv", &nodes, &reports);
        assert_eq!(
            m.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c", "d"]
        );
        assert_eq!(m.paths.len(), 4);
        let ab = m.cell("a", "b").unwrap();
        assert_eq!((ab.path, ab.rtt_ms), (PathState::DirectV4, Some(0.42)));
        assert_eq!(m.cell("b", "a").unwrap().rtt_ms, Some(12.34));
        assert_eq!(m.cell("c", "a"), None);
        // a–b, a–c, b–c reported; a–d, b–d, c–d not; only a–b direct.
        assert_eq!(
            (m.pairs, m.pairs_reported, m.pairs_direct),
            (6, 3, 1),
            "{m:?}"
        );
        // a says v4 to b, b says v6 to a: both direct, but not the same.
        assert_eq!(m.pairs_disagreeing, 1);
        assert_eq!(m.direct_percent().map(f64::round), Some(33.0));
    }

    #[test]
    fn a_report_naming_a_node_that_left_is_left_out() {
        let (mut nodes, reports) = mesh();
        nodes.retain(|n| n.name != "c");
        let m = assemble("rv", &nodes, &reports);
        assert!(m.paths.iter().all(|c| c.from != "c" && c.to != "c"));
        assert_eq!((m.pairs, m.pairs_reported), (3, 1));
    }

    #[test]
    fn the_table_has_a_row_and_a_column_per_node_and_says_why_rows_are_empty() {
        let (nodes, reports) = mesh();
        let text = render_table(&assemble("rv", &nodes, &reports));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("from \\ to"), "{text}");
        assert_eq!(lines[0].split_whitespace().count(), 3 + 4, "{text}");
        let row_a: Vec<&str> = lines[1].split("  ").filter(|s| !s.is_empty()).collect();
        assert_eq!(
            row_a.iter().map(|s| s.trim()).collect::<Vec<_>>(),
            ["a", "·", "v4 0.42ms", "relay", "?"],
            "{text}"
        );
        assert!(lines[2].contains("v6 12ms"), "{text}");
        assert!(text.contains("direct: 1 of 3 pairs (33 %)"), "{text}");
        assert!(
            text.contains("a and b disagree: a says v4 0.42ms, b says v6 12ms"),
            "{text}"
        );
        assert!(text.contains("d: no row: on server rv2"), "{text}");
        assert!(text.contains("c: no row: no report yet"), "{text}");
    }

    #[test]
    fn the_graph_has_one_edge_per_reported_pair_and_marks_the_relay() {
        let (nodes, reports) = mesh();
        let dot = render_dot(&assemble("rv", &nodes, &reports));
        assert!(dot.starts_with("digraph mesh {\n") && dot.ends_with("}\n"));
        let edges: Vec<&str> = dot.lines().filter(|l| l.contains(" -> ")).collect();
        assert_eq!(edges.len(), 4, "{dot}");
        let relay = edges.iter().find(|l| l.contains("\"a\" -> \"c\"")).unwrap();
        assert!(relay.contains("style=dashed") && relay.contains("color=red"));
        let direct = edges.iter().find(|l| l.contains("\"a\" -> \"b\"")).unwrap();
        assert!(direct.contains("style=solid") && direct.contains("label=\"v4 0.42ms\""));
        let down = edges.iter().find(|l| l.contains("\"b\" -> \"c\"")).unwrap();
        assert!(down.contains("style=dotted"));
    }

    #[test]
    fn graph_ids_are_quoted_and_escaped() {
        assert_eq!(dot_id("a\"b\\c\nd\u{7}"), r#""a\"b\\c\nd""#);
    }

    #[test]
    fn an_empty_mesh_renders_and_says_there_is_nothing() {
        let m = assemble("rv", &[], &BTreeMap::new());
        assert!(render_table(&m).contains("no node has reported"));
        assert!(render_dot(&m).contains("no reports"));
    }

    #[test]
    fn a_hostile_report_is_cut_down_to_members_once_each() {
        let me = key(1);
        let members: HashSet<PublicKey> = (1..=3).map(key).collect();
        let mut entries = vec![
            entry(2, PathState::DirectV4, Some(300)),
            entry(2, PathState::Relay, None),
            entry(1, PathState::DirectV4, None),
            entry(9, PathState::Relay, None),
            entry(3, PathState::Relay, Some(5)),
        ];
        entries.extend((0..MAX_PATH_PEERS).map(|_| entry(3, PathState::Down, None)));
        let mut dropped = [0; PathRefusal::ALL.len()];
        let list = PathList {
            entries,
            unreadable: 7,
        };
        let kept = check(&me, list, |k| members.contains(k), &mut dropped);
        let mut expected = vec![
            entry(2, PathState::DirectV4, Some(300)),
            entry(3, PathState::Relay, None),
        ];
        expected.sort_by_key(|e| e.peer);
        assert_eq!(kept, expected);
        let by = |r: PathRefusal| dropped[r.index()];
        assert_eq!(by(PathRefusal::Unreadable), 7);
        assert_eq!(by(PathRefusal::TooMany), 5);
        assert_eq!(by(PathRefusal::UnknownPeer), 2);
        assert_eq!(by(PathRefusal::Duplicate), 1 + MAX_PATH_PEERS as u64 - 5);
        assert_eq!(by(PathRefusal::BadRtt), 1);
    }

    #[test]
    fn an_absurd_rtt_is_dropped_and_the_entry_kept() {
        let mut dropped = [0; PathRefusal::ALL.len()];
        let list = PathList::from(vec![entry(2, PathState::DirectV6, Some(MAX_RTT_US + 1))]);
        let kept = check(&key(1), list, |_| true, &mut dropped);
        assert_eq!(kept, vec![entry(2, PathState::DirectV6, None)]);
        assert_eq!(dropped[PathRefusal::BadRtt.index()], 1);
    }
}
