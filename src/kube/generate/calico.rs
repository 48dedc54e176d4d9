//! calico on the mesh interface: the tigera operator's `Installation`, or
//! a patch of a manifest install's calico-node. Pure.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::patch::{daemonset_patch, Container, EnvVar};
use super::{
    check_pod_cidrs, comments, inner_mtu, join, KubeError, Local, Stack, IPIP_OVERHEAD,
    VXLAN_OVERHEAD,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::generate::testing::*;

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
}
