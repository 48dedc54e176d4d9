//! The UDP port this node listens on: the config's, unless the rendezvous
//! said that another node behind the same NAT holds it there and the node
//! moved (`STATE_DIR/port.json`).
//!
//! Does file I/O. Two nodes behind one NAT on the same port share the
//! public port too: the router keeps it for whichever of them talked to a
//! peer first and gives the other a fresh port for that peer, on which the
//! peer's router (which drops unsolicited inbound) never lets anything in,
//! so that pair is relayed. The rendezvous sees one node at the public
//! address and port the other needs and names a free port in the
//! welcome; the node writes the move down and starts again on it
//! ([`crate::dataplane::run`] ends with [`super::lifecycle::Ended::Restart`]),
//! once: the port stays its own from then on. A node whose config names an
//! `advertise-endpoint` (a port forward, a 1:1 NAT) never moves: something
//! outside depends on its port.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::identity::keyfile::write_atomic;
use crate::paths::NodeDir;

/// A move the node made: listen on `port` wherever the config says
/// `instead_of`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moved {
    pub port: u16,
    pub instead_of: u16,
    /// The node that held `instead_of` behind the same NAT, for the log.
    pub held_by: String,
}

/// The port to listen on: `configured`, or where the node moved from it.
/// A move recorded for another configured port (the operator changed the
/// config since) no longer applies; an unreadable record is ignored with
/// a warning (the rendezvous will say again if the port is still taken).
pub fn listen_port(configured: u16, state_dir: Option<&Path>) -> (u16, Option<Moved>) {
    let Some(dir) = state_dir else {
        return (configured, None);
    };
    let path = NodeDir::new(dir).port();
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (configured, None),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the port this node moved to; using the configured one");
            return (configured, None);
        }
    };
    match serde_json::from_slice::<Moved>(&text) {
        Ok(moved) if moved.instead_of == configured && moved.port != 0 => (moved.port, Some(moved)),
        Ok(_) => (configured, None),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring a malformed port record");
            (configured, None)
        }
    }
}

/// Writes the move down, so that the next start listens on `moved.port`.
pub fn save(state_dir: &Path, moved: &Moved) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(moved).map_err(std::io::Error::other)?;
    write_atomic(&NodeDir::new(state_dir).port(), &text, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moved(port: u16, instead_of: u16) -> Moved {
        Moved {
            port,
            instead_of,
            held_by: "lan1".into(),
        }
    }

    #[test]
    fn a_saved_move_applies_to_the_port_it_moved_from_only() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(listen_port(51820, Some(dir.path())), (51820, None));
        save(dir.path(), &moved(51821, 51820)).unwrap();
        assert_eq!(
            listen_port(51820, Some(dir.path())),
            (51821, Some(moved(51821, 51820)))
        );
        // The operator chose another port since: theirs wins.
        assert_eq!(listen_port(40000, Some(dir.path())), (40000, None));
        assert_eq!(listen_port(51820, None), (51820, None));
    }

    #[test]
    fn a_damaged_record_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            &b"{\"port\": 70000"[..],
            b"",
            b"\xff\xfe",
            b"{\"port\":0,\"instead_of\":51820,\"held_by\":\"x\"}",
        ] {
            std::fs::write(NodeDir::new(dir.path()).port(), bad).unwrap();
            assert_eq!(listen_port(51820, Some(dir.path())), (51820, None));
        }
    }
}
