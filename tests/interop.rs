#![cfg(not(feature = "sim"))]
//! meshd speaks plain WireGuard: a meshd node and a `wireguard-go` node
//! configured with `wg`, as any WireGuard user would, carry each other's
//! traffic. Needs root, `wireguard-go`, `wireguard-tools` and `iputils-ping`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod common;

use common::{Lab, MB};

/// The control experiment: when this fails, the lab is broken, not meshd.
#[test]
fn the_lab_carries_plain_wireguard_between_two_wireguard_go_peers() {
    let lab = Lab::new(2);
    let _a = lab.start_wireguard_go(0, &[1]);
    let _b = lab.start_wireguard_go(1, &[0]);

    lab.node(0).pings(lab.node(1).overlay);
    lab.node(1).pings(lab.node(0).overlay);
}

#[test]
fn meshd_and_wireguard_go_ping_both_ways() {
    let lab = Lab::new(2);
    let _meshd = lab.start_meshd_with_peers(0, &[1]);
    let _wg = lab.start_wireguard_go(1, &[0]);

    lab.node(0).pings(lab.node(1).overlay);
    lab.node(1).pings(lab.node(0).overlay);
}

#[test]
fn wireguard_go_reaches_meshd_first() {
    let lab = Lab::new(2);
    let _meshd = lab.start_meshd_with_peers(0, &[1]);
    let _wg = lab.start_wireguard_go(1, &[0]);

    lab.node(1).pings(lab.node(0).overlay);
    lab.node(0).pings(lab.node(1).overlay);
}

#[test]
fn tcp_transfer_between_meshd_and_wireguard_go_both_ways() {
    let lab = Lab::new(2);
    let _meshd = lab.start_meshd_with_peers(0, &[1]);
    let _wg = lab.start_wireguard_go(1, &[0]);

    common::assert_tcp_transfer(lab.node(0), lab.node(1), 10 * MB, 1);
    common::assert_tcp_transfer(lab.node(1), lab.node(0), 10 * MB, 2);
}
