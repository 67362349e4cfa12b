//! The redb store: one writer thread, group commit, durable before answered.
//!
//! Every write goes through a single writer thread. It takes every queued job (up to
//! [`LedgerOptions::max_group`]) into one redb write transaction, runs the transactions' closures
//! one after the other (each sees what earlier ones of the group wrote), appends their records
//! and Merkle nodes, signs a checkpoint if one is due or asked for, commits once with
//! `Durability::Immediate`, and only then answers every caller. If the commit fails, every
//! transaction of the group gets the error and nothing of the group is visible.
//!
//! A transaction's closure runs against an overlay: its `put`s and `delete`s are applied to the
//! state table only if the closure returns `Ok` and every draft it returned can be sealed. So a
//! closure that fails (or panics) leaves no trace, and the rest of the group goes on.
//!
//! Tables: `records` (log index → canonical record), `merkle_nodes` (packed (level, index) →
//! perfect-subtree hash), `chain_heads` (chain → (seq, leaf hash) of its last record),
//! `chain_index` ((chain, seq) → log index), `state` (key → opaque bytes owned by other modules),
//! `checkpoints` (tree size → signed note), `meta` (`size`, `format`).

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ed25519_dalek::VerifyingKey;
use redb::{Database, Durability, ReadTransaction, ReadableTable, ReadableTableMetadata, Table, TableDefinition};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::checkpoint::{self, Checkpoint, SignedCheckpoint};
use super::hostkey::HostKey;
use super::merkle::{self, Hash, MerkleError, NodeSource, NodeStore};
use super::record::{self, Appended, ChainHead, Draft, DraftError};

const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
const NODES: TableDefinition<u64, [u8; 32]> = TableDefinition::new("merkle_nodes");
const HEADS: TableDefinition<&str, (u64, [u8; 32])> = TableDefinition::new("chain_heads");
const CHAIN_INDEX: TableDefinition<(&str, u64), u64> = TableDefinition::new("chain_index");
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
const CHECKPOINTS: TableDefinition<u64, &str> = TableDefinition::new("checkpoints");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const META_SIZE: &str = "size";
const META_FORMAT: &str = "format";
const FORMAT_VERSION: u64 = 1;

/// Bound on a state key.
pub const MAX_STATE_KEY_BYTES: usize = 512;
/// Bound on a state value.
pub const MAX_STATE_VALUE_BYTES: usize = 1024 * 1024;
/// Bound on drafts returned by one transaction.
pub const MAX_DRAFTS_PER_TXN: usize = 256;
/// Bound on state writes by one transaction.
pub const MAX_WRITES_PER_TXN: usize = 4096;

/// Tuning of the writer.
#[derive(Debug, Clone)]
pub struct LedgerOptions {
    /// Most transactions committed together.
    pub max_group: usize,
    /// Most transactions waiting for the writer; `transact` waits for room beyond that.
    pub max_queued: usize,
    /// A checkpoint is signed at least this often while the log grows.
    pub checkpoint_interval: Duration,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        Self { max_group: 1024, max_queued: 16 * 1024, checkpoint_interval: Duration::from_secs(1) }
    }
}

