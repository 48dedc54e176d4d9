//! `meshctl kube`: what Kubernetes components need to run over the mesh — a
//! kubelet drop-in, flannel and calico settings, a kubeadm config, a
//! kubespray inventory — and a check of what a Node object says against the
//! mesh.
//!
//! Pure: facts in (a [`Mesh`], built from meshd's local API answers), text
//! out. The shell (`meshctl kube`) asks meshd or reads files, runs kubectl
//! and prints. Node JSON is untrusted input: [`parse_node`] reads only the
//! fields the check needs, and anything malformed is one
//! [`KubeError::NodeJson`] naming where it came from.
//!
//! YAML is written and read by `serde_norway`, never assembled from strings
//! (only the leading `#` comment lines are). Why that crate: `serde_yaml` is
//! archived and deprecated since 0.9.34; `serde_yml` is flagged unsound and
//! unmaintained (RUSTSEC-2025-0067, RUSTSEC-2025-0068); `serde-saphyr` needs
//! Rust 1.89, above this crate's rust-version; `serde_norway` is serde_yaml's
//! code with the same API, kept up by a maintainer who committed to it
//! (including its libyaml port, `unsafe-libyaml-norway`), and is where most
//! projects moved — a later switch is a rename.
//!
//! One file per generator (`kubelet`, `flannel`, `calico`, `kubeadm`,
//! `kubespray`) and one for `check`; `mesh` reads the API's answers into
//! the facts they all start from, `patch` is the DaemonSet patch flannel
//! and calico's manifest install share. Everything is re-exported here.

mod calico;
mod check;
mod flannel;
mod kubeadm;
mod kubelet;
mod kubespray;
mod mesh;
mod patch;
#[cfg(test)]
mod testing;

use std::net::IpAddr;

use ipnet::IpNet;

pub use calico::{calico, CalicoInstall, CalicoOptions, Encapsulation};
pub use check::{check, mismatches, parse_node, render_check, Finding, NodeView, Verdict};
pub use flannel::{flannel, FlannelBackend};
pub use kubeadm::{kubeadm, KubeadmOptions};
pub use kubelet::{kubelet_dropin, DROPIN_PATH};
pub use kubespray::{kubespray_inventory, Inventory};
pub use mesh::{Local, Mesh, MeshNode, Overrides, Reach};

/// VXLAN's overhead on an IPv4 underlay: outer IPv4 (20) + UDP (8) + VXLAN
/// (8) + the inner Ethernet header (14), RFC 7348 §5. The VTEPs sit on the
/// overlay IPv4 address, so the underlay here is `mesh0`.
pub const VXLAN_OVERHEAD: u16 = 50;
/// IP-in-IP's overhead: one outer IPv4 header, RFC 2003 §3.
pub const IPIP_OVERHEAD: u16 = 20;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("this node has no name in the mesh: pass --node-name (the Kubernetes node name)")]
    NoName,
    #[error("this node has no overlay IPv4 address: is meshd joined to a mesh? (meshctl status)")]
    NoOverlayIpv4,
    #[error(
        "--dual-stack needs an overlay IPv6 address and this node has none: drop --dual-stack"
    )]
    NoOverlayIpv6,
    #[error("meshd reported no interface name")]
    NoInterface,
    #[error("MTU {mtu} leaves no room for {encapsulation} ({overhead} bytes of headers): raise mesh0's MTU")]
    MtuTooSmall {
        mtu: u16,
        encapsulation: &'static str,
        overhead: u16,
    },
    #[error("pod CIDR {cidr} contains this node's overlay address {overlay}: pick a pod CIDR outside the mesh")]
    PodCidrOverlapsMesh { cidr: IpNet, overlay: IpAddr },
    #[error("{flag} {cidr} overlaps the mesh's overlay prefix {prefix}: pick a pod CIDR outside the mesh")]
    PodCidrOverlapsOverlay {
        flag: &'static str,
        cidr: IpNet,
        prefix: IpNet,
    },
    #[error("{flag} {cidr}: {reason}")]
    BadPodCidr {
        flag: &'static str,
        cidr: IpNet,
        reason: String,
    },
    #[error("--node-pod-cidr {cidr} is not inside any --pod-cidr ({pod_cidrs}): give this node a share of the cluster's pod network")]
    NodePodCidrOutside { cidr: IpNet, pod_cidrs: String },
    #[error("{flag}: {reason}")]
    PodCidrFamilies { flag: &'static str, reason: String },
    #[error("{name:?} is not a Kubernetes node name (lower-case letters, digits, '-' and '.'): pass --node-name")]
    NotANodeName { name: String },
    #[error("--control-plane {name}: no mesh node has that name (known: {known})")]
    UnknownControlPlane { name: String, known: String },
    #[error("two mesh nodes are named {name}: kubespray needs unique host names (rename one with meshd join --name)")]
    DuplicateName { name: String },
    #[error("{origin}: not a Kubernetes Node: {reason}")]
    NodeJson { origin: String, reason: String },
    #[error("{origin} describes node {found}, but this node is {expected}: pass --node-name {found} if that is this node")]
    WrongNode {
        origin: String,
        found: String,
        expected: String,
    },
    #[error("writing YAML: {0}")]
    Yaml(#[from] serde_norway::Error),
    #[error("writing JSON: {0}")]
    Json(#[source] serde_json::Error),
}

/// Single stack (the overlay IPv4) or dual stack (IPv4 and the overlay
/// IPv6). Kubernetes lists the IPv4 first: it is the primary family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    Ipv4,
    Dual,
}

/// `# `-prefixed lines; line breaks inside an item cannot end the comment.
fn comments(lines: &[String]) -> String {
    lines
        .iter()
        .map(|l| format!("# {}\n", l.replace(['\n', '\r'], " ")))
        .collect()
}

/// A word as a POSIX shell reads it back unchanged.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-:/=,@+".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn join(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn join_nets(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn inner_mtu(mtu: u16, encapsulation: &'static str, overhead: u16) -> Result<u16, KubeError> {
    // IPv4's minimum datagram every host must take (RFC 791): below it the
    // pod network is useless.
    const MIN: u16 = 576;
    match mtu.checked_sub(overhead) {
        Some(inner) if inner >= MIN => Ok(inner),
        _ => Err(KubeError::MtuTooSmall {
            mtu,
            encapsulation,
            overhead,
        }),
    }
}

