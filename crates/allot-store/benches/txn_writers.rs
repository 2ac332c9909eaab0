//! Durable transaction throughput of the embedded backends, redb vs the
//! log store: N concurrent writers (tokio tasks), each looping on a small
//! 3-key transaction — a compare on its first key's `mod_revision` (the
//! revision its previous transaction wrote) and 3 puts of 60-byte values —
//! on a fresh store per level (default options: every commit fsynced).
//! Reports transactions/s, group commits/s (one fsync each) and latency
//! percentiles over the measured window, after a warm-up.
//!
//! Run: `cargo bench -p allot-store --bench txn_writers`
//!
//! Environment (defaults in brackets):
//! - `ALLOT_BENCH_SECS` [5]: measured seconds per level;
//! - `ALLOT_BENCH_WARMUP_SECS` [1]: warm-up seconds before each level;
//! - `ALLOT_BENCH_CONCURRENCY` [1,8,64]: the numbers of writers;
//! - `ALLOT_BENCH_STORES` [redb,log]: the backends, in order;
//! - `ALLOT_BENCH_ROUNDS` [1]: how many times the whole set is repeated
//!   (backends alternate, so drift in the machine's load hits both alike);
//! - `ALLOT_BENCH_DIR` [system temp dir]: where the stores are made (must be
//!   a disk, not tmpfs, for the fsync cost to show).

use std::sync::Arc;
use std::time::{Duration, Instant};

use allot_store::{Compare, LogOptions, LogStore, Op, RedbOptions, RedbStore, Store, Txn};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// An open store of one backend, with its commit counter.
struct Opened {
    store: Arc<dyn Store>,
    commits: Box<dyn Fn() -> u64>,
    close: Box<dyn FnOnce()>,
}

fn open(kind: &str, dir: &std::path::Path) -> Opened {
    match kind {
        "redb" => {
            let s = RedbStore::open(dir.join("bench.redb"), RedbOptions::default())
                .expect("opening redb");
            let c = s.clone();
            let closing = s.clone();
            Opened {
                store: Arc::new(s),
                commits: Box::new(move || c.commits()),
                close: Box::new(move || closing.close().expect("closing redb")),
            }
        }
        "log" => {
            let s = LogStore::open(dir.join("log"), LogOptions::default()).expect("opening log");
            let c = s.clone();
            let closing = s.clone();
            Opened {
                store: Arc::new(s),
                commits: Box::new(move || c.commits()),
                close: Box::new(move || closing.close().expect("closing log store")),
            }
        }
        other => panic!("ALLOT_BENCH_STORES: unknown backend {other:?} (redb, log)"),
    }
}

struct Level {
    txns: usize,
    commits: u64,
    lat: Vec<Duration>,
}

async fn level(
    store: Arc<dyn Store>,
    commits: &dyn Fn() -> u64,
    n: usize,
    warmup: Duration,
    secs: Duration,
) -> Level {
    let start = Instant::now();
    let from = start + warmup;
    let to = from + secs;
    let value = vec![b'v'; 60];
    let mut tasks = Vec::new();
    for w in 0..n {
        let store = store.clone();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let keys = [
                format!("w{w:03}/a"),
                format!("w{w:03}/b"),
                format!("w{w:03}/c"),
            ];
            let mut last = 0;
            let mut lat = Vec::new();
            loop {
                let t0 = Instant::now();
                if t0 >= to {
                    break;
                }
                let txn = Txn::new()
                    .when(Compare::mod_revision(&keys[0], last))
                    .then(Op::put(&keys[0], &value))
                    .then(Op::put(&keys[1], &value))
                    .then(Op::put(&keys[2], &value));
                let resp = store.txn(txn).await.expect("transaction failed");
                assert!(resp.succeeded, "writer {w}: compare failed");
                last = resp.revision;
                let t1 = Instant::now();
                if t1 >= from && t1 <= to {
                    lat.push(t1 - t0);
                }
            }
            lat
        }));
    }
    tokio::time::sleep_until(from.into()).await;
    let c0 = commits();
    tokio::time::sleep_until(to.into()).await;
    let c1 = commits();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("writer panicked"));
    }
    lat.sort_unstable();
    Level {
        txns: lat.len(),
        commits: c1 - c0,
        lat,
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e3
}

fn main() {
    let secs = Duration::from_secs_f64(env_or("ALLOT_BENCH_SECS", 5.0));
    let warmup = Duration::from_secs_f64(env_or("ALLOT_BENCH_WARMUP_SECS", 1.0));
    let levels: Vec<usize> = env_list("ALLOT_BENCH_CONCURRENCY", "1,8,64")
        .iter()
        .map(|s| s.parse().expect("ALLOT_BENCH_CONCURRENCY: a number"))
        .collect();
    let stores = env_list("ALLOT_BENCH_STORES", "redb,log");
    let rounds: usize = env_or("ALLOT_BENCH_ROUNDS", 1usize).max(1);
    let base = std::env::var("ALLOT_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");

    println!(
        "durable 3-key transactions (compare + 3 puts of 60 B), {} s measured after {} s warm-up, in {}",
        secs.as_secs_f64(),
        warmup.as_secs_f64(),
        base.display()
    );
    println!(
        "{:>5} | {:>5} | {:>7} | {:>9} | {:>10} | {:>10} | {:>7} | {:>7} | {:>7}",
        "round",
        "store",
        "writers",
        "txn/s",
        "commits/s",
        "txn/commit",
        "mean ms",
        "p50 ms",
        "p99 ms"
    );
    println!("{}", "-".repeat(90));
    for round in 1..=rounds {
        for &n in &levels {
            for kind in &stores {
                let dir = tempfile::Builder::new()
                    .prefix("allot-txn-bench-")
                    .tempdir_in(&base)
                    .expect("creating a temporary directory");
                let opened = open(kind, dir.path());
                let r = rt.block_on(level(
                    opened.store.clone(),
                    &*opened.commits,
                    n,
                    warmup,
                    secs,
                ));
                drop(opened.store);
                (opened.close)();
                let s = secs.as_secs_f64();
                let mean =
                    r.lat.iter().sum::<Duration>().as_secs_f64() * 1e3 / r.txns.max(1) as f64;
                println!(
                    "{:>5} | {:>5} | {:>7} | {:>9.0} | {:>10.0} | {:>10.1} | {:>7.3} | {:>7.3} | {:>7.3}",
                    round,
                    kind,
                    n,
                    r.txns as f64 / s,
                    r.commits as f64 / s,
                    r.txns as f64 / r.commits.max(1) as f64,
                    mean,
                    pct(&r.lat, 50.0),
                    pct(&r.lat, 99.0),
                );
            }
        }
    }
}
