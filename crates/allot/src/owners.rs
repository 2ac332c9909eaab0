//! Who owns what: a local map of members and block owners, kept current by
//! store watches, so `owner(pool, value)` is a hash lookup (DRSM's "demux"
//! mode: a load balancer asks which member owns an ID, at packet rate).
//!
//! The map holds every member-blocks pool's definition (to turn a value into
//! its block), every live member and every block owner. It starts from one
//! range read per prefix and follows each prefix with a watch from the
//! revision of that read, so nothing falls in between; if a watch fails it
//! reads everything again. Members use the same map to find free blocks and
//! orphans.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use allot_core::error::Result as CoreResult;
use allot_core::{Block, OwnedBlock, PoolSpec, ValueSpace};
use allot_store::{Event as StoreEvent, EventKind, Revision, Store, StoreError};

use crate::error::{Error, Result};
use crate::members::{BlockOwner, BlockScan, MemberRecord};
use crate::model::PoolRecord;
use crate::{decode_json, keys};

/// The owner of the block holding a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerInfo {
    pub pool: String,
    /// The block holding the value.
    pub block: u64,
    pub member: String,
    pub incarnation: u64,
    /// The block's epoch: grows on every change of owner (the fencing token).
    pub epoch: u64,
    /// The member's address, while it is live.
    pub address: Option<String>,
    /// False once the owner's lease expired (or it joined again under a new
    /// incarnation): the block is an orphan until a live member takes it.
    pub live: bool,
}

/// A member-blocks pool as the map needs it.
#[derive(Debug, Clone)]
pub(crate) struct PoolMeta {
    pub(crate) spec: PoolSpec,
    pub(crate) space: ValueSpace,
    pub(crate) reserved: Vec<(u64, u64)>,
    pub(crate) record_rev: Revision,
}

impl PoolMeta {
    pub(crate) fn new(record: &PoolRecord, record_rev: Revision) -> Result<Self> {
        let (space, reserved) = record
            .spec
            .validate()
            .map_err(|e| Error::from_core(&record.name, e))?;
        Ok(PoolMeta {
            spec: record.spec.clone(),
            space,
            reserved,
            record_rev,
        })
    }

    pub(crate) fn blocks(&self) -> u128 {
        self.space.size().div_ceil(u128::from(self.spec.block_size))
    }

    /// Block `idx` with nothing in use.
    pub(crate) fn empty_block(&self, idx: u64) -> CoreResult<OwnedBlock> {
        OwnedBlock::new(idx, self.spec.block_size, self.space.size(), &self.reserved)
    }

    /// Block `idx` as stored.
    pub(crate) fn owned_block_from(&self, idx: u64, stored: &Block) -> CoreResult<OwnedBlock> {
        let (bs, size) = (self.spec.block_size, self.space.size());
        OwnedBlock::from_block(idx, bs, size, &self.reserved, stored)
    }

    /// Block `idx` with `in_use` values (as the application writes them)
    /// allocated.
    pub(crate) fn owned_block_in_use(
        &self,
        pool: &str,
        idx: u64,
        in_use: &[String],
    ) -> Result<OwnedBlock> {
        let mut offsets = Vec::with_capacity(in_use.len());
        for v in in_use {
            let run = self.space.parse(v).map_err(|e| Error::from_core(pool, e))?;
            offsets.push(run.offset);
        }
        let (bs, size) = (self.spec.block_size, self.space.size());
        OwnedBlock::with_in_use(idx, bs, size, &self.reserved, offsets)
            .map_err(|e| Error::from_core(pool, e))
    }

    /// What to ask the application about block `idx` taken over at `epoch`.
    pub(crate) fn scan_request(&self, pool: &str, idx: u64, epoch: u64) -> CoreResult<BlockScan> {
        let (first, end) = self.empty_block(idx)?.range();
        Ok(BlockScan {
            pool: pool.to_string(),
            block: idx,
            first: self.space.format_offset(first),
            last: self.space.format_offset(end - 1),
            epoch,
        })
    }
}

/// A block whose owner is gone, as the map sees it.
#[derive(Debug, Clone)]
pub(crate) struct Orphan {
    pub(crate) block: u64,
    pub(crate) owner: BlockOwner,
    /// Revision of the owner record.
    pub(crate) rev: Revision,
    /// The owner's name and the revision of its member record now (0:
    /// none): a takeover compares it, so a map that is merely behind (the
    /// owner joined a moment ago) cannot take a live member's block.
    pub(crate) member: String,
    pub(crate) member_rev: Revision,
    /// Not to be taken before this (the owner's name joined again).
    pub(crate) not_before: Option<tokio::time::Instant>,
}

