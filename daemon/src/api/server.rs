//! The local API server: HTTP/1.1 over a Unix socket (the contract: docs/api.md).
//!
//! Each connection's peer credentials are checked once, before any request is read; a refused
//! caller gets `403` with the reason on every request. Handlers only parse and route: the work is
//! done by [`Service`], which the proxy uses too.

use super::access::{Peer, PeerPolicy, SandboxedRoot};
use crate::ledger::export::ExportStream;
use crate::service::{self, BindTarget, EnforceInput, ResetWindow, Service, ServiceError};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::UnixListener;

/// Request bodies are small JSON documents; a passport is at most 16 KiB.
const MAX_REQUEST_BODY: usize = 64 * 1024;

/// Answers are small JSON documents, except an export, which is streamed.
type Body = BoxBody<Bytes, std::io::Error>;

/// An export is read from the store in parts of about this size, and at most this many parts
/// wait for the connection: the daemon's memory for an export is bounded by their product, not
/// by the log's size.
const EXPORT_PART: usize = 128 * 1024;
const EXPORT_PARTS_IN_FLIGHT: usize = 4;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// An error answered to the caller as `{error, message}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> ApiError {
        // The one place service errors become status codes (docs/api.md, "Errors").
        use ServiceError as E;
        let (status, code) = match &e {
            E::PassportNotRegistered(_)
            | E::HoldNotFound(_)
            | E::AttestationNotFound { .. }
            | E::RecordNotFound(_)
            | E::NotBound(_) => (StatusCode::NOT_FOUND, "not_found"),
            E::HoldAlreadyResolved { .. } | E::AlreadySettled(_) | E::AlreadyBound { .. } | E::RunSandbox { .. } => {
                (StatusCode::CONFLICT, "conflict")
            }
            E::Invalid { .. } | E::PassportOnlyMode => (StatusCode::BAD_REQUEST, "invalid"),
            E::Passport(_) | E::ProofOfPossession(_) | E::Rules(_) | E::PassportUnusable { .. } => {
                (StatusCode::BAD_REQUEST, "passport_invalid")
            }
            E::Store(_)
            | E::NotAppended(_)
            | E::UsageUnreadable { .. }
            | E::HoldUnreadable(_)
            | E::Export(_)
            | E::ResolutionNotFound(_)
            | E::LockPoisoned(_)
            | E::Cgroup(_)
            | E::Serialise(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_error"),
            E::UnixUnconfined(_) => (StatusCode::SERVICE_UNAVAILABLE, "unix_unconfined"),
            E::KernelStop(_) => (StatusCode::SERVICE_UNAVAILABLE, "kernel_error"),
            E::Contended { .. } | E::Evaluation(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    json_bytes_response(status, body.to_string().into_bytes())
}

/// [`json_response`] with the JSON already serialised (a decision: see
/// `DecisionOutcome::to_json_bytes`).
fn json_bytes_response(status: StatusCode, json: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(full(json));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

/// Prometheus text exposition format 0.0.4.
fn metrics_response(text: String) -> Response<Body> {
    let mut resp = Response::new(full(text));
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(crate::metrics::CONTENT_TYPE));
    resp
}

/// Streams an export: a blocking task reads the store a part at a time and hands the parts to
/// the connection through a bounded channel, so a slow reader holds the task back instead of
/// the daemon buffering the log. An error after the first byte can no longer be a status: it is
/// logged and the response is cut short, which the client sees as an incomplete body (and the
/// verifier as a document that ends early).
fn streamed_export(mut stream: ExportStream) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(EXPORT_PARTS_IN_FLIGHT);
    tokio::task::spawn_blocking(move || loop {
        let mut part = Vec::with_capacity(EXPORT_PART + EXPORT_PART / 2);
        let (part, more) = match stream.fill(&mut part, EXPORT_PART) {
            Ok(more) => (Ok(Bytes::from(part)), more),
            Err(e) => {
                tracing::error!(error = %e, records = stream.records_written(), "api: export failed midway; response cut short");
                (Err(std::io::Error::other(e.to_string())), false)
            }
        };
        if tx.blocking_send(part).is_err() {
            tracing::info!(records = stream.records_written(), "api: export abandoned by the caller");
            return;
        }
        if !more {
            return;
        }
    });
    let mut resp = Response::new(crate::httpbody::ChannelBody::new(rx).boxed());
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.status, &json!({"error": e.code, "message": e.message}))
}

