//! The two waiting primitives the ledger's async API needs, without tying the crate to an async
//! runtime: a one-shot reply channel ([`futures_channel::oneshot`], executor-agnostic) with a
//! blocking receive for synchronous callers, and a fair counting semaphore ([`Permits`]) that
//! bounds the writer's queue and can be closed.
//!
//! Must not: spawn threads or tasks, or assume an executor. The futures here only register
//! wakers; whoever polls them (tokio in the daemon, [`block_on`] in the CLI) drives them.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;

pub(crate) use futures_channel::oneshot;

/// Runs `future` to completion on the current thread, parking it between polls. For
/// synchronous callers only: inside an async task it would block that task's worker thread.
pub(crate) fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        if let Poll::Ready(v) = future.as_mut().poll(&mut cx) {
            return v;
        }
        // A wake between the poll and here leaves the token set: park returns at once.
        std::thread::park();
    }
}

/// The semaphore was closed: no permit will ever be handed out again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

/// A fair (first come, first served) counting semaphore whose permits are owned values.
pub(crate) struct Permits {
    state: Mutex<State>,
}

struct State {
    available: usize,
    closed: bool,
    next_ticket: u64,
    /// Waiting acquirers in arrival order; only the front one may take a permit.
    waiters: VecDeque<(u64, Waker)>,
}

impl Permits {
    pub(crate) fn new(permits: usize) -> Permits {
        Permits {
            state: Mutex::new(State { available: permits, closed: false, next_ticket: 0, waiters: VecDeque::new() }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock; a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a permit (resolves with [`Closed`] once [`Permits::close`] was called).
    pub(crate) fn acquire_owned(self: Arc<Self>) -> Acquire {
        Acquire { permits: self, ticket: None }
    }

    /// Fails every waiting and future acquire; permits already handed out stay valid.
    pub(crate) fn close(&self) {
        let waiters = {
            let mut s = self.lock();
            s.closed = true;
            std::mem::take(&mut s.waiters)
        };
        for (_, w) in waiters {
            w.wake();
        }
    }

    #[cfg(test)]
    fn available(&self) -> usize {
        self.lock().available
    }
}

impl State {
    /// The front waiter's waker, if a permit is free for it.
    fn next_to_wake(&self) -> Option<Waker> {
        if self.available > 0 {
            self.waiters.front().map(|(_, w)| w.clone())
        } else {
            None
        }
    }
}

/// A permit; returned to its semaphore on drop.
pub(crate) struct Permit {
    permits: Arc<Permits>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let wake = {
            let mut s = self.permits.lock();
            s.available = s.available.saturating_add(1);
            s.next_to_wake()
        };
        if let Some(w) = wake {
            w.wake();
        }
    }
}

/// The future of [`Permits::acquire_owned`]. Dropping it gives up its place in the queue.
pub(crate) struct Acquire {
    permits: Arc<Permits>,
    /// Set once queued.
    ticket: Option<u64>,
}

impl Future for Acquire {
    type Output = Result<Permit, Closed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut wake = None;
        let out = {
            let mut s = this.permits.lock();
            if s.closed {
                this.ticket = None;
                Poll::Ready(Err(Closed))
            } else {
                let front = s.waiters.front().map(|(t, _)| *t);
                let my_turn = front.is_none() || front == this.ticket;
                if s.available > 0 && my_turn {
                    s.available -= 1;
                    if this.ticket.take().is_some() {
                        s.waiters.pop_front();
                    }
                    // Permits left over go on to the next in line.
                    wake = s.next_to_wake();
                    Poll::Ready(Ok(Permit { permits: this.permits.clone() }))
                } else {
                    match this.ticket {
                        Some(t) => {
                            if let Some(entry) = s.waiters.iter_mut().find(|(x, _)| *x == t) {
                                entry.1.clone_from(cx.waker());
                            }
                        }
                        None => {
                            let t = s.next_ticket;
                            s.next_ticket = s.next_ticket.wrapping_add(1);
                            s.waiters.push_back((t, cx.waker().clone()));
                            this.ticket = Some(t);
                        }
                    }
                    Poll::Pending
                }
            }
        };
        if let Some(w) = wake {
            w.wake();
        }
        out
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        let Some(t) = self.ticket else { return };
        let wake = {
            let mut s = self.permits.lock();
            s.waiters.retain(|(x, _)| *x != t);
            // If this waiter was woken for a free permit, the permit passes to the next one.
            s.next_to_wake()
        };
        if let Some(w) = wake {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(f: &mut Acquire, waker: &Waker) -> Poll<Result<Permit, Closed>> {
        Pin::new(f).poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn permits_are_counted_and_returned() {
        let p = Arc::new(Permits::new(2));
        let a = block_on(p.clone().acquire_owned()).unwrap();
        let b = block_on(p.clone().acquire_owned()).unwrap();
        assert_eq!(p.available(), 0);
        drop(a);
        assert_eq!(p.available(), 1);
        drop(b);
        assert_eq!(p.available(), 2);
    }

    #[test]
    fn waiters_are_served_in_arrival_order_and_woken() {
        let p = Arc::new(Permits::new(1));
        let held = block_on(p.clone().acquire_owned()).unwrap();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut first = p.clone().acquire_owned();
        let mut second = p.clone().acquire_owned();
        assert!(poll(&mut first, &waker).is_pending());
        assert!(poll(&mut second, &waker).is_pending());
        drop(held);
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the front waiter is woken");
        // The second in line may not jump the queue.
        assert!(poll(&mut second, &waker).is_pending());
        let got = poll(&mut first, &waker);
        assert!(matches!(got, Poll::Ready(Ok(_))));
        drop(got);
        assert!(matches!(poll(&mut second, &waker), Poll::Ready(Ok(_))));
    }

    #[test]
    fn a_dropped_waiter_passes_its_turn_on() {
        let p = Arc::new(Permits::new(1));
        let held = block_on(p.clone().acquire_owned()).unwrap();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut first = p.clone().acquire_owned();
        let mut second = p.clone().acquire_owned();
        assert!(poll(&mut first, &waker).is_pending());
        assert!(poll(&mut second, &waker).is_pending());
        drop(held);
        drop(first);
        assert_eq!(count.0.load(Ordering::SeqCst), 2, "the next waiter is woken when the first gives up");
        assert!(matches!(poll(&mut second, &waker), Poll::Ready(Ok(_))));
    }

    #[test]
    fn close_fails_waiters_and_later_acquires() {
        let p = Arc::new(Permits::new(1));
        let held = block_on(p.clone().acquire_owned()).unwrap();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut waiting = p.clone().acquire_owned();
        assert!(poll(&mut waiting, &waker).is_pending());
        p.close();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(matches!(poll(&mut waiting, &waker), Poll::Ready(Err(Closed))));
        assert!(matches!(block_on(p.clone().acquire_owned()), Err(Closed)));
        drop(held);
    }

    #[test]
    fn block_on_waits_for_a_reply_from_another_thread() {
        let (tx, rx) = oneshot::channel::<u32>();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let _ = tx.send(7);
        });
        assert_eq!(block_on(rx), Ok(7));
        t.join().unwrap();
        let (tx, rx) = oneshot::channel::<u32>();
        drop(tx);
        assert!(block_on(rx).is_err(), "a dropped sender is an error, not a hang");
    }
}
