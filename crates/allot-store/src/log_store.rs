//! The log-structured embedded backend: a write-ahead log in a directory,
//! the current keys in memory.
//!
//! # Why this design
//!
//! redb's copy-on-write commit writes ~53 scattered 4 KiB pages per group
//! commit (B-tree paths of the keys, the watch history, meta) and its
//! fdatasync then takes ~1.1 ms (BENCHMARKS.md §5). Here a commit is **one
//! sequential append of one record + one fdatasync** for the whole group,
//! and the record is about as big as the batch's events.
//!
//! Two designs were weighed: (a) this one — a hand-written log, an in-memory
//! ordered index of the current keys, periodic snapshots, and the watch
//! history straight from the log (kept in memory, bounded like
//! [`RedbOptions`](crate::RedbOptions)); (b) an LSM crate (`fjall`: journal
//! appends, memtable, SSTs) under our own committer. (b) was rejected,
//! despite the rule of preferring a crate made for the job, because:
//! - the watch history must survive a reopen, so with fjall every commit
//!   would write each event twice (key partition + history partition), and
//!   the history partition would be churned by compaction; here the log
//!   record *is* the history;
//! - fjall's flush and compaction threads would run beside the server on a
//!   2-core machine whose other core the server needs as soon as commits
//!   stop waiting on fsync (it used ~0.85 core behind redb); this store's
//!   only background work is a snapshot every
//!   [`LogOptions::snapshot_bytes`] of log;
//! - a fjall write batch goes to the memtable, readable, before
//!   `persist(PersistMode::SyncData)` fsyncs the journal; we would need our
//!   own overlay to hide non-durable writes from readers anyway (an
//!   observed write must be durable), i.e. most of what is written here;
//! - allot's data set (pools' blocks and claim records: ~1M keys of tens of
//!   bytes, a few hundred MB at most) fits in memory, which the engine
//!   already assumes for pool state.
//!
//! What is hand-written is therefore only what no crate does for us in this
//! shape: record framing (CRC-32 from `crc32fast`), segment preallocation,
//! torn-tail recovery, and the snapshot file. Everything else is shared with the other backends:
//! the committer loop ([`crate::committer`]), transaction evaluation
//! ([`crate::apply`]), leases, watch streams and the event encoding.
//!
//! Costs: memory holds every key with its record ([`keys`]: ~180 bytes per
//! key for 32-byte keys and 60-byte values) and the retained history,
//! encoded as in the log (~130 bytes per such event; default at most 1M
//! events): 1M keys written once took 312 MiB (`examples/log_recovery.rs`).
//! Recovery reads the newest snapshot and then replays the log written
//! since (at most about `snapshot_bytes`) plus the segments still holding
//! retained history: 0.7 s for those 1M keys.
//!
//! # Files (in the data directory)
//!
//! - `LOCK`: held with `flock` while the store is open
//!   ([`StoreError::Locked`] otherwise);
//! - `{seq:016}.wal`: log segments ([`wal`]), each record one committed
//!   batch ([`record`]);
//! - `{seq:016}.snap`: the newest snapshot ([`snapshot`]), covering the
//!   segments before `seq`.
//!
//! Recovery: load the snapshot (if any), replay the segments before it into
//! the watch history only, and the segments from it on into the keys and
//! leases too. A torn tail of the last segment (a write cut short by a
//! crash, never acknowledged) is cut off and reported with a warning and in
//! [`LogStore::recovery`]; damage anywhere else is [`StoreError::Corrupt`].

mod keys;
mod record;
mod snapshot;
mod storage;
mod wal;

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};
use std::time::Duration;

use async_trait::async_trait;

use crate::apply::apply_txn;
use crate::apply::KvRead;
use crate::committer::{CommitterHandle, Meta};
use crate::watch::{
    read_ring, subscribe_and_watch, Committed, History, Retention, DEFAULT_HISTORY_EVENTS,
    DEFAULT_HISTORY_REVISIONS,
};
use crate::{
    EventKind, KeyValue, LeaseId, Prefixes, RangeResult, Revision, Store, StoreError, Txn,
    TxnResponse, WatchStream,
};
use keys::Keys;
use record::{Entry, Stored};
use storage::{Closed, LogStorage};
pub use wal::TornTail;
use wal::{parse_segment_name, RecordBuf, Segment};

