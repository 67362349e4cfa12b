//! Merkle hash tiles: where the log's Merkle hashes live, outside redb.
//!
//! The layout is C2SP tlog-tiles (<https://c2sp.org/tlog-tiles>), the one Certificate
//! Transparency's static logs and Tessera use: tiles of height 8, SHA-256 hashes of 32 bytes. The
//! tile at level `L`, index `N` holds the hashes of Merkle level `8L` numbered `[256N, 256N +
//! 256)`: level 0 tiles hold the leaf hashes, level 1 tiles the roots of full level-0 tiles, and
//! so on. Every node of the levels in between is the hash of part of one tile, computed when read
//! (a proof reads at most one tile per 8 levels). Files are under the directory next to the store
//! (`ledger.redb` → `ledger.tiles/`), at the tile's C2SP path `tile/<L>/<N>`, `N` in 3-digit path
//! elements, all but the last prefixed with `x` (tile 1234067 is `tile/0/x001/x234/067`).
//!
//! - A tile file is append-only: the indexer appends the hashes of the records it applies, and
//!   a file holding `W < 256` hashes is the level's partial tile (its bytes are what C2SP serves
//!   as `tile/<L>/<N>.p/<W>`). A file of 256 hashes (8,192 bytes) is full and never written
//!   again: it can be copied off the host as it is.
//! - The indexer syncs the tiles it wrote (and the directories it created) before every redb
//!   sync, so redb never says the log has more records than the tiles hold. At open, hashes
//!   beyond redb's size are cut off and files beyond it removed (they belong to groups redb does
//!   not have, which journal replay appends again).
//! - Tiles are derived data: the leaf hashes are the hashes of the records in the segments.
//!   A tile file missing or shorter than redb's size needs is rebuilt from the segments at open
//!   (with a warning), and the root the rebuilt tree gives is then checked against the latest
//!   signed checkpoint, as every open does.
//!
//! The files are the daemon's own but are parsed as untrusted bytes: nothing panics on a damaged
//! file, and damage is reported with the file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::merkle::{node_hash, Hash};

/// Levels of the Merkle tree per tile.
pub const TILE_HEIGHT: u8 = 8;
/// Hashes in a full tile.
pub const TILE_WIDTH: u64 = 1 << TILE_HEIGHT;
const HASH_BYTES: u64 = 32;
/// Bytes of a full tile.
pub const FULL_TILE_BYTES: u64 = TILE_WIDTH * HASH_BYTES;
/// Tile levels a 64-bit log can need (Merkle levels up to 63).
const MAX_TILE_LEVELS: usize = 8;

/// The tile directory of the store at `path`.
pub fn tiles_dir(path: &Path) -> PathBuf {
    path.with_extension("tiles")
}

/// The C2SP path of tile `(level, n)`, relative to the tile directory: `tile/<L>/<N>`.
pub fn tile_path(level: u8, n: u64) -> PathBuf {
    let mut parts = Vec::new();
    let mut rest = n;
    loop {
        parts.push(rest % 1000);
        rest /= 1000;
        if rest == 0 {
            break;
        }
    }
    let mut p = PathBuf::from("tile");
    p.push(level.to_string());
    for (i, part) in parts.iter().enumerate().rev() {
        p.push(if i > 0 { format!("x{part:03}") } else { format!("{part:03}") });
    }
    p
}

/// The tile a path relative to the tile directory names, if it is a full tile path of this
/// layout (`tile/<L>/<N>`; partial `.p/<W>` paths are not files of this store).
fn parse_tile_path(rel: &Path) -> Option<(u8, u64)> {
    let parts: Vec<&str> = rel.iter().map(|s| s.to_str()).collect::<Option<_>>()?;
    let (first, rest) = parts.split_first()?;
    let (level, rest) = rest.split_first()?;
    let (last, middle) = rest.split_last()?;
    if *first != "tile" || level.is_empty() || level.len() > 1 || !level.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let level: u8 = level.parse().ok()?;
    if usize::from(level) >= MAX_TILE_LEVELS {
        return None;
    }
    let digits = |s: &str| s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit());
    let mut n: u64 = 0;
    for m in middle {
        let d = m.strip_prefix('x').filter(|d| digits(d))?;
        n = n.checked_mul(1000)?.checked_add(d.parse().ok()?)?;
    }
    if !digits(last) {
        return None;
    }
    n = n.checked_mul(1000)?.checked_add(last.parse().ok()?)?;
    // One spelling per tile: no leading `x000` elements.
    (middle.first() != Some(&"x000")).then_some((level, n))
}

