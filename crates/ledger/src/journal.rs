//! The commit journal: what makes a group durable in one small sequential write.
//!
//! A durable redb commit rewrites every B-tree page the group touched, in place of scattered
//! pages, and then syncs them: on the disks these daemons run on that is 350–700 µs per group,
//! which is the whole latency budget of a proxied request. The journal is a redo log in front of
//! redb: the writer appends the group's effects (state writes, sealed records, the checkpoint) to
//! one preallocated file with a single `pwrite` and `fdatasync`, answers the callers, and hands
//! the same effects to the store's indexer thread, which writes them to redb in batches and
//! syncs redb at least every second.
//!
//! The file is two halves, written one after the other. When the half being written is full, the
//! writer moves to the other one, which it may reuse once redb is synced past every entry in it:
//! the writer asked for that sync when it left that half, a whole half's worth of groups earlier,
//! so the move normally waits for nothing but the new half's header (one small write). A
//! single-region journal made the writer wait, when it filled, for a redb sync of everything
//! written since the last one: milliseconds during which every caller on the host waited.
//!
//! After a crash, redb comes back at its last synced commit, and [`Journal::open`] returns the
//! intact entries of both halves, the older half's first, as one run of consecutive group
//! sequence numbers (it stops at the first damaged or out-of-sequence entry), to be applied again
//! at open (entries redb already holds are skipped by their group sequence number, which redb
//! stores with each group).
//!
//! Layout (version 3): two halves of equal length, each a 4 KiB header (magic, version, the
//! store's journal id, the half's lap number, the half's length) and then entries, each
//! `magic:u32 len:u32 gseq:u64 payload[len] digest[32]`. Every move into a half (and every reset)
//! gives it a lap number higher than any before, so the half with the higher lap holds the later
//! entries, and entries left in a half from an earlier lap fail their digest. The writer's
//! entries (magic `SJE2`) carry `sha256(lap ‖ gseq ‖ len ‖ skeleton)`, where the skeleton is the
//! payload with each record's canonical bytes replaced by the record's Merkle leaf hash
//! (`SHA-256(0x00 ‖ record)`, which the writer computed when sealing): the record bytes are
//! hashed once per record, not twice, and a change to any byte of the payload still changes the
//! digest (a record byte changes its leaf hash; every other byte, length prefixes included, is
//! in the skeleton as it is). Reading such an entry decodes the payload (strictly: an entry that
//! does not decode is damaged), hashes its records, and checks the digest. Entries with magic
//! `SJE1` carry `sha256(lap ‖ gseq ‖ len ‖ payload)` (what version 1 journals hold, and what
//! [`Journal::append`] writes for payloads that are not a group's effects); both are read.
//! Versions 1 and 2 are single-region journals (one header, entries after it), read at open and
//! rewritten in the two-half layout by the reset that follows replay; a build that reads only
//! those refuses version 3 rather than misreading it and losing answered groups.
//! The file is written full of zeros once, at creation (under a temporary name, renamed when
//! complete), so appends never change its size and a sync never has to write file metadata.
//! Entries start on 4 KiB boundaries and are written as whole blocks with `O_DIRECT | O_DSYNC`
//! (one `pwrite` that returns once the block is on stable storage: 120 µs here, against 180 µs
//! for a buffered `pwrite` and `fdatasync`); where the file system refuses `O_DIRECT` (tmpfs),
//! writes are buffered and followed by `fdatasync`. A torn entry fails its hash and ends the
//! journal; so do entries left from an earlier lap, even if a store restored from an older copy
//! expects their sequence numbers.
//!
//! The file is the daemon's own, but it is still parsed as untrusted bytes: every length is
//! bounded, nothing panics on a damaged file, and damage is reported with the file and offset.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::merkle::{leaf_hash, Hash};

const FILE_MAGIC: &[u8; 8] = b"SLUICEJ1";
/// Written in every header: the two-half layout.
const VERSION: u32 = 3;
/// The oldest version read: versions 1 and 2 are single-region journals, read at open (version 1
/// holds no `SJE2` entries).
const VERSION_PAYLOAD_DIGESTS: u32 = 1;
/// Every half starts with a header this long; its entries follow.
pub const HEADER_LEN: u64 = 4096;
/// The fewest bytes a journal file has: two halves, each a header and one entry block.
pub const MIN_CAPACITY: u64 = 4 * HEADER_LEN;
/// An entry whose digest covers its payload ([`Journal::append`]).
const ENTRY_MAGIC: u32 = 0x534a_4531; // "SJE1"
/// An entry whose digest covers its payload's skeleton ([`Journal::append_group`]).
const ENTRY_MAGIC_GROUP: u32 = 0x534a_4532; // "SJE2"
const ENTRY_HEAD: u64 = 16;
const ENTRY_TAIL: u64 = 32;
/// Entries start on, and are written in, whole blocks of this size (what `O_DIRECT` needs).
const BLOCK: u64 = 4096;

/// Default size of the journal file.
pub const DEFAULT_CAPACITY: u64 = 32 * 1024 * 1024;
/// Largest entry payload read or written (a bound on what a damaged length field can make the
/// reader allocate; bigger groups are committed to redb directly).
pub const MAX_PAYLOAD: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("ledger journal {path}: {context}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("ledger journal {path} is not a sluice journal ({reason}); move it aside if the store is intact, or restore both from backup", path = .path.display())]
    Foreign { path: PathBuf, reason: String },
}

/// One intact entry read back at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub gseq: u64,
    pub payload: Vec<u8>,
}

/// The open journal (owned by the writer thread).
#[derive(Debug)]
pub struct Journal {
    /// Buffered handle, for reading at open.
    file: File,
    /// Where entries are written.
    out: BlockWriter,
    path: PathBuf,
    id: u64,
    /// Length of each half, header included (whole blocks).
    half: u64,
    /// Each half's lap number (first, second); the half with the higher one holds the later
    /// entries.
    laps: (u64, u64),
    /// The highest lap number written or tried (a header write that failed may still have
    /// reached the disk): every new lap is above it, so no two halves ever share one.
    top_lap: u64,
    /// The half entries are appended to.
    active: Half,
    /// Where the next entry goes (a file offset inside the active half).
    end: u64,
    /// Opened from a single-region journal (version 1 or 2): read at open, and never appended to
    /// before [`Journal::reset`] rewrites it in two halves.
    single: bool,
}

