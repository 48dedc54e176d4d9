//! One remote node: its WireGuard session state and path.
//!
//! Pure. This is the only file that touches boringtun's [`Tunn`]; it turns
//! `TunnResult` into meshd's own small enums so the rest of the engine never
//! sees boringtun types, and it decides which results are *authenticated*
//! (the only ones a peer's endpoint may follow, WireGuard paper §2.1).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ipnet::IpNet;

use crate::identity::{PrivateKey, PublicKey};

/// WireGuard message types (WireGuard paper §5.4).
pub(crate) const MSG_HANDSHAKE_INIT: u8 = 1;
pub(crate) const MSG_HANDSHAKE_RESP: u8 = 2;
pub(crate) const MSG_COOKIE_REPLY: u8 = 3;
pub(crate) const MSG_DATA: u8 = 4;

/// Handshakes per second the interface answers before it demands cookies
/// (WireGuard paper §5.3); the figure boringtun's own device uses.
pub(crate) const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Handshake messages one source may have checked per second while the
/// interface is under load (kernel WireGuard's per-IP figure): one source
/// holding a valid cookie can't spend all of the interface's handshake work.
const HANDSHAKES_PER_SOURCE: u16 = 20;
/// Buckets of the per-source count (a keyed hash picks one), so its memory
/// is fixed however many sources there are.
const SOURCE_BUCKETS: usize = 4096;

/// Who a handshake message is counted against.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Source {
    /// Its source address, which under load carries a cookie for it.
    Addr(IpAddr),
    /// The peer the relay vouches for.
    Relayed(PublicKey),
}

/// The interface-wide first look at a WireGuard datagram, before any peer
/// is known: MAC1, the one shared handshake rate limiter, and which peer the
/// datagram is for.
pub(crate) struct Gate {
    limiter: Arc<RateLimiter>,
    /// Handed to every `Tunn`: it re-checks MAC1 but never rate-limits, so
    /// "under load" is decided once, here, for the whole interface.
    passthrough: Arc<RateLimiter>,
    secret: x25519_dalek::StaticSecret,
    public: x25519_dalek::PublicKey,
    /// Handshake messages past MAC1 this second, all sources, and per
    /// source by keyed hash bucket (reset with the limiter).
    handshakes: u64,
    by_source: Box<[u16; SOURCE_BUCKETS]>,
    source_key: (u64, u64),
}

/// Where [`Gate::admit`] sends a datagram.
#[derive(Debug)]
pub(crate) enum Admitted {
    /// A handshake initiation from the holder of this static key.
    FromKey(PublicKey),
    /// A message naming one of our session indices; the peer slot it encodes.
    ForSlot(u32),
    /// Under load: `len` bytes of cookie reply to send back to the source.
    CookieReply(usize),
    /// Under load, and this source had its share of handshakes this second.
    Throttled,
    Rejected(WireGuardError),
}

impl Gate {
    /// `source_key` keys the hash of the per-source count: random, so that
    /// nobody can aim many sources at one bucket.
    pub(crate) fn new(private_key: &PrivateKey, source_key: (u64, u64)) -> Self {
        let secret = private_key.to_dalek();
        let public = x25519_dalek::PublicKey::from(&secret);
        Self {
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            passthrough: Arc::new(RateLimiter::new(&public, u64::MAX)),
            secret,
            public,
            handshakes: 0,
            by_source: Box::new([0; SOURCE_BUCKETS]),
            source_key,
        }
    }

    pub(crate) fn passthrough(&self) -> Arc<RateLimiter> {
        self.passthrough.clone()
    }

    /// Must run every second: a limiter whose count is never reset stays
    /// "under load" for good and every handshake then needs a cookie.
    pub(crate) fn reset_count(&mut self) {
        self.limiter.reset_count();
        self.handshakes = 0;
        self.by_source.fill(0);
    }

    /// Counts a handshake message that passed MAC1 (and, under load, its
    /// cookie) against its source's share. The share is enforced only while
    /// the interface is under load: more such messages came this second
    /// than the cookie limit, so boringtun's limiter (which counts the same
    /// messages and more) demands cookies, and every message here carried a
    /// valid one for its source address: nobody spends another source's
    /// share by spoofing it.
    fn within_share(&mut self, source: Source) -> bool {
        #[allow(deprecated)] // SipHash keyed from the node's seed; std's is enough here.
        let mut h = std::hash::SipHasher::new_with_keys(self.source_key.0, self.source_key.1);
        match source {
            Source::Addr(ip) => std::hash::Hash::hash(&ip, &mut h),
            Source::Relayed(peer) => std::hash::Hash::hash(peer.as_bytes(), &mut h),
        }
        let bucket = (std::hash::Hasher::finish(&h) % SOURCE_BUCKETS as u64) as usize;
        let count = &mut self.by_source[bucket];
        *count = count.saturating_add(1);
        self.handshakes += 1;
        *count <= HANDSHAKES_PER_SOURCE || self.handshakes <= HANDSHAKE_RATE_LIMIT
    }

