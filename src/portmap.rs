//! Port mapping on the node's gateway — PCP (RFC 6887), NAT-PMP (RFC 6886)
//! and UPnP IGD — decided here: when to probe the gateway, when to renew a
//! mapping, how long to wait when nothing answers, and which answers to
//! believe. The mapped address becomes a candidate (`advertised`, marked
//! `mapped`, proto/control.md), so that peers can reach a node behind a NAT
//! that would otherwise pick a new port for every destination.
//!
//! Pure: the shell (`dataplane::portmap`) speaks the protocols, reads the
//! clock and the routing table, and hands the results in with `now`;
//! [`Mapper`] says what to do next and when ([`Mapper::poll_action`],
//! [`Mapper::poll_timeout`]).
//!
//! A gateway is a stranger on the LAN as far as this code goes: its answer
//! is believed only if the external address could be a peer's endpoint at
//! all ([`check_external`]); a refused answer is counted and treated as no
//! mapping. Lifetimes are clamped, so that a gateway granting one second
//! cannot make the node renew in a loop, nor one granting years keep a
//! dead mapping announced.

// Pure: the clock and randomness are inputs (clippy.toml names what is
// forbidden).
#![deny(clippy::disallowed_methods)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::wire::control::MappingProtocol;
use crate::wire::endpoint::{unusable, Unusable};

/// The first wait after a probe that found no mapping; doubled after each
/// such probe up to [`PROBE_BACKOFF_MAX`]. A network change starts over.
pub const PROBE_BACKOFF_MIN: Duration = Duration::from_secs(30);
/// The longest wait between probes of a gateway that does not map.
pub const PROBE_BACKOFF_MAX: Duration = Duration::from_secs(30 * 60);
/// The lifetime asked for (RFC 6886 §3.3 recommends two hours).
pub const REQUESTED_LIFETIME: Duration = Duration::from_secs(2 * 60 * 60);
/// A granted lifetime below this is taken as this: renewing at half of it
/// is the most often a gateway can make the node ask.
pub const MIN_LIFETIME: Duration = Duration::from_secs(20);
/// A granted lifetime above this (UPnP's 0, "forever", included) is taken
/// as this: the mapping is confirmed at least every half of it.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// After a failed renewal, the next try comes this soon (or at the expiry,
/// if sooner).
pub const RENEW_RETRY: Duration = Duration::from_secs(5);

/// Why a gateway's external address is not believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No peer could use it (loopback, unspecified, port 0…): the one rule
    /// of [`crate::wire::endpoint::unusable`].
    Unusable(Unusable),
    /// A private or shared address (RFC 1918, RFC 6598's carrier-grade NAT
    /// space, IPv6 ULA): the gateway is itself behind another NAT, and the
    /// mapping reaches no further than that NAT's inside.
    Private,
    /// Inside the mesh's own overlay prefixes: packets to it would go into
    /// the tunnel.
    InMesh,
}

impl Refusal {
    /// Plain words for operators.
    pub fn describe(self) -> &'static str {
        match self {
            Refusal::Unusable(_) => "an address no peer can use",
            Refusal::Private => "a private address (the gateway is behind another NAT)",
            Refusal::InMesh => "an address inside the mesh's overlay prefixes",
        }
    }
}

/// Whether `external`, a gateway's answer, may be announced as this node's
/// address: `Err` says why not.
pub fn check_external(external: SocketAddr, mesh: &[IpNet]) -> Result<(), Refusal> {
    if let Some(why) = unusable(external) {
        return Err(Refusal::Unusable(why));
    }
    let ip = external.ip().to_canonical();
    if mesh.iter().any(|net| net.contains(&ip)) {
        return Err(Refusal::InMesh);
    }
    let private = match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private() || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    };
    if private {
        return Err(Refusal::Private);
    }
    Ok(())
}

/// The IPv4 default gateway in `/proc/net/route`'s text: the default route
/// (destination and mask 0) that is up and has a gateway, the lowest metric
/// first. Lines that do not parse are skipped.
pub fn default_gateway(route_table: &str) -> Option<Ipv4Addr> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    route_table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let hex = |i: usize| u32::from_str_radix(fields.get(i)?, 16).ok();
            let (destination, gateway, flags, metric, mask) = (
                hex(1)?,
                hex(2)?,
                hex(3)?,
                fields.get(6)?.parse::<u32>().ok()?,
                hex(7)?,
            );
            let default = destination == 0 && mask == 0 && gateway != 0;
            // The kernel prints the address as a number in host byte order.
            (default && flags & (RTF_UP | RTF_GATEWAY) == RTF_UP | RTF_GATEWAY)
                .then(|| (metric, Ipv4Addr::from(gateway.to_ne_bytes())))
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, gateway)| gateway)
}

