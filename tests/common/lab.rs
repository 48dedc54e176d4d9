//! Harness for the tests that run the real binaries in the NAT lab of
//! `deploy/lab`: a rendezvous and meshd on some of the lab's nodes, enrolled
//! as `deploy/lab/demo` does it, and helpers to run things inside the
//! nodes' namespaces. Needs root; does I/O (namespaces, processes, files).
//!
//! Every [`MeshLab`] is its own lab built by `deploy/lab/up` under its own
//! `LAB_PREFIX` (`<stem><pid>-<n>`, the stem chosen by the test file so that
//! test binaries running at once never share a name), with the daemons'
//! state directories and env files inside its `LAB_DIR`: nothing is written
//! to the host's `/run/meshd`. Its `Drop` runs `deploy/lab/down`, failed
//! test or not, after printing the daemons' logs if it failed; `down` also
//! stops whatever else a test started inside the lab's namespaces. A run
//! killed before that is swept by the next run of the same test file.
//!
//! Waiting is always "poll for a condition until a deadline" ([`eventually`]);
//! nothing here sleeps to let something happen. The helpers it shares with
//! the other namespace tests (commands, polling, TCP transfers) are
//! tests/common's, and the lab's machines and addresses come from
//! `deploy/lab/topology` ([`super::topology`]), the file the scripts build
//! from. [`NatLab`] is the bare lab (no daemons), for tests of the lab's
//! routers themselves.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use super::topology::{topology, Kind};
use super::{
    assert_success, eventually_every, meshctl_json, output, require_root, utf8, Amount,
    TcpTransfer, LISTEN_PORT, MESHD, MESH_RENDEZVOUS,
};

/// How long a daemon may take to come up.
pub const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a freshly started mesh may take to carry a packet between two
/// nodes (enrolment, peer lists, first handshake, on a loaded machine).
pub const REACH_DEADLINE: Duration = Duration::from_secs(60);
/// How long the paths may take to settle once every pair has talked:
/// hole punching, probes and the switch from relay to direct.
pub const SETTLE_DEADLINE: Duration = Duration::from_secs(90);
const POLL_INTERVAL: Duration = Duration::from_millis(100);

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Which build of the daemons to run: this tree's, or a previous release's
/// (DESIGN.md, "Rolling upgrades").
#[derive(Debug, Clone)]
pub struct Release {
    pub name: String,
    pub meshd: PathBuf,
    pub rendezvous: PathBuf,
}

impl Release {
    /// The binaries of this tree.
    pub fn current() -> Self {
        Release {
            name: "current".into(),
            meshd: MESHD.into(),
            rendezvous: MESH_RENDEZVOUS.into(),
        }
    }

    /// The previous release's binaries, from the directory that
    /// `MESHD_PREVIOUS_RELEASE` names (tests/run.sh builds them from the
    /// release's commit into `target/previous/`); `None` when unset.
    pub fn previous() -> Option<Self> {
        let dir = PathBuf::from(std::env::var_os("MESHD_PREVIOUS_RELEASE")?);
        let name = fs::read_to_string(dir.join("release")).unwrap_or_else(|_| "previous".into());
        Some(Release {
            name: name.trim().to_owned(),
            meshd: dir.join("meshd"),
            rendezvous: dir.join("mesh-rendezvous"),
        })
    }
}
/// The stems whose leftovers this process has swept.
static SWEPT: Mutex<BTreeSet<&str>> = Mutex::new(BTreeSet::new());

/// One lab built by `deploy/lab/up`, with a rendezvous and meshd on some of
/// its nodes; dropping it stops them and runs `deploy/lab/down`.
pub struct MeshLab {
    lab: NatLab,
    /// Daemons started here, by label ("rendezvous", a node's name, or
    /// whatever a test passed to [`MeshLab::spawn`]).
    daemons: RefCell<Vec<(String, Child)>>,
    /// The nodes running meshd and their overlay IPv4 addresses.
    overlay: BTreeMap<&'static str, Ipv4Addr>,
}

