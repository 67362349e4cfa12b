//! What opening a store does before the writer starts: opening the tiles and links (cut back to
//! redb's size, rebuilt from the records when short, built from them when migrating a format 2
//! store), replaying the commit journal's groups that redb does not have yet (after a crash),
//! marking the store as running, the coherence check that refuses a store whose size, records,
//! Merkle tiles or latest checkpoint do not agree, and loading what the writer keeps in memory
//! (state, chain heads, Merkle frontier).
//!
//! Must not: start the writer or serve callers; it runs once, on the opening thread.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use ed25519_dalek::VerifyingKey;
use redb::{Database, ReadableTable};

use super::links::{self, Links};
use super::segments::Segments;
use super::tiles::{self, TileError, Tiles};
use super::*;
use crate::checkpoint::{self, SignedCheckpoint};
use crate::journal::{self, GroupEffects, Journal};
use crate::merkle::{self, NodeSource, RootBuilder};
use crate::record::{self, ChainHead};

/// The files the indexer appends to besides redb: the segments (records), the tiles (Merkle
/// hashes) and the links (chain membership). All three are synced before every redb sync.
pub(super) struct LogFiles {
    pub(super) segments: Arc<Segments>,
    pub(super) tiles: Tiles,
    pub(super) links: Links,
}

impl LogFiles {
    /// Makes everything appended readable (before a redb commit publishes it).
    pub(super) fn flush(&self) -> Result<(), LedgerError> {
        self.segments.flush()?;
        self.tiles.flush()?;
        self.links.flush()?;
        Ok(())
    }

    /// Makes everything appended durable (before a redb sync).
    pub(super) fn sync(&self) -> Result<(), LedgerError> {
        self.segments.sync()?;
        self.tiles.sync()?;
        self.links.sync()?;
        Ok(())
    }
}

/// Opens the tiles and links of a store of `size` records (redb's synced size): cut back to it,
/// rebuilt from the segments when a file is missing or short, or built from them for a format 2
/// store (`migrate`), which is then marked format 3 in one redb commit.
pub(super) fn open_files(
    db: &Database,
    path: &Path,
    segments: Arc<Segments>,
    size: u64,
    migrate: bool,
) -> Result<LogFiles, LedgerError> {
    let (tdir, lpath) = (tiles::tiles_dir(path), links::links_path(path));
    if migrate {
        tracing::warn!(store = %path.display(), records = size, "migrating the ledger store from format 2 to 3 (Merkle hashes into tile files, chain index into the links file)");
        let (tiles, links, tails) = rebuild(path, &segments, size, &tdir, &lpath)?;
        let txn = db.begin_write().map_err(se(path, "begin migration"))?;
        {
            let mut t = txn.open_table(TAILS).map_err(se(path, "open chain tails"))?;
            for (chain, (seq, leaf, index)) in &tails {
                t.insert(chain.as_str(), (*seq, *leaf, *index)).map_err(se(path, "write chain tail"))?;
            }
            let mut meta = txn.open_table(META).map_err(se(path, "open meta"))?;
            meta.insert(META_FORMAT, FORMAT_VERSION).map_err(se(path, "write format"))?;
        }
        txn.delete_table(NODES).map_err(se(path, "remove the format 2 merkle table"))?;
        txn.delete_table(HEADS).map_err(se(path, "remove the format 2 chain heads table"))?;
        txn.delete_table(CHAIN_INDEX).map_err(se(path, "remove the format 2 chain index table"))?;
        txn.commit().map_err(se(path, "commit migration"))?;
        return Ok(LogFiles { segments, tiles, links });
    }
    let tiles = match Tiles::open(&tdir, size)? {
        tiles::Opened::Ready(t) => Some(t),
        tiles::Opened::NeedsRebuild(e) => {
            tracing::warn!(error = %e, "rebuilding the ledger's Merkle tiles from the records");
            None
        }
    };
    let links = match Links::open(&lpath, size)? {
        links::Opened::Ready(l) => Some(l),
        links::Opened::NeedsRebuild(e) => {
            tracing::warn!(error = %e, "rebuilding the ledger's chain links from the records");
            None
        }
    };
    match (tiles, links) {
        (Some(tiles), Some(links)) => Ok(LogFiles { segments, tiles, links }),
        _ => {
            let (tiles, links, _) = rebuild(path, &segments, size, &tdir, &lpath)?;
            Ok(LogFiles { segments, tiles, links })
        }
    }
}

