//! `meshctl kube check`: what a Node object says (its InternalIP, flannel's
//! and calico's annotations) against the overlay addresses, with a fix for
//! each mismatch. Pure; the Node's JSON is untrusted input ([`parse_node`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use serde::Deserialize;

use super::flannel::FLANNEL_PATCH_FILE;
use super::kubelet::DROPIN_PATH;
use super::{shell_word, KubeError, Local, Stack};

const FLANNEL_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
const FLANNEL_PUBLIC_IP_OVERWRITE: &str = "flannel.alpha.coreos.com/public-ip-overwrite";
const FLANNEL_PUBLIC_IPV6: &str = "flannel.alpha.coreos.com/public-ipv6";
const FLANNEL_PUBLIC_IPV6_OVERWRITE: &str = "flannel.alpha.coreos.com/public-ipv6-overwrite";
const CALICO_IPV4: &str = "projectcalico.org/IPv4Address";
const CALICO_IPV6: &str = "projectcalico.org/IPv6Address";

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
    use crate::kube::generate::testing::*;

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
}
