//! The PostgreSQL backend of allot's [`Store`]: several allot servers (or
//! applications embedding the engine) share one database for high
//! availability.
//!
//! Semantics are exactly those of the trait (and of the in-memory reference
//! backend); the conformance suite of `allot-store` runs unchanged against
//! this backend. How they map onto PostgreSQL:
//!
//! - **Revisions**: one row (`allot_revision`) holds the store revision.
//!   Every writing transaction locks it first and bumps it, so writers are
//!   serialized and commit in revision order (see the `write` module for the
//!   two-round-trip shape of a write, and the group commit that lets
//!   concurrent callers share one PostgreSQL transaction and WAL flush).
//! - **Transactions**: compares and operations are evaluated by the same
//!   code as every other backend (`allot_store::backend::apply_txn`),
//!   against keys read after the lock was taken; the outcome is written with
//!   one multi-row upsert and one delete.
//! - **Watch**: every event of a key under the recorded prefixes (`history`
//!   module; every key unless all clients asked for less) is appended to a
//!   change log in the same transaction; watchers replay it and then follow
//!   new rows, woken by `LISTEN`/`NOTIFY` (see the `watch` module).
//! - **Leases**: a table of deadlines judged by the database clock
//!   (`clock_timestamp()`), so every server agrees; a background task on
//!   every server deletes expired leases' keys in one revision (the revision
//!   lock makes concurrent expiries harmless), and calls that know a
//!   deadline has passed expire first.
//! - **Outages**: every call is bounded by [`PostgresOptions::timeout`] and
//!   fails with [`StoreError::Unavailable`]; broken connections are dropped
//!   and the pool opens new ones, so the store reconnects by itself.
//!
//! Connections use no TLS for now (loopback or a trusted network).
//!
//! Limits specific to this backend: keys are at most [`MAX_KEY_LEN`] bytes
//! (PostgreSQL's b-tree index entry limit), values at most 1 GiB.

mod error;
mod history;
mod schema;
mod shared;
#[cfg(feature = "testing")]
pub mod testing;
mod watch;
mod write;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allot_store::backend::apply_txn;
use allot_store::{
    KeyValue, LeaseId, Op, Prefixes, RangeResult, Revision, Store, StoreError, Txn, TxnResponse,
    WatchStream,
};
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, QueueMode, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot, watch as signal, Notify};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::error::{CallError, PgError};
use crate::schema::{validate_schema_name, Sql};
use crate::shared::{kv_at, to_u64, Limits, Shared, Signal};

/// The longest key this backend stores, in bytes: PostgreSQL cannot index
/// much longer ones, and a failing index write would fail every transaction
/// committed with it.
pub const MAX_KEY_LEN: usize = 2048;

/// Tuning of a [`PostgresStore`].
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// The PostgreSQL schema holding the store's tables (default `allot`),
    /// created if missing. Several stores can share a database under
    /// different schemas. Lower-case letters, digits and `_` only.
    pub schema: String,
    /// How many of the latest revisions of history are kept for watches to
    /// replay (default 100,000). Older ones are dropped in chunks of up to a
    /// tenth of this (at most 1,000 revisions) as writes go on.
    pub history_revisions: u64,
    /// The most events of history kept (default 1,000,000): once exceeded,
    /// whole revisions are dropped from the oldest on until at most nine
    /// tenths remain. The newest revision is always kept.
    pub history_events: u64,
    /// Connections in the pool (default 16), besides the one the watch
    /// listener holds.
    pub pool_size: usize,
    /// Bound on connecting and on every call (default 5 s): past it a call
    /// fails with [`StoreError::Unavailable`] instead of hanging.
    pub timeout: Duration,
    /// The most transactions committed together in one PostgreSQL
    /// transaction (default 1,024).
    pub max_batch: usize,
    /// Speculative batches in flight at most (default 2). Each batch is one
    /// statement, its own transaction; with 2 or more the next batch goes
    /// out at once, on the same connection behind the one committing, so
    /// the database starts it as soon as that one has committed: no round
    /// trip between commits (see the `write` module; BENCHMARKS.md §6 round
    /// 7 for 1, 2 and 4 on loopback and at a distance). 1 waits for each
    /// answer before sending the next batch; 0 puts every batch on the
    /// locked path (two round trips, nothing assumed), as before
    /// speculation existed.
    pub max_in_flight: usize,
    /// How often idle watchers look at the log even without a notification,
    /// and the longest the lease expiry task sleeps (default 1 s).
    pub poll_interval: Duration,
    /// The key prefixes whose changes this client needs watch history of
    /// (`None`, the default: every key). The database records the union of
    /// what its clients asked for, from the revision each prefix was first
    /// asked for on; a watch of keys outside it fails with
    /// [`StoreError::Invalid`], and one starting before that revision as
    /// compacted. Changes of other keys get no log row: a write is cheaper
    /// (the engine asks only for what it watches, see
    /// `allot::keys::WATCHED_PREFIXES`). The scope never narrows: once any
    /// client asked for every key (this default), or for a store upgraded
    /// from before schema v5, every key stays recorded.
    ///
    /// ```
    /// let options = allot_store_postgres::PostgresOptions {
    ///     history_prefixes: Some(vec![b"e/".to_vec(), b"m/".to_vec()]),
    ///     ..Default::default()
    /// };
    /// # let _ = options;
    /// ```
    pub history_prefixes: Option<Vec<Vec<u8>>>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            schema: "allot".into(),
            history_revisions: 100_000,
            history_events: 1_000_000,
            pool_size: 16,
            timeout: Duration::from_secs(5),
            max_batch: 1024,
            max_in_flight: 2,
            poll_interval: Duration::from_secs(1),
            history_prefixes: None,
        }
    }
}

