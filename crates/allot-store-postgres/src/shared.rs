//! State shared by the store handles and its background tasks, and the
//! small helpers every call uses: taking a connection, bounding a call in
//! time, giving the connection back (or dropping it), decoding rows.

use std::future::Future;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use allot_store::{KeyValue, Revision, StoreError};
use deadpool_postgres::{Object, Pool};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_postgres::Row;

use crate::error::{CallError, PgError};
use crate::schema::Sql;

/// What watchers wait on: the newest revision known to be committed,
/// whether the store was dropped, and a counter the listener bumps whenever
/// its connection goes down or comes back, so that idle watchers look at
/// the database then (and fail promptly in an outage, or catch up on
/// notifications missed while it lasted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Signal {
    pub revision: Revision,
    /// The newest revision known committed that this process may not have
    /// made (notified by the listener and not one of `Shared::own`):
    /// wakes the watchers that take this process's own changes lazily.
    pub foreign: Revision,
    pub closed: bool,
    pub epoch: u64,
}

/// Raises `slot` to `to`; whether it moved (for `send_if_modified`).
fn advance(slot: &mut Revision, to: Revision) -> bool {
    let moved = to > *slot;
    if moved {
        *slot = to;
    }
    moved
}

/// How many of this process's last commits are remembered, to tell their
/// notifications from other processes'.
pub(crate) const OWN_REMEMBERED: usize = 4096;

/// History and batching limits, converted once for SQL.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub keep_revisions: i64,
    pub revision_slack: i64,
    pub keep_events: i64,
    pub max_batch: usize,
    pub max_in_flight: usize,
    pub timeout: Duration,
    pub poll_interval: Duration,
}

/// Everything the store handles and the background tasks share. Tasks hold
/// it, never the store handle itself, so that dropping the last handle
/// stops them (see `Inner`'s `Drop` in the crate root).
pub(crate) struct Shared {
    pub pool: Pool,
    pub sql: Sql,
    pub limits: Limits,
    pub signal: watch::Sender<Signal>,
    /// The last revisions this process's commits ended at, oldest first
    /// (what their notifications carry).
    pub own: Mutex<std::collections::VecDeque<Revision>>,
    /// The earliest lease deadline this process knows of, on its own clock
    /// (an estimate: the database clock decides). Calls that find it passed
    /// expire leases first, so that nobody reads a key whose lease is due.
    pub next_due: Mutex<Option<Instant>>,
    /// One expiry at a time per process.
    pub expiry_lock: tokio::sync::Mutex<()>,
    /// Wakes the expiry task when a lease is granted.
    pub expiry_wake: Notify,
    /// Speculative batches that failed their checks and ran again on the
    /// locked path (see `PostgresStore::redone_batches`).
    pub redone: std::sync::atomic::AtomicU64,
    /// Speculative batches sent staged (see `PostgresStore::staged_batches`).
    pub staged: std::sync::atomic::AtomicU64,
}

/// A pooled connection taken for one call, given back by
/// [`Shared::settle`]. Dropped without it (the call's future was dropped
/// half-way: a caller's timeout, a client gone), the connection is
/// discarded, not returned: it may be inside a transaction the call began,
/// holding the revision row's lock, and the pool hands out the connection
/// used last, so the next call would run inside that transaction.
pub(crate) struct Conn(Option<Object>);

impl Conn {
    /// The connection itself, for a holder that guards it by other means
    /// (the committer's pipe).
    pub fn keep(mut self) -> Object {
        match self.0.take() {
            Some(conn) => conn,
            None => unreachable!("{EMPTIED}"),
        }
    }
}

/// `Conn` is emptied only by `keep` and `settle`, which consume it.
const EMPTIED: &str = "a connection given back is used";

impl std::ops::Deref for Conn {
    type Target = Object;

    fn deref(&self) -> &Self::Target {
        match &self.0 {
            Some(conn) => conn,
            None => unreachable!("{EMPTIED}"),
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(Object::take(conn));
        }
    }
}

impl Shared {
    /// Takes a connection from the pool, within the call timeout.
    pub async fn conn(&self) -> Result<Conn, StoreError> {
        match tokio::time::timeout(self.limits.timeout, self.pool.get()).await {
            Ok(Ok(conn)) => Ok(Conn(Some(conn))),
            Ok(Err(err)) => Err(PgError::Pool(err).into()),
            Err(_) => Err(PgError::Timeout(self.limits.timeout).into()),
        }
    }

    /// Runs `fut` within the call timeout.
    pub async fn timed<T>(
        &self,
        fut: impl Future<Output = Result<T, CallError>>,
    ) -> Result<T, CallError> {
        match tokio::time::timeout(self.limits.timeout, fut).await {
            Ok(result) => result,
            Err(_) => Err(PgError::Timeout(self.limits.timeout).into()),
        }
    }

    /// Ends a call: a connection that saw a PostgreSQL error or a timeout is
    /// dropped rather than returned to the pool, since it may be half-way
    /// through a pipeline or inside an aborted transaction; the pool opens a
    /// fresh one when needed, which is also how the store reconnects after
    /// an outage.
    pub fn settle<T>(&self, conn: Conn, result: Result<T, CallError>) -> Result<T, StoreError> {
        let poisoned = matches!(&result, Err(err) if err.poisons_connection());
        if !poisoned {
            // Back to the pool; a poisoned one is discarded as `conn` drops.
            drop(conn.keep());
        }
        result.map_err(StoreError::from)
    }

