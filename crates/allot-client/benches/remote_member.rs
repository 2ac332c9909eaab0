//! Remote members (issue 5): a member through `allot serve`'s gRPC member
//! session, allocating in its own process.
//!
//! 1. `block` durability: values per second on the hot path
//!    (`RemoteAllocator::try_allocate`, falling back to
//!    `RemoteMember::allocate` when a block must be granted), 1 and 2
//!    threads. Same loop as `cargo bench -p allot --bench members` part 1,
//!    so the two compare: target ≤ 50 ns per value.
//! 2. `sync` durability: every value stored through the server before it is
//!    returned, N tasks sharing the member's group commits.
//!
//! The server runs in this process (a real loopback socket) on the
//! embedded log store in a temporary directory.
//!
//! Run: cargo bench -p allot-client --bench remote_member
//! Environment: `ALLOT_BENCH_VALUES` [20000000] values per thread count,
//! `ALLOT_BENCH_SYNC_SECS` [5] seconds per sync level.

use std::time::{Duration, Instant};

use allot::{Durability, MemberOptions, PoolKind, PoolSpec};
use allot_client::Client;

fn spec(hi: u64, block_size: u64, durability: Durability) -> PoolSpec {
    let mut spec = PoolSpec::new(PoolKind::Range { lo: 0, hi });
    spec.block_size = block_size;
    spec.member_blocks = Some(durability);
    spec
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = allot_server::Config::new(dir.path());
        config.listen = "127.0.0.1:0".into();
        let server = allot_server::Server::bind(config).await.expect("server");
        let url = format!("http://{}", server.local_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        let client = Client::new(&url).expect("client");
        println!("allot remote member benchmark (server {url}, log store)");
        hot_path(&client, env("ALLOT_BENCH_VALUES", 20_000_000)).await;
        sync(
            &client,
            Duration::from_secs(env("ALLOT_BENCH_SYNC_SECS", 5)),
        )
        .await;
        let _ = stop.send(());
        serving.await.expect("server task").expect("server");
    });
}

async fn hot_path(client: &Client, values: u64) {
    println!("\n1. values from granted blocks (block durability, pool of 2^32, blocks of 65536)");
    println!("threads |     values |   seconds | ns per value | values/s");
    for threads in [1usize, 2] {
        let pool = format!("teid-{threads}");
        let pool_spec = spec(u32::MAX as u64, 65536, Durability::Block);
        client
            .create_pool(&pool, pool_spec, Default::default(), None)
            .await
            .expect("pool");
        let member = client
            .join(&format!("bench-{threads}"), MemberOptions::default())
            .await
            .expect("join");
        member.allocate(&pool).await.expect("first value");
        let per_thread = values / threads as u64;
        let start = Instant::now();
        let mut handles = Vec::new();
        for _ in 0..threads {
            let (member, pool) = (member.clone(), pool.clone());
            let mut alloc = member.allocator(&pool).await.expect("allocator");
            let rt = tokio::runtime::Handle::current();
            handles.push(std::thread::spawn(move || {
                let mut sum = 0u64;
                let mut n = 0;
                while n < per_thread {
                    match alloc.try_allocate().expect("allocate") {
                        Some(v) => sum = sum.wrapping_add(v.offset),
                        // A block to be granted: the slow path.
                        None => {
                            let v = rt.block_on(member.allocate(&pool)).expect("allocate");
                            sum = sum.wrapping_add(v.block);
                        }
                    }
                    n += 1;
                }
                sum
            }));
        }
        for h in handles {
            std::hint::black_box(h.join().expect("thread"));
        }
        let secs = start.elapsed().as_secs_f64();
        let total = per_thread * threads as u64;
        println!(
            "{threads:>7} | {total:>10} | {secs:>9.3} | {:>12.1} | {:>8.0}",
            secs * 1e9 / total as f64,
            total as f64 / secs
        );
        member.leave().await.expect("leave");
    }
}

async fn sync(client: &Client, window: Duration) {
    println!("\n2. sync durability: each value stored through the server before it returns");
    println!("  tasks |   values | values/s | mean latency");
    for tasks in [1usize, 16, 64] {
        let pool = format!("ids-{tasks}");
        let pool_spec = spec(u32::MAX as u64, 65536, Durability::Sync);
        client
            .create_pool(&pool, pool_spec, Default::default(), None)
            .await
            .expect("pool");
        let member = client
            .join(&format!("sync-{tasks}"), MemberOptions::default())
            .await
            .expect("join");
        member.allocate(&pool).await.expect("first value");
        let start = Instant::now();
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let (member, pool) = (member.clone(), pool.clone());
            handles.push(tokio::spawn(async move {
                let mut n = 0u64;
                while start.elapsed() < window {
                    member.allocate(&pool).await.expect("allocate");
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for h in handles {
            total += h.await.expect("task");
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{tasks:>7} | {total:>8} | {:>8.0} | {:>9.3} ms",
            total as f64 / secs,
            secs * 1000.0 * tasks as f64 / total as f64
        );
        member.leave().await.expect("leave");
    }
}
