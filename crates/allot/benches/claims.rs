//! Durable claim throughput and latency of the engine on each embedded
//! backend — redb (default `RedbOptions`) and the log store (default
//! `LogOptions`), every commit fsynced — in a fresh temporary directory.
//! Both parts run once per backend (`ALLOT_BENCH_STORES`).
//!
//! 1. Keyed claims: N concurrent submitters (tokio tasks) each loop
//!    `allocate(pool, AllocRequest::key(unique))` on a range pool 1..=2^40
//!    (a fresh pool per level); claims/s and latency percentiles over the
//!    measured window, after a warm-up.
//! 2. Bulk claims: the latency of one `AllocRequest::many(100)` on a store
//!    holding nothing else, and on one holding 1,000,000 owned claims (with
//!    claim records) in other pools. Both stores are open at once and are
//!    measured in alternating rounds, so drift in the machine's load hits
//!    both alike. Design target: the filled store within 10% of the empty.
//!
//! Run: cargo bench -p allot --bench claims
//!
//! Environment (defaults in brackets):
//! - `ALLOT_BENCH_SECS` [5]: measured seconds per concurrency level;
//! - `ALLOT_BENCH_WARMUP_SECS` [1]: warm-up seconds before each level;
//! - `ALLOT_BENCH_CONCURRENCY` [1,8,64]: the concurrency levels;
//! - `ALLOT_BENCH_FILL` [1000000]: claims with records in the filled store;
//! - `ALLOT_BENCH_FILL_POOLS` [10]: pools they are spread over;
//! - `ALLOT_BENCH_BULK_REQS` [2000]: measured bulk requests per store;
//! - `ALLOT_BENCH_BULK_COUNT` [100]: values per bulk request;
//! - `ALLOT_BENCH_ROUNDS` [10]: alternating rounds the bulk requests are split into;
//! - `ALLOT_BENCH_WORKERS` [number of CPUs]: tokio worker threads;
//! - `ALLOT_BENCH_DIR` [system temp dir]: where the temporary directory is made;
//! - `ALLOT_BENCH_STORES` [redb,log]: the backends, in order;
//! - `ALLOT_BENCH_PARTS` [keyed,bulk]: which parts run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use allot::{AllocRequest, Allot, PoolKind, PoolSpec};
use allot_store::{LogOptions, LogStore, RedbOptions, RedbStore};

/// Upper bound of the range pools (2^40).
const POOL_HI: u64 = 1 << 40;
/// Most values one request may claim (the engine's `MAX_BULK`).
const MAX_PER_REQUEST: u64 = allot::MAX_BULK;
/// Unmeasured bulk requests per store before the rounds.
const BULK_WARMUP: usize = 50;

#[derive(Debug, Clone)]
struct Config {
    secs: f64,
    warmup_secs: f64,
    concurrency: Vec<usize>,
    fill: u64,
    fill_pools: u64,
    bulk_reqs: usize,
    bulk_count: u64,
    rounds: usize,
    workers: usize,
    dir: Option<String>,
    stores: Vec<Backend>,
    keyed: bool,
    bulk: bool,
}

/// An embedded backend under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Redb,
    Log,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Redb => "redb",
            Backend::Log => "log",
        }
    }

    /// Where a store called `name` lives in `dir` (a file for redb, a
    /// directory for the log store).
    fn path(self, dir: &std::path::Path, name: &str) -> std::path::PathBuf {
        match self {
            Backend::Redb => dir.join(format!("{name}.redb")),
            Backend::Log => dir.join(format!("{name}.log")),
        }
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

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

impl Config {
    fn from_env() -> Config {
        let concurrency = std::env::var("ALLOT_BENCH_CONCURRENCY")
            .unwrap_or_else(|_| "1,8,64".into())
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .unwrap_or_else(|| panic!("ALLOT_BENCH_CONCURRENCY: bad level {s:?}"))
            })
            .collect();
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let cfg = Config {
            secs: env_or("ALLOT_BENCH_SECS", 5.0),
            warmup_secs: env_or("ALLOT_BENCH_WARMUP_SECS", 1.0),
            concurrency,
            fill: env_or("ALLOT_BENCH_FILL", 1_000_000),
            fill_pools: env_or("ALLOT_BENCH_FILL_POOLS", 10u64).max(1),
            bulk_reqs: env_or("ALLOT_BENCH_BULK_REQS", 2000usize).max(1),
            bulk_count: env_or("ALLOT_BENCH_BULK_COUNT", 100),
            rounds: env_or("ALLOT_BENCH_ROUNDS", 10usize).max(1),
            workers: env_or("ALLOT_BENCH_WORKERS", cpus).max(1),
            dir: std::env::var("ALLOT_BENCH_DIR").ok(),
            stores: env_list("ALLOT_BENCH_STORES", "redb,log")
                .iter()
                .map(|s| match s.as_str() {
                    "redb" => Backend::Redb,
                    "log" => Backend::Log,
                    other => panic!("ALLOT_BENCH_STORES: unknown backend {other:?} (redb, log)"),
                })
                .collect(),
            keyed: env_list("ALLOT_BENCH_PARTS", "keyed,bulk")
                .iter()
                .any(|p| p == "keyed"),
            bulk: env_list("ALLOT_BENCH_PARTS", "keyed,bulk")
                .iter()
                .any(|p| p == "bulk"),
        };
        assert!(cfg.secs > 0.0, "ALLOT_BENCH_SECS must be positive");
        assert!(
            cfg.warmup_secs >= 0.0,
            "ALLOT_BENCH_WARMUP_SECS must be >= 0"
        );
        assert!(
            (1..=MAX_PER_REQUEST).contains(&cfg.bulk_count),
            "ALLOT_BENCH_BULK_COUNT must be in 1..={MAX_PER_REQUEST}"
        );
        cfg
    }
}

