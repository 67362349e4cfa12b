//! The store's tables and how a row is written: the table definitions and `meta` keys, creating
//! them at open, Merkle node access over redb, and [`Tables`], the one place a state write or a
//! record's rows (record, Merkle nodes, chain head, chain index) are put, shared by the live
//! writer and journal replay so both write exactly the same rows.
//!
//! Must not: decide what to write or when to commit (the writer and replay do), or read for callers
//! (the snapshot does).

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableTable, Table, TableDefinition};

use super::*;
use crate::merkle::{self, Hash, MerkleError, NodeSource, NodeStore};
use crate::record::Appended;

pub(super) const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
pub(super) const NODES: TableDefinition<u64, [u8; 32]> = TableDefinition::new("merkle_nodes");
pub(super) const HEADS: TableDefinition<&str, (u64, [u8; 32])> = TableDefinition::new("chain_heads");
pub(super) const CHAIN_INDEX: TableDefinition<(&str, u64), u64> = TableDefinition::new("chain_index");
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
pub(super) const FORMAT_VERSION: u64 = 1;

pub(super) struct NodesRead<'a, T>(pub(super) &'a T);

impl<T: ReadableTable<u64, [u8; 32]>> NodeSource for NodesRead<'_, T> {
    fn get(&self, level: u8, index: u64) -> Result<Option<Hash>, MerkleError> {
        self.0
            .get(merkle::node_key(level, index))
            .map(|v| v.map(|g| g.value()))
            .map_err(|e| MerkleError::Storage(Box::new(e)))
    }
}

pub(super) struct NodesWrite<'a, 't>(pub(super) &'a mut Table<'t, u64, [u8; 32]>);

impl NodeSource for NodesWrite<'_, '_> {
    fn get(&self, level: u8, index: u64) -> Result<Option<Hash>, MerkleError> {
        NodesRead(&*self.0).get(level, index)
    }
}

impl NodeStore for NodesWrite<'_, '_> {
    fn put(&mut self, level: u8, index: u64, hash: Hash) -> Result<(), MerkleError> {
        self.0.insert(merkle::node_key(level, index), hash).map(|_| ()).map_err(|e| MerkleError::Storage(Box::new(e)))
    }
}

/// The write transaction's tables, and how one state write and one record are stored (shared by
/// the live writer and journal replay, so both write exactly the same rows).
pub(super) struct Tables<'t> {
    pub(super) records: Table<'t, u64, &'static [u8]>,
    pub(super) nodes: Table<'t, u64, [u8; 32]>,
    pub(super) heads: Table<'t, &'static str, (u64, [u8; 32])>,
    pub(super) chain_index: Table<'t, (&'static str, u64), u64>,
    pub(super) state: Table<'t, &'static str, &'static [u8]>,
    pub(super) checkpoints: Table<'t, u64, &'static str>,
    pub(super) meta: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    pub(super) fn open(wtxn: &'t redb::WriteTransaction, path: &Path) -> Result<Tables<'t>, StorageError> {
        Ok(Tables {
            records: wtxn.open_table(RECORDS).map_err(se(path, "open records"))?,
            nodes: wtxn.open_table(NODES).map_err(se(path, "open merkle"))?,
            heads: wtxn.open_table(HEADS).map_err(se(path, "open chain heads"))?,
            chain_index: wtxn.open_table(CHAIN_INDEX).map_err(se(path, "open chain index"))?,
            state: wtxn.open_table(STATE).map_err(se(path, "open state"))?,
            checkpoints: wtxn.open_table(CHECKPOINTS).map_err(se(path, "open checkpoints"))?,
            meta: wtxn.open_table(META).map_err(se(path, "open meta"))?,
        })
    }

    pub(super) fn put_state(&mut self, key: &str, val: Option<&[u8]>, path: &Path) -> Result<(), StorageError> {
        match val {
            Some(v) => self.state.insert(key, v).map(|_| ()).map_err(se(path, "write state")),
            None => self.state.remove(key).map(|_| ()).map_err(se(path, "delete state")),
        }
    }

    pub(super) fn put_record(&mut self, chain: &str, appended: &Appended, path: &Path) -> Result<(), StorageError> {
        self.records.insert(appended.index, appended.canonical.as_slice()).map_err(se(path, "write record"))?;
        merkle::append(&mut NodesWrite(&mut self.nodes), appended.index, appended.leaf_hash)
            .map_err(|e| merkle_storage(path, e))?;
        self.heads.insert(chain, (appended.seq, appended.leaf_hash)).map_err(se(path, "write chain head"))?;
        self.chain_index.insert((chain, appended.seq), appended.index).map_err(se(path, "write chain index"))?;
        Ok(())
    }
}

pub(super) fn init_tables(db: &Database, path: &Path) -> Result<(), LedgerError> {
    let txn = db.begin_write().map_err(se(path, "begin initial transaction"))?;
    {
        txn.open_table(RECORDS).map_err(se(path, "create records table"))?;
        txn.open_table(NODES).map_err(se(path, "create merkle table"))?;
        txn.open_table(HEADS).map_err(se(path, "create chain heads table"))?;
        txn.open_table(CHAIN_INDEX).map_err(se(path, "create chain index table"))?;
        txn.open_table(STATE).map_err(se(path, "create state table"))?;
        txn.open_table(CHECKPOINTS).map_err(se(path, "create checkpoints table"))?;
        let mut meta = txn.open_table(META).map_err(se(path, "create meta table"))?;
        let format = meta.get(META_FORMAT).map_err(se(path, "read format"))?.map(|g| g.value());
        match format {
            None => {
                meta.insert(META_FORMAT, FORMAT_VERSION).map_err(se(path, "write format"))?;
                if meta.get(META_SIZE).map_err(se(path, "read size"))?.is_none() {
                    meta.insert(META_SIZE, 0).map_err(se(path, "write size"))?;
                }
            }
            Some(FORMAT_VERSION) => {}
            Some(other) => {
                return Err(LedgerError::Incoherent {
                    path: path.to_path_buf(),
                    reason: format!(
                        "store format version {other} is not supported (this build reads version {FORMAT_VERSION})"
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
    txn.commit().map_err(se(path, "commit initial transaction"))?;
    Ok(())
}

pub(super) fn merkle_storage(path: &Path, e: MerkleError) -> StorageError {
    match e {
        MerkleError::Storage(inner) => match inner.downcast::<redb::StorageError>() {
            Ok(s) => storage(path, "merkle nodes")((*s).into()),
            Err(other) => StorageError {
                path: path.to_path_buf(),
                context: "merkle nodes",
                source: Arc::new(redb::Error::Io(std::io::Error::other(other.to_string()))),
            },
        },
        other => StorageError {
            path: path.to_path_buf(),
            context: "merkle nodes",
            source: Arc::new(redb::Error::Io(std::io::Error::other(other.to_string()))),
        },
    }
}
