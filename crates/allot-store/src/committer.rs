//! The committer thread shared by the durable embedded backends (redb and
//! the log-structured store): the only writer of a store.
//!
//! It blocks for one request, drains whatever else is queued (up to
//! `max_batch`), applies all of it in order inside ONE batch of the backend
//! ([`Storage::commit`]) — each writing request getting its own revision,
//! exactly as if they had run one after the other — and makes the batch
//! durable once (one fsync for the whole batch). Only after that succeeds
//! does it publish the events and answer the callers; if it fails, every
//! request of the batch gets the error, nothing is published, and the
//! in-memory state is reloaded from the backend ([`Storage::load`]).
//!
//! Requests fail individually (a dead lease, an invalid key) without
//! affecting the rest of the batch, because a transaction is fully evaluated
//! before anything of it is written to the batch.
//!
//! What differs between backends is only where a batch's writes go: the
//! [`Batch`] and [`Storage`] traits. [`CommitterHandle`] is the store side:
//! it queues requests, answers the write calls of the [`crate::Store`]
//! trait, and expires leases.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{broadcast, oneshot};
use tokio::time::Instant;

use crate::apply::{apply_txn, delete_keys_txn, Applied, KvRead};
use crate::lease::{ExpiryTask, LeaseClock, LeaseHost};
use crate::watch::{Committed, Retention, BROADCAST_CAPACITY};
use crate::{KeyValue, LeaseId, Revision, StoreError, Txn, TxnResponse};

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A write, sent by a store handle to the committer.
pub(crate) enum Request {
    Txn {
        txn: Txn,
        /// The caller's clock, against which lease deadlines are judged.
        now: Instant,
        reply: Reply<TxnResponse>,
    },
    Grant {
        ttl: Duration,
        now: Instant,
        reply: Reply<LeaseId>,
    },
    /// Deletes leases and their keys. `expired_at: None` is an explicit
    /// revoke (an unknown lease is an error); `Some(now)` is expiry, which
    /// skips leases already gone or renewed since.
    Revoke {
        ids: Vec<LeaseId>,
        expired_at: Option<Instant>,
        reply: Reply<()>,
    },
    Compact {
        revision: Revision,
        reply: Reply<()>,
    },
    /// Stop after committing everything queued before this.
    Shutdown,
}

/// What a request produced, before its batch is known to be durable.
enum Outcome {
    Txn(Result<TxnResponse, StoreError>),
    Lease(Result<LeaseId, StoreError>),
    Done(Result<(), StoreError>),
}

/// Side effects held back until the batch's commit succeeds.
#[derive(Default)]
struct Effects {
    published: Vec<Arc<Committed>>,
    granted: Vec<(LeaseId, Duration, Instant)>,
    revoked: Vec<LeaseId>,
}

/// State shared between the async handles and the committer thread.
pub(crate) struct Shared {
    /// Deadlines of committed leases. The committer adds and removes leases
    /// after their commit; keep-alives only move deadlines.
    clock: Mutex<LeaseClock>,
    /// Committed revisions, sent by the committer after each commit.
    pub events: broadcast::Sender<Arc<Committed>>,
    /// Batches committed (one fsync each), for benchmarks and metrics.
    commits: AtomicU64,
}

impl Shared {
    pub fn clock(&self) -> MutexGuard<'_, LeaseClock> {
        // The clock is a plain map updated in single steps; a panic elsewhere
        // cannot leave it half-changed.
        self.clock.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The store-wide counters every batch persists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub revision: Revision,
    /// The oldest revision whose history is retained.
    pub oldest: Revision,
    /// The number of events retained in history.
    pub history_events: u64,
    pub next_lease: LeaseId,
}

impl Meta {
    /// The counters of an empty store.
    pub const EMPTY: Meta = Meta {
        revision: 1,
        oldest: 1,
        history_events: 0,
        next_lease: 1,
    };
}

struct LeaseEntry {
    ttl: Duration,
    keys: BTreeSet<Vec<u8>>,
}

