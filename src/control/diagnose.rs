//! Why a peer is relayed, in plain words. Pure: the two sides' NAT mapping
//! behaviour and what probing each candidate found in, one sentence out.
//!
//! The reasoning follows RFC 4787: a hole can be punched when at least one
//! side's NAT keeps one public port for every destination
//! (endpoint-independent mapping), because then the other side knows where
//! to aim. Two endpoint-dependent ("symmetric") NATs can't be punched
//! through; one symmetric NAT facing a NAT that only admits answers from
//! where it sent (port-restricted) can't either. A forwarded port plus
//! `--advertise-endpoint` on either side always makes the pair direct.

// Pure: the clock and randomness are inputs (clippy.toml names what is
// forbidden).
#![deny(clippy::disallowed_methods)]

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use super::HolePunching;
use crate::engine::paths::{CandidateStatus, Source};
use crate::wire::control::NatMapping;

/// Candidates listed in a reason; more are summarised by count.
const LISTED: usize = 4;

/// What we know of one side of the pair.
#[derive(Debug, Clone, Copy)]
pub struct Side<'a> {
    pub name: &'a str,
    pub nat: NatMapping,
    /// The UDP port meshd listens on there.
    pub port: u16,
    /// What port mapping on its gateway gave.
    pub mapping: SideMapping<'a>,
    /// Known of this node only: its NAT keeps one public port for the
    /// rendezvous's two ports, yet peers saw it at others. Its router took a
    /// peer's packet that arrived before this node had sent to that peer as
    /// one for itself, and the conntrack entry that left moved this node's
    /// mapping for the peer to another port: Linux MASQUERADE with no
    /// firewall ([`crate::engine::nat::MappingObserver::remapped_for_peers`]).
    pub remapped: bool,
}

/// What port mapping (PCP, NAT-PMP, UPnP IGD) on a side's gateway gave, as
/// far as this node knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SideMapping<'a> {
    /// Not known: a peer that announced no mapped address, or this node
    /// before its first probe.
    Unknown,
    /// The gateway answered none of the protocols.
    NoAnswer,
    /// The gateway answered but granted no usable mapping: why.
    Failed(&'a str),
    /// Mapped at this address, announced as a candidate.
    Mapped(SocketAddr),
}

/// Why traffic between `this` node and `peer` goes through the relay, what
/// was tried, and what would make it direct.
pub fn relay_reason(this: Side<'_>, peer: Side<'_>, candidates: &[CandidateStatus]) -> String {
    use NatMapping::{
        EndpointDependent as Edm, EndpointIndependent as Eim, None as Public, Unknown,
    };
    let mut out = String::new();
    if this.remapped {
        let _ = write!(
            out,
            "{}'s NAT keeps one public port for the rendezvous's two ports (endpoint-independent), \
             yet peers see it at other ports: its router takes a peer's probe that arrives before \
             {} has sent to that peer as a packet for itself, and the conntrack entry that leaves \
             moves {}'s own mapping for that peer to another port, which {}'s NAT does not admit \
             (Linux MASQUERADE with no firewall does this; a router that drops unsolicited inbound \
             on its WAN side does not)",
            this.name, this.name, this.name, peer.name
        );
        out.push_str("; ");
        tried(&mut out, candidates);
        let _ = write!(
            out,
            "; to make it direct, drop unsolicited inbound on the WAN side of {}'s router \
             (iptables -A INPUT -i WAN -m conntrack --ctstate NEW -j DROP), or {}",
            this.name,
            forward_port(this)
        );
        return out;
    }
    let _ = match (this.nat, peer.nat) {
        (Edm, Edm) => write!(
            out,
            "both sides are behind endpoint-dependent (symmetric) NAT: each NAT picks a new port per \
             destination, so neither side can aim at the other"
        ),
        (Edm, Eim) | (Eim, Edm) => {
            let (symmetric, cone) = if this.nat == Edm { (this, peer) } else { (peer, this) };
            write!(
                out,
                "{}'s NAT is endpoint-dependent (symmetric) and {}'s NAT admits only answers from \
                 addresses it sent to: the port {}'s NAT picks for {} can't be predicted",
                symmetric.name, cone.name, symmetric.name, cone.name
            )
        }
        (Public, _) | (_, Public) => {
            let public = if this.nat == Public { this } else { peer };
            write!(
                out,
                "{} has a public address but its probes go unanswered: a firewall on the way drops \
                 UDP {}",
                public.name, public.port
            )
        }
        (Eim, Eim) => write!(
            out,
            "both NATs are endpoint-independent (cone), yet hole punching has not worked: a \
             firewall filters, or a NAT re-mapped when the other side's probes arrived first"
        ),
        (Unknown, _) | (_, Unknown) => write!(
            out,
            "no direct path answered; NAT behaviour is not known yet ({}: {}, {}: {})",
            this.name,
            this.nat.describe(),
            peer.name,
            peer.nat.describe()
        ),
    };
    out.push_str("; ");
    tried(&mut out, candidates);
    let _ = write!(out, "; to make it direct, {}", remedy(this, peer));
    out
}

