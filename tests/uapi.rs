#![cfg(not(feature = "sim"))]
//! meshd answers WireGuard's cross-platform userspace API, so `wg show`,
//! `wg showconf` and exporters that speak it work on its interface; `wg
//! set` is refused, and so is garbage, without harming the daemon. Needs
//! root, `iputils-ping` and `wireguard-tools`.
//!
//! `wg` finds a userspace interface by name in `/var/run/wireguard`, a
//! directory shared by every namespace, so each meshd here gets an
//! interface name of its own (named like the lab's wireguard-go
//! interfaces, whose leftovers the lab sweeps).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod common;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use common::{
    assert_success, eventually, Lab, MeshdFiles, Node, DEADLINE, LISTEN_PORT, MESH_PREFIX_LEN, MTU,
};

const WG_DIR: &str = "/var/run/wireguard";
/// No read from a UAPI socket may block longer than this.
const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// A meshd interface name no other test uses: `mtw<pid>-<lab><node>`.
fn unique_iface(node: &Node) -> String {
    let suffix = node
        .ns
        .strip_prefix("mt")
        .expect("lab namespaces start with mt");
    let iface = format!("mtw{suffix}");
    assert!(
        iface.len() <= 15,
        "interface name {iface} is longer than 15 characters"
    );
    iface
}

/// A static config for node `i` peering with `peers`, on interface
/// `iface`, with its UAPI socket in `uapi_dir` (default: where wg looks).
fn write_config(
    lab: &Lab,
    i: usize,
    peers: &[usize],
    iface: &str,
    uapi_dir: Option<&Path>,
) -> MeshdFiles {
    let node = lab.node(i);
    let key_file = lab.dir().join(format!("{}.key", node.name));
    common::write_private_key(&key_file, &node.key.private);
    let socket = lab.dir().join(format!("{}.sock", node.name));
    let mut toml = format!(
        "private-key-file = {key_file:?}\n\
         listen-port = {LISTEN_PORT}\n\
         interface = \"{iface}\"\n\
         address = \"{}/{MESH_PREFIX_LEN}\"\n\
         mtu = {MTU}\n\
         socket = {socket:?}\n",
        node.overlay
    );
    if let Some(dir) = uapi_dir {
        writeln!(toml, "uapi-dir = {dir:?}").expect("format into a String");
    }
    for &p in peers {
        let peer = lab.node(p);
        write!(
            toml,
            "\n[[peer]]\npublic-key = \"{}\"\nendpoint = \"{}\"\nallowed-ips = [\"{}/32\"]\n",
            peer.key.public,
            peer.endpoint(),
            peer.overlay
        )
        .expect("format into a String");
    }
    let config = lab.dir().join(format!("{}.toml", node.name));
    std::fs::write(&config, toml).expect("write a meshd config");
    MeshdFiles { config, socket }
}

