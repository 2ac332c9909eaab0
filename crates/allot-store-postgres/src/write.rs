//! Everything that writes: the transaction committer (group commit,
//! pipelined), lease revocation and expiry, compaction, and widening the
//! history scope (`history.rs`).
//!
//! Every revision is made by a PostgreSQL transaction holding the one
//! revision row's lock (`SELECT ... FOR UPDATE`) until its commit is
//! durable, so revision N+1 can only commit after N is visible: a watcher
//! reading the log never sees a gap that later fills in. All writes of a
//! transaction go through one statement (`Sql::write`, schema v4; the
//! PL/pgSQL `allot_write` and `allot_commit` before), which checks, under
//! that lock, that the store is where the writer assumed it to be (the
//! revision, the token of the batch that made it, the version of the
//! history scope its log rows were chosen by, and the mod revision of every
//! key read; a key assumed absent and created is checked by its plain
//! INSERT), and writes nothing otherwise. The history bounds
//! are applied after the commit, before the answer, by `allot_bound` in a
//! transaction of its own, and only when the write reports one crossed.
//!
//! The committer batches the transactions queued by concurrent callers into
//! one PostgreSQL transaction (each still gets its own revision), so they
//! share one lock and one WAL flush. It commits a batch in one of two ways:
//!
//! - **Speculative** (one round trip): while nothing but this committer
//!   writes, it knows the store's state: the head of the revision row and
//!   every key it read or wrote since (a bounded cache; keys it does not
//!   know are assumed absent). It evaluates the batch on that knowledge and
//!   sends the write statement alone, as a transaction of its own (it takes
//!   the lock itself). With `max_in_flight` 1 that is all. With 2 (the
//!   default) or more, the next batch (evaluated on top of the first,
//!   assuming it commits) goes out on the *same* connection (`Pipe`), and
//!   never before the batch it builds on was sent there: PostgreSQL runs a
//!   connection's statements in order, so it starts as soon as the first has
//!   committed, sees its writes, and no round trip is lost in between. It
//!   goes out at once, as the write statement alone, unless recent batches
//!   were small (`STAGED_SIZES`): then it is staged (`Form::Staged`) as
//!   `BEGIN`, the statement and `COMMIT`, so that its statement's answer
//!   comes before its WAL flush, and the batch after it waits in the
//!   committer until that answer, gathering the callers answered in the
//!   meantime, instead of waiting a whole commit in PostgreSQL's queue
//!   (staging thus keeps at most two flights out, whatever `max_in_flight`).
//!   A pipe an error broke gets no new batch while flights remain on it.
//!   A batch names the batch it builds on by the token that batch writes as
//!   the revision row's `writer`, chosen here, so known before that batch has
//!   even reached the server. The checks make both ways safe: a batch whose
//!   assumptions failed (another server wrote, a key was not as cached, or
//!   the batch it was stacked on failed) wrote nothing, and its
//!   transactions are run again on the locked path. (A history scope
//!   widened by another client fails it the same way.)
//! - **Locked** (two round trips, always succeeds): `BEGIN`, lock, read every
//!   key the batch depends on (after the lock: in READ COMMITTED each read
//!   sees every earlier commit), evaluate, then the write and `COMMIT`.
//!   Used when the state is not known (at start, after another writer or a
//!   failure) and for batches the speculative path does not take (range
//!   deletes, puts attached to leases, batches that write nothing); it
//!   refreshes the committer's knowledge.
//!
//! Evaluation is always `allot_store::backend::apply_txn`, the code every
//! backend shares.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use allot_store::backend::{apply_txn, delete_keys_txn, Applied};
use allot_store::{EventKind, KeyValue, LeaseId, Op, Revision, StoreError, Txn, TxnResponse};
use deadpool_postgres::Object;
use futures::future::{try_join_all, BoxFuture, FutureExt};
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::error::CallError;
use crate::history::HistoryScope;
use crate::shared::{copy_error, kv_at, to_i64, to_u64, Limits, Shared};

/// The revision row, as locked by a writing transaction.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub revision: Revision,
    pub oldest: Revision,
    /// Sequence number of the next event.
    pub next_event: i64,
    /// Who made `revision`: the token of its batch (see `token`), the
    /// PostgreSQL transaction id if a server of an earlier build did, or 0.
    pub writer: i64,
    /// Which keys' changes the log records.
    pub history: Arc<HistoryScope>,
}

impl Head {
    fn from_row(row: &Row) -> Result<Head, CallError> {
        Ok(Head {
            revision: to_u64(row.try_get(0)?, "revision")?,
            oldest: to_u64(row.try_get(1)?, "oldest revision")?,
            next_event: row.try_get(3)?,
            writer: row.try_get(4)?,
            history: Arc::new(HistoryScope::from_row(row, 5)?),
        })
    }
}

