//! `meshctl kube …` as a user runs it, from `meshctl status --json` and
//! `meshctl peers --json` files (no meshd, no cluster, no root): every
//! generator prints YAML that parses back, notes go to stderr, and `check`
//! fails with the fix on a mismatch and with one line on malformed JSON.
//! Where meshctl asks meshd itself (the MTU's precedence), a fake meshd on a
//! socket in a temporary directory answers.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use meshd::control::{CandidateInfo, CandidateSource, PeerInfo, Request, Response, StatusInfo};
use meshd::kube::env::MeshEnv;
use serde::Deserialize as _;

mod fake_meshd;

const MESHCTL: &str = env!("CARGO_BIN_EXE_meshctl");

/// This node as `meshctl status --json` shows it (meshd reports no MTU).
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
        seen_at: vec!["203.0.113.5:51820 (rendezvous)".parse().unwrap()],
        ..StatusInfo::default()
    }
}

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = status();
        let peer = |name: &str, ip: &str, candidates: Vec<CandidateInfo>| PeerInfo {
            name: Some(name.into()),
            public_key: "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08="
                .parse()
                .unwrap(),
            overlay_ips: vec![ip.parse().unwrap()],
            candidates,
            ..PeerInfo::default()
        };
        let candidate = |endpoint: &str, source| CandidateInfo {
            endpoint: endpoint.parse().unwrap(),
            source,
            alive: true,
            rtt_ms: None,
            probes_sent: 1,
            probes_answered: 1,
        };
        let peers = vec![
            peer(
                "node-b",
                "100.72.0.6",
                vec![candidate("192.0.2.6:51820", CandidateSource::Advertised)],
            ),
            peer("node-c", "100.72.0.7", vec![]),
        ];
        std::fs::write(
            dir.path().join("status.json"),
            serde_json::to_string_pretty(&status).unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("peers.json"),
            serde_json::to_string_pretty(&peers).unwrap(),
        )
        .unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `meshctl kube --status-json … --peers-json … ARGS`, with a socket
    /// that does not exist, so nothing can come from a running meshd.
    fn kube(&self, args: &[&str]) -> Output {
        self.kube_with(args, None, None)
    }

    fn kube_with(&self, args: &[&str], stdin: Option<&str>, path_env: Option<&Path>) -> Output {
        let mut command = Command::new(MESHCTL);
        command
            .arg("--socket")
            .arg(self.path("no-meshd.sock"))
            .arg("kube")
            .arg("--status-json")
            .arg(self.path("status.json"))
            .arg("--peers-json")
            .arg(self.path("peers.json"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(p) = path_env {
            command.env("PATH", p);
        }
        let mut child = command.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn succeeded(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        stderr(out),
        stdout(out)
    );
    stdout(out)
}

fn yaml_documents(text: &str) -> Vec<serde_norway::Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| {
            serde_norway::Value::deserialize(d)
                .unwrap_or_else(|e| panic!("not YAML ({e}):\n{text}"))
        })
        .collect()
}

fn node_json(internal_ip: &str, flannel_public_ip: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": "node-a",
            "annotations": { "flannel.alpha.coreos.com/public-ip": flannel_public_ip }
        },
        "status": { "addresses": [ { "type": "InternalIP", "address": internal_ip } ] }
    })
    .to_string()
}

#[test]
fn every_yaml_generator_prints_yaml_that_parses_back_with_the_overlay_address() {
    let files = Files::new();
    for (args, documents) in [
        (&["flannel"][..], 1),
        (&["calico"][..], 1),
        (&["calico", "--manifest", "--dual-stack"][..], 1),
        (
            &["kubeadm", "--control-plane-endpoint", "k8s.example.com"][..],
            2,
        ),
        (
            &[
                "kubespray-inventory",
                "--control-plane",
                "node-a",
                "node-b",
                "node-c",
            ][..],
            1,
        ),
    ] {
        let text = succeeded(&files.kube(args), &args.join(" "));
        let docs = yaml_documents(&text);
        assert_eq!(docs.len(), documents, "{args:?}:\n{text}");
        assert!(text.contains("100.72.0.5"), "{args:?}:\n{text}");
    }
}

#[test]
fn the_kubeadm_config_advertises_the_overlay_address() {
    let files = Files::new();
    let docs = yaml_documents(&succeeded(&files.kube(&["kubeadm"]), "kubeadm"));
    assert_eq!(
        docs[0]["localAPIEndpoint"]["advertiseAddress"].as_str(),
        Some("100.72.0.5")
    );
    assert_eq!(
        docs[1]["apiServer"]["certSANs"][0].as_str(),
        Some("100.72.0.5")
    );
}

