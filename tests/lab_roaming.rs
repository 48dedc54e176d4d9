#![cfg(not(feature = "sim"))]
//! Networks that change under a running mesh, in the NAT lab of
//! `deploy/lab` (routers that drop unsolicited inbound on their WAN side,
//! as real ones do): a cone router gets a new public address and forgets
//! its NAT table, as after a DHCP or PPPoE renewal. Its node's pairs reach
//! each other again through the relay within seconds and a pair that was
//! direct goes direct again by itself, to the new address; a pair with a
//! symmetric NAT stays relayed and keeps working. A node's LAN address
//! changes, DHCP-style: its neighbour reaches it directly at the new one.
//! And a node moves from behind its NAT onto a public address: every peer
//! reaches it directly there, a symmetric NAT's too. A node left without
//! a route for a moment (every send refused: "Network is unreachable")
//! keeps its session with the rendezvous. Needs root.
//!
//! Each test builds its own lab (tests/common's [`MeshLab`], prefix `mlr`),
//! prints what it measured, and removes the lab when it ends, failed or not.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::lab::{eventually, MeshLab};
use common::topology::topology;

/// The prefix of this file's labs.
const PREFIX: &str = "mlr";

/// How soon a moved node's pairs reach each other again (the relay).
const REACH_AGAIN: Duration = Duration::from_secs(10);
/// How soon a pair that was direct is direct again.
const DIRECT_AGAIN: Duration = Duration::from_secs(30);

/// Gives `router` (on the internet) the public address `new` instead of
/// its own and flushes its NAT table, as a renewed lease does.
fn renumber(lab: &MeshLab, router: &str, new: Ipv4Addr) {
    let lab_net = topology().internet;
    let old = topology().router(router).wan;
    let prefix = lab_net.prefix_len();
    lab.run_in(
        router,
        &[
            "ip",
            "addr",
            "del",
            &format!("{old}/{prefix}"),
            "dev",
            "wan",
        ],
    );
    lab.run_in(
        router,
        &[
            "ip",
            "addr",
            "add",
            &format!("{new}/{prefix}"),
            "dev",
            "wan",
        ],
    );
    let gateway = topology().gateway.to_string();
    default_via(lab, router, &gateway);
    lab.run_in(router, &["conntrack", "-F"]);
}

/// `machine`'s default route via `gateway`.
fn default_via(lab: &MeshLab, machine: &str, gateway: &str) {
    lab.run_in(
        machine,
        &["ip", "route", "replace", "default", "via", gateway],
    );
}

/// `node` and each of `peers` ping each other again within
/// [`REACH_AGAIN`] of `changed`; how long it took is printed.
fn reach_again(lab: &MeshLab, node: &str, peers: &[&str], changed: Instant) {
    for peer in peers {
        eventually(
            &format!("{node} and {peer} reach each other again"),
            REACH_AGAIN,
            || {
                lab.ping_once(node, peer, &[])?;
                lab.ping_once(peer, node, &[])
            },
        );
        println!("{node} <-> {peer} back after {:?}", changed.elapsed());
    }
}

/// The IP of the endpoint `from` has a direct path to `to` on.
fn direct_ip(lab: &MeshLab, from: &str, to: &str) -> Result<IpAddr, String> {
    match lab.path(from, to)? {
        (path, Some(endpoint)) if path == "direct" => endpoint
            .parse::<SocketAddr>()
            .map(|e| e.ip())
            .map_err(|e| format!("{endpoint}: {e}")),
        (path, endpoint) => Err(format!("{from} -> {to}: {path} via {endpoint:?}")),
    }
}

