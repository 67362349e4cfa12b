//! The gate's listener: a reverse proxy in front of one service, and `/check`.
//!
//! HTTP/1.1 and HTTP/2 (ALPN over TLS when `tls_cert`/`tls_key` are set, prior knowledge in
//! plain text). For each request: read what the agent sent ([`Arrival`]), decide
//! ([`decide::precheck`] on a blocking thread, then [`decide::evaluate`] inside the record's
//! ledger transaction), and only once the record is durable forward it (allow), or answer `401`
//! with a hint or `403` with the decision JSON.
//!
//! Bodies stream both ways, except the body of a signed request: it is read first, up to
//! [`MAX_SIGNED_BODY`] (`413` beyond), so a body that does not match its `Content-Digest` is
//! refused before a byte reaches the service.
//!
//! `/check` and `/check/*` are the gate's own (ext_authz HTTP shape) and never forwarded: the
//! same decision, answered `200` with the decision headers, or `401`/`403` with the JSON. So are
//! `/.well-known/sluice` and `/v1/catalog*` (`discovery`).

use super::decide::{self, Answer, Arrival, Decided, Step};
use super::records::GateRecord;
use super::sig::ContentDigest;
use super::upstream::{BoxError, GateBody, Upstream};
use super::Gate;
use crate::decide::Reason;
use crate::ledger::{Ledger, TxnError};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A request's body as the gate reads it: counted by the stall rule while it waits on the client.
type PeerBody = crate::idle::FromPeer<Incoming>;

/// The body of a signed request is read whole (to check its `Content-Digest`) up to this.
pub const MAX_SIGNED_BODY: usize = 1 << 20;
/// ... within this (a request in progress is never closed for idleness, so a body trickled
/// byte by byte would otherwise hold its connection for good).
pub const SIGNED_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Request heads (HTTP/1.1 buffer, HTTP/2 header list) larger than this are refused.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Concurrent HTTP/2 streams per connection.
const MAX_STREAMS: u32 = 100;
/// A connection with no request in progress for this long is closed: a TLS handshake, a request
/// head trickled or never finished (HTTP/1.1), a preface or header block left unfinished
/// (HTTP/2), an idle keep-alive ([`crate::idle`]). And one whose client stalls a request in
/// progress this long is dropped: a request body that stops arriving, an answer it stops taking
/// (HTTP/1.1: unread; HTTP/2: no flow-control window granted).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Client connections open at once; more are closed as they are accepted (a flood of idle
/// connections cannot take the process's file descriptors).
pub const MAX_CONNECTIONS: usize = 4096;
/// At shutdown, how long connections may take to finish what is in flight.
pub const DRAIN: Duration = Duration::from_secs(10);

/// The end of a listener's life, once it stopped accepting: tells every connection task to stop
/// (`stop` is the sender of the channel they watch), waits up to [`DRAIN`] for them to finish and
/// cuts the rest. `what` names them in the warning an operator reads when some had to be cut.
pub(super) async fn drain(mut conns: tokio::task::JoinSet<()>, stop: tokio::sync::watch::Sender<bool>, what: &str) {
    let _ = stop.send(true);
    let open = conns.len();
    let drained = tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            open,
            cut = conns.len(),
            "gate: {what} still open after the {}-second drain were cut",
            DRAIN.as_secs()
        );
    }
    conns.shutdown().await;
}

pub const PASSPORT: &str = "sluice-passport";
pub const AGENT_KEY: &str = "sluice-agent-key";
pub const SIGNATURE: &str = "signature";
pub const SIGNATURE_INPUT: &str = "signature-input";
pub const CONTENT_DIGEST: &str = "content-digest";
pub const PASSPORT_ID: &str = "sluice-passport-id";
pub const AGENT: &str = "sluice-agent";
pub const ATTESTATION: &str = "sluice-attestation";
pub const DECISION: &str = "sluice-decision";

/// Headers an agent sends to the gate that the service never sees, and headers only the gate
/// may set (an agent's own copy is removed, never passed on).
const STRIPPED: &[&str] = &[PASSPORT, AGENT_KEY, SIGNATURE, SIGNATURE_INPUT, PASSPORT_ID, AGENT, ATTESTATION, DECISION];
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
];