#[test]
fn the_kubespray_inventory_covers_the_peers_and_notes_go_to_stderr() {
    let files = Files::new();
    let out = files.kube(&["kubespray-inventory"]);
    let docs = yaml_documents(&succeeded(&out, "kubespray-inventory"));
    let hosts = &docs[0]["all"]["hosts"];
    assert_eq!(hosts["node-b"]["ansible_host"].as_str(), Some("192.0.2.6"));
    assert_eq!(hosts["node-b"]["etcd_address"].as_str(), Some("100.72.0.6"));
    assert!(hosts["node-c"].get("ansible_host").is_none());
    assert!(
        stderr(&out).contains("node-c: no reachable address known"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_mtu_option_sets_the_cni_mtu() {
    let files = Files::new();
    let docs = yaml_documents(&succeeded(
        &files.kube(&["--mtu", "1420", "calico"]),
        "calico --mtu",
    ));
    assert_eq!(docs[0]["spec"]["calicoNetwork"]["mtu"].as_u64(), Some(1370));
}

/// `meshctl kube ARGS… calico` against `meshd` reporting `reported_mtu`,
/// with an env file saying MESH_MTU=1280: the calico VXLAN MTU it prints.
fn calico_mtu_with_meshd(reported_mtu: u16, args: &[&str]) -> u64 {
    let files = Files::new();
    let socket = files.path("meshd.sock");
    let env = MeshEnv::new(&[status().addresses[0]], "mesh0", 1280);
    let env_file = files.write("env", &env.render());
    let meshd = fake_meshd::serve(&socket, 1, move |request| {
        assert_eq!(request, Request::Status, "meshctl asks for the status");
        Response::Status(Box::new(StatusInfo {
            mtu: reported_mtu,
            ..status()
        }))
    });
    let out = Command::new(MESHCTL)
        .arg("--socket")
        .arg(&socket)
        .arg("kube")
        .arg("--env-file")
        .arg(&env_file)
        .args(args)
        .arg("calico")
        .output()
        .unwrap();
    meshd.join().unwrap();
    let docs = yaml_documents(&succeeded(&out, "calico against meshd"));
    docs[0]["spec"]["calicoNetwork"]["mtu"].as_u64().unwrap()
}

#[test]
fn meshds_reported_mtu_wins_over_its_env_file_and_the_mtu_option_over_both() {
    assert_eq!(calico_mtu_with_meshd(1420, &[]), 1420 - 50, "meshd's MTU");
    assert_eq!(
        calico_mtu_with_meshd(1420, &["--mtu", "1300"]),
        1300 - 50,
        "--mtu"
    );
    // An older meshd reports no MTU (0): the env file's, then.
    assert_eq!(
        calico_mtu_with_meshd(0, &[]),
        1280 - 50,
        "the env file's MTU"
    );
}

#[test]
fn the_kubelet_dropin_sets_node_ip() {
    let files = Files::new();
    let text = succeeded(
        &files.kube(&["kubelet-dropin", "--dual-stack"]),
        "kubelet-dropin",
    );
    assert!(text.contains("\nAfter=meshd.service\n"), "{text}");
    assert!(
        text.contains(" --node-ip=100.72.0.5,fd7a:1:2::5\n"),
        "{text}"
    );
}

/// A systemd unit's (section, key, value) entries, sorted.
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut entries = Vec::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        match line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            Some(name) => section = name.to_owned(),
            None => {
                let (key, value) = line
                    .split_once('=')
                    .unwrap_or_else(|| panic!("not key=value: {line}"));
                entries.push((section.clone(), key.to_owned(), value.to_owned()));
            }
        }
    }
    entries.sort();
    entries
}

#[test]
fn the_kubelet_dropin_is_the_shipped_one_with_the_address_written_in() {
    let files = Files::new();
    let generated = succeeded(&files.kube(&["kubelet-dropin"]), "kubelet-dropin");
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/kubelet-meshd.conf"
    ))
    .unwrap()
    .replace("${MESH_IP}", "100.72.0.5");
    assert_eq!(
        unit_entries(&generated),
        unit_entries(&shipped),
        "{generated}"
    );
}

