//! The allocation state of one pool: its blocks, counters, strategy cursor
//! and quarantine, with pure operations (time comes in as `now_ms`).
//!
//! Invariant kept here: a unit is set in at most one block bitmap position
//! and an allocation succeeds only if every unit of its run was free, so no
//! value is ever held twice. Every refused operation leaves the state as it
//! was.
//!
//! ```
//! use allot_core::{PoolSpec, PoolKind, PoolState};
//! let spec = PoolSpec::new(PoolKind::Range { lo: 100, hi: 199 });
//! let mut pool = PoolState::new(&spec, 7).unwrap();
//! let run = pool.allocate(1, 0).unwrap();
//! assert_eq!(pool.space().format(run), "100");
//! pool.release(run, 0).unwrap();
//! ```

use std::collections::{BTreeSet, HashMap};

use rustc_hash::FxHashMap;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::block::{Block, QuarantineEntry, DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE};
use crate::error::{CoreError, Result};
use crate::space::{PoolKind, Run, ValueSpace};

/// How the next free value is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The lowest free value (dense, predictable).
    #[default]
    Lowest,
    /// Next-fit: continue after the last value handed out and wrap at the
    /// end, so a released value is not reused until the pool wraps around.
    Next,
    /// A uniformly random free value.
    Random,
}

impl std::str::FromStr for Strategy {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "lowest" => Ok(Strategy::Lowest),
            "next" => Ok(Strategy::Next),
            "random" => Ok(Strategy::Random),
            _ => Err(CoreError::InvalidSpec(format!(
                "unknown strategy '{s}' (expected lowest, next or random)"
            ))),
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::Lowest => "lowest",
            Strategy::Next => "next",
            Strategy::Random => "random",
        })
    }
}

/// Everything that defines how a pool allocates. Persisted with the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpec {
    pub kind: PoolKind,
    /// Reserved values, ranges (`A-B`) or prefixes, as given (validated).
    #[serde(default)]
    pub reserved: Vec<String>,
    #[serde(default)]
    pub strategy: Strategy,
    /// Seconds a released value stays unavailable (0 = reuse at once).
    #[serde(default)]
    pub quarantine_secs: u64,
    /// Units per block: a power of two up to 2^32.
    pub block_size: u64,
    /// `Some`: values are handed out by members from blocks they own, kept
    /// with this durability (DESIGN §5); `None` (default): by the engine
    /// from shared state, every claim committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_blocks: Option<Durability>,
}

/// How much of a member-owned block is stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Every allocation is committed before it is acknowledged (concurrent
    /// ones share a commit); after a takeover the stored bitmap is the truth.
    #[default]
    Sync,
    /// Only ownership is stored; allocations live in the owner's memory, and
    /// a new owner learns the values in use from the application (scan).
    Block,
}

impl std::str::FromStr for Durability {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sync" => Ok(Durability::Sync),
            "block" => Ok(Durability::Block),
            _ => Err(CoreError::InvalidSpec(format!(
                "unknown durability '{s}' (expected sync or block)"
            ))),
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Durability::Sync => "sync",
            Durability::Block => "block",
        })
    }
}

impl PoolSpec {
    /// A spec with defaults: no reservations, lowest-free, no quarantine,
    /// [`DEFAULT_BLOCK_SIZE`].
    pub fn new(kind: PoolKind) -> Self {
        PoolSpec {
            kind,
            reserved: Vec::new(),
            strategy: Strategy::Lowest,
            quarantine_secs: 0,
            block_size: DEFAULT_BLOCK_SIZE,
            member_blocks: None,
        }
    }

    /// Checks the whole spec and returns its value space and merged reserved
    /// offset ranges.
    pub fn validate(&self) -> Result<(ValueSpace, Vec<(u64, u64)>)> {
        if !self.block_size.is_power_of_two() || self.block_size > MAX_BLOCK_SIZE {
            return Err(CoreError::InvalidSpec(format!(
                "block size {} is not a power of two between 1 and 2^32",
                self.block_size
            )));
        }
        let space = ValueSpace::new(self.kind.clone())?;
        let mut ranges: Vec<(u64, u64)> = space.builtin_reserved().to_vec();
        for r in &self.reserved {
            let range = space
                .parse_reservation(r)
                .map_err(|e| CoreError::InvalidSpec(format!("reservation '{r}': {e}")))?;
            ranges.push(range);
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        Ok((space, merged))
    }
}

/// Counters of a pool, in units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStats {
    pub size: u128,
    pub reserved: u128,
    pub allocated: u64,
    pub quarantined: u64,
    pub free: u128,
}

