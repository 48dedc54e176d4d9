//! The node's side of the control connection to mesh-rendezvous: the
//! session transport.
//!
//! Does I/O (quinn over meshd's shared UDP socket), and decides nothing:
//! [`run`] keeps one session up for the life of meshd with one of the
//! mesh's servers ([`Servers`]: the join line's, and those each `Welcome`
//! lists). A lost session goes on at the next server at once (within
//! [`FAILOVER_JITTER`]); once every server has been tried, with jittered
//! exponential backoff. Each session proves the node's key, receives the
//! full peer map, then streams deltas. What the rendezvous
//! says goes to the packet loop as [`Update`]s for the node agent
//! ([`crate::agent`]); what the agent has to say (punch requests, its NAT
//! mapping) comes back as [`NodeMessage`]s and goes on the stream as it
//! is. The tunnels never depend on this connection staying up.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use rand::Rng;
use tokio::sync::{mpsc, watch};

use super::admission;
use super::registry::CloseReason;
use super::stream::{write_frame, FrameReader, StreamError};
use super::tls;
pub use crate::agent::Update;
use crate::identity::{CertHash, JoinToken};
use crate::identity::{PrivateKey, PublicKey};
use crate::sockets::QuicSource;
use crate::wire::control::{
    Candidate, Hello, NatMapping, NodeMessage, RejectReason, ServerHello, ServerMessage,
    FEATURE_PATHS, MAX_FRAME, MAX_FRAME_UNADMITTED, MAX_ROUTES, PROTOCOL_VERSION,
};
use crate::wire::digest::{HeldMap, MapDigest};
use crate::wire::untrusted::bounded;

const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest wait between sessions. A rendezvous that refused a node
/// (busy, or under a flood) sees it again within this, never later.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Connection setup, the server's hello and ours must fit in this.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// The welcome after our hello: its first bytes within this, then never
/// this long without more of it. At tens of thousands of nodes the map is
/// megabytes, from a server that may be welcoming thousands at once or
/// over a slow link: it takes longer than a handshake, but it keeps
/// coming, and starting over would cost the server the whole map again.
const WELCOME_STALL: Duration = Duration::from_secs(10);
/// The whole welcome, however steadily it comes.
const WELCOME_MAX: Duration = Duration::from_secs(120);
/// The wait before the next server after one was lost: short, so a dead
/// server's nodes are elsewhere within seconds, and random, so they do not
/// all arrive in the same instant.
pub const FAILOVER_JITTER: Duration = Duration::from_millis(500);
/// After a server said it is going away (close code 5: a restart or a
/// shutdown), sessions are retried every [`GOING_AWAY_RETRY`] (jittered)
/// for this long, without the backoff growing: a restarted server is back
/// within seconds, and its nodes with it, spread over the window.
const GOING_AWAY_GRACE: Duration = Duration::from_secs(60);
const GOING_AWAY_RETRY: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(2));

/// How long a node waits before its next session: the policy of [`run`],
/// on its own so that load tests reconnect exactly as meshd does.
#[derive(Debug, Clone)]
pub struct Reconnect {
    backoff: Duration,
    /// Until when a server's going away keeps retries short.
    going_away_until: Option<Instant>,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            backoff: BACKOFF_MIN,
            going_away_until: None,
        }
    }
}

impl Reconnect {
    /// The session that just ended was welcomed: the next failure starts
    /// the backoff again from its minimum.
    pub fn welcomed(&mut self) {
        self.backoff = BACKOFF_MIN;
    }

    /// A refusal that retrying soon cannot help (the operator must act).
    pub fn refused(&mut self) {
        self.backoff = BACKOFF_MAX;
    }

