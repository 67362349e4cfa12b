//! The daemon's own connections to real services: its resolver, verified TLS, a pool.
//!
//! Three rules make the proxy's forwarding something an agent cannot steer:
//! * **The daemon resolves the name itself** ([`UpstreamResolver`]: static hosts, then the system
//!   or configured servers, with loopback/link-local/synthetic answers dropped). The address the
//!   agent dialed is never used, so "SNI allowed, IP somewhere else" reaches the allowed service
//!   or nothing.
//! * **The upstream is verified** by rustls against webpki's roots, the host's trust store
//!   (`/etc/ssl/certs/ca-certificates.crt` when present) and `upstream_tls.extra_roots`, for the
//!   name the decision was made on. The agent's trust in the local CA never extends upstream.
//! * **Connections are pooled per (scheme, name, port)** ([`Upstream`]'s own pool), so a
//!   connection opened and verified for one name is never reused for another. ALPN offers `h2`
//!   and `http/1.1`. An HTTP/1.1 connection is driven by the request using it, in that request's
//!   task (no task hop either way); an HTTP/2 connection, shared by concurrent streams, runs in
//!   a task of its own.
//! * **TLS sessions are resumed**: rustls keeps the upstreams' session tickets in memory
//!   ([`client_config`]), so a new connection to an upstream seen before skips the full
//!   handshake (the certificate was verified for the same name when the session was made).

use crate::dns::UpstreamResolver;
use crate::domain::DomainName;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The host's trust store on Debian and derivatives; absent elsewhere is fine.
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
const MAX_BUNDLE: u64 = 8 * 1024 * 1024;
/// Per address tried; the whole connect is also bounded by the number of addresses.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle pooled connections are closed after this.
pub const POOL_IDLE: Duration = Duration::from_secs(60);
/// Upstream names whose TLS sessions are kept for resumption.
pub const UPSTREAM_SESSIONS: usize = 1024;

/// The body type the proxy sends upstream and back to agents.
pub type ProxyBody = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("upstream_tls.extra_roots: {path}: {reason}")]
    ExtraRoot { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    SystemBundle { path: PathBuf, reason: String },
    #[error("upstream TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// The rustls client configuration for upstream connections: [`crate::tls::crypto_provider`],
/// TLS 1.2/1.3, ALPN h2 then http/1.1, roots from webpki, `system_bundle` (if it exists) and every
/// `extra_roots` file (each must exist and hold at least one certificate).
pub fn client_config(
    extra_roots: &[PathBuf],
    system_bundle: Option<&Path>,
) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = system_bundle.filter(|p| p.exists()) {
        let pem =
            read_bounded(path).map_err(|reason| TlsSetupError::SystemBundle { path: path.to_path_buf(), reason })?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok).collect();
        let (added, _ignored) = roots.add_parsable_certificates(certs);
        tracing::debug!(path = %path.display(), added, "system trust store loaded for upstream TLS");
    }
    for path in extra_roots {
        let bad = |reason: String| TlsSetupError::ExtraRoot { path: path.clone(), reason };
        let pem = read_bounded(path).map_err(bad)?;
        let mut n = 0usize;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| bad(format!("not a PEM certificate: {e}")))?;
            roots.add(cert).map_err(|e| bad(format!("unusable as a trust anchor: {e}")))?;
            n += 1;
        }
        if n == 0 {
            return Err(bad("holds no PEM certificate".into()));
        }
    }
    let provider = crate::tls::crypto_provider();
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Sessions (TLS 1.3 tickets, TLS 1.2 tickets or ids) of up to this many upstream names are
    // kept, so a new connection to one of them resumes instead of a full handshake.
    config.resumption = rustls::client::Resumption::in_memory_sessions(UPSTREAM_SESSIONS);
    Ok(Arc::new(config))
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    file.take(MAX_BUNDLE + 1).read_to_end(&mut buf).map_err(|e| e.to_string())?;
    if buf.len() as u64 > MAX_BUNDLE {
        return Err(format!("larger than {MAX_BUNDLE} bytes"));
    }
    Ok(buf)
}

