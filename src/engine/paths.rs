//! Path choice for one peer: which of its candidate endpoints works, how
//! fast, and whether to use it or the relay.
//!
//! Pure. A [`PathSet`] is told the peer's candidates (from the peer map, and
//! addresses its authenticated packets came from), sends probes through the
//! node, hears pongs, and picks a path: the live direct path with the lowest
//! RTT, a private address on the same subnet winning near-ties; the relay
//! when no direct path lives. It keeps probing to upgrade from the relay,
//! and drops back to it within [`DEAD_AFTER`] when the direct path dies.
//! Switching path never touches the WireGuard session.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::wire::probe::TxId;

/// The active direct path is probed this often…
pub const ACTIVE_PROBE: Duration = Duration::from_secs(2);
/// …and declared dead when no pong came for this long (three probes).
pub const DEAD_AFTER: Duration = Duration::from_millis(6500);
/// Other candidates are probed this often while a direct path lives…
pub const IDLE_PROBE: Duration = Duration::from_secs(15);
/// …and this often while there is none (trying to upgrade from the relay).
pub const UPGRADE_PROBE: Duration = Duration::from_secs(5);
/// A ping unanswered for this long is forgotten.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Outstanding pings kept per candidate.
const MAX_PENDING: usize = 4;
/// Candidates kept per peer (announced ones plus learnt ones).
pub const MAX_CANDIDATES: usize = 24;
/// A new path must be this much faster to replace a live one (hysteresis).
const SWITCH_MARGIN: f64 = 0.8;

/// How a candidate became known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// Configured public address of the peer.
    Advertised,
    /// What the rendezvous observed.
    Observed,
    /// An interface address of the peer.
    Local,
    /// An authenticated packet or probe from the peer came from here
    /// (peer-reflexive, RFC 8445 §7.3.1.3): the symmetric-NAT case.
    Learned,
}

/// The path traffic to a peer takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Direct(SocketAddr),
    Relay,
}

#[derive(Debug, Clone)]
struct Candidate {
    addr: SocketAddr,
    source: Source,
    last_ping: Option<Instant>,
    pending: Vec<(TxId, Instant)>,
    last_pong: Option<Instant>,
    /// Smoothed RTT (RFC 6298 style, α = 1/8).
    rtt: Option<Duration>,
    /// Pings sent and pongs received, for diagnostics.
    pings: u64,
    pongs: u64,
}

impl Candidate {
    fn new(addr: SocketAddr, source: Source) -> Self {
        Self { addr, source, last_ping: None, pending: Vec::new(), last_pong: None, rtt: None, pings: 0, pongs: 0 }
    }

    fn alive(&self, now: Instant) -> bool {
        self.last_pong.is_some_and(|t| now.saturating_duration_since(t) < DEAD_AFTER)
    }

    /// Lower is better: RTT, with a same-subnet private address (RFC 1918,
    /// ULA) winning a near-tie, since traffic should stay in the VPC.
    fn score(&self) -> f64 {
        let rtt = self.rtt.map_or(f64::MAX, |r| r.as_secs_f64());
        if is_private(self.addr.ip()) && self.source == Source::Local {
            rtt * 0.9 - 0.000_2
        } else {
            rtt
        }
    }
}

