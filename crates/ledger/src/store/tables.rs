//! The store's tables and how a group is written: the table definitions and `meta` keys, creating
//! them at open (and migrating a format 2 store), and [`Tables::apply_group`], the one place a
//! group's state writes, records (segment, Merkle tiles, chain link, chain tail) and checkpoint are
//! written, shared by the indexer and journal replay so both write exactly the same bytes.
//!
//! Must not: decide what to write or when to commit (the writer and replay do), or read for callers
//! (the snapshot does).

use std::collections::HashMap;
use std::path::Path;

use redb::{Database, ReadableTable, Table, TableDefinition};

use super::*;
use crate::journal::GroupEffects;
use crate::merkle;
use crate::record;

/// Format 2 only (removed by the migration to format 3): Merkle nodes, chain heads, chain index.
pub(super) const NODES: TableDefinition<u64, [u8; 32]> = TableDefinition::new("merkle_nodes");
pub(super) const HEADS: TableDefinition<&str, (u64, [u8; 32])> = TableDefinition::new("chain_heads");
pub(super) const CHAIN_INDEX: TableDefinition<(&str, u64), u64> = TableDefinition::new("chain_index");
/// chain → (seq, leaf hash, log index) of its last record.
pub(super) const TAILS: TableDefinition<&str, (u64, [u8; 32], u64)> = TableDefinition::new("chain_tails");
pub(super) const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
pub(super) const CHECKPOINTS: TableDefinition<u64, &str> = TableDefinition::new("checkpoints");
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

pub(super) const META_SIZE: &str = "size";
pub(super) const WRITER_THREAD: &str = "sluice-ledger";
pub(super) const META_FORMAT: &str = "format";
/// Ties the journal file to this store.
pub(super) const META_JOURNAL_ID: &str = "journal_id";
/// Sequence number of the last group committed to redb.
pub(super) const META_GSEQ: &str = "journal_seq";
/// 1 when the last writer stopped cleanly (everything synced to redb), 0 while one runs.
pub(super) const META_CLEAN: &str = "clean_stop";
/// log2 of the records per segment, fixed when the store is created.
pub(super) const META_SEGMENT_SHIFT: &str = "segment_shift";
/// Bytes of the open segment (the one the log ends in) as of this commit.
pub(super) const META_OPEN_LEN: &str = "open_segment_len";
/// Version 2: records in segment files, not in redb. Version 3: Merkle hashes in tile files and
/// chain membership in the links file, not in redb (a version 2 store is migrated at open).
pub(super) const FORMAT_VERSION: u64 = 3;
/// The version migrated in place at open.
pub(super) const FORMAT_SEGMENTS: u64 = 2;

