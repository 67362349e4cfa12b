//! Segment files: where the records live.
//!
//! The log is cut into segments of a fixed number of records (a power of two, chosen when the
//! store is created and kept in `meta`), in the directory next to the store
//! (`ledger.redb` → `ledger.segments/`). Segment `k` holds the records `[k << shift, (k + 1) <<
//! shift)`.
//!
//! - The segment the log ends in is open: `{k:016x}.log`, records appended as `len:u32le bytes`.
//!   The indexer appends to it, in batches, the records of the groups it applies, and syncs it
//!   (`fdatasync`, and the directory when a file was created) before every redb sync, whose
//!   `meta` keeps the segment's synced length. At open, bytes beyond that length are cut off:
//!   they belong to groups redb does not have, which journal replay appends again.
//! - A full segment is sealed once redb is synced past its end: compressed into
//!   `{k:016x}.zst` (written under a temporary name, synced, renamed, directory synced), and the
//!   `.log` file is then removed. A sealed file is `SLUICEZ1 first:u64le count:u64le`, then
//!   independently decodable zstd frames of [`FRAME_RECORDS`] records each (`len:u32le bytes`
//!   inside), then the frames' offsets (`u64le` each, plus the end), their number (`u64le`)
//!   and `SLUICEZ1` again. Reading one record decodes one frame. Leaves hash the canonical
//!   bytes, so compression never touches verification.
//!
//! Sealed segments are never written again: they can be copied off the host as they are sealed
//! (the retention story in docs/records.md).
//!
//! The files are the daemon's own but are parsed as untrusted bytes: every length is bounded,
//! nothing panics on a damaged file, and damage is reported with the file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Default records per segment (at about 1 KB a record, 16 MiB before compression).
pub const DEFAULT_SEGMENT_RECORDS: u64 = 16 * 1024;
/// Records per zstd frame of a sealed segment.
pub const FRAME_RECORDS: u64 = 256;
/// Largest record read back (a bound on what a damaged length can make a reader allocate).
pub const MAX_RECORD_BYTES: u64 = 16 * 1024 * 1024;
const SEALED_MAGIC: &[u8; 8] = b"SLUICEZ1";
const SEALED_HEAD: u64 = 24;
const ZSTD_LEVEL: i32 = 3;

/// The segment directory of the store at `path`.
pub fn segments_dir(path: &Path) -> PathBuf {
    path.with_extension("segments")
}

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("ledger segment {path}: {context}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("ledger segment {path} is damaged: {reason}", path = .path.display())]
    Damaged { path: PathBuf, reason: String },
}

impl SegmentError {
    fn damaged(path: &Path, reason: impl Into<String>) -> SegmentError {
        SegmentError::Damaged { path: path.to_path_buf(), reason: reason.into() }
    }
}

fn io<'a>(path: &'a Path, context: &'static str) -> impl Fn(std::io::Error) -> SegmentError + 'a {
    move |source| SegmentError::Io { path: path.to_path_buf(), context, source }
}

enum Kind {
    /// `offsets[i]` is where record `first + i` starts (its length prefix); `len` the bytes
    /// written (and readable) so far.
    Open { offsets: Vec<u64>, len: u64 },
    /// `frames[f]` is where frame `f` starts; the last entry is where the frames end.
    Sealed { frames: Vec<u64>, count: u64 },
}

struct Segment {
    path: PathBuf,
    /// Kept open for open segments only; a sealed one is opened for each read, so a long log
    /// does not hold a descriptor per segment.
    file: Option<Arc<File>>,
    kind: Kind,
}

/// Appended but not yet written (the indexer writes a batch at once).
#[derive(Default)]
struct Pending {
    /// Segment number, where its bytes start, the bytes, and the record offsets in them.
    runs: Vec<(u64, u64, Vec<u8>, Vec<u64>)>,
}

/// Every segment of a store: read by snapshots and the writer, written by the indexer and replay.
pub(super) struct Segments {
    dir: PathBuf,
    shift: u32,
    table: RwLock<BTreeMap<u64, Segment>>,
    /// Only the indexer (or replay) touches these.
    pending: std::sync::Mutex<Pending>,
    /// Open segments written since the last sync, and whether a file was created.
    dirty: std::sync::Mutex<(BTreeSet<u64>, bool)>,
}

