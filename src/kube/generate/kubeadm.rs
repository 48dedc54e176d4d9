//! `kubeadm init --config` with the API server, kubelet and etcd on the
//! overlay address. Pure.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{check_pod_cidrs, comments, join, KubeError, Local, Stack};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::generate::testing::*;

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
}
