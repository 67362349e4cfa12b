//! HTTP on an agent's connection: one decision per request, then forward, hold or refuse.
//!
//! hyper serves the agent's side (HTTP/1.1 with keep-alive, or HTTP/2 when ALPN chose it), and
//! every request, whether the first on a connection or the hundredth, the only stream or one of
//! many concurrent HTTP/2 streams, goes through [`handle`]:
//!
//! 1. [`request_filter`]: the one authority of the request ([`checks::request_authority`]) must
//!    be the SNI and the dialed name ([`checks::check_consistent`]), and HTTP/1 framing must be
//!    unambiguous ([`checks::check_framing`]); CONNECT goes to [`connect`];
//! 2. [`route_and_price`]: host policy route → action and cost (a metered route reads a bounded
//!    prefix of the body to estimate), unrouted upgrades refused, host-wide verdict; then
//!    [`sign_for_gate`]: a request to a gate is signed with the sandbox's agent key
//!    ([`super::gate`]);
//! 3. [`decide_or_answer`]: the decision, durable in the ledger before anything leaves (through
//!    [`Decide`]); hold → wait for the operator (or the timeout); block → `403` with the
//!    decision JSON and a `Sluice-Decision` header;
//! 4. [`forward`] (through [`Forward`]), [`response_filter`] on the response's headers, and on a
//!    metered route the settlement of the cost when the body ends ([`super::metered`]).
//!
//! [`RequestCtx`] is what one request carries through the steps; [`Sides`] is what they call.
//!
//! The proxy's own refusals (fronting, smuggling, CONNECT, ...) are decisions too: they go
//! through the engine as a host-policy denial with their own reason, so they are attested on the
//! passport's chain like any other block, and an earlier failing guardrail (an expired passport,
//! say) still takes precedence with its own reason.
//!
//! Bodies stream both ways as hyper frames; the only buffering is the bounded prefix a metered
//! route needs for its estimate ([`crate::policy::meter::MAX_REQUEST_SCAN`]) and the bounded
//! body of a request signed for a gate (`[gates] max_body_bytes`).

use super::answer::{decision_response, record_refusal, service_failure, simple, ConnInfo, DECISION_HEADER};
use super::checks::{self, Refusal};
use super::decider::{Decide, Forward};
use super::upstream::{BoxError, ProxyBody, Target};
use super::{gate, h1watch, inc, Proxy, Stats};
use crate::decide::Reason;
use crate::decide::{self, Decision};
use crate::domain::DomainName;
use crate::idle;
use crate::ledger::RequestInProgress;
use crate::policy::{self, meter, Cost};
use crate::service::{EnforceInput, ServiceError};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{json, Value};
use sluice_httpsig as httpsig;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite};

/// Serves HTTP on one agent connection until it closes.
pub(super) async fn serve<S>(proxy: Arc<Proxy>, info: Arc<ConnInfo>, io: S, h2: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // HTTP/1: a second reading of the byte stream, for framing hyper would silently repair.
    let (io, verdicts) = if h2 {
        (h1watch::Watched::new(io, 0).0, None)
    } else {
        let (w, v) = h1watch::Watched::new(io, proxy.limits.max_header_bytes);
        (w, Some(v))
    };
    // Requests in progress, from the service call to the end of the response body.
    let activity = idle::Activity::new();
    let svc = {
        let proxy = proxy.clone();
        let info = info.clone();
        let activity = activity.clone();
        service_fn(move |req| {
            let proxy = proxy.clone();
            let info = info.clone();
            let verdict = verdicts.as_ref().map(h1watch::Verdicts::next);
            let request = activity.begin();
            async move {
                let resp = handle(proxy, info, verdict, req).await;
                Ok::<_, Infallible>(resp.map(|body| idle::Tracked::new(body, request)))
            }
        })
    };
    let io = TokioIo::new(io);
    // A connection with no request in progress (none sent yet, an HTTP/1.1 head or an HTTP/2
    // header block never finished, an idle keep-alive) is closed after `header_timeout`: the
    // same rule for both protocols, and one timer per connection rather than hyper's HTTP/1.1
    // header read timeout, which armed (and boxed) a timer for every request head.
    let timeout = proxy.limits.header_timeout;
    let draining = proxy.until_draining();
    let result = if h2 {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .max_concurrent_streams(proxy.limits.max_streams)
            .max_header_list_size(u32::try_from(proxy.limits.max_header_bytes).unwrap_or(u32::MAX));
        let conn = std::pin::pin!(b.serve_connection(io, svc));
        idle::serve_until_idle(conn, &activity, timeout, info.client, draining, |c| c.graceful_shutdown()).await
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.max_buf_size(proxy.limits.max_header_bytes.max(8192)).half_close(false);
        let conn = std::pin::pin!(b.serve_connection(io, svc).with_upgrades());
        idle::serve_until_idle(conn, &activity, timeout, info.client, draining, |c| c.graceful_shutdown()).await
    };
    if let Err(e) = result {
        if e.is_parse() || e.is_parse_too_large() {
            // hyper already answered 400 and closed; make the refusal part of the record.
            let refusal = Refusal { reason: Reason::MalformedRequest, detail: format!("HTTP request refused: {e}") };
            let _ = record_refusal(&proxy, &info, info.conn_name(), "web:send", None, None, &refusal).await;
            inc(&proxy.stats.blocked);
        } else {
            tracing::debug!(client = %info.client, error = %e, "agent connection ended with an error");
        }
    }
}

/// One request's context, filled in as it passes the steps: what the agent asked for, before
/// any name is trusted.
struct RequestCtx {
    method: Method,
    /// Path and query as the agent sent them.
    path: String,
    /// The action recorded for a refusal before a route is known.
    default_action: &'static str,
}

impl RequestCtx {
    fn new<B>(req: &Request<B>) -> RequestCtx {
        let method = req.method().clone();
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
        let default_action = default_action(&method);
        RequestCtx { method, path, default_action }
    }
}

/// One request, start to end, as named steps: request filter → (CONNECT) → route and price →
/// decide → forward (with the response filter and settlement). Never fails: every outcome is a
/// response.
///
/// `framing` is the HTTP/1 stream tracker's verdict on this request's head ([`h1watch`]): `None`
/// for HTTP/2, `Some(None)` when the tracker could not follow the stream (refused).
async fn handle(
    proxy: Arc<Proxy>,
    info: Arc<ConnInfo>,
    framing: Option<Option<Result<(), Refusal>>>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    // Counted on this proxy thread until its response's head is back: when it is the only
    // request in progress here, its decision's group is committed on this thread rather than
    // handed to the ledger's writer thread and back (two wake-ups saved).
    RequestInProgress::serve(handle_request(proxy, info, framing, req)).await
}

async fn handle_request(
    proxy: Arc<Proxy>,
    info: Arc<ConnInfo>,
    framing: Option<Option<Result<(), Refusal>>>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    inc(&proxy.stats.requests);
    let ctx = RequestCtx::new(&req);
    let authority = match request_filter(&proxy, &info, &ctx, framing, &req).await {
        Ok(a) => a,
        Err(answer) => return answer,
    };
    let host = authority.host.clone();
    if checks::is_connect(&ctx.method) {
        return connect(&proxy, &info, &host, authority.port, req, &ctx.path).await;
    }
    let priced = match route_and_price(&proxy, &info, &ctx, &host, req).await {
        Ok(p) => p,
        Err(answer) => return answer,
    };
    let priced = match price_by_catalog(&proxy, &info, &ctx, &host, priced).await {
        Ok(p) => p,
        Err(answer) => return answer,
    };
    let priced = match sign_for_gate(&proxy, &info, &ctx, &host, priced).await {
        Ok(p) => p,
        Err(answer) => return answer,
    };
    decide_then_forward(&proxy.sides(), &info, &host, &ctx.path, priced).await
}

