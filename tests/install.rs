#![cfg(not(feature = "sim"))]
//! `deploy/install.sh`, run as a user runs it but into a root directory
//! (`DESTDIR`), with the binaries this build made (`--bin-dir`):
//!
//! - a rendezvous and a node installed together put the binaries, the
//!   units, the kubelet drop-in and both state directories where the units
//!   expect them, with their modes; `systemd-analyze verify --root` passes
//!   and loads each unit with the `ExecStart=` and `StateDirectory=` that
//!   match the install; the node joins with the line the rendezvous install
//!   printed;
//! - a second run changes no file (contents, modes, modification times
//!   outside the state), `--dry-run` changes nothing, `--uninstall` leaves
//!   the state directories only and `--purge` nothing;
//! - `PREFIX` moves the binaries and the units' `ExecStart=` with them;
//! - bad arguments exit 2 with a usage message and install nothing;
//! - a server of a mesh on etcd: a dry run hands every etcd option to
//!   `init` (the TLS files copied into the state directory first), and
//!   two servers installed against a real etcd member write the `[store]`
//!   section, the first creating the mesh and the second, with the
//!   certificate `server add` issued, joining it;
//! - shellcheck passes on the script.
//!
//! The node's enrolment needs no running rendezvous: `meshd join` only
//! writes the state directory, and the token is presented when `meshd run`
//! first connects (tests/netns_rendezvous.rs and the lab cover that part).
//! No systemd runs here, and a `DESTDIR` install never calls systemctl.
//! Needs `systemd-analyze` (Debian's `systemd`) and `shellcheck`, which
//! tests/run.sh installs; root only for the etcd test, whose `init` talks to
//! one etcd member in a private network namespace (tests/common/etcd.rs),
//! the script run inside it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const BINARIES: [(&str, &str); 3] = [
    ("meshd", env!("CARGO_BIN_EXE_meshd")),
    ("meshctl", env!("CARGO_BIN_EXE_meshctl")),
    ("mesh-rendezvous", env!("CARGO_BIN_EXE_mesh-rendezvous")),
];

/// Where the rendezvous of these tests says it is. Nothing listens there:
/// no test starts a server.
const PUBLIC_ADDR: &str = "127.0.0.1:17443";
const NODE_STATE: &str = "var/lib/meshd";
const RENDEZVOUS_STATE: &str = "var/lib/mesh-rendezvous";

fn script() -> PathBuf {
    Path::new(REPO).join("deploy/install.sh")
}

