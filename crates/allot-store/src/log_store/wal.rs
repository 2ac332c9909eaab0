//! Log segments: files of CRC-framed records, appended to and fsynced.
//!
//! A segment file `{seq:016}.wal` starts with a 12-byte header (magic
//! `ALLOTLOG`, format u32) followed by records:
//!
//! ```text
//! u32 payload length | u32 CRC-32 of the payload | payload
//! ```
//!
//! (little-endian). A record is written with one positional write and made
//! durable with one `fdatasync`; the next record is only written after that,
//! so a crash can damage only the last record of the last segment. Reading
//! tells that torn tail apart from damage elsewhere: a bad record (short
//! header, zero or oversized length, CRC mismatch) whose claimed extent
//! reaches the end of the file, or followed only by zero bytes, is a torn
//! tail and is cut off; any other bad record is [`StoreError::Corrupt`].

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::StoreError;

const MAGIC: &[u8; 8] = b"ALLOTLOG";
const FORMAT: u32 = 1;
/// Bytes of the segment header.
pub(super) const HEADER: u64 = 12;
/// Bytes of a record's frame before its payload.
pub(super) const FRAME: usize = 8;
/// Larger claimed lengths are damage, not records (no batch comes close).
const MAX_RECORD: u64 = 1 << 31;

/// The file name of segment `seq`.
pub(super) fn segment_name(seq: u64) -> String {
    format!("{seq:016}.wal")
}

/// The sequence number of a segment file name.
pub(super) fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_suffix(".wal")?.parse().ok()
}

pub(super) fn io_error(what: &str, path: &Path, err: std::io::Error) -> StoreError {
    StoreError::Backend(format!("{what} {}: {err}", path.display()))
}

/// Makes a directory entry change (a created, renamed or removed file)
/// durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("syncing directory", dir, e))
}

/// A record under construction: the frame is reserved up front so that the
/// finished record is written from one buffer with no copy.
pub(super) struct RecordBuf {
    pub buf: Vec<u8>,
}

impl RecordBuf {
    pub fn new() -> Self {
        Self {
            buf: vec![0; FRAME],
        }
    }

    /// Fills in the frame; the buffer is then the whole record.
    fn seal(&mut self) -> Result<&[u8], StoreError> {
        let payload = &self.buf[FRAME..];
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&n| u64::from(n) < MAX_RECORD)
            .ok_or_else(|| {
                StoreError::Invalid(format!(
                    "a batch of {} bytes is too big for one log record",
                    payload.len()
                ))
            })?;
        let crc = crc32fast::hash(payload);
        self.buf[0..4].copy_from_slice(&len.to_le_bytes());
        self.buf[4..8].copy_from_slice(&crc.to_le_bytes());
        Ok(&self.buf)
    }
}

/// Why an append failed.
pub(super) enum AppendError {
    /// Nothing of the record remains: the segment is as before.
    Undone(StoreError),
    /// The segment could not be cut back: its tail is unknown.
    Broken(StoreError),
}

/// The segment being appended to.
pub(super) struct Segment {
    pub seq: u64,
    path: PathBuf,
    file: File,
    /// Bytes of valid content: where the next record goes.
    len: u64,
}

impl Segment {
    /// Creates segment `seq` (header written and durable, directory entry
    /// included).
    pub fn create(dir: &Path, seq: u64) -> Result<Segment, StoreError> {
        let path = dir.join(segment_name(seq));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_error("creating", &path, e))?;
        let mut header = Vec::with_capacity(HEADER as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&FORMAT.to_le_bytes());
        file.write_all(&header)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_error("writing", &path, e))?;
        sync_dir(dir)?;
        Ok(Segment {
            seq,
            path,
            file,
            len: HEADER,
        })
    }

    /// Opens an existing segment whose valid content is `len` bytes, to
    /// append after it.
    pub fn open(dir: &Path, seq: u64, len: u64) -> Result<Segment, StoreError> {
        let path = dir.join(segment_name(seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_error("opening", &path, e))?;
        Ok(Segment {
            seq,
            path,
            file,
            len,
        })
    }

    /// Bytes in the segment.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Appends a record and makes it durable (one write, one fdatasync).
    pub fn append(&mut self, record: &mut RecordBuf) -> Result<(), AppendError> {
        let bytes = record.seal().map_err(AppendError::Undone)?;
        let written = self
            .file
            .write_all_at(bytes, self.len)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(err) => {
                let err = io_error("appending to", &self.path, err);
                // After a failed fdatasync the page cache cannot be trusted
                // to hold the record or not: cut it off and make the cut
                // durable, or give up on this segment.
                match self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.sync_all())
                {
                    Ok(()) => Err(AppendError::Undone(err)),
                    Err(cut) => Err(AppendError::Broken(StoreError::Backend(format!(
                        "{err}; cutting the record off failed too: {cut}"
                    )))),
                }
            }
        }
    }
}