/// A mapping the gateway granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub protocol: MappingProtocol,
    /// Where the internet reaches the node's UDP port.
    pub external: SocketAddr,
    /// The lifetime the gateway granted.
    pub lifetime: Duration,
}

/// Which protocols the gateway answered on the last probe.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Answered {
    pub pcp: bool,
    pub nat_pmp: bool,
    pub upnp: bool,
}

impl Answered {
    /// The protocols that answered, in the order they are preferred.
    pub fn protocols(self) -> Vec<MappingProtocol> {
        [
            (self.pcp, MappingProtocol::Pcp),
            (self.nat_pmp, MappingProtocol::NatPmp),
            (self.upnp, MappingProtocol::Upnp),
        ]
        .into_iter()
        .filter_map(|(answered, p)| answered.then_some(p))
        .collect()
    }
}

/// What one probe of the gateway found: who answered, and the mapping the
/// best of them granted (or why none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// The default gateway probed; `None` when the node has none.
    pub gateway: Option<IpAddr>,
    pub answered: Answered,
    pub mapping: Result<Mapping, String>,
}

/// What the shell should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Probe the default gateway with every protocol and map the port with
    /// the best that answers; then [`Mapper::handle_probe`].
    Probe,
    /// Ask the gateway to extend `Mapping`; then [`Mapper::handle_renewal`].
    Renew(Mapping),
}

/// Why [`Mapper::poll_timeout`] wants to be woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    Probe,
    Renew,
    Expiry,
    /// A request is in flight: its answer wakes the mapper, not the clock.
    Answer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No mapping; probe at `at`.
    Idle { at: Instant },
    /// A probe is in flight.
    Probing,
    /// Mapped until `expires`; renew at `renew_at` (a renewal is in flight
    /// while `renewing`).
    Mapped {
        mapping: Mapping,
        renew_at: Instant,
        expires: Instant,
        renewing: bool,
    },
}

/// The port mapper's state: one mapping of the node's UDP port on its
/// default gateway, or none.
#[derive(Debug, Clone)]
pub struct Mapper {
    state: State,
    /// The wait after the next probe that finds no mapping.
    backoff: Duration,
    /// The mesh's overlay prefixes, refused as external addresses.
    mesh: Vec<IpNet>,
    /// What the last probe found.
    gateway: Option<IpAddr>,
    answered: Answered,
    /// Why the last probe or renewal left the node without a mapping.
    last_error: Option<String>,
    /// Gateway answers not believed ([`check_external`]).
    refused: u64,
}

impl Mapper {
    /// A mapper that probes at once.
    pub fn new(now: Instant) -> Self {
        Self {
            state: State::Idle { at: now },
            backoff: PROBE_BACKOFF_MIN,
            mesh: Vec::new(),
            gateway: None,
            answered: Answered::default(),
            last_error: None,
            refused: 0,
        }
    }

    /// The mesh's overlay prefixes, once known: an external address inside
    /// them is refused.
    pub fn set_mesh(&mut self, mesh: Vec<IpNet>) {
        self.mesh = mesh;
    }

    /// The default gateway or the node's address towards it changed: any
    /// mapping was made on the old network. Probe now, with a fresh backoff.
    pub fn handle_network_change(&mut self, now: Instant) {
        self.state = State::Idle { at: now };
        self.backoff = PROBE_BACKOFF_MIN;
    }

    /// What to do at `now`, if anything; marks the request as in flight.
    pub fn poll_action(&mut self, now: Instant) -> Option<Action> {
        self.expire(now);
        match &mut self.state {
            State::Idle { at } if *at <= now => {
                self.state = State::Probing;
                Some(Action::Probe)
            }
            State::Mapped {
                mapping,
                renew_at,
                renewing,
                ..
            } if !*renewing && *renew_at <= now => {
                *renewing = true;
                Some(Action::Renew(*mapping))
            }
            State::Idle { .. } | State::Probing | State::Mapped { .. } => None,
        }
    }

    /// When to call [`Mapper::poll_action`] next, and why.
    pub fn poll_timeout(&self) -> Option<(Instant, Wake)> {
        match self.state {
            State::Idle { at } => Some((at, Wake::Probe)),
            State::Probing => None,
            State::Mapped {
                renew_at,
                expires,
                renewing,
                ..
            } => Some(if renewing {
                (expires, Wake::Expiry)
            } else {
                (renew_at.min(expires), Wake::Renew)
            }),
        }
    }

