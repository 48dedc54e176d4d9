#![cfg(not(feature = "sim"))]
//! The shared store over a real etcd (src/rendezvous/store/etcd.rs): claims
//! race and exactly one wins, stale writes conflict, leased keys go with
//! their server's lease, watches deliver every change of their mesh and
//! none of another's, the same script gives the same outcomes as
//! `MemoryKv`, and a three-member cluster losing its leader loses no write
//! and no event. Needs root (each cluster runs in a network namespace of
//! its own, tests/common/etcd.rs) and Debian's etcd-server and etcd-client.
//!
//! The client runs on a thread inside the cluster's namespace
//! (`EtcdCluster::block_on`); every test's async body is bounded by
//! `TEST_DEADLINE`, and every wait inside it by a deadline of its own.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use common::etcd::EtcdCluster;
use meshd::rendezvous::store::etcd::{ConfigError, EtcdConfig, EtcdError, EtcdStore, WatchItem};
use meshd::rendezvous::store::kv::{Event, KeyValue, LeaseId, MemoryKv, Outcome, Revision, Txn};
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout, Instant};

/// The longest any one test's async body may run.
const TEST_DEADLINE: Duration = Duration::from_secs(120);
/// How long a change may take to show (a lease to expire, an election).
const CHANGE_DEADLINE: Duration = Duration::from_secs(30);
const RETRY: Duration = Duration::from_millis(100);

/// Runs `body` inside `cluster`'s namespace, bounded by [`TEST_DEADLINE`].
fn run<Fut>(cluster: &EtcdCluster, body: impl FnOnce() -> Fut + Send + 'static)
where
    Fut: Future<Output = ()>,
{
    cluster.block_on(move || async move {
        timeout(TEST_DEADLINE, body())
            .await
            .unwrap_or_else(|_| panic!("the test did not finish within {TEST_DEADLINE:?}"));
    });
}

fn config(cluster: &EtcdCluster, prefix: &str) -> EtcdConfig {
    let mut config = EtcdConfig::new(cluster.endpoints(), prefix);
    config.lease_ttl = Duration::from_secs(2);
    config.request_timeout = Duration::from_secs(3);
    config.dial_timeout = Duration::from_secs(2);
    config
}

async fn connect(config: &EtcdConfig) -> EtcdStore {
    EtcdStore::connect(config)
        .await
        .unwrap_or_else(|e| panic!("connect to etcd: {e}"))
}

fn claim(key: &str, holder: &str) -> Txn {
    Txn::new().absent(key).put(key, holder.as_bytes().to_vec())
}

async fn txn(store: &EtcdStore, txn: &Txn) -> Outcome {
    store
        .txn(txn)
        .await
        .unwrap_or_else(|e| panic!("txn {txn:?}: {e}"))
}

async fn get(store: &EtcdStore, key: &str) -> Option<KeyValue> {
    let mut got = store.get(&[key.to_owned()]).await.unwrap();
    assert_eq!(got.len(), 1);
    got.remove(0)
}

/// Events from `watch` until one at `revision` or later has come.
async fn events_until(watch: &mut mpsc::Receiver<WatchItem>, revision: Revision) -> Vec<Event> {
    let mut events: Vec<Event> = Vec::new();
    while events.last().is_none_or(|e| e.revision() < revision) {
        let item = timeout(CHANGE_DEADLINE, watch.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no event up to revision {revision} within {CHANGE_DEADLINE:?}; got {events:?}"
                )
            });
        match item {
            Some(WatchItem::Events(batch)) => events.extend(batch),
            other => panic!("the watch delivers events, not {other:?} (after {events:?})"),
        }
    }
    events
}

