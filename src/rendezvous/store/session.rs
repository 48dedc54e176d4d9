//! The registry task's end of the store: where a [`Command::Commit`] goes,
//! when what it committed is durable, and what the store says by itself
//! (other servers' changes, a lost or recovered session).
//!
//! Does I/O. A single server commits to its [`LocalStore`] and saves the
//! file through a [`StoreWriter`]; a server of several commits to etcd,
//! watches the mesh's prefix and keeps its lease. The registry sees the
//! same [`Outcome`]s and [`Event`]s from both.
//!
//! [`Command::Commit`]: crate::rendezvous::registry::Command::Commit

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::etcd::{EtcdConfig, EtcdError, EtcdStore, WatchItem};
use super::kv::{Event, KeyValue, Outcome, Revision, Txn};
use super::records::{self, StateError};
use super::{LocalStore, Store, StoreWriter};
use crate::identity::PrivateKey;
use crate::rendezvous::registry::{Limits, Registry, RegistryState};

/// How long after a failure the session with etcd is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// What the store says by itself.
#[derive(Debug)]
pub enum News {
    /// Changes other servers made, in revision order.
    Events(Vec<Event>),
    /// Everything the store holds at a revision (the watch had to start
    /// over): hand it to [`Registry::handle_snapshot`].
    Snapshot(Vec<KeyValue>, Revision),
    /// This server's session with the store is gone.
    Lost,
    /// It is back.
    Back,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("the mesh in etcd: {0}")]
    State(#[from] StateError),
}

/// The registry task's store.
pub enum StoreSession {
    Local {
        local: LocalStore,
        writer: StoreWriter,
        /// Committed and not saved yet.
        unsaved: bool,
    },
    Etcd(Box<EtcdSession>),
}

pub struct EtcdSession {
    store: EtcdStore,
    watch: Option<mpsc::Receiver<WatchItem>>,
    lease_lost: watch::Receiver<bool>,
    /// The lease ended and no new one is granted yet.
    lease_down: bool,
    /// When to try again what failed.
    retry_at: Option<Instant>,
    commits: u64,
}

impl StoreSession {
    /// A single server's store: `state` in memory, saved to `store`.
    pub fn local(store: impl Store + 'static, state: &RegistryState) -> Self {
        StoreSession::Local {
            local: LocalStore::new(state),
            writer: StoreWriter::spawn(store),
            unsaved: false,
        }
    }

    /// A server's session with etcd and the registry over what it holds.
    pub async fn etcd(
        config: &EtcdConfig,
        server_key: PrivateKey,
        limits: Limits,
    ) -> Result<(Self, Registry), SessionError> {
        let store = EtcdStore::connect(config).await?;
        let (records, revision) = store.load().await?;
        let registry = Registry::from_records(&records, server_key, limits)?;
        let watch = store.watch(revision).await?;
        let lease_lost = store.lease_lost();
        tracing::info!(
            prefix = %config.prefix, records = records.len(), revision,
            "mesh loaded from etcd"
        );
        let session = EtcdSession {
            store,
            watch: Some(watch),
            lease_lost,
            lease_down: false,
            retry_at: None,
            commits: 0,
        };
        Ok((StoreSession::Etcd(Box::new(session)), registry))
    }

    /// Commits `txn`; when it did not commit, also what its keys hold now.
    pub async fn commit(&mut self, txn: &Txn) -> (Outcome, Vec<Event>) {
        match self {
            StoreSession::Local { local, unsaved, .. } => {
                let (outcome, fresh) = local.commit(txn);
                if let Outcome::Committed { .. } = outcome {
                    *unsaved |= txn.ops.iter().any(|op| records::is_durable(op.key()));
                }
                (outcome, fresh)
            }
            StoreSession::Etcd(session) => session.commit(txn).await,
        }
    }

    /// Whether other servers read what this one writes (etcd): then a
    /// save is also how they learn of a change.
    pub fn is_shared(&self) -> bool {
        matches!(self, StoreSession::Etcd(_))
    }

    /// Whether something committed is not durable yet: the file of a
    /// single server is saved after its commits (etcd's commits are
    /// durable as they are answered).
    pub fn unsaved(&self) -> bool {
        matches!(self, StoreSession::Local { unsaved: true, .. })
    }

    /// Starts saving `state`, with every commit so far, if one is not
    /// durable yet; what it returns is told once they are (or the save
    /// failed, which is logged). `None` if nothing waits to be saved.
    pub async fn start_save(&mut self, state: &RegistryState) -> Option<oneshot::Receiver<()>> {
        let StoreSession::Local {
            writer, unsaved, ..
        } = self
        else {
            return None;
        };
        if !std::mem::take(unsaved) {
            return None;
        }
        Some(writer.queue_durable(Arc::new(state.clone())).await)
    }

