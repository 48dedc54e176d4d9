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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::{DEFAULT_ENV_FILE, DEFAULT_MTU};
use crate::control::{CandidateSource, PeerInfo, SeenAt, StatusInfo};

/// VXLAN's overhead on an IPv4 underlay: outer IPv4 (20) + UDP (8) + VXLAN
/// (8) + the inner Ethernet header (14), RFC 7348 §5. The VTEPs sit on the
/// overlay IPv4 address, so the underlay here is `mesh0`.
pub const VXLAN_OVERHEAD: u16 = 50;
/// IP-in-IP's overhead: one outer IPv4 header, RFC 2003 §3.
pub const IPIP_OVERHEAD: u16 = 20;
/// Where the drop-in goes. It sorts after kubeadm's `10-kubeadm.conf`,
/// whose `ExecStart=` it replaces.
pub const DROPIN_PATH: &str = "/etc/systemd/system/kubelet.service.d/kubelet-meshd.conf";
/// The file name the printed apply commands use for flannel's patch.
const FLANNEL_PATCH_FILE: &str = "flannel-mesh.yaml";

const FLANNEL_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
const FLANNEL_PUBLIC_IP_OVERWRITE: &str = "flannel.alpha.coreos.com/public-ip-overwrite";
const FLANNEL_PUBLIC_IPV6: &str = "flannel.alpha.coreos.com/public-ipv6";
const FLANNEL_PUBLIC_IPV6_OVERWRITE: &str = "flannel.alpha.coreos.com/public-ipv6-overwrite";
const CALICO_IPV4: &str = "projectcalico.org/IPv4Address";
const CALICO_IPV6: &str = "projectcalico.org/IPv6Address";

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
}

/// Single stack (the overlay IPv4) or dual stack (IPv4 and the overlay
/// IPv6). Kubernetes lists the IPv4 first: it is the primary family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    Ipv4,
    Dual,
}

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
    fn addresses(&self, stack: Stack) -> Result<Vec<IpAddr>, KubeError> {
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
        let local = Local {
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

    fn nodes(&self) -> impl Iterator<Item = &MeshNode> {
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
                CandidateSource::Learned => return None,
            };
            Some((c.endpoint.ip(), reach))
        })
        .min_by_key(|(ip, reach)| (*reach, ip.is_ipv6()))
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

// ---------------------------------------------------------------- kubelet

/// The systemd drop-in that starts kubelet after meshd with `--node-ip` on
/// the overlay address(es): `deploy/kubernetes/kubelet-meshd.conf` with the
/// addresses written in (a test holds the two together).
///
/// It replaces kubeadm's `ExecStart=` (same variables, so
/// `/etc/default/kubelet` still applies) with `--node-ip` last: kubelet
/// takes the last value of a repeated flag, and an `Environment=` line would
/// lose to kubeadm's `EnvironmentFile=`. `EnvironmentFile=` (no `-`) makes
/// kubelet fail to start until meshd has written its env file, that is
/// until `mesh0` has its address.
pub fn kubelet_dropin(local: &Local, stack: Stack, kubelet: &str) -> Result<String, KubeError> {
    let ips = local.node.addresses(stack)?;
    let mut out = comments(&[
        format!(
            "kubelet on the mesh: node {} uses {} ({}).",
            local.node.name,
            join(&ips),
            local.interface
        ),
        format!(
            "Install as {DROPIN_PATH}, then: systemctl daemon-reload && systemctl restart kubelet"
        ),
        "Written by meshctl kube kubelet-dropin.".to_owned(),
    ]);
    out.push_str("[Unit]\nAfter=meshd.service\nWants=meshd.service\n\n[Service]\n");
    // The file meshd writes once `mesh0` is up (see the env module).
    let _ = writeln!(out, "EnvironmentFile={DEFAULT_ENV_FILE}");
    out.push_str("ExecStart=\n");
    let _ = writeln!(
        out,
        "ExecStart={kubelet} $KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS $KUBELET_KUBEADM_ARGS $KUBELET_EXTRA_ARGS --node-ip={}",
        join(&ips)
    );
    Ok(out)
}

// ------------------------------------------------------- DaemonSet patches

/// A strategic-merge patch of one container of a DaemonSet. Containers
/// merge by name and `env` by variable name; `args` is a plain list and is
/// replaced whole.
#[derive(Debug, Serialize, Deserialize)]
struct DaemonSetPatch {
    spec: DaemonSetSpec,
}

#[derive(Debug, Serialize, Deserialize)]
struct DaemonSetSpec {
    template: PodTemplate,
}

#[derive(Debug, Serialize, Deserialize)]
struct PodTemplate {
    spec: PodSpec,
}

#[derive(Debug, Serialize, Deserialize)]
struct PodSpec {
    containers: Vec<Container>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Container {
    name: String,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    args: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    env: Vec<EnvVar>,
}

#[derive(Debug, Serialize, Deserialize)]
struct EnvVar {
    name: String,
    value: String,
}

impl EnvVar {
    fn new(name: &str, value: impl ToString) -> Self {
        Self {
            name: name.to_owned(),
            value: value.to_string(),
        }
    }
}

fn daemonset_patch(container: Container) -> DaemonSetPatch {
    DaemonSetPatch {
        spec: DaemonSetSpec {
            template: PodTemplate {
                spec: PodSpec {
                    containers: vec![container],
                },
            },
        },
    }
}

// ---------------------------------------------------------------- flannel

/// The strategic-merge patch that points kube-flannel at `mesh0`.
///
/// flannel has no MTU setting for VXLAN: it takes the interface's MTU less
/// VXLAN's 50 bytes (and writes it as `FLANNEL_MTU` to
/// `/run/flannel/subnet.env`), so `--iface` alone gives the right MTU and
/// `net-conf.json` needs no change.
pub fn flannel(local: &Local) -> Result<String, KubeError> {
    let mtu = inner_mtu(local.mtu, "VXLAN", VXLAN_OVERHEAD)?;
    let iface = &local.interface;
    let patch = daemonset_patch(Container {
        name: "kube-flannel".into(),
        // kube-flannel.yml's own args, then ours: the list is replaced whole.
        args: vec![
            "--ip-masq".into(),
            "--kube-subnet-mgr".into(),
            format!("--iface={iface}"),
        ],
        env: vec![],
    });
    let mut out = comments(&[
        format!("flannel over {iface}: VXLAN between overlay addresses (node {}: {}).", local.node.name, local.node.ipv4),
        format!(
            "MTU: flannel derives it from {iface}: {} - {VXLAN_OVERHEAD} = {mtu} (FLANNEL_MTU in /run/flannel/subnet.env); net-conf.json needs no change.",
            local.mtu
        ),
        "This patch replaces the container's args: kube-flannel.yml's defaults plus --iface.".to_owned(),
        format!("Apply: kubectl -n kube-flannel patch ds kube-flannel-ds --patch-file {FLANNEL_PATCH_FILE}"),
    ]);
    out.push_str(&serde_norway::to_string(&patch)?);
    Ok(out)
}

// ----------------------------------------------------------------- calico

/// How calico is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalicoInstall {
    /// The tigera operator's `Installation` resource (calico's recommended
    /// install, and what `kubectl apply` takes as it is).
    Operator,
    /// A strategic-merge patch of the `calico-node` DaemonSet of a
    /// manifest install (kube-system).
    Manifest,
}

