//! The writer: the jobs callers queue, group commit, durability, checkpoint signing, and
//! answering callers (see the module docs of [`super`] for the protocol).
//!
//! Owns the journal and the in-memory state, chain heads and Merkle frontier after open, behind
//! one lock ([`Core`]): the writer thread takes it for each group it runs, and a caller alone on
//! its thread may take it to run its own group ([`super::lead`]). Never touches redb's write side
//! (the indexer does). Must not answer a caller before its group is durable, or keep a
//! transaction's writes when its closure or drafts fail.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sync::{oneshot, Permit};

use super::relay::Route;
use super::segments::Segments;
use super::*;
use crate::checkpoint::{self, Checkpoint, SignedCheckpoint};
use crate::hostkey::HostKey;
use crate::journal::{self, GroupEffects, Journal, JournalRecord};
use crate::merkle;
use crate::record::{self, Appended, ChainHead, Draft, DraftError};

pub(super) type TransactReply<T> = oneshot::Sender<Result<(T, Vec<Appended>), LedgerError>>;

pub(super) trait Work: Send {
    /// Runs the closure. `None`: the caller has been answered (closure error or panic).
    fn run(self: Box<Self>, txn: &mut Txn<'_>) -> Option<(Vec<Draft>, Box<dyn Finish>)>;
    /// The job will not run (the group failed before reaching it).
    fn fail(self: Box<Self>, err: LedgerError);
}

pub(super) trait Finish: Send {
    fn finish(self: Box<Self>, result: Result<Vec<Appended>, LedgerError>);
}

pub(super) struct TransactWork<F, T> {
    pub(super) f: F,
    pub(super) reply: TransactReply<T>,
    pub(super) permit: Option<Permit>,
    /// Where the durable answer goes, if the caller's thread relays them ([`super::relay`]).
    pub(super) route: Option<Route>,
}

pub(super) struct TransactFinish<T> {
    value: T,
    reply: TransactReply<T>,
    _permit: Option<Permit>,
    route: Option<Route>,
}

impl<F, T> Work for TransactWork<F, T>
where
    F: FnOnce(&mut Txn<'_>) -> Result<(T, Vec<Draft>), TxnError> + Send + 'static,
    T: Send + 'static,
{
    fn run(self: Box<Self>, txn: &mut Txn<'_>) -> Option<(Vec<Draft>, Box<dyn Finish>)> {
        let TransactWork { f, reply, permit, route } = *self;
        match catch_unwind(AssertUnwindSafe(|| f(txn))) {
            Ok(Ok((value, drafts))) => {
                Some((drafts, Box::new(TransactFinish { value, reply, _permit: permit, route })))
            }
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
    fn finish(mut self: Box<Self>, result: Result<Vec<Appended>, LedgerError>) {
        // A durable answer goes back through the caller's relay, which calls this again (then
        // without a route) on the caller's thread. Failures are sent at once.
        if result.is_ok() {
            if let Some(route) = self.route.take() {
                route.deliver(self, result);
                return;
            }
        }
        let TransactFinish { value, reply, .. } = *self;
        let _ = reply.send(result.map(|a| (value, a)));
    }
}

pub(super) enum Job {
    Transact(Box<dyn Work>),
    Checkpoint(oneshot::Sender<Result<SignedCheckpoint, LedgerError>>),
    /// Nothing to run: a group led by a caller left the log without a checkpoint, and the
    /// writer thread must arm its checkpoint timer.
    Tick,
    Shutdown,
}

impl Job {
    /// A job the writer thread must run before any caller may lead a group.
    fn queued(&self) -> bool {
        matches!(self, Job::Transact(_) | Job::Checkpoint(_))
    }
}

/// The writer's state behind its lock, the writer thread's queue, and how many jobs wait in it.
pub(super) struct Core {
    writer: Mutex<Writer>,
    /// The writer thread's queue. Every send goes through [`Core::submit`], which keeps
    /// `queued` true to it.
    jobs: mpsc::Sender<Job>,
    /// Jobs submitted and not yet taken by the writer thread ([`Job::queued`]). A caller leads
    /// only when none is, so it never overtakes a transaction submitted before it.
    queued: AtomicUsize,
}

impl Core {
    pub(super) fn new(writer: Writer, jobs: mpsc::Sender<Job>) -> Core {
        Core { writer: Mutex::new(writer), jobs, queued: AtomicUsize::new(0) }
    }

    /// Sends a job to the writer thread.
    pub(super) fn submit(&self, job: Job) -> Result<(), LedgerError> {
        let counted = job.queued();
        if counted {
            self.queued.fetch_add(1, Ordering::AcqRel);
        }
        self.jobs.send(job).map_err(|_| {
            if counted {
                self.queued.fetch_sub(1, Ordering::AcqRel);
            }
            LedgerError::Closed
        })
    }

    /// The writer's lock. A group that panicked outside a transaction's closure (a bug) may
    /// have left memory and the journal apart: the store then refuses everything until restart.
    fn lock(&self) -> MutexGuard<'_, Writer> {
        match self.writer.lock() {
            Ok(w) => w,
            Err(p) => {
                let mut w = p.into_inner();
                w.poison_after_panic();
                w
            }
        }
    }

    /// The writer's lock for a caller that may lead a group: only when no job waits for the
    /// writer thread, no group is running and the store is open. `None`: submit instead.
    pub(super) fn try_lead(&self) -> Option<MutexGuard<'_, Writer>> {
        if !super::lead::may_lead() || self.queued.load(Ordering::Acquire) != 0 {
            return None;
        }
        let w = match self.writer.try_lock() {
            Ok(w) => w,
            Err(TryLockError::WouldBlock) | Err(TryLockError::Poisoned(_)) => return None,
        };
        if w.stopped || self.queued.load(Ordering::Acquire) != 0 {
            return None;
        }
        Some(w)
    }

    /// Runs one transaction as a group on the calling thread, under the lock [`Core::try_lead`]
    /// gave: the writer thread's own `run_group`, so durable before answered, and serial with
    /// every other group. Tells the writer thread when the log is left without a checkpoint
    /// and its timer is not armed.
    pub(super) fn lead(&self, mut w: MutexGuard<'_, Writer>, work: Box<dyn Work>) {
        let covered = w.checkpoint_wait().is_none();
        let start = Instant::now();
        {
            let _leading = super::lead::Leading::start();
            w.run_group(vec![work], Group::default());
        }
        w.shared.writes.busy(start.elapsed());
        w.shared.writes.led();
        let tick = covered && w.poisoned.is_none() && w.checkpoint_wait().is_some();
        drop(w);
        if tick {
            let _ = self.submit(Job::Tick);
        }
    }
}

/// The writer thread: takes every queued job (up to `max_group`) as one group, runs it under the
/// writer's lock, until shutdown.
pub(super) fn run_thread(core: Arc<Core>, rx: mpsc::Receiver<Job>) {
    loop {
        let (wait, max_group) = {
            let w = core.lock();
            // A poisoned writer only refuses jobs: no timer may wake it (it would spin).
            let wait = match w.poisoned {
                Some(_) => None,
                None => w.checkpoint_wait(),
            };
            (wait, w.max_group)
        };
        let Some(jobs) = recv_batch(&rx, wait, max_group) else { break };
        let taken = jobs.iter().filter(|j| j.queued()).count();
        let mut w = core.lock();
        // Taken once the lock is held: a caller that then finds the queue empty cannot lead
        // before this group has run.
        core.queued.fetch_sub(taken, Ordering::AcqRel);
        let start = Instant::now();
        let stop = w.group(jobs);
        w.shared.writes.busy(start.elapsed());
        if stop {
            break;
        }
    }
    core.lock().finish_writing();
}

pub(super) struct Writer {
    pub(super) path: PathBuf,
    pub(super) key: HostKey,
    pub(super) shared: Arc<Shared>,
    pub(super) max_group: usize,
    pub(super) interval: Duration,
    /// Answered size.
    pub(super) size: u64,
    /// Size and signing time of the latest checkpoint.
    pub(super) last_checkpoint: Option<(u64, Instant)>,
    pub(super) journal: Journal,
    pub(super) journal_on: bool,
    /// Sequence number of the last group.
    pub(super) gseq: u64,
    /// State, chain heads and Merkle frontier after every answered group.
    pub(super) mem: Memory,
    pub(super) segments: Arc<Segments>,
    /// Answered records the indexer may not have published yet (for [`Txn::record`]).
    pub(super) recent: VecDeque<(u64, Arc<[u8]>)>,
    pub(super) max_unindexed: u64,
    pub(super) index: mpsc::Sender<IndexJob>,
    pub(super) indexer: Option<JoinHandle<()>>,
    /// The writer stopped (final checkpoint and sync done).
    pub(super) stopped: bool,
    /// Set when the journal and the in-memory state may disagree with what is durable (a
    /// journal write failed, or the indexer failed): every later group is refused until a
    /// restart replays the journal.
    pub(super) poisoned: Option<StorageError>,
    /// The answer to the sync the writer asked for when it last left a journal half: that half
    /// may be reused once it has come (`None`: nothing to wait for).
    pub(super) left_half_synced: Option<mpsc::Receiver<Result<(), StorageError>>>,
    /// The journal entry being written, and where its records are in it (kept between groups).
    pub(super) payload: Vec<u8>,
    pub(super) spans: Vec<std::ops::Range<usize>>,
    /// Where each record is written while it is sealed (kept between records).
    pub(super) scratch: Vec<u8>,
}

/// Largest record buffer kept for the next record (records are bounded at 64 KiB; a draft that
/// is larger fails to seal, after it was written).
const MAX_KEPT_SCRATCH: usize = 128 * 1024;

/// Largest entry buffer kept for the next group (a rare huge group's is freed).
const MAX_KEPT_PAYLOAD: usize = 4 * 1024 * 1024;

/// The outcome of one group, before it is durable.
#[derive(Default)]
pub(super) struct Group {
    /// Callers to answer once durable, with their records.
    done: Vec<(Box<dyn Finish>, Vec<Appended>)>,
    checkpoint_waiters: Vec<oneshot::Sender<Result<SignedCheckpoint, LedgerError>>>,
    shutdown: bool,
}

/// Records for a transaction's [`Txn::record`]: recent ones from memory, older (published) ones
/// from their segments.
struct Records<'a> {
    recent: &'a VecDeque<(u64, Arc<[u8]>)>,
    segments: &'a Segments,
    size: u64,
}

impl RecordRead for Records<'_> {
    fn view_record(&self, index: u64) -> Result<Option<Vec<u8>>, TxnError> {
        if index >= self.size {
            return Ok(None);
        }
        if let Some((first, _)) = self.recent.front() {
            if index >= *first {
                let at = usize::try_from(index - first).unwrap_or(usize::MAX);
                return Ok(self.recent.get(at).map(|(_, bytes)| bytes.to_vec()));
            }
        }
        // Older than every recent record: the indexer published it.
        match self.segments.read(index) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) => Err(TxnError::Storage(Arc::new(redb::Error::Io(std::io::Error::other(e.to_string()))))),
        }
    }
}