impl PoolStats {
    /// Allocated share of what can be allocated (0.0 when nothing can).
    pub fn utilization(&self) -> f64 {
        let usable = self.size - self.reserved;
        if usable == 0 {
            0.0
        } else {
            self.allocated as f64 / usable as f64
        }
    }
}

/// Pre-images kept while a batch is open, so a failed commit can be undone.
#[derive(Debug, Default)]
struct Journal {
    blocks: HashMap<u64, Option<Block>>,
    allocated: u64,
    quarantined: u64,
    cursor: u64,
    hint: u64,
}

/// The in-memory allocation state of one pool.
#[derive(Debug)]
pub struct PoolState {
    space: ValueSpace,
    reserved: Vec<(u64, u64)>,
    reserved_units: u128,
    strategy: Strategy,
    quarantine_ms: u64,
    shift: u32,
    /// Non-empty blocks. A hash map because the hot path is point lookups
    /// (a B-tree walk over 65k blocks costs more than the bitmap work);
    /// `order` serves the rarer ordered scans.
    blocks: FxHashMap<u64, Block>,
    order: BTreeSet<u64>,
    allocated: u64,
    quarantined: u64,
    /// Next-fit position.
    cursor: u64,
    /// Every unit below `hint` is taken or reserved (lowest-free fast path).
    hint: u64,
    /// Quarantined runs by expiry: (until_ms, offset).
    expiry: BTreeSet<(u64, u64)>,
    rng: SmallRng,
    journal: Option<Journal>,
}

/// Rounds `p` up to a multiple of `n`, a power of two (every run length is).
/// A mask, not a division: u128 division is a slow library call on the hot path.
fn align_up(p: u128, n: u64) -> u128 {
    debug_assert!(n.is_power_of_two());
    let mask = n as u128 - 1;
    (p + mask) & !mask
}

impl PoolState {
    /// An empty pool state for `spec`; `seed` drives the random strategy.
    pub fn new(spec: &PoolSpec, seed: u64) -> Result<Self> {
        let (space, reserved) = spec.validate()?;
        let reserved_units = reserved.iter().map(|(s, e)| (e - s) as u128).sum();
        Ok(PoolState {
            space,
            reserved,
            reserved_units,
            strategy: spec.strategy,
            quarantine_ms: spec.quarantine_secs.saturating_mul(1000),
            shift: spec.block_size.trailing_zeros(),
            blocks: FxHashMap::default(),
            order: BTreeSet::new(),
            allocated: 0,
            quarantined: 0,
            cursor: 0,
            hint: 0,
            expiry: BTreeSet::new(),
            rng: SmallRng::seed_from_u64(seed),
            journal: None,
        })
    }

    pub fn space(&self) -> &ValueSpace {
        &self.space
    }

    pub fn block_size(&self) -> u64 {
        1u64 << self.shift
    }

    /// Index of the block holding `offset`.
    pub fn block_of(&self, offset: u64) -> u64 {
        offset >> self.shift
    }

    pub fn stats(&self) -> PoolStats {
        let size = self.space.size();
        PoolStats {
            size,
            reserved: self.reserved_units,
            allocated: self.allocated,
            quarantined: self.quarantined,
            free: size - self.reserved_units - self.allocated as u128 - self.quarantined as u128,
        }
    }

    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Restores the next-fit position (from storage).
    pub fn set_cursor(&mut self, cursor: u64) {
        self.cursor = cursor;
    }

    /// Installs a block read from storage (before any operation).
    pub fn load_block(&mut self, index: u64, block: Block) {
        if let Some(old) = self.blocks.remove(&index) {
            self.order.remove(&index);
            self.forget_block_counts(index, &old);
        }
        self.learn_block_counts(index, &block);
        if !block.bits.is_empty() {
            self.blocks.insert(index, block);
            self.order.insert(index);
        }
        self.hint = 0;
    }

    /// Replaces a block with a newer stored version (another writer changed it).
    pub fn reload_block(&mut self, index: u64, block: Option<Block>) {
        self.load_block(index, block.unwrap_or_default());
    }

    fn learn_block_counts(&mut self, index: u64, block: &Block) {
        let base = index << self.shift;
        let q = block.quarantined_units();
        self.quarantined += q;
        self.allocated += block.bits.len() - q;
        for (&local, entry) in &block.quarantine {
            self.expiry.insert((entry.until_ms, base + local as u64));
        }
    }

