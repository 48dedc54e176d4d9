//! The command line as a user meets it: keys that interoperate with `wg`,
//! config and key-file mistakes named precisely, errors instead of panics.
//! Needs no root; needs `wireguard-tools` for `wg`.
//!
//! meshd is only ever expected to refuse here. In case it starts anyway,
//! as root it runs in a fresh, empty network namespace (`unshare --net`) so
//! that it cannot touch the host's network.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod common;
mod fake_meshd;

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{output, output_with_stdin, write_private_key, MESHCTL, MESHD, MESH_RENDEZVOUS};
use meshd::control::{PeerInfo, Request, Response, StatusInfo};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn wg(args: &[&str], input: &str) -> String {
    let out = Command::new("wg")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(|mut child| {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin is piped");
            stdin.write_all(input.as_bytes()).expect("write to wg");
            drop(stdin);
            child.wait_with_output().expect("wait for wg")
        })
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `wg` ({e}): install wireguard-tools (apt-get install wireguard-tools)"
            )
        });
    common::assert_success(&out, &format!("wg {}", args.join(" ")));
    stdout(&out)
}

fn meshctl_pubkey(private: &str) -> String {
    let out = output_with_stdin(MESHCTL, &["pubkey"], private);
    common::assert_success(&out, "meshctl pubkey");
    stdout(&out)
}

/// Runs `meshd args…` and waits for it to exit; it must not keep running.
fn meshd_expecting_exit(args: &[&str]) -> Output {
    // SAFETY: geteuid has no preconditions and always succeeds.
    let root = unsafe { libc::geteuid() } == 0;
    let mut command = if root {
        let mut c = Command::new("unshare");
        c.args(["--net", MESHD]);
        c
    } else {
        Command::new(MESHD)
    };
    let mut child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start meshd: {e}"));
    let end = Instant::now() + common::START_STOP_DEADLINE;
    loop {
        if child.try_wait().expect("wait for meshd").is_some() {
            return child.wait_with_output().expect("collect meshd's output");
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect meshd's output");
            panic!(
                "`meshd {}` kept running instead of refusing; its stderr:\n{}",
                args.join(" "),
                stderr(&out)
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn assert_clear_failure(out: &Output, what: &str) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "{what} fails, but it exited with {}",
        out.status
    );
    assert_ne!(
        out.status.code(),
        Some(101),
        "{what} exits with an error, not a panic:\n{err}"
    );
    assert!(
        !err.contains("panicked"),
        "{what} reports an error, not a panic:\n{err}"
    );
    assert!(
        !err.trim().is_empty(),
        "{what} says on stderr what was wrong"
    );
}

/// A node config next to a valid key; `extra` is appended verbatim.
fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let key = common::KeyPair::generate();
    let key_file = dir.join("private.key");
    write_private_key(&key_file, &key.private);
    let config = dir.join("meshd.toml");
    let text = format!(
        "private-key-file = {key_file:?}\n\
         listen-port = 51820\n\
         interface = \"mesh0\"\n\
         address = \"100.72.0.1/16\"\n\
         socket = {:?}\n\
         {extra}",
        dir.join("meshd.sock")
    );
    fs::write(&config, text).expect("write a config");
    config
}

#[test]
fn genkey_pubkey_match_wg_pubkey() {
    let out = output(MESHCTL, &["genkey"]);
    common::assert_success(&out, "meshctl genkey");
    let private = stdout(&out);
    assert!(
        private.ends_with('\n'),
        "meshctl genkey ends its key with a newline: {private:?}"
    );
    assert_eq!(
        private.trim().len(),
        44,
        "a key is 32 bytes in base64: {private:?}"
    );

    assert_eq!(
        meshctl_pubkey(&private),
        wg(&["pubkey"], &private),
        "meshctl pubkey and wg pubkey agree on a key from meshctl genkey"
    );

    let private = wg(&["genkey"], "");
    assert_eq!(
        meshctl_pubkey(&private),
        wg(&["pubkey"], &private),
        "meshctl pubkey and wg pubkey agree on a key from wg genkey"
    );
}

#[test]
fn genkey_gives_a_new_key_every_time() {
    let first = output(MESHCTL, &["genkey"]);
    let second = output(MESHCTL, &["genkey"]);
    common::assert_success(&first, "meshctl genkey");
    common::assert_success(&second, "meshctl genkey");
    assert_ne!(stdout(&first), stdout(&second));
}

#[test]
fn meshd_refuses_a_group_readable_key_naming_the_file_and_fix() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), "");
    let key_file = dir.path().join("private.key");
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&key_file, fs::Permissions::from_mode(0o640)).expect("chmod 640");
    }

    let out = meshd_expecting_exit(&["run", "--config", config.to_str().expect("utf-8 temp path")]);

    assert_clear_failure(&out, "meshd with a group-readable key");
    let err = stderr(&out);
    assert!(
        err.contains(key_file.to_str().expect("utf-8 temp path")),
        "the error names the key file {}:\n{err}",
        key_file.display()
    );
    assert!(
        err.contains("chmod 600"),
        "the error says to `chmod 600` the key:\n{err}"
    );
}

