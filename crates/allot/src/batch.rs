//! Group commit per pool: requests queue up, one task applies the whole
//! queue to the in-memory pool state and commits it in one guarded
//! transaction, then answers everybody. On a lost compare (another process
//! wrote first) the batch is undone, the touched records are re-read and the
//! batch runs again; on a store error it is undone and every request fails.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use allot_core::{Block, PoolState, Run, ValueSpace};
use allot_store::{Compare, KeyValue, Op, OpResult, Revision, Store, Txn};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::model::{AllocRequest, Claim, ClaimRecord, KeyRecord, PoolRecord, Target};
use crate::turns::{Turn, TURN_AFTER};
use crate::{claim_from, decode_json, encode_json, is_stale, keys, lock, Inner, OpenResync};

/// Most requests one transaction carries; the rest wait for the next one.
const MAX_BATCH: usize = 2048;
/// Batches of one pool that may be building or committing at once: while
/// one commits (an fsync), the next is built on top of its effects. (One on
/// a store that does not keep write order: see `Store::keeps_write_order`.)
const MAX_IN_FLIGHT: usize = 4;
/// How long answers to idempotent requests are remembered (at least).
pub(crate) const IDEMPOTENCY_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);
/// Times a refusal judged on cached blocks is re-judged on re-read ones.
const VERIFY_ROUNDS: u32 = 3;
/// Attempts when other writers keep winning the compares. Between attempts
/// the batch backs off for a random time that grows with the attempt, so two
/// engines hammering one block do not keep colliding in lockstep.
const MAX_ATTEMPTS: u32 = 40;
const BACKOFF_STEP_US: u64 = 250;
const BACKOFF_MAX_US: u64 = 20_000;
/// Batches in a row whose lookups all found nothing before a pool's
/// batches start guessing that new requests' records are absent (see
/// `FreshKeys`).
const GUESS_AFTER: u32 = 32;

/// Whether a batch reads the records its new requests look up (claim keys,
/// request ids) or guesses that they are absent.
///
/// The read is a round trip to a shared store under the pool's lock
/// (about a third of a keyed claim's time on PostgreSQL), and it nearly
/// always finds nothing when clients claim new keys. A guessed key is
/// written with a compare that it is absent, so the store refuses a wrong
/// guess with nothing written; the failure branch reads the guessed keys
/// back to tell a wrong guess from a lost race. A wrong guess costs the
/// batch one refused commit (and the batches stacked on it theirs), its
/// requests run again reading, and guessing stays off until `GUESS_AFTER`
/// batches in a row found nothing again. Counting batches, not lookups,
/// makes the policy scale with batch size: when re-claims are common
/// enough that a batch often holds one, guessing stays off.
#[derive(Default)]
struct FreshKeys {
    /// Batches with lookups since the last one that found a record.
    streak: u32,
}

impl FreshKeys {
    fn guess(&self) -> bool {
        self.streak >= GUESS_AFTER
    }

    /// A batch read lookups; `found` tells, for each, whether it found a
    /// record.
    fn saw(&mut self, found: &[bool]) {
        if found.contains(&true) {
            self.streak = 0;
        } else if !found.is_empty() {
            self.streak = self.streak.saturating_add(1);
        }
    }

    /// A guessed-absent record existed.
    fn wrong(&mut self) {
        self.streak = 0;
    }
}

#[derive(Debug)]
pub(crate) enum PendingOp {
    Alloc(AllocRequest),
    Release {
        target: Target,
        request_id: Option<String>,
    },
    /// Release a claim marked by a resync, unless it was written after `rev`.
    ReleaseStale {
        offset: u64,
        rev: Revision,
    },
}

impl PendingOp {
    fn request_id(&self) -> Option<&str> {
        match self {
            PendingOp::Alloc(req) => req.request_id.as_deref(),
            PendingOp::Release { request_id, .. } => request_id.as_deref(),
            PendingOp::ReleaseStale { .. } => None,
        }
    }

    /// What a repeat must match to be answered from memory.
    fn digest(&self) -> String {
        let v = match self {
            PendingOp::Alloc(req) => serde_json::to_value(AllocRequest {
                request_id: None,
                ..req.clone()
            })
            .unwrap_or_default(),
            PendingOp::Release { target, .. } => serde_json::to_value(target).unwrap_or_default(),
            PendingOp::ReleaseStale { .. } => serde_json::Value::Null,
        };
        v.to_string()
    }
}

/// The first answer to an idempotent request.
#[derive(serde::Serialize, serde::Deserialize)]
struct Remembered {
    digest: String,
    outcome: Outcome,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) enum Outcome {
    Claims(Vec<Claim>),
    Released(Claim),
    /// ReleaseStale found the claim re-claimed (or gone): nothing to do.
    Skipped,
}

/// Requests waiting for a batch, and whether a task is already on its way
/// to take them.
#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    /// A drive task has been spawned and has not taken the queue yet: the
    /// requests queued meanwhile ride with it, so a request spawns a task
    /// only when nobody will otherwise pick it up (one spawn, permit and
    /// lock round per batch rather than per request).
    drainer: bool,
}

struct Pending {
    op: PendingOp,
    tx: oneshot::Sender<Result<Outcome>>,
    /// Batches this request was in that lost a compare.
    attempts: u32,
    /// It was in a batch that guessed a record absent wrongly: its next
    /// batch reads (whatever other batches meanwhile told `FreshKeys`).
    read_first: bool,
}

/// A pool loaded in memory.
pub(crate) struct PoolHandle {
    pub(crate) record: PoolRecord,
    /// Revision of the pool record this handle was loaded from; every write
    /// compares it, so a deleted or re-created pool is never written through
    /// a stale handle.
    pub(crate) record_rev: Revision,
    space: ValueSpace,
    queue: std::sync::Mutex<Queue>,
    pub(crate) state: tokio::sync::Mutex<LoadedState>,
    /// Bounds the batches of this pool that are building or committing.
    in_flight: tokio::sync::Semaphore,
    /// Signalled whenever a committing batch is settled.
    idle: tokio::sync::Notify,
    /// Most batches building or committing at once (`in_flight`'s permits).
    max_in_flight: usize,
    /// Who holds the pool's turn ([`crate::turns`]).
    pub(crate) turn: std::sync::Mutex<Turn>,
    /// Signalled whenever the pool's turn changes hands (a request seen,
    /// withdrawn, granted or refused).
    pub(crate) turn_changed: tokio::sync::Notify,
}

