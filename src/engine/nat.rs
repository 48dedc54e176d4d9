//! This node's NAT mapping behaviour (RFC 4787 §4.1), inferred from where
//! others see its one UDP socket.
//!
//! Pure. Every authenticated pong names the address the peer saw our ping
//! come from, and the rendezvous's welcome names the address it sees; each
//! is an observation by one destination. If two destinations saw the same
//! public IP with different ports, the NAT picks a port per destination
//! (endpoint-dependent: no peer can use what another observed). If several
//! saw the same address, the mapping is endpoint-independent. An
//! observation of one of our own interface addresses means no NAT at all.
//! Observations by peers on our private network (they see a private
//! address, from inside the NAT) say nothing about the NAT and are ignored,
//! and old ones expire, since NATs forget and re-map.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::identity::PublicKey;
use crate::wire::control::NatMapping;

/// Observations older than this no longer count: a NAT's UDP mapping
/// lives two minutes at least (RFC 4787 REQ-5), so an older one may have
/// been replaced.
pub const OBSERVATION_TTL: Duration = Duration::from_secs(120);
/// Observers remembered; the oldest is forgotten beyond this.
const MAX_OBSERVERS: usize = 32;

/// Who saw us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observer {
    /// The rendezvous's QUIC port.
    Rendezvous,
    /// The rendezvous's NAT-check port (`wire::reflect`).
    Reflector,
    Peer(PublicKey),
}

#[derive(Debug, Clone, Copy)]
struct Observation {
    observer: Observer,
    seen_at: SocketAddr,
    at: Instant,
}

/// Collects observations and derives the [`NatMapping`] from them.
#[derive(Debug, Clone, Default)]
pub struct MappingObserver {
    observations: Vec<Observation>,
}

impl MappingObserver {
    pub fn new() -> Self {
        Self::default()
    }

    /// `observer` saw our socket at `seen_at`. Private addresses (seen from
    /// inside our own network) are ignored.
    pub fn observe(&mut self, observer: Observer, seen_at: SocketAddr, now: Instant) {
        let seen_at = SocketAddr::new(seen_at.ip().to_canonical(), seen_at.port());
        if crate::engine::paths::is_private(seen_at.ip()) {
            return;
        }
        self.observations.retain(|o| o.observer != observer);
        if self.observations.len() >= MAX_OBSERVERS {
            if let Some(oldest) =
                (0..self.observations.len()).min_by_key(|&i| self.observations[i].at)
            {
                self.observations.remove(oldest);
            }
        }
        self.observations.push(Observation {
            observer,
            seen_at,
            at: now,
        });
    }

    /// The mapping behaviour the fresh observations show. `local` are the
    /// addresses on this node's own interfaces.
    pub fn mapping(&self, local: &[IpAddr], now: Instant) -> NatMapping {
        let fresh: Vec<SocketAddr> = self
            .observations
            .iter()
            .filter(|o| now.saturating_duration_since(o.at) < OBSERVATION_TTL)
            .map(|o| o.seen_at)
            .collect();
        // The mapping in question is IPv4's where anyone saw us over IPv4:
        // a peer that reaches a dual-stack node at its own global IPv6
        // address says nothing of the NAT its IPv4 sits behind.
        let over_ipv4 = fresh.iter().any(SocketAddr::is_ipv4);
        let fresh: Vec<SocketAddr> = fresh
            .into_iter()
            .filter(|a| a.is_ipv4() == over_ipv4)
            .collect();
        if fresh.iter().any(|a| local.contains(&a.ip())) {
            return NatMapping::None;
        }
        let differs = fresh.iter().any(|a| {
            fresh
                .iter()
                .any(|b| a.ip() == b.ip() && a.port() != b.port())
        });
        match fresh.len() {
            _ if differs => NatMapping::EndpointDependent,
            0 | 1 => NatMapping::Unknown,
            _ => NatMapping::EndpointIndependent,
        }
    }

    /// Whether the NAT keeps one port for the rendezvous's two ports (its
    /// QUIC port and its NAT-check port, which only ever answer) while a
    /// peer saw another port of the same address. A symmetric NAT gives
    /// the two rendezvous ports two ports; this NAT gave a peer another one
    /// because the peer's packet reached the router before this node had
    /// sent to the peer, and the router kept it as a flow of its own in the
    /// way of this node's mapping (Linux MASQUERADE without a firewall).
    pub fn remapped_for_peers(&self, now: Instant) -> bool {
        let fresh = |o: &&Observation| now.saturating_duration_since(o.at) < OBSERVATION_TTL;
        let seen_by = |who: Observer| {
            self.observations
                .iter()
                .filter(fresh)
                .find(|o| o.observer == who)
                .map(|o| o.seen_at)
        };
        let (Some(quic), Some(check)) =
            (seen_by(Observer::Rendezvous), seen_by(Observer::Reflector))
        else {
            return false;
        };
        quic == check
            && self.observations.iter().filter(fresh).any(|o| {
                matches!(o.observer, Observer::Peer(_))
                    && o.seen_at.ip() == quic.ip()
                    && o.seen_at.port() != quic.port()
            })
    }

