//! The redb store: one writer thread, group commit, durable before answered.
//!
//! Every write goes through a single writer thread. It takes every queued job (up to
//! [`LedgerOptions::max_group`]) into one redb write transaction, runs the transactions' closures
//! one after the other (each sees what earlier ones of the group wrote), appends their records
//! and Merkle nodes, signs a checkpoint if one is due or asked for, makes the group durable, and
//! only then answers every caller. If that fails, every transaction of the group gets the error
//! and nothing of the group is visible.
//!
//! Durable means: written to the commit journal ([`super::journal`]) with one `fdatasync`. The
//! group's rows stay in a redb write transaction that is kept open across groups and committed
//! (published) without a sync every [`LedgerOptions::publish_interval`], or at once when a reader
//! asks: every read ([`Ledger::snapshot`] and what is built on it) first makes sure every group
//! already answered is published, so nobody reads an older state than a caller was told about.
//! redb itself is synced at least every [`LedgerOptions::durable_interval`] and whenever the
//! journal is half full, after which the journal starts over. At open, journal entries redb does
//! not have yet (after a crash) are applied again before anything else. A group too large for
//! the journal is committed to redb with `Durability::Immediate` instead. Each group has a
//! sequence number, stored in `meta` with the group, which is how replay knows where redb
//! stopped. If redb fails while the open transaction holds answered groups, the writer refuses
//! everything until a restart, which replays them from the journal.
//!
//! A transaction's closure runs against an overlay: its `put`s and `delete`s are applied to the
//! state table only if the closure returns `Ok` and every draft it returned can be sealed. So a
//! closure that fails (or panics) leaves no trace, and the rest of the group goes on.
//!
//! Tables: `records` (log index → canonical record), `merkle_nodes` (packed (level, index) →
//! perfect-subtree hash), `chain_heads` (chain → (seq, leaf hash) of its last record),
//! `chain_index` ((chain, seq) → log index), `state` (key → opaque bytes owned by other modules),
//! `checkpoints` (tree size → signed note), `meta` (`size`, `format`, `journal_id`,
//! `journal_seq`).

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sync::{block_on, oneshot, Permit, Permits};
use ed25519_dalek::VerifyingKey;
use redb::{Database, Durability, ReadTransaction, ReadableTable, ReadableTableMetadata, Table, TableDefinition};

use super::checkpoint::{self, Checkpoint, SignedCheckpoint};
use super::hostkey::HostKey;
use super::journal::{self, GroupEffects, Journal, JournalRecord};
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
const WRITER_THREAD: &str = "sluice-ledger";
const META_FORMAT: &str = "format";
/// Ties the journal file to this store.
const META_JOURNAL_ID: &str = "journal_id";
/// Sequence number of the last group committed to redb.
const META_GSEQ: &str = "journal_seq";
/// 1 when the last writer stopped cleanly (everything synced to redb), 0 while one runs.
const META_CLEAN: &str = "clean_stop";
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
    /// Size of the commit journal file (preallocated when the store is created; an existing
    /// journal keeps its size). 0 turns the journal off: every group is then a durable redb
    /// commit (slower; for comparison and for file systems where preallocation is a problem).
    pub journal_capacity: u64,
    /// redb is synced at least this often while groups arrive (the journal covers the rest).
    pub durable_interval: Duration,
    /// Answered groups are committed to redb (visible to readers that did not ask) at least
    /// this often.
    pub publish_interval: Duration,
    /// redb's page cache.
    pub cache_bytes: usize,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        Self {
            max_group: 1024,
            max_queued: 16 * 1024,
            checkpoint_interval: Duration::from_secs(1),
            journal_capacity: journal::DEFAULT_CAPACITY,
            durable_interval: Duration::from_secs(1),
            publish_interval: Duration::from_millis(100),
            cache_bytes: 16 * 1024 * 1024,
        }
    }
}

