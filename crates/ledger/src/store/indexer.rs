//! The indexer thread: writes answered groups into redb, in batches, off the request path.
//!
//! The writer hands it every group once the group is durable in the journal (and answered). The
//! indexer applies whatever has queued up: the records to the segment, tile and links files
//! (buffered until the next flush), the rows (state, chain tails, checkpoints) to [`Rows`], in
//! memory, last value per key; one redb write transaction is kept open across batches, the
//! rows are written into it once each, and it is committed without a sync when a reader asks ([`IndexJob::Publish`]) or every
//! `publish_interval`, and with a sync every `durable_interval` or when the writer needs the
//! journal emptied ([`IndexJob::Sync`]). What it has published and synced is in [`Progress`],
//! which readers wait on.
//!
//! Owns every redb write after open. Must not apply a group the writer has not made durable
//! (the writer sends a group only after its journal write, or as [`IndexJob::Durable`], which
//! is answered only once redb has synced it), or reorder groups. A failed redb write or commit
//! stops it for good (`Progress::failed`): the writer then refuses everything, and a restart
//! replays the journal, which still holds every group redb had not synced.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use redb::{Database, Durability};

use super::segments::Segments;
use super::*;
use crate::journal::GroupEffects;

pub(super) fn segment_storage(path: &std::path::Path, e: &LedgerError) -> StorageError {
    StorageError {
        path: path.to_path_buf(),
        context: "segments, tiles and links",
        source: Arc::new(redb::Error::Io(std::io::Error::other(e.to_string()))),
    }
}

pub(super) const INDEXER_THREAD: &str = "sluice-ledger-index";

pub(super) type SyncReply = mpsc::SyncSender<Result<(), StorageError>>;

pub(super) enum IndexJob {
    /// An answered group, durable in the journal, with the leaf hash of each of its records
    /// (the writer computed them when sealing: they are not hashed twice).
    Group { gseq: u64, fx: GroupEffects, leaves: Vec<Hash> },
    /// A group the journal does not hold: apply it and sync redb before replying (its callers
    /// are answered only after the reply).
    Durable { gseq: u64, fx: GroupEffects, leaves: Vec<Hash>, reply: SyncReply },
    /// Sync every group sent before (the journal can then start over).
    Sync(SyncReply),
    /// A reader waits for every answered group: publish what was sent.
    Publish,
    /// Sync everything, mark the store as stopped cleanly, and exit.
    Shutdown(SyncReply),
}

/// How far redb has come, for readers and the writer.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// Last group committed to redb (visible to readers), and the log size after it.
    pub(super) published: u64,
    pub(super) published_size: u64,
    /// Log size after the last group applied to the open write transaction (the writer waits
    /// when it runs too far ahead of this).
    pub(super) applied_size: u64,
    /// Last group synced to redb.
    pub(super) synced: u64,
    /// Set when a redb write or commit failed; the indexer has stopped applying groups.
    pub(super) failed: Option<StorageError>,
    /// The indexer thread has exited.
    pub(super) closed: bool,
}

/// Test hook: called with the store's path right after every redb sync (the power-loss test
/// copies the synced redb file there).
#[cfg(test)]
#[allow(clippy::type_complexity)]
pub(crate) static ON_SYNC: std::sync::Mutex<Vec<(PathBuf, Box<dyn Fn(&std::path::Path) + Send>)>> =
    std::sync::Mutex::new(Vec::new());

pub(super) struct Indexer {
    pub(super) path: PathBuf,
    pub(super) db: Arc<Database>,
    pub(super) files: Arc<LogFiles>,
    pub(super) shared: Arc<Shared>,
    pub(super) rx: mpsc::Receiver<IndexJob>,
    pub(super) publish_interval: Duration,
    pub(super) durable_interval: Duration,
    /// Last group applied, and the log size after it.
    pub(super) gseq: u64,
    pub(super) size: u64,
    pub(super) published: u64,
    pub(super) synced: u64,
    /// The write transaction holding applied, unpublished groups, and when it was opened.
    pub(super) open: Option<(redb::WriteTransaction, Instant)>,
    /// The rows of those groups, stored into the transaction when it is committed.
    pub(super) rows: Rows,
    /// The thread that seals full segments, and how to ask it (see [`Indexer::run`]).
    pub(super) sealer: Option<(mpsc::Sender<u64>, std::thread::JoinHandle<()>)>,
    /// Since when redb holds published groups that are not synced.
    pub(super) undurable_since: Option<Instant>,
    pub(super) failed: Option<StorageError>,
}

/// Most jobs taken into one batch.
const MAX_BATCH: usize = 4096;
/// How long the indexer lets groups queue up after a batch nobody waited for.
const BATCH_PAUSE: Duration = Duration::from_millis(2);

