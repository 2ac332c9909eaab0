//! Plain data types of the store contract.

use serde::{Deserialize, Serialize};

/// A store-wide revision: grows by one with every transaction that writes.
pub type Revision = u64;

/// A lease handle; 0 means "no lease".
pub type LeaseId = u64;

/// One key with its value and bookkeeping, as etcd reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// Revision of the write that created the key (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// Number of writes since creation (1 after the first put).
    pub version: u64,
    /// The lease the key is attached to (0 = none).
    pub lease: LeaseId,
}

/// The answer to [`crate::Store::range`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// True when `limit` cut the result short.
    pub more: bool,
    /// The revision of the snapshot the range was read from.
    pub revision: Revision,
}

/// A condition on one key, evaluated inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: Vec<u8>,
    pub target: CompareTarget,
}

/// What a [`Compare`] checks. A missing key has version, create and mod
/// revision 0 and no value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    /// `version == n` (0 means "the key does not exist").
    Version(u64),
    /// `mod_revision == r` (0 means "the key does not exist").
    ModRevision(Revision),
    /// `create_revision == r`.
    CreateRevision(Revision),
    /// The value equals these bytes (false if the key is missing).
    Value(Vec<u8>),
}

impl Compare {
    /// The key does not exist.
    pub fn absent(key: impl AsRef<[u8]>) -> Self {
        Self {
            key: key.as_ref().to_vec(),
            target: CompareTarget::Version(0),
        }
    }
    /// The key exists and was last written at `rev` (optimistic locking).
    pub fn mod_revision(key: impl AsRef<[u8]>, rev: Revision) -> Self {
        Self {
            key: key.as_ref().to_vec(),
            target: CompareTarget::ModRevision(rev),
        }
    }
    /// The key has this version (0 = absent).
    pub fn version(key: impl AsRef<[u8]>, version: u64) -> Self {
        Self {
            key: key.as_ref().to_vec(),
            target: CompareTarget::Version(version),
        }
    }
    /// The key was created at `rev`.
    pub fn create_revision(key: impl AsRef<[u8]>, rev: Revision) -> Self {
        Self {
            key: key.as_ref().to_vec(),
            target: CompareTarget::CreateRevision(rev),
        }
    }
    /// The key holds exactly `value`.
    pub fn value(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        Self {
            key: key.as_ref().to_vec(),
            target: CompareTarget::Value(value.as_ref().to_vec()),
        }
    }
}

/// One operation inside a transaction branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Writes a key, attached to `lease` (0 = none). Putting to an expired or
    /// unknown lease fails the whole call with [`crate::StoreError::LeaseNotFound`].
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: LeaseId,
    },
    /// Deletes one key (no-op if absent).
    Delete { key: Vec<u8> },
    /// Deletes every key in `[start, end)` (`end` empty = to the end of the keyspace).
    DeleteRange { start: Vec<u8>, end: Vec<u8> },
    /// Reads one key as of this point of the transaction.
    Get { key: Vec<u8> },
}

impl Op {
    pub fn put(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        Op::Put {
            key: key.as_ref().to_vec(),
            value: value.as_ref().to_vec(),
            lease: 0,
        }
    }
    pub fn put_with_lease(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>, lease: LeaseId) -> Self {
        Op::Put {
            key: key.as_ref().to_vec(),
            value: value.as_ref().to_vec(),
            lease,
        }
    }
    pub fn delete(key: impl AsRef<[u8]>) -> Self {
        Op::Delete {
            key: key.as_ref().to_vec(),
        }
    }
    /// Deletes every key starting with `prefix`.
    pub fn delete_prefix(prefix: impl AsRef<[u8]>) -> Self {
        Op::DeleteRange {
            start: prefix.as_ref().to_vec(),
            end: crate::prefix_end(prefix.as_ref()),
        }
    }
    pub fn get(key: impl AsRef<[u8]>) -> Self {
        Op::Get {
            key: key.as_ref().to_vec(),
        }
    }
}

