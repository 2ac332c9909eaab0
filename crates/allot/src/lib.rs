//! allot engine: pools, claims and mark-and-sweep, written once over the
//! [`allot_store::Store`] trait so it runs unchanged on every backend.
//!
//! Invariants kept here:
//! - uniqueness: allocation state lives in block bitmaps (allot-core); every
//!   write of a block is guarded by a compare on the revision this process
//!   last saw, so two writers can never both hand out a value;
//! - durability: a request is answered only after the transaction holding
//!   its effects committed (in `sync` mode the store fsyncs first);
//! - idempotence: a key maps to one value, read and written in the same
//!   guarded transaction as the bitmap;
//! - bad input changes nothing: requests are validated before anything is
//!   written, and a refused request contributes no operation to its batch.
//!
//! Concurrent requests on one pool share a transaction (group commit): each
//! request joins the pool's queue, and whoever holds the pool's lock drains
//! the queue and commits everything in it at once.
//!
//! ```
//! use allot::{Allot, AllocRequest, PoolSpec, PoolKind};
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let allot = Allot::new(std::sync::Arc::new(allot_store::MemoryStore::new()));
//! allot.create_pool("vlans", PoolSpec::new(PoolKind::Range { lo: 100, hi: 4094 }), Default::default()).await.unwrap();
//! let first = allot.allocate("vlans", AllocRequest::key("site-a")).await.unwrap();
//! let again = allot.allocate("vlans", AllocRequest::key("site-a")).await.unwrap();
//! assert_eq!(first[0].value, "100");
//! assert_eq!(again, first);
//! # });
//! ```

mod batch;
mod clock;
mod error;
mod events;
mod follow;
pub mod keys;
mod member_blocks;
mod member_session;
mod members;
mod model;
mod owners;
mod turns;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use allot_core::{
    parse_cidr, Batch, CommitLog, CoreError, Durability, OwnedBlock, OwnedBlocks, PoolKind,
    PoolSpec, PoolStats, Strategy, ValueSpace, ALLOCATOR_BATCH, DEFAULT_BLOCK_SIZE,
};
use allot_core::{Block, PoolState, Run};

use allot_store::{Compare, KeyValue, Op, OpResult, Revision, Store, Txn};
pub use clock::{Clock, ManualClock, SystemClock, TokioClock};
pub use error::{http_status, Error, Result};
pub use events::{is_compacted, Change, Event, EventClaim};
pub use member_blocks::{OwnedOffset, OwnedValue, PoolAllocator};
pub use member_session::{BlockChange, CommitOutcome, Grant, MemberSession, SessionNews};
pub use members::{
    BlockOwner, BlockScan, Fence, Member, MemberInfo, MemberOptions, MemberRecord, ScanFn,
    DEFAULT_MEMBER_TTL,
};
pub use model::*;
pub use owners::{OwnerInfo, OwnerMap};

use batch::{Outcome, PendingOp, PoolHandle};

/// The engine. Cheap to clone; all clones share state.
#[derive(Clone)]
pub struct Allot {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: Arc<dyn Clock>,
    pools: std::sync::Mutex<HashMap<String, Arc<PoolHandle>>>,
    seed: AtomicU64,
    /// The lease idempotency records are attached to, and when it was granted.
    idempotency_lease: tokio::sync::Mutex<Option<(allot_store::LeaseId, tokio::time::Instant)>>,
    /// Dropped with the engine, which ends the follower task (see
    /// [`Allot::follow_other_writers`]).
    follower_stop: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    /// Members and block owners, started on first use.
    owner_map: tokio::sync::Mutex<Option<OwnerMap>>,
    /// This engine among those sharing the store (names its turn requests).
    engine_id: u64,
}

pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these short locks cannot leave the map
    // half-updated (single insert/remove), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn decode_json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(format!("{what}: {e}")))
}

pub(crate) fn encode_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Serializing plain structs of strings, numbers and JSON values cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// An open resync pass: its owner filter and the revision it began at.
#[derive(Debug, Clone)]
pub(crate) struct OpenResync {
    owner: Option<String>,
    revision: Revision,
}