impl Journal {
    /// Opens the journal at `path` for the store whose journal id is `id`, creating (and
    /// zero-filling) it if missing or empty, and returns the intact entries in order (the older
    /// half's, then the newer half's), up to the first damaged or non-consecutive one, and
    /// whether the file was missing (an empty file is an operator's way to start a new journal on
    /// purpose). The caller applies the entries and then calls [`Journal::reset`] before
    /// appending: entries behind a damaged one may still verify in the current lap, and must not
    /// be picked up behind new ones.
    pub fn open(path: &Path, id: u64, capacity: u64) -> Result<(Journal, Vec<Entry>, bool), JournalError> {
        Journal::open_with(path, id, capacity, true)
    }

    /// [`Journal::open`], choosing whether to try `O_DIRECT` (tests cover both ways).
    pub fn open_with(
        path: &Path,
        id: u64,
        capacity: u64,
        direct: bool,
    ) -> Result<(Journal, Vec<Entry>, bool), JournalError> {
        let io = |context: &'static str| move |source| JournalError::Io { path: path.to_path_buf(), context, source };
        let (len, missing) = match std::fs::metadata(path) {
            Ok(m) => (m.len(), false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, true),
            Err(e) => return Err(io("stat")(e)),
        };
        if len == 0 {
            let half = half_of(capacity);
            let file = create(path, id, half)?;
            let out = BlockWriter::open(path, direct).map_err(io("open for writing"))?;
            let journal = Journal {
                file,
                out,
                path: path.to_path_buf(),
                id,
                half,
                laps: (1, 0),
                top_lap: 1,
                active: Half::First,
                end: HEADER_LEN,
                single: false,
            };
            return Ok((journal, Vec::new(), missing));
        }
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(io("open"))?;
        let foreign = |reason: String| JournalError::Foreign { path: path.to_path_buf(), reason };
        let first = read_header(&file, 0, id).map_err(|r| foreign(r.to_string()))?;
        let out = BlockWriter::open(path, direct).map_err(io("open for writing"))?;
        let mut journal = Journal {
            file,
            out,
            path: path.to_path_buf(),
            id,
            half: 0,
            laps: (first.lap, first.lap),
            top_lap: first.lap,
            active: Half::First,
            end: 0,
            single: false,
        };
        let entries = if first.version == VERSION {
            let half = first.half;
            if half < MIN_CAPACITY / 2 || !half.is_multiple_of(BLOCK) || half.checked_mul(2).is_none_or(|l| l > len) {
                return Err(foreign(format!(
                    "its halves are {half} bytes long, which a file of {len} bytes cannot hold"
                )));
            }
            let second = read_header(&journal.file, half, id)
                .map_err(|r| foreign(format!("the second half's header (at byte {half}): {r}")))?;
            if second.version != VERSION || second.half != half {
                return Err(foreign(format!(
                    "the second half's header (at byte {half}) is version {} with halves of {} bytes, the first's version {VERSION} with {half}",
                    second.version, second.half
                )));
            }
            if second.lap == first.lap {
                return Err(foreign(format!("both halves are at lap {}", first.lap)));
            }
            journal.half = half;
            journal.laps = (first.lap, second.lap);
            journal.top_lap = first.lap.max(second.lap);
            journal.scan()
        } else {
            // One region from the header to the end of the file.
            let region = len / BLOCK * BLOCK;
            journal.half = half_of(region);
            journal.single = true;
            let mut out = Vec::new();
            journal.end = journal.scan_region(0, region, first.lap, &mut out);
            out
        };
        Ok((journal, entries, false))
    }

    /// Reads both halves, the older lap first, each from its start until the first entry that is
    /// damaged, torn, or does not follow the one before (across the halves too).
    fn scan(&mut self) -> Vec<Entry> {
        let (older, newer) =
            if self.laps.0 < self.laps.1 { (Half::First, Half::Second) } else { (Half::Second, Half::First) };
        let mut out = Vec::new();
        self.scan_half(older, &mut out);
        self.active = newer;
        self.end = self.scan_half(newer, &mut out);
        out
    }

    /// [`Journal::scan_region`] over one half, under that half's lap.
    fn scan_half(&self, h: Half, out: &mut Vec<Entry>) -> u64 {
        let start = self.start_of(h);
        self.scan_region(start, start + self.half, self.lap(h), out)
    }

    /// Appends to `out` the entries of the region `[start, stop)` (a header, then entries) that
    /// verify under `lap` and follow `out`'s last one; returns where the last of them ends.
    fn scan_region(&self, start: u64, stop: u64, lap: u64, out: &mut Vec<Entry>) -> u64 {
        let mut at = start + HEADER_LEN;
        while let Some(entry) = self.read_entry(at, stop, lap) {
            if let Some(prev) = out.last() {
                if prev.gseq.checked_add(1) != Some(entry.gseq) {
                    break;
                }
            }
            at += entry_blocks(entry.payload.len() as u64);
            out.push(entry);
        }
        at
    }

    /// The entry at `at` (ending before `stop`, verified under `lap`), or `None` if there is none
    /// intact there.
    fn read_entry(&self, at: u64, stop: u64, lap: u64) -> Option<Entry> {
        if at + ENTRY_HEAD + ENTRY_TAIL > stop {
            return None;
        }
        let mut head = [0u8; ENTRY_HEAD as usize];
        self.file.read_exact_at(&mut head, at).ok()?;
        let magic = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let len = u64::from(u32::from_le_bytes([head[4], head[5], head[6], head[7]]));
        let mut g = [0u8; 8];
        g.copy_from_slice(&head[8..16]);
        let gseq = u64::from_le_bytes(g);
        if (magic != ENTRY_MAGIC && magic != ENTRY_MAGIC_GROUP)
            || len > MAX_PAYLOAD
            || at + ENTRY_HEAD + len + ENTRY_TAIL > stop
        {
            return None;
        }
        let mut body = vec![0u8; (len + ENTRY_TAIL) as usize];
        self.file.read_exact_at(&mut body, at + ENTRY_HEAD).ok()?;
        let (payload, tail) = body.split_at(len as usize);
        let intact = if magic == ENTRY_MAGIC {
            digest(lap, gseq, payload).as_slice() == tail
        } else {
            // A payload that does not decode is damaged whatever its digest says.
            match GroupEffects::decode_spans(payload) {
                Ok((fx, spans)) => {
                    let leaves: Vec<Hash> = fx.records.iter().map(|r| leaf_hash(&r.canonical)).collect();
                    group_digest(lap, gseq, payload, &spans, &leaves).is_some_and(|d| d.as_slice() == tail)
                }
                Err(_) => false,
            }
        };
        if !intact {
            return None;
        }
        let payload = payload.to_vec();
        Some(Entry { gseq, payload })
    }