#[test]
fn of_two_claims_on_one_key_from_two_servers_at_once_exactly_one_commits() {
    let cluster = EtcdCluster::new(1);
    let config = config(&cluster, "/meshd/race/");
    run(&cluster, move || async move {
        let (a, b) = (connect(&config).await, connect(&config).await);
        for round in 0..50 {
            let key = format!("addrs/100.72.0.{round}");
            let (for_a, for_b) = (claim(&key, "server-a"), claim(&key, "server-b"));
            let (first, second) = tokio::join!(a.txn(&for_a), b.txn(&for_b));
            let (first, second) = (first.unwrap(), second.unwrap());
            let winner = match (first, second) {
                (Outcome::Committed { .. }, Outcome::Conflict) => "server-a",
                (Outcome::Conflict, Outcome::Committed { .. }) => "server-b",
                other => panic!("round {round}: exactly one of two claims commits, not {other:?}"),
            };
            let held = get(&a, &key).await.expect("the claimed key exists");
            assert_eq!(held.value, winner.as_bytes(), "round {round}");
        }
    });
}

#[test]
fn a_write_based_on_a_stale_read_conflicts() {
    let cluster = EtcdCluster::new(1);
    let config = config(&cluster, "/meshd/stale/");
    run(&cluster, move || async move {
        let store = connect(&config).await;
        txn(&store, &Txn::new().put("tokens/t", b"uses=0".to_vec())).await;
        let read = get(&store, "tokens/t").await.unwrap();
        let bump = |uses: &str| {
            Txn::new()
                .unchanged("tokens/t", read.revision)
                .put("tokens/t", uses.as_bytes().to_vec())
        };
        let Outcome::Committed { revision } = txn(&store, &bump("uses=1")).await else {
            panic!("the first write on a fresh read commits");
        };
        assert_eq!(txn(&store, &bump("uses=2")).await, Outcome::Conflict);
        let now = get(&store, "tokens/t").await.unwrap();
        assert_eq!(
            (now.value.as_slice(), now.revision),
            (&b"uses=1"[..], revision)
        );
        // "Unchanged" never holds for a key that is not there.
        let absent = Txn::new()
            .unchanged("tokens/none", read.revision)
            .put("tokens/none", vec![]);
        assert_eq!(txn(&store, &absent).await, Outcome::Conflict);
    });
}

#[test]
fn a_malformed_txn_is_refused_without_a_request() {
    let cluster = Arc::new(EtcdCluster::new(1));
    let config = config(&cluster, "/meshd/malformed/");
    let shared = cluster.clone();
    run(&cluster, move || async move {
        let store = connect(&config).await;
        // With etcd gone, any request would fail or time out: an answer
        // now can only come from the store itself.
        tokio::task::spawn_blocking(move || shared.stop_member(0))
            .await
            .unwrap();
        let malformed = Txn::new().put("a", b"1".to_vec()).delete("a");
        assert_eq!(txn(&store, &malformed).await, Outcome::Malformed);
        let err = store.txn(&claim("a", "1")).await.unwrap_err();
        assert!(err.is_transient(), "{err}");
    });
}

#[test]
fn leased_keys_vanish_when_their_servers_lease_ends_and_the_others_stay() {
    let cluster = EtcdCluster::new(1);
    let config = config(&cluster, "/meshd/lease/");
    run(&cluster, move || async move {
        let (a, b, c) = (
            connect(&config).await,
            connect(&config).await,
            connect(&config).await,
        );
        assert_ne!(a.lease(), b.lease());
        let announce = |node: &str, server: &str| {
            Txn::new()
                .put_leased(format!("presence/{node}"), server.as_bytes().to_vec())
                .put(format!("nodes/{node}"), b"{}".to_vec())
        };
        txn(&a, &announce("a", "rv1")).await;
        txn(&b, &announce("b", "rv2")).await;
        txn(&c, &announce("c", "rv3")).await;

        // A clean stop revokes: its keys are gone when it returns.
        c.revoke_lease().await.unwrap();
        assert_eq!(get(&b, "presence/c").await, None);

        // A crash stops the renewals: its keys go a TTL later.
        drop(a);
        let end = Instant::now() + CHANGE_DEADLINE;
        while get(&b, "presence/a").await.is_some() {
            assert!(Instant::now() < end, "presence/a outlives its lease");
            sleep(RETRY).await;
        }
        for key in ["presence/b", "nodes/a", "nodes/b", "nodes/c"] {
            assert!(get(&b, key).await.is_some(), "{key} stays");
        }
        assert!(!*b.lease_lost().borrow(), "a renewed lease is not lost");
    });
}