/// A redb failure, shareable between all transactions of a failed group.
#[derive(Debug, Clone, thiserror::Error)]
#[error("ledger store {path}: {context}: {source}", path = .path.display())]
pub struct StorageError {
    pub path: PathBuf,
    pub context: &'static str,
    #[source]
    pub source: Arc<redb::Error>,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("ledger store {path} is incoherent: {reason}; refusing to start. Restore the store from backup, or move it aside to start a new log (auditors must then be told)", path = .path.display())]
    Incoherent { path: PathBuf, reason: String },
    #[error("ledger store {path} is already open in another process (is another sluice daemon running?)", path = .path.display())]
    AlreadyOpen { path: PathBuf },
    #[error("the ledger is shut down")]
    Closed,
    #[error("cannot start the ledger writer thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the transaction closure panicked; nothing of it was written")]
    Panicked,
    #[error(transparent)]
    Txn(TxnError),
    #[error(transparent)]
    Draft(#[from] DraftError),
    #[error("{0}")]
    OutOfRange(String),
    #[error("ledger store: {0}")]
    Merkle(#[from] MerkleError),
}

/// What a transaction closure may fail with. Nothing it wrote is kept.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    #[error("state key {key:?} is invalid: {reason}")]
    BadKey { key: String, reason: &'static str },
    #[error("state value for {key:?} is {size} bytes, above the {MAX_STATE_VALUE_BYTES}-byte limit")]
    ValueTooLarge { key: String, size: usize },
    #[error("transaction writes more than {MAX_WRITES_PER_TXN} state keys")]
    TooManyWrites,
    #[error("state read failed: {0}")]
    Storage(#[source] Arc<redb::Error>),
    /// The caller's own reason to abort.
    #[error(transparent)]
    Abort(Box<dyn std::error::Error + Send + Sync>),
}

impl TxnError {
    /// Wraps a caller's error to abort the transaction.
    pub fn abort(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        TxnError::Abort(e.into())
    }
}

fn storage<'a>(path: &'a Path, context: &'static str) -> impl Fn(redb::Error) -> StorageError + 'a {
    move |e| StorageError { path: path.to_path_buf(), context, source: Arc::new(e) }
}

fn se<'a, E: Into<redb::Error>>(path: &'a Path, context: &'static str) -> impl Fn(E) -> StorageError + 'a {
    move |e| storage(path, context)(e.into())
}

// ---------------------------------------------------------------------------------------------
// State access for transactions

/// Read access to the state table, whichever transaction it lives in.
trait StateView {
    fn view_get(&self, key: &str) -> Result<Option<Vec<u8>>, redb::StorageError>;
    fn view_scan(&self, prefix: &str, out: &mut BTreeMap<String, Vec<u8>>) -> Result<(), redb::StorageError>;
}

impl<T: ReadableTable<&'static str, &'static [u8]>> StateView for T {
    fn view_get(&self, key: &str) -> Result<Option<Vec<u8>>, redb::StorageError> {
        Ok(self.get(key)?.map(|v| v.value().to_vec()))
    }

    fn view_scan(&self, prefix: &str, out: &mut BTreeMap<String, Vec<u8>>) -> Result<(), redb::StorageError> {
        for entry in self.range::<&str>(prefix..)? {
            let (k, v) = entry?;
            let k = k.value();
            if !k.starts_with(prefix) {
                break;
            }
            out.insert(k.to_string(), v.value().to_vec());
        }
        Ok(())
    }
}

/// A transaction's view of the state: committed state plus the earlier transactions of the same
/// group, plus its own uncommitted writes.
pub struct Txn<'a> {
    state: &'a dyn StateView,
    overlay: BTreeMap<String, Option<Vec<u8>>>,
    next_index: u64,
}

impl Txn<'_> {
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, TxnError> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        self.state.view_get(key).map_err(|e| TxnError::Storage(Arc::new(e.into())))
    }

    pub fn put(&mut self, key: &str, val: &[u8]) -> Result<(), TxnError> {
        check_key(key)?;
        if val.len() > MAX_STATE_VALUE_BYTES {
            return Err(TxnError::ValueTooLarge { key: key.to_string(), size: val.len() });
        }
        self.note_write(key)?;
        self.overlay.insert(key.to_string(), Some(val.to_vec()));
        Ok(())
    }

    pub fn delete(&mut self, key: &str) -> Result<(), TxnError> {
        check_key(key)?;
        self.note_write(key)?;
        self.overlay.insert(key.to_string(), None);
        Ok(())
    }

    /// All entries whose key starts with `prefix`, sorted by key.
    pub fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, TxnError> {
        let mut out = BTreeMap::new();
        self.state.view_scan(prefix, &mut out).map_err(|e| TxnError::Storage(Arc::new(e.into())))?;
        for (k, v) in self.overlay.range(prefix.to_string()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(v) => out.insert(k.clone(), v.clone()),
                None => out.remove(k),
            };
        }
        Ok(out.into_iter().collect())
    }

    /// The log index the first draft returned by this transaction will get (the next ones get
    /// the following indices).
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    fn note_write(&self, key: &str) -> Result<(), TxnError> {
        if self.overlay.len() >= MAX_WRITES_PER_TXN && !self.overlay.contains_key(key) {
            return Err(TxnError::TooManyWrites);
        }
        Ok(())
    }
}