/// calico's encapsulation between nodes. Not "none" and not a
/// `CrossSubnet` mode: every overlay address is in one subnet, so calico
/// would route pod packets bare to mesh0, and meshd forwards only overlay
/// addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encapsulation {
    Vxlan,
    Ipip,
}

impl Encapsulation {
    fn overhead(self) -> (&'static str, u16) {
        match self {
            Self::Vxlan => ("VXLAN", VXLAN_OVERHEAD),
            Self::Ipip => ("IP-in-IP", IPIP_OVERHEAD),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalicoOptions {
    pub install: CalicoInstall,
    pub encapsulation: Encapsulation,
    /// The IP pools; one per family.
    pub pod_cidrs: Vec<IpNet>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Installation {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: InstallationSpec,
}

#[derive(Debug, Serialize, Deserialize)]
struct Metadata {
    name: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InstallationSpec {
    calico_network: CalicoNetwork,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CalicoNetwork {
    bgp: String,
    mtu: u16,
    node_address_autodetection_v4: Autodetection,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    node_address_autodetection_v6: Option<Autodetection>,
    ip_pools: Vec<IpPool>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Autodetection {
    interface: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IpPool {
    name: String,
    cidr: String,
    encapsulation: String,
    nat_outgoing: String,
    node_selector: String,
}

/// calico's node address on the overlay and its MTU for the chosen
/// encapsulation over it.
///
/// The operator's `Installation` is the default: it is calico's
/// recommended install, `kubectl apply` takes it as it is, and the operator
/// keeps every setting (a patched manifest DaemonSet is overwritten by the
/// next manifest upgrade). The IP pools are in it because the operator's
/// default pool uses a `CrossSubnet` mode, which cannot work here (see
/// [`Encapsulation`]); the operator reads pools only when it first installs.
pub fn calico(local: &Local, stack: Stack, options: &CalicoOptions) -> Result<String, KubeError> {
    let ips = local.node.addresses(stack)?;
    let (encap_name, overhead) = options.encapsulation.overhead();
    let mtu = inner_mtu(local.mtu, encap_name, overhead)?;
    check_pod_cidrs(local, &options.pod_cidrs)?;
    let iface = &local.interface;
    let dual = match stack {
        Stack::Ipv4 => false,
        Stack::Dual => true,
    };
    let head = format!(
        "calico over {iface}: node {} at {}, {encap_name} MTU {} - {overhead} = {mtu}.",
        local.node.name,
        join(&ips),
        local.mtu
    );
    match options.install {
        CalicoInstall::Operator => {
            let (mode, bgp) = match options.encapsulation {
                Encapsulation::Vxlan => ("VXLAN", "Disabled"),
                // IP-in-IP routes are learned over BGP (TCP 179 between overlay addresses).
                Encapsulation::Ipip => ("IPIP", "Enabled"),
            };
            let pools = options
                .pod_cidrs
                .iter()
                .map(|cidr| IpPool {
                    name: match cidr {
                        IpNet::V4(_) => "default-ipv4-ippool",
                        IpNet::V6(_) => "default-ipv6-ippool",
                    }
                    .into(),
                    cidr: cidr.to_string(),
                    encapsulation: mode.into(),
                    nat_outgoing: "Enabled".into(),
                    node_selector: "all()".into(),
                })
                .collect();
            let installation = Installation {
                api_version: "operator.tigera.io/v1".into(),
                kind: "Installation".into(),
                metadata: Metadata {
                    name: "default".into(),
                },
                spec: InstallationSpec {
                    calico_network: CalicoNetwork {
                        bgp: bgp.into(),
                        mtu,
                        node_address_autodetection_v4: Autodetection {
                            interface: iface.clone(),
                        },
                        node_address_autodetection_v6: dual.then(|| Autodetection {
                            interface: iface.clone(),
                        }),
                        ip_pools: pools,
                    },
                },
            };
            let mut out = comments(&[
                head,
                "The tigera operator's Installation: apply it instead of the one in custom-resources.yaml,".into(),
                "before calico first starts (the operator reads IP pools only then).".into(),
                "Apply: meshctl kube calico | kubectl apply -f -".into(),
            ]);
            out.push_str(&serde_norway::to_string(&installation)?);
            Ok(out)
        }
        CalicoInstall::Manifest => {
            let method = format!("interface={iface}");
            let mut env = vec![EnvVar::new("IP_AUTODETECTION_METHOD", &method)];
            if dual {
                env.push(EnvVar::new("IP6_AUTODETECTION_METHOD", &method));
            }
            match options.encapsulation {
                Encapsulation::Vxlan => env.push(EnvVar::new("FELIX_VXLANMTU", mtu)),
                Encapsulation::Ipip => env.push(EnvVar::new("FELIX_IPINIPMTU", mtu)),
            }
            let patch = daemonset_patch(Container {
                name: "calico-node".into(),
                args: vec![],
                env,
            });
            let mut out = comments(&[
                head,
                "A patch of a manifest install's calico-node (env merges by name).".into(),
                "Apply: kubectl -n kube-system patch ds calico-node --patch-file calico-mesh.yaml".into(),
                format!(
                    "Pod MTU: kubectl -n kube-system patch configmap calico-config --type merge -p '{{\"data\":{{\"veth_mtu\":\"{mtu}\"}}}}'"
                ),
            ]);
            out.push_str(&serde_norway::to_string(&patch)?);
            Ok(out)
        }
    }
}

// ---------------------------------------------------------------- kubeadm

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeadmOptions {
    /// `HOST[:PORT]` shared by all control-plane nodes (needed at `init`
    /// for a later HA control plane).
    pub control_plane_endpoint: Option<String>,
    /// `networking.podSubnet`: flannel's 10.244.0.0/16, calico's
    /// 192.168.0.0/16, one per family.
    pub pod_cidrs: Vec<IpNet>,
}

/// kubeadm's v1beta4 config API. v1beta4 rather than v1beta3: every
/// Kubernetes release still supported reads it (it came with 1.31), and
/// v1beta3 is deprecated; its `extraArgs` are `name`/`value` lists.
const KUBEADM_API: &str = "kubeadm.k8s.io/v1beta4";

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InitConfiguration {
    api_version: String,
    kind: String,
    #[serde(rename = "localAPIEndpoint")]
    local_api_endpoint: ApiEndpoint,
    node_registration: NodeRegistration,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiEndpoint {
    advertise_address: String,
    bind_port: u16,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeRegistration {
    name: String,
    kubelet_extra_args: Vec<Arg>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Arg {
    name: String,
    value: String,
}

impl Arg {
    fn new(name: &str, value: String) -> Self {
        Self {
            name: name.to_owned(),
            value,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClusterConfiguration {
    api_version: String,
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    control_plane_endpoint: Option<String>,
    networking: Networking,
    api_server: ApiServer,
    etcd: Etcd,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Networking {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pod_subnet: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiServer {
    #[serde(rename = "certSANs")]
    cert_sans: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Etcd {
    local: LocalEtcd,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LocalEtcd {
    extra_args: Vec<Arg>,
    #[serde(rename = "serverCertSANs")]
    server_cert_sans: Vec<String>,
    #[serde(rename = "peerCertSANs")]
    peer_cert_sans: Vec<String>,
}

/// A URL's host part: IPv6 in brackets (RFC 3986 §3.2.2).
fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

/// `kubeadm init --config` for this node: the API server advertised on the
/// overlay address, kubelet's node IP, etcd listening and advertising only
/// there (plus loopback for the local API server, which kubeadm points at
/// 127.0.0.1), and certificates valid for the overlay address and the name.
pub fn kubeadm(local: &Local, stack: Stack, options: &KubeadmOptions) -> Result<String, KubeError> {
    let ips = local.node.addresses(stack)?;
    check_pod_cidrs(local, &options.pod_cidrs)?;
    let primary = IpAddr::V4(local.node.ipv4);
    let name = &local.node.name;
    let client_urls = ips
        .iter()
        .map(|ip| format!("https://{}:2379", url_host(*ip)))
        .collect::<Vec<_>>()
        .join(",");
    // Peer URLs on the IPv4 address alone: kubeadm writes
    // `--initial-cluster` from the advertise address, and etcd refuses to
    // start when this member's advertised peer URLs differ from it.
    let peer_url = format!("https://{primary}:2380");
    let mut etcd_sans: Vec<String> = ips.iter().map(ToString::to_string).collect();
    etcd_sans.push(name.clone());
    let mut sans = etcd_sans.clone();
    if let Some(endpoint) = &options.control_plane_endpoint {
        let host = endpoint_host(endpoint);
        if !sans.iter().any(|s| s == host) {
            sans.push(host.to_owned());
        }
    }
    let init = InitConfiguration {
        api_version: KUBEADM_API.into(),
        kind: "InitConfiguration".into(),
        local_api_endpoint: ApiEndpoint {
            advertise_address: primary.to_string(),
            bind_port: 6443,
        },
        node_registration: NodeRegistration {
            name: name.clone(),
            kubelet_extra_args: vec![Arg::new("node-ip", join(&ips))],
        },
    };
    let cluster = ClusterConfiguration {
        api_version: KUBEADM_API.into(),
        kind: "ClusterConfiguration".into(),
        control_plane_endpoint: options.control_plane_endpoint.clone(),
        networking: Networking {
            pod_subnet: (!options.pod_cidrs.is_empty()).then(|| {
                options
                    .pod_cidrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            }),
        },
        api_server: ApiServer { cert_sans: sans },
        etcd: Etcd {
            local: LocalEtcd {
                extra_args: vec![
                    Arg::new(
                        "listen-client-urls",
                        format!("https://127.0.0.1:2379,{client_urls}"),
                    ),
                    Arg::new("advertise-client-urls", client_urls),
                    Arg::new("listen-peer-urls", peer_url.clone()),
                    Arg::new("initial-advertise-peer-urls", peer_url),
                ],
                server_cert_sans: etcd_sans.clone(),
                peer_cert_sans: etcd_sans,
            },
        },
    };
    let mut out = comments(&[
        format!(
            "kubeadm on the mesh: node {name}, API server and etcd on {}.",
            join(&ips)
        ),
        "Use: meshctl kube kubeadm > kubeadm.yaml && kubeadm init --config kubeadm.yaml".into(),
    ]);
    let mut yaml = Vec::new();
    {
        // One serializer for both documents: it writes the `---` between them.
        let mut serializer = serde_norway::Serializer::new(&mut yaml);
        init.serialize(&mut serializer)?;
        cluster.serialize(&mut serializer)?;
    }
    out.push_str(&String::from_utf8_lossy(&yaml));
    Ok(out)
}

/// `host` of `host:port`, `[v6]:port`, a bare host or a bare IPv6 address.
fn endpoint_host(endpoint: &str) -> &str {
    if let Some(rest) = endpoint.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    if endpoint.parse::<Ipv6Addr>().is_ok() {
        return endpoint;
    }
    endpoint.split(':').next().unwrap_or(endpoint)
}

// -------------------------------------------------------------- kubespray

/// A kubespray inventory and what the user should know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    pub yaml: String,
    /// Nodes without a known reachable address, peers left out.
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct InventoryFile {
    all: InventoryAll,
}

#[derive(Debug, Serialize, Deserialize)]
struct InventoryAll {
    hosts: BTreeMap<String, HostVars>,
    children: BTreeMap<String, Group>,
}

#[derive(Debug, Serialize, Deserialize)]
struct HostVars {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    ansible_host: Option<String>,
    ip: String,
    access_ip: String,
    etcd_address: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    ip6: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    access_ip6: Option<String>,
}

/// A group lists hosts or child groups; members carry no variables of
/// their own (`{}`).
#[derive(Debug, Serialize, Deserialize)]
struct Group {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    hosts: Option<BTreeMap<String, Empty>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    children: Option<BTreeMap<String, Empty>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Empty {}

/// kubespray's `hosts.yml` for the whole mesh: every node's `ip`,
/// `access_ip` and `etcd_address` on its overlay address, `ansible_host`
/// where Ansible can reach it. `control_plane` names the control-plane
/// (and etcd) nodes; empty means this node alone. Every node is a worker.
pub fn kubespray_inventory(
    mesh: &Mesh,
    stack: Stack,
    control_plane: &[String],
) -> Result<Inventory, KubeError> {
    let mut notes = mesh.notes.clone();
    let mut hosts = BTreeMap::new();
    for node in mesh.nodes() {
        let ips = node.addresses(stack).map_err(|e| match e {
            KubeError::NoOverlayIpv6 if node.name != mesh.local.node.name => KubeError::NodeJson {
                origin: format!("node {}", node.name),
                reason: "--dual-stack needs an overlay IPv6 address on every node, and it has none"
                    .into(),
            },
            other => other,
        })?;
        let ansible_host = node.reachable.map(|(ip, _)| ip.to_string());
        if ansible_host.is_none() {
            notes.push(format!(
                "{}: no reachable address known, Ansible will connect to the name {}: set ansible_host by hand",
                node.name, node.name
            ));
        }
        let v4 = node.ipv4.to_string();
        let v6 = ips.get(1).map(ToString::to_string);
        let vars = HostVars {
            ansible_host,
            ip: v4.clone(),
            access_ip: v4.clone(),
            etcd_address: v4,
            access_ip6: v6.clone(),
            ip6: v6,
        };
        if hosts.insert(node.name.clone(), vars).is_some() {
            return Err(KubeError::DuplicateName {
                name: node.name.clone(),
            });
        }
    }
    let control: BTreeSet<String> = if control_plane.is_empty() {
        BTreeSet::from([mesh.local.node.name.clone()])
    } else {
        control_plane.iter().cloned().collect()
    };
    if let Some(unknown) = control.iter().find(|n| !hosts.contains_key(*n)) {
        return Err(KubeError::UnknownControlPlane {
            name: unknown.clone(),
            known: hosts.keys().cloned().collect::<Vec<_>>().join(", "),
        });
    }
    if control.len() % 2 == 0 {
        notes.push(format!(
            "{} etcd members: an even number tolerates no more failures than one fewer; prefer an odd number",
            control.len()
        ));
    }
    let members = |names: &mut dyn Iterator<Item = &String>| -> BTreeMap<String, Empty> {
        names.map(|n| (n.clone(), Empty {})).collect()
    };
    let hosts_group = |names: BTreeMap<String, Empty>| Group {
        hosts: Some(names),
        children: None,
    };
    let children = BTreeMap::from([
        (
            "kube_control_plane".to_owned(),
            hosts_group(members(&mut control.iter())),
        ),
        ("etcd".to_owned(), hosts_group(members(&mut control.iter()))),
        (
            "kube_node".to_owned(),
            hosts_group(members(&mut hosts.keys())),
        ),
        (
            "k8s_cluster".to_owned(),
            Group {
                hosts: None,
                children: Some(BTreeMap::from([
                    ("kube_control_plane".to_owned(), Empty {}),
                    ("kube_node".to_owned(), Empty {}),
                ])),
            },
        ),
        ("calico_rr".to_owned(), hosts_group(BTreeMap::new())),
    ]);
    let file = InventoryFile {
        all: InventoryAll { hosts, children },
    };
    let mut yaml = comments(&[
        "kubespray inventory of the mesh: ip/access_ip/etcd_address are overlay addresses,".into(),
        "ansible_host where Ansible reaches each node (advertised, else observed, else local address).".into(),
        "Use: meshctl kube kubespray-inventory > inventory/mesh/hosts.yml".into(),
    ]);
    yaml.push_str(&serde_norway::to_string(&file)?);
    Ok(Inventory { yaml, notes })
}

// ------------------------------------------------------------------ check

/// The parts of a Node object the check reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    /// `status.addresses` of type InternalIP, in order.
    pub internal_ips: Vec<String>,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct NodeJson {
    kind: Option<String>,
    metadata: NodeMetadata,
    #[serde(default)]
    status: Option<NodeStatusJson>,
}

#[derive(Deserialize)]
struct NodeMetadata {
    name: String,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct NodeStatusJson {
    #[serde(default)]
    addresses: Option<Vec<NodeAddress>>,
}

#[derive(Deserialize)]
struct NodeAddress {
    #[serde(rename = "type")]
    kind: String,
    address: String,
}

/// Reads `kubectl get node NAME -o json`; `origin` (a file name, or
/// "kubectl") names the input in the error.
pub fn parse_node(text: &str, origin: &str) -> Result<NodeView, KubeError> {
    let bad = |reason: String| KubeError::NodeJson {
        origin: origin.to_owned(),
        reason,
    };
    let node: NodeJson = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    match node.kind.as_deref() {
        Some("Node") | None => {}
        Some(other) => {
            return Err(bad(format!(
                "kind is {other}; pass one Node (kubectl get node NAME -o json)"
            )))
        }
    }
    let addresses = node.status.and_then(|s| s.addresses).unwrap_or_default();
    Ok(NodeView {
        name: node.metadata.name,
        internal_ips: addresses
            .into_iter()
            .filter(|a| a.kind == "InternalIP")
            .map(|a| a.address)
            .collect(),
        annotations: node.metadata.annotations.unwrap_or_default(),
    })
}

/// One thing Kubernetes believes, compared with the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What was compared, e.g. `InternalIP (IPv4)`.
    pub subject: String,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Kubernetes uses the overlay address.
    Matches { value: String },
    /// Kubernetes uses something else; `fix` are commands that fix it
    /// (alternatives, one per line).
    Mismatch {
        found: String,
        expected: String,
        fix: Vec<String>,
    },
    /// Nothing to compare: that component does not run on the node.
    Absent { why: String },
}

/// Compares `node` with this node's overlay addresses. Errors only when
/// `node` is another node than this one.
pub fn check(
    node: &NodeView,
    origin: &str,
    local: &Local,
    stack: Stack,
) -> Result<Vec<Finding>, KubeError> {
    if node.name != local.node.name {
        return Err(KubeError::WrongNode {
            origin: origin.to_owned(),
            found: node.name.clone(),
            expected: local.node.name.clone(),
        });
    }
    let ips = local.node.addresses(stack)?;
    let name = shell_word(&node.name);
    let mut findings = Vec::new();
    for expected in &ips {
        let family = if expected.is_ipv4() { "IPv4" } else { "IPv6" };
        let first = node.internal_ips.iter().find(|a| same_family(a, *expected));
        let subject = format!("InternalIP ({family})");
        let kubelet_fix = vec![format!(
            "on {name}: meshctl kube kubelet-dropin{} > {DROPIN_PATH} && systemctl daemon-reload && systemctl restart kubelet",
            match stack {
                Stack::Ipv4 => "",
                Stack::Dual => " --dual-stack",
            }
        )];
        findings.push(compare(
            subject,
            first.map(String::as_str),
            *expected,
            kubelet_fix,
        ));
    }
    let flannel_fix = vec![format!(
        "meshctl kube flannel > {FLANNEL_PATCH_FILE} && kubectl -n kube-flannel patch ds kube-flannel-ds --patch-file {FLANNEL_PATCH_FILE}"
    )];
    let calico_fix = |family: &str, var: &str| {
        vec![
            format!(
                "operator: kubectl patch installation default --type merge -p '{{\"spec\":{{\"calicoNetwork\":{{\"nodeAddressAutodetection{family}\":{{\"interface\":\"{}\"}}}}}}}}'",
                local.interface
            ),
            format!("manifest: kubectl -n kube-system set env ds/calico-node {var}=interface={}", local.interface),
        ]
    };
    for expected in &ips {
        let (public, overwrite, calico, family, var) = match expected {
            IpAddr::V4(_) => (
                FLANNEL_PUBLIC_IP,
                FLANNEL_PUBLIC_IP_OVERWRITE,
                CALICO_IPV4,
                "V4",
                "IP_AUTODETECTION_METHOD",
            ),
            IpAddr::V6(_) => (
                FLANNEL_PUBLIC_IPV6,
                FLANNEL_PUBLIC_IPV6_OVERWRITE,
                CALICO_IPV6,
                "V6",
                "IP6_AUTODETECTION_METHOD",
            ),
        };
        findings.push(annotation(
            node,
            public,
            *expected,
            flannel_fix.clone(),
            "flannel does not run on this node",
        ));
        findings.push(annotation(
            node,
            overwrite,
            *expected,
            vec![format!(
                "kubectl annotate node {name} {overwrite}- && kubectl -n kube-flannel delete pod -l app=flannel --field-selector spec.nodeName={name}"
            )],
            "not set (with --iface on the mesh it is not needed)",
        ));
        findings.push(annotation(
            node,
            calico,
            *expected,
            calico_fix(family, var),
            "calico does not run on this node",
        ));
    }
    Ok(findings)
}

fn same_family(address: &str, ip: IpAddr) -> bool {
    match address.parse::<IpAddr>() {
        Ok(a) => a.is_ipv4() == ip.is_ipv4(),
        // Not an address: compare it within the family it looks like.
        Err(_) => address.contains(':') == ip.is_ipv6(),
    }
}

fn annotation(
    node: &NodeView,
    key: &str,
    expected: IpAddr,
    fix: Vec<String>,
    absent: &str,
) -> Finding {
    match node.annotations.get(key) {
        // calico writes the address with its prefix (100.72.0.5/16).
        Some(value) => compare(
            key.to_owned(),
            Some(value.split('/').next().unwrap_or(value)),
            expected,
            fix,
        ),
        None => Finding {
            subject: key.to_owned(),
            verdict: Verdict::Absent {
                why: absent.to_owned(),
            },
        },
    }
}

fn compare(subject: String, found: Option<&str>, expected: IpAddr, fix: Vec<String>) -> Finding {
    let verdict = match found {
        Some(f) if f.parse::<IpAddr>().is_ok_and(|a| a == expected) => Verdict::Matches {
            value: f.to_owned(),
        },
        other => Verdict::Mismatch {
            found: other.unwrap_or("none").to_owned(),
            expected: expected.to_string(),
            fix,
        },
    };
    Finding { subject, verdict }
}

/// How many findings disagree with the mesh.
pub fn mismatches(findings: &[Finding]) -> usize {
    findings
        .iter()
        .filter(|f| matches!(f.verdict, Verdict::Mismatch { .. }))
        .count()
}

/// The findings as lines for a person: `ok`, `MISMATCH` with its fixes, `-`.
pub fn render_check(node: &str, findings: &[Finding]) -> String {
    let mut out = String::new();
    for finding in findings {
        let subject = &finding.subject;
        match &finding.verdict {
            Verdict::Matches { value } => {
                let _ = writeln!(out, "ok        {subject}: {value}");
            }
            Verdict::Mismatch {
                found,
                expected,
                fix,
            } => {
                let _ = writeln!(
                    out,
                    "MISMATCH  {subject}: {found}, the overlay address is {expected}"
                );
                for line in fix {
                    let _ = writeln!(out, "          fix: {line}");
                }
            }
            Verdict::Absent { why } => {
                let _ = writeln!(out, "-         {subject}: {why}");
            }
        }
    }
    let n = mismatches(findings);
    let _ = match n {
        0 => writeln!(out, "node {node}: Kubernetes uses the overlay addresses"),
        n => writeln!(out, "node {node}: {n} mismatch(es) with the mesh"),
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::CandidateInfo;
    use serde_norway::Value;

    const KEY_B: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";

    fn status() -> StatusInfo {
        StatusInfo {
            name: Some("node-a".into()),
            public_key: "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
                .parse()
                .unwrap(),
            overlay_ips: vec![
                "100.72.0.5".parse().unwrap(),
                "fd7a:1:2::5".parse().unwrap(),
            ],
            interface: "mesh0".into(),
            listen_port: 51820,
            addresses: vec![
                "100.72.0.5/16".parse().unwrap(),
                "fd7a:1:2::5/48".parse().unwrap(),
            ],
            seen_at: vec![
                "198.51.100.9:40000 (node-b)".parse().unwrap(),
                "203.0.113.5:51820 (rendezvous)".parse().unwrap(),
            ],
            ..StatusInfo::default()
        }
    }

    fn candidate(endpoint: &str, source: CandidateSource) -> CandidateInfo {
        CandidateInfo {
            endpoint: endpoint.parse().unwrap(),
            source,
            alive: true,
            rtt_ms: None,
            probes_sent: 0,
            probes_answered: 0,
        }
    }

    fn peer(name: Option<&str>, ips: &[&str], candidates: Vec<CandidateInfo>) -> PeerInfo {
        PeerInfo {
            name: name.map(Into::into),
            public_key: KEY_B.parse().unwrap(),
            overlay_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            candidates,
            ..PeerInfo::default()
        }
    }

    fn peers() -> Vec<PeerInfo> {
        vec![
            peer(
                Some("node-b"),
                &["100.72.0.6", "fd7a:1:2::6"],
                vec![
                    candidate("10.0.0.6:51820", CandidateSource::Local),
                    candidate("198.51.100.6:51820", CandidateSource::Observed),
                    candidate("[2001:db8::6]:51820", CandidateSource::Advertised),
                    candidate("192.0.2.6:51820", CandidateSource::Advertised),
                ],
            ),
            peer(
                Some("node-c"),
                &["100.72.0.7", "fd7a:1:2::7"],
                vec![
                    candidate("10.1.0.7:51820", CandidateSource::Local),
                    candidate("198.51.100.7:3000", CandidateSource::Observed),
                ],
            ),
            peer(
                Some("node-d"),
                &["100.72.0.8", "fd7a:1:2::8"],
                vec![candidate("10.2.0.8:51820", CandidateSource::Local)],
            ),
            peer(Some("node-e"), &["100.72.0.9", "fd7a:1:2::9"], vec![]),
            peer(
                None,
                &["100.72.0.10"],
                vec![candidate("192.0.2.10:51820", CandidateSource::Advertised)],
            ),
        ]
    }

    fn mesh() -> Mesh {
        Mesh::from_api(&status(), &peers(), &Overrides::default()).unwrap()
    }

    fn local() -> Local {
        mesh().local
    }

    /// The YAML documents after the leading comments.
    fn documents(text: &str) -> Vec<Value> {
        serde_norway::Deserializer::from_str(text)
            .map(|d| Value::deserialize(d).unwrap())
            .collect()
    }

    fn document(text: &str) -> Value {
        let mut docs = documents(text);
        assert_eq!(docs.len(), 1, "{text}");
        docs.remove(0)
    }

    /// A systemd unit file: (section, key, value) in order; repeated keys
    /// stay repeated, as systemd reads them.
    fn ini(text: &str) -> Vec<(String, String, String)> {
        let mut section = String::new();
        let mut entries = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not key=value: {line}"));
            assert!(!section.is_empty(), "{key} outside any section");
            entries.push((
                section.clone(),
                key.trim().to_owned(),
                value.trim().to_owned(),
            ));
        }
        entries
    }

    fn ini_values<'a>(
        entries: &'a [(String, String, String)],
        section: &str,
        key: &str,
    ) -> Vec<&'a str> {
        entries
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
        let mut at = v;
        for key in path {
            at = &at[*key];
        }
        at.as_str()
            .unwrap_or_else(|| panic!("{path:?} is not a string: {at:?}"))
    }

    fn args(list: &Value) -> BTreeMap<String, String> {
        list.as_sequence()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["name"].as_str().unwrap().to_owned(),
                    a["value"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    // ------------------------------------------------------------ facts

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

    // ---------------------------------------------------------- kubelet

    #[test]
    fn the_kubelet_dropin_orders_kubelet_after_meshd_and_sets_node_ip() {
        let text = kubelet_dropin(&local(), Stack::Ipv4, "/usr/bin/kubelet").unwrap();
        let entries = ini(&text);
        assert_eq!(ini_values(&entries, "Unit", "After"), ["meshd.service"]);
        assert_eq!(
            ini_values(&entries, "Service", "EnvironmentFile"),
            ["/run/meshd/env"]
        );
        let exec = ini_values(&entries, "Service", "ExecStart");
        assert_eq!(exec.len(), 2, "{text}");
        assert_eq!(exec[0], "", "the first ExecStart= clears kubeadm's");
        assert!(
            exec[1].starts_with("/usr/bin/kubelet $KUBELET_KUBECONFIG_ARGS"),
            "{}",
            exec[1]
        );
        assert!(
            exec[1].ends_with(" --node-ip=100.72.0.5"),
            "node-ip comes last, so it wins: {}",
            exec[1]
        );
    }

    #[test]
    fn the_dual_stack_kubelet_dropin_lists_ipv4_then_ipv6() {
        let text = kubelet_dropin(&local(), Stack::Dual, "/usr/local/bin/kubelet").unwrap();
        let entries = ini(&text);
        let exec = ini_values(&entries, "Service", "ExecStart");
        assert!(
            exec[1].starts_with("/usr/local/bin/kubelet "),
            "{}",
            exec[1]
        );
        assert!(
            exec[1].ends_with(" --node-ip=100.72.0.5,fd7a:1:2::5"),
            "{}",
            exec[1]
        );
    }

    // ---------------------------------------------------------- flannel

    #[test]
    fn the_flannel_patch_adds_iface_to_the_kube_flannel_container() {
        let text = flannel(&local()).unwrap();
        let patch = document(&text);
        let containers = patch["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .unwrap();
        assert_eq!(containers.len(), 1);
        assert_eq!(str_at(&containers[0], &["name"]), "kube-flannel");
        let args: Vec<&str> = containers[0]["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args, ["--ip-masq", "--kube-subnet-mgr", "--iface=mesh0"]);
        assert!(
            text.contains("kubectl -n kube-flannel patch ds kube-flannel-ds --patch-file"),
            "{text}"
        );
        assert!(text.contains("1380 - 50 = 1330"), "{text}");
    }

    #[test]
    fn a_mesh_mtu_too_small_for_vxlan_is_refused() {
        let small = Local {
            mtu: 600,
            ..local()
        };
        assert!(matches!(
            flannel(&small),
            Err(KubeError::MtuTooSmall { mtu: 600, .. })
        ));
    }

    // ----------------------------------------------------------- calico

    fn calico_options(install: CalicoInstall, encapsulation: Encapsulation) -> CalicoOptions {
        CalicoOptions {
            install,
            encapsulation,
            pod_cidrs: vec!["192.168.0.0/16".parse().unwrap()],
        }
    }

    #[test]
    fn the_calico_installation_detects_the_node_address_on_mesh0_with_the_vxlan_mtu() {
        let opts = calico_options(CalicoInstall::Operator, Encapsulation::Vxlan);
        let doc = document(&calico(&local(), Stack::Ipv4, &opts).unwrap());
        assert_eq!(str_at(&doc, &["apiVersion"]), "operator.tigera.io/v1");
        assert_eq!(str_at(&doc, &["kind"]), "Installation");
        assert_eq!(str_at(&doc, &["metadata", "name"]), "default");
        let net = &doc["spec"]["calicoNetwork"];
        assert_eq!(net["mtu"].as_u64(), Some(1330));
        assert_eq!(
            str_at(net, &["nodeAddressAutodetectionV4", "interface"]),
            "mesh0"
        );
        assert!(net.get("nodeAddressAutodetectionV6").is_none());
        assert_eq!(str_at(net, &["bgp"]), "Disabled");
        let pools = net["ipPools"].as_sequence().unwrap();
        assert_eq!(pools.len(), 1);
        assert_eq!(str_at(&pools[0], &["cidr"]), "192.168.0.0/16");
        assert_eq!(
            str_at(&pools[0], &["encapsulation"]),
            "VXLAN",
            "never CrossSubnet: one subnet on mesh0"
        );
    }

    #[test]
    fn the_dual_stack_calico_installation_also_detects_ipv6_on_mesh0() {
        let mut opts = calico_options(CalicoInstall::Operator, Encapsulation::Ipip);
        opts.pod_cidrs.push("fd10::/48".parse().unwrap());
        let doc = document(&calico(&local(), Stack::Dual, &opts).unwrap());
        let net = &doc["spec"]["calicoNetwork"];
        assert_eq!(
            str_at(net, &["nodeAddressAutodetectionV6", "interface"]),
            "mesh0"
        );
        assert_eq!(net["mtu"].as_u64(), Some(1360), "IP-in-IP costs 20 bytes");
        assert_eq!(str_at(net, &["bgp"]), "Enabled");
        let pools = net["ipPools"].as_sequence().unwrap();
        assert_eq!(str_at(&pools[1], &["name"]), "default-ipv6-ippool");
        assert_eq!(str_at(&pools[1], &["encapsulation"]), "IPIP");
    }

    #[test]
    fn the_calico_manifest_patch_sets_autodetection_and_felix_mtu_on_calico_node() {
        let opts = calico_options(CalicoInstall::Manifest, Encapsulation::Vxlan);
        let text = calico(&local(), Stack::Dual, &opts).unwrap();
        let doc = document(&text);
        let container = &doc["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(str_at(container, &["name"]), "calico-node");
        let env = args(&container["env"]);
        assert_eq!(env["IP_AUTODETECTION_METHOD"], "interface=mesh0");
        assert_eq!(env["IP6_AUTODETECTION_METHOD"], "interface=mesh0");
        assert_eq!(
            env["FELIX_VXLANMTU"], "1330",
            "env values stay strings in YAML"
        );
        assert!(
            text.contains("kubectl -n kube-system patch ds calico-node --patch-file"),
            "{text}"
        );
    }

    #[test]
    fn a_pod_cidr_that_contains_the_overlay_address_is_refused() {
        let mut opts = calico_options(CalicoInstall::Operator, Encapsulation::Vxlan);
        opts.pod_cidrs = vec!["100.64.0.0/10".parse().unwrap()];
        let e = calico(&local(), Stack::Ipv4, &opts).unwrap_err();
        assert!(matches!(e, KubeError::PodCidrOverlapsMesh { .. }), "{e}");
    }

    // ---------------------------------------------------------- kubeadm

    fn kubeadm_options(endpoint: Option<&str>) -> KubeadmOptions {
        KubeadmOptions {
            control_plane_endpoint: endpoint.map(Into::into),
            pod_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        }
    }

    #[test]
    fn the_kubeadm_config_puts_api_server_kubelet_and_etcd_on_the_overlay_address() {
        let docs = documents(&kubeadm(&local(), Stack::Ipv4, &kubeadm_options(None)).unwrap());
        assert_eq!(docs.len(), 2);
        let (init, cluster) = (&docs[0], &docs[1]);
        assert_eq!(str_at(init, &["apiVersion"]), "kubeadm.k8s.io/v1beta4");
        assert_eq!(str_at(init, &["kind"]), "InitConfiguration");
        assert_eq!(
            str_at(init, &["localAPIEndpoint", "advertiseAddress"]),
            "100.72.0.5"
        );
        assert_eq!(str_at(init, &["nodeRegistration", "name"]), "node-a");
        assert_eq!(
            args(&init["nodeRegistration"]["kubeletExtraArgs"])["node-ip"],
            "100.72.0.5"
        );

        assert_eq!(str_at(cluster, &["kind"]), "ClusterConfiguration");
        assert!(cluster.get("controlPlaneEndpoint").is_none());
        assert_eq!(
            str_at(cluster, &["networking", "podSubnet"]),
            "10.244.0.0/16"
        );
        let sans: Vec<&str> = cluster["apiServer"]["certSANs"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert_eq!(sans, ["100.72.0.5", "node-a"]);
        let etcd = args(&cluster["etcd"]["local"]["extraArgs"]);
        assert_eq!(
            etcd["listen-client-urls"],
            "https://127.0.0.1:2379,https://100.72.0.5:2379"
        );
        assert_eq!(etcd["advertise-client-urls"], "https://100.72.0.5:2379");
        assert_eq!(etcd["listen-peer-urls"], "https://100.72.0.5:2380");
        assert_eq!(
            etcd["initial-advertise-peer-urls"],
            "https://100.72.0.5:2380"
        );
        assert_eq!(
            cluster["etcd"]["local"]["peerCertSANs"][0].as_str(),
            Some("100.72.0.5")
        );
    }

    #[test]
    fn the_kubeadm_config_takes_a_control_plane_endpoint_into_its_cert_sans() {
        let docs = documents(
            &kubeadm(
                &local(),
                Stack::Dual,
                &kubeadm_options(Some("k8s.example.com:6443")),
            )
            .unwrap(),
        );
        let cluster = &docs[1];
        assert_eq!(
            str_at(cluster, &["controlPlaneEndpoint"]),
            "k8s.example.com:6443"
        );
        let sans: Vec<&str> = cluster["apiServer"]["certSANs"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert_eq!(
            sans,
            ["100.72.0.5", "fd7a:1:2::5", "node-a", "k8s.example.com"]
        );
        assert_eq!(
            args(&docs[0]["nodeRegistration"]["kubeletExtraArgs"])["node-ip"],
            "100.72.0.5,fd7a:1:2::5"
        );
        let etcd = args(&cluster["etcd"]["local"]["extraArgs"]);
        assert_eq!(
            etcd["advertise-client-urls"],
            "https://100.72.0.5:2379,https://[fd7a:1:2::5]:2379"
        );
        assert_eq!(
            etcd["listen-peer-urls"], "https://100.72.0.5:2380",
            "kubeadm's --initial-cluster has one URL"
        );
        assert_eq!(
            etcd["initial-advertise-peer-urls"],
            "https://100.72.0.5:2380"
        );
        let etcd_sans = cluster["etcd"]["local"]["serverCertSANs"]
            .as_sequence()
            .unwrap();
        assert_eq!(
            etcd_sans.len(),
            3,
            "the overlay addresses and the name: {etcd_sans:?}"
        );
    }

    #[test]
    fn endpoint_hosts_are_read_from_every_endpoint_form() {
        assert_eq!(endpoint_host("k8s.example.com:6443"), "k8s.example.com");
        assert_eq!(endpoint_host("k8s.example.com"), "k8s.example.com");
        assert_eq!(endpoint_host("[fd7a::1]:6443"), "fd7a::1");
        assert_eq!(endpoint_host("fd7a::1"), "fd7a::1");
    }

    // -------------------------------------------------------- kubespray

    #[test]
    fn the_kubespray_inventory_lists_every_node_on_its_overlay_address() {
        let inventory = kubespray_inventory(&mesh(), Stack::Ipv4, &[]).unwrap();
        let doc = document(&inventory.yaml);
        let hosts = doc["all"]["hosts"].as_mapping().unwrap();
        assert_eq!(hosts.len(), 5);
        let host = |name: &str| &doc["all"]["hosts"][name];
        for (name, ip) in [
            ("node-a", "100.72.0.5"),
            ("node-b", "100.72.0.6"),
            ("node-e", "100.72.0.9"),
        ] {
            for field in ["ip", "access_ip", "etcd_address"] {
                assert_eq!(str_at(host(name), &[field]), ip, "{name} {field}");
            }
            assert!(host(name).get("ip6").is_none());
        }
        assert_eq!(str_at(host("node-a"), &["ansible_host"]), "203.0.113.5");
        assert_eq!(str_at(host("node-b"), &["ansible_host"]), "192.0.2.6");
        assert_eq!(str_at(host("node-c"), &["ansible_host"]), "198.51.100.7");
        assert_eq!(str_at(host("node-d"), &["ansible_host"]), "10.2.0.8");
        assert!(host("node-e").get("ansible_host").is_none());
        assert!(
            inventory
                .notes
                .iter()
                .any(|n| n.starts_with("node-e: no reachable address")),
            "{:?}",
            inventory.notes
        );
    }

    fn group(doc: &Value, name: &str) -> Vec<String> {
        doc["all"]["children"][name]["hosts"]
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn the_kubespray_control_plane_defaults_to_this_node_and_every_node_is_a_worker() {
        let doc = document(&kubespray_inventory(&mesh(), Stack::Ipv4, &[]).unwrap().yaml);
        assert_eq!(group(&doc, "kube_control_plane"), ["node-a"]);
        assert_eq!(group(&doc, "etcd"), ["node-a"]);
        assert_eq!(
            group(&doc, "kube_node"),
            ["node-a", "node-b", "node-c", "node-d", "node-e"]
        );
        let k8s: Vec<&str> = doc["all"]["children"]["k8s_cluster"]["children"]
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap())
            .collect();
        assert_eq!(k8s, ["kube_control_plane", "kube_node"]);
    }

    #[test]
    fn the_kubespray_control_plane_can_be_named_and_an_unknown_name_is_refused() {
        let chosen = [
            "node-b".to_owned(),
            "node-c".to_owned(),
            "node-d".to_owned(),
        ];
        let doc = document(
            &kubespray_inventory(&mesh(), Stack::Dual, &chosen)
                .unwrap()
                .yaml,
        );
        assert_eq!(group(&doc, "kube_control_plane"), chosen);
        assert_eq!(group(&doc, "etcd"), chosen);
        assert_eq!(
            str_at(&doc["all"]["hosts"]["node-c"], &["ip6"]),
            "fd7a:1:2::7"
        );
        let e = kubespray_inventory(&mesh(), Stack::Ipv4, &["node-z".to_owned()]).unwrap_err();
        assert!(
            e.to_string().contains("node-z") && e.to_string().contains("node-a, node-b"),
            "{e}"
        );
    }

    #[test]
    fn two_nodes_with_one_name_are_refused_for_kubespray() {
        let mut twins = peers();
        twins[1].name = Some("node-b".into());
        let mesh = Mesh::from_api(&status(), &twins, &Overrides::default()).unwrap();
        assert!(matches!(
            kubespray_inventory(&mesh, Stack::Ipv4, &[]),
            Err(KubeError::DuplicateName { .. })
        ));
    }

    // ------------------------------------------------------------ check

    fn node_json(internal_ip: &str, annotations: &[(&str, &str)]) -> String {
        let annotations: serde_json::Map<String, serde_json::Value> = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).into()))
            .collect();
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": "node-a", "annotations": annotations, "labels": {"kubernetes.io/os": "linux"} },
            "spec": { "podCIDR": "10.244.1.0/24" },
            "status": { "addresses": [
                { "type": "InternalIP", "address": internal_ip },
                { "type": "Hostname", "address": "node-a" }
            ] }
        })
        .to_string()
    }

    fn findings(json: &str) -> Vec<Finding> {
        check(
            &parse_node(json, "node.json").unwrap(),
            "node.json",
            &local(),
            Stack::Ipv4,
        )
        .unwrap()
    }

    fn verdict<'a>(findings: &'a [Finding], subject: &str) -> &'a Verdict {
        &findings
            .iter()
            .find(|f| f.subject == subject)
            .unwrap_or_else(|| panic!("no {subject}"))
            .verdict
    }

    #[test]
    fn a_node_on_the_overlay_address_matches_everywhere() {
        let json = node_json(
            "100.72.0.5",
            &[
                (FLANNEL_PUBLIC_IP, "100.72.0.5"),
                (CALICO_IPV4, "100.72.0.5/16"),
            ],
        );
        let findings = findings(&json);
        assert_eq!(mismatches(&findings), 0, "{findings:?}");
        assert!(matches!(
            verdict(&findings, "InternalIP (IPv4)"),
            Verdict::Matches { .. }
        ));
        assert!(
            matches!(verdict(&findings, CALICO_IPV4), Verdict::Matches { value } if value == "100.72.0.5")
        );
        assert!(matches!(
            verdict(&findings, FLANNEL_PUBLIC_IP_OVERWRITE),
            Verdict::Absent { .. }
        ));
        assert!(render_check("node-a", &findings)
            .ends_with("node node-a: Kubernetes uses the overlay addresses\n"));
    }

    #[test]
    fn a_private_internal_ip_is_a_mismatch_fixed_by_the_kubelet_dropin() {
        let findings = findings(&node_json("10.0.0.4", &[]));
        assert_eq!(mismatches(&findings), 1);
        let Verdict::Mismatch {
            found,
            expected,
            fix,
        } = verdict(&findings, "InternalIP (IPv4)")
        else {
            panic!("{findings:?}")
        };
        assert_eq!(
            (found.as_str(), expected.as_str()),
            ("10.0.0.4", "100.72.0.5")
        );
        assert!(
            fix[0].contains("meshctl kube kubelet-dropin >")
                && fix[0].contains("systemctl restart kubelet"),
            "{fix:?}"
        );
        let text = render_check("node-a", &findings);
        assert!(
            text.contains(
                "MISMATCH  InternalIP (IPv4): 10.0.0.4, the overlay address is 100.72.0.5"
            ),
            "{text}"
        );
        assert!(
            text.contains("fix: on node-a: meshctl kube kubelet-dropin"),
            "{text}"
        );
    }

    #[test]
    fn flannel_on_the_public_address_is_a_mismatch_fixed_by_the_flannel_patch() {
        let findings = findings(&node_json(
            "100.72.0.5",
            &[(FLANNEL_PUBLIC_IP, "203.0.113.5")],
        ));
        let Verdict::Mismatch { found, fix, .. } = verdict(&findings, FLANNEL_PUBLIC_IP) else {
            panic!("{findings:?}")
        };
        assert_eq!(found, "203.0.113.5");
        assert!(
            fix[0].contains("meshctl kube flannel >")
                && fix[0].contains("kubectl -n kube-flannel patch ds"),
            "{fix:?}"
        );
    }

    #[test]
    fn a_public_ip_overwrite_elsewhere_is_a_mismatch_fixed_by_removing_it() {
        let json = node_json(
            "100.72.0.5",
            &[
                (FLANNEL_PUBLIC_IP, "203.0.113.5"),
                (FLANNEL_PUBLIC_IP_OVERWRITE, "203.0.113.5"),
            ],
        );
        let findings = findings(&json);
        assert_eq!(mismatches(&findings), 2);
        let Verdict::Mismatch { fix, .. } = verdict(&findings, FLANNEL_PUBLIC_IP_OVERWRITE) else {
            panic!()
        };
        assert!(
            fix[0].starts_with(
                "kubectl annotate node node-a flannel.alpha.coreos.com/public-ip-overwrite-"
            ),
            "{fix:?}"
        );
    }

    #[test]
    fn calico_on_another_address_is_a_mismatch_with_operator_and_manifest_fixes() {
        let findings = findings(&node_json("100.72.0.5", &[(CALICO_IPV4, "10.0.0.4/24")]));
        let Verdict::Mismatch { found, fix, .. } = verdict(&findings, CALICO_IPV4) else {
            panic!("{findings:?}")
        };
        assert_eq!(found, "10.0.0.4");
        assert!(
            fix[0].contains("kubectl patch installation default")
                && fix[0].contains("nodeAddressAutodetectionV4"),
            "{fix:?}"
        );
        assert!(
            fix[1].contains("set env ds/calico-node IP_AUTODETECTION_METHOD=interface=mesh0"),
            "{fix:?}"
        );
    }

    #[test]
    fn a_node_without_addresses_or_with_garbage_is_a_mismatch_not_a_panic() {
        let json = r#"{"kind":"Node","metadata":{"name":"node-a","annotations":{"projectcalico.org/IPv4Address":"///"}}}"#;
        let findings = findings(json);
        assert!(
            matches!(verdict(&findings, "InternalIP (IPv4)"), Verdict::Mismatch { found, .. } if found == "none")
        );
        assert!(matches!(
            verdict(&findings, CALICO_IPV4),
            Verdict::Mismatch { .. }
        ));
    }

    #[test]
    fn dual_stack_checks_the_ipv6_internal_ip_too() {
        let mut node = parse_node(&node_json("100.72.0.5", &[]), "node.json").unwrap();
        let findings = check(&node, "node.json", &local(), Stack::Dual).unwrap();
        assert!(
            matches!(verdict(&findings, "InternalIP (IPv6)"), Verdict::Mismatch { found, .. } if found == "none")
        );
        node.internal_ips.push("fd7a:1:2::5".into());
        let findings = check(&node, "node.json", &local(), Stack::Dual).unwrap();
        assert_eq!(mismatches(&findings), 0, "{findings:?}");
    }

    #[test]
    fn malformed_node_json_is_one_clear_line() {
        for (text, says) in [
            ("", "EOF"),
            ("{not json", "key must be a string"),
            (r#"{"kind":"Node"}"#, "missing field `metadata`"),
            (r#"{"kind":"Node","metadata":{"name":7}}"#, "invalid type"),
            (
                r#"{"kind":"NodeList","metadata":{"name":""},"items":[]}"#,
                "kind is NodeList",
            ),
            (
                r#"{"kind":"Node","metadata":{"name":"a"},"status":{"addresses":[{"type":1}]}}"#,
                "invalid type",
            ),
        ] {
            let e = parse_node(text, "node.json").unwrap_err().to_string();
            assert!(e.starts_with("node.json: not a Kubernetes Node: "), "{e}");
            assert!(e.contains(says), "{text:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn the_node_of_another_name_is_refused() {
        let node = NodeView {
            name: "node-b".into(),
            ..parse_node(&node_json("100.72.0.6", &[]), "x").unwrap()
        };
        let e = check(&node, "node.json", &local(), Stack::Ipv4).unwrap_err();
        assert!(e.to_string().contains("--node-name node-b"), "{e}");
    }

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