/// A [`Store`] in a PostgreSQL database.
///
/// Cloning is cheap and every clone shares the same connections. When the
/// last clone is dropped, queued transactions are still committed and then
/// the background tasks (committer, watch listener, lease expiry) stop; open
/// watch streams end with [`StoreError::Unavailable`].
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.inner.schema)
            .finish()
    }
}

struct Inner {
    schema: String,
    shared: Arc<Shared>,
    /// The committer's queue; dropping it (with the last handle) lets the
    /// committer finish what is queued and end.
    txns: mpsc::Sender<write::Request>,
    /// The listener and expiry tasks, aborted on drop (they only wait).
    tasks: Vec<AbortHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.signal.send_modify(|s| s.closed = true);
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (a `postgres://user@host:port/db`
    /// URL or a `key=value` connection string), creates or migrates the
    /// schema, and starts the background tasks.
    ///
    /// Must be called within a tokio runtime. Fails with
    /// [`StoreError::Unavailable`] if the database cannot be reached within
    /// the timeout, [`StoreError::Invalid`] for a bad URL or options, and
    /// [`StoreError::Backend`] if the schema was written by a newer version
    /// of allot.
    pub async fn connect(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        validate_schema_name(&options.schema).map_err(StoreError::Invalid)?;
        if options.timeout.is_zero() || options.poll_interval.is_zero() {
            return Err(StoreError::Invalid(
                "timeout and poll interval must be positive".into(),
            ));
        }
        let config = pg_config(url, options.timeout)?;
        let manager = Manager::from_config(
            config.clone(),
            tokio_postgres::NoTls,
            ManagerConfig {
                // A broken connection is noticed by the call using it (and
                // dropped then); checking each one before use would cost a
                // round trip per call.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            // The connection used last: its backend's caches and memory are
            // warm. First in, first out went round every idle connection,
            // one backend per commit at a single caller.
            .queue_mode(QueueMode::Lifo)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.timeout))
            .create_timeout(Some(options.timeout))
            .recycle_timeout(Some(options.timeout))
            .build()
            .map_err(|e| StoreError::Backend(format!("building the connection pool: {e}")))?;
        // Far beyond any real history, and small enough that the SQL
        // arithmetic cannot overflow.
        let cap = |v: u64| i64::try_from(v).unwrap_or(i64::MAX).clamp(1, 1 << 60);
        let keep_revisions = cap(options.history_revisions);
        let limits = Limits {
            keep_revisions,
            revision_slack: (keep_revisions / 10).min(1000),
            keep_events: cap(options.history_events),
            max_batch: options.max_batch.max(1),
            max_in_flight: options.max_in_flight,
            timeout: options.timeout,
            poll_interval: options.poll_interval,
        };
        let (signal, _) = signal::channel(Signal::default());
        let shared = Arc::new(Shared {
            pool,
            sql: Sql::new(&options.schema),
            limits,
            signal,
            own: Mutex::new(VecDeque::with_capacity(shared::OWN_REMEMBERED)),
            next_due: Mutex::new(None),
            expiry_lock: tokio::sync::Mutex::new(()),
            expiry_wake: Notify::new(),
            redone: std::sync::atomic::AtomicU64::new(0),
            staged: std::sync::atomic::AtomicU64::new(0),
        });

        let wanted = options.history_prefixes.unwrap_or_else(|| vec![Vec::new()]);
        let conn = shared.conn().await?;
        let mut result = shared.timed(schema::migrate(&conn, &options.schema)).await;
        if result.is_ok() {
            result = shared
                .timed(write::widen_history(&conn, &shared, &wanted))
                .await;
        }
        shared.settle(conn, result)?;

        let (txns, queue) = mpsc::channel(limits.max_batch * 4);
        tokio::spawn(write::run_committer(shared.clone(), queue));
        let listener = tokio::spawn(watch::run_listener(shared.clone(), config));
        let expiry = tokio::spawn(run_expiry(shared.clone()));
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                schema: options.schema,
                shared,
                txns,
                tasks: vec![listener.abort_handle(), expiry.abort_handle()],
            }),
        })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// Batches this store committed speculatively that failed their checks
    /// (nothing written) and ran again on the locked path, since it opened:
    /// each is a sign of another writer (another server, lease expiry) or of
    /// a key this store assumed absent. A store that is the only writer and
    /// writes keys it created should see none.
    ///
    /// ```no_run
    /// # async fn f(store: allot_store_postgres::PostgresStore) {
    /// println!("{} batches redone", store.redone_batches());
    /// # }
    /// ```
    pub fn redone_batches(&self) -> u64 {
        self.shared()
            .redone
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Speculative batches this store sent staged since it opened: as
    /// `BEGIN`, the write statement and `COMMIT`, behind another batch, with
    /// the next batch held back until the statement had run. The committer
    /// stages batches while they are small (a few callers at a time), where
    /// holding the next one back lets more callers join it.
    ///
    /// ```no_run
    /// # async fn f(store: allot_store_postgres::PostgresStore) {
    /// println!("{} batches staged", store.staged_batches());
    /// # }
    /// ```
    pub fn staged_batches(&self) -> u64 {
        self.shared()
            .staged
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Expires leases first if this process knows a deadline has passed, so
    /// that no call observes a key whose lease is due.
    async fn expire_if_due(&self) -> Result<(), StoreError> {
        if self.shared().lease_due() {
            write::expire_due(self.shared(), true).await?;
        }
        Ok(())
    }
}

/// Parses the connection URL and adds what the store relies on: bounded
/// connection attempts, TCP keepalives so a vanished server is noticed,
/// durable commits, and server-side limits so that a client that vanished
/// (or gave up on a call) cannot keep the revision row locked
/// (`client_connection_check_interval` needs PostgreSQL 14 or newer).
fn pg_config(url: &str, timeout: Duration) -> Result<tokio_postgres::Config, StoreError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| StoreError::Invalid(format!("invalid PostgreSQL URL: {e}")))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(timeout);
    }
    if config.get_application_name().is_none() {
        config.application_name("allot");
    }
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(3)
        .tcp_user_timeout(timeout * 2);
    let ms = timeout.as_millis();
    // synchronous_commit: an acknowledged write is on disk, whatever the
    // server's default says (never weaker than the other backends).
    // enable_seqscan=off: every statement on allot_kv and allot_log has an
    // index path, but plans are cached per connection and made while a
    // table is small; one made on tiny statistics kept scanning allot_kv
    // whole after it grew (a read of two keys took 20 ms at 200k keys
    // instead of 0.05 ms, and keyed claims at 64 clients fell from 15k/s to
    // 2.8k/s). jit=off: the statements are short, and the penalty seq-scan
    // costs carry would otherwise cross the JIT threshold and compile every
    // plan.
    // plan_cache_mode=force_generic_plan: PostgreSQL kept planning the
    // write statement anew on every execution (its array parameters make a
    // custom plan look cheaper than the generic one), a quarter of the
    // writing backend's CPU; with seq scans off the generic plan is the
    // index plan a custom one would be.
    let ours = format!(
        "-c synchronous_commit=on -c enable_seqscan=off -c jit=off \
         -c plan_cache_mode=force_generic_plan -c lock_timeout={ms} \
         -c idle_in_transaction_session_timeout={} -c client_connection_check_interval=1000",
        ms * 2
    );
    let options = match config.get_options() {
        Some(theirs) if !theirs.is_empty() => format!("{ours} {theirs}"),
        _ => ours,
    };
    config.options(options);
    Ok(config)
}