    fn start_of(&self, half: Half) -> u64 {
        match half {
            Half::First => 0,
            Half::Second => self.half,
        }
    }

    fn lap(&self, half: Half) -> u64 {
        match half {
            Half::First => self.laps.0,
            Half::Second => self.laps.1,
        }
    }

    /// Where the active half ends.
    fn stop(&self) -> u64 {
        self.start_of(self.active) + self.half
    }

    /// Whether an entry of `payload_len` bytes fits after the current end of the half being
    /// written.
    pub fn fits(&self, payload_len: usize) -> bool {
        !self.single && payload_len as u64 <= MAX_PAYLOAD && self.end + entry_blocks(payload_len as u64) <= self.stop()
    }

    /// Whether an entry of `payload_len` bytes fits in an empty half (after
    /// [`Journal::switch`]); a larger group cannot be journaled at all.
    pub fn fits_in_half(&self, payload_len: usize) -> bool {
        payload_len as u64 <= MAX_PAYLOAD && HEADER_LEN + entry_blocks(payload_len as u64) <= self.half
    }

    /// Whether writes bypass the page cache (`O_DIRECT | O_DSYNC`).
    pub fn direct(&self) -> bool {
        self.out.direct
    }

    /// Bytes of entries in the half being written.
    #[cfg(test)]
    fn used(&self) -> u64 {
        self.end.saturating_sub(self.start_of(self.active) + HEADER_LEN)
    }

    /// Appends one entry, its digest over the whole payload, and waits until it is on stable
    /// storage. The caller checked [`Journal::fits`]. On error the entry may or may not be on
    /// disk.
    pub fn append(&mut self, gseq: u64, payload: &[u8]) -> Result<(), JournalError> {
        let digest = digest(self.lap(self.active), gseq, payload);
        self.write_entry(ENTRY_MAGIC, gseq, payload, digest)
    }

    /// Appends one group's effects, as [`GroupEffects::encode_spans`] wrote them into `payload`
    /// with the spans of its records' canonical bytes, and those records' leaf hashes (as the
    /// writer computed them when sealing): the digest covers the payload with each record
    /// replaced by its leaf hash, so the record bytes are not hashed a second time. Waits until
    /// the entry is on stable storage. On error the entry may or may not be on disk.
    ///
    /// The leaves must be the records' leaf hashes: an entry written with others never reads
    /// back (it counts as damaged, and ends the journal).
    pub fn append_group(
        &mut self,
        gseq: u64,
        payload: &[u8],
        spans: &[std::ops::Range<usize>],
        leaves: &[Hash],
    ) -> Result<(), JournalError> {
        let Some(digest) = group_digest(self.lap(self.active), gseq, payload, spans, leaves) else {
            return Err(JournalError::Io {
                path: self.path.clone(),
                context: "append",
                source: std::io::Error::other("record spans or leaf hashes do not match the entry's payload"),
            });
        };
        self.write_entry(ENTRY_MAGIC_GROUP, gseq, payload, digest)
    }

    fn write_entry(&mut self, magic: u32, gseq: u64, payload: &[u8], digest: [u8; 32]) -> Result<(), JournalError> {
        let path = &self.path;
        let io = |context: &'static str| move |source| JournalError::Io { path: path.clone(), context, source };
        if !self.fits(payload.len()) {
            let why = if self.single {
                "the journal was not reset after it was read"
            } else {
                "entry does not fit in the journal"
            };
            return Err(io("append")(std::io::Error::other(why)));
        }
        let total = entry_blocks(payload.len() as u64) as usize;
        let at = self.end;
        self.out
            .write_blocks(
                at,
                total,
                &[&magic.to_le_bytes(), &(payload.len() as u32).to_le_bytes(), &gseq.to_le_bytes(), payload, &digest],
            )
            .map_err(io("write entry"))?;
        self.end += total as u64;
        Ok(())
    }

    /// Best effort after a failed [`Journal::append`]: erase the entry's magic so that whatever
    /// part of it reached the disk is never replayed (its callers were told it failed).
    pub fn void_tail(&mut self) -> Result<(), JournalError> {
        if self.single || self.end + BLOCK > self.stop() {
            return Ok(());
        }
        let at = self.end;
        self.out.write_blocks(at, BLOCK as usize, &[]).map_err(|source| JournalError::Io {
            path: self.path.clone(),
            context: "void entry",
            source,
        })
    }

    /// Moves to the other half, once redb holds (durably) every entry in it: a new lap for that
    /// half, higher than any before, so its old entries never verify again and its new ones come
    /// after the half being left. One write (the header and the first entry block, zeroed),
    /// synced before it returns. On error the journal goes on appending to the half it was in
    /// (the other half's new header may be on disk, which changes nothing that is read: that
    /// half's entries are all in redb).
    pub fn switch(&mut self) -> Result<(), JournalError> {
        if self.single {
            return Err(JournalError::Io {
                path: self.path.clone(),
                context: "switch halves",
                source: std::io::Error::other("the journal was not reset after it was read"),
            });
        }
        let next = self.active.other();
        self.start_half(next, self.next_lap()?)?;
        self.active = next;
        self.end = self.start_of(next) + HEADER_LEN;
        Ok(())
    }

    /// Starts over, empty, once redb holds (durably) everything written so far: both halves get
    /// new laps, so no entry written before can ever verify again, and entries go to the first
    /// half. A single-region journal read at open is rewritten in two halves here (grown to the
    /// smallest two-half size if it was smaller). Synced before it returns.
    pub fn reset(&mut self) -> Result<(), JournalError> {
        let len = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        if self.single && 2 * self.half > len {
            // Zeros written, not a hole: appends never allocate blocks (or change metadata).
            let grow = |source| JournalError::Io { path: self.path.clone(), context: "grow to two halves", source };
            zero_fill(&self.file, len, 2 * self.half).and_then(|()| self.file.sync_all()).map_err(grow)?;
        }
        self.start_half(Half::Second, self.next_lap()?)?;
        self.start_half(Half::First, self.next_lap()?)?;
        self.single = false;
        self.active = Half::First;
        self.end = HEADER_LEN;
        Ok(())
    }

    /// A lap number above every one written or tried. Lap numbers never wrap: one at the
    /// maximum can only be a damaged header, and is refused.
    fn next_lap(&self) -> Result<u64, JournalError> {
        self.top_lap.checked_add(1).ok_or_else(|| JournalError::Foreign {
            path: self.path.clone(),
            reason: format!("its lap number is {}, the largest there is: a damaged header", self.top_lap),
        })
    }

