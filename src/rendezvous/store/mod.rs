//! Persistence of the registry's state across rendezvous restarts.
//!
//! Does file I/O ([`FileStore`]). [`Store`] is the seam where a distributed
//! store (etcd, for several rendezvous servers) can replace the file later;
//! [`MemoryStore`] keeps the state in memory, for tests of the shell.
//!
//! The file is `<state-dir>/registry.json`, mode 0600, replaced atomically on
//! every save, so a crash leaves the previous state or the new one. The
//! server saves through a [`StoreWriter`]: a task that writes on tokio's
//! blocking threads, never on the ones that run connections, and always the
//! latest state it was given, so a burst of changes costs one write. A file
//! that cannot be read or parsed is an error naming it — never a panic, and
//! never a silent fresh start, which would hand out addresses that existing
//! nodes already hold.

pub mod etcd;
pub mod kv;
pub mod records;
pub mod session;

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::registry::RegistryState;
use crate::identity::keyfile::write_atomic;

/// The version of the file's layout; bumped on incompatible changes.
pub const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read registry file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write registry file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "registry file {path} is corrupt ({source}); restore it from a backup. Moving it \
         away starts an empty registry: every node then needs a new join token and may \
         get a different address"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "registry file {path} has format {found}, but this mesh-rendezvous reads format \
         {FORMAT}; run the version that wrote it"
    )]
    UnsupportedFormat { path: PathBuf, found: u32 },
}

/// The store of a single server: the registry's records in memory, with
/// the shared store's semantics ([`kv::MemoryKv`]), so that the registry
/// commits and is answered the same way as over etcd. What is committed
/// reaches the disk as the file of [`FileStore`], which the shell saves
/// from the registry's state.
#[derive(Debug)]
pub struct LocalStore {
    kv: kv::MemoryKv,
}

/// The lease of the one server a local store has.
const LOCAL_LEASE: kv::LeaseId = kv::LeaseId(1);

impl LocalStore {
    /// The records of `state`, at revision 1 (as `Registry::new` takes
    /// them to be).
    pub fn new(state: &RegistryState) -> Self {
        let entries = records::records(state)
            .into_iter()
            .map(|(key, value)| (key.path(), records::encode(&value)));
        Self {
            kv: kv::MemoryKv::with_entries(entries),
        }
    }

    /// Commits `txn`; after a conflict, also what its keys hold now.
    pub fn commit(&mut self, txn: &kv::Txn) -> (kv::Outcome, Vec<kv::Event>) {
        let outcome = self.kv.txn(txn, LOCAL_LEASE);
        // Nobody watches a local store.
        self.kv.compact();
        match outcome {
            kv::Outcome::Committed { .. } => (outcome, Vec::new()),
            kv::Outcome::Conflict | kv::Outcome::Malformed | kv::Outcome::Unavailable => {
                (outcome, self.kv.current(txn.keys()))
            }
        }
    }
}

/// Where the registry state lives between restarts.
pub trait Store: Send {
    /// The saved state, or `None` if nothing was ever saved (a new mesh).
    fn load(&self) -> Result<Option<RegistryState>, StoreError>;
    /// Replaces the saved state; when this returns `Ok`, it is durable.
    fn save(&mut self, state: &RegistryState) -> Result<(), StoreError>;
}

/// The file as written: the state behind a format number, so a later
/// layout can be told apart instead of misread.
#[derive(Serialize)]
struct FileRef<'a> {
    format: u32,
    registry: &'a RegistryState,
}

#[derive(Deserialize)]
struct FileHeader {
    format: u32,
}

#[derive(Deserialize)]
struct FileBody {
    registry: RegistryState,
}

