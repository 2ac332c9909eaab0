//! Durable claim throughput and latency of the engine on each backend —
//! redb (default `RedbOptions`) and the log store (default `LogOptions`) in a
//! fresh temporary directory, PostgreSQL and etcd as throw-away servers
//! (`allot_store_postgres::testing::PgServer`,
//! `allot_store_etcd::testing::EtcdServer`: fsync on, loopback, default store
//! options) —, every commit durable. Every part runs once per backend
//! (`ALLOT_BENCH_STORES`), with the same body.
//!
//! Parts (`ALLOT_BENCH_PARTS`):
//!
//! - `keyed`: N concurrent submitters (tokio tasks) each loop
//!   `allocate(pool, AllocRequest::key(unique))` on a range pool 1..=2^40
//!   (a fresh pool per level); claims/s and latency percentiles over the
//!   measured window, after a warm-up.
//! - `many`: the same with `AllocRequest::many(100)` per request.
//! - `parallel`: P pools (1, 2, 4, 8) at once, each with its own submitters
//!   (`ALLOT_BENCH_POOL_SUBMITTERS`) doing keyed claims: total and per-pool
//!   claims/s, to see whether pools wait for each other.
//! - `shared` (PostgreSQL and etcd only): two engines on the one server, as
//!   two `allot serve` processes would be (each with its own store
//!   connection, both following the other's writes), N keyed submitters
//!   split evenly over them, all on one pool: claims/s per engine, and
//!   errors (a request the engine gave up on, `Contention`).
//! - `skiplocked` (PostgreSQL only): the hand-written alternative (a table of
//!   one row per value, `FOR UPDATE SKIP LOCKED`, one statement per claim;
//!   see `claims/skip_locked.rs`) at the same levels, keyed and claim(100),
//!   on the same server as the three parts above, and allot/SKIP LOCKED
//!   ratios.
//! - `bulk`: the latency of one sequential `AllocRequest::many(100)` on a
//!   store holding nothing else, and on one holding `ALLOT_BENCH_FILL` owned
//!   claims (with claim records) in other pools. Both stores are open at once
//!   (for PostgreSQL and etcd: two servers of their own) and are measured in
//!   alternating rounds, so drift in the machine's load hits both alike.
//!   Design target: the filled store within 10% of the empty.
//!
//! The first four parts share one store (one server) per backend. Every
//! level prints the machine's CPU use over its window (cores busy, from
//! /proc/stat, and this process's share) and the load average.
//!
//! Run: cargo bench -p allot --bench claims
//!
//! Environment (defaults in brackets):
//! - `ALLOT_BENCH_SECS` [5]: measured seconds per level;
//! - `ALLOT_BENCH_WARMUP_SECS` [1]: warm-up seconds before each level;
//! - `ALLOT_BENCH_CONCURRENCY` [1,8,64]: the concurrency levels;
//! - `ALLOT_BENCH_POOLS` [1,2,4,8]: pool counts of the `parallel` part;
//! - `ALLOT_BENCH_POOL_SUBMITTERS` [1]: submitters per pool there;
//! - `ALLOT_BENCH_FILL` [1000000]: claims with records in the filled store;
//! - `ALLOT_BENCH_FILL_POOLS` [10]: pools they are spread over;
//! - `ALLOT_BENCH_FILL_CHUNK` [100000; PostgreSQL 20000, etcd 5000]: claims
//!   per fill request (etcd: at most `--max-txn-ops` operations and 1.5 MiB per
//!   transaction; PostgreSQL: each commit within the store's 5 s timeout);
//! - `ALLOT_BENCH_FILL_TASKS` [2]: fill requests in flight (on different pools);
//! - `ALLOT_BENCH_BULK_REQS` [2000]: measured bulk requests per store;
//! - `ALLOT_BENCH_BULK_COUNT` [100]: values per bulk (and `many`) request;
//! - `ALLOT_BENCH_ROUNDS` [10]: alternating rounds the bulk requests are split into;
//! - `ALLOT_BENCH_SKIP_VALUES` [2000000]: rows of the SKIP LOCKED table
//!   (recreated for the keyed and the claim(n) series);
//! - `ALLOT_BENCH_WORKERS` [number of CPUs]: tokio worker threads;
//! - `ALLOT_BENCH_DIR` [system temp dir]: where the temporary directory is
//!   made (redb, log; the servers use the system temp dir);
//! - `ALLOT_BENCH_STORES` [redb,log]: the backends, in order (also
//!   `postgres`, `etcd`);
//! - `ALLOT_BENCH_PARTS` [keyed,many,parallel,shared,skiplocked,bulk]: which parts run;
//! - `ALLOT_BENCH_PG_IN_FLIGHT` [the store's default, 2]: the PostgreSQL
//!   store's `max_in_flight` (0: every commit on the locked two-round-trip
//!   path, as before speculative commits; for A/B runs);
//! - `ALLOT_BENCH_PG_HISTORY` [engine]: which keys' changes the PostgreSQL
//!   store logs for watches: `engine`, the engine's watched prefixes, as
//!   `allot serve` opens it; `all`, every key (as before schema v5; A/B);
//! - `ALLOT_BENCH_PG_VACUUM` [1]: `VACUUM (ANALYZE)` both PostgreSQL stores of
//!   the bulk part after the fill, before measuring, as autovacuum would
//!   soon after a load (0: measure at once after the fill);
//! - `ALLOT_BENCH_PG_DELAY_US` [0]: hold every chunk between the stores and
//!   PostgreSQL this long in each direction (a proxy, `claims/delay_proxy.rs`;
//!   tokio's timer rounds it up to whole milliseconds), as if the database
//!   were on another host. The SKIP LOCKED part connects directly.

