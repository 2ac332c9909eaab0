use super::Strategy;
use super::*;
use crate::space::parse_cidr;
use proptest::prelude::{
    any, prop_assert, prop_assert_eq, prop_oneof, proptest, Just, Strategy as PropStrategy,
};
use std::collections::BTreeSet;

fn range_pool(lo: u64, hi: u64, f: impl FnOnce(&mut PoolSpec)) -> PoolState {
    let mut spec = PoolSpec::new(PoolKind::Range { lo, hi });
    f(&mut spec);
    PoolState::new(&spec, 42).unwrap()
}

fn fmt(p: &PoolState, r: Run) -> String {
    p.space().format(r)
}

#[test]
fn lowest_skips_reserved_and_reuses_lowest() {
    let mut p = range_pool(1, 10, |s| s.reserved = vec!["2".into(), "4-5".into()]);
    let got: Vec<_> = (0..3)
        .map(|_| {
            let r = p.clone_alloc();
            fmt(&p, r)
        })
        .collect();
    assert_eq!(got, ["1", "3", "6"]);
    p.release(p.space().parse("3").unwrap(), 0).unwrap();
    let r = p.clone_alloc();
    assert_eq!(fmt(&p, r), "3");
    assert_eq!(p.stats().reserved, 3);
    assert_eq!(p.stats().allocated, 3);
    assert_eq!(p.stats().free, 4);
}

impl PoolState {
    fn clone_alloc(&mut self) -> Run {
        self.allocate(1, 0).unwrap()
    }
}

#[test]
fn next_fit_does_not_reuse_until_wrap() {
    let mut p = range_pool(0, 4, |s| s.strategy = Strategy::Next);
    let a = p.clone_alloc();
    let b = p.clone_alloc();
    p.release(a, 0).unwrap();
    let c = p.clone_alloc();
    assert_eq!((a.offset, b.offset, c.offset), (0, 1, 2));
    assert_eq!(p.clone_alloc().offset, 3);
    assert_eq!(p.clone_alloc().offset, 4);
    // wrapped around: now 0 comes back
    assert_eq!(p.clone_alloc().offset, 0);
    assert!(matches!(p.allocate(1, 0), Err(CoreError::Exhausted { .. })));
}

#[test]
fn random_hands_out_every_value_once() {
    let mut p = range_pool(0, 999, |s| {
        s.strategy = Strategy::Random;
        s.block_size = 64;
    });
    let mut seen = BTreeSet::new();
    for _ in 0..1000 {
        assert!(seen.insert(p.clone_alloc().offset));
    }
    assert!(p.allocate(1, 0).is_err());
    assert_eq!(p.stats().free, 0);
}

#[test]
fn bulk_is_all_or_nothing() {
    let mut p = range_pool(0, 9, |_| {});
    p.allocate_at(Run::single(5), 0).unwrap();
    assert!(matches!(
        p.allocate_many(10, 1, 0),
        Err(CoreError::Exhausted {
            requested: 10,
            available: 9
        })
    ));
    assert_eq!(p.stats().allocated, 1);
    let got = p.allocate_many(9, 1, 0).unwrap();
    assert_eq!(got.len(), 9);
    assert_eq!(p.stats().free, 0);
}

#[test]
fn allocate_at_refuses_reserved_taken_and_outside() {
    let mut p = range_pool(10, 20, |s| s.reserved = vec!["15".into()]);
    assert!(matches!(
        p.allocate_at(p.space().parse("15").unwrap(), 0),
        Err(CoreError::Reserved(_))
    ));
    p.allocate_at(p.space().parse("12").unwrap(), 0).unwrap();
    assert!(matches!(
        p.allocate_at(p.space().parse("12").unwrap(), 0),
        Err(CoreError::Taken(_))
    ));
    assert!(p.space().parse("21").is_err());
    assert!(matches!(
        p.release(p.space().parse("13").unwrap(), 0),
        Err(CoreError::NotAllocated(_))
    ));
}

#[test]
fn ipv4_edges_reserved() {
    let spec = PoolSpec::new(PoolKind::Addresses {
        cidr: parse_cidr("192.168.0.0/30").unwrap(),
        all_addresses: false,
    });
    let mut p = PoolState::new(&spec, 1).unwrap();
    let a = p.clone_alloc();
    let b = p.clone_alloc();
    assert_eq!(
        (fmt(&p, a).as_str(), fmt(&p, b).as_str()),
        ("192.168.0.1", "192.168.0.2")
    );
    assert!(p.allocate(1, 0).is_err());
}

