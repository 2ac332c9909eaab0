//! Remote members: this process joins as a member through `allot serve`
//! (the gRPC `MemberSession` stream) and allocates from the blocks it owns
//! in its own memory, with no round trip per value.
//!
//! The server holds the lease and writes to the store; this side holds the
//! blocks and judges the lease on its own clock ([`allot::Fence`]): trusted
//! until (when the last answered keep-alive was sent) + TTL − margin. The
//! store expires the lease one TTL after it *received* that keep-alive, so
//! this member stops before any other can take its blocks, however the
//! network between here, the server and the store behaves.
//!
//! A session that breaks (server restart, network) is not resumed: the
//! member allocates on until its fence runs out, then fails with `fenced`;
//! join again (a new incarnation; the old one's blocks are taken over with
//! their stored bitmaps or the scan answers).
//!
//! ```no_run
//! # async fn demo() -> Result<(), allot_client::Error> {
//! let client = allot_client::Client::new("http://127.0.0.1:7070")?;
//! let member = client.join("smf-3", allot::MemberOptions::default()).await?;
//! let teid = member.allocate("teids").await?; // in process, after the first block
//! println!("{} (fencing token {})", teid.value, teid.epoch);
//! member.release("teids", &teid.value).await?;
//! member.leave().await?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use allot::{
    Batch, BlockScan, CommitLog, Durability, Fence, MemberOptions, OwnedBlock, OwnedBlocks,
    OwnedOffset, OwnedValue, SystemClock, ValueSpace,
};
use allot_proto::pb;
use futures::StreamExt;
use pb::session_request::Request;
use pb::session_response::Response;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::{Client, Error, Result};

/// Values free below this fraction of a block start taking the next block.
const LOW_WATER_DIVISOR: u64 = 4;
/// How long a request of the session may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Option<Response>>>>;

/// The request side of the session and the answers awaited.
struct Link {
    url: String,
    out: mpsc::UnboundedSender<pb::SessionRequest>,
    pending: Pending,
    next_id: AtomicU64,
    /// Why the session ended, once it has.
    ended: Mutex<Option<String>>,
}

impl Link {
    fn gone(&self) -> Error {
        let why = lock(&self.ended).clone();
        Error::Api {
            status: 503,
            code: "unavailable".into(),
            message: format!(
                "the member session with {} ended ({}); join again",
                self.url,
                why.as_deref().unwrap_or("no reason given")
            ),
        }
    }

    /// Sends one request and waits for its answer.
    async fn call(&self, request: Request, timeout: Duration) -> Result<Response> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let sent = self.out.send(pb::SessionRequest {
            id,
            request: Some(request),
        });
        if sent.is_err() || lock(&self.ended).is_some() {
            lock(&self.pending).remove(&id);
            return Err(self.gone());
        }
        let answer = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Some(answer))) => answer,
            Ok(Ok(None)) => {
                return Err(Error::Protocol {
                    url: self.url.clone(),
                    message: "an empty member session response".into(),
                })
            }
            Ok(Err(_)) => return Err(self.gone()),
            Err(_) => {
                lock(&self.pending).remove(&id);
                // Not an answer: the request may or may not have been done.
                return Err(Error::Transport {
                    url: self.url.clone(),
                    message: format!("no answer within {timeout:?}"),
                });
            }
        };
        match answer {
            Response::Error(e) => Err(Error::Api {
                status: allot::http_status(&e.code),
                code: e.code,
                message: e.message,
            }),
            other => Ok(other),
        }
    }

    /// Ends the session from this side: no request is sent any more.
    fn end(&self, why: &str) {
        lock(&self.ended).get_or_insert_with(|| why.to_string());
        lock(&self.pending).clear();
    }

    fn protocol(&self, what: &str) -> Error {
        Error::Protocol {
            url: self.url.clone(),
            message: format!("unexpected member session answer: {what}"),
        }
    }
}