pub(crate) struct LoadedState {
    pub(crate) core: PoolState,
    /// mod_revision of each stored block (absent: no record).
    block_revs: HashMap<u64, Revision>,
    cursor_rev: Revision,
    /// False after a store error: the next batch reloads before working.
    fresh: bool,
    /// Blocks written by batches that lost a compare: re-read when idle.
    needs_refresh: std::collections::BTreeSet<u64>,
    in_flight: InFlight,
    fresh_keys: FreshKeys,
}

impl PoolHandle {
    pub(crate) async fn load(store: &dyn Store, name: &str, seed: u64) -> Result<PoolHandle> {
        let kv = store
            .get(&keys::pool(name))
            .await?
            .ok_or_else(|| Error::PoolNotFound(name.to_string()))?;
        let record: PoolRecord = decode_json("pool record", &kv.value)?;
        let core = PoolState::new(&record.spec, seed).map_err(|e| Error::from_core(name, e))?;
        let space = core.space().clone();
        let mut state = LoadedState {
            core,
            block_revs: HashMap::new(),
            cursor_rev: 0,
            fresh: false,
            needs_refresh: Default::default(),
            in_flight: InFlight::default(),
            fresh_keys: FreshKeys::default(),
        };
        state.reload(store, name).await?;
        // A batch sent before the one it builds on is answered could
        // overtake it on a store that does not keep write order.
        let max_in_flight = if store.keeps_write_order() {
            MAX_IN_FLIGHT
        } else {
            1
        };
        Ok(PoolHandle {
            record,
            record_rev: kv.mod_revision,
            space,
            queue: std::sync::Mutex::new(Queue::default()),
            state: tokio::sync::Mutex::new(state),
            in_flight: tokio::sync::Semaphore::new(max_in_flight),
            idle: tokio::sync::Notify::new(),
            max_in_flight,
            turn: std::sync::Mutex::new(Turn::default()),
            turn_changed: tokio::sync::Notify::new(),
        })
    }

    /// Nothing queued, building or committing.
    pub(crate) fn is_idle(&self) -> bool {
        lock(&self.queue).pending.is_empty()
            && self.in_flight.available_permits() == self.max_in_flight
    }

    pub(crate) fn space(&self) -> &ValueSpace {
        &self.space
    }

    /// The state, first brought up to date with what other engines wrote
    /// (if the follower saw any), for answers served from the cache.
    pub(crate) async fn caught_up_state(
        &self,
        store: &dyn Store,
        name: &str,
    ) -> Result<tokio::sync::MutexGuard<'_, LoadedState>> {
        let mut state = self.state.lock().await;
        if !state.fresh || !state.needs_refresh.is_empty() {
            state = wait_idle(self, state).await;
            state.catch_up(store, name).await?;
        }
        Ok(state)
    }
}

impl LoadedState {
    /// Everything is re-read before the next use.
    pub(crate) fn distrust(&mut self) {
        self.fresh = false;
    }

    /// A write of block `idx` at `rev` was seen in the store: unless it is
    /// one of ours (already booked), re-read the block before the next use.
    /// While a batch of ours on the block is committing, whose write it is
    /// cannot be told yet: another engine's that came before ours makes our
    /// compare fail (which re-reads the block), but one that came after ours
    /// committed, before our answer, does not. It is kept and judged when
    /// ours settles (`settle`).
    pub(crate) fn note_block_write(&mut self, idx: u64, rev: Revision) {
        if self.in_flight.blocks.contains_key(&idx) {
            let seen = self.in_flight.seen.entry(idx).or_insert(0);
            *seen = (*seen).max(rev);
            return;
        }
        if self.block_revs.get(&idx).is_some_and(|&known| known >= rev) {
            return;
        }
        self.needs_refresh.insert(idx);
    }

    /// Re-reads what can no longer be trusted: everything after a store
    /// error, or the blocks written by batches that lost a compare. Only
    /// called when no batch is committing.
    async fn catch_up(&mut self, store: &dyn Store, name: &str) -> Result<()> {
        if !self.fresh {
            self.reload(store, name).await?;
        } else {
            let idxs: Vec<u64> = self.needs_refresh.iter().copied().collect();
            self.refresh_blocks(store, name, &idxs).await?;
        }
        self.needs_refresh.clear();
        Ok(())
    }

    /// The compare that guards a write of block `idx`: the exact bytes a
    /// committing batch wrote, else the revision last seen.
    fn expect_block(&self, key: &[u8], idx: u64) -> Compare {
        match self.in_flight.blocks.get(&idx) {
            Some((_, Some(bytes))) => Compare::value(key, bytes),
            Some((_, None)) => Compare::absent(key),
            None => Compare::mod_revision(key, self.block_revs.get(&idx).copied().unwrap_or(0)),
        }
    }

    fn expect_cursor(&self, key: &[u8]) -> Compare {
        match &self.in_flight.cursor {
            Some((_, bytes)) => Compare::value(key, bytes),
            None => Compare::mod_revision(key, self.cursor_rev),
        }
    }

    /// Books the outcome of a committed (or failed) batch.
    fn settle(
        &mut self,
        f: &Footprint,
        resp: &Result<allot_store::TxnResponse, allot_store::StoreError>,
    ) {
        self.in_flight.count -= 1;
        self.in_flight.outstanding.remove(&f.id);
        let committed = match resp {
            Ok(r) if r.succeeded => Some(r.revision),
            Ok(_) => None,
            Err(_) => {
                // Committed or not, nobody knows: reload everything when idle.
                self.fresh = false;
                None
            }
        };
        for &(idx, put) in &f.blocks {
            if self
                .in_flight
                .blocks
                .get(&idx)
                .is_some_and(|(id, _)| *id == f.id)
            {
                self.in_flight.blocks.remove(&idx);
            }
            match committed {
                Some(rev) if put => {
                    let known = self.block_revs.entry(idx).or_insert(0);
                    *known = (*known).max(rev);
                }
                Some(_) => {
                    self.block_revs.remove(&idx);
                }
                None => {
                    self.needs_refresh.insert(idx);
                }
            }
            // The last of ours on the block (the newest: batches of a pool
            // commit in the order they were sent, see `MAX_IN_FLIGHT`): a
            // write seen meanwhile that is newer than this one's was another
            // engine's. (A batch that failed re-reads the block anyway.)
            if !self.in_flight.blocks.contains_key(&idx) {
                if let Some(seen) = self.in_flight.seen.remove(&idx) {
                    if committed.is_some_and(|rev| seen > rev) {
                        self.needs_refresh.insert(idx);
                    }
                }
            }
        }
        if committed.is_none() {
            self.in_flight.failures += 1;
            self.needs_refresh.extend(f.checked.iter().copied());
        }
        for key in &f.records {
            if self
                .in_flight
                .records
                .get(key)
                .is_some_and(|(id, _)| *id == f.id)
            {
                self.in_flight.records.remove(key);
            }
        }
        if f.cursor {
            if self
                .in_flight
                .cursor
                .as_ref()
                .is_some_and(|(id, _)| *id == f.id)
            {
                self.in_flight.cursor = None;
            }
            if let Some(rev) = committed {
                self.cursor_rev = self.cursor_rev.max(rev);
            }
        }
    }

