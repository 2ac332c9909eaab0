//! Tests specific to the etcd backend: outages and reconnection, several
//! stores (servers) on one etcd, namespaces, and what the backend does with
//! transactions etcd cannot express natively. The backend-independent
//! semantics are in `tests/conformance.rs`.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use allot_store::conformance::{key_of, next_event, next_events, put, summary, value};
use allot_store::{prefix_end, Compare, EventKind, Op, OpResult, Store, StoreError, Txn};
use allot_store_etcd::testing::{fresh_store, start_server};
use allot_store_etcd::{EtcdOptions, EtcdStore};
use futures::StreamExt;
use tokio::time::timeout;

/// Longest any single call may take while etcd is down: the store's
/// request timeout (2 s below) plus scheduling slack. Past it the call
/// "hangs", which is the bug this guards against.
const CALL_BOUND: Duration = Duration::from_secs(10);

fn options(namespace: &str) -> EtcdOptions {
    EtcdOptions {
        namespace: namespace.to_string(),
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        ..EtcdOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_fails_fast_and_the_store_reconnects_by_itself() {
    const WRITERS: usize = 8;
    let mut server = start_server().await;
    let endpoints = server.endpoints();
    let s = EtcdStore::connect(&endpoints, options("outage/"))
        .await
        .unwrap();
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
    server = tokio::task::spawn_blocking(move || {
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
            killed_at.elapsed() < 2 * CALL_BOUND,
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

    // Restart on the same data directory and ports: the store comes back
    // by itself.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server = tokio::task::spawn_blocking(move || {
        server.restart().expect("restarting etcd");
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
    let other = EtcdStore::connect(&endpoints, options("outage/"))
        .await
        .unwrap();
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
    let fresh = EtcdStore::connect(&endpoints, options("outage/"))
        .await
        .unwrap();
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
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_namespace_act_as_one() {
    let server = start_server().await;
    let a = EtcdStore::connect(&server.endpoints(), options("shared/"))
        .await
        .unwrap();
    let b = EtcdStore::connect(&server.endpoints(), options("shared/"))
        .await
        .unwrap();
    let mut watch_a = a.watch(b"", 0).await.unwrap();

    let rev = put(&b, "from-b", "1").await;
    let event = next_event(&mut watch_a).await;
    assert_eq!((key_of(&event), event.revision()), ("from-b".into(), rev));
    assert_eq!(value(&a, "from-b").await.as_deref(), Some("1"));

    // A compare-and-swap race between the two: exactly one winner.
    for round in 0..20 {
        let key = format!("race/{round}");
        let txn = |who: &str| {
            Txn::new()
                .when(Compare::absent(&key))
                .then(Op::put(&key, who))
        };
        let (ra, rb) = tokio::join!(a.txn(txn("a")), b.txn(txn("b")));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(ra.succeeded != rb.succeeded, "round {round}: {ra:?} {rb:?}");
        let winner = if ra.succeeded { "a" } else { "b" };
        assert_eq!(value(&a, &key).await.as_deref(), Some(winner));
        assert_eq!(value(&b, &key).await.as_deref(), Some(winner));
    }

    // Compare-and-swap increments through both lose no update and share
    // one sequence of revisions.
    const TASKS: usize = 8;
    const EACH: usize = 20;
    let start = a.current_revision().await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let s = if t % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let mut revisions = Vec::new();
            while revisions.len() < EACH {
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
    for task in tasks {
        for rev in task.await.unwrap() {
            assert!(all.insert(rev), "revision {rev} acknowledged twice");
        }
    }
    let total = (TASKS * EACH) as u64;
    assert_eq!(value(&b, "counter").await, Some(total.to_string()));
    assert_eq!(all, (start + 1..=start + total).collect());

    // A lease granted through `b` and kept alive through `a` is one lease.
    let lease = b.lease_grant(Duration::from_secs(2)).await.unwrap();
    b.txn(Txn::new().then(Op::put_with_lease("l/1", "v", lease)))
        .await
        .unwrap();
    assert_eq!(
        a.lease_keep_alive(lease).await.unwrap(),
        Duration::from_secs(2)
    );
    a.lease_revoke(lease).await.unwrap();
    assert_eq!(b.get(b"l/1").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_are_isolated() {
    let server = start_server().await;
    let one = EtcdStore::connect(&server.endpoints(), options("one/"))
        .await
        .unwrap();
    let two = EtcdStore::connect(&server.endpoints(), options("two/"))
        .await
        .unwrap();
    let mut watch_two = two.watch(b"", 0).await.unwrap();
    put(&one, "k", "from one").await;
    put(&one, "only-one", "x").await;
    let rev = put(&two, "k", "from two").await;

    assert_eq!(value(&one, "k").await.as_deref(), Some("from one"));
    assert_eq!(value(&two, "k").await.as_deref(), Some("from two"));
    assert_eq!(two.get(b"only-one").await.unwrap(), None);
    let keys = |r: allot_store::RangeResult| -> Vec<Vec<u8>> {
        r.kvs.into_iter().map(|kv| kv.key).collect()
    };
    assert_eq!(
        keys(one.range(b"", b"", 0).await.unwrap()),
        vec![b"k".to_vec(), b"only-one".to_vec()]
    );
    assert_eq!(
        keys(two.range(b"", b"", 0).await.unwrap()),
        vec![b"k".to_vec()]
    );
    // Compares see only their own namespace.
    let resp = two
        .txn(Txn::new().when(Compare::absent("only-one")))
        .await
        .unwrap();
    assert!(resp.succeeded);
    // A delete of everything stays in its namespace.
    let resp = two
        .txn(Txn::new().then(Op::DeleteRange {
            start: vec![],
            end: vec![],
        }))
        .await
        .unwrap();
    assert_eq!(resp.results, vec![OpResult::Delete(1)]);
    assert_eq!(value(&one, "k").await.as_deref(), Some("from one"));

    // Two's watch saw only its own writes, with the prefix stripped.
    let events = next_events(&mut watch_two, 2).await;
    assert_eq!(
        summary(&events),
        vec![
            (EventKind::Put, "k".to_string(), rev),
            (EventKind::Delete, "k".to_string(), rev + 1),
        ]
    );
    allot_store::conformance::assert_quiet(&mut watch_two).await;
    // Revisions are etcd's: shared by both.
    assert_eq!(
        one.current_revision().await.unwrap(),
        two.current_revision().await.unwrap()
    );
}

/// etcd refuses a transaction writing one key twice; the backend evaluates
/// it on a snapshot and commits its net effect atomically. Results are the
/// reference ones; the history shows each key's net change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_written_twice_in_one_txn_commits_its_net_effect() {
    let (s, _server) = fresh_store(1000, 1_000_000).await;
    put(&s, "k", "old").await;
    for key in ["p/1", "p/2"] {
        put(&s, key, "v").await;
    }
    let mut watch = s.watch(b"", 0).await.unwrap();
    let resp = s
        .txn(
            Txn::new()
                .when(Compare::value("k", "old"))
                .then(Op::put("k", "new"))
                .then(Op::delete("k"))
                .then(Op::put("k", "again"))
                .then(Op::get("k"))
                .then(Op::put("p/3", "v"))
                .then(Op::delete_prefix("p/")),
        )
        .await
        .unwrap();
    assert!(resp.succeeded);
    assert_eq!(resp.revision, 5);
    assert_eq!(resp.results[5], OpResult::Delete(3));
    match &resp.results[3] {
        OpResult::Get(Some(kv)) => {
            assert_eq!(
                (kv.value.as_slice(), kv.create_revision, kv.version),
                (&b"again"[..], 5, 1)
            )
        }
        other => panic!("{other:?}"),
    }
    // Stored: the net effect, as an overwrite of `k`.
    let kv = s.get(b"k").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision, kv.create_revision),
        (&b"again"[..], 5, 2)
    );
    assert!(s
        .range(b"p/", &prefix_end(b"p/"), 0)
        .await
        .unwrap()
        .kvs
        .is_empty());
    let events = next_events(&mut watch, 3).await;
    assert_eq!(
        summary(&events),
        vec![
            (EventKind::Put, "k".to_string(), 5),
            (EventKind::Delete, "p/1".to_string(), 5),
            (EventKind::Delete, "p/2".to_string(), 5),
        ]
    );
    allot_store::conformance::assert_quiet(&mut watch).await;

    // A failed compare runs the failure branch, evaluated the same way.
    let resp = s
        .txn(
            Txn::new()
                .when(Compare::value("k", "old"))
                .then(Op::put("x", "1"))
                .otherwise(Op::put("y", "1"))
                .otherwise(Op::put("y", "2")),
        )
        .await
        .unwrap();
    assert!(!resp.succeeded);
    assert_eq!(value(&s, "y").await.as_deref(), Some("2"));
    assert_eq!(s.get(b"x").await.unwrap(), None);
}

/// Concurrent evaluated transactions stay serializable: the guarded commit
/// retries when another writer changed what a transaction read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluated_txns_lose_no_update_under_contention() {
    const TASKS: usize = 8;
    const EACH: usize = 10;
    let (s, _server) = fresh_store(100_000, 1_000_000).await;
    put(&s, "n", "0").await;
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            while done < EACH {
                let kv = s.get(b"n").await.unwrap().unwrap();
                let n: u64 = String::from_utf8_lossy(&kv.value).parse().unwrap();
                // Writes `n` twice: always the evaluated path.
                let resp = s
                    .txn(
                        Txn::new()
                            .when(Compare::mod_revision("n", kv.mod_revision))
                            .then(Op::put("n", "tmp"))
                            .then(Op::put("n", (n + 1).to_string())),
                    )
                    .await
                    .unwrap();
                if resp.succeeded {
                    done += 1;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(value(&s, "n").await, Some((TASKS * EACH).to_string()));
    assert_eq!(
        s.current_revision().await.unwrap(),
        2 + (TASKS * EACH) as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_etcd_is_a_clear_error() {
    // Nothing listens on this port.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let started = Instant::now();
    let result = EtcdStore::connect(&[format!("127.0.0.1:{port}")], options("x/")).await;
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    assert!(started.elapsed() < CALL_BOUND);
    assert!(matches!(
        EtcdStore::connect(&[], options("x/")).await,
        Err(StoreError::Invalid(_))
    ));
}