#[test]
fn prefixes_of_mixed_lengths_never_overlap() {
    let spec = PoolSpec::new(PoolKind::Prefixes {
        cidr: parse_cidr("10.0.0.0/22").unwrap(),
        prefix_len: 24,
        max_prefix_len: 32,
    });
    let mut p = PoolState::new(&spec, 1).unwrap();
    let small = p
        .allocate(p.space().units_for_prefix_len(26).unwrap(), 0)
        .unwrap();
    assert_eq!(fmt(&p, small), "10.0.0.0/26");
    let a = p.allocate(p.space().default_units(), 0).unwrap();
    assert_eq!(fmt(&p, a), "10.0.1.0/24");
    let big = p
        .allocate(p.space().units_for_prefix_len(23).unwrap(), 0)
        .unwrap();
    assert_eq!(fmt(&p, big), "10.0.2.0/23");
    let next26 = p.allocate(64, 0).unwrap();
    assert_eq!(fmt(&p, next26), "10.0.0.64/26");
    assert!(matches!(
        p.allocate_at(p.space().parse("10.0.0.0/24").unwrap(), 0),
        Err(CoreError::Taken(_))
    ));
    assert!(p.allocate(256, 0).is_err());
    assert!(p
        .allocate(p.space().units_for_prefix_len(25).unwrap(), 0)
        .is_ok());
}

#[test]
fn quarantine_holds_values_back_until_expiry() {
    let mut p = range_pool(0, 1, |s| s.quarantine_secs = 10);
    let a = p.allocate(1, 0).unwrap();
    p.release(a, 1_000).unwrap();
    assert_eq!(p.stats().quarantined, 1);
    assert!(matches!(
        p.allocate_at(a, 5_000),
        Err(CoreError::Quarantined {
            until_ms: 11_000,
            ..
        })
    ));
    assert!(matches!(
        p.release(a, 5_000),
        Err(CoreError::NotAllocated(_))
    ));
    assert_eq!(p.allocate(1, 5_000).unwrap().offset, 1);
    assert!(p.allocate(1, 10_999).is_err());
    assert_eq!(p.allocate(1, 11_000).unwrap(), a);
    assert_eq!(p.stats().quarantined, 0);
}

#[test]
fn quarantine_survives_encode_decode() {
    let mut p = range_pool(0, 99, |s| s.quarantine_secs = 5);
    let a = p.allocate(1, 0).unwrap();
    p.release(a, 0).unwrap();
    let enc = p.block(0).unwrap().encode();
    let mut q = range_pool(0, 99, |s| s.quarantine_secs = 5);
    q.load_block(0, Block::decode(&enc).unwrap());
    assert_eq!(q.stats(), p.stats());
    assert_eq!(q.allocate(1, 1).unwrap().offset, 1);
    q.expire(5_000);
    assert_eq!(q.stats().quarantined, 0);
}

#[test]
fn rollback_restores_everything() {
    let mut p = range_pool(0, 1000, |s| {
        s.block_size = 16;
        s.quarantine_secs = 1;
    });
    let kept = p.allocate_many(20, 1, 0).unwrap();
    p.release(kept[3], 0).unwrap();
    let before = p.stats();
    let before_blocks: Vec<_> = (0..4).map(|i| p.block(i).cloned()).collect();
    p.checkpoint();
    p.allocate_many(50, 1, 0).unwrap();
    p.release(kept[0], 0).unwrap();
    p.expire(10_000);
    assert!(p.is_dirty());
    assert!(!p.dirty_blocks().is_empty());
    p.rollback();
    assert_eq!(p.stats(), before);
    let after_blocks: Vec<_> = (0..4).map(|i| p.block(i).cloned()).collect();
    assert_eq!(before_blocks, after_blocks);
    // the quarantine queue was restored too: expiring frees exactly one
    p.expire(10_000);
    assert_eq!(p.stats().quarantined, 0);
    assert_eq!(p.stats().allocated, 19);
}

#[test]
fn huge_pool_costs_nothing_until_used() {
    let mut p = range_pool(0, u64::MAX, |s| s.strategy = Strategy::Random);
    for _ in 0..100 {
        p.clone_alloc();
    }
    assert!(p.block_count() <= 100);
    assert_eq!(p.stats().size, 1u128 << 64);
    let mut top = range_pool(0, u64::MAX, |_| {});
    top.allocate_at(Run::single(u64::MAX), 0).unwrap();
    assert!(top.is_allocated(Run::single(u64::MAX)));
}