/// The daemon's client for upstream requests: its own connection pool, keyed by (scheme, name,
/// port), with two connectors: one offering `h2` and `http/1.1`, and one offering only
/// `http/1.1` for protocol upgrades (WebSocket), which HTTP/2 cannot carry.
///
/// An HTTP/1.1 connection has no task of its own: the request that uses it drives it (sending
/// the request, reading the response head, then each read of the response body), so a request
/// crosses no task boundary on its way up and back. A response read to its end puts the
/// connection back in the pool; one dropped earlier closes it. An HTTP/2 connection is shared by
/// concurrent requests, so it runs in a task of its own. Idle connections are checked every
/// [`SWEEP_EVERY`] and closed after [`POOL_IDLE`] or when the upstream closed them.
#[derive(Clone)]
pub struct Upstream {
    connector: Connector,
    h1_connector: Connector,
    pool: Arc<Pool>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Upstream")
    }
}

/// Why a request got no response from its upstream.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection: nothing was sent.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("HTTP with the upstream")]
    Http(#[source] hyper::Error),
}

impl SendError {
    /// Whether no connection to the upstream could be made.
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

/// The outcome of a request on an HTTP/1.1 connection taken from the pool: a pooled
/// connection the upstream closed before the request was written gives the request back, to be
/// sent on a new connection (nothing of it reached the upstream).
enum H1Sent {
    Done(Result<http::Response<ProxyBody>, SendError>),
    Unsent(http::Request<ProxyBody>),
}

impl Upstream {
    pub fn new(resolver: Arc<UpstreamResolver>, tls: Arc<ClientConfig>) -> Upstream {
        let mut h1_tls = (*tls).clone();
        h1_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let pool = Arc::new(Pool::default());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let pool = Arc::downgrade(&pool);
            runtime.spawn(async move {
                let mut every = tokio::time::interval(SWEEP_EVERY);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    match pool.upgrade() {
                        Some(pool) => pool.sweep(),
                        None => return,
                    }
                }
            });
        }
        Upstream {
            connector: Connector { resolver: resolver.clone(), tls: TlsConnector::from(tls) },
            h1_connector: Connector { resolver, tls: TlsConnector::from(Arc::new(h1_tls)) },
            pool,
        }
    }

    /// Sends `req` (its URI names scheme, host and port) and returns the response head; the
    /// response body streams.
    pub async fn send(&self, req: http::Request<ProxyBody>) -> Result<http::Response<ProxyBody>, SendError> {
        let target = Target::of(req.uri())?;
        self.send_to(&target, req).await
    }

    /// Sends `req` to `target` (its URI may be in origin form: only its path and query are
    /// used) and returns the response head; the response body streams.
    pub async fn send_to(
        &self,
        target: &Target,
        mut req: http::Request<ProxyBody>,
    ) -> Result<http::Response<ProxyBody>, SendError> {
        let key = Key::new(target);
        if let Some(sender) = self.pool.h2(&key) {
            to_h2_form(&mut req, target);
            return send_h2(sender, req).await;
        }
        to_h1_form(&mut req, target);
        if let Some(h1) = std::future::poll_fn(|cx| Poll::Ready(self.pool.checkout_h1(&key, cx))).await {
            match send_h1(&self.pool, key.clone(), h1, req).await {
                H1Sent::Done(result) => return result,
                H1Sent::Unsent(back) => req = back,
            }
        }
        let io = self.connector.connect(target).await?;
        if io.h2 {
            to_h2_form(&mut req, target);
            let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new());
            let (sender, conn) = b.handshake(TokioIo::new(io)).await.map_err(SendError::Http)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
                }
            });
            self.pool.put_h2(key, sender.clone());
            return send_h2(sender, req).await;
        }
        let (sender, conn) =
            hyper::client::conn::http1::Builder::new().handshake(TokioIo::new(io)).await.map_err(SendError::Http)?;
        let h1 = H1 { sender, conn, idle_since: Instant::now() };
        match send_h1(&self.pool, key, h1, req).await {
            H1Sent::Done(result) => result,
            // A new connection that ended before taking the request.
            H1Sent::Unsent(_) => Err(SendError::Connect(ConnectError::Closed)),
        }
    }

    /// As [`Upstream::send_to`], always on a new HTTP/1.1 connection of its own (for `Upgrade`
    /// requests: the connection becomes the tunnel, so it is never pooled).
    pub async fn send_h1_to(
        &self,
        target: &Target,
        mut req: http::Request<ProxyBody>,
    ) -> Result<http::Response<ProxyBody>, SendError> {
        let io = self.h1_connector.connect(target).await?;
        to_h1_form(&mut req, target);
        let (mut sender, conn) =
            hyper::client::conn::http1::Builder::new().handshake(TokioIo::new(io)).await.map_err(SendError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream HTTP/1.1 connection (upgrade) ended with an error");
            }
        });
        let resp = sender.send_request(req).await.map_err(SendError::Http)?;
        Ok(resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()))
    }

    /// Idle HTTP/1.1 connections in the pool now.
    pub fn idle_connections(&self) -> usize {
        self.pool.lock().idle_total
    }
}

