//! Members, owned blocks, takeover and fencing on one store (the in-memory
//! store, with tokio's paused clock driving lease expiry, so TTLs of seconds
//! take no real time). Multi-process and PostgreSQL/etcd runs live in the
//! testkit and CLI tests.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use allot::{
    AllocRequest, Allot, BlockChange, BlockScan, CommitOutcome, Durability, Error, Member,
    MemberOptions, PoolKind, PoolSpec, ScanFn,
};
use allot_store::{
    KeyValue, LeaseId, MemoryStore, Prefixes, RangeResult, Revision, Store, StoreError, Txn,
    TxnResponse, WatchStream,
};

const TTL: Duration = Duration::from_secs(2);

/// An engine on tokio's clock, so the paused clock drives leases, fencing
/// and expiry alike.
fn engine(store: Arc<dyn Store>) -> Allot {
    Allot::with_clock(store, Arc::new(allot::TokioClock::new()))
}

fn spec(hi: u64, block_size: u64, durability: Durability) -> PoolSpec {
    let mut spec = PoolSpec::new(PoolKind::Range { lo: 0, hi });
    spec.block_size = block_size;
    spec.member_blocks = Some(durability);
    spec
}

fn options(address: &str) -> MemberOptions {
    MemberOptions {
        ttl: TTL,
        address: Some(address.to_string()),
        ..MemberOptions::default()
    }
}

/// What the application knows: every value in use, by value, with the
/// member that handed it out. Scans answer from it, as an application
/// answers from its sessions.
#[derive(Default)]
struct InUse {
    values: Mutex<BTreeMap<u64, String>>,
}

impl InUse {
    fn record(&self, value: &str, by: &str) {
        let v: u64 = value.parse().unwrap();
        let before = self.values.lock().unwrap().insert(v, by.to_string());
        assert!(
            before.is_none(),
            "value {v} handed out to {by} while {before:?} still uses it"
        );
    }

    fn scan(self: &Arc<Self>) -> ScanFn {
        let me = self.clone();
        Arc::new(move |req: &BlockScan| {
            let (lo, hi): (u64, u64) = (req.first.parse().unwrap(), req.last.parse().unwrap());
            let values = me.values.lock().unwrap();
            Ok(values.range(lo..=hi).map(|(v, _)| v.to_string()).collect())
        })
    }
}

