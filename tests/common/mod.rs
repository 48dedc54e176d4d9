//! Harness for the integration tests that run the real binaries: the one
//! place the tests build networks, in two shapes.
//!
//! - [`Lab`] (this module): a few bare namespaces on one link, for tests of
//!   one feature between two or three nodes.
//! - [`lab::MeshLab`] and [`lab::NatLab`]: the NAT lab of `deploy/lab`, built
//!   by its own scripts, whose machines and addresses the tests read from
//!   `deploy/lab/topology` ([`topology`]).
//!
//! A [`Lab`] is a throwaway set of network namespaces joined by veth pairs.
//! It owns everything it creates: its `Drop` stops the processes still
//! running in it, prints their logs when the test is failing, and deletes
//! the namespaces, so a failing test leaves nothing behind. Processes are
//! started through the lab and end before it (they borrow it).
//!
//! The lab never touches the host's own namespace: both ends of every veth
//! pair are created directly inside lab namespaces, the underlay uses the
//! documentation range 192.0.2.0/24 (RFC 5737) and the overlay 100.72.0.0/16.
//!
//! Nodes are configured either statically (a config file listing their
//! peers) or through a rendezvous: a [`Rendezvous`] runs `mesh-rendezvous`
//! on one machine of the lab, and each [`MeshNode`] is enrolled with the
//! `meshd join` line it printed, its state directory in the lab's.
//!
//! Namespaces are named `mt<pid>-<lab><role>` and wireguard-go interfaces
//! `mtw<pid>-<lab><role>`, so tests run in parallel, also from several test
//! binaries at once. A run killed with SIGKILL cannot run `Drop`; the first
//! lab of every process therefore removes leftovers whose pid is gone.
//!
//! Waiting is always "poll for a condition until a deadline" ([`eventually`]);
//! nothing here sleeps to let something happen.

#![allow(dead_code)]

pub mod cni;
pub mod etcd;
pub mod lab;
pub mod portmap;
pub mod simnodes;
pub mod topology;

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use nix::sched::{setns, CloneFlags};
use sha2::{Digest, Sha256};

pub const MESHD: &str = env!("CARGO_BIN_EXE_meshd");
pub const MESHCTL: &str = env!("CARGO_BIN_EXE_meshctl");
pub const MESH_RENDEZVOUS: &str = env!("CARGO_BIN_EXE_mesh-rendezvous");

/// How long a tunnel may take to carry its first packet.
pub const DEADLINE: Duration = Duration::from_secs(20);
/// How long a daemon may take to come up or to exit after SIGTERM.
pub const START_STOP_DEADLINE: Duration = Duration::from_secs(20);
/// How long nodes may take to be online again at a restarted rendezvous:
/// their reconnect backoff starts at 1 s and doubles, with jitter.
pub const RECONNECT_DEADLINE: Duration = Duration::from_secs(20);
/// No single socket operation of a transfer may block longer than this.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

pub const MB: usize = 1_000_000;
pub const LISTEN_PORT: u16 = 51820;
pub const MESH_PREFIX_LEN: u8 = 16;
pub const MTU: u16 = 1380;
/// The rendezvous's UDP port on the underlay.
pub const RENDEZVOUS_PORT: u16 = 7443;
/// The overlay prefix of meshes created through a rendezvous.
pub const MESH_CIDR: &str = "100.72.0.0/16";
/// meshd's interface inside each (private) namespace.
pub const MESH_IFACE: &str = "mesh0";

const NS_PREFIX: &str = "mt";
const WG_IFACE_PREFIX: &str = "mtw";
const WG_UAPI_DIR: &str = "/var/run/wireguard";

/// Panics unless the tests run as root: namespace tests are not optional.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and always succeeds.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "needs root: network namespace tests are part of the suite (run `sudo -E cargo test`)"
    );
}

/// Retries `attempt` until it succeeds or `within` has passed; then panics
/// with `what` and the last failure.
pub fn eventually<T>(
    what: &str,
    within: Duration,
    attempt: impl FnMut() -> Result<T, String>,
) -> T {
    eventually_every(what, within, POLL_INTERVAL, attempt)
}

/// [`eventually`], trying again every `every`.
pub fn eventually_every<T>(
    what: &str,
    within: Duration,
    every: Duration,
    mut attempt: impl FnMut() -> Result<T, String>,
) -> T {
    let end = Instant::now() + within;
    loop {
        match attempt() {
            Ok(value) => return value,
            Err(last) if Instant::now() >= end => {
                panic!("{what}: did not happen within {within:?}; last attempt: {last}")
            }
            Err(_) => thread::sleep(every),
        }
    }
}

/// Runs a command to completion and returns its output, whatever its status.
pub fn output(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{program}`: {e}"))
}

/// Runs a command that must succeed and returns its stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = output(program, args);
    assert!(
        out.status.success(),
        "`{program} {}` failed with {}:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `ip` with whitespace-separated `args`, which must succeed; returns
/// its stdout.
pub fn ip(args: &str) -> String {
    run("ip", &args.split_whitespace().collect::<Vec<_>>())
}

/// Runs a command with `input` on stdin; returns its output.
pub fn output_with_stdin(program: &str, args: &[&str], input: &str) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{program}`: {e}"));
    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin
        .write_all(input.as_bytes())
        .unwrap_or_else(|e| panic!("cannot write to `{program}`: {e}"));
    drop(stdin);
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("cannot wait for `{program}`: {e}"))
}

/// A WireGuard key pair in wg's base64 encoding.
#[derive(Clone)]
pub struct KeyPair {
    pub private: String,
    pub public: String,
}

impl KeyPair {
    /// A fresh key, clamped as `wg genkey` does.
    pub fn generate() -> Self {
        let mut bytes: [u8; 32] = rand::random();
        bytes[0] &= 248;
        bytes[31] = (bytes[31] & 127) | 64;
        let secret = x25519_dalek::StaticSecret::from(bytes);
        let public = x25519_dalek::PublicKey::from(&secret);
        KeyPair {
            private: BASE64.encode(bytes),
            public: BASE64.encode(public.as_bytes()),
        }
    }
}

