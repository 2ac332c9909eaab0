//! allocate + release of single values in memory on a 2^32 pool that already
//! holds 10M values spread at random (DESIGN.md §7: target ≤ 50 ns per op).
//!
//! Run: cargo bench -p allot-core --bench alloc

use allot_core::{PoolKind, PoolSpec, PoolState, Strategy};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

const PREFILL: u64 = 10_000_000;

fn filled(strategy: Strategy) -> PoolState {
    let mut spec = PoolSpec::new(PoolKind::Range {
        lo: 0,
        hi: u32::MAX as u64,
    });
    spec.strategy = Strategy::Random;
    let mut pool = PoolState::new(&spec, 1).expect("valid spec");
    pool.allocate_many(PREFILL, 1, 0).expect("room for 10M");
    // Same blocks, now allocating with the strategy under test.
    spec.strategy = strategy;
    let mut out = PoolState::new(&spec, 2).expect("valid spec");
    for idx in 0..=(u32::MAX as u64 >> 16) {
        if let Some(b) = pool.block(idx) {
            out.load_block(idx, b.clone());
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("alloc_release_2^32_pool_10M_allocated");
    for strategy in [Strategy::Lowest, Strategy::Next, Strategy::Random] {
        let mut pool = filled(strategy);
        assert_eq!(pool.stats().allocated, PREFILL);
        group.bench_function(strategy.to_string(), |b| {
            b.iter(|| {
                let run = pool.allocate(1, 0).expect("free values left");
                pool.release(black_box(run), 0).expect("just allocated");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