/// HTTP/1.1 wants the path alone on the request line and the name in `Host` (with the port
/// unless it is the scheme's default). A request already in origin form keeps its URI, and a
/// `Host` that already names the target exactly is kept: the usual proxied request is sent
/// without building either again.
fn to_h1_form<B>(req: &mut http::Request<B>, target: &Target) {
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        let path = req.uri().path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *req.uri_mut() = http::Uri::from(path);
    }
    let default = if target.tls { 443 } else { 80 };
    let exact = |v: &http::HeaderValue| target.port == default && v.as_bytes() == target.name.as_str().as_bytes();
    if req.headers().get(http::header::HOST).is_some_and(exact)
        && req.headers().get_all(http::header::HOST).iter().count() == 1
    {
        return;
    }
    let host =
        if target.port == default { target.name.to_string() } else { format!("{}:{}", target.name, target.port) };
    match http::HeaderValue::from_str(&host) {
        Ok(v) => {
            req.headers_mut().insert(http::header::HOST, v);
        }
        Err(_) => {
            req.headers_mut().remove(http::header::HOST);
        }
    }
}

/// HTTP/2 wants the whole URI (hyper sends `:scheme`, `:authority` and `:path` from it) and no
/// `Host`.
fn to_h2_form<B>(req: &mut http::Request<B>, target: &Target) {
    req.headers_mut().remove(http::header::HOST);
    let path = req.uri().path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let uri = http::Uri::builder()
        .scheme(if target.tls { "https" } else { "http" })
        .authority(format!("{}:{}", target.name, target.port))
        .path_and_query(path)
        .build();
    if let Ok(uri) = uri {
        *req.uri_mut() = uri;
    }
}

async fn send_h2(mut sender: H2Sender, req: http::Request<ProxyBody>) -> Result<http::Response<ProxyBody>, SendError> {
    let resp = sender.send_request(req).await.map_err(SendError::Http)?;
    Ok(resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()))
}

/// Sends `req` on `h1`, driving the connection in this task until the response head is in; the
/// response body drives it from then on ([`PooledBody`]) and gives it back to the pool at its
/// end.
async fn send_h1(pool: &Arc<Pool>, key: Key, h1: H1, req: http::Request<ProxyBody>) -> H1Sent {
    let H1 { mut sender, conn, .. } = h1;
    let mut conn = Some(conn);
    let mut response = std::pin::pin!(sender.try_send_request(req));
    let sent = std::future::poll_fn(|cx| {
        if let Some(c) = &mut conn {
            if Pin::new(c).poll(cx).is_ready() {
                // Ended: dropping it answers the request's callback with the reason.
                conn = None;
            }
        }
        response.as_mut().poll(cx)
    })
    .await;
    match sent {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            let conn = conn.map(|conn| (key, H1 { sender, conn, idle_since: Instant::now() }));
            let body = PooledBody { body, conn, pool: pool.clone() };
            H1Sent::Done(Ok(http::Response::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed())))
        }
        Err(mut e) => match e.take_message() {
            Some(req) => H1Sent::Unsent(req),
            None => H1Sent::Done(Err(SendError::Http(e.into_error()))),
        },
    }
}

/// Idle HTTP/1.1 connections kept per (scheme, name, port); more are closed when they come back.
pub const MAX_IDLE_PER_KEY: usize = 128;
/// Idle HTTP/1.1 connections kept in all; more are closed when they come back.
pub const MAX_IDLE_TOTAL: usize = 2048;
/// How often idle connections are checked for a close by the upstream and for [`POOL_IDLE`].
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

type H1Sender = hyper::client::conn::http1::SendRequest<ProxyBody>;
type H1Conn = hyper::client::conn::http1::Connection<TokioIo<UpstreamIo>, ProxyBody>;
type H2Sender = hyper::client::conn::http2::SendRequest<ProxyBody>;

