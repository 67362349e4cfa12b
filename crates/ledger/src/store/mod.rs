//! The store: one writer that answers after one journal write, and an indexer thread that
//! keeps the log's segment files and redb (the indexes and the state) up to date behind it.
//!
//! Every write goes through a single writer, one group at a time under its lock. Its thread
//! takes every queued job (up to [`LedgerOptions::max_group`]) as one group, runs the
//! transactions' closures one after the other against its in-memory state table (loaded from
//! redb at open; each closure sees what earlier ones of the group wrote), seals their records
//! against its in-memory chain heads, pushes their leaf hashes onto its in-memory Merkle frontier
//! (the compact range, one hash per perfect subtree), signs a checkpoint from that frontier if
//! one is due or asked for, makes the group durable, and only then answers every caller. No
//! B-tree is touched on that path. When nothing is queued and no group is running, a request
//! alone on its thread ([`RequestInProgress`]) runs its own transaction as a group the same way
//! on its own thread (module `lead`), which spares one request at a time the two thread wake-ups
//! of the hand-off.
//!
//! Durable means: the group's effects (state writes, sealed records, the checkpoint; the
//! [`journal`] entry format) written to the commit journal with one `O_DIRECT | O_DSYNC` write
//! (or `pwrite` + `fdatasync`). If that fails, every transaction of the group gets the error and
//! the writer refuses everything until a restart (its memory may hold the failed group). Once a
//! group is durable the writer hands its effects to the indexer and answers.
//!
//! The indexer appends the records of the groups it is handed to the log's segment files
//! ([`segments`]: records live there, never in redb), their leaf hashes to the hash tiles and
//! their chain links to the links file, and applies the rest of each group to redb,
//! in batches, in one write transaction kept open across batches (the rows are kept in memory,
//! last value per state key and chain, and written once each at the commit), committed (published) without a sync when a reader asks or every
//! [`LedgerOptions::publish_interval`], and synced every [`LedgerOptions::durable_interval`]
//! (the segments, tiles and links are synced first, and redb's `meta` keeps how long the open
//! segment was then).
//! Every read ([`Ledger::snapshot`] and what is built on it) first waits until the indexer has
//! published every group already answered, so nobody reads an older state than a caller was told
//! about. No journal entry is overwritten before redb is synced past it: the journal is two
//! halves, and when the one being written is full the writer moves to the other, asking the
//! indexer for a sync that covers the half it leaves; it reuses that half only once that sync is
//! done (a whole half of groups later, so the move normally waits only for the new half's header
//! write, and no caller waits for a redb sync). Full segments are sealed by a thread of their own, at a
//! lower CPU priority, after the sync that covers them. A group too large for the journal (or every group, with the journal off) is
//! handed to the indexer as a synced redb commit, and answered after it. At open, journal entries
//! redb does not have yet (after a crash or power loss) are applied before anything else; each
//! group has a sequence number, stored in `meta` with it, which is how replay knows where redb
//! stopped. If the indexer fails, the writer refuses everything until a restart, which replays
//! the journal. The writer waits when more than [`LedgerOptions::max_unindexed`] records are
//! queued for the indexer, so memory stays bounded when redb is slower than the journal.
//!
//! A transaction's closure runs against an overlay: its `put`s and `delete`s are applied to the
//! in-memory state only if the closure returns `Ok` and every draft it returned can be sealed.
//! So a closure that fails (or panics) leaves no trace, and the rest of the group goes on. Its
//! [`Txn::record`] reads answered records the indexer has not published from the writer's memory
//! and older ones from redb.
//!
//! Tables (written only by the indexer and by replay): `chain_tails` (chain → (seq, leaf hash,
//! log index) of its last record), `state` (key → opaque bytes owned by other modules),
//! `checkpoints` (tree size → signed note), `meta` (`size`, `format` (3), `journal_id`,
//! `journal_seq`, `clean_stop`, `segment_shift`, `open_segment_len`). Every one of them can be
//! rebuilt from the records and the journal; the records themselves are only in the segments,
//! the Merkle hashes only in the tiles (`tiles`), and which records make up a chain only in the
//! links file (`links`): no row per record is kept in redb. A format 2 store (Merkle nodes and
//! a chain index row per record in redb) is migrated at open.
//!
//! Modules, one job each: this one is the handle ([`Ledger`]: open, submit, read, shut down),
//! its options and errors; `txn` a transaction's view and bounds; `writer` the writer (its lock,
//! its thread, its jobs and the in-memory state); `lead` when a caller may run its own group;
//! `relay` durable answers delivered on the caller's own
//! thread, one wake per batch; `indexer` the thread that writes redb; `snapshot` read-only
//! views; `segments` the segment files (append, sync, seal, read); `tiles` the Merkle hash tiles;
//! `links` the chain links; `open` opening tiles and links (rebuild, migration), journal replay,
//! the coherence check and loading the writer's memory at open;
//! `tables` the table definitions and how a group is written to them (shared by the indexer and
//! replay).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sync::{block_on, oneshot, Permits};
use ed25519_dalek::VerifyingKey;
use redb::Database;

