#![cfg(not(feature = "sim"))]
//! meshd as a systemd service, tested without systemd running:
//!
//! - the units in deploy/systemd and the kubelet drop-in in
//!   deploy/kubernetes pass `systemd-analyze verify` and load with the
//!   properties they promise;
//! - the daemons, confined as their units confine them (capability
//!   bounding set, no new privileges), work and make only system calls
//!   that their unit's `SystemCallFilter=` allows;
//! - meshd sends `READY=1` only once `mesh0` has its address and
//!   `STOPPING=1` on SIGTERM;
//! - its env file appears only once `mesh0` is up, is never half-written,
//!   and is gone after SIGTERM.
//!
//! How `systemd-analyze verify` runs here (Debian 12, systemd 252, no
//! systemd as PID 1): with `--root=DIR`, where DIR holds a copy of the
//! host's /usr/lib/systemd/system (verify resolves every dependency, such
//! as sysinit.target, inside the root), the built binaries at the units'
//! `ExecStart=` paths (verify insists they exist and are executable), and
//! the units under etc/systemd/system. verify exits 0 after unknown keys
//! or bad values, only printing them, so the tests require that it prints
//! nothing at all. With `SYSTEMD_LOG_LEVEL=debug` it also dumps each unit
//! as systemd loaded it, drop-ins merged and system-call groups expanded:
//! the tests read properties from that dump.
//!
//! Unit checks need `systemd-analyze` (Debian's `systemd` package); the
//! daemon checks need root, `strace` and `setpriv` (util-linux).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{
    assert_success, eventually, output, Daemon, JoinLine, Lab, Node, MESHCTL, MESHD, MESH_CIDR,
    MESH_IFACE, MESH_PREFIX_LEN, MESH_RENDEZVOUS, MTU, RENDEZVOUS_PORT, START_STOP_DEADLINE,
};
use meshd::kube::env::{self as env_file, MeshEnv};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Capability bit of CAP_NET_ADMIN in /proc/PID/status (linux/capability.h).
const CAP_NET_ADMIN: u64 = 1 << 12;

// ---------------------------------------------------------------------------
// The unit files, offline
// ---------------------------------------------------------------------------

/// A file-system root for `systemd-analyze verify --root`.
struct UnitRoot {
    dir: tempfile::TempDir,
}