/// What serves requests: the gate, its store, its upstream.
pub struct Server {
    pub gate: Arc<Gate>,
    pub ledger: Ledger,
    upstream: Upstream,
    tls: Option<TlsAcceptor>,
    /// [`HEADER_TIMEOUT`] unless [`Server::with_connection_limits`] set another.
    header_timeout: Duration,
    /// [`SIGNED_BODY_TIMEOUT`], or the header timeout [`Server::with_connection_limits`] set.
    body_timeout: Duration,
    /// Places for client connections ([`MAX_CONNECTIONS`]), one taken per connection.
    slots: Arc<tokio::sync::Semaphore>,
    max_connections: usize,
    /// The over-budget warning, at most once a second under a flood.
    refusal_log: crate::throttle::Throttle,
}

impl Server {
    pub fn new(gate: Arc<Gate>, ledger: Ledger) -> anyhow::Result<Server> {
        let upstream = Upstream::new(&gate.config.upstream)?;
        let tls = match &gate.config.tls {
            Some((cert, key)) => Some(tls_acceptor(cert, key)?),
            None => None,
        };
        Ok(Server {
            gate,
            ledger,
            upstream,
            tls,
            header_timeout: HEADER_TIMEOUT,
            body_timeout: SIGNED_BODY_TIMEOUT,
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
            max_connections: MAX_CONNECTIONS,
            refusal_log: crate::throttle::Throttle::new(Duration::from_secs(1)),
        })
    }

    /// The same server with another idle timeout (also the stall timeout and the deadline of a
    /// signed body's read) and connection budget (tests use short ones).
    pub fn with_connection_limits(mut self, header_timeout: Duration, max_connections: usize) -> Server {
        let max_connections = max_connections.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        self.header_timeout = header_timeout;
        self.body_timeout = header_timeout;
        self.slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
        self.max_connections = max_connections;
        self
    }

    /// Client connections open now.
    pub fn open_connections(&self) -> usize {
        self.max_connections.saturating_sub(self.slots.available_permits())
    }