/// The committer's view of the persisted state, mirrored in memory so that
/// revisions and lease bookkeeping need no reads. Rebuilt from the backend
/// after a failed commit.
pub(crate) struct CommitState {
    meta: Meta,
    leases: HashMap<LeaseId, LeaseEntry>,
}

impl CommitState {
    /// The state given the persisted counters and leases; keys are attached
    /// to their leases with [`CommitState::attach`], then the whole is
    /// checked by [`CommitState::checked`].
    pub fn new(meta: Meta, leases: impl IntoIterator<Item = (LeaseId, Duration)>) -> Self {
        let leases = leases
            .into_iter()
            .map(|(id, ttl)| {
                let keys = BTreeSet::new();
                (id, LeaseEntry { ttl, keys })
            })
            .collect();
        Self { meta, leases }
    }

    /// Records that `key` is attached to `lease` (0: none).
    pub fn attach(&mut self, key: &[u8], lease: LeaseId) -> Result<(), StoreError> {
        if lease == 0 {
            return Ok(());
        }
        let entry = self.leases.get_mut(&lease).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "key {:?} is attached to lease {lease}, which does not exist",
                String::from_utf8_lossy(key)
            ))
        })?;
        entry.keys.insert(key.to_vec());
        Ok(())
    }

    /// The state if its counters agree with each other.
    pub fn checked(self) -> Result<Self, StoreError> {
        let Meta {
            revision,
            oldest,
            next_lease,
            ..
        } = self.meta;
        if oldest == 0 || oldest > revision + 1 || next_lease == 0 {
            return Err(StoreError::Corrupt(format!(
                "inconsistent meta: revision {revision}, oldest {oldest}, next lease {next_lease}"
            )));
        }
        Ok(self)
    }

    /// Every persisted lease with its TTL.
    pub fn lease_ttls(&self) -> Vec<(LeaseId, Duration)> {
        self.leases.iter().map(|(&id, e)| (id, e.ttl)).collect()
    }
}

/// The writes of one batch, as a backend stages them until
/// [`Storage::commit`] makes them durable.
pub(crate) trait Batch {
    /// The committed keys with this batch's writes applied.
    fn kv(&self) -> &dyn KvRead;
    /// Writes a key's new record.
    fn put(&mut self, kv: KeyValue) -> Result<(), StoreError>;
    /// Deletes a key.
    fn delete(&mut self, key: Vec<u8>) -> Result<(), StoreError>;
    /// Appends one revision's events to the watch history.
    fn append_history(&mut self, committed: &Arc<Committed>) -> Result<(), StoreError>;
    /// Records a granted lease with its TTL in milliseconds.
    fn grant(&mut self, id: LeaseId, ttl_ms: u64) -> Result<(), StoreError>;
    /// Forgets a lease (its keys are deleted by the same batch).
    fn revoke(&mut self, id: LeaseId) -> Result<(), StoreError>;
    /// `(revision, events)` of the retained revisions in `[from, to)`, in
    /// revision order; a revision may come in several consecutive pieces.
    /// Read lazily: retention stops reading once it has enough.
    fn event_counts(&self, from: Revision, to: Revision) -> Result<EventCounts<'_>, StoreError>;
    /// Drops the history of revisions in `[from, before)`, returning how many
    /// events it held.
    fn drop_history(&mut self, from: Revision, before: Revision) -> Result<u64, StoreError>;
    /// Persists the counters with the batch; called only when they changed.
    fn set_meta(&mut self, meta: &Meta) -> Result<(), StoreError>;
}

/// What [`Batch::event_counts`] returns.
pub(crate) type EventCounts<'a> =
    Box<dyn Iterator<Item = Result<(Revision, u64), StoreError>> + 'a>;

/// A durable backend, as the committer thread drives it.
pub(crate) trait Storage: Send + 'static {
    /// Runs `fill` over a new batch, then makes what it staged durable and
    /// visible to readers, in one go (one fsync). On `Err`, nothing of the
    /// batch is durable or visible.
    fn commit<R>(
        &mut self,
        fill: impl FnOnce(&mut dyn Batch) -> Result<R, StoreError>,
    ) -> Result<R, StoreError>;
    /// The committed state, to go on from after a failed commit.
    fn load(&mut self) -> Result<CommitState, StoreError>;
}

