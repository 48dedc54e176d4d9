//! The server side of a local JSON-lines API on a Unix socket.
//!
//! Does I/O. meshd serves [`Request`]s on it (its handler forwards each to
//! the driver, which answers from the engine between batches: the engine is
//! never shared behind a lock); mesh-rendezvous serves its admin requests
//! the same way. Connections are capped and each gets a deadline, so a
//! stuck client can't pile up tasks: [`serve_connections`], the accept loop
//! of this socket, of WireGuard's UAPI socket and of the metrics port.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Envelope, Request, Response, API_VERSION, MAX_MESSAGE};

/// A request from a client with the slot for its answer.
pub type Ask = (Request, oneshot::Sender<Response>);

/// A response type that can carry an error message back to the client.
pub trait ErrorResponse {
    fn error(message: String) -> Self;
}

impl ErrorResponse for Response {
    fn error(message: String) -> Self {
        Response::Error { message }
    }
}

const MAX_CONNECTIONS: usize = 16;
const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);
/// The pause after a failed accept: out of descriptors, typically, so
/// others get a moment to close theirs.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create API socket directory {path}: {source}")]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another meshd is already answering on {path}; stop it or choose another --socket")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; remove it or choose another --socket")]
    NotASocket { path: PathBuf },
    #[error("cannot bind API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("socket-group {group:?} does not exist on this host (create it with `groupadd {group}`, or remove socket-group)")]
    UnknownGroup { group: String },
    #[error("cannot give API socket {path} to group {group:?}: {source}")]
    Chown {
        path: PathBuf,
        group: String,
        source: std::io::Error,
    },
}

