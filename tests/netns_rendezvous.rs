#![cfg(not(feature = "sim"))]
//! The rendezvous flow with the real binaries on a lab of network
//! namespaces: `mesh-rendezvous` on one machine of a shared subnet, and
//! three meshd nodes given nothing but the `meshd join` line it printed.
//! They get their addresses and each other from the rendezvous, keep both
//! across restarts of either side, and keep their tunnels while the
//! rendezvous is down. Needs root and `iputils-ping`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{eventually, Lab, MeshNode, OverlayIps, Rendezvous, DEADLINE, MB, RECONNECT_DEADLINE};

/// Machine 0 runs the rendezvous; the others are mesh nodes.
const RENDEZVOUS: usize = 0;
const NODES: [usize; 3] = [1, 2, 3];

/// How long a node may take to notice that the rendezvous is gone: at once
/// when the server's close arrives, at QUIC's 30 s idle timeout otherwise.
const NOTICE_DEADLINE: Duration = Duration::from_secs(45);

fn lab() -> Lab {
    Lab::new(1 + NODES.len())
}

/// A running rendezvous, and the nodes enrolled with one join line for
/// exactly that many nodes, each running and holding its address.
fn mesh(lab: &Lab) -> (Rendezvous<'_>, Vec<MeshNode<'_>>) {
    let rendezvous = lab.start_rendezvous(RENDEZVOUS);
    let join = rendezvous.create_token(NODES.len());
    let nodes = NODES
        .iter()
        .map(|&i| lab.join_and_start(i, &join))
        .collect();
    (rendezvous, nodes)
}