/// Where a request goes: scheme, name and port. The proxy builds it from the name the decision
/// was made on and the port the agent dialed; it is never read back from the request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub tls: bool,
    pub name: DomainName,
    pub port: u16,
}

impl Target {
    /// The target an absolute `http`/`https` URI names.
    pub fn of(uri: &http::Uri) -> Result<Target, ConnectError> {
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(ConnectError::BadUri(uri.to_string())),
        };
        let name =
            uri.host().and_then(|h| DomainName::parse(h).ok()).ok_or_else(|| ConnectError::BadUri(uri.to_string()))?;
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Target { tls, name, port })
    }
}

/// Where a connection goes: a connection opened and verified for one name is never used for
/// another (nor for another port or scheme). Connections are also kept apart by the thread that
/// uses them: the proxy runs one runtime per thread, and a connection stays with the runtime
/// whose reactor it is registered with.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    target: Target,
    thread: std::thread::ThreadId,
}

impl Key {
    fn new(target: &Target) -> Key {
        Key { target: target.clone(), thread: std::thread::current().id() }
    }
}

/// An HTTP/1.1 connection with no request on it: its sender and the connection itself, which
/// the request task using it drives (it has no task of its own).
struct H1 {
    sender: H1Sender,
    conn: H1Conn,
    idle_since: Instant,
}

impl H1 {
    /// Drives the connection once (a close by the upstream, or the end of the previous exchange,
    /// is seen here) and says whether a request can be sent on it now.
    fn poll_usable(&mut self, cx: &mut Context<'_>) -> bool {
        if Pin::new(&mut self.conn).poll(cx).is_ready() {
            return false; // ended (closed by the upstream, or an error)
        }
        matches!(self.sender.poll_ready(cx), Poll::Ready(Ok(())))
    }
}

#[derive(Default)]
struct PoolState {
    idle: HashMap<Key, Vec<H1>>,
    idle_total: usize,
    /// One multiplexed HTTP/2 connection per key (its connection runs in a task of its own).
    h2: HashMap<Key, H2Sender>,
}

#[derive(Default)]
struct Pool {
    state: Mutex<PoolState>,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used idle connection for `key` that is still open and ready, if any;
    /// the unusable ones met on the way are closed.
    fn checkout_h1(&self, key: &Key, cx: &mut Context<'_>) -> Option<H1> {
        let now = Instant::now();
        loop {
            let mut conn = {
                let mut state = self.lock();
                let list = state.idle.get_mut(key)?;
                let conn = list.pop();
                if list.is_empty() {
                    state.idle.remove(key);
                }
                let conn = conn?;
                state.idle_total = state.idle_total.saturating_sub(1);
                conn
            };
            if now.duration_since(conn.idle_since) < POOL_IDLE && conn.poll_usable(cx) {
                return Some(conn);
            }
        }
    }

    /// Puts a connection whose last response was read to its end back for `key`, or closes it
    /// (over the bounds, or no longer usable).
    fn checkin_h1(&self, key: Key, mut conn: H1) {
        if !conn.poll_usable(&mut Context::from_waker(std::task::Waker::noop())) {
            return;
        }
        conn.idle_since = Instant::now();
        let mut state = self.lock();
        if state.idle_total >= MAX_IDLE_TOTAL {
            return;
        }
        let list = state.idle.entry(key).or_default();
        if list.len() >= MAX_IDLE_PER_KEY {
            return;
        }
        list.push(conn);
        state.idle_total += 1;
    }

    fn h2(&self, key: &Key) -> Option<H2Sender> {
        let mut state = self.lock();
        match state.h2.get(key) {
            Some(s) if !s.is_closed() => Some(s.clone()),
            Some(_) => {
                state.h2.remove(key);
                None
            }
            None => None,
        }
    }

    fn put_h2(&self, key: Key, sender: H2Sender) {
        let mut state = self.lock();
        match state.h2.get(&key) {
            Some(s) if !s.is_closed() => {} // another request's connection came first: keep it
            _ => {
                state.h2.insert(key, sender);
            }
        }
    }

