//! Helpers shared by the engine's integration tests (each test file that
//! says `mod support;` compiles its own copy, and uses only some of it).
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use allot_store::{
    KeyValue, LeaseId, MemoryStore, Op, Prefixes, RangeResult, Revision, Store, StoreError, Txn,
    TxnResponse, WatchStream,
};
use async_trait::async_trait;

/// A store that counts the transactions that only read, and can answer
/// writes late (committed at once, answered `answer_delay_ms` later), so
/// that batches stack on ones still committing.
pub struct Counting {
    inner: MemoryStore,
    reads: AtomicU64,
    pub answer_delay_ms: AtomicU64,
}

impl Counting {
    pub fn new() -> Arc<Counting> {
        Arc::new(Counting {
            inner: MemoryStore::new(),
            reads: AtomicU64::new(0),
            answer_delay_ms: AtomicU64::new(0),
        })
    }

    pub fn take_reads(&self) -> u64 {
        self.reads.swap(0, Ordering::SeqCst)
    }
}

#[async_trait]
impl Store for Counting {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get(key).await
    }
    async fn range(&self, s: &[u8], e: &[u8], l: usize) -> Result<RangeResult, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.range(s, e, l).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        if txn.success.iter().all(|op| matches!(op, Op::Get { .. })) {
            self.reads.fetch_add(1, Ordering::SeqCst);
            return self.inner.txn(txn).await;
        }
        let answer = self.inner.txn(txn).await;
        let delay = self.answer_delay_ms.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        answer
    }
    async fn current_revision(&self) -> Result<Revision, StoreError> {
        self.inner.current_revision().await
    }
    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.inner.lease_grant(ttl).await
    }
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.inner.lease_keep_alive(lease).await
    }
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.lease_revoke(lease).await
    }
    async fn watch_prefixes(
        &self,
        prefixes: &Prefixes,
        from: Revision,
    ) -> Result<WatchStream, StoreError> {
        // Stores may record history of these only (PostgreSQL does).
        for prefix in prefixes.iter() {
            assert!(
                allot::keys::WATCHED_PREFIXES
                    .iter()
                    .any(|w| prefix.starts_with(w)),
                "the engine watches {:?}, outside allot::keys::WATCHED_PREFIXES",
                String::from_utf8_lossy(prefix)
            );
        }
        self.inner.watch_prefixes(prefixes, from).await
    }
    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.inner.compact(revision).await
    }
    fn keeps_write_order(&self) -> bool {
        self.inner.keeps_write_order()
    }
}