#[test]
fn a_server_whose_lease_etcd_dropped_is_told_and_takes_a_new_one() {
    let cluster = Arc::new(EtcdCluster::new(1));
    let config = config(&cluster, "/meshd/lost/");
    let shared = cluster.clone();
    run(&cluster, move || async move {
        let mut store = connect(&config).await;
        let mut lost = store.lease_lost();
        let old = store.lease();
        txn(
            &store,
            &Txn::new().put_leased("presence/x", b"rv1".to_vec()),
        )
        .await;
        let revoke = format!("{:x}", old.0);
        tokio::task::spawn_blocking(move || shared.etcdctl(&["lease", "revoke", &revoke]))
            .await
            .unwrap()
            .unwrap();
        timeout(CHANGE_DEADLINE, lost.wait_for(|lost| *lost))
            .await
            .expect("the loss is noticed within the deadline")
            .unwrap();
        assert_eq!(get(&store, "presence/x").await, None);

        store.renew_lease().await.unwrap();
        assert_ne!(store.lease(), old);
        assert!(!*lost.borrow_and_update(), "a fresh lease is not lost");
        txn(
            &store,
            &Txn::new().put_leased("presence/x", b"rv1".to_vec()),
        )
        .await;
        assert!(get(&store, "presence/x").await.is_some());
    });
}

#[test]
fn a_watch_sees_puts_and_deletes_in_order_with_the_prefix_stripped() {
    let cluster = EtcdCluster::new(1);
    let config = config(&cluster, "/meshd/watch/");
    run(&cluster, move || async move {
        let store = connect(&config).await;
        txn(&store, &claim("names/old", "x")).await;
        let (loaded, at) = store.load().await.unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].key, "names/old");
        let mut watch = store.watch(at).await.unwrap();

        let Outcome::Committed { revision: r1 } = txn(&store, &claim("nodes/a", "1")).await else {
            panic!("commits")
        };
        let both = claim("nodes/b", "2").delete("names/old");
        let Outcome::Committed { revision: r2 } = txn(&store, &both).await else {
            panic!("commits")
        };
        let Outcome::Committed { revision: r3 } = txn(&store, &Txn::new().delete("nodes/a")).await
        else {
            panic!("commits")
        };
        let put = |key: &str, value: &str, revision| {
            Event::Put(KeyValue {
                key: key.into(),
                value: value.as_bytes().to_vec(),
                revision,
            })
        };
        let delete = |key: &str, revision| Event::Delete {
            key: key.into(),
            revision,
        };
        assert_eq!(
            events_until(&mut watch, r3).await,
            [
                put("nodes/a", "1", r1),
                put("nodes/b", "2", r2),
                delete("names/old", r2),
                delete("nodes/a", r3),
            ]
        );
    });
}

#[test]
fn two_meshes_on_one_etcd_never_see_each_other() {
    let cluster = EtcdCluster::new(1);
    // "/meshd/a/" is a prefix of neither "/meshd/ab/" nor "/meshd/a".
    let (one, two) = (
        config(&cluster, "/meshd/a/"),
        config(&cluster, "/meshd/ab/"),
    );
    run(&cluster, move || async move {
        let (a, b) = (connect(&one).await, connect(&two).await);
        let (_, at) = a.load().await.unwrap();
        let mut watch_a = a.watch(at).await.unwrap();
        let mut watch_b = b.watch(at).await.unwrap();

        // The same key in both meshes: two claims, both commit.
        assert!(matches!(
            txn(&a, &claim("addrs/1", "mesh-a")).await,
            Outcome::Committed { .. }
        ));
        assert!(matches!(
            txn(&b, &claim("addrs/1", "mesh-b")).await,
            Outcome::Committed { .. }
        ));
        txn(&b, &Txn::new().put("nodes/only-b", vec![])).await;
        let Outcome::Committed { revision: last } =
            txn(&a, &Txn::new().put("nodes/only-a", vec![])).await
        else {
            panic!("commits")
        };

        let (in_a, _) = a.load().await.unwrap();
        let (in_b, _) = b.load().await.unwrap();
        let keys = |kvs: &[KeyValue]| kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>();
        assert_eq!(keys(&in_a), ["addrs/1", "nodes/only-a"]);
        assert_eq!(keys(&in_b), ["addrs/1", "nodes/only-b"]);
        assert_eq!(in_a[0].value, b"mesh-a");
        assert_eq!(get(&b, "nodes/only-a").await, None);

        let seen_a: Vec<String> = events_until(&mut watch_a, last)
            .await
            .iter()
            .map(|e| e.key().to_owned())
            .collect();
        assert_eq!(seen_a, ["addrs/1", "nodes/only-a"]);
        // b's watch has seen its own two writes and nothing of a's, up to
        // a later write of its own.
        let Outcome::Committed { revision: marker } =
            txn(&b, &Txn::new().put("marker", vec![])).await
        else {
            panic!("commits")
        };
        let seen_b: Vec<String> = events_until(&mut watch_b, marker)
            .await
            .iter()
            .map(|e| e.key().to_owned())
            .collect();
        assert_eq!(seen_b, ["addrs/1", "nodes/only-b", "marker"]);
    });
}

