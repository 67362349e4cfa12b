//! The intercepting proxy: every TCP connection an agent opens arrives here (the kernel's
//! redirect), and every HTTP request on it is decided before anything leaves the host.
//!
//! A connection's path, top to bottom:
//! 1. [`Proxy::serve`] accepts on `127.0.0.1` and `::1`, takes the connection's entry from the
//!    kernel's connection table (no entry: closed) and admits it under two budgets: all sandboxes
//!    together ([`Limits::max_connections`]) and its own sandbox, by the entry's cgroup
//!    ([`Limits::max_connections_per_sandbox`]). Over either, it is closed at once and counted (a
//!    flood gets refusals, never a way around the checks, and one sandbox cannot take the
//!    others' share).
//! 2. [`conn`] finds the sandbox's passport by cgroup (none: closed), maps a synthetic
//!    destination back to its name, and sniffs the first bytes ([`sniff`]): TLS, plain HTTP, or
//!    anything else.
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
pub mod gate;
// Public only for the fuzz targets (fuzz/fuzz_targets/h1watch.rs); not an API.
#[doc(hidden)]
pub mod h1watch;
mod http;
mod metered;
mod prefixed;
mod raw;
pub mod sniff;
#[cfg(test)]
mod testing;
pub mod upstream;

use crate::decide::CompiledPassport;
use crate::dns::{SyntheticPool, UpstreamResolver};
use crate::kernel::{Conntable, OrigDst};
use crate::policy::PolicyHandle;
use crate::service::{Service, StopSet};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Semaphore};

/// Maps a connection's cgroup id to the passport of its sandbox (`None`: not a sandbox; the
/// connection is closed). The daemon passes `Service::passport_for_cgroup`; tests pass a map.
pub type PassportLookup = Arc<dyn Fn(u64) -> Option<Arc<CompiledPassport>> + Send + Sync>;

/// Where redirected connections were going: the kernel's connection table, whose entry for an
/// accepted connection is taken once ([`Conntable::lookup`]). A trait so that the proxy's unit
/// tests can stand in for the kernel.
pub trait Redirects: Send + Sync {
    /// Takes the entry of the accepted connection whose peer is `client`; `None`: the
    /// connection did not come through the redirect (or its entry is gone), and is closed.
    fn lookup(&self, client: SocketAddr) -> Option<OrigDst>;
}

impl Redirects for Conntable {
    fn lookup(&self, client: SocketAddr) -> Option<OrigDst> {
        Conntable::lookup_proxy(self, client)
    }
}

/// A connection's places in the global budget and in its sandbox's; dropped when it ends.
type Admitted = (tokio::sync::OwnedSemaphorePermit, SandboxSlot);

/// A connection's places in the budgets, shared by everything that carries its bytes: the
/// connection's task and, after a CONNECT or an `Upgrade`, the tunnel that outlives it (which
/// would otherwise let an agent open tunnels past every budget, each CONNECT freeing its place
/// once upgraded). Given back when the last holder ends.
#[derive(Clone)]
pub(super) struct Slot(#[allow(dead_code)] Arc<Admitted>);

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

/// Bounds that keep one agent (or a flood) from exhausting the daemon.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections handled at once, all sandboxes together; more are closed at accept
    /// (`[proxy] max_connections`).
    pub max_connections: usize,
    /// Connections handled at once for one sandbox (by the cgroup its connection-table entry
    /// names); more from that sandbox are closed at accept (`[proxy]
    /// max_connections_per_sandbox`).
    pub max_connections_per_sandbox: usize,
    /// Time to receive enough bytes to classify a connection; a silent client is then raw TCP.
    pub sniff_timeout: Duration,
    /// TLS handshake with the agent.
    pub handshake_timeout: Duration,
    /// HTTP/1 request head (an idle keep-alive connection waiting for one too); an HTTP/2
    /// connection with no request in progress is closed after it as well.
    pub header_timeout: Duration,
    /// HTTP/2 streams per connection.
    pub max_streams: u32,
    /// HTTP/1 read buffer (bounds a request head) and HTTP/2 header list.
    pub max_header_bytes: usize,
    /// At shutdown, how long the connections in flight may take to finish ([`Proxy::drain`]).
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            max_connections_per_sandbox: 1024,
            sniff_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            max_streams: 128,
            max_header_bytes: 64 * 1024,
            drain: DRAIN,
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
    /// `[gates]`: whose requests are signed for which hosts.
    pub gates: gate::Gates,
}

