//! [`Sim`]: N node agents on one [`SimNet`], with the real rendezvous
//! registry and relay table, driven by one [`SimClock`].
//!
//! No I/O. This is quinn-proto's test `Pair` grown to a mesh: the harness
//! owns each node's [`Agent`] (and through it the engine [`Node`]), feeds
//! each the datagrams the network delivers to it, calls `handle_timeout`
//! when an agent's `poll_timeout` deadline comes, and after every input
//! drains the agent's outputs as the driver does: transmits into the
//! network, TUN writes into a per-node inbox, events into a per-node log,
//! relay frames into the relay table, messages into the registry, API
//! answers and host changes into per-node lists, handing every buffer back
//! as a real driver would.
//!
//! Stepping is event-driven: the clock jumps straight to the next datagram
//! arrival or node deadline, so minutes of simulated time cost only the
//! work done in them. Everything random (keys, loss, jitter, the test's
//! own choices via [`Sim::rng`]) comes from the seed, and the [`Sim::trace`]
//! of deliveries and events is the same for the same seed.
//!
//! Besides nodes, a simulation can hold *sinks*: bare addresses that only
//! collect what is sent to them, such as an attacker waiting for cookie
//! replies.
//!
//! The rendezvous is the real [`Registry`] and the real [`RelayTable`]
//! behind a host at [`RENDEZVOUS_ADDR`], with the quinn shell's part played
//! by the harness: a node's session is a [`ConnId`] whose hello carries its
//! local address, while the registry learns the address the last NAT on the
//! way maps it to ([`Sim::observed_addr`]); the registry's commands are
//! executed as `rendezvous::server` executes them (messages to the
//! connections they name, closes, persists kept as the state a restart
//! starts from), and relay frames go through the table. What the
//! rendezvous sends reaches a node after [`RelayConfig::latency`]; relayed
//! frames are lost with [`RelayConfig::loss`]. Nodes made with
//! [`Sim::add_node`] are registered before the simulation starts, with the
//! overlay address the test chose; [`Sim::join_node`] joins with a token
//! and gets its address from the registry. The NAT-check port is not
//! simulated: NAT checks are counted and dropped.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipnet::IpNet;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::clock::SimClock;
use super::nat::NatId;
use super::net::{Datagram, Delivery, HostId, LinkConfig, SimNet};
use super::packet::{udp_probe, Inner};
use crate::agent::{Agent, AgentConfig, HostChange, RequestId, ShellStats, Update};
use crate::control::{Request, Response};
use crate::engine::{EngineError, Event, Node, NodeConfig, PeerId, PeerSpec};
use crate::identity::{PrivateKey, PublicKey};
use crate::relay::table::{self as relay_table, RelayLimits, RelayTable};
use crate::rendezvous::admission;
use crate::rendezvous::registry::{
    dns_label, Command, ConnId, IncomingHello, NodeRecord, Now, Registry, RegistryState,
};
use crate::rendezvous::store::LocalStore;
use crate::wire::control::{
    Candidate, CandidateKind, Hello, MeshInfo, NatMapping, NodeMessage, RejectReason,
    ServerMessage, FEATURE_PATHS, PROTOCOL_VERSION,
};
use crate::wire::relay::{self, NodeId as RelayId, RelayKind};

/// The inner MTU nodes get (DESIGN.md: `mesh0` defaults to 1380).
pub const NODE_MTU: u16 = 1380;

/// RNG streams derived from the one seed, so that e.g. drawing one more
/// key never changes which datagrams the network loses.
const STREAM_NET: u64 = 0;
const STREAM_KEYS: u64 = 1;
const STREAM_TEST: u64 = 2;
const STREAM_RELAY: u64 = 3;
/// Each node's own seed (probe ids), apart from the keys so that adding it
/// changed no scenario's keys.
const STREAM_NODES: u64 = 4;
/// The rendezvous's own key (its admission proofs are made for it).
const STREAM_SERVER: u64 = 5;
/// The simulated wall clock's Unix time at the start of every run.
const SIM_EPOCH: Duration = Duration::from_secs(1_764_864_000);

/// Where the simulated rendezvous listens: nodes register here so that
/// their NATs map them, and what it sees of a node is the node's observed
/// address. Benchmarking space (RFC 2544), so it meets no test's hosts.
pub const RENDEZVOUS_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 443));

/// What a node sends the rendezvous to register. Not WireGuard, not a probe.
const REGISTER: &[u8] = b"meshd-sim register";

/// How the simulated relay (and the punch requests it passes on) behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelayConfig {
    /// From a node's `poll_relay` (or `PunchWanted`) to the other node.
    pub latency: Duration,
    /// Fraction of relayed datagrams lost (punch requests travel on the
    /// node's reliable rendezvous stream and are never lost).
    pub loss: f64,
}

impl Default for RelayConfig {
    /// Two hops to a nearby region: 40 ms, nothing lost.
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(40),
            loss: 0.0,
        }
    }
}

impl RelayConfig {
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    pub fn loss(mut self, probability: f64) -> Self {
        assert!(
            (0.0..=1.0).contains(&probability),
            "loss is a probability, got {probability}"
        );
        self.loss = probability;
        self
    }
}

/// Something the rendezvous carries to a node.
#[derive(Debug)]
enum Carried {
    /// A relay frame the table forwarded to connection `to`, from node `from`.
    Frame {
        from: usize,
        to: ConnId,
        frame: Bytes,
    },
    /// A message on connection `conn`'s control stream.
    Message {
        conn: ConnId,
        msg: Box<ServerMessage>,
    },
    /// The rendezvous closed connection `conn`.
    Close { conn: ConnId },
}

/// The mesh the simulated rendezvous hands out addresses from.
fn sim_mesh() -> MeshInfo {
    MeshInfo {
        id: "sim".into(),
        ipv4: "100.64.0.0/10".parse().expect("a prefix"),
        ipv6: "fd00:5a::/48".parse().expect("a prefix"),
    }
}