    /// The wait before the next session, after one ended with `ended`.
    /// `round_over`: every server was tried in this round (else the next
    /// one is raced at once, after [`FAILOVER_JITTER`]).
    pub fn next_wait(
        &mut self,
        ended: &Result<(), ClientError>,
        round_over: bool,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Duration {
        if matches!(ended, Err(ClientError::GoingAway { .. })) {
            self.going_away_until = Some(now + GOING_AWAY_GRACE);
            self.backoff = BACKOFF_MIN;
        }
        if !round_over {
            return rng.gen_range(Duration::ZERO..=FAILOVER_JITTER);
        }
        if self.going_away_until.is_some_and(|until| now < until) {
            let (low, high) = GOING_AWAY_RETRY;
            return rng.gen_range(low..=high);
        }
        // Full jitter in [backoff/2, backoff], so a rendezvous that lost
        // its nodes is not hit by every one in the same instant.
        let wait = rng.gen_range(self.backoff / 2..=self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        wait
    }
}

/// The node's end of the relay: the live connection (or none) for sending,
/// and the frames the rendezvous relayed to us.
#[derive(Debug, Clone)]
pub struct RelayLink {
    pub connection: watch::Sender<Option<quinn::Connection>>,
    pub frames: mpsc::Sender<bytes::Bytes>,
}

/// How a session talks to the rest of meshd.
#[derive(Debug)]
pub struct Channels {
    /// What the rendezvous says, for the node agent.
    pub updates: mpsc::Sender<Update>,
    /// What the node agent says to the rendezvous (punch requests, its NAT
    /// mapping), written to the stream as it comes.
    pub outbox: mpsc::Receiver<NodeMessage>,
    pub relay: RelayLink,
    /// Set to the rendezvous's address before each session connects: the
    /// driver hands the QUIC endpoint datagrams from there only.
    pub quic_source: std::sync::Arc<QuicSource>,
    /// Prefixes to advertise beside [`ClientConfig::routes`], as they
    /// change (flannel's subnet); a change starts a new session, whose
    /// hello carries them. `None`: the config's only.
    pub extra_routes: Option<tokio::sync::watch::Receiver<Vec<IpNet>>>,
    /// The address the gateway mapped to this node, as the candidate to
    /// announce (or none): a change is sent as a `candidates` message.
    /// `None`: no port mapper.
    pub mapped: Option<tokio::sync::watch::Receiver<Option<Candidate>>>,
    /// Marked whenever the host's addresses or links changed (a new
    /// lease, an interface gone): the candidates are gathered again and
    /// sent if they differ. `None`: no watch.
    pub interfaces: Option<tokio::sync::watch::Receiver<()>>,
}

/// What the node needs to reach and convince its rendezvous.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The mesh's servers as the join line names them (`HOST:PORT`,
    /// resolved afresh for every session), tried in this order.
    pub servers: Vec<String>,
    pub pin: CertHash,
    pub name: String,
    pub listen_port: u16,
    /// The join token, until the node is registered.
    pub token: Option<JoinToken>,
    /// Prefixes behind this node it asks the mesh to route to it.
    pub routes: Vec<IpNet>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the rendezvous at {server}: {reason}")]
    Connect { server: String, reason: String },
    #[error(
        "the server at {server} is not the rendezvous of this mesh: its certificate does not match \
         --ca-hash (a mistyped hash, or another server at that address)"
    )]
    CertificateMismatch { server: String },
    #[error("the rendezvous at {server} refused this node ({reason:?}): {message}")]
    Rejected {
        server: String,
        reason: RejectReason,
        message: String,
    },
    #[error("the rendezvous at {server} broke the protocol: {reason}")]
    Protocol { server: String, reason: String },
    #[error("connection to the rendezvous at {server} lost: {source}")]
    Lost { server: String, source: StreamError },
    #[error("the rendezvous at {server} is going away (a restart or a shutdown)")]
    GoingAway { server: String },
}

impl ClientError {
    /// Whether retrying can help. A refused node stays refused until an
    /// operator acts (new token, re-added node, matching versions).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ClientError::Rejected { .. } | ClientError::CertificateMismatch { .. }
        )
    }
}

/// Keeps a session to the rendezvous up until `updates` is closed.
///
/// `candidates` is asked afresh before each session, since interface
/// addresses change. Returns only on a permanent rejection before the node
/// was ever admitted (the caller should exit: the operator must act).
pub async fn run(
    endpoint: quinn::Endpoint,
    mut config: ClientConfig,
    key: PrivateKey,
    candidates: impl Fn() -> Vec<Candidate> + Sync,
    mut channels: Channels,
    admitted_before: bool,
) -> ClientError {
    let mut admitted = admitted_before;
    let mut reconnect = Reconnect::default();
    let mut servers = Servers::new(config.servers.clone());
    let base_routes = config.routes.clone();
    // The peer map as the rendezvous told it, kept across sessions: the
    // next welcome leaves it out if it is still the server's.
    let mut held = HeldMap::default();
    loop {
        if let Some(extra) = &mut channels.extra_routes {
            let routes = advertised_routes(&base_routes, &extra.borrow_and_update());
            if routes != config.routes {
                config.routes = routes.clone();
                if channels
                    .updates
                    .send(Update::Advertised(routes))
                    .await
                    .is_err()
                {
                    return ClientError::Protocol {
                        server: servers.current().to_owned(),
                        reason: "meshd is shutting down".into(),
                    };
                }
            }
        }
        let mut welcomed = false;
        let mut round_over = false;
        let result = session(
            &endpoint,
            &config,
            &key,
            &candidates,
            &mut channels,
            &mut welcomed,
            &mut servers,
            &mut round_over,
            &mut held,
        )
        .await;
        let server = servers.current().to_owned();
        channels.relay.connection.send_replace(None);
        let updates = &channels.updates;
        if welcomed {
            admitted = true;
            // Registered now: the token has done its job.
            config.token = None;
            reconnect.welcomed();
        }
        if updates.is_closed() {
            return ClientError::Protocol {
                server,
                reason: "meshd is shutting down".into(),
            };
        }
        match &result {
            Err(e) if e.is_permanent() && !admitted => {
                if let Err(e) = result {
                    return e;
                }
            }
            Err(e) if e.is_permanent() => {
                tracing::error!(error = %e, "rendezvous refuses this node; existing tunnels stay up");
                reconnect.refused();
            }
            Err(e @ ClientError::GoingAway { .. }) => {
                tracing::info!(error = %e, "reconnecting shortly")
            }
            Err(e) => tracing::warn!(error = %e, "rendezvous session ended"),
            Ok(()) => tracing::info!("rendezvous closed the session"),
        }
        if welcomed && updates.send(Update::Disconnected).await.is_err() {
            return ClientError::Protocol {
                server,
                reason: "meshd is shutting down".into(),
            };
        }
        let wait =
            reconnect.next_wait(&result, round_over, Instant::now(), &mut rand::thread_rng());
        if servers.len() > 1 {
            // The servers the next attempt races: not the one just lost
            // (it sits out the round), unless the round is over.
            let next: Vec<String> = servers.candidates().into_iter().map(|(_, s)| s).collect();
            tracing::info!(?next, retry_in = ?wait, "trying the next server");
        } else {
            tracing::info!(retry_in = ?wait, "next session");
        }
        tokio::time::sleep(wait).await;
    }
}