use super::checkpoint::SignedCheckpoint;
use super::hostkey::HostKey;
use super::journal;
use super::merkle::{Hash, MerkleError};
use super::record::{Appended, Draft, DraftError};

mod indexer;
mod lead;
mod links;
mod open;
mod relay;
mod segments;
mod snapshot;
mod tables;
mod tiles;
mod txn;
mod writer;

#[cfg(test)]
pub(crate) use indexer::ON_SYNC;
use indexer::*;
pub use lead::RequestInProgress;
pub use links::links_path;
#[cfg(test)]
pub(crate) use open::REBUILT;
use open::*;
use relay::Route;
pub use relay::{relay_replies, RelayReplies};
use segments::Segments;
pub use segments::{segments_dir, SegmentError};
pub use snapshot::{Snapshot, SnapshotNodes};
use tables::*;
pub use tiles::{tile_path, tiles_dir, TileError};
use txn::*;
pub use txn::{Txn, MAX_DRAFTS_PER_TXN, MAX_STATE_KEY_BYTES, MAX_STATE_VALUE_BYTES, MAX_WRITES_PER_TXN};
use writer::*;

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
    /// Records per segment file (rounded up to a power of two), for a store created by this
    /// open; an existing store keeps its own.
    pub segment_records: u64,
    /// Most records answered but not yet applied to redb by the indexer; the writer waits for
    /// the indexer beyond that (bounds the memory of what is queued for it).
    pub max_unindexed: u64,
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
            max_unindexed: 4096,
            segment_records: segments::DEFAULT_SEGMENT_RECORDS,
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
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error(transparent)]
    Tile(TileError),
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

/// What a store thread (writer or indexer) takes from its queue at once: the first job (waiting
/// for it at most `wait`, or without end when `None`) and then, without waiting, whatever else is
/// queued, up to `max` in all. Empty after a timeout (the thread's timers are due); `None` when
/// every sender is gone.
fn recv_batch<T>(rx: &mpsc::Receiver<T>, wait: Option<Duration>, max: usize) -> Option<Vec<T>> {
    let first = match wait {
        Some(wait) => match rx.recv_timeout(wait) {
            Ok(job) => Some(job),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return None,
        },
        None => Some(rx.recv().ok()?),
    };
    let mut jobs: Vec<T> = first.into_iter().collect();
    while jobs.len() < max {
        match rx.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
    Some(jobs)
}

/// What the writer's durable writes have cost since the store opened ([`Ledger::write_stats`]):
/// an operator's view of the disk under the ledger, of the writer's load, and of the stalls every
/// caller waits through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Groups made durable: one journal entry each, or one redb commit when the journal is off
    /// or the group did not fit in it.
    pub durable_writes: u64,
    /// Time spent in those writes, in nanoseconds: the disk's durable write, what every request
    /// of a group waits for at least.
    pub durable_write_ns: u64,
    /// Times the half of the journal being written was full and the writer moved to the other
    /// half (after redb was synced past the entries in it).
    pub laps: u64,
    /// Time those moves took, in nanoseconds: the wait for that sync (none unless the indexer
    /// is far behind) and the new half's header write. The callers of the group at hand wait
    /// with it.
    pub lap_wait_ns: u64,
    /// Time the writer thread was busy, in nanoseconds: from taking a batch of jobs to having
    /// answered their callers (durable writes and laps included). Its rate is the writer's
    /// utilisation: near one second per second, callers queue for it. A group a caller led on
    /// its own thread counts too: the writer's work, wherever it ran.
    pub busy_ns: u64,
    /// Groups a request alone on its thread committed there, without the writer thread (one
    /// transaction each; see [`RequestInProgress`]). Part of `durable_writes`.
    pub led_groups: u64,
}