/// Binds the API socket: removes a stale socket file, binds, and restricts it to root and the API
/// group (mode 0660). The parent directory is created 0755 if missing.
pub fn bind(path: &Path, api_gid: Option<u32>) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = crate::unixsock::bind(
        path,
        0o660,
        "remove it or choose another [api] socket",
        "another sluice daemon is running",
    )?;
    if let Some(gid) = api_gid {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))).map_err(std::io::Error::from)?;
    }
    Ok(listener)
}

/// Serves the API until `shutdown` fires.
pub async fn serve(
    listener: UnixListener,
    service: Arc<Service>,
    policy: Arc<PeerPolicy>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "api: accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let (peer, sandboxed_root) = match stream.peer_cred() {
            Ok(cred) => {
                let proc = Path::new("/proc");
                let peer = policy.check(cred.uid(), cred.gid(), cred.pid(), proc);
                let root = peer.as_ref().err().and_then(|r| policy.sandboxed_root(r, cred.uid(), cred.gid(), proc));
                (peer, root)
            }
            Err(_) => (Err(super::access::PeerRefusal::NoPid), None),
        };
        let service = service.clone();
        tokio::spawn(async move {
            if let (Err(refusal), None) = (&peer, &sandboxed_root) {
                tracing::warn!(reason = %refusal, "api: caller refused");
            }
            let svc = hyper::service::service_fn(move |req| {
                let service = service.clone();
                let peer = peer.clone();
                let sandboxed_root = sandboxed_root.clone();
                async move {
                    let resp = match (peer, sandboxed_root) {
                        (Ok(peer), _) => handle(req, &service, &peer).await.unwrap_or_else(|e| error_response(&e)),
                        (Err(refusal), Some(root)) => handle_sandboxed_root(req, &service, &root, &refusal)
                            .await
                            .unwrap_or_else(|e| error_response(&e)),
                        (Err(refusal), None) => {
                            error_response(&ApiError::new(StatusCode::FORBIDDEN, "forbidden", refusal.to_string()))
                        }
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "api: connection ended with an error");
            }
        });
    }
}

