//! The mesh-rendezvous server: quinn in front of the pure registry.
//!
//! Does I/O. One task owns the [`Registry`] and its [`Store`] and executes
//! the registry's commands; the accept loop asks [`Pending`] whether an
//! incoming connection may start an admission (per-source cap, Retry under
//! load); every accepted connection gets a task that reads the node's hello
//! (with deadlines and a small frame limit), hands it to the registry with
//! the connection's TLS exporter value, and once the registry says
//! [`Command::Admitted`] shuttles frames between the node and the registry
//! task and relays for it. Nothing here decides who gets in or which
//! address a node has: that is the registry's job. When a
//! metrics address is configured, each scrape asks the registry and relay
//! tasks for their counters ([`super::metrics`]).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument as _;

use super::admin::{self, AdminRequest, AdminResponse};
use super::admission;
use super::held::Held;
use super::links::{self, LinkContext, LinkEvent, Links};
use super::metrics::{self, RendezvousMetrics};
use super::moves::Moves;
use super::pending::{AdmissionCounts, Decision, Limits, Pending, Source};
use super::registry::{
    CloseReason, Command, ConnId, Counters, Delta, DeltaMember, IncomingHello,
    Limits as RegistryLimits, NodeStatus, Now, Registry,
};
use super::setup::{Backend, Loaded, SetupError};
use super::store::kv::Outcome;
use super::store::session::{News, StoreSession};
use super::stream::{write_frame, FrameReader, StreamError};
use super::tls;
use crate::control::server::ErrorResponse as _;
use crate::identity::{CertHash, PrivateKey, PublicKey};
use crate::metrics::{MetricsError, MetricsServer};
use crate::relay::server::{Inlet, Relay};
use crate::relay::NodeId;
use crate::sockets::canonical;
use crate::wire::control::{
    decode_hello, encode, Candidate, NatMapping, NodeMessage, PathList, RejectReason, ServerHello,
    ServerMessage, LINK_ALPN, MAX_FRAME_UNADMITTED, PROTOCOL_VERSION,
};
use crate::wire::untrusted::Untrusted;

/// Admission (QUIC handshake, stream, hello) must finish within this.
const ADMISSION_DEADLINE: Duration = Duration::from_secs(10);
/// Once the QUIC handshake is done, the node's hello must arrive within
/// this: a real node sends it one round trip after the handshake, and a
/// connection that says nothing gives its slot back soon.
const HELLO_DEADLINE: Duration = Duration::from_secs(4);
/// Messages queued for one node before it counts as stuck and is dropped.
const CONN_QUEUE: usize = 1024;
/// How often a write that waits on a node reading nothing checks whether
/// the registry has let go of the node.
const STALLED_CHECK: Duration = Duration::from_secs(1);
/// What a node may send once admitted: candidate lists.
const MAX_NODE_FRAME: usize = 64 << 10;
/// How often a node's connection is checked for a new address (quinn
/// moved it): a roaming node's peers hear of its new address within this.
const PATH_CHECK_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on UDP {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("the mesh's store: {0}")]
    Store(#[from] super::store::session::SessionError),
}