    /// Reads every block and the cursor of the pool from the store.
    async fn reload(&mut self, store: &dyn Store, name: &str) -> Result<()> {
        let prefix = keys::blocks_prefix(name);
        let end = allot_store::prefix_end(&prefix);
        let mut start = prefix.clone();
        let mut loaded: Vec<(u64, Block, Revision)> = Vec::new();
        loop {
            let res = store.range(&start, &end, 1024).await?;
            for kv in &res.kvs {
                let idx =
                    keys::block_index(&kv.key).ok_or_else(|| Error::Corrupt("block key".into()))?;
                let block = Block::decode(&kv.value).map_err(|e| Error::from_core(name, e))?;
                loaded.push((idx, block, kv.mod_revision));
            }
            match (res.more, res.kvs.last()) {
                (true, Some(last)) => {
                    start = last.key.clone();
                    start.push(0);
                }
                _ => break,
            }
        }
        // Blocks we knew that are gone from the store must be forgotten too.
        let known: Vec<u64> = self.block_revs.keys().copied().collect();
        for idx in known {
            self.core.reload_block(idx, None);
        }
        self.block_revs.clear();
        for (idx, block, rev) in loaded {
            self.core.load_block(idx, block);
            self.block_revs.insert(idx, rev);
        }
        self.reload_cursor(store, name).await?;
        self.fresh = true;
        Ok(())
    }

    async fn reload_cursor(&mut self, store: &dyn Store, name: &str) -> Result<()> {
        match store.get(&keys::cursor(name)).await? {
            Some(kv) => {
                let bytes: [u8; 8] = kv
                    .value
                    .as_slice()
                    .try_into()
                    .map_err(|_| Error::Corrupt("cursor record".into()))?;
                self.core.set_cursor(u64::from_le_bytes(bytes));
                self.cursor_rev = kv.mod_revision;
            }
            None => self.cursor_rev = 0,
        }
        Ok(())
    }

    /// Re-reads only the given blocks (after another writer won a compare).
    async fn refresh_blocks(
        &mut self,
        store: &dyn Store,
        name: &str,
        blocks: &[u64],
    ) -> Result<()> {
        for &idx in blocks {
            match store.get(&keys::block(name, idx)).await? {
                Some(kv) => {
                    let block = Block::decode(&kv.value).map_err(|e| Error::from_core(name, e))?;
                    self.core.reload_block(idx, Some(block));
                    self.block_revs.insert(idx, kv.mod_revision);
                }
                None => {
                    self.core.reload_block(idx, None);
                    self.block_revs.remove(&idx);
                }
            }
        }
        self.reload_cursor(store, name).await
    }
}

impl Inner {
    /// Queues `op` on the pool and waits for the batch that carries it.
    pub(crate) async fn submit(self: &Arc<Self>, pool: &str, op: PendingOp) -> Result<Outcome> {
        let handle = self.handle(pool).await?;
        if handle.record.spec.member_blocks.is_some() {
            return Err(Error::InvalidInput(format!(
                "pool '{pool}' hands out values from blocks its members own: \
                 allocate and release through a member"
            )));
        }
        let (tx, rx) = oneshot::channel();
        let spawn = {
            let mut q = lock(&handle.queue);
            q.pending.push(Pending {
                op,
                tx,
                attempts: 0,
                read_first: false,
            });
            !std::mem::replace(&mut q.drainer, true)
        };
        // The batch runs in its own task so a caller that gives up (timeout,
        // closed connection) cannot interrupt a commit half way.
        if spawn {
            tokio::spawn(self.clone().drive(pool.to_string(), handle, 0));
        }
        rx.await.map_err(|_| Error::Contention(pool.to_string()))?
    }

