//! Once a pool's claims keep finding their keys new, batches guess new keys
//! absent instead of reading them first (a round trip on a shared store).
//! These tests check that the guess is made (no reads), that a wrong guess
//! still answers with the value the key holds, and that guessing engines
//! racing over shared keys never bind a key to two values.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use allot::{AllocRequest, Allot, Error, PoolKind, PoolSpec, Strategy};
use support::Counting;

async fn pool(engine: &Allot) {
    let spec = PoolSpec::new(PoolKind::Range { lo: 0, hi: 99_999 });
    engine
        .create_pool("ids", spec, Default::default())
        .await
        .unwrap();
}

/// Claims `n` new keys one at a time (one batch each).
async fn claim_new(engine: &Allot, prefix: &str, n: usize) {
    for i in 0..n {
        engine
            .allocate("ids", AllocRequest::key(format!("{prefix}-{i}")))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn new_keys_are_claimed_without_reading_once_they_keep_being_new() {
    let store = Counting::new();
    let engine = Allot::new(store.clone());
    pool(&engine).await;
    store.take_reads();
    claim_new(&engine, "warm", 40).await;
    let warming = store.take_reads();
    assert!(
        warming >= 32,
        "the first claims read their keys: {warming} reads for 40 claims"
    );
    claim_new(&engine, "new", 50).await;
    assert_eq!(store.take_reads(), 0, "claims of new keys read the store");
    // Request ids are records new requests create too.
    for i in 0..10 {
        engine
            .allocate("ids", AllocRequest::one().request_id(format!("r{i}")))
            .await
            .unwrap();
    }
    assert_eq!(store.take_reads(), 0, "new request ids read the store");
}

#[tokio::test]
async fn a_wrong_guess_answers_with_the_value_the_key_holds() {
    let store = Counting::new();
    let a = Allot::new(store.clone());
    let b = Allot::new(store.clone());
    pool(&a).await;
    claim_new(&a, "warm", 40).await;
    let held = b
        .allocate("ids", AllocRequest::key("shared"))
        .await
        .unwrap();
    store.take_reads();
    // `a` guesses "shared" is new; the store refuses the guess.
    let got = a
        .allocate("ids", AllocRequest::key("shared"))
        .await
        .unwrap();
    assert_eq!(got[0].value, held[0].value);
    assert!(
        store.take_reads() > 0,
        "the retry after a wrong guess reads"
    );
    // Guessing is off until claims keep finding their keys new again.
    claim_new(&a, "after", 1).await;
    assert!(
        store.take_reads() > 0,
        "a claim right after a wrong guess reads"
    );
    // A repeated request id is answered from the first answer.
    claim_new(&a, "rewarm", 40).await;
    let first = a
        .allocate("ids", AllocRequest::many(2).request_id("again"))
        .await
        .unwrap();
    claim_new(&a, "rewarm2", 40).await;
    let repeat = a
        .allocate("ids", AllocRequest::many(2).request_id("again"))
        .await
        .unwrap();
    assert_eq!(first, repeat);
    let stats = a.pool("ids").await.unwrap().stats;
    assert_eq!(stats.allocated, 40 + 1 + 1 + 40 + 2 + 40);
}

/// A refusal writes nothing, so the store never checks a guess it rests
/// on: such answers are judged on what is read. (With `Random` a full
/// pool refuses without touching its cursor.)
#[tokio::test]
async fn a_full_pool_answers_a_claim_of_a_key_it_holds() {
    let store = Counting::new();
    let engine = Allot::new(store.clone());
    let mut spec = PoolSpec::new(PoolKind::Range { lo: 0, hi: 49 });
    spec.strategy = Strategy::Random;
    engine
        .create_pool("ids", spec, Default::default())
        .await
        .unwrap();
    claim_new(&engine, "warm", 40).await;
    let held = engine
        .allocate("ids", AllocRequest::key("x"))
        .await
        .unwrap();
    claim_new(&engine, "fill", 9).await;
    assert!(matches!(
        engine.allocate("ids", AllocRequest::key("y")).await,
        Err(Error::Exhausted { .. })
    ));
    let again = engine
        .allocate("ids", AllocRequest::key("x"))
        .await
        .unwrap();
    assert_eq!(again, held);
}

/// A key claimed again while its first claim is still committing is
/// looked up in that batch's writes, and followed to its claim record:
/// never guessed.
#[tokio::test]
async fn a_key_claimed_again_while_its_first_claim_commits() {
    let store = Counting::new();
    let engine = Allot::new(store.clone());
    pool(&engine).await;
    claim_new(&engine, "warm", 40).await;
    store.answer_delay_ms.store(20, Ordering::SeqCst);
    let first = tokio::spawn({
        let engine = engine.clone();
        async move { engine.allocate("ids", AllocRequest::key("x")).await }
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let second = engine
        .allocate("ids", AllocRequest::key("x"))
        .await
        .unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first, second);
}

/// Two engines, mostly new keys, every tenth key claimed by both engines:
/// wrong guesses happen while later batches are stacked on the guessing one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_guessing_over_shared_keys_bind_each_key_once() {
    const TASKS: usize = 16;
    const CLAIMS: usize = 150;
    let store = Counting::new();
    let a = Allot::new(store.clone());
    let b = Allot::new(store.clone());
    pool(&a).await;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let engine = if t % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in 0..CLAIMS {
                let key = if i % 10 == 0 {
                    format!("shared-{}", i / 10)
                } else {
                    format!("t{t}-{i}")
                };
                // Two engines on one block lose compares to each other; a
                // request that lost too often is refused as contended, and
                // clients retry it.
                let mut tries = 0;
                let c = loop {
                    match engine.allocate("ids", AllocRequest::key(&key)).await {
                        Ok(c) => break c,
                        Err(Error::Contention(_)) if tries < 10 => tries += 1,
                        Err(e) => panic!("claim {key}: {e}"),
                    }
                };
                seen.push((key, c[0].value.clone()));
            }
            seen
        }));
    }
    let mut values: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for t in tasks {
        for (key, value) in t.await.unwrap() {
            values.entry(key).or_default().insert(value);
        }
    }
    for (key, vs) in &values {
        assert_eq!(vs.len(), 1, "key {key} got several values: {vs:?}");
    }
    let held: BTreeSet<&String> = values.values().flatten().collect();
    assert_eq!(held.len(), values.len(), "a value is held by two keys");
    let page = a.list_claims("ids", None, 10_000).await.unwrap();
    assert_eq!(page.claims.len(), values.len());
    for c in &page.claims {
        let key = c.key.as_ref().expect("only keyed claims were made");
        assert!(values[key].contains(&c.value), "{key} holds {}", c.value);
    }
}
