//! The history bounds: which revision etcd should be compacted to.
//!
//! etcd keeps every revision until it is compacted. Like the other backends,
//! this one keeps the latest `history_revisions` revisions and at most
//! `history_events` events, compacting after the write that crossed a bound
//! (before that write is acknowledged, so a caller sees the bound applied).
//!
//! The revision bound is exact: it only needs the revision of the write.
//! The event bound needs the number of events of each retained revision,
//! which etcd does not report; it is counted from this process's own writes
//! (each transaction's response tells how many keys it put and deleted).
//! Writes by other processes, and deletions etcd makes itself when a lease
//! expires, are not counted, so with several servers on one etcd each one
//! bounds its own share of the history. Revisions written before this
//! process connected count towards the revision bound only.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use allot_store::Revision;

/// The bounds and what is known of the retained history.
pub(crate) struct History {
    keep_revisions: u64,
    /// Compaction by the revision bound waits until this many revisions are
    /// due, so that a busy store does not compact on every write.
    revision_slack: u64,
    keep_events: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The oldest revision known to be retained (etcd's compaction point as
    /// far as this process knows; 1 = nothing compacted).
    oldest: Revision,
    /// `(revision, events)` of this process's writes at or after `oldest`,
    /// in revision order.
    writes: VecDeque<(Revision, u64)>,
    /// The sum of the events in `writes`.
    events: u64,
}

impl State {
    /// Forgets the writes before `revision`.
    fn drop_before(&mut self, revision: Revision) {
        while let Some(&(rev, n)) = self.writes.front() {
            if rev >= revision {
                break;
            }
            self.events -= n;
            self.writes.pop_front();
        }
    }
}

impl History {
    pub(crate) fn new(keep_revisions: u64, keep_events: u64) -> Self {
        let keep_revisions = keep_revisions.max(1);
        Self {
            keep_revisions,
            revision_slack: (keep_revisions / 10).clamp(1, 1000),
            keep_events: keep_events.max(1),
            state: Mutex::new(State {
                oldest: 1,
                ..State::default()
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is a cache of counts: a panic elsewhere cannot leave it
        // inconsistent in a way that matters more than losing it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a write of `events` events at `revision` and returns the
    /// revision to compact to, if a bound is now exceeded.
    pub(crate) fn record(&self, revision: Revision, events: u64) -> Option<Revision> {
        let mut state = self.state();
        if revision < state.oldest || events == 0 {
            return None;
        }
        // Concurrent writers may record out of order.
        let at = state.writes.partition_point(|&(rev, _)| rev < revision);
        state.writes.insert(at, (revision, events));
        state.events += events;

        let mut target = state.oldest;
        // The revision bound: keep `revision + 1 - keep_revisions` and newer.
        let keep_from = (revision + 1).saturating_sub(self.keep_revisions);
        if keep_from >= state.oldest + self.revision_slack {
            target = keep_from;
            state.drop_before(target);
        }
        // The event bound: whole revisions, oldest first, down to nine
        // tenths; never the newest.
        if state.events > self.keep_events {
            let low_water = self.keep_events - self.keep_events.div_ceil(10);
            while state.events > low_water && state.writes.len() > 1 {
                if let Some((_, n)) = state.writes.pop_front() {
                    state.events -= n;
                }
            }
            if let Some(&(rev, _)) = state.writes.front() {
                target = target.max(rev);
            }
        }
        if target > state.oldest {
            state.oldest = target;
            Some(target)
        } else {
            None
        }
    }

    /// Notes that etcd was compacted to `revision` (by any caller).
    pub(crate) fn compacted(&self, revision: Revision) {
        let mut state = self.state();
        if revision > state.oldest {
            state.oldest = revision;
            state.drop_before(revision);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_bound_compacts_in_chunks() {
        let h = History::new(10, 1_000_000);
        let mut targets = Vec::new();
        for rev in 2..=41 {
            targets.extend(h.record(rev, 1));
        }
        // Slack 1: every write past the bound compacts.
        assert_eq!(targets.first(), Some(&2));
        assert_eq!(targets.last(), Some(&32));
    }

    #[test]
    fn event_bound_drops_whole_revisions_to_nine_tenths() {
        let h = History::new(1000, 100);
        for rev in 2..=11 {
            assert_eq!(h.record(rev, 10), None);
        }
        assert_eq!(h.record(12, 5), Some(4));
        h.compacted(6);
        for rev in 13..=15 {
            assert_eq!(h.record(rev, 10), None);
        }
        assert_eq!(h.record(16, 10), Some(8));
        // One huge revision alone stays.
        let h = History::new(1000, 100);
        h.record(2, 1);
        h.record(3, 1);
        assert_eq!(h.record(4, 1001), Some(4));
        assert_eq!(h.record(5, 1), Some(5));
    }
}
