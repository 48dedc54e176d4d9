#![cfg(not(feature = "sim"))]
//! The NAT lab of `deploy/lab` behaves as DESIGN.md says: each kind of NAT
//! maps and filters like its name, every NAT router but the firewall-less
//! one drops unsolicited inbound silently while that one takes it for
//! itself (and moves its node's mapping), the 1:1 NAT forwards unsolicited
//! traffic, the two LAN nodes share a subnet, the hairpinning router loops
//! its public ports back, the short-lived router forgets mappings in 30 s,
//! IPv6 exists only where the topology gives it and its routers let in only
//! answers, every node reaches the rendezvous, and `deploy/lab/down`
//! leaves nothing behind. No meshd here: plain UDP sockets
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
use common::{assert_success, output, run};
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

/// Sends an unsolicited datagram from `socket` to `to` and proves that
/// nothing answers it, not even the router's port unreachable: a router
/// that drops unsolicited inbound on its WAN side, as real routers do.
/// (That it was not forwarded either is shown by the node's first
/// datagram being the later answer.)
fn assert_dropped_silently(socket: &UdpSocket, to: SocketAddrV4, what: &str) {
    socket.connect(to).expect("connect a UDP socket");
    socket
        .set_read_timeout(Some(SILENCE))
        .expect("set a read timeout");
    socket
        .send(what.as_bytes())
        .expect("send an unsolicited datagram");
    let mut buf = [0u8; 1500];
    match socket.recv(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => panic!(
            "{what}: the router answered port unreachable: it took the datagram for itself \
             instead of dropping it on its WAN side"
        ),
        Err(e) => panic!("{what}: expected silence, got {e}"),
        Ok(len) => panic!(
            "{what}: expected silence, got an answer {:?}",
            String::from_utf8_lossy(&buf[..len])
        ),
    }
    socket
        .set_read_timeout(Some(DEADLINE))
        .expect("set a read timeout");
}

/// How long a dropped datagram is waited for (its port unreachable would
/// come back within milliseconds).
const SILENCE: Duration = Duration::from_secs(1);

/// `router`'s conntrack entries for UDP.
fn udp_flows(lab: &NatLab, router: &str) -> String {
    run(
        "ip",
        &[
            "netns",
            "exec",
            &lab.ns(router),
            "conntrack",
            "-L",
            "-p",
            "udp",
        ],
    )
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
    assert_dropped_silently(&pub2_a, mapped, "pub2 -> the cone's mapping");
    assert_dropped_silently(&pub1_b, mapped, "pub1:b -> the cone's mapping");
    send(&pub1_a, "reply", mapped);
    receive_exactly(&node, "reply", "pub1:a's reply through the cone NAT");
}

