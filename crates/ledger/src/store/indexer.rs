//! The indexer thread: writes answered groups into redb, in batches, off the request path.
//!
//! The writer hands it every group once the group is durable in the journal (and answered). The
//! indexer applies whatever has queued up into one redb write transaction, kept open across
//! batches, and commits it without a sync when a reader asks ([`IndexJob::Publish`]) or every
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
    /// An answered group, durable in the journal.
    Group { gseq: u64, fx: GroupEffects },
    /// A group the journal does not hold: apply it and sync redb before replying (its callers
    /// are answered only after the reply).
    Durable { gseq: u64, fx: GroupEffects, reply: SyncReply },
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
    /// Since when redb holds published groups that are not synced.
    pub(super) undurable_since: Option<Instant>,
    pub(super) failed: Option<StorageError>,
}

/// Most jobs taken into one batch.
const MAX_BATCH: usize = 4096;

impl Indexer {
    pub(super) fn run(mut self) {
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
            if self.batch(jobs) {
                break;
            }
        }
        // Whatever is still open was never synced; the journal holds it.
        self.open = None;
        let mut p = self.shared.lock_progress();
        p.closed = true;
        drop(p);
        self.shared.progressed.notify_all();
    }

    /// Runs one batch. Returns true when the indexer must exit.
    fn batch(&mut self, jobs: Vec<IndexJob>) -> bool {
        let mut groups: Vec<(u64, GroupEffects)> = Vec::new();
        let mut replies: Vec<SyncReply> = Vec::new();
        let (mut publish, mut sync, mut shutdown) = (false, false, false);
        for job in jobs {
            match job {
                IndexJob::Group { gseq, fx } => groups.push((gseq, fx)),
                IndexJob::Durable { gseq, fx, reply } => {
                    groups.push((gseq, fx));
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
        for r in replies {
            let _ = r.send(answer.clone());
        }
        shutdown
    }

    fn fail(&mut self, e: StorageError) {
        tracing::error!(error = %e, "ledger index write failed; refusing every transaction until restart (the restart replays answered groups from the journal)");
        self.open = None;
        self.failed = Some(e.clone());
        let mut p = self.shared.lock_progress();
        p.failed = Some(e);
        drop(p);
        self.shared.progressed.notify_all();
    }

    /// Applies groups into the open transaction (opening one if needed).
    fn apply(&mut self, groups: &[(u64, GroupEffects)]) -> Result<(), StorageError> {
        if groups.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let (wtxn, since) = match self.open.take() {
            Some(open) => open,
            None => (self.db.begin_write().map_err(se(&path, "begin index write"))?, Instant::now()),
        };
        {
            let mut t = Tables::open(&wtxn, &path)?;
            for (gseq, fx) in groups {
                self.size = match t.apply_group(*gseq, fx, self.size, &self.files, &path) {
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
            // Written again so that an otherwise empty transaction is a real commit.
            let mut meta = wtxn.open_table(META).map_err(se(&path, "open meta"))?;
            meta.insert(META_GSEQ, self.gseq).map_err(se(&path, "write journal seq"))?;
            let open_len = self.files.segments.open_len(self.size);
            meta.insert(META_OPEN_LEN, open_len).map_err(se(&path, "write segment length"))?;
            if clean {
                meta.insert(META_CLEAN, 1).map_err(se(&path, "write clean flag"))?;
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
            if let Err(e) = self.files.segments.seal_full(self.size) {
                // The segment stays open (and readable); sealing is tried again at the next sync.
                tracing::warn!(error = %e, "cannot seal a full ledger segment");
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
