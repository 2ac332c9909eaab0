//! The in-memory backend: same semantics as the durable ones, no I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::apply::{apply_txn, delete_keys_txn, Applied, KvRead};
use crate::lease::{ExpiryTask, LeaseClock, LeaseHost};
use crate::watch::{
    read_ring, start_revision, watch_stream, Committed, History, Retention, BROADCAST_CAPACITY,
    DEFAULT_HISTORY_EVENTS, DEFAULT_HISTORY_REVISIONS,
};
use crate::{
    KeyValue, LeaseId, Prefixes, RangeResult, Revision, Store, StoreError, Txn, TxnResponse,
    WatchStream,
};

/// An in-memory [`Store`] for unit tests and simulation.
///
/// Cloning is cheap and every clone shares the same data. Nothing survives
/// the last clone being dropped.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.inner.lock();
        f.debug_struct("MemoryStore")
            .field("revision", &state.revision)
            .field("keys", &state.kv.len())
            .finish()
    }
}

struct Inner {
    state: Mutex<State>,
    /// Sent to while `state` is locked, so broadcast order is revision order.
    events: broadcast::Sender<Arc<Committed>>,
    expiry: ExpiryTask,
}

struct State {
    kv: BTreeMap<Vec<u8>, KeyValue>,
    revision: Revision,
    /// The oldest revision whose events are retained.
    oldest: Revision,
    /// One entry per revision in `[oldest, revision]` that wrote something.
    history: VecDeque<Arc<Committed>>,
    /// The number of events in `history`.
    history_events: u64,
    retention: Retention,
    clock: LeaseClock,
    lease_keys: HashMap<LeaseId, BTreeSet<Vec<u8>>>,
    next_lease: LeaseId,
}

impl MemoryStore {
    /// An empty store retaining the last 100,000 revisions of history, and
    /// at most 1,000,000 events of it (see [`MemoryStore::with_history_limits`]).
    pub fn new() -> Self {
        Self::with_history(DEFAULT_HISTORY_REVISIONS)
    }

    /// An empty store retaining the last `revisions` revisions of history
    /// (at least one) for watches to replay, and at most 1,000,000 events of
    /// it.
    pub fn with_history(revisions: u64) -> Self {
        Self::with_history_limits(revisions, DEFAULT_HISTORY_EVENTS)
    }

    /// An empty store retaining history for watches to replay within two
    /// bounds (each at least one): the last `revisions` revisions, and at
    /// most `events` events. Whole revisions are dropped from the oldest on:
    /// once more than `events` are retained, down to nine tenths of `events`.
    /// The newest revision is always kept, even if it alone holds more than
    /// `events` events, so that a transaction can be watched from its own
    /// revision.
    pub fn with_history_limits(revisions: u64, events: u64) -> Self {
        let retention = Retention::new(revisions, events);
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let state = State {
            kv: BTreeMap::new(),
            revision: 1,
            oldest: 1,
            history: VecDeque::new(),
            history_events: 0,
            retention,
            clock: LeaseClock::default(),
            lease_keys: HashMap::new(),
            next_lease: 1,
        };
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                events,
                expiry: ExpiryTask::default(),
            }),
        }
    }
}

impl Inner {
    /// Locks the state. Poisoning is ignored: a transaction is fully
    /// evaluated before anything is changed, so a panic cannot leave the
    /// state half-written.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks the state after expiring every lease that is due.
    fn lock_fresh(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        let mut state = self.lock();
        state.expire_due(Instant::now(), &self.events)?;
        Ok(state)
    }
}

impl KvRead for BTreeMap<Vec<u8>, KeyValue> {
    fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        Ok(BTreeMap::get(self, key).cloned())
    }

    fn scan(&self, start: &[u8], end: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        Ok(scan(self, start, end).cloned().collect())
    }
}

fn scan<'a>(
    kv: &'a BTreeMap<Vec<u8>, KeyValue>,
    start: &[u8],
    end: &[u8],
) -> impl Iterator<Item = &'a KeyValue> + 'a {
    // BTreeMap::range panics on an inverted range; that is just empty here.
    let inverted = !end.is_empty() && start >= end;
    let upper = if end.is_empty() {
        Bound::Unbounded
    } else {
        Bound::Excluded(end.to_vec())
    };
    let range = (!inverted).then(|| kv.range((Bound::Included(start.to_vec()), upper)));
    range.into_iter().flatten().map(|(_, v)| v)
}

impl State {
    fn commit(&mut self, applied: Applied, events_tx: &broadcast::Sender<Arc<Committed>>) {
        let Some(revision) = applied.write_revision() else {
            return;
        };
        for change in applied.changes {
            if change.prev_lease != 0 {
                if let Some(keys) = self.lease_keys.get_mut(&change.prev_lease) {
                    keys.remove(&change.key);
                }
            }
            match change.new {
                Some(kv) => {
                    if kv.lease != 0 {
                        self.lease_keys
                            .entry(kv.lease)
                            .or_default()
                            .insert(change.key.clone());
                    }
                    self.kv.insert(change.key, kv);
                }
                None => {
                    self.kv.remove(&change.key);
                }
            }
        }
        self.revision = revision;
        let committed = Arc::new(Committed {
            revision,
            events: applied.events,
        });
        self.history.push_back(committed.clone());
        self.history_events += committed.events.len() as u64;
        self.enforce_retention();
        // No receiver is fine: nobody is watching.
        let _ = events_tx.send(committed);
    }

