//! Allocation from blocks a member owns (pools with `member_blocks`).
//!
//! A member takes whole blocks of a pool (compare-and-swap on the block's
//! owner record `o/{pool}/{block}`, bumping its epoch) and hands values out
//! of them in its own memory ([`allot_core::OwnedBlock`]): no store round
//! trip per value in `block` durability; in `sync` durability the block's
//! bitmap is written before the value is returned, concurrent allocations
//! sharing one commit. It takes the next block before its current ones run
//! dry, gives empty blocks back after a grace period, and takes over
//! orphans: blocks whose owner's lease expired. Every write compares the
//! member's record and the block's owner record, so a member that lost
//! either can never write again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use allot_core::{Batch, Block, CommitLog, Durability, OwnedBlock, OwnedBlocks};
use allot_store::{Compare, Op, OpResult, Revision, Txn};

use crate::error::{Error, Result};
use crate::members::{BlockOwner, Member, MemberInner};
use crate::owners::{free_blocks, read_owners, PoolMeta};
use crate::{encode_json, keys, lock};

/// A value handed out by a member, with its fencing token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedValue {
    pub value: String,
    /// The block it came from.
    pub block: u64,
    /// The block's epoch while this member owns it.
    pub epoch: u64,
}

/// Blocks whose free values fall below this fraction of a block trigger
/// taking the next one in the background.
const LOW_WATER_DIVISOR: u64 = 4;
/// How many free blocks an acquisition tries before giving up for now.
const ACQUIRE_CANDIDATES: usize = 8;

/// A member's blocks of one pool; each carries the revision of the owner
/// record we wrote (our writes compare it).
type OwnedSet = OwnedBlocks<Revision, Instant>;

#[derive(Default)]
struct Owned {
    set: OwnedSet,
    /// Blocks changed since the last commit (sync durability).
    dirty: BTreeSet<u64>,
    /// Allocations and releases so far; a commit covers all up to its own.
    seq: u64,
    /// Orphans taken over that cannot be used yet (the scan failed).
    unscanned: BTreeMap<u64, Taken>,
}

impl Owned {
    fn free(&self) -> u64 {
        self.set.free()
    }

    /// Whether fewer than `low_water` values are free.
    fn is_low(&self, low_water: u64) -> bool {
        self.set.free() < low_water
    }

    fn remove_block(&mut self, idx: u64) {
        self.set.remove(idx);
        self.unscanned.remove(&idx);
        self.dirty.remove(&idx);
    }
}

/// One pool as one member uses it.
pub(crate) struct MemberPool {
    name: String,
    meta: PoolMeta,
    durability: Durability,
    owned: std::sync::Mutex<Owned>,
    acquiring: tokio::sync::Mutex<()>,
    commits: tokio::sync::Mutex<CommitLog>,
    /// The pool was deleted or redefined: nothing more comes from it.
    closed: AtomicBool,
}

impl MemberPool {
    fn low_water(&self) -> u64 {
        (self.meta.spec.block_size / LOW_WATER_DIVISOR).max(1)
    }

    /// Takes back a value allocated but never handed out.
    fn undo(&self, block: u64, offset: u64) {
        let mut owned = lock(&self.owned);
        if owned.set.release(block, offset, Instant::now()).is_ok()
            && self.durability == Durability::Sync
        {
            owned.dirty.insert(block);
            owned.seq += 1;
        }
    }
}

/// A value taken on the fast path: its offset in the pool (format it with
/// [`PoolAllocator::format`]), block and fencing token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnedOffset {
    pub offset: u64,
    pub block: u64,
    pub epoch: u64,
}

/// A member's handle on one `block`-durability pool for the hot path:
/// [`PoolAllocator::try_allocate`] takes a value from the owned blocks
/// without awaiting anything. Use one per thread: each takes values from
/// the shared blocks [`allot_core::ALLOCATOR_BATCH`] at a time under the member's lock
/// and hands them out from its own batch, so threads do not contend per
/// value (the fence is still checked on every value). Values left in the
/// batch go back when the allocator is dropped. When the owned blocks run
/// dry it returns `None`; the async [`Member::allocate`] then takes the next
/// block (normally taken in the background before that happens).
pub struct PoolAllocator {
    member: Member,
    pool: Arc<MemberPool>,
    batch: Batch,
}

impl Clone for PoolAllocator {
    /// Another allocator on the same pool, with an empty batch of its own.
    fn clone(&self) -> Self {
        PoolAllocator {
            member: self.member.clone(),
            pool: self.pool.clone(),
            batch: Batch::default(),
        }
    }
}

