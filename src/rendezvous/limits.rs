//! Rates for what an admitted node may send the rendezvous: token buckets
//! per message kind and connection, per (source, target) punch pair, and a
//! tolerance for messages over the rate before the connection is closed.
//!
//! Pure: the time is an input (`now`), read by the shell.

// Pure: the clock and randomness are inputs (clippy.toml names what is
// forbidden).
#![deny(clippy::disallowed_methods)]

use std::fmt;
use std::time::{Duration, Instant};

/// A message kind a node sends once admitted (`NodeMessage`), as metrics
/// label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    Candidates,
    Nat,
    Punch,
    Paths,
}

impl MessageKind {
    pub const ALL: [MessageKind; 4] = [
        MessageKind::Candidates,
        MessageKind::Nat,
        MessageKind::Punch,
        MessageKind::Paths,
    ];

    /// Its `type` on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Candidates => "candidates",
            MessageKind::Nat => "nat",
            MessageKind::Punch => "punch",
            MessageKind::Paths => "paths",
        }
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rate: `burst` at once, then one more every `every`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub burst: u32,
    pub every: Duration,
}

impl Rate {
    pub const fn new(burst: u32, every: Duration) -> Self {
        Self { burst, every }
    }
}

/// What the registry allows each admitted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `candidates` messages: a node sends one when an interface address
    /// comes or goes.
    pub candidates: Rate,
    /// `nat` messages: sent when the node's view of its NAT changes.
    pub nat: Rate,
    /// `punch` messages, all targets together: a node asks each peer it
    /// cannot reach at most every 10 s.
    pub punch: Rate,
    /// `punch` messages from one node towards one peer: each makes the peer
    /// probe every candidate of the requester.
    pub punch_pair: Rate,
    /// `paths` reports: a node sends one when a path changed, at most
    /// every [`PATH_REPORT_EVERY`](crate::agent::PATH_REPORT_EVERY).
    pub paths: Rate,
    /// Messages over their rate that a connection may send before it is
    /// closed ([`CloseReason::Flooding`](super::registry::CloseReason)).
    pub tolerance: Rate,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            candidates: Rate::new(10, Duration::from_secs(2)),
            nat: Rate::new(10, Duration::from_secs(2)),
            punch: Rate::new(100, Duration::from_millis(20)),
            punch_pair: Rate::new(2, Duration::from_secs(5)),
            paths: Rate::new(3, Duration::from_secs(4)),
            tolerance: Rate::new(50, Duration::from_secs(1)),
        }
    }
}

impl Limits {
    /// The rate of one message kind.
    pub fn of(&self, kind: MessageKind) -> Rate {
        match kind {
            MessageKind::Candidates => self.candidates,
            MessageKind::Nat => self.nat,
            MessageKind::Punch => self.punch,
            MessageKind::Paths => self.paths,
        }
    }
}

/// A token bucket counting whole messages. It starts full; a clock that
/// steps back refills nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    tokens: u32,
    /// Tokens are accounted up to this instant.
    mark: Instant,
}

impl Bucket {
    pub fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: rate.burst,
            mark: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let Some(elapsed) = now.checked_duration_since(self.mark) else {
            return;
        };
        let every = rate.every.as_nanos().max(1);
        let earned = elapsed.as_nanos() / every;
        if earned == 0 {
            return;
        }
        let tokens = u128::from(self.tokens).saturating_add(earned);
        if tokens >= u128::from(rate.burst) {
            self.tokens = rate.burst;
            self.mark = now;
        } else {
            // Below `burst`, so it fits; keep the part of a token earned.
            self.tokens = u32::try_from(tokens).unwrap_or(rate.burst);
            let spent = u64::try_from(earned).unwrap_or(u64::MAX);
            self.mark = u32::try_from(spent)
                .ok()
                .and_then(|n| rate.every.checked_mul(n))
                .and_then(|d| self.mark.checked_add(d))
                .unwrap_or(now);
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    /// Whether the bucket is full again: it then remembers nothing and can
    /// be forgotten.
    pub fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let mut probe = *self;
        probe.refill(rate, now);
        probe.tokens >= rate.burst
    }
}

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "a test starts its clock anywhere"
)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_one_per_interval() {
        let rate = Rate::new(3, Duration::from_secs(2));
        let t0 = Instant::now();
        let mut bucket = Bucket::full(rate, t0);
        assert!((0..3).all(|_| bucket.take(rate, t0)));
        assert!(!bucket.take(rate, t0));
        assert!(!bucket.take(rate, t0 + Duration::from_millis(1999)));
        assert!(bucket.take(rate, t0 + Duration::from_secs(2)));
        assert!(!bucket.take(rate, t0 + Duration::from_secs(3)));
        // The half token earned at 3 s was kept: one more at 4 s.
        assert!(bucket.take(rate, t0 + Duration::from_secs(4)));
        assert!(!bucket.is_full(rate, t0 + Duration::from_secs(5)));
        assert!(bucket.is_full(rate, t0 + Duration::from_secs(3600)));
        // Never more than the burst, however long it rested.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..10).filter(|_| bucket.take(rate, later)).count(), 3);
    }

    #[test]
    fn a_clock_that_steps_back_refills_nothing() {
        let rate = Rate::new(1, Duration::from_secs(1));
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut bucket = Bucket::full(rate, t0);
        assert!(bucket.take(rate, t0));
        assert!(!bucket.take(rate, t0 - Duration::from_secs(5)));
        assert!(!bucket.take(rate, t0 + Duration::from_millis(500)));
        assert!(bucket.take(rate, t0 + Duration::from_secs(1)));
    }
}
