//! Lease deadlines and the background task that expires them.
//!
//! Deadlines use [`tokio::time::Instant`] so that tests can drive expiry with
//! tokio's paused clock. Expiry happens in two ways: every store call first
//! expires whatever is due (so a caller never observes a key whose lease is
//! past its deadline), and a background task wakes at the next deadline so
//! that watchers see the deletions even when nobody calls the store.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::LeaseId;

/// Live leases with their TTL and deadline, indexed by deadline.
#[derive(Debug, Default)]
pub(crate) struct LeaseClock {
    leases: HashMap<LeaseId, (Duration, Instant)>,
    by_deadline: BTreeSet<(Instant, LeaseId)>,
}

impl LeaseClock {
    /// Starts (or restarts) `id` with a full TTL from `now`.
    pub fn insert(&mut self, id: LeaseId, ttl: Duration, now: Instant) {
        self.remove(id);
        // An absurd TTL means "practically never", not an overflow panic.
        let deadline = now
            .checked_add(ttl)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
        self.leases.insert(id, (ttl, deadline));
        self.by_deadline.insert((deadline, id));
    }

    /// Renews a live lease to its full TTL; `None` if unknown or past due.
    pub fn renew(&mut self, id: LeaseId, now: Instant) -> Option<Duration> {
        let (ttl, deadline) = *self.leases.get(&id)?;
        if deadline <= now {
            return None;
        }
        self.insert(id, ttl, now);
        Some(ttl)
    }

    pub fn remove(&mut self, id: LeaseId) {
        if let Some((_, deadline)) = self.leases.remove(&id) {
            self.by_deadline.remove(&(deadline, id));
        }
    }

    pub fn contains(&self, id: LeaseId) -> bool {
        self.leases.contains_key(&id)
    }

    /// The deadline of `id`, if the lease is known.
    pub fn deadline(&self, id: LeaseId) -> Option<Instant> {
        self.leases.get(&id).map(|&(_, deadline)| deadline)
    }

    /// True if the lease is known and not past its deadline.
    pub fn is_alive(&self, id: LeaseId, now: Instant) -> bool {
        self.deadline(id).is_some_and(|deadline| deadline > now)
    }

    /// Leases whose deadline is at or before `now`, earliest first.
    pub fn due(&self, now: Instant) -> Vec<LeaseId> {
        self.by_deadline
            .iter()
            .take_while(|(d, _)| *d <= now)
            .map(|&(_, id)| id)
            .collect()
    }

    pub fn has_due(&self, now: Instant) -> bool {
        self.by_deadline.first().is_some_and(|(d, _)| *d <= now)
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline.first().map(|&(d, _)| d)
    }

    pub fn ids(&self) -> Vec<LeaseId> {
        self.leases.keys().copied().collect()
    }
}

/// What the expiry task needs from a backend.
pub(crate) trait LeaseHost: Send + Sync + 'static {
    /// The earliest lease deadline, if any lease is live.
    fn next_deadline(&self) -> Option<Instant>;
    /// Expires every lease that is due. The work is started before this
    /// returns; the future only waits for it and must not hold the backend,
    /// so that dropping the store is never delayed by this task.
    fn expire_due(&self) -> impl Future<Output = ()> + Send + 'static;
    /// The task's bookkeeping, owned by the backend.
    fn expiry(&self) -> &ExpiryTask;
}

/// Bookkeeping of one backend's expiry task.
#[derive(Debug, Default)]
pub(crate) struct ExpiryTask {
    /// Woken when a lease is granted, as its deadline may be the earliest.
    wake: Arc<Notify>,
    running: Arc<AtomicBool>,
}

/// Clears the running flag when the task ends for any reason, including its
/// runtime shutting down, so the next grant starts a new one.
struct RunningGuard(Arc<AtomicBool>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Drop for ExpiryTask {
    fn drop(&mut self) {
        // The backend is going away: let a parked task notice and end.
        self.wake.notify_one();
    }
}

impl ExpiryTask {
    /// Makes sure an expiry task runs for `host` and that it looks at the
    /// current deadlines. Does nothing outside a tokio runtime: lazy expiry
    /// at the start of each call still applies there.
    pub fn ensure_running<H: LeaseHost>(host: &Arc<H>) {
        let task = host.expiry();
        task.wake.notify_one();
        if task.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            task.running.store(false, Ordering::Release);
            return;
        };
        let guard = RunningGuard(task.running.clone());
        let wake = task.wake.clone();
        // Only a weak reference: the task must never keep the store alive.
        let weak: Weak<H> = Arc::downgrade(host);
        handle.spawn(async move {
            let _guard = guard;
            loop {
                let next = match weak.upgrade() {
                    Some(host) => host.next_deadline(),
                    None => return,
                };
                match next {
                    Some(deadline) => tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => {}
                        _ = wake.notified() => {}
                    },
                    None => wake.notified().await,
                }
                let done = match weak.upgrade() {
                    Some(host) => host.expire_due(),
                    None => return,
                };
                done.await;
            }
        });
    }
}
