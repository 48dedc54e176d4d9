//! NAT boxes for [`SimNet`](super::SimNet), in RFC 4787's terms.
//!
//! No I/O. A [`Nat`] joins one private subnet to the network outside it
//! (the public internet, or the subnet of an outer NAT for carrier-grade
//! NAT behind a home router). Hosts put behind it keep their private
//! addresses; [`SimNet`](super::SimNet) asks the NAT to translate a
//! datagram's source as it leaves the subnet and its destination as it
//! comes back. The NAT itself is a zero-latency hop: outbound translation
//! happens when the host sends, inbound translation when the datagram
//! arrives at the NAT's external address, and the link a datagram takes is
//! always the one between the two hosts at its ends.
//!
//! What a NAT models, each a knob on [`NatConfig`]:
//!
//! - **mapping** (RFC 4787 §4.1): whether one internal `ip:port` keeps its
//!   external port for every destination ([`Mapping::EndpointIndependent`],
//!   a "cone" NAT and Linux MASQUERADE) or gets a new one per destination
//!   address or address and port ([`Mapping::AddressAndPortDependent`],
//!   a "symmetric" NAT and MASQUERADE `--random-fully`);
//! - **port assignment** (§4.2.1): a new mapping keeps the internal port
//!   when no live mapping has it (port preservation, as Linux's
//!   `nf_nat` does) and otherwise gets a port drawn from 1024–65535. The
//!   draws come from a ChaCha20 stream of the network's seed that belongs
//!   to this NAT alone, so one NAT's traffic never moves another's ports;
//! - **filtering** (§5): which inbound datagrams a mapping lets in: from
//!   anywhere ([`Filtering::EndpointIndependent`], "full cone"), from an
//!   address the host sent to, or from exactly an `ip:port` it sent to
//!   ([`Filtering::AddressAndPortDependent`], "port-restricted", Linux
//!   conntrack);
//! - **timers** (§4.3): each remote endpoint a mapping sent to stays
//!   permitted until `timeout` passes without a datagram to it, much as each
//!   conntrack entry has its own timer; the mapping lives while any of its
//!   remotes does. Outbound datagrams refresh (REQ-6); inbound ones only
//!   with `inbound_refresh`. The default timeout is 30 s, Linux's
//!   `nf_conntrack_udp_timeout`, shorter than REQ-5's two minutes because
//!   that is what nodes behind real NATs have to survive. Expiry is checked
//!   when a datagram needs it, so it needs no timer of its own;
//! - **hairpinning** (§6): a datagram from inside to one of the NAT's own
//!   external addresses is dropped unless `hairpin` is set. REQ-9 asks NATs
//!   to hairpin, but Linux MASQUERADE does not without extra rules and
//!   neither do many cloud gateways, and a mesh must not depend on it
//!   (DESIGN.md: same-subnet traffic stays on the private network). With
//!   `hairpin` the datagram is delivered from the sender's external address,
//!   as REQ-9 requires, and filtered like any inbound one;
//! - **1:1 NAT** ([`OneToOne`]): a public address statically mapped to one
//!   private address, every port, in both directions, with no state and no
//!   filtering: a cloud VPC's elastic IP. A NAT may hold several beside (or
//!   instead of) its dynamic [`NatConfig::public_ip`];
//! - [`Nat::flush`] drops every dynamic mapping, as `conntrack -F` does;
//!   1:1 bindings are configuration, not state, and stay.
//!
//! A mapping owns its external port outright: unlike Linux, which may reuse
//! a port for a different remote as long as the 5-tuples differ, the model
//! never shares one, so an [`Mapping::EndpointIndependent`] NAT's ports are
//! as predictable as a test needs.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use rand::Rng;
use rand_chacha::ChaCha20Rng;

/// Where a NAT picks external ports when it cannot keep the internal one:
/// Linux's range for source ports of 1024 and up.
const EPHEMERAL_PORTS: RangeInclusive<u16> = 1024..=65535;
/// Random draws before falling back to the lowest free port, so that a
/// nearly full NAT still answers (and still deterministically).
const PORT_DRAWS: usize = 64;
/// Linux's `nf_conntrack_udp_timeout`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A NAT on a [`SimNet`](super::SimNet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NatId(pub(super) usize);

impl NatId {
    pub fn index(self) -> usize {
        self.0
    }
}

/// Which network an address is meaningful in: the public internet, or the
/// private subnet behind one NAT. The same private address may exist
/// behind two NATs at once, as 192.168.1.10 does in many homes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Realm {
    Public,
    Behind(NatId),
}

/// RFC 4787 §4.1 mapping behaviour: when a new datagram from the same
/// internal `ip:port` reuses an existing external port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mapping {
    /// One external port for every destination (REQ-1): a "cone" NAT,
    /// Linux MASQUERADE.
    EndpointIndependent,
    /// A new external port per destination address.
    AddressDependent,
    /// A new external port per destination `ip:port`: a "symmetric" NAT,
    /// MASQUERADE `--random-fully`.
    AddressAndPortDependent,
}

