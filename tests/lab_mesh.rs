#![cfg(not(feature = "sim"))]
//! The real binaries in the NAT lab of `deploy/lab`: a rendezvous and meshd
//! on the lab's nodes, enrolled as `deploy/lab/demo` does it, reach each
//! other over the overlay, and each pair of nodes ends up on the path the
//! design promises for its NATs. Needs root.
//!
//! Every test builds its own lab with `deploy/lab/up` under its own
//! `LAB_PREFIX` (`mlm<pid>-<n>`, not the `mlt` of tests/lab_topology.rs nor
//! the `mt` of tests/common), with the daemons' state directories inside
//! its `LAB_DIR`; a guard runs `deploy/lab/down` when the test ends, failed
//! or not, after printing the daemons' logs if it failed. A run killed
//! before that is swept by the next. The helpers it shares with the
//! namespace tests (commands, polling, TCP transfers) are tests/common's.

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::thread;
use std::time::Duration;

use common::{
    assert_success, eventually_every, output, utf8, Amount, TcpTransfer, MESHCTL, MESHD,
    MESH_RENDEZVOUS,
};

// The lab's addresses, as deploy/lab/common.sh sets them.
const RENDEZVOUS: &str = "203.0.113.2:7443";
const NAT11_ADVERTISED: &str = "203.0.113.20:51820";
const LAN_SUBNET_PREFIX: &str = "192.168.50.";

/// Every node of the lab, in the order the demo enrols them.
const ALL_NODES: [&str; 8] = [
    "pub1", "pub2", "nat11", "cone", "sym1", "sym2", "lan1", "lan2",
];
/// Nodes anyone can reach unsolicited: public addresses, and the 1:1 NAT.
const REACHABLE: [&str; 3] = ["pub1", "pub2", "nat11"];

/// How long a daemon may take to come up.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a freshly started mesh may take to carry a packet between two
/// nodes (enrolment, peer lists, first handshake, on a loaded machine).
const REACH_DEADLINE: Duration = Duration::from_secs(60);
/// How long the paths may take to settle once every pair has talked:
/// hole punching, probes and the switch from relay to direct.
const SETTLE_DEADLINE: Duration = Duration::from_secs(90);
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The prefix of this file's namespaces.
const PREFIX: &str = "mlm";

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// One lab built by `deploy/lab/up`, with a rendezvous and meshd on some of
/// its nodes; dropping it stops them and runs `deploy/lab/down`.
struct MeshLab {
    prefix: String,
    dir: PathBuf,
    /// Daemons started here, by label ("rendezvous" or a node's name).
    daemons: RefCell<Vec<(String, Child)>>,
    /// The nodes running meshd and their overlay IPv4 addresses.
    overlay: BTreeMap<&'static str, Ipv4Addr>,
}

impl MeshLab {
    /// Builds a lab and starts a mesh of `nodes`, as `deploy/lab/demo` does:
    /// `mesh-rendezvous init` and `serve` on "rv", one token for all, then
    /// `meshd join` and `meshd run --state-dir` for every node.
    fn with_mesh_of(nodes: &[&'static str]) -> Self {
        require_root();
        SWEEP.call_once(sweep_leftovers);
        let prefix = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            LAB_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        // Guard first, so that a half-built lab is removed too.
        let mut lab = MeshLab {
            dir: std::env::temp_dir().join(&prefix),
            prefix,
            daemons: RefCell::new(Vec::new()),
            overlay: BTreeMap::new(),
        };
        let out = lab.script("up");
        assert_success(&out, "deploy/lab/up");
        fs::create_dir_all(&lab.dir).expect("create the lab directory");
        lab.start_rendezvous();
        let join = lab.create_token(nodes.len());
        for &node in nodes {
            lab.start_meshd(node, &join);
        }
        for &node in nodes {
            let ip = lab.wait_for_overlay_ip(node);
            lab.overlay.insert(node, ip);
        }
        lab
    }

    /// Runs `deploy/lab/<name>` on this lab.
    fn script(&self, name: &str) -> Output {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/lab")
            .join(name);
        Command::new(&path)
            .env("LAB_PREFIX", &self.prefix)
            .env("LAB_DIR", &self.dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()))
    }

