//! The watch stream shared by every backend.
//!
//! Each backend keeps a log of committed revisions (its history) and
//! broadcasts every revision it commits. A watcher subscribes to the
//! broadcast *before* reading the current revision, replays the log up to
//! that revision, then forwards live revisions, skipping any it already
//! replayed. If it falls behind the broadcast (the channel is bounded), it
//! replays the missing revisions from the log again, so a slow consumer costs
//! reads, not memory, and never sees a gap.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};

use futures::StreamExt;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use crate::{Event, Prefixes, Revision, StoreError, WatchStream};

/// The most revisions a watcher reads from the log at a time...
const REPLAY_REVISIONS: usize = 512;
/// ...and the number of events after which a read stops at the end of the
/// revision, so that replaying a history of huge transactions does not load
/// all of it at once (a single revision is always read whole).
const REPLAY_EVENTS: usize = 65_536;

/// Revisions of history kept by default.
pub(crate) const DEFAULT_HISTORY_REVISIONS: u64 = 100_000;
/// Events of history kept at most by default.
pub(crate) const DEFAULT_HISTORY_EVENTS: u64 = 1_000_000;

/// How much history a backend retains for watches to replay: two bounds,
/// enforced by compacting whole revisions from the oldest one forward after
/// each committed revision.
///
/// - `revisions`: the latest this many revisions are kept, unless the event
///   bound needs them gone (the redb backend lets up to a chunk more pile up
///   before dropping them, see its committer).
/// - `events`: at most this many events are kept, with one exception: the
///   newest revision is never dropped, so a transaction is always watchable
///   from its own revision even if it alone writes more events than the
///   bound (history then holds just that revision). Once the bound is
///   exceeded, revisions are dropped until at most
///   [`Retention::events_low_water`] events remain, so that compaction runs
///   about once per tenth of the bound written rather than on every commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retention {
    pub revisions: u64,
    pub events: u64,
}

impl Retention {
    /// Both bounds, at least 1.
    pub fn new(revisions: u64, events: u64) -> Self {
        Self {
            revisions: revisions.max(1),
            events: events.max(1),
        }
    }

    /// How many events at most remain after the event bound triggered a
    /// compaction (nine tenths of the bound).
    pub fn events_low_water(&self) -> u64 {
        self.events - self.events / 10
    }

