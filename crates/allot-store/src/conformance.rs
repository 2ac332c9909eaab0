//! The store conformance suite, shared by every backend (feature
//! `conformance`).
//!
//! Every test is written once here, generic over the backend, and
//! instantiated for a backend by [`conformance_tests!`](crate::conformance_tests),
//! which generates one `#[tokio::test]` per test of the suite in the module
//! where it is invoked. A backend outside this crate (PostgreSQL, etcd) runs
//! exactly the same list as the in-crate ones, so adding a test here adds it
//! to every backend.
//!
//! A backend is described by an async factory `make(revisions, events)`
//! returning a fresh, empty store retaining that much history (see
//! [`crate::MemoryStore::with_history_limits`]) together with a guard value
//! that keeps whatever the store needs alive (a temporary directory, a
//! database schema) until the test ends.
//!
//! Lease tests take their TTL from the instantiation: the memory backend runs
//! them on tokio's paused clock (long TTLs, no real waiting), durable
//! backends on the real clock with short TTLs.
//!
//! ```ignore
//! mod memory {
//!     async fn make(revisions: u64, events: u64) -> (allot_store::MemoryStore, ()) {
//!         (allot_store::MemoryStore::with_history_limits(revisions, events), ())
//!     }
//!     allot_store::conformance_tests!(
//!         make = make,
//!         lease_ttl = std::time::Duration::from_secs(10),
//!         timed = #[tokio::test(start_paused = true)],
//!     );
//! }
//! ```
//!
//! The invoking crate needs `tokio` (with the `macros` and `rt-multi-thread`
//! features) among its (dev-)dependencies, as the generated tests use
//! `#[tokio::test]`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{
    prefix_end, Compare, Event, EventKind, KeyValue, Op, OpResult, Prefixes, Revision, Store,
    StoreError, Txn, WatchStream,
};
use futures::StreamExt;
use tokio::time::timeout;

/// Longest wait for something that should happen promptly.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The default bound on retained events, passed to the factory by every test
/// that does not test that bound.
pub const DEFAULT_HISTORY_EVENTS: u64 = 1_000_000;

/// Generates the whole conformance suite for one backend, as `#[tokio::test]`
/// functions in the invoking module.
///
/// - `make`: an async factory `Fn(revisions: u64, events: u64) -> impl
///   Future<Output = (S, G)>` (an `async fn` path or a closure returning an
///   async block), where `S: Store + Clone` and `G` is kept alive for the
///   whole test;
/// - `lease_ttl`: the TTL lease tests use (they wait a few TTLs);
/// - `timed`: the test attribute of the lease tests, for example
///   `#[tokio::test(start_paused = true)]` for a backend on tokio's clock;
/// - optionally `one_change_per_key_per_revision = true`, for a backend on a
///   store that records at most one change per key in one revision (etcd
///   refuses transactions writing a key twice, so its backend commits their
///   net effect): it leaves out
///   [`a_key_written_twice_in_one_txn_shows_each_write`], the one test of
///   the intermediate writes' events and of the `create_revision` and
///   `version` of a key deleted and re-created by one transaction. Every
///   other assertion, including the results of such transactions, still
///   runs.
///
/// Other tests run on a two-worker multi-threaded runtime.
#[macro_export]
macro_rules! conformance_tests {
    (make = $make:expr, lease_ttl = $ttl:expr, timed = #[$timed:meta] $(,)?) => {
        $crate::conformance_tests!(
            @all ($make) ($ttl) (#[$timed])
            sequenced: [a_key_written_twice_in_one_txn_shows_each_write]
        );
    };
    (
        make = $make:expr,
        lease_ttl = $ttl:expr,
        timed = #[$timed:meta],
        one_change_per_key_per_revision = true $(,)?
    ) => {
        $crate::conformance_tests!(@all ($make) ($ttl) (#[$timed]) sequenced: []);
    };
    (@all ($make:expr) ($ttl:expr) (#[$timed:meta]) sequenced: [$($sequenced:ident),*]) => {
        $crate::conformance_tests!(
            @expand ($make) ($ttl) (#[$timed])
            plain: [
                $($sequenced,)*
                revisions_start_at_one_and_grow_once_per_writing_txn,
                keys_track_create_mod_revision_and_version,
                get_and_range_with_limit_and_prefix,
                compares_on_missing_keys,
                compare_and_swap_over_several_keys,
                failed_compare_changes_nothing,
                gets_inside_a_txn_see_earlier_writes,
                delete_range_deletes_and_reports,
                invalid_put_changes_nothing,
                concurrent_cas_increments_lose_no_update,
                put_with_unknown_lease_fails_and_changes_nothing,
                watch_from_zero_sees_only_new_changes,
                watch_from_past_revision_replays_exactly,
                watch_filters_by_prefix,
                watch_prefixes_follows_several_in_one_order,
                watch_each_follows_each_prefix_in_order,
                watch_resume_after_drop_misses_and_repeats_nothing,
                watch_reports_delete_events,
                watch_revision_bounds_and_compaction,
                compaction_keeps_current_values,
                history_is_compacted_automatically,
                lagging_watcher_catches_up_from_history,
                watchers_started_during_writes_see_no_gap,
                watch_ends_when_store_is_dropped,
            ],
            bounded: [
                history_is_bounded_by_events_too,
                a_transaction_beyond_the_event_bound_stays_watchable,
            ],
            timed: [
                lease_expiry_deletes_keys_in_one_revision,
                lease_keep_alive_extends,
                lease_revoke_deletes_keys,
                expired_lease_cannot_take_keys,
                a_live_lease_does_not_keep_the_store_alive,
            ],
        );
    };
    (
        @expand ($make:expr) ($ttl:expr) (#[$timed:meta])
        plain: [$($plain:ident),* $(,)?],
        bounded: [$($bounded:ident),* $(,)?],
        timed: [$($timed_test:ident),* $(,)?] $(,)?
    ) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $plain() {
                let make = $make;
                $crate::conformance::$plain(move |history| {
                    make(history, $crate::conformance::DEFAULT_HISTORY_EVENTS)
                })
                .await;
            }
        )*
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $bounded() {
                let make = $make;
                $crate::conformance::$bounded(move |revisions, events| make(revisions, events))
                    .await;
            }
        )*
        $(
            #[$timed]
            async fn $timed_test() {
                let make = $make;
                $crate::conformance::$timed_test(
                    move |history| make(history, $crate::conformance::DEFAULT_HISTORY_EVENTS),
                    $ttl,
                )
                .await;
            }
        )*
    };
}

// ---------------------------------------------------------------- helpers

/// Puts one key in its own transaction and returns the revision of the write.
pub async fn put<S: Store>(store: &S, key: &str, value: &str) -> Revision {
    let resp = store
        .txn(Txn::new().then(Op::put(key, value)))
        .await
        .unwrap();
    assert!(resp.succeeded);
    resp.revision
}

/// The current value of `key` as a string, if it exists.
pub async fn value<S: Store>(store: &S, key: &str) -> Option<String> {
    store
        .get(key.as_bytes())
        .await
        .unwrap()
        .map(|kv| String::from_utf8(kv.value).unwrap())
}

/// The next event of a watch, failing the test if none comes within [`PATIENCE`].
pub async fn next_event(stream: &mut WatchStream) -> Event {
    timeout(PATIENCE, stream.next())
        .await
        .expect("timed out waiting for a watch event")
        .expect("watch stream ended")
        .expect("watch stream failed")
}

/// The next `n` events of a watch.
pub async fn next_events(stream: &mut WatchStream, n: usize) -> Vec<Event> {
    let mut events = Vec::with_capacity(n);
    for _ in 0..n {
        events.push(next_event(stream).await);
    }
    events
}

/// Fails the test if the watch yields anything within 100 ms.
pub async fn assert_quiet(stream: &mut WatchStream) {
    if let Ok(item) = timeout(Duration::from_millis(100), stream.next()).await {
        panic!("unexpected watch item {item:?}");
    }
}

/// The key of an event as a string.
pub fn key_of(event: &Event) -> String {
    String::from_utf8(event.kv.key.clone()).unwrap()
}

/// (kind, key, revision) of each event: what most watch tests compare.
pub fn summary(events: &[Event]) -> Vec<(EventKind, String, Revision)> {
    events
        .iter()
        .map(|e| (e.kind, key_of(e), e.revision()))
        .collect()
}

// ---------------------------------------------------------------- kv and txn

pub async fn revisions_start_at_one_and_grow_once_per_writing_txn<
    S: Store,
    G,
    F: Future<Output = (S, G)>,
>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    assert_eq!(s.current_revision().await.unwrap(), 1);

    assert_eq!(put(&s, "a", "1").await, 2);
    assert_eq!(s.current_revision().await.unwrap(), 2);

    // A delete that removes nothing does not write.
    let resp = s.txn(Txn::new().then(Op::delete("missing"))).await.unwrap();
    assert_eq!(resp.revision, 2);
    assert_eq!(resp.results, vec![OpResult::Delete(0)]);
    assert_eq!(s.current_revision().await.unwrap(), 2);

    // Neither does a read-only transaction, nor a failed compare without
    // failure operations.
    let resp = s.txn(Txn::new().then(Op::get("a"))).await.unwrap();
    assert_eq!(resp.revision, 2);
    let resp = s
        .txn(
            Txn::new()
                .when(Compare::absent("a"))
                .then(Op::put("b", "x")),
        )
        .await
        .unwrap();
    assert!(!resp.succeeded);
    assert_eq!(resp.revision, 2);
    assert_eq!(s.current_revision().await.unwrap(), 2);

    // Several writes in one transaction share one revision.
    let resp = s
        .txn(
            Txn::new()
                .then(Op::put("b", "1"))
                .then(Op::put("c", "1"))
                .then(Op::delete("a")),
        )
        .await
        .unwrap();
    assert_eq!(resp.revision, 3);
    for key in ["b", "c"] {
        assert_eq!(
            s.get(key.as_bytes()).await.unwrap().unwrap().mod_revision,
            3
        );
    }
    assert_eq!(s.current_revision().await.unwrap(), 3);

    let resp = s.txn(Txn::new().then(Op::delete("b"))).await.unwrap();
    assert_eq!(
        (resp.revision, resp.results),
        (4, vec![OpResult::Delete(1)])
    );
    assert_eq!(s.current_revision().await.unwrap(), 4);
}

pub async fn keys_track_create_mod_revision_and_version<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    put(&s, "k", "v1").await;
    let kv = s.get(b"k").await.unwrap().unwrap();
    assert_eq!(
        kv,
        KeyValue {
            key: b"k".to_vec(),
            value: b"v1".to_vec(),
            create_revision: 2,
            mod_revision: 2,
            version: 1,
            lease: 0,
        }
    );
    put(&s, "other", "x").await;
    put(&s, "k", "v2").await;
    let kv = s.get(b"k").await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 4, 2));
    assert_eq!(kv.value, b"v2");

    s.txn(Txn::new().then(Op::delete("k"))).await.unwrap();
    assert_eq!(s.get(b"k").await.unwrap(), None);
    // A re-created key starts over.
    put(&s, "k", "v3").await;
    let kv = s.get(b"k").await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (6, 6, 1));
}

