//! Tests specific to the PostgreSQL backend: outages and reconnection,
//! several stores (servers) on one database, schema versioning, limits.
//! The backend-independent semantics are in `tests/conformance.rs`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use allot_store::conformance::{
    key_of, next_event, next_events, outage_and_reconnect, put, summary, value, CALL_BOUND,
};
use allot_store::{Compare, EventKind, Op, OpResult, Store, StoreError, Txn};
use allot_store_postgres::testing::{fresh_store, shared_server, unique_schema};
use allot_store_postgres::{PostgresOptions, PostgresStore, MAX_KEY_LEN};
use futures::StreamExt;
use tokio::time::timeout;

fn url() -> String {
    shared_server().expect("no PostgreSQL server").url()
}

async fn shared_url() -> String {
    tokio::task::spawn_blocking(url).await.unwrap()
}

fn options(schema: &str) -> PostgresOptions {
    PostgresOptions {
        schema: schema.to_string(),
        ..PostgresOptions::default()
    }
}

/// A store on `schema` of the server at `url`, with default options.
async fn open(url: &str, schema: &str) -> PostgresStore {
    PostgresStore::connect(url, options(schema)).await.unwrap()
}

/// A store asking for the watch history of keys under `prefix` only.
async fn logging_only(url: &str, schema: &str, prefix: &str) -> PostgresStore {
    let options = PostgresOptions {
        history_prefixes: Some(vec![prefix.as_bytes().to_vec()]),
        ..options(schema)
    };
    PostgresStore::connect(url, options).await.unwrap()
}

/// A plain client for poking at the database behind the store's back.
async fn raw_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// The settings the store's sessions ask for are in effect: durable commits
/// whatever the server's default, index plans whatever the statistics, and
/// statements planned once per session instead of on every execution.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_run_with_the_stores_settings() {
    let config = allot_store_postgres::testing::session_config(&shared_url().await).unwrap();
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    for (name, wanted) in [
        ("synchronous_commit", "on"),
        ("enable_seqscan", "off"),
        ("jit", "off"),
        ("plan_cache_mode", "force_generic_plan"),
        ("application_name", "allot"),
    ] {
        let row = client
            .query_one("SELECT current_setting($1)", &[&name])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), wanted, "{name}");
    }
    // A statement with array parameters, as the store's writes have: run
    // more often than the five custom plans PostgreSQL tries by default
    // before it may settle on a generic one, it is never planned anew.
    let text = "SELECT count(*) FROM unnest($1::bytea[]) AS k(key)";
    let stmt = client.prepare(text).await.unwrap();
    for n in 0..8usize {
        let keys: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8]).collect();
        client.query_one(&stmt, &[&keys]).await.unwrap();
    }
    let plans = client
        .query_one(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements \
             WHERE statement = $1",
            &[&text],
        )
        .await
        .unwrap();
    assert_eq!(plans.get::<_, i64>(1), 0, "custom plans made");
    assert!(plans.get::<_, i64>(0) >= 8, "generic plans used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_fails_fast_and_the_store_reconnects_by_itself() {
    let server = allot_store_postgres::testing::start_server().await;
    let url = server.url();
    let opts = PostgresOptions {
        timeout: Duration::from_secs(2),
        // No fallback poll: watchers must be woken by the listener (its
        // disconnection during the outage, its notifications after it).
        poll_interval: Duration::from_secs(3600),
        ..options("outage")
    };
    let connect = || async { PostgresStore::connect(&url, opts.clone()).await.unwrap() };
    let s = connect().await;
    outage_and_reconnect(s, connect, server, CALL_BOUND).await;
}