    /// Writes half `h`'s header with `lap`, and zeroes the block after it (no entry there).
    fn start_half(&mut self, h: Half, lap: u64) -> Result<(), JournalError> {
        self.top_lap = self.top_lap.max(lap);
        let header = header(self.id, lap, self.half);
        let at = self.start_of(h);
        self.out.write_blocks(at, (HEADER_LEN + BLOCK) as usize, &[&header]).map_err(|source| JournalError::Io {
            path: self.path.clone(),
            context: "write a half's header",
            source,
        })?;
        match h {
            Half::First => self.laps.0 = lap,
            Half::Second => self.laps.1 = lap,
        }
        Ok(())
    }
}

/// One of the journal's two halves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Half {
    First,
    Second,
}

impl Half {
    fn other(self) -> Half {
        match self {
            Half::First => Half::Second,
            Half::Second => Half::First,
        }
    }
}

/// The length of each half of a journal of about `capacity` bytes: whole blocks, at least a
/// header and one entry block.
fn half_of(capacity: u64) -> u64 {
    (capacity / 2 / BLOCK * BLOCK).max(MIN_CAPACITY / 2)
}

/// Bytes an entry with a payload of `len` occupies: whole blocks.
fn entry_blocks(len: u64) -> u64 {
    (ENTRY_HEAD + len + ENTRY_TAIL).div_ceil(BLOCK) * BLOCK
}

const HEADER_BYTES: usize = 40;

fn header(id: u64, lap: u64, half: u64) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..8].copy_from_slice(FILE_MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&id.to_le_bytes());
    h[24..32].copy_from_slice(&lap.to_le_bytes());
    h[32..40].copy_from_slice(&half.to_le_bytes());
    h
}

/// A header as read: its version, lap, and (version 3) the length of each half.
struct Header {
    version: u32,
    lap: u64,
    half: u64,
}

/// Reads and checks the header at `at`: the magic, a version this build reads, and the store's
/// journal id. The error is the reason, for [`JournalError::Foreign`].
fn read_header(file: &File, at: u64, id: u64) -> Result<Header, String> {
    let mut h = [0u8; HEADER_BYTES];
    file.read_exact_at(&mut h, at).map_err(|e| format!("header unreadable: {e}"))?;
    if &h[..8] != FILE_MAGIC {
        return Err("bad magic".into());
    }
    let u64_at = |i: usize| h.get(i..i + 8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if !(VERSION_PAYLOAD_DIGESTS..=VERSION).contains(&version) {
        return Err(format!("version {version}, this build reads versions {VERSION_PAYLOAD_DIGESTS} to {VERSION}"));
    }
    let file_id = u64_at(16);
    if file_id != id {
        return Err(format!("it belongs to the store with journal id {file_id:#x}, not {id:#x}"));
    }
    let half = if version == VERSION { u64_at(32) } else { 0 };
    Ok(Header { version, lap: u64_at(24), half })
}

/// Writes whole blocks at block offsets, durably: with `O_DIRECT | O_DSYNC` from a block-aligned
/// buffer when the file system allows it, else buffered and followed by `fdatasync`.
#[derive(Debug)]
struct BlockWriter {
    file: File,
    direct: bool,
    /// Reused; the aligned window inside it is what gets written.
    buf: Vec<u8>,
}

impl BlockWriter {
    fn open(path: &Path, try_direct: bool) -> std::io::Result<BlockWriter> {
        if try_direct {
            match OpenOptions::new().write(true).custom_flags(libc::O_DIRECT | libc::O_DSYNC).open(path) {
                Ok(file) => return Ok(BlockWriter { file, direct: true, buf: Vec::new() }),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(path = %path.display(), "the file system refuses O_DIRECT; the ledger journal uses buffered writes and fdatasync");
                }
                Err(e) => return Err(e),
            }
        }
        let file = OpenOptions::new().write(true).open(path)?;
        Ok(BlockWriter { file, direct: false, buf: Vec::new() })
    }

    /// Writes `parts`, one after the other and followed by zeroes, as `len` bytes (a multiple of
    /// the block size) at `at` (block-aligned), returning once they are on stable storage.
    fn write_blocks(&mut self, at: u64, len: usize, parts: &[&[u8]]) -> std::io::Result<()> {
        let block = BLOCK as usize;
        if !len.is_multiple_of(block) || !at.is_multiple_of(BLOCK) {
            return Err(std::io::Error::other("journal writes must be whole, aligned blocks"));
        }
        // Only grown: the bytes after the parts are zeroed below, not the whole buffer first.
        if self.buf.len() < len + block {
            self.buf.resize(len + block, 0);
        }
        let off = self.buf.as_ptr().align_offset(block);
        if off >= block {
            return Err(std::io::Error::other("cannot align the journal's write buffer"));
        }
        let window = off
            .checked_add(len)
            .and_then(|end| self.buf.get_mut(off..end))
            .ok_or_else(|| std::io::Error::other("journal write buffer shorter than the write"))?;
        let mut rest = &mut window[..];
        for part in parts {
            let (dst, tail) = std::mem::take(&mut rest)
                .split_at_mut_checked(part.len())
                .ok_or_else(|| std::io::Error::other("journal entry larger than the blocks reserved for it"))?;
            dst.copy_from_slice(part);
            rest = tail;
        }
        rest.fill(0);
        self.file.write_all_at(window, at)?;
        if !self.direct {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

fn digest(lap: u64, gseq: u64, payload: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(lap.to_le_bytes());
    h.update(gseq.to_le_bytes());
    h.update((payload.len() as u32).to_le_bytes());
    h.update(payload);
    h.finalize().into()
}

/// The digest of a group entry: [`digest`]'s fields, then the payload with the bytes of each
/// span (a record's canonical bytes, in order, not overlapping) replaced by that record's leaf
/// hash. `None` if the spans and leaves do not match the payload (counts differ, a span out of
/// bounds or out of order).
fn group_digest(
    lap: u64,
    gseq: u64,
    payload: &[u8],
    spans: &[std::ops::Range<usize>],
    leaves: &[Hash],
) -> Option<[u8; 32]> {
    if spans.len() != leaves.len() {
        return None;
    }
    let mut h = Sha256::new();
    h.update(lap.to_le_bytes());
    h.update(gseq.to_le_bytes());
    h.update((payload.len() as u32).to_le_bytes());
    let mut at = 0;
    for (span, leaf) in spans.iter().zip(leaves) {
        h.update(payload.get(at..span.start)?);
        h.update(leaf);
        at = span.end;
    }
    h.update(payload.get(at..)?);
    Some(h.finalize().into())
}

/// Writes zeros over `[from, to)` of `file` (not synced).
fn zero_fill(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; 1024 * 1024];
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeros.len() as u64) as usize;
        file.write_all_at(zeros.get(..n).unwrap_or(&zeros), at)?;
        at += n as u64;
    }
    Ok(())
}