/// What one PostgreSQL transaction writes: the final state of every key it
/// touched and the log rows of every revision it made, as columns for
/// `UNNEST`.
#[derive(Default)]
struct Writes {
    keys: BTreeMap<Vec<u8>, Option<KeyValue>>,
    /// The mod revision each written key had before the batch, as the
    /// batch assumed it (0: absent): what its write replaces.
    priors: BTreeMap<Vec<u8>, Revision>,
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
    /// Whether no transaction wrote (a write outside the recorded history
    /// still counts: it has a revision, only no log row).
    fn is_empty(&self) -> bool {
        self.revision == 0
    }

    /// Adds one evaluated transaction that wrote something, updating the
    /// batch's view of the key space so later transactions see it. Only
    /// events of keys `history` records get log rows.
    fn add(
        &mut self,
        applied: Applied,
        view: &mut BTreeMap<Vec<u8>, KeyValue>,
        next_event: &mut i64,
        history: &HistoryScope,
    ) -> Result<(), StoreError> {
        for change in applied.changes {
            let prior = view.get(&change.key).map_or(0, |kv| kv.mod_revision);
            self.priors.entry(change.key.clone()).or_insert(prior);
            match &change.new {
                Some(kv) => view.insert(change.key.clone(), kv.clone()),
                None => view.remove(&change.key),
            };
            self.keys.insert(change.key, change.new);
        }
        for event in applied.events {
            let kv = event.kv;
            self.revision = kv.mod_revision;
            if !history.records(&kv.key) {
                continue;
            }
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

/// Rows of `allot_kv` as written, as columns for `UNNEST`.
#[derive(Default)]
struct Rows {
    keys: Vec<Vec<u8>>,
    values: Vec<Vec<u8>>,
    creates: Vec<i64>,
    mods: Vec<i64>,
    versions: Vec<i64>,
    leases: Vec<i64>,
}

impl Rows {
    fn push(&mut self, key: Vec<u8>, kv: KeyValue) -> Result<(), StoreError> {
        self.keys.push(key);
        self.values.push(kv.value);
        self.creates.push(to_i64(kv.create_revision, "revision")?);
        self.mods.push(to_i64(kv.mod_revision, "revision")?);
        self.versions.push(to_i64(kv.version, "version")?);
        self.leases.push(to_i64(kv.lease, "lease")?);
        Ok(())
    }
}

/// A fresh token for the revision row's `writer`: a batch sent behind
/// another checks that the revision it builds on was written by that batch
/// (and not by another server that reached the same revision number after
/// that batch failed), and names it by this token, which it knows before
/// that batch reaches the server. Random and negative: it never equals a
/// token of another process, nor a transaction id (positive), which
/// servers of earlier builds wrote there.
fn token() -> i64 {
    -((rand::random::<u64>() >> 1) as i64) - 1
}

/// The arguments of one write statement, owned, so that a flight's commit
/// (a `'static` future the committer polls) can send them.
struct CommitArgs {
    expected: i64,
    writer: i64,
    check_keys: Vec<Vec<u8>>,
    check_mods: Vec<i64>,
    /// Keys assumed absent: plain inserts, their own check.
    inserts: Rows,
    /// Keys that exist: upserted, checked by `check_*`.
    upserts: Rows,
    deleted: Vec<Vec<u8>>,
    log: Writes,
    revision: i64,
    /// What the batch writes as the revision row's `writer` (see `token`).
    token: i64,
    /// The last revision written, to publish once committed.
    last: Revision,
    /// The version of the history scope the log rows were chosen by.
    history_version: i64,
}

impl CommitArgs {
    /// `expected`/`writer`: the revision row as assumed; `checks`: every key
    /// read with its assumed mod revision (0: absent). A key created by the
    /// batch is checked by its insert, so its check (absent) is dropped.
    fn new(
        mut writes: Writes,
        expected: Revision,
        writer: i64,
        checks: Vec<(Vec<u8>, i64)>,
        history_version: i64,
    ) -> Result<CommitArgs, StoreError> {
        let mut args = CommitArgs {
            expected: to_i64(expected, "revision")?,
            writer,
            check_keys: Vec::with_capacity(checks.len()),
            check_mods: Vec::with_capacity(checks.len()),
            inserts: Rows::default(),
            upserts: Rows::default(),
            deleted: Vec::new(),
            revision: to_i64(writes.revision, "revision")?,
            token: token(),
            last: writes.revision,
            log: Writes::default(),
            history_version,
        };
        let mut inserted = BTreeSet::new();
        for (key, state) in std::mem::take(&mut writes.keys) {
            let absent = writes.priors.get(&key).is_none_or(|p| *p == 0);
            match state {
                Some(kv) if absent => {
                    inserted.insert(key.clone());
                    args.inserts.push(key, kv)?;
                }
                Some(kv) => args.upserts.push(key, kv)?,
                None => args.deleted.push(key),
            }
        }
        for (key, mod_revision) in checks {
            if !(mod_revision == 0 && inserted.contains(&key)) {
                args.check_keys.push(key);
                args.check_mods.push(mod_revision);
            }
        }
        args.log = writes;
        Ok(args)
    }

    fn params<'a>(
        &'a self,
        limits: &'a Limits,
        channel: &'a String,
    ) -> [&'a (dyn ToSql + Sync); 32] {
        let log = &self.log;
        let (ins, ups) = (&self.inserts, &self.upserts);
        [
            &self.expected,
            &self.writer,
            &self.check_keys,
            &self.check_mods,
            &ins.keys,
            &ins.values,
            &ins.creates,
            &ins.mods,
            &ins.versions,
            &ins.leases,
            &ups.keys,
            &ups.values,
            &ups.creates,
            &ups.mods,
            &ups.versions,
            &ups.leases,
            &self.deleted,
            &log.log_revision,
            &log.log_seq,
            &log.log_key,
            &log.log_kind,
            &log.log_value,
            &log.log_create,
            &log.log_version,
            &log.log_lease,
            &self.revision,
            &limits.keep_revisions,
            &limits.revision_slack,
            &limits.keep_events,
            channel,
            &self.token,
            &self.history_version,
        ]
    }
}

/// The end of a writing transaction holding the lock (`head` as read under
/// it): the write statement and `COMMIT`, pipelined, then the history
/// bounds if the write crossed one. Answers the token it wrote. Any error
/// means nothing was committed (or, if the connection broke during
/// `COMMIT`, that the outcome is unknown, which is reported as unavailable
/// and never acknowledged).
async fn finish(
    conn: &Object,
    shared: &Shared,
    head: &Head,
    writes: Writes,
) -> Result<i64, CallError> {
    let args = CommitArgs::new(
        writes,
        head.revision,
        head.writer,
        Vec::new(),
        head.history.version,
    )?;
    let commit = conn.prepare_cached(&shared.sql.write).await?;
    let params = args.params(&shared.limits, &shared.sql.channel);
    let own = shared.expect_own(args.last);
    // Each future sends its statement when first polled, and `try_join!`
    // polls them in order: one round trip for both.
    let (row, ()) = futures::try_join!(
        conn.query_one(&commit, &params),
        conn.batch_execute("COMMIT")
    )?;
    own.committed();
    if bound_due(&row)? {
        if let Err(err) = apply_bounds(conn, shared).await {
            bounds_failed(&err.into());
        }
    }
    Ok(args.token)
}

/// Whether the write statement reports a history bound crossed: the bounds
/// are applied before the write is acknowledged.
fn bound_due(row: &Row) -> Result<bool, CallError> {
    Ok(row.try_get(0)?)
}

/// Applies the history bounds in a transaction of its own.
async fn apply_bounds(conn: &Object, shared: &Shared) -> Result<(), CallError> {
    let limits = &shared.limits;
    let stmt = conn.prepare_cached(&shared.sql.bound).await?;
    conn.execute(
        &stmt,
        &[
            &limits.keep_revisions,
            &limits.revision_slack,
            &limits.keep_events,
        ],
    )
    .await?;
    Ok(())
}

/// The write is committed whatever happens to its history bounds, so a
/// failure is only logged: the next write that finds a bound crossed tries
/// again.
fn bounds_failed(err: &StoreError) {
    tracing::warn!(%err, "applying the history bounds failed");
}

/// `apply_bounds` on a connection of its own, within the call timeout.
async fn apply_bounds_apart(shared: &Shared) {
    let result = match shared.conn().await {
        Ok(conn) => {
            let applied = shared.timed(apply_bounds(&conn, shared)).await;
            shared.settle(conn, applied)
        }
        Err(err) => Err(err),
    };
    if let Err(err) = result {
        bounds_failed(&err);
    }
}

/// How the write statement failed its checks, if it did: nothing was
/// written then.
fn refused(err: &tokio_postgres::Error) -> Option<Outcome> {
    let code = err.code().map(|c| c.code());
    let constraint = err.as_db_error().and_then(|e| e.constraint());
    match (code, constraint) {
        (Some("AL001"), _) => Some(Outcome::Moved),
        (Some("AL002"), _) => Some(Outcome::Differs),
        // A key assumed absent exists: its INSERT was the check.
        (Some("23505"), Some("allot_kv_pkey")) => Some(Outcome::Differs),
        _ => None,
    }
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

impl Request {
    /// How much the transaction does, for `STAGED_SIZES`: its compares and
    /// operations (both branches: a rough measure is enough).
    fn size(&self) -> usize {
        let txn = &self.txn;
        txn.compare.len() + txn.success.len() + txn.failure.len()
    }
}

type Answers = Vec<Result<TxnResponse, StoreError>>;

/// Bounds of the committer's key cache; past either it starts afresh (keys
/// it forgot are assumed absent, checked, and re-read on the locked path
/// when that was wrong).
const CACHE_KEYS: usize = 200_000;
const CACHE_BYTES: usize = 64 << 20;

/// A flight is staged (see `Form`) only while recent flights were of these
/// sizes (`Request::size`, a moving average; an engine batch of n keyed
/// claims is about 3n + 4): from about two keyed claims to about twenty. A
/// flight of one claim has nobody to wait for: its caller is all the batch
/// behind it could gather, so staging only adds the two statements. The
/// callers of a larger one take the engine longer to bring back than a
/// statement runs (~300 µs for 30 keyed claims, measured), so waiting for
/// them emptied the pipe in ~1 flight out of 6. Measured (BENCHMARKS §6, round 11): 8
/// callers of one pool +17-60% claims/s (about 20 alternated pairs), 8
/// pools × 1 caller +24-38%; 1 and 64 callers hardly ever stage.
const STAGED_SIZES: std::ops::Range<usize> = 10..64;

/// The most batches run on the locked path after another writer was seen
/// (doubling from 1 per consecutive conflict), so that servers sharing a
/// store do not keep failing each other's speculation.
const MAX_BACKOFF: u32 = 64;

/// What the committer knows of the store: the state once every batch it
/// sent has committed.
struct Known {
    revision: Revision,
    next_event: i64,
    /// The token of the batch making `revision` (or, for a head read on
    /// the locked path, whatever its writer wrote there: a token, a
    /// transaction id from an earlier build, or 0).
    writer: i64,
    /// Keys as of `revision` (`None`: absent). Hashed with foldhash, not
    /// the standard SipHash, which was much of the quarter of a batch's
    /// evaluation spent storing keys here. foldhash is seeded per map but
    /// claims only minimal resistance to chosen collisions; the map is
    /// bounded (`CACHE_KEYS`) and never iterated, which limits the harm.
    keys: foldhash::HashMap<Vec<u8>, Option<KeyValue>>,
    bytes: usize,
    /// The history scope as last read under the lock.
    history: Arc<HistoryScope>,
}

impl Known {
    fn new(head: &Head) -> Known {
        Known {
            revision: head.revision,
            next_event: head.next_event,
            writer: head.writer,
            keys: foldhash::HashMap::default(),
            bytes: 0,
            history: head.history.clone(),
        }
    }

    /// Roughly what an entry holds in memory.
    fn size(key_len: usize, state: &Option<KeyValue>) -> usize {
        key_len + state.as_ref().map_or(0, |kv| kv.value.len() + 64)
    }

    fn set(&mut self, key: Vec<u8>, state: Option<KeyValue>) {
        let key_len = key.len();
        self.bytes += Known::size(key_len, &state);
        if let Some(old) = self.keys.insert(key, state) {
            self.bytes -= Known::size(key_len, &old);
        }
    }

    fn trim(&mut self) {
        if self.keys.len() > CACHE_KEYS || self.bytes > CACHE_BYTES {
            self.keys.clear();
            self.bytes = 0;
        }
    }
}

/// How a speculative batch ended.
enum Outcome {
    Committed,
    /// Another writer made a revision the batch did not expect.
    Moved,
    /// A key read was not as the committer assumed.
    Differs,
}

/// The connection speculative batches are sent on, one behind the other
/// while any is in flight (see the module doc), shared by their commits.
/// The first flight takes it from the pool; each flight sends its statement
/// only after the flight before it on the pipe has sent (or given up), so
/// the statements reach the server in the order the batches were built,
/// whichever commit is polled first.
struct Pipe {
    conn: tokio::sync::OnceCell<Object>,
    /// Flights given a place on the pipe so far (the next one's is this + 1).
    placed: AtomicU64,
    /// The place of the last flight that has sent its statement or given up.
    sent: tokio::sync::watch::Sender<u64>,
    /// An error left the connection unfit for reuse: no later batch is
    /// sent on it, and it is dropped, not returned to the pool, once the
    /// last flight lets go of it.
    broken: AtomicBool,
}

impl Pipe {
    fn new() -> Pipe {
        Pipe {
            conn: tokio::sync::OnceCell::new(),
            placed: AtomicU64::new(0),
            sent: tokio::sync::watch::Sender::new(0),
            broken: AtomicBool::new(false),
        }
    }

    /// The next place on the pipe (called by the committer, in build order).
    fn place(&self) -> u64 {
        self.placed.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// Waits until every flight placed before `place` has sent or given up.
    async fn turn(&self, place: u64) {
        let mut sent = self.sent.subscribe();
        // The sender lives in `self`: waiting cannot fail.
        let _ = sent.wait_for(|&done| done + 1 >= place).await;
    }

    /// The flight at `place` has sent its statement, or never will.
    fn done_sending(&self, place: u64) {
        self.sent.send_modify(|done| *done = (*done).max(place));
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if *self.broken.get_mut() {
            if let Some(conn) = self.conn.take() {
                drop(Object::take(conn));
            }
        }
    }
}

/// Lets the flights placed after `place` send, however its own ends.
struct SendTurn<'a> {
    pipe: &'a Pipe,
    place: u64,
}

impl Drop for SendTurn<'_> {
    fn drop(&mut self) {
        self.pipe.done_sending(self.place);
    }
}

/// What the committer keeps of a speculative batch in flight until it ends
/// (its commit itself is polled in `run_committer`'s `commits`, in the
/// same order).
struct Flight {
    requests: Vec<Request>,
    /// The compares and operations of `requests`.
    size: usize,
    answers: Answers,
}

/// The committer task: takes whatever transactions are queued (up to the
/// batch limit), commits them in one PostgreSQL transaction and answers
/// each, with up to `max_in_flight` speculative batches in flight (2 by
/// default: one committing and one queued behind it on its connection;
/// more would only queue in the database instead of here, where they can
/// still merge, and measured slower with several pools). It ends when
/// every store handle is gone (the queue closes), after answering what was
/// queued.
pub(crate) async fn run_committer(shared: Arc<Shared>, mut rx: mpsc::Receiver<Request>) {
    let max_batch = shared.limits.max_batch;
    let max_in_flight = shared.limits.max_in_flight;
    let mut known: Option<Known> = None;
    let mut flights: VecDeque<Flight> = VecDeque::new();
    // The flights' commits, polled by this task rather than spawned: a task
    // per flight cost two more hand-offs between threads per batch (sending
    // and answering), each of which can wake a parked worker.
    let mut commits: FuturesOrdered<BoxFuture<'static, Result<Outcome, StoreError>>> =
        FuturesOrdered::new();
    // The connection of the flights, while any is in flight.
    let mut pipe: Option<Arc<Pipe>> = None;
    // Requests to run again on the locked path, once nothing is in flight.
    let mut redo: VecDeque<Request> = VecDeque::new();
    let mut conflicts: u32 = 0;
    let mut locked_left: u32 = 0;
    // Flights stacked on one that failed: they fail because it did, so
    // their failures are no news of another writer.
    let mut doomed: usize = 0;
    // Staged flights whose statement has not run yet (see `Form`): while
    // one is out, the next batch waits here, where the callers answered in
    // the meantime can still join it, instead of queueing in PostgreSQL a
    // whole commit early.
    let (ran_tx, mut ran_rx) = mpsc::unbounded_channel::<()>();
    let mut statements_out: usize = 0;
    // Four times the moving average of recent flights' sizes, which decides
    // whether the next is staged (`STAGED_SIZES`); times four, so that
    // integer division does not drag it below a steady size.
    let mut usual_size_x4: usize = 0;
    let mut open = true;
    loop {
        if flights.is_empty() && !redo.is_empty() {
            let take = redo.len().min(max_batch);
            let mut batch: Vec<Request> = redo.drain(..take).collect();
            if redo.is_empty() {
                top_up(&mut rx, &mut batch, max_batch);
            }
            known = commit_locked(&shared, batch, known.take()).await;
            continue;
        }
        if flights.is_empty() && !open {
            break;
        }
        let can_send =
            open && redo.is_empty() && flights.len() < max_in_flight.max(1) && statements_out == 0;
        tokio::select! {
            biased;
            Some(outcome) = commits.next() => {
                let Some(flight) = flights.pop_front() else { continue };
                usual_size_x4 = usual_size_x4 - usual_size_x4 / 4 + flight.size;
                if flights.is_empty() {
                    pipe = None;
                }
                let stacked_on_failure = doomed > 0;
                doomed = doomed.saturating_sub(1);
                if !stacked_on_failure && !matches!(outcome, Ok(Outcome::Committed)) {
                    // The flights stacked on this one fail with it.
                    doomed = flights.len();
                }
                match outcome {
                    Ok(Outcome::Committed) => {
                        conflicts = 0;
                        reply(flight.requests, flight.answers);
                    }
                    Ok(moved_or_differs) => {
                        if matches!(moved_or_differs, Outcome::Moved) && !stacked_on_failure {
                            conflicts = (conflicts + 1).min(7);
                            locked_left = (1u32 << (conflicts - 1)).min(MAX_BACKOFF);
                        }
                        // Nothing was written: run them again, in order
                        // (batches stacked on this one fail the same way).
                        known = None;
                        shared.redone.fetch_add(1, Ordering::Relaxed);
                        redo.extend(flight.requests);
                    }
                    Err(err) => {
                        known = None;
                        let answers = failed(&flight.requests, &err);
                        reply(flight.requests, answers);
                    }
                }
            }
            // After the commits, whose polling is what drops a `Staged`:
            // seen in the same turn, not after a wake-up behind every
            // other task of the runtime.
            Some(()) = ran_rx.recv(), if statements_out > 0 => {
                statements_out -= 1;
            }
            request = rx.recv(), if can_send => {
                let Some(first) = request else {
                    open = false;
                    continue;
                };
                let mut batch = vec![first];
                top_up(&mut rx, &mut batch, max_batch);
                let fast = if max_in_flight == 0 {
                    None
                } else if locked_left > 0 {
                    locked_left -= 1;
                    None
                } else {
                    known.as_mut().and_then(|k| speculate(k, &batch))
                };
                match fast {
                    Some(Ok((args, answers))) => {
                        // The pipe exists exactly while flights do.
                        let on = match &pipe {
                            Some(on) if on.is_broken() => {
                                // Not on another connection: there it could
                                // start before the batch it builds on ends.
                                // Run it once the flights are through.
                                known = None;
                                redo.extend(batch);
                                continue;
                            }
                            Some(on) => on.clone(),
                            None => pipe.insert(Arc::new(Pipe::new())).clone(),
                        };
                        let place = on.place();
                        let usual_size = usual_size_x4 / 4;
                        let form = if flights.is_empty() || !STAGED_SIZES.contains(&usual_size) {
                            Form::Alone
                        } else {
                            statements_out += 1;
                            shared.staged.fetch_add(1, Ordering::Relaxed);
                            Form::Staged(Staged(ran_tx.clone()))
                        };
                        // A panic in one flight fails its batch, as a
                        // panicking task of its own did, not the committer.
                        let commit =
                            AssertUnwindSafe(commit_fast(shared.clone(), on, place, args, form))
                            .catch_unwind()
                            .map(|done| {
                                done.unwrap_or_else(|_| {
                                    Err(StoreError::Backend("commit task panicked".into()))
                                })
                            });
                        commits.push_back(Box::pin(commit));
                        let size = batch.iter().map(Request::size).sum();
                        flights.push_back(Flight {
                            requests: batch,
                            size,
                            answers,
                        });
                    }
                    Some(Err(err)) => {
                        let answers = failed(&batch, &err);
                        reply(batch, answers);
                    }
                    None if flights.is_empty() => {
                        known = commit_locked(&shared, batch, known.take()).await;
                    }
                    None => redo.extend(batch),
                }
            }
        }
    }
}

/// Adds whatever else is queued to `batch`, up to `max` requests.
fn top_up(rx: &mut mpsc::Receiver<Request>, batch: &mut Vec<Request>, max: usize) {
    while batch.len() < max {
        match rx.try_recv() {
            Ok(request) => batch.push(request),
            Err(_) => break,
        }
    }
}

/// Evaluates `batch` on what the committer knows, for the speculative path,
/// and updates that knowledge as if it committed. `None`: the batch needs
/// the locked path (the head is not known yet, it deletes ranges or attaches
/// leases, or it writes nothing); `Some(Err)`: refused as a whole.
fn speculate(
    known: &mut Known,
    batch: &[Request],
) -> Option<Result<(CommitArgs, Answers), StoreError>> {
    let writer = known.writer;
    let reads = ReadSet::of(batch);
    if !reads.ranges.is_empty() || !reads.leases.is_empty() || reads.attaches_lease {
        return None;
    }
    let mut view: BTreeMap<Vec<u8>, KeyValue> = BTreeMap::new();
    let mut checks = Vec::with_capacity(reads.keys.len());
    for key in &reads.keys {
        match known.keys.get(key) {
            Some(Some(kv)) => {
                checks.push((key.clone(), i64::try_from(kv.mod_revision).unwrap_or(-1)));
                view.insert(key.clone(), kv.clone());
            }
            _ => checks.push((key.clone(), 0)),
        }
    }
    let (writes, answers, next_event) = match evaluate(
        batch,
        &mut view,
        known.revision,
        known.next_event,
        &HashSet::new(),
        &known.history,
    ) {
        Ok(done) => done,
        Err(err) => return Some(Err(err)),
    };
    if writes.is_empty() {
        return None;
    }
    let revision = writes.revision;
    let args = match CommitArgs::new(
        writes,
        known.revision,
        writer,
        checks,
        known.history.version,
    ) {
        Ok(args) => args,
        Err(err) => return Some(Err(err)),
    };
    known.revision = revision;
    known.next_event = next_event;
    known.writer = args.token;
    for key in reads.keys {
        let state = view.remove(&key);
        known.set(key, state);
    }
    known.trim();
    Some(Ok((args, answers)))
}

/// Evaluates the batch in order, each transaction on top of the earlier
/// ones, on `view` (which ends up holding the batch's final state). Returns
/// the writes, one answer per transaction and the next event number; an
/// error refuses the whole batch (an out-of-range number: better than
/// committing part of a transaction).
fn evaluate(
    batch: &[Request],
    view: &mut BTreeMap<Vec<u8>, KeyValue>,
    base: Revision,
    next_event: i64,
    live: &HashSet<LeaseId>,
    history: &HistoryScope,
) -> Result<(Writes, Answers, i64), StoreError> {
    let mut revision = base;
    let mut next_event = next_event;
    let mut writes = Writes::default();
    let mut answers = Vec::with_capacity(batch.len());
    for request in batch {
        let answer = match apply_txn(&*view, &request.txn, revision, |id| live.contains(&id)) {
            Ok(applied) => {
                let response = applied.response.clone();
                if let Some(written) = applied.write_revision() {
                    revision = written;
                    writes.add(applied, view, &mut next_event, history)?;
                }
                Ok(response)
            }
            Err(err) => Err(err),
        };
        answers.push(answer);
    }
    Ok((writes, answers, next_event))
}

/// How a speculative flight is sent.
enum Form {
    /// The write statement alone, its own transaction: the least work for
    /// PostgreSQL, but its answer comes only once it has committed. For a
    /// flight with none ahead of it.
    Alone,
    /// `BEGIN`, the write statement and `COMMIT`, each with its own sync:
    /// the statement's answer comes as soon as it has run, before the
    /// commit's WAL flush, and `Staged` is dropped then. For a flight
    /// queued behind another, so that the committer can send the next one
    /// at that moment (see `run_committer`).
    Staged(Staged),
}

/// Tells the committer, when dropped, that a staged flight's statement has
/// run (or never will).
struct Staged(mpsc::UnboundedSender<()>);

impl Drop for Staged {
    fn drop(&mut self) {
        // The committer may be gone (shutting down): nobody to tell.
        let _ = self.0.send(());
    }
}

/// One speculative batch, in one round trip: the write statement takes the
/// lock itself, and the batch is committed before its answer comes. Sent on
/// `pipe` at `place`, behind the flights placed before it.
async fn commit_fast(
    shared: Arc<Shared>,
    pipe: Arc<Pipe>,
    place: u64,
    args: CommitArgs,
    form: Form,
) -> Result<Outcome, StoreError> {
    let result = shared
        .timed(fast_on(&pipe, place, &shared, &args, form))
        .await;
    match result {
        Ok((outcome, due)) => {
            if due {
                // Not on the pipe, where it would wait behind the next batch.
                apply_bounds_apart(&shared).await;
            }
            Ok(outcome)
        }
        Err(err) => {
            if err.poisons_connection() {
                pipe.broken.store(true, Ordering::Relaxed);
            }
            Err(err.into())
        }
    }
}

/// Sends the batch's write statement in its turn on the pipe; answers how
/// it ended and whether a history bound is due.
async fn fast_on(
    pipe: &Pipe,
    place: u64,
    shared: &Shared,
    args: &CommitArgs,
    form: Form,
) -> Result<(Outcome, bool), CallError> {
    let turn = SendTurn { pipe, place };
    let conn = pipe
        .conn
        .get_or_try_init(|| async {
            // The pipe guards it itself: dropped, not pooled, once broken.
            let conn = shared.conn().await.map_err(CallError::Store)?;
            Ok::<_, CallError>(conn.keep())
        })
        .await?;
    let write = conn.prepare_cached(&shared.sql.write).await?;
    let params = args.params(&shared.limits, &shared.sql.channel);
    let own = shared.expect_own(args.last);
    pipe.turn(place).await;
    if pipe.is_broken() {
        // Nothing of this batch was sent, and the connection is unfit (a
        // flight ahead may have left a transaction open on it): the batch
        // runs again on the locked path, on another connection.
        return Ok((Outcome::Differs, false));
    }
    let answer = match form {
        Form::Alone => {
            let query = conn.query_one(&write, &params);
            futures::pin_mut!(query);
            // The first poll puts the statement on the connection.
            let first = futures::poll!(query.as_mut());
            drop(turn);
            polled(first, query).await
        }
        Form::Staged(staged) => {
            let begin = conn.batch_execute("BEGIN");
            let query = conn.query_one(&write, &params);
            let commit = conn.batch_execute("COMMIT");
            futures::pin_mut!(begin, query, commit);
            // Dropped before `turn` if a poll below panics.
            let mut unfinished = Unfinished(Some(pipe));
            // Each first poll puts its statement on the connection, in order.
            let begun = futures::poll!(begin.as_mut());
            let ran = futures::poll!(query.as_mut());
            let committed = futures::poll!(commit.as_mut());
            unfinished.0 = None;
            drop(turn);
            let begun = polled(begun, begin).await;
            let ran = polled(ran, query).await;
            drop(staged);
            let committed = polled(committed, commit).await;
            begun?;
            // A refused statement aborted the transaction and its `COMMIT`
            // rolled back: the refusal is the answer. A statement that ran
            // counts only once its `COMMIT` has.
            ran.and_then(|row| committed.map(|()| row))
        }
    };
    let due = match answer {
        Ok(row) => bound_due(&row)?,
        Err(err) => return refused(&err).map(|o| (o, false)).ok_or_else(|| err.into()),
    };
    own.committed();
    Ok((Outcome::Committed, due))
}

/// Breaks the pipe if dropped while armed: a staged flight that panicked
/// after putting its `BEGIN` on the connection, and before its `COMMIT`,
/// left a transaction open there, which no later batch may run in.
struct Unfinished<'a>(Option<&'a Pipe>);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(pipe) = self.0 {
            pipe.broken.store(true, Ordering::Relaxed);
        }
    }
}

