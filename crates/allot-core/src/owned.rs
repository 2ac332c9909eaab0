//! A block a member owns: allocation in the member's own memory, with no
//! store round trip and no lock shared with other blocks.
//!
//! Shared pools keep each block as a roaring bitmap ([`Block`]), which is
//! compact but costs a container search per allocation. An owned block is hot
//! (a member allocates from it at call rate) and there are few of them per
//! member, so it is kept as a dense bitset instead: taking the next free value
//! is a scan for a word that is not all ones, then `trailing_ones`. A block of
//! 65,536 values costs 8 KiB. It converts to and from [`Block`] for
//! persistence (`sync` durability) and takeover.
//!
//! Values are handed out next-fit: the scan resumes where the last one ended
//! and wraps, so a released value is not reused at once.
//!
//! ```
//! use allot_core::owned::OwnedBlock;
//! // Block 0 of size 64 in a pool of 100 values, offset 0 reserved.
//! let mut b = OwnedBlock::new(0, 64, 100, &[(0, 1)]).unwrap();
//! assert_eq!(b.allocate(), Some(1));
//! assert_eq!(b.allocate(), Some(2));
//! b.release(1).unwrap();
//! assert_eq!(b.allocate(), Some(3)); // next-fit: 1 is not reused at once
//! assert_eq!((b.allocated(), b.free()), (2, 61));
//! ```

use crate::block::Block;
use crate::error::{CoreError, Result};

/// The in-memory state of one owned block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedBlock {
    index: u64,
    /// First offset of the block.
    base: u64,
    /// Values of the block inside the pool (the last block may be partial).
    units: u64,
    /// One bit per value: set = not free (allocated, reserved or beyond the
    /// pool's end).
    words: Vec<u64>,
    /// Reserved offset ranges `[start, end)` within this block, absolute.
    reserved: Vec<(u64, u64)>,
    allocated: u64,
    reserved_units: u64,
    /// Bit where the next scan starts (next-fit).
    cursor: usize,
}

impl OwnedBlock {
    /// An empty block `index` of a pool of `pool_size` values cut into
    /// blocks of `block_size` (a power of two), with the pool's merged
    /// `reserved` offset ranges `[start, end)`.
    pub fn new(
        index: u64,
        block_size: u64,
        pool_size: u128,
        reserved: &[(u64, u64)],
    ) -> Result<Self> {
        if !block_size.is_power_of_two() || block_size > crate::MAX_BLOCK_SIZE {
            return Err(CoreError::InvalidSpec(format!(
                "block size {block_size} is not a power of two up to 2^32"
            )));
        }
        let base = index
            .checked_mul(block_size)
            .filter(|&b| u128::from(b) < pool_size)
            .ok_or_else(|| CoreError::InvalidValue(format!("block {index} is outside the pool")))?;
        let units = (pool_size - u128::from(base)).min(u128::from(block_size)) as u64;
        let nwords = block_size.div_ceil(64) as usize;
        let mut block = OwnedBlock {
            index,
            base,
            units,
            words: vec![0; nwords],
            reserved: Vec::new(),
            allocated: 0,
            reserved_units: 0,
            cursor: 0,
        };
        // Past the pool's end, and the last word's padding: never free.
        for local in units..(nwords as u64 * 64) {
            block.set(local);
        }
        let end = base + units;
        for &(s, e) in reserved {
            let (s, e) = (s.max(base), e.min(end));
            if s < e {
                block.reserved.push((s, e));
                block.reserved_units += e - s;
                for off in s..e {
                    block.set(off - base);
                }
            }
        }
        Ok(block)
    }

    /// The block rebuilt from the values still in use (`offsets`, absolute),
    /// as a new owner learns them from storage or from the application.
    /// Offsets outside the block or reserved are refused: trusting them
    /// could hide a value that is in use.
    pub fn with_in_use(
        index: u64,
        block_size: u64,
        pool_size: u128,
        reserved: &[(u64, u64)],
        offsets: impl IntoIterator<Item = u64>,
    ) -> Result<Self> {
        let mut block = Self::new(index, block_size, pool_size, reserved)?;
        for off in offsets {
            block.mark(off)?;
        }
        Ok(block)
    }