/// What connection tasks and the admin socket ask the registry task.
enum ToRegistry {
    Hello {
        conn: ConnId,
        hello: Box<IncomingHello>,
        out: mpsc::Sender<ConnOut>,
    },
    Candidates {
        conn: ConnId,
        candidates: Vec<Candidate>,
    },
    Nat {
        conn: ConnId,
        mapping: NatMapping,
    },
    Punch {
        conn: ConnId,
        peer: PublicKey,
    },
    Paths {
        conn: ConnId,
        peers: PathList,
    },
    /// The node's connection moved to this address.
    Migrated {
        conn: ConnId,
        observed: SocketAddr,
    },
    Disconnected {
        conn: ConnId,
    },
    Admin {
        request: AdminRequest,
        reply: oneshot::Sender<AdminResponse>,
    },
    /// A hello frame too large to read, so there is no hello to hand over
    /// (counted with the registry's refusals).
    Refused {
        reason: RejectReason,
    },
    /// The registry's part of a metrics scrape.
    Metrics {
        reply: oneshot::Sender<RegistryMetrics>,
    },
    /// The server is going away: close every node's session as such, save
    /// once, then answer.
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// How long shutting down waits for the registry to close the sessions
/// and save, and then for the close frames to leave: SIGTERM to exit stays
/// within a few seconds however many nodes are connected.
const SHUTDOWN_SAVE: Duration = Duration::from_secs(3);
const SHUTDOWN_DRAIN: Duration = Duration::from_millis(300);

/// How often presence, candidate and NAT changes are saved at most: a
/// storm of them costs one write per interval. What a node is told and
/// must survive a crash (its new address, a token's use) is saved before
/// it is told, whatever this says.
const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// Where servers share etcd, how long such a change waits to be saved
/// when the last save of them is more than [`PERSIST_EVERY`] old,
/// gathering what comes with it: this save is how the other servers learn
/// it, and a roaming member's new candidates reached their members a
/// second late when every change waited the whole interval. A single
/// server's file is read by no one else; its saves keep the interval,
/// after the change's deltas have gone out rather than during them.
const PERSIST_GATHER: Duration = Duration::from_millis(20);

/// How long peer-map changes are gathered before they go out: a burst of
/// joins or reconnects costs each member one write per tick, and a single
/// change reaches every member at most this much later.
const DELTA_TICK: Duration = Duration::from_millis(20);
/// While changes keep coming (the last flush less than [`BUSY`] ago),
/// changes wait this much per member (up to [`MAX_DELTA_SPACING`]) before
/// they go out. A flush costs the server about 20 µs per member (quinn's
/// send and acknowledgment, the writer task's turn; BENCHMARKS.md): a
/// flush every tick to 5,000 members would take five cores, so during a
/// burst the writes wait, and carry more changes each, and flushing keeps
/// to about one core up to 5,000 members. Above, the cap holds a change
/// back no more than 100 ms: a longer one (500 ms, 10,000 members) saved
/// the server 14 % of its CPU for the joins but bought 23 → 26 joins a
/// second, about what two runs differ by: the welcomes (the whole map
/// each) hold them back there. A change after a quiet moment still goes
/// out [`DELTA_TICK`] after it.
const DELTA_SPACING_PER_MEMBER: Duration = Duration::from_micros(20);
const MAX_DELTA_SPACING: Duration = Duration::from_millis(100);
const BUSY: Duration = Duration::from_secs(1);

/// When presence, candidate and NAT changes made from `now` on are saved,
/// the `last` such save having been at that instant (the registry's start
/// counts as one): `gather` later after a quiet interval, and at most once
/// an interval.
fn next_persist(
    now: tokio::time::Instant,
    last: tokio::time::Instant,
    persist: Persist,
) -> tokio::time::Instant {
    (now + persist.gather).max(last + persist.every)
}

/// How presence, candidate and NAT changes are saved: at most once
/// `every`, `gather` after a change that follows a quiet interval.
#[derive(Debug, Clone, Copy)]
struct Persist {
    gather: Duration,
    every: Duration,
}

impl Persist {
    fn for_store(store: &StoreSession) -> Self {
        let gather = if store.is_shared() {
            PERSIST_GATHER
        } else {
            PERSIST_EVERY
        };
        Self {
            gather,
            every: PERSIST_EVERY,
        }
    }
}

/// When the changes gathered from `now` on go out, the `last` flush having
/// gone to `members`.
fn next_flush(
    now: tokio::time::Instant,
    last: Option<tokio::time::Instant>,
    members: usize,
) -> tokio::time::Instant {
    let busy = last.is_some_and(|last| now.saturating_duration_since(last) < BUSY);
    if !busy {
        return now + DELTA_TICK;
    }
    let per_member =
        DELTA_SPACING_PER_MEMBER.saturating_mul(u32::try_from(members).unwrap_or(u32::MAX));
    now + per_member.clamp(DELTA_TICK, MAX_DELTA_SPACING)
}

/// The registry task's part of a scrape.
struct RegistryMetrics {
    nodes: Vec<NodeStatus>,
    rejections: Vec<(RejectReason, u64)>,
    counters: Counters,
    store_writes: u64,
}

/// What the registry task tells one connection task.
#[derive(Debug)]
enum ConnOut {
    /// The registry admitted the node ([`Command::Admitted`]).
    Admitted {
        ipv4: std::net::Ipv4Addr,
    },
    /// A message, encoded as a frame (header and body) by the registry
    /// task: a delta to every node is encoded once and shared.
    Frame(Bytes),
    Close(CloseReason),
}

/// Runs the rendezvous until `shutdown` completes.
pub async fn serve(loaded: Loaded, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    Server::bind(loaded).await?.run(shutdown).await
}

/// A bound, not yet running server.
pub struct Server {
    endpoint: quinn::Endpoint,
    admin_socket: admin::AdminSocket,
    /// For the links to the mesh's other servers.
    server_key: PrivateKey,
    pin: CertHash,
    registry: Registry,
    store: StoreSession,
    relay_limits: crate::relay::RelayLimits,
    reflector: Option<super::reflector::Reflector>,
    metrics: Option<MetricsServer>,
}

impl Server {
    /// Binds the UDP port and the admin socket.
    pub async fn bind(loaded: Loaded) -> Result<Self, ServerError> {
        let chain = loaded.cert_chain();
        let pin = loaded.cert_hash();
        let Loaded {
            layout,
            config,
            cert_key_der,
            server_key,
            backend,
            ..
        } = loaded;
        let (mut registry, store) = match backend {
            Backend::File { store, state } => {
                let session = StoreSession::local(store, &state);
                (Registry::new(state, server_key.clone()), session)
            }
            Backend::Etcd(etcd) => {
                let (session, registry) =
                    StoreSession::etcd(&etcd, server_key.clone(), RegistryLimits::default())
                        .await?;
                (registry, session)
            }
        };
        registry.set_server_name(config.server_name());
        registry.set_routable(config.routes.routable.clone());
        registry.announce_server(&config.public_addr, now_unix());
        let server_config = tls::server_config(chain, cert_key_der)?;
        let listen_err = |source| ServerError::Listen {
            addr: config.listen,
            source,
        };
        let socket = std::net::UdpSocket::bind(config.listen).map_err(listen_err)?;
        crate::sockets::size_buffers(socket2::SockRef::from(&socket));
        let runtime = Arc::new(quinn::TokioRuntime);
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            tls::endpoint_config(),
            Some(server_config),
            super::udp::wrap(runtime.as_ref(), socket).map_err(listen_err)?,
            runtime,
        )
        .map_err(listen_err)?;
        let admin_socket = admin::AdminSocket::bind(&layout.admin_socket()).await?;
        let metrics = match config.metrics_address {
            Some(addr) => Some(MetricsServer::bind(addr).await?),
            None => None,
        };
        // The NAT-check port is a diagnostic: without it nodes still join,
        // relay and punch, so a failure to bind it is logged, not fatal.
        let local = endpoint.local_addr().unwrap_or(config.listen);
        let reflector = match super::reflector::Reflector::bind(local).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(port = local.port().wrapping_add(1), error = %e, "NAT-check port unavailable; meshctl netcheck will say so");
                None
            }
        };
        tracing::info!(
            listen = %endpoint.local_addr().unwrap_or(config.listen),
            public = %config.public_addr,
            mesh = %registry.state().mesh.id,
            server = %config.server_name(),
            "rendezvous serving"
        );
        if let Some(addr) = metrics.as_ref().and_then(|m| m.local_addr().ok()) {
            tracing::info!(%addr, "serving Prometheus metrics at /metrics");
        }
        Ok(Self {
            endpoint,
            admin_socket,
            server_key,
            pin,
            registry,
            store,
            relay_limits: config.relay,
            reflector,
            metrics,
        })
    }

    /// The bound UDP address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The bound metrics address, when metrics are on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|m| m.local_addr().ok())
    }

    /// Serves until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let Server {
            endpoint,
            admin_socket,
            server_key,
            pin,
            registry,
            store,
            relay_limits,
            reflector,
            metrics,
        } = self;
        let reflector = reflector.map(|r| tokio::spawn(r.serve()));
        let mesh_id = registry.state().mesh.id.clone();
        let (relay, relay_task) = Relay::spawn(relay_limits);
        for record in registry.state().nodes.values() {
            if let Some(node) = NodeId::of_overlay(record.ipv4) {
                relay.register(node);
            }
        }
        let (to_registry, inbox) = mpsc::channel(1024);
        let (keys_tx, keys) = watch::channel(server_keys(&registry));
        let (events, link_events) = mpsc::channel(64);
        let link_ctx = Arc::new(LinkContext::new(
            endpoint.clone(),
            pin,
            registry.server_name().to_owned(),
            mesh_id.clone(),
            server_key,
            keys,
            events,
            relay.clone(),
        ));
        let shell = Shell {
            links: Links::new(link_ctx.clone()),
            link_events,
            keys: keys_tx,
        };
        let persist = Persist::for_store(&store);
        let registry = tokio::spawn(registry_task(registry, store, inbox, persist, shell));
        let admin = tokio::spawn(admin_socket.serve({
            let to_registry = to_registry.clone();
            move |request: AdminRequest| {
                let to_registry = to_registry.clone();
                async move {
                    let shutting_down =
                        || AdminResponse::error("the server is shutting down".into());
                    let (reply, answer) = oneshot::channel();
                    if to_registry
                        .send(ToRegistry::Admin { request, reply })
                        .await
                        .is_err()
                    {
                        return shutting_down();
                    }
                    answer.await.unwrap_or_else(|_| shutting_down())
                }
            }
        }));
        // Where admitted nodes' connections are, looked at once a second.
        let moves = Moves::default();
        let watch_moves = tokio::spawn(watch_moves(moves.clone(), to_registry.clone()));
        let mut pending = Pending::new(Limits::default());
        let (counts_tx, counts) = watch::channel(pending.counts());
        let metrics = metrics.map(|server| {
            let (to_registry, relay) = (to_registry.clone(), relay.clone());
            tokio::spawn(server.serve(move || {
                let (to_registry, relay, counts) =
                    (to_registry.clone(), relay.clone(), counts.clone());
                async move { scrape(&to_registry, &relay, &counts).await }
            }))
        });

        // Connection tasks say here when their admission ended.
        let (done_tx, mut done) = mpsc::unbounded_channel::<Source>();
        let mut next_conn = 0u64;
        tokio::pin!(shutdown);
        loop {
            let incoming = tokio::select! {
                () = &mut shutdown => break,
                Some(source) = done.recv() => {
                    pending.done(source);
                    counts_tx.send_replace(pending.counts());
                    continue;
                }
                incoming = endpoint.accept() => match incoming {
                    Some(i) => i,
                    None => break,
                },
            };
            let remote = canonical(incoming.remote_address());
            let source = Source::of(remote);
            let decision = pending.offer(source, incoming.remote_address_validated());
            counts_tx.send_replace(pending.counts());
            match decision {
                Decision::Admit => {}
                Decision::Validate => {
                    tracing::trace!(%remote, "many admissions in flight; asking the address to validate");
                    if let Err(e) = incoming.retry() {
                        e.into_incoming().refuse();
                    }
                    continue;
                }
                Decision::Refuse(why) => {
                    tracing::trace!(%remote, ?why, "admission refused");
                    incoming.refuse();
                    continue;
                }
            }
            let permit = PendingSlot {
                source,
                done: done_tx.clone(),
            };
            next_conn += 1;
            let conn = ConnId(next_conn);
            let to_registry = to_registry.clone();
            let (relay, link_ctx, moves) = (relay.clone(), link_ctx.clone(), moves.clone());
            let span = tracing::debug_span!("conn", id = conn.0, remote = %canonical(incoming.remote_address()));
            tokio::spawn(
                async move {
                    connection_task(incoming, conn, to_registry, relay, permit, link_ctx, moves)
                        .await
                }
                .instrument(span),
            );
        }
        tracing::info!("rendezvous shutting down");
        // Nodes hear that the server is going away (close code 5), so they
        // come back within seconds rather than after their backoff; no new
        // connection is taken meanwhile.
        endpoint.set_server_config(None);
        let (reply, saved) = oneshot::channel();
        if to_registry
            .send(ToRegistry::Shutdown { reply })
            .await
            .is_ok()
            && tokio::time::timeout(SHUTDOWN_SAVE, saved).await.is_err()
        {
            tracing::warn!(after = ?SHUTDOWN_SAVE, "the registry did not finish closing sessions and saving; exiting anyway");
        }
        let going_away = CloseReason::GoingAway;
        endpoint.close(going_away.code().into(), going_away.to_string().as_bytes());
        // Wait for the admin task to drop its socket, so a server started
        // next on the same directory never has its socket file removed.
        admin.abort();
        let _ = admin.await;
        // It holds handles on the registry and relay tasks, which run until
        // every handle is gone.
        if let Some(metrics) = metrics {
            metrics.abort();
            let _ = metrics.await;
        }
        if let Some(reflector) = reflector {
            reflector.abort();
            let _ = reflector.await;
        }
        watch_moves.abort();
        let _ = watch_moves.await;
        drop(to_registry);
        let _ = registry.await;
        // The links' context holds a handle on the relay too.
        drop(link_ctx);
        drop(relay);
        let _ = relay_task.await;
        // The close frames leave with the endpoint's next turns; a peer
        // that never acknowledges them must not hold the exit up.
        let _ = tokio::time::timeout(SHUTDOWN_DRAIN, endpoint.wait_idle()).await;
        Ok(())
    }
}