async fn read_json<T: for<'de> Deserialize<'de>>(req: Request<Incoming>) -> Result<T, ApiError> {
    let bytes = Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("request body: {e}")))?
        .to_bytes();
    let body: &[u8] = if bytes.is_empty() { b"{}" } else { &bytes };
    // Duplicate members are refused here too: two readers must never see two different requests.
    crate::passport::json::parse_object(body).map_err(|e| ApiError::bad_request(format!("request body: {e}")))?;
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("request body: {e}")))
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri().query().map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    passport: String,
    #[serde(default)]
    pop: Option<crate::passport::pop::Proof>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoteBody {
    #[serde(default)]
    note: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SandboxBody {
    passport_id: String,
    #[serde(default)]
    pop: Option<crate::passport::pop::Proof>,
    /// The passport's private key (`sluice run --key`), for signing requests to gates.
    #[serde(default)]
    agent_key: Option<crate::service::AgentKeyText>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BindBody {
    /// The passport (compact JWT), registered on the way.
    passport: String,
    /// An absolute cgroup path below the agents' cgroup; absent only for a unit binding its own.
    #[serde(default)]
    cgroup: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnbindBody {
    #[serde(default)]
    cgroup: Option<PathBuf>,
}

/// `POST /v1/stop` and `POST /v1/resume` (and the console's): exactly one of `passport_id` and
/// `"all": true`, and a note.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StopBody {
    #[serde(default)]
    pub passport_id: Option<String>,
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub note: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiscoverBody {
    url: String,
}

fn gate_catalogs(service: &Service) -> Result<&Arc<crate::discover::GateCatalogs>, ApiError> {
    service.gate_catalogs().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this daemon fetches no gate catalogs: it runs without the proxy ([sandbox] redirect = false)".to_string(),
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetBody {
    window: String,
}

async fn handle(req: Request<Incoming>, service: &Service, peer: &Peer) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let ok = |v: Value| Ok(json_response(StatusCode::OK, &v));
    match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "health"]) => ok(service.health().to_json()),
        (&Method::GET, ["metrics"]) => Ok(metrics_response(service.metrics_text())),
        (&Method::POST, ["v1", "passports"]) => {
            let body: RegisterBody = read_json(req).await?;
            ok(service::to_json(&service.register(body.passport.trim(), body.pop.as_ref(), peer).await?))
        }
        (&Method::POST, ["v1", "passports", id, "revoke"]) => {
            let id = id.to_string();
            let body: NoteBody = read_json(req).await?;
            ok(service::to_json(&service.revoke(&id, peer, body.note).await?))
        }
        (&Method::GET, ["v1", "passports", id, "state"]) => ok(service::to_json(&service.state(id)?)),
        (&Method::POST, ["v1", "passports", id, "state", "reset"]) => {
            let id = id.to_string();
            let body: ResetBody = read_json(req).await?;
            let window = ResetWindow::parse(&body.window).ok_or_else(|| {
                ApiError::bad_request(format!("window {:?}: use daily, weekly, monthly or all", body.window))
            })?;
            ok(service::to_json(&service.reset(&id, window, peer).await?))
        }
        (&Method::POST, ["v1", "enforce"]) => {
            let input: EnforceInput = read_json(req).await?;
            let decision = service.enforce(input).await?;
            Ok(json_bytes_response(StatusCode::OK, decision.to_json_bytes()))
        }
        (&Method::GET, ["v1", "attestations"]) => {
            let q = query(&req);
            let since = q.get("since").map(String::as_str);
            ok(service.attestations(q.get("passport_id").map(String::as_str), since)?.to_json())
        }
        (&Method::GET, ["v1", "attestations", "export"]) => {
            let q = query(&req);
            let consistency_from = match q.get("consistency_from") {
                Some(n) => Some(
                    n.parse::<u64>()
                        .map_err(|_| ApiError::bad_request(format!("consistency_from {n:?} is not a number")))?,
                ),
                None => None,
            };
            let since = q.get("since").map(String::as_str);
            let stream = service.export(q.get("passport_id").map(String::as_str), since, consistency_from).await?;
            Ok(streamed_export(stream))
        }
        (&Method::GET, ["v1", "attestations", id, "proof"]) => {
            let index: u64 =
                id.parse().map_err(|_| ApiError::bad_request(format!("attestation id {id:?} is not a number")))?;
            ok(service::to_json(&service.proof(index).await?))
        }
        (&Method::GET, ["v1", "holds"]) => ok(service.holds()?.to_json()),
        (&Method::GET, ["v1", "gates"]) => {
            let cats = gate_catalogs(service)?;
            ok(Value::Array(cats.offers().iter().map(|o| o.to_json()).collect()))
        }
        (&Method::POST, ["v1", "gates", "discover"]) => {
            let body: DiscoverBody = read_json(req).await?;
            let cats = gate_catalogs(service)?;
            match cats.discover(&body.url).await {
                Ok(offer) => ok(offer.to_json()),
                Err(e) => {
                    let status = match e.kind {
                        crate::discover::ErrorKind::Unreachable => StatusCode::BAD_GATEWAY,
                        _ => StatusCode::CONFLICT,
                    };
                    Err(ApiError::new(status, e.kind.as_str(), e.to_string()))
                }
            }
        }
        (&Method::GET, ["v1", "stops"]) => ok(service.stops().to_json()),
        (&Method::POST, ["v1", verb @ ("stop" | "resume")]) => {
            let stop = *verb == "stop";
            let body: StopBody = read_json(req).await?;
            let scope = service::StopScope::parse(body.passport_id.as_deref(), body.all)?;
            if stop {
                ok(service.stop(scope, peer, body.note).await?.to_json())
            } else {
                ok(service.resume(scope, peer, body.note).await?.to_json())
            }
        }
        (&Method::GET, ["v1", "sandboxes"]) => ok(service.sandboxes()?.to_json()),
        (&Method::POST, ["v1", "sandboxes"]) => {
            let body: SandboxBody = read_json(req).await?;
            ok(service
                .create_sandbox(&body.passport_id, body.pop.as_ref(), body.agent_key.as_ref(), peer)
                .await?
                .to_json())
        }
        (&Method::POST, ["v1", "sandboxes", "bind"]) => {
            let body: BindBody = read_json(req).await?;
            let cgroup = body.cgroup.ok_or_else(|| {
                ApiError::bad_request("cgroup is required (an absolute path below the agents' cgroup)")
            })?;
            ok(service.bind_sandbox(body.passport.trim(), BindTarget::Path(cgroup), peer).await?.to_json())
        }
        (&Method::POST, ["v1", "sandboxes", "unbind"]) => {
            let body: UnbindBody = read_json(req).await?;
            let cgroup = body.cgroup.ok_or_else(|| {
                ApiError::bad_request("cgroup is required (an absolute path below the agents' cgroup)")
            })?;
            ok(service.unbind_sandbox(BindTarget::Path(cgroup), peer).await?.to_json())
        }
        (&Method::GET, ["v1", "holds", id]) => ok(service.hold(id)?.to_json()),
        (&Method::POST, ["v1", "holds", id, action @ ("approve" | "deny")]) => {
            let (id, approve) = (id.to_string(), *action == "approve");
            let body: NoteBody = read_json(req).await?;
            ok(service.resolve_hold(&id, approve, peer, body.note).await?.to_json())
        }
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no such endpoint: {method} {path}"))),
    }
}

