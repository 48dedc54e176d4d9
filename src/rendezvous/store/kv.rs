//! The shared store as the registry sees it: keys with revisions, and
//! transactions that commit only if what they compare still holds — etcd's
//! model, which is what several rendezvous servers share (DESIGN.md, "Scale
//! and HA").
//!
//! Pure: no I/O. [`MemoryKv`] gives these semantics in memory, for the
//! embedded file store of a single server and for the simulation, where
//! several registries share one; `store::etcd` gives them over etcd. Keys
//! here are relative to the mesh's prefix, which only the etcd shell adds.
//!
//! A claim (an address, a name, a use of a token) is a [`Txn`] whose
//! [`Compare`]s say "nobody holds this yet" or "nobody changed this since I
//! read it at revision r"; two servers racing for one claim both send
//! theirs, and exactly one commits.

// Pure: the clock and randomness are inputs (clippy.toml names what is
// forbidden).
#![deny(clippy::disallowed_methods)]

use std::collections::BTreeMap;

/// A point in the store's history: every committed transaction takes the
/// next one, and every key remembers the revision that last wrote it
/// (etcd's `mod_revision`).
pub type Revision = i64;

/// A condition a transaction commits under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// Nobody holds the key.
    Absent(String),
    /// The key exists and was last written at this revision: nobody changed
    /// it since it was read.
    Revision(String, Revision),
}

impl Compare {
    pub fn key(&self) -> &str {
        match self {
            Compare::Absent(key) | Compare::Revision(key, _) => key,
        }
    }
}

/// A write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Sets the key. A `leased` key lives only as long as the writing
    /// server's lease: it is deleted by itself when that server is gone
    /// (presence, the server list).
    Put {
        key: String,
        value: Vec<u8>,
        leased: bool,
    },
    /// Removes the key (nothing if it is absent).
    Delete { key: String },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// Writes that happen together, and only if every compare holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn absent(mut self, key: impl Into<String>) -> Self {
        self.compares.push(Compare::Absent(key.into()));
        self
    }

    pub fn unchanged(mut self, key: impl Into<String>, revision: Revision) -> Self {
        self.compares.push(Compare::Revision(key.into(), revision));
        self
    }

    pub fn put(mut self, key: impl Into<String>, value: Vec<u8>) -> Self {
        self.ops.push(Op::Put {
            key: key.into(),
            value,
            leased: false,
        });
        self
    }

    pub fn put_leased(mut self, key: impl Into<String>, value: Vec<u8>) -> Self {
        self.ops.push(Op::Put {
            key: key.into(),
            value,
            leased: true,
        });
        self
    }

    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }

    /// Every key the transaction compares or writes, once each.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self
            .compares
            .iter()
            .map(Compare::key)
            .chain(self.ops.iter().map(Op::key))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Whether no key is written twice (etcd refuses such a transaction).
    pub fn writes_each_key_once(&self) -> bool {
        let mut keys: Vec<&str> = self.ops.iter().map(Op::key).collect();
        keys.sort_unstable();
        keys.windows(2).all(|w| w.first() != w.get(1))
    }
}

/// What became of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every compare held; the writes are durable at this revision.
    Committed { revision: Revision },
    /// A compare failed; nothing was written. Someone else got there
    /// first: read again, then decide again.
    Conflict,
    /// The transaction writes one key twice, which etcd refuses; nothing
    /// was written. A bug in whoever built it, never a race.
    Malformed,
    /// The store did not answer: the transaction may or may not have
    /// committed. What it did, the store's history will tell.
    Unavailable,
}

/// A key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision that last wrote it.
    pub revision: Revision,
}

/// A change to the store, as a watcher sees it, in revision order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    Delete { key: String, revision: Revision },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

/// Who holds a lease: one per server session with the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseId(pub i64);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    value: Vec<u8>,
    revision: Revision,
    lease: Option<LeaseId>,
}

/// etcd's semantics in memory: revisions, compare-and-swap transactions,
/// leases, and a history that watchers read from a revision on.
#[derive(Debug, Clone, Default)]
pub struct MemoryKv {
    entries: BTreeMap<String, Stored>,
    revision: Revision,
    /// Every event since the start (or since [`MemoryKv::compact`]).
    history: Vec<Event>,
}