/// A bin directory with this build's binaries and an empty DESTDIR.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("create a temp dir");
        let bin = dir.path().join("bin");
        fs::create_dir_all(&bin).expect("create bin");
        fs::create_dir_all(dir.path().join("root")).expect("create root");
        for (name, built) in BINARIES {
            // A link to this build's file, or a copy: cargo building again
            // meanwhile must not change what a second install sees.
            let to = bin.join(name);
            if fs::hard_link(built, &to).is_err() {
                fs::copy(built, &to).unwrap_or_else(|e| panic!("copy {built}: {e}"));
            }
        }
        Setup { dir }
    }

    fn bin(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root().join(relative)
    }

    /// `DESTDIR=root [PREFIX=…] deploy/install.sh args…`.
    fn run(&self, prefix: Option<&str>, args: &[&str]) -> Output {
        self.run_in(None, prefix, args)
    }

    /// [`Setup::run`], inside the network namespace `ns` when given.
    fn run_in(&self, ns: Option<&str>, prefix: Option<&str>, args: &[&str]) -> Output {
        let mut command = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(script());
                c
            }
            None => Command::new(script()),
        };
        command
            .args(args)
            .env("DESTDIR", self.root())
            .env_remove("PREFIX")
            .env_remove("CARGO_TARGET_DIR");
        if let Some(prefix) = prefix {
            command.env("PREFIX", prefix);
        }
        command.output().expect("run deploy/install.sh")
    }

    /// An install that must succeed; its stdout.
    fn install(&self, args: &[&str]) -> String {
        self.install_with_prefix(None, args)
    }

    fn install_with_prefix(&self, prefix: Option<&str>, args: &[&str]) -> String {
        self.install_in(None, prefix, args)
    }

    /// An install that must succeed, inside the network namespace `ns`
    /// when given; its stdout.
    fn install_in(&self, ns: Option<&str>, prefix: Option<&str>, args: &[&str]) -> String {
        let bin = self.bin();
        let mut all = args.to_vec();
        if !args.contains(&"--uninstall") {
            all.extend(["--bin-dir", bin.to_str().expect("a UTF-8 temp path")]);
        }
        let out = self.run_in(ns, prefix, &all);
        assert!(
            out.status.success(),
            "install.sh {} succeeds; it exited {} with\n{}{}",
            all.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The rendezvous install; the join line it printed.
    fn install_rendezvous(&self) -> String {
        let out = self.install(&[
            "rendezvous",
            "--public-addr",
            PUBLIC_ADDR,
            "--listen",
            PUBLIC_ADDR,
        ]);
        let line = out
            .lines()
            .find(|l| l.starts_with("meshd join "))
            .unwrap_or_else(|| panic!("the rendezvous install prints a join line:\n{out}"));
        assert!(
            out.contains("UDP 17443") && out.contains("UDP 17444"),
            "it names the firewall ports, QUIC and NAT check:\n{out}"
        );
        line.to_owned()
    }

    fn install_node(&self, join: &str) -> String {
        self.install(&[
            "node",
            "--join",
            join,
            "--name",
            "node-a",
            "--advertise-endpoint",
            "198.51.100.7:51820",
            "--kubelet",
        ])
    }

    /// Every entry under the root: what it is, its mode, and for files a
    /// checksum and, outside the state directories (which `meshd join`
    /// rewrites with the same content), the modification time.
    fn snapshot(&self) -> BTreeMap<String, String> {
        let mut entries = BTreeMap::new();
        let mut files = Vec::new();
        walk(&self.root(), &self.root(), &mut entries, &mut files);
        if !files.is_empty() {
            let out = Command::new("sha256sum")
                .args(&files)
                .output()
                .expect("run sha256sum");
            assert!(
                out.status.success(),
                "sha256sum: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let (sum, path) = line.split_once("  ").expect("sha256sum's format");
                let relative = Path::new(path)
                    .strip_prefix(self.root())
                    .expect("under the root");
                let entry = entries
                    .get_mut(&relative.display().to_string())
                    .expect("walked");
                entry.push_str(&format!(" sha256:{sum}"));
            }
        }
        entries
    }

    /// Regular files under the root, relative.
    fn files(&self) -> Vec<String> {
        self.snapshot()
            .into_iter()
            .filter(|(_, e)| e.starts_with("file"))
            .map(|(p, _)| p)
            .collect()
    }
}

fn walk(root: &Path, dir: &Path, entries: &mut BTreeMap<String, String>, files: &mut Vec<PathBuf>) {
    let mut children: Vec<_> = fs::read_dir(dir)
        .expect("read a directory")
        .map(|e| e.expect("an entry").path())
        .collect();
    children.sort();
    for path in children {
        let meta = fs::symlink_metadata(&path).expect("stat");
        let relative = path
            .strip_prefix(root)
            .expect("under the root")
            .display()
            .to_string();
        let mode = meta.permissions().mode() & 0o7777;
        let kind = if meta.is_dir() {
            "dir"
        } else if meta.file_type().is_symlink() {
            "symlink"
        } else {
            "file"
        };
        let mut entry = format!("{kind} {mode:04o}");
        if meta.is_file() {
            files.push(path.clone());
            if !relative.starts_with("var/lib/") {
                entry.push_str(&format!(" mtime:{}.{:09}", meta.mtime(), meta.mtime_nsec()));
            }
        }
        entries.insert(relative, entry);
        if meta.is_dir() {
            walk(root, &path, entries, files);
        }
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn same_content(a: &Path, b: &Path) -> bool {
    fs::read(a).expect("read") == fs::read(b).expect("read")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// ---------------------------------------------------------------------------
// systemd-analyze verify of the installed units
// ---------------------------------------------------------------------------

/// `systemd-analyze verify --root` on a copy of the install with the host's
/// units (verify resolves sysinit.target and friends inside the root),
/// /bin/mkdir for meshd.service's `ExecStartPre=`, and a kubelet.service
/// for the drop-in (see tests/systemd.rs for how verify behaves offline).
struct Verify {
    dir: tempfile::TempDir,
}

impl Verify {
    fn of(setup: &Setup) -> Self {
        let probe = Command::new("systemd-analyze").arg("--version").output();
        assert!(
            probe.is_ok_and(|o| o.status.success()),
            "systemd-analyze is missing: install Debian's `systemd` package (tests/run.sh does)"
        );
        let dir = tempfile::tempdir().expect("create a temp dir");
        let root = dir.path().to_str().expect("a UTF-8 temp path").to_owned();
        let copy = |args: &[&str]| {
            let out = Command::new("cp").args(args).output().expect("run cp");
            assert!(out.status.success(), "cp {args:?}: {}", stderr(&out));
        };
        copy(&["-a", &format!("{}/.", setup.root().display()), &root]);
        for d in ["usr/lib/systemd", "bin", "usr/bin", "etc/systemd/system"] {
            fs::create_dir_all(dir.path().join(d)).expect("create a directory");
        }
        copy(&[
            "-a",
            "/usr/lib/systemd/system",
            &format!("{root}/usr/lib/systemd"),
        ]);
        copy(&["/bin/mkdir", &format!("{root}/bin/mkdir")]);
        fs::write(dir.path().join("usr/bin/kubelet"), "#!/bin/sh\n").expect("write kubelet");
        fs::set_permissions(
            dir.path().join("usr/bin/kubelet"),
            fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        fs::write(
            dir.path().join("etc/systemd/system/kubelet.service"),
            "[Unit]\nDescription=kubelet\n\n[Service]\nExecStart=/usr/bin/kubelet\nRestart=always\n\n\
             [Install]\nWantedBy=multi-user.target\n",
        )
        .expect("write kubelet.service");
        Verify { dir }
    }

    fn analyze(&self, units: &[&str], debug: bool) -> Output {
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

    /// Must succeed without a word: verify exits 0 after unknown keys.
    fn passes(&self, units: &[&str]) {
        let out = self.analyze(units, false);
        let printed = format!("{}{}", stdout(&out), stderr(&out));
        assert!(
            out.status.success() && printed.trim().is_empty(),
            "`systemd-analyze verify {}` passes on the install; it exited {} and printed:\n{printed}",
            units.join(" "),
            out.status
        );
    }

    /// `unit` as systemd loaded it: `Key: value` lines, and the command
    /// line of each `-> ExecStart:` and friends under that name.
    fn dump(&self, unit: &str) -> Vec<(String, String)> {
        let text = stdout(&self.analyze(&[unit], true));
        let header = format!("-> Unit {unit}:");
        let start = text
            .find(&header)
            .unwrap_or_else(|| panic!("verify dumps {unit}:\n{text}"));
        let mut properties = Vec::new();
        let mut exec = String::new();
        for line in text[start + header.len()..].lines() {
            if line.contains("-> Unit ") {
                break;
            }
            if let Some(command) = line.strip_prefix("\t\t\tCommand Line: ") {
                properties.push((exec.clone(), command.to_owned()));
            } else if let Some(rest) = line.strip_prefix("\t\t") {
                if let Some(name) = rest.strip_prefix("-> ").and_then(|r| r.strip_suffix(':')) {
                    exec = name.to_owned();
                } else if let Some((key, value)) = rest.split_once(": ") {
                    properties.push((key.to_owned(), value.to_owned()));
                }
            }
        }
        properties
    }
}

fn value<'a>(dump: &'a [(String, String)], key: &str) -> &'a str {
    match dump
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect::<Vec<_>>()[..]
    {
        [v] => v,
        ref other => panic!("the dump has one {key}, not {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn rendezvous_and_node_install_where_their_units_expect_them_and_pass_systemd_analyze_verify() {
    let setup = Setup::new();

    let line = setup.install_rendezvous();
    let out = setup.install_node(&line);

    assert!(
        out.contains("systemctl enable --now meshd"),
        "a DESTDIR install says how to start it:\n{out}"
    );
    for (name, built) in BINARIES {
        let installed = setup.path(&format!("usr/local/bin/{name}"));
        assert_eq!(mode(&installed), 0o755, "{name}");
        assert!(
            same_content(&installed, Path::new(built)),
            "{name} is this build's"
        );
    }
    for (installed, source) in [
        (
            "etc/systemd/system/meshd.service",
            "deploy/systemd/meshd.service",
        ),
        (
            "etc/systemd/system/mesh-rendezvous.service",
            "deploy/systemd/mesh-rendezvous.service",
        ),
        (
            "etc/systemd/system/kubelet.service.d/kubelet-meshd.conf",
            "deploy/kubernetes/kubelet-meshd.conf",
        ),
    ] {
        assert_eq!(mode(&setup.path(installed)), 0o644, "{installed}");
        assert!(
            same_content(&setup.path(installed), &Path::new(REPO).join(source)),
            "{installed} is {source}"
        );
    }

    // The node: enrolled in the mesh the rendezvous install created, with
    // the paths of the installed system (not the DESTDIR's) in its config.
    let ca_hash = line
        .split_whitespace()
        .skip_while(|w| *w != "--ca-hash")
        .nth(1)
        .expect("a --ca-hash in the line");
    assert_eq!(mode(&setup.path(NODE_STATE)), 0o700);
    assert_eq!(mode(&setup.path("var/lib/meshd/private.key")), 0o600);
    assert_eq!(mode(&setup.path("var/lib/meshd/join.token")), 0o600);
    let config = read(&setup.path("var/lib/meshd/meshd.toml"));
    for wanted in [
        "name = \"node-a\"".to_owned(),
        "advertise-endpoint = \"198.51.100.7:51820\"".to_owned(),
        "private-key-file = \"/var/lib/meshd/private.key\"".to_owned(),
        format!("address = \"{PUBLIC_ADDR}\""),
        format!("ca-hash = \"{ca_hash}\""),
    ] {
        assert!(
            config.contains(&wanted),
            "meshd.toml has {wanted}:\n{config}"
        );
    }
    let root = setup.root();
    assert!(
        !config.contains(root.to_str().expect("UTF-8")),
        "no DESTDIR path in meshd.toml:\n{config}"
    );
    let check = Command::new(BINARIES[0].1)
        .args(["check-config", "--config"])
        .arg(setup.path("var/lib/meshd/meshd.toml"))
        .output()
        .expect("run meshd check-config");
    assert!(
        check.status.success(),
        "meshd accepts the config: {}",
        stderr(&check)
    );

    // The rendezvous: a mesh, and one token for ten nodes.
    assert_eq!(mode(&setup.path(RENDEZVOUS_STATE)), 0o700);
    for key in ["cert.key", "server.key", "registry.json"] {
        assert_eq!(
            mode(&setup.path(&format!("{RENDEZVOUS_STATE}/{key}"))),
            0o600,
            "{key}"
        );
    }
    let toml = read(&setup.path("var/lib/mesh-rendezvous/rendezvous.toml"));
    assert!(
        toml.contains(&format!("public-addr = \"{PUBLIC_ADDR}\"")),
        "{toml}"
    );
    let tokens = Command::new(BINARIES[2].1)
        .arg("--state-dir")
        .arg(setup.path(RENDEZVOUS_STATE))
        .args(["token", "list", "--json"])
        .output()
        .expect("run mesh-rendezvous token list");
    let tokens: serde_json::Value =
        serde_json::from_slice(&tokens.stdout).expect("token list --json is JSON");
    let tokens = tokens.as_array().expect("a list of tokens");
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert_eq!(tokens[0]["max_uses"], 10);
    let ttl = tokens[0]["expires_at"].as_u64().unwrap_or(0)
        - tokens[0]["created_at"].as_u64().unwrap_or(0);
    assert_eq!(ttl, 24 * 3600);

    // systemd loads the installed units with paths that match the install.
    let verify = Verify::of(&setup);
    verify.passes(&[
        "meshd.service",
        "mesh-rendezvous.service",
        "kubelet.service",
    ]);
    let meshd = verify.dump("meshd.service");
    assert_eq!(value(&meshd, "ExecStart"), "/usr/local/bin/meshd run");
    assert_eq!(value(&meshd, "StateDirectory"), "meshd");
    // `meshd run` without arguments reads /var/lib/meshd/meshd.toml.
    assert!(setup.path("var/lib/meshd/meshd.toml").is_file());
    let rendezvous = verify.dump("mesh-rendezvous.service");
    assert_eq!(
        value(&rendezvous, "ExecStart"),
        "/usr/local/bin/mesh-rendezvous --state-dir /var/lib/mesh-rendezvous serve"
    );
    assert_eq!(value(&rendezvous, "StateDirectory"), "mesh-rendezvous");
    let kubelet = verify.dump("kubelet.service");
    assert!(
        value(&kubelet, "DropIn Path")
            .ends_with("/etc/systemd/system/kubelet.service.d/kubelet-meshd.conf"),
        "{kubelet:?}"
    );
    assert_eq!(value(&kubelet, "EnvironmentFile"), "/run/meshd/env");
}

#[test]
fn a_second_install_changes_nothing_and_uninstall_leaves_only_the_state_directories() {
    let setup = Setup::new();
    let line = setup.install_rendezvous();
    setup.install_node(line.strip_prefix("meshd join ").expect("a join line"));
    let first = setup.snapshot();

    // Again, with the join line as printed ("meshd join" in front).
    let again = setup.install_rendezvous();
    let out = setup.install_node(&line);
    let second = setup.snapshot();

    assert!(out.contains("meshd: up to date"), "{out}");
    // Every file as it was, but the registry: each run creates a token to print.
    let registry = format!("{RENDEZVOUS_STATE}/registry.json");
    let without = |s: &BTreeMap<String, String>| {
        s.iter()
            .filter(|(p, _)| **p != registry)
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(
        without(&first),
        without(&second),
        "a second install changed files"
    );
    assert_eq!(
        first[&registry].split(' ').nth(1),
        second[&registry].split(' ').nth(1),
        "registry mode"
    );
    let hash = |l: &str| {
        l.split_whitespace()
            .skip_while(|w| *w != "--ca-hash")
            .nth(1)
            .map(str::to_owned)
    };
    assert_eq!(
        hash(&line),
        hash(&again),
        "the same mesh, the same certificate"
    );

    // A dry run of anything changes nothing.
    let installed = setup.snapshot();
    for args in [
        &["node", "--uninstall", "--purge", "--dry-run"][..],
        &["rendezvous", "--uninstall", "--purge", "--dry-run"],
        &["node", "--no-join", "--dry-run"],
    ] {
        let out = setup.run(None, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(setup.snapshot(), installed, "a dry run changed files");

    // Uninstall: the state directories stay, as they were.
    let state = |s: &BTreeMap<String, String>| {
        s.iter()
            .filter(|(p, _)| p.starts_with("var/lib/"))
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    let out = setup.install(&["node", "--uninstall"]);
    assert!(out.contains("--purge removes it"), "{out}");
    setup.install(&["rendezvous", "--uninstall"]);
    let files = setup.files();
    assert!(
        files
            .iter()
            .all(|f| f.starts_with(&format!("{NODE_STATE}/"))
                || f.starts_with(&format!("{RENDEZVOUS_STATE}/"))),
        "only the state is left: {files:?}"
    );
    assert!(
        !setup.path("etc/systemd/system/kubelet.service.d").exists(),
        "the empty drop-in directory is gone"
    );
    assert_eq!(state(&setup.snapshot()), state(&installed));

    // Twice is fine, and --purge takes the state too.
    setup.install(&["node", "--uninstall"]);
    setup.install(&["node", "--uninstall", "--purge"]);
    setup.install(&["rendezvous", "--uninstall", "--purge"]);
    assert_eq!(
        setup.files(),
        Vec::<String>::new(),
        "nothing is left after --purge"
    );
}

#[test]
fn prefix_moves_the_binaries_and_the_units_exec_start_with_them() {
    let setup = Setup::new();

    setup.install_with_prefix(Some("/opt/mesh"), &["node", "--no-join"]);

    for name in ["meshd", "meshctl"] {
        assert_eq!(
            mode(&setup.path(&format!("opt/mesh/bin/{name}"))),
            0o755,
            "{name}"
        );
    }
    assert!(!setup.path("usr/local/bin/meshd").exists());
    assert!(!setup.path(NODE_STATE).exists(), "--no-join enrols nothing");
    let verify = Verify::of(&setup);
    verify.passes(&["meshd.service"]);
    assert_eq!(
        value(&verify.dump("meshd.service"), "ExecStart"),
        "/opt/mesh/bin/meshd run"
    );

    setup.install_with_prefix(Some("/opt/mesh"), &["node", "--uninstall"]);
    assert_eq!(setup.files(), Vec::<String>::new());
}

#[test]
fn a_dry_run_prints_every_action_and_changes_nothing() {
    let setup = Setup::new();
    let bin = setup.bin();
    let bin = bin.to_str().expect("UTF-8");
    let join = "rv.example.com:7443 --token abcd.secret --ca-hash sha256:00";

    let rendezvous = setup.run(
        None,
        &[
            "rendezvous",
            "--public-addr",
            PUBLIC_ADDR,
            "--bin-dir",
            bin,
            "--dry-run",
        ],
    );
    let node = setup.run(
        None,
        &[
            "node",
            "--join",
            join,
            "--kubelet",
            "--bin-dir",
            bin,
            "--dry-run",
        ],
    );

    assert!(rendezvous.status.success(), "{}", stderr(&rendezvous));
    assert!(node.status.success(), "{}", stderr(&node));
    let (rendezvous, node) = (stdout(&rendezvous), stdout(&node));
    for wanted in [
        "usr/local/bin/mesh-rendezvous",
        "etc/systemd/system/mesh-rendezvous.service",
    ] {
        assert!(
            rendezvous.contains("would run: install -D -m") && rendezvous.contains(wanted),
            "{rendezvous}"
        );
    }
    assert!(
        rendezvous.contains(" init --listen 0.0.0.0:17443 --public-addr 127.0.0.1:17443"),
        "{rendezvous}"
    );
    assert!(
        rendezvous.contains(" token create --ttl 24h --uses 10"),
        "{rendezvous}"
    );
    for wanted in [
        "usr/local/bin/meshd",
        "usr/local/bin/meshctl",
        "etc/systemd/system/meshd.service",
        "kubelet.service.d/kubelet-meshd.conf",
        "bin/meshd join rv.example.com:7443 --ca-hash sha256:00 --token-file - --state-dir",
    ] {
        assert!(node.contains(wanted), "the dry run names {wanted}:\n{node}");
    }
    assert!(
        !node.contains("abcd.secret"),
        "the dry run does not print the token:\n{node}"
    );
    assert_eq!(setup.snapshot(), BTreeMap::new(), "a dry run wrote files");
}

/// A certificate hash as the join line carries it.
const HASH: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// Replaces `meshd` in the setup's bin directory by a script that records
/// its arguments in `argv.log` next to it, then runs the real one.
fn record_meshd_argv(setup: &Setup) -> PathBuf {
    let bin = setup.bin();
    let real = bin.join("meshd.real");
    fs::rename(bin.join("meshd"), &real).expect("move meshd aside");
    let log = setup.dir.path().join("argv.log");
    let wrapper = format!(
        "#!/bin/sh\nprintf '%s\\n' \"$*\" >>'{}'\nexec '{}' \"$@\"\n",
        log.display(),
        real.display()
    );
    fs::write(bin.join("meshd"), wrapper).expect("write the wrapper");
    fs::set_permissions(bin.join("meshd"), fs::Permissions::from_mode(0o755))
        .expect("chmod the wrapper");
    log
}

#[test]
fn the_node_install_hands_meshd_join_the_token_on_stdin_never_in_argv() {
    let setup = Setup::new();
    let log = record_meshd_argv(&setup);
    let join = format!("rv.example.com:7443 --token abcd.secret-in-argv --ca-hash {HASH}");
    setup.install(&["node", "--join", &join, "--name", "node-a"]);
    let argv = read(&log);
    assert!(
        argv.contains(&format!(
            "join rv.example.com:7443 --ca-hash {HASH} --token-file - --name node-a"
        )),
        "{argv}"
    );
    assert!(
        !argv.contains("abcd.secret-in-argv"),
        "the token was on meshd's command line: {argv}"
    );
    assert_eq!(
        read(&setup.path("var/lib/meshd/join.token")),
        "abcd.secret-in-argv\n"
    );
    assert_eq!(mode(&setup.path("var/lib/meshd/join.token")), 0o600);
}

#[test]
fn the_join_line_can_come_on_stdin_so_the_token_is_in_no_command_line() {
    use std::io::Write as _;
    let setup = Setup::new();
    let log = record_meshd_argv(&setup);
    let mut child = Command::new(script())
        .args(["node", "--join", "-", "--bin-dir"])
        .arg(setup.bin())
        .env("DESTDIR", setup.root())
        .env_remove("PREFIX")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run deploy/install.sh");
    let line = format!("meshd join rv.example.com:7443 --token=abcd.from-stdin --ca-hash {HASH}\n");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(line.as_bytes())
        .expect("write the join line");
    let out = child.wait_with_output().expect("wait for install.sh");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(!read(&log).contains("abcd.from-stdin"), "{}", read(&log));
    assert_eq!(
        read(&setup.path("var/lib/meshd/join.token")),
        "abcd.from-stdin\n"
    );
}

#[test]
fn on_this_system_a_dry_run_says_how_meshd_would_be_started() {
    // No DESTDIR: the install this system would get, printed, not done.
    let setup = Setup::new();
    let bin = setup.bin();
    let out = Command::new(script())
        .args([
            "node",
            "--join",
            "rv.example.com:7443 --token abcd.secret --ca-hash sha256:00",
            "--dry-run",
            "--bin-dir",
        ])
        .arg(&bin)
        .env_remove("DESTDIR")
        .env_remove("PREFIX")
        .output()
        .expect("run deploy/install.sh");

    assert!(out.status.success(), "{}", stderr(&out));
    let out = stdout(&out);
    assert!(out.contains("--state-dir /var/lib/meshd"), "{out}");
    if Path::new("/run/systemd/system").exists() {
        assert!(
            out.contains("would run: systemctl enable --now meshd"),
            "{out}"
        );
    } else {
        assert!(
            out.contains("systemd is not PID 1 here")
                && out.contains("/usr/local/bin/meshd run --state-dir /var/lib/meshd"),
            "{out}"
        );
    }
}

#[test]
fn bad_arguments_exit_2_with_a_usage_message_and_install_nothing() {
    let setup = Setup::new();
    let join = "rv.example.com:7443 --token abcd.secret --ca-hash sha256:00";

    for (args, says) in [
        (&[][..], "say what to install"),
        (&["server"], "unknown role 'server'"),
        (&["node"], "node needs --join"),
        (&["node", "--join"], "--join needs a value"),
        (&["node", "--join", "--kubelet"], "--join needs a value"),
        (
            &["node", "--join", "rv.example.com --token t --ca-hash h"],
            "must start with the rendezvous HOST:PORT",
        ),
        (
            &["node", "--join", "rv.example.com:7443 --token t"],
            "needs --token and --ca-hash",
        ),
        (
            &["node", "--join", "rv.example.com:7443 --ca-hash h --token"],
            "--token needs a value",
        ),
        (&["node", "--join", "-"], "no join line on standard input"),
        (
            &["node", "--join", &format!("{join} --state-dir /tmp/x")],
            "must not set --state-dir",
        ),
        (&["node", "--join", join, "--no-join"], "exclude each other"),
        (
            &[
                "node",
                "--join",
                join,
                "--advertise-endpoint",
                "example.com:51820",
            ],
            "is not IP:PORT",
        ),
        (
            &["node", "--join", join, "--name", "two words"],
            "must not contain spaces",
        ),
        (
            &["node", "--join", join, "--public-addr", PUBLIC_ADDR],
            "--public-addr is for 'install.sh rendezvous'",
        ),
        (
            &["node", "--join", join, "--frobnicate"],
            "unknown option '--frobnicate'",
        ),
        (
            &["node", "--join", join, "--purge"],
            "--purge goes with --uninstall",
        ),
        (
            &["node", "--join", join, "--bin-dir", "/nonexistent"],
            "is not a directory",
        ),
        (
            &["node", "--uninstall", "--kubelet"],
            "--uninstall takes no other options",
        ),
        (&["rendezvous"], "rendezvous needs --public-addr"),
        (
            &["rendezvous", "--public-addr", "rv.example.com"],
            "is not HOST:PORT",
        ),
        (
            &[
                "rendezvous",
                "--public-addr",
                PUBLIC_ADDR,
                "--listen",
                "anywhere",
            ],
            "is not IP:PORT",
        ),
        (
            &[
                "rendezvous",
                "--public-addr",
                PUBLIC_ADDR,
                "--token-uses",
                "0",
            ],
            "is not a positive number",
        ),
        (
            &["rendezvous", "--public-addr", PUBLIC_ADDR, "--kubelet"],
            "--kubelet is for 'install.sh node'",
        ),
        (
            &["node", "--no-join", "--key-prefix", "/meshd/x/"],
            "--key-prefix is for 'install.sh rendezvous'",
        ),
        (
            &[
                "rendezvous",
                "--public-addr",
                PUBLIC_ADDR,
                "--etcd-endpoints",
                "http://192.0.2.1:2379",
            ],
            "--etcd-endpoints and --key-prefix go together",
        ),
        (
            &[
                "rendezvous",
                "--public-addr",
                PUBLIC_ADDR,
                "--etcd-endpoints",
                "http://192.0.2.1:2379",
                "--key-prefix",
                "/meshd/x/",
            ],
            "needs --server-name NAME",
        ),
        (
            &[
                "rendezvous",
                "--public-addr",
                PUBLIC_ADDR,
                "--etcd-endpoints",
                "http://192.0.2.1:2379",
                "--key-prefix",
                "/meshd/x",
                "--server-name",
                "rv1",
            ],
            "must end with /",
        ),
        (
            &[
                "rendezvous",
                "--public-addr",
                PUBLIC_ADDR,
                "--etcd-ca",
                "/etc/hostname",
            ],
            "are for a mesh on etcd",
        ),
        (
            &[
                "rendezvous",
                "--public-addr",
                PUBLIC_ADDR,
                "--etcd-endpoints",
                "https://192.0.2.1:2379",
                "--key-prefix",
                "/meshd/x/",
                "--server-name",
                "rv1",
                "--etcd-ca",
                "/etc/hostname",
                "--etcd-cert",
                "/etc/hostname",
            ],
            "--etcd-cert and --etcd-key go together",
        ),
        (
            &[
                "rendezvous",
                "--public-addr",
                PUBLIC_ADDR,
                "--etcd-endpoints",
                "http://192.0.2.1:2379",
                "--key-prefix",
                "/meshd/x/",
                "--server-name",
                "Rv_1",
            ],
            "is not a DNS label",
        ),
    ] {
        let out = setup.run(None, args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?} exits 2:\n{err}");
        assert!(
            err.contains(says) && err.contains("usage: install.sh node"),
            "{args:?} says {says:?} and the usage:\n{err}"
        );
    }
    // An empty bin dir is a bad --bin-dir too.
    let empty = tempfile::tempdir().expect("a temp dir");
    let out = setup.run(
        None,
        &[
            "node",
            "--no-join",
            "--bin-dir",
            empty.path().to_str().expect("UTF-8"),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("has no executable meshd"),
        "{}",
        stderr(&out)
    );

    let out = setup.run(Some("opt/relative"), &["node", "--no-join"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("must be an absolute path"),
        "{}",
        stderr(&out)
    );

    assert_eq!(
        setup.snapshot(),
        BTreeMap::new(),
        "bad arguments installed something"
    );
}

/// The key prefix of the etcd tests' mesh.
const KEY_PREFIX: &str = "/meshd/install-test/";

#[test]
fn a_dry_run_of_a_server_on_etcd_hands_every_etcd_option_to_init() {
    let setup = Setup::new();
    let (bin, root) = (setup.bin(), setup.root());
    let (bin, root) = (bin.to_str().expect("UTF-8"), root.to_str().expect("UTF-8"));
    let tls = setup.dir.path().join("tls");
    let certificate = setup.dir.path().join("rv2-certificate");
    fs::create_dir_all(&tls).expect("create tls");
    fs::create_dir_all(&certificate).expect("create the certificate directory");
    for file in ["ca.pem", "client.pem", "client.key"] {
        fs::write(tls.join(file), file).expect("write a TLS file");
    }
    let tls_file = |name: &str| tls.join(name).to_str().expect("UTF-8").to_owned();
    let endpoints = "https://192.0.2.1:2379,https://192.0.2.2:2379,https://192.0.2.3:2379";

    let out = setup.run(
        None,
        &[
            "rendezvous",
            "--public-addr",
            PUBLIC_ADDR,
            "--etcd-endpoints",
            endpoints,
            "--key-prefix",
            KEY_PREFIX,
            "--etcd-ca",
            &tls_file("ca.pem"),
            "--etcd-cert",
            &tls_file("client.pem"),
            "--etcd-key",
            &tls_file("client.key"),
            "--server-name",
            "rv2",
            "--certificate-from",
            certificate.to_str().expect("UTF-8"),
            "--bin-dir",
            bin,
            "--dry-run",
        ],
    );

    assert!(out.status.success(), "{}", stderr(&out));
    let out = stdout(&out);
    let etcd = format!("{root}/{RENDEZVOUS_STATE}/etcd");
    for (from, to) in [
        ("ca.pem", "ca.pem"),
        ("client.pem", "client.pem"),
        ("client.key", "client.key"),
    ] {
        let copy = format!(
            "would run: install -D -m 0600 {} {etcd}/{to}",
            tls_file(from)
        );
        assert!(out.contains(&copy), "the dry run says {copy:?}:\n{out}");
    }
    // As `printf %q` quotes it: its commas escaped.
    let quoted = endpoints.replace(',', "\\,");
    let init = format!(
        " --state-dir {root}/{RENDEZVOUS_STATE} init --listen 0.0.0.0:17443 --public-addr {PUBLIC_ADDR} \
         --server-name rv2 --etcd-endpoints {quoted} --key-prefix {KEY_PREFIX} \
         --etcd-ca {etcd}/ca.pem --etcd-cert {etcd}/client.pem --etcd-key {etcd}/client.key \
         --certificate-from {}",
        certificate.display()
    );
    assert!(out.contains(&init), "the dry run says {init:?}:\n{out}");
    // The mesh's tokens are in etcd: created through the running server.
    let token = out
        .find(" token create --ttl 24h --uses 10")
        .unwrap_or_else(|| panic!("the dry run creates a token:\n{out}"));
    assert!(token > out.find(" init ").expect("init"), "{out}");
    assert_eq!(setup.snapshot(), BTreeMap::new(), "a dry run wrote files");
}

/// `[store]` of the `rendezvous.toml` in `state`, and its `server-name`.
fn store_section(state: &Path) -> (toml::Table, String) {
    let text = read(&state.join("rendezvous.toml"));
    let mut config: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("rendezvous.toml is TOML: {e}\n{text}"));
    let store = match config.remove("store") {
        Some(toml::Value::Table(store)) => store,
        other => panic!("rendezvous.toml has a [store] table, not {other:?}:\n{text}"),
    };
    let name = config
        .get("server-name")
        .and_then(toml::Value::as_str)
        .unwrap_or_else(|| panic!("rendezvous.toml has a server-name:\n{text}"));
    (store, name.to_owned())
}

#[test]
fn two_servers_install_on_one_etcd_the_first_creating_the_mesh_the_second_joining_it() {
    let etcd = common::etcd::EtcdCluster::new(1);
    let ns = etcd.client_ns();
    let endpoints = etcd.endpoints().join(",");
    let (first, second) = (Setup::new(), Setup::new());
    let server = |setup: &Setup, name: &str, port: u16, extra: &[&str]| {
        let public = format!("127.0.0.1:{port}");
        let mut args = vec![
            "rendezvous",
            "--public-addr",
            &public,
            "--listen",
            &public,
            "--etcd-endpoints",
            &endpoints,
            "--key-prefix",
            KEY_PREFIX,
            "--server-name",
            name,
        ];
        args.extend_from_slice(extra);
        setup.install_in(Some(&ns), None, &args)
    };

    let out = server(&first, "rv1", 17443, &[]);
    assert!(
        out.contains(&format!("created in etcd under {KEY_PREFIX}")),
        "the first server creates the mesh:\n{out}"
    );
    assert!(
        !out.lines().any(|l| l.starts_with("meshd join ")),
        "no join line without a running server:\n{out}"
    );
    assert!(
        out.contains("token create --ttl 24h --uses 10") && out.contains("server add NAME"),
        "it says how to get one, and how to add a server:\n{out}"
    );
    let state = first.path(RENDEZVOUS_STATE);
    assert_eq!(mode(&state), 0o700);
    assert!(
        !state.join("registry.json").exists(),
        "the mesh is in etcd, not in a file"
    );
    let (store, name) = store_section(&state);
    assert_eq!(name, "rv1");
    assert_eq!(
        store["etcd-endpoints"],
        toml::Value::Array(vec![toml::Value::String(etcd.endpoints()[0].clone())])
    );
    assert_eq!(store["key-prefix"].as_str(), Some(KEY_PREFIX));

    // The second server: its certificate issued by the first, where the
    // mesh CA's key is.
    let certificate = second.dir.path().join("rv2-certificate");
    let added = Command::new(BINARIES[2].1)
        .arg("--state-dir")
        .arg(&state)
        .args(["server", "add", "rv2", "--out"])
        .arg(&certificate)
        .output()
        .expect("run mesh-rendezvous server add");
    assert!(added.status.success(), "server add: {}", stderr(&added));
    let out = server(
        &second,
        "rv2",
        17453,
        &["--certificate-from", certificate.to_str().expect("UTF-8")],
    );
    assert!(
        out.contains(&format!("joined in etcd under {KEY_PREFIX}")),
        "the second server joins the mesh:\n{out}"
    );
    let second_state = second.path(RENDEZVOUS_STATE);
    let (second_store, name) = store_section(&second_state);
    assert_eq!(name, "rv2");
    assert_eq!(second_store, store, "one mesh, one store");
    assert!(
        same_content(&state.join("ca.der"), &second_state.join("ca.der")),
        "both pin the mesh's CA"
    );
    assert!(
        !second_state.join("ca.key").exists(),
        "the CA's key stays on the first server"
    );

    // Again: nothing changes.
    let before = first.snapshot();
    let out = server(&first, "rv1", 17443, &[]);
    assert!(out.contains("exists: kept"), "{out}");
    assert_eq!(first.snapshot(), before, "a second install changed files");
}

#[test]
fn install_sh_passes_shellcheck() {
    let out = Command::new("shellcheck").arg(script()).output();
    let out = out.unwrap_or_else(|e| {
        panic!("shellcheck is missing ({e}): install Debian's `shellcheck` (tests/run.sh does)")
    });
    assert!(
        out.status.success(),
        "shellcheck deploy/install.sh finds nothing; it says:\n{}{}",
        stdout(&out),
        stderr(&out)
    );
}
