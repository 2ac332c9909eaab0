//! The committer thread: the only writer of the redb file.
//!
//! It blocks for one request, drains whatever else is queued (up to
//! `max_batch`), applies all of it in order inside ONE redb write
//! transaction — each writing request getting its own revision, exactly as
//! if they had run one after the other — and commits once, with
//! `Durability::Immediate` (one fsync for the whole batch). Only after the
//! commit succeeds does it publish the events and answer the callers; if the
//! commit fails, every request of the batch gets the error, nothing is
//! published, and the in-memory state is reloaded from the file.
//!
//! Requests fail individually (a dead lease, an invalid key) without
//! affecting the rest of the batch, because a transaction is fully evaluated
//! before anything of it is written to the redb tables.

use std::collections::{BTreeSet, HashMap};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, Table};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{
    write_history, Shared, TableView, EVENT_CHUNKS, KV, LEASES, META, META_HISTORY_EVENTS,
    META_NEXT_LEASE, META_OLDEST, META_REVISION,
};
use crate::apply::{apply_txn, delete_keys_txn, Applied};
use crate::codec::{chunk_event_count, encode_kv, kv_lease};
use crate::watch::{Committed, Retention};
use crate::{LeaseId, Revision, StoreError, Txn, TxnResponse};

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

struct LeaseEntry {
    ttl: Duration,
    keys: BTreeSet<Vec<u8>>,
}

/// The committer's view of the persisted state, mirrored in memory so that
/// revisions and lease bookkeeping need no reads. Rebuilt from the file
/// after a failed commit.
pub(crate) struct CommitState {
    revision: Revision,
    oldest: Revision,
    /// The number of events retained in history.
    history_events: u64,
    next_lease: LeaseId,
    leases: HashMap<LeaseId, LeaseEntry>,
}

impl CommitState {
    /// Reads the state back from the file, rebuilding the index of keys per
    /// lease from the `kv` table.
    pub fn load(db: &Database) -> Result<Self, StoreError> {
        let rtx = db.begin_read()?;
        let meta = rtx.open_table(META)?;
        let (oldest, revision) = super::read_bounds(&rtx)?;
        let next_lease = super::meta_get(&meta, META_NEXT_LEASE)?;
        let history_events = super::meta_get(&meta, META_HISTORY_EVENTS)?;
        let mut leases = HashMap::new();
        for entry in rtx.open_table(LEASES)?.iter()? {
            let (id, ttl_ms) = entry?;
            leases.insert(
                id.value(),
                LeaseEntry {
                    ttl: Duration::from_millis(ttl_ms.value()),
                    keys: BTreeSet::new(),
                },
            );
        }
        for entry in rtx.open_table(KV)?.iter()? {
            let (key, bytes) = entry?;
            let lease = kv_lease(bytes.value())?;
            if lease == 0 {
                continue;
            }
            let key = key.value();
            let entry = leases.get_mut(&lease).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "key {:?} is attached to lease {lease}, which does not exist",
                    String::from_utf8_lossy(key)
                ))
            })?;
            entry.keys.insert(key.to_vec());
        }
        if oldest == 0 || oldest > revision + 1 || next_lease == 0 {
            return Err(StoreError::Corrupt(format!(
                "inconsistent meta: revision {revision}, oldest {oldest}, next lease {next_lease}"
            )));
        }
        Ok(Self {
            revision,
            oldest,
            history_events,
            next_lease,
            leases,
        })
    }

    /// Every persisted lease with its TTL.
    pub fn lease_ttls(&self) -> Vec<(LeaseId, Duration)> {
        self.leases.iter().map(|(&id, e)| (id, e.ttl)).collect()
    }
}

/// The tables of one batch's write transaction.
struct Tables<'t> {
    kv: Table<'t, &'static [u8], &'static [u8]>,
    chunks: Table<'t, (u64, u32), &'static [u8]>,
    leases: Table<'t, u64, u64>,
}

