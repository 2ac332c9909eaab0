//! `allot-bench`: see the crate documentation and `allot-bench --help`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use allot_bench::allot_client::{self, AllotClient, Workload};
use allot_bench::driver::{self, LevelResult, Timing};
use allot_bench::grpc_client::GrpcClient;
use allot_bench::redis_client::{self, RedisClient};
use allot_bench::stats;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "allot-bench",
    about = "Claims per second and latency through a running `allot serve` (REST or gRPC) or redis-server (SPOP/SADD), loopback only",
    after_help = "Examples:
  allot-bench allot --server http://127.0.0.1:7070 --workload claim --clients 1,8,64 --secs 5
  allot-bench allot --server http://127.0.0.1:7070 --protocol grpc
  allot-bench redis --server 127.0.0.1:6379 --workload claim-release
  allot-bench free-port
scripts/bench-server starts both servers and runs everything."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Claims through a running `allot serve` over REST or gRPC.
    Allot(AllotArgs),
    /// SPOP (and SADD) on a SET of free IDs in a running redis-server.
    Redis(RedisArgs),
    /// Prints a free TCP port on 127.0.0.1.
    FreePort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum WorkloadArg {
    /// allot: claim a key never used before; Redis: SPOP. One round trip.
    Claim,
    /// allot: claim any value and keep it (no key, like SPOP); Redis: SPOP.
    /// One round trip.
    ClaimAny,
    /// allot: claim any value, release it by value; Redis: SPOP then SADD
    /// the same ID back. Two round trips per operation.
    ClaimRelease,
}

impl WorkloadArg {
    fn workload(self) -> Workload {
        match self {
            WorkloadArg::Claim => Workload::Claim,
            WorkloadArg::ClaimAny => Workload::ClaimAny,
            WorkloadArg::ClaimRelease => Workload::ClaimRelease,
        }
    }

    /// Whether claimed values stay claimed, so every one must be distinct.
    fn keeps(self) -> bool {
        self != WorkloadArg::ClaimRelease
    }

    fn name(self) -> &'static str {
        match self {
            WorkloadArg::Claim => "claim",
            WorkloadArg::ClaimAny => "claim-any",
            WorkloadArg::ClaimRelease => "claim-release",
        }
    }
}

/// How allot-bench talks to `allot serve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Protocol {
    /// REST/JSON over HTTP/1.1 (`POST /v1/pools/{pool}/allocate`, `/release`).
    Rest,
    /// gRPC over HTTP/2 (`allot.v1.Allot/Allocate`, `/Release`).
    Grpc,
}

#[derive(Debug, Args)]
struct Common {
    /// What each operation does.
    #[arg(long, value_enum, default_value = "claim")]
    workload: WorkloadArg,
    /// Concurrency levels, one connection per client.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    clients: Vec<usize>,
    /// Measured seconds per level.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Warm-up seconds per level (not measured).
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Threads of the client runtime (1: one thread drives every client,
    /// leaving the other core to the server).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Name of the target in the results file [default: allot, allot-grpc
    /// or redis].
    #[arg(long)]
    label: Option<String>,
    /// Appends one tab-separated line per level to this file: label,
    /// workload, clients, requests, req/s, mean, p50, p99, max ms, errors,
    /// client cpu, server cpu, other cpu (cores).
    #[arg(long, value_name = "FILE")]
    results: Option<PathBuf>,
    /// Pid of the server process, to report its CPU use (Linux /proc).
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
}

#[derive(Debug, Args)]
struct AllotArgs {
    /// Base URL of a running `allot serve` (loopback only).
    #[arg(long, value_name = "URL")]
    server: String,
    /// Pool to claim from; created if missing as a range pool 1..=2^40.
    #[arg(long, default_value = "bench")]
    pool: String,
    /// Bearer token, if the server requires one.
    #[arg(long, env = "ALLOT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// API the clients use (the pool is created over REST either way; both
    /// are served on the same port).
    #[arg(long, value_enum, default_value = "rest")]
    protocol: Protocol,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Args)]
