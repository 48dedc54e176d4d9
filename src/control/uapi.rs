//! WireGuard's cross-platform userspace API (UAPI), read-only, so that
//! `wg show`, `wg showconf` and WireGuard exporters work on meshd's
//! interface unchanged.
//!
//! The protocol (<https://www.wireguard.com/xplatform/>) is text on a Unix
//! stream socket at `/var/run/wireguard/<interface>.sock`: the client sends
//! `get=1\n\n` and reads `key=value` lines that end with `errno=0\n\n`.
//! [`RequestParser`] and [`format_get`] are pure; [`UapiSocket`] is the
//! thin shell that does the I/O: it asks the driver for the node and its
//! peers over the same channel as the JSON API ([`Ask`]), so the engine is
//! never shared behind a lock.
//!
//! `set=1` is refused: meshd's peers come from its config file and from
//! the rendezvous's peer map, and a change made with `wg set` would be
//! silently undone by the next peer-map update. The refusal carries
//! `EOPNOTSUPP`, so `wg set` says "Operation not supported".
//!
//! Untrusted input is bounded: a line is at most [`MAX_LINE`] bytes, a set
//! request at most [`MAX_SET_LINES`] lines, a connection lives at most
//! [`CONNECTION_DEADLINE`] and at most [`MAX_CONNECTIONS`] are served at
//! once. A malformed request gets an errno reply and the connection is
//! closed.

use std::fmt::{self, Display, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ipnet::IpNet;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::server::{serve_connections, Ask};
use super::{PeerInfo, Request, Response};
use crate::identity::{PrivateKey, PublicKey};

/// No request line is longer than this: a bound before allocating. wg(8)'s
/// longest lines are `endpoint=` with an address and 64-hex-digit keys.
pub const MAX_LINE: usize = 4096;
/// A set request is read (and discarded) up to this many lines, so that
/// `wg set` gets its refusal instead of a broken pipe.
pub const MAX_SET_LINES: usize = 1 << 16;
pub const MAX_CONNECTIONS: usize = 16;
/// A client has this long for all its requests; wg(8) needs one round trip.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);

/// `preshared_key` of a peer without one, as WireGuard reports it.
const NO_PRESHARED_KEY: [u8; 32] = [0; 32];

/// A complete request line, or a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read the next line and push it.
    NeedLine,
    /// A complete `get=1` request: answer it with [`format_get`].
    Get,
    /// Answer with [`Refusal::reply`], then close the connection if
    /// [`Refusal::ends_connection`].
    Refuse(Refusal),
}

/// Why a request gets a non-zero errno.
///
/// The sign follows what wg(8) parses: it reads the errno of a set reply
/// as a negative number (wireguard-go sends `-errno` for every failure)
/// and that of a get reply as a positive one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("set is not supported: meshd's peers come from its config and the rendezvous")]
    SetNotSupported,
    #[error("set request longer than {MAX_SET_LINES} lines")]
    SetTooLong,
    #[error("unknown UAPI operation (expected get=1 or set=1)")]
    UnknownOperation,
    #[error("get=1 not followed by an empty line")]
    TrailingGet,
    #[error("request line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("meshd's packet loop did not answer (shutting down)")]
    Unavailable,
}

impl Refusal {
    /// The value of the `errno=` line.
    pub fn errno(self) -> i32 {
        match self {
            Refusal::SetNotSupported => -libc::EOPNOTSUPP,
            Refusal::SetTooLong | Refusal::LineTooLong => -libc::EMSGSIZE,
            Refusal::UnknownOperation => -libc::EPROTO,
            Refusal::TrailingGet => -libc::EINVAL,
            Refusal::Unavailable => libc::EIO,
        }
    }

    /// The whole reply: `errno=N` and the empty line that ends it.
    pub fn reply(self) -> String {
        format!("errno={}\n\n", self.errno())
    }

