//! Tests specific to the etcd backend: outages and reconnection, several
//! stores (servers) on one etcd, namespaces, and what the backend does with
//! transactions etcd cannot express natively. The backend-independent
//! semantics are in `tests/conformance.rs`.

use std::time::{Duration, Instant};

use allot_store::conformance::{
    key_of, next_event, next_events, outage_and_reconnect, put, summary, value, CALL_BOUND,
};
use allot_store::{prefix_end, Compare, EventKind, Op, OpResult, Store, StoreError, Txn};
use allot_store_etcd::testing::{fresh_store, start_server};
use allot_store_etcd::{EtcdOptions, EtcdStore};

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
    let server = start_server().await;
    let endpoints = server.endpoints();
    let connect = || async {
        EtcdStore::connect(&endpoints, options("outage/"))
            .await
            .unwrap()
    };
    let s = connect().await;
    outage_and_reconnect(s, connect, server, 2 * CALL_BOUND).await;
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
    allot_store::conformance::cas_increments_through_two_stores(&a, &b, 8, 20).await;

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