struct RedisArgs {
    /// Address of a running redis-server, HOST:PORT or redis://HOST:PORT
    /// (loopback only).
    #[arg(long, value_name = "ADDR")]
    server: String,
    /// The SET of free IDs.
    #[arg(long, default_value = "ids")]
    set: String,
    /// IDs put in the set (1..=N) before a level when fewer than
    /// --refill-below are left.
    #[arg(long, default_value_t = 2_000_000)]
    fill: u64,
    /// Refill the set before a level when it holds fewer IDs than this.
    #[arg(long, default_value_t = 1_000_000)]
    refill_below: u64,
    #[command(flatten)]
    common: Common,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::FreePort => {
            let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
            println!("{}", l.local_addr().context("local address")?.port());
            Ok(())
        }
        Cmd::Allot(a) => {
            let rt = runtime(a.common.threads)?;
            rt.block_on(bench_allot(a))
        }
        Cmd::Redis(a) => {
            let rt = runtime(a.common.threads)?;
            rt.block_on(bench_redis(a))
        }
    }
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    rt.context("starting the client runtime")
}

/// Resolves `host:port` to a loopback address; anything else is refused.
async fn loopback(host_port: &str) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(host_port)
        .await
        .with_context(|| format!("resolving {host_port}"))?
        .collect();
    match addrs.iter().find(|a| a.ip().is_loopback()) {
        Some(a) => Ok(*a),
        None => bail!(
            "{host_port} is not a loopback address; allot-bench sends load to this machine only"
        ),
    }
}

fn timing(c: &Common) -> Result<Timing> {
    let valid =
        c.secs > 0.0 && c.secs.is_finite() && c.warmup_secs >= 0.0 && c.warmup_secs.is_finite();
    if !valid {
        bail!("--secs must be positive and --warmup-secs not negative");
    }
    if c.clients.is_empty() || c.clients.contains(&0) {
        bail!("--clients needs one or more positive numbers");
    }
    Ok(Timing {
        warmup: Duration::from_secs_f64(c.warmup_secs),
        measure: Duration::from_secs_f64(c.secs),
    })
}

/// A run id unique enough that keys are never reused on the same pool.
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("b{:x}{:x}", nanos, std::process::id())
}

struct Report<'a> {
    common: &'a Common,
    label: String,
    file: Option<std::fs::File>,
}

impl<'a> Report<'a> {
    fn new(common: &'a Common, default_label: &str) -> Result<Report<'a>> {
        let file = match &common.results {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("opening {}", p.display()))?,
            ),
            None => None,
        };
        Ok(Report {
            common,
            label: common
                .label
                .clone()
                .unwrap_or_else(|| default_label.to_string()),
            file,
        })
    }

    fn level(&mut self, r: &LevelResult) -> Result<()> {
        println!("{}", stats::row(&r.summary));
        for e in &r.error_samples {
            println!("{:>8}   error: {e}", "");
        }
        if let Some(f) = &mut self.file {
            writeln!(
                f,
                "{}",
                stats::tsv(&self.label, self.common.workload.name(), &r.summary)
            )
            .context("writing the results file")?;
        }
        Ok(())
    }
}

