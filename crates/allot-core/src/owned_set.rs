//! The blocks one member owns in one pool, with running counts, so the hot
//! path takes a value without walking every block.
//!
//! Both ends of a member keep this state: the engine's embedded member and
//! the remote member of `allot-client`, which allocates in its own process
//! from blocks granted through `allot serve`. Each block carries the caller's
//! own data `T` (the engine keeps the revision of the owner record its writes
//! compare), and "empty since" stamps of the caller's clock type `S` (core
//! reads no clock).
//!
//! ```
//! use allot_core::owned::OwnedBlock;
//! use allot_core::owned_set::OwnedBlocks;
//! let mut set: OwnedBlocks<(), u64> = OwnedBlocks::default();
//! set.insert(0, OwnedBlock::new(0, 4, 8, &[]).unwrap(), 7, (), 0);
//! let (offset, block, epoch) = set.allocate().unwrap();
//! assert_eq!((offset, block, epoch, set.free()), (0, 0, 7, 3));
//! assert!(set.release(0, offset, 5).unwrap()); // empty again, since t=5
//! assert_eq!(set.idle_since(10), vec![]); // the current block is kept
//! ```

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{CoreError, Result};
use crate::owned::OwnedBlock;

/// One owned block with its epoch and the caller's data.
#[derive(Debug, Clone)]
pub struct Held<T, S> {
    pub block: OwnedBlock,
    /// The block's epoch while this member owns it (the fencing token).
    pub epoch: u64,
    pub extra: T,
    /// When the block last became empty (for giving it back).
    pub empty_since: Option<S>,
}

/// The owned blocks of one pool.
#[derive(Debug, Clone)]
pub struct OwnedBlocks<T, S> {
    blocks: BTreeMap<u64, Held<T, S>>,
    /// The block allocation tries first.
    current: Option<u64>,
    /// Blocks with a free value, and how many values are free in all: kept
    /// as blocks change, since a member fills blocks and keeps the full
    /// ones.
    with_free: BTreeSet<u64>,
    free: u64,
}

impl<T, S> Default for OwnedBlocks<T, S> {
    fn default() -> Self {
        OwnedBlocks {
            blocks: BTreeMap::new(),
            current: None,
            with_free: BTreeSet::new(),
            free: 0,
        }
    }
}

impl<T, S: Copy + Ord> OwnedBlocks<T, S> {
    /// Values free in all owned blocks.
    pub fn free(&self) -> u64 {
        self.free
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn get(&self, idx: u64) -> Option<&Held<T, S>> {
        self.blocks.get(&idx)
    }

    pub fn contains(&self, idx: u64) -> bool {
        self.blocks.contains_key(&idx)
    }

    /// The owned blocks in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Held<T, S>)> {
        self.blocks.iter().map(|(&i, h)| (i, h))
    }