/// The embedded store: one JSON file in the state directory.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    /// A store for `<state_dir>/registry.json`; touches nothing yet.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: crate::paths::RendezvousDir::new(state_dir).registry(),
        }
    }

    /// The file this store reads and writes.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Store for FileStore {
    fn load(&self) -> Result<Option<RegistryState>, StoreError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let corrupt = |source| StoreError::Corrupt {
            path: self.path.clone(),
            source,
        };
        let header: FileHeader = serde_json::from_slice(&bytes).map_err(corrupt)?;
        if header.format != FORMAT {
            return Err(StoreError::UnsupportedFormat {
                path: self.path.clone(),
                found: header.format,
            });
        }
        let body: FileBody = serde_json::from_slice(&bytes).map_err(corrupt)?;
        Ok(Some(body.registry))
    }

    fn save(&mut self, state: &RegistryState) -> Result<(), StoreError> {
        let write_err = |source| StoreError::Write {
            path: self.path.clone(),
            source,
        };
        let mut bytes = serde_json::to_vec_pretty(&FileRef {
            format: FORMAT,
            registry: state,
        })
        .map_err(|e| write_err(io::Error::other(e)))?;
        bytes.push(b'\n');
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The state directory holds the mesh's registry: owner only.
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(write_err)?;
        }
        write_atomic(&self.path, &bytes, 0o600).map_err(write_err)
    }
}

/// Saves queued before the writer falls behind and [`StoreWriter::save`]
/// waits; each queued save is a whole state, and the writer skips all but
/// the latest.
const WRITER_QUEUE: usize = 16;

/// One save for the writer task.
struct Job {
    state: Arc<RegistryState>,
    /// Told once the state (or a later one) is written or failed to be.
    done: Option<oneshot::Sender<()>>,
}

/// Saves the registry off the task that runs it: every save runs on a
/// blocking thread, one at a time, and a save that waits behind another is
/// skipped when a later one waits too (the later state has all its
/// changes). A failed save is logged, like the server always did: the
/// rendezvous keeps serving with the state in memory.
#[derive(Debug)]
pub struct StoreWriter {
    jobs: mpsc::Sender<Job>,
    task: JoinHandle<()>,
    writes: Arc<AtomicU64>,
}

impl StoreWriter {
    /// Starts the writer task on the current tokio runtime.
    pub fn spawn<S: Store + 'static>(store: S) -> Self {
        let (jobs, mut queue) = mpsc::channel::<Job>(WRITER_QUEUE);
        let writes = Arc::new(AtomicU64::new(0));
        let counter = writes.clone();
        let task = tokio::spawn(async move {
            let mut store = Some(store);
            while let Some(first) = queue.recv().await {
                let mut latest = first.state;
                let mut waiting: Vec<oneshot::Sender<()>> = first.done.into_iter().collect();
                while let Ok(job) = queue.try_recv() {
                    latest = job.state;
                    waiting.extend(job.done);
                }
                let Some(mut owned) = store.take() else { break };
                let saved = tokio::task::spawn_blocking(move || {
                    let result = owned.save(&latest);
                    (owned, result)
                })
                .await;
                match saved {
                    Ok((owned, result)) => {
                        store = Some(owned);
                        match result {
                            Ok(()) => {
                                counter.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => tracing::error!(
                                error = %e,
                                "cannot persist the registry; changes since the last save are lost on restart"
                            ),
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the registry writer failed; nothing more is saved")
                    }
                }
                for done in waiting {
                    let _ = done.send(());
                }
            }
        });
        Self { jobs, task, writes }
    }

    /// Queues `state` to be written; returns at once unless the queue is full.
    pub async fn save(&self, state: Arc<RegistryState>) {
        let _ = self.jobs.send(Job { state, done: None }).await;
    }

    /// Queues `state` to be written; what it returns is told once the
    /// state (or a later one) is durable or the write failed (which is
    /// logged), or is dropped if the writer is gone.
    pub async fn queue_durable(&self, state: Arc<RegistryState>) -> oneshot::Receiver<()> {
        let (done, written) = oneshot::channel();
        let _ = self
            .jobs
            .send(Job {
                state,
                done: Some(done),
            })
            .await;
        written
    }

    /// Saves that succeeded so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// A handle on the count of [`StoreWriter::writes`], for metrics.
    pub fn write_counter(&self) -> Arc<AtomicU64> {
        self.writes.clone()
    }

    /// Finishes every queued save, then ends the task.
    pub async fn close(self) {
        drop(self.jobs);
        let _ = self.task.await;
    }
}

/// A store in memory: the state is lost with the process. For tests.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    state: Option<RegistryState>,
    saves: usize,
}