/// One machine of the lab: a namespace with an underlay address on `eth0`.
pub struct Node {
    pub name: char,
    pub ns: String,
    pub underlay: Ipv4Addr,
    pub overlay: Ipv4Addr,
    pub key: KeyPair,
}

impl Node {
    pub fn endpoint(&self) -> SocketAddr {
        SocketAddr::from((self.underlay, LISTEN_PORT))
    }

    /// `ip netns exec <ns> program args…`, to completion.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", self.ns.as_str(), program];
        full.extend_from_slice(args);
        output("ip", &full)
    }

    /// One ping of `to` (IPv4 or IPv6); `Err` with ping's output when no
    /// reply came.
    pub fn ping_once(&self, to: impl Into<IpAddr>) -> Result<(), String> {
        let to = to.into();
        let out = self.exec("ping", &["-c", "1", "-W", "1", &to.to_string()]);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ping {to} from node {}: {}{}",
                self.name,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Pings `to` until a reply comes, or panics at the deadline.
    pub fn pings(&self, to: impl Into<IpAddr>) {
        let to = to.into();
        eventually(
            &format!(
                "node {} ({}) gets a ping reply from {to}",
                self.name, self.ns
            ),
            DEADLINE,
            || self.ping_once(to),
        )
    }

    /// Whether `ip link show <iface>` finds the interface in this namespace.
    pub fn has_link(&self, iface: &str) -> bool {
        output("ip", &["-n", &self.ns, "link", "show", iface])
            .status
            .success()
    }
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// A set of namespaces, the files of the test and the logs of its processes.
pub struct Lab {
    id: String,
    dir: tempfile::TempDir,
    /// Every namespace created so far, nodes and switch, in creation order.
    namespaces: Vec<String>,
    nodes: Vec<Node>,
    /// (label, path) of every process log, dumped when the test fails.
    logs: Mutex<Vec<(String, PathBuf)>>,
    /// wireguard-go interfaces, whose UAPI sockets live on the host filesystem.
    wg_ifaces: Mutex<Vec<String>>,
}

impl Lab {
    /// `n` nodes on one underlay subnet: node `i` is `192.0.2.(i+1)` on the
    /// underlay and `100.72.0.(i+1)` on the overlay. Two nodes are joined by
    /// one veth pair; more hang off a bridge in a switch namespace.
    pub fn new(n: usize) -> Self {
        require_root();
        assert!((2..=26).contains(&n), "a lab has 2 to 26 nodes");
        SWEEP.call_once(sweep_leftovers);

        let id = format!(
            "{NS_PREFIX}{}-{}",
            std::process::id(),
            LAB_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("{id}-"))
            .tempdir()
            .expect("create the lab's temp dir");
        let mut lab = Lab {
            id,
            dir,
            namespaces: Vec::new(),
            nodes: Vec::new(),
            logs: Mutex::new(Vec::new()),
            wg_ifaces: Mutex::new(Vec::new()),
        };

        for i in 0..n {
            let name = char::from(b'a' + i as u8);
            let ns = lab.add_namespace(name);
            let host = i as u8 + 1;
            lab.nodes.push(Node {
                name,
                ns,
                underlay: Ipv4Addr::new(192, 0, 2, host),
                overlay: Ipv4Addr::new(100, 72, 0, host),
                key: KeyPair::generate(),
            });
        }

        if n == 2 {
            let (a, b) = (&lab.nodes[0].ns, &lab.nodes[1].ns);
            ip(&format!(
                "-n {a} link add eth0 type veth peer name eth0 netns {b}"
            ));
        } else {
            let sw = lab.add_namespace('s');
            ip(&format!("-n {sw} link add br0 type bridge"));
            ip(&format!("-n {sw} link set br0 up"));
            for node in &lab.nodes {
                let (port, ns) = (format!("p{}", node.name), &node.ns);
                ip(&format!(
                    "-n {sw} link add {port} type veth peer name eth0 netns {ns}"
                ));
                ip(&format!("-n {sw} link set {port} master br0"));
                ip(&format!("-n {sw} link set {port} up"));
            }
        }
        for node in &lab.nodes {
            ip(&format!(
                "-n {} addr add {}/24 dev eth0",
                node.ns, node.underlay
            ));
            ip(&format!("-n {} link set eth0 up", node.ns));
        }
        lab
    }

    fn add_namespace(&mut self, role: char) -> String {
        let ns = format!("{}{role}", self.id);
        ip(&format!("netns add {ns}"));
        self.namespaces.push(ns.clone());
        ip(&format!("-n {ns} link set lo up"));
        ns
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh log file for `label` (`label.log`, then `label.2.log`, …).
    fn new_log(&self, label: &str) -> (PathBuf, File) {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        let runs = logs.iter().filter(|(l, _)| l == label).count();
        let path = match runs {
            0 => self.dir().join(format!("{label}.log")),
            n => self.dir().join(format!("{label}.{}.log", n + 1)),
        };
        let file = File::create(&path).expect("create a log file");
        logs.push((label.to_owned(), path.clone()));
        (path, file)
    }

    /// Starts `program args…` inside `node`'s namespace with stdout and
    /// stderr going to a log the lab prints if the test fails.
    pub fn spawn(&self, node: &Node, label: &str, program: &str, args: &[&str]) -> Daemon<'_> {
        self.spawn_with_env(node, label, program, args, &[])
    }

    fn spawn_with_env(
        &self,
        node: &Node,
        label: &str,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon<'_> {
        let (log, file) = self.new_log(label);
        let stderr = file.try_clone().expect("clone a log file handle");
        let child = Command::new("ip")
            .args(["netns", "exec", &node.ns, program])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()),
            )
            .env("RUST_BACKTRACE", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label}: {e}"));
        Daemon {
            _lab: self,
            label: label.to_owned(),
            child: Some(child),
            log,
        }
    }

    /// Writes node `i`'s private key (mode 0600) and a meshd config that
    /// lists `peers` (indices) with their endpoints.
    pub fn write_meshd_config(&self, i: usize, peers: &[usize]) -> MeshdFiles {
        let node = self.node(i);
        let key_file = self.dir().join(format!("{}.key", node.name));
        write_private_key(&key_file, &node.key.private);
        let socket = self.dir().join(format!("{}.sock", node.name));
        let mut toml = format!(
            "private-key-file = {key_file:?}\n\
             listen-port = {LISTEN_PORT}\n\
             interface = \"{MESH_IFACE}\"\n\
             address = \"{}/{MESH_PREFIX_LEN}\"\n\
             mtu = {MTU}\n\
             socket = {socket:?}\n",
            node.overlay
        );
        for &p in peers {
            let peer = self.node(p);
            write!(
                toml,
                "\n[[peer]]\n\
                 public-key = \"{}\"\n\
                 endpoint = \"{}\"\n\
                 allowed-ips = [\"{}/32\"]\n",
                peer.key.public,
                peer.endpoint(),
                peer.overlay
            )
            .expect("format into a String");
        }
        let config = self.dir().join(format!("{}.toml", node.name));
        fs::write(&config, toml).expect("write a meshd config");
        MeshdFiles { config, socket }
    }

    /// Starts meshd on node `i` with `files` and waits until it is ready.
    pub fn start_meshd(&self, i: usize, files: &MeshdFiles) -> Meshd<'_> {
        self.start_meshd_with(i, files, &[], &[])
    }

    /// As [`Lab::start_meshd`], with `global` options before `run` (such
    /// as `--log-format json`) and extra environment variables.
    #[allow(dead_code)] // not every test file that shares this module uses it
    pub fn start_meshd_with(
        &self,
        i: usize,
        files: &MeshdFiles,
        global: &[&str],
        env: &[(&str, &str)],
    ) -> Meshd<'_> {
        let node = self.node(i);
        let config = files.config.to_str().expect("utf-8 temp path");
        let socket = files.socket.to_str().expect("utf-8 temp path");
        let label = format!("meshd-{}", node.name);
        let env_file = files.env_file();
        let mut args = global.to_vec();
        args.extend(["run", "--config", config, "--socket", socket]);
        // In the lab's directory, not the host's /run/meshd.
        args.extend(["--env-file", utf8(&env_file)]);
        let daemon = self.spawn_with_env(node, &label, MESHD, &args, env);
        let mut meshd = Meshd {
            daemon,
            socket: files.socket.clone(),
        };
        meshd.wait_ready();
        meshd
    }

    /// Configures meshd on node `i` with `peers` (indices) and starts it.
    pub fn start_meshd_with_peers(&self, i: usize, peers: &[usize]) -> Meshd<'_> {
        let files = self.write_meshd_config(i, peers);
        self.start_meshd(i, &files)
    }

    /// Configures meshd on every node listed in `nodes`, each peering with
    /// all the others, and starts them.
    pub fn start_meshd_full_mesh(&self, nodes: &[usize]) -> Vec<Meshd<'_>> {
        nodes
            .iter()
            .map(|&i| {
                let peers: Vec<usize> = nodes.iter().copied().filter(|&p| p != i).collect();
                self.start_meshd_with_peers(i, &peers)
            })
            .collect()
    }

    /// Starts `wireguard-go` on node `i` peering with `peers` (indices),
    /// configured with `wg` and `ip` the way a wg-quick user would.
    pub fn start_wireguard_go(&self, i: usize, peers: &[usize]) -> WireguardGo<'_> {
        let node = self.node(i);
        let iface = format!(
            "{WG_IFACE_PREFIX}{}{}",
            &self.id[NS_PREFIX.len()..],
            node.name
        );
        assert!(
            iface.len() <= 15,
            "interface name {iface} is longer than 15 characters"
        );
        self.wg_ifaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(iface.clone());

        let label = format!("wireguard-go-{}", node.name);
        let mut daemon = self.spawn_with_env(
            node,
            &label,
            "wireguard-go",
            &["-f", &iface],
            &[("LOG_LEVEL", "verbose")],
        );
        let uapi = Path::new(WG_UAPI_DIR).join(format!("{iface}.sock"));
        eventually(
            &format!("{label} creates {}", uapi.display()),
            START_STOP_DEADLINE,
            || {
                daemon.assert_running();
                if uapi.exists() && node.has_link(&iface) {
                    Ok(())
                } else {
                    Err("no UAPI socket or interface yet".into())
                }
            },
        );

        let key_file = self.dir().join(format!("{}.wg.key", node.name));
        write_private_key(&key_file, &node.key.private);
        let key_file = key_file.to_str().expect("utf-8 temp path").to_owned();
        let port = LISTEN_PORT.to_string();
        let mut args = vec![
            "set",
            &iface,
            "private-key",
            &key_file,
            "listen-port",
            &port,
        ];
        let peer_args: Vec<[String; 6]> = peers
            .iter()
            .map(|&p| {
                let peer = self.node(p);
                [
                    "peer".into(),
                    peer.key.public.clone(),
                    "endpoint".into(),
                    peer.endpoint().to_string(),
                    "allowed-ips".into(),
                    format!("{}/32", peer.overlay),
                ]
            })
            .collect();
        args.extend(peer_args.iter().flatten().map(String::as_str));
        assert_success(&node.exec("wg", &args), "wg set");
        let (ns, overlay) = (&node.ns, node.overlay);
        ip(&format!(
            "-n {ns} addr add {overlay}/{MESH_PREFIX_LEN} dev {iface}"
        ));
        ip(&format!("-n {ns} link set {iface} mtu {MTU} up"));
        WireguardGo { daemon, iface }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if thread::panicking() {
            let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
            for (label, path) in logs.iter() {
                let text =
                    fs::read_to_string(path).unwrap_or_else(|e| format!("(unreadable: {e})"));
                eprintln!(
                    "===== {label} log ({}) =====\n{text}===== end of {label} log =====",
                    path.display()
                );
            }
        }
        // Daemons borrow the lab and are gone by now; anything still inside a
        // namespace (a child of a daemon, a ping) is ours and is stopped here.
        for ns in self.namespaces.iter().rev() {
            kill_processes_in(ns);
            let _ = output("ip", &["netns", "del", ns]);
        }
        for iface in self
            .wg_ifaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = fs::remove_file(Path::new(WG_UAPI_DIR).join(format!("{iface}.sock")));
        }
    }
}

