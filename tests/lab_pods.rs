#![cfg(not(feature = "sim"))]
//! Pod traffic over mesh0 without VXLAN, in the NAT lab of `deploy/lab`:
//! every node gets pods made by the real CNI plugins
//! (`containernetworking-plugins`: `bridge` + `host-local`, called as a
//! container runtime calls them), its pod CIDR advertised — with `routes`
//! in meshd.toml, or from flannel's `subnet.env` as flannel writes it —
//! and accepted by the rendezvous inside the mesh's routable range. Pods on a public node, a 1:1-NAT node and two symmetric-NAT nodes
//! (a relayed pair) reach each other by pod IP; a prefix overlapping
//! another node's, or outside the routable range, is refused and says so
//! until an operator approves it; a node cannot send from a pod address
//! that is not its own; prefixes survive a meshd restart while the
//! rendezvous is down. And with no routes in meshd at all: BIRD (Debian's
//! `bird2`) on each node speaks iBGP to the others over overlay addresses
//! and exports its pod CIDR, as calico does; meshd learns the routes BIRD
//! installs on mesh0, pods reach each other, and stopping BIRD on one node
//! withdraws its prefix everywhere. Needs root.
//!
//! The lab is built by tests/common's [`MeshLab`] under the prefix `mlp`
//! (not the `mlm`, `mls`, `mlt`, `mlk` nor `mlu` of the other lab tests);
//! pods are namespaces under the lab's prefix, removed with it, failed or
//! not.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr};

use common::cni::{add_pod, Pod};
use common::lab::{eventually, MeshLab, Release, REACH_DEADLINE, SETTLE_DEADLINE};
use common::Amount;
use ipnet::Ipv4Net;

/// The prefix of this file's labs.
const PREFIX: &str = "mlp";

/// The cluster's pod CIDR: the rendezvous's routable range.
const POD_CIDR: &str = "10.244.0.0/16";

/// The nodes with pods and each one's pod CIDR: public, 1:1 NAT, and the
/// two symmetric-NAT nodes only the relay connects.
const PODS: [(&str, &str); 4] = [
    ("pub1", "10.244.1.0/24"),
    ("nat11", "10.244.2.0/24"),
    ("sym1", "10.244.3.0/24"),
    ("sym2", "10.244.4.0/24"),
];

/// A node that asks for a prefix overlapping sym2's, later.
const GREEDY: (&str, &str) = ("lan1", "10.244.4.0/23");

/// A node that asks for a prefix outside the routable range.
const OUTSIDE: (&str, &str) = ("lan2", "192.168.77.0/24");

/// Sets `routes` in the meshd.toml `meshd join` wrote for `node` and
/// restarts its meshd, as an operator editing the file would.
fn advertise(lab: &MeshLab, node: &str, prefixes: &[&str]) {
    let list = prefixes.iter().map(|p| toml::Value::from(*p)).collect();
    set_config(lab, node, "routes", toml::Value::Array(list));
    lab.restart_meshd(node, &Release::current());
}

/// Sets `key` in the meshd.toml `meshd join` wrote for `node`.
fn set_config(lab: &MeshLab, node: &str, key: &str, value: toml::Value) {
    let path = lab.state_dir(node).join("meshd.toml");
    let text = fs::read_to_string(&path).unwrap();
    let mut config: toml::Table = text.parse().unwrap();
    config.insert(key.into(), value);
    fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
}

/// `[routes] routable` in the rendezvous's rendezvous.toml, then a
/// restart of the server.
fn make_routable(lab: &MeshLab, range: &str) {
    let path = lab.state_dir("rv").join("rendezvous.toml");
    let mut text = fs::read_to_string(&path).unwrap();
    text.push_str(&format!("\n[routes]\nroutable = [\"{range}\"]\n"));
    fs::write(&path, text).unwrap();
    lab.restart_rendezvous(&Release::current());
}

/// What the rendezvous decided on `node`'s advertised `prefix`, as `meshctl
/// routes --json` on the node shows it: (status, explanation).
fn decision(lab: &MeshLab, node: &str, prefix: &str) -> Result<(String, String), String> {
    let routes = lab.meshctl(node, "routes")?;
    let entry = routes["advertised"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["prefix"] == prefix)
        .ok_or_else(|| format!("{prefix} not advertised by {node}: {routes}"))?;
    let status = entry["decision"]["status"]
        .as_str()
        .ok_or_else(|| format!("no decision on {prefix} yet: {routes}"))?;
    let explanation = entry["explanation"].as_str().unwrap_or_default();
    Ok((status.to_owned(), explanation.to_owned()))
}