    /// Closes idle connections that the upstream closed or that sat longer than [`POOL_IDLE`],
    /// and forgets closed HTTP/2 connections.
    fn sweep(&self) {
        let now = Instant::now();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut closed = Vec::new();
        let mut state = self.lock();
        state.idle.retain(|_, list| {
            for mut c in std::mem::take(list) {
                if now.duration_since(c.idle_since) < POOL_IDLE && c.poll_usable(&mut cx) {
                    list.push(c);
                } else {
                    closed.push(c);
                }
            }
            !list.is_empty()
        });
        state.idle_total = state.idle.values().map(Vec::len).sum();
        state.h2.retain(|_, s| !s.is_closed());
        drop(state);
        drop(closed); // closed outside the lock
    }
}

/// A response body read from an HTTP/1.1 connection of the pool: reading it drives the
/// connection in the reader's own task, and once the body has been read to its end the
/// connection goes back to the pool (dropped before its end, the connection is closed: what is
/// left of the response is still on it).
struct PooledBody {
    body: Incoming,
    conn: Option<(Key, H1)>,
    pool: Arc<Pool>,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some((_, c)) = &mut this.conn {
            if Pin::new(&mut c.conn).poll(cx).is_ready() {
                // Ended (the body's end or error is in `body` now): not reusable.
                this.conn = None;
            }
        }
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            this.conn = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // hyper stops reading a body once it reports its end, so the end is judged here.
        if self.body.is_end_stream() {
            if let Some((key, conn)) = self.conn.take() {
                self.pool.checkin_h1(key, conn);
            }
        }
    }
}

/// Connects to what the daemon resolves for a name, with TLS for `https`.
#[derive(Clone)]
struct Connector {
    resolver: Arc<UpstreamResolver>,
    tls: TlsConnector,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("upstream URI {0:?} has no usable host name")]
    BadUri(String),
    #[error("resolving {name}: {reason}")]
    Resolve { name: String, reason: String },
    #[error("connecting to {name} ({addrs}): {reason}")]
    Connect { name: String, addrs: String, reason: String },
    #[error("TLS with {name} at {addr}: {source}")]
    Tls { name: String, addr: SocketAddr, source: io::Error },
    #[error("the new upstream connection closed before the request was sent")]
    Closed,
}

impl ConnectError {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::BadUri(_) => "uri",
            ConnectError::Resolve { .. } => "resolve",
            ConnectError::Connect { .. } | ConnectError::Closed => "connect",
            ConnectError::Tls { .. } => "tls",
        }
    }
}

impl Connector {
    async fn connect(&self, target: &Target) -> Result<UpstreamIo, ConnectError> {
        let (tcp, addr) = dial(&self.resolver, &target.name, target.port).await?;
        let _ = tcp.set_nodelay(true);
        if !target.tls {
            return Ok(UpstreamIo { inner: Inner::Plain(tcp), h2: false });
        }
        let name = target.name.as_str();
        let server_name = ServerName::try_from(name.to_string()).map_err(|_| ConnectError::BadUri(name.to_string()))?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, self.tls.connect(server_name, ReadAhead::new(tcp)))
            .await
            .map_err(|_| ConnectError::Tls {
                name: name.to_string(),
                addr,
                source: io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"),
            })?
            .map_err(|source| ConnectError::Tls { name: name.to_string(), addr, source })?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        Ok(UpstreamIo { inner: Inner::Tls(Box::new(stream)), h2 })
    }
}

/// A connection to an upstream, plain or TLS.
pub struct UpstreamIo {
    inner: Inner,
    h2: bool,
}

enum Inner {
    Plain(TcpStream),
    Tls(Box<TlsStream<ReadAhead<TcpStream>>>),
}

/// Bytes read from the socket in one system call once a response is seen to be larger than one
/// read of rustls.
pub(super) const READ_AHEAD: usize = 64 * 1024;

/// The upstream socket below rustls, read in larger gulps when a response is large.
///
/// rustls reads TLS records at most 4 KiB at a time, so a 64 KiB response took about seventeen
/// `read` calls. A read that fills the caller's buffer says more is waiting: the next read takes
/// up to [`READ_AHEAD`] bytes at once and serves rustls from memory, and reading ahead goes on
/// while it brings more than the caller's buffer would have taken. A read that does not fill it
/// (a small response, the usual keep-alive case) goes straight into rustls's buffer, with no copy
/// and no allocation. The buffer exists only while it holds unread bytes: an idle pooled
/// connection holds none.
pub(super) struct ReadAhead<S> {
    inner: S,
    ahead: bytes::BytesMut,
    /// The last read filled the caller's buffer: read ahead next time.
    burst: bool,
}

