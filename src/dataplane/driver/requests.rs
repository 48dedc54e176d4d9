//! The driver's answers to the local API: peer and status reports, and the
//! requests that wait for the network — `meshctl ping` (a probe and its
//! pong) and `meshctl netcheck` (the rendezvous's NAT-check port).
//!
//! Does I/O (sends probes and NAT checks on the shared socket); part of the
//! driver, so it reads the driver's state directly, between batches.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use tokio::sync::oneshot;

use super::Driver;
use crate::control::diagnose::{self, Side};
use crate::control::server::Ask;
use crate::control::{
    millis, NetcheckInfo, PeerInfo, PeerPath, PingInfo, RendezvousInfo, Request, Response, SeenAt,
    SeenBy, StatusInfo,
};
use crate::dataplane::udp::canonical;
use crate::engine::nat::Observer;
use crate::engine::paths::{Path, PathStatus};
use crate::identity::PublicKey;
use crate::wire::reflect::{self, Reflect};

impl Driver {
    /// Every peer as the API shows it, sorted by name; relayed mesh peers
    /// say why.
    pub(super) fn peer_infos(&self) -> Vec<PeerInfo> {
        let this = Side {
            name: "this node",
            nat: self.nat_mapping(Instant::now()),
            port: self.info.listen_port,
        };
        let mut peers: Vec<PeerInfo> = self
            .node
            .peers()
            .map(|p| {
                let mut info = PeerInfo::from(&p);
                if let Some(meta) = self.meta.get(&p.public_key) {
                    info.name = Some(meta.name.clone());
                    info.overlay_ips = meta.overlay_ips.clone();
                    info.nat = meta.nat;
                    if p.path == PathStatus::Relay {
                        let peer = Side {
                            name: &meta.name,
                            nat: meta.nat,
                            port: meta.port.unwrap_or(crate::config::DEFAULT_LISTEN_PORT),
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

    pub(super) fn answer(&mut self, (request, reply): Ask) {
        let response = match request {
            Request::Peers => Response::Peers {
                peers: self.peer_infos(),
            },
            Request::Status => {
                let now = Instant::now();
                let stats = self.node.stats();
                let peers = self.peer_infos();
                let count = |f: fn(&PeerInfo) -> bool| peers.iter().filter(|p| f(p)).count();
                Response::Status(Box::new(StatusInfo {
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
                    rendezvous: self.inputs.nat.is_some().then(|| RendezvousInfo {
                        connected: self.relay_connection.is_some(),
                        rtt_ms: self.relay_connection.as_ref().map(|c| millis(c.rtt())),
                    }),
                    name: self.info.name.clone(),
                    overlay_ips: self
                        .info
                        .addresses
                        .iter()
                        .filter_map(|a| a.parse::<ipnet::IpNet>().ok())
                        .map(|a| a.addr())
                        .collect(),
                    public_key: self.node.public_key(),
                    interface: self.info.interface.clone(),
                    mtu: self.info.mtu,
                    listen_port: self.info.listen_port,
                    addresses: self
                        .info
                        .addresses
                        .iter()
                        .filter_map(|a| a.parse().ok())
                        .collect(),
                    peers: peers.len(),
                    drops: stats
                        .drops()
                        .map(|(r, n)| (r.as_str(), n))
                        .chain([
                            ("quic_not_rendezvous", self.quic_foreign),
                            ("quic_queue_full", self.quic_dropped),
                        ])
                        .filter(|(_, n)| *n > 0)
                        .map(|(r, n)| (r.to_owned(), n))
                        .collect(),
                    cookie_replies_sent: stats.cookie_replies_sent,
                    io: self.io,
                }))
            }
            Request::Ping { peer } => return self.start_ping(&peer, reply),
            Request::Netcheck => return self.start_netcheck(reply),
        };
        // The client may have gone; nothing to do then.
        let _ = reply.send(response);
    }

    /// The peer a user means: its name, an overlay address, or the start
    /// of its key (at least four characters).
    fn resolve(&self, query: &str) -> Result<PublicKey, String> {
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

    fn display_name(&self, key: &PublicKey) -> String {
        self.meta
            .get(key)
            .map_or_else(|| key.short(), |m| m.name.clone())
    }

    /// `meshctl ping`: probes the peer now; the reply waits for its pong
    /// ([`Event::PingReply`]) or [`PING_TIMEOUT`].
    fn start_ping(&mut self, query: &str, reply: oneshot::Sender<Response>) {
        let key = match self.resolve(query) {
            Ok(key) => key,
            Err(message) => {
                let _ = reply.send(Response::Error { message });
                return;
            }
        };
        let now = Instant::now();
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
            let _ = reply.send(Response::Pong(info));
            return;
        }
        self.pending_pings.push(PendingPing {
            peer: key,
            deadline: now + PING_TIMEOUT,
            reply,
            info,
        });
    }

    pub(super) fn ping_replied(&mut self, peer: PublicKey, path: Path, rtt: std::time::Duration) {
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
        pending.info.rtt_ms = Some(millis(rtt));
        let _ = pending.reply.send(Response::Pong(pending.info));
    }

    /// `meshctl netcheck`: asks the rendezvous's NAT-check port where it
    /// sees us; the reply waits for the answer or [`NETCHECK_TIMEOUT`].
    fn start_netcheck(&mut self, reply: oneshot::Sender<Response>) {
        if self.inputs.nat.is_none() {
            let message =
                "this node has no rendezvous (static peers only): nothing to check against".into();
            let _ = reply.send(Response::Error { message });
            return;
        }
        let now = Instant::now();
        self.reflector_seen = None;
        self.send_reflect(now);
        self.pending_netcheck.push((now + NETCHECK_TIMEOUT, reply));
        if self.reflecting.is_none() {
            // No rendezvous address known yet: answer with what we have.
            self.finish_netchecks();
        }
    }

    /// Sends a NAT check to the rendezvous's second port, if its address is known.
    pub(super) fn send_reflect(&mut self, now: Instant) {
        let Some(rendezvous) = self.rendezvous_addr else {
            return;
        };
        let target = SocketAddr::new(
            rendezvous.ip(),
            rendezvous.port().wrapping_add(reflect::PORT_OFFSET),
        );
        let tx: reflect::TxId = rand::random();
        let request = Reflect::Request { tx }.encode();
        if let Err(e) = self.udp.try_send_to(&request, target) {
            tracing::debug!(%target, error = %e, "NAT check not sent");
        }
        self.reflecting = Some(Reflecting {
            tx,
            target,
            sent: now,
            retried: false,
        });
    }

    /// A NAT check answer on the shared socket.
    pub(super) fn reflected(
        &mut self,
        from: SocketAddr,
        answer: Result<Reflect, reflect::ReflectError>,
    ) {
        let now = Instant::now();
        let Ok(Reflect::Response { tx, observed }) = answer else {
            return;
        };
        let Some(pending) = self
            .reflecting
            .filter(|r| r.tx == tx && canonical(r.target) == canonical(from))
        else {
            return;
        };
        self.reflecting = None;
        self.reflector_seen = Some((observed, now.saturating_duration_since(pending.sent)));
        self.seen(Observer::Reflector, observed);
        self.finish_netchecks();
    }

    /// Answers every waiting `meshctl netcheck` with what is known now.
    fn finish_netchecks(&mut self) {
        if self.pending_netcheck.is_empty() {
            return;
        }
        let now = Instant::now();
        let quic_seen = self
            .observer
            .seen_at(now)
            .into_iter()
            .find_map(|(by, addr)| matches!(by, Observer::Rendezvous).then_some(addr));
        let reflector_seen = self.reflector_seen.map(|(addr, _)| addr);
        let (mapping, punching, explanation) =
            diagnose::netcheck_verdict(quic_seen, reflector_seen, &self.info.underlay_ips);
        let info = NetcheckInfo {
            rendezvous: self.rendezvous_addr,
            quic_connected: self.relay_connection.is_some(),
            quic_rtt_ms: self.relay_connection.as_ref().map(|c| millis(c.rtt())),
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
        };
        for (_, reply) in self.pending_netcheck.drain(..) {
            let _ = reply.send(Response::Netcheck(Box::new(info.clone())));
        }
    }

    /// The earliest moment a waiting ping or netcheck needs attention.
    pub(super) fn pending_deadline(&self) -> Option<Instant> {
        let pings = self.pending_pings.iter().map(|p| p.deadline);
        let netchecks = self.pending_netcheck.iter().map(|(d, _)| *d);
        let retry = self
            .reflecting
            .filter(|r| !r.retried)
            .map(|r| r.sent + REFLECT_RETRY);
        pings.chain(netchecks).chain(retry).min()
    }

    /// Times out pings and netchecks, and sends a lost NAT check once more.
    pub(super) fn expire_pending(&mut self, now: Instant) {
        let (expired, waiting): (Vec<PendingPing>, Vec<PendingPing>) = self
            .pending_pings
            .drain(..)
            .partition(|p| p.deadline <= now);
        self.pending_pings = waiting;
        for p in expired {
            let _ = p.reply.send(Response::Pong(p.info));
        }
        if let Some(r) = self
            .reflecting
            .filter(|r| !r.retried && now >= r.sent + REFLECT_RETRY)
        {
            let request = Reflect::Request { tx: r.tx }.encode();
            let _ = self.udp.try_send_to(&request, r.target);
            self.reflecting = Some(Reflecting { retried: true, ..r });
        }
        if self.pending_netcheck.iter().any(|(d, _)| *d <= now) {
            self.finish_netchecks();
        }
    }
}

/// How long `meshctl ping` waits for one pong.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long `meshctl netcheck` waits for the NAT-check port.
const NETCHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// A NAT check unanswered this long is sent once more.
const REFLECT_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// A `meshctl ping` waiting for its pong.
pub(super) struct PendingPing {
    peer: PublicKey,
    deadline: Instant,
    reply: oneshot::Sender<Response>,
    info: PingInfo,
}

/// The NAT check in flight.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reflecting {
    tx: reflect::TxId,
    target: SocketAddr,
    sent: Instant,
    retried: bool,
}
