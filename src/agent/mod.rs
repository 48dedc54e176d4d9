//! The node agent: this node's control state as one state machine, in the
//! engine's shape.
//!
//! Pure: no socket, clock, random source, channel or file. It owns the
//! engine [`Node`] and everything a node keeps beside it: the peer map's
//! metadata (names, overlay addresses, NAT behaviour, relay ids), the
//! static peers a peer map never removes, the [`MappingObserver`] and the
//! NAT mapping reported to the rendezvous, the `meshctl ping`/`netcheck`
//! state machines and the rendezvous NAT check (`wire::reflect`) with
//! their deadlines, the overlay addresses mesh0 should have, and the
//! prefixes behind peers (their accepted routes) that mesh0 routes.
//!
//! Inputs are `handle_*(…, now)`: what the rendezvous says ([`Update`]),
//! the session coming up and going down, local API requests, NAT-check
//! answers, relayed frames, timeouts. The packet path goes straight to the
//! engine ([`Agent::node_mut`]); after each batch of it the shell calls
//! [`Agent::handle_engine_events`], so the agent sees what the engine saw
//! (observations of our address, punch wishes, ping replies). Outputs are
//! `poll_*`, each saying when to call it, as in quinn-proto: the engine's
//! transmits (through [`Agent::node_mut`]), NAT checks to send, relay
//! frames addressed by relay id, messages for the rendezvous, changes for
//! the host (addresses, the cache), answers to the API, and the next
//! timeout with its reason. The driver ([`crate::dataplane::driver`]) and
//! the simulation ([`crate::sim`]) are its two shells.

// Pure: the clock and randomness are inputs (clippy.toml names what is
// forbidden).
#![deny(clippy::disallowed_methods)]

pub mod learned;
pub mod path_report;
mod status;
#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "a test starts its clock anywhere"
)]
mod tests;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::control::{IoCounters, PeerPath, PingInfo, Request, Response};
use crate::engine::nat::{MappingObserver, Observer};
use crate::engine::paths::{Path, Source};
use crate::engine::{self, EngineError, Event, Node, NodeConfig, PeerId, PeerSpec};
use crate::identity::PublicKey;
use crate::wire::control::{
    Candidate, CandidateKind, MeshInfo, NatMapping, NodeEntry, NodeMessage, PortTaken,
    RouteDecision, RouteStatus, MAX_ROUTES,
};
use crate::wire::reflect::{self, Reflect, REFLECT_LEN};
use crate::wire::relay::{self, NodeId};

pub use path_report::PATH_REPORT_EVERY;
pub use status::PeerMeta;

/// Keepalive towards mesh peers: keeps NAT mappings open on both sides
/// (WireGuard's recommendation for peers behind NAT).
pub const MESH_KEEPALIVE: u16 = 25;
/// How long `meshctl ping` waits for one pong.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `meshctl netcheck` waits for the NAT-check port.
pub const NETCHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// A NAT check unanswered this long is sent once more.
pub const REFLECT_RETRY: Duration = Duration::from_secs(1);
/// How often the node asks the NAT-check port again where it is seen, while
/// a session is up, give or take a sixth (so that a mesh's nodes spread
/// out): a router's new public address is noticed within this.
pub const REFLECT_EVERY: Duration = Duration::from_secs(30);
/// Messages for the rendezvous queued before more are dropped (a punch
/// request is best effort: a full queue means requests are pending).
const OUTBOX: usize = 64;

/// What the rendezvous told us (or the cache remembered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// Admitted: our own entry, the mesh, and the full peer map.
    Welcome {
        node: NodeEntry,
        mesh: MeshInfo,
        observed: SocketAddr,
        peers: Vec<NodeEntry>,
        /// What the mesh decided about each prefix this node advertised.
        routes: Vec<RouteDecision>,
        /// The server takes path reports ([`path_report`]).
        paths: bool,
        /// Another node behind our NAT holds the public port ours needs.
        port_taken: Option<PortTaken>,
    },
    Upsert(NodeEntry),
    /// The mesh's decisions about this node's advertised prefixes changed.
    Routes(Vec<RouteDecision>),
    /// The prefixes this node advertises from the next hello on: the
    /// config's `routes` and what flannel gave it
    /// (`advertise-flannel-subnet`).
    Advertised(Vec<IpNet>),
    Remove(PublicKey),
    /// This peer is probing us now: probe it back (hole punching).
    Punch(PublicKey),
    /// The session ended; tunnels carry on, a new session is being set up.
    Disconnected,
}

/// The node's own entry, the mesh and the last peer map: what
/// `STATE_DIR/cache.json` holds ([`crate::dataplane::cache`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCache {
    pub mesh: MeshInfo,
    pub node: NodeEntry,
    pub peers: Vec<NodeEntry>,
}

/// How a node starts.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: NodeConfig,
    /// Peers from the config file: a peer map never removes them.
    pub static_peers: Vec<PeerSpec>,
    /// The name from the config or the host, until the rendezvous says.
    pub name: Option<String>,
    pub interface: String,
    pub listen_port: u16,
    /// Addresses on the node's other interfaces: being seen at one of them
    /// means there is no NAT.
    pub underlay_ips: Vec<IpAddr>,
    /// Whether a rendezvous is configured (else: static peers only).
    pub rendezvous: bool,
    /// Prefixes behind this node that the hello advertises (`routes`).
    pub routes: Vec<IpNet>,
    /// The public address the config says reaches this node
    /// (`advertise-endpoint`), checked against where the rendezvous sees it.
    pub advertise_endpoint: Option<SocketAddr>,
}

/// A local API request, numbered by the shell, which keeps its reply
/// channel under that number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// What the shell counts itself and the status shows.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ShellStats {
    pub io: IoCounters,
    /// QUIC-looking datagrams that did not come from the rendezvous.
    pub quic_not_rendezvous: u64,
    /// QUIC datagrams dropped because quinn was not keeping up.
    pub quic_queue_full: u64,
    /// The rendezvous connection's smoothed RTT, while it is up.
    pub rendezvous_rtt: Option<Duration>,
}