    /// The oldest revision to keep for the event bound, if it asks to drop
    /// any, given the number of retained events and the event counts of the
    /// retained revisions from the oldest one on: `(revision, count)`
    /// entries in revision order, where consecutive entries of one revision
    /// add up (a backend may count a revision in pieces). Reads entries only
    /// as far as it drops revisions (and one beyond), and never drops
    /// `newest`.
    pub fn events_oldest(
        &self,
        retained: u64,
        newest: Revision,
        counts: impl IntoIterator<Item = Result<(Revision, u64), StoreError>>,
    ) -> Result<Option<Revision>, StoreError> {
        if retained <= self.events {
            return Ok(None);
        }
        let low = self.events_low_water();
        let mut kept = retained;
        let mut oldest = None;
        // The revision being counted, dropped once all of it was seen.
        let mut current: Option<(Revision, u64)> = None;
        let mut counts = counts.into_iter();
        loop {
            let next = counts.next().transpose()?.filter(|&(r, _)| r < newest);
            match (current, next) {
                (Some((r, n)), Some((r2, m))) if r == r2 => {
                    current = Some((r, n + m));
                    continue;
                }
                (Some((r, n)), _) => {
                    kept = kept.saturating_sub(n);
                    oldest = Some(r + 1);
                }
                (None, _) => {}
            }
            match next {
                Some(entry) if kept > low => current = Some(entry),
                _ => break,
            }
        }
        Ok(oldest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oldest(
        retention: Retention,
        newest: Revision,
        counts: &[(Revision, u64)],
    ) -> Option<Revision> {
        let retained = counts.iter().map(|c| c.1).sum();
        let entries = counts.iter().map(|&c| Ok(c));
        retention.events_oldest(retained, newest, entries).unwrap()
    }

    #[test]
    fn event_bound_drops_whole_revisions_down_to_the_low_water_mark() {
        let r = Retention::new(1000, 100);
        assert_eq!(r.events_low_water(), 90);
        // Within the bound: nothing.
        assert_eq!(oldest(r, 11, &[(2, 50), (11, 50)]), None);
        // 105: revisions go until at most 90 remain.
        assert_eq!(
            oldest(r, 12, &[(2, 10), (3, 10), (4, 80), (12, 5)]),
            Some(4)
        );
        // A revision counted in pieces is dropped whole.
        assert_eq!(
            oldest(r, 12, &[(2, 5), (2, 5), (3, 10), (3, 5), (4, 80)]),
            Some(4)
        );
        assert_eq!(oldest(r, 12, &[(2, 5), (2, 15), (4, 80), (12, 5)]), Some(3));
        // The newest revision is never dropped, however big.
        assert_eq!(oldest(r, 3, &[(2, 1), (3, 250)]), Some(3));
        assert_eq!(oldest(r, 3, &[(3, 250)]), None);
        assert_eq!(
            oldest(r, 5, &[(2, 50), (3, 50), (4, 50), (5, 500)]),
            Some(5)
        );
    }
}

/// Capacity of a backend's broadcast channel, in revisions.
pub(crate) const BROADCAST_CAPACITY: usize = 4096;

/// The events of one committed revision.
#[derive(Debug)]
pub(crate) struct Committed {
    pub revision: Revision,
    pub events: Vec<Event>,
}

/// A backend's log of committed revisions.
pub(crate) trait History: Send + Sync + 'static {
    /// `(oldest retained revision, current revision)`.
    fn bounds(&self) -> Result<(Revision, Revision), StoreError>;
    /// Committed revisions in `[from, to]`, in order: at most `max`, and no
    /// more once they hold `max_events` events (but at least one); fails
    /// with [`StoreError::Compacted`] if `from` is older than the retained
    /// log.
    fn read(
        &self,
        from: Revision,
        to: Revision,
        max: usize,
        max_events: usize,
    ) -> Result<Vec<Arc<Committed>>, StoreError>;
}

/// An entry of an in-memory ring of retained history.
pub(crate) trait Retained: Clone {
    fn revision(&self) -> Revision;
    fn event_count(&self) -> usize;
}

impl Retained for Arc<Committed> {
    fn revision(&self) -> Revision {
        self.revision
    }

