//! The systemd drop-in that runs kubelet on the overlay address. Pure.

use std::fmt::Write as _;

use super::{comments, join, KubeError, Local, Stack};
use crate::config::DEFAULT_ENV_FILE;

/// Where the drop-in goes. It sorts after kubeadm's `10-kubeadm.conf`,
/// whose `ExecStart=` it replaces.
pub const DROPIN_PATH: &str = "/etc/systemd/system/kubelet.service.d/kubelet-meshd.conf";

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::generate::testing::*;

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
}
