//! Everything that writes: the transaction committer (group commit), lease
//! revocation and expiry, and compaction.
//!
//! Every writing PostgreSQL transaction has the same shape, in two round
//! trips thanks to pipelining (statements are sent without waiting for the
//! previous answers, and the server runs them in order):
//!
//! 1. `BEGIN`, lock the revision row (`SELECT ... FOR UPDATE`), then read
//!    everything the evaluation depends on. The reads run after the lock is
//!    granted and, in READ COMMITTED, each takes a fresh snapshot, so they
//!    see every transaction committed before ours: evaluation is
//!    serializable, since no other writer can commit until we release the
//!    lock at our commit.
//! 2. Evaluate in Rust (`allot_store::backend::apply_txn`, the code every
//!    backend shares), then write the final state of each key (one
//!    multi-row upsert via `UNNEST`, one delete), append the events to the
//!    log, call `allot_finish` (revision, retention bounds, `pg_notify`) and
//!    `COMMIT`.
//!
//! Because the revision row lock is held until the commit is durable,
//! revision N+1 can only commit after N is visible: a watcher reading the
//! log never sees a gap that later fills in.
//!
//! The committer batches the transactions queued by concurrent callers into
//! one PostgreSQL transaction (each still gets its own revision), so they
//! share the lock round trips and one WAL flush: without this, every
//! writer would wait for every earlier writer's fsync while holding the
//! lock.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use allot_store::backend::{apply_txn, delete_keys_txn, Applied};
use allot_store::{EventKind, KeyValue, LeaseId, Op, Revision, StoreError, Txn, TxnResponse};
use deadpool_postgres::Object;
use futures::future::try_join_all;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_postgres::Row;

use crate::error::CallError;
use crate::shared::{copy_error, kv_at, to_i64, to_u64, Shared};

/// The revision row, as locked by a writing transaction.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Head {
    pub revision: Revision,
    pub oldest: Revision,
    /// Sequence number of the next event.
    pub next_event: i64,
}

impl Head {
    fn from_row(row: &Row) -> Result<Head, CallError> {
        Ok(Head {
            revision: to_u64(row.try_get(0)?, "revision")?,
            oldest: to_u64(row.try_get(1)?, "oldest revision")?,
            next_event: row.try_get(3)?,
        })
    }
}

/// What one PostgreSQL transaction writes: the final state of every key it
/// touched and the log rows of every revision it made, as columns for
/// `UNNEST`.
#[derive(Default)]
struct Writes {
    keys: BTreeMap<Vec<u8>, Option<KeyValue>>,
    log_revision: Vec<i64>,
    log_seq: Vec<i64>,
    log_key: Vec<Vec<u8>>,
    log_kind: Vec<i16>,
    log_value: Vec<Vec<u8>>,
    log_create: Vec<i64>,
    log_version: Vec<i64>,
    log_lease: Vec<i64>,
    /// The last revision written.
    revision: Revision,
}

impl Writes {
    fn is_empty(&self) -> bool {
        self.log_seq.is_empty()
    }

    /// Adds one evaluated transaction that wrote something, updating the
    /// batch's view of the key space so later transactions see it.
    fn add(
        &mut self,
        applied: Applied,
        view: &mut BTreeMap<Vec<u8>, KeyValue>,
        next_event: &mut i64,
    ) -> Result<(), StoreError> {
        for change in applied.changes {
            match &change.new {
                Some(kv) => view.insert(change.key.clone(), kv.clone()),
                None => view.remove(&change.key),
            };
            self.keys.insert(change.key, change.new);
        }
        for event in applied.events {
            let kv = event.kv;
            self.revision = kv.mod_revision;
            self.log_revision.push(to_i64(kv.mod_revision, "revision")?);
            self.log_seq.push(*next_event);
            *next_event += 1;
            self.log_kind.push(match event.kind {
                EventKind::Put => 0,
                EventKind::Delete => 1,
            });
            self.log_key.push(kv.key);
            self.log_value.push(kv.value);
            self.log_create
                .push(to_i64(kv.create_revision, "revision")?);
            self.log_version.push(to_i64(kv.version, "version")?);
            self.log_lease.push(to_i64(kv.lease, "lease")?);
        }
        Ok(())
    }
}