/// A NAT check for the rendezvous's second port, to send from the mesh socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatCheck {
    pub dst: SocketAddr,
    pub payload: [u8; REFLECT_LEN],
}

/// One WireGuard datagram for the relay, addressed by the peer's relay id.
/// Pass the payload back to [`Agent::recycle`] once sent.
#[derive(Debug)]
pub struct RelayTransmit {
    pub to: NodeId,
    pub payload: engine::PacketBuf,
}

/// A change the host must make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostChange {
    /// mesh0 gets these overlay addresses (the first time: comes up).
    Addresses(Vec<IpNet>),
    /// The peer map changed: the cache to save.
    SaveCache(NodeCache),
    /// The rendezvous admitted this node: the join token has done its job.
    Registered,
    /// mesh0 routes these prefixes behind peers (their accepted routes):
    /// every one now, sorted, each once. Sent whenever the set changes,
    /// including the first time a cached or new peer map has any.
    Routes(Vec<IpNet>),
    /// Another node behind our NAT holds the public port ours needs: the
    /// host moves to the port named, unless something pins ours.
    PortTaken(PortTaken),
}

impl fmt::Display for HostChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostChange::Addresses(addresses) => {
                f.write_str("overlay addresses")?;
                for a in addresses {
                    write!(f, " {a}")?;
                }
                Ok(())
            }
            HostChange::SaveCache(cache) => {
                write!(f, "cache the peer map ({} peers)", cache.peers.len())
            }
            HostChange::Registered => f.write_str("registered: forget the join token"),
            HostChange::Routes(routes) if routes.is_empty() => {
                f.write_str("no prefixes behind peers")
            }
            HostChange::Routes(routes) => {
                f.write_str("prefixes behind peers")?;
                for r in routes {
                    write!(f, " {r}")?;
                }
                Ok(())
            }
            HostChange::PortTaken(taken) => write!(
                f,
                "UDP port held by {} behind the same NAT; {} is free",
                taken.by, taken.port
            ),
        }
    }
}

/// Why [`Agent::poll_timeout`] wants to be woken, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutReason {
    Engine(engine::TimeoutReason),
    /// A `meshctl ping` waits for its pong.
    Ping,
    /// A `meshctl netcheck` waits for the NAT-check port.
    Netcheck,
    /// The NAT check in flight is sent once more if still unanswered.
    NatCheckRetry,
    /// Time to look whether the paths to peers changed, for the rendezvous.
    PathReport,
    /// Time to ask the NAT-check port again where this node is seen.
    NatRecheck,
}

/// A peer from the rendezvous's map, as the engine and the API want it.
#[derive(Debug, Clone, PartialEq)]
struct MeshPeer {
    spec: PeerSpec,
    name: String,
    overlay_ips: Vec<IpAddr>,
    /// The prefixes behind it that the mesh accepted (in its allowed IPs).
    routes: Vec<IpNet>,
    /// Where it may be reached; probes pick among them.
    candidates: Vec<(SocketAddr, Source)>,
    /// Its NAT's mapping behaviour, as it reported it.
    nat: NatMapping,
}

/// The rendezvous session, while it is up.
#[derive(Debug, Clone, Copy)]
struct SessionUp {
    rtt: Option<Duration>,
}

/// A `meshctl ping` waiting for its pong.
#[derive(Debug)]
struct PendingPing {
    request: RequestId,
    peer: PublicKey,
    deadline: Instant,
    info: PingInfo,
}

/// The NAT check in flight.
#[derive(Debug, Clone, Copy)]
struct Reflecting {
    tx: reflect::TxId,
    target: SocketAddr,
    sent: Instant,
    retried: bool,
}