/// The mesh's servers as a node tries them: the join line's, then those
/// `Welcome`s name. Each attempt races the handshakes of every server not
/// yet tried in this round and takes the first to answer: the reachable
/// server with the lowest round-trip time (and the least loaded) becomes
/// the node's home. A server that is lost, or that answered but did not
/// admit, is left out until the round ends: when every server has been
/// tried without a welcome (then the caller backs off), or at a welcome.
#[derive(Debug, Clone)]
pub struct Servers {
    list: Vec<String>,
    at: usize,
    /// Per server of `list`: tried in this round without a welcome.
    tried: Vec<bool>,
}

impl Servers {
    /// `list` must not be empty (the node's config always names one).
    pub fn new(list: Vec<String>) -> Self {
        let mut servers = Self {
            list: Vec::new(),
            at: 0,
            tried: Vec::new(),
        };
        servers.learn(&list);
        servers
    }

    /// The server of the session (the last one chosen).
    pub fn current(&self) -> &str {
        self.list.get(self.at).map_or("", String::as_str)
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The servers the next attempt races: those not tried in this round,
    /// as indices and names, in the list's order.
    pub fn candidates(&self) -> Vec<(usize, String)> {
        self.list
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.tried.get(*i).copied().unwrap_or(false))
            .map(|(i, s)| (i, s.clone()))
            .collect()
    }

    /// Servers a `Welcome` named, added after those known (none is
    /// forgotten: the join line's stay, whatever a server says).
    pub fn learn(&mut self, servers: &[String]) {
        for server in servers {
            if !server.is_empty() && !self.list.contains(server) {
                self.list.push(server.clone());
                self.tried.push(false);
            }
        }
    }

    /// Server `i` answered first: the session is with it.
    pub fn chose(&mut self, i: usize) {
        if i < self.list.len() {
            self.at = i;
        }
    }

    /// The current server welcomed the node: a new round starts (a later
    /// loss leaves this server out of the next race only).
    pub fn welcomed(&mut self) {
        self.tried.iter_mut().for_each(|t| *t = false);
    }

    /// The current server was lost, or did not admit: it sits out the rest
    /// of the round. `true` when every server has been tried since the
    /// last welcome (then the caller backs off; the next round races all).
    pub fn failed(&mut self) -> bool {
        self.fail(self.at)
    }

    /// No server of the race answered: each of them sits out the round.
    pub fn all_failed(&mut self, candidates: &[(usize, String)]) -> bool {
        let mut round_over = false;
        for (i, _) in candidates {
            round_over |= self.fail(*i);
        }
        round_over
    }

    fn fail(&mut self, i: usize) -> bool {
        if let Some(tried) = self.tried.get_mut(i) {
            *tried = true;
        }
        if self.tried.iter().all(|t| *t) {
            self.welcomed();
            true
        } else {
            false
        }
    }
}

/// One session: races the handshakes of the servers not yet tried in
/// this round ([`Servers::candidates`]), then admission at the first to
/// answer, then deltas until the connection ends. Sets `round_over` when
/// every server has now been tried without a welcome.
#[allow(clippy::too_many_arguments)]
async fn session(
    endpoint: &quinn::Endpoint,
    config: &ClientConfig,
    key: &PrivateKey,
    candidates: &(dyn Fn() -> Vec<Candidate> + Sync),
    channels: &mut Channels,
    welcomed: &mut bool,
    servers: &mut Servers,
    round_over: &mut bool,
    held: &mut HeldMap,
) -> Result<(), ClientError> {
    let racing = servers.candidates();
    let (home, connection) =
        match connect_first(endpoint, config.pin, &racing, Some(&channels.quic_source)).await {
            Ok(won) => won,
            Err(e) => {
                *round_over = servers.all_failed(&racing);
                return Err(e);
            }
        };
    servers.chose(home);
    if racing.len() > 1 {
        tracing::info!(
            server = %servers.current(),
            rtt = ?connection.rtt(),
            "home server: the first of {} to answer",
            racing.len()
        );
    }
    let result = admit_and_serve(
        connection, config, key, candidates, channels, welcomed, servers, held,
    )
    .await;
    *round_over = servers.failed();
    result
}