pub async fn get_and_range_with_limit_and_prefix<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    for key in ["c", "b/3", "a", "b/1", "b/2", "b0"] {
        put(&s, key, key).await;
    }
    let keys = |r: &crate::RangeResult| -> Vec<String> {
        r.kvs
            .iter()
            .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
            .collect()
    };
    assert_eq!(s.get(b"zz").await.unwrap(), None);
    assert_eq!(value(&s, "b/2").await.as_deref(), Some("b/2"));

    let all = s.range(b"", b"", 0).await.unwrap();
    assert_eq!(keys(&all), ["a", "b/1", "b/2", "b/3", "b0", "c"]);
    assert!(!all.more);
    assert_eq!(all.revision, 7);

    let prefixed = s.range(b"b/", &prefix_end(b"b/"), 0).await.unwrap();
    assert_eq!(keys(&prefixed), ["b/1", "b/2", "b/3"]);

    let limited = s.range(b"b/", &prefix_end(b"b/"), 2).await.unwrap();
    assert_eq!(keys(&limited), ["b/1", "b/2"]);
    assert!(limited.more);
    let exact = s.range(b"b/", &prefix_end(b"b/"), 3).await.unwrap();
    assert_eq!(keys(&exact), ["b/1", "b/2", "b/3"]);
    assert!(!exact.more);

    // Bounds: start inclusive, end exclusive, empty end unbounded.
    assert_eq!(
        keys(&s.range(b"b/2", b"c", 0).await.unwrap()),
        ["b/2", "b/3", "b0"]
    );
    assert_eq!(keys(&s.range(b"b0", b"", 0).await.unwrap()), ["b0", "c"]);
    let inverted = s.range(b"c", b"a", 0).await.unwrap();
    assert!(inverted.kvs.is_empty() && !inverted.more);
    assert!(s.range(b"d", b"", 0).await.unwrap().kvs.is_empty());
}

/// Whether a transaction with this single compare succeeds.
pub async fn holds<S: Store>(s: &S, c: Compare) -> bool {
    s.txn(Txn::new().when(c)).await.unwrap().succeeded
}

pub async fn compares_on_missing_keys<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    assert!(holds(&s, Compare::version("m", 0)).await);
    assert!(holds(&s, Compare::mod_revision("m", 0)).await);
    assert!(holds(&s, Compare::create_revision("m", 0)).await);
    assert!(!holds(&s, Compare::value("m", "")).await);
    assert!(!holds(&s, Compare::value("m", "x")).await);

    put(&s, "m", "").await;
    assert!(!holds(&s, Compare::absent("m")).await);
    assert!(holds(&s, Compare::value("m", "")).await);
    assert!(holds(&s, Compare::version("m", 1)).await);
    assert!(holds(&s, Compare::mod_revision("m", 2)).await);
    assert!(holds(&s, Compare::create_revision("m", 2)).await);
    assert!(!holds(&s, Compare::mod_revision("m", 3)).await);
}

