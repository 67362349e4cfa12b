//! The intercepting proxy: every TCP connection an agent opens arrives here (the kernel's
//! redirect), and every HTTP request on it is decided before anything leaves the host.
//!
//! A connection's path, top to bottom:
//! 1. [`Proxy::serve`] accepts on `127.0.0.1` and `::1` under a fixed connection budget: over
//!    the budget, new connections are closed at once (a flood gets refusals, never a way around
//!    the checks).
//! 2. [`conn`] looks the connection up in the kernel's connection table (no entry: closed), finds
//!    the sandbox's passport by cgroup (none: closed), maps a synthetic destination back to its
//!    name, and sniffs the first bytes ([`sniff`]): TLS, plain HTTP, or anything else.
//! 3. TLS is terminated with a leaf minted by the local CA ([`ca`]) for the SNI, ALPN `h2` or
//!    `http/1.1`; plain HTTP is served as is; anything else goes to [`raw`] (default block).
//! 4. [`http`] runs one task per request (keep-alive and HTTP/2 streams alike): host checks
//!    ([`checks`]: fronting, smuggling), host policy route → action and cost, the decision
//!    (through [`decider::Decide`], which `service::Service` implements; durable before
//!    anything is forwarded), then forward through [`upstream`] / wait on the hold / answer
//!    `403` with the decision JSON. What `conn`, `http` and `raw` share lives in [`answer`].

/// `AsyncWrite` for a read-side wrapper `$t<S>` with a field `inner: S`: every write call goes
/// to `inner` unchanged.
macro_rules! delegate_async_write {
    ($t:ident) => {
        impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $t<S> {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
            }
            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
            }
            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
            }
            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }
        }
    };
}

mod answer;
pub mod ca;
pub mod checks;
mod conn;
mod decider;
// Public only for the fuzz targets (fuzz/fuzz_targets/h1watch.rs); not an API.
#[doc(hidden)]
pub mod h1watch;
mod http;
mod metered;
mod prefixed;
mod raw;
pub mod sniff;
pub mod upstream;

use crate::decide::CompiledPassport;
use crate::dns::{SyntheticPool, UpstreamResolver};
use crate::kernel::Conntable;
use crate::policy::PolicyHandle;
use crate::service::Service;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Semaphore};

/// Maps a connection's cgroup id to the passport of its sandbox (`None`: not a sandbox; the
/// connection is closed). The daemon passes `Service::passport_for_cgroup`; tests pass a map.
pub type PassportLookup = Arc<dyn Fn(u64) -> Option<Arc<CompiledPassport>> + Send + Sync>;

/// Bounds that keep one agent (or a flood) from exhausting the daemon.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections handled at once; more are closed at accept.
    pub max_connections: usize,
    /// Time to receive enough bytes to classify a connection; a silent client is then raw TCP.
    pub sniff_timeout: Duration,
    /// TLS handshake with the agent.
    pub handshake_timeout: Duration,
    /// HTTP/1 request head.
    pub header_timeout: Duration,
    /// HTTP/2 streams per connection.
    pub max_streams: u32,
    /// HTTP/1 read buffer (bounds a request head) and HTTP/2 header list.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            sniff_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            max_streams: 128,
            max_header_bytes: 64 * 1024,
        }
    }
}

/// What the proxy is built from.
pub struct ProxyParts {
    pub service: Arc<Service>,
    pub policy: Arc<PolicyHandle>,
    pub conntable: Arc<Conntable>,
    pub passports: PassportLookup,
    pub pool: Arc<SyntheticPool>,
    pub ca: ca::Ca,
    pub resolver: Arc<UpstreamResolver>,
    pub upstream_tls: Arc<rustls::ClientConfig>,
    /// The proxy's and the resolver's ports: an agent dialing them directly is refused (loop).
    pub proxy_port: u16,
    pub dns_port: u16,
    pub limits: Limits,
}

