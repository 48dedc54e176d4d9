#![cfg(not(feature = "sim"))]
//! Port mapping in the NAT lab: the lab's `upnp` node sits behind a router
//! whose NAT is otherwise symmetric (a new port per destination) and which
//! runs the real miniupnpd from Debian (NAT-PMP, PCP, UPnP IGD). meshd maps
//! its port there, announces the mapped address, and peers reach it
//! directly through the mapping; the mapping is renewed, removed when meshd
//! exits, and when miniupnpd stops and the mapping expires the pair that
//! needed it goes back to the relay. Needs root, and miniupnpd-iptables,
//! miniupnpc and conntrack (tests/run.sh installs them).
//!
//! Every test builds its own lab with tests/common's [`MeshLab`] under the
//! prefix `mlp`; the lab is removed when the test ends, failed or not.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::lab::{eventually, MeshLab, SETTLE_DEADLINE};
use common::portmap::{
    leases, start_miniupnpd, stop_miniupnpd, upnp_router, upnpc_list, StunResponder, MAX_LIFETIME_S,
};
use common::topology::topology;

/// The prefix of this file's namespaces.
const PREFIX: &str = "mlp";

/// A lab of `nodes` whose upnp router runs miniupnpd (and the internet
/// the STUN responder its check needs) before any meshd starts.
fn lab_with_miniupnpd(nodes: &[&'static str]) -> (MeshLab, StunResponder) {
    MeshLab::with_mesh_of_prepared(PREFIX, nodes, |lab| {
        let stun = StunResponder::start(&lab.ns("inet"), topology().gateway);
        start_miniupnpd(lab, topology().gateway);
        stun
    })
}

/// The address `node`'s gateway mapped for it, once meshd says so.
fn wait_for_mapping(lab: &MeshLab, node: &str) -> (SocketAddr, String) {
    eventually(
        &format!("{node}'s gateway maps its port"),
        SETTLE_DEADLINE,
        || {
            let status = lab.meshctl(node, "status")?;
            let pm = &status["port_mapping"];
            match (pm["external"].as_str(), pm["protocol"].as_str()) {
                (Some(external), Some(protocol)) => Ok((
                    external.parse::<SocketAddr>().map_err(|e| e.to_string())?,
                    protocol.to_owned(),
                )),
                _ => Err(format!("port_mapping: {pm}")),
            }
        },
    )
}

/// The candidates `from` has for `to`, as (endpoint, source).
fn candidates_of(lab: &MeshLab, from: &str, to: &str) -> Vec<(String, String)> {
    let peers = lab.meshctl(from, "peers").unwrap();
    let name = format!("node-{to}");
    peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name.as_str())
        .map(|p| {
            p["candidates"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    (
                        c["endpoint"].as_str().unwrap_or("").to_owned(),
                        c["source"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_node_behind_miniupnpd_goes_direct_through_its_mapping_renews_it_and_removes_it_on_exit() {
    let started = Instant::now();
    let (lab, stun) = lab_with_miniupnpd(&["pub1", "nat11", "sym1", "upnp"]);
    let (router, node) = upnp_router();
    let wan = topology().routers[router].wan;

    let (external, protocol) = wait_for_mapping(&lab, node);
    println!(
        "mapped {external} through {protocol} {:.1?} after the lab was up (STUN answers: {})",
        started.elapsed(),
        stun.answered()
    );
    assert_eq!(external.ip(), wan, "the router's public address");
    assert_eq!(
        protocol, "pcp",
        "PCP is preferred when the router answers it"
    );
    let netcheck = lab.meshctl(node, "netcheck").unwrap();
    let answered = &netcheck["port_mapping"]["answered"];
    println!("netcheck on {node}: the gateway answered {answered}");
    for p in ["pcp", "nat_pmp", "upnp"] {
        assert!(
            answered.as_array().unwrap().iter().any(|a| a == p),
            "miniupnpd answers {p}: {netcheck}"
        );
    }

    // miniupnpd lists the mapping, over UPnP and in its lease file.
    let internal = SocketAddr::from((topology().node(node).address, 51820));
    let lease = eventually(
        "miniupnpd's lease file lists the mapping",
        SETTLE_DEADLINE,
        || {
            leases(&lab)
                .into_iter()
                .find(|l| l.internal == internal && l.protocol == "UDP")
                .ok_or_else(|| format!("leases: {:?}", leases(&lab)))
        },
    );
    assert_eq!(lease.external_port, external.port());
    let listed = upnpc_list(&lab, node);
    println!("upnpc -l: {listed:?}; lease {lease:?}");
    assert!(
        listed.contains(&format!("UDP {}->{internal}", external.port())),
        "upnpc -l lists {internal}: {listed:?}"
    );

    // Peers reach it through the mapping: they know the address as mapped,
    // and the public and 1:1-NAT nodes talk to it there.
    for peer in ["pub1", "nat11"] {
        let t = Instant::now();
        lab.wait_for_paths(peer, node, "direct");
        let (_, endpoint) = lab.path(peer, node).unwrap();
        println!(
            "{peer} <-> {node} direct {:.1?} later, {peer} sends to {endpoint:?}",
            t.elapsed()
        );
        assert_eq!(endpoint, Some(external.to_string()), "through the mapping");
        assert!(
            candidates_of(&lab, peer, node).contains(&(external.to_string(), "mapped".into())),
            "{peer} lists the mapped candidate: {:?}",
            candidates_of(&lab, peer, node)
        );
    }
    lab.wait_for_reach(node, "sym1");
    // A symmetric peer may go either way; say which.
    println!("sym1 -> {node}: {:?}", lab.path("sym1", node));

    // Renewed before its lease ends: the lease's end moves on.
    let t = Instant::now();
    let renewed = eventually(
        "meshd renews the mapping before it ends",
        Duration::from_secs(MAX_LIFETIME_S * 2),
        || {
            let now = leases(&lab)
                .into_iter()
                .find(|l| l.internal == internal)
                .ok_or("the lease is gone")?;
            if now.expires > lease.expires {
                Ok(now)
            } else {
                Err(format!("lease ends at {} still", now.expires))
            }
        },
    );
    println!(
        "renewed {:.1?} later: the lease's end moved {} s on",
        t.elapsed(),
        renewed.expires - lease.expires
    );
    assert_eq!(wait_for_mapping(&lab, node).0, external, "the same mapping");

    // meshd's exit removes it from the router.
    let t = Instant::now();
    lab.stop(node);
    eventually(
        "the mapping is gone from the router",
        Duration::from_secs(10),
        || {
            let rules = lab.run_in(router, &["iptables-legacy-save", "-t", "nat"]);
            match leases(&lab).iter().any(|l| l.internal == internal)
                || rules.contains(&internal.ip().to_string())
            {
                true => Err(format!("leases {:?}, rules:\n{rules}", leases(&lab))),
                false => Ok(()),
            }
        },
    );
    println!("removed {:.1?} after meshd was told to stop", t.elapsed());
    assert!(upnpc_list(&lab, node).is_empty(), "upnpc -l lists nothing");
}

#[test]
fn when_miniupnpd_stops_and_the_mapping_expires_the_pair_goes_back_to_the_relay() {
    let (lab, _stun) = lab_with_miniupnpd(&["sym1", "upnp"]);
    let (_, node) = upnp_router();
    let (external, _) = wait_for_mapping(&lab, node);
    lab.wait_for_reach(node, "sym1");
    let t = Instant::now();
    lab.wait_for_paths("sym1", node, "direct");
    println!(
        "sym1 <-> {node} direct through {external} {:.1?} after the mapping",
        t.elapsed()
    );

    let stopped = Instant::now();
    stop_miniupnpd(&lab);
    eventually(
        "the mapping expires on the node",
        Duration::from_secs(MAX_LIFETIME_S * 2),
        || {
            let status = lab.meshctl(node, "status")?;
            match status["port_mapping"]["external"].as_str() {
                None => Ok(()),
                Some(e) => Err(format!("still mapped at {e}")),
            }
        },
    );
    let expired = stopped.elapsed();
    lab.wait_for_paths("sym1", node, "relay");
    println!(
        "miniupnpd stopped: the mapping expired {expired:.1?} later, the pair relayed {:.1?} later",
        stopped.elapsed()
    );
    let why = lab.meshctl(node, "status").unwrap()["port_mapping"]["error"].clone();
    println!("{node} says: {why}");
    eventually("sym1 forgets the mapped candidate", SETTLE_DEADLINE, || {
        let c = candidates_of(&lab, "sym1", node);
        match c.iter().any(|(_, source)| source == "mapped") {
            true => Err(format!("{c:?}")),
            false => Ok(()),
        }
    });
    let peers = lab.meshctl(node, "peers").unwrap();
    let reason = peers[0]["relay_reason"].as_str().unwrap_or("").to_owned();
    println!("relay reason on {node}: {reason}");
    assert!(reason.contains("NAT-PMP, PCP or UPnP IGD"), "{reason}");
}
