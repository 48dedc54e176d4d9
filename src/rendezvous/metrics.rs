//! mesh-rendezvous's Prometheus metrics: its nodes, admissions, relayed
//! traffic and rate limits, as families of the text format
//! ([`crate::metrics`]). Pure: [`render_rendezvous`] turns what the
//! registry and relay tasks report into text; the server
//! (`rendezvous/server.rs`) gathers it for each scrape and serves it with
//! [`crate::metrics::MetricsServer`].

use std::net::Ipv4Addr;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::metrics::{family, Kind, NO_LABELS};
use crate::relay::server::RelaySnapshot;
use crate::rendezvous::pending::AdmissionCounts;
use crate::rendezvous::registry::{Counters, NodeStatus};
use crate::wire::control::RejectReason;

/// What mesh-rendezvous reports, gathered from its registry and relay tasks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RendezvousMetrics {
    /// Every registered node, with whether it is connected.
    pub nodes: Vec<NodeStatus>,
    /// Hellos refused since the server started, by reason.
    pub admission_failures: Vec<(RejectReason, u64)>,
    /// Connections turned away before admission started, and Retries.
    pub admission: AdmissionCounts,
    pub relay: RelaySnapshot,
    /// The registry's rate limits and refused candidates.
    pub registry: Counters,
    /// Saves of the registry to its store.
    pub store_writes: u64,
}

/// A rejection reason as a label value: its name on the wire.
fn reject_label(reason: RejectReason) -> &'static str {
    match reason {
        RejectReason::Version => "version",
        RejectReason::BadProof => "bad_proof",
        RejectReason::BadToken => "bad_token",
        RejectReason::Removed => "removed",
        RejectReason::BadHello => "bad_hello",
    }
}

/// mesh-rendezvous's metrics. Relay pairs are labelled `source` and
/// `destination` with the two nodes' overlay addresses, which are their
/// relay ids; relayed bytes are payload bytes (WireGuard datagrams), without
/// the relay header.
pub fn render_rendezvous(metrics: &RendezvousMetrics) -> String {
    crate::metrics::render(metrics.clone())
}

impl Collector for RendezvousMetrics {
    fn encode(&self, mut out: DescriptorEncoder) -> std::fmt::Result {
        let out = &mut out;
        family(
            out,
            "mesh_rendezvous_nodes",
            Kind::Gauge,
            "Nodes registered in the mesh.",
            [(NO_LABELS, self.nodes.len().into())],
        )?;
        family(
            out,
            "mesh_rendezvous_nodes_connected",
            Kind::Gauge,
            "Registered nodes connected now.",
            [(
                NO_LABELS,
                self.nodes.iter().filter(|n| n.online).count().into(),
            )],
        )?;
        family(
            out,
            "mesh_rendezvous_node_connected",
            Kind::Gauge,
            "1 while the node is connected, 0 otherwise.",
            self.nodes.iter().map(|node| {
                (
                    [
                        ("node", node.name.clone()),
                        ("public_key", node.public_key.short()),
                        ("address", node.ipv4.to_string()),
                    ],
                    node.online.into(),
                )
            }),
        )?;
        family(
            out,
            "mesh_rendezvous_admission_failures_total",
            Kind::Counter,
            "Hellos refused since the server started, by reason.",
            self.admission_failures
                .iter()
                .map(|(reason, count)| ([("reason", reject_label(*reason))], (*count).into())),
        )?;
        let admission = &self.admission;
        family(
            out,
            "mesh_rendezvous_admissions_pending",
            Kind::Gauge,
            "Connections in admission now.",
            [(NO_LABELS, admission.pending.into())],
        )?;
        family(
            out,
            "mesh_rendezvous_connections_refused_total",
            Kind::Counter,
            "Connections refused before admission: their source had too many pending, or the table was full.",
            [
                ([("reason", "per_source")], admission.refused_per_source.into()),
                ([("reason", "table_full")], admission.refused_table_full.into()),
            ],
        )?;
        family(
            out,
            "mesh_rendezvous_address_validations_total",
            Kind::Counter,
            "QUIC Retry packets sent because many admissions were pending.",
            [(NO_LABELS, admission.validations.into())],
        )?;
        self.encode_relay(out)?;
        self.encode_registry_counters(out)
    }
}