#[test]
fn the_symmetric_nat_maps_each_destination_to_a_new_port() {
    let lab = NatLab::up(PREFIX);
    let pub1_a = socket(&lab, "pub1", PORT_A);
    let pub1_b = socket(&lab, "pub1", PORT_B);
    let pub2_a = socket(&lab, "pub2", PORT_A);

    // The port-mapping router, without miniupnpd, is one of them.
    for node_name in ["sym1", "sym2", "upnp"] {
        let router_ip = public(node_name);
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

    for node_name in ["cone", "sym1", "lan1", "cgn", "v6a", "bare", "upnp"] {
        let router_ip = public(node_name);
        // The node listens, but has sent nothing: there is no mapping yet.
        let node = socket(&lab, node_name, NODE_PORT);
        let what = format!("unsolicited pub1 -> {node_name}'s router {router_ip}");
        if topology().router_of(node_name).kind == "masquerade-bare" {
            assert_kept_by_the_router(&pub1_b, v4(router_ip, NODE_PORT), &what);
            assert_kept_by_the_router(&pub1_b, v4(router_ip, 51820), &what);
        } else {
            assert_dropped_silently(&pub1_b, v4(router_ip, NODE_PORT), &what);
            assert_dropped_silently(&pub1_b, v4(router_ip, 51820), &what);
        }

        // The node's own traffic opens the way back: the first thing it
        // receives is the answer, not the datagrams sent before.
        send(&node, "hello", v4(public("pub1"), PORT_A));
        let (_, mapped) = receive(&pub1_a, &format!("{node_name} -> pub1"));
        send(&pub1_a, "reply", mapped);
        receive_exactly(&node, "reply", &format!("pub1's reply to {node_name}"));
    }
}

#[test]
fn the_firewall_less_masquerade_moves_its_nodes_mapping_for_a_peer_whose_datagram_came_first() {
    let lab = NatLab::up(PREFIX);
    let (bare_public, cone_public) = (public("bare"), public("cone"));

    // The cone's datagram reaches the bare router first, with TTL 2: its
    // own router forwards it with TTL 1, and the bare router, the next hop,
    // takes it for itself (a router checks the TTL only of what it
    // forwards). It keeps the flow.
    let cone = socket(&lab, "cone", NODE_PORT);
    cone.set_ttl(2).expect("set the TTL");
    send(&cone, "first", v4(bare_public, NODE_PORT));
    let unsolicited =
        format!("src={cone_public} dst={bare_public} sport={NODE_PORT} dport={NODE_PORT}");
    let flows = udp_flows(&lab, "r-bare");
    assert!(
        flows.lines().any(|l| l.contains(&unsolicited)),
        "the bare router keeps {unsolicited}: {flows}"
    );
    // bare's own datagram to the cone then leaves from another port, which
    // the cone's NAT (it sent to port NODE_PORT) drops.
    let bare = socket(&lab, "bare", NODE_PORT);
    send(&bare, "second", v4(cone_public, NODE_PORT));
    cone.set_read_timeout(Some(SILENCE))
        .expect("set a read timeout");
    let mut buf = [0u8; 1500];
    match cone.recv_from(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("bare's datagram reached the cone through a mapping that moved: {other:?}"),
    }
    let flows = udp_flows(&lab, "r-bare");
    let bare_flow = flows
        .lines()
        .find(|l| l.contains(&format!("src={} dst={cone_public}", address("bare"))))
        .unwrap_or_else(|| panic!("bare's flow to the cone: {flows}"));
    assert!(
        !bare_flow.contains(&format!("dport={NODE_PORT} mark")),
        "bare's mapping towards the cone moved off port {NODE_PORT}: {bare_flow}"
    );

    // The other order, on fresh ports: bare first, with TTL 1, dies in its
    // own router before the NAT maps it; with TTL 2 it opens the mapping and
    // dies at the cone's firewall; the cone's answer then reaches bare.
    let (bare, cone) = (socket(&lab, "bare", PORT_A), socket(&lab, "cone", PORT_A));
    bare.set_ttl(1).expect("set the TTL");
    send(&bare, "ttl 1", v4(cone_public, PORT_A));
    let flows = udp_flows(&lab, "r-bare");
    assert!(
        !flows
            .lines()
            .any(|l| l.contains(&format!("sport={PORT_A}"))),
        "a TTL 1 datagram leaves no mapping: {flows}"
    );
    bare.set_ttl(2).expect("set the TTL");
    send(&bare, "ttl 2", v4(cone_public, PORT_A));
    send(&cone, "answer", v4(bare_public, PORT_A));
    receive_exactly(
        &bare,
        "answer",
        "the cone's datagram through bare's mapping",
    );
}

#[test]
fn the_hairpinning_router_loops_its_public_ports_back_and_the_other_does_not() {
    let lab = NatLab::up(PREFIX);
    let rendezvous_at = topology().rendezvous;
    let rendezvous = socket(&lab, "rv", rendezvous_at.port());
    for (a, b, hairpins) in [("hair1", "hair2", true), ("lan1", "lan2", false)] {
        let (sa, sb) = (socket(&lab, a, 51820), socket(&lab, b, 51820));
        // Where the internet sees b's port 51820.
        send(&sb, b, rendezvous_at);
        let seen_b = receive_exactly(&rendezvous, b, &format!("{b} -> rendezvous"));
        let SocketAddr::V4(seen_b) = seen_b else {
            panic!("{seen_b}")
        };
        if hairpins {
            send(&sa, "hairpin", seen_b);
            let from = receive_exactly(&sb, "hairpin", &format!("{a} -> {b}'s public address"));
            assert_eq!(
                from.ip(),
                public(a),
                "the hairpinned datagram comes from {a}'s public address"
            );
        } else {
            assert_kept_by_the_router(&sa, seen_b, &format!("{a} -> {b}'s public address"));
        }
    }
}

#[test]
fn only_the_short_lived_router_forgets_udp_mappings_in_30_s() {
    let lab = NatLab::up(PREFIX);
    for router in topology().routers.values() {
        let timeout = run(
            "ip",
            &[
                "netns",
                "exec",
                &lab.ns(router.name),
                "sysctl",
                "-n",
                "net.netfilter.nf_conntrack_udp_timeout_stream",
            ],
        );
        let expected = router.udp_timeout.map_or(120, |t| t.as_secs());
        assert_eq!(timeout.trim(), expected.to_string(), "{}", router.name);
    }
}

#[test]
fn ipv6_exists_only_on_the_dual_stack_sites_and_lets_in_only_answers() {
    let lab = NatLab::up(PREFIX);
    let global6 = |machine: &str| {
        run(
            "ip",
            &[
                "-n",
                &lab.ns(machine),
                "-6",
                "-o",
                "addr",
                "show",
                "scope",
                "global",
            ],
        )
    };
    for node in &topology().nodes {
        let addresses = global6(node.name);
        match node.address6 {
            Some(a) => assert!(
                addresses.contains(&a.to_string()),
                "{}: {addresses}",
                node.name
            ),
            None => assert!(addresses.trim().is_empty(), "{}: {addresses}", node.name),
        }
    }
    let (a, b) = (
        topology().node("v6a").address6.unwrap(),
        topology().node("v6b").address6.unwrap(),
    );
    let ping6 = |from: &str, to: std::net::Ipv6Addr| {
        output(
            "ip",
            &[
                "netns",
                "exec",
                &lab.ns(from),
                "ping",
                "-6",
                "-n",
                "-c",
                "1",
                "-W",
                "1",
                &to.to_string(),
            ],
        )
        .status
        .success()
    };
    // A home router's IPv6 firewall: nothing comes in unasked…
    assert!(!ping6("v6a", b), "v6b's router let in an unsolicited ping");
    assert!(!ping6("pub1", b), "pub1 has no IPv6 route at all");
    // …while an answer does (UDP both ways, as meshd's probes).
    let sa = socket6(&lab, "v6a", NODE_PORT);
    let sb = socket6(&lab, "v6b", NODE_PORT);
    sa.send_to(b"open", (b, NODE_PORT)).expect("send over IPv6");
    sb.send_to(b"through", (a, NODE_PORT))
        .expect("send over IPv6");
    let mut buf = [0u8; 64];
    let (len, from) = sa
        .recv_from(&mut buf)
        .expect("v6b's datagram through the hole v6a opened");
    assert_eq!(&buf[..len], b"through");
    assert_eq!(from, SocketAddr::from((b, NODE_PORT)), "no NAT for IPv6");
}

/// A UDP socket on `[::]:port` inside `machine`'s namespace.
fn socket6(lab: &NatLab, machine: &str, port: u16) -> UdpSocket {
    let path = format!("/run/netns/{}", lab.ns(machine));
    let socket = thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
        UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, port))
            .unwrap_or_else(|e| panic!("bind UDP [::]:{port}: {e}"))
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    socket
        .set_read_timeout(Some(DEADLINE))
        .expect("set a read timeout");
    socket
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
