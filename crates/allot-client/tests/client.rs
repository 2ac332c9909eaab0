//! The client against an in-process `allot_server` on 127.0.0.1: every
//! method, typed errors, idempotent retries, nested pools, and a watch that
//! survives server restarts and reports compacted history.

use std::collections::BTreeMap;
use std::time::Duration;

use allot::{AllocRequest, Change, ParentRef, PoolKind, PoolSpec, Target};
use allot_client::{Client, Error, WatchRetry};
use futures::StreamExt;

mod common;
use common::start;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn api(e: &Error) -> (u16, &str) {
    (e.status().unwrap_or(0), e.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_round_trips_engine_types() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), "127.0.0.1:0", Some("tok")).await;
    let c = Client::new(srv.url()).unwrap().with_token("tok");

    let mut spec = PoolSpec::new(PoolKind::Range { lo: 100, hi: 199 });
    spec.reserved = vec!["150-159".into()];
    let info = c
        .create_pool("vlans", spec.clone(), labels(&[("team", "net")]), None)
        .await
        .unwrap();
    assert_eq!(info.record.spec, spec);
    assert_eq!(info.stats.size, 100);
    assert_eq!(info.description, "integers 100-199");
    let v6 = PoolSpec::new(PoolKind::Addresses {
        cidr: allot::parse_cidr("2001:db8::/64").unwrap(),
        all_addresses: false,
    });
    let big = c
        .create_pool("v6", v6, BTreeMap::new(), None)
        .await
        .unwrap();
    assert_eq!(big.stats.size, 1u128 << 64);

    let claims = c.allocate("vlans", AllocRequest::many(3)).await.unwrap();
    let values: Vec<&str> = claims.iter().map(|c| c.value.as_str()).collect();
    assert_eq!(values, ["100", "101", "102"]);
    let meta = serde_json::json!({"rack": "r1"});
    let keyed = c
        .allocate(
            "vlans",
            AllocRequest::key("site-a")
                .owner("agent-1")
                .meta(meta.clone()),
        )
        .await
        .unwrap();
    assert_eq!(keyed[0].value, "103");
    assert_eq!(keyed[0].meta.as_ref(), Some(&meta));

    // Idempotent retries: the first answer, nothing more claimed.
    let first = c
        .allocate("vlans", AllocRequest::one().request_id("r-1"))
        .await
        .unwrap();
    let again = c
        .allocate("vlans", AllocRequest::one().request_id("r-1"))
        .await
        .unwrap();
    assert_eq!((first[0].value.as_str(), &again), ("104", &first));
    let e = c
        .allocate("vlans", AllocRequest::many(2).request_id("r-1"))
        .await
        .unwrap_err();
    assert_eq!(api(&e), (409, "conflict"));

    let found = c
        .lookup("vlans", Target::Key("site-a".into()))
        .await
        .unwrap();
    assert_eq!(found, keyed[0]);
    let page = c.list_claims("vlans", None, 2).await.unwrap();
    assert_eq!(page.next.as_deref(), Some("101"));
    let page = c.list_claims("vlans", Some("101"), 10).await.unwrap();
    assert_eq!(page.claims.len(), 3);
    assert_eq!(page.next, None);

    let released = c
        .release("vlans", Target::Value("100".into()), Some("rel-1"))
        .await
        .unwrap();
    assert_eq!(released.value, "100");
    let retried = c
        .release("vlans", Target::Value("100".into()), Some("rel-1"))
        .await
        .unwrap();
    assert_eq!(retried, released);
    let e = c
        .release("vlans", Target::Value("100".into()), None)
        .await
        .unwrap_err();
    assert_eq!(api(&e), (404, "not_found"));
    assert_eq!(e.to_string(), "pool 'vlans': value 100 is not allocated");

    let begun = c.resync_begin("vlans", Some("agent-1")).await.unwrap();
    assert_eq!(begun.count, 1);
    let ended = c.resync_end("vlans", Some("agent-1")).await.unwrap();
    assert_eq!(ended.released[0].key.as_deref(), Some("site-a"));
    let e = c.resync_end("vlans", Some("agent-1")).await.unwrap_err();
    assert_eq!(api(&e), (404, "not_found"));

    let shown = c.pool("vlans").await.unwrap();
    assert_eq!(shown.stats.allocated, 3);
    let all = c.list_pools(&BTreeMap::new()).await.unwrap();
    assert_eq!(all.len(), 2);
    let net = c.list_pools(&labels(&[("team", "net")])).await.unwrap();
    assert_eq!(net.len(), 1);
    assert_eq!(net[0], shown);

    let e = c.delete_pool("vlans", false).await.unwrap_err();
    assert_eq!(api(&e), (409, "pool_not_empty"));
    c.delete_pool("vlans", true).await.unwrap();
    let e = c.pool("vlans").await.unwrap_err();
    assert_eq!(api(&e), (404, "pool_not_found"));
    assert_eq!(e.to_string(), "pool 'vlans' not found");

    // Typed errors for the rest: bad input, no token, nobody listening.
    let e = c
        .create_pool(
            "r",
            PoolSpec::new(PoolKind::Range { lo: 9, hi: 1 }),
            BTreeMap::new(),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(api(&e), (400, "invalid_argument"));
    let anon = Client::new(srv.url()).unwrap();
    let e = anon.pool("v6").await.unwrap_err();
    assert_eq!(api(&e), (401, "unauthenticated"));
    srv.stop().await;
    let e = c.pool("v6").await.unwrap_err();
    assert!(matches!(e, Error::Transport { .. }), "{e:?}");
    assert!(e.is_retryable());
    assert!(
        e.to_string()
            .starts_with("cannot reach the allot server at http://127.0.0.1:"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_pools_name_their_parent() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), "127.0.0.1:0", None).await;
    let c = Client::new(srv.url()).unwrap();
    let prefixes = PoolSpec::new(PoolKind::Prefixes {
        cidr: allot::parse_cidr("10.0.0.0/16").unwrap(),
        prefix_len: 24,
        max_prefix_len: 28,
    });
    c.create_pool("supernets", prefixes, BTreeMap::new(), None)
        .await
        .unwrap();
    let got = c.allocate("supernets", AllocRequest::one()).await.unwrap();
    let parent = ParentRef {
        pool: "supernets".into(),
        value: got[0].value.clone(),
    };
    let lan = PoolSpec::new(PoolKind::Addresses {
        cidr: allot::parse_cidr("10.0.0.0/24").unwrap(),
        all_addresses: false,
    });
    let info = c
        .create_pool("lan", lan, BTreeMap::new(), Some(parent.clone()))
        .await
        .unwrap();
    assert_eq!(info.record.parent, Some(parent));
    let e = c
        .release("supernets", Target::Value("10.0.0.0/24".into()), None)
        .await
        .unwrap_err();
    assert_eq!(api(&e), (409, "conflict"));
    srv.stop().await;
}