#[test]
fn meshd_rejects_unknown_config_key_naming_file_and_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), "listen-prot = 51821\n");

    let out = meshd_expecting_exit(&["run", "--config", config.to_str().expect("utf-8 temp path")]);

    assert_clear_failure(&out, "meshd with a misspelt config key");
    let err = stderr(&out);
    assert!(
        err.contains(config.to_str().expect("utf-8 temp path")),
        "the error names the config file {}:\n{err}",
        config.display()
    );
    assert!(
        err.contains("listen-prot"),
        "the error names the unknown key `listen-prot`:\n{err}"
    );
}

#[test]
fn meshd_names_a_missing_config_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("absent.toml");

    let out = meshd_expecting_exit(&["run", "--config", config.to_str().expect("utf-8 temp path")]);

    assert_clear_failure(&out, "meshd with a missing config file");
    let err = stderr(&out);
    assert!(
        err.contains(config.to_str().expect("utf-8 temp path")),
        "the error names the config file {}:\n{err}",
        config.display()
    );
}

#[test]
fn meshctl_without_meshd_says_where_it_looked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("meshd.sock");
    let socket = socket.to_str().expect("utf-8 temp path");

    let out = output(MESHCTL, &["--socket", socket, "peers", "--json"]);

    assert_clear_failure(&out, "meshctl peers without a meshd");
    let err = stderr(&out);
    assert_eq!(
        err.trim().lines().count(),
        1,
        "the error is one line:\n{err}"
    );
    assert!(
        err.contains(socket),
        "the error names the socket {socket}:\n{err}"
    );
    assert!(
        stdout(&out).is_empty(),
        "nothing on stdout: {}",
        stdout(&out)
    );
}

#[test]
fn meshctl_against_a_dead_meshd_says_it_is_not_running() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("meshd.sock");
    // What a meshd killed with SIGKILL leaves: a socket nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind a socket"));
    let socket = path.to_str().expect("utf-8 temp path");

    for command in [
        &["status"][..],
        &["ping", "node-b", "-c", "1"],
        &["netcheck"],
        &["routes"],
    ] {
        let mut args = vec!["--socket", socket];
        args.extend_from_slice(command);
        let out = output(MESHCTL, &args);
        assert_clear_failure(&out, "meshctl against a dead meshd");
        let err = stderr(&out);
        assert_eq!(
            err.trim().lines().count(),
            1,
            "the error is one line:\n{err}"
        );
        assert!(
            err.contains("not running") && err.contains(socket),
            "the error says meshd is not running and where it looked:\n{err}"
        );
    }
}