/// Counters, for logs, health and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    /// Closed at accept: over [`Limits::max_connections`].
    pub over_limit: AtomicU64,
    /// Closed: no connection-table entry (did not come through the redirect).
    pub unknown: AtomicU64,
    /// Closed: the cgroup is not a sandbox with a passport.
    pub no_passport: AtomicU64,
    pub requests: AtomicU64,
    pub forwarded: AtomicU64,
    pub blocked: AtomicU64,
    pub held: AtomicU64,
    pub upstream_errors: AtomicU64,
    pub raw_connections: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    pub accepted: u64,
    pub over_limit: u64,
    pub unknown: u64,
    pub no_passport: u64,
    pub requests: u64,
    pub forwarded: u64,
    pub blocked: u64,
    pub held: u64,
    pub upstream_errors: u64,
    pub raw_connections: u64,
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The proxy's shared state. Cheap to share (`Arc`).
pub struct Proxy {
    /// The service calls the proxy makes ([`decider::Decide`]; the daemon's `Service`).
    service: Arc<dyn decider::Decide>,
    policy: Arc<PolicyHandle>,
    conntable: Arc<Conntable>,
    passports: PassportLookup,
    pool: Arc<SyntheticPool>,
    tls: Arc<rustls::ServerConfig>,
    resolver: Arc<UpstreamResolver>,
    upstream: upstream::Upstream,
    own_ports: [u16; 2],
    limits: Limits,
    slots: Arc<Semaphore>,
    stats: Stats,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("own_ports", &self.own_ports)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Proxy {
    pub fn new(parts: ProxyParts) -> Result<Arc<Proxy>, ca::CaError> {
        let tls = parts.ca.server_config()?;
        let upstream = upstream::Upstream::new(parts.resolver.clone(), parts.upstream_tls);
        Ok(Arc::new(Proxy {
            service: parts.service,
            policy: parts.policy,
            conntable: parts.conntable,
            passports: parts.passports,
            pool: parts.pool,
            tls,
            resolver: parts.resolver,
            upstream,
            own_ports: [parts.proxy_port, parts.dns_port],
            slots: Arc::new(Semaphore::new(parts.limits.max_connections.max(1))),
            limits: parts.limits,
            stats: Stats::default(),
        }))
    }

    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.stats;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            accepted: g(&s.accepted),
            over_limit: g(&s.over_limit),
            unknown: g(&s.unknown),
            no_passport: g(&s.no_passport),
            requests: g(&s.requests),
            forwarded: g(&s.forwarded),
            blocked: g(&s.blocked),
            held: g(&s.held),
            upstream_errors: g(&s.upstream_errors),
            raw_connections: g(&s.raw_connections),
        }
    }

    /// Accepts on every listener until `stop` turns true. Connections in flight are not waited
    /// for (the runtime's shutdown ends them).
    pub async fn serve(self: Arc<Self>, listeners: Vec<TcpListener>, stop: watch::Receiver<bool>) {
        let mut tasks = tokio::task::JoinSet::new();
        for listener in listeners {
            tasks.spawn(self.clone().accept_loop(listener, stop.clone()));
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off rather than spin; established connections go on.
                    tracing::warn!(error = %e, "proxy accept failed; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            inc(&self.stats.accepted);
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                // Over budget: close now. The kernel table entry is taken too, so it cannot be
                // claimed by anyone else later.
                inc(&self.stats.over_limit);
                let _ = self.conntable.lookup(peer);
                drop(stream);
                tracing::warn!(%peer, "proxy: too many connections; closing");
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let _slot = slot;
                conn::handle(this, stream, peer).await;
            });
        }
    }
}

/// Binds the proxy port on `127.0.0.1` and `::1`.
pub fn bind(port: u16) -> io::Result<Vec<TcpListener>> {
    let mut out = Vec::with_capacity(2);
    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        let addr = SocketAddr::new(ip, port);
        let socket = if ip.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(addr).map_err(|e| io::Error::new(e.kind(), format!("binding the proxy on {addr}: {e}")))?;
        out.push(socket.listen(1024)?);
    }
    Ok(out)
}
