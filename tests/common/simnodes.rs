//! Simulated nodes for load: what meshd is to its rendezvous, many times
//! over from one process. Each has its own key, a source address of its
//! own (127.N.N.N: loopback as a whole is local, so in any namespace with
//! `lo` up), one UDP socket for all its sessions (meshd's QUIC shares its
//! WireGuard socket), the hello with its proof and token, and a session
//! kept open that reads every peer-map delta; when a session ends, the
//! next is made exactly as meshd makes it (`client::Reconnect`).
//!
//! Shared by `benches/scale.rs` (through `#[path]`) and the tests.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use meshd::agent::Update;
use meshd::identity::{CertHash, JoinToken, PrivateKey, PublicKey};
use meshd::rendezvous::client::{
    admit_offering, ClientConfig, ClientError, Reconnect, Servers, Session,
};
use meshd::wire::control::{Candidate, CandidateKind, NodeEntry};
use meshd::wire::digest::{DigestSet, MapDigest};

/// Admission attempts of a first join (a busy server may time some out).
const ATTEMPTS: usize = 10;

/// What the simulated nodes share: the deltas they read, and the change
/// being timed.
#[derive(Default)]
pub struct Watch {
    pub deltas: AtomicU64,
    pub probing: AtomicBool,
    /// The key whose arrival is timed, and when each member read it.
    pub probe: Mutex<Option<(PublicKey, Vec<Instant>)>>,
    pub sessions: AtomicUsize,
    /// Nodes admitted again (coming back), each with when it first was:
    /// a node readmitted twice counts once.
    pub readmitted: Mutex<HashMap<PublicKey, Instant>>,
    /// Reconnection attempts that failed.
    pub failed: AtomicU64,
    /// Whether nodes coming back offer the digest of the map they hold
    /// (meshd does); off, they are sent the whole map again.
    pub offer_digest: AtomicBool,
    /// The peer map as the nodes were told it.
    pub held: Mutex<HeldMap>,
    /// Welcomes that left the map out (`peers_unchanged`).
    pub unchanged: AtomicU64,
}

/// The peer map every simulated node holds, kept once for all of them:
/// each hears every change but its own, so node X holds every entry but
/// X's, and offers the digest of the whole less its own entry (one map
/// instead of one per node, which at 5,000 nodes would be 25 million
/// entries).
#[derive(Default)]
pub struct HeldMap {
    entries: HashMap<PublicKey, NodeEntry>,
    digests: DigestSet,
}

impl HeldMap {
    pub fn upsert(&mut self, entry: &NodeEntry) {
        // Every member reads each change: digest it once.
        if self.entries.get(&entry.public_key) == Some(entry) {
            return;
        }
        assert!(self.digests.upsert(entry), "an entry encodes");
        self.entries.insert(entry.public_key, entry.clone());
    }

    pub fn remove(&mut self, key: &PublicKey) {
        self.entries.remove(key);
        self.digests.remove(key);
    }

    /// What `key` holds: every entry but its own.
    pub fn digest_for(&self, key: &PublicKey) -> MapDigest {
        self.digests.without(key)
    }
}

impl Watch {
    /// How long after `since` each node came back, soonest first.
    pub fn back_since(&self, since: Instant) -> Vec<std::time::Duration> {
        let mut back: Vec<_> = self
            .readmitted
            .lock()
            .unwrap()
            .values()
            .map(|t| t.saturating_duration_since(since))
            .collect();
        back.sort();
        back
    }

    pub fn saw(&self, key: &PublicKey) {
        self.deltas.fetch_add(1, Ordering::Relaxed);
        if !self.probing.load(Ordering::Relaxed) {
            return;
        }
        let mut probe = self.probe.lock().unwrap();
        if let Some((watched, seen)) = probe.as_mut() {
            if watched == key {
                seen.push(Instant::now());
            }
        }
    }
}