#[derive(Debug, thiserror::Error)]
pub enum TileError {
    #[error("ledger tile {path}: {context}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("ledger tile {path} is damaged: {reason}", path = .path.display())]
    Damaged { path: PathBuf, reason: String },
}

impl TileError {
    fn damaged(path: &Path, reason: impl Into<String>) -> TileError {
        TileError::Damaged { path: path.to_path_buf(), reason: reason.into() }
    }
}

fn io<'a>(path: &'a Path, context: &'static str) -> impl Fn(std::io::Error) -> TileError + 'a {
    move |source| TileError::Io { path: path.to_path_buf(), context, source }
}

/// The hash of a perfect subtree whose bottom-level hashes are `level` (a power of two of them).
pub(super) fn subtree_root(level: &[Hash]) -> Hash {
    let mut cur: Vec<Hash> = level.to_vec();
    while cur.len() > 1 {
        cur = cur
            .chunks(2)
            .map(|p| match p {
                [l, r] => node_hash(l, r),
                [one] => *one,
                _ => [0u8; 32],
            })
            .collect();
    }
    cur.first().copied().unwrap_or([0u8; 32])
}

/// What the indexer (or replay) appended and has not written or synced yet.
#[derive(Default)]
struct Writer {
    /// Records the tiles hold (written or pending).
    size: u64,
    /// Per tile level, the hashes of its last tile while that tile is not full.
    partial: Vec<Vec<Hash>>,
    /// Bytes to write: tile → (first entry, hashes).
    pending: BTreeMap<(u8, u64), (u64, Vec<u8>)>,
    /// Files written since the last sync.
    dirty: BTreeMap<(u8, u64), File>,
    /// Directories that gained an entry since the last sync.
    dirs: BTreeSet<PathBuf>,
}

/// The hash tiles of a store: read by snapshots, written by the indexer and replay.
pub(super) struct Tiles {
    dir: PathBuf,
    w: Mutex<Writer>,
}

/// How [`Tiles::open`] found the files.
pub(super) enum Opened {
    Ready(Tiles),
    /// A file is missing or shorter than the store's size needs: rebuild from the records.
    NeedsRebuild(TileError),
}