impl MemoryStore {
    /// A store that already holds `state`, as after a restart.
    pub fn with_state(state: RegistryState) -> Self {
        Self {
            state: Some(state),
            saves: 0,
        }
    }

    /// The last state saved (or given to [`MemoryStore::with_state`]).
    pub fn state(&self) -> Option<&RegistryState> {
        self.state.as_ref()
    }

    /// How many times [`Store::save`] was called.
    pub fn saves(&self) -> usize {
        self.saves
    }
}

impl Store for MemoryStore {
    fn load(&self) -> Result<Option<RegistryState>, StoreError> {
        Ok(self.state.clone())
    }

    fn save(&mut self, state: &RegistryState) -> Result<(), StoreError> {
        self.state = Some(state.clone());
        self.saves += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::identity::PublicKey;
    use crate::ipam;
    use crate::rendezvous::registry::{NodeRecord, TokenRecord};
    use crate::wire::control::{Candidate, CandidateKind, MeshInfo};

    fn sample_state() -> RegistryState {
        let mut state = RegistryState::new(MeshInfo {
            id: "mesh-1".into(),
            ipv4: "100.72.0.0/16".parse().unwrap(),
            ipv6: ipam::ula_prefix([1, 2, 3, 4, 5]),
        });
        let key = PublicKey::from_bytes([4; 32]);
        state.nodes.insert(
            key,
            NodeRecord {
                name: "worker-1".into(),
                ipv4: "100.72.3.4".parse().unwrap(),
                ipv6: ipam::ipv6_for(&key, state.mesh.ipv6),
                joined_at: 10,
                last_seen: 20,
                candidates: vec![Candidate {
                    addr: "203.0.113.1:51820".parse().unwrap(),
                    kind: CandidateKind::Observed,
                    mapped: None,
                }],
                nat: crate::wire::control::NatMapping::Unknown,
                routes: Vec::new(),
                approved_routes: Vec::new(),
            },
        );
        state.tokens.insert(
            "abc".into(),
            TokenRecord {
                id: "abc".into(),
                secret_sha256: "00".repeat(32),
                created_at: 1,
                expires_at: 2,
                max_uses: Some(3),
                uses: 1,
                revoked: false,
                takes_over: None,
            },
        );
        state.removed.insert(PublicKey::from_bytes([9; 32]));
        state
    }

    #[test]
    fn a_saved_state_loads_back_identical() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::new(dir.path());
        store.save(&sample_state()).unwrap();
        assert_eq!(store.load().unwrap(), Some(sample_state()));
        // A second store over the same directory, as after a restart.
        assert_eq!(
            FileStore::new(dir.path()).load().unwrap(),
            Some(sample_state())
        );
    }

    #[test]
    fn the_file_is_owner_only_and_in_the_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("rendezvous");
        let mut store = FileStore::new(&state_dir);
        store.save(&sample_state()).unwrap();
        assert_eq!(store.path(), state_dir.join("registry.json"));
        let mode = fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(&state_dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
    }