#[test]
fn check_of_a_node_on_the_overlay_address_succeeds() {
    let files = Files::new();
    let node = files.write("node.json", &node_json("100.72.0.5", "100.72.0.5"));
    let out = files.kube(&["check", "--node-json", node.to_str().unwrap()]);
    let text = succeeded(&out, "check");
    assert!(
        text.contains("ok        InternalIP (IPv4): 100.72.0.5"),
        "{text}"
    );
}

#[test]
fn check_of_a_node_on_its_private_address_fails_and_prints_the_fixes() {
    let files = Files::new();
    let out = files.kube_with(
        &["check", "--node-json", "-"],
        Some(&node_json("10.0.0.4", "203.0.113.5")),
        None,
    );
    assert!(!out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("MISMATCH  InternalIP (IPv4): 10.0.0.4, the overlay address is 100.72.0.5"),
        "{text}"
    );
    assert!(
        text.contains("fix: on node-a: meshctl kube kubelet-dropin"),
        "{text}"
    );
    assert!(text.contains("fix: meshctl kube flannel >"), "{text}");
    assert!(stderr(&out).contains("2 mismatch(es)"), "{}", stderr(&out));
}

#[test]
fn check_of_malformed_node_json_fails_with_one_line() {
    let files = Files::new();
    let node = files.write("node.json", "{\"kind\": \"Node\", \"metadata\": ");
    let out = files.kube(&["check", "--node-json", node.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("node.json: not a Kubernetes Node: "), "{err}");
    assert!(stdout(&out).is_empty());
}

#[test]
fn check_without_kubectl_says_to_pass_node_json() {
    let files = Files::new();
    let empty = files.path("empty-bin");
    std::fs::create_dir(&empty).unwrap();
    let out = files.kube_with(&["check"], None, Some(&empty));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("kubectl is not on PATH: pass --node-json FILE"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn without_status_files_it_asks_meshd_and_says_when_it_is_not_running() {
    let files = Files::new();
    let out = Command::new(MESHCTL)
        .arg("--socket")
        .arg(files.path("no-meshd.sock"))
        .args(["kube", "flannel"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("meshd is not running"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_status_file_that_is_not_status_json_is_named() {
    let files = Files::new();
    let bad = files.write("bad.json", "[]");
    let out = Command::new(MESHCTL)
        .args(["kube", "--status-json"])
        .arg(&bad)
        .arg("flannel")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is not `meshctl status --json` output"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn native_setups_print_yaml_that_parses_back_and_say_what_meshd_needs() {
    let files = Files::new();
    let text = succeeded(
        &files.kube(&[
            "flannel",
            "--backend",
            "host-gw",
            "--pod-cidr",
            "10.244.0.0/16",
        ]),
        "flannel host-gw",
    );
    assert_eq!(yaml_documents(&text).len(), 1, "{text}");
    assert!(
        text.contains(r#"\"Backend\":{\"Type\":\"host-gw\"}"#),
        "{text}"
    );
    let text = succeeded(
        &files.kube(&[
            "calico",
            "--no-encapsulation",
            "--pod-cidr",
            "10.244.0.0/16",
            "--node-pod-cidr",
            "10.244.3.0/24",
        ]),
        "calico --no-encapsulation",
    );
    let docs = yaml_documents(&text);
    assert_eq!(docs.len(), 2, "{text}");
    assert_eq!(docs[1]["spec"]["cidr"].as_str(), Some("10.244.3.0/24"));
    assert!(text.contains(r#"routes = ["10.244.3.0/24"]"#), "{text}");
}

#[test]
fn native_setups_refuse_flags_that_do_not_belong() {
    let files = Files::new();
    for (args, words) in [
        (
            &[
                "calico",
                "--no-encapsulation",
                "--encapsulation",
                "ipip",
                "--node-pod-cidr",
                "10.244.3.0/24",
            ][..],
            "cannot be used with",
        ),
        (&["calico", "--no-encapsulation"][..], "--node-pod-cidr"),
        (
            &["calico", "--node-pod-cidr", "192.168.3.0/24"][..],
            "--no-encapsulation",
        ),
        (
            &["flannel", "--pod-cidr", "10.244.0.0/16"][..],
            "--pod-cidr is for --backend host-gw",
        ),
        (
            &[
                "calico",
                "--no-encapsulation",
                "--node-pod-cidr",
                "10.9.0.0/24",
            ][..],
            "is not inside any --pod-cidr (192.168.0.0/16)",
        ),
    ] {
        let out = files.kube(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr(&out).contains(words), "{args:?}: {}", stderr(&out));
    }
}
