//! Idempotent retries: repeating a request with the same request id returns
//! the first answer and never allocates twice — also when the repeats race
//! each other, and across a restart.

use std::sync::Arc;

use allot::{AllocRequest, Allot, Error, PoolKind, PoolSpec, Target};
use allot_store::{RedbOptions, RedbStore};

fn open(dir: &std::path::Path) -> Allot {
    Allot::new(Arc::new(
        RedbStore::open(dir.join("allot.redb"), RedbOptions::default()).unwrap(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_get_the_first_answer() {
    let dir = tempfile::tempdir().unwrap();
    let allot = open(dir.path());
    allot
        .create_pool(
            "ids",
            PoolSpec::new(PoolKind::Range { lo: 1, hi: 1000 }),
            Default::default(),
        )
        .await
        .unwrap();

    let first = allot
        .allocate("ids", AllocRequest::many(3).request_id("r1"))
        .await
        .unwrap();
    let again = allot
        .allocate("ids", AllocRequest::many(3).request_id("r1"))
        .await
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(allot.pool("ids").await.unwrap().stats.allocated, 3);

    // The same id for another request is refused, and changes nothing.
    let err = allot
        .allocate("ids", AllocRequest::many(4).request_id("r1"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    assert_eq!(allot.pool("ids").await.unwrap().stats.allocated, 3);

    // Racing repeats: one allocation, one answer for all.
    let racing = futures::future::join_all(
        (0..32).map(|_| allot.allocate("ids", AllocRequest::one().owner("x").request_id("race"))),
    )
    .await;
    let answers: std::collections::BTreeSet<String> = racing
        .into_iter()
        .map(|r| r.unwrap()[0].value.clone())
        .collect();
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(allot.pool("ids").await.unwrap().stats.allocated, 4);

    // A repeated release answers like the first one instead of "not claimed".
    let v = first[0].value.clone();
    let r1 = allot
        .release_once("ids", Target::Value(v.clone()), Some("rel".into()))
        .await
        .unwrap();
    let r2 = allot
        .release_once("ids", Target::Value(v.clone()), Some("rel".into()))
        .await
        .unwrap();
    assert_eq!(r1, r2);
    assert!(matches!(
        allot.release("ids", Target::Value(v)).await,
        Err(Error::NotFound(_))
    ));
    assert_eq!(allot.pool("ids").await.unwrap().stats.allocated, 3);

    // Remembered across a restart.
    allot.close().await;
    let allot = open(dir.path());
    let after = allot
        .allocate("ids", AllocRequest::many(3).request_id("r1"))
        .await
        .unwrap();
    assert_eq!(after, first);
    assert_eq!(allot.pool("ids").await.unwrap().stats.allocated, 3);
}