async fn bench_allot(a: AllotArgs) -> Result<()> {
    let t = timing(&a.common)?;
    let uri: hyper::Uri = a
        .server
        .parse()
        .with_context(|| format!("--server {}", a.server))?;
    if uri.scheme_str() != Some("http") {
        bail!("--server must be an http:// URL, not {}", a.server);
    }
    let authority = uri
        .authority()
        .with_context(|| format!("--server {} has no host", a.server))?;
    let host_port = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let addr = loopback(&host_port).await?;
    let target = allot_client::Target::new(addr, authority.as_str(), a.token.as_deref())
        .map_err(anyhow::Error::msg)?;
    let mut conn = allot_client::Conn::new(target.clone());
    allot_client::wait_ready(&mut conn, Duration::from_secs(30))
        .await
        .with_context(|| format!("waiting for {} to be ready", a.server))?;
    let created = allot_client::ensure_pool(&mut conn, &a.pool)
        .await
        .with_context(|| format!("creating pool {}", a.pool))?;
    drop(conn);
    let wl = a.common.workload;
    let what = match (a.protocol, wl) {
        (Protocol::Rest, WorkloadArg::Claim) => "1 request = POST /allocate {\"key\": <new key>}",
        (Protocol::Rest, WorkloadArg::ClaimAny) => "1 request = POST /allocate {}",
        (Protocol::Rest, WorkloadArg::ClaimRelease) => {
            "1 request = POST /allocate {} + POST /release {\"value\": ..} (2 round trips)"
        }
        (Protocol::Grpc, WorkloadArg::Claim) => "1 request = Allocate {key: <new key>}",
        (Protocol::Grpc, WorkloadArg::ClaimAny) => "1 request = Allocate {}",
        (Protocol::Grpc, WorkloadArg::ClaimRelease) => {
            "1 request = Allocate {} + Release {value: ..} (2 round trips)"
        }
    };
    let via = match a.protocol {
        Protocol::Rest => "REST",
        Protocol::Grpc => "gRPC",
    };
    println!(
        "== allot {} via {}, {} ({}), pool {} ({}); {} s measured after {} s warm-up per level; {} ==",
        wl.name(),
        via,
        a.server,
        what,
        a.pool,
        if created { "created" } else { "existing" },
        a.common.secs,
        a.common.warmup_secs,
        client_threads(a.common.threads)
    );
    println!("{}", stats::header());
    let default_label = match a.protocol {
        Protocol::Rest => "allot",
        Protocol::Grpc => "allot-grpc",
    };
    let mut report = Report::new(&a.common, default_label)?;
    let run = run_id();
    let mut all_values = Vec::new();
    for (level, &n) in a.common.clients.iter().enumerate() {
        let run = format!("{run}-{level}");
        let keep = wl.keeps();
        let r = match a.protocol {
            Protocol::Rest => {
                let clients = (0..n)
                    .map(|i| AllotClient::new(target.clone(), &a.pool, wl.workload(), &run, i))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(anyhow::Error::msg)?;
                driver::run_level(clients, t, keep, a.common.server_pid).await
            }
            Protocol::Grpc => {
                let clients = (0..n)
                    .map(|i| {
                        GrpcClient::new(addr, a.token.as_deref(), &a.pool, wl.workload(), &run, i)
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(anyhow::Error::msg)?;
                driver::run_level(clients, t, keep, a.common.server_pid).await
            }
        };
        report.level(&r)?;
        all_values.extend_from_slice(&r.values);
    }
    if wl.keeps() {
        check_distinct(&mut all_values, "claims")?;
    }
    Ok(())
}

fn client_threads(n: usize) -> String {
    if n <= 1 {
        "client: 1 thread".into()
    } else {
        format!("client: {n} threads")
    }
}

/// Every claimed value must be distinct; a duplicate fails the run.
fn check_distinct(values: &mut [u64], what: &str) -> Result<()> {
    let dups = driver::duplicates(values);
    println!(
        "{:>8}   check: {} {what} verified, {} distinct, {dups} duplicates",
        "",
        values.len(),
        values.len() - dups
    );
    if dups > 0 {
        bail!("{dups} values were handed out twice");
    }
    Ok(())
}

async fn bench_redis(a: RedisArgs) -> Result<()> {
    let t = timing(&a.common)?;
    let host_port = a.server.strip_prefix("redis://").unwrap_or(&a.server);
    let addr = loopback(host_port.trim_end_matches('/')).await?;
    let mut conn = redis_client::Conn::new(addr);
    let mut persistence = Vec::new();
    for p in ["appendonly", "appendfsync", "save"] {
        let v = redis_client::config_get(&mut conn, p)
            .await
            .with_context(|| format!("asking {} for {p}", a.server))?;
        persistence.push(format!("{p}={v:?}"));
    }
    let wl = a.common.workload;
    let what = match wl {
        WorkloadArg::Claim | WorkloadArg::ClaimAny => "1 request = SPOP",
        WorkloadArg::ClaimRelease => "1 request = SPOP + SADD of the same ID (2 round trips)",
    };
    println!(
        "== redis {} on SET {}, {} ({}), {}; {} s measured after {} s warm-up per level; {} ==",
        wl.name(),
        a.set,
        addr,
        what,
        persistence.join(" "),
        a.common.secs,
        a.common.warmup_secs,
        client_threads(a.common.threads)
    );
    let mut report = Report::new(&a.common, "redis")?;
    let mut header_printed = false;
    for &n in &a.common.clients {
        let left = redis_client::scard(&mut conn, &a.set)
            .await
            .context("SCARD")?;
        if u64::try_from(left).unwrap_or(0) < a.refill_below {
            let started = Instant::now();
            let size = redis_client::fill(&mut conn, &a.set, a.fill, 10_000)
                .await
                .context("filling the set")?;
            println!(
                "{:>8}   (set {} filled with {size} IDs in {:.1} s)",
                "",
                a.set,
                started.elapsed().as_secs_f64()
            );
        }
        if !header_printed {
            println!("{}", stats::header());
            header_printed = true;
        }
        let clients = (0..n)
            .map(|_| RedisClient::new(addr, &a.set, wl.workload()))
            .collect();
        let keep = wl.keeps();
        let mut r = driver::run_level(clients, t, keep, a.common.server_pid).await;
        report.level(&r)?;
        if keep {
            // Between refills every SPOP must return an ID no one holds.
            check_distinct(&mut r.values, "SPOPs")?;
        }
    }
    Ok(())
}