async fn eventually<F: Fn() -> bool>(what: &str, within: Duration, check: F) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn join_leave_incarnations_and_listing() {
    let allot = engine(Arc::new(MemoryStore::new()));
    let a = allot.join("amf-0", options("10.0.0.1")).await.unwrap();
    let b = allot.join("amf-1", options("10.0.0.2")).await.unwrap();
    assert_eq!((a.incarnation(), b.incarnation()), (1, 1));
    let map = allot.owner_map().await.unwrap();
    eventually("both listed", TTL, || map.members().len() == 2).await;
    let members = allot.list_members().await.unwrap();
    assert_eq!(members[0].record.name, "amf-0");
    assert_eq!(members[0].record.address.as_deref(), Some("10.0.0.1"));

    // Alive well past the TTL: the keep-alive works.
    tokio::time::sleep(TTL * 5).await;
    assert!(a.is_live() && b.is_live());
    assert_eq!(map.members().len(), 2);

    a.leave().await.unwrap();
    eventually("amf-0 gone at once", Duration::from_millis(100), || {
        map.members().len() == 1
    })
    .await;
    let again = allot.join("amf-0", options("10.0.0.9")).await.unwrap();
    assert_eq!(
        again.incarnation(),
        2,
        "every join under a name is a new incarnation"
    );

    // Dropping without leaving is a crash: the record goes with the lease.
    drop(b);
    eventually("amf-1 expired", TTL * 2, || map.members().len() == 1).await;

    assert!(matches!(
        allot.join("bad name", options("x")).await,
        Err(Error::InvalidInput(_))
    ));
    let short = MemberOptions {
        ttl: Duration::from_millis(500),
        ..MemberOptions::default()
    };
    assert!(matches!(
        allot.join("m", short).await,
        Err(Error::InvalidInput(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn member_pools_and_shared_pools_do_not_mix() {
    let allot = engine(Arc::new(MemoryStore::new()));
    allot
        .create_pool(
            "teid",
            spec(1023, 64, Durability::Block),
            Default::default(),
        )
        .await
        .unwrap();
    allot
        .create_pool(
            "vlans",
            PoolSpec::new(PoolKind::Range { lo: 1, hi: 10 }),
            Default::default(),
        )
        .await
        .unwrap();
    let m = allot.join("smf-0", options("a")).await.unwrap();
    let err = allot
        .allocate("teid", AllocRequest::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("through a member"), "{err}");
    let err = m.allocate("vlans").await.unwrap_err();
    assert!(
        err.to_string().contains("not a member-blocks pool"),
        "{err}"
    );
    assert!(matches!(
        m.allocate("nope").await,
        Err(Error::PoolNotFound(_))
    ));
    let v = m.allocate("teid").await.unwrap();
    // Deleting a pool whose blocks members own needs force.
    assert!(matches!(
        allot.delete_pool("teid", false).await,
        Err(Error::Conflict(_))
    ));
    allot.delete_pool("teid", true).await.unwrap();
    eventually("the member stops using the deleted pool", TTL, || {
        m.owned_blocks("teid").is_empty()
    })
    .await;
    assert!(m.release("teid", &v.value).await.is_err());
}

/// Several members allocate from one `block` pool; one dies; its blocks are
/// taken over, each by exactly one survivor, which learns the values in use
/// from the scan; across everything no value is ever handed out twice while
/// in use.
#[tokio::test(start_paused = true)]
async fn block_mode_takeover_uses_the_scan_and_never_hands_out_twice() {
    let store = Arc::new(MemoryStore::new());
    let allot = engine(store.clone());
    allot
        .create_pool(
            "teid",
            spec(4095, 128, Durability::Block),
            Default::default(),
        )
        .await
        .unwrap();
    let in_use = Arc::new(InUse::default());
    let mut members = Vec::new();
    for i in 0..4 {
        // One engine per member, as in separate processes.
        let engine = engine(store.clone());
        let opts = MemberOptions {
            scan: Some(in_use.scan()),
            ..options(&format!("10.0.0.{i}"))
        };
        members.push(engine.join(&format!("smf-{i}"), opts).await.unwrap());
    }
    // Each takes values; some are released again.
    let mut held: HashMap<String, Vec<String>> = HashMap::new();
    for round in 0..300 {
        for m in &members {
            let v = m.allocate("teid").await.unwrap();
            in_use.record(&v.value, m.name());
            held.entry(m.name().to_string()).or_default().push(v.value);
            if round % 3 == 0 {
                let v = held.get_mut(m.name()).unwrap().remove(0);
                m.release("teid", &v).await.unwrap();
                in_use.values.lock().unwrap().remove(&v.parse().unwrap());
            }
        }
    }
    let dead = members.remove(0);
    let dead_blocks: BTreeSet<u64> = dead
        .owned_blocks("teid")
        .into_iter()
        .map(|(b, _)| b)
        .collect();
    assert!(!dead_blocks.is_empty());
    let dead_epochs: BTreeMap<u64, u64> = dead.owned_blocks("teid").into_iter().collect();
    drop(dead); // kill -9: no leave

    let map = allot.owner_map().await.unwrap();
    let survivors_own = |members: &[Member]| {
        let mut all = BTreeSet::new();
        for m in members {
            for (b, _) in m.owned_blocks("teid") {
                assert!(all.insert(b), "block {b} owned by two members");
            }
        }
        all
    };
    eventually("every orphan taken", TTL * 3, || {
        dead_blocks.is_subset(&survivors_own(&members))
    })
    .await;
    for b in &dead_blocks {
        let owner = map.block_owner("teid", *b).unwrap();
        assert!(owner.live && owner.member != "smf-0");
        assert!(owner.epoch > dead_epochs[b], "the epoch grows on takeover");
    }
    // Survivors allocate everything left: never a value still in use.
    loop {
        let mut any = false;
        for m in &members {
            match m.allocate("teid").await {
                Ok(v) => {
                    in_use.record(&v.value, m.name());
                    any = true;
                }
                Err(Error::Exhausted { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        if !any {
            break;
        }
    }
    assert_eq!(
        in_use.values.lock().unwrap().len(),
        4096,
        "every value in use once"
    );
}

/// `sync` durability: the stored bitmap is the truth after a takeover, no
/// scan needed; a member restarted under the same name is a new
/// incarnation and its old blocks are orphans at once.
#[tokio::test(start_paused = true)]
async fn sync_mode_takeover_and_restart_under_the_same_name() {
    let store = Arc::new(MemoryStore::new());
    let allot = engine(store.clone());
    allot
        .create_pool("seid", spec(1023, 64, Durability::Sync), Default::default())
        .await
        .unwrap();
    let a = engine(store.clone())
        .join("smf-a", options("a"))
        .await
        .unwrap();
    let b = engine(store.clone())
        .join("smf-b", options("b"))
        .await
        .unwrap();
    let mut handed = BTreeSet::new();
    for _ in 0..150 {
        assert!(handed.insert(a.allocate("seid").await.unwrap().value));
    }
    let a_blocks: BTreeSet<u64> = a.owned_blocks("seid").into_iter().map(|(x, _)| x).collect();
    drop(a);
    // Restarted under the same name, before the old lease runs out.
    let a2 = engine(store.clone())
        .join("smf-a", options("a"))
        .await
        .unwrap();
    assert_eq!(a2.incarnation(), 2);
    // b uses the pool, so it contends for orphans too.
    assert!(handed.insert(b.allocate("seid").await.unwrap().value));
    assert!(handed.insert(a2.allocate("seid").await.unwrap().value));
    let map = allot.owner_map().await.unwrap();
    eventually("the old incarnation's blocks are taken", TTL * 3, || {
        a_blocks.iter().all(|x| {
            map.block_owner("seid", *x)
                .is_some_and(|o| o.live && (o.member != "smf-a" || o.incarnation == 2))
        })
    })
    .await;
    // Everything else: never one of the 150 values handed out before.
    loop {
        let mut any = false;
        for m in [&a2, &b] {
            match m.allocate("seid").await {
                Ok(v) => {
                    assert!(
                        handed.insert(v.value.clone()),
                        "{} handed out twice",
                        v.value
                    );
                    any = true;
                }
                Err(Error::Exhausted { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        if !any {
            break;
        }
    }
    assert_eq!(handed.len(), 1024);
}

/// A store in front of another, for faults: with `cut` set it fails every
/// call, as a network partition would; with a `gate`, it holds back every
/// transaction writing a key under the gate's prefix while the test holds
/// the gate's lock for writing.
struct Interposed {
    inner: Arc<MemoryStore>,
    cut: Arc<AtomicBool>,
    gate: Option<Gate>,
}

struct Gate {
    prefix: Vec<u8>,
    lock: Arc<tokio::sync::RwLock<()>>,
    /// Transactions waiting at the gate now.
    waiting: std::sync::atomic::AtomicUsize,
}

impl Interposed {
    fn partition(inner: Arc<MemoryStore>, cut: Arc<AtomicBool>) -> Self {
        Interposed {
            inner,
            cut,
            gate: None,
        }
    }

    fn gated(inner: Arc<MemoryStore>, prefix: &[u8], lock: Arc<tokio::sync::RwLock<()>>) -> Self {
        Interposed {
            inner,
            cut: Arc::default(),
            gate: Some(Gate {
                prefix: prefix.to_vec(),
                lock,
                waiting: Default::default(),
            }),
        }
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.cut.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("partitioned".into()))
        } else {
            Ok(())
        }
    }

    /// Transactions waiting at the gate now.
    fn waiting(&self) -> usize {
        self.gate
            .as_ref()
            .map_or(0, |g| g.waiting.load(Ordering::SeqCst))
    }
}

#[async_trait]
impl Store for Interposed {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        self.check()?;
        self.inner.get(key).await
    }
    async fn range(&self, s: &[u8], e: &[u8], l: usize) -> Result<RangeResult, StoreError> {
        self.check()?;
        self.inner.range(s, e, l).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.check()?;
        let gate = self.gate.as_ref().filter(|g| {
            txn.success.iter().any(|op| match op {
                allot_store::Op::Put { key, .. } | allot_store::Op::Delete { key } => {
                    key.starts_with(&g.prefix)
                }
                _ => false,
            })
        });
        let Some(gate) = gate else {
            return self.inner.txn(txn).await;
        };
        gate.waiting.fetch_add(1, Ordering::SeqCst);
        let open = gate.lock.read().await;
        gate.waiting.fetch_sub(1, Ordering::SeqCst);
        let result = self.inner.txn(txn).await;
        drop(open);
        result
    }
    async fn current_revision(&self) -> Result<Revision, StoreError> {
        self.check()?;
        self.inner.current_revision().await
    }
    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.check()?;
        self.inner.lease_grant(ttl).await
    }
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.check()?;
        self.inner.lease_keep_alive(lease).await
    }
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.check()?;
        self.inner.lease_revoke(lease).await
    }
    async fn watch_prefixes(
        &self,
        prefixes: &Prefixes,
        from: Revision,
    ) -> Result<WatchStream, StoreError> {
        self.check()?;
        self.inner.watch_prefixes(prefixes, from).await
    }
    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.check()?;
        self.inner.compact(revision).await
    }
    fn keeps_write_order(&self) -> bool {
        self.inner.keeps_write_order()
    }
}

/// A member cut off from the store stops allocating (on its own clock)
/// before the store lets anyone take its blocks; healed, it never allocates
/// from blocks it lost.
#[tokio::test(start_paused = true)]
async fn a_partitioned_member_fences_itself_before_takeover() {
    let store = Arc::new(MemoryStore::new());
    let cut = Arc::new(AtomicBool::new(false));
    let allot = engine(store.clone());
    allot
        .create_pool("ngap", spec(511, 64, Durability::Block), Default::default())
        .await
        .unwrap();
    let in_use = Arc::new(InUse::default());
    let cut_off = engine(Arc::new(Interposed::partition(store.clone(), cut.clone())));
    let opts = |addr: &str| MemberOptions {
        scan: Some(in_use.scan()),
        ..options(addr)
    };
    let p = cut_off.join("amf-p", opts("p")).await.unwrap();
    let q = engine(store.clone())
        .join("amf-q", opts("q"))
        .await
        .unwrap();
    for _ in 0..10 {
        in_use.record(&p.allocate("ngap").await.unwrap().value, "amf-p");
        in_use.record(&q.allocate("ngap").await.unwrap().value, "amf-q");
    }
    let p_blocks: Vec<u64> = p.owned_blocks("ngap").into_iter().map(|(b, _)| b).collect();
    let map = allot.owner_map().await.unwrap();

    cut.store(true, Ordering::SeqCst);
    let cut_at = Instant::now();
    // p goes on allocating from its blocks, in memory, until its own
    // deadline, then refuses. (Slowly enough not to need another block,
    // which would take the store.)
    let fenced_at = loop {
        match p.allocate("ngap").await {
            Ok(v) => in_use.record(&v.value, "amf-p"),
            Err(Error::Fenced(_)) => break Instant::now(),
            Err(e) => panic!("{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // q takes p's blocks only once the store expired p's lease.
    let taken_at = loop {
        if p_blocks.iter().all(|b| {
            map.block_owner("ngap", *b)
                .is_some_and(|o| o.member == "amf-q")
        }) {
            break Instant::now();
        }
        assert!(Instant::now() - cut_at < TTL * 3, "no takeover");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        fenced_at < taken_at,
        "p stopped {:?} after the cut, its blocks were taken {:?} after",
        fenced_at - cut_at,
        taken_at - cut_at
    );
    assert!(fenced_at - cut_at <= TTL, "p stopped within its TTL");

    // Healed: p learns its lease is gone and never allocates again.
    cut.store(false, Ordering::SeqCst);
    tokio::time::sleep(TTL).await;
    assert!(matches!(p.allocate("ngap").await, Err(Error::Fenced(_))));
    assert!(!p.is_live());
    // q goes on, never handing out a value p gave out before the cut.
    for _ in 0..100 {
        in_use.record(&q.allocate("ngap").await.unwrap().value, "amf-q");
    }
}

#[tokio::test(start_paused = true)]
async fn owner_lookup_and_empty_blocks_go_back() {
    let store = Arc::new(MemoryStore::new());
    let allot = engine(store.clone());
    allot
        .create_pool(
            "tmsi",
            spec(1023, 256, Durability::Sync),
            Default::default(),
        )
        .await
        .unwrap();
    let opts = MemberOptions {
        return_after: Duration::from_millis(500),
        ..options("10.1.1.1:38412")
    };
    let m = engine(store.clone()).join("amf-7", opts).await.unwrap();
    // Fill the first block and start a second.
    let mut values = Vec::new();
    for _ in 0..260 {
        values.push(m.allocate("tmsi").await.unwrap());
    }
    // An observer that never allocates (demux mode).
    let observer = engine(store.clone()).owner_map().await.unwrap();
    let first = &values[0];
    let owner = observer.owner("tmsi", &first.value).unwrap().unwrap();
    assert_eq!(owner.member, "amf-7");
    assert_eq!(owner.address.as_deref(), Some("10.1.1.1:38412"));
    assert_eq!(owner.epoch, first.epoch);
    assert_eq!(owner.block, first.block);
    let owned: BTreeSet<u64> = m.owned_blocks("tmsi").into_iter().map(|(b, _)| b).collect();
    let unowned = (0..4).find(|b| !owned.contains(b)).unwrap();
    let inside = (unowned * 256 + 7).to_string();
    assert!(
        observer.owner("tmsi", &inside).unwrap().is_none(),
        "nobody owns block {unowned}"
    );
    assert!(observer.owner("tmsi", "1024").is_err(), "outside the pool");
    assert!(observer.owner("nope", "1").is_err());

    // Release the first block's values: it goes back after the grace
    // period (the current block stays).
    for v in values.iter().filter(|v| v.block == first.block) {
        m.release("tmsi", &v.value).await.unwrap();
    }
    eventually("the empty block went back", Duration::from_secs(5), || {
        observer.block_owner("tmsi", first.block).is_none()
    })
    .await;
    assert!(m
        .owned_blocks("tmsi")
        .iter()
        .all(|(b, _)| *b != first.block));
    // Taken again later, its epoch keeps growing.
    let other = engine(store.clone())
        .join("amf-8", options("b"))
        .await
        .unwrap();
    let mut seen_epoch = None;
    for _ in 0..600 {
        match other.allocate("tmsi").await {
            Ok(v) if v.block == first.block => {
                seen_epoch = Some(v.epoch);
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(seen_epoch.unwrap() > first.epoch);
}

/// A pod restarted elsewhere under the same name while the old process
/// still runs: the join revokes the old lease, the old process fences
/// itself, and only then are its blocks taken over.
#[tokio::test(start_paused = true)]
async fn a_zombie_incarnation_stops_before_its_blocks_are_taken() {
    let store = Arc::new(MemoryStore::new());
    let allot = engine(store.clone());
    allot
        .create_pool(
            "ngap",
            spec(1023, 64, Durability::Block),
            Default::default(),
        )
        .await
        .unwrap();
    let in_use = Arc::new(InUse::default());
    let opts = || MemberOptions {
        scan: Some(in_use.scan()),
        ..options("x")
    };
    let old = engine(store.clone()).join("amf-z", opts()).await.unwrap();
    for _ in 0..10 {
        in_use.record(&old.allocate("ngap").await.unwrap().value, "old");
    }
    let old_blocks: Vec<u64> = old
        .owned_blocks("ngap")
        .into_iter()
        .map(|(b, _)| b)
        .collect();
    let new = engine(store.clone()).join("amf-z", opts()).await.unwrap();
    assert_eq!(new.incarnation(), 2);
    let v = new.allocate("ngap").await.unwrap();
    in_use.record(&v.value, "new");
    let map = allot.owner_map().await.unwrap();
    let start = Instant::now();
    let mut fenced_at = None;
    loop {
        if fenced_at.is_none() {
            match old.allocate("ngap").await {
                Ok(v) => in_use.record(&v.value, "old"),
                Err(Error::Fenced(_)) => fenced_at = Some(Instant::now()),
                Err(e) => panic!("{e}"),
            }
        }
        let taken = old_blocks.iter().all(|b| {
            map.block_owner("ngap", *b)
                .is_some_and(|o| o.incarnation == 2 || o.member != "amf-z")
        });
        if taken {
            // The old process must have been fenced before its blocks went.
            assert!(
                fenced_at.is_some(),
                "blocks taken while the old process still allocated"
            );
            break;
        }
        assert!(start.elapsed() < TTL * 4, "old blocks never taken");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A remote member's session writes each pool's blocks in order, but one
/// pool's slow block take (a prefetch: several store rounds) does not hold
/// up the `sync` commits of another pool.
#[tokio::test(start_paused = true)]
async fn a_session_commit_does_not_wait_for_a_block_taken_in_another_pool() {
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    // Held back: writes of pool "slow"'s block owner records (keys::owner).
    let store = Arc::new(Interposed::gated(
        Arc::new(MemoryStore::new()),
        b"o/slow/",
        gate.clone(),
    ));
    let allot = engine(store.clone());
    for pool in ["slow", "fast"] {
        allot
            .create_pool(pool, spec(4095, 64, Durability::Sync), Default::default())
            .await
            .unwrap();
    }
    let session = Arc::new(
        allot
            .open_session("amf-r", options("r"), false)
            .await
            .unwrap(),
    );
    session.open_pool("slow").await.unwrap();
    session.open_pool("fast").await.unwrap();
    let fast = session.acquire("fast").await.unwrap();

    let closed = gate.clone().write_owned().await;
    let taking = tokio::spawn({
        let session = session.clone();
        async move { session.acquire("slow").await }
    });
    eventually(
        "the block take waits at the gate",
        Duration::from_secs(1),
        || store.waiting() == 1,
    )
    .await;

    let offset = fast.block * 64 + 5;
    let change = BlockChange {
        block: fast.block,
        allocated: vec![offset],
        released: vec![],
    };
    let committed = tokio::time::timeout(Duration::from_secs(1), session.commit("fast", &[change]))
        .await
        .expect("the commit in pool fast waited for the block take in pool slow");
    assert_eq!(committed.unwrap(), CommitOutcome::Stored);
    assert!(!taking.is_finished(), "the gate let the block take through");

    drop(closed);
    let slow = taking.await.unwrap().unwrap();
    assert_eq!(slow.pool, "slow");
    // The commit is stored: the value is in use in the stored block.
    let stored = store
        .get(&allot::keys::block("fast", fast.block))
        .await
        .unwrap()
        .expect("the block of pool fast is stored");
    let block = allot_core::Block::decode(&stored.value).unwrap();
    assert!(
        block.bits.contains(5),
        "offset {offset} not stored as in use"
    );
}