/// SIGKILLs every process in `ns` except this test process (whose threads
/// may have entered it).
fn kill_processes_in(ns: &str) {
    let me = std::process::id();
    let pids = output("ip", &["netns", "pids", ns]);
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        match pid.parse::<i32>() {
            Ok(pid) if pid as u32 != me => {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            _ => {}
        }
    }
}

/// Removes namespaces, temp dirs and wireguard-go sockets of earlier runs
/// whose test process no longer exists.
fn sweep_leftovers() {
    let dead = |name: &str, prefix: &str| -> bool {
        let Some(rest) = name.strip_prefix(prefix) else {
            return false;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            return false;
        };
        !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !Path::new("/proc").join(pid).exists()
    };
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name, NS_PREFIX) {
                kill_processes_in(&name);
                let _ = output("ip", &["netns", "del", &name]);
            }
        }
    }
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() && dead(&name, NS_PREFIX) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    if let Ok(entries) = fs::read_dir(WG_UAPI_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".sock") && dead(&name, WG_IFACE_PREFIX) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

pub fn write_private_key(path: &Path, key: &str) {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    writeln!(file, "{key}").unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `meshctl --socket SOCKET <args…> --json`, parsed; `Err` says which
/// command failed and why (its stderr, or the output that was not JSON).
pub fn meshctl_json<T: serde::de::DeserializeOwned>(
    socket: &Path,
    args: &[&str],
) -> Result<T, String> {
    let mut all = vec!["--socket", utf8(socket)];
    all.extend_from_slice(args);
    all.push("--json");
    let command = args.join(" ");
    let out = output(MESHCTL, &all);
    if !out.status.success() {
        return Err(format!(
            "meshctl {command} on {} failed with {}: {}",
            socket.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "meshctl {command} --json on {} printed no JSON of the expected shape ({e}): {}",
            socket.display(),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A process started in the lab; killed when dropped.
pub struct Daemon<'lab> {
    _lab: &'lab Lab,
    label: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon<'_> {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon not yet stopped").id()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics, with the log, if the process has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("daemon not yet stopped");
        if let Some(status) = child.try_wait().expect("wait for a daemon") {
            panic!(
                "{} exited unexpectedly with {status}; its log:\n{}",
                self.label,
                self.log()
            );
        }
    }

    /// Sends SIGTERM and waits for the process to exit; returns its status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon not yet stopped");
        // SAFETY: kill has no memory-safety preconditions; the child has not
        // been reaped yet, so its pid is still ours.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let label = self.label.clone();
        eventually(
            &format!("{label} exits after SIGTERM"),
            START_STOP_DEADLINE,
            || match child.try_wait() {
                Ok(Some(status)) => Ok(status),
                Ok(None) => Err("still running".into()),
                Err(e) => panic!("cannot wait for {label}: {e}"),
            },
        )
    }
}

impl Daemon<'_> {
    /// SIGKILL, as a crash or a machine lost would end it, and reaps it.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("daemon not yet stopped");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits for the process to exit on its own (after a signal sent to
    /// one of its children, say); returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon not yet stopped");
        let label = self.label.clone();
        eventually(
            &format!("{label} exits"),
            START_STOP_DEADLINE,
            || match child.try_wait() {
                Ok(Some(status)) => Ok(status),
                Ok(None) => Err("still running".into()),
                Err(e) => panic!("cannot wait for {label}: {e}"),
            },
        )
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: as in `terminate`.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + START_STOP_DEADLINE;
            while Instant::now() < end {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                thread::sleep(POLL_INTERVAL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Where a meshd's config and API socket are.
pub struct MeshdFiles {
    pub config: PathBuf,
    pub socket: PathBuf,
}

impl MeshdFiles {
    /// Where [`Lab::start_meshd`] has meshd write its env file: next to
    /// the API socket (`a.sock` → `a.env`).
    pub fn env_file(&self) -> PathBuf {
        self.socket.with_extension("env")
    }
}

/// A running meshd.
pub struct Meshd<'lab> {
    pub daemon: Daemon<'lab>,
    pub socket: PathBuf,
}

impl Meshd<'_> {
    /// Waits until the API socket exists and answers `meshctl peers --json`.
    fn wait_ready(&mut self) {
        let label = self.daemon.label.clone();
        eventually(
            &format!("{label} becomes ready"),
            START_STOP_DEADLINE,
            || {
                self.daemon.assert_running();
                if !self.socket.exists() {
                    return Err(format!("no socket at {}", self.socket.display()));
                }
                self.try_peers()
            },
        );
    }

    /// `meshctl --socket … peers --json`, parsed.
    pub fn try_peers(&self) -> Result<Vec<serde_json::Value>, String> {
        self.meshctl_json("peers")
    }

    /// `meshctl --socket … status --json`, parsed.
    pub fn try_status(&self) -> Result<serde_json::Value, String> {
        self.meshctl_json("status")
    }

    pub fn status(&self) -> serde_json::Value {
        self.try_status().unwrap_or_else(|e| panic!("{e}"))
    }

    fn meshctl_json<T: serde::de::DeserializeOwned>(&self, command: &str) -> Result<T, String> {
        meshctl_json(&self.socket, &[command])
    }

    pub fn peers(&self) -> Vec<serde_json::Value> {
        self.try_peers().unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }
}

/// A running wireguard-go with its interface name.
pub struct WireguardGo<'lab> {
    pub daemon: Daemon<'lab>,
    pub iface: String,
}

impl Lab {
    /// Creates a mesh with `mesh-rendezvous init` on machine `host`, reached
    /// by the nodes at its underlay address, and starts serving it.
    pub fn start_rendezvous(&self, host: usize) -> Rendezvous<'_> {
        let mut rendezvous = Rendezvous {
            lab: self,
            host: self.node(host),
            state_dir: self.dir().join("rendezvous"),
            daemon: None,
        };
        let listen = format!("0.0.0.0:{RENDEZVOUS_PORT}");
        let public = rendezvous.address().to_string();
        rendezvous.admin(&[
            "init",
            "--listen",
            &listen,
            "--public-addr",
            &public,
            "--cidr",
            MESH_CIDR,
        ]);
        rendezvous.start();
        rendezvous
    }

    /// A server of a mesh kept in etcd, on machine `host`, called `name`:
    /// `mesh-rendezvous init --etcd-endpoints … --key-prefix …` (the first
    /// server creates the mesh there, the next ones join it), then serving.
    /// `certificate_of`: a server holding the mesh CA's key, which issues
    /// this one's certificate (`server add`), so one pin reaches both.
    pub fn start_rendezvous_on_etcd(
        &self,
        host: usize,
        name: &str,
        etcd_endpoints: &[String],
        key_prefix: &str,
        certificate_of: Option<&Rendezvous<'_>>,
    ) -> Rendezvous<'_> {
        self.start_rendezvous_on_etcd_in(
            MESH_CIDR,
            host,
            name,
            etcd_endpoints,
            key_prefix,
            certificate_of,
        )
    }

    /// [`Lab::start_rendezvous_on_etcd`] for a mesh whose IPv4 prefix is
    /// `cidr` (the first server of a mesh creates it with that prefix).
    pub fn start_rendezvous_on_etcd_in(
        &self,
        cidr: &str,
        host: usize,
        name: &str,
        etcd_endpoints: &[String],
        key_prefix: &str,
        certificate_of: Option<&Rendezvous<'_>>,
    ) -> Rendezvous<'_> {
        let mut rendezvous = Rendezvous {
            lab: self,
            host: self.node(host),
            state_dir: self.dir().join(format!("rendezvous-{name}")),
            daemon: None,
        };
        let public = rendezvous.address().to_string();
        let mut init = init_on_etcd_args(&public, name, etcd_endpoints, key_prefix);
        init.extend(["--cidr".to_owned(), cidr.to_owned()]);
        // Issued where the CA's key is, as an operator adds a server.
        let bundle = self.dir().join(format!("server-{name}"));
        if let Some(issuer) = certificate_of {
            issuer.admin(&server_add_args(name, &bundle));
            init.extend(["--certificate-from".to_owned(), utf8(&bundle).to_owned()]);
        }
        let init: Vec<&str> = init.iter().map(String::as_str).collect();
        rendezvous.admin(&init);
        rendezvous.start();
        rendezvous
    }

    /// Enrols machine `i` as `node-<letter>` by running the `join` line it
    /// was given, with a state directory in the lab's directory. meshd is
    /// not started.
    pub fn join(&self, i: usize, join: &JoinLine) -> MeshNode<'_> {
        self.join_as(i, join, &format!("node-{}", self.node(i).name))
    }

    /// [`Lab::join`] asking for the name `name` (the rendezvous may give
    /// another: names are unique in a mesh). The state directory is named
    /// after the machine.
    pub fn join_as(&self, i: usize, join: &JoinLine, name: &str) -> MeshNode<'_> {
        let machine = self.node(i);
        let name = name.to_owned();
        let state_dir = self.dir().join(format!("node-{}", machine.name));
        let socket = state_dir.join("meshd.sock");
        let mut args = join.meshd_args();
        let (dir, sock) = (utf8(&state_dir), utf8(&socket));
        args.extend(["--state-dir", dir, "--name", &name, "--socket", sock]);
        assert_success(
            &machine.exec(MESHD, &args),
            &format!("`meshd {}` on machine {}", args.join(" "), machine.name),
        );
        MeshNode {
            lab: self,
            machine,
            name,
            state_dir,
            socket,
            meshd: None,
        }
    }

    /// [`Lab::join`], then starts meshd and waits until it has its address.
    pub fn join_and_start(&self, i: usize, join: &JoinLine) -> MeshNode<'_> {
        let mut node = self.join(i, join);
        node.start();
        node
    }
}