/// The allocator `allot serve` runs with (`allot-cli`'s `main.rs`), so the
/// engine is measured as the server runs it. (glibc's malloc and free were
/// ~27% of this process's samples at 64 clients on PostgreSQL; throughput
/// with either stayed within the run-to-run noise: BENCHMARKS §6 round 9.)
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "claims/delay_proxy.rs"]
mod delay_proxy;
#[path = "claims/skip_locked.rs"]
mod skip_locked;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use allot::{AllocRequest, Allot, PoolKind, PoolSpec};
use allot_store::{LogOptions, LogStore, RedbOptions, RedbStore};
use allot_store_etcd::testing::EtcdServer;
use allot_store_etcd::{EtcdOptions, EtcdStore};
use allot_store_postgres::testing::PgServer;
use allot_store_postgres::{PostgresOptions, PostgresStore};
use futures::future::BoxFuture;

/// Upper bound of the range pools (2^40).
const POOL_HI: u64 = 1 << 40;
/// Most values one request may claim (the engine's `MAX_BULK`).
const MAX_PER_REQUEST: u64 = allot::MAX_BULK;
/// Unmeasured bulk requests per store before the rounds.
const BULK_WARMUP: usize = 50;
/// Most claims per fill request on etcd (its transactions are bounded).
const ETCD_FILL_CHUNK: u64 = 5000;
/// Claims per fill request on PostgreSQL: the store's committer merges the
/// requests in flight into one PostgreSQL transaction, which must finish
/// within the store's timeout (5 s) even on a busy machine.
const PG_FILL_CHUNK: u64 = 20_000;

#[derive(Debug, Clone)]
struct Config {
    secs: f64,
    warmup_secs: f64,
    concurrency: Vec<usize>,
    pools: Vec<usize>,
    pool_submitters: usize,
    fill: u64,
    fill_pools: u64,
    fill_chunk: Option<u64>,
    fill_tasks: usize,
    /// `VACUUM (ANALYZE)` the PostgreSQL stores after the bulk fill.
    pg_vacuum: bool,
    bulk_reqs: usize,
    bulk_count: u64,
    rounds: usize,
    skip_values: u64,
    workers: usize,
    dir: Option<String>,
    stores: Vec<Backend>,
    parts: Vec<String>,
}

impl Config {
    fn part(&self, name: &str) -> bool {
        self.parts.iter().any(|p| p == name)
    }
}