/// `wg <args…>` inside `node`'s namespace, which must succeed; its stdout.
fn wg(node: &Node, args: &[&str]) -> String {
    let out = node.exec("wg", args);
    assert_success(
        &out,
        &format!("`wg {}` on node {}", args.join(" "), node.name),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One peer line of `wg show <iface> dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DumpPeer {
    public_key: String,
    preshared_key: String,
    endpoint: String,
    allowed_ips: String,
    latest_handshake: u64,
    rx: u64,
    tx: u64,
    keepalive: String,
}

/// `wg show <iface> dump`: the interface's fields, then one entry per peer.
fn dump(node: &Node, iface: &str) -> (Vec<String>, Vec<DumpPeer>) {
    let text = wg(node, &["show", iface, "dump"]);
    let mut lines = text.lines();
    let interface: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split('\t')
        .map(str::to_owned)
        .collect();
    let number = |field: &str| {
        field
            .parse::<u64>()
            .unwrap_or_else(|e| panic!("{field:?} in {text}: {e}"))
    };
    let peers = lines
        .map(|line| match line.split('\t').collect::<Vec<_>>()[..] {
            [public_key, preshared_key, endpoint, allowed_ips, handshake, rx, tx, keepalive] => {
                DumpPeer {
                    public_key: public_key.into(),
                    preshared_key: preshared_key.into(),
                    endpoint: endpoint.into(),
                    allowed_ips: allowed_ips.into(),
                    latest_handshake: number(handshake),
                    rx: number(rx),
                    tx: number(tx),
                    keepalive: keepalive.into(),
                }
            }
            _ => panic!("a peer line of `wg show {iface} dump` has 8 fields: {line:?}"),
        })
        .collect();
    (interface, peers)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn hex_of_base64(key: &str) -> String {
    BASE64
        .decode(key)
        .expect("a base64 key")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn wg_show_lists_meshd_peers_with_keys_endpoints_allowed_ips_and_growing_counters() {
    let started = unix_now();
    let lab = Lab::new(2);
    let (a, b) = (lab.node(0), lab.node(1));
    let (iface_a, iface_b) = (unique_iface(a), unique_iface(b));
    let mut meshd_a = lab.start_meshd(0, &write_config(&lab, 0, &[1], &iface_a, None));
    let _meshd_b = lab.start_meshd(1, &write_config(&lab, 1, &[0], &iface_b, None));
    let socket_a = PathBuf::from(WG_DIR).join(format!("{iface_a}.sock"));
    let mode = std::fs::metadata(&socket_a)
        .expect("meshd creates its UAPI socket")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "{} is for root only",
        socket_a.display()
    );

    a.pings(b.overlay);
    let (interface, peers) = dump(a, &iface_a);
    assert_eq!(
        interface,
        [
            a.key.private.as_str(),
            a.key.public.as_str(),
            "51820",
            "off"
        ],
        "the interface line of `wg show {iface_a} dump` is node a's key pair, port and no fwmark"
    );
    let [peer_b] = &peers[..] else {
        panic!("`wg show {iface_a} dump` lists node b alone: {peers:#?}")
    };
    assert_eq!(peer_b.public_key, b.key.public);
    assert_eq!(peer_b.preshared_key, "(none)");
    assert_eq!(peer_b.endpoint, b.endpoint().to_string());
    assert_eq!(peer_b.allowed_ips, format!("{}/32", b.overlay));
    assert_eq!(peer_b.keepalive, "off");
    assert!(
        (started..=unix_now()).contains(&peer_b.latest_handshake),
        "the handshake happened during this test (unix time {started}..): {peer_b:?}"
    );

    a.pings(b.overlay);
    let grown = eventually(
        "the transfer counters of node b grow after a ping",
        DEADLINE,
        || {
            let (_, peers) = dump(a, &iface_a);
            match &peers[..] {
                [now] if now.rx > peer_b.rx && now.tx > peer_b.tx => Ok(now.clone()),
                _ => Err(format!("before the ping {peer_b:?}, now {peers:?}")),
            }
        },
    );
    assert_eq!(grown.public_key, b.key.public);

    let (_, peers_of_b) = dump(b, &iface_b);
    assert!(
        peers_of_b
            .iter()
            .any(|p| p.public_key == a.key.public && p.rx > 0 && p.tx > 0),
        "node b's meshd lists node a with traffic: {peers_of_b:#?}"
    );

    let show = wg(a, &["show", &iface_a]);
    for expected in [
        format!("interface: {iface_a}"),
        format!("public key: {}", a.key.public),
        "listening port: 51820".to_owned(),
        format!("peer: {}", b.key.public),
        format!("endpoint: {}", b.endpoint()),
        format!("allowed ips: {}/32", b.overlay),
        "latest handshake: ".to_owned(),
        "transfer: ".to_owned(),
    ] {
        assert!(
            show.contains(&expected),
            "`wg show {iface_a}` shows {expected:?}:\n{show}"
        );
    }
    let conf = wg(a, &["showconf", &iface_a]);
    for expected in [
        "[Interface]".to_owned(),
        "ListenPort = 51820".to_owned(),
        format!("PrivateKey = {}", a.key.private),
        "[Peer]".to_owned(),
        format!("PublicKey = {}", b.key.public),
        format!("AllowedIPs = {}/32", b.overlay),
        format!("Endpoint = {}", b.endpoint()),
    ] {
        assert!(
            conf.lines().any(|l| l == expected),
            "`wg showconf {iface_a}` has {expected:?}:\n{conf}"
        );
    }

    let set = a.exec("wg", &["set", &iface_a, "listen-port", "51821"]);
    assert!(!set.status.success(), "`wg set` on meshd's interface fails");
    let stderr = String::from_utf8_lossy(&set.stderr);
    assert!(
        stderr.contains("Operation not supported"),
        "`wg set` says why it failed: {stderr}"
    );
    assert_eq!(
        wg(a, &["show", &iface_a, "listen-port"]).trim(),
        "51820",
        "the refused set changed nothing"
    );

    let status = meshd_a.daemon.terminate();
    assert!(
        status.success(),
        "meshd exits 0 after SIGTERM, not {status}"
    );
    assert!(
        !socket_a.exists(),
        "meshd removes {} when it exits",
        socket_a.display()
    );
}

/// A client of the raw UAPI socket.
fn connect(path: &Path) -> UnixStream {
    let stream =
        UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .expect("set a read timeout");
    stream
}

/// Whether `reply` is complete: its last line is `errno=…`, then an empty line.
fn is_complete(reply: &[u8]) -> bool {
    reply.ends_with(b"\n\n")
        && reply
            .split(|&b| b == b'\n')
            .rev()
            .nth(2)
            .is_some_and(|l| l.starts_with(b"errno="))
}

/// Reads one reply, byte by byte so as not to read past it.
fn read_reply(stream: &mut UnixStream) -> String {
    let mut reply = Vec::new();
    let mut byte = [0u8];
    while !is_complete(&reply) {
        match stream.read(&mut byte) {
            Ok(1) => reply.push(byte[0]),
            Ok(_) => panic!(
                "the connection closed before a complete reply: {:?}",
                String::from_utf8_lossy(&reply)
            ),
            Err(e) => panic!(
                "reading a reply: {e}; so far {:?}",
                String::from_utf8_lossy(&reply)
            ),
        }
    }
    String::from_utf8(reply).expect("a UTF-8 reply")
}

/// Sends one whole request, as wg does, and returns the reply.
fn request(path: &Path, request: &[u8]) -> String {
    let mut stream = connect(path);
    stream.write_all(request).expect("send a request");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("end the request stream");
    read_reply(&mut stream)
}

/// Sends `request` and keeps the connection open; returns the reply and
/// whether meshd then closed the connection (a reset counts: meshd left
/// part of the request unread).
fn refused(path: &Path, request: &[u8]) -> (String, bool) {
    let mut stream = connect(path);
    stream.write_all(request).expect("send a request");
    let reply = read_reply(&mut stream);
    let mut rest = Vec::new();
    let closed = match stream.read_to_end(&mut rest) {
        Ok(_) => rest.is_empty(),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    (reply, closed)
}

#[test]
fn the_wireguard_socket_refuses_set_and_garbage_and_keeps_answering() {
    let lab = Lab::new(2);
    let (a, b) = (lab.node(0), lab.node(1));
    let iface = unique_iface(a);
    let dir = lab.dir().join("wireguard");
    std::fs::create_dir(&dir).expect("create the UAPI directory");
    let path = dir.join(format!("{iface}.sock"));
    // A crashed process's socket: nobody accepts on it any more.
    drop(UnixListener::bind(&path).expect("bind a stale socket"));

    let mut meshd = lab.start_meshd(0, &write_config(&lab, 0, &[1], &iface, Some(&dir)));

    let get = format!(
        "private_key={}\nlisten_port=51820\npublic_key={}\n",
        hex_of_base64(&a.key.private),
        hex_of_base64(&b.key.public)
    );
    let reply = request(&path, b"get=1\n\n");
    assert!(
        reply.starts_with(&get),
        "get answers with node a's key, port and peer b:\n{reply}"
    );
    assert!(reply.ends_with("\nerrno=0\n\n"), "{reply}");

    let mut stream = connect(&path);
    stream
        .write_all(b"set=1\nlisten_port=1\nreplace_peers=true\n\n")
        .expect("send a set");
    assert_eq!(
        read_reply(&mut stream),
        format!("errno=-{}\n\n", libc::EOPNOTSUPP),
        "set is refused"
    );
    stream
        .write_all(b"get=1\n\n")
        .expect("send a get after the set");
    let reply = read_reply(&mut stream);
    assert!(
        reply.starts_with(&get) && reply.ends_with("\nerrno=0\n\n"),
        "the connection still answers: {reply}"
    );

    let long_line = "a".repeat(16 * 1024);
    for (what, garbage, errno) in [
        ("an unknown operation", "hello\n".to_owned(), libc::EPROTO),
        (
            "a get not followed by an empty line",
            "get=1\nget=1\n".to_owned(),
            libc::EINVAL,
        ),
        (
            "a line longer than any request line",
            long_line.clone(),
            libc::EMSGSIZE,
        ),
        (
            "a set whose line never ends",
            format!("set=1\nprivate_key={long_line}"),
            libc::EMSGSIZE,
        ),
    ] {
        let (reply, closed) = refused(&path, garbage.as_bytes());
        assert_eq!(reply, format!("errno=-{errno}\n\n"), "the reply to {what}");
        assert!(closed, "meshd closes the connection after {what}");
    }

    let reply = request(&path, b"get=1\n\n");
    assert!(
        reply.starts_with(&get),
        "meshd still answers after the garbage:\n{reply}"
    );
    meshd.daemon.assert_running();
    let status = meshd.daemon.terminate();
    assert!(
        status.success(),
        "meshd exits 0 after SIGTERM, not {status}"
    );
    assert!(
        !path.exists(),
        "meshd removes {} when it exits",
        path.display()
    );
}