/// The only requests a [`SandboxedRoot`] may make: bind or unbind its own cgroup. Everything
/// else is refused exactly as for any sandboxed caller.
async fn handle_sandboxed_root(
    req: Request<Incoming>,
    service: &Service,
    root: &SandboxedRoot,
    refusal: &super::access::PeerRefusal,
) -> Result<Response<Body>, ApiError> {
    let forbidden = || ApiError::new(StatusCode::FORBIDDEN, "forbidden", refusal.to_string());
    let own = || BindTarget::Own(root.cgroup.clone());
    let ok = |v: Value| Ok(json_response(StatusCode::OK, &v));
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/sandboxes/bind") => {
            let body: BindBody = read_json(req).await?;
            if body.cgroup.is_some() {
                return Err(forbidden());
            }
            ok(service.bind_sandbox(body.passport.trim(), own(), &root.peer).await?.to_json())
        }
        (&Method::POST, "/v1/sandboxes/unbind") => {
            let body: UnbindBody = read_json(req).await?;
            if body.cgroup.is_some() {
                return Err(forbidden());
            }
            ok(service.unbind_sandbox(own(), &root.peer).await?.to_json())
        }
        _ => Err(forbidden()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::HoldStatus;

    #[test]
    fn service_errors_map_to_their_status_and_code_with_the_operator_message() {
        let cases = [
            (ServiceError::PassportNotRegistered("pp_x".into()), 404, "not_found", "passport pp_x is not registered"),
            (
                ServiceError::AttestationNotFound { index: 9, size: 3 },
                404,
                "not_found",
                "attestation 9 does not exist (log size 3)",
            ),
            (
                ServiceError::HoldAlreadyResolved { id: "hold_1".into(), status: HoldStatus::Approved },
                409,
                "conflict",
                "hold hold_1 is already Approved",
            ),
            (
                ServiceError::Invalid { field: "action", problem: "action must be 1 to 128 characters".into() },
                400,
                "invalid",
                "action must be 1 to 128 characters",
            ),
            (
                ServiceError::PassportUnusable { passport_id: "pp_x".into(), why: "is revoked" },
                400,
                "passport_invalid",
                "passport rejected: passport pp_x is revoked",
            ),
            (ServiceError::NotAppended("decision"), 503, "store_error", "the decision record was not appended"),
            (ServiceError::LockPoisoned("passports"), 503, "store_error", "restart the daemon"),
            (
                ServiceError::Contended { passport_id: "pp_x".into(), attempts: 4 },
                503,
                "unavailable",
                "send the request again",
            ),
        ];
        for (e, status, code, message) in cases {
            let unavailable = e.is_unavailable();
            let a = ApiError::from(e);
            assert_eq!((a.status.as_u16(), a.code), (status, code), "{}", a.message);
            assert!(a.message.contains(message), "{}", a.message);
            assert_eq!(unavailable, status == 503, "{}", a.message);
        }
    }
}