    /// Takes whatever is queued on the pool, builds one transaction for it
    /// on top of the in-memory state (which already includes the batches
    /// still committing), starts the commit, and lets the next batch build
    /// while this one commits.
    async fn drive(self: Arc<Self>, name: String, handle: Arc<PoolHandle>, backoff_us: u64) {
        if backoff_us > 0 {
            let pause = rand::random_range(0..=backoff_us);
            tokio::time::sleep(std::time::Duration::from_micros(pause)).await;
        }
        self.wait_turn(&name, &handle).await;
        let Ok(permit) = handle.in_flight.acquire().await else {
            // Never closed; should it be, the queue must not wait for a
            // drainer that will not come.
            lock(&handle.queue).drainer = false;
            return;
        };
        // Let the tasks already woken run before the queue is drained: the
        // permit usually comes free just as a committed batch answers its
        // clients, who resubmit at once. Without this pause the batch is
        // built before they do and their requests wait for the next one
        // (BENCHMARKS.md §6 round 10: 18 -> 23 claims per PostgreSQL commit
        // at 64 clients).
        tokio::task::yield_now().await;
        let mut state = handle.state.lock().await;
        let (batch, more) = {
            let mut q = lock(&handle.queue);
            let n = q.pending.len().min(MAX_BATCH);
            let batch: Vec<Pending> = q.pending.drain(..n).collect();
            // Whatever is queued from now on needs a new drive task (the
            // submitter spawns it); what did not fit gets one right away.
            q.drainer = !q.pending.is_empty();
            (batch, q.drainer)
        };
        if more {
            self.clone().spawn_drive(name.clone(), handle.clone());
        }
        if batch.is_empty() {
            return; // an earlier task carried our request
        }
        let read_first = batch.iter().any(|p| p.read_first);
        let mut ops = Vec::with_capacity(batch.len());
        let mut waiters = Vec::with_capacity(batch.len());
        for p in batch {
            ops.push(p.op);
            waiters.push((p.tx, p.attempts));
        }
        let store = self.store.as_ref();
        let mut verified = 0;
        let mut guess = !read_first;
        let mut ready = loop {
            if !state.fresh || !state.needs_refresh.is_empty() {
                // Only the committed state can be re-read: wait for the rest.
                state = wait_idle(&handle, state).await;
                if let Err(e) = state.catch_up(store, &name).await {
                    return answer(waiters, fail_all(ops.len(), &e));
                }
            }
            match self
                .build(
                    &name,
                    &handle,
                    &mut state,
                    &ops,
                    verified >= VERIFY_ROUNDS,
                    guess,
                )
                .await
            {
                Ok(Built::Ready(r)) => break r,
                Ok(Built::After {
                    results,
                    deps,
                    failures,
                }) => {
                    // Answer once the batches these answers rest on have
                    // committed; if any batch failed meanwhile, build again.
                    state = wait_until(&handle, state, |s| {
                        !deps.iter().any(|d| s.in_flight.outstanding.contains(d))
                    })
                    .await;
                    if state.in_flight.failures == failures {
                        return answer(waiters, results);
                    }
                }
                Ok(Built::Refresh { all, blocks }) => {
                    // A refusal was judged on cached blocks another process
                    // may have changed: re-read them and build again.
                    verified += 1;
                    if all {
                        state.fresh = false;
                    } else {
                        state.needs_refresh.extend(blocks);
                    }
                }
                Ok(Built::Read) => guess = false,
                Err(e) => return answer(waiters, fail_all(ops.len(), &e)),
            }
        };
        let Some(txn) = ready.txn.take() else {
            // Nothing to write (idempotent re-claims, refusals).
            state.core.commit();
            return answer(waiters, ready.results);
        };
        let footprint = state.in_flight.register(&ready);
        state.core.commit();
        let resp = {
            let mut commit = self.store.txn(txn);
            // Poll once while holding the lock, so a store that queues commits in
            // call order (redb) receives this batch before the next one is built.
            match futures::poll!(commit.as_mut()) {
                std::task::Poll::Ready(r) => r,
                std::task::Poll::Pending => {
                    drop(state);
                    let r = commit.await;
                    state = handle.state.lock().await;
                    r
                }
            }
        };
        state.settle(&footprint, &resp);
        // The failure branch read back the keys guessed absent (after the
        // pool record): one that exists is why the batch failed.
        let wrong_guess = matches!(&resp, Ok(r) if !r.succeeded
            && r.results.iter().skip(1).any(|g| matches!(g, OpResult::Get(Some(_)))));
        if wrong_guess {
            state.fresh_keys.wrong();
        }
        drop(state);
        drop(permit);
        handle.idle.notify_waiters();
        match resp {
            Ok(r) if r.succeeded => answer(waiters, ready.results),
            Ok(r) => {
                let same_pool = matches!(r.results.first(), Some(OpResult::Get(Some(kv))) if kv.mod_revision == handle.record_rev);
                if !same_pool {
                    self.forget(&name, &handle);
                    return answer(
                        waiters,
                        fail_all(ops.len(), &Error::PoolNotFound(name.clone())),
                    );
                }
                // A wrong guess is not contention: run again at once, reading.
                self.requeue(name, handle, ops, waiters, !wrong_guess);
            }
            Err(e) => answer(waiters, fail_all(ops.len(), &Error::Store(e))),
        }
    }

    /// Starts another drive task for requests that did not fit in a batch.
    /// (A plain function: an async fn cannot spawn itself directly.)
    fn spawn_drive(self: Arc<Self>, name: String, handle: Arc<PoolHandle>) {
        tokio::spawn(self.drive(name, handle, 0));
    }

    /// Puts the requests of a batch that lost a compare back at the head of
    /// the queue. A `contended` batch (another writer won) runs again after
    /// a random pause that grows with each attempt, so two engines hammering
    /// one block do not collide in lockstep; otherwise it runs again at once
    /// and the attempt does not count.
    fn requeue(
        self: Arc<Self>,
        name: String,
        handle: Arc<PoolHandle>,
        ops: Vec<PendingOp>,
        waiters: Vec<(oneshot::Sender<Result<Outcome>>, u32)>,
        contended: bool,
    ) {
        let mut again = Vec::with_capacity(ops.len());
        let mut attempts = 0;
        for (op, (tx, n)) in ops.into_iter().zip(waiters) {
            let n = if contended { n + 1 } else { n };
            if n >= MAX_ATTEMPTS {
                let _ = tx.send(Err(Error::Contention(name.clone())));
            } else {
                attempts = attempts.max(n);
                again.push(Pending {
                    op,
                    tx,
                    attempts: n,
                    read_first: !contended,
                });
            }
        }
        if again.is_empty() {
            return;
        }
        if contended && attempts >= TURN_AFTER {
            // Losing again and again: the other engine may never let up.
            self.ask_turn(&name, &handle);
        }
        {
            let mut q = lock(&handle.queue);
            q.pending.splice(0..0, again);
        }
        let backoff = if !contended {
            0
        } else if handle.holds_turn() {
            // The others hold off: what we lost to was already committing.
            BACKOFF_STEP_US
        } else {
            (BACKOFF_STEP_US << attempts.min(16)).min(BACKOFF_MAX_US)
        };
        tokio::spawn(self.drive(name, handle, backoff));
    }