/// Counters, for logs, health and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    /// Closed at accept: over [`Limits::max_connections`].
    pub over_limit: AtomicU64,
    /// Closed at accept: the sandbox was over [`Limits::max_connections_per_sandbox`] (per
    /// sandbox: [`Proxy::sandbox_over_limit`]).
    pub over_sandbox_limit: AtomicU64,
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
    /// Closed: an emergency stop covers the connection's passport (at accept, or while open).
    pub stopped: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    pub accepted: u64,
    pub over_limit: u64,
    pub over_sandbox_limit: u64,
    pub unknown: u64,
    pub no_passport: u64,
    pub requests: u64,
    pub forwarded: u64,
    pub blocked: u64,
    pub held: u64,
    pub upstream_errors: u64,
    pub raw_connections: u64,
    pub stopped: u64,
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The proxy's shared state. Cheap to share (`Arc`).
pub struct Proxy {
    /// The service calls the proxy makes ([`decider::Decide`]; the daemon's `Service`).
    service: Arc<dyn decider::Decide>,
    policy: Arc<PolicyHandle>,
    conntable: Arc<dyn Redirects>,
    passports: PassportLookup,
    pool: Arc<SyntheticPool>,
    tls: Arc<rustls::ServerConfig>,
    resolver: Arc<UpstreamResolver>,
    upstream: upstream::Upstream,
    own_ports: [u16; 2],
    limits: Limits,
    slots: Arc<Semaphore>,
    sandboxes: Arc<SandboxSlots>,
    stats: Stats,
    gates: gate::Gates,
    /// The over-budget warnings (global and per sandbox), at most once a second under a flood.
    refusal_log: crate::throttle::Throttle,
    /// Emergency stops in force: a connection of a stopped passport is closed at once
    /// ([`until_stopped`]).
    stops: watch::Receiver<Arc<StopSet>>,
    /// Turns true once the proxy stopped accepting ([`Proxy::serve`]): every HTTP connection
    /// then finishes the requests it has in progress and closes ([`crate::idle::serve_until_idle`]).
    draining: watch::Sender<bool>,
}

