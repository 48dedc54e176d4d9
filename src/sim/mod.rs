//! Deterministic simulation: the whole mesh in one thread, in simulated time.
//!
//! No I/O: no socket, no real clock (beyond one opaque origin, see
//! [`SimClock::new`]), no OS randomness of its own. Built only with the
//! `sim` feature, which also switches boringtun to its mock clock, so
//! binaries built with it are for tests only.
//!
//! The pieces, in the shape of quinn-proto's test `Pair` and firezone's
//! seeded network simulation:
//!
//! - [`SimClock`] (`clock.rs`) moves the engine's `now` and boringtun's
//!   mock clock together, so WireGuard's timers fire exactly when the
//!   engine thinks they should;
//! - [`SimNet`] (`net.rs`) is an in-memory UDP network with seeded latency,
//!   jitter, loss and path MTU per link, NAT rebinding, spoofed injection,
//!   capture and counters;
//! - [`Nat`] (`nat.rs`) puts hosts behind a NAT on that network: RFC 4787
//!   mapping and filtering behaviours, timeouts, hairpinning, 1:1 NAT,
//!   several hosts on one private subnet;
//! - [`Sim`] (`harness.rs`) owns N node agents ([`crate::agent::Agent`],
//!   each with its engine [`crate::engine::Node`]) on that network and
//!   drives them event by event: it delivers datagrams, fires timers at
//!   `poll_timeout` deadlines, drains and recycles every output, and
//!   records a [`TraceEntry`] history that a seed fully determines. The
//!   rendezvous is the real registry and relay table
//!   ([`crate::rendezvous::registry::Registry`],
//!   [`crate::relay::table::RelayTable`]) behind [`RENDEZVOUS_ADDR`]:
//!   joins with a token, peer-map deltas, punch requests, relayed frames
//!   with [`RelayConfig`] latency and loss, removals and restarts;
//! - `packet.rs` builds numbered inner UDP probes and ICMP echo requests
//!   and parses what comes out of a node's TUN, so a test can say exactly
//!   which packets arrived.
//!
//! A test is a topology, some inputs and a run:
//!
//! ```
//! use meshd::sim::Sim;
//! use std::time::Duration;
//!
//! let mut sim = Sim::new(7);
//! let a = sim.add_node("a", "100.72.0.1".parse().unwrap(), "192.0.2.1:51820".parse().unwrap());
//! let b = sim.add_node("b", "100.72.0.2".parse().unwrap(), "192.0.2.2:51820".parse().unwrap());
//! sim.connect(a, b);
//!
//! sim.send_probe(a, b, 1);
//! sim.run_for(Duration::from_secs(1));
//!
//! assert_eq!(sim.probes_received(b, a), [1]);
//! ```
//!
//! boringtun still draws its ephemeral keys and cookie secrets from the OS,
//! so the *bytes* of handshakes differ between runs; their sizes, timing
//! and outcomes do not, and those are all the trace records.

// Test support: a scenario that misuses the harness (two hosts on one
// address, an unparsable seed) is a failed test, which is a panic.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod clock;
mod harness;
mod nat;
mod net;
pub mod packet;
mod seeds;

pub use clock::SimClock;
pub use harness::{
    NodeId, RelayConfig, Sim, SinkId, TimedOut, TraceEntry, NODE_MTU, RENDEZVOUS_ADDR,
};
pub use nat::{Filtering, Mapping, Nat, NatConfig, NatId, NatStats, OneToOne};
pub use net::{Captured, Datagram, Delivery, HostId, LinkConfig, NetStats, SimNet};
pub use seeds::{for_each_seed, SEEDS};