    /// Accepts connections until `shutdown` resolves, then drains: every connection is asked to
    /// close (HTTP/1.1 once its request in flight is answered, HTTP/2 with GOAWAY), those still
    /// open after [`DRAIN`] are cut. When this returns no connection task is left, so nothing
    /// but the caller holds the server (and its store) any more.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let (tcp, peer) = tokio::select! {
                _ = &mut shutdown => break,
                // Finished connections are reaped as they end, so the set stays as large as
                // the connections open.
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "gate: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                drop(tcp);
                if let Some(left_out) = self.refusal_log.admit(std::time::Instant::now()) {
                    tracing::warn!(%peer, limit = self.max_connections, left_out, "gate: too many connections; closing");
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let server = self.clone();
            let stop = stop.clone();
            conns.spawn(async move {
                let _slot = slot;
                // The idle clock starts at accept: a TLS handshake counts as no request. A
                // request in progress whose peer stops sending its body, or stops reading the
                // answer, is dropped after the same time (the stall rule).
                let activity = crate::idle::Activity::watching_stalls(server.header_timeout);
                match &server.tls {
                    None => server.clone().connection(TokioIo::new(tcp), "http", peer, activity, stop).await,
                    Some(acceptor) => match tokio::time::timeout(server.header_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            server.clone().connection(TokioIo::new(tls), "https", peer, activity, stop).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "gate: TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "gate: TLS handshake timed out"),
                    },
                }
            });
        }
        drop(listener);
        drain(conns, stop_tx, "connections").await;
    }

    /// Serves one client connection until it ends, until it has had no request in progress for
    /// the header timeout, or until `stop` (then it answers what is in progress and closes).
    async fn connection<T>(
        self: Arc<Self>,
        io: T,
        scheme: &'static str,
        peer: std::net::SocketAddr,
        activity: Arc<crate::idle::Activity>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let timeout = self.header_timeout;
        let svc = {
            let activity = activity.clone();
            hyper::service::service_fn(move |req| {
                let server = self.clone();
                let request = activity.begin();
                let req = req.map(|body| crate::idle::FromPeer::new(body, &activity));
                async move {
                    let resp = server.handle(req, scheme).await;
                    Ok::<_, Infallible>(resp.map(|body| crate::idle::Tracked::new(body, request)))
                }
            })
        };
        // No HTTP/1.1 header read timeout of hyper's: the idle rule covers a trickled head, and
        // HTTP/2 (which has no such timeout) the same way.
        let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        b.http1().max_buf_size(MAX_HEADER_BYTES);
        b.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_STREAMS)
            .max_header_list_size(MAX_HEADER_BYTES as u32);
        let conn = std::pin::pin!(b.serve_connection(io, svc));
        let stopping = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let ended =
            crate::idle::serve_until_idle(conn, &activity, timeout, peer, stopping, |c| c.graceful_shutdown()).await;
        if let Err(e) = ended {
            tracing::debug!(error = %e, "gate: connection ended with an error");
        }
    }

    /// One request: `/check`, or decide and forward.
    async fn handle(self: Arc<Self>, req: Request<PeerBody>, scheme: &'static str) -> Response<GateBody> {
        let path = req.uri().path();
        if path == "/check" || path.starts_with("/check/") {
            return self.check(req, scheme).await;
        }
        if super::discovery::is_public(path) {
            let authority = req
                .headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .or_else(|| req.uri().authority().map(|a| a.as_str()));
            let query = req.uri().query();
            return super::discovery::answer(&self.gate, &self.ledger, req.method(), path, query, authority, scheme)
                .await;
        }
        let (parts, body) = req.into_parts();
        let target = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
        let arrival =
            match arrival(&parts.method, &target, &parts.headers, parts.uri.authority().map(|a| a.as_str()), scheme) {
                Ok(a) => a,
                Err(detail) => return self.refuse_malformed(&parts.method, &target, detail).await,
            };
        let (arrival, body) = match self.hash_if_signed(arrival, body).await {
            Ok(x) => x,
            Err(resp) => return resp,
        };
        let (decided, attestation) = match self.decide(arrival).await {
            Ok(x) => x,
            Err(resp) => return resp,
        };
        match decided.answer {
            Answer::Allow => self.forward(parts, body, &decided, attestation).await,
            _ => refusal(&self.gate, &decided, attestation),
        }
    }

    /// `/check` (ext_authz HTTP shape): the original method, path and headers come from the
    /// caller: Envoy sends the original method with the path after `/check`; nginx's
    /// `auth_request` sends `X-Original-Method` and `X-Original-URI`. A body, if the caller sends
    /// one, is checked against `Content-Digest`; without one the service must check that the body
    /// it receives matches the signed `Content-Digest` itself.
    async fn check(self: Arc<Self>, req: Request<PeerBody>, scheme: &'static str) -> Response<GateBody> {
        let (parts, body) = req.into_parts();
        let h = &parts.headers;
        let orig_method = match h.get("x-original-method").map(|v| v.to_str().map(|s| Method::from_bytes(s.as_bytes())))
        {
            None => parts.method.clone(),
            Some(Ok(Ok(m))) => m,
            Some(_) => return plain(StatusCode::BAD_REQUEST, "X-Original-Method is not a method"),
        };
        let suffix = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/check");
        let suffix = suffix.strip_prefix("/check").unwrap_or(suffix);
        let target = match h.get("x-original-uri").map(|v| v.to_str()) {
            Some(Ok(u)) if u.starts_with('/') => u.to_string(),
            Some(_) => return plain(StatusCode::BAD_REQUEST, "X-Original-URI must be an origin-form path"),
            None if suffix.starts_with('/') => suffix.to_string(),
            None if suffix.starts_with('?') || suffix.is_empty() => format!("/{suffix}"),
            None => return plain(StatusCode::BAD_REQUEST, "the original path must follow /check/"),
        };
        let scheme = match h.get("x-forwarded-proto").map(|v| v.to_str()) {
            Some(Ok("https")) => "https",
            Some(Ok("http")) => "http",
            None => scheme,
            Some(_) => return plain(StatusCode::BAD_REQUEST, "X-Forwarded-Proto must be http or https"),
        };
        let authority = h.get("x-forwarded-host").and_then(|v| v.to_str().ok()).map(str::to_string);
        let authority = authority.or_else(|| parts.uri.authority().map(|a| a.as_str().to_string()));
        let mut a = match arrival(&orig_method, &target, h, authority.as_deref(), scheme) {
            Ok(a) => a,
            Err(detail) => return self.refuse_malformed(&orig_method, &target, detail).await,
        };
        if a.is_signed() {
            match read_bounded(body, self.body_timeout).await {
                Ok(b) if b.is_empty() => a.digest_deferred = true,
                Ok(b) => a.body_digest = Some(ContentDigest::of(&b)),
                Err(resp) => return resp,
            }
        }
        let (decided, attestation) = match self.decide(a).await {
            Ok(x) => x,
            Err(resp) => return resp,
        };
        match decided.answer {
            Answer::Allow => {
                let mut resp = Response::new(empty());
                add_decision_headers(resp.headers_mut(), &decided, attestation);
                decision_header(resp.headers_mut(), &format!("allow; attestation={attestation}"));
                resp
            }
            _ => refusal(&self.gate, &decided, attestation),
        }
    }

    /// A signed request's body is read (bounded) and hashed; others stream untouched.
    async fn hash_if_signed(&self, mut a: Arrival, body: PeerBody) -> Result<(Arrival, GateBody), Response<GateBody>> {
        if !a.is_signed() {
            return Ok((a, body.map_err(|e| Box::new(e) as BoxError).boxed()));
        }
        let bytes = read_bounded(body, self.body_timeout).await?;
        a.body_digest = Some(ContentDigest::of(&bytes));
        Ok((a, Full::new(bytes).map_err(|never| match never {}).boxed()))
    }

    /// Decides and records. `Err` is the answer when no decision could be made durable.
    async fn decide(&self, a: Arrival) -> Result<(Decided, u64), Response<GateBody>> {
        let gate = self.gate.clone();
        let now = crate::passport::now();
        let step = tokio::task::spawn_blocking(move || (decide::precheck(&gate, &a, now), a))
            .await
            .map_err(|_| unavailable("the decision task failed"))?;
        let gate = self.gate.clone();
        let result = self
            .ledger
            .transact(move |txn| {
                let (decided, arrival) = match step {
                    (Step::Decided(d), a) => (*d, a),
                    (Step::Evaluate(r), a) => {
                        let now = chrono::Utc::now();
                        let mut read = |k: &str| txn.get(k).map_err(|e| e.to_string());
                        (decide::evaluate(&gate, &r, &mut read, now), a)
                    }
                };
                for (k, v) in &decided.writes {
                    txn.put(k, v)?;
                }
                let draft = record(&gate, &decided, &arrival, chrono::Utc::now()).draft();
                Ok::<_, TxnError>((decided, vec![draft]))
            })
            .await;
        match result {
            Ok((decided, appended)) => match appended.first() {
                Some(a) => {
                    log(&decided, a.index);
                    Ok((decided, a.index))
                }
                None => Err(unavailable("the decision was not recorded")),
            },
            Err(e) => {
                tracing::error!(error = %e, "gate: a decision could not be recorded; refusing the request");
                Err(unavailable("the gate's store failed"))
            }
        }
    }

    async fn refuse_malformed(&self, method: &Method, target: &str, detail: String) -> Response<GateBody> {
        let gate = self.gate.clone();
        let decided = Decided::bare(
            Answer::Refuse,
            crate::decide::Decision::Block,
            Reason::MalformedRequest,
            detail.clone(),
            vec![crate::decide::Guardrail { name: "gate_request".into(), passed: false, detail: detail.into() }],
            gate.config.route_of(method, target),
        );
        let arrival = Arrival::bare(method.clone(), target.to_string());
        let d = decided.clone();
        let r = self
            .ledger
            .transact(move |_| {
                let draft = record(&gate, &d, &arrival, chrono::Utc::now()).draft();
                Ok::<_, TxnError>(((), vec![draft]))
            })
            .await;
        match r {
            Ok((_, appended)) => match appended.first() {
                Some(a) => refusal(&self.gate, &decided, a.index),
                None => unavailable("the decision was not recorded"),
            },
            Err(_) => unavailable("the gate's store failed"),
        }
    }

    async fn forward(
        &self,
        parts: http::request::Parts,
        body: GateBody,
        decided: &Decided,
        attestation: u64,
    ) -> Response<GateBody> {
        let target = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = match target.parse() {
            Ok(u) => u,
            Err(_) => return plain(StatusCode::BAD_REQUEST, "the request target cannot be forwarded"),
        };
        let mut headers = parts.headers;
        strip(&mut headers);
        for name in STRIPPED {
            headers.remove(*name);
        }
        if let Ok(v) = HeaderValue::from_str(self.upstream.authority()) {
            headers.insert(header::HOST, v);
        }
        add_decision_headers(&mut headers, decided, attestation);
        *req.headers_mut() = headers;
        match self.upstream.send(req).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip(&mut parts.headers);
                parts.headers.remove(DECISION);
                decision_header(&mut parts.headers, &format!("allow; attestation={attestation}"));
                Response::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed())
            }
            Err(e) => {
                tracing::warn!(error = %e, attestation, "gate: upstream failed");
                let mut resp = json_response(
                    StatusCode::BAD_GATEWAY,
                    &json!({"error": "upstream_failed", "detail": e, "attestation_id": attestation}),
                );
                decision_header(resp.headers_mut(), &format!("allow; attestation={attestation}"));
                resp
            }
        }
    }
}

