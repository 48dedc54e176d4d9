//! Prefixes behind nodes (pod CIDRs): which advertised prefix each node's
//! peers route to it (DESIGN.md, "Routes").
//!
//! Pure, and decided from replicated state only — the nodes' advertised
//! prefixes with when each was first advertised, the operator's approvals,
//! the mesh's prefixes and the routable ranges (the same on every server) —
//! so every server reaches the same decision without talking to the
//! others. A prefix is, in this order:
//! - [`RouteStatus::Invalid`]: host bits set, a default route, or loopback,
//!   link-local, multicast or unspecified space;
//! - [`RouteStatus::OverlapsMesh`]: it overlaps the overlay prefixes;
//! - [`RouteStatus::AwaitingApproval`]: outside every routable range and not
//!   approved for this node;
//! - [`RouteStatus::Overlaps`]: it overlaps a prefix of another node that
//!   was advertised earlier (ties: the lower key) and accepted;
//! - otherwise [`RouteStatus::Accepted`].
//!
//! A node's own prefixes may overlap each other (cryptokey routing takes
//! the longest match, and both lead to the same node).

use std::collections::{BTreeMap, HashMap};

use ipnet::IpNet;

use crate::identity::PublicKey;
use crate::rendezvous::registry::NodeRecord;
use crate::wire::control::{MeshInfo, RouteDecision, RouteStatus};

/// The decisions on every node's advertised prefixes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    /// Per node with any advertised prefix, in the order it advertised.
    decisions: HashMap<PublicKey, Vec<RouteDecision>>,
    /// Per node with any accepted prefix, sorted.
    accepted: HashMap<PublicKey, Vec<IpNet>>,
}

/// Nodes whose standing changed between two tables.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RouteChanges {
    /// Peers must route other prefixes to these nodes.
    pub accepted: Vec<PublicKey>,
    /// These nodes must be told what became of their prefixes.
    pub decisions: Vec<PublicKey>,
}

/// A prefix as an ordered key: family, network address, length.
type Slot = (bool, u128, u8);

fn slot(net: &IpNet) -> Slot {
    match net {
        IpNet::V4(n) => (false, u128::from(u32::from(n.network())), n.prefix_len()),
        IpNet::V6(n) => (true, u128::from(n.network()), n.prefix_len()),
    }
}

fn last_address(net: &IpNet) -> u128 {
    match net {
        IpNet::V4(n) => u128::from(u32::from(n.broadcast())),
        IpNet::V6(n) => u128::from(n.broadcast()),
    }
}

/// Not a network a node can stand behind.
pub fn is_invalid(net: &IpNet) -> bool {
    if net.trunc() != *net || net.prefix_len() == 0 {
        return true;
    }
    let ip = net.network();
    let special = match ip {
        std::net::IpAddr::V4(v4) => {
            v4.is_loopback() || v4.is_link_local() || v4.is_multicast() || v4.is_unspecified()
        }
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unspecified()
                || v6.is_unicast_link_local()
        }
    };
    // A prefix that reaches into special space (a /1 covering 127/8) is as
    // bad as one inside it.
    special || covers_special(net)
}