pub async fn compare_and_swap_over_several_keys<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    let r1 = put(&s, "x", "1").await;
    let r2 = put(&s, "y", "1").await;

    let swap = |x_rev: Revision, y_rev: Revision| {
        Txn::new()
            .when(Compare::mod_revision("x", x_rev))
            .when(Compare::mod_revision("y", y_rev))
            .when(Compare::absent("z"))
            .then(Op::put("x", "2"))
            .then(Op::put("y", "2"))
            .then(Op::put("z", "2"))
            .otherwise(Op::get("x"))
            .otherwise(Op::get("y"))
    };

    // One stale compare among several: the failure branch runs.
    let resp = s.txn(swap(r1, r1)).await.unwrap();
    assert!(!resp.succeeded);
    assert_eq!(resp.revision, r2);
    let got: Vec<_> = resp
        .results
        .iter()
        .map(|r| match r {
            OpResult::Get(Some(kv)) => (kv.key.clone(), kv.mod_revision),
            other => panic!("expected a Get result, got {other:?}"),
        })
        .collect();
    assert_eq!(got, vec![(b"x".to_vec(), r1), (b"y".to_vec(), r2)]);

    // All compares hold: every write lands at one revision.
    let resp = s.txn(swap(r1, r2)).await.unwrap();
    assert!(resp.succeeded);
    assert_eq!(resp.results, vec![OpResult::Put; 3]);
    for key in ["x", "y", "z"] {
        let kv = s.get(key.as_bytes()).await.unwrap().unwrap();
        assert_eq!(
            (kv.value.as_slice(), kv.mod_revision),
            (&b"2"[..], resp.revision)
        );
    }

    // Value and version compares.
    let resp = s
        .txn(
            Txn::new()
                .when(Compare::value("x", "2"))
                .when(Compare::version("y", 2))
                .then(Op::put("x", "3")),
        )
        .await
        .unwrap();
    assert!(resp.succeeded);
    assert_eq!(value(&s, "x").await.as_deref(), Some("3"));
}

pub async fn failed_compare_changes_nothing<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    put(&s, "a", "1").await;
    put(&s, "b", "1").await;
    let before = s.range(b"", b"", 0).await.unwrap();
    let resp = s
        .txn(
            Txn::new()
                .when(Compare::value("a", "1"))
                .when(Compare::value("b", "nope"))
                .then(Op::put("a", "2"))
                .then(Op::delete("b"))
                .then(Op::put("c", "2")),
        )
        .await
        .unwrap();
    assert!(!resp.succeeded);
    assert!(resp.results.is_empty());
    assert_eq!(s.range(b"", b"", 0).await.unwrap(), before);
    assert_eq!(s.current_revision().await.unwrap(), before.revision);
}

pub async fn gets_inside_a_txn_see_earlier_writes<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    put(&s, "k", "old").await;
    let resp = s
        .txn(
            Txn::new()
                .then(Op::get("k"))
                .then(Op::put("k", "new"))
                .then(Op::get("k"))
                .then(Op::delete("k"))
                .then(Op::get("k"))
                .then(Op::put("k", "again"))
                .then(Op::get("k")),
        )
        .await
        .unwrap();
    assert_eq!(resp.revision, 3);
    // (value, create_revision, mod_revision, version) of each Get.
    type Seen = Option<(Vec<u8>, Revision, Revision, u64)>;
    let gets: Vec<Seen> = resp
        .results
        .iter()
        .filter_map(|r| match r {
            OpResult::Get(kv) => Some(kv.as_ref().map(|kv| {
                (
                    kv.value.clone(),
                    kv.create_revision,
                    kv.mod_revision,
                    kv.version,
                )
            })),
            _ => None,
        })
        .collect();
    assert_eq!(
        gets,
        vec![
            Some((b"old".to_vec(), 2, 2, 1)),
            Some((b"new".to_vec(), 2, 3, 2)),
            None,
            Some((b"again".to_vec(), 3, 3, 1)),
        ]
    );
    assert_eq!(value(&s, "k").await.as_deref(), Some("again"));
}

pub async fn delete_range_deletes_and_reports<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    for key in ["p/1", "p/2", "p/3", "q"] {
        put(&s, key, "v").await;
    }
    let mut watch = s.watch(b"", 0).await.unwrap();
    // A key put earlier in the same transaction is deleted too.
    let resp = s
        .txn(
            Txn::new()
                .then(Op::put("p/4", "v"))
                .then(Op::delete_prefix("p/")),
        )
        .await
        .unwrap();
    assert_eq!(resp.results, vec![OpResult::Put, OpResult::Delete(4)]);
    assert_eq!(resp.revision, 6);
    let remaining = s.range(b"", b"", 0).await.unwrap();
    assert_eq!(remaining.kvs.len(), 1);
    assert_eq!(remaining.kvs[0].key, b"q");

    // The keys that existed before are deleted at revision 6 (what the
    // watch shows of p/4, put and deleted by the same transaction, is
    // checked by `a_key_written_twice_in_one_txn_shows_each_write`).
    let mut events = next_events(&mut watch, 3).await;
    while let Ok(item) = timeout(Duration::from_millis(100), watch.next()).await {
        events.push(item.unwrap().unwrap());
    }
    let events = summary(&events);
    assert!(events.iter().all(|(_, _, rev)| *rev == 6), "{events:?}");
    for key in ["p/1", "p/2", "p/3"] {
        assert!(
            events.contains(&(EventKind::Delete, key.to_string(), 6)),
            "{events:?}"
        );
    }

    // Deleting an empty range writes nothing.
    let resp = s
        .txn(Txn::new().then(Op::delete_prefix("p/")))
        .await
        .unwrap();
    assert_eq!(
        (resp.revision, resp.results),
        (6, vec![OpResult::Delete(0)])
    );
    // An empty start and end cover everything.
    let resp = s
        .txn(Txn::new().then(Op::DeleteRange {
            start: vec![],
            end: vec![],
        }))
        .await
        .unwrap();
    assert_eq!(
        (resp.revision, resp.results),
        (7, vec![OpResult::Delete(1)])
    );
    assert!(s.range(b"", b"", 0).await.unwrap().kvs.is_empty());
}

/// Each write of a transaction is a change of its own, even to a key the
/// same transaction already wrote: a re-created key starts over, and the
/// watch shows every write in operation order. (Left out for backends that
/// record one change per key per revision; see the macro.)
pub async fn a_key_written_twice_in_one_txn_shows_each_write<
    S: Store,
    G,
    F: Future<Output = (S, G)>,
>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    put(&s, "k", "old").await;
    let resp = s
        .txn(
            Txn::new()
                .then(Op::put("k", "new"))
                .then(Op::delete("k"))
                .then(Op::put("k", "again")),
        )
        .await
        .unwrap();
    assert_eq!(resp.revision, 3);
    let kv = s.get(b"k").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.version),
        (&b"again"[..], 3, 1)
    );

    for key in ["p/1", "p/2", "p/3", "q"] {
        put(&s, key, "v").await;
    }
    let mut watch = s.watch(b"", 0).await.unwrap();
    let resp = s
        .txn(
            Txn::new()
                .then(Op::put("p/4", "v"))
                .then(Op::delete_prefix("p/")),
        )
        .await
        .unwrap();
    assert_eq!(resp.revision, 8);
    let events = next_events(&mut watch, 5).await;
    let mut expected = vec![(EventKind::Put, "p/4".to_string(), 8)];
    for key in ["p/1", "p/2", "p/3", "p/4"] {
        expected.push((EventKind::Delete, key.to_string(), 8));
    }
    assert_eq!(summary(&events), expected);
    assert_quiet(&mut watch).await;
}

pub async fn invalid_put_changes_nothing<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    let err = s
        .txn(Txn::new().then(Op::put("ok", "1")).then(Op::put("", "x")))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    assert_eq!(s.get(b"ok").await.unwrap(), None);
    assert_eq!(s.current_revision().await.unwrap(), 1);
}

pub async fn concurrent_cas_increments_lose_no_update<
    S: Store + Clone,
    G,
    F: Future<Output = (S, G)>,