fn check_key(key: &str) -> Result<(), TxnError> {
    let bad = |reason| TxnError::BadKey { key: key.chars().take(64).collect(), reason };
    if key.is_empty() {
        return Err(bad("empty"));
    }
    if key.len() > MAX_STATE_KEY_BYTES {
        return Err(bad("longer than 512 bytes"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Merkle nodes over redb

struct NodesRead<'a, T>(&'a T);

impl<T: ReadableTable<u64, [u8; 32]>> NodeSource for NodesRead<'_, T> {
    fn get(&self, level: u8, index: u64) -> Result<Option<Hash>, MerkleError> {
        self.0
            .get(merkle::node_key(level, index))
            .map(|v| v.map(|g| g.value()))
            .map_err(|e| MerkleError::Storage(Box::new(e)))
    }
}

struct NodesWrite<'a, 't>(&'a mut Table<'t, u64, [u8; 32]>);

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

// ---------------------------------------------------------------------------------------------
// Jobs for the writer

type TransactReply<T> = oneshot::Sender<Result<(T, Vec<Appended>), LedgerError>>;

trait Work: Send {
    /// Runs the closure. `None`: the caller has been answered (closure error or panic).
    fn run(self: Box<Self>, txn: &mut Txn<'_>) -> Option<(Vec<Draft>, Box<dyn Finish>)>;
    /// The job will not run (the group failed before reaching it).
    fn fail(self: Box<Self>, err: LedgerError);
}

trait Finish: Send {
    fn finish(self: Box<Self>, result: Result<Vec<Appended>, LedgerError>);
}

struct TransactWork<F, T> {
    f: F,
    reply: TransactReply<T>,
    permit: Option<OwnedSemaphorePermit>,
}

struct TransactFinish<T> {
    value: T,
    reply: TransactReply<T>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<F, T> Work for TransactWork<F, T>
where
    F: FnOnce(&mut Txn<'_>) -> Result<(T, Vec<Draft>), TxnError> + Send + 'static,
    T: Send + 'static,
{
    fn run(self: Box<Self>, txn: &mut Txn<'_>) -> Option<(Vec<Draft>, Box<dyn Finish>)> {
        let TransactWork { f, reply, permit } = *self;
        match catch_unwind(AssertUnwindSafe(|| f(txn))) {
            Ok(Ok((value, drafts))) => Some((drafts, Box::new(TransactFinish { value, reply, _permit: permit }))),
            Ok(Err(e)) => {
                let _ = reply.send(Err(LedgerError::Txn(e)));
                None
            }
            Err(_) => {
                tracing::error!("ledger transaction closure panicked; its writes were discarded");
                let _ = reply.send(Err(LedgerError::Panicked));
                None
            }
        }
    }

    fn fail(self: Box<Self>, err: LedgerError) {
        let _ = self.reply.send(Err(err));
    }
}

impl<T: Send + 'static> Finish for TransactFinish<T> {
    fn finish(self: Box<Self>, result: Result<Vec<Appended>, LedgerError>) {
        let TransactFinish { value, reply, .. } = *self;
        let _ = reply.send(result.map(|a| (value, a)));
    }
}

enum Job {
    Transact(Box<dyn Work>),
    Checkpoint(oneshot::Sender<Result<SignedCheckpoint, LedgerError>>),
    Shutdown,
}

// ---------------------------------------------------------------------------------------------
// The ledger handle

struct Shared {
    size: AtomicU64,
    latest: RwLock<Option<SignedCheckpoint>>,
}

struct Inner {
    path: PathBuf,
    db: Arc<Database>,
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
    writer: Mutex<Option<JoinHandle<()>>>,
    permits: Arc<Semaphore>,
    public: VerifyingKey,
    origin: String,
}

impl Inner {
    fn stop(&self) {
        let handle = match self.writer.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        let Some(handle) = handle else { return };
        let _ = self.jobs.send(Job::Shutdown);
        self.permits.close();
        // A closure holding the last clone could drop it on the writer thread itself.
        if handle.thread().id() != std::thread::current().id() {
            let _ = handle.join();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The attestation log and state store. Cheap to clone; the last clone's drop shuts it down.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.inner.path)
            .field("origin", &self.inner.origin)
            .field("size", &self.size())
            .finish()
    }
}

impl Ledger {
    /// Opens (or creates) the store at `path`, checks it is coherent, and starts the writer.
    pub fn open(path: &Path, host_key: HostKey, opts: LedgerOptions) -> Result<Ledger, LedgerError> {
        let db = match Database::create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(LedgerError::AlreadyOpen { path: path.to_path_buf() })
            }
            Err(e) => return Err(se(path, "open database")(e).into()),
        };
        let db = Arc::new(db);
        init_tables(&db, path)?;
        let public = host_key.verifying_key();
        let (size, latest) = check_coherent(&db, path, &public)?;
        let shared = Arc::new(Shared { size: AtomicU64::new(size), latest: RwLock::new(latest.clone()) });
        let (tx, rx) = mpsc::channel();
        let origin = host_key.origin().to_string();
        let writer = Writer {
            path: path.to_path_buf(),
            db: db.clone(),
            key: host_key,
            shared: shared.clone(),
            rx,
            max_group: opts.max_group.max(1),
            interval: opts.checkpoint_interval,
            size,
            last_checkpoint: latest.as_ref().map(|c| (c.checkpoint.size, Instant::now())),
        };
        let handle = std::thread::Builder::new()
            .name("sluice-ledger".into())
            .spawn(move || writer.run())
            .map_err(LedgerError::Spawn)?;
        Ok(Ledger {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                db,
                shared,
                jobs: tx,
                writer: Mutex::new(Some(handle)),
                permits: Arc::new(Semaphore::new(opts.max_queued.max(1))),
                public,
                origin,
            }),
        })
    }

    /// Runs `f` on the single writer inside the current group's write transaction; appends the
    /// drafts it returns; resolves once the group's commit is durable.
    ///
    /// `f` sees the state committed before plus what earlier transactions of the same group
    /// wrote. Its `put`/`delete` are kept only if it returns `Ok` and all its drafts are valid;
    /// otherwise the caller gets the error and nothing of `f` is written. `f` runs on the writer
    /// thread, serially with every other transaction: keep it short and never block in it.
    pub async fn transact<T, F>(&self, f: F) -> Result<(T, Vec<Appended>), LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Txn<'_>) -> Result<(T, Vec<Draft>), TxnError> + Send + 'static,
    {
        let permit = self.inner.permits.clone().acquire_owned().await.map_err(|_| LedgerError::Closed)?;
        let (reply, rx) = oneshot::channel();
        self.submit(Box::new(TransactWork { f, reply, permit: Some(permit) }))?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }

    /// [`Ledger::transact`] for synchronous callers (CLI, tests). Must not be called from an
    /// async task (it blocks the thread until the commit).
    pub fn transact_blocking<T, F>(&self, f: F) -> Result<(T, Vec<Appended>), LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Txn<'_>) -> Result<(T, Vec<Draft>), TxnError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        self.submit(Box::new(TransactWork { f, reply, permit: None }))?;
        rx.blocking_recv().map_err(|_| LedgerError::Closed)?
    }

    fn submit(&self, work: Box<dyn Work>) -> Result<(), LedgerError> {
        self.inner.jobs.send(Job::Transact(work)).map_err(|_| LedgerError::Closed)
    }

    pub fn state_get(&self, key: &str) -> Result<Option<Vec<u8>>, LedgerError> {
        self.snapshot()?.state_get(key)
    }

    pub fn state_scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, LedgerError> {
        self.snapshot()?.state_scan(prefix)
    }

    /// Number of committed records.
    pub fn size(&self) -> u64 {
        self.inner.shared.size.load(Ordering::Acquire)
    }

    /// The canonical bytes of record `index`, if committed.
    pub fn record(&self, index: u64) -> Result<Option<Vec<u8>>, LedgerError> {
        self.snapshot()?.record(index)
    }

    pub fn inclusion_proof(&self, index: u64, tree_size: u64) -> Result<Vec<Hash>, LedgerError> {
        self.snapshot()?.inclusion_proof(index, tree_size)
    }

    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, LedgerError> {
        self.snapshot()?.consistency_proof(old, new)
    }

    /// A checkpoint of everything committed before this call (signs a new one unless the
    /// latest already covers the current size).
    pub async fn checkpoint_now(&self) -> Result<SignedCheckpoint, LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.inner.jobs.send(Job::Checkpoint(tx)).map_err(|_| LedgerError::Closed)?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }

    /// The most recent signed checkpoint.
    pub fn latest_checkpoint(&self) -> Result<Option<SignedCheckpoint>, LedgerError> {
        Ok(match self.inner.shared.latest.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        })
    }

    pub fn host_public_key(&self) -> VerifyingKey {
        self.inner.public
    }

    /// The log's checkpoint origin.
    pub fn origin(&self) -> &str {
        &self.inner.origin
    }

    /// A consistent read-only view of the committed store.
    pub fn snapshot(&self) -> Result<Snapshot, LedgerError> {
        Snapshot::new(&self.inner.db, &self.inner.path)
    }

    /// Finishes queued work, signs a final checkpoint, and stops the writer. Later writes fail
    /// with [`LedgerError::Closed`]; reads keep working until the last clone is dropped.
    pub fn shutdown(&self) {
        self.inner.stop();
    }
}

