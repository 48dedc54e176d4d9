//! The control plane at scale: N simulated nodes over real QUIC, from this
//! one process, against real `mesh-rendezvous` processes (the release
//! build), with one server on the file store and with two servers sharing
//! a real etcd (Debian's `etcd-server`).
//!
//! Each simulated node is what meshd is to its rendezvous: its own key and
//! UDP socket (a source address of its own, 127.N.N.N, as nodes behind
//! different NATs have), the hello with its proof and token, a candidate,
//! and a session kept open that reads every peer-map delta. Measured:
//!
//! - joins per second, `--concurrency` admissions in flight, each node
//!   keeping its session (so every join is a delta to every member);
//! - the time one change takes to reach every member: a further node
//!   joining (from its hello to its welcome, and to the last member reading
//!   its entry), and a member's candidates changing as a roaming node's do
//!   (from its message to the last other member reading its entry);
//! - each server's resident memory (now and peak) and CPU time, read from
//!   /proc; this process's own CPU, since both share the machine;
//! - with `--restart` (one server on its file store): the server restarted
//!   under its N nodes, each reconnecting exactly as meshd does
//!   (`client::Reconnect`): SIGTERM to exit, then the time until every node
//!   is admitted again, admission p50/p99 counted from the SIGTERM, failed
//!   attempts, the deltas it caused, and the new server's CPU and memory;
//!   one restart per `--restart-offers`: nodes that offer no digest of the
//!   map they hold (`none`: a node before 0.4.0), then nodes that do
//!   (`digest`: meshd now), and how many welcomes left the map out;
//! - with `--failover` (two servers on etcd): one server killed (SIGKILL:
//!   no going away) under its half of the N nodes, which go on at the other
//!   server as meshd does (`client::Servers`): the time from the kill until
//!   every one of them is admitted there, admission p50/p99, failed
//!   attempts, welcomes without the map, and the surviving server's CPU
//!   and memory; one fresh mesh per `--failover-offers`.
//!
//! ```text
//! cargo bench --bench scale -- [--nodes 1000,5000] [--store file,etcd] [--concurrency 64]
//!     [--restart] [--restart-offers none,digest] [--failover] [--failover-offers none,digest]
//! ```
//!
//! Root is not needed. Figures: BENCHMARKS.md, "The control plane at scale".

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark harness: a failed step ends the run with its message"
)]

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use meshd::identity::PublicKey;
use meshd::wire::control::{Candidate, CandidateKind, NodeMessage};
#[path = "../tests/common/simnodes.rs"]
#[allow(dead_code, reason = "the namespace runner is for the lab tests")]
mod simnodes;
use simnodes::{live_on, JoinLine, Node, Watch};
use tokio::sync::Semaphore;

/// The server measured, unless `--rendezvous` names another build.
const RENDEZVOUS: &str = env!("CARGO_BIN_EXE_mesh-rendezvous");
static BINARY: OnceLock<std::path::PathBuf> = OnceLock::new();

fn rendezvous_binary() -> &'static Path {
    BINARY.get().map_or(Path::new(RENDEZVOUS), |p| p.as_path())
}
/// Room for 65,000 nodes: the default /20 holds 4,094.
const CIDR: &str = "10.96.0.0/16";
/// How long the deltas of the join phase may take to arrive before the
/// run goes on without them (and says how many were missing).
const SETTLE_LIMIT: Duration = Duration::from_secs(300);
/// Changes measured after the joins: each a further node joining.
const PROBES: usize = 3;
/// How long the sessions are kept idle to measure what keeping them costs.
const IDLE: Duration = Duration::from_secs(10);
/// How long a restart's nodes may take to be back before the run goes on.
const RESTART_LIMIT: Duration = Duration::from_secs(300);

#[derive(Parser)]
#[command(about = "Control-plane scale: simulated nodes against real mesh-rendezvous servers")]
struct Args {
    /// Mesh sizes to run, one fresh mesh each.
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 5000])]
    nodes: Vec<usize>,
    /// Stores: one server on the file store, two servers on etcd.
    #[arg(long, value_delimiter = ',', default_values = ["file", "etcd"])]
    store: Vec<Store>,
    /// Admissions in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Another `mesh-rendezvous` to measure (a baseline build); the
    /// simulated nodes stay this tree's.
    #[arg(long, value_name = "PATH")]
    rendezvous: Option<std::path::PathBuf>,
    /// After the other measurements, restart the server (file store only)
    /// and measure how its nodes come back.
    #[arg(long)]
    restart: bool,
    /// What the nodes offer when they come back, one restart each.
    #[arg(long, value_delimiter = ',', default_values = ["none", "digest"])]
    restart_offers: Vec<Offer>,
    /// On etcd, kill one of the two servers under load (instead of the
    /// other measurements' mesh, one fresh mesh per offer).
    #[arg(long)]
    failover: bool,
    /// What the nodes offer at the other server, one mesh each.
    #[arg(long, value_delimiter = ',', default_values = ["none", "digest"])]
    failover_offers: Vec<Offer>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