>(
    make: impl Fn(u64) -> F,
) {
    const TASKS: usize = 32;
    const INCREMENTS: usize = 50;
    const COUNTERS: usize = 8;
    let (s, _g) = make(100_000).await;
    let start = s.current_revision().await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("counter/{}", t % COUNTERS);
            let mut seen: Option<KeyValue> = s.get(key.as_bytes()).await.unwrap();
            let mut revisions = Vec::new();
            for _ in 0..INCREMENTS {
                loop {
                    let (cmp, next) = match &seen {
                        None => (Compare::absent(&key), 1),
                        Some(kv) => (
                            Compare::mod_revision(&key, kv.mod_revision),
                            std::str::from_utf8(&kv.value)
                                .unwrap()
                                .parse::<u64>()
                                .unwrap()
                                + 1,
                        ),
                    };
                    let resp = s
                        .txn(
                            Txn::new()
                                .when(cmp)
                                .then(Op::put(&key, next.to_string()))
                                .then(Op::get(&key))
                                .otherwise(Op::get(&key)),
                        )
                        .await
                        .unwrap();
                    let current = match resp.results.last() {
                        Some(OpResult::Get(kv)) => kv.clone(),
                        other => panic!("expected a Get result, got {other:?}"),
                    };
                    seen = current;
                    if resp.succeeded {
                        revisions.push(resp.revision);
                        break;
                    }
                }
            }
            revisions
        }));
    }
    let mut all_revisions = HashSet::new();
    for task in tasks {
        for rev in task.await.unwrap() {
            assert!(
                all_revisions.insert(rev),
                "revision {rev} acknowledged twice"
            );
        }
    }
    for c in 0..COUNTERS {
        let expected = (TASKS / COUNTERS * INCREMENTS).to_string();
        assert_eq!(value(&s, &format!("counter/{c}")).await, Some(expected));
    }
    let total = (TASKS * INCREMENTS) as u64;
    assert_eq!(s.current_revision().await.unwrap(), start + total);
    assert_eq!(all_revisions, (start + 1..=start + total).collect());
}

/// Two stores over the same data (two processes sharing one database):
/// compare-and-swap increments of one counter, `tasks` of them alternating
/// between the stores, `each` increments per task, lose no update and
/// share one sequence of revisions.
pub async fn cas_increments_through_two_stores<S: Store + Clone + 'static>(
    a: &S,
    b: &S,
    tasks: usize,
    each: usize,
) {
    let start = a.current_revision().await.unwrap();
    let mut running = Vec::new();
    for t in 0..tasks {
        let s = if t % 2 == 0 { a.clone() } else { b.clone() };
        running.push(tokio::spawn(async move {
            let mut revisions = Vec::new();
            while revisions.len() < each {
                let current = s.get(b"counter").await.unwrap();
                let (cmp, next) = match &current {
                    None => (Compare::absent("counter"), 1),
                    Some(kv) => (
                        Compare::mod_revision("counter", kv.mod_revision),
                        String::from_utf8_lossy(&kv.value).parse::<u64>().unwrap() + 1,
                    ),
                };
                let resp = s
                    .txn(
                        Txn::new()
                            .when(cmp)
                            .then(Op::put("counter", next.to_string())),
                    )
                    .await
                    .unwrap();
                if resp.succeeded {
                    revisions.push(resp.revision);
                }
            }
            revisions
        }));
    }
    let mut all = BTreeSet::new();
    for task in running {
        for rev in task.await.unwrap() {
            assert!(all.insert(rev), "revision {rev} acknowledged twice");
        }
    }
    let total = (tasks * each) as u64;
    assert_eq!(value(b, "counter").await, Some(total.to_string()));
    assert_eq!(all, (start + 1..=start + total).collect());
}

// ---------------------------------------------------------------- leases

pub async fn lease_expiry_deletes_keys_in_one_revision<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
    ttl: Duration,
) {
    let (s, _g) = make(1000).await;
    let lease = s.lease_grant(ttl).await.unwrap();
    assert_ne!(lease, 0);
    let other = s.lease_grant(ttl * 100).await.unwrap();
    assert_ne!(other, lease);
    s.txn(
        Txn::new()
            .then(Op::put_with_lease("l/a", "1", lease))
            .then(Op::put_with_lease("l/b", "1", lease))
            .then(Op::put_with_lease("l/c", "1", other))
            .then(Op::put("plain", "1")),
    )
    .await
    .unwrap();
    assert_eq!(s.get(b"l/a").await.unwrap().unwrap().lease, lease);
    // Re-putting a key without the lease detaches it.
    put(&s, "l/b", "2").await;
    put(&s, "l/d", "2").await;
    s.txn(Txn::new().then(Op::put_with_lease("l/d", "3", lease)))
        .await
        .unwrap();
    let before = s.current_revision().await.unwrap();
    let mut watch = s.watch(b"l/", 0).await.unwrap();

    // No call after this point: the background task must do the expiry.
    let events = next_events(&mut watch, 2).await;
    assert_eq!(
        summary(&events),
        vec![
            (EventKind::Delete, "l/a".to_string(), before + 1),
            (EventKind::Delete, "l/d".to_string(), before + 1),
        ]
    );
    assert_quiet(&mut watch).await;
    assert_eq!(s.current_revision().await.unwrap(), before + 1);
    assert_eq!(s.get(b"l/a").await.unwrap(), None);
    assert_eq!(s.get(b"l/d").await.unwrap(), None);
    assert_eq!(value(&s, "l/b").await.as_deref(), Some("2"));
    assert_eq!(value(&s, "l/c").await.as_deref(), Some("1"));
    assert_eq!(value(&s, "plain").await.as_deref(), Some("1"));
    assert!(
        matches!(s.lease_keep_alive(lease).await, Err(StoreError::LeaseNotFound(id)) if id == lease)
    );
    assert!(s.lease_keep_alive(other).await.is_ok());
}

