//! The embedded durable backend, on a single redb file.
//!
//! Reads (`get`, `range`, read-only transactions, watch replay) use redb read
//! transactions directly from the calling task. Every write goes to one
//! dedicated committer thread ([`committer`]), which batches whatever writes
//! are queued into one redb write transaction and one fsync (group commit),
//! so concurrent writers share the cost of durability.
//!
//! Tables:
//! - `kv`: key → [`crate::codec::encode_kv`] record (value and bookkeeping);
//! - `meta`: `format`, `revision`, `oldest` (oldest retained history
//!   revision) and `next_lease`;
//! - `events`: revision → the events of that revision
//!   ([`crate::codec::encode_events`]), the watch history;
//! - `leases`: lease id → TTL in milliseconds.

mod committer;

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use tokio::sync::{broadcast, oneshot};
use tokio::time::Instant;

use crate::apply::{apply_txn, KvRead};
use crate::codec::{decode_events, decode_kv};
use crate::lease::{ExpiryTask, LeaseClock, LeaseHost};
use crate::watch::{start_revision, watch_stream, Committed, History, BROADCAST_CAPACITY};
use crate::{
    KeyValue, LeaseId, RangeResult, Revision, Store, StoreError, Txn, TxnResponse, WatchStream,
};
use committer::{CommitState, Committer, Request};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const LEASES: TableDefinition<u64, u64> = TableDefinition::new("leases");

const META_FORMAT: &str = "format";
const META_REVISION: &str = "revision";
const META_OLDEST: &str = "oldest";
const META_NEXT_LEASE: &str = "next_lease";
const FORMAT_VERSION: u64 = 1;

/// Tuning of a [`RedbStore`].
#[derive(Debug, Clone)]
pub struct RedbOptions {
    /// How many of the latest revisions of history are kept for watches to
    /// replay (default 100,000). Older history is dropped in chunks as
    /// writes go on; current values are never affected.
    pub history_revisions: u64,
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
            history_revisions: 100_000,
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

/// State shared between the async handles and the committer thread.
pub(crate) struct Shared {
    /// Deadlines of committed leases. The committer adds and removes leases
    /// after their commit; keep-alives only move deadlines.
    clock: Mutex<LeaseClock>,
    /// Committed revisions, sent by the committer after each commit.
    events: broadcast::Sender<Arc<Committed>>,
}

impl Shared {
    fn clock(&self) -> MutexGuard<'_, LeaseClock> {
        // The clock is a plain map updated in single steps; a panic elsewhere
        // cannot leave it half-changed.
        self.clock.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Inner {
    path: PathBuf,
    /// The error text once the committer is gone, made once.
    closed_message: Arc<str>,
    db: Arc<Database>,
    shared: Arc<Shared>,
    requests: mpsc::Sender<Request>,
    committer: Mutex<Option<JoinHandle<()>>>,
    expiry: ExpiryTask,
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
        let state = CommitState::load(&db)?;
        let mut clock = LeaseClock::default();
        let now = Instant::now();
        for (id, ttl) in state.lease_ttls() {
            clock.insert(id, ttl, now);
        }
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let shared = Arc::new(Shared {
            clock: Mutex::new(clock),
            events,
        });
        let db = Arc::new(db);
        let (requests, rx) = mpsc::channel();
        let committer = Committer::new(
            db.clone(),
            shared.clone(),
            state,
            rx,
            opts.history_revisions.max(1),
            opts.max_batch.max(1),
        );
        let handle = std::thread::Builder::new()
            .name("allot-store-commit".into())
            .spawn(move || committer.run())
            .map_err(|e| StoreError::Backend(format!("starting the committer thread: {e}")))?;
        Ok(RedbStore {
            inner: Arc::new(Inner {
                closed_message: format!("store {} is closed", path.display()).into(),
                path,
                db,
                shared,
                requests,
                committer: Mutex::new(Some(handle)),
                expiry: ExpiryTask::default(),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Commits queued writes and stops the committer thread. Writes through
    /// other clones fail with [`StoreError::Unavailable`] afterwards; the file
    /// is released when the last clone is dropped. Blocking.
    pub fn close(self) -> Result<(), StoreError> {
        self.inner.stop()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            tracing::error!(%err, path = %self.path.display(), "closing the store");
        }
    }
}

impl Inner {
    fn stop(&self) -> Result<(), StoreError> {
        let handle = self
            .committer
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
    async fn expire_leases(&self) -> Result<(), StoreError> {
        match self.start_expiry() {
            Some(done) => done.await,
            None => Ok(()),
        }
    }

    fn read(&self) -> Result<ReadTransaction, StoreError> {
        Ok(self.db.begin_read()?)
    }
}

impl LeaseHost for Inner {
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
    ) -> Result<Vec<Arc<Committed>>, StoreError> {
        let rtx = self.read()?;
        let (oldest, _) = read_bounds(&rtx)?;
        if from < oldest {
            return Err(StoreError::Compacted {
                requested: from,
                oldest,
            });
        }
        let events = rtx.open_table(EVENTS)?;
        let mut out = Vec::new();
        for entry in events.range(from..=to)?.take(max) {
            let (revision, bytes) = entry?;
            let revision = revision.value();
            out.push(Arc::new(Committed {
                revision,
                events: decode_events(bytes.value())?,
            }));
        }
        Ok(out)
    }
}

/// A [`KvRead`] over a `kv` table of a read or write transaction.
pub(crate) struct TableView<'t, T>(pub &'t T);

impl<T: ReadableTable<&'static [u8], &'static [u8]>> KvRead for TableView<'_, T> {
    fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        match self.0.get(key)? {
            Some(bytes) => Ok(Some(decode_kv(key, bytes.value())?)),
            None => Ok(None),
        }
    }

    fn scan(&self, start: &[u8], end: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        scan_table(self.0, start, end, usize::MAX).map(|(kvs, _)| kvs)
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
        wtx.open_table(EVENTS)?;
        wtx.open_table(LEASES)?;
        let mut meta = wtx.open_table(META)?;
        let format = meta.get(META_FORMAT)?.map(|v| v.value());
        match format {
            Some(FORMAT_VERSION) => {}
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
                meta.insert(META_NEXT_LEASE, 1)?;
            }
        }
    }
    wtx.commit()?;
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
        self.inner.expire_leases().await?;
        let rtx = self.inner.read()?;
        TableView(&rtx.open_table(KV)?).get(key)
    }