impl UnitRoot {
    /// The host's units, meshd's binaries in /usr/local/bin, /bin/mkdir
    /// (meshd.service's `ExecStartPre=`), and deploy/systemd's units.
    fn new() -> Self {
        let probe = Command::new("systemd-analyze").arg("--version").output();
        assert!(
            probe.is_ok_and(|o| o.status.success()),
            "systemd-analyze is missing: install Debian's `systemd` package (tests/run.sh does)"
        );
        let dir = tempfile::tempdir().expect("create a temp dir");
        let root = UnitRoot { dir };
        fs::create_dir_all(root.path("usr/lib/systemd")).expect("create usr/lib/systemd");
        assert_success(
            &output(
                "cp",
                &[
                    "-a",
                    "/usr/lib/systemd/system",
                    path_str(&root.path("usr/lib/systemd")),
                ],
            ),
            "copying the host's systemd units",
        );
        root.install_executable(Path::new(MESHD), "usr/local/bin/meshd");
        root.install_executable(
            Path::new(common::MESH_RENDEZVOUS),
            "usr/local/bin/mesh-rendezvous",
        );
        root.install_executable(Path::new("/bin/mkdir"), "bin/mkdir");
        for unit in ["meshd.service", "mesh-rendezvous.service"] {
            root.install(
                &Path::new(REPO).join("deploy/systemd").join(unit),
                &format!("etc/systemd/system/{unit}"),
            );
        }
        root
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    fn install(&self, from: &Path, to: &str) {
        let to = self.path(to);
        fs::create_dir_all(to.parent().expect("a path in the root"))
            .expect("create a directory in the root");
        fs::copy(from, &to)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
    }

    fn install_executable(&self, from: &Path, to: &str) {
        // Copied, not linked: verify resolves links inside the root.
        self.install(from, to);
    }

    fn write(&self, to: &str, text: &str) {
        let to = self.path(to);
        fs::create_dir_all(to.parent().expect("a path in the root"))
            .expect("create a directory in the root");
        fs::write(&to, text).unwrap_or_else(|e| panic!("write {}: {e}", to.display()));
    }

    /// A kubelet.service as the Kubernetes packages install it, and a
    /// kubelet for its `ExecStart=`.
    fn install_kubelet(&self) {
        self.write("etc/systemd/system/kubelet.service", KUBELET_SERVICE);
        self.write("usr/bin/kubelet", "#!/bin/sh\n");
        let kubelet = self.path("usr/bin/kubelet");
        fs::set_permissions(
            &kubelet,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod kubelet");
    }

    /// `systemd-analyze verify --root … units`: must succeed and print nothing.
    fn verify(&self, units: &[&str]) {
        let out = self.analyze(units, false);
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && printed.trim().is_empty(),
            "`systemd-analyze verify {}` passes without a word; it exited {} and printed:\n{printed}",
            units.join(" "),
            out.status
        );
    }

    /// `unit` as systemd loaded it: (property, value) in dump order; the
    /// command lines of `ExecStart=` and friends under their own name.
    fn dump(&self, unit: &str) -> Vec<(String, String)> {
        let out = self.analyze(&[unit], true);
        // The dump goes to stdout, the log lines around it to stderr.
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let header = format!("-> Unit {unit}:");
        let start = text
            .find(&header)
            .unwrap_or_else(|| panic!("the debug output of verify dumps {unit}:\n{text}"));
        let mut properties = Vec::new();
        let mut exec = String::new();
        for line in text[start + header.len()..].lines() {
            if line.contains("-> Unit ") {
                break;
            }
            if let Some(rest) = line.strip_prefix("\t\t\t") {
                if let Some(command) = rest.strip_prefix("Command Line: ") {
                    properties.push((exec.clone(), command.to_owned()));
                }
            } else if let Some(rest) = line.strip_prefix("\t\t") {
                if let Some(name) = rest.strip_prefix("-> ").and_then(|r| r.strip_suffix(':')) {
                    exec = name.to_owned();
                } else if let Some((key, value)) = rest
                    .split_once(": ")
                    .or_else(|| rest.strip_suffix(':').map(|k| (k, "")))
                {
                    properties.push((key.to_owned(), value.to_owned()));
                }
            }
        }
        properties
    }

    fn analyze(&self, units: &[&str], debug: bool) -> std::process::Output {
        let mut command = Command::new("systemd-analyze");
        command
            .arg("verify")
            .arg(format!("--root={}", self.dir.path().display()))
            .args(units);
        if debug {
            command.env("SYSTEMD_LOG_LEVEL", "debug");
        }
        command.output().expect("run systemd-analyze")
    }
}

/// Every value of `key` in a dump.
fn values<'a>(dump: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    dump.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The one value of `key` in a dump.
fn value<'a>(dump: &'a [(String, String)], key: &str) -> &'a str {
    match values(dump, key)[..] {
        [v] => v,
        ref other => panic!("the dump has one {key}, not {other:?}"),
    }
}

/// The system calls a unit's `SystemCallFilter=` allows, as systemd
/// expanded it.
fn allowed_system_calls(dump: &[(String, String)]) -> BTreeSet<String> {
    let filter = value(dump, "SystemCallFilter");
    assert!(
        !filter.starts_with('~'),
        "the filter is an allow-list: {filter}"
    );
    filter.split_whitespace().map(str::to_owned).collect()
}

/// kubelet.service from the Kubernetes packages (pkgs.k8s.io).
const KUBELET_SERVICE: &str = "\
[Unit]
Description=kubelet: The Kubernetes Node Agent
Documentation=https://kubernetes.io/docs/
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=/usr/bin/kubelet
Restart=always
StartLimitInterval=0
RestartSec=10

[Install]
WantedBy=multi-user.target
";

/// kubeadm's drop-in, as the kubeadm package installs it in
/// /usr/lib/systemd/system/kubelet.service.d/10-kubeadm.conf.
const KUBEADM_DROPIN: &str = "\
# Note: This dropin only works with kubeadm and kubelet v1.11+
[Service]
Environment=\"KUBELET_KUBECONFIG_ARGS=--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf --kubeconfig=/etc/kubernetes/kubelet.conf\"
Environment=\"KUBELET_CONFIG_ARGS=--config=/var/lib/kubelet/config.yaml\"
# This is a file that \"kubeadm init\" and \"kubeadm join\" generates at runtime, populating the KUBELET_KUBEADM_ARGS variable dynamically
EnvironmentFile=-/var/lib/kubelet/kubeadm-flags.env
# This is a file that the user can use for overrides of the kubelet args as a last resort. Preferably, the user should use
# the .NodeRegistration.KubeletExtraArgs object in the configuration files instead. KUBELET_EXTRA_ARGS should be sourced from this file.
EnvironmentFile=-/etc/default/kubelet
ExecStart=
ExecStart=/usr/bin/kubelet $KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS $KUBELET_KUBEADM_ARGS $KUBELET_EXTRA_ARGS
";

