//! The rendezvous relay: carries WireGuard packets between admitted nodes that
//! have no direct path (DESIGN.md "Wire" → Relay).
//!
//! [`table`] is pure: it takes a relay frame with the connection it came in
//! on and `now`, and answers with one [`Command`] — forward these bytes to
//! that connection, or drop and say why — while it enforces per-node rate
//! limits and counts traffic per (source, destination) pair. The quinn shell
//! that reads DATAGRAM frames and relay streams and executes the commands
//! sits next to it. The frame layout is [`crate::wire::relay`].
//!
//! Node ids ([`NodeId`]) are defined in [`crate::wire::relay`], since both
//! ends of the wire must agree on them, and re-exported here. Connections
//! are named by [`ConnId`], which the registry uses too: it is defined here,
//! so the relay depends on nothing of the rendezvous that runs it.

pub mod server;
pub mod stream;
pub mod table;

use std::fmt;

pub use crate::wire::relay::NodeId;
pub use table::{Command, DropReason, LimitsError, PairStats, RelayLimits, RelayStats, RelayTable};

/// A QUIC connection in the rendezvous's shell; the shell picks the
/// numbers, the registry and the relay table key their state by them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn#{}", self.0)
    }
}
