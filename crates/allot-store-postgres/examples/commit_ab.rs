//! A/B of the committer: the same store-level workload on three stores of one
//! throw-away PostgreSQL server, one with `max_in_flight = 0` (locked path
//! only) and ones speculating (one batch at a time, or stacked), interleaved in
//! short rounds so that all see the same machine load.
//!
//! `cargo run --release -p allot-store-postgres --example commit_ab`
//! (env: AB_ROUNDS [6], AB_SECS per round [1], AB_CLIENTS [1,8,64]). Three
//! stores: `locked` (`max_in_flight` 0), `spec1` (1), `spec2` (2, stacked: the default).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use allot_store::{Compare, Op, Store, Txn};
use allot_store_postgres::{PostgresOptions, PostgresStore};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Each client loops on a claim-shaped txn: compare a fresh key absent and
/// a shared "block" key's version, put both plus a change record.
async fn round(store: &PostgresStore, clients: usize, secs: f64, tag: &str) -> (u64, Vec<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (s, stop, done) = (store.clone(), stop.clone(), done.clone());
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("k/{tag}/{c}/{i}");
                let block = format!("b/{tag}/{c}");
                let t = Instant::now();
                let r = s
                    .txn(
                        Txn::new()
                            .when(Compare::absent(key.as_str()))
                            .then(Op::put(key.as_str(), "v"))
                            .then(Op::put(block.as_str(), i.to_string()))
                            .then(Op::put(format!("e/{tag}"), "x")),
                    )
                    .await
                    .expect("txn");
                assert!(r.succeeded);
                lat.push(t.elapsed().as_micros() as u64);
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort_unstable();
    (done.load(Ordering::Relaxed), all)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let rounds: usize = env("AB_ROUNDS", 6);
    let secs: f64 = env("AB_SECS", 1.0);
    let clients: Vec<usize> = std::env::var("AB_CLIENTS")
        .unwrap_or_else(|_| "1,8,64".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let server = allot_store_postgres::testing::start_server().await;
    let open = |schema: &str, in_flight: usize| {
        let url = server.url();
        let opts = PostgresOptions {
            schema: schema.into(),
            max_in_flight: in_flight,
            ..PostgresOptions::default()
        };
        async move { PostgresStore::connect(&url, opts).await.expect("connect") }
    };
    let stores = [
        ("locked", open("ab_locked", 0).await),
        ("spec1", open("ab_spec1", 1).await),
        ("spec2", open("ab_spec2", 2).await),
    ];
    for &n in &clients {
        let mut totals = vec![(0u64, Vec::new()); stores.len()];
        for r in 0..rounds {
            for (i, (name, s)) in stores.iter().enumerate() {
                let (count, lat) = round(s, n, secs, &format!("{name}{n}r{r}")).await;
                totals[i].0 += count;
                totals[i].1.extend(lat);
            }
        }
        for (i, (name, _)) in stores.iter().enumerate() {
            let (count, lat) = &mut totals[i];
            lat.sort_unstable();
            let p = |q: f64| {
                lat.get(((lat.len() as f64 - 1.0) * q) as usize)
                    .copied()
                    .unwrap_or(0) as f64
                    / 1000.0
            };
            println!(
                "clients {n:3} {name:7}: {:8.0} txn/s  p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms",
                *count as f64 / (rounds as f64 * secs),
                p(0.5),
                p(0.9),
                p(0.99)
            );
        }
    }
}