fn wait_for_decision(lab: &MeshLab, node: &str, prefix: &str, expected: &str) -> String {
    eventually(
        &format!("{node}'s {prefix} is {expected}"),
        SETTLE_DEADLINE,
        || {
            let (status, explanation) = decision(lab, node, prefix)?;
            if status == expected {
                Ok(explanation)
            } else {
                Err(format!("{status}: {explanation}"))
            }
        },
    )
}

/// The prefixes `node` routes to `peer` because the mesh accepted them, as
/// its `meshctl peers --json` says.
fn peer_routes(lab: &MeshLab, node: &str, peer: &str) -> Result<Vec<String>, String> {
    peer_prefixes(lab, node, peer, "routes")
}

/// `field` (`routes`, `learned_routes`) of `node`'s peer `peer` in its
/// `meshctl peers --json`.
fn peer_prefixes(
    lab: &MeshLab,
    node: &str,
    peer: &str,
    field: &str,
) -> Result<Vec<String>, String> {
    let peers = lab.meshctl(node, "peers")?;
    let name = format!("node-{peer}");
    let entry = peers
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name.as_str())
        .ok_or_else(|| format!("{node} does not know {peer}: {peers}"))?;
    Ok(entry[field]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect())
}

/// Whether `node`'s kernel routes `prefix` over mesh0.
fn kernel_routes(lab: &MeshLab, node: &str, prefix: &str) -> bool {
    let out = lab.run_in(node, &["ip", "-4", "route", "show", prefix, "dev", "mesh0"]);
    !out.trim().is_empty()
}

/// Waits until every pod reaches every other pod by its IP.
fn assert_pods_reach_each_other(lab: &MeshLab, pods: &BTreeMap<&str, Pod>) {
    for (from, a) in pods {
        for (to, b) in pods {
            if from == to {
                continue;
            }
            eventually(
                &format!(
                    "the pod on {from} ({}) pings the pod on {to} ({})",
                    a.ip, b.ip
                ),
                REACH_DEADLINE,
                || lab.ping_address(&pod_machine(from), IpAddr::V4(b.ip), &[]),
            );
        }
    }
}

/// The lab "machine" of `node`'s pod (its namespace is `<prefix>-pod-<node>`).
fn pod_machine(node: &str) -> String {
    format!("pod-{node}")
}

/// The `source_not_allowed` drops `node`'s meshd counted.
fn spoof_drops(lab: &MeshLab, node: &str) -> u64 {
    let status = lab.meshctl(node, "status").unwrap();
    status["drops"]["source_not_allowed"].as_u64().unwrap_or(0)
}