/// One step of the script that runs on both stores.
enum Step {
    Run(Txn),
    /// `then`, if `key` was not written since step `since` committed.
    Unchanged {
        key: &'static str,
        since: usize,
        then: Txn,
    },
}

fn script() -> Vec<Step> {
    use Step::{Run, Unchanged};
    vec![
        Run(claim("addrs/100.72.0.5", "node-a")),
        Run(claim("addrs/100.72.0.5", "node-b")),
        Run(Txn::new().put("tokens/t", b"uses=0".to_vec())),
        Unchanged {
            key: "tokens/t",
            since: 2,
            then: Txn::new().put("tokens/t", b"uses=1".to_vec()),
        },
        // Stale: step 3 wrote it since.
        Unchanged {
            key: "tokens/t",
            since: 2,
            then: Txn::new().put("tokens/t", b"uses=1".to_vec()),
        },
        // Absent keys never match a revision.
        Unchanged {
            key: "names/none",
            since: 2,
            then: Txn::new().put("names/none", vec![]),
        },
        Run(Txn::new().put("a", b"1".to_vec()).delete("a")),
        Run(Txn::new()
            .put_leased("presence/a", b"rv1".to_vec())
            .put("nodes/a", b"{}".to_vec())),
        Run(claim("names/web", "node-a").delete("addrs/100.72.0.5")),
        // Compares only: commits at the current revision.
        Run(Txn::new().absent("nothing")),
        // A failed compare writes nothing.
        Run(claim("names/web", "node-b").put("addrs/100.72.0.9", vec![])),
        // A delete of an absent key beside a write.
        Run(Txn::new()
            .put("nodes/b", b"{}".to_vec())
            .delete("nodes/gone")),
    ]
}

/// The revision that step `since` committed at.
fn committed_at(outcomes: &[Outcome], since: usize) -> Revision {
    match outcomes.get(since) {
        Some(Outcome::Committed { revision }) => *revision,
        other => panic!("the script's step {since} commits, not {other:?}"),
    }
}

fn resolve(step: &Step, outcomes: &[Outcome]) -> Txn {
    match step {
        Step::Run(txn) => txn.clone(),
        Step::Unchanged { key, since, then } => {
            let mut txn = Txn::new().unchanged(*key, committed_at(outcomes, *since));
            txn.ops.clone_from(&then.ops);
            txn
        }
    }
}

/// Revisions counted from `base`, so two stores' histories compare.
fn relative_outcome(outcome: Outcome, base: Revision) -> Outcome {
    match outcome {
        Outcome::Committed { revision } => Outcome::Committed {
            revision: revision - base,
        },
        Outcome::Conflict | Outcome::Malformed | Outcome::Unavailable => outcome,
    }
}

fn relative_kv(kv: KeyValue, base: Revision) -> KeyValue {
    KeyValue {
        revision: kv.revision - base,
        ..kv
    }
}

