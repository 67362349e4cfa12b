//! Answers delivered on the caller's own thread, one wake per group instead of one per caller.
//!
//! Why: the writer answers a group's callers one after the other from its own thread. Each
//! answer wakes the task waiting for it, and for a task of a single-threaded tokio runtime every
//! wake from another thread is a push onto that runtime's shared queue plus a system call
//! (`write` to its eventfd), whether or not the runtime is already awake. With one record per
//! request that was one system call per request on the writer's thread, the largest share of
//! the daemon's `write` calls under load.
//!
//! [`relay_replies`] wraps the root future of such a runtime (the daemon's proxy threads). While
//! it runs, [`super::Ledger::transact`] called on that thread leaves, with its job, a route back
//! to this thread ([`Route`]). The writer then hands each durable answer to the route instead of
//! sending it: the answers queue there, and only the first of a batch wakes the runtime. The
//! runtime drains the queue when it polls the wrapped future and sends every answer from its own
//! thread, where waking a task of the same runtime is a push onto its local queue (no system
//! call).
//!
//! What must stay true: an answer is never lost or held back. An answer routed after the
//! wrapper is gone (the runtime stopped, or the wrapper was dropped) is sent directly, as
//! without a route, and dropping the wrapper sends every answer still queued. Only durable
//! answers are routed; refusals and failures are sent at once, as before. The route changes
//! which thread sends an answer, never when it may be sent: the writer routes it only after
//! its group is durable.
//!
//! Must not: spawn, assume an executor, or block the writer (the queue's lock is held only to
//! push or to take the whole batch).

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use super::writer::Finish;
use super::LedgerError;
use crate::record::Appended;

/// One durable answer on its way back: the caller's reply, and what it is answered.
type Answer = (Box<dyn Finish>, Result<Vec<Appended>, LedgerError>);

thread_local! {
    /// The route of the [`relay_replies`] running on this thread, if any.
    static CURRENT: RefCell<Option<Route>> = const { RefCell::new(None) };
}

/// A way back to one thread's [`relay_replies`], given to the writer with a job.
#[derive(Clone)]
pub(super) struct Route(Arc<Mutex<Queue>>);

#[derive(Default)]
struct Queue {
    answers: Vec<Answer>,
    /// The wrapper's task, to wake when the first answer of a batch arrives.
    waker: Option<Waker>,
    /// A wake is on its way since the last drain: later answers need none.
    woken: bool,
    /// The wrapper is gone: answers are sent directly.
    closed: bool,
}

fn lock(q: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    // A poisoned queue still holds answers that must be sent: keep using it.
    q.lock().unwrap_or_else(|p| p.into_inner())
}

impl Route {
    /// The route of the relay running on the calling thread, if one is.
    pub(super) fn current() -> Option<Route> {
        CURRENT.try_with(|c| c.borrow().clone()).ok().flatten()
    }

    /// Queues `answer` for the relay's thread, waking it if this is the first since its last
    /// drain; sends it at once if the relay is gone.
    pub(super) fn deliver(&self, finish: Box<dyn Finish>, result: Result<Vec<Appended>, LedgerError>) {
        let mut q = lock(&self.0);
        if q.closed {
            drop(q);
            finish.finish(result);
            return;
        }
        q.answers.push((finish, result));
        let wake = if q.woken {
            None
        } else {
            q.woken = true;
            q.waker.take()
        };
        drop(q);
        if let Some(w) = wake {
            w.wake();
        }
    }
}

/// Runs `fut` with the ledger's answers to transactions submitted on this thread delivered
/// here, in batches (see the module docs). Meant for the root future of a single-threaded
/// runtime, which polls it on one thread; on any other thread answers still arrive, through
/// a wake across threads as without the relay.
pub fn relay_replies<F: Future>(fut: F) -> RelayReplies<F> {
    RelayReplies { fut: Box::pin(fut), route: None, batch: Vec::new() }
}

/// The future [`relay_replies`] returns.
pub struct RelayReplies<F> {
    fut: Pin<Box<F>>,
    /// Installed on the polling thread at the first poll.
    route: Option<Route>,
    /// The drained batch's buffer, kept between drains.
    batch: Vec<Answer>,
}

impl<F: Future> Future for RelayReplies<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let route = match &this.route {
            Some(r) => r.clone(),
            None => {
                let r = Route(Arc::new(Mutex::new(Queue::default())));
                let _ = CURRENT.try_with(|c| *c.borrow_mut() = Some(r.clone()));
                this.route = Some(r.clone());
                r
            }
        };
        {
            let mut q = lock(&route.0);
            q.woken = false;
            match &q.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => q.waker = Some(cx.waker().clone()),
            }
            std::mem::swap(&mut q.answers, &mut this.batch);
        }
        for (finish, result) in this.batch.drain(..) {
            finish.finish(result);
        }
        this.fut.as_mut().poll(cx)
    }
}

