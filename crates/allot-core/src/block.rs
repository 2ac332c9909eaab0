//! Blocks: a pool's offsets cut into fixed power-of-two ranges. A block is
//! the unit of persistence (and, later, of ownership and takeover). Its
//! allocation state is a roaring bitmap, so memory and disk grow with what is
//! allocated, never with the pool's size.

use std::collections::BTreeMap;

use roaring::RoaringBitmap;

use crate::error::{CoreError, Result};

/// Default block size: one roaring container, so a block costs at most 8 KiB.
pub const DEFAULT_BLOCK_SIZE: u64 = 1 << 16;
/// Largest block size: local offsets are u32.
pub const MAX_BLOCK_SIZE: u64 = 1 << 32;

/// A released run held back from reuse until `until_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuarantineEntry {
    pub units: u64,
    pub until_ms: u64,
}

/// The allocation state of one block.
///
/// `bits` holds every unit that is taken: allocated *or* in quarantine
/// (quarantined units stay set so the free search skips them for free).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Block {
    pub bits: RoaringBitmap,
    /// Quarantined runs by local start offset.
    pub quarantine: BTreeMap<u32, QuarantineEntry>,
}

const FORMAT_VERSION: u8 = 1;

impl Block {
    /// Units currently in quarantine.
    pub fn quarantined_units(&self) -> u64 {
        self.quarantine.values().map(|q| q.units).sum()
    }

    /// Serializes the block: a version byte, the roaring bitmap in its
    /// portable format, then the quarantine entries.
    pub fn encode(&self) -> Vec<u8> {
        let mut bits = self.bits.clone();
        // Run containers make long allocated stretches (sequential lowest-free
        // allocation, prefixes) a few bytes instead of 8 KiB.
        bits.optimize();
        let mut out =
            Vec::with_capacity(1 + 4 + bits.serialized_size() + 4 + self.quarantine.len() * 20);
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&(bits.serialized_size() as u32).to_le_bytes());
        // Writing into a Vec cannot fail.
        let _ = bits.serialize_into(&mut out);
        out.extend_from_slice(&(self.quarantine.len() as u32).to_le_bytes());
        for (local, q) in &self.quarantine {
            out.extend_from_slice(&local.to_le_bytes());
            out.extend_from_slice(&q.units.to_le_bytes());
            out.extend_from_slice(&q.until_ms.to_le_bytes());
        }
        out
    }

    /// Decodes what [`Block::encode`] wrote; anything else is an error, never
    /// an empty block (a corrupt block must not silently free its values).
    pub fn decode(bytes: &[u8]) -> Result<Block> {
        let corrupt = |what: &str| CoreError::Corrupt(format!("block record: {what}"));
        let (&version, rest) = bytes.split_first().ok_or_else(|| corrupt("empty"))?;
        if version != FORMAT_VERSION {
            return Err(corrupt(&format!("unknown format version {version}")));
        }
        let (len, rest) = take_u32(rest).ok_or_else(|| corrupt("truncated length"))?;
        let len = len as usize;
        if rest.len() < len {
            return Err(corrupt("truncated bitmap"));
        }
        let bits =
            RoaringBitmap::deserialize_from(&rest[..len]).map_err(|e| corrupt(&e.to_string()))?;
        let (n, mut rest) =
            take_u32(&rest[len..]).ok_or_else(|| corrupt("truncated quarantine"))?;
        let mut quarantine = BTreeMap::new();
        for _ in 0..n {
            let (local, r) = take_u32(rest).ok_or_else(|| corrupt("truncated quarantine entry"))?;
            let (units, r) = take_u64(r).ok_or_else(|| corrupt("truncated quarantine entry"))?;
            let (until_ms, r) = take_u64(r).ok_or_else(|| corrupt("truncated quarantine entry"))?;
            quarantine.insert(local, QuarantineEntry { units, until_ms });
            rest = r;
        }
        if !rest.is_empty() {
            return Err(corrupt("trailing bytes"));
        }
        Ok(Block { bits, quarantine })
    }
}

fn take_u32(b: &[u8]) -> Option<(u32, &[u8])> {
    let (head, rest) = b.split_at_checked(4)?;
    Some((u32::from_le_bytes(head.try_into().ok()?), rest))
}

fn take_u64(b: &[u8]) -> Option<(u64, &[u8])> {
    let (head, rest) = b.split_at_checked(8)?;
    Some((u64::from_le_bytes(head.try_into().ok()?), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_round_trip() {
        let mut b = Block::default();
        b.bits.insert_range(10..5000);
        b.bits.insert(60000);
        b.quarantine.insert(
            60000,
            QuarantineEntry {
                units: 1,
                until_ms: 123,
            },
        );
        let enc = b.encode();
        assert_eq!(Block::decode(&enc).unwrap(), b);
        assert!(enc.len() < 100, "runs compress: {} bytes", enc.len());
    }

    #[test]
    fn decode_rejects_garbage() {
        assert!(Block::decode(&[]).is_err());
        assert!(Block::decode(&[9, 0, 0]).is_err());
        let mut enc = Block::default().encode();
        enc.push(1);
        assert!(Block::decode(&enc).is_err());
        let enc = Block::default().encode();
        assert!(Block::decode(&enc[..enc.len() - 1]).is_err());
    }
}