/// A torn tail cut off a segment when it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The segment file.
    pub path: PathBuf,
    /// Where the valid content ends (the file's length now).
    pub offset: u64,
    /// How many bytes were cut off.
    pub dropped: u64,
}

/// Reads every record of segment `seq` in order, handing each payload to
/// `record`. With `last` (the segment appended to most recently), a torn
/// tail is cut off the file (and reported); anywhere else, damage is
/// [`StoreError::Corrupt`]. Returns the length of the valid content.
pub(super) fn read_segment(
    dir: &Path,
    seq: u64,
    last: bool,
    mut record: impl FnMut(&[u8]) -> Result<(), StoreError>,
) -> Result<(u64, Option<TornTail>), StoreError> {
    let path = dir.join(segment_name(seq));
    let bytes = std::fs::read(&path).map_err(|e| io_error("reading", &path, e))?;
    let corrupt = |offset: usize, what: &str| {
        StoreError::Corrupt(format!(
            "log segment {} is damaged at byte {offset}: {what}",
            path.display()
        ))
    };
    if bytes.len() < HEADER as usize {
        // Only a crash while creating the last segment leaves a short
        // header, and nothing was written to it yet: the caller writes the
        // header again.
        if last {
            let torn = cut(&path, 0, bytes.len() as u64)?;
            return Ok((0, Some(torn)));
        }
        return Err(corrupt(0, "short header"));
    }
    if &bytes[..8] != MAGIC {
        return Err(corrupt(0, "not a log segment (bad magic)"));
    }
    let format = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if format != FORMAT {
        return Err(corrupt(
            8,
            &format!("unsupported format {format} (this build reads {FORMAT})"),
        ));
    }
    let mut pos = HEADER as usize;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        let problem = if rest.len() < FRAME {
            Some("short record header")
        } else {
            let len = u64::from(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]));
            let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
            let end = FRAME as u64 + len;
            if len == 0 || len >= MAX_RECORD {
                Some("impossible record length")
            } else if end > rest.len() as u64 {
                Some("record runs past the end of the file")
            } else {
                let payload = &rest[FRAME..end as usize];
                if crc32fast::hash(payload) != crc {
                    Some("checksum mismatch")
                } else {
                    record(payload)?;
                    pos += end as usize;
                    None
                }
            }
        };
        let Some(problem) = problem else {
            continue;
        };
        if last && torn_at(rest) {
            tracing::warn!(
                path = %path.display(),
                offset = pos,
                dropped = rest.len(),
                problem,
                "truncating the torn tail of the log (an unacknowledged write cut short by a crash)"
            );
            let torn = cut(&path, pos as u64, rest.len() as u64)?;
            return Ok((pos as u64, Some(torn)));
        }
        return Err(corrupt(pos, problem));
    }
    Ok((pos as u64, None))
}

/// True if a bad record at the start of `rest` can be the torn last write:
/// it claims to reach the end of the file (or beyond), or everything from it
/// on is zero (space the file system allocated but the write never filled).
fn torn_at(rest: &[u8]) -> bool {
    if rest.len() < FRAME || rest.iter().all(|&b| b == 0) {
        return true;
    }
    let len = u64::from(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]));
    FRAME as u64 + len >= rest.len() as u64
}

/// Cuts the file at `offset`, durably.
fn cut(path: &Path, offset: u64, dropped: u64) -> Result<TornTail, StoreError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| io_error("opening", path, e))?;
    file.set_len(offset)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error("truncating", path, e))?;
    Ok(TornTail {
        path: path.to_path_buf(),
        offset,
        dropped,
    })
}