/// Runs `program args…` with its stdout a pipe whose reader is gone
/// already, as `| head -1` leaves it once head has its line.
fn into_a_closed_pipe(program: &str, args: &[&str]) -> Output {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    let made = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(made, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and nothing else owns them.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(reader);
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

#[test]
fn every_command_ends_quietly_when_its_reader_goes_away() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("meshd.sock");
    let config = write_config(dir.path(), "");
    let key: meshd::identity::PublicKey = common::KeyPair::generate()
        .public
        .parse()
        .expect("a generated key parses");
    let status_json = dir.path().join("status.json");
    let status = StatusInfo {
        name: Some("node-a".into()),
        public_key: key,
        overlay_ips: vec!["100.72.0.1".parse().expect("an address")],
        interface: "mesh0".into(),
        ..StatusInfo::default()
    };
    fs::write(
        &status_json,
        serde_json::to_string(&status).expect("status JSON"),
    )
    .expect("write status.json");
    let peers = vec![PeerInfo {
        name: Some("node-b".into()),
        public_key: key,
        ..PeerInfo::default()
    }];
    let rendezvous_dir = dir.path().join("rendezvous");
    let (socket_arg, config_arg, status_arg, rendezvous_arg) = (
        socket.to_str().expect("utf-8 temp path"),
        config.to_str().expect("utf-8 temp path"),
        status_json.to_str().expect("utf-8 temp path"),
        rendezvous_dir.to_str().expect("utf-8 temp path"),
    );
    let asking_meshd: [&[&str]; 4] = [
        &["peers"],
        &["peers", "--json"],
        &["status"],
        &["status", "--json"],
    ];
    let meshd = fake_meshd::serve(&socket, asking_meshd.len(), move |request| match request {
        Request::Peers => Response::Peers {
            peers: peers.clone(),
        },
        Request::Status => Response::Status(Box::new(status.clone())),
        other => panic!("unexpected request {other:?}"),
    });
    let mut runs: Vec<(&str, Vec<&str>)> = asking_meshd
        .iter()
        .map(|args| (MESHCTL, [&["--socket", socket_arg][..], args].concat()))
        .collect();
    runs.extend([
        (MESHCTL, vec!["genkey"]),
        (
            MESHCTL,
            vec!["kube", "--status-json", status_arg, "flannel"],
        ),
        (MESHD, vec!["check-config", "--config", config_arg]),
        (
            MESH_RENDEZVOUS,
            vec![
                "--state-dir",
                rendezvous_arg,
                "init",
                "--listen",
                "127.0.0.1:0",
                "--public-addr",
                "192.0.2.1:7443",
            ],
        ),
    ]);
    for (program, args) in runs {
        let what = format!("`{} {}`", Path::new(program).display(), args.join(" "));
        let out = into_a_closed_pipe(program, &args);
        assert_eq!(
            stderr(&out),
            "",
            "{what} says nothing about the closed pipe"
        );
        assert!(
            out.status.success(),
            "{what} ends with status 0, not {}",
            out.status
        );
    }
    meshd.join().expect("the fake meshd answered every request");
}

#[test]
fn meshd_run_on_a_fresh_machine_names_every_place_it_looked_and_what_to_do() {
    let places = ["/var/lib/meshd/meshd.toml", "/etc/meshd/meshd.toml"];
    if let Some(found) = places.iter().find(|p| Path::new(p).exists()) {
        eprintln!("skipped: {found} exists, so this machine is not a fresh one");
        return;
    }

    let out = meshd_expecting_exit(&["run"]);

    assert_clear_failure(&out, "meshd run without a config");
    let err = stderr(&out);
    for place in places {
        assert!(err.contains(place), "the error names {place}:\n{err}");
    }
    assert!(
        err.contains("meshd join"),
        "the error says to enrol with meshd join:\n{err}"
    );
    assert!(
        err.contains("--config"),
        "the error offers --config:\n{err}"
    );
    assert_eq!(
        err.trim().lines().count(),
        1,
        "the error is one line:\n{err}"
    );
}

#[test]
fn a_missing_config_file_is_named_with_its_cause_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("absent.toml");

    let out = meshd_expecting_exit(&["run", "--config", config.to_str().expect("utf-8 temp path")]);

    let err = stderr(&out);
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "the cause is said once:\n{err}"
    );
}