    /// Notes, before it is sent, a commit of this process that will end at
    /// `revision`, so that its notification, which may overtake the
    /// answer, is known for ours. Call [`OwnCommit::committed`] once it is.
    pub fn expect_own(&self, revision: Revision) -> OwnCommit<'_> {
        {
            let mut own = self.own.lock().unwrap_or_else(PoisonError::into_inner);
            if own.len() == OWN_REMEMBERED {
                own.pop_front();
            }
            own.push_back(revision);
        }
        OwnCommit {
            shared: self,
            revision,
            committed: false,
        }
    }

    /// Records that `revision` is committed, notified by the database: by
    /// another process unless it is one of ours (a notification of ours
    /// that overtakes our own record of it counts as foreign: one wake-up
    /// too many, never one too few).
    pub fn publish_notified(&self, revision: Revision) {
        // Held across the signal: a failed commit of ours un-notes its
        // revision under the same lock (see `OwnCommit`'s drop), so it sees
        // this notification's revision, or this sees it un-noted.
        let mut own = self.own.lock().unwrap_or_else(PoisonError::into_inner);
        let ours = own.contains(&revision);
        // Notifications come in commit order: ours up to here are all in.
        while own.front().is_some_and(|&r| r <= revision) {
            own.pop_front();
        }
        self.signal.send_if_modified(|s| {
            let changed = advance(&mut s.revision, revision);
            (!ours && advance(&mut s.foreign, revision)) || changed
        });
    }

    /// Wakes every idle watcher (see [`Signal::epoch`]).
    pub fn bump_epoch(&self) {
        self.signal.send_modify(|s| s.epoch += 1);
    }

    pub fn next_due(&self) -> MutexGuard<'_, Option<Instant>> {
        // A plain value: a panic elsewhere cannot leave it half-written.
        self.next_due.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// True if a lease deadline known to this process has passed.
    pub fn lease_due(&self) -> bool {
        self.next_due().is_some_and(|due| Instant::now() >= due)
    }
}

/// A stored non-negative integer as `u64`.
pub(crate) fn to_u64(v: i64, what: &str) -> Result<u64, PgError> {
    u64::try_from(v).map_err(|_| PgError::Corrupt(format!("negative {what} {v} in the database")))
}

/// A store integer as PostgreSQL's `bigint`.
pub(crate) fn to_i64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Invalid(format!("{what} {v} is out of range")))
}

/// Decodes the six key columns starting at column `at`; `None` if the key
/// column is NULL (an outer join without a match).
pub(crate) fn kv_at(row: &Row, at: usize) -> Result<Option<KeyValue>, CallError> {
    let Some(key) = row.try_get::<_, Option<Vec<u8>>>(at)? else {
        return Ok(None);
    };
    Ok(Some(KeyValue {
        key,
        value: row.try_get(at + 1)?,
        create_revision: to_u64(row.try_get(at + 2)?, "create revision")?,
        mod_revision: to_u64(row.try_get(at + 3)?, "mod revision")?,
        version: to_u64(row.try_get(at + 4)?, "version")?,
        lease: to_u64(row.try_get(at + 5)?, "lease")?,
    }))
}

/// Clones an error for every request of a failed batch (`StoreError` is
/// not `Clone`).
pub(crate) fn copy_error(err: &StoreError) -> StoreError {
    match err {
        StoreError::Compacted { requested, oldest } => StoreError::Compacted {
            requested: *requested,
            oldest: *oldest,
        },
        StoreError::FutureRevision { requested, current } => StoreError::FutureRevision {
            requested: *requested,
            current: *current,
        },
        StoreError::LeaseNotFound(id) => StoreError::LeaseNotFound(*id),
        StoreError::Unavailable(s) => StoreError::Unavailable(s.clone()),
        StoreError::Locked { path, detail } => StoreError::Locked {
            path: path.clone(),
            detail: detail.clone(),
        },
        StoreError::Corrupt(s) => StoreError::Corrupt(s.clone()),
        StoreError::Backend(s) => StoreError::Backend(s.clone()),
        StoreError::Invalid(s) => StoreError::Invalid(s.clone()),
    }
}

/// A commit of this process on its way (see [`Shared::expect_own`]).
pub(crate) struct OwnCommit<'a> {
    shared: &'a Shared,
    revision: Revision,
    committed: bool,
}

impl OwnCommit<'_> {
    /// It committed: wakes the watchers (except the lazy ones).
    pub fn committed(mut self) {
        self.committed = true;
        let revision = self.revision;
        self.shared
            .signal
            .send_if_modified(|s| advance(&mut s.revision, revision));
    }
}

impl Drop for OwnCommit<'_> {
    /// It did not commit (or nobody knows): the revision is not ours, and
    /// another process may have made it, its notification taken for ours
    /// meanwhile; if one came, the lazy watchers are woken now.
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let revision = self.revision;
        // Held across the signal, as in `publish_notified`.
        let own = self.shared.own.lock();
        let mut own = own.unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = own.iter().rposition(|&r| r == revision) {
            own.remove(i);
        }
        self.shared
            .signal
            .send_if_modified(|s| s.revision >= revision && advance(&mut s.foreign, revision));
    }
}