    /// Drops the oldest revisions that are beyond either retention bound.
    fn enforce_retention(&mut self) {
        let limit = self.retention.revisions;
        if self.revision + 1 - self.oldest > limit {
            self.drop_history_before(self.revision + 1 - limit);
        }
        let counts = self
            .history
            .iter()
            .map(|c| Ok((c.revision, c.events.len() as u64)));
        // Infallible: the counts are in memory.
        if let Ok(Some(oldest)) =
            self.retention
                .events_oldest(self.history_events, self.revision, counts)
        {
            self.drop_history_before(oldest);
        }
    }

    fn drop_history_before(&mut self, revision: Revision) {
        self.oldest = self.oldest.max(revision);
        while let Some(c) = self.history.front() {
            if c.revision >= self.oldest {
                break;
            }
            self.history_events -= c.events.len() as u64;
            self.history.pop_front();
        }
    }

    fn revoke(
        &mut self,
        id: LeaseId,
        events_tx: &broadcast::Sender<Arc<Committed>>,
    ) -> Result<(), StoreError> {
        self.clock.remove(id);
        let keys = self.lease_keys.remove(&id).unwrap_or_default();
        let applied = apply_txn(&self.kv, &delete_keys_txn(&keys), self.revision, |_| true)?;
        self.commit(applied, events_tx);
        Ok(())
    }

    fn expire_due(
        &mut self,
        now: Instant,
        events_tx: &broadcast::Sender<Arc<Committed>>,
    ) -> Result<(), StoreError> {
        if self.clock.has_due(now) {
            for id in self.clock.due(now) {
                self.revoke(id, events_tx)?;
            }
        }
        Ok(())
    }
}

impl LeaseHost for Inner {
    fn next_deadline(&self) -> Option<Instant> {
        self.lock().clock.next_deadline()
    }

    fn expire_due(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        if let Err(err) = self.lock().expire_due(Instant::now(), &self.events) {
            tracing::warn!(%err, "expiring leases failed");
        }
        std::future::ready(())
    }

    fn expiry(&self) -> &ExpiryTask {
        &self.expiry
    }
}

impl History for Inner {
    fn bounds(&self) -> Result<(Revision, Revision), StoreError> {
        let state = self.lock();
        Ok((state.oldest, state.revision))
    }

    fn read(
        &self,
        from: Revision,
        to: Revision,
        max: usize,
        max_events: usize,
    ) -> Result<Vec<Arc<Committed>>, StoreError> {
        let state = self.lock();
        read_ring(&state.history, state.oldest, from, to, max, max_events)
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.inner.lock_fresh()?.kv.get(key).cloned())
    }

    async fn range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<RangeResult, StoreError> {
        let state = self.inner.lock_fresh()?;
        let limit = if limit == 0 { usize::MAX } else { limit };
        let mut iter = scan(&state.kv, start, end);
        let kvs: Vec<KeyValue> = iter.by_ref().take(limit).cloned().collect();
        let more = iter.next().is_some();
        Ok(RangeResult {
            kvs,
            more,
            revision: state.revision,
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let now = Instant::now();
        let mut state = self.inner.lock_fresh()?;
        let applied = apply_txn(&state.kv, &txn, state.revision, |id| {
            state.clock.is_alive(id, now)
        })?;
        let response = applied.response.clone();
        state.commit(applied, &self.inner.events);
        Ok(response)
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        Ok(self.inner.lock_fresh()?.revision)
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("lease TTL must be positive".into()));
        }
        let id = {
            let mut state = self.inner.lock_fresh()?;
            let id = state.next_lease;
            state.next_lease += 1;
            state.clock.insert(id, ttl, Instant::now());
            id
        };
        ExpiryTask::ensure_running(&self.inner);
        Ok(id)
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let mut state = self.inner.lock_fresh()?;
        state
            .clock
            .renew(lease, Instant::now())
            .ok_or(StoreError::LeaseNotFound(lease))
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut state = self.inner.lock_fresh()?;
        if !state.clock.contains(lease) {
            return Err(StoreError::LeaseNotFound(lease));
        }
        state.revoke(lease, &self.inner.events)
    }

    async fn watch_prefixes(
        &self,
        prefixes: &Prefixes,
        from: Revision,
    ) -> Result<WatchStream, StoreError> {
        let state = self.inner.lock_fresh()?;
        // Subscribing under the lock: no revision can commit in between.
        let rx = self.inner.events.subscribe();
        let start = start_revision(from, state.oldest, state.revision)?;
        let current = state.revision;
        drop(state);
        Ok(watch_stream(
            Arc::downgrade(&self.inner),
            rx,
            prefixes,
            start,
            current,
        ))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut state = self.inner.lock_fresh()?;
        if revision > state.revision {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current: state.revision,
            });
        }
        state.drop_history_before(revision);
        Ok(())
    }

    /// Writes are applied at the call, in call order.
    fn keeps_write_order(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Op;

    #[tokio::test]
    async fn replay_reads_stop_at_a_revision_after_enough_events() {
        let s = MemoryStore::new();
        for i in 0..4 {
            let txn = Txn::new()
                .then(Op::put(format!("a{i}"), "v"))
                .then(Op::put(format!("b{i}"), "v"));
            s.txn(txn).await.unwrap();
        }
        let read = |max, max_events| -> Vec<(Revision, usize)> {
            s.inner
                .read(2, 5, max, max_events)
                .unwrap()
                .iter()
                .map(|c| (c.revision, c.events.len()))
                .collect()
        };
        assert_eq!(read(512, 100), vec![(2, 2), (3, 2), (4, 2), (5, 2)]);
        assert_eq!(read(2, 100), vec![(2, 2), (3, 2)]);
        assert_eq!(read(512, 3), vec![(2, 2), (3, 2)]);
        assert_eq!(read(512, 1), vec![(2, 2)]);
    }
}