    fn forget_block_counts(&mut self, index: u64, block: &Block) {
        let base = index << self.shift;
        let q = block.quarantined_units();
        self.quarantined -= q;
        self.allocated -= block.bits.len() - q;
        for (&local, entry) in &block.quarantine {
            self.expiry.remove(&(entry.until_ms, base + local as u64));
        }
    }

    pub fn block(&self, index: u64) -> Option<&Block> {
        self.blocks.get(&index)
    }

    /// Number of non-empty blocks held in memory.
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    // ---- batches -------------------------------------------------------

    /// Starts recording pre-images: everything until [`PoolState::commit`] or
    /// [`PoolState::rollback`] can be undone, and [`PoolState::dirty_blocks`]
    /// tells what must be persisted.
    pub fn checkpoint(&mut self) {
        self.journal = Some(Journal {
            blocks: HashMap::new(),
            allocated: self.allocated,
            quarantined: self.quarantined,
            cursor: self.cursor,
            hint: self.hint,
        });
    }

    /// Blocks changed since the checkpoint, with their new state (`None`:
    /// the block is now empty and its record can go).
    pub fn dirty_blocks(&self) -> Vec<(u64, Option<&Block>)> {
        let mut out: Vec<_> = match &self.journal {
            Some(j) => j.blocks.keys().map(|&i| (i, self.blocks.get(&i))).collect(),
            None => Vec::new(),
        };
        out.sort_unstable_by_key(|(i, _)| *i);
        out
    }

    /// True if anything changed since the checkpoint.
    pub fn is_dirty(&self) -> bool {
        self.journal
            .as_ref()
            .is_some_and(|j| !j.blocks.is_empty() || j.cursor != self.cursor)
    }

    /// Keeps what was done since the checkpoint.
    pub fn commit(&mut self) {
        self.journal = None;
    }

    /// Undoes everything since the checkpoint.
    pub fn rollback(&mut self) {
        let Some(j) = self.journal.take() else { return };
        for (index, pre) in j.blocks {
            let base = index << self.shift;
            let end = base + (self.block_size() - 1);
            let stale: Vec<_> = self
                .expiry
                .iter()
                .filter(|(_, o)| *o >= base && *o <= end)
                .copied()
                .collect();
            for e in stale {
                self.expiry.remove(&e);
            }
            match pre {
                Some(block) => {
                    for (&local, entry) in &block.quarantine {
                        self.expiry.insert((entry.until_ms, base + local as u64));
                    }
                    self.blocks.insert(index, block);
                    self.order.insert(index);
                }
                None => {
                    self.blocks.remove(&index);
                    self.order.remove(&index);
                }
            }
        }
        self.allocated = j.allocated;
        self.quarantined = j.quarantined;
        self.cursor = j.cursor;
        self.hint = j.hint;
    }

    /// Records the pre-image of a block about to change.
    fn touch(&mut self, index: u64) {
        if let Some(j) = &mut self.journal {
            j.blocks
                .entry(index)
                .or_insert_with(|| self.blocks.get(&index).cloned());
        }
    }

    // ---- queries ------------------------------------------------------

    /// Whether `offset` is reserved.
    pub fn is_reserved(&self, offset: u64) -> bool {
        self.reserved_end(offset as u128, offset as u128 + 1)
            .is_some()
    }

    /// If `[start, end)` overlaps a reserved range, the end of that range.
    fn reserved_end(&self, start: u128, end: u128) -> Option<u128> {
        // Ranges are sorted and disjoint: find the first ending after start.
        let i = self
            .reserved
            .partition_point(|&(_, e)| (e as u128) <= start);
        self.reserved
            .get(i)
            .and_then(|&(s, e)| ((s as u128) < end).then_some(e as u128))
    }

    /// The quarantine entry covering `offset`'s run start, if any.
    pub fn quarantine_of(&self, offset: u64) -> Option<QuarantineEntry> {
        let local = (offset & (self.block_size() - 1)) as u32;
        self.blocks
            .get(&(offset >> self.shift))
            .and_then(|b| b.quarantine.get(&local).copied())
    }

