#![cfg(not(feature = "sim"))]
//! meshd speaks plain WireGuard: a meshd node and a `wireguard-go` node
//! configured with `wg`, as any WireGuard user would, carry each other's
//! traffic. Needs root, `wireguard-go`, `wireguard-tools` and `iputils-ping`.

mod common;

use common::Lab;

const MB: usize = 1_000_000;

/// The control experiment: if this fails, the lab is broken, not meshd.
#[test]
fn the_lab_carries_plain_wireguard_between_two_wireguard_go_peers() {
    let lab = Lab::new(2);
    let _a = lab.start_wireguard_go(0, &[1]);
    let _b = lab.start_wireguard_go(1, &[0]);

    lab.node(0).pings(lab.node(1).overlay);
    lab.node(1).pings(lab.node(0).overlay);
    common::assert_tcp_transfer(lab.node(0), lab.node(1), 10 * MB, 7);
}