/// [`WriteStats`] as the writer thread counts them; read from any thread.
#[derive(Default)]
pub(super) struct WriteCounters {
    durable_writes: AtomicU64,
    durable_write_ns: AtomicU64,
    laps: AtomicU64,
    lap_wait_ns: AtomicU64,
    busy_ns: AtomicU64,
    led_groups: AtomicU64,
}

impl WriteCounters {
    /// Counts one durable write that took `took`.
    pub(super) fn durable_write(&self, took: Duration) {
        self.durable_writes.fetch_add(1, Ordering::Relaxed);
        self.durable_write_ns.fetch_add(nanos(took), Ordering::Relaxed);
    }

    /// Counts one lap whose wait took `took`.
    pub(super) fn lap(&self, took: Duration) {
        self.laps.fetch_add(1, Ordering::Relaxed);
        self.lap_wait_ns.fetch_add(nanos(took), Ordering::Relaxed);
    }

    /// Counts `took` of the writer's busy time.
    pub(super) fn busy(&self, took: Duration) {
        self.busy_ns.fetch_add(nanos(took), Ordering::Relaxed);
    }

    /// Counts one group led by a caller.
    pub(super) fn led(&self) {
        self.led_groups.fetch_add(1, Ordering::Relaxed);
    }

    fn read(&self) -> WriteStats {
        WriteStats {
            durable_writes: self.durable_writes.load(Ordering::Relaxed),
            durable_write_ns: self.durable_write_ns.load(Ordering::Relaxed),
            laps: self.laps.load(Ordering::Relaxed),
            lap_wait_ns: self.lap_wait_ns.load(Ordering::Relaxed),
            busy_ns: self.busy_ns.load(Ordering::Relaxed),
            led_groups: self.led_groups.load(Ordering::Relaxed),
        }
    }
}

/// See [`Ledger::write_stats_reader`]. After the store is closed it reads the counts as they
/// were at its close.
#[derive(Clone)]
pub struct WriteStatsReader(Arc<Shared>);

impl WriteStatsReader {
    pub fn read(&self) -> WriteStats {
        self.0.writes.read()
    }
}

impl std::fmt::Debug for WriteStatsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("WriteStatsReader").field(&self.read()).finish()
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

struct Shared {
    pub(super) size: AtomicU64,
    /// The writer's durable writes, laps and busy time, counted as they happen.
    pub(super) writes: WriteCounters,
    pub(super) latest: RwLock<Option<SignedCheckpoint>>,
    /// Sequence number of the last group whose callers were answered.
    pub(super) answered: AtomicU64,
    /// How far the indexer has come; `progressed` is notified at every change.
    pub(super) progress: Mutex<Progress>,
    pub(super) progressed: Condvar,
}

