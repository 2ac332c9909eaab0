//! Resident memory with 10M values allocated at random over a 2^32 pool
//! (DESIGN.md §7: target ≤ 40 MB). Two cases, each in a fresh process:
//!
//! - `loaded`: the pool as a server holds it after reading its blocks from
//!   the store (what a restarted server, or one that has been compacting,
//!   holds);
//! - `filled`: the pool right after 10M random allocations in place, where
//!   growing containers leave allocator slack behind.
//!
//! Run: cargo bench -p allot-core --bench memory

use allot_core::{Block, PoolKind, PoolSpec, PoolState, Strategy};

const VALUES: u64 = 10_000_000;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn spec() -> PoolSpec {
    let mut spec = PoolSpec::new(PoolKind::Range {
        lo: 0,
        hi: u32::MAX as u64,
    });
    spec.strategy = Strategy::Random;
    spec
}

fn filled() -> PoolState {
    let mut pool = PoolState::new(&spec(), 7).expect("valid spec");
    for _ in 0..10 {
        pool.allocate_many(VALUES / 10, 1, 0).expect("room");
    }
    pool
}

/// Builds the same kind of pool block by block, each block passing through
/// its storage encoding, as when a server loads a pool from the store.
fn loaded() -> PoolState {
    let spec = spec();
    let mut pool = PoolState::new(&spec, 7).expect("valid spec");
    let blocks = (u32::MAX as u64 >> 16) + 1;
    let mut scratch = PoolState::new(
        &PoolSpec {
            kind: PoolKind::Range { lo: 0, hi: 65_535 },
            ..spec.clone()
        },
        9,
    )
    .expect("valid spec");
    let per_block = VALUES / blocks;
    let mut extra = VALUES % blocks;
    for idx in 0..blocks {
        let n = per_block + u64::from(extra > 0);
        extra = extra.saturating_sub(1);
        let runs = scratch.allocate_many(n, 1, 0).expect("room");
        let block = scratch.block(0).expect("non-empty").encode();
        pool.load_block(idx, Block::decode(&block).expect("own encoding"));
        for r in runs {
            scratch.release(r, 0).expect("allocated");
        }
    }
    pool
}

fn main() {
    let phase = std::env::args()
        .skip(1)
        .find(|a| a == "loaded" || a == "filled");
    let Some(phase) = phase else {
        // Parent: run each case in a fresh process so one's heap does not count for the other.
        let exe = std::env::current_exe().expect("own path");
        for case in ["loaded", "filled"] {
            let status = std::process::Command::new(&exe)
                .arg(case)
                .status()
                .expect("run case");
            assert!(status.success(), "case {case} failed");
        }
        return;
    };
    let before = rss_kib();
    let start = std::time::Instant::now();
    let pool = if phase == "loaded" {
        loaded()
    } else {
        filled()
    };
    let took = start.elapsed();
    let after = rss_kib();
    let encoded: usize = (0..=(u32::MAX as u64 >> 16))
        .filter_map(|i| pool.block(i))
        .map(|b| b.encode().len())
        .sum();
    let stats = pool.stats();
    assert_eq!(stats.allocated, VALUES);
    println!(
        "{phase:>6}: {} values in {} blocks, built in {:.2?}; resident memory growth {:.1} MiB; encoded {:.1} MiB",
        stats.allocated,
        pool.block_count(),
        took,
        (after - before) as f64 / 1024.0,
        encoded as f64 / (1024.0 * 1024.0)
    );
}