    /// Adds (or replaces) block `idx`; an empty block counts as empty from
    /// `now`.
    pub fn insert(&mut self, idx: u64, block: OwnedBlock, epoch: u64, extra: T, now: S) {
        let free = block.free();
        let empty_since = (block.allocated() == 0).then_some(now);
        let held = Held {
            block,
            epoch,
            extra,
            empty_since,
        };
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

    /// Forgets block `idx` (given back, or lost to another member).
    pub fn remove(&mut self, idx: u64) -> Option<Held<T, S>> {
        let held = self.blocks.remove(&idx)?;
        self.free -= held.block.free();
        self.with_free.remove(&idx);
        if self.current == Some(idx) {
            self.current = None;
        }
        Some(held)
    }

    /// The next free value: the current block first, then any other with
    /// one. Returns `(offset, block, epoch)`.
    #[inline]
    pub fn allocate(&mut self) -> Option<(u64, u64, u64)> {
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

    /// Takes up to `n` values at once into `out` (in the order
    /// [`OwnedBlocks::allocate`] would give them); how many it took. A
    /// per-thread allocator refills from this, so threads share the lock
    /// once per batch instead of once per value.
    pub fn allocate_many(&mut self, n: usize, out: &mut Vec<(u64, u64, u64)>) -> usize {
        let before = out.len();
        while out.len() - before < n {
            match self.allocate() {
                Some(taken) => out.push(taken),
                None => break,
            }
        }
        out.len() - before
    }

    /// Frees `offset` of block `idx`; whether the block is now empty.
    pub fn release(&mut self, idx: u64, offset: u64, now: S) -> Result<bool> {
        let Some(held) = self.blocks.get_mut(&idx) else {
            return Err(CoreError::NotAllocated(format!("offset {offset}")));
        };
        held.block.release(offset)?;
        let empty = held.block.allocated() == 0;
        if empty {
            held.empty_since = Some(now);
        }
        self.free += 1;
        self.with_free.insert(idx);
        Ok(empty)
    }

    /// Empty blocks, other than the current one, empty since `before` or
    /// earlier: the ones to give back.
    pub fn idle_since(&self, before: S) -> Vec<u64> {
        self.blocks
            .iter()
            .filter(|(&i, h)| Some(i) != self.current && h.empty_since.is_some_and(|t| t <= before))
            .map(|(&i, _)| i)
            .collect()
    }
}

/// How many values a per-thread allocator takes from the shared blocks at
/// once.
pub const ALLOCATOR_BATCH: usize = 64;

/// The values a per-thread allocator took from a member's shared
/// [`OwnedBlocks`] and has not handed out yet: threads take the shared lock
/// once per [`ALLOCATOR_BATCH`] values instead of once per value. What is
/// left when the allocator goes must be given back.
///
/// ```
/// use allot_core::owned::OwnedBlock;
/// use allot_core::owned_set::{Batch, OwnedBlocks};
/// let mut set: OwnedBlocks<(), u64> = OwnedBlocks::default();
/// set.insert(0, OwnedBlock::new(0, 128, 128, &[]).unwrap(), 1, (), 0);
/// let mut batch = Batch::default();
/// batch.refill(&mut set);
/// assert_eq!(batch.pop(), Some((0, 0, 1)));
/// assert_eq!(set.free(), 64);
/// batch.give_back(&mut set, 0);
/// assert_eq!(set.free(), 127);
/// ```
#[derive(Debug, Default)]
pub struct Batch {
    /// Last = next to hand out.
    taken: Vec<(u64, u64, u64)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.taken.is_empty()
    }

    /// The next value as `(offset, block, epoch)`.
    #[inline]
    pub fn pop(&mut self) -> Option<(u64, u64, u64)> {
        self.taken.pop()
    }

    /// Takes the next [`ALLOCATOR_BATCH`] values (or fewer) from `set`.
    pub fn refill<T, S: Copy + Ord>(&mut self, set: &mut OwnedBlocks<T, S>) {
        set.allocate_many(ALLOCATOR_BATCH, &mut self.taken);
        // Handed out in the order the set gave them.
        self.taken.reverse();
    }

    /// Returns the values not handed out to `set` (a block no longer owned
    /// is gone with its values).
    pub fn give_back<T, S: Copy + Ord>(&mut self, set: &mut OwnedBlocks<T, S>, now: S) {
        for (offset, block, _) in self.taken.drain(..) {
            let _ = set.release(block, offset, now);
        }
    }
}

/// The outcome of a member's group commits (`sync` durability): changes
/// are numbered as they happen; one commit stores every change up to the
/// newest number and answers all the callers waiting for those.
#[derive(Debug, Default, Clone)]
pub struct CommitLog {
    /// Every change up to here has been committed (or failed).
    committed: u64,
    /// Failed commits, as `upto → from`; only recent ones are kept.
    failed: BTreeMap<u64, u64>,
}

/// How many failed commits a [`CommitLog`] remembers: callers waiting for
/// one are a moment old.
const FAILED_KEPT: usize = 1024;

impl CommitLog {
    /// `Some(true)`: change `seq` is stored; `Some(false)`: the commit that
    /// carried it failed; `None`: no commit has carried it yet.
    pub fn outcome(&self, seq: u64) -> Option<bool> {
        if let Some((_, &from)) = self.failed.range(seq..).next() {
            if from <= seq {
                return Some(false);
            }
        }
        (self.committed >= seq).then_some(true)
    }