    async fn range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<RangeResult, StoreError> {
        self.inner.expire_leases().await?;
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
        self.inner.expire_leases().await?;
        if txn.is_read_only() {
            // A snapshot is a serializable point for a transaction that
            // writes nothing: no need to queue behind writers.
            let rtx = self.inner.read()?;
            let (_, revision) = read_bounds(&rtx)?;
            let kv = rtx.open_table(KV)?;
            return Ok(apply_txn(&TableView(&kv), &txn, revision, |_| true)?.response);
        }
        let now = Instant::now();
        self.inner
            .send(|reply| Request::Txn { txn, now, reply })
            .await
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        self.inner.expire_leases().await?;
        Ok(read_bounds(&self.inner.read()?)?.1)
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("lease TTL must be positive".into()));
        }
        self.inner.expire_leases().await?;
        let now = Instant::now();
        let id = self
            .inner
            .send(|reply| Request::Grant { ttl, now, reply })
            .await?;
        ExpiryTask::ensure_running(&self.inner);
        Ok(id)
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.inner.expire_leases().await?;
        self.inner
            .shared
            .clock()
            .renew(lease, Instant::now())
            .ok_or(StoreError::LeaseNotFound(lease))
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.expire_leases().await?;
        self.inner
            .send(|reply| Request::Revoke {
                ids: vec![lease],
                expired_at: None,
                reply,
            })
            .await
    }

    async fn watch(&self, prefix: &[u8], from: Revision) -> Result<WatchStream, StoreError> {
        self.inner.expire_leases().await?;
        // Subscribe before reading the current revision: a revision committed
        // in between is then both in the log and in the channel, and the
        // stream skips the duplicate; the other order could lose it.
        let rx = self.inner.shared.events.subscribe();
        let (oldest, current) = self.inner.bounds()?;
        let start = start_revision(from, oldest, current)?;
        Ok(watch_stream(
            Arc::downgrade(&self.inner),
            rx,
            prefix,
            start,
            current,
        ))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.inner.expire_leases().await?;
        self.inner
            .send(|reply| Request::Compact { revision, reply })
            .await
    }
}