pub(crate) fn is_private(ip: IpAddr) -> bool {
    match ip {
        // RFC 1918, and RFC 6598 shared space (carrier NAT, some VPCs).
        IpAddr::V4(a) => a.is_private() || (a.octets()[0] == 100 && (a.octets()[1] & 0xc0) == 64),
        IpAddr::V6(a) => (a.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// One candidate as diagnostics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CandidateStatus {
    pub addr: SocketAddr,
    pub source: Source,
    /// Answered a probe within [`DEAD_AFTER`].
    pub alive: bool,
    pub rtt: Option<Duration>,
    pub pings: u64,
    pub pongs: u64,
}

/// What the path state of a peer looks like to the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathStatus {
    Direct { addr: SocketAddr, rtt: Option<Duration> },
    Relay,
    /// No live path and no relay: packets go to the best guess.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct PathSet {
    candidates: Vec<Candidate>,
    relay_available: bool,
    current: Option<Path>,
}

impl PathSet {
    pub fn new() -> Self {
        Self { candidates: Vec::new(), relay_available: false, current: None }
    }

    /// Replaces the announced candidates, keeping what is known about
    /// addresses that stay, and every learnt address.
    pub fn set_candidates(&mut self, announced: impl IntoIterator<Item = (SocketAddr, Source)>) {
        let mut next: Vec<Candidate> = Vec::new();
        for (addr, source) in announced {
            if next.iter().any(|c| c.addr == addr) {
                continue;
            }
            let kept = self.candidates.iter().find(|c| c.addr == addr).cloned();
            next.push(kept.map_or_else(|| Candidate::new(addr, source), |c| Candidate { source, ..c }));
        }
        for c in &self.candidates {
            if c.source == Source::Learned && !next.iter().any(|n| n.addr == c.addr) {
                next.push(c.clone());
            }
        }
        next.truncate(MAX_CANDIDATES);
        self.candidates = next;
        if let Some(Path::Direct(addr)) = self.current {
            if !self.candidates.iter().any(|c| c.addr == addr) {
                self.current = None;
            }
        }
    }

    /// An address the peer was seen at; probed like any other candidate.
    pub fn learn(&mut self, addr: SocketAddr) -> bool {
        if self.candidates.iter().any(|c| c.addr == addr) {
            return false;
        }
        if self.candidates.len() >= MAX_CANDIDATES {
            // Forget the oldest learnt address that is not alive.
            let Some(i) = self.candidates.iter().position(|c| c.source == Source::Learned && c.last_pong.is_none())
            else {
                return false;
            };
            self.candidates.remove(i);
        }
        self.candidates.push(Candidate::new(addr, Source::Learned));
        true
    }

    pub fn set_relay_available(&mut self, available: bool) {
        self.relay_available = available;
    }

    /// Candidates to ping now, each with the tx id to use (from `next_tx`).
    pub fn due_pings(&mut self, now: Instant, force: bool, mut next_tx: impl FnMut() -> TxId) -> Vec<(SocketAddr, TxId)> {
        let active = match self.current {
            Some(Path::Direct(addr)) if self.is_alive(addr, now) => Some(addr),
            _ => None,
        };
        let mut out = Vec::new();
        for c in &mut self.candidates {
            c.pending.retain(|(_, at)| now.saturating_duration_since(*at) < PING_TIMEOUT);
            let interval = match active {
                Some(addr) if addr == c.addr => ACTIVE_PROBE,
                Some(_) => IDLE_PROBE,
                None => UPGRADE_PROBE,
            };
            let due = force || c.last_ping.is_none_or(|t| now.saturating_duration_since(t) >= interval);
            if !due {
                continue;
            }
            let tx = next_tx();
            if c.pending.len() >= MAX_PENDING {
                c.pending.remove(0);
            }
            c.pending.push((tx, now));
            c.last_ping = Some(now);
            c.pings += 1;
            out.push((c.addr, tx));
        }
        out
    }

    /// A verified pong for `tx`. Returns whether it answered a ping of ours
    /// (a stale or replayed pong answers nothing).
    pub fn on_pong(&mut self, tx: TxId, now: Instant) -> bool {
        // Matched by tx id, not source: the pong proves the address we
        // pinged works, whichever way the answer came back.
        let Some(c) = self.candidates.iter_mut().find(|c| c.pending.iter().any(|(t, _)| *t == tx)) else {
            return false;
        };
        let Some(i) = c.pending.iter().position(|(t, _)| *t == tx) else { return false };
        let (_, sent) = c.pending.remove(i);
        let sample = now.saturating_duration_since(sent);
        c.rtt = Some(match c.rtt {
            None => sample,
            Some(srtt) => (srtt * 7 + sample) / 8,
        });
        c.last_pong = Some(now);
        c.pongs += 1;
        true
    }

    fn is_alive(&self, addr: SocketAddr, now: Instant) -> bool {
        self.candidates.iter().any(|c| c.addr == addr && c.alive(now))
    }

    /// Re-evaluates the path; returns the new one when it changed.
    pub fn select(&mut self, now: Instant) -> Option<Path> {
        let best = self
            .candidates
            .iter()
            .filter(|c| c.alive(now))
            .min_by(|a, b| a.score().total_cmp(&b.score()));
        let current_live = match self.current {
            Some(Path::Direct(addr)) => self.candidates.iter().find(|c| c.addr == addr && c.alive(now)),
            _ => None,
        };
        let next = match (best, current_live) {
            // Keep a live path unless another is clearly better.
            (Some(b), Some(cur)) if b.score() >= cur.score() * SWITCH_MARGIN => Path::Direct(cur.addr),
            (Some(b), _) => Path::Direct(b.addr),
            (None, _) if self.relay_available => Path::Relay,
            // Nothing proven and no relay: the best guess, so a network
            // without probes (a plain WireGuard peer) still works.
            (None, _) => match (self.current, self.first_guess()) {
                (Some(p @ Path::Direct(_)), _) => p,
                (_, Some(addr)) => Path::Direct(addr),
                (_, None) => return None,
            },
        };
        if self.current == Some(next) {
            return None;
        }
        self.current = Some(next);
        Some(next)
    }

    fn first_guess(&self) -> Option<SocketAddr> {
        self.candidates.iter().min_by_key(|c| c.source).map(|c| c.addr)
    }

    pub fn current(&self) -> Option<Path> {
        self.current
    }

    pub fn status(&self, now: Instant) -> PathStatus {
        match self.current {
            Some(Path::Direct(addr)) => {
                let c = self.candidates.iter().find(|c| c.addr == addr);
                let rtt = c.filter(|c| c.alive(now)).and_then(|c| c.rtt);
                PathStatus::Direct { addr, rtt }
            }
            Some(Path::Relay) => PathStatus::Relay,
            None => PathStatus::Unknown,
        }
    }

    /// Every candidate with what probing it found.
    pub fn candidates(&self, now: Instant) -> Vec<CandidateStatus> {
        self.candidates
            .iter()
            .map(|c| CandidateStatus {
                addr: c.addr,
                source: c.source,
                alive: c.alive(now),
                rtt: c.rtt,
                pings: c.pings,
                pongs: c.pongs,
            })
            .collect()
    }

    /// Whether any candidate answered recently: worth asking the peer to
    /// punch if not.
    pub fn has_live_direct(&self, now: Instant) -> bool {
        self.candidates.iter().any(|c| c.alive(now))
    }
}

impl Default for PathSet {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn counter() -> impl FnMut() -> TxId {
        let mut n = 0u8;
        move || {
            n = n.wrapping_add(1);
            [n; 12]
        }
    }

    /// Pings every due candidate and answers the ones in `reachable` after `rtt`.
    fn round(p: &mut PathSet, now: Instant, reachable: &[SocketAddr], rtt: Duration, tx: &mut impl FnMut() -> TxId) {
        for (to, id) in p.due_pings(now, false, &mut *tx) {
            if reachable.contains(&to) {
                p.on_pong(id, now + rtt);
            }
        }
    }

    #[test]
    fn without_relay_the_first_candidate_is_the_guess() {
        let mut p = PathSet::new();
        p.set_candidates([(addr("198.51.100.1:51820"), Source::Observed), (addr("203.0.113.9:51820"), Source::Advertised)]);
        assert_eq!(p.select(Instant::now()), Some(Path::Direct(addr("203.0.113.9:51820"))));
    }

    #[test]
    fn relay_until_a_direct_path_answers_then_direct() {
        let t0 = Instant::now();
        let mut tx = counter();
        let mut p = PathSet::new();
        p.set_relay_available(true);
        p.set_candidates([(addr("198.51.100.1:51820"), Source::Observed)]);
        assert_eq!(p.select(t0), Some(Path::Relay));
        round(&mut p, t0, &[addr("198.51.100.1:51820")], Duration::from_millis(20), &mut tx);
        assert_eq!(p.select(t0 + Duration::from_millis(20)), Some(Path::Direct(addr("198.51.100.1:51820"))));
    }

    #[test]
    fn the_lowest_rtt_wins_and_a_private_address_wins_a_near_tie() {
        let t0 = Instant::now();
        let mut tx = counter();
        let (public, private, slow) =
            (addr("198.51.100.1:51820"), addr("10.0.0.5:51820"), addr("203.0.113.7:51820"));
        let mut p = PathSet::new();
        p.set_candidates([(public, Source::Observed), (private, Source::Local), (slow, Source::Advertised)]);
        for (to, id) in p.due_pings(t0, false, &mut tx) {
            let rtt = if to == slow { 40 } else { 10 };
            p.on_pong(id, t0 + Duration::from_millis(rtt));
        }
        assert_eq!(p.select(t0 + Duration::from_millis(50)), Some(Path::Direct(private)));
    }

    #[test]
    fn a_dead_direct_path_falls_back_to_relay_within_seconds_and_returns() {
        let t0 = Instant::now();
        let mut tx = counter();
        let direct = addr("198.51.100.1:51820");
        let mut p = PathSet::new();
        p.set_relay_available(true);
        p.set_candidates([(direct, Source::Observed)]);
        round(&mut p, t0, &[direct], Duration::from_millis(5), &mut tx);
        assert_eq!(p.select(t0 + Duration::from_millis(5)), Some(Path::Direct(direct)));
        // The path dies: pings go unanswered.
        let mut now = t0;
        let mut switched_at = None;
        while now < t0 + Duration::from_secs(20) {
            now += Duration::from_millis(500);
            round(&mut p, now, &[], Duration::ZERO, &mut tx);
            if p.select(now) == Some(Path::Relay) {
                switched_at = Some(now);
                break;
            }
        }
        let switched_at = switched_at.expect("falls back to relay");
        assert!(switched_at - t0 <= DEAD_AFTER + Duration::from_secs(1));
        // It comes back: the upgrade probing finds it.
        let mut back = false;
        for _ in 0..40 {
            now += Duration::from_millis(500);
            round(&mut p, now, &[direct], Duration::from_millis(5), &mut tx);
            if p.select(now + Duration::from_millis(5)) == Some(Path::Direct(direct)) {
                back = true;
                break;
            }
        }
        assert!(back, "returns to the direct path");
    }

    #[test]
    fn a_replayed_or_unknown_pong_proves_nothing() {
        let t0 = Instant::now();
        let mut tx = counter();
        let direct = addr("198.51.100.1:51820");
        let mut p = PathSet::new();
        p.set_relay_available(true);
        p.set_candidates([(direct, Source::Observed)]);
        assert!(!p.on_pong([0xee; 12], t0));
        let pings = p.due_pings(t0, false, &mut tx);
        assert!(p.on_pong(pings[0].1, t0));
        assert!(!p.on_pong(pings[0].1, t0), "the same pong twice");
    }

    #[test]
    fn learnt_addresses_survive_a_new_candidate_list_and_are_bounded() {
        let mut p = PathSet::new();
        assert!(p.learn(addr("198.51.100.9:40001")));
        assert!(!p.learn(addr("198.51.100.9:40001")));
        p.set_candidates([(addr("198.51.100.1:51820"), Source::Observed)]);
        assert_eq!(p.candidates.len(), 2);
        for port in 0..100 {
            p.learn(SocketAddr::new("198.51.100.9".parse().unwrap(), 1000 + port));
        }
        assert!(p.candidates.len() <= MAX_CANDIDATES);
    }
}