/// The decide step, then the forward step on its attestation: nothing is sent upstream unless
/// the decide step answered `Ok`.
async fn decide_then_forward(
    sides: &Sides<'_>,
    info: &ConnInfo,
    host: &DomainName,
    path: &str,
    priced: Priced,
) -> Response<ProxyBody> {
    let decided = decide_or_answer(&**sides.decider, sides.stats, priced.input, priced.verdict, host, path);
    let attestation = match decided.await {
        Ok(a) => a,
        Err(answer) => return answer,
    };
    forward(sides, info, host, priced.req, priced.upgrade, attestation, priced.metering).await
}

/// The request filter step: the HTTP/1 framing verdict, the one authority of the request, that
/// authority = SNI = dialed name and port (fronting), header-level framing. `Ok` is the
/// authority the rest of the request is about; `Err` the recorded refusal to answer. It owns
/// the proxy's own refusals before policy; it must not consult host policy or forward.
async fn request_filter(
    proxy: &Proxy,
    info: &ConnInfo,
    ctx: &RequestCtx,
    framing: Option<Option<Result<(), Refusal>>>,
    req: &Request<Incoming>,
) -> Result<checks::Authority, Response<ProxyBody>> {
    let (method, path, default_action) = (&ctx.method, ctx.path.as_str(), ctx.default_action);
    let authority = checks::request_authority(req.version(), req.uri(), req.headers());
    if let Some(framing) = framing {
        let refusal = match framing {
            Some(Ok(())) => None,
            Some(Err(r)) => Some(r),
            None => Some(Refusal {
                reason: Reason::MalformedRequest,
                detail: "The request's framing could not be verified (after a tunnel or unparseable body framing)."
                    .into(),
            }),
        };
        if let Some(r) = refusal {
            let target = authority.as_ref().ok().map(|a| &a.host).or(info.conn_name());
            let close = r.reason == Reason::RequestSmuggling || r.reason == Reason::MalformedRequest;
            let mut resp = refuse(proxy, info, target, default_action, method, path, r).await;
            if close {
                resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return Err(resp);
        }
    }
    let authority = match authority {
        Ok(a) => a,
        Err(r) => return Err(refuse(proxy, info, info.conn_name(), default_action, method, path, r).await),
    };
    // A CONNECT's port is the tunnel's destination, not the port this connection was made to.
    let consistency = if checks::is_connect(method) {
        let name_only = checks::Authority { host: authority.host.clone(), port: None };
        checks::check_consistent(&name_only, info.sni.as_ref(), info.dialed_name.as_ref(), info.dialed.port())
    } else {
        checks::check_consistent(&authority, info.sni.as_ref(), info.dialed_name.as_ref(), info.dialed.port())
    };
    if let Err(r) = consistency {
        // Recorded against the name the connection was opened for: that is what the agent
        // tried to borrow.
        let target = info.conn_name().unwrap_or(&authority.host).clone();
        return Err(refuse(proxy, info, Some(&target), default_action, method, path, r).await);
    }
    if req.version() != Version::HTTP_2 {
        if let Err(r) = checks::check_framing(req.headers()) {
            return Err(refuse(proxy, info, Some(&authority.host), default_action, method, path, r).await);
        }
    }
    Ok(authority)
}

/// A request routed and priced, ready for the decide step.
struct Priced {
    /// The request, its body replaying any prefix read for the estimate.
    req: Request<ProxyBody>,
    input: EnforceInput,
    verdict: decide::HostVerdict,
    upgrade: bool,
    metering: Option<Metering>,
}

/// The route and price step: host policy route → action and cost (a metered route reads a
/// bounded prefix of the body to estimate), upgrades only on an explicit route, the host-wide
/// verdict. It owns the policy lookup; it must not decide or forward.
async fn route_and_price(
    proxy: &Proxy,
    info: &ConnInfo,
    ctx: &RequestCtx,
    host: &DomainName,
    req: Request<Incoming>,
) -> Result<Priced, Response<ProxyBody>> {
    let (method, path) = (&ctx.method, &ctx.path);
    let policy = proxy.policy.current();
    let route = policy.route(host, method.as_str(), path);
    let upgrade = checks::is_upgrade(req.version(), req.headers());
    if upgrade && route.route_id.is_none() {
        let r = Refusal {
            reason: Reason::UpgradeDenied,
            detail: format!(
                "Switching protocols ({}) on {host}{path} needs a host policy route for this path.",
                req.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok()).unwrap_or("?")
            ),
        };
        return Err(refuse(proxy, info, Some(host), &route.action, method, path, r).await);
    }

    let (req, cost) = match &route.cost {
        Cost::Fixed(c) => (req.map(boxed_incoming), *c),
        Cost::Metered(spec) => match metered_estimate(req, spec).await {
            Ok(got) => got,
            Err(e) => {
                tracing::info!(client = %info.client, error = %e, "request body failed while estimating its cost");
                return Err(simple(StatusCode::BAD_REQUEST, json!({"error": "request_body", "detail": e.to_string()})));
            }
        },
    };
    let verdict = policy.host_check(host, cost);
    let input = EnforceInput {
        passport_id: info.passport_id.clone(),
        action: route.action.to_string(),
        cost_cents: None,
        cost_millicents: Some(cost),
        target: Some(host.to_string()),
        method: Some(method.to_string()),
        path: Some(path.clone()),
        port: None,
        signed_request_hash: None,
        gate_price: None,
    };
    let metering = match &route.cost {
        Cost::Metered(spec) => Some(Metering { spec: spec.clone(), estimate_millicents: cost }),
        Cost::Fixed(_) => None,
    };
    Ok(Priced { req, input, verdict, upgrade, metering })
}

/// The catalog step: a request to a gate host (`[gates] hosts`) is mapped by the gate's verified
/// catalog (`sluice discover`): its routes give the permission, which becomes the decision's
/// action, and the price of the version in force, under the passport's price lock (decided with
/// the record), becomes its cost, so the passport's permissions and caps hold against the gate
/// before anything leaves the host. No verified catalog yet: fetched now (waiting at most
/// `discover::ENSURE_WAIT`), else refused `gate_catalog_unavailable`; a permission the version in force does not offer: refused
/// `permission_not_offered`. A gate that declares no catalog is not priced (as the gate).
async fn price_by_catalog(
    proxy: &Proxy,
    info: &ConnInfo,
    ctx: &RequestCtx,
    host: &DomainName,
    mut priced: Priced,
) -> Result<Priced, Response<ProxyBody>> {
    let Some(catalogs) = proxy.gates.catalogs_for(host) else { return Ok(priced) };
    let (method, path) = (&ctx.method, &ctx.path);
    let Some(offer) = catalogs.ensure(host).await else {
        let why = catalogs.failure(host.as_str()).unwrap_or_else(|| "no catalog was fetched yet".into());
        let r = Refusal {
            reason: Reason::GateCatalogUnavailable,
            detail: format!(
                "The daemon holds no verified catalog of the gate {host} ({why}), so this request cannot be mapped to a permission or priced; nothing was sent. Run `sluice discover https://{host}[:PORT]`, or retry once the daemon's refresh succeeds."
            ),
        };
        let action = priced.input.action.clone();
        return Err(refuse(proxy, info, Some(host), &action, method, path, r).await);
    };
    let Some(current) = offer.current() else { return Ok(priced) };
    let permission = current.snapshot.permission_of(method.as_str(), path).to_string();
    let Some(offered) = current.snapshot.permission(&permission) else {
        let r = Refusal {
            reason: Reason::PermissionNotOffered,
            detail: format!(
                "{method} {path} needs {permission} at the gate {host}, which its catalog version {} does not offer; nothing was sent.",
                current.snapshot.version
            ),
        };
        return Err(refuse(proxy, info, Some(host), &permission, method, path, r).await);
    };
    let ceiling = offered.terms.price().total_millicents();
    priced.verdict = proxy.policy.current().host_check(host, ceiling);
    priced.input.action = permission.clone();
    priced.input.cost_cents = None;
    priced.input.cost_millicents = Some(ceiling);
    priced.input.gate_price = Some(crate::service::GatePrice { offer, permission });
    priced.metering = None;
    Ok(priced)
}

