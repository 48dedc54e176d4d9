//! The mesh as `meshctl kube` sees it: this node and its peers with their
//! overlay and reachable addresses, from meshd's local API answers
//! (`meshctl status --json`, `meshctl peers --json`). Pure.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::{KubeError, Stack};
use crate::config::DEFAULT_MTU;
use crate::control::{CandidateSource, PeerInfo, SeenAt, StatusInfo};

/// How a node's reachable (underlay) address was learned, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reach {
    /// Configured with `--advertise-endpoint`: the operator said so.
    Advertised,
    /// Where the rendezvous or a peer sees it (a NAT's public side).
    Observed,
    /// An address on one of its interfaces.
    Local,
}

/// One mesh member as Kubernetes tools need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshNode {
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
    /// The underlay address to reach it on (SSH for Ansible); none known
    /// for a node that only calls out.
    pub reachable: Option<(IpAddr, Reach)>,
}

impl MeshNode {
    /// The addresses of `stack`, IPv4 first.
    pub(super) fn addresses(&self, stack: Stack) -> Result<Vec<IpAddr>, KubeError> {
        match stack {
            Stack::Ipv4 => Ok(vec![self.ipv4.into()]),
            Stack::Dual => Ok(vec![
                self.ipv4.into(),
                self.ipv6.ok_or(KubeError::NoOverlayIpv6)?.into(),
            ]),
        }
    }
}

/// This node: a mesh member with its interface and MTU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    pub node: MeshNode,
    pub interface: String,
    pub mtu: u16,
    /// The mesh's overlay prefixes (the networks of mesh0's addresses);
    /// the overlay addresses alone when meshd reports no prefix.
    pub overlay_prefixes: Vec<IpNet>,
}

/// This node and its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    pub local: Local,
    pub peers: Vec<MeshNode>,
    /// Peers left out, and why (a static peer has no name, …).
    pub notes: Vec<String>,
}

/// What the user says over what meshd reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// The Kubernetes node name, when it is not the mesh name.
    pub node_name: Option<String>,
    /// mesh0's MTU (`--mtu`): wins over the MTU meshd reports.
    pub mtu: Option<u16>,
    /// mesh0's MTU from elsewhere (meshd's env file), for an older meshd
    /// whose status reports none; meshd's own report wins over it.
    pub fallback_mtu: Option<u16>,
}

impl Mesh {
    /// The mesh as `meshctl status --json` and `meshctl peers --json` show
    /// it. The MTU is, in order: the override, meshd's (an older meshd
    /// reports none), the fallback, the default 1380.
    pub fn from_api(
        status: &StatusInfo,
        peers: &[PeerInfo],
        overrides: &Overrides,
    ) -> Result<Self, KubeError> {
        let name = overrides
            .node_name
            .clone()
            .or_else(|| status.name.clone())
            .ok_or(KubeError::NoName)?;
        let (ipv4, ipv6) = overlay_addresses(&status.overlay_ips);
        if status.interface.is_empty() {
            return Err(KubeError::NoInterface);
        }
        let mut overlay_prefixes: Vec<IpNet> = status.addresses.iter().map(IpNet::trunc).collect();
        if overlay_prefixes.is_empty() {
            overlay_prefixes = status
                .overlay_ips
                .iter()
                .map(|&ip| IpNet::from(ip))
                .collect();
        }
        let local = Local {
            overlay_prefixes,
            node: MeshNode {
                name,
                ipv4: ipv4.ok_or(KubeError::NoOverlayIpv4)?,
                ipv6,
                reachable: seen_by_rendezvous(&status.seen_at).map(|ip| (ip, Reach::Observed)),
            },
            interface: status.interface.clone(),
            mtu: overrides
                .mtu
                .or(Some(status.mtu).filter(|&m| m != 0))
                .or(overrides.fallback_mtu)
                .unwrap_or(DEFAULT_MTU),
        };
        let mut notes = Vec::new();
        let mut members = Vec::new();
        for peer in peers {
            let short_key = peer.public_key.short();
            let Some(name) = peer.name.clone() else {
                notes.push(format!("left out static peer {short_key}: it has no name"));
                continue;
            };
            let (ipv4, ipv6) = overlay_addresses(&peer.overlay_ips);
            let Some(ipv4) = ipv4 else {
                notes.push(format!("left out {name}: it has no overlay IPv4 address"));
                continue;
            };
            members.push(MeshNode {
                name,
                ipv4,
                ipv6,
                reachable: best_candidate(peer),
            });
        }
        Ok(Self {
            local,
            peers: members,
            notes,
        })
    }

    pub(super) fn nodes(&self) -> impl Iterator<Item = &MeshNode> {
        std::iter::once(&self.local.node).chain(&self.peers)
    }
}

/// The first IPv4 and the first IPv6 among `ips`.
fn overlay_addresses(ips: &[IpAddr]) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    let v4 = ips.iter().find_map(|ip| match ip {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    });
    let v6 = ips.iter().find_map(|ip| match ip {
        IpAddr::V6(a) => Some(*a),
        IpAddr::V4(_) => None,
    });
    (v4, v6)
}

