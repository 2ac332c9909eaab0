//! Following other writers: when several engines share one store (several
//! `allot serve` processes on PostgreSQL or etcd), each keeps its cached
//! pools current from a store watch, so answers served from the cache
//! (`pool show`, metrics) reflect the others' claims.
//!
//! Correctness never depends on this: every write is compare-guarded and
//! every refusal re-verified, so a stale cache can only cost a retry. What
//! the follower adds is freshness: a block another engine wrote is marked
//! for re-reading, and re-read before the next answer that uses the cache.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt;

use allot_store::{Event as StoreEvent, Prefixes, Store};

use crate::{keys, lock, Allot, Inner};

/// Longest pause between attempts to watch a store that keeps failing.
const MAX_RETRY: Duration = Duration::from_secs(5);

impl Allot {
    /// Keeps this engine's cached pools current with what other engines
    /// write to the same store, and lets it take turns with them on a pool
    /// they all write ([`crate::turns`]). An engine made inside a tokio
    /// runtime on a store that says it is shared ([`allot_store::Store::is_shared`])
    /// already does; call it for one made outside a runtime, or for a store
    /// shared some other way. Calling it again starts over. An engine alone
    /// on its store (the embedded default) does not need it. Spawns a task on
    /// the current tokio runtime that ends with the engine.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let store = std::sync::Arc::new(allot_store::MemoryStore::new());
    /// let engine = allot::Allot::new(store);
    /// engine.follow_other_writers();
    /// # });
    /// ```
    pub fn follow_other_writers(&self) {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        *lock(&self.inner.follower_stop) = Some(stop_tx);
        let weak = Arc::downgrade(&self.inner);
        let store = self.inner.store.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = follow(weak, store) => {}
                // The engine is gone (its sender dropped) or follows anew.
                _ = stop_rx => {}
            }
        });
    }
}

async fn follow(weak: Weak<Inner>, store: Arc<dyn Store>) {
    let mut delay = Duration::from_millis(100);
    loop {
        // Watches start "from now"; everything before is covered by
        // re-reading every cached pool, so no change can fall in between.
        let prefixes = Prefixes::new([keys::BLOCKS_PREFIX, keys::POOLS_PREFIX, keys::TURNS_PREFIX]);
        let mut events = match store.watch_each(&prefixes, 0).await {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!("following other writers: {e}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RETRY);
                continue;
            }
        };
        match weak.upgrade() {
            Some(inner) => inner.distrust_all_cached().await,
            None => return,
        }
        delay = Duration::from_millis(100);
        while let Some(event) = events.next().await {
            let Some(inner) = weak.upgrade() else { return };
            match event {
                Ok(event) => inner.note_write(&event).await,
                Err(e) => {
                    tracing::warn!("following other writers: {e}; watching again");
                    break;
                }
            }
        }
    }
}

impl Inner {
    /// Marks every cached pool for a full re-read before its next use.
    async fn distrust_all_cached(&self) {
        let handles: Vec<_> = lock(&self.pools).values().cloned().collect();
        for handle in handles {
            handle.state.lock().await.distrust();
        }
    }

    /// Takes note of a write that may be another engine's.
    async fn note_write(&self, event: &StoreEvent) {
        let key = &event.kv.key;
        if let Some((pool, idx)) = keys::parse_block(key) {
            let handle = lock(&self.pools).get(pool).cloned();
            if let Some(handle) = handle {
                handle
                    .state
                    .lock()
                    .await
                    .note_block_write(idx, event.kv.mod_revision);
            }
        } else if let Some(pool) = keys::parse_turn(key) {
            self.note_turn(pool, event);
        } else if let Some(pool) = key
            .strip_prefix(keys::POOLS_PREFIX)
            .and_then(|n| std::str::from_utf8(n).ok())
        {
            // A pool deleted, or re-created with another definition, by
            // someone else: load it anew on next use.
            let mut pools = lock(&self.pools);
            // A change older than what we loaded (our own delete and
            // re-create, say, which a lazy watch brings late) is not news.
            let ours = pools
                .get(pool)
                .is_some_and(|h| h.record_rev >= event.kv.mod_revision);
            if !ours {
                pools.remove(pool);
            }
        }
    }
}
