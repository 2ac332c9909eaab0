//! Compact binary encodings of what the redb backend persists.
//!
//! Hand-written rather than serde_json because keys and values are raw bytes
//! (JSON would spell every byte as a number) and because the encoding is part
//! of the on-disk format: each record starts with a format tag so that a
//! future layout can be told apart, and anything unexpected is reported as
//! [`StoreError::Corrupt`] instead of being guessed at.

use crate::{Event, EventKind, KeyValue, StoreError};

const KV_FORMAT: u8 = 1;
const EVENTS_FORMAT: u8 = 1;
const KV_HEADER: usize = 1 + 4 * 8;

/// Encodes a key's record (everything but the key, which is the table key).
pub(crate) fn encode_kv(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(KV_HEADER + kv.value.len());
    out.push(KV_FORMAT);
    put_u64(&mut out, kv.create_revision);
    put_u64(&mut out, kv.mod_revision);
    put_u64(&mut out, kv.version);
    put_u64(&mut out, kv.lease);
    out.extend_from_slice(&kv.value);
    out
}

/// Decodes a record written by [`encode_kv`] for `key`.
pub(crate) fn decode_kv(key: &[u8], bytes: &[u8]) -> Result<KeyValue, StoreError> {
    let mut r = Reader::new(bytes, "key record");
    let tag = r.u8()?;
    if tag != KV_FORMAT {
        return Err(r.corrupt(&format!("unknown format tag {tag}")));
    }
    Ok(KeyValue {
        key: key.to_vec(),
        create_revision: r.u64()?,
        mod_revision: r.u64()?,
        version: r.u64()?,
        lease: r.u64()?,
        value: r.rest().to_vec(),
    })
}

/// Reads only the lease of a record, to rebuild the lease index on open
/// without copying values.
pub(crate) fn kv_lease(bytes: &[u8]) -> Result<u64, StoreError> {
    let mut r = Reader::new(bytes, "key record");
    let tag = r.u8()?;
    if tag != KV_FORMAT {
        return Err(r.corrupt(&format!("unknown format tag {tag}")));
    }
    r.take(24)?;
    r.u64()
}

/// Encodes the events of one revision.
pub(crate) fn encode_events(events: &[Event]) -> Vec<u8> {
    let size: usize = events
        .iter()
        .map(|e| 1 + 8 + e.kv.key.len() + e.kv.value.len() + 32)
        .sum();
    let mut out = Vec::with_capacity(5 + size);
    out.push(EVENTS_FORMAT);
    put_u32(&mut out, events.len() as u32);
    for e in events {
        out.push(match e.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        });
        put_u32(&mut out, e.kv.key.len() as u32);
        out.extend_from_slice(&e.kv.key);
        put_u32(&mut out, e.kv.value.len() as u32);
        out.extend_from_slice(&e.kv.value);
        put_u64(&mut out, e.kv.create_revision);
        put_u64(&mut out, e.kv.mod_revision);
        put_u64(&mut out, e.kv.version);
        put_u64(&mut out, e.kv.lease);
    }
    out
}

/// Decodes a record written by [`encode_events`].
pub(crate) fn decode_events(bytes: &[u8]) -> Result<Vec<Event>, StoreError> {
    let mut r = Reader::new(bytes, "event record");
    let tag = r.u8()?;
    if tag != EVENTS_FORMAT {
        return Err(r.corrupt(&format!("unknown format tag {tag}")));
    }
    let count = r.u32()? as usize;
    // Bounded by the input so a corrupt count cannot trigger a huge allocation.
    let mut events = Vec::with_capacity(count.min(bytes.len() / 41 + 1));
    for _ in 0..count {
        let kind = match r.u8()? {
            0 => EventKind::Put,
            1 => EventKind::Delete,
            other => return Err(r.corrupt(&format!("unknown event kind {other}"))),
        };
        let key_len = r.u32()? as usize;
        let key = r.take(key_len)?.to_vec();
        let value_len = r.u32()? as usize;
        let value = r.take(value_len)?.to_vec();
        let kv = KeyValue {
            key,
            value,
            create_revision: r.u64()?,
            mod_revision: r.u64()?,
            version: r.u64()?,
            lease: r.u64()?,
        };
        events.push(Event { kind, kv });
    }
    if !r.rest().is_empty() {
        return Err(r.corrupt("trailing bytes"));
    }
    Ok(events)
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self {
            bytes,
            pos: 0,
            what,
        }
    }

    fn corrupt(&self, detail: &str) -> StoreError {
        StoreError::Corrupt(format!("{}: {detail} at byte {}", self.what, self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| self.corrupt("truncated"))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, StoreError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn rest(&mut self) -> &'a [u8] {
        let rest = &self.bytes[self.pos..];
        self.pos = self.bytes.len();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &[u8], value: &[u8]) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: value.to_vec(),
            create_revision: 2,
            mod_revision: 7,
            version: 3,
            lease: 9,
        }
    }

    #[test]
    fn kv_round_trips() {
        let original = kv(b"k", b"some value");
        let bytes = encode_kv(&original);
        assert_eq!(decode_kv(b"k", &bytes).unwrap(), original);
        assert_eq!(kv_lease(&bytes).unwrap(), 9);
    }

    #[test]
    fn events_round_trip() {
        let events = vec![
            Event {
                kind: EventKind::Put,
                kv: kv(b"a", b"1"),
            },
            Event {
                kind: EventKind::Delete,
                kv: kv(b"bb", b""),
            },
        ];
        assert_eq!(decode_events(&encode_events(&events)).unwrap(), events);
    }

    #[test]
    fn garbage_is_corrupt_not_a_panic() {
        assert!(matches!(
            decode_kv(b"k", &[1, 2, 3]),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            decode_kv(b"k", &[9; 40]),
            Err(StoreError::Corrupt(_))
        ));
        let mut bytes = encode_events(&[Event {
            kind: EventKind::Put,
            kv: kv(b"a", b"1"),
        }]);
        bytes.truncate(bytes.len() - 1);
        assert!(matches!(decode_events(&bytes), Err(StoreError::Corrupt(_))));
        assert!(matches!(
            decode_events(&[1, 255, 255, 255, 255]),
            Err(StoreError::Corrupt(_))
        ));
    }
}