pub async fn lease_keep_alive_extends<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
    ttl: Duration,
) {
    let (s, _g) = make(1000).await;
    let lease = s.lease_grant(ttl).await.unwrap();
    s.txn(Txn::new().then(Op::put_with_lease("k", "v", lease)))
        .await
        .unwrap();
    for _ in 0..3 {
        tokio::time::sleep(ttl / 2).await;
        assert_eq!(s.lease_keep_alive(lease).await.unwrap(), ttl);
    }
    // Well past the original deadline, the key is still there.
    assert!(s.get(b"k").await.unwrap().is_some());

    // Without keep-alives it goes, and the call that notices reports it.
    tokio::time::sleep(ttl + ttl / 2).await;
    assert_eq!(s.get(b"k").await.unwrap(), None);
    assert!(matches!(
        s.lease_keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

pub async fn lease_revoke_deletes_keys<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
    ttl: Duration,
) {
    let (s, _g) = make(1000).await;
    let lease = s.lease_grant(ttl * 100).await.unwrap();
    s.txn(
        Txn::new()
            .then(Op::put_with_lease("a", "1", lease))
            .then(Op::put_with_lease("b", "1", lease)),
    )
    .await
    .unwrap();
    let before = s.current_revision().await.unwrap();
    let mut watch = s.watch(b"", 0).await.unwrap();
    s.lease_revoke(lease).await.unwrap();
    assert_eq!(s.current_revision().await.unwrap(), before + 1);
    assert!(s.range(b"", b"", 0).await.unwrap().kvs.is_empty());
    let events = next_events(&mut watch, 2).await;
    assert!(events
        .iter()
        .all(|e| e.kind == EventKind::Delete && e.revision() == before + 1));
    assert!(matches!(
        s.lease_revoke(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    assert!(matches!(
        s.lease_keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));

    // A lease without keys revokes without a revision.
    let empty = s.lease_grant(ttl * 100).await.unwrap();
    s.lease_revoke(empty).await.unwrap();
    assert_eq!(s.current_revision().await.unwrap(), before + 1);
}

pub async fn put_with_unknown_lease_fails_and_changes_nothing<
    S: Store,
    G,
    F: Future<Output = (S, G)>,
>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    let err = s
        .txn(
            Txn::new()
                .then(Op::put("x", "1"))
                .then(Op::put_with_lease("y", "1", 424_242)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::LeaseNotFound(424_242)), "{err:?}");
    assert_eq!(s.get(b"x").await.unwrap(), None);
    assert_eq!(s.current_revision().await.unwrap(), 1);
    assert!(matches!(
        s.lease_keep_alive(424_242).await,
        Err(StoreError::LeaseNotFound(424_242))
    ));
    assert!(matches!(
        s.lease_revoke(424_242).await,
        Err(StoreError::LeaseNotFound(424_242))
    ));
    assert!(matches!(
        s.lease_grant(Duration::ZERO).await,
        Err(StoreError::Invalid(_))
    ));
}

pub async fn expired_lease_cannot_take_keys<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
    ttl: Duration,
) {
    let (s, _g) = make(1000).await;
    let lease = s.lease_grant(ttl).await.unwrap();
    let revoked = s.lease_grant(ttl * 100).await.unwrap();
    s.lease_revoke(revoked).await.unwrap();
    tokio::time::sleep(ttl + ttl / 2).await;
    for dead in [lease, revoked] {
        let err = s
            .txn(
                Txn::new()
                    .then(Op::put("x", "1"))
                    .then(Op::put_with_lease("y", "1", dead)),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::LeaseNotFound(id) if id == dead),
            "{err:?}"
        );
    }
    assert!(s.range(b"", b"", 0).await.unwrap().kvs.is_empty());
    assert_eq!(s.current_revision().await.unwrap(), 1);
}

pub async fn a_live_lease_does_not_keep_the_store_alive<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
    ttl: Duration,
) {
    let (s, _g) = make(1000).await;
    let lease = s.lease_grant(ttl).await.unwrap();
    s.txn(Txn::new().then(Op::put_with_lease("k", "v", lease)))
        .await
        .unwrap();
    let mut watch = s.watch(b"", 0).await.unwrap();
    drop(s);
    // Had the expiry task kept the store, the stream would go on (and show
    // the key's deletion at the deadline) instead of ending now.
    let item = timeout(ttl / 2, watch.next())
        .await
        .expect("the store is still alive");
    assert!(
        matches!(item, Some(Err(StoreError::Unavailable(_)))),
        "{item:?}"
    );
}

// ---------------------------------------------------------------- watch

pub async fn watch_from_zero_sees_only_new_changes<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    put(&s, "a", "old").await;
    let mut watch = s.watch(b"", 0).await.unwrap();
    assert_quiet(&mut watch).await;
    let rev = put(&s, "a", "new").await;
    let event = next_event(&mut watch).await;
    assert_eq!(event.kind, EventKind::Put);
    assert_eq!(event.kv, s.get(b"a").await.unwrap().unwrap());
    assert_eq!(event.revision(), rev);
    assert_quiet(&mut watch).await;
}

pub async fn watch_from_past_revision_replays_exactly<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    for i in 0..10 {
        put(&s, &format!("k{i}"), "v").await;
    }
    // Revisions 2..=11 hold k0..k9.
    let mut watch = s.watch(b"", 5).await.unwrap();
    let replayed = next_events(&mut watch, 7).await;
    let expected: Vec<_> = (3..10)
        .map(|i| (EventKind::Put, format!("k{i}"), i as u64 + 2))
        .collect();
    assert_eq!(summary(&replayed), expected);
    assert_quiet(&mut watch).await;
    put(&s, "live", "v").await;
    assert_eq!(key_of(&next_event(&mut watch).await), "live");

    // From 1 on a store whose first write is revision 2: everything.
    let mut watch = s.watch(b"", 1).await.unwrap();
    assert_eq!(next_event(&mut watch).await.revision(), 2);
}

pub async fn watch_filters_by_prefix<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    put(&s, "pool/a", "1").await;
    put(&s, "poolx", "1").await;
    let mut watch = s.watch(b"pool/", 1).await.unwrap();
    s.txn(
        Txn::new()
            .then(Op::put("other", "1"))
            .then(Op::put("pool/b", "1")),
    )
    .await
    .unwrap();
    put(&s, "pool", "1").await;
    put(&s, "pool/c", "1").await;
    let events = next_events(&mut watch, 3).await;
    assert_eq!(
        summary(&events),
        vec![
            (EventKind::Put, "pool/a".to_string(), 2),
            (EventKind::Put, "pool/b".to_string(), 4),
            (EventKind::Put, "pool/c".to_string(), 6),
        ]
    );
    assert_quiet(&mut watch).await;
}

/// Keys under either of two prefixes, as one stream in revision order;
/// keys between them (which a backend watching one covering range sees)
/// and around them are left out, also when replayed and when resumed.
pub async fn watch_prefixes_follows_several_in_one_order<
    S: Store,
    G,
    F: Future<Output = (S, G)>,
>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    let both = Prefixes::new([b"m/".as_slice(), b"e/"]);
    put(&s, "e/1", "1").await; // 2
    put(&s, "k/between", "1").await; // 3
    let mut watch = s.watch_prefixes(&both, 1).await.unwrap();
    s.txn(
        Txn::new()
            .then(Op::put("m/a", "1"))
            .then(Op::put("b/before", "1"))
            .then(Op::put("e/2", "1")),
    )
    .await
    .unwrap(); // 4
    put(&s, "mi/after", "1").await; // 5
    put(&s, "e", "1").await; // 6
    s.txn(Txn::new().then(Op::delete("m/a"))).await.unwrap(); // 7
    let events = next_events(&mut watch, 4).await;
    let expected = vec![
        (EventKind::Put, "e/1".to_string(), 2),
        (EventKind::Put, "e/2".to_string(), 4),
        (EventKind::Put, "m/a".to_string(), 4),
        (EventKind::Delete, "m/a".to_string(), 7),
    ];
    // Revisions in order; within one revision the order of keys is the
    // backend's.
    let in_order = |events: &[Event]| {
        let mut got = summary(events);
        assert!(
            got.windows(2).all(|w| w[0].2 <= w[1].2),
            "not in revision order: {got:?}"
        );
        got.sort_by(|a, b| (a.2, &a.1).cmp(&(b.2, &b.1)));
        got
    };
    assert_eq!(in_order(&events), expected);
    assert_quiet(&mut watch).await;
    // Resumed after the first revision: the rest, nothing twice.
    let mut resumed = s.watch_prefixes(&both, 3).await.unwrap();
    assert_eq!(in_order(&next_events(&mut resumed, 3).await), expected[1..]);
    assert_quiet(&mut resumed).await;
    // No prefix at all: nothing.
    let mut none = s
        .watch_prefixes(&Prefixes::new::<&[u8]>([]), 1)
        .await
        .unwrap();
    assert_quiet(&mut none).await;
}