/// The expiry task: expires due leases and sleeps until the next deadline
/// (at most `poll_interval`, as other servers may grant shorter leases), or
/// until this process grants one. Aborted when the store is dropped.
async fn run_expiry(shared: Arc<Shared>) {
    let poll = shared.limits.poll_interval;
    loop {
        let wait = match write::expire_due(&shared, false).await {
            Ok(Some(next)) => next.min(poll),
            Ok(None) => poll,
            Err(err) => {
                tracing::warn!(%err, "expiring leases failed");
                poll
            }
        };
        tokio::select! {
            // A little past the deadline, so that the database clock agrees
            // it has passed.
            _ = tokio::time::sleep(wait + Duration::from_millis(2)) => {}
            _ = shared.expiry_wake.notified() => {}
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        self.expire_if_due().await?;
        let shared = self.shared();
        let conn = shared.conn().await?;
        let result = shared
            .timed(async {
                let stmt = conn.prepare_cached(&shared.sql.get).await?;
                match conn.query_opt(&stmt, &[&key]).await? {
                    Some(row) => kv_at(&row, 0),
                    None => Ok(None),
                }
            })
            .await;
        shared.settle(conn, result)
    }

    async fn range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<RangeResult, StoreError> {
        self.expire_if_due().await?;
        let shared = self.shared();
        // One more than asked, to learn whether more remain.
        let fetch: Option<i64> = match limit {
            0 => None,
            n => Some(i64::try_from(n).unwrap_or(i64::MAX - 1) + 1),
        };
        let conn = shared.conn().await?;
        let result = shared
            .timed(async {
                let rows = if end.is_empty() {
                    let stmt = conn.prepare_cached(&shared.sql.range_from).await?;
                    conn.query(&stmt, &[&start, &fetch]).await?
                } else {
                    let stmt = conn.prepare_cached(&shared.sql.range).await?;
                    conn.query(&stmt, &[&start, &end, &fetch]).await?
                };
                let mut revision = None;
                let mut kvs = Vec::with_capacity(rows.len());
                for row in &rows {
                    revision = Some(to_u64(row.try_get(0)?, "revision")?);
                    kvs.extend(kv_at(row, 1)?);
                }
                let revision = revision
                    .ok_or_else(|| PgError::Corrupt("the revision row is missing".into()))?;
                Ok::<_, CallError>((revision, kvs))
            })
            .await;
        let (revision, mut kvs) = shared.settle(conn, result)?;
        let more = limit != 0 && kvs.len() > limit;
        if more {
            kvs.truncate(limit);
        }
        Ok(RangeResult {
            kvs,
            more,
            revision,
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.expire_if_due().await?;
        for op in txn.success.iter().chain(&txn.failure) {
            if let Op::Put { key, .. } = op {
                if key.len() > MAX_KEY_LEN {
                    return Err(StoreError::Invalid(format!(
                        "key of {} bytes is longer than the {MAX_KEY_LEN} this backend stores",
                        key.len()
                    )));
                }
            }
        }
        if txn.is_read_only() {
            return self.read_only_txn(txn).await;
        }
        let (reply, answer) = oneshot::channel();
        let closed = || StoreError::Unavailable("store closed".into());
        self.inner
            .txns
            .send(write::Request { txn, reply })
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        self.expire_if_due().await?;
        let shared = self.shared();
        let conn = shared.conn().await?;
        let result = shared
            .timed(async {
                let stmt = conn.prepare_cached(&shared.sql.current_revision).await?;
                let row = conn.query_one(&stmt, &[]).await?;
                Ok(to_u64(row.try_get(0)?, "revision")?)
            })
            .await;
        shared.settle(conn, result)
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("lease TTL must be positive".into()));
        }
        // Whole milliseconds, rounded up; an absurd TTL means "a century".
        let ms = ttl.as_nanos().div_ceil(1_000_000);
        let ms = i64::try_from(ms)
            .unwrap_or(i64::MAX)
            .min(100 * 365 * 86_400_000);
        let shared = self.shared();
        let conn = shared.conn().await?;
        let result = shared
            .timed(async {
                let stmt = conn.prepare_cached(&shared.sql.grant).await?;
                let row = conn.query_one(&stmt, &[&ms]).await?;
                Ok(to_u64(row.try_get(0)?, "lease id")?)
            })
            .await;
        let id = shared.settle(conn, result)?;
        {
            let deadline = Instant::now() + Duration::from_millis(ms as u64);
            let mut due = shared.next_due();
            *due = Some(due.map_or(deadline, |d| d.min(deadline)));
        }
        shared.expiry_wake.notify_one();
        Ok(id)
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let Ok(id) = i64::try_from(lease) else {
            return Err(StoreError::LeaseNotFound(lease));
        };
        let shared = self.shared();
        let conn = shared.conn().await?;
        let result = shared
            .timed(async {
                let stmt = conn.prepare_cached(&shared.sql.keep_alive).await?;
                match conn.query_opt(&stmt, &[&id]).await? {
                    Some(row) => Ok(Some(to_u64(row.try_get(0)?, "lease TTL")?)),
                    None => Ok(None),
                }
            })
            .await;
        match shared.settle(conn, result)? {
            Some(ms) => Ok(Duration::from_millis(ms)),
            None => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.expire_if_due().await?;
        let shared = self.shared();
        let conn = shared.conn().await?;
        let result = shared.timed(write::revoke(&conn, shared, lease)).await;
        shared.settle(conn, result)
    }

    async fn watch_prefixes(
        &self,
        prefixes: &Prefixes,
        from: Revision,
    ) -> Result<WatchStream, StoreError> {
        self.expire_if_due().await?;
        watch::start(self.shared(), prefixes, from, false).await
    }

    /// Woken by other servers' commits only: this store's own changes come
    /// with the next of those, or within `poll_interval` (a follower has no
    /// use for them, and paging the log after each of our own commits cost
    /// a keyed claim ~0.1 ms at 1 client).
    async fn watch_each(
        &self,
        prefixes: &Prefixes,
        from: Revision,
    ) -> Result<WatchStream, StoreError> {
        self.expire_if_due().await?;
        watch::start(self.shared(), prefixes, from, true).await
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.expire_if_due().await?;
        let shared = self.shared();
        let conn = shared.conn().await?;
        let result = shared.timed(write::compact(&conn, shared, revision)).await;
        shared.settle(conn, result)
    }

    /// Writes are queued to the committer in call order (unless a due
    /// lease expiry or a full queue makes a call wait first).
    fn keeps_write_order(&self) -> bool {
        true
    }

    fn is_shared(&self) -> bool {
        true
    }
}

impl PostgresStore {
    /// A transaction that writes nothing needs no lock: one statement reads
    /// every key it names and the revision from one snapshot, which is a
    /// serializable point for it.
    async fn read_only_txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let shared = self.shared();
        let mut keys: Vec<&Vec<u8>> = txn.compare.iter().map(|c| &c.key).collect();
        for op in txn.success.iter().chain(&txn.failure) {
            if let Op::Get { key } = op {
                keys.push(key);
            }
        }
        let conn = shared.conn().await?;
        let result = shared
            .timed(async {
                let stmt = conn.prepare_cached(&shared.sql.snapshot_keys).await?;
                let rows = conn.query(&stmt, &[&keys]).await?;
                let mut revision = None;
                let mut view = std::collections::BTreeMap::new();
                for row in &rows {
                    revision = Some(to_u64(row.try_get(0)?, "revision")?);
                    if let Some(kv) = kv_at(row, 1)? {
                        view.insert(kv.key.clone(), kv);
                    }
                }
                let revision = revision
                    .ok_or_else(|| PgError::Corrupt("the revision row is missing".into()))?;
                Ok::<_, CallError>((revision, view))
            })
            .await;
        let (revision, view) = shared.settle(conn, result)?;
        Ok(apply_txn(&view, &txn, revision, |_| false)?.response)
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::fresh_store;

    async fn backend_pid(conn: &crate::shared::Conn) -> (i32, bool) {
        let row = conn
            .query_one(
                "SELECT pg_backend_pid(), txid_current_if_assigned() IS NULL",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }

    /// A call whose future is dropped half-way (a caller's timeout, a
    /// client gone) must not hand its connection, perhaps inside a
    /// transaction it began, to the next call; one that ends normally gives
    /// it back, and the next call gets that same, warm connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_left_mid_call_is_discarded_and_a_settled_one_reused() {
        let (store, _) = fresh_store(1000, 100_000).await;
        let shared = store.shared();

        let conn = shared.conn().await.unwrap();
        let (settled, idle) = backend_pid(&conn).await;
        assert!(idle);
        shared.settle(conn, Ok(())).unwrap();
        let conn = shared.conn().await.unwrap();
        assert_eq!(
            backend_pid(&conn).await.0,
            settled,
            "the warm one comes back"
        );

        // As `expire_on` would leave it if its caller went away after BEGIN.
        conn.batch_execute("BEGIN; SELECT txid_current()")
            .await
            .unwrap();
        drop(conn);
        for _ in 0..3 {
            let conn = shared.conn().await.unwrap();
            let (pid, idle) = backend_pid(&conn).await;
            assert_ne!(
                pid, settled,
                "the abandoned connection was handed out again"
            );
            assert!(idle, "a connection inside a transaction was handed out");
            shared.settle(conn, Ok(())).unwrap();
        }
    }
}
