#![cfg(not(feature = "sim"))]
//! The real `meshd` binary on a lab of network namespaces: nodes with a
//! static config find each other, carry traffic, survive a restart of one
//! side and clean up after themselves. Needs root and `iputils-ping`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod common;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use common::{Lab, MB, MESH_IFACE};

#[test]
fn json_logs_at_trace_level_never_show_key_material() {
    let lab = Lab::new(2);
    let env = [("RUST_LOG", "trace")];
    let files: Vec<_> = [(0, 1), (1, 0)]
        .into_iter()
        .map(|(i, peer)| lab.write_meshd_config(i, &[peer]))
        .collect();
    let mut daemons: Vec<_> = files
        .iter()
        .enumerate()
        .map(|(i, f)| lab.start_meshd_with(i, f, &["--log-format", "json"], &env))
        .collect();
    lab.node(0).pings(lab.node(1).overlay);
    lab.node(1).pings(lab.node(0).overlay);
    for meshd in &mut daemons {
        meshd.daemon.terminate();
    }

    for (i, meshd) in daemons.iter().enumerate() {
        let log = meshd.daemon.log();
        assert!(
            log.lines().count() > 10,
            "meshd {i} logged at trace level:\n{log}"
        );
        for line in log.lines() {
            assert!(
                serde_json::from_str::<serde_json::Value>(line).is_ok(),
                "every line of meshd {i}'s log is JSON: {line}"
            );
        }
        for node in lab.nodes() {
            let secret = BASE64.decode(&node.key.private).expect("a base64 key");
            let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
            for (form, text) in [("base64", node.key.private.as_str()), ("hex", hex.as_str())] {
                assert!(
                    !log.contains(text),
                    "meshd {i}'s log shows node {}'s private key ({form})",
                    node.name
                );
            }
        }
    }
}

#[test]
fn two_nodes_ping_each_other_over_the_overlay() {
    let lab = Lab::new(2);
    let _meshd = lab.start_meshd_full_mesh(&[0, 1]);

    lab.node(0).pings(lab.node(1).overlay);
    lab.node(1).pings(lab.node(0).overlay);
}

#[test]
fn three_nodes_every_node_pings_every_overlay_address() {
    let lab = Lab::new(3);
    let _meshd = lab.start_meshd_full_mesh(&[0, 1, 2]);

    for from in lab.nodes() {
        for to in lab.nodes() {
            from.pings(to.overlay);
        }
    }
}

#[test]
fn fifty_megabytes_over_tcp_arrive_byte_identical_and_batched() {
    let lab = Lab::new(2);
    let meshd = lab.start_meshd_full_mesh(&[0, 1]);

    common::assert_tcp_transfer(lab.node(0), lab.node(1), 50 * MB, 0x6d65_7368);

    // The offloads at work, from meshctl status's counters: the sender
    // reads TSO super-packets and sends GSO batches, the receiver gets GRO
    // batches and writes coalesced super-packets. Without them every ratio
    // is 1 (a bulk stream averages well above 2 on every kernel with them).
    let io = |i: usize| meshd[i].status()["io"].clone();
    let ratio = |io: &serde_json::Value, packets: &str, calls: &str| {
        let (p, c) = (
            io[packets].as_u64().unwrap_or(0),
            io[calls].as_u64().unwrap_or(0),
        );
        p as f64 / c.max(1) as f64
    };
    let (sender, receiver) = (io(0), io(1));
    for (what, io, packets, calls) in [
        (
            "sender's TUN reads",
            &sender,
            "tun_read_packets",
            "tun_reads",
        ),
        (
            "sender's UDP sends",
            &sender,
            "udp_sent_datagrams",
            "udp_sends",
        ),
        (
            "receiver's UDP receives",
            &receiver,
            "udp_received_datagrams",
            "udp_receives",
        ),
        (
            "receiver's TUN writes",
            &receiver,
            "tun_written_packets",
            "tun_writes",
        ),
    ] {
        let r = ratio(io, packets, calls);
        assert!(
            r >= 2.0,
            "{what}: {r:.2} packets per call, want ≥ 2 (counters: {io})"
        );
    }
    assert_eq!(receiver["tun_write_errors"], 0, "{receiver}");
}

/// Whether this kernel's TUN takes UDP-tunnel GSO (Linux 6.18 and later).
fn kernel_has_udp_tunnel_gso() -> bool {
    let release = common::run("uname", &["-r"]);
    let mut numbers = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    (major, minor) >= (6, 18)
}