    /// True if every unit of `run` is taken (allocated or quarantined).
    fn run_all_set(&self, run: Run) -> bool {
        if run.units == 1 {
            let local = (run.offset & (self.block_size() - 1)) as u32;
            return self
                .blocks
                .get(&(run.offset >> self.shift))
                .is_some_and(|b| b.bits.contains(local));
        }
        self.pieces(run).all(|(idx, lo, hi)| {
            self.blocks
                .get(&idx)
                .is_some_and(|b| b.bits.contains_range(lo..=hi))
        })
    }

    /// True if `run` is currently held by a claim (set and not quarantined).
    pub fn is_allocated(&self, run: Run) -> bool {
        self.run_all_set(run) && self.quarantine_of(run.offset).is_none()
    }

    /// The first taken unit in `[start, end)` and the end of the taken run
    /// it starts (exclusive), or None if the whole range is free.
    fn first_taken(&self, start: u128, end: u128) -> Option<u128> {
        let first_idx = (start >> self.shift) as u64;
        if end - start == 1 {
            // Single unit: one lookup, one probe (the allocation hot path).
            let block = self.blocks.get(&first_idx)?;
            let local = (start - ((first_idx as u128) << self.shift)) as u32;
            if !block.bits.contains(local) {
                return None;
            }
            return Some(self.taken_run_end(first_idx, block, local));
        }
        let last_idx = ((end - 1) >> self.shift) as u64;
        for &idx in self.order.range(first_idx..=last_idx) {
            let Some(block) = self.blocks.get(&idx) else {
                continue;
            };
            let base = (idx as u128) << self.shift;
            let lo = start.max(base) - base;
            let hi = (end.min(base + self.block_size() as u128) - 1) - base;
            if let Some(first) = block.bits.range(lo as u32..=hi as u32).next() {
                return Some(self.taken_run_end(idx, block, first));
            }
        }
        None
    }

    /// End (exclusive, absolute) of the taken run starting at `local`, so
    /// callers skip the whole run in one step.
    fn taken_run_end(&self, idx: u64, block: &Block, local: u32) -> u128 {
        let base = (idx as u128) << self.shift;
        let run = block.bits.range(local..).next_range();
        base + run.map_or(local as u128 + 1, |r| *r.end() as u128 + 1)
    }

    /// The first aligned run of `n` free units in `[from, end)`.
    fn find_free(&self, from: u128, end: u128, n: u64) -> Option<u64> {
        let mut p = align_up(from, n);
        while p + n as u128 <= end {
            let q = p + n as u128;
            if let Some(r_end) = self.reserved_end(p, q) {
                p = align_up(r_end, n);
                continue;
            }
            match self.first_taken(p, q) {
                None => return Some(p as u64),
                Some(taken_end) => p = align_up(taken_end, n),
            }
        }
        None
    }

    /// Searches `[start, size)` then wraps to `[0, start)`.
    fn find_free_wrapping(&self, start: u64, n: u64) -> Option<u64> {
        let size = self.space.size();
        self.find_free(start as u128, size, n)
            .or_else(|| self.find_free(0, (start as u128 + n as u128 - 1).min(size), n))
    }

    fn choose(&mut self, n: u64) -> Option<u64> {
        match self.strategy {
            Strategy::Lowest => {
                let found = self.find_free(self.hint as u128, self.space.size(), n);
                if let (Some(p), 1) = (found, n) {
                    // Everything between the old hint and p is taken: skip it next time.
                    self.hint = p;
                }
                found
            }
            Strategy::Next => self.find_free_wrapping(self.cursor, n),
            Strategy::Random => {
                let size = self.space.size();
                let slots = size / n as u128;
                if slots == 0 {
                    return None;
                }
                let slot = if slots > u64::MAX as u128 {
                    self.rng.random::<u64>() as u128
                } else {
                    self.rng.random_range(0..slots as u64) as u128
                };
                self.find_free_wrapping((slot * n as u128) as u64, n)
            }
        }
    }

    // ---- mutations ----------------------------------------------------

    /// Sets (or clears) every unit of `run`; the caller checked it is free
    /// (or fully set).
    fn write_run(&mut self, run: Run, set: bool) {
        for (idx, lo, hi) in self.pieces(run) {
            self.touch(idx);
            if set {
                let block = self.blocks.entry(idx).or_insert_with(|| {
                    self.order.insert(idx);
                    Block::default()
                });
                if lo == hi {
                    block.bits.insert(lo);
                } else {
                    block.bits.insert_range(lo..=hi);
                }
            } else if let Some(block) = self.blocks.get_mut(&idx) {
                if lo == hi {
                    block.bits.remove(lo);
                } else {
                    block.bits.remove_range(lo..=hi);
                }
                if block.bits.is_empty() {
                    // Empty blocks cost nothing: memory follows what is allocated.
                    self.blocks.remove(&idx);
                    self.order.remove(&idx);
                }
            }
        }
    }

