//! [`SimClock`]: simulated time for the engine and for boringtun together.
//!
//! No I/O. The engine takes `now` as an argument, but boringtun reads its
//! own clock; built with the `sim` feature, that clock is
//! `mock_instant::MockClock`, which only moves when told to. A simulation
//! must move both by the same amount at the same moment, or WireGuard's
//! timers (REKEY_AFTER_TIME, REKEY_TIMEOUT, KEEPALIVE_TIMEOUT, WireGuard
//! paper §6.1) would disagree with the engine's. This type is the one place
//! that does it.
//!
//! `MockClock` is thread-local in mock_instant 0.3, so parallel tests do not
//! disturb each other; in exchange a clock must stay on the thread that
//! created it (`SimClock` is neither `Send` nor `Sync`), and only one
//! simulation may run on a thread at a time. A second one on the same
//! thread is caught the next time either clock moves.

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use mock_instant::MockClock;

/// Simulated time: a fixed origin plus simulated elapsed time.
#[derive(Debug)]
pub struct SimClock {
    origin: Instant,
    elapsed: Duration,
    /// `MockClock::time()` as this clock last left it, to catch another
    /// simulation moving the same thread's mock clock.
    mock_at: Duration,
    /// The mock clock is per thread: keep this clock on its thread.
    _not_send: PhantomData<*const ()>,
}

impl SimClock {
    /// A clock at elapsed zero.
    ///
    /// The origin is read from the OS once, because `std::time::Instant` has
    /// no other constructor; only differences from it are ever used, so no
    /// outcome depends on its value.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            elapsed: Duration::ZERO,
            mock_at: MockClock::time(),
            _not_send: PhantomData,
        }
    }

    /// The current simulated instant, as the engine wants it.
    pub fn now(&self) -> Instant {
        self.origin + self.elapsed
    }

    /// Simulated time since the clock was created.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// The simulated instant `elapsed` after the origin.
    pub fn at(&self, elapsed: Duration) -> Instant {
        self.origin + elapsed
    }

    /// Simulated time from the origin to `instant` (zero for earlier ones).
    pub fn since_origin(&self, instant: Instant) -> Duration {
        instant.saturating_duration_since(self.origin)
    }

    /// Moves both clocks forward by `delta`.
    ///
    /// # Panics
    ///
    /// When something else moved this thread's mock clock since the last
    /// call: two simulations sharing one thread cannot both be right.
    pub fn advance(&mut self, delta: Duration) {
        assert_eq!(
            MockClock::time(),
            self.mock_at,
            "another simulation moved this thread's mock clock; run one simulation per thread at a time"
        );
        self.elapsed += delta;
        MockClock::advance(delta);
        self.mock_at += delta;
    }

    /// Moves both clocks forward to `instant`; an instant in the past is a
    /// no-op (time never runs backwards).
    pub fn advance_to(&mut self, instant: Instant) {
        let now = self.now();
        if instant > now {
            self.advance(instant - now);
        }
    }
}

impl Default for SimClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_moves_our_instant_and_boringtuns_clock_together() {
        let mut clock = SimClock::new();
        let start = clock.now();
        let mock_start = mock_instant::Instant::now();

        clock.advance(Duration::from_millis(1500));
        clock.advance_to(start + Duration::from_secs(3));

        assert_eq!(clock.now() - start, Duration::from_secs(3));
        assert_eq!(mock_start.elapsed(), Duration::from_secs(3));
        assert_eq!(clock.elapsed(), Duration::from_secs(3));
    }

    #[test]
    fn time_never_runs_backwards() {
        let mut clock = SimClock::new();
        clock.advance(Duration::from_secs(2));
        let later = clock.now();
        clock.advance_to(later - Duration::from_secs(1));
        assert_eq!(clock.now(), later);
    }

    #[test]
    #[should_panic(expected = "one simulation per thread")]
    fn two_clocks_on_one_thread_are_caught() {
        let mut first = SimClock::new();
        let mut second = SimClock::new();
        second.advance(Duration::from_secs(1));
        first.advance(Duration::from_secs(1));
    }
}
