//! Harness for the tests that run the real binaries in the NAT lab of
//! `deploy/lab`: a rendezvous and meshd on some of the lab's nodes, enrolled
//! as `deploy/lab/demo` does it, and helpers to run things inside the
//! nodes' namespaces. Needs root; does I/O (namespaces, processes, files).
//!
//! A [`MeshLab`] has one rendezvous server, "rv", on its file store
//! ([`MeshLab::with_mesh_of`]), or one on each rendezvous machine of the
//! topology, "rv" and "rv2", sharing the mesh in an etcd whose members run
//! on lab machines ([`MeshLab::with_servers_on_etcd`], tests/common/etcd.rs's
//! [`EtcdCluster`]); each server is the lab daemon labelled by its machine.
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

use super::etcd::EtcdCluster;
use super::topology::{topology, Kind};
use super::{
    assert_success, eventually_every, init_on_etcd_args, meshctl_json, output, require_root,
    server_add_args, utf8, Amount, JoinLine, TcpTransfer, LISTEN_PORT, MESHD, MESH_RENDEZVOUS,
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
    /// Daemons started here, by label (a server's machine, "rv" or "rv2",
    /// a node's name, or whatever a test passed to [`MeshLab::spawn`]).
    daemons: RefCell<Vec<(String, Child)>>,
    /// The nodes running meshd and their overlay IPv4 addresses.
    overlay: BTreeMap<&'static str, Ipv4Addr>,
    /// The mesh's store when it is kept in etcd, its members in lab
    /// namespaces. `deploy/lab/down` stops the servers (by their state
    /// directories) before it ends what else runs in the namespaces, etcd
    /// among it, so the servers never outlive their store.
    etcd: Option<EtcdCluster>,
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

    /// [`MeshLab::with_mesh_of`], with `prepare` run on the bare lab
    /// before any daemon starts (a service on a lab machine that the nodes
    /// should find from their first moment); returns what it returned.
    pub fn with_mesh_of_prepared<T>(
        stem: &'static str,
        nodes: &[&'static str],
        prepare: impl FnOnce(&MeshLab) -> T,
    ) -> (Self, T) {
        let release = Release::current();
        let mut lab = Self::empty(NatLab::up(stem));
        let prepared = prepare(&lab);
        lab.start_mesh(nodes, &release);
        (lab, prepared)
    }

    fn build(stem: &'static str, nodes: &[&'static str], release: &Release) -> Self {
        let mut lab = Self::empty(NatLab::up(stem));
        lab.start_mesh(nodes, release);
        lab
    }

    /// The rendezvous on "rv", one token for all, and meshd on each of `nodes`.
    fn start_mesh(&mut self, nodes: &[&'static str], release: &Release) {
        let lab = self;
        lab.start_rendezvous(release);
        let join = lab.create_token(nodes.len(), release);
        for &node in nodes {
            lab.start_meshd(node, &join, release);
        }
        lab.wait_for_overlay_ips(nodes);
    }

    /// A lab with every rendezvous machine of the topology ("rv", "rv2")
    /// serving one mesh kept in a three-member etcd, one member on each of
    /// `etcd_on` (machines of the lab, on their NIC's address), as
    /// `deploy/lab/demo` builds it: the first server creates the mesh,
    /// issues the others' certificates (`server add`) and the token. Each
    /// of `homes` (node, server) joins with the token's line naming only
    /// that server, so that it homes there (it learns the others from its
    /// welcome). Returns once every node has its overlay address.
    pub fn with_servers_on_etcd(
        stem: &'static str,
        etcd_on: &[&'static str],
        homes: &[(&'static str, &'static str)],
    ) -> Self {
        let release = Release::current();
        let servers: Vec<&'static str> = topology()
            .rendezvous_machines
            .iter()
            .map(|m| m.name)
            .collect();
        let mut lab = Self::empty(NatLab::up_with_servers(stem, servers.len()));
        let places: Vec<(String, Ipv4Addr)> = etcd_on
            .iter()
            .map(|m| (lab.ns(m), topology().address_of(m)))
            .collect();
        let etcd = lab.etcd.insert(EtcdCluster::on(&places));
        let endpoints = etcd.endpoints();
        // A key prefix of the lab's own: its etcd is, too, but a name says
        // whose keys they are.
        let key_prefix = format!("/meshd/{}/", lab.lab.prefix);
        let first = servers[0];
        for &server in &servers {
            let public = topology().rendezvous_machine(server).address.to_string();
            let mut init = init_on_etcd_args(&public, server, &endpoints, &key_prefix);
            if server != first {
                let bundle = lab.dir().join(format!("server-{server}"));
                lab.rendezvous_admin(first, &server_add_args(server, &bundle), &release)
                    .unwrap_or_else(|e| panic!("{e}"));
                init.extend(["--certificate-from".to_owned(), utf8(&bundle).to_owned()]);
            }
            let init: Vec<&str> = init.iter().map(String::as_str).collect();
            lab.rendezvous_admin(server, &init, &release)
                .unwrap_or_else(|e| panic!("{e}"));
            lab.serve_rendezvous(server, &release);
        }
        // Each server announces itself in etcd as it starts; the token's
        // join line names those announced.
        eventually(
            "every server of the mesh is announced",
            START_DEADLINE,
            || {
                let listed = lab.rendezvous_json(first, &["server", "list", "--json"])?;
                match listed.as_array().map(Vec::len) {
                    Some(n) if n == servers.len() => Ok(()),
                    _ => Err(format!("server list: {listed}")),
                }
            },
        );
        let join = lab.create_token(homes.len(), &release);
        for &(node, home) in homes {
            let home = topology().rendezvous_machine(home).address;
            lab.start_meshd(node, &join.via_addrs(&[home.into()]), &release);
        }
        let nodes: Vec<&'static str> = homes.iter().map(|&(node, _)| node).collect();
        lab.wait_for_overlay_ips(&nodes);
        lab
    }

    /// A mesh lab of `lab`, with nothing running yet and its directory made.
    /// The guard holds the lab first, so that a half-built one is removed too.
    fn empty(lab: NatLab) -> Self {
        let lab = MeshLab {
            lab,
            daemons: RefCell::new(Vec::new()),
            overlay: BTreeMap::new(),
            etcd: None,
        };
        fs::create_dir_all(lab.dir()).expect("create the lab directory");
        lab
    }

    /// Waits until each of `nodes` has its overlay address, and keeps them.
    fn wait_for_overlay_ips(&mut self, nodes: &[&'static str]) {
        for &node in nodes {
            let ip = self.wait_for_overlay_ip(node);
            self.overlay.insert(node, ip);
        }
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
        self.serve_rendezvous("rv", release);
    }

    /// `mesh-rendezvous serve` on the state directory of the server on
    /// `machine` ("rv", "rv2"), as the daemon labelled `machine`; returns
    /// once its admin socket answers.
    pub fn serve_rendezvous(&self, machine: &str, release: &Release) {
        let dir = self.state_dir(machine);
        self.spawn(
            machine,
            machine,
            utf8(&release.rendezvous),
            &["--state-dir", utf8(&dir), "serve"],
        );
        let admin = dir.join("admin.sock");
        eventually(
            &format!("mesh-rendezvous on {machine} accepts on its admin socket"),
            START_DEADLINE,
            || {
                self.assert_running(machine);
                UnixStream::connect(&admin)
                    .map(drop)
                    .map_err(|e| format!("{}: {e}", admin.display()))
            },
        );
    }

    /// `mesh-rendezvous --state-dir <its state dir> args…` for the server
    /// on `machine`, run in that machine's namespace (a server on etcd
    /// reaches its store from there); its stdout, or `Err` saying why not.
    pub fn rendezvous_admin(
        &self,
        machine: &str,
        args: &[&str],
        release: &Release,
    ) -> Result<String, String> {
        let dir = self.state_dir(machine);
        let mut all = vec![utf8(&release.rendezvous), "--state-dir", utf8(&dir)];
        all.extend_from_slice(args);
        let out = self.exec_in(machine, &all);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "`mesh-rendezvous {}` on {machine} failed with {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// [`MeshLab::rendezvous_admin`] of this tree's build, its output
    /// parsed as JSON (`nodes list --json`, `server list --json`).
    pub fn rendezvous_json(
        &self,
        machine: &str,
        args: &[&str],
    ) -> Result<serde_json::Value, String> {
        let out = self.rendezvous_admin(machine, args, &Release::current())?;
        serde_json::from_str(&out).map_err(|e| {
            format!(
                "`mesh-rendezvous {}` printed no JSON ({e}): {out}",
                args.join(" ")
            )
        })
    }

    /// `mesh-rendezvous token create` on "rv" for `uses` nodes: the
    /// `meshd join` line it prints.
    fn create_token(&self, uses: usize, release: &Release) -> JoinLine {
        let uses = uses.to_string();
        let args = ["token", "create", "--ttl", "1h", "--uses", &uses];
        let stdout = self
            .rendezvous_admin("rv", &args, release)
            .unwrap_or_else(|e| panic!("{e}"));
        let line = stdout
            .lines()
            .find(|l| l.starts_with("meshd join "))
            .unwrap_or_else(|| panic!("`token create` prints a `meshd join` line: {stdout}"));
        JoinLine(line.to_owned())
    }

    /// `meshd join` with the token's line, then `meshd run --state-dir …
    /// --env-file …`.
    fn start_meshd(&mut self, node: &str, join: &JoinLine, release: &Release) {
        let state_dir = self.state_dir(node);
        let socket = self.socket(node);
        let name = format!("node-{node}");
        let mut args = join.meshd_args();
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
        self.signal_and_forget(label, "TERM");
    }

    /// Kills the daemon `label` with SIGKILL, as a crash or the loss of its
    /// machine ends it, and forgets it; its log is kept as `<label>.<n>.log`.
    pub fn kill(&self, label: &str) {
        self.signal_and_forget(label, "KILL");
    }

    fn signal_and_forget(&self, label: &str, signal: &str) {
        let mut daemons = self.daemons.borrow_mut();
        let i = daemons
            .iter()
            .position(|(l, _)| l == label)
            .unwrap_or_else(|| panic!("no daemon {label}"));
        let (_, mut child) = daemons.remove(i);
        drop(daemons);
        let pid = child.id().to_string();
        let _ = output("kill", &[&format!("-{signal}"), &pid]);
        eventually(
            &format!("{label} exits on SIG{signal}"),
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

    /// Upgrades (or downgrades) the rendezvous on "rv" in place: stops it
    /// and serves the same state directory with `release`.
    pub fn restart_rendezvous(&self, release: &Release) {
        self.stop("rv");
        self.serve_rendezvous("rv", release);
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

    /// What `from` reports about its peer `to` in `meshctl peers --json`.
    pub fn peer(&self, from: &str, to: &str) -> Result<serde_json::Value, String> {
        let peers = self.meshctl(from, "peers")?;
        let name = format!("node-{to}");
        peers
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name.as_str())
            .cloned()
            .ok_or_else(|| format!("{from} does not list {name} among its peers"))
    }

    /// What `from` reports about its peer `to`: (path, endpoint).
    pub fn path(&self, from: &str, to: &str) -> Result<(String, Option<String>), String> {
        let name = format!("node-{to}");
        let peer = self.peer(from, to)?;
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

    /// The log of the daemon `label` so far.
    pub fn log(&self, label: &str) -> String {
        fs::read_to_string(self.log_path(label)).unwrap_or_default()
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
    /// How many of the topology's rendezvous machines it has (`LAB_SERVERS`).
    servers: usize,
    is_up: bool,
}

impl NatLab {
    /// Builds a lab named `<stem><pid>-<n>` with one rendezvous machine,
    /// "rv", first removing the labs of this stem that a killed run left
    /// behind.
    pub fn up(stem: &'static str) -> Self {
        Self::up_with_servers(stem, 1)
    }

    /// [`NatLab::up`] with the first `servers` rendezvous machines of the
    /// topology ("rv", then "rv2").
    pub fn up_with_servers(stem: &'static str, servers: usize) -> Self {
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
            servers,
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
            // The lab's rendezvous machines, whatever the caller's environment.
            .env("LAB_SERVERS", self.servers.to_string())
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