impl OpenResync {
    /// Whether a keyed claim last written at `rev` by `owner` is stale under this pass.
    fn marks(&self, owner: Option<&str>, rev: Revision) -> bool {
        rev < self.revision && (self.owner.is_none() || self.owner.as_deref() == owner)
    }
}

pub(crate) fn is_stale(resyncs: &[OpenResync], rec: &ClaimRecord, rev: Revision) -> bool {
    rec.key.is_some() && resyncs.iter().any(|r| r.marks(rec.owner.as_deref(), rev))
}

impl Allot {
    /// An engine over `store` with the system clock.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_clock(store, Arc::new(SystemClock))
    }

    /// An engine with an injected clock (quarantine timing in tests).
    ///
    /// On a store other processes write too ([`Store::is_shared`]:
    /// PostgreSQL, etcd), an engine made inside a tokio runtime follows their
    /// writes by itself ([`Allot::follow_other_writers`]).
    pub fn with_clock(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        let follow = store.is_shared() && tokio::runtime::Handle::try_current().is_ok();
        let allot = Self::unfollowed(store, clock);
        if follow {
            allot.follow_other_writers();
        }
        allot
    }

    fn unfollowed(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        let seed = clock.now_ms() ^ 0x9E37_79B9_7F4A_7C15;
        Allot {
            inner: Arc::new(Inner {
                store,
                clock,
                pools: std::sync::Mutex::new(HashMap::new()),
                seed: AtomicU64::new(seed),
                idempotency_lease: tokio::sync::Mutex::new(None),
                follower_stop: std::sync::Mutex::new(None),
                owner_map: tokio::sync::Mutex::new(None),
                engine_id: rand::random(),
            }),
        }
    }

    /// Waits for in-flight batches to finish, then drops the engine (and the
    /// store, if nothing else holds it). Dropping an `Allot` is also safe —
    /// no acknowledged work is lost — but only `close` guarantees the store
    /// (and, for redb, its file lock) is released when it returns.
    pub async fn close(self) {
        let mut inner = self.inner;
        for _ in 0..10_000 {
            match Arc::try_unwrap(inner) {
                Ok(inner) => {
                    drop(inner);
                    return;
                }
                Err(still_shared) => {
                    inner = still_shared;
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
        }
        tracing::warn!("engine still shared after 10 s; dropping this handle only");
    }

    /// The store this engine writes to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// Creates a pool. Fails with [`Error::PoolExists`] if the name is taken.
    pub async fn create_pool(
        &self,
        name: &str,
        spec: PoolSpec,
        labels: BTreeMap<String, String>,
    ) -> Result<PoolInfo> {
        self.create_pool_in(name, spec, labels, None).await
    }

    /// Creates a pool, optionally nested in a claimed value of another pool
    /// (an address pool inside a /24 claimed from a prefix pool, say). The
    /// parent value cannot be released while the nested pool exists; inside
    /// a prefix, the nested pool's CIDR must lie within it.
    pub async fn create_pool_in(
        &self,
        name: &str,
        spec: PoolSpec,
        labels: BTreeMap<String, String>,
        parent: Option<ParentRef>,
    ) -> Result<PoolInfo> {
        validate_pool_name(name)?;
        spec.validate().map_err(|e| Error::from_core(name, e))?;
        for (k, v) in &labels {
            check_text("label name", k, MAX_NAME_LEN)?;
            check_text("label value", v, MAX_OWNER_LEN)?;
        }
        let mut record = PoolRecord {
            name: name.to_string(),
            spec,
            labels,
            created_ms: self.inner.clock.now_ms(),
            parent: None,
        };
        let key = keys::pool(name);
        let description = allot_core::ValueSpace::new(record.spec.kind.clone())
            .map(|s| s.describe())
            .unwrap_or_default();
        let change = Change::PoolCreated {
            pool: name.to_string(),
            description,
        };
        for _ in 0..8 {
            let mut txn = Txn::new().when(Compare::absent(&key));
            if let Some(p) = &parent {
                let (guards, canonical) =
                    self.inner.nest_guards(name, &record.spec.kind, p).await?;
                record.parent = Some(ParentRef {
                    pool: p.pool.clone(),
                    value: canonical,
                });
                for (c, op) in guards {
                    txn = txn.when(c);
                    if let Some(op) = op {
                        txn = txn.then(op);
                    }
                }
            }
            let txn = txn
                .then(Op::put(&key, encode_json(&record)))
                .then(Op::put(keys::event(name), encode_json(&change)))
                .otherwise(Op::get(&key));
            let resp = self.inner.store.txn(txn).await?;
            if resp.succeeded {
                return self.pool(name).await;
            }
            if matches!(resp.results.first(), Some(OpResult::Get(Some(_)))) {
                return Err(Error::PoolExists(name.to_string()));
            }
            // The parent changed under us: check it again.
        }
        if parent.is_none() {
            return Err(Error::PoolExists(name.to_string()));
        }
        Err(Error::Contention(name.to_string()))
    }

    /// Every pool carrying all of `labels` (all pools if empty), by name.
    pub async fn list_pools_labeled(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<PoolInfo>> {
        let all = self.list_pools().await?;
        Ok(all
            .into_iter()
            .filter(|p| {
                labels
                    .iter()
                    .all(|(k, v)| p.record.labels.get(k) == Some(v))
            })
            .collect())
    }

    /// A pool with its counters.
    pub async fn pool(&self, name: &str) -> Result<PoolInfo> {
        let handle = self.inner.handle(name).await?;
        let state = handle
            .caught_up_state(self.inner.store.as_ref(), name)
            .await?;
        Ok(info(&handle.record, &state.core))
    }

    /// Every pool, by name.
    pub async fn list_pools(&self) -> Result<Vec<PoolInfo>> {
        let end = allot_store::prefix_end(keys::POOLS_PREFIX);
        let res = self.inner.store.range(keys::POOLS_PREFIX, &end, 0).await?;
        let mut out = Vec::with_capacity(res.kvs.len());
        for kv in res.kvs {
            let record: PoolRecord = decode_json("pool record", &kv.value)?;
            match self.pool(&record.name).await {
                Ok(i) => out.push(i),
                // Deleted between the range and the load.
                Err(Error::PoolNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// How many blocks of a member-blocks pool members own now.
    async fn owned_blocks(&self, name: &str) -> Result<u64> {
        let prefix = keys::owners_prefix(name);
        let end = allot_store::prefix_end(&prefix);
        let mut n = 0;
        for kv in self.inner.store.range(&prefix, &end, 0).await?.kvs {
            let owner: BlockOwner = decode_json("block owner", &kv.value)?;
            n += u64::from(owner.member.is_some());
        }
        Ok(n)
    }

    /// Deletes a pool and everything in it. Refused while values are
    /// claimed unless `force`.
    pub async fn delete_pool(&self, name: &str, force: bool) -> Result<()> {
        let handle = self.inner.handle(name).await?;
        let state = handle.state.lock().await;
        let claims = state.core.stats().allocated;
        let nkey = keys::children(name);
        let nested = self.inner.store.get(&nkey).await?;
        if let Some(kv) = &nested {
            let map: Children = decode_json("children index", &kv.value)?;
            let names: Vec<String> = map.values().flatten().cloned().collect();
            if !names.is_empty() {
                return Err(Error::Conflict(format!(
                    "pool '{name}' holds nested pool(s) {}; delete them first",
                    names.join(", ")
                )));
            }
        }
        let owned_blocks = if handle.record.spec.member_blocks.is_some() {
            self.owned_blocks(name).await?
        } else {
            0
        };
        if owned_blocks > 0 && !force {
            return Err(Error::Conflict(format!(
                "pool '{name}' has {owned_blocks} block(s) owned by members; \
                 delete it with force to take them away"
            )));
        }
        if claims > 0 && !force {
            return Err(Error::PoolNotEmpty {
                pool: name.to_string(),
                claims,
            });
        }
        let mut txn = Txn::new()
            .when(Compare::mod_revision(keys::pool(name), handle.record_rev))
            .then(Op::delete(keys::pool(name)))
            .when(Compare::mod_revision(
                &nkey,
                nested.as_ref().map_or(0, |kv| kv.mod_revision),
            ))
            .then(Op::delete(&nkey))
            .then(Op::delete(keys::cursor(name)))
            .then(Op::delete(keys::turn(name)))
            .then(Op::put(
                keys::event(name),
                encode_json(&Change::PoolDeleted {
                    pool: name.to_string(),
                }),
            ));
        for prefix in [
            keys::blocks_prefix(name),
            keys::values_prefix(name),
            keys::keys_prefix(name),
            keys::resyncs_prefix(name),
            keys::idempotency_prefix(name),
            keys::owners_prefix(name),
        ] {
            txn = txn.then(Op::delete_prefix(prefix));
        }
        if let Some(p) = &handle.record.parent {
            // Free the parent value for release again.
            let pkey = keys::children(&p.pool);
            if let Some(kv) = self.inner.store.get(&pkey).await? {
                let mut map: Children = decode_json("children index", &kv.value)?;
                for set in map.values_mut() {
                    set.remove(name);
                }
                map.retain(|_, set| !set.is_empty());
                txn = txn.when(Compare::mod_revision(&pkey, kv.mod_revision));
                txn = txn.then(if map.is_empty() {
                    Op::delete(&pkey)
                } else {
                    Op::put(&pkey, encode_json(&map))
                });
            }
        }
        let resp = self.inner.store.txn(txn).await;
        self.inner.forget(name, &handle);
        if !resp?.succeeded {
            return Err(Error::Contention(name.to_string()));
        }
        Ok(())
    }

    /// Allocates: one value, `count` values all or nothing, a requested
    /// value, or the value bound to a key (idempotent).
    pub async fn allocate(&self, pool: &str, req: AllocRequest) -> Result<Vec<Claim>> {
        req.validate()?;
        match self.inner.submit(pool, PendingOp::Alloc(req)).await? {
            Outcome::Claims(c) => Ok(c),
            other => Err(Error::Corrupt(format!("unexpected outcome {other:?}"))),
        }
    }

    /// Releases a claim by value or key and returns what was released.
    pub async fn release(&self, pool: &str, target: Target) -> Result<Claim> {
        self.release_once(pool, target, None).await
    }

    /// [`Allot::release`] with an idempotency key: a repeat with the same
    /// `request_id` returns the first answer instead of "not claimed".
    pub async fn release_once(
        &self,
        pool: &str,
        target: Target,
        request_id: Option<String>,
    ) -> Result<Claim> {
        if let Target::Key(k) = &target {
            check_text("key", k, MAX_KEY_LEN)?;
        }
        if let Some(id) = &request_id {
            check_text("request id", id, MAX_OWNER_LEN)?;
        }
        match self
            .inner
            .submit(pool, PendingOp::Release { target, request_id })
            .await?
        {
            Outcome::Released(c) => Ok(c),
            other => Err(Error::Corrupt(format!("unexpected outcome {other:?}"))),
        }
    }

    /// Looks a claim up by value or key.
    pub async fn lookup(&self, pool: &str, target: Target) -> Result<Claim> {
        let handle = self.inner.handle(pool).await?;
        let store = &self.inner.store;
        let resyncs = self.inner.open_resyncs(pool).await?;
        let (run, rec) = match &target {
            Target::Key(k) => {
                check_text("key", k, MAX_KEY_LEN)?;
                let kv = store.get(&keys::key(pool, k)).await?.ok_or_else(|| {
                    Error::NotFound(format!("key '{k}' is not claimed in pool '{pool}'"))
                })?;
                let kr: KeyRecord = decode_json("key record", &kv.value)?;
                let rec = store.get(&keys::value(pool, kr.offset)).await?;
                (
                    Run {
                        offset: kr.offset,
                        units: kr.units,
                    },
                    rec,
                )
            }
            Target::Value(v) => {
                let run = handle
                    .space()
                    .parse(v)
                    .map_err(|e| Error::from_core(pool, e))?;
                (run, store.get(&keys::value(pool, run.offset)).await?)
            }
        };
        let text = handle.space().format(run);
        if let Some(kv) = rec {
            let rec: ClaimRecord = decode_json("claim record", &kv.value)?;
            if rec.units == run.units {
                return Ok(claim_from(
                    text,
                    &rec,
                    is_stale(&resyncs, &rec, kv.mod_revision),
                ));
            }
        } else if !handle.space().is_prefix() {
            // A bare allocation is just its bit: read the block as stored.
            let idx = run.offset / handle.record.spec.block_size;
            if let Some(kv) = store.get(&keys::block(pool, idx)).await? {
                let block = Block::decode(&kv.value).map_err(|e| Error::from_core(pool, e))?;
                let local = (run.offset % handle.record.spec.block_size) as u32;
                if block.bits.contains(local) && !block.quarantine.contains_key(&local) {
                    return Ok(Claim {
                        value: text,
                        key: None,
                        owner: None,
                        meta: None,
                        stale: false,
                    });
                }
            }
        }
        Err(Error::NotFound(format!(
            "value {text} is not claimed in pool '{pool}'"
        )))
    }

    /// Claims in value order, `limit` at a time, starting after `after`.
    pub async fn list_claims(
        &self,
        pool: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ClaimPage> {
        let limit = limit.clamp(1, 10_000);
        let handle = self.inner.handle(pool).await?;
        let start = match after {
            Some(v) => {
                let run = handle
                    .space()
                    .parse(v)
                    .map_err(|e| Error::from_core(pool, e))?;
                match run.offset.checked_add(run.units) {
                    Some(s) => s,
                    None => {
                        return Ok(ClaimPage {
                            claims: Vec::new(),
                            next: None,
                        })
                    }
                }
            }
            None => 0,
        };
        let resyncs = self.inner.open_resyncs(pool).await?;
        let store = &self.inner.store;
        let vend = allot_store::prefix_end(&keys::values_prefix(pool));
        let mut claims = Vec::new();
        let more;
        if handle.space().is_prefix() {
            // Prefix pools keep a record for every claim.
            let res = store.range(&keys::value(pool, start), &vend, limit).await?;
            more = res.more;
            for kv in res.kvs {
                let offset = keys::value_offset(&kv.key)
                    .ok_or_else(|| Error::Corrupt("claim key".into()))?;
                let rec: ClaimRecord = decode_json("claim record", &kv.value)?;
                let text = handle.space().format(Run {
                    offset,
                    units: rec.units,
                });
                claims.push(claim_from(
                    text,
                    &rec,
                    is_stale(&resyncs, &rec, kv.mod_revision),
                ));
            }
        } else {
            let offsets = self
                .inner
                .allocated_offsets(pool, handle.record.spec.block_size, start, limit + 1)
                .await?;
            more = offsets.len() > limit;
            let offsets = &offsets[..offsets.len().min(limit)];
            let records: HashMap<u64, KeyValue> = match (offsets.first(), offsets.last()) {
                (Some(&first), Some(&last)) => {
                    let end = last
                        .checked_add(1)
                        .map_or(vend.clone(), |e| keys::value(pool, e));
                    let res = store.range(&keys::value(pool, first), &end, 0).await?;
                    res.kvs
                        .into_iter()
                        .filter_map(|kv| keys::value_offset(&kv.key).map(|o| (o, kv)))
                        .collect()
                }
                _ => HashMap::new(),
            };
            for &o in offsets {
                let text = handle.space().format(Run::single(o));
                match records.get(&o) {
                    Some(kv) => {
                        let rec: ClaimRecord = decode_json("claim record", &kv.value)?;
                        claims.push(claim_from(
                            text,
                            &rec,
                            is_stale(&resyncs, &rec, kv.mod_revision),
                        ));
                    }
                    None => claims.push(Claim {
                        value: text,
                        key: None,
                        owner: None,
                        meta: None,
                        stale: false,
                    }),
                }
            }
        }
        let next = if more {
            claims.last().map(|c| c.value.clone())
        } else {
            None
        };
        Ok(ClaimPage { claims, next })
    }

    /// Opens a mark-and-sweep pass: every keyed claim (of `owner`, or all)
    /// is stale until it is claimed again.
    pub async fn resync_begin(&self, pool: &str, owner: Option<&str>) -> Result<ResyncReport> {
        if let Some(o) = owner {
            check_text("owner", o, MAX_OWNER_LEN)?;
        }
        let handle = self.inner.handle(pool).await?;
        let rec = ResyncRecord {
            owner: owner.map(str::to_string),
            started_ms: self.inner.clock.now_ms(),
        };
        let resp = self
            .inner
            .store
            .txn(
                Txn::new()
                    .when(Compare::mod_revision(keys::pool(pool), handle.record_rev))
                    .then(Op::put(keys::resync(pool, owner), encode_json(&rec)))
                    .then(Op::put(
                        keys::event(pool),
                        encode_json(&Change::ResyncBegun {
                            pool: pool.to_string(),
                            owner: rec.owner.clone(),
                        }),
                    )),
            )
            .await?;
        if !resp.succeeded {
            return Err(Error::PoolNotFound(pool.to_string()));
        }
        let pass = OpenResync {
            owner: rec.owner.clone(),
            revision: resp.revision,
        };
        let marked = self
            .inner
            .scan_records(pool, |r, rev| is_stale(std::slice::from_ref(&pass), r, rev))
            .await?;
        Ok(ResyncReport {
            pool: pool.to_string(),
            owner: rec.owner,
            count: marked.len() as u64,
            released: Vec::new(),
        })
    }

    /// Closes a pass: releases every claim it marked that was not claimed
    /// again, and reports them.
    pub async fn resync_end(&self, pool: &str, owner: Option<&str>) -> Result<ResyncReport> {
        let handle = self.inner.handle(pool).await?;
        let rkey = keys::resync(pool, owner);
        let Some(kv) = self.inner.store.get(&rkey).await? else {
            let who = owner.map_or(String::new(), |o| format!(" for owner '{o}'"));
            return Err(Error::NotFound(format!(
                "no resync in progress on pool '{pool}'{who}; run resync begin first"
            )));
        };
        let pass = OpenResync {
            owner: owner.map(str::to_string),
            revision: kv.mod_revision,
        };
        let stale = self
            .inner
            .scan_records(pool, |r, rev| is_stale(std::slice::from_ref(&pass), r, rev))
            .await?;
        let mut released = Vec::new();
        for chunk in stale.chunks(1024) {
            let waits: Vec<_> = chunk
                .iter()
                .map(|&(offset, rev)| {
                    self.inner
                        .submit(pool, PendingOp::ReleaseStale { offset, rev })
                })
                .collect();
            for r in futures::future::join_all(waits).await {
                if let Outcome::Released(c) = r? {
                    released.push(c);
                }
            }
        }
        // Closing the pass only if nobody re-opened it meanwhile.
        self.inner
            .store
            .txn(
                Txn::new()
                    .when(Compare::mod_revision(&rkey, kv.mod_revision))
                    .then(Op::delete(&rkey))
                    .then(Op::put(
                        keys::event(pool),
                        encode_json(&Change::ResyncEnded {
                            pool: pool.to_string(),
                            owner: owner.map(str::to_string),
                            released: released.len() as u64,
                        }),
                    )),
            )
            .await?;
        drop(handle);
        Ok(ResyncReport {
            pool: pool.to_string(),
            owner: owner.map(str::to_string),
            count: released.len() as u64,
            released,
        })
    }
}

fn info(record: &PoolRecord, core: &PoolState) -> PoolInfo {
    let stats = core.stats();
    PoolInfo {
        record: record.clone(),
        description: core.space().describe(),
        utilization: stats.utilization(),
        stats,
    }
}

/// Nested pools by the offset of the claimed value holding them.
pub(crate) type Children = BTreeMap<u64, std::collections::BTreeSet<String>>;

pub(crate) fn claim_from(value: String, rec: &ClaimRecord, stale: bool) -> Claim {
    Claim {
        value,
        key: rec.key.clone(),
        owner: rec.owner.clone(),
        meta: rec.meta.clone(),
        stale,
    }
}

impl Inner {
    fn next_seed(&self) -> u64 {
        self.seed
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
    }

    /// The loaded pool, loading it from the store on first use.
    pub(crate) async fn handle(&self, name: &str) -> Result<Arc<PoolHandle>> {
        if let Some(h) = lock(&self.pools).get(name) {
            return Ok(h.clone());
        }
        validate_pool_name(name)?;
        // Boxed: the load is rare and its future large; inline, it made every
        // request's future (and each move of it through the HTTP stack)
        // ~1.9 KB bigger.
        let load = Box::pin(PoolHandle::load(
            self.store.as_ref(),
            name,
            self.next_seed(),
        ));
        let handle = Arc::new(load.await?);
        let mut pools = lock(&self.pools);
        Ok(pools.entry(name.to_string()).or_insert(handle).clone())
    }

    /// Drops a cached pool so the next request reloads it (only if `handle`
    /// is still the cached one: a newer load must not be thrown away).
    pub(crate) fn forget(&self, name: &str, handle: &PoolHandle) {
        let mut pools = lock(&self.pools);
        if pools
            .get(name)
            .is_some_and(|h| std::ptr::eq(Arc::as_ptr(h), handle))
        {
            pools.remove(name);
        }
    }

    /// Checks that `p` names a claimed value a pool of `kind` may nest in,
    /// and returns the compares (and the children-index update) that keep
    /// it so until the nested pool's creation commits, with the value in
    /// canonical form.
    pub(crate) async fn nest_guards(
        &self,
        child: &str,
        kind: &PoolKind,
        p: &ParentRef,
    ) -> Result<(Vec<(Compare, Option<Op>)>, String)> {
        validate_pool_name(&p.pool)?;
        if p.pool == child {
            return Err(Error::InvalidInput(
                "a pool cannot be nested in itself".into(),
            ));
        }
        let ph = self.handle(&p.pool).await?;
        let run = ph
            .space()
            .parse(&p.value)
            .map_err(|e| Error::from_core(&p.pool, e))?;
        let canonical = ph.space().format(run);
        let not_claimed = || {
            Error::InvalidInput(format!(
                "value {canonical} is not claimed in pool '{}'; claim it before nesting a pool in it",
                p.pool
            ))
        };
        let mut guards = vec![(
            Compare::mod_revision(keys::pool(&p.pool), ph.record_rev),
            None,
        )];
        let vkey = keys::value(&p.pool, run.offset);
        match self.store.get(&vkey).await? {
            Some(kv) => {
                let rec: ClaimRecord = decode_json("claim record", &kv.value)?;
                if rec.units != run.units {
                    return Err(not_claimed());
                }
                guards.push((Compare::mod_revision(&vkey, kv.mod_revision), None));
            }
            None if ph.space().is_prefix() => return Err(not_claimed()),
            None => {
                let bs = ph.record.spec.block_size;
                let bkey = keys::block(&p.pool, run.offset / bs);
                let kv = self.store.get(&bkey).await?.ok_or_else(not_claimed)?;
                let block = Block::decode(&kv.value).map_err(|e| Error::from_core(&p.pool, e))?;
                let local = (run.offset % bs) as u32;
                if !block.bits.contains(local) || block.quarantine.contains_key(&local) {
                    return Err(not_claimed());
                }
                guards.push((Compare::mod_revision(&bkey, kv.mod_revision), None));
            }
        }
        if ph.space().is_prefix() {
            let outer: ipnet::IpNet = canonical
                .parse()
                .map_err(|_| Error::Corrupt(format!("prefix {canonical}")))?;
            let inner = match kind {
                PoolKind::Addresses { cidr, .. } | PoolKind::Prefixes { cidr, .. } => cidr,
                _ => {
                    return Err(Error::InvalidInput(
                        "a pool nested in a prefix must be an address or prefix pool within it"
                            .into(),
                    ))
                }
            };
            if !(outer.contains(&inner.network()) && inner.prefix_len() >= outer.prefix_len()) {
                return Err(Error::InvalidInput(format!(
                    "{inner} does not lie within {outer}"
                )));
            }
        }
        let nkey = keys::children(&p.pool);
        let (mut map, rev) = match self.store.get(&nkey).await? {
            Some(kv) => (
                decode_json::<Children>("children index", &kv.value)?,
                kv.mod_revision,
            ),
            None => (Children::new(), 0),
        };
        map.entry(run.offset).or_default().insert(child.to_string());
        guards.push((
            Compare::mod_revision(&nkey, rev),
            Some(Op::put(&nkey, encode_json(&map))),
        ));
        Ok((guards, canonical))
    }

    pub(crate) async fn open_resyncs(&self, pool: &str) -> Result<Vec<OpenResync>> {
        let prefix = keys::resyncs_prefix(pool);
        let res = self
            .store
            .range(&prefix, &allot_store::prefix_end(&prefix), 0)
            .await?;
        res.kvs
            .into_iter()
            .map(|kv| {
                let r: ResyncRecord = decode_json("resync record", &kv.value)?;
                Ok(OpenResync {
                    owner: r.owner,
                    revision: kv.mod_revision,
                })
            })
            .collect()
    }

    /// Allocated (not quarantined) offsets from `start` on, at most `limit`,
    /// read from the stored blocks: another process may have changed them
    /// since this one cached the pool, so listings never trust the cache.
    async fn allocated_offsets(
        &self,
        pool: &str,
        block_size: u64,
        start: u64,
        limit: usize,
    ) -> Result<Vec<u64>> {
        let end = allot_store::prefix_end(&keys::blocks_prefix(pool));
        let mut from = keys::block(pool, start / block_size);
        let mut out = Vec::new();
        loop {
            let res = self.store.range(&from, &end, 16).await?;
            for kv in &res.kvs {
                let idx =
                    keys::block_index(&kv.key).ok_or_else(|| Error::Corrupt("block key".into()))?;
                let block = Block::decode(&kv.value).map_err(|e| Error::from_core(pool, e))?;
                let base = idx.saturating_mul(block_size);
                let first = start.saturating_sub(base).min(block_size) as u32;
                for local in block.bits.range(first..) {
                    if !block.quarantine.contains_key(&local) {
                        out.push(base + local as u64);
                        if out.len() >= limit {
                            return Ok(out);
                        }
                    }
                }
            }
            match (res.more, res.kvs.last()) {
                (true, Some(last)) => {
                    from = last.key.clone();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    /// Offsets and revisions of claim records matching `pred`, in pages.
    async fn scan_records(
        &self,
        pool: &str,
        pred: impl Fn(&ClaimRecord, Revision) -> bool,
    ) -> Result<Vec<(u64, Revision)>> {
        let prefix = keys::values_prefix(pool);
        let end = allot_store::prefix_end(&prefix);
        let mut start = prefix.clone();
        let mut out = Vec::new();
        loop {
            let res = self.store.range(&start, &end, 4096).await?;
            for kv in &res.kvs {
                let rec: ClaimRecord = decode_json("claim record", &kv.value)?;
                if pred(&rec, kv.mod_revision) {
                    let offset = keys::value_offset(&kv.key)
                        .ok_or_else(|| Error::Corrupt("claim key".into()))?;
                    out.push((offset, kv.mod_revision));
                }
            }
            match (res.more, res.kvs.last()) {
                (true, Some(last)) => {
                    start = last.key.clone();
                    start.push(0);
                }
                _ => return Ok(out),
            }
        }
    }
}