impl Shared {
    pub(super) fn lock_progress(&self) -> MutexGuard<'_, Progress> {
        match self.progress.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

struct Inner {
    path: PathBuf,
    db: Arc<Database>,
    shared: Arc<Shared>,
    /// The writer's state, lock and queue, shared by the writer thread and callers that lead.
    core: Arc<Core>,
    /// The indexer's queue (readers ask it to publish).
    index: mpsc::Sender<IndexJob>,
    files: Arc<LogFiles>,
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
        let _ = self.core.submit(Job::Shutdown);
        self.permits.close();
        // A closure holding the last clone could drop it on the writer thread itself. (A led
        // group's closure cannot: its caller holds a handle until the group is answered.)
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
        let mut db = db;
        let (shift, migrate) = init_tables(&db, path, opts.segment_records)?;
        let (stored_size, open_len) = read_sizes(&db, path)?;
        let segments = Segments::open(&segments_dir(path), shift, stored_size, open_len).map_err(|e| match e {
            SegmentError::Damaged { .. } => LedgerError::Incoherent { path: path.to_path_buf(), reason: e.to_string() },
            other => other.into(),
        })?;
        let segments = Arc::new(segments);
        let files = open_files(&db, path, segments.clone(), stored_size, migrate).map_err(|e| match e {
            LedgerError::Tile(e @ TileError::Damaged { .. }) => {
                LedgerError::Incoherent { path: path.to_path_buf(), reason: e.to_string() }
            }
            other => other,
        })?;
        if migrate {
            // The format 2 tables' pages are free now: give them back to the file system.
            if let Err(e) = db.compact() {
                tracing::warn!(error = %e, "cannot compact the ledger store after migrating it");
            }
        }
        let db = Arc::new(db);
        let files = Arc::new(files);
        let (journal, gseq) = open_journal(&db, path, opts.journal_capacity, &files)?;
        let public = host_key.verifying_key();
        let (size, latest) = check_coherent(&db, path, &public, &files)?;
        let mem = load_memory(&db, path, size, &files)?;
        let shared = Arc::new(Shared {
            size: AtomicU64::new(size),
            writes: WriteCounters::default(),
            latest: RwLock::new(latest.clone()),
            answered: AtomicU64::new(gseq),
            progress: Mutex::new(Progress {
                published: gseq,
                published_size: size,
                applied_size: size,
                synced: gseq,
                failed: None,
                closed: false,
            }),
            progressed: Condvar::new(),
        });
        let (index_tx, index_rx) = mpsc::channel();
        let indexer = Indexer {
            path: path.to_path_buf(),
            db: db.clone(),
            files: files.clone(),
            shared: shared.clone(),
            rx: index_rx,
            publish_interval: opts.publish_interval,
            durable_interval: opts.durable_interval,
            gseq,
            size,
            published: gseq,
            synced: gseq,
            open: None,
            rows: Rows::default(),
            sealer: None,
            undurable_since: None,
            failed: None,
        };
        let indexer = std::thread::Builder::new()
            .name(INDEXER_THREAD.into())
            .spawn(move || indexer.run())
            .map_err(LedgerError::Spawn)?;
        let (tx, rx) = mpsc::channel();
        let origin = host_key.origin().to_string();
        let writer = Writer {
            path: path.to_path_buf(),
            key: host_key,
            shared: shared.clone(),
            max_group: opts.max_group.max(1),
            interval: opts.checkpoint_interval,
            size,
            last_checkpoint: latest.as_ref().map(|c| (c.checkpoint.size, Instant::now())),
            journal,
            journal_on: opts.journal_capacity > 0,
            gseq,
            mem,
            segments: segments.clone(),
            max_unindexed: opts.max_unindexed.max(1),
            recent: std::collections::VecDeque::new(),
            index: index_tx.clone(),
            indexer: Some(indexer),
            stopped: false,
            poisoned: None,
            left_half_synced: None,
            scratch: Vec::new(),
            payload: Vec::new(),
            spans: Vec::new(),
        };
        let core = Arc::new(Core::new(writer, tx));
        let thread_core = core.clone();
        let handle = std::thread::Builder::new()
            .name(WRITER_THREAD.into())
            .spawn(move || run_thread(thread_core, rx))
            .map_err(LedgerError::Spawn)?;
        Ok(Ledger {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                db,
                shared,
                core,
                index: index_tx,
                files,
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
    /// otherwise the caller gets the error and nothing of `f` is written. `f` runs as the writer,
    /// serially with every other transaction: keep it short and never block in it. It runs on
    /// the writer thread, or, when it is made by the only [`RequestInProgress`] of the calling
    /// thread and the writer is idle, on the calling thread, which then commits the group itself
    /// and is blocked for the durable write.
    pub async fn transact<T, F>(&self, f: F) -> Result<(T, Vec<Appended>), LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Txn<'_>) -> Result<(T, Vec<Draft>), TxnError> + Send + 'static,
    {
        let permit = self.inner.permits.acquire().await.map_err(|_| LedgerError::Closed)?;
        let (reply, rx) = oneshot::channel();
        self.lead_or_submit(|route| Box::new(TransactWork { f, reply, permit: Some(permit), route }))?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }

    /// Runs the job as a group on this thread if it may lead ([`Core::try_lead`]: answered
    /// before this returns), or queues it for the writer thread with this thread's relay route.
    fn lead_or_submit(&self, work: impl FnOnce(Option<Route>) -> Box<dyn Work>) -> Result<(), LedgerError> {
        match self.inner.core.try_lead() {
            Some(w) => {
                self.inner.core.lead(w, work(None));
                Ok(())
            }
            None => self.submit(work(Route::current())),
        }
    }

    /// [`Ledger::transact`] for synchronous callers (CLI, tests). Must not be called from an
    /// async task (it blocks the thread until the commit).
    pub fn transact_blocking<T, F>(&self, f: F) -> Result<(T, Vec<Appended>), LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Txn<'_>) -> Result<(T, Vec<Draft>), TxnError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        self.submit(Box::new(TransactWork { f, reply, permit: None, route: None }))?;
        block_on(rx).map_err(|_| LedgerError::Closed)?
    }

    fn submit(&self, work: Box<dyn Work>) -> Result<(), LedgerError> {
        self.inner.core.submit(Job::Transact(work))
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

    /// What the writer's durable writes, journal laps and busy time have cost since the store
    /// opened.
    pub fn write_stats(&self) -> WriteStats {
        self.inner.shared.writes.read()
    }

    /// A reader of [`Ledger::write_stats`] that does not keep the store open. A thread that
    /// outlives the server's start (a watcher of its activity) holds this, not a `Ledger`: the
    /// store shuts down cleanly when the last `Ledger` is dropped, which a forgotten clone in
    /// such a thread would prevent on a start that fails later.
    pub fn write_stats_reader(&self) -> WriteStatsReader {
        WriteStatsReader(self.inner.shared.clone())
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
        self.inner.core.submit(Job::Checkpoint(tx))?;
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
        Snapshot::new(&self.inner.db, &self.inner.path, &self.inner.files)
    }

    /// Waits until every group already answered is visible to readers (see the module docs):
    /// until the indexer has committed it to redb. A no-op when nothing is pending.
    fn publish(&self) -> Result<(), LedgerError> {
        let shared = &self.inner.shared;
        let target = shared.answered.load(Ordering::Acquire);
        let mut p = shared.lock_progress();
        if p.published >= target {
            return Ok(());
        }
        // A closure on the writer thread reads through its `Txn`, never through here; waiting
        // for the writer's own groups from the writer would never end.
        if Some(std::thread::current().id()) == self.inner.writer_id {
            return Ok(());
        }
        // Sent after reading `target`: the indexer receives every group up to it before this.
        if self.inner.index.send(IndexJob::Publish).is_err() && !p.closed {
            return Err(LedgerError::Closed);
        }
        loop {
            if p.published >= target {
                return Ok(());
            }
            if let Some(e) = &p.failed {
                return Err(e.clone().into());
            }
            if p.closed {
                return Err(LedgerError::Closed);
            }
            p = match shared.progressed.wait(p) {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
    }

    /// Finishes queued work, signs a final checkpoint, and stops the writer. Later writes fail
    /// with [`LedgerError::Closed`]; reads keep working until the last clone is dropped.
    pub fn shutdown(&self) {
        self.inner.stop();
    }
}