/// Makes the journal under a temporary name (zero-filled, both halves' headers written, synced)
/// and renames it into place, so a crash or a full disk during creation never leaves a half-made
/// journal. The first half is the one written first (the higher lap).
fn create(path: &Path, id: u64, half: u64) -> Result<File, JournalError> {
    let io = |context: &'static str| move |source| JournalError::Io { path: path.to_path_buf(), context, source };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".new");
    let tmp = PathBuf::from(tmp_name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create"))?;
    zero_fill(&file, 0, 2 * half).map_err(io("zero-fill"))?;
    file.write_all_at(&header(id, 1, half), 0).map_err(io("write header"))?;
    file.write_all_at(&header(id, 0, half), half).map_err(io("write header"))?;
    file.sync_all().map_err(io("sync"))?;
    std::fs::rename(&tmp, path).map_err(io("rename into place"))?;
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        File::open(dir).and_then(|d| d.sync_all()).map_err(io("sync directory"))?;
    }
    Ok(file)
}

// ---------------------------------------------------------------------------------------------
// The payload: one group's effects

/// What one group changed, in the order it changed it: enough to apply the group to redb again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupEffects {
    /// The log size after the group.
    pub size: u64,
    /// State writes (`None` deletes), in order.
    pub state: Vec<(String, Option<Vec<u8>>)>,
    /// Sealed records: (chain, log index, chain seq, canonical bytes).
    pub records: Vec<JournalRecord>,
    /// A checkpoint signed in the group: (tree size, signed note).
    pub checkpoint: Option<(u64, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRecord {
    pub chain: String,
    pub index: u64,
    pub seq: u64,
    /// Shared with the writer's recent records and the caller's answer (one copy per record).
    pub canonical: Arc<[u8]>,
}

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("journal entry payload is malformed at byte {at}: {what}")]
pub struct DecodeError {
    pub at: usize,
    pub what: &'static str,
}

