//! [`SimNet`]: an in-memory UDP network with seeded faults.
//!
//! No I/O. A host has one `SocketAddr`, either on the public internet or
//! in the private subnet behind a [`Nat`] (see `nat.rs`). A datagram leaves
//! its sender stamped with the sender's current address, translated by
//! each NAT it leaves through, crosses a link, and is handed to whichever
//! host holds the destination address *when it arrives*, after translation
//! by each NAT it enters through. So a datagram in flight to an address that
//! was just given up, or to a NAT mapping that has since expired, is lost,
//! as it is on a real network.
//!
//! Routing is by realm: a private address means something only behind its
//! own NAT. A host behind a NAT reaches the hosts of its subnet directly, by
//! private address; any other destination is reached through the NAT,
//! which then sends from its public side (and from there through an outer
//! NAT, if it sits behind one). A private address seen from outside its
//! subnet reaches nobody, even if some other subnet uses the same one.
//!
//! What it models, per directed link between two hosts or globally:
//!
//! - one-way latency, plus optional uniform jitter (which reorders);
//! - independent random loss with a given probability;
//! - a path MTU: a datagram whose IP packet (payload + IP and UDP headers)
//!   exceeds it is dropped and counted, as a router with DF set would;
//! - NAT rebinding ([`SimNet::rebind`]): a host's apparent address changes;
//!   its later datagrams come from the new address and datagrams to the
//!   new address reach it;
//! - spoofing ([`SimNet::inject`]): any bytes from any source address, for
//!   garbage, flood and replay tests;
//! - capture ([`SimNet::start_capture`]): what an on-path observer sees;
//! - NATs ([`SimNet::add_nat`], [`SimNet::add_host_behind`]): mapping,
//!   filtering, timeouts, hairpinning and 1:1 NAT per RFC 4787.
//!
//! Every random choice comes from ChaCha20 streams of the caller's seed:
//! one for loss and jitter, one per NAT for its ports. Datagrams due at the
//! same instant arrive in the order they were sent, so a seed fixes the
//! whole run.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::nat::{Nat, NatConfig, NatDrop, NatId, Realm};

/// IPv4 header (20) + UDP header (8).
const IPV4_UDP_OVERHEAD: usize = 28;
/// IPv6 header (40) + UDP header (8).
const IPV6_UDP_OVERHEAD: usize = 48;
/// NAT `i` draws its ports from stream `NAT_STREAMS + i` of the seed;
/// stream 0 is loss and jitter.
const NAT_STREAMS: u64 = 1;

/// A host on the simulated network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostId(usize);

impl HostId {
    pub fn index(self) -> usize {
        self.0
    }
}

/// The behaviour of a one-way link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkConfig {
    /// Fixed one-way delay.
    pub latency: Duration,
    /// Extra delay drawn uniformly from `0..=jitter` per datagram.
    pub jitter: Duration,
    /// Probability that a datagram is lost, `0.0..=1.0`.
    pub loss: f64,
    /// Path MTU in bytes, counting IP and UDP headers.
    pub mtu: usize,
}

impl LinkConfig {
    /// A lossless link with `latency` and a 1500-byte MTU (Ethernet).
    pub const fn with_latency(latency: Duration) -> Self {
        Self {
            latency,
            jitter: Duration::ZERO,
            loss: 0.0,
            mtu: 1500,
        }
    }

    pub fn loss(mut self, probability: f64) -> Self {
        assert!(
            (0.0..=1.0).contains(&probability),
            "loss is a probability, got {probability}"
        );
        self.loss = probability;
        self
    }

    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    pub fn mtu(mut self, mtu: usize) -> Self {
        self.mtu = mtu;
        self
    }
}

impl Default for LinkConfig {
    /// 10 ms one way, no loss, 1500-byte MTU: two nearby datacentres.
    fn default() -> Self {
        Self::with_latency(Duration::from_millis(10))
    }
}

