//! kube-flannel on the mesh interface: the DaemonSet patch that points it
//! at mesh0 (VXLAN between overlay addresses, flannel's default) or, with
//! host-gw, that patch plus the `net-conf.json` that routes pod subnets
//! natively over mesh0. Pure.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::patch::{daemonset_patch, Container};
use super::{
    check_families, check_native_pod_cidrs, comments, inner_mtu, shell_word, KubeError, Local,
    Stack, VXLAN_OVERHEAD,
};

/// The file name the printed apply commands use for flannel's patch.
pub(super) const FLANNEL_PATCH_FILE: &str = "flannel-mesh.yaml";

/// How flannel carries pods between nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlannelBackend {
    /// VXLAN between overlay addresses, inside mesh0 (flannel's default).
    Vxlan,
    /// host-gw: a route per node, `<pod subnet> via <overlay IP> dev
    /// mesh0`, which meshd learns; `pod_cidrs` is the cluster's pod
    /// network (`Network`, and `IPv6Network` for dual stack).
    HostGw { pod_cidrs: Vec<IpNet> },
}

/// flannel's `net-conf.json`, the keys host-gw needs.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NetConf {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    network: Option<String>,
    #[serde(
        rename = "EnableIPv6",
        skip_serializing_if = "Option::is_none",
        default
    )]
    enable_ipv6: Option<bool>,
    #[serde(
        rename = "IPv6Network",
        skip_serializing_if = "Option::is_none",
        default
    )]
    ipv6_network: Option<String>,
    backend: NetConfBackend,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NetConfBackend {
    #[serde(rename = "Type")]
    kind: String,
}

/// What to apply so kube-flannel runs over `mesh0` with `backend`.
///
/// Both backends need only `--iface`: flannel takes the interface's MTU
/// (less VXLAN's 50 bytes, or all of it for host-gw) and writes it as
/// `FLANNEL_MTU` to `/run/flannel/subnet.env`; VXLAN needs no change to
/// `net-conf.json`, host-gw needs its `Backend` (printed as a ConfigMap
/// patch, generated here as JSON, never assembled from strings).
pub fn flannel(local: &Local, stack: Stack, backend: &FlannelBackend) -> Result<String, KubeError> {
    match backend {
        FlannelBackend::Vxlan => vxlan(local),
        FlannelBackend::HostGw { pod_cidrs } => host_gw(local, stack, pod_cidrs),
    }
}

fn iface_patch(local: &Local) -> Result<String, KubeError> {
    let patch = daemonset_patch(Container {
        name: "kube-flannel".into(),
        // kube-flannel.yml's own args, then ours: the list is replaced whole.
        args: vec![
            "--ip-masq".into(),
            "--kube-subnet-mgr".into(),
            format!("--iface={}", local.interface),
        ],
        ..Container::default()
    });
    Ok(serde_norway::to_string(&patch)?)
}

fn vxlan(local: &Local) -> Result<String, KubeError> {
    let mtu = inner_mtu(local.mtu, "VXLAN", VXLAN_OVERHEAD)?;
    let iface = &local.interface;
    let mut out = comments(&[
        format!("flannel over {iface}: VXLAN between overlay addresses (node {}: {}).", local.node.name, local.node.ipv4),
        format!(
            "MTU: flannel derives it from {iface}: {} - {VXLAN_OVERHEAD} = {mtu} (FLANNEL_MTU in /run/flannel/subnet.env); net-conf.json needs no change.",
            local.mtu
        ),
        "This patch replaces the container's args: kube-flannel.yml's defaults plus --iface.".to_owned(),
        format!("Apply: kubectl -n kube-flannel patch ds kube-flannel-ds --patch-file {FLANNEL_PATCH_FILE}"),
    ]);
    out.push_str(&iface_patch(local)?);
    Ok(out)
}