/// Every node pings every other node's overlay IPv4 and IPv6 address,
/// each until a reply comes: tunnels may still be coming up.
fn every_node_pings_every_other(nodes: &[MeshNode<'_>]) {
    let ips: Vec<OverlayIps> = nodes.iter().map(MeshNode::overlay_ips).collect();
    for (i, from) in nodes.iter().enumerate() {
        for (j, to) in ips.iter().enumerate() {
            if i != j {
                from.pings(to.v4);
                from.pings(to.v6);
            }
        }
    }
}

/// Every node pings every other node's overlay addresses once, and every
/// ping must be answered: for tunnels that are up and must stay up.
fn every_ping_between_nodes_is_answered(nodes: &[MeshNode<'_>], ips: &[OverlayIps], when: &str) {
    for (i, from) in nodes.iter().enumerate() {
        for (j, to) in ips.iter().enumerate() {
            if i != j {
                for result in [from.ping_once(to.v4), from.ping_once(to.v6)] {
                    result.unwrap_or_else(|e| {
                        panic!("{when}, a ping between nodes went unanswered: {e}")
                    });
                }
            }
        }
    }
}

#[test]
fn three_nodes_join_with_only_the_join_line_ping_each_other_and_carry_tcp_over_both_families() {
    let lab = lab();
    let (_rendezvous, nodes) = mesh(&lab);

    for node in &nodes {
        let config = node.config();
        assert!(
            config.contains("[rendezvous]") && !config.contains("[[peer]]"),
            "{} knows the rendezvous and no static peer:\n{config}",
            node.name
        );
    }
    let ips: Vec<OverlayIps> = nodes.iter().map(MeshNode::overlay_ips).collect();
    for (i, a) in ips.iter().enumerate() {
        for b in &ips[i + 1..] {
            assert!(
                a.v4 != b.v4 && a.v6 != b.v6,
                "every node has its own overlay addresses: {ips:?}"
            );
        }
    }
    every_node_pings_every_other(&nodes);
    // Bulk TCP over both families arrives intact: the sender splits the
    // kernel's TSO super-packets of each family, the receiver coalesces
    // them back into GSO_TCPV4 and GSO_TCPV6 super-packets for its kernel.
    for (address, seed) in [
        (IpAddr::V4(ips[1].v4), 0x7634),
        (IpAddr::V6(ips[1].v6), 0x7636),
    ] {
        common::assert_tcp_transfer_to(nodes[0].machine, nodes[1].machine, address, 20 * MB, seed);
    }
}

#[test]
fn restarting_the_rendezvous_keeps_addresses_and_traffic_flows_throughout() {
    let lab = lab();
    let (mut rendezvous, nodes) = mesh(&lab);
    every_node_pings_every_other(&nodes);
    let ips: Vec<OverlayIps> = nodes.iter().map(MeshNode::overlay_ips).collect();

    rendezvous.stop();
    every_ping_between_nodes_is_answered(&nodes, &ips, "while the rendezvous is down");
    rendezvous.start();
    eventually(
        "every node is online at the restarted rendezvous",
        RECONNECT_DEADLINE,
        || {
            every_ping_between_nodes_is_answered(&nodes, &ips, "while the nodes reconnect");
            rendezvous.all_online(&nodes)
        },
    );
    every_ping_between_nodes_is_answered(&nodes, &ips, "after the nodes reconnected");

    let listed = rendezvous.nodes();
    for (node, before) in nodes.iter().zip(&ips) {
        assert_eq!(
            node.overlay_ips(),
            *before,
            "meshctl status of {} shows the addresses it had before the restart",
            node.name
        );
        let key = node.public_key();
        let entry = listed
            .iter()
            .find(|n| n["public_key"] == key.as_str())
            .unwrap_or_else(|| panic!("nodes list shows {}: {listed:#?}", node.name));
        assert!(
            entry["ipv4"] == before.v4.to_string().as_str()
                && entry["ipv6"] == before.v6.to_string().as_str(),
            "the restarted rendezvous lists {} with the addresses it had: {entry:#}",
            node.name
        );
    }
}

#[test]
fn restarting_a_node_keeps_its_address() {
    let lab = lab();
    let (_rendezvous, mut nodes) = mesh(&lab);
    every_node_pings_every_other(&nodes);
    let before = nodes[0].overlay_ips();

    nodes[0].restart();

    assert_eq!(
        nodes[0].overlay_ips(),
        before,
        "{} has the same overlay addresses after a restart",
        nodes[0].name
    );
    every_node_pings_every_other(&nodes);
}

#[test]
fn a_node_restarts_with_its_cached_address_while_the_rendezvous_is_down() {
    let lab = lab();
    let (mut rendezvous, mut nodes) = mesh(&lab);
    every_node_pings_every_other(&nodes);
    let before = nodes[0].overlay_ips();

    rendezvous.stop();
    nodes[0].restart();

    assert_eq!(
        nodes[0].overlay_ips(),
        before,
        "{} comes up with its cached overlay addresses while the rendezvous is down",
        nodes[0].name
    );
    every_node_pings_every_other(&nodes);
}

#[test]
fn stopping_the_rendezvous_leaves_existing_tunnels_passing_traffic() {
    let lab = lab();
    let (mut rendezvous, nodes) = mesh(&lab);
    every_node_pings_every_other(&nodes);
    let ips: Vec<OverlayIps> = nodes.iter().map(MeshNode::overlay_ips).collect();

    rendezvous.stop();
    every_ping_between_nodes_is_answered(&nodes, &ips, "right after the rendezvous stopped");
    for node in &nodes {
        eventually(
            &format!("{} notices that the rendezvous is gone", node.name),
            NOTICE_DEADLINE,
            || {
                if node.log().contains("rendezvous unreachable") {
                    Ok(())
                } else {
                    Err("its log does not say \"rendezvous unreachable\" yet".into())
                }
            },
        );
    }

    every_ping_between_nodes_is_answered(
        &nodes,
        &ips,
        "once every node noticed the rendezvous is gone",
    );
    common::assert_tcp_transfer_to(
        nodes[0].machine,
        nodes[1].machine,
        ips[1].v4,
        MB,
        0x7264_7a76,
    );
}

#[test]
fn a_removed_node_disappears_from_every_peer_map() {
    let lab = lab();
    let (rendezvous, nodes) = mesh(&lab);
    every_node_pings_every_other(&nodes);
    let (removed, others) = nodes.split_last().expect("a mesh has nodes");
    let (key, ips) = (removed.public_key(), removed.overlay_ips());

    rendezvous.remove_node(&removed.name);

    for node in others {
        eventually(
            &format!("{} drops {} from its peer map", node.name, removed.name),
            DEADLINE,
            || {
                let keys = node.try_peer_keys()?;
                if keys.contains(&key) {
                    Err(format!("meshctl peers still lists {key}: {keys:?}"))
                } else {
                    Ok(())
                }
            },
        );
        for ip in [IpAddr::V4(ips.v4), IpAddr::V6(ips.v6)] {
            assert!(
                node.ping_once(ip).is_err(),
                "{} gets no ping reply from the removed {} at {ip}",
                node.name,
                removed.name
            );
        }
        let theirs = node.overlay_ips();
        assert!(
            removed.ping_once(theirs.v4).is_err(),
            "the removed {} no longer reaches {}",
            removed.name,
            node.name
        );
    }
    let listed = rendezvous.nodes();
    assert!(
        listed.iter().all(|n| n["public_key"] != key.as_str()),
        "nodes list no longer lists {}: {listed:#?}",
        removed.name
    );
    every_node_pings_every_other(others);
}

#[test]
fn a_rebuilt_machine_joining_with_a_token_for_its_node_gets_its_name_and_addresses_back() {
    let lab = lab();
    let (rendezvous, mut nodes) = mesh(&lab);
    let before = nodes[0].overlay_ips();
    let (name, old_key) = (nodes[0].name.clone(), nodes[0].public_key());
    // The machine is rebuilt: its meshd and its state (its key) are gone.
    nodes[0].stop();
    std::fs::remove_dir_all(&nodes[0].state_dir).expect("wipe the node's state");

    let line = rendezvous.create_token_for(&name);
    let rebuilt = lab.join_and_start(NODES[0], &line);
    assert_ne!(rebuilt.public_key(), old_key, "a new key");
    assert_eq!(rebuilt.overlay_ips(), before, "the node's addresses, kept");
    for other in &nodes[1..] {
        other.pings(before.v4);
        rebuilt.pings(other.overlay_ips().v4);
    }
    let listed = rendezvous.nodes();
    assert!(
        !listed.iter().any(|n| n["public_key"] == old_key.as_str()),
        "the old key is no longer a node: {listed:?}"
    );
    assert!(
        listed
            .iter()
            .any(|n| n["public_key"] == rebuilt.public_key().as_str() && n["name"] == name.as_str()),
        "the new key holds the name: {listed:?}"
    );
}
