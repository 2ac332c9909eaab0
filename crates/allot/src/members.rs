//! Members: processes that take part in allocation (pods, daemons), each
//! with a name, an incarnation that grows on every join under that name, and
//! a store lease kept alive in the background.
//!
//! A member's record `m/{name}` lives on its lease: when the lease expires
//! (the process died, or is cut off) the store deletes it and every block the
//! member owned becomes an orphan. The member itself stops acting **before**
//! that can happen: it only trusts its lease until `sent + ttl - margin`,
//! where `sent` is when it sent the last keep-alive that succeeded, judged on
//! its own monotonic clock (the store's expiry is measured from a later
//! moment, when the store received it). Every write a member makes compares
//! its record's revision, so a member whose lease expired (or that joined
//! again under a new incarnation) can never write again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use allot_store::{Compare, LeaseId, Op, Revision, StoreError, Txn};

use crate::error::{Error, Result};
use crate::member_blocks::MemberPool;
use crate::owners::OwnerMap;
use crate::{encode_json, keys, lock, Allot};

/// Default lease TTL of a member.
pub const DEFAULT_MEMBER_TTL: Duration = Duration::from_secs(5);

/// A live member, as stored under `m/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub name: String,
    /// Grows by one on every join under this name.
    pub incarnation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    pub joined_ms: u64,
    pub ttl_ms: u64,
}

/// A live member with the number of blocks it owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    #[serde(flatten)]
    pub record: MemberRecord,
    pub blocks: u64,
}

/// The owner of one block, as stored under `o/{pool}/{block}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockOwner {
    /// `None`: the block was given back and is free (its epoch is kept, so
    /// epochs of a block only ever grow).
    pub member: Option<String>,
    pub incarnation: u64,
    /// Grows on every change of owner; handed to the application as the
    /// fencing token of the values it allocates from the block.
    pub epoch: u64,
    pub since_ms: u64,
}

/// What the application tells a new owner about a block it takes over in
/// `block` durability: which values are still in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockScan {
    pub pool: String,
    pub block: u64,
    /// The block's first and last values.
    pub first: String,
    pub last: String,
    /// The epoch the block now has (ours).
    pub epoch: u64,
}

/// The application's answer to a [`BlockScan`]: every value of the block
/// still in use, or why it cannot tell (the block then stays unused, and the
/// scan is asked again later).
pub type ScanFn = Arc<dyn Fn(&BlockScan) -> std::result::Result<Vec<String>, String> + Send + Sync>;

/// How a member joins.
#[derive(Clone)]
pub struct MemberOptions {
    /// Lease TTL (default 5 s): how long after its last keep-alive the
    /// member counts as down.
    pub ttl: Duration,
    /// How long before the lease's end (on the member's clock) it stops
    /// allocating (default: a tenth of the TTL, at least 100 ms).
    pub margin: Option<Duration>,
    pub address: Option<String>,
    pub zone: Option<String>,
    pub attributes: BTreeMap<String, String>,
    /// How long an empty block is kept before it goes back to the pool
    /// (default 30 s).
    pub return_after: Duration,
    /// Asked, once per block, which values are in use when this member takes
    /// over a `block`-durability block. Without it the member leaves such
    /// orphans to members that have one.
    pub scan: Option<ScanFn>,
}

impl Default for MemberOptions {
    fn default() -> Self {
        MemberOptions {
            ttl: DEFAULT_MEMBER_TTL,
            margin: None,
            address: None,
            zone: None,
            attributes: BTreeMap::new(),
            return_after: Duration::from_secs(30),
            scan: None,
        }
    }
}

impl std::fmt::Debug for MemberOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberOptions")
            .field("ttl", &self.ttl)
            .field("margin", &self.margin)
            .field("address", &self.address)
            .field("zone", &self.zone)
            .field("return_after", &self.return_after)
            .field("scan", &self.scan.is_some())
            .finish()
    }
}

/// A member's own judgement of its lease, on a monotonic clock: trusted
/// until `sent + trusted_for` after each keep-alive that got through (sent
/// at `sent`), lost for good once the lease is known to be gone. Remote
/// members (`allot-client`) keep one too.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use allot::{Fence, ManualClock};
/// let clock = Arc::new(ManualClock::new(0));
/// let fence = Fence::new(clock.clone());
/// assert!(fence.check().is_err()); // nothing got through yet
/// fence.extend(fence.now_ns(), Duration::from_secs(4));
/// assert!(fence.check().is_ok());
/// clock.advance_ms(4000);
/// assert!(fence.check().is_err());
/// ```
pub struct Fence {
    clock: Arc<dyn crate::Clock>,
    /// Clock reading until which the lease is trusted.
    until_ns: AtomicU64,
    /// The lease is gone for sure (expired, revoked, or the member left).
    lost: AtomicBool,
}