/// Test hook: every store whose tiles and links were rebuilt (a crash image must not need it).
#[cfg(test)]
pub(crate) static REBUILT: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Builds the tiles and links of the first `size` records from the segments, synced, and
/// returns every chain's tail (seq, leaf hash, index).
#[allow(clippy::type_complexity)]
fn rebuild(
    path: &Path,
    segments: &Segments,
    size: u64,
    tdir: &Path,
    lpath: &Path,
) -> Result<(Tiles, Links, HashMap<String, (u64, merkle::Hash, u64)>), LedgerError> {
    #[cfg(test)]
    if let Ok(mut r) = REBUILT.lock() {
        r.push(path.to_path_buf());
    }
    let tiles = Tiles::create_empty(tdir)?;
    let links = Links::create_empty(lpath)?;
    let mut tails: HashMap<String, (u64, merkle::Hash, u64)> = HashMap::new();
    let bad = |reason: String| LedgerError::Incoherent { path: path.to_path_buf(), reason };
    const STEP: u64 = 4096;
    let mut from = 0;
    while from < size {
        let to = (from + STEP).min(size);
        segments.for_each(from, to, |i, bytes| {
            let leaf = merkle::leaf_hash(bytes);
            let v: serde_json::Value = serde_json::from_slice(bytes)
                .map_err(|e| bad(format!("record {i} is not JSON ({e}); cannot rebuild its chain link")))?;
            let chain = v.get(record::FIELD_CHAIN).and_then(|c| c.as_str());
            let seq = v.get(record::FIELD_SEQ).and_then(|c| c.as_u64());
            let (Some(chain), Some(seq)) = (chain, seq) else {
                return Err(bad(format!("record {i} has no chain or seq; cannot rebuild its chain link")));
            };
            let prev = match tails.get(chain) {
                Some(&(s, _, index)) if s.checked_add(1) == Some(seq) => index,
                None if seq == 0 => links::NONE,
                other => {
                    return Err(bad(format!(
                        "record {i} is seq {seq} of chain {chain:?}, after seq {:?}: the chain has a gap",
                        other.map(|t| t.0)
                    )))
                }
            };
            tiles.append(i, leaf)?;
            links.append(i, prev)?;
            tails.insert(chain.to_string(), (seq, leaf, i));
            Ok(())
        })?;
        tiles.flush()?;
        links.flush()?;
        from = to;
    }
    tiles.sync()?;
    links.sync()?;
    tracing::info!(store = %path.display(), records = size, chains = tails.len(), "rebuilt the ledger's Merkle tiles and chain links");
    Ok((tiles, links, tails))
}

impl From<TileError> for LedgerError {
    fn from(e: TileError) -> Self {
        LedgerError::Tile(e)
    }
}

/// Opens the store's journal and applies (durably) every group it holds that redb does not.
/// Returns the journal, emptied, and the sequence number of the last group.
pub(super) fn open_journal(
    db: &Database,
    path: &Path,
    capacity: u64,
    files: &LogFiles,
) -> Result<(Journal, u64), LedgerError> {
    let jpath = journal_path(path);
    let (id, stored, clean) = {
        let txn = db.begin_read().map_err(se(path, "begin read"))?;
        let meta = txn.open_table(META).map_err(se(path, "open meta"))?;
        let get = |k| meta.get(k).map(|v| v.map(|g| g.value()));
        (
            get(META_JOURNAL_ID).map_err(se(path, "read journal id"))?.unwrap_or(0),
            get(META_GSEQ).map_err(se(path, "read seq"))?.unwrap_or(0),
            get(META_CLEAN).map_err(se(path, "read clean flag"))?.unwrap_or(1) == 1,
        )
    };
    let bad = |reason: String| LedgerError::Incoherent { path: path.to_path_buf(), reason };
    let jerr = |e: journal::JournalError| LedgerError::Journal(Arc::new(e));
    let (mut journal, entries, missing) = Journal::open(&jpath, id, capacity).map_err(jerr)?;
    if missing && !clean {
        // Remove what we just made, so the operator's decision below is not taken for them.
        let _ = std::fs::remove_file(&jpath);
        return Err(bad(format!(
            "its journal {} is missing, and the daemon did not stop cleanly: the decisions answered \
             in the last second before that stop may exist only there. Restore the journal from where it \
             went; if it is lost for good, create an empty file at that path to start without it (those \
             decisions are then missing from the log and their spend from the counters)",
            jpath.display()
        )));
    }
    mark_running(db, path)?;
    let pending: Vec<_> = entries.into_iter().filter(|e| e.gseq > stored).collect();
    let Some(first) = pending.first() else {
        journal.reset().map_err(jerr)?;
        return Ok((journal, stored));
    };
    if first.gseq != stored + 1 {
        return Err(bad(format!(
            "journal {} resumes at group {} but the store ends at group {stored}: the store is older than its \
             journal (restored from a backup without it?)",
            jpath.display(),
            first.gseq
        )));
    }
    let wtxn = db.begin_write().map_err(se(path, "begin replay"))?;
    let (mut gseq, mut records) = (stored, 0usize);
    {
        let mut t = Tables::open(&wtxn, path)?;
        let mut size = t.meta.get(META_SIZE).map_err(se(path, "read size"))?.map(|g| g.value()).unwrap_or(0);
        let mut rows = Rows::default();
        for entry in &pending {
            let at = |what: String| bad(format!("journal {} group {}: {what}", jpath.display(), entry.gseq));
            let fx = GroupEffects::decode(&entry.payload).map_err(|e| at(e.to_string()))?;
            records += fx.records.len();
            size = match t.apply_group(&mut rows, entry.gseq, &fx, None, size, files, path) {
                Ok(size) => size,
                Err(ApplyError::Bad(what)) => return Err(at(what)),
                Err(ApplyError::Storage(e)) => return Err(e.into()),
            };
            gseq = entry.gseq;
        }
        t.write(&mut rows, path)?;
        // The records first: redb's synced size must never pass what the files hold.
        files.sync()?;
        t.meta.insert(META_OPEN_LEN, files.segments.open_len(size)).map_err(se(path, "write segment length"))?;
    }
    wtxn.commit().map_err(se(path, "commit replay"))?;
    tracing::warn!(
        journal = %jpath.display(),
        groups = pending.len(),
        records,
        "the daemon did not stop cleanly: applied the journal's last groups to the store"
    );
    journal.reset().map_err(jerr)?;
    Ok((journal, gseq))
}

