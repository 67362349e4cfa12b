//! Chain links: which records belong to a chain, without a row per record in redb.
//!
//! One file next to the store (`ledger.redb` → `ledger.links`) holds, for record `i`, at byte
//! `8i`, the log index of the previous record of the same chain as a `u64le` ([`NONE`] for a
//! chain's first record). redb keeps only each chain's last record (`chain_tails`); a chain's
//! records are found by walking back from it. Like the tiles, the file is append-only, synced
//! before every redb sync, cut back at open to redb's size, and rebuilt from the records (each
//! names its chain) when it is shorter than that.
//!
//! Parsed as untrusted bytes: a link must point backwards, and a walk ends after at most as many
//! steps as the chain has records.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::tiles::TileError;

/// The link of a chain's first record.
pub const NONE: u64 = u64::MAX;
const LINK_BYTES: u64 = 8;
/// Bytes read at once when walking a chain back (records of one chain are usually near each
/// other).
const BLOCK: u64 = 4096;

/// The links file of the store at `path`.
pub fn links_path(path: &Path) -> PathBuf {
    path.with_extension("links")
}

fn io<'a>(path: &'a Path, context: &'static str) -> impl Fn(std::io::Error) -> TileError + 'a {
    move |source| TileError::Io { path: path.to_path_buf(), context, source }
}

fn damaged(path: &Path, reason: impl Into<String>) -> TileError {
    TileError::Damaged { path: path.to_path_buf(), reason: reason.into() }
}

struct Writer {
    /// Records the file holds (written or pending).
    size: u64,
    /// Where `pending` starts (a record number) and the links to write there.
    pending_from: u64,
    pending: Vec<u8>,
    dirty: bool,
}

pub(super) struct Links {
    path: PathBuf,
    file: File,
    w: Mutex<Writer>,
}

/// How [`Links::open`] found the file.
pub(super) enum Opened {
    Ready(Links),
    NeedsRebuild(TileError),
}

impl Links {
    /// Opens (or creates) the links of a store of `size` records, cutting the file back to them.
    pub(super) fn open(path: &Path, size: u64) -> Result<Opened, TileError> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io(path, "open"))?;
        if !existed {
            sync_parent(path)?;
        }
        let len = file.metadata().map_err(io(path, "stat"))?.len();
        let want = size.saturating_mul(LINK_BYTES);
        if len < want {
            return Ok(Opened::NeedsRebuild(damaged(
                path,
                format!("{len} bytes, but the store's {size} records need {want}"),
            )));
        }
        if len > want {
            file.set_len(want).map_err(io(path, "cut back to the store's size"))?;
            file.sync_data().map_err(io(path, "sync"))?;
        }
        let w = Writer { size, pending_from: size, pending: Vec::new(), dirty: false };
        Ok(Opened::Ready(Links { path: path.to_path_buf(), file, w: Mutex::new(w) }))
    }

    /// An empty file (before a rebuild).
    pub(super) fn create_empty(path: &Path) -> Result<Links, TileError> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(path, "remove before rebuilding")(e)),
        }
        match Links::open(path, 0)? {
            Opened::Ready(l) => Ok(l),
            Opened::NeedsRebuild(e) => Err(e),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        match self.w.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Appends the link of record `index` (in log order): the previous record of its chain.
    pub(super) fn append(&self, index: u64, prev: u64) -> Result<(), TileError> {
        let mut w = self.lock();
        if index != w.size {
            return Err(damaged(&self.path, format!("link {index} appended where the file holds {}", w.size)));
        }
        if prev != NONE && prev >= index {
            return Err(damaged(&self.path, format!("record {index} would link forward to {prev}")));
        }
        if w.pending.is_empty() {
            w.pending_from = index;
        }
        w.pending.extend_from_slice(&prev.to_le_bytes());
        w.size += 1;
        Ok(())
    }

    /// Writes the appended links, making them readable.
    pub(super) fn flush(&self) -> Result<(), TileError> {
        let mut w = self.lock();
        if w.pending.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(&w.pending, w.pending_from * LINK_BYTES).map_err(io(&self.path, "write links"))?;
        w.pending.clear();
        w.dirty = true;
        Ok(())
    }

    /// Flushes and syncs (before a redb sync).
    pub(super) fn sync(&self) -> Result<(), TileError> {
        self.flush()?;
        let mut w = self.lock();
        if std::mem::take(&mut w.dirty) {
            self.file.sync_data().map_err(io(&self.path, "sync"))?;
        }
        Ok(())
    }

    /// The log indices of a chain whose last record is `last` and which has `count` records, in
    /// order, from links flushed up to at least `last`.
    pub(super) fn walk(&self, last: u64, count: u64) -> Result<Vec<u64>, TileError> {
        let mut out = Vec::with_capacity(count.min(1 << 20) as usize);
        let mut block: Option<(u64, Vec<u8>)> = None;
        let mut cur = last;
        loop {
            out.push(cur);
            if out.len() as u64 > count {
                return Err(damaged(
                    &self.path,
                    format!("the chain ending at record {last} has more than {count} records"),
                ));
            }
            let at = cur * LINK_BYTES;
            let start = at - at % BLOCK;
            if block.as_ref().is_none_or(|(s, _)| *s != start) {
                let mut buf = vec![0u8; BLOCK as usize];
                let n = read_up_to(&self.file, &mut buf, start).map_err(io(&self.path, "read"))?;
                buf.truncate(n);
                block = Some((start, buf));
            }
            let bytes =
                block.as_ref().and_then(|(_, b)| b.get((at - start) as usize..(at - start + LINK_BYTES) as usize));
            let Some(bytes) = bytes else {
                return Err(damaged(&self.path, format!("no link for record {cur}")));
            };
            let prev = u64::from_le_bytes(bytes.try_into().unwrap_or([0xff; 8]));
            if prev == NONE {
                break;
            }
            if prev >= cur {
                return Err(damaged(&self.path, format!("record {cur} links forward to {prev}")));
            }
            cur = prev;
        }
        if out.len() as u64 != count {
            return Err(damaged(
                &self.path,
                format!("the chain ending at record {last} has {} linked records, its head says {count}", out.len()),
            ));
        }
        out.reverse();
        Ok(out)
    }
}

