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
//! write delays every other task of it: a server serves each request through
//! [`RequestInProgress::serve`], which counts the requests in progress on each thread, and a
//! transaction leads only when it is made while that request is being polled (not by another
//! task of the thread, such as a settlement spawned after a response) and that request is the
//! only one in progress on its thread. Threads that never count (a multi-threaded runtime, the
//! CLI, tests) never lead. Under load a thread always has other requests in progress, so their
//! transactions queue for the writer thread as before, where groups form.
//!
//! What must stay true: a led group is the writer's own `run_group` under the writer's lock, so
//! it is serial with every other group, durable before it is answered, and fails (and poisons
//! the store) exactly as on the writer thread. A transaction leads only when no job is queued,
//! so it never overtakes one submitted before it. A led group that leaves the log without a
//! checkpoint tells the writer thread, whose checkpoint timer would otherwise not be armed.
//!
//! Must not: lead from inside a group (a closure that somehow made a transaction of its own).

use std::cell::Cell;
use std::future::Future;
use std::thread::ThreadId;

thread_local! {
    /// Requests in progress on this thread (see [`RequestInProgress`]).
    static IN_PROGRESS: Cell<usize> = const { Cell::new(0) };
    /// A [`RequestInProgress`] is polling its request on the thread that counts it.
    static POLLING: Cell<bool> = const { Cell::new(false) };
    /// This thread is running a group as the writer.
    static LEADING: Cell<bool> = const { Cell::new(false) };
}

/// One request a server is serving, counted on its thread while it is in progress.
///
/// A server that runs one single-threaded runtime per thread serves each request through
/// [`RequestInProgress::serve`]; a transaction made while that polls the request, with no other
/// request in progress on the thread, may commit its group on that thread rather than hand it
/// to the writer thread (see the module docs).
#[derive(Debug)]
pub struct RequestInProgress {
    /// The thread that counts it. Dropped on another one (a multi-threaded runtime moved the
    /// task), it leaves that thread counting one request too many, so that thread no longer
    /// leads (never the reverse).
    thread: ThreadId,
}

impl RequestInProgress {
    /// Runs `request`, counted as in progress on this thread until it ends or is dropped, and
    /// marked as the request being polled while it is.
    pub async fn serve<F: Future>(request: F) -> F::Output {
        let counted = RequestInProgress::enter();
        let mut request = std::pin::pin!(request);
        std::future::poll_fn(|cx| {
            let _polling = Polling::start(counted.thread == std::thread::current().id());
            request.as_mut().poll(cx)
        })
        .await
    }

    fn enter() -> RequestInProgress {
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

/// Marks, while alive, whether a counted request is being polled on the thread that counts it,
/// restoring the mark it found.
struct Polling {
    outer: bool,
}

impl Polling {
    fn start(own_thread: bool) -> Polling {
        Polling { outer: POLLING.with(|p| p.replace(own_thread)) }
    }
}

impl Drop for Polling {
    fn drop(&mut self) {
        POLLING.with(|p| p.set(self.outer));
    }
}

/// The calling code runs inside the poll of the only request in progress on this thread, and
/// is not already running a group.
pub(super) fn may_lead() -> bool {
    POLLING.with(Cell::get) && IN_PROGRESS.with(Cell::get) == 1 && !LEADING.with(Cell::get)
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
    use crate::sync::block_on;
    use std::future::poll_fn;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    /// A request that waits once (its upstream, say) before it ends; `check` runs when it is
    /// polled the second time.
    fn waits_once(check: impl FnOnce() + Send + 'static) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(RequestInProgress::serve(async move {
            let mut first = true;
            poll_fn(|_| if std::mem::take(&mut first) { Poll::Pending } else { Poll::Ready(()) }).await;
            check();
        }))
    }

    fn poll_once(f: &mut Pin<Box<dyn Future<Output = ()> + Send>>) -> Poll<()> {
        f.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn only_the_request_polled_alone_on_its_thread_may_lead() {
        assert!(!may_lead(), "a thread that counts nothing never leads");
        block_on(RequestInProgress::serve(async {
            assert!(may_lead(), "polled, and the only request in progress");
            assert_eq!(RequestInProgress::on_this_thread(), 1);
            {
                let _l = Leading::start();
                assert!(!may_lead(), "a thread already leading does not lead again");
            }
            let other = RequestInProgress::enter();
            assert!(!may_lead(), "another request in progress on the thread");
            drop(other);
            assert!(may_lead());
        }));
        assert_eq!(RequestInProgress::on_this_thread(), 0, "counted only while in progress");
        assert!(!may_lead(), "outside the request's poll");
    }

    #[test]
    fn other_work_of_the_thread_never_leads_while_a_request_is_in_progress() {
        let mut request = waits_once(|| assert!(may_lead()));
        assert!(poll_once(&mut request).is_pending());
        assert_eq!(RequestInProgress::on_this_thread(), 1);
        // Other work of the thread (a settlement task) running while the request waits.
        assert!(!may_lead(), "not the request's own poll");
        assert!(poll_once(&mut request).is_ready());
        drop(request);
        assert_eq!(RequestInProgress::on_this_thread(), 0);
    }

    #[test]
    fn a_request_moved_to_another_thread_leads_nowhere() {
        // Polled again on a thread that does not count it: no lead there.
        let mut request = waits_once(|| assert!(!may_lead()));
        assert!(poll_once(&mut request).is_pending());
        std::thread::spawn(move || {
            assert!(poll_once(&mut request).is_ready());
            drop(request);
            assert_eq!(RequestInProgress::on_this_thread(), 0, "the other thread's count is not touched");
        })
        .join()
        .unwrap();
        assert_eq!(RequestInProgress::on_this_thread(), 1, "the stale count stays");
        block_on(RequestInProgress::serve(async {
            assert!(!may_lead(), "the stale count errs on the side of not leading");
        }));
    }
}