pub(crate) struct Committer {
    db: Arc<Database>,
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

impl Committer {
    pub fn new(
        db: Arc<Database>,
        shared: Arc<Shared>,
        state: CommitState,
        rx: mpsc::Receiver<Request>,
        retention: Retention,
        max_batch: usize,
    ) -> Self {
        Self {
            db,
            shared,
            state,
            rx,
            retention,
            compaction_chunk: (retention.revisions / 10).clamp(1, 1000),
            max_batch,
            broken: None,
        }
    }

    /// Serves requests until a shutdown request or until every sender is gone.
    pub fn run(mut self) {
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
        match self.commit_batch(&batch, &mut effects) {
            Ok(outcomes) => {
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

    /// Brings the in-memory state back in line with the file after a failed
    /// commit left it ahead.
    fn reload(&mut self) {
        match CommitState::load(&self.db) {
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

    /// Applies the batch in one write transaction and commits it. The error
    /// case means nothing of the batch was committed.
    fn commit_batch(
        &mut self,
        batch: &[Request],
        effects: &mut Effects,
    ) -> Result<Vec<Outcome>, StoreError> {
        let mut wtx = self.db.begin_write()?;
        // The default, spelled out: an acknowledged write must survive a crash.
        wtx.set_durability(Durability::Immediate)?;
        let before = (
            self.state.revision,
            self.state.oldest,
            self.state.history_events,
            self.state.next_lease,
        );
        let mut outcomes = Vec::with_capacity(batch.len());
        {
            let mut tables = Tables {
                kv: wtx.open_table(KV)?,
                chunks: wtx.open_table(EVENT_CHUNKS)?,
                leases: wtx.open_table(LEASES)?,
            };
            for request in batch {
                outcomes.push(self.apply(request, &mut tables, effects)?);
            }
            if before
                != (
                    self.state.revision,
                    self.state.oldest,
                    self.state.history_events,
                    self.state.next_lease,
                )
            {
                let mut meta = wtx.open_table(META)?;
                meta.insert(META_REVISION, self.state.revision)?;
                meta.insert(META_OLDEST, self.state.oldest)?;
                meta.insert(META_HISTORY_EVENTS, self.state.history_events)?;
                meta.insert(META_NEXT_LEASE, self.state.next_lease)?;
            }
        }
        wtx.commit()?;
        Ok(outcomes)
    }

    /// Applies one request. `Err` is a storage failure that dooms the whole
    /// batch; a failure of the request alone is inside the [`Outcome`].
    fn apply(
        &mut self,
        request: &Request,
        tables: &mut Tables<'_>,
        effects: &mut Effects,
    ) -> Result<Outcome, StoreError> {
        match request {
            Request::Txn { txn, now, .. } => {
                let leases = &self.state.leases;
                let shared = &self.shared;
                // A lease granted earlier in this batch is not on the clock
                // yet, and is alive.
                let alive = |id| {
                    leases.contains_key(&id) && shared.clock().deadline(id).is_none_or(|d| d > *now)
                };
                let applied = apply_txn(&TableView(&tables.kv), txn, self.state.revision, alive);
                match applied {
                    Ok(applied) => {
                        let response = applied.response.clone();
                        self.write(applied, tables, effects)?;
                        Ok(Outcome::Txn(Ok(response)))
                    }
                    Err(err) => Ok(Outcome::Txn(Err(err))),
                }
            }
            Request::Grant { ttl, now, .. } => {
                let id = self.state.next_lease;
                // Stored in whole milliseconds, rounded up so a lease never
                // lives shorter than asked.
                let ttl_ms = u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
                tables.leases.insert(id, ttl_ms)?;
                let ttl = Duration::from_millis(ttl_ms);
                self.state.next_lease += 1;
                self.state.leases.insert(
                    id,
                    LeaseEntry {
                        ttl,
                        keys: BTreeSet::new(),
                    },
                );
                effects.granted.push((id, ttl, *now));
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
                    self.revoke(id, tables, effects)?;
                }
                Ok(Outcome::Done(Ok(())))
            }
            Request::Compact { revision, .. } => {
                if *revision > self.state.revision {
                    return Ok(Outcome::Done(Err(StoreError::FutureRevision {
                        requested: *revision,
                        current: self.state.revision,
                    })));
                }
                self.drop_history(tables, *revision)?;
                Ok(Outcome::Done(Ok(())))
            }
            Request::Shutdown => Ok(Outcome::Done(Ok(()))),
        }
    }

    fn revoke(
        &mut self,
        id: LeaseId,
        tables: &mut Tables<'_>,
        effects: &mut Effects,
    ) -> Result<(), StoreError> {
        let Some(entry) = self.state.leases.remove(&id) else {
            return Ok(());
        };
        tables.leases.remove(id)?;
        let txn = delete_keys_txn(&entry.keys);
        let applied = apply_txn(&TableView(&tables.kv), &txn, self.state.revision, |_| true)?;
        self.write(applied, tables, effects)?;
        effects.revoked.push(id);
        Ok(())
    }

    /// Writes an evaluated transaction into the batch's tables.
    fn write(
        &mut self,
        applied: Applied,
        tables: &mut Tables<'_>,
        effects: &mut Effects,
    ) -> Result<(), StoreError> {
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
                    tables
                        .kv
                        .insert(change.key.as_slice(), encode_kv(&kv).as_slice())?;
                    if kv.lease != 0 {
                        if let Some(entry) = self.state.leases.get_mut(&kv.lease) {
                            entry.keys.insert(change.key);
                        }
                    }
                }
                None => {
                    tables.kv.remove(change.key.as_slice())?;
                }
            }
        }
        write_history(&mut tables.chunks, revision, &applied.events)?;
        self.state.revision = revision;
        self.state.history_events += applied.events.len() as u64;
        effects.published.push(Arc::new(Committed {
            revision,
            events: applied.events,
        }));
        // After each revision, not once per batch, so that what is retained
        // does not depend on how requests happened to be batched.
        self.enforce_retention(tables)
    }

    /// Drops the oldest revisions that are beyond either retention bound.
    /// For the event bound it reads the chunk headers of the revisions it
    /// drops (and of the first one it keeps).
    fn enforce_retention(&mut self, tables: &mut Tables<'_>) -> Result<(), StoreError> {
        let revisions = self.retention.revisions;
        if self.state.revision + 1 - self.state.oldest > revisions + self.compaction_chunk {
            self.drop_history(tables, self.state.revision + 1 - revisions)?;
        }
        if self.state.history_events > self.retention.events {
            let counts = tables
                .chunks
                .range((self.state.oldest, 0)..(self.state.revision, 0))?
                .map(|entry| {
                    let (key, chunk) = entry?;
                    Ok((key.value().0, chunk_event_count(chunk.value())?))
                });
            let oldest = self.retention.events_oldest(
                self.state.history_events,
                self.state.revision,
                counts,
            )?;
            if let Some(oldest) = oldest {
                self.drop_history(tables, oldest)?;
            }
        }
        Ok(())
    }

    /// Drops the history of revisions before `oldest`.
    fn drop_history(
        &mut self,
        tables: &mut Tables<'_>,
        oldest: Revision,
    ) -> Result<(), StoreError> {
        let from = self.state.oldest;
        if oldest <= from {
            return Ok(());
        }
        // Counted while deleting: redb reads each chunk to delete it anyway.
        let mut dropped = 0u64;
        let mut unreadable = None;
        tables
            .chunks
            .retain_in((from, 0)..(oldest, 0), |_, chunk| {
                match chunk_event_count(chunk) {
                    Ok(n) => dropped += n,
                    Err(err) => unreadable = Some(err),
                }
                false
            })?;
        if let Some(err) = unreadable {
            return Err(err);
        }
        self.state.oldest = oldest;
        self.state.history_events =
            self.state
                .history_events
                .checked_sub(dropped)
                .ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "history count {} is below the {dropped} events dropped",
                        self.state.history_events
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