/// `watch_each`: every change under the prefixes, nothing else, each
/// prefix's changes in revision order (no order across prefixes).
pub async fn watch_each_follows_each_prefix_in_order<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    let both = Prefixes::new([b"t/".as_slice(), b"b/"]);
    let mut watch = s.watch_each(&both, 0).await.unwrap();
    let mut expected = Vec::new();
    for i in 0..5 {
        let rev = s
            .txn(
                Txn::new()
                    .then(Op::put(format!("b/{i}"), "1"))
                    .then(Op::put(format!("k/{i}"), "1"))
                    .then(Op::put("p/x", format!("{i}"))),
            )
            .await
            .unwrap()
            .revision;
        expected.push((EventKind::Put, format!("b/{i}"), rev));
        let rev = put(&s, "t/x", &format!("{i}")).await;
        expected.push((EventKind::Put, "t/x".to_string(), rev));
    }
    let rev = s
        .txn(Txn::new().then(Op::delete("t/x")))
        .await
        .unwrap()
        .revision;
    expected.push((EventKind::Delete, "t/x".to_string(), rev));
    let got = summary(&next_events(&mut watch, expected.len()).await);
    for prefix in ["b/", "t/"] {
        let of = |v: &[(EventKind, String, Revision)]| -> Vec<(EventKind, String, Revision)> {
            v.iter()
                .filter(|e| e.1.starts_with(prefix))
                .cloned()
                .collect()
        };
        assert_eq!(of(&got), of(&expected), "changes under {prefix}");
    }
    assert_quiet(&mut watch).await;
}

pub async fn watch_resume_after_drop_misses_and_repeats_nothing<
    S: Store,
    G,
    F: Future<Output = (S, G)>,
>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    let mut seen = Vec::new();
    let mut watch = s.watch(b"", 0).await.unwrap();
    for i in 0..5 {
        put(&s, &format!("k{i}"), "v").await;
    }
    seen.extend(next_events(&mut watch, 3).await);
    drop(watch);
    for i in 5..9 {
        put(&s, &format!("k{i}"), "v").await;
    }
    let resume_from = seen.last().unwrap().revision() + 1;
    let mut watch = s.watch(b"", resume_from).await.unwrap();
    put(&s, "k9", "v").await;
    seen.extend(next_events(&mut watch, 7).await);
    assert_quiet(&mut watch).await;
    let keys: Vec<String> = seen.iter().map(key_of).collect();
    let expected: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    assert_eq!(keys, expected);
    let revisions: Vec<Revision> = seen.iter().map(Event::revision).collect();
    assert_eq!(revisions, (2..12).collect::<Vec<_>>());
}

pub async fn watch_reports_delete_events<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    put(&s, "k", "v").await;
    put(&s, "k", "v2").await;
    let mut watch = s.watch(b"", 0).await.unwrap();
    let resp = s
        .txn(Txn::new().then(Op::delete("k")).then(Op::delete("nothing")))
        .await
        .unwrap();
    let event = next_event(&mut watch).await;
    assert_eq!(event.kind, EventKind::Delete);
    assert_eq!(
        event.kv,
        KeyValue {
            key: b"k".to_vec(),
            value: vec![],
            create_revision: 0,
            mod_revision: resp.revision,
            version: 0,
            lease: 0,
        }
    );
    assert_quiet(&mut watch).await;
}

pub async fn watch_revision_bounds_and_compaction<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    for i in 0..6 {
        put(&s, &format!("k{i}"), "v").await;
    }
    // Current revision is 7.
    assert!(matches!(
        s.watch(b"", 9).await.err(),
        Some(StoreError::FutureRevision {
            requested: 9,
            current: 7
        })
    ));
    let mut at_next = s.watch(b"", 8).await.unwrap();
    assert_quiet(&mut at_next).await;

    assert!(matches!(
        s.compact(8).await,
        Err(StoreError::FutureRevision {
            requested: 8,
            current: 7
        })
    ));
    s.compact(5).await.unwrap();
    assert!(matches!(
        s.watch(b"", 4).await.err(),
        Some(StoreError::Compacted {
            requested: 4,
            oldest: 5
        })
    ));
    let mut watch = s.watch(b"", 5).await.unwrap();
    assert_eq!(
        summary(&next_events(&mut watch, 3).await),
        vec![
            (EventKind::Put, "k3".to_string(), 5),
            (EventKind::Put, "k4".to_string(), 6),
            (EventKind::Put, "k5".to_string(), 7),
        ]
    );
    // Compacting to an older revision is a no-op, not an error.
    s.compact(3).await.unwrap();
    assert!(matches!(
        s.watch(b"", 4).await.err(),
        Some(StoreError::Compacted { .. })
    ));
    // Watches from now still work with all history gone.
    s.compact(7).await.unwrap();
    let mut watch = s.watch(b"", 0).await.unwrap();
    put(&s, "k6", "v").await;
    assert_eq!(key_of(&next_event(&mut watch).await), "k6");
    assert_eq!(key_of(&next_event(&mut at_next).await), "k6");
}

pub async fn compaction_keeps_current_values<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
) {
    let (s, _g) = make(1000).await;
    put(&s, "a", "1").await;
    put(&s, "b", "1").await;
    put(&s, "a", "2").await;
    let before = s.range(b"", b"", 0).await.unwrap();
    s.compact(4).await.unwrap();
    assert_eq!(s.range(b"", b"", 0).await.unwrap(), before);
    assert_eq!(s.current_revision().await.unwrap(), 4);
}

pub async fn history_is_compacted_automatically<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
) {
    const HISTORY: u64 = 10;
    let (s, _g) = make(HISTORY).await;
    for i in 0..40 {
        put(&s, "k", &i.to_string()).await;
    }
    let current = s.current_revision().await.unwrap();
    assert_eq!(current, 41);
    // The last HISTORY revisions are always retained...
    let from = current + 1 - HISTORY;
    let mut watch = s.watch(b"", from).await.unwrap();
    let events = next_events(&mut watch, HISTORY as usize).await;
    assert_eq!(events.first().unwrap().revision(), from);
    assert_eq!(events.last().unwrap().revision(), current);
    // ...and old ones are not kept forever.
    assert!(matches!(
        s.watch(b"", 2).await.err(),
        Some(StoreError::Compacted { .. })
    ));
    assert!(matches!(
        s.watch(b"", 20).await.err(),
        Some(StoreError::Compacted { .. })
    ));
    assert_eq!(value(&s, "k").await.as_deref(), Some("39"));
}

/// The oldest retained revision, as a watch from revision 1 reports it.
pub async fn oldest_retained<S: Store>(s: &S) -> Revision {
    match s.watch(b"", 1).await {
        Ok(_) => 1,
        Err(StoreError::Compacted { requested, oldest }) => {
            assert_eq!(requested, 1);
            oldest
        }
        Err(err) => panic!("watch from 1: {err}"),
    }
}

/// `(oldest retained revision, every retained event)`, checking that the
/// history is exactly the revisions `oldest..=current` with no gap.
pub async fn retained_history<S: Store>(s: &S) -> (Revision, Vec<Event>) {
    let oldest = oldest_retained(s).await;
    let current = s.current_revision().await.unwrap();
    let mut watch = s.watch(b"", oldest).await.unwrap();
    let mut events: Vec<Event> = Vec::new();
    while events.last().is_none_or(|e| e.revision() < current) {
        events.push(next_event(&mut watch).await);
    }
    // The rest of the newest revision, if any.
    while let Ok(item) = timeout(Duration::from_millis(100), watch.next()).await {
        events.push(item.unwrap().unwrap());
    }
    let mut revisions: Vec<Revision> = events.iter().map(Event::revision).collect();
    revisions.dedup();
    let first = oldest.max(2).min(current);
    assert_eq!(revisions, (first..=current).collect::<Vec<_>>());
    (oldest, events)
}

/// A transaction putting `n` keys `{prefix}/{i}`.
pub async fn put_many<S: Store>(s: &S, prefix: &str, n: usize) -> Revision {
    let mut txn = Txn::new();
    for i in 0..n {
        txn = txn.then(Op::put(format!("{prefix}/{i:04}"), format!("{prefix}:{i}")));
    }
    s.txn(txn).await.unwrap().revision
}