    /// The answer to [`Action::Probe`].
    pub fn handle_probe(&mut self, result: ProbeResult, now: Instant) {
        self.gateway = result.gateway;
        self.answered = result.answered;
        match self.believe(result.mapping) {
            Ok(mapping) => {
                self.backoff = PROBE_BACKOFF_MIN;
                self.last_error = None;
                self.map(mapping, now);
            }
            Err(why) => {
                self.last_error = Some(why);
                self.state = State::Idle {
                    at: now + self.backoff,
                };
                self.backoff = (self.backoff * 2).min(PROBE_BACKOFF_MAX);
            }
        }
    }

    /// The answer to [`Action::Renew`]. A failed renewal keeps the mapping
    /// until it expires, trying again every [`RENEW_RETRY`].
    pub fn handle_renewal(&mut self, result: Result<Mapping, String>, now: Instant) {
        let State::Mapped { expires, .. } = self.state else {
            // The network changed meanwhile: the answer is for the old one.
            return;
        };
        match self.believe(result) {
            Ok(mapping) => {
                self.last_error = None;
                self.map(mapping, now);
            }
            Err(why) => {
                self.last_error = Some(why);
                if let State::Mapped {
                    renew_at, renewing, ..
                } = &mut self.state
                {
                    *renew_at = (now + RENEW_RETRY).min(expires);
                    *renewing = false;
                }
                self.expire(now);
            }
        }
    }

    /// The mapping peers may use now: granted, believed and not expired.
    pub fn mapping(&self, now: Instant) -> Option<Mapping> {
        match self.state {
            State::Mapped {
                mapping, expires, ..
            } if now < expires => Some(mapping),
            State::Idle { .. } | State::Probing | State::Mapped { .. } => None,
        }
    }

    /// The mapping to remove on the way out (even one past its expiry: the
    /// gateway may still hold it).
    pub fn to_remove(&self) -> Option<Mapping> {
        match self.state {
            State::Mapped { mapping, .. } => Some(mapping),
            State::Idle { .. } | State::Probing => None,
        }
    }

    /// What the mapper knows, for `meshctl status` and `netcheck`.
    pub fn info(&self, now: Instant) -> crate::control::PortMappingInfo {
        let mapping = self.mapping(now);
        crate::control::PortMappingInfo {
            gateway: self.gateway,
            answered: self.answered.protocols(),
            protocol: mapping.map(|m| m.protocol),
            external: mapping.map(|m| m.external),
            lifetime_s: mapping.map(|m| m.lifetime.as_secs()),
            error: self.last_error.clone(),
        }
    }

    /// Gateway answers refused so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// `result` if its external address passes [`check_external`], its
    /// lifetime clamped; otherwise why not (and counted).
    fn believe(&mut self, result: Result<Mapping, String>) -> Result<Mapping, String> {
        let mut mapping = result?;
        if let Err(why) = check_external(mapping.external, &self.mesh) {
            self.refused += 1;
            return Err(format!(
                "the gateway's {} answer {} is {}: not announced",
                mapping.protocol,
                mapping.external,
                why.describe()
            ));
        }
        mapping.lifetime = mapping.lifetime.clamp(MIN_LIFETIME, MAX_LIFETIME);
        Ok(mapping)
    }

    /// Mapped now: renew at half the lifetime (RFC 6886 §3.3, RFC 6887
    /// §11.2.1 renew well before the end).
    fn map(&mut self, mapping: Mapping, now: Instant) {
        self.state = State::Mapped {
            mapping,
            renew_at: now + mapping.lifetime / 2,
            expires: now + mapping.lifetime,
            renewing: false,
        };
    }

    /// A mapping past its expiry is gone: probe again at once (the
    /// gateway may have restarted, or another one took over).
    fn expire(&mut self, now: Instant) {
        if let State::Mapped {
            expires, renewing, ..
        } = self.state
        {
            if now >= expires && !renewing {
                if self.last_error.is_none() {
                    self.last_error = Some("the mapping expired without a renewal".into());
                }
                self.state = State::Idle { at: now };
            }
        }
    }
}