    /// Records a commit of every change after the last one up to `upto`.
    pub fn record(&mut self, upto: u64, stored: bool) {
        if !stored {
            self.failed.insert(upto, self.committed + 1);
            while self.failed.len() > FAILED_KEPT {
                self.failed.pop_first();
            }
        }
        self.committed = self.committed.max(upto);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(idx: u64) -> OwnedBlock {
        OwnedBlock::new(idx, 4, 16, &[]).unwrap()
    }

    #[test]
    fn counts_follow_allocations_across_blocks() {
        let mut set: OwnedBlocks<(), u32> = OwnedBlocks::default();
        set.insert(1, block(1), 3, (), 0);
        set.insert(2, block(2), 5, (), 0);
        assert_eq!(set.free(), 8);
        let taken: Vec<_> = std::iter::from_fn(|| set.allocate()).collect();
        assert_eq!(taken.len(), 8);
        assert_eq!(set.free(), 0);
        assert_eq!(taken[0], (4, 1, 3));
        assert_eq!(taken[4], (8, 2, 5));
        // Full blocks are kept but offer nothing.
        assert_eq!(set.allocate(), None);
        assert!(!set.release(2, 8, 9).unwrap());
        assert_eq!(set.allocate(), Some((8, 2, 5)));
        assert!(set.release(2, 3, 9).is_err(), "not in block 2");
        let mut batch = Vec::new();
        assert!(set.release(1, 5, 9).is_ok() && set.release(2, 9, 9).is_ok());
        assert_eq!(set.allocate_many(8, &mut batch), 2);
        assert_eq!(batch, vec![(9, 2, 5), (5, 1, 3)]);
        assert_eq!((set.free(), set.allocate_many(1, &mut batch)), (0, 0));
        assert!(set.release(7, 3, 9).is_err(), "not owned");
    }

    #[test]
    fn remove_drops_the_free_values_and_the_current_block() {
        let mut set: OwnedBlocks<u8, u32> = OwnedBlocks::default();
        set.insert(0, block(0), 1, 42, 0);
        set.insert(3, block(3), 1, 43, 0);
        assert_eq!(set.allocate().map(|t| t.1), Some(0));
        let held = set.remove(0).unwrap();
        assert_eq!((held.extra, held.block.allocated()), (42, 1));
        assert_eq!(set.free(), 4);
        assert_eq!(set.allocate().map(|t| t.1), Some(3));
        assert!(set.remove(0).is_none());
    }

    #[test]
    fn commit_log_answers_each_change_by_its_commit() {
        let mut log = CommitLog::default();
        assert_eq!(log.outcome(1), None);
        log.record(3, true);
        log.record(5, false);
        log.record(6, true);
        assert_eq!(log.outcome(2), Some(true));
        assert_eq!(log.outcome(4), Some(false));
        assert_eq!(log.outcome(5), Some(false));
        assert_eq!(log.outcome(6), Some(true));
        assert_eq!(log.outcome(7), None);
    }

    #[test]
    fn idle_blocks_are_the_empty_ones_but_the_current() {
        let mut set: OwnedBlocks<(), u32> = OwnedBlocks::default();
        set.insert(0, block(0), 1, (), 0);
        set.insert(1, block(1), 1, (), 2);
        // Block 0 becomes current; empty again at t=5.
        let (off, idx, _) = set.allocate().unwrap();
        assert_eq!(idx, 0);
        assert!(set.release(0, off, 5).unwrap());
        assert_eq!(set.idle_since(1), Vec::<u64>::new());
        assert_eq!(set.idle_since(2), vec![1]);
        assert_eq!(set.idle_since(9), vec![1], "the current block stays");
    }
}