impl<S> ReadAhead<S> {
    pub(super) fn new(inner: S) -> ReadAhead<S> {
        ReadAhead { inner, ahead: bytes::BytesMut::new(), burst: false }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        use bytes::Buf as _;
        let this = self.get_mut();
        if this.ahead.is_empty() && this.burst && buf.remaining() > 0 {
            this.ahead.reserve(READ_AHEAD);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.ahead) {
                // Still more than the caller's buffer would have taken: keep reading ahead.
                Poll::Ready(Ok(n)) => this.burst = n > buf.remaining(),
                Poll::Ready(Err(e)) => {
                    this.ahead = bytes::BytesMut::new();
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    // Nothing to hold while the upstream is silent.
                    this.ahead = bytes::BytesMut::new();
                    return Poll::Pending;
                }
            }
            if this.ahead.is_empty() {
                this.ahead = bytes::BytesMut::new();
                return Poll::Ready(Ok(())); // end of stream
            }
        }
        if !this.ahead.is_empty() {
            let n = this.ahead.len().min(buf.remaining());
            buf.put_slice(this.ahead.get(..n).unwrap_or_default());
            this.ahead.advance(n);
            if this.ahead.is_empty() {
                this.ahead = bytes::BytesMut::new(); // free it
            }
            return Poll::Ready(Ok(()));
        }
        let (before, room) = (buf.filled().len(), buf.remaining());
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.burst = room > 0 && buf.filled().len() - before == room;
        }
        polled
    }
}

delegate_async_write!(ReadAhead);

impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Inner::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_flush(cx),
            Inner::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Inner::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Inner::Plain(s) => s.is_write_vectored(),
            Inner::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Dials `name:port` at an address the daemon resolves itself (the first that answers).
