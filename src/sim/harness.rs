//! [`Sim`]: N engine [`Node`]s on one [`SimNet`], driven by one [`SimClock`].
//!
//! No I/O. This is quinn-proto's test `Pair` grown to a mesh: the harness
//! owns the nodes, feeds each the datagrams the network delivers to it,
//! calls `handle_timeout` when a node's `poll_timeout` deadline comes, and
//! after every input drains the node's transmits into the network, its TUN
//! writes into a per-node inbox and its events into a per-node log, handing
//! every buffer back with `recycle` as a real driver would.
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
//! The rendezvous is modelled by what nodes see of it: a host at
//! [`RENDEZVOUS_ADDR`] whose view of each node's address is that node's
//! observed candidate ([`Sim::introduce`]), a relay that carries every
//! [`Node::poll_relay`] datagram to the named peer's
//! [`Node::handle_relayed`] after [`RelayConfig::latency`] (losing
//! [`RelayConfig::loss`] of them), and punch requests
//! ([`Event::PunchWanted`]) handed to the other side's [`Node::punch`]
//! after the same latency.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::clock::SimClock;
use super::nat::NatId;
use super::net::{Datagram, Delivery, HostId, LinkConfig, SimNet};
use super::packet::{udp_probe, Inner};
use crate::engine::paths::Source;
use crate::engine::{EngineError, Event, Node, NodeConfig, PeerId, PeerSpec};
use crate::identity::{PrivateKey, PublicKey};

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

