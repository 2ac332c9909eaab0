//! Model-based test: random sequences of pool operations against a plain
//! reference model, on the in-memory and the redb backends (with restarts on
//! redb). Checks after every step: no value held twice (no overlapping
//! prefixes), keyed claims stable, and the engine's claims equal the model's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use allot::{AllocRequest, Allot, Error, PoolKind, PoolSpec, Strategy, Target};
use allot_store::{MemoryStore, RedbOptions, RedbStore, Store};
use ipnet::IpNet;
use proptest::prelude::*;
use proptest::strategy::Strategy as Gen;

const RANGE: &str = "r";
const PREFIX: &str = "p";
const KEYS: usize = 8;

#[derive(Debug, Clone)]
enum Step {
    Alloc {
        prefix: bool,
        len: Option<u8>,
    },
    Bulk {
        prefix: bool,
        n: u64,
    },
    AllocValue {
        prefix: bool,
        pick: u64,
    },
    Claim {
        prefix: bool,
        key: usize,
        owner: Option<u8>,
    },
    ReleaseValue {
        prefix: bool,
        pick: usize,
    },
    ReleaseKey {
        prefix: bool,
        key: usize,
    },
    ResyncBegin {
        prefix: bool,
        owner: Option<u8>,
    },
    ResyncEnd {
        prefix: bool,
        owner: Option<u8>,
    },
    Restart,
}

fn step() -> impl Gen<Value = Step> {
    let owner = prop::option::of(0u8..2);
    prop_oneof![
        4 => (any::<bool>(), prop::option::of(27u8..=30)).prop_map(|(prefix, len)| Step::Alloc { prefix, len }),
        1 => (any::<bool>(), 1u64..6).prop_map(|(prefix, n)| Step::Bulk { prefix, n }),
        2 => (any::<bool>(), 0u64..64).prop_map(|(prefix, pick)| Step::AllocValue { prefix, pick }),
        4 => (any::<bool>(), 0..KEYS, owner.clone()).prop_map(|(prefix, key, owner)| Step::Claim { prefix, key, owner }),
        3 => (any::<bool>(), any::<usize>()).prop_map(|(prefix, pick)| Step::ReleaseValue { prefix, pick }),
        2 => (any::<bool>(), 0..KEYS).prop_map(|(prefix, key)| Step::ReleaseKey { prefix, key }),
        1 => (any::<bool>(), owner.clone()).prop_map(|(prefix, owner)| Step::ResyncBegin { prefix, owner }),
        1 => (any::<bool>(), owner).prop_map(|(prefix, owner)| Step::ResyncEnd { prefix, owner }),
        1 => Just(Step::Restart),
    ]
}

/// What one claim looks like in the model.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    key: Option<String>,
    owner: Option<String>,
    /// The open resync passes ("" = all owners) that marked this claim.
    marks: BTreeSet<String>,
}

impl Held {
    fn bare() -> Self {
        Held {
            key: None,
            owner: None,
            marks: BTreeSet::new(),
        }
    }
}

#[derive(Debug, Default)]
struct PoolModel {
    held: BTreeMap<String, Held>,
    keys: BTreeMap<String, String>,
    /// Open resyncs by owner filter ("" = all).
    resyncs: BTreeSet<String>,
}

fn owner_name(o: Option<u8>) -> Option<String> {
    o.map(|o| format!("agent-{o}"))
}

async fn setup(store: Arc<dyn Store>, strategy: Strategy, create: bool) -> Allot {
    let allot = Allot::new(store);
    if create {
        let mut range = PoolSpec::new(PoolKind::Range { lo: 1000, hi: 1039 });
        range.strategy = strategy;
        range.block_size = 8;
        range.reserved = vec!["1003".into(), "1010-1012".into()];
        allot
            .create_pool(RANGE, range, Default::default())
            .await
            .unwrap();
        // 16 units of /30 in a /26; the default hands out /28s (4 units).
        let mut prefix = PoolSpec::new(PoolKind::Prefixes {
            cidr: "10.0.0.0/26".parse().unwrap(),
            prefix_len: 28,
            max_prefix_len: 30,
        });
        prefix.strategy = strategy;
        prefix.block_size = 4;
        allot
            .create_pool(PREFIX, prefix, Default::default())
            .await
            .unwrap();
    }
    allot
}

fn overlaps(a: &str, b: &str) -> bool {
    let (a, b): (IpNet, IpNet) = (a.parse().unwrap(), b.parse().unwrap());
    a.contains(&b.network()) || b.contains(&a.network())
}

fn record(
    model: &mut PoolModel,
    is_prefix: bool,
    value: &str,
    held: Held,
) -> Result<(), TestCaseError> {
    for v in model.held.keys() {
        prop_assert!(v != value, "value {} handed out twice", value);
        if is_prefix {
            prop_assert!(!overlaps(v, value), "{} overlaps {}", value, v);
        }
    }
    if let Some(k) = &held.key {
        model.keys.insert(k.clone(), value.to_string());
    }
    model.held.insert(value.to_string(), held);
    Ok(())
}