/// This node's control state. See the module docs.
pub struct Agent {
    node: Node,
    rng: StdRng,
    name: Option<String>,
    interface: String,
    mtu: u16,
    listen_port: u16,
    underlay_ips: Vec<IpAddr>,
    /// The overlay addresses mesh0 has (or is being given).
    addresses: Vec<IpNet>,
    has_rendezvous: bool,
    /// Names, overlay addresses and NAT behaviour of mesh peers.
    meta: HashMap<PublicKey, PeerMeta>,
    /// Relay ids (overlay IPv4) of mesh peers.
    relay_ids: HashMap<NodeId, PublicKey>,
    /// Peers from the config file: a peer map never removes them.
    static_peers: HashSet<PublicKey>,
    /// What the rendezvous told us last, for the cache.
    cache: Option<NodeCache>,
    /// The prefixes this node advertises (the hello's routes).
    advertised: Vec<IpNet>,
    /// What the mesh decided about each prefix this node advertises, and
    /// whether a welcome said so since meshd started.
    route_decisions: Vec<RouteDecision>,
    /// What the last welcome said about our port behind our NAT.
    port_taken: Option<PortTaken>,
    /// `advertise-endpoint` from the config.
    advertise_endpoint: Option<SocketAddr>,
    /// When the NAT check is sent again ([`REFLECT_EVERY`]), while a
    /// session is up.
    next_reflect: Option<Instant>,
    welcomed: bool,
    /// The prefixes behind peers that mesh0 routes (the last
    /// [`HostChange::Routes`]).
    peer_routes: Vec<IpNet>,
    /// What the kernel's routes on mesh0 say about peers' prefixes
    /// ([`learned`]), as last read.
    learned: learned::Learned,
    /// Where others see our socket: our NAT's mapping behaviour.
    observer: MappingObserver,
    /// The mapping the rendezvous was (or will be) told.
    nat_reported: NatMapping,
    /// When to tell the rendezvous about our paths to peers.
    path_reporter: path_report::PathReporter,
    session: Option<SessionUp>,
    /// The rendezvous's QUIC address, once a session was up.
    rendezvous_addr: Option<SocketAddr>,
    /// The NAT check in flight, and where the last answer saw us (and how fast).
    reflecting: Option<Reflecting>,
    reflector_seen: Option<(SocketAddr, Duration)>,
    /// What port mapping on the gateway gave, from the port mapper
    /// (`dataplane::portmap`); `None` for a node without a rendezvous.
    port_mapping: Option<crate::control::PortMappingInfo>,
    pending_pings: Vec<PendingPing>,
    /// `meshctl netcheck`s waiting, with their deadlines.
    pending_netchecks: Vec<(Instant, RequestId)>,
    /// Relay frames dropped: from an unknown relay id, or for a peer
    /// without one.
    relay_dropped: u64,
    events: VecDeque<Event>,
    nat_checks: VecDeque<NatCheck>,
    outbox: VecDeque<NodeMessage>,
    host: VecDeque<HostChange>,
    answers: VecDeque<(RequestId, Response)>,
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.node)
            .field("name", &self.name)
            .field("addresses", &self.addresses)
            .field("mesh_peers", &self.meta.len())
            .field("session", &self.session.is_some())
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// A node as meshd starts one: `seed` is for the engine (probe ids) and
    /// the agent (NAT-check ids); `now` and `unix_time` are the clocks now.
    pub fn new(
        mut config: AgentConfig,
        seed: [u8; 32],
        now: Instant,
        unix_time: Duration,
    ) -> Result<Self, EngineError> {
        let addresses = config.node.addresses.clone();
        let mtu = config.node.mtu;
        let mut node = Node::new(config.node.clone(), seed, now, unix_time);
        let mut static_peers = HashSet::new();
        for peer in std::mem::take(&mut config.static_peers) {
            static_peers.insert(peer.public_key);
            node.add_peer(peer, now)?;
        }
        Ok(Self::with_node(
            node,
            config,
            static_peers,
            seed,
            addresses,
            mtu,
        ))
    }

    fn with_node(
        node: Node,
        config: AgentConfig,
        static_peers: HashSet<PublicKey>,
        seed: [u8; 32],
        addresses: Vec<IpNet>,
        mtu: u16,
    ) -> Self {
        Self {
            node,
            rng: StdRng::from_seed(agent_seed(seed)),
            name: config.name,
            interface: config.interface,
            mtu,
            listen_port: config.listen_port,
            underlay_ips: config.underlay_ips,
            addresses,
            has_rendezvous: config.rendezvous,
            meta: HashMap::new(),
            relay_ids: HashMap::new(),
            static_peers,
            cache: None,
            advertised: config.routes,
            advertise_endpoint: config.advertise_endpoint,
            next_reflect: None,
            route_decisions: Vec::new(),
            port_taken: None,
            welcomed: false,
            peer_routes: Vec::new(),
            learned: learned::Learned::default(),
            observer: MappingObserver::new(),
            nat_reported: NatMapping::Unknown,
            path_reporter: path_report::PathReporter::default(),
            session: None,
            rendezvous_addr: None,
            reflecting: None,
            reflector_seen: None,
            port_mapping: None,
            pending_pings: Vec::new(),
            pending_netchecks: Vec::new(),
            relay_dropped: 0,
            events: VecDeque::new(),
            nat_checks: VecDeque::new(),
            outbox: VecDeque::new(),
            host: VecDeque::new(),
            answers: VecDeque::new(),
        }
    }

    /// Adds a peer as the config file does: a peer map never removes it.
    pub fn add_static_peer(&mut self, spec: PeerSpec, now: Instant) -> Result<PeerId, EngineError> {
        let key = spec.public_key;
        let id = self.node.add_peer(spec, now)?;
        self.static_peers.insert(key);
        Ok(id)
    }

    // --- the engine ---------------------------------------------------------

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The engine, for the packet path: `handle_datagram`,
    /// `handle_tun_packet`, `poll_transmit`, `poll_tun`, `recycle`. Call
    /// [`Agent::handle_engine_events`] after each batch.
    #[inline]
    pub fn node_mut(&mut self) -> &mut Node {
        &mut self.node
    }

    /// Returns a relay transmit's payload to the engine's pool.
    #[inline]
    pub fn recycle(&mut self, buf: engine::PacketBuf) {
        self.node.recycle(buf);
    }

    /// Takes the engine's events and acts on them: an observation of our
    /// address feeds the NAT mapping, a punch wish becomes a message for the
    /// rendezvous, a ping reply answers its `meshctl ping`; each is logged
    /// in its peer's span and queued for [`Agent::poll_event`]. Call after
    /// every batch of packet-path inputs given to the engine directly.
    pub fn handle_engine_events(&mut self, now: Instant) {
        while let Some(event) = self.node.poll_event() {
            // Every event concerns one peer: its log lines carry the peer's
            // span (short key and name), so an operator can follow one peer.
            let span = self.peer_span(event.peer());
            let _entered = span.enter();
            match &event {
                Event::HandshakeCompleted { peer } => {
                    tracing::debug!(peer = %peer.short(), "handshake completed");
                }
                Event::EndpointChanged { peer, endpoint } => {
                    tracing::info!(peer = %peer.short(), %endpoint, "peer endpoint changed");
                }
                Event::SessionExpired { peer } => {
                    // Once per expiry (the node says so on the change only).
                    tracing::info!(
                        peer = %peer.short(),
                        "no WireGuard session: handshakes went unanswered for 90 s or none succeeded for 9 minutes; \
                         keys erased, the next packet for this peer starts a new handshake"
                    );
                }
                Event::PathChanged { peer, path } => {
                    let name = self.meta.get(peer).map(|m| m.name.as_str()).unwrap_or("");
                    tracing::info!(peer = %peer.short(), %name, ?path, "path changed");
                }
                Event::PunchWanted { peer } => {
                    if self.session.is_some() {
                        self.send_to_rendezvous(NodeMessage::Punch { peer: *peer });
                    } else {
                        tracing::trace!(peer = %peer.short(), "punch wanted, but no rendezvous session");
                    }
                }
                Event::SeenAt { peer, seen_at } => {
                    self.seen(Observer::Peer(*peer), *seen_at, now);
                }
                Event::PingReply { peer, path, rtt } => self.ping_replied(*peer, *path, *rtt),
            }
            drop(_entered);
            self.events.push_back(event);
        }
    }

    /// The next engine event the agent handled, for the shell's logs and
    /// tests. Call after [`Agent::handle_engine_events`] (or any other
    /// `handle_*`) until `None`; the driver drops them.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // --- the rendezvous -----------------------------------------------------

    /// The peer map as the cache remembered it, at start-up: as a welcome,
    /// but nobody saw us and no token was used.
    pub fn handle_cached(&mut self, cache: NodeCache, now: Instant) {
        tracing::info!(ipv4 = %cache.node.ipv4, peers = cache.peers.len(), "starting from the cached peer map");
        self.welcome(cache, now);
    }

    /// What the rendezvous said.
    pub fn handle_update(&mut self, update: Update, now: Instant) {
        match update {
            Update::Welcome {
                node,
                mesh,
                observed,
                peers,
                routes,
                paths,
                port_taken,
            } => {
                for d in routes.iter().filter(|d| d.status != RouteStatus::Accepted) {
                    tracing::warn!(prefix = %d.prefix, reason = %d.status.describe(), "the mesh does not route an advertised prefix here");
                }
                self.route_decisions = routes;
                self.welcomed = true;
                self.seen(Observer::Rendezvous, observed, now);
                self.check_advertised(observed);
                self.host.push_back(HostChange::Registered);
                if let Some(taken) = &port_taken {
                    self.host.push_back(HostChange::PortTaken(taken.clone()));
                }
                self.port_taken = port_taken;
                self.welcome(NodeCache { mesh, node, peers }, now);
                self.path_reporter.welcomed(paths, now);
            }
            Update::Upsert(entry) => {
                if let Some(cache) = &mut self.cache {
                    if entry.public_key == cache.node.public_key {
                        return;
                    }
                    cache.peers.retain(|p| p.public_key != entry.public_key);
                    cache.peers.push(entry.clone());
                }
                self.save_cache();
                let mesh = self.cache.as_ref().map(|c| &c.mesh);
                let peer = self.with_learned(mesh_peer(&entry, mesh));
                self.upsert_peer(peer, now);
                self.update_peer_routes();
            }
            Update::Remove(key) => {
                if let Some(cache) = &mut self.cache {
                    cache.peers.retain(|p| p.public_key != key);
                }
                self.save_cache();
                self.remove_peer(key);
                self.update_peer_routes();
            }
            Update::Advertised(routes) => {
                tracing::info!(?routes, "advertising");
                self.advertised = routes;
            }
            Update::Routes(routes) => {
                for d in &routes {
                    tracing::info!(prefix = %d.prefix, decision = %d.status.describe(), "the mesh decided on an advertised prefix");
                }
                self.route_decisions = routes;
            }
            Update::Punch(peer) => {
                if !self.node.punch(&peer, now) {
                    tracing::debug!(peer = %peer.short(), "punch request ignored: probed it moments ago");
                }
            }
            Update::Disconnected => {
                tracing::info!("rendezvous unreachable; tunnels stay up, reconnecting");
                self.path_reporter.disconnected();
            }
        }
        self.handle_engine_events(now);
    }

    /// A session with the rendezvous at `rendezvous` is up: the relay can
    /// carry packets, our NAT is checked from its second port, and it hears
    /// our NAT mapping if we know it.
    pub fn handle_session_up(
        &mut self,
        rendezvous: SocketAddr,
        rtt: Option<Duration>,
        now: Instant,
    ) {
        tracing::info!(%rendezvous, "relay available");
        self.session = Some(SessionUp { rtt });
        self.rendezvous_addr = Some(canonical(rendezvous));
        self.node.set_relay_available(true, now);
        self.send_reflect(now);
        self.next_reflect = Some(self.reflect_deadline(now));
        if !self.nat_reported.is_unknown() {
            self.send_to_rendezvous(NodeMessage::Nat {
                mapping: self.nat_reported,
            });
        }
        self.handle_engine_events(now);
    }

    /// The session ended: the relay is gone until the next one.
    pub fn handle_session_down(&mut self, now: Instant) {
        tracing::info!("relay unavailable");
        self.session = None;
        self.next_reflect = None;
        self.node.set_relay_available(false, now);
        self.handle_engine_events(now);
    }

    /// What the port mapper knows now: which protocols the gateway
    /// answered and the mapping held (shown by `status` and `netcheck`,
    /// and in the reasons a pair is relayed).
    pub fn handle_port_mapping(&mut self, info: crate::control::PortMappingInfo) {
        if self.port_mapping.as_ref().map(|i| i.external) != Some(info.external) {
            match info.external {
                Some(external) => {
                    tracing::info!(%external, protocol = ?info.protocol, "the gateway maps this node's port")
                }
                None if self.port_mapping.is_some() => {
                    tracing::info!(error = ?info.error, "no port mapping on the gateway")
                }
                None => {}
            }
        }
        self.port_mapping = Some(info);
    }

    /// The next message for the rendezvous (punch requests, our NAT
    /// mapping). Call after every `handle_*` until `None`.
    pub fn poll_rendezvous_message(&mut self) -> Option<NodeMessage> {
        self.outbox.pop_front()
    }

    fn send_to_rendezvous(&mut self, message: NodeMessage) {
        if self.outbox.len() >= OUTBOX {
            tracing::debug!(?message, "rendezvous outbox full; dropped");
            return;
        }
        self.outbox.push_back(message);
    }

    // --- the relay ----------------------------------------------------------

    /// A frame the rendezvous relayed to us: the header names the source
    /// peer by relay id. One from an unknown id is dropped and counted.
    pub fn handle_relay_frame(&mut self, frame: &[u8], now: Instant) {
        let Ok((header, payload)) = relay::parse(frame) else {
            self.relay_dropped += 1;
            return;
        };
        match self.relay_ids.get(&header.node) {
            Some(&peer) => self.node.handle_relayed(peer, payload, now),
            None => self.relay_dropped += 1,
        }
    }

    /// The next WireGuard datagram for the relay, addressed by relay id;
    /// packets for peers without one are dropped and counted. Call after
    /// every batch until `None`.
    pub fn poll_relay(&mut self) -> Option<RelayTransmit> {
        while let Some(t) = self.node.poll_relay() {
            match self.relay_id_of(&t.peer) {
                Some(to) => {
                    return Some(RelayTransmit {
                        to,
                        payload: t.payload,
                    })
                }
                None => {
                    self.relay_dropped += 1;
                    self.node.recycle(t.payload);
                }
            }
        }
        None
    }

    /// Relay frames dropped by the agent so far (unknown relay ids).
    pub fn relay_dropped(&self) -> u64 {
        self.relay_dropped
    }

    /// The relay id of a mesh peer: its overlay IPv4 address.
    pub fn relay_id_of(&self, peer: &PublicKey) -> Option<NodeId> {
        let ips = &self.meta.get(peer)?.overlay_ips;
        ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => NodeId::of_overlay(*v4),
            IpAddr::V6(_) => None,
        })
    }

    // --- NAT checks -----------------------------------------------------------

    /// A datagram on the mesh socket that looks like a NAT-check answer.
    pub fn handle_reflect_datagram(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        let Ok(Reflect::Response { tx, observed }) = Reflect::parse(datagram) else {
            return;
        };
        let Some(pending) = self
            .reflecting
            .filter(|r| r.tx == tx && canonical(r.target) == canonical(from))
        else {
            return;
        };
        self.reflecting = None;
        let before = self.reflector_seen.map(|(at, _)| at);
        if before.is_some_and(|before| before != observed) {
            tracing::info!(from = ?before, to = %observed, "the NAT-check port sees this node at a new address");
        }
        self.reflector_seen = Some((observed, now.saturating_duration_since(pending.sent)));
        self.seen(Observer::Reflector, observed, now);
        self.check_advertised(observed);
        self.finish_netchecks(now);
    }

    /// The next NAT check to send from the mesh socket. Call after every
    /// `handle_*` until `None`.
    pub fn poll_nat_check(&mut self) -> Option<NatCheck> {
        self.nat_checks.pop_front()
    }

    /// When the next periodic NAT check is due: [`REFLECT_EVERY`] from
    /// `now`, give or take a sixth.
    fn reflect_deadline(&mut self, now: Instant) -> Instant {
        let spread = REFLECT_EVERY / 6;
        let jitter = self.rng.gen_range(Duration::ZERO..=spread * 2);
        now + REFLECT_EVERY - spread + jitter
    }

    /// Warns when the public address the rendezvous sees this node at is
    /// not the one `advertise-endpoint` names: peers may be aiming at an
    /// address that no longer reaches it (a renewed lease, a moved VM).
    fn check_advertised(&self, seen: SocketAddr) {
        if let Some(advertised) = self.advertised_elsewhere(seen) {
            tracing::warn!(
                %advertised, %seen,
                "the rendezvous sees this node at another public address than advertise-endpoint names: peers may not reach it there; update advertise-endpoint if the address changed"
            );
        }
    }

    /// `advertise-endpoint` when its IP is not `seen`'s.
    fn advertised_elsewhere(&self, seen: SocketAddr) -> Option<SocketAddr> {
        self.advertise_endpoint
            .filter(|a| canonical(*a).ip() != canonical(seen).ip())
    }

    /// Sends a NAT check to the rendezvous's second port, if its address is known.
    fn send_reflect(&mut self, now: Instant) {
        let Some(rendezvous) = self.rendezvous_addr else {
            return;
        };
        let target = SocketAddr::new(
            rendezvous.ip(),
            rendezvous.port().wrapping_add(reflect::PORT_OFFSET),
        );
        let tx: reflect::TxId = self.rng.gen();
        self.nat_checks.push_back(NatCheck {
            dst: target,
            payload: Reflect::Request { tx }.encode(),
        });
        self.reflecting = Some(Reflecting {
            tx,
            target,
            sent: now,
            retried: false,
        });
    }

    /// Records where `observer` sees us, and reports a change of our NAT
    /// mapping behaviour to the rendezvous.
    fn seen(&mut self, observer: Observer, seen_at: SocketAddr, now: Instant) {
        self.observer.observe(observer, seen_at, now);
        let mapping = self.nat_mapping(now);
        if mapping != self.nat_reported {
            tracing::info!(nat = mapping.describe(), "NAT mapping behaviour");
            self.nat_reported = mapping;
            if self.session.is_some() {
                self.send_to_rendezvous(NodeMessage::Nat { mapping });
            }
        }
    }

    fn nat_mapping(&self, now: Instant) -> NatMapping {
        self.observer.mapping(&self.underlay_ips, now)
    }

    /// This node's NAT mapping as reported to the rendezvous.
    pub fn nat_reported(&self) -> NatMapping {
        self.nat_reported
    }

    // --- the host -----------------------------------------------------------

    /// The overlay addresses mesh0 should have now.
    pub fn addresses(&self) -> &[IpNet] {
        &self.addresses
    }

    /// The next change for the host. Call after every `handle_*` until `None`.
    pub fn poll_host_change(&mut self) -> Option<HostChange> {
        self.host.pop_front()
    }

    fn save_cache(&mut self) {
        if let Some(cache) = &self.cache {
            self.host.push_back(HostChange::SaveCache(cache.clone()));
        }
    }

    // --- the local API --------------------------------------------------------

    /// A local API request. Peers and status are answered at once; a ping
    /// waits for its pong (or [`PING_TIMEOUT`]), a netcheck for the
    /// NAT-check port (or [`NETCHECK_TIMEOUT`]). `shell` is what the shell
    /// counts itself, for the status.
    pub fn handle_api(
        &mut self,
        id: RequestId,
        request: Request,
        shell: &ShellStats,
        now: Instant,
    ) {
        if let Some(session) = &mut self.session {
            session.rtt = shell.rendezvous_rtt;
        }
        let response = match request {
            Request::Peers => Response::Peers {
                peers: self.peer_infos(now),
            },
            Request::Status => Response::Status(Box::new(self.status_info(shell, now))),
            Request::Routes => Response::Routes(Box::new(self.routes_info())),
            Request::Ping { peer } => return self.start_ping(id, &peer, now),
            Request::Netcheck => return self.start_netcheck(id, now),
        };
        self.answers.push_back((id, response));
    }

    /// The next answer to a local API request. Call after every `handle_*`
    /// until `None`.
    pub fn poll_api_answer(&mut self) -> Option<(RequestId, Response)> {
        self.answers.pop_front()
    }

    fn start_ping(&mut self, id: RequestId, query: &str, now: Instant) {
        let key = match self.resolve(query) {
            Ok(key) => key,
            Err(message) => {
                self.answers.push_back((id, Response::Error { message }));
                return;
            }
        };
        let info = PingInfo {
            peer: self.display_name(&key),
            overlay_ip: self
                .meta
                .get(&key)
                .and_then(|m| m.overlay_ips.first())
                .copied(),
            ..PingInfo::default()
        };
        if !self.node.ping(&key, now) {
            // Nowhere to send: answer at once, as a timeout would.
            self.answers.push_back((id, Response::Pong(info)));
            return;
        }
        self.pending_pings.push(PendingPing {
            request: id,
            peer: key,
            deadline: now + PING_TIMEOUT,
            info,
        });
    }

    fn ping_replied(&mut self, peer: PublicKey, path: Path, rtt: Duration) {
        let Some(i) = self.pending_pings.iter().position(|p| p.peer == peer) else {
            return;
        };
        let mut pending = self.pending_pings.swap_remove(i);
        let (name, endpoint) = match path {
            Path::Direct(addr) => (PeerPath::Direct, Some(addr)),
            Path::Relay => (PeerPath::Relay, None),
        };
        pending.info.path = Some(name);
        pending.info.endpoint = endpoint;
        pending.info.rtt_ms = Some(crate::control::millis(rtt));
        self.answers
            .push_back((pending.request, Response::Pong(pending.info)));
    }

    fn start_netcheck(&mut self, id: RequestId, now: Instant) {
        if !self.has_rendezvous {
            let message =
                "this node has no rendezvous (static peers only): nothing to check against".into();
            self.answers.push_back((id, Response::Error { message }));
            return;
        }
        self.reflector_seen = None;
        self.send_reflect(now);
        self.pending_netchecks.push((now + NETCHECK_TIMEOUT, id));
        if self.reflecting.is_none() {
            // No rendezvous address known yet: answer with what we have.
            self.finish_netchecks(now);
        }
    }

    /// Answers every waiting `meshctl netcheck` with what is known now.
    fn finish_netchecks(&mut self, now: Instant) {
        if self.pending_netchecks.is_empty() {
            return;
        }
        let info = self.netcheck_info(now);
        for (_, id) in std::mem::take(&mut self.pending_netchecks) {
            self.answers
                .push_back((id, Response::Netcheck(Box::new(info.clone()))));
        }
    }

    // --- time ---------------------------------------------------------------

    /// When [`Agent::handle_timeout`] must be called next, and why: the
    /// engine's timers, a waiting ping or netcheck, a NAT check to resend.
    /// Call after every batch of inputs.
    pub fn poll_timeout(&self) -> (Instant, TimeoutReason) {
        let (engine, reason) = self.node.poll_timeout();
        let mut next = (engine, TimeoutReason::Engine(reason));
        let pings = self
            .pending_pings
            .iter()
            .map(|p| (p.deadline, TimeoutReason::Ping));
        let netchecks = self
            .pending_netchecks
            .iter()
            .map(|(d, _)| (*d, TimeoutReason::Netcheck));
        let retry = self
            .reflecting
            .filter(|r| !r.retried)
            .map(|r| (r.sent + REFLECT_RETRY, TimeoutReason::NatCheckRetry));
        let report = self
            .path_reporter
            .deadline()
            .map(|d| (d, TimeoutReason::PathReport));
        let recheck = self.next_reflect.map(|d| (d, TimeoutReason::NatRecheck));
        for candidate in pings
            .chain(netchecks)
            .chain(retry)
            .chain(report)
            .chain(recheck)
        {
            if candidate.0 < next.0 {
                next = candidate;
            }
        }
        next
    }

    /// Runs what is due at `now`: the engine's timers, pings and netchecks
    /// that waited long enough, a lost NAT check sent once more.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.node.poll_timeout().0 {
            self.node.handle_timeout(now);
        }
        let (expired, waiting): (Vec<PendingPing>, Vec<PendingPing>) = self
            .pending_pings
            .drain(..)
            .partition(|p| p.deadline <= now);
        self.pending_pings = waiting;
        for p in expired {
            self.answers.push_back((p.request, Response::Pong(p.info)));
        }
        if let Some(r) = self
            .reflecting
            .filter(|r| !r.retried && now >= r.sent + REFLECT_RETRY)
        {
            self.nat_checks.push_back(NatCheck {
                dst: r.target,
                payload: Reflect::Request { tx: r.tx }.encode(),
            });
            self.reflecting = Some(Reflecting { retried: true, ..r });
        }
        if self.pending_netchecks.iter().any(|(d, _)| *d <= now) {
            self.finish_netchecks(now);
        }
        if self.next_reflect.is_some_and(|d| now >= d) {
            // One in flight keeps going; the next one is due a period on.
            if self.reflecting.is_none() {
                self.send_reflect(now);
            }
            self.next_reflect = Some(self.reflect_deadline(now));
        }
        self.report_paths(now);
        self.handle_engine_events(now);
    }

    /// Tells the rendezvous our path to every mesh peer, when it takes such
    /// reports, the interval has passed and a path changed.
    fn report_paths(&mut self, now: Instant) {
        let (node, meta) = (&self.node, &self.meta);
        let report = self.path_reporter.poll(now, || {
            node.peers()
                .filter(|p| meta.contains_key(&p.public_key))
                .map(|p| path_report::entry_of(&p))
                .collect()
        });
        if let Some(peers) = report {
            tracing::debug!(peers = peers.len(), "reporting paths to the rendezvous");
            self.send_to_rendezvous(NodeMessage::Paths {
                peers: peers.into(),
            });
        }
    }

    // --- the peer map -------------------------------------------------------

    /// A full view of the mesh (from the rendezvous or the cache).
    fn welcome(&mut self, cache: NodeCache, now: Instant) {
        let addresses: Vec<IpNet> = [
            IpNet::new(IpAddr::V4(cache.node.ipv4), cache.mesh.ipv4.prefix_len()),
            IpNet::new(IpAddr::V6(cache.node.ipv6), cache.mesh.ipv6.prefix_len()),
        ]
        .into_iter()
        .flatten()
        .collect();
        self.name = Some(cache.node.name.clone());
        self.node
            .set_mesh_prefixes(&[IpNet::V4(cache.mesh.ipv4), IpNet::V6(cache.mesh.ipv6)]);
        if self.addresses != addresses {
            if !self.addresses.is_empty() {
                tracing::warn!(
                    ?addresses,
                    "the rendezvous assigned new overlay addresses; moving mesh0"
                );
            }
            self.addresses = addresses.clone();
            self.host.push_back(HostChange::Addresses(addresses));
        }
        let peers: Vec<MeshPeer> = cache
            .peers
            .iter()
            .map(|e| self.with_learned(mesh_peer(e, Some(&cache.mesh))))
            .collect();
        let keep: HashSet<PublicKey> = peers.iter().map(|p| p.spec.public_key).collect();
        let gone: Vec<PublicKey> = self
            .node
            .peers()
            .map(|p| p.public_key)
            .filter(|k| !keep.contains(k) && !self.static_peers.contains(k))
            .collect();
        for key in gone {
            self.remove_peer(key);
        }
        for peer in peers {
            self.upsert_peer(peer, now);
        }
        self.cache = Some(cache);
        self.update_peer_routes();
        self.save_cache();
    }

    /// The routes through mesh0 as the kernel has them now (the shell reads
    /// them at start and whenever the routing table changes): a route via a
    /// peer's overlay address makes its prefix that peer's — it is routed
    /// to the peer and taken as a source from it — and one that names no
    /// peer is listed with why ([`learned`]). Only what changed is touched.
    pub fn handle_kernel_routes(&mut self, routes: &[crate::netlink::KernelRoute], now: Instant) {
        let mesh: Vec<IpNet> = self
            .cache
            .as_ref()
            .map(|c| vec![IpNet::V4(c.mesh.ipv4), IpNet::V6(c.mesh.ipv6)])
            .unwrap_or_default();
        // What meshd routes itself: every peer's allowed IPs.
        let mine: Vec<IpNet> = self
            .node
            .peers()
            .flat_map(|p| p.allowed_ips)
            .map(|n| n.trunc())
            .collect();
        let by_address: HashMap<IpAddr, PublicKey> = self
            .meta
            .iter()
            .flat_map(|(key, m)| m.overlay_ips.iter().map(move |ip| (*ip, *key)))
            .collect();
        let new = learned::learn(routes, &mine, &mesh, |ip| by_address.get(&ip).copied());
        for u in new
            .unusable
            .iter()
            .filter(|u| !self.learned.unusable.contains(u))
        {
            tracing::warn!(prefix = %u.prefix, gateway = ?u.gateway, "a route on mesh0 names no peer: {}", u.why.describe());
        }
        let changed: BTreeSet<PublicKey> = self
            .learned
            .by_peer
            .keys()
            .chain(new.by_peer.keys())
            .filter(|k| self.learned.by_peer.get(k) != new.by_peer.get(k))
            .copied()
            .collect();
        self.learned = new;
        for key in changed {
            let prefixes = self
                .learned
                .by_peer
                .get(&key)
                .map_or(&[][..], Vec::as_slice);
            tracing::info!(peer = %key.short(), ?prefixes, "prefixes learned from the routing table");
            let Some(cache) = &self.cache else { continue };
            let Some(entry) = cache.peers.iter().find(|e| e.public_key == key) else {
                continue;
            };
            let peer = self.with_learned(mesh_peer(entry, Some(&cache.mesh)));
            self.upsert_peer(peer, now);
        }
    }

    /// `peer` with the prefixes learned for it in its allowed IPs (not in
    /// its routes: the kernel routes them already).
    fn with_learned(&self, mut peer: MeshPeer) -> MeshPeer {
        if let Some(prefixes) = self.learned.by_peer.get(&peer.spec.public_key) {
            for prefix in prefixes {
                if !peer.spec.allowed_ips.contains(prefix) {
                    peer.spec.allowed_ips.push(*prefix);
                }
            }
        }
        peer
    }

    /// Tells the host about the prefixes behind peers when their union
    /// changed: a peer's accepted routes came, went or moved.
    fn update_peer_routes(&mut self) {
        let routes: Vec<IpNet> = self
            .meta
            .values()
            .flat_map(|m| m.routes.iter().copied())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if routes != self.peer_routes {
            tracing::info!(?routes, "prefixes behind peers changed");
            self.peer_routes = routes.clone();
            self.host.push_back(HostChange::Routes(routes));
        }
    }

    fn upsert_peer(&mut self, peer: MeshPeer, now: Instant) {
        let key = peer.spec.public_key;
        let added = self.node.peer_status(&key).is_none();
        match self.node.upsert_peer(peer.spec, now) {
            Ok(_) => {
                if added {
                    tracing::info!(peer = %key.short(), name = %peer.name, "peer joined");
                }
                let port = peer
                    .candidates
                    .iter()
                    .find(|(_, s)| *s == Source::Local)
                    .map(|(a, _)| a.port());
                let mut addresses: Vec<_> = peer.candidates.iter().map(|(a, _)| *a).collect();
                addresses.sort_unstable();
                addresses.dedup();
                let addresses_changed = match self.meta.get(&key) {
                    Some(old) if old.addresses != addresses => {
                        tracing::info!(peer = %key.short(), name = %peer.name, ?addresses, "peer's addresses changed");
                        Some(now)
                    }
                    Some(old) => old.addresses_changed,
                    None => None,
                };
                self.node.set_candidates(&key, peer.candidates, now);
                let meta = PeerMeta {
                    name: peer.name,
                    overlay_ips: peer.overlay_ips,
                    routes: peer.routes,
                    nat: peer.nat,
                    port,
                    addresses,
                    addresses_changed,
                };
                self.meta.insert(key, meta);
                self.relay_ids.retain(|_, k| *k != key);
                if let Some(id) = self.relay_id_of(&key) {
                    self.relay_ids.insert(id, key);
                }
            }
            Err(e) => {
                tracing::warn!(peer = %key.short(), error = %e, "cannot add peer from the peer map")
            }
        }
    }

    fn remove_peer(&mut self, key: PublicKey) {
        if self.node.remove_peer(&key) {
            self.relay_ids.retain(|_, k| *k != key);
            let name = self.meta.remove(&key).map(|m| m.name).unwrap_or_default();
            tracing::info!(peer = %key.short(), %name, "peer left");
        }
    }

    fn peer_span(&self, peer: &PublicKey) -> tracing::Span {
        let name = self.meta.get(peer).map_or("", |m| m.name.as_str());
        tracing::info_span!("peer", key = %peer.short(), %name)
    }
}