const KUBELET_DROPIN: &str = "etc/systemd/system/kubelet.service.d/kubelet-meshd.conf";

fn meshd_dropin() -> PathBuf {
    Path::new(REPO).join("deploy/kubernetes/kubelet-meshd.conf")
}

#[test]
fn meshd_and_rendezvous_units_pass_systemd_analyze_verify() {
    let root = UnitRoot::new();

    root.verify(&["meshd.service", "mesh-rendezvous.service"]);
}

#[test]
fn meshd_unit_is_ready_by_notification_and_holds_cap_net_admin_and_the_tun_device_only() {
    let root = UnitRoot::new();

    let unit = root.dump("meshd.service");

    assert_eq!(value(&unit, "Type"), "notify");
    assert_eq!(value(&unit, "Restart"), "on-failure");
    assert_eq!(value(&unit, "ExecStart"), "/usr/local/bin/meshd run");
    assert_eq!(value(&unit, "CapabilityBoundingSet"), "cap_net_admin");
    assert_eq!(value(&unit, "AmbientCapabilities"), "cap_net_admin");
    assert_eq!(value(&unit, "ProtectSystem"), "strict");
    assert_eq!(value(&unit, "ProtectHome"), "yes");
    assert_eq!(value(&unit, "PrivateTmp"), "yes");
    assert_eq!(value(&unit, "StateDirectory"), "meshd");
    assert_eq!(value(&unit, "StateDirectoryMode"), "0700");
    assert_eq!(value(&unit, "RuntimeDirectory"), "meshd");
    assert_eq!(value(&unit, "DevicePolicy"), "closed");
    assert!(
        values(&unit, "DeviceAllow").contains(&"/dev/net/tun rw"),
        "{unit:?}"
    );
    // A private /dev has no /dev/net/tun; a private network or user
    // namespace would configure the wrong mesh0.
    for off in ["PrivateDevices", "PrivateNetwork", "PrivateUsers"] {
        assert_eq!(value(&unit, off), "no", "{off}");
    }
    for on in [
        "ProtectKernelModules",
        "ProtectControlGroups",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ] {
        assert_eq!(value(&unit, on), "yes", "{on}");
    }
    assert_eq!(value(&unit, "SystemCallArchitectures"), "native");
    let calls = allowed_system_calls(&unit);
    for needed in ["ioctl", "sendmmsg", "recvmmsg", "socket", "bind"] {
        assert!(calls.contains(needed), "meshd.service allows {needed}");
    }
    for refused in ["reboot", "init_module", "setrlimit", "ptrace", "mount"] {
        assert!(!calls.contains(refused), "meshd.service refuses {refused}");
    }
}

#[test]
fn rendezvous_unit_runs_as_a_dynamic_user_without_capabilities() {
    let root = UnitRoot::new();

    let unit = root.dump("mesh-rendezvous.service");

    assert_eq!(value(&unit, "DynamicUser"), "yes");
    assert_eq!(value(&unit, "CapabilityBoundingSet"), "");
    assert_eq!(value(&unit, "StateDirectory"), "mesh-rendezvous");
    assert_eq!(value(&unit, "ProtectSystem"), "strict");
    assert_eq!(
        value(&unit, "ExecStart"),
        "/usr/local/bin/mesh-rendezvous --state-dir /var/lib/mesh-rendezvous serve"
    );
}