fn relative_event(event: Event, base: Revision) -> Event {
    match event {
        Event::Put(kv) => Event::Put(relative_kv(kv, base)),
        Event::Delete { key, revision } => Event::Delete {
            key,
            revision: revision - base,
        },
    }
}

#[test]
fn the_same_script_gives_the_same_outcomes_on_etcd_and_in_memory() {
    let memory_lease = LeaseId(1);
    let mut memory = MemoryKv::new();
    let mut expected = Vec::new();
    for step in script() {
        let txn = resolve(&step, &expected);
        expected.push(memory.txn(&txn, memory_lease));
    }
    memory.expire(memory_lease);
    let expected_state = memory.range("");
    let expected_events = memory.events_after(0).to_vec();

    let cluster = EtcdCluster::new(1);
    let config = config(&cluster, "/meshd/script/");
    run(&cluster, move || async move {
        let store = connect(&config).await;
        let reader = connect(&config).await;
        let (_, base) = reader.load().await.unwrap();
        let mut watch = reader.watch(base).await.unwrap();
        let mut outcomes = Vec::new();
        for step in script() {
            let txn = resolve(&step, &outcomes);
            outcomes.push(store.txn(&txn).await.unwrap());
        }
        store.revoke_lease().await.unwrap();
        let (state, last) = reader.load().await.unwrap();

        let relative: Vec<Outcome> = outcomes
            .into_iter()
            .map(|o| relative_outcome(o, base))
            .collect();
        assert_eq!(relative, expected);
        let state: Vec<KeyValue> = state.into_iter().map(|kv| relative_kv(kv, base)).collect();
        assert_eq!(state, expected_state);
        let events: Vec<Event> = events_until(&mut watch, last)
            .await
            .into_iter()
            .map(|e| relative_event(e, base))
            .collect();
        assert_eq!(events, expected_events);
    });
}

#[test]
fn a_watch_from_before_a_compaction_says_so() {
    let cluster = Arc::new(EtcdCluster::new(1));
    let config = config(&cluster, "/meshd/compacted/");
    let shared = cluster.clone();
    run(&cluster, move || async move {
        let store = connect(&config).await;
        let (_, before) = store.load().await.unwrap();
        let mut last = before;
        for i in 0..3 {
            if let Outcome::Committed { revision } =
                txn(&store, &Txn::new().put(format!("k{i}"), vec![])).await
            {
                last = revision;
            }
        }
        let compact = last.to_string();
        tokio::task::spawn_blocking(move || shared.etcdctl(&["compact", &compact]))
            .await
            .unwrap()
            .unwrap();
        let mut watch = store.watch(before).await.unwrap();
        match timeout(CHANGE_DEADLINE, watch.recv()).await.unwrap() {
            Some(WatchItem::Compacted { revision }) => assert_eq!(revision, last),
            other => panic!("a watch from a compacted revision says so, not {other:?}"),
        }
        // A watch from the compaction on works.
        let mut watch = store.watch(last).await.unwrap();
        let Outcome::Committed { revision } = txn(&store, &Txn::new().put("after", vec![])).await
        else {
            panic!("commits")
        };
        let events = events_until(&mut watch, revision).await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].key(), "after");
    });
}

#[test]
fn when_the_leader_of_three_stops_writes_resume_after_the_election_and_the_watch_loses_nothing() {
    const KEYS: usize = 20;
    const STOP_AFTER: usize = 5;
    let cluster = Arc::new(EtcdCluster::new(3));
    let mut config = config(&cluster, "/meshd/failover/");
    config.lease_ttl = Duration::from_secs(10);
    let shared = cluster.clone();
    let stopped = run_failover(&cluster, shared, config, KEYS, STOP_AFTER);
    let leader = cluster.leader();
    assert_ne!(leader, stopped, "a new leader was elected");
}