pub async fn history_is_bounded_by_events_too<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64, u64) -> F,
) {
    // 100 events at most; once beyond, whole revisions are dropped from the
    // oldest on until at most 90 remain. The revision bound is far away.
    let (s, _g) = make(1000, 100).await;
    for t in 0..9 {
        put_many(&s, &format!("a{t}"), 10).await;
    }
    // Revisions 2..=11, 10 events each: exactly at the bound, all kept.
    assert_eq!(put_many(&s, "a9", 10).await, 11);
    let (oldest, events) = retained_history(&s).await;
    assert_eq!((oldest, events.len()), (1, 100));

    // 105 > 100: revisions 2 and 3 go (95 is still above 90).
    assert_eq!(put_many(&s, "b", 5).await, 12);
    let (oldest, events) = retained_history(&s).await;
    assert_eq!((oldest, events.len()), (4, 85));
    assert!(matches!(
        s.watch(b"", 3).await.err(),
        Some(StoreError::Compacted {
            requested: 3,
            oldest: 4
        })
    ));

    // An explicit compaction takes its events off the count too: 65 left.
    s.compact(6).await.unwrap();
    let (oldest, events) = retained_history(&s).await;
    assert_eq!((oldest, events.len()), (6, 65));
    for t in 0..3 {
        put_many(&s, &format!("c{t}"), 10).await;
    }
    let (oldest, events) = retained_history(&s).await;
    assert_eq!((oldest, events.len()), (6, 95));
    // 105: revisions 6 and 7 go.
    assert_eq!(put_many(&s, "c3", 10).await, 16);
    let (oldest, events) = retained_history(&s).await;
    assert_eq!((oldest, events.len()), (8, 85));
    assert_eq!(events.first().unwrap().revision(), 8);
    assert_eq!(key_of(events.first().unwrap()), "a6/0000");

    // Current values are untouched: 10 x 10 + 5 + 4 x 10 keys.
    let all = s.range(b"", b"", 0).await.unwrap();
    assert_eq!(all.kvs.len(), 145);
    let a0 = s.get(b"a0/0003").await.unwrap().unwrap();
    assert_eq!((a0.value.as_slice(), a0.mod_revision), (&b"a0:3"[..], 2));
}

pub async fn a_transaction_beyond_the_event_bound_stays_watchable<
    S: Store,
    G,
    F: Future<Output = (S, G)>,
>(
    make: impl Fn(u64, u64) -> F,
) {
    const BOUND: u64 = 100;
    const BIG: usize = 1000;
    let (s, _g) = make(1000, BOUND).await;
    put(&s, "x", "1").await;
    put(&s, "y", "1").await;
    let mut live = s.watch(b"", 0).await.unwrap();

    // Ten times the bound in one transaction, deleting a key on the way.
    let mut txn = Txn::new().then(Op::delete("x"));
    for i in 0..BIG {
        txn = txn.then(Op::put(format!("big/{i:04}"), [b'v'; 60]));
    }
    let big = s.txn(txn).await.unwrap().revision;
    assert_eq!(big, 4);

    // It alone is retained, whole, and watchable from its own revision.
    let (oldest, events) = retained_history(&s).await;
    assert_eq!((oldest, events.len()), (big, BIG + 1));
    assert_eq!(
        (events[0].kind, key_of(&events[0])),
        (EventKind::Delete, "x".to_string())
    );
    for (i, event) in events[1..].iter().enumerate() {
        assert_eq!(
            (event.kind, key_of(event), event.revision()),
            (EventKind::Put, format!("big/{i:04}"), big)
        );
        assert_eq!(event.kv.value, [b'v'; 60]);
    }
    let mut from_big = s.watch(b"", big).await.unwrap();
    assert_eq!(next_events(&mut from_big, BIG + 1).await.len(), BIG + 1);
    assert!(matches!(
        s.watch(b"", big - 1).await.err(),
        Some(StoreError::Compacted {
            requested: 3,
            oldest: 4
        })
    ));
    // A watcher that was live got all of it.
    let got = next_events(&mut live, BIG + 1).await;
    assert!(got.iter().all(|e| e.revision() == big));

    // The next write pushes it out: 1001 + 1 > 100, and dropping it alone
    // is enough.
    let next = put(&s, "z", "1").await;
    let (oldest, events) = retained_history(&s).await;
    assert_eq!(
        (oldest, summary(&events)),
        (next, vec![(EventKind::Put, "z".to_string(), next)])
    );
    assert!(matches!(
        s.watch(b"", big).await.err(),
        Some(StoreError::Compacted { .. })
    ));
    // Compaction does not disturb watchers already past it.
    assert_eq!(key_of(&next_event(&mut live).await), "z");
    assert_eq!(key_of(&next_event(&mut from_big).await), "z");

    // Current values are untouched.
    let bigs = s.range(b"big/", &prefix_end(b"big/"), 0).await.unwrap();
    assert_eq!(bigs.kvs.len(), BIG);
    assert!(bigs.kvs.iter().all(|kv| kv.mod_revision == big));
    assert_eq!(s.get(b"x").await.unwrap(), None);
    assert_eq!(value(&s, "y").await.as_deref(), Some("1"));
}

pub async fn lagging_watcher_catches_up_from_history<
    S: Store + Clone,
    G,
    F: Future<Output = (S, G)>,
>(
    make: impl Fn(u64) -> F,
) {
    // More revisions than the live channel holds, written while a watcher
    // does not read: it must fall back to the log without a gap.
    const WRITERS: usize = 64;
    const EACH: usize = 70;
    let (s, _g) = make(100_000).await;
    let mut watch = s.watch(b"", 0).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                put(&s, &format!("w{w}/{i}"), "v").await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let total = WRITERS * EACH;
    let events = next_events(&mut watch, total).await;
    let revisions: Vec<Revision> = events.iter().map(Event::revision).collect();
    assert_eq!(revisions, (2..2 + total as u64).collect::<Vec<_>>());
    // Each writer's keys arrive in its own order.
    let mut last: BTreeMap<String, usize> = BTreeMap::new();
    for event in &events {
        let key = key_of(event);
        let (writer, i) = key.split_once('/').unwrap();
        let i: usize = i.parse().unwrap();
        if let Some(prev) = last.insert(writer.to_string(), i) {
            assert_eq!(i, prev + 1);
        }
    }
    assert_quiet(&mut watch).await;
}

pub async fn watchers_started_during_writes_see_no_gap<
    S: Store + Clone,
    G,
    F: Future<Output = (S, G)>,