impl Segments {
    /// Opens the segments of a store of `size` records whose open segment was synced at
    /// `open_len` bytes: loads every sealed segment's frame table, scans the open segments, cuts
    /// the last one back to `open_len`, and removes files beyond the log (left by groups redb
    /// does not have; replay writes them again).
    pub(super) fn open(dir: &Path, shift: u32, size: u64, open_len: u64) -> Result<Segments, SegmentError> {
        match std::fs::create_dir(dir) {
            Ok(()) => sync_dir(dir.parent().unwrap_or(Path::new(".")))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(dir, "create directory")(e)),
        }
        let per = 1u64 << shift;
        let last = size >> shift;
        let mut table = BTreeMap::new();
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir, "list"))? {
            let entry = entry.map_err(io(dir, "list"))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        let mut removed = false;
        for name in &names {
            let Some((stem, ext)) = name.split_once('.') else { continue };
            let Ok(k) = u64::from_str_radix(stem, 16) else { continue };
            let path = dir.join(name);
            let beyond = k > last || (k == last && ext == "zst");
            if ext == "tmp" || (beyond && (ext == "log" || ext == "zst")) {
                std::fs::remove_file(&path).map_err(io(&path, "remove leftover"))?;
                removed = true;
            }
        }
        for k in 0..=last {
            let first = k << shift;
            let count = if k == last { size - first } else { per };
            let sealed = dir.join(format!("{k:016x}.zst"));
            let log = dir.join(format!("{k:016x}.log"));
            if k < last && sealed.exists() {
                let seg = load_sealed(&sealed, first, count)?;
                if log.exists() {
                    std::fs::remove_file(&log).map_err(io(&log, "remove sealed log"))?;
                    removed = true;
                }
                table.insert(k, seg);
                continue;
            }
            if !log.exists() {
                if count == 0 {
                    continue;
                }
                return Err(SegmentError::damaged(
                    &log,
                    format!("missing, but the store holds records {first}..{} in it", first + count),
                ));
            }
            let len = if k == last { Some(open_len) } else { None };
            table.insert(k, load_open(&log, count, len)?);
        }
        if removed {
            sync_dir(dir)?;
        }
        Ok(Segments {
            dir: dir.to_path_buf(),
            shift,
            table: RwLock::new(table),
            pending: Default::default(),
            dirty: Default::default(),
        })
    }

    fn read_table(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Segment>> {
        match self.table.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn write_table(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Segment>> {
        match self.table.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Records `[from, to)` in order, read from their segments (`to` must not pass the log size
    /// the caller saw published).
    pub(super) fn for_each(
        &self,
        from: u64,
        to: u64,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), crate::store::LedgerError>,
    ) -> Result<(), crate::store::LedgerError> {
        let mut index = from;
        while index < to {
            let k = index >> self.shift;
            let first = k << self.shift;
            let (path, file, what) = {
                let table = self.read_table();
                let Some(seg) = table.get(&k) else {
                    return Err(SegmentError::damaged(&self.dir, format!("no segment holds record {index}")).into());
                };
                let what = match &seg.kind {
                    Kind::Open { offsets, len } => {
                        let local = (index - first) as usize;
                        let end_local = ((to - first) as usize).min(offsets.len());
                        let start = offsets.get(local).copied();
                        let end = offsets.get(end_local).copied().unwrap_or(*len);
                        Where::Open { start, end, count: end_local.saturating_sub(local) as u64 }
                    }
                    Kind::Sealed { frames, count } => {
                        let f = (index - first) / FRAME_RECORDS;
                        let start = frames.get(f as usize).copied();
                        let end = frames.get(f as usize + 1).copied();
                        Where::Frame { start, end, frame_first: first + f * FRAME_RECORDS, count: *count }
                    }
                };
                (seg.path.clone(), seg.file.clone(), what)
            };
            let file = match file {
                Some(f) => f,
                None => Arc::new(File::open(&path).map_err(io(&path, "open"))?),
            };
            match what {
                Where::Open { start, end, count } => {
                    let Some(start) = start else {
                        return Err(SegmentError::damaged(&path, format!("record {index} is not in it")).into());
                    };
                    let bytes = read_at(&file, &path, start, end)?;
                    let mut at = 0usize;
                    for i in 0..count {
                        let rec = next_record(&bytes, &mut at).ok_or_else(|| {
                            SegmentError::damaged(&path, format!("record {} is cut short", index + i))
                        })?;
                        f(index + i, rec)?;
                    }
                    if count == 0 {
                        return Err(SegmentError::damaged(&path, format!("record {index} is not in it")).into());
                    }
                    index += count;
                }
                Where::Frame { start: Some(start), end: Some(end), frame_first, count } => {
                    let raw = decode_frame(&file, &path, start, end)?;
                    let mut at = 0usize;
                    let in_frame = FRAME_RECORDS.min(count.saturating_sub(frame_first - first));
                    for i in 0..in_frame {
                        let rec = next_record(&raw, &mut at).ok_or_else(|| {
                            SegmentError::damaged(&path, format!("frame of record {} is cut short", frame_first + i))
                        })?;
                        let n = frame_first + i;
                        if n >= index && n < to {
                            f(n, rec)?;
                        }
                    }
                    index = (frame_first + in_frame).max(index + 1);
                }
                Where::Frame { .. } => {
                    return Err(SegmentError::damaged(&path, format!("no frame holds record {index}")).into());
                }
            }
        }
        Ok(())
    }

    /// The record at `index` (below the published size).
    pub(super) fn read(&self, index: u64) -> Result<Vec<u8>, crate::store::LedgerError> {
        let mut out = Vec::new();
        self.for_each(index, index + 1, |_, b| {
            out = b.to_vec();
            Ok(())
        })?;
        Ok(out)
    }

    /// Queues a record for the next [`Segments::flush`] (indexer and replay only, in log order).
    pub(super) fn append(&self, index: u64, bytes: &[u8]) -> Result<(), SegmentError> {
        let k = index >> self.shift;
        let mut pending = match self.pending.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let need_run = !matches!(pending.runs.last(), Some((rk, ..)) if *rk == k);
        if need_run {
            let start = {
                let table = self.read_table();
                match table.get(&k) {
                    Some(Segment { kind: Kind::Open { offsets, len }, path, .. }) => {
                        if (k << self.shift) + offsets.len() as u64 != index {
                            return Err(SegmentError::damaged(
                                path,
                                format!("record {index} appended after {} records", offsets.len()),
                            ));
                        }
                        *len
                    }
                    Some(seg) => return Err(SegmentError::damaged(&seg.path, "append to a sealed segment")),
                    None if index == k << self.shift => 0,
                    None => {
                        return Err(SegmentError::damaged(
                            &self.dir,
                            format!("record {index} would start segment {k:016x} in its middle"),
                        ))
                    }
                }
            };
            pending.runs.push((k, start, Vec::with_capacity(64 * 1024), Vec::new()));
        }
        let Some((_, start, buf, offsets)) = pending.runs.last_mut() else {
            return Err(SegmentError::damaged(&self.dir, "no run to append to"));
        };
        offsets.push(*start + buf.len() as u64);
        let len = u32::try_from(bytes.len()).map_err(|_| SegmentError::damaged(&self.dir, "record too large"))?;
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(bytes);
        Ok(())
    }

    /// Writes the queued records (one `pwrite` per segment), making them readable.
    pub(super) fn flush(&self) -> Result<(), SegmentError> {
        let runs = {
            let mut pending = match self.pending.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            std::mem::take(&mut pending.runs)
        };
        let mut dirty = match self.dirty.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for (k, start, buf, new_offsets) in runs {
            let existing = self.read_table().get(&k).map(|s| (s.file.clone(), s.path.clone()));
            let (file, path) = match existing {
                Some((Some(f), path)) => (f, path),
                Some((None, path)) => return Err(SegmentError::damaged(&path, "append to a sealed segment")),
                None => {
                    let path = self.dir.join(format!("{k:016x}.log"));
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&path)
                        .map_err(io(&path, "create"))?;
                    let file = Arc::new(file);
                    self.write_table().insert(
                        k,
                        Segment {
                            path: path.clone(),
                            file: Some(file.clone()),
                            kind: Kind::Open { offsets: Vec::new(), len: 0 },
                        },
                    );
                    dirty.1 = true;
                    (file, path)
                }
            };
            file.write_all_at(&buf, start).map_err(io(&path, "write records"))?;
            let mut table = self.write_table();
            if let Some(Segment { kind: Kind::Open { offsets, len }, .. }) = table.get_mut(&k) {
                offsets.extend_from_slice(&new_offsets);
                *len = start + buf.len() as u64;
            }
            dirty.0.insert(k);
        }
        Ok(())
    }

    /// Bytes written to the segment holding record `size` (the open one), for `meta`.
    pub(super) fn open_len(&self, size: u64) -> u64 {
        match self.read_table().get(&(size >> self.shift)) {
            Some(Segment { kind: Kind::Open { len, .. }, .. }) => *len,
            _ => 0,
        }
    }

    /// Flushes and syncs every segment written since the last sync (before a redb sync).
    pub(super) fn sync(&self) -> Result<(), SegmentError> {
        self.flush()?;
        let mut dirty = match self.dirty.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for k in std::mem::take(&mut dirty.0) {
            let seg = self.read_table().get(&k).and_then(|s| Some((s.file.clone()?, s.path.clone())));
            if let Some((file, path)) = seg {
                file.sync_data().map_err(io(&path, "sync"))?;
            }
        }
        if std::mem::take(&mut dirty.1) {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Seals every full open segment that ends at or before `synced` records (redb is synced
    /// past it, so it is never cut back or appended to again).
    pub(super) fn seal_full(&self, synced: u64) -> Result<(), SegmentError> {
        let per = 1u64 << self.shift;
        let ready: Vec<u64> = self
            .read_table()
            .iter()
            .filter(|(k, s)| matches!(s.kind, Kind::Open { .. }) && ((**k + 1) << self.shift) <= synced)
            .map(|(k, _)| *k)
            .collect();
        for k in ready {
            let (file, log) = match self.read_table().get(&k) {
                Some(Segment { file: Some(file), path, .. }) => (file.clone(), path.clone()),
                _ => continue,
            };
            let first = k << self.shift;
            let sealed = self.dir.join(format!("{k:016x}.zst"));
            let tmp = self.dir.join(format!("{k:016x}.tmp"));
            let len = file.metadata().map_err(io(&log, "stat"))?.len();
            let raw = read_at(&file, &log, 0, len)?;
            write_sealed(&raw, &tmp, first, per)?;
            std::fs::rename(&tmp, &sealed).map_err(io(&sealed, "rename into place"))?;
            sync_dir(&self.dir)?;
            let seg = load_sealed(&sealed, first, per)?;
            self.write_table().insert(k, seg);
            std::fs::remove_file(&log).map_err(io(&log, "remove after sealing"))?;
            if let Ok(mut d) = self.dirty.lock() {
                d.0.remove(&k);
            }
        }
        Ok(())
    }
}

enum Where {
    Open { start: Option<u64>, end: u64, count: u64 },
    Frame { start: Option<u64>, end: Option<u64>, frame_first: u64, count: u64 },
}

fn sync_dir(dir: &Path) -> Result<(), SegmentError> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir, "sync directory"))
}

fn read_at(file: &File, path: &Path, start: u64, end: u64) -> Result<Vec<u8>, SegmentError> {
    let len = end.checked_sub(start).ok_or_else(|| SegmentError::damaged(path, "range ends before it starts"))?;
    if len > MAX_RECORD_BYTES * FRAME_RECORDS.max(1) * 4 {
        return Err(SegmentError::damaged(path, format!("a read of {len} bytes is beyond any segment")));
    }
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, start).map_err(io(path, "read"))?;
    Ok(buf)
}

/// The next `len:u32le bytes` record in `buf` from `at`.
fn next_record<'a>(buf: &'a [u8], at: &mut usize) -> Option<&'a [u8]> {
    let head = buf.get(*at..at.checked_add(4)?)?;
    let len = u32::from_le_bytes(head.try_into().ok()?) as usize;
    if len as u64 > MAX_RECORD_BYTES {
        return None;
    }
    let start = *at + 4;
    let rec = buf.get(start..start.checked_add(len)?)?;
    *at = start + len;
    Some(rec)
}

