//! The mesh engine: peers, cryptokey routing, WireGuard sessions, timers.
//!
//! Pure (sans-IO): see [`Node`]. `peer.rs` is the only file that touches
//! boringtun; everything else speaks meshd's own types.

// Pure: the clock and randomness are inputs (clippy.toml names what is
// forbidden).
#![deny(clippy::disallowed_methods)]

mod buf;
pub mod icmp;
pub mod nat;
mod node;
pub mod paths;
mod peer;
pub mod routing;

pub use buf::{PacketBuf, TUN_HEADROOM};
pub use node::{
    inner_destination, DropReason, EngineError, Event, Node, NodeConfig, NodeStats, PeerId,
    PeerSpec, PeerStatus, TimeoutReason, Transmit,
};
pub use peer::PeerCounters;