impl Drop for PoolAllocator {
    fn drop(&mut self) {
        if !self.batch.is_empty() {
            let mut owned = lock(&self.pool.owned);
            self.batch.give_back(&mut owned.set, Instant::now());
        }
    }
}

impl PoolAllocator {
    /// The next value from an owned block, if one is free now.
    #[inline]
    pub fn try_allocate(&mut self) -> Result<Option<OwnedOffset>> {
        self.member.inner.fence.check()?;
        let mp = &self.pool;
        if mp.closed.load(Ordering::Acquire) {
            return Err(Error::PoolNotFound(mp.name.clone()));
        }
        if self.batch.is_empty() {
            let low = {
                let mut owned = lock(&mp.owned);
                self.batch.refill(&mut owned.set);
                owned.is_low(mp.low_water())
            };
            if low {
                self.member.prefetch(mp);
            }
        }
        Ok(self.batch.pop().map(|(offset, block, epoch)| OwnedOffset {
            offset,
            block,
            epoch,
        }))
    }

    /// The value at `offset`, as the pool writes it.
    pub fn format(&self, offset: u64) -> String {
        self.pool.meta.space.format_offset(offset)
    }
}

impl Member {
    /// The hot-path handle on `pool`, which must have `block` durability
    /// (in `sync` every value waits for a commit: use
    /// [`Member::allocate`]).
    pub async fn allocator(&self, pool: &str) -> Result<PoolAllocator> {
        let mp = self.pool(pool).await?;
        if mp.durability != Durability::Block {
            return Err(Error::InvalidInput(format!(
                "pool '{pool}' stores every allocation (sync durability): use Member::allocate"
            )));
        }
        Ok(PoolAllocator {
            member: self.clone(),
            pool: mp,
            batch: Batch::default(),
        })
    }

    /// Allocates one value of `pool` from a block this member owns, taking a
    /// block first if it owns none with a free value. In `block` durability
    /// nothing is written per value; in `sync` the block's bitmap is
    /// committed (shared with concurrent allocations) before returning.
    pub async fn allocate(&self, pool: &str) -> Result<OwnedValue> {
        self.inner.fence.check()?;
        let mp = self.pool(pool).await?;
        loop {
            if mp.closed.load(Ordering::Acquire) {
                return Err(Error::PoolNotFound(pool.to_string()));
            }
            let (taken, low, seq) = {
                let mut owned = lock(&mp.owned);
                let taken = owned.set.allocate();
                if let Some((_, idx, _)) = taken {
                    if mp.durability == Durability::Sync {
                        owned.dirty.insert(idx);
                        owned.seq += 1;
                    }
                }
                (taken, owned.is_low(mp.low_water()), owned.seq)
            };
            if low {
                self.prefetch(&mp);
            }
            if let Some((offset, block, epoch)) = taken {
                // A lease that ran out while we waited for the lock, or a
                // commit that failed: the value was handed to nobody, so it
                // goes back (in sync durability the next commit stores that,
                // whatever became of this one).
                let checked = match self.inner.fence.check() {
                    Ok(()) if mp.durability == Durability::Sync => {
                        commit(&self.inner, &mp, seq).await
                    }
                    other => other,
                };
                if let Err(e) = checked {
                    mp.undo(block, offset);
                    return Err(e);
                }
                return Ok(OwnedValue {
                    value: mp.meta.space.format_offset(offset),
                    block,
                    epoch,
                });
            }
            acquire(&self.inner, &mp).await?;
        }
    }

    /// Releases `value` of `pool`, which must come from a block this member
    /// owns.
    pub async fn release(&self, pool: &str, value: &str) -> Result<()> {
        self.inner.fence.check()?;
        let mp = self.pool(pool).await?;
        let run = mp
            .meta
            .space
            .parse(value)
            .map_err(|e| Error::from_core(pool, e))?;
        let idx = run.offset / mp.meta.spec.block_size;
        let seq = {
            let mut owned = lock(&mp.owned);
            if !owned.set.contains(idx) {
                return Err(Error::Conflict(format!(
                    "value {value} of pool '{pool}' is in block {idx}, which member '{}' does not own",
                    self.name()
                )));
            }
            owned
                .set
                .release(idx, run.offset, Instant::now())
                .map_err(|e| Error::from_core(pool, e))?;
            if mp.durability == Durability::Sync {
                owned.dirty.insert(idx);
                owned.seq += 1;
            }
            owned.seq
        };
        if mp.durability == Durability::Sync {
            commit(&self.inner, &mp, seq).await?;
        }
        Ok(())
    }

