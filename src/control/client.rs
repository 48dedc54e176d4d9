//! The blocking client of a local API socket (meshctl → meshd, and the
//! mesh-rendezvous CLI → its running server).
//!
//! Does I/O (a Unix stream socket). Errors say what went wrong and where
//! meshctl looked, because "connection refused" alone helps nobody at 3 a.m.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Envelope, API_VERSION, MAX_MESSAGE};

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "{service} is not running: no API socket at {path} (start {service}, or pass --socket)"
    )]
    NotRunning {
        service: &'static str,
        path: PathBuf,
    },
    #[error(
        "{service} is not running: nothing listens on {path} (a stale socket; start {service})"
    )]
    Refused {
        service: &'static str,
        path: PathBuf,
    },
    #[error("permission denied on {path}: run as root or as a member of the socket's group")]
    PermissionDenied { path: PathBuf },
    #[error("talking to {service} at {path}: {source}")]
    Io {
        service: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{service} at {path} sent an unreadable answer: {reason}")]
    BadResponse {
        service: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{service} at {path} speaks API version {theirs}, this client speaks {API_VERSION}: use tools of the same release")]
    Version {
        service: &'static str,
        path: PathBuf,
        theirs: u32,
    },
}

/// Sends one request to `service` (named in errors) and waits for its response.
pub fn request<Req: Serialize, Resp: DeserializeOwned>(
    service: &'static str,
    path: &Path,
    request: Req,
) -> Result<Resp, ClientError> {
    let io_err = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => ClientError::NotRunning {
            service,
            path: path.to_owned(),
        },
        std::io::ErrorKind::ConnectionRefused => ClientError::Refused {
            service,
            path: path.to_owned(),
        },
        std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
            path: path.to_owned(),
        },
        _ => ClientError::Io {
            service,
            path: path.to_owned(),
            source,
        },
    };
    let mut stream = UnixStream::connect(path).map_err(io_err)?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;

    let mut line =
        serde_json::to_vec(&Envelope::new(request)).map_err(|e| ClientError::BadResponse {
            service,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;

    let mut answer = Vec::new();
    BufReader::new(stream.take(MAX_MESSAGE as u64 + 1))
        .read_until(b'\n', &mut answer)
        .map_err(io_err)?;
    let bad = |reason: String| ClientError::BadResponse {
        service,
        path: path.to_owned(),
        reason,
    };
    if answer.len() > MAX_MESSAGE {
        return Err(bad(format!("longer than {MAX_MESSAGE} bytes")));
    }
    if answer.is_empty() {
        return Err(bad("the connection closed without an answer".into()));
    }
    // Check the version before the body, so an incompatible meshd gets a
    // version error rather than a confusing parse error.
    let version: serde_json::Value =
        serde_json::from_slice(&answer).map_err(|e| bad(e.to_string()))?;
    match version.get("version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(API_VERSION) => {}
        Some(v) => {
            let theirs = u32::try_from(v).unwrap_or(u32::MAX);
            return Err(ClientError::Version {
                service,
                path: path.to_owned(),
                theirs,
            });
        }
        None => return Err(bad("no version field".into())),
    }
    let envelope: Envelope<Resp> =
        serde_json::from_value(version).map_err(|e| bad(e.to_string()))?;
    Ok(envelope.body)
}
