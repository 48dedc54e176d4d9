//! A real etcd cluster for the tests of the shared store: Debian's `etcd`
//! (package etcd-server) with 1 or 3 members, `etcdctl` (etcd-client) to
//! ask it who leads. Needs root; does I/O (a namespace, processes, files).
//!
//! [`EtcdCluster::new`] starts the members inside a fresh network namespace
//! of the cluster's own (`mt<pid>-etcd<n>`, lo up, members on 127.0.0.1 with
//! distinct ports), so nothing of it is reachable from the host or from
//! another test; [`EtcdCluster::on`] starts them on given (namespace,
//! address) pairs instead, such as lab machines, on etcd's usual ports.
//! Data directories and logs are in a temp dir. `Drop` kills the members,
//! prints their logs when the test is failing, and removes the namespace
//! it created; the leftovers of a run killed before that are swept by
//! tests/common's sweep (same `mt<pid>-` naming).
//!
//! The test process is not in that namespace: the Rust client runs on a
//! thread that entered it (`setns` of that thread only, through
//! [`super::in_namespace`]) with a current-thread tokio runtime of its own,
//! so every socket the client opens, and every task it spawns, is inside:
//! [`EtcdCluster::block_on`]. Test code that must stop a member in the
//! middle of that async code shares the cluster in an `Arc` (every method
//! takes `&self`) and calls it through `spawn_blocking`.
//!
//! Waiting is "poll for a condition until a deadline" ([`eventually`]).

use std::fs::OpenOptions;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use super::{
    eventually, in_namespace, ip, kill_processes_in, output, require_root, sweep_leftovers,
    NS_PREFIX, SWEEP,
};

/// How long members may take to elect a leader and answer.
pub const ETCD_DEADLINE: Duration = Duration::from_secs(30);
const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;
/// How many lines of each member's log a failing test prints.
const LOG_TAIL: usize = 60;

static CLUSTER_COUNTER: AtomicU32 = AtomicU32::new(0);

/// One etcd member: where it listens, and its process while it runs.
struct Member {
    name: String,
    ns: String,
    ip: Ipv4Addr,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    process: Option<Child>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.peer_port)
    }
}

/// A running etcd cluster; see the module's doc.
pub struct EtcdCluster {
    id: String,
    /// The namespace the cluster created, removed on drop; `None` when its
    /// members run in namespaces someone else owns.
    own_ns: Option<String>,
    dir: tempfile::TempDir,
    members: Mutex<Vec<Member>>,
    initial_cluster: String,
}

impl EtcdCluster {
    /// `n` members (1 or 3) in a fresh namespace of the cluster's own, on
    /// 127.0.0.1; returns once they have a leader.
    pub fn new(n: usize) -> Self {
        require_root();
        assert!(n == 1 || n == 3, "an etcd cluster of 1 or 3 members");
        SWEEP.call_once(sweep_leftovers);
        let id = next_id();
        let ns = id.clone();
        ip(&format!("netns add {ns}"));
        ip(&format!("-n {ns} link set lo up"));
        let places: Vec<(String, Ipv4Addr, u16, u16)> = (0..n)
            .map(|i| {
                let i = u16::try_from(i).expect("few members");
                (
                    ns.clone(),
                    Ipv4Addr::LOCALHOST,
                    CLIENT_PORT + 10 * i,
                    PEER_PORT + 10 * i,
                )
            })
            .collect();
        Self::start(id, Some(ns), &places)
    }

    /// One member in each of `places` (namespace, address), which exist
    /// already and stay when the cluster is dropped, on ports 2379/2380;
    /// returns once they have a leader.
    pub fn on(places: &[(String, Ipv4Addr)]) -> Self {
        require_root();
        SWEEP.call_once(sweep_leftovers);
        let places: Vec<_> = places
            .iter()
            .map(|(ns, ip)| (ns.clone(), *ip, CLIENT_PORT, PEER_PORT))
            .collect();
        Self::start(next_id(), None, &places)
    }