    /// The blocks of `pool` this member owns now, with their epochs.
    pub fn owned_blocks(&self, pool: &str) -> Vec<(u64, u64)> {
        let Some(mp) = self.pools().get(pool).cloned() else {
            return Vec::new();
        };
        let owned = lock(&mp.owned);
        owned.set.iter().map(|(i, h)| (i, h.epoch)).collect()
    }

    /// The member's state of `pool`, loaded on first use.
    async fn pool(&self, pool: &str) -> Result<Arc<MemberPool>> {
        if let Some(mp) = self.pools().get(pool) {
            return Ok(mp.clone());
        }
        let meta = member_pool_meta(&self.inner, pool).await?;
        let durability = meta.spec.member_blocks.unwrap_or_default();
        let mp = Arc::new(MemberPool {
            name: pool.to_string(),
            meta,
            durability,
            owned: std::sync::Mutex::new(Owned::default()),
            acquiring: tokio::sync::Mutex::new(()),
            commits: tokio::sync::Mutex::new(CommitLog::default()),
            closed: AtomicBool::new(false),
        });
        Ok(self.pools().entry(pool.to_string()).or_insert(mp).clone())
    }

    /// Takes the next block in the background, so no request waits for it.
    fn prefetch(&self, mp: &Arc<MemberPool>) {
        if mp.acquiring.try_lock().is_err() {
            return; // one is on its way
        }
        let (inner, mp) = (self.inner.clone(), mp.clone());
        self.inner.runtime.spawn(async move {
            if let Err(e) = acquire(&inner, &mp).await {
                tracing::debug!(pool = %mp.name, "taking the next block: {e}");
            }
        });
    }
}