/// One UDP datagram on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

/// A datagram that arrived at a host, addressed as that host sees it
/// (behind a NAT: to its private address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub to: HostId,
    pub datagram: Datagram,
}

/// A datagram as an on-path observer saw it enter its link: after the NATs
/// it left through translated its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub at: Instant,
    pub datagram: Datagram,
}

/// What happened to the datagrams handed to the network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Datagrams handed to the network (sent or injected).
    pub sent: u64,
    /// Datagrams that reached a host.
    pub delivered: u64,
    /// Dropped by random loss.
    pub lost: u64,
    /// Dropped for exceeding the path MTU.
    pub too_big: u64,
    /// Arrived at an address no host holds (any more).
    pub unroutable: u64,
    /// Dropped by a NAT: no mapping, filtered, not hairpinned, or no way
    /// out. [`Nat::stats`] says which.
    pub nat_dropped: u64,
}

impl NetStats {
    pub fn dropped(&self) -> u64 {
        self.lost + self.too_big + self.unroutable + self.nat_dropped
    }
}

/// A datagram on its way, ordered by arrival time, then by send order.
#[derive(Debug)]
struct InFlight {
    at: Instant,
    seq: u64,
    /// Where `datagram.dst` is to be looked up.
    realm: Realm,
    datagram: Datagram,
}

impl PartialEq for InFlight {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for InFlight {}

impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// A host's place on the network.
#[derive(Debug, Clone, Copy)]
struct Host {
    realm: Realm,
    addr: SocketAddr,
}

/// Where a datagram ends up.
#[derive(Debug)]
struct Arrival {
    to: HostId,
    /// The destination as the host sees it, after inbound NAT.
    dst: SocketAddr,
    /// Mappings the datagram refreshes (`inbound_refresh`) on delivery.
    refresh: Vec<(NatId, u16)>,
}

/// Why a datagram reaches nobody.
#[derive(Debug, Clone, Copy)]
enum Undeliverable {
    Unroutable,
    Nat(NatId, NatDrop),
}

/// The simulated network. See the module docs.
#[derive(Debug)]
pub struct SimNet {
    seed: u64,
    rng: ChaCha20Rng,
    default_link: LinkConfig,
    links: HashMap<(HostId, HostId), LinkConfig>,
    /// Each host's current address in its realm, by `HostId`.
    hosts: Vec<Host>,
    by_addr: HashMap<(Realm, SocketAddr), HostId>,
    nats: Vec<Nat>,
    /// Every NAT's external addresses, in the realm outside it.
    nat_at: HashMap<(Realm, IpAddr), NatId>,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    next_seq: u64,
    stats: NetStats,
    capture: Option<Vec<Captured>>,
}

impl SimNet {
    /// An empty network whose links all behave as `default_link` until
    /// told otherwise.
    pub fn new(seed: u64, default_link: LinkConfig) -> Self {
        Self {
            seed,
            rng: ChaCha20Rng::seed_from_u64(seed),
            default_link,
            links: HashMap::new(),
            hosts: Vec::new(),
            by_addr: HashMap::new(),
            nats: Vec::new(),
            nat_at: HashMap::new(),
            in_flight: BinaryHeap::new(),
            next_seq: 0,
            stats: NetStats::default(),
            capture: None,
        }
    }

    /// Attaches a host to the public internet at `addr`.
    ///
    /// # Panics
    ///
    /// When another host or a NAT already holds `addr` (a mistake in the
    /// test).
    pub fn add_host(&mut self, addr: SocketAddr) -> HostId {
        self.add_host_in(Realm::Public, addr)
    }

    /// Attaches a host behind `nat` at the private address `addr`.
    ///
    /// # Panics
    ///
    /// When `addr` is outside the NAT's subnet, or another host behind the
    /// same NAT already holds it.
    pub fn add_host_behind(&mut self, nat: NatId, addr: SocketAddr) -> HostId {
        self.add_host_in(Realm::Behind(nat), addr)
    }