struct Committer<S> {
    storage: S,
    shared: Arc<Shared>,
    state: CommitState,
    rx: mpsc::Receiver<Request>,
    retention: Retention,
    /// History is dropped for the revision bound once this many revisions
    /// beyond it piled up, so that auto-compaction costs one range delete
    /// per chunk rather than one delete per write. (The event bound has its
    /// own hysteresis, [`Retention::events_low_water`].)
    compaction_chunk: u64,
    max_batch: usize,
    /// Set when the state could not be reloaded after a failed commit:
    /// writing on would risk inconsistency, so every write fails.
    broken: Option<String>,
}

impl<S: Storage> Committer<S> {
    /// Serves requests until a shutdown request or until every sender is gone.
    fn run(mut self) {
        let mut stop = false;
        while !stop {
            let Ok(first) = self.rx.recv() else {
                break;
            };
            let mut batch = Vec::new();
            let mut next = Some(first);
            while let Some(request) = next.take() {
                if matches!(request, Request::Shutdown) {
                    stop = true;
                    break;
                }
                batch.push(request);
                if batch.len() < self.max_batch {
                    next = self.rx.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                self.process(batch);
            }
        }
    }

    fn process(&mut self, batch: Vec<Request>) {
        if let Some(reason) = &self.broken {
            let reason = reason.clone();
            respond_all(batch, || StoreError::Unavailable(reason.clone()));
            return;
        }
        let mut effects = Effects::default();
        let mut applier = Applier {
            state: &mut self.state,
            shared: &self.shared,
            retention: self.retention,
            compaction_chunk: self.compaction_chunk,
            effects: &mut effects,
        };
        let result = self.storage.commit(|b| applier.apply_all(&batch, b));
        match result {
            Ok(outcomes) => {
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                {
                    let mut clock = self.shared.clock();
                    for &(id, ttl, now) in &effects.granted {
                        clock.insert(id, ttl, now);
                    }
                    for id in &effects.revoked {
                        clock.remove(*id);
                    }
                }
                for committed in effects.published {
                    // No receiver is fine: nobody is watching.
                    let _ = self.shared.events.send(committed);
                }
                respond(batch, outcomes);
            }
            Err(err) => {
                tracing::error!(%err, requests = batch.len(), "store commit failed");
                let detail = err.to_string();
                respond_all(batch, || match &err {
                    StoreError::Corrupt(d) => StoreError::Corrupt(d.clone()),
                    _ => StoreError::Backend(format!("commit failed: {detail}")),
                });
                self.reload();
            }
        }
    }

    /// Brings the in-memory state back in line with the backend after a
    /// failed commit left it ahead.
    fn reload(&mut self) {
        match self.storage.load() {
            Ok(state) => {
                let now = Instant::now();
                let mut clock = self.shared.clock();
                for id in clock.ids() {
                    if !state.leases.contains_key(&id) {
                        clock.remove(id);
                    }
                }
                for (id, ttl) in state.lease_ttls() {
                    if !clock.contains(id) {
                        clock.insert(id, ttl, now);
                    }
                }
                self.state = state;
            }
            Err(err) => {
                tracing::error!(%err, "store state could not be reloaded; refusing writes");
                self.broken = Some(format!("store state could not be reloaded: {err}"));
            }
        }
    }
}

/// Applies the requests of one batch: the part of the committer that runs
/// inside [`Storage::commit`].
struct Applier<'a> {
    state: &'a mut CommitState,
    shared: &'a Shared,
    retention: Retention,
    compaction_chunk: u64,
    effects: &'a mut Effects,
}

