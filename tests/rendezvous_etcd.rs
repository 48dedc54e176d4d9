#![cfg(not(feature = "sim"))]
//! Several `mesh-rendezvous` servers sharing one mesh on a real etcd
//! (Debian's `etcd-server`), with the real binaries on a lab of network
//! namespaces: etcd runs on the first server's machine, the servers on two
//! machines of a shared subnet, and meshd nodes join at either. Needs root.
//! The second server's certificate is issued by the mesh's CA on the
//! first (`server add`), so one join line's pin reaches both.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod common;

use std::collections::BTreeMap;

use common::etcd::EtcdCluster;
use std::time::{Duration, Instant};

use common::{eventually, Lab, MeshNode, OverlayIps, Rendezvous, DEADLINE};

/// Machines: 0 runs etcd and the first server, 1 the second server, the
/// others are nodes.
const SERVERS: [usize; 2] = [0, 1];
const NODES: [usize; 3] = [2, 3, 4];

fn etcd_on(lab: &Lab, machine: usize) -> EtcdCluster {
    let node = lab.node(machine);
    EtcdCluster::on(&[(node.ns.clone(), node.underlay)])
}

/// Which server `nodes list --json` says each node is on, by name.
fn servers_of(listed: &[serde_json::Value]) -> BTreeMap<String, Option<String>> {
    listed
        .iter()
        .map(|n| {
            let name = n["name"].as_str().unwrap_or("?").to_owned();
            let server = n["server"].as_str().map(str::to_owned);
            (name, server)
        })
        .collect()
}