/// The write transaction's tables, and how one group is stored (shared by the indexer and
/// journal replay, so both write exactly the same rows).
pub(super) struct Tables<'t> {
    pub(super) tails: Table<'t, &'static str, (u64, [u8; 32], u64)>,
    pub(super) state: Table<'t, &'static str, &'static [u8]>,
    pub(super) checkpoints: Table<'t, u64, &'static str>,
    pub(super) meta: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    pub(super) fn open(wtxn: &'t redb::WriteTransaction, path: &Path) -> Result<Tables<'t>, StorageError> {
        Ok(Tables {
            tails: wtxn.open_table(TAILS).map_err(se(path, "open chain tails"))?,
            state: wtxn.open_table(STATE).map_err(se(path, "open state"))?,
            checkpoints: wtxn.open_table(CHECKPOINTS).map_err(se(path, "open checkpoints"))?,
            meta: wtxn.open_table(META).map_err(se(path, "open meta"))?,
        })
    }

    /// Applies one group's effects (the journal entry `gseq`) on top of a log of `size` records,
    /// checking that they follow it; returns the size after the group. The records go to their
    /// files (buffered there until the next flush), the rows to `rows`, which
    /// [`Tables::write`] stores. The indexer (live) and journal replay (at open) both apply
    /// groups through here, so both write the same rows. `leaves`, when given, are the records'
    /// leaf hashes as the writer computed them (replay hashes the records itself).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn apply_group(
        &self,
        rows: &mut Rows,
        gseq: u64,
        fx: &GroupEffects,
        leaves: Option<&[merkle::Hash]>,
        mut size: u64,
        files: &LogFiles,
        path: &Path,
    ) -> Result<u64, ApplyError> {
        for (k, v) in &fx.state {
            check_key(k).map_err(|e| ApplyError::Bad(e.to_string()))?;
            match rows.state.get_mut(k.as_str()) {
                Some(slot) => slot.clone_from(v),
                None => {
                    rows.state.insert(k.clone(), v.clone());
                }
            }
        }
        if leaves.is_some_and(|l| l.len() != fx.records.len()) {
            return Err(ApplyError::Bad(format!(
                "{} leaf hashes for {} records",
                leaves.map_or(0, <[_]>::len),
                fx.records.len()
            )));
        }
        for (i, r) in fx.records.iter().enumerate() {
            if r.index != size {
                return Err(ApplyError::Bad(format!("record index {} where the log has {size} records", r.index)));
            }
            record::check_chain(&r.chain).map_err(|e| ApplyError::Bad(e.to_string()))?;
            if r.index >= merkle::MAX_TREE_SIZE - 1 {
                return Err(ApplyError::Bad(format!("record index {} is beyond the supported log size", r.index)));
            }
            let leaf = match leaves.and_then(|l| l.get(i)) {
                Some(leaf) => *leaf,
                None => merkle::leaf_hash(&r.canonical),
            };
            let prev = match rows.tails.get(r.chain.as_str()) {
                Some(tail) => Some(*tail),
                None => self.tails.get(r.chain.as_str()).map_err(se(path, "read chain tail"))?.map(|g| g.value()),
            };
            let prev = match prev {
                Some((seq, _, index)) if r.seq == seq.saturating_add(1) && seq != u64::MAX => index,
                None if r.seq == 0 => links::NONE,
                other => {
                    return Err(ApplyError::Bad(format!(
                        "record {} is seq {} of chain {:?}, whose last record is seq {:?}",
                        r.index,
                        r.seq,
                        r.chain,
                        other.map(|(seq, ..)| seq)
                    )))
                }
            };
            files.segments.append(r.index, &r.canonical).map_err(|e| ApplyError::Bad(e.to_string()))?;
            files.tiles.append(r.index, leaf).map_err(|e| ApplyError::Bad(e.to_string()))?;
            files.links.append(r.index, prev).map_err(|e| ApplyError::Bad(e.to_string()))?;
            match rows.tails.get_mut(r.chain.as_str()) {
                Some(tail) => *tail = (r.seq, leaf, r.index),
                None => {
                    rows.tails.insert(r.chain.clone(), (r.seq, leaf, r.index));
                }
            }
            size += 1;
        }
        if fx.size != size {
            return Err(ApplyError::Bad(format!("says the log has {} records after it, replay gives {size}", fx.size)));
        }
        if let Some((cp_size, note)) = &fx.checkpoint {
            if *cp_size != size {
                return Err(ApplyError::Bad(format!("checkpoint of size {cp_size} in a group ending at {size}")));
            }
            rows.checkpoints.push((*cp_size, note.clone()));
        }
        rows.end = Some((size, gseq));
        Ok(size)
    }

    /// Stores `rows` (and empties it): one write per state key and chain, whatever number of
    /// groups changed them.
    pub(super) fn write(&mut self, rows: &mut Rows, path: &Path) -> Result<(), StorageError> {
        for (k, v) in rows.state.drain() {
            match v {
                Some(v) => self.state.insert(k.as_str(), v.as_slice()).map(|_| ()).map_err(se(path, "write state"))?,
                None => self.state.remove(k.as_str()).map(|_| ()).map_err(se(path, "delete state"))?,
            }
        }
        for (chain, tail) in rows.tails.drain() {
            self.tails.insert(chain.as_str(), tail).map_err(se(path, "write chain tail"))?;
        }
        for (size, note) in rows.checkpoints.drain(..) {
            self.checkpoints.insert(size, note.as_str()).map_err(se(path, "write checkpoint"))?;
        }
        if let Some((size, gseq)) = rows.end.take() {
            self.meta.insert(META_SIZE, size).map_err(se(path, "write size"))?;
            self.meta.insert(META_GSEQ, gseq).map_err(se(path, "write journal seq"))?;
        }
        Ok(())
    }
}