/// Scans an open segment: exactly `count` records, ending at `len` bytes when given (the file
/// is then cut back to it).
fn load_open(path: &Path, count: u64, len: Option<u64>) -> Result<Segment, SegmentError> {
    let file = OpenOptions::new().read(true).write(true).open(path).map_err(io(path, "open"))?;
    let file_len = file.metadata().map_err(io(path, "stat"))?.len();
    let len = match len {
        Some(len) if len > file_len => {
            return Err(SegmentError::damaged(
                path,
                format!("{file_len} bytes long, but the store synced {len} bytes of it"),
            ))
        }
        Some(len) => len,
        None => file_len,
    };
    let bytes = read_at(&file, path, 0, len)?;
    let mut offsets = Vec::with_capacity(count as usize);
    let mut at = 0usize;
    while at < bytes.len() {
        offsets.push(at as u64);
        if next_record(&bytes, &mut at).is_none() {
            return Err(SegmentError::damaged(path, format!("record at byte {} is cut short", offsets.len())));
        }
    }
    if offsets.len() as u64 != count {
        return Err(SegmentError::damaged(
            path,
            format!("holds {} records where the store has {count} in it", offsets.len()),
        ));
    }
    if file_len > len {
        file.set_len(len).map_err(io(path, "cut back to the synced length"))?;
        file.sync_data().map_err(io(path, "sync"))?;
    }
    Ok(Segment { path: path.to_path_buf(), file: Some(Arc::new(file)), kind: Kind::Open { offsets, len } })
}