/// Admission on `connection` (to [`Servers::current`]), then deltas until
/// the connection ends. `held` follows the peer map the agent is given.
#[allow(clippy::too_many_arguments)]
async fn admit_and_serve(
    connection: quinn::Connection,
    config: &ClientConfig,
    key: &PrivateKey,
    candidates: &(dyn Fn() -> Vec<Candidate> + Sync),
    channels: &mut Channels,
    welcomed: &mut bool,
    servers: &mut Servers,
    held: &mut HeldMap,
) -> Result<(), ClientError> {
    let Channels {
        updates,
        outbox,
        relay,
        quic_source: _,
        extra_routes,
        mapped,
        interfaces,
    } = channels;
    let server = servers.current().to_owned();
    if let Some(mapped) = mapped.as_mut() {
        // The hello carries the mapping as it is now.
        mapped.mark_unchanged();
    }
    if let Some(interfaces) = interfaces.as_mut() {
        // And the addresses.
        interfaces.mark_unchanged();
    }
    let mut announced = candidates();
    let offered = held.digest();
    let Welcomed {
        mut session,
        mut welcome,
        servers: others,
        peers_unchanged,
    } = admit_on(connection, config, &server, key, announced.clone(), offered).await?;
    if let Update::Welcome { peers, .. } = &mut welcome {
        if peers_unchanged {
            // The map held is the server's: the agent gets it again whole.
            *peers = held.entries();
            tracing::debug!(peers = peers.len(), "the peer map held is the rendezvous's");
        } else {
            held.replace(peers);
        }
    }
    *welcomed = true;
    servers.welcomed();
    servers.learn(&others);
    // The agent hears of the session (the relay is up) before the peer map
    // arrives, so that no peer is guessed direct for a moment.
    let connection = session.connection().clone();
    relay.connection.send_replace(Some(connection.clone()));
    if updates.send(welcome).await.is_err() {
        return Ok(());
    }
    loop {
        tokio::select! {
            datagram = connection.read_datagram() => match datagram {
                Ok(frame) => {
                    // A full queue drops the frame, as a full router queue would.
                    let _ = relay.frames.try_send(frame);
                    // quinn hands out queued datagrams without ever pausing:
                    // under a burst, let the driver and the control stream run.
                    tokio::task::consume_budget().await;
                }
                Err(_) => return Ok(()),
            },
            stream = connection.accept_uni() => match stream {
                Ok(mut stream) => {
                    let frames = relay.frames.clone();
                    tokio::spawn(async move {
                        // Frames follow each other until the stream ends (proto/control.md §13).
                        while let Some(frame) = crate::relay::stream::read_stream_frame(&mut stream).await {
                            if frames.send(frame).await.is_err() {
                                return;
                            }
                        }
                    });
                }
                Err(_) => return Ok(()),
            },
            update = session.next() => match update? {
                Some(update) => {
                    match &update {
                        Update::Upsert(peer) => held.upsert(peer),
                        Update::Remove(key) => held.remove(key),
                        _ => {}
                    }
                    if updates.send(update).await.is_err() {
                        return Ok(());
                    }
                }
                None => return Ok(()),
            },
            Some(message) = outbox.recv() => session.send(&message).await?,
            Ok(()) = changed(mapped) => {
                // The gateway mapped this node's port, or the mapping went:
                // the whole list again (proto/control.md, `candidates`).
                announced = candidates();
                tracing::debug!(candidates = ?announced, "announcing this node's candidates");
                session.send(&NodeMessage::Candidates { candidates: announced.clone() }).await?;
            }
            Ok(()) = changed(interfaces) => {
                let now = candidates();
                if now != announced {
                    tracing::info!(candidates = ?now, "this node's addresses changed: announcing its candidates");
                    announced = now;
                    session.send(&NodeMessage::Candidates { candidates: announced.clone() }).await?;
                }
            }
            Ok(()) = routes_changed(extra_routes) => {
                tracing::info!("the prefixes to advertise changed: a new session carries them");
                return Ok(());
            }
        }
    }
}

/// Waits for `watched` to change; never without one.
async fn changed<T>(
    watched: &mut Option<tokio::sync::watch::Receiver<T>>,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    match watched {
        Some(watched) => watched.changed().await,
        None => std::future::pending().await,
    }
}