impl Tiles {
    /// Opens the tiles of a store of `size` records: cuts every level's last tile back to what
    /// `size` needs, removes tiles beyond it, and checks that every other tile is full.
    pub(super) fn open(dir: &Path, size: u64) -> Result<Opened, TileError> {
        ensure_dir(dir)?;
        let mut found: Vec<((u8, u64), PathBuf)> = Vec::new();
        walk(dir, &dir.join("tile"), &mut found)?;
        let mut removed = BTreeSet::new();
        let mut present: HashMap<(u8, u64), u64> = HashMap::new();
        for ((level, n), path) in found {
            let count = level_count(size, level);
            let (full, width) = (count / TILE_WIDTH, count % TILE_WIDTH);
            if n > full || (n == full && width == 0) {
                std::fs::remove_file(&path).map_err(io(&path, "remove a tile beyond the log"))?;
                if let Some(parent) = path.parent() {
                    removed.insert(parent.to_path_buf());
                }
                continue;
            }
            let want = if n == full { width * HASH_BYTES } else { FULL_TILE_BYTES };
            let len = std::fs::metadata(&path).map_err(io(&path, "stat"))?.len();
            if len < want {
                return Ok(Opened::NeedsRebuild(TileError::damaged(
                    &path,
                    format!("{len} bytes, but the store's {size} records need {want}"),
                )));
            }
            if len > want {
                if n < full {
                    return Ok(Opened::NeedsRebuild(TileError::damaged(
                        &path,
                        format!("{len} bytes, longer than a full tile"),
                    )));
                }
                let f = OpenOptions::new().write(true).open(&path).map_err(io(&path, "open"))?;
                f.set_len(want).map_err(io(&path, "cut back to the store's size"))?;
                f.sync_data().map_err(io(&path, "sync"))?;
            }
            present.insert((level, n), want);
        }
        for d in &removed {
            sync_dir(d)?;
        }
        let mut partial = Vec::new();
        for level in 0..MAX_TILE_LEVELS as u8 {
            let count = level_count(size, level);
            if count == 0 && level > 0 {
                break;
            }
            let (full, width) = (count / TILE_WIDTH, count % TILE_WIDTH);
            let expected = full + u64::from(width > 0);
            let have = present.keys().filter(|(l, _)| *l == level).count() as u64;
            if have != expected {
                let missing = (0..expected).find(|n| !present.contains_key(&(level, *n))).unwrap_or(0);
                return Ok(Opened::NeedsRebuild(TileError::damaged(
                    &dir.join(tile_path(level, missing)),
                    format!("missing, but the store's {size} records need it"),
                )));
            }
            let mut hashes = Vec::new();
            if width > 0 {
                let path = dir.join(tile_path(level, full));
                let f = File::open(&path).map_err(io(&path, "open"))?;
                let bytes = read_at(&f, &path, 0, width * HASH_BYTES)?;
                hashes = bytes.chunks_exact(32).map(|c| c.try_into().unwrap_or([0u8; 32])).collect();
            }
            partial.push(hashes);
        }
        Ok(Opened::Ready(Tiles {
            dir: dir.to_path_buf(),
            w: Mutex::new(Writer { size, partial, ..Default::default() }),
        }))
    }

    /// Removes every tile (before a rebuild) and opens an empty set.
    pub(super) fn create_empty(dir: &Path) -> Result<Tiles, TileError> {
        let tile = dir.join("tile");
        match std::fs::remove_dir_all(&tile) {
            Ok(()) => sync_dir(dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&tile, "remove before rebuilding")(e)),
        }
        match Tiles::open(dir, 0)? {
            Opened::Ready(t) => Ok(t),
            Opened::NeedsRebuild(e) => Err(e),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        match self.w.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Appends the leaf hash of record `index` (in log order), and the root of every tile it
    /// fills to the level above. Written at the next [`Tiles::flush`].
    pub(super) fn append(&self, index: u64, leaf: Hash) -> Result<(), TileError> {
        let mut w = self.lock();
        if index != w.size {
            return Err(TileError::damaged(
                &self.dir,
                format!("leaf {index} appended where the tiles hold {} leaves", w.size),
            ));
        }
        w.size += 1;
        let size = w.size;
        let mut level = 0u8;
        let mut hash = leaf;
        loop {
            let l = usize::from(level);
            if l >= MAX_TILE_LEVELS {
                return Err(TileError::damaged(&self.dir, "the log is beyond 2^64 records"));
            }
            while w.partial.len() <= l {
                w.partial.push(Vec::new());
            }
            let entry = level_count(size, level) - 1;
            let n = entry / TILE_WIDTH;
            w.pending.entry((level, n)).or_insert_with(|| (entry % TILE_WIDTH, Vec::new())).1.extend_from_slice(&hash);
            let Some(partial) = w.partial.get_mut(l) else { break };
            partial.push(hash);
            if partial.len() as u64 != TILE_WIDTH {
                break;
            }
            hash = subtree_root(partial);
            partial.clear();
            level += 1;
        }
        Ok(())
    }

    /// Writes the appended hashes (one `pwrite` per tile), making them readable.
    pub(super) fn flush(&self) -> Result<(), TileError> {
        let mut w = self.lock();
        let pending = std::mem::take(&mut w.pending);
        for ((level, n), (first, bytes)) in pending {
            let path = self.dir.join(tile_path(level, n));
            if !w.dirty.contains_key(&(level, n)) {
                let created = create_dirs(&self.dir, path.parent().unwrap_or(&self.dir), &mut w.dirs)?;
                let exists = !created && path.exists();
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io(&path, "open for appending"))?;
                if !exists {
                    w.dirs.insert(path.parent().unwrap_or(&self.dir).to_path_buf());
                }
                w.dirty.insert((level, n), f);
            }
            let Some(f) = w.dirty.get(&(level, n)) else { continue };
            f.write_all_at(&bytes, first * HASH_BYTES).map_err(io(&path, "write hashes"))?;
        }
        Ok(())
    }