impl MeshLab {
    /// Builds a lab named `<stem><pid>-<n>` and starts a mesh of `nodes`, as
    /// `deploy/lab/demo` does: `mesh-rendezvous init` and `serve` on "rv",
    /// one token for all, then `meshd join` and `meshd run --state-dir …
    /// --env-file <lab dir>/<node>.env` for every node. Returns once every
    /// node has its overlay address.
    pub fn with_mesh_of(stem: &'static str, nodes: &[&'static str]) -> Self {
        Self::build(stem, nodes, &Release::current())
    }

    /// [`MeshLab::with_mesh_of`], every daemon started from `release`.
    pub fn with_mesh_of_release(
        stem: &'static str,
        nodes: &[&'static str],
        release: &Release,
    ) -> Self {
        Self::build(stem, nodes, release)
    }

    fn build(stem: &'static str, nodes: &[&'static str], release: &Release) -> Self {
        // The guard holds the lab first, so that a half-built one is removed too.
        let mut lab = MeshLab {
            lab: NatLab::up(stem),
            daemons: RefCell::new(Vec::new()),
            overlay: BTreeMap::new(),
        };
        fs::create_dir_all(lab.dir()).expect("create the lab directory");
        lab.start_rendezvous(release);
        let join = lab.create_token(nodes.len(), release);
        for &node in nodes {
            lab.start_meshd(node, &join, release);
        }
        for &node in nodes {
            let ip = lab.wait_for_overlay_ip(node);
            lab.overlay.insert(node, ip);
        }
        lab
    }

    /// The lab's directory: state directories, env files, logs; removed by
    /// `deploy/lab/down`.
    pub fn dir(&self) -> &Path {
        self.lab.dir()
    }

    /// The namespace of a machine: "inet", "rv", a node or a router.
    pub fn ns(&self, machine: &str) -> String {
        self.lab.ns(machine)
    }

    pub fn state_dir(&self, machine: &str) -> PathBuf {
        self.dir().join(machine)
    }

    pub fn socket(&self, node: &str) -> PathBuf {
        self.dir().join(format!("{node}.sock"))
    }

    /// Where meshd on `node` writes its env file (`MESH_IP`, `MESH_MTU`…).
    pub fn env_file(&self, node: &str) -> PathBuf {
        self.dir().join(format!("{node}.env"))
    }

    pub fn log_path(&self, label: &str) -> PathBuf {
        self.dir().join(format!("{label}.log"))
    }

    /// Starts `program args…` in `machine`'s namespace, its output in
    /// `<label>.log`, as a daemon of the lab: its log is printed if the
    /// test fails and it is stopped with the lab. `ip netns exec` execs
    /// the program, so the child is the daemon itself.
    pub fn spawn(&self, machine: &str, label: &str, program: &str, args: &[&str]) {
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
    pub fn assert_running(&self, label: &str) {
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
    pub fn assert_all_running(&self) {
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

    fn start_rendezvous(&mut self, release: &Release) {
        let dir = self.state_dir("rv");
        let dir = utf8(&dir);
        let out = output(
            utf8(&release.rendezvous),
            &[
                "--state-dir",
                dir,
                "init",
                "--listen",
                "0.0.0.0:7443",
                "--public-addr",
                &topology().rendezvous.to_string(),
            ],
        );
        assert_success(&out, "mesh-rendezvous init");
        self.serve_rendezvous(release);
    }

    /// `mesh-rendezvous serve` on the lab's rendezvous state directory;
    /// returns once its admin socket answers.
    fn serve_rendezvous(&self, release: &Release) {
        let dir = self.state_dir("rv");
        self.spawn(
            "rv",
            "rendezvous",
            utf8(&release.rendezvous),
            &["--state-dir", utf8(&dir), "serve"],
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
    fn create_token(&self, uses: usize, release: &Release) -> Vec<String> {
        let dir = self.state_dir("rv");
        let uses = uses.to_string();
        let out = output(
            utf8(&release.rendezvous),
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

    /// `meshd join` with the token's line, then `meshd run --state-dir …
    /// --env-file …`.
    fn start_meshd(&mut self, node: &str, join: &[String], release: &Release) {
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
        let lab_node = topology().node(node);
        let advertised = format!("{}:{LISTEN_PORT}", lab_node.public);
        if lab_node.kind == Kind::OneToOne {
            args.extend(["--advertise-endpoint", &advertised]);
        }
        assert_success(
            &output(utf8(&release.meshd), &args),
            &format!("`meshd {}`", args.join(" ")),
        );
        self.run_meshd(node, release);
    }

    /// `meshd run` on `node`'s state directory (after `meshd join`).
    fn run_meshd(&self, node: &str, release: &Release) {
        let (state_dir, env_file) = (self.state_dir(node), self.env_file(node));
        let args = [
            "run",
            "--state-dir",
            utf8(&state_dir),
            "--env-file",
            utf8(&env_file),
        ];
        self.spawn(node, node, utf8(&release.meshd), &args);
    }

    /// Stops the daemon `label` as systemd would (SIGTERM, then waits for
    /// it to exit) and forgets it; its log is kept as `<label>.<n>.log`.
    pub fn stop(&self, label: &str) {
        let mut daemons = self.daemons.borrow_mut();
        let i = daemons
            .iter()
            .position(|(l, _)| l == label)
            .unwrap_or_else(|| panic!("no daemon {label}"));
        let (_, mut child) = daemons.remove(i);
        drop(daemons);
        let pid = child.id().to_string();
        let _ = output("kill", &["-TERM", &pid]);
        eventually(
            &format!("{label} exits on SIGTERM"),
            START_DEADLINE,
            || match child.try_wait() {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err("still running".into()),
                Err(e) => Err(e.to_string()),
            },
        );
        let n = (0..)
            .find(|n| !self.dir().join(format!("{label}.{n}.log")).exists())
            .unwrap_or(0);
        let _ = fs::rename(
            self.log_path(label),
            self.dir().join(format!("{label}.{n}.log")),
        );
    }

    /// Upgrades (or downgrades) the rendezvous in place: stops it and
    /// serves the same state directory with `release`.
    pub fn restart_rendezvous(&self, release: &Release) {
        self.stop("rendezvous");
        self.serve_rendezvous(release);
    }

    /// Upgrades meshd on `node` in place: stops it and runs `release` on
    /// the same state directory; returns once it has its address again.
    pub fn restart_meshd(&self, node: &str, release: &Release) {
        self.stop(node);
        self.run_meshd(node, release);
        self.wait_for_overlay_ip(node);
    }

    /// Waits until `node`'s meshd answers `meshctl status` with an overlay
    /// IPv4 address, and returns it.
    fn wait_for_overlay_ip(&self, node: &str) -> Ipv4Addr {
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

    /// The keys and values of `node`'s env file, once meshd has written it.
    pub fn wait_for_env(&self, node: &str) -> BTreeMap<String, String> {
        let path = self.env_file(node);
        eventually(
            &format!("meshd on {node} writes {}", path.display()),
            START_DEADLINE,
            || {
                self.assert_running(node);
                let text = fs::read_to_string(&path).map_err(|e| e.to_string())?;
                text.lines()
                    .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
                    .map(|l| {
                        let (k, v) = l.split_once('=').ok_or_else(|| format!("line {l:?}"))?;
                        Ok((k.to_owned(), v.trim_matches('"').to_owned()))
                    })
                    .collect()
            },
        )
    }

    /// `MESH_MTU` from `node`'s env file.
    pub fn mesh_mtu(&self, node: &str) -> u32 {
        let env = self.wait_for_env(node);
        env.get("MESH_MTU")
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("{node}'s env file has no numeric MESH_MTU: {env:?}"))
    }

    /// `meshctl --socket … <command> --json` for `node`, parsed.
    pub fn meshctl(&self, node: &str, command: &str) -> Result<serde_json::Value, String> {
        self.meshctl_with(node, &[command])
    }

    /// `meshctl --socket … <args…> --json` for `node`, parsed.
    pub fn meshctl_with(&self, node: &str, args: &[&str]) -> Result<serde_json::Value, String> {
        self.assert_all_running();
        meshctl_json(&self.socket(node), args)
    }

    /// What `from` reports about its peer `to`: (path, endpoint).
    pub fn path(&self, from: &str, to: &str) -> Result<(String, Option<String>), String> {
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
    pub fn wait_for_path(&self, from: &str, to: &str, expected: &str) {
        eventually(
            &format!("{from} reaches {to} over a {expected} path"),
            SETTLE_DEADLINE,
            || match self.path(from, to)? {
                (path, _) if path == expected => Ok(()),
                (path, endpoint) => Err(format!("path {path}, endpoint {endpoint:?}")),
            },
        );
    }

    /// Waits until `a` and `b` both report the path `expected` to each other.
    pub fn wait_for_paths(&self, a: &str, b: &str, expected: &str) {
        self.wait_for_path(a, b, expected);
        self.wait_for_path(b, a, expected);
    }

    /// `node`'s overlay IPv4 address.
    pub fn overlay(&self, node: &str) -> Ipv4Addr {
        *self
            .overlay
            .get(node)
            .unwrap_or_else(|| panic!("{node} runs no meshd in this lab"))
    }

    /// Runs `args` in `machine`'s namespace and returns its output,
    /// whatever its status.
    pub fn exec_in(&self, machine: &str, args: &[&str]) -> Output {
        let ns = self.ns(machine);
        let mut all = vec!["netns", "exec", &ns];
        all.extend_from_slice(args);
        output("ip", &all)
    }

    /// Runs `args` in `machine`'s namespace and asserts it succeeded;
    /// returns its standard output.
    pub fn run_in(&self, machine: &str, args: &[&str]) -> String {
        let out = self.exec_in(machine, args);
        assert_success(&out, &format!("`{}` in {machine}", args.join(" ")));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One ping of `address` from `from`, with `extra` ping options; Err
    /// with ping's output when no answer came.
    pub fn ping_address(&self, from: &str, address: IpAddr, extra: &[&str]) -> Result<(), String> {
        self.assert_all_running();
        let ip = address.to_string();
        let mut args = vec!["ping", "-n", "-c", "1", "-W", "2"];
        args.extend_from_slice(extra);
        args.push(&ip);
        let out = self.exec_in(from, &args);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ping {} {ip} from {from}: {}: {}{}",
                extra.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// One ping of `to`'s overlay address from `from`, with `extra` ping
    /// options; Err with ping's output when no answer came.
    pub fn ping_once(&self, from: &str, to: &str, extra: &[&str]) -> Result<(), String> {
        self.ping_address(from, IpAddr::V4(self.overlay(to)), extra)
    }

    /// Waits until `a` and `b` can ping each other over the overlay.
    pub fn wait_for_reach(&self, a: &str, b: &str) {
        for (from, to) in [(a, b), (b, a)] {
            eventually(
                &format!("{from} pings {to} over the overlay"),
                REACH_DEADLINE,
                || self.ping_once(from, to, &[]),
            );
        }
    }

    /// A TCP connection from `from` to `to`'s overlay address carrying
    /// `amount` seeded pseudo-random bytes, hashed at both ends.
    pub fn tcp_transfer(&self, from: &str, to: &str, amount: Amount, seed: u64) -> TcpTransfer {
        self.tcp_transfer_to(from, to, IpAddr::V4(self.overlay(to)), amount, seed)
    }

    /// [`MeshLab::tcp_transfer`] to `address`, an address of `to` other
    /// than its overlay address (one on a device over the overlay).
    pub fn tcp_transfer_to(
        &self,
        from: &str,
        to: &str,
        address: IpAddr,
        amount: Amount,
        seed: u64,
    ) -> TcpTransfer {
        self.assert_all_running();
        let what = format!("{amount:?} over TCP from {from} to {to} ({address})");
        let (from, to) = (self.ns(from), self.ns(to));
        TcpTransfer::start(what, &from, &to, address, amount, seed, REACH_DEADLINE)
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
            eprintln!(
                "lab {}: the daemons' logs\n{}",
                self.lab.prefix,
                self.logs()
            );
        }
        // `down` stops every daemon running on a state directory of this
        // lab and whatever else is left in its namespaces.
        self.lab.down();
        for (_, child) in self.daemons.get_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One lab built by `deploy/lab/up` under its own `LAB_PREFIX`, with no
/// daemons; dropping it runs `deploy/lab/down`.
pub struct NatLab {
    prefix: String,
    dir: PathBuf,
    is_up: bool,
}

impl NatLab {
    /// Builds a lab named `<stem><pid>-<n>`, first removing the labs of
    /// this stem that a killed run left behind.
    pub fn up(stem: &'static str) -> Self {
        require_root();
        let first_of_stem = SWEPT.lock().unwrap_or_else(|e| e.into_inner()).insert(stem);
        if first_of_stem {
            sweep_leftovers(stem);
        }
        let prefix = format!(
            "{stem}{}-{}",
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
    pub fn script(&self, name: &str) -> Output {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/lab")
            .join(name);
        Command::new(&path)
            .env("LAB_PREFIX", &self.prefix)
            .env("LAB_DIR", &self.dir)
            // One rendezvous machine, "rv", whatever the caller's environment.
            .env("LAB_SERVERS", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()))
    }

    /// Runs `deploy/lab/down` (once; the guard does not run it again).
    pub fn down(&mut self) -> Output {
        self.is_up = false;
        let out = self.script("down");
        if !out.status.success() {
            eprintln!(
                "deploy/lab/down failed for {}: {}",
                self.prefix,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }

    /// The lab's directory (`LAB_DIR`), removed by `deploy/lab/down`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The namespace of a machine: "inet", "rv", a node or a router.
    pub fn ns(&self, machine: &str) -> String {
        format!("{}-{machine}", self.prefix)
    }

    /// Names of the namespaces of this lab that exist now.
    pub fn namespaces(&self) -> Vec<String> {
        let mine = format!("{}-", self.prefix);
        namespace_names()
            .into_iter()
            .filter(|name| name.starts_with(&mine))
            .collect()
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        if self.is_up {
            self.down();
        }
    }
}

/// [`crate::common::eventually`], trying again every [`POLL_INTERVAL`] of
/// this module's (a lab runs many daemons; it is polled less often).
pub fn eventually<T>(
    what: &str,
    within: Duration,
    attempt: impl FnMut() -> Result<T, String>,
) -> T {
    eventually_every(what, within, POLL_INTERVAL, attempt)
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

/// Removes the labs of earlier runs named `<stem><pid>-…` whose test
/// process is gone (killed before its guards could run `deploy/lab/down`):
/// the processes still inside their namespaces, the namespaces, and their
/// directories.
fn sweep_leftovers(stem: &str) {
    let mut dead = std::collections::BTreeSet::new();
    for name in namespace_names() {
        let Some(rest) = name.strip_prefix(stem) else {
            continue;
        };
        let Some((pid, rest)) = rest.split_once('-') else {
            continue;
        };
        let Some((n, _machine)) = rest.split_once('-') else {
            continue;
        };
        if !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !n.is_empty()
            && n.bytes().all(|b| b.is_ascii_digit())
            && !Path::new("/proc").join(pid).exists()
        {
            dead.insert(format!("{stem}{pid}-{n}"));
        }
    }
    for prefix in dead {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/lab/down");
        let _ = Command::new(&path)
            .env("LAB_PREFIX", &prefix)
            .env("LAB_DIR", std::env::temp_dir().join(&prefix))
            .stdin(Stdio::null())
            .output();
    }
}
