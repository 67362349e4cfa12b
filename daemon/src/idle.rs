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
//!
//! A request in progress is never idle, so a peer that starts one and then stops could hold its
//! connection as long as it liked: a request body that stops arriving, a response it stops
//! reading (HTTP/1.1: the socket's buffers fill; HTTP/2: it grants no more flow-control window).
//! Where that matters (a gate's clients, on the internet) [`Activity::watching_stalls`] adds a
//! second rule: a connection on which a body has waited on the peer, with no progress from the
//! peer, for the stall timeout is dropped. A body waits on the peer when a request body has no
//! data from it ([`FromPeer`]), or when a response body has handed over a frame the peer has not
//! yet made room for ([`Tracked`]); a body that waits on the service behind (a slow upstream, a
//! held request) does not. Nor does a request body while another on the connection holds a
//! frame the service has not asked past: over HTTP/2 that data may fill the connection's
//! flow-control window, and then the peer cannot send. Like nginx's `client_body_timeout` and
//! `send_timeout`, this bounds silence, not rate: a peer that trickles a byte now and then
//! keeps its connection. The clock is the connection's: progress on any body restarts it, and a
//! stall ends the whole connection, every request on it included.

use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

/// How long a connection closed for idleness has to finish its GOAWAY exchange (a request that
/// raced the GOAWAY has this long too).
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Requests in progress on one connection, and since when there has been none; when stalls are
/// watched, the bodies waiting on the peer and when the peer last made progress.
#[derive(Debug)]
pub(crate) struct Activity {
    in_progress: AtomicUsize,
    idle_since: Mutex<Instant>,
    /// `Some(timeout)`: the stall rule applies ([`Activity::watching_stalls`]).
    stall_timeout: Option<Duration>,
    /// Response bodies that handed over a frame the peer has not made room for.
    reads_awaited: AtomicUsize,
    /// Request bodies with no data from the peer.
    sends_awaited: AtomicUsize,
    /// Request bodies whose last frame the service has not asked past. Their data may hold the
    /// connection's HTTP/2 flow-control window, so that another body's silence is the gate's
    /// doing, not the peer's: request bodies are not counted as stalled while one is held.
    held_by_service: AtomicUsize,
    /// When the peer last made progress, when the gate last made room for it, or when a wait
    /// began with none before it: nanoseconds since `created`.
    peer_progress_ns: AtomicU64,
    created: Instant,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity::with_stall_timeout(None))
    }

    /// As [`Activity::new`], and a connection on which a body has waited on the peer for
    /// `timeout` with no progress is stalled ([`serve_until_idle`] then drops it).
    pub(crate) fn watching_stalls(timeout: Duration) -> Arc<Activity> {
        Arc::new(Activity::with_stall_timeout(Some(timeout)))
    }

    fn with_stall_timeout(stall_timeout: Option<Duration>) -> Activity {
        let now = Instant::now();
        Activity {
            in_progress: AtomicUsize::new(0),
            idle_since: Mutex::new(now),
            stall_timeout,
            reads_awaited: AtomicUsize::new(0),
            sends_awaited: AtomicUsize::new(0),
            held_by_service: AtomicUsize::new(0),
            peer_progress_ns: AtomicU64::new(0),
            created: now,
        }
    }

    fn stamp_peer_progress(&self) {
        let ns = u64::try_from(self.created.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.peer_progress_ns.store(ns, Ordering::SeqCst);
    }

    /// One body's wait of this kind, or `None` when stalls are not watched (nothing to count).
    fn peer_wait(self: &Arc<Self>, kind: Wait) -> Option<PeerWait> {
        self.stall_timeout.map(|_| PeerWait { activity: self.clone(), kind, waiting: false })
    }

    fn counter(&self, kind: Wait) -> &AtomicUsize {
        match kind {
            Wait::Read => &self.reads_awaited,
            Wait::Send => &self.sends_awaited,
            Wait::Held => &self.held_by_service,
        }
    }

    /// Whether the connection now waits on its peer: a response frame not taken, or a request
    /// body without data while no other is held by the service.
    fn waiting_on_peer(&self) -> bool {
        self.reads_awaited.load(Ordering::SeqCst) > 0
            || (self.sends_awaited.load(Ordering::SeqCst) > 0 && self.held_by_service.load(Ordering::SeqCst) == 0)
    }

    /// Resolves once the connection has waited on its peer for the stall timeout with no
    /// progress from it on any body (checked again after every wait; a stall that begins during
    /// one is seen at most one timeout late). The clock is the connection's, not each body's:
    /// progress on one body restarts it for all. Never resolves when stalls are not watched.
    pub(crate) async fn stalled(&self) {
        let Some(timeout) = self.stall_timeout else {
            return std::future::pending().await;
        };
        quiet_for(timeout, || {
            self.waiting_on_peer()
                .then(|| self.created + Duration::from_nanos(self.peer_progress_ns.load(Ordering::SeqCst)))
        })
        .await
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
        quiet_for(timeout, || self.idle_since()).await
    }
}