    /// Flushes and syncs every tile written since the last sync, and the directories that
    /// gained one (before a redb sync).
    pub(super) fn sync(&self) -> Result<(), TileError> {
        self.flush()?;
        let mut w = self.lock();
        for ((level, n), f) in std::mem::take(&mut w.dirty) {
            f.sync_data().map_err(|e| io(&self.dir.join(tile_path(level, n)), "sync")(e))?;
        }
        // Deepest first, so that a directory's own entry is synced after what it holds.
        let dirs: Vec<PathBuf> = std::mem::take(&mut w.dirs).into_iter().rev().collect();
        for d in dirs {
            sync_dir(&d)?;
        }
        Ok(())
    }

    /// The hash of Merkle node `(level, index)` (leaves `[index << level, (index + 1) <<
    /// level)`) in a log of `size` records whose tiles were flushed; `None` when that node is
    /// not complete at `size`.
    pub(super) fn node(&self, level: u8, index: u64, size: u64) -> Result<Option<Hash>, TileError> {
        if level >= 64 {
            return Ok(None);
        }
        let end = index.checked_add(1).and_then(|i| i.checked_mul(1u64 << level));
        if end.is_none_or(|end| end > size) {
            return Ok(None);
        }
        let tile_level = level / TILE_HEIGHT;
        let below = level % TILE_HEIGHT;
        let first = index << below;
        let count = 1u64 << below;
        let (n, at) = (first / TILE_WIDTH, first % TILE_WIDTH);
        let path = self.dir.join(tile_path(tile_level, n));
        let f = File::open(&path).map_err(io(&path, "open"))?;
        let bytes = read_at(&f, &path, at * HASH_BYTES, (at + count) * HASH_BYTES)?;
        let hashes: Vec<Hash> = bytes.chunks_exact(32).map(|c| c.try_into().unwrap_or([0u8; 32])).collect();
        Ok(Some(subtree_root(&hashes)))
    }
}

/// Hashes at tile level `level` (Merkle level `8 * level`) in a log of `size` records.
fn level_count(size: u64, level: u8) -> u64 {
    let shift = u32::from(level) * u32::from(TILE_HEIGHT);
    size.checked_shr(shift).unwrap_or(0)
}

fn ensure_dir(dir: &Path) -> Result<(), TileError> {
    match std::fs::create_dir(dir) {
        Ok(()) => sync_dir(dir.parent().unwrap_or(Path::new("."))),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io(dir, "create directory")(e)),
    }
}

/// Creates `dir` and its missing parents below `root`; every parent that gained an entry goes
/// into `to_sync`. Returns whether `dir` itself was created.
fn create_dirs(root: &Path, dir: &Path, to_sync: &mut BTreeSet<PathBuf>) -> Result<bool, TileError> {
    if dir.exists() || dir == root {
        return Ok(false);
    }
    if let Some(parent) = dir.parent() {
        create_dirs(root, parent, to_sync)?;
        match std::fs::create_dir(dir) {
            Ok(()) => {
                to_sync.insert(parent.to_path_buf());
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io(dir, "create directory")(e)),
        }
    }
    Ok(true)
}

/// Every tile file under `at` (a directory below `root`).
fn walk(root: &Path, at: &Path, out: &mut Vec<((u8, u64), PathBuf)>) -> Result<(), TileError> {
    let entries = match std::fs::read_dir(at) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(at, "list")(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(at, "list"))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io(&path, "stat"))?;
        if kind.is_dir() {
            walk(root, &path, out)?;
        } else if kind.is_file() {
            if let Some(t) = path.strip_prefix(root).ok().and_then(parse_tile_path) {
                out.push((t, path));
            }
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), TileError> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir, "sync directory"))
}

