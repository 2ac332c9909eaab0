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

use crate::{Event, Revision, StoreError, WatchStream};

/// How many revisions a watcher reads from the log at a time.
const REPLAY_CHUNK: usize = 512;

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
    /// Up to `max` committed revisions in `[from, to]`, in order; fails with
    /// [`StoreError::Compacted`] if `from` is older than the retained log.
    fn read(
        &self,
        from: Revision,
        to: Revision,
        max: usize,
    ) -> Result<Vec<Arc<Committed>>, StoreError>;
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
    prefix: &[u8],
    start: Revision,
    current: Revision,
) -> WatchStream {
    let state = Watcher {
        source,
        rx,
        prefix: prefix.to_vec(),
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
    prefix: Vec<u8>,
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
        let prefix = &self.prefix;
        self.pending.extend(
            committed
                .events
                .iter()
                .filter(|e| e.kv.key.starts_with(prefix))
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
                let chunk = match self
                    .source()
                    .and_then(|s| s.read(self.next, self.replay_to, REPLAY_CHUNK))
                {
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
