//! Request, answer and stored record types of the engine.

use std::collections::BTreeMap;

use allot_core::{PoolSpec, PoolStats};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Longest accepted pool name, claim key and owner tag.
pub const MAX_NAME_LEN: usize = 128;
pub const MAX_KEY_LEN: usize = 1024;
pub const MAX_OWNER_LEN: usize = 256;
/// Largest JSON metadata document on one claim.
pub const MAX_META_BYTES: usize = 64 * 1024;
/// Most values one all-or-nothing request may claim.
pub const MAX_BULK: u64 = 100_000;

/// A pool as stored: its spec plus descriptive fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub name: String,
    pub spec: PoolSpec,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub created_ms: u64,
    /// The claimed value of another pool this pool was carved from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
}

/// A claimed value of another pool that holds a nested pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentRef {
    pub pool: String,
    pub value: String,
}

/// What a claimed value carries beyond its bit. Stored only for claims that
/// have a key, owner or metadata, or span several units (prefixes), so bare
/// allocations cost one bit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClaimRecord {
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub units: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Value>,
    pub claimed_ms: u64,
}

fn one() -> u64 {
    1
}
fn is_one(n: &u64) -> bool {
    *n == 1
}

/// Where a key points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub offset: u64,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub units: u64,
}

/// An open mark-and-sweep pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncRecord {
    pub owner: Option<String>,
    pub started_ms: u64,
}

/// One claimed value as returned to callers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    /// Canonical text: decimal integer, IP address, CIDR prefix or set string.
    pub value: String,
    pub key: Option<String>,
    pub owner: Option<String>,
    pub meta: Option<serde_json::Value>,
    /// Marked by an open resync and not re-claimed yet.
    pub stale: bool,
}

/// A request to allocate.
///
/// ```
/// use allot::AllocRequest;
/// let r = AllocRequest::key("vrf:blue").owner("agent-1");
/// assert_eq!(r.count, 1);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocRequest {
    /// How many values, all or nothing (1 unless bulk).
    #[serde(default = "one")]
    pub count: u64,
    /// A specific value to claim instead of letting the strategy choose.
    #[serde(default)]
    pub value: Option<String>,
    /// Bind the claim to this key: repeating the request returns the same value.
    #[serde(default)]
    pub key: Option<String>,
    /// Prefix pools: the length to hand out instead of the pool's default.
    #[serde(default)]
    pub prefix_len: Option<u8>,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub meta: Option<serde_json::Value>,
    /// An idempotency key: repeating a request with the same id (within
    /// about an hour) returns the first answer and allocates nothing more.
    #[serde(default)]
    pub request_id: Option<String>,
}

impl Default for AllocRequest {
    fn default() -> Self {
        AllocRequest {
            count: 1,
            value: None,
            key: None,
            prefix_len: None,
            owner: None,
            meta: None,
            request_id: None,
        }
    }
}

impl AllocRequest {
    /// One value chosen by the pool's strategy.
    pub fn one() -> Self {
        Self::default()
    }
    /// `n` values, all or nothing.
    pub fn many(n: u64) -> Self {
        AllocRequest {
            count: n,
            ..Self::default()
        }
    }
    /// A claim bound to `key` (idempotent).
    pub fn key(key: impl Into<String>) -> Self {
        AllocRequest {
            key: Some(key.into()),
            ..Self::default()
        }
    }
    /// Exactly this value.
    pub fn value(v: impl Into<String>) -> Self {
        AllocRequest {
            value: Some(v.into()),
            ..Self::default()
        }
    }
    pub fn with_value(mut self, v: impl Into<String>) -> Self {
        self.value = Some(v.into());
        self
    }
    pub fn owner(mut self, o: impl Into<String>) -> Self {
        self.owner = Some(o.into());
        self
    }
    pub fn meta(mut self, m: serde_json::Value) -> Self {
        self.meta = Some(m);
        self
    }
    pub fn prefix_len(mut self, l: u8) -> Self {
        self.prefix_len = Some(l);
        self
    }
    /// Makes the request idempotent under `id`.
    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(id.into());
        self
    }

    /// Checks everything that does not depend on the pool's state.
    pub fn validate(&self) -> Result<()> {
        if self.count == 0 {
            return Err(Error::InvalidInput("count must be at least 1".into()));
        }
        if self.count > MAX_BULK {
            return Err(Error::InvalidInput(format!(
                "count {} is above the limit of {MAX_BULK} per request",
                self.count
            )));
        }
        if self.count > 1 && self.key.is_some() {
            return Err(Error::InvalidInput(
                "a key claims exactly one value; it cannot be combined with a count above 1".into(),
            ));
        }
        if self.count > 1 && self.value.is_some() {
            return Err(Error::InvalidInput(
                "a requested value is one value; it cannot be combined with a count above 1".into(),
            ));
        }
        if let Some(k) = &self.key {
            check_text("key", k, MAX_KEY_LEN)?;
        }
        if let Some(o) = &self.owner {
            check_text("owner", o, MAX_OWNER_LEN)?;
        }
        if let Some(id) = &self.request_id {
            check_text("request id", id, MAX_OWNER_LEN)?;
        }
        if let Some(m) = &self.meta {
            let size = serde_json::to_vec(m).map(|v| v.len()).unwrap_or(usize::MAX);
            if size > MAX_META_BYTES {
                return Err(Error::InvalidInput(format!(
                    "metadata is {size} bytes; the limit is {MAX_META_BYTES}"
                )));
            }
        }
        Ok(())
    }
}

pub(crate) fn check_text(what: &str, s: &str, max: usize) -> Result<()> {
    if s.is_empty() {
        return Err(Error::InvalidInput(format!("{what} must not be empty")));
    }
    if s.len() > max {
        return Err(Error::InvalidInput(format!(
            "{what} is {} bytes long; the limit is {max}",
            s.len()
        )));
    }
    if s.chars().any(char::is_control) {
        return Err(Error::InvalidInput(format!(
            "{what} must not contain control characters"
        )));
    }
    Ok(())
}

/// Checks a pool name: 1-128 of `A-Z a-z 0-9 . _ -`.
pub fn validate_pool_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "invalid pool name '{name}': use 1-{MAX_NAME_LEN} characters from A-Z a-z 0-9 . _ -"
        )))
    }
}

/// Addresses one claim: by its value or by its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Value(String),
    Key(String),
}

/// A pool with its live counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolInfo {
    #[serde(flatten)]
    pub record: PoolRecord,
    /// Human description of the kind, e.g. "addresses of 10.0.0.0/24".
    pub description: String,
    pub stats: PoolStats,
    pub utilization: f64,
}

/// One page of claims, in value order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimPage {
    pub claims: Vec<Claim>,
    /// Pass as `after` to get the next page; None on the last page.
    pub next: Option<String>,
}

/// What an open or closed resync covered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResyncReport {
    pub pool: String,
    pub owner: Option<String>,
    /// `begin`: keyed claims now marked stale. `end`: claims released.
    pub count: u64,
    /// `end` only: the released claims.
    pub released: Vec<Claim>,
}
