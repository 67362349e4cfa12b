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
//! * **Connections are pooled per (scheme, name, port)** by hyper-util's client, so a connection
//!   opened and verified for one name is never reused for another. ALPN offers `h2` and
//!   `http/1.1`; the pool multiplexes HTTP/2 streams.

use crate::dns::UpstreamResolver;
use crate::domain::DomainName;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
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

/// The rustls client configuration for upstream connections: ring, TLS 1.2/1.3, ALPN h2 then
/// http/1.1, roots from webpki, `system_bundle` (if it exists) and every `extra_roots` file (each
/// must exist and hold at least one certificate).
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
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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

/// The pooled upstream clients: one offering `h2` and `http/1.1`, and one offering only
/// `http/1.1` for protocol upgrades (WebSocket), which HTTP/2 cannot carry.
#[derive(Clone)]
pub struct Upstream {
    client: Client<Connector, ProxyBody>,
    h1_client: Client<Connector, ProxyBody>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Upstream")
    }
}

impl Upstream {
    pub fn new(resolver: Arc<UpstreamResolver>, tls: Arc<ClientConfig>) -> Upstream {
        let mut h1_tls = (*tls).clone();
        h1_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let build = |tls: Arc<ClientConfig>| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(POOL_IDLE)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .build(Connector { resolver: resolver.clone(), tls: TlsConnector::from(tls) })
        };
        Upstream { client: build(tls), h1_client: build(Arc::new(h1_tls)) }
    }

    /// Sends `req` (its URI names scheme, host and port) and returns the response head; the
    /// response body streams.
    pub async fn send(
        &self,
        req: http::Request<ProxyBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        self.client.request(req).await
    }

    /// As [`Upstream::send`], always over HTTP/1.1 (for `Upgrade` requests).
    pub async fn send_h1(
        &self,
        req: http::Request<ProxyBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        self.h1_client.request(req).await
    }
}

/// Connects to what the daemon resolves for the URI's host, with TLS for `https`.
#[derive(Clone)]
pub struct Connector {
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
}

impl ConnectError {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::BadUri(_) => "uri",
            ConnectError::Resolve { .. } => "resolve",
            ConnectError::Connect { .. } => "connect",
            ConnectError::Tls { .. } => "tls",
        }
    }
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = UpstreamIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect(uri).await })
    }
}

impl Connector {
    async fn connect(self, uri: http::Uri) -> Result<UpstreamIo, ConnectError> {
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(ConnectError::BadUri(uri.to_string())),
        };
        let name =
            uri.host().and_then(|h| DomainName::parse(h).ok()).ok_or_else(|| ConnectError::BadUri(uri.to_string()))?;
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let (tcp, addr) = dial(&self.resolver, &name, port).await?;
        let _ = tcp.set_nodelay(true);
        if !tls {
            return Ok(UpstreamIo { inner: Inner::Plain(tcp), h2: false });
        }
        let server_name =
            ServerName::try_from(name.as_str().to_string()).map_err(|_| ConnectError::BadUri(uri.to_string()))?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, self.tls.connect(server_name, tcp))
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
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.h2 {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

macro_rules! io_delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.get_mut().inner {
            Inner::Plain($s) => {
                let mut io = TokioIo::new($s);
                let $s = Pin::new(&mut io);
                $e
            }
            Inner::Tls($s) => {
                let mut io = TokioIo::new(&mut **$s);
                let $s = Pin::new(&mut io);
                $e
            }
        }
    };
}

impl Read for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        io_delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl Write for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        io_delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        io_delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        io_delegate!(self, s => s.poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        io_delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Inner::Plain(s) => tokio::io::AsyncWrite::is_write_vectored(s),
            Inner::Tls(s) => tokio::io::AsyncWrite::is_write_vectored(&**s),
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
