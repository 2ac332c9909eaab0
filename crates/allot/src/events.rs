//! The change stream: every transaction that changes a pool also rewrites
//! the pool's change record `e/{pool}`, so a store watch on `e/` yields
//! exactly one [`Event`] per revision, in order. Resuming after a disconnect
//! is watching again from the last revision seen + 1; history older than the
//! store keeps fails with [`Error::Store`]`(StoreError::Compacted)`.

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use allot_store::{EventKind as StoreEventKind, Revision, StoreError};

use crate::error::{Error, Result};
use std::collections::HashMap;

use crate::members::MemberRecord;
use crate::{decode_json, keys, Allot};

/// One claimed or released value, as carried by events (no metadata: events
/// stay small; look the claim up for it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventClaim {
    pub value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// What changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Change {
    PoolCreated {
        pool: String,
        description: String,
    },
    PoolDeleted {
        pool: String,
    },
    /// Values allocated and released by one transaction.
    Claims {
        pool: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        allocated: Vec<EventClaim>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        released: Vec<EventClaim>,
    },
    ResyncBegun {
        pool: String,
        owner: Option<String>,
    },
    ResyncEnded {
        pool: String,
        owner: Option<String>,
        released: u64,
    },
    /// A member joined (a new incarnation of its name).
    MemberUp {
        member: String,
        incarnation: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        address: Option<String>,
    },
    /// A member's lease ended: it left, or expired (its blocks are orphans
    /// until live members take them over). The incarnation is known when
    /// the stream saw it join.
    MemberDown {
        member: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        incarnation: Option<u64>,
    },
}

/// A change with the store revision it happened at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub revision: Revision,
    #[serde(flatten)]
    pub change: Change,
}

impl Allot {
    /// Streams every change from `from` on (0: only changes from now).
    ///
    /// ```
    /// # use futures::StreamExt;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use allot::{Allot, AllocRequest, Change, PoolKind, PoolSpec};
    /// let allot = Allot::new(std::sync::Arc::new(allot_store::MemoryStore::new()));
    /// let mut events = allot.watch(1).await.unwrap();
    /// allot.create_pool("ids", PoolSpec::new(PoolKind::Range { lo: 1, hi: 9 }), Default::default()).await.unwrap();
    /// allot.allocate("ids", AllocRequest::one()).await.unwrap();
    /// let created = events.next().await.unwrap().unwrap();
    /// assert!(matches!(created.change, Change::PoolCreated { .. }));
    /// let claimed = events.next().await.unwrap().unwrap();
    /// assert!(matches!(claimed.change, Change::Claims { ref allocated, .. } if allocated[0].value == "1"));
    /// # });
    /// ```
    pub async fn watch(
        &self,
        from: Revision,
    ) -> Result<futures::stream::BoxStream<'static, Result<Event>>> {
        // One watch of both prefixes, so pool changes and member changes
        // come in one revision order.
        let prefixes = allot_store::Prefixes::new([keys::EVENTS_PREFIX, keys::MEMBERS_PREFIX]);
        let inner = self.store().watch_prefixes(&prefixes, from).await?;
        let mut incarnations: HashMap<String, u64> = HashMap::new();
        Ok(inner
            .filter_map(move |item| {
                let event = match item {
                    Ok(ev) => to_event(&ev, &mut incarnations),
                    Err(e) => Some(Err(Error::Store(e))),
                };
                std::future::ready(event)
            })
            .boxed())
    }
}

/// The change a store event stands for, if any: a pool's change record, or
/// a member record appearing or going.
fn to_event(
    ev: &allot_store::Event,
    incarnations: &mut HashMap<String, u64>,
) -> Option<Result<Event>> {
    let key = &ev.kv.key;
    let revision = ev.kv.mod_revision;
    let put = ev.kind == StoreEventKind::Put;
    if key.starts_with(keys::EVENTS_PREFIX) {
        // Change records are never deleted; nothing to report then.
        return put.then(|| {
            decode_json::<Change>("change record", &ev.kv.value)
                .map(|change| Event { revision, change })
        });
    }
    let name = std::str::from_utf8(key.strip_prefix(keys::MEMBERS_PREFIX)?).ok()?;
    let change = if put {
        let record: MemberRecord = match decode_json("member record", &ev.kv.value) {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        incarnations.insert(name.to_string(), record.incarnation);
        Change::MemberUp {
            member: record.name,
            incarnation: record.incarnation,
            address: record.address,
        }
    } else {
        Change::MemberDown {
            member: name.to_string(),
            incarnation: incarnations.remove(name),
        }
    };
    Some(Ok(Event { revision, change }))
}

/// Whether a watch failed because the requested history is gone.
pub fn is_compacted(e: &Error) -> bool {
    matches!(e, Error::Store(StoreError::Compacted { .. }))
}