/// The cluster's pod network for `net-conf.json`: one IPv4 CIDR, and one
/// IPv6 CIDR exactly when dual stack.
fn host_gw_networks(
    stack: Stack,
    pod_cidrs: &[IpNet],
) -> Result<(IpNet, Option<IpNet>), KubeError> {
    const FLAG: &str = "--pod-cidr";
    check_families(FLAG, pod_cidrs, stack)?;
    let v4 = pod_cidrs.iter().find(|c| matches!(c, IpNet::V4(_)));
    let v6 = pod_cidrs.iter().find(|c| matches!(c, IpNet::V6(_)));
    let missing = |reason: &str| KubeError::PodCidrFamilies {
        flag: FLAG,
        reason: reason.to_owned(),
    };
    let v4 = *v4.ok_or_else(|| missing("flannel's Network needs an IPv4 CIDR"))?;
    match (stack, v6) {
        (Stack::Ipv4, _) => Ok((v4, None)),
        (Stack::Dual, Some(v6)) => Ok((v4, Some(*v6))),
        (Stack::Dual, None) => Err(missing("--dual-stack needs an IPv6 CIDR too (IPv6Network)")),
    }
}

fn host_gw(local: &Local, stack: Stack, pod_cidrs: &[IpNet]) -> Result<String, KubeError> {
    let (v4, v6) = host_gw_networks(stack, pod_cidrs)?;
    check_native_pod_cidrs(local, "--pod-cidr", pod_cidrs)?;
    let ips = local.node.addresses(stack)?;
    // No encapsulation: pods get the whole of mesh0's MTU.
    let mtu = inner_mtu(local.mtu, "host-gw", 0)?;
    let iface = &local.interface;
    let net_conf = NetConf {
        network: Some(v4.to_string()),
        enable_ipv6: v6.map(|_| true),
        ipv6_network: v6.map(|n| n.to_string()),
        backend: NetConfBackend {
            kind: "host-gw".into(),
        },
    };
    let config_patch = serde_json::json!({
        "data": { "net-conf.json": serde_json::to_string(&net_conf).map_err(KubeError::Json)? }
    });
    let routable: Vec<String> = pod_cidrs.iter().map(ToString::to_string).collect();
    let routable = serde_json::to_string(&routable).map_err(KubeError::Json)?;
    let mut out = comments(&[
        format!(
            "flannel over {iface}: host-gw, pods routed natively between overlay addresses (node {}: {}).",
            local.node.name,
            super::join(&ips)
        ),
        format!(
            "Each node routes every other node's pod subnet as `<its podCIDR> via <its overlay IP> dev {iface}`. host-gw needs the other nodes on-link: they are, inside {iface}'s overlay prefix ({}).",
            super::join_nets(&local.overlay_prefixes)
        ),
        "flannel's public IP must be the overlay address (host-gw refuses to start when it differs from the interface's): no public-ip-overwrite annotation.".into(),
        "meshd learns those routes as the peers' prefixes: no meshd configuration needed.".into(),
        format!(
            "Instead, or as well: each node advertises its pod subnet (kubectl get node NAME -o jsonpath='{{.spec.podCIDR}}') with routes = [\"<podCIDR>\"] in meshd.toml (or meshd join --advertise-routes <podCIDR>), and rendezvous.toml says [routes] routable = {routable}. With both, the kernel keeps flannel's route (flannel replaces a route to the same prefix)."
        ),
        format!(
            "MTU: no encapsulation, pods get {iface}'s {mtu} (flannel writes FLANNEL_MTU = the interface's MTU to /run/flannel/subnet.env)."
        ),
        "Network (IPv6Network) is the cluster's pod CIDR: the same as kube-controller-manager's --cluster-cidr (kubeadm's podSubnet).".into(),
        format!(
            "1. net-conf.json: kubectl -n kube-flannel patch configmap kube-flannel-cfg --type merge -p {}",
            shell_word(&config_patch.to_string())
        ),
        "2. This patch replaces the container's args: kube-flannel.yml's defaults plus --iface.".to_owned(),
        format!("   kubectl -n kube-flannel patch ds kube-flannel-ds --patch-file {FLANNEL_PATCH_FILE}"),
        "3. flannel reads net-conf.json only when it starts: kubectl -n kube-flannel rollout restart ds kube-flannel-ds".into(),
    ]);
    out.push_str(&iface_patch(local)?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::generate::testing::*;

    #[test]
    fn the_flannel_patch_adds_iface_to_the_kube_flannel_container() {
        let text = flannel(&local(), Stack::Ipv4, &FlannelBackend::Vxlan).unwrap();
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
            flannel(&small, Stack::Ipv4, &FlannelBackend::Vxlan),
            Err(KubeError::MtuTooSmall { mtu: 600, .. })
        ));
    }

    fn host_gw(cidrs: &[&str]) -> FlannelBackend {
        FlannelBackend::HostGw {
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn host_gw_patches_net_conf_and_keeps_the_iface_patch() {
        let text = flannel(&local(), Stack::Ipv4, &host_gw(&["10.244.0.0/16"])).unwrap();
        let patch = document(&text);
        let args = patch["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_sequence()
            .unwrap();
        assert_eq!(args.last().unwrap().as_str(), Some("--iface=mesh0"));
        let config = patch_argument(&text, "patch configmap kube-flannel-cfg --type merge");
        let net_conf: serde_json::Value =
            serde_json::from_str(config["data"]["net-conf.json"].as_str().unwrap()).unwrap();
        assert_eq!(
            net_conf,
            serde_json::json!({"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}})
        );
        assert!(
            text.contains("rollout restart ds kube-flannel-ds"),
            "{text}"
        );
    }

    #[test]
    fn host_gw_comments_say_mtu_routes_learning_and_the_advertised_alternative() {
        let text = flannel(&local(), Stack::Ipv4, &host_gw(&["10.244.0.0/16"])).unwrap();
        for fact in [
            "pods get mesh0's 1380",
            "FLANNEL_MTU = the interface's MTU",
            "`<its podCIDR> via <its overlay IP> dev mesh0`",
            "on-link: they are, inside mesh0's overlay prefix (100.72.0.0/16, fd7a:1:2::/48)",
            "meshd learns those routes as the peers' prefixes: no meshd configuration needed",
            "routes = [\"<podCIDR>\"] in meshd.toml",
            "[routes] routable = [\"10.244.0.0/16\"]",
            "no public-ip-overwrite",
        ] {
            assert!(text.contains(fact), "{fact:?} missing:\n{text}");
        }
    }

    #[test]
    fn dual_stack_host_gw_enables_ipv6_with_its_network() {
        let text = flannel(
            &local(),
            Stack::Dual,
            &host_gw(&["10.244.0.0/16", "fd10:244::/56"]),
        )
        .unwrap();
        let config = patch_argument(&text, "kube-flannel-cfg");
        let net_conf: serde_json::Value =
            serde_json::from_str(config["data"]["net-conf.json"].as_str().unwrap()).unwrap();
        assert_eq!(net_conf["EnableIPv6"], true);
        assert_eq!(net_conf["IPv6Network"], "fd10:244::/56");
        let e = flannel(&local(), Stack::Dual, &host_gw(&["10.244.0.0/16"])).unwrap_err();
        assert!(e.to_string().contains("IPv6"), "{e}");
    }

    #[test]
    fn host_gw_refuses_pod_cidrs_in_the_overlay_or_of_the_wrong_shape() {
        for (cidrs, words) in [
            (
                &["100.72.128.0/17"][..],
                "overlaps the mesh's overlay prefix 100.72.0.0/16",
            ),
            (&["10.244.0.1/16"][..], "did you mean 10.244.0.0/16"),
            (
                &["10.244.0.0/16", "10.245.0.0/16"][..],
                "one CIDR per address family",
            ),
            (&["fd10:244::/56"][..], "needs --dual-stack"),
        ] {
            let e = flannel(&local(), Stack::Ipv4, &host_gw(cidrs)).unwrap_err();
            assert!(e.to_string().contains(words), "{cidrs:?}: {e}");
        }
    }

    #[test]
    fn the_vxlan_output_does_not_mention_host_gw() {
        let text = flannel(&local(), Stack::Ipv4, &FlannelBackend::Vxlan).unwrap();
        assert!(
            !text.contains("host-gw") && !text.contains("net-conf.json:"),
            "{text}"
        );
    }
}