    /// The block from its stored form (values in quarantine count as in use).
    pub fn from_block(
        index: u64,
        block_size: u64,
        pool_size: u128,
        reserved: &[(u64, u64)],
        stored: &Block,
    ) -> Result<Self> {
        let base = index.saturating_mul(block_size);
        Self::with_in_use(
            index,
            block_size,
            pool_size,
            reserved,
            stored.bits.iter().map(|l| base + u64::from(l)),
        )
    }

    /// The stored form: a bitmap of the allocated values (reserved values and
    /// the pool's end are implied by the pool's definition, not stored).
    pub fn to_block(&self) -> Block {
        let mut block = Block::default();
        for (w, &word) in self.words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let local = w as u64 * 64 + bit;
                if local < self.units && !self.is_reserved(self.base + local) {
                    block.bits.insert(local as u32);
                }
            }
        }
        block
    }

    /// The block's index in its pool.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The absolute offsets `[start, end)` this block covers in the pool.
    pub fn range(&self) -> (u64, u64) {
        (self.base, self.base + self.units)
    }

    /// Values allocated now.
    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    /// Values that can still be allocated.
    pub fn free(&self) -> u64 {
        self.units - self.reserved_units - self.allocated
    }

    /// Whether `offset` is allocated from this block.
    pub fn is_allocated(&self, offset: u64) -> bool {
        offset
            .checked_sub(self.base)
            .filter(|&l| l < self.units)
            .is_some_and(|l| self.get(l) && !self.is_reserved(offset))
    }

    /// Takes the next free value (next-fit); `None` when the block is full.
    #[inline]
    pub fn allocate(&mut self) -> Option<u64> {
        if self.free() == 0 {
            return None;
        }
        let n = self.words.len();
        let mut w = self.cursor / 64;
        // Only bits at or after the cursor in its word on the first pass;
        // the lap ends back on that word with every bit considered.
        let mut mask = u64::MAX << (self.cursor % 64);
        for _ in 0..=n {
            let avail = !self.words[w] & mask;
            if avail != 0 {
                let bit = avail.trailing_zeros() as usize;
                self.words[w] |= 1 << bit;
                self.allocated += 1;
                let local = w * 64 + bit;
                self.cursor = (local + 1) % (n * 64);
                return Some(self.base + local as u64);
            }
            w += 1;
            if w == n {
                w = 0;
            }
            mask = u64::MAX;
        }
        None
    }

    /// Marks `offset` as allocated (a value known to be in use).
    pub fn mark(&mut self, offset: u64) -> Result<()> {
        let local = self.local(offset)?;
        if self.is_reserved(offset) {
            return Err(CoreError::Reserved(format!("offset {offset}")));
        }
        if self.get(local) {
            return Err(CoreError::Taken(format!("offset {offset}")));
        }
        self.set(local);
        self.allocated += 1;
        Ok(())
    }

    /// Frees `offset`.
    pub fn release(&mut self, offset: u64) -> Result<()> {
        let local = self.local(offset)?;
        if self.is_reserved(offset) || !self.get(local) {
            return Err(CoreError::NotAllocated(format!("offset {offset}")));
        }
        self.words[(local / 64) as usize] &= !(1 << (local % 64));
        self.allocated -= 1;
        Ok(())
    }

    fn local(&self, offset: u64) -> Result<u64> {
        offset
            .checked_sub(self.base)
            .filter(|&l| l < self.units)
            .ok_or_else(|| {
                CoreError::InvalidValue(format!(
                    "offset {offset} is not in block {} ({}..{})",
                    self.index,
                    self.base,
                    self.base + self.units
                ))
            })
    }

    fn is_reserved(&self, offset: u64) -> bool {
        self.reserved
            .iter()
            .any(|&(s, e)| s <= offset && offset < e)
    }

    fn get(&self, local: u64) -> bool {
        self.words[(local / 64) as usize] & (1 << (local % 64)) != 0
    }

    fn set(&mut self, local: u64) {
        self.words[(local / 64) as usize] |= 1 << (local % 64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn partial_last_block_and_reservations() {
        // Pool of 100 values in blocks of 64: block 1 holds 36 values.
        let mut b = OwnedBlock::new(1, 64, 100, &[(60, 70), (99, 100)]).unwrap();
        assert_eq!(b.range(), (64, 100));
        assert_eq!(b.free(), 36 - 6 - 1);
        let mut got = Vec::new();
        while let Some(v) = b.allocate() {
            got.push(v);
        }
        let want: Vec<u64> = (70..99).collect();
        assert_eq!(got, want);
        assert!(b.release(65).is_err(), "reserved");
        assert!(b.release(100).is_err(), "outside");
        assert!(
            OwnedBlock::new(2, 64, 100, &[]).is_err(),
            "block past the end"
        );
        assert!(
            OwnedBlock::new(0, 48, 100, &[]).is_err(),
            "not a power of two"
        );
    }

    #[test]
    fn round_trips_through_the_stored_form() {
        let mut b = OwnedBlock::new(3, 256, 10_000, &[(800, 810)]).unwrap();
        for _ in 0..100 {
            b.allocate();
        }
        b.release(790).unwrap();
        let stored = b.to_block();
        assert_eq!(stored.bits.len(), 99);
        let back = OwnedBlock::from_block(3, 256, 10_000, &[(800, 810)], &stored).unwrap();
        assert_eq!((back.allocated(), back.free()), (b.allocated(), b.free()));
        assert!(back.is_allocated(768) && !back.is_allocated(790));
        // A stored value on a reserved offset is refused, not trusted.
        let mut bad = stored.clone();
        bad.bits.insert(805 - 768);
        assert!(OwnedBlock::from_block(3, 256, 10_000, &[(800, 810)], &bad).is_err());
    }

    proptest! {
        /// Against a set model: allocate never returns a value in use,
        /// reserved or outside; counts agree; the stored form agrees.
        #[test]
        fn matches_a_set_model(
            shift in 0u32..9,
            pool_extra in 0u64..300,
            reserved in proptest::collection::vec((0u64..600, 1u64..8), 0..4),
            ops in proptest::collection::vec((any::<bool>(), 0usize..1000), 1..400),
        ) {
            let size = 1u64 << shift;
            let pool_size = size + pool_extra;
            let mut res: Vec<(u64, u64)> = reserved.iter().map(|&(s, n)| (s, s + n)).collect();
            res.sort();
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for (s, e) in res {
                match merged.last_mut() {
                    Some(last) if s <= last.1 => last.1 = last.1.max(e),
                    _ => merged.push((s, e)),
                }
            }
            let index = if pool_extra >= size { 1 } else { 0 };
            let mut b = OwnedBlock::new(index, size, pool_size as u128, &merged).unwrap();
            let (lo, hi) = b.range();
            let is_res = |o: u64| merged.iter().any(|&(s, e)| s <= o && o < e);
            let mut held = BTreeSet::new();
            for (alloc, pick) in ops {
                if alloc || held.is_empty() {
                    match b.allocate() {
                        Some(v) => {
                            prop_assert!(v >= lo && v < hi && !is_res(v));
                            prop_assert!(held.insert(v), "{} handed out twice", v);
                        }
                        None => {
                            let free = (lo..hi).filter(|&o| !is_res(o) && !held.contains(&o)).count();
                            prop_assert_eq!(free, 0);
                        }
                    }
                } else {
                    let v = *held.iter().nth(pick % held.len()).unwrap();
                    b.release(v).unwrap();
                    held.remove(&v);
                    prop_assert!(b.release(v).is_err());
                }
                prop_assert_eq!(b.allocated(), held.len() as u64);
            }
            let stored = b.to_block();
            let from_store: BTreeSet<u64> = stored.bits.iter().map(|l| lo + u64::from(l)).collect();
            prop_assert_eq!(from_store, held);
        }
    }
}