/// What a node coming back offers in its hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Offer {
    /// Nothing: the welcome carries the whole map (nodes before 0.4.0).
    None,
    /// The digest of the map it holds (`Hello.peers_digest`).
    Digest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Store {
    File,
    Etcd,
}

fn main() {
    let args = Args::parse();
    let binary = args.rendezvous.clone().unwrap_or_else(|| RENDEZVOUS.into());
    BINARY.set(binary).unwrap();
    raise_fd_limit();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut rows = Vec::new();
    for &store in &args.store {
        if store == Store::Etcd && !Path::new("/usr/bin/etcd").exists() {
            eprintln!("etcd runs skipped: /usr/bin/etcd is missing (apt-get install etcd-server)");
            continue;
        }
        for &n in &args.nodes {
            let failovers: Vec<Option<Offer>> = if args.failover && store == Store::Etcd {
                args.failover_offers.iter().copied().map(Some).collect()
            } else {
                vec![None]
            };
            for failover in failovers {
                eprintln!("== {n} nodes, {store:?} store");
                let mut mesh = Mesh::start(store);
                let restarts = if args.restart {
                    args.restart_offers.as_slice()
                } else {
                    &[]
                };
                let row = runtime.block_on(run(&mut mesh, n, args.concurrency, restarts, failover));
                eprintln!("{}", row.markdown());
                rows.push(row);
            }
        }
    }
    println!("\n| store | nodes | joins/s (all / last 10%) | join p50 / p99 | failed join attempts | a further join welcomed (3 runs) | the join read by every member | a member's new candidates read by every other (server / harness CPU meanwhile) | deltas read | server RSS now / peak | server CPU joins / idle 10 s | harness CPU |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in &rows {
        println!("{}", row.markdown());
    }
    let restarts: Vec<&Restart> = rows.iter().flat_map(|r| &r.restarts).collect();
    if !restarts.is_empty() {
        println!("\n| event | nodes | offered | SIGTERM to exit | all back (from SIGTERM or kill) | admission p50 / p99 | failed attempts | welcomes without the map | deltas sent | new or surviving server CPU / RSS |");
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for r in restarts {
            println!("{}", r.markdown());
        }
    }
}

/// What a restart (or a failover) under load measured.
struct Restart {
    /// "restart" or "failover".
    event: &'static str,
    nodes: usize,
    offer: Offer,
    unchanged: u64,
    /// SIGTERM to exit; none for a kill.
    exit: Option<Duration>,
    back: usize,
    all_back: Option<Duration>,
    p50: Duration,
    p99: Duration,
    failed: u64,
    deltas: u64,
    cpu: f64,
    rss: u64,
}

impl Restart {
    fn markdown(&self) -> String {
        let s = |d: Duration| format!("{:.1} s", d.as_secs_f64());
        format!(
            "| {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {:.1} s / {} MiB |",
            self.event,
            self.nodes,
            match self.offer {
                Offer::None => "nothing",
                Offer::Digest => "map digest",
            },
            self.exit.map_or_else(|| "killed".to_owned(), s),
            self.all_back.map_or_else(
                || format!(
                    "{} of {} within {}",
                    self.back,
                    self.nodes,
                    s(RESTART_LIMIT)
                ),
                s
            ),
            s(self.p50),
            s(self.p99),
            self.failed,
            self.unchanged,
            self.deltas,
            self.cpu,
            self.rss >> 20,
        )
    }
}

/// What one run measured.
struct Row {
    store: Store,
    nodes: usize,
    joins_per_s: f64,
    last_tenth_per_s: f64,
    join_p50: Duration,
    join_p99: Duration,
    /// Join attempts that failed (and were retried).
    join_failures: u64,
    /// A further node's join: welcomed, and read by every member.
    welcomed: Vec<Duration>,
    reach: Vec<Duration>,
    /// A member's candidates changing, read by every other member; the
    /// server's and the harness's CPU seconds meanwhile.
    moved: Vec<(Duration, (f64, f64))>,
    deltas: u64,
    deltas_expected: u64,
    rss: Vec<(u64, u64)>,
    cpu_joins: f64,
    cpu_idle: f64,
    harness_cpu: f64,
    restarts: Vec<Restart>,
}