#[test]
fn a_router_with_a_new_public_address_has_its_pairs_back_in_seconds_and_direct_again() {
    let lab = MeshLab::with_mesh_of(PREFIX, &["cone", "cone2", "sym1"]);
    lab.wait_for_reach("cone", "cone2");
    lab.wait_for_paths("cone", "cone2", "direct");
    lab.wait_for_reach("cone", "sym1");
    lab.wait_for_paths("cone", "sym1", "relay");
    let old = topology().router("r-cone").wan;
    assert_eq!(direct_ip(&lab, "cone2", "cone"), Ok(IpAddr::V4(old)));

    // A free public address of the lab's internet.
    let new = Ipv4Addr::new(203, 0, 113, 130);
    assert!(topology().internet.contains(&new));
    renumber(&lab, "r-cone", new);
    let changed = Instant::now();

    reach_again(&lab, "cone", &["cone2", "sym1"], changed);
    eventually(
        "cone and cone2 direct again, cone2 to cone's new address",
        DIRECT_AGAIN,
        || {
            let seen = direct_ip(&lab, "cone2", "cone")?;
            direct_ip(&lab, "cone", "cone2")?;
            if seen == IpAddr::V4(new) {
                Ok(())
            } else {
                Err(format!("cone2 reaches cone at {seen}, not {new}"))
            }
        },
    );
    println!("cone <-> cone2 direct again after {:?}", changed.elapsed());
    // cone2's `meshctl peers` says that cone moved, and how long ago.
    let seen = lab.peer("cone2", "cone").unwrap();
    let ago = seen["addresses_changed_s"].as_u64();
    assert!(
        ago.is_some_and(|s| s <= changed.elapsed().as_secs() + 1),
        "{seen}"
    );
    // The symmetric pair went on through the relay.
    assert_eq!(
        lab.path("cone", "sym1").map(|p| p.0),
        Ok("relay".to_owned())
    );
    lab.ping_once("sym1", "cone", &[]).unwrap();
}

#[test]
fn a_node_with_a_new_lan_address_is_reached_there_directly_by_its_neighbour() {
    let lab = MeshLab::with_mesh_of(PREFIX, &["lan1", "lan2", "cone"]);
    let subnet = topology().private_subnet_of(topology().node("lan2"));
    lab.wait_for_reach("lan1", "lan2");
    lab.wait_for_paths("lan1", "lan2", "direct");
    lab.wait_for_reach("lan2", "cone");
    let old = topology().node("lan2").address;
    assert_eq!(direct_ip(&lab, "lan1", "lan2"), Ok(IpAddr::V4(old)));

    // A new lease, DHCP-style: the old address goes, a new one comes.
    let new = Ipv4Addr::from(u32::from(old) + 100);
    assert!(subnet.contains(&new));
    let prefix = subnet.prefix_len();
    lab.run_in(
        "lan2",
        &[
            "ip",
            "addr",
            "del",
            &format!("{old}/{prefix}"),
            "dev",
            "eth0",
        ],
    );
    lab.run_in(
        "lan2",
        &[
            "ip",
            "addr",
            "add",
            &format!("{new}/{prefix}"),
            "dev",
            "eth0",
        ],
    );
    let gateway = topology().router("r-lan").lan.to_string();
    default_via(&lab, "lan2", &gateway);
    let changed = Instant::now();

    reach_again(&lab, "lan2", &["lan1", "cone"], changed);
    eventually(
        "lan1 reaches lan2 directly at its new address",
        DIRECT_AGAIN,
        || match direct_ip(&lab, "lan1", "lan2")? {
            seen if seen == IpAddr::V4(new) => Ok(()),
            seen => Err(format!("lan1 reaches lan2 at {seen}, not {new}")),
        },
    );
    println!("lan1 -> lan2 direct at {new} after {:?}", changed.elapsed());
}

#[test]
fn a_symmetric_nat_with_a_new_public_address_keeps_its_pair_on_the_relay() {
    let lab = MeshLab::with_mesh_of(PREFIX, &["sym1", "sym2"]);
    lab.wait_for_reach("sym1", "sym2");
    lab.wait_for_paths("sym1", "sym2", "relay");

    renumber(&lab, "r-sym1", Ipv4Addr::new(203, 0, 113, 141));
    let changed = Instant::now();
    reach_again(&lab, "sym1", &["sym2"], changed);
    assert_eq!(
        lab.path("sym1", "sym2").map(|p| p.0),
        Ok("relay".to_owned())
    );
    assert_eq!(
        lab.path("sym2", "sym1").map(|p| p.0),
        Ok("relay".to_owned())
    );
}