    fn event_count(&self) -> usize {
        self.events.len()
    }
}

/// The entries [`History::read`] asks for, from an in-memory ring of
/// retained revisions (oldest first) whose history starts at `oldest`.
pub(crate) fn read_ring<T: Retained>(
    ring: &VecDeque<T>,
    oldest: Revision,
    from: Revision,
    to: Revision,
    max: usize,
    max_events: usize,
) -> Result<Vec<T>, StoreError> {
    if from < oldest {
        return Err(StoreError::Compacted {
            requested: from,
            oldest,
        });
    }
    let mut out = Vec::new();
    let mut events = 0;
    let first = ring.partition_point(|c| c.revision() < from);
    for entry in ring.range(first..) {
        if entry.revision() > to || out.len() >= max || (!out.is_empty() && events >= max_events) {
            break;
        }
        events += entry.event_count();
        out.push(entry.clone());
    }
    Ok(out)
}

/// [`crate::Store::watch`] for a backend that broadcasts on `events` after
/// each commit.
pub(crate) fn subscribe_and_watch<H: History>(
    source: &Arc<H>,
    events: &broadcast::Sender<Arc<Committed>>,
    prefixes: &Prefixes,
    from: Revision,
) -> Result<WatchStream, StoreError> {
    // Subscribe before reading the current revision: a revision committed
    // in between is then both in the log and in the channel, and the
    // stream skips the duplicate; the other order could lose it.
    let rx = events.subscribe();
    let (oldest, current) = source.bounds()?;
    let start = start_revision(from, oldest, current)?;
    Ok(watch_stream(
        Arc::downgrade(source),
        rx,
        prefixes,
        start,
        current,
    ))
}

/// Checks `from` against the history bounds and returns the first revision
/// to deliver.
pub(crate) fn start_revision(
    from: Revision,
    oldest: Revision,
    current: Revision,
) -> Result<Revision, StoreError> {
    if from == 0 {
        return Ok(current + 1);
    }
    if from > current + 1 {
        return Err(StoreError::FutureRevision {
            requested: from,
            current,
        });
    }
    if from < oldest {
        return Err(StoreError::Compacted {
            requested: from,
            oldest,
        });
    }
    Ok(from)
}

/// Builds a watch stream. `rx` must have been subscribed before `current`
/// was read, so that no revision after `current` can be missed.
pub(crate) fn watch_stream<H: History>(
    source: Weak<H>,
    rx: broadcast::Receiver<Arc<Committed>>,
    prefixes: &Prefixes,
    start: Revision,
    current: Revision,
) -> WatchStream {
    let state = Watcher {
        source,
        rx,
        prefixes: prefixes.clone(),
        next: start,
        replay_to: current,
        pending: VecDeque::new(),
        done: false,
    };
    futures::stream::unfold(state, |mut w| async move {
        let item = w.next_item().await?;
        Some((item, w))
    })
    .boxed()
}

struct Watcher<H> {
    /// Weak so that an open watch does not keep a closed store alive.
    source: Weak<H>,
    rx: broadcast::Receiver<Arc<Committed>>,
    prefixes: Prefixes,
    /// The next revision to deliver.
    next: Revision,
    /// Revisions up to this one are read from the log, not the broadcast.
    replay_to: Revision,
    pending: VecDeque<Event>,
    done: bool,
}

impl<H: History> Watcher<H> {
    fn source(&self) -> Result<Arc<H>, StoreError> {
        self.source
            .upgrade()
            .ok_or_else(|| StoreError::Unavailable("store closed".into()))
    }

    fn accept(&mut self, committed: &Committed) {
        let prefixes = &self.prefixes;
        self.pending.extend(
            committed
                .events
                .iter()
                .filter(|e| prefixes.matches(&e.kv.key))
                .cloned(),
        );
        self.next = committed.revision + 1;
    }

    fn fail(&mut self, err: StoreError) -> Option<Result<Event, StoreError>> {
        self.done = true;
        self.pending.clear();
        Some(Err(err))
    }

    async fn next_item(&mut self) -> Option<Result<Event, StoreError>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            if self.next <= self.replay_to {
                let chunk = match self.source().and_then(|s| {
                    s.read(self.next, self.replay_to, REPLAY_REVISIONS, REPLAY_EVENTS)
                }) {
                    Ok(chunk) => chunk,
                    Err(err) => return self.fail(err),
                };
                if chunk.is_empty() {
                    // Only the initial revision of an empty store has no
                    // entry: nothing was written at it.
                    self.next = self.replay_to + 1;
                }
                for committed in chunk {
                    if committed.revision >= self.next {
                        self.accept(&committed);
                    }
                }
                continue;
            }
            match self.rx.recv().await {
                Ok(committed) if committed.revision < self.next => {}
                Ok(committed) if committed.revision == self.next => self.accept(&committed),
                Ok(committed) => {
                    // A revision went by unseen; the log has it, since a
                    // revision is only broadcast once committed.
                    self.replay_to = committed.revision;
                }
                Err(RecvError::Lagged(_)) => match self.source().and_then(|s| s.bounds()) {
                    Ok((_, current)) => self.replay_to = current,
                    Err(err) => return self.fail(err),
                },
                Err(RecvError::Closed) => {
                    return self.fail(StoreError::Unavailable("store closed".into()));
                }
            }
        }
    }
}