    #[test]
    fn a_missing_file_means_a_new_mesh() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(FileStore::new(dir.path()).load().unwrap(), None);
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        for garbage in [
            &b""[..],
            b"{\"format\": 1, \"registry\": {",
            b"\xff\xfe",
            b"{\"format\": 1}",
        ] {
            fs::write(store.path(), garbage).unwrap();
            let err = store.load().unwrap_err();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
            let text = err.to_string();
            assert!(text.contains(&store.path().display().to_string()), "{text}");
            assert!(text.contains("corrupt"), "{text}");
        }
    }

    #[test]
    fn a_file_of_another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        fs::write(
            store.path(),
            br#"{"format": 2, "registry": "something new"}"#,
        )
        .unwrap();
        let err = store.load().unwrap_err();
        assert!(
            matches!(err, StoreError::UnsupportedFormat { found: 2, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("registry.json"), "{err}");
    }

    #[test]
    fn an_unreadable_path_is_a_read_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        // A directory where the file should be.
        fs::create_dir(store.path()).unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, StoreError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("registry.json"), "{err}");
    }

    #[test]
    fn a_failed_save_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        fs::write(&blocker, b"").unwrap();
        let mut store = FileStore::new(&blocker);
        let err = store.save(&sample_state()).unwrap_err();
        assert!(matches!(err, StoreError::Write { .. }), "{err:?}");
        assert!(err.to_string().contains("registry.json"), "{err}");
    }

    #[tokio::test]
    async fn a_durable_save_through_the_writer_is_on_disk_when_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let writer = StoreWriter::spawn(FileStore::new(dir.path()));
        let mut state = sample_state();
        for seen in 0..2_000u64 {
            state.nodes.values_mut().for_each(|r| r.last_seen = seen);
            writer.save(Arc::new(state.clone())).await;
        }
        let _ = writer.queue_durable(Arc::new(state.clone())).await.await;
        // Durable: on disk when it is told, and it is the last.
        assert_eq!(FileStore::new(dir.path()).load().unwrap(), Some(state));
        let writes = writer.writes();
        assert!(
            (1..=2_001).contains(&writes),
            "{writes} writes for 2,001 saves"
        );
        writer.close().await;
    }

    /// A registry.json as mesh-rendezvous v0.1.0 wrote it: no quarantine,
    /// names as the hellos said them (two nodes calling themselves alike).
    const V0_1_0: &str = r#"{
  "format": 1,
  "registry": {
    "mesh": { "id": "mesh-1", "ipv4": "100.72.0.0/16", "ipv6": "fd01:203:405::/48" },
    "nodes": {
      "BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ=": {
        "name": "worker-1", "ipv4": "100.72.3.4", "ipv6": "fd01:203:405::4",
        "joined_at": 10, "last_seen": 20,
        "candidates": [{ "addr": "203.0.113.1:51820", "kind": "observed" }]
      },
      "BQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQU=": {
        "name": "Worker-1.example.com", "ipv4": "100.72.3.5", "ipv6": "fd01:203:405::5",
        "joined_at": 11, "last_seen": 21, "candidates": [], "nat": "endpoint_dependent"
      }
    },
    "tokens": {
      "abc": {
        "id": "abc", "secret_sha256": "0000000000000000000000000000000000000000000000000000000000000000",
        "created_at": 1, "expires_at": 2, "max_uses": 3, "uses": 1, "revoked": false
      }
    },
    "removed": ["CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk="]
  }
}
"#;

    #[test]
    fn a_v0_1_0_registry_file_loads_and_its_names_become_unique_labels() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        fs::write(store.path(), V0_1_0).unwrap();
        let state = store.load().unwrap().expect("a v0.1.0 file loads");
        assert_eq!(state.nodes.len(), 2);
        assert!(state.quarantine.is_empty());
        assert_eq!(state.removed.len(), 1);
        assert_eq!(state.tokens["abc"].uses, 1);
        let mut state = state;
        assert!(state.migrate_names());
        let registry = crate::rendezvous::registry::Registry::new(
            state,
            crate::identity::PrivateKey::from_bytes([1; 32]),
        );
        let names: Vec<String> = registry.nodes().into_iter().map(|n| n.name).collect();
        assert_eq!(names, vec!["worker-1", "worker-1-2"]);
        // What this version writes, the same version reads back.
        let mut store = store;
        store.save(registry.state()).unwrap();
        assert_eq!(store.load().unwrap().as_ref(), Some(registry.state()));
    }

    #[test]
    fn the_memory_store_keeps_the_last_save() {
        let mut store = MemoryStore::default();
        assert_eq!(store.load().unwrap(), None);
        store.save(&sample_state()).unwrap();
        assert_eq!(store.load().unwrap(), Some(sample_state()));
        assert_eq!(store.saves(), 1);
    }
}
