//! Snapshots: the current keys and leases at a point of the log, so that
//! recovery replays only the log written since.
//!
//! A snapshot `{segment:016}.snap` covers every segment before `segment`:
//! recovery loads it and applies the records of segment `segment` on. It is
//! written by a background thread while the committer goes on, from the
//! shared key index a few thousand keys at a time (so the committer is never
//! blocked for long): a *fuzzy* snapshot, where each key is as of some
//! revision at or after the snapshot's `revision`. That is enough, because
//! replay from `segment` on sets every key it touches to its whole new
//! record, in order: applying a revision to a key that already shows it
//! gives the same result (ARIES-style fuzzy checkpoint). The counters and
//! leases are exact as of `revision`: the committer takes them when it
//! starts the snapshot.
//!
//! Layout: magic `ALLOTSNP`, format u32, then `revision, oldest,
//! next_lease, segment, lease count` (u64 each), each lease as `id, TTL ms`
//! (u64), then each key as `varint key length, key, varint record length,
//! record` ([`crate::codec::encode_kv`]), a zero key length to end, and the
//! CRC-32 of everything before it (u32). It is written to a `.tmp` file,
//! fsynced and renamed, so a crash never leaves a half-written snapshot
//! under a snapshot's name.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use super::keys::Keys;
use super::wal::{io_error, sync_dir};
use super::Index;
use crate::codec::{decode_kv, put_u64, put_varint, Reader};
use crate::{LeaseId, Revision, StoreError};

const MAGIC: &[u8; 8] = b"ALLOTSNP";
const FORMAT: u32 = 1;
/// Keys copied per hold of the index's read lock.
const KEYS_PER_STEP: usize = 4096;

/// What a snapshot records besides the keys, exact as of `revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SnapshotMeta {
    pub revision: Revision,
    pub oldest: Revision,
    pub next_lease: LeaseId,
    /// The first segment not covered: replay starts there.
    pub segment: u64,
    /// Lease ids with their TTL in milliseconds.
    pub leases: Vec<(LeaseId, u64)>,
}

pub(super) fn snapshot_name(segment: u64) -> String {
    format!("{segment:016}.snap")
}

pub(super) fn parse_snapshot_name(name: &str) -> Option<u64> {
    name.strip_suffix(".snap")?.parse().ok()
}

/// Writes a snapshot of `index` with `meta`, makes it durable, and removes
/// the snapshots it replaces. Returns its path.
pub(super) fn write(
    dir: &Path,
    meta: &SnapshotMeta,
    index: &Arc<RwLock<Index>>,
) -> Result<PathBuf, StoreError> {
    let path = dir.join(snapshot_name(meta.segment));
    let tmp = path.with_extension("snap.tmp");
    let file = File::create(&tmp).map_err(|e| io_error("creating", &tmp, e))?;
    let mut out = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        crc: crc32fast::Hasher::new(),
    };
    let write_err = |e| io_error("writing", &tmp, e);
    let mut head = Vec::new();
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&FORMAT.to_le_bytes());
    for v in [meta.revision, meta.oldest, meta.next_lease, meta.segment] {
        put_u64(&mut head, v);
    }
    put_u64(&mut head, meta.leases.len() as u64);
    for &(id, ttl_ms) in &meta.leases {
        put_u64(&mut head, id);
        put_u64(&mut head, ttl_ms);
    }
    out.write_all(&head).map_err(write_err)?;
    let mut after: Option<Vec<u8>> = None;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        {
            // Poisoning is ignored: the committer changes the index only in
            // whole batches, after their commit.
            let index = index.read().unwrap_or_else(PoisonError::into_inner);
            let step = index.kv.encoded_after(after.as_deref(), KEYS_PER_STEP);
            let Some(&(last, _)) = step.last() else {
                break;
            };
            for (key, record) in &step {
                put_varint(&mut buf, key.len() as u64);
                buf.extend_from_slice(key);
                put_varint(&mut buf, record.len() as u64);
                buf.extend_from_slice(record);
            }
            after = Some(last.to_vec());
        }
        out.write_all(&buf).map_err(write_err)?;
    }
    // Keys are never empty: a zero length ends the list.
    out.write_all(&[0]).map_err(write_err)?;
    let crc = out.crc.clone().finalize();
    let mut file = out
        .inner
        .into_inner()
        .map_err(|e| io_error("writing", &tmp, e.into_error()))?;
    file.write_all(&crc.to_le_bytes())
        .and_then(|()| file.sync_all())
        .map_err(write_err)?;
    std::fs::rename(&tmp, &path).map_err(|e| io_error("renaming", &tmp, e))?;
    sync_dir(dir)?;
    remove_older(dir, meta.segment)?;
    Ok(path)
}

/// Removes the snapshots older than the one covering up to `segment`.
pub(super) fn remove_older(dir: &Path, segment: u64) -> Result<(), StoreError> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_error("listing", dir, e))?;
    let mut removed = false;
    for entry in entries {
        let entry = entry.map_err(|e| io_error("listing", dir, e))?;
        let name = entry.file_name();
        let older = name
            .to_str()
            .and_then(parse_snapshot_name)
            .is_some_and(|s| s < segment);
        if older {
            std::fs::remove_file(entry.path())
                .map_err(|e| io_error("removing", &entry.path(), e))?;
            removed = true;
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Reads a snapshot: its meta and keys.
pub(super) fn read(path: &Path) -> Result<(SnapshotMeta, Keys), StoreError> {
    let bytes = std::fs::read(path).map_err(|e| io_error("reading", path, e))?;
    let corrupt =
        |what: &str| StoreError::Corrupt(format!("snapshot {} is damaged: {what}", path.display()));
    if bytes.len() < MAGIC.len() + 4 + 4 || &bytes[..8] != MAGIC {
        return Err(corrupt("not a snapshot (bad magic)"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(corrupt("checksum mismatch"));
    }
    let mut r = Reader::new(&body[8..], "snapshot");
    let format = r.u32()?;
    if format != FORMAT {
        return Err(corrupt(&format!(
            "unsupported format {format} (this build reads {FORMAT})"
        )));
    }
    let revision = r.u64()?;
    let oldest = r.u64()?;
    let next_lease = r.u64()?;
    let segment = r.u64()?;
    let leases_len = r.u64()?;
    let mut leases = Vec::new();
    for _ in 0..leases_len {
        leases.push((r.u64()?, r.u64()?));
    }
    let mut kv = Keys::default();
    loop {
        let key_len = r.len()?;
        if key_len == 0 {
            break;
        }
        let key = r.take(key_len)?;
        let record_len = r.len()?;
        kv.insert(decode_kv(key, r.take(record_len)?)?);
    }
    if !r.at_end() {
        return Err(corrupt("trailing bytes"));
    }
    let meta = SnapshotMeta {
        revision,
        oldest,
        next_lease,
        segment,
        leases,
    };
    Ok((meta, kv))
}

/// A writer that keeps the CRC-32 of everything written through it.
struct HashingWriter<W> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