pub async fn dial(
    resolver: &UpstreamResolver,
    name: &DomainName,
    port: u16,
) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let addrs = resolver
        .resolve(name)
        .await
        .map_err(|e| ConnectError::Resolve { name: name.to_string(), reason: e.to_string() })?;
    let mut last = String::from("no address");
    for ip in &addrs {
        let addr = SocketAddr::new(*ip, port);
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Ok((s, addr)),
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: timed out after {CONNECT_TIMEOUT:?}"),
        }
    }
    let list = addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    Err(ConnectError::Connect { name: name.to_string(), addrs: list, reason: last })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DnsConfig;
    use http_body_util::{Empty, Full};
    use std::convert::Infallible;
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn requests_go_in_origin_form_with_the_targets_host_and_in_absolute_form_over_http2() {
        let target = |port| Target { tls: true, name: DomainName::parse("example.com").expect("name"), port };
        let req = |uri: &str, host: Option<&str>| {
            let mut r = http::Request::builder().uri(uri);
            if let Some(h) = host {
                r = r.header(http::header::HOST, h);
            }
            r.body(()).expect("request")
        };
        let host = |r: &http::Request<()>| {
            let all: Vec<_> = r.headers().get_all(http::header::HOST).iter().cloned().collect();
            assert_eq!(all.len(), 1, "exactly one Host");
            all[0].to_str().expect("ascii").to_string()
        };
        let key = target(443);
        // The proxy's usual request: kept as it is.
        let mut r = req("/v1/x?q=1", Some("example.com"));
        to_h1_form(&mut r, &key);
        assert_eq!((r.uri().to_string(), host(&r)), ("/v1/x?q=1".to_string(), "example.com".to_string()));
        // Any other spelling, another name, or none: the target's own name.
        for h in [Some("EXAMPLE.com"), Some("example.com."), Some("example.com:443"), Some("evil.test"), None] {
            let mut r = req("https://other.test/a", h);
            to_h1_form(&mut r, &key);
            assert_eq!((r.uri().to_string(), host(&r)), ("/a".to_string(), "example.com".to_string()), "{h:?}");
        }
        // Not the scheme's default port: named in Host.
        let mut r = req("/", Some("example.com"));
        to_h1_form(&mut r, &target(8443));
        assert_eq!(host(&r), "example.com:8443");
        // HTTP/2: the whole URI from the target, no Host.
        let mut r = req("/v1/x?q=1", Some("example.com"));
        to_h2_form(&mut r, &key);
        assert_eq!(r.uri(), "https://example.com:443/v1/x?q=1");
        assert!(r.headers().get(http::header::HOST).is_none());
    }

    /// A socket stand-in: serves `data` in reads of at most `per_read` bytes (what the kernel
    /// has queued), says `Pending` once before the `pending_at`-th read, and counts the reads.
    struct Socket {
        data: Vec<u8>,
        at: usize,
        per_read: usize,
        reads: usize,
        pending_at: Option<usize>,
    }

    impl AsyncRead for Socket {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            if self.pending_at == Some(self.reads) {
                self.pending_at = None;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.reads += 1;
            let n = buf.remaining().min(self.per_read).min(self.data.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Socket {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn socket(len: usize, per_read: usize) -> Socket {
        let data = (0..len).map(|i| (i % 251) as u8).collect();
        Socket { data, at: 0, per_read, reads: 0, pending_at: None }
    }

    /// Reads everything as rustls does (4 KiB at a time) and checks the bytes came through whole
    /// and in order; returns the socket's read count.
    async fn read_as_rustls(r: &mut ReadAhead<Socket>, already: &[u8]) -> usize {
        use tokio::io::AsyncReadExt;
        let mut got = already.to_vec();
        let mut chunk = [0u8; 4096];
        loop {
            let n = r.read(&mut chunk).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, r.inner.data, "bytes lost or reordered");
        assert_eq!(r.ahead.capacity(), 0, "a drained read-ahead buffer is freed");
        r.inner.reads
    }

    #[tokio::test]
    async fn a_large_response_is_read_in_a_few_large_reads_and_a_small_one_directly() {
        // 64 KiB all queued: 4 KiB direct, then the rest at once, then the end.
        let mut r = ReadAhead::new(socket(64 * 1024, usize::MAX));
        assert!(read_as_rustls(&mut r, &[]).await <= 3);
        // As it trickles in 16 KiB at a time, each socket read still takes all there is (4 KiB
        // reads would take 51).
        let mut r = ReadAhead::new(socket(200 * 1024, 16 * 1024));
        assert!(read_as_rustls(&mut r, &[]).await <= 3 + 200 / 16);
        // Small: one read into the caller's buffer and the end, no buffer.
        let mut r = ReadAhead::new(socket(300, usize::MAX));
        assert_eq!(read_as_rustls(&mut r, &[]).await, 2);
    }

    #[tokio::test]
    async fn a_read_ahead_that_waits_holds_no_buffer_and_loses_nothing() {
        // The read ahead (the second socket read) finds nothing queued yet.
        let mut s = socket(64 * 1024, usize::MAX);
        s.pending_at = Some(1);
        let mut r = ReadAhead::new(s);
        let mut chunk = [0u8; 4096];
        let mut first = ReadBuf::new(&mut chunk);
        let polled = std::future::poll_fn(|cx| Pin::new(&mut r).poll_read(cx, &mut first)).await;
        assert!(polled.is_ok() && first.filled().len() == 4096 && r.burst);
        let already = first.filled().to_vec();
        let mut waker_cx = Context::from_waker(std::task::Waker::noop());
        let mut second = ReadBuf::new(&mut chunk);
        assert!(Pin::new(&mut r).poll_read(&mut waker_cx, &mut second).is_pending());
        assert_eq!(r.ahead.capacity(), 0, "no buffer held while the upstream is silent");
        assert!(read_as_rustls(&mut r, &already).await <= 3);
    }

    /// A plain HTTP/1.1 upstream on loopback: counts the connections it accepts and answers
    /// every request with `<Host header> <request target>` followed by `n` bytes for `/n`.
    struct Server {
        port: u16,
        accepted: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn server(keep_alive: bool) -> Server {
        server_at(0, keep_alive).await
    }

    /// [`server`] on `port` (0: any); a port just released is retried for a while.
    async fn server_at(port: u16, keep_alive: bool) -> Server {
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("binding port {port}: {e}"),
            }
        };
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            // Aborting the server drops this set, which closes every connection it accepted.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                        let host = req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("-");
                        let target = req.uri().to_string();
                        let n: usize = req.uri().path().trim_start_matches('/').parse().unwrap_or(0);
                        let mut body = format!("{host} {target}\n").into_bytes();
                        body.resize(body.len() + n, b'x');
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Server { port, accepted, task }
    }

    /// The daemon's client, resolving `a.example.test` and `b.example.test` to loopback.
    fn upstream() -> Upstream {
        let dns = DnsConfig {
            port: 0,
            upstream: Vec::new(),
            static_hosts: [
                ("a.example.test", IpAddr::V4(Ipv4Addr::LOCALHOST)),
                ("b.example.test", IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ]
            .iter()
            .map(|(n, ip)| (n.to_string(), *ip))
            .collect(),
        };
        let resolver = Arc::new(UpstreamResolver::from_config(&dns, None).expect("resolver"));
        Upstream::new(resolver, client_config(&[], None).expect("tls"))
    }

    fn request(uri: &str) -> http::Request<ProxyBody> {
        let body = Empty::<Bytes>::new().map_err(|never| match never {}).boxed();
        http::Request::builder().uri(uri).body(body).expect("request")
    }

    async fn get(u: &Upstream, uri: &str) -> String {
        let resp = u.send(request(uri)).await.expect("response");
        assert_eq!(resp.status(), http::StatusCode::OK);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_was_read_and_requests_go_in_origin_form() {
        let s = server(true).await;
        let u = upstream();
        for i in 0..3 {
            let got = get(&u, &format!("http://a.example.test:{}/0?i={i}", s.port)).await;
            // The name (and the port, not the scheme's default) in Host; the path alone.
            assert_eq!(got, format!("a.example.test:{} /0?i={i}\n", s.port));
        }
        assert_eq!(s.accepted.load(Ordering::SeqCst), 1, "one connection for three requests");
        assert_eq!(u.idle_connections(), 1);
        // Bodies larger than one read are streamed, and the connection still comes back.
        let got = get(&u, &format!("http://a.example.test:{}/300000", s.port)).await;
        assert_eq!(got.len(), format!("a.example.test:{} /300000\n", s.port).len() + 300_000);
        assert_eq!((s.accepted.load(Ordering::SeqCst), u.idle_connections()), (1, 1));
    }

    #[tokio::test]
    async fn a_response_dropped_before_its_end_closes_its_connection() {
        let s = server(true).await;
        let u = upstream();
        let resp = u.send(request(&format!("http://a.example.test:{}/1000000", s.port))).await.expect("response");
        let mut body = resp.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert!(first.is_data());
        drop(body); // what is left of the response is still on that connection
        assert_eq!(u.idle_connections(), 0);
        get(&u, &format!("http://a.example.test:{}/0", s.port)).await;
        assert_eq!(s.accepted.load(Ordering::SeqCst), 2, "a new connection for the next request");
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closes_is_not_used_again() {
        let s = server(false).await; // `Connection: close` on every response
        let u = upstream();
        for _ in 0..3 {
            get(&u, &format!("http://a.example.test:{}/0", s.port)).await;
        }
        assert_eq!(s.accepted.load(Ordering::SeqCst), 3);
        assert_eq!(u.idle_connections(), 0);
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_while_idle_is_replaced_without_an_error() {
        let s = server(true).await;
        let u = upstream();
        get(&u, &format!("http://a.example.test:{}/0", s.port)).await;
        assert_eq!(u.idle_connections(), 1);
        // The upstream goes away (closing the idle connection) and comes back on the same port.
        let port = s.port;
        drop(s);
        tokio::time::sleep(Duration::from_millis(100)).await; // the close reaches this side
        let s2 = server_at(port, true).await;
        get(&u, &format!("http://a.example.test:{port}/0")).await;
        assert_eq!(s2.accepted.load(Ordering::SeqCst), 1, "a new connection to the new upstream");
        assert_eq!(u.idle_connections(), 1);
    }

    #[tokio::test]
    async fn connections_are_never_shared_between_names() {
        let s = server(true).await;
        let u = upstream();
        for name in ["a.example.test", "b.example.test", "a.example.test", "b.example.test"] {
            let got = get(&u, &format!("http://{name}:{}/0", s.port)).await;
            assert!(got.starts_with(name), "{got}");
        }
        assert_eq!(s.accepted.load(Ordering::SeqCst), 2, "one connection per name");
        assert_eq!(u.idle_connections(), 2);
    }

    #[tokio::test]
    async fn a_name_that_is_not_a_host_name_is_refused_before_any_connection() {
        let u = upstream();
        for uri in ["http://127.0.0.1:80/", "ftp://a.example.test/", "/relative"] {
            let err = u.send(request(uri)).await.expect_err(uri);
            assert!(err.is_connect(), "{uri}: {err}");
        }
    }
}