/// The bound API socket. Dropping it removes the socket file.
pub struct ApiSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiSocket {
    /// Binds `path` (mode 0600), replacing a stale socket left by a crashed
    /// meshd but never one a live meshd answers on.
    pub async fn bind(path: &Path) -> Result<Self, ServerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| ServerError::Directory {
                path: dir.to_owned(),
                source,
            })?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).await.is_ok() {
                    return Err(ServerError::InUse {
                        path: path.to_owned(),
                    });
                }
                let _ = std::fs::remove_file(path);
            }
            Ok(_) => {
                return Err(ServerError::NotASocket {
                    path: path.to_owned(),
                })
            }
            Err(_) => {}
        }
        let bind_err = |source| ServerError::Bind {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    /// As [`ApiSocket::bind`], and with a `group` whose members may use the
    /// socket too: it is handed to that group with mode 0660.
    pub async fn bind_for_group(path: &Path, group: Option<&str>) -> Result<Self, ServerError> {
        let socket = Self::bind(path).await?;
        let Some(group) = group else {
            return Ok(socket);
        };
        let gid = match nix::unistd::Group::from_name(group) {
            Ok(Some(g)) => g.gid,
            Ok(None) | Err(_) => {
                return Err(ServerError::UnknownGroup {
                    group: group.to_owned(),
                })
            }
        };
        let chown_err = |source| ServerError::Chown {
            path: path.to_owned(),
            group: group.to_owned(),
            source,
        };
        std::os::unix::fs::chown(path, None, Some(gid.as_raw())).map_err(chown_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(chown_err)?;
        Ok(socket)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves meshd's API by forwarding each request to the driver.
    pub async fn serve_asks(self, asks: mpsc::Sender<Ask>) {
        self.serve(move |request: Request| {
            let asks = asks.clone();
            async move {
                let (tx, rx) = oneshot::channel();
                if asks.send((request, tx)).await.is_err() {
                    return Response::error("meshd is shutting down".into());
                }
                rx.await
                    .unwrap_or_else(|_| Response::error("meshd is shutting down".into()))
            }
        })
        .await
    }

    /// Accepts connections for ever, answering each request with `handler`.
    pub async fn serve<Req, Resp, F, Fut>(self, handler: F)
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + ErrorResponse + Send + 'static,
        F: Fn(Req) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Resp> + Send,
    {
        let answer = move |stream| handle(stream, handler);
        serve_connections(
            &self.listener,
            "API socket",
            MAX_CONNECTIONS,
            CONNECTION_DEADLINE,
            answer,
        )
        .await
    }
}

/// A listener that [`serve_connections`] accepts from.
pub(super) trait Listener {
    type Stream: Send + 'static;

    fn accept_stream(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Listener for UnixListener {
    type Stream = UnixStream;

    async fn accept_stream(&self) -> std::io::Result<UnixStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Listener for TcpListener {
    type Stream = TcpStream;

    async fn accept_stream(&self) -> std::io::Result<TcpStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Accepts connections for ever, each served by a clone of `handle` on a
/// task of its own: at most `limit` at once (more wait in the listen
/// queue), each for at most `deadline`, so a stuck client can't pile up
/// tasks. A failed accept is logged and followed by a short pause. `what`
/// names the listener in the logs.
pub(super) async fn serve_connections<L, F, Fut>(
    listener: &L,
    what: &'static str,
    limit: usize,
    deadline: Duration,
    handle: F,
) where
    L: Listener,
    F: FnOnce(L::Stream) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let limit = Arc::new(Semaphore::new(limit));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept_stream().await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "{what} accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if tokio::time::timeout(deadline, handle(stream))
                .await
                .is_err()
            {
                tracing::debug!("{what} client timed out");
            }
        });
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn handle<Req, Resp, F, Fut>(stream: UnixStream, handler: F)
where
    Req: DeserializeOwned,
    Resp: Serialize + ErrorResponse,
    F: Fn(Req) -> Fut,
    Fut: Future<Output = Resp>,
{
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read.take(MAX_MESSAGE as u64 + 1));
    if reader.read_until(b'\n', &mut line).await.is_err() {
        return;
    }
    let response = match parse(&line) {
        Ok(request) => handler(request).await,
        Err(message) => Resp::error(message),
    };
    let Ok(mut out) = serde_json::to_vec(&Envelope::new(response)) else {
        return;
    };
    out.push(b'\n');
    let _ = write.write_all(&out).await;
}

/// One request line into a request, or the error to answer with (also the
/// local-API fuzz target's entry, through [`crate::fuzzing`]).
pub(crate) fn parse<Req: DeserializeOwned>(line: &[u8]) -> Result<Req, String> {
    if line.len() > MAX_MESSAGE {
        return Err(format!("request longer than {MAX_MESSAGE} bytes"));
    }
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("request is not JSON: {e}"))?;
    match value.get("version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(API_VERSION) => {}
        Some(v) => {
            return Err(format!(
                "API version {v} is not supported; this meshd speaks {API_VERSION}"
            ))
        }
        None => return Err("request has no version field".into()),
    }
    serde_json::from_value::<Envelope<Req>>(value)
        .map(|e| e.body)
        .map_err(|e| format!("unknown request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[tokio::test]
    async fn the_socket_is_root_only_or_shared_with_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("private.sock");
        let _p = ApiSocket::bind_for_group(&private, None).await.unwrap();
        assert_eq!(std::fs::metadata(&private).unwrap().mode() & 0o777, 0o600);

        // The process's own group: always ours to hand a file to.
        let own = nix::unistd::Group::from_gid(nix::unistd::getgid())
            .unwrap()
            .unwrap();
        let shared = dir.path().join("shared.sock");
        let _s = ApiSocket::bind_for_group(&shared, Some(&own.name))
            .await
            .unwrap();
        let meta = std::fs::metadata(&shared).unwrap();
        assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, own.gid.as_raw()));

        let err =
            ApiSocket::bind_for_group(&dir.path().join("x.sock"), Some("no-such-group-meshd"))
                .await
                .err()
                .expect("an unknown group is refused");
        assert!(err.to_string().contains("no-such-group-meshd"), "{err}");
    }

    #[test]
    fn bad_requests_get_clear_errors() {
        let parse = parse::<Request>;
        assert!(parse(b"hello").unwrap_err().contains("not JSON"));
        assert!(parse(br#"{"request":"peers"}"#)
            .unwrap_err()
            .contains("version"));
        assert!(parse(br#"{"version":99,"request":"peers"}"#)
            .unwrap_err()
            .contains("99"));
        assert!(parse(br#"{"version":1,"request":"dance"}"#)
            .unwrap_err()
            .contains("unknown request"));
        assert_eq!(
            parse(br#"{"version":1,"request":"peers"}"#),
            Ok(Request::Peers)
        );
    }
}
