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
//!
//! Nothing an attacker can replay moves a path (proto/probe.md, "Replay"):
//! a pong counts only if it answers a ping still outstanding to the very
//! address it came from (transaction ids are random, so one recorded before
//! a restart answers nothing); an address the peer was seen at is only
//! *unconfirmed* until a ping of ours to it is answered from it, is neither
//! shown nor used before that, and is forgotten after a few unanswered
//! pings; at most [`MAX_UNCONFIRMED`] wait at once, and a peer's probes are
//! held to a budget however many rounds are forced.

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
/// Learnt addresses waiting for their first answered ping, per peer; a new
/// one pushes out the oldest, so a flood of spoofed sources costs a bounded
/// number of probes.
pub const MAX_UNCONFIRMED: usize = 4;
/// An unconfirmed address is forgotten after this many unanswered pings.
const UNCONFIRMED_PINGS: u64 = 3;
/// A confirmed learnt address silent this long is forgotten (a NAT mapping
/// that moved on); announced candidates stay while the peer map has them.
pub const LEARNED_TTL: Duration = Duration::from_secs(120);
/// Probe budget per peer: a burst, then this many pings a second. A steady
/// state needs under 5 a second (24 candidates every 5 s); forced rounds
/// (punch requests, `meshctl ping`) draw on the burst.
const PROBE_BURST: u32 = 64;
const PROBE_RATE: u32 = 16;
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
    /// A port the peer's gateway mapped to it (PCP, NAT-PMP, UPnP IGD).
    Mapped,
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
    /// When a learnt address was first seen (the oldest unconfirmed one goes first).
    learnt_at: Option<Instant>,
}

impl Candidate {
    fn new(addr: SocketAddr, source: Source) -> Self {
        let (last_ping, pending, last_pong, rtt, learnt_at) = (None, Vec::new(), None, None, None);
        Self {
            addr,
            source,
            last_ping,
            pending,
            last_pong,
            rtt,
            pings: 0,
            pongs: 0,
            learnt_at,
        }
    }

    /// A learnt address no ping of ours has been answered from yet.
    fn unconfirmed(&self) -> bool {
        self.source == Source::Learned && self.pongs == 0
    }

    /// A learnt address to forget: unconfirmed after its pings went
    /// unanswered, or confirmed once but silent for [`LEARNED_TTL`].
    fn stale(&self, now: Instant) -> bool {
        if self.source != Source::Learned {
            return false;
        }
        if self.unconfirmed() {
            return self.pings >= UNCONFIRMED_PINGS && self.pending.is_empty();
        }
        self.last_pong
            .is_some_and(|t| now.saturating_duration_since(t) >= LEARNED_TTL)
    }

    fn alive(&self, now: Instant) -> bool {
        self.last_pong
            .is_some_and(|t| now.saturating_duration_since(t) < DEAD_AFTER)
    }

    /// Lower is better: RTT, with a private address on the peer's own
    /// interface (RFC 1918, ULA: the same VPC or LAN) winning unless the
    /// other path is more than twice as fast, since traffic should stay in
    /// the VPC. Two nodes behind one router that hairpins reach each other
    /// at its public address too, a path through the router that jitter
    /// alone would otherwise make look as fast.
    fn score(&self) -> f64 {
        let rtt = self.rtt.map_or(f64::MAX, |r| r.as_secs_f64());
        if is_private(self.addr.ip()) && self.source == Source::Local {
            rtt * 0.5 - 0.001
        } else {
            rtt
        }
    }
}

/// Whether an address can be a peer's endpoint at all: never loopback,
/// link-local, unspecified, multicast, broadcast or port 0
/// ([`crate::wire::endpoint`], the rule the rendezvous applies too). A peer
/// map or a spoofed source naming one would otherwise aim this node's
/// probes at itself, its LAN's link or a whole group. (The mesh's own
/// prefixes are refused by the node, which knows them.)
pub fn is_routable_endpoint(addr: SocketAddr) -> bool {
    crate::wire::endpoint::unusable(addr).is_none()
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
    Direct {
        addr: SocketAddr,
        rtt: Option<Duration>,
    },
    Relay,
    /// No live path and no relay: packets go to the best guess.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct PathSet {
    candidates: Vec<Candidate>,
    relay_available: bool,
    current: Option<Path>,
    /// Pings this peer may still be sent now, and when it was last topped up.
    budget: u32,
    budget_at: Option<Instant>,
    /// Pings not sent because the budget was spent, for diagnostics.
    pub(crate) over_budget: u64,
}

