//! The change stream: one event per changing transaction, in revision order;
//! resuming from a revision misses nothing and repeats nothing; history that
//! was compacted away is a clear error.

use std::sync::Arc;
use std::time::Duration;

use allot::{is_compacted, AllocRequest, Allot, Change, Event, PoolKind, PoolSpec, Target};
use allot_store::{MemoryStore, RedbOptions, RedbStore, Store};
use futures::StreamExt;

async fn next(s: &mut futures::stream::BoxStream<'static, allot::Result<Event>>) -> Event {
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("event in time")
        .expect("open")
        .expect("ok")
}

async fn scenario(allot: &Allot) {
    allot
        .create_pool(
            "ids",
            PoolSpec::new(PoolKind::Range { lo: 1, hi: 100 }),
            Default::default(),
        )
        .await
        .unwrap();
    allot
        .allocate("ids", AllocRequest::key("a").owner("o"))
        .await
        .unwrap();
    allot.allocate("ids", AllocRequest::many(2)).await.unwrap();
    // An idempotent re-claim changes nothing and makes no event.
    allot.allocate("ids", AllocRequest::key("a")).await.unwrap();
    allot
        .release("ids", Target::Value("2".into()))
        .await
        .unwrap();
    allot.resync_begin("ids", None).await.unwrap();
    allot.resync_end("ids", None).await.unwrap();
    allot.delete_pool("ids", true).await.unwrap();
}

fn summary(e: &Event) -> String {
    match &e.change {
        Change::PoolCreated { pool, .. } => format!("created {pool}"),
        Change::PoolDeleted { pool } => format!("deleted {pool}"),
        Change::Claims {
            allocated,
            released,
            ..
        } => format!(
            "claims +{:?} -{:?}",
            allocated
                .iter()
                .map(|c| c.value.as_str())
                .collect::<Vec<_>>(),
            released
                .iter()
                .map(|c| c.value.as_str())
                .collect::<Vec<_>>()
        ),
        Change::ResyncBegun { .. } => "resync begun".into(),
        Change::ResyncEnded { released, .. } => format!("resync ended, {released} released"),
        Change::MemberUp {
            member,
            incarnation,
            ..
        } => format!("member up {member} {incarnation}"),
        Change::MemberDown {
            member,
            incarnation,
        } => format!("member down {member} {incarnation:?}"),
    }
}

const EXPECTED: [&str; 8] = [
    "created ids",
    "claims +[\"1\"] -[]",
    "claims +[\"2\", \"3\"] -[]",
    "claims +[] -[\"2\"]",
    "resync begun",
    "claims +[] -[\"1\"]",
    "resync ended, 1 released",
    "deleted ids",
];

async fn check(store: Arc<dyn Store>) {
    let start = store.current_revision().await.unwrap() + 1;
    let allot = Allot::new(store.clone());
    let mut live = allot.watch(0).await.unwrap();
    scenario(&allot).await;
    let mut got = Vec::new();
    for _ in 0..EXPECTED.len() {
        got.push(next(&mut live).await);
    }
    assert_eq!(got.iter().map(summary).collect::<Vec<_>>(), EXPECTED);
    assert!(
        got.windows(2).all(|w| w[0].revision < w[1].revision),
        "revisions increase"
    );
    assert_eq!(
        got[1].change,
        Change::Claims {
            pool: "ids".into(),
            allocated: vec![allot::EventClaim {
                value: "1".into(),
                key: Some("a".into()),
                owner: Some("o".into())
            }],
            released: vec![],
        }
    );

    // Replay from the start, and resume from the middle: same events, no gaps, no repeats.
    let mut replay = allot.watch(start).await.unwrap();
    for want in &got {
        assert_eq!(&next(&mut replay).await, want);
    }
    let mid = got[3].revision;
    let mut resumed = allot.watch(mid + 1).await.unwrap();
    for want in &got[4..] {
        assert_eq!(&next(&mut resumed).await, want);
    }

    // History before a compaction is gone, with a clear error.
    store.compact(got[5].revision).await.unwrap();
    let err = match allot.watch(start).await {
        Err(e) => e,
        Ok(mut s) => s.next().await.expect("an item").expect_err("compacted"),
    };
    assert!(is_compacted(&err), "{err}");
    assert!(err.to_string().contains("compacted"));
    let mut after = allot.watch(got[5].revision).await.unwrap();
    assert_eq!(next(&mut after).await, got[5]);
}

#[tokio::test]
async fn change_stream_on_memory() {
    check(Arc::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_stream_on_redb() {
    let dir = tempfile::tempdir().unwrap();
    check(Arc::new(
        RedbStore::open(dir.path().join("allot.redb"), RedbOptions::default()).unwrap(),
    ))
    .await;
}

/// Members joining and going show up in the same stream, in revision order.
#[tokio::test(start_paused = true)]
async fn member_up_and_down_events() {
    let store: Arc<dyn Store> = Arc::new(allot_store::MemoryStore::new());
    let allot = Allot::with_clock(store, Arc::new(allot::TokioClock::new()));
    let mut events = allot.watch(0).await.unwrap();
    let options = allot::MemberOptions {
        address: Some("10.0.0.7".into()),
        ..allot::MemberOptions::default()
    };
    let m = allot.join("amf-7", options.clone()).await.unwrap();
    m.leave().await.unwrap();
    let crashed = allot.join("amf-7", options).await.unwrap();
    drop(crashed); // no leave: the lease runs out
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(summary(&next(&mut events).await));
    }
    assert_eq!(
        seen,
        [
            "member up amf-7 1",
            "member down amf-7 Some(1)",
            "member up amf-7 2",
            "member down amf-7 Some(2)",
        ]
    );
}