impl RendezvousMetrics {
    /// The relay's totals, pairs and drops.
    fn encode_relay(&self, out: &mut DescriptorEncoder) -> std::fmt::Result {
        let stats = &self.relay.stats;
        family(
            out,
            "mesh_rendezvous_relay_packets_total",
            Kind::Counter,
            "Packets relayed between nodes.",
            [(NO_LABELS, stats.forwarded.packets.into())],
        )?;
        family(
            out,
            "mesh_rendezvous_relay_bytes_total",
            Kind::Counter,
            "Payload bytes relayed between nodes.",
            [(NO_LABELS, stats.forwarded.bytes.into())],
        )?;
        let pairs: Vec<_> = self
            .relay
            .pairs
            .iter()
            .map(|((from, to), s)| {
                let labels = [
                    ("source", Ipv4Addr::from(from.get()).to_string()),
                    ("destination", Ipv4Addr::from(to.get()).to_string()),
                ];
                (labels, *s)
            })
            .collect();
        family(
            out,
            "mesh_rendezvous_relay_pair_packets_total",
            Kind::Counter,
            "Packets relayed from one node to another.",
            pairs
                .iter()
                .map(|(labels, s)| (labels.clone(), s.packets.into())),
        )?;
        family(
            out,
            "mesh_rendezvous_relay_pair_bytes_total",
            Kind::Counter,
            "Payload bytes relayed from one node to another.",
            pairs
                .iter()
                .map(|(labels, s)| (labels.clone(), s.bytes.into())),
        )?;
        family(
            out,
            "mesh_rendezvous_relay_dropped_packets_total",
            Kind::Counter,
            "Relay frames not forwarded, by reason.",
            stats
                .drops()
                .map(|(reason, count)| ([("reason", reason.as_str())], count.into())),
        )
    }