/// The changes of a `sync` block since the last commit: offset → now
/// allocated (true) or released (false). Two changes of one offset cancel
/// out, so what is sent is the net difference from what is stored.
type Changes = BTreeMap<u64, BTreeMap<u64, bool>>;

#[derive(Default)]
struct Owned {
    set: OwnedBlocks<(), Instant>,
    changes: Changes,
    /// Allocations and releases so far; a commit covers all up to its own.
    seq: u64,
    /// Orphans granted whose scan failed: owned, unused until it works.
    unscanned: BTreeMap<u64, pb::BlockGrant>,
}

impl Owned {
    fn change(&mut self, block: u64, offset: u64, allocated: bool) {
        let changes = self.changes.entry(block).or_default();
        if changes.remove(&offset).is_none() {
            changes.insert(offset, allocated);
        }
        if changes.is_empty() {
            self.changes.remove(&block);
        }
        self.seq += 1;
    }

    /// Puts back the changes of a commit that did not store them.
    fn restore(&mut self, changes: Changes) {
        for (block, offsets) in changes {
            if !self.set.contains(block) {
                continue;
            }
            for (offset, allocated) in offsets {
                let pending = self.changes.entry(block).or_default();
                if pending.remove(&offset).is_none() {
                    pending.insert(offset, allocated);
                }
            }
        }
        self.changes.retain(|_, c| !c.is_empty());
    }

    fn remove_block(&mut self, block: u64) {
        self.set.remove(block);
        self.changes.remove(&block);
        self.unscanned.remove(&block);
    }
}

/// One pool as this member uses it.
struct RemotePool {
    name: String,
    space: ValueSpace,
    reserved: Vec<(u64, u64)>,
    block_size: u64,
    durability: Durability,
    owned: Mutex<Owned>,
    acquiring: tokio::sync::Mutex<()>,
    commits: tokio::sync::Mutex<CommitLog>,
    closed: AtomicBool,
}

impl RemotePool {
    fn low_water(&self) -> u64 {
        (self.block_size / LOW_WATER_DIVISOR).max(1)
    }

    fn empty_block(&self, block: u64) -> Result<OwnedBlock> {
        OwnedBlock::new(block, self.block_size, self.space.size(), &self.reserved)
            .map_err(|e| Error::InvalidInput(format!("pool '{}': {e}", self.name)))
    }

    /// The block a grant describes, with the values in use marked (from
    /// the grant, or from the application's scan).
    fn granted_block(
        &self,
        g: &pb::BlockGrant,
        scan: Option<&allot::ScanFn>,
    ) -> Result<OwnedBlock> {
        let bad = |e: allot::CoreError| Error::InvalidInput(format!("pool '{}': {e}", self.name));
        let mut block = self.empty_block(g.block)?;
        for run in &g.in_use {
            for offset in run.start..run.end {
                block.mark(offset).map_err(bad)?;
            }
        }
        if g.scan {
            let scan = scan.ok_or_else(|| Error::InvalidInput("no scan callback".into()))?;
            let (first, end) = block.range();
            let request = BlockScan {
                pool: self.name.clone(),
                block: g.block,
                first: self.space.format_offset(first),
                last: self.space.format_offset(end - 1),
                epoch: g.epoch,
            };
            let in_use =
                scan(&request).map_err(|e| Error::InvalidInput(format!("scan callback: {e}")))?;
            for v in &in_use {
                let run = self.space.parse(v).map_err(bad)?;
                block.mark(run.offset).map_err(bad)?;
            }
        }
        Ok(block)
    }

    fn adopt(&self, g: &pb::BlockGrant, block: OwnedBlock) {
        let mut owned = lock(&self.owned);
        owned.unscanned.remove(&g.block);
        owned
            .set
            .insert(g.block, block, g.epoch, (), Instant::now());
    }

