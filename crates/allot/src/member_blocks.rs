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

use allot_core::{Block, Durability, OwnedBlock};
use allot_store::{Compare, Op, OpResult, Revision, Txn};

use crate::error::{Error, Result};
use crate::members::{BlockOwner, BlockScan, Member, MemberInner};
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

struct Held {
    block: OwnedBlock,
    epoch: u64,
    /// mod_revision of the owner record we wrote: our writes compare it.
    owner_rev: Revision,
    /// When the block last became empty (for giving it back).
    empty_since: Option<Instant>,
}

#[derive(Default)]
struct Owned {
    blocks: BTreeMap<u64, Held>,
    /// The block allocation tries first.
    current: Option<u64>,
    /// Blocks with a free value, and how many values are free in all:
    /// kept as blocks change so the hot path never walks every block (a
    /// member fills blocks and keeps the full ones).
    with_free: BTreeSet<u64>,
    free: u64,
    /// Blocks changed since the last commit (sync durability).
    dirty: BTreeSet<u64>,
    /// Allocations and releases so far; a commit covers all up to its own.
    seq: u64,
}

impl Owned {
    fn free(&self) -> u64 {
        self.free
    }

    /// Whether fewer than `low_water` values are free.
    fn is_low(&self, low_water: u64) -> bool {
        self.free < low_water
    }

    fn insert_block(&mut self, idx: u64, held: Held) {
        let free = held.block.free();
        if let Some(old) = self.blocks.insert(idx, held) {
            self.free -= old.block.free();
        }
        self.free += free;
        if free > 0 {
            self.with_free.insert(idx);
        } else {
            self.with_free.remove(&idx);
        }
    }

    fn remove_block(&mut self, idx: u64) -> Option<Held> {
        let held = self.blocks.remove(&idx)?;
        self.free -= held.block.free();
        self.with_free.remove(&idx);
        self.dirty.remove(&idx);
        if self.current == Some(idx) {
            self.current = None;
        }
        Some(held)
    }

    /// Frees `offset` of block `idx`; whether the block is now empty.
    fn release(
        &mut self,
        idx: u64,
        offset: u64,
    ) -> std::result::Result<bool, allot_core::CoreError> {
        let Some(held) = self.blocks.get_mut(&idx) else {
            return Err(allot_core::CoreError::NotAllocated(format!(
                "offset {offset}"
            )));
        };
        held.block.release(offset)?;
        let empty = held.block.allocated() == 0;
        if empty {
            held.empty_since = Some(Instant::now());
        }
        self.free += 1;
        self.with_free.insert(idx);
        Ok(empty)
    }

    /// Next free value: the current block first, then any other with one.
    #[inline]
    fn allocate(&mut self) -> Option<(u64, u64, u64)> {
        let idx = match self.current {
            Some(idx) if self.with_free.contains(&idx) => idx,
            _ => {
                let idx = *self.with_free.first()?;
                self.current = Some(idx);
                idx
            }
        };
        let held = self.blocks.get_mut(&idx)?;
        let off = held.block.allocate()?;
        held.empty_since = None;
        self.free -= 1;
        if held.block.free() == 0 {
            self.with_free.remove(&idx);
        }
        Some((off, idx, held.epoch))
    }
}

/// Outcome of the commits of a pool: `committed` covers every change up to
/// that sequence number; failures are remembered by the range they covered.
#[derive(Default)]
struct Commits {
    committed: u64,
    failed: BTreeMap<u64, u64>,
}

/// One pool as one member uses it.
pub(crate) struct MemberPool {
    name: String,
    meta: PoolMeta,
    durability: Durability,
    owned: std::sync::Mutex<Owned>,
    acquiring: tokio::sync::Mutex<()>,
    commits: tokio::sync::Mutex<Commits>,
    /// The pool was deleted or redefined: nothing more comes from it.
    closed: AtomicBool,
}

