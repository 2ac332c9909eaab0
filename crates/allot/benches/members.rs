//! Members (issue 5): values per second from owned blocks in one process,
//! takeover time after a member dies, and scan time per block.
//!
//! 1. Owned-block allocation: a member of a `block`-durability pool over
//!    2^32 values (blocks of 65,536) takes values on the hot path
//!    (`PoolAllocator::try_allocate`, falling back to `Member::allocate`
//!    when a block must be taken), with 1 and 2 threads sharing the member.
//!    Design target: ≤ 50 ns per value.
//! 2. Takeover: a member owning blocks is dropped without leaving (its
//!    keep-alives stop, as with kill -9); the time until a second member
//!    owns its blocks, with a lease TTL of 2 s (target ≤ TTL + 1 s). On the
//!    in-memory store (lease expiry exact); the PostgreSQL and etcd figures
//!    come from the 50-pod test (`cargo test -p allot-testkit --test members`).
//! 3. Scan: rebuilding a 65,536-value block from the values the scan
//!    callback reports in use (half of them), parsing included (target
//!    ≤ 10 ms per block).
//!
//! Run: cargo bench -p allot --bench members
//! Environment: `ALLOT_BENCH_VALUES` [20000000] values per thread count.

use std::sync::Arc;
use std::time::{Duration, Instant};

use allot::{Allot, BlockScan, Durability, MemberOptions, PoolKind, PoolSpec};
use allot_store::MemoryStore;

fn spec(hi: u64, block_size: u64) -> PoolSpec {
    let mut spec = PoolSpec::new(PoolKind::Range { lo: 0, hi });
    spec.block_size = block_size;
    spec.member_blocks = Some(Durability::Block);
    spec
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let values: u64 = std::env::var("ALLOT_BENCH_VALUES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000_000);
    runtime.block_on(async {
        println!("allot members benchmark");
        allocation(values).await;
        takeover().await;
        scan();
    });
}

async fn allocation(values: u64) {
    println!("\n1. values from owned blocks (block durability, pool of 2^32, blocks of 65536)");
    println!("threads |     values |   seconds | ns per value | values/s");
    for threads in [1usize, 2] {
        let allot = Allot::new(Arc::new(MemoryStore::new()));
        allot
            .create_pool("teid", spec(u32::MAX as u64, 65536), Default::default())
            .await
            .expect("pool");
        let member = allot
            .join("bench", MemberOptions::default())
            .await
            .expect("join");
        // Warm: the first block.
        member.allocate("teid").await.expect("first value");
        let per_thread = values / threads as u64;
        let start = Instant::now();
        let mut handles = Vec::new();
        for _ in 0..threads {
            let member = member.clone();
            let mut alloc = member.allocator("teid").await.expect("allocator");
            let rt = tokio::runtime::Handle::current();
            handles.push(std::thread::spawn(move || {
                let mut sum = 0u64;
                let mut n = 0;
                while n < per_thread {
                    match alloc.try_allocate().expect("allocate") {
                        Some(v) => {
                            sum = sum.wrapping_add(v.offset);
                            n += 1;
                        }
                        // A block to take: the slow path, off the hot loop.
                        None => {
                            let v = rt.block_on(member.allocate("teid")).expect("allocate");
                            sum = sum.wrapping_add(v.block);
                            n += 1;
                        }
                    }
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
    }
}

async fn takeover() {
    println!("\n2. takeover after a member dies (in-memory store, lease TTL 2 s)");
    let ttl = Duration::from_secs(2);
    let store = Arc::new(MemoryStore::new());
    let allot = Allot::new(store.clone());
    allot
        .create_pool("teid", spec((1 << 20) - 1, 1024), Default::default())
        .await
        .expect("pool");
    let scan: allot::ScanFn = Arc::new(|_req: &BlockScan| Ok(Vec::new()));
    let options = MemberOptions {
        ttl,
        scan: Some(scan),
        ..MemberOptions::default()
    };
    let map = allot.owner_map().await.expect("map");
    for round in 0..3 {
        let dying = Allot::new(store.clone())
            .join(&format!("dying-{round}"), options.clone())
            .await
            .expect("join");
        for _ in 0..3000 {
            dying.allocate("teid").await.expect("allocate");
        }
        let blocks: Vec<u64> = dying
            .owned_blocks("teid")
            .into_iter()
            .map(|b| b.0)
            .collect();
        let survivor = Allot::new(store.clone())
            .join(&format!("survivor-{round}"), options.clone())
            .await
            .expect("join");
        survivor.allocate("teid").await.expect("allocate");
        let died = Instant::now();
        drop(dying);
        let name = format!("survivor-{round}");
        loop {
            if blocks.iter().all(|b| {
                map.block_owner("teid", *b)
                    .is_some_and(|o| o.member == name)
            }) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        println!(
            "  round {round}: {} blocks allocatable elsewhere {:.0} ms after the member died \
             (TTL {} ms)",
            blocks.len(),
            died.elapsed().as_secs_f64() * 1000.0,
            ttl.as_millis()
        );
        survivor.leave().await.expect("leave");
    }
}

fn scan() {
    println!("\n3. scan: rebuilding a block of 65536 from the values in use (half)");
    let in_use: Vec<String> = (0..65536u64).step_by(2).map(|v| v.to_string()).collect();
    let space = allot_core::ValueSpace::new(PoolKind::Range {
        lo: 0,
        hi: u32::MAX as u64,
    })
    .expect("space");
    let mut best = Duration::MAX;
    for _ in 0..20 {
        let start = Instant::now();
        let offsets = in_use.iter().map(|v| space.parse(v).expect("value").offset);
        let block = allot_core::OwnedBlock::with_in_use(0, 65536, space.size(), &[], offsets)
            .expect("block");
        std::hint::black_box(block.allocated());
        best = best.min(start.elapsed());
    }
    println!(
        "  {:.2} ms per block (best of 20)",
        best.as_secs_f64() * 1000.0
    );
}
