//! The log store's side of the shared committer ([`crate::committer`]).
//!
//! A batch is staged against the committed index (read lock held only while
//! the batch is evaluated) plus an overlay of the batch's own writes, and
//! encoded as one log record as it goes. Commit is one append + one
//! fdatasync of that record; only then is the overlay applied to the index
//! (write lock held for a map update per key), so a reader never sees a
//! write that is not durable. Every `snapshot_bytes` of log, the committer
//! starts a new segment and a background thread snapshots the index
//! ([`super::snapshot`]); segments go once a snapshot covers them and the
//! watch history no longer needs them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use super::keys::Keys;
use super::record::{self, Body, Stored};
use super::snapshot::{self, SnapshotMeta};
use super::wal::{io_error, segment_name, sync_dir, AppendError, RecordBuf, Segment};
use super::Index;
use crate::apply::{compare_holds, in_range, Head, KvRead};
use crate::committer::{Batch, CommitState, EventCounts, Meta, Storage};
use crate::watch::Committed;
use crate::{CompareTarget, KeyValue, LeaseId, Revision, StoreError};

/// A log segment no longer appended to.
pub(super) struct Closed {
    pub seq: u64,
    /// Every revision in it is at most this.
    pub last_revision: Revision,
}

pub(super) struct LogStorage {
    pub dir: PathBuf,
    pub index: Arc<RwLock<Index>>,
    pub segment: Segment,
    /// Older segments, oldest first.
    pub closed: VecDeque<Closed>,
    /// Segments before this one are covered by a durable snapshot.
    pub covered: u64,
    /// Committed leases with their TTL in milliseconds.
    pub leases: HashMap<LeaseId, u64>,
    /// The committed counters.
    pub meta: Meta,
    /// Start a snapshot once this many bytes were logged since the last one.
    pub snapshot_bytes: u64,
    pub since_snapshot: u64,
    pub snapshotting: Option<JoinHandle<Result<u64, StoreError>>>,
    /// Set when a failed append could not be undone: the log's tail is
    /// unknown, so nothing more is appended.
    pub broken: Option<String>,
    /// Reused for every record (its capacity grows to the largest batch).
    pub record: RecordBuf,
    /// The data directory's lock: held as long as this writes (dropped
    /// after [`Drop::drop`] joined the snapshot thread).
    pub _lock: std::fs::File,
}

impl LogStorage {
    fn index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        // Poisoning is ignored: the index is changed only by `apply`, in
        // steps that cannot panic halfway through a key.
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The committed state, for the committer to go on from.
    pub fn state(&self) -> Result<CommitState, StoreError> {
        let leases = self
            .leases
            .iter()
            .map(|(&id, &ms)| (id, Duration::from_millis(ms)));
        let mut state = CommitState::new(self.meta, leases);
        for (key, lease) in self.index().kv.leases() {
            state.attach(key, lease)?;
        }
        state.checked()
    }

    /// Makes a staged batch visible.
    fn apply(&mut self, staged: Staged) {
        let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
        for (key, kv) in staged.overlay {
            match kv {
                Some(kv) => index.kv.insert(kv),
                None => index.kv.remove(&key),
            }
        }
        index.history.extend(staged.history);
        if let Some(meta) = staged.meta {
            index.revision = meta.revision;
            index.oldest = meta.oldest;
            while index
                .history
                .front()
                .is_some_and(|c| c.revision < meta.oldest)
            {
                index.history.pop_front();
            }
            self.meta = meta;
        }
        drop(index);
        for op in staged.leases {
            match op {
                LeaseOp::Grant(id, ms) => self.leases.insert(id, ms),
                LeaseOp::Revoke(id) => self.leases.remove(&id),
            };
        }
    }

    /// Reaps a finished snapshot, starts one when enough log piled up, and
    /// removes the segments nothing needs any more. Failures here cost
    /// disk space, not data: they are logged and retried later.
    fn housekeeping(&mut self) {
        if self.snapshotting.as_ref().is_some_and(|t| t.is_finished()) {
            self.reap_snapshot();
        }
        if self.snapshotting.is_none() && self.since_snapshot >= self.snapshot_bytes {
            self.since_snapshot = 0;
            if let Err(err) = self.start_snapshot() {
                tracing::error!(%err, dir = %self.dir.display(), "starting a log snapshot failed");
            }
        }
        if let Err(err) = self.remove_unneeded_segments() {
            tracing::error!(%err, dir = %self.dir.display(), "removing old log segments failed");
        }
    }

