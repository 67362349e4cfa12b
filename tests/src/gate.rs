//! What the gate end-to-end tests share: the protected service behind the gate, and a daemon
//! whose agents reach the gate by name and whose requests to it are signed and priced.

use crate::daemon::Daemon;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The gate's host name, mapped to 127.0.0.1 by the daemon's `static_hosts`.
pub const GATE: &str = "shipping.example.test";

/// What reached the service: each request's path and its `Sluice-Passport-Id` (set by the gate).
pub type Reached = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// The protected service: plain HTTP on a free loopback port; records what reached it and
/// answers `ok <path>`. Returns its port.
pub fn start_service(rt: &tokio::runtime::Runtime) -> (u16, Reached) {
    let listener = rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0))).unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Reached = Arc::default();
    let st = seen.clone();
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let st = st.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let st = st.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let id =
                            req.headers().get("sluice-passport-id").and_then(|v| v.to_str().ok()).map(String::from);
                        let _ = req.into_body().collect().await;
                        st.lock().unwrap().push((path.clone(), id));
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("ok {path}")))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (port, seen)
}

/// A daemon (no host policies) that resolves [`GATE`] to 127.0.0.1, trusts `ca` upstream, and
/// treats [`GATE`] as a gate (`[gates] hosts`).
pub fn start_daemon(ca: &Path) -> Daemon {
    Daemon::start_full(
        "root",
        "",
        &format!("static_hosts = {{ \"{GATE}\" = \"127.0.0.1\" }}"),
        &format!("[upstream_tls]\nextra_roots = [\"{}\"]\n[gates]\nhosts = [\"{GATE}\"]\n", ca.display()),
        &[],
    )
}