impl Fence {
    pub fn new(clock: Arc<dyn crate::Clock>) -> Self {
        Fence {
            clock,
            until_ns: AtomicU64::new(0),
            lost: AtomicBool::new(false),
        }
    }

    /// The clock's reading now (for [`Fence::extend`]).
    pub fn now_ns(&self) -> u64 {
        self.clock.mono_ns()
    }

    /// Trust the lease until `sent_ns + trusted_for`.
    pub fn extend(&self, sent_ns: u64, trusted_for: Duration) {
        let until = sent_ns.saturating_add(trusted_for.as_nanos() as u64);
        self.until_ns.fetch_max(until, Ordering::AcqRel);
    }

    /// Fails once the lease may have expired.
    #[inline]
    pub fn check(&self) -> Result<()> {
        if self.lost.load(Ordering::Acquire) {
            return Err(Error::Fenced(
                "this member's lease is gone; join again".into(),
            ));
        }
        if self.now_ns() >= self.until_ns.load(Ordering::Acquire) {
            return Err(Error::Fenced(
                "this member's lease may have expired (no keep-alive got through in time); \
                 it allocates again once one does"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The lease is gone for sure: fails every check from now on.
    pub fn lose(&self) {
        self.lost.store(true, Ordering::Release);
    }
}

pub(crate) struct MemberInner {
    pub(crate) allot: Allot,
    pub(crate) record: MemberRecord,
    pub(crate) lease: LeaseId,
    /// mod_revision of our record: every write compares it.
    pub(crate) join_rev: Revision,
    pub(crate) fence: Fence,
    pub(crate) owners: OwnerMap,
    pub(crate) options: MemberOptions,
    pub(crate) pools: std::sync::Mutex<HashMap<String, Arc<MemberPool>>>,
    /// The runtime the member joined on: background work (taking the next
    /// block) is spawned there even when a value is taken from a thread
    /// outside it (the hot path is synchronous).
    pub(crate) runtime: tokio::runtime::Handle,
    /// Dropped with the member, which ends its background tasks.
    _stop: tokio::sync::watch::Sender<()>,
    stop_rx: tokio::sync::watch::Receiver<()>,
}

impl MemberInner {
    /// The compare every write of this member carries.
    pub(crate) fn guard(&self) -> Compare {
        Compare::mod_revision(keys::member(&self.record.name), self.join_rev)
    }

    pub(crate) fn name(&self) -> &str {
        &self.record.name
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.allot.inner.clock.now_ms()
    }

    /// Resolves when the member is dropped.
    pub(crate) fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stop_rx.clone();
        async move { while rx.changed().await.is_ok() {} }
    }

    /// Sends one keep-alive (bounded by a third of the TTL) and judges the
    /// lease by its outcome.
    pub(crate) async fn renew(&self) -> Result<()> {
        let sent = self.fence.now_ns();
        let call = self.allot.inner.store.lease_keep_alive(self.lease);
        let renewed = tokio::time::timeout(self.options.ttl / 3, call).await;
        self.renewed(sent, renewed)
    }

    /// Judges the outcome of a keep-alive sent at `sent` (clock reading): a
    /// success extends the fence from that moment; a gone lease fences the
    /// member for good; anything else leaves the fence to run out by itself
    /// if no later keep-alive gets through.
    fn renewed(
        &self,
        sent: u64,
        outcome: std::result::Result<
            std::result::Result<Duration, StoreError>,
            tokio::time::error::Elapsed,
        >,
    ) -> Result<()> {
        match outcome {
            Ok(Ok(_)) => {
                self.fence
                    .extend(sent, self.options.ttl - margin(&self.options));
                Ok(())
            }
            Ok(Err(StoreError::LeaseNotFound(_))) => {
                tracing::warn!(member = self.name(), "lease expired; this member stops");
                self.fence.lose();
                Err(Error::Fenced(
                    "this member's lease expired; join again".into(),
                ))
            }
            Ok(Err(e)) => {
                tracing::warn!(member = self.name(), "keep-alive failed: {e}");
                Err(Error::Store(e))
            }
            Err(_) => {
                tracing::warn!(member = self.name(), "keep-alive timed out");
                Err(Error::Store(StoreError::Unavailable(
                    "keep-alive timed out".into(),
                )))
            }
        }
    }

    /// Stops allocating, then revokes the lease.
    pub(crate) async fn leave(&self) -> Result<()> {
        self.fence.lose();
        match self.allot.inner.store.lease_revoke(self.lease).await {
            Ok(()) | Err(StoreError::LeaseNotFound(_)) => Ok(()),
            Err(e) => Err(Error::Store(e)),
        }
    }

    /// A write was refused: if our record is gone or replaced, we are no
    /// longer this member.
    pub(crate) async fn check_membership(&self) -> Result<()> {
        let kv = self
            .allot
            .inner
            .store
            .get(&keys::member(&self.record.name))
            .await?;
        if kv.is_none_or(|kv| kv.mod_revision != self.join_rev) {
            self.fence.lose();
            return Err(Error::Fenced(
                "this member's lease expired (or it joined again elsewhere); join again".into(),
            ));
        }
        Ok(())
    }
}

/// A joined member. Cheap to clone; when the last clone is dropped its
/// background tasks stop, and without [`Member::leave`] its lease then runs
/// out as if the process had died.
#[derive(Clone)]
pub struct Member {
    pub(crate) inner: Arc<MemberInner>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("name", &self.inner.record.name)
            .field("incarnation", &self.inner.record.incarnation)
            .finish()
    }
}

impl Allot {
    /// Joins as member `name`: takes the next incarnation of that name,
    /// grants a lease and keeps it alive in the background.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use allot::{Allot, MemberOptions};
    /// let allot = Allot::new(std::sync::Arc::new(allot_store::MemoryStore::new()));
    /// let m = allot.join("smf-0", MemberOptions::default()).await.unwrap();
    /// assert_eq!(m.incarnation(), 1);
    /// m.leave().await.unwrap();
    /// let again = allot.join("smf-0", MemberOptions::default()).await.unwrap();
    /// assert_eq!(again.incarnation(), 2);
    /// # });
    /// ```
    pub async fn join(&self, name: &str, options: MemberOptions) -> Result<Member> {
        let inner = self.join_inner(name, options).await?;
        tokio::spawn(keep_alive(Arc::downgrade(&inner), inner.stopped()));
        tokio::spawn(crate::member_blocks::maintain(
            Arc::downgrade(&inner),
            inner.stopped(),
        ));
        Ok(Member { inner })
    }

    /// Joins without background tasks: the caller keeps the lease alive
    /// (remote members drive it from their own process).
    pub(crate) async fn join_inner(
        &self,
        name: &str,
        options: MemberOptions,
    ) -> Result<Arc<MemberInner>> {
        crate::model::validate_pool_name(name).map_err(|_| {
            Error::InvalidInput(format!(
                "invalid member name '{name}': use 1-{} characters from A-Z a-z 0-9 . _ -",
                crate::model::MAX_NAME_LEN
            ))
        })?;
        if options.ttl < Duration::from_secs(1) {
            return Err(Error::InvalidInput(
                "a member's lease TTL must be at least 1 s".into(),
            ));
        }
        let margin = margin(&options);
        if margin >= options.ttl {
            return Err(Error::InvalidInput(
                "the safety margin must be shorter than the TTL".into(),
            ));
        }
        let store = self.inner.store.clone();
        let owners = self.owner_map().await?;
        let fence = Fence::new(self.inner.clock.clone());
        let sent = fence.now_ns();
        let lease = store.lease_grant(options.ttl).await?;
        let mut record = MemberRecord {
            name: name.to_string(),
            incarnation: 0,
            address: options.address.clone(),
            zone: options.zone.clone(),
            attributes: options.attributes.clone(),
            joined_ms: self.inner.clock.now_ms(),
            ttl_ms: options.ttl.as_millis() as u64,
        };
        // A previous incarnation may still run somewhere (cut off, or
        // restarted elsewhere before its lease ran out): revoke its lease so
        // it fences itself within one TTL, the wait the others observe
        // before taking its blocks.
        if let Some(old) = store.get(&keys::member(name)).await? {
            match store.lease_revoke(old.lease).await {
                Ok(()) | Err(StoreError::LeaseNotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let ikey = keys::incarnation(name);
        let join_rev = loop {
            let last = store.get(&ikey).await?;
            let (prev, rev) = match &last {
                Some(kv) => {
                    let bytes: [u8; 8] = kv
                        .value
                        .as_slice()
                        .try_into()
                        .map_err(|_| Error::Corrupt("incarnation record".into()))?;
                    (u64::from_le_bytes(bytes), kv.mod_revision)
                }
                None => (0, 0),
            };
            record.incarnation = prev + 1;
            let resp = store
                .txn(
                    Txn::new()
                        .when(Compare::mod_revision(&ikey, rev))
                        .then(Op::put(&ikey, record.incarnation.to_le_bytes()))
                        .then(Op::put_with_lease(
                            keys::member(name),
                            encode_json(&record),
                            lease,
                        )),
                )
                .await?;
            if resp.succeeded {
                break resp.revision;
            }
            // Another process joined under this name at the same moment.
        };
        fence.extend(sent, options.ttl - margin);
        let (stop, stop_rx) = tokio::sync::watch::channel(());
        let inner = Arc::new(MemberInner {
            allot: self.clone(),
            record,
            lease,
            join_rev,
            fence,
            owners,
            options,
            pools: std::sync::Mutex::new(HashMap::new()),
            runtime: tokio::runtime::Handle::current(),
            _stop: stop,
            stop_rx,
        });
        Ok(inner)
    }

    /// The live members, by name, with the blocks each owns (from this
    /// engine's owner map, started on first use and kept current by
    /// watches).
    pub async fn list_members(&self) -> Result<Vec<MemberInfo>> {
        let map = self.owner_map().await?;
        let held = map.blocks_held();
        Ok(map
            .members()
            .into_iter()
            .map(|record| MemberInfo {
                blocks: held.get(&record.name).copied().unwrap_or(0),
                record,
            })
            .collect())
    }

    /// The owner of the block holding `value` in `pool`; [`Error::NotFound`]
    /// when no member owns that block (from the owner map, as
    /// [`Allot::list_members`]).
    pub async fn owner(&self, pool: &str, value: &str) -> Result<crate::OwnerInfo> {
        self.owner_map().await?.owner(pool, value)?.ok_or_else(|| {
            Error::NotFound(format!(
                "no member owns the block of value {value} in pool '{pool}'"
            ))
        })
    }

    /// This engine's owner map, started on first use.
    pub async fn owner_map(&self) -> Result<OwnerMap> {
        let mut slot = self.inner.owner_map.lock().await;
        if let Some(map) = slot.as_ref() {
            return Ok(map.clone());
        }
        let map = OwnerMap::start(self.inner.store.clone()).await?;
        *slot = Some(map.clone());
        Ok(map)
    }
}

pub(crate) fn margin(options: &MemberOptions) -> Duration {
    options
        .margin
        .unwrap_or_else(|| (options.ttl / 10).max(Duration::from_millis(100)))
}

impl Member {
    pub fn name(&self) -> &str {
        &self.inner.record.name
    }

    pub fn incarnation(&self) -> u64 {
        self.inner.record.incarnation
    }

    /// The member's record as stored.
    pub fn record(&self) -> &MemberRecord {
        &self.inner.record
    }

    /// Whether the member still trusts its lease (allocation works).
    pub fn is_live(&self) -> bool {
        self.inner.fence.check().is_ok()
    }

    /// Leaves: revokes the lease, so the member's record goes at once and its
    /// blocks become orphans for the others to take over (with the stored
    /// bitmap, or the scan, as for a crash, since values handed out may still
    /// be in use). The member stops allocating first.
    pub async fn leave(self) -> Result<()> {
        self.inner.leave().await
    }

    pub(crate) fn pools(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<MemberPool>>> {
        lock(&self.inner.pools)
    }
}

/// Renews the lease every third of the TTL; a renewal that succeeds extends
/// the fence from the moment it was sent. A failed one is retried sooner;
/// the fence runs out by itself if none gets through.
async fn keep_alive(weak: Weak<MemberInner>, stopped: impl std::future::Future<Output = ()>) {
    tokio::pin!(stopped);
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let ttl = inner.options.ttl;
        let store = inner.allot.inner.store.clone();
        let lease = inner.lease;
        let sent = inner.fence.now_ns();
        drop(inner);
        let renewed = tokio::select! {
            () = &mut stopped => return,
            r = tokio::time::timeout(ttl / 3, store.lease_keep_alive(lease)) => r,
        };
        let Some(inner) = weak.upgrade() else { return };
        let pause = match inner.renewed(sent, renewed) {
            Ok(()) => ttl / 3,
            Err(Error::Fenced(_)) => return,
            Err(_) => ttl / 10,
        };
        drop(inner);
        tokio::select! {
            () = &mut stopped => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}