/// The rows of groups applied but not yet stored: the last value of every state key and chain
/// tail they changed, their checkpoints, and the log size and group sequence number after the
/// last one. Many groups change the same few rows (a passport's counters and chain tail with
/// every decision), so storing them once per batch is far cheaper than once per group.
#[derive(Default)]
pub(super) struct Rows {
    state: HashMap<String, Option<Vec<u8>>>,
    tails: HashMap<String, (u64, [u8; 32], u64)>,
    checkpoints: Vec<(u64, String)>,
    end: Option<(u64, u64)>,
}

/// Why a group could not be applied to redb.
pub(super) enum ApplyError {
    /// The group does not follow the store (a damaged or foreign journal).
    Bad(String),
    Storage(StorageError),
}

impl From<StorageError> for ApplyError {
    fn from(e: StorageError) -> Self {
        ApplyError::Storage(e)
    }
}

/// Creates the tables (and `meta`) of a new store, or checks an existing store's format.
/// Returns the store's segment shift, and whether it is a format 2 store to migrate
/// (by `open::open_files`, once its segments are open).
pub(super) fn init_tables(db: &Database, path: &Path, segment_records: u64) -> Result<(u32, bool), LedgerError> {
    let txn = db.begin_write().map_err(se(path, "begin initial transaction"))?;
    let mut migrate = false;
    {
        txn.open_table(TAILS).map_err(se(path, "create chain tails table"))?;
        txn.open_table(STATE).map_err(se(path, "create state table"))?;
        txn.open_table(CHECKPOINTS).map_err(se(path, "create checkpoints table"))?;
        let mut meta = txn.open_table(META).map_err(se(path, "create meta table"))?;
        let format = meta.get(META_FORMAT).map_err(se(path, "read format"))?.map(|g| g.value());
        match format {
            None => {
                meta.insert(META_FORMAT, FORMAT_VERSION).map_err(se(path, "write format"))?;
                let shift = u64::from(segment_records.clamp(1, 1 << 30).next_power_of_two().trailing_zeros());
                meta.insert(META_SEGMENT_SHIFT, shift).map_err(se(path, "write segment size"))?;
                meta.insert(META_OPEN_LEN, 0).map_err(se(path, "write segment length"))?;
                if meta.get(META_SIZE).map_err(se(path, "read size"))?.is_none() {
                    meta.insert(META_SIZE, 0).map_err(se(path, "write size"))?;
                }
            }
            Some(FORMAT_VERSION) => {}
            Some(FORMAT_SEGMENTS) => migrate = true,
            Some(other) => {
                return Err(LedgerError::Incoherent {
                    path: path.to_path_buf(),
                    reason: format!(
                        "store format version {other} is not supported (this build reads version {FORMAT_VERSION} \
                         and migrates version {FORMAT_SEGMENTS}; version 1 kept records inside redb: export it with \
                         the sluice that wrote it)"
                    ),
                })
            }
        }
    }
    {
        let mut meta = txn.open_table(META).map_err(se(path, "open meta table"))?;
        if meta.get(META_JOURNAL_ID).map_err(se(path, "read journal id"))?.is_none() {
            // Nonzero, so a zero-filled header never matches.
            meta.insert(META_JOURNAL_ID, rand::random::<u64>() | 1).map_err(se(path, "write journal id"))?;
            meta.insert(META_GSEQ, 0).map_err(se(path, "write journal seq"))?;
        }
    }
    let shift = {
        let meta = txn.open_table(META).map_err(se(path, "open meta table"))?;
        let shift = meta.get(META_SEGMENT_SHIFT).map_err(se(path, "read segment size"))?.map(|g| g.value());
        match shift {
            Some(s) if s <= 30 => s as u32,
            other => {
                return Err(LedgerError::Incoherent {
                    path: path.to_path_buf(),
                    reason: format!("meta segment_shift is {other:?}, not a number of bits up to 30"),
                })
            }
        }
    };
    txn.commit().map_err(se(path, "commit initial transaction"))?;
    Ok((shift, migrate))
}