fn covers_special(net: &IpNet) -> bool {
    const V4: [&str; 3] = ["127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4"];
    const V6: [&str; 2] = ["fe80::/10", "ff00::/8"];
    let specials: &[&str] = match net {
        IpNet::V4(_) => &V4,
        IpNet::V6(_) => &V6,
    };
    specials
        .iter()
        .filter_map(|s| s.parse::<IpNet>().ok())
        .any(|special| net.contains(&special))
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

impl RouteTable {
    /// Decides every node's prefixes.
    pub fn decide(
        nodes: &BTreeMap<PublicKey, NodeRecord>,
        mesh: &MeshInfo,
        routable: &[IpNet],
    ) -> Self {
        let mesh_nets = [IpNet::V4(mesh.ipv4), IpNet::V6(mesh.ipv6)];
        let mut statuses: HashMap<(PublicKey, IpNet), RouteStatus> = HashMap::new();
        let mut eligible = Vec::new();
        for (key, record) in nodes {
            for route in &record.routes {
                let prefix = route.prefix;
                let status = if is_invalid(&prefix) {
                    RouteStatus::Invalid
                } else if mesh_nets.iter().any(|m| overlaps(m, &prefix)) {
                    RouteStatus::OverlapsMesh
                } else if !routable.iter().any(|r| r.contains(&prefix))
                    && !record.approved_routes.contains(&prefix)
                {
                    RouteStatus::AwaitingApproval
                } else {
                    eligible.push((route.since, *key, prefix));
                    continue;
                };
                statuses.insert((*key, prefix), status);
            }
        }

        // First come, first routed.
        eligible.sort_unstable();
        let mut held: BTreeMap<Slot, (PublicKey, IpNet)> = BTreeMap::new();
        for (_, key, prefix) in eligible {
            let status = match holder_overlapping(&held, &prefix, &key) {
                Some((holder, theirs)) => RouteStatus::Overlaps {
                    node: nodes
                        .get(&holder)
                        .map_or_else(|| holder.short(), |r| r.name.clone()),
                    held: theirs,
                },
                None => {
                    held.insert(slot(&prefix), (key, prefix));
                    RouteStatus::Accepted
                }
            };
            statuses.insert((key, prefix), status);
        }

        let mut table = RouteTable::default();
        for (key, record) in nodes {
            if record.routes.is_empty() {
                continue;
            }
            let decisions: Vec<RouteDecision> = record
                .routes
                .iter()
                .filter_map(|route| {
                    let status = statuses.get(&(*key, route.prefix))?.clone();
                    Some(RouteDecision {
                        prefix: route.prefix,
                        status,
                    })
                })
                .collect();
            let mut accepted: Vec<IpNet> = decisions
                .iter()
                .filter(|d| d.status == RouteStatus::Accepted)
                .map(|d| d.prefix)
                .collect();
            accepted.sort_unstable();
            accepted.dedup();
            if !accepted.is_empty() {
                table.accepted.insert(*key, accepted);
            }
            table.decisions.insert(*key, decisions);
        }
        table
    }

    /// The prefixes peers route to `key`, sorted.
    pub fn accepted(&self, key: &PublicKey) -> &[IpNet] {
        self.accepted.get(key).map_or(&[], Vec::as_slice)
    }

    /// What became of each prefix `key` advertises.
    pub fn decisions(&self, key: &PublicKey) -> &[RouteDecision] {
        self.decisions.get(key).map_or(&[], Vec::as_slice)
    }

    /// The nodes whose accepted prefixes, or decisions, differ in `new`;
    /// each list sorted.
    pub fn changes(&self, new: &RouteTable) -> RouteChanges {
        let mut accepted: Vec<PublicKey> = self
            .accepted
            .keys()
            .chain(new.accepted.keys())
            .filter(|k| self.accepted.get(k) != new.accepted.get(k))
            .copied()
            .collect();
        accepted.sort_unstable();
        accepted.dedup();
        let mut decisions: Vec<PublicKey> = self
            .decisions
            .keys()
            .chain(new.decisions.keys())
            .filter(|k| self.decisions.get(k) != new.decisions.get(k))
            .copied()
            .collect();
        decisions.sort_unstable();
        decisions.dedup();
        RouteChanges {
            accepted,
            decisions,
        }
    }
}

/// A prefix of another node than `key` in `held` that overlaps `prefix`:
/// one containing it (at most one lookup per shorter length) or one inside
/// it (a range of network addresses).
fn holder_overlapping(
    held: &BTreeMap<Slot, (PublicKey, IpNet)>,
    prefix: &IpNet,
    key: &PublicKey,
) -> Option<(PublicKey, IpNet)> {
    let (v6, _, len) = slot(prefix);
    let other = |(holder, net): &(PublicKey, IpNet)| (holder != key).then_some((*holder, *net));
    let containing = (0..=len).find_map(|shorter| {
        let net = IpNet::new(prefix.network(), shorter).ok()?.trunc();
        held.get(&slot(&net)).and_then(other)
    });
    containing.or_else(|| {
        let (_, first, _) = slot(prefix);
        held.range((v6, first, 0)..=(v6, last_address(prefix), u8::MAX))
            .find_map(|(_, held)| other(held))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::rendezvous::registry::AdvertisedRoute;
    use crate::wire::control::NatMapping;

    fn key(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn mesh() -> MeshInfo {
        MeshInfo {
            id: "m".into(),
            ipv4: "100.64.0.0/16".parse().unwrap(),
            ipv6: "fd00:6d65::/64".parse().unwrap(),
        }
    }

    fn node(name: &str, routes: &[(&str, u64)], approved: &[&str]) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            ipv4: Ipv4Addr::new(100, 64, 0, 1),
            ipv6: Ipv6Addr::LOCALHOST,
            joined_at: 0,
            last_seen: 0,
            candidates: Vec::new(),
            nat: NatMapping::Unknown,
            routes: routes
                .iter()
                .map(|(p, since)| AdvertisedRoute {
                    prefix: net(p),
                    since: *since,
                })
                .collect(),
            approved_routes: approved.iter().map(|p| net(p)).collect(),
        }
    }

    fn status(table: &RouteTable, k: u8, prefix: &str) -> RouteStatus {
        table
            .decisions(&key(k))
            .iter()
            .find(|d| d.prefix == net(prefix))
            .unwrap()
            .status
            .clone()
    }

    fn pods() -> Vec<IpNet> {
        vec![net("10.244.0.0/16"), net("fd10:244::/56")]
    }

    #[test]
    fn a_prefix_inside_a_routable_range_is_accepted() {
        let nodes = BTreeMap::from([
            (
                key(1),
                node("a", &[("10.244.1.0/24", 5), ("fd10:244:0:1::/64", 5)], &[]),
            ),
            (key(2), node("b", &[("10.244.2.0/24", 5)], &[])),
        ]);
        let table = RouteTable::decide(&nodes, &mesh(), &pods());
        assert_eq!(
            table.accepted(&key(1)),
            [net("10.244.1.0/24"), net("fd10:244:0:1::/64")]
        );
        assert_eq!(table.accepted(&key(2)), [net("10.244.2.0/24")]);
        assert!(table.accepted(&key(3)).is_empty());
    }

    #[test]
    fn outside_the_routable_ranges_a_prefix_waits_for_approval() {
        let nodes = BTreeMap::from([
            (key(1), node("a", &[("192.168.7.0/24", 1)], &[])),
            (
                key(2),
                node("b", &[("192.168.8.0/24", 1)], &["192.168.8.0/24"]),
            ),
            // Approval is for the prefix as advertised, not a part of it.
            (
                key(3),
                node("c", &[("192.168.9.0/25", 1)], &["192.168.9.0/24"]),
            ),
        ]);
        let table = RouteTable::decide(&nodes, &mesh(), &pods());
        assert_eq!(
            status(&table, 1, "192.168.7.0/24"),
            RouteStatus::AwaitingApproval
        );
        assert_eq!(status(&table, 2, "192.168.8.0/24"), RouteStatus::Accepted);
        assert_eq!(
            status(&table, 3, "192.168.9.0/25"),
            RouteStatus::AwaitingApproval
        );
        // No routable range at all: everything waits.
        let table = RouteTable::decide(&nodes, &mesh(), &[]);
        assert_eq!(table.accepted(&key(2)), [net("192.168.8.0/24")]);
        assert!(table.accepted(&key(1)).is_empty());
    }

    #[test]
    fn of_two_overlapping_prefixes_the_older_one_is_routed() {
        let nodes = BTreeMap::from([
            (key(1), node("late", &[("10.244.0.0/20", 9)], &[])),
            (key(2), node("early", &[("10.244.3.0/24", 4)], &[])),
            (key(3), node("same", &[("10.244.3.0/24", 4)], &[])),
            (
                key(4),
                node(
                    "inside",
                    &[("10.244.64.0/18", 2), ("10.244.64.0/24", 3)],
                    &[],
                ),
            ),
        ]);
        let table = RouteTable::decide(&nodes, &mesh(), &pods());
        assert_eq!(status(&table, 2, "10.244.3.0/24"), RouteStatus::Accepted);
        // The same second: the lower key wins, the other says who holds it.
        assert_eq!(
            status(&table, 3, "10.244.3.0/24"),
            RouteStatus::Overlaps {
                node: "early".into(),
                held: net("10.244.3.0/24")
            }
        );
        // A later, larger prefix containing an accepted one.
        assert_eq!(
            status(&table, 1, "10.244.0.0/20"),
            RouteStatus::Overlaps {
                node: "early".into(),
                held: net("10.244.3.0/24")
            }
        );
        // A node's own prefixes may overlap each other.
        assert_eq!(table.accepted(&key(4)).len(), 2);
    }

    #[test]
    fn invalid_and_mesh_overlapping_prefixes_are_refused_whatever_is_approved() {
        let bad = [
            "10.244.1.1/24",
            "0.0.0.0/0",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "224.0.0.0/4",
            "0.0.0.0/1",
            "::/0",
            "fe80::/64",
            "ff02::/16",
        ];
        let routes: Vec<(&str, u64)> = bad.iter().map(|p| (*p, 1)).collect();
        let mesh_routes = [
            ("100.64.0.0/24", 1),
            ("100.0.0.0/8", 1),
            ("fd00:6d65::/80", 1),
        ];
        let nodes = BTreeMap::from([
            (key(1), node("a", &routes, &bad)),
            (
                key(2),
                node("b", &mesh_routes, &["100.64.0.0/24", "100.0.0.0/8"]),
            ),
        ]);
        let table = RouteTable::decide(&nodes, &mesh(), &[net("0.0.0.0/0"), net("::/0")]);
        for prefix in bad {
            assert_eq!(status(&table, 1, prefix), RouteStatus::Invalid, "{prefix}");
        }
        for (prefix, _) in mesh_routes {
            assert_eq!(
                status(&table, 2, prefix),
                RouteStatus::OverlapsMesh,
                "{prefix}"
            );
        }
        assert!(table.accepted(&key(1)).is_empty() && table.accepted(&key(2)).is_empty());
    }

    #[test]
    fn changes_name_who_must_hear_of_what() {
        let mut nodes = BTreeMap::from([
            (key(1), node("a", &[("10.244.3.0/24", 1)], &[])),
            (key(2), node("b", &[("10.244.3.0/24", 2)], &[])),
            (key(3), node("c", &[("10.244.9.0/24", 1)], &[])),
        ]);
        let before = RouteTable::decide(&nodes, &mesh(), &pods());
        assert_eq!(before.changes(&before), RouteChanges::default());
        // a withdraws: b's waiting prefix is routed now; c is untouched.
        nodes.get_mut(&key(1)).unwrap().routes.clear();
        let after = RouteTable::decide(&nodes, &mesh(), &pods());
        assert_eq!(
            before.changes(&after),
            RouteChanges {
                accepted: vec![key(1), key(2)],
                decisions: vec![key(1), key(2)],
            }
        );
        assert_eq!(after.accepted(&key(2)), [net("10.244.3.0/24")]);
    }

    #[test]
    fn many_nodes_decide_in_one_pass() {
        // 5000 nodes with one /24 each and every tenth overlapping its
        // neighbour: a quadratic check would take seconds here.
        let nodes: BTreeMap<PublicKey, NodeRecord> = (0..5000u32)
            .map(|i| {
                let mut bytes = [0u8; 32];
                bytes[..4].copy_from_slice(&i.to_be_bytes());
                let third = if i % 10 == 9 { i - 1 } else { i };
                let prefix = format!("10.{}.{}.0/24", 100 + third / 256, third % 256);
                let record = node(&format!("n{i}"), &[(prefix.as_str(), u64::from(i))], &[]);
                (PublicKey::from_bytes(bytes), record)
            })
            .collect();
        let table = RouteTable::decide(&nodes, &mesh(), &[net("10.0.0.0/8")]);
        let accepted = nodes
            .keys()
            .filter(|k| !table.accepted(k).is_empty())
            .count();
        assert_eq!(accepted, 4500);
    }
}