    /// The parts of `run` in each block it spans: (block, first local
    /// unit, last local unit), in order.
    fn pieces(&self, run: Run) -> impl Iterator<Item = (u64, u32, u32)> {
        let (shift, size) = (self.shift, self.block_size() as u128);
        let end = run.end();
        let mut p = run.offset as u128;
        std::iter::from_fn(move || {
            if p >= end {
                return None;
            }
            let idx = (p >> shift) as u64;
            let base = (idx as u128) << shift;
            let piece_end = (base + size).min(end);
            let piece = (idx, (p - base) as u32, (piece_end - 1 - base) as u32);
            p = piece_end;
            Some(piece)
        })
    }

    fn take(&mut self, run: Run) {
        self.write_run(run, true);
        self.allocated += run.units;
        if self.strategy == Strategy::Next {
            // Wrap at the end (no modulo: u128 division is slow).
            self.cursor = if run.end() >= self.space.size() {
                0
            } else {
                run.end() as u64
            };
        }
        if run.offset == self.hint && run.units == 1 {
            self.hint = run.offset + 1;
        }
    }

    fn free_units(&mut self, run: Run) {
        self.write_run(run, false);
        if run.offset < self.hint {
            self.hint = run.offset;
        }
    }

    /// Frees quarantined runs whose time is up.
    pub fn expire(&mut self, now_ms: u64) {
        while let Some(&(until, offset)) = self.expiry.first() {
            if until > now_ms {
                break;
            }
            self.expiry.pop_first();
            let idx = offset >> self.shift;
            let local = (offset & (self.block_size() - 1)) as u32;
            self.touch(idx);
            let entry = self
                .blocks
                .get_mut(&idx)
                .and_then(|b| b.quarantine.remove(&local));
            if let Some(entry) = entry {
                self.quarantined -= entry.units;
                self.free_units(Run {
                    offset,
                    units: entry.units,
                });
            }
        }
    }

    fn exhausted(&self, requested: u64) -> CoreError {
        CoreError::Exhausted {
            requested,
            available: self.stats().free,
        }
    }

    /// Allocates one run of `units` (1 except for prefixes) by the pool's strategy.
    pub fn allocate(&mut self, units: u64, now_ms: u64) -> Result<Run> {
        self.expire(now_ms);
        self.allocate_one(units)
    }

    fn allocate_one(&mut self, units: u64) -> Result<Run> {
        if units == 1 {
            if let Some(run) = self.try_fast_single() {
                return Ok(run);
            }
        }
        let offset = self.choose(units).ok_or_else(|| self.exhausted(1))?;
        let run = Run { offset, units };
        self.take(run);
        Ok(run)
    }

    /// The hot path: where the strategy would start searching is usually
    /// free, and then one map lookup and one bitmap insert (which doubles as
    /// the probe) do the whole allocation.
    fn try_fast_single(&mut self) -> Option<Run> {
        let p = match self.strategy {
            Strategy::Lowest => self.hint,
            Strategy::Next => self.cursor,
            Strategy::Random => return None,
        };
        if p as u128 >= self.space.size() || self.reserved_end(p as u128, p as u128 + 1).is_some() {
            return None;
        }
        let idx = p >> self.shift;
        let local = (p & (self.block_size() - 1)) as u32;
        self.touch(idx);
        let block = self.blocks.entry(idx).or_insert_with(|| {
            self.order.insert(idx);
            Block::default()
        });
        if !block.bits.insert(local) {
            return None; // taken: the general search takes over
        }
        let run = Run::single(p);
        self.allocated += 1;
        match self.strategy {
            Strategy::Next => {
                self.cursor = if run.end() >= self.space.size() {
                    0
                } else {
                    p + 1
                }
            }
            _ => self.hint = p + 1,
        }
        Some(run)
    }

