//! The operator's web console (docs/console.md), served by the daemon on `[console] listen`
//! (loopback only; off unless set).
//!
//! `auth` owns the token file, sessions, CSRF tokens, the login-failure limit and the
//! `Host`/`Origin` checks; `routes` the requests; `sse` the live event stream and the page's
//! data; `assets` the HTML, CSS and JavaScript built into the binary. Every read and every action
//! goes through the same [`Service`] the local API uses; the console holds no rule of its own.
//!
//! Agents never reach it: the kernel redirects every connection an agent makes, loopback
//! included, to the proxy, which decides it like any other (`tests/tests/kernel_console.rs`).

pub mod assets;
pub mod auth;
pub mod routes;
pub mod sse;

use crate::config::ConsoleConfig;
use crate::service::{LogVerification, Peer, Service};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, std::convert::Infallible>;

/// The name records give the console's user (`resolved_by.user` of a hold resolution).
pub const CONSOLE_USER: &str = "console";
/// Connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 64;
/// A request head must arrive whole within this time, and at most this many bytes of it.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// What the request handlers share.
pub struct Ctx {
    service: Arc<Service>,
    token: auth::Token,
    sessions: auth::Sessions,
    limiter: auth::LoginLimiter,
    origins: auth::Origins,
    /// Where "verify now" writes its (unlinked) scratch export.
    state_dir: PathBuf,
    /// Who a console action is attested as: the daemon's own uid and pid, user `console`.
    peer: Peer,
    /// One "verify now" at a time.
    verifying: tokio::sync::Mutex<()>,
    verification: Mutex<Option<LogVerification>>,
    /// Event streams open.
    streams: Arc<tokio::sync::Semaphore>,
    /// Woken after a console action so open streams send the change at once.
    changed: tokio::sync::Notify,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Ctx {
    fn last_verification(&self) -> Option<LogVerification> {
        self.verification.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_verification(&self, v: LogVerification) {
        *self.verification.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("[console] token: {0}")]
    Token(#[from] auth::TokenError),
    #[error("[console] listen = \"{addr}\": cannot listen there: {source} (is another process using the port?)")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// The console, bound and ready to serve.
pub struct Console {
    listener: TcpListener,
    ctx: Arc<Ctx>,
}

impl Console {
    /// Loads (or creates) the token in `state_dir` and binds `[console] listen`. `None` when the
    /// console is off.
    pub async fn start(
        config: &ConsoleConfig,
        state_dir: &Path,
        service: Arc<Service>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<Console>, ConsoleError> {
        let Some(addr) = config.listen else { return Ok(None) };
        let token = auth::Token::load_or_create(state_dir)?;
        let listener = TcpListener::bind(addr).await.map_err(|source| ConsoleError::Bind { addr, source })?;
        // The address as bound (a test's port 0 becomes the real port): `Host` and `Origin` name it.
        let bound = listener.local_addr().map_err(|source| ConsoleError::Bind { addr, source })?;
        let peer = Peer {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            pid: std::process::id() as i32,
            user: Some(CONSOLE_USER.into()),
        };
        let ctx = Ctx {
            service,
            token,
            sessions: auth::Sessions::new(Duration::from_secs(config.session_secs)),
            limiter: auth::LoginLimiter::default(),
            origins: auth::Origins::for_listen(bound),
            state_dir: state_dir.to_path_buf(),
            peer,
            verifying: tokio::sync::Mutex::new(()),
            verification: Mutex::new(None),
            streams: Arc::new(tokio::sync::Semaphore::new(sse::MAX_STREAMS)),
            changed: tokio::sync::Notify::new(),
            shutdown,
        };
        Ok(Some(Console { listener, ctx: Arc::new(ctx) }))
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the shutdown signal given to [`Console::start`] fires.
    pub async fn serve(self) {
        let Console { listener, ctx } = self;
        let mut shutdown = ctx.shutdown.clone();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = shutdown.changed() => return,
            };
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "console: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let ctx = ctx.clone();
            let mut stop = ctx.shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let svc = hyper::service::service_fn(move |req| {
                    let ctx = ctx.clone();
                    async move { Ok::<_, std::convert::Infallible>(routes::handle(req, ctx).await) }
                });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).max_buf_size(MAX_HEAD_BYTES);
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => if let Err(e) = r { tracing::debug!(error = %e, "console: connection ended with an error") },
                    _ = stop.changed() => {}
                }
            });
        }
    }
}

#[cfg(test)]
mod tests;