    /// The registry's write and rate-limit counters.
    fn encode_registry_counters(&self, out: &mut DescriptorEncoder) -> std::fmt::Result {
        let counters = &self.registry;
        family(
            out,
            "mesh_rendezvous_store_writes_total",
            Kind::Counter,
            "Saves of the registry to its store.",
            [(NO_LABELS, self.store_writes.into())],
        )?;
        family(
            out,
            "mesh_rendezvous_messages_over_rate_total",
            Kind::Counter,
            "Node messages dropped for being over their rate, by kind.",
            counters
                .over_rate()
                .map(|(kind, count)| ([("kind", kind.as_str())], count.into())),
        )?;
        family(
            out,
            "mesh_rendezvous_punches_pair_limited_total",
            Kind::Counter,
            "Punches dropped by the rate per (requester, target) pair.",
            [(NO_LABELS, counters.punch_pair_limited.into())],
        )?;
        family(
            out,
            "mesh_rendezvous_connections_closed_flooding_total",
            Kind::Counter,
            "Node connections closed for sending messages over their rate.",
            [(NO_LABELS, counters.closed_flooding.into())],
        )?;
        family(
            out,
            "mesh_rendezvous_ports_taken_total",
            Kind::Counter,
            "Welcomes that told a node another node behind the same NAT holds its UDP port.",
            [(NO_LABELS, counters.ports_taken.into())],
        )?;
        family(
            out,
            "mesh_rendezvous_connections_migrated_total",
            Kind::Counter,
            "Node connections that moved to a new address (the node's observed address changed).",
            [(NO_LABELS, counters.migrations.into())],
        )?;
        family(
            out,
            "mesh_rendezvous_welcomes_unchanged_total",
            Kind::Counter,
            "Welcomes sent without the peer map, because the node holds the server's map already.",
            [(NO_LABELS, counters.welcomes_unchanged.into())],
        )?;
        family(
            out,
            "mesh_rendezvous_candidates_refused_total",
            Kind::Counter,
            "Candidates announced by nodes and dropped, by reason.",
            counters
                .candidates_refused()
                .map(|(reason, count)| ([("reason", reason.as_str())], count.into())),
        )?;
        family(
            out,
            "mesh_rendezvous_path_entries_dropped_total",
            Kind::Counter,
            "Entries of nodes' path reports dropped (bad_rtt: the entry kept without its RTT), by reason.",
            counters
                .path_entries_dropped()
                .map(|(reason, count)| ([("reason", reason.as_str())], count.into())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::PublicKey;
    use crate::metrics::scrape;
    use crate::relay::{DropReason, NodeId, RelayLimits, RelayTable};
    use crate::rendezvous::registry::ConnId;

    const KEY_A: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
    const KEY_B: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";

    fn rendezvous_metrics() -> RendezvousMetrics {
        let node = |key: &str, name: &str, last: u8, online| NodeStatus {
            public_key: key.parse::<PublicKey>().unwrap(),
            name: name.into(),
            ipv4: Ipv4Addr::new(100, 72, 0, last),
            ipv6: "fd00::1".parse().unwrap(),
            online,
            server: None,
            joined_at: 0,
            last_seen: 0,
            candidates: vec![],
        };
        let (a, b) = (
            NodeId::new(0x6448_0001).unwrap(),
            NodeId::new(0x6448_0002).unwrap(),
        );
        let mut table = RelayTable::new(RelayLimits::default());
        table.connect(a, ConnId(1));
        table.connect(b, ConnId(2));
        let frame = |to: NodeId, len: usize| {
            let header = crate::wire::relay::RelayHeader {
                kind: crate::wire::relay::RelayKind::Packet,
                node: to,
            };
            let mut out = Vec::new();
            crate::wire::relay::encode_frame(header, &vec![4; len], &mut out).unwrap();
            bytes::Bytes::from(out)
        };
        let now = std::time::Instant::now();
        table.handle_frame(ConnId(1), frame(b, 100), now);
        table.handle_frame(ConnId(1), frame(b, 60), now);
        table.handle_frame(ConnId(2), frame(a, 40), now);
        table.handle_frame(ConnId(2), frame(b, 40), now);
        table.count_drops(DropReason::InboundFull, 7);
        RendezvousMetrics {
            nodes: vec![
                node(KEY_A, "node-a", 1, true),
                node(KEY_B, "say \"hi\"\\\n", 2, false),
            ],
            admission_failures: vec![(RejectReason::BadToken, 2), (RejectReason::BadProof, 1)],
            admission: AdmissionCounts {
                pending: 3,
                refused_per_source: 40,
                refused_table_full: 0,
                validations: 5,
            },
            relay: RelaySnapshot::of(&table),
            registry: Counters::default(),
            store_writes: 5,
        }
    }

    #[test]
    fn a_rendezvous_with_two_nodes_and_relayed_traffic_renders_as_this_text() {
        let text = render_rendezvous(&rendezvous_metrics());
        let expected = r#"# HELP mesh_rendezvous_nodes Nodes registered in the mesh.
# TYPE mesh_rendezvous_nodes gauge
mesh_rendezvous_nodes 2
# HELP mesh_rendezvous_nodes_connected Registered nodes connected now.
# TYPE mesh_rendezvous_nodes_connected gauge
mesh_rendezvous_nodes_connected 1
# HELP mesh_rendezvous_node_connected 1 while the node is connected, 0 otherwise.
# TYPE mesh_rendezvous_node_connected gauge
mesh_rendezvous_node_connected{node="node-a",public_key="hSDwCYkw",address="100.72.0.1"} 1
mesh_rendezvous_node_connected{node="say \"hi\"\\\n",public_key="3p7bfXt9",address="100.72.0.2"} 0
# HELP mesh_rendezvous_admission_failures_total Hellos refused since the server started, by reason.
# TYPE mesh_rendezvous_admission_failures_total counter
mesh_rendezvous_admission_failures_total{reason="bad_token"} 2
mesh_rendezvous_admission_failures_total{reason="bad_proof"} 1
# HELP mesh_rendezvous_admissions_pending Connections in admission now.
# TYPE mesh_rendezvous_admissions_pending gauge
mesh_rendezvous_admissions_pending 3
# HELP mesh_rendezvous_connections_refused_total Connections refused before admission: their source had too many pending, or the table was full.
# TYPE mesh_rendezvous_connections_refused_total counter
mesh_rendezvous_connections_refused_total{reason="per_source"} 40
mesh_rendezvous_connections_refused_total{reason="table_full"} 0
# HELP mesh_rendezvous_address_validations_total QUIC Retry packets sent because many admissions were pending.
# TYPE mesh_rendezvous_address_validations_total counter
mesh_rendezvous_address_validations_total 5
# HELP mesh_rendezvous_relay_packets_total Packets relayed between nodes.
# TYPE mesh_rendezvous_relay_packets_total counter
mesh_rendezvous_relay_packets_total 3
# HELP mesh_rendezvous_relay_bytes_total Payload bytes relayed between nodes.
# TYPE mesh_rendezvous_relay_bytes_total counter
mesh_rendezvous_relay_bytes_total 200
# HELP mesh_rendezvous_relay_pair_packets_total Packets relayed from one node to another.
# TYPE mesh_rendezvous_relay_pair_packets_total counter
mesh_rendezvous_relay_pair_packets_total{source="100.72.0.1",destination="100.72.0.2"} 2
mesh_rendezvous_relay_pair_packets_total{source="100.72.0.2",destination="100.72.0.1"} 1
# HELP mesh_rendezvous_relay_pair_bytes_total Payload bytes relayed from one node to another.
# TYPE mesh_rendezvous_relay_pair_bytes_total counter
mesh_rendezvous_relay_pair_bytes_total{source="100.72.0.1",destination="100.72.0.2"} 160
mesh_rendezvous_relay_pair_bytes_total{source="100.72.0.2",destination="100.72.0.1"} 40
# HELP mesh_rendezvous_relay_dropped_packets_total Relay frames not forwarded, by reason.
# TYPE mesh_rendezvous_relay_dropped_packets_total counter
mesh_rendezvous_relay_dropped_packets_total{reason="not_admitted"} 0
mesh_rendezvous_relay_dropped_packets_total{reason="malformed"} 0
mesh_rendezvous_relay_dropped_packets_total{reason="self_addressed"} 1
mesh_rendezvous_relay_dropped_packets_total{reason="unknown_destination"} 0
mesh_rendezvous_relay_dropped_packets_total{reason="destination_offline"} 0
mesh_rendezvous_relay_dropped_packets_total{reason="rate_limited"} 0
mesh_rendezvous_relay_dropped_packets_total{reason="destination_limited"} 0
mesh_rendezvous_relay_dropped_packets_total{reason="queue_full"} 0
mesh_rendezvous_relay_dropped_packets_total{reason="inbound_full"} 7
mesh_rendezvous_relay_dropped_packets_total{reason="link_spoofed"} 0
# HELP mesh_rendezvous_store_writes_total Saves of the registry to its store.
# TYPE mesh_rendezvous_store_writes_total counter
mesh_rendezvous_store_writes_total 5
# HELP mesh_rendezvous_messages_over_rate_total Node messages dropped for being over their rate, by kind.
# TYPE mesh_rendezvous_messages_over_rate_total counter
mesh_rendezvous_messages_over_rate_total{kind="candidates"} 0
mesh_rendezvous_messages_over_rate_total{kind="nat"} 0
mesh_rendezvous_messages_over_rate_total{kind="punch"} 0
mesh_rendezvous_messages_over_rate_total{kind="paths"} 0
# HELP mesh_rendezvous_punches_pair_limited_total Punches dropped by the rate per (requester, target) pair.
# TYPE mesh_rendezvous_punches_pair_limited_total counter
mesh_rendezvous_punches_pair_limited_total 0
# HELP mesh_rendezvous_connections_closed_flooding_total Node connections closed for sending messages over their rate.
# TYPE mesh_rendezvous_connections_closed_flooding_total counter
mesh_rendezvous_connections_closed_flooding_total 0
# HELP mesh_rendezvous_ports_taken_total Welcomes that told a node another node behind the same NAT holds its UDP port.
# TYPE mesh_rendezvous_ports_taken_total counter
mesh_rendezvous_ports_taken_total 0
# HELP mesh_rendezvous_connections_migrated_total Node connections that moved to a new address (the node's observed address changed).
# TYPE mesh_rendezvous_connections_migrated_total counter
mesh_rendezvous_connections_migrated_total 0
# HELP mesh_rendezvous_welcomes_unchanged_total Welcomes sent without the peer map, because the node holds the server's map already.
# TYPE mesh_rendezvous_welcomes_unchanged_total counter
mesh_rendezvous_welcomes_unchanged_total 0
# HELP mesh_rendezvous_candidates_refused_total Candidates announced by nodes and dropped, by reason.
# TYPE mesh_rendezvous_candidates_refused_total counter
mesh_rendezvous_candidates_refused_total{reason="port_zero"} 0
mesh_rendezvous_candidates_refused_total{reason="unspecified"} 0
mesh_rendezvous_candidates_refused_total{reason="loopback"} 0
mesh_rendezvous_candidates_refused_total{reason="link_local"} 0
mesh_rendezvous_candidates_refused_total{reason="multicast"} 0
mesh_rendezvous_candidates_refused_total{reason="broadcast"} 0
mesh_rendezvous_candidates_refused_total{reason="mesh_prefix"} 0
mesh_rendezvous_candidates_refused_total{reason="claimed_observed"} 0
# HELP mesh_rendezvous_path_entries_dropped_total Entries of nodes' path reports dropped (bad_rtt: the entry kept without its RTT), by reason.
# TYPE mesh_rendezvous_path_entries_dropped_total counter
mesh_rendezvous_path_entries_dropped_total{reason="unreadable"} 0
mesh_rendezvous_path_entries_dropped_total{reason="too_many"} 0
mesh_rendezvous_path_entries_dropped_total{reason="unknown_peer"} 0
mesh_rendezvous_path_entries_dropped_total{reason="duplicate"} 0
mesh_rendezvous_path_entries_dropped_total{reason="bad_rtt"} 0
"#;
        assert_eq!(text, expected);
    }

    #[test]
    fn the_scrape_reads_back_as_the_rendezvous_state_by_an_independent_parser() {
        let metrics = rendezvous_metrics();
        let scrape = scrape::parse(&render_rendezvous(&metrics));
        let value = |name, labels: &[(&str, &str)]| scrape.value(name, labels);
        assert_eq!(
            value("mesh_rendezvous_nodes", &[]),
            Some(metrics.nodes.len() as f64)
        );
        for node in &metrics.nodes {
            assert_eq!(
                value("mesh_rendezvous_node_connected", &[("node", &node.name)]),
                Some(f64::from(u8::from(node.online))),
                "{:?} read back as given",
                node.name
            );
        }
        for (reason, count) in &metrics.admission_failures {
            let reason = reject_label(*reason);
            assert_eq!(
                value(
                    "mesh_rendezvous_admission_failures_total",
                    &[("reason", reason)]
                ),
                Some(*count as f64)
            );
        }
        for ((from, to), stats) in &metrics.relay.pairs {
            let (source, destination) = (
                Ipv4Addr::from(from.get()).to_string(),
                Ipv4Addr::from(to.get()).to_string(),
            );
            let pair = [
                ("source", source.as_str()),
                ("destination", destination.as_str()),
            ];
            assert_eq!(
                value("mesh_rendezvous_relay_pair_bytes_total", &pair),
                Some(stats.bytes as f64)
            );
            assert_eq!(
                value("mesh_rendezvous_relay_pair_packets_total", &pair),
                Some(stats.packets as f64)
            );
        }
        // Every drop reason is listed, with its count.
        let drops = scrape.samples("mesh_rendezvous_relay_dropped_packets_total");
        assert_eq!(drops.len(), <DropReason as strum::EnumCount>::COUNT);
        for (reason, count) in metrics.relay.stats.drops() {
            assert_eq!(
                value(
                    "mesh_rendezvous_relay_dropped_packets_total",
                    &[("reason", reason.as_str())]
                ),
                Some(count as f64)
            );
        }
    }

    #[test]
    fn no_key_appears_beyond_its_short_prefix() {
        let text = render_rendezvous(&rendezvous_metrics());
        for key in [KEY_A, KEY_B] {
            assert!(
                !text.contains(&key[..9]),
                "{key} is cut to 8 characters:\n{text}"
            );
        }
    }
}
