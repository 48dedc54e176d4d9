//! calico on the mesh interface: the tigera operator's `Installation`, or
//! a patch of a manifest install's calico-node; with IPIP or VXLAN between
//! overlay addresses, or without encapsulation, each node's pods in an IP
//! pool of its own that meshd routes as the node's advertised prefix. Pure.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::patch::{daemonset_patch, Container, EnvVar, ExecProbe};
use super::{
    check_families, check_native_pod_cidrs, check_node_name, check_pod_cidrs, comments, inner_mtu,
    join, join_nets, shell_word, KubeError, Local, Stack, IPIP_OVERHEAD, VXLAN_OVERHEAD,
};

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

/// calico's encapsulation between nodes. Never a `CrossSubnet` mode: every
/// overlay address is in one subnet, so calico would send pod packets
/// bare to mesh0 and count on routes it cannot make meshd learn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encapsulation {
    Vxlan,
    Ipip,
    /// Pod packets bare on mesh0, BGP off. calico's BIRD would route the
    /// pod blocks on mesh0 without a gateway (its iBGP sessions are
    /// `multihop` with `gateway recursive`, and a TUN is point-to-point),
    /// which names no peer, so meshd could not learn them. Instead each
    /// node's pods come from an IP pool pinned to it
    /// ([`CalicoOptions::node_pod_cidrs`]), which the node advertises to
    /// the mesh (`routes` in meshd.toml).
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalicoOptions {
    pub install: CalicoInstall,
    pub encapsulation: Encapsulation,
    /// The cluster's pod network: the IP pools with encapsulation, one
    /// per family; without, the ranges this node's pool must lie in
    /// (the rendezvous's routable ranges).
    pub pod_cidrs: Vec<IpNet>,
    /// This node's share of the pod network, one per family: its IP pool
    /// and its advertised prefix. Only with [`Encapsulation::None`].
    pub node_pod_cidrs: Vec<IpNet>,
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
    /// An empty list (not a missing one) keeps the operator from making
    /// any pool.
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

/// A `projectcalico.org/v3` IPPool resource (calicoctl's, or kubectl's
/// through calico's API server).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IpPoolResource {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: IpPoolSpec,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IpPoolSpec {
    cidr: String,
    block_size: u8,
    ipip_mode: String,
    vxlan_mode: String,
    nat_outgoing: bool,
    node_selector: String,
}

/// An encapsulation's name, overhead and how calico is told about it.
struct Tunnel {
    name: &'static str,
    overhead: u16,
    /// The operator pool's `encapsulation`.
    pool_mode: &'static str,
    /// IP-in-IP routes are learned over BGP (TCP 179 between overlay
    /// addresses); VXLAN's are Felix's own.
    bgp: &'static str,
    /// The manifest install's calico-node variable for the MTU.
    felix_mtu: &'static str,
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
    let tunnel = match options.encapsulation {
        Encapsulation::Vxlan => Tunnel {
            name: "VXLAN",
            overhead: VXLAN_OVERHEAD,
            pool_mode: "VXLAN",
            bgp: "Disabled",
            felix_mtu: "FELIX_VXLANMTU",
        },
        Encapsulation::Ipip => Tunnel {
            name: "IP-in-IP",
            overhead: IPIP_OVERHEAD,
            pool_mode: "IPIP",
            bgp: "Enabled",
            felix_mtu: "FELIX_IPINIPMTU",
        },
        Encapsulation::None => return native(local, stack, options),
    };
    encapsulated(local, stack, options, &tunnel)
}

fn autodetection(local: &Local, stack: Stack) -> (Autodetection, Option<Autodetection>) {
    let iface = &local.interface;
    let v6 = match stack {
        Stack::Ipv4 => None,
        Stack::Dual => Some(Autodetection {
            interface: iface.clone(),
        }),
    };
    (
        Autodetection {
            interface: iface.clone(),
        },
        v6,
    )
}

fn installation(network: CalicoNetwork) -> Installation {
    Installation {
        api_version: "operator.tigera.io/v1".into(),
        kind: "Installation".into(),
        metadata: Metadata {
            name: "default".into(),
        },
        spec: InstallationSpec {
            calico_network: network,
        },
    }
}