impl Applier<'_> {
    fn apply_all(
        &mut self,
        batch: &[Request],
        b: &mut dyn Batch,
    ) -> Result<Vec<Outcome>, StoreError> {
        let before = self.state.meta;
        let mut outcomes = Vec::with_capacity(batch.len());
        for request in batch {
            outcomes.push(self.apply(request, b)?);
        }
        if before != self.state.meta {
            b.set_meta(&self.state.meta)?;
        }
        Ok(outcomes)
    }

    /// Applies one request. `Err` is a storage failure that dooms the whole
    /// batch; a failure of the request alone is inside the [`Outcome`].
    fn apply(&mut self, request: &Request, b: &mut dyn Batch) -> Result<Outcome, StoreError> {
        match request {
            Request::Txn { txn, now, .. } => {
                let leases = &self.state.leases;
                let shared = self.shared;
                // A lease granted earlier in this batch is not on the clock
                // yet, and is alive.
                let alive = |id| {
                    leases.contains_key(&id) && shared.clock().deadline(id).is_none_or(|d| d > *now)
                };
                match apply_txn(b.kv(), txn, self.state.meta.revision, alive) {
                    Ok(applied) => {
                        let response = applied.response.clone();
                        self.write(applied, b)?;
                        Ok(Outcome::Txn(Ok(response)))
                    }
                    Err(err) => Ok(Outcome::Txn(Err(err))),
                }
            }
            Request::Grant { ttl, now, .. } => {
                let id = self.state.meta.next_lease;
                // Stored in whole milliseconds, rounded up so a lease never
                // lives shorter than asked.
                let ttl_ms = u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
                b.grant(id, ttl_ms)?;
                let ttl = Duration::from_millis(ttl_ms);
                self.state.meta.next_lease += 1;
                let keys = BTreeSet::new();
                self.state.leases.insert(id, LeaseEntry { ttl, keys });
                self.effects.granted.push((id, ttl, *now));
                Ok(Outcome::Lease(Ok(id)))
            }
            Request::Revoke {
                ids, expired_at, ..
            } => {
                for &id in ids {
                    if !self.state.leases.contains_key(&id) {
                        if expired_at.is_none() {
                            return Ok(Outcome::Done(Err(StoreError::LeaseNotFound(id))));
                        }
                        continue;
                    }
                    if let Some(now) = expired_at {
                        if self.shared.clock().is_alive(id, *now) {
                            continue;
                        }
                    }
                    self.revoke(id, b)?;
                }
                Ok(Outcome::Done(Ok(())))
            }
            Request::Compact { revision, .. } => {
                let current = self.state.meta.revision;
                if *revision > current {
                    return Ok(Outcome::Done(Err(StoreError::FutureRevision {
                        requested: *revision,
                        current,
                    })));
                }
                self.drop_history(b, *revision)?;
                Ok(Outcome::Done(Ok(())))
            }
            Request::Shutdown => Ok(Outcome::Done(Ok(()))),
        }
    }

    fn revoke(&mut self, id: LeaseId, b: &mut dyn Batch) -> Result<(), StoreError> {
        let Some(entry) = self.state.leases.remove(&id) else {
            return Ok(());
        };
        b.revoke(id)?;
        let txn = delete_keys_txn(&entry.keys);
        let applied = apply_txn(b.kv(), &txn, self.state.meta.revision, |_| true)?;
        self.write(applied, b)?;
        self.effects.revoked.push(id);
        Ok(())
    }

    /// Writes an evaluated transaction into the batch.
    fn write(&mut self, applied: Applied, b: &mut dyn Batch) -> Result<(), StoreError> {
        let Some(revision) = applied.write_revision() else {
            return Ok(());
        };
        for change in applied.changes {
            if change.prev_lease != 0 {
                if let Some(entry) = self.state.leases.get_mut(&change.prev_lease) {
                    entry.keys.remove(&change.key);
                }
            }
            match change.new {
                Some(kv) => {
                    if kv.lease != 0 {
                        if let Some(entry) = self.state.leases.get_mut(&kv.lease) {
                            entry.keys.insert(change.key);
                        }
                    }
                    b.put(kv)?;
                }
                None => b.delete(change.key)?,
            }
        }
        let committed = Arc::new(Committed {
            revision,
            events: applied.events,
        });
        b.append_history(&committed)?;
        self.state.meta.revision = revision;
        self.state.meta.history_events += committed.events.len() as u64;
        self.effects.published.push(committed);
        // After each revision, not once per batch, so that what is retained
        // does not depend on how requests happened to be batched.
        self.enforce_retention(b)
    }

    /// Drops the oldest revisions that are beyond either retention bound.
    /// For the event bound it reads the event counts of the revisions it
    /// drops (and of the first one it keeps).
    fn enforce_retention(&mut self, b: &mut dyn Batch) -> Result<(), StoreError> {
        let Meta {
            revision, oldest, ..
        } = self.state.meta;
        if revision + 1 - oldest > self.retention.revisions + self.compaction_chunk {
            self.drop_history(b, revision + 1 - self.retention.revisions)?;
        }
        // Read again: the revision bound may just have dropped some.
        let Meta {
            oldest,
            history_events,
            ..
        } = self.state.meta;
        if history_events > self.retention.events {
            let counts = b.event_counts(oldest, revision)?;
            let keep = self
                .retention
                .events_oldest(history_events, revision, counts)?;
            if let Some(keep) = keep {
                self.drop_history(b, keep)?;
            }
        }
        Ok(())
    }

    /// Drops the history of revisions before `oldest`.
    fn drop_history(&mut self, b: &mut dyn Batch, oldest: Revision) -> Result<(), StoreError> {
        let from = self.state.meta.oldest;
        if oldest <= from {
            return Ok(());
        }
        let dropped = b.drop_history(from, oldest)?;
        let meta = &mut self.state.meta;
        meta.oldest = oldest;
        meta.history_events = meta.history_events.checked_sub(dropped).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "history count {} is below the {dropped} events dropped",
                meta.history_events
            ))
        })?;
        Ok(())
    }
}