impl MemoryKv {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding `entries` at revision 1 (what was loaded from a
    /// file), with no history.
    pub fn with_entries(entries: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        let revision = 1;
        let entries = entries
            .into_iter()
            .map(|(key, value)| {
                let stored = Stored {
                    value,
                    revision,
                    lease: None,
                };
                (key, stored)
            })
            .collect();
        Self {
            entries,
            revision,
            history: Vec::new(),
        }
    }

    /// The latest revision.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// One key.
    pub fn get(&self, key: &str) -> Option<KeyValue> {
        self.entries.get(key).map(|s| KeyValue {
            key: key.to_owned(),
            value: s.value.clone(),
            revision: s.revision,
        })
    }

    /// Every key under `prefix`, in key order.
    pub fn range(&self, prefix: &str) -> Vec<KeyValue> {
        self.entries
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(key, s)| KeyValue {
                key: key.clone(),
                value: s.value.clone(),
                revision: s.revision,
            })
            .collect()
    }

    /// What `keys` hold now, as events: a put at the revision that wrote
    /// it, or a delete at the current revision for a key that is absent —
    /// what a registry reads after its transaction lost a race.
    pub fn current<'a>(&self, keys: impl IntoIterator<Item = &'a str>) -> Vec<Event> {
        keys.into_iter()
            .map(|key| match self.get(key) {
                Some(kv) => Event::Put(kv),
                None => Event::Delete {
                    key: key.to_owned(),
                    revision: self.revision,
                },
            })
            .collect()
    }

    /// Every key that is not leased: what outlives every server.
    pub fn durable(&self) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        self.entries
            .iter()
            .filter(|(_, s)| s.lease.is_none())
            .map(|(k, s)| (k.as_str(), s.value.as_slice()))
    }

    /// Commits `txn` if every compare holds; leased puts are tied to
    /// `lease`.
    pub fn txn(&mut self, txn: &Txn, lease: LeaseId) -> Outcome {
        if !txn.writes_each_key_once() {
            return Outcome::Malformed;
        }
        let holds = txn.compares.iter().all(|c| match c {
            Compare::Absent(key) => !self.entries.contains_key(key),
            Compare::Revision(key, r) => self.entries.get(key).is_some_and(|s| s.revision == *r),
        });
        if !holds {
            return Outcome::Conflict;
        }
        // As etcd: a transaction that writes nothing (no put, and only
        // deletes of absent keys) takes no revision.
        let writes = txn.ops.iter().any(|op| match op {
            Op::Put { .. } => true,
            Op::Delete { key } => self.entries.contains_key(key),
        });
        if !writes {
            return Outcome::Committed {
                revision: self.revision,
            };
        }
        self.revision += 1;
        let revision = self.revision;
        for op in &txn.ops {
            match op {
                Op::Put { key, value, leased } => {
                    let stored = Stored {
                        value: value.clone(),
                        revision,
                        lease: leased.then_some(lease),
                    };
                    self.entries.insert(key.clone(), stored);
                    self.history.push(Event::Put(KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        revision,
                    }));
                }
                Op::Delete { key } => {
                    if self.entries.remove(key).is_some() {
                        self.history.push(Event::Delete {
                            key: key.clone(),
                            revision,
                        });
                    }
                }
            }
        }
        Outcome::Committed { revision }
    }

    /// The lease ends (its server stopped renewing it): its keys go, in
    /// one revision, as etcd does.
    pub fn expire(&mut self, lease: LeaseId) {
        let keys: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, s)| s.lease == Some(lease))
            .map(|(k, _)| k.clone())
            .collect();
        if keys.is_empty() {
            return;
        }
        self.revision += 1;
        for key in keys {
            self.entries.remove(&key);
            self.history.push(Event::Delete {
                key,
                revision: self.revision,
            });
        }
    }

    /// The events after `revision`, in order.
    pub fn events_after(&self, revision: Revision) -> &[Event] {
        let start = self.history.partition_point(|e| e.revision() <= revision);
        self.history.get(start..).unwrap_or(&[])
    }

    /// Forgets the history (a file store has no watchers).
    pub fn compact(&mut self) {
        self.history.clear();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    const A: LeaseId = LeaseId(1);
    const B: LeaseId = LeaseId(2);

    fn claim(key: &str, holder: &str) -> Txn {
        Txn::new().absent(key).put(key, holder.as_bytes().to_vec())
    }

    #[test]
    fn of_two_claims_on_one_key_exactly_one_commits() {
        let mut kv = MemoryKv::new();
        let first = kv.txn(&claim("addrs/100.72.0.5", "node-a"), A);
        let second = kv.txn(&claim("addrs/100.72.0.5", "node-b"), B);
        assert_eq!(first, Outcome::Committed { revision: 1 });
        assert_eq!(second, Outcome::Conflict);
        assert_eq!(kv.get("addrs/100.72.0.5").unwrap().value, b"node-a");
    }

    #[test]
    fn a_failed_compare_writes_nothing_at_all() {
        let mut kv = MemoryKv::new();
        kv.txn(&claim("names/web", "a"), A);
        let txn = claim("addrs/100.72.0.9", "b").absent("names/web");
        assert_eq!(kv.txn(&txn, B), Outcome::Conflict);
        assert!(kv.get("addrs/100.72.0.9").is_none());
        assert_eq!(kv.revision(), 1);
    }

    #[test]
    fn a_write_based_on_a_stale_read_conflicts() {
        let mut kv = MemoryKv::new();
        kv.txn(&Txn::new().put("tokens/t", b"uses=0".to_vec()), A);
        let read = kv.get("tokens/t").unwrap();
        let bump = |uses: &str| {
            Txn::new()
                .unchanged("tokens/t", read.revision)
                .put("tokens/t", uses.as_bytes().to_vec())
        };
        assert!(matches!(
            kv.txn(&bump("uses=1"), A),
            Outcome::Committed { .. }
        ));
        assert_eq!(kv.txn(&bump("uses=1"), B), Outcome::Conflict);
    }

    #[test]
    fn an_expired_lease_takes_its_keys_and_only_those() {
        let mut kv = MemoryKv::new();
        kv.txn(&Txn::new().put_leased("presence/a", b"rv1".to_vec()), A);
        kv.txn(&Txn::new().put_leased("presence/b", b"rv2".to_vec()), B);
        kv.txn(&Txn::new().put("nodes/a", b"{}".to_vec()), A);
        let before = kv.revision();
        kv.expire(A);
        assert!(kv.get("presence/a").is_none());
        assert!(kv.get("presence/b").is_some());
        assert!(kv.get("nodes/a").is_some());
        assert_eq!(
            kv.events_after(before),
            [Event::Delete {
                key: "presence/a".into(),
                revision: before + 1
            }]
        );
        assert_eq!(
            kv.durable().map(|(k, _)| k).collect::<Vec<_>>(),
            ["nodes/a"]
        );
    }

    #[test]
    fn watchers_read_the_history_from_any_revision() {
        let mut kv = MemoryKv::new();
        kv.txn(&claim("a", "1"), A);
        kv.txn(&claim("b", "2").delete("a"), A);
        let all: Vec<_> = kv
            .events_after(0)
            .iter()
            .map(|e| (e.key(), e.revision()))
            .collect();
        assert_eq!(all, [("a", 1), ("b", 2), ("a", 2)]);
        assert_eq!(kv.events_after(1).len(), 2);
        assert!(kv.events_after(2).is_empty());
    }

    #[test]
    fn a_key_written_twice_is_refused_whole() {
        let mut kv = MemoryKv::new();
        let txn = claim("a", "1").put("b", vec![]).delete("a");
        assert_eq!(kv.txn(&txn, A), Outcome::Malformed);
        assert!(kv.get("a").is_none() && kv.get("b").is_none());
    }

    #[test]
    fn a_transaction_that_writes_nothing_takes_no_revision() {
        let mut kv = MemoryKv::new();
        kv.txn(&claim("a", "1"), A);
        let nothing = Txn::new().delete("absent");
        assert_eq!(kv.txn(&nothing, A), Outcome::Committed { revision: 1 });
        assert_eq!(kv.revision(), 1);
        assert!(kv.events_after(1).is_empty());
    }

    #[test]
    fn range_lists_a_prefix_in_key_order() {
        let kv = MemoryKv::with_entries([
            ("nodes/b".to_owned(), vec![2]),
            ("names/x".to_owned(), vec![0]),
            ("nodes/a".to_owned(), vec![1]),
            ("nodez".to_owned(), vec![9]),
        ]);
        let keys: Vec<_> = kv.range("nodes/").into_iter().map(|kv| kv.key).collect();
        assert_eq!(keys, ["nodes/a", "nodes/b"]);
    }
}