/// calico-node's env for the node address on the mesh interface.
fn autodetection_env(local: &Local, stack: Stack) -> Vec<EnvVar> {
    let method = format!("interface={}", local.interface);
    let mut env = vec![EnvVar::new("IP_AUTODETECTION_METHOD", &method)];
    match stack {
        Stack::Ipv4 => {}
        Stack::Dual => env.push(EnvVar::new("IP6_AUTODETECTION_METHOD", &method)),
    }
    env
}

fn encapsulated(
    local: &Local,
    stack: Stack,
    options: &CalicoOptions,
    tunnel: &Tunnel,
) -> Result<String, KubeError> {
    let ips = local.node.addresses(stack)?;
    let (encap_name, overhead) = (tunnel.name, tunnel.overhead);
    let mtu = inner_mtu(local.mtu, encap_name, overhead)?;
    check_pod_cidrs(local, &options.pod_cidrs)?;
    let iface = &local.interface;
    let head = format!(
        "calico over {iface}: node {} at {}, {encap_name} MTU {} - {overhead} = {mtu}.",
        local.node.name,
        join(&ips),
        local.mtu
    );
    match options.install {
        CalicoInstall::Operator => {
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
                    encapsulation: tunnel.pool_mode.into(),
                    nat_outgoing: "Enabled".into(),
                    node_selector: "all()".into(),
                })
                .collect();
            let (v4, v6) = autodetection(local, stack);
            let installation = installation(CalicoNetwork {
                bgp: tunnel.bgp.into(),
                mtu,
                node_address_autodetection_v4: v4,
                node_address_autodetection_v6: v6,
                ip_pools: pools,
            });
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
            let mut env = autodetection_env(local, stack);
            env.push(EnvVar::new(tunnel.felix_mtu, mtu));
            let patch = daemonset_patch(Container {
                name: "calico-node".into(),
                env,
                ..Container::default()
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

/// This node's pool: its pod CIDR, pinned to it, no IPIP or VXLAN.
fn node_pool(node: &str, cidr: IpNet) -> IpPoolResource {
    // calico's default blocks (/26, /122), or the whole pool when it is
    // smaller: a pool holds at least one block.
    let (family, default_block) = match cidr {
        IpNet::V4(_) => ("ipv4", 26),
        IpNet::V6(_) => ("ipv6", 122),
    };
    IpPoolResource {
        api_version: "projectcalico.org/v3".into(),
        kind: "IPPool".into(),
        metadata: Metadata {
            name: format!("meshd-{node}-{family}"),
        },
        spec: IpPoolSpec {
            cidr: cidr.to_string(),
            block_size: cidr.prefix_len().max(default_block),
            ipip_mode: "Never".into(),
            vxlan_mode: "Never".into(),
            nat_outgoing: true,
            node_selector: format!("kubernetes.io/hostname == '{node}'"),
        },
    }
}

/// Checks the node's pod CIDRs: given, one per family, network addresses
/// clear of the overlay, each inside the cluster's pod network.
fn check_node_pod_cidrs(
    local: &Local,
    stack: Stack,
    options: &CalicoOptions,
) -> Result<(), KubeError> {
    const FLAG: &str = "--node-pod-cidr";
    if options.node_pod_cidrs.is_empty() {
        return Err(KubeError::PodCidrFamilies {
            flag: FLAG,
            reason: "required without encapsulation: this node's share of the pod network, its IP pool and its advertised prefix".into(),
        });
    }
    check_families(FLAG, &options.node_pod_cidrs, stack)?;
    check_native_pod_cidrs(local, "--pod-cidr", &options.pod_cidrs)?;
    check_native_pod_cidrs(local, FLAG, &options.node_pod_cidrs)?;
    for cidr in &options.node_pod_cidrs {
        if !options.pod_cidrs.iter().any(|p| p.contains(cidr)) {
            return Err(KubeError::NodePodCidrOutside {
                cidr: *cidr,
                pod_cidrs: join_nets(&options.pod_cidrs),
            });
        }
    }
    check_node_name(&local.node.name)
}

fn native(local: &Local, stack: Stack, options: &CalicoOptions) -> Result<String, KubeError> {
    let ips = local.node.addresses(stack)?;
    check_node_pod_cidrs(local, stack, options)?;
    // No encapsulation: pods get the whole of mesh0's MTU.
    let mtu = inner_mtu(local.mtu, "no encapsulation", 0)?;
    let iface = &local.interface;
    let node = &local.node.name;
    let to_json = |items: &[IpNet]| {
        serde_json::to_string(&items.iter().map(ToString::to_string).collect::<Vec<_>>())
            .map_err(KubeError::Json)
    };
    let node_routes = to_json(&options.node_pod_cidrs)?;
    let routable = to_json(&options.pod_cidrs)?;
    let advertise = options
        .node_pod_cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut lines = vec![
        format!(
            "calico over {iface}: node {node} at {}, no encapsulation: pods get {iface}'s MTU {mtu}.",
            join(&ips)
        ),
        "BGP off: calico's BIRD would route pod blocks on mesh0 without a gateway (multihop iBGP, gateway recursive), which names no peer, so meshd could not learn them.".into(),
        format!("Instead {node}'s pods come from an IP pool pinned to it ({}), which meshd routes to {node}:", join_nets(&options.node_pod_cidrs)),
        format!("meshd on {node}: routes = {node_routes} in meshd.toml (or meshd join --advertise-routes {advertise})"),
        format!("rendezvous.toml: [routes] routable = {routable} (accepted without approval, unless another node holds an overlapping prefix)"),
        "kubernetes.io/hostname is the Node's label: the pool is this node's if `kubectl get node NAME -L kubernetes.io/hostname` shows the name above.".into(),
    ];
    let pools: Vec<IpPoolResource> = options
        .node_pod_cidrs
        .iter()
        .map(|&cidr| node_pool(node, cidr))
        .collect();
    let mut yaml = Vec::new();
    {
        // One serializer for all documents: it writes the `---` between them.
        let mut serializer = serde_norway::Serializer::new(&mut yaml);
        match options.install {
            CalicoInstall::Operator => {
                let (v4, v6) = autodetection(local, stack);
                let installation = installation(CalicoNetwork {
                    bgp: "Disabled".into(),
                    mtu,
                    node_address_autodetection_v4: v4,
                    node_address_autodetection_v6: v6,
                    ip_pools: vec![],
                });
                lines.extend([
                    "The Installation (the same on every node) turns BGP off and leaves IP pools to you (ipPools: []): apply it instead of the one in custom-resources.yaml, before calico first starts.".to_owned(),
                    "Then the IPPool of each node (this one's below).".into(),
                    "Apply: kubectl apply -f calico-mesh.yaml (the IPPool through calico's API server; before that server runs, its pods need a pool: calicoctl apply -f with this node's IPPool alone)".into(),
                ]);
                installation.serialize(&mut serializer)?;
            }
            CalicoInstall::Manifest => {
                let config = serde_json::json!({
                    "data": { "calico_backend": "none", "veth_mtu": mtu.to_string() }
                });
                let mut env = autodetection_env(local, stack);
                // calico-node would otherwise make a pool for every node.
                env.push(EnvVar::new("NO_DEFAULT_POOLS", "true"));
                let patch = daemonset_patch(Container {
                    name: "calico-node".into(),
                    env,
                    // Without BIRD, its checks would keep calico-node unready.
                    liveness_probe: Some(ExecProbe::new(&["/bin/calico-node", "-felix-live"])),
                    readiness_probe: Some(ExecProbe::new(&["/bin/calico-node", "-felix-ready"])),
                    ..Container::default()
                });
                let patch = serde_json::to_string(&patch).map_err(KubeError::Json)?;
                lines.extend([
                    "1. calico_backend none is calico's policy-only mode: Felix without BIRD or VXLAN; veth_mtu is the pods' MTU:".to_owned(),
                    format!(
                        "   kubectl -n kube-system patch configmap calico-config --type merge -p {}",
                        shell_word(&config.to_string())
                    ),
                    "2. calico-node: node address on the mesh, no default pool, health checks without BIRD:".into(),
                    format!(
                        "   kubectl -n kube-system patch ds calico-node -p {}",
                        shell_word(&patch)
                    ),
                    "3. This node's IP pool: calicoctl apply -f calico-mesh.yaml".into(),
                    "Once every node has its pool, disable the cluster-wide one: calicoctl patch ippool default-ipv4-ippool -p '{\"spec\":{\"disabled\":true}}'".into(),
                ]);
            }
        }
        for pool in &pools {
            pool.serialize(&mut serializer)?;
        }
    }
    let mut out = comments(&lines);
    out.push_str(&String::from_utf8_lossy(&yaml));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::generate::testing::*;

    fn calico_options(install: CalicoInstall, encapsulation: Encapsulation) -> CalicoOptions {
        CalicoOptions {
            install,
            encapsulation,
            pod_cidrs: vec!["192.168.0.0/16".parse().unwrap()],
            node_pod_cidrs: vec![],
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

    fn native_options(install: CalicoInstall, node: &[&str]) -> CalicoOptions {
        CalicoOptions {
            install,
            encapsulation: Encapsulation::None,
            pod_cidrs: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd10:244::/56".parse().unwrap(),
            ],
            node_pod_cidrs: node.iter().map(|c| c.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn without_encapsulation_the_installation_turns_bgp_off_and_makes_no_pool() {
        let opts = native_options(CalicoInstall::Operator, &["10.244.3.0/24"]);
        let docs = documents(&calico(&local(), Stack::Ipv4, &opts).unwrap());
        assert_eq!(docs.len(), 2, "the Installation, then this node's pool");
        let net = &docs[0]["spec"]["calicoNetwork"];
        assert_eq!(str_at(net, &["bgp"]), "Disabled");
        assert_eq!(
            net["mtu"].as_u64(),
            Some(1380),
            "no encapsulation: mesh0's MTU"
        );
        assert_eq!(
            net["ipPools"].as_sequence().map(Vec::len),
            Some(0),
            "an empty list, so the operator makes no cluster-wide pool"
        );
        assert_eq!(
            str_at(net, &["nodeAddressAutodetectionV4", "interface"]),
            "mesh0"
        );
    }

    #[test]
    fn without_encapsulation_the_node_gets_a_pool_of_its_own() {
        let opts = native_options(
            CalicoInstall::Operator,
            &["10.244.3.0/24", "fd10:244:0:3::/64"],
        );
        let docs = documents(&calico(&local(), Stack::Dual, &opts).unwrap());
        assert_eq!(docs.len(), 3);
        let pool = &docs[1];
        assert_eq!(str_at(pool, &["apiVersion"]), "projectcalico.org/v3");
        assert_eq!(str_at(pool, &["kind"]), "IPPool");
        assert_eq!(str_at(pool, &["metadata", "name"]), "meshd-node-a-ipv4");
        let spec = &pool["spec"];
        assert_eq!(str_at(spec, &["cidr"]), "10.244.3.0/24");
        assert_eq!(str_at(spec, &["ipipMode"]), "Never");
        assert_eq!(str_at(spec, &["vxlanMode"]), "Never");
        assert_eq!(spec["natOutgoing"].as_bool(), Some(true));
        assert_eq!(spec["blockSize"].as_u64(), Some(26));
        assert_eq!(
            str_at(spec, &["nodeSelector"]),
            "kubernetes.io/hostname == 'node-a'"
        );
        assert_eq!(str_at(&docs[2]["spec"], &["cidr"]), "fd10:244:0:3::/64");
        assert_eq!(docs[2]["spec"]["blockSize"].as_u64(), Some(122));
    }

    #[test]
    fn a_node_pool_smaller_than_a_block_is_one_block() {
        let opts = native_options(CalicoInstall::Operator, &["10.244.3.0/28"]);
        let docs = documents(&calico(&local(), Stack::Ipv4, &opts).unwrap());
        assert_eq!(docs[1]["spec"]["blockSize"].as_u64(), Some(28));
    }

    #[test]
    fn without_encapsulation_the_comments_say_what_meshd_needs_and_why_no_bgp() {
        let opts = native_options(CalicoInstall::Operator, &["10.244.3.0/24"]);
        let text = calico(&local(), Stack::Ipv4, &opts).unwrap();
        for fact in [
            "pods get mesh0's MTU 1380",
            "without a gateway",
            "names no peer",
            "routes = [\"10.244.3.0/24\"] in meshd.toml",
            "meshd join --advertise-routes 10.244.3.0/24",
            "[routes] routable = [\"10.244.0.0/16\",\"fd10:244::/56\"]",
            "ipPools: []",
        ] {
            assert!(text.contains(fact), "{fact:?} missing:\n{text}");
        }
    }

    #[test]
    fn the_manifest_install_without_encapsulation_runs_calico_node_without_bird() {
        let opts = native_options(CalicoInstall::Manifest, &["10.244.3.0/24"]);
        let text = calico(&local(), Stack::Ipv4, &opts).unwrap();
        let docs = documents(&text);
        assert_eq!(docs.len(), 1, "this node's pool, for calicoctl");
        assert_eq!(str_at(&docs[0], &["kind"]), "IPPool");
        let config = patch_argument(&text, "patch configmap calico-config");
        assert_eq!(config["data"]["calico_backend"], "none");
        assert_eq!(config["data"]["veth_mtu"], "1380");
        let ds = patch_argument(&text, "patch ds calico-node");
        let container = &ds["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["name"], "calico-node");
        let env: Vec<(&str, &str)> = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap(), e["value"].as_str().unwrap()))
            .collect();
        assert!(
            env.contains(&("IP_AUTODETECTION_METHOD", "interface=mesh0")),
            "{env:?}"
        );
        assert!(env.contains(&("NO_DEFAULT_POOLS", "true")), "{env:?}");
        assert_eq!(
            container["readinessProbe"]["exec"]["command"],
            serde_json::json!(["/bin/calico-node", "-felix-ready"])
        );
        assert_eq!(
            container["livenessProbe"]["exec"]["command"],
            serde_json::json!(["/bin/calico-node", "-felix-live"])
        );
        assert!(
            text.contains("calicoctl apply -f calico-mesh.yaml"),
            "{text}"
        );
    }

    #[test]
    fn a_node_pod_cidr_outside_the_pod_network_or_in_the_overlay_is_refused() {
        for (install, node, words) in [
            (
                CalicoInstall::Operator,
                "10.245.3.0/24",
                "is not inside any --pod-cidr (10.244.0.0/16, fd10:244::/56)",
            ),
            (
                CalicoInstall::Manifest,
                "10.244.3.1/24",
                "did you mean 10.244.3.0/24",
            ),
            (
                CalicoInstall::Operator,
                "fd10:244:0:3::/64",
                "needs --dual-stack",
            ),
        ] {
            let e = calico(&local(), Stack::Ipv4, &native_options(install, &[node])).unwrap_err();
            assert!(e.to_string().contains(words), "{node}: {e}");
        }
        let mut opts = native_options(CalicoInstall::Operator, &["100.72.3.0/24"]);
        opts.pod_cidrs = vec!["100.72.0.0/16".parse().unwrap()];
        let e = calico(&local(), Stack::Ipv4, &opts).unwrap_err();
        assert!(matches!(e, KubeError::PodCidrOverlapsOverlay { .. }), "{e}");
        let e = calico(
            &local(),
            Stack::Ipv4,
            &native_options(CalicoInstall::Operator, &[]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("--node-pod-cidr: required"), "{e}");
    }

    #[test]
    fn a_node_name_a_selector_cannot_hold_is_refused() {
        let mut local = local();
        local.node.name = "Node A".into();
        let opts = native_options(CalicoInstall::Operator, &["10.244.3.0/24"]);
        let e = calico(&local, Stack::Ipv4, &opts).unwrap_err();
        assert!(matches!(e, KubeError::NotANodeName { .. }), "{e}");
    }
}