fn respond(batch: Vec<Request>, outcomes: Vec<Outcome>) {
    for (request, outcome) in batch.into_iter().zip(outcomes) {
        // A caller that stopped waiting is not an error.
        match (request, outcome) {
            (Request::Txn { reply, .. }, Outcome::Txn(result)) => {
                let _ = reply.send(result);
            }
            (Request::Grant { reply, .. }, Outcome::Lease(result)) => {
                let _ = reply.send(result);
            }
            (Request::Revoke { reply, .. } | Request::Compact { reply, .. }, Outcome::Done(r)) => {
                let _ = reply.send(r);
            }
            // apply() answers each request kind with its own outcome kind.
            _ => tracing::error!("committer outcome does not match its request"),
        }
    }
}

fn respond_all(batch: Vec<Request>, err: impl Fn() -> StoreError) {
    for request in batch {
        match request {
            Request::Txn { reply, .. } => {
                let _ = reply.send(Err(err()));
            }
            Request::Grant { reply, .. } => {
                let _ = reply.send(Err(err()));
            }
            Request::Revoke { reply, .. } | Request::Compact { reply, .. } => {
                let _ = reply.send(Err(err()));
            }
            Request::Shutdown => {}
        }
    }
}

/// The store side of a committer thread: queues the writes of the
/// [`crate::Store`] calls, expires leases, and stops the thread.
///
/// Dropping it stops the thread (after committing what is queued), so a
/// backend that holds it in its shared state stops writing when its last
/// handle goes, before its later fields (a directory lock) are dropped.
pub(crate) struct CommitterHandle {
    /// What the store is, for log lines.
    name: String,
    /// The error text once the committer is gone, made once.
    closed_message: Arc<str>,
    pub shared: Arc<Shared>,
    requests: mpsc::Sender<Request>,
    thread: Mutex<Option<JoinHandle<()>>>,
    expiry: ExpiryTask,
}

