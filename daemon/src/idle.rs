//! When an HTTP connection (an agent's at the proxy, a client's at a gate) has no request in
//! progress.
//!
//! A connection that sends no request holds one of the server's connection slots for as long as
//! the peer likes: one that stops after the TLS handshake, an HTTP/1.1 head trickled byte by
//! byte (slowloris) or never finished, an idle keep-alive connection, an HTTP/2 connection that
//! stops after the preface or in the middle of a header block (HEADERS without END_HEADERS, then
//! silence). [`Activity`] counts the requests in progress on a connection, from the moment hyper
//! hands one to the service until its response body has ended or been dropped (a held request
//! waiting for an operator is in progress, and so is a slow upload), and [`Activity::idle_for`]
//! resolves once there has been none for the given time; the caller then closes the connection
//! (HTTP/1.1: at once; HTTP/2: `GOAWAY`, and after [`CLOSE_GRACE`] the socket). One timer per
//! connection, re-armed only when it fires, so a request costs no timer of its own.

use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

/// How long a connection closed for idleness has to finish its GOAWAY exchange (a request that
/// raced the GOAWAY has this long too).
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Requests in progress on one connection, and since when there has been none.
#[derive(Debug)]
pub(crate) struct Activity {
    in_progress: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity { in_progress: AtomicUsize::new(0), idle_since: Mutex::new(Instant::now()) })
    }

    /// A request starts; it is in progress until the returned guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> InProgress {
        self.in_progress.fetch_add(1, Ordering::SeqCst);
        InProgress(self.clone())
    }

    /// `Some(since)` when no request is in progress.
    fn idle_since(&self) -> Option<Instant> {
        let since = *self.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        (self.in_progress.load(Ordering::SeqCst) == 0).then_some(since)
    }

    /// Resolves once no request has been in progress for `timeout` (checked again after every
    /// wait, so a request that came and went meanwhile restarts the count).
    pub(crate) async fn idle_for(&self, timeout: Duration) {
        loop {
            let wait = match self.idle_since() {
                Some(since) => {
                    let left = (since + timeout).saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return;
                    }
                    left
                }
                None => timeout,
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// Drives a served connection until it ends, or until `activity` has had no request in progress
/// for `timeout`; then `shutdown` asks hyper to close it gracefully (HTTP/1.1: at once, a partial
/// head dropped; HTTP/2: a GOAWAY), and a peer that does not let it finish within
/// [`CLOSE_GRACE`] (one that ignores the GOAWAY and its PING, say) is dropped.
///
/// When `draining` resolves (the server is stopping), `shutdown` too, and the connection is
/// driven on while it finishes the requests in progress (HTTP/1.1: the one being answered;
/// HTTP/2: the streams open before the GOAWAY), as long as the server's drain lasts, and at most
/// [`CLOSE_GRACE`] once none is left.
pub(crate) async fn serve_until_idle<C, E>(
    mut conn: Pin<&mut C>,
    activity: &Activity,
    timeout: Duration,
    client: std::net::SocketAddr,
    draining: impl std::future::Future<Output = ()>,
    shutdown: fn(Pin<&mut C>),
) -> Result<(), E>
where
    C: std::future::Future<Output = Result<(), E>>,
{
    tokio::select! {
        r = conn.as_mut() => r,
        _ = activity.idle_for(timeout) => {
            tracing::debug!(%client, "agent connection without a request in progress; closing");
            shutdown(conn.as_mut());
            tokio::time::timeout(CLOSE_GRACE, conn).await.unwrap_or(Ok(()))
        }
        _ = draining => {
            tracing::debug!(%client, "stopping; closing the connection once its requests are answered");
            shutdown(conn.as_mut());
            // A peer that does not let it finish once nothing is in progress (an HTTP/2 client
            // that ignores the GOAWAY and its PING) is dropped after the grace.
            tokio::select! {
                r = conn.as_mut() => r,
                _ = activity.idle_for(CLOSE_GRACE) => Ok(()),
            }
        }
    }
}

/// One request in progress (see [`Activity::begin`]).
#[derive(Debug)]
pub(crate) struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        // Set the time first: a watcher that sees the count at zero must see this request's end.
        let mut since = self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        *since = Instant::now();
        self.0.in_progress.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request in progress until it has ended or is dropped.
pub(crate) struct Tracked<B> {
    inner: B,
    _request: InProgress,
}

impl<B> Tracked<B> {
    pub(crate) fn new(inner: B, request: InProgress) -> Tracked<B> {
        Tracked { inner, _request: request }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    /// Short real-time timeouts: lower bounds are exact, upper bounds get generous slack.
    const T: Duration = Duration::from_millis(200);
    const SLACK: Duration = Duration::from_secs(2);

    async fn resolves_within(a: &Activity, within: Duration) -> bool {
        tokio::time::timeout(within, a.idle_for(T)).await.is_ok()
    }

    #[tokio::test]
    async fn a_connection_without_requests_is_idle_after_the_timeout() {
        let a = Activity::new();
        let start = Instant::now();
        a.idle_for(T).await;
        let took = start.elapsed();
        assert!(took >= T && took < T + SLACK, "{took:?}");
    }

    #[tokio::test]
    async fn a_request_in_progress_is_never_idle_and_its_end_restarts_the_count() {
        let a = Activity::new();
        let r = a.begin();
        assert!(!resolves_within(&a, T * 3).await, "idle while a request (a hold, say) is in progress");
        drop(r);
        let start = Instant::now();
        a.idle_for(T).await;
        let took = start.elapsed();
        assert!(took >= T - Duration::from_millis(5) && took < T + SLACK, "{took:?}");
    }

    #[tokio::test]
    async fn a_request_that_came_and_went_during_the_wait_restarts_it() {
        let a = Activity::new();
        let start = Instant::now();
        let watcher = {
            let a = a.clone();
            tokio::spawn(async move {
                a.idle_for(T).await;
                Instant::now()
            })
        };
        tokio::time::sleep(T / 2).await;
        let ended = {
            let _r = a.begin();
            Instant::now()
        };
        let idle_at = watcher.await.unwrap();
        assert!(idle_at >= ended + T, "idle {:?} after the request ended", idle_at - ended);
        assert!(idle_at < start + T * 2 + SLACK);
    }

    #[tokio::test]
    async fn the_response_body_keeps_the_request_in_progress_until_it_ends() {
        let a = Activity::new();
        let body = Tracked::new(Full::new(Bytes::from_static(b"answer")), a.begin());
        assert!(!resolves_within(&a, T * 3).await, "idle while the response body is unsent");
        assert_eq!(body.collect().await.unwrap().to_bytes(), "answer");
        assert!(resolves_within(&a, T + SLACK).await);
    }
}