/// Fast reconnects, so the test does not wait on backoff.
fn quick() -> WatchRetry {
    WatchRetry {
        max_retries: 50,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        idle_timeout: Duration::from_secs(30),
    }
}

async fn next_event(
    events: &mut futures::stream::BoxStream<'static, allot_client::Result<allot::Event>>,
) -> allot_client::Result<allot::Event> {
    tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("no event within 10 s")
        .expect("the stream ended")
}

fn allocated(e: &allot::Event) -> Vec<String> {
    match &e.change {
        Change::Claims { allocated, .. } => allocated.iter().map(|c| c.value.clone()).collect(),
        other => panic!("not a claims change: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_across_restarts_and_reports_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), "127.0.0.1:0", None).await;
    let listen = srv.addr.to_string();
    let c = Client::new(srv.url()).unwrap().with_watch_retry(quick());
    c.create_pool(
        "ids",
        PoolSpec::new(PoolKind::Range { lo: 1, hi: 99 }),
        BTreeMap::new(),
        None,
    )
    .await
    .unwrap();
    c.allocate("ids", AllocRequest::one()).await.unwrap();

    let mut events = c.watch(1);
    let created = next_event(&mut events).await.unwrap();
    assert!(matches!(created.change, Change::PoolCreated { ref pool, .. } if pool == "ids"));
    let one = next_event(&mut events).await.unwrap();
    assert_eq!(allocated(&one), ["1"]);
    assert_eq!(one.revision, created.revision + 1);

    // The server goes away and comes back on the same address; changes
    // made meanwhile (right after the restart) arrive once, in order.
    srv.stop().await;
    let srv = start(dir.path(), &listen, None).await;
    for _ in 0..3 {
        c.allocate("ids", AllocRequest::one()).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut last = one.revision;
    for _ in 0..3 {
        let e = next_event(&mut events).await.unwrap();
        assert_eq!(e.revision, last + 1, "a gap or a repeat: {e:?}");
        last = e.revision;
        seen.extend(allocated(&e));
    }
    assert_eq!(seen, ["2", "3", "4"]);

    // History compacted while the watcher is away: the stream reports it
    // and ends instead of silently skipping changes.
    srv.stop().await;
    // A new data dir gets the log store.
    let db = dir.path().join(allot_server::LOG_DIR);
    let store = allot_store::LogStore::open(&db, allot_store::LogOptions::default()).unwrap();
    let engine = allot::Allot::new(std::sync::Arc::new(store.clone()));
    // Two revisions, so compacting up to the current one drops the first
    // the watcher still needs.
    for _ in 0..2 {
        engine.allocate("ids", AllocRequest::one()).await.unwrap();
    }
    let current = engine.store().current_revision().await.unwrap();
    engine.store().compact(current).await.unwrap();
    engine.close().await;
    store.close().unwrap();
    let srv = start(dir.path(), &listen, None).await;
    let e = next_event(&mut events).await.unwrap_err();
    assert!(e.is_compacted(), "{e:?}");
    assert_eq!(e.status(), Some(410));
    assert!(tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .is_none());

    // From now: only what happens after the watch starts. When exactly it
    // starts is up to the connection, so allocate until something arrives:
    // it must be one of these, never what came before the watch.
    c.allocate("ids", AllocRequest::value("40")).await.unwrap();
    let mut fresh = c.watch(0);
    let mut made = Vec::new();
    let first = loop {
        let v = (50 + made.len()).to_string();
        c.allocate("ids", AllocRequest::value(v.clone()))
            .await
            .unwrap();
        made.push(v);
        if let Ok(item) = tokio::time::timeout(Duration::from_millis(300), fresh.next()).await {
            break item.expect("the stream ended").unwrap();
        }
        assert!(made.len() < 30, "no event after {made:?}");
    };
    let got = allocated(&first);
    assert!(made.contains(&got[0]), "{got:?} not one of {made:?}");
    drop(fresh);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_gives_up_after_bounded_retries() {
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let c = Client::new(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .with_watch_retry(WatchRetry {
            max_retries: 2,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
            idle_timeout: Duration::from_secs(5),
        });
    let mut events = c.watch(1);
    let e = next_event(&mut events).await.unwrap_err();
    assert!(matches!(e, Error::Transport { .. }), "{e:?}");
    assert!(events.next().await.is_none());
}