    /// Takes back a value allocated but never handed out.
    fn undo(&self, block: u64, offset: u64) {
        let mut owned = lock(&self.owned);
        if owned.set.release(block, offset, Instant::now()).is_ok()
            && self.durability == Durability::Sync
        {
            owned.change(block, offset, false);
        }
    }
}

struct Inner {
    name: String,
    incarnation: u64,
    ttl: Duration,
    margin: Duration,
    fence: Fence,
    link: Link,
    client: Client,
    options: MemberOptions,
    pools: Mutex<HashMap<String, Arc<RemotePool>>>,
    runtime: tokio::runtime::Handle,
    /// Dropped with the member, which ends its background tasks.
    _stop: tokio::sync::watch::Sender<()>,
    stop_rx: tokio::sync::watch::Receiver<()>,
}

impl Inner {
    fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stop_rx.clone();
        async move { while rx.changed().await.is_ok() {} }
    }

    fn fenced(&self) -> Result<()> {
        self.fence.check().map_err(|e| Error::Api {
            status: 409,
            code: "fenced".into(),
            message: e.to_string(),
        })
    }
}

/// A member of the cluster that talks to `allot serve`. Cheap to clone;
/// when the last clone is dropped the session closes and, without
/// [`RemoteMember::leave`], its lease runs out as if the process had died.
#[derive(Clone)]
pub struct RemoteMember {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RemoteMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteMember")
            .field("name", &self.inner.name)
            .field("incarnation", &self.inner.incarnation)
            .finish()
    }
}

impl Client {
    /// Joins as member `name` through the server (its gRPC port, the same
    /// as REST's). `options.scan`, if set, is asked about `block`-durability
    /// orphans this member takes over; `options.return_after` is how long an
    /// empty block stays before going back.
    pub async fn join(&self, name: &str, options: MemberOptions) -> Result<RemoteMember> {
        let url = self.base.as_str().trim_end_matches('/').to_string();
        let transport = |e: &(dyn std::error::Error + 'static)| Error::Transport {
            url: url.clone(),
            message: crate::error::chain(e),
        };
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| Error::InvalidInput(format!("server URL '{url}': {e}")))?
            .connect_timeout(crate::CONNECT_TIMEOUT)
            .http2_keep_alive_interval(options.ttl / 3)
            .connect()
            .await
            .map_err(|e| transport(&e))?;
        let mut grpc = pb::allot_client::AllotClient::new(channel);
        let (out, rx) = mpsc::unbounded_channel::<pb::SessionRequest>();
        let join = pb::JoinMember {
            name: name.to_string(),
            ttl_ms: options.ttl.as_millis() as u64,
            margin_ms: options.margin.map_or(0, |m| m.as_millis() as u64),
            address: options.address.clone(),
            zone: options.zone.clone(),
            attributes: options.attributes.clone(),
            can_scan: options.scan.is_some(),
        };
        let fence = Fence::new(Arc::new(SystemClock));
        let sent = fence.now_ns();
        let _ = out.send(pb::SessionRequest {
            id: 1,
            request: Some(Request::Join(join)),
        });
        let mut request =
            tonic::Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
        if let Some(token) = &self.token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| Error::InvalidInput("the token is not a valid header value".into()))?;
            request.metadata_mut().insert("authorization", value);
        }
        let mut responses = grpc
            .member_session(request)
            .await
            .map_err(|s| status_error(&url, &s))?
            .into_inner();
        let joined = match responses.next().await {
            Some(Ok(pb::SessionResponse {
                response: Some(Response::Joined(j)),
                ..
            })) => j,
            Some(Ok(other)) => {
                return Err(Error::Protocol {
                    url,
                    message: format!("expected the join answer, got {other:?}"),
                })
            }
            Some(Err(s)) => return Err(status_error(&url, &s)),
            None => {
                return Err(transport(&std::io::Error::other(
                    "the session ended at once",
                )))
            }
        };
        let ttl = Duration::from_millis(joined.ttl_ms);
        let margin = Duration::from_millis(joined.margin_ms);
        // The server granted the lease after we sent the join.
        fence.extend(sent, ttl.saturating_sub(margin));
        let (stop, stop_rx) = tokio::sync::watch::channel(());
        let inner = Arc::new(Inner {
            name: joined.name,
            incarnation: joined.incarnation,
            ttl,
            margin,
            fence,
            link: Link {
                url,
                out,
                pending: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(2),
                ended: Mutex::new(None),
            },
            client: self.clone(),
            options,
            pools: Mutex::new(HashMap::new()),
            runtime: tokio::runtime::Handle::current(),
            _stop: stop,
            stop_rx,
        });
        tokio::spawn(read(Arc::downgrade(&inner), responses, inner.stopped()));
        tokio::spawn(keep_alive(Arc::downgrade(&inner), inner.stopped()));
        tokio::spawn(maintain(Arc::downgrade(&inner), inner.stopped()));
        Ok(RemoteMember { inner })
    }
}