#[derive(Default)]
struct State {
    pools: HashMap<String, PoolMeta>,
    /// Live members: record, its mod revision, and when this map first saw
    /// that incarnation.
    members: HashMap<String, (MemberRecord, Revision, tokio::time::Instant)>,
    /// Per pool: block → (owner record, its mod revision).
    owners: HashMap<String, BTreeMap<u64, (BlockOwner, Revision)>>,
}

impl State {
    fn is_live(&self, owner: &BlockOwner) -> bool {
        match &owner.member {
            Some(m) => self
                .members
                .get(m)
                .is_some_and(|(rec, _, _)| rec.incarnation == owner.incarnation),
            None => false,
        }
    }
}

struct Shared {
    state: RwLock<State>,
    /// Bumped (and waiters woken) on every change applied.
    version: tokio::sync::watch::Sender<u64>,
}

/// A live view of members and block owners (cheap to clone).
#[derive(Clone)]
pub struct OwnerMap {
    shared: Arc<Shared>,
    /// Dropped with the last clone, which ends the watch task.
    _stop: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl std::fmt::Debug for OwnerMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = read(&self.shared.state);
        f.debug_struct("OwnerMap")
            .field("pools", &s.pools.len())
            .field("members", &s.members.len())
            .finish()
    }
}

fn read(lock: &RwLock<State>) -> std::sync::RwLockReadGuard<'_, State> {
    // Every update is a few map inserts; a panic cannot leave them torn.
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write(lock: &RwLock<State>) -> std::sync::RwLockWriteGuard<'_, State> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

impl OwnerMap {
    /// Reads members, owners and member-blocks pools from `store` and keeps
    /// following them (a task on the current tokio runtime, ending with the
    /// last clone of the map).
    pub async fn start(store: Arc<dyn Store>) -> Result<OwnerMap> {
        let (version, _) = tokio::sync::watch::channel(0);
        let shared = Arc::new(Shared {
            state: RwLock::new(State::default()),
            version,
        });
        let streams = load(&store, &shared).await?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            tokio::select! {
                () = follow(weak, store, streams) => {}
                _ = stop_rx => {}
            }
        });
        Ok(OwnerMap {
            shared,
            _stop: Arc::new(stop_tx),
        })
    }

    /// The owner of the block holding `value` in `pool`: `None` if no member
    /// owns that block. O(1): a parse and two hash lookups.
    pub fn owner(&self, pool: &str, value: &str) -> Result<Option<OwnerInfo>> {
        let s = read(&self.shared.state);
        let meta = s.pools.get(pool).ok_or_else(|| {
            Error::NotFound(format!(
                "pool '{pool}' is not a member-blocks pool (or does not exist)"
            ))
        })?;
        let run = meta
            .space
            .parse(value)
            .map_err(|e| Error::from_core(pool, e))?;
        let block = run.offset / meta.spec.block_size;
        Ok(owner_info(&s, pool, block))
    }

    /// The owner of `block` of `pool`, if any.
    pub fn block_owner(&self, pool: &str, block: u64) -> Option<OwnerInfo> {
        owner_info(&read(&self.shared.state), pool, block)
    }

    /// The live members, by name.
    pub fn members(&self) -> Vec<MemberRecord> {
        let s = read(&self.shared.state);
        let mut out: Vec<MemberRecord> = s.members.values().map(|(r, _, _)| r.clone()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// How many blocks each live member owns.
    pub fn blocks_held(&self) -> HashMap<String, u64> {
        let s = read(&self.shared.state);
        let mut held = HashMap::new();
        for owners in s.owners.values() {
            for (owner, _) in owners.values() {
                if let (true, Some(m)) = (s.is_live(owner), &owner.member) {
                    *held.entry(m.clone()).or_insert(0) += 1;
                }
            }
        }
        held
    }

    /// Waits until the map changes after `seen` (a value from
    /// [`OwnerMap::version`]), or `timeout` passes.
    pub async fn changed_since(&self, seen: u64, timeout: Duration) {
        let mut rx = self.shared.version.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|v| *v != seen)).await;
    }

    /// A counter that grows with every change applied.
    pub fn version(&self) -> u64 {
        *self.shared.version.borrow()
    }

    pub(crate) fn pool_meta(&self, pool: &str) -> Option<PoolMeta> {
        read(&self.shared.state).pools.get(pool).cloned()
    }

    /// Blocks of `pool` whose owner is gone, with what a takeover must
    /// compare and when it may happen.
    pub(crate) fn orphans(&self, pool: &str) -> Vec<Orphan> {
        let s = read(&self.shared.state);
        let Some(owners) = s.owners.get(pool) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (&block, (owner, rev)) in owners {
            let Some(name) = &owner.member else { continue };
            if s.is_live(owner) {
                continue;
            }
            let (member_rev, not_before) = match s.members.get(name) {
                // The lease expired, or the member left (fencing itself
                // first): nothing of it can still act.
                None => (0, None),
                // Joined again under a new incarnation, maybe elsewhere
                // while the old process still runs: the join revoked the
                // old lease, so the old process stops within one TTL of it.
                Some((rec, mrev, seen)) => (
                    *mrev,
                    Some(*seen + std::time::Duration::from_millis(rec.ttl_ms)),
                ),
            };
            out.push(Orphan {
                block,
                owner: owner.clone(),
                rev: *rev,
                member: name.clone(),
                member_rev,
                not_before,
            });
        }
        out
    }

    /// Up to `n` blocks of `pool` nobody owns, lowest first: (block, the
    /// revision of its owner record, 0 if it never had one, and its epoch).
    pub(crate) fn free_blocks(&self, pool: &str, n: usize) -> Vec<(u64, Revision, u64)> {
        let s = read(&self.shared.state);
        let Some(meta) = s.pools.get(pool) else {
            return Vec::new();
        };
        let empty = BTreeMap::new();
        free_blocks(meta, s.owners.get(pool).unwrap_or(&empty), n)
    }
}