/// RFC 4787 §5 filtering behaviour: which inbound datagrams to a mapped
/// external port reach the host behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filtering {
    /// Any source: "full cone".
    EndpointIndependent,
    /// Sources whose address the host has sent to: "address-restricted".
    AddressDependent,
    /// Only `ip:port`s the host has sent to: "port-restricted", Linux
    /// conntrack.
    AddressAndPortDependent,
}

/// A static 1:1 NAT binding: `public` stands for `private`, every port,
/// both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OneToOne {
    pub public: IpAddr,
    pub private: IpAddr,
}

/// How a [`Nat`] behaves. See the module docs for each knob.
#[derive(Debug, Clone, PartialEq)]
pub struct NatConfig {
    /// The private subnet behind the NAT. Hosts in it reach each other
    /// directly; every other destination is reached through the NAT.
    pub subnet: IpNet,
    /// The external address dynamic mappings use. `None` for a NAT with
    /// only 1:1 bindings, whose other hosts cannot reach outside.
    pub public_ip: Option<IpAddr>,
    /// Static 1:1 bindings.
    pub one_to_one: Vec<OneToOne>,
    pub mapping: Mapping,
    pub filtering: Filtering,
    /// Keep the internal port for a new mapping when it is free.
    pub preserve_port: bool,
    /// How long a remote endpoint stays permitted, and a mapping alive,
    /// without traffic.
    pub timeout: Duration,
    /// Whether inbound datagrams that pass the filter refresh it too
    /// (RFC 4787 REQ-6 leaves this to the NAT).
    pub inbound_refresh: bool,
    /// Whether a datagram from inside to an external address of this NAT
    /// is turned around (RFC 4787 §6) or dropped.
    pub hairpin: bool,
}

impl NatConfig {
    /// A home router or Linux MASQUERADE: endpoint-independent mapping
    /// that keeps the internal port when it can, port-restricted filtering,
    /// 30 s timeout refreshed by outbound traffic, no hairpinning.
    pub fn port_restricted_cone(public_ip: IpAddr, subnet: IpNet) -> Self {
        Self {
            subnet,
            public_ip: Some(public_ip),
            one_to_one: Vec::new(),
            mapping: Mapping::EndpointIndependent,
            filtering: Filtering::AddressAndPortDependent,
            preserve_port: true,
            timeout: DEFAULT_TIMEOUT,
            inbound_refresh: false,
            hairpin: false,
        }
    }

    /// Like [`NatConfig::port_restricted_cone`], but a mapping lets in
    /// datagrams from anywhere.
    pub fn full_cone(public_ip: IpAddr, subnet: IpNet) -> Self {
        Self::port_restricted_cone(public_ip, subnet).filtering(Filtering::EndpointIndependent)
    }

    /// A carrier-grade or MASQUERADE `--random-fully` NAT: a random
    /// external port per destination `ip:port`, port-restricted filtering.
    pub fn symmetric(public_ip: IpAddr, subnet: IpNet) -> Self {
        Self::port_restricted_cone(public_ip, subnet)
            .mapping(Mapping::AddressAndPortDependent)
            .preserve_port(false)
    }

    /// A cloud VPC with one elastic IP: `public` is `private`, every port,
    /// and no other host of `subnet` reaches outside.
    pub fn one_to_one(public: IpAddr, private: IpAddr, subnet: IpNet) -> Self {
        Self {
            public_ip: None,
            ..Self::port_restricted_cone(public, subnet)
        }
        .with_one_to_one(public, private)
    }

    /// Adds a 1:1 binding (another elastic IP in the same VPC).
    pub fn with_one_to_one(mut self, public: IpAddr, private: IpAddr) -> Self {
        self.one_to_one.push(OneToOne { public, private });
        self
    }

    pub fn mapping(mut self, mapping: Mapping) -> Self {
        self.mapping = mapping;
        self
    }

    pub fn filtering(mut self, filtering: Filtering) -> Self {
        self.filtering = filtering;
        self
    }

    pub fn preserve_port(mut self, preserve: bool) -> Self {
        self.preserve_port = preserve;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn inbound_refresh(mut self, refresh: bool) -> Self {
        self.inbound_refresh = refresh;
        self
    }

    pub fn hairpin(mut self, hairpin: bool) -> Self {
        self.hairpin = hairpin;
        self
    }

    /// Every address this NAT answers for on its outside.
    pub fn external_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.public_ip
            .into_iter()
            .chain(self.one_to_one.iter().map(|b| b.public))
    }
}

/// What a [`Nat`] did, since it was added.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NatStats {
    /// Dynamic mappings created.
    pub mappings_created: u64,
    /// Inbound datagrams to an external port with no live mapping
    /// (never mapped, expired or flushed).
    pub unmapped: u64,
    /// Inbound datagrams to a live mapping that its filter refused.
    pub filtered: u64,
    /// Datagrams from inside to the NAT's own external address, dropped
    /// because the NAT does not hairpin.
    pub hairpin_dropped: u64,
    /// Outbound datagrams from a host with no way out: no 1:1 binding and
    /// no dynamic public address.
    pub no_address: u64,
    /// Outbound datagrams that needed a new mapping when every port was
    /// taken.
    pub ports_exhausted: u64,
}

