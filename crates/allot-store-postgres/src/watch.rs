//! Watch streams and the notification listener that wakes them.
//!
//! A watch reads the change log (`allot_log`) page by page from its
//! position, in `(revision, seq)` order. Once caught up it sleeps until the
//! store learns of a newer revision: from this process's own commits, or
//! from the listener, a dedicated connection that `LISTEN`s on the store's
//! channel, where every writing transaction (of any server) `NOTIFY`s its
//! revision when it commits. A slow poll (`poll_interval`, 1 s by default)
//! is the safety net for a notification lost while the listener
//! reconnects.
//!
//! Only keys under the recorded prefixes have log rows (`history.rs`): a
//! watch of other keys is refused at the start, and one starting before its
//! prefix was first recorded fails as compacted.
//!
//! Event numbers (`seq`) have no gaps across the store, so a page whose
//! first event is not the one after the watcher's position means history it
//! still needed was compacted: the stream then ends with
//! [`StoreError::Compacted`] rather than skip events.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::Duration;

use allot_store::{Event, EventKind, KeyValue, Prefixes, Revision, StoreError, WatchStream};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, NoTls};

use crate::error::{CallError, PgError};
use crate::history::HistoryScope;
use crate::shared::{to_i64, to_u64, Shared, Signal};

/// Log rows read per query.
const PAGE: i64 = 1024;

/// Where a watch starts: validates `from` against the retained history and
/// returns the stream.
///
/// A `lazy_own` watch is woken only by other processes' commits (and the
/// fallback poll): this process's own changes reach it with the next of
/// those, for a follower that has no use for them.
pub(crate) async fn start(
    shared: &Arc<Shared>,
    prefixes: &Prefixes,
    from: Revision,
    lazy_own: bool,
) -> Result<WatchStream, StoreError> {
    let conn = shared.conn().await?;
    let from_db = to_i64(from, "revision")?;
    let result = shared
        .timed(async {
            let stmt = conn.prepare_cached(&shared.sql.watch_start).await?;
            let row = conn.query_one(&stmt, &[&from_db]).await?;
            let current = to_u64(row.try_get(0)?, "revision")?;
            let oldest = to_u64(row.try_get(1)?, "oldest revision")?;
            let next_event: i64 = row.try_get(2)?;
            let first_seq: Option<i64> = row.try_get(3)?;
            let history = HistoryScope::from_row(&row, 4)?;
            Ok::<_, CallError>((current, oldest, next_event, first_seq, history))
        })
        .await;
    let (current, mut oldest, next_event, first_seq, history) = shared.settle(conn, result)?;
    // Only changes under recorded prefixes are in the log (`history.rs`).
    for prefix in prefixes.iter() {
        match history.complete_from(prefix) {
            Some(since) => oldest = oldest.max(since),
            None => {
                return Err(StoreError::Invalid(format!(
                    "this PostgreSQL store keeps no watch history for keys under {:?}: \
                     connect with it in PostgresOptions::history_prefixes to record it",
                    String::from_utf8_lossy(prefix)
                )))
            }
        }
    }
    let (start, next_seq) = if from == 0 {
        (current + 1, next_event)
    } else if from > current + 1 {
        return Err(StoreError::FutureRevision {
            requested: from,
            current,
        });
    } else if from < oldest {
        return Err(StoreError::Compacted {
            requested: from,
            oldest,
        });
    } else {
        (from, first_seq.unwrap_or(next_event))
    };
    let watcher = Watcher {
        shared: Arc::downgrade(shared),
        signal: shared.signal.subscribe(),
        starts: prefixes.iter().map(<[u8]>::to_vec).collect(),
        ends: prefixes.iter().map(allot_store::prefix_end).collect(),
        position: (to_i64(start, "revision")? - 1, next_seq - 1),
        seen: None,
        pending: VecDeque::new(),
        done: false,
        lazy_own,
    };
    Ok(futures::stream::unfold(watcher, |mut w| async move {
        let item = w.next_item().await?;
        Some((item, w))
    })
    .boxed())
}