impl Writer {
    fn poison_after_panic(&mut self) {
        if self.poisoned.is_none() {
            tracing::error!("a ledger group panicked; refusing every transaction until restart");
            self.poisoned = Some(StorageError {
                path: self.path.clone(),
                context: "group commit",
                source: Arc::new(redb::Error::Io(std::io::Error::other("a group commit panicked"))),
            });
        }
    }

    /// The way out: a final checkpoint over the tail of the log, everything synced to redb, the
    /// store marked as stopped cleanly, the journal emptied. Idempotent.
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
        let (tx, rx) = mpsc::sync_channel(1);
        if self.index.send(IndexJob::Shutdown(tx)).is_ok() {
            if let Ok(Ok(())) = rx.recv() {
                if self.poisoned.is_none() {
                    if let Err(e) = self.journal.reset() {
                        tracing::warn!(error = %e, "cannot mark the ledger journal empty");
                    }
                }
            }
        }
        if let Some(handle) = self.indexer.take() {
            let _ = handle.join();
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
                Job::Tick => {}
                Job::Shutdown => g.shutdown = true,
            }
        }
        let stop = g.shutdown;
        if !works.is_empty() || !g.checkpoint_waiters.is_empty() || self.checkpoint_due(self.size) {
            self.run_group(works, g);
        }
        stop
    }

    fn run_group(&mut self, works: Vec<Box<dyn Work>>, mut g: Group) {
        let mut pending = works.into_iter();
        if self.poisoned.is_none() {
            let failed = self.shared.lock_progress().failed.clone();
            if let Some(e) = failed {
                self.poisoned = Some(e);
            }
        }
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
                // Read (and copied) only for someone waiting for it, not after every group.
                let latest = if g.checkpoint_waiters.is_empty() {
                    None
                } else {
                    match self.shared.latest.read() {
                        Ok(l) => l.clone(),
                        Err(p) => p.into_inner().clone(),
                    }
                };
                for w in g.checkpoint_waiters {
                    let _ = w.send(latest.clone().ok_or(LedgerError::Closed));
                }
            }
            Err(err) => {
                // The in-memory state may now hold the failed group: nothing more may run.
                if self.poisoned.is_none() {
                    self.poisoned = Some(err.clone());
                }
                tracing::error!(error = %err, "ledger group commit failed; every transaction of the group is refused, and every later one until restart");
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

    /// Runs one group against the in-memory state and makes it durable. On error the writer is
    /// poisoned (memory may hold the group); jobs not yet run stay in `pending`, and `g.done`
    /// holds the ones that ran and must now be failed.
    fn write_group(
        &mut self,
        pending: &mut std::vec::IntoIter<Box<dyn Work>>,
        g: &mut Group,
    ) -> Result<(u64, Option<SignedCheckpoint>), StorageError> {
        // Backpressure: what is queued for the indexer stays bounded.
        let mut p = self.shared.lock_progress();
        while self.size.saturating_sub(p.applied_size) > self.max_unindexed && p.failed.is_none() && !p.closed {
            p = match self.shared.progressed.wait(p) {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
        if let Some(e) = &p.failed {
            return Err(e.clone());
        }
        // Records the indexer has published are readable from redb.
        let published_size = p.published_size;
        drop(p);
        while self.recent.front().is_some_and(|(i, _)| *i < published_size) {
            self.recent.pop_front();
        }
        let mut size = self.size;
        let gseq = self.gseq + 1;
        // Sized for one record per transaction (the usual case): no regrowth in a large group.
        let jobs = pending.len();
        let mut fx = GroupEffects { records: Vec::with_capacity(jobs), ..GroupEffects::default() };
        g.done.reserve(jobs);
        // One time for every record of the group (they become durable together).
        let now = record::now_rfc3339();
        let mut leaves = Vec::with_capacity(jobs);
        for work in pending.by_ref() {
            let records = Records { recent: &self.recent, segments: &self.segments, size };
            let mut txn = Txn { state: &self.mem.state, records: &records, overlay: BTreeMap::new(), next_index: size };
            let ran = work.run(&mut txn);
            let overlay = std::mem::take(&mut txn.overlay);
            let Some((drafts, finish)) = ran else {
                continue;
            };
            // Seal every draft before keeping anything, so a bad draft leaves no trace.
            let sealed = match seal_all(&self.mem.heads, drafts, size, &now, &mut self.scratch) {
                Ok(s) => s,
                Err(e) => {
                    finish.finish(Err(e.into()));
                    continue;
                }
            };
            for (k, v) in &overlay {
                match (v, self.mem.state.get_mut(k)) {
                    (Some(v), Some(slot)) => slot.clone_from(v),
                    (Some(v), None) => {
                        self.mem.state.insert(k.clone(), v.clone());
                    }
                    (None, _) => {
                        self.mem.state.remove(k);
                    }
                }
            }
            fx.state.extend(overlay);
            let mut appended = Vec::with_capacity(sealed.len());
            for (chain, a) in sealed {
                let head = ChainHead { seq: a.seq, hash: a.leaf_hash };
                match self.mem.heads.get_mut(chain.as_str()) {
                    Some(h) => *h = head,
                    None => {
                        self.mem.heads.insert(chain.clone(), head);
                    }
                }
                self.mem.frontier.push(a.leaf_hash);
                leaves.push(a.leaf_hash);
                self.recent.push_back((a.index, Arc::clone(&a.canonical)));
                fx.records.push(JournalRecord {
                    chain,
                    index: a.index,
                    seq: a.seq,
                    canonical: Arc::clone(&a.canonical),
                });
                appended.push(a);
            }
            size += appended.len() as u64;
            g.done.push((finish, appended));
        }

        let wanted = !g.checkpoint_waiters.is_empty() || self.checkpoint_due(size);
        let already = self.last_checkpoint.map(|(s, _)| s) == Some(size);
        let new_cp = if wanted && !already {
            let root = self.mem.frontier.root();
            let signed = checkpoint::sign(Checkpoint { origin: self.key.origin().to_string(), size, root }, &self.key);
            fx.checkpoint = Some((size, signed.note.clone()));
            Some(signed)
        } else {
            None
        };
        fx.size = size;
        self.make_durable(gseq, fx, leaves)?;
        self.gseq = gseq;
        Ok((size, new_cp))
    }

    /// Makes a group durable: one journal entry (then hands it to the indexer), or, when the
    /// journal is off or cannot hold it, a synced redb commit by the indexer.
    fn make_durable(&mut self, gseq: u64, fx: GroupEffects, leaves: Vec<merkle::Hash>) -> Result<(), StorageError> {
        // The entry's buffers are the writer's, reused group after group: a fresh payload of a
        // large group was tens of KiB allocated and freed per group (and glibc consolidates its
        // free lists on every free that large).
        let mut payload = std::mem::take(&mut self.payload);
        let mut spans = std::mem::take(&mut self.spans);
        payload.clear();
        fx.encode_spans(&mut payload, &mut spans);
        let result = self.write_entry(gseq, fx, leaves, &payload, &spans);
        if payload.capacity() <= MAX_KEPT_PAYLOAD {
            self.payload = payload;
            self.spans = spans;
        }
        result
    }

    fn write_entry(
        &mut self,
        gseq: u64,
        fx: GroupEffects,
        leaves: Vec<merkle::Hash>,
        payload: &[u8],
        spans: &[std::ops::Range<usize>],
    ) -> Result<(), StorageError> {
        if self.journal_on {
            if !self.journal.fits(payload.len()) && self.journal.fits_in_half(payload.len()) {
                // On error the group goes to redb directly, below, which starts the journal
                // over.
                if let Err(e) = self.switch_half() {
                    tracing::warn!(error = %e, "cannot move to the ledger journal's other half; the group is committed to the database directly");
                }
            }
            if self.journal.fits(payload.len()) {
                // Durable from here on: answered callers survive a crash through replay.
                // The records are hashed once: the entry's digest takes their leaf hashes.
                let start = Instant::now();
                let appended = self.journal.append_group(gseq, payload, spans, &leaves);
                self.shared.writes.durable_write(start.elapsed());
                if let Err(e) = appended {
                    if let Err(void) = self.journal.void_tail() {
                        tracing::error!(error = %void, "cannot erase the failed journal entry either");
                    }
                    tracing::error!(error = %e, "ledger journal write failed; refusing every transaction until restart");
                    return Err(journal_storage(&self.path, "journal append", &e));
                }
                return self.index.send(IndexJob::Group { gseq, fx, leaves }).map_err(|_| indexer_gone(&self.path));
            }
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let start = Instant::now();
        self.index.send(IndexJob::Durable { gseq, fx, leaves, reply: tx }).map_err(|_| indexer_gone(&self.path))?;
        rx.recv().map_err(|_| indexer_gone(&self.path))??;
        self.shared.writes.durable_write(start.elapsed());
        // redb now holds every group durably; the journal must not keep older entries, or
        // the next one would not follow them at replay.
        if self.journal_on {
            self.left_half_synced = None;
            if let Err(e) = self.journal.reset() {
                // Entries appended after the old ones would not follow them at replay: no more
                // journal until a restart (every group is a durable redb commit meanwhile).
                tracing::error!(error = %e, "cannot start the ledger journal over; every later group is committed to the database directly until restart");
                self.journal_on = false;
            }
        }
        Ok(())
    }

    /// Moves the journal to its other half once redb holds every entry in it: waits for the sync
    /// asked for when the writer left that half (long done, unless the indexer is far behind),
    /// asks for one covering the half being left (every group in it was sent to the indexer),
    /// and starts the other half. Counted as a lap, with its wait.
    fn switch_half(&mut self) -> Result<(), StorageError> {
        let path = self.path.clone();
        let start = Instant::now();
        if let Some(rx) = self.left_half_synced.take() {
            rx.recv().map_err(|_| indexer_gone(&path))??;
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.index.send(IndexJob::Sync(tx)).map_err(|_| indexer_gone(&path))?;
        self.left_half_synced = Some(rx);
        self.journal.switch().map_err(|e| journal_storage(&path, "journal switch", &e))?;
        self.shared.writes.lap(start.elapsed());
        Ok(())
    }
}

fn indexer_gone(path: &Path) -> StorageError {
    StorageError {
        path: path.to_path_buf(),
        context: "index",
        source: Arc::new(redb::Error::Io(std::io::Error::other("the ledger indexer thread has stopped"))),
    }
}

pub(super) fn journal_storage(path: &Path, context: &'static str, e: &journal::JournalError) -> StorageError {
    StorageError {
        path: path.to_path_buf(),
        context,
        source: Arc::new(redb::Error::Io(std::io::Error::other(e.to_string()))),
    }
}

pub(super) fn seal_all(
    heads: &HashMap<String, ChainHead>,
    drafts: Vec<Draft>,
    start: u64,
    now: &str,
    scratch: &mut Vec<u8>,
) -> Result<Vec<(String, Appended)>, DraftError> {
    if drafts.len() > MAX_DRAFTS_PER_TXN {
        return Err(DraftError::TooManyDrafts { count: drafts.len(), max: MAX_DRAFTS_PER_TXN });
    }
    if start.saturating_add(drafts.len() as u64) >= merkle::MAX_TREE_SIZE - 1 {
        return Err(DraftError::TooManyDrafts { count: drafts.len(), max: 0 });
    }
    if drafts.is_empty() {
        return Ok(Vec::new());
    }
    // Heads this transaction moved; only needed (and only allocated) with more than one draft.
    let many = drafts.len() > 1;
    let mut local: HashMap<String, ChainHead> = HashMap::new();
    let mut out = Vec::with_capacity(drafts.len());
    for (i, draft) in drafts.into_iter().enumerate() {
        let head = local.get(&draft.chain).or_else(|| heads.get(&draft.chain)).copied();
        // Checks the chain name before anything else.
        let sealed = record::seal_owned(draft, start + i as u64, head, now, scratch);
        if scratch.capacity() > MAX_KEPT_SCRATCH {
            // A rare huge record's buffer is not kept for the small ones after it.
            *scratch = Vec::new();
        }
        let (chain, appended, new_head) = sealed?;
        if many {
            local.insert(chain.clone(), new_head);
        }
        out.push((chain, appended));
    }
    Ok(out)
}