    /// After a malformed request the rest of the stream cannot be trusted
    /// to be aligned on requests; after a refused set (read to its end) or
    /// a failed get it can.
    pub fn ends_connection(self) -> bool {
        match self {
            Refusal::SetNotSupported | Refusal::Unavailable => false,
            Refusal::SetTooLong
            | Refusal::UnknownOperation
            | Refusal::TrailingGet
            | Refusal::LineTooLong => true,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ParseState {
    /// Waiting for `get=1` or `set=1`.
    #[default]
    Operation,
    /// After `get=1`: the empty line must follow.
    GetEnd,
    /// After `set=1`: `key=value` lines up to the empty line.
    SetBody { lines: usize },
}

/// Splits a client's byte stream, fed line by line, into requests.
#[derive(Debug, Default)]
pub struct RequestParser {
    state: ParseState,
}

impl RequestParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one line including its `\n` (a line without one is malformed,
    /// unless it is the start of an over-long line, which is refused as such).
    pub fn push_line(&mut self, line: &[u8]) -> Step {
        if line.len() > MAX_LINE {
            self.state = ParseState::Operation;
            return Step::Refuse(Refusal::LineTooLong);
        }
        match self.state {
            ParseState::Operation => match line {
                b"get=1\n" => {
                    self.state = ParseState::GetEnd;
                    Step::NeedLine
                }
                b"set=1\n" => {
                    self.state = ParseState::SetBody { lines: 0 };
                    Step::NeedLine
                }
                _ => Step::Refuse(Refusal::UnknownOperation),
            },
            ParseState::GetEnd => {
                self.state = ParseState::Operation;
                if line == b"\n" {
                    Step::Get
                } else {
                    Step::Refuse(Refusal::TrailingGet)
                }
            }
            ParseState::SetBody { lines } => {
                if line == b"\n" {
                    self.state = ParseState::Operation;
                    Step::Refuse(Refusal::SetNotSupported)
                } else if lines >= MAX_SET_LINES {
                    self.state = ParseState::Operation;
                    Step::Refuse(Refusal::SetTooLong)
                } else {
                    self.state = ParseState::SetBody { lines: lines + 1 };
                    Step::NeedLine
                }
            }
        }
    }
}

/// What UAPI reports of one peer: the fields of [`PeerInfo`] it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerView<'a> {
    pub public_key: PublicKey,
    /// The direct path's endpoint.
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: &'a [IpNet],
    /// Seconds since the last completed handshake.
    pub last_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: Option<u16>,
}

impl<'a> From<&'a PeerInfo> for PeerView<'a> {
    fn from(p: &'a PeerInfo) -> Self {
        Self {
            public_key: p.public_key,
            endpoint: p.endpoint,
            allowed_ips: &p.allowed_ips,
            last_handshake: p.last_handshake,
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
            persistent_keepalive: p.persistent_keepalive,
        }
    }
}

/// The answer to `get=1`, in the order and format wireguard-go uses,
/// ending with `errno=0` and the empty line. meshd sets no fwmark, so
/// there is no `fwmark` line.
///
/// `now` turns the API's "seconds since the last handshake" into the
/// absolute time UAPI reports (second resolution, `nsec` is 0). A peer
/// without a direct path (relayed, or not yet known) has no `endpoint`.
/// Every value is typed (a key, an address, a prefix), so none can carry a
/// line break into the text.
pub fn format_get<'a>(
    private_key: &PrivateKey,
    listen_port: u16,
    peers: impl IntoIterator<Item = PeerView<'a>>,
    now: SystemTime,
) -> String {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut out = String::with_capacity(1024);
    // PrivateKey only leaves as base64 (for key files); UAPI wants hex.
    if let Ok(bytes) = B64.decode(private_key.to_base64()) {
        line(&mut out, "private_key", Hex(&bytes));
    }
    line(&mut out, "listen_port", listen_port);
    for peer in peers {
        line(&mut out, "public_key", Hex(peer.public_key.as_bytes()));
        line(&mut out, "preshared_key", Hex(&NO_PRESHARED_KEY));
        line(&mut out, "protocol_version", 1);
        if let Some(endpoint) = peer.endpoint {
            line(&mut out, "endpoint", endpoint);
        }
        let handshake = peer.last_handshake.map_or(0, |ago| now.saturating_sub(ago));
        line(&mut out, "last_handshake_time_sec", handshake);
        line(&mut out, "last_handshake_time_nsec", 0);
        line(&mut out, "tx_bytes", peer.tx_bytes);
        line(&mut out, "rx_bytes", peer.rx_bytes);
        line(
            &mut out,
            "persistent_keepalive_interval",
            peer.persistent_keepalive.unwrap_or(0),
        );
        for net in peer.allowed_ips {
            line(&mut out, "allowed_ip", net);
        }
    }
    out.push_str("errno=0\n\n");
    out
}