#[test]
fn vxlan_over_mesh0_arrives_byte_identical_and_is_read_in_tunnel_super_packets() {
    // Flannel's default backend, by hand: a VXLAN device on each node whose
    // underlay is mesh0, and a TCP stream between the VXLAN addresses.
    let lab = Lab::new(2);
    let meshd = lab.start_meshd_full_mesh(&[0, 1]);
    lab.node(0).pings(lab.node(1).overlay);
    let inner = |i: usize| format!("10.250.0.{}", i + 1);
    for (i, peer) in [(0, 1), (1, 0)] {
        let node = lab.node(i);
        let (local, remote) = (node.overlay.to_string(), lab.node(peer).overlay.to_string());
        let mtu = (common::MTU - 50).to_string();
        for args in [
            vec![
                "link", "add", "vx0", "type", "vxlan", "id", "1", "dev", MESH_IFACE, "local",
                &local, "remote", &remote, "dstport", "8472",
            ],
            vec!["addr", "add", &format!("{}/24", inner(i)), "dev", "vx0"],
            vec!["link", "set", "vx0", "mtu", &mtu, "up"],
        ] {
            let out = node.exec("ip", &args);
            assert!(
                out.status.success(),
                "ip {args:?} in node {}: {out:?}",
                node.name
            );
        }
    }
    let before = meshd[0].status()["io"].clone();
    common::assert_tcp_transfer_to(
        lab.node(0),
        lab.node(1),
        inner(1).parse::<std::net::Ipv4Addr>().unwrap(),
        20 * MB,
        0x7678_6c61,
    );
    let after = meshd[0].status()["io"].clone();
    let delta = |key: &str| after[key].as_u64().unwrap_or(0) - before[key].as_u64().unwrap_or(0);
    let per_read = delta("tun_read_packets") as f64 / delta("tun_reads").max(1) as f64;
    eprintln!("sender's TUN reads during the VXLAN stream: {per_read:.2} packets per read");

    // meshd says what it asked the kernel for, and never claims more.
    let log = meshd[0].daemon.log();
    let claimed = log.contains("udp_tunnel_gso=true");
    if kernel_has_udp_tunnel_gso() {
        assert!(
            claimed,
            "a 6.18 kernel's TUN takes UDP-tunnel GSO; meshd's log:\n{log}"
        );
        // The sender reads whole VXLAN super-packets: without UDP-tunnel
        // GSO the kernel cuts them first and this is 1.0.
        assert!(
            per_read >= 2.0,
            "sender's TUN reads during the VXLAN stream: {per_read:.2} packets per read, want ≥ 2 (before: {before}, after: {after})"
        );
    } else {
        assert!(
            log.contains("udp_tunnel_gso=false"),
            "an older kernel: meshd says it runs without UDP-tunnel GSO; its log:\n{log}"
        );
    }
}

#[test]
fn restarting_one_meshd_recovers_the_tunnel_without_touching_the_other() {
    let lab = Lab::new(2);
    let (a, b) = (lab.node(0), lab.node(1));
    let files_a = lab.write_meshd_config(0, &[1]);
    let files_b = lab.write_meshd_config(1, &[0]);
    let mut meshd_a = lab.start_meshd(0, &files_a);
    let mut meshd_b = lab.start_meshd(1, &files_b);
    a.pings(b.overlay);
    b.pings(a.overlay);
    let pid_a = meshd_a.pid();

    let status = meshd_b.daemon.terminate();
    assert!(
        status.success(),
        "meshd on node b exits 0 after SIGTERM, not {status}"
    );
    let _meshd_b = lab.start_meshd(1, &files_b);

    // The untouched side speaks first: the restarted node's eager handshake
    // must have replaced the session node a still holds.
    a.pings(b.overlay);
    b.pings(a.overlay);
    meshd_a.daemon.assert_running();
    assert_eq!(meshd_a.pid(), pid_a, "node a keeps its meshd process");

    let peers = meshd_a.peers();
    let peer_b = peers
        .iter()
        .find(|p| p["public_key"] == b.key.public.as_str())
        .unwrap_or_else(|| panic!("meshctl peers on node a lists node b: {peers:#?}"));
    assert!(
        !peer_b["last_handshake"].is_null(),
        "node a has a handshake with node b: {peer_b:#}"
    );
    assert!(
        peer_b["rx_bytes"].as_u64().is_some_and(|n| n > 0),
        "node a has received bytes from node b: {peer_b:#}"
    );
    assert!(
        peer_b["tx_bytes"].as_u64().is_some_and(|n| n > 0),
        "node a has sent bytes to node b: {peer_b:#}"
    );
}

#[test]
fn meshd_exit_removes_the_interface() {
    let lab = Lab::new(2);
    let a = lab.node(0);
    let files = lab.write_meshd_config(0, &[1]);
    let mut meshd = lab.start_meshd(0, &files);
    let addrs = common::ip(&format!("-n {} -o addr show dev {MESH_IFACE}", a.ns));
    assert!(
        addrs.contains(&format!("{}/{}", a.overlay, common::MESH_PREFIX_LEN)),
        "a ready meshd has its overlay address on {MESH_IFACE}: {addrs}"
    );

    let status = meshd.daemon.terminate();

    assert!(
        status.success(),
        "meshd exits 0 after SIGTERM, not {status}"
    );
    assert!(
        !a.has_link(MESH_IFACE),
        "{MESH_IFACE} is gone after meshd exits"
    );
    assert!(
        !files.socket.exists(),
        "meshd removes its API socket {} when it exits",
        files.socket.display()
    );
}
