//! Turns: engines that share a store take turns on a pool whose batches keep
//! colliding.
//!
//! Two engines writing one pool (two `allot serve` on one PostgreSQL) race
//! on its blocks: every batch compares the blocks it was built on, so one
//! engine's batch fails whenever the other committed in between. An engine
//! that keeps its pipeline full commits more often than the other can re-read,
//! rebuild and commit, so the other kept losing until its requests gave up
//! with `Contention` (on PostgreSQL, 1 client per engine: 1,406 claims/s
//! against 38, and refused requests at every load).
//!
//! The remedy is cooperative and serves liveness only: every write stays
//! guarded by its compares, so an engine that does not take part (or a
//! request seen late) costs a failed batch, never a wrong answer.
//! - An engine whose batch lost a compare twice in a row asks for the turn:
//!   it writes `t/{pool}` = its id, if the record is absent (or stale).
//! - Engines that follow the store's writes (every engine on a shared
//!   store, [`crate::Allot::follow_other_writers`]) see the request and
//!   build no new batch of the pool until it is withdrawn, and for at most
//!   [`TURN_WAIT`] after they saw it (a holder that died does not stop the
//!   pool for long).
//! - The holder withdraws it after [`TURN_SLICE`], or earlier once nothing
//!   is queued, building or committing and it held it [`TURN_MIN`]; its own
//!   retries meanwhile back off only briefly. An engine that was held up
//!   with requests queued asks for the next turn when it is withdrawn, so
//!   two busy engines alternate instead of one starving.
//! - A request nobody withdrew (its server stopped) is found by the next
//!   ask's failure branch, waited on once, then replaced.
//!
//! Time here is tokio's monotonic clock, each engine judging by its own: no
//! clocks are compared across processes.

use std::sync::Arc;

use allot_store::{Compare, Event as StoreEvent, EventKind, Op, OpResult, Revision, Txn};
use tokio::time::{Duration, Instant};

use crate::batch::PoolHandle;
use crate::{keys, lock, Inner};

/// Consecutive lost compares after which a batch's engine asks for the turn.
pub(crate) const TURN_AFTER: u32 = 2;
/// How long a turn is held at most.
const TURN_SLICE: Duration = Duration::from_millis(10);
/// How long a turn is held at least before it is withdrawn for want of work.
const TURN_MIN: Duration = Duration::from_millis(2);
/// How often a holder checks whether its pool ran out of work.
const TURN_POLL: Duration = Duration::from_millis(1);
/// How long another engine's request holds this one up at most.
const TURN_WAIT: Duration = Duration::from_millis(50);

/// One pool's turn, as this engine knows it.
#[derive(Debug, Default)]
pub(crate) struct Turn {
    /// Another engine's request: when this engine saw it, and its revision.
    other: Option<(Instant, Revision)>,
    /// This engine's request: when it was granted, and its revision.
    mine: Option<(Instant, Revision)>,
    /// A request of this engine is being written.
    asking: bool,
}

impl Turn {
    /// How much longer another engine's request holds this one up.
    fn hold_up(&self, now: Instant) -> Option<Duration> {
        let (seen, _) = self.other?;
        TURN_WAIT
            .checked_sub(now.duration_since(seen))
            .filter(|d| !d.is_zero())
    }
}

/// The value of a turn request: the asking engine's id.
fn encode(engine: u64) -> Vec<u8> {
    engine.to_le_bytes().to_vec()
}