    /// The namespace of a machine: "inet", "rv", a node or a router.
    fn ns(&self, machine: &str) -> String {
        format!("{}-{machine}", self.prefix)
    }

    fn state_dir(&self, machine: &str) -> PathBuf {
        self.dir.join(machine)
    }

    fn socket(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.sock"))
    }

    fn log_path(&self, label: &str) -> PathBuf {
        self.dir.join(format!("{label}.log"))
    }

    /// Starts `program args…` in `machine`'s namespace, its output in
    /// `<label>.log`. `ip netns exec` execs the program, so the child is
    /// the daemon itself.
    fn spawn(&mut self, machine: &str, label: &str, program: &str, args: &[&str]) {
        let log = File::create(self.log_path(label)).expect("create a log file");
        let err = log.try_clone().expect("clone a log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(machine), program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} in {machine}: {e}"));
        self.daemons.borrow_mut().push((label.to_owned(), child));
    }

    /// Panics, with its log, if the daemon `label` has exited.
    fn assert_running(&self, label: &str) {
        let exited = self
            .daemons
            .borrow_mut()
            .iter_mut()
            .find(|(l, _)| l == label)
            .unwrap_or_else(|| panic!("no daemon {label}"))
            .1
            .try_wait()
            .expect("wait for a daemon");
        // The borrow ends before the panic: the guard reads the logs.
        if let Some(status) = exited {
            panic!(
                "{label} exited unexpectedly with {status}; its log:\n{}",
                fs::read_to_string(self.log_path(label)).unwrap_or_default()
            );
        }
    }

    /// Panics, with its log, if any daemon of the lab has exited: a mesh
    /// that stopped answering because a daemon died says so.
    fn assert_all_running(&self) {
        let labels: Vec<String> = self
            .daemons
            .borrow()
            .iter()
            .map(|(l, _)| l.clone())
            .collect();
        for label in labels {
            self.assert_running(&label);
        }
    }

    fn start_rendezvous(&mut self) {
        let dir = self.state_dir("rv");
        let dir = utf8(&dir);
        let out = output(
            MESH_RENDEZVOUS,
            &[
                "--state-dir",
                dir,
                "init",
                "--listen",
                "0.0.0.0:7443",
                "--public-addr",
                RENDEZVOUS,
            ],
        );
        assert_success(&out, "mesh-rendezvous init");
        self.spawn(
            "rv",
            "rendezvous",
            MESH_RENDEZVOUS,
            &["--state-dir", dir, "serve"],
        );
        let admin = self.state_dir("rv").join("admin.sock");
        eventually(
            "mesh-rendezvous accepts on its admin socket",
            START_DEADLINE,
            || {
                self.assert_running("rendezvous");
                UnixStream::connect(&admin)
                    .map(drop)
                    .map_err(|e| format!("{}: {e}", admin.display()))
            },
        );
    }

    /// `mesh-rendezvous token create` for `uses` nodes: the arguments of
    /// the `meshd join` line it prints, after `meshd`.
    fn create_token(&self, uses: usize) -> Vec<String> {
        let dir = self.state_dir("rv");
        let uses = uses.to_string();
        let out = output(
            MESH_RENDEZVOUS,
            &[
                "--state-dir",
                utf8(&dir),
                "token",
                "create",
                "--ttl",
                "1h",
                "--uses",
                &uses,
            ],
        );
        assert_success(&out, "mesh-rendezvous token create");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.starts_with("meshd join "))
            .unwrap_or_else(|| panic!("`token create` prints a `meshd join` line: {stdout}"));
        line.split_whitespace().skip(1).map(str::to_owned).collect()
    }

    /// `meshd join` with the token's line, then `meshd run --state-dir`.
    fn start_meshd(&mut self, node: &str, join: &[String]) {
        let state_dir = self.state_dir(node);
        let socket = self.socket(node);
        let name = format!("node-{node}");
        let mut args: Vec<&str> = join.iter().map(String::as_str).collect();
        args.extend([
            "--state-dir",
            utf8(&state_dir),
            "--name",
            &name,
            "--socket",
            utf8(&socket),
        ]);
        // The 1:1-NAT node knows its public address but can't see it on a NIC.
        if node == "nat11" {
            args.extend(["--advertise-endpoint", NAT11_ADVERTISED]);
        }
        assert_success(
            &output(MESHD, &args),
            &format!("`meshd {}`", args.join(" ")),
        );
        // The env file goes into the lab too, never the host's /run/meshd.
        let env_file = self.dir.join(format!("{node}.env"));
        self.spawn(
            node,
            node,
            MESHD,
            &["run", "--state-dir", utf8(&state_dir), "--env-file", utf8(&env_file)],
        );
    }

    /// Waits until `node`'s meshd answers `meshctl status` with an overlay
    /// IPv4 address, and returns it.
    fn wait_for_overlay_ip(&mut self, node: &str) -> Ipv4Addr {
        eventually(
            &format!("meshd on {node} has an overlay address"),
            START_DEADLINE,
            || {
                self.assert_running(node);
                let status = self.meshctl(node, "status")?;
                status["overlay_ips"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|ip| ip.as_str()?.parse::<Ipv4Addr>().ok())
                    .next()
                    .ok_or_else(|| format!("no IPv4 overlay address in {status}"))
            },
        )
    }

    /// `meshctl --socket … <command> --json` for `node`, parsed.
    fn meshctl(&self, node: &str, command: &str) -> Result<serde_json::Value, String> {
        self.meshctl_with(node, &[command])
    }

    /// `meshctl --socket … <args…> --json` for `node`, parsed.
    fn meshctl_with(&self, node: &str, args: &[&str]) -> Result<serde_json::Value, String> {
        self.assert_all_running();
        let socket = self.socket(node);
        let mut all = vec!["--socket", utf8(&socket)];
        all.extend_from_slice(args);
        all.push("--json");
        let command = args.join(" ");
        let out = output(MESHCTL, &all);
        if !out.status.success() {
            return Err(format!(
                "meshctl {command} on {node} failed with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "meshctl {command} --json on {node} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// What `from` reports about its peer `to`: (path, endpoint).
    fn path(&self, from: &str, to: &str) -> Result<(String, Option<String>), String> {
        let peers = self.meshctl(from, "peers")?;
        let name = format!("node-{to}");
        let peer = peers
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name.as_str())
            .ok_or_else(|| format!("{from} does not list {name} among its peers"))?;
        let path = peer["path"]
            .as_str()
            .ok_or_else(|| format!("{from}'s peer {name} has no path: {peer}"))?;
        Ok((
            path.to_owned(),
            peer["endpoint"].as_str().map(str::to_owned),
        ))
    }

    /// Waits until `from` reports the path `expected` to `to`.
    fn wait_for_path(&self, from: &str, to: &str, expected: &str) {
        eventually(
            &format!("{from} reaches {to} over a {expected} path"),
            SETTLE_DEADLINE,
            || match self.path(from, to)? {
                (path, _) if path == expected => Ok(()),
                (path, endpoint) => Err(format!("path {path}, endpoint {endpoint:?}")),
            },
        );
    }

    fn overlay(&self, node: &str) -> Ipv4Addr {
        self.overlay[node]
    }

    /// One ping of `to`'s overlay address from `from`, with `extra` ping
    /// options; Err with ping's output when no answer came.
    fn ping_once(&self, from: &str, to: &str, extra: &[&str]) -> Result<(), String> {
        self.assert_all_running();
        let ip = self.overlay(to).to_string();
        let ns = self.ns(from);
        let mut args = vec!["netns", "exec", &ns, "ping", "-n", "-c", "1", "-W", "2"];
        args.extend_from_slice(extra);
        args.push(&ip);
        let out = output("ip", &args);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ping {from} -> {to} ({ip}) {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// A TCP connection from `from` to `to`'s overlay address carrying
    /// `amount` seeded pseudo-random bytes, hashed at both ends.
    fn tcp_transfer(&self, from: &str, to: &str, amount: Amount, seed: u64) -> TcpTransfer {
        let address = IpAddr::V4(self.overlay(to));
        let what = format!("{amount:?} over TCP from {from} to {to} ({address})");
        let (from, to) = (self.ns(from), self.ns(to));
        TcpTransfer::start(what, &from, &to, address, amount, seed, REACH_DEADLINE)
    }

    /// Runs `args` in `machine`'s namespace and asserts it succeeded.
    fn run_in(&self, machine: &str, args: &[&str]) {
        let ns = self.ns(machine);
        let mut all = vec!["netns", "exec", &ns];
        all.extend_from_slice(args);
        assert_success(&output("ip", &all), &format!("`{}` in {machine}", args.join(" ")));
    }

    /// Waits until `a` and `b` can ping each other over the overlay.
    fn wait_for_reach(&self, a: &str, b: &str) {
        for (from, to) in [(a, b), (b, a)] {
            eventually(
                &format!("{from} pings {to} over the overlay"),
                REACH_DEADLINE,
                || self.ping_once(from, to, &[]),
            );
        }
    }

    /// Waits until `a` and `b` both report the path `expected` to each other.
    fn wait_for_paths(&self, a: &str, b: &str, expected: &str) {
        self.wait_for_path(a, b, expected);
        self.wait_for_path(b, a, expected);
    }

    /// The last lines of every daemon's log.
    fn logs(&self) -> String {
        let mut all = String::new();
        for (label, _) in self.daemons.borrow().iter() {
            let log = fs::read_to_string(self.log_path(label)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            all.push_str(&format!("--- {label} (last {} lines)\n", tail.len()));
            for line in tail {
                all.push_str(line);
                all.push('\n');
            }
        }
        all
    }
}

impl Drop for MeshLab {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("lab {}: the daemons' logs\n{}", self.prefix, self.logs());
        }
        // `down` stops every daemon running on a state directory of this
        // lab and whatever else is left in its namespaces.
        let out = self.script("down");
        if !out.status.success() {
            eprintln!(
                "deploy/lab/down failed for {}: {}",
                self.prefix,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for (_, child) in self.daemons.get_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn every_node_reaches_every_other_and_each_pair_settles_on_its_expected_path() {
    let lab = MeshLab::with_mesh_of(&ALL_NODES);

    for from in ALL_NODES {
        for to in ALL_NODES.iter().copied().filter(|&to| to != from) {
            eventually(
                &format!("{from} pings {to} over the overlay"),
                REACH_DEADLINE,
                || lab.ping_once(from, to, &[]),
            );
        }
    }

    // Only what the design guarantees: anyone reaches a public or 1:1 node
    // directly; two symmetric NATs cannot punch through each other; two
    // nodes on one subnet talk over their private addresses. Cone and
    // symmetric nodes among themselves may end up either way.
    let expected = |a: &str, b: &str| -> Option<(&str, Option<&str>)> {
        if REACHABLE.contains(&a) || REACHABLE.contains(&b) {
            Some(("direct", None))
        } else if [a, b] == ["sym1", "sym2"] || [a, b] == ["sym2", "sym1"] {
            Some(("relay", None))
        } else if [a, b] == ["lan1", "lan2"] || [a, b] == ["lan2", "lan1"] {
            Some(("direct", Some(LAN_SUBNET_PREFIX)))
        } else {
            None
        }
    };
    eventually(
        "every pair settles on its expected path",
        SETTLE_DEADLINE,
        || {
            let mut wrong = Vec::new();
            for from in ALL_NODES {
                for to in ALL_NODES.iter().copied().filter(|&to| to != from) {
                    let Some((path, endpoint_prefix)) = expected(from, to) else {
                        continue;
                    };
                    match lab.path(from, to) {
                        Ok((got, endpoint))
                            if got == path
                                && endpoint_prefix.is_none_or(|prefix| {
                                    endpoint.as_deref().is_some_and(|e| e.starts_with(prefix))
                                }) => {}
                        Ok((got, endpoint)) => wrong.push(format!(
                            "{from} -> {to}: {got} via {endpoint:?}, expected {path}{}",
                            endpoint_prefix.map_or(String::new(), |p| format!(" via {p}x"))
                        )),
                        Err(e) => wrong.push(e),
                    }
                }
            }
            if wrong.is_empty() {
                Ok(())
            } else {
                Err(wrong.join("; "))
            }
        },
    );

    // Each node tells its NAT from where the others see it, and a relayed
    // pair says why it is relayed in the words of both sides' NATs.
    for (node, nat) in [
        ("pub1", "none"),
        ("sym1", "endpoint_dependent"),
        ("sym2", "endpoint_dependent"),
    ] {
        eventually(&format!("{node} knows its NAT is {nat}"), SETTLE_DEADLINE, || {
            let status = lab.meshctl(node, "status")?;
            match status["nat"].as_str() {
                Some(got) if got == nat => Ok(()),
                got => Err(format!("nat {got:?} in {status}")),
            }
        });
    }
    eventually("sym1 says why sym2 is relayed", SETTLE_DEADLINE, || {
        let peers = lab.meshctl("sym1", "peers")?;
        let sym2 = peers
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == "node-sym2")
            .ok_or("sym1 does not list sym2")?;
        match sym2["relay_reason"].as_str() {
            Some(r) if r.starts_with("both sides are behind endpoint-dependent (symmetric) NAT") => Ok(()),
            other => Err(format!("relay_reason {other:?}")),
        }
    });
}

#[test]
fn a_transfer_through_the_relay_arrives_intact() {
    let lab = MeshLab::with_mesh_of(&["sym1", "sym2"]);
    eventually("sym1 pings sym2 over the overlay", REACH_DEADLINE, || {
        lab.ping_once("sym1", "sym2", &[])
    });
    lab.wait_for_path("sym1", "sym2", "relay");
    lab.wait_for_path("sym2", "sym1", "relay");

    assert_tcp_transfer(&lab, "sym1", "sym2", 20_000_000, 0x5eed_0001);

    let (path, _) = lab.path("sym1", "sym2").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(path, "relay", "the transfer went through the relay");
}

#[test]
fn a_full_size_ping_with_df_passes_direct_and_relayed() {
    let lab = MeshLab::with_mesh_of(&["pub1", "pub2", "sym1", "sym2"]);
    // 1352 bytes of payload + 8 of ICMP + 20 of IPv4: 1380, mesh0's MTU.
    let full_size = ["-M", "do", "-s", "1352"];

    for (from, to, path) in [("pub1", "pub2", "direct"), ("sym1", "sym2", "relay")] {
        eventually(
            &format!("{from} pings {to} over the overlay"),
            REACH_DEADLINE,
            || lab.ping_once(from, to, &[]),
        );
        lab.wait_for_path(from, to, path);
        eventually(
            &format!("a 1380-byte ping with DF from {from} to {to} over the {path} path"),
            REACH_DEADLINE,
            || lab.ping_once(from, to, &full_size),
        );
        // meshctl ping answers over the same path, by name.
        let name = format!("node-{to}");
        eventually(&format!("meshctl ping {name} on {from} answers via {path}"), REACH_DEADLINE, || {
            let pong = lab.meshctl_with(from, &["ping", &name, "-c", "1"])?;
            match pong["path"].as_str() {
                Some(got) if got == path && pong["rtt_ms"].as_f64().is_some() => Ok(()),
                _ => Err(format!("{pong}")),
            }
        });
    }
}

#[test]
fn netcheck_tells_a_cone_nat_from_a_symmetric_one() {
    let lab = MeshLab::with_mesh_of(&["cone", "sym1"]);
    for (node, mapping, punching) in [
        ("cone", "endpoint_independent", "likely"),
        ("sym1", "endpoint_dependent", "unlikely"),
    ] {
        eventually(&format!("netcheck on {node} finds {mapping}"), REACH_DEADLINE, || {
            let report = lab.meshctl(node, "netcheck")?;
            match (report["mapping"].as_str(), report["hole_punching"].as_str()) {
                (Some(m), Some(p)) if m == mapping && p == punching => Ok(()),
                _ => Err(format!("{report}")),
            }
        });
    }
}

#[test]
fn meshctl_ping_of_an_unknown_peer_fails_with_one_clear_line() {
    let lab = MeshLab::with_mesh_of(&["pub1"]);
    let socket = lab.socket("pub1");
    let out = output(MESHCTL, &["--socket", utf8(&socket), "ping", "node-nowhere", "-c", "1"]);
    assert!(!out.status.success(), "exit status {}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no peer matches 'node-nowhere'"), "{stderr}");
}

#[test]
fn blocking_the_direct_path_moves_a_pair_to_the_relay_and_back_without_breaking_tcp() {
    let lab = MeshLab::with_mesh_of(&["pub1", "pub2"]);
    lab.wait_for_reach("pub1", "pub2");
    lab.wait_for_paths("pub1", "pub2", "direct");
    let transfer = lab.tcp_transfer("pub1", "pub2", Amount::Paced(16 << 10), 0x5eed_0002);
    let moving = |what: &str, since: usize| {
        eventually(what, REACH_DEADLINE, || match transfer.received() {
            now if now > since => Ok(now),
            now => Err(format!("{now} bytes so far")),
        })
    };
    let before = moving("the transfer is under way on the direct path", 0);

    // A firewall between the two, in both directions, for their WireGuard
    // port only: the rendezvous and so the relay stay reachable.
    let pub2 = "203.0.113.12";
    let block = |action: &str| {
        for rule in [["INPUT", "-s"], ["OUTPUT", "-d"]] {
            lab.run_in(
                "pub1",
                &["iptables", action, rule[0], rule[1], pub2, "-p", "udp", "-j", "DROP"],
            );
        }
    };
    block("-I");
    lab.wait_for_paths("pub1", "pub2", "relay");
    let relayed = moving("the transfer carries on over the relay", before);
    lab.ping_once("pub2", "pub1", &[])
        .unwrap_or_else(|e| panic!("pings pass over the relay: {e}"));

    block("-D");
    lab.wait_for_paths("pub1", "pub2", "direct");
    moving("the transfer carries on over the direct path again", relayed);

    let sent = transfer.finish();
    assert!(sent > relayed, "{sent} bytes sent, {relayed} before the return");
}

#[test]
fn a_flushed_nat_mapping_recovers() {
    let lab = MeshLab::with_mesh_of(&["pub1", "cone", "sym1"]);
    for node in ["cone", "sym1"] {
        lab.wait_for_reach(node, "pub1");
        lab.wait_for_paths(node, "pub1", "direct");
    }
    let old_endpoint = |node: &str| lab.path("pub1", node).unwrap_or_else(|e| panic!("{e}")).1;
    let sym1_before = old_endpoint("sym1");

    // Every mapping of both routers is gone at once, as after a router
    // reboot: packets from pub1 to the old public ports now die at the
    // router, and the symmetric NAT picks a new random port.
    for router in ["r-cone", "r-sym1"] {
        lab.run_in(router, &["conntrack", "-F"]);
    }

    for node in ["cone", "sym1"] {
        lab.wait_for_reach("pub1", node);
        lab.wait_for_paths(node, "pub1", "direct");
    }
    eventually(
        "pub1 follows sym1 to its new public port",
        SETTLE_DEADLINE,
        || match lab.path("pub1", "sym1")? {
            (path, endpoint) if path == "direct" && endpoint != sym1_before => Ok(()),
            (path, endpoint) => Err(format!("{path} via {endpoint:?}, before {sym1_before:?}")),
        },
    );
}

/// Sends `len` seeded pseudo-random bytes over TCP from node `from` to
/// node `to`'s overlay address and asserts that exactly those bytes arrive.
fn assert_tcp_transfer(lab: &MeshLab, from: &str, to: &str, len: usize, seed: u64) {
    let transfer = lab.tcp_transfer(from, to, Amount::Bytes(len), seed);
    assert_eq!(transfer.finish(), len, "the sender sent everything");
}

/// [`common::eventually`], trying again every [`POLL_INTERVAL`] of this
/// file's (a lab runs many daemons; it is polled less often).
fn eventually<T>(what: &str, within: Duration, attempt: impl FnMut() -> Result<T, String>) -> T {
    eventually_every(what, within, POLL_INTERVAL, attempt)
}

/// Panics unless the tests run as root: the lab is not optional.
fn require_root() {
    // SAFETY: geteuid has no preconditions and always succeeds.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "needs root: the NAT lab is built of network namespaces (run `sudo -E cargo test`)"
    );
}

fn namespace_names() -> Vec<String> {
    let out = output("ip", &["netns", "list"]);
    assert_success(&out, "ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Removes the namespaces of earlier runs of this file whose test process
/// is gone (killed before its guards could run `deploy/lab/down`).
fn sweep_leftovers() {
    for name in namespace_names() {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        if !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}
