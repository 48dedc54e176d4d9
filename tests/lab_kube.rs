#![cfg(not(feature = "sim"))]
//! Real cluster components over the overlay, in the NAT lab of `deploy/lab`:
//! what a Kubernetes cluster spread over clouds and NATs puts on the mesh.
//! A three-member etcd (Debian's `etcd-server` and `etcd-client`) with one
//! member on a public node, one behind a 1:1 NAT and one with no public
//! address at all, each listening only on its overlay address; and a kernel
//! VXLAN device set up as flannel's vxlan backend does it, carrying pings
//! of its full MTU and a TCP transfer. Needs root.
//!
//! Each test builds its own lab (tests/common/lab.rs, `LAB_PREFIX` `mlk<pid>-<n>`);
//! everything a test starts inside the lab's namespaces, etcd included, is
//! stopped and its files removed when the lab is dropped, failed or not.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use common::lab::{eventually, MeshLab, REACH_DEADLINE, START_DEADLINE};
use common::{utf8, Amount};

/// The prefix of this file's labs.
const PREFIX: &str = "mlk";

/// etcd's members: a public node, the 1:1-NAT node, and a node behind a
/// symmetric NAT with no public address.
const ETCD_NODES: [&str; 3] = ["pub1", "nat11", "sym1"];
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;

/// The key written on one member and read back on the others.
const KEY: &str = "meshd/lab-kube";