fn write_sealed(raw: &[u8], tmp: &Path, first: u64, count: u64) -> Result<(), SegmentError> {
    let mut out = Vec::with_capacity(raw.len() / 4);
    out.extend_from_slice(SEALED_MAGIC);
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    let mut frames = Vec::new();
    let mut at = 0usize;
    let mut n = 0u64;
    // Each frame carries its checksum: damage is reported as such, not decoded into garbage.
    let mut z = zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(io(tmp, "start compressing"))?;
    z.include_checksum(true).map_err(io(tmp, "start compressing"))?;
    while n < count {
        let start = at;
        for _ in 0..FRAME_RECORDS.min(count - n) {
            if next_record(raw, &mut at).is_none() {
                return Err(SegmentError::damaged(tmp, format!("record {} is cut short", first + n)));
            }
            n += 1;
        }
        frames.push(out.len() as u64);
        let chunk = raw.get(start..at).unwrap_or_default();
        let frame = z.compress(chunk).map_err(io(tmp, "compress"))?;
        out.extend_from_slice(&frame);
    }
    frames.push(out.len() as u64);
    for f in &frames {
        out.extend_from_slice(&f.to_le_bytes());
    }
    out.extend_from_slice(&(frames.len() as u64 - 1).to_le_bytes());
    out.extend_from_slice(SEALED_MAGIC);
    let file =
        OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(tmp).map_err(io(tmp, "create"))?;
    file.write_all_at(&out, 0).map_err(io(tmp, "write"))?;
    file.sync_all().map_err(io(tmp, "sync"))?;
    Ok(())
}

