//! The node's cache of what the rendezvous told it: its own entry, the mesh
//! and the last peer map, in `STATE_DIR/cache.json`.
//!
//! Does file I/O. It is what lets `mesh0` come up with the same address and
//! its peers after a reboot while the rendezvous is unreachable, so kubelet
//! and etcd can start. Written atomically, through a [`Writer`]: never on
//! the thread that runs the packet loop, at most once per [`WRITE_EVERY`],
//! always the latest map, so a storm of peer-map updates costs one write a
//! second instead of two fsyncs each on the packet path.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::identity::keyfile::write_atomic;

/// The cache is written at most this often; what changes meanwhile is
/// written after, together. A crash loses at most this much of the peer
/// map, which the rendezvous sends again anyway.
pub const WRITE_EVERY: Duration = Duration::from_secs(1);

/// The type lives with the node agent, which makes it; this module stores it.
pub use crate::agent::NodeCache;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt ({source}); delete it to re-learn everything from the rendezvous")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub fn path(state_dir: &Path) -> PathBuf {
    crate::paths::NodeDir::new(state_dir).cache()
}

/// The cache, or `None` before the node was ever admitted.
pub fn load(state_dir: &Path) -> Result<Option<NodeCache>, CacheError> {
    let path = path(state_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| CacheError::Corrupt { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CacheError::Read { path, source }),
    }
}

pub fn save(state_dir: &Path, cache: &NodeCache) -> Result<(), CacheError> {
    let path = path(state_dir);
    let bytes = serde_json::to_vec_pretty(cache).unwrap_or_default();
    write_atomic(&path, &bytes, 0o600).map_err(|source| CacheError::Write { path, source })
}

/// Writes the cache on tokio's blocking threads, at most once per
/// interval, always the latest one handed over ([`Writer::save`]).
#[derive(Debug)]
pub struct Writer {
    latest: watch::Sender<Option<Arc<NodeCache>>>,
    closing: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    writes: Arc<AtomicU64>,
}

impl Writer {
    /// Starts the writer task for `state_dir/cache.json`, writing at most
    /// once per `every`.
    pub fn spawn(state_dir: PathBuf, every: Duration) -> Self {
        let (latest, mut changes) = watch::channel::<Option<Arc<NodeCache>>>(None);
        let (closing, mut closed) = oneshot::channel::<()>();
        let writes = Arc::new(AtomicU64::new(0));
        let counter = writes.clone();
        let task = tokio::spawn(async move {
            let mut closed_now = false;
            // Ends once the sender is gone and nothing new is waiting.
            while changes.changed().await.is_ok() {
                let Some(cache) = changes.borrow_and_update().clone() else {
                    continue;
                };
                let dir = state_dir.clone();
                match tokio::task::spawn_blocking(move || save(&dir, &cache)).await {
                    Ok(Ok(())) => {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot update the peer-map cache"),
                    Err(e) => tracing::warn!(error = %e, "the peer-map cache writer failed"),
                }
                if !closed_now {
                    tokio::select! {
                        () = tokio::time::sleep(every) => {}
                        _ = &mut closed => closed_now = true,
                    }
                }
            }
        });
        Self {
            latest,
            closing: Some(closing),
            task,
            writes,
        }
    }

    /// Hands over the cache to write; replaces one not written yet.
    pub fn save(&self, cache: NodeCache) {
        self.latest.send_replace(Some(Arc::new(cache)));
    }

    /// Writes that succeeded so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Writes what is still waiting, at once, and ends the task.
    pub async fn close(mut self) {
        if let Some(closing) = self.closing.take() {
            let _ = closing.send(());
        }
        drop(self.latest);
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::control::{MeshInfo, NodeEntry};

    fn sample(peers: usize) -> NodeCache {
        let entry = |n: u8| NodeEntry {
            public_key: crate::identity::PrivateKey::from_bytes([n; 32]).public_key(),
            name: format!("node-{n}"),
            ipv4: std::net::Ipv4Addr::new(100, 72, 0, n),
            ipv6: "fd00:1::5".parse().unwrap(),
            candidates: vec![],
            nat: crate::wire::control::NatMapping::Unknown,
            routes: vec![],
        };
        NodeCache {
            mesh: MeshInfo {
                id: "m".into(),
                ipv4: "100.72.0.0/16".parse().unwrap(),
                ipv6: "fd00:1::/48".parse().unwrap(),
            },
            node: entry(1),
            peers: (0..peers)
                .map(|n| entry(u8::try_from(n % 200).unwrap_or(0) + 2))
                .collect(),
        }
    }

    #[tokio::test]
    async fn a_storm_of_peer_map_updates_costs_at_most_two_cache_writes() {
        let dir = tempfile::tempdir().unwrap();
        // An interval no test outlives: the first write, then only the last.
        let writer = Writer::spawn(dir.path().to_owned(), Duration::from_secs(3600));
        for n in 0..2_000 {
            writer.save(sample(n % 7));
        }
        writer.save(sample(3));
        let writes = writer.writes();
        let counter = writer.writes.clone();
        writer.close().await;
        assert!(writes <= 1, "{writes} writes before the interval ended");
        let total = counter.load(Ordering::Relaxed);
        assert!((1..=2).contains(&total), "{total} writes for 2,001 updates");
        assert_eq!(
            load(dir.path()).unwrap(),
            Some(sample(3)),
            "the latest map is on disk once closed"
        );
    }

    #[test]
    fn cache_round_trips_and_corruption_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let cache = NodeCache {
            mesh: MeshInfo {
                id: "m".into(),
                ipv4: "100.72.0.0/16".parse().unwrap(),
                ipv6: "fd00:1::/48".parse().unwrap(),
            },
            node: NodeEntry {
                public_key: crate::identity::PrivateKey::from_bytes([1; 32]).public_key(),
                name: "a".into(),
                ipv4: "100.72.0.5".parse().unwrap(),
                ipv6: "fd00:1::5".parse().unwrap(),
                candidates: vec![],
                nat: crate::wire::control::NatMapping::Unknown,
                routes: vec![],
            },
            peers: vec![],
        };
        save(dir.path(), &cache).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(cache));
        std::fs::write(path(dir.path()), b"{").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("cache.json") && err.contains("delete it"),
            "{err}"
        );
    }
}
