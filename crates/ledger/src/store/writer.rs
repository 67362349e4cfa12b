//! The writer thread: the jobs callers queue, group commit, durability, publishing, checkpoint
//! signing, and answering callers (see the module docs of [`super`] for the protocol).
//!
//! Owns every redb write transaction and the journal after open. Must not answer a caller
//! before its group is durable, or run a transaction's writes when its closure or drafts fail.

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::sync::{oneshot, Permit};
use redb::{Database, Durability, ReadableTable, Table};

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
}

pub(super) struct TransactFinish<T> {
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

pub(super) enum Job {
    Transact(Box<dyn Work>),
    /// A reader wants every answered group visible.
    Publish(mpsc::SyncSender<Result<(), StorageError>>),
    Checkpoint(oneshot::Sender<Result<SignedCheckpoint, LedgerError>>),
    Shutdown,
}

pub(super) struct Writer {
    pub(super) path: PathBuf,
    pub(super) db: Arc<Database>,
    pub(super) key: HostKey,
    pub(super) shared: Arc<Shared>,
    pub(super) rx: mpsc::Receiver<Job>,
    pub(super) max_group: usize,
    pub(super) interval: Duration,
    /// Committed size.
    pub(super) size: u64,
    /// Size and signing time of the latest checkpoint.
    pub(super) last_checkpoint: Option<(u64, Instant)>,
    pub(super) journal: Journal,
    pub(super) journal_on: bool,
    /// Sequence number of the last group.
    pub(super) gseq: u64,
    pub(super) durable_interval: Duration,
    pub(super) publish_interval: Duration,
    /// The redb transaction holding answered but unpublished groups.
    pub(super) open: Option<OpenTxn>,
    /// Since when redb holds groups that only the journal makes durable.
    pub(super) undurable_since: Option<Instant>,
    /// The writer stopped (final checkpoint and sync done).
    pub(super) stopped: bool,
    /// The next durable publish marks the store as stopped cleanly.
    pub(super) clean_stop: bool,
    /// Set when redb and the journal may disagree (a journal write or a commit after a journal
    /// write failed): every later group is refused until a restart replays the journal.
    pub(super) poisoned: Option<StorageError>,
}

/// A redb write transaction kept open across groups.
pub(super) struct OpenTxn {
    wtxn: redb::WriteTransaction,
    /// When its first group was answered.
    since: Instant,
}

/// The outcome of one group, before commit.
#[derive(Default)]
pub(super) struct Group {
    /// Callers to answer after commit, with their records.
    done: Vec<(Box<dyn Finish>, Vec<Appended>)>,
    checkpoint_waiters: Vec<oneshot::Sender<Result<SignedCheckpoint, LedgerError>>>,
    publish_waiters: Vec<mpsc::SyncSender<Result<(), StorageError>>>,
    shutdown: bool,
}

impl Writer {
    pub(super) fn run(mut self) {
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
/// A group run into the transaction, not yet durable.
pub(super) struct FilledGroup {
    size: u64,
    gseq: u64,
    new_cp: Option<SignedCheckpoint>,
    payload: Vec<u8>,
}

pub(super) fn journal_storage(path: &Path, context: &'static str, e: &journal::JournalError) -> StorageError {
    StorageError {
        path: path.to_path_buf(),
        context,
        source: Arc::new(redb::Error::Io(std::io::Error::other(e.to_string()))),
    }
}

pub(super) enum SealError {
    Draft(DraftError),
    Storage(StorageError),
}

pub(super) fn seal_all(
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