fn status_error(url: &str, s: &tonic::Status) -> Error {
    let code = s
        .metadata()
        .get("allot-code")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match code {
        Some(code) => Error::Api {
            status: allot::http_status(&code),
            code,
            message: s.message().to_string(),
        },
        None => Error::Transport {
            url: url.to_string(),
            message: format!("{:?}: {}", s.code(), s.message()),
        },
    }
}

/// Delivers answers to their callers and handles news, until the stream
/// ends; then fails every call still waiting.
async fn read(
    weak: Weak<Inner>,
    mut responses: tonic::Streaming<pb::SessionResponse>,
    stopped: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stopped);
    let why = loop {
        let next = tokio::select! {
            () = &mut stopped => break "the member was dropped".to_string(),
            next = responses.next() => next,
        };
        let Some(inner) = weak.upgrade() else {
            break "the member was dropped".to_string();
        };
        match next {
            Some(Ok(msg)) if msg.id != 0 => {
                if let Some(tx) = lock(&inner.link.pending).remove(&msg.id) {
                    let _ = tx.send(msg.response);
                }
            }
            Some(Ok(msg)) => match msg.response {
                Some(Response::Granted(g)) => {
                    let inner = inner.clone();
                    tokio::spawn(async move { take_over(&inner, g).await });
                }
                Some(Response::PoolGone(p)) => {
                    if let Some(rp) = lock(&inner.pools).remove(&p.pool) {
                        rp.closed.store(true, Ordering::Release);
                    }
                }
                other => tracing::debug!("member session: unexpected news {other:?}"),
            },
            Some(Err(s)) => {
                if s.metadata().get("allot-code").and_then(|v| v.to_str().ok()) == Some("fenced") {
                    inner.fence.lose();
                }
                break status_error(&inner.link.url, &s).to_string();
            }
            None => break "the server closed it".to_string(),
        }
    };
    if let Some(inner) = weak.upgrade() {
        tracing::warn!(member = %inner.name, "member session ended: {why}");
        inner.link.end(&why);
    }
}

/// An orphan the server took over for us.
async fn take_over(inner: &Arc<Inner>, g: pb::BlockGrant) {
    let rp = lock(&inner.pools).get(&g.pool).cloned();
    let Some(rp) = rp else {
        tracing::warn!(pool = %g.pool, block = g.block, "granted a block of a pool not in use");
        return;
    };
    adopt_or_hold(inner, &rp, g);
}

fn adopt_or_hold(inner: &Inner, rp: &RemotePool, g: pb::BlockGrant) {
    match rp.granted_block(&g, inner.options.scan.as_ref()) {
        Ok(block) => {
            tracing::info!(pool = %rp.name, block = g.block, from = ?g.from, "took over an orphan block");
            rp.adopt(&g, block);
        }
        Err(e) => {
            tracing::error!(pool = %rp.name, block = g.block, "cannot use the block taken over yet: {e}");
            lock(&rp.owned).unscanned.insert(g.block, g);
        }
    }
}

