//! Compact binary encodings of what the redb backend persists.
//!
//! Hand-written rather than serde_json because keys and values are raw bytes
//! (JSON would spell every byte as a number) and because the encoding is part
//! of the on-disk format: each record starts with a format tag so that a
//! future layout can be told apart, and anything unexpected is reported as
//! [`StoreError::Corrupt`] instead of being guessed at.

use crate::{Event, EventKind, KeyValue, Revision, StoreError};

const KV_FORMAT: u8 = 1;
/// Tag of the per-revision event records of format-1 files.
const EVENTS_FORMAT_V1: u8 = 1;
/// Tag of an event chunk (format-2 files).
const CHUNK_FORMAT: u8 = 2;
const KV_HEADER: usize = 1 + 4 * 8;

/// Encodes a key's record (everything but the key, which is the table key).
pub(crate) fn encode_kv(kv: &KeyValue) -> Vec<u8> {
    encode_record(
        kv.create_revision,
        kv.mod_revision,
        kv.version,
        kv.lease,
        &kv.value,
    )
}

/// [`encode_kv`] from the record's parts.
pub(crate) fn encode_record(
    create_revision: Revision,
    mod_revision: Revision,
    version: u64,
    lease: u64,
    value: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(KV_HEADER + value.len());
    out.push(KV_FORMAT);
    put_u64(&mut out, create_revision);
    put_u64(&mut out, mod_revision);
    put_u64(&mut out, version);
    put_u64(&mut out, lease);
    out.extend_from_slice(value);
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

/// The most bytes of one event chunk, unless a single event alone is bigger.
///
/// redb stores a value that does not fit a 4 KiB page alone in a leaf whose
/// size is rounded up to a power of two, so one record holding all the events
/// of a 100,000-event revision (12 MiB) took a 16 MiB leaf. Chunks of at most
/// this size, plus the leaf's header and 12-byte key, fill a 64 KiB leaf
/// (order 4) exactly, wasting at most the tail an event did not fit in.
pub(crate) const CHUNK_BYTES: usize = 64 * 1024 - 64;

/// Splits the events of `revision` into chunk records of at most
/// [`CHUNK_BYTES`] (a single bigger event gets a chunk of its own), in
/// order. Every chunk decodes on its own with [`decode_event_chunk`].
///
/// Layout: a format tag, the number of events (u32), then for each event:
/// - kind (`0` put, `1` delete);
/// - the key as `varint shared, varint suffix length, suffix`, where `shared`
///   is how many leading bytes it has in common with the previous key of the
///   chunk (keys written together tend to share long prefixes);
/// - for a put only: `varint value length, value, varint (revision -
///   create_revision), varint version, varint lease`.
///
/// `mod_revision` is not stored: it is the revision, which is the table key.
/// Nor are the value, create revision, version and lease of a delete: they
/// are empty and zero by construction (see [`crate::Event`]).
pub(crate) fn encode_event_chunks(revision: Revision, events: &[Event]) -> Vec<Vec<u8>> {
    // An upper bound on what a chunk will take, so that small revisions
    // allocate little and big ones do not grow their chunks step by step.
    let capacity = CHUNK_HEADER
        + events
            .iter()
            .map(|e| e.kv.key.len() + e.kv.value.len() + 16)
            .sum::<usize>()
            .min(CHUNK_BYTES);
    let mut chunks = Vec::new();
    let mut chunk = new_chunk(capacity);
    let mut count = 0u32;
    let mut prev: &[u8] = &[];
    for event in events {
        debug_assert_eq!(event.kv.mod_revision, revision, "event of another revision");
        let before = chunk.len();
        encode_event(&mut chunk, prev, revision, event);
        // Full chunk, or (not reachable with real chunk sizes) a count that
        // would overflow: the event starts the next chunk, with no previous key.
        if count > 0 && (chunk.len() > CHUNK_BYTES || count == u32::MAX) {
            chunk.truncate(before);
            chunks.push(finish_chunk(
                std::mem::replace(&mut chunk, new_chunk(capacity)),
                count,
            ));
            encode_event(&mut chunk, &[], revision, event);
            count = 0;
        }
        count += 1;
        prev = &event.kv.key;
    }
    if count > 0 {
        chunks.push(finish_chunk(chunk, count));
    }
    chunks
}

const CHUNK_HEADER: usize = 1 + 4;

fn new_chunk(capacity: usize) -> Vec<u8> {
    let mut chunk = Vec::with_capacity(capacity);
    chunk.push(CHUNK_FORMAT);
    chunk.extend_from_slice(&[0; 4]);
    chunk
}

fn finish_chunk(mut chunk: Vec<u8>, count: u32) -> Vec<u8> {
    chunk[1..CHUNK_HEADER].copy_from_slice(&count.to_le_bytes());
    chunk
}

fn encode_event(out: &mut Vec<u8>, prev: &[u8], revision: Revision, event: &Event) {
    let key = &event.kv.key;
    let shared = prev.iter().zip(key).take_while(|(a, b)| a == b).count();
    let suffix = &key[shared..];
    match event.kind {
        EventKind::Put => out.push(0),
        EventKind::Delete => {
            debug_assert!(
                event.kv.value.is_empty()
                    && event.kv.create_revision == 0
                    && event.kv.version == 0
                    && event.kv.lease == 0,
                "a delete event carries no value or bookkeeping"
            );
            out.push(1);
        }
    }
    put_varint(out, shared as u64);
    put_varint(out, suffix.len() as u64);
    out.extend_from_slice(suffix);
    if event.kind == EventKind::Put {
        put_varint(out, event.kv.value.len() as u64);
        out.extend_from_slice(&event.kv.value);
        // Usually 0 (created by this very write) or a small distance back.
        put_varint(out, revision.wrapping_sub(event.kv.create_revision));
        put_varint(out, event.kv.version);
        put_varint(out, event.kv.lease);
    }
}

/// The number of events in a chunk written by [`encode_event_chunks`], read
/// from its header alone.
pub(crate) fn chunk_event_count(bytes: &[u8]) -> Result<u64, StoreError> {
    let mut r = Reader::new(bytes, "event chunk");
    let tag = r.u8()?;
    if tag != CHUNK_FORMAT {
        return Err(r.corrupt(&format!("unknown format tag {tag}")));
    }
    Ok(u64::from(r.u32()?))
}

/// Decodes a chunk written by [`encode_event_chunks`] for `revision`,
/// appending its events to `out`.
pub(crate) fn decode_event_chunk(
    revision: Revision,
    bytes: &[u8],
    out: &mut Vec<Event>,
) -> Result<(), StoreError> {
    let mut r = Reader::new(bytes, "event chunk");
    let tag = r.u8()?;
    if tag != CHUNK_FORMAT {
        return Err(r.corrupt(&format!("unknown format tag {tag}")));
    }
    let count = r.u32()?;
    // Bounded by the input so a corrupt count cannot trigger a huge allocation.
    out.reserve((count as usize).min(bytes.len() / 3));
    let first = out.len();
    for _ in 0..count {
        let kind = match r.u8()? {
            0 => EventKind::Put,
            1 => EventKind::Delete,
            other => return Err(r.corrupt(&format!("unknown event kind {other}"))),
        };
        let prev: &[u8] = match out.len() > first {
            true => &out[out.len() - 1].kv.key,
            false => &[],
        };
        let shared = r.varint()?;
        let shared = usize::try_from(shared)
            .ok()
            .filter(|&n| n <= prev.len())
            .ok_or_else(|| r.corrupt("key shares more bytes than the previous key has"))?;
        let suffix_len = r.len()?;
        let suffix = r.take(suffix_len)?;
        let mut key = Vec::with_capacity(shared + suffix.len());
        key.extend_from_slice(&prev[..shared]);
        key.extend_from_slice(suffix);
        let kv = match kind {
            EventKind::Put => {
                let value_len = r.len()?;
                let value = r.take(value_len)?.to_vec();
                KeyValue {
                    key,
                    value,
                    create_revision: revision.wrapping_sub(r.varint()?),
                    mod_revision: revision,
                    version: r.varint()?,
                    lease: r.varint()?,
                }
            }
            EventKind::Delete => KeyValue {
                key,
                value: Vec::new(),
                create_revision: 0,
                mod_revision: revision,
                version: 0,
                lease: 0,
            },
        };
        out.push(Event { kind, kv });
    }
    if !r.at_end() {
        return Err(r.corrupt("trailing bytes"));
    }
    Ok(())
}

/// Decodes a format-1 record (all the events of one revision, fixed-width
/// fields), as written before event chunks: only read to migrate a format-1
/// file.
pub(crate) fn decode_events_v1(bytes: &[u8]) -> Result<Vec<Event>, StoreError> {
    let mut r = Reader::new(bytes, "event record");
    let tag = r.u8()?;
    if tag != EVENTS_FORMAT_V1 {
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

/// Encodes a format-1 record, to test the migration of format-1 files.
#[cfg(test)]
pub(crate) fn encode_events_v1(events: &[Event]) -> Vec<u8> {
    let mut out = vec![EVENTS_FORMAT_V1];
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

/// LEB128: seven bits a byte, least significant first.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A cursor over encoded bytes whose every failure is [`StoreError::Corrupt`].
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self {
            bytes,
            pos: 0,
            what,
        }
    }

    pub(crate) fn corrupt(&self, detail: &str) -> StoreError {
        StoreError::Corrupt(format!("{}: {detail} at byte {}", self.what, self.pos))
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| self.corrupt("truncated"))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, StoreError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, StoreError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    pub(crate) fn varint(&mut self) -> Result<u64, StoreError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(self.corrupt("varint overflows 64 bits"));
            }
            v |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.corrupt("varint longer than 10 bytes"))
    }

    /// A length: a varint that must fit in what is left of the input.
    pub(crate) fn len(&mut self) -> Result<usize, StoreError> {
        let v = self.varint()?;
        usize::try_from(v)
            .ok()
            .filter(|&n| n <= self.bytes.len() - self.pos)
            .ok_or_else(|| self.corrupt(&format!("length {v} past the end")))
    }

    pub(crate) fn at_end(&self) -> bool {
        self.pos == self.bytes.len()
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
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

    fn put_event(key: &[u8], value: &[u8], create: Revision, rev: Revision) -> Event {
        Event {
            kind: EventKind::Put,
            kv: KeyValue {
                key: key.to_vec(),
                value: value.to_vec(),
                create_revision: create,
                mod_revision: rev,
                version: 3,
                lease: 9,
            },
        }
    }

    fn delete_event(key: &[u8], rev: Revision) -> Event {
        Event {
            kind: EventKind::Delete,
            kv: KeyValue {
                key: key.to_vec(),
                value: Vec::new(),
                create_revision: 0,
                mod_revision: rev,
                version: 0,
                lease: 0,
            },
        }
    }

    fn decode_all(revision: Revision, chunks: &[Vec<u8>]) -> Vec<Event> {
        let mut out = Vec::new();
        for chunk in chunks {
            decode_event_chunk(revision, chunk, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn event_chunks_round_trip() {
        let rev = 1 << 40;
        let events = vec![
            put_event(b"pools/a/values/1", b"x", rev, rev),
            put_event(b"pools/a/values/2", b"", 7, rev),
            delete_event(b"pools/a/values/2", rev),
            delete_event(b"pools/b", rev),
            put_event(b"", b"\xff\x00", 0, rev),
            put_event(b"pools/a/values/1", &[7; 300], rev, rev),
        ];
        let chunks = encode_event_chunks(rev, &events);
        assert_eq!(chunks.len(), 1);
        assert_eq!(decode_all(rev, &chunks), events);
        assert_eq!(chunk_event_count(&chunks[0]).unwrap(), 6);
        assert!(encode_event_chunks(rev, &[]).is_empty());
    }

    #[test]
    fn a_put_costs_a_few_bytes_beyond_its_key_suffix_and_value() {
        let rev = 1000;
        let first = put_event(b"pools/a/values/0001", &[b'v'; 60], rev, rev);
        let next = put_event(b"pools/a/values/0002", &[b'v'; 60], 900, rev);
        let one = encode_event_chunks(rev, std::slice::from_ref(&first));
        // header + kind, shared, suffix length + key + value length, value
        // + create delta, version, lease.
        assert_eq!(one[0].len(), CHUNK_HEADER + 3 + 19 + 1 + 60 + 3);
        let two = encode_event_chunks(rev, &[first, next]);
        // The second key shares 18 bytes with the first; create delta 100
        // takes 1 byte.
        assert_eq!(two[0].len() - one[0].len(), 3 + 1 + 1 + 60 + 3);
    }

    #[test]
    fn big_revisions_are_split_into_chunks_that_decode_alone() {
        let rev = 5;
        let mut events: Vec<Event> = (0..5000)
            .map(|i| put_event(format!("k/{i:06}").as_bytes(), &[b'v'; 60], rev, rev))
            .collect();
        // An event bigger than a chunk gets a chunk of its own.
        events.insert(1234, put_event(b"big", &vec![1; 3 * CHUNK_BYTES], 2, rev));
        events.push(delete_event(b"k/000001", rev));
        let chunks = encode_event_chunks(rev, &events);
        assert!(chunks.len() > 5, "{} chunks", chunks.len());
        let big = chunks.iter().filter(|c| c.len() > CHUNK_BYTES).count();
        assert_eq!(big, 1);
        for chunk in &chunks {
            let mut alone = Vec::new();
            decode_event_chunk(rev, chunk, &mut alone).unwrap();
            assert!(!alone.is_empty());
            assert_eq!(chunk_event_count(chunk).unwrap(), alone.len() as u64);
        }
        assert_eq!(decode_all(rev, &chunks), events);
    }

    #[test]
    fn format_1_records_still_decode() {
        let events = vec![put_event(b"a", b"1", 2, 7), delete_event(b"bb", 7)];
        assert_eq!(
            decode_events_v1(&encode_events_v1(&events)).unwrap(),
            events
        );
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
        let mut bytes = encode_events_v1(&[put_event(b"a", b"1", 1, 1)]);
        bytes.truncate(bytes.len() - 1);
        assert!(matches!(
            decode_events_v1(&bytes),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            decode_events_v1(&[1, 255, 255, 255, 255]),
            Err(StoreError::Corrupt(_))
        ));
        let chunk = encode_event_chunks(3, &[put_event(b"abc", b"value", 3, 3)]).remove(0);
        for cut in 1..chunk.len() {
            let mut out = Vec::new();
            assert!(
                matches!(
                    decode_event_chunk(3, &chunk[..cut], &mut out),
                    Err(StoreError::Corrupt(_))
                ),
                "cut at {cut}"
            );
        }
        let bad: [&[u8]; 6] = [
            &[],
            &[1, 0, 0, 0, 0],
            &[CHUNK_FORMAT, 1, 0, 0, 0, 2],
            // shares bytes with a previous key that does not exist
            &[CHUNK_FORMAT, 1, 0, 0, 0, 1, 1, 0],
            // an endless varint
            &[
                CHUNK_FORMAT,
                1,
                0,
                0,
                0,
                1,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                1,
            ],
            // a trailing byte
            &[CHUNK_FORMAT, 1, 0, 0, 0, 1, 0, 1, b'k', 0],
        ];
        for bytes in bad {
            let mut out = Vec::new();
            assert!(
                matches!(
                    decode_event_chunk(3, bytes, &mut out),
                    Err(StoreError::Corrupt(_))
                ),
                "{bytes:?}"
            );
        }
    }
}