impl GroupEffects {
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.encode_spans(out, &mut Vec::new());
    }

    /// [`GroupEffects::encode`], also noting where in `out` each record's canonical bytes went
    /// (what [`Journal::append_group`] replaces by the records' leaf hashes).
    pub fn encode_spans(&self, out: &mut Vec<u8>, spans: &mut Vec<std::ops::Range<usize>>) {
        spans.clear();
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(self.state.len() as u32).to_le_bytes());
        for (k, v) in &self.state {
            put_bytes(out, k.as_bytes());
            match v {
                None => out.push(0),
                Some(v) => {
                    out.push(1);
                    put_bytes(out, v);
                }
            }
        }
        out.extend_from_slice(&(self.records.len() as u32).to_le_bytes());
        for r in &self.records {
            put_bytes(out, r.chain.as_bytes());
            out.extend_from_slice(&r.index.to_le_bytes());
            out.extend_from_slice(&r.seq.to_le_bytes());
            put_bytes(out, &r.canonical);
            spans.push(out.len() - r.canonical.len()..out.len());
        }
        match &self.checkpoint {
            None => out.push(0),
            Some((size, note)) => {
                out.push(1);
                out.extend_from_slice(&size.to_le_bytes());
                put_bytes(out, note.as_bytes());
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<GroupEffects, DecodeError> {
        Self::decode_spans(bytes).map(|(fx, _)| fx)
    }

    /// [`GroupEffects::decode`], also returning where each record's canonical bytes are in
    /// `bytes` (as [`GroupEffects::encode_spans`] notes them).
    pub fn decode_spans(bytes: &[u8]) -> Result<(GroupEffects, Vec<std::ops::Range<usize>>), DecodeError> {
        let mut r = Reader { bytes, at: 0 };
        let size = r.u64()?;
        let n_state = r.u32()? as usize;
        let mut state = Vec::with_capacity(n_state.min(4096));
        for _ in 0..n_state {
            let key = r.string()?;
            let val = match r.u8()? {
                0 => None,
                1 => Some(r.bytes()?.to_vec()),
                _ => return Err(r.err("state write tag is neither 0 nor 1")),
            };
            state.push((key, val));
        }
        let n_records = r.u32()? as usize;
        let mut records = Vec::with_capacity(n_records.min(4096));
        let mut spans = Vec::with_capacity(n_records.min(4096));
        for _ in 0..n_records {
            let chain = r.string()?;
            let index = r.u64()?;
            let seq = r.u64()?;
            let canonical: Arc<[u8]> = Arc::from(r.bytes()?);
            spans.push(r.at - canonical.len()..r.at);
            records.push(JournalRecord { chain, index, seq, canonical });
        }
        let checkpoint = match r.u8()? {
            0 => None,
            1 => {
                let size = r.u64()?;
                Some((size, r.string()?))
            }
            _ => return Err(r.err("checkpoint tag is neither 0 nor 1")),
        };
        if r.at != bytes.len() {
            return Err(r.err("trailing bytes"));
        }
        Ok((GroupEffects { size, state, records, checkpoint }, spans))
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &'static str) -> DecodeError {
        DecodeError { at: self.at, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len()).ok_or_else(|| self.err("truncated"))?;
        let s = self.bytes.get(self.at..end).ok_or_else(|| self.err("truncated"))?;
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        let [b] = self.take(1)? else { return Err(self.err("truncated")) };
        Ok(*b)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        std::str::from_utf8(b).map(str::to_string).map_err(|_| self.err("string is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn effects(n: u64) -> GroupEffects {
        GroupEffects {
            size: n + 1,
            state: vec![("counter/a".into(), Some(vec![1, 2, 3])), ("hold/x".into(), None)],
            records: vec![JournalRecord {
                chain: "pp_1".into(),
                index: n,
                seq: 7,
                canonical: Arc::from(&b"{\"a\":1}"[..]),
            }],
            checkpoint: n.is_multiple_of(2).then(|| (n + 1, "origin\n1\nroot\n".to_string())),
        }
    }

    fn encoded(n: u64) -> Vec<u8> {
        let mut v = Vec::new();
        effects(n).encode(&mut v);
        v
    }

    /// Appends group `n` the way the writer does: digest over the records' leaf hashes.
    fn append_group(j: &mut Journal, n: u64) {
        let fx = effects(n);
        let (mut payload, mut spans) = (Vec::new(), Vec::new());
        fx.encode_spans(&mut payload, &mut spans);
        let leaves: Vec<Hash> = fx.records.iter().map(|r| leaf_hash(&r.canonical)).collect();
        j.append_group(n, &payload, &spans, &leaves).unwrap();
    }

    #[test]
    fn spans_are_where_the_records_are() {
        let mut fx = effects(2);
        fx.records.push(JournalRecord {
            chain: "host".into(),
            index: 3,
            seq: 0,
            canonical: Arc::from(&b"{\"b\":2}"[..]),
        });
        let (mut payload, mut spans) = (Vec::new(), Vec::new());
        fx.encode_spans(&mut payload, &mut spans);
        assert_eq!(spans.len(), 2);
        for (span, r) in spans.iter().zip(&fx.records) {
            assert_eq!(&payload[span.clone()], &*r.canonical);
        }
        let (back, back_spans) = GroupEffects::decode_spans(&payload).unwrap();
        assert_eq!((back, back_spans), (fx, spans));
    }

    #[test]
    fn group_entries_come_back_in_order_after_reopen() {
        for direct in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("j");
            let (mut j, _, _) = Journal::open_with(&p, 42, 64 * 1024, direct).unwrap();
            for g in 1..=4 {
                append_group(&mut j, g);
            }
            // An entry of the other form after them still follows.
            j.append(5, &encoded(5)).unwrap();
            drop(j);
            let (_, e, _) = Journal::open_with(&p, 42, 64 * 1024, direct).unwrap();
            assert_eq!(e.iter().map(|e| e.gseq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5], "direct={direct}");
            for entry in &e {
                assert_eq!(entry.payload, encoded(entry.gseq));
            }
        }
    }

    /// The group form hashes the records' leaf hashes, not their bytes: a torn or garbled byte
    /// anywhere in the entry (head, state writes, a record's bytes or its length, the
    /// checkpoint, the digest) must still end the journal there.
    #[test]
    fn every_damaged_byte_of_a_group_entry_ends_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let (mut j, _, _) = Journal::open(&p, 1, 64 * 1024).unwrap();
        append_group(&mut j, 1);
        let second = j.end;
        append_group(&mut j, 2);
        append_group(&mut j, 3);
        drop(j);
        let len = ENTRY_HEAD as usize + encoded(2).len() + ENTRY_TAIL as usize;
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        for at in 0..len as u64 {
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, second + at).unwrap();
            for flip in [0x01u8, 0x80] {
                f.write_all_at(&[b[0] ^ flip], second + at).unwrap();
                let (_, e, _) = Journal::open(&p, 1, 64 * 1024).unwrap();
                assert_eq!(e.iter().map(|e| e.gseq).collect::<Vec<_>>(), vec![1], "byte {at} ^ {flip:#x}");
            }
            f.write_all_at(&b, second + at).unwrap();
        }
        let (_, e, _) = Journal::open(&p, 1, 64 * 1024).unwrap();
        assert_eq!(e.len(), 3, "restored");
        // Torn: only the first part of the entry's block reached the disk.
        let zeros = vec![0u8; len / 2];
        f.write_all_at(&zeros, second + (len - len / 2) as u64).unwrap();
        let (_, e, _) = Journal::open(&p, 1, 64 * 1024).unwrap();
        assert_eq!(e.iter().map(|e| e.gseq).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn a_group_entry_with_the_wrong_leaves_is_refused_or_never_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let (mut j, _, _) = Journal::open(&p, 1, 64 * 1024).unwrap();
        let fx = effects(1);
        let (mut payload, mut spans) = (Vec::new(), Vec::new());
        fx.encode_spans(&mut payload, &mut spans);
        // Counts or spans that do not match the payload: an error, nothing written.
        assert!(j.append_group(1, &payload, &spans, &[]).is_err());
        let beyond = 0..payload.len() + 1;
        assert!(j.append_group(1, &payload, std::slice::from_ref(&beyond), &[[0; 32]]).is_err());
        assert_eq!(j.used(), 0);
        // Leaves that are not the records' hashes: written, but the entry is damaged.
        j.append_group(1, &payload, &spans, &[[9; 32]]).unwrap();
        drop(j);
        let (_, e, _) = Journal::open(&p, 1, 64 * 1024).unwrap();
        assert!(e.is_empty());
    }

    /// Writes what a single-region build left: one header of `version` with `lap`, and entries
    /// (digests over their payloads) from the end of the header on, block after block.
    fn write_single_region(
        path: &Path,
        version: u32,
        id: u64,
        lap: u64,
        len: u64,
        groups: std::ops::RangeInclusive<u64>,
    ) {
        let mut file = vec![0u8; len as usize];
        file[..8].copy_from_slice(FILE_MAGIC);
        file[8..12].copy_from_slice(&version.to_le_bytes());
        file[16..24].copy_from_slice(&id.to_le_bytes());
        file[24..32].copy_from_slice(&lap.to_le_bytes());
        let mut at = HEADER_LEN as usize;
        for g in groups {
            let payload = encoded(g);
            let mut entry = Vec::new();
            entry.extend_from_slice(&ENTRY_MAGIC.to_le_bytes());
            entry.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            entry.extend_from_slice(&g.to_le_bytes());
            entry.extend_from_slice(&payload);
            entry.extend_from_slice(&digest(lap, g, &payload));
            file[at..at + entry.len()].copy_from_slice(&entry);
            at += entry_blocks(payload.len() as u64) as usize;
        }
        std::fs::write(path, file).unwrap();
    }

    /// Journals of earlier builds are one region: their entries run past the middle of the
    /// file, where this build's second half begins. They are all read, and the reset after
    /// replay rewrites the file in two halves.
    #[test]
    fn single_region_journals_are_replayed_and_rewritten_in_halves() {
        for version in [1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("j");
            // 8 blocks: a header and seven one-block entries, four of them past the middle.
            write_single_region(&p, version, 1, 5, 8 * BLOCK, 1..=7);
            let (mut j, e, missing) = Journal::open(&p, 1, 8 * BLOCK).unwrap();
            assert!(!missing);
            assert_eq!(e.iter().map(|e| e.gseq).collect::<Vec<_>>(), (1..=7).collect::<Vec<_>>(), "version {version}");
            assert_eq!(e[6].payload, encoded(7));
            // Nothing is appended to the old layout: the store resets the journal first.
            assert!(!j.fits(0));
            assert!(j.append(8, &encoded(8)).is_err());
            j.reset().unwrap();
            j.append(8, &encoded(8)).unwrap();
            drop(j);
            for at in [0, 4 * BLOCK] {
                let mut v = [0u8; 4];
                File::open(&p).unwrap().read_exact_at(&mut v, at + 8).unwrap();
                assert_eq!(u32::from_le_bytes(v), VERSION, "the header at {at} is in the current layout");
            }
            let (_, e, _) = Journal::open(&p, 1, 8 * BLOCK).unwrap();
            assert_eq!(e.iter().map(|e| e.gseq).collect::<Vec<_>>(), vec![8], "version {version}");
        }
        // An old journal smaller than two halves is grown to the smallest two-half size.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        write_single_region(&p, 2, 1, 0, 2 * BLOCK, 1..=1);
        let (mut j, e, _) = Journal::open(&p, 1, 2 * BLOCK).unwrap();
        assert_eq!(e.len(), 1);
        j.reset().unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), MIN_CAPACITY);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 >= MIN_CAPACITY, "grown with zeros written, not a hole");
        j.append(2, &encoded(2)).unwrap();
        drop(j);
        let (_, e, _) = Journal::open(&p, 1, 2 * BLOCK).unwrap();
        assert_eq!(e.iter().map(|e| e.gseq).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn a_later_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        Journal::open(&p, 1, 64 * 1024).unwrap();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&(VERSION + 1).to_le_bytes(), 8).unwrap();
        let err = Journal::open(&p, 1, 64 * 1024).unwrap_err().to_string();
        assert!(err.contains("version 4") && err.contains(&p.display().to_string()), "{err}");
    }

    /// 6 blocks: two halves of a header and two one-block entries.
    const SMALL: u64 = 6 * BLOCK;

    /// A [`SMALL`] journal in `dir` with groups 1 and 2 in its first half and 3 in its second.
    fn across_halves(dir: &Path) -> PathBuf {
        let p = dir.join("j");
        let (mut j, _, _) = Journal::open(&p, 1, SMALL).unwrap();
        j.append(1, &encoded(1)).unwrap();
        j.append(2, &encoded(2)).unwrap();
        j.switch().unwrap();
        append_group(&mut j, 3);
        p
    }

    fn gseqs(p: &Path) -> Vec<u64> {
        Journal::open(p, 1, SMALL).unwrap().1.iter().map(|e| e.gseq).collect()
    }

    #[test]
    fn entries_of_both_halves_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let (mut j, _, _) = Journal::open(&p, 1, SMALL).unwrap();
        append_group(&mut j, 1);
        j.append(2, &encoded(2)).unwrap();
        assert!(!j.fits(encoded(3).len()), "the first half is full");
        assert!(j.fits_in_half(encoded(3).len()));
        assert!(j.append(3, &encoded(3)).is_err());
        j.switch().unwrap();
        assert_eq!(j.used(), 0);
        // Moved, nothing written yet: the first half's entries are all there is.
        assert_eq!(gseqs(&p), vec![1, 2]);
        append_group(&mut j, 3);
        assert_eq!(gseqs(&p), vec![1, 2, 3]);
        j.append(4, &encoded(4)).unwrap();
        // Back to the first half: its entries are gone (a new lap), the second half's stay, and
        // the new ones follow them.
        j.switch().unwrap();
        assert_eq!(gseqs(&p), vec![3, 4]);
        append_group(&mut j, 5);
        drop(j);
        let (j, e, _) = Journal::open(&p, 1, SMALL).unwrap();
        assert_eq!(e.iter().map(|e| e.gseq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(e[2].payload, encoded(5));
        assert_eq!(j.used(), BLOCK, "open finds the end of the newer half");
    }

    #[test]
    fn a_group_larger_than_a_half_never_fits() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let (mut j, _, _) = Journal::open(&p, 1, SMALL).unwrap();
        let big = vec![7u8; (2 * BLOCK) as usize];
        assert!(!j.fits(big.len()) && !j.fits_in_half(big.len()));
        assert!(j.append(1, &big).is_err());
        let two = vec![7u8; (BLOCK + 100) as usize];
        assert!(j.fits(two.len()) && j.fits_in_half(two.len()));
        j.append(1, &two).unwrap();
        assert!(!j.fits(0));
    }

    #[test]
    fn the_newer_half_ends_where_the_older_one_does_not_continue() {
        // A damaged entry in the older half ends the journal there: the newer half's entries
        // would leave a gap, and are not returned either.
        let dir = tempfile::tempdir().unwrap();
        let p = across_halves(dir.path());
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff], HEADER_LEN + BLOCK + ENTRY_HEAD + 2).unwrap();
        assert_eq!(gseqs(&p), vec![1]);
    }

    /// Lap numbers never wrap around (a wrapped one could equal an old lap, whose entries would
    /// verify again): the largest one, which only a damaged header can hold, is refused.
    #[test]
    fn a_lap_at_the_maximum_is_refused_not_wrapped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        Journal::open(&p, 1, SMALL).unwrap();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&u64::MAX.to_le_bytes(), SMALL / 2 + 24).unwrap();
        let (mut j, e, _) = Journal::open(&p, 1, SMALL).unwrap();
        assert!(e.is_empty());
        let err = j.reset().unwrap_err().to_string();
        assert!(err.contains("damaged header") && err.contains(&p.display().to_string()), "{err}");
        let err = j.switch().unwrap_err().to_string();
        assert!(err.contains("damaged header"), "{err}");
    }

    #[test]
    fn a_damaged_second_header_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        Journal::open(&p, 1, SMALL).unwrap();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(b"XX", SMALL / 2).unwrap();
        let err = Journal::open(&p, 1, SMALL).unwrap_err().to_string();
        assert!(
            err.contains("second half") && err.contains("bad magic") && err.contains(&p.display().to_string()),
            "{err}"
        );
        // Halves that the file cannot hold (a journal cut short).
        let (j, _, _) = Journal::open(&dir.path().join("k"), 1, SMALL).unwrap();
        drop(j);
        let k = dir.path().join("k");
        OpenOptions::new().write(true).open(&k).unwrap().set_len(SMALL - BLOCK).unwrap();
        let err = Journal::open(&k, 1, SMALL).unwrap_err().to_string();
        assert!(err.contains("cannot hold"), "{err}");
    }

    #[test]
    fn a_write_larger_than_its_blocks_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        std::fs::write(&path, []).unwrap();
        let mut w = BlockWriter::open(&path, false).unwrap();
        let big = vec![7u8; BLOCK as usize + 1];
        let err = w.write_blocks(0, BLOCK as usize, &[&big]).unwrap_err();
        assert!(err.to_string().contains("larger than the blocks"), "{err}");
        let err = w.write_blocks(1, BLOCK as usize, &[]).unwrap_err();
        assert!(err.to_string().contains("aligned"), "{err}");
        w.write_blocks(0, BLOCK as usize, &[b"ab", b"cd"]).unwrap();
    }

    #[test]
    fn effects_round_trip() {
        for n in 0..4 {
            assert_eq!(GroupEffects::decode(&encoded(n)).unwrap(), effects(n));
        }
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        let full = encoded(0);
        for cut in 0..full.len() {
            assert!(GroupEffects::decode(&full[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = full.clone();
        longer.push(0);
        assert!(GroupEffects::decode(&longer).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = GroupEffects::decode(&bytes);
        }

        /// A damaged file, headers included (a valid journal with bytes overwritten anywhere):
        /// opening it returns an error or entries, never panics.
        #[test]
        fn open_never_panics(
            writes in proptest::collection::vec((0..SMALL, proptest::collection::vec(any::<u8>(), 1..64)), 1..8),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let p = across_halves(dir.path());
            let f = OpenOptions::new().write(true).open(&p).unwrap();
            for (at, bytes) in &writes {
                f.write_all_at(bytes, *at).unwrap();
            }
            if let Ok((_, entries, _)) = Journal::open(&p, 1, SMALL) {
                for pair in entries.windows(2) {
                    prop_assert_eq!(pair[0].gseq + 1, pair[1].gseq);
                }
            }
        }
    }

    #[test]
    fn entries_come_back_in_order_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let (mut j, e, _) = Journal::open(&p, 42, 64 * 1024).unwrap();
        assert!(e.is_empty());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 64 * 1024, "preallocated");
        for g in 1..=5 {
            j.append(g, &encoded(g)).unwrap();
        }
        drop(j);
        let (_, e, _) = Journal::open(&p, 42, 64 * 1024).unwrap();
        assert_eq!(e.iter().map(|e| e.gseq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        assert_eq!(e[2].payload, encoded(3));
    }

    #[test]
    fn a_torn_entry_ends_the_journal_and_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let (mut j, _, _) = Journal::open(&p, 1, 64 * 1024).unwrap();
        j.append(1, &encoded(1)).unwrap();
        let second = j.end;
        j.append(2, &encoded(2)).unwrap();
        j.append(3, &encoded(3)).unwrap();
        drop(j);
        // Flip one payload byte of entry 2: 2 and everything after it are gone.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff], second + ENTRY_HEAD + 3).unwrap();
        let (mut j, e, _) = Journal::open(&p, 1, 64 * 1024).unwrap();
        assert_eq!(e.iter().map(|e| e.gseq).collect::<Vec<_>>(), vec![1]);
        assert_eq!(j.end, second, "the journal ends where the torn entry was");
        // The store applies what it got and resets: entry 3 behind the torn one (same size, so
        // block-aligned right after a new entry 2) must never come back.
        j.reset().unwrap();
        j.append(2, &encoded(9)).unwrap();
        drop(j);
        let (_, e, _) = Journal::open(&p, 1, 64 * 1024).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].payload, encoded(9));
    }

    #[test]
    fn entries_of_an_earlier_lap_are_not_replayed_after_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let (mut j, _, _) = Journal::open(&p, 1, 64 * 1024).unwrap();
        for g in 1..=4 {
            j.append(g, &encoded(g)).unwrap();
        }
        j.reset().unwrap();
        // One new entry, shorter than the old first one: the old lap's bytes follow it.
        j.append(5, b"").unwrap();
        drop(j);
        let (_, e, _) = Journal::open(&p, 1, 64 * 1024).unwrap();
        assert_eq!(e.iter().map(|e| e.gseq).collect::<Vec<_>>(), vec![5]);
    }

    #[test]
    fn an_old_lap_entry_that_would_follow_is_refused_by_its_lap() {
        // A store restored from an older copy restarts sequence numbers: the new lap's entry 1
        // ends exactly where the old lap's entry 2 begins, and 2 is what the reader expects next.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let (mut j, _, _) = Journal::open(&p, 1, 64 * 1024).unwrap();
        j.append(1, &encoded(1)).unwrap();
        j.append(2, &encoded(2)).unwrap();
        j.reset().unwrap();
        j.append(1, &encoded(1)).unwrap();
        drop(j);
        let (_, e, _) = Journal::open(&p, 1, 64 * 1024).unwrap();
        assert_eq!(e.iter().map(|e| e.gseq).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn buffered_and_direct_writes_read_back_the_same() {
        for direct in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("j");
            let (mut j, _, missing) = Journal::open_with(&p, 5, 64 * 1024, direct).unwrap();
            assert!(missing);
            assert!(direct || !j.direct());
            for g in 1..=3 {
                j.append(g, &encoded(g)).unwrap();
            }
            assert_eq!(j.used(), 3 * BLOCK, "one block per small entry");
            drop(j);
            let (mut j, e, missing) = Journal::open_with(&p, 5, 64 * 1024, direct).unwrap();
            assert!(!missing);
            assert_eq!(e.iter().map(|e| e.gseq).collect::<Vec<_>>(), vec![1, 2, 3], "direct={direct}");
            assert_eq!(e[1].payload, encoded(2));
            j.reset().unwrap();
            drop(j);
            let (_, e, _) = Journal::open_with(&p, 5, 64 * 1024, direct).unwrap();
            assert!(e.is_empty(), "direct={direct}");
        }
    }

    #[test]
    fn a_reset_journal_replays_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let (mut j, _, _) = Journal::open(&p, 1, 64 * 1024).unwrap();
        for g in 1..=3 {
            j.append(g, &encoded(g)).unwrap();
        }
        j.reset().unwrap();
        drop(j);
        let (_, e, _) = Journal::open(&p, 1, 64 * 1024).unwrap();
        assert!(e.is_empty(), "{e:?}");
    }

    #[test]
    fn a_full_journal_refuses_and_a_foreign_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let (mut j, _, _) = Journal::open(&p, 1, SMALL).unwrap();
        let big = vec![7u8; (HEADER_LEN + 100) as usize];
        assert!(j.fits(big.len()));
        j.append(1, &big).unwrap();
        assert!(!j.fits(big.len()));
        assert!(j.append(2, &big).is_err());
        drop(j);
        let err = Journal::open(&p, 2, SMALL).unwrap_err().to_string();
        assert!(err.contains(&p.display().to_string()) && err.contains("journal id"), "{err}");
        std::fs::write(&p, b"not a journal at all, but long enough to hold a header").unwrap();
        let err = Journal::open(&p, 1, SMALL).unwrap_err().to_string();
        assert!(err.contains("bad magic"), "{err}");
    }
}