impl CommitterHandle {
    /// Starts the committer thread over `storage`, whose committed state is
    /// `state`. Persisted leases restart with a full TTL from now. `name`
    /// (the store's path) goes into errors and log lines.
    pub fn start<S: Storage>(
        storage: S,
        state: CommitState,
        retention: Retention,
        max_batch: usize,
        name: String,
    ) -> Result<Arc<CommitterHandle>, StoreError> {
        let mut clock = LeaseClock::default();
        let now = Instant::now();
        for (id, ttl) in state.lease_ttls() {
            clock.insert(id, ttl, now);
        }
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let shared = Arc::new(Shared {
            clock: Mutex::new(clock),
            events,
            commits: AtomicU64::new(0),
        });
        let (requests, rx) = mpsc::channel();
        let committer = Committer {
            storage,
            shared: shared.clone(),
            state,
            rx,
            retention,
            compaction_chunk: (retention.revisions / 10).clamp(1, 1000),
            max_batch: max_batch.max(1),
            broken: None,
        };
        let thread = std::thread::Builder::new()
            .name("allot-store-commit".into())
            .spawn(move || committer.run())
            .map_err(|e| StoreError::Backend(format!("starting the committer thread: {e}")))?;
        Ok(Arc::new(CommitterHandle {
            closed_message: format!("store {name} is closed").into(),
            name,
            shared,
            requests,
            thread: Mutex::new(Some(thread)),
            expiry: ExpiryTask::default(),
        }))
    }

    /// Commits queued writes and stops the committer thread (once; later
    /// calls do nothing). Blocking.
    pub fn stop(&self) -> Result<(), StoreError> {
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(handle) = handle else {
            return Ok(());
        };
        // Queued requests come before this one and are committed first.
        let _ = self.requests.send(Request::Shutdown);
        handle
            .join()
            .map_err(|_| StoreError::Backend("the committer thread panicked".into()))
    }

    /// Batches committed since the store was opened.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// Queues a request now; the returned future only waits for the answer
    /// and holds no reference to the store.
    fn send<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Request,
    ) -> impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static
    where
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let sent = self.requests.send(make(tx)).is_ok();
        let closed = self.closed_message.clone();
        async move {
            let closed = || Err(StoreError::Unavailable(closed.to_string()));
            match sent {
                true => rx.await.unwrap_or_else(|_| closed()),
                false => closed(),
            }
        }
    }

    /// Starts expiring the leases that are due, through the committer like
    /// any write; `None` if none is due.
    fn start_expiry(
        &self,
    ) -> Option<impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static> {
        let now = Instant::now();
        let due = {
            let clock = self.shared.clock();
            if !clock.has_due(now) {
                return None;
            }
            clock.due(now)
        };
        Some(self.send(move |reply| Request::Revoke {
            ids: due,
            expired_at: Some(now),
            reply,
        }))
    }

    /// Expires the leases that are due before a call proceeds.
    pub async fn expire_leases(&self) -> Result<(), StoreError> {
        match self.start_expiry() {
            Some(done) => done.await,
            None => Ok(()),
        }
    }

    /// [`crate::Store::txn`] for a transaction that writes.
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let now = Instant::now();
        self.send(|reply| Request::Txn { txn, now, reply }).await
    }

    /// [`crate::Store::lease_grant`].
    pub async fn lease_grant(self: &Arc<Self>, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("lease TTL must be positive".into()));
        }
        self.expire_leases().await?;
        let now = Instant::now();
        let id = self
            .send(|reply| Request::Grant { ttl, now, reply })
            .await?;
        ExpiryTask::ensure_running(self);
        Ok(id)
    }

    /// [`crate::Store::lease_keep_alive`].
    pub async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.expire_leases().await?;
        self.shared
            .clock()
            .renew(lease, Instant::now())
            .ok_or(StoreError::LeaseNotFound(lease))
    }

    /// [`crate::Store::lease_revoke`].
    pub async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.expire_leases().await?;
        self.send(|reply| Request::Revoke {
            ids: vec![lease],
            expired_at: None,
            reply,
        })
        .await
    }

    /// [`crate::Store::compact`].
    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.expire_leases().await?;
        self.send(|reply| Request::Compact { revision, reply })
            .await
    }
}

impl Drop for CommitterHandle {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            tracing::error!(%err, store = %self.name, "closing the store");
        }
    }
}

impl LeaseHost for CommitterHandle {
    fn next_deadline(&self) -> Option<Instant> {
        self.shared.clock().next_deadline()
    }

    fn expire_due(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let started = self.start_expiry();
        async move {
            if let Some(done) = started {
                if let Err(err) = done.await {
                    tracing::warn!(%err, "expiring leases failed");
                }
            }
        }
    }

    fn expiry(&self) -> &ExpiryTask {
        &self.expiry
    }
}