impl Arrival {
    /// A request known only by its method and target (a malformed one).
    pub fn bare(method: Method, path: String) -> Arrival {
        Arrival {
            method,
            target_uri: String::new(),
            path,
            host: None,
            passport: None,
            agent_key: None,
            signature_input: None,
            signature: None,
            content_digest: None,
            body_digest: None,
            digest_deferred: false,
        }
    }
}

/// The one value of a header that must appear at most once; `Err` names it.
fn single(h: &HeaderMap, name: &str) -> Result<Option<String>, String> {
    let mut all = h.get_all(name).iter();
    let Some(first) = all.next() else { return Ok(None) };
    if all.next().is_some() {
        return Err(format!("the {name} header appears more than once"));
    }
    first.to_str().map(|s| Some(s.to_string())).map_err(|_| format!("the {name} header is not visible ASCII"))
}

/// What the gate reads from a request.
fn arrival(
    method: &Method,
    target: &str,
    h: &HeaderMap,
    uri_authority: Option<&str>,
    scheme: &str,
) -> Result<Arrival, String> {
    if !target.starts_with('/') {
        return Err(format!("request target {target:?} is not origin-form (/path)"));
    }
    let host_header = single(h, "host")?;
    let authority = match (uri_authority, host_header.as_deref()) {
        (Some(a), Some(h)) if !a.eq_ignore_ascii_case(h) => {
            return Err(format!("the authority {a:?} and the Host header {h:?} disagree"))
        }
        (Some(a), _) => a.to_string(),
        (None, Some(h)) => h.to_string(),
        (None, None) => return Err("the request names no host (Host header or :authority)".into()),
    };
    let host = authority
        .parse::<http::uri::Authority>()
        .map_err(|_| format!("{authority:?} is not a host[:port]"))?
        .host()
        .to_string();
    let target_uri = super::sig::target_uri(scheme, &authority, target)
        .ok_or_else(|| format!("{authority:?} is not a host[:port]"))?;
    Ok(Arrival {
        method: method.clone(),
        target_uri,
        path: target.to_string(),
        host: Some(host),
        passport: single(h, PASSPORT)?,
        agent_key: single(h, AGENT_KEY)?,
        signature_input: single(h, SIGNATURE_INPUT)?,
        signature: single(h, SIGNATURE)?,
        content_digest: single(h, CONTENT_DIGEST)?,
        body_digest: None,
        digest_deferred: false,
    })
}