    /// Applies a batch to the in-memory state and builds its transaction.
    async fn build(
        &self,
        name: &str,
        handle: &PoolHandle,
        state: &mut LoadedState,
        ops: &[PendingOp],
        verified: bool,
        guess: bool,
    ) -> Result<Built> {
        let store = self.store.as_ref();
        let mut work = Work::prepare(
            store,
            name,
            handle,
            ops,
            &state.in_flight,
            &mut state.fresh_keys,
            guess,
        )
        .await?;
        if ops.iter().any(|op| op.request_id().is_some()) {
            work.lease = Some(self.idempotency_lease().await?);
        }
        let now = self.clock.now_ms();
        state.core.checkpoint();
        let cursor_before = state.core.cursor();
        let results: Vec<Result<Outcome>> = ops
            .iter()
            .map(|op| work.apply(handle, &mut state.core, op, now))
            .collect();
        if !verified && (work.reload_all || !work.suspect.is_empty()) {
            state.core.rollback();
            return Ok(Built::Refresh {
                all: work.reload_all,
                blocks: work.suspect.into_iter().collect(),
            });
        }
        let writes = !work.writes.is_empty() || !work.leased.is_empty() || state.core.is_dirty();
        if !writes && !work.guessed.is_empty() {
            // Only a write has the store check the guesses (refusals write
            // nothing): answer from what is read.
            state.core.rollback();
            return Ok(Built::Read);
        }
        if !writes && state.in_flight.count > 0 {
            // These answers rest on batches not committed yet.
            state.core.rollback();
            return Ok(Built::After {
                results,
                deps: state.in_flight.outstanding.iter().copied().collect(),
                failures: state.in_flight.failures,
            });
        }
        let mut txn = Txn::new().when(Compare::mod_revision(keys::pool(name), handle.record_rev));
        for (key, rev) in &work.read_revs {
            txn = txn.when(Compare::mod_revision(key, *rev));
        }
        for (key, value) in &work.read_pending {
            txn = txn.when(match value {
                Some(v) => Compare::value(key, v),
                None => Compare::absent(key),
            });
        }
        if !work.allocated.is_empty() || !work.released.is_empty() {
            let change = crate::Change::Claims {
                pool: name.to_string(),
                allocated: std::mem::take(&mut work.allocated),
                released: std::mem::take(&mut work.released),
            };
            // Not a record others read: outside `writes`, so no batch compares it.
            txn = txn.then(Op::put(keys::event(name), encode_json(&change)));
        }
        for (key, value) in &work.writes {
            txn = txn.then(match value {
                Some(v) => Op::put(key, v),
                None => Op::delete(key),
            });
        }
        for (key, (value, lease)) in &work.leased {
            txn = txn.then(Op::put_with_lease(key, value, *lease));
        }
        let blocks: Vec<(u64, Option<Vec<u8>>)> = state
            .core
            .dirty_blocks()
            .into_iter()
            .map(|(i, b)| (i, b.map(Block::encode)))
            .collect();
        for (idx, bytes) in &blocks {
            let key = keys::block(name, *idx);
            txn = txn.when(state.expect_block(&key, *idx));
            txn = txn.then(match bytes {
                Some(b) => Op::put(&key, b),
                None => Op::delete(&key),
            });
        }
        // Refusals were judged on these blocks: they must still be as seen.
        let checked: Vec<u64> = work
            .suspect
            .iter()
            .copied()
            .filter(|i| !blocks.iter().any(|(d, _)| d == i))
            .collect();
        for idx in &checked {
            txn = txn.when(state.expect_block(&keys::block(name, *idx), *idx));
        }
        let cursor = state.core.cursor();
        let cursor = (cursor != cursor_before).then(|| cursor.to_le_bytes().to_vec());
        if let Some(c) = &cursor {
            txn = txn
                .when(state.expect_cursor(&keys::cursor(name)))
                .then(Op::put(keys::cursor(name), c));
        }
        let txn = if txn.success.is_empty() && checked.is_empty() && work.read_pending.is_empty() {
            None
        } else {
            // Get the pool record back on failure to tell "deleted" from
            // "busy", and the guessed keys to tell a wrong guess.
            let txn = txn.otherwise(Op::get(keys::pool(name)));
            Some(
                work.guessed
                    .iter()
                    .fold(txn, |t, k| t.otherwise(Op::get(k))),
            )
        };
        let mut records: Vec<(Vec<u8>, Option<Vec<u8>>)> = work.writes.into_iter().collect();
        records.extend(work.leased.into_iter().map(|(k, (v, _))| (k, Some(v))));
        Ok(Built::Ready(Ready {
            results,
            txn,
            blocks,
            checked,
            records,
            cursor,
        }))
    }

    /// The lease idempotency records are written on. A new one every
    /// window, living two windows, so a record lives one to two windows.
    async fn idempotency_lease(&self) -> Result<allot_store::LeaseId> {
        let mut current = self.idempotency_lease.lock().await;
        if let Some((id, granted)) = *current {
            if granted.elapsed() < IDEMPOTENCY_WINDOW {
                return Ok(id);
            }
        }
        let id = self.store.lease_grant(IDEMPOTENCY_WINDOW * 2).await?;
        *current = Some((id, tokio::time::Instant::now()));
        Ok(id)
    }
}

enum Built {
    Ready(Ready),
    /// Nothing to write, but the answers rest on these committing batches:
    /// give them once those succeeded (no failure since `failures`).
    After {
        results: Vec<Result<Outcome>>,
        deps: Vec<u64>,
        failures: u64,
    },
    /// Re-read these cached blocks (or all of them) and build again.
    Refresh {
        all: bool,
        blocks: Vec<u64>,
    },
    /// The answers rest on records guessed absent and write nothing that
    /// would check them: build again, reading them.
    Read,
}

/// A built batch: the answers it will give if its transaction commits.
struct Ready {
    results: Vec<Result<Outcome>>,
    txn: Option<Txn>,
    blocks: Vec<(u64, Option<Vec<u8>>)>,
    /// Blocks only compared (refusals were judged on them), not written.
    checked: Vec<u64>,
    records: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    cursor: Option<Vec<u8>>,
}

/// What a batch in flight wrote, to settle the bookkeeping once it is done.
struct Footprint {
    id: u64,
    blocks: Vec<(u64, bool)>,
    checked: Vec<u64>,
    records: Vec<Vec<u8>>,
    cursor: bool,
}

/// Writes of batches that are committing. A batch built meanwhile sees them
/// (the in-memory blocks include them; records and cursor are looked up
/// here) and guards its own transaction with their exact bytes, because the
/// revisions they will get are not known yet.
#[derive(Default)]
pub(crate) struct InFlight {
    count: usize,
    /// Ids of the batches committing now.
    outstanding: std::collections::BTreeSet<u64>,
    /// Batches that lost a compare or hit an error, ever (a change means "rebuild").
    failures: u64,
    next_id: u64,
    blocks: HashMap<u64, (u64, Option<Vec<u8>>)>,
    records: HashMap<Vec<u8>, (u64, Option<Vec<u8>>)>,
    cursor: Option<(u64, Vec<u8>)>,
    /// The newest write the follower reported for a block while a batch
    /// of ours on it was committing: ours, or another engine's that came
    /// after ours committed. Judged once the last of ours on it settles.
    seen: HashMap<u64, Revision>,
}

impl InFlight {
    fn register(&mut self, r: &Ready) -> Footprint {
        self.next_id += 1;
        let id = self.next_id;
        self.count += 1;
        self.outstanding.insert(id);
        for (idx, bytes) in &r.blocks {
            self.blocks.insert(*idx, (id, bytes.clone()));
        }
        for (key, value) in &r.records {
            self.records.insert(key.clone(), (id, value.clone()));
        }
        if let Some(c) = &r.cursor {
            self.cursor = Some((id, c.clone()));
        }
        Footprint {
            id,
            blocks: r.blocks.iter().map(|(i, b)| (*i, b.is_some())).collect(),
            checked: r.checked.clone(),
            records: r.records.iter().map(|(k, _)| k.clone()).collect(),
            cursor: r.cursor.is_some(),
        }
    }
}

