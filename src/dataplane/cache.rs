//! The node's cache of what the rendezvous told it: its own entry, the mesh
//! and the last peer map, in `STATE_DIR/cache.json`.
//!
//! Does file I/O. It is what lets `mesh0` come up with the same address and
//! its peers after a reboot while the rendezvous is unreachable, so kubelet
//! and etcd can start. Written atomically after every change.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::identity::keyfile::write_atomic;
use crate::wire::control::{MeshInfo, NodeEntry};

const FILE: &str = "cache.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCache {
    pub mesh: MeshInfo,
    pub node: NodeEntry,
    pub peers: Vec<NodeEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is corrupt ({source}); delete it to re-learn everything from the rendezvous")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_round_trips_and_corruption_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let cache = NodeCache {
            mesh: MeshInfo { id: "m".into(), ipv4: "100.72.0.0/16".parse().unwrap(), ipv6: "fd00:1::/48".parse().unwrap() },
            node: NodeEntry {
                public_key: crate::identity::PrivateKey::from_bytes([1; 32]).public_key(),
                name: "a".into(),
                ipv4: "100.72.0.5".parse().unwrap(),
                ipv6: "fd00:1::5".parse().unwrap(),
                candidates: vec![],
                nat: crate::wire::control::NatMapping::Unknown,
            },
            peers: vec![],
        };
        save(dir.path(), &cache).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(cache));
        std::fs::write(path(dir.path()), b"{").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("cache.json") && err.contains("delete it"), "{err}");
    }
}