/// Tuning of a [`LogStore`].
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// How many of the latest revisions of history are kept for watches to
    /// replay (default 100,000), unless `history_events` needs them gone;
    /// as for [`RedbOptions`](crate::RedbOptions) (up to a tenth more, at
    /// most 1,000 revisions, pile up before they are dropped). Retained
    /// history is held in memory and keeps its log segments on disk.
    pub history_revisions: u64,
    /// The most events of history kept (default 1,000,000); the newest
    /// revision is always kept. Same rules as
    /// [`RedbOptions::history_events`](crate::RedbOptions::history_events).
    pub history_events: u64,
    /// The most requests committed together in one log record, i.e. one
    /// fdatasync (default 1,024).
    pub max_batch: usize,
    /// A snapshot of the keys is written (by a background thread) each time
    /// this many bytes were appended to the log since the last one (default
    /// 64 MiB). Smaller: faster recovery, more snapshot writing.
    pub snapshot_bytes: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            history_revisions: DEFAULT_HISTORY_REVISIONS,
            history_events: DEFAULT_HISTORY_EVENTS,
            max_batch: 1024,
            snapshot_bytes: 64 << 20,
        }
    }
}

/// What opening the store found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The revision of the snapshot loaded (`None`: no snapshot yet).
    pub snapshot_revision: Option<Revision>,
    /// Log records replayed.
    pub records: u64,
    /// A torn tail cut off the last segment.
    pub torn_tail: Option<TornTail>,
}

/// A durable [`Store`] in a directory: a write-ahead log with group commit
/// (one append and one fdatasync per group of transactions), the current
/// keys and the retained history in memory, periodic snapshots.
///
/// Every acknowledged write has been fdatasynced, and no reader sees a
/// write before that. Lease TTLs are kept in whole milliseconds (rounded
/// up). Unix only (the directory lock is `flock`).
///
/// Cloning is cheap and every clone shares the same store. When the last
/// clone is dropped (or [`LogStore::close`] is called), queued writes are
/// committed, the committer thread stops and the directory is released
/// (the lock belongs to the committer, so it is never released while
/// anything still writes).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

/// The committed state readers see: changed only by the committer, after
/// each batch is durable.
pub(crate) struct Index {
    kv: Keys,
    revision: Revision,
    /// The oldest revision whose history is retained.
    oldest: Revision,
    /// One entry per revision in `[oldest, revision]` that wrote something,
    /// kept encoded.
    history: VecDeque<Stored>,
}

struct Inner {
    dir: PathBuf,
    index: Arc<RwLock<Index>>,
    writer: Arc<CommitterHandle>,
    recovery: Recovery,
}

impl LogStore {
    /// Opens (creating if needed) the store in directory `dir`.
    ///
    /// Missing directories are created. Persisted leases restart with a full
    /// TTL. Fails with [`StoreError::Locked`] if the directory is open
    /// elsewhere (another process or another open handle) and with
    /// [`StoreError::Corrupt`] if a snapshot or a log record other than the
    /// torn tail of the last segment is damaged (nothing is reset). Blocking;
    /// callable with or without a tokio runtime.
    pub fn open(dir: impl AsRef<Path>, opts: LogOptions) -> Result<LogStore, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)
            .map_err(|e| StoreError::Backend(format!("creating {}: {e}", dir.display())))?;
        let lock = lock_dir(&dir)?;
        let (storage, recovery) = recover(&dir, &opts, lock)?;
        let state = storage.state()?;
        let index = storage.index.clone();
        let writer = CommitterHandle::start(
            storage,
            state,
            Retention::new(opts.history_revisions, opts.history_events),
            opts.max_batch,
            dir.display().to_string(),
        )?;
        Ok(LogStore {
            inner: Arc::new(Inner {
                dir,
                index,
                writer,
                recovery,
            }),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// What opening the store found (snapshot, records replayed, a torn
    /// tail cut off).
    pub fn recovery(&self) -> &Recovery {
        &self.inner.recovery
    }

    /// Group commits made since the store was opened: each is one durable
    /// commit (one fsync) shared by every write queued at the time.
    pub fn commits(&self) -> u64 {
        self.inner.writer.commits()
    }

    /// Commits queued writes and stops the committer thread (waiting for a
    /// snapshot being written), which releases the directory. Writes through
    /// other clones fail with [`StoreError::Unavailable`] afterwards; their
    /// reads still see what was committed. Blocking.
    pub fn close(self) -> Result<(), StoreError> {
        self.inner.writer.stop()
    }
}

impl Inner {
    fn index(&self) -> RwLockReadGuard<'_, Index> {
        // Poisoning is ignored: the committer changes the index only after
        // a batch is durable, one whole key at a time.
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }
}

impl History for Inner {
    fn bounds(&self) -> Result<(Revision, Revision), StoreError> {
        let index = self.index();
        Ok((index.oldest, index.revision))
    }