impl PathSet {
    pub fn new() -> Self {
        Self {
            candidates: Vec::new(),
            relay_available: false,
            current: None,
            budget: PROBE_BURST,
            budget_at: None,
            over_budget: 0,
        }
    }

    /// Replaces the announced candidates, keeping what is known about
    /// addresses that stay, and every learnt address. Addresses that can't
    /// be an endpoint ([`is_routable_endpoint`]) are left out.
    pub fn set_candidates(&mut self, announced: impl IntoIterator<Item = (SocketAddr, Source)>) {
        let mut next: Vec<Candidate> = Vec::new();
        for (addr, source) in announced {
            if !is_routable_endpoint(addr) || next.iter().any(|c| c.addr == addr) {
                continue;
            }
            let kept = self.candidates.iter().find(|c| c.addr == addr).cloned();
            next.push(kept.map_or_else(
                || Candidate::new(addr, source),
                |c| Candidate { source, ..c },
            ));
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

    /// An address the peer was seen at (peer-reflexive). It stays
    /// unconfirmed (probed, never used nor shown) until a ping of ours is
    /// answered from it. Returns whether it is new.
    pub fn learn(&mut self, addr: SocketAddr, now: Instant) -> bool {
        if !is_routable_endpoint(addr) || self.candidates.iter().any(|c| c.addr == addr) {
            return false;
        }
        let unconfirmed = self.candidates.iter().filter(|c| c.unconfirmed()).count();
        if unconfirmed >= MAX_UNCONFIRMED || self.candidates.len() >= MAX_CANDIDATES {
            // Forget the oldest unconfirmed address; confirmed ones stay.
            let oldest = (self.candidates.iter().enumerate())
                .filter(|(_, c)| c.unconfirmed())
                .min_by_key(|(_, c)| c.learnt_at)
                .map(|(i, _)| i);
            let Some(i) = oldest else { return false };
            self.candidates.remove(i);
        }
        let mut c = Candidate::new(addr, Source::Learned);
        c.learnt_at = Some(now);
        self.candidates.push(c);
        true
    }

    pub fn set_relay_available(&mut self, available: bool) {
        self.relay_available = available;
    }

    /// Candidates to ping now, each with the tx id to use (from `next_tx`,
    /// which must be unpredictable: see the module doc). Forgets learnt
    /// addresses that went stale, and holds the peer to its probe budget.
    pub fn due_pings(
        &mut self,
        now: Instant,
        force: bool,
        mut next_tx: impl FnMut() -> TxId,
    ) -> Vec<(SocketAddr, TxId)> {
        let active = match self.current {
            Some(Path::Direct(addr)) if self.is_alive(addr, now) => Some(addr),
            _ => None,
        };
        self.refill_budget(now);
        for c in &mut self.candidates {
            c.pending
                .retain(|(_, at)| now.saturating_duration_since(*at) < PING_TIMEOUT);
        }
        // The path in use stays, however stale its address looks.
        self.candidates
            .retain(|c| !c.stale(now) || active == Some(c.addr));
        let mut out = Vec::new();
        for c in &mut self.candidates {
            let interval = match active {
                Some(addr) if addr == c.addr => ACTIVE_PROBE,
                Some(_) => IDLE_PROBE,
                None => UPGRADE_PROBE,
            };
            let due = force
                || c.last_ping
                    .is_none_or(|t| now.saturating_duration_since(t) >= interval);
            if !due {
                continue;
            }
            if self.budget == 0 {
                self.over_budget += 1;
                continue;
            }
            self.budget -= 1;
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

    fn refill_budget(&mut self, now: Instant) {
        let Some(at) = self.budget_at else {
            self.budget_at = Some(now);
            return;
        };
        let earned = now.saturating_duration_since(at).as_millis() * u128::from(PROBE_RATE) / 1000;
        if earned > 0 {
            self.budget = (u128::from(self.budget) + earned).min(u128::from(PROBE_BURST)) as u32;
            self.budget_at = Some(now);
        }
    }

    /// A verified pong for `tx` that came from `from`. Returns whether it
    /// answered a ping of ours: one still outstanding, sent to `from` itself.
    /// A pong from anywhere else proves nothing about the address pinged
    /// (it may be a recording replayed by a third party), nor does a stale
    /// or repeated one.
    pub fn on_pong(&mut self, tx: TxId, from: SocketAddr, now: Instant) -> bool {
        let Some(c) = self
            .candidates
            .iter_mut()
            .find(|c| c.addr == from && c.pending.iter().any(|(t, _)| *t == tx))
        else {
            return false;
        };
        let Some(i) = c.pending.iter().position(|(t, _)| *t == tx) else {
            return false;
        };
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
        self.candidates
            .iter()
            .any(|c| c.addr == addr && c.alive(now))
    }

    /// Re-evaluates the path; returns the new one when it changed.
    pub fn select(&mut self, now: Instant) -> Option<Path> {
        let best = self
            .candidates
            .iter()
            .filter(|c| c.alive(now))
            .min_by(|a, b| a.score().total_cmp(&b.score()));
        let current_live = match self.current {
            Some(Path::Direct(addr)) => self
                .candidates
                .iter()
                .find(|c| c.addr == addr && c.alive(now)),
            _ => None,
        };
        let next = match (best, current_live) {
            // Keep a live path unless another is clearly better.
            (Some(b), Some(cur)) if b.score() >= cur.score() * SWITCH_MARGIN => {
                Path::Direct(cur.addr)
            }
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
        self.candidates
            .iter()
            .filter(|c| !c.unconfirmed())
            .min_by_key(|c| c.source)
            .map(|c| c.addr)
    }

    pub fn current(&self) -> Option<Path> {
        self.current
    }

    /// Forgets every candidate `keep` refuses (an address that now lies
    /// inside the mesh: traffic to it would enter the tunnel it carries),
    /// and the direct path if it was one of them.
    pub fn forget_unless(&mut self, keep: impl Fn(SocketAddr) -> bool) {
        self.candidates.retain(|c| keep(c.addr));
        if let Some(Path::Direct(addr)) = self.current {
            if !keep(addr) {
                self.current = None;
            }
        }
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

    /// Every candidate with what probing it found; learnt addresses only
    /// once confirmed.
    pub fn candidates(&self, now: Instant) -> Vec<CandidateStatus> {
        self.candidates
            .iter()
            .filter(|c| !c.unconfirmed())
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

/// How far behind the newest ping seen from a peer a ping may be sent and
/// still count: pings of one round race each other along different paths.
pub const PING_WINDOW: Duration = Duration::from_secs(10);
/// Ping ids remembered per peer, so a copy of a recent ping is refused too.
const PING_WINDOW_IDS: usize = 64;

/// Which of one peer's pings are fresh: a replay window over their send
/// times and ids, as WireGuard keeps one over its counters. A stale or
/// repeated ping is neither answered nor learnt from.
///
/// The send time is the peer's clock, compared only with the peer's own
/// earlier pings, never with ours, so clock skew between nodes is harmless.
/// Right after this node starts it knows no earlier ping; a recording
/// replayed then is answered once, and what it teaches stays unconfirmed
/// (see [`PathSet::learn`]). Pings from 0.1.0 nodes carry no time and are
/// checked by id only.
#[derive(Debug, Clone, Default)]
pub struct PingWindow {
    newest: Option<u64>,
    /// Pings sent at or before this are refused: their ids may have been
    /// forgotten.
    floor: u64,
    recent: std::collections::VecDeque<(u64, TxId)>,
}

impl PingWindow {
    /// Whether a ping sent at `sent_ms` with id `tx` is fresh; a fresh one
    /// is remembered.
    pub fn accept(&mut self, sent_ms: Option<u64>, tx: TxId) -> bool {
        if self.recent.iter().any(|(_, t)| *t == tx) {
            return false;
        }
        let window = PING_WINDOW.as_millis() as u64;
        if let Some(ms) = sent_ms {
            let newest = self.newest.unwrap_or(ms);
            if ms <= self.floor || ms.saturating_add(window) < newest {
                return false;
            }
            self.newest = Some(newest.max(ms));
        }
        if self.recent.len() >= PING_WINDOW_IDS {
            if let Some((ms, _)) = self.recent.pop_front() {
                self.floor = self.floor.max(ms);
            }
        }
        self.recent.push_back((sent_ms.unwrap_or(0), tx));
        true
    }

    /// A new WireGuard session with the peer: it may have restarted with a
    /// clock that went back, so its earlier pings stop setting the bar.
    pub fn restart(&mut self) {
        self.newest = None;
        self.floor = 0;
    }
}

impl Default for PathSet {
    fn default() -> Self {
        Self::new()
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

    fn counter() -> impl FnMut() -> TxId {
        let mut n = 0u8;
        move || {
            n = n.wrapping_add(1);
            [n; 12]
        }
    }

    /// Pings every due candidate and answers the ones in `reachable` after `rtt`.
    fn round(
        p: &mut PathSet,
        now: Instant,
        reachable: &[SocketAddr],
        rtt: Duration,
        tx: &mut impl FnMut() -> TxId,
    ) {
        for (to, id) in p.due_pings(now, false, &mut *tx) {
            if reachable.contains(&to) {
                p.on_pong(id, to, now + rtt);
            }
        }
    }

    #[test]
    fn without_relay_the_first_candidate_is_the_guess() {
        let mut p = PathSet::new();
        p.set_candidates([
            (addr("198.51.100.1:51820"), Source::Observed),
            (addr("203.0.113.9:51820"), Source::Advertised),
        ]);
        assert_eq!(
            p.select(Instant::now()),
            Some(Path::Direct(addr("203.0.113.9:51820")))
        );
    }

    #[test]
    fn relay_until_a_direct_path_answers_then_direct() {
        let t0 = Instant::now();
        let mut tx = counter();
        let mut p = PathSet::new();
        p.set_relay_available(true);
        p.set_candidates([(addr("198.51.100.1:51820"), Source::Observed)]);
        assert_eq!(p.select(t0), Some(Path::Relay));
        round(
            &mut p,
            t0,
            &[addr("198.51.100.1:51820")],
            Duration::from_millis(20),
            &mut tx,
        );
        assert_eq!(
            p.select(t0 + Duration::from_millis(20)),
            Some(Path::Direct(addr("198.51.100.1:51820")))
        );
    }

    #[test]
    fn the_lowest_rtt_wins_and_a_private_address_wins_a_near_tie() {
        let t0 = Instant::now();
        let mut tx = counter();
        let (public, private, slow) = (
            addr("198.51.100.1:51820"),
            addr("10.0.0.5:51820"),
            addr("203.0.113.7:51820"),
        );
        let mut p = PathSet::new();
        p.set_candidates([
            (public, Source::Observed),
            (private, Source::Local),
            (slow, Source::Advertised),
        ]);
        for (to, id) in p.due_pings(t0, false, &mut tx) {
            let rtt = if to == slow { 40 } else { 10 };
            p.on_pong(id, to, t0 + Duration::from_millis(rtt));
        }
        assert_eq!(
            p.select(t0 + Duration::from_millis(50)),
            Some(Path::Direct(private))
        );
    }

    #[test]
    fn a_private_address_beats_a_hairpin_that_looks_as_fast_and_takes_over_from_it() {
        let t0 = Instant::now();
        let mut tx = counter();
        let (hairpin, private) = (addr("203.0.113.51:51821"), addr("192.168.51.11:51820"));
        let mut p = PathSet::new();
        p.set_relay_available(true);
        // The hairpin answered first, and a little faster.
        p.set_candidates([(hairpin, Source::Observed)]);
        round(&mut p, t0, &[hairpin], Duration::from_millis(3), &mut tx);
        assert_eq!(p.select(t0), Some(Path::Direct(hairpin)));
        p.set_candidates([(hairpin, Source::Observed), (private, Source::Local)]);
        let t1 = t0 + IDLE_PROBE;
        for (to, id) in p.due_pings(t1, true, &mut tx) {
            let rtt = if to == private { 4 } else { 3 };
            p.on_pong(id, to, t1 + Duration::from_millis(rtt));
        }
        assert_eq!(
            p.select(t1 + Duration::from_millis(5)),
            Some(Path::Direct(private))
        );
    }

    #[test]
    fn a_dual_stack_peer_takes_the_faster_family_and_falls_back_to_the_other() {
        let t0 = Instant::now();
        let mut tx = counter();
        let (v4, v6) = (addr("203.0.113.44:40512"), addr("[2001:db8:44::2]:51820"));
        let mut p = PathSet::new();
        p.set_relay_available(true);
        p.set_candidates([(v4, Source::Observed), (v6, Source::Local)]);
        for (to, id) in p.due_pings(t0, false, &mut tx) {
            let rtt = if to == v6 { 2 } else { 9 };
            p.on_pong(id, to, t0 + Duration::from_millis(rtt));
        }
        assert_eq!(
            p.select(t0 + Duration::from_millis(10)),
            Some(Path::Direct(v6))
        );
        // IPv6 breaks; IPv4 keeps answering: within DEAD_AFTER, IPv4.
        let mut now = t0;
        let mut fell_back = None;
        while now < t0 + Duration::from_secs(20) {
            now += Duration::from_millis(500);
            round(&mut p, now, &[v4], Duration::from_millis(9), &mut tx);
            if p.select(now + Duration::from_millis(9)) == Some(Path::Direct(v4)) {
                fell_back = Some(now);
                break;
            }
        }
        let fell_back = fell_back.expect("falls back to IPv4");
        assert!(fell_back - t0 <= DEAD_AFTER + Duration::from_secs(1));
        // IPv6 heals: the upgrade probing finds it and it wins again.
        let mut back = false;
        for _ in 0..40 {
            now += Duration::from_millis(500);
            round(&mut p, now, &[v4, v6], Duration::from_millis(2), &mut tx);
            if p.current() == Some(Path::Direct(v6)) {
                back = true;
                break;
            }
            p.select(now + Duration::from_millis(2));
        }
        assert!(
            back || p.current() == Some(Path::Direct(v6)),
            "back on IPv6"
        );
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
        assert_eq!(
            p.select(t0 + Duration::from_millis(5)),
            Some(Path::Direct(direct))
        );
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
        assert!(!p.on_pong([0xee; 12], direct, t0));
        let pings = p.due_pings(t0, false, &mut tx);
        assert!(p.on_pong(pings[0].1, direct, t0));
        assert!(!p.on_pong(pings[0].1, direct, t0), "the same pong twice");
    }

    #[test]
    fn a_pong_from_another_address_than_the_one_pinged_proves_nothing() {
        let t0 = Instant::now();
        let mut tx = counter();
        let (dead, elsewhere) = (addr("198.51.100.1:51820"), addr("203.0.113.66:4444"));
        let mut p = PathSet::new();
        p.set_relay_available(true);
        p.set_candidates([(dead, Source::Observed)]);
        let pings = p.due_pings(t0, false, &mut tx);
        assert!(
            !p.on_pong(pings[0].1, elsewhere, t0),
            "answered from an address never pinged"
        );
        assert_eq!(p.select(t0), Some(Path::Relay));
        assert!(
            p.on_pong(pings[0].1, dead, t0),
            "still outstanding for the address pinged"
        );
    }

    #[test]
    fn learnt_addresses_survive_a_new_candidate_list_and_are_bounded() {
        let t0 = Instant::now();
        let mut p = PathSet::new();
        assert!(p.learn(addr("198.51.100.9:40001"), t0));
        assert!(!p.learn(addr("198.51.100.9:40001"), t0));
        p.set_candidates([(addr("198.51.100.1:51820"), Source::Observed)]);
        assert_eq!(p.candidates.len(), 2);
        for port in 0..100 {
            p.learn(
                SocketAddr::new("198.51.100.9".parse().unwrap(), 1000 + port),
                t0,
            );
        }
        assert!(p.candidates.len() <= 1 + MAX_UNCONFIRMED);
    }

    #[test]
    fn a_learnt_address_is_unconfirmed_until_answered_from_and_then_forgotten_if_silent() {
        let t0 = Instant::now();
        let mut tx = counter();
        let (announced, spoofed, real) = (
            addr("198.51.100.1:51820"),
            addr("203.0.113.66:4444"),
            addr("198.51.100.1:40000"),
        );
        let mut p = PathSet::new();
        p.set_relay_available(true);
        p.set_candidates([(announced, Source::Observed)]);
        p.learn(spoofed, t0);
        p.learn(real, t0);
        let shown = |p: &PathSet, now| p.candidates(now).iter().map(|c| c.addr).collect::<Vec<_>>();
        assert_eq!(
            shown(&p, t0),
            [announced],
            "unconfirmed addresses are not shown"
        );
        // Only `real` answers; a few rounds later `spoofed` is gone.
        let mut now = t0;
        for _ in 0..8 {
            round(&mut p, now, &[real], Duration::from_millis(5), &mut tx);
            now += UPGRADE_PROBE + PING_TIMEOUT;
        }
        assert_eq!(shown(&p, now), [announced, real]);
        assert!(
            p.candidates.iter().all(|c| c.addr != spoofed),
            "an address never answered from is forgotten"
        );
        // `real` falls silent: forgotten after LEARNED_TTL.
        let silent_since = now;
        while now < silent_since + LEARNED_TTL + UPGRADE_PROBE * 2 {
            round(&mut p, now, &[], Duration::ZERO, &mut tx);
            now += UPGRADE_PROBE;
        }
        assert_eq!(shown(&p, now), [announced]);
    }

    #[test]
    fn endpoints_that_cannot_be_a_peer_are_refused() {
        let t0 = Instant::now();
        let mut p = PathSet::new();
        let refused = [
            "127.0.0.1:51820",
            "169.254.1.1:51820",
            "0.0.0.0:51820",
            "224.0.0.1:51820",
            "255.255.255.255:51820",
            "198.51.100.1:0",
            "[::1]:51820",
            "[fe80::1]:51820",
            "[ff02::1]:51820",
            "[::ffff:127.0.0.1]:51820",
            "[::]:51820",
        ];
        p.set_candidates(refused.iter().map(|a| (addr(a), Source::Observed)));
        for a in refused {
            assert!(!p.learn(addr(a), t0), "{a} learnt");
        }
        assert!(p.candidates.is_empty());
        p.set_candidates([
            (addr("[2001:db8::1]:51820"), Source::Local),
            (addr("10.0.0.1:51820"), Source::Local),
        ]);
        assert_eq!(p.candidates.len(), 2);
    }

    #[test]
    fn forced_rounds_are_held_to_the_probe_budget() {
        let t0 = Instant::now();
        let mut tx = counter();
        let mut p = PathSet::new();
        p.set_candidates(
            (0..MAX_CANDIDATES as u16)
                .map(|i| (addr(&format!("198.51.100.1:{}", 1000 + i)), Source::Local)),
        );
        // A thousand forced rounds within one second: a punch storm.
        let mut sent = 0;
        for i in 0..1000u64 {
            sent += p
                .due_pings(t0 + Duration::from_millis(i), true, &mut tx)
                .len();
        }
        assert!(
            sent <= (PROBE_BURST + PROBE_RATE) as usize,
            "{sent} pings in a second"
        );
        assert!(p.over_budget > 0);
    }

    #[test]
    fn a_ping_window_refuses_copies_and_old_pings_but_not_a_late_one_of_the_same_round() {
        let mut w = PingWindow::default();
        let t = 1_764_864_000_000u64;
        assert!(w.accept(Some(t), [1; 12]));
        assert!(!w.accept(Some(t), [1; 12]), "the same ping twice");
        assert!(w.accept(Some(t + 5_000), [2; 12]));
        assert!(
            w.accept(Some(t + 1), [3; 12]),
            "a ping of an earlier round, a few seconds late"
        );
        assert!(
            !w.accept(Some(t - 60_000), [4; 12]),
            "a recording a minute old"
        );
        // Ids are forgotten after a while, and so are the times they covered.
        for i in 0..PING_WINDOW_IDS as u64 {
            assert!(w.accept(Some(t + 6_000 + i), [(i as u8).wrapping_add(10); 12]));
        }
        assert!(
            !w.accept(Some(t + 5_000), [2; 12]),
            "forgotten id, but sent before the floor"
        );
        // A peer that restarted with its clock an hour back: after the new
        // session its pings count again.
        assert!(!w.accept(Some(t - 3_600_000), [200; 12]));
        w.restart();
        assert!(w.accept(Some(t - 3_600_000), [200; 12]));
        // 0.1.0 pings carry no time: checked by id.
        assert!(w.accept(None, [201; 12]));
        assert!(!w.accept(None, [201; 12]));
    }
}