async fn read_bounded(body: PeerBody, within: Duration) -> Result<Bytes, Response<GateBody>> {
    // Its own deadline covers a body that stops, and answers it (408): the stall rule, on the
    // same clock, would race it with a bare close.
    let body = body.into_inner();
    let Ok(read) = tokio::time::timeout(within, Limited::new(body, MAX_SIGNED_BODY).collect()).await else {
        return Err(json_response(
            StatusCode::REQUEST_TIMEOUT,
            &json!({
                "decision": "block",
                "reason": "body_timeout",
                "detail": format!("the body of a signed request is read whole to check its Content-Digest, within {within:?}; this one took longer"),
            }),
        ));
    };
    match read {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(json_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            &json!({
                "decision": "block",
                "reason": "body_too_large",
                "detail": format!("the body of a signed request is read whole to check its Content-Digest, up to {MAX_SIGNED_BODY} bytes; this one is larger"),
            }),
        )),
        Err(e) => Err(plain(StatusCode::BAD_REQUEST, &format!("the request body could not be read: {e}"))),
    }
}

fn record<'a>(gate: &'a Gate, d: &'a Decided, a: &'a Arrival, at: chrono::DateTime<chrono::Utc>) -> GateRecord<'a> {
    GateRecord {
        gate_id: &gate.gate_id,
        gate: &gate.config.name,
        claims: d.claims.as_ref(),
        permission: &d.permission,
        method: a.method.as_str(),
        host: a.host.as_deref(),
        path: &a.path,
        request_hash: d.request_hash.as_deref(),
        signed: d.signed,
        trust_tier: d.tier.map(|t| t.as_str()),
        decision: d.decision,
        reason: &d.reason,
        detail: &d.detail,
        cost_millicents: if d.decision == crate::decide::Decision::Allow { d.cost_millicents } else { 0 },
        charge: d.charge,
        spend: d.spend.clone(),
        at,
    }
}