fn read_at(file: &File, path: &Path, start: u64, end: u64) -> Result<Vec<u8>, TileError> {
    let len = end.saturating_sub(start);
    if len > FULL_TILE_BYTES {
        return Err(TileError::damaged(path, format!("a read of {len} bytes is beyond any tile")));
    }
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, start).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            TileError::damaged(path, format!("shorter than {end} bytes, which the store's size needs"))
        } else {
            io(path, "read")(e)
        }
    })?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hex;
    use crate::merkle::{self, leaf_hash, MemNodes, NodeSource};

    struct At<'a>(&'a Tiles, u64);

    impl NodeSource for At<'_> {
        fn get(&self, level: u8, index: u64) -> Result<Option<Hash>, merkle::MerkleError> {
            self.0.node(level, index, self.1).map_err(|e| merkle::MerkleError::Storage(Box::new(e)))
        }
    }

    fn leaf(i: u64) -> Hash {
        leaf_hash(format!("leaf-{i}").as_bytes())
    }

    fn fresh(dir: &Path) -> Tiles {
        match Tiles::open(dir, 0).unwrap() {
            Opened::Ready(t) => t,
            Opened::NeedsRebuild(e) => panic!("{e}"),
        }
    }

    #[test]
    fn tile_paths_follow_c2sp() {
        assert_eq!(tile_path(0, 0), Path::new("tile/0/000"));
        assert_eq!(tile_path(1, 67), Path::new("tile/1/067"));
        assert_eq!(tile_path(0, 1234067), Path::new("tile/0/x001/x234/067"));
        assert_eq!(tile_path(2, 1000), Path::new("tile/2/x001/000"));
        for n in [0, 7, 999, 1000, 1234067, u64::MAX / 3] {
            assert_eq!(parse_tile_path(&tile_path(3, n)), Some((3, n)));
        }
        for bad in
            ["tile/0/1", "tile/0/0000", "tile/0/x000/001", "tile/00/001", "tile/9/001", "tile/0/001.p/5", "x/0/001"]
        {
            assert_eq!(parse_tile_path(Path::new(bad)), None, "{bad}");
        }
    }

    /// Hashes computed by Python's hashlib (RFC 6962 MTH written out independently) for the
    /// leaves `leaf-0`, `leaf-1`, ...
    #[test]
    fn roots_match_an_independent_computation() {
        let dir = tempfile::tempdir().unwrap();
        let tiles = fresh(dir.path());
        for i in 0..300 {
            tiles.append(i, leaf(i)).unwrap();
        }
        tiles.sync().unwrap();
        let root = |n| hex::encode(&merkle::root(&At(&tiles, 300), n).unwrap());
        assert_eq!(root(7), "0b007fb915eb9b2a146f54b1c86ec53b664f8e455b7660b0b6ee13edc0d921c0");
        assert_eq!(root(256), "f7ed5eb44be61908cdf66bb316813dc75442aa2a5b307177c06c728271356c91");
        assert_eq!(root(300), "608280cebdde48c28999e9cb839f03980a3e62e8b9550aa28758e91279ebd657");
        // The level 1 tile holds the root of the full level 0 tile.
        let t1 = std::fs::read(dir.path().join(tile_path(1, 0))).unwrap();
        assert_eq!(hex::encode(&t1), root(256));
        assert_eq!(std::fs::metadata(dir.path().join(tile_path(0, 0))).unwrap().len(), FULL_TILE_BYTES);
        assert_eq!(std::fs::metadata(dir.path().join(tile_path(0, 1))).unwrap().len(), 44 * 32);
    }

    /// Every node, root and proof read from the tiles equals the one of the stored-node tree,
    /// at every size across a level 1 tile boundary (and at sizes past a level 2 one).
    #[test]
    fn tiles_agree_with_the_node_tree() {
        let dir = tempfile::tempdir().unwrap();
        let tiles = fresh(dir.path());
        let mut mem = MemNodes::new();
        let n = 66_000u64;
        for i in 0..n {
            tiles.append(i, leaf(i)).unwrap();
            merkle::append(&mut mem, i, leaf(i)).unwrap();
            if i % 4096 == 0 {
                tiles.flush().unwrap();
            }
        }
        tiles.sync().unwrap();
        let at = At(&tiles, n);
        for level in 0..17u8 {
            let count = n >> level;
            for index in [0, 1, count / 2, count.saturating_sub(1), count] {
                assert_eq!(at.get(level, index).unwrap(), mem.get(level, index).unwrap(), "node ({level}, {index})");
            }
        }
        for size in (1..600).chain([65_535, 65_536, 65_537, n]) {
            let at = At(&tiles, size);
            assert_eq!(merkle::root(&at, size).unwrap(), merkle::root(&mem, size).unwrap(), "root {size}");
            let i = size / 3;
            assert_eq!(merkle::inclusion_proof(&at, i, size).unwrap(), merkle::inclusion_proof(&mem, i, size).unwrap());
            assert_eq!(
                merkle::consistency_proof(&at, size / 2, size).unwrap(),
                merkle::consistency_proof(&mem, size / 2, size).unwrap()
            );
        }
        // A node beyond the size asked for is not there, even though the files hold it.
        assert_eq!(At(&tiles, 10).get(0, 10).unwrap(), None);
    }

    /// Reopening at a smaller size (redb synced less than the tiles hold) cuts every level back
    /// and removes tiles beyond it; appending again gives the same tree.
    #[test]
    fn open_cuts_back_to_the_size_and_appends_again() {
        let dir = tempfile::tempdir().unwrap();
        let tiles = fresh(dir.path());
        for i in 0..600 {
            tiles.append(i, leaf(i)).unwrap();
        }
        tiles.sync().unwrap();
        let want = merkle::root(&At(&tiles, 600), 600).unwrap();
        drop(tiles);
        let Opened::Ready(tiles) = Tiles::open(dir.path(), 200).unwrap() else { panic!("rebuild") };
        assert!(!dir.path().join(tile_path(0, 1)).exists());
        assert!(!dir.path().join(tile_path(1, 0)).exists());
        assert_eq!(std::fs::metadata(dir.path().join(tile_path(0, 0))).unwrap().len(), 200 * 32);
        for i in 200..600 {
            tiles.append(i, leaf(i)).unwrap();
        }
        tiles.sync().unwrap();
        assert_eq!(merkle::root(&At(&tiles, 600), 600).unwrap(), want);
        // Shorter than the size needs, or a tile missing: rebuilt by the store.
        drop(tiles);
        std::fs::remove_file(dir.path().join(tile_path(0, 1))).unwrap();
        let Opened::NeedsRebuild(e) = Tiles::open(dir.path(), 600).unwrap() else { panic!("opened") };
        assert!(e.to_string().contains("tile/0/001") && e.to_string().contains("missing"), "{e}");
    }

    /// A level's last tile torn at every byte: at or beyond what the size needs, it is cut back
    /// to exactly that and the tree is unchanged; below it, the store is told to rebuild.
    #[test]
    fn a_tile_torn_at_every_byte_is_cut_back_or_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let tiles = fresh(dir.path());
        for i in 0..300 {
            tiles.append(i, leaf(i)).unwrap();
        }
        tiles.sync().unwrap();
        drop(tiles);
        let path = dir.path().join(tile_path(0, 1));
        let full = std::fs::read(&path).unwrap();
        assert_eq!(full.len(), 44 * 32);
        let synced = 20u64 * 32;
        let want = {
            let Opened::Ready(t) = Tiles::open(dir.path(), 276).unwrap() else { panic!("rebuild") };
            merkle::root(&At(&t, 276), 276).unwrap()
        };
        for cut in 0..=full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            match Tiles::open(dir.path(), 276).unwrap() {
                Opened::Ready(t) => {
                    assert!(cut as u64 >= synced, "opened a tile cut at {cut}");
                    assert_eq!(std::fs::metadata(&path).unwrap().len(), synced);
                    assert_eq!(merkle::root(&At(&t, 276), 276).unwrap(), want, "cut at {cut}");
                }
                Opened::NeedsRebuild(e) => {
                    assert!((cut as u64) < synced, "cut at {cut}: {e}");
                    assert!(e.to_string().contains("tile/0/001"), "{e}");
                }
            }
        }
    }
}
