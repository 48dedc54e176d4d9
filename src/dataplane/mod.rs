//! The node's I/O: the TUN, the UDP socket, the packet loop, and bringing
//! `mesh0` up and down.
//!
//! Does I/O. [`run`] ([`lifecycle`]) brings a node up in the order that is
//! the contract with `meshctl`, systemd and the tests, runs the packet loop
//! ([`driver`]) around the node agent ([`crate::agent`]) and the rendezvous
//! session ([`crate::rendezvous::client`]), and tears it all down.
//! `offload/` is pure packet surgery for the offloads (TSO, GRO).

pub mod cache;
pub mod candidates;
pub mod driver;
pub mod lifecycle;
pub mod port;
pub mod portmap;
pub mod quic;
pub mod tun;
pub mod udp;

pub use crate::agent::MESH_KEEPALIVE;
pub use lifecycle::{run, DataplaneError, Ended, RunOptions};