impl<F> Drop for RelayReplies<F> {
    fn drop(&mut self) {
        let Some(route) = self.route.take() else { return };
        let answers = {
            let mut q = lock(&route.0);
            q.closed = true;
            q.waker = None;
            std::mem::take(&mut q.answers)
        };
        for (finish, result) in answers {
            finish.finish(result);
        }
        // Uninstalls the route if it is still this thread's (a drop on another thread, or
        // during the thread's own teardown, leaves it: a closed route sends directly).
        let _ = CURRENT.try_with(|c| {
            let mut c = c.borrow_mut();
            if c.as_ref().is_some_and(|r| Arc::ptr_eq(&r.0, &route.0)) {
                *c = None;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostkey::HostKey;
    use crate::record::{Draft, HOST_CHAIN};
    use crate::store::{Ledger, LedgerOptions, Txn, TxnError};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;
    use std::thread::ThreadId;
    use std::time::{Duration, Instant};

    /// Counts its wakes and notes the threads they came from.
    #[derive(Default)]
    struct Counting {
        wakes: AtomicUsize,
        from: Mutex<Vec<ThreadId>>,
    }

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.wakes.fetch_add(1, Ordering::SeqCst);
            lock_vec(&self.from).push(std::thread::current().id());
        }
    }

    fn lock_vec<T>(m: &Mutex<Vec<T>>) -> MutexGuard<'_, Vec<T>> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ledger(dir: &tempfile::TempDir) -> Ledger {
        let key = HostKey::from_signing_key(ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]));
        Ledger::open(&dir.path().join("ledger.redb"), key, LedgerOptions::default()).expect("open ledger")
    }

    fn event(i: usize) -> impl FnOnce(&mut Txn<'_>) -> Result<(usize, Vec<Draft>), TxnError> + Send + 'static {
        move |_| {
            let mut body = serde_json::Map::new();
            body.insert("kind".into(), "event".into());
            body.insert("event".into(), format!("e{i}").into());
            Ok((i, vec![Draft::new(HOST_CHAIN, body)]))
        }
    }

    fn poll_once<F: Future + ?Sized>(f: Pin<&mut F>, w: &Arc<Counting>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(&Waker::from(w.clone())))
    }

    /// Waits (bounded) until `cond` holds.
    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    type Pending = Pin<Box<dyn Future<Output = Result<(usize, Vec<Appended>), LedgerError>>>>;

    type Relay = Pin<Box<RelayReplies<std::future::Pending<()>>>>;

    /// A fresh ledger and a relay on this thread, polled once (so its route is installed), with
    /// the waker that counts its wakes.
    fn running_relay() -> (tempfile::TempDir, Ledger, Arc<Counting>, Relay) {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = ledger(&dir);
        let relay_waker = Arc::new(Counting::default());
        let mut relay = Box::pin(relay_replies(std::future::pending::<()>()));
        assert!(poll_once(relay.as_mut(), &relay_waker).is_pending());
        (dir, ledger, relay_waker, relay)
    }

    /// Submits `n` transactions from this thread (each polled once, with its own counting
    /// waker), while `relay` is installed.
    fn submit(ledger: &Ledger, n: usize) -> Vec<(Pending, Arc<Counting>)> {
        (0..n)
            .map(|i| {
                let l = ledger.clone();
                let mut fut: Pending = Box::pin(async move { l.transact(event(i)).await });
                let w = Arc::new(Counting::default());
                assert!(
                    poll_once(fut.as_mut(), &w).is_pending(),
                    "a transaction cannot be durable before it is submitted"
                );
                (fut, w)
            })
            .collect()
    }

    #[test]
    fn a_batch_of_answers_wakes_the_relay_once_and_each_caller_from_the_relay_thread() {
        let (_dir, ledger, relay_waker, mut relay) = running_relay();
        assert!(Route::current().is_some(), "the first poll installs the route on this thread");

        let mut callers = submit(&ledger, 8);
        // Every answer is durable and queued once the log holds all eight records.
        wait_until("eight durable records", || ledger.size() == 8);
        wait_until("the relay's wake", || relay_waker.wakes.load(Ordering::SeqCst) >= 1);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(relay_waker.wakes.load(Ordering::SeqCst), 1, "one wake for the whole batch, not one per answer");
        assert_ne!(lock_vec(&relay_waker.from)[0], std::thread::current().id(), "the writer woke the relay");
        for (_, w) in &callers {
            assert_eq!(w.wakes.load(Ordering::SeqCst), 0, "no caller is answered before the relay runs");
        }

        assert!(poll_once(relay.as_mut(), &relay_waker).is_pending());
        let here = std::thread::current().id();
        for (i, (fut, w)) in callers.iter_mut().enumerate() {
            assert_eq!(w.wakes.load(Ordering::SeqCst), 1, "caller {i} is woken once");
            assert_eq!(lock_vec(&w.from)[0], here, "caller {i} is woken from the relay's own thread");
            match poll_once(fut.as_mut(), w) {
                Poll::Ready(Ok((value, appended))) => {
                    assert_eq!(value, i);
                    assert_eq!(appended.len(), 1);
                }
                other => panic!("caller {i}: {:?}", other.map(|r| r.map(|(v, _)| v))),
            }
        }
        // The next batch wakes the relay again.
        let mut more = submit(&ledger, 2);
        wait_until("a second wake", || relay_waker.wakes.load(Ordering::SeqCst) == 2);
        assert!(poll_once(relay.as_mut(), &relay_waker).is_pending());
        for (fut, w) in &mut more {
            assert!(matches!(poll_once(fut.as_mut(), w), Poll::Ready(Ok(_))));
        }
    }

    #[test]
    fn dropping_the_relay_sends_what_it_held_and_later_answers_go_directly() {
        let (_dir, ledger, relay_waker, relay) = running_relay();
        let mut queued = submit(&ledger, 3);
        wait_until("three durable records", || ledger.size() == 3);
        wait_until("the relay's wake", || relay_waker.wakes.load(Ordering::SeqCst) == 1);
        drop(relay);
        assert!(Route::current().is_none(), "dropping the relay uninstalls its route");
        for (fut, w) in &mut queued {
            assert_eq!(w.wakes.load(Ordering::SeqCst), 1, "a held answer is sent when the relay goes");
            assert!(matches!(poll_once(fut.as_mut(), w), Poll::Ready(Ok(_))));
        }
        // Without a relay, the writer answers directly.
        let mut direct = submit(&ledger, 1);
        let (fut, w) = &mut direct[0];
        wait_until("a direct answer", || w.wakes.load(Ordering::SeqCst) == 1);
        assert_ne!(lock_vec(&w.from)[0], std::thread::current().id(), "answered from the writer");
        assert!(matches!(poll_once(fut.as_mut(), w), Poll::Ready(Ok(_))));
    }

    #[test]
    fn an_answer_routed_to_a_closed_relay_is_sent_directly() {
        let (_dir, ledger, relay_waker, relay) = running_relay();
        // Submitted while the relay runs (the job carries its route), answered after it is gone.
        let blocker = ledger.clone();
        let gate = Arc::new(std::sync::Barrier::new(2));
        let g = gate.clone();
        let mut slow: Pending = Box::pin(async move {
            blocker
                .transact(move |_| {
                    g.wait();
                    Ok((0usize, Vec::new()))
                })
                .await
        });
        let w = Arc::new(Counting::default());
        assert!(poll_once(slow.as_mut(), &w).is_pending());
        drop(relay);
        gate.wait();
        wait_until("the answer", || w.wakes.load(Ordering::SeqCst) == 1);
        assert_ne!(lock_vec(&w.from)[0], std::thread::current().id(), "sent by the writer, not held");
        assert!(matches!(poll_once(slow.as_mut(), &w), Poll::Ready(Ok((0, _)))));
        assert_eq!(relay_waker.wakes.load(Ordering::SeqCst), 0, "the closed relay was not woken");
    }

    #[test]
    fn refusals_are_not_held_by_the_relay() {
        let (_dir, ledger, relay_waker, _relay) = running_relay();
        let l = ledger.clone();
        let mut refused: Pending =
            Box::pin(async move { l.transact(|_| Err::<(usize, Vec<Draft>), _>(TxnError::abort("no"))).await });
        let w = Arc::new(Counting::default());
        assert!(poll_once(refused.as_mut(), &w).is_pending());
        wait_until("the refusal", || w.wakes.load(Ordering::SeqCst) == 1);
        assert!(matches!(poll_once(refused.as_mut(), &w), Poll::Ready(Err(LedgerError::Txn(_)))));
        assert_eq!(relay_waker.wakes.load(Ordering::SeqCst), 0, "a refusal does not go through the relay");
    }

    #[test]
    fn the_wrapped_future_runs_to_its_output() {
        let out = crate::sync::block_on(relay_replies(async { 41 + 1 }));
        assert_eq!(out, 42);
        assert!(Route::current().is_none(), "the finished relay left no route behind");
    }
}