#[test]
fn empty_blocks_are_dropped() {
    let mut p = range_pool(0, 1 << 20, |s| s.block_size = 1024);
    let runs = p.allocate_many(3000, 1, 0).unwrap();
    assert_eq!(p.block_count(), 3);
    for r in runs {
        p.release(r, 0).unwrap();
    }
    assert_eq!(p.block_count(), 0);
}

#[derive(Debug, Clone)]
enum Step {
    Alloc,
    Bulk(u64),
    At(u64),
    Release(usize),
    Tick(u64),
}

fn step() -> impl PropStrategy<Value = Step> {
    prop_oneof![
        4 => Just(Step::Alloc),
        1 => (1u64..8).prop_map(Step::Bulk),
        2 => (0u64..70).prop_map(Step::At),
        3 => any::<usize>().prop_map(Step::Release),
        1 => (0u64..3000).prop_map(Step::Tick),
    ]
}

fn strategy_kind() -> impl PropStrategy<Value = super::Strategy> {
    prop_oneof![
        Just(super::Strategy::Lowest),
        Just(super::Strategy::Next),
        Just(super::Strategy::Random)
    ]
}

proptest! {
    /// Model check: the pool against a plain set of held values.
    #[test]
    fn pool_matches_model(steps in proptest::collection::vec(step(), 1..200), strategy in strategy_kind(), q in 0u64..3) {
        let mut p = range_pool(0, 63, |s| { s.strategy = strategy; s.block_size = 8; s.quarantine_secs = q; s.reserved = vec!["7".into(), "20-22".into()]; });
        let reserved: BTreeSet<u64> = [7, 20, 21, 22].into();
        let mut held: BTreeSet<u64> = BTreeSet::new();
        let mut quarantined: Vec<(u64, u64)> = Vec::new(); // (until, offset)
        let mut now = 0u64;
        for s in steps {
            quarantined.retain(|&(until, _)| until > now);
            let blocked: BTreeSet<u64> = quarantined.iter().map(|&(_, o)| o).collect();
            let free = 64 - reserved.len() as u64 - held.len() as u64 - blocked.len() as u64;
            match s {
                Step::Alloc => match p.allocate(1, now) {
                    Ok(r) => {
                        prop_assert!(!reserved.contains(&r.offset) && !blocked.contains(&r.offset));
                        prop_assert!(held.insert(r.offset), "handed out twice: {}", r.offset);
                        if strategy == super::Strategy::Lowest {
                            let expect = (0..64).find(|o| !held.contains(o) || *o == r.offset).filter(|o| !reserved.contains(o));
                            let lowest_free = (0..64u64).find(|o| *o == r.offset || (!held.contains(o) && !reserved.contains(o) && !blocked.contains(o)));
                            prop_assert_eq!(lowest_free, Some(r.offset), "{:?}", expect);
                        }
                    }
                    Err(_) => prop_assert_eq!(free, 0),
                },
                Step::Bulk(n) => match p.allocate_many(n, 1, now) {
                    Ok(rs) => {
                        prop_assert_eq!(rs.len() as u64, n);
                        for r in rs { prop_assert!(held.insert(r.offset)); prop_assert!(!reserved.contains(&r.offset) && !blocked.contains(&r.offset)); }
                    }
                    Err(_) => prop_assert!(free < n),
                },
                Step::At(o) => {
                    let o = o % 64;
                    let res = p.allocate_at(Run::single(o), now);
                    let ok = !held.contains(&o) && !reserved.contains(&o) && !blocked.contains(&o);
                    prop_assert_eq!(res.is_ok(), ok);
                    if ok { held.insert(o); }
                }
                Step::Release(i) => {
                    if held.is_empty() {
                        prop_assert!(p.release(Run::single(0), now).is_err() || reserved.contains(&0));
                    } else {
                        let o = *held.iter().nth(i % held.len()).unwrap();
                        p.release(Run::single(o), now).unwrap();
                        held.remove(&o);
                        if q > 0 { quarantined.push((now + q * 1000, o)); }
                        prop_assert!(p.release(Run::single(o), now).is_err());
                    }
                }
                Step::Tick(ms) => now += ms,
            }
            p.expire(now);
            quarantined.retain(|&(until, _)| until > now);
            let st = p.stats();
            prop_assert_eq!(st.allocated, held.len() as u64);
            prop_assert_eq!(st.quarantined, quarantined.len() as u64);
            let listed: BTreeSet<u64> = p.allocated_from(0).collect();
            prop_assert_eq!(&listed, &held);
        }
    }
}