fn read_up_to(file: &File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
        match file.read_at(rest, at + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn sync_parent(path: &Path) -> Result<(), TileError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir, "sync directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(path: &Path, size: u64) -> Links {
        match Links::open(path, size).unwrap() {
            Opened::Ready(l) => l,
            Opened::NeedsRebuild(e) => panic!("{e}"),
        }
    }

    /// Two interleaved chains and a third, walked back; the file torn at every byte reopens cut
    /// back to the size, or asks for a rebuild when shorter.
    #[test]
    fn chains_walk_back_and_a_torn_file_is_cut_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.links");
        let links = ready(&path, 0);
        let mut last = [NONE; 3];
        for i in 0..1200u64 {
            let c = if i % 7 == 0 { 2 } else { (i % 2) as usize };
            links.append(i, last[c]).unwrap();
            last[c] = i;
            if i % 100 == 0 {
                links.flush().unwrap();
            }
        }
        links.sync().unwrap();
        let chain2: Vec<u64> = (0..1200).filter(|i| i % 7 == 0).collect();
        assert_eq!(links.walk(last[2], chain2.len() as u64).unwrap(), chain2);
        let chain1: Vec<u64> = (0..1200).filter(|i| i % 7 != 0 && i % 2 == 1).collect();
        assert_eq!(links.walk(last[1], chain1.len() as u64).unwrap(), chain1);
        // A head that says the chain is longer or shorter than its links: damage, named.
        let err = links.walk(last[2], chain2.len() as u64 + 1).unwrap_err().to_string();
        assert!(err.contains("l.links") && err.contains("its head says"), "{err}");
        assert!(links.walk(last[2], 3).is_err());
        // Out of order appends are refused.
        assert!(links.append(5, NONE).is_err());
        assert!(links.append(1200, 1200).is_err());
        drop(links);

        let full = std::fs::read(&path).unwrap();
        let size = 1000u64;
        for cut in (size * 8 - 16) as usize..=full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            match Links::open(&path, size).unwrap() {
                Opened::Ready(l) => {
                    assert!(cut as u64 >= size * 8, "opened a file cut at {cut}");
                    assert_eq!(std::fs::metadata(&path).unwrap().len(), size * 8);
                    let chain: Vec<u64> = (0..size).filter(|i| i % 7 == 0).collect();
                    assert_eq!(l.walk(994, chain.len() as u64).unwrap(), chain);
                }
                Opened::NeedsRebuild(e) => assert!((cut as u64) < size * 8, "cut at {cut}: {e}"),
            }
        }
    }

    /// A link that points forward (or at itself) is damage, not a loop.
    #[test]
    fn a_forward_link_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.links");
        let mut bytes = Vec::new();
        for v in [NONE, 0, 5, 1] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        std::fs::write(&path, &bytes).unwrap();
        let links = ready(&path, 4);
        let err = links.walk(2, 3).unwrap_err().to_string();
        assert!(err.contains("links forward"), "{err}");
        assert_eq!(links.walk(3, 3).unwrap(), vec![0, 1, 3]);
    }
}