    /// `cookie_dst` needs 64 bytes.
    pub(crate) fn admit(
        &mut self,
        from: IpAddr,
        source: Source,
        datagram: &[u8],
        cookie_dst: &mut [u8],
    ) -> Admitted {
        let packet = match self.limiter.verify_packet(Some(from), datagram, cookie_dst) {
            Err(TunnResult::WriteToNetwork(cookie)) => return Admitted::CookieReply(cookie.len()),
            Err(TunnResult::Err(e)) => return Admitted::Rejected(e),
            Err(_) => return Admitted::Rejected(WireGuardError::UnexpectedPacket),
            Ok(packet) => packet,
        };
        let handshake = matches!(
            packet,
            Packet::HandshakeInit(_) | Packet::HandshakeResponse(_)
        );
        if handshake && !self.within_share(source) {
            return Admitted::Throttled;
        }
        match packet {
            // The DH in parse_handshake_anon runs only after MAC1, the rate
            // limiter and the source's share passed: that ordering is the
            // flood defence.
            Packet::HandshakeInit(p) => {
                match parse_handshake_anon(&self.secret, &self.public, &p) {
                    Ok(half) => Admitted::FromKey(PublicKey::from_bytes(half.peer_static_public)),
                    Err(e) => Admitted::Rejected(e),
                }
            }
            Packet::HandshakeResponse(p) => Admitted::ForSlot(p.receiver_idx >> 8),
            Packet::PacketCookieReply(p) => Admitted::ForSlot(p.receiver_idx >> 8),
            Packet::PacketData(p) => Admitted::ForSlot(p.receiver_idx >> 8),
        }
    }
}

/// What encapsulating one TUN packet produced.
#[derive(Debug)]
pub(crate) enum Encapsulated {
    /// `len` bytes of `dst` are a datagram for the peer's endpoint: data, or
    /// a handshake initiation while the packet waits in the session queue.
    Network(usize),
    /// The packet is queued behind a handshake already in flight.
    Queued,
    Error(WireGuardError),
}

/// What decapsulating one datagram produced.
#[derive(Debug)]
pub(crate) enum Decapsulated {
    /// An inner packet of `len` bytes from inner source `src`.
    Tunnel {
        len: usize,
        src: IpAddr,
    },
    /// A reply to send back: handshake response, keepalive, or cookie reply.
    Network {
        len: usize,
        authenticated: bool,
    },
    /// Consumed with nothing to emit (keepalive, cookie reply).
    Done {
        authenticated: bool,
    },
    Error(WireGuardError),
}

/// What a timer tick produced.
#[derive(Debug)]
pub(crate) enum Ticked {
    Nothing,
    /// A keepalive or (re)handshake initiation to send.
    Network(usize),
    /// No handshake succeeded for REJECT_AFTER_TIME × 3: the session is gone.
    Expired,
    Error(WireGuardError),
}

/// Counters reported per peer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PeerCounters {
    /// Bytes of authenticated WireGuard datagrams received (as `wg show`).
    pub rx_bytes: u64,
    /// Bytes of WireGuard datagrams sent.
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub handshakes: u64,
}

pub(crate) struct Peer {
    pub(crate) key: PublicKey,
    tunn: Tunn,
    pub(crate) endpoint: Option<SocketAddr>,
    pub(crate) allowed_ips: Vec<IpNet>,
    pub(crate) persistent_keepalive: Option<u16>,
    pub(crate) counters: PeerCounters,
    /// When an authenticated packet last arrived (the node's clock).
    pub(crate) last_authenticated: Option<std::time::Instant>,
    /// Candidate paths, for a peer from the peer map; `None` for a static
    /// peer, whose endpoint follows roaming as in plain WireGuard.
    pub(crate) paths: Option<super::paths::PathSet>,
    /// Authenticates probes to and from this peer (`None` for a low-order key).
    pub(crate) probe_key: Option<crate::wire::probe::ProbeKey>,
    /// When we last asked the peer to punch, so we ask at a bounded rate.
    pub(crate) last_punch: Option<std::time::Instant>,
    /// When we last probed every candidate at once (a punch, `meshctl ping`).
    pub(crate) last_forced: Option<std::time::Instant>,
    /// Which of the peer's pings were seen: replays are refused.
    pub(crate) pings_seen: super::paths::PingWindow,
    /// Whether boringtun erased the session keys and no handshake came since.
    pub(crate) expired: bool,
}