fn decode(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

impl Inner {
    /// Waits while another engine holds the pool's turn. An engine held up
    /// with work queued asks for the next turn once it is let go.
    pub(crate) async fn wait_turn(self: &Arc<Self>, name: &str, handle: &Arc<PoolHandle>) {
        let mut waited = false;
        loop {
            let changed = handle.turn_changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so a change in between wakes us.
            changed.as_mut().enable();
            let Some(wait) = lock(&handle.turn).hold_up(Instant::now()) else {
                break;
            };
            waited = true;
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        if waited {
            self.ask_turn(name, handle);
        }
    }

    /// Asks for the pool's turn, in the background, unless this engine holds
    /// or is asking for it, another engine's request is still in force, or
    /// this engine does not follow the store (it would not see the others'
    /// requests, and alone on a store it never needs a turn).
    pub(crate) fn ask_turn(self: &Arc<Self>, name: &str, handle: &Arc<PoolHandle>) {
        if lock(&self.follower_stop).is_none() {
            return;
        }
        let key = keys::turn(name);
        let (guard, replaces) = {
            let mut turn = lock(&handle.turn);
            if turn.mine.is_some() || turn.asking {
                return;
            }
            if turn.hold_up(Instant::now()).is_some() {
                return;
            }
            turn.asking = true;
            // A request that outlived its wait is replaced, not waited on.
            match turn.other {
                Some((_, rev)) => (Compare::mod_revision(&key, rev), rev),
                None => (Compare::absent(&key), 0),
            }
        };
        // On failure, read what stands in the way: a request this engine
        // never saw come (left by a server that stopped, or written before
        // this engine followed) is then waited on once and replaced.
        let txn = Txn::new()
            .when(guard)
            .then(Op::put(&key, encode(self.engine_id)))
            .otherwise(Op::get(&key));
        let (inner, handle) = (self.clone(), handle.clone());
        tokio::spawn(async move {
            let resp = inner.store.txn(txn).await;
            let granted = {
                let mut turn = lock(&handle.turn);
                turn.asking = false;
                match resp {
                    Ok(r) if r.succeeded => {
                        turn.mine = Some((Instant::now(), r.revision));
                        // What we replaced, not a newer request seen since.
                        if turn.other.is_some_and(|(_, rev)| rev <= replaces) {
                            turn.other = None;
                        }
                        Some(r.revision)
                    }
                    Ok(r) => {
                        let standing = r.results.first().and_then(|g| match g {
                            OpResult::Get(Some(kv)) => Some(kv.mod_revision),
                            _ => None,
                        });
                        if let Some(rev) = standing {
                            if turn.other.is_none_or(|(_, seen)| seen < rev) {
                                turn.other = Some((Instant::now(), rev));
                            }
                        }
                        None
                    }
                    // The store failed: the batches' own retries go on.
                    Err(_) => None,
                }
            };
            handle.turn_changed.notify_waiters();
            if let Some(rev) = granted {
                inner.hold_turn(&key, &handle, rev).await;
            }
        });
    }

    /// Holds a granted turn: for [`TURN_MIN`], then until the pool is idle
    /// (nothing queued, building or committing) or [`TURN_SLICE`] is over,
    /// then withdraws it. The task holds the engine, so [`crate::Allot::close`]
    /// waits for the withdrawal.
    async fn hold_turn(self: &Arc<Self>, key: &[u8], handle: &PoolHandle, rev: Revision) {
        let granted = Instant::now();
        tokio::time::sleep(TURN_MIN).await;
        loop {
            let still_mine = lock(&handle.turn).mine.is_some_and(|(_, r)| r == rev);
            if !still_mine {
                return; // replaced as stale by another engine
            }
            if handle.is_idle() || granted.elapsed() >= TURN_SLICE {
                break;
            }
            tokio::time::sleep(TURN_POLL).await;
        }
        lock(&handle.turn).mine = None;
        // Only our own request: one that replaced it stays.
        let txn = Txn::new()
            .when(Compare::mod_revision(key, rev))
            .then(Op::delete(key));
        if let Err(e) = self.store.txn(txn).await {
            // Others wait at most TURN_WAIT for it, then replace it.
            tracing::debug!("withdrawing a turn request: {e}");
        }
    }

    /// Takes note of a turn request written or withdrawn (the follower
    /// task's part).
    pub(crate) fn note_turn(&self, pool: &str, event: &StoreEvent) {
        let Some(handle) = lock(&self.pools).get(pool).cloned() else {
            return;
        };
        {
            let mut turn = lock(&handle.turn);
            match event.kind {
                EventKind::Put if decode(&event.kv.value) == Some(self.engine_id) => return,
                EventKind::Put => {
                    turn.other = Some((Instant::now(), event.kv.mod_revision));
                    // Ours was replaced as stale: we no longer hold it.
                    turn.mine = None;
                }
                EventKind::Delete => {
                    turn.other = None;
                }
            }
        }
        handle.turn_changed.notify_waiters();
    }
}

impl PoolHandle {
    /// Whether this engine holds the pool's turn (its retries need little
    /// backoff: the others hold off).
    pub(crate) fn holds_turn(&self) -> bool {
        lock(&self.turn).mine.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_holds_up_for_turn_wait_after_it_was_seen() {
        let now = Instant::now();
        let mut turn = Turn::default();
        assert_eq!(turn.hold_up(now), None);
        turn.other = Some((now, 7));
        assert_eq!(turn.hold_up(now), Some(TURN_WAIT));
        assert_eq!(
            turn.hold_up(now + Duration::from_millis(20)),
            Some(TURN_WAIT - Duration::from_millis(20))
        );
        assert_eq!(turn.hold_up(now + TURN_WAIT), None);
    }

    #[test]
    fn requests_name_their_engine() {
        assert_eq!(decode(&encode(42)), Some(42));
        assert_eq!(decode(b"short"), None);
    }
}