fn tried(out: &mut String, candidates: &[CandidateStatus]) {
    if candidates.is_empty() {
        out.push_str("the peer announced no address to try");
        return;
    }
    let listed: Vec<String> = candidates
        .iter()
        .take(LISTED)
        .map(|c| {
            let how = match c.source {
                Source::Advertised => "advertised",
                Source::Observed => "seen by the rendezvous",
                Source::Local => "its interface",
                Source::Learned => "seen in its packets",
                Source::Mapped => "mapped by its router",
            };
            let answered = match (c.pongs, c.alive) {
                (0, _) => format!("{} probes, no answer", c.pings),
                (n, true) => format!("{n} of {} probes answered", c.pings),
                (n, false) => format!("answered {n} of {} probes, then went silent", c.pings),
            };
            format!("{} ({how}): {answered}", c.addr)
        })
        .collect();
    let _ = write!(out, "tried {}", listed.join(", "));
    if candidates.len() > LISTED {
        let _ = write!(out, " and {} more", candidates.len() - LISTED);
    }
}

/// What makes `side` reachable whoever sends: its router forwarding one
/// public port to it, mapped by meshd itself (NAT-PMP, PCP or UPnP IGD) or
/// forwarded by hand and advertised, which always makes a pair direct.
fn forward_port(side: Side<'_>) -> String {
    let by_hand = format!(
        "forward UDP {} on {}'s router to it and start its meshd with --advertise-endpoint \
         PUBLIC-IP:{}",
        side.port, side.name, side.port
    );
    let routers = "NAT-PMP, PCP or UPnP IGD";
    match side.mapping {
        SideMapping::Mapped(addr) => format!(
            "let {addr}, the port {}'s router mapped for it, through the firewalls on the way \
             (or {by_hand})",
            side.name
        ),
        SideMapping::Failed(why) => format!(
            "{}'s router answers port mapping but mapped nothing ({why}): let it map UDP {} \
             (or {by_hand})",
            side.name, side.port
        ),
        SideMapping::NoAnswer => format!(
            "turn on {routers} on {}'s router, which answers none of them now (meshd maps \
             its port itself), or {by_hand}",
            side.name
        ),
        SideMapping::Unknown => format!(
            "turn on {routers} on {}'s router (meshd maps its port itself), or {by_hand}",
            side.name
        ),
    }
}

fn remedy(this: Side<'_>, peer: Side<'_>) -> String {
    let forward = forward_port;
    match (this.nat, peer.nat) {
        // Fix the side that breaks punching; when both do, either will do.
        (NatMapping::EndpointDependent, NatMapping::EndpointDependent) => {
            format!("{} (or the same on {})", forward(peer), this.name)
        }
        (NatMapping::EndpointDependent, _) => forward(this),
        (_, NatMapping::EndpointDependent) => forward(peer),
        (NatMapping::None, _) => format!("allow UDP {} in to {}", this.port, this.name),
        (_, NatMapping::None) => format!("allow UDP {} in to {}", peer.port, peer.name),
        _ => forward(peer),
    }
}