/// Why a NAT dropped a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NatDrop {
    Unmapped,
    Filtered,
    Hairpin,
    NoAddress,
    PortsExhausted,
}

/// Where an inbound datagram goes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Inbound {
    /// The private address it is now destined to.
    pub(super) to: SocketAddr,
    /// The external port whose mapping it refreshes once delivered.
    pub(super) refresh: Option<u16>,
}

/// Which destinations share a mapping, per [`Mapping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Remote {
    Any,
    Address(IpAddr),
    Endpoint(SocketAddr),
}

impl Mapping {
    fn remote(self, dst: SocketAddr) -> Remote {
        match self {
            Mapping::EndpointIndependent => Remote::Any,
            Mapping::AddressDependent => Remote::Address(dst.ip()),
            Mapping::AddressAndPortDependent => Remote::Endpoint(dst),
        }
    }
}

/// One dynamic mapping, keyed by its external port.
#[derive(Debug, Clone)]
struct Binding {
    internal: SocketAddr,
    made_for: Remote,
    /// Remote endpoints this mapping is open to, and when each last
    /// refreshed it.
    remotes: BTreeMap<SocketAddr, Instant>,
}

/// A NAT box. See the module docs.
#[derive(Debug)]
pub struct Nat {
    config: NatConfig,
    outside: Realm,
    rng: ChaCha20Rng,
    /// Live (or not yet swept) dynamic mappings by external port.
    bindings: BTreeMap<u16, Binding>,
    stats: NatStats,
}

impl Nat {
    pub(super) fn new(config: NatConfig, outside: Realm, rng: ChaCha20Rng) -> Self {
        Self {
            config,
            outside,
            rng,
            bindings: BTreeMap::new(),
            stats: NatStats::default(),
        }
    }

    pub fn config(&self) -> &NatConfig {
        &self.config
    }

    pub fn stats(&self) -> NatStats {
        self.stats
    }

    /// Drops every dynamic mapping, as `conntrack -F` does. 1:1 bindings
    /// stay.
    pub fn flush(&mut self) {
        self.bindings.clear();
    }

    /// The dynamic mappings alive at `now`, as `(internal, external)`
    /// pairs in external port order.
    pub fn mappings(&self, now: Instant) -> Vec<(SocketAddr, SocketAddr)> {
        let Some(public_ip) = self.config.public_ip else {
            return Vec::new();
        };
        self.bindings
            .iter()
            .filter(|(_, b)| self.is_live(b, now))
            .map(|(port, b)| (b.internal, SocketAddr::new(public_ip, *port)))
            .collect()
    }

    pub(super) fn outside(&self) -> Realm {
        self.outside
    }

    /// Whether `ip` is one of this NAT's external addresses.
    pub(super) fn answers_for(&self, ip: IpAddr) -> bool {
        self.config.external_ips().any(|e| e == ip)
    }

    /// The source a datagram from `src` to `dst` leaves with, creating or
    /// refreshing its mapping.
    pub(super) fn outbound(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        now: Instant,
    ) -> Result<SocketAddr, NatDrop> {
        if let Some(public) = self.static_public(src.ip()) {
            return Ok(SocketAddr::new(public, src.port()));
        }
        let Some(public_ip) = self.config.public_ip else {
            self.count(NatDrop::NoAddress);
            return Err(NatDrop::NoAddress);
        };
        self.expire(now);
        let port = match self.find(src, dst, now) {
            Some(port) => port,
            None => {
                let Some(port) = self.allocate(src.port()) else {
                    self.count(NatDrop::PortsExhausted);
                    return Err(NatDrop::PortsExhausted);
                };
                self.bindings.insert(
                    port,
                    Binding {
                        internal: src,
                        made_for: self.config.mapping.remote(dst),
                        remotes: BTreeMap::new(),
                    },
                );
                self.stats.mappings_created += 1;
                port
            }
        };
        if let Some(binding) = self.bindings.get_mut(&port) {
            binding.remotes.insert(dst, now);
        }
        Ok(SocketAddr::new(public_ip, port))
    }

    /// The source a datagram from `src` to `dst` would leave with at `now`,
    /// if it needs no new mapping. Changes nothing.
    pub(super) fn peek_outbound(
        &self,
        src: SocketAddr,
        dst: SocketAddr,
        now: Instant,
    ) -> Option<SocketAddr> {
        if let Some(public) = self.static_public(src.ip()) {
            return Some(SocketAddr::new(public, src.port()));
        }
        let public_ip = self.config.public_ip?;
        let port = self.find(src, dst, now)?;
        Some(SocketAddr::new(public_ip, port))
    }

