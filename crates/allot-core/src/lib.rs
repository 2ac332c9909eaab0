//! allot-core: the pure heart of allot — value spaces, block bitmaps,
//! allocation strategies. No I/O and no clocks: time comes in as an argument,
//! randomness from a seeded generator, so every behaviour can be
//! property-tested and simulated deterministically.

pub mod block;
pub mod error;
pub mod owned;
pub mod owned_set;
pub mod pool;
pub mod space;

pub use block::{Block, QuarantineEntry, DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE};
pub use error::CoreError;
pub use owned::OwnedBlock;
pub use owned_set::{Batch, CommitLog, OwnedBlocks, ALLOCATOR_BATCH};
pub use pool::{Durability, PoolSpec, PoolState, PoolStats, Strategy};
pub use space::{parse_cidr, PoolKind, Run, ValueSpace, MAX_POOL_SIZE};