/// What `meshctl netcheck` concludes from where the rendezvous's two ports
/// see this node: the mapping behaviour, whether hole punching is likely to
/// work, and why.
pub fn netcheck_verdict(
    quic_seen: Option<SocketAddr>,
    reflector_seen: Option<SocketAddr>,
    local: &[IpAddr],
) -> (NatMapping, HolePunching, String) {
    match (quic_seen, reflector_seen) {
        (_, Some(r)) if local.contains(&r.ip()) => (
            NatMapping::None,
            HolePunching::NotNeeded,
            format!(
                "the rendezvous sees this node at {r}, an address on its own interface: no NAT, peers \
                 reach it directly as long as no firewall drops UDP {}",
                r.port()
            ),
        ),
        (Some(q), Some(r)) if q.ip() == r.ip() && q.port() == r.port() => (
            NatMapping::EndpointIndependent,
            HolePunching::Likely,
            format!(
                "both rendezvous ports see this node at {q}: its NAT keeps one public port for every \
                 destination (endpoint-independent), so peers can aim at that address and hole punching \
                 should work"
            ),
        ),
        (Some(q), Some(r)) if q.ip() == r.ip() => (
            NatMapping::EndpointDependent,
            HolePunching::Unlikely,
            format!(
                "the rendezvous's two ports see this node at {q} and {r}: its NAT picks a new public port \
                 for every destination (endpoint-dependent, \"symmetric\"), so peers behind NAT cannot \
                 aim at it; public peers still reach it directly, the others go through the relay. \
                 Forwarding a UDP port to this node and passing --advertise-endpoint makes every pair direct"
            ),
        ),
        (Some(q), Some(r)) => (
            NatMapping::EndpointDependent,
            HolePunching::Unlikely,
            format!(
                "the rendezvous's two ports see this node from different public addresses ({q} and {r}): \
                 the traffic leaves through several NATs or addresses, so peers cannot know where to aim"
            ),
        ),
        (None, Some(r)) => (
            NatMapping::Unknown,
            HolePunching::Unknown,
            format!(
                "the NAT-check port sees this node at {r}, but there is no QUIC session to compare it \
                 with: the rendezvous's main port is unreachable (UDP blocked on the way?)"
            ),
        ),
        (_, None) => (
            NatMapping::Unknown,
            HolePunching::Unknown,
            "the rendezvous's NAT-check port (its QUIC port + 1) did not answer: UDP to it is blocked on \
             the way or at the rendezvous, or the rendezvous is down"
                .to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(name: &str, nat: NatMapping) -> Side<'_> {
        Side {
            name,
            nat,
            port: 51820,
            mapping: SideMapping::Unknown,
            remapped: false,
        }
    }

    fn silent(addr: &str, source: Source) -> CandidateStatus {
        CandidateStatus {
            addr: addr.parse().unwrap(),
            source,
            alive: false,
            rtt: None,
            pings: 12,
            pongs: 0,
        }
    }

    #[test]
    fn two_symmetric_nats_are_named_with_what_was_tried_and_the_fix() {
        let reason = relay_reason(
            side("this node", NatMapping::EndpointDependent),
            side("node-sym2", NatMapping::EndpointDependent),
            &[
                silent("203.0.113.42:60260", Source::Observed),
                silent("10.42.0.2:51820", Source::Local),
            ],
        );
        assert_eq!(
            reason,
            "both sides are behind endpoint-dependent (symmetric) NAT: each NAT picks a new port per \
             destination, so neither side can aim at the other; tried 203.0.113.42:60260 (seen by the \
             rendezvous): 12 probes, no answer, 10.42.0.2:51820 (its interface): 12 probes, no answer; \
             to make it direct, turn on NAT-PMP, PCP or UPnP IGD on node-sym2's router (meshd maps \
             its port itself), or forward UDP 51820 on node-sym2's router to it and start its meshd \
             with --advertise-endpoint PUBLIC-IP:51820 (or the same on this node)"
        );
    }

    #[test]
    fn a_symmetric_side_whose_router_maps_nothing_is_told_to_turn_port_mapping_on() {
        let this = Side {
            mapping: SideMapping::NoAnswer,
            ..side("this node", NatMapping::EndpointDependent)
        };
        let reason = relay_reason(
            this,
            side("node-cone", NatMapping::EndpointIndependent),
            &[],
        );
        assert!(
            reason.ends_with(
                "turn on NAT-PMP, PCP or UPnP IGD on this node's router, which answers none of \
                 them now (meshd maps its port itself), or forward UDP 51820 on this node's router \
                 to it and start its meshd with --advertise-endpoint PUBLIC-IP:51820"
            ),
            "{reason}"
        );
        let refused = Side {
            mapping: SideMapping::Failed(
                "the gateway's PCP answer 10.0.0.1:51820 is a private address",
            ),
            ..this
        };
        let reason = relay_reason(
            refused,
            side("node-cone", NatMapping::EndpointIndependent),
            &[],
        );
        assert!(reason.contains("this node's router answers port mapping but mapped nothing (the gateway's PCP answer 10.0.0.1:51820"), "{reason}");
        let mapped = Side {
            mapping: SideMapping::Mapped("203.0.113.70:51820".parse().unwrap()),
            ..this
        };
        let reason = relay_reason(
            mapped,
            side("node-cone", NatMapping::EndpointIndependent),
            &[silent("203.0.113.30:51820", Source::Observed)],
        );
        assert!(
            reason.contains(
                "let 203.0.113.70:51820, the port this node's router mapped for it, through"
            ),
            "{reason}"
        );
    }

    #[test]
    fn symmetric_against_cone_blames_the_symmetric_side() {
        let reason = relay_reason(
            side("this node", NatMapping::EndpointIndependent),
            side("node-sym1", NatMapping::EndpointDependent),
            &[],
        );
        assert!(
            reason.starts_with("node-sym1's NAT is endpoint-dependent"),
            "{reason}"
        );
        assert!(reason.contains("the peer announced no address"), "{reason}");
        assert!(reason.ends_with("turn on NAT-PMP, PCP or UPnP IGD on node-sym1's router (meshd maps its port itself), or forward UDP 51820 on node-sym1's router to it and start its meshd with --advertise-endpoint PUBLIC-IP:51820"), "{reason}");
    }

    #[test]
    fn a_nat_that_moved_this_nodes_mapping_for_peers_is_named_with_its_fix() {
        let this = Side {
            remapped: true,
            ..side("this node", NatMapping::EndpointDependent)
        };
        let reason = relay_reason(
            this,
            side("node-cone", NatMapping::EndpointIndependent),
            &[silent("203.0.113.30:51820", Source::Observed)],
        );
        assert!(
            reason.starts_with(
                "this node's NAT keeps one public port for the rendezvous's two ports"
            ),
            "{reason}"
        );
        assert!(
            reason.contains("Linux MASQUERADE with no firewall"),
            "{reason}"
        );
        assert!(reason.contains("tried 203.0.113.30:51820"), "{reason}");
        assert!(
            reason.contains("drop unsolicited inbound on the WAN side of this node's router"),
            "{reason}"
        );
    }

    #[test]
    fn netcheck_tells_cone_from_symmetric_from_public() {
        let at = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        let cone = netcheck_verdict(at("203.0.113.30:51820"), at("203.0.113.30:51820"), &[]);
        assert_eq!(
            (cone.0, cone.1),
            (NatMapping::EndpointIndependent, HolePunching::Likely)
        );
        let symmetric = netcheck_verdict(at("203.0.113.41:3947"), at("203.0.113.41:60260"), &[]);
        assert_eq!(
            (symmetric.0, symmetric.1),
            (NatMapping::EndpointDependent, HolePunching::Unlikely)
        );
        assert!(
            symmetric
                .2
                .contains("203.0.113.41:3947 and 203.0.113.41:60260"),
            "{}",
            symmetric.2
        );
        let public = netcheck_verdict(
            at("203.0.113.11:51820"),
            at("203.0.113.11:51820"),
            &["203.0.113.11".parse().unwrap()],
        );
        assert_eq!(
            (public.0, public.1),
            (NatMapping::None, HolePunching::NotNeeded)
        );
        let silent = netcheck_verdict(at("203.0.113.11:51820"), None, &[]);
        assert_eq!(
            (silent.0, silent.1),
            (NatMapping::Unknown, HolePunching::Unknown)
        );
        assert!(silent.2.contains("did not answer"), "{}", silent.2);
    }

    #[test]
    fn unknown_behaviour_says_so_and_long_lists_are_cut() {
        let many: Vec<CandidateStatus> = (1..=6)
            .map(|i| silent(&format!("198.51.100.{i}:51820"), Source::Learned))
            .collect();
        let reason = relay_reason(
            side("this node", NatMapping::Unknown),
            side("node-b", NatMapping::EndpointIndependent),
            &many,
        );
        assert!(
            reason.contains(
                "not known yet (this node: not known yet, node-b: endpoint-independent (cone))"
            ),
            "{reason}"
        );
        assert!(reason.contains("and 2 more"), "{reason}");
    }
}
