//! The engine's side of a remote member: a process that allocates from its
//! own blocks in its own memory, and talks to `allot serve` for everything
//! that touches the store (the gRPC `MemberSession` stream).
//!
//! The remote process holds the allocation state; the session holds what
//! the store needs: the member's lease and record, and for each block it
//! granted the owner record's revision that later writes compare. In
//! `sync` durability it also mirrors each block's bitmap, so the process
//! sends only what changed (values allocated and released) and the session
//! refuses changes that do not fit (a value allocated twice, or released
//! while free).
//!
//! The lease is renewed only when the process asks ([`MemberSession::keep_alive`]):
//! a session never keeps alive a process that stopped talking. A session
//! that ends without [`MemberSession::leave`] leaves its lease to run out,
//! because the process may still be running and trusting its lease (it
//! lost the connection, not its blocks): its blocks become orphans only
//! once it has stopped allocating by its own clock.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use allot_core::{Durability, OwnedBlock};
use allot_store::Revision;

use crate::error::{Error, Result};
use crate::member_blocks::{
    claim_block, free_block, lost_blocks, member_pool_meta, take_free_block, takeable_orphans,
    write_blocks, Taken,
};
use crate::members::{MemberInner, MemberOptions, MemberRecord};
use crate::owners::PoolMeta;
use crate::{lock, Allot, PoolInfo};

/// A block granted to a remote member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub pool: String,
    pub block: u64,
    /// The block's epoch while the member owns it (the fencing token).
    pub epoch: u64,
    /// Offsets in use, as runs `[start, end)` of the pool's offsets (from
    /// the stored bitmap: `sync` durability). Reserved offsets are not
    /// listed; the member knows them from the pool's definition.
    pub in_use: Vec<(u64, u64)>,
    /// A `block`-durability orphan: the member must ask its application
    /// which values are in use before allocating from it.
    pub scan: bool,
    /// The member the block was taken over from, for an orphan.
    pub from: Option<String>,
}

/// The changes to one block since the member's last commit (`sync`
/// durability), as pool offsets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockChange {
    pub block: u64,
    pub allocated: Vec<u64>,
    pub released: Vec<u64>,
}

/// What a commit of a remote member came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Every change is stored.
    Stored,
    /// Nothing was stored: these blocks (never none) were taken over by
    /// another member (the member must drop them); changes to its other
    /// blocks may be sent again.
    Lost(Vec<u64>),
}

/// News for a remote member that it did not ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionNews {
    /// An orphan taken over for the member.
    Granted(Grant),
    /// The pool was deleted or redefined: its blocks are gone.
    PoolGone(String),
}

struct SessionBlock {
    epoch: u64,
    owner_rev: Revision,
    /// The block as stored (`sync` durability only).
    mirror: Option<OwnedBlock>,
}

struct SessionPool {
    meta: PoolMeta,
    durability: Durability,
    blocks: BTreeMap<u64, SessionBlock>,
    /// Serializes the writes of this pool's blocks (commit, give-back,
    /// takeover), so a mirror always matches what is stored. Per pool:
    /// one pool's store round trips never hold up another's commits.
    writing: Arc<tokio::sync::Mutex<()>>,
}

/// The engine's side of one remote member. See the module docs.
pub struct MemberSession {
    inner: Arc<MemberInner>,
    /// The remote process can answer scans (`block`-durability orphans).
    can_scan: bool,
    pools: std::sync::Mutex<HashMap<String, SessionPool>>,
}

impl std::fmt::Debug for MemberSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberSession")
            .field("member", &self.inner.record.name)
            .field("incarnation", &self.inner.record.incarnation)
            .finish()
    }
}

impl Allot {
    /// Joins as member `name` on behalf of a remote process. `options.scan`
    /// is ignored: `can_scan` says whether the process answers scans.
    pub async fn open_session(
        &self,
        name: &str,
        mut options: MemberOptions,
        can_scan: bool,
    ) -> Result<MemberSession> {
        options.scan = None;
        let inner = self.join_inner(name, options).await?;
        Ok(MemberSession {
            inner,
            can_scan,
            pools: std::sync::Mutex::new(HashMap::new()),
        })
    }
}

impl MemberSession {
    /// The member's record as stored.
    pub fn record(&self) -> &MemberRecord {
        &self.inner.record
    }

    /// The member's lease TTL.
    pub fn ttl(&self) -> Duration {
        self.inner.options.ttl
    }

    /// How long before the lease's end the member should stop allocating
    /// (the option given, or the engine's default for its TTL).
    pub fn margin(&self) -> Duration {
        crate::members::margin(&self.inner.options)
    }

    /// Renews the lease. [`Error::Fenced`] once the lease is gone: the
    /// member must stop at once and join again.
    pub async fn keep_alive(&self) -> Result<()> {
        self.inner.renew().await
    }