/// Waits, without holding the lock, until `done` holds for the pool's state
/// (re-checked each time a committing batch settles).
async fn wait_until<'a>(
    handle: &'a PoolHandle,
    mut state: tokio::sync::MutexGuard<'a, LoadedState>,
    done: impl Fn(&LoadedState) -> bool,
) -> tokio::sync::MutexGuard<'a, LoadedState> {
    while !done(&state) {
        let notified = handle.idle.notified();
        tokio::pin!(notified);
        // Registered before the lock is released: no wake-up can be missed.
        notified.as_mut().enable();
        drop(state);
        notified.await;
        state = handle.state.lock().await;
    }
    state
}

/// Waits until no batch of the pool is committing.
async fn wait_idle<'a>(
    handle: &'a PoolHandle,
    state: tokio::sync::MutexGuard<'a, LoadedState>,
) -> tokio::sync::MutexGuard<'a, LoadedState> {
    wait_until(handle, state, |s| s.in_flight.count == 0).await
}

fn answer(waiters: Vec<(oneshot::Sender<Result<Outcome>>, u32)>, results: Vec<Result<Outcome>>) {
    for ((tx, _), r) in waiters.into_iter().zip(results) {
        let _ = tx.send(r);
    }
}

fn fail_all(n: usize, e: &Error) -> Vec<Result<Outcome>> {
    (0..n).map(|_| Err(clone_error(e))).collect()
}

/// Errors are not Clone (store errors wrap I/O); rebuild an equivalent one.
fn clone_error(e: &Error) -> Error {
    match e {
        Error::PoolNotFound(p) => Error::PoolNotFound(p.clone()),
        Error::Contention(p) => Error::Contention(p.clone()),
        Error::Fenced(m) => Error::Fenced(m.clone()),
        Error::Corrupt(m) => Error::Corrupt(m.clone()),
        Error::Store(s) => Error::Store(match s {
            allot_store::StoreError::Unavailable(m) => {
                allot_store::StoreError::Unavailable(m.clone())
            }
            other => allot_store::StoreError::Backend(other.to_string()),
        }),
        other => Error::Corrupt(other.to_string()),
    }
}

/// Records read for a batch and the writes it produces.
struct Work {
    name: String,
    /// Key and claim records as they are now, inside this batch.
    records: HashMap<Vec<u8>, Option<(Vec<u8>, Revision)>>,
    /// What the transaction must find unchanged: key → mod_revision read (0 = absent).
    read_revs: BTreeMap<Vec<u8>, Revision>,
    /// Records read from batches still committing: they must hold exactly
    /// these bytes (None: be absent) when this batch commits.
    read_pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    resyncs: Vec<OpenResync>,
    resyncs_loaded: bool,
    /// The lease idempotency records of this batch go on.
    lease: Option<allot_store::LeaseId>,
    /// Idempotency records to write, on `lease`.
    leased: BTreeMap<Vec<u8>, (Vec<u8>, allot_store::LeaseId)>,
    /// What this batch allocated and released, for its change record.
    allocated: Vec<crate::EventClaim>,
    released: Vec<crate::EventClaim>,
    /// Cached blocks a refusal in this batch was based on.
    suspect: std::collections::BTreeSet<u64>,
    /// A refusal (exhaustion) was based on the whole cached pool.
    reload_all: bool,
    /// Records guessed absent, not read (see `FreshKeys`).
    guessed: Vec<Vec<u8>>,
}

impl Work {
    /// Reads, in one snapshot, every record the batch will look at; or,
    /// when `guess` is allowed, `fresh` says so and the batch only looks up
    /// records new requests create that no committing batch writes,
    /// guesses they are absent and reads nothing.
    async fn prepare(
        store: &dyn Store,
        name: &str,
        handle: &PoolHandle,
        ops: &[PendingOp],
        in_flight: &InFlight,
        fresh: &mut FreshKeys,
        guess: bool,
    ) -> Result<Work> {
        let mut want: Vec<Vec<u8>> = Vec::new();
        // Records a new request creates: claim keys and request ids.
        let mut lookups: Vec<Vec<u8>> = Vec::new();
        for op in ops {
            match op {
                PendingOp::Alloc(AllocRequest { key: Some(k), .. }) => {
                    lookups.push(keys::key(name, k))
                }
                PendingOp::Release {
                    target: Target::Key(k),
                    ..
                } => want.push(keys::key(name, k)),
                PendingOp::Release {
                    target: Target::Value(v),
                    ..
                } => {
                    if let Ok(run) = handle.space().parse(v) {
                        want.push(keys::value(name, run.offset));
                    }
                }
                PendingOp::ReleaseStale { offset, .. } => want.push(keys::value(name, *offset)),
                PendingOp::Alloc(_) => {}
            }
            if let Some(id) = op.request_id() {
                lookups.push(keys::idempotency(name, id));
            }
            if matches!(
                op,
                PendingOp::Release { .. } | PendingOp::ReleaseStale { .. }
            ) {
                want.push(keys::children(name));
            }
        }
        let mut work = Work {
            name: name.to_string(),
            records: HashMap::new(),
            read_revs: BTreeMap::new(),
            read_pending: BTreeMap::new(),
            writes: BTreeMap::new(),
            resyncs: Vec::new(),
            resyncs_loaded: false,
            suspect: Default::default(),
            reload_all: false,
            allocated: Vec::new(),
            released: Vec::new(),
            lease: None,
            leased: BTreeMap::new(),
            guessed: Vec::new(),
        };
        lookups.sort();
        lookups.dedup();
        // A lookup a committing batch writes is not guessed: the read path
        // also follows its key to the claim record.
        if guess
            && want.is_empty()
            && fresh.guess()
            && !lookups.iter().any(|k| in_flight.records.contains_key(k))
        {
            for k in lookups {
                work.read_revs.insert(k.clone(), 0);
                work.records.insert(k.clone(), None);
                work.guessed.push(k);
            }
            return Ok(work);
        }
        want.extend(lookups.iter().cloned());
        // Keys and the claim records they point at must come from one
        // snapshot: read separately, another writer's release in between
        // would leave a key without its record. So re-read everything with
        // the claim records found so far until the pairs agree.
        let mut want: std::collections::BTreeSet<Vec<u8>> = want.into_iter().collect();
        let mut consistent = false;
        for _ in 0..8 {
            work.fetch(store, want.iter().cloned().collect(), in_flight)
                .await?;
            let mut follow = Vec::new();
            for (k, v) in &work.records {
                if k.starts_with(b"k/") {
                    if let Some((bytes, _)) = v {
                        let kr: KeyRecord = decode_json("key record", bytes)?;
                        follow.push(keys::value(name, kr.offset));
                    }
                }
            }
            let before = want.len();
            want.extend(follow);
            if want.len() == before {
                consistent = true;
                break;
            }
        }
        if !consistent {
            return Err(Error::Contention(name.to_string()));
        }
        let found: Vec<bool> = lookups
            .iter()
            .filter(|k| work.read_revs.contains_key(*k))
            .map(|k| work.get(k).is_some())
            .collect();
        fresh.saw(&found);
        // Open resyncs only judge claims that already exist: a batch of
        // fresh keys (the common case) skips the read, a round trip on a
        // shared store.
        let reclaims = ops
            .iter()
            .any(|op| matches!(op, PendingOp::Alloc(AllocRequest { key: Some(_), .. })))
            && work
                .records
                .iter()
                .any(|(k, v)| k.starts_with(b"k/") && v.is_some());
        if reclaims {
            let prefix = keys::resyncs_prefix(name);
            let res = store
                .range(&prefix, &allot_store::prefix_end(&prefix), 0)
                .await?;
            for kv in res.kvs {
                let r: crate::model::ResyncRecord = decode_json("resync record", &kv.value)?;
                work.resyncs.push(OpenResync {
                    owner: r.owner,
                    revision: kv.mod_revision,
                });
            }
            work.resyncs_loaded = true;
        }
        Ok(work)
    }

