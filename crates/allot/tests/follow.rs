//! Engines sharing one store follow each other's writes: counters and pool
//! definitions served from one engine's cache catch up with what another
//! engine did (`Allot::follow_other_writers`).

mod support;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use allot::{AllocRequest, Allot, Error, PoolKind, PoolSpec, Target};
use allot_store::{MemoryStore, Store};
use support::Counting;

fn spec(hi: u64) -> PoolSpec {
    let mut spec = PoolSpec::new(PoolKind::Range { lo: 1, hi });
    spec.block_size = 64;
    spec
}

/// Polls `check` until it holds (the watch delivers asynchronously).
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn allocated(engine: &Allot, pool: &str) -> Result<u64, Error> {
    Ok(engine.pool(pool).await?.stats.allocated)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_counters_and_pools_follow_the_other_engine() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let a = Allot::new(store.clone());
    let b = Allot::new(store.clone());
    a.follow_other_writers();
    b.follow_other_writers();
    // An engine that does not follow keeps what it cached: the contrast
    // shows the follower is what brings the others' writes in.
    let lone = Allot::new(store.clone());

    a.create_pool("ids", spec(1000), Default::default())
        .await
        .unwrap();
    assert_eq!(allocated(&b, "ids").await.unwrap(), 0);
    assert_eq!(allocated(&lone, "ids").await.unwrap(), 0);

    // Values over several blocks, some keyed.
    let mut values = Vec::new();
    for i in 0..150 {
        let req = if i % 2 == 0 {
            AllocRequest::key(format!("k{i}"))
        } else {
            AllocRequest::default()
        };
        values.push(a.allocate("ids", req).await.unwrap().remove(0).value);
    }
    eventually("B counts A's 150 claims", || async {
        allocated(&b, "ids").await.unwrap() == 150
    })
    .await;
    assert_eq!(allocated(&lone, "ids").await.unwrap(), 0, "not following");

    // B releases some of A's values; A's cache follows.
    for v in &values[..40] {
        b.release("ids", Target::Value(v.clone())).await.unwrap();
    }
    eventually("A sees B's 40 releases", || async {
        allocated(&a, "ids").await.unwrap() == 110
    })
    .await;

    // Deleted through A: B stops serving it; re-created with another
    // definition: B serves the new one.
    a.delete_pool("ids", true).await.unwrap();
    eventually("B forgets the deleted pool", || async {
        matches!(b.pool("ids").await, Err(Error::PoolNotFound(_)))
    })
    .await;
    a.create_pool("ids", spec(10), Default::default())
        .await
        .unwrap();
    eventually("B serves the new definition", || async {
        b.pool("ids")
            .await
            .is_ok_and(|p| p.stats.size == 10 && p.stats.allocated == 0)
    })
    .await;
    for _ in 0..10 {
        b.allocate("ids", AllocRequest::default()).await.unwrap();
    }
    assert!(matches!(
        a.allocate("ids", AllocRequest::default()).await,
        Err(Error::Exhausted { .. })
    ));
    eventually("A counts B's claims", || async {
        allocated(&a, "ids").await.unwrap() == 10
    })
    .await;
    a.close().await;
    b.close().await;
}

/// Another engine's write to a block lands after one of ours to the same
/// block has committed but before its answer came back: the follower sees
/// it while our batch is still in flight. It must not be taken for ours:
/// once our batch settles, the block is re-read before the next answer
/// from the cache (before, the count stayed one claim short for good: the
/// bench's two engines on one pool showed it as an allocated count 32
/// below the claims acknowledged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_seen_while_ours_is_answered_is_not_taken_for_ours() {
    let store = Counting::new();
    let a = Allot::new(store.clone());
    let b = Allot::new(store.clone());
    a.follow_other_writers();
    b.follow_other_writers();
    a.create_pool("ids", spec(1000), Default::default())
        .await
        .unwrap();
    assert_eq!(allocated(&a, "ids").await.unwrap(), 0);
    assert_eq!(allocated(&b, "ids").await.unwrap(), 0);

    // Writes commit at once and are answered 500 ms later.
    store.answer_delay_ms.store(500, Ordering::SeqCst);
    let first = {
        let a = a.clone();
        tokio::spawn(async move { a.allocate("ids", AllocRequest::key("a")).await })
    };
    // B claims in the same block while A's answer is on its way, and A's
    // follower sees B's write meanwhile.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = b.allocate("ids", AllocRequest::key("b")).await.unwrap();
    let first = first.await.unwrap().unwrap();
    store.answer_delay_ms.store(0, Ordering::SeqCst);
    assert_ne!(first[0].value, second[0].value);

    eventually("B counts both claims", || async {
        allocated(&b, "ids").await.unwrap() == 2
    })
    .await;
    eventually("A counts both claims", || async {
        allocated(&a, "ids").await.unwrap() == 2
    })
    .await;
}
