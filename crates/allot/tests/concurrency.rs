//! Concurrency stress: many tasks on two engines sharing one store (as two
//! servers would on PostgreSQL or etcd), so batches race and lose compares.
//! Afterwards: no value held twice, every key bound to exactly one value, all
//! tasks that claimed the same key saw the same value, and the stored state
//! equals what was acknowledged.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use allot::{AllocRequest, Allot, Error, PoolKind, PoolSpec, Strategy, Target};
use allot_store::{MemoryStore, RedbOptions, RedbStore, Store};

const TASKS: usize = 24;
const OPS: usize = 120;
const KEYS: usize = 40;

/// Requests refused with `Contention` (retryable) and all requests made.
static CONTENDED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn contended(e: &Error) -> bool {
    let hit = matches!(e, Error::Contention(_));
    if hit {
        CONTENDED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    hit
}

#[derive(Default)]
struct Seen {
    /// key -> values acknowledged for it, in ack order (between releases).
    key_values: BTreeMap<String, Vec<String>>,
    /// Values acknowledged as held by unkeyed claims and not released since.
    bare: BTreeSet<String>,
}

async fn stress(store: Arc<dyn Store>, strategy: Strategy) {
    let a = Allot::new(store.clone());
    let b = Allot::new(store);
    let mut spec = PoolSpec::new(PoolKind::Range { lo: 0, hi: 299 });
    spec.block_size = 64;
    spec.strategy = strategy;
    a.create_pool("s", spec, Default::default()).await.unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let engine = if t % 2 == 0 { a.clone() } else { b.clone() };
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine: Vec<String> = Vec::new();
            for i in 0..OPS {
                let r = (t * 7919 + i * 104_729) % 100;
                if r < 45 {
                    // Keys are shared between tasks: concurrent claims of one key.
                    let key = format!("k{}", (t + i) % KEYS);
                    match engine.allocate("s", AllocRequest::key(&key)).await {
                        Ok(c) => seen
                            .lock()
                            .unwrap()
                            .key_values
                            .entry(key)
                            .or_default()
                            .push(c[0].value.clone()),
                        Err(Error::Exhausted { .. }) => {}
                        Err(e) if contended(&e) => {}
                        Err(e) => panic!("claim {key}: {e}"),
                    }
                } else if r < 75 {
                    match engine
                        .allocate("s", AllocRequest::many(1 + (i % 3) as u64))
                        .await
                    {
                        Ok(cs) => {
                            let mut s = seen.lock().unwrap();
                            for c in cs {
                                assert!(
                                    s.bare.insert(c.value.clone()),
                                    "value {} handed out twice",
                                    c.value
                                );
                                mine.push(c.value);
                            }
                        }
                        Err(Error::Exhausted { .. }) => {}
                        Err(e) if contended(&e) => {}
                        Err(e) => panic!("alloc: {e}"),
                    }
                } else if r < 90 {
                    if let Some(v) = mine.pop() {
                        // Forget it before the release lands: once it does,
                        // another task may get it at once.
                        seen.lock().unwrap().bare.remove(&v);
                        match engine.release("s", Target::Value(v.clone())).await {
                            Ok(_) => {}
                            Err(e) if contended(&e) => {
                                seen.lock().unwrap().bare.insert(v.clone());
                                mine.push(v);
                            }
                            Err(e) => panic!("release {v}: {e}"),
                        }
                    }
                } else {
                    // Only the upper half of the keys is ever released, so the
                    // lower half must keep one value for the whole run.
                    let key = format!("k{}", KEYS / 2 + (t * 3 + i) % (KEYS / 2));
                    match engine.release("s", Target::Key(key.clone())).await {
                        Ok(_) => {}
                        Err(Error::NotFound(_)) => {}
                        Err(e) if contended(&e) => {}
                        Err(e) => panic!("release key {key}: {e}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let contended = CONTENDED.swap(0, std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{strategy:?}: {contended} of {} requests refused as contended",
        TASKS * OPS
    );
    // Keys that are never released were claimed with one value by everybody.
    let seen = Arc::try_unwrap(seen).ok().unwrap().into_inner().unwrap();
    for k in 0..KEYS / 2 {
        let key = format!("k{k}");
        if let Some(hist) = seen.key_values.get(&key) {
            let distinct: BTreeSet<_> = hist.iter().collect();
            assert_eq!(
                distinct.len(),
                1,
                "key {key} got several values: {distinct:?}"
            );
        }
    }
    // Stored state: unique values; keys unique; counts agree; both engines agree.
    for engine in [&a, &b] {
        let page = engine.list_claims("s", None, 1000).await.unwrap();
        let values: BTreeSet<_> = page.claims.iter().map(|c| c.value.clone()).collect();
        assert_eq!(values.len(), page.claims.len(), "a value is listed twice");
        let keys: Vec<_> = page.claims.iter().filter_map(|c| c.key.clone()).collect();
        let unique_keys: BTreeSet<_> = keys.iter().collect();
        assert_eq!(keys.len(), unique_keys.len(), "a key holds two values");
        for c in page.claims.iter().filter(|c| c.key.is_none()) {
            assert!(
                seen.bare.contains(&c.value),
                "unacknowledged bare value {} is held",
                c.value
            );
        }
        for v in &seen.bare {
            assert!(values.contains(v), "acknowledged value {v} was lost");
        }
        for k in &keys {
            let c = engine.lookup("s", Target::Key(k.clone())).await.unwrap();
            assert!(values.contains(&c.value));
        }
    }
    // The in-memory counters of a fresh engine match the store.
    let fresh = Allot::new(a.store().clone());
    let listed = fresh
        .list_claims("s", None, 1000)
        .await
        .unwrap()
        .claims
        .len() as u64;
    assert_eq!(fresh.pool("s").await.unwrap().stats.allocated, listed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_on_memory_store() {
    for strategy in [Strategy::Lowest, Strategy::Next, Strategy::Random] {
        stress(Arc::new(MemoryStore::new()), strategy).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_on_redb() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("allot.redb"), RedbOptions::default()).unwrap();
    stress(Arc::new(store), Strategy::Lowest).await;
}