/// Waits for the extra prefixes to change; never without them.
async fn routes_changed(
    extra: &mut Option<tokio::sync::watch::Receiver<Vec<IpNet>>>,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    match extra {
        Some(extra) => extra.changed().await,
        None => std::future::pending().await,
    }
}

/// The config's prefixes, then the extra ones not among them, at most
/// [`MAX_ROUTES`] (the rendezvous refuses a longer hello).
fn advertised_routes(base: &[IpNet], extra: &[IpNet]) -> Vec<IpNet> {
    let mut routes = base.to_vec();
    for net in extra {
        if !routes.contains(net) {
            routes.push(*net);
        }
    }
    if routes.len() > MAX_ROUTES {
        tracing::warn!(
            advertised = routes.len(),
            "more than {MAX_ROUTES} prefixes to advertise: the rest are left out"
        );
        routes.truncate(MAX_ROUTES);
    }
    routes
}

/// An admitted control connection.
pub struct Session {
    server: String,
    connection: quinn::Connection,
    /// Kept open: dropping it would finish the stream, which the
    /// rendezvous reads as the node leaving.
    send: quinn::SendStream,
    /// Keeps a frame that is half read when [`Session::next`] is dropped.
    frames: FrameReader,
}

/// Connects to the first of the configured servers, proves the node's key
/// and returns the session with its [`Update::Welcome`].
pub async fn admit(
    endpoint: &quinn::Endpoint,
    config: &ClientConfig,
    key: &PrivateKey,
    candidates: Vec<Candidate>,
) -> Result<(Session, Update), ClientError> {
    let admitted = admit_offering(endpoint, config, key, candidates, None).await?;
    Ok((admitted.session, admitted.welcome))
}

/// [`admit`], offering the digest of a peer map the node holds: if it is
/// the server's map for the node, the welcome leaves its `peers` empty
/// and says so (`peers_unchanged`).
pub async fn admit_offering(
    endpoint: &quinn::Endpoint,
    config: &ClientConfig,
    key: &PrivateKey,
    candidates: Vec<Candidate>,
    peers_digest: Option<MapDigest>,
) -> Result<Welcomed, ClientError> {
    let server = config.servers.first().map_or("", String::as_str);
    let (_, connection) =
        connect_first(endpoint, config.pin, &[(0, server.to_owned())], None).await?;
    admit_on(connection, config, server, key, candidates, peers_digest).await
}

/// An admission: the session, the welcome for the agent, the servers the
/// welcome named, and whether it left the peer map out because the node
/// holds it (then the welcome's `peers` is empty).
pub struct Welcomed {
    pub session: Session,
    pub welcome: Update,
    pub servers: Vec<String>,
    pub peers_unchanged: bool,
}

/// Resolves every server of `racing` and starts a handshake with each at
/// once; the first to complete wins (the others are closed as they are
/// dropped). `source`, the shared socket's filter, admits every racer's
/// address until then, and the winner's only after. Without a winner
/// within [`HANDSHAKE_DEADLINE`], the error of the first server in
/// `racing`'s order.
async fn connect_first(
    endpoint: &quinn::Endpoint,
    pin: CertHash,
    racing: &[(usize, String)],
    source: Option<&QuicSource>,
) -> Result<(usize, quinn::Connection), ClientError> {
    let connect_err = |server: &str, reason: String| ClientError::Connect {
        server: server.to_owned(),
        reason,
    };
    let first = racing.first().map_or("", |(_, s)| s.as_str());
    let client_config = tls::client_config(pin).map_err(|e| connect_err(first, e.to_string()))?;
    let resolved = futures::future::join_all(
        racing
            .iter()
            .map(|(i, server)| async move { (*i, server.as_str(), resolve(server).await) }),
    )
    .await;
    // Per server, in `racing`'s order: its error, once it has one.
    let mut errors: Vec<Option<ClientError>> = racing.iter().map(|_| None).collect();
    let mut handshakes = futures::stream::FuturesUnordered::new();
    let mut addrs = Vec::new();
    for (slot, (i, server, address)) in resolved.into_iter().enumerate() {
        let address = match address {
            Ok(address) => address,
            Err(reason) => {
                errors[slot] = Some(connect_err(server, reason));
                continue;
            }
        };
        addrs.push(address);
        let client_config = client_config.clone();
        handshakes.push(async move {
            let connection = async {
                endpoint
                    .connect_with(client_config, address, tls::SERVER_NAME)
                    .map_err(|e| connect_err(server, e.to_string()))?
                    .await
                    .map_err(|e| connection_error(server, &e))
            };
            (slot, i, address, connection.await)
        });
    }
    if let Some(source) = source {
        source.set_all(&addrs);
    }
    let deadline = tokio::time::sleep(HANDSHAKE_DEADLINE);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = futures::StreamExt::next(&mut handshakes) => match next {
                Some((_, i, address, Ok(connection))) => {
                    if let Some(source) = source {
                        source.set(address);
                    }
                    return Ok((i, connection));
                }
                Some((slot, _, _, Err(e))) => errors[slot] = Some(e),
                None => break,
            },
            () = &mut deadline => break,
        }
    }
    let reason = format!("no answer within {HANDSHAKE_DEADLINE:?} (is UDP to it blocked?)");
    Err(errors
        .into_iter()
        .zip(racing)
        .map(|(e, (_, server))| e.unwrap_or_else(|| connect_err(server, reason.clone())))
        .next()
        .unwrap_or_else(|| connect_err(first, "no server to connect to".into())))
}