/// Resolves once `since()` has named a start at least `timeout` ago. `None` (nothing to time
/// now) waits a whole `timeout` before asking again; so does a start that moves meanwhile, which
/// is seen when the wait ends. One timer at a time, re-armed only when it fires.
async fn quiet_for(timeout: Duration, since: impl Fn() -> Option<Instant>) {
    loop {
        let wait = match since() {
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
        _ = activity.stalled() => {
            // The peer is not reading what it asked for, or not sending what it began: a
            // graceful close would wait for it too, so the connection is dropped.
            tracing::debug!(%client, "connection stalled: a request in progress has had nothing from its peer; dropping it");
            Ok(())
        }
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

/// What a body waits for.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// The peer to make room for a response frame.
    Read,
    /// Data of a request body from the peer.
    Send,
    /// The service to ask past a request body's frame (not a wait on the peer: see
    /// [`Activity::held_by_service`]).
    Held,
}

/// One body's wait of one kind, counted in its connection's [`Activity`] while `waiting`.
#[derive(Debug)]
struct PeerWait {
    activity: Arc<Activity>,
    kind: Wait,
    waiting: bool,
}

impl PeerWait {
    /// The wait begins. The clock starts now if nothing was waiting on the peer (another wait
    /// beginning does not restart the clock of one already running).
    fn start(&mut self) {
        if !self.waiting {
            self.waiting = true;
            let a = &self.activity;
            // The time before the count: a watcher that sees the wait must see its start.
            if !matches!(self.kind, Wait::Held) && !a.waiting_on_peer() {
                a.stamp_peer_progress();
            }
            a.counter(self.kind).fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The wait is over: the peer made progress (or, for [`Wait::Held`], the gate made room
    /// for it), which restarts the connection's clock.
    fn end(&mut self) {
        if self.waiting {
            self.waiting = false;
            self.activity.stamp_peer_progress();
            self.activity.counter(self.kind).fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for PeerWait {
    fn drop(&mut self) {
        self.end();
    }
}

/// A response body that keeps its request in progress until it has ended or is dropped, and,
/// when stalls are watched, waits on the peer from the moment it hands over a frame (not its
/// last) until it is asked for the next: the server asks only once the peer made room for it.
pub(crate) struct Tracked<B> {
    inner: B,
    wait: Option<PeerWait>,
    _request: InProgress,
}

impl<B> Tracked<B> {
    pub(crate) fn new(inner: B, request: InProgress) -> Tracked<B> {
        Tracked { inner, wait: request.0.peer_wait(Wait::Read), _request: request }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let Some(wait) = &mut this.wait else {
            return Pin::new(&mut this.inner).poll_frame(cx);
        };
        wait.end();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(Some(Ok(_)))) && !this.inner.is_end_stream() {
            wait.start();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body from the peer that, when stalls are watched, waits on the peer while it has
/// no data from it, and is held by the service from handing over a frame (not its last) until
/// it is asked for the next.
pub(crate) struct FromPeer<B> {
    inner: B,
    /// (data from the peer, the service asking past a frame)
    waits: Option<(PeerWait, PeerWait)>,
}

impl<B> FromPeer<B> {
    pub(crate) fn new(inner: B, activity: &Arc<Activity>) -> FromPeer<B> {
        let waits = activity.peer_wait(Wait::Send).zip(activity.peer_wait(Wait::Held));
        FromPeer { inner, waits }
    }

    /// The body itself, no longer counted (for a reader with a deadline of its own).
    pub(crate) fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Body + Unpin> Body for FromPeer<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let Some((send, held)) = &mut this.waits else {
            return Pin::new(&mut this.inner).poll_frame(cx);
        };
        held.end();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Pending => send.start(),
            Poll::Ready(Some(Ok(_))) if !this.inner.is_end_stream() => {
                send.end();
                held.start();
            }
            Poll::Ready(_) => send.end(),
        }
        r
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

    /// Waits for the stall, failing (not hanging) when it does not come in time.
    async fn stall(a: &Activity) {
        tokio::time::timeout(T * 2 + SLACK, a.stalled()).await.expect("no stall within twice the timeout");
    }

    async fn stalls_within(a: &Activity, within: Duration) -> bool {
        tokio::time::timeout(within, a.stalled()).await.is_ok()
    }

    type Chan = crate::httpbody::ChannelBody<std::convert::Infallible>;

    fn channel() -> (tokio::sync::mpsc::Sender<Result<Bytes, std::convert::Infallible>>, Chan) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        (tx, Chan::new(rx))
    }

    #[tokio::test]
    async fn without_the_stall_rule_nothing_stalls_and_bodies_count_nothing() {
        let a = Activity::new();
        let (tx, rx) = channel();
        tx.send(Ok(Bytes::from_static(b"first"))).await.unwrap();
        tx.send(Ok(Bytes::from_static(b"second"))).await.unwrap();
        let mut body = Tracked::new(rx, a.begin());
        assert!(body.frame().await.is_some());
        assert!(!stalls_within(&a, T * 3).await);
        assert!(!a.waiting_on_peer());
    }

    /// A response whose peer does not take the next frame stalls once the timeout passed, not
    /// before; one waiting on the service behind it (its next frame not there yet) never does.
    #[tokio::test]
    async fn a_response_the_peer_stops_taking_stalls_and_one_waiting_on_the_service_does_not() {
        let a = Activity::watching_stalls(T);
        let (tx, rx) = channel();
        let mut body = Tracked::new(rx, a.begin());
        // Waiting on the service: polled, nothing to hand over.
        let waiting = tokio::spawn(async move {
            let first = body.frame().await;
            (body, first)
        });
        assert!(!stalls_within(&a, T * 3).await, "stalled while the service had not answered");
        tx.send(Ok(Bytes::from_static(b"first"))).await.unwrap();
        let (mut body, first) = waiting.await.unwrap();
        assert!(first.is_some());
        // The frame is handed over and the peer never asks for the next.
        let start = Instant::now();
        stall(&a).await;
        let took = start.elapsed();
        assert!(took >= T - Duration::from_millis(5) && took < T * 2 + SLACK, "{took:?}");
        // Asked again: the peer made progress, the wait is over.
        tx.send(Ok(Bytes::from_static(b"second"))).await.unwrap();
        drop(tx);
        assert!(body.frame().await.is_some());
        assert!(body.frame().await.is_none());
        assert!(!a.waiting_on_peer());
    }

    /// A last frame handed over is not a wait: the server does not ask for more.
    #[tokio::test]
    async fn a_response_s_last_frame_is_no_wait() {
        let a = Activity::watching_stalls(T);
        let mut body = Tracked::new(Full::new(Bytes::from_static(b"whole")), a.begin());
        assert!(body.frame().await.is_some());
        assert!(!a.waiting_on_peer());
        assert!(!stalls_within(&a, T * 3).await);
    }

    /// A request body with nothing from the peer stalls after the timeout; one whose data keeps
    /// coming (more often than the timeout) does not; a dropped one counts no more.
    #[tokio::test]
    async fn a_request_body_the_peer_stops_sending_stalls_and_a_slow_one_does_not() {
        let a = Activity::watching_stalls(T);
        let (tx, rx) = channel();
        let mut body = FromPeer::new(rx, &a);
        let reader = tokio::spawn(async move {
            let mut got = 0;
            while let Some(f) = body.frame().await {
                got += f.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
            }
            got
        });
        let trickle = tokio::spawn(async move {
            for _ in 0..8 {
                tokio::time::sleep(T / 3).await;
                tx.send(Ok(Bytes::from_static(b"x"))).await.unwrap();
            }
            tx
        });
        // Watched while the data comes: eight gaps of a third of the timeout never stall.
        assert!(!stalls_within(&a, T * 8 / 3 - Duration::from_millis(30)).await, "stalled while data came");
        let tx = trickle.await.unwrap();
        let start = Instant::now();
        stall(&a).await;
        let took = start.elapsed();
        assert!(took >= T - Duration::from_millis(5) && took < T * 2 + SLACK, "{took:?}");
        reader.abort();
        let _ = reader.await;
        assert!(!a.waiting_on_peer(), "a dropped body still counted");
        assert_eq!(a.held_by_service.load(Ordering::SeqCst), 0);
        assert!(!stalls_within(&a, T * 3).await);
        drop(tx);
    }

    /// HTTP/2: while one request body holds a frame the service has not asked past (its data
    /// may fill the connection's window), another's silence is not the peer's; once the service
    /// asks past it, the other's clock starts from then.
    #[tokio::test]
    async fn a_request_body_held_by_the_service_excuses_another_s_silence() {
        let a = Activity::watching_stalls(T);
        let (tx_held, rx_held) = channel();
        let mut held = FromPeer::new(rx_held, &a);
        tx_held.send(Ok(Bytes::from_static(b"unread"))).await.unwrap();
        drop(tx_held);
        assert!(held.frame().await.is_some(), "the service takes one frame and asks no further");
        let (_tx_silent, rx_silent) = channel();
        let mut body = FromPeer::new(rx_silent, &a);
        let silent = tokio::spawn(async move {
            let _ = body.frame().await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(a.sends_awaited.load(Ordering::SeqCst), 1, "the silent body waits on the peer");
        assert!(!stalls_within(&a, T * 3).await, "stalled while the service held the window");
        // The service asks past the held frame (the body's end): the window opens, and the
        // silent body's clock runs.
        let asked = Instant::now();
        assert!(held.frame().await.is_none());
        assert_eq!(a.held_by_service.load(Ordering::SeqCst), 0);
        stall(&a).await;
        let took = asked.elapsed();
        assert!(took >= T - Duration::from_millis(5) && took < T * 2 + SLACK, "{took:?}");
        silent.abort();
    }

    /// The clock is the connection's: a wait that begins while another runs does not restart
    /// it, and the stall comes one timeout after the first began.
    #[tokio::test]
    async fn a_second_wait_does_not_restart_the_first_one_s_clock() {
        let a = Activity::watching_stalls(T);
        let start = Instant::now();
        let mut first = a.peer_wait(Wait::Read).unwrap();
        first.start();
        tokio::time::sleep(T / 2).await;
        let mut second = a.peer_wait(Wait::Send).unwrap();
        second.start();
        stall(&a).await;
        let took = start.elapsed();
        assert!(took >= T - Duration::from_millis(5) && took < T + T / 2, "{took:?}");
        // Progress on one restarts the clock for both.
        let progress = Instant::now();
        second.end();
        stall(&a).await;
        assert!(progress.elapsed() >= T - Duration::from_millis(5));
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
