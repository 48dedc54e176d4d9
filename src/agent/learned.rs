//! Routes the cluster installed on mesh0 as peers' prefixes (DESIGN.md,
//! "Prefixes behind a node"): a route whose gateway is a peer's overlay
//! address — what flannel's host-gw backend or a BGP speaker such as
//! calico's BIRD installs when its interface is mesh0 — puts its prefix in
//! that peer's allowed IPs, with no configuration in meshd. Each side
//! learns from its own routing table, so a symmetric routing setup (BGP
//! between every pair, host-gw on every node) opens both directions.
//!
//! Pure: the routes come from [`crate::netlink::RouteWatch`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::identity::PublicKey;
use crate::netlink::KernelRoute;

/// `RTPROT_KERNEL`: routes the kernel adds itself (connected prefixes,
/// IPv6 link-local).
const RTPROT_KERNEL: u8 = 2;

/// What the routing table says about peers' prefixes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Learned {
    /// By peer: the prefixes routed through its overlay address, sorted.
    pub by_peer: BTreeMap<PublicKey, Vec<IpNet>>,
    /// Routes on mesh0 that name no peer, and why: shown by `meshctl
    /// routes`, never silently ignored.
    pub unusable: Vec<Unusable>,
}

/// A route on mesh0 meshd cannot give to a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unusable {
    pub prefix: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    pub why: UnusableWhy,
}

/// Why a route on mesh0 names no peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnusableWhy {
    /// Straight onto the link: a point-to-point TUN has no neighbours, so
    /// the route names no peer (BIRD's iBGP default; `direct;` on the
    /// session gives it the peer as gateway).
    NoGateway,
    /// Its gateway is no peer's overlay address.
    UnknownGateway,
    /// It reaches into the mesh's own overlay prefixes.
    OverlapsMesh,
}

impl UnusableWhy {
    /// Plain words for operators.
    pub fn describe(self) -> &'static str {
        match self {
            UnusableWhy::NoGateway => {
                "no gateway, so it names no peer: route it via the peer's overlay address \
                 (BIRD: `direct;` on the BGP session)"
            }
            UnusableWhy::UnknownGateway => "its gateway is no peer's overlay address",
            UnusableWhy::OverlapsMesh => "it reaches into the mesh's overlay prefixes",
        }
    }
}

/// Sorts the routes through mesh0 into peers' prefixes and unusable ones.
/// `mine`: routes meshd installed itself (left out); `mesh`: the overlay
/// prefixes; `peer_at`: the peer whose overlay address this is.
pub fn learn(
    routes: &[KernelRoute],
    mine: &[IpNet],
    mesh: &[IpNet],
    peer_at: impl Fn(IpAddr) -> Option<PublicKey>,
) -> Learned {
    let mut learned = Learned::default();
    for route in routes {
        let prefix = route.prefix.trunc();
        if route.protocol == RTPROT_KERNEL || is_link_scoped(&prefix) {
            continue;
        }
        let unusable = |why| Unusable {
            prefix,
            gateway: route.gateway,
            why,
        };
        match route.gateway {
            None if mine.contains(&prefix) || mesh.contains(&prefix) => {}
            None => learned.unusable.push(unusable(UnusableWhy::NoGateway)),
            Some(_)
                if mesh
                    .iter()
                    .any(|m| m.contains(&prefix) || prefix.contains(m)) =>
            {
                learned.unusable.push(unusable(UnusableWhy::OverlapsMesh));
            }
            Some(gateway) => match peer_at(gateway) {
                Some(peer) => learned.by_peer.entry(peer).or_default().push(prefix),
                None => learned.unusable.push(unusable(UnusableWhy::UnknownGateway)),
            },
        }
    }
    for prefixes in learned.by_peer.values_mut() {
        prefixes.sort_unstable();
        prefixes.dedup();
    }
    learned.unusable.sort_unstable_by_key(|u| u.prefix);
    learned
}

/// Link-local and multicast prefixes the kernel keeps on every interface.
fn is_link_scoped(prefix: &IpNet) -> bool {
    match prefix {
        IpNet::V4(_) => false,
        IpNet::V6(v6) => {
            let first = v6.network().segments()[0];
            first & 0xffc0 == 0xfe80 || first & 0xff00 == 0xff00
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    fn key(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn route(prefix: &str, gateway: Option<&str>, protocol: u8) -> KernelRoute {
        KernelRoute {
            prefix: net(prefix),
            oif: Some(7),
            gateway: gateway.map(|g| g.parse().unwrap()),
            protocol,
        }
    }

    const BIRD: u8 = 12;
    const BOOT: u8 = 3;

    fn peers(ip: IpAddr) -> Option<PublicKey> {
        match ip.to_string().as_str() {
            "100.72.0.2" | "fd12:3456:789a::2" => Some(key(2)),
            "100.72.0.3" => Some(key(3)),
            _ => None,
        }
    }

    fn mesh() -> Vec<IpNet> {
        vec![net("100.72.0.0/16"), net("fd12:3456:789a::/48")]
    }

    #[test]
    fn routes_via_a_peers_overlay_address_become_its_prefixes() {
        let routes = [
            route("10.244.2.0/24", Some("100.72.0.2"), BIRD),
            route("10.244.3.0/24", Some("100.72.0.3"), BOOT),
            route("fd10:244:0:2::/64", Some("fd12:3456:789a::2"), BIRD),
            route("10.245.2.0/24", Some("100.72.0.2"), BIRD),
        ];
        let learned = learn(&routes, &[], &mesh(), peers);
        assert_eq!(
            learned.by_peer[&key(2)],
            [
                net("10.244.2.0/24"),
                net("10.245.2.0/24"),
                net("fd10:244:0:2::/64")
            ]
        );
        assert_eq!(learned.by_peer[&key(3)], [net("10.244.3.0/24")]);
        assert!(learned.unusable.is_empty());
    }

    #[test]
    fn what_names_no_peer_is_listed_with_the_reason_and_meshds_own_routes_are_not() {
        let routes = [
            // BIRD's iBGP default on a point-to-point link.
            route("10.244.5.0/24", None, BIRD),
            route("10.244.6.0/24", Some("100.72.0.9"), BIRD),
            route("100.72.5.0/24", Some("100.72.0.2"), BIRD),
            // meshd's own, the kernel's connected and link-local routes.
            route("10.244.7.0/24", None, BOOT),
            route("100.72.0.0/16", None, RTPROT_KERNEL),
            route("fe80::/64", None, RTPROT_KERNEL),
            route("ff00::/8", None, BOOT),
        ];
        let learned = learn(&routes, &[net("10.244.7.0/24")], &mesh(), peers);
        assert!(learned.by_peer.is_empty());
        let why: Vec<(IpNet, UnusableWhy)> =
            learned.unusable.iter().map(|u| (u.prefix, u.why)).collect();
        assert_eq!(
            why,
            [
                (net("10.244.5.0/24"), UnusableWhy::NoGateway),
                (net("10.244.6.0/24"), UnusableWhy::UnknownGateway),
                (net("100.72.5.0/24"), UnusableWhy::OverlapsMesh),
            ]
        );
        assert!(UnusableWhy::NoGateway.describe().contains("direct;"));
    }
}
