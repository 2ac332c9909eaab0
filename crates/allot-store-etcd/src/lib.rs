//! The etcd backend of allot's [`Store`]: several allot servers share one
//! etcd cluster, which provides the store's model natively.
//!
//! Semantics are those of the trait (and of the in-memory reference
//! backend); the conformance suite of `allot-store` runs against this
//! backend. How they map onto etcd:
//!
//! - **Revisions** are etcd's: an empty etcd is at revision 1 and every
//!   writing transaction takes the next one. etcd's revision is cluster-wide,
//!   so writes of other namespaces (or other programs) on the same etcd
//!   advance it too: revisions grow, with gaps, never backwards.
//! - **Transactions** are native etcd transactions (compares, then puts,
//!   deletes and ranges), atomic and serializable by etcd itself. etcd
//!   refuses a transaction branch that writes one key twice (a put after a
//!   put or a delete of the same key, or a put inside a deleted range); such
//!   transactions, and a few edge cases with no etcd spelling (empty keys,
//!   inverted ranges, lease ids beyond etcd's range), are evaluated here by
//!   the shared evaluator on a snapshot and committed with a guarded etcd
//!   transaction, retried if anything they read changed (see the `txn`
//!   module for what differs there).
//! - **Leases** are etcd leases: etcd deletes the keys of an expired or
//!   revoked lease in one revision. TTLs are whole seconds (rounded up).
//! - **Watch** is an etcd watch from the requested revision; a compacted
//!   start ends with [`StoreError::Compacted`].
//! - **History** is bounded as for the other backends, by etcd compaction
//!   (see the `history` module); etcd compaction is cluster-wide.
//! - **Outages**: every call is bounded by [`EtcdOptions::request_timeout`]
//!   and fails with [`StoreError::Unavailable`]; the client's channel
//!   reconnects by itself when etcd is back.
//!
//! Every key is stored under [`EtcdOptions::namespace`], so that several
//! deployments (or tests) can share one etcd; the prefix never shows in keys
//! returned by the store.
//!
//! Run etcd with `--max-txn-ops` raised above its default of 128 if
//! transactions may hold more operations (the conformance suite writes 1,001
//! keys in one transaction); a larger transaction fails with
//! [`StoreError::Invalid`].

mod error;
mod history;
#[cfg(feature = "testing")]
pub mod testing;
mod txn;
mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use allot_store::{
    KeyValue, LeaseId, Prefixes, RangeResult, Revision, Store, StoreError, Txn, TxnResponse,
    WatchStream,
};
use async_trait::async_trait;
use etcd_client::{Client, CompactionOptions, ConnectOptions, GetOptions};

use crate::error::EtcdError;
use crate::history::History;

/// How a [`EtcdStore`] connects and how much history it keeps.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Prefix of every key this store writes (default `allot/`), so that
    /// several deployments or tests can share one etcd. Keys are prefixed on
    /// the way in and stripped on the way out (ranges, transactions, watch
    /// events). Two stores see each other's data exactly when their
    /// namespaces are equal; a namespace that is a prefix of another one
    /// would see the other's keys, so use a separator such as `/` at the end.
    pub namespace: String,
    /// Bound on every call (default 5 s): past it the call fails with
    /// [`StoreError::Unavailable`] instead of hanging while etcd is down or
    /// has no leader.
    pub request_timeout: Duration,
    /// Bound on opening a TCP connection to an endpoint (default 3 s), and on
    /// the first round trip of [`EtcdStore::connect`].
    pub connect_timeout: Duration,
    /// How many of the latest revisions of history are kept for watches to
    /// replay (default 100,000); older ones are compacted in chunks of up to a
    /// tenth of this (at most 1,000 revisions). etcd compaction is
    /// cluster-wide: deployments sharing an etcd should agree on this.
    pub history_revisions: u64,
    /// The most events of history kept (default 1,000,000): once exceeded,
    /// whole revisions are compacted from the oldest on until at most nine
    /// tenths remain; the newest revision is always kept. Counted over the
    /// writes of this process (see the `history` module).
    pub history_events: u64,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            namespace: "allot/".into(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            history_revisions: 100_000,
            history_events: 1_000_000,
        }
    }
}