    fn reap_snapshot(&mut self) {
        let Some(thread) = self.snapshotting.take() else {
            return;
        };
        match thread.join() {
            Ok(Ok(segment)) => self.covered = segment,
            Ok(Err(err)) => {
                tracing::error!(%err, dir = %self.dir.display(), "writing a log snapshot failed");
            }
            Err(_) => tracing::error!("the log snapshot thread panicked"),
        }
    }

    /// Closes the current segment, opens the next, and snapshots the index
    /// as of this point in a background thread.
    fn start_snapshot(&mut self) -> Result<(), StoreError> {
        let next = Segment::create(&self.dir, self.segment.seq + 1)?;
        let old = std::mem::replace(&mut self.segment, next);
        if let Err(err) = old.trim() {
            // Only disk space: the zeros read as the segment's end.
            tracing::warn!(%err, "trimming a closed log segment failed");
        }
        self.closed.push_back(Closed {
            seq: old.seq,
            last_revision: self.meta.revision,
        });
        let meta = SnapshotMeta {
            revision: self.meta.revision,
            oldest: self.meta.oldest,
            next_lease: self.meta.next_lease,
            segment: self.segment.seq,
            leases: self.leases.iter().map(|(&id, &ms)| (id, ms)).collect(),
        };
        let dir = self.dir.clone();
        let index = self.index.clone();
        let thread = std::thread::Builder::new()
            .name("allot-store-snapshot".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let path = snapshot::write(&dir, &meta, &index)?;
                tracing::info!(
                    path = %path.display(),
                    revision = meta.revision,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "log snapshot written"
                );
                Ok(meta.segment)
            })
            .map_err(|e| StoreError::Backend(format!("starting the snapshot thread: {e}")))?;
        self.snapshotting = Some(thread);
        Ok(())
    }

    /// Removes the oldest segments that a snapshot covers and that hold no
    /// retained history.
    fn remove_unneeded_segments(&mut self) -> Result<(), StoreError> {
        let mut removed = false;
        while let Some(front) = self.closed.front() {
            if front.seq >= self.covered || front.last_revision >= self.meta.oldest {
                break;
            }
            let path = self.dir.join(segment_name(front.seq));
            std::fs::remove_file(&path).map_err(|e| io_error("removing", &path, e))?;
            self.closed.pop_front();
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

impl Drop for LogStorage {
    fn drop(&mut self) {
        // Before `_lock` is released: nothing may write once it is.
        self.reap_snapshot();
    }
}

enum LeaseOp {
    Grant(LeaseId, u64),
    Revoke(LeaseId),
}

/// What a batch staged, to apply once it is durable.
struct Staged {
    overlay: BTreeMap<Vec<u8>, Option<KeyValue>>,
    history: Vec<Stored>,
    leases: Vec<LeaseOp>,
    meta: Option<Meta>,
}

/// The committed keys plus the batch's own writes.
struct View<'a> {
    base: &'a Keys,
    overlay: BTreeMap<Vec<u8>, Option<KeyValue>>,
}

impl KvRead for View<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        Ok(match self.overlay.get(key) {
            Some(staged) => staged.clone(),
            None => self.base.get(key)?,
        })
    }

    fn holds(&self, key: &[u8], target: &CompareTarget) -> Result<bool, StoreError> {
        match self.overlay.get(key) {
            Some(staged) => Ok(compare_holds(staged.as_ref(), target)),
            None => self.base.holds(key, target),
        }
    }

    fn head(&self, key: &[u8]) -> Result<Option<Head>, StoreError> {
        match self.overlay.get(key) {
            Some(staged) => Ok(staged.as_ref().map(Head::of)),
            None => self.base.head(key),
        }
    }

    fn scan(&self, start: &[u8], end: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        let mut merged: BTreeMap<Vec<u8>, KeyValue> = self
            .base
            .range(start, end)
            .map(|kv| (kv.key.clone(), kv))
            .collect();
        for (key, staged) in &self.overlay {
            if !in_range(key, start, end) {
                continue;
            }
            match staged {
                Some(kv) => merged.insert(key.clone(), kv.clone()),
                None => merged.remove(key),
            };
        }
        Ok(merged.into_values().collect())
    }
}

struct LogBatch<'a> {
    view: View<'a>,
    /// The committed history.
    history: &'a VecDeque<Stored>,
    pending: Vec<Stored>,
    leases: Vec<LeaseOp>,
    meta: Option<Meta>,
    record: &'a mut Vec<u8>,
}

