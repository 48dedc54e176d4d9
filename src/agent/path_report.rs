//! What this node tells its rendezvous about its paths to its peers
//! (`NodeMessage::Paths`, proto/control.md §16), for the operator's picture
//! of the mesh (`mesh-rendezvous paths`).
//!
//! Pure: the engine's peer status and `now` in, a report (or none) out.
//! A report goes only to a server whose `Welcome` names the feature (one
//! before 0.4.0 ends the session on a message type it does not know),
//! right after the welcome, then only when a path changed, at most every
//! [`PATH_REPORT_EVERY`].

use std::time::{Duration, Instant};

use crate::control::ONLINE_WITHIN;
use crate::engine::paths::PathStatus;
use crate::engine::PeerStatus;
use crate::wire::control::{PathEntry, PathState, MAX_PATH_PEERS, MAX_RTT_US};

/// The shortest time between two reports: paths are looked at this often,
/// and a report goes out only if one changed.
pub const PATH_REPORT_EVERY: Duration = Duration::from_secs(5);
/// An RTT change smaller than this is no change (probe timing jitters by
/// about the event loop's timer granularity).
const RTT_SLACK_US: u32 = 1_000;

/// What this node says of its path to one peer: direct (by the endpoint's
/// address family), relayed, or down — no path, or no WireGuard handshake
/// within [`ONLINE_WITHIN`] seconds — with the direct path's RTT.
pub fn entry_of(peer: &PeerStatus) -> PathEntry {
    let online = peer
        .last_handshake
        .is_some_and(|d| d.as_secs() < ONLINE_WITHIN);
    let (path, rtt) = match peer.path {
        PathStatus::Direct { addr, rtt } if online => {
            let path = if addr.ip().to_canonical().is_ipv4() {
                PathState::DirectV4
            } else {
                PathState::DirectV6
            };
            (path, rtt)
        }
        PathStatus::Relay if online => (PathState::Relay, None),
        PathStatus::Direct { .. } | PathStatus::Relay | PathStatus::Unknown => {
            (PathState::Down, None)
        }
    };
    PathEntry {
        peer: peer.public_key,
        path,
        rtt_us: rtt.map(|d| {
            u32::try_from(d.as_micros())
                .unwrap_or(u32::MAX)
                .min(MAX_RTT_US)
        }),
    }
}

/// A report of `entries`: sorted by peer, at most [`MAX_PATH_PEERS`] of
/// them (peers with a path before those without, in a mesh that large).
pub fn report(mut entries: Vec<PathEntry>) -> Vec<PathEntry> {
    if entries.len() > MAX_PATH_PEERS {
        entries.sort_by_key(|e| (e.path == PathState::Down, e.peer));
        entries.truncate(MAX_PATH_PEERS);
    }
    entries.sort_by_key(|e| e.peer);
    entries
}

/// Whether `new` says something `old` (the last report sent) did not: a
/// peer came or went, a path changed, or an RTT moved by more than a
/// quarter and [`RTT_SLACK_US`].
pub fn changed(old: &[PathEntry], new: &[PathEntry]) -> bool {
    old.len() != new.len()
        || old.iter().zip(new).any(|(a, b)| {
            a.peer != b.peer
                || a.path != b.path
                || match (a.rtt_us, b.rtt_us) {
                    (None, None) => false,
                    (Some(x), Some(y)) => {
                        let diff = x.abs_diff(y);
                        diff > RTT_SLACK_US && diff > x.max(y) / 4
                    }
                    (None, Some(_)) | (Some(_), None) => true,
                }
        })
}

/// When to report, and what was reported last on this session.
#[derive(Debug, Clone, Default)]
pub struct PathReporter {
    /// When to look at the paths next; `None`: the session's server takes
    /// no reports (or there is no session).
    next: Option<Instant>,
    /// The last report sent on this session.
    last: Option<Vec<PathEntry>>,
}

impl PathReporter {
    /// A new session's welcome: a server that takes reports gets one now.
    pub fn welcomed(&mut self, supported: bool, now: Instant) {
        self.last = None;
        self.next = supported.then_some(now);
    }

    /// The session ended: nothing more until the next welcome.
    pub fn disconnected(&mut self) {
        self.next = None;
        self.last = None;
    }

    /// When [`PathReporter::poll`] wants to be called.
    pub fn deadline(&self) -> Option<Instant> {
        self.next
    }

    /// At or after the deadline: the report to send, if the paths
    /// (`current`, asked only then) changed since the last one.
    pub fn poll(
        &mut self,
        now: Instant,
        current: impl FnOnce() -> Vec<PathEntry>,
    ) -> Option<Vec<PathEntry>> {
        let due = self.next?;
        if now < due {
            return None;
        }
        self.next = Some(now + PATH_REPORT_EVERY);
        let current = report(current());
        if self
            .last
            .as_deref()
            .is_some_and(|last| !changed(last, &current))
        {
            return None;
        }
        self.last = Some(current.clone());
        Some(current)
    }
}

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "a test starts its clock anywhere"
)]
mod tests {
    use super::*;
    use crate::identity::{PrivateKey, PublicKey};

    fn key(n: u8) -> PublicKey {
        PrivateKey::from_bytes([n; 32]).public_key()
    }

    fn entry(n: u8, path: PathState, rtt_us: Option<u32>) -> PathEntry {
        PathEntry {
            peer: key(n),
            path,
            rtt_us,
        }
    }

    fn status(path: PathStatus, handshake_secs: Option<u64>) -> PeerStatus {
        PeerStatus {
            path,
            public_key: key(1),
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: None,
            last_handshake: handshake_secs.map(Duration::from_secs),
            counters: Default::default(),
            candidates: Vec::new(),
        }
    }