/// A node in a [`Sim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(usize);

/// A sink in a [`Sim`]: an address that only collects datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SinkId(usize);

/// One line of a simulation's history, in simulated time since the start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceEntry {
    /// A datagram reached a node or sink.
    Delivered {
        at: Duration,
        src: SocketAddr,
        dst: SocketAddr,
        len: usize,
    },
    /// A node emitted an event.
    Event {
        at: Duration,
        node: NodeId,
        event: Event,
    },
    /// The relay handed a datagram from `from` to `to`.
    Relayed {
        at: Duration,
        from: NodeId,
        to: NodeId,
        len: usize,
    },
    /// `to` was asked, through the rendezvous, to punch towards `from`.
    Punched {
        at: Duration,
        from: NodeId,
        to: NodeId,
    },
}

/// [`Sim::run_until`] ran out of time before its condition held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedOut {
    pub seed: u64,
    /// How long it ran.
    pub waited: Duration,
    /// Simulated time since the start when it gave up.
    pub at: Duration,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "condition not met within {:?} of simulated time (at {:?}, seed {})",
            self.waited, self.at, self.seed
        )
    }
}

impl std::error::Error for TimedOut {}

struct SimNode {
    name: String,
    private_key: PrivateKey,
    agent: Agent,
    host: HostId,
    /// The overlay address probes use: chosen by the test, or (for a node
    /// that joined) assigned by the registry; unspecified until then.
    overlay: IpAddr,
    /// The node's session with the rendezvous, while it has one.
    conn: Option<ConnId>,
    /// Every packet the node wrote to its TUN, oldest first.
    tun: Vec<Vec<u8>>,
    events: Vec<Event>,
    /// Every change the agent asked of the host, oldest first.
    host_changes: Vec<HostChange>,
    /// Answers to local API requests not taken yet.
    answers: Vec<(RequestId, Response)>,
    /// Why the rendezvous last refused the node, if it did.
    rejected: Option<RejectReason>,
}

/// What a network host is in this simulation.
#[derive(Debug, Clone, Copy)]
enum Attached {
    Node(usize),
    Sink(usize),
    /// The rendezvous: registrations end here.
    Rendezvous,
}

/// N nodes, a network and a clock. See the module docs.
pub struct Sim {
    seed: u64,
    clock: SimClock,
    net: SimNet,
    keys: ChaCha20Rng,
    node_rng: ChaCha20Rng,
    test_rng: ChaCha20Rng,
    nodes: Vec<SimNode>,
    sinks: Vec<Vec<Datagram>>,
    /// By `HostId` index.
    attached: Vec<Attached>,
    trace: Vec<TraceEntry>,
    relay: RelayConfig,
    relay_rng: ChaCha20Rng,
    /// What the rendezvous is carrying, by arrival time then send order.
    in_relay: BTreeMap<(Instant, u64), Carried>,
    relay_seq: u64,
    /// Relayed datagrams lost, refused by the relay table or by an agent.
    relay_dropped: u64,
    rendezvous: Option<HostId>,
    /// The registry, from the first session on; until then the nodes
    /// registered before the start, in `registry_seed`.
    registry: Option<Registry>,
    registry_seed: RegistryState,
    /// What the registry last asked to persist: a restart starts from it.
    saved: Option<RegistryState>,
    /// The registry's store, as a single `mesh-rendezvous` keeps it.
    local: Option<LocalStore>,
    relay_table: RelayTable,
    /// The rendezvous's key: the same across restarts, as on disk.
    server_key: PrivateKey,
    /// Which node each connection is (or was) from.
    conns: HashMap<ConnId, usize>,
    next_conn: u64,
    next_request: u64,
    /// NAT checks the agents sent (the NAT-check port is not simulated).
    nat_checks: u64,
}

impl fmt::Debug for Sim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sim")
            .field("seed", &self.seed)
            .field("elapsed", &self.clock.elapsed())
            .field(
                "nodes",
                &self.nodes.iter().map(|n| &n.name).collect::<Vec<_>>(),
            )
            .field("net", &self.net.stats())
            .finish_non_exhaustive()
    }
}

impl Sim {
    /// An empty simulation whose links are all [`LinkConfig::default`].
    pub fn new(seed: u64) -> Self {
        Self::with_link(seed, LinkConfig::default())
    }

