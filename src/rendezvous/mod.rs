//! mesh-rendezvous: admission, the node registry, peer-map distribution.
//!
//! [`registry`] is pure (inputs → commands), with [`limits`] for what a node
//! may send; [`store`] persists its state;
//! [`admission`] is the pure proof-of-possession check; [`server`] is the
//! quinn shell that runs them, with [`pending`] deciding which connections
//! may start an admission.

pub mod admin;
pub mod admission;
pub mod client;
pub mod held;
pub mod limits;
pub mod links;
pub mod metrics;
pub mod moves;
pub mod paths;
pub mod pending;
pub mod reflector;
pub mod registry;
pub mod server;
pub mod setup;
pub mod store;
pub mod stream;
pub mod tls;
pub mod udp;
