//! This node's own candidate endpoints: where peers might reach it.
//!
//! Does I/O (reads interface addresses and `/sys/class/net`). Local
//! addresses of every up, non-loopback interface except the mesh interface
//! itself and tunnels (VXLAN such as flannel's, Geneve, WireGuard, IP-in-IP:
//! an address there is reached through the tunnel, which may well ride
//! mesh0, never as an endpoint of its own), with the node's UDP port;
//! link-local and overlay addresses are useless to peers and left out. The
//! configured public address comes first.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use nix::ifaddrs::getifaddrs;
use nix::net::if_::InterfaceFlags;

use crate::wire::control::{Candidate, CandidateKind, MAX_CANDIDATES};

pub fn gather(
    port: u16,
    mesh_interface: &str,
    mesh_nets: &[IpNet],
    advertised: Option<SocketAddr>,
) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = advertised
        .map(|addr| Candidate {
            addr,
            kind: CandidateKind::Advertised,
            mapped: None,
        })
        .into_iter()
        .collect();
    let Ok(addrs) = getifaddrs() else {
        tracing::warn!("cannot list interface addresses; announcing no local candidates");
        return out;
    };
    for ifa in addrs {
        if ifa.interface_name == mesh_interface
            || !ifa.flags.contains(InterfaceFlags::IFF_UP)
            || ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK)
            || is_tunnel(&ifa.interface_name)
        {
            continue;
        }
        let Some(storage) = ifa.address else { continue };
        let ip: IpAddr = if let Some(v4) = storage.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = storage.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if !useful(ip) || mesh_nets.iter().any(|n| n.contains(&ip)) {
            continue;
        }
        let candidate = Candidate {
            addr: SocketAddr::new(ip, port),
            kind: CandidateKind::Local,
            mapped: None,
        };
        if !out.contains(&candidate) && out.len() < MAX_CANDIDATES {
            out.push(candidate);
        }
    }
    out
}

/// Whether `interface` is a tunnel, as its `DEVTYPE` in sysfs says.
fn is_tunnel(interface: &str) -> bool {
    // A name with a slash or `..` is no interface; sysfs is not read for it.
    if interface.contains('/') || interface == ".." {
        return false;
    }
    let uevent =
        std::fs::read_to_string(format!("/sys/class/net/{interface}/uevent")).unwrap_or_default();
    uevent.lines().any(|line| {
        line.strip_prefix("DEVTYPE=")
            .is_some_and(|t| TUNNELS.contains(&t))
    })
}

/// `DEVTYPE`s of tunnel devices.
const TUNNELS: &[&str] = &[
    "vxlan",
    "geneve",
    "wireguard",
    "ipip",
    "sit",
    "gre",
    "gretap",
];

fn useful(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            !(a.is_loopback() || a.is_link_local() || a.is_unspecified() || a.is_multicast())
        }
        IpAddr::V6(a) => {
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || a.is_unicast_link_local())
        }
    }
}
