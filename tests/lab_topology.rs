#![cfg(not(feature = "sim"))]
//! The NAT lab of `deploy/lab` behaves as DESIGN.md says: each kind of NAT
//! maps and filters like its name, the 1:1 NAT forwards unsolicited traffic,
//! the two LAN nodes share a subnet, every node reaches the rendezvous, and
//! `deploy/lab/down` leaves nothing behind. No meshd here: plain UDP sockets
//! opened inside the lab's namespaces. Needs root.
//!
//! Every test builds its own lab with the real scripts (tests/common's
//! [`NatLab`]) under its own `LAB_PREFIX` (`mlt<pid>-<n>`), so the tests run
//! in parallel and never touch the demo's lab (`mlab`); the addresses come
//! from `deploy/lab/topology`, as the scripts' do. The guard runs
//! `deploy/lab/down` when the test ends, failed or not; a run killed before
//! that is swept by the next.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::thread;
use std::time::Duration;

use common::lab::NatLab;
use common::topology::topology;
use common::{assert_success, run};
use nix::sched::{setns, CloneFlags};

/// Where the internet sees the lab node `name`.
fn public(name: &str) -> Ipv4Addr {
    topology().node(name).public
}

/// The address on the lab node `name`'s own NIC.
fn address(name: &str) -> Ipv4Addr {
    topology().node(name).address
}

/// The port nodes send from, and the ports public hosts listen on.
const NODE_PORT: u16 = 5000;
const PORT_A: u16 = 4000;
const PORT_B: u16 = 4001;

/// How long a datagram that should arrive may take (a loaded machine, the
/// first packet of each hop waiting for ARP).
const DEADLINE: Duration = Duration::from_secs(10);

/// The prefix of this file's namespaces: not `mt`, which tests/common sweeps.
const PREFIX: &str = "mlt";

/// A UDP socket on `0.0.0.0:port` inside `machine`'s namespace. It stays in
/// that namespace whichever thread uses it afterwards.
fn socket(lab: &NatLab, machine: &str, port: u16) -> UdpSocket {
    let ns = lab.ns(machine);
    let path = format!("/run/netns/{ns}");
    let socket = thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // Moves this short-lived thread only; the socket keeps the
        // namespace it was created in.
        setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
            .unwrap_or_else(|e| panic!("bind UDP port {port} in {ns}: {e}"))
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    socket
        .set_read_timeout(Some(DEADLINE))
        .expect("set a read timeout");
    socket
}

