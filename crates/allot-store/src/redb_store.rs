//! The embedded durable backend, on a single redb file.
//!
//! Reads (`get`, `range`, read-only transactions, watch replay) use redb read
//! transactions directly from the calling task. Every write goes to one
//! dedicated committer thread ([`committer`]), which batches whatever writes
//! are queued into one redb write transaction and one fsync (group commit),
//! so concurrent writers share the cost of durability.
//!
//! Tables (format 2):
//! - `kv`: key → [`crate::codec::encode_kv`] record (value and bookkeeping);
//! - `meta`: `format`, `revision`, `oldest` (oldest retained history
//!   revision), `history_events` (how many events the history retains) and
//!   `next_lease`;
//! - `event_chunks`: (revision, chunk number) → some of the events of that
//!   revision ([`crate::codec::encode_event_chunks`]), the watch history. A
//!   revision's events are split into chunks of at most 64 KiB so that redb
//!   stores them without rounding huge records up to a power of two; each
//!   chunk's header holds its number of events;
//! - `leases`: lease id → TTL in milliseconds.
//!
//! `history_events` is a running count, updated in the same write
//! transaction as the history itself, so it cannot disagree with it after a
//! crash, and opening the store does not read the history. Compaction learns
//! how many events it drops from the headers of the chunks it deletes (which
//! redb reads to delete them anyway), so no per-revision index is written on
//! every commit.
//!
//! A format-1 file (one `events` record per revision, fixed-width fields) is
//! migrated to format 2 when opened, in one write transaction that rewrites
//! its retained history.

mod storage;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};

use crate::apply::{apply_txn, KvRead};
use crate::codec::{decode_event_chunk, decode_events_v1, decode_kv, encode_event_chunks};
use crate::committer::CommitterHandle;
use crate::watch::{
    subscribe_and_watch, Committed, History, Retention, DEFAULT_HISTORY_EVENTS,
    DEFAULT_HISTORY_REVISIONS,
};
use crate::{
    KeyValue, LeaseId, Prefixes, RangeResult, Revision, Store, StoreError, Txn, TxnResponse,
    WatchStream,
};
use storage::RedbStorage;

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const EVENT_CHUNKS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("event_chunks");
const LEASES: TableDefinition<u64, u64> = TableDefinition::new("leases");
/// The history of a format-1 file, migrated on open.
const EVENTS_V1: TableDefinition<u64, &[u8]> = TableDefinition::new("events");

const META_FORMAT: &str = "format";
const META_REVISION: &str = "revision";
const META_OLDEST: &str = "oldest";
const META_HISTORY_EVENTS: &str = "history_events";
const META_NEXT_LEASE: &str = "next_lease";
const FORMAT_VERSION: u64 = 2;

/// Tuning of a [`RedbStore`].
#[derive(Debug, Clone)]
pub struct RedbOptions {
    /// How many of the latest revisions of history are kept for watches to
    /// replay (default 100,000), unless `history_events` needs them gone.
    /// Older history is dropped in chunks as writes go on (up to a tenth
    /// more, at most 1,000 revisions, pile up first); current values are
    /// never affected.
    pub history_revisions: u64,
    /// The most events of history kept (default 1,000,000), whatever
    /// `history_revisions` says: one transaction may write any number of
    /// events. Once exceeded, whole revisions are dropped from the oldest on
    /// until at most nine tenths of it remain. The newest revision is always
    /// kept, even if it alone holds more events than this, so that a
    /// transaction can be watched from its own revision.
    pub history_events: u64,
    /// The most requests committed together in one redb transaction
    /// (default 1,024).
    pub max_batch: usize,
    /// redb's page cache size in bytes (`None`: redb's default).
    pub cache_size: Option<usize>,
    /// Verify the checksum of every page when opening, reporting damage as
    /// [`StoreError::Corrupt`] (default false: it reads the whole file).
    pub check_integrity: bool,
}