async fn run(
    steps: Vec<Step>,
    strategy: Strategy,
    dir: Option<&Path>,
) -> Result<(), TestCaseError> {
    let open = |dir: Option<&Path>| -> Arc<dyn Store> {
        match dir {
            Some(d) => {
                Arc::new(RedbStore::open(d.join("allot.redb"), RedbOptions::default()).unwrap())
            }
            None => Arc::new(MemoryStore::new()),
        }
    };
    let mut allot = setup(open(dir), strategy, true).await;
    let mut models = [PoolModel::default(), PoolModel::default()];
    for s in steps {
        match s {
            Step::Restart => {
                if dir.is_some() {
                    allot.close().await;
                    allot = setup(open(dir), strategy, false).await;
                }
            }
            Step::Alloc { prefix, len } => {
                let mut req = AllocRequest::one();
                if prefix {
                    req.prefix_len = len;
                }
                let m = &mut models[prefix as usize];
                match allot
                    .allocate(if prefix { PREFIX } else { RANGE }, req)
                    .await
                {
                    Ok(c) => {
                        prop_assert_eq!(c.len(), 1);
                        record(m, prefix, &c[0].value, Held::bare())?;
                    }
                    Err(Error::Exhausted { .. }) => {
                        // Must really be full for single units.
                        if !prefix {
                            prop_assert_eq!(m.held.len(), 40 - 4);
                        }
                    }
                    Err(e) => prop_assert!(false, "unexpected {}", e),
                }
            }
            Step::Bulk { prefix, n } => {
                let m = &mut models[prefix as usize];
                let before = m.held.len();
                match allot
                    .allocate(if prefix { PREFIX } else { RANGE }, AllocRequest::many(n))
                    .await
                {
                    Ok(c) => {
                        prop_assert_eq!(c.len() as u64, n);
                        for cl in c {
                            record(m, prefix, &cl.value, Held::bare())?;
                        }
                    }
                    Err(Error::Exhausted { .. }) => {
                        if !prefix {
                            prop_assert!(before as u64 + n > 36);
                        }
                    }
                    Err(e) => prop_assert!(false, "unexpected {}", e),
                }
            }
            Step::AllocValue { prefix, pick } => {
                let value = if prefix {
                    format!("10.0.0.{}/28", (pick % 4) * 16)
                } else {
                    (1000 + pick % 40).to_string()
                };
                let m = &mut models[prefix as usize];
                let free = !m
                    .held
                    .keys()
                    .any(|v| v == &value || (prefix && overlaps(v, &value)));
                let reserved =
                    !prefix && ["1003", "1010", "1011", "1012"].contains(&value.as_str());
                match allot
                    .allocate(
                        if prefix { PREFIX } else { RANGE },
                        AllocRequest::value(&value),
                    )
                    .await
                {
                    Ok(c) => {
                        prop_assert!(
                            free && !reserved,
                            "{} handed out though held or reserved",
                            value
                        );
                        prop_assert_eq!(&c[0].value, &value);
                        record(m, prefix, &value, Held::bare())?;
                    }
                    Err(Error::Conflict(_)) => prop_assert!(!free),
                    Err(Error::InvalidInput(_)) => prop_assert!(reserved),
                    Err(e) => prop_assert!(false, "unexpected {}", e),
                }
            }
            Step::Claim { prefix, key, owner } => {
                let key = format!("key-{key}");
                let owner = owner_name(owner);
                let m = &mut models[prefix as usize];
                let mut req = AllocRequest::key(&key);
                req.owner = owner.clone();
                match allot
                    .allocate(if prefix { PREFIX } else { RANGE }, req)
                    .await
                {
                    Ok(c) => {
                        prop_assert!(!c[0].stale);
                        match m.keys.get(&key) {
                            Some(v) => {
                                prop_assert_eq!(v, &c[0].value, "key {} moved", key);
                                let h = m.held.get_mut(v).unwrap();
                                h.marks.clear();
                                if owner.is_some() {
                                    h.owner = owner;
                                }
                            }
                            None => record(
                                m,
                                prefix,
                                &c[0].value,
                                Held {
                                    key: Some(key),
                                    owner,
                                    marks: BTreeSet::new(),
                                },
                            )?,
                        }
                    }
                    Err(Error::Exhausted { .. }) => prop_assert!(!m.keys.contains_key(&key)),
                    Err(e) => prop_assert!(false, "unexpected {}", e),
                }
            }
            Step::ReleaseValue { prefix, pick } => {
                let m = &mut models[prefix as usize];
                let pool = if prefix { PREFIX } else { RANGE };
                if m.held.is_empty() {
                    let v = if prefix { "10.0.0.0/28" } else { "1000" };
                    prop_assert!(allot.release(pool, Target::Value(v.into())).await.is_err());
                } else {
                    let v = m.held.keys().nth(pick % m.held.len()).unwrap().clone();
                    let c = allot.release(pool, Target::Value(v.clone())).await.unwrap();
                    prop_assert_eq!(&c.value, &v);
                    let h = m.held.remove(&v).unwrap();
                    if let Some(k) = h.key {
                        m.keys.remove(&k);
                    }
                    prop_assert!(allot.release(pool, Target::Value(v)).await.is_err());
                }
            }
            Step::ReleaseKey { prefix, key } => {
                let key = format!("key-{key}");
                let m = &mut models[prefix as usize];
                let r = allot
                    .release(
                        if prefix { PREFIX } else { RANGE },
                        Target::Key(key.clone()),
                    )
                    .await;
                match m.keys.remove(&key) {
                    Some(v) => {
                        prop_assert_eq!(r.unwrap().value, v.clone());
                        m.held.remove(&v);
                    }
                    None => prop_assert!(matches!(r, Err(Error::NotFound(_)))),
                }
            }
            Step::ResyncBegin { prefix, owner } => {
                let owner = owner_name(owner);
                let m = &mut models[prefix as usize];
                let rep = allot
                    .resync_begin(if prefix { PREFIX } else { RANGE }, owner.as_deref())
                    .await
                    .unwrap();
                let mut marked = 0;
                let pass = owner.clone().unwrap_or_default();
                for h in m.held.values_mut() {
                    if h.key.is_some() && (owner.is_none() || h.owner == owner) {
                        h.marks.insert(pass.clone());
                        marked += 1;
                    }
                }
                prop_assert_eq!(rep.count, marked);
                m.resyncs.insert(pass);
            }
            Step::ResyncEnd { prefix, owner } => {
                let owner = owner_name(owner);
                let m = &mut models[prefix as usize];
                let r = allot
                    .resync_end(if prefix { PREFIX } else { RANGE }, owner.as_deref())
                    .await;
                if !m.resyncs.remove(&owner.clone().unwrap_or_default()) {
                    prop_assert!(matches!(r, Err(Error::NotFound(_))));
                    continue;
                }
                let rep = r.unwrap();
                // This pass releases exactly the claims it marked.
                let pass = owner.clone().unwrap_or_default();
                let expect: BTreeSet<String> = m
                    .held
                    .iter()
                    .filter(|(_, h)| h.marks.contains(&pass))
                    .map(|(v, _)| v.clone())
                    .collect();
                let got: BTreeSet<String> = rep.released.iter().map(|c| c.value.clone()).collect();
                prop_assert_eq!(&got, &expect);
                for v in expect {
                    let h = m.held.remove(&v).unwrap();
                    if let Some(k) = h.key {
                        m.keys.remove(&k);
                    }
                }
            }
        }
        // The engine's view equals the model's.
        for (i, pool) in [RANGE, PREFIX].into_iter().enumerate() {
            let page = allot.list_claims(pool, None, 1000).await.unwrap();
            let got: BTreeMap<String, (Option<String>, Option<String>, bool)> = page
                .claims
                .into_iter()
                .map(|c| (c.value, (c.key, c.owner, c.stale)))
                .collect();
            let want: BTreeMap<String, (Option<String>, Option<String>, bool)> = models[i]
                .held
                .iter()
                .map(|(v, h)| {
                    (
                        v.clone(),
                        (h.key.clone(), h.owner.clone(), !h.marks.is_empty()),
                    )
                })
                .collect();
            prop_assert_eq!(&got, &want, "pool {}", pool);
            let info = allot.pool(pool).await.unwrap();
            let units: u64 = if i == 0 {
                models[i].held.len() as u64
            } else {
                models[i]
                    .held
                    .keys()
                    .map(|v| 1u64 << (30 - v.parse::<IpNet>().unwrap().prefix_len()))
                    .sum()
            };
            prop_assert_eq!(info.stats.allocated, units);
        }
        for (k, v) in &models[0].keys {
            let c = allot.lookup(RANGE, Target::Key(k.clone())).await.unwrap();
            prop_assert_eq!(&c.value, v);
        }
    }
    Ok(())
}

fn strategy_kind() -> impl Gen<Value = allot::Strategy> {
    prop_oneof![
        Just(allot::Strategy::Lowest),
        Just(allot::Strategy::Next),
        Just(allot::Strategy::Random)
    ]
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn engine_matches_model_in_memory(steps in prop::collection::vec(step(), 1..80), strategy in strategy_kind()) {
        block_on(run(steps, strategy, None))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn engine_matches_model_on_redb_with_restarts(steps in prop::collection::vec(step(), 1..60), strategy in strategy_kind()) {
        let dir = tempfile::tempdir().unwrap();
        block_on(run(steps, strategy, Some(dir.path())))?;
    }
}