    /// Starts using member-blocks pool `pool`; returns its definition (the
    /// member needs it to turn offsets into values).
    pub async fn open_pool(&self, pool: &str) -> Result<PoolInfo> {
        let meta = member_pool_meta(&self.inner, pool).await?;
        let info = self.inner.allot.pool(pool).await?;
        let mut pools = lock(&self.pools);
        let known = pools.get(pool).map(|p| p.meta.record_rev);
        if known != Some(meta.record_rev) {
            let durability = meta.spec.member_blocks.unwrap_or_default();
            pools.insert(
                pool.to_string(),
                SessionPool {
                    meta,
                    durability,
                    blocks: BTreeMap::new(),
                    writing: Arc::default(),
                },
            );
        }
        Ok(info)
    }

    fn meta(&self, pool: &str) -> Result<(PoolMeta, Durability)> {
        lock(&self.pools)
            .get(pool)
            .map(|p| (p.meta.clone(), p.durability))
            .ok_or_else(|| not_open(pool))
    }

    /// The lock serializing writes of `pool`'s blocks.
    fn writing(&self, pool: &str) -> Result<Arc<tokio::sync::Mutex<()>>> {
        lock(&self.pools)
            .get(pool)
            .map(|p| p.writing.clone())
            .ok_or_else(|| not_open(pool))
    }

    /// Takes one free block of `pool` for the member. Not under the pool's
    /// write lock: a free block is claimed by a compare on its owner record
    /// and is new to this session, so no mirror can be out of step with it,
    /// and a prefetch (up to five store rounds) must not hold up commits.
    pub async fn acquire(&self, pool: &str) -> Result<Grant> {
        let (meta, durability) = self.meta(pool)?;
        let taken = take_free_block(&self.inner, pool, &meta).await?;
        self.grant(pool, &meta, durability, taken, None)
    }

    /// Records a block just taken and describes it for the member.
    fn grant(
        &self,
        pool: &str,
        meta: &PoolMeta,
        durability: Durability,
        taken: Taken,
        from: Option<String>,
    ) -> Result<Grant> {
        let orphan = from.is_some();
        let mirror = match (durability, &taken.stored) {
            (Durability::Sync, Some(stored)) => Some(meta.owned_block_from(taken.idx, stored)),
            (Durability::Sync, None) => Some(meta.empty_block(taken.idx)),
            (Durability::Block, _) => None,
        }
        .transpose()
        .map_err(|e| Error::from_core(pool, e))?;
        let in_use = match &taken.stored {
            Some(stored) if durability == Durability::Sync => runs(taken.idx, meta, stored),
            _ => Vec::new(),
        };
        let grant = Grant {
            pool: pool.to_string(),
            block: taken.idx,
            epoch: taken.epoch,
            in_use,
            scan: durability == Durability::Block && orphan,
            from,
        };
        if let Some(p) = lock(&self.pools).get_mut(pool) {
            p.blocks.insert(
                taken.idx,
                SessionBlock {
                    epoch: taken.epoch,
                    owner_rev: taken.owner_rev,
                    mirror,
                },
            );
        }
        Ok(grant)
    }

    /// One round of housekeeping: takes over the orphans of the pools in
    /// use (`block`-durability ones only if the member can scan) and notices
    /// pools that are gone.
    pub async fn tend(&self) -> Result<Vec<SessionNews>> {
        let mut news = Vec::new();
        let open: Vec<(String, Revision, Durability)> = lock(&self.pools)
            .iter()
            .map(|(n, p)| (n.clone(), p.meta.record_rev, p.durability))
            .collect();
        for (pool, record_rev, durability) in open {
            match self.inner.owners.pool_meta(&pool) {
                Some(meta) if meta.record_rev == record_rev => {}
                _ => {
                    lock(&self.pools).remove(&pool);
                    news.push(SessionNews::PoolGone(pool));
                    continue;
                }
            }
            if durability == Durability::Block && !self.can_scan {
                continue;
            }
            let (meta, _) = self.meta(&pool)?;
            let writing = self.writing(&pool)?;
            for (idx, rev, epoch, gone, from) in takeable_orphans(&self.inner, &pool) {
                self.inner.fence.check()?;
                let _w = writing.lock().await;
                let claimed = claim_block(&self.inner, &pool, &meta, idx, rev, epoch, Some(gone));
                if let Some(taken) = claimed.await? {
                    tracing::info!(%pool, block = idx, %from, member = %self.inner.record.name,
                        "took over an orphan block for a remote member");
                    news.push(SessionNews::Granted(self.grant(
                        &pool,
                        &meta,
                        durability,
                        taken,
                        Some(from),
                    )?));
                }
            }
        }
        Ok(news)
    }

    /// The version of what [`MemberSession::tend`] looks at (members and
    /// block owners); read it before a round, then wait with
    /// [`MemberSession::changed_since`], so a change during the round is not
    /// missed.
    pub fn version(&self) -> u64 {
        self.inner.owners.version()
    }

    /// Waits until members or block owners change after `seen` (or
    /// `at_most` passes): the moment for the next [`MemberSession::tend`].
    pub async fn changed_since(&self, seen: u64, at_most: Duration) {
        self.inner.owners.changed_since(seen, at_most).await;
    }

