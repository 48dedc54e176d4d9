//! sd_notify(3): how meshd tells systemd (a `Type=notify` unit,
//! deploy/systemd/meshd.service) that it is ready, what it is doing, and
//! that it is stopping.
//!
//! [`NotifySocket::parse`] and [`Notice::message`] are pure; a [`Notifier`]
//! does I/O: one datagram per notice to the Unix socket named by
//! `$NOTIFY_SOCKET`. The protocol is one `sendto` of newline-separated
//! `KEY=VALUE` lines to a path, or to an abstract name when the variable
//! starts with `@` (sd_notify(3), "Notes"); systemd learns the sender's pid
//! from the kernel (`SO_PASSCRED`), so nothing else is sent. That is written
//! here by hand with [`UnixDatagram`] instead of taking the `sd-notify`
//! crate: fewer lines than the dependency's manifest, and the abstract
//! case comes from std ([`SocketAddrExt`], Rust 1.70).
//!
//! Notifying is best effort, as in libsystemd: without `$NOTIFY_SOCKET`
//! (not under systemd) it does nothing, and a failed send is a warning, not
//! an error — the node works either way.

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NotifyError {
    #[error("${NOTIFY_SOCKET} is empty")]
    Empty,
    #[error("${NOTIFY_SOCKET}={value:?} is neither an absolute path nor an abstract name (@…); only those are supported")]
    Unsupported { value: String },
}

/// Where notices go: `$NOTIFY_SOCKET`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifySocket {
    /// A socket file (`/run/systemd/notify`).
    Path(PathBuf),
    /// A name in the abstract namespace (`@name`, without the `@`).
    Abstract(Vec<u8>),
}

impl NotifySocket {
    /// `$NOTIFY_SOCKET`'s value: an absolute path, or `@name`. Other forms
    /// (systemd 254's `vsock:`) are refused, by name.
    pub fn parse(value: &OsStr) -> Result<Self, NotifyError> {
        let bytes = value.as_bytes();
        match bytes.first() {
            None => Err(NotifyError::Empty),
            Some(b'@') if bytes.len() > 1 => Ok(NotifySocket::Abstract(bytes[1..].to_vec())),
            Some(b'/') => Ok(NotifySocket::Path(PathBuf::from(value))),
            Some(_) => Err(NotifyError::Unsupported {
                value: value.to_string_lossy().into_owned(),
            }),
        }
    }

    /// `$NOTIFY_SOCKET` of this process: `None` when unset (not started by
    /// systemd, or `Type=` is not `notify`); an unusable value is logged.
    pub fn from_env() -> Option<Self> {
        let value = std::env::var_os(NOTIFY_SOCKET)?;
        match Self::parse(&value) {
            Ok(socket) => Some(socket),
            Err(e) => {
                tracing::warn!(error = %e, "cannot notify systemd");
                None
            }
        }
    }

    fn address(&self) -> std::io::Result<SocketAddr> {
        match self {
            NotifySocket::Path(path) => SocketAddr::from_pathname(path),
            NotifySocket::Abstract(name) => SocketAddr::from_abstract_name(name),
        }
    }
}

/// What meshd tells systemd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Start-up is complete (`READY=1`): the interface has its address.
    Ready { status: String },
    /// A line for `systemctl status` (`STATUS=`).
    Status(String),
    /// Shutdown has begun (`STOPPING=1`).
    Stopping,
}

impl Notice {
    /// The datagram: `KEY=VALUE` lines. A status is one line, so newlines
    /// in it become spaces.
    pub fn message(&self) -> String {
        let status = |s: &str| format!("STATUS={}\n", s.replace(['\n', '\r'], " "));
        match self {
            Notice::Ready { status: s } => format!("READY=1\n{}", status(s)),
            Notice::Status(s) => status(s),
            Notice::Stopping => "STOPPING=1\nSTATUS=shutting down\n".to_owned(),
        }
    }
}

