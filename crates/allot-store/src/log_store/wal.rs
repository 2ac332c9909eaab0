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
//! so a crash can damage only the last record of the last segment.
//!
//! The file is kept zero-filled [`PREALLOC`] bytes ahead of the last record
//! (zeros written, not `fallocate`d: writing into an allocated-but-unwritten
//! extent changes metadata too). Appending then rewrites blocks the file
//! already has, so its `fdatasync` flushes data only, instead of also
//! committing the new file size through the file system's journal on every
//! commit. A zero frame followed by zeros to the end of the file is
//! therefore the normal end of a segment.
//!
//! Reading tells a torn tail apart from damage elsewhere: a bad record
//! (short frame, impossible length, CRC mismatch, or a zero frame with data
//! after it) followed by no valid record is the torn last write and is cut
//! off; a bad record with a valid one after it is [`StoreError::Corrupt`],
//! as is any bad record in a segment other than the last.

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
/// How far ahead of the last record the file is kept zero-filled.
const PREALLOC: u64 = 4 << 20;
/// Zeros written per call while preallocating.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

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
    /// The file's size: zeros from `len` up to it.
    zeroed: u64,
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
            zeroed: HEADER,
        })
    }

    /// Opens an existing segment whose valid content is `len` bytes (zeros
    /// after it, as [`read_segment`] checked), to append after it.
    pub fn open(dir: &Path, seq: u64, len: u64) -> Result<Segment, StoreError> {
        let path = dir.join(segment_name(seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_error("opening", &path, e))?;
        let zeroed = file
            .metadata()
            .map_err(|e| io_error("reading the size of", &path, e))?
            .len()
            .max(len);
        Ok(Segment {
            seq,
            path,
            file,
            len,
            zeroed,
        })
    }

    /// Cuts the preallocated zeros off a segment no longer appended to.
    pub fn trim(&self) -> Result<(), StoreError> {
        self.file
            .set_len(self.len)
            .and_then(|()| self.file.sync_all())
            .map_err(|e| io_error("trimming", &self.path, e))
    }

    /// Zero-fills the file up to at least `end` plus [`PREALLOC`].
    fn prealloc(&mut self, end: u64) -> std::io::Result<()> {
        let target = end + PREALLOC;
        while self.zeroed < target {
            let n = (target - self.zeroed).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], self.zeroed)?;
            self.zeroed += n as u64;
        }
        Ok(())
    }

    /// Bytes in the segment.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Appends a record and makes it durable (one write, one fdatasync).
    pub fn append(&mut self, record: &mut RecordBuf) -> Result<(), AppendError> {
        let bytes = record.seal().map_err(AppendError::Undone)?;
        let end = self.len + bytes.len() as u64;
        // Made durable by the same fdatasync as the record.
        let zeroed = match end > self.zeroed {
            true => self.prealloc(end),
            false => Ok(()),
        };
        let written = zeroed
            .and_then(|()| self.file.write_all_at(bytes, self.len))
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
                    Ok(()) => {
                        self.zeroed = self.len;
                        Err(AppendError::Undone(err))
                    }
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
        let problem = match frame(rest) {
            Frame::End => break,
            Frame::Bad(problem) => problem,
            Frame::Record(payload) => {
                record(payload)?;
                pos += FRAME + payload.len();
                continue;
            }
        };
        // Only the last write can be torn, and nothing valid follows it.
        // (A record has a non-zero frame, so it starts at or before the
        // last non-zero byte.)
        let last_data = bytes.iter().rposition(|&b| b != 0).unwrap_or(0);
        let valid_after = (pos + 1..=last_data).any(|at| record_at(&bytes[at..]).is_some());
        if last && !valid_after {
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

/// What starts at some offset of a segment.
enum Frame<'a> {
    /// A valid record, with this payload.
    Record(&'a [u8]),
    /// Zeros to the end of the file: the end of the segment.
    End,
    /// Not a valid record, for this reason.
    Bad(&'static str),
}

fn frame(rest: &[u8]) -> Frame<'_> {
    if rest.len() < FRAME {
        return match rest.iter().all(|&b| b == 0) {
            true => Frame::End,
            false => Frame::Bad("short record frame"),
        };
    }
    let len = u64::from(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]));
    let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if len == 0 && crc == 0 {
        return match rest.iter().all(|&b| b == 0) {
            true => Frame::End,
            false => Frame::Bad("zero record frame followed by data"),
        };
    }
    if len == 0 || len >= MAX_RECORD {
        return Frame::Bad("impossible record length");
    }
    let Some(payload) = rest.get(FRAME..FRAME + len as usize) else {
        return Frame::Bad("record runs past the end of the file");
    };
    match crc32fast::hash(payload) == crc {
        true => Frame::Record(payload),
        false => Frame::Bad("checksum mismatch"),
    }
}

/// The payload of a valid record starting at `rest[0]`, if one does.
fn record_at(rest: &[u8]) -> Option<&[u8]> {
    match rest.get(..FRAME).is_some_and(|f| f[..4] != [0; 4]) {
        true => match frame(rest) {
            Frame::Record(payload) => Some(payload),
            _ => None,
        },
        false => None,
    }
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
