//! The payload of one log record: everything one committed batch changed.
//!
//! Layout: a format tag, then entries until the end of the payload, each
//! starting with its kind:
//!
//! - `0` revision: `varint revision, varint body length, body`, the body
//!   being `varint chunks`, then each chunk as `varint length, bytes` in the
//!   event-chunk encoding of [`crate::codec::encode_event_chunks`] (shared
//!   with the redb history). The body is what the in-memory watch history
//!   keeps of a revision ([`Body`]), decoded only when a watcher replays it.
//!   The events of a revision are all it changed: a put event carries the
//!   key's whole new record and a delete its key, so replaying them in order
//!   rebuilds the keys as well as the watch history;
//! - `1` lease granted: `varint id, varint TTL in milliseconds`;
//! - `2` lease revoked: `varint id` (its keys' deletion is a revision entry);
//! - `3` counters: `varint oldest retained revision, varint next lease id`,
//!   written when they changed, after the batch's other entries.

use std::ops::Range;
use std::sync::Arc;

use crate::codec::{
    chunk_event_count, decode_event_chunk, encode_event_chunks, put_varint, Reader,
};
use crate::watch::{Committed, Retained};
use crate::{Event, LeaseId, Revision, StoreError};

const FORMAT: u8 = 1;
const REVISION: u8 = 0;
const GRANT: u8 = 1;
const REVOKE: u8 = 2;
const COUNTERS: u8 = 3;

/// One decoded entry.
pub(super) enum Entry<'a> {
    Revision(Body<'a>),
    Grant {
        id: LeaseId,
        ttl_ms: u64,
    },
    Revoke(LeaseId),
    Counters {
        oldest: Revision,
        next_lease: LeaseId,
    },
}

/// Starts a payload in `out` (after the record's frame).
pub(super) fn begin(out: &mut Vec<u8>) {
    out.push(FORMAT);
}

/// Appends a revision entry; returns where its body is in `out`.
pub(super) fn put_revision(out: &mut Vec<u8>, committed: &Committed) -> Range<usize> {
    let chunks = encode_event_chunks(committed.revision, &committed.events);
    let mut count = Vec::with_capacity(10);
    put_varint(&mut count, chunks.len() as u64);
    let body_len = count.len()
        + chunks
            .iter()
            .map(|c| varint_len(c.len() as u64) + c.len())
            .sum::<usize>();
    out.push(REVISION);
    put_varint(out, committed.revision);
    put_varint(out, body_len as u64);
    let start = out.len();
    out.extend_from_slice(&count);
    for chunk in chunks {
        put_varint(out, chunk.len() as u64);
        out.extend_from_slice(&chunk);
    }
    start..out.len()
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// The encoded events of one revision, as a revision entry holds them.
#[derive(Clone, Copy)]
pub(super) struct Body<'a> {
    pub revision: Revision,
    pub bytes: &'a [u8],
}

