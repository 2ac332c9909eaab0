//! Transaction evaluation shared by every backend.
//!
//! A transaction is evaluated against a read view plus a private overlay of
//! its own writes, so that a failing transaction (a dead lease, an invalid
//! key) leaves the view untouched and the backend only has to persist the
//! resulting [`Applied::changes`] when evaluation succeeded. Backends differ
//! only in how they read keys and how they persist the outcome.

use std::collections::BTreeMap;

use crate::{
    CompareTarget, Event, EventKind, KeyValue, LeaseId, Op, OpResult, Revision, StoreError, Txn,
    TxnResponse,
};

/// Read access to the committed key space a transaction is evaluated against.
pub trait KvRead {
    /// Reads one key.
    fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError>;
    /// Every key in `[start, end)` (`end` empty = unbounded), in key order.
    fn scan(&self, start: &[u8], end: &[u8]) -> Result<Vec<KeyValue>, StoreError>;

    /// Whether the key's record satisfies `target` (see [`compare_holds`]).
    /// A backend holding records in memory overrides it to compare in
    /// place instead of copying the record (a whole block's value) out.
    fn holds(&self, key: &[u8], target: &CompareTarget) -> Result<bool, StoreError> {
        Ok(compare_holds(self.get(key)?.as_ref(), target))
    }

    /// The key's bookkeeping without its value: all a write needs to know
    /// of the record it replaces. Overridden like [`KvRead::holds`].
    fn head(&self, key: &[u8]) -> Result<Option<Head>, StoreError> {
        Ok(self.get(key)?.as_ref().map(Head::of))
    }
}

/// What a write needs of the record it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub create_revision: Revision,
    pub version: u64,
    pub lease: LeaseId,
}

impl Head {
    pub fn of(kv: &KeyValue) -> Head {
        Head {
            create_revision: kv.create_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }
}

/// The final state of one key a transaction wrote.
#[derive(Debug)]
pub struct Change {
    pub key: Vec<u8>,
    /// The lease the key was attached to before the transaction (0 = none),
    /// so the backend can detach it from that lease's key set.
    pub prev_lease: LeaseId,
    /// The new record, or `None` if the key ends up deleted.
    pub new: Option<KeyValue>,
}

/// The outcome of evaluating a transaction.
#[derive(Debug)]
pub struct Applied {
    pub response: TxnResponse,
    /// Every key written, in key order; empty when nothing was written (and
    /// then the revision must not be bumped).
    pub changes: Vec<Change>,
    /// The events of the write, in operation order.
    pub events: Vec<Event>,
}

impl Applied {
    /// The revision this transaction's writes take, if it wrote anything.
    pub fn write_revision(&self) -> Option<Revision> {
        (!self.events.is_empty()).then_some(self.response.revision)
    }
}

/// True if `key` lies in `[start, end)`, `end` empty meaning unbounded.
pub fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    key >= start && (end.is_empty() || key < end)
}

/// A key this transaction writes.
struct Slot {
    prev_lease: LeaseId,
    /// The key's bookkeeping as the transaction sees it (None: absent).
    head: Option<Head>,
    /// What the transaction wrote (None: deleted); meaningful once dirty,
    /// until then the view's record is current.
    current: Option<KeyValue>,
    dirty: bool,
}

struct Overlay<'v, V: KvRead + ?Sized> {
    view: &'v V,
    slots: BTreeMap<Vec<u8>, Slot>,
}

impl<V: KvRead + ?Sized> Overlay<'_, V> {
    fn slot(&mut self, key: &[u8]) -> Result<&mut Slot, StoreError> {
        if !self.slots.contains_key(key) {
            // The value it replaces is never read: only its bookkeeping.
            let head = self.view.head(key)?;
            self.slots.insert(
                key.to_vec(),
                Slot {
                    prev_lease: head.map_or(0, |h| h.lease),
                    head,
                    current: None,
                    dirty: false,
                },
            );
        }
        // Just inserted above if it was missing.
        self.slots
            .get_mut(key)
            .ok_or_else(|| StoreError::Backend("transaction overlay lost a key".into()))
    }

    fn current(&mut self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        match self.slots.get(key) {
            Some(slot) if slot.dirty => Ok(slot.current.clone()),
            _ => self.view.get(key),
        }
    }

    fn holds(&self, key: &[u8], target: &CompareTarget) -> Result<bool, StoreError> {
        match self.slots.get(key) {
            Some(slot) if slot.dirty => Ok(compare_holds(slot.current.as_ref(), target)),
            _ => self.view.holds(key, target),
        }
    }

    /// Keys in the range that currently exist, as seen by this transaction.
    fn existing_in_range(&mut self, start: &[u8], end: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut keys: BTreeMap<Vec<u8>, bool> = self
            .view
            .scan(start, end)?
            .into_iter()
            .map(|kv| (kv.key, true))
            .collect();
        for (key, slot) in &self.slots {
            if slot.dirty && in_range(key, start, end) {
                keys.insert(key.clone(), slot.current.is_some());
            }
        }
        Ok(keys
            .into_iter()
            .filter_map(|(k, exists)| exists.then_some(k))
            .collect())
    }

    fn delete(
        &mut self,
        key: &[u8],
        rev: Revision,
        events: &mut Vec<Event>,
    ) -> Result<u64, StoreError> {
        let slot = self.slot(key)?;
        if slot.head.take().is_none() {
            return Ok(0);
        }
        slot.current = None;
        slot.dirty = true;
        events.push(Event {
            kind: EventKind::Delete,
            kv: KeyValue {
                key: key.to_vec(),
                value: Vec::new(),
                create_revision: 0,
                mod_revision: rev,
                version: 0,
                lease: 0,
            },
        });
        Ok(1)
    }
}