/// The journal file of the store at `path` (`ledger.redb` → `ledger.journal`).
pub fn journal_path(path: &Path) -> PathBuf {
    path.with_extension("journal")
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
    #[error(transparent)]
    Journal(#[from] Arc<journal::JournalError>),
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

/// Read access to the records table inside the writer's transaction.
trait RecordView {
    fn view_record(&self, index: u64) -> Result<Option<Vec<u8>>, redb::StorageError>;
}

impl<T: ReadableTable<u64, &'static [u8]>> RecordView for T {
    fn view_record(&self, index: u64) -> Result<Option<Vec<u8>>, redb::StorageError> {
        Ok(self.get(index)?.map(|v| v.value().to_vec()))
    }
}

/// A transaction's view of the state: committed state plus the earlier transactions of the same
/// group, plus its own uncommitted writes.
pub struct Txn<'a> {
    state: &'a dyn StateView,
    records: &'a dyn RecordView,
    overlay: BTreeMap<String, Option<Vec<u8>>>,
    next_index: u64,
}

impl Txn<'_> {
    /// The canonical bytes of the record at `index`, as the writer sees it: every record answered
    /// so far, published or not (reading here never waits for a publish).
    pub fn record(&self, index: u64) -> Result<Option<Vec<u8>>, TxnError> {
        self.records.view_record(index).map_err(|e| TxnError::Storage(Arc::new(e.into())))
    }

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
    permit: Option<Permit>,
}

struct TransactFinish<T> {
    value: T,
    reply: TransactReply<T>,
    _permit: Option<Permit>,
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
    /// A reader wants every answered group visible.
    Publish(mpsc::SyncSender<Result<(), StorageError>>),
    Checkpoint(oneshot::Sender<Result<SignedCheckpoint, LedgerError>>),
    Shutdown,
}

// ---------------------------------------------------------------------------------------------
// The ledger handle

struct Shared {
    size: AtomicU64,
    latest: RwLock<Option<SignedCheckpoint>>,
    /// Sequence number of the last group whose callers were answered.
    answered: AtomicU64,
    /// Sequence number of the last group committed to redb (visible to readers).
    published: AtomicU64,
}