/// Renews the lease every third of the TTL; each answered renewal extends
/// the fence from the moment it was sent.
async fn keep_alive(weak: Weak<Inner>, stopped: impl std::future::Future<Output = ()>) {
    tokio::pin!(stopped);
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let ttl = inner.ttl;
        let sent = inner.fence.now_ns();
        let call = inner
            .link
            .call(Request::KeepAlive(pb::KeepAlive {}), ttl / 3);
        let outcome = tokio::select! {
            () = &mut stopped => return,
            r = call => r,
        };
        let pause = match outcome {
            Ok(_) => {
                inner.fence.extend(sent, ttl.saturating_sub(inner.margin));
                ttl / 3
            }
            Err(e) if e.code() == "fenced" => {
                tracing::warn!(member = %inner.name, "lease gone; this member stops: {e}");
                inner.fence.lose();
                return;
            }
            Err(e) => {
                if lock(&inner.link.ended).is_some() {
                    return;
                }
                tracing::warn!(member = %inner.name, "keep-alive failed: {e}");
                ttl / 10
            }
        };
        drop(inner);
        tokio::select! {
            () = &mut stopped => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// Every second: gives back blocks empty for long enough, and retries the
/// scans that failed.
async fn maintain(weak: Weak<Inner>, stopped: impl std::future::Future<Output = ()>) {
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            () = &mut stopped => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let Some(inner) = weak.upgrade() else { return };
        if inner.fence.check().is_err() {
            continue;
        }
        let pools: Vec<Arc<RemotePool>> = lock(&inner.pools).values().cloned().collect();
        for rp in pools {
            let unscanned: Vec<pb::BlockGrant> =
                lock(&rp.owned).unscanned.values().cloned().collect();
            for g in unscanned {
                adopt_or_hold(&inner, &rp, g);
            }
            let Some(before) = Instant::now().checked_sub(inner.options.return_after) else {
                continue;
            };
            let idle = {
                let owned = lock(&rp.owned);
                let mut idle = owned.set.idle_since(before);
                // A block with changes not stored yet waits for its commit.
                idle.retain(|b| !owned.changes.contains_key(b));
                idle
            };
            for block in idle {
                if let Err(e) = give_back(&inner, &rp, block).await {
                    tracing::debug!(pool = %rp.name, block, "giving a block back: {e}");
                }
            }
        }
    }
}

async fn give_back(inner: &Inner, rp: &RemotePool, block: u64) -> Result<()> {
    // Under the commit lock: no commit of this block races it.
    let _commits = rp.commits.lock().await;
    {
        let mut owned = lock(&rp.owned);
        match owned.set.get(block) {
            Some(h) if h.block.allocated() == 0 && !owned.changes.contains_key(&block) => {}
            _ => return Ok(()),
        }
        // Nothing can be allocated from it while it goes back.
        owned.remove_block(block);
    }
    let request = Request::GiveBack(pb::GiveBackBlock {
        pool: rp.name.clone(),
        block,
    });
    inner.link.call(request, CALL_TIMEOUT).await.map(|_| ())
}

/// A remote member's handle on one `block`-durability pool for the hot
/// path, one per thread, as [`allot::PoolAllocator`] (which it mirrors):
/// values come from the shared blocks [`allot::ALLOCATOR_BATCH`] at a time
/// and go back on drop if not handed out.
pub struct RemoteAllocator {
    member: RemoteMember,
    pool: Arc<RemotePool>,
    batch: Batch,
}

impl Clone for RemoteAllocator {
    /// Another allocator on the same pool, with an empty batch of its own.
    fn clone(&self) -> Self {
        RemoteAllocator {
            member: self.member.clone(),
            pool: self.pool.clone(),
            batch: Batch::default(),
        }
    }
}

impl Drop for RemoteAllocator {
    fn drop(&mut self) {
        if !self.batch.is_empty() {
            let mut owned = lock(&self.pool.owned);
            self.batch.give_back(&mut owned.set, Instant::now());
        }
    }
}

impl RemoteAllocator {
    /// The next value from an owned block, if one is free now; `None` when
    /// they ran dry (then [`RemoteMember::allocate`] waits for a block).
    #[inline]
    pub fn try_allocate(&mut self) -> Result<Option<OwnedOffset>> {
        self.member.inner.fenced()?;
        let rp = &self.pool;
        if rp.closed.load(Ordering::Acquire) {
            return Err(pool_gone(&rp.name));
        }
        if self.batch.is_empty() {
            let low = {
                let mut owned = lock(&rp.owned);
                self.batch.refill(&mut owned.set);
                owned.set.free() < rp.low_water()
            };
            if low {
                self.member.prefetch(rp);
            }
        }
        Ok(self.batch.pop().map(|(offset, block, epoch)| OwnedOffset {
            offset,
            block,
            epoch,
        }))
    }

    /// The value at `offset`, as the pool writes it.
    pub fn format(&self, offset: u64) -> String {
        self.pool.space.format_offset(offset)
    }
}

fn pool_gone(pool: &str) -> Error {
    Error::Api {
        status: 404,
        code: "pool_not_found".into(),
        message: format!("pool '{pool}' was deleted or redefined"),
    }
}

impl RemoteMember {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    /// Whether the member still trusts its lease (allocation works).
    pub fn is_live(&self) -> bool {
        self.inner.fence.check().is_ok()
    }

    /// The blocks of `pool` this member owns now, with their epochs.
    pub fn owned_blocks(&self, pool: &str) -> Vec<(u64, u64)> {
        let Some(rp) = lock(&self.inner.pools).get(pool).cloned() else {
            return Vec::new();
        };
        let owned = lock(&rp.owned);
        owned.set.iter().map(|(i, h)| (i, h.epoch)).collect()
    }

    /// The hot-path handle on `pool`, which must have `block` durability.
    pub async fn allocator(&self, pool: &str) -> Result<RemoteAllocator> {
        let rp = self.pool(pool).await?;
        if rp.durability != Durability::Block {
            return Err(Error::InvalidInput(format!(
                "pool '{pool}' stores every allocation (sync durability): use RemoteMember::allocate"
            )));
        }
        Ok(RemoteAllocator {
            member: self.clone(),
            pool: rp,
            batch: Batch::default(),
        })
    }

    /// Allocates one value of `pool` from a block this member owns, taking
    /// a block first if none has a free value. In `sync` durability the
    /// allocation is stored (shared with concurrent ones) before returning.
    pub async fn allocate(&self, pool: &str) -> Result<OwnedValue> {
        self.inner.fenced()?;
        let rp = self.pool(pool).await?;
        loop {
            if rp.closed.load(Ordering::Acquire) {
                return Err(pool_gone(pool));
            }
            let (taken, low, seq) = {
                let mut owned = lock(&rp.owned);
                let taken = owned.set.allocate();
                if let Some((offset, block, _)) = taken {
                    if rp.durability == Durability::Sync {
                        owned.change(block, offset, true);
                    }
                }
                (taken, owned.set.free() < rp.low_water(), owned.seq)
            };
            if low {
                self.prefetch(&rp);
            }
            if let Some((offset, block, epoch)) = taken {
                let checked = match self.inner.fenced() {
                    Ok(()) if rp.durability == Durability::Sync => {
                        commit(&self.inner, &rp, seq).await
                    }
                    other => other,
                };
                if let Err(e) = checked {
                    rp.undo(block, offset);
                    return Err(e);
                }
                return Ok(OwnedValue {
                    value: rp.space.format_offset(offset),
                    block,
                    epoch,
                });
            }
            acquire(&self.inner, &rp).await?;
        }
    }

    /// Releases `value` of `pool`, which must come from a block this member
    /// owns (in `sync` durability, stored before returning).
    pub async fn release(&self, pool: &str, value: &str) -> Result<()> {
        self.inner.fenced()?;
        let rp = self.pool(pool).await?;
        let run = rp
            .space
            .parse(value)
            .map_err(|e| Error::InvalidInput(format!("pool '{pool}': {e}")))?;
        let block = run.offset / rp.block_size;
        let seq = {
            let mut owned = lock(&rp.owned);
            if !owned.set.contains(block) {
                return Err(Error::Api {
                    status: 409,
                    code: "conflict".into(),
                    message: format!(
                        "value {value} of pool '{pool}' is in block {block}, which member '{}' does not own",
                        self.inner.name
                    ),
                });
            }
            owned
                .set
                .release(block, run.offset, Instant::now())
                .map_err(|e| Error::Api {
                    status: 404,
                    code: "not_found".into(),
                    message: format!("pool '{pool}': {e}"),
                })?;
            if rp.durability == Durability::Sync {
                owned.change(block, run.offset, false);
            }
            owned.seq
        };
        if rp.durability == Durability::Sync {
            commit(&self.inner, &rp, seq).await?;
        }
        Ok(())
    }

    /// Leaves: the server revokes the lease, so this member's blocks become
    /// orphans at once. It stops allocating first.
    pub async fn leave(self) -> Result<()> {
        self.inner.fence.lose();
        let answer = self
            .inner
            .link
            .call(Request::Leave(pb::LeaveMember {}), CALL_TIMEOUT)
            .await?;
        match answer {
            Response::Left(_) => Ok(()),
            other => Err(self.inner.link.protocol(&format!("{other:?}"))),
        }
    }

    /// The member's state of `pool`, opened on first use: the definition
    /// comes over REST, and the session checks it is the pool it knows.
    async fn pool(&self, pool: &str) -> Result<Arc<RemotePool>> {
        if let Some(rp) = lock(&self.inner.pools).get(pool) {
            return Ok(rp.clone());
        }
        let info = self.inner.client.pool(pool).await?;
        let opened = self
            .inner
            .link
            .call(
                Request::OpenPool(pb::OpenPool {
                    pool: pool.to_string(),
                }),
                CALL_TIMEOUT,
            )
            .await?;
        let Response::Pool(opened) = opened else {
            return Err(self.inner.link.protocol("not a pool"));
        };
        let spec = &info.record.spec;
        // Deleted and created again between the two reads.
        if opened.created_ms != info.record.created_ms || opened.block_size != spec.block_size {
            return Err(Error::Api {
                status: 409,
                code: "contention".into(),
                message: format!("pool '{pool}' changed while it was opened; try again"),
            });
        }
        let durability = spec.member_blocks.ok_or_else(|| {
            Error::InvalidInput(format!("pool '{pool}' is not a member-blocks pool"))
        })?;
        let (space, reserved) = spec
            .validate()
            .map_err(|e| Error::InvalidInput(format!("pool '{pool}': {e}")))?;
        let rp = Arc::new(RemotePool {
            name: pool.to_string(),
            space,
            reserved,
            block_size: spec.block_size,
            durability,
            owned: Mutex::new(Owned::default()),
            acquiring: tokio::sync::Mutex::new(()),
            commits: tokio::sync::Mutex::new(CommitLog::default()),
            closed: AtomicBool::new(false),
        });
        Ok(lock(&self.inner.pools)
            .entry(pool.to_string())
            .or_insert(rp)
            .clone())
    }

    /// Takes the next block in the background, so no request waits for it.
    fn prefetch(&self, rp: &Arc<RemotePool>) {
        if rp.acquiring.try_lock().is_err() {
            return; // one is on its way
        }
        let (inner, rp) = (self.inner.clone(), rp.clone());
        self.inner.runtime.spawn(async move {
            if let Err(e) = acquire(&inner, &rp).await {
                tracing::debug!(pool = %rp.name, "taking the next block: {e}");
            }
        });
    }
}

/// Takes one more block (unless another task just did).
async fn acquire(inner: &Inner, rp: &RemotePool) -> Result<()> {
    let _one = rp.acquiring.lock().await;
    if lock(&rp.owned).set.free() >= rp.low_water() {
        return Ok(());
    }
    inner.fenced()?;
    let request = Request::Acquire(pb::AcquireBlock {
        pool: rp.name.clone(),
    });
    let grant = match inner.link.call(request, CALL_TIMEOUT).await {
        Ok(Response::Granted(g)) => g,
        Ok(other) => return Err(inner.link.protocol(&format!("{other:?}"))),
        // Another block still has values: not exhausted yet.
        Err(e) if e.code() == "exhausted" && lock(&rp.owned).set.free() > 0 => return Ok(()),
        Err(e) => return Err(e),
    };
    let block = rp.granted_block(&grant, None)?;
    rp.adopt(&grant, block);
    Ok(())
}

/// Stores every change of the pool's blocks up to `seq` (or finds that a
/// commit running meanwhile did): one request for all the allocations and
/// releases waiting.
async fn commit(inner: &Inner, rp: &RemotePool, seq: u64) -> Result<()> {
    let mut commits = rp.commits.lock().await;
    match commits.outcome(seq) {
        Some(true) => return Ok(()),
        Some(false) => return Err(lost_write(&rp.name)),
        None => {}
    }
    let (upto, changes) = {
        let mut owned = lock(&rp.owned);
        (owned.seq, std::mem::take(&mut owned.changes))
    };
    let request = Request::Commit(pb::CommitBlocks {
        pool: rp.name.clone(),
        changes: changes
            .iter()
            .map(|(&block, offsets)| pb::BlockChanges {
                block,
                allocated: offsets
                    .iter()
                    .filter(|(_, &a)| a)
                    .map(|(&o, _)| o)
                    .collect(),
                released: offsets
                    .iter()
                    .filter(|(_, &a)| !a)
                    .map(|(&o, _)| o)
                    .collect(),
            })
            .collect(),
    });
    let outcome = inner.link.call(request, CALL_TIMEOUT).await;
    if matches!(&outcome, Err(Error::Transport { .. })) {
        // No answer: the server may have stored the changes or not, and the
        // next commit sends differences from what it has. Only a new session
        // can tell, so this one ends here (the member stops; join again).
        inner.fence.lose();
        inner.link.end("a commit went unanswered");
    }
    let lost = match &outcome {
        Ok(Response::Committed(r)) => r.lost.clone(),
        _ => Vec::new(),
    };
    let stored = matches!(&outcome, Ok(Response::Committed(_))) && lost.is_empty();
    commits.record(upto, stored);
    if stored {
        return Ok(());
    }
    {
        // Not stored: the changes wait for the next commit (which sends the
        // difference from what the server has), except those of lost blocks.
        let mut owned = lock(&rp.owned);
        for block in &lost {
            tracing::warn!(pool = %rp.name, block, "block taken over by another member");
            owned.remove_block(*block);
        }
        owned.restore(changes);
    }
    drop(commits);
    match outcome {
        Ok(Response::Committed(_)) => Err(lost_write(&rp.name)),
        Ok(other) => Err(inner.link.protocol(&format!("{other:?}"))),
        Err(e) => {
            if e.code() == "fenced" {
                inner.fence.lose();
            }
            Err(e)
        }
    }
}

fn lost_write(pool: &str) -> Error {
    Error::Api {
        status: 409,
        code: "fenced".into(),
        message: format!(
            "pool '{pool}': a block of this member was taken over; the value was not allocated"
        ),
    }
}
