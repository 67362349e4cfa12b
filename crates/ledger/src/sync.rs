//! The two waiting primitives the ledger's async API needs, without tying the crate to an async
//! runtime, both from well-kept crates rather than written here:
//! - the reply channel of every job is [`futures_channel::oneshot`] (executor-agnostic); a
//!   synchronous caller waits on it with [`futures_executor::block_on`];
//! - the writer's queue is bounded by [`Permits`], an [`async_lock::Semaphore`] (smol-rs) plus
//!   a closed flag, so that a stopped ledger fails every waiting and later acquire instead of
//!   leaving callers parked.
//!
//! Why a semaphore and not a bounded channel as the queue: the writer also takes control jobs
//! (publish, checkpoint, shutdown) that must never wait behind a full queue, and
//! `transact_blocking` (CLI, tests) deliberately bypasses the bound; a semaphore bounds only
//! the async transactions and leaves the writer's own `std::sync::mpsc` queue unchanged.
//!
//! Ordering: the semaphore is not fair (the hand-written one this replaced was). A waiter woken
//! for a released permit can lose it to another acquirer and wait again, so permits are not
//! granted in arrival order. The bound holds either way, and the ledger does not rely on the
//! order: transactions run in the order the writer receives them, not the order permits are
//! granted. Under a sustained full queue one caller can wait longer than others; callers that
//! need a deadline put a timeout around `transact`.
//!
//! Must not: spawn threads or tasks, or assume an executor. The futures here only register
//! wakers; whoever polls them (tokio in the daemon, [`block_on`] in the CLI) drives them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_lock::{Semaphore, SemaphoreGuardArc};
pub(crate) use futures_channel::oneshot;
pub(crate) use futures_executor::block_on;

/// The semaphore was closed: no permit will ever be handed out again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

/// A permit; returned to its semaphore on drop.
pub(crate) type Permit = SemaphoreGuardArc;

/// A counting semaphore whose permits are owned values, and which can be closed.
pub(crate) struct Permits {
    semaphore: Arc<Semaphore>,
    closed: AtomicBool,
}

impl Permits {
    pub(crate) fn new(permits: usize) -> Permits {
        Permits { semaphore: Arc::new(Semaphore::new(permits)), closed: AtomicBool::new(false) }
    }

    /// Waits for a permit; fails with [`Closed`] once [`Permits::close`] was called, also for
    /// a caller that was already waiting.
    pub(crate) async fn acquire(&self) -> Result<Permit, Closed> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Closed);
        }
        let permit = self.semaphore.acquire_arc().await;
        if self.closed.load(Ordering::Acquire) {
            // Dropping the permit returns it and wakes the next waiter, which then fails here
            // too: one extra permit from `close` is passed down the whole queue.
            drop(permit);
            return Err(Closed);
        }
        Ok(permit)
    }

    /// Fails every waiting and future acquire; permits already handed out stay valid.
    pub(crate) fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            // Wakes the first waiter even when every permit is held; see `acquire`.
            self.semaphore.add_permits(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    fn pending_once<F: Future>(f: std::pin::Pin<&mut F>) -> bool {
        f.poll(&mut Context::from_waker(Waker::noop())).is_pending()
    }

    #[test]
    fn the_bound_holds_and_released_permits_come_back() {
        let p = Permits::new(2);
        let a = block_on(p.acquire()).unwrap();
        let _b = block_on(p.acquire()).unwrap();
        let mut third = pin!(p.acquire());
        assert!(pending_once(third.as_mut()), "a third acquire must wait while two are held");
        drop(a);
        assert!(matches!(third.as_mut().poll(&mut Context::from_waker(Waker::noop())), Poll::Ready(Ok(_))));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_contention_the_bound_holds_and_every_waiter_is_served() {
        use std::sync::atomic::AtomicUsize;
        const BOUND: usize = 3;
        let p = Arc::new(Permits::new(BOUND));
        let (inside, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let (p, inside, most) = (p.clone(), inside.clone(), most.clone());
                tokio::spawn(async move {
                    for _ in 0..20 {
                        let permit = p.acquire().await.unwrap();
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        inside.fetch_sub(1, Ordering::SeqCst);
                        drop(permit);
                    }
                })
            })
            .collect();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(20), t).await.expect("a waiter was stranded").unwrap();
        }
        assert!(most.load(Ordering::SeqCst) <= BOUND, "more holders than permits");
        assert_eq!(p.semaphore.available_permits(), BOUND, "every permit came back");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiter_that_gives_up_does_not_strand_the_next() {
        let p = Arc::new(Permits::new(1));
        let held = p.acquire().await.unwrap();
        let first = tokio::spawn({
            let p = p.clone();
            async move { p.acquire().await.map(drop) }
        });
        let second = tokio::spawn({
            let p = p.clone();
            async move { p.acquire().await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        first.abort();
        drop(held);
        let got = tokio::time::timeout(Duration::from_secs(5), second).await;
        assert!(matches!(got, Ok(Ok(Ok(())))), "the next waiter gets the permit: {got:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_fails_every_waiter_and_later_acquires() {
        let p = Arc::new(Permits::new(2));
        let held = vec![p.acquire().await.unwrap(), p.acquire().await.unwrap()];
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let p = p.clone();
                tokio::spawn(async move { p.acquire().await.map(drop) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        p.close();
        for w in waiters {
            let got = tokio::time::timeout(Duration::from_secs(5), w).await;
            assert!(matches!(got, Ok(Ok(Err(Closed)))), "a waiter must fail, not hang: {got:?}");
        }
        assert_eq!(p.acquire().await.err(), Some(Closed));
        // Permits handed out before the close stay valid and can still be returned.
        drop(held);
        assert_eq!(p.acquire().await.err(), Some(Closed));
    }

    #[test]
    fn block_on_waits_for_a_reply_from_another_thread() {
        let (tx, rx) = oneshot::channel::<u32>();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let _ = tx.send(7);
        });
        assert_eq!(block_on(rx), Ok(7));
        t.join().unwrap();
        let (tx, rx) = oneshot::channel::<u32>();
        drop(tx);
        assert!(block_on(rx).is_err(), "a dropped sender is an error, not a hang");
    }
}