struct Inner {
    path: PathBuf,
    db: Arc<Database>,
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
    writer: Mutex<Option<JoinHandle<()>>>,
    permits: Permits,
    /// The writer thread (which must never wait for itself).
    writer_id: Option<std::thread::ThreadId>,
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
        // redb's page cache defaults to 1 GiB and fills with every record ever read or written;
        // the daemon's memory must stay bounded, and its hot state is small.
        let db = match redb::Builder::new().set_cache_size(opts.cache_bytes).create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(LedgerError::AlreadyOpen { path: path.to_path_buf() })
            }
            Err(e) => return Err(se(path, "open database")(e).into()),
        };
        let db = Arc::new(db);
        init_tables(&db, path)?;
        let (journal, gseq) = open_journal(&db, path, opts.journal_capacity)?;
        let public = host_key.verifying_key();
        let (size, latest) = check_coherent(&db, path, &public)?;
        let shared = Arc::new(Shared {
            size: AtomicU64::new(size),
            latest: RwLock::new(latest.clone()),
            answered: AtomicU64::new(gseq),
            published: AtomicU64::new(gseq),
        });
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
            journal,
            journal_on: opts.journal_capacity > 0,
            gseq,
            durable_interval: opts.durable_interval,
            publish_interval: opts.publish_interval,
            open: None,
            stopped: false,
            clean_stop: false,
            undurable_since: None,
            poisoned: None,
        };
        let handle = std::thread::Builder::new()
            .name(WRITER_THREAD.into())
            .spawn(move || writer.run())
            .map_err(LedgerError::Spawn)?;
        Ok(Ledger {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                db,
                shared,
                jobs: tx,
                writer_id: Some(handle.thread().id()),
                writer: Mutex::new(Some(handle)),
                permits: Permits::new(opts.max_queued.max(1)),
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
        let permit = self.inner.permits.acquire().await.map_err(|_| LedgerError::Closed)?;
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
        block_on(rx).map_err(|_| LedgerError::Closed)?
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
        let latest = match self.inner.shared.latest.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        // After reading it: whatever group signed it is then published.
        self.publish()?;
        Ok(latest)
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
        self.publish()?;
        Snapshot::new(&self.inner.db, &self.inner.path)
    }

    /// Waits until every group already answered is visible to readers (see the module docs).
    /// Blocks for at most one redb commit; a no-op when nothing is pending.
    fn publish(&self) -> Result<(), LedgerError> {
        let shared = &self.inner.shared;
        if shared.published.load(Ordering::Acquire) >= shared.answered.load(Ordering::Acquire) {
            return Ok(());
        }
        // A closure on the writer thread reads through its `Txn`, never through here; waiting
        // for the writer from the writer would never end.
        if Some(std::thread::current().id()) == self.inner.writer_id {
            return Ok(());
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.inner.jobs.send(Job::Publish(tx)).map_err(|_| LedgerError::Closed)?;
        rx.recv().map_err(|_| LedgerError::Closed)??;
        Ok(())
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

/// Opens the store's journal and applies (durably) every group it holds that redb does not.
/// Returns the journal, emptied, and the sequence number of the last group.
fn open_journal(db: &Database, path: &Path, capacity: u64) -> Result<(Journal, u64), LedgerError> {
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
        for entry in &pending {
            let at = |what: String| bad(format!("journal {} group {}: {what}", jpath.display(), entry.gseq));
            let fx = GroupEffects::decode(&entry.payload).map_err(|e| at(e.to_string()))?;
            for (k, v) in &fx.state {
                check_key(k).map_err(|e| at(e.to_string()))?;
                t.put_state(k, v.as_deref(), path)?;
            }
            for r in &fx.records {
                if r.index != size {
                    return Err(at(format!("record index {} where the log has {size} records", r.index)));
                }
                record::check_chain(&r.chain).map_err(|e| at(e.to_string()))?;
                let appended = Appended {
                    index: r.index,
                    leaf_hash: merkle::leaf_hash(&r.canonical),
                    seq: r.seq,
                    canonical: r.canonical.clone(),
                };
                t.put_record(&r.chain, &appended, path)?;
                size += 1;
                records += 1;
            }
            if fx.size != size {
                return Err(at(format!("says the log has {} records after it, replay gives {size}", fx.size)));
            }
            if let Some((cp_size, note)) = &fx.checkpoint {
                if *cp_size != size {
                    return Err(at(format!("checkpoint of size {cp_size} in a group ending at {size}")));
                }
                t.checkpoints.insert(*cp_size, note.as_str()).map_err(se(path, "write checkpoint"))?;
            }
            gseq = entry.gseq;
            t.meta.insert(META_SIZE, size).map_err(se(path, "write size"))?;
            t.meta.insert(META_GSEQ, gseq).map_err(se(path, "write journal seq"))?;
        }
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

/// Records (durably) that a writer is running, so a missing journal after an unclean stop is
/// noticed at the next open.
fn mark_running(db: &Database, path: &Path) -> Result<(), LedgerError> {
    let txn = db.begin_write().map_err(se(path, "begin"))?;
    {
        let mut meta = txn.open_table(META).map_err(se(path, "open meta"))?;
        meta.insert(META_CLEAN, 0).map_err(se(path, "write clean flag"))?;
    }
    txn.commit().map_err(se(path, "commit clean flag"))?;
    Ok(())
}

/// The write transaction's tables, and how one state write and one record are stored (shared by
/// the live writer and journal replay, so both write exactly the same rows).
struct Tables<'t> {
    records: Table<'t, u64, &'static [u8]>,
    nodes: Table<'t, u64, [u8; 32]>,
    heads: Table<'t, &'static str, (u64, [u8; 32])>,
    chain_index: Table<'t, (&'static str, u64), u64>,
    state: Table<'t, &'static str, &'static [u8]>,
    checkpoints: Table<'t, u64, &'static str>,
    meta: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    fn open(wtxn: &'t redb::WriteTransaction, path: &Path) -> Result<Tables<'t>, StorageError> {
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

    fn put_state(&mut self, key: &str, val: Option<&[u8]>, path: &Path) -> Result<(), StorageError> {
        match val {
            Some(v) => self.state.insert(key, v).map(|_| ()).map_err(se(path, "write state")),
            None => self.state.remove(key).map(|_| ()).map_err(se(path, "delete state")),
        }
    }

    fn put_record(&mut self, chain: &str, appended: &Appended, path: &Path) -> Result<(), StorageError> {
        self.records.insert(appended.index, appended.canonical.as_slice()).map_err(se(path, "write record"))?;
        merkle::append(&mut NodesWrite(&mut self.nodes), appended.index, appended.leaf_hash)
            .map_err(|e| merkle_storage(path, e))?;
        self.heads.insert(chain, (appended.seq, appended.leaf_hash)).map_err(se(path, "write chain head"))?;
        self.chain_index.insert((chain, appended.seq), appended.index).map_err(se(path, "write chain index"))?;
        Ok(())
    }
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
    journal: Journal,
    journal_on: bool,
    /// Sequence number of the last group.
    gseq: u64,
    durable_interval: Duration,
    publish_interval: Duration,
    /// The redb transaction holding answered but unpublished groups.
    open: Option<OpenTxn>,
    /// Since when redb holds groups that only the journal makes durable.
    undurable_since: Option<Instant>,
    /// The writer stopped (final checkpoint and sync done).
    stopped: bool,
    /// The next durable publish marks the store as stopped cleanly.
    clean_stop: bool,
    /// Set when redb and the journal may disagree (a journal write or a commit after a journal
    /// write failed): every later group is refused until a restart replays the journal.
    poisoned: Option<StorageError>,
}

/// A redb write transaction kept open across groups.
struct OpenTxn {
    wtxn: redb::WriteTransaction,
    /// When its first group was answered.
    since: Instant,
}

/// The outcome of one group, before commit.
#[derive(Default)]
struct Group {
    /// Callers to answer after commit, with their records.
    done: Vec<(Box<dyn Finish>, Vec<Appended>)>,
    checkpoint_waiters: Vec<oneshot::Sender<Result<SignedCheckpoint, LedgerError>>>,
    publish_waiters: Vec<mpsc::SyncSender<Result<(), StorageError>>>,
    shutdown: bool,
}

impl Writer {
    fn run(mut self) {
        loop {
            // A poisoned writer only refuses jobs: no timer may wake it (it would spin).
            let wait = match self.poisoned {
                Some(_) => None,
                None => [self.checkpoint_wait(), self.durable_wait(), self.publish_wait()].into_iter().flatten().min(),
            };
            let first = match wait {
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
            let stop = self.group(jobs);
            if stop {
                break;
            }
        }
        self.finish_writing();
    }

    /// The way out: a final checkpoint over the tail of the log, everything synced to redb, and
    /// the store marked as stopped cleanly. Idempotent.
    fn finish_writing(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if self.poisoned.is_none() && self.size > 0 && self.last_checkpoint.map(|(s, _)| s) != Some(self.size) {
            let (tx, _rx) = oneshot::channel();
            let mut g = Group::default();
            g.checkpoint_waiters.push(tx);
            self.run_group(Vec::new(), g);
        }
        self.clean_stop = true;
        self.publish(true);
    }

    /// How long until the open transaction must be published, if there is one.
    fn publish_wait(&self) -> Option<Duration> {
        let open = self.open.as_ref()?;
        Some((open.since + self.publish_interval).saturating_duration_since(Instant::now()))
    }

    /// How long until redb must be synced, if it holds groups only the journal covers.
    fn durable_wait(&self) -> Option<Duration> {
        let since = self.undurable_since?;
        if self.journal.used() >= self.journal.capacity() / 2 {
            return Some(Duration::ZERO);
        }
        Some((since + self.durable_interval).saturating_duration_since(Instant::now()))
    }

    /// Commits the open transaction (if any); with `durable`, syncs redb (a durable commit
    /// persists every commit before it) and empties the journal. On failure of a durable-only
    /// commit the journal keeps its entries, so nothing is lost; it is retried. A failed commit
    /// of the open transaction poisons the writer (its groups are only in the journal).
    fn publish(&mut self, durable: bool) {
        if self.poisoned.is_some() {
            self.open = None;
            return;
        }
        if !durable && self.open.is_none() {
            return;
        }
        if durable && self.open.is_none() && self.undurable_since.is_none() && !self.clean_stop {
            return;
        }
        let path = self.path.clone();
        let had_open = self.open.is_some();
        let result = (|| -> Result<(), StorageError> {
            let mut wtxn = match self.open.take() {
                Some(open) => open.wtxn,
                None => self.db.begin_write().map_err(se(&path, "begin sync"))?,
            };
            wtxn.set_durability(if durable { Durability::Immediate } else { Durability::None });
            if !had_open || self.clean_stop {
                // Write the sequence again so an empty transaction is a real commit.
                let mut meta = wtxn.open_table(META).map_err(se(&path, "open meta"))?;
                meta.insert(META_GSEQ, self.gseq).map_err(se(&path, "write journal seq"))?;
                if self.clean_stop {
                    meta.insert(META_CLEAN, 1).map_err(se(&path, "write clean flag"))?;
                }
            }
            wtxn.commit().map_err(se(&path, if durable { "durable commit" } else { "commit" }))
        })();
        match result {
            Ok(()) => {
                self.shared.published.store(self.gseq, Ordering::Release);
                if durable {
                    self.undurable_since = None;
                    if let Err(e) = self.journal.reset() {
                        // Harmless for this store (its entries are all older than redb); only a
                        // store restored from an older copy could pick them up.
                        tracing::warn!(error = %e, "cannot mark the ledger journal empty");
                    }
                } else {
                    self.undurable_since.get_or_insert_with(Instant::now);
                }
            }
            Err(e) => {
                // redb refuses every later call after an I/O error anyway (until reopened); the
                // journal still holds every answered group, and a restart replays them.
                tracing::error!(error = %e, "ledger commit failed; refusing every transaction until restart (the restart replays answered groups from the journal)");
                self.poisoned = Some(e);
            }
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
                Job::Publish(tx) => g.publish_waiters.push(tx),
                Job::Shutdown => g.shutdown = true,
            }
        }
        let publish_waiters = std::mem::take(&mut g.publish_waiters);
        let stop = g.shutdown;
        if !works.is_empty() || !g.checkpoint_waiters.is_empty() || self.checkpoint_due(self.size) {
            self.run_group(works, g);
        }
        if stop {
            // Readers waiting with the shutdown get the final, synced state.
            self.finish_writing();
        } else if self.durable_wait() == Some(Duration::ZERO) {
            self.publish(true);
        } else if !publish_waiters.is_empty() || self.publish_wait() == Some(Duration::ZERO) {
            self.publish(false);
        }
        let answer = match &self.poisoned {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        };
        for w in publish_waiters {
            let _ = w.send(answer.clone());
        }
        stop
    }

    fn run_group(&mut self, works: Vec<Box<dyn Work>>, mut g: Group) {
        let mut pending = works.into_iter();
        let result = match &self.poisoned {
            Some(e) => Err(e.clone()),
            None => self.write_group(&mut pending, &mut g),
        };
        match result {
            Ok((size, new_cp)) => {
                // `answered` first: a reader that sees the new size or checkpoint must also see
                // that there is something to publish.
                self.shared.answered.store(self.gseq, Ordering::Release);
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
    }

    /// Writes one group into the open transaction (or a new one) and makes it durable. On error
    /// nothing of the group is kept; jobs not yet run stay in `pending`, and `g.done` holds the
    /// ones that ran and must now be failed.
    fn write_group(
        &mut self,
        pending: &mut std::vec::IntoIter<Box<dyn Work>>,
        g: &mut Group,
    ) -> Result<(u64, Option<SignedCheckpoint>), StorageError> {
        let path = self.path.clone();
        let path = path.as_path();
        let (since, open) = match self.open.take() {
            Some(o) => (Some(o.since), Some(o.wtxn)),
            None => (None, None),
        };
        let had_groups = open.is_some();
        // Any failure below drops the transaction; if it held answered groups, those are now
        // only in the journal, and the writer must stop until a restart replays them.
        let poison = |this: &mut Self, e: StorageError| -> StorageError {
            if had_groups {
                tracing::error!(error = %e, "ledger write failed with answered groups pending; refusing every transaction until restart (the restart replays them from the journal)");
                this.poisoned = Some(e.clone());
            }
            e
        };
        let mut wtxn = match open {
            Some(w) => w,
            None => self.db.begin_write().map_err(se(path, "begin write"))?,
        };
        match self.fill_group(&mut wtxn, pending, g) {
            Ok(done) => self.finish_group(since, wtxn, done).map_err(|e| poison(self, e)),
            Err(e) => Err(poison(self, e)),
        }
    }

    /// Runs the group's transactions into `wtxn` and encodes what they did.
    fn fill_group(
        &mut self,
        wtxn: &mut redb::WriteTransaction,
        pending: &mut std::vec::IntoIter<Box<dyn Work>>,
        g: &mut Group,
    ) -> Result<FilledGroup, StorageError> {
        let path = self.path.clone();
        let path = path.as_path();
        let mut size = self.size;
        let new_cp;
        let gseq = self.gseq + 1;
        let mut fx = GroupEffects::default();
        {
            let mut t = Tables::open(wtxn, path)?;

            for work in pending.by_ref() {
                let mut txn = Txn { state: &t.state, records: &t.records, overlay: BTreeMap::new(), next_index: size };
                let ran = work.run(&mut txn);
                let overlay = std::mem::take(&mut txn.overlay);
                let Some((drafts, finish)) = ran else {
                    continue;
                };

                // Seal every draft before writing anything, so a bad draft leaves no trace.
                let sealed = match seal_all(&t.heads, drafts, size, path) {
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
                        t.put_state(k, v.as_deref(), path)?;
                    }
                    for (chain, appended) in &sealed {
                        t.put_record(chain, appended, path)?;
                    }
                    Ok(())
                })();
                fx.state.extend(overlay);
                fx.records.extend(sealed.iter().map(|(chain, a)| JournalRecord {
                    chain: chain.clone(),
                    index: a.index,
                    seq: a.seq,
                    canonical: a.canonical.clone(),
                }));
                size += sealed.len() as u64;
                g.done.push((finish, sealed.into_iter().map(|(_, a)| a).collect()));
                write?;
            }

            let wanted = !g.checkpoint_waiters.is_empty() || self.checkpoint_due(size);
            let already = self.last_checkpoint.map(|(s, _)| s) == Some(size);
            new_cp = if wanted && !already {
                let root = merkle::root(&NodesWrite(&mut t.nodes), size).map_err(|e| merkle_storage(path, e))?;
                let signed =
                    checkpoint::sign(Checkpoint { origin: self.key.origin().to_string(), size, root }, &self.key);
                t.checkpoints.insert(size, signed.note.as_str()).map_err(se(path, "write checkpoint"))?;
                fx.checkpoint = Some((size, signed.note.clone()));
                Some(signed)
            } else {
                None
            };
            t.meta.insert(META_SIZE, size).map_err(se(path, "write size"))?;
            t.meta.insert(META_GSEQ, gseq).map_err(se(path, "write journal seq"))?;
        }
        fx.size = size;
        let mut payload = Vec::with_capacity(1024);
        fx.encode(&mut payload);
        Ok(FilledGroup { size, gseq, new_cp, payload })
    }

    /// Makes a filled group durable: in the journal (keeping the transaction open), or, when it
    /// does not fit, by a durable redb commit.
    fn finish_group(
        &mut self,
        since: Option<Instant>,
        mut wtxn: redb::WriteTransaction,
        filled: FilledGroup,
    ) -> Result<(u64, Option<SignedCheckpoint>), StorageError> {
        let path = self.path.clone();
        let path = path.as_path();
        let FilledGroup { size, gseq, new_cp, payload } = filled;
        let journaled = self.journal_on && self.journal.fits(payload.len());
        if journaled {
            // Durable from here on: answered callers survive a crash through replay.
            if let Err(e) = self.journal.append(gseq, &payload) {
                if let Err(void) = self.journal.void_tail() {
                    tracing::error!(error = %void, "cannot erase the failed journal entry either");
                }
                let err = journal_storage(path, "journal append", &e);
                self.poisoned = Some(err.clone());
                tracing::error!(error = %e, "ledger journal write failed; refusing every transaction until restart");
                return Err(err);
            }
            self.gseq = gseq;
            self.open = Some(OpenTxn { wtxn, since: since.unwrap_or_else(Instant::now) });
            return Ok((size, new_cp));
        }
        wtxn.set_durability(Durability::Immediate);
        wtxn.commit().map_err(se(path, "commit"))?;
        self.gseq = gseq;
        self.shared.published.store(gseq, Ordering::Release);
        self.undurable_since = None;
        if let Err(e) = self.journal.reset() {
            tracing::warn!(error = %e, "cannot mark the ledger journal empty");
        }
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

/// A group run into the transaction, not yet durable.
struct FilledGroup {
    size: u64,
    gseq: u64,
    new_cp: Option<SignedCheckpoint>,
    payload: Vec<u8>,
}

fn journal_storage(path: &Path, context: &'static str, e: &journal::JournalError) -> StorageError {
    StorageError {
        path: path.to_path_buf(),
        context,
        source: Arc::new(redb::Error::Io(std::io::Error::other(e.to_string()))),
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