#[test]
fn kubelet_with_kubeadms_dropin_gets_the_overlay_node_ip_after_meshd_is_ready() {
    let root = UnitRoot::new();
    root.install_kubelet();
    root.write(
        "usr/lib/systemd/system/kubelet.service.d/10-kubeadm.conf",
        KUBEADM_DROPIN,
    );
    root.install(&meshd_dropin(), KUBELET_DROPIN);

    root.verify(&["kubelet.service"]);
    let unit = root.dump("kubelet.service");

    let dropins = values(&unit, "DropIn Path");
    assert!(
        dropins.len() == 2 && dropins[1].ends_with("/kubelet-meshd.conf"),
        "meshd's drop-in applies after kubeadm's: {dropins:?}"
    );
    assert_eq!(
        value(&unit, "ExecStart"),
        "/usr/bin/kubelet \"\\$KUBELET_KUBECONFIG_ARGS\" \"\\$KUBELET_CONFIG_ARGS\" \
         \"\\$KUBELET_KUBEADM_ARGS\" \"\\$KUBELET_EXTRA_ARGS\" \"--node-ip=\\${MESH_IP}\"",
        "kubelet keeps kubeadm's arguments and gets --node-ip last, where it wins"
    );
    let env_files = values(&unit, "EnvironmentFile");
    assert_eq!(
        env_files.last(),
        Some(&"/run/meshd/env"),
        "the env file is read last and is required (no \"-\"): {env_files:?}"
    );
    for dependency in ["After", "Wants"] {
        // "meshd.service (origin-file)"
        let units: Vec<&str> = values(&unit, dependency)
            .iter()
            .filter_map(|v| v.split_whitespace().next())
            .collect();
        assert!(
            units.contains(&"meshd.service"),
            "kubelet is {dependency} meshd: {units:?}"
        );
    }
}

#[test]
fn kubelet_without_kubeadm_gets_the_overlay_node_ip_too() {
    let root = UnitRoot::new();
    root.install_kubelet();
    root.install(&meshd_dropin(), KUBELET_DROPIN);

    root.verify(&["kubelet.service"]);
    let unit = root.dump("kubelet.service");

    let exec = value(&unit, "ExecStart");
    assert!(
        exec.starts_with("/usr/bin/kubelet ") && exec.ends_with("\"--node-ip=\\${MESH_IP}\""),
        "{exec}"
    );
    assert_eq!(values(&unit, "EnvironmentFile"), ["/run/meshd/env"]);
}

// ---------------------------------------------------------------------------
// The env file, as systemd and sh read it
// ---------------------------------------------------------------------------

#[test]
fn a_shell_reads_the_env_file_as_meshd_wrote_it() {
    let dir = tempfile::tempdir().expect("create a temp dir");
    let path = dir.path().join("env");
    let odd = MeshEnv {
        ipv4: Some(Ipv4Addr::new(100, 72, 0, 7)),
        ipv6: Some("fd5a:1f00:2b3c::7".parse().expect("an IPv6 address")),
        interface: "m\"e$h`\\0".into(),
        mtu: 1380,
    };
    for env in [
        MeshEnv::new(&["100.72.0.7/16".parse().expect("a prefix")], "mesh0", 1380),
        odd,
    ] {
        env_file::write(&path, &env).expect("write the env file");

        let out = output(
            "sh",
            &[
                "-c",
                ". \"$1\"; printf '%s|%s|%s|%s' \"$MESH_IP\" \"$MESH_IP6\" \"$MESH_IFACE\" \"$MESH_MTU\"",
                "sh",
                path_str(&path),
            ],
        );

        assert_success(&out, "sourcing the env file");
        let fields = |ip: Option<String>| ip.unwrap_or_default();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!(
                "{}|{}|{}|{}",
                fields(env.ipv4.map(|a| a.to_string())),
                fields(env.ipv6.map(|a| a.to_string())),
                env.interface,
                env.mtu
            )
        );
    }
}

// ---------------------------------------------------------------------------
// meshd and sd_notify, the env file (root, network namespaces)
// ---------------------------------------------------------------------------

/// meshd's files in the lab's directory.
struct Files {
    config: PathBuf,
    socket: PathBuf,
    env: PathBuf,
}

fn static_node(lab: &Lab, i: usize, peers: &[usize]) -> Files {
    let files = lab.write_meshd_config(i, peers);
    let env = files.env_file();
    Files {
        config: files.config,
        socket: files.socket,
        env,
    }
}

fn run_args(files: &Files) -> Vec<&str> {
    vec![
        "run",
        "--config",
        path_str(&files.config),
        "--socket",
        path_str(&files.socket),
        "--env-file",
        path_str(&files.env),
    ]
}