/// A peer-map entry as the engine wants it: its allowed IPs are its
/// overlay addresses and the prefixes behind it that the mesh accepted, so
/// cryptokey routing sends their traffic to it and takes them as sources
/// from it alone (WireGuard paper §2).
fn mesh_peer(entry: &NodeEntry, mesh: Option<&MeshInfo>) -> MeshPeer {
    let routes = accepted_routes(entry, mesh);
    let allowed_ips = [
        IpNet::from(IpAddr::V4(entry.ipv4)),
        IpNet::from(IpAddr::V6(entry.ipv6)),
    ]
    .into_iter()
    .chain(routes.iter().copied())
    .collect();
    MeshPeer {
        spec: PeerSpec {
            public_key: entry.public_key,
            endpoint: choose_endpoint(&entry.candidates),
            allowed_ips,
            persistent_keepalive: Some(MESH_KEEPALIVE),
        },
        name: entry.name.clone(),
        overlay_ips: vec![IpAddr::V4(entry.ipv4), IpAddr::V6(entry.ipv6)],
        routes,
        nat: entry.nat,
        candidates: entry
            .candidates
            .iter()
            .map(|c| {
                let source = match c.kind {
                    CandidateKind::Advertised if c.mapped.is_some() => Source::Mapped,
                    CandidateKind::Advertised => Source::Advertised,
                    CandidateKind::Observed => Source::Observed,
                    CandidateKind::Local => Source::Local,
                };
                (c.addr, source)
            })
            .collect(),
    }
}