/// Round trip 2 of a writing transaction: the writes, `allot_finish` and
/// `COMMIT`, pipelined. Any error means nothing was committed (or, if the
/// connection broke during `COMMIT`, that the outcome is unknown, which is
/// reported as unavailable and never acknowledged).
async fn finish(conn: &Object, shared: &Shared, writes: Writes) -> Result<(), CallError> {
    let sql = &shared.sql;
    let (upsert, delete, insert_log, finish) = futures::try_join!(
        conn.prepare_cached(&sql.upsert),
        conn.prepare_cached(&sql.delete_keys),
        conn.prepare_cached(&sql.insert_log),
        conn.prepare_cached(&sql.finish),
    )?;
    let mut put = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let mut deleted: Vec<Vec<u8>> = Vec::new();
    let mut writes = writes;
    for (key, state) in std::mem::take(&mut writes.keys) {
        match state {
            Some(kv) => {
                put.0.push(key);
                put.1.push(kv.value);
                put.2.push(to_i64(kv.create_revision, "revision")?);
                put.3.push(to_i64(kv.mod_revision, "revision")?);
                put.4.push(to_i64(kv.version, "version")?);
                put.5.push(to_i64(kv.lease, "lease")?);
            }
            None => deleted.push(key),
        }
    }
    let revision = to_i64(writes.revision, "revision")?;
    let events = writes.log_seq.len() as i64;
    let limits = &shared.limits;
    // Each future sends its statement when first polled, and `try_join!`
    // polls them in order: one round trip for all of them.
    futures::try_join!(
        async {
            if put.0.is_empty() {
                return Ok(0);
            }
            conn.execute(&upsert, &[&put.0, &put.1, &put.2, &put.3, &put.4, &put.5])
                .await
        },
        async {
            if deleted.is_empty() {
                return Ok(0);
            }
            conn.execute(&delete, &[&deleted]).await
        },
        async {
            let w = &writes;
            conn.execute(
                &insert_log,
                &[
                    &w.log_revision,
                    &w.log_seq,
                    &w.log_key,
                    &w.log_kind,
                    &w.log_value,
                    &w.log_create,
                    &w.log_version,
                    &w.log_lease,
                ],
            )
            .await
        },
        async {
            conn.execute(
                &finish,
                &[
                    &revision,
                    &events,
                    &limits.keep_revisions,
                    &limits.revision_slack,
                    &limits.keep_events,
                    &sql.channel,
                ],
            )
            .await
        },
        conn.batch_execute("COMMIT"),
    )?;
    shared.publish(writes.revision);
    Ok(())
}

/// Runs `body`, which may open a transaction, and rolls it back if it fails
/// with a store-level error (a missing lease, a future revision), so the
/// connection goes back to the pool clean. PostgreSQL errors need nothing:
/// their connection is dropped (see `Shared::settle`). A `ROLLBACK` outside
/// a transaction is only a warning.
async fn in_txn<T>(
    conn: &Object,
    body: impl std::future::Future<Output = Result<T, CallError>>,
) -> Result<T, CallError> {
    let result = body.await;
    if let Err(CallError::Store(_)) = &result {
        conn.batch_execute("ROLLBACK").await?;
    }
    result
}

// ---------------------------------------------------------------- committer

/// One queued transaction.
pub(crate) struct Request {
    pub txn: Txn,
    pub reply: oneshot::Sender<Result<TxnResponse, StoreError>>,
}

/// The committer task: takes whatever transactions are queued (up to the
/// batch limit), commits them in one PostgreSQL transaction and answers
/// each. It ends when every store handle is gone (the queue closes), after
/// answering what was queued.
pub(crate) async fn run_committer(shared: Arc<Shared>, mut rx: mpsc::Receiver<Request>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < shared.limits.max_batch {
            match rx.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let answers = commit_batch(&shared, &batch).await;
        for (request, answer) in batch.into_iter().zip(answers) {
            // The caller may have given up; nothing to do then.
            let _ = request.reply.send(answer);
        }
    }
}

async fn commit_batch(shared: &Shared, batch: &[Request]) -> Vec<Result<TxnResponse, StoreError>> {
    let failed = |err: StoreError| batch.iter().map(|_| Err(copy_error(&err))).collect();
    let conn = match shared.conn().await {
        Ok(conn) => conn,
        Err(err) => return failed(err),
    };
    let result = shared
        .timed(in_txn(&conn, commit_on(&conn, shared, batch)))
        .await;
    match shared.settle(conn, result) {
        Ok(answers) => answers,
        Err(err) => failed(err),
    }
}

/// What a batch reads before evaluating: every key named anywhere in it
/// (compares and operations of both branches), every range it deletes, and
/// every lease it attaches keys to.
#[derive(Default)]
struct ReadSet {
    keys: BTreeSet<Vec<u8>>,
    ranges: Vec<(Vec<u8>, Vec<u8>)>,
    leases: BTreeSet<i64>,
}

