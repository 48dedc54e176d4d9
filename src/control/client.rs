//! The blocking client `meshctl` uses to ask the local meshd.
//!
//! Does I/O (a Unix stream socket). Errors say what went wrong and where
//! meshctl looked, because "connection refused" alone helps nobody at 3 a.m.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Envelope, Request, Response, API_VERSION, MAX_MESSAGE};

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("meshd is not running: no API socket at {path} (start meshd, or pass --socket)")]
    NotRunning { path: PathBuf },
    #[error("meshd is not running: nothing listens on {path} (a stale socket; start meshd)")]
    Refused { path: PathBuf },
    #[error("permission denied on {path}: run as root or as a member of the socket's group")]
    PermissionDenied { path: PathBuf },
    #[error("talking to meshd at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("meshd at {path} sent an unreadable answer: {reason}")]
    BadResponse { path: PathBuf, reason: String },
    #[error("meshd at {path} speaks API version {theirs}, this meshctl speaks {API_VERSION}: use the meshctl of the same release")]
    Version { path: PathBuf, theirs: u32 },
}

/// Sends one request and waits for its response.
pub fn request(path: &Path, request: Request) -> Result<Response, ClientError> {
    let io_err = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => ClientError::NotRunning { path: path.to_owned() },
        std::io::ErrorKind::ConnectionRefused => ClientError::Refused { path: path.to_owned() },
        std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied { path: path.to_owned() },
        _ => ClientError::Io { path: path.to_owned(), source },
    };
    let mut stream = UnixStream::connect(path).map_err(io_err)?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;

    let mut line = serde_json::to_vec(&Envelope::new(request)).map_err(|e| ClientError::BadResponse {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;

    let mut answer = Vec::new();
    BufReader::new(stream.take(MAX_MESSAGE as u64 + 1))
        .read_until(b'\n', &mut answer)
        .map_err(io_err)?;
    let bad = |reason: String| ClientError::BadResponse { path: path.to_owned(), reason };
    if answer.len() > MAX_MESSAGE {
        return Err(bad(format!("longer than {MAX_MESSAGE} bytes")));
    }
    if answer.is_empty() {
        return Err(bad("the connection closed without an answer".into()));
    }
    // Check the version before the body, so an incompatible meshd gets a
    // version error rather than a confusing parse error.
    let version: serde_json::Value = serde_json::from_slice(&answer).map_err(|e| bad(e.to_string()))?;
    match version.get("version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(API_VERSION) => {}
        Some(v) => {
            let theirs = u32::try_from(v).unwrap_or(u32::MAX);
            return Err(ClientError::Version { path: path.to_owned(), theirs });
        }
        None => return Err(bad("no version field".into())),
    }
    let envelope: Envelope<Response> = serde_json::from_value(version).map_err(|e| bad(e.to_string()))?;
    Ok(envelope.body)
}