fn log(d: &Decided, index: u64) {
    let pp = d.claims.as_ref().map(|c| c.id.as_str()).unwrap_or("-");
    if d.decision == crate::decide::Decision::Allow {
        tracing::debug!(attestation = index, passport = pp, permission = %d.permission, reason = %d.reason, "gate: allow");
    } else {
        tracing::info!(attestation = index, passport = pp, permission = %d.permission, reason = %d.reason, detail = %d.detail, "gate: block");
    }
}

/// Headers the service (or the front proxy, at `/check`) receives with an allowed request.
fn add_decision_headers(h: &mut HeaderMap, d: &Decided, attestation: u64) {
    if let Some(c) = &d.claims {
        for (name, value) in [(PASSPORT_ID, c.id.as_str()), (AGENT, c.agent_id.as_str())] {
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(HeaderName::from_static(name), v);
            }
        }
    }
    h.insert(HeaderName::from_static(ATTESTATION), HeaderValue::from(attestation));
}

fn decision_header(h: &mut HeaderMap, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(HeaderName::from_static(DECISION), v);
    }
}

/// The decision JSON (the daemon's shape, plus the gate's fields).
pub fn decision_json(gate: &Gate, d: &Decided, attestation: u64) -> serde_json::Value {
    json!({
        "decision": d.decision.as_str(),
        "reason": d.reason,
        "detail": d.detail,
        "attestation_id": attestation,
        "passport_id": d.claims.as_ref().map(|c| c.id.as_str()),
        "permission": d.permission,
        "gate": gate.config.name,
        "gate_id": gate.gate_id,
        "request_hash": d.request_hash,
        "guardrails_evaluated": d.guardrails,
        "all_passed": d.all_passed(),
        "timestamp": crate::ledger::record::now_rfc3339(),
    })
}

/// `401` with the hint, or `403` with the decision JSON.
fn refusal(gate: &Gate, d: &Decided, attestation: u64) -> Response<GateBody> {
    let mut doc = decision_json(gate, d, attestation);
    let status = if d.answer == Answer::PassportRequired {
        let offer = gate.config.catalog.as_ref().and_then(|_| gate.catalogs.in_force(chrono::Utc::now()));
        let price = offer.as_ref().and_then(|c| c.signed.snapshot.permission(&d.permission)).map(|p| p.terms.price());
        doc["hint"] = json!({
            "permission": d.permission,
            "price_cents": price.map(|p| crate::money::cents_text(p.total_millicents())),
            "catalog_version": offer.as_ref().map(|c| c.version()),
            "offered": offer.is_none() || price.is_some(),
            "trust_level": gate.config.trust_level.as_str(),
            "catalog_url": offer.as_ref().map(|_| super::discovery::CATALOG),
            "how": "Ask your operator for a sluice passport with this permission. Send it in the Sluice-Passport header, your public key in Sluice-Agent-Key, and sign the request with the passport's key (RFC 9421 Signature-Input/Signature over \"@method\" \"@target-uri\" \"content-digest\", tag \"sluice\", and a Content-Digest header). An agent under `sluice run --passport F --key F.key` gets this done by its sluice daemon.",
        });
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::FORBIDDEN
    };
    let mut resp = json_response(status, &doc);
    if status == StatusCode::UNAUTHORIZED {
        let realm = gate.config.name.replace(['"', '\\'], "");
        if let Ok(v) = HeaderValue::from_str(&format!("Sluice realm=\"{realm}\"")) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
    }
    decision_header(resp.headers_mut(), &format!("block; reason={}; attestation={attestation}", d.reason));
    resp
}

fn strip(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(*n);
    }
}

fn empty() -> GateBody {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
}

fn json_response(status: StatusCode, doc: &serde_json::Value) -> Response<GateBody> {
    let body = serde_json::to_vec(doc).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn plain(status: StatusCode, msg: &str) -> Response<GateBody> {
    json_response(status, &json!({"error": status.canonical_reason().unwrap_or("error"), "detail": msg}))
}

fn unavailable(msg: &str) -> Response<GateBody> {
    plain(StatusCode::SERVICE_UNAVAILABLE, msg)
}

/// The TLS acceptor from PEM files: ALPN h2 then http/1.1.
fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<TlsAcceptor> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| anyhow::anyhow!("tls_cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("tls_cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("tls_cert {}: holds no PEM certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| anyhow::anyhow!("tls_key {}: {e}", key.display()))?;
    let provider = crate::tls::crypto_provider();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("tls_cert/tls_key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