/// Up to `n` blocks nobody owns, given the owner records of a pool.
pub(crate) fn free_blocks(
    meta: &PoolMeta,
    owners: &BTreeMap<u64, (BlockOwner, Revision)>,
    n: usize,
) -> Vec<(u64, Revision, u64)> {
    let total = meta.blocks();
    let mut out = Vec::with_capacity(n);
    let mut idx: u64 = 0;
    while out.len() < n && u128::from(idx) < total {
        match owners.get(&idx) {
            None => out.push((idx, 0, 0)),
            Some((o, rev)) if o.member.is_none() => out.push((idx, *rev, o.epoch)),
            Some(_) => {}
        }
        idx += 1;
    }
    out
}

/// The owner records of a pool, read from the store itself (when the map
/// may be behind).
pub(crate) async fn read_owners(
    store: &dyn Store,
    pool: &str,
) -> Result<BTreeMap<u64, (BlockOwner, Revision)>> {
    let prefix = keys::owners_prefix(pool);
    let (kvs, _) = range_all(store, &prefix).await?;
    let mut out = BTreeMap::new();
    for kv in kvs {
        if let Some((_, idx)) = keys::parse_owner(&kv.key) {
            let owner: BlockOwner = decode_json("block owner", &kv.value)?;
            out.insert(idx, (owner, kv.mod_revision));
        }
    }
    Ok(out)
}

fn owner_info(s: &State, pool: &str, block: u64) -> Option<OwnerInfo> {
    let (owner, _) = s.owners.get(pool)?.get(&block)?;
    let member = owner.member.clone()?;
    let live = s.is_live(owner);
    let address = if live {
        s.members
            .get(&member)
            .and_then(|(r, _, _)| r.address.clone())
    } else {
        None
    };
    Some(OwnerInfo {
        pool: pool.to_string(),
        block,
        member,
        incarnation: owner.incarnation,
        epoch: owner.epoch,
        address,
        live,
    })
}

type Streams = Vec<allot_store::WatchStream>;

