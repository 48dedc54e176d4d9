//! What the three binaries share: logging setup, the shutdown signal, and
//! standard output that ends quietly when its reader goes away.
//!
//! Does I/O (stdout, stderr, signal handlers); used by `bin/` only.

use std::io::{self, Write};

/// Log format on stderr.
#[derive(Debug, Clone, Copy, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `RUST_LOG`, or `info` with boringtun's handshake retries (protocol
/// routine, logged by it at warn) kept out; to stderr, colours only on a
/// terminal.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,boringtun=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Completes on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without handlers the only way out is SIGKILL; say so.
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// Standard output for a command's results.
///
/// A reader may stop reading early (`meshctl peers | head -1`,
/// `| grep -q`). Rust ignores SIGPIPE, so the next write fails with
/// "Broken pipe"; through this writer it fails with [`ReaderGone`] inside
/// the `io::Error`, which `main` recognises with [`reader_gone`] and ends
/// on quietly with status 0, as the reader had all it wanted. (Dying of
/// SIGPIPE instead would be status 141, which fails a `set -o pipefail`
/// script for doing what it asked.) Only stdout is treated so: a broken
/// pipe anywhere else, such as meshd's socket, stays an error.
pub struct Stdout(io::StdoutLock<'static>);

impl Stdout {
    pub fn lock() -> Self {
        Self(io::stdout().lock())
    }
}

/// Why a write to [`Stdout`] failed: nobody reads it any more.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed by its reader")]
pub struct ReaderGone;

fn mark_reader_gone(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::BrokenPipe => io::Error::new(io::ErrorKind::BrokenPipe, ReaderGone),
        _ => e,
    }
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(mark_reader_gone)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf).map_err(mark_reader_gone)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(mark_reader_gone)
    }
}

/// Whether `error` (one link of an error chain) is a write to [`Stdout`]
/// whose reader went away: `main` then ends quietly with status 0.
pub fn reader_gone(error: &(dyn std::error::Error + 'static)) -> bool {
    error
        .downcast_ref::<io::Error>()
        .and_then(io::Error::get_ref)
        .is_some_and(|inner| inner.is::<ReaderGone>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_pipe_on_stdout_is_the_reader_going_away_and_nothing_else_is() {
        let gone = mark_reader_gone(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(reader_gone(&gone));
        let full = mark_reader_gone(io::Error::from(io::ErrorKind::StorageFull));
        assert!(!reader_gone(&full));
        // A broken pipe that did not come through Stdout (meshd's socket).
        assert!(!reader_gone(&io::Error::from(io::ErrorKind::BrokenPipe)));
    }
}