/// The output of a future polled once already (`first`).
async fn polled<F: std::future::Future>(
    first: std::task::Poll<F::Output>,
    future: std::pin::Pin<&mut F>,
) -> F::Output {
    match first {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => future.await,
    }
}

/// One batch on the locked path; answers every request and returns what the
/// committer knows afterwards (`None` after a failure).
async fn commit_locked(
    shared: &Shared,
    batch: Vec<Request>,
    known: Option<Known>,
) -> Option<Known> {
    let result = match shared.conn().await {
        Ok(conn) => {
            let result = shared
                .timed(in_txn(&conn, commit_on(&conn, shared, &batch, known)))
                .await;
            shared.settle(conn, result)
        }
        Err(err) => Err(err),
    };
    let (answers, known) = result.unwrap_or_else(|err| (failed(&batch, &err), None));
    reply(batch, answers);
    known
}

/// Sends each request its answer; a caller that gave up is no concern.
fn reply(batch: Vec<Request>, answers: Answers) {
    for (request, answer) in batch.into_iter().zip(answers) {
        let _ = request.reply.send(answer);
    }
}

/// The same error for every request of `batch`.
fn failed(batch: &[Request], err: &StoreError) -> Answers {
    batch.iter().map(|_| Err(copy_error(err))).collect()
}

