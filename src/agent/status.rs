//! What the local API shows of the node and its peers, assembled in one
//! place: `meshctl peers`, `meshctl status`, `meshctl netcheck`,
//! `meshctl routes`, and the peer a `meshctl ping` names.
//!
//! Pure: reads the agent's state and the engine's, returns API types.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use std::time::Instant;

use super::{Agent, ShellStats};
use crate::control::diagnose::{self, Side, SideMapping};
use crate::control::{
    millis, AdvertisedElsewhere, AdvertisedRoute, NetcheckInfo, PeerInfo, PeerPath, PeerRoutes,
    RendezvousInfo, RoutesInfo, SeenAt, SeenBy, StatusInfo,
};
use crate::engine::nat::Observer;
use crate::engine::paths::{PathStatus, Source};
use crate::identity::PublicKey;
use crate::wire::control::{NatMapping, RouteStatus};
use crate::wire::reflect;

/// What the API shows of a mesh peer besides the engine's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerMeta {
    pub name: String,
    pub overlay_ips: Vec<IpAddr>,
    /// The prefixes behind it that the mesh accepted.
    pub routes: Vec<IpNet>,
    pub nat: NatMapping,
    /// The port of its local candidates: where its meshd listens.
    pub port: Option<u16>,
    /// Its candidates' addresses as last heard, sorted.
    pub addresses: Vec<std::net::SocketAddr>,
    /// When they last changed, if ever since this node first heard them.
    pub addresses_changed: Option<Instant>,
}

impl Agent {
    /// Every peer as the API shows it, sorted by name; relayed mesh peers
    /// say why.
    pub fn peer_infos(&self, now: Instant) -> Vec<PeerInfo> {
        let this = Side {
            name: "this node",
            nat: self.nat_mapping(now),
            port: self.listen_port,
            mapping: match &self.port_mapping {
                Some(info) => match (info.external, &info.error) {
                    (Some(addr), _) => SideMapping::Mapped(addr),
                    (None, Some(why)) if !info.answered.is_empty() => SideMapping::Failed(why),
                    (None, _) if info.gateway.is_some() => SideMapping::NoAnswer,
                    (None, _) => SideMapping::Unknown,
                },
                None => SideMapping::Unknown,
            },
            remapped: self.observer.remapped_for_peers(now),
        };
        let mut peers: Vec<PeerInfo> = self
            .node
            .peers()
            .map(|p| {
                let mut info = PeerInfo::from(&p);
                if let Some(meta) = self.meta.get(&p.public_key) {
                    info.name = Some(meta.name.clone());
                    info.overlay_ips = meta.overlay_ips.clone();
                    info.routes = meta.routes.clone();
                    if let Some(learned) = self.learned.by_peer.get(&p.public_key) {
                        info.learned_routes = learned.clone();
                    }
                    info.nat = meta.nat;
                    info.addresses_changed_s = meta
                        .addresses_changed
                        .map(|at| now.saturating_duration_since(at).as_secs());
                    if p.path == PathStatus::Relay {
                        let peer = Side {
                            name: &meta.name,
                            nat: meta.nat,
                            port: meta.port.unwrap_or(crate::config::DEFAULT_LISTEN_PORT),
                            mapping: p
                                .candidates
                                .iter()
                                .find(|c| c.source == Source::Mapped)
                                .map_or(SideMapping::Unknown, |c| SideMapping::Mapped(c.addr)),
                            remapped: false,
                        };
                        info.relay_reason = Some(diagnose::relay_reason(this, peer, &p.candidates));
                    }
                }
                info
            })
            .collect();
        peers.sort_by(|a, b| (&a.name, &a.public_key).cmp(&(&b.name, &b.public_key)));
        peers
    }