impl ReadSet {
    fn of(batch: &[Request]) -> ReadSet {
        let mut set = ReadSet::default();
        for request in batch {
            let txn = &request.txn;
            set.keys.extend(txn.compare.iter().map(|c| c.key.clone()));
            for op in txn.success.iter().chain(&txn.failure) {
                match op {
                    Op::Put { key, lease, .. } => {
                        set.keys.insert(key.clone());
                        // An id beyond bigint cannot exist: it stays out of
                        // the live set and the put fails as it should.
                        if let Ok(id) = i64::try_from(*lease) {
                            if id != 0 {
                                set.leases.insert(id);
                            }
                        }
                    }
                    Op::Delete { key } | Op::Get { key } => {
                        set.keys.insert(key.clone());
                    }
                    Op::DeleteRange { start, end } => {
                        if end.is_empty() || start < end {
                            set.ranges.push((start.clone(), end.clone()));
                        }
                    }
                }
            }
        }
        set
    }
}

async fn commit_on(
    conn: &Object,
    shared: &Shared,
    batch: &[Request],
) -> Result<Vec<Result<TxnResponse, StoreError>>, CallError> {
    let sql = &shared.sql;
    let (lock, get_many, scan, scan_from, live_leases) = futures::try_join!(
        conn.prepare_cached(&sql.lock_head),
        conn.prepare_cached(&sql.get_many),
        conn.prepare_cached(&sql.scan),
        conn.prepare_cached(&sql.scan_from),
        conn.prepare_cached(&sql.live_leases),
    )?;
    let reads = ReadSet::of(batch);
    let keys: Vec<&Vec<u8>> = reads.keys.iter().collect();
    let leases: Vec<i64> = reads.leases.iter().copied().collect();

    // Round trip 1: lock, then read (in this order on the server).
    let (_, head, rows, scanned, live) = futures::try_join!(
        conn.batch_execute("BEGIN"),
        conn.query_one(&lock, &[]),
        async { conn.query(&get_many, &[&keys]).await },
        try_join_all(reads.ranges.iter().map(|(start, end)| {
            let (scan, scan_from) = (&scan, &scan_from);
            async move {
                if end.is_empty() {
                    conn.query(scan_from, &[start]).await
                } else {
                    conn.query(scan, &[start, end]).await
                }
            }
        })),
        async {
            // Most batches attach no lease: no statement then.
            if leases.is_empty() {
                return Ok(Vec::new());
            }
            conn.query(&live_leases, &[&leases]).await
        },
    )?;
    let head = Head::from_row(&head)?;
    let mut view: BTreeMap<Vec<u8>, KeyValue> = BTreeMap::new();
    for row in rows.iter().chain(scanned.iter().flatten()) {
        if let Some(kv) = kv_at(row, 0)? {
            view.insert(kv.key.clone(), kv);
        }
    }
    let live: HashSet<LeaseId> = live
        .iter()
        .map(|row| Ok(to_u64(row.try_get(0)?, "lease id")?))
        .collect::<Result<_, CallError>>()?;

    // Evaluate in order, each transaction on top of the earlier ones.
    let mut revision = head.revision;
    let mut next_event = head.next_event;
    let mut writes = Writes::default();
    let mut answers = Vec::with_capacity(batch.len());
    for request in batch {
        let answer = match apply_txn(&view, &request.txn, revision, |id| live.contains(&id)) {
            Ok(applied) => {
                let response = applied.response.clone();
                if let Some(written) = applied.write_revision() {
                    revision = written;
                    if let Err(err) = writes.add(applied, &mut view, &mut next_event) {
                        // Only an out-of-range number; refuse the whole
                        // batch rather than commit part of a transaction.
                        conn.batch_execute("ROLLBACK").await?;
                        return Ok(batch.iter().map(|_| Err(copy_error(&err))).collect());
                    }
                }
                Ok(response)
            }
            Err(err) => Err(err),
        };
        answers.push(answer);
    }
    if writes.is_empty() {
        // Nothing to make durable: no commit (and no WAL flush) needed.
        conn.batch_execute("ROLLBACK").await?;
    } else {
        finish(conn, shared, writes).await?;
    }
    Ok(answers)
}

// ---------------------------------------------------------------- leases

/// Deletes the keys of leases whose rows the current transaction just
/// deleted (`rows`: lease id plus one key per row, or NULL key columns for a
/// lease without keys), in one revision, and commits.
async fn delete_lease_keys(
    conn: &Object,
    shared: &Shared,
    head: Head,
    rows: &[Row],
) -> Result<(), CallError> {
    let mut view: BTreeMap<Vec<u8>, KeyValue> = BTreeMap::new();
    for row in rows {
        if let Some(kv) = kv_at(row, 1)? {
            view.insert(kv.key.clone(), kv);
        }
    }
    if view.is_empty() {
        // Only lease rows went: no revision.
        conn.batch_execute("COMMIT").await?;
        return Ok(());
    }
    let txn = delete_keys_txn(view.keys());
    let applied = apply_txn(&view, &txn, head.revision, |_| true)?;
    let mut writes = Writes::default();
    let mut next_event = head.next_event;
    writes.add(applied, &mut view, &mut next_event)?;
    finish(conn, shared, writes).await
}