    /// Writes to the store so far (file saves, or etcd commits).
    pub fn writes(&self) -> u64 {
        match self {
            StoreSession::Local { writer, .. } => writer.writes(),
            StoreSession::Etcd(session) => session.commits,
        }
    }

    /// What the store says next by itself; never, for a single server's.
    pub async fn next(&mut self) -> News {
        match self {
            StoreSession::Local { .. } => std::future::pending().await,
            StoreSession::Etcd(session) => session.next().await,
        }
    }

    /// Ends the session: the file writer finishes, or this server's lease
    /// is revoked so that its nodes' presence goes at once.
    pub async fn close(self) {
        match self {
            StoreSession::Local { writer, .. } => writer.close().await,
            StoreSession::Etcd(session) => {
                if let Err(e) = session.store.revoke_lease().await {
                    tracing::debug!(error = %e, "lease not revoked; it ends by itself");
                }
            }
        }
    }
}

impl EtcdSession {
    async fn commit(&mut self, txn: &Txn) -> (Outcome, Vec<Event>) {
        if self.lease_down {
            return (Outcome::Unavailable, Vec::new());
        }
        let outcome = match self.store.txn(txn).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(error = %e, "commit to etcd failed");
                return (Outcome::Unavailable, Vec::new());
            }
        };
        self.commits = self.commits.saturating_add(1);
        if let Outcome::Committed { .. } = outcome {
            return (outcome, Vec::new());
        }
        let keys: Vec<String> = txn.keys().into_iter().map(str::to_owned).collect();
        match self.store.current(&keys).await {
            Ok(fresh) => (outcome, fresh),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read etcd after a lost race");
                (outcome, Vec::new())
            }
        }
    }

    async fn next(&mut self) -> News {
        loop {
            let retry_at = self.retry_at;
            let retry = async move {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                item = recv(&mut self.watch) => match item {
                    Some(WatchItem::Events(events)) => return News::Events(events),
                    Some(WatchItem::Compacted { revision }) => {
                        tracing::info!(revision, "etcd forgot what the watch needed; reading the mesh again");
                        self.watch = None;
                        if let Some(news) = self.resync().await {
                            return news;
                        }
                    }
                    // Commits still compare against etcd, so nothing is
                    // decided twice meanwhile; only news waits.
                    Some(WatchItem::Failed(e)) => {
                        tracing::warn!(error = %e, "the watch of etcd ended; starting it again");
                        self.watch = None;
                        self.retry_at = Some(Instant::now() + RETRY);
                    }
                    None => {
                        self.watch = None;
                        self.retry_at = Some(Instant::now() + RETRY);
                    }
                },
                changed = self.lease_lost.changed() => {
                    if changed.is_err() {
                        // The keep-alive is gone with the store: renew.
                        self.lease_down = true;
                        self.retry_at = Some(Instant::now() + RETRY);
                        return News::Lost;
                    }
                    if *self.lease_lost.borrow_and_update() && !self.lease_down {
                        self.lease_down = true;
                        self.retry_at = Some(Instant::now() + RETRY);
                        return News::Lost;
                    }
                }
                () = retry => {
                    self.retry_at = None;
                    if self.lease_down {
                        match self.store.renew_lease().await {
                            Ok(()) => {
                                self.lease_down = false;
                                self.lease_lost = self.store.lease_lost();
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "no new lease yet");
                                self.retry_at = Some(Instant::now() + RETRY);
                                continue;
                            }
                        }
                    }
                    if self.watch.is_none() {
                        match self.resync().await {
                            Some(News::Snapshot(records, revision)) => {
                                // Back once the registry has the snapshot.
                                return News::Snapshot(records, revision);
                            }
                            _ => continue,
                        }
                    }
                    return News::Back;
                }
            }
        }
    }

    /// Reads everything and watches from there; `None` (and a retry
    /// later) when etcd does not answer.
    async fn resync(&mut self) -> Option<News> {
        let loaded = match self.store.load().await {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the mesh from etcd");
                self.retry_at = Some(Instant::now() + RETRY);
                return None;
            }
        };
        match self.store.watch(loaded.1).await {
            Ok(watch) => self.watch = Some(watch),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the mesh in etcd");
                self.retry_at = Some(Instant::now() + RETRY);
                return None;
            }
        }
        Some(News::Snapshot(loaded.0, loaded.1))
    }

    /// Whether the session holds: a lease and a watch.
    pub fn is_up(&self) -> bool {
        !self.lease_down && self.watch.is_some()
    }
}

async fn recv(watch: &mut Option<mpsc::Receiver<WatchItem>>) -> Option<WatchItem> {
    match watch {
        Some(watch) => watch.recv().await,
        None => std::future::pending().await,
    }
}