/// An atomic compare-then-act transaction (etcd's `Txn`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds a compare (all must hold for `success` to run).
    pub fn when(mut self, c: Compare) -> Self {
        self.compare.push(c);
        self
    }
    /// Adds an operation to the success branch.
    pub fn then(mut self, op: Op) -> Self {
        self.success.push(op);
        self
    }
    /// Adds an operation to the failure branch.
    pub fn otherwise(mut self, op: Op) -> Self {
        self.failure.push(op);
        self
    }
    /// True if neither branch writes anything.
    pub fn is_read_only(&self) -> bool {
        self.success
            .iter()
            .chain(&self.failure)
            .all(|op| matches!(op, Op::Get { .. }))
    }
}

/// The outcome of one [`Op`] of the branch that ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    Put,
    /// How many keys were deleted.
    Delete(u64),
    Get(Option<KeyValue>),
}

/// The answer to [`crate::Store::txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether the compares held (and so the `success` branch ran).
    pub succeeded: bool,
    /// The store revision after the transaction: the revision of its writes
    /// if it wrote anything, else the current revision.
    pub revision: Revision,
    /// One result per operation of the branch that ran, in order.
    pub results: Vec<OpResult>,
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change, as streamed by [`crate::Store::watch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    /// For a put, the key as written; for a delete, the key with an empty
    /// value, `mod_revision` = the deleting revision and version 0.
    pub kv: KeyValue,
}

impl Event {
    /// The revision at which this change happened.
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// The keys one watch follows: every key under any of a few prefixes, as
/// one stream in revision order ([`crate::Store::watch_prefixes`]).
///
/// Kept sorted, without a prefix that another one already covers, so
/// backends can turn it into key ranges directly.
///
/// ```
/// use allot_store::Prefixes;
/// let p = Prefixes::new([b"m/".as_slice(), b"e/", b"e/x"]);
/// assert!(p.matches(b"e/pool") && p.matches(b"m/a") && !p.matches(b"b/pool"));
/// assert_eq!(p.iter().collect::<Vec<_>>(), [b"e/".as_slice(), b"m/"]);
/// // The smallest single range holding both (what etcd watches).
/// assert_eq!(p.covering(), (b"e/".to_vec(), b"m0".to_vec()));
/// assert!(Prefixes::new([b"".as_slice(), b"e/"]).matches(b"anything"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefixes(Vec<Vec<u8>>);

impl Prefixes {
    /// The keys under any of `prefixes` (none: no key at all).
    pub fn new<P: AsRef<[u8]>>(prefixes: impl IntoIterator<Item = P>) -> Prefixes {
        let mut all: Vec<Vec<u8>> = prefixes.into_iter().map(|p| p.as_ref().to_vec()).collect();
        all.sort();
        let mut kept: Vec<Vec<u8>> = Vec::with_capacity(all.len());
        for p in all {
            // Sorted, so a prefix of `p` comes before it.
            if !kept.last().is_some_and(|k| p.starts_with(k)) {
                kept.push(p);
            }
        }
        Prefixes(kept)
    }

    /// The keys under `prefix`.
    pub fn one(prefix: &[u8]) -> Prefixes {
        Prefixes(vec![prefix.to_vec()])
    }

    pub fn matches(&self, key: &[u8]) -> bool {
        self.0.iter().any(|p| key.starts_with(p))
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.0.iter().map(Vec::as_slice)
    }

    /// The smallest range `[start, end)` holding every key matched (`end`
    /// empty: to the end of the keyspace), for a backend that can watch
    /// only one range; it may hold other keys too, which the backend must
    /// then filter out.
    pub fn covering(&self) -> (Vec<u8>, Vec<u8>) {
        match (self.0.first(), self.0.last()) {
            (Some(first), Some(last)) => (first.clone(), crate::prefix_end(last)),
            // Nothing matches: the range of the one key `\0` (an empty
            // end would mean "unbounded" to etcd), which `matches` drops.
            _ => (vec![0], vec![0, 0]),
        }
    }
}
