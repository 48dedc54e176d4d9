#![cfg(not(feature = "sim"))]
//! The NAT lab of `deploy/lab` behaves as DESIGN.md says: each kind of NAT
//! maps and filters like its name, the 1:1 NAT forwards unsolicited traffic,
//! the two LAN nodes share a subnet, every node reaches the rendezvous, and
//! `deploy/lab/down` leaves nothing behind. No meshd here: plain UDP sockets
//! opened inside the lab's namespaces. Needs root.
//!
//! Every test builds its own lab with the real scripts under its own
//! `LAB_PREFIX` (`mlt<pid>-<n>`), so the tests run in parallel and never
//! touch the demo's lab (`mlab`). A guard runs `deploy/lab/down` when the
//! test ends, failed or not; a run killed before that is swept by the next.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::thread;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};

// The lab's addresses, as deploy/lab/common.sh sets them.
const RENDEZVOUS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const RENDEZVOUS_PORT: u16 = 7443;
const PUB1: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
const PUB2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 12);
const NAT11_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const NAT11_PRIVATE: Ipv4Addr = Ipv4Addr::new(10, 11, 0, 2);
const CONE_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 30);
const SYM1_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 41);
const SYM2_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 42);
const LAN_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 50);
const LAN1: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 11);
const LAN2: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 12);

/// Every node of the lab and the address the internet sees it as.
const NODES: [(&str, Ipv4Addr); 8] = [
    ("pub1", PUB1),
    ("pub2", PUB2),
    ("nat11", NAT11_PUBLIC),
    ("cone", CONE_PUBLIC),
    ("sym1", SYM1_PUBLIC),
    ("sym2", SYM2_PUBLIC),
    ("lan1", LAN_PUBLIC),
    ("lan2", LAN_PUBLIC),
];

/// The port nodes send from, and the ports public hosts listen on.
const NODE_PORT: u16 = 5000;
const PORT_A: u16 = 4000;
const PORT_B: u16 = 4001;

/// How long a datagram that should arrive may take (a loaded machine, the
/// first packet of each hop waiting for ARP).
const DEADLINE: Duration = Duration::from_secs(10);

/// The prefix of this file's namespaces: not `mt`, which tests/common sweeps.
const PREFIX: &str = "mlt";

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// One lab built by `deploy/lab/up`; dropping it runs `deploy/lab/down`.
struct NatLab {
    prefix: String,
    dir: PathBuf,
    is_up: bool,
}

