//! [`SimNet`]: an in-memory UDP network with seeded faults.
//!
//! No I/O. Hosts are named by the `SocketAddr` the rest of the network sees
//! them at. A datagram leaves its sender stamped with the sender's current
//! address, crosses a link, and is handed to whichever host holds the
//! destination address *when it arrives*, so a datagram in flight to an
//! address that was just given up is lost, as it is behind a real NAT whose
//! mapping changed.
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
//! - capture ([`SimNet::start_capture`]): what an on-path observer sees.
//!
//! Every random choice comes from one ChaCha20 stream seeded by the caller,
//! and datagrams due at the same instant arrive in the order they were sent,
//! so a seed fixes the whole run.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// IPv4 header (20) + UDP header (8).
const IPV4_UDP_OVERHEAD: usize = 28;
/// IPv6 header (40) + UDP header (8).
const IPV6_UDP_OVERHEAD: usize = 48;

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

/// A datagram that arrived at a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub to: HostId,
    pub datagram: Datagram,
}

/// A datagram as an on-path observer saw it leave its sender.
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
}

impl NetStats {
    pub fn dropped(&self) -> u64 {
        self.lost + self.too_big + self.unroutable
    }
}

/// A datagram on its way, ordered by arrival time, then by send order.
#[derive(Debug)]
struct InFlight {
    at: Instant,
    seq: u64,
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

/// The simulated network. See the module docs.
#[derive(Debug)]
pub struct SimNet {
    rng: ChaCha20Rng,
    default_link: LinkConfig,
    links: HashMap<(HostId, HostId), LinkConfig>,
    /// Each host's current apparent address, by `HostId`.
    hosts: Vec<SocketAddr>,
    by_addr: HashMap<SocketAddr, HostId>,
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
            rng: ChaCha20Rng::seed_from_u64(seed),
            default_link,
            links: HashMap::new(),
            hosts: Vec::new(),
            by_addr: HashMap::new(),
            in_flight: BinaryHeap::new(),
            next_seq: 0,
            stats: NetStats::default(),
            capture: None,
        }
    }

    /// Attaches a host at `addr`.
    ///
    /// # Panics
    ///
    /// When another host already holds `addr` (a mistake in the test).
    pub fn add_host(&mut self, addr: SocketAddr) -> HostId {
        let id = HostId(self.hosts.len());
        self.claim(addr, id);
        self.hosts.push(addr);
        id
    }

    /// The address other hosts see `host` at.
    pub fn addr(&self, host: HostId) -> SocketAddr {
        self.hosts[host.0]
    }

    /// The host holding `addr`, if any.
    pub fn host_at(&self, addr: SocketAddr) -> Option<HostId> {
        self.by_addr.get(&addr).copied()
    }

    /// NAT rebinding: `host` now appears at `new_addr`. Its old address
    /// reaches nobody; datagrams already in flight to it are lost.
    ///
    /// # Panics
    ///
    /// When another host already holds `new_addr`.
    pub fn rebind(&mut self, host: HostId, new_addr: SocketAddr) {
        let old = self.hosts[host.0];
        self.by_addr.remove(&old);
        self.claim(new_addr, host);
        self.hosts[host.0] = new_addr;
    }

    fn claim(&mut self, addr: SocketAddr, host: HostId) {
        if let Some(holder) = self.by_addr.insert(addr, host) {
            panic!("{addr} is already held by host {}", holder.0);
        }
    }

    /// The link every pair of hosts uses unless [`SimNet::set_link`] says
    /// otherwise; injected datagrams always use it.
    pub fn set_default_link(&mut self, link: LinkConfig) {
        self.default_link = link;
    }

    /// The link from `from` to `to` (one direction).
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

    /// `host` sends `payload` to `dst`; it leaves from the host's current
    /// address over the link to whoever holds `dst` now.
    pub fn send(&mut self, from: HostId, dst: SocketAddr, payload: &[u8], now: Instant) {
        let link = match self.host_at(dst) {
            Some(to) => self.link(from, to),
            None => self.default_link,
        };
        let src = self.hosts[from.0];
        self.transmit(link, src, dst, payload, now);
    }

    /// A datagram from an arbitrary (possibly spoofed) source, over the
    /// default link.
    pub fn inject(&mut self, src: SocketAddr, dst: SocketAddr, payload: &[u8], now: Instant) {
        let link = self.default_link;
        self.transmit(link, src, dst, payload, now);
    }

    fn transmit(
        &mut self,
        link: LinkConfig,
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
        self.in_flight.push(Reverse(InFlight { at, seq, datagram }));
    }

    /// When the next datagram arrives, if any is in flight.
    pub fn next_delivery(&self) -> Option<Instant> {
        self.in_flight.peek().map(|Reverse(f)| f.at)
    }

    /// The next datagram due at or before `now` that reaches a host.
    /// Datagrams to addresses nobody holds are counted and skipped.
    pub fn pop_due(&mut self, now: Instant) -> Option<Delivery> {
        while self.in_flight.peek().is_some_and(|Reverse(f)| f.at <= now) {
            let Reverse(f) = self.in_flight.pop()?;
            match self.host_at(f.datagram.dst) {
                Some(to) => {
                    self.stats.delivered += 1;
                    return Some(Delivery {
                        to,
                        datagram: f.datagram,
                    });
                }
                None => self.stats.unroutable += 1,
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
    /// including those later lost.
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