#[test]
fn a_node_moved_from_behind_a_nat_to_a_public_address_is_reached_there_and_directly() {
    let lab = MeshLab::with_mesh_of(PREFIX, &["cone", "cone2", "sym1"]);
    lab.wait_for_reach("cone", "cone2");
    lab.wait_for_paths("cone", "cone2", "direct");
    lab.wait_for_reach("cone", "sym1");
    lab.wait_for_paths("cone", "sym1", "relay");

    // The machine is moved onto the internet (a VM given a public address
    // on its NIC, a laptop plugged into a public network): a new link with
    // a public address and the default route, and its LAN link gone.
    let public = Ipv4Addr::new(203, 0, 113, 131);
    let internet = topology().internet;
    assert!(internet.contains(&public));
    let cone = lab.ns("cone");
    // Made inside the internet's namespace, its other end straight in the
    // node's: neither end is ever in the host's namespace.
    lab.run_in(
        "inet",
        &[
            "ip", "link", "add", "mv-cone", "type", "veth", "peer", "name", "pub0", "netns", &cone,
        ],
    );
    lab.run_in("inet", &["ip", "link", "set", "mv-cone", "master", "br0"]);
    lab.run_in("inet", &["ip", "link", "set", "mv-cone", "up"]);
    lab.run_in(
        "cone",
        &["sysctl", "-qw", "net.ipv6.conf.pub0.disable_ipv6=1"],
    );
    lab.run_in("cone", &["ip", "link", "set", "eth0", "down"]);
    lab.run_in(
        "cone",
        &[
            "ip",
            "addr",
            "add",
            &format!("{public}/{}", internet.prefix_len()),
            "dev",
            "pub0",
        ],
    );
    lab.run_in("cone", &["ip", "link", "set", "pub0", "up"]);
    let gateway = topology().gateway.to_string();
    default_via(&lab, "cone", &gateway);
    let changed = Instant::now();

    reach_again(&lab, "cone", &["cone2", "sym1"], changed);
    // Every peer reaches a public node directly: the pair that was direct
    // is direct again, at the public address, and the symmetric NAT's
    // pair, relayed while cone was behind a NAT too, goes direct.
    for peer in ["cone2", "sym1"] {
        eventually(
            &format!("{peer} reaches cone directly at {public}"),
            DIRECT_AGAIN,
            || match direct_ip(&lab, peer, "cone")? {
                seen if seen == IpAddr::V4(public) => direct_ip(&lab, "cone", peer).map(|_| ()),
                seen => Err(format!("{peer} reaches cone at {seen}, not {public}")),
            },
        );
        println!(
            "cone <-> {peer} direct at {public} after {:?}",
            changed.elapsed()
        );
    }
}

#[test]
fn a_node_without_a_route_for_a_moment_keeps_its_session_with_the_rendezvous() {
    let lab = MeshLab::with_mesh_of(PREFIX, &["cone", "sym1"]);
    lab.wait_for_reach("cone", "sym1");
    lab.wait_for_paths("cone", "sym1", "relay");

    // Its link drops and comes back (Wi-Fi, a cable, a VM's NIC re-plugged):
    // for two seconds the node has no route, and every send it makes, the
    // relayed pings' and the QUIC keepalives', is refused by its kernel.
    let route = lab.run_in("cone", &["ip", "-4", "route", "show", "default"]);
    let gateway = route
        .split_whitespace()
        .skip_while(|w| *w != "via")
        .nth(1)
        .unwrap_or_else(|| panic!("cone has no default gateway: {route}"))
        .to_owned();
    lab.run_in("cone", &["ip", "route", "del", "default"]);
    let gone = Instant::now();
    while gone.elapsed() < Duration::from_secs(2) {
        assert!(
            lab.ping_once("cone", "sym1", &[]).is_err(),
            "cone reached sym1 without a route"
        );
    }
    default_via(&lab, "cone", &gateway);
    let changed = Instant::now();
    reach_again(&lab, "cone", &["sym1"], changed);
    assert_eq!(
        lab.path("cone", "sym1").map(|p| p.0),
        Ok("relay".to_owned())
    );
    // The QUIC packets refused meanwhile were counted as lost.
    let status = lab.meshctl("cone", "status").unwrap();
    let refused = status["io"]["quic_send_errors"].as_u64();
    assert!(
        refused.is_some_and(|n| n > 0),
        "refused QUIC sends: {refused:?}"
    );
}