/// This node's public side: where the rendezvous (either port) sees it,
/// else where the first peer does.
fn seen_by_rendezvous(seen_at: &[SeenAt]) -> Option<IpAddr> {
    seen_at
        .iter()
        .find(|s| s.by.is_rendezvous())
        .or(seen_at.first())
        .map(|s| s.addr.ip())
}

/// A peer's address to reach it on: advertised, else observed, else local
/// (never one only learned from its packets); IPv4 before IPv6 within one
/// kind; the first listed among equals.
fn best_candidate(peer: &PeerInfo) -> Option<(IpAddr, Reach)> {
    peer.candidates
        .iter()
        .filter_map(|c| {
            let reach = match c.source {
                CandidateSource::Advertised => Reach::Advertised,
                CandidateSource::Observed => Reach::Observed,
                CandidateSource::Local => Reach::Local,
                // The public address of its NAT, as the observed one is.
                CandidateSource::Mapped => Reach::Observed,
                CandidateSource::Learned => return None,
            };
            Some((c.endpoint.ip(), reach))
        })
        .min_by_key(|(ip, reach)| (*reach, ip.is_ipv6()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::generate::kubelet_dropin;
    use crate::kube::generate::testing::*;

    #[test]
    fn the_mesh_is_read_from_status_and_peers() {
        let mesh = mesh();
        assert_eq!(mesh.local.node.name, "node-a");
        assert_eq!(mesh.local.node.ipv4, Ipv4Addr::new(100, 72, 0, 5));
        assert_eq!(mesh.local.node.ipv6, Some("fd7a:1:2::5".parse().unwrap()));
        assert_eq!(mesh.local.interface, "mesh0");
        assert_eq!(
            mesh.local.node.reachable,
            Some(("203.0.113.5".parse().unwrap(), Reach::Observed))
        );
        let names: Vec<&str> = mesh.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["node-b", "node-c", "node-d", "node-e"]);
        assert_eq!(
            mesh.notes,
            ["left out static peer 3p7bfXt9: it has no name"]
        );
    }

    #[test]
    fn the_mtu_is_the_default_unless_overridden() {
        assert_eq!(local().mtu, 1380);
        let overrides = Overrides {
            mtu: Some(1420),
            ..Overrides::default()
        };
        assert_eq!(
            Mesh::from_api(&status(), &[], &overrides)
                .unwrap()
                .local
                .mtu,
            1420
        );
    }

    #[test]
    fn meshds_mtu_wins_over_the_env_file_and_the_mtu_option_wins_over_both() {
        let reported = StatusInfo {
            mtu: 1420,
            ..status()
        };
        let mtu = |status: &StatusInfo, mtu, fallback_mtu| {
            let overrides = Overrides {
                mtu,
                fallback_mtu,
                ..Overrides::default()
            };
            Mesh::from_api(status, &[], &overrides).unwrap().local.mtu
        };
        assert_eq!(mtu(&reported, None, Some(1380)), 1420, "meshd's report");
        assert_eq!(mtu(&reported, Some(1300), Some(1380)), 1300, "--mtu");
        // An older meshd reports 0: the env file's, else the default.
        assert_eq!(mtu(&status(), None, Some(1400)), 1400, "env file");
        assert_eq!(mtu(&status(), None, None), 1380, "default");
    }

    #[test]
    fn a_reachable_address_is_advertised_then_observed_then_local_ipv4_first() {
        let reach: Vec<_> = mesh().peers.iter().map(|p| p.reachable).collect();
        assert_eq!(
            reach,
            [
                Some(("192.0.2.6".parse().unwrap(), Reach::Advertised)),
                Some(("198.51.100.7".parse().unwrap(), Reach::Observed)),
                Some(("10.2.0.8".parse().unwrap(), Reach::Local)),
                None,
            ]
        );
    }

    #[test]
    fn a_node_without_a_name_or_overlay_ipv4_is_refused_with_what_to_do() {
        let unnamed = StatusInfo {
            name: None,
            ..status()
        };
        let e = Mesh::from_api(&unnamed, &[], &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("--node-name"), "{e}");
        let named = Overrides {
            node_name: Some("k8s-a".into()),
            ..Overrides::default()
        };
        assert_eq!(
            Mesh::from_api(&unnamed, &[], &named)
                .unwrap()
                .local
                .node
                .name,
            "k8s-a"
        );
        let v6_only = StatusInfo {
            overlay_ips: vec!["fd7a:1:2::5".parse().unwrap()],
            ..status()
        };
        let e = Mesh::from_api(&v6_only, &[], &Overrides::default()).unwrap_err();
        assert!(matches!(e, KubeError::NoOverlayIpv4), "{e}");
    }

    #[test]
    fn dual_stack_without_an_overlay_ipv6_is_refused() {
        let v4_only = StatusInfo {
            overlay_ips: vec!["100.72.0.5".parse().unwrap()],
            ..status()
        };
        let local = Mesh::from_api(&v4_only, &[], &Overrides::default())
            .unwrap()
            .local;
        let e = kubelet_dropin(&local, Stack::Dual, "/usr/bin/kubelet").unwrap_err();
        assert!(matches!(e, KubeError::NoOverlayIpv6), "{e}");
    }
}
