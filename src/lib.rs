//! meshd: a WireGuard overlay mesh for Kubernetes nodes across clouds and NATs.
//!
//! # Architecture
//!
//! **Data path.** A packet written to `mesh0` is read by the driver's packet
//! loop ([`dataplane`]), routed by longest-prefix match over the peers'
//! allowed IPs, encrypted by that peer's WireGuard session ([`engine`]) and
//! sent on the node's one UDP socket; the reverse path decrypts, checks that
//! the inner source is allowed for the sending peer, and writes the packet
//! back to `mesh0`. TUN super-packets are cut and joined by [`offload`].
//!
//! **Control path.** The node [`agent`] owns the engine and everything a
//! node keeps beside it (the peer map, relay ids, NAT observation, ping and
//! netcheck, status); the driver hands it what arrives and flushes what it
//! returns. The rendezvous session ([`rendezvous::client`]) carries the
//! agent's messages; `meshctl` asks over a Unix socket ([`control`]);
//! interface state is applied through rtnetlink ([`netlink`]) by the
//! start-up and teardown shell (`dataplane::lifecycle`).
//!
//! **The sans-IO rule.** Protocol logic never touches a socket, a clock, a
//! random source or a file. [`agent`], [`engine`], [`wire`], [`offload`],
//! the registry, the relay table and the pure half of [`identity`] take
//! inputs with `now` (and seeds) and return outputs as data; the shells
//! ([`dataplane`], [`netlink`], [`control`], the quinn servers) do the I/O.
//! Pure modules deny `clippy::disallowed_methods` (clippy.toml names the
//! clocks and random sources). So the whole mesh — joins through the real
//! registry, handshakes, punching, the relay, loss, roaming, a rendezvous
//! restart — runs deterministically in [`sim`] with a simulated clock and an
//! in-memory network.
//!
//! | module | what | I/O |
//! |---|---|---|
//! | [`identity`] | x25519 keys, key files, the join token, the rendezvous's certificate hash | key files only |
//! | [`paths`] | the node's and the rendezvous's state-directory layout | none |
//! | [`portmap`] | port mapping on the gateway (PCP, NAT-PMP, UPnP IGD): when to probe, renew, give up; which answers to believe | pure |
//! | [`config`] | TOML → validated config | reads the file |
//! | [`wire`] | datagram demultiplexing, control messages, probes, NAT checks, relay frames | pure |
//! | [`engine`] | peers, routing, sessions, timers, path choice | pure |
//! | [`agent`] | the node's control state: peer map → peers, relay ids, NAT observation, ping/netcheck/NAT check, status; `handle_*` in, `poll_*` out | pure |
//! | [`offload`] | TUN offloads: TSO split, GRO coalescing | pure |
//! | [`relay`] | relaying between nodes: forwarding, rate limits, counters; its quinn shell | pure table; shell does I/O |
//! | [`rendezvous`] | registry (decides admission, emits `Admitted`), admission limits and rates, store, the quinn server, its metrics, the node's client | pure registry, limits; shells do I/O |
//! | [`metrics`] | Prometheus text format (prometheus-client) and the `/metrics` endpoint (hyper) both binaries share | the endpoint |
//! | [`sockets`] | UDP helpers both binaries use (buffers, v4-mapped addresses, the QUIC source filter) | socket options |
//! | `fuzzing` | harnesses of the fuzz targets in `fuzz/` (hidden) | none |
//! | [`dataplane`] | TUN, UDP, the packet loop (`driver`), start-up and teardown (`lifecycle`), the peer-map cache | yes |
//! | [`netlink`] | interface address, MTU, routes | yes |
//! | [`control`] | local API types, server, client and tables, meshd's metrics, WireGuard UAPI | yes |
//! | [`kube`] | kubelet's env file, `meshctl kube` outputs | writes the env file |
//! | [`systemd`] | sd_notify: ready, status, stopping | one datagram each |
//! | [`sim`] | simulated clock and network, driving agents, the registry and the relay table (feature `sim`) | none |

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
pub mod portmap;
pub mod relay;
pub mod rendezvous;
#[cfg(feature = "sim")]
pub mod sim;
pub mod sockets;
pub mod systemd;
pub mod wire;