/// Something the rendezvous carries between two nodes.
#[derive(Debug)]
enum Carried {
    /// A WireGuard datagram through the relay.
    Packet {
        from: usize,
        to: usize,
        payload: Vec<u8>,
    },
    /// `from` asks `to` to punch.
    Punch { from: usize, to: usize },
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
    node: Node,
    host: HostId,
    overlay: IpAddr,
    /// Every packet the node wrote to its TUN, oldest first.
    tun: Vec<Vec<u8>>,
    events: Vec<Event>,
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
    /// Relayed datagrams lost or addressed to no node.
    relay_dropped: u64,
    rendezvous: Option<HostId>,
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
        let private_key = self.generate_key();
        let node = self.fresh_node(&private_key, overlay);
        let id = NodeId(self.nodes.len());
        self.attach(host, Attached::Node(id.0));
        self.nodes.push(SimNode {
            name: name.to_owned(),
            private_key,
            node,
            host,
            overlay,
            tun: Vec::new(),
            events: Vec::new(),
        });
        id
    }

    /// A node as meshd starts one: its key, a fresh seed, the clock now.
    fn fresh_node(&mut self, private_key: &PrivateKey, overlay: IpAddr) -> Node {
        let config = NodeConfig {
            private_key: private_key.clone(),
            addresses: vec![IpNet::from(overlay)],
            mtu: NODE_MTU,
        };
        // The simulated wall clock: the Unix time the run starts at is
        // arbitrary, only its progress matters (ping freshness).
        Node::new(
            config,
            rand::Rng::gen(&mut self.node_rng),
            self.now(),
            SIM_EPOCH + self.elapsed(),
        )
    }

    /// meshd restarts on `id`: same key, address and socket, but a new
    /// process that remembers nothing (no peers, sessions or probes; its
    /// events start afresh). Configure its peers again, as its peer-map
    /// cache and the rendezvous would.
    pub fn restart(&mut self, id: NodeId) {
        let (key, overlay) = (
            self.nodes[id.0].private_key.clone(),
            self.nodes[id.0].overlay,
        );
        self.nodes[id.0].node = self.fresh_node(&key, overlay);
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

    /// Configures `spec` as a peer of `node`.
    pub fn add_peer(&mut self, node: NodeId, spec: PeerSpec) -> Result<PeerId, EngineError> {
        let now = self.now();
        let result = self.nodes[node.0].node.add_peer(spec, now);
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
        &self.nodes[id.0].node
    }

    pub fn name(&self, id: NodeId) -> &str {
        &self.nodes[id.0].name
    }

    pub fn public_key(&self, id: NodeId) -> PublicKey {
        self.nodes[id.0].node.public_key()
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
        self.nodes[id.0].node.handle_tun_packet(packet, now);
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
        let r = f(&mut self.nodes[id.0].node, now);
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

    /// Relayed datagrams lost on the way or addressed to no node so far.
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

    /// Does for the connected pair `a`, `b` what the rendezvous does for
    /// mesh peers: the relay is up for both, and each gets the other's
    /// candidates, its observed address ([`Sim::observed_addr`]) and its
    /// own (local) address.
    pub fn introduce(&mut self, a: NodeId, b: NodeId) {
        let candidates = |sim: &mut Sim, id: NodeId| {
            vec![
                (sim.observed_addr(id), Source::Observed),
                (sim.addr(id), Source::Local),
            ]
        };
        let (of_a, of_b) = (candidates(self, a), candidates(self, b));
        for (node, peer, cands) in [(a, b, of_b), (b, a, of_a)] {
            let key = self.public_key(peer);
            self.with_node(node, |n, now| {
                n.set_relay_available(true, now);
                n.set_candidates(&key, cands, now);
            });
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
        let timers = self.nodes.iter().map(|n| n.node.poll_timeout().0);
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
                if self.nodes[i].node.poll_timeout().0 <= now {
                    self.nodes[i].node.handle_timeout(now);
                    let (next, reason) = self.nodes[i].node.poll_timeout();
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
                self.nodes[i]
                    .node
                    .handle_datagram(datagram.src, &datagram.payload, now);
                self.drain(i);
            }
            Attached::Sink(i) => self.sinks[i].push(datagram),
            Attached::Rendezvous => {}
        }
    }

    fn deliver_carried(&mut self, carried: Carried, now: Instant) {
        let at = self.clock.elapsed();
        match carried {
            Carried::Packet { from, to, payload } => {
                self.trace.push(TraceEntry::Relayed {
                    at,
                    from: NodeId(from),
                    to: NodeId(to),
                    len: payload.len(),
                });
                let key = self.nodes[from].node.public_key();
                self.nodes[to].node.handle_relayed(key, &payload, now);
                self.drain(to);
            }
            Carried::Punch { from, to } => {
                self.trace.push(TraceEntry::Punched {
                    at,
                    from: NodeId(from),
                    to: NodeId(to),
                });
                let key = self.nodes[from].node.public_key();
                self.nodes[to].node.punch(&key, now);
                self.drain(to);
            }
        }
    }

    fn node_with_key(&self, key: &PublicKey) -> Option<usize> {
        self.nodes.iter().position(|n| n.node.public_key() == *key)
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
        let mut punches = Vec::new();
        let SimNode {
            node,
            host,
            tun,
            events,
            ..
        } = &mut self.nodes[i];
        while let Some(transmit) = node.poll_transmit() {
            self.net
                .send(*host, transmit.dst, transmit.payload.as_slice(), now);
            node.recycle(transmit.payload);
        }
        while let Some(transmit) = node.poll_relay() {
            relayed.push((transmit.peer, transmit.payload.as_slice().to_vec()));
            node.recycle(transmit.payload);
        }
        while let Some(packet) = node.poll_tun() {
            tun.push(packet.as_slice().to_vec());
            node.recycle(packet);
        }
        while let Some(event) = node.poll_event() {
            if let Event::PunchWanted { peer } = &event {
                punches.push(*peer);
            }
            self.trace.push(TraceEntry::Event {
                at,
                node: NodeId(i),
                event: event.clone(),
            });
            events.push(event);
        }
        for (peer, payload) in relayed {
            let lost = self.relay.loss > 0.0 && self.relay_rng.gen_bool(self.relay.loss);
            match self.node_with_key(&peer) {
                Some(to) if !lost => self.carry(
                    Carried::Packet {
                        from: i,
                        to,
                        payload,
                    },
                    now,
                ),
                Some(_) | None => self.relay_dropped += 1,
            }
        }
        for peer in punches {
            if let Some(to) = self.node_with_key(&peer) {
                self.carry(Carried::Punch { from: i, to }, now);
            }
        }
    }
}