/// The IPv4 addresses on `machine`'s interfaces.
fn addresses(lab: &NatLab, machine: &str) -> Vec<Ipv4Addr> {
    let out = run("ip", &["-n", &lab.ns(machine), "-o", "-4", "addr", "show"]);
    // "2: eth0    inet 10.11.0.2/24 brd … scope global eth0"
    out.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

/// Sends `payload` to `to` from `socket`.
fn send(socket: &UdpSocket, payload: &str, to: impl Into<SocketAddr>) {
    let to = to.into();
    socket
        .send_to(payload.as_bytes(), to)
        .unwrap_or_else(|e| panic!("send {payload:?} to {to}: {e}"));
}

/// The next datagram on `socket` and where it came from; panics with
/// `what` when none arrives in time.
fn receive(socket: &UdpSocket, what: &str) -> (String, SocketAddr) {
    let mut buf = [0u8; 1500];
    match socket.recv_from(&mut buf) {
        Ok((len, from)) => (String::from_utf8_lossy(&buf[..len]).into_owned(), from),
        Err(e) => panic!("{what}: nothing arrived within {DEADLINE:?} ({e})"),
    }
}

/// Receives on `socket` until `expected` arrives, and returns its source;
/// panics if anything else arrives first.
fn receive_exactly(socket: &UdpSocket, expected: &str, what: &str) -> SocketAddr {
    let (payload, from) = receive(socket, what);
    assert_eq!(
        payload, expected,
        "{what}: the first datagram to arrive (from {from}) is not the expected one"
    );
    from
}

/// Sends an unsolicited datagram from `socket` to `to` and proves that the
/// router owning `to` kept it: the router answers ICMP port unreachable
/// (seen as ECONNREFUSED on the connected socket), which it only does for
/// a packet it delivered to itself and not through to a node.
fn assert_kept_by_the_router(socket: &UdpSocket, to: SocketAddrV4, what: &str) {
    socket.connect(to).expect("connect a UDP socket");
    socket
        .send(what.as_bytes())
        .expect("send an unsolicited datagram");
    let mut buf = [0u8; 1500];
    match socket.recv(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => panic!(
            "{what}: no port unreachable from the router within {DEADLINE:?}: \
             it forwarded the datagram (or dropped it silently)"
        ),
        Err(e) => panic!("{what}: expected the router's port unreachable, got {e}"),
        Ok(len) => panic!(
            "{what}: expected the router's port unreachable, got an answer {:?}",
            String::from_utf8_lossy(&buf[..len])
        ),
    }
}

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

#[test]
fn the_cone_nat_keeps_one_mapping_for_every_destination() {
    let lab = NatLab::up(PREFIX);
    let node = socket(&lab, "cone", NODE_PORT);
    let pub1_a = socket(&lab, "pub1", PORT_A);
    let pub1_b = socket(&lab, "pub1", PORT_B);
    let pub2_a = socket(&lab, "pub2", PORT_A);

    send(&node, "to pub1:a", v4(public("pub1"), PORT_A));
    send(&node, "to pub1:b", v4(public("pub1"), PORT_B));
    send(&node, "to pub2:a", v4(public("pub2"), PORT_A));
    let seen = [
        receive_exactly(&pub1_a, "to pub1:a", "cone -> pub1:a"),
        receive_exactly(&pub1_b, "to pub1:b", "cone -> pub1:b"),
        receive_exactly(&pub2_a, "to pub2:a", "cone -> pub2:a"),
    ];

    assert_eq!(
        seen[0].ip(),
        public("cone"),
        "the cone node is seen as its router"
    );
    assert!(
        seen.iter().all(|s| *s == seen[0]),
        "one socket behind the cone NAT is seen from one address and port by \
         every destination, but was seen as {seen:?}"
    );
}

#[test]
fn the_cone_nat_only_lets_in_the_address_and_port_it_sent_to() {
    let lab = NatLab::up(PREFIX);
    let node = socket(&lab, "cone", NODE_PORT);
    let pub1_a = socket(&lab, "pub1", PORT_A);
    let pub1_b = socket(&lab, "pub1", PORT_B);
    let pub2_a = socket(&lab, "pub2", PORT_A);

    send(&node, "hello", v4(public("pub1"), PORT_A));
    let (_, mapped) = receive(&pub1_a, "cone -> pub1:a");
    let SocketAddr::V4(mapped) = mapped else {
        panic!("an IPv4 underlay gave the IPv6 source {mapped}")
    };

    // Port-restricted: another host, or another port of the same host,
    // cannot use the mapping.
    assert_kept_by_the_router(&pub2_a, mapped, "pub2 -> the cone's mapping");
    assert_kept_by_the_router(&pub1_b, mapped, "pub1:b -> the cone's mapping");
    send(&pub1_a, "reply", mapped);
    receive_exactly(&node, "reply", "pub1:a's reply through the cone NAT");
}

#[test]
fn the_symmetric_nat_maps_each_destination_to_a_new_port() {
    let lab = NatLab::up(PREFIX);
    let pub1_a = socket(&lab, "pub1", PORT_A);
    let pub1_b = socket(&lab, "pub1", PORT_B);
    let pub2_a = socket(&lab, "pub2", PORT_A);

    for (node_name, router_ip) in [("sym1", public("sym1")), ("sym2", public("sym2"))] {
        let node = socket(&lab, node_name, NODE_PORT);
        send(&node, "to pub1:a", v4(public("pub1"), PORT_A));
        send(&node, "to pub1:b", v4(public("pub1"), PORT_B));
        send(&node, "to pub2:a", v4(public("pub2"), PORT_A));
        let seen = [
            receive_exactly(&pub1_a, "to pub1:a", &format!("{node_name} -> pub1:a")),
            receive_exactly(&pub1_b, "to pub1:b", &format!("{node_name} -> pub1:b")),
            receive_exactly(&pub2_a, "to pub2:a", &format!("{node_name} -> pub2:a")),
        ];

        assert!(
            seen.iter().all(|s| s.ip() == router_ip),
            "{node_name} is seen as its router {router_ip}, but was seen as {seen:?}"
        );
        // --random-fully draws each port at random, so two of three may
        // coincide by chance (about 1 in 20 000); all three (about 1 in
        // 4·10⁹) only on a NAT that keeps one mapping, a cone.
        let ports: BTreeSet<u16> = seen.iter().map(SocketAddr::port).collect();
        assert!(
            ports.len() > 1,
            "{node_name}'s one socket got one public port {ports:?} for three \
             destinations: its NAT behaves like a cone, not symmetric"
        );
    }
}

#[test]
fn the_one_to_one_nat_forwards_unsolicited_traffic_to_the_node() {
    let lab = NatLab::up(PREFIX);
    let node = socket(&lab, "nat11", NODE_PORT);
    let pub1_a = socket(&lab, "pub1", PORT_A);
    let pub2_a = socket(&lab, "pub2", PORT_A);

    let (nat11_private, nat11_public) = (address("nat11"), public("nat11"));
    let addresses = addresses(&lab, "nat11");
    assert!(
        addresses.contains(&nat11_private) && !addresses.contains(&nat11_public),
        "the 1:1 NAT node has only its private address {nat11_private}, not the \
         public {nat11_public}, on its interfaces; it has {addresses:?}"
    );

    send(&pub1_a, "unsolicited", v4(nat11_public, NODE_PORT));
    let (_, from) = receive(&node, "pub1 -> the 1:1 public address");
    assert_eq!(
        from,
        SocketAddr::from(v4(public("pub1"), PORT_A)),
        "the node sees the sender as it is"
    );
    send(&node, "reply", from);
    let (_, reply_from) = receive(&pub1_a, "the 1:1 node's reply");
    assert_eq!(
        reply_from,
        SocketAddr::from(v4(nat11_public, NODE_PORT)),
        "the reply comes from the public address and the node's own port"
    );

    // The node speaking first is seen the same way by anyone.
    send(&node, "hello", v4(public("pub2"), PORT_A));
    let (_, seen) = receive(&pub2_a, "1:1 node -> pub2");
    assert_eq!(seen, SocketAddr::from(v4(nat11_public, NODE_PORT)));
}

#[test]
fn nodes_behind_a_nat_are_unreachable_unsolicited() {
    let lab = NatLab::up(PREFIX);
    let pub1_a = socket(&lab, "pub1", PORT_A);
    let pub1_b = socket(&lab, "pub1", PORT_B);

    for (node_name, router_ip) in [
        ("cone", public("cone")),
        ("sym1", public("sym1")),
        ("lan1", public("lan1")),
    ] {
        // The node listens, but has sent nothing: there is no mapping yet.
        let node = socket(&lab, node_name, NODE_PORT);
        let what = format!("unsolicited pub1 -> {node_name}'s router {router_ip}");
        assert_kept_by_the_router(&pub1_b, v4(router_ip, NODE_PORT), &what);
        assert_kept_by_the_router(&pub1_b, v4(router_ip, 51820), &what);

        // The node's own traffic opens the way back: the first thing it
        // receives is the answer, not the datagrams sent before.
        send(&node, "hello", v4(public("pub1"), PORT_A));
        let (_, mapped) = receive(&pub1_a, &format!("{node_name} -> pub1"));
        send(&pub1_a, "reply", mapped);
        receive_exactly(&node, "reply", &format!("pub1's reply to {node_name}"));
    }
}

#[test]
fn the_two_lan_nodes_reach_each_other_on_their_private_subnet() {
    let lab = NatLab::up(PREFIX);
    let lan1 = socket(&lab, "lan1", NODE_PORT);
    let lan2 = socket(&lab, "lan2", NODE_PORT);

    send(&lan1, "from lan1", v4(address("lan2"), NODE_PORT));
    let (_, from) = receive(&lan2, "lan1 -> lan2");
    assert_eq!(
        from,
        SocketAddr::from(v4(address("lan1"), NODE_PORT)),
        "no NAT between lan1 and lan2"
    );
    send(&lan2, "from lan2", v4(address("lan1"), NODE_PORT));
    let (_, from) = receive(&lan1, "lan2 -> lan1");
    assert_eq!(from, SocketAddr::from(v4(address("lan2"), NODE_PORT)));
}

#[test]
fn the_two_lan_nodes_share_one_public_address() {
    let lab = NatLab::up(PREFIX);
    let lan1 = socket(&lab, "lan1", NODE_PORT);
    let lan2 = socket(&lab, "lan2", NODE_PORT);
    let pub1_a = socket(&lab, "pub1", PORT_A);

    send(&lan1, "from lan1", v4(public("pub1"), PORT_A));
    let seen1 = receive_exactly(&pub1_a, "from lan1", "lan1 -> pub1");
    send(&lan2, "from lan2", v4(public("pub1"), PORT_A));
    let seen2 = receive_exactly(&pub1_a, "from lan2", "lan2 -> pub1");

    assert_eq!(seen1.ip(), public("lan1"));
    assert_eq!(seen2.ip(), public("lan1"));
    // Same private port, same destination: the router must pick another
    // public port for the second node.
    assert_ne!(seen1.port(), seen2.port(), "two flows, two public ports");
}

#[test]
fn every_node_reaches_the_rendezvous_and_hears_its_answer() {
    let lab = NatLab::up(PREFIX);
    let rendezvous_at = topology().rendezvous;
    let rendezvous = socket(&lab, "rv", rendezvous_at.port());

    for node in &topology().nodes {
        let (node_name, seen_as) = (node.name, node.public);
        let node = socket(&lab, node_name, 51820);
        send(&node, node_name, rendezvous_at);
        let from = receive_exactly(
            &rendezvous,
            node_name,
            &format!("{node_name} -> rendezvous"),
        );
        assert_eq!(
            from.ip(),
            seen_as,
            "the rendezvous sees {node_name} as {seen_as}"
        );
        send(&rendezvous, "welcome", from);
        receive_exactly(
            &node,
            "welcome",
            &format!("the rendezvous's answer to {node_name}"),
        );
    }
}

#[test]
fn up_refuses_to_build_over_a_lab_that_is_up() {
    let lab = NatLab::up(PREFIX);
    let before = lab.namespaces();

    let again = lab.script("up");

    assert!(!again.status.success(), "a second up fails");
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already up"), "and says why, not: {stderr}");
    assert_eq!(lab.namespaces(), before, "and leaves the lab as it was");
}

#[test]
fn down_removes_every_namespace() {
    let mut lab = NatLab::up(PREFIX);
    assert_eq!(
        lab.namespaces().len(),
        2 + topology().nodes.len() + topology().routers.len(),
        "inet, rv, a namespace per node and per router: {:?}",
        lab.namespaces()
    );
    fs::create_dir_all(lab.dir()).expect("create the lab directory");

    let out = lab.down();

    assert_success(&out, "deploy/lab/down");
    assert_eq!(
        lab.namespaces(),
        Vec::<String>::new(),
        "no namespace is left"
    );
    assert!(!lab.dir().exists(), "{} is removed", lab.dir().display());
    assert_success(&lab.script("down"), "a second deploy/lab/down");
}
