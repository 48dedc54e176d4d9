//! Who may start an admission at the rendezvous, so that no one source can
//! lock the others out.
//!
//! Pure: the accept loop asks [`Pending::offer`] about each incoming QUIC
//! connection (its source, whether QUIC already validated its address) and
//! tells [`Pending::done`] when that admission ended, either way. Anyone can
//! open connections, and each one in admission holds memory and a slot
//! until it sends a hello that verifies or its deadline passes, so:
//!
//! - one source (an IPv4 address, or an IPv6 /64: what one subscriber
//!   usually has) holds at most [`Limits::per_source`] slots; more are
//!   refused at once, whatever else is going on;
//! - once more than [`Limits::validate_above`] admissions are pending, a
//!   connection whose address QUIC has not validated gets a Retry
//!   (RFC 9000 §8.1.2) instead of a slot: a flood from spoofed addresses
//!   never comes back with the token, a real node does, one round trip later;
//! - [`Limits::max`] bounds the table whatever happens (the last resort).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The caps of the admission table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Admissions one source may have pending at once.
    pub per_source: usize,
    /// Past this many pending admissions, unvalidated addresses get a Retry.
    pub validate_above: usize,
    /// Admissions pending at once, all sources together.
    pub max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_source: 8,
            validate_above: 32,
            max: 256,
        }
    }
}

/// Where an admission comes from, for the per-source cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    /// The address's source: IPv4 (also when mapped into IPv6) as it is,
    /// IPv6 cut to its /64.
    pub fn of(addr: SocketAddr) -> Self {
        match addr.ip().to_canonical() {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !(u128::from(u64::MAX));
                Self(IpAddr::V6(Ipv6Addr::from(prefix)))
            }
        }
    }
}

/// What to do with an incoming connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start its admission; call [`Pending::done`] when it ends.
    Admit,
    /// Answer with a QUIC Retry: the address must be validated first.
    Validate,
    /// Refuse it (QUIC CONNECTION_REFUSED).
    Refuse(Refusal),
}

/// Why a connection was refused before admission started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its source already has [`Limits::per_source`] admissions pending.
    PerSource,
    /// [`Limits::max`] admissions are pending.
    TableFull,
}

/// What the table did since the rendezvous started, for its metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionCounts {
    /// Admissions pending now.
    pub pending: usize,
    pub refused_per_source: u64,
    pub refused_table_full: u64,
    /// Retry packets sent to validate an address.
    pub validations: u64,
}

/// The admissions in flight, by source.
#[derive(Debug, Default)]
pub struct Pending {
    limits: Limits,
    by_source: HashMap<Source, usize>,
    counts: AdmissionCounts,
}

impl Pending {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            by_source: HashMap::new(),
            counts: AdmissionCounts::default(),
        }
    }

    /// Decides about a connection from `source`; `validated` is whether
    /// QUIC has validated its address (it came back with a Retry token).
    /// An [`Decision::Admit`] counts as pending from now on.
    pub fn offer(&mut self, source: Source, validated: bool) -> Decision {
        let total = self.counts.pending;
        if !validated && total >= self.limits.validate_above {
            self.counts.validations += 1;
            return Decision::Validate;
        }
        let held = self.by_source.entry(source).or_insert(0);
        let refusal = if *held >= self.limits.per_source {
            Refusal::PerSource
        } else if total >= self.limits.max {
            Refusal::TableFull
        } else {
            *held += 1;
            self.counts.pending += 1;
            return Decision::Admit;
        };
        if *held == 0 {
            self.by_source.remove(&source);
        }
        match refusal {
            Refusal::PerSource => self.counts.refused_per_source += 1,
            Refusal::TableFull => self.counts.refused_table_full += 1,
        }
        Decision::Refuse(refusal)
    }

    /// An admission from `source` ended (admitted, refused or timed out).
    pub fn done(&mut self, source: Source) {
        if let Some(held) = self.by_source.get_mut(&source) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.by_source.remove(&source);
            }
            self.counts.pending = self.counts.pending.saturating_sub(1);
        }
    }

    pub fn counts(&self) -> AdmissionCounts {
        self.counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(text: &str) -> Source {
        Source::of(text.parse().unwrap())
    }

    fn limits() -> Limits {
        Limits {
            per_source: 2,
            validate_above: 4,
            max: 6,
        }
    }

    #[test]
    fn one_source_gets_its_share_and_no_more() {
        let mut pending = Pending::new(limits());
        let attacker = source("192.0.2.66:1000");
        assert_eq!(pending.offer(attacker, false), Decision::Admit);
        assert_eq!(pending.offer(attacker, false), Decision::Admit);
        assert_eq!(
            pending.offer(attacker, false),
            Decision::Refuse(Refusal::PerSource)
        );
        assert_eq!(
            pending.offer(source("192.0.2.1:51820"), false),
            Decision::Admit
        );
        assert_eq!(pending.counts().refused_per_source, 1);
    }

    #[test]
    fn a_finished_admission_frees_its_sources_slot() {
        let mut pending = Pending::new(limits());
        let node = source("192.0.2.1:51820");
        pending.offer(node, false);
        pending.offer(node, false);
        pending.done(node);
        assert_eq!(pending.offer(node, false), Decision::Admit);
        assert_eq!(pending.counts().pending, 2);
    }

    #[test]
    fn ports_of_one_address_and_addresses_of_one_ipv6_64_are_one_source() {
        assert_eq!(source("192.0.2.1:1"), source("192.0.2.1:2"));
        assert_eq!(source("[::ffff:192.0.2.1]:1"), source("192.0.2.1:2"));
        assert_eq!(
            source("[2001:db8:1:2::1]:1"),
            source("[2001:db8:1:2:ffff::9]:2")
        );
        assert_ne!(source("[2001:db8:1:2::1]:1"), source("[2001:db8:1:3::1]:1"));
    }

    #[test]
    fn past_the_threshold_unvalidated_addresses_are_asked_to_validate() {
        let mut pending = Pending::new(limits());
        for i in 1..=4 {
            assert_eq!(
                pending.offer(source(&format!("192.0.2.{i}:1")), false),
                Decision::Admit
            );
        }
        let newcomer = source("192.0.2.9:1");
        assert_eq!(pending.offer(newcomer, false), Decision::Validate);
        assert_eq!(pending.offer(newcomer, true), Decision::Admit);
        assert_eq!(pending.counts().validations, 1);
    }

    #[test]
    fn the_table_stays_bounded_for_validated_sources_too() {
        let mut pending = Pending::new(limits());
        for i in 1..=6 {
            assert_eq!(
                pending.offer(source(&format!("192.0.2.{i}:1")), true),
                Decision::Admit
            );
        }
        assert_eq!(
            pending.offer(source("192.0.2.9:1"), true),
            Decision::Refuse(Refusal::TableFull)
        );
        assert_eq!(pending.counts().refused_table_full, 1);
    }

    #[test]
    fn refusals_leave_no_entry_behind_and_stray_dones_change_nothing() {
        let mut pending = Pending::new(Limits {
            per_source: 1,
            validate_above: 9,
            max: 1,
        });
        pending.offer(source("192.0.2.1:1"), true);
        for i in 2..100 {
            pending.offer(source(&format!("192.0.2.{i}:1")), true);
        }
        pending.done(source("192.0.2.50:1"));
        assert_eq!(pending.by_source.len(), 1);
        assert_eq!(pending.counts().pending, 1);
    }
}