/// Reads the three prefixes into `shared` (replacing what it held) and
/// opens a watch on each from the revision after its read.
async fn load(store: &Arc<dyn Store>, shared: &Shared) -> Result<Streams> {
    let mut fresh = State::default();
    let mut streams = Vec::with_capacity(3);
    for prefix in [
        keys::POOLS_PREFIX,
        keys::MEMBERS_PREFIX,
        keys::OWNERS_PREFIX,
    ] {
        let (kvs, revision) = range_all(store.as_ref(), prefix).await?;
        for kv in kvs {
            apply(
                &mut fresh,
                EventKind::Put,
                &kv.key,
                &kv.value,
                kv.mod_revision,
            );
        }
        streams.push(store.watch(prefix, revision + 1).await?);
    }
    *write(&shared.state) = fresh;
    shared.version.send_modify(|v| *v += 1);
    Ok(streams)
}

/// Every key under `prefix`, from one snapshot per page; the revision of the
/// first page (later pages only add what changed after, which the watch
/// replays anyway, in order).
async fn range_all(
    store: &dyn Store,
    prefix: &[u8],
) -> std::result::Result<(Vec<allot_store::KeyValue>, Revision), StoreError> {
    let end = allot_store::prefix_end(prefix);
    let mut start = prefix.to_vec();
    let mut out = Vec::new();
    let mut first_rev = None;
    loop {
        let page = store.range(&start, &end, 4096).await?;
        first_rev.get_or_insert(page.revision);
        let more = page.more;
        if let Some(last) = page.kvs.last() {
            start = last.key.clone();
            start.push(0);
        }
        out.extend(page.kvs);
        if !more {
            return Ok((out, first_rev.unwrap_or(0)));
        }
    }
}

async fn follow(weak: Weak<Shared>, store: Arc<dyn Store>, mut streams: Streams) {
    let mut delay = Duration::from_millis(100);
    loop {
        let mut events = futures::stream::select_all(std::mem::take(&mut streams));
        while let Some(event) = events.next().await {
            let Some(shared) = weak.upgrade() else { return };
            match event {
                Ok(event) => on_event(&shared, &event),
                Err(e) => {
                    tracing::warn!("following members and owners: {e}; reading them again");
                    break;
                }
            }
        }
        drop(events);
        // Read everything again (the watch may have missed changes).
        loop {
            let Some(shared) = weak.upgrade() else { return };
            match load(&store, &shared).await {
                Ok(s) => {
                    streams = s;
                    delay = Duration::from_millis(100);
                    break;
                }
                Err(e) => {
                    drop(shared);
                    tracing::warn!("reading members and owners: {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

fn on_event(shared: &Shared, event: &StoreEvent) {
    let kv = &event.kv;
    {
        let mut s = write(&shared.state);
        apply(&mut s, event.kind, &kv.key, &kv.value, kv.mod_revision);
    }
    shared.version.send_modify(|v| *v += 1);
}

/// Applies one put or delete. Records that do not decode are logged and
/// skipped: the map is advisory, every write it leads to is compare-guarded.
fn apply(s: &mut State, kind: EventKind, key: &[u8], value: &[u8], rev: Revision) {
    let put = kind == EventKind::Put;
    if let Some((pool, block)) = keys::parse_owner(key) {
        let owners = s.owners.entry(pool.to_string()).or_default();
        if put {
            match decode_json::<BlockOwner>("block owner", value) {
                Ok(o) => {
                    owners.insert(block, (o, rev));
                }
                Err(e) => tracing::warn!("{e}"),
            }
        } else {
            owners.remove(&block);
        }
    } else if let Some(name) = key
        .strip_prefix(keys::MEMBERS_PREFIX)
        .and_then(|n| std::str::from_utf8(n).ok())
    {
        if put {
            match decode_json::<MemberRecord>("member record", value) {
                Ok(r) => {
                    let seen = match s.members.get(name) {
                        Some((old, _, seen)) if old.incarnation == r.incarnation => *seen,
                        _ => tokio::time::Instant::now(),
                    };
                    s.members.insert(name.to_string(), (r, rev, seen));
                }
                Err(e) => tracing::warn!("{e}"),
            }
        } else {
            s.members.remove(name);
        }
    } else if let Some(name) = key
        .strip_prefix(keys::POOLS_PREFIX)
        .and_then(|n| std::str::from_utf8(n).ok())
    {
        s.pools.remove(name);
        if put {
            match decode_json::<PoolRecord>("pool record", value)
                .and_then(|r| PoolMeta::new(&r, rev))
            {
                Ok(meta) if meta.spec.member_blocks.is_some() => {
                    s.pools.insert(name.to_string(), meta);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("{e}"),
            }
        } else {
            s.owners.remove(name);
        }
    }
}