/// The prefixes the rendezvous accepted for a peer, as this node routes
/// them: host bits cleared, each once, at most [`MAX_ROUTES`]. The
/// rendezvous checked them; what could still hurt this host is skipped all
/// the same: a default route (it would pull the underlay into mesh0) and
/// one that overlaps the mesh's overlay prefixes (it would take other
/// peers' addresses).
fn accepted_routes(entry: &NodeEntry, mesh: Option<&MeshInfo>) -> Vec<IpNet> {
    let overlay: Vec<IpNet> = mesh
        .map(|m| vec![IpNet::V4(m.ipv4), IpNet::V6(m.ipv6)])
        .unwrap_or_default();
    let mut routes: Vec<IpNet> = Vec::new();
    for net in entry.routes.iter().map(IpNet::trunc) {
        let overlaps_mesh = overlay.iter().any(|o| o.contains(&net) || net.contains(o));
        if net.prefix_len() == 0 || overlaps_mesh {
            tracing::debug!(peer = %entry.public_key.short(), prefix = %net, "accepted route skipped: a default route or inside the mesh's overlay prefixes");
            continue;
        }
        if routes.len() == MAX_ROUTES {
            tracing::debug!(peer = %entry.public_key.short(), "more than {MAX_ROUTES} accepted routes; the rest skipped");
            break;
        }
        if !routes.contains(&net) {
            routes.push(net);
        }
    }
    routes
}

/// The endpoint to try first: a configured public address, else what the
/// rendezvous observed, else a local address.
fn choose_endpoint(candidates: &[Candidate]) -> Option<SocketAddr> {
    [
        CandidateKind::Advertised,
        CandidateKind::Observed,
        CandidateKind::Local,
    ]
    .iter()
    .find_map(|kind| candidates.iter().find(|c| c.kind == *kind))
    .map(|c| c.addr)
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The agent's RNG seed, apart from the engine's (which gets `seed` as it
/// did before the agent existed, so that simulated scenarios keep their
/// probe ids).
fn agent_seed(seed: [u8; 32]) -> [u8; 32] {
    use blake2::{Blake2s256, Digest};
    let mut hasher = Blake2s256::new();
    hasher.update(b"meshd agent rng");
    hasher.update(seed);
    hasher.finalize().into()
}