    fn read(
        &self,
        from: Revision,
        to: Revision,
        max: usize,
        max_events: usize,
    ) -> Result<Vec<Arc<Committed>>, StoreError> {
        // Copied out under the lock, decoded after it.
        let stored = {
            let index = self.index();
            read_ring(&index.history, index.oldest, from, to, max, max_events)?
        };
        stored.iter().map(Stored::decode).collect()
    }
}

/// Takes the directory's lock file, without waiting.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join("LOCK");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked != 0 {
        let err = std::io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::EWOULDBLOCK) => StoreError::Locked {
                path: dir.display().to_string(),
                detail: format!("{} is locked", path.display()),
            },
            _ => StoreError::Backend(format!("locking {}: {err}", path.display())),
        });
    }
    Ok(file)
}

/// The sequence numbers of the segments and of the snapshots in `dir`, in
/// order; removes leftover `.tmp` files of interrupted snapshots.
fn list(dir: &Path) -> Result<(Vec<u64>, Vec<u64>), StoreError> {
    let listing_error = |e| StoreError::Backend(format!("listing {}: {e}", dir.display()));
    let mut segments = Vec::new();
    let mut snapshots = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(listing_error)? {
        let entry = entry.map_err(listing_error)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = parse_segment_name(name) {
            segments.push(seq);
        } else if let Some(seq) = snapshot::parse_snapshot_name(name) {
            snapshots.push(seq);
        } else if name.ends_with(".tmp") {
            std::fs::remove_file(entry.path())
                .map_err(|e| wal::io_error("removing", &entry.path(), e))?;
        }
    }
    segments.sort_unstable();
    snapshots.sort_unstable();
    Ok((segments, snapshots))
}

