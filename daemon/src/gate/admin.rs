//! The running gate's export socket: `state_dir/gate.sock` (mode 0600, in the 0700 state
//! directory: the gate's own user only), so `sluice gate audit export` works while the gate
//! serves. One request: `GET /export`, answered with a full export streamed from one snapshot
//! (the format of `sluice audit export`); anything else is 404.

use crate::ledger::export::{export_stream, ExportRequest};
use crate::ledger::Ledger;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
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

/// Serves exports until the task is dropped.
pub async fn serve(listener: UnixListener, ledger: Ledger) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let ledger = ledger.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let ledger = ledger.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&ledger, &req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
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
    Response::new(ChannelBody { rx }.boxed())
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    let doc = serde_json::json!({"error": "gate", "message": message});
    let mut resp = Response::new(Full::new(Bytes::from(doc.to_string())).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp
}

struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        self.rx.poll_recv(cx).map(|part| part.map(|r| r.map(hyper::body::Frame::data)))
    }
}