/// At shutdown, how long the connections in flight may take to finish their requests before
/// the rest are cut ([`Limits::drain`]). Below the unit's `TimeoutStopSec` (30 s), which also
/// covers the store's last commits.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Resolves as soon as an emergency stop covers `passport_id` (at once if one does already);
/// never, if the service that sends the stops is gone. Every connection, tunnel and upgraded
/// stream races its work against it, so a stop closes them within one scheduling round.
pub(crate) async fn until_stopped(mut stops: watch::Receiver<Arc<StopSet>>, passport_id: String) {
    if stops.wait_for(|s| s.covers(&passport_id)).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Sandboxes whose refusals are counted one by one; refusals of more sandboxes than this are
/// counted together (`cgroup_id` 0), so a stream of short-lived sandboxes cannot grow the map.
pub const MAX_SANDBOX_SERIES: usize = 1024;

/// Connections in flight per sandbox (by cgroup id), and the connections each sandbox had
/// closed for being over its limit.
#[derive(Debug)]
struct SandboxSlots {
    limit: usize,
    state: Mutex<SandboxState>,
}

#[derive(Debug, Default)]
struct SandboxState {
    /// Only sandboxes with connections in flight: at most [`Limits::max_connections`] entries.
    active: HashMap<u64, usize>,
    /// Bounded by [`MAX_SANDBOX_SERIES`] (plus the `0` overflow entry).
    refused: HashMap<u64, u64>,
}

/// One admitted connection's place in its sandbox's budget; given back on drop.
struct SandboxSlot {
    slots: Arc<SandboxSlots>,
    cgroup_id: u64,
}

impl SandboxSlots {
    fn lock(&self) -> std::sync::MutexGuard<'_, SandboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for `cgroup_id`, or `None` (counted) when the sandbox is at its limit.
    fn acquire(self: &Arc<Self>, cgroup_id: u64) -> Option<SandboxSlot> {
        let mut state = self.lock();
        let active = state.active.entry(cgroup_id).or_insert(0);
        if *active >= self.limit {
            let key = if state.refused.contains_key(&cgroup_id) || state.refused.len() < MAX_SANDBOX_SERIES {
                cgroup_id
            } else {
                0
            };
            *state.refused.entry(key).or_insert(0) += 1;
            return None;
        }
        *active += 1;
        Some(SandboxSlot { slots: Arc::clone(self), cgroup_id })
    }
}

impl Drop for SandboxSlot {
    fn drop(&mut self) {
        let mut state = self.slots.lock();
        if let Some(active) = state.active.get_mut(&self.cgroup_id) {
            *active = active.saturating_sub(1);
            if *active == 0 {
                state.active.remove(&self.cgroup_id);
            }
        }
    }
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
            policy: parts.policy,
            conntable: parts.conntable,
            passports: parts.passports,
            pool: parts.pool,
            tls,
            resolver: parts.resolver,
            upstream,
            own_ports: [parts.proxy_port, parts.dns_port],
            slots: Arc::new(Semaphore::new(parts.limits.max_connections.max(1))),
            sandboxes: Arc::new(SandboxSlots {
                limit: parts.limits.max_connections_per_sandbox.max(1),
                state: Mutex::default(),
            }),
            limits: parts.limits,
            stats: Stats::default(),
            gates: parts.gates,
            refusal_log: crate::throttle::Throttle::new(Duration::from_secs(1)),
            stops: parts.service.stop_watch(),
            draining: watch::Sender::new(false),
            service: parts.service,
        }))
    }

    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.stats;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            accepted: g(&s.accepted),
            over_limit: g(&s.over_limit),
            over_sandbox_limit: g(&s.over_sandbox_limit),
            unknown: g(&s.unknown),
            no_passport: g(&s.no_passport),
            requests: g(&s.requests),
            forwarded: g(&s.forwarded),
            blocked: g(&s.blocked),
            held: g(&s.held),
            upstream_errors: g(&s.upstream_errors),
            raw_connections: g(&s.raw_connections),
            stopped: g(&s.stopped),
        }
    }

    /// Connections closed at accept because their sandbox was over its limit, by cgroup id
    /// (`0`: sandboxes beyond [`MAX_SANDBOX_SERIES`]), sorted by cgroup id.
    pub fn sandbox_over_limit_counts(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = self.sandboxes.lock().refused.iter().map(|(k, v)| (*k, *v)).collect();
        out.sort_unstable();
        out
    }

    /// Connections in flight for the sandbox `cgroup_id`.
    pub fn sandbox_active(&self, cgroup_id: u64) -> usize {
        self.sandboxes.lock().active.get(&cgroup_id).copied().unwrap_or(0)
    }

    /// Accepts on every listener until `stop` turns true, then drains ([`Proxy::drain`]).
    pub async fn serve(self: Arc<Self>, listeners: Vec<TcpListener>, stop: watch::Receiver<bool>) {
        let mut tasks = tokio::task::JoinSet::new();
        for listener in listeners {
            tasks.spawn(self.clone().accept_loop(listener, stop.clone()));
        }
        while tasks.join_next().await.is_some() {}
        self.drain().await;
    }

    /// The end of the proxy's life, once it stopped accepting (its listeners are closed, so new
    /// connections are refused): every HTTP connection is asked to close once its requests in
    /// progress are answered (an idle keep-alive at once; HTTP/2 with a GOAWAY), and this waits
    /// up to [`Limits::drain`] for every connection (tunnels included) to end, and for the
    /// metered costs of the responses that ended to be settled. What is still open then (a
    /// tunnel, an upgraded stream, a request held for approval, a slow upstream) is cut when the
    /// caller's runtime ends. Each of the daemon's proxy threads calls it (each keeps its own
    /// connections running meanwhile); the first one logs.
    ///
    /// It watches the counts rather than taking every place in the budget: a waiter holding
    /// some of the places would make the other threads' counts wrong.
    pub async fn drain(&self) {
        let first = self.draining.send_if_modified(|d| !std::mem::replace(d, true));
        let open = self.open_connections();
        let limit = self.limits.drain;
        if first && open > 0 {
            tracing::info!(open, "proxy: letting the connections in flight finish (up to {limit:?})");
        }
        let deadline = tokio::time::Instant::now() + limit;
        while self.open_connections() > 0 || metered::settling() > 0 {
            if tokio::time::Instant::now() >= deadline {
                if first {
                    tracing::warn!(
                        open,
                        cut = self.open_connections(),
                        unsettled = metered::settling(),
                        "proxy: connections still open after the {limit:?} drain are cut"
                    );
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Agent connections in flight (accepted and within the budget).
    pub fn open_connections(&self) -> usize {
        self.limits.max_connections.max(1).saturating_sub(self.slots.available_permits())
    }

    /// Resolves once the proxy is draining ([`Proxy::drain`]): at once if it is already.
    pub(crate) fn until_draining(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.draining.subscribe();
        async move {
            // The sender lives as long as the proxy, which outlives its connections.
            let _ = rx.wait_for(|d| *d).await;
        }
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
            let Some((orig, admitted)) = self.take(peer) else {
                drop(stream);
                continue;
            };
            let this = self.clone();
            tokio::spawn(conn::handle(this, stream, peer, orig, Some(Slot(Arc::new(admitted)))));
        }
    }
}

impl Proxy {
    /// The first step of every accepted connection: its connection-table entry (taken first,
    /// whatever happens next, so that no one can claim it later; one syscall, no await in
    /// between) and its places in the budgets. `None` (counted, logged): the caller closes it.
    fn take(&self, peer: SocketAddr) -> Option<(OrigDst, Admitted)> {
        inc(&self.stats.accepted);
        let Some(orig) = self.conntable.lookup(peer) else {
            inc(&self.stats.unknown);
            tracing::warn!(%peer, "connection without a connection-table entry; closing");
            return None;
        };
        let admitted = self.admit(&orig)?;
        Some((orig, admitted))
    }

    /// The connection's places in the global and in its sandbox's budget, or `None` (counted,
    /// logged) when either is exhausted: the caller closes the connection.
    fn admit(&self, orig: &OrigDst) -> Option<Admitted> {
        // A flood is refused thousands of times a second: one line a second at most, with the
        // count of refusals left out since the last line (the counters have them all).
        let Ok(global) = self.slots.clone().try_acquire_owned() else {
            inc(&self.stats.over_limit);
            if let Some(left_out) = self.refusal_log.admit(std::time::Instant::now()) {
                tracing::warn!(
                    cgroup_id = orig.cgroup_id,
                    pid = orig.pid,
                    limit = self.limits.max_connections,
                    left_out,
                    "proxy: too many connections; closing"
                );
            }
            return None;
        };
        let Some(sandbox) = self.sandboxes.acquire(orig.cgroup_id) else {
            inc(&self.stats.over_sandbox_limit);
            if let Some(left_out) = self.refusal_log.admit(std::time::Instant::now()) {
                tracing::warn!(
                    cgroup_id = orig.cgroup_id,
                    pid = orig.pid,
                    limit = self.limits.max_connections_per_sandbox,
                    left_out,
                    "proxy: the sandbox has too many connections; closing"
                );
            }
            return None;
        };
        Some((global, sandbox))
    }
}

/// Listen backlog of the proxy's sockets (the kernel caps it at `net.core.somaxconn`). When a
/// burst of connects overflows the accept queue, the kernel answers with SYN cookies and keeps no
/// state: such a connection reaches `accept` only when the agent sends its first packet, and one
/// the agent closes before that is never served. A deep queue keeps bursts of thousands of
/// connects out of that path.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Raises this process's soft limit on open files to its hard limit and returns the soft limit
/// now in force. Each forwarded connection takes two descriptors (agent and upstream); the usual
/// soft limit outside systemd (1,024) would make `accept` fail long before
/// [`Limits::max_connections`] (the unit sets `LimitNOFILE=65536`).
pub fn raise_fd_limit() -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
        return Ok(hard);
    }
    Ok(soft)
}