/// Latencies of a phase, sorted once.
struct Latencies(Vec<Duration>);

impl Latencies {
    fn new(mut v: Vec<Duration>) -> Latencies {
        v.sort_unstable();
        Latencies(v)
    }

    /// Nearest-rank percentile.
    fn pct(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    fn mean(&self) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0.iter().sum::<Duration>() / self.0.len() as u32
    }

    fn max(&self) -> Duration {
        self.0.last().copied().unwrap_or(Duration::ZERO)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn range_spec() -> PoolSpec {
    PoolSpec::new(PoolKind::Range { lo: 1, hi: POOL_HI })
}

fn open_engine(backend: Backend, path: &std::path::Path) -> Allot {
    let opened = |e: allot_store::StoreError| -> ! {
        panic!("opening {} store {}: {e}", backend.name(), path.display())
    };
    match backend {
        Backend::Redb => Allot::new(Arc::new(
            RedbStore::open(path, RedbOptions::default()).unwrap_or_else(|e| opened(e)),
        )),
        Backend::Log => Allot::new(Arc::new(
            LogStore::open(path, LogOptions::default()).unwrap_or_else(|e| opened(e)),
        )),
    }
}

/// The size of a store: its file, or the files of its directory.
fn file_mib(path: &std::path::Path) -> f64 {
    let bytes = match std::fs::read_dir(path) {
        Ok(entries) => entries
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum(),
        Err(_) => std::fs::metadata(path).map_or(0, |m| m.len()),
    };
    bytes as f64 / (1024.0 * 1024.0)
}

struct KeyedResult {
    concurrency: usize,
    claims: usize,
    window: Duration,
    lat: Latencies,
    errors: usize,
    /// Claims acknowledged over the whole level (warm-up included).
    total: usize,
    /// Store revisions written over the whole level: one per engine batch
    /// (group commit) here, since only this pool is written.
    revisions: u64,
}

async fn current_revision(allot: &Allot) -> u64 {
    allot
        .store()
        .current_revision()
        .await
        .expect("reading the store revision")
}

/// One concurrency level of keyed claims on a fresh pool.
async fn keyed_level(allot: &Allot, cfg: &Config, n: usize) -> KeyedResult {
    let pool = format!("keyed-c{n}");
    allot
        .create_pool(&pool, range_spec(), BTreeMap::new())
        .await
        .expect("create keyed pool");
    let rev0 = current_revision(allot).await;
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(cfg.warmup_secs);
    let measure_to = measure_from + Duration::from_secs_f64(cfg.secs);
    let mut tasks = Vec::with_capacity(n);
    for t in 0..n {
        let allot = allot.clone();
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut done = 0usize;
            let mut errors = 0usize;
            let mut i = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= measure_to {
                    break;
                }
                let key = format!("c{n}-t{t}-{i}");
                i += 1;
                let res = allot.allocate(&pool, AllocRequest::key(key)).await;
                let t1 = Instant::now();
                match res {
                    Ok(claims) => {
                        assert_eq!(claims.len(), 1, "one keyed claim per request");
                        done += 1;
                        // Counted if it completed inside the measured window.
                        if t1 >= measure_from && t1 <= measure_to {
                            lat.push(t1 - t0);
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        if errors <= 3 {
                            eprintln!("  allocate error (c={n}, task {t}): {e}");
                        }
                    }
                }
            }
            (lat, done, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut total_done = 0usize;
    let mut errors = 0usize;
    for task in tasks {
        let (l, d, e) = task.await.expect("submitter task panicked");
        lat.extend(l);
        total_done += d;
        errors += e;
    }
    let revisions = current_revision(allot).await - rev0;
    // Sanity: every acknowledged claim is a distinct allocated value.
    let info = allot.pool(&pool).await.expect("pool info");
    assert_eq!(
        info.stats.allocated, total_done as u64,
        "pool {pool}: allocated count differs from acknowledged claims"
    );
    KeyedResult {
        concurrency: n,
        claims: lat.len(),
        window: Duration::from_secs_f64(cfg.secs),
        lat: Latencies::new(lat),
        errors,
        total: total_done,
        revisions,
    }
}

/// Fills `allot` with `cfg.fill` owned claims spread over `cfg.fill_pools` pools.
async fn fill(allot: &Allot, cfg: &Config) -> Duration {
    let per_pool = cfg.fill / cfg.fill_pools;
    let mut extra = cfg.fill % cfg.fill_pools;
    let start = Instant::now();
    let mut filled = 0u64;
    for p in 0..cfg.fill_pools {
        let pool = format!("filler-{p}");
        allot
            .create_pool(&pool, range_spec(), BTreeMap::new())
            .await
            .expect("create filler pool");
        let mut left = per_pool + u64::from(extra > 0);
        extra = extra.saturating_sub(1);
        while left > 0 {
            let n = left.min(MAX_PER_REQUEST);
            let t0 = Instant::now();
            let claims = allot
                .allocate(&pool, AllocRequest::many(n).owner("filler"))
                .await
                .expect("filler allocation");
            assert_eq!(claims.len() as u64, n);
            left -= n;
            filled += n;
            println!(
                "  fill: {pool}: +{n} claims in {:.2} s ({filled}/{} total, {:.1} s elapsed)",
                t0.elapsed().as_secs_f64(),
                cfg.fill,
                start.elapsed().as_secs_f64()
            );
        }
    }
    start.elapsed()
}

/// Sequential bulk claims on `pool`, returning each request's latency.
async fn bulk_round(allot: &Allot, pool: &str, count: u64, reqs: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(reqs);
    for _ in 0..reqs {
        let t0 = Instant::now();
        let claims = allot
            .allocate(pool, AllocRequest::many(count))
            .await
            .expect("bulk allocation");
        out.push(t0.elapsed());
        assert_eq!(claims.len() as u64, count);
    }
    out
}

fn main() {
    let cfg = Config::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.workers)
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let tmp = match &cfg.dir {
        Some(d) => tempfile::Builder::new()
            .prefix("allot-bench-")
            .tempdir_in(d)
            .expect("creating a temporary directory in ALLOT_BENCH_DIR"),
        None => tempfile::Builder::new()
            .prefix("allot-bench-")
            .tempdir()
            .expect("creating a temporary directory"),
    };

    println!("allot claims benchmark (durable: default options, fsync per commit)");
    println!("  stores                 {:?}", cfg.stores);
    println!("configuration:");
    println!("  directory              {}", tmp.path().display());
    println!("  tokio worker threads   {}", cfg.workers);
    println!(
        "  available parallelism  {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  keyed: levels {:?}, {} s measured after {} s warm-up each, fresh range pool 1..=2^40 per level",
        cfg.concurrency, cfg.secs, cfg.warmup_secs
    );
    println!(
        "  bulk:  {} x many({}) sequential per store in {} alternating rounds (+{} warm-up each); filled store: {} claims (owner, claim records) over {} pools",
        cfg.bulk_reqs, cfg.bulk_count, cfg.rounds, BULK_WARMUP, cfg.fill, cfg.fill_pools
    );
    println!();

    for &backend in &cfg.stores {
        println!("==== store: {} ====", backend.name());
        rt.block_on(run(backend, &cfg, tmp.path()));
        println!();
    }
}

/// Both parts of the benchmark on one backend.
async fn run(backend: Backend, cfg: &Config, dir: &std::path::Path) {
    if cfg.keyed {
        keyed(backend, cfg, dir).await;
    }
    if cfg.bulk {
        bulk(backend, cfg, dir).await;
    }
}

async fn keyed(backend: Backend, cfg: &Config, dir: &std::path::Path) {
    // ---- 1. keyed claims --------------------------------------------
    let keyed_path = backend.path(dir, "keyed");
    let allot = open_engine(backend, &keyed_path);
    let mut results = Vec::new();
    for &n in &cfg.concurrency {
        println!(
            "keyed: {n} submitter(s), {} s warm-up + {} s ...",
            cfg.warmup_secs, cfg.secs
        );
        results.push(keyed_level(&allot, cfg, n).await);
    }
    allot.close().await;
    println!();
    println!(
        "1. durable keyed claims (AllocRequest::key), {} store {:.1} MiB",
        backend.name(),
        file_mib(&keyed_path)
    );
    println!(
        "{:>11} | {:>9} | {:>9} | {:>8} | {:>8} | {:>8} | {:>8} | {:>12} | {:>6}",
        "submitters",
        "claims",
        "claims/s",
        "mean ms",
        "p50 ms",
        "p99 ms",
        "max ms",
        "claims/batch",
        "errors"
    );
    println!("{}", "-".repeat(103));
    for r in &results {
        println!(
            "{:>11} | {:>9} | {:>9.0} | {:>8.3} | {:>8.3} | {:>8.3} | {:>8.3} | {:>12.1} | {:>6}",
            r.concurrency,
            r.claims,
            r.claims as f64 / r.window.as_secs_f64(),
            ms(r.lat.mean()),
            ms(r.lat.pct(50.0)),
            ms(r.lat.pct(99.0)),
            ms(r.lat.max()),
            r.total as f64 / r.revisions.max(1) as f64,
            r.errors
        );
    }
    println!(
        "claims/batch: claims per store revision over the level incl. warm-up (one engine group commit = one fsync each)"
    );
    println!();
}

async fn bulk(backend: Backend, cfg: &Config, dir: &std::path::Path) {
    // ---- 2. bulk claims, empty vs filled ------------------------------
    let empty_path = backend.path(dir, "bulk-empty");
    let full_path = backend.path(dir, "bulk-filled");
    let empty = open_engine(backend, &empty_path);
    let full = open_engine(backend, &full_path);
    println!(
        "bulk: filling {} with {} claims ...",
        full_path.display(),
        cfg.fill
    );
    let fill_time = fill(&full, cfg).await;
    println!(
        "bulk: fill done: {} claims in {:.1} s ({:.0} claims/s), file {:.1} MiB",
        cfg.fill,
        fill_time.as_secs_f64(),
        cfg.fill as f64 / fill_time.as_secs_f64().max(1e-9),
        file_mib(&full_path)
    );
    for a in [&empty, &full] {
        a.create_pool("bulk", range_spec(), BTreeMap::new())
            .await
            .expect("create bulk pool");
        bulk_round(a, "bulk", cfg.bulk_count, BULK_WARMUP).await;
    }
    let mut lat_empty = Vec::with_capacity(cfg.bulk_reqs);
    let mut lat_full = Vec::with_capacity(cfg.bulk_reqs);
    let per_round = cfg.bulk_reqs.div_ceil(cfg.rounds);
    let mut left = cfg.bulk_reqs;
    let mut round = 0;
    while left > 0 {
        let n = left.min(per_round);
        // Alternate which store goes first, too.
        let order: [(&Allot, &mut Vec<Duration>); 2] = if round % 2 == 0 {
            [(&empty, &mut lat_empty), (&full, &mut lat_full)]
        } else {
            [(&full, &mut lat_full), (&empty, &mut lat_empty)]
        };
        for (a, lat) in order {
            lat.extend(bulk_round(a, "bulk", cfg.bulk_count, n).await);
        }
        left -= n;
        round += 1;
    }
    let (e_mib, f_mib) = (file_mib(&empty_path), file_mib(&full_path));
    empty.close().await;
    full.close().await;
    let e = Latencies::new(lat_empty);
    let f = Latencies::new(lat_full);
    println!();
    println!(
        "2. one request claiming {} values (AllocRequest::many({})), {} sequential requests per store",
        cfg.bulk_count, cfg.bulk_count, cfg.bulk_reqs
    );
    println!(
        "{:>26} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>9}",
        "store", "mean ms", "p50 ms", "p99 ms", "max ms", "req/s", "file MiB"
    );
    println!("{}", "-".repeat(90));
    for (label, l, mib) in [
        ("empty".to_string(), &e, e_mib),
        (format!("with {} other claims", cfg.fill), &f, f_mib),
    ] {
        println!(
            "{:>26} | {:>8.3} | {:>8.3} | {:>8.3} | {:>8.3} | {:>8.0} | {:>9.1}",
            label,
            ms(l.mean()),
            ms(l.pct(50.0)),
            ms(l.pct(99.0)),
            ms(l.max()),
            1.0 / l.mean().as_secs_f64().max(1e-12),
            mib
        );
    }
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-12);
    let r_mean = ratio(f.mean(), e.mean());
    let r_p50 = ratio(f.pct(50.0), e.pct(50.0));
    let r_p99 = ratio(f.pct(99.0), e.pct(99.0));
    println!(
        "{:>26} | {:>8.3} | {:>8.3} | {:>8.3} |",
        "ratio filled/empty", r_mean, r_p50, r_p99
    );
    println!(
        "target (design): filled within 10% of empty -> mean ratio {:.3} {}",
        r_mean,
        if r_mean <= 1.10 { "MET" } else { "NOT MET" }
    );
    println!(
        "fill time: {:.1} s for {} claims",
        fill_time.as_secs_f64(),
        cfg.fill
    );
}