fn load_sealed(path: &Path, first: u64, count: u64) -> Result<Segment, SegmentError> {
    let file = File::open(path).map_err(io(path, "open"))?;
    let len = file.metadata().map_err(io(path, "stat"))?.len();
    let bad = |r: String| SegmentError::damaged(path, r);
    if len < SEALED_HEAD + 16 {
        return Err(bad(format!("{len} bytes is too short")));
    }
    let head = read_at(&file, path, 0, SEALED_HEAD)?;
    let tail = read_at(&file, path, len - 16, len)?;
    let u64_at = |b: &[u8], at: usize| -> u64 {
        b.get(at..at + 8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes).unwrap_or(u64::MAX)
    };
    if head.get(..8) != Some(SEALED_MAGIC.as_slice()) || tail.get(8..) != Some(SEALED_MAGIC.as_slice()) {
        return Err(bad("bad magic".into()));
    }
    if u64_at(&head, 8) != first || u64_at(&head, 16) != count {
        return Err(bad(format!(
            "says it holds {} records from {}, the store expects {count} from {first}",
            u64_at(&head, 16),
            u64_at(&head, 8)
        )));
    }
    let n = u64_at(&tail, 0);
    if n != count.div_ceil(FRAME_RECORDS) {
        return Err(bad(format!("{n} frames for {count} records")));
    }
    let table_len = (n + 1) * 8;
    let table_start = (len - 16).checked_sub(table_len).ok_or_else(|| bad("frame table is cut short".into()))?;
    let table = read_at(&file, path, table_start, len - 16)?;
    let frames: Vec<u64> = (0..=n as usize).map(|i| u64_at(&table, i * 8)).collect();
    let ordered = frames.windows(2).all(|w| matches!(w, [a, b] if a < b));
    if frames.first() != Some(&SEALED_HEAD) || frames.last() != Some(&table_start) || !ordered {
        return Err(bad("frame table does not match the file".into()));
    }
    Ok(Segment { path: path.to_path_buf(), file: None, kind: Kind::Sealed { frames, count } })
}

fn decode_frame(file: &File, path: &Path, start: u64, end: u64) -> Result<Vec<u8>, SegmentError> {
    let z = read_at(file, path, start, end)?;
    let limit = FRAME_RECORDS * (MAX_RECORD_BYTES + 4);
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(z.as_slice())
        .map_err(io(path, "decompress"))?
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| SegmentError::damaged(path, format!("a frame does not decompress: {e}")))?;
    Ok(out)
}