impl Default for RedbOptions {
    fn default() -> Self {
        Self {
            history_revisions: DEFAULT_HISTORY_REVISIONS,
            history_events: DEFAULT_HISTORY_EVENTS,
            max_batch: 1024,
            cache_size: None,
            check_integrity: false,
        }
    }
}

/// A durable [`Store`] in one redb file, with group commit.
///
/// Every acknowledged write has been committed with an fsync. Lease TTLs are
/// kept in whole milliseconds (rounded up).
///
/// Cloning is cheap and every clone shares the same database. When the last
/// clone is dropped (or [`RedbStore::close`] is called), queued writes are
/// committed, the committer thread stops and the file is released.
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

struct Inner {
    path: PathBuf,
    db: Arc<Database>,
    writer: Arc<CommitterHandle>,
}

impl RedbStore {
    /// Opens (creating if needed) the store in the redb file at `path`.
    ///
    /// Missing parent directories are created. Persisted leases restart with
    /// a full TTL. Fails with [`StoreError::Locked`] if the file is open
    /// elsewhere (another process or another open handle) and with
    /// [`StoreError::Corrupt`] if its contents cannot be decoded. Blocking;
    /// callable with or without a tokio runtime.
    pub fn open(path: impl AsRef<Path>, opts: RedbOptions) -> Result<RedbStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::Backend(format!("creating {}: {e}", parent.display())))?;
        }
        let mut builder = Database::builder();
        if let Some(bytes) = opts.cache_size {
            builder.set_cache_size(bytes);
        }
        builder.set_check_integrity_on_open(opts.check_integrity);
        let db = builder.create(&path).map_err(|e| open_error(&path, e))?;
        init_schema(&db)?;
        let db = Arc::new(db);
        let storage = RedbStorage::new(db.clone());
        let state = storage.load_state()?;
        let writer = CommitterHandle::start(
            storage,
            state,
            Retention::new(opts.history_revisions, opts.history_events),
            opts.max_batch,
            path.display().to_string(),
        )?;
        Ok(RedbStore {
            inner: Arc::new(Inner { path, db, writer }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Group commits made since the store was opened: each is one durable
    /// commit (one fsync) shared by every write queued at the time.
    pub fn commits(&self) -> u64 {
        self.inner.writer.commits()
    }

    /// Commits queued writes and stops the committer thread. Writes through
    /// other clones fail with [`StoreError::Unavailable`] afterwards; the file
    /// is released when the last clone is dropped. Blocking.
    pub fn close(self) -> Result<(), StoreError> {
        self.inner.writer.stop()
    }
}

impl Inner {
    fn read(&self) -> Result<ReadTransaction, StoreError> {
        Ok(self.db.begin_read()?)
    }
}

/// (oldest retained revision, current revision) as of `rtx`.
fn read_bounds(rtx: &ReadTransaction) -> Result<(Revision, Revision), StoreError> {
    let meta = rtx.open_table(META)?;
    Ok((
        meta_get(&meta, META_OLDEST)?,
        meta_get(&meta, META_REVISION)?,
    ))
}

fn meta_get(meta: &impl ReadableTable<&'static str, u64>, name: &str) -> Result<u64, StoreError> {
    meta.get(name)?
        .map(|v| v.value())
        .ok_or_else(|| StoreError::Corrupt(format!("meta entry {name:?} is missing")))
}

impl History for Inner {
    fn bounds(&self) -> Result<(Revision, Revision), StoreError> {
        read_bounds(&self.read()?)
    }

    fn read(
        &self,
        from: Revision,
        to: Revision,
        max: usize,
        max_events: usize,
    ) -> Result<Vec<Arc<Committed>>, StoreError> {
        let rtx = self.read()?;
        let (oldest, _) = read_bounds(&rtx)?;
        if from < oldest {
            return Err(StoreError::Compacted {
                requested: from,
                oldest,
            });
        }
        if from > to {
            return Ok(Vec::new());
        }
        let chunks = rtx.open_table(EVENT_CHUNKS)?;
        let mut out: Vec<Arc<Committed>> = Vec::new();
        let mut current: Option<Committed> = None;
        let mut events = 0;
        for entry in chunks.range((from, 0)..=(to, u32::MAX))? {
            let (key, bytes) = entry?;
            let (revision, _) = key.value();
            if current.as_ref().is_none_or(|c| c.revision != revision) {
                if let Some(done) = current.take() {
                    events += done.events.len();
                    out.push(Arc::new(done));
                }
                if out.len() >= max || (!out.is_empty() && events >= max_events) {
                    return Ok(out);
                }
                current = Some(Committed {
                    revision,
                    events: Vec::new(),
                });
            }
            if let Some(c) = current.as_mut() {
                decode_event_chunk(revision, bytes.value(), &mut c.events)?;
            }
        }
        out.extend(current.map(Arc::new));
        Ok(out)
    }
}

/// A [`KvRead`] over a `kv` table of a read or write transaction.
pub(crate) struct TableView<T>(pub T);

impl<T: ReadableTable<&'static [u8], &'static [u8]>> KvRead for TableView<T> {
    fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        match self.0.get(key)? {
            Some(bytes) => Ok(Some(decode_kv(key, bytes.value())?)),
            None => Ok(None),
        }
    }

    fn scan(&self, start: &[u8], end: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        scan_table(&self.0, start, end, usize::MAX).map(|(kvs, _)| kvs)
    }
}

/// Up to `limit` keys of `[start, end)` and whether more remain.
fn scan_table<T: ReadableTable<&'static [u8], &'static [u8]>>(
    table: &T,
    start: &[u8],
    end: &[u8],
    limit: usize,
) -> Result<(Vec<KeyValue>, bool), StoreError> {
    if !end.is_empty() && start >= end {
        return Ok((Vec::new(), false));
    }
    let mut iter = if end.is_empty() {
        table.range(start..)?
    } else {
        table.range(start..end)?
    };
    let mut kvs = Vec::new();
    for entry in iter.by_ref().take(limit) {
        let (key, bytes) = entry?;
        kvs.push(decode_kv(key.value(), bytes.value())?);
    }
    let more = iter.next().transpose()?.is_some();
    Ok((kvs, more))
}

/// Creates the tables and the meta entries of a new store, and checks the
/// format of an existing one.
fn init_schema(db: &Database) -> Result<(), StoreError> {
    let wtx = db.begin_write()?;
    {
        wtx.open_table(KV)?;
        wtx.open_table(LEASES)?;
        let mut chunks = wtx.open_table(EVENT_CHUNKS)?;
        let mut meta = wtx.open_table(META)?;
        let format = meta.get(META_FORMAT)?.map(|v| v.value());
        match format {
            Some(FORMAT_VERSION) => {}
            Some(1) => {
                let oldest = meta_get(&meta, META_OLDEST)?;
                let mut retained = 0u64;
                {
                    let old = wtx.open_table(EVENTS_V1)?;
                    for entry in old.range(oldest..)? {
                        let (revision, bytes) = entry?;
                        let events = decode_events_v1(bytes.value())?;
                        write_history(&mut chunks, revision.value(), &events)?;
                        retained += events.len() as u64;
                    }
                }
                wtx.delete_table(EVENTS_V1)?;
                meta.insert(META_HISTORY_EVENTS, retained)?;
                meta.insert(META_FORMAT, FORMAT_VERSION)?;
            }
            Some(other) => {
                return Err(StoreError::Corrupt(format!(
                    "unsupported store format {other} (this build reads {FORMAT_VERSION})"
                )))
            }
            None => {
                if !meta.is_empty()? {
                    return Err(StoreError::Corrupt("meta table has no format entry".into()));
                }
                meta.insert(META_FORMAT, FORMAT_VERSION)?;
                meta.insert(META_REVISION, 1)?;
                meta.insert(META_OLDEST, 1)?;
                meta.insert(META_HISTORY_EVENTS, 0)?;
                meta.insert(META_NEXT_LEASE, 1)?;
            }
        }
    }
    wtx.commit()?;
    Ok(())
}

/// Writes the history of one revision.
fn write_history(
    chunks: &mut redb::Table<'_, (u64, u32), &'static [u8]>,
    revision: Revision,
    events: &[crate::Event],
) -> Result<(), StoreError> {
    for (i, chunk) in encode_event_chunks(revision, events).iter().enumerate() {
        // Unreachable: 2^32 chunks would be 256 TiB.
        let i = u32::try_from(i)
            .map_err(|_| StoreError::Invalid("too many events in one transaction".into()))?;
        chunks.insert((revision, i), chunk.as_slice())?;
    }
    Ok(())
}

fn open_error(path: &Path, err: redb::DatabaseError) -> StoreError {
    match err {
        redb::DatabaseError::DatabaseAlreadyOpen | redb::DatabaseError::LockProtocolMismatch => {
            StoreError::Locked {
                path: path.display().to_string(),
                detail: err.to_string(),
            }
        }
        other => match StoreError::from(redb::Error::from(other)) {
            StoreError::Backend(detail) => {
                StoreError::Backend(format!("opening {}: {detail}", path.display()))
            }
            mapped => mapped,
        },
    }
}

impl From<redb::Error> for StoreError {
    fn from(err: redb::Error) -> Self {
        match err {
            redb::Error::Corrupted(detail) => StoreError::Corrupt(detail),
            redb::Error::TableTypeMismatch { .. }
            | redb::Error::TableIsMultimap(_)
            | redb::Error::TypeDefinitionChanged { .. }
            | redb::Error::UpgradeRequired(_) => StoreError::Corrupt(err.to_string()),
            redb::Error::DatabaseClosed => StoreError::Unavailable(err.to_string()),
            other => StoreError::Backend(other.to_string()),
        }
    }
}

macro_rules! from_redb_error {
    ($($ty:ty),*) => {$(
        impl From<$ty> for StoreError {
            fn from(err: $ty) -> Self {
                redb::Error::from(err).into()
            }
        }
    )*};
}
from_redb_error!(
    redb::StorageError,
    redb::TransactionError,
    redb::TableError,
    redb::CommitError,
    redb::SetDurabilityError
);

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        self.inner.writer.expire_leases().await?;
        let rtx = self.inner.read()?;
        TableView(rtx.open_table(KV)?).get(key)
    }

    async fn range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<RangeResult, StoreError> {
        self.inner.writer.expire_leases().await?;
        let rtx = self.inner.read()?;
        let (_, revision) = read_bounds(&rtx)?;
        let limit = if limit == 0 { usize::MAX } else { limit };
        let (kvs, more) = scan_table(&rtx.open_table(KV)?, start, end, limit)?;
        Ok(RangeResult {
            kvs,
            more,
            revision,
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.inner.writer.expire_leases().await?;
        if txn.is_read_only() {
            // A snapshot is a serializable point for a transaction that
            // writes nothing: no need to queue behind writers.
            let rtx = self.inner.read()?;
            let (_, revision) = read_bounds(&rtx)?;
            let kv = TableView(rtx.open_table(KV)?);
            return Ok(apply_txn(&kv, &txn, revision, |_| true)?.response);
        }
        self.inner.writer.txn(txn).await
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        self.inner.writer.expire_leases().await?;
        Ok(read_bounds(&self.inner.read()?)?.1)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{encode_events_v1, encode_kv};
    use crate::{Event, EventKind, Op};
    use futures::StreamExt;
    use redb::TableHandle;

    fn event(kind: EventKind, key: &str, value: &str, revision: Revision) -> Event {
        let put = kind == EventKind::Put;
        Event {
            kind,
            kv: KeyValue {
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
                create_revision: if put { revision } else { 0 },
                mod_revision: revision,
                version: u64::from(put),
                lease: 0,
            },
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_format_1_file_is_migrated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let history = [
            // Below `oldest`: not carried over.
            (2, vec![event(EventKind::Put, "c", "1", 2)]),
            (3, vec![event(EventKind::Put, "a", "1", 3)]),
            (
                4,
                vec![
                    event(EventKind::Put, "b", "1", 4),
                    event(EventKind::Delete, "c", "", 4),
                ],
            ),
        ];
        {
            let db = Database::create(&path).unwrap();
            let wtx = db.begin_write().unwrap();
            {
                let mut meta = wtx.open_table(META).unwrap();
                for (name, value) in [
                    (META_FORMAT, 1),
                    (META_REVISION, 4),
                    (META_OLDEST, 3),
                    (META_NEXT_LEASE, 1),
                ] {
                    meta.insert(name, value).unwrap();
                }
                let mut kv = wtx.open_table(KV).unwrap();
                for (_, events) in &history[1..] {
                    let e = &events[0];
                    kv.insert(e.kv.key.as_slice(), encode_kv(&e.kv).as_slice())
                        .unwrap();
                }
                let mut events = wtx.open_table(EVENTS_V1).unwrap();
                for (revision, list) in &history {
                    events
                        .insert(*revision, encode_events_v1(list).as_slice())
                        .unwrap();
                }
                wtx.open_table(LEASES).unwrap();
            }
            wtx.commit().unwrap();
        }

        let s = RedbStore::open(&path, RedbOptions::default()).unwrap();
        let mut watch = s.watch(b"", 3).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(watch.next().await.unwrap().unwrap());
        }
        let expected: Vec<Event> = history[1..].iter().flat_map(|(_, e)| e.clone()).collect();
        assert_eq!(got, expected);
        assert!(matches!(
            s.watch(b"", 2).await.err(),
            Some(StoreError::Compacted {
                requested: 2,
                oldest: 3
            })
        ));
        let resp = s.txn(Txn::new().then(Op::put("d", "1"))).await.unwrap();
        assert_eq!(resp.revision, 5);
        assert_eq!(watch.next().await.unwrap().unwrap().kv.key, b"d");
        s.close().unwrap();

        let db = Database::open(&path).unwrap();
        let rtx = db.begin_read().unwrap();
        let tables: Vec<String> = rtx
            .list_tables()
            .unwrap()
            .map(|t| t.name().to_string())
            .collect();
        assert!(!tables.contains(&"events".to_string()), "{tables:?}");
        let meta = rtx.open_table(META).unwrap();
        assert_eq!(meta_get(&meta, META_FORMAT).unwrap(), FORMAT_VERSION);
        assert_eq!(meta_get(&meta, META_HISTORY_EVENTS).unwrap(), 1 + 2 + 1);
        let chunks: Vec<(u64, u32)> = rtx
            .open_table(EVENT_CHUNKS)
            .unwrap()
            .iter()
            .unwrap()
            .map(|e| e.unwrap().0.value())
            .collect();
        assert_eq!(chunks, vec![(3, 0), (4, 0), (5, 0)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replay_reads_stop_at_a_revision_after_enough_events() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path().join("store.redb"), RedbOptions::default()).unwrap();
        for i in 0..4 {
            let txn = Txn::new()
                .then(Op::put(format!("a{i}"), "v"))
                .then(Op::put(format!("b{i}"), "v"));
            s.txn(txn).await.unwrap();
        }
        let read = |max, max_events| -> Vec<(Revision, usize)> {
            History::read(&*s.inner, 2, 5, max, max_events)
                .unwrap()
                .iter()
                .map(|c| (c.revision, c.events.len()))
                .collect()
        };
        assert_eq!(read(512, 100), vec![(2, 2), (3, 2), (4, 2), (5, 2)]);
        assert_eq!(read(2, 100), vec![(2, 2), (3, 2)]);
        assert_eq!(read(512, 3), vec![(2, 2), (3, 2)]);
        assert_eq!(read(512, 1), vec![(2, 2)]);
        assert_eq!(History::read(&*s.inner, 4, 3, 512, 100).unwrap().len(), 0);
    }
}