/// Sends notices to systemd, or nothing when not under systemd.
#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// A notifier for `socket`; one that does nothing for `None`.
    pub fn new(socket: Option<&NotifySocket>) -> Self {
        let Some(socket) = socket else {
            return Notifier::default();
        };
        let target = socket.address().and_then(|addr| {
            let datagram = UnixDatagram::unbound()?;
            // A stalled service manager must never stall the node.
            datagram.set_nonblocking(true)?;
            Ok((datagram, addr))
        });
        match target {
            Ok(target) => Notifier {
                target: Some(target),
            },
            Err(e) => {
                tracing::warn!(error = %e, ?socket, "cannot notify systemd");
                Notifier::default()
            }
        }
    }

    /// Sends `notice`; a failure is logged, never returned.
    pub fn notify(&self, notice: &Notice) {
        let Some((datagram, addr)) = &self.target else {
            return;
        };
        match datagram.send_to_addr(notice.message().as_bytes(), addr) {
            Ok(_) => tracing::debug!(?notice, "notified systemd"),
            Err(e) => tracing::warn!(error = %e, ?notice, "cannot notify systemd"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn a_path_and_an_abstract_name_are_notify_sockets() {
        assert_eq!(
            NotifySocket::parse(OsStr::new("/run/systemd/notify")),
            Ok(NotifySocket::Path(PathBuf::from("/run/systemd/notify")))
        );
        assert_eq!(
            NotifySocket::parse(OsStr::new("@/org/freedesktop/systemd1/notify/42")),
            Ok(NotifySocket::Abstract(
                b"/org/freedesktop/systemd1/notify/42".to_vec()
            ))
        );
    }

    #[test]
    fn other_notify_socket_values_are_refused_by_name() {
        assert_eq!(NotifySocket::parse(OsStr::new("")), Err(NotifyError::Empty));
        let err = NotifySocket::parse(OsStr::new("vsock:2:1234")).unwrap_err();
        assert!(err.to_string().contains("vsock:2:1234"), "{err}");
        assert!(NotifySocket::parse(OsStr::new("relative/notify")).is_err());
        assert!(NotifySocket::parse(OsStr::new("@")).is_err());
    }

    #[test]
    fn notices_are_key_value_lines_with_one_line_of_status() {
        let ready = Notice::Ready {
            status: "mesh0 up:\n100.72.0.1/16".into(),
        };
        assert_eq!(ready.message(), "READY=1\nSTATUS=mesh0 up: 100.72.0.1/16\n");
        assert_eq!(
            Notice::Status("waiting".into()).message(),
            "STATUS=waiting\n"
        );
        assert!(Notice::Stopping.message().starts_with("STOPPING=1\n"));
    }

    #[test]
    fn a_notice_arrives_at_an_abstract_socket() {
        let name = format!("meshd-test-notify-{}", std::process::id());
        let receiver =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let socket = NotifySocket::parse(&std::ffi::OsString::from_vec(
            format!("@{name}").into_bytes(),
        ))
        .unwrap();

        Notifier::new(Some(&socket)).notify(&Notice::Stopping);

        let mut buf = [0u8; 256];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], Notice::Stopping.message().as_bytes());
    }

    #[test]
    fn a_notice_arrives_at_a_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();

        Notifier::new(Some(&NotifySocket::Path(path))).notify(&Notice::Status("hello".into()));

        let mut buf = [0u8; 256];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=hello\n");
    }

    #[test]
    fn without_a_socket_the_notifier_opens_nothing_and_notifying_is_a_no_op() {
        let notifier = Notifier::new(None);
        assert!(notifier.target.is_none(), "no datagram socket is opened");
        notifier.notify(&Notice::Stopping);
        assert!(notifier.target.is_none());
    }

    #[test]
    fn a_notify_socket_that_is_gone_costs_a_warning_not_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let notifier = Notifier::new(Some(&NotifySocket::Path(path.clone())));
        assert!(
            notifier.target.is_some(),
            "the socket is only looked up when sending"
        );

        // Nobody listens: the send fails and is logged, and a listener that
        // comes later gets the next notice, not a stale one.
        notifier.notify(&Notice::Status("lost".into()));
        let receiver = UnixDatagram::bind(&path).unwrap();
        receiver.set_nonblocking(true).unwrap();
        notifier.notify(&Notice::Status("after".into()));

        let mut buf = [0u8; 256];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=after\n");
        assert!(receiver.recv(&mut buf).is_err(), "nothing else was queued");
    }
}