>(
    make: impl Fn(u64) -> F,
) {
    const EVENTS_PER_WATCHER: u64 = 100;
    let (s, _g) = make(100_000).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let s = s.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                put(&s, &format!("k{i}"), "v").await;
                i += 1;
                if i % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut watchers = Vec::new();
    for n in 0..6u64 {
        let s = s.clone();
        watchers.push(tokio::spawn(async move {
            for _ in 0..n * 20 {
                tokio::task::yield_now().await;
            }
            let current = s.current_revision().await.unwrap();
            // Half of them from "now", half from a revision in the past.
            let from = if n % 2 == 0 {
                0
            } else {
                current.saturating_sub(5).max(1)
            };
            let mut watch = s.watch(b"", from).await.unwrap();
            let first = next_event(&mut watch).await.revision();
            if from != 0 {
                assert_eq!(first, from.max(2));
            } else {
                assert!(first > current);
            }
            let mut last = first;
            for _ in 1..EVENTS_PER_WATCHER {
                let rev = next_event(&mut watch).await.revision();
                assert_eq!(rev, last + 1, "gap or duplicate after revision {last}");
                last = rev;
            }
        }));
    }
    for watcher in watchers {
        watcher.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
}

pub async fn watch_ends_when_store_is_dropped<S: Store, G, F: Future<Output = (S, G)>>(
    make: impl Fn(u64) -> F,
) {
    let (s, g) = make(1000).await;
    put(&s, "a", "1").await;
    let mut watch = s.watch(b"", 0).await.unwrap();
    drop(s);
    let item = timeout(PATIENCE, watch.next()).await.unwrap();
    assert!(
        matches!(item, Some(Err(StoreError::Unavailable(_)))),
        "{item:?}"
    );
    assert!(watch.next().await.is_none());
    drop(g);
}

/// A store's server, as the outage scenario needs it: crashed with SIGKILL,
/// then started again on the same data and ports.
pub trait Crashable: Send + 'static {
    fn kill(&mut self);
    fn restart(&mut self) -> Result<(), String>;
}

/// Longest any single call may take while the store's server is down (the
/// backends' request timeouts plus scheduling slack); past it a call
/// "hangs", which is the bug this guards against.
pub const CALL_BOUND: Duration = Duration::from_secs(10);

/// The store's server is SIGKILLed under load (8 writers, a reader, a
/// watch) and restarted: calls fail fast with `Unavailable` (writers must
/// notice within `notice_within`), the watch ends with an error, the store
/// serves again within 5 s of the restart without being reopened, watches
/// see writes through another store (`connect` opens one), nothing
/// acknowledged is lost and the history has no gap. Returns the server.
pub async fn outage_and_reconnect<S, C, F, T>(
    s: S,
    connect: C,
    mut server: T,
    notice_within: Duration,
) -> T
where
    S: Store + Clone,
    C: Fn() -> F,
    F: Future<Output = S>,
    T: Crashable,
{
    const WRITERS: usize = 8;
    let mut watch = s.watch(b"w/", 0).await.unwrap();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let failures = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (s, acked, failures, stop) = (s.clone(), acked.clone(), failures.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("w/{w}/{i}");
                let txn = Txn::new()
                    .when(Compare::absent(&key))
                    .then(Op::put(&key, "v"));
                let outcome = timeout(CALL_BOUND, s.txn(txn))
                    .await
                    .unwrap_or_else(|_| panic!("a txn hung for {CALL_BOUND:?}"));
                match outcome {
                    Ok(resp) => {
                        assert!(resp.succeeded, "{key} written twice");
                        acked.lock().unwrap().push(key);
                        i += 1;
                    }
                    Err(StoreError::Unavailable(_)) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        // Retried with a new key: an unacknowledged write
                        // may or may not have committed.
                        i += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(other) => panic!("unexpected error during the outage: {other:?}"),
                }
            }
        }));
    }
    // Reads must fail fast too.
    let reader = {
        let (s, stop) = (s.clone(), stop.clone());
        tokio::spawn(async move {
            let mut unavailable = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match timeout(CALL_BOUND, s.get(b"w/0/0")).await {
                    Err(_) => panic!("a get hung for {CALL_BOUND:?}"),
                    Ok(Ok(_)) => {}
                    Ok(Err(StoreError::Unavailable(_))) => unavailable += 1,
                    Ok(Err(other)) => panic!("unexpected error: {other:?}"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            unavailable
        })
    };

    // Some writes before the crash.
    while acked.lock().unwrap().len() < 200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut server = tokio::task::spawn_blocking(move || {
        server.kill();
        server
    })
    .await
    .unwrap();
    let killed_at = Instant::now();
    let acked_before = acked.lock().unwrap().len();

    // Calls fail (fast: each is bounded above) instead of hanging.
    while failures.load(Ordering::Relaxed) < 3 * WRITERS as u64 {
        assert!(
            killed_at.elapsed() < notice_within,
            "writers did not notice the outage"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The watch ends with an error the consumer can resume from.
    let mut seen = Vec::new();
    loop {
        match timeout(CALL_BOUND, watch.next()).await {
            Err(_) => panic!("the watch hung during the outage"),
            Ok(Some(Ok(event))) => seen.push(event),
            Ok(Some(Err(StoreError::Unavailable(_)))) => break,
            Ok(other) => panic!("unexpected watch item {other:?}"),
        }
    }
    let acked_during = acked.lock().unwrap().len() - acked_before;
    assert!(
        acked_during <= WRITERS,
        "{acked_during} writes acknowledged while down"
    );

    // Restart on the same data and ports: the store comes back by itself.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server = tokio::task::spawn_blocking(move || {
        if let Err(e) = server.restart() {
            panic!("restarting the store's server: {e}");
        }
        server
    })
    .await
    .unwrap();
    let restarted_at = Instant::now();
    loop {
        match s.txn(Txn::new().then(Op::put("probe", "1"))).await {
            Ok(_) => break,
            Err(StoreError::Unavailable(_)) => {
                assert!(
                    restarted_at.elapsed() < Duration::from_secs(5),
                    "the store did not serve again within 5 s of the restart"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(other) => panic!("unexpected error after the restart: {other:?}"),
        }
    }
    let recovered_in = restarted_at.elapsed();
    // Watches work again, and see writes through another store.
    let mut after = s.watch(b"after/", 0).await.unwrap();
    let other = connect().await;
    put(&other, "after/x", "1").await;
    let event = timeout(CALL_BOUND, after.next())
        .await
        .expect("the watch was not woken after the restart")
        .unwrap()
        .unwrap();
    assert_eq!(key_of(&event), "after/x");
    let acked_at_restart = acked.lock().unwrap().len();
    while acked.lock().unwrap().len() < acked_at_restart + 200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    let reads_failed = reader.await.unwrap();
    assert!(reads_failed > 0, "no read noticed the outage");

    // Nothing acknowledged is lost, seen through this store and a new one.
    let fresh = connect().await;
    let acked = acked.lock().unwrap().clone();
    for store in [&s, &fresh] {
        let all = store.range(b"w/", &prefix_end(b"w/"), 0).await.unwrap();
        let present: BTreeSet<Vec<u8>> = all.kvs.into_iter().map(|kv| kv.key).collect();
        for key in &acked {
            assert!(present.contains(key.as_bytes()), "acknowledged {key} lost");
        }
        // One revision per write that committed (acknowledged or not),
        // plus the probe and after/x.
        assert_eq!(
            store.current_revision().await.unwrap(),
            1 + present.len() as u64 + 2
        );
    }
    // The history is whole: a new watch replays every write with no gap.
    let current = fresh.current_revision().await.unwrap();
    let mut replay = fresh.watch(b"", 1).await.unwrap();
    let mut last = 1;
    while last < current {
        let event = next_event(&mut replay).await;
        assert_eq!(event.revision(), last + 1, "gap in the history");
        last = event.revision();
    }
    // Events delivered before the crash were committed writes.
    let present = fresh.range(b"w/", &prefix_end(b"w/"), 0).await.unwrap();
    for event in &seen {
        assert_eq!(event.kind, EventKind::Put);
        assert!(present.kvs.iter().any(|kv| kv.key == event.kv.key));
    }
    eprintln!(
        "outage: {} acked before the kill, {} failed calls, store serving {:?} after the \
         restart, {} acked in total",
        acked_before,
        reads_failed + failures.load(Ordering::Relaxed),
        recovered_in,
        acked.len()
    );
    server
}