/// A store that never polls: only notifications (LISTEN/NOTIFY) of other
/// stores' writes can wake its watchers.
async fn never_polling(url: &str, schema: &str) -> PostgresStore {
    let options = PostgresOptions {
        poll_interval: Duration::from_secs(3600),
        ..options(schema)
    };
    PostgresStore::connect(url, options).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_schema_act_as_one() {
    let url = shared_url().await;
    let schema = unique_schema();
    let a = never_polling(&url, &schema).await;
    // `b` stacks batches (the next one sent behind the one committing)
    // where `a` sends one at a time: both ways must keep the checks sound.
    let b = PostgresStore::connect(
        &url,
        PostgresOptions {
            max_in_flight: 2,
            ..options(&schema)
        },
    )
    .await
    .unwrap();
    let mut watch_a = a.watch(b"", 0).await.unwrap();

    let rev = put(&b, "from-b", "1").await;
    let event = timeout(Duration::from_secs(10), watch_a.next())
        .await
        .expect("a's watch was not woken by b's write")
        .unwrap()
        .unwrap();
    assert_eq!((key_of(&event), event.revision()), ("from-b".into(), rev));
    assert_eq!(value(&a, "from-b").await.as_deref(), Some("1"));

    // Compare-and-swap increments through both stores lose no update and
    // share one sequence of revisions.
    const TASKS: usize = 16;
    const EACH: usize = 25;
    allot_store::conformance::cas_increments_through_two_stores(&a, &b, TASKS, EACH).await;
    let events = {
        let mut events = Vec::new();
        while events.len() < TASKS * EACH {
            events.push(next_event(&mut watch_a).await);
        }
        events
    };
    assert!(events
        .windows(2)
        .all(|w| w[1].revision() == w[0].revision() + 1));

    // A lease granted through `b` and kept alive through `a` is one lease;
    // when it lapses, it expires once, in one revision.
    let ttl = Duration::from_millis(800);
    let lease = b.lease_grant(ttl).await.unwrap();
    b.txn(
        Txn::new()
            .then(Op::put_with_lease("l/1", "v", lease))
            .then(Op::put_with_lease("l/2", "v", lease)),
    )
    .await
    .unwrap();
    tokio::time::sleep(ttl / 2).await;
    assert_eq!(a.lease_keep_alive(lease).await.unwrap(), ttl);
    let before = a.current_revision().await.unwrap();
    let mut leases_a = a.watch(b"l/", 0).await.unwrap();
    let deleted = [
        next_event(&mut leases_a).await,
        next_event(&mut leases_a).await,
    ];
    assert!(deleted
        .iter()
        .all(|e| e.kind == EventKind::Delete && e.revision() == before + 1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.current_revision().await.unwrap(), before + 1);
    assert!(matches!(
        b.lease_keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

/// `watch_each` is woken by other servers' commits (notifications), and
/// this store's own changes come with them, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_each_wakes_for_other_servers_and_brings_our_own_along() {
    let url = shared_url().await;
    let schema = unique_schema();
    let a = never_polling(&url, &schema).await;
    let b = open(&url, &schema).await;
    let prefixes = allot_store::Prefixes::new([b"b/".as_slice(), b"t/"]);
    let mut follow = a.watch_each(&prefixes, 0).await.unwrap();
    // The watch reads (nothing) and goes to sleep before anything is
    // written, so what follows must wake it.
    assert!(
        timeout(Duration::from_millis(200), follow.next())
            .await
            .is_err(),
        "an event before any write"
    );
    // Once this arrives, the listener is up (its start wakes every watcher
    // once, whatever the notifications say).
    let ready = put(&b, "t/ready", "1").await;
    let event = timeout(Duration::from_secs(10), follow.next())
        .await
        .expect("the first write never arrived")
        .unwrap()
        .unwrap();
    assert_eq!(
        (key_of(&event), event.revision()),
        ("t/ready".into(), ready)
    );
    let mine = put(&a, "b/mine", "1").await;
    let theirs = put(&b, "t/theirs", "1").await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let event = timeout(Duration::from_secs(10), follow.next())
            .await
            .expect("not woken by the other server's write")
            .unwrap()
            .unwrap();
        got.push((key_of(&event), event.revision()));
    }
    assert_eq!(
        got,
        vec![
            ("b/mine".to_string(), mine),
            ("t/theirs".to_string(), theirs)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_is_versioned_and_a_newer_one_refused() {
    let url = shared_url().await;
    let schema = unique_schema();
    let s = open(&url, &schema).await;
    put(&s, "k", "v").await;
    drop(s);

    // Connecting again (as another server would) keeps everything.
    let s = open(&url, &schema).await;
    assert_eq!(value(&s, "k").await.as_deref(), Some("v"));
    assert_eq!(s.current_revision().await.unwrap(), 2);
    drop(s);

    let raw = raw_client(&url).await;
    let version: i32 = raw
        .query_one(
            &format!("SELECT version FROM {schema}.allot_schema_version"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, 5);

    // A schema left at version 2 by an earlier build is brought up to date
    // on connect, its data kept and written through the new statement.
    raw.batch_execute(&format!(
        "DROP FUNCTION {schema}.allot_refuse; DROP FUNCTION {schema}.allot_bound; \
         DROP FUNCTION {schema}.allot_write; \
         ALTER TABLE {schema}.allot_revision DROP COLUMN history_prefixes, \
           DROP COLUMN history_since, DROP COLUMN history_version; \
         UPDATE {schema}.allot_schema_version SET version = 2"
    ))
    .await
    .unwrap();
    // A client asking for the history of one prefix only: the upgraded
    // store has logged every key so far, and keeps doing so.
    let s = logging_only(&url, &schema, "x/").await;
    assert_eq!(value(&s, "k").await.as_deref(), Some("v"));
    assert_eq!(put(&s, "k", "v2").await, 3);
    let mut all = s.watch(b"", 1).await.unwrap();
    let events = next_events(&mut all, 2).await;
    assert_eq!(
        summary(&events),
        [
            (EventKind::Put, "k".into(), 2),
            (EventKind::Put, "k".into(), 3)
        ]
    );
    drop(s);

    raw.execute(
        &format!("UPDATE {schema}.allot_schema_version SET version = 99"),
        &[],
    )
    .await
    .unwrap();
    match PostgresStore::connect(&url, options(&schema)).await {
        Err(StoreError::Backend(message)) => {
            assert!(message.contains("newer"), "{message}");
            assert!(message.contains("99"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// How many events the log holds.
async fn log_rows(raw: &tokio_postgres::Client, schema: &str) -> i64 {
    raw.query_one(&format!("SELECT count(*) FROM {schema}.allot_log"), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_logged_only_under_the_prefixes_clients_ask_for() {
    let url = shared_url().await;
    let schema = unique_schema();
    let raw = raw_client(&url).await;
    let a = logging_only(&url, &schema, "a/").await;
    assert_eq!(put(&a, "a/1", "x").await, 2);
    assert_eq!(put(&a, "b/1", "x").await, 3);
    let both = Txn::new()
        .then(Op::put("a/2", "y"))
        .then(Op::put("b/2", "y"));
    assert_eq!(a.txn(both).await.unwrap().revision, 4);
    // Revisions as always; log rows for a/ only.
    assert_eq!(a.current_revision().await.unwrap(), 4);
    assert_eq!(value(&a, "b/2").await.as_deref(), Some("y"));
    assert_eq!(log_rows(&raw, &schema).await, 2);
    let mut under_a = a.watch(b"a/", 1).await.unwrap();
    assert_eq!(
        summary(&next_events(&mut under_a, 2).await),
        [
            (EventKind::Put, "a/1".into(), 2),
            (EventKind::Put, "a/2".into(), 4)
        ]
    );
    // Keys outside the recorded prefixes cannot be watched: an error, not
    // a stream that stays silent.
    for outside in [&b"b/"[..], b"", b"a"] {
        match a.watch(outside, 0).await {
            Err(StoreError::Invalid(message)) => {
                assert!(message.contains("history_prefixes"), "{message}")
            }
            Err(other) => panic!("expected a refusal, got {other:?}"),
            Ok(_) => panic!("a watch of {outside:?} was accepted"),
        }
    }

    // Another client asking for every key widens the scope from the next
    // revision on: earlier history of b/ is gone, as if compacted.
    let b = open(&url, &schema).await;
    match b.watch(b"b/", 1).await {
        Err(StoreError::Compacted { requested, oldest }) => {
            assert_eq!((requested, oldest), (1, 5));
        }
        Err(other) => panic!("expected compacted, got {other:?}"),
        Ok(_) => panic!("a watch of b/ from before it was recorded was accepted"),
    }
    let mut under_b = b.watch(b"b/", 5).await.unwrap();
    // `a` still holds the old scope: its next write is refused by the
    // version check and runs again with the new one, so it is logged.
    assert_eq!(put(&a, "b/3", "z").await, 5);
    assert_eq!(put(&b, "b/4", "z").await, 6);
    assert_eq!(
        summary(&next_events(&mut under_b, 2).await),
        [
            (EventKind::Put, "b/3".into(), 5),
            (EventKind::Put, "b/4".into(), 6)
        ]
    );
    // a/ stays complete from the start.
    let mut again = b.watch(b"a/", 1).await.unwrap();
    assert_eq!(key_of(&next_event(&mut again).await), "a/1");
    assert_eq!(log_rows(&raw, &schema).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_starting_together_migrate_once() {
    let url = shared_url().await;
    let schema = unique_schema();
    let connects = (0..4).map(|_| PostgresStore::connect(&url, options(&schema)));
    let stores = futures::future::try_join_all(connects).await.unwrap();
    put(&stores[0], "k", "v").await;
    for s in &stores {
        assert_eq!(value(s, "k").await.as_deref(), Some("v"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_options_and_an_unreachable_server_are_clear_errors() {
    let url = shared_url().await;
    assert!(matches!(
        PostgresStore::connect(&url, options("Bad-Name")).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        PostgresStore::connect("not a url ::", options("x")).await,
        Err(StoreError::Invalid(_))
    ));
    // Nothing listens on this port.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let started = Instant::now();
    let result = PostgresStore::connect(
        &format!("postgres://postgres@127.0.0.1:{port}/allot"),
        PostgresOptions {
            timeout: Duration::from_secs(2),
            ..options("x")
        },
    )
    .await;
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    assert!(started.elapsed() < CALL_BOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_beyond_the_limit_are_refused() {
    let (s, _schema) = fresh_store(1000, 1_000_000).await;
    let long = vec![b'k'; MAX_KEY_LEN + 1];
    let err = s
        .txn(
            Txn::new()
                .then(Op::put("ok", "1"))
                .then(Op::put(&long, "x")),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    assert_eq!(s.current_revision().await.unwrap(), 1);
    let longest = vec![b'k'; MAX_KEY_LEN];
    put(&s, std::str::from_utf8(&longest).unwrap(), "v").await;
    assert!(s.get(&longest).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answers_each_txn_on_its_own() {
    // Many concurrent transactions share PostgreSQL transactions; one that
    // fails (a dead lease) must not fail the others or take a revision.
    const TXNS: usize = 300;
    let (s, _schema) = fresh_store(100_000, 1_000_000).await;
    let mut tasks = Vec::new();
    for i in 0..TXNS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("k{i}");
            let lease = if i % 5 == 0 { 999_999 } else { 0 };
            let resp = s
                .txn(
                    Txn::new()
                        .when(Compare::absent(&key))
                        .then(Op::put(&key, i.to_string()))
                        .then(Op::put_with_lease(format!("bad{i}"), "x", lease))
                        .then(Op::get(&key)),
                )
                .await;
            (i, resp)
        }));
    }
    let mut revisions = BTreeSet::new();
    for task in tasks {
        let (i, resp) = task.await.unwrap();
        if i % 5 == 0 {
            assert!(matches!(resp, Err(StoreError::LeaseNotFound(999_999))));
            continue;
        }
        let resp = resp.unwrap();
        assert!(resp.succeeded);
        assert!(revisions.insert(resp.revision));
        match &resp.results[2] {
            OpResult::Get(Some(kv)) => assert_eq!(kv.mod_revision, resp.revision),
            other => panic!("{other:?}"),
        }
    }
    let ok = (TXNS - TXNS / 5) as u64;
    assert_eq!(revisions, (2..2 + ok).collect());
    assert_eq!(s.current_revision().await.unwrap(), 1 + ok);
}

/// Many small create-if-absent transactions from 1 and 64 concurrent tasks:
/// every one succeeds and gets its own revision, and no batch of the lone
/// store fails its speculation (`redone_batches`). It also prints the rate
/// (`-- --nocapture`); the rate is reported in BENCHMARKS.md, never asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_small_writes_all_commit() {
    let url = shared_url().await;
    // Batches as single statements, then stacked (see `max_in_flight`).
    for (tasks, in_flight) in [(1usize, 1usize), (64, 1), (64, 2)] {
        let opts = PostgresOptions {
            max_in_flight: in_flight,
            ..options(&unique_schema())
        };
        let s = PostgresStore::connect(&url, opts).await.unwrap();
        let per_task = if tasks == 1 { 500 } else { 300 };
        let started = Instant::now();
        let mut handles = Vec::new();
        for t in 0..tasks {
            let s = s.clone();
            handles.push(tokio::spawn(async move {
                for i in 0..per_task {
                    let key = format!("t{t}/{i}");
                    let resp = s
                        .txn(
                            Txn::new()
                                .when(Compare::absent(&key))
                                .then(Op::put(&key, "value")),
                        )
                        .await
                        .unwrap();
                    assert!(resp.succeeded);
                }
            }));
        }
        for handle in handles {
            handle.await.unwrap();
        }
        let elapsed = started.elapsed();
        let total = tasks * per_task;
        let keys = s.range(b"t", b"u", 0).await.unwrap().kvs.len();
        assert_eq!(keys, total, "every acknowledged write is stored");
        // Alone on its schema, writing keys it created: every speculation
        // holds, stacked batches included (they reach the server in the
        // order they were built, each behind the one it builds on).
        assert_eq!(
            s.redone_batches(),
            0,
            "batches failed their own speculation"
        );
        println!(
            "{tasks:>3} tasks, {in_flight} in flight: {total} txns in {elapsed:.2?} = {:.0} txns/s",
            total as f64 / elapsed.as_secs_f64()
        );
    }
}

/// Task `t`'s `i`th transaction of the staging tests: `puts` keys under
/// `s/{t}/{i}/`, created together if the first is absent.
fn create_set(t: usize, i: usize, puts: usize, value: &str) -> Txn {
    let mut txn = Txn::new().when(Compare::absent(format!("s/{t}/{i}/0")));
    for j in 0..puts {
        txn = txn.then(Op::put(format!("s/{t}/{i}/{j}"), value));
    }
    txn
}

/// Batches of a few transactions at a time are staged (`BEGIN`, the write,
/// `COMMIT`, the next batch held back until the write has run): every
/// acknowledged write is stored, at the revision its answer gave, and a
/// watch from before them sees every revision once, in order, with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_batches_keep_every_write_in_revision_order() {
    let url = shared_url().await;
    let s = open(&url, &unique_schema()).await;
    let start = s.current_revision().await.unwrap();
    let (tasks, per_task, puts) = (12usize, 80usize, 4usize);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let mut revisions = Vec::with_capacity(per_task);
            for i in 0..per_task {
                let resp = s.txn(create_set(t, i, puts, "v")).await.unwrap();
                assert!(resp.succeeded);
                revisions.push(resp.revision);
            }
            revisions
        }));
    }
    let mut acknowledged = Vec::new();
    for handle in handles {
        acknowledged.extend(handle.await.unwrap());
    }
    let total = tasks * per_task;
    assert!(
        s.staged_batches() > 0,
        "no batch was staged: the test does not cover staging"
    );
    assert_eq!(
        s.redone_batches(),
        0,
        "batches failed their own speculation"
    );
    let stored = s.range(b"s/", b"s0", 0).await.unwrap().kvs.len();
    assert_eq!(stored, total * puts, "every acknowledged write is stored");
    acknowledged.sort_unstable();
    let mut watch = s.watch(b"s/", start + 1).await.unwrap();
    let mut seen: Vec<u64> = Vec::with_capacity(total * puts);
    while seen.len() < total * puts {
        let event = timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("the watch stalled")
            .unwrap()
            .unwrap();
        seen.push(event.revision());
    }
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "events out of revision order"
    );
    let mut revisions = seen.clone();
    revisions.dedup();
    assert_eq!(revisions, acknowledged, "one revision per acknowledged txn");
    assert!(
        revisions.windows(2).all(|w| w[1] == w[0] + 1),
        "a gap in the revisions"
    );
    assert!(
        seen.chunk_by(|a, b| a == b).all(|run| run.len() == puts),
        "a revision without all of its writes"
    );
}

/// Staged batches refused because another server wrote (the revision
/// moved under them: the statement fails, its `COMMIT` rolls back) run
/// again on the locked path, and the connection they were on stays fit:
/// every write of both stores is stored, and writing goes on after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_batches_give_way_to_another_writer() {
    let url = shared_url().await;
    let schema = unique_schema();
    let a = open(&url, &schema).await;
    let b = open(&url, &schema).await;
    let (tasks, per_task, puts, foreign) = (12usize, 60usize, 4usize, 150usize);
    let other = tokio::spawn(async move {
        for i in 0..foreign {
            put(&b, &format!("x/{i}"), "b").await;
        }
        b
    });
    let mut handles = Vec::new();
    for t in 0..tasks {
        let a = a.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..per_task {
                assert!(a.txn(create_set(t, i, puts, "a")).await.unwrap().succeeded);
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    let b = other.await.unwrap();
    assert!(a.staged_batches() > 0, "no batch was staged");
    assert!(
        a.redone_batches() > 0,
        "the other writer never moved the revision under a batch"
    );
    let mine = a.range(b"s/", b"s0", 0).await.unwrap().kvs.len();
    let theirs = b.range(b"x/", b"x0", 0).await.unwrap().kvs.len();
    assert_eq!((mine, theirs), (tasks * per_task * puts, foreign));
    let last = put(&a, "s/last", "a").await;
    assert_eq!(value(&b, "s/last").await.as_deref(), Some("a"));
    assert_eq!(b.current_revision().await.unwrap(), last);
}

/// The committer evaluates batches on what it knows of the store (keys it
/// has not read are assumed absent) and the write statement checks that
/// under the lock: a key that exists but was never read by this store, and writes by
/// another store in between, must send the batch to the locked path, never
/// let it commit on a wrong assumption.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculation_is_checked_against_keys_and_other_writers() {
    // `a` speculates with batches as single statements, then stacked.
    for in_flight in [1, 2] {
        speculation_checked(in_flight).await;
    }
}

async fn speculation_checked(in_flight: usize) {
    let url = shared_url().await;
    let schema = unique_schema();
    let b = open(&url, &schema).await;
    for i in 0..20 {
        put(&b, &format!("pre/{i}"), "b").await;
    }
    let opts = PostgresOptions {
        max_in_flight: in_flight,
        ..options(&schema)
    };
    let a = PostgresStore::connect(&url, opts).await.unwrap();
    // a's first write learns the head; the keys of pre/ it has never read.
    put(&a, "a/0", "a").await;
    // Concurrent compare-and-create of keys that already exist: all fail.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("pre/{i}");
            a.txn(
                Txn::new()
                    .when(Compare::absent(key.as_str()))
                    .then(Op::put(key.as_str(), "a"))
                    .otherwise(Op::get(key.as_str())),
            )
            .await
            .unwrap()
        }));
    }
    for task in tasks {
        let resp = task.await.unwrap();
        assert!(!resp.succeeded);
        match resp.results.as_slice() {
            [OpResult::Get(Some(kv))] => assert_eq!(kv.value, b"b"),
            other => panic!("unexpected results {other:?}"),
        }
    }
    // Now a knows pre/0; b changes it behind a's back, then a compares on
    // the version it knew: must fail, and the value stays b's.
    let known = a.get(b"pre/0").await.unwrap().unwrap();
    put(&a, "a/1", "a").await;
    put(&b, "pre/0", "b2").await;
    let resp = a
        .txn(
            Txn::new()
                .when(Compare::mod_revision("pre/0", known.mod_revision))
                .then(Op::put("pre/0", "a")),
        )
        .await
        .unwrap();
    assert!(!resp.succeeded);
    assert_eq!(value(&b, "pre/0").await.as_deref(), Some("b2"));
    // The same for a delete: a's write names a version that is gone.
    let known = a.get(b"pre/1").await.unwrap().unwrap();
    put(&b, "pre/1", "b2").await;
    let resp = a
        .txn(
            Txn::new()
                .when(Compare::mod_revision("pre/1", known.mod_revision))
                .then(Op::delete("pre/1")),
        )
        .await
        .unwrap();
    assert!(!resp.succeeded);
    assert_eq!(value(&b, "pre/1").await.as_deref(), Some("b2"));
    // Unconditional writes on stale knowledge still land, as a version on
    // top of what b wrote: a put of a key a thinks absent, a delete of a
    // key b rewrote.
    let created = put(&b, "fresh/x", "b").await;
    put(&a, "fresh/x", "a").await;
    let kv = b.get(b"fresh/x").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.version, kv.create_revision),
        (&b"a"[..], 2, created)
    );
    put(&b, "pre/2", "b2").await;
    let resp = a.txn(Txn::new().then(Op::delete("pre/2"))).await.unwrap();
    assert!(resp.succeeded);
    assert_eq!(value(&b, "pre/2").await, None);
    // Writes alternating between the stores keep one gap-free order.
    let start = a.current_revision().await.unwrap();
    for i in 0..20 {
        let s = if i % 2 == 0 { &a } else { &b };
        let rev = put(s, &format!("alt/{i}"), "x").await;
        assert_eq!(rev, start + 1 + i as u64);
    }
    // Compares on keys a never read, guarding writes of other keys, among
    // writes that succeed, so that (with 2 in flight) batches are sent
    // stacked behind committing ones: every compare fails, and nothing it
    // guarded is written.
    for round in 0..20 {
        for t in 0..40 {
            put(&b, &format!("unread/{round}/{t}"), "b").await;
        }
        let mut tasks = Vec::new();
        for t in 0..20usize {
            let a = a.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..4 {
                    if t % 2 == 0 {
                        put(&a, &format!("ok/{round}/{t}/{i}"), "a").await;
                        continue;
                    }
                    let guard = format!("unread/{round}/{}", t * 2 + i % 2);
                    let resp = a
                        .txn(
                            Txn::new()
                                .when(Compare::absent(guard.as_str()))
                                .then(Op::put(format!("mark/{round}/{t}/{i}").as_str(), "a")),
                        )
                        .await
                        .unwrap();
                    assert!(!resp.succeeded, "a compare on an unread key passed");
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    }
    let marks = b.range(b"mark/", b"mark0", 0).await.unwrap();
    assert!(
        marks.kvs.is_empty(),
        "{} guarded writes landed",
        marks.kvs.len()
    );
}

/// Plans are made, and cached per connection, while the store is small;
/// the tables then grow by orders of magnitude before PostgreSQL analyzes
/// them again. A plan that scanned the whole key table when it was tiny
/// kept scanning it (20 ms per read at 200k keys, and keyed claims fell
/// from 15k/s to 2.8k/s within 10 s of a benchmark). No statement of the
/// store may scan `allot_kv`, whatever the statistics say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_statement_scans_the_key_table_after_it_grows() {
    let schema = unique_schema();
    let base = shared_url().await;
    let raw = raw_client(&base).await;
    let connect = |app: &str| {
        let url = format!("{base}?application_name={app}");
        let opts = options(&schema);
        async move { PostgresStore::connect(&url, opts).await.unwrap() }
    };
    // The migration builds indexes, which scans the table: count from after it.
    let migrate = format!("allot-migrate-{schema}");
    drop(connect(&migrate).await);
    let before = scans_once_closed(&raw, &migrate, &schema).await;

    let app = format!("allot-plans-{schema}");
    let s = connect(&app).await;
    for i in 0..3 {
        put(&s, &format!("k/{i}"), "v").await;
    }
    // Statistics of a tiny table, as autovacuum takes them early in a
    // store's life.
    raw.batch_execute(&format!("ANALYZE {schema}.allot_kv"))
        .await
        .unwrap();
    let exercise = |s: PostgresStore, round: usize| async move {
        for i in 0..8 {
            let key = format!("k/{}", i % 3);
            let kv = s.get(key.as_bytes()).await.unwrap().unwrap();
            let read = s
                .txn(Txn::new().then(Op::get("k/0")).then(Op::get("k/1")))
                .await
                .unwrap();
            assert_eq!(read.results.len(), 2);
            let listed = s.range(b"k/", b"k0", 0).await.unwrap();
            assert!(listed.kvs.len() >= 3);
            // A compare on a key read: the commit checks it in the table.
            let resp = s
                .txn(
                    Txn::new()
                        .when(Compare::mod_revision(key.as_str(), kv.mod_revision))
                        .then(Op::put(key.as_str(), format!("v{round}.{i}"))),
                )
                .await
                .unwrap();
            assert!(resp.succeeded);
            let lease = s.lease_grant(Duration::from_secs(60)).await.unwrap();
            s.txn(Txn::new().then(Op::put_with_lease(format!("l/{round}.{i}"), "x", lease)))
                .await
                .unwrap();
            s.lease_revoke(lease).await.unwrap();
        }
    };
    // Enough calls for PostgreSQL to switch to cached generic plans.
    exercise(s.clone(), 0).await;
    for chunk in 0..10 {
        let mut txn = Txn::new();
        for i in 0..2000 {
            txn = txn.then(Op::put(format!("grow/{chunk}/{i}"), "g"));
        }
        assert!(s.txn(txn).await.unwrap().succeeded);
    }
    exercise(s.clone(), 1).await;
    drop(s);
    let after = scans_once_closed(&raw, &app, &schema).await;
    // The index scans show the statistics arrived, so no change means none.
    assert!(after.1 > before.1, "no index scans counted on allot_kv");
    assert_eq!(
        after.0 - before.0,
        0,
        "allot_kv was scanned whole {} times ({} index scans)",
        after.0 - before.0,
        after.1 - before.1
    );
}

/// Waits until every connection named `app` has closed (a backend reports
/// its statistics when it exits at the latest), then reads the whole-table
/// and index scans counted on the schema's `allot_kv`.
async fn scans_once_closed(raw: &tokio_postgres::Client, app: &str, schema: &str) -> (i64, i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let row = raw
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .await
            .unwrap();
        if row.get::<_, i64>(0) == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the store's connections did not close"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let row = raw
        .query_one(
            "SELECT seq_scan, idx_scan FROM pg_stat_user_tables WHERE relid = $1::text::regclass",
            &[&format!("{schema}.allot_kv")],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// The history bounds run after each write that crossed one, in their own
/// transaction and without the revision lock while they delete, so bounds
/// of concurrent writers (two stores, both commit modes) overlap each other
/// and the writes. Afterwards the bookkeeping must match the log exactly,
/// both bounds must hold, and the retained history must be gap-free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_bounds_hold_under_concurrent_writers() {
    const KEEP_REVISIONS: u64 = 40;
    const KEEP_EVENTS: u64 = 150;
    let url = shared_url().await;
    let schema = unique_schema();
    let open = |in_flight: usize| {
        let url = url.clone();
        let opts = PostgresOptions {
            history_revisions: KEEP_REVISIONS,
            history_events: KEEP_EVENTS,
            max_in_flight: in_flight,
            ..options(&schema)
        };
        async move { PostgresStore::connect(&url, opts).await.unwrap() }
    };
    let (a, b) = (open(1).await, open(2).await);
    let mut tasks = Vec::new();
    for t in 0..16usize {
        let s = if t % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            for i in 0..40usize {
                // 1 to 7 events per transaction.
                let mut txn = Txn::new();
                for j in 0..=(t + i) % 7 {
                    txn = txn.then(Op::put(format!("t{t}/{j}"), format!("{i}")));
                }
                assert!(s.txn(txn).await.unwrap().succeeded);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }

    let raw = raw_client(&url).await;
    let row = raw
        .query_one(
            &format!(
                "SELECT r.revision, r.oldest, r.history_events, \
                   (SELECT count(*) FROM {schema}.allot_log), \
                   (SELECT min(revision) FROM {schema}.allot_log) \
                 FROM {schema}.allot_revision r"
            ),
            &[],
        )
        .await
        .unwrap();
    let (revision, oldest, counted, rows, first): (i64, i64, i64, i64, Option<i64>) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(revision, 1 + 16 * 40, "one revision per transaction");
    assert_eq!(counted, rows, "the event count matches the log");
    assert!(rows as u64 <= KEEP_EVENTS, "{rows} events kept");
    assert!(
        (revision + 1 - oldest) as u64 <= KEEP_REVISIONS + KEEP_REVISIONS / 10,
        "revisions {oldest}..={revision} kept"
    );
    assert!(
        first.is_some_and(|f| f >= oldest),
        "no log row before {oldest}"
    );
    // Watchable from the oldest retained revision on, with no gap.
    let (watch_oldest, events) = allot_store::conformance::retained_history(&a).await;
    assert_eq!(watch_oldest as i64, oldest);
    assert_eq!(events.len() as i64, rows);
}