impl NatLab {
    fn up() -> Self {
        require_root();
        SWEEP.call_once(sweep_leftovers);
        let prefix = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            LAB_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        // Guard first, so that a half-built lab is removed too.
        let lab = NatLab {
            dir: std::env::temp_dir().join(&prefix),
            prefix,
            is_up: true,
        };
        let out = lab.script("up");
        assert_success(&out, "deploy/lab/up");
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

    fn down(&mut self) -> Output {
        self.is_up = false;
        self.script("down")
    }

    /// The namespace of a machine: "inet", "rv", a node or a router.
    fn ns(&self, machine: &str) -> String {
        format!("{}-{machine}", self.prefix)
    }

    /// Names of the namespaces of this lab that exist now.
    fn namespaces(&self) -> Vec<String> {
        let mine = format!("{}-", self.prefix);
        namespace_names()
            .into_iter()
            .filter(|name| name.starts_with(&mine))
            .collect()
    }

    /// A UDP socket on `0.0.0.0:port` inside `machine`'s namespace. It
    /// stays in that namespace whichever thread uses it afterwards.
    fn socket(&self, machine: &str, port: u16) -> UdpSocket {
        let ns = self.ns(machine);
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
    fn addresses(&self, machine: &str) -> Vec<Ipv4Addr> {
        let out = run("ip", &["-n", &self.ns(machine), "-o", "-4", "addr", "show"]);
        // "2: eth0    inet 10.11.0.2/24 brd … scope global eth0"
        out.lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                words.find(|w| *w == "inet")?;
                words.next()?.split('/').next()?.parse().ok()
            })
            .collect()
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        if self.is_up {
            let out = self.down();
            if !out.status.success() {
                eprintln!(
                    "deploy/lab/down failed for {}: {}",
                    self.prefix,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
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
    let lab = NatLab::up();
    let node = lab.socket("cone", NODE_PORT);
    let pub1_a = lab.socket("pub1", PORT_A);
    let pub1_b = lab.socket("pub1", PORT_B);
    let pub2_a = lab.socket("pub2", PORT_A);

    send(&node, "to pub1:a", v4(PUB1, PORT_A));
    send(&node, "to pub1:b", v4(PUB1, PORT_B));
    send(&node, "to pub2:a", v4(PUB2, PORT_A));
    let seen = [
        receive_exactly(&pub1_a, "to pub1:a", "cone -> pub1:a"),
        receive_exactly(&pub1_b, "to pub1:b", "cone -> pub1:b"),
        receive_exactly(&pub2_a, "to pub2:a", "cone -> pub2:a"),
    ];

    assert_eq!(
        seen[0].ip(),
        CONE_PUBLIC,
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
    let lab = NatLab::up();
    let node = lab.socket("cone", NODE_PORT);
    let pub1_a = lab.socket("pub1", PORT_A);
    let pub1_b = lab.socket("pub1", PORT_B);
    let pub2_a = lab.socket("pub2", PORT_A);

    send(&node, "hello", v4(PUB1, PORT_A));
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
    let lab = NatLab::up();
    let pub1_a = lab.socket("pub1", PORT_A);
    let pub1_b = lab.socket("pub1", PORT_B);
    let pub2_a = lab.socket("pub2", PORT_A);

    for (node_name, public) in [("sym1", SYM1_PUBLIC), ("sym2", SYM2_PUBLIC)] {
        let node = lab.socket(node_name, NODE_PORT);
        send(&node, "to pub1:a", v4(PUB1, PORT_A));
        send(&node, "to pub1:b", v4(PUB1, PORT_B));
        send(&node, "to pub2:a", v4(PUB2, PORT_A));
        let seen = [
            receive_exactly(&pub1_a, "to pub1:a", &format!("{node_name} -> pub1:a")),
            receive_exactly(&pub1_b, "to pub1:b", &format!("{node_name} -> pub1:b")),
            receive_exactly(&pub2_a, "to pub2:a", &format!("{node_name} -> pub2:a")),
        ];

        assert!(
            seen.iter().all(|s| s.ip() == public),
            "{node_name} is seen as its router {public}, but was seen as {seen:?}"
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
    let lab = NatLab::up();
    let node = lab.socket("nat11", NODE_PORT);
    let pub1_a = lab.socket("pub1", PORT_A);
    let pub2_a = lab.socket("pub2", PORT_A);

    let addresses = lab.addresses("nat11");
    assert!(
        addresses.contains(&NAT11_PRIVATE) && !addresses.contains(&NAT11_PUBLIC),
        "the 1:1 NAT node has only its private address {NAT11_PRIVATE}, not the \
         public {NAT11_PUBLIC}, on its interfaces; it has {addresses:?}"
    );

    send(&pub1_a, "unsolicited", v4(NAT11_PUBLIC, NODE_PORT));
    let (_, from) = receive(&node, "pub1 -> the 1:1 public address");
    assert_eq!(
        from,
        SocketAddr::from(v4(PUB1, PORT_A)),
        "the node sees the sender as it is"
    );
    send(&node, "reply", from);
    let (_, reply_from) = receive(&pub1_a, "the 1:1 node's reply");
    assert_eq!(
        reply_from,
        SocketAddr::from(v4(NAT11_PUBLIC, NODE_PORT)),
        "the reply comes from the public address and the node's own port"
    );

    // The node speaking first is seen the same way by anyone.
    send(&node, "hello", v4(PUB2, PORT_A));
    let (_, seen) = receive(&pub2_a, "1:1 node -> pub2");
    assert_eq!(seen, SocketAddr::from(v4(NAT11_PUBLIC, NODE_PORT)));
}

#[test]
fn nodes_behind_a_nat_are_unreachable_unsolicited() {
    let lab = NatLab::up();
    let pub1_a = lab.socket("pub1", PORT_A);
    let pub1_b = lab.socket("pub1", PORT_B);

    for (node_name, public) in [
        ("cone", CONE_PUBLIC),
        ("sym1", SYM1_PUBLIC),
        ("lan1", LAN_PUBLIC),
    ] {
        // The node listens, but has sent nothing: there is no mapping yet.
        let node = lab.socket(node_name, NODE_PORT);
        let what = format!("unsolicited pub1 -> {node_name}'s router {public}");
        assert_kept_by_the_router(&pub1_b, v4(public, NODE_PORT), &what);
        assert_kept_by_the_router(&pub1_b, v4(public, 51820), &what);

        // The node's own traffic opens the way back: the first thing it
        // receives is the answer, not the datagrams sent before.
        send(&node, "hello", v4(PUB1, PORT_A));
        let (_, mapped) = receive(&pub1_a, &format!("{node_name} -> pub1"));
        send(&pub1_a, "reply", mapped);
        receive_exactly(&node, "reply", &format!("pub1's reply to {node_name}"));
    }
}

#[test]
fn the_two_lan_nodes_reach_each_other_on_their_private_subnet() {
    let lab = NatLab::up();
    let lan1 = lab.socket("lan1", NODE_PORT);
    let lan2 = lab.socket("lan2", NODE_PORT);

    send(&lan1, "from lan1", v4(LAN2, NODE_PORT));
    let (_, from) = receive(&lan2, "lan1 -> lan2");
    assert_eq!(
        from,
        SocketAddr::from(v4(LAN1, NODE_PORT)),
        "no NAT between lan1 and lan2"
    );
    send(&lan2, "from lan2", v4(LAN1, NODE_PORT));
    let (_, from) = receive(&lan1, "lan2 -> lan1");
    assert_eq!(from, SocketAddr::from(v4(LAN2, NODE_PORT)));
}

#[test]
fn the_two_lan_nodes_share_one_public_address() {
    let lab = NatLab::up();
    let lan1 = lab.socket("lan1", NODE_PORT);
    let lan2 = lab.socket("lan2", NODE_PORT);
    let pub1_a = lab.socket("pub1", PORT_A);

    send(&lan1, "from lan1", v4(PUB1, PORT_A));
    let seen1 = receive_exactly(&pub1_a, "from lan1", "lan1 -> pub1");
    send(&lan2, "from lan2", v4(PUB1, PORT_A));
    let seen2 = receive_exactly(&pub1_a, "from lan2", "lan2 -> pub1");

    assert_eq!(seen1.ip(), LAN_PUBLIC);
    assert_eq!(seen2.ip(), LAN_PUBLIC);
    // Same private port, same destination: the router must pick another
    // public port for the second node.
    assert_ne!(seen1.port(), seen2.port(), "two flows, two public ports");
}

#[test]
fn every_node_reaches_the_rendezvous_and_hears_its_answer() {
    let lab = NatLab::up();
    let rendezvous = lab.socket("rv", RENDEZVOUS_PORT);

    for (node_name, public) in NODES {
        let node = lab.socket(node_name, 51820);
        send(&node, node_name, v4(RENDEZVOUS, RENDEZVOUS_PORT));
        let from = receive_exactly(
            &rendezvous,
            node_name,
            &format!("{node_name} -> rendezvous"),
        );
        assert_eq!(
            from.ip(),
            public,
            "the rendezvous sees {node_name} as {public}"
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
    let lab = NatLab::up();
    let before = lab.namespaces();

    let again = lab.script("up");

    assert!(!again.status.success(), "a second up fails");
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already up"), "and says why, not: {stderr}");
    assert_eq!(lab.namespaces(), before, "and leaves the lab as it was");
}

#[test]
fn down_removes_every_namespace() {
    let mut lab = NatLab::up();
    assert_eq!(
        lab.namespaces().len(),
        15,
        "inet, rv, 8 nodes, 5 routers: {:?}",
        lab.namespaces()
    );
    fs::create_dir_all(&lab.dir).expect("create the lab directory");

    let out = lab.down();

    assert_success(&out, "deploy/lab/down");
    assert_eq!(
        lab.namespaces(),
        Vec::<String>::new(),
        "no namespace is left"
    );
    assert!(!lab.dir.exists(), "{} is removed", lab.dir.display());
    assert_success(&lab.script("down"), "a second deploy/lab/down");
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

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{program}`: {e}"));
    assert_success(&out, &format!("{program} {}", args.join(" ")));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn namespace_names() -> Vec<String> {
    run("ip", &["netns", "list"])
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