/// `mesh-rendezvous init` for the server `name` of a mesh kept in etcd,
/// listening on every address at [`RENDEZVOUS_PORT`] and reached by the
/// nodes at `public_addr`: the first server of a mesh under `key_prefix`
/// creates it there, the next ones (given `--certificate-from` the bundle
/// of [`server_add_args`]) join it.
pub fn init_on_etcd_args(
    public_addr: &str,
    name: &str,
    etcd_endpoints: &[String],
    key_prefix: &str,
) -> Vec<String> {
    [
        "init",
        "--listen",
        &format!("0.0.0.0:{RENDEZVOUS_PORT}"),
        "--public-addr",
        public_addr,
        "--server-name",
        name,
        "--etcd-endpoints",
        &etcd_endpoints.join(","),
        "--key-prefix",
        key_prefix,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// `mesh-rendezvous server add NAME --out BUNDLE`, run where the mesh CA's
/// key is: the certificate bundle that the new server's `init` takes.
pub fn server_add_args<'a>(name: &'a str, bundle: &'a Path) -> [&'a str; 5] {
    ["server", "add", name, "--out", utf8(bundle)]
}

pub fn utf8(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// A mesh's rendezvous on one machine of the lab: its state directory, and
/// its server while one runs.
pub struct Rendezvous<'lab> {
    lab: &'lab Lab,
    host: &'lab Node,
    state_dir: PathBuf,
    daemon: Option<Daemon<'lab>>,
}

impl Rendezvous<'_> {
    /// Where the nodes reach it.
    pub fn address(&self) -> SocketAddr {
        SocketAddr::from((self.host.underlay, RENDEZVOUS_PORT))
    }

    /// Runs `mesh-rendezvous serve` and waits until it answers on its admin
    /// socket, which it binds after its UDP port.
    pub fn start(&mut self) {
        assert!(self.daemon.is_none(), "the rendezvous is already running");
        let mut daemon = self.lab.spawn(
            self.host,
            "mesh-rendezvous",
            MESH_RENDEZVOUS,
            &["--state-dir", utf8(&self.state_dir), "serve"],
        );
        let admin = self.state_dir.join("admin.sock");
        eventually(
            "mesh-rendezvous accepts on its admin socket",
            START_STOP_DEADLINE,
            || {
                daemon.assert_running();
                UnixStream::connect(&admin)
                    .map(drop)
                    .map_err(|e| format!("{}: {e}", admin.display()))
            },
        );
        self.daemon = Some(daemon);
    }

    /// Kills the server with SIGKILL: a crash, or its machine lost.
    pub fn kill(&mut self) {
        self.daemon
            .take()
            .expect("the rendezvous is running")
            .kill();
    }

    /// Sends SIGTERM and waits for the server to exit cleanly.
    pub fn stop(&mut self) {
        let mut daemon = self.daemon.take().expect("the rendezvous is running");
        let status = daemon.terminate();
        assert!(
            status.success(),
            "mesh-rendezvous exits 0 after SIGTERM, not {status}"
        );
    }

    /// `mesh-rendezvous token create`: a token for `uses` nodes, as the
    /// `meshd join` line it prints.
    pub fn create_token(&self, uses: usize) -> JoinLine {
        self.token_line(&["--uses", &uses.to_string()])
    }

    /// `mesh-rendezvous token create --for NODE`: a token for a rebuilt
    /// machine, which takes over `node`.
    pub fn create_token_for(&self, node: &str) -> JoinLine {
        self.token_line(&["--for", node])
    }

    fn token_line(&self, extra: &[&str]) -> JoinLine {
        let mut args = vec!["token", "create", "--ttl", "1h"];
        args.extend_from_slice(extra);
        let out = self.admin(&args);
        let line = out
            .lines()
            .find(|l| l.starts_with("meshd join "))
            .unwrap_or_else(|| panic!("`token create` prints a `meshd join` line: {out}"));
        JoinLine(line.to_owned())
    }

    /// `mesh-rendezvous nodes list --json`, parsed.
    pub fn try_nodes(&self) -> Result<Vec<serde_json::Value>, String> {
        let out = self.try_admin(&["nodes", "list", "--json"]);
        if !out.status.success() {
            return Err(format!(
                "`nodes list` failed with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "`nodes list --json` printed no JSON array ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn nodes(&self) -> Vec<serde_json::Value> {
        self.try_nodes().unwrap_or_else(|e| panic!("{e}"))
    }

    /// `mesh-rendezvous server list --json`, parsed.
    pub fn servers(&self) -> Vec<serde_json::Value> {
        let out = self.admin(&["server", "list", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("`server list --json`: {e}: {out}"))
    }

    /// `Ok` once `nodes list` shows every one of `nodes` online; otherwise
    /// says which are not.
    pub fn all_online(&self, nodes: &[MeshNode<'_>]) -> Result<(), String> {
        let listed = self.try_nodes()?;
        let offline: Vec<&str> = nodes
            .iter()
            .filter(|node| {
                let key = node.public_key();
                !listed
                    .iter()
                    .any(|n| n["public_key"] == key.as_str() && n["online"] == true)
            })
            .map(|node| node.name.as_str())
            .collect();
        if offline.is_empty() {
            Ok(())
        } else {
            Err(format!("not online: {offline:?}; nodes list: {listed:?}"))
        }
    }

    /// `mesh-rendezvous nodes remove <name>`.
    pub fn remove_node(&self, name: &str) {
        self.admin(&["nodes", "remove", name]);
    }

    /// `mesh-rendezvous --state-dir … args…` on its machine, to completion.
    fn try_admin(&self, args: &[&str]) -> Output {
        let mut full = vec!["--state-dir", utf8(&self.state_dir)];
        full.extend_from_slice(args);
        self.host.exec(MESH_RENDEZVOUS, &full)
    }

    /// [`Rendezvous::try_admin`], which must succeed; returns its stdout.
    fn admin(&self, args: &[&str]) -> String {
        let out = self.try_admin(args);
        assert_success(&out, &format!("`mesh-rendezvous {}`", args.join(" ")));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The `meshd join HOST:PORT --token … --ca-hash …` line that
/// `mesh-rendezvous token create` printed.
pub struct JoinLine(pub String);

impl JoinLine {
    /// The same line for another server of the mesh.
    pub fn via(&self, server: &Rendezvous<'_>) -> JoinLine {
        self.via_all(&[server])
    }

    /// The same line naming several servers of the mesh, in this order.
    pub fn via_all(&self, servers: &[&Rendezvous<'_>]) -> JoinLine {
        let addresses: Vec<SocketAddr> = servers.iter().map(|s| s.address()).collect();
        self.via_addrs(&addresses)
    }

    /// The same line naming servers by address (a forwarder's, say).
    pub fn via_addrs(&self, addresses: &[SocketAddr]) -> JoinLine {
        let mut words: Vec<String> = self.0.split_whitespace().map(str::to_owned).collect();
        assert_eq!(
            words.get(1).map(String::as_str),
            Some("join"),
            "a join line: {}",
            self.0
        );
        let addresses: Vec<String> = addresses.iter().map(ToString::to_string).collect();
        words[2] = addresses.join(",");
        JoinLine(words.join(" "))
    }

    /// The line's arguments after `meshd`.
    fn meshd_args(&self) -> Vec<&str> {
        let mut words = self.0.split_whitespace();
        assert_eq!(words.next(), Some("meshd"), "a join line: {}", self.0);
        words.collect()
    }
}

/// A node's overlay addresses, as `meshctl status` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayIps {
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// A machine enrolled with `meshd join`: its state directory, and its meshd
/// while one runs. Its overlay addresses are whatever the rendezvous
/// assigned, not the machine's static `overlay`.
pub struct MeshNode<'lab> {
    lab: &'lab Lab,
    pub machine: &'lab Node,
    /// Its name in the mesh.
    pub name: String,
    pub state_dir: PathBuf,
    socket: PathBuf,
    meshd: Option<Meshd<'lab>>,
}

impl MeshNode<'_> {
    /// `meshd run --state-dir …`; waits until the API socket answers, which
    /// is once `mesh0` has its address.
    pub fn start(&mut self) {
        assert!(
            self.meshd.is_none(),
            "meshd on {} is already running",
            self.name
        );
        let env_file = self.env_file();
        let daemon = self.lab.spawn(
            self.machine,
            &format!("meshd-{}", self.machine.name),
            MESHD,
            &[
                "run",
                "--state-dir",
                utf8(&self.state_dir),
                "--env-file",
                utf8(&env_file),
            ],
        );
        let mut meshd = Meshd {
            daemon,
            socket: self.socket.clone(),
        };
        meshd.wait_ready();
        self.meshd = Some(meshd);
    }

    /// Sends meshd SIGTERM and waits for it to exit cleanly.
    pub fn stop(&mut self) {
        let mut meshd = self.meshd.take().expect("meshd is running");
        let status = meshd.daemon.terminate();
        assert!(
            status.success(),
            "meshd on {} exits 0 after SIGTERM, not {status}",
            self.name
        );
    }

    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    /// meshd's API socket, whether or not this handle started it.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    pub fn meshd(&self) -> &Meshd<'_> {
        self.meshd.as_ref().expect("meshd is running")
    }

    /// Where its meshd writes the env file: in its state directory, not
    /// the host's /run/meshd.
    pub fn env_file(&self) -> PathBuf {
        self.state_dir.join("env")
    }

    /// The log of the meshd running now.
    pub fn log(&self) -> String {
        self.meshd().daemon.log()
    }

    /// The config `meshd join` wrote.
    pub fn config(&self) -> String {
        let path = self.state_dir.join("meshd.toml");
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    pub fn public_key(&self) -> String {
        let status = self.meshd().status();
        status["public_key"]
            .as_str()
            .unwrap_or_else(|| {
                panic!(
                    "meshctl status of {} has a public_key: {status:#}",
                    self.name
                )
            })
            .to_owned()
    }

    /// The overlay addresses `meshctl status` reports now.
    pub fn overlay_ips(&self) -> OverlayIps {
        let status = self.meshd().status();
        let ips: Vec<IpAddr> = status["overlay_ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.as_str()?.parse().ok())
            .collect();
        match ips[..] {
            [IpAddr::V4(v4), IpAddr::V6(v6)] => OverlayIps { v4, v6 },
            _ => panic!(
                "meshctl status of {} lists one IPv4 and one IPv6 overlay address: {status:#}",
                self.name
            ),
        }
    }

    /// Its peers by public key, from `meshctl peers`.
    pub fn try_peer_keys(&self) -> Result<Vec<String>, String> {
        Ok(self
            .meshd()
            .try_peers()?
            .iter()
            .filter_map(|p| p["public_key"].as_str().map(str::to_owned))
            .collect())
    }

    pub fn ping_once(&self, to: impl Into<IpAddr>) -> Result<(), String> {
        self.machine.ping_once(to)
    }

    pub fn pings(&self, to: impl Into<IpAddr>) {
        self.machine.pings(to)
    }
}

/// Runs `f` on a new thread inside network namespace `ns`.
pub fn in_namespace<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // Changes the namespace of this thread only.
        setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
}

/// A far-away path in a lab without netem: a UDP forwarder in a machine's
/// namespace that holds every datagram `delay` in each direction on its
/// way between its clients and `upstream`. Each client gets a socket of its
/// own towards `upstream`, as a NAT would. Stops when dropped.
pub struct DelayProxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl DelayProxy {
    pub fn start(ns: &str, listen: SocketAddr, upstream: SocketAddr, delay: Duration) -> Self {
        use std::net::UdpSocket;
        // Sockets stay in the namespace they were made in.
        let front = in_namespace(ns, move || {
            UdpSocket::bind(listen).expect("bind the forwarder")
        })
        .join()
        .expect("forwarder socket");
        let tick = Some(Duration::from_millis(50));
        front.set_read_timeout(tick).expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        // Datagrams on their way, each with the moment it may go on; one
        // sender thread per direction keeps them in order.
        type Queue = mpsc::Sender<(Instant, Vec<u8>, SocketAddr)>;
        fn sender(socket: Arc<UdpSocket>) -> (Queue, thread::JoinHandle<()>) {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>, SocketAddr)>();
            let thread = thread::spawn(move || {
                for (due, datagram, to) in rx {
                    thread::sleep(due.saturating_duration_since(Instant::now()));
                    let _ = socket.send_to(&datagram, to);
                }
            });
            (tx, thread)
        }
        let front = Arc::new(front);
        let (to_clients, back_thread) = sender(front.clone());
        let mut threads = vec![back_thread];
        let (stop_in, front_in) = (stop.clone(), front.clone());
        let ns = ns.to_owned();
        threads.push(thread::spawn(move || {
            let mut uplinks: std::collections::HashMap<SocketAddr, Queue> = Default::default();
            let mut buf = vec![0u8; 65_535];
            while !stop_in.load(Ordering::Relaxed) {
                let Ok((n, client)) = front_in.recv_from(&mut buf) else {
                    continue;
                };
                let uplink = uplinks.entry(client).or_insert_with(|| {
                    let back = in_namespace(&ns, move || {
                        UdpSocket::bind(SocketAddr::new(listen.ip(), 0)).expect("bind uplink")
                    })
                    .join()
                    .expect("uplink socket");
                    back.set_read_timeout(tick).expect("timeout");
                    let back = Arc::new(back);
                    let (tx, _) = sender(back.clone());
                    let (stop, to_clients) = (stop_in.clone(), to_clients.clone());
                    thread::spawn(move || {
                        let mut buf = vec![0u8; 65_535];
                        while !stop.load(Ordering::Relaxed) {
                            if let Ok((n, _)) = back.recv_from(&mut buf) {
                                let item = (Instant::now() + delay, buf[..n].to_vec(), client);
                                if to_clients.send(item).is_err() {
                                    return;
                                }
                            }
                        }
                    });
                    tx
                });
                let _ = uplink.send((Instant::now() + delay, buf[..n].to_vec(), upstream));
            }
        }));
        Self {
            addr: listen,
            stop,
            threads,
        }
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..).rev() {
            let _ = thread.join();
        }
    }
}

/// Deterministic bytes (splitmix64), so both ends can be checked against
/// each other without keeping the data.
struct Stream {
    state: u64,
}

impl Stream {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
    }
}

const CHUNK: usize = 64 * 1024;

/// Sends `len` seeded pseudo-random bytes over TCP from `from` to
/// `to`'s overlay address and asserts that exactly those bytes arrive
/// (same length, same SHA-256).
pub fn assert_tcp_transfer(from: &Node, to: &Node, len: usize, seed: u64) {
    assert_tcp_transfer_to(from, to, to.overlay, len, seed);
}

/// [`assert_tcp_transfer`] to `to` at `address`, one of its own addresses
/// (such as an overlay address a rendezvous assigned).
pub fn assert_tcp_transfer_to(
    from: &Node,
    to: &Node,
    address: impl Into<IpAddr>,
    len: usize,
    seed: u64,
) {
    let address = address.into();
    let what = format!(
        "{len} bytes over TCP from node {} to node {} ({address})",
        from.name, to.name
    );
    let amount = Amount::Bytes(len);
    let transfer = TcpTransfer::start(what, &from.ns, &to.ns, address, amount, seed, DEADLINE);
    assert_eq!(transfer.finish(), len, "the sender sent everything");
}

/// How much a [`TcpTransfer`] sends.
#[derive(Debug, Clone, Copy)]
pub enum Amount {
    /// This many bytes, as fast as TCP goes.
    Bytes(usize),
    /// One chunk of this size every `PACE` until [`TcpTransfer::finish`]:
    /// a long-lived connection that keeps a path busy without taking the
    /// machine's CPU from the daemons.
    Paced(usize),
}

/// The gap between two chunks of an [`Amount::Paced`] transfer.
const PACE: Duration = Duration::from_millis(10);

/// One TCP connection from namespace `from_ns` to `address`, port 5201, in
/// namespace `to_ns`, carrying seeded pseudo-random bytes, hashed at both
/// ends.
pub struct TcpTransfer {
    what: String,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicUsize>,
    sender: thread::JoinHandle<Result<(usize, Vec<u8>), String>>,
    receiver: thread::JoinHandle<Result<(usize, Vec<u8>), String>>,
}

impl TcpTransfer {
    /// Connects and starts sending; returns once the receiver listens.
    /// `what` names the transfer in failures; `within` bounds the wait for
    /// the receiver to listen and for the connection.
    pub fn start(
        what: String,
        from_ns: &str,
        to_ns: &str,
        address: IpAddr,
        amount: Amount,
        seed: u64,
        within: Duration,
    ) -> Self {
        let addr = SocketAddr::from((address, 5201));
        let (bound_tx, bound_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));

        let progress = received.clone();
        let receiver = in_namespace(to_ns, move || -> Result<(usize, Vec<u8>), String> {
            let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
            let _ = bound_tx.send(());
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            let (mut stream, _) =
                eventually(&format!("a sender connects to {addr}"), within, || {
                    listener.accept().map_err(|e| e.to_string())
                });
            stream.set_nonblocking(false).map_err(|e| e.to_string())?;
            stream
                .set_read_timeout(Some(IO_TIMEOUT))
                .map_err(|e| e.to_string())?;
            let mut hash = Sha256::new();
            let mut total = 0;
            let mut buf = vec![0; CHUNK];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        hash.update(&buf[..n]);
                        total += n;
                        progress.store(total, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("receive after {total} bytes: {e}")),
                }
            }
            Ok((total, hash.finalize().to_vec()))
        });
        if bound_rx.recv_timeout(within).is_err() {
            panic!("{what}: the receiver did not listen: {:?}", receiver.join());
        }

        let stopped = stop.clone();
        let sender = in_namespace(from_ns, move || -> Result<(usize, Vec<u8>), String> {
            let mut stream = eventually(&format!("connect to {addr}"), within, || {
                TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())
            });
            stream
                .set_write_timeout(Some(IO_TIMEOUT))
                .map_err(|e| e.to_string())?;
            let mut data = Stream { state: seed };
            let mut hash = Sha256::new();
            let mut buf = vec![0; CHUNK];
            let mut sent = 0;
            loop {
                let n = match amount {
                    Amount::Bytes(len) if sent < len => CHUNK.min(len - sent),
                    Amount::Paced(chunk) if !stopped.load(Ordering::Relaxed) => {
                        thread::sleep(PACE);
                        chunk.min(CHUNK)
                    }
                    Amount::Bytes(_) | Amount::Paced(_) => break,
                };
                data.fill(&mut buf[..n]);
                hash.update(&buf[..n]);
                stream
                    .write_all(&buf[..n])
                    .map_err(|e| format!("send after {sent} bytes: {e}"))?;
                sent += n;
            }
            stream
                .shutdown(std::net::Shutdown::Write)
                .map_err(|e| e.to_string())?;
            Ok((sent, hash.finalize().to_vec()))
        });
        Self {
            what,
            stop,
            received,
            sender,
            receiver,
        }
    }

    /// Bytes that have arrived so far.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }

    /// Stops a paced transfer, waits for both ends and asserts that exactly
    /// the bytes sent arrived (same length, same SHA-256); returns how many.
    pub fn finish(self) -> usize {
        let what = self.what;
        self.stop.store(true, Ordering::Relaxed);
        let (sent, sent_hash) = self
            .sender
            .join()
            .expect("sender thread")
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let (received, received_hash) = self
            .receiver
            .join()
            .expect("receiver thread")
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(received, sent, "{what}: wrong number of bytes arrived");
        assert!(
            sent_hash == received_hash,
            "{what}: the bytes that arrived differ from those sent (SHA-256 mismatch)"
        );
        sent
    }
}