/// What the writer keeps in memory, loaded from redb at open (after replay): the whole state
/// table, every chain's head, and the Merkle frontier (the perfect-subtree hashes the next root
/// is computed from).
pub(super) struct Memory {
    pub(super) state: BTreeMap<String, Vec<u8>>,
    pub(super) heads: HashMap<String, ChainHead>,
    pub(super) frontier: RootBuilder,
}

pub(super) fn load_memory(db: &Database, path: &Path, size: u64, files: &Arc<LogFiles>) -> Result<Memory, LedgerError> {
    let snap = Snapshot::new(db, path, files)?;
    let mut state = BTreeMap::new();
    let t = snap.txn.open_table(STATE).map_err(se(path, "open state"))?;
    t.view_scan("", &mut state).map_err(se(path, "load state"))?;
    let mut heads = HashMap::new();
    let t = snap.txn.open_table(TAILS).map_err(se(path, "open chain tails"))?;
    for entry in t.iter().map_err(se(path, "load chain tails"))? {
        let (k, v) = entry.map_err(se(path, "load chain tails"))?;
        let (seq, hash, _) = v.value();
        heads.insert(k.value().to_string(), ChainHead { seq, hash });
    }
    let frontier = merkle::frontier(&snap.nodes()?, size)?;
    Ok(Memory { state, heads, frontier })
}

/// The log size and the open segment's length as redb has them (before replay).
pub(super) fn read_sizes(db: &Database, path: &Path) -> Result<(u64, u64), LedgerError> {
    let txn = db.begin_read().map_err(se(path, "begin read"))?;
    let meta = txn.open_table(META).map_err(se(path, "open meta"))?;
    let get = |k| meta.get(k).map(|v| v.map(|g| g.value()).unwrap_or(0));
    Ok((get(META_SIZE).map_err(se(path, "read size"))?, get(META_OPEN_LEN).map_err(se(path, "read segment length"))?))
}

/// Records (durably) that a writer is running, so a missing journal after an unclean stop is
/// noticed at the next open.
pub(super) fn mark_running(db: &Database, path: &Path) -> Result<(), LedgerError> {
    let txn = db.begin_write().map_err(se(path, "begin"))?;
    {
        let mut meta = txn.open_table(META).map_err(se(path, "open meta"))?;
        meta.insert(META_CLEAN, 0).map_err(se(path, "write clean flag"))?;
    }
    txn.commit().map_err(se(path, "commit clean flag"))?;
    Ok(())
}