#[test]
fn two_servers_on_one_etcd_share_a_mesh_whose_nodes_joined_at_either_reach_each_other() {
    let lab = Lab::new(SERVERS.len() + NODES.len());
    let etcd = etcd_on(&lab, SERVERS[0]);
    let prefix = "/meshd/two-servers/";
    let rv1 = lab.start_rendezvous_on_etcd(SERVERS[0], "rv1", &etcd.endpoints(), prefix, None);
    let rv2 =
        lab.start_rendezvous_on_etcd(SERVERS[1], "rv2", &etcd.endpoints(), prefix, Some(&rv1));

    // A token made at one server is usable at the other.
    let join = rv1.create_token(NODES.len());
    let nodes: Vec<MeshNode<'_>> = NODES
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            let line = if k == 0 {
                join.via(&rv1)
            } else {
                join.via(&rv2)
            };
            lab.join_and_start(i, &line)
        })
        .collect();

    // Every node learnt every other, whichever server it is on.
    let ips: Vec<OverlayIps> = nodes.iter().map(MeshNode::overlay_ips).collect();
    for (i, from) in nodes.iter().enumerate() {
        for (j, to) in ips.iter().enumerate() {
            if i != j {
                from.pings(to.v4);
            }
        }
    }

    // Both servers list every node, online, with the server it is on.
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let expected: BTreeMap<String, Option<String>> = names
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let server = if k == 0 { "rv1" } else { "rv2" };
            (name.clone(), Some(server.to_owned()))
        })
        .collect();
    for rv in [&rv1, &rv2] {
        eventually(
            "each server lists every node on its server",
            DEADLINE,
            || {
                rv.all_online(&nodes)?;
                let seen = servers_of(&rv.try_nodes()?);
                if seen == expected {
                    Ok(())
                } else {
                    Err(format!("nodes list says {seen:?}, not {expected:?}"))
                }
            },
        );
    }

    // Each server lists both servers, where they are, and their nodes.
    for rv in [&rv1, &rv2] {
        let servers: Vec<(String, String, u64)> = rv
            .servers()
            .iter()
            .map(|s| {
                let text = |k: &str| s[k].as_str().unwrap_or("?").to_owned();
                (
                    text("name"),
                    text("public_addr"),
                    s["nodes"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        let expected = vec![
            ("rv1".to_owned(), rv1.address().to_string(), 1),
            ("rv2".to_owned(), rv2.address().to_string(), 2),
        ];
        assert_eq!(servers, expected);
    }

    // Overlay addresses are distinct: claimed once across the servers.
    let mut v4: Vec<_> = ips.iter().map(|ip| ip.v4).collect();
    v4.sort_unstable();
    v4.dedup();
    assert_eq!(v4.len(), nodes.len(), "{ips:?}");
}

/// `Ok` once `rv` lists every one of `nodes` online on `server`.
fn all_on(rv: &Rendezvous<'_>, nodes: &[MeshNode<'_>], server: &str) -> Result<(), String> {
    rv.all_online(nodes)?;
    let seen = servers_of(&rv.try_nodes()?);
    let elsewhere: Vec<_> = seen
        .iter()
        .filter(|(_, s)| s.as_deref() != Some(server))
        .collect();
    if elsewhere.is_empty() {
        Ok(())
    } else {
        Err(format!("not on {server}: {elsewhere:?}"))
    }
}

/// How long the nodes of a killed server may take to be at another: a
/// node's session notices in 3 s, and the others are raced at once.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(15);

#[test]
fn the_nodes_of_a_killed_server_move_to_another_within_seconds_and_keep_their_addresses() {
    let lab = Lab::new(SERVERS.len() + NODES.len());
    let etcd = etcd_on(&lab, SERVERS[0]);
    let prefix = "/meshd/failover/";
    let rv1 = lab.start_rendezvous_on_etcd(SERVERS[0], "rv1", &etcd.endpoints(), prefix, None);
    let rv2 =
        lab.start_rendezvous_on_etcd(SERVERS[1], "rv2", &etcd.endpoints(), prefix, Some(&rv1));
    // The join line names both servers; each node homes on the first to
    // answer, which on this subnet may be either.
    let join = rv1.create_token(NODES.len()).via_all(&[&rv1, &rv2]);
    let nodes: Vec<MeshNode<'_>> = NODES
        .iter()
        .map(|&i| lab.join_and_start(i, &join))
        .collect();
    eventually("every node is online", DEADLINE, || rv2.all_online(&nodes));
    let homes = servers_of(&rv2.nodes());
    let on_rv1 = homes
        .values()
        .filter(|s| s.as_deref() == Some("rv1"))
        .count();
    // The server with the most nodes dies.
    let (mut victim, survivor, name) = if on_rv1 * 2 >= nodes.len() {
        (rv1, rv2, "rv2")
    } else {
        (rv2, rv1, "rv1")
    };
    let before: Vec<OverlayIps> = nodes.iter().map(MeshNode::overlay_ips).collect();

    let killed = Instant::now();
    victim.kill();
    eventually(
        "every node is on the surviving server",
        FAILOVER_DEADLINE,
        || all_on(&survivor, &nodes, name),
    );
    eprintln!(
        "the nodes of the killed server ({homes:?}) were on the other {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );

    let after: Vec<OverlayIps> = nodes.iter().map(MeshNode::overlay_ips).collect();
    assert_eq!(before, after, "no node's address changed");
    for (i, from) in nodes.iter().enumerate() {
        for (j, to) in after.iter().enumerate() {
            if i != j {
                from.pings(to.v4);
            }
        }
    }
}

/// How long a server cut off from etcd may keep its nodes: its lease's TTL
/// (10 s by default), then they are at another server within seconds.
const CUT_OFF_DEADLINE: Duration = Duration::from_secs(30);

#[test]
fn a_server_cut_off_from_etcd_admits_no_one_and_its_nodes_move_to_a_server_that_can() {
    // etcd alone on machine 0; the servers on 1 and 2; nodes on 3 and 4.
    let lab = Lab::new(5);
    let etcd = etcd_on(&lab, 0);
    let prefix = "/meshd/cut-off/";
    let rv1 = lab.start_rendezvous_on_etcd(1, "rv1", &etcd.endpoints(), prefix, None);
    let rv2 = lab.start_rendezvous_on_etcd(2, "rv2", &etcd.endpoints(), prefix, Some(&rv1));
    // The join line names rv1 only: the nodes learn rv2 from its welcome.
    let join = rv1.create_token(3);
    let nodes: Vec<MeshNode<'_>> = [3, 4]
        .iter()
        .map(|&i| lab.join_and_start(i, &join.via(&rv1)))
        .collect();
    eventually("both nodes are on rv1", DEADLINE, || {
        all_on(&rv2, &nodes, "rv1")
    });

    // rv1 loses etcd (a partition): its packets to etcd are dropped.
    let etcd_ip = lab.node(0).underlay.to_string();
    let cut = lab.node(1).exec(
        "iptables",
        &[
            "-A", "OUTPUT", "-d", &etcd_ip, "-p", "tcp", "--dport", "2379", "-j", "DROP",
        ],
    );
    assert!(cut.status.success(), "iptables: {cut:?}");
    let since = Instant::now();
    eventually("rv1's nodes are on rv2", CUT_OFF_DEADLINE, || {
        all_on(&rv2, &nodes, "rv2")
    });
    eprintln!(
        "rv1's nodes were on rv2 {:.1} s after rv1 lost etcd",
        since.elapsed().as_secs_f64()
    );

    // rv1 admits no one meanwhile: a node that knows only rv1 is not
    // admitted (no address is decided without the store).
    let lone = lab.join(0, &join.via(&rv1));
    let _lone = lab.spawn(
        lone.machine,
        "meshd-lone",
        common::MESHD,
        &["run", "--state-dir", common::utf8(&lone.state_dir)],
    );
    std::thread::sleep(Duration::from_secs(8));
    let listed = rv2.nodes();
    assert_eq!(listed.len(), 2, "no third node was admitted: {listed:?}");
}

#[test]
fn a_single_use_token_presented_at_two_servers_at_once_admits_exactly_one_node() {
    let lab = Lab::new(4);
    let etcd = etcd_on(&lab, 0);
    let prefix = "/meshd/one-use/";
    let rv1 = lab.start_rendezvous_on_etcd(0, "rv1", &etcd.endpoints(), prefix, None);
    let rv2 = lab.start_rendezvous_on_etcd(1, "rv2", &etcd.endpoints(), prefix, Some(&rv1));
    let once = rv1.create_token(1);
    // Two machines, each told of a different server, start at once.
    let a = lab.join(2, &once.via(&rv1));
    let b = lab.join(3, &once.via(&rv2));
    let run = |node: &MeshNode<'_>, label: &str| {
        lab.spawn(
            node.machine,
            label,
            common::MESHD,
            &["run", "--state-dir", common::utf8(&node.state_dir)],
        )
    };
    let daemons = [run(&a, "meshd-a"), run(&b, "meshd-b")];
    eventually("one of the two is admitted", DEADLINE, || {
        let listed = rv2.try_nodes()?;
        match listed.len() {
            1 => Ok(()),
            n => Err(format!("{n} nodes listed: {listed:?}")),
        }
    });
    // The other is refused for good: its meshd says so and exits.
    eventually("the other meshd gives up", DEADLINE, || {
        let exited: Vec<usize> = (0..2)
            .filter(|&i| {
                let log = daemons[i].log();
                log.contains("join token not accepted") || log.contains("refused this node")
            })
            .collect();
        if exited.len() == 1 {
            Ok(())
        } else {
            Err(format!("refused: {exited:?}"))
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rv1.nodes().len(), 1, "still exactly one, at either server");
    drop(daemons);
}

#[test]
fn concurrent_joins_at_two_servers_never_share_an_address_or_a_name() {
    // A /29 holds six nodes and each key's first candidate is one of six,
    // so four keys joining at once mostly want some address another wants;
    // all four ask for the same name.
    let lab = Lab::new(6);
    let etcd = etcd_on(&lab, 0);
    let prefix = "/meshd/racing-joins/";
    let rv1 =
        lab.start_rendezvous_on_etcd_in("100.72.9.0/29", 0, "rv1", &etcd.endpoints(), prefix, None);
    let rv2 = lab.start_rendezvous_on_etcd_in(
        "100.72.9.0/29",
        1,
        "rv2",
        &etcd.endpoints(),
        prefix,
        Some(&rv1),
    );
    let join = rv1.create_token(4);
    let servers = [&rv1, &rv2];
    let nodes: Vec<MeshNode<'_>> = (2..6)
        .map(|i| lab.join_as(i, &join.via(servers[i % 2]), "racer"))
        .collect();
    let daemons: Vec<_> = nodes
        .iter()
        .map(|node| {
            lab.spawn(
                node.machine,
                &format!("meshd-{}", node.machine.name),
                common::MESHD,
                &["run", "--state-dir", common::utf8(&node.state_dir)],
            )
        })
        .collect();
    let listed = eventually("all four are admitted", DEADLINE, || {
        let listed = rv2.try_nodes()?;
        if listed.len() == 4 {
            Ok(listed)
        } else {
            Err(format!("{} nodes listed: {listed:?}", listed.len()))
        }
    });
    let distinct = |field: &str| -> std::collections::BTreeSet<String> {
        listed
            .iter()
            .map(|n| n[field].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    eprintln!(
        "four joins at once: names and servers {:?}",
        servers_of(&listed)
    );
    assert_eq!(distinct("ipv4").len(), 4, "four addresses: {listed:?}");
    assert_eq!(distinct("name").len(), 4, "four names: {listed:?}");
    assert!(
        distinct("name").contains("racer"),
        "one of them has the name it asked for: {listed:?}"
    );
    let servers_used: std::collections::BTreeSet<_> =
        servers_of(&listed).into_values().flatten().collect();
    assert_eq!(servers_used.len(), 2, "joined at both servers: {listed:?}");
    // Each node has the name and address the mesh lists for it.
    for node in &nodes {
        let status: serde_json::Value = eventually("meshd answers", DEADLINE, || {
            common::meshctl_json(node.socket_path(), &["status"])
        });
        let (name, ipv4) = (&status["name"], &status["overlay_ips"][0]);
        assert!(
            listed
                .iter()
                .any(|n| &n["name"] == name && &n["ipv4"] == ipv4),
            "{} is {name} at {ipv4}, as the mesh lists: {listed:?}",
            node.machine.name
        );
    }
    // Presence reaches the other server through etcd: the lists agree once
    // it has (read at two instants, they can differ by one in flight).
    eventually("both servers list the same nodes", DEADLINE, || {
        let (one, two) = (rv1.nodes(), rv2.nodes());
        if one == two {
            Ok(())
        } else {
            Err(format!("rv1: {one:?}\nrv2: {two:?}"))
        }
    });
    drop(daemons);
}

#[test]
fn when_the_etcd_leader_stops_tunnels_stay_up_and_joins_resume_after_the_election() {
    // etcd members on machines 0, 1 and 2 (the servers on 0 and 1, as on
    // three VPSs); nodes on 3, 4 and, later, 5.
    let lab = Lab::new(6);
    let places: Vec<(String, std::net::Ipv4Addr)> = (0..3)
        .map(|i| (lab.node(i).ns.clone(), lab.node(i).underlay))
        .collect();
    let etcd = EtcdCluster::on(&places);
    let prefix = "/meshd/election/";
    let rv1 = lab.start_rendezvous_on_etcd(0, "rv1", &etcd.endpoints(), prefix, None);
    let rv2 = lab.start_rendezvous_on_etcd(1, "rv2", &etcd.endpoints(), prefix, Some(&rv1));
    let join = rv1.create_token(3).via_all(&[&rv1, &rv2]);
    let nodes: Vec<MeshNode<'_>> = [3, 4]
        .iter()
        .map(|&i| lab.join_and_start(i, &join))
        .collect();
    let ips: Vec<OverlayIps> = nodes.iter().map(MeshNode::overlay_ips).collect();
    nodes[0].pings(ips[1].v4);

    let leader = etcd.leader();
    etcd.stop_member(leader);
    // Through the election: every ping between the nodes is answered.
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        nodes[0]
            .ping_once(ips[1].v4)
            .unwrap_or_else(|e| panic!("a tunnel depended on etcd's leader: {e}"));
    }
    let new_leader = etcd.leader();
    assert_ne!(new_leader, leader);
    // A node joins once etcd has its new leader.
    let late = lab.join_and_start(5, &join);
    late.pings(ips[0].v4);
    eventually("both servers list the three nodes", DEADLINE, || {
        for rv in [&rv1, &rv2] {
            let listed = rv.try_nodes()?;
            if listed.len() != 3 {
                return Err(format!("{} nodes: {listed:?}", listed.len()));
            }
        }
        Ok(())
    });
}

#[test]
fn after_everything_restarts_every_node_keeps_its_addresses() {
    let lab = Lab::new(5);
    let etcd = etcd_on(&lab, 0);
    let prefix = "/meshd/restart/";
    let mut rv1 = lab.start_rendezvous_on_etcd(0, "rv1", &etcd.endpoints(), prefix, None);
    let mut rv2 = lab.start_rendezvous_on_etcd(1, "rv2", &etcd.endpoints(), prefix, Some(&rv1));
    let join = rv1.create_token(3).via_all(&[&rv1, &rv2]);
    let mut nodes: Vec<MeshNode<'_>> = [2, 3, 4]
        .iter()
        .map(|&i| lab.join_and_start(i, &join))
        .collect();
    let before: Vec<OverlayIps> = nodes.iter().map(MeshNode::overlay_ips).collect();

    for node in &mut nodes {
        node.stop();
    }
    rv1.stop();
    rv2.stop();
    etcd.stop_member(0);
    etcd.start_member(0);
    etcd.wait_healthy();
    rv2.start();
    rv1.start();
    for node in &mut nodes {
        node.start();
    }

    let after: Vec<OverlayIps> = nodes.iter().map(MeshNode::overlay_ips).collect();
    assert_eq!(before, after);
    eventually("every node is online again", DEADLINE, || {
        rv2.all_online(&nodes)
    });
    for (i, from) in nodes.iter().enumerate() {
        for (j, to) in after.iter().enumerate() {
            if i != j {
                from.pings(to.v4);
            }
        }
    }
}

#[test]
fn two_nodes_on_different_servers_without_a_direct_path_relay_through_both_servers() {
    let lab = Lab::new(4);
    let etcd = etcd_on(&lab, 0);
    let prefix = "/meshd/across/";
    let rv1 = lab.start_rendezvous_on_etcd(0, "rv1", &etcd.endpoints(), prefix, None);
    let rv2 = lab.start_rendezvous_on_etcd(1, "rv2", &etcd.endpoints(), prefix, Some(&rv1));
    // No direct path between the two nodes' machines (as two symmetric
    // NATs): only the servers reach them.
    for (from, to) in [(2, 3), (3, 2)] {
        let peer = lab.node(to).underlay.to_string();
        let out = lab.node(from).exec(
            "iptables",
            &["-A", "OUTPUT", "-d", &peer, "-p", "udp", "-j", "DROP"],
        );
        assert!(out.status.success(), "iptables: {out:?}");
    }
    let join = rv1.create_token(2);
    let a = lab.join_and_start(2, &join.via(&rv1));
    let b = lab.join_and_start(3, &join.via(&rv2));
    let expected: BTreeMap<String, Option<String>> = [
        (a.name.clone(), Some("rv1".to_owned())),
        (b.name.clone(), Some("rv2".to_owned())),
    ]
    .into();
    eventually("each node is on its own server", DEADLINE, || {
        let seen = servers_of(&rv2.try_nodes()?);
        if seen == expected {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    });
    let (ip_a, ip_b) = (a.overlay_ips(), b.overlay_ips());
    let t = Instant::now();
    a.pings(ip_b.v4);
    eprintln!(
        "first ping through both servers after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    b.pings(ip_a.v4);
    a.pings(ip_b.v6);
    let path = a
        .meshd()
        .peers()
        .into_iter()
        .find(|p| p["public_key"] == b.public_key().as_str())
        .map(|p| p["path"].clone());
    assert_eq!(path, Some(serde_json::json!("relay")), "through the relay");
}

/// 150 ms each way: a server on another continent.
const FAR: Duration = Duration::from_millis(150);

#[test]
fn a_node_homes_on_the_server_that_answers_first_and_never_waits_for_one_that_does_not() {
    let lab = Lab::new(5);
    let etcd = etcd_on(&lab, 0);
    let prefix = "/meshd/home/";
    let rv1 = lab.start_rendezvous_on_etcd(0, "rv1", &etcd.endpoints(), prefix, None);
    let rv2 = lab.start_rendezvous_on_etcd(1, "rv2", &etcd.endpoints(), prefix, Some(&rv1));
    // A far path to each server, through a forwarder on its machine.
    let far = |machine: usize, rv: &Rendezvous<'_>| {
        let node = lab.node(machine);
        let listen = std::net::SocketAddr::from((node.underlay, 7600));
        common::DelayProxy::start(&node.ns, listen, rv.address(), FAR)
    };
    let (far1, far2) = (far(0, &rv1), far(1, &rv2));
    let join = rv1.create_token(3);
    // Whatever the order the join line gives, the near server wins.
    let a = lab.join_and_start(2, &join.via_addrs(&[far1.addr, rv2.address()]));
    let b = lab.join_and_start(3, &join.via_addrs(&[rv1.address(), far2.addr]));
    // rv1 does not answer machine 4 at all: the node does not wait for it.
    let drop_rv1 = lab.node(4).exec(
        "iptables",
        &[
            "-A",
            "OUTPUT",
            "-d",
            &rv1.address().ip().to_string(),
            "-p",
            "udp",
            "-j",
            "DROP",
        ],
    );
    assert!(drop_rv1.status.success(), "iptables: {drop_rv1:?}");
    let started = Instant::now();
    let c = lab.join_and_start(4, &join.via_all(&[&rv1, &rv2]));
    let c_up = started.elapsed();
    let expected: BTreeMap<String, Option<String>> = [
        (a.name.clone(), Some("rv2".to_owned())),
        (b.name.clone(), Some("rv1".to_owned())),
        (c.name.clone(), Some("rv2".to_owned())),
    ]
    .into();
    eventually("each node is on its nearest server", DEADLINE, || {
        let seen = servers_of(&rv1.try_nodes()?);
        if seen == expected {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    });
    eprintln!(
        "the node that rv1 does not answer had its address {:.1} s after it started",
        c_up.as_secs_f64()
    );
    assert!(
        c_up < Duration::from_secs(8),
        "it raced both servers instead of waiting out rv1's handshake: {c_up:?}"
    );
}

/// The bar for a relayed pair whose server dies.
const RELAYED_FAILOVER: Duration = Duration::from_secs(5);

#[test]
fn two_nodes_without_a_direct_path_reach_each_other_within_seconds_after_their_server_dies() {
    // Three etcd members (the servers' machines and a fifth), as a
    // three-VPS mesh runs them; the nodes on 2 and 3.
    let lab = Lab::new(5);
    let places: Vec<(String, std::net::Ipv4Addr)> = [0, 1, 4]
        .iter()
        .map(|&m| (lab.node(m).ns.clone(), lab.node(m).underlay))
        .collect();
    let etcd = EtcdCluster::on(&places);
    let prefix = "/meshd/relayed-failover/";
    let mut rv1 = lab.start_rendezvous_on_etcd(0, "rv1", &etcd.endpoints(), prefix, None);
    let rv2 = lab.start_rendezvous_on_etcd(1, "rv2", &etcd.endpoints(), prefix, Some(&rv1));
    // No direct path between the two nodes (as two symmetric NATs).
    for (from, to) in [(2, 3), (3, 2)] {
        let peer = lab.node(to).underlay.to_string();
        let out = lab.node(from).exec(
            "iptables",
            &["-A", "OUTPUT", "-d", &peer, "-p", "udp", "-j", "DROP"],
        );
        assert!(out.status.success(), "iptables: {out:?}");
    }
    // Both homed on rv1 (their join line names it only; they learn rv2
    // from its welcome).
    let join = rv1.create_token(2).via(&rv1);
    let nodes: Vec<MeshNode<'_>> = [2, 3]
        .iter()
        .map(|&i| lab.join_and_start(i, &join))
        .collect();
    eventually("both nodes are on rv1", DEADLINE, || {
        all_on(&rv2, &nodes, "rv1")
    });
    let before: Vec<OverlayIps> = nodes.iter().map(MeshNode::overlay_ips).collect();
    nodes[0].pings(before[1].v4);

    let killed = Instant::now();
    rv1.kill();
    eventually("the pair reaches each other again", DEADLINE, || {
        nodes[0].ping_once(before[1].v4)
    });
    let back = killed.elapsed();
    eprintln!(
        "the relayed pair reached each other again {:.1} s after its server was killed",
        back.as_secs_f64()
    );
    assert!(back <= RELAYED_FAILOVER, "{back:?}");
    eventually("both nodes are on rv2", DEADLINE, || {
        all_on(&rv2, &nodes, "rv2")
    });
    let after: Vec<OverlayIps> = nodes.iter().map(MeshNode::overlay_ips).collect();
    assert_eq!(before, after, "no address changed");
    nodes[1].pings(after[0].v4);
}