    fn start(id: String, own_ns: Option<String>, places: &[(String, Ipv4Addr, u16, u16)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{id}-"))
            .tempdir()
            .expect("create the cluster's temp dir");
        let members: Vec<Member> = places
            .iter()
            .enumerate()
            .map(|(i, (ns, ip, client_port, peer_port))| Member {
                name: format!("m{i}"),
                ns: ns.clone(),
                ip: *ip,
                client_port: *client_port,
                peer_port: *peer_port,
                data_dir: dir.path().join(format!("m{i}.etcd")),
                log: dir.path().join(format!("etcd-m{i}.log")),
                process: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let cluster = EtcdCluster {
            id,
            own_ns,
            dir,
            members: Mutex::new(members),
            initial_cluster,
        };
        for i in 0..cluster.len() {
            cluster.start_member(i);
        }
        cluster.wait_healthy();
        cluster
    }

    fn members(&self) -> std::sync::MutexGuard<'_, Vec<Member>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.members().len()
    }

    /// Every member's client URL, running or not, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members().iter().map(Member::client_url).collect()
    }

    /// The namespace the client runs in: the cluster's own, or the first
    /// member's.
    pub fn client_ns(&self) -> String {
        match &self.own_ns {
            Some(ns) => ns.clone(),
            None => self.members()[0].ns.clone(),
        }
    }

    /// The cluster's temp dir (data directories and logs).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Starts member `i` (again): a restarted member keeps its data
    /// directory and rejoins.
    pub fn start_member(&self, i: usize) {
        let mut members = self.members();
        let member = &mut members[i];
        assert!(member.process.is_none(), "etcd {} is running", member.name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log)
            .expect("open an etcd log");
        let stderr = log.try_clone().expect("clone a log file handle");
        let (client, peer) = (member.client_url(), member.peer_url());
        let child = Command::new("ip")
            .args(["netns", "exec", &member.ns, "etcd"])
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(&member.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.id])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd {}: {e}", member.name));
        member.process = Some(child);
    }

    /// Kills member `i` (SIGKILL: a crash, not a goodbye) and waits for it.
    pub fn stop_member(&self, i: usize) {
        let mut members = self.members();
        let member = &mut members[i];
        let mut child = member
            .process
            .take()
            .unwrap_or_else(|| panic!("etcd {} is not running", member.name));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// `etcdctl args…` against the running members, from inside the client
    /// namespace; `Err` with its stderr when it fails.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String, String> {
        let endpoints = self.running_endpoints().join(",");
        let ns = self.client_ns();
        let mut all = vec![
            "netns",
            "exec",
            &ns,
            "etcdctl",
            "--endpoints",
            &endpoints,
            "--dial-timeout=2s",
            "--command-timeout=5s",
        ];
        all.extend_from_slice(args);
        let out = output("ip", &all);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "`etcdctl {}`: {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn running_endpoints(&self) -> Vec<String> {
        self.members()
            .iter()
            .filter(|m| m.process.is_some())
            .map(Member::client_url)
            .collect()
    }

    /// `Ok(leader index)` once every running member answers and all name
    /// the same running leader.
    fn try_leader(&self) -> Result<usize, String> {
        let json = self.etcdctl(&["endpoint", "status", "--write-out", "json"])?;
        let statuses: Vec<serde_json::Value> =
            serde_json::from_str(&json).map_err(|e| format!("{e}: {json}"))?;
        let running = self.running_endpoints();
        if statuses.len() != running.len() {
            return Err(format!("not every running member answered: {json}"));
        }
        let leaders: Vec<u64> = statuses
            .iter()
            .filter_map(|s| s["Status"]["leader"].as_u64())
            .collect();
        let leader = match leaders[..] {
            [first, ..] if first != 0 && leaders.iter().all(|l| *l == first) => first,
            _ => return Err(format!("no agreed leader yet: {json}")),
        };
        let endpoint = statuses
            .iter()
            .find(|s| s["Status"]["header"]["member_id"].as_u64() == Some(leader))
            .and_then(|s| s["Endpoint"].as_str())
            .ok_or_else(|| format!("the leader {leader:x} is not a running member: {json}"))?;
        self.endpoints()
            .iter()
            .position(|e| e == endpoint)
            .ok_or_else(|| format!("{endpoint} is not one of this cluster's"))
    }

    /// The index of the member that leads now (waiting for an election).
    pub fn leader(&self) -> usize {
        eventually("etcd has a leader", ETCD_DEADLINE, || self.try_leader())
    }

    /// Waits until every running member answers and they agree on a
    /// leader.
    pub fn wait_healthy(&self) {
        self.leader();
    }

    /// Runs the future that `f` makes on a thread inside the client
    /// namespace, on a current-thread tokio runtime that ends with it, and
    /// returns its output (a panic in it is this thread's).
    pub fn block_on<T, Fut>(&self, f: impl FnOnce() -> Fut + Send + 'static) -> T
    where
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let ns = self.client_ns();
        let thread = in_namespace(&ns, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            runtime.block_on(f())
        });
        match thread.join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

fn next_id() -> String {
    format!(
        "{NS_PREFIX}{}-etcd{}",
        std::process::id(),
        CLUSTER_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        let mut members = self.members();
        for member in members.iter_mut() {
            if let Some(mut child) = member.process.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if thread::panicking() {
            for member in members.iter() {
                let text = std::fs::read_to_string(&member.log)
                    .unwrap_or_else(|e| format!("(unreadable: {e})"));
                // etcd is verbose: its last lines say what it was doing.
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n");
                eprintln!(
                    "===== etcd {} log, last {LOG_TAIL} lines ({}) =====\n{tail}\n===== end of etcd {} log =====",
                    member.name,
                    member.log.display(),
                    member.name
                );
            }
        }
        drop(members);
        if let Some(ns) = &self.own_ns {
            kill_processes_in(ns);
            let _ = output("ip", &["netns", "del", ns]);
        }
    }
}