/// The gate step ([`super::gate`]): a request to a gate host from a sandbox whose agent key the
/// daemon holds is read whole (bounded by `[gates] max_body_bytes`), signed, and its request hash
/// put into the decision's input, so the decision record carries it. Other requests pass
/// untouched. It runs before the decision so that the record names the exact request sent; it
/// must not decide or forward (a body too large is the proxy's own refusal, recorded).
async fn sign_for_gate(
    proxy: &Proxy,
    info: &ConnInfo,
    ctx: &RequestCtx,
    host: &DomainName,
    mut priced: Priced,
) -> Result<Priced, Response<ProxyBody>> {
    let Some(key) = proxy.gates.key_for(info.cgroup_id, host) else { return Ok(priced) };
    let (mut parts, body) = priced.req.into_parts();
    let declared =
        parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<u64>().ok());
    let body = match gate::read_bounded(body, declared, proxy.gates.max_body_bytes()).await {
        Ok(b) => b,
        Err(gate::BodyError::TooLarge { max, at_least }) => {
            let r = Refusal {
                reason: Reason::GateBodyTooLarge,
                detail: format!(
                    "The request body to the gate {host} is {at_least} bytes or more; sluice signs bodies of at most \
                     {max} bytes for gates ([gates] max_body_bytes). Send a smaller body, or ask the operator to \
                     raise the limit."
                ),
            };
            let action = priced.input.action.clone();
            let mut resp = refuse(proxy, info, Some(host), &action, &ctx.method, &ctx.path, r).await;
            // The rest of the body was not read.
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Err(resp);
        }
        Err(gate::BodyError::Read(e)) => {
            tracing::info!(client = %info.client, error = %e, "request body failed while reading it to sign");
            return Err(simple(StatusCode::BAD_REQUEST, json!({"error": "request_body", "detail": e.to_string()})));
        }
    };
    let scheme = if info.tls { "https" } else { "http" };
    let signed = httpsig::target_uri(scheme, &format!("{host}:{}", info.dialed.port()), &ctx.path)
        .map_err(gate::SignError::Sign)
        .and_then(|uri| {
            let created = u64::try_from(crate::passport::now()).unwrap_or(0);
            gate::sign_headers(&mut parts.headers, &key, &ctx.method, &uri, &body, created, &gate::nonce())
        });
    match signed {
        Ok(hash) => {
            tracing::debug!(%host, request_hash = %hash, keyid = key.keyid(), "request to a gate signed");
            priced.input.signed_request_hash = Some(hash);
        }
        Err(e) => {
            let r = Refusal {
                reason: Reason::MalformedRequest,
                detail: format!("The request to the gate {host} cannot be signed: {e}."),
            };
            let action = priced.input.action.clone();
            return Err(refuse(proxy, info, Some(host), &action, &ctx.method, &ctx.path, r).await);
        }
    }
    priced.req = Request::from_parts(parts, Full::new(body).map_err(|never| match never {}).boxed());
    Ok(priced)
}

/// The decide step: decides one request (durably) and settles a hold by waiting on it. `Ok`
/// carries the attestation that lets the request go ahead (the allow decision, or the approved
/// hold's resolution); `Err` is the answer to give instead: `403` with the decision JSON, or
/// `503` if the store failed. It owns the decision and the hold wait; it must not forward,
/// and it never answers `Ok` without a recorded decision to cite.
async fn decide_or_answer(
    decider: &dyn Decide,
    stats: &Stats,
    input: EnforceInput,
    verdict: decide::HostVerdict,
    host: &DomainName,
    path: &str,
) -> Result<u64, Response<ProxyBody>> {
    let outcome = match decider.enforce(input, verdict).await {
        Ok(o) => o,
        Err(e) => return Err(service_failure(&e)),
    };
    match outcome.decision {
        Decision::Allow => Ok(outcome.attestation_id),
        Decision::Block => {
            inc(&stats.blocked);
            Err(decision_response(outcome.to_json_bytes(), &outcome.reason, outcome.attestation_id))
        }
        Decision::RequestHold => {
            inc(&stats.held);
            let Some(hold_id) = outcome.hold_id().map(str::to_string) else {
                return Err(decision_response(outcome.to_json_bytes(), &outcome.reason, outcome.attestation_id));
            };
            tracing::info!(%hold_id, %host, %path, "request held for approval");
            let held = decider.wait_hold(&hold_id).await;
            match (held.decision(), held.attestation_id()) {
                // Forwarded on the approval's own record, which a settlement links to.
                (Decision::Allow, Some(id)) => Ok(id),
                (Decision::Allow, None) => {
                    // Approved, but the resolution's record cannot be named: nothing leaves.
                    inc(&stats.blocked);
                    tracing::error!(%hold_id, "approved hold has no resolution record to cite; refusing");
                    let e = ServiceError::ResolutionNotFound(hold_id.clone());
                    Err(service_failure(&e))
                }
                (_, resolution) => {
                    inc(&stats.blocked);
                    let mut body = held.to_json();
                    if let Value::Object(m) = &mut body {
                        m.entry("decision").or_insert_with(|| "block".into());
                        m.entry("approval_request_id").or_insert_with(|| hold_id.clone().into());
                    }
                    // No resolution record yet (the daemon is stopping): the hold's decision is
                    // the last record of this request.
                    Err(decision_response(
                        body.to_string().into_bytes(),
                        &held.reason(),
                        resolution.unwrap_or(outcome.attestation_id),
                    ))
                }
            }
        }
    }
}

/// A metered route's estimate, settled from the response (issue 6; see [`super::metered`]).
struct Metering {
    spec: Arc<policy::MeterSpec>,
    /// Millicents.
    estimate_millicents: u64,
}

fn default_action(method: &Method) -> &'static str {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        policy::FETCH_ACTION
    } else {
        policy::SEND_ACTION
    }
}

/// Records a proxy refusal as a decision (host-policy denial with the refusal's reason) and
/// answers it.
async fn refuse(
    proxy: &Proxy,
    info: &ConnInfo,
    target: Option<&DomainName>,
    action: &str,
    method: &Method,
    path: &str,
    refusal: Refusal,
) -> Response<ProxyBody> {
    inc(&proxy.stats.blocked);
    tracing::info!(client = %info.client, pid = info.pid, cgroup_id = info.cgroup_id, reason = %refusal.reason, detail = %refusal.detail, "request refused");
    let close = refusal.reason == Reason::RequestSmuggling;
    match record_refusal(proxy, info, target, action, Some(method.as_str()), Some(path), &refusal).await {
        Ok(outcome) => {
            let mut resp = decision_response(outcome.to_json_bytes(), &outcome.reason, outcome.attestation_id);
            if close {
                // The body's framing is in doubt: nothing more is read from this connection.
                resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp
        }
        Err(e) => service_failure(&e),
    }
}

fn boxed_incoming(b: Incoming) -> ProxyBody {
    b.map_err(|e| Box::new(e) as BoxError).boxed()
}

/// Reads at most [`meter::MAX_REQUEST_SCAN`] bytes of the body to estimate a metered cost, then
/// gives back a body that replays them before the rest.
async fn metered_estimate(
    req: Request<Incoming>,
    spec: &policy::MeterSpec,
) -> Result<(Request<ProxyBody>, u64), hyper::Error> {
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<u64>().ok());
    let (parts, mut body) = req.into_parts();
    let mut prefix: Vec<Bytes> = Vec::new();
    let mut seen = 0usize;
    let mut trailers = None;
    let mut ended = false;
    while seen < meter::MAX_REQUEST_SCAN {
        match body.frame().await {
            None => {
                ended = true;
                break;
            }
            Some(frame) => {
                let frame = frame?;
                match frame.into_data() {
                    Ok(data) => {
                        seen += data.len();
                        prefix.push(data);
                    }
                    Err(frame) => {
                        trailers = frame.into_trailers().ok();
                        ended = true;
                        break;
                    }
                }
            }
        }
    }
    let mut scan = Vec::with_capacity(seen.min(meter::MAX_REQUEST_SCAN));
    for chunk in &prefix {
        let room = meter::MAX_REQUEST_SCAN.saturating_sub(scan.len());
        scan.extend_from_slice(chunk.get(..chunk.len().min(room)).unwrap_or_default());
    }
    let total = declared.unwrap_or(seen as u64).max(seen as u64);
    let cost = meter::estimate_with_len(spec, &scan, total);
    let body = Replay { prefix: prefix.into(), trailers, rest: if ended { None } else { Some(body) } };
    Ok((Request::from_parts(parts, body.boxed()), cost))
}