    fn add_host_in(&mut self, realm: Realm, addr: SocketAddr) -> HostId {
        let id = HostId(self.hosts.len());
        self.claim(realm, addr, id);
        self.hosts.push(Host { realm, addr });
        id
    }

    /// Adds a NAT whose outside is the public internet.
    ///
    /// # Panics
    ///
    /// When one of its external addresses is already in use there, or a 1:1
    /// binding's private address is outside its subnet.
    pub fn add_nat(&mut self, config: NatConfig) -> NatId {
        self.add_nat_in(Realm::Public, config)
    }

    /// Adds a NAT whose outside is the subnet behind `outer`: a home router
    /// behind a carrier-grade NAT. Its external addresses are private
    /// addresses of `outer`'s subnet.
    ///
    /// # Panics
    ///
    /// As [`SimNet::add_nat`], and when an external address is outside
    /// `outer`'s subnet.
    pub fn add_nat_behind(&mut self, outer: NatId, config: NatConfig) -> NatId {
        self.add_nat_in(Realm::Behind(outer), config)
    }

    fn add_nat_in(&mut self, outside: Realm, config: NatConfig) -> NatId {
        let id = NatId(self.nats.len());
        for b in &config.one_to_one {
            assert!(
                config.subnet.contains(&b.private),
                "1:1 binding {} -> {} is outside the NAT's subnet {}",
                b.public,
                b.private,
                config.subnet
            );
        }
        for ip in config.external_ips() {
            self.check_routable(outside, ip);
            if let Some(holder) = self
                .by_addr
                .keys()
                .find(|(r, a)| *r == outside && a.ip() == ip)
            {
                panic!("{ip} is already a host's address ({})", holder.1);
            }
            if let Some(other) = self.nat_at.insert((outside, ip), id) {
                panic!("{ip} is already an external address of NAT {}", other.0);
            }
        }
        let mut rng = ChaCha20Rng::seed_from_u64(self.seed);
        rng.set_stream(NAT_STREAMS + id.0 as u64);
        self.nats.push(Nat::new(config, outside, rng));
        id
    }

    /// The address `host` has on its own network: the address every host
    /// sees it at if it is on the public internet, its private address if it
    /// is behind a NAT.
    pub fn addr(&self, host: HostId) -> SocketAddr {
        self.hosts[host.0].addr
    }

    /// The NAT `host` is directly behind, if any.
    pub fn nat_of(&self, host: HostId) -> Option<NatId> {
        match self.hosts[host.0].realm {
            Realm::Public => None,
            Realm::Behind(nat) => Some(nat),
        }
    }

    pub fn nat(&self, nat: NatId) -> &Nat {
        &self.nats[nat.0]
    }

    /// A NAT's state, to [`Nat::flush`] it.
    pub fn nat_mut(&mut self, nat: NatId) -> &mut Nat {
        &mut self.nats[nat.0]
    }

    /// The source address `dst` would see a datagram from `host` come from
    /// if it were sent at `now`: `host`'s own address if no NAT is on the
    /// way, its external address if every NAT on the way already has a live
    /// mapping for it, otherwise `None`. Changes nothing.
    pub fn apparent_addr(&self, host: HostId, dst: SocketAddr, now: Instant) -> Option<SocketAddr> {
        let Host {
            mut realm,
            addr: mut src,
        } = self.hosts[host.0];
        while let Some(nat) = self.exit_nat(realm, dst) {
            let nat = &self.nats[nat.0];
            src = nat.peek_outbound(src, dst, now)?;
            realm = nat.outside();
        }
        Some(src)
    }

    /// The host on the public internet at `addr`, if any (a NAT's external
    /// address is no host's).
    pub fn host_at(&self, addr: SocketAddr) -> Option<HostId> {
        self.by_addr.get(&(Realm::Public, addr)).copied()
    }

