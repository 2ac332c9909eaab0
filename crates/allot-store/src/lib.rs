//! The store: allot's only seam to persistence.
//!
//! The model is etcd's, because it is the proven minimal set for coordination:
//! a flat ordered key/value space where every write gets a store-wide
//! **revision**, atomic **transactions** guarded by compares over several
//! keys, **leases** with a TTL that delete their keys on expiry, and a
//! **watch** that streams every change from a given revision so a client can
//! resume after a disconnect without loss.
//!
//! Backends (this crate: [`MemoryStore`] for tests and simulation,
//! [`RedbStore`] as the embedded default, [`LogStore`] a log-structured
//! embedded one: one sequential append per commit) may batch work internally
//! (the durable ones share one fsync between concurrent transactions: group
//! commit),
//! but never weaken these semantics. The conformance suite
//! (`conformance`, behind the feature of that name) runs unchanged against
//! every backend, including those in other crates; [`backend`] holds the
//! transaction evaluation they share.
//!
//! ```
//! use allot_store::{MemoryStore, Store, Txn, Compare, Op};
//! # tokio_test_block_on(async {
//! let store = MemoryStore::new();
//! // create-if-absent: the compare guards against a concurrent writer
//! let resp = store
//!     .txn(Txn::new()
//!         .when(Compare::absent(b"pools/a"))
//!         .then(Op::put(b"pools/a", b"{}")))
//!     .await
//!     .unwrap();
//! assert!(resp.succeeded);
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
//! # }
//! ```

mod apply;
mod codec;
mod committer;
#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
mod lease;
mod log_store;
mod memory;
mod redb_store;
mod types;
mod watch;

pub use error::StoreError;

/// Building blocks for backends outside this crate, so that every backend
/// evaluates transactions with the same code: compares first, then the
/// operations on a private overlay of the transaction's own writes, one
/// revision per writing transaction. A backend supplies a [`backend::KvRead`]
/// view of its committed keys and persists the resulting
/// [`backend::Applied::changes`] and events.
pub mod backend {
    pub use crate::apply::{apply_txn, delete_keys_txn, in_range, Applied, Change, Head, KvRead};
}
pub use log_store::{LogOptions, LogStore, Recovery, TornTail};
pub use memory::MemoryStore;
pub use redb_store::{RedbOptions, RedbStore};
pub use types::*;

use async_trait::async_trait;
use futures::stream::BoxStream;

/// A stream of watch events, in revision order. It ends with an error (for
/// example [`StoreError::Compacted`] or [`StoreError::Unavailable`]); the
/// consumer resumes by watching again from the revision after the last event
/// it processed.
pub type WatchStream = BoxStream<'static, Result<Event, StoreError>>;

/// The store contract every backend implements.
///
/// Semantics (checked by the conformance suite):
/// - Revisions start at 1 for an empty store and grow by exactly one for each
///   transaction that writes something (a put or an actual delete); every key
///   written by that transaction gets that revision as `mod_revision`.
/// - A transaction is atomic and serializable: its compares are evaluated and
///   its operations applied as if no other transaction ran in between.
/// - Keys attached to a lease are deleted, in one revision, when the lease
///   expires or is revoked.
/// - `watch(prefix, from)` yields every event with `revision >= from` on keys
///   under `prefix`, in order, with no gap; if `from` is older than the oldest
///   retained revision it fails with [`StoreError::Compacted`].
///   `watch_prefixes` does the same for keys under any of several prefixes.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError>;

    /// Reads keys in `[start, end)` in key order, at most `limit` of them
    /// (0 = no limit), from one consistent snapshot.
    async fn range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<RangeResult, StoreError>;

    /// Applies a transaction atomically: if every compare holds, the `success`
    /// operations run, otherwise the `failure` operations do.
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError>;

    /// The store's current revision (the revision of the last write).
    async fn current_revision(&self) -> Result<Revision, StoreError>;

    /// Grants a lease that expires after `ttl` unless kept alive.
    async fn lease_grant(&self, ttl: std::time::Duration) -> Result<LeaseId, StoreError>;

    /// Renews a lease for its full TTL; fails with [`StoreError::LeaseNotFound`]
    /// if it already expired.
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<std::time::Duration, StoreError>;

    /// Revokes a lease now, deleting its keys.
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Streams changes to keys under `prefix` from revision `from` on
    /// (`from = 0` means "from now": only future changes).
    async fn watch(&self, prefix: &[u8], from: Revision) -> Result<WatchStream, StoreError> {
        self.watch_prefixes(&Prefixes::one(prefix), from).await
    }

    /// [`Store::watch`] over several prefixes at once: one stream, in
    /// revision order, of the changes to keys under any of them (two
    /// watches could not be merged in order without knowing when each has
    /// passed a revision).
    async fn watch_prefixes(
        &self,
        prefixes: &Prefixes,
        from: Revision,
    ) -> Result<WatchStream, StoreError>;

    /// The changes under any of `prefixes`, each prefix's in revision order
    /// but not ordered across prefixes: for a follower that handles each
    /// prefix on its own. A backend serves it as cheaply as it can; by
    /// default it is [`Store::watch_prefixes`] (one ordered stream, which
    /// PostgreSQL and the embedded stores serve with one reader). etcd, whose
    /// ordered watch of several prefixes is one watch of the range covering
    /// them all, watches each prefix instead, so records in between are not
    /// shipped. A backend may deliver the changes made through this very
    /// store handle later than others' (PostgreSQL: with the next change by
    /// another process, or within its poll interval): a follower has no use
    /// for its own. As for every watch, a stream that cannot go on yields an
    /// error before it ends (etcd's per-prefix streams each do), so a
    /// follower that watches again on an error misses no prefix.
    async fn watch_each(
        &self,
        prefixes: &Prefixes,
        from: Revision,
    ) -> Result<WatchStream, StoreError> {
        self.watch_prefixes(prefixes, from).await
    }

    /// Discards history older than `revision`; watches from before it fail
    /// with [`StoreError::Compacted`]. Current values are never affected.
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;

    /// Whether writing transactions started one after the other (each
    /// polled once before the next starts) commit in that order, so a
    /// writer may send a transaction that assumes the one before it
    /// commits without waiting for its answer. A hint for throughput only:
    /// a transaction that overtakes the one it assumed fails its compares.
    /// False unless a backend queues writes in call order.
    fn keeps_write_order(&self) -> bool {
        false
    }

    /// Whether other processes may write to this store too (a database
    /// server such as PostgreSQL or etcd), so an engine on it must follow
    /// their writes. False for a store one process holds alone.
    fn is_shared(&self) -> bool {
        false
    }
}

/// The exclusive end of the key range holding every key that starts with
/// `prefix` (etcd's "range end" convention).
///
/// ```
/// assert_eq!(allot_store::prefix_end(b"ab"), b"ac".to_vec());
/// assert_eq!(allot_store::prefix_end(b"a\xff"), b"b".to_vec());
/// ```
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff (or the prefix was empty): the range is unbounded.
    Vec::new()
}