impl LogBatch<'_> {
    /// Retained and staged revisions in `[from, to)`.
    fn revisions(&self, from: Revision, to: Revision) -> impl Iterator<Item = &Stored> {
        let first = self.history.partition_point(|c| c.revision < from);
        self.history
            .range(first..)
            .chain(&self.pending)
            .skip_while(move |c| c.revision < from)
            .take_while(move |c| c.revision < to)
    }
}

impl Batch for LogBatch<'_> {
    fn kv(&self) -> &dyn KvRead {
        &self.view
    }

    fn put(&mut self, kv: KeyValue) -> Result<(), StoreError> {
        // The record gets the key through the revision's events.
        self.view.overlay.insert(kv.key.clone(), Some(kv));
        Ok(())
    }

    fn delete(&mut self, key: Vec<u8>) -> Result<(), StoreError> {
        self.view.overlay.insert(key, None);
        Ok(())
    }

    fn append_history(&mut self, committed: &Arc<Committed>) -> Result<(), StoreError> {
        let body = record::put_revision(self.record, committed);
        let body = Body {
            revision: committed.revision,
            bytes: &self.record[body],
        };
        self.pending
            .push(Stored::new(body, committed.events.len() as u64)?);
        Ok(())
    }

    fn grant(&mut self, id: LeaseId, ttl_ms: u64) -> Result<(), StoreError> {
        record::put_grant(self.record, id, ttl_ms);
        self.leases.push(LeaseOp::Grant(id, ttl_ms));
        Ok(())
    }

    fn revoke(&mut self, id: LeaseId) -> Result<(), StoreError> {
        record::put_revoke(self.record, id);
        self.leases.push(LeaseOp::Revoke(id));
        Ok(())
    }

    fn event_counts(&self, from: Revision, to: Revision) -> Result<EventCounts<'_>, StoreError> {
        let counts = self
            .revisions(from, to)
            .map(|c| Ok((c.revision, u64::from(c.events))));
        Ok(Box::new(counts))
    }

    fn drop_history(&mut self, from: Revision, before: Revision) -> Result<u64, StoreError> {
        // Dropped from memory when the batch is applied (the new `oldest`
        // travels in its counters); only counted here.
        Ok(self
            .revisions(from, before)
            .map(|c| u64::from(c.events))
            .sum())
    }

    fn set_meta(&mut self, meta: &Meta) -> Result<(), StoreError> {
        record::put_counters(self.record, meta.oldest, meta.next_lease);
        self.meta = Some(*meta);
        Ok(())
    }
}

impl Storage for LogStorage {
    fn commit<R>(
        &mut self,
        fill: impl FnOnce(&mut dyn Batch) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        if let Some(reason) = &self.broken {
            return Err(StoreError::Unavailable(reason.clone()));
        }
        let mut record = std::mem::replace(&mut self.record, RecordBuf::new());
        record.buf.truncate(super::wal::FRAME);
        record::begin(&mut record.buf);
        let begun = record.buf.len();
        let (result, staged) = {
            let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
            let mut batch = LogBatch {
                view: View {
                    base: &index.kv,
                    overlay: BTreeMap::new(),
                },
                history: &index.history,
                pending: Vec::new(),
                leases: Vec::new(),
                meta: None,
                record: &mut record.buf,
            };
            let result = fill(&mut batch);
            let staged = Staged {
                overlay: batch.view.overlay,
                history: batch.pending,
                leases: batch.leases,
                meta: batch.meta,
            };
            (result, staged)
        };
        let result = match result {
            Ok(result) => result,
            Err(err) => {
                self.record = record;
                return Err(err);
            }
        };
        if record.buf.len() == begun {
            // Nothing to persist (every request failed or wrote nothing).
            self.record = record;
            return Ok(result);
        }
        let before = self.segment.len();
        let appended = self.segment.append(&mut record);
        self.record = record;
        match appended {
            Ok(()) => {}
            Err(AppendError::Undone(err)) => return Err(err),
            Err(AppendError::Broken(err)) => {
                self.broken = Some(format!("the log's tail is unknown after: {err}"));
                return Err(err);
            }
        }
        self.apply(staged);
        self.since_snapshot += self.segment.len() - before;
        self.housekeeping();
        Ok(result)
    }

    fn load(&mut self) -> Result<CommitState, StoreError> {
        if let Some(reason) = &self.broken {
            return Err(StoreError::Unavailable(reason.clone()));
        }
        self.state()
    }
}
