//! The patch that points kube-flannel at the mesh interface. Pure.

use super::patch::{daemonset_patch, Container};
use super::{comments, inner_mtu, KubeError, Local, VXLAN_OVERHEAD};

/// The file name the printed apply commands use for flannel's patch.
pub(super) const FLANNEL_PATCH_FILE: &str = "flannel-mesh.yaml";

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::generate::testing::*;

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
}