    async fn fetch(
        &mut self,
        store: &dyn Store,
        mut want: Vec<Vec<u8>>,
        in_flight: &InFlight,
    ) -> Result<()> {
        want.sort();
        want.dedup();
        // Every call re-reads all of `want` in one snapshot, replacing what
        // earlier calls read: callers rely on the set being consistent.
        want.retain(|k| !self.take_in_flight(k, in_flight));
        if want.is_empty() {
            return Ok(());
        }
        let mut txn = Txn::new();
        for k in &want {
            txn = txn.then(Op::get(k));
        }
        let resp = store.txn(txn).await?;
        for (k, r) in want.into_iter().zip(resp.results) {
            let kv: Option<KeyValue> = match r {
                OpResult::Get(kv) => kv,
                _ => None,
            };
            self.read_revs
                .insert(k.clone(), kv.as_ref().map_or(0, |kv| kv.mod_revision));
            self.records
                .insert(k, kv.map(|kv| (kv.value, kv.mod_revision)));
        }
        Ok(())
    }

    /// Takes `key` from a batch still committing, if one writes it.
    fn take_in_flight(&mut self, key: &[u8], in_flight: &InFlight) -> bool {
        let Some((_, pending)) = in_flight.records.get(key) else {
            return false;
        };
        // Revision unknown until it commits; MAX reads as "newer than any resync".
        self.records
            .insert(key.to_vec(), pending.clone().map(|v| (v, Revision::MAX)));
        self.read_pending.insert(key.to_vec(), pending.clone());
        true
    }

    fn get(&self, key: &[u8]) -> Option<&(Vec<u8>, Revision)> {
        self.records.get(key).and_then(|r| r.as_ref())
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        // Revision MAX marks "written in this batch": newer than any resync.
        self.records
            .insert(key.clone(), Some((value.clone(), Revision::MAX)));
        self.writes.insert(key, Some(value));
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.records.insert(key.clone(), None);
        self.writes.insert(key, None);
    }

    /// Marks the cached blocks under `run` as the basis of a refusal.
    fn suspect_run(&mut self, core: &PoolState, run: Run) {
        let first = core.block_of(run.offset);
        let last = core.block_of(run.offset.saturating_add(run.units - 1));
        self.suspect.extend(first..=last);
    }

    fn claim_record(&self, offset: u64) -> Result<Option<(ClaimRecord, Revision)>> {
        match self.get(&keys::value(&self.name, offset)) {
            Some((bytes, rev)) => Ok(Some((decode_json("claim record", bytes)?, *rev))),
            None => Ok(None),
        }
    }

    /// Applies one request, answering a repeated idempotent one from its
    /// remembered answer instead.
    fn apply(
        &mut self,
        handle: &PoolHandle,
        core: &mut PoolState,
        op: &PendingOp,
        now: u64,
    ) -> Result<Outcome> {
        let Some(id) = op.request_id() else {
            return self.apply_op(handle, core, op, now);
        };
        let ikey = keys::idempotency(&self.name, id);
        let digest = op.digest();
        if let Some((bytes, _)) = self.get(&ikey) {
            let seen: Remembered = decode_json("idempotency record", bytes)?;
            if seen.digest != digest {
                return Err(Error::Conflict(format!(
                    "request id '{id}' was already used for a different request on pool '{}'",
                    self.name
                )));
            }
            return Ok(seen.outcome);
        }
        let outcome = self.apply_op(handle, core, op, now)?;
        if let Some(lease) = self.lease {
            let rec = Remembered {
                digest,
                outcome: outcome.clone(),
            };
            self.records
                .insert(ikey.clone(), Some((encode_json(&rec), Revision::MAX)));
            self.leased.insert(ikey, (encode_json(&rec), lease));
        }
        Ok(outcome)
    }