/// Checks that the stored tree hangs together: the size matches the records, the last leaf is
/// the hash of the last record, every node needed for the root exists, and the latest checkpoint
/// verifies with this host key and matches the root the nodes give at its size.
///
/// This is O(log n), not a full rehash (that is what `audit verify` on a full export does).
pub(super) fn check_coherent(
    db: &Database,
    path: &Path,
    public: &VerifyingKey,
    files: &Arc<LogFiles>,
) -> Result<(u64, Option<SignedCheckpoint>), LedgerError> {
    let bad = |reason: String| LedgerError::Incoherent { path: path.to_path_buf(), reason };
    let snap = Snapshot::new(db, path, files)?;
    let size = snap.size;
    // The segments were checked against the size when they were opened (and replay appended
    // exactly the records it counted): the last record is where the size says.
    if size > 0 {
        let last_bytes = files.segments.read(size - 1).map_err(|e| bad(format!("cannot read the last record: {e}")))?;
        let leaf = snap.nodes()?.get(0, size - 1).map_err(|e| bad(format!("cannot read the last leaf hash: {e}")))?;
        if leaf != Some(merkle::leaf_hash(&last_bytes)) {
            return Err(bad(format!("stored leaf hash of record {} does not match the record", size - 1)));
        }
    }
    merkle::root(&snap.nodes()?, size).map_err(|e| bad(format!("cannot compute the root of {size} records: {e}")))?;
    let latest = snap.latest_checkpoint_note()?;
    let latest = match latest {
        None => None,
        Some(note) => {
            let signed = checkpoint::open(&note, public).map_err(|e| {
                bad(format!(
                    "latest stored checkpoint does not verify with this host key ({e}); was host.key replaced?"
                ))
            })?;
            let cp = &signed.checkpoint;
            if cp.size > size {
                return Err(bad(format!(
                    "latest checkpoint covers {} records but only {size} are stored (records lost or store rolled back)",
                    cp.size
                )));
            }
            let root = merkle::root(&snap.nodes()?, cp.size).map_err(|e| {
                bad(format!("cannot compute the root at the latest checkpoint's size {}: {e}", cp.size))
            })?;
            if root != cp.root {
                return Err(bad(format!(
                    "the stored tree's root at size {} differs from the signed checkpoint",
                    cp.size
                )));
            }
            Some(signed)
        }
    };
    Ok((size, latest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;
    use ed25519_dalek::SigningKey;
    use redb::Table;

    fn key() -> HostKey {
        HostKey::from_signing_key(SigningKey::from_bytes(&[3u8; 32]))
    }

    /// Builds a store of 5 records with a checkpoint, closes it, damages it with `damage`, and
    /// returns the error `open` gives.
    fn open_after(damage: impl FnOnce(&WriteTxnTables<'_>, &Path)) -> LedgerError {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.redb");
        {
            let ledger = Ledger::open(&path, key(), LedgerOptions::default()).unwrap();
            for i in 0..5 {
                ledger
                    .transact_blocking(move |_| {
                        let mut body = serde_json::Map::new();
                        body.insert("i".into(), i.into());
                        Ok(((), vec![Draft::new("p", body)]))
                    })
                    .unwrap();
            }
            ledger.shutdown();
        }
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let tables = WriteTxnTables {
                    tile0: tiles::tiles_dir(&path).join(tiles::tile_path(0, 0)),
                    meta: txn.open_table(META).unwrap().into(),
                    checkpoints: txn.open_table(CHECKPOINTS).unwrap().into(),
                };
                damage(&tables, &segments_dir(&path).join(format!("{:016x}.log", 0)));
            }
            txn.commit().unwrap();
        }
        Ledger::open(&path, key(), LedgerOptions::default()).unwrap_err()
    }

    struct WriteTxnTables<'t> {
        /// The level 0 tile (the 5 leaf hashes).
        tile0: std::path::PathBuf,
        meta: std::cell::RefCell<Table<'t, &'static str, u64>>,
        checkpoints: std::cell::RefCell<Table<'t, u64, &'static str>>,
    }

    fn assert_incoherent(err: LedgerError, needle: &str) {
        let msg = err.to_string();
        assert!(matches!(err, LedgerError::Incoherent { .. }), "{msg}");
        assert!(msg.contains(needle), "expected {needle:?} in: {msg}");
        assert!(msg.contains("refusing to start"), "{msg}");
    }

    #[test]
    fn intact_store_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.redb");
        drop(Ledger::open(&path, key(), LedgerOptions::default()).unwrap());
        let l = Ledger::open(&path, key(), LedgerOptions::default()).unwrap();
        assert_eq!(l.size(), 0);
    }

    #[test]
    fn open_refuses_size_not_matching_records() {
        let err = open_after(|t, _| {
            t.meta.borrow_mut().insert(META_SIZE, 4).unwrap();
        });
        assert_incoherent(err, "holds 5 records where the store has 4 in it");
    }

    /// The segment file's last record cut off (and redb told so): records lost.
    #[test]
    fn open_refuses_deleted_last_record() {
        let err = open_after(|t, seg| {
            let bytes = std::fs::read(seg).unwrap();
            let mut at = 0usize;
            for _ in 0..4 {
                at += 4 + u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            }
            std::fs::write(seg, &bytes[..at]).unwrap();
            t.meta.borrow_mut().insert(META_SIZE, 4).unwrap();
            t.meta.borrow_mut().insert(META_OPEN_LEN, at as u64).unwrap();
        });
        // Size 4 is below the checkpoint's 5: records lost.
        assert_incoherent(err, "latest checkpoint covers 5 records");
    }

    #[test]
    fn open_refuses_a_segment_shorter_than_synced() {
        let err = open_after(|_, seg| {
            let len = std::fs::metadata(seg).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(seg).unwrap().set_len(len - 1).unwrap();
        });
        assert_incoherent(err, "but the store synced");
    }

    #[test]
    fn open_refuses_a_missing_segment() {
        let err = open_after(|_, seg| std::fs::remove_file(seg).unwrap());
        assert_incoherent(err, "missing, but the store holds records 0..5 in it");
    }

    #[test]
    fn open_refuses_edited_last_record() {
        let err = open_after(|_, seg| {
            let mut bytes = std::fs::read(seg).unwrap();
            // `"i":4` → `"i":5` in the last record, same length.
            let at = bytes.windows(5).rposition(|w| w == b"\"i\":4").unwrap();
            bytes[at + 4] = b'5';
            std::fs::write(seg, &bytes).unwrap();
        });
        assert_incoherent(err, "stored leaf hash of record 4");
    }

    /// Tiles are derived from the records: a missing one is rebuilt, and the rebuilt tree
    /// still matches the signed checkpoint.
    #[test]
    fn a_missing_tile_is_rebuilt_from_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.redb");
        let root = {
            let ledger = Ledger::open(&path, key(), LedgerOptions::default()).unwrap();
            for i in 0..5 {
                ledger
                    .transact_blocking(move |_| {
                        let mut body = serde_json::Map::new();
                        body.insert("i".into(), i.into());
                        Ok(((), vec![Draft::new(if i % 2 == 0 { "p" } else { "q" }, body)]))
                    })
                    .unwrap();
            }
            let root = ledger.snapshot().unwrap().root(5).unwrap();
            ledger.shutdown();
            root
        };
        std::fs::remove_file(tiles::tiles_dir(&path).join(tiles::tile_path(0, 0))).unwrap();
        std::fs::write(links::links_path(&path), b"").unwrap();
        let ledger = Ledger::open(&path, key(), LedgerOptions::default()).unwrap();
        let snap = ledger.snapshot().unwrap();
        assert_eq!(snap.root(5).unwrap(), root);
        assert_eq!(snap.chain_indices("p").unwrap(), vec![0, 2, 4]);
        assert_eq!(snap.chain_indices("q").unwrap(), vec![1, 3]);
    }

    /// A leaf hash of the tile on the root's path (leaves 0..4). Hashes off that path are not
    /// re-hashed at open (O(log n) check); a damaged one makes the proofs it enters fail
    /// verification, which `audit verify` reports.
    #[test]
    fn open_refuses_altered_tile_hash() {
        let err = open_after(|t, _| {
            let mut bytes = std::fs::read(&t.tile0).unwrap();
            bytes[40] ^= 1;
            std::fs::write(&t.tile0, bytes).unwrap();
        });
        assert_incoherent(err, "differs from the signed checkpoint");
    }

    #[test]
    fn open_refuses_altered_last_leaf_hash() {
        let err = open_after(|t, _| {
            let mut bytes = std::fs::read(&t.tile0).unwrap();
            bytes[4 * 32] ^= 1;
            std::fs::write(&t.tile0, bytes).unwrap();
        });
        assert_incoherent(err, "stored leaf hash of record 4");
    }

    #[test]
    fn open_refuses_forged_checkpoint() {
        let err = open_after(|t, _| {
            let other = HostKey::generate();
            let cp =
                checkpoint::sign(Checkpoint { origin: key().origin().to_string(), size: 5, root: [0u8; 32] }, &other);
            t.checkpoints.borrow_mut().insert(5, cp.note.as_str()).unwrap();
        });
        assert_incoherent(err, "does not verify with this host key");
    }
}