    /// Stores the changes of a `sync`-durability pool's blocks in one
    /// transaction. Changes that do not fit the blocks as stored (not
    /// granted, a value allocated twice, released while free) are refused
    /// with nothing stored.
    pub async fn commit(&self, pool: &str, changes: &[BlockChange]) -> Result<CommitOutcome> {
        self.inner.fence.check()?;
        let writing = self.writing(pool)?;
        let _w = writing.lock().await;
        let mut next: Vec<(u64, OwnedBlock, Revision)> = Vec::with_capacity(changes.len());
        {
            let pools = lock(&self.pools);
            let p = pools.get(pool).ok_or_else(|| not_open(pool))?;
            if p.durability != Durability::Sync {
                return Err(Error::InvalidInput(format!(
                    "pool '{pool}' stores only block ownership (block durability): \
                     allocations are not committed"
                )));
            }
            for change in changes {
                let held = p.blocks.get(&change.block).ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "block {} of pool '{pool}' is not this member's",
                        change.block
                    ))
                })?;
                let Some(mirror) = &held.mirror else {
                    return Err(Error::Corrupt("sync block without its bitmap".into()));
                };
                let mut block = mirror.clone();
                for &off in &change.allocated {
                    block.mark(off).map_err(|e| Error::from_core(pool, e))?;
                }
                for &off in &change.released {
                    block.release(off).map_err(|e| Error::from_core(pool, e))?;
                }
                next.push((change.block, block, held.owner_rev));
            }
        }
        let writes: Vec<(u64, Option<Vec<u8>>, Revision)> = next
            .iter()
            .map(|(idx, block, rev)| {
                let stored = block.to_block();
                let bytes = (!stored.bits.is_empty()).then(|| stored.encode());
                (*idx, bytes, *rev)
            })
            .collect();
        if write_blocks(&self.inner, pool, &writes).await? {
            let mut pools = lock(&self.pools);
            if let Some(p) = pools.get_mut(pool) {
                for (idx, block, _) in next {
                    if let Some(held) = p.blocks.get_mut(&idx) {
                        held.mirror = Some(block);
                    }
                }
            }
            return Ok(CommitOutcome::Stored);
        }
        // Our membership, or some block, is gone: find out which.
        self.inner.check_membership().await?;
        let ours: Vec<(u64, Revision)> = lock(&self.pools)
            .get(pool)
            .map(|p| p.blocks.iter().map(|(&i, b)| (i, b.owner_rev)).collect())
            .unwrap_or_default();
        let lost = lost_blocks(&self.inner, pool, ours).await?;
        if lost.is_empty() {
            // Nothing stored, yet every block is still ours (the pool was
            // deleted or reopened meanwhile): an empty `Lost` would read as
            // "stored" on the wire, so refuse instead.
            return Err(Error::Contention(pool.to_string()));
        }
        if let Some(p) = lock(&self.pools).get_mut(pool) {
            for idx in &lost {
                p.blocks.remove(idx);
            }
        }
        Ok(CommitOutcome::Lost(lost))
    }

    /// Gives block `block` back to the pool; the member must not allocate
    /// from it any more (it said it is empty). Whether it was still ours.
    pub async fn give_back(&self, pool: &str, block: u64) -> Result<bool> {
        self.inner.fence.check()?;
        let writing = self.writing(pool)?;
        let _w = writing.lock().await;
        let held = {
            let mut pools = lock(&self.pools);
            let p = pools.get_mut(pool).ok_or_else(|| not_open(pool))?;
            if let Some(mirror) = p.blocks.get(&block).and_then(|b| b.mirror.as_ref()) {
                if mirror.allocated() != 0 {
                    return Err(Error::Conflict(format!(
                        "block {block} of pool '{pool}' still has {} values stored as \
                         allocated: release them (and commit) first",
                        mirror.allocated()
                    )));
                }
            }
            p.blocks.remove(&block)
        };
        match held {
            Some(h) => free_block(&self.inner, pool, block, h.epoch, h.owner_rev).await,
            None => Ok(false),
        }
    }

    /// Leaves: revokes the lease, so the member's record goes at once and
    /// its blocks become orphans for the others.
    pub async fn leave(&self) -> Result<()> {
        self.inner.leave().await
    }
}

fn not_open(pool: &str) -> Error {
    Error::InvalidInput(format!("pool '{pool}' is not open in this session"))
}

/// The allocated offsets of stored block `idx` as runs `[start, end)`.
fn runs(idx: u64, meta: &PoolMeta, stored: &allot_core::Block) -> Vec<(u64, u64)> {
    let base = idx * meta.spec.block_size;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for bit in stored.bits.iter() {
        let off = base + u64::from(bit);
        match out.last_mut() {
            Some(last) if last.1 == off => last.1 = off + 1,
            _ => out.push((off, off + 1)),
        }
    }
    out
}