/// A [`Store`] in an etcd cluster.
///
/// Cloning is cheap and every clone shares one connection. When the last
/// clone is dropped, open watch streams end with
/// [`StoreError::Unavailable`]; leases live on in etcd until they expire.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("namespace", &String::from_utf8_lossy(&self.inner.ns.prefix))
            .finish()
    }
}

pub(crate) struct Inner {
    client: Client,
    ns: Namespace,
    timeout: Duration,
    history: History,
    /// Never sent on: dropped with the last handle, which ends every watch
    /// stream (they hold receivers, not the store).
    closed: tokio::sync::watch::Sender<()>,
}

impl Inner {
    /// Runs one etcd call within the request timeout.
    pub(crate) async fn timed<T>(
        &self,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(EtcdError::Client),
            Err(_) => Err(EtcdError::Timeout(self.timeout)),
        }
    }

    pub(crate) fn kv(&self) -> etcd_client::KvClient {
        self.client.kv_client()
    }

    /// The current revision (one cheap round trip).
    pub(crate) async fn current_revision(&self) -> Result<Revision, EtcdError> {
        let options = GetOptions::new().with_count_only();
        let resp = self
            .timed(self.kv().get(self.ns.range_start(b""), Some(options)))
            .await?;
        Ok(header_revision(resp.header()))
    }

    /// Discards history before `revision` (the store's oldest retained
    /// revision from then on); etcd's own "already compacted" answer counts
    /// as success.
    ///
    /// etcd is compacted to `revision - 1`, not `revision`: etcd 3.4 (at
    /// least up to 3.4.23, which Debian ships) drops the deletions made *at*
    /// its compaction revision, so a watch from there would miss them. The
    /// store's oldest retained revision is therefore etcd's compaction
    /// revision plus one (see the `watch` module).
    pub(crate) async fn compact_to(&self, revision: Revision) -> Result<(), EtcdError> {
        let Ok(rev) = i64::try_from(revision) else {
            return Ok(());
        };
        if rev < 2 {
            return Ok(());
        }
        match self
            .timed(self.kv().compact(rev - 1, Some(CompactionOptions::new())))
            .await
        {
            Ok(_) => {
                self.history.compacted(revision);
                Ok(())
            }
            Err(e) if e.is_compacted() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Applies the history bounds after a write at `revision` with `events`
    /// events. A failed compaction does not fail the write: the next write
    /// tries again.
    pub(crate) async fn after_write(&self, revision: Revision, events: u64) {
        if let Some(target) = self.history.record(revision, events) {
            if let Err(err) = self.compact_to(target).await {
                tracing::warn!(%err, target, "compacting etcd history failed");
            }
        }
    }
}

/// The revision in a response header (0 if the server sent none).
pub(crate) fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Revision {
    header.map_or(0, |h| to_u64(h.revision()))
}

/// etcd's signed numbers are never negative for what this backend reads.
pub(crate) fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The key prefix of one store, and how keys and ranges translate.
#[derive(Debug, Clone)]
pub(crate) struct Namespace {
    pub(crate) prefix: Vec<u8>,
    /// The exclusive end of the namespace, in etcd's spelling (`\0` =
    /// unbounded, for an empty namespace).
    end: Vec<u8>,
}

impl Namespace {
    fn new(prefix: &[u8]) -> Self {
        Self {
            prefix: prefix.to_vec(),
            end: etcd_end(allot_store::prefix_end(prefix)),
        }
    }

    /// The etcd key of a (non-empty) store key.
    pub(crate) fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + key.len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(key);
        k
    }

    /// The etcd start of the range `[start, ..)` (etcd has no empty key:
    /// `\0` is the smallest one).
    pub(crate) fn range_start(&self, start: &[u8]) -> Vec<u8> {
        let k = self.key(start);
        if k.is_empty() {
            vec![0]
        } else {
            k
        }
    }

    /// The etcd end of the range `[.., end)` (`end` empty = to the end of
    /// the namespace).
    pub(crate) fn range_end(&self, end: &[u8]) -> Vec<u8> {
        if end.is_empty() {
            self.end.clone()
        } else {
            self.key(end)
        }
    }

    /// A key as etcd reports it, without the prefix (`None` for a key
    /// outside the namespace, which a well-formed request never returns).
    pub(crate) fn strip<'k>(&self, key: &'k [u8]) -> Option<&'k [u8]> {
        key.strip_prefix(self.prefix.as_slice())
    }

    pub(crate) fn kv(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
        let key = self.strip(kv.key()).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "etcd returned key {:?} outside the namespace",
                String::from_utf8_lossy(kv.key())
            ))
        })?;
        Ok(KeyValue {
            key: key.to_vec(),
            value: kv.value().to_vec(),
            create_revision: to_u64(kv.create_revision()),
            mod_revision: to_u64(kv.mod_revision()),
            version: to_u64(kv.version()),
            lease: to_u64(kv.lease()),
        })
    }
}