/// Descriptors the proxy may need at `max_connections`: two per forwarded connection, and
/// some for the daemon itself (store, API, listeners, resolver).
pub fn fds_needed(max_connections: usize) -> u64 {
    (max_connections as u64).saturating_mul(2).saturating_add(256)
}

/// Binds the proxy port on `127.0.0.1` and `::1`.
pub fn bind(port: u16) -> io::Result<Vec<TcpListener>> {
    bind_with(port, false)
}

/// Binds the proxy port on `127.0.0.1` and `::1` with `SO_REUSEPORT`, for one of several
/// runtime threads that each accept on listeners of their own ([`shards`]): the kernel spreads
/// incoming connections over the group by their addresses, and a connection is served start to
/// end on the thread that accepted it. Call [`check_port_free`] first: `SO_REUSEPORT` alone
/// would also join a group another process (of the same user) holds.
pub fn bind_shard(port: u16) -> io::Result<Vec<TcpListener>> {
    bind_with(port, true)
}

fn bind_with(port: u16, reuseport: bool) -> io::Result<Vec<TcpListener>> {
    let mut out = Vec::with_capacity(2);
    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        let addr = SocketAddr::new(ip, port);
        let socket = if ip.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        if reuseport {
            socket.set_reuseport(true)?;
        }
        socket.bind(addr).map_err(|e| io::Error::new(e.kind(), format!("binding the proxy on {addr}: {e}")))?;
        out.push(socket.listen(LISTEN_BACKLOG)?);
    }
    Ok(out)
}