/// `Ok` once meshctl gets an answer on `socket`.
fn api_answers(socket: &Path) -> Result<(), String> {
    if !socket.exists() {
        return Err(format!("no socket at {}", socket.display()));
    }
    let out = output(MESHCTL, &["--socket", path_str(socket), "peers", "--json"]);
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `ip -o addr show dev mesh0` in `node`'s namespace; empty when there is
/// no mesh0 yet.
fn mesh0_addresses(node: &Node) -> String {
    let out = output(
        "ip",
        &["-n", &node.ns, "-o", "addr", "show", "dev", MESH_IFACE],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the env file says now: `None` while there is none. Panics unless
/// it parses completely and names addresses mesh0 really has.
fn observe_env_file(path: &Path, node: &Node) -> Option<MeshEnv> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("read {}: {e}", path.display()),
    };
    let env = MeshEnv::parse(&text)
        .unwrap_or_else(|e| panic!("the env file parses completely ({e}):\n{text}"));
    assert_eq!(env.interface, MESH_IFACE, "{text}");
    assert_eq!(env.mtu, MTU, "{text}");
    let on_mesh0 = mesh0_addresses(node);
    let ips = env
        .ipv4
        .map(|a| a.to_string())
        .into_iter()
        .chain(env.ipv6.map(|a| a.to_string()));
    for ip in ips {
        assert!(
            on_mesh0.contains(&format!(" {ip}/")),
            "the env file names {ip}, which {MESH_IFACE} has:\n{text}\n{MESH_IFACE}: {on_mesh0}"
        );
    }
    Some(env)
}

/// Receives notices until one contains `wanted`; all of them, in order.
fn notices_until(socket: &UnixDatagram, wanted: &str, meshd: &Daemon<'_>) -> Vec<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let notice = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = notice.lines().any(|l| l == wanted);
                seen.push(notice);
                if done {
                    return seen;
                }
            }
            Err(e) => panic!("meshd sends {wanted} within {START_STOP_DEADLINE:?} ({e}); it sent {seen:?}; its log:\n{}", meshd.log()),
        }
    }
}

#[test]
fn meshd_notifies_ready_once_mesh0_has_its_address_and_stopping_on_sigterm() {
    let lab = Lab::new(2);
    let a = lab.node(0);
    let files = static_node(&lab, 0, &[1]);
    let notify_path = lab.dir().join("notify");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the notification socket");
    notify
        .set_read_timeout(Some(START_STOP_DEADLINE))
        .expect("set a read timeout");
    let mut args = vec![
        format!("NOTIFY_SOCKET={}", notify_path.display()),
        MESHD.to_owned(),
    ];
    args.extend(run_args(&files).into_iter().map(str::to_owned));

    let mut meshd = lab.spawn(
        a,
        "meshd-a",
        "env",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let before_ready = notices_until(&notify, "READY=1", &meshd);

    let on_mesh0 = mesh0_addresses(a);
    let overlay = format!("{}/{MESH_PREFIX_LEN}", a.overlay);
    assert!(
        on_mesh0.contains(&overlay),
        "{MESH_IFACE} has {overlay} when READY=1 arrives: {on_mesh0:?}"
    );
    let env = observe_env_file(&files.env, a).expect("the env file exists when READY=1 arrives");
    assert_eq!(env.ipv4, Some(a.overlay));
    api_answers(&files.socket).expect("meshctl gets an answer once meshd is ready");
    let ready = before_ready.last().expect("the READY=1 notice");
    assert!(
        ready.contains(&format!("STATUS={MESH_IFACE} up: {overlay}")),
        "{ready:?}"
    );

    let status = meshd.terminate();
    assert!(
        status.success(),
        "meshd exits 0 after SIGTERM, not {status}"
    );
    let after_ready = notices_until(&notify, "STOPPING=1", &meshd);
    assert!(
        !after_ready.iter().any(|n| n.contains("READY=1")),
        "READY=1 is sent once: {after_ready:?}"
    );
}

#[test]
fn the_env_file_appears_only_once_mesh0_is_up_and_is_never_half_written() {
    let lab = Lab::new(2);
    let a = lab.node(0);
    let files = static_node(&lab, 0, &[1]);

    let mut meshd = lab.spawn(a, "meshd-a", MESHD, &run_args(&files));
    // Watch the file as fast as it can be read until meshd answers; each
    // observation must be a complete file that matches mesh0.
    let deadline = Instant::now() + START_STOP_DEADLINE;
    let (mut absent, mut present) = (0usize, 0usize);
    loop {
        match observe_env_file(&files.env, a) {
            Some(_) => present += 1,
            None => absent += 1,
        }
        if files.socket.exists() && api_answers(&files.socket).is_ok() {
            break;
        }
        meshd.assert_running();
        assert!(
            Instant::now() < deadline,
            "meshd answers within {START_STOP_DEADLINE:?}"
        );
        std::thread::yield_now();
    }
    let env = observe_env_file(&files.env, a).expect("a ready meshd has written its env file");
    assert_eq!(env.ipv4, Some(a.overlay));
    assert_eq!(env.ipv6, None, "this node has no IPv6 overlay address");
    let mode = fs::metadata(&files.env)
        .expect("stat the env file")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o644
    );
    eprintln!("before meshd answered: no env file {absent} times, a complete one {present} times");

    let status = meshd.terminate();

    assert!(
        status.success(),
        "meshd exits 0 after SIGTERM, not {status}"
    );
    assert!(!files.env.exists(), "the env file is gone after SIGTERM");
    let leftovers: Vec<_> = fs::read_dir(lab.dir())
        .expect("list the lab's directory")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "no temporary file is left behind: {leftovers:?}"
    );
}