fn init_tables(db: &Database, path: &Path) -> Result<(), LedgerError> {
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
    txn.commit().map_err(se(path, "commit initial transaction"))?;
    Ok(())
}

/// Checks that the stored tree hangs together: the size matches the records, the last leaf is
/// the hash of the last record, every node needed for the root exists, and the latest checkpoint
/// verifies with this host key and matches the root the nodes give at its size.
///
/// This is O(log n), not a full rehash (that is what `audit verify` on a full export does).
fn check_coherent(
    db: &Database,
    path: &Path,
    public: &VerifyingKey,
) -> Result<(u64, Option<SignedCheckpoint>), LedgerError> {
    let bad = |reason: String| LedgerError::Incoherent { path: path.to_path_buf(), reason };
    let snap = Snapshot::new(db, path)?;
    let size = snap.size;
    let records = snap.txn.open_table(RECORDS).map_err(se(path, "open records"))?;
    let count = records.len().map_err(se(path, "count records"))?;
    if count != size {
        return Err(bad(format!("meta size is {size} but the records table holds {count} records")));
    }
    if size > 0 {
        let last = records.last().map_err(se(path, "read last record"))?.map(|(k, v)| (k.value(), v.value().to_vec()));
        let Some((last_index, last_bytes)) = last else {
            return Err(bad("records table is empty but size is not 0".into()));
        };
        if last_index != size - 1 {
            return Err(bad(format!("last record has index {last_index}, expected {}", size - 1)));
        }
        let nodes = snap.txn.open_table(NODES).map_err(se(path, "open merkle"))?;
        let leaf = NodesRead(&nodes).get(0, size - 1)?;
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
            let root = merkle::root(&snap.nodes()?, cp.size)?;
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

// ---------------------------------------------------------------------------------------------
// Read-only snapshot

/// A consistent read view (one redb read transaction).
pub struct Snapshot {
    txn: ReadTransaction,
    path: PathBuf,
    size: u64,
}

/// Node source over a snapshot's merkle table.
pub struct SnapshotNodes {
    table: redb::ReadOnlyTable<u64, [u8; 32]>,
}

impl NodeSource for SnapshotNodes {
    fn get(&self, level: u8, index: u64) -> Result<Option<Hash>, MerkleError> {
        NodesRead(&self.table).get(level, index)
    }
}

impl Snapshot {
    fn new(db: &Database, path: &Path) -> Result<Snapshot, LedgerError> {
        let txn = db.begin_read().map_err(se(path, "begin read"))?;
        let meta = txn.open_table(META).map_err(se(path, "open meta"))?;
        let size = meta.get(META_SIZE).map_err(se(path, "read size"))?.map(|g| g.value()).unwrap_or(0);
        drop(meta);
        Ok(Snapshot { txn, path: path.to_path_buf(), size })
    }

    /// Records in this snapshot.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn nodes(&self) -> Result<SnapshotNodes, LedgerError> {
        Ok(SnapshotNodes { table: self.txn.open_table(NODES).map_err(se(&self.path, "open merkle"))? })
    }

    pub fn record(&self, index: u64) -> Result<Option<Vec<u8>>, LedgerError> {
        if index >= self.size {
            return Ok(None);
        }
        let t = self.txn.open_table(RECORDS).map_err(se(&self.path, "open records"))?;
        Ok(t.get(index).map_err(se(&self.path, "read record"))?.map(|g| g.value().to_vec()))
    }

    /// Calls `f` with every record in `[from, to)` in order.
    pub fn for_each_record(
        &self,
        from: u64,
        to: u64,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), LedgerError>,
    ) -> Result<(), LedgerError> {
        let to = to.min(self.size);
        if from >= to {
            return Ok(());
        }
        let t = self.txn.open_table(RECORDS).map_err(se(&self.path, "open records"))?;
        for entry in t.range(from..to).map_err(se(&self.path, "scan records"))? {
            let (k, v) = entry.map_err(se(&self.path, "scan records"))?;
            f(k.value(), v.value())?;
        }
        Ok(())
    }

    /// Log indices of the records of `chain`, in order.
    pub fn chain_indices(&self, chain: &str) -> Result<Vec<u64>, LedgerError> {
        let t = self.txn.open_table(CHAIN_INDEX).map_err(se(&self.path, "open chain index"))?;
        let mut out = Vec::new();
        for entry in t.range((chain, 0u64)..=(chain, u64::MAX)).map_err(se(&self.path, "scan chain index"))? {
            let (_, v) = entry.map_err(se(&self.path, "scan chain index"))?;
            let index = v.value();
            if index < self.size {
                out.push(index);
            }
        }
        Ok(out)
    }

    /// The last record of `chain`.
    pub fn chain_head(&self, chain: &str) -> Result<Option<ChainHead>, LedgerError> {
        let t = self.txn.open_table(HEADS).map_err(se(&self.path, "open chain heads"))?;
        Ok(t.get(chain).map_err(se(&self.path, "read chain head"))?.map(|g| {
            let (seq, hash) = g.value();
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

    fn latest_checkpoint_note(&self) -> Result<Option<String>, LedgerError> {
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

// ---------------------------------------------------------------------------------------------
// The writer thread

struct Writer {
    path: PathBuf,
    db: Arc<Database>,
    key: HostKey,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Job>,
    max_group: usize,
    interval: Duration,
    /// Committed size.
    size: u64,
    /// Size and signing time of the latest checkpoint.
    last_checkpoint: Option<(u64, Instant)>,
}

/// The outcome of one group, before commit.
#[derive(Default)]
struct Group {
    /// Callers to answer after commit, with their records.
    done: Vec<(Box<dyn Finish>, Vec<Appended>)>,
    checkpoint_waiters: Vec<oneshot::Sender<Result<SignedCheckpoint, LedgerError>>>,
    shutdown: bool,
}

impl Writer {
    fn run(mut self) {
        loop {
            let first = match self.checkpoint_wait() {
                Some(wait) => match self.rx.recv_timeout(wait) {
                    Ok(job) => Some(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                },
                None => match self.rx.recv() {
                    Ok(job) => Some(job),
                    Err(_) => break,
                },
            };
            let mut jobs: Vec<Job> = first.into_iter().collect();
            while jobs.len() < self.max_group {
                match self.rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            if self.group(jobs) {
                break;
            }
        }
        // Cover the tail of the log with a final checkpoint.
        if self.size > 0 && self.last_checkpoint.map(|(s, _)| s) != Some(self.size) {
            let (tx, _rx) = oneshot::channel();
            self.group(vec![Job::Checkpoint(tx)]);
        }
    }

    /// How long until a checkpoint is due, if the log grew since the last one.
    fn checkpoint_wait(&self) -> Option<Duration> {
        match self.last_checkpoint {
            Some((size, _)) if size == self.size => None,
            Some((_, at)) => Some((at + self.interval).saturating_duration_since(Instant::now())),
            None if self.size == 0 => None,
            None => Some(Duration::ZERO),
        }
    }

    fn checkpoint_due(&self, size: u64) -> bool {
        match self.last_checkpoint {
            Some((s, _)) if s == size => false,
            Some((_, at)) => at.elapsed() >= self.interval,
            None => size > 0,
        }
    }

    /// Runs one group. Returns true if the writer must stop.
    fn group(&mut self, jobs: Vec<Job>) -> bool {
        let mut works: Vec<Box<dyn Work>> = Vec::with_capacity(jobs.len());
        let mut g = Group::default();
        for job in jobs {
            match job {
                Job::Transact(w) => works.push(w),
                Job::Checkpoint(tx) => g.checkpoint_waiters.push(tx),
                Job::Shutdown => g.shutdown = true,
            }
        }
        if works.is_empty() && g.checkpoint_waiters.is_empty() && !self.checkpoint_due(self.size) {
            return g.shutdown;
        }
        let mut pending = works.into_iter();
        let result = self.write_group(&mut pending, &mut g);
        match result {
            Ok((size, new_cp)) => {
                self.size = size;
                self.shared.size.store(size, Ordering::Release);
                if let Some(cp) = &new_cp {
                    self.last_checkpoint = Some((cp.checkpoint.size, Instant::now()));
                    match self.shared.latest.write() {
                        Ok(mut l) => *l = Some(cp.clone()),
                        Err(p) => *p.into_inner() = Some(cp.clone()),
                    }
                }
                for (finish, appended) in g.done {
                    finish.finish(Ok(appended));
                }
                let latest = match self.shared.latest.read() {
                    Ok(l) => l.clone(),
                    Err(p) => p.into_inner().clone(),
                };
                for w in g.checkpoint_waiters {
                    let _ = w.send(latest.clone().ok_or(LedgerError::Closed));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "ledger group commit failed; every transaction of the group is refused");
                for (finish, _) in g.done {
                    finish.finish(Err(err.clone().into()));
                }
                for work in pending {
                    work.fail(err.clone().into());
                }
                for w in g.checkpoint_waiters {
                    let _ = w.send(Err(err.clone().into()));
                }
            }
        }
        g.shutdown
    }

    /// Writes and commits one group. On error nothing is committed; jobs not yet run stay in
    /// `pending`, and `g.done` holds the ones that ran and must now be failed.
    fn write_group(
        &mut self,
        pending: &mut std::vec::IntoIter<Box<dyn Work>>,
        g: &mut Group,
    ) -> Result<(u64, Option<SignedCheckpoint>), StorageError> {
        let path = self.path.clone();
        let path = path.as_path();
        let mut wtxn = self.db.begin_write().map_err(se(path, "begin write"))?;
        wtxn.set_durability(Durability::Immediate);
        let mut size = self.size;
        let new_cp;
        {
            let mut records = wtxn.open_table(RECORDS).map_err(se(path, "open records"))?;
            let mut nodes = wtxn.open_table(NODES).map_err(se(path, "open merkle"))?;
            let mut heads = wtxn.open_table(HEADS).map_err(se(path, "open chain heads"))?;
            let mut chain_index = wtxn.open_table(CHAIN_INDEX).map_err(se(path, "open chain index"))?;
            let mut state = wtxn.open_table(STATE).map_err(se(path, "open state"))?;
            let mut checkpoints = wtxn.open_table(CHECKPOINTS).map_err(se(path, "open checkpoints"))?;
            let mut meta = wtxn.open_table(META).map_err(se(path, "open meta"))?;

            for work in pending.by_ref() {
                let mut txn = Txn { state: &state, overlay: BTreeMap::new(), next_index: size };
                let ran = work.run(&mut txn);
                let overlay = std::mem::take(&mut txn.overlay);
                let Some((drafts, finish)) = ran else {
                    continue;
                };

                // Seal every draft before writing anything, so a bad draft leaves no trace.
                let sealed = match seal_all(&heads, drafts, size, path) {
                    Ok(s) => s,
                    Err(SealError::Draft(e)) => {
                        finish.finish(Err(e.into()));
                        continue;
                    }
                    Err(SealError::Storage(e)) => {
                        g.done.push((finish, Vec::new()));
                        return Err(e);
                    }
                };
                let write = (|| -> Result<(), StorageError> {
                    for (k, v) in &overlay {
                        match v {
                            Some(v) => {
                                state.insert(k.as_str(), v.as_slice()).map_err(se(path, "write state"))?;
                            }
                            None => {
                                state.remove(k.as_str()).map_err(se(path, "delete state"))?;
                            }
                        }
                    }
                    for (chain, appended) in &sealed {
                        records
                            .insert(appended.index, appended.canonical.as_slice())
                            .map_err(se(path, "write record"))?;
                        merkle::append(&mut NodesWrite(&mut nodes), appended.index, appended.leaf_hash)
                            .map_err(|e| merkle_storage(path, e))?;
                        heads
                            .insert(chain.as_str(), (appended.seq, appended.leaf_hash))
                            .map_err(se(path, "write chain head"))?;
                        chain_index
                            .insert((chain.as_str(), appended.seq), appended.index)
                            .map_err(se(path, "write chain index"))?;
                    }
                    Ok(())
                })();
                size += sealed.len() as u64;
                g.done.push((finish, sealed.into_iter().map(|(_, a)| a).collect()));
                write?;
            }

            let wanted = !g.checkpoint_waiters.is_empty() || self.checkpoint_due(size);
            let already = self.last_checkpoint.map(|(s, _)| s) == Some(size);
            new_cp = if wanted && !already {
                let root = merkle::root(&NodesWrite(&mut nodes), size).map_err(|e| merkle_storage(path, e))?;
                let signed =
                    checkpoint::sign(Checkpoint { origin: self.key.origin().to_string(), size, root }, &self.key);
                checkpoints.insert(size, signed.note.as_str()).map_err(se(path, "write checkpoint"))?;
                Some(signed)
            } else {
                None
            };
            meta.insert(META_SIZE, size).map_err(se(path, "write size"))?;
        }
        wtxn.commit().map_err(se(path, "commit"))?;
        Ok((size, new_cp))
    }
}

fn merkle_storage(path: &Path, e: MerkleError) -> StorageError {
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

enum SealError {
    Draft(DraftError),
    Storage(StorageError),
}

fn seal_all(
    heads: &Table<'_, &'static str, (u64, [u8; 32])>,
    drafts: Vec<Draft>,
    start: u64,
    path: &Path,
) -> Result<Vec<(String, Appended)>, SealError> {
    if drafts.len() > MAX_DRAFTS_PER_TXN {
        return Err(SealError::Draft(DraftError::TooManyDrafts { count: drafts.len(), max: MAX_DRAFTS_PER_TXN }));
    }
    if start.saturating_add(drafts.len() as u64) >= merkle::MAX_TREE_SIZE - 1 {
        return Err(SealError::Draft(DraftError::TooManyDrafts { count: drafts.len(), max: 0 }));
    }
    let now = record::now_rfc3339();
    let mut local: HashMap<String, ChainHead> = HashMap::new();
    let mut out = Vec::with_capacity(drafts.len());
    for (i, draft) in drafts.into_iter().enumerate() {
        record::check_chain(&draft.chain).map_err(SealError::Draft)?;
        let head = match local.get(&draft.chain) {
            Some(h) => Some(*h),
            None => heads
                .get(draft.chain.as_str())
                .map_err(|e| SealError::Storage(se(path, "read chain head")(e)))?
                .map(|g| {
                    let (seq, hash) = g.value();
                    ChainHead { seq, hash }
                }),
        };
        let chain = draft.chain.clone();
        let (appended, new_head) = record::seal(draft, start + i as u64, head, &now).map_err(SealError::Draft)?;
        local.insert(chain.clone(), new_head);
        out.push((chain, appended));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn key() -> HostKey {
        HostKey::from_signing_key(SigningKey::from_bytes(&[3u8; 32]))
    }

    /// Builds a store of 5 records with a checkpoint, closes it, damages it with `damage`, and
    /// returns the error `open` gives.
    fn open_after(damage: impl FnOnce(&WriteTxnTables<'_>)) -> LedgerError {
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
                    records: txn.open_table(RECORDS).unwrap().into(),
                    nodes: txn.open_table(NODES).unwrap().into(),
                    meta: txn.open_table(META).unwrap().into(),
                    checkpoints: txn.open_table(CHECKPOINTS).unwrap().into(),
                };
                damage(&tables);
            }
            txn.commit().unwrap();
        }
        Ledger::open(&path, key(), LedgerOptions::default()).unwrap_err()
    }

    struct WriteTxnTables<'t> {
        records: std::cell::RefCell<Table<'t, u64, &'static [u8]>>,
        nodes: std::cell::RefCell<Table<'t, u64, [u8; 32]>>,
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
        let err = open_after(|t| {
            t.meta.borrow_mut().insert(META_SIZE, 4).unwrap();
        });
        assert_incoherent(err, "meta size is 4");
    }

    #[test]
    fn open_refuses_deleted_last_record() {
        let err = open_after(|t| {
            t.records.borrow_mut().remove(4).unwrap();
            t.meta.borrow_mut().insert(META_SIZE, 4).unwrap();
        });
        // Size 4 is below the checkpoint's 5: records lost.
        assert_incoherent(err, "latest checkpoint covers 5 records");
    }

    #[test]
    fn open_refuses_edited_last_record() {
        let err = open_after(|t| {
            t.records.borrow_mut().insert(4, &b"{}"[..]).unwrap();
        });
        assert_incoherent(err, "stored leaf hash of record 4");
    }

    #[test]
    fn open_refuses_missing_merkle_node() {
        let err = open_after(|t| {
            t.nodes.borrow_mut().remove(merkle::node_key(2, 0)).unwrap();
        });
        assert_incoherent(err, "merkle node (level 2, index 0) is missing");
    }

    /// A node on the root's path (the perfect subtree of leaves 0..4). Nodes off that path are
    /// not re-hashed at open (O(log n) check); a damaged one makes the proofs it enters fail
    /// verification, which `audit verify` reports.
    #[test]
    fn open_refuses_altered_merkle_node() {
        let err = open_after(|t| {
            t.nodes.borrow_mut().insert(merkle::node_key(2, 0), [9u8; 32]).unwrap();
        });
        assert_incoherent(err, "differs from the signed checkpoint");
    }

    #[test]
    fn open_refuses_forged_checkpoint() {
        let err = open_after(|t| {
            let other = HostKey::generate();
            let cp =
                checkpoint::sign(Checkpoint { origin: key().origin().to_string(), size: 5, root: [0u8; 32] }, &other);
            t.checkpoints.borrow_mut().insert(5, cp.note.as_str()).unwrap();
        });
        assert_incoherent(err, "does not verify with this host key");
    }

    #[test]
    fn txn_rejects_bad_keys_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("l.redb"), key(), LedgerOptions::default()).unwrap();
        let r = ledger.transact_blocking(|txn| {
            assert!(matches!(txn.put("", b"x"), Err(TxnError::BadKey { .. })));
            let long = "k".repeat(MAX_STATE_KEY_BYTES + 1);
            assert!(matches!(txn.put(&long, b"x"), Err(TxnError::BadKey { .. })));
            let big = vec![0u8; MAX_STATE_VALUE_BYTES + 1];
            assert!(matches!(txn.put("k", &big), Err(TxnError::ValueTooLarge { .. })));
            for i in 0..MAX_WRITES_PER_TXN {
                txn.put(&format!("k{i}"), b"")?;
            }
            assert!(matches!(txn.put("one-more", b""), Err(TxnError::TooManyWrites)));
            Ok(((), vec![]))
        });
        assert!(r.is_ok());
        let too_many: Vec<Draft> = (0..=MAX_DRAFTS_PER_TXN).map(|_| Draft::new("p", serde_json::Map::new())).collect();
        let r = ledger.transact_blocking(move |_| Ok(((), too_many)));
        assert!(matches!(r, Err(LedgerError::Draft(DraftError::TooManyDrafts { .. }))));
        assert_eq!(ledger.size(), 0);
    }
}