/// Pod CIDRs routed natively over mesh0 (prefixes behind nodes): each a
/// network address (as meshd's `routes` want it) that stays clear of the
/// mesh's overlay prefixes, which meshd refuses to route to a peer.
fn check_native_pod_cidrs(
    local: &Local,
    flag: &'static str,
    cidrs: &[IpNet],
) -> Result<(), KubeError> {
    for cidr in cidrs {
        crate::config::validate_route(cidr).map_err(|reason| KubeError::BadPodCidr {
            flag,
            cidr: *cidr,
            reason,
        })?;
        if let Some(prefix) = local
            .overlay_prefixes
            .iter()
            .find(|p| p.contains(&cidr.network()) || cidr.contains(&p.network()))
        {
            return Err(KubeError::PodCidrOverlapsOverlay {
                flag,
                cidr: *cidr,
                prefix: *prefix,
            });
        }
    }
    Ok(())
}

/// At most one CIDR per family, and IPv6 only with `--dual-stack`.
fn check_families(flag: &'static str, cidrs: &[IpNet], stack: Stack) -> Result<(), KubeError> {
    let v4 = cidrs.iter().filter(|c| matches!(c, IpNet::V4(_))).count();
    let v6 = cidrs.len() - v4;
    let reason = if v4 > 1 || v6 > 1 {
        "one CIDR per address family"
    } else if v6 == 1 && stack == Stack::Ipv4 {
        "an IPv6 CIDR needs --dual-stack"
    } else {
        return Ok(());
    };
    Err(KubeError::PodCidrFamilies {
        flag,
        reason: reason.to_owned(),
    })
}

/// A name Kubernetes accepts for a Node (an RFC 1123 subdomain), safe to
/// quote in a label selector.
fn check_node_name(name: &str) -> Result<(), KubeError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(KubeError::NotANodeName {
            name: name.to_owned(),
        })
    }
}

fn check_pod_cidrs(local: &Local, cidrs: &[IpNet]) -> Result<(), KubeError> {
    let overlay: Vec<IpAddr> = std::iter::once(IpAddr::V4(local.node.ipv4))
        .chain(local.node.ipv6.map(IpAddr::V6))
        .collect();
    for cidr in cidrs {
        if let Some(ip) = overlay.iter().find(|ip| cidr.contains(*ip)) {
            return Err(KubeError::PodCidrOverlapsMesh {
                cidr: *cidr,
                overlay: *ip,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fix_commands_quote_names_a_shell_would_split() {
        assert_eq!(shell_word("node-a"), "node-a");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
    }

    #[test]
    fn comments_never_span_lines() {
        assert_eq!(comments(&["a\nb: c".to_owned()]), "# a b: c\n");
    }
}