    /// Where a datagram from `src` that arrived at `dst`, one of this NAT's
    /// external addresses, at `at` goes inside, or why it goes nowhere.
    /// Changes nothing: the caller refreshes and counts.
    pub(super) fn inbound(
        &self,
        src: SocketAddr,
        dst: SocketAddr,
        at: Instant,
    ) -> Result<Inbound, NatDrop> {
        if self.answers_for(src.ip()) && !self.config.hairpin {
            return Err(NatDrop::Hairpin);
        }
        if let Some(b) = self.config.one_to_one.iter().find(|b| b.public == dst.ip()) {
            return Ok(Inbound {
                to: SocketAddr::new(b.private, dst.port()),
                refresh: None,
            });
        }
        let binding = self
            .bindings
            .get(&dst.port())
            .filter(|b| self.is_live(b, at))
            .ok_or(NatDrop::Unmapped)?;
        let timeout = self.config.timeout;
        let live = |last: &Instant| at.saturating_duration_since(*last) < timeout;
        let admitted = match self.config.filtering {
            Filtering::EndpointIndependent => true,
            Filtering::AddressDependent => binding
                .remotes
                .iter()
                .any(|(remote, last)| remote.ip() == src.ip() && live(last)),
            Filtering::AddressAndPortDependent => binding.remotes.get(&src).is_some_and(live),
        };
        if !admitted {
            return Err(NatDrop::Filtered);
        }
        Ok(Inbound {
            to: binding.internal,
            refresh: self.config.inbound_refresh.then_some(dst.port()),
        })
    }

    /// An inbound datagram from `src` passed the mapping on `port` at `at`.
    pub(super) fn refresh_inbound(&mut self, port: u16, src: SocketAddr, at: Instant) {
        if let Some(binding) = self.bindings.get_mut(&port) {
            binding.remotes.insert(src, at);
        }
    }

    pub(super) fn count(&mut self, drop: NatDrop) {
        let counter = match drop {
            NatDrop::Unmapped => &mut self.stats.unmapped,
            NatDrop::Filtered => &mut self.stats.filtered,
            NatDrop::Hairpin => &mut self.stats.hairpin_dropped,
            NatDrop::NoAddress => &mut self.stats.no_address,
            NatDrop::PortsExhausted => &mut self.stats.ports_exhausted,
        };
        *counter += 1;
    }

    fn static_public(&self, private: IpAddr) -> Option<IpAddr> {
        self.config
            .one_to_one
            .iter()
            .find(|b| b.private == private)
            .map(|b| b.public)
    }

    /// The external port of the live mapping a datagram from `src` to
    /// `dst` would use.
    fn find(&self, src: SocketAddr, dst: SocketAddr, now: Instant) -> Option<u16> {
        let made_for = self.config.mapping.remote(dst);
        self.bindings
            .iter()
            .find(|(_, b)| b.internal == src && b.made_for == made_for && self.is_live(b, now))
            .map(|(port, _)| *port)
    }

    fn is_live(&self, binding: &Binding, now: Instant) -> bool {
        binding
            .remotes
            .values()
            .any(|last| now.saturating_duration_since(*last) < self.config.timeout)
    }

    /// Forgets remotes and mappings idle for `timeout`, freeing their ports.
    fn expire(&mut self, now: Instant) {
        let timeout = self.config.timeout;
        self.bindings.retain(|_, b| {
            b.remotes
                .retain(|_, last| now.saturating_duration_since(*last) < timeout);
            !b.remotes.is_empty()
        });
    }

