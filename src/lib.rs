//! meshd: a WireGuard overlay mesh for Kubernetes nodes across clouds and NATs.
//!
//! # Architecture
//!
//! **Data path.** A packet written to `mesh0` is read by the driver
//! ([`dataplane`]), routed by longest-prefix match over the peers' allowed
//! IPs, encrypted by that peer's WireGuard session and sent on the node's one
//! UDP socket; the reverse path decrypts, checks that the inner source is
//! allowed for the sending peer, and writes the packet back to `mesh0`.
//!
//! **Control path.** `meshctl` talks to meshd over a Unix socket
//! ([`control`]); the running config comes from [`config`]; interface state
//! is applied through rtnetlink ([`netlink`]).
//!
//! **The sans-IO rule.** Protocol logic never touches a socket, a clock, a
//! random source or a file. [`engine`], [`wire`] and the pure half of
//! [`identity`] take inputs with `now` and return outputs as data; the
//! shells ([`dataplane`], [`netlink`], [`control`]) do the I/O. So the whole
//! mesh — handshakes, rekeys, loss, roaming — runs deterministically in
//! [`sim`] with a simulated clock and an in-memory network.
//!
//! | module | what | I/O |
//! |---|---|---|
//! | [`identity`] | x25519 keys, key files | key files only |
//! | [`config`] | TOML → validated config | reads the file |
//! | [`wire`] | datagram demultiplexing | pure |
//! | [`engine`] | peers, routing, sessions, timers | pure |
//! | [`relay`] | relaying between nodes: forwarding, rate limits, counters | pure table |
//! | [`rendezvous`] | registry, admission limits and rates, store, the quinn server, the node's client | pure registry, limits; shells do I/O |
//! | `fuzzing` | harnesses of the fuzz targets in `fuzz/` (hidden) | none |
//! | [`dataplane`] | TUN, UDP, the event loop | yes |
//! | [`netlink`] | interface address, MTU, routes | yes |
//! | [`control`] | local API types, server, client | yes |
//! | [`kube`] | kubelet's env file, `meshctl kube` outputs | writes the env file |
//! | [`systemd`] | sd_notify: ready, status, stopping | one datagram each |
//! | [`sim`] | simulated clock and network (feature `sim`) | none |

pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod ipam;
pub mod join;
pub mod kube;
pub mod metrics;
pub mod netlink;
pub mod offload;
pub mod paths;
pub mod relay;
pub mod rendezvous;
#[cfg(feature = "sim")]
pub mod sim;
pub mod sockets;
pub mod systemd;
pub mod wire;