impl Indexer {
    pub(super) fn run(mut self) {
        self.sealer = spawn_sealer(self.files.segments.clone());
        loop {
            let wait = match self.failed {
                Some(_) => None,
                None => [
                    self.open.as_ref().map(|(_, since)| *since + self.publish_interval),
                    self.undurable_since.map(|since| since + self.durable_interval),
                ]
                .into_iter()
                .flatten()
                .min()
                .map(|at| at.saturating_duration_since(Instant::now())),
            };
            let Some(jobs) = recv_batch(&self.rx, wait, MAX_BATCH) else { break };
            let (stop, awaited) = self.batch(jobs);
            if stop {
                break;
            }
            if !awaited && self.failed.is_none() {
                // Nobody waits for these groups (they are durable in the journal): let more
                // of them queue up, so that the indexer wakes once per batch of groups rather
                // than once per group. A publish or sync asked meanwhile waits at most this.
                std::thread::sleep(BATCH_PAUSE);
            }
        }
        // Whatever is still open was never synced; the journal holds it.
        self.open = None;
        // Every full segment synced so far is sealed before the store counts as stopped.
        if let Some((tx, handle)) = self.sealer.take() {
            drop(tx);
            let _ = handle.join();
        }
        let mut p = self.shared.lock_progress();
        p.closed = true;
        drop(p);
        self.shared.progressed.notify_all();
    }