/// Admission on a connected `connection` to `server`: the server's hello,
/// ours with the proof (and the digest of the map held, if any), and its
/// welcome (or refusal).
async fn admit_on(
    connection: quinn::Connection,
    config: &ClientConfig,
    server: &str,
    key: &PrivateKey,
    candidates: Vec<Candidate>,
    peers_digest: Option<MapDigest>,
) -> Result<Welcomed, ClientError> {
    let lost = |source: StreamError| ClientError::Lost {
        server: server.to_owned(),
        source,
    };
    let protocol = |reason: String| ClientError::Protocol {
        server: server.to_owned(),
        reason,
    };
    let setup = async {
        let (mut send, recv) = connection
            .accept_bi()
            .await
            .map_err(|e| connection_error(server, &e))?;
        let mut frames = FrameReader::new(recv, MAX_FRAME_UNADMITTED);

        let server_hello: ServerHello = frames.next().await.map_err(lost)?;
        if server_hello.version != PROTOCOL_VERSION {
            return Err(protocol(format!(
                "it speaks protocol version {}, this meshd {PROTOCOL_VERSION}: upgrade the older side",
                server_hello.version
            )));
        }
        let mut exporter = [0u8; 32];
        connection
            .export_keying_material(&mut exporter, admission::EXPORTER_LABEL, &[])
            .map_err(|_| protocol("TLS exporter unavailable".into()))?;
        let hello = Hello {
            version: PROTOCOL_VERSION,
            public_key: key.public_key(),
            name: config.name.clone(),
            listen_port: config.listen_port,
            token: config.token.as_ref().map(|t| t.expose().to_owned()),
            candidates,
            proof: admission::proof(key, &server_hello.server_key, &exporter),
            routes: config.routes.clone(),
            peers_digest,
        };
        write_frame(&mut send, &hello).await.map_err(lost)?;
        frames.set_limit(MAX_FRAME);
        Ok((send, frames))
    };
    let (send, mut frames) = tokio::time::timeout(HANDSHAKE_DEADLINE, setup)
        .await
        .map_err(|_| ClientError::Connect {
            server: server.to_owned(),
            reason: format!("no hello exchanged within {HANDSHAKE_DEADLINE:?} of the handshake"),
        })??;
    let welcome = receive_welcome(&mut frames, server).await?;

    match welcome {
        ServerMessage::Welcome {
            node,
            mesh,
            observed,
            peers,
            servers,
            routes,
            features,
            port_taken,
            peers_unchanged,
        } => {
            if peers_unchanged && peers_digest.is_none() {
                return Err(protocol(
                    "a welcome without the peer map, which this node does not hold".into(),
                ));
            }
            tracing::info!(
                %server, ipv4 = %node.ipv4, ipv6 = %node.ipv6, %observed, peers = peers.len(),
                peers_unchanged, ?servers, "admitted by the rendezvous"
            );
            let session = Session {
                server: server.to_owned(),
                connection,
                send,
                frames,
            };
            Ok(Welcomed {
                session,
                welcome: Update::Welcome {
                    node,
                    mesh,
                    observed,
                    peers: peers.into_entries(),
                    routes,
                    paths: features.iter().any(|f| f == FEATURE_PATHS),
                    port_taken: port_taken.map(|taken| *taken),
                },
                servers,
                peers_unchanged,
            })
        }
        ServerMessage::Rejected { reason, message } => Err(ClientError::Rejected {
            server: server.to_owned(),
            reason,
            message,
        }),
        // Not the whole message: a peer map is megabytes.
        other => Err(protocol(format!(
            "expected a welcome, got {}",
            bounded(&format!("{other:?}"))
        ))),
    }
}