    /// This node as `meshctl status` shows it.
    pub fn status_info(&self, shell: &ShellStats, now: Instant) -> StatusInfo {
        let stats = self.node.stats();
        let peers = self.peer_infos(now);
        let count = |f: fn(&PeerInfo) -> bool| peers.iter().filter(|p| f(p)).count();
        StatusInfo {
            peers_direct: count(|p| p.path == PeerPath::Direct),
            peers_relayed: count(|p| p.path == PeerPath::Relay),
            peers_offline: count(|p| !p.online),
            nat: self.nat_mapping(now),
            seen_at: self
                .observer
                .seen_at(now)
                .into_iter()
                .map(|(by, addr)| SeenAt {
                    addr,
                    by: match by {
                        Observer::Rendezvous => SeenBy::Rendezvous,
                        Observer::Reflector => SeenBy::Reflector,
                        Observer::Peer(key) => SeenBy::Peer(self.display_name(&key)),
                    },
                })
                .collect(),
            rendezvous: self.has_rendezvous.then(|| RendezvousInfo {
                connected: self.session.is_some(),
                rtt_ms: self.session.and_then(|s| s.rtt).map(millis),
            }),
            name: self.name.clone(),
            overlay_ips: self.addresses.iter().map(|a| a.addr()).collect(),
            public_key: self.node.public_key(),
            interface: self.interface.clone(),
            mtu: self.mtu,
            listen_port: self.listen_port,
            addresses: self.addresses.clone(),
            peers: peers.len(),
            drops: stats
                .drops()
                .map(|(r, n)| (r.as_str(), n))
                .chain([
                    ("quic_not_rendezvous", shell.quic_not_rendezvous),
                    ("quic_queue_full", shell.quic_queue_full),
                ])
                .filter(|(_, n)| *n > 0)
                .map(|(r, n)| (r.to_owned(), n))
                .collect(),
            cookie_replies_sent: stats.cookie_replies_sent,
            io: shell.io,
            port_mapping: self.port_mapping.clone(),
            port_taken: self.port_taken.clone(),
            // The NAT-check port's answer is the freshest (asked again
            // every REFLECT_EVERY), else the rendezvous's at admission.
            advertised_elsewhere: self
                .reflector_seen
                .map(|(seen, _)| seen)
                .or_else(|| {
                    self.observer
                        .seen_at(now)
                        .into_iter()
                        .find(|(by, _)| *by == Observer::Rendezvous)
                        .map(|(_, seen)| seen)
                })
                .and_then(|seen| {
                    self.advertised_elsewhere(seen)
                        .map(|advertised| AdvertisedElsewhere { advertised, seen })
                }),
        }
    }

    /// `meshctl routes`: each prefix this node advertises with what the
    /// mesh decided, then every peer with prefixes behind it, by name.
    pub fn routes_info(&self) -> RoutesInfo {
        let name = self.name.as_deref().unwrap_or("NODE");
        let decided = |prefix: &IpNet| {
            self.route_decisions
                .iter()
                .find(|d| d.prefix == *prefix)
                .map(|d| d.status.clone())
        };
        // What this node asks for, in its order, then any decision on a
        // prefix it no longer asks for (the rendezvous has not caught up).
        let advertised = self
            .advertised
            .iter()
            .map(|prefix| (*prefix, decided(prefix)))
            .chain(
                self.route_decisions
                    .iter()
                    .filter(|d| !self.advertised.contains(&d.prefix))
                    .map(|d| (d.prefix, Some(d.status.clone()))),
            )
            .map(|(prefix, decision)| AdvertisedRoute {
                explanation: self.route_explanation(name, prefix, decision.as_ref()),
                prefix,
                decision,
            })
            .collect();
        let mut peers: Vec<PeerRoutes> = self
            .meta
            .iter()
            .filter(|(_, m)| !m.routes.is_empty())
            .map(|(key, m)| PeerRoutes {
                name: Some(m.name.clone()),
                public_key: *key,
                routes: m.routes.clone(),
            })
            .collect();
        peers.sort_by(|a, b| (&a.name, &a.public_key).cmp(&(&b.name, &b.public_key)));
        let mut learned: Vec<PeerRoutes> = self
            .learned
            .by_peer
            .iter()
            .map(|(key, routes)| PeerRoutes {
                name: self.meta.get(key).map(|m| m.name.clone()),
                public_key: *key,
                routes: routes.clone(),
            })
            .collect();
        learned.sort_by(|a, b| (&a.name, &a.public_key).cmp(&(&b.name, &b.public_key)));
        RoutesInfo {
            advertised,
            peers,
            learned,
            unusable: self.learned.unusable.clone(),
        }
    }