#[test]
fn pods_of_every_nat_reach_each_other_over_advertised_routes() {
    let nodes: Vec<&str> = PODS
        .iter()
        .map(|(n, _)| *n)
        .chain([GREEDY.0, OUTSIDE.0])
        .collect();
    let lab = MeshLab::with_mesh_of(PREFIX, &nodes);
    make_routable(&lab, POD_CIDR);

    // Pods first, as a kubelet would make them before anything routes.
    let cni_dir = lab.dir().join("cni");
    let pods: BTreeMap<&str, Pod> = PODS
        .iter()
        .map(|(node, cidr)| {
            let subnet: Ipv4Net = cidr.parse().unwrap();
            let mtu = lab.mesh_mtu(node);
            let pod = add_pod(
                &lab.ns(node),
                &lab.ns(&pod_machine(node)),
                subnet,
                mtu,
                &cni_dir,
            );
            (*node, pod)
        })
        .collect();

    // Three say it in meshd.toml; sym2 follows flannel's subnet.env, which
    // flannel writes after meshd started.
    for (node, cidr) in &PODS[..3] {
        advertise(&lab, node, &[cidr]);
    }
    let (sym2, sym2_cidr) = PODS[3];
    let subnet_env = lab.state_dir(sym2).join("subnet.env");
    set_config(
        &lab,
        sym2,
        "advertise-flannel-subnet",
        subnet_env.to_str().unwrap().into(),
    );
    lab.restart_meshd(sym2, &Release::current());
    let bridge = sym2_cidr.replace(".0/24", ".1/24");
    let env = format!("FLANNEL_NETWORK={POD_CIDR}\nFLANNEL_SUBNET={bridge}\nFLANNEL_MTU=1380\n");
    fs::write(&subnet_env, env).unwrap();
    for (node, cidr) in PODS {
        wait_for_decision(&lab, node, cidr, "accepted");
        for (peer, _) in PODS.iter().filter(|(p, _)| *p != node) {
            eventually(
                &format!("{peer} routes {cidr} to {node}"),
                SETTLE_DEADLINE,
                || {
                    let routes = peer_routes(&lab, peer, node)?;
                    if routes == [cidr] && kernel_routes(&lab, peer, cidr) {
                        Ok(())
                    } else {
                        Err(format!("routes to {node}: {routes:?}"))
                    }
                },
            );
        }
    }
    // The symmetric pair is relayed, and stays so: the pod bridge address
    // each announces as a local candidate lies inside its own pod CIDR,
    // which the mesh routes into the tunnel, so it is never an endpoint.
    lab.wait_for_paths("sym1", "sym2", "relay");
    assert_pods_reach_each_other(&lab, &pods);
    // The symmetric pair's pods over the relay, and a direct pair, with
    // their bytes checked.
    for (from, to, seed) in [
        ("sym1", "sym2", 0x9057_0001),
        ("pub1", "nat11", 0x9057_0002),
    ] {
        let transfer = lab.tcp_transfer_to(
            &pod_machine(from),
            &pod_machine(to),
            IpAddr::V4(pods[to].ip),
            Amount::Bytes(4 << 20),
            seed,
        );
        assert_eq!(transfer.finish(), 4 << 20, "{from}'s pod sent everything");
    }
    let path = lab.path("sym1", "sym2").unwrap();
    assert_eq!(path.0, "relay", "sym1 → sym2: {path:?}");
    let direct = lab.path("pub1", "nat11").unwrap().0;
    assert_eq!(direct, "direct");

    // A later prefix overlapping sym2's is refused, naming sym2, and no
    // peer routes it; one outside the routable range waits for approval.
    advertise(&lab, GREEDY.0, &[GREEDY.1]);
    let refused = wait_for_decision(&lab, GREEDY.0, GREEDY.1, "overlaps");
    assert!(refused.contains("node-sym2"), "{refused}");
    advertise(&lab, OUTSIDE.0, &[OUTSIDE.1]);
    let waiting = wait_for_decision(&lab, OUTSIDE.0, OUTSIDE.1, "awaiting_approval");
    assert!(
        waiting.contains(&format!(
            "mesh-rendezvous routes approve node-lan2 {}",
            OUTSIDE.1
        )),
        "{waiting}"
    );
    assert!(peer_routes(&lab, "pub1", GREEDY.0).unwrap().is_empty());
    assert!(peer_routes(&lab, "pub1", OUTSIDE.0).unwrap().is_empty());
    assert!(!kernel_routes(&lab, "pub1", OUTSIDE.1));
    // The operator approves it: routed everywhere; takes it back: gone.
    let current = Release::current();
    let approve = ["routes", "approve", "node-lan2", OUTSIDE.1];
    lab.rendezvous_admin("rv", &approve, &current).unwrap();
    wait_for_decision(&lab, OUTSIDE.0, OUTSIDE.1, "accepted");
    eventually(
        "pub1 routes lan2's approved prefix",
        SETTLE_DEADLINE,
        || match kernel_routes(&lab, "pub1", OUTSIDE.1) {
            true => Ok(()),
            false => Err("no route on mesh0".into()),
        },
    );
    let unapprove = ["routes", "unapprove", "node-lan2", OUTSIDE.1];
    lab.rendezvous_admin("rv", &unapprove, &current).unwrap();
    eventually(
        "pub1 withdraws lan2's prefix",
        SETTLE_DEADLINE,
        || match kernel_routes(&lab, "pub1", OUTSIDE.1) {
            false => Ok(()),
            true => Err("still routed over mesh0".into()),
        },
    );
    let listed = lab
        .rendezvous_admin("rv", &["routes", "list"], &current)
        .unwrap();
    assert!(
        listed.contains("node-lan1") && listed.contains("node-sym2"),
        "{listed}"
    );

    // sym1 sends from one of pub1's pod addresses: sym2's meshd drops it
    // and counts it, and nothing reaches sym2's pod.
    let before = spoof_drops(&lab, "sym2");
    let forged = Ipv4Addr::new(10, 244, 1, 200);
    lab.run_in(
        "sym1",
        &["ip", "addr", "add", &format!("{forged}/32"), "dev", "lo"],
    );
    let target = IpAddr::V4(pods["sym2"].ip);
    let spoofed = lab.ping_address("sym1", target, &["-I", &forged.to_string()]);
    assert!(spoofed.is_err(), "a forged pod source got through");
    eventually("sym2 counts the forged packets", SETTLE_DEADLINE, || {
        let after = spoof_drops(&lab, "sym2");
        if after > before {
            Ok(())
        } else {
            Err(format!("source_not_allowed still {after}"))
        }
    });

    // The rendezvous goes down and pub1's meshd restarts: pub1 routes its
    // peers' pods from its cache, and its peers keep routing its own.
    lab.stop("rv");
    lab.restart_meshd("pub1", &current);
    for (_, cidr) in PODS.iter().filter(|(n, _)| *n != "pub1") {
        assert!(kernel_routes(&lab, "pub1", cidr), "pub1 lost {cidr}");
    }
    let survivors: BTreeMap<&str, Pod> = ["pub1", "nat11", "sym1"]
        .into_iter()
        .map(|n| (n, pods[n].clone()))
        .collect();
    assert_pods_reach_each_other(&lab, &survivors);
}