/// Whether a record (None: absent) satisfies a compare.
pub fn compare_holds(current: Option<&KeyValue>, target: &CompareTarget) -> bool {
    match target {
        CompareTarget::Version(v) => current.map_or(0, |kv| kv.version) == *v,
        CompareTarget::ModRevision(r) => current.map_or(0, |kv| kv.mod_revision) == *r,
        CompareTarget::CreateRevision(r) => current.map_or(0, |kv| kv.create_revision) == *r,
        CompareTarget::Value(value) => current.is_some_and(|kv| kv.value == *value),
    }
}

/// Evaluates `txn` against `view` at store revision `current`.
///
/// `lease_alive` answers whether a lease may receive keys; a put to a dead
/// lease fails the whole call with [`StoreError::LeaseNotFound`].
pub fn apply_txn<V: KvRead + ?Sized>(
    view: &V,
    txn: &Txn,
    current: Revision,
    mut lease_alive: impl FnMut(LeaseId) -> bool,
) -> Result<Applied, StoreError> {
    let mut overlay = Overlay {
        view,
        slots: BTreeMap::new(),
    };
    let mut succeeded = true;
    for cmp in &txn.compare {
        if !overlay.holds(&cmp.key, &cmp.target)? {
            succeeded = false;
            break;
        }
    }
    let ops = if succeeded {
        &txn.success
    } else {
        &txn.failure
    };
    let rev = current + 1;
    let mut events = Vec::new();
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        let result = match op {
            Op::Put { key, value, lease } => {
                if key.is_empty() {
                    return Err(StoreError::Invalid("put with an empty key".into()));
                }
                if *lease != 0 && !lease_alive(*lease) {
                    return Err(StoreError::LeaseNotFound(*lease));
                }
                let slot = overlay.slot(key)?;
                let head = Head {
                    create_revision: slot.head.map_or(rev, |h| h.create_revision),
                    version: slot.head.map_or(0, |h| h.version) + 1,
                    lease: *lease,
                };
                let kv = KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision: head.create_revision,
                    mod_revision: rev,
                    version: head.version,
                    lease: *lease,
                };
                slot.head = Some(head);
                slot.current = Some(kv.clone());
                slot.dirty = true;
                events.push(Event {
                    kind: EventKind::Put,
                    kv,
                });
                OpResult::Put
            }
            Op::Delete { key } => OpResult::Delete(overlay.delete(key, rev, &mut events)?),
            Op::DeleteRange { start, end } => {
                let mut deleted = 0;
                for key in overlay.existing_in_range(start, end)? {
                    deleted += overlay.delete(&key, rev, &mut events)?;
                }
                OpResult::Delete(deleted)
            }
            Op::Get { key } => OpResult::Get(overlay.current(key)?),
        };
        results.push(result);
    }
    let wrote = !events.is_empty();
    let changes = if wrote {
        overlay
            .slots
            .into_iter()
            .filter(|(_, slot)| slot.dirty)
            .map(|(key, slot)| Change {
                key,
                prev_lease: slot.prev_lease,
                new: slot.current,
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(Applied {
        response: TxnResponse {
            succeeded,
            revision: if wrote { rev } else { current },
            results,
        },
        changes,
        events,
    })
}

/// A transaction deleting every given key: how a revoked or expired lease
/// removes its keys in one revision.
pub fn delete_keys_txn<'a>(keys: impl IntoIterator<Item = &'a Vec<u8>>) -> Txn {
    Txn {
        success: keys.into_iter().map(Op::delete).collect(),
        ..Txn::default()
    }
}