    /// Allocates `count` runs, all or nothing.
    pub fn allocate_many(&mut self, count: u64, units: u64, now_ms: u64) -> Result<Vec<Run>> {
        self.expire(now_ms);
        if (count as u128) * (units as u128) > self.stats().free {
            return Err(self.exhausted(count));
        }
        let (cursor, hint) = (self.cursor, self.hint);
        let mut got = Vec::with_capacity(count.min(1 << 16) as usize);
        for _ in 0..count {
            match self.allocate_one(units) {
                Ok(run) => got.push(run),
                Err(_) => {
                    // Alignment can leave free units that fit no run: undo.
                    for run in got {
                        self.allocated -= run.units;
                        self.write_run(run, false);
                    }
                    self.cursor = cursor;
                    self.hint = hint;
                    return Err(self.exhausted(count));
                }
            }
        }
        Ok(got)
    }

    /// Allocates exactly `run` if it is free.
    pub fn allocate_at(&mut self, run: Run, now_ms: u64) -> Result<()> {
        self.expire(now_ms);
        if run.end() > self.space.size() || run.units == 0 || run.offset % run.units != 0 {
            return Err(CoreError::InvalidValue(format!(
                "{} is not a valid value of this pool",
                self.space.format(run)
            )));
        }
        if self.reserved_end(run.offset as u128, run.end()).is_some() {
            return Err(CoreError::Reserved(self.space.format(run)));
        }
        if let Some(q) = self.quarantine_of(run.offset) {
            return Err(CoreError::Quarantined {
                value: self.space.format(run),
                until_ms: q.until_ms,
            });
        }
        if self.first_taken(run.offset as u128, run.end()).is_some() {
            return Err(CoreError::Taken(self.space.format(run)));
        }
        self.take(run);
        Ok(())
    }

    /// Releases an allocated run; with a quarantine it stays unavailable
    /// until `now_ms + quarantine`.
    pub fn release(&mut self, run: Run, now_ms: u64) -> Result<()> {
        self.expire(now_ms);
        if run.units == 1 && self.quarantine_ms == 0 {
            // Hot path: one lookup, and the bitmap remove doubles as the check.
            let idx = run.offset >> self.shift;
            let local = (run.offset & (self.block_size() - 1)) as u32;
            let Some(block) = self.blocks.get_mut(&idx) else {
                return Err(CoreError::NotAllocated(self.space.format(run)));
            };
            if block.quarantine.contains_key(&local) {
                return Err(CoreError::NotAllocated(self.space.format(run)));
            }
            if let Some(j) = &mut self.journal {
                // Pre-image first; on the error path below it is merely unused.
                j.blocks.entry(idx).or_insert_with(|| Some(block.clone()));
            }
            if !block.bits.remove(local) {
                return Err(CoreError::NotAllocated(self.space.format(run)));
            }
            if block.bits.is_empty() {
                self.blocks.remove(&idx);
                self.order.remove(&idx);
            }
            self.allocated -= 1;
            if run.offset < self.hint {
                self.hint = run.offset;
            }
            return Ok(());
        }
        if run.end() > self.space.size() || !self.is_allocated(run) {
            return Err(CoreError::NotAllocated(self.space.format(run)));
        }
        self.allocated -= run.units;
        if self.quarantine_ms == 0 {
            self.free_units(run);
        } else {
            let until_ms = now_ms.saturating_add(self.quarantine_ms);
            // One entry per block piece, so each block's record stays self-contained.
            let pieces: Vec<_> = self.pieces(run).collect();
            for (idx, lo, hi) in pieces {
                self.touch(idx);
                if let Some(b) = self.blocks.get_mut(&idx) {
                    b.quarantine.insert(
                        lo,
                        QuarantineEntry {
                            units: (hi - lo) as u64 + 1,
                            until_ms,
                        },
                    );
                }
                self.expiry
                    .insert((until_ms, (idx << self.shift) + lo as u64));
            }
            self.quarantined += run.units;
        }
        Ok(())
    }

    /// Allocated single-unit offsets from `from` on, in order (for listing
    /// claims that have no record of their own).
    pub fn allocated_from(&self, from: u64) -> impl Iterator<Item = u64> + '_ {
        let first_idx = from >> self.shift;
        self.order
            .range(first_idx..)
            .filter_map(|idx| self.blocks.get(idx).map(|b| (*idx, b)))
            .flat_map(move |(idx, block)| {
                let base = idx << self.shift;
                let lo = if idx == first_idx {
                    (from - base) as u32
                } else {
                    0
                };
                block
                    .bits
                    .range(lo..)
                    .map(move |l| (l, base + l as u64))
                    .filter(move |(l, _)| !block.quarantine.contains_key(l))
                    .map(|(_, o)| o)
            })
    }
}

#[cfg(test)]
mod tests;