    /// Where the observers saw us, most recent first: for diagnostics.
    pub fn seen_at(&self, now: Instant) -> Vec<(Observer, SocketAddr)> {
        let mut fresh: Vec<&Observation> = self
            .observations
            .iter()
            .filter(|o| now.saturating_duration_since(o.at) < OBSERVATION_TTL)
            .collect();
        fresh.sort_by_key(|o| std::cmp::Reverse(o.at));
        fresh.into_iter().map(|o| (o.observer, o.seen_at)).collect()
    }
}

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "a test starts its clock anywhere"
)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn peer(n: u8) -> Observer {
        Observer::Peer(PublicKey::from_bytes([n; 32]))
    }

    #[test]
    fn one_observation_is_not_enough() {
        let now = Instant::now();
        let mut o = MappingObserver::new();
        assert_eq!(o.mapping(&[], now), NatMapping::Unknown);
        o.observe(Observer::Rendezvous, addr("203.0.113.30:51820"), now);
        assert_eq!(o.mapping(&[], now), NatMapping::Unknown);
    }

    #[test]
    fn the_same_port_for_every_destination_is_endpoint_independent() {
        let now = Instant::now();
        let mut o = MappingObserver::new();
        o.observe(Observer::Rendezvous, addr("203.0.113.30:51820"), now);
        o.observe(peer(1), addr("203.0.113.30:51820"), now);
        assert_eq!(o.mapping(&[], now), NatMapping::EndpointIndependent);
    }

    #[test]
    fn a_port_per_destination_is_endpoint_dependent() {
        let now = Instant::now();
        let mut o = MappingObserver::new();
        o.observe(Observer::Rendezvous, addr("203.0.113.41:3947"), now);
        o.observe(peer(1), addr("203.0.113.41:60260"), now);
        assert_eq!(o.mapping(&[], now), NatMapping::EndpointDependent);
    }

    #[test]
    fn being_seen_at_an_own_address_means_no_nat() {
        let now = Instant::now();
        let mut o = MappingObserver::new();
        o.observe(Observer::Rendezvous, addr("203.0.113.11:51820"), now);
        assert_eq!(
            o.mapping(&["203.0.113.11".parse().unwrap()], now),
            NatMapping::None
        );
    }

    #[test]
    fn a_peer_seeing_us_at_our_own_ipv6_address_says_nothing_of_the_ipv4_nat() {
        let now = Instant::now();
        let own6: IpAddr = "2001:db8:43::2".parse().unwrap();
        let mut o = MappingObserver::new();
        o.observe(Observer::Rendezvous, addr("203.0.113.43:3947"), now);
        o.observe(Observer::Reflector, addr("203.0.113.43:11230"), now);
        o.observe(peer(1), addr("[2001:db8:43::2]:51820"), now);
        assert_eq!(o.mapping(&[own6], now), NatMapping::EndpointDependent);
        // With only IPv6 seen, IPv6 is what there is to judge.
        let mut v6 = MappingObserver::new();
        v6.observe(peer(1), addr("[2001:db8:43::2]:51820"), now);
        assert_eq!(v6.mapping(&[own6], now), NatMapping::None);
    }

    #[test]
    fn private_observations_and_old_ones_do_not_count() {
        let now = Instant::now();
        let mut o = MappingObserver::new();
        o.observe(Observer::Rendezvous, addr("203.0.113.50:9915"), now);
        o.observe(peer(2), addr("192.168.50.12:51820"), now);
        assert_eq!(
            o.mapping(&[], now),
            NatMapping::Unknown,
            "a LAN peer sees us from inside"
        );
        o.observe(peer(1), addr("203.0.113.50:51820"), now);
        assert_eq!(o.mapping(&[], now), NatMapping::EndpointDependent);
        assert_eq!(
            o.mapping(&[], now + OBSERVATION_TTL),
            NatMapping::Unknown,
            "all expired"
        );
    }

    #[test]
    fn one_port_for_both_rendezvous_ports_and_another_for_a_peer_is_a_remapped_cone() {
        let now = Instant::now();
        let mut o = MappingObserver::new();
        o.observe(Observer::Rendezvous, addr("203.0.113.31:51820"), now);
        o.observe(Observer::Reflector, addr("203.0.113.31:51820"), now);
        o.observe(peer(1), addr("203.0.113.31:51820"), now);
        assert!(!o.remapped_for_peers(now), "every observer agrees: a cone");
        o.observe(peer(2), addr("203.0.113.31:2095"), now);
        assert!(o.remapped_for_peers(now));
        assert_eq!(o.mapping(&[], now), NatMapping::EndpointDependent);
        // A symmetric NAT: the rendezvous's two ports already disagree.
        let mut s = MappingObserver::new();
        s.observe(Observer::Rendezvous, addr("203.0.113.41:3947"), now);
        s.observe(Observer::Reflector, addr("203.0.113.41:11230"), now);
        s.observe(peer(2), addr("203.0.113.41:60260"), now);
        assert!(!s.remapped_for_peers(now));
        assert!(
            !o.remapped_for_peers(now + OBSERVATION_TTL),
            "old observations do not count"
        );
    }

    #[test]
    fn a_new_observation_replaces_the_observers_last_and_the_list_is_bounded() {
        let now = Instant::now();
        let mut o = MappingObserver::new();
        o.observe(Observer::Rendezvous, addr("203.0.113.41:1000"), now);
        o.observe(Observer::Rendezvous, addr("203.0.113.41:2000"), now);
        assert_eq!(o.seen_at(now).len(), 1);
        for n in 0..100 {
            o.observe(
                peer(n),
                addr("203.0.113.41:2000"),
                now + Duration::from_millis(u64::from(n)),
            );
        }
        assert!(o.observations.len() <= MAX_OBSERVERS);
        assert_eq!(
            o.mapping(&[], now + Duration::from_secs(1)),
            NatMapping::EndpointIndependent
        );
    }
}
