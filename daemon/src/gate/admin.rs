//! The running gate's admin socket: `state_dir/gate.sock` (mode 0600, in the 0700 state
//! directory: the gate's own user only), so the commands that need the gate's store work while
//! the gate serves (it holds the store). Requests:
//! - `GET /export`: a full export streamed from one snapshot (the format of `sluice audit
//!   export`), for `sluice gate audit export`;
//! - `POST /catalog/impact` and `POST /catalog/publish` (a [`PublishRequest`] as JSON), for
//!   `sluice catalog impact` and `publish`.
//!
//! Anything else is 404.

use super::catalog::{self, PublishRequest};
use super::Gate;
use crate::ledger::export::{export_stream, ExportRequest};
use crate::ledger::Ledger;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::UnixListener;

const PART: usize = 128 * 1024;
const PARTS_IN_FLIGHT: usize = 4;

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// The socket of the gate whose state is in `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("gate.sock")
}

/// Binds the socket, replacing a stale one; refuses if another gate answers on it.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    crate::unixsock::bind(path, 0o600, "remove it", "another gate runs on this state_dir")
}

/// Serves the socket until `shutdown` resolves; then lets the requests in flight finish for up
/// to [`super::server::DRAIN`] and cuts the rest. When this returns no connection task is left
/// holding the store.
pub async fn serve(
    listener: UnixListener,
    gate: Arc<Gate>,
    ledger: Ledger,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "gate: admin socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let ledger = ledger.clone();
        let gate = gate.clone();
        let mut stop = stop.clone();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let ledger = ledger.clone();
                let gate = gate.clone();
                async move {
                    let resp = if req.uri().path().starts_with("/catalog/") {
                        catalog_request(&gate, &ledger, req).await
                    } else {
                        handle(&ledger, &req).await
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    super::server::drain(conns, stop_tx, "admin connections").await;
}

async fn handle(ledger: &Ledger, req: &Request<hyper::body::Incoming>) -> Response<Body> {
    if req.method() != Method::GET || req.uri().path() != "/export" {
        return error(StatusCode::NOT_FOUND, "the gate's socket answers GET /export only");
    }
    if let Err(e) = ledger.checkpoint_now().await {
        return error(StatusCode::SERVICE_UNAVAILABLE, &format!("signing a checkpoint failed: {e}"));
    }
    let mut stream = match export_stream(ledger, &ExportRequest::default()).await {
        Ok(s) => s,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &format!("the export failed: {e}")),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(PARTS_IN_FLIGHT);
    tokio::task::spawn_blocking(move || loop {
        let mut part = Vec::with_capacity(PART + PART / 2);
        let (part, more) = match stream.fill(&mut part, PART) {
            Ok(more) => (Ok(Bytes::from(part)), more),
            Err(e) => {
                tracing::error!(error = %e, "gate: export failed midway; response cut short");
                (Err(std::io::Error::other(e.to_string())), false)
            }
        };
        if tx.blocking_send(part).is_err() || !more {
            return;
        }
    });
    Response::new(crate::httpbody::ChannelBody::new(rx).boxed())
}

/// The largest request body read (a draft is at most 1 MiB, as JSON text a little more).
const MAX_REQUEST: usize = 3 << 20;

async fn catalog_request(gate: &Gate, ledger: &Ledger, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if req.method() != Method::POST || !["/catalog/impact", "/catalog/publish"].contains(&path.as_str()) {
        return error(StatusCode::NOT_FOUND, "the gate's socket answers POST /catalog/impact and /catalog/publish");
    }
    let body = match http_body_util::Limited::new(req.into_body(), MAX_REQUEST).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, &format!("the request cannot be read: {e}")),
    };
    let request: PublishRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("the request is not a catalog request: {e}")),
    };
    if path == "/catalog/impact" {
        let draft_path = gate.config.catalog.clone().unwrap_or_else(|| "catalog.toml".into());
        return match catalog::parse_draft(&draft_path, &request.draft) {
            Ok(d) => {
                let imp = catalog::impact(gate.catalogs.latest().as_deref(), &d, &gate.config);
                json_response(StatusCode::OK, &imp.to_json())
            }
            Err(e) => coded(StatusCode::BAD_REQUEST, e.code(), &e.to_string()),
        };
    }
    match catalog::publish(gate, ledger, request, chrono::Utc::now()).await {
        Ok(outcome) => {
            tracing::info!(version = outcome.published.version(), content_hash = %outcome.published.signed.content_hash, "gate: catalog published");
            json_response(StatusCode::OK, &outcome.to_json())
        }
        Err(e @ catalog::PublishError::Store(_)) => coded(StatusCode::SERVICE_UNAVAILABLE, e.code(), &e.to_string()),
        Err(e) => coded(StatusCode::CONFLICT, e.code(), &e.to_string()),
    }
}

fn json_response(status: StatusCode, doc: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(doc.to_string())).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp
}

fn coded(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(status, &serde_json::json!({"error": code, "message": message}))
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    let doc = serde_json::json!({"error": "gate", "message": message});
    let mut resp = Response::new(Full::new(Bytes::from(doc.to_string())).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp
}
