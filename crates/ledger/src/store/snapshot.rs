//! Read-only views of the committed store ([`Snapshot`]): one redb read transaction (its size,
//! chain tails, state and checkpoint notes) and, up to that size, the records (segment files),
//! chain indices (walked back through the links file) and Merkle roots and proofs (hash tiles).
//!
//! Must not: write, or make anything visible (the handle waits for the indexer to publish every
//! answered group before it opens a snapshot).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadTransaction, ReadableTable};

use super::*;
use crate::merkle::{self, Hash, MerkleError, NodeSource};
use crate::record::ChainHead;

/// A consistent read view (one redb read transaction).
pub struct Snapshot {
    pub(super) txn: ReadTransaction,
    path: PathBuf,
    pub(super) size: u64,
    files: Arc<LogFiles>,
}

/// Node source over the hash tiles, limited to a snapshot's size.
pub struct SnapshotNodes {
    files: Arc<LogFiles>,
    size: u64,
}

impl NodeSource for SnapshotNodes {
    fn get(&self, level: u8, index: u64) -> Result<Option<Hash>, MerkleError> {
        self.files.tiles.node(level, index, self.size).map_err(|e| MerkleError::Storage(Box::new(e)))
    }
}

impl Snapshot {
    pub(super) fn new(db: &Database, path: &Path, files: &Arc<LogFiles>) -> Result<Snapshot, LedgerError> {
        let txn = db.begin_read().map_err(se(path, "begin read"))?;
        let meta = txn.open_table(META).map_err(se(path, "open meta"))?;
        let size = meta.get(META_SIZE).map_err(se(path, "read size"))?.map(|g| g.value()).unwrap_or(0);
        drop(meta);
        Ok(Snapshot { txn, path: path.to_path_buf(), size, files: files.clone() })
    }

    /// Records in this snapshot.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub(super) fn nodes(&self) -> Result<SnapshotNodes, LedgerError> {
        Ok(SnapshotNodes { files: self.files.clone(), size: self.size })
    }

    pub fn record(&self, index: u64) -> Result<Option<Vec<u8>>, LedgerError> {
        if index >= self.size {
            return Ok(None);
        }
        Ok(Some(self.files.segments.read(index)?))
    }

    /// Calls `f` with every record in `[from, to)` in order.
    pub fn for_each_record(
        &self,
        from: u64,
        to: u64,
        f: impl FnMut(u64, &[u8]) -> Result<(), LedgerError>,
    ) -> Result<(), LedgerError> {
        let to = to.min(self.size);
        if from >= to {
            return Ok(());
        }
        self.files.segments.for_each(from, to, f)
    }

    /// Log indices of the records of `chain`, in order.
    pub fn chain_indices(&self, chain: &str) -> Result<Vec<u64>, LedgerError> {
        let t = self.txn.open_table(TAILS).map_err(se(&self.path, "open chain tails"))?;
        let Some((seq, _, last)) = t.get(chain).map_err(se(&self.path, "read chain tail"))?.map(|g| g.value()) else {
            return Ok(Vec::new());
        };
        if last >= self.size {
            return Err(LedgerError::Incoherent {
                path: self.path.clone(),
                reason: format!("chain {chain:?} ends at record {last}, beyond the log's {} records", self.size),
            });
        }
        Ok(self.files.links.walk(last, seq.saturating_add(1))?)
    }

    /// The last record of `chain`.
    pub fn chain_head(&self, chain: &str) -> Result<Option<ChainHead>, LedgerError> {
        let t = self.txn.open_table(TAILS).map_err(se(&self.path, "open chain tails"))?;
        Ok(t.get(chain).map_err(se(&self.path, "read chain tail"))?.map(|g| {
            let (seq, hash, _) = g.value();
            ChainHead { seq, hash }
        }))
    }

    pub fn root(&self, size: u64) -> Result<Hash, LedgerError> {
        if size > self.size {
            return Err(LedgerError::OutOfRange(format!("tree size {size} is beyond the log size {}", self.size)));
        }
        Ok(merkle::root(&self.nodes()?, size)?)
    }

    pub fn inclusion_proof(&self, index: u64, tree_size: u64) -> Result<Vec<Hash>, LedgerError> {
        if tree_size > self.size || index >= tree_size {
            return Err(LedgerError::OutOfRange(format!(
                "no inclusion proof for index {index} in a tree of {tree_size} (log size {})",
                self.size
            )));
        }
        Ok(merkle::inclusion_proof(&self.nodes()?, index, tree_size)?)
    }

    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, LedgerError> {
        if new > self.size || old > new {
            return Err(LedgerError::OutOfRange(format!(
                "no consistency proof from size {old} to {new} (log size {})",
                self.size
            )));
        }
        Ok(merkle::consistency_proof(&self.nodes()?, old, new)?)
    }

    pub fn state_get(&self, key: &str) -> Result<Option<Vec<u8>>, LedgerError> {
        let t = self.txn.open_table(STATE).map_err(se(&self.path, "open state"))?;
        t.view_get(key).map_err(|e| se(&self.path, "read state")(e).into())
    }

    pub fn state_scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, LedgerError> {
        let t = self.txn.open_table(STATE).map_err(se(&self.path, "open state"))?;
        let mut out = BTreeMap::new();
        t.view_scan(prefix, &mut out).map_err(se(&self.path, "scan state"))?;
        Ok(out.into_iter().collect())
    }

    pub(super) fn latest_checkpoint_note(&self) -> Result<Option<String>, LedgerError> {
        let t = self.txn.open_table(CHECKPOINTS).map_err(se(&self.path, "open checkpoints"))?;
        let last = t.last().map_err(se(&self.path, "read checkpoint"))?.map(|(_, v)| v.value().to_string());
        Ok(last)
    }

    /// The stored signed checkpoint for exactly `size` records, if one was signed.
    pub fn checkpoint_at(&self, size: u64) -> Result<Option<String>, LedgerError> {
        let t = self.txn.open_table(CHECKPOINTS).map_err(se(&self.path, "open checkpoints"))?;
        Ok(t.get(size).map_err(se(&self.path, "read checkpoint"))?.map(|v| v.value().to_string()))
    }
}