#[test]
fn a_joined_node_names_both_overlay_addresses_in_its_env_file_until_it_stops() {
    let lab = Lab::new(2);
    let rendezvous = lab.start_rendezvous(0);
    let join = rendezvous.create_token(1);

    let mut node = lab.join_and_start(1, &join);

    let env = observe_env_file(&node.env_file(), node.machine)
        .expect("a ready meshd has written its env file");
    let ips = node.overlay_ips();
    assert_eq!((env.ipv4, env.ipv6), (Some(ips.v4), Some(ips.v6)));
    node.stop();
    assert!(
        !node.env_file().exists(),
        "the env file is gone after SIGTERM"
    );
}

// ---------------------------------------------------------------------------
// The daemons, confined as their units confine them (root, strace)
// ---------------------------------------------------------------------------

/// A daemon started as `setpriv <confinement> strace -f -c -o TRACE program
/// args…`: what its unit's capability settings leave it, with a count of
/// its system calls written to TRACE when it exits.
struct Traced<'lab> {
    daemon: Daemon<'lab>,
    trace: PathBuf,
}

impl<'lab> Traced<'lab> {
    fn spawn(
        lab: &'lab Lab,
        node: &Node,
        label: &str,
        bounding_set: &str,
        program: &str,
        args: &[&str],
    ) -> Self {
        let trace = lab.dir().join(format!("{label}.strace"));
        let bounding_set = format!("--bounding-set={bounding_set}");
        let mut full = vec![
            // The unit's CapabilityBoundingSet= and NoNewPrivileges=; as
            // root, so permitted = bounding set after exec, as under systemd.
            bounding_set.as_str(),
            "--inh-caps=-all",
            "--no-new-privs",
            "strace",
            "-f",
            "-c",
            "-o",
            path_str(&trace),
            program,
        ];
        full.extend_from_slice(args);
        let daemon = lab.spawn(node, label, "setpriv", &full);
        Traced { daemon, trace }
    }

    /// The traced program's pid: strace's only child.
    fn pid(&self) -> i32 {
        let strace = self.daemon.pid();
        let children = fs::read_to_string(format!("/proc/{strace}/task/{strace}/children"))
            .unwrap_or_default();
        match children.split_whitespace().collect::<Vec<_>>()[..] {
            [one] => one.parse().expect("a pid"),
            ref other => panic!("strace has one child, not {other:?}"),
        }
    }

    /// The permitted capabilities of the traced program (/proc/PID/status).
    fn capabilities(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        let line = status
            .lines()
            .find(|l| l.starts_with("CapPrm:"))
            .expect("a CapPrm line");
        u64::from_str_radix(line["CapPrm:".len()..].trim(), 16).expect("hex capabilities")
    }

    /// SIGTERMs the program, waits for strace to write its count and
    /// exit with the program's status, and returns the calls made.
    fn stop(mut self) -> BTreeSet<String> {
        let pid = self.pid();
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // grandchild, which strace has not reaped while we could see it.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        // strace exits once the program has, with the program's status.
        let status = self.daemon.wait_exit();
        assert!(
            status.success(),
            "the traced program exits 0 after SIGTERM, not {status}"
        );
        let text = fs::read_to_string(&self.trace).expect("read strace's count");
        system_calls(&text)
    }
}