/// A body that yields buffered chunks, then whatever remains of the original body.
struct Replay {
    prefix: std::collections::VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    rest: Option<Incoming>,
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(chunk) = this.prefix.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(t) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        match &mut this.rest {
            None => Poll::Ready(None),
            Some(rest) => Pin::new(rest).poll_frame(cx).map_err(|e| Box::new(e) as BoxError),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.trailers.is_none() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self.prefix.iter().map(|b| b.len() as u64).sum();
        let rest = self.rest.as_ref().map(Body::size_hint).unwrap_or_else(|| SizeHint::with_exact(0));
        // Upper first: `set_lower` asserts lower <= upper (raising the lower bound of an exact
        // hint before its upper one panicked on every fully buffered metered request).
        let mut hint = SizeHint::new();
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(buffered));
        }
        hint.set_lower(rest.lower().saturating_add(buffered));
        hint
    }
}

/// CONNECT opens a tunnel the proxy cannot look into, so it is refused unless a `[[raw_tcp]]`
/// host policy allows the target name and port (never 80 or 443: those are HTTP, inspected).
/// Allowed: decided like any request (the rule's action and cost), answered `200`, then the
/// tunnel is spliced to the address the daemon resolves for the name.
async fn connect(
    proxy: &Arc<Proxy>,
    info: &ConnInfo,
    host: &DomainName,
    port: Option<u16>,
    mut req: Request<Incoming>,
    path: &str,
) -> Response<ProxyBody> {
    let method = Method::CONNECT;
    let policy = proxy.policy.current();
    let rule = port.and_then(|p| policy.raw_tcp(Some(host), p));
    let (Some(rule), Some(port)) = (rule, port) else {
        let r = Refusal {
            reason: Reason::ConnectDenied,
            detail: format!(
                "CONNECT {path} would open a tunnel the proxy cannot inspect, and no [[raw_tcp]] host policy \
                 allows it. Send the HTTP requests themselves."
            ),
        };
        return refuse(proxy, info, Some(host), policy::SEND_ACTION, &method, path, r).await;
    };
    let input = EnforceInput {
        passport_id: info.passport_id.clone(),
        action: rule.action.to_string(),
        cost_cents: None,
        cost_millicents: Some(rule.cost_millicents),
        target: Some(host.to_string()),
        method: Some(method.to_string()),
        path: Some(path.to_string()),
        port: Some(port),
        signed_request_hash: None,
        gate_price: None,
    };
    let verdict = policy.host_check(host, rule.cost_millicents);
    let attestation = match decide_or_answer(&*proxy.service, &proxy.stats, input, verdict, host, path).await {
        Ok(a) => a,
        Err(answer) => return answer,
    };
    let upstream = match super::upstream::dial(&proxy.resolver, host, port).await {
        Ok((s, _)) => s,
        Err(e) => return upstream_failure(&proxy.sides(), info, host, attestation, e.kind(), &e.to_string()).await,
    };
    inc(&proxy.stats.forwarded);
    let on_upgrade = hyper::upgrade::on(&mut req);
    // The tunnel outlives the HTTP connection's task: it watches the emergency stop itself.
    let stopped = super::until_stopped(proxy.stops.clone(), info.passport_id.clone());
    // The tunnel is the connection from now on: it keeps the connection's place in the budgets.
    let slot = info.slot.clone();
    tokio::spawn(async move {
        let _slot = slot;
        match on_upgrade.await {
            Ok(tunnel) => {
                let (mut a, mut u) = (TokioIo::new(tunnel), upstream);
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut a, &mut u) => {}
                    () = stopped => tracing::warn!("emergency stop: CONNECT tunnel closed"),
                }
            }
            Err(e) => tracing::info!(error = %e, "CONNECT tunnel was not established"),
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()).map_err(|never| match never {}).boxed());
    resp.headers_mut().insert(HeaderName::from_static(DECISION_HEADER), allow_header(attestation));
    resp
}

/// Connection-level headers (RFC 9110 §7.6.1) and the proxy-only ones: never forwarded.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && *n == header::UPGRADE))
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
    headers.remove(HeaderName::from_static("proxy-connection"));
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// The service side of the steps after the decision: the decider (settlement, host events),
/// the upstream, the counters.
struct Sides<'a> {
    decider: &'a Arc<dyn Decide>,
    upstream: &'a dyn Forward,
    stats: &'a Stats,
    stops: &'a tokio::sync::watch::Receiver<Arc<crate::service::StopSet>>,
}

impl Proxy {
    fn sides(&self) -> Sides<'_> {
        Sides { decider: &self.service, upstream: &self.upstream, stats: &self.stats, stops: &self.stops }
    }
}

/// The forward step: sends an allowed request to the real service and streams its response
/// back, through the response filter and, on a metered route, the settlement of its cost. It
/// runs only after a recorded allow (`attestation`); it must not decide anything.
async fn forward(
    sides: &Sides<'_>,
    info: &ConnInfo,
    host: &DomainName,
    mut req: Request<ProxyBody>,
    upgrade: bool,
    attestation: u64,
    metering: Option<Metering>,
) -> Response<ProxyBody> {
    let agent_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // The name the decision was made on, on the port the agent dialed; only the path and query
    // of the request's URI go upstream, and the upstream client sets `Host` (or `:authority`)
    // from the target.
    let target = Target { tls: info.tls, name: host.clone(), port: info.dialed.port() };
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        parts.uri = http::Uri::from(path);
    }
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if metering.is_some() {
        // The usage fields must be readable as they pass: a compressed response would hide them
        // (and the estimate would stand), so a metered request asks for the plain body.
        parts.headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    }
    let req = Request::from_parts(parts, body);
    let mut resp = match sides.upstream.send(&target, req, upgrade).await {
        Ok(r) => r,
        Err(e) => {
            let kind = if e.connect { "connect" } else { "http" };
            return upstream_failure(sides, info, host, attestation, kind, &e.detail).await;
        }
    };
    inc(&sides.stats.forwarded);
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching {
        if let Some(agent) = agent_upgrade {
            let upstream = hyper::upgrade::on(&mut resp);
            // The upgraded stream outlives the HTTP connection's task: it watches the stop itself.
            let stopped = super::until_stopped(sides.stops.clone(), info.passport_id.clone());
            let slot = info.slot.clone();
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::try_join!(agent, upstream) {
                    Ok((a, u)) => {
                        let (mut a, mut u) = (TokioIo::new(a), TokioIo::new(u));
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut a, &mut u) => {}
                            () = stopped => tracing::warn!("emergency stop: upgraded connection closed"),
                        }
                    }
                    Err(e) => tracing::info!(error = %e, "protocol upgrade failed"),
                }
            });
        }
    }
    let (mut parts, body) = resp.into_parts();
    response_filter(&mut parts.headers, switching && upgrade, attestation);
    let body = match metering {
        // The usage fields are read as the frames pass; the cost settles when the body ends.
        Some(m) if encoded(&parts.headers) => {
            // Sent compressed anyway: the usage cannot be read, the estimate stands.
            let settle = sides.decider.clone();
            let passport = info.passport_id.clone();
            tokio::spawn(async move {
                let why = crate::service::settle_why::ENCODED;
                if let Err(e) = settle.settle(attestation, &passport, m.estimate_millicents, None, why).await {
                    tracing::error!(attestation, error = %e, "recording an unsettled metered cost failed");
                }
            });
            body
        }
        Some(m) => super::metered::settle_on_end(
            body,
            m.spec,
            sides.decider.clone(),
            attestation,
            info.passport_id.clone(),
            m.estimate_millicents,
        ),
        None => body,
    };
    Response::from_parts(parts, body)
}