    #[test]
    fn a_peer_is_direct_by_family_relayed_or_down() {
        let ms = Some(Duration::from_micros(1_500));
        let v4 = PathStatus::Direct {
            addr: "192.0.2.1:51820".parse().unwrap(),
            rtt: ms,
        };
        let mapped = PathStatus::Direct {
            addr: "[::ffff:192.0.2.1]:51820".parse().unwrap(),
            rtt: None,
        };
        let v6 = PathStatus::Direct {
            addr: "[2001:db8::1]:51820".parse().unwrap(),
            rtt: ms,
        };
        let cases = [
            (status(v4, Some(3)), PathState::DirectV4, Some(1_500)),
            (status(mapped, Some(3)), PathState::DirectV4, None),
            (status(v6, Some(3)), PathState::DirectV6, Some(1_500)),
            (status(PathStatus::Relay, Some(3)), PathState::Relay, None),
            // No handshake for 3 minutes, or ever: down, whatever the path.
            (status(v4, Some(ONLINE_WITHIN)), PathState::Down, None),
            (status(PathStatus::Relay, None), PathState::Down, None),
            (status(PathStatus::Unknown, Some(1)), PathState::Down, None),
        ];
        for (status, path, rtt_us) in cases {
            let e = entry_of(&status);
            assert_eq!((e.path, e.rtt_us), (path, rtt_us), "{status:?}");
        }
    }

    #[test]
    fn a_report_is_sorted_and_bounded_keeping_live_peers() {
        let mut entries: Vec<PathEntry> = (0..MAX_PATH_PEERS + 10)
            .map(|i| PathEntry {
                peer: {
                    let mut bytes = [7u8; 32];
                    bytes[1..3].copy_from_slice(&(i as u16).to_le_bytes());
                    PrivateKey::from_bytes(bytes).public_key()
                },
                path: PathState::Down,
                rtt_us: None,
            })
            .collect();
        entries[MAX_PATH_PEERS + 5].path = PathState::Relay;
        let live = entries[MAX_PATH_PEERS + 5].peer;
        let r = report(entries);
        assert_eq!(r.len(), MAX_PATH_PEERS);
        assert!(r.windows(2).all(|w| w[0].peer < w[1].peer));
        assert!(r.iter().any(|e| e.peer == live));
    }

    #[test]
    fn only_a_real_change_is_a_change() {
        let base = vec![entry(1, PathState::DirectV4, Some(10_000))];
        let jitter = vec![entry(1, PathState::DirectV4, Some(11_500))];
        let slower = vec![entry(1, PathState::DirectV4, Some(14_000))];
        let tiny = vec![entry(1, PathState::DirectV4, Some(10_900))];
        let small = vec![entry(1, PathState::DirectV4, Some(400))];
        assert!(!changed(&base, &base));
        assert!(!changed(&base, &jitter));
        assert!(changed(&base, &slower));
        assert!(changed(&base, &small));
        // Under a millisecond apart is never a change, however relative.
        assert!(!changed(
            &small,
            &[entry(1, PathState::DirectV4, Some(1_300))]
        ));
        assert!(!changed(&base, &tiny));
        assert!(changed(
            &base,
            &[entry(1, PathState::DirectV6, Some(10_000))]
        ));
        assert!(changed(&base, &[entry(1, PathState::DirectV4, None)]));
        assert!(changed(&base, &[]));
        assert!(changed(
            &base,
            &[entry(2, PathState::DirectV4, Some(10_000))]
        ));
    }

    #[test]
    fn reports_go_after_a_welcome_then_on_change_at_most_every_interval() {
        let t0 = Instant::now();
        let mut r = PathReporter::default();
        let relay = || vec![entry(1, PathState::Relay, None)];
        let direct = || vec![entry(1, PathState::DirectV4, Some(500))];
        // No session, or a server without the feature: never.
        assert_eq!(r.deadline(), None);
        assert_eq!(r.poll(t0, relay), None);
        r.welcomed(false, t0);
        assert_eq!((r.deadline(), r.poll(t0, relay)), (None, None));
        // A server that takes them: one at once.
        r.welcomed(true, t0);
        assert_eq!(r.deadline(), Some(t0));
        assert_eq!(r.poll(t0, relay), Some(relay()));
        // Not again before the interval, even if changed.
        assert_eq!(r.deadline(), Some(t0 + PATH_REPORT_EVERY));
        assert_eq!(r.poll(t0 + Duration::from_secs(1), direct), None);
        // Unchanged at the interval: nothing, and the next look later.
        let t1 = t0 + PATH_REPORT_EVERY;
        assert_eq!(r.poll(t1, relay), None);
        assert_eq!(r.deadline(), Some(t1 + PATH_REPORT_EVERY));
        let t2 = t1 + PATH_REPORT_EVERY;
        assert_eq!(r.poll(t2, direct), Some(direct()));
        // A new session starts over: its server has nothing yet.
        r.disconnected();
        assert_eq!((r.deadline(), r.poll(t2, direct)), (None, None));
        r.welcomed(true, t2);
        assert_eq!(r.poll(t2, direct), Some(direct()));
    }

    #[test]
    fn the_rtt_is_capped_at_what_the_server_takes() {
        let s = status(
            PathStatus::Direct {
                addr: "192.0.2.1:1".parse().unwrap(),
                rtt: Some(Duration::from_secs(3600)),
            },
            Some(1),
        );
        assert_eq!(entry_of(&s).rtt_us, Some(MAX_RTT_US));
    }
}