impl Body<'_> {
    /// Every event of the revision.
    pub fn events(&self) -> Result<Vec<Event>, StoreError> {
        let mut events = Vec::new();
        self.chunks(|chunk| decode_event_chunk(self.revision, chunk, &mut events))?;
        if events.is_empty() {
            return Err(StoreError::Corrupt(format!(
                "log record: revision {} has no events",
                self.revision
            )));
        }
        Ok(events)
    }

    /// The number of events, from the chunk headers alone.
    pub fn event_count(&self) -> Result<u64, StoreError> {
        let mut n = 0;
        self.chunks(|chunk| {
            n += chunk_event_count(chunk)?;
            Ok(())
        })?;
        Ok(n)
    }

    fn chunks(
        &self,
        mut each: impl FnMut(&[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut r = Reader::new(self.bytes, "log record revision");
        for _ in 0..r.varint()? {
            let len = r.len()?;
            each(r.take(len)?)?;
        }
        match r.at_end() {
            true => Ok(()),
            false => Err(r.corrupt("trailing bytes")),
        }
    }
}

/// A revision of retained history as the log store keeps it in memory: its
/// encoded events (about a third of the decoded size), shared so that a
/// watcher copies them out of the index cheaply and decodes them later.
#[derive(Clone)]
pub(super) struct Stored {
    pub revision: Revision,
    pub events: u32,
    pub body: Arc<[u8]>,
}

impl Stored {
    pub fn new(body: Body<'_>, events: u64) -> Result<Self, StoreError> {
        let events = u32::try_from(events).map_err(|_| {
            StoreError::Invalid(format!("revision {} has too many events", body.revision))
        })?;
        Ok(Self {
            revision: body.revision,
            events,
            body: body.bytes.into(),
        })
    }

    /// The revision, decoded.
    pub fn decode(&self) -> Result<Arc<Committed>, StoreError> {
        let body = Body {
            revision: self.revision,
            bytes: &self.body,
        };
        Ok(Arc::new(Committed {
            revision: self.revision,
            events: body.events()?,
        }))
    }
}

impl Retained for Stored {
    fn revision(&self) -> Revision {
        self.revision
    }

    fn event_count(&self) -> usize {
        self.events as usize
    }
}

pub(super) fn put_grant(out: &mut Vec<u8>, id: LeaseId, ttl_ms: u64) {
    out.push(GRANT);
    put_varint(out, id);
    put_varint(out, ttl_ms);
}

pub(super) fn put_revoke(out: &mut Vec<u8>, id: LeaseId) {
    out.push(REVOKE);
    put_varint(out, id);
}

pub(super) fn put_counters(out: &mut Vec<u8>, oldest: Revision, next_lease: LeaseId) {
    out.push(COUNTERS);
    put_varint(out, oldest);
    put_varint(out, next_lease);
}

/// Decodes a payload, handing each entry to `entry` in order.
pub(super) fn decode<'a>(
    payload: &'a [u8],
    mut entry: impl FnMut(Entry<'a>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut r = Reader::new(payload, "log record");
    let tag = r.u8()?;
    if tag != FORMAT {
        return Err(r.corrupt(&format!("unknown format tag {tag}")));
    }
    while !r.at_end() {
        let decoded = match r.u8()? {
            REVISION => {
                let revision = r.varint()?;
                let len = r.len()?;
                Entry::Revision(Body {
                    revision,
                    bytes: r.take(len)?,
                })
            }
            GRANT => Entry::Grant {
                id: r.varint()?,
                ttl_ms: r.varint()?,
            },
            REVOKE => Entry::Revoke(r.varint()?),
            COUNTERS => Entry::Counters {
                oldest: r.varint()?,
                next_lease: r.varint()?,
            },
            other => return Err(r.corrupt(&format!("unknown entry kind {other}"))),
        };
        entry(decoded)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EventKind, KeyValue};

    #[test]
    fn entries_round_trip() {
        let committed = Committed {
            revision: 7,
            events: vec![Event {
                kind: EventKind::Put,
                kv: KeyValue {
                    key: b"k".to_vec(),
                    value: b"v".to_vec(),
                    create_revision: 3,
                    mod_revision: 7,
                    version: 2,
                    lease: 4,
                },
            }],
        };
        let mut out = Vec::new();
        begin(&mut out);
        let body = put_revision(&mut out, &committed);
        let stored = Stored::new(
            Body {
                revision: 7,
                bytes: &out[body],
            },
            1,
        )
        .unwrap();
        assert_eq!(stored.decode().unwrap().events, committed.events);
        put_grant(&mut out, 4, 1500);
        put_revoke(&mut out, 2);
        put_counters(&mut out, 5, 6);
        let mut seen = Vec::new();
        decode(&out, |e| {
            seen.push(match e {
                Entry::Revision(b) => format!("rev {} {:?}", b.revision, b.events().unwrap()),
                Entry::Grant { id, ttl_ms } => format!("grant {id} {ttl_ms}"),
                Entry::Revoke(id) => format!("revoke {id}"),
                Entry::Counters { oldest, next_lease } => format!("counters {oldest} {next_lease}"),
            });
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                format!("rev 7 {:?}", committed.events),
                "grant 4 1500".to_string(),
                "revoke 2".to_string(),
                "counters 5 6".to_string(),
            ]
        );
        // A cut inside an entry, an unknown kind, an unknown format.
        assert!(decode(&out[..out.len() - 1], |_| Ok(())).is_err());
        assert!(decode(&[FORMAT, 9], |_| Ok(())).is_err());
        assert!(decode(&[2], |_| Ok(())).is_err());
    }
}