/// The frame after our hello, as long as it keeps coming: see
/// [`WELCOME_STALL`] and [`WELCOME_MAX`]. Progress is looked at every
/// second.
async fn receive_welcome(
    frames: &mut FrameReader,
    server: &str,
) -> Result<ServerMessage, ClientError> {
    const LOOK: Duration = Duration::from_secs(1);
    let started = tokio::time::Instant::now();
    let (mut had, mut moved) = (frames.buffered(), started);
    loop {
        // `next` is cancel-safe: what arrived stays in `frames`.
        if let Ok(read) = tokio::time::timeout(LOOK, frames.next()).await {
            return read.map_err(|source| ClientError::Lost {
                server: server.to_owned(),
                source,
            });
        }
        let now = tokio::time::Instant::now();
        let have = frames.buffered();
        if have != had {
            (had, moved) = (have, now);
        }
        let reason = if now - moved >= WELCOME_STALL {
            if have == 0 {
                format!("no welcome within {WELCOME_STALL:?} of the hello")
            } else {
                format!(
                    "the welcome stopped after {have} bytes: nothing more for {WELCOME_STALL:?}"
                )
            }
        } else if now - started >= WELCOME_MAX {
            format!("the welcome took longer than {WELCOME_MAX:?}")
        } else {
            continue;
        };
        return Err(ClientError::Connect {
            server: server.to_owned(),
            reason,
        });
    }
}

impl Session {
    /// Sends what the node agent has to say.
    pub async fn send(&mut self, message: &NodeMessage) -> Result<(), ClientError> {
        write_frame(&mut self.send, message)
            .await
            .map_err(|source| ClientError::Lost {
                server: self.server.clone(),
                source,
            })
    }

    /// Asks the rendezvous to have `peer` probe us now.
    pub async fn request_punch(&mut self, peer: PublicKey) -> Result<(), ClientError> {
        write_frame(&mut self.send, &NodeMessage::Punch { peer })
            .await
            .map_err(|source| ClientError::Lost {
                server: self.server.clone(),
                source,
            })
    }

    /// Tells the rendezvous how this node's NAT maps, for its peers.
    pub async fn report_nat(&mut self, mapping: NatMapping) -> Result<(), ClientError> {
        write_frame(&mut self.send, &NodeMessage::Nat { mapping })
            .await
            .map_err(|source| ClientError::Lost {
                server: self.server.clone(),
                source,
            })
    }

    /// The QUIC connection, for the relay.
    pub fn connection(&self) -> &quinn::Connection {
        &self.connection
    }

    /// The next change to the peer map; `None` when the rendezvous closed
    /// the session cleanly. Cancel-safe: a frame half read when this is
    /// dropped is completed by the next call.
    pub async fn next(&mut self) -> Result<Option<Update>, ClientError> {
        let server = || self.server.clone();
        let msg: ServerMessage = match self.frames.next().await {
            Ok(m) => m,
            Err(StreamError::Closed) => return Ok(None),
            Err(source) => {
                return Err(match self.connection.close_reason() {
                    Some(reason) => connection_error(&self.server, &reason),
                    None => ClientError::Lost {
                        server: server(),
                        source,
                    },
                })
            }
        };
        match msg {
            ServerMessage::PeerUpsert { peer } => Ok(Some(Update::Upsert(peer))),
            ServerMessage::PeerRemove { public_key } => Ok(Some(Update::Remove(public_key))),
            ServerMessage::Punch { peer } => Ok(Some(Update::Punch(peer))),
            ServerMessage::Routes { routes } => Ok(Some(Update::Routes(routes))),
            ServerMessage::Rejected { reason, message } => Err(ClientError::Rejected {
                server: server(),
                reason,
                message,
            }),
            ServerMessage::Welcome { .. } => Err(ClientError::Protocol {
                server: server(),
                reason: "a second welcome".into(),
            }),
        }
    }
}

/// `HOST:PORT` → an address, IPv4 first (the common underlay).
async fn resolve(server: &str) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(server)
        .await
        .map_err(|e| format!("cannot resolve {server}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{server} resolves to no address"))
}

fn connection_error(server: &str, e: &quinn::ConnectionError) -> ClientError {
    let server = server.to_owned();
    match e {
        quinn::ConnectionError::ApplicationClosed(close)
            if close.error_code == CloseReason::GoingAway.code().into() =>
        {
            ClientError::GoingAway { server }
        }
        // A failed pin surfaces as a TLS certificate alert (RFC 8446 §6.2).
        quinn::ConnectionError::TransportError(t) if is_certificate_alert(t.code) => {
            ClientError::CertificateMismatch { server }
        }
        quinn::ConnectionError::TimedOut => ClientError::Connect {
            server,
            reason: "timed out (is UDP to it blocked?)".into(),
        },
        other => ClientError::Connect {
            server,
            reason: other.to_string(),
        },
    }
}