    /// An empty simulation whose links all behave as `link` by default.
    pub fn with_link(seed: u64, link: LinkConfig) -> Self {
        let stream = |n| {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            rng.set_stream(n);
            rng
        };
        let mut net_rng = stream(STREAM_NET);
        let net = SimNet::new(rand::RngCore::next_u64(&mut net_rng), link);
        Self {
            seed,
            clock: SimClock::new(),
            net,
            keys: stream(STREAM_KEYS),
            node_rng: stream(STREAM_NODES),
            test_rng: stream(STREAM_TEST),
            nodes: Vec::new(),
            sinks: Vec::new(),
            attached: Vec::new(),
            trace: Vec::new(),
            relay: RelayConfig::default(),
            relay_rng: stream(STREAM_RELAY),
            in_relay: BTreeMap::new(),
            relay_seq: 0,
            relay_dropped: 0,
            rendezvous: None,
            registry: None,
            registry_seed: RegistryState::new(sim_mesh()),
            saved: None,
            local: None,
            relay_table: RelayTable::new(RelayLimits::default()),
            server_key: PrivateKey::generate(&mut stream(STREAM_SERVER)),
            conns: HashMap::new(),
            next_conn: 1,
            next_request: 0,
            nat_checks: 0,
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        self.clock.elapsed()
    }

    pub fn net(&self) -> &SimNet {
        &self.net
    }

    /// The network's knobs: links, rebinding, capture.
    pub fn net_mut(&mut self) -> &mut SimNet {
        &mut self.net
    }

    /// A seeded RNG for the test's own random choices (garbage bytes,
    /// attacker keys).
    pub fn rng(&mut self) -> &mut ChaCha20Rng {
        &mut self.test_rng
    }

    /// A seeded private key, e.g. for an attacker built outside the sim.
    pub fn generate_key(&mut self) -> PrivateKey {
        PrivateKey::generate(&mut self.keys)
    }

    /// Everything delivered and every event so far.
    pub fn trace(&self) -> &[TraceEntry] {
        &self.trace
    }

    // --- building the topology -------------------------------------------

    /// A node with a fresh seeded key, overlay address `overlay` and its
    /// UDP socket at `underlay`.
    pub fn add_node(&mut self, name: &str, overlay: IpAddr, underlay: SocketAddr) -> NodeId {
        let host = self.net.add_host(underlay);
        self.add_node_on(name, overlay, host)
    }

    /// Like [`Sim::add_node`], but the node's socket is at the private
    /// address `underlay` behind `nat` (made with [`SimNet::add_nat`]).
    /// Its [`Sim::peer_spec`] then names that private address, which only
    /// hosts behind the same NAT can reach.
    pub fn add_node_behind(
        &mut self,
        nat: NatId,
        name: &str,
        overlay: IpAddr,
        underlay: SocketAddr,
    ) -> NodeId {
        let host = self.net.add_host_behind(nat, underlay);
        self.add_node_on(name, overlay, host)
    }

    fn add_node_on(&mut self, name: &str, overlay: IpAddr, host: HostId) -> NodeId {
        assert!(
            self.registry.is_none(),
            "add nodes before the first rendezvous session; later nodes join with Sim::join_node"
        );
        let private_key = self.generate_key();
        let agent = self.fresh_agent(name, &private_key, Some(overlay));
        let id = NodeId(self.nodes.len());
        // Registered before the start, with the address the test chose.
        let (ipv4, ipv6) = match overlay {
            IpAddr::V4(v4) => (
                v4,
                Ipv6Addr::new(0xfd00, 0x5a, 0, 0, 0, 0, 0, id.0 as u16 + 1),
            ),
            IpAddr::V6(v6) => (Ipv4Addr::from(0x6440_0000 + id.0 as u32 + 1), v6),
        };
        let unix = self.unix_now();
        self.registry_seed.nodes.insert(
            private_key.public_key(),
            NodeRecord {
                name: dns_label(name),
                ipv4,
                ipv6,
                joined_at: unix,
                last_seen: unix,
                candidates: Vec::new(),
                nat: NatMapping::Unknown,
                routes: Vec::new(),
                approved_routes: Vec::new(),
            },
        );
        self.attach(host, Attached::Node(id.0));
        self.push_node(name, private_key, agent, host, overlay);
        id
    }

    fn push_node(
        &mut self,
        name: &str,
        private_key: PrivateKey,
        agent: Agent,
        host: HostId,
        overlay: IpAddr,
    ) {
        self.nodes.push(SimNode {
            name: name.to_owned(),
            private_key,
            agent,
            host,
            overlay,
            conn: None,
            tun: Vec::new(),
            events: Vec::new(),
            host_changes: Vec::new(),
            answers: Vec::new(),
            rejected: None,
        });
    }

    /// A node as meshd starts one: its key, a fresh seed, the clock now.
    fn fresh_agent(
        &mut self,
        name: &str,
        private_key: &PrivateKey,
        overlay: Option<IpAddr>,
    ) -> Agent {
        let config = AgentConfig {
            node: NodeConfig {
                private_key: private_key.clone(),
                addresses: overlay.map(IpNet::from).into_iter().collect(),
                mtu: NODE_MTU,
            },
            static_peers: Vec::new(),
            name: Some(name.to_owned()),
            interface: "mesh0".into(),
            listen_port: 51820,
            underlay_ips: Vec::new(),
            rendezvous: true,
            routes: Vec::new(),
            advertise_endpoint: None,
        };
        // The simulated wall clock: the Unix time the run starts at is
        // arbitrary, only its progress matters (ping freshness).
        let seed = rand::Rng::gen(&mut self.node_rng);
        match Agent::new(config, seed, self.now(), SIM_EPOCH + self.elapsed()) {
            Ok(agent) => agent,
            // No static peers, so nothing to refuse.
            Err(e) => panic!("a fresh agent with no peers failed: {e}"),
        }
    }

    /// meshd restarts on `id`: same key, address and socket, but a new
    /// process that remembers nothing (no peers, sessions or probes; its
    /// events start afresh), and its rendezvous session is gone. Configure
    /// its peers again, as its peer-map cache and the rendezvous would.
    pub fn restart(&mut self, id: NodeId) {
        let now = self.now();
        if let Some(conn) = self.nodes[id.0].conn.take() {
            self.connection_lost(conn, now);
        }
        let (name, key, overlay) = (
            self.nodes[id.0].name.clone(),
            self.nodes[id.0].private_key.clone(),
            self.nodes[id.0].overlay,
        );
        let overlay = (!overlay.is_unspecified()).then_some(overlay);
        self.nodes[id.0].agent = self.fresh_agent(&name, &key, overlay);
        self.nodes[id.0].events.clear();
    }

    /// An address that collects what is sent to it.
    pub fn add_sink(&mut self, addr: SocketAddr) -> SinkId {
        let host = self.net.add_host(addr);
        let id = SinkId(self.sinks.len());
        self.attach(host, Attached::Sink(id.0));
        self.sinks.push(Vec::new());
        id
    }

    fn attach(&mut self, host: HostId, what: Attached) {
        debug_assert_eq!(host.index(), self.attached.len());
        self.attached.push(what);
    }

    /// How `of` should be configured as a peer: its key, its address as the
    /// network sees it now, its overlay address as the only allowed IP.
    pub fn peer_spec(&self, of: NodeId) -> PeerSpec {
        PeerSpec {
            public_key: self.public_key(of),
            endpoint: Some(self.addr(of)),
            allowed_ips: vec![IpNet::from(self.overlay(of))],
            persistent_keepalive: None,
        }
    }

    /// Configures `spec` as a peer of `node`, as its config file would (a
    /// peer map never removes it).
    pub fn add_peer(&mut self, node: NodeId, spec: PeerSpec) -> Result<PeerId, EngineError> {
        let now = self.now();
        let result = self.nodes[node.0].agent.add_static_peer(spec, now);
        self.drain(node.0);
        result
    }

    /// Makes `a` and `b` peers of each other with [`Sim::peer_spec`].
    ///
    /// # Panics
    ///
    /// When the engine refuses either peer (a mistake in the test).
    pub fn connect(&mut self, a: NodeId, b: NodeId) {
        for (node, peer) in [(a, b), (b, a)] {
            let spec = self.peer_spec(peer);
            if let Err(e) = self.add_peer(node, spec) {
                panic!(
                    "{} refused {} as a peer: {e}",
                    self.name(node),
                    self.name(peer)
                );
            }
        }
    }

    /// Makes every node a peer of every other.
    pub fn connect_all(&mut self) {
        let ids: Vec<NodeId> = self.node_ids().collect();
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                self.connect(*a, *b);
            }
        }
    }

    // --- looking at nodes ------------------------------------------------

    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> {
        (0..self.nodes.len()).map(NodeId)
    }

    pub fn node(&self, id: NodeId) -> &Node {
        self.nodes[id.0].agent.node()
    }

    /// `id`'s node agent.
    pub fn agent(&self, id: NodeId) -> &Agent {
        &self.nodes[id.0].agent
    }

    pub fn name(&self, id: NodeId) -> &str {
        &self.nodes[id.0].name
    }

    pub fn public_key(&self, id: NodeId) -> PublicKey {
        self.nodes[id.0].agent.node().public_key()
    }

    pub fn overlay(&self, id: NodeId) -> IpAddr {
        self.nodes[id.0].overlay
    }

    /// The address `id`'s socket has now (behind a NAT, its private one).
    pub fn addr(&self, id: NodeId) -> SocketAddr {
        self.net.addr(self.nodes[id.0].host)
    }

    pub fn host(&self, id: NodeId) -> HostId {
        self.nodes[id.0].host
    }

    /// The endpoint `node` currently has for `peer`.
    pub fn endpoint_of(&self, node: NodeId, peer: NodeId) -> Option<SocketAddr> {
        self.node(node)
            .peer_status(&self.public_key(peer))?
            .endpoint
    }

    /// Every packet `id` wrote to its TUN so far.
    pub fn tun(&self, id: NodeId) -> &[Vec<u8>] {
        &self.nodes[id.0].tun
    }

    /// Takes the packets `id` wrote to its TUN so far.
    pub fn take_tun(&mut self, id: NodeId) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.nodes[id.0].tun)
    }

    /// Sequence numbers of the probes `to` received from `from`'s overlay
    /// address, in arrival order.
    pub fn probes_received(&self, to: NodeId, from: NodeId) -> Vec<u64> {
        let src = self.overlay(from);
        self.tun(to)
            .iter()
            .filter_map(|p| Inner::parse(p))
            .filter(|inner| inner.src == src)
            .filter_map(|inner| inner.probe_seq())
            .collect()
    }

    /// Every event `id` emitted so far, oldest first.
    pub fn events(&self, id: NodeId) -> &[Event] {
        &self.nodes[id.0].events
    }

    /// How many handshakes with `peer` completed at `node`.
    pub fn handshakes_completed(&self, node: NodeId, peer: NodeId) -> usize {
        let key = self.public_key(peer);
        self.events(node)
            .iter()
            .filter(|e| matches!(e, Event::HandshakeCompleted { peer } if *peer == key))
            .count()
    }

    /// What sink `id` collected so far.
    pub fn sink(&self, id: SinkId) -> &[Datagram] {
        &self.sinks[id.0]
    }

    // --- inputs ----------------------------------------------------------

    /// `packet` is written to `id`'s TUN now.
    pub fn send_tun(&mut self, id: NodeId, packet: &[u8]) {
        let now = self.now();
        self.nodes[id.0]
            .agent
            .node_mut()
            .handle_tun_packet(packet, now);
        self.drain(id.0);
    }

    /// A probe numbered `seq` from `from`'s overlay address to `to`'s,
    /// written to `from`'s TUN now.
    pub fn send_probe(&mut self, from: NodeId, to: NodeId, seq: u64) {
        let packet = udp_probe(self.overlay(from), self.overlay(to), seq);
        self.send_tun(from, &packet);
    }

    /// Calls `f` on `id`'s engine with the current time, then collects its
    /// outputs: for engine calls the harness has no shortcut for.
    pub fn with_node<R>(&mut self, id: NodeId, f: impl FnOnce(&mut Node, Instant) -> R) -> R {
        let now = self.now();
        let r = f(self.nodes[id.0].agent.node_mut(), now);
        self.drain(id.0);
        r
    }

    /// A datagram from any source address, sent now.
    pub fn inject(&mut self, src: SocketAddr, dst: SocketAddr, payload: &[u8]) {
        let now = self.now();
        self.net.inject(src, dst, payload, now);
    }

    /// The link between nodes `a` and `b`, both directions.
    pub fn set_link_between(&mut self, a: NodeId, b: NodeId, link: LinkConfig) {
        let (a, b) = (self.host(a), self.host(b));
        self.net.set_links_between(a, b, link);
    }

    /// How the relay behaves from now on (what is in flight keeps its
    /// arrival time).
    pub fn set_relay(&mut self, relay: RelayConfig) {
        self.relay = relay;
    }

    /// Relayed datagrams lost on the way, refused by the relay table, or
    /// from a relay id the receiving agent does not know, so far.
    pub fn relay_dropped(&self) -> u64 {
        self.relay_dropped
    }

    /// What the rendezvous sees of `id` now: `id` registers (sends it a
    /// datagram, so that every NAT on the way maps it) and the address
    /// that datagram leaves the last NAT with is returned.
    pub fn observed_addr(&mut self, id: NodeId) -> SocketAddr {
        if self.rendezvous.is_none() {
            let host = self.net.add_host(RENDEZVOUS_ADDR);
            self.attach(host, Attached::Rendezvous);
            self.rendezvous = Some(host);
        }
        let now = self.now();
        let host = self.host(id);
        self.net.send(host, RENDEZVOUS_ADDR, REGISTER, now);
        match self.net.apparent_addr(host, RENDEZVOUS_ADDR, now) {
            Some(addr) => addr,
            // A NAT that refuses to map it (e.g. a 1:1 NAT's other hosts):
            // the rendezvous would see nothing; the private address is
            // the best it could announce.
            None => self.addr(id),
        }
    }

    /// Both nodes open a session with the rendezvous now, if they have
    /// none: the registry welcomes each (at once, without the control
    /// stream's latency) with the peer map of every registered node and
    /// tells the others, and the relay is up for both. Each then knows the
    /// other's candidates: its observed address ([`Sim::observed_addr`])
    /// and its own (local) address.
    pub fn introduce(&mut self, a: NodeId, b: NodeId) {
        for id in [a, b] {
            if self.nodes[id.0].conn.is_none() {
                self.open_session(id, None, true);
            }
        }
    }

    /// NAT rebinding: `id` appears at `new_addr` from now on.
    pub fn rebind(&mut self, id: NodeId, new_addr: SocketAddr) {
        let host = self.nodes[id.0].host;
        self.net.rebind(host, new_addr);
    }

    // --- running ---------------------------------------------------------

    /// Runs until simulated time `deadline`, handling everything due up to
    /// and including it.
    pub fn run_until_instant(&mut self, deadline: Instant) {
        loop {
            self.process_due();
            match self.next_wakeup() {
                Some(t) if t <= deadline => self.clock.advance_to(t),
                _ => {
                    self.clock.advance_to(deadline);
                    self.process_due();
                    return;
                }
            }
        }
    }

    /// Runs for `duration` of simulated time.
    pub fn run_for(&mut self, duration: Duration) {
        let deadline = self.now() + duration;
        self.run_until_instant(deadline);
    }

    /// Runs until `done` holds, checked after each instant's work, for at
    /// most `within` of simulated time. Returns how long it took.
    pub fn run_until(
        &mut self,
        mut done: impl FnMut(&Sim) -> bool,
        within: Duration,
    ) -> Result<Duration, TimedOut> {
        let start = self.now();
        let deadline = start + within;
        loop {
            self.process_due();
            if done(self) {
                return Ok(self.now() - start);
            }
            match self.next_wakeup() {
                Some(t) if t <= deadline => self.clock.advance_to(t),
                _ => {
                    self.clock.advance_to(deadline);
                    self.process_due();
                    if done(self) {
                        return Ok(within);
                    }
                    return Err(TimedOut {
                        seed: self.seed,
                        waited: within,
                        at: self.elapsed(),
                    });
                }
            }
        }
    }

    /// The earliest datagram arrival (network or relay) or node deadline.
    fn next_wakeup(&self) -> Option<Instant> {
        let timers = self.nodes.iter().map(|n| n.agent.poll_timeout().0);
        let relay = self.in_relay.keys().next().map(|(at, _)| *at);
        timers.chain(self.net.next_delivery()).chain(relay).min()
    }

    /// Delivers every datagram and fires every timer due now, including
    /// those that the work itself makes due now (zero-latency links).
    fn process_due(&mut self) {
        let now = self.now();
        loop {
            let mut progressed = false;
            while let Some(delivery) = self.net.pop_due(now) {
                self.deliver(delivery, now);
                progressed = true;
            }
            while let Some(entry) = self.in_relay.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let carried = entry.remove();
                self.deliver_carried(carried, now);
                progressed = true;
            }
            for i in 0..self.nodes.len() {
                if self.nodes[i].agent.poll_timeout().0 <= now {
                    self.nodes[i].agent.handle_timeout(now);
                    let (next, reason) = self.nodes[i].agent.poll_timeout();
                    assert!(
                        next > now,
                        "{} still wants a timeout at {:?} ({reason:?}) after handle_timeout at {:?}",
                        self.nodes[i].name,
                        self.clock.since_origin(next),
                        self.clock.elapsed(),
                    );
                    self.drain(i);
                    progressed = true;
                }
            }
            if !progressed {
                return;
            }
        }
    }

    fn deliver(&mut self, delivery: Delivery, now: Instant) {
        let Delivery { to, datagram } = delivery;
        self.trace.push(TraceEntry::Delivered {
            at: self.clock.elapsed(),
            src: datagram.src,
            dst: datagram.dst,
            len: datagram.payload.len(),
        });
        match self.attached[to.index()] {
            Attached::Node(i) => {
                self.nodes[i].agent.node_mut().handle_datagram(
                    datagram.src,
                    &datagram.payload,
                    now,
                );
                self.drain(i);
            }
            Attached::Sink(i) => self.sinks[i].push(datagram),
            Attached::Rendezvous => {}
        }
    }

    fn deliver_carried(&mut self, carried: Carried, now: Instant) {
        match carried {
            Carried::Frame { from, to, frame } => {
                let Some(i) = self.node_on(to) else {
                    self.relay_dropped += 1;
                    return;
                };
                self.trace.push(TraceEntry::Relayed {
                    at: self.clock.elapsed(),
                    from: NodeId(from),
                    to: NodeId(i),
                    len: frame.len().saturating_sub(relay::HEADER_LEN),
                });
                let agent = &mut self.nodes[i].agent;
                let before = agent.relay_dropped();
                agent.handle_relay_frame(&frame, now);
                self.relay_dropped += agent.relay_dropped() - before;
                self.drain(i);
            }
            Carried::Message { conn, msg } => self.deliver_message(conn, *msg, now),
            Carried::Close { conn } => self.session_closed(conn, now),
        }
    }

    /// The node whose current session is `conn`.
    fn node_on(&self, conn: ConnId) -> Option<usize> {
        let i = *self.conns.get(&conn)?;
        (self.nodes[i].conn == Some(conn)).then_some(i)
    }

    fn node_with_key(&self, key: &PublicKey) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.agent.node().public_key() == *key)
    }

    /// Hands `carried` to the rendezvous, to arrive after the relay latency.
    fn carry(&mut self, carried: Carried, now: Instant) {
        self.relay_seq += 1;
        self.in_relay
            .insert((now + self.relay.latency, self.relay_seq), carried);
    }

    /// Collects every output of node `i`, as a driver does after each input.
    fn drain(&mut self, i: usize) {
        let now = self.now();
        let at = self.clock.elapsed();
        let mut relayed = Vec::new();
        let mut messages = Vec::new();
        let SimNode {
            agent,
            host,
            tun,
            events,
            host_changes,
            answers,
            overlay,
            ..
        } = &mut self.nodes[i];
        agent.handle_engine_events(now);
        let node = agent.node_mut();
        while let Some(transmit) = node.poll_transmit() {
            self.net
                .send(*host, transmit.dst, transmit.payload.as_slice(), now);
            node.recycle(transmit.payload);
        }
        while let Some(packet) = node.poll_tun() {
            tun.push(packet.as_slice().to_vec());
            node.recycle(packet);
        }
        let dropped_before = agent.relay_dropped();
        while let Some(transmit) = agent.poll_relay() {
            let mut header = [0u8; relay::HEADER_LEN];
            relay::encode_header(RelayKind::Packet, transmit.to, &mut header);
            let mut frame = Vec::with_capacity(relay::HEADER_LEN + transmit.payload.len());
            frame.extend_from_slice(&header);
            frame.extend_from_slice(transmit.payload.as_slice());
            relayed.push(Bytes::from(frame));
            agent.recycle(transmit.payload);
        }
        self.relay_dropped += agent.relay_dropped() - dropped_before;
        while let Some(event) = agent.poll_event() {
            self.trace.push(TraceEntry::Event {
                at,
                node: NodeId(i),
                event: event.clone(),
            });
            events.push(event);
        }
        while agent.poll_nat_check().is_some() {
            self.nat_checks += 1;
        }
        while let Some(message) = agent.poll_rendezvous_message() {
            messages.push(message);
        }
        while let Some(change) = agent.poll_host_change() {
            if let HostChange::Addresses(addresses) = &change {
                if overlay.is_unspecified() {
                    if let Some(v4) = addresses.iter().find(|a| a.addr().is_ipv4()) {
                        *overlay = v4.addr();
                    }
                }
            }
            host_changes.push(change);
        }
        while let Some(answer) = agent.poll_api_answer() {
            answers.push(answer);
        }
        let conn = self.nodes[i].conn;
        for frame in relayed {
            let lost = self.relay.loss > 0.0 && self.relay_rng.gen_bool(self.relay.loss);
            let Some(conn) = conn.filter(|_| !lost) else {
                self.relay_dropped += 1;
                continue;
            };
            match self.relay_table.handle_frame(conn, frame, now) {
                relay_table::Command::Forward { to, frame } => {
                    self.carry(Carried::Frame { from: i, to, frame }, now);
                }
                relay_table::Command::Drop { .. } => self.relay_dropped += 1,
            }
        }
        if let (Some(conn), false) = (conn, messages.is_empty()) {
            let now = self.registry_now();
            if let Some(registry) = self.registry.as_mut() {
                for message in messages {
                    match message {
                        NodeMessage::Punch { peer } => registry.handle_punch(conn, &peer, now),
                        NodeMessage::Nat { mapping } => registry.handle_nat(conn, mapping, now),
                        NodeMessage::Candidates { candidates } => {
                            registry.handle_candidates(conn, candidates, now)
                        }
                        NodeMessage::Paths { peers } => registry.handle_paths(conn, peers, now),
                    }
                }
            }
            self.run_registry(false);
        }
    }

    // --- the rendezvous --------------------------------------------------------

    fn unix_now(&self) -> u64 {
        (SIM_EPOCH + self.elapsed()).as_secs()
    }

    fn registry_now(&self) -> Now {
        Now {
            unix: self.unix_now(),
            instant: self.now(),
        }
    }

    /// The registry, made from the nodes registered so far at its first use.
    fn registry_mut(&mut self) -> &mut Registry {
        if self.registry.is_none() {
            let state = self.registry_seed.clone();
            self.start_registry(state);
        }
        match self.registry.as_mut() {
            Some(registry) => registry,
            None => unreachable!("started above"),
        }
    }

    /// A registry from `state`, and a relay table that knows its nodes, as
    /// `mesh-rendezvous` starts.
    fn start_registry(&mut self, state: RegistryState) {
        let mut table = RelayTable::new(RelayLimits::default());
        for record in state.nodes.values() {
            if let Some(id) = RelayId::of_overlay(record.ipv4) {
                table.register(id);
            }
        }
        self.relay_table = table;
        self.local = Some(LocalStore::new(&state));
        self.registry = Some(Registry::new(state, self.server_key.clone()));
        self.run_registry(true);
    }

    /// A message from the registry to the node on `conn`: now, or after
    /// the latency.
    fn send_to_node(&mut self, conn: ConnId, msg: ServerMessage, immediate: bool, now: Instant) {
        if immediate {
            self.deliver_message(conn, msg, now);
        } else {
            self.carry(
                Carried::Message {
                    conn,
                    msg: Box::new(msg),
                },
                now,
            );
        }
    }

    /// Executes the registry's commands as the quinn shell does. With
    /// `immediate`, messages reach their nodes now, else after the latency.
    fn run_registry(&mut self, immediate: bool) {
        let now = self.now();
        loop {
            let Some(command) = self.registry.as_mut().and_then(|registry| {
                registry.poll_command().or_else(|| {
                    // The quinn shell flushes peer-map changes a short
                    // tick later; here the tick is this turn's end.
                    registry.flush_deltas();
                    registry.poll_command()
                })
            }) else {
                return;
            };
            match command {
                Command::PeerDeltas { members, deltas } => {
                    for member in members {
                        for delta in deltas.iter().filter(|d| member.wants(d)) {
                            self.send_to_node(member.conn, delta.msg.clone(), immediate, now);
                        }
                    }
                }
                Command::Admitted { conn, ipv4, .. } => {
                    // As the quinn shell does: the node relays from now on.
                    if let Some(id) = RelayId::of_overlay(ipv4) {
                        self.relay_table.connect(id, conn);
                    }
                }
                Command::Send { conn, msg } => self.send_to_node(conn, msg, immediate, now),
                Command::Close { conn, .. } => {
                    let registry_now = self.registry_now();
                    if let Some(registry) = self.registry.as_mut() {
                        registry.handle_disconnect(conn, registry_now);
                    }
                    self.relay_table.disconnect(conn);
                    if immediate {
                        self.session_closed(conn, now);
                    } else {
                        self.carry(Carried::Close { conn }, now);
                    }
                }
                Command::Commit { id, txn } => {
                    let (Some(local), Some(registry)) =
                        (self.local.as_mut(), self.registry.as_mut())
                    else {
                        continue;
                    };
                    let (outcome, fresh) = local.commit(&txn);
                    registry.handle_outcome(id, outcome, &fresh);
                    self.saved = Some(registry.state().clone());
                }
                // One server: no node is on another.
                Command::Route { .. } => {}
                // Saved at once here: the simulation has no debounce.
                Command::PersistSoon => {
                    if let Some(registry) = self.registry.as_mut() {
                        registry.flush();
                    }
                }
            }
        }
    }

    /// A message from the rendezvous reaches the node on `conn`.
    fn deliver_message(&mut self, conn: ConnId, msg: ServerMessage, now: Instant) {
        let Some(i) = self.node_on(conn) else {
            return;
        };
        let update = match msg {
            ServerMessage::Welcome {
                node,
                mesh,
                observed,
                peers,
                routes,
                features,
                port_taken,
                ..
            } => {
                let agent = &mut self.nodes[i].agent;
                // As the driver does: the relay is up before the peer map
                // arrives, so no peer is guessed direct for a moment.
                agent.handle_session_up(RENDEZVOUS_ADDR, None, now);
                agent.handle_update(
                    Update::Welcome {
                        node,
                        mesh,
                        observed,
                        peers: peers.into_entries(),
                        routes,
                        paths: features.iter().any(|f| f == FEATURE_PATHS),
                        port_taken: port_taken.map(|taken| *taken),
                    },
                    now,
                );
                self.drain(i);
                return;
            }
            ServerMessage::Rejected { reason, .. } => {
                self.nodes[i].rejected = Some(reason);
                return;
            }
            ServerMessage::PeerUpsert { peer } => Update::Upsert(peer),
            ServerMessage::PeerRemove { public_key } => Update::Remove(public_key),
            ServerMessage::Routes { routes } => Update::Routes(routes),
            ServerMessage::Punch { peer } => {
                if let Some(from) = self.node_with_key(&peer) {
                    self.trace.push(TraceEntry::Punched {
                        at: self.clock.elapsed(),
                        from: NodeId(from),
                        to: NodeId(i),
                    });
                }
                Update::Punch(peer)
            }
        };
        self.nodes[i].agent.handle_update(update, now);
        self.drain(i);
    }

    /// The node on `conn` learns that its session ended.
    fn session_closed(&mut self, conn: ConnId, now: Instant) {
        let Some(i) = self.node_on(conn) else {
            return;
        };
        self.nodes[i].conn = None;
        let agent = &mut self.nodes[i].agent;
        agent.handle_session_down(now);
        agent.handle_update(Update::Disconnected, now);
        self.drain(i);
    }

    /// Connection `conn` is gone from the rendezvous's side (the node
    /// restarted, or the network ate it).
    fn connection_lost(&mut self, conn: ConnId, _now: Instant) {
        let registry_now = self.registry_now();
        if let Some(registry) = self.registry.as_mut() {
            registry.handle_disconnect(conn, registry_now);
        }
        self.relay_table.disconnect(conn);
        self.run_registry(false);
    }

    /// `id` opens a session: a hello with its local address (and `token`),
    /// seen by the rendezvous at [`Sim::observed_addr`].
    fn open_session(&mut self, id: NodeId, token: Option<String>, immediate: bool) {
        let observed = self.observed_addr(id);
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        self.conns.insert(conn, id.0);
        self.nodes[id.0].conn = Some(conn);
        self.nodes[id.0].rejected = None;
        // Each connection's TLS exporter value differs; the node proves
        // its key for this one, as the client does.
        let mut exporter = [0u8; 32];
        exporter[..8].copy_from_slice(&conn.0.to_be_bytes());
        let proof = admission::proof(
            &self.nodes[id.0].private_key,
            &self.server_key.public_key(),
            &exporter,
        );
        let hello = Hello {
            version: PROTOCOL_VERSION,
            public_key: self.public_key(id),
            name: self.nodes[id.0].name.clone(),
            listen_port: self.addr(id).port(),
            token,
            candidates: vec![Candidate {
                addr: self.addr(id),
                kind: CandidateKind::Local,
                mapped: None,
            }],
            proof,
            routes: Vec::new(),
            peers_digest: None,
        };
        let incoming = IncomingHello {
            hello: Ok(hello),
            exporter,
            observed,
        };
        let now = self.registry_now();
        self.registry_mut().handle_hello(conn, incoming, now);
        self.run_registry(immediate);
    }

    /// A node that joins with `token` (from [`Sim::create_token`]): it
    /// starts with no overlay address and gets one from the registry's
    /// welcome, a control-stream latency later.
    pub fn join_node(&mut self, name: &str, underlay: SocketAddr, token: &str) -> NodeId {
        let host = self.net.add_host(underlay);
        self.join_node_on(name, host, token)
    }

    /// Like [`Sim::join_node`], behind `nat`.
    pub fn join_node_behind(
        &mut self,
        nat: NatId,
        name: &str,
        underlay: SocketAddr,
        token: &str,
    ) -> NodeId {
        let host = self.net.add_host_behind(nat, underlay);
        self.join_node_on(name, host, token)
    }

    fn join_node_on(&mut self, name: &str, host: HostId, token: &str) -> NodeId {
        let private_key = self.generate_key();
        let agent = self.fresh_agent(name, &private_key, None);
        let id = NodeId(self.nodes.len());
        self.attach(host, Attached::Node(id.0));
        self.push_node(
            name,
            private_key,
            agent,
            host,
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        );
        self.open_session(id, Some(token.to_owned()), false);
        id
    }

    /// A join token from the registry, as `mesh-rendezvous token create`
    /// makes one: valid for a day, any number of uses.
    pub fn create_token(&mut self, token_id: &str) -> String {
        let secret: [u8; 32] = self.test_rng.gen();
        let unix = self.unix_now();
        let token =
            self.registry_mut()
                .create_token(secret, token_id.to_owned(), 86_400, None, unix);
        self.run_registry(true);
        match token {
            Ok(token) => token.expose().to_owned(),
            Err(e) => panic!("the registry refused the token id {token_id:?}: {e}"),
        }
    }

    /// `id` opens a session with the rendezvous again (as its client does
    /// after a backoff); what the registry answers arrives after the latency.
    pub fn connect_rendezvous(&mut self, id: NodeId) {
        let now = self.now();
        if let Some(old) = self.nodes[id.0].conn.take() {
            self.connection_lost(old, now);
        }
        self.open_session(id, None, false);
    }

    /// `id`'s session with the rendezvous breaks: both sides notice now.
    pub fn disconnect_rendezvous(&mut self, id: NodeId) {
        let now = self.now();
        if let Some(conn) = self.nodes[id.0].conn {
            self.connection_lost(conn, now);
            self.session_closed(conn, now);
        }
    }

    /// An operator removes `id` from the mesh (`mesh-rendezvous nodes
    /// remove`): the registry refuses it from now on and tells the others.
    pub fn remove_node(&mut self, id: NodeId) -> bool {
        let key = self.public_key(id);
        let unix = self.unix_now();
        let relay_id = self
            .registry_mut()
            .state()
            .nodes
            .get(&key)
            .and_then(|r| RelayId::of_overlay(r.ipv4));
        let removed = self.registry_mut().remove_node(&key, false, unix);
        if let Some(relay_id) = relay_id.filter(|_| removed) {
            self.relay_table.remove(relay_id);
        }
        self.run_registry(false);
        removed
    }

    /// mesh-rendezvous restarts: every session ends at once, and the
    /// registry and relay table start again from the state it last
    /// persisted. Nodes reconnect with [`Sim::connect_rendezvous`].
    pub fn restart_rendezvous(&mut self) {
        let now = self.now();
        let conns: Vec<ConnId> = self.nodes.iter().filter_map(|n| n.conn).collect();
        for conn in conns {
            self.session_closed(conn, now);
        }
        let state = self
            .saved
            .clone()
            .or_else(|| self.registry.as_ref().map(|r| r.state().clone()))
            .unwrap_or_else(|| self.registry_seed.clone());
        self.start_registry(state);
    }

    /// The registry, once a session has started it.
    pub fn registry(&self) -> Option<&Registry> {
        self.registry.as_ref()
    }

    pub fn relay_table(&self) -> &RelayTable {
        &self.relay_table
    }

    /// Whether `id` has a session with the rendezvous now.
    pub fn has_session(&self, id: NodeId) -> bool {
        self.nodes[id.0].conn.is_some()
    }

    /// Why the rendezvous last refused `id`, if it did.
    pub fn rejected(&self, id: NodeId) -> Option<RejectReason> {
        self.nodes[id.0].rejected
    }

    /// Every host change `id`'s agent asked for so far.
    pub fn host_changes(&self, id: NodeId) -> &[HostChange] {
        &self.nodes[id.0].host_changes
    }

    /// NAT checks the agents sent so far (dropped: not simulated).
    pub fn nat_checks(&self) -> u64 {
        self.nat_checks
    }

    /// A local API request to `id` now. Returns what is answered at once;
    /// an answer that waits (ping, netcheck) comes with [`Sim::take_answers`].
    pub fn api(&mut self, id: NodeId, request: Request) -> Vec<Response> {
        let now = self.now();
        let request_id = RequestId(self.next_request);
        self.next_request += 1;
        self.nodes[id.0]
            .agent
            .handle_api(request_id, request, &ShellStats::default(), now);
        self.drain(id.0);
        self.take_answers(id)
    }

    /// The API answers `id` gave since they were last taken.
    pub fn take_answers(&mut self, id: NodeId) -> Vec<Response> {
        std::mem::take(&mut self.nodes[id.0].answers)
            .into_iter()
            .map(|(_, response)| response)
            .collect()
    }
}
