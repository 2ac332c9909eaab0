//! Watches: one etcd watch per store watch. A watch of several prefixes is
//! one etcd watch of the smallest range holding them all, filtered here:
//! etcd orders events within a watch only, so two watches could not be
//! merged in revision order.
//!
//! etcd replays history from a start revision and then follows live
//! changes, with no gap, which is the store's watch contract. What is added
//! here: the bounds the contract puts on `from` (a future revision is an
//! error; a compacted one is [`StoreError::Compacted`] *from the call*,
//! where etcd would only cancel the watch a little later), the namespace,
//! and the end of every stream when the store is dropped.

use std::collections::VecDeque;

use allot_store::{Event, EventKind, KeyValue, Prefixes, Revision, StoreError, WatchStream};
use etcd_client::{EventType, GetOptions, WatchOptions};
use futures::StreamExt;

use crate::error::EtcdError;
use crate::{to_u64, Inner, Namespace};

/// Starts a watch of the keys under `prefixes` from revision `from` (0 = from
/// now); returns once etcd has registered it, so that every change after
/// the call is streamed.
pub(crate) async fn start(
    inner: &Inner,
    prefixes: &Prefixes,
    from: Revision,
) -> Result<WatchStream, StoreError> {
    let ns = &inner.ns;
    let (start_key, end_key) = prefixes.covering();
    let mut options = WatchOptions::new().with_range(ns.range_end(&end_key));
    let mut compacted = false;
    if from > 0 {
        let current = inner.current_revision().await?;
        if from > current + 1 {
            return Err(StoreError::FutureRevision {
                requested: from,
                current,
            });
        }
        let start = i64::try_from(from).unwrap_or(i64::MAX);
        // The store's oldest retained revision is etcd's compaction
        // revision plus one (see `Inner::compact_to`), so `from` is
        // compacted exactly when a read at `from - 1` is refused. (From 1,
        // the probe reads at 1: revision 1 of an etcd holds no event, so
        // "compacted to 1" loses nothing.)
        if from <= current {
            let probe = GetOptions::new()
                .with_revision((start - 1).max(1))
                .with_count_only();
            match inner
                .timed(inner.kv().get(ns.range_start(b""), Some(probe)))
                .await
            {
                Ok(_) => {}
                Err(e) if e.is_compacted() => compacted = true,
                Err(e) => return Err(e.into()),
            }
        }
        // A watch from 1 surely starts before etcd's compaction revision,
        // so etcd cancels it at once, telling that revision.
        options = options.with_start_revision(if compacted { 1 } else { start });
    }
    let mut client = inner.client.watch_client();
    let mut stream = inner
        .timed(client.watch(ns.range_start(&start_key), Some(options)))
        .await?;
    // etcd first confirms the watch; only then is "from now" fixed.
    match inner.timed(stream.message()).await? {
        Some(resp) if resp.created() && !resp.canceled() => {}
        Some(resp) => {
            return Err(StoreError::Backend(format!(
                "etcd did not create the watch: {}",
                resp.cancel_reason()
            )))
        }
        None => return Err(StoreError::Unavailable("etcd closed the watch".into())),
    }
    if compacted {
        // etcd cancels a watch from a compacted revision, telling its
        // compaction revision: one below the oldest revision retained.
        loop {
            match inner.timed(stream.message()).await? {
                Some(resp) if resp.compact_revision() > 0 => {
                    return Err(StoreError::Compacted {
                        requested: from,
                        oldest: to_u64(resp.compact_revision()) + 1,
                    })
                }
                Some(resp) if resp.canceled() => {
                    return Err(StoreError::Backend(format!(
                        "etcd canceled the watch: {}",
                        resp.cancel_reason()
                    )))
                }
                Some(_) => {}
                None => return Err(StoreError::Unavailable("etcd closed the watch".into())),
            }
        }
    }
    let state = State {
        stream,
        closed: inner.closed.subscribe(),
        ns: ns.clone(),
        prefixes: prefixes.clone(),
        pending: VecDeque::new(),
        next: from,
        done: false,
    };
    Ok(futures::stream::unfold(state, next).boxed())
}

struct State {
    stream: etcd_client::WatchStream,
    /// Fires (with an error) when the store is dropped.
    closed: tokio::sync::watch::Receiver<()>,
    ns: Namespace,
    /// What the caller watches (the etcd range may hold more).
    prefixes: Prefixes,
    /// Events received and not yet yielded.
    pending: VecDeque<Event>,
    /// The revision the stream is at, for the compaction error.
    next: Revision,
    done: bool,
}

impl State {
    fn finish(mut self, err: StoreError) -> Option<(Result<Event, StoreError>, State)> {
        self.done = true;
        Some((Err(err), self))
    }
}

async fn next(mut st: State) -> Option<(Result<Event, StoreError>, State)> {
    loop {
        if let Some(event) = st.pending.pop_front() {
            return Some((Ok(event), st));
        }
        if st.done {
            return None;
        }
        let message = tokio::select! {
            biased;
            _ = st.closed.changed() => {
                return st.finish(StoreError::Unavailable("store closed".into()));
            }
            message = st.stream.message() => message,
        };
        let resp = match message {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                return st.finish(StoreError::Unavailable("etcd closed the watch".into()));
            }
            Err(e) => return st.finish(EtcdError::Client(e).into()),
        };
        if resp.compact_revision() > 0 {
            let err = StoreError::Compacted {
                requested: st.next,
                oldest: to_u64(resp.compact_revision()) + 1,
            };
            return st.finish(err);
        }
        if resp.canceled() {
            let err = StoreError::Unavailable(format!(
                "etcd canceled the watch: {}",
                resp.cancel_reason()
            ));
            return st.finish(err);
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let kv = match st.ns.kv(kv) {
                Ok(kv) => kv,
                Err(err) => return st.finish(err),
            };
            let kind = match event.event_type() {
                EventType::Put => EventKind::Put,
                EventType::Delete => EventKind::Delete,
            };
            st.next = kv.mod_revision + 1;
            if !st.prefixes.matches(&kv.key) {
                continue;
            }
            st.pending.push_back(Event {
                kind,
                kv: match kind {
                    EventKind::Put => kv,
                    // etcd reports exactly this already; spelled out so the
                    // contract does not depend on it.
                    EventKind::Delete => KeyValue {
                        key: kv.key,
                        value: Vec::new(),
                        create_revision: 0,
                        mod_revision: kv.mod_revision,
                        version: 0,
                        lease: 0,
                    },
                },
            });
        }
    }
}