    /// What a decision on one of this node's prefixes means, in words an
    /// operator can act on.
    fn route_explanation(
        &self,
        name: &str,
        prefix: IpNet,
        decision: Option<&RouteStatus>,
    ) -> String {
        match decision {
            Some(RouteStatus::AwaitingApproval) => format!(
                "outside the mesh's routable ranges: waiting for approval \
                 (on the rendezvous: mesh-rendezvous routes approve {name} {prefix})"
            ),
            Some(status) => status.describe(),
            None if !self.has_rendezvous => "no rendezvous to advertise it to".into(),
            None if self.welcomed => "no decision: the rendezvous said nothing about it \
                 (one older than 0.4.0 does not route prefixes)"
                .into(),
            None => "no decision yet: waiting for the rendezvous".into(),
        }
    }

    /// `meshctl netcheck`'s answer from what is known now.
    pub(super) fn netcheck_info(&self, now: Instant) -> NetcheckInfo {
        let quic_seen = self
            .observer
            .seen_at(now)
            .into_iter()
            .find_map(|(by, addr)| matches!(by, Observer::Rendezvous).then_some(addr));
        let reflector_seen = self.reflector_seen.map(|(addr, _)| addr);
        let (mapping, punching, explanation) =
            diagnose::netcheck_verdict(quic_seen, reflector_seen, &self.underlay_ips);
        NetcheckInfo {
            rendezvous: self.rendezvous_addr,
            quic_connected: self.session.is_some(),
            quic_rtt_ms: self.session.and_then(|s| s.rtt).map(millis),
            quic_seen_at: quic_seen,
            reflector: self
                .rendezvous_addr
                .map(|a| SocketAddr::new(a.ip(), a.port().wrapping_add(reflect::PORT_OFFSET))),
            reflector_seen_at: reflector_seen,
            reflector_rtt_ms: self.reflector_seen.map(|(_, rtt)| millis(rtt)),
            mapping,
            mapping_from_peers: self.nat_mapping(now),
            hole_punching: punching,
            explanation,
            port_mapping: self.port_mapping.clone(),
        }
    }

    /// The peer a user means: its name, an overlay address, or the start
    /// of its key (at least four characters).
    pub(super) fn resolve(&self, query: &str) -> Result<PublicKey, String> {
        let query = query.trim();
        let ip: Option<IpAddr> = query.parse().ok();
        let matches: Vec<PublicKey> = self
            .node
            .peers()
            .map(|p| p.public_key)
            .filter(|key| {
                let meta = self.meta.get(key);
                meta.is_some_and(|m| {
                    m.name == query || ip.is_some_and(|ip| m.overlay_ips.contains(&ip))
                }) || (query.len() >= 4 && key.to_string().starts_with(query))
            })
            .collect();
        match matches.as_slice() {
            [one] => Ok(*one),
            [] => Err(format!(
                "no peer matches '{query}': give a name, an overlay address or the start of a key (see meshctl peers)"
            )),
            many => Err(format!(
                "'{query}' matches {} peers ({}); be more specific",
                many.len(),
                many.iter().map(|k| self.display_name(k)).collect::<Vec<_>>().join(", ")
            )),
        }
    }

    /// A peer's name, or its short key for a static peer.
    pub(super) fn display_name(&self, key: &PublicKey) -> String {
        self.meta
            .get(key)
            .map_or_else(|| key.short(), |m| m.name.clone())
    }

    /// What the API shows of a mesh peer besides the engine's state.
    pub fn peer_meta(&self, key: &PublicKey) -> Option<&PeerMeta> {
        self.meta.get(key)
    }
}