fn line(out: &mut String, key: &str, value: impl Display) {
    // Writing into a String cannot fail.
    let _ = writeln!(out, "{key}={value}");
}

/// Lower-case hex, as UAPI encodes keys.
struct Hex<'a>(&'a [u8]);

impl Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    #[error("cannot create the WireGuard socket directory {path}: {source}")]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another WireGuard implementation answers on {path}; `wg` will show it, not meshd")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; remove it so that `wg` can reach meshd")]
    NotASocket { path: PathBuf },
    #[error("cannot bind the WireGuard socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The bound UAPI socket. Dropping it removes the socket file, unless
/// another process has replaced it since.
pub struct UapiSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the file we bound.
    file_id: (u64, u64),
}

impl UapiSocket {
    /// Where wg(8) looks for `interface`: `<dir>/<interface>.sock`.
    pub fn path_for(dir: &Path, interface: &str) -> PathBuf {
        dir.join(format!("{interface}.sock"))
    }

    /// Binds `<dir>/<interface>.sock` (mode 0600), replacing a stale socket
    /// left by a crashed process but never one that still answers.
    pub async fn bind(dir: &Path, interface: &str) -> Result<Self, UapiError> {
        let path = Self::path_for(dir, interface);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| UapiError::Directory {
                path: dir.to_owned(),
                source,
            })?;
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(&path).await.is_ok() {
                    return Err(UapiError::InUse { path });
                }
                let _ = std::fs::remove_file(&path);
            }
            Ok(_) => return Err(UapiError::NotASocket { path }),
            Err(_) => {}
        }
        let bind_err = |source| UapiError::Bind {
            path: path.clone(),
            source,
        };
        let listener = match UnixListener::bind(&path) {
            Ok(listener) => listener,
            // Another process bound it between our check and our bind.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(UapiError::InUse { path })
            }
            Err(e) => return Err(bind_err(e)),
        };
        let meta = std::fs::symlink_metadata(&path).map_err(bind_err)?;
        let socket = Self {
            listener,
            file_id: (meta.dev(), meta.ino()),
            path: path.clone(),
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(bind_err)?;
        Ok(socket)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections for ever, answering from the driver through `asks`.
    pub async fn serve(self, private_key: PrivateKey, asks: mpsc::Sender<Ask>) {
        let private_key = Arc::new(private_key);
        let answer = move |stream| async move { handle(stream, &private_key, &asks).await };
        serve_connections(
            &self.listener,
            "WireGuard UAPI socket",
            MAX_CONNECTIONS,
            CONNECTION_DEADLINE,
            answer,
        )
        .await
    }
}

impl Drop for UapiSocket {
    fn drop(&mut self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file_id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn handle(stream: UnixStream, private_key: &PrivateKey, asks: &mpsc::Sender<Ask>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut parser = RequestParser::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') && line.len() <= MAX_LINE {
            // The client closed in the middle of a line.
            return;
        }
        let answer = match parser.push_line(&line) {
            Step::NeedLine => continue,
            Step::Get => answer_get(private_key, asks).await,
            Step::Refuse(refusal) => Err(refusal),
        };
        let (text, end) = match answer {
            Ok(text) => (text, false),
            Err(refusal) => {
                tracing::debug!(reason = %refusal, "WireGuard UAPI request refused");
                (refusal.reply(), refusal.ends_connection())
            }
        };
        if write.write_all(text.as_bytes()).await.is_err() || end {
            return;
        }
    }
}

