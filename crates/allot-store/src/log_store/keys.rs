//! The in-memory index of current keys: each key once (as the map's key),
//! its value and bookkeeping beside it in boxed slices, which keeps ~100
//! bytes per key off a map of full [`KeyValue`]s (key stored twice, `Vec`
//! headers and spare capacity).

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::apply::{compare_holds, Head, KvRead};
use crate::codec::encode_record;
use crate::{CompareTarget, KeyValue, LeaseId, Revision, StoreError};

/// A key's value and bookkeeping.
struct Record {
    value: Box<[u8]>,
    create_revision: Revision,
    mod_revision: Revision,
    version: u64,
    lease: LeaseId,
}

impl Record {
    fn to_kv(&self, key: &[u8]) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: self.value.to_vec(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        }
    }
}

/// The current keys, in key order.
#[derive(Default)]
pub(super) struct Keys(BTreeMap<Box<[u8]>, Record>);

impl Keys {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn insert(&mut self, kv: KeyValue) {
        let record = Record {
            value: kv.value.into_boxed_slice(),
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
        };
        self.0.insert(kv.key.into_boxed_slice(), record);
    }

    pub fn remove(&mut self, key: &[u8]) {
        self.0.remove(key);
    }

    /// The keys in `[start, end)` (`end` empty = unbounded), in order.
    pub fn range<'a>(
        &'a self,
        start: &'a [u8],
        end: &'a [u8],
    ) -> impl Iterator<Item = KeyValue> + 'a {
        // BTreeMap::range panics on an inverted range; that is just empty here.
        let inverted = !end.is_empty() && start >= end;
        let upper = match end.is_empty() {
            true => Bound::Unbounded,
            false => Bound::Excluded(end),
        };
        let range = (!inverted).then(|| self.0.range::<[u8], _>((Bound::Included(start), upper)));
        range.into_iter().flatten().map(|(k, r)| r.to_kv(k))
    }

    /// Every key with its lease (0: none).
    pub fn leases(&self) -> impl Iterator<Item = (&[u8], LeaseId)> {
        self.0.iter().map(|(k, r)| (&**k, r.lease))
    }

    /// Up to `n` keys after `after` (from the first if `None`), each with
    /// its record encoded by [`crate::codec::encode_kv`]'s layout.
    pub fn encoded_after(&self, after: Option<&[u8]>, n: usize) -> Vec<(&[u8], Vec<u8>)> {
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.0
            .range::<[u8], _>((lower, Bound::Unbounded))
            .take(n)
            .map(|(k, r)| {
                let record = encode_record(
                    r.create_revision,
                    r.mod_revision,
                    r.version,
                    r.lease,
                    &r.value,
                );
                (&**k, record)
            })
            .collect()
    }
}

impl KvRead for Keys {
    fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.0.get(key).map(|r| r.to_kv(key)))
    }

    fn scan(&self, start: &[u8], end: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        Ok(self.range(start, end).collect())
    }

    fn holds(&self, key: &[u8], target: &CompareTarget) -> Result<bool, StoreError> {
        let Some(r) = self.0.get(key) else {
            return Ok(compare_holds(None, target));
        };
        Ok(match target {
            CompareTarget::Version(v) => r.version == *v,
            CompareTarget::ModRevision(rev) => r.mod_revision == *rev,
            CompareTarget::CreateRevision(rev) => r.create_revision == *rev,
            CompareTarget::Value(value) => *r.value == **value,
        })
    }

    fn head(&self, key: &[u8]) -> Result<Option<Head>, StoreError> {
        Ok(self.0.get(key).map(|r| Head {
            create_revision: r.create_revision,
            version: r.version,
            lease: r.lease,
        }))
    }
}