    /// NAT rebinding: `host` now appears at `new_addr`, on the same network
    /// as before. Its old address reaches nobody; datagrams already in
    /// flight to it are lost.
    ///
    /// # Panics
    ///
    /// When another host already holds `new_addr`, or `host` is behind a
    /// NAT and `new_addr` is outside its subnet.
    pub fn rebind(&mut self, host: HostId, new_addr: SocketAddr) {
        let Host { realm, addr: old } = self.hosts[host.0];
        self.by_addr.remove(&(realm, old));
        self.claim(realm, new_addr, host);
        self.hosts[host.0].addr = new_addr;
    }

    fn claim(&mut self, realm: Realm, addr: SocketAddr, host: HostId) {
        self.check_routable(realm, addr.ip());
        if let Some(nat) = self.nat_at.get(&(realm, addr.ip())) {
            panic!("{addr} is an external address of NAT {}", nat.0);
        }
        if let Some(holder) = self.by_addr.insert((realm, addr), host) {
            panic!("{addr} is already held by host {}", holder.0);
        }
    }

    /// Panics unless `ip` can be reached within `realm`.
    fn check_routable(&self, realm: Realm, ip: IpAddr) {
        if let Realm::Behind(nat) = realm {
            let subnet = self.nats[nat.0].config().subnet;
            assert!(
                subnet.contains(&ip),
                "{ip} is outside the subnet {subnet} behind NAT {}",
                nat.0
            );
        }
    }

    /// The NAT a datagram in `realm` leaves through to reach `dst`: the
    /// realm's own NAT, unless `dst` is in the realm's subnet.
    fn exit_nat(&self, realm: Realm, dst: SocketAddr) -> Option<NatId> {
        match realm {
            Realm::Public => None,
            Realm::Behind(nat) if self.nats[nat.0].config().subnet.contains(&dst.ip()) => None,
            Realm::Behind(nat) => Some(nat),
        }
    }

    /// The link every pair of hosts uses unless [`SimNet::set_link`] says
    /// otherwise; injected datagrams always use it.
    pub fn set_default_link(&mut self, link: LinkConfig) {
        self.default_link = link;
    }

    /// The link from `from` to `to` (one direction), whatever NATs lie
    /// between them.
    pub fn set_link(&mut self, from: HostId, to: HostId, link: LinkConfig) {
        self.links.insert((from, to), link);
    }

    /// The same link in both directions between `a` and `b`.
    pub fn set_links_between(&mut self, a: HostId, b: HostId, link: LinkConfig) {
        self.set_link(a, b, link);
        self.set_link(b, a, link);
    }

    /// The link a datagram from `from` to `to` would take now.
    pub fn link(&self, from: HostId, to: HostId) -> LinkConfig {
        self.links
            .get(&(from, to))
            .copied()
            .unwrap_or(self.default_link)
    }

    /// `host` sends `payload` to `dst`. It leaves from the host's current
    /// address, through every NAT between the host and `dst` (each creating
    /// or refreshing a mapping now), over the link to whoever `dst` would
    /// reach now.
    pub fn send(&mut self, from: HostId, dst: SocketAddr, payload: &[u8], now: Instant) {
        let Host {
            mut realm,
            addr: mut src,
        } = self.hosts[from.0];
        while let Some(nat) = self.exit_nat(realm, dst) {
            let nat = &mut self.nats[nat.0];
            match nat.outbound(src, dst, now) {
                Ok(external) => {
                    src = external;
                    realm = nat.outside();
                }
                Err(_) => {
                    // The NAT counted why.
                    self.stats.sent += 1;
                    self.stats.nat_dropped += 1;
                    return;
                }
            }
        }
        let link = match self.resolve(realm, src, dst, now) {
            Ok(arrival) => self.link(from, arrival.to),
            Err(_) => self.default_link,
        };
        self.transmit(link, realm, src, dst, payload, now);
    }

