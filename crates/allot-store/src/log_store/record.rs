//! The payload of one log record: everything one committed batch changed.
//!
//! Layout: a format tag, then entries until the end of the payload, each
//! starting with its kind:
//!
//! - `0` revision: `varint revision, varint chunks`, then each chunk as
//!   `varint length, bytes` in the event-chunk encoding of
//!   [`crate::codec::encode_event_chunks`] (shared with the redb history).
//!   The events of a revision are all it changed: a put event carries the
//!   key's whole new record and a delete its key, so replaying them in order
//!   rebuilds the keys as well as the watch history;
//! - `1` lease granted: `varint id, varint TTL in milliseconds`;
//! - `2` lease revoked: `varint id` (its keys' deletion is a revision entry);
//! - `3` counters: `varint oldest retained revision, varint next lease id`,
//!   written when they changed, after the batch's other entries.

use std::sync::Arc;

use crate::codec::{decode_event_chunk, encode_event_chunks, put_varint, Reader};
use crate::watch::Committed;
use crate::{LeaseId, Revision, StoreError};

const FORMAT: u8 = 1;
const REVISION: u8 = 0;
const GRANT: u8 = 1;
const REVOKE: u8 = 2;
const COUNTERS: u8 = 3;

/// One decoded entry.
pub(super) enum Entry {
    Revision(Arc<Committed>),
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

pub(super) fn put_revision(out: &mut Vec<u8>, committed: &Committed) {
    out.push(REVISION);
    put_varint(out, committed.revision);
    let chunks = encode_event_chunks(committed.revision, &committed.events);
    put_varint(out, chunks.len() as u64);
    for chunk in chunks {
        put_varint(out, chunk.len() as u64);
        out.extend_from_slice(&chunk);
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
pub(super) fn decode(
    payload: &[u8],
    mut entry: impl FnMut(Entry) -> Result<(), StoreError>,
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
                let chunks = r.varint()?;
                let mut events = Vec::new();
                for _ in 0..chunks {
                    let len = r.len()?;
                    decode_event_chunk(revision, r.take(len)?, &mut events)?;
                }
                if events.is_empty() {
                    return Err(r.corrupt(&format!("revision {revision} has no events")));
                }
                Entry::Revision(Arc::new(Committed { revision, events }))
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
    use crate::{Event, EventKind, KeyValue};

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
        put_revision(&mut out, &committed);
        put_grant(&mut out, 4, 1500);
        put_revoke(&mut out, 2);
        put_counters(&mut out, 5, 6);
        let mut seen = Vec::new();
        decode(&out, |e| {
            seen.push(match e {
                Entry::Revision(c) => format!("rev {} {:?}", c.revision, c.events),
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