struct Watcher {
    /// Weak: an open watch must not keep a dropped store's pool alive.
    shared: Weak<Shared>,
    signal: watch::Receiver<Signal>,
    /// The watched key ranges `[start, end)` (`end` empty: unbounded).
    starts: Vec<Vec<u8>>,
    ends: Vec<Vec<u8>>,
    /// `(revision, seq)` of the last log row read (delivered or not).
    position: (i64, i64),
    /// Set when caught up: every revision up to this one has been read, as
    /// of this listener epoch.
    seen: Option<(Revision, u64)>,
    pending: VecDeque<Event>,
    done: bool,
    /// Woken by other processes' commits only (see [`start`]).
    lazy_own: bool,
}

/// One page of the log, decoded.
struct Page {
    current: Revision,
    oldest: Revision,
    next_event: i64,
    /// `(revision, seq, event if watched)` per row.
    rows: Vec<(i64, i64, Option<Event>)>,
}

impl Watcher {
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
            if let Some(seen) = self.seen {
                if let Err(err) = self.wait_for_news(seen).await {
                    return self.fail(err);
                }
            }
            let (page, epoch) = match self.fetch().await {
                Ok(fetched) => fetched,
                Err(err) => return self.fail(err),
            };
            if let Err(err) = self.accept(page, epoch) {
                return self.fail(err);
            }
        }
    }

    /// Sleeps until a revision after `seen` is known to be committed, the
    /// listener's connection went down or came back, the fallback poll
    /// interval passes, or the store is dropped.
    async fn wait_for_news(&mut self, (seen, epoch): (Revision, u64)) -> Result<(), StoreError> {
        let poll = match self.shared.upgrade() {
            Some(shared) => shared.limits.poll_interval,
            None => return Err(closed()),
        };
        let lazy = self.lazy_own;
        let news = |s: &Signal| {
            s.closed
                || s.epoch != epoch
                || if lazy {
                    s.foreign > seen
                } else {
                    s.revision > seen
                }
        };
        let waited = tokio::time::timeout(poll, self.signal.wait_for(news)).await;
        match waited {
            Ok(Ok(signal)) if signal.closed => Err(closed()),
            Ok(Ok(_)) | Err(_) => Ok(()),
            Ok(Err(_)) => Err(closed()),
        }
    }

    /// Reads the next page of the log; also returns the listener epoch as
    /// of just before the read.
    async fn fetch(&self) -> Result<(Page, u64), StoreError> {
        let shared = self.shared.upgrade().ok_or_else(closed)?;
        let Signal {
            closed: is_closed,
            epoch,
            ..
        } = *self.signal.borrow();
        if is_closed {
            return Err(closed());
        }
        let conn = shared.conn().await?;
        let result = shared
            .timed(async {
                let stmt = conn.prepare_cached(&shared.sql.watch_page).await?;
                let rows = conn
                    .query(
                        &stmt,
                        &[
                            &self.position.0,
                            &self.position.1,
                            &self.starts,
                            &self.ends,
                            &PAGE,
                        ],
                    )
                    .await?;
                decode_page(&rows)
            })
            .await;
        Ok((shared.settle(conn, result)?, epoch))
    }

    fn accept(&mut self, page: Page, epoch: u64) -> Result<(), StoreError> {
        let expected = self.position.1 + 1;
        let first = page.rows.first().map_or(page.next_event, |r| r.1);
        if first != expected {
            // Events between our position and the first one retained were
            // compacted away.
            return Err(StoreError::Compacted {
                requested: u64::try_from(self.position.0 + 1).unwrap_or(1),
                oldest: page.oldest,
            });
        }
        let full = page.rows.len() as i64 >= PAGE;
        for (revision, seq, event) in page.rows {
            self.position = (revision, seq);
            self.pending.extend(event);
        }
        // A short page read everything committed as of its snapshot.
        self.seen = (!full).then_some((page.current, epoch));
        Ok(())
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("store closed".into())
}