/// Rebuilds the store's state from the newest snapshot and the log, in the
/// directory `lock` holds.
fn recover(
    dir: &Path,
    opts: &LogOptions,
    lock: File,
) -> Result<(LogStorage, Recovery), StoreError> {
    let (segments, snapshots) = list(dir)?;
    let mut recovery = Recovery::default();
    let mut meta = Meta::EMPTY;
    let mut kv = Keys::default();
    let mut leases = HashMap::new();
    // Segments before this one are covered by the snapshot.
    let mut covered = 0;
    if let Some(&newest) = snapshots.last() {
        let (snap, keys) = snapshot::read(&dir.join(snapshot::snapshot_name(newest)))?;
        if snap.segment != newest {
            return Err(StoreError::Corrupt(format!(
                "snapshot {newest} says it covers up to segment {}",
                snap.segment
            )));
        }
        // A crash between writing a snapshot and removing the one before.
        snapshot::remove_older(dir, newest)?;
        recovery.snapshot_revision = Some(snap.revision);
        meta.revision = snap.revision;
        meta.oldest = snap.oldest;
        meta.next_lease = snap.next_lease;
        leases = snap.leases.into_iter().collect();
        kv = keys;
        covered = newest;
    } else if segments.first().is_some_and(|&first| first != 0) {
        return Err(StoreError::Corrupt(format!(
            "log segment 0 is missing and there is no snapshot (first segment: {:?})",
            segments.first()
        )));
    }
    if segments.last().is_some_and(|&last| last < covered) {
        return Err(StoreError::Corrupt(format!(
            "log segment {covered} (after the snapshot) is missing"
        )));
    }
    let mut history: VecDeque<Stored> = VecDeque::new();
    let mut closed = VecDeque::new();
    let mut tail = None;
    // Log the next snapshot will spare the next recovery.
    let mut replayed_bytes = 0;
    for (i, &seq) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        // Before the snapshot: history only (the snapshot has the keys).
        let replay = seq >= covered;
        // The newest revision in the segment (or before it).
        let mut segment_revision = closed.back().map_or(0, |c: &Closed| c.last_revision);
        let (len, torn) = wal::read_segment(dir, seq, last, |payload| {
            recovery.records += 1;
            record::decode(payload, |entry| {
                match entry {
                    Entry::Revision(body) if replay => {
                        if body.revision != meta.revision + 1 {
                            return Err(StoreError::Corrupt(format!(
                                "log segment {seq}: revision {} follows {}",
                                body.revision, meta.revision
                            )));
                        }
                        let events = body.events()?;
                        history.push_back(Stored::new(body, events.len() as u64)?);
                        for event in events {
                            match event.kind {
                                EventKind::Put => kv.insert(event.kv),
                                EventKind::Delete => kv.remove(&event.kv.key),
                            }
                        }
                        meta.revision = body.revision;
                        segment_revision = body.revision;
                    }
                    Entry::Revision(body) => {
                        if body.revision > meta.revision {
                            return Err(StoreError::Corrupt(format!(
                                "log segment {seq} holds revision {}, after the snapshot's {}",
                                body.revision, meta.revision
                            )));
                        }
                        history.push_back(Stored::new(body, body.event_count()?)?);
                        segment_revision = body.revision;
                    }
                    Entry::Grant { id, ttl_ms } if replay => {
                        leases.insert(id, ttl_ms);
                        meta.next_lease = meta.next_lease.max(id + 1);
                    }
                    Entry::Revoke(id) if replay => {
                        leases.remove(&id);
                    }
                    Entry::Counters { oldest, next_lease } if replay => {
                        meta.oldest = meta.oldest.max(oldest);
                        meta.next_lease = meta.next_lease.max(next_lease);
                    }
                    // The snapshot has these.
                    Entry::Grant { .. } | Entry::Revoke(_) | Entry::Counters { .. } => {}
                }
                Ok(())
            })?;
            // Revisions dropped from history by this batch or earlier ones.
            while history.front().is_some_and(|c| c.revision < meta.oldest) {
                history.pop_front();
            }
            Ok(())
        })?;
        if let Some(torn) = torn {
            recovery.torn_tail = Some(torn);
        }
        if replay {
            replayed_bytes += len;
        }
        if last {
            tail = Some((seq, len));
        } else {
            closed.push_back(Closed {
                seq,
                last_revision: segment_revision,
            });
        }
    }
    meta.history_events = history.iter().map(|c| u64::from(c.events)).sum();
    let segment = match tail {
        Some((seq, len)) if len >= wal::HEADER => Segment::open(dir, seq, len)?,
        // A segment whose header a crash cut short: nothing was in it.
        Some((seq, _)) => Segment::create(dir, seq)?,
        None => Segment::create(dir, covered)?,
    };
    if recovery.torn_tail.is_some() || recovery.records > 0 || recovery.snapshot_revision.is_some()
    {
        tracing::info!(
            dir = %dir.display(),
            snapshot_revision = ?recovery.snapshot_revision,
            records = recovery.records,
            revision = meta.revision,
            keys = kv.len(),
            "log store recovered"
        );
    }
    let index = Index {
        kv,
        revision: meta.revision,
        oldest: meta.oldest,
        history,
    };
    let storage = LogStorage {
        dir: dir.to_path_buf(),
        index: Arc::new(RwLock::new(index)),
        segment,
        closed,
        covered,
        leases,
        meta,
        snapshot_bytes: opts.snapshot_bytes.max(1),
        since_snapshot: replayed_bytes,
        snapshotting: None,
        broken: None,
        record: RecordBuf::new(),
        _lock: lock,
    };
    Ok((storage, recovery))
}

#[async_trait]
impl Store for LogStore {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        self.inner.writer.expire_leases().await?;
        self.inner.index().kv.get(key)
    }

    async fn range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<RangeResult, StoreError> {
        self.inner.writer.expire_leases().await?;
        let index = self.inner.index();
        let limit = if limit == 0 { usize::MAX } else { limit };
        let mut iter = index.kv.range(start, end);
        let kvs: Vec<KeyValue> = iter.by_ref().take(limit).collect();
        let more = iter.next().is_some();
        Ok(RangeResult {
            kvs,
            more,
            revision: index.revision,
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.inner.writer.expire_leases().await?;
        if txn.is_read_only() {
            // The committed index is a serializable point for a transaction
            // that writes nothing: no need to queue behind writers.
            let index = self.inner.index();
            return Ok(apply_txn(&index.kv, &txn, index.revision, |_| true)?.response);
        }
        self.inner.writer.txn(txn).await
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        self.inner.writer.expire_leases().await?;
        Ok(self.inner.index().revision)
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.inner.writer.lease_grant(ttl).await
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.inner.writer.lease_keep_alive(lease).await
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.writer.lease_revoke(lease).await
    }

    async fn watch_prefixes(
        &self,
        prefixes: &Prefixes,
        from: Revision,
    ) -> Result<WatchStream, StoreError> {
        self.inner.writer.expire_leases().await?;
        subscribe_and_watch(
            &self.inner,
            &self.inner.writer.shared.events,
            prefixes,
            from,
        )
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.inner.writer.compact(revision).await
    }

    /// Writes are queued to the committer in call order (unless a due
    /// lease expiry or a full queue makes a call wait first).
    fn keeps_write_order(&self) -> bool {
        true
    }
}