fn run_failover(
    cluster: &EtcdCluster,
    shared: Arc<EtcdCluster>,
    config: EtcdConfig,
    keys: usize,
    stop_after: usize,
) -> usize {
    let (tx, rx) = std::sync::mpsc::channel();
    run(cluster, move || async move {
        let writer = connect(&config).await;
        let reader = connect(&config).await;
        let (_, base) = reader.load().await.unwrap();
        let mut watch = reader.watch(base).await.unwrap();
        let mut last = base;
        for i in 0..keys {
            if i == stop_after {
                let shared = shared.clone();
                let stopped = tokio::task::spawn_blocking(move || {
                    let leader = shared.leader();
                    shared.stop_member(leader);
                    leader
                })
                .await
                .unwrap();
                tx.send(stopped).unwrap();
            }
            last = write_until_committed(&writer, &format!("k{i:02}"), last).await;
        }

        let events = events_until(&mut watch, last).await;
        let keys_seen: Vec<String> = events.iter().map(|e| e.key().to_owned()).collect();
        let expected: Vec<String> = (0..keys).map(|i| format!("k{i:02}")).collect();
        assert_eq!(keys_seen, expected, "every write seen once, in order");
        assert!(
            events.windows(2).all(|w| w[0].revision() < w[1].revision()),
            "revisions increase: {events:?}"
        );
    });
    rx.recv().expect("the leader was stopped")
}

/// Claims `key` until etcd says it is held; returns the revision of the
/// key. A claim whose answer was lost may have committed: the retry then
/// conflicts, and the key's own revision says when it was written.
async fn write_until_committed(store: &EtcdStore, key: &str, after: Revision) -> Revision {
    let end = Instant::now() + CHANGE_DEADLINE;
    let mut failures: Vec<String> = Vec::new();
    loop {
        match store.txn(&claim(key, "v")).await {
            Ok(Outcome::Committed { revision }) => {
                if !failures.is_empty() {
                    eprintln!(
                        "{key} committed after {} failures: {failures:?}",
                        failures.len()
                    );
                }
                return revision;
            }
            Ok(Outcome::Conflict) => {
                let held = get(store, key)
                    .await
                    .expect("a conflicting claim's key exists");
                assert!(
                    held.revision > after,
                    "{key} was written after the one before"
                );
                return held.revision;
            }
            Ok(Outcome::Malformed) => panic!("a claim is well formed"),
            Ok(Outcome::Unavailable) => panic!("the store answers errors, not this"),
            Err(e) => {
                assert!(
                    e.is_transient(),
                    "only transient failures during an election: {e}"
                );
                assert!(
                    Instant::now() < end,
                    "{key} not written within {CHANGE_DEADLINE:?}: {failures:?}"
                );
                failures.push(e.to_string());
                sleep(RETRY).await;
            }
        }
    }
}

#[test]
fn a_bad_config_is_refused_at_once_and_an_unreachable_etcd_within_the_timeout() {
    let cluster = EtcdCluster::new(1);
    let good = config(&cluster, "/meshd/bad/");
    run(&cluster, move || async move {
        let mut none = good.clone();
        none.endpoints.clear();
        let err = EtcdStore::connect(&none).await.unwrap_err();
        assert!(
            matches!(err, EtcdError::Config(ConfigError::NoEndpoints)),
            "{err}"
        );
        assert!(err.to_string().contains("etcd-endpoints"), "{err}");

        let mut no_slash = good.clone();
        no_slash.prefix = "/meshd/bad".into();
        let err = EtcdStore::connect(&no_slash).await.unwrap_err();
        assert!(err.to_string().contains("key-prefix"), "{err}");
        assert!(err.to_string().contains("/meshd/bad"), "{err}");

        // Nothing listens on port 1 in the cluster's namespace.
        let mut unreachable = good.clone();
        unreachable.endpoints = vec!["http://127.0.0.1:1".into()];
        let bound = unreachable.request_timeout + unreachable.dial_timeout + Duration::from_secs(5);
        let err = timeout(bound, EtcdStore::connect(&unreachable))
            .await
            .unwrap_or_else(|_| panic!("connect gives up within {bound:?}"))
            .unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(
            err.to_string().contains("http://127.0.0.1:1"),
            "names the endpoint: {err}"
        );
        eprintln!("an unreachable etcd: {err}");
    });
}