/// A backend under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Redb,
    Log,
    Postgres,
    Etcd,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Redb => "redb",
            Backend::Log => "log",
            Backend::Postgres => "postgres",
            Backend::Etcd => "etcd",
        }
    }

    /// Claims per fill request.
    fn fill_chunk(self, cfg: &Config) -> u64 {
        let default = match self {
            Backend::Etcd => ETCD_FILL_CHUNK,
            Backend::Postgres => PG_FILL_CHUNK,
            _ => MAX_PER_REQUEST,
        };
        cfg.fill_chunk.unwrap_or(default).clamp(1, MAX_PER_REQUEST)
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

fn env_levels(name: &str, default: &str) -> Vec<usize> {
    env_list(name, default)
        .iter()
        .map(|s| {
            s.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .unwrap_or_else(|| panic!("{name}: bad level {s:?}"))
        })
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

const PARTS: [&str; 6] = ["keyed", "many", "parallel", "shared", "skiplocked", "bulk"];

impl Config {
    fn from_env() -> Config {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let cfg = Config {
            secs: env_or("ALLOT_BENCH_SECS", 5.0),
            warmup_secs: env_or("ALLOT_BENCH_WARMUP_SECS", 1.0),
            concurrency: env_levels("ALLOT_BENCH_CONCURRENCY", "1,8,64"),
            pools: env_levels("ALLOT_BENCH_POOLS", "1,2,4,8"),
            pool_submitters: env_or("ALLOT_BENCH_POOL_SUBMITTERS", 1usize).max(1),
            fill: env_or("ALLOT_BENCH_FILL", 1_000_000),
            fill_pools: env_or("ALLOT_BENCH_FILL_POOLS", 10u64).max(1),
            fill_chunk: std::env::var("ALLOT_BENCH_FILL_CHUNK")
                .ok()
                .map(|_| env_or("ALLOT_BENCH_FILL_CHUNK", 0u64)),
            fill_tasks: env_or("ALLOT_BENCH_FILL_TASKS", 2usize).max(1),
            pg_vacuum: env_or("ALLOT_BENCH_PG_VACUUM", 1u8) != 0,
            bulk_reqs: env_or("ALLOT_BENCH_BULK_REQS", 2000usize).max(1),
            bulk_count: env_or("ALLOT_BENCH_BULK_COUNT", 100),
            rounds: env_or("ALLOT_BENCH_ROUNDS", 10usize).max(1),
            skip_values: env_or("ALLOT_BENCH_SKIP_VALUES", 2_000_000u64).max(1),
            workers: env_or("ALLOT_BENCH_WORKERS", cpus).max(1),
            dir: std::env::var("ALLOT_BENCH_DIR").ok(),
            stores: env_list("ALLOT_BENCH_STORES", "redb,log")
                .iter()
                .map(|s| match s.as_str() {
                    "redb" => Backend::Redb,
                    "log" => Backend::Log,
                    "postgres" | "pg" => Backend::Postgres,
                    "etcd" => Backend::Etcd,
                    other => panic!(
                        "ALLOT_BENCH_STORES: unknown backend {other:?} (redb, log, postgres, etcd)"
                    ),
                })
                .collect(),
            parts: env_list("ALLOT_BENCH_PARTS", &PARTS.join(",")),
        };
        for p in &cfg.parts {
            assert!(
                PARTS.contains(&p.as_str()),
                "ALLOT_BENCH_PARTS: unknown part {p:?} ({PARTS:?})"
            );
        }
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

/// The size of a file, or of the files of a directory.
fn file_mib(path: &Path) -> f64 {
    let bytes = match std::fs::read_dir(path) {
        Ok(entries) => entries
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum(),
        Err(_) => std::fs::metadata(path).map_or(0, |m| m.len()),
    };
    bytes as f64 / (1024.0 * 1024.0)
}

// ---------------------------------------------------------------- machine load

/// CPU time counters: the whole machine's busy time and this process's, in
/// clock ticks (USER_HZ, 100 on Linux).
#[derive(Clone, Copy)]
struct Cpu {
    at: Instant,
    machine_busy: u64,
    process: u64,
}

impl Cpu {
    fn now() -> Cpu {
        let machine_busy = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().next()?.to_string();
                let f: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal ...
                Some(f.iter().take(8).sum::<u64>() - f.get(3)? - f.get(4)?)
            })
            .unwrap_or(0);
        let process = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(')')?.1.to_string();
                let f: Vec<&str> = rest.split_whitespace().collect();
                // fields 14 and 15 (utime, stime) are 12 and 13 after ')'.
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .unwrap_or(0);
        Cpu {
            at: Instant::now(),
            machine_busy,
            process,
        }
    }

    /// (machine cores busy, this process's cores) since `earlier`.
    fn since(&self, earlier: &Cpu) -> (f64, f64) {
        let secs = (self.at - earlier.at).as_secs_f64().max(1e-9);
        (
            self.machine_busy.saturating_sub(earlier.machine_busy) as f64 / 100.0 / secs,
            self.process.saturating_sub(earlier.process) as f64 / 100.0 / secs,
        )
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---------------------------------------------------------------- stores

/// An engine on a fresh store of one backend, with what keeps it alive.
struct Opened {
    allot: Allot,
    backend: Backend,
    /// The file or directory of an embedded store.
    path: PathBuf,
    pg: Option<PgServer>,
    /// The PostgreSQL store itself, for its counters.
    pg_store: Option<PostgresStore>,
    etcd: Option<EtcdServer>,
}

/// A store on the bench's PostgreSQL server with the bench's options
/// (`ALLOT_BENCH_PG_IN_FLIGHT`, `ALLOT_BENCH_PG_HISTORY`), through a delaying proxy when
/// `ALLOT_BENCH_PG_DELAY_US` is set.
async fn pg_store(server: &PgServer) -> Result<PostgresStore, String> {
    let defaults = PostgresOptions::default();
    // As `allot serve` opens it: history of the watched prefixes only;
    // ALLOT_BENCH_PG_HISTORY=all records every key, as before schema v5.
    let history_prefixes = match std::env::var("ALLOT_BENCH_PG_HISTORY").as_deref() {
        Ok("all") => None,
        Ok("engine") | Err(_) => Some(allot::keys::watched_prefixes()),
        Ok(other) => {
            return Err(format!(
                "ALLOT_BENCH_PG_HISTORY={other:?}: use all or engine"
            ))
        }
    };
    let options = PostgresOptions {
        max_in_flight: env_or("ALLOT_BENCH_PG_IN_FLIGHT", defaults.max_in_flight),
        history_prefixes,
        ..defaults
    };
    let mut url = server.url();
    let delay_us: u64 = env_or("ALLOT_BENCH_PG_DELAY_US", 0);
    if delay_us > 0 {
        let delay = Duration::from_micros(delay_us);
        let proxy = delay_proxy::start(server.port(), delay)
            .await
            .map_err(|e| format!("starting the delay proxy: {e}"))?;
        url = url.replace(
            &format!("127.0.0.1:{}/", server.port()),
            &format!("127.0.0.1:{proxy}/"),
        );
        println!(
            "  through a proxy holding each chunk {delay_us} µs (rounded up to whole ms) each way"
        );
    }
    PostgresStore::connect(&url, options)
        .await
        .map_err(|e| e.to_string())
}

impl Opened {
    /// A fresh store called `name`: a file or directory in `dir`, or a
    /// throw-away server of its own.
    async fn open(backend: Backend, dir: &Path, name: &str) -> Opened {
        let path = dir.join(format!("{name}.{}", backend.name()));
        let failed = |e: &dyn std::fmt::Display| -> ! {
            panic!("opening the {} store {name}: {e}", backend.name())
        };
        let (mut pg, mut pg_handle, mut etcd) = (None, None, None);
        let allot = match backend {
            Backend::Redb => Allot::new(Arc::new(
                RedbStore::open(&path, RedbOptions::default()).unwrap_or_else(|e| failed(&e)),
            )),
            Backend::Log => Allot::new(Arc::new(
                LogStore::open(&path, LogOptions::default()).unwrap_or_else(|e| failed(&e)),
            )),
            Backend::Postgres => {
                let server = allot_store_postgres::testing::start_server().await;
                let store = pg_store(&server).await.unwrap_or_else(|e| failed(&e));
                println!("  {name}: PostgreSQL at {}", server.url());
                pg = Some(server);
                pg_handle = Some(store.clone());
                Allot::new(Arc::new(store))
            }
            Backend::Etcd => {
                let server = allot_store_etcd::testing::start_server().await;
                let store = EtcdStore::connect(&server.endpoints(), EtcdOptions::default())
                    .await
                    .unwrap_or_else(|e| failed(&e));
                println!("  {name}: etcd at {}", server.endpoint());
                etcd = Some(server);
                Allot::new(Arc::new(store))
            }
        };
        Opened {
            allot,
            backend,
            path,
            pg,
            pg_store: pg_handle,
            etcd,
        }
    }

    /// The PostgreSQL server's URL, if this is one.
    fn pg_url(&self) -> Option<String> {
        self.pg.as_ref().map(PgServer::url)
    }

    /// The store's size: its files, or the PostgreSQL database; `None` for
    /// etcd.
    async fn size_mib(&self) -> Option<f64> {
        match self.backend {
            Backend::Redb | Backend::Log => Some(file_mib(&self.path)),
            Backend::Postgres => {
                let client = skip_locked::connect(&self.pg_url()?).await.ok()?;
                let row = client
                    .query_one("SELECT pg_database_size(current_database())", &[])
                    .await
                    .ok()?;
                Some(row.get::<_, i64>(0) as f64 / (1024.0 * 1024.0))
            }
            Backend::Etcd => None,
        }
    }

    /// PostgreSQL only: transaction ids handed out so far (each writing
    /// PostgreSQL transaction takes one, and so does this probe), so that a
    /// level can count the PostgreSQL commits it made.
    async fn pg_xid(&self) -> Option<u64> {
        let client = skip_locked::connect(&self.pg_url()?).await.ok()?;
        let row = client.query_one("SELECT txid_current()", &[]).await.ok()?;
        Some(row.get::<_, i64>(0) as u64)
    }

    /// Another engine on the same server, with a store connection of its
    /// own (as a second `allot serve` would have); `None` for the embedded
    /// stores, which one process holds alone.
    async fn second_engine(&self) -> Option<Allot> {
        let store: Arc<dyn allot_store::Store> = match (&self.pg, &self.etcd) {
            (Some(pg), _) => Arc::new(
                pg_store(pg)
                    .await
                    .unwrap_or_else(|e| panic!("a second PostgreSQL store: {e}")),
            ),
            (None, Some(etcd)) => Arc::new(
                EtcdStore::connect(&etcd.endpoints(), EtcdOptions::default())
                    .await
                    .expect("a second etcd store"),
            ),
            (None, None) => return None,
        };
        Some(Allot::new(store))
    }

    async fn close(self) {
        self.allot.close().await;
        // The store's own tasks end before its server does.
        drop(self.pg_store);
        let (pg, etcd) = (self.pg, self.etcd);
        // Stopping a server waits for it: off the runtime's threads.
        tokio::task::spawn_blocking(move || {
            drop(pg);
            drop(etcd);
        })
        .await
        .expect("stopping the servers");
    }
}

fn mib(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

// ---------------------------------------------------------------- load driver

/// One request of a client: `i` is its sequence number; it answers the
/// values claimed and the statements or requests it took, or an error.
type Op = Box<dyn FnMut(u64) -> BoxFuture<'static, Result<(u64, u64), String>> + Send>;

/// What one concurrency level did.
struct Level {
    clients: usize,
    window: Duration,
    /// Requests completed inside the measured window, and their values.
    reqs: usize,
    values: u64,
    lat: Latencies,
    errors: usize,
    /// Values over the whole level (warm-up included), for sanity checks.
    total_values: u64,
    total_reqs: u64,
    /// Statements (SKIP LOCKED) over the whole level.
    statements: u64,
    /// Values per client inside the window.
    per_client: Vec<u64>,
    /// Machine cores busy and this process's cores over the window.
    cpu: (f64, f64),
    load: String,
}

impl Level {
    fn values_per_sec(&self) -> f64 {
        self.values as f64 / self.window.as_secs_f64()
    }

    fn reqs_per_sec(&self) -> f64 {
        self.reqs as f64 / self.window.as_secs_f64()
    }
}

/// Runs one client task per op for the warm-up and the measured window.
async fn drive(cfg: &Config, ops: Vec<Op>) -> Level {
    let clients = ops.len();
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(cfg.warmup_secs);
    let measure_to = measure_from + Duration::from_secs_f64(cfg.secs);
    let cpu_probe = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        let a = Cpu::now();
        tokio::time::sleep_until(measure_to.into()).await;
        (Cpu::now().since(&a), loadavg())
    });
    let mut tasks = Vec::with_capacity(clients);
    for (t, mut op) in ops.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let (mut values, mut total_values, mut total_reqs, mut statements) = (0, 0, 0, 0);
            let mut errors = 0usize;
            let mut i = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= measure_to {
                    break;
                }
                let res = op(i).await;
                i += 1;
                let t1 = Instant::now();
                match res {
                    Ok((n, s)) => {
                        total_values += n;
                        total_reqs += 1;
                        statements += s;
                        // Counted if it completed inside the measured window.
                        if t1 >= measure_from && t1 <= measure_to {
                            lat.push(t1 - t0);
                            values += n;
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        if errors <= 3 {
                            eprintln!("  request error (client {t} of {clients}): {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (lat, values, total_values, total_reqs, statements, errors)
        }));
    }
    let mut level = Level {
        clients,
        window: Duration::from_secs_f64(cfg.secs),
        reqs: 0,
        values: 0,
        lat: Latencies(Vec::new()),
        errors: 0,
        total_values: 0,
        total_reqs: 0,
        statements: 0,
        per_client: Vec::with_capacity(clients),
        cpu: (0.0, 0.0),
        load: String::new(),
    };
    let mut lat = Vec::new();
    for task in tasks {
        let (l, v, tv, tr, s, e) = task.await.expect("client task panicked");
        level.reqs += l.len();
        lat.extend(l);
        level.values += v;
        level.total_values += tv;
        level.total_reqs += tr;
        level.statements += s;
        level.errors += e;
        level.per_client.push(v);
    }
    level.lat = Latencies::new(lat);
    (level.cpu, level.load) = cpu_probe.await.expect("cpu probe");
    level
}

/// A client of the engine: keyed claims (`count` 0) or `count` values per
/// request, on `pool`.
fn allot_op(allot: &Allot, pool: &str, tag: String, count: u64) -> Op {
    let allot = allot.clone();
    let pool: Arc<str> = pool.into();
    Box::new(move |i| {
        let (allot, pool) = (allot.clone(), pool.clone());
        let req = if count == 0 {
            AllocRequest::key(format!("{tag}-{i}"))
        } else {
            AllocRequest::many(count)
        };
        Box::pin(async move {
            let claims = allot
                .allocate(&pool, req)
                .await
                .map_err(|e| e.to_string())?;
            let want = count.max(1);
            if claims.len() as u64 != want {
                return Err(format!("{} values instead of {want}", claims.len()));
            }
            Ok((want, 1))
        })
    })
}

async fn current_revision(allot: &Allot) -> u64 {
    allot
        .store()
        .current_revision()
        .await
        .expect("reading the store revision")
}

/// Checks that `pool` holds exactly the values acknowledged.
/// Another engine on the same store may not have seen the last writes yet
/// (it learns of them through its follower): it is given up to 5 s.
async fn check_allocated(allot: &Allot, pool: &str, acknowledged: u64) {
    let mut allocated = 0;
    for _ in 0..100 {
        allocated = allot.pool(pool).await.expect("pool info").stats.allocated;
        if allocated == acknowledged {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        allocated, acknowledged,
        "pool {pool}: allocated count differs from acknowledged claims"
    );
}

const LEVEL_HEADER: [&str; 12] = [
    "clients", "requests", "req/s", "values/s", "mean ms", "p50 ms", "p99 ms", "max ms", "extra",
    "errors", "cpu all", "cpu self",
];

fn print_level_header(extra: &str) {
    let mut h = LEVEL_HEADER;
    h[8] = extra;
    println!(
        "{:>8} | {:>9} | {:>9} | {:>9} | {:>8} | {:>8} | {:>8} | {:>8} | {:>12} | {:>6} | {:>7} | {:>8} | load",
        h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]
    );
    println!("{}", "-".repeat(150));
}

fn print_level(l: &Level, extra: f64) {
    println!(
        "{:>8} | {:>9} | {:>9.0} | {:>9.0} | {:>8.3} | {:>8.3} | {:>8.3} | {:>8.3} | {:>12.2} | {:>6} | {:>7.2} | {:>8.2} | {}",
        l.clients,
        l.reqs,
        l.reqs_per_sec(),
        l.values_per_sec(),
        ms(l.lat.mean()),
        ms(l.lat.pct(50.0)),
        ms(l.lat.pct(99.0)),
        ms(l.lat.max()),
        extra,
        l.errors,
        l.cpu.0,
        l.cpu.1,
        l.load
    );
}

// ---------------------------------------------------------------- parts

/// [`drive`] on the engine of `main`, also counting the store revisions
/// written and, on PostgreSQL, the PostgreSQL commits made.
async fn drive_counted(main: &Opened, cfg: &Config, ops: Vec<Op>) -> (Level, u64) {
    let rev0 = current_revision(&main.allot).await;
    let xid0 = main.pg_xid().await;
    let count = |counter: fn(&PostgresStore) -> u64| main.pg_store.as_ref().map_or(0, counter);
    let (staged0, redone0) = (
        count(PostgresStore::staged_batches),
        count(PostgresStore::redone_batches),
    );
    let level = drive(cfg, ops).await;
    let revisions = current_revision(&main.allot).await - rev0;
    if let (Some(a), Some(b)) = (xid0, main.pg_xid().await) {
        let commits = b.saturating_sub(a + 1).max(1);
        println!(
            "  {} requests in {revisions} store revisions and {commits} PostgreSQL commits ({:.1} requests per commit); {} speculative batches staged, {} redone on the locked path",
            level.total_reqs,
            level.total_reqs as f64 / commits as f64,
            count(PostgresStore::staged_batches) - staged0,
            count(PostgresStore::redone_batches) - redone0
        );
    }
    (level, revisions)
}

/// `keyed` (`count` 0) or `many` (`count` values per request): one level
/// per concurrency, each on a fresh pool of `main`.
async fn claim_levels(main: &Opened, cfg: &Config, count: u64) -> Vec<Level> {
    let what = if count == 0 {
        "keyed claims (AllocRequest::key)".to_string()
    } else {
        format!("AllocRequest::many({count})")
    };
    let mut results = Vec::new();
    let mut batches = Vec::new();
    for &n in &cfg.concurrency {
        let pool = format!("{}-c{n}", if count == 0 { "keyed" } else { "many" });
        main.allot
            .create_pool(&pool, range_spec(), BTreeMap::new())
            .await
            .expect("create pool");
        println!(
            "{}: {what}, {n} submitter(s), {} s warm-up + {} s ...",
            main.backend.name(),
            cfg.warmup_secs,
            cfg.secs
        );
        let ops = (0..n)
            .map(|t| allot_op(&main.allot, &pool, format!("c{n}-t{t}"), count))
            .collect();
        let (level, revisions) = drive_counted(main, cfg, ops).await;
        check_allocated(&main.allot, &pool, level.total_values).await;
        batches.push(level.total_reqs as f64 / revisions.max(1) as f64);
        results.push(level);
    }
    println!();
    println!(
        "durable {what} on {}, store {} MiB",
        main.backend.name(),
        mib(main.size_mib().await)
    );
    print_level_header("reqs/commit");
    for (l, b) in results.iter().zip(batches) {
        print_level(l, b);
    }
    println!(
        "reqs/commit: requests per store revision over the level incl. warm-up (one engine batch = one store transaction; several may share one fsync)"
    );
    println!();
    results
}

/// `parallel`: P pools at once, `pool_submitters` keyed submitters each.
async fn parallel(main: &Opened, cfg: &Config) {
    let s = cfg.pool_submitters;
    let mut rows = Vec::new();
    for &p in &cfg.pools {
        let pools: Vec<String> = (0..p).map(|j| format!("par-p{p}-{j}")).collect();
        for pool in &pools {
            main.allot
                .create_pool(pool, range_spec(), BTreeMap::new())
                .await
                .expect("create pool");
        }
        println!(
            "{}: parallel, {p} pool(s) x {s} submitter(s), {} s warm-up + {} s ...",
            main.backend.name(),
            cfg.warmup_secs,
            cfg.secs
        );
        let ops = pools
            .iter()
            .flat_map(|pool| {
                (0..s).map(move |t| allot_op(&main.allot, pool, format!("{pool}-t{t}"), 0))
            })
            .collect();
        let (level, revisions) = drive_counted(main, cfg, ops).await;
        let per_pool: Vec<f64> = level
            .per_client
            .chunks(s)
            .map(|c| c.iter().sum::<u64>() as f64 / cfg.secs)
            .collect();
        // Totals are not kept per pool: check the sum.
        let mut allocated = 0;
        for pool in &pools {
            allocated += main
                .allot
                .pool(pool)
                .await
                .expect("pool info")
                .stats
                .allocated;
        }
        assert_eq!(
            allocated, level.total_values,
            "parallel: allocated values differ from acknowledged claims"
        );
        let min = per_pool.iter().copied().fold(f64::INFINITY, f64::min);
        let max = per_pool.iter().copied().fold(0.0, f64::max);
        rows.push((p, level, min, max, revisions));
    }
    println!();
    println!(
        "parallel keyed claims on {}: P pools at once, {s} submitter(s) per pool",
        main.backend.name()
    );
    println!(
        "{:>6} | {:>9} | {:>8} | {:>13} | {:>13} | {:>8} | {:>8} | {:>9} | {:>6} | {:>7} | {:>8} | load",
        "pools", "claims/s", "x 1 pool", "min pool /s", "max pool /s", "mean ms", "p99 ms", "revisions", "errors", "cpu all", "cpu self"
    );
    println!("{}", "-".repeat(140));
    let base = rows.first().map_or(1.0, |r| r.1.values_per_sec().max(1e-9));
    for (p, l, min, max, revisions) in &rows {
        println!(
            "{:>6} | {:>9.0} | {:>8.2} | {:>13.0} | {:>13.0} | {:>8.3} | {:>8.3} | {:>9} | {:>6} | {:>7.2} | {:>8.2} | {}",
            p,
            l.values_per_sec(),
            l.values_per_sec() / base,
            min,
            max,
            ms(l.lat.mean()),
            ms(l.lat.pct(99.0)),
            revisions,
            l.errors,
            l.cpu.0,
            l.cpu.1,
            l.load
        );
    }
    println!("revisions: store revisions over the level incl. warm-up (one per engine batch)");
    println!();
}

/// `shared`: two engines on one server and one pool, the concurrency
/// levels' submitters split evenly over them.
async fn shared(main: &Opened, cfg: &Config) {
    let Some(other) = main.second_engine().await else {
        println!(
            "{}: shared: not applicable (an embedded store has one engine)",
            main.backend.name()
        );
        println!();
        return;
    };
    // Both engines follow the other's writes by themselves (shared store).
    let mut rows = Vec::new();
    for &n in &cfg.concurrency {
        let n = n.max(2);
        let pool = format!("shared-c{n}");
        main.allot
            .create_pool(&pool, range_spec(), BTreeMap::new())
            .await
            .expect("create pool");
        println!(
            "{}: shared, 2 engines x {} submitter(s) on one pool, {} s warm-up + {} s ...",
            main.backend.name(),
            n / 2,
            cfg.warmup_secs,
            cfg.secs
        );
        let ops = (0..n)
            .map(|t| {
                let engine = if t % 2 == 0 { &main.allot } else { &other };
                allot_op(engine, &pool, format!("s{n}-t{t}"), 0)
            })
            .collect();
        let (level, revisions) = drive_counted(main, cfg, ops).await;
        // Both engines must see exactly the claims acknowledged by either.
        check_allocated(&main.allot, &pool, level.total_values).await;
        check_allocated(&other, &pool, level.total_values).await;
        let (mut a, mut b) = (0u64, 0u64);
        for (t, v) in level.per_client.iter().enumerate() {
            if t % 2 == 0 {
                a += v;
            } else {
                b += v;
            }
        }
        rows.push((level, revisions, a as f64 / cfg.secs, b as f64 / cfg.secs));
    }
    other.close().await;
    println!();
    println!(
        "keyed claims on {} by two engines on one pool (clients split evenly)",
        main.backend.name()
    );
    println!(
        "{:>8} | {:>9} | {:>10} | {:>10} | {:>8} | {:>8} | {:>8} | {:>9} | {:>6} | {:>7} | {:>8} | load",
        "clients", "claims/s", "engine A/s", "engine B/s", "mean ms", "p50 ms", "p99 ms", "revisions", "errors", "cpu all", "cpu self"
    );
    println!("{}", "-".repeat(140));
    for (l, revisions, a, b) in &rows {
        println!(
            "{:>8} | {:>9.0} | {:>10.0} | {:>10.0} | {:>8.3} | {:>8.3} | {:>8.3} | {:>9} | {:>6} | {:>7.2} | {:>8.2} | {}",
            l.clients,
            l.values_per_sec(),
            a,
            b,
            ms(l.lat.mean()),
            ms(l.lat.pct(50.0)),
            ms(l.lat.pct(99.0)),
            revisions,
            l.errors,
            l.cpu.0,
            l.cpu.1,
            l.load
        );
    }
    println!("errors: requests that failed (each client pauses 10 ms after one and goes on)");
    println!();
}

/// `skiplocked`: the hand-written alternative on the same PostgreSQL.
async fn skiplocked(url: &str, cfg: &Config) -> (Vec<Level>, Vec<Level>) {
    let mut out = (Vec::new(), Vec::new());
    for count in [0, cfg.bulk_count] {
        let what = if count == 0 {
            "keyed claim".to_string()
        } else {
            format!("claim({count})")
        };
        let t0 = Instant::now();
        skip_locked::setup(url, cfg.skip_values)
            .await
            .expect("creating the SKIP LOCKED table");
        println!(
            "postgres: SKIP LOCKED table of {} values made in {:.1} s",
            cfg.skip_values,
            t0.elapsed().as_secs_f64()
        );
        let mut levels = Vec::new();
        let mut acknowledged = 0;
        for &n in &cfg.concurrency {
            println!(
                "postgres: SKIP LOCKED {what}, {n} connection(s), {} s warm-up + {} s ...",
                cfg.warmup_secs, cfg.secs
            );
            let mut ops: Vec<Op> = Vec::with_capacity(n);
            for t in 0..n {
                let client = skip_locked::SkipLocked::new(url)
                    .await
                    .expect("SKIP LOCKED connection");
                ops.push(Box::new(move |i| {
                    let key = (count == 0).then(|| format!("c{n}-t{t}-{i}"));
                    client.claim(key, count)
                }));
            }
            let level = drive(cfg, ops).await;
            acknowledged += level.total_values;
            levels.push(level);
        }
        let taken = skip_locked::taken(url)
            .await
            .expect("counting taken values");
        assert_eq!(
            taken, acknowledged,
            "SKIP LOCKED: taken rows differ from acknowledged values"
        );
        println!();
        println!(
            "SKIP LOCKED {what} (one autocommitted statement per claim, one connection per client)"
        );
        print_level_header("stmts/req");
        for l in &levels {
            print_level(l, l.statements as f64 / l.total_reqs.max(1) as f64);
        }
        println!("stmts/req: statements per request (a short answer is retried)");
        println!();
        if count == 0 {
            out.0 = levels;
        } else {
            out.1 = levels;
        }
    }
    out
}

fn print_ratios(what: &str, allot: &[Level], skip: &[Level]) {
    println!("allot / SKIP LOCKED, {what}");
    println!(
        "{:>8} | {:>12} | {:>12} | {:>7} | {:>13} | {:>13} | {:>7}",
        "clients", "allot val/s", "skip val/s", "ratio", "allot p50 ms", "skip p50 ms", "ratio"
    );
    for (a, s) in allot.iter().zip(skip) {
        println!(
            "{:>8} | {:>12.0} | {:>12.0} | {:>7.2} | {:>13.3} | {:>13.3} | {:>7.2}",
            a.clients,
            a.values_per_sec(),
            s.values_per_sec(),
            a.values_per_sec() / s.values_per_sec().max(1e-9),
            ms(a.lat.pct(50.0)),
            ms(s.lat.pct(50.0)),
            ms(a.lat.pct(50.0)) / ms(s.lat.pct(50.0)).max(1e-9),
        );
    }
    println!();
}

/// Fills `allot` with `cfg.fill` owned claims spread over `cfg.fill_pools`
/// pools, `fill_tasks` requests in flight on different pools.
async fn fill(allot: &Allot, backend: Backend, cfg: &Config) -> Duration {
    let chunk = backend.fill_chunk(cfg);
    let start = Instant::now();
    let mut plan = Vec::new();
    for p in 0..cfg.fill_pools {
        let pool = format!("filler-{p}");
        allot
            .create_pool(&pool, range_spec(), BTreeMap::new())
            .await
            .expect("create filler pool");
        let n = cfg.fill / cfg.fill_pools + u64::from(p < cfg.fill % cfg.fill_pools);
        plan.push((pool, n));
    }
    let filled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let next_report = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let plan = Arc::new(std::sync::Mutex::new(plan));
    let total = cfg.fill;
    let mut tasks = Vec::new();
    for _ in 0..cfg.fill_tasks {
        let (allot, plan, filled, next_report) = (
            allot.clone(),
            plan.clone(),
            filled.clone(),
            next_report.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                // Take the next pool still holding work, one chunk at a time,
                // each task on its own pool.
                let Some((pool, n)) = plan.lock().unwrap().pop() else {
                    return;
                };
                let mut left = n;
                while left > 0 {
                    let k = left.min(chunk);
                    let claims = allot
                        .allocate(&pool, AllocRequest::many(k).owner("filler"))
                        .await
                        .expect("filler allocation");
                    assert_eq!(claims.len() as u64, k);
                    left -= k;
                    let done = filled.fetch_add(k, std::sync::atomic::Ordering::Relaxed) + k;
                    let step = (total / 20).max(1);
                    let due = next_report.load(std::sync::atomic::Ordering::Relaxed);
                    if done >= due || done == total {
                        next_report.store(done + step, std::sync::atomic::Ordering::Relaxed);
                        let secs = start.elapsed().as_secs_f64();
                        println!(
                            "  fill: {done}/{total} claims, {secs:.1} s, {:.0} claims/s",
                            done as f64 / secs.max(1e-9)
                        );
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("fill task panicked");
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

/// `VACUUM (ANALYZE)` on a PostgreSQL store's database, as autovacuum
/// does within its naptime (1 min by default) of a bulk load: the steady
/// state the target is about. In alternated runs after a 200k fill, the
/// filled store's claim(100) p50 was 3-29% slower than the empty one's
/// without it (median 8%), 3-11% with it (median 4%); the cause inside
/// PostgreSQL is not pinned down (no autovacuum worker ran during those
/// measurements; BENCHMARKS.md §6 round 8).
async fn vacuum(store: &Opened) {
    let Some(url) = store.pg_url() else { return };
    let started = Instant::now();
    let client = skip_locked::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url} to vacuum: {e}"));
    client
        .batch_execute("VACUUM (ANALYZE)")
        .await
        .unwrap_or_else(|e| panic!("VACUUM (ANALYZE) on {url}: {e}"));
    println!(
        "bulk: VACUUM (ANALYZE) of {}: {:.1} s",
        store.path.file_stem().unwrap_or_default().to_string_lossy(),
        started.elapsed().as_secs_f64()
    );
}

async fn bulk(backend: Backend, cfg: &Config, dir: &Path) {
    let empty = Opened::open(backend, dir, "bulk-empty").await;
    let full = Opened::open(backend, dir, "bulk-filled").await;
    println!(
        "bulk: filling {} with {} claims, {} per request, {} request(s) in flight ...",
        full.path.display(),
        cfg.fill,
        backend.fill_chunk(cfg),
        cfg.fill_tasks
    );
    let fill_time = fill(&full.allot, backend, cfg).await;
    println!(
        "bulk: fill done: {} claims in {:.1} s ({:.0} claims/s), store {} MiB",
        cfg.fill,
        fill_time.as_secs_f64(),
        cfg.fill as f64 / fill_time.as_secs_f64().max(1e-9),
        mib(full.size_mib().await)
    );
    if backend == Backend::Postgres && cfg.pg_vacuum {
        for store in [&empty, &full] {
            vacuum(store).await;
        }
    }
    for a in [&empty.allot, &full.allot] {
        a.create_pool("bulk", range_spec(), BTreeMap::new())
            .await
            .expect("create bulk pool");
        bulk_round(a, "bulk", cfg.bulk_count, BULK_WARMUP).await;
    }
    let cpu0 = Cpu::now();
    let mut lat_empty = Vec::with_capacity(cfg.bulk_reqs);
    let mut lat_full = Vec::with_capacity(cfg.bulk_reqs);
    let per_round = cfg.bulk_reqs.div_ceil(cfg.rounds);
    let mut left = cfg.bulk_reqs;
    let mut round = 0;
    while left > 0 {
        let n = left.min(per_round);
        // Alternate which store goes first, too.
        let order: [(&Allot, &mut Vec<Duration>); 2] = if round % 2 == 0 {
            [(&empty.allot, &mut lat_empty), (&full.allot, &mut lat_full)]
        } else {
            [(&full.allot, &mut lat_full), (&empty.allot, &mut lat_empty)]
        };
        for (a, lat) in order {
            lat.extend(bulk_round(a, "bulk", cfg.bulk_count, n).await);
        }
        left -= n;
        round += 1;
    }
    let (cpu_all, cpu_self) = Cpu::now().since(&cpu0);
    let (e_mib, f_mib) = (empty.size_mib().await, full.size_mib().await);
    empty.close().await;
    full.close().await;
    let e = Latencies::new(lat_empty);
    let f = Latencies::new(lat_full);
    println!();
    println!(
        "one request claiming {} values (AllocRequest::many({})) on {}, {} sequential requests per store",
        cfg.bulk_count,
        cfg.bulk_count,
        backend.name(),
        cfg.bulk_reqs
    );
    println!(
        "{:>26} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>9}",
        "store", "mean ms", "p50 ms", "p99 ms", "max ms", "req/s", "size MiB"
    );
    println!("{}", "-".repeat(90));
    for (label, l, size) in [
        ("empty".to_string(), &e, e_mib),
        (format!("with {} other claims", cfg.fill), &f, f_mib),
    ] {
        println!(
            "{:>26} | {:>8.3} | {:>8.3} | {:>8.3} | {:>8.3} | {:>8.0} | {:>9}",
            label,
            ms(l.mean()),
            ms(l.pct(50.0)),
            ms(l.pct(99.0)),
            ms(l.max()),
            1.0 / l.mean().as_secs_f64().max(1e-12),
            mib(size)
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
        "fill time: {:.1} s for {} claims; cpu over the rounds: machine {cpu_all:.2} cores, this process {cpu_self:.2}; load {}",
        fill_time.as_secs_f64(),
        cfg.fill,
        loadavg()
    );
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
    println!("  parts                  {:?}", cfg.parts);
    println!("configuration:");
    println!("  directory              {}", tmp.path().display());
    println!("  tokio worker threads   {}", cfg.workers);
    println!(
        "  available parallelism  {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("  load average at start  {}", loadavg());
    println!(
        "  levels {:?} ({} s measured after {} s warm-up each, fresh range pool 1..=2^40 per level); parallel: pools {:?} x {} submitter(s)",
        cfg.concurrency, cfg.secs, cfg.warmup_secs, cfg.pools, cfg.pool_submitters
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

/// Every part on one backend.
async fn run(backend: Backend, cfg: &Config, dir: &Path) {
    let skip = cfg.part("skiplocked") && backend == Backend::Postgres;
    if cfg.part("keyed") || cfg.part("many") || cfg.part("parallel") || cfg.part("shared") || skip {
        let main = Opened::open(backend, dir, "main").await;
        let keyed = if cfg.part("keyed") {
            claim_levels(&main, cfg, 0).await
        } else {
            Vec::new()
        };
        let many = if cfg.part("many") {
            claim_levels(&main, cfg, cfg.bulk_count).await
        } else {
            Vec::new()
        };
        if cfg.part("parallel") {
            parallel(&main, cfg).await;
        }
        if cfg.part("shared") {
            shared(&main, cfg).await;
        }
        if skip {
            let url = main.pg_url().expect("a PostgreSQL server");
            let (skip_keyed, skip_many) = skiplocked(&url, cfg).await;
            print_ratios("keyed claims (values/s = claims/s)", &keyed, &skip_keyed);
            print_ratios(
                &format!("claim({}) requests (values/s)", cfg.bulk_count),
                &many,
                &skip_many,
            );
        }
        main.close().await;
    }
    if cfg.part("bulk") {
        bulk(backend, cfg, dir).await;
    }
}