    /// A datagram from an arbitrary (possibly spoofed) source on the public
    /// internet, over the default link.
    pub fn inject(&mut self, src: SocketAddr, dst: SocketAddr, payload: &[u8], now: Instant) {
        let link = self.default_link;
        self.transmit(link, Realm::Public, src, dst, payload, now);
    }

    fn transmit(
        &mut self,
        link: LinkConfig,
        realm: Realm,
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
        now: Instant,
    ) {
        self.stats.sent += 1;
        let datagram = Datagram {
            src,
            dst,
            payload: payload.to_vec(),
        };
        if let Some(capture) = &mut self.capture {
            capture.push(Captured {
                at: now,
                datagram: datagram.clone(),
            });
        }
        let overhead = if dst.is_ipv4() {
            IPV4_UDP_OVERHEAD
        } else {
            IPV6_UDP_OVERHEAD
        };
        if payload.len() + overhead > link.mtu {
            self.stats.too_big += 1;
            return;
        }
        // Draw for loss and jitter on every datagram that reaches this
        // point, so changing one link's knobs never shifts another's draws.
        let lost = self.rng.gen::<f64>() < link.loss;
        let jitter_nanos = self
            .rng
            .gen_range(0..=link.jitter.as_nanos().min(u128::from(u64::MAX)) as u64);
        if lost {
            self.stats.lost += 1;
            return;
        }
        let at = now + link.latency + Duration::from_nanos(jitter_nanos);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.push(Reverse(InFlight {
            at,
            seq,
            realm,
            datagram,
        }));
    }

    /// Who a datagram from `src` to `dst` in `realm` reaches at `at`,
    /// entering through every NAT on the way in. Changes nothing.
    fn resolve(
        &self,
        mut realm: Realm,
        src: SocketAddr,
        mut dst: SocketAddr,
        at: Instant,
    ) -> Result<Arrival, Undeliverable> {
        let mut refresh = Vec::new();
        // Each round enters one NAT further in, and NATs nest only one way
        // (a NAT can only be put behind one that exists already).
        for _ in 0..=self.nats.len() {
            if let Some(&to) = self.by_addr.get(&(realm, dst)) {
                return Ok(Arrival { to, dst, refresh });
            }
            let Some(&nat) = self.nat_at.get(&(realm, dst.ip())) else {
                return Err(Undeliverable::Unroutable);
            };
            let inbound = self.nats[nat.0]
                .inbound(src, dst, at)
                .map_err(|why| Undeliverable::Nat(nat, why))?;
            refresh.extend(inbound.refresh.map(|port| (nat, port)));
            dst = inbound.to;
            realm = Realm::Behind(nat);
        }
        Err(Undeliverable::Unroutable)
    }

    /// When the next datagram arrives, if any is in flight.
    pub fn next_delivery(&self) -> Option<Instant> {
        self.in_flight.peek().map(|Reverse(f)| f.at)
    }

    /// The next datagram due at or before `now` that reaches a host, with
    /// its destination as that host sees it. Datagrams that reach nobody
    /// (unroutable, or dropped by a NAT as they arrive) are counted and
    /// skipped.
    pub fn pop_due(&mut self, now: Instant) -> Option<Delivery> {
        while self.in_flight.peek().is_some_and(|Reverse(f)| f.at <= now) {
            let Reverse(f) = self.in_flight.pop()?;
            let mut datagram = f.datagram;
            match self.resolve(f.realm, datagram.src, datagram.dst, f.at) {
                Ok(arrival) => {
                    for (nat, port) in arrival.refresh {
                        self.nats[nat.0].refresh_inbound(port, datagram.src, f.at);
                    }
                    self.stats.delivered += 1;
                    datagram.dst = arrival.dst;
                    return Some(Delivery {
                        to: arrival.to,
                        datagram,
                    });
                }
                Err(Undeliverable::Unroutable) => self.stats.unroutable += 1,
                Err(Undeliverable::Nat(nat, why)) => {
                    self.nats[nat.0].count(why);
                    self.stats.nat_dropped += 1;
                }
            }
        }
        None
    }