impl MemberPool {
    fn low_water(&self) -> u64 {
        (self.meta.spec.block_size / LOW_WATER_DIVISOR).max(1)
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
/// without awaiting anything (a clock read, an uncontended lock and a bit
/// scan). When the owned blocks run dry it returns `None`; the async
/// [`Member::allocate`] then takes the next block (normally taken in the
/// background before that happens).
#[derive(Clone)]
pub struct PoolAllocator {
    member: Member,
    pool: Arc<MemberPool>,
}

impl PoolAllocator {
    /// The next value from an owned block, if one is free now.
    #[inline]
    pub fn try_allocate(&self) -> Result<Option<OwnedOffset>> {
        self.member.inner.fence.check()?;
        let mp = &self.pool;
        if mp.closed.load(Ordering::Acquire) {
            return Err(Error::PoolNotFound(mp.name.clone()));
        }
        let (taken, low) = {
            let mut owned = lock(&mp.owned);
            let taken = owned.allocate();
            (taken, owned.is_low(mp.low_water()))
        };
        if low {
            self.member.prefetch(mp);
        }
        Ok(taken.map(|(offset, block, epoch)| OwnedOffset {
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
                let taken = owned.allocate();
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
                // A lease that ran out while we waited for the lock.
                self.inner.fence.check()?;
                if mp.durability == Durability::Sync {
                    commit(&self.inner, &mp, seq).await?;
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
            if !owned.blocks.contains_key(&idx) {
                return Err(Error::Conflict(format!(
                    "value {value} of pool '{pool}' is in block {idx}, which member '{}' does not own",
                    self.name()
                )));
            }
            owned
                .release(idx, run.offset)
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
        owned.blocks.iter().map(|(&i, h)| (i, h.epoch)).collect()
    }

    /// The member's state of `pool`, loaded on first use.
    async fn pool(&self, pool: &str) -> Result<Arc<MemberPool>> {
        if let Some(mp) = self.pools().get(pool) {
            return Ok(mp.clone());
        }
        let meta = match self.inner.owners.pool_meta(pool) {
            Some(meta) => meta,
            None => {
                // Not in the map: unknown, or not a member-blocks pool.
                let info = self.inner.allot.pool(pool).await?;
                if info.record.spec.member_blocks.is_none() {
                    return Err(Error::InvalidInput(format!(
                        "pool '{pool}' is not a member-blocks pool: allocate from it directly, \
                         or create it with member blocks"
                    )));
                }
                // Created a moment ago: the map catches up shortly.
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    if let Some(meta) = self.inner.owners.pool_meta(pool) {
                        break meta;
                    }
                    if Instant::now() > deadline {
                        return Err(Error::Store(allot_store::StoreError::Unavailable(
                            "the owner map does not know the pool yet".into(),
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let durability = meta.spec.member_blocks.unwrap_or_default();
        let mp = Arc::new(MemberPool {
            name: pool.to_string(),
            meta,
            durability,
            owned: std::sync::Mutex::new(Owned::default()),
            acquiring: tokio::sync::Mutex::new(()),
            commits: tokio::sync::Mutex::new(Commits::default()),
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

/// Takes one free block of the pool (unless another task just did and
/// values are free again).
async fn acquire(inner: &Arc<MemberInner>, mp: &Arc<MemberPool>) -> Result<()> {
    let _one = mp.acquiring.lock().await;
    if lock(&mp.owned).free() >= mp.low_water() {
        return Ok(());
    }
    for attempt in 0..5u32 {
        inner.fence.check()?;
        // The owner map first; it may be behind, so after a miss (and
        // before calling the pool exhausted) ask the store itself.
        let mut candidates = if attempt == 0 {
            inner.owners.free_blocks(&mp.name, ACQUIRE_CANDIDATES)
        } else {
            Vec::new()
        };
        if candidates.is_empty() {
            let owners = read_owners(inner.allot.inner.store.as_ref(), &mp.name).await?;
            candidates = free_blocks(&mp.meta, &owners, ACQUIRE_CANDIDATES);
        }
        if candidates.is_empty() {
            if lock(&mp.owned).free() > 0 {
                return Ok(());
            }
            return Err(Error::Exhausted {
                pool: mp.name.clone(),
                requested: 1,
                available: 0,
            });
        }
        // Spread members over different blocks instead of all racing for
        // the lowest one.
        candidates.shuffle(&mut rand::rng());
        for (idx, rev, epoch) in candidates {
            if take(inner, mp, idx, rev, epoch, None).await? {
                return Ok(());
            }
        }
        let pause = rand::random_range(0..=(2u64 << attempt));
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    Err(Error::Contention(mp.name.clone()))
}

/// Tries to become the owner of block `idx`, whose owner record is at
/// `rev` (0: none) with `epoch`. For an orphan, `orphan` is the compare
/// proving its owner gone (in the store, not only in our map), and the
/// values in use come from the stored bitmap or the scan. Returns whether
/// we got it.
async fn take(
    inner: &Arc<MemberInner>,
    mp: &Arc<MemberPool>,
    idx: u64,
    rev: Revision,
    epoch: u64,
    orphan: Option<Compare>,
) -> Result<bool> {
    let store = &inner.allot.inner.store;
    let okey = keys::owner(&mp.name, idx);
    let bkey = keys::block(&mp.name, idx);
    let record = BlockOwner {
        member: Some(inner.name().to_string()),
        incarnation: inner.record.incarnation,
        epoch: epoch + 1,
        since_ms: inner.now_ms(),
    };
    let is_orphan = orphan.is_some();
    let mut txn = Txn::new()
        .when(inner.guard())
        .when(Compare::mod_revision(
            keys::pool(&mp.name),
            mp.meta.record_rev,
        ))
        .when(Compare::mod_revision(&okey, rev));
    if let Some(gone) = orphan {
        txn = txn.when(gone);
    }
    let txn = txn
        .then(Op::put(&okey, encode_json(&record)))
        .then(Op::get(&bkey));
    let resp = store.txn(txn).await?;
    if !resp.succeeded {
        return Ok(false);
    }
    let stored = match resp.results.get(1) {
        Some(OpResult::Get(Some(kv))) => {
            Some(Block::decode(&kv.value).map_err(|e| Error::from_core(&mp.name, e))?)
        }
        _ => None,
    };
    let (bs, size, reserved) = (
        mp.meta.spec.block_size,
        mp.meta.space.size(),
        &mp.meta.reserved,
    );
    let block = match (mp.durability, is_orphan) {
        // The stored bitmap is the truth.
        (Durability::Sync, _) => match &stored {
            Some(b) => OwnedBlock::from_block(idx, bs, size, reserved, b),
            None => OwnedBlock::new(idx, bs, size, reserved),
        }
        .map_err(|e| Error::from_core(&mp.name, e)),
        // A free block in `block` durability was given back empty.
        (Durability::Block, false) => {
            OwnedBlock::new(idx, bs, size, reserved).map_err(|e| Error::from_core(&mp.name, e))
        }
        (Durability::Block, true) => scan_block(inner, mp, idx, epoch + 1),
    };
    let block = match block {
        Ok(b) => b,
        Err(e) => {
            // We own it now but cannot tell what is in use: keep it unused
            // (owned, so nobody hands its values out) and say so.
            tracing::error!(pool = %mp.name, block = idx, "cannot use the block taken over: {e}");
            return Ok(true);
        }
    };
    let mut owned = lock(&mp.owned);
    let empty = block.allocated() == 0;
    owned.insert_block(
        idx,
        Held {
            block,
            epoch: epoch + 1,
            owner_rev: resp.revision,
            empty_since: empty.then(Instant::now),
        },
    );
    Ok(true)
}

/// Asks the application which values of a block taken over are in use.
fn scan_block(
    inner: &Arc<MemberInner>,
    mp: &Arc<MemberPool>,
    idx: u64,
    epoch: u64,
) -> Result<OwnedBlock> {
    let (bs, size, reserved) = (
        mp.meta.spec.block_size,
        mp.meta.space.size(),
        &mp.meta.reserved,
    );
    let empty =
        OwnedBlock::new(idx, bs, size, reserved).map_err(|e| Error::from_core(&mp.name, e))?;
    let (first, end) = empty.range();
    let scan = inner
        .options
        .scan
        .as_ref()
        .ok_or_else(|| Error::InvalidInput("no scan callback".into()))?;
    let request = BlockScan {
        pool: mp.name.clone(),
        block: idx,
        first: mp.meta.space.format_offset(first),
        last: mp.meta.space.format_offset(end - 1),
        epoch,
    };
    let in_use = scan(&request).map_err(|e| Error::InvalidInput(format!("scan callback: {e}")))?;
    let mut offsets = Vec::with_capacity(in_use.len());
    for v in &in_use {
        let run = mp
            .meta
            .space
            .parse(v)
            .map_err(|e| Error::from_core(&mp.name, e))?;
        offsets.push(run.offset);
    }
    OwnedBlock::with_in_use(idx, bs, size, reserved, offsets)
        .map_err(|e| Error::from_core(&mp.name, e))
}

/// Commits every change of the pool's blocks up to `seq` (or finds that a
/// commit running meanwhile did), sharing one transaction between all the
/// allocations and releases waiting.
async fn commit(inner: &Arc<MemberInner>, mp: &Arc<MemberPool>, seq: u64) -> Result<()> {
    let mut commits = mp.commits.lock().await;
    if let Some((_, &from)) = commits.failed.range(seq..).next() {
        if from <= seq {
            return Err(lost_write(&mp.name));
        }
    }
    if commits.committed >= seq {
        return Ok(());
    }
    let (upto, writes) = {
        let mut owned = lock(&mp.owned);
        let dirty = std::mem::take(&mut owned.dirty);
        let writes: Vec<(u64, Option<Vec<u8>>, Revision)> = dirty
            .into_iter()
            .filter_map(|idx| {
                owned.blocks.get(&idx).map(|h| {
                    let block = h.block.to_block();
                    let bytes = (!block.bits.is_empty()).then(|| block.encode());
                    (idx, bytes, h.owner_rev)
                })
            })
            .collect();
        (owned.seq, writes)
    };
    let mut txn = Txn::new().when(inner.guard());
    for (idx, bytes, owner_rev) in &writes {
        txn = txn.when(Compare::mod_revision(
            keys::owner(&mp.name, *idx),
            *owner_rev,
        ));
        let bkey = keys::block(&mp.name, *idx);
        txn = txn.then(match bytes {
            Some(b) => Op::put(bkey, b),
            None => Op::delete(bkey),
        });
    }
    let from = commits.committed + 1;
    let outcome = inner.allot.inner.store.txn(txn).await;
    match outcome {
        Ok(r) if r.succeeded => {
            commits.committed = upto;
            Ok(())
        }
        other => {
            commits.failed.insert(upto, from);
            commits.committed = upto;
            // Keep only recent failures: callers waiting are a moment old.
            while commits.failed.len() > 1024 {
                commits.failed.pop_first();
            }
            drop(commits);
            match other {
                Ok(_) => {
                    // Our membership or a block is gone: find out which.
                    inner.check_membership().await?;
                    drop_lost_blocks(inner, mp).await?;
                    Err(lost_write(&mp.name))
                }
                Err(e) => Err(Error::Store(e)),
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
    let ours: Vec<(u64, Revision)> = lock(&mp.owned)
        .blocks
        .iter()
        .map(|(&i, h)| (i, h.owner_rev))
        .collect();
    for (idx, rev) in ours {
        let kv = inner
            .allot
            .inner
            .store
            .get(&keys::owner(&mp.name, idx))
            .await?;
        if kv.is_none_or(|kv| kv.mod_revision != rev) {
            tracing::warn!(pool = %mp.name, block = idx, "block taken over by another member");
            lock(&mp.owned).remove_block(idx);
        }
    }
    Ok(())
}

/// Gives an empty block back: its owner record says "free", its epoch kept.
async fn give_back(inner: &Arc<MemberInner>, mp: &Arc<MemberPool>, idx: u64) -> Result<bool> {
    let (epoch, owner_rev) = {
        let owned = lock(&mp.owned);
        match owned.blocks.get(&idx) {
            Some(h) if h.block.allocated() == 0 => (h.epoch, h.owner_rev),
            _ => return Ok(false),
        }
    };
    let okey = keys::owner(&mp.name, idx);
    let record = BlockOwner {
        member: None,
        incarnation: 0,
        epoch,
        since_ms: inner.now_ms(),
    };
    // Held under the commit lock so no commit of this block races it.
    let _commits = mp.commits.lock().await;
    {
        let mut owned = lock(&mp.owned);
        match owned.blocks.get(&idx) {
            Some(h) if h.block.allocated() == 0 => {}
            _ => return Ok(false),
        }
        // Nothing can be allocated from it while it goes back.
        owned.remove_block(idx);
    }
    let resp = inner
        .allot
        .inner
        .store
        .txn(
            Txn::new()
                .when(inner.guard())
                .when(Compare::mod_revision(&okey, owner_rev))
                .then(Op::put(&okey, encode_json(&record)))
                .then(Op::delete(keys::block(&mp.name, idx))),
        )
        .await?;
    Ok(resp.succeeded)
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
    let can_scan = mp.durability == Durability::Sync || inner.options.scan.is_some();
    if can_scan {
        let mut orphans = inner.owners.orphans(&mp.name);
        orphans.shuffle(&mut rand::rng());
        let now = Instant::now();
        for orphan in orphans {
            if orphan.not_before.is_some_and(|t| t > now) {
                continue;
            }
            inner.fence.check()?;
            let gone = Compare::mod_revision(keys::member(&orphan.member), orphan.member_rev);
            let (idx, epoch) = (orphan.block, orphan.owner.epoch);
            if take(inner, mp, idx, orphan.rev, epoch, Some(gone)).await? {
                tracing::info!(
                    pool = %mp.name,
                    block = idx,
                    from = %orphan.member,
                    "took over an orphan block"
                );
            }
        }
    }
    let return_after = inner.options.return_after;
    let idle: Vec<u64> = {
        let owned = lock(&mp.owned);
        owned
            .blocks
            .iter()
            .filter(|(&i, h)| {
                Some(i) != owned.current
                    && h.empty_since.is_some_and(|t| t.elapsed() >= return_after)
            })
            .map(|(&i, _)| i)
            .collect()
    };
    for idx in idle {
        give_back(inner, mp, idx).await?;
    }
    Ok(())
}