/// bad_certificate, unsupported_certificate, certificate_revoked,
/// certificate_expired, certificate_unknown, unknown_ca, and access_denied,
/// which rustls sends when an application verifier (our pin) says no.
fn is_certificate_alert(code: quinn::TransportErrorCode) -> bool {
    [42u8, 43, 44, 45, 46, 48, 49]
        .iter()
        .any(|alert| code == quinn::TransportErrorCode::crypto(*alert))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(list: &[&str]) -> Servers {
        Servers::new(list.iter().map(|s| (*s).to_owned()).collect())
    }

    fn names(candidates: &[(usize, String)]) -> Vec<&str> {
        candidates.iter().map(|(_, s)| s.as_str()).collect()
    }

    #[test]
    fn a_lost_home_sits_out_the_round_and_a_whole_round_ends_in_backoff() {
        let mut s = servers(&["rv1:7443", "rv2:7443", "rv3:7443"]);
        let all = ["rv1:7443", "rv2:7443", "rv3:7443"];
        assert_eq!(
            names(&s.candidates()),
            all,
            "the first attempt races them all"
        );
        s.chose(1);
        assert_eq!(s.current(), "rv2:7443", "the first to answer");
        s.welcomed();
        assert!(!s.failed(), "rv2 lost: the others race at once");
        assert_eq!(names(&s.candidates()), ["rv1:7443", "rv3:7443"]);
        s.chose(2);
        assert!(!s.failed(), "rv3 answered but did not admit");
        assert_eq!(names(&s.candidates()), ["rv1:7443"]);
        let racing = s.candidates();
        assert!(s.all_failed(&racing), "rv1 unreachable too: back off");
        assert_eq!(
            names(&s.candidates()),
            all,
            "the next round races them all again"
        );
    }

    #[test]
    fn a_race_nobody_answers_ends_the_round() {
        let mut s = servers(&["rv1:7443", "rv2:7443"]);
        let racing = s.candidates();
        assert!(s.all_failed(&racing));
        assert_eq!(s.candidates().len(), 2);
    }

    #[test]
    fn servers_a_welcome_names_are_added_and_the_join_lines_kept() {
        let mut s = servers(&["rv1:7443"]);
        s.learn(&["rv1:7443".into(), "rv2:7443".into(), String::new()]);
        assert_eq!(s.len(), 2);
        s.learn(&[]);
        assert_eq!(s.len(), 2, "a welcome naming none forgets nothing");
        s.welcomed();
        assert!(!s.failed());
        assert_eq!(names(&s.candidates()), ["rv2:7443"]);
    }

    #[test]
    fn a_single_server_backs_off_after_each_loss() {
        let mut s = servers(&["rv:7443"]);
        s.welcomed();
        assert!(s.failed());
        assert_eq!(names(&s.candidates()), ["rv:7443"]);
        assert_eq!(s.current(), "rv:7443");
    }

    fn going_away() -> Result<(), ClientError> {
        Err(ClientError::GoingAway {
            server: "rv:7443".into(),
        })
    }

    fn lost() -> Result<(), ClientError> {
        Err(ClientError::Connect {
            server: "rv:7443".into(),
            reason: "timed out".into(),
        })
    }

    #[test]
    fn failures_back_off_with_jitter_up_to_the_cap_and_a_welcome_resets_it() {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
        let now = Instant::now();
        let mut r = Reconnect::default();
        let waits: Vec<Duration> = (0..8)
            .map(|_| r.next_wait(&lost(), true, now, &mut rng))
            .collect();
        let mut cap = BACKOFF_MIN;
        for w in &waits {
            assert!(
                *w >= cap / 2 && *w <= cap,
                "{w:?} outside [{:?}, {cap:?}]",
                cap / 2
            );
            cap = (cap * 2).min(BACKOFF_MAX);
        }
        r.welcomed();
        assert!(r.next_wait(&lost(), true, now, &mut rng) <= BACKOFF_MIN);
        // Another server to race: at once, whatever the backoff.
        assert!(r.next_wait(&lost(), false, now, &mut rng) <= FAILOVER_JITTER);
    }

    #[test]
    fn a_server_going_away_brings_its_nodes_back_within_seconds_for_a_minute() {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(9);
        let now = Instant::now();
        let mut r = Reconnect::default();
        // A node deep in its backoff when the server says it is going away.
        for _ in 0..6 {
            r.next_wait(&lost(), true, now, &mut rng);
        }
        let (low, high) = GOING_AWAY_RETRY;
        let first = r.next_wait(&going_away(), true, now, &mut rng);
        assert!(first >= low && first <= high, "{first:?}");
        // The server is still restarting: attempts fail, and stay short.
        let mut at = now;
        while at < now + GOING_AWAY_GRACE - high {
            let w = r.next_wait(&lost(), true, at, &mut rng);
            assert!(w >= low && w <= high, "{w:?} at {:?}", at - now);
            at += w + HANDSHAKE_DEADLINE;
        }
        // After the grace, the backoff is back, from its minimum.
        let later = now + GOING_AWAY_GRACE + Duration::from_secs(1);
        assert!(r.next_wait(&lost(), true, later, &mut rng) <= BACKOFF_MIN);
        assert!(r.next_wait(&lost(), true, later, &mut rng) <= BACKOFF_MIN * 2);
    }
}