    /// Datagrams sent but not yet arrived (or found unroutable).
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Starts recording every datagram handed to the network from now on,
    /// including those later lost (but not those a NAT refused to let
    /// out).
    pub fn start_capture(&mut self) {
        self.capture.get_or_insert_with(Vec::new);
    }

    /// What was captured so far (empty unless capturing).
    pub fn captured(&self) -> &[Captured] {
        self.capture.as_deref().unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn start() -> Instant {
        crate::sim::SimClock::new().now()
    }

    #[test]
    fn datagrams_arrive_after_the_latency_from_the_senders_address() {
        let t0 = start();
        let mut net = SimNet::new(1, LinkConfig::with_latency(Duration::from_millis(5)));
        let a = net.add_host(addr("192.0.2.1:1"));
        let b = net.add_host(addr("192.0.2.2:2"));

        net.send(a, addr("192.0.2.2:2"), b"hi", t0);

        assert_eq!(net.next_delivery(), Some(t0 + Duration::from_millis(5)));
        assert_eq!(net.pop_due(t0 + Duration::from_millis(4)), None);
        let d = net.pop_due(t0 + Duration::from_millis(5)).unwrap();
        assert_eq!(d.to, b);
        assert_eq!(d.datagram.src, addr("192.0.2.1:1"));
        assert_eq!(d.datagram.payload, b"hi");
        assert_eq!(net.stats().delivered, 1);
    }

    #[test]
    fn datagrams_over_the_mtu_are_dropped_and_counted() {
        let t0 = start();
        let mut net = SimNet::new(1, LinkConfig::default().mtu(100));
        let a = net.add_host(addr("192.0.2.1:1"));
        net.add_host(addr("192.0.2.2:2"));

        net.send(a, addr("192.0.2.2:2"), &[0; 72], t0);
        net.send(a, addr("192.0.2.2:2"), &[0; 73], t0);

        assert_eq!(net.stats().too_big, 1);
        assert_eq!(net.in_flight(), 1);
    }

    #[test]
    fn after_rebinding_the_old_address_reaches_nobody_and_the_new_one_does() {
        let t0 = start();
        let later = t0 + Duration::from_secs(1);
        let mut net = SimNet::new(1, LinkConfig::default());
        let a = net.add_host(addr("192.0.2.1:1"));
        let b = net.add_host(addr("192.0.2.2:2"));
        net.send(a, addr("192.0.2.2:2"), b"in flight", t0);

        net.rebind(b, addr("198.51.100.2:4000"));
        net.send(a, addr("198.51.100.2:4000"), b"to new", t0);
        net.send(b, addr("192.0.2.1:1"), b"from new", t0);

        let first = net.pop_due(later).unwrap();
        assert_eq!(
            (first.to, first.datagram.payload.as_slice()),
            (b, &b"to new"[..])
        );
        let second = net.pop_due(later).unwrap();
        assert_eq!(second.datagram.src, addr("198.51.100.2:4000"));
        assert_eq!(net.pop_due(later), None);
        assert_eq!(net.stats().unroutable, 1);
    }

    #[test]
    fn the_same_seed_loses_the_same_datagrams() {
        let run = |seed| {
            let t0 = start();
            let mut net = SimNet::new(
                seed,
                LinkConfig::default()
                    .loss(0.5)
                    .jitter(Duration::from_millis(3)),
            );
            let a = net.add_host(addr("192.0.2.1:1"));
            net.add_host(addr("192.0.2.2:2"));
            for i in 0..100u8 {
                net.send(a, addr("192.0.2.2:2"), &[i], t0);
            }
            std::iter::from_fn(|| net.pop_due(t0 + Duration::from_secs(1)))
                .map(|d| d.datagram.payload[0])
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}