    fn apply_op(
        &mut self,
        handle: &PoolHandle,
        core: &mut PoolState,
        op: &PendingOp,
        now: u64,
    ) -> Result<Outcome> {
        let name = self.name.clone();
        let core_err = |e| Error::from_core(&name, e);
        match op {
            PendingOp::Alloc(req) => {
                let units = match req.prefix_len {
                    Some(l) => handle.space().units_for_prefix_len(l).map_err(core_err)?,
                    None => handle.space().default_units(),
                };
                let wanted = match &req.value {
                    Some(v) => {
                        let run = handle.space().parse(v).map_err(core_err)?;
                        if req.prefix_len.is_some() && run.units != units {
                            return Err(Error::InvalidInput(format!(
                                "value {v} does not have the requested prefix length /{}",
                                req.prefix_len.unwrap_or_default()
                            )));
                        }
                        Some(run)
                    }
                    None => None,
                };
                if let Some(key) = &req.key {
                    if let Some((bytes, _)) = self.get(&keys::key(&name, key)).cloned() {
                        return self.reclaim(handle, core, req, key, &bytes, wanted, units);
                    }
                }
                let runs = match wanted {
                    Some(run) => {
                        if let Err(e) = core.allocate_at(run, now) {
                            self.suspect_run(core, run);
                            return Err(core_err(e));
                        }
                        vec![run]
                    }
                    None => {
                        let got = if req.count == 1 {
                            core.allocate(units, now).map(|r| vec![r])
                        } else {
                            core.allocate_many(req.count, units, now)
                        };
                        got.map_err(|e| {
                            self.reload_all = true;
                            core_err(e)
                        })?
                    }
                };
                let mut claims = Vec::with_capacity(runs.len());
                for run in runs {
                    let rec = ClaimRecord {
                        units: run.units,
                        key: req.key.clone(),
                        owner: req.owner.clone(),
                        meta: req.meta.clone(),
                        claimed_ms: now,
                    };
                    if rec.key.is_some()
                        || rec.owner.is_some()
                        || rec.meta.is_some()
                        || handle.space().is_prefix()
                    {
                        self.put(keys::value(&name, run.offset), encode_json(&rec));
                    }
                    if let Some(key) = &req.key {
                        let kr = KeyRecord {
                            offset: run.offset,
                            units: run.units,
                        };
                        self.put(keys::key(&name, key), encode_json(&kr));
                    }
                    let value = handle.space().format(run);
                    self.allocated.push(crate::EventClaim {
                        value: value.clone(),
                        key: rec.key.clone(),
                        owner: rec.owner.clone(),
                    });
                    claims.push(claim_from(value, &rec, false));
                }
                Ok(Outcome::Claims(claims))
            }
            PendingOp::Release {
                target: Target::Key(key),
                ..
            } => {
                let Some((bytes, _)) = self.get(&keys::key(&name, key)).cloned() else {
                    return Err(Error::NotFound(format!(
                        "key '{key}' is not claimed in pool '{name}'"
                    )));
                };
                let kr: KeyRecord = decode_json("key record", &bytes)?;
                self.release_run(
                    handle,
                    core,
                    Run {
                        offset: kr.offset,
                        units: kr.units,
                    },
                    now,
                )
                .map(Outcome::Released)
            }
            PendingOp::Release {
                target: Target::Value(v),
                ..
            } => {
                let run = handle.space().parse(v).map_err(core_err)?;
                self.release_run(handle, core, run, now)
                    .map(Outcome::Released)
            }
            PendingOp::ReleaseStale { offset, rev } => match self.claim_record(*offset)? {
                Some((rec, r)) if r == *rev => self
                    .release_run(
                        handle,
                        core,
                        Run {
                            offset: *offset,
                            units: rec.units,
                        },
                        now,
                    )
                    .map(Outcome::Released)
                    // Still holding a nested pool: the sweep leaves it.
                    .or_else(|e| {
                        if matches!(e, Error::Conflict(_)) {
                            Ok(Outcome::Skipped)
                        } else {
                            Err(e)
                        }
                    }),
                _ => Ok(Outcome::Skipped),
            },
        }
    }

    /// A key that is already claimed: same value back, refreshed if needed.
    #[allow(clippy::too_many_arguments)]
    fn reclaim(
        &mut self,
        handle: &PoolHandle,
        core: &PoolState,
        req: &AllocRequest,
        key: &str,
        key_bytes: &[u8],
        wanted: Option<Run>,
        units: u64,
    ) -> Result<Outcome> {
        let name = self.name.clone();
        let kr: KeyRecord = decode_json("key record", key_bytes)?;
        let run = Run {
            offset: kr.offset,
            units: kr.units,
        };
        let current = handle.space().format(run);
        if let Some(w) = wanted {
            if w != run {
                return Err(Error::Conflict(format!(
                    "key '{key}' already holds {current} in pool '{name}', not {}",
                    handle.space().format(w)
                )));
            }
        }
        if req.prefix_len.is_some() && units != run.units {
            return Err(Error::Conflict(format!(
                "key '{key}' already holds {current}, of another prefix length"
            )));
        }
        if !core.is_allocated(run) {
            // The key record (read from the store) is the truth; the cached
            // block is behind another writer. Re-read it, but do not refuse.
            self.suspect_run(core, run);
        }
        let (mut rec, rev) = self
            .claim_record(run.offset)?
            .ok_or_else(|| Error::Corrupt(format!("key '{key}' has no claim record")))?;
        let stale = self.resyncs_loaded && is_stale(&self.resyncs, &rec, rev);
        let mut changed = stale;
        if req.owner.is_some() && req.owner != rec.owner {
            rec.owner = req.owner.clone();
            changed = true;
        }
        if req.meta.is_some() && req.meta != rec.meta {
            rec.meta = req.meta.clone();
            changed = true;
        }
        if changed {
            // Rewriting the record gives it a new revision, which clears the mark.
            self.put(keys::value(&name, run.offset), encode_json(&rec));
        }
        Ok(Outcome::Claims(vec![claim_from(current, &rec, false)]))
    }

    fn release_run(
        &mut self,
        handle: &PoolHandle,
        core: &mut PoolState,
        run: Run,
        now: u64,
    ) -> Result<Claim> {
        let name = self.name.clone();
        let text = handle.space().format(run);
        let record = self.claim_record(run.offset)?;
        let rec = match record {
            Some((rec, _)) if rec.units != run.units => {
                let held = handle.space().format(Run {
                    offset: run.offset,
                    units: rec.units,
                });
                return Err(Error::NotFound(format!(
                    "{text} is not claimed in pool '{name}' ({held} is)"
                )));
            }
            Some((rec, _)) => rec,
            None if handle.space().is_prefix() => {
                return Err(Error::NotFound(format!(
                    "{text} is not claimed in pool '{name}'"
                )));
            }
            None => ClaimRecord {
                units: 1,
                ..Default::default()
            },
        };
        if let Some((bytes, _)) = self.get(&keys::children(&name)) {
            let map: crate::Children = decode_json("children index", bytes)?;
            if let Some(set) = map.get(&run.offset).filter(|s| !s.is_empty()) {
                let names: Vec<&str> = set.iter().map(String::as_str).collect();
                return Err(Error::Conflict(format!(
                    "{text} holds nested pool(s) {}; delete them before releasing it",
                    names.join(", ")
                )));
            }
        }
        if let Err(e) = core.release(run, now) {
            self.suspect_run(core, run);
            return Err(Error::from_core(&name, e));
        }
        if let Some(k) = &rec.key {
            self.delete(keys::key(&name, k));
        }
        if self.get(&keys::value(&name, run.offset)).is_some() {
            self.delete(keys::value(&name, run.offset));
        }
        self.released.push(crate::EventClaim {
            value: text.clone(),
            key: rec.key.clone(),
            owner: rec.owner.clone(),
        });
        Ok(claim_from(text, &rec, false))
    }
}