/// What a batch reads before evaluating: every key named anywhere in it
/// (compares and operations of both branches), every range it deletes, and
/// every lease it attaches keys to.
#[derive(Default)]
struct ReadSet {
    keys: BTreeSet<Vec<u8>>,
    ranges: Vec<(Vec<u8>, Vec<u8>)>,
    leases: BTreeSet<i64>,
    /// A put names a lease (even one beyond bigint, which cannot exist).
    attaches_lease: bool,
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
                        if *lease != 0 {
                            set.attaches_lease = true;
                        }
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
    known: Option<Known>,
) -> Result<(Answers, Option<Known>), CallError> {
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
    let mut seen: Vec<Vec<u8>> = reads.keys.into_iter().collect();
    seen.extend(view.keys().cloned());

    // What was known stays valid only if nobody wrote since.
    let mut known = match known {
        Some(k)
            if k.revision == head.revision
                && k.writer == head.writer
                && k.history.version == head.history.version =>
        {
            k
        }
        _ => Known::new(&head),
    };
    let (writes, answers, next_event) = match evaluate(
        batch,
        &mut view,
        head.revision,
        head.next_event,
        &live,
        &head.history,
    ) {
        Ok(done) => done,
        Err(err) => {
            conn.batch_execute("ROLLBACK").await?;
            return Ok((failed(batch, &err), None));
        }
    };
    if writes.is_empty() {
        // Nothing to make durable: no commit (and no WAL flush) needed.
        conn.batch_execute("ROLLBACK").await?;
    } else {
        known.revision = writes.revision;
        known.next_event = next_event;
        known.writer = finish(conn, shared, &head, writes).await?;
    }
    for key in seen {
        let state = view.get(&key).cloned();
        known.set(key, state);
    }
    known.trim();
    Ok((answers, Some(known)))
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
    writes.add(applied, &mut view, &mut next_event, &head.history)?;
    finish(conn, shared, &head, writes).await.map(|_| ())
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

/// `BEGIN` and the revision row's lock, in one round trip: the start of a
/// transaction that does not read anything else along with the head.
async fn begin_locked(conn: &Object, shared: &Shared) -> Result<Head, CallError> {
    let lock = conn.prepare_cached(&shared.sql.lock_head).await?;
    let (_, head) = futures::try_join!(conn.batch_execute("BEGIN"), conn.query_one(&lock, &[]))?;
    Head::from_row(&head)
}

// ---------------------------------------------------------------- history

/// Widens the history scope to record changes under `wanted` too (see
/// `history.rs`), from the next revision on; a no-op if it already does.
/// Under the revision row lock, so every write after it has the new scope
/// (a write built on the old one fails its version check and runs again).
pub(crate) async fn widen_history(
    conn: &Object,
    shared: &Shared,
    wanted: &[Vec<u8>],
) -> Result<(), CallError> {
    in_txn(conn, widen_on(conn, shared, wanted)).await
}

async fn widen_on(conn: &Object, shared: &Shared, wanted: &[Vec<u8>]) -> Result<(), CallError> {
    // Usually nothing is missing: look without the lock first, which would
    // hold up every writer of the store for a round trip.
    let peek = conn.prepare_cached(&shared.sql.history_scope).await?;
    let scope = HistoryScope::from_row(&conn.query_one(&peek, &[]).await?, 0)?;
    if wanted.iter().all(|prefix| scope.records(prefix)) {
        return Ok(());
    }
    let widen = conn.prepare_cached(&shared.sql.widen_history).await?;
    let head = begin_locked(conn, shared).await?;
    // Revision 1 is the empty store's: nothing was written, so nothing was
    // left out of the log.
    let since = if head.revision <= 1 {
        1
    } else {
        head.revision + 1
    };
    match head.history.widened(wanted, since) {
        Some((prefixes, since)) => {
            tracing::info!(
                prefixes = ?wanted.iter().map(|p| String::from_utf8_lossy(p)).collect::<Vec<_>>(),
                "recording watch history for more key prefixes"
            );
            futures::try_join!(
                async { conn.execute(&widen, &[&prefixes, &since]).await },
                conn.batch_execute("COMMIT")
            )?;
        }
        None => conn.batch_execute("ROLLBACK").await?,
    }
    Ok(())
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
    let drop_history = conn.prepare_cached(&shared.sql.drop_history).await?;
    let head = begin_locked(conn, shared).await?;
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
