//! kubespray's `hosts.yml` for the whole mesh. Pure.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{comments, KubeError, Mesh, Stack};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::generate::testing::*;
    use crate::kube::generate::Overrides;
    use serde_norway::Value;

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
}