/// The definition of member-blocks pool `pool`, from the owner map (which
/// may be a moment behind a pool just created).
pub(crate) async fn member_pool_meta(inner: &MemberInner, pool: &str) -> Result<PoolMeta> {
    if let Some(meta) = inner.owners.pool_meta(pool) {
        return Ok(meta);
    }
    // Not in the map: unknown, or not a member-blocks pool.
    let info = inner.allot.pool(pool).await?;
    if info.record.spec.member_blocks.is_none() {
        return Err(Error::InvalidInput(format!(
            "pool '{pool}' is not a member-blocks pool: allocate from it directly, \
             or create it with member blocks"
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(meta) = inner.owners.pool_meta(pool) {
            return Ok(meta);
        }
        if Instant::now() > deadline {
            return Err(Error::Store(allot_store::StoreError::Unavailable(
                "the owner map does not know the pool yet".into(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Takes one free block of the pool (unless another task just did and
/// values are free again).
async fn acquire(inner: &Arc<MemberInner>, mp: &Arc<MemberPool>) -> Result<()> {
    let _one = mp.acquiring.lock().await;
    if lock(&mp.owned).free() >= mp.low_water() {
        return Ok(());
    }
    let taken = match take_free_block(inner, &mp.name, &mp.meta).await {
        Ok(taken) => taken,
        // Another block still has values: not exhausted yet.
        Err(Error::Exhausted { .. }) if lock(&mp.owned).free() > 0 => return Ok(()),
        Err(e) => return Err(e),
    };
    // A free block was given back empty, or its bitmap is stored (sync).
    let block = match &taken.stored {
        Some(b) if mp.durability == Durability::Sync => mp.meta.owned_block_from(taken.idx, b),
        _ => mp.meta.empty_block(taken.idx),
    }
    .map_err(|e| Error::from_core(&mp.name, e))?;
    adopt(mp, &taken, block);
    Ok(())
}

fn adopt(mp: &MemberPool, taken: &Taken, block: OwnedBlock) {
    let mut owned = lock(&mp.owned);
    owned.unscanned.remove(&taken.idx);
    owned.set.insert(
        taken.idx,
        block,
        taken.epoch,
        taken.owner_rev,
        Instant::now(),
    );
}

/// A block a member just became the owner of.
#[derive(Debug, Clone)]
pub(crate) struct Taken {
    pub(crate) idx: u64,
    /// The block's new epoch (ours).
    pub(crate) epoch: u64,
    /// Revision of the owner record we wrote: later writes compare it.
    pub(crate) owner_rev: Revision,
    /// The block's stored bitmap, if any.
    pub(crate) stored: Option<Block>,
}

/// Takes one free block of `pool`: candidates from the owner map first,
/// then (the map may be behind) from the store, in random order so members
/// do not all race for the lowest block.
pub(crate) async fn take_free_block(
    inner: &Arc<MemberInner>,
    pool: &str,
    meta: &PoolMeta,
) -> Result<Taken> {
    for attempt in 0..5u32 {
        inner.fence.check()?;
        let mut candidates = if attempt == 0 {
            inner.owners.free_blocks(pool, ACQUIRE_CANDIDATES)
        } else {
            Vec::new()
        };
        if candidates.is_empty() {
            let owners = read_owners(inner.allot.inner.store.as_ref(), pool).await?;
            candidates = free_blocks(meta, &owners, ACQUIRE_CANDIDATES);
        }
        if candidates.is_empty() {
            return Err(Error::Exhausted {
                pool: pool.to_string(),
                requested: 1,
                available: 0,
            });
        }
        candidates.shuffle(&mut rand::rng());
        for (idx, rev, epoch) in candidates {
            if let Some(taken) = claim_block(inner, pool, meta, idx, rev, epoch, None).await? {
                return Ok(taken);
            }
        }
        let pause = rand::random_range(0..=(2u64 << attempt));
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    Err(Error::Contention(pool.to_string()))
}

/// Tries to become the owner of block `idx`, whose owner record is at
/// `rev` (0: none) with `epoch`. For an orphan, `orphan` is the compare
/// proving its owner gone (in the store, not only in our map). Returns the
/// block with its stored bitmap if we got it.
pub(crate) async fn claim_block(
    inner: &Arc<MemberInner>,
    pool: &str,
    meta: &PoolMeta,
    idx: u64,
    rev: Revision,
    epoch: u64,
    orphan: Option<Compare>,
) -> Result<Option<Taken>> {
    let okey = keys::owner(pool, idx);
    let record = BlockOwner {
        member: Some(inner.name().to_string()),
        incarnation: inner.record.incarnation,
        epoch: epoch + 1,
        since_ms: inner.now_ms(),
    };
    let mut txn = Txn::new()
        .when(inner.guard())
        .when(Compare::mod_revision(keys::pool(pool), meta.record_rev))
        .when(Compare::mod_revision(&okey, rev));
    if let Some(gone) = orphan {
        txn = txn.when(gone);
    }
    let txn = txn
        .then(Op::put(&okey, encode_json(&record)))
        .then(Op::get(keys::block(pool, idx)));
    let resp = inner.allot.inner.store.txn(txn).await?;
    if !resp.succeeded {
        return Ok(None);
    }
    let stored = match resp.results.get(1) {
        Some(OpResult::Get(Some(kv))) => {
            Some(Block::decode(&kv.value).map_err(|e| Error::from_core(pool, e))?)
        }
        _ => None,
    };
    Ok(Some(Taken {
        idx,
        epoch: epoch + 1,
        owner_rev: resp.revision,
        stored,
    }))
}

/// Stores the bitmaps of blocks we own (`None`: empty, deleted), each
/// write guarded by our membership and the block's owner record. Whether
/// the guards held.
pub(crate) async fn write_blocks(
    inner: &MemberInner,
    pool: &str,
    writes: &[(u64, Option<Vec<u8>>, Revision)],
) -> Result<bool> {
    let mut txn = Txn::new().when(inner.guard());
    for (idx, bytes, owner_rev) in writes {
        txn = txn.when(Compare::mod_revision(keys::owner(pool, *idx), *owner_rev));
        let bkey = keys::block(pool, *idx);
        txn = txn.then(match bytes {
            Some(b) => Op::put(bkey, b),
            None => Op::delete(bkey),
        });
    }
    Ok(inner.allot.inner.store.txn(txn).await?.succeeded)
}

/// Gives block `idx` back: its owner record says "free", its epoch kept
/// (epochs of a block only ever grow), its bitmap gone. Whether it was
/// still ours.
pub(crate) async fn free_block(
    inner: &MemberInner,
    pool: &str,
    idx: u64,
    epoch: u64,
    owner_rev: Revision,
) -> Result<bool> {
    let okey = keys::owner(pool, idx);
    let record = BlockOwner {
        member: None,
        incarnation: 0,
        epoch,
        since_ms: inner.now_ms(),
    };
    let resp = inner
        .allot
        .inner
        .store
        .txn(
            Txn::new()
                .when(inner.guard())
                .when(Compare::mod_revision(&okey, owner_rev))
                .then(Op::put(&okey, encode_json(&record)))
                .then(Op::delete(keys::block(pool, idx))),
        )
        .await?;
    Ok(resp.succeeded)
}

/// Which of `ours` (block, owner record revision) are no longer ours.
pub(crate) async fn lost_blocks(
    inner: &MemberInner,
    pool: &str,
    ours: Vec<(u64, Revision)>,
) -> Result<Vec<u64>> {
    let mut lost = Vec::new();
    for (idx, rev) in ours {
        let kv = inner.allot.inner.store.get(&keys::owner(pool, idx)).await?;
        if kv.is_none_or(|kv| kv.mod_revision != rev) {
            lost.push(idx);
        }
    }
    Ok(lost)
}

/// The orphans of `pool` this member may take now, each with the compare
/// proving its owner gone.
pub(crate) fn takeable_orphans(
    inner: &MemberInner,
    pool: &str,
) -> Vec<(u64, Revision, u64, Compare, String)> {
    let mut orphans = inner.owners.orphans(pool);
    orphans.shuffle(&mut rand::rng());
    let now = Instant::now();
    orphans
        .into_iter()
        .filter(|o| o.not_before.is_none_or(|t| t <= now))
        .map(|o| {
            let gone = Compare::mod_revision(keys::member(&o.member), o.member_rev);
            (o.block, o.rev, o.owner.epoch, gone, o.member)
        })
        .collect()
}

/// Asks the application which values of a `block`-durability block taken
/// over are in use.
fn scan_block(inner: &MemberInner, mp: &MemberPool, idx: u64, epoch: u64) -> Result<OwnedBlock> {
    let scan = inner
        .options
        .scan
        .as_ref()
        .ok_or_else(|| Error::InvalidInput("no scan callback".into()))?;
    let request = mp
        .meta
        .scan_request(&mp.name, idx, epoch)
        .map_err(|e| Error::from_core(&mp.name, e))?;
    let in_use = scan(&request).map_err(|e| Error::InvalidInput(format!("scan callback: {e}")))?;
    mp.meta.owned_block_in_use(&mp.name, idx, &in_use)
}

/// Commits every change of the pool's blocks up to `seq` (or finds that a
/// commit running meanwhile did), sharing one transaction between all the
/// allocations and releases waiting.
async fn commit(inner: &Arc<MemberInner>, mp: &Arc<MemberPool>, seq: u64) -> Result<()> {
    let mut commits = mp.commits.lock().await;
    match commits.outcome(seq) {
        Some(true) => return Ok(()),
        Some(false) => return Err(lost_write(&mp.name)),
        None => {}
    }
    let (upto, writes) = {
        let mut owned = lock(&mp.owned);
        let dirty = std::mem::take(&mut owned.dirty);
        let writes: Vec<(u64, Option<Vec<u8>>, Revision)> = dirty
            .into_iter()
            .filter_map(|idx| {
                owned.set.get(idx).map(|h| {
                    let block = h.block.to_block();
                    let bytes = (!block.bits.is_empty()).then(|| block.encode());
                    (idx, bytes, h.extra)
                })
            })
            .collect();
        (owned.seq, writes)
    };
    let outcome = write_blocks(inner, &mp.name, &writes).await;
    commits.record(upto, matches!(outcome, Ok(true)));
    match outcome {
        Ok(true) => Ok(()),
        other => {
            // The blocks written are dirty again: whatever became of this
            // commit, the next one stores their state as it is then.
            {
                let mut owned = lock(&mp.owned);
                for (idx, _, _) in &writes {
                    if owned.set.contains(*idx) {
                        owned.dirty.insert(*idx);
                    }
                }
            }
            drop(commits);
            match other {
                Ok(_) => {
                    // Our membership or a block is gone: find out which.
                    inner.check_membership().await?;
                    drop_lost_blocks(inner, mp).await?;
                    Err(lost_write(&mp.name))
                }
                Err(e) => Err(e),
            }
        }
    }
}

fn lost_write(pool: &str) -> Error {
    Error::Fenced(format!(
        "pool '{pool}': a block of this member was taken over; the value was not allocated"
    ))
}

/// Forgets the blocks whose owner record is no longer ours.
async fn drop_lost_blocks(inner: &Arc<MemberInner>, mp: &Arc<MemberPool>) -> Result<()> {
    let ours: Vec<(u64, Revision)> = {
        let owned = lock(&mp.owned);
        let held = owned.set.iter().map(|(i, h)| (i, h.extra));
        held.chain(owned.unscanned.values().map(|t| (t.idx, t.owner_rev)))
            .collect()
    };
    for idx in lost_blocks(inner, &mp.name, ours).await? {
        tracing::warn!(pool = %mp.name, block = idx, "block taken over by another member");
        lock(&mp.owned).remove_block(idx);
    }
    Ok(())
}

/// Gives an empty block back.
async fn give_back(inner: &Arc<MemberInner>, mp: &Arc<MemberPool>, idx: u64) -> Result<bool> {
    // Held under the commit lock so no commit of this block races it.
    let _commits = mp.commits.lock().await;
    let (epoch, owner_rev) = {
        let mut owned = lock(&mp.owned);
        let Some(h) = owned.set.get(idx) else {
            return Ok(false);
        };
        if h.block.allocated() != 0 {
            return Ok(false);
        }
        let taken = (h.epoch, h.extra);
        // Nothing can be allocated from it while it goes back.
        owned.remove_block(idx);
        taken
    };
    free_block(inner, &mp.name, idx, epoch, owner_rev).await
}

/// The member's housekeeping, woken by changes to members and owners (and
/// at least every second): take over orphans of the pools it uses, give
/// back blocks empty for long enough, and stop using pools that are gone.
pub(crate) async fn maintain(
    weak: Weak<MemberInner>,
    stopped: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stopped);
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let owners = inner.owners.clone();
        // Taken before the work, so a change during it wakes the next round.
        let seen = owners.version();
        if inner.fence.check().is_ok() {
            let pools: Vec<Arc<MemberPool>> = lock(&inner.pools).values().cloned().collect();
            for mp in pools {
                if let Err(e) = tend(&inner, &mp).await {
                    tracing::debug!(pool = %mp.name, "member housekeeping: {e}");
                }
            }
        }
        drop(inner);
        tokio::select! {
            () = &mut stopped => return,
            () = owners.changed_since(seen, Duration::from_secs(1)) => {}
        }
    }
}

async fn tend(inner: &Arc<MemberInner>, mp: &Arc<MemberPool>) -> Result<()> {
    match inner.owners.pool_meta(&mp.name) {
        Some(meta) if meta.record_rev == mp.meta.record_rev => {}
        _ => {
            // Deleted or redefined: whatever we held is gone with it.
            mp.closed.store(true, Ordering::Release);
            lock(&inner.pools).remove(&mp.name);
            return Ok(());
        }
    }
    // Blocks taken over whose scan failed: owned (nobody else hands their
    // values out) but unused until the application can answer.
    let unscanned: Vec<Taken> = lock(&mp.owned).unscanned.values().cloned().collect();
    for taken in unscanned {
        inner.fence.check()?;
        adopt_orphan(inner, mp, taken);
    }
    let can_scan = mp.durability == Durability::Sync || inner.options.scan.is_some();
    if can_scan {
        for (idx, rev, epoch, gone, from) in takeable_orphans(inner, &mp.name) {
            inner.fence.check()?;
            if let Some(taken) =
                claim_block(inner, &mp.name, &mp.meta, idx, rev, epoch, Some(gone)).await?
            {
                tracing::info!(pool = %mp.name, block = idx, %from, "took over an orphan block");
                adopt_orphan(inner, mp, taken);
            }
        }
    }
    let before = Instant::now().checked_sub(inner.options.return_after);
    let idle = match before {
        Some(before) => lock(&mp.owned).set.idle_since(before),
        None => Vec::new(),
    };
    for idx in idle {
        give_back(inner, mp, idx).await?;
    }
    Ok(())
}

/// Starts using an orphan just taken: in `sync` its stored bitmap is the
/// truth; in `block` the application's scan says what is in use. A block
/// that cannot be read stays owned but unused (so nobody hands its values
/// out) and is tried again on the next round.
fn adopt_orphan(inner: &MemberInner, mp: &MemberPool, taken: Taken) {
    let block = match mp.durability {
        Durability::Sync => match &taken.stored {
            Some(b) => mp.meta.owned_block_from(taken.idx, b),
            None => mp.meta.empty_block(taken.idx),
        }
        .map_err(|e| Error::from_core(&mp.name, e)),
        Durability::Block => scan_block(inner, mp, taken.idx, taken.epoch),
    };
    match block {
        Ok(block) => adopt(mp, &taken, block),
        Err(e) => {
            tracing::error!(pool = %mp.name, block = taken.idx, "cannot use the block taken over yet: {e}");
            lock(&mp.owned).unscanned.insert(taken.idx, taken);
        }
    }
}