/// The system-call names of `strace -c`'s table.
fn system_calls(table: &str) -> BTreeSet<String> {
    let mut rows = table.lines().skip_while(|l| !l.starts_with("---")).skip(1);
    let calls: BTreeSet<String> = rows
        .by_ref()
        .take_while(|l| !l.starts_with("---"))
        .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
        .collect();
    assert!(calls.len() > 10, "strace -c counted the calls:\n{table}");
    calls
}

fn assert_within_filter(daemon: &str, unit: &str, used: &BTreeSet<String>) {
    let allowed = allowed_system_calls(&UnitRoot::new().dump(unit));
    eprintln!("{daemon} called {used:?}");
    let refused: Vec<&String> = used.difference(&allowed).collect();
    assert!(
        refused.is_empty(),
        "{daemon} made calls that {unit}'s SystemCallFilter= refuses: {refused:?}"
    );
}

#[test]
fn meshd_with_cap_net_admin_alone_works_and_stays_inside_its_system_call_filter() {
    let lab = Lab::new(2);
    let (a, b) = (lab.node(0), lab.node(1));
    let _meshd_b = lab.start_meshd_with_peers(1, &[0]);
    let files = static_node(&lab, 0, &[1]);

    let meshd = Traced::spawn(
        &lab,
        a,
        "meshd-a",
        "-all,+net_admin",
        MESHD,
        &run_args(&files),
    );
    eventually(
        "confined meshd answers on its API socket",
        START_STOP_DEADLINE,
        || api_answers(&files.socket),
    );
    assert_eq!(
        meshd.capabilities(),
        CAP_NET_ADMIN,
        "meshd holds CAP_NET_ADMIN and nothing else"
    );
    a.pings(b.overlay);
    b.pings(a.overlay);
    observe_env_file(&files.env, a).expect("the env file is written");
    let used = meshd.stop();

    assert_within_filter("meshd", "meshd.service", &used);
}

#[test]
fn rendezvous_and_joined_node_without_extra_capabilities_stay_inside_their_filters() {
    let lab = Lab::new(2);
    let (host, machine) = (lab.node(0), lab.node(1));
    let state = lab.dir().join("rendezvous");
    let state_dir = path_str(&state);
    let listen = format!("0.0.0.0:{RENDEZVOUS_PORT}");
    let public = format!("{}:{RENDEZVOUS_PORT}", host.underlay);
    assert_success(
        &host.exec(
            MESH_RENDEZVOUS,
            &[
                "--state-dir",
                state_dir,
                "init",
                "--listen",
                &listen,
                "--public-addr",
                &public,
                "--cidr",
                MESH_CIDR,
            ],
        ),
        "mesh-rendezvous init",
    );
    let rendezvous = Traced::spawn(
        &lab,
        host,
        "mesh-rendezvous",
        "-all",
        MESH_RENDEZVOUS,
        &["--state-dir", state_dir, "serve"],
    );
    let admin = state.join("admin.sock");
    eventually(
        "mesh-rendezvous accepts on its admin socket",
        START_STOP_DEADLINE,
        || {
            UnixStream::connect(&admin)
                .map(drop)
                .map_err(|e| e.to_string())
        },
    );
    assert_eq!(
        rendezvous.capabilities(),
        0,
        "mesh-rendezvous holds no capability"
    );
    let out = host.exec(
        MESH_RENDEZVOUS,
        &["--state-dir", state_dir, "token", "create", "--uses", "1"],
    );
    assert_success(&out, "mesh-rendezvous token create");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("meshd join "))
        .expect("a join line");
    let node = lab.join(1, &JoinLine(line.to_owned()));
    let socket = node.state_dir.join("meshd.sock");
    let env = node.env_file();

    let meshd = Traced::spawn(
        &lab,
        machine,
        "meshd-b",
        "-all,+net_admin",
        MESHD,
        &[
            "run",
            "--state-dir",
            path_str(&node.state_dir),
            "--env-file",
            path_str(&env),
        ],
    );
    eventually(
        "the joined node answers on its API socket",
        START_STOP_DEADLINE,
        || api_answers(&socket),
    );
    let env = observe_env_file(&env, machine).expect("the env file is written");
    assert!(env.ipv4.is_some() && env.ipv6.is_some(), "{env:?}");
    let meshd_calls = meshd.stop();
    let rendezvous_calls = rendezvous.stop();

    assert_within_filter("meshd", "meshd.service", &meshd_calls);
    assert_within_filter(
        "mesh-rendezvous",
        "mesh-rendezvous.service",
        &rendezvous_calls,
    );
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}