/// Reads the session until it ends, counting deltas; how it ended.
pub async fn keep(session: (Session, quinn::Endpoint), watch: &Watch) -> Result<(), ClientError> {
    let (mut session, _endpoint) = session;
    watch.sessions.fetch_add(1, Ordering::Relaxed);
    let ended = loop {
        match session.next().await {
            Ok(Some(Update::Upsert(entry))) => {
                watch.held.lock().unwrap().upsert(&entry);
                watch.saw(&entry.public_key);
            }
            Ok(Some(Update::Remove(key))) => watch.held.lock().unwrap().remove(&key),
            Ok(Some(_)) => {}
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    watch.sessions.fetch_sub(1, Ordering::Relaxed);
    ended
}

/// A node for the rest of the run: its session kept, and when it ends,
/// sessions again as meshd makes them (`client::Reconnect`).
pub async fn live(
    node: Node,
    first: (Session, quinn::Endpoint),
    server: &str,
    join: &JoinLine,
    watch: Arc<Watch>,
) {
    live_on(node, first, vec![server.to_owned()], join, watch).await;
}

/// [`live`] in a mesh of several servers, `servers[0]` the node's: a lost
/// session goes on at the next server in meshd's rounds
/// (`client::Servers`, `client::Reconnect`). meshd races the handshakes of
/// every server left in a round; this tries them one at a time, in order.
pub async fn live_on(
    node: Node,
    first: (Session, quinn::Endpoint),
    servers: Vec<String>,
    join: &JoinLine,
    watch: Arc<Watch>,
) {
    let mut servers = Servers::new(servers);
    let mut session = Some(first);
    let mut reconnect = Reconnect::default();
    loop {
        let mut ended = match session.take() {
            Some(s) => keep(s, &watch).await,
            None => Ok(()),
        };
        let mut round_over = servers.failed();
        loop {
            let wait =
                reconnect.next_wait(&ended, round_over, Instant::now(), &mut rand::thread_rng());
            tokio::time::sleep(wait).await;
            let Some((at, server)) = servers.candidates().into_iter().next() else {
                round_over = true;
                continue;
            };
            servers.chose(at);
            match node.try_join(&server, join, &watch).await {
                Ok(s) => {
                    watch
                        .readmitted
                        .lock()
                        .unwrap()
                        .entry(node.key.public_key())
                        .or_insert_with(Instant::now);
                    reconnect.welcomed();
                    servers.welcomed();
                    session = Some(s);
                    break;
                }
                Err(e) => {
                    watch.failed.fetch_add(1, Ordering::Relaxed);
                    round_over = servers.failed();
                    ended = Err(e);
                }
            }
        }
    }
}

/// One simulated node: a key, a name and a source address of its own,
/// and one UDP socket for all its sessions (meshd's QUIC shares its
/// WireGuard socket, so the rendezvous sees it at one address throughout).
pub struct Node {
    pub index: usize,
    pub key: PrivateKey,
    endpoint: quinn::Endpoint,
}

impl Node {
    pub fn new(index: usize) -> Self {
        let [_, _, b, c] = u32::try_from(index + 1).unwrap().to_be_bytes();
        let [_, a] = u16::try_from((index + 1) >> 16).unwrap().to_be_bytes();
        // 127.0.0.0/8 is local as a whole: no address to add.
        let source = Ipv4Addr::new(127, 1 + a, b, c);
        Self {
            index,
            key: PrivateKey::generate(&mut rand::rngs::OsRng),
            endpoint: quinn::Endpoint::client(SocketAddr::new(source.into(), 0)).unwrap(),
        }
    }

    /// Admitted, retrying as meshd does (`client::Reconnect`) after a
    /// failed attempt (each counted in [`Watch::failed`]): a server busy
    /// with thousands of joins can miss a node's 10 s welcome deadline.
    /// Panics after [`ATTEMPTS`] failures.
    pub async fn join(
        &self,
        server: &str,
        join: &JoinLine,
        watch: &Watch,
    ) -> (Session, quinn::Endpoint) {
        let mut reconnect = Reconnect::default();
        let mut last = None;
        for _ in 0..ATTEMPTS {
            match self.try_join(server, join, watch).await {
                Ok(session) => return session,
                Err(e) => {
                    watch.failed.fetch_add(1, Ordering::Relaxed);
                    let ended = Err(e);
                    let wait =
                        reconnect.next_wait(&ended, true, Instant::now(), &mut rand::thread_rng());
                    last = ended.err();
                    tokio::time::sleep(wait).await;
                }
            }
        }
        panic!("node {} not admitted: {}", self.index, last.unwrap());
    }

    /// One admission attempt; with [`Watch::offer_digest`], offering the
    /// digest of the map the node holds.
    pub async fn try_join(
        &self,
        server: &str,
        join: &JoinLine,
        watch: &Watch,
    ) -> Result<(Session, quinn::Endpoint), ClientError> {
        let config = ClientConfig {
            servers: vec![server.to_owned()],
            pin: join.pin,
            name: format!("n{}", self.index),
            listen_port: 51820,
            token: Some(join.token.clone()),
            routes: Vec::new(),
        };
        let candidate = Candidate {
            addr: SocketAddr::new(
                Ipv4Addr::from(0x0a40_0000 | self.index as u32).into(),
                51820,
            ),
            kind: CandidateKind::Local,
            mapped: None,
        };
        let endpoint = self.endpoint.clone();
        let offering = watch.offer_digest.load(Ordering::Relaxed);
        let digest = offering.then(|| {
            watch
                .held
                .lock()
                .unwrap()
                .digest_for(&self.key.public_key())
        });
        let admitted =
            admit_offering(&endpoint, &config, &self.key, vec![candidate], digest).await?;
        if admitted.peers_unchanged {
            watch.unchanged.fetch_add(1, Ordering::Relaxed);
        } else if let Update::Welcome { peers, .. } = &admitted.welcome {
            let mut held = watch.held.lock().unwrap();
            for peer in peers {
                held.upsert(peer);
            }
        }
        Ok((admitted.session, endpoint))
    }
}

#[derive(Clone)]
pub struct JoinLine {
    pub token: JoinToken,
    pub pin: CertHash,
}

/// `n` simulated nodes run from a thread of their own inside the network
/// namespace `ns` (their sockets are made there), joining `server` with
/// `join` at most `concurrency` at a time and then living on (sessions kept,
/// reconnecting as meshd does) until this is dropped.
pub struct InNamespace {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InNamespace {
    pub fn start(
        ns: &str,
        n: usize,
        concurrency: usize,
        server: &str,
        join: &JoinLine,
        watch: Arc<Watch>,
    ) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ns, server, join) = (ns.to_owned(), server.to_owned(), join.clone());
        let thread = std::thread::spawn(move || {
            let netns = std::fs::File::open(format!("/run/netns/{ns}"))
                .unwrap_or_else(|e| panic!("namespace {ns}: {e}"));
            nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {ns}: {e}"));
            // One thread: every socket is made by this thread, so in `ns`.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let gate = Arc::new(tokio::sync::Semaphore::new(concurrency));
                let mut nodes = Vec::with_capacity(n);
                for i in 0..n {
                    let permit = gate.clone().acquire_owned().await.expect("open");
                    let (server, join, watch) = (server.clone(), join.clone(), watch.clone());
                    nodes.push(tokio::spawn(async move {
                        let node = Node::new(i);
                        let session = node.join(&server, &join, &watch).await;
                        drop(permit);
                        live(node, session, &server, &join, watch).await;
                    }));
                }
                let _ = stopped.await;
                for node in nodes {
                    node.abort();
                }
            });
        });
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for InNamespace {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl JoinLine {
    /// The token and pin of a `meshd join … --token T --ca-hash H` line.
    pub fn parse(line: &str) -> Self {
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |flag: &str| {
            let at = words
                .iter()
                .position(|w| *w == flag)
                .unwrap_or_else(|| panic!("{flag} in {line:?}"));
            words[at + 1]
        };
        Self {
            token: after("--token").parse().expect("a token"),
            pin: after("--ca-hash").parse().expect("a pin"),
        }
    }
}