    /// Runs one batch. Returns whether the indexer must exit, and whether anyone waits for it
    /// (a sync, a publish, a shutdown).
    fn batch(&mut self, jobs: Vec<IndexJob>) -> (bool, bool) {
        let mut groups: Vec<(u64, GroupEffects, Vec<Hash>)> = Vec::new();
        let mut replies: Vec<SyncReply> = Vec::new();
        let (mut publish, mut sync, mut shutdown) = (false, false, false);
        for job in jobs {
            match job {
                IndexJob::Group { gseq, fx, leaves } => groups.push((gseq, fx, leaves)),
                IndexJob::Durable { gseq, fx, leaves, reply } => {
                    groups.push((gseq, fx, leaves));
                    replies.push(reply);
                    sync = true;
                }
                IndexJob::Sync(reply) => {
                    replies.push(reply);
                    sync = true;
                }
                IndexJob::Publish => publish = true,
                IndexJob::Shutdown(reply) => {
                    replies.push(reply);
                    sync = true;
                    shutdown = true;
                }
            }
        }
        if self.failed.is_none() {
            match self.apply(&groups) {
                Ok(()) if !groups.is_empty() => {
                    self.shared.lock_progress().applied_size = self.size;
                    self.shared.progressed.notify_all();
                }
                Ok(()) => {}
                Err(e) => self.fail(e),
            }
        }
        if self.failed.is_none() {
            let now = Instant::now();
            let sync_due = self.undurable_since.is_some_and(|since| now >= since + self.durable_interval);
            let publish_due = self.open.as_ref().is_some_and(|(_, since)| now >= *since + self.publish_interval);
            let result = if sync || sync_due {
                self.commit(true, shutdown)
            } else if publish || publish_due {
                self.commit(false, false)
            } else {
                Ok(())
            };
            if let Err(e) = result {
                self.fail(e);
            }
        }
        let answer = match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        };
        let awaited = publish || sync || !replies.is_empty();
        for r in replies {
            let _ = r.send(answer.clone());
        }
        (shutdown, awaited)
    }

    fn fail(&mut self, e: StorageError) {
        tracing::error!(error = %e, "ledger index write failed; refusing every transaction until restart (the restart replays answered groups from the journal)");
        self.open = None;
        self.rows = Rows::default();
        self.failed = Some(e.clone());
        let mut p = self.shared.lock_progress();
        p.failed = Some(e);
        drop(p);
        self.shared.progressed.notify_all();
    }

    /// Applies groups into the open transaction (opening one if needed).
    fn apply(&mut self, groups: &[(u64, GroupEffects, Vec<Hash>)]) -> Result<(), StorageError> {
        if groups.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let (wtxn, since) = match self.open.take() {
            Some(open) => open,
            None => (self.db.begin_write().map_err(se(&path, "begin index write"))?, Instant::now()),
        };
        {
            let t = Tables::open(&wtxn, &path)?;
            for (gseq, fx, leaves) in groups {
                self.size = match t.apply_group(&mut self.rows, *gseq, fx, Some(leaves), self.size, &self.files, &path)
                {
                    Ok(size) => size,
                    Err(ApplyError::Storage(e)) => return Err(e),
                    // The writer built this group from the same log: not following it is a bug.
                    Err(ApplyError::Bad(what)) => {
                        return Err(StorageError {
                            path: path.clone(),
                            context: "index group",
                            source: Arc::new(redb::Error::Io(std::io::Error::other(format!("group {gseq}: {what}")))),
                        })
                    }
                };
                self.gseq = *gseq;
            }
        }
        self.open = Some((wtxn, since));
        Ok(())
    }

    /// Commits the open transaction (if any); with `durable`, syncs redb (a durable commit
    /// persists every commit before it), and with `clean` marks the store as stopped cleanly.
    fn commit(&mut self, durable: bool, clean: bool) -> Result<(), StorageError> {
        if !durable && self.open.is_none() {
            return Ok(());
        }
        if durable && self.open.is_none() && self.synced == self.gseq && !clean {
            return Ok(());
        }
        let path = self.path.clone();
        let mut wtxn = match self.open.take() {
            Some((wtxn, _)) => wtxn,
            None => self.db.begin_write().map_err(se(&path, "begin sync"))?,
        };
        wtxn.set_durability(if durable { Durability::Immediate } else { Durability::None });
        // The records reach their segments (and their hashes the tiles, their chain links the
        // links file) before redb says they exist, and, for a sync, reach the disk first.
        let seg = |e: LedgerError| segment_storage(&path, &e);
        if durable {
            self.files.sync().map_err(seg)?;
        } else {
            self.files.flush().map_err(seg)?;
        }
        {
            let mut t = Tables::open(&wtxn, &path)?;
            t.write(&mut self.rows, &path)?;
            // Written again so that an otherwise empty transaction is a real commit.
            t.meta.insert(META_GSEQ, self.gseq).map_err(se(&path, "write journal seq"))?;
            let open_len = self.files.segments.open_len(self.size);
            t.meta.insert(META_OPEN_LEN, open_len).map_err(se(&path, "write segment length"))?;
            if clean {
                t.meta.insert(META_CLEAN, 1).map_err(se(&path, "write clean flag"))?;
            }
        }
        wtxn.commit().map_err(se(&path, if durable { "durable commit" } else { "commit" }))?;
        self.published = self.gseq;
        if durable {
            self.synced = self.gseq;
            self.undurable_since = None;
            // The test hook sees redb as soon as its sync returned, before sealing moves any
            // segment file: what a power cut at any later instant keeps.
            #[cfg(test)]
            {
                let hooks = match ON_SYNC.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                for (p, hook) in hooks.iter() {
                    if p == &self.path {
                        hook(&self.path);
                    }
                }
            }
            // Sealing (reading, compressing and rewriting a whole segment) takes far longer
            // than a sync: it runs on its own thread, so that neither the writer waiting for a
            // sync nor a reader waiting for a publish waits for it.
            match &self.sealer {
                Some((tx, _)) => {
                    let _ = tx.send(self.size);
                }
                None => {
                    if let Err(e) = self.files.segments.seal_full(self.size) {
                        tracing::warn!(error = %e, "cannot seal a full ledger segment");
                    }
                }
            }
        } else {
            self.undurable_since.get_or_insert_with(Instant::now);
        }
        let mut p = self.shared.lock_progress();
        p.published = self.published;
        p.published_size = self.size;
        p.synced = self.synced;
        drop(p);
        self.shared.progressed.notify_all();
        Ok(())
    }
}

pub(super) const SEALER_THREAD: &str = "sluice-ledger-seal";

/// Starts the thread that seals full segments once redb is synced past them (it is sent the
/// synced log size), at a lower CPU priority than the request path: sealing is compression
/// work that may wait, a decision may not. `None` (sealing then runs on the indexer) if the
/// thread cannot be started.
fn spawn_sealer(segments: Arc<Segments>) -> Option<(mpsc::Sender<u64>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<u64>();
    let spawned = std::thread::Builder::new().name(SEALER_THREAD.into()).spawn(move || {
        // Best effort: without it the sealer competes with the writer as an equal.
        if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10) {
            tracing::debug!(error = %e, "cannot lower the ledger sealer's CPU priority");
        }
        while let Ok(mut synced) = rx.recv() {
            // Only the latest size matters: sealing up to it seals everything before it too.
            while let Ok(later) = rx.try_recv() {
                synced = synced.max(later);
            }
            if let Err(e) = segments.seal_full(synced) {
                // The segment stays open (and readable); sealing is tried again after the next sync.
                tracing::warn!(error = %e, "cannot seal a full ledger segment");
            }
        }
    });
    match spawned {
        Ok(handle) => Some((tx, handle)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the ledger sealer thread; sealing runs on the indexer");
            None
        }
    }
}