/// etcdctl with short timeouts, so that a poll never hangs on one call.
fn etcdctl(lab: &MeshLab, node: &str, endpoints: &str, args: &[&str]) -> Result<String, String> {
    let mut all = vec![
        "etcdctl",
        "--endpoints",
        endpoints,
        "--dial-timeout=2s",
        "--command-timeout=5s",
    ];
    all.extend_from_slice(args);
    let out = lab.exec_in(node, &all);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{}` in {node}: {}: {}",
            all.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn client_url(ip: Ipv4Addr) -> String {
    format!("http://{ip}:{ETCD_CLIENT_PORT}")
}

fn peer_url(ip: Ipv4Addr) -> String {
    format!("http://{ip}:{ETCD_PEER_PORT}")
}

/// Starts etcd in `node`'s namespace as kubeadm would on an overlay-only
/// node: client and peer URLs on its overlay address only, a static
/// initial cluster, its data directory in the lab's.
fn start_etcd(lab: &MeshLab, node: &str, initial_cluster: &str) {
    let ip = lab.overlay(node);
    let client = client_url(ip);
    let peer = peer_url(ip);
    let data_dir = lab.dir().join(format!("etcd-{node}"));
    let token = lab.ns("etcd");
    lab.spawn(
        node,
        &format!("etcd-{node}"),
        "etcd",
        &[
            "--name",
            node,
            "--data-dir",
            utf8(&data_dir),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            initial_cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            &token,
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ],
    );
}

/// The local addresses of the TCP sockets listening in `node`'s namespace
/// that belong to etcd or use etcd's ports.
fn etcd_listeners(lab: &MeshLab, node: &str) -> BTreeSet<String> {
    let ss = lab.run_in(node, &["ss", "-H", "-l", "-t", "-n", "-p"]);
    ss.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = *fields.get(3)?;
            let port = local.rsplit_once(':')?.1;
            let etcd_port = [ETCD_CLIENT_PORT, ETCD_PEER_PORT]
                .iter()
                .any(|p| p.to_string() == port);
            (etcd_port || line.contains("((\"etcd\"")).then(|| local.to_owned())
        })
        .collect()
}

#[test]
fn a_three_member_etcd_cluster_over_overlay_addresses_elects_a_leader_and_replicates() {
    let lab = MeshLab::with_mesh_of(PREFIX, &ETCD_NODES);
    // Not needed by etcd, but a mesh that doesn't connect a pair says so
    // here rather than as an election that never ends.
    for (i, a) in ETCD_NODES.iter().enumerate() {
        for b in &ETCD_NODES[i + 1..] {
            lab.wait_for_reach(a, b);
        }
    }

    let initial_cluster = ETCD_NODES
        .map(|n| format!("{n}={}", peer_url(lab.overlay(n))))
        .join(",");
    for node in ETCD_NODES {
        start_etcd(&lab, node, &initial_cluster);
    }

    // Each member listens on its overlay address and nowhere else.
    for node in ETCD_NODES {
        let ip = lab.overlay(node);
        let expected: BTreeSet<String> = [ETCD_CLIENT_PORT, ETCD_PEER_PORT]
            .iter()
            .map(|port| format!("{ip}:{port}"))
            .collect();
        eventually(
            &format!("etcd on {node} listens on {expected:?} only"),
            START_DEADLINE,
            || {
                lab.assert_running(&format!("etcd-{node}"));
                match etcd_listeners(&lab, node) {
                    got if got == expected => Ok(()),
                    got => Err(format!("listening on {got:?}")),
                }
            },
        );
    }

    // The members, as the cluster knows them once each has published its
    // client URLs: by their overlay URLs.
    let all_endpoints = ETCD_NODES.map(|n| client_url(lab.overlay(n))).join(",");
    let expected: BTreeMap<String, serde_json::Value> = ETCD_NODES
        .iter()
        .map(|&n| {
            let ip = lab.overlay(n);
            (
                n.to_owned(),
                serde_json::json!({"peerURLs": [peer_url(ip)], "clientURLs": [client_url(ip)]}),
            )
        })
        .collect();
    eventually(
        "etcd lists the three members by their overlay URLs",
        REACH_DEADLINE,
        || {
            let json = etcdctl(
                &lab,
                "pub1",
                &all_endpoints,
                &["member", "list", "-w", "json"],
            )?;
            let list: serde_json::Value =
                serde_json::from_str(&json).map_err(|e| format!("{e}: {json}"))?;
            let members: BTreeMap<String, serde_json::Value> = list["members"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    (
                        m["name"].as_str().unwrap_or_default().to_owned(),
                        serde_json::json!({"peerURLs": m["peerURLs"], "clientURLs": m["clientURLs"]}),
                    )
                })
                .collect();
            match list["members"].as_array().map(Vec::len) {
                Some(3) if members == expected => Ok(()),
                _ => Err(format!("members {list}")),
            }
        },
    );

    // Exactly one leader, the same for all three. `--cluster` reaches the
    // members by the client URLs they advertise, so this also shows that
    // each is reachable from pub1 at its overlay address.
    let leader = eventually(
        "the three members agree on one leader",
        REACH_DEADLINE,
        || {
            let pub1 = client_url(lab.overlay("pub1"));
            let json = etcdctl(
                &lab,
                "pub1",
                &pub1,
                &["endpoint", "status", "--cluster", "-w", "json"],
            )?;
            let statuses: serde_json::Value =
                serde_json::from_str(&json).map_err(|e| format!("{e}: {json}"))?;
            let statuses = statuses.as_array().ok_or(format!("not a list: {json}"))?;
            let ids: Vec<(u64, u64)> = statuses
                .iter()
                .filter_map(|s| {
                    let status = &s["Status"];
                    Some((
                        status["header"]["member_id"].as_u64()?,
                        status["leader"].as_u64()?,
                    ))
                })
                .collect();
            let leaders: BTreeSet<u64> = ids.iter().map(|&(_, leader)| leader).collect();
            let members: BTreeSet<u64> = ids.iter().map(|&(member, _)| member).collect();
            match (ids.len(), leaders.iter().next()) {
                (3, Some(&leader))
                    if leaders.len() == 1
                        && leader != 0
                        && members.len() == 3
                        && members.contains(&leader) =>
                {
                    Ok(leader)
                }
                _ => Err(format!("statuses {json}")),
            }
        },
    );
    eprintln!("etcd elected member {leader:x} leader");

    // A write on pub1 arrives at the others: each answers from its own
    // copy (serializable read), asked on its own overlay address.
    let value = format!("written on pub1 in lab {}", lab.ns("etcd"));
    let pub1 = client_url(lab.overlay("pub1"));
    let put = etcdctl(&lab, "pub1", &pub1, &["put", KEY, &value]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(put.trim(), "OK", "etcdctl put");
    for node in ["nat11", "sym1"] {
        let own = client_url(lab.overlay(node));
        eventually(
            &format!("the key written on pub1 reads back from {node}'s own copy"),
            REACH_DEADLINE,
            || {
                let got = etcdctl(
                    &lab,
                    node,
                    &own,
                    &["get", KEY, "--consistency=s", "--print-value-only"],
                )?;
                match got.trim_end_matches('\n') {
                    v if v == value => Ok(()),
                    v => Err(format!("read {v:?}")),
                }
            },
        );
    }
    for node in ETCD_NODES {
        lab.assert_running(&format!("etcd-{node}"));
    }
}

/// One end of the VXLAN: its node, address and the MAC of its `flannel.1`.
struct Vtep {
    node: &'static str,
    /// The node's pod subnet is `10.244.<subnet>.0/24`, its VTEP `.1`.
    subnet: u8,
    mac: &'static str,
}

impl Vtep {
    fn address(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.subnet, 1)
    }
}

/// VXLAN headers over IPv4: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner
/// Ethernet (14), as flannel subtracts from the underlying interface's MTU.
const VXLAN_OVERHEAD: u32 = 50;
/// IPv4 (20) + ICMP (8) headers of a ping.
const PING_HEADERS: u32 = 28;

/// Sets up `flannel.1` on `this` towards `peer` as flannel's vxlan backend
/// does: VNI 1, UDP 8472, `local` the overlay address over `mesh0`, no
/// learning; the peer's subnet routed via its VTEP `.0` on-link, with a
/// permanent neighbour entry for that gateway and a forwarding entry that
/// sends the peer's VTEP MAC to its overlay address.
fn flannel_vxlan(lab: &MeshLab, this: &Vtep, peer: &Vtep, mtu: u32) {
    let node = this.node;
    let local = lab.overlay(node).to_string();
    let remote = lab.overlay(peer.node).to_string();
    let mtu = mtu.to_string();
    let address = format!("{}/24", this.address());
    let gateway = format!("10.244.{}.0", peer.subnet);
    let subnet = format!("{gateway}/24");
    for args in [
        &[
            "ip",
            "link",
            "add",
            "flannel.1",
            "address",
            this.mac,
            "mtu",
            &mtu,
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            &local,
            "dstport",
            "8472",
            "nolearning",
            "dev",
            "mesh0",
        ][..],
        &["ip", "addr", "add", &address, "dev", "flannel.1"],
        &["ip", "link", "set", "flannel.1", "up"],
        &[
            "bridge",
            "fdb",
            "append",
            peer.mac,
            "dev",
            "flannel.1",
            "dst",
            &remote,
            "self",
            "permanent",
        ],
        &[
            "ip",
            "neigh",
            "replace",
            &gateway,
            "lladdr",
            peer.mac,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ],
        &[
            "ip",
            "route",
            "replace",
            &subnet,
            "via",
            &gateway,
            "dev",
            "flannel.1",
            "onlink",
        ],
    ] {
        lab.run_in(node, args);
    }
}

/// The IPv4 fragmentation and reassembly counters of `node`'s namespace
/// (`/proc/net/snmp` is per namespace), by name.
fn fragment_counters(lab: &MeshLab, node: &str) -> BTreeMap<String, u64> {
    let snmp = lab.run_in(node, &["cat", "/proc/net/snmp"]);
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip: "));
    let (Some(names), Some(values)) = (ip.next(), ip.next()) else {
        panic!("no Ip lines in {node}'s /proc/net/snmp: {snmp}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter(|(name, _)| name.starts_with("Frag") || name.starts_with("Reasm"))
        .map(|(name, value)| {
            let value = value
                .parse()
                .unwrap_or_else(|e| panic!("{name} = {value:?} in {node}: {e}"));
            (name.to_owned(), value)
        })
        .collect()
}

#[test]
fn a_vxlan_device_like_flannels_carries_pings_and_tcp_without_fragmentation_loss() {
    // A public node and a node behind a symmetric NAT: the symmetric node
    // punches through to the public one, so the pair is direct.
    let a = Vtep {
        node: "pub1",
        subnet: 0,
        mac: "02:00:0a:f4:00:00",
    };
    let b = Vtep {
        node: "sym1",
        subnet: 1,
        mac: "02:00:0a:f4:01:00",
    };
    let lab = MeshLab::with_mesh_of(PREFIX, &[a.node, b.node]);
    lab.wait_for_reach(a.node, b.node);
    lab.wait_for_paths(a.node, b.node, "direct");

    let mesh_mtu = lab.mesh_mtu(a.node);
    assert_eq!(
        lab.mesh_mtu(b.node),
        mesh_mtu,
        "both nodes' env files agree on MESH_MTU"
    );
    let mtu = mesh_mtu - VXLAN_OVERHEAD;
    flannel_vxlan(&lab, &a, &b, mtu);
    flannel_vxlan(&lab, &b, &a, mtu);
    let before: Vec<_> = [a.node, b.node]
        .iter()
        .map(|n| fragment_counters(&lab, n))
        .collect();

    let full = (mtu - PING_HEADERS).to_string();
    let too_big = (mtu - PING_HEADERS + 1).to_string();
    for (from, to) in [(&a, &b), (&b, &a)] {
        let target = IpAddr::V4(to.address());
        eventually(
            &format!(
                "a {mtu}-byte ping with DF from {} to {} over VXLAN",
                from.node, to.node
            ),
            REACH_DEADLINE,
            || lab.ping_address(from.node, target, &["-M", "do", "-s", &full]),
        );
        // One byte more does not fit flannel.1 and DF forbids fragmenting:
        // the sender's kernel refuses it (EMSGSIZE) instead of splitting it.
        let target = target.to_string();
        let out = lab.exec_in(
            from.node,
            &[
                "ping", "-n", "-c", "1", "-W", "2", "-M", "do", "-s", &too_big, &target,
            ],
        );
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success() && said.contains(&format!("message too long, mtu={mtu}")),
            "a {}-byte ping with DF from {} fails locally with EMSGSIZE: {}: {said}",
            mtu + 1,
            from.node,
            out.status
        );
    }

    let len = 8 << 20;
    let sent = lab
        .tcp_transfer_to(
            a.node,
            b.node,
            IpAddr::V4(b.address()),
            Amount::Bytes(len),
            0x5eed_0003,
        )
        .finish();
    assert_eq!(sent, len, "the sender sent everything");

    // The encapsulated packets fit mesh0 exactly: neither node fragmented
    // or reassembled a single IPv4 packet while VXLAN carried all that.
    for (node, before) in [a.node, b.node].iter().zip(before) {
        let after = fragment_counters(&lab, node);
        assert_eq!(after, before, "{node}'s IPv4 fragmentation counters");
    }
    let (path, _) = lab.path(a.node, b.node).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(path, "direct", "VXLAN went over the direct path");
}