/// The response filter step: what the agent receives of a forwarded response's headers. It
/// strips the hop-by-hop headers (keeping `Upgrade` only on an upgrade both sides agreed to) and
/// sets `Sluice-Decision: allow; attestation=<index>`, the record the response went out on. It
/// owns the response headers only; it must not touch the body or the status.
fn response_filter(headers: &mut HeaderMap, upgraded: bool, attestation: u64) {
    strip_hop_by_hop(headers, upgraded);
    headers.insert(HeaderName::from_static(DECISION_HEADER), allow_header(attestation));
}

/// `allow; attestation=<index>`, built in one allocation (the value takes the string's bytes).
fn allow_header(attestation: u64) -> HeaderValue {
    let value = Bytes::from(format!("allow; attestation={attestation}"));
    // Digits and ASCII punctuation only: always a valid header value.
    HeaderValue::from_maybe_shared(value).unwrap_or_else(|_| HeaderValue::from_static("allow"))
}

/// Whether a response body is sent with a content coding other than `identity`.
fn encoded(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONTENT_ENCODING).iter().any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
}

/// `502` with a JSON body; the failure is attested (the allow decision before it already is).
async fn upstream_failure(
    sides: &Sides<'_>,
    info: &ConnInfo,
    host: &DomainName,
    attestation: u64,
    kind: &'static str,
    detail: &str,
) -> Response<ProxyBody> {
    inc(&sides.stats.upstream_errors);
    crate::metrics::global().upstream_error(kind);
    tracing::warn!(%host, error = %detail, "upstream request failed");
    let event = json!({
        "passport_id": info.passport_id, "host": host.to_string(), "port": info.dialed.port(),
        "decision_attestation_id": attestation, "error": detail,
    });
    let recorded = sides.decider.record_host_event("upstream_error", event).await.ok();
    simple(
        StatusCode::BAD_GATEWAY,
        json!({
            "error": "upstream_failed",
            "detail": format!("The request was allowed (attestation {attestation}) but {host} could not be reached: {detail}"),
            "host": host.to_string(),
            "decision_attestation_id": attestation,
            "attestation_id": recorded,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fully_buffered_replay_has_an_exact_size() {
        let r = Replay {
            prefix: vec![Bytes::from_static(b"{\"model\":"), Bytes::from_static(b"\"m\"}")].into(),
            trailers: None,
            rest: None,
        };
        assert_eq!(r.size_hint().exact(), Some(13));
    }

    #[test]
    fn only_identity_bodies_can_be_metered() {
        let mut h = HeaderMap::new();
        assert!(!encoded(&h));
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("Identity"));
        assert!(!encoded(&h));
        h.append(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert!(encoded(&h));
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
        assert!(encoded(&h));
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("proxy-authorization", HeaderValue::from_static("x"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn upgrade_headers_survive_when_upgrading() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
    }

    use super::super::decider::fake::{outcome, FakeDecide};
    use super::super::decider::ForwardError;
    use crate::service::{HoldOutcome, HoldStatus};
    use std::sync::atomic::Ordering;

    fn input() -> EnforceInput {
        EnforceInput {
            passport_id: "pp-1".into(),
            action: "web:fetch".into(),
            cost_millicents: Some(0),
            target: Some("example.com".into()),
            method: Some("GET".into()),
            path: Some("/".into()),
            ..EnforceInput::default()
        }
    }

    async fn decide(fake: &FakeDecide, stats: &Stats) -> Result<u64, Response<ProxyBody>> {
        let host = DomainName::parse("example.com").unwrap();
        decide_or_answer(fake, stats, input(), decide::HostVerdict::Allow, &host, "/").await
    }

    async fn body_json(resp: Response<ProxyBody>) -> Value {
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        serde_json::from_slice(&bytes).expect("json body")
    }

    fn header(resp: &Response<ProxyBody>) -> &str {
        resp.headers().get(DECISION_HEADER).expect("decision header").to_str().unwrap()
    }

    #[tokio::test]
    async fn an_allow_goes_ahead_on_its_own_attestation() {
        let fake = FakeDecide::answering(Ok(outcome(Decision::Allow, Reason::Allowed, 7)));
        let stats = Stats::default();
        assert_eq!(decide(&fake, &stats).await.ok(), Some(7));
        let enforced = fake.enforced.lock().unwrap();
        assert_eq!(enforced.len(), 1);
        assert_eq!(enforced[0].0.target.as_deref(), Some("example.com"));
        assert!(fake.waited.lock().unwrap().is_empty());
        assert_eq!(stats.blocked.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_block_is_a_403_with_the_decision_json_and_header() {
        let fake = FakeDecide::answering(Ok(outcome(Decision::Block, Reason::DomainNotAllowed, 8)));
        let stats = Stats::default();
        let resp = decide(&fake, &stats).await.expect_err("blocked");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(header(&resp), "block; reason=domain_not_allowed; attestation=8");
        let body = body_json(resp).await;
        assert_eq!((body["decision"].as_str(), body["reason"].as_str()), (Some("block"), Some("domain_not_allowed")));
        assert_eq!(body["attestation_id"], 8);
        assert_eq!(stats.blocked.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn an_approved_hold_goes_ahead_on_the_approval_record() {
        let fake = FakeDecide::answering(Ok(outcome(Decision::RequestHold, Reason::ApprovalRequired, 9)));
        *fake.hold.lock().unwrap() = Some(HoldOutcome::Resolved {
            outcome: outcome(Decision::Allow, Reason::HoldApproved, 12),
            hold_id: "hold-1".into(),
            hold_status: HoldStatus::Approved,
        });
        let stats = Stats::default();
        assert_eq!(decide(&fake, &stats).await.ok(), Some(12));
        assert_eq!(*fake.waited.lock().unwrap(), vec!["hold-1".to_string()]);
        assert_eq!(stats.held.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_denied_hold_is_refused_on_the_denial_record() {
        let fake = FakeDecide::answering(Ok(outcome(Decision::RequestHold, Reason::ApprovalRequired, 9)));
        *fake.hold.lock().unwrap() = Some(HoldOutcome::Resolved {
            outcome: outcome(Decision::Block, Reason::HoldDenied, 13),
            hold_id: "hold-1".into(),
            hold_status: HoldStatus::Denied,
        });
        let resp = decide(&fake, &Stats::default()).await.expect_err("denied");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(header(&resp), "block; reason=hold_denied; attestation=13");
        assert_eq!(body_json(resp).await["approval_request_id"], "hold-1");
    }

    #[tokio::test]
    async fn an_abandoned_hold_is_refused_on_the_hold_record() {
        let fake = FakeDecide::answering(Ok(outcome(Decision::RequestHold, Reason::ApprovalRequired, 9)));
        let resp = decide(&fake, &Stats::default()).await.expect_err("abandoned");
        assert_eq!(header(&resp), "block; reason=hold_abandoned; attestation=9");
        let body = body_json(resp).await;
        assert_eq!((body["decision"].as_str(), body["approval_request_id"].as_str()), (Some("block"), Some("hold-1")));
    }

    #[tokio::test]
    async fn an_approval_without_a_record_to_cite_is_a_503() {
        let fake = FakeDecide::answering(Ok(outcome(Decision::RequestHold, Reason::ApprovalRequired, 9)));
        *fake.hold.lock().unwrap() = Some(HoldOutcome::Found {
            decision: Decision::Allow,
            reason: Reason::HoldApproved,
            hold_id: "hold-1".into(),
            hold_status: HoldStatus::Approved,
            attestation_id: None,
        });
        let resp = decide(&fake, &Stats::default()).await.expect_err("nothing to cite");
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn a_store_failure_is_a_503_and_nothing_goes_ahead() {
        let fake = FakeDecide::answering(Err(ServiceError::NotAppended("the disk is full")));
        let resp = decide(&fake, &Stats::default()).await.expect_err("store failed");
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(resp.headers().get(DECISION_HEADER).is_none());
        let body = body_json(resp).await;
        assert_eq!((body["decision"].as_str(), body["reason"].as_str()), (Some("block"), Some("decision_failed")));
        assert!(fake.waited.lock().unwrap().is_empty());
    }

    /// An upstream that answers one scripted response and keeps the request it was sent.
    struct FakeUpstream {
        answer: std::sync::Mutex<Option<Result<Response<ProxyBody>, ForwardError>>>,
        seen: std::sync::Mutex<Vec<(Target, http::request::Parts, bool)>>,
    }

    impl FakeUpstream {
        fn answering(answer: Result<Response<ProxyBody>, ForwardError>) -> FakeUpstream {
            FakeUpstream { answer: std::sync::Mutex::new(Some(answer)), seen: std::sync::Mutex::new(Vec::new()) }
        }
    }

    impl Forward for FakeUpstream {
        fn send<'a>(
            &'a self,
            target: &'a Target,
            req: Request<ProxyBody>,
            h1_only: bool,
        ) -> super::super::decider::BoxFuture<'a, Result<Response<ProxyBody>, ForwardError>> {
            self.seen.lock().unwrap().push((target.clone(), req.into_parts().0, h1_only));
            let answer = self.answer.lock().unwrap().take().expect("one request only");
            Box::pin(async move { answer })
        }
    }

    fn conn_info() -> ConnInfo {
        let host = DomainName::parse("example.com").unwrap();
        ConnInfo {
            passport_id: "pp-1".into(),
            client: "127.0.0.1:40000".parse().unwrap(),
            dialed: "198.18.0.5:443".parse().unwrap(),
            pid: 1234,
            cgroup_id: 99,
            dialed_name: Some(host.clone()),
            sni: Some(host),
            tls: true,
            slot: None,
        }
    }

    /// An agent connection as the served-connection tests open it: from 127.0.0.1:40000 in the
    /// test cgroup to `dialed` (by `name` when the agent resolved one through the daemon), no SNI.
    fn served_conn(dialed: &str, name: Option<DomainName>, tls: bool) -> Arc<ConnInfo> {
        Arc::new(ConnInfo {
            passport_id: "pp-1".into(),
            client: "127.0.0.1:40000".parse().expect("addr"),
            dialed: dialed.parse().expect("addr"),
            pid: 4242,
            cgroup_id: crate::proxy::testing::CGROUP,
            dialed_name: name,
            sni: None,
            tls,
            slot: None,
        })
    }

    /// As [`served_conn`] (plain, to `name` behind 198.18.0.9:80), for the agent's end `agent`,
    /// holding its places in the budgets as the accept loop's connections do.
    fn admitted_conn(
        h: &crate::proxy::testing::Harness,
        agent: &tokio::net::TcpStream,
        name: &DomainName,
    ) -> Arc<ConnInfo> {
        let client = agent.local_addr().expect("addr");
        h.redirects.redirect(client, "198.18.0.9:80".parse().expect("addr"), crate::proxy::testing::CGROUP);
        let (_, admitted) = h.proxy.take(client).expect("admitted");
        let mut info = (*served_conn("198.18.0.9:80", Some(name.clone()), false)).clone();
        info.slot = Some(crate::proxy::Slot(Arc::new(admitted)));
        Arc::new(info)
    }

    fn upstream_response(body: &'static str, headers: &[(&'static str, &'static str)]) -> Response<ProxyBody> {
        let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())).map_err(|e| match e {}).boxed());
        for (k, v) in headers {
            resp.headers_mut().insert(*k, HeaderValue::from_static(v));
        }
        resp
    }

    fn agent_request() -> Request<ProxyBody> {
        let mut req = Request::new(Full::new(Bytes::from_static(b"{}")).map_err(|e| match e {}).boxed());
        *req.uri_mut() = "/v1/x?q=1".parse().unwrap();
        *req.method_mut() = Method::POST;
        let h = req.headers_mut();
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("secret"));
        h.insert("x-agent", HeaderValue::from_static("1"));
        req
    }

    async fn forward_with(
        decider: &Arc<dyn Decide>,
        upstream: &FakeUpstream,
        stats: &Stats,
        metering: Option<Metering>,
    ) -> Response<ProxyBody> {
        let (_stops_tx, stops) = tokio::sync::watch::channel(Arc::new(crate::service::StopSet::default()));
        let sides = Sides { decider, upstream, stats, stops: &stops };
        let host = DomainName::parse("example.com").unwrap();
        forward(&sides, &conn_info(), &host, agent_request(), false, 7, metering).await
    }

    #[tokio::test]
    async fn an_allowed_request_is_forwarded_to_the_name_with_the_allow_header() {
        let fake = Arc::new(FakeDecide::default());
        let decider: Arc<dyn Decide> = fake.clone();
        let upstream = FakeUpstream::answering(Ok(upstream_response(
            "hello",
            &[("connection", "x-secret"), ("x-secret", "1"), ("content-type", "text/plain")],
        )));
        let stats = Stats::default();
        let resp = forward_with(&decider, &upstream, &stats, None).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp), "allow; attestation=7");
        assert!(resp.headers().get("x-secret").is_none());
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "hello");
        let seen = upstream.seen.lock().unwrap();
        let (target, parts, h1_only) = &seen[0];
        // The name the decision was about, on the port dialed; never the dialed address.
        assert_eq!((target.tls, target.name.as_str(), target.port), (true, "example.com", 443));
        assert_eq!(parts.uri, "/v1/x?q=1");
        assert_eq!((parts.method.as_str(), parts.version, *h1_only), ("POST", Version::HTTP_11, false));
        assert!(parts.headers.get(header::PROXY_AUTHORIZATION).is_none());
        assert_eq!(parts.headers.get("x-agent").unwrap(), "1");
        assert!(parts.headers.get(header::ACCEPT_ENCODING).is_none());
        assert_eq!(stats.forwarded.load(Ordering::Relaxed), 1);
        assert!(fake.settled.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_502_naming_the_allow() {
        let decider: Arc<dyn Decide> = Arc::new(FakeDecide::default());
        let upstream =
            FakeUpstream::answering(Err(ForwardError { connect: true, detail: "connection refused".into() }));
        let stats = Stats::default();
        let resp = forward_with(&decider, &upstream, &stats, None).await;
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        let body = body_json(resp).await;
        assert_eq!(
            (body["error"].as_str(), body["decision_attestation_id"].as_u64()),
            (Some("upstream_failed"), Some(7))
        );
        assert_eq!((stats.forwarded.load(Ordering::Relaxed), stats.upstream_errors.load(Ordering::Relaxed)), (0, 1));
    }

    #[tokio::test]
    async fn a_metered_route_asks_for_plain_bodies_and_settles_the_scanned_usage() {
        let spec = Arc::new(crate::service::testkit::one_price_meter(
            crate::policy::meter::MeterKind::OpenAi,
            100_000,
            200_000,
        ));
        let fake = Arc::new(FakeDecide::default());
        let decider: Arc<dyn Decide> = fake.clone();
        let usage =
            "{\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":1000000,\"completion_tokens\":500000}}";
        let upstream = FakeUpstream::answering(Ok(upstream_response(usage, &[("content-type", "application/json")])));
        let metering = Metering { spec, estimate_millicents: 5_000 };
        let resp = forward_with(&decider, &upstream, &Stats::default(), Some(metering)).await;
        assert_eq!(header(&resp), "allow; attestation=7");
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), usage);
        assert_eq!(upstream.seen.lock().unwrap()[0].1.headers.get(header::ACCEPT_ENCODING).unwrap(), "identity");
        let s = fake.first_settlement().await;
        // 1M input at $1 + 0.5M output at $2 = $2.00, replacing the estimate.
        assert_eq!(s, (7, "pp-1".to_string(), 5_000, Some(200_000), crate::service::settle_why::USAGE.to_string()));
    }

    async fn through_the_pipeline(fake: Arc<FakeDecide>, upstream: &FakeUpstream) -> Response<ProxyBody> {
        let decider: Arc<dyn Decide> = fake;
        let stats = Stats::default();
        let (_stops_tx, stops) = tokio::sync::watch::channel(Arc::new(crate::service::StopSet::default()));
        let sides = Sides { decider: &decider, upstream, stats: &stats, stops: &stops };
        let host = DomainName::parse("example.com").unwrap();
        let priced = Priced {
            req: agent_request(),
            input: input(),
            verdict: decide::HostVerdict::Allow,
            upgrade: false,
            metering: None,
        };
        decide_then_forward(&sides, &conn_info(), &host, "/v1/x?q=1", priced).await
    }

    #[tokio::test]
    async fn only_a_recorded_allow_reaches_the_upstream() {
        // Allowed: forwarded, on the decision's attestation.
        let fake = Arc::new(FakeDecide::answering(Ok(outcome(Decision::Allow, Reason::Allowed, 21))));
        let upstream = FakeUpstream::answering(Ok(upstream_response("ok", &[])));
        let resp = through_the_pipeline(fake, &upstream).await;
        assert_eq!((resp.status(), header(&resp)), (StatusCode::OK, "allow; attestation=21"));
        assert_eq!(upstream.seen.lock().unwrap().len(), 1);

        // Held, then approved: forwarded on the approval's record.
        let fake = Arc::new(FakeDecide::answering(Ok(outcome(Decision::RequestHold, Reason::ApprovalRequired, 22))));
        *fake.hold.lock().unwrap() = Some(HoldOutcome::Resolved {
            outcome: outcome(Decision::Allow, Reason::HoldApproved, 23),
            hold_id: "hold-1".into(),
            hold_status: HoldStatus::Approved,
        });
        let upstream = FakeUpstream::answering(Ok(upstream_response("ok", &[])));
        let resp = through_the_pipeline(fake, &upstream).await;
        assert_eq!(header(&resp), "allow; attestation=23");
        assert_eq!(upstream.seen.lock().unwrap().len(), 1);

        // Blocked, held then denied, or the store failed: nothing is sent.
        let held_denied =
            Arc::new(FakeDecide::answering(Ok(outcome(Decision::RequestHold, Reason::ApprovalRequired, 24))));
        *held_denied.hold.lock().unwrap() = Some(HoldOutcome::Resolved {
            outcome: outcome(Decision::Block, Reason::HoldDenied, 25),
            hold_id: "hold-1".into(),
            hold_status: HoldStatus::Denied,
        });
        let cases = [
            (
                Arc::new(FakeDecide::answering(Ok(outcome(Decision::Block, Reason::DomainNotAllowed, 26)))),
                StatusCode::FORBIDDEN,
            ),
            (held_denied, StatusCode::FORBIDDEN),
            (
                Arc::new(FakeDecide::answering(Err(ServiceError::NotAppended("the disk is full")))),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
        ];
        for (fake, status) in cases {
            let upstream = FakeUpstream::answering(Ok(upstream_response("must not be sent", &[])));
            let resp = through_the_pipeline(fake, &upstream).await;
            assert_eq!(resp.status(), status);
            assert!(upstream.seen.lock().unwrap().is_empty(), "a refused request reached the upstream");
        }
    }

    #[test]
    fn a_forwarded_response_carries_the_allow_and_no_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("x-upstream-secret"));
        h.insert("x-upstream-secret", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        // An upstream cannot forge the decision: the proxy's own header replaces it.
        h.insert(DECISION_HEADER, HeaderValue::from_static("allow; attestation=999"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        response_filter(&mut h, false, 42);
        assert_eq!(h.get(DECISION_HEADER).unwrap(), "allow; attestation=42");
        assert_eq!(h.get_all(DECISION_HEADER).iter().count(), 1);
        assert!(h.get("x-upstream-secret").is_none() && h.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(h.get(header::CONTENT_TYPE).unwrap(), "text/plain");
    }

    #[test]
    fn decision_header_is_one_token() {
        let r = decision_response(
            json!({"reason": "domain_not_allowed"}).to_string().into_bytes(),
            &Reason::DomainNotAllowed,
            7,
        );
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(r.headers().get(DECISION_HEADER).unwrap(), "block; reason=domain_not_allowed; attestation=7");
        let r = decision_response(
            json!({"reason": "x; evil=1\r\n"}).to_string().into_bytes(),
            &Reason::parse("x; evil=1\r\n"),
            1,
        );
        assert_eq!(r.headers().get(DECISION_HEADER).unwrap(), "block; reason=x__evil_1__; attestation=1");
    }

    /// A proxy whose `header_timeout` is `timeout`, deciding `answer` for every request.
    fn with_header_timeout(
        timeout: std::time::Duration,
        answer: crate::service::DecisionOutcome,
    ) -> crate::proxy::testing::Harness {
        let limits = super::super::Limits { header_timeout: timeout, ..super::super::Limits::default() };
        crate::proxy::testing::harness_with_limits(
            FakeDecide::answering(Ok(answer)),
            &crate::proxy::testing::raw_rule(9),
            &[],
            limits,
        )
    }

    /// HTTP/2 has no header timeout of its own: a connection that sends the preface and
    /// nothing else, or stops inside a header block, gets a GOAWAY once `header_timeout` passed
    /// with no request in progress, and is closed within the grace after it.
    #[tokio::test]
    async fn an_http2_connection_without_a_request_in_progress_is_closed_after_the_header_timeout() {
        use crate::proxy::testing::agent_pair;
        use std::time::{Duration, Instant};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let timeout = Duration::from_millis(300);
        let h = with_header_timeout(timeout, outcome(Decision::Allow, Reason::Allowed, 1));
        for partial in [false, true] {
            let (mut agent, accepted) = agent_pair().await;
            let task = tokio::spawn(serve(h.proxy.clone(), served_conn("127.0.0.1:443", None, true), accepted, true));
            let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            opening.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS, empty
            if partial {
                // HEADERS on stream 1, END_STREAM without END_HEADERS: `:method GET` (indexed).
                opening.extend_from_slice(&[0, 0, 1, 1, 1, 0, 0, 0, 1, 0x82]);
            }
            agent.write_all(&opening).await.expect("send");
            let start = Instant::now();
            let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
            loop {
                match tokio::time::timeout(Duration::from_secs(10), agent.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                    Err(_) => panic!("partial={partial}: the idle HTTP/2 connection was not closed"),
                }
            }
            let took = start.elapsed();
            assert!(took >= timeout, "partial={partial}: closed after {took:?}");
            assert!(took < timeout + crate::idle::CLOSE_GRACE + Duration::from_secs(3), "{took:?}");
            let mut kinds = Vec::new();
            let mut at = 0;
            while let Some(head) = got.get(at..at + 9) {
                let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
                kinds.push(head[3]);
                at += 9 + len;
            }
            assert!(kinds.contains(&7), "partial={partial}: no GOAWAY among frames {kinds:?}");
            let _ = task.await;
        }
        assert!(h.decide.enforced.lock().unwrap().is_empty(), "nothing was decided: no request came");
    }

    /// HTTP/1.1 under the same rule: a head trickled byte by byte and never finished
    /// (slowloris), and a keep-alive connection left idle after its answered request, are both
    /// closed once `header_timeout` passed with no request in progress, and not before.
    #[tokio::test]
    async fn an_http1_connection_without_a_request_in_progress_is_closed_after_the_header_timeout() {
        use crate::proxy::testing::agent_pair;
        use std::time::{Duration, Instant};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let timeout = Duration::from_millis(400);
        let h = with_header_timeout(timeout, outcome(Decision::Block, Reason::DomainNotAllowed, 5));
        let name = DomainName::parse("db.example.test").expect("name");
        for trickle in [true, false] {
            let (mut agent, accepted) = agent_pair().await;
            let info = served_conn("198.18.0.9:80", Some(name.clone()), false);
            let task = tokio::spawn(serve(h.proxy.clone(), info, accepted, false));
            let mut buf = [0u8; 4096];
            let start = if trickle {
                // One byte every 50 ms, the head never ending: still open after most of the
                // timeout (the bytes keep coming), closed after it.
                let start = Instant::now();
                for b in
                    b"GET / HTTP/1.1\r\nHost: db.example.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter()
                {
                    if agent.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if start.elapsed() > timeout * 3 {
                        break;
                    }
                }
                start
            } else {
                agent.write_all(b"GET / HTTP/1.1\r\nHost: db.example.test\r\n\r\n").await.expect("send");
                let n = tokio::time::timeout(Duration::from_secs(5), agent.read(&mut buf))
                    .await
                    .expect("answered")
                    .expect("read");
                let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                assert!(head.starts_with("http/1.1 403"), "{head}");
                Instant::now()
            };
            loop {
                match tokio::time::timeout(Duration::from_secs(10), agent.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(_)) => {}
                    Err(_) => panic!("trickle={trickle}: the connection was not closed"),
                }
            }
            let took = start.elapsed();
            // The idle count of the keep-alive case starts when the response body ended, a
            // moment before this side read it: a little slack below, none for the trickle.
            let floor = if trickle { timeout } else { timeout - Duration::from_millis(50) };
            assert!(took >= floor, "trickle={trickle}: closed after {took:?}");
            assert!(took < timeout + crate::idle::CLOSE_GRACE + Duration::from_secs(3), "{took:?}");
            let _ = task.await;
        }
        // The trickled head was never a request: the only decision is the answered one.
        assert_eq!(h.decide.enforced.lock().unwrap().len(), 1);
    }

    /// At shutdown ([`Proxy::drain`]) an HTTP/1.1 connection answers the request in progress in
    /// full and then closes, an idle keep-alive connection closes at once, not after its header
    /// timeout (a minute here), and the drain returns only once the busy one has ended.
    #[tokio::test]
    async fn draining_answers_the_request_in_progress_then_closes_and_idle_connections_close_at_once() {
        use crate::proxy::testing::agent_pair;
        use std::time::{Duration, Instant};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let h = with_header_timeout(Duration::from_secs(60), outcome(Decision::Block, Reason::DomainNotAllowed, 5));
        *h.decide.delay.lock().unwrap() = Some(Duration::from_millis(400));
        let name = DomainName::parse("db.example.test").expect("name");
        let serve_one = |accepted| {
            tokio::spawn(serve(
                h.proxy.clone(),
                served_conn("198.18.0.9:80", Some(name.clone()), false),
                accepted,
                false,
            ))
        };
        let (mut busy, accepted) = agent_pair().await;
        // The busy connection holds its place in the budget, as the accept loop's do.
        let info = admitted_conn(&h, &busy, &name);
        let busy_task = tokio::spawn(serve(h.proxy.clone(), info, accepted, false));
        let (mut idle, accepted) = agent_pair().await;
        let idle_task = serve_one(accepted);
        busy.write_all(b"GET / HTTP/1.1\r\nHost: db.example.test\r\n\r\n").await.expect("send");
        let deadline = Instant::now() + Duration::from_secs(5);
        while h.decide.enforced.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the request never reached the decision");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The decision is in progress (it takes 400 ms): the daemon starts stopping.
        let started = Instant::now();
        let drain = tokio::spawn({
            let proxy = h.proxy.clone();
            async move { proxy.drain().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!drain.is_finished(), "the drain returned with a request in progress");
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut buf))
            .await
            .expect("the idle connection is closed")
            .ok();
        assert!(buf.is_empty(), "{buf:?}");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), busy.read_to_end(&mut answer))
            .await
            .expect("the busy connection is closed after its answer")
            .expect("read");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 403"), "{text}");
        let (head, body) = text.split_once("\r\n\r\n").expect("a whole head");
        let length: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap()))
            .expect("content-length");
        assert_eq!(body.len(), length, "the whole body: {text}");
        assert!(body.contains("domain_not_allowed"), "{body}");
        tokio::time::timeout(Duration::from_secs(5), drain).await.expect("the drain returns").expect("drain");
        assert_eq!(h.proxy.open_connections(), 0);
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        let _ = tokio::join!(busy_task, idle_task);
        assert_eq!(h.decide.enforced.lock().unwrap().len(), 1);
    }

    /// CONNECT through the whole request pipeline on a served connection, with no kernel: a
    /// tunnel a `[[raw_tcp]]` rule allows is decided (method `CONNECT`, the rule's action and
    /// cost, its port kept for a hold), answered `200` with the allow header, and spliced to
    /// the daemon's own resolution of the name; a port no rule allows is a `403`
    /// `connect_denied` and nothing is dialed.
    #[tokio::test]
    async fn connect_tunnels_only_where_a_raw_tcp_rule_allows_and_after_the_decision() {
        use crate::proxy::testing::{agent_pair, harness, raw_rule, upstream};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let local = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        let up = upstream().await;
        let port = up.addr.port();
        let other = if port == 5432 { 5433 } else { 5432 };
        let fake = FakeDecide::answering(Ok(outcome(Decision::Allow, Reason::Allowed, 31)));
        fake.enforce.lock().unwrap().push_back(Ok(outcome(Decision::Block, Reason::ConnectDenied, 32)));
        let h = harness(fake, &raw_rule(port), &[("db.example.test", local)]);
        let name = DomainName::parse("db.example.test").expect("name");
        let ask = |p: u16| format!("CONNECT db.example.test:{p} HTTP/1.1\r\nHost: db.example.test:{p}\r\n\r\n");
        let serve = |agent_side| {
            tokio::spawn(serve(
                h.proxy.clone(),
                served_conn("198.18.0.9:80", Some(name.clone()), false),
                agent_side,
                false,
            ))
        };

        // Allowed: 200, then the tunnel carries bytes both ways. This connection holds its place
        // in the budgets as the accept loop's do: the tunnel keeps it once the HTTP connection's
        // task has ended, until the tunnel itself ends.
        let (mut agent, accepted) = agent_pair().await;
        let info = admitted_conn(&h, &agent, &name);
        let task = tokio::spawn(super::serve(h.proxy.clone(), info, accepted, false));
        assert_eq!(h.proxy.open_connections(), 1);
        agent.write_all(ask(port).as_bytes()).await.expect("send");
        let mut head = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), agent.read(&mut head))
            .await
            .expect("answered")
            .expect("read");
        let head = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("sluice-decision: allow; attestation=31"), "{head}");
        agent.write_all(b"TUNNELLED").await.expect("tunnel");
        let mut pong = [0u8; 4];
        tokio::time::timeout(std::time::Duration::from_secs(5), agent.read_exact(&mut pong))
            .await
            .expect("upstream answers")
            .expect("read");
        assert_eq!(&pong, b"PONG");
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the HTTP connection's task ends once upgraded")
            .expect("serve");
        assert_eq!(h.proxy.open_connections(), 1, "the tunnel holds the connection's place");
        drop(agent);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while h.proxy.open_connections() > 0 {
            assert!(std::time::Instant::now() < deadline, "the ended tunnel's place was never given back");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(*up.seen.lock().unwrap(), vec![b"TUNNELLED".to_vec()]);

        // No rule for the port: refused on the record, nothing dialed.
        let (mut agent, accepted) = agent_pair().await;
        let task = serve(accepted);
        agent.write_all(ask(other).as_bytes()).await.expect("send");
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), agent.read(&mut answer))
            .await
            .expect("answered")
            .expect("read");
        let answer = String::from_utf8_lossy(&answer[..n]).to_ascii_lowercase();
        assert!(answer.starts_with("http/1.1 403"), "{answer}");
        assert!(answer.contains("reason=connect_denied"), "{answer}");
        drop(agent);
        let _ = task.await;
        assert_eq!(up.seen.lock().unwrap().len(), 1, "only the allowed tunnel reached the upstream");

        let calls = h.decide.enforced.lock().unwrap();
        assert_eq!(calls.len(), 2, "{calls:?}");
        let (allowed, verdict) = &calls[0];
        assert_eq!(*verdict, decide::HostVerdict::Allow);
        assert_eq!(
            (allowed.action.as_str(), allowed.method.as_deref(), allowed.cost_millicents, allowed.port),
            ("tcp:postgres", Some("CONNECT"), Some(2_000), Some(port))
        );
        assert!(
            matches!(&calls[1].1, decide::HostVerdict::Deny { reason, .. } if *reason == Reason::ConnectDenied),
            "{:?}",
            calls[1]
        );
    }
}