    /// A free external port for a new mapping from `internal_port`.
    fn allocate(&mut self, internal_port: u16) -> Option<u16> {
        if self.config.preserve_port && !self.bindings.contains_key(&internal_port) {
            return Some(internal_port);
        }
        for _ in 0..PORT_DRAWS {
            let port = self.rng.gen_range(EPHEMERAL_PORTS);
            if !self.bindings.contains_key(&port) {
                return Some(port);
            }
        }
        EPHEMERAL_PORTS
            .clone()
            .find(|port| !self.bindings.contains_key(port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{Delivery, HostId, LinkConfig, Sim, SimClock, SimNet};

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn subnet(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    const PUBLIC_IP: &str = "203.0.113.1";
    const HOME: &str = "10.0.0.0/24";

    /// A network with 10 ms links and a clock that only moves when told.
    struct World {
        net: SimNet,
        now: Instant,
    }

    impl World {
        fn new(seed: u64) -> Self {
            Self {
                net: SimNet::new(seed, LinkConfig::default()),
                now: SimClock::new().now(),
            }
        }

        /// A world with one NAT configured by `config`, and the NAT.
        fn with_nat(config: NatConfig) -> (Self, NatId) {
            let mut world = Self::new(1);
            let nat = world.net.add_nat(config);
            (world, nat)
        }

        /// `from` sends to `dst`; returns what arrived, once it had time to.
        fn send(&mut self, from: HostId, dst: &str) -> Option<Delivery> {
            self.net.send(from, addr(dst), b"hello", self.now);
            self.settle()
        }

        /// A datagram from `src`, anywhere on the internet, to `dst`.
        fn inject(&mut self, src: &str, dst: &str) -> Option<Delivery> {
            self.net.inject(addr(src), addr(dst), b"hello", self.now);
            self.settle()
        }

        fn settle(&mut self) -> Option<Delivery> {
            self.wait(Duration::from_millis(100));
            let delivery = self.net.pop_due(self.now);
            assert_eq!(self.net.pop_due(self.now), None, "one datagram at a time");
            delivery
        }

        fn wait(&mut self, duration: Duration) {
            self.now += duration;
        }

        /// The source `from`'s datagram to `dst` arrived from.
        fn seen_from(&mut self, from: HostId, dst: &str) -> SocketAddr {
            match self.send(from, dst) {
                Some(d) => d.datagram.src,
                None => panic!("nothing from {} reached {dst}", self.net.addr(from)),
            }
        }
    }

    fn port_restricted() -> NatConfig {
        NatConfig::port_restricted_cone(ip(PUBLIC_IP), subnet(HOME))
    }

    #[test]
    fn an_endpoint_independent_nat_gives_one_external_port_for_every_destination() {
        let (mut w, nat) = World::with_nat(port_restricted());
        let host = w.net.add_host_behind(nat, addr("10.0.0.2:51820"));
        for server in ["192.0.2.1:3478", "192.0.2.2:3478", "192.0.2.1:3479"] {
            w.net.add_host(addr(server));
        }

        let seen: Vec<SocketAddr> = ["192.0.2.1:3478", "192.0.2.2:3478", "192.0.2.1:3479"]
            .into_iter()
            .map(|server| w.seen_from(host, server))
            .collect();

        // Port preservation: the internal port was free, so it was kept.
        assert_eq!(seen, [addr("203.0.113.1:51820"); 3]);
        assert_eq!(w.net.nat(nat).stats().mappings_created, 1);
    }

    #[test]
    fn an_endpoint_dependent_nat_gives_a_new_external_port_per_destination() {
        let (mut w, nat) = World::with_nat(NatConfig::symmetric(ip(PUBLIC_IP), subnet(HOME)));
        let host = w.net.add_host_behind(nat, addr("10.0.0.2:51820"));
        let servers = ["192.0.2.1:3478", "192.0.2.2:3478", "192.0.2.1:3479"];
        for server in servers {
            w.net.add_host(addr(server));
        }

        let seen: Vec<SocketAddr> = servers.iter().map(|s| w.seen_from(host, s)).collect();
        let again = w.seen_from(host, servers[0]);

        assert!(seen.iter().all(|s| s.ip() == ip(PUBLIC_IP)));
        assert_ne!(seen[0].port(), seen[1].port());
        assert_ne!(seen[0].port(), seen[2].port());
        assert_ne!(seen[1].port(), seen[2].port());
        assert_eq!(again, seen[0], "the same destination reuses its mapping");
        assert_eq!(w.net.nat(nat).stats().mappings_created, 3);
    }

    #[test]
    fn an_address_dependent_nat_shares_a_port_among_the_ports_of_one_address() {
        let (mut w, nat) = World::with_nat(port_restricted().mapping(Mapping::AddressDependent));
        let host = w.net.add_host_behind(nat, addr("10.0.0.2:51820"));
        for server in ["192.0.2.1:3478", "192.0.2.1:3479", "192.0.2.2:3478"] {
            w.net.add_host(addr(server));
        }

        let first = w.seen_from(host, "192.0.2.1:3478");
        let same_address = w.seen_from(host, "192.0.2.1:3479");
        let other_address = w.seen_from(host, "192.0.2.2:3478");

        assert_eq!(first, same_address);
        assert_ne!(first, other_address);
    }

    #[test]
    fn a_taken_port_is_not_preserved_and_another_is_drawn() {
        let (mut w, nat) = World::with_nat(port_restricted());
        let a = w.net.add_host_behind(nat, addr("10.0.0.2:51820"));
        let b = w.net.add_host_behind(nat, addr("10.0.0.3:51820"));
        w.net.add_host(addr("192.0.2.1:3478"));

        let seen_a = w.seen_from(a, "192.0.2.1:3478");
        let seen_b = w.seen_from(b, "192.0.2.1:3478");

        assert_eq!(seen_a, addr("203.0.113.1:51820"));
        assert_eq!(seen_b.ip(), ip(PUBLIC_IP));
        assert_ne!(seen_b.port(), 51820);
        assert!(EPHEMERAL_PORTS.contains(&seen_b.port()));
    }

    #[test]
    fn port_restricted_filtering_admits_only_endpoints_the_host_sent_to() {
        let (mut w, nat) = World::with_nat(port_restricted());
        let host = w.net.add_host_behind(nat, addr("10.0.0.2:51820"));
        w.net.add_host(addr("192.0.2.1:3478"));
        let peer = w.net.add_host(addr("198.51.100.7:51820"));
        let external = w.seen_from(host, "192.0.2.1:3478");

        let unsolicited = w.send(peer, &external.to_string());
        let other_port = w.inject("192.0.2.1:9999", &external.to_string());
        assert_eq!(unsolicited, None);
        assert_eq!(other_port, None);
        assert_eq!(w.net.nat(nat).stats().filtered, 2);

        // The host punches a hole towards the peer; now the peer gets in.
        assert_eq!(w.seen_from(host, "198.51.100.7:51820"), external);
        let reply = w.send(peer, &external.to_string()).expect("admitted");
        assert_eq!(reply.to, host);
        assert_eq!(reply.datagram.src, addr("198.51.100.7:51820"));
        assert_eq!(reply.datagram.dst, addr("10.0.0.2:51820"));
    }

    #[test]
    fn address_restricted_filtering_admits_any_port_of_an_address_the_host_sent_to() {
        let (mut w, nat) =
            World::with_nat(port_restricted().filtering(Filtering::AddressDependent));
        let host = w.net.add_host_behind(nat, addr("10.0.0.2:51820"));
        w.net.add_host(addr("192.0.2.1:3478"));
        let external = w.seen_from(host, "192.0.2.1:3478").to_string();

        assert!(w.inject("192.0.2.1:9999", &external).is_some());
        assert_eq!(w.inject("192.0.2.2:3478", &external), None);
        assert_eq!(w.net.nat(nat).stats().filtered, 1);
    }

    #[test]
    fn a_full_cone_nat_lets_anyone_in_to_a_mapped_port_and_nobody_to_another() {
        let (mut w, nat) = World::with_nat(NatConfig::full_cone(ip(PUBLIC_IP), subnet(HOME)));
        let host = w.net.add_host_behind(nat, addr("10.0.0.2:51820"));
        w.net.add_host(addr("192.0.2.1:3478"));
        assert_eq!(w.inject("198.51.100.7:1234", "203.0.113.1:51820"), None);

        let external = w.seen_from(host, "192.0.2.1:3478").to_string();
        let stranger = w.inject("198.51.100.7:1234", &external).expect("let in");
        let unmapped = w.inject("198.51.100.7:1234", "203.0.113.1:40000");

        assert_eq!(stranger.to, host);
        assert_eq!(unmapped, None);
        assert_eq!(w.net.nat(nat).stats().unmapped, 2);
        assert_eq!(w.net.stats().nat_dropped, 2);
    }

    #[test]
    fn a_one_to_one_nat_forwards_unsolicited_inbound_and_keeps_ports() {
        let config = NatConfig::one_to_one(ip("203.0.113.10"), ip("10.0.0.10"), subnet(HOME));
        let (mut w, nat) = World::with_nat(config);
        let vm = w.net.add_host_behind(nat, addr("10.0.0.10:51820"));
        let other = w.net.add_host_behind(nat, addr("10.0.0.11:51820"));
        w.net.add_host(addr("192.0.2.1:3478"));

        let unsolicited = w.inject("198.51.100.7:1234", "203.0.113.10:51820");
        let d = unsolicited.expect("forwarded");
        assert_eq!((d.to, d.datagram.dst), (vm, addr("10.0.0.10:51820")));

        assert_eq!(
            w.seen_from(vm, "192.0.2.1:3478"),
            addr("203.0.113.10:51820")
        );
        assert_eq!(w.send(other, "192.0.2.1:3478"), None);
        assert_eq!(w.net.nat(nat).stats().no_address, 1);

        // Static bindings are configuration, not connection state.
        w.net.nat_mut(nat).flush();
        assert!(w
            .inject("198.51.100.7:1234", "203.0.113.10:51820")
            .is_some());
    }

    #[test]
    fn mappings_expire_after_the_timeout_without_traffic() {
        let (mut w, nat) = World::with_nat(port_restricted().timeout(secs(30)));
        let host = w.net.add_host_behind(nat, addr("10.0.0.2:51820"));
        let server = w.net.add_host(addr("192.0.2.1:3478"));
        let external = w.seen_from(host, "192.0.2.1:3478").to_string();

        w.wait(secs(25));
        assert!(w.send(server, &external).is_some(), "still mapped at 25 s");
        w.wait(secs(5));
        assert_eq!(w.send(server, &external), None, "a reply does not refresh");

        assert_eq!(w.net.nat(nat).stats().unmapped, 1);
        assert_eq!(w.net.nat(nat).mappings(w.now), []);
    }

    #[test]
    fn outbound_traffic_keeps_a_mapping_alive() {
        let (mut w, nat) = World::with_nat(port_restricted().timeout(secs(30)));
        let host = w.net.add_host_behind(nat, addr("10.0.0.2:51820"));
        let server = w.net.add_host(addr("192.0.2.1:3478"));
        let external = w.seen_from(host, "192.0.2.1:3478");

        for _ in 0..10 {
            w.wait(secs(25));
            assert_eq!(w.seen_from(host, "192.0.2.1:3478"), external);
        }
        w.wait(secs(25));

        assert!(w.send(server, &external.to_string()).is_some());
        assert_eq!(w.net.nat(nat).stats().mappings_created, 1);
        assert_eq!(
            w.net.nat(nat).mappings(w.now),
            [(addr("10.0.0.2:51820"), external)]
        );
    }

    #[test]
    fn inbound_traffic_keeps_a_mapping_alive_only_when_configured() {
        let run = |inbound_refresh| {
            let config = port_restricted()
                .timeout(secs(30))
                .inbound_refresh(inbound_refresh);
            let (mut w, nat) = World::with_nat(config);
            let host = w.net.add_host_behind(nat, addr("10.0.0.2:51820"));
            let server = w.net.add_host(addr("192.0.2.1:3478"));
            let external = w.seen_from(host, "192.0.2.1:3478").to_string();
            (0..4)
                .map(|_| {
                    w.wait(secs(20));
                    w.send(server, &external).is_some()
                })
                .collect::<Vec<_>>()
        };

        assert_eq!(run(true), [true; 4]);
        assert_eq!(run(false), [true, false, false, false]);
    }

    #[test]
    fn a_remote_the_host_stopped_sending_to_is_filtered_while_the_mapping_lives() {
        let (mut w, nat) = World::with_nat(port_restricted().timeout(secs(30)));
        let host = w.net.add_host_behind(nat, addr("10.0.0.2:51820"));
        let kept = w.net.add_host(addr("192.0.2.1:3478"));
        let dropped = w.net.add_host(addr("198.51.100.7:51820"));
        let external = w.seen_from(host, "192.0.2.1:3478").to_string();
        w.seen_from(host, "198.51.100.7:51820");

        for _ in 0..3 {
            w.wait(secs(15));
            w.seen_from(host, "192.0.2.1:3478");
        }

        assert!(w.send(kept, &external).is_some());
        assert_eq!(w.send(dropped, &external), None);
        assert_eq!(w.net.nat(nat).stats().filtered, 1);
    }

    #[test]
    fn flushing_a_nat_drops_every_mapping() {
        let (mut w, nat) = World::with_nat(port_restricted());
        let a = w.net.add_host_behind(nat, addr("10.0.0.2:51820"));
        let b = w.net.add_host_behind(nat, addr("10.0.0.3:4000"));
        let server = w.net.add_host(addr("192.0.2.1:3478"));
        let external_a = w.seen_from(a, "192.0.2.1:3478").to_string();
        let external_b = w.seen_from(b, "192.0.2.1:3478").to_string();
        assert_eq!(w.net.nat(nat).mappings(w.now).len(), 2);

        w.net.nat_mut(nat).flush();

        assert_eq!(w.net.nat(nat).mappings(w.now), []);
        assert_eq!(w.send(server, &external_a), None);
        assert_eq!(w.send(server, &external_b), None);
        assert_eq!(w.net.nat(nat).stats().unmapped, 2);
        // The next datagram out makes a new mapping.
        w.seen_from(a, "192.0.2.1:3478");
        assert_eq!(w.net.nat(nat).stats().mappings_created, 3);
    }

    #[test]
    fn hosts_behind_one_nat_reach_each_other_by_private_address_but_not_by_hairpinning() {
        // Full cone, so that only the missing hairpin stands in the way.
        let (mut w, nat) = World::with_nat(NatConfig::full_cone(ip(PUBLIC_IP), subnet(HOME)));
        let a = w.net.add_host_behind(nat, addr("10.0.0.2:51820"));
        let b = w.net.add_host_behind(nat, addr("10.0.0.3:51820"));
        w.net.add_host(addr("192.0.2.1:3478"));
        let external_a = w.seen_from(a, "192.0.2.1:3478").to_string();
        let external_b = w.seen_from(b, "192.0.2.1:3478").to_string();

        let direct = w.send(a, "10.0.0.3:51820").expect("same subnet");
        assert_eq!(direct.to, b);
        assert_eq!(direct.datagram.src, addr("10.0.0.2:51820"));

        assert_eq!(w.send(a, &external_b), None);
        assert_eq!(w.send(b, &external_a), None);
        assert_eq!(w.net.nat(nat).stats().hairpin_dropped, 2);
    }

    #[test]
    fn a_hairpinning_nat_turns_datagrams_around_from_the_senders_external_address() {
        let config = NatConfig::full_cone(ip(PUBLIC_IP), subnet(HOME)).hairpin(true);
        let (mut w, nat) = World::with_nat(config);
        let a = w.net.add_host_behind(nat, addr("10.0.0.2:51820"));
        let b = w.net.add_host_behind(nat, addr("10.0.0.3:51820"));
        w.net.add_host(addr("192.0.2.1:3478"));
        let external_a = w.seen_from(a, "192.0.2.1:3478");
        let external_b = w.seen_from(b, "192.0.2.1:3478");

        let d = w.send(a, &external_b.to_string()).expect("hairpinned");

        assert_eq!(d.to, b);
        assert_eq!(d.datagram.src, external_a);
        assert_eq!(d.datagram.dst, addr("10.0.0.3:51820"));
    }

    #[test]
    fn private_addresses_reach_nobody_outside_their_own_subnet() {
        let mut w = World::new(1);
        let home = w.net.add_nat(port_restricted());
        let office = w.net.add_nat(NatConfig::port_restricted_cone(
            ip("203.0.113.2"),
            subnet(HOME),
        ));
        let at_home = w.net.add_host_behind(home, addr("10.0.0.2:51820"));
        let neighbour = w.net.add_host_behind(home, addr("10.0.0.3:51820"));
        let at_office = w.net.add_host_behind(office, addr("10.0.0.2:51820"));
        let server = w.net.add_host(addr("192.0.2.1:3478"));

        assert_eq!(w.send(server, "10.0.0.2:51820"), None);
        assert_eq!(w.send(at_office, "10.0.0.3:51820"), None);
        let d = w.send(neighbour, "10.0.0.2:51820").expect("same subnet");

        assert_eq!(d.to, at_home);
        assert_eq!(w.net.stats().unroutable, 2);
        assert_eq!(w.net.nat_of(at_office), Some(office));
        assert_eq!(w.net.nat_of(server), None);
    }

    #[test]
    fn a_host_behind_two_nats_reaches_the_internet_and_hears_back() {
        let mut w = World::new(1);
        let carrier = w.net.add_nat(NatConfig::symmetric(
            ip("198.51.100.1"),
            subnet("100.64.0.0/10"),
        ));
        let home = w.net.add_nat_behind(
            carrier,
            NatConfig::port_restricted_cone(ip("100.64.0.2"), subnet("192.168.1.0/24")),
        );
        let host = w.net.add_host_behind(home, addr("192.168.1.10:51820"));
        let server = w.net.add_host(addr("192.0.2.1:3478"));

        let external = w.seen_from(host, "192.0.2.1:3478");
        let reply = w.send(server, &external.to_string()).expect("reply");

        assert_eq!(external.ip(), ip("198.51.100.1"));
        assert_eq!(
            w.net.apparent_addr(host, addr("192.0.2.1:3478"), w.now),
            Some(external)
        );
        assert_eq!(w.net.apparent_addr(host, addr("192.0.2.9:1"), w.now), None);
        assert_eq!(
            (reply.to, reply.datagram.dst),
            (host, addr("192.168.1.10:51820"))
        );
        assert_eq!(
            w.net.nat(home).mappings(w.now),
            [(addr("192.168.1.10:51820"), addr("100.64.0.2:51820"))]
        );
    }

    /// The external ports a symmetric NAT hands out to 20 destinations.
    fn symmetric_ports(seed: u64, noise_through_another_nat: bool) -> Vec<u16> {
        let mut w = World::new(seed);
        let other = w
            .net
            .add_nat(NatConfig::symmetric(ip("203.0.113.2"), subnet(HOME)));
        let nat = w
            .net
            .add_nat(NatConfig::symmetric(ip(PUBLIC_IP), subnet(HOME)));
        let noisy = w.net.add_host_behind(other, addr("10.0.0.2:51820"));
        let host = w.net.add_host_behind(nat, addr("10.0.0.2:51820"));
        (0..20u16)
            .map(|i| {
                let dst = format!("192.0.2.1:{}", 3000 + i);
                w.net.add_host(addr(&dst));
                if noise_through_another_nat {
                    w.seen_from(noisy, &dst);
                }
                w.seen_from(host, &dst).port()
            })
            .collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_ports() {
        assert_eq!(symmetric_ports(7, false), symmetric_ports(7, false));
        assert_ne!(symmetric_ports(7, false), symmetric_ports(8, false));
    }

    #[test]
    fn one_nats_traffic_does_not_move_another_nats_ports() {
        assert_eq!(symmetric_ports(7, false), symmetric_ports(7, true));
    }

    #[test]
    fn a_node_behind_a_nat_reaches_a_public_node_and_hears_back() {
        let mut sim = Sim::new(3);
        let nat = sim.net_mut().add_nat(port_restricted());
        let a = sim.add_node_behind(nat, "a", ip("100.72.0.1"), addr("10.0.0.2:51820"));
        let b = sim.add_node("b", ip("100.72.0.2"), addr("192.0.2.2:51820"));
        sim.connect(a, b);

        sim.send_probe(a, b, 1);
        sim.run_until(|s| s.probes_received(b, a) == [1], secs(10))
            .unwrap_or_else(|e| panic!("a's probe never arrived: {e}"));
        sim.send_probe(b, a, 2);
        sim.run_until(|s| s.probes_received(a, b) == [2], secs(10))
            .unwrap_or_else(|e| panic!("b's reply never arrived: {e}"));

        assert_eq!(sim.endpoint_of(b, a), Some(addr("203.0.113.1:51820")));
    }

    #[test]
    fn nodes_behind_one_nat_talk_over_their_private_addresses() {
        let mut sim = Sim::new(3);
        let nat = sim.net_mut().add_nat(port_restricted());
        let a = sim.add_node_behind(nat, "a", ip("100.72.0.1"), addr("10.0.0.2:51820"));
        let b = sim.add_node_behind(nat, "b", ip("100.72.0.2"), addr("10.0.0.3:51820"));
        sim.connect(a, b);

        sim.send_probe(a, b, 1);
        sim.run_until(|s| s.probes_received(b, a) == [1], secs(10))
            .unwrap_or_else(|e| panic!("a's probe never arrived: {e}"));

        assert_eq!(sim.net().nat(nat).stats().mappings_created, 0);
    }
}