#[test]
fn bad_arguments_get_a_clear_error_not_a_panic() {
    for args in [
        &["--no-such-flag"][..],
        &["frobnicate"],
        &["run", "--config"],
        &["run", "--config", "/dev/null", "--no-such-flag"],
    ] {
        let out = meshd_expecting_exit(args);
        assert_clear_failure(&out, &format!("`meshd {}`", args.join(" ")));
    }
    for args in [
        &["--no-such-flag"][..],
        &["frobnicate"],
        &["peers", "--no-such-flag"],
    ] {
        let out = output(MESHCTL, args);
        assert_clear_failure(&out, &format!("`meshctl {}`", args.join(" ")));
    }
}

#[test]
fn meshctl_pubkey_rejects_a_malformed_key() {
    for input in ["not a key\n", "", "AAAA\n"] {
        let out = output_with_stdin(MESHCTL, &["pubkey"], input);
        assert_clear_failure(&out, &format!("`meshctl pubkey` of {input:?}"));
        assert!(
            stdout(&out).is_empty(),
            "no key printed for {input:?}: {}",
            stdout(&out)
        );
    }
}

/// `meshd join` with everything but the token; `--state-dir` in `dir`.
fn join_args(dir: &Path) -> Vec<String> {
    [
        "join",
        "203.0.113.1:7443",
        "--ca-hash",
        "sha256:0000000000000000000000000000000000000000000000000000000000000000",
        "--name",
        "node-a",
        "--state-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([dir.join("state").display().to_string()])
    .collect()
}

#[test]
fn join_reads_the_token_from_a_file_or_stdin_so_it_never_sits_in_argv() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let token_file = dir.path().join("token");
    fs::write(&token_file, "abcd.from-file\n").expect("write the token file");

    let mut args = join_args(dir.path());
    args.extend(["--token-file".to_string(), token_file.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = output(MESHD, &args);
    common::assert_success(&out, "meshd join --token-file FILE");
    assert!(!args.iter().any(|a| a.contains("from-file")));
    assert_eq!(
        fs::read_to_string(state.join("join.token")).expect("join.token"),
        "abcd.from-file\n"
    );

    let mut args = join_args(dir.path());
    args.extend(["--token-file".to_string(), "-".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = output_with_stdin(MESHD, &args, "abcd.from-stdin\n");
    common::assert_success(&out, "meshd join --token-file -");
    assert_eq!(
        fs::read_to_string(state.join("join.token")).expect("join.token"),
        "abcd.from-stdin\n"
    );

    // --token keeps working.
    let mut args = join_args(dir.path());
    args.extend(["--token".to_string(), "abcd.from-argv".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::assert_success(&output(MESHD, &args), "meshd join --token");
    assert_eq!(
        fs::read_to_string(state.join("join.token")).expect("join.token"),
        "abcd.from-argv\n"
    );
}

#[test]
fn join_needs_exactly_one_token_source_and_refuses_an_empty_token_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    fs::write(&token_file, "\n").expect("write the token file");
    let base = join_args(dir.path());
    let with = |extra: &[&str]| -> Output {
        let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        output_with_stdin(MESHD, &args, "")
    };
    let token_file = token_file.display().to_string();
    for (extra, wanted) in [
        (&[][..], "--token-file"),
        (
            &["--token", "abcd.x", "--token-file", token_file.as_str()],
            "cannot be used with",
        ),
        (&["--token-file", token_file.as_str()], "holds no token"),
        (&["--token-file", "-"], "standard input holds no token"),
    ] {
        let out = with(extra);
        assert_clear_failure(&out, &format!("`meshd join {}`", extra.join(" ")));
        assert!(
            stderr(&out).contains(wanted),
            "`meshd join {}` says {wanted:?}:\n{}",
            extra.join(" "),
            stderr(&out)
        );
    }
    assert!(
        !dir.path().join("state").join("join.token").exists(),
        "nothing enrolled"
    );
}

/// A `mesh-rendezvous serve` this test started; killed when dropped.
struct Serving(std::process::Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rendezvous(state: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--state-dir", state.to_str().expect("a UTF-8 temp path")];
    all.extend_from_slice(args);
    output(MESH_RENDEZVOUS, &all)
}

#[test]
fn a_serving_rendezvous_locks_its_state_directory_against_a_second_server_and_offline_edits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("rv");
    // A free loopback port (the NAT check takes the next one, if it can).
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    common::assert_success(
        &rendezvous(
            &state,
            &["init", "--listen", &listen, "--public-addr", &listen],
        ),
        "mesh-rendezvous init",
    );
    // Offline, with no server: the CLI edits registry.json itself.
    common::assert_success(
        &rendezvous(&state, &["token", "create", "--uses", "1"]),
        "an offline token create",
    );

    let server = Command::new(MESH_RENDEZVOUS)
        .args(["--state-dir", state.to_str().expect("UTF-8"), "serve"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mesh-rendezvous serve");
    let _server = Serving(server);
    let socket = state.join("admin.sock");
    common::eventually(
        "the server's admin socket answers",
        common::DEADLINE,
        || {
            let out = rendezvous(&state, &["token", "list", "--json"]);
            match (socket.exists(), out.status.success()) {
                (true, true) => Ok(()),
                _ => Err(stderr(&out)),
            }
        },
    );

    // A second server on the same directory refuses, naming the first.
    let second = rendezvous(&state, &["serve"]);
    assert_clear_failure(&second, "a second `mesh-rendezvous serve`");
    assert!(
        stderr(&second).contains("in use by a running mesh-rendezvous serve (pid "),
        "{}",
        stderr(&second)
    );

    // Online, through the admin socket, the CLI still works, and what it
    // printed is on disk by the time it returns.
    let online = rendezvous(&state, &["token", "create", "--uses", "1"]);
    common::assert_success(&online, "an online token create");
    let printed = String::from_utf8_lossy(&online.stdout).into_owned();
    let token_id = (printed.split_whitespace())
        .skip_while(|w| *w != "--token")
        .nth(1)
        .and_then(|t| t.split_once('.'))
        .map(|(id, _)| id.to_owned())
        .unwrap_or_else(|| panic!("a join line with --token ID.SECRET: {printed}"));
    let saved = fs::read_to_string(state.join("registry.json")).expect("registry.json");
    assert!(
        saved.contains(&format!("\"{token_id}\"")),
        "token {token_id} saved before the CLI returned"
    );

    // With the admin socket gone, the CLI used to edit registry.json under
    // the running server; now it refuses and says what to do.
    let registry = fs::read(state.join("registry.json")).expect("registry.json");
    fs::rename(&socket, dir.path().join("moved.sock")).expect("move the admin socket away");
    let refused = rendezvous(&state, &["token", "create", "--uses", "1"]);
    assert_clear_failure(
        &refused,
        "`token create` while the server runs without its socket",
    );
    assert!(
        stderr(&refused).contains("its admin socket does not answer")
            && stderr(&refused).contains("restart it"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(
        fs::read(state.join("registry.json")).expect("registry.json"),
        registry,
        "registry.json untouched"
    );

    // Once the server is gone, so is its lock: offline edits work again.
    drop(_server);
    common::assert_success(
        &rendezvous(&state, &["token", "create", "--uses", "1"]),
        "an offline edit after the server",
    );
}
