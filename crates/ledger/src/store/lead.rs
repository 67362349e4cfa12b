//! A caller alone on its thread commits its own group, instead of handing it to the writer
//! thread and waiting to be woken.
//!
//! Why: one request at a time pays every hand-off on its path. Handing a transaction to the
//! writer thread wakes that thread, and its durable answer wakes the caller's thread back; on a
//! virtual machine whose idle CPUs halt, each of those wake-ups is an exit to the hypervisor and
//! tens of µs before the woken thread runs (measured at about 78 µs for the pair, of a request's
//! 350 µs added latency at one connection). When the writer has nothing queued and is not running
//! a group, and the calling thread has nothing else to do, the caller can take the writer's role
//! for one group: run its own transaction, seal, write the journal entry durably and answer
//! itself, with no thread woken. This is group commit with a leader, as databases do it.
//!
//! What "nothing else to do" means is the caller's to say, since blocking its thread for a disk
//! write delays every other task of it: a server counts the requests in progress on each of its
//! threads with [`RequestInProgress`], and a transaction leads only when the request making it is
//! the only one in progress on its thread. Threads that never count (a multi-threaded runtime,
//! the CLI, tests) never lead. Under load a thread always has other requests in progress, so
//! their transactions queue for the writer thread as before, where groups form.
//!
//! What must stay true: a led group is the writer's own `run_group` under the writer's lock, so
//! it is serial with every other group, durable before it is answered, and fails (and poisons
//! the store) exactly as on the writer thread. A transaction leads only when no job is queued,
//! so it never overtakes one submitted before it. A led group that leaves the log without a
//! checkpoint tells the writer thread, whose checkpoint timer would otherwise not be armed.
//!
//! Must not: lead from a thread that is already leading (the store's handle is never dropped and
//! joined from inside a group: see [`leading`]).

use std::cell::Cell;
use std::thread::ThreadId;

thread_local! {
    /// Requests in progress on this thread (see [`RequestInProgress`]).
    static IN_PROGRESS: Cell<usize> = const { Cell::new(0) };
    /// This thread is running a group as the writer.
    static LEADING: Cell<bool> = const { Cell::new(false) };
}

/// Counts one request in progress on the thread that made it, for as long as it lives.
///
/// A server that runs one single-threaded runtime per thread holds one for each request it
/// serves; a transaction made while its thread counts exactly one may commit its group on that
/// thread rather than hand it to the writer thread (see the module docs). It is `Send` so that
/// it can be held across `.await`; dropped on another thread than the one that made it, it
/// leaves that thread counting one request too many, so that thread no longer leads (never the
/// reverse).
#[derive(Debug)]
#[must_use = "the request counts only while the guard lives"]
pub struct RequestInProgress {
    thread: ThreadId,
}

impl RequestInProgress {
    pub fn enter() -> RequestInProgress {
        IN_PROGRESS.with(|c| c.set(c.get().saturating_add(1)));
        RequestInProgress { thread: std::thread::current().id() }
    }

    /// Requests in progress on the calling thread.
    pub fn on_this_thread() -> usize {
        IN_PROGRESS.with(Cell::get)
    }
}

impl Drop for RequestInProgress {
    fn drop(&mut self) {
        if std::thread::current().id() == self.thread {
            IN_PROGRESS.with(|c| c.set(c.get().saturating_sub(1)));
        }
    }
}

/// The calling thread has one request in progress, and is not already running a group.
pub(super) fn may_lead() -> bool {
    IN_PROGRESS.with(Cell::get) == 1 && !leading()
}

/// The calling thread is running a group as the writer. The store's handle, dropped for the
/// last time by a closure of that group, must not wait for the writer thread, which may be
/// waiting for this group's lock.
pub(super) fn leading() -> bool {
    LEADING.with(Cell::get)
}

/// Marks the calling thread as running a group until dropped.
pub(super) struct Leading(());

impl Leading {
    pub(super) fn start() -> Leading {
        LEADING.with(|c| c.set(true));
        Leading(())
    }
}

impl Drop for Leading {
    fn drop(&mut self) {
        LEADING.with(|c| c.set(false));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_thread_with_one_request_in_progress_may_lead() {
        assert!(!may_lead(), "a thread that counts nothing never leads");
        let a = RequestInProgress::enter();
        assert!(may_lead());
        let b = RequestInProgress::enter();
        assert!(!may_lead(), "two requests in progress: the thread has other work");
        drop(b);
        assert!(may_lead());
        {
            let _l = Leading::start();
            assert!(!may_lead(), "a thread already leading does not lead again");
        }
        assert!(may_lead());
        drop(a);
        assert_eq!(RequestInProgress::on_this_thread(), 0);
    }

    #[test]
    fn a_guard_dropped_on_another_thread_leaves_its_own_thread_unable_to_lead() {
        let g = RequestInProgress::enter();
        std::thread::spawn(move || {
            drop(g);
            assert_eq!(RequestInProgress::on_this_thread(), 0, "the other thread's count is not touched");
        })
        .join()
        .unwrap();
        assert_eq!(RequestInProgress::on_this_thread(), 1);
        let again = RequestInProgress::enter();
        assert!(!may_lead(), "the stale count errs on the side of not leading");
        drop(again);
    }
}