/// Revokes one lease, deleting its keys in one revision.
pub(crate) async fn revoke(
    conn: &Object,
    shared: &Shared,
    lease: LeaseId,
) -> Result<(), CallError> {
    in_txn(conn, revoke_on(conn, shared, lease)).await
}

async fn revoke_on(conn: &Object, shared: &Shared, lease: LeaseId) -> Result<(), CallError> {
    let Ok(id) = i64::try_from(lease) else {
        return Err(StoreError::LeaseNotFound(lease).into());
    };
    let (lock, revoke) = futures::try_join!(
        conn.prepare_cached(&shared.sql.lock_head),
        conn.prepare_cached(&shared.sql.revoke),
    )?;
    let (_, head, rows) = futures::try_join!(
        conn.batch_execute("BEGIN"),
        conn.query_one(&lock, &[]),
        async { conn.query(&revoke, &[&id]).await },
    )?;
    if rows.is_empty() {
        return Err(StoreError::LeaseNotFound(lease).into());
    }
    delete_lease_keys(conn, shared, Head::from_row(&head)?, &rows).await
}

/// Seconds from now (database clock) to the earliest lease deadline.
async fn next_deadline(conn: &Object, shared: &Shared) -> Result<Option<f64>, CallError> {
    let stmt = conn.prepare_cached(&shared.sql.next_deadline).await?;
    Ok(conn.query_one(&stmt, &[]).await?.try_get(0)?)
}

/// Expires every lease whose deadline has passed by the database clock,
/// deleting their keys in one revision, and returns the time until the next
/// deadline (`None`: no lease left). Another server may do the same at the
/// same time: the revision row lock serializes them and the later one finds
/// nothing to do.
///
/// With `only_if_due`, does nothing unless this process still believes a
/// deadline has passed once it is its turn: calls that noticed the same
/// deadline together then expire once, not once each.
pub(crate) async fn expire_due(
    shared: &Shared,
    only_if_due: bool,
) -> Result<Option<std::time::Duration>, StoreError> {
    let _one_at_a_time = shared.expiry_lock.lock().await;
    if only_if_due && !shared.lease_due() {
        return Ok(None);
    }
    let conn = shared.conn().await?;
    let result = shared.timed(in_txn(&conn, expire_on(&conn, shared))).await;
    let remaining = shared.settle(conn, result)?;
    let next = remaining.map(|secs| std::time::Duration::from_secs_f64(secs.clamp(0.0, 1e9)));
    *shared.next_due() = next.map(|d| Instant::now() + d);
    Ok(next)
}

async fn expire_on(conn: &Object, shared: &Shared) -> Result<Option<f64>, CallError> {
    // Checked without the lock first: most wake-ups find nothing due, and
    // must not make writers wait.
    match next_deadline(conn, shared).await? {
        Some(secs) if secs <= 0.0 => {}
        other => return Ok(other),
    }
    let (lock, expire) = futures::try_join!(
        conn.prepare_cached(&shared.sql.lock_head),
        conn.prepare_cached(&shared.sql.expire),
    )?;
    let (_, head, rows) = futures::try_join!(
        conn.batch_execute("BEGIN"),
        conn.query_one(&lock, &[]),
        conn.query(&expire, &[]),
    )?;
    if rows.is_empty() {
        conn.batch_execute("ROLLBACK").await?;
    } else {
        tracing::debug!(rows = rows.len(), "expiring leases");
        delete_lease_keys(conn, shared, Head::from_row(&head)?, &rows).await?;
    }
    next_deadline(conn, shared).await
}

// ---------------------------------------------------------------- compaction

/// Drops history before `revision` (no-op if already dropped).
pub(crate) async fn compact(
    conn: &Object,
    shared: &Shared,
    revision: Revision,
) -> Result<(), CallError> {
    in_txn(conn, compact_on(conn, shared, revision)).await
}

async fn compact_on(conn: &Object, shared: &Shared, revision: Revision) -> Result<(), CallError> {
    let (lock, drop_history) = futures::try_join!(
        conn.prepare_cached(&shared.sql.lock_head),
        conn.prepare_cached(&shared.sql.drop_history),
    )?;
    let (_, head) = futures::try_join!(conn.batch_execute("BEGIN"), conn.query_one(&lock, &[]))?;
    let head = Head::from_row(&head)?;
    if revision > head.revision {
        return Err(StoreError::FutureRevision {
            requested: revision,
            current: head.revision,
        }
        .into());
    }
    if revision <= head.oldest {
        conn.batch_execute("ROLLBACK").await?;
        return Ok(());
    }
    let target = to_i64(revision, "revision")?;
    futures::try_join!(
        async { conn.execute(&drop_history, &[&target]).await },
        conn.batch_execute("COMMIT")
    )?;
    Ok(())
}