async fn answer_get(private_key: &PrivateKey, asks: &mpsc::Sender<Ask>) -> Result<String, Refusal> {
    let Response::Status(status) = ask(asks, Request::Status).await? else {
        return Err(Refusal::Unavailable);
    };
    let Response::Peers { peers } = ask(asks, Request::Peers).await? else {
        return Err(Refusal::Unavailable);
    };
    Ok(format_get(
        private_key,
        status.listen_port,
        peers.iter().map(PeerView::from),
        SystemTime::now(),
    ))
}

async fn ask(asks: &mpsc::Sender<Ask>, request: Request) -> Result<Response, Refusal> {
    let (tx, rx) = oneshot::channel();
    asks.send((request, tx))
        .await
        .map_err(|_| Refusal::Unavailable)?;
    rx.await.map_err(|_| Refusal::Unavailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7748 §6.1 (Alice and Bob): private key → public key pairs.
    const PRIVATE: &str = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
    const PRIVATE_BASE64: &str = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=";
    const PEER_HEX: &str = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f";
    const PEER_BASE64: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";
    const ZEROS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    fn private_key() -> PrivateKey {
        PRIVATE_BASE64.parse().unwrap()
    }

    const ALLOWED: [&str; 2] = ["100.72.0.2/32", "fd00:1::2/128"];

    fn allowed() -> Vec<IpNet> {
        ALLOWED.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn peer(allowed_ips: &[IpNet]) -> PeerView<'_> {
        PeerView {
            public_key: PEER_BASE64.parse().unwrap(),
            endpoint: Some("[2001:db8::2]:51820".parse().unwrap()),
            allowed_ips,
            last_handshake: Some(7),
            rx_bytes: 1234,
            tx_bytes: 5678,
            persistent_keepalive: Some(25),
        }
    }

    fn at(unix_secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(unix_secs)
    }

    #[test]
    fn get_answer_lists_the_device_then_each_peer_as_wireguard_go_does() {
        let allowed = allowed();
        let text = format_get(
            &private_key(),
            51820,
            [peer(&allowed)],
            at(1_700_000_000) + Duration::from_millis(400),
        );
        let expected = format!(
            "private_key={PRIVATE}\n\
             listen_port=51820\n\
             public_key={PEER_HEX}\n\
             preshared_key={ZEROS}\n\
             protocol_version=1\n\
             endpoint=[2001:db8::2]:51820\n\
             last_handshake_time_sec=1699999993\n\
             last_handshake_time_nsec=0\n\
             tx_bytes=5678\n\
             rx_bytes=1234\n\
             persistent_keepalive_interval=25\n\
             allowed_ip=100.72.0.2/32\n\
             allowed_ip=fd00:1::2/128\n\
             errno=0\n\n"
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn a_peer_without_handshake_or_direct_path_reports_zero_time_and_no_endpoint() {
        let allowed = allowed();
        let quiet = PeerView {
            endpoint: None,
            last_handshake: None,
            persistent_keepalive: None,
            ..peer(&allowed)
        };
        let text = format_get(&private_key(), 51820, [quiet], at(1_700_000_000));
        assert!(!text.contains("endpoint="), "{text}");
        assert!(
            text.contains("last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"),
            "{text}"
        );
        assert!(text.contains("persistent_keepalive_interval=0\n"), "{text}");
    }

    #[test]
    fn a_node_without_peers_reports_only_itself() {
        let text = format_get(&private_key(), 51820, [], at(1));
        assert_eq!(
            text,
            format!("private_key={PRIVATE}\nlisten_port=51820\nerrno=0\n\n")
        );
    }

    fn push_all(lines: &[&[u8]]) -> Vec<Step> {
        let mut parser = RequestParser::new();
        lines.iter().map(|l| parser.push_line(l)).collect()
    }

    #[test]
    fn get_is_a_get_line_then_an_empty_line() {
        assert_eq!(push_all(&[b"get=1\n", b"\n"]), [Step::NeedLine, Step::Get]);
    }

    #[test]
    fn requests_follow_each_other_on_one_connection() {
        assert_eq!(
            push_all(&[b"get=1\n", b"\n", b"set=1\n", b"\n", b"get=1\n", b"\n"]),
            [
                Step::NeedLine,
                Step::Get,
                Step::NeedLine,
                Step::Refuse(Refusal::SetNotSupported),
                Step::NeedLine,
                Step::Get
            ]
        );
    }

    #[test]
    fn set_is_read_to_its_end_then_refused_with_eopnotsupp() {
        let steps = push_all(&[b"set=1\n", b"private_key=00\n", b"listen_port=1\n", b"\n"]);
        assert_eq!(steps.last(), Some(&Step::Refuse(Refusal::SetNotSupported)));
        assert!(steps[..3].iter().all(|s| *s == Step::NeedLine));
        assert_eq!(
            Refusal::SetNotSupported.reply(),
            format!("errno=-{}\n\n", libc::EOPNOTSUPP)
        );
        assert!(!Refusal::SetNotSupported.ends_connection());
    }

    #[test]
    fn garbage_is_refused_and_ends_the_connection() {
        for garbage in [
            &b"hello\n"[..],
            b"\n",
            b"get=2\n",
            b"GET=1\n",
            b"get=1",
            b"\x00\xff\n",
        ] {
            assert_eq!(
                push_all(&[garbage]),
                [Step::Refuse(Refusal::UnknownOperation)],
                "{garbage:?}"
            );
        }
        assert_eq!(
            push_all(&[b"get=1\n", b"x\n"])[1],
            Step::Refuse(Refusal::TrailingGet)
        );
        for refusal in [
            Refusal::UnknownOperation,
            Refusal::TrailingGet,
            Refusal::LineTooLong,
            Refusal::SetTooLong,
        ] {
            assert!(refusal.ends_connection(), "{refusal:?}");
            assert!(refusal.errno() != 0, "{refusal:?}");
        }
    }

    #[test]
    fn oversized_lines_are_refused_in_any_state() {
        let long = vec![b'a'; MAX_LINE + 1];
        assert_eq!(push_all(&[&long]), [Step::Refuse(Refusal::LineTooLong)]);
        assert_eq!(
            push_all(&[b"set=1\n", &long])[1],
            Step::Refuse(Refusal::LineTooLong)
        );
        let mut longest = vec![b'a'; MAX_LINE - 1];
        longest.push(b'\n');
        assert_eq!(push_all(&[b"set=1\n", &longest])[1], Step::NeedLine);
    }

    #[test]
    fn an_endless_set_is_cut_off() {
        let mut parser = RequestParser::new();
        assert_eq!(parser.push_line(b"set=1\n"), Step::NeedLine);
        for _ in 0..MAX_SET_LINES {
            assert_eq!(parser.push_line(b"allowed_ip=10.0.0.0/8\n"), Step::NeedLine);
        }
        assert_eq!(
            parser.push_line(b"allowed_ip=10.0.0.0/8\n"),
            Step::Refuse(Refusal::SetTooLong)
        );
    }

    #[test]
    fn a_failed_get_reports_eio_as_wg_reads_it() {
        assert_eq!(
            Refusal::Unavailable.reply(),
            format!("errno={}\n\n", libc::EIO)
        );
    }

    #[test]
    fn the_socket_lives_where_wg_looks_for_the_interface() {
        assert_eq!(
            UapiSocket::path_for(Path::new(crate::config::DEFAULT_UAPI_DIR), "mesh0"),
            Path::new("/var/run/wireguard/mesh0.sock")
        );
    }
}