impl Row {
    fn markdown(&self) -> String {
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
        let list = |ds: &[Duration]| ds.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", ");
        let rss: Vec<String> = self
            .rss
            .iter()
            .map(|(now, peak)| format!("{} / {} MiB", now >> 20, peak >> 20))
            .collect();
        format!(
            "| {:?} ({} server{}) | {} | {:.0} / {:.0} | {} / {} | {} | {} | {} | {} | {} of {} | {} | {:.1} s / {:.1} s | {:.1} s |",
            self.store,
            self.rss.len(),
            if self.rss.len() == 1 { "" } else { "s" },
            self.nodes,
            self.joins_per_s,
            self.last_tenth_per_s,
            ms(self.join_p50),
            ms(self.join_p99),
            self.join_failures,
            list(&self.welcomed),
            list(&self.reach),
            self.moved
                .iter()
                .map(|(d, (server, harness))| format!(
                    "{} ({:.2} s / {:.2} s CPU)",
                    ms(*d),
                    server,
                    harness
                ))
                .collect::<Vec<_>>()
                .join(", "),
            self.deltas,
            self.deltas_expected,
            rss.join("; "),
            self.cpu_joins,
            self.cpu_idle,
            self.harness_cpu,
        )
    }
}

async fn run(
    mesh: &mut Mesh,
    n: usize,
    concurrency: usize,
    restarts: &[Offer],
    failover: Option<Offer>,
) -> Row {
    let watch = Arc::new(Watch::default());
    let cpu_before: Vec<f64> = mesh.servers.iter().map(|s| cpu_seconds(s.pid())).collect();
    let harness_before = cpu_seconds(std::process::id());

    // Joins: `concurrency` in flight, each node then keeps its session.
    let gate = Arc::new(Semaphore::new(concurrency));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let done_at = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let start = Instant::now();
    let mut joins = Vec::with_capacity(n);
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let (watch, latencies, done_at) = (watch.clone(), latencies.clone(), done_at.clone());
        let servers = mesh.servers_for(i);
        let join = mesh.join.clone();
        joins.push(tokio::spawn(async move {
            let began = Instant::now();
            let node = Node::new(i);
            let session = node.join(&servers[0], &join, &watch).await;
            latencies.lock().unwrap().push(began.elapsed());
            done_at.lock().unwrap().push(Instant::now());
            drop(permit);
            live_on(node, session, servers, &join, watch).await;
        }));
    }
    gate.acquire_many(concurrency as u32)
        .await
        .unwrap()
        .forget();
    let elapsed = start.elapsed();
    let mut done_at = std::mem::take(&mut *done_at.lock().unwrap());
    done_at.sort();
    let tenth = n / 10;
    let last_tenth_per_s = match (done_at.get(n - tenth - 1), done_at.last()) {
        (Some(from), Some(to)) if tenth > 0 => tenth as f64 / (*to - *from).as_secs_f64(),
        _ => f64::NAN,
    };
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
    latencies.sort();
    let join_failures = watch.failed.load(Ordering::Relaxed);
    eprintln!("  {n} joined in {elapsed:.1?} ({join_failures} failed attempts retried)");

    // Every member reads the entry of every node that joined after it.
    let expected = (n as u64) * (n as u64 - 1) / 2;
    let settle = Instant::now();
    let mut last = (0, Instant::now());
    while settle.elapsed() < SETTLE_LIMIT {
        let deltas = watch.deltas.load(Ordering::Relaxed);
        if deltas >= expected {
            break;
        }
        if deltas != last.0 {
            last = (deltas, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(20) {
            eprintln!("  deltas stopped at {deltas} of {expected}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "  deltas settled {:.1?} after the last join",
        settle.elapsed()
    );
    let cpu_joins: f64 = mesh
        .servers
        .iter()
        .zip(&cpu_before)
        .map(|(s, before)| cpu_seconds(s.pid()) - before)
        .sum();
    let deltas = watch.deltas.load(Ordering::Relaxed);

    // One change reaching every member: a further node joins at the first
    // server (admitted, saved, welcomed, then told to every member).
    let mut reach = Vec::new();
    let mut welcomed = Vec::new();
    let mut kept = None;
    for p in 0..PROBES {
        let node = Node::new(n + p);
        let key = node.key.public_key();
        let sent = arm_probe(&watch, key, n);
        let session = node.join(&mesh.servers[0].public, &mesh.join, &watch).await;
        welcomed.push(sent.elapsed());
        let last = probe_reached(&watch, sent, n).await;
        eprintln!(
            "  probe {p}: welcomed after {:.1?}, every member read it {last:.1?} after its hello",
            welcomed[p]
        );
        reach.push(last);
        // The last one stays, to change its candidates below.
        if let Some(old) = kept.replace((key, session)) {
            drop(old);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // A member's candidates change (a roaming node): from its message to
    // every other member reading its entry. Nothing of it is saved.
    let mut moved = Vec::new();
    if let Some((key, (mut session, endpoint))) = kept.take() {
        for p in 0..PROBES {
            let candidate = Candidate {
                addr: SocketAddr::from(([10, 99, 0, 7], 40_000 + p as u16)),
                kind: CandidateKind::Local,
                mapped: None,
            };
            let server_before = cpu_seconds(mesh.servers[0].pid());
            let harness_before = cpu_seconds(std::process::id());
            let sent = arm_probe(&watch, key, n);
            session
                .send(&NodeMessage::Candidates {
                    candidates: vec![candidate],
                })
                .await
                .unwrap();
            let last = probe_reached(&watch, sent, n).await;
            // The CPU both spent meanwhile (the sessions' keepalives too).
            let cpu = (
                cpu_seconds(mesh.servers[0].pid()) - server_before,
                cpu_seconds(std::process::id()) - harness_before,
            );
            eprintln!(
                "  move {p}: every member read it {last:.1?} after it was sent; CPU meanwhile: server {:.2} s, harness {:.2} s",
                cpu.0, cpu.1
            );
            moved.push((last, cpu));
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        drop((session, endpoint));
    }

    // What keeping the sessions costs.
    let idle_before: f64 = mesh.servers.iter().map(|s| cpu_seconds(s.pid())).sum();
    tokio::time::sleep(IDLE).await;
    let cpu_idle = mesh
        .servers
        .iter()
        .map(|s| cpu_seconds(s.pid()))
        .sum::<f64>()
        - idle_before;
    let rss = mesh.servers.iter().map(|s| memory(s.pid())).collect();
    let harness_cpu = cpu_seconds(std::process::id()) - harness_before;
    eprintln!(
        "  sessions open: {} of {n}",
        watch.sessions.load(Ordering::Relaxed)
    );
    let mut measured = Vec::new();
    if mesh.store == Store::File {
        for &offer in restarts {
            measured.push(restart_under_load(mesh, n, &watch, offer).await);
        }
    }
    if let Some(offer) = failover {
        measured.push(failover_under_load(mesh, n, &watch, offer).await);
    }
    for join in joins {
        join.abort();
    }
    Row {
        store: mesh.store,
        nodes: n,
        joins_per_s: n as f64 / elapsed.as_secs_f64(),
        last_tenth_per_s,
        join_p50: latencies
            .get(latencies.len() / 2)
            .copied()
            .unwrap_or_default(),
        join_p99: latencies
            .get(latencies.len() * 99 / 100)
            .copied()
            .unwrap_or_default(),
        join_failures,
        welcomed,
        reach,
        moved,
        deltas,
        deltas_expected: expected,
        rss,
        cpu_joins,
        cpu_idle,
        harness_cpu,
        restarts: measured,
    }
}

/// Starts timing the arrival of `key`'s entry at `members` members.
fn arm_probe(watch: &Watch, key: PublicKey, members: usize) -> Instant {
    *watch.probe.lock().unwrap() = Some((key, Vec::with_capacity(members)));
    watch.probing.store(true, Ordering::Relaxed);
    Instant::now()
}

/// Waits (60 s at most) for `members` members to read the probed entry;
/// how long after `sent` the last of them did.
async fn probe_reached(watch: &Watch, sent: Instant, members: usize) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = watch
            .probe
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |(_, s)| s.len());
        if seen >= members || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    watch.probing.store(false, Ordering::Relaxed);
    let (_, seen) = watch.probe.lock().unwrap().take().unwrap();
    if seen.len() < members {
        eprintln!(
            "  only {} of {members} members read it within 60 s",
            seen.len()
        );
    }
    seen.iter().max().map_or(Duration::MAX, |t| *t - sent)
}

/// SIGTERM to the (only) server while its `n` nodes are connected, a new
/// server on the same state directory at once, as systemd's restart does,
/// and every node back.
async fn restart_under_load(mesh: &mut Mesh, n: usize, watch: &Watch, offer: Offer) -> Restart {
    eprintln!("  restart, nodes offering {offer:?}");
    let deltas_before = arm(watch, offer);
    let sigterm = Instant::now();
    let exit = mesh.servers[0].terminate();
    eprintln!("  SIGTERM to exit: {exit:.1?}");
    mesh.servers[0].start_again();
    let mut measured = recovery(watch, n, sigterm, deltas_before, &mesh.servers[0], 0.0).await;
    measured.exit = Some(exit);
    measured.offer = offer;
    measured
}

/// SIGKILL to the first of two servers on etcd while its half of the `n`
/// nodes are connected: they go on at the other.
async fn failover_under_load(mesh: &mut Mesh, n: usize, watch: &Watch, offer: Offer) -> Restart {
    eprintln!("  failover, nodes offering {offer:?}");
    let deltas_before = arm(watch, offer);
    let orphans = n.div_ceil(mesh.servers.len());
    let cpu_before = cpu_seconds(mesh.servers[1].pid());
    let killed = Instant::now();
    let _ = mesh.servers[0].process.0.kill();
    let _ = mesh.servers[0].process.0.wait();
    let survivor = &mesh.servers[1];
    let mut measured = recovery(watch, orphans, killed, deltas_before, survivor, cpu_before).await;
    measured.event = "failover";
    measured.offer = offer;
    measured
}

/// Counts from zero what a restart or failover is measured by, and has the
/// nodes offer `offer` from now on; the deltas read so far.
fn arm(watch: &Watch, offer: Offer) -> u64 {
    watch.readmitted.lock().unwrap().clear();
    watch.failed.store(0, Ordering::Relaxed);
    watch.unchanged.store(0, Ordering::Relaxed);
    watch
        .offer_digest
        .store(offer == Offer::Digest, Ordering::Relaxed);
    watch.deltas.load(Ordering::Relaxed)
}

/// How `n` nodes came back after `since`, measured at `server` (whose CPU
/// time was `cpu_before` then).
async fn recovery(
    watch: &Watch,
    n: usize,
    since: Instant,
    deltas_before: u64,
    server: &Server,
    cpu_before: f64,
) -> Restart {
    let mut back = 0;
    while since.elapsed() < RESTART_LIMIT {
        back = watch.readmitted.lock().unwrap().len();
        if back >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let times = watch.back_since(since);
    let at = |q: usize| {
        times
            .get((times.len() * q / 100).min(times.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let all_back = (times.len() >= n).then(|| at(100));
    eprintln!("  back: {} of {n} ({all_back:?} for all)", times.len());
    // Late deltas of the reconnections, if any, have a moment to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Restart {
        event: "restart",
        nodes: n,
        offer: Offer::None,
        unchanged: watch.unchanged.load(Ordering::Relaxed),
        exit: None,
        back,
        all_back,
        p50: at(50),
        p99: at(99),
        failed: watch.failed.load(Ordering::Relaxed),
        deltas: watch.deltas.load(Ordering::Relaxed) - deltas_before,
        cpu: cpu_seconds(server.pid()) - cpu_before,
        rss: memory(server.pid()).0,
    }
}

/// The servers of one mesh, as processes, and etcd when it is on etcd.
struct Mesh {
    store: Store,
    _dir: tempfile::TempDir,
    _etcd: Option<Process>,
    servers: Vec<Server>,
    join: JoinLine,
}

struct Server {
    public: String,
    state: std::path::PathBuf,
    log: std::path::PathBuf,
    process: Process,
}

impl Server {
    fn pid(&self) -> u32 {
        self.process.0.id()
    }

    /// `mesh-rendezvous serve` on `state`, its log appended to `log`.
    fn spawn(state: &Path, log: &Path) -> Process {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(rendezvous_binary())
            .arg("--state-dir")
            .arg(state)
            .arg("serve")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Process(child)
    }

    /// SIGTERM, as systemd stops it; how long it took to exit (killed
    /// after 60 s, like a unit's stop timeout).
    fn terminate(&mut self) -> Duration {
        let sent = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM");
        loop {
            if self.process.0.try_wait().unwrap().is_some() {
                return sent.elapsed();
            }
            if sent.elapsed() > Duration::from_secs(60) {
                eprintln!("  the server did not exit within 60 s of SIGTERM: killed");
                let _ = self.process.0.kill();
                let _ = self.process.0.wait();
                return sent.elapsed();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A new server process on the same state directory.
    fn start_again(&mut self) {
        self.process = Self::spawn(&self.state, &self.log);
    }
}

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Mesh {
    fn start(store: Store) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (etcd, endpoints) = match store {
            Store::File => (None, None),
            Store::Etcd => {
                let (process, endpoint) = start_etcd(dir.path());
                (Some(process), Some(endpoint))
            }
        };
        let count = if store == Store::File { 1 } else { 2 };
        let mut servers: Vec<Server> = Vec::new();
        for s in 0..count {
            let state = dir.path().join(format!("rv{s}"));
            let port = free_udp_port();
            let listen = format!("127.0.0.1:{port}");
            let name = format!("rv{s}");
            let mut init = vec![
                "init".to_owned(),
                "--listen".into(),
                listen.clone(),
                "--public-addr".into(),
                listen.clone(),
                "--cidr".into(),
                CIDR.into(),
                "--server-name".into(),
                name.clone(),
            ];
            if let Some(endpoint) = &endpoints {
                init.extend([
                    "--etcd-endpoints".into(),
                    endpoint.clone(),
                    "--key-prefix".into(),
                    "/meshd/scale/".into(),
                ]);
            }
            if s > 0 {
                let bundle = dir.path().join(format!("bundle-{name}"));
                let first = dir.path().join("rv0");
                rendezvous(&first, &["server", "add", &name, "--out", path(&bundle)]);
                init.extend(["--certificate-from".into(), path(&bundle).to_owned()]);
            }
            let init: Vec<&str> = init.iter().map(String::as_str).collect();
            rendezvous(&state, &init);
            let log = dir.path().join(format!("{name}.log"));
            servers.push(Server {
                public: listen,
                process: Server::spawn(&state, &log),
                state,
                log,
            });
        }
        let join = token(&dir.path().join("rv0"));
        Self {
            store,
            _dir: dir,
            _etcd: etcd,
            servers,
            join,
        }
    }

    /// Nodes are spread over the servers in turn: node `i`'s first, then
    /// the others, in the order it tries them when its own is lost.
    fn servers_for(&self, i: usize) -> Vec<String> {
        let k = self.servers.len();
        (0..k)
            .map(|j| self.servers[(i + j) % k].public.clone())
            .collect()
    }
}

/// A token for any number of joins, from the running first server (the
/// second is up by the time it answers: an etcd mesh's servers announce
/// themselves within a second).
fn token(state: &Path) -> JoinLine {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new(rendezvous_binary())
            .arg("--state-dir")
            .arg(state)
            .args(["token", "create", "--ttl", "2h"])
            .output()
            .unwrap();
        if out.status.success() {
            std::thread::sleep(Duration::from_secs(1));
            return JoinLine::parse(&String::from_utf8(out.stdout).unwrap());
        }
        assert!(
            Instant::now() < deadline,
            "token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn rendezvous(state: &Path, args: &[&str]) {
    let out = Command::new(rendezvous_binary())
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mesh-rendezvous {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One etcd member on loopback, as Debian ships it (fsync on).
fn start_etcd(dir: &Path) -> (Process, String) {
    let client = format!("http://127.0.0.1:{}", free_tcp_port());
    let peer = format!("http://127.0.0.1:{}", free_tcp_port());
    let log = std::fs::File::create(dir.join("etcd.log")).unwrap();
    let child = Command::new("/usr/bin/etcd")
        .args(["--name", "scale", "--data-dir"])
        .arg(dir.join("etcd"))
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("scale={peer}")])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let process = Process(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let health = format!("{client}/health");
    while Command::new("etcdctl")
        .args(["--endpoints", &client, "endpoint", "health"])
        .output()
        .map_or(true, |o| !o.status.success())
    {
        assert!(
            Instant::now() < deadline,
            "etcd at {health} never became healthy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    (process, client)
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A process's user + system CPU time, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    let ticks = *TICKS.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(100.0)
    });
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses: utime and
    // stime are the 12th and 13th (proc(5)).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(11) + field(12)) / ticks
}

/// A process's resident memory now and at its peak, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            << 10
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}

/// Every simulated node holds a UDP socket: lift the soft limit on open
/// files to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}