/// etcd spells "no upper bound" as `\0`, not as an empty range end (which
/// means "this one key").
fn etcd_end(end: Vec<u8>) -> Vec<u8> {
    if end.is_empty() {
        vec![0]
    } else {
        end
    }
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (`host:port` or
    /// `http://host:port`; TLS is not supported yet) and checks that it
    /// answers.
    ///
    /// Must be called within a tokio runtime. Fails with
    /// [`StoreError::Unavailable`] if etcd does not answer within the
    /// connect timeout plus the request timeout, and
    /// [`StoreError::Invalid`] for bad endpoints or options.
    pub async fn connect(endpoints: &[String], options: EtcdOptions) -> Result<Self, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Invalid("no etcd endpoints given".into()));
        }
        if options.request_timeout.is_zero() || options.connect_timeout.is_zero() {
            return Err(StoreError::Invalid(
                "request and connect timeouts must be positive".into(),
            ));
        }
        let connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            // HTTP/2 pings find a silently vanished server (a watch would
            // otherwise wait forever); etcd refuses pings more often than
            // every 5 s by default.
            .with_keep_alive(Duration::from_secs(10), options.request_timeout)
            .with_keep_alive_while_idle(true)
            // Calls fail (and are retried by the caller) rather than being
            // answered by a member cut off from the cluster.
            .with_require_leader(true);
        // The client connects lazily: this only validates the endpoints.
        let client = Client::connect(endpoints, Some(connect))
            .await
            .map_err(|e| StoreError::from(EtcdError::Client(e)))?;
        let (closed, _) = tokio::sync::watch::channel(());
        let inner = Inner {
            client,
            ns: Namespace::new(options.namespace.as_bytes()),
            timeout: options.request_timeout,
            history: History::new(options.history_revisions, options.history_events),
            closed,
        };
        // The first round trip opens the connection: bounded by both.
        tokio::time::timeout(
            options.connect_timeout + options.request_timeout,
            inner.current_revision(),
        )
        .await
        .map_err(|_| EtcdError::Timeout(options.connect_timeout + options.request_timeout))
        .and_then(|r| r)?;
        Ok(EtcdStore {
            inner: Arc::new(inner),
        })
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        if key.is_empty() {
            // No store key is empty (puts refuse it).
            return Ok(None);
        }
        let inner = &self.inner;
        let resp = inner.timed(inner.kv().get(inner.ns.key(key), None)).await?;
        resp.kvs().first().map(|kv| inner.ns.kv(kv)).transpose()
    }

    async fn range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<RangeResult, StoreError> {
        let inner = &self.inner;
        if !end.is_empty() && start >= end {
            return Ok(RangeResult {
                kvs: Vec::new(),
                more: false,
                revision: inner.current_revision().await?,
            });
        }
        let mut options = GetOptions::new().with_range(inner.ns.range_end(end));
        if limit > 0 {
            options = options.with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        }
        let resp = inner
            .timed(inner.kv().get(inner.ns.range_start(start), Some(options)))
            .await?;
        let kvs = resp
            .kvs()
            .iter()
            .map(|kv| inner.ns.kv(kv))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RangeResult {
            kvs,
            more: resp.more(),
            revision: header_revision(resp.header()),
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        txn::run(&self.inner, &txn).await
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        Ok(self.inner.current_revision().await?)
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("lease TTL must be positive".into()));
        }
        // etcd counts whole seconds: round up, so a lease never lives
        // shorter than asked.
        let secs = ttl.as_nanos().div_ceil(1_000_000_000);
        let secs = i64::try_from(secs).unwrap_or(i64::MAX);
        let inner = &self.inner;
        let mut lease = inner.client.lease_client();
        let resp = inner.timed(lease.grant(secs, None)).await?;
        if !resp.error().is_empty() {
            return Err(StoreError::Backend(format!(
                "etcd refused a lease: {}",
                resp.error()
            )));
        }
        Ok(to_u64(resp.id()))
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let Ok(id) = i64::try_from(lease) else {
            return Err(StoreError::LeaseNotFound(lease));
        };
        if id == 0 {
            return Err(StoreError::LeaseNotFound(lease));
        }
        let inner = &self.inner;
        let mut client = inner.client.lease_client();
        // One renewal on a keep-alive stream of its own; etcd answers with
        // the lease's TTL, or 0 if it no longer exists.
        let renewed = inner
            .timed(async {
                let (mut keeper, mut stream) = client.keep_alive(id).await?;
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await;
        match renewed {
            Ok(Some(resp)) if resp.ttl() > 0 => Ok(Duration::from_secs(to_u64(resp.ttl()))),
            Ok(_) => Err(StoreError::LeaseNotFound(lease)),
            Err(e) if e.is_lease_not_found() => Err(StoreError::LeaseNotFound(lease)),
            Err(e) => Err(e.into()),
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let Ok(id) = i64::try_from(lease) else {
            return Err(StoreError::LeaseNotFound(lease));
        };
        let inner = &self.inner;
        let mut client = inner.client.lease_client();
        match inner.timed(client.revoke(id)).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_lease_not_found() => Err(StoreError::LeaseNotFound(lease)),
            Err(e) => Err(e.into()),
        }
    }

    async fn watch_prefixes(
        &self,
        prefixes: &Prefixes,
        from: Revision,
    ) -> Result<WatchStream, StoreError> {
        watch::start(&self.inner, prefixes, from).await
    }

    async fn watch_each(
        &self,
        prefixes: &Prefixes,
        from: Revision,
    ) -> Result<WatchStream, StoreError> {
        let mut streams = Vec::new();
        for prefix in prefixes.iter() {
            streams.push(watch::start(&self.inner, &Prefixes::one(prefix), from).await?);
        }
        Ok(Box::pin(futures::stream::select_all(streams)))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let inner = &self.inner;
        if revision == 0 {
            return Ok(());
        }
        // etcd would accept `current + 1` (it compacts one below, see
        // `compact_to`): the bound is checked here.
        let current = inner.current_revision().await?;
        if revision > current {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current,
            });
        }
        match inner.compact_to(revision).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_future_revision() => Err(StoreError::FutureRevision {
                requested: revision,
                current: inner.current_revision().await?,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// No: concurrent requests race to etcd's raft log, so a transaction
    /// sent right after another may commit first (and fail its compares).
    fn keeps_write_order(&self) -> bool {
        false
    }

    fn is_shared(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_translates_keys_and_ranges() {
        let ns = Namespace::new(b"app/");
        assert_eq!(ns.key(b"k"), b"app/k");
        assert_eq!(ns.range_start(b""), b"app/");
        assert_eq!(ns.range_end(b""), b"app0");
        assert_eq!(ns.range_end(b"x"), b"app/x");
        // The range of a prefix, as watches ask for it.
        assert_eq!(ns.range_end(&allot_store::prefix_end(b"p/")), b"app/p0");
        assert_eq!(ns.range_end(&allot_store::prefix_end(b"\xff")), b"app0");
        assert_eq!(ns.strip(b"app/k"), Some(&b"k"[..]));
        assert_eq!(ns.strip(b"other"), None);

        let bare = Namespace::new(b"");
        assert_eq!(bare.range_start(b""), vec![0]);
        assert_eq!(bare.range_end(b""), vec![0]);
        assert_eq!(bare.range_end(&allot_store::prefix_end(b"")), vec![0]);
        assert_eq!(bare.range_end(&allot_store::prefix_end(b"a")), b"b");
    }
}
