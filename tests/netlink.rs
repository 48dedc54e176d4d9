#![cfg(not(feature = "sim"))]
//! The netlink shell against a real kernel: needs root (CAP_NET_ADMIN).
//!
//! Each test runs on its own thread inside a fresh, anonymous network
//! namespace with no link to the host's; the namespace, its TUN devices,
//! addresses and routes vanish with the thread, even when the test fails.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

use std::future::Future;

use ipnet::IpNet;
use meshd::netlink::{overlapping_routes, routes_for, Link, LinkConfig, LinkState};
use nix::sched::{unshare, CloneFlags};
use tun_rs::{AsyncDevice, DeviceBuilder};

const MESH: &str = "mtnl0";

fn net(s: &str) -> IpNet {
    s.parse().expect("test prefix parses")
}

/// Runs `test` on a current-thread runtime in a new network namespace.
fn in_fresh_netns<F, Fut>(test: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let thread = std::thread::spawn(move || {
        if let Err(e) = unshare(CloneFlags::CLONE_NEWNET) {
            panic!("needs root (CAP_NET_ADMIN): cannot create a network namespace: {e}");
        }
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(test());
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// A TUN device that is down and has no address: tun-rs configures nothing,
/// so that everything the test sees was done through [`Link`].
fn tun(name: &str) -> AsyncDevice {
    DeviceBuilder::new()
        .name(name)
        .enable(false)
        .build_async()
        .expect("create TUN device (needs /dev/net/tun)")
}

/// The mesh interface as meshd configures it: a /16 and a /64 of its own,
/// and routes for peers' allowed IPs, one of which lies inside the /16.
fn mesh_config() -> LinkConfig {
    let addresses = vec![net("100.72.0.1/16"), net("fd00:72::1/64")];
    let allowed = ["100.72.0.9/32", "10.99.0.0/24", "fd00:99::/64"].map(net);
    LinkConfig {
        ifname: MESH.into(),
        mtu: 1380,
        routes: routes_for(&addresses, allowed),
        addresses,
    }
}

async fn configured_mesh() -> (AsyncDevice, Link) {
    let dev = tun(MESH);
    let mut link = Link::open(MESH).await.expect("open link");
    link.apply(&mesh_config()).await.expect("apply");
    (dev, link)
}

async fn state(link: &Link) -> LinkState {
    link.state().await.expect("read link state")
}

#[test]
fn apply_brings_up_the_link_with_its_mtu_addresses_and_routes() {
    in_fresh_netns(|| async {
        let _dev = tun(MESH);
        let mut link = Link::open(MESH).await.expect("open link");
        let before = state(&link).await;
        assert!(!before.up);

        let changes = link.apply(&mesh_config()).await.expect("apply");
        assert_eq!(
            changes.len(),
            6,
            "mtu, up, two addresses, two routes: {changes:?}"
        );

        let after = state(&link).await;
        assert!(after.up);
        assert_eq!(after.mtu, 1380);
        for address in ["100.72.0.1/16", "fd00:72::1/64"] {
            assert!(
                after.addresses.contains(&net(address)),
                "{address} in {:?}",
                after.addresses
            );
        }
        for route in ["10.99.0.0/24", "fd00:99::/64", "100.72.0.0/16"] {
            assert!(
                after.routes.contains(&net(route)),
                "{route} in {:?}",
                after.routes
            );
        }
        assert!(
            !after.routes.contains(&net("100.72.0.9/32")),
            "covered by the connected /16"
        );
    });
}

#[test]
fn applying_the_same_config_again_changes_nothing() {
    in_fresh_netns(|| async {
        let (_dev, mut link) = configured_mesh().await;
        assert_eq!(
            link.apply(&mesh_config()).await.expect("apply again"),
            vec![]
        );
    });
}

#[test]
fn a_route_dropped_from_the_config_is_removed() {
    in_fresh_netns(|| async {
        let (_dev, mut link) = configured_mesh().await;
        let mut config = mesh_config();
        config.routes.retain(|r| *r != net("10.99.0.0/24"));
        link.apply(&config).await.expect("apply without the route");

        let routes = state(&link).await.routes;
        assert!(!routes.contains(&net("10.99.0.0/24")), "{routes:?}");
        assert!(routes.contains(&net("fd00:99::/64")), "{routes:?}");
    });
}

#[test]
fn teardown_removes_only_what_meshd_added() {
    in_fresh_netns(|| async {
        let (_dev, mut link) = configured_mesh().await;
        let before = state(&link).await;
        let config = mesh_config();
        let theirs = |nets: &[IpNet], ours: &[IpNet]| {
            nets.iter()
                .filter(|n| !ours.contains(n))
                .copied()
                .collect::<Vec<_>>()
        };

        link.teardown().await.expect("teardown");

        let after = state(&link).await;
        for ours in config.addresses.iter().chain(&config.routes) {
            assert!(
                !after.addresses.contains(ours),
                "{ours} left in {:?}",
                after.addresses
            );
            assert!(
                !after.routes.contains(ours),
                "{ours} left in {:?}",
                after.routes
            );
        }
        // The kernel's own link-local address (and its fe80::/64 route) stay.
        assert_eq!(
            theirs(&after.addresses, &[]),
            theirs(&before.addresses, &config.addresses)
        );
        assert!(link.owned().addresses.is_empty() && link.owned().routes.is_empty());
    });
}

#[test]
fn overlapping_routes_names_the_interface_of_a_conflicting_route() {
    in_fresh_netns(|| async {
        let (_dev, mesh) = configured_mesh().await;
        let _other_dev = tun("mtnl1");
        let mut other = Link::open("mtnl1").await.expect("open other link");
        other
            .apply(&LinkConfig {
                ifname: "mtnl1".into(),
                mtu: 1500,
                addresses: vec![],
                routes: vec![
                    net("100.72.5.0/24"),
                    net("100.64.0.0/10"),
                    net("192.0.2.0/24"),
                ],
            })
            .await
            .expect("apply other");

        let mut found = overlapping_routes(net("100.72.0.0/16"), Some(mesh.index()))
            .await
            .expect("list overlapping routes");
        found.sort();
        assert_eq!(
            found,
            vec![
                (net("100.64.0.0/10"), "mtnl1".to_string()),
                (net("100.72.5.0/24"), "mtnl1".to_string())
            ]
        );

        let all = overlapping_routes(net("100.72.0.0/16"), None)
            .await
            .expect("list");
        assert!(
            all.contains(&(net("100.72.0.0/16"), MESH.to_string())),
            "{all:?}"
        );
        assert_eq!(
            overlapping_routes(net("172.16.0.0/12"), None)
                .await
                .expect("list"),
            vec![]
        );
    });
}