// A test takes one start instant from the clock; everything after it is
// that instant plus a duration, and the code under test never reads a clock.
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn mapping(external: &str, lifetime_s: u64) -> Mapping {
        Mapping {
            protocol: MappingProtocol::Pcp,
            external: external.parse().unwrap(),
            lifetime: Duration::from_secs(lifetime_s),
        }
    }

    fn granted(m: Mapping) -> ProbeResult {
        ProbeResult {
            gateway: Some("10.70.0.1".parse().unwrap()),
            answered: Answered {
                pcp: true,
                nat_pmp: true,
                upnp: false,
            },
            mapping: Ok(m),
        }
    }

    fn silence() -> ProbeResult {
        ProbeResult {
            gateway: Some("10.70.0.1".parse().unwrap()),
            answered: Answered::default(),
            mapping: Err("nothing answered".into()),
        }
    }

    #[test]
    fn a_granted_mapping_is_renewed_at_half_its_lifetime() {
        let t0 = Instant::now();
        let mut mapper = Mapper::new(t0);
        assert_eq!(mapper.poll_action(t0), Some(Action::Probe));
        assert_eq!(mapper.poll_action(t0), None, "one probe at a time");
        let m = mapping("203.0.113.70:51820", 60);
        mapper.handle_probe(granted(m), t0);

        assert_eq!(mapper.mapping(t0), Some(m));
        assert_eq!(
            mapper.poll_timeout(),
            Some((t0 + Duration::from_secs(30), Wake::Renew))
        );
        assert_eq!(mapper.poll_action(t0 + Duration::from_secs(29)), None);
        let t30 = t0 + Duration::from_secs(30);
        assert_eq!(mapper.poll_action(t30), Some(Action::Renew(m)));
        mapper.handle_renewal(Ok(m), t30);
        assert_eq!(
            mapper.poll_timeout(),
            Some((t30 + Duration::from_secs(30), Wake::Renew))
        );
        assert_eq!(mapper.mapping(t0 + Duration::from_secs(89)), Some(m));
        let info = mapper.info(t30);
        assert_eq!(
            info.answered,
            vec![MappingProtocol::Pcp, MappingProtocol::NatPmp]
        );
        assert_eq!(info.external, Some(m.external));
        assert_eq!(info.lifetime_s, Some(60));
    }

    #[test]
    fn a_failed_renewal_is_retried_and_the_mapping_ends_at_its_expiry() {
        let t0 = Instant::now();
        let mut mapper = Mapper::new(t0);
        mapper.poll_action(t0);
        mapper.handle_probe(granted(mapping("203.0.113.70:51820", 60)), t0);
        let t30 = t0 + Duration::from_secs(30);
        assert!(matches!(mapper.poll_action(t30), Some(Action::Renew(_))));
        mapper.handle_renewal(Err("no answer".into()), t30);
        assert!(mapper.mapping(t30).is_some(), "kept until it expires");
        assert_eq!(
            mapper.poll_timeout(),
            Some((t30 + RENEW_RETRY, Wake::Renew))
        );
        // Every retry fails, up to the expiry; then the gateway is probed again.
        let t60 = t0 + Duration::from_secs(60);
        let mut renewals = 1;
        loop {
            let (at, _) = mapper.poll_timeout().unwrap();
            assert!(at <= t60, "never past the expiry");
            match mapper.poll_action(at) {
                Some(Action::Renew(_)) => {
                    renewals += 1;
                    mapper.handle_renewal(Err("no answer".into()), at);
                }
                Some(Action::Probe) => {
                    assert_eq!(at, t60, "probed again at the expiry");
                    break;
                }
                None => panic!("woken for nothing at {at:?}"),
            }
        }
        assert_eq!(
            renewals, 6,
            "at 30 s, then every 5 s until the expiry at 60 s"
        );
        assert_eq!(mapper.mapping(t60), None, "gone at its expiry");
    }

    #[test]
    fn nothing_answering_backs_off_to_half_an_hour_and_a_network_change_starts_over() {
        let t0 = Instant::now();
        let mut mapper = Mapper::new(t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..10 {
            assert_eq!(mapper.poll_action(now), Some(Action::Probe));
            mapper.handle_probe(silence(), now);
            let (at, why) = mapper.poll_timeout().unwrap();
            assert_eq!(why, Wake::Probe);
            waits.push((at - now).as_secs());
            now = at;
        }
        assert_eq!(waits, [30, 60, 120, 240, 480, 960, 1800, 1800, 1800, 1800]);
        mapper.handle_network_change(now);
        assert_eq!(mapper.poll_action(now), Some(Action::Probe));
        mapper.handle_probe(silence(), now);
        assert_eq!(
            mapper.poll_timeout(),
            Some((now + PROBE_BACKOFF_MIN, Wake::Probe))
        );
    }

    #[test]
    fn lifetimes_are_clamped_so_a_gateway_cannot_make_the_node_renew_in_a_loop() {
        let t0 = Instant::now();
        let mut mapper = Mapper::new(t0);
        mapper.poll_action(t0);
        mapper.handle_probe(granted(mapping("203.0.113.70:51820", 0)), t0);
        assert_eq!(
            mapper.poll_timeout(),
            Some((t0 + MIN_LIFETIME / 2, Wake::Renew))
        );

        let mut mapper = Mapper::new(t0);
        mapper.poll_action(t0);
        mapper.handle_probe(granted(mapping("203.0.113.70:51820", u32::MAX.into())), t0);
        assert_eq!(
            mapper.poll_timeout(),
            Some((t0 + MAX_LIFETIME / 2, Wake::Renew))
        );
    }

    #[test]
    fn external_addresses_that_no_peer_could_use_are_refused() {
        let mesh: Vec<IpNet> = vec![
            "100.72.0.0/16".parse().unwrap(),
            "fd7a:1:2::/48".parse().unwrap(),
        ];
        let check = |s: &str| check_external(s.parse().unwrap(), &mesh);
        assert_eq!(check("203.0.113.70:51820"), Ok(()));
        assert_eq!(check("[2001:db8::70]:51820"), Ok(()));
        assert_eq!(
            check("127.0.0.1:51820"),
            Err(Refusal::Unusable(Unusable::Loopback))
        );
        assert_eq!(
            check("0.0.0.0:51820"),
            Err(Refusal::Unusable(Unusable::Unspecified))
        );
        assert_eq!(
            check("203.0.113.70:0"),
            Err(Refusal::Unusable(Unusable::PortZero))
        );
        assert_eq!(
            check("224.0.0.1:51820"),
            Err(Refusal::Unusable(Unusable::Multicast))
        );
        assert_eq!(
            check("[::ffff:127.0.0.1]:51820"),
            Err(Refusal::Unusable(Unusable::Loopback))
        );
        assert_eq!(check("10.1.2.3:51820"), Err(Refusal::Private));
        assert_eq!(check("192.168.1.1:51820"), Err(Refusal::Private));
        assert_eq!(check("172.16.0.1:51820"), Err(Refusal::Private));
        assert_eq!(check("100.64.0.1:51820"), Err(Refusal::Private));
        assert_eq!(check("[fd00::1]:51820"), Err(Refusal::Private));
        assert_eq!(check("100.72.0.9:51820"), Err(Refusal::InMesh));
        assert_eq!(check("[fd7a:1:2::9]:51820"), Err(Refusal::InMesh));
    }

    #[test]
    fn the_default_gateway_is_read_from_the_route_table() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t0000460A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth1\t00000000\t0101A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
                     eth0\t00000000\t0100460A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                     garbage line\n";
        let expected = Ipv4Addr::from(u32::from_str_radix("0100460A", 16).unwrap().to_ne_bytes());
        assert_eq!(default_gateway(table), Some(expected));
        if cfg!(target_endian = "little") {
            assert_eq!(expected, Ipv4Addr::new(10, 70, 0, 1));
        }
        assert_eq!(default_gateway("Iface\tDestination\n"), None);
    }

    /// A gateway on the LAN answers with the loopback address, then with an
    /// address inside the mesh: neither is announced, both are counted,
    /// and a mapping already held survives a refused renewal until expiry.
    #[test]
    fn a_malicious_gateway_answer_is_refused_counted_and_never_announced() {
        let t0 = Instant::now();
        let mut mapper = Mapper::new(t0);
        mapper.set_mesh(vec!["100.72.0.0/16".parse().unwrap()]);
        mapper.poll_action(t0);
        mapper.handle_probe(granted(mapping("127.0.0.1:22", 60)), t0);
        assert_eq!(mapper.mapping(t0), None);
        assert_eq!(mapper.refused(), 1);
        let info = mapper.info(t0);
        assert!(info.external.is_none());
        assert!(info.error.unwrap().contains("127.0.0.1:22"));

        let t30 = t0 + PROBE_BACKOFF_MIN;
        assert_eq!(mapper.poll_action(t30), Some(Action::Probe));
        let good = mapping("203.0.113.70:51820", 60);
        mapper.handle_probe(granted(good), t30);
        let t60 = t30 + Duration::from_secs(30);
        assert_eq!(mapper.poll_action(t60), Some(Action::Renew(good)));
        mapper.handle_renewal(Ok(mapping("100.72.0.5:51820", 60)), t60);
        assert_eq!(mapper.refused(), 2);
        assert_eq!(
            mapper.mapping(t60),
            Some(good),
            "the believed mapping stays"
        );
        assert_eq!(
            mapper.mapping(t30 + Duration::from_secs(60)),
            None,
            "until its expiry"
        );
    }
}