/// The pod CIDR BIRD exports for the `i`th node of [`PODS`].
fn bgp_pod_cidr(i: usize) -> Ipv4Net {
    format!("10.245.{}.0/24", i + 1).parse().unwrap()
}

/// BIRD's configuration on `node`: iBGP with every other node over the
/// overlay, `direct` so that a route's gateway is the peer's overlay
/// address (what meshd learns), exporting the pods' bridge subnet and
/// installing what it hears in the kernel.
fn bird_config(lab: &MeshLab, node: &str, nodes: &[&str]) -> String {
    let me = lab.overlay(node);
    let mut config = format!(
        "router id {me};\n\
         protocol device {{}}\n\
         protocol direct {{ ipv4; interface \"cni0\"; }}\n\
         protocol kernel {{ ipv4 {{ import none; export where source = RTS_BGP; }}; }}\n"
    );
    for peer in nodes.iter().filter(|p| **p != node) {
        let neighbor = lab.overlay(peer);
        config.push_str(&format!(
            "protocol bgp to_{peer} {{\n  local {me} as 64512;\n  neighbor {neighbor} as 64512;\n  \
             direct;\n  hold time 9;\n  keepalive time 3;\n  \
             ipv4 {{ import all; export where source = RTS_DEVICE; next hop self; }};\n}}\n"
        ));
    }
    config
}

/// Whether `node`'s meshd routes `prefix` to `peer` because the routing
/// table says so.
fn learned_by(lab: &MeshLab, node: &str, peer: &str, prefix: &str) -> Result<bool, String> {
    Ok(peer_prefixes(lab, node, peer, "learned_routes")?
        .iter()
        .any(|r| r == prefix))
}

#[test]
fn pods_reach_each_other_over_routes_bird_installs_with_no_meshd_configuration() {
    let nodes: Vec<&str> = PODS.iter().map(|(n, _)| *n).collect();
    let lab = MeshLab::with_mesh_of(PREFIX, &nodes);
    let cni_dir = lab.dir().join("cni");
    let pods: BTreeMap<&str, Pod> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let mtu = lab.mesh_mtu(node);
            let pod_ns = lab.ns(&pod_machine(node));
            let pod = add_pod(&lab.ns(node), &pod_ns, bgp_pod_cidr(i), mtu, &cni_dir);
            (*node, pod)
        })
        .collect();
    for node in &nodes {
        let dir = lab.state_dir(node);
        fs::create_dir_all(&dir).unwrap();
        let config = dir.join("bird.conf");
        fs::write(&config, bird_config(&lab, node, &nodes)).unwrap();
        let socket = dir.join("bird.ctl");
        let (config, socket) = (config.to_str().unwrap(), socket.to_str().unwrap());
        lab.spawn(
            node,
            &format!("bird-{node}"),
            "bird",
            &["-f", "-c", config, "-s", socket],
        );
    }

    // BIRD's routes reach every kernel with a peer as gateway, and meshd
    // takes them as that peer's.
    for (i, node) in nodes.iter().enumerate() {
        let cidr = bgp_pod_cidr(i).to_string();
        for peer in nodes.iter().filter(|p| *p != node) {
            eventually(
                &format!("{peer} learns {cidr} of {node} from BIRD"),
                SETTLE_DEADLINE,
                || match learned_by(&lab, peer, node, &cidr)? {
                    true => Ok(()),
                    false => Err("not learned".into()),
                },
            );
        }
    }
    assert_pods_reach_each_other(&lab, &pods);
    for node in &nodes {
        let routes = lab.meshctl(node, "routes").unwrap();
        assert!(routes.get("unusable").is_none(), "{node}: {routes}");
    }

    // BIRD stops on nat11: its prefix goes from every peer, and its pod is
    // out of reach.
    let nat11 = bgp_pod_cidr(1).to_string();
    lab.stop("bird-nat11");
    for peer in nodes.iter().filter(|p| **p != "nat11") {
        eventually(
            &format!("{peer} forgets nat11's {nat11}"),
            SETTLE_DEADLINE,
            || match learned_by(&lab, peer, "nat11", &nat11)? {
                false if !kernel_routes(&lab, peer, &nat11) => Ok(()),
                _ => Err("still routed".into()),
            },
        );
    }
    let gone = lab.ping_address(&pod_machine("pub1"), IpAddr::V4(pods["nat11"].ip), &[]);
    assert!(gone.is_err(), "nat11's pod is reachable without a route");
}