/// Tells the registry, every [`PATH_CHECK_EVERY`], of the nodes whose
/// connection quinn moved to a new address.
async fn watch_moves(moves: Moves, to_registry: mpsc::Sender<ToRegistry>) {
    let mut tick = tokio::time::interval(PATH_CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (conn, observed) in moves.moved() {
            if to_registry
                .send(ToRegistry::Migrated { conn, observed })
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Whether `connection` is another server's link (its ALPN).
fn is_link(connection: &quinn::Connection) -> bool {
    connection
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol)
        .is_some_and(|alpn| alpn == LINK_ALPN)
}

/// The text of one metrics scrape; `None` once the server is shutting down.
async fn scrape(
    to_registry: &mpsc::Sender<ToRegistry>,
    relay: &Relay,
    admission: &watch::Receiver<AdmissionCounts>,
) -> Option<String> {
    let (reply, answer) = oneshot::channel();
    to_registry.send(ToRegistry::Metrics { reply }).await.ok()?;
    let RegistryMetrics {
        nodes,
        rejections,
        counters,
        store_writes,
    } = answer.await.ok()?;
    let relay = relay.snapshot().await?;
    let admission = *admission.borrow();
    Some(metrics::render_rendezvous(&RendezvousMetrics {
        nodes,
        admission_failures: rejections,
        admission,
        relay,
        registry: counters,
        store_writes,
    }))
}

/// A connection's place in the admission table, given back when dropped
/// (also when its task ends early).
struct PendingSlot {
    source: Source,
    done: mpsc::UnboundedSender<Source>,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        // The accept loop is gone once the server stops: nothing to free.
        let _ = self.done.send(self.source);
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Owns the registry: applies inputs one at a time and executes the
/// resulting commands. Commits go to the store ([`StoreSession`]): a
/// single server's in memory (whose transactions make a single-use token
/// admit exactly one node however many race for it) saved off this task,
/// or etcd, shared with the mesh's other servers, whose changes come back
/// as news. What a commit changed is durable before any command after it
/// runs: the commands of a single server wait for the save of its file
/// ([`Held`]) while this task goes on deciding; a [`Command::PersistSoon`]
/// is flushed when `persist` says, together with whatever else
/// changed meanwhile, and on the way out.
async fn registry_task(
    mut registry: Registry,
    mut store: StoreSession,
    mut inbox: mpsc::Receiver<ToRegistry>,
    persist: Persist,
    mut shell: Shell,
) {
    let mut fx = Effects::new(persist);
    shell.servers_changed(&registry);
    // Who waits for the sessions to be closed and the state saved.
    let mut shutdown: Option<oneshot::Sender<()>> = None;
    // What the registry queued on its own.
    execute(&mut registry, &mut store, &mut fx, &shell).await;
    // When the peer-map changes gathered so far go out, one write per
    // member, and when they last did.
    let mut delta_due: Option<tokio::time::Instant> = None;
    let mut last_flush: Option<tokio::time::Instant> = None;
    loop {
        if delta_due.is_none() && registry.has_deltas() {
            let now = tokio::time::Instant::now();
            delta_due = Some(next_flush(now, last_flush, registry.members()));
        }
        let due = until(fx.save_due);
        let deltas_due = until(delta_due);
        let input = tokio::select! {
            () = deltas_due => {
                delta_due = None;
                last_flush = Some(tokio::time::Instant::now());
                registry.flush_deltas();
                execute(&mut registry, &mut store, &mut fx, &shell).await;
                continue;
            }
            () = saved(&mut fx.saving) => {
                fx.saved(&mut store, &registry, &shell).await;
                continue;
            }
            input = inbox.recv() => match input {
                Some(input) => input,
                None => break,
            },
            () = due => {
                fx.save_due = None;
                fx.last_persist = tokio::time::Instant::now();
                registry.flush();
                execute(&mut registry, &mut store, &mut fx, &shell).await;
                continue;
            }
            Some(event) = shell.link_events.recv() => {
                shell.links.handle(event, &registry.routes());
                continue;
            }
            news = store.next() => {
                match news {
                    News::Events(events) => registry.handle_store_events(&events),
                    News::Snapshot(records, revision) => {
                        registry.handle_snapshot(&records, revision);
                        registry.handle_store_back(now_unix());
                    }
                    News::Lost => registry.handle_store_lost(),
                    News::Back => registry.handle_store_back(now_unix()),
                }
                shell.servers_changed(&registry);
                execute(&mut registry, &mut store, &mut fx, &shell).await;
                continue;
            }
        };
        let now = Now {
            unix: now_unix(),
            instant: tokio::time::Instant::now().into_std(),
        };
        match input {
            ToRegistry::Hello { conn, hello, out } => {
                fx.conns.insert(conn, out);
                registry.handle_hello(conn, *hello, now);
            }
            ToRegistry::Candidates { conn, candidates } => {
                registry.handle_candidates(conn, candidates, now)
            }
            ToRegistry::Nat { conn, mapping } => registry.handle_nat(conn, mapping, now),
            ToRegistry::Paths { conn, peers } => registry.handle_paths(conn, peers, now),
            ToRegistry::Punch { conn, peer } => registry.handle_punch(conn, &peer, now),
            ToRegistry::Migrated { conn, observed } => {
                registry.handle_migrated(conn, observed, now)
            }
            ToRegistry::Disconnected { conn } => {
                fx.conns.remove(&conn);
                registry.handle_disconnect(conn, now);
            }
            ToRegistry::Admin { request, reply } => {
                let response =
                    admin::apply(&mut registry, request, now.unix, &mut rand::rngs::OsRng);
                // An operator's change is committed (and on disk) before
                // the operator hears it is done (a token printed is a token
                // that survives a crash).
                let refused = execute(&mut registry, &mut store, &mut fx, &shell).await;
                fx.settle(&mut store, &registry, &shell).await;
                let response = if refused {
                    AdminResponse::error(
                        "the store did not take the change (another server changed the same \
                         records at the same time, or etcd is out of reach); nothing was \
                         changed: try again"
                            .into(),
                    )
                } else {
                    response
                };
                let _ = reply.send(response);
                continue;
            }
            ToRegistry::Refused { reason } => registry.count_rejection(reason),
            ToRegistry::Shutdown { reply } => {
                // The closes, then one save of everything: both run below.
                registry.handle_shutdown();
                registry.flush();
                fx.save_due = None;
                shutdown = Some(reply);
            }
            ToRegistry::Metrics { reply } => {
                let _ = reply.send(RegistryMetrics {
                    nodes: registry.nodes(),
                    rejections: registry.rejections().collect(),
                    counters: registry.counters().clone(),
                    store_writes: store.writes(),
                });
            }
        }
        execute(&mut registry, &mut store, &mut fx, &shell).await;
        if let Some(reply) = shutdown.take() {
            fx.settle(&mut store, &registry, &shell).await;
            let _ = reply.send(());
        }
    }
    if fx.save_due.is_some() {
        registry.flush();
        execute(&mut registry, &mut store, &mut fx, &shell).await;
    }
    fx.settle(&mut store, &registry, &shell).await;
    shell.links.close();
    store.close().await;
}

/// Sleeps until `at`; never, without one.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The save being written is done (durable, or failed and logged, or the
/// writer is gone); never, while none is.
async fn saved(saving: &mut Option<oneshot::Receiver<()>>) {
    match saving {
        Some(done) => {
            let _ = done.await;
            *saving = None;
        }
        None => std::future::pending().await,
    }
}

/// One tick's peer-map changes to every member: each change encoded once,
/// and each member's share written as one buffer — the same buffer for
/// every member that wants them all (none is about it, and it was not
/// welcomed with some of them). The members whose queue was full, to be
/// disconnected.
fn send_deltas(
    conns: &HashMap<ConnId, mpsc::Sender<ConnOut>>,
    members: &[DeltaMember],
    deltas: &[Delta],
) -> Vec<ConnId> {
    let frames: Vec<Vec<u8>> = deltas.iter().map(|d| encode(&d.msg)).collect();
    let joined = |member: Option<&DeltaMember>| -> Bytes {
        let mut all = BytesMut::with_capacity(frames.iter().map(Vec::len).sum());
        for (delta, frame) in deltas.iter().zip(&frames) {
            if member.is_none_or(|m| m.wants(delta)) {
                all.extend_from_slice(frame);
            }
        }
        all.freeze()
    };
    let everyone = joined(None);
    let mut stuck = Vec::new();
    for member in members {
        let Some(tx) = conns.get(&member.conn) else {
            continue;
        };
        let share = if deltas.iter().all(|d| member.wants(d)) {
            everyone.clone()
        } else {
            joined(Some(member))
        };
        if share.is_empty() {
            continue;
        }
        if tx.try_send(ConnOut::Frame(share)).is_err() {
            stuck.push(member.conn);
        }
    }
    stuck
}

/// What the registry task keeps of the links to the mesh's other servers.
struct Shell {
    links: Links,
    link_events: mpsc::Receiver<LinkEvent>,
    /// The running servers' keys, for links accepted here.
    keys: watch::Sender<BTreeMap<String, PublicKey>>,
}

impl Shell {
    /// The servers may have changed: the keys links are checked against,
    /// and the links this server opens.
    fn servers_changed(&mut self, registry: &Registry) {
        self.keys.send_if_modified(|keys| {
            let now = server_keys(registry);
            let changed = *keys != now;
            *keys = now;
            changed
        });
        self.links.reconcile(registry.link_targets());
    }
}

/// Every running server's key, by name.
fn server_keys(registry: &Registry) -> BTreeMap<String, PublicKey> {
    registry.server_keys()
}

/// Runs the registry's queued commands, in order: each commit at once,
/// the rest now or, behind commits not durable yet, once they are
/// ([`Held`]); then starts a save of those commits unless one is being
/// written. Whether a commit did not go through.
async fn execute(
    registry: &mut Registry,
    store: &mut StoreSession,
    fx: &mut Effects,
    shell: &Shell,
) -> bool {
    let mut refused = false;
    let mut last_frame = None;
    while let Some(command) = registry.poll_command() {
        match command {
            Command::Commit { id, txn } => {
                let (outcome, fresh) = store.commit(&txn).await;
                if !matches!(outcome, Outcome::Committed { .. }) {
                    tracing::debug!(%id, ?outcome, "commit not taken");
                    refused = true;
                }
                registry.handle_outcome(id, outcome, &fresh);
            }
            command => {
                if let Some(now) = fx.held.push(command, store.unsaved()) {
                    fx.run(now, shell, &mut last_frame);
                }
            }
        }
    }
    fx.start_save(store, registry).await;
    refused
}

/// Where the registry's commands take effect: the connections, the
/// commands held for a save of a single server's file, and when changes a
/// crash may lose are flushed.
struct Effects {
    conns: HashMap<ConnId, mpsc::Sender<ConnOut>>,
    held: Held<Command>,
    /// Told when the save being written is done.
    saving: Option<oneshot::Receiver<()>>,
    /// When the oldest change not flushed yet is to be.
    save_due: Option<tokio::time::Instant>,
    /// When changes were last flushed (at first, the registry's start).
    last_persist: tokio::time::Instant,
    persist: Persist,
}

impl Effects {
    fn new(persist: Persist) -> Self {
        Self {
            conns: HashMap::new(),
            held: Held::default(),
            saving: None,
            save_due: None,
            last_persist: tokio::time::Instant::now(),
            persist,
        }
    }

    /// Starts a save of what is committed and not durable yet, unless one
    /// is being written (then it starts once that one is done).
    async fn start_save(&mut self, store: &mut StoreSession, registry: &Registry) {
        if self.held.saving() {
            return;
        }
        if let Some(done) = store.start_save(registry.state()).await {
            self.held.started();
            self.saving = Some(done);
        }
    }

    /// The save being written is done: the commands it freed run, and the
    /// commits made meanwhile start the next.
    async fn saved(&mut self, store: &mut StoreSession, registry: &Registry, shell: &Shell) {
        let freed: Vec<Command> = self.held.finished().collect();
        let mut last_frame = None;
        for command in freed {
            self.run(command, shell, &mut last_frame);
        }
        self.start_save(store, registry).await;
    }

    /// Waits until everything committed is durable and every held command
    /// has run.
    async fn settle(&mut self, store: &mut StoreSession, registry: &Registry, shell: &Shell) {
        self.start_save(store, registry).await;
        while self.saving.is_some() {
            saved(&mut self.saving).await;
            self.saved(store, registry, shell).await;
        }
        debug_assert!(
            self.held.is_empty(),
            "{} commands still held",
            self.held.len()
        );
    }

    /// Runs one command that is not a commit. `last_frame`: the frame of
    /// the last message sent, as a broadcast is one `Send` per node in a
    /// row, all equal.
    fn run(
        &mut self,
        command: Command,
        shell: &Shell,
        last_frame: &mut Option<(ServerMessage, Bytes)>,
    ) {
        match command {
            Command::Admitted { conn, key, ipv4 } => {
                tracing::debug!(%conn, node = %key.short(), %ipv4, "admitted");
                if let Some(tx) = self.conns.get(&conn) {
                    // A fresh connection's queue has room for this.
                    let _ = tx.try_send(ConnOut::Admitted { ipv4 });
                }
            }
            Command::Send { conn, msg } => {
                let frame = match last_frame {
                    Some((last, frame)) if *last == msg => frame.clone(),
                    _ => {
                        let frame = Bytes::from(encode(&msg));
                        *last_frame = Some((msg, frame.clone()));
                        frame
                    }
                };
                let stuck = self
                    .conns
                    .get(&conn)
                    .is_some_and(|tx| tx.try_send(ConnOut::Frame(frame)).is_err());
                if stuck {
                    self.disconnect_stuck(conn);
                }
            }
            Command::PeerDeltas { members, deltas } => {
                for conn in send_deltas(&self.conns, &members, &deltas) {
                    self.disconnect_stuck(conn);
                }
            }
            Command::Close { conn, reason } => {
                if let Some(tx) = self.conns.remove(&conn) {
                    let _ = tx.try_send(ConnOut::Close(reason));
                }
            }
            Command::Commit { id, .. } => {
                // `execute` makes every commit as it comes: none is held.
                tracing::error!(%id, "a commit among the commands to run; not made");
            }
            Command::PersistSoon => {
                let (last, persist) = (self.last_persist, self.persist);
                self.save_due.get_or_insert_with(|| {
                    next_persist(tokio::time::Instant::now(), last, persist)
                });
            }
            Command::Route { ipv4, server } => shell.links.route(ipv4, server.as_deref()),
        }
    }

    /// A node whose queue is full: dropping its sender ends its writer
    /// (`write_out`), which closes the connection.
    fn disconnect_stuck(&mut self, conn: ConnId) {
        tracing::warn!(
            ?conn,
            "node does not keep up with peer-map updates; disconnecting it"
        );
        self.conns.remove(&conn);
    }
}

async fn connection_task(
    incoming: quinn::Incoming,
    conn: ConnId,
    to_registry: mpsc::Sender<ToRegistry>,
    relay: Relay,
    permit: PendingSlot,
    link_ctx: Arc<LinkContext>,
    moves: Moves,
) {
    let remote = canonical(incoming.remote_address());
    // What nodes prove their keys against, and the mesh: the links' too.
    let (server_key, mesh_id) = (link_ctx.server_key.public_key(), link_ctx.mesh_id.clone());

    // Up to the hello, all of it under one deadline and the small frame
    // limit, the hello under a shorter one once the handshake is done.
    // Boxed, as the link's task below: the task of every connection lives
    // as long as the node's session, and without the box it would keep
    // room for the largest of these steps it has long finished with.
    let arrived = Box::pin(tokio::time::timeout(ADMISSION_DEADLINE, async {
        let connection = incoming.await.ok()?;
        if is_link(&connection) {
            return Some(Err(connection));
        }
        let (mut send, recv) = connection.open_bi().await.ok()?;
        let mut frames = FrameReader::new(recv, MAX_FRAME_UNADMITTED);
        let hello_msg = ServerHello {
            version: PROTOCOL_VERSION,
            mesh_id,
            server_key,
        };
        write_frame(&mut send, &hello_msg).await.ok()?;
        let body = match tokio::time::timeout(HELLO_DEADLINE, frames.next_body()).await {
            Ok(Ok(body)) => body,
            Ok(Err(e)) => {
                tracing::debug!(error = %Untrusted(&e.to_string()), "bad hello");
                if matches!(e, StreamError::Frame(_)) {
                    // Too large; a node that merely left is no failure.
                    refused(&to_registry, RejectReason::BadHello).await;
                }
                return None;
            }
            Err(_) => {
                tracing::debug!("no hello within {HELLO_DEADLINE:?} of the handshake");
                connection.close(0u32.into(), b"no hello");
                return None;
            }
        };
        // What binds the hello's proof to this TLS session.
        let mut exporter = [0u8; 32];
        connection
            .export_keying_material(&mut exporter, admission::EXPORTER_LABEL, &[])
            .ok()?;
        let hello = IncomingHello {
            // The registry decides on a hello it cannot read too: a newer
            // node still learns why it is turned away.
            hello: decode_hello(&body),
            exporter,
            observed: remote,
        };
        Some(Ok((connection, send, frames, hello)))
    }))
    .await
    .ok()
    .flatten();
    let (connection, mut send, mut frames, hello) = match arrived {
        Some(Ok(node)) => node,
        // Another server of the mesh: no admission slot to hold.
        Some(Err(link)) => {
            drop(permit);
            Box::pin(links::accept(link_ctx, link, conn)).await;
            return;
        }
        None => return,
    };

    let (out, mut outbox) = mpsc::channel(CONN_QUEUE);
    let hello_sent = to_registry
        .send(ToRegistry::Hello {
            conn,
            hello: Box::new(hello),
            out,
        })
        .await;
    if hello_sent.is_err() {
        return;
    }
    // Until the registry has decided, the node holds its admission slot and
    // only what the registry says is read: its frames, datagrams and
    // streams stay unread (quinn bounds them), and a connection that is
    // never admitted never reaches the relay.
    let admitted = admission(&mut outbox, &mut send, &connection).await;
    drop(permit);
    if let Some(ipv4) = admitted {
        frames.set_limit(MAX_NODE_FRAME);
        // The overlay address is the node's relay id.
        let inlet = NodeId::of_overlay(ipv4).map(|id| relay.connect(id, conn, connection.clone()));
        // Where the node is: quinn moves the connection when the node's
        // packets come from a new address (and the new path answers).
        let _watching = moves.watch(conn, connection.clone(), remote);
        // What the registry sends goes out from a task of its own, so a
        // peer-map change wakes nothing here, and what the node sends
        // wakes nothing there.
        tokio::spawn(write_out(send, outbox, connection.clone()).in_current_span());
        // Disconnects it from the relay when done.
        read_node(conn, &connection, frames, inlet, &to_registry).await;
    }
    connection.close(0u32.into(), b"bye");
    let _ = to_registry.send(ToRegistry::Disconnected { conn }).await;
}

/// What the registry says to a node it has not decided on yet, up to its
/// admission (the overlay address); `None` if it was turned away, or the
/// connection is gone.
async fn admission(
    outbox: &mut mpsc::Receiver<ConnOut>,
    send: &mut quinn::SendStream,
    connection: &quinn::Connection,
) -> Option<std::net::Ipv4Addr> {
    loop {
        match outbox.recv().await? {
            ConnOut::Admitted { ipv4 } => return Some(ipv4),
            out => {
                if !deliver(send, connection, out).await {
                    return None;
                }
            }
        }
    }
}

/// Writes what the registry sends an admitted node, in order, until the
/// registry closes the session or lets go of it (the node does not keep
/// up, was removed, or left); the connection is closed then, which ends
/// its reading. A node that reads nothing keeps a write waiting for ever
/// (quinn's flow control): such a write gives up once the registry has let
/// go of the node, so a member cannot keep a session the server closed.
async fn write_out(
    mut send: quinn::SendStream,
    mut outbox: mpsc::Receiver<ConnOut>,
    connection: quinn::Connection,
) {
    while let Some(out) = outbox.recv().await {
        let delivery = deliver(&mut send, &connection, out);
        tokio::pin!(delivery);
        let delivered = loop {
            tokio::select! {
                biased;
                delivered = &mut delivery => break Some(delivered),
                () = tokio::time::sleep(STALLED_CHECK) => {
                    if outbox.is_closed() {
                        break None;
                    }
                }
            }
        };
        match delivered {
            Some(true) => {}
            Some(false) => return,
            None => {
                tracing::debug!("the node reads nothing and its session is over; cutting it off");
                break;
            }
        }
    }
    connection.close(0u32.into(), b"bye");
}

/// One thing the registry sends a node; whether the session goes on.
async fn deliver(
    send: &mut quinn::SendStream,
    connection: &quinn::Connection,
    out: ConnOut,
) -> bool {
    match out {
        // Handed to quinn as it is, not copied: one delta is the same
        // buffer for every member.
        ConnOut::Frame(frame) => send.write_chunk(frame).await.is_ok(),
        ConnOut::Close(reason) => {
            // A rejection's message is in the stream: give the node a
            // moment to read it, then the close code. A server going away
            // has nothing more to say.
            if reason != CloseReason::GoingAway {
                finish(send).await;
            }
            connection.close(reason.code().into(), reason.to_string().as_bytes());
            false
        }
        // Told once, before anything else.
        ConnOut::Admitted { .. } => true,
    }
}

/// Reads what an admitted node sends, until it leaves or its connection
/// is closed: its messages to the registry, its relay datagrams and
/// streams (with `inlet`) to the relay.
async fn read_node(
    conn: ConnId,
    connection: &quinn::Connection,
    mut frames: FrameReader,
    mut inlet: Option<Inlet>,
    to_registry: &mpsc::Sender<ToRegistry>,
) {
    loop {
        tokio::select! {
            // Cancel-safe: a frame half read when another branch wins stays
            // in `frames` for the next turn of the loop.
            frame = frames.next::<NodeMessage>() => {
                let input = match frame {
                    Ok(NodeMessage::Nat { mapping }) => ToRegistry::Nat { conn, mapping },
                    Ok(NodeMessage::Candidates { candidates }) => ToRegistry::Candidates { conn, candidates },
                    Ok(NodeMessage::Punch { peer }) => ToRegistry::Punch { conn, peer },
                    Ok(NodeMessage::Paths { peers }) => ToRegistry::Paths { conn, peers },
                    Err(e) => {
                        tracing::debug!(error = %Untrusted(&e.to_string()), "node left");
                        return;
                    }
                };
                if to_registry.send(input).await.is_err() {
                    return;
                }
            }
            datagram = connection.read_datagram(), if inlet.is_some() => match (datagram, inlet.as_mut()) {
                (Ok(frame), Some(inlet)) => {
                    // Dropped if this connection's share of the relay queue
                    // is full, like a full router queue.
                    inlet.datagram(frame);
                    // quinn hands out queued datagrams without yielding
                    // to the runtime, so under a flood this loop would
                    // never yield, and the relay task and other nodes'
                    // connections waiting on this worker would starve.
                    tokio::task::consume_budget().await;
                }
                (Ok(_), None) => {}
                (Err(_), _) => return,
            },
            stream = connection.accept_uni(), if inlet.is_some() => match (stream, inlet.as_ref()) {
                (Ok(mut stream), Some(inlet)) => {
                    let frames = inlet.streams();
                    tokio::spawn(async move {
                        // Frames follow each other back to back until the
                        // stream ends (proto/control.md §13).
                        while let Some(frame) = crate::relay::stream::read_stream_frame(&mut stream).await {
                            if !frames.frame(frame).await {
                                break;
                            }
                        }
                    });
                }
                (Ok(_), None) => {}
                (Err(_), _) => return,
            },
        }
    }
}

/// Tells the registry task of a hello frame refused here, for its counters.
async fn refused(to_registry: &mpsc::Sender<ToRegistry>, reason: RejectReason) {
    let _ = to_registry.send(ToRegistry::Refused { reason }).await;
}

/// Ends the stream and gives the node a moment to read what is in it, so a
/// rejection arrives before the connection closes.
async fn finish(send: &mut quinn::SendStream) {
    if send.finish().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::identity::PrivateKey;
    use crate::rendezvous::registry::{Limits, Rate, RegistryState};
    use crate::rendezvous::store::{Store, StoreError};
    use crate::wire::control::{decode, CandidateKind, Hello, MeshInfo};

    /// The registry task of a single server on `store`, its presence and
    /// candidates saved an hour late (within a test, only on the way out),
    /// what it is sent queueing up to `queue`: its inbox and the task.
    fn spawn_registry_task(
        registry: Registry,
        store: impl Store + 'static,
        queue: usize,
    ) -> (mpsc::Sender<ToRegistry>, tokio::task::JoinHandle<()>) {
        let (to_registry, inbox) = mpsc::channel(queue);
        let session = StoreSession::local(store, registry.state());
        let hour = Duration::from_secs(3600);
        let persist = Persist {
            gather: hour,
            every: hour,
        };
        let task = tokio::spawn(registry_task(registry, session, inbox, persist, shell()));
        (to_registry, task)
    }

    #[test]
    fn a_change_after_a_quiet_interval_is_saved_at_once_and_a_storm_once_an_interval() {
        let now = tokio::time::Instant::now();
        let ms = Duration::from_millis;
        let every = PERSIST_EVERY;
        let shared = Persist {
            gather: PERSIST_GATHER,
            every,
        };
        // The last save long ago: gathered for a moment, then saved.
        assert_eq!(
            next_persist(now, now - ms(5000), shared),
            now + PERSIST_GATHER
        );
        assert_eq!(next_persist(now, now - every, shared), now + PERSIST_GATHER);
        // One a moment ago: not before an interval after it, so a storm of
        // changes costs one save an interval, as before.
        assert_eq!(next_persist(now, now - ms(300), shared), now + ms(700));
        assert_eq!(next_persist(now, now, shared), now + every);
        // Just inside the interval: the gathering moment still holds.
        assert_eq!(
            next_persist(now, now - every + ms(5), shared),
            now + PERSIST_GATHER
        );
        // A single server's file: an interval after the change, as before.
        let file = Persist {
            gather: every,
            every,
        };
        assert_eq!(next_persist(now, now - ms(5000), file), now + every);
        assert_eq!(next_persist(now, now - ms(300), file), now + every);
    }

    #[test]
    fn a_change_after_a_quiet_moment_goes_out_a_tick_later_and_a_burst_waits_its_spacing() {
        let now = tokio::time::Instant::now();
        let ms = Duration::from_millis;
        // Quiet: no flush yet, or none for a second.
        assert_eq!(next_flush(now, None, 5000), now + DELTA_TICK);
        assert_eq!(
            next_flush(now, Some(now - ms(1500)), 5000),
            now + DELTA_TICK
        );
        // Busy: a flush went out a moment ago.
        let last = Some(now - ms(300));
        assert_eq!(
            next_flush(now, last, 100),
            now + DELTA_TICK,
            "2 ms for 100 members"
        );
        assert_eq!(next_flush(now, last, 2000), now + ms(40));
        assert_eq!(next_flush(now, last, 5000), now + ms(100));
        assert_eq!(next_flush(now, last, 10_000_000), now + MAX_DELTA_SPACING);
    }

    /// The message a frame for a connection carries.
    fn message(frame: &[u8]) -> ServerMessage {
        decode(&frame[4..]).expect("a frame the registry task encoded")
    }

    /// Every frame of one write (a tick's peer-map changes are several).
    fn frames(mut buf: &[u8]) -> Vec<ServerMessage> {
        let mut out = Vec::new();
        while let Some((header, rest)) = buf.split_first_chunk::<4>() {
            let len = u32::from_be_bytes(*header) as usize;
            out.push(decode(&rest[..len]).expect("a frame the registry task encoded"));
            buf = &rest[len..];
        }
        out
    }

    /// Counts saves and keeps the last state, shared with the test.
    #[derive(Clone, Default)]
    struct CountingStore {
        saves: Arc<AtomicUsize>,
        last: Arc<Mutex<Option<RegistryState>>>,
    }

    impl Store for CountingStore {
        fn load(&self) -> Result<Option<RegistryState>, StoreError> {
            Ok(self.last.lock().ok().and_then(|s| s.clone()))
        }

        fn save(&mut self, state: &RegistryState) -> Result<(), StoreError> {
            self.saves.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut last) = self.last.lock() {
                *last = Some(state.clone());
            }
            Ok(())
        }
    }

    /// A store whose every save waits until the test lets it through,
    /// and says when one has started.
    #[derive(Clone)]
    struct GatedStore {
        inner: CountingStore,
        started: std::sync::mpsc::Sender<()>,
        open: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
    }

    impl Store for GatedStore {
        fn load(&self) -> Result<Option<RegistryState>, StoreError> {
            self.inner.load()
        }

        fn save(&mut self, state: &RegistryState) -> Result<(), StoreError> {
            let _ = self.started.send(());
            let _ = self.open.lock().unwrap().recv();
            self.inner.save(state)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_is_told_before_its_save_and_joins_decided_meanwhile_share_the_next() {
        let (registry, token) = registry_with_token(Limits::default(), "group");
        let (started_tx, started) = std::sync::mpsc::channel();
        let (open, gate) = std::sync::mpsc::channel();
        let inner = CountingStore::default();
        let store = GatedStore {
            inner: inner.clone(),
            started: started_tx,
            open: Arc::new(Mutex::new(gate)),
        };
        let started = Arc::new(Mutex::new(started));
        let wait_started = move || {
            let started = started.clone();
            tokio::task::spawn_blocking(move || {
                started
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(10))
                    .expect("a save starts")
            })
        };
        let (to_registry, task) = spawn_registry_task(registry, store, 64);
        // The token's save, queued by the registry on its own.
        wait_started().await.unwrap();
        open.send(()).unwrap();

        // Node 1's join is saved: nothing reaches it meanwhile.
        let (hello_1, mut out_1) = arrives(1, &token);
        to_registry.send(hello_1).await.unwrap();
        wait_started().await.unwrap();
        // Nodes 2 and 3 are decided while node 1's save is being written.
        let (hello_2, mut out_2) = arrives(2, &token);
        let (hello_3, mut out_3) = arrives(3, &token);
        to_registry.send(hello_2).await.unwrap();
        to_registry.send(hello_3).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        for out in [&mut out_1, &mut out_2, &mut out_3] {
            assert!(out.try_recv().is_err(), "told before its save");
        }
        assert_eq!(
            inner.saves.load(Ordering::SeqCst),
            1,
            "only the token's save"
        );

        // Node 1's save done: node 1 is admitted and welcomed, 2 and 3
        // still wait, for one save that holds both.
        open.send(()).unwrap();
        assert!(matches!(out_1.recv().await, Some(ConnOut::Admitted { .. })));
        assert!(matches!(
            out_1.recv().await,
            Some(ConnOut::Frame(f)) if matches!(message(&f), ServerMessage::Welcome { .. })
        ));
        wait_started().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(out_2.try_recv().is_err(), "node 2 told before its save");
        assert!(out_3.try_recv().is_err(), "node 3 told before its save");
        let saved = inner.last.lock().unwrap().clone().unwrap();
        assert_eq!(saved.nodes.len(), 1, "node 1 on disk");

        open.send(()).unwrap();
        for out in [&mut out_2, &mut out_3] {
            assert!(matches!(out.recv().await, Some(ConnOut::Admitted { .. })));
            assert!(matches!(
                out.recv().await,
                Some(ConnOut::Frame(f)) if matches!(message(&f), ServerMessage::Welcome { .. })
            ));
        }
        let saved = inner.last.lock().unwrap().clone().unwrap();
        assert_eq!(saved.nodes.len(), 3, "nodes 2 and 3 on disk, in one save");
        assert_eq!(inner.saves.load(Ordering::SeqCst), 3);

        // Nothing durable is left unsaved: the task ends without a save.
        drop(to_registry);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the registry task ends")
            .unwrap();
        assert_eq!(inner.saves.load(Ordering::SeqCst), 3);
    }

    const EXPORTER: [u8; 32] = [0x5a; 32];

    /// A registry task's shell with no other server to link to.
    fn shell() -> Shell {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let (relay, _) = Relay::spawn(crate::relay::RelayLimits::default());
        let (keys, keys_rx) = watch::channel(BTreeMap::new());
        let (events, link_events) = mpsc::channel(1);
        let ctx = LinkContext::new(
            endpoint,
            CertHash::of(b"no certificate"),
            "rendezvous".into(),
            "test-mesh".into(),
            server_key(),
            keys_rx,
            events,
            relay,
        );
        Shell {
            links: Links::new(Arc::new(ctx)),
            link_events,
            keys,
        }
    }

    fn server_key() -> PrivateKey {
        PrivateKey::from_bytes([0xa5; 32])
    }

    /// A fresh mesh's registry under `limits`, and a join token of it
    /// named `name`, valid for an hour.
    fn registry_with_token(limits: Limits, name: &str) -> (Registry, String) {
        let mesh = MeshInfo {
            id: "test-mesh".into(),
            ipv4: "100.72.0.0/16".parse().unwrap(),
            ipv6: crate::ipam::ula_prefix([1, 2, 3, 4, 5]),
        };
        let mut registry = Registry::with_limits(RegistryState::new(mesh), server_key(), limits);
        let token = registry
            .create_token([7; 32], name.into(), 3600, None, now_unix())
            .unwrap()
            .expose()
            .to_owned();
        (registry, token)
    }

    /// Node `n` arriving with `token` from 198.51.100.`n` on connection
    /// `n`: its hello for the registry task, and what the task tells it.
    fn arrives(n: u8, token: &str) -> (ToRegistry, mpsc::Receiver<ConnOut>) {
        let (out, outbox) = mpsc::channel(CONN_QUEUE);
        let observed = SocketAddr::from(([198, 51, 100, n], 40000));
        let hello = ToRegistry::Hello {
            conn: ConnId(n.into()),
            hello: hello(n, token, observed),
            out,
        };
        (hello, outbox)
    }

    /// Node `n`'s hello, proving its key, as it arrives from `observed`.
    fn hello(n: u8, token: &str, observed: SocketAddr) -> Box<IncomingHello> {
        let node = PrivateKey::from_bytes([n; 32]);
        let hello = Hello {
            version: PROTOCOL_VERSION,
            public_key: node.public_key(),
            name: format!("node-{n}"),
            listen_port: 51820,
            token: Some(token.to_owned()),
            candidates: Vec::new(),
            proof: admission::proof(&node, &server_key().public_key(), &EXPORTER),
            routes: Vec::new(),
            peers_digest: None,
        };
        Box::new(IncomingHello {
            hello: Ok(hello),
            exporter: EXPORTER,
            observed,
        })
    }

    async fn store_writes(to_registry: &mpsc::Sender<ToRegistry>) -> u64 {
        let (reply, answer) = oneshot::channel();
        to_registry
            .send(ToRegistry::Metrics { reply })
            .await
            .unwrap();
        answer.await.unwrap().store_writes
    }

    #[tokio::test]
    async fn a_members_candidate_storm_costs_one_debounced_write_and_closes_the_member() {
        let hour = Duration::from_secs(3600);
        // Nothing refills within the test, so the counts are exact.
        let limits = Limits {
            candidates: Rate::new(10, hour),
            tolerance: Rate::new(50, hour),
            ..Limits::default()
        };
        let (registry, token) = registry_with_token(limits, "storm");
        let store = CountingStore::default();
        let (to_registry, task) = spawn_registry_task(registry, store.clone(), 4096);

        let mut outs = Vec::new();
        for n in 1..=2u8 {
            let (hello, outbox) = arrives(n, &token);
            to_registry.send(hello).await.unwrap();
            outs.push(outbox);
        }
        // The token, then the new nodes (one save each, or one for both
        // when the second was decided while the first was written):
        // durable before they are welcomed.
        for outbox in &mut outs {
            assert!(matches!(
                outbox.recv().await,
                Some(ConnOut::Admitted { .. })
            ));
            assert!(matches!(
                outbox.recv().await,
                Some(ConnOut::Frame(f)) if matches!(message(&f), ServerMessage::Welcome { .. })
            ));
        }
        let joined = store_writes(&to_registry).await;
        assert!((2..=3).contains(&joined), "{joined} writes for three saves");

        for i in 0..2_000u16 {
            let addr = SocketAddr::from(([192, 0, 2, 1], 1000 + i % 2));
            let candidates = vec![Candidate {
                addr,
                kind: CandidateKind::Local,
                mapped: None,
            }];
            to_registry
                .send(ToRegistry::Candidates {
                    conn: ConnId(1),
                    candidates,
                })
                .await
                .unwrap();
        }
        assert_eq!(
            store_writes(&to_registry).await,
            joined,
            "no write for the storm yet"
        );

        let mut attacker = outs.remove(0);
        // Node 2's join (unless the close overtook its tick), then the close.
        loop {
            match attacker.recv().await {
                Some(ConnOut::Frame(f))
                    if matches!(message(&f), ServerMessage::PeerUpsert { .. }) => {}
                Some(ConnOut::Close(CloseReason::Flooding)) => break,
                other => panic!("the flooder is closed, not sent {other:?}"),
            }
        }
        // Let the last tick's changes go out.
        tokio::time::sleep(DELTA_TICK * 3).await;
        let mut observer = outs.remove(0);
        let mut upserts = 0;
        while let Ok(out) = observer.try_recv() {
            if let ConnOut::Frame(f) = out {
                upserts += frames(&f)
                    .iter()
                    .filter(|m| matches!(m, ServerMessage::PeerUpsert { .. }))
                    .count();
            }
        }
        assert!(
            (1..=10).contains(&upserts),
            "within the candidates budget, one per tick at most: {upserts}"
        );

        drop(to_registry);
        task.await.unwrap();
        assert_eq!(
            store.saves.load(Ordering::SeqCst),
            usize::try_from(joined).unwrap() + 1,
            "one write for the whole storm, on the way out"
        );
        let saved = store.last.lock().unwrap().clone().unwrap();
        let node = &saved.nodes[&PrivateKey::from_bytes([1; 32]).public_key()];
        assert!(
            node.candidates.iter().any(|c| c.addr.port() == 1001),
            "the last accepted list is saved: {node:?}"
        );
    }
}