fn decode_page(rows: &[tokio_postgres::Row]) -> Result<Page, CallError> {
    let Some(head) = rows.first() else {
        return Err(PgError::Corrupt("the revision row is missing".into()).into());
    };
    let mut page = Page {
        current: to_u64(head.try_get(0)?, "revision")?,
        oldest: to_u64(head.try_get(1)?, "oldest revision")?,
        next_event: head.try_get(2)?,
        rows: Vec::with_capacity(rows.len()),
    };
    for row in rows {
        // No log row after the position: one row of NULLs from the join.
        let Some(revision) = row.try_get::<_, Option<i64>>(3)? else {
            continue;
        };
        let seq: i64 = row.try_get(4)?;
        let hit: bool = row.try_get(5)?;
        let event = if hit {
            let kind: i16 = row.try_get(7)?;
            Some(Event {
                kind: match kind {
                    0 => EventKind::Put,
                    1 => EventKind::Delete,
                    other => {
                        return Err(PgError::Corrupt(format!(
                            "unknown event kind {other} at revision {revision}"
                        ))
                        .into())
                    }
                },
                kv: KeyValue {
                    key: row.try_get(6)?,
                    value: row.try_get(8)?,
                    create_revision: to_u64(row.try_get(9)?, "create revision")?,
                    mod_revision: to_u64(revision, "revision")?,
                    version: to_u64(row.try_get(10)?, "version")?,
                    lease: to_u64(row.try_get(11)?, "lease")?,
                },
            })
        } else {
            None
        };
        page.rows.push((revision, seq, event));
    }
    Ok(page)
}

// ---------------------------------------------------------------- listener

/// The listener task: keeps one connection `LISTEN`ing on the store's
/// channel and publishes every notified revision to the watchers,
/// reconnecting (with a growing pause, at most 1 s) whenever the connection
/// is lost. It runs until the store is dropped, which aborts it.
pub(crate) async fn run_listener(shared: Arc<Shared>, config: tokio_postgres::Config) {
    let mut pause = Duration::from_millis(50);
    loop {
        match listen_once(&shared, &config).await {
            // It was up: retry quickly.
            Ok(()) => pause = Duration::from_millis(50),
            Err(err) => {
                tracing::debug!(err = %StoreError::from(err), "watch listener disconnected");
            }
        }
        // Notifications may be missed from now on: idle watchers look for
        // themselves (and learn of an outage).
        shared.bump_epoch();
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One connection's life: connect, `LISTEN`, publish the current revision
/// (notifications sent while we were away are lost; the revision covers
/// them), then publish notifications until the connection ends.
async fn listen_once(shared: &Shared, config: &tokio_postgres::Config) -> Result<(), PgError> {
    let timeout = shared.limits.timeout;
    let (client, mut connection) = tokio::time::timeout(timeout, config.connect(NoTls))
        .await
        .map_err(|_| PgError::Timeout(timeout))??;
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    // The connection only makes progress while polled; notifications come
    // out of `poll_message`.
    let _driver = AbortOnDrop(tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(%err, "watch listener connection failed");
                    return;
                }
            }
        }
    }));
    let current = tokio::time::timeout(timeout, async {
        client
            .batch_execute(&format!("LISTEN {}", shared.sql.channel))
            .await?;
        let row = client.query_one(&shared.sql.current_revision, &[]).await?;
        Ok::<i64, PgError>(row.try_get(0)?)
    })
    .await
    .map_err(|_| PgError::Timeout(timeout))??;
    shared.publish_notified(to_u64(current, "revision")?);
    // Back (or up for the first time): idle watchers catch up on what was
    // missed while down.
    shared.bump_epoch();
    while let Some(payload) = rx.recv().await {
        match payload.parse::<Revision>() {
            Ok(revision) => shared.publish_notified(revision),
            Err(_) => tracing::warn!(payload, "unexpected notification payload"),
        }
    }
    // `client` lives until here, keeping the connection open.
    drop(client);
    Ok(())
}