impl Peer {
    /// `index` is the peer's slot: boringtun puts it in the top 24 bits of
    /// every session index, so `receiver_idx >> 8` finds the peer again.
    pub(crate) fn new(
        private_key: &PrivateKey,
        key: PublicKey,
        index: u32,
        endpoint: Option<SocketAddr>,
        allowed_ips: Vec<IpNet>,
        persistent_keepalive: Option<u16>,
        limiter: Arc<RateLimiter>,
    ) -> Self {
        let tunn = Tunn::new(
            private_key.to_dalek(),
            key.to_dalek(),
            None,
            persistent_keepalive,
            index,
            Some(limiter),
        );
        Self {
            key,
            tunn,
            endpoint,
            allowed_ips,
            persistent_keepalive,
            counters: PeerCounters::default(),
            last_authenticated: None,
            paths: None,
            probe_key: crate::wire::probe::ProbeKey::derive(private_key, &key),
            last_punch: None,
            last_forced: None,
            pings_seen: super::paths::PingWindow::default(),
            expired: false,
        }
    }

    /// `dst` must hold `packet.len() + 32` and at least 148 bytes (boringtun
    /// panics otherwise); the node checks this before calling.
    #[inline]
    pub(crate) fn encapsulate(&mut self, packet: &[u8], dst: &mut [u8]) -> Encapsulated {
        match self.tunn.encapsulate(packet, dst) {
            TunnResult::WriteToNetwork(out) => Encapsulated::Network(out.len()),
            TunnResult::Done => Encapsulated::Queued,
            TunnResult::Err(e) => Encapsulated::Error(e),
            // encapsulate never yields tunnel writes
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                Encapsulated::Error(WireGuardError::UnexpectedPacket)
            }
        }
    }

    /// Decapsulates with the real source address, so the (shared) rate
    /// limiter can demand a cookie from it under load.
    #[inline]
    pub(crate) fn decapsulate(
        &mut self,
        from: IpAddr,
        datagram: &[u8],
        dst: &mut [u8],
    ) -> Decapsulated {
        let msg_type = datagram.first().copied().unwrap_or(0);
        match self.tunn.decapsulate(Some(from), datagram, dst) {
            TunnResult::WriteToTunnelV4(p, src) => Decapsulated::Tunnel {
                len: p.len(),
                src: src.into(),
            },
            TunnResult::WriteToTunnelV6(p, src) => Decapsulated::Tunnel {
                len: p.len(),
                src: src.into(),
            },
            TunnResult::WriteToNetwork(out) => {
                // A cookie reply proves nothing about the sender; a handshake
                // response (to an init) or a keepalive (after a response) means
                // the handshake authenticated.
                let reply_type = out.first().copied().unwrap_or(0);
                let authenticated = reply_type != MSG_COOKIE_REPLY
                    && matches!(msg_type, MSG_HANDSHAKE_INIT | MSG_HANDSHAKE_RESP);
                Decapsulated::Network {
                    len: out.len(),
                    authenticated,
                }
            }
            // Done after a data message is a valid keepalive; after a cookie
            // reply it is not an authenticated packet.
            TunnResult::Done => Decapsulated::Done {
                authenticated: msg_type == MSG_DATA,
            },
            TunnResult::Err(e) => Decapsulated::Error(e),
        }
    }

    /// Packets that waited for the handshake, one per call, until `None`.
    #[inline]
    pub(crate) fn flush_queued(&mut self, dst: &mut [u8]) -> Option<usize> {
        match self.tunn.decapsulate(None, &[], dst) {
            TunnResult::WriteToNetwork(out) => Some(out.len()),
            _ => None,
        }
    }

    pub(crate) fn tick(&mut self, dst: &mut [u8]) -> Ticked {
        match self.tunn.update_timers(dst) {
            TunnResult::Done => Ticked::Nothing,
            TunnResult::WriteToNetwork(out) => Ticked::Network(out.len()),
            TunnResult::Err(WireGuardError::ConnectionExpired) => Ticked::Expired,
            TunnResult::Err(e) => Ticked::Error(e),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                Ticked::Error(WireGuardError::UnexpectedPacket)
            }
        }
    }

    /// Forces a handshake now (a new peer with a known endpoint, or the
    /// driver asking for a fresh session).
    pub(crate) fn initiate(&mut self, dst: &mut [u8]) -> Option<usize> {
        match self.tunn.format_handshake_initiation(dst, false) {
            TunnResult::WriteToNetwork(out) => Some(out.len()),
            _ => None,
        }
    }

    /// Where traffic to this peer goes now.
    pub(crate) fn route(&self) -> Option<super::node::Via> {
        use super::node::Via;
        use super::paths::Path;
        match self.paths.as_ref().and_then(|p| p.current()) {
            Some(Path::Direct(addr)) => Some(Via::Udp(addr)),
            Some(Path::Relay) => Some(Via::Relay(self.key)),
            None => self.endpoint.map(Via::Udp),
        }
    }

    /// Time since the last completed handshake, by boringtun's clock.
    pub(crate) fn last_handshake(&self) -> Option<Duration> {
        self.tunn.time_since_last_handshake()
    }
}