/// Fails (`AddrInUse`, naming the address) when anything listens on the proxy port already: a
/// plain bind, without `SO_REUSEPORT`, on both addresses, released at once.
pub fn check_port_free(port: u16) -> io::Result<()> {
    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        let addr = SocketAddr::new(ip, port);
        std::net::TcpListener::bind(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("binding the proxy on {addr}: {e}")))?;
    }
    Ok(())
}

/// How many runtime threads serve the proxy: one per CPU the daemon may run on, at most
/// [`MAX_SHARDS`].
pub fn shards() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_SHARDS)
}

/// The most proxy runtime threads [`shards`] starts.
pub const MAX_SHARDS: usize = 16;

impl crate::metrics::AdmissionCounters for Proxy {
    fn accepted_and_over_limit(&self) -> (u64, u64) {
        let s = self.stats();
        (s.accepted, s.over_limit)
    }
    fn sandbox_over_limit(&self) -> Vec<(u64, u64)> {
        self.sandbox_over_limit_counts()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_file_limit_is_raised_to_the_hard_one() {
        use nix::sys::resource::{getrlimit, Resource};
        let soft = raise_fd_limit().unwrap();
        let (now_soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, now_soft);
        assert_eq!(now_soft, hard);
        // Idempotent.
        assert_eq!(raise_fd_limit().unwrap(), soft);
    }

    /// The per-thread listeners share the port; a port anyone holds is refused before they are
    /// bound, and a plain bind (another daemon) cannot join them.
    #[tokio::test]
    async fn shard_listeners_share_the_port_and_a_taken_port_is_refused() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        check_port_free(port).expect("free");
        let first = bind_shard(port).expect("first shard");
        let second = bind_shard(port).expect("second shard");
        let err = check_port_free(port).expect_err("taken");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains(&port.to_string()), "{err}");
        assert!(bind(port).is_err(), "a plain bind does not join the group");
        // Connections reach one listener of the group.
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.expect("connect"));
        }
        let mut accepted = 0;
        for l in [&first[0], &second[0]] {
            while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), l.accept()).await {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 8);
        assert!((1..=MAX_SHARDS).contains(&shards()));
    }

    #[test]
    fn descriptors_needed_count_both_legs_and_never_overflow() {
        assert_eq!(fds_needed(4096), 8448);
        assert_eq!(fds_needed(usize::MAX), u64::MAX);
    }

    fn slots(limit: usize) -> Arc<SandboxSlots> {
        Arc::new(SandboxSlots { limit, state: Mutex::default() })
    }

    #[test]
    fn one_sandbox_at_its_limit_does_not_take_another_sandboxes_share() {
        let s = slots(3);
        let flooder: Vec<_> = (0..3).map(|_| s.acquire(7).expect("under the limit")).collect();
        for _ in 0..10 {
            assert!(s.acquire(7).is_none(), "over the limit");
        }
        let quiet: Vec<_> = (0..3).map(|_| s.acquire(8).expect("another sandbox is unaffected")).collect();
        assert_eq!(s.lock().refused.get(&7), Some(&10));
        assert_eq!(s.lock().refused.get(&8), None);
        // A slot given back is usable again; a sandbox with none in flight leaves no entry.
        drop(flooder);
        assert!(!s.lock().active.contains_key(&7));
        let again = s.acquire(7).expect("slots came back");
        drop((again, quiet));
        assert!(s.lock().active.is_empty());
    }

    #[test]
    fn refusals_of_endless_sandboxes_stay_bounded() {
        let s = slots(1);
        let held: Vec<_> = (0..MAX_SANDBOX_SERIES as u64 + 50).map(|id| s.acquire(id + 1).unwrap()).collect();
        for id in 0..MAX_SANDBOX_SERIES as u64 + 50 {
            assert!(s.acquire(id + 1).is_none());
        }
        let state = s.lock();
        assert_eq!(state.refused.len(), MAX_SANDBOX_SERIES + 1, "{} series", state.refused.len());
        assert_eq!(state.refused.get(&0), Some(&50), "the overflow is counted together");
        drop(state);
        drop(held);
    }
}
