//! The console's requests, in the order each is checked: the `Host` header (DNS rebinding), then
//! the session cookie, then for a state change the `Origin` and the CSRF token, then a bounded
//! body. Handlers call the same [`crate::service::Service`] methods as the local API, and service
//! errors get the API's status codes and messages (`api::server::ApiError`).
//!
//! | request | needs | does |
//! |---|---|---|
//! | `GET /` | session (else `303 /login`) | the console page |
//! | `GET /login`, `POST /login` | (`Origin` to post) | the login form; the token opens a session |
//! | `GET /assets/*` | | style sheet and script |
//! | `GET /api/session` | session | `{csrf, expires_at, user}` |
//! | `GET /api/overview` | session | the page's data (see `sse::overview`) |
//! | `GET /api/events` | session | server-sent `overview` events |
//! | `POST /api/holds/{id}/approve`, `…/deny` | session, `Origin`, CSRF | resolves a hold as the console user |
//! | `POST /api/verify` | session, `Origin`, CSRF | verifies the stored log |
//! | `POST /logout` | session, `Origin`, CSRF | ends the session |
//!
//! A new state-changing action is one more arm in [`route`] behind [`Ctx::change`], and one
//! button calling `post()` in `console.js`.

use super::auth::{csrf_matches, Session};
use super::{assets, sse, Body, Ctx};
use crate::api::server::ApiError;
use crate::api::server::StopBody;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;

/// The login form: `token=…`.
const MAX_LOGIN_BODY: usize = 1024;
/// A hold resolution's JSON (`{note}`, the note at most 1 KiB).
const MAX_ACTION_BODY: usize = 4096;
/// Hold ids are `hold_` + 24 hex digits; anything much longer is not one.
const MAX_ID: usize = 128;

pub(super) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

fn with_type(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    with_type(status, "application/json", v.to_string())
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    json_response(status, &json!({"error": code, "message": message.into()}))
}

fn api_error(e: ApiError) -> Response<Body> {
    error(e.status, e.code, e.message)
}

fn redirect(to: &'static str) -> Response<Body> {
    let mut r = Response::new(full(""));
    *r.status_mut() = StatusCode::SEE_OTHER;
    r.headers_mut().insert(header::LOCATION, HeaderValue::from_static(to));
    r
}

fn set_cookie(r: &mut Response<Body>, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// Headers every answer carries: the content policy, no framing, no sniffing, no caching, and
/// a referrer only to the console itself (`same-origin`: with `no-referrer`, browsers send
/// `Origin: null` on a form post, which the login's origin check must refuse).
fn harden(r: &mut Response<Body>) {
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(assets::CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    h.insert("cross-origin-resource-policy", HeaderValue::from_static("same-origin"));
}

fn header_str(req: &Request<Incoming>, name: header::HeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Reads a body of at most `max` bytes.
async fn body(req: Request<Incoming>, max: usize) -> Result<Bytes, Response<Body>> {
    Limited::new(req.into_body(), max).collect().await.map(|c| c.to_bytes()).map_err(|_| {
        error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("the request body is larger than {max} bytes"))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoteBody {
    #[serde(default)]
    note: Option<String>,
}

/// A strict JSON body of at most [`MAX_ACTION_BODY`] bytes (duplicate members refused); an empty
/// body is `T::default()`-like only where the caller allows it.
async fn strict_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Response<Body>> {
    let bytes = body(req, MAX_ACTION_BODY).await?;
    if let Err(e) = crate::passport::json::parse_object(&bytes) {
        return Err(error(StatusCode::BAD_REQUEST, "bad_request", format!("request body: {e}")));
    }
    serde_json::from_slice::<T>(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "bad_request", format!("request body: {e}")))
}

/// Answers one request (never fails: every refusal is a response).
pub async fn handle(req: Request<Incoming>, ctx: Arc<Ctx>) -> Response<Body> {
    let mut r = route(req, &ctx).await;
    harden(&mut r);
    r
}

async fn route(req: Request<Incoming>, ctx: &Arc<Ctx>) -> Response<Body> {
    if !ctx.origins.host_ok(header_str(&req, header::HOST)) {
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            "host_not_allowed",
            format!(
                "Host {:?} is not this console's address: open http://{}/ (names other than these are refused against DNS rebinding)",
                header_str(&req, header::HOST).unwrap_or(""),
                ctx.origins.hosts().join("/ or http://")
            ),
        );
    }
    let session = ctx.sessions.find(header_str(&req, header::COOKIE));
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, [""]) => match session {
            Some(_) => with_type(StatusCode::OK, "text/html; charset=utf-8", assets::INDEX_HTML),
            None => redirect("/login"),
        },
        (&Method::GET, ["login"]) => match session {
            Some(_) => redirect("/"),
            None => with_type(StatusCode::OK, "text/html; charset=utf-8", assets::login_page(None)),
        },
        (&Method::POST, ["login"]) => login(req, ctx).await,
        (&Method::GET, ["assets", _]) => match assets::asset(&path) {
            Some((content_type, text)) => with_type(StatusCode::OK, content_type, text),
            None => error(StatusCode::NOT_FOUND, "not_found", format!("no such asset: {path}")),
        },
        (_, ["api", ..]) | (_, ["logout"]) => {
            let Some(session) = session else {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "login_required",
                    "log in first: the session is missing or expired",
                );
            };
            api(req, ctx, session, &method, &segments).await
        }
        _ => error(StatusCode::NOT_FOUND, "not_found", format!("no such page: {method} {path}")),
    }
}

async fn login(req: Request<Incoming>, ctx: &Arc<Ctx>) -> Response<Body> {
    let page = |status, message| with_type(status, "text/html; charset=utf-8", assets::login_page(Some(message)));
    if !ctx.origins.origin_ok(header_str(&req, header::ORIGIN)) {
        return page(StatusCode::FORBIDDEN, "This form may only be posted from the console's own page.");
    }
    let now = Instant::now();
    if let Err(wait) = ctx.limiter.check(now) {
        let mut r = page(StatusCode::TOO_MANY_REQUESTS, "Too many wrong tokens: logins are paused for a minute.");
        if let Ok(v) = HeaderValue::from_str(&wait.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    let bytes = match body(req, MAX_LOGIN_BODY).await {
        Ok(b) => b,
        Err(_) => return page(StatusCode::PAYLOAD_TOO_LARGE, "The form is larger than a token."),
    };
    let token = form_urlencoded::parse(&bytes).find(|(k, _)| k == "token").map(|(_, v)| v.into_owned());
    match token {
        Some(t) if ctx.token.matches(&t) => {
            let session = ctx.sessions.open();
            tracing::info!("console: login");
            let mut r = redirect("/");
            set_cookie(&mut r, &ctx.sessions.cookie(&session));
            r
        }
        _ => {
            ctx.limiter.failed(now);
            tracing::warn!("console: login with a wrong token");
            page(
                StatusCode::UNAUTHORIZED,
                "Wrong token. It is in console.token in the daemon's state directory (readable by root only).",
            )
        }
    }
}

async fn api(
    req: Request<Incoming>,
    ctx: &Arc<Ctx>,
    session: Session,
    method: &Method,
    segments: &[&str],
) -> Response<Body> {
    match (method, segments) {
        (&Method::GET, ["api", "session"]) => json_response(
            StatusCode::OK,
            &json!({"csrf": session.csrf, "expires_at": session.expires_at_unix, "user": super::CONSOLE_USER}),
        ),
        (&Method::GET, ["api", "overview"]) => {
            let c = ctx.clone();
            match tokio::task::spawn_blocking(move || sse::overview(&c)).await {
                Ok(v) => json_response(StatusCode::OK, &v),
                Err(e) => {
                    error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("reading the overview failed: {e}"))
                }
            }
        }
        (&Method::GET, ["api", "events"]) => match sse::stream(ctx, session.id.clone()) {
            Some(body) => {
                let mut r = Response::new(body);
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                r
            }
            None => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_streams",
                format!("{} live views are open already; close one (another tab) and reload", sse::MAX_STREAMS),
            ),
        },
        (&Method::POST, ["api", "holds", id, action @ ("approve" | "deny")]) => {
            if let Err(r) = ctx.change(&req, &session) {
                return *r;
            }
            if id.is_empty() || id.len() > MAX_ID {
                return error(StatusCode::BAD_REQUEST, "invalid", format!("hold id must be 1 to {MAX_ID} characters"));
            }
            let (id, approve) = (id.to_string(), *action == "approve");
            let bytes = match body(req, MAX_ACTION_BODY).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let note = if bytes.is_empty() {
                None
            } else {
                if let Err(e) = crate::passport::json::parse_object(&bytes) {
                    return error(StatusCode::BAD_REQUEST, "bad_request", format!("request body: {e}"));
                }
                match serde_json::from_slice::<NoteBody>(&bytes) {
                    Ok(b) => b.note.filter(|n| !n.trim().is_empty()),
                    Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", format!("request body: {e}")),
                }
            };
            match ctx.service.resolve_hold(&id, approve, &ctx.peer, note).await {
                Ok(outcome) => {
                    tracing::info!(hold_id = %id, approve, "console: hold resolved");
                    ctx.changed.notify_waiters();
                    json_response(StatusCode::OK, &outcome.to_json())
                }
                Err(e) => api_error(ApiError::from(e)),
            }
        }
        (&Method::POST, ["api", verb @ ("stop" | "resume")]) => {
            if let Err(r) = ctx.change(&req, &session) {
                return *r;
            }
            let stop = *verb == "stop";
            let b: StopBody = match strict_json(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let scope = match crate::service::StopScope::parse(b.passport_id.as_deref(), b.all) {
                Ok(s) => s,
                Err(e) => return api_error(ApiError::from(e)),
            };
            let note = b.note.filter(|n| !n.trim().is_empty());
            let answer = if stop {
                ctx.service.stop(scope, &ctx.peer, note).await.map(|d| d.to_json())
            } else {
                ctx.service.resume(scope, &ctx.peer, note).await.map(|d| d.to_json())
            };
            match answer {
                Ok(v) => {
                    tracing::warn!(
                        verb,
                        passport_id = b.passport_id.as_deref().unwrap_or("all"),
                        "console: emergency {verb}"
                    );
                    ctx.changed.notify_waiters();
                    json_response(StatusCode::OK, &v)
                }
                Err(e) => api_error(ApiError::from(e)),
            }
        }
        (&Method::POST, ["api", "verify"]) => {
            if let Err(r) = ctx.change(&req, &session) {
                return *r;
            }
            let Ok(_running) = ctx.verifying.try_lock() else {
                return error(
                    StatusCode::CONFLICT,
                    "conflict",
                    "a verification is running; its result will show when done",
                );
            };
            match ctx.service.verify_log(&ctx.state_dir).await {
                Ok(v) => {
                    if !v.ok {
                        tracing::error!(problems = v.problems_total, "console: the stored log does not verify");
                    }
                    let body = v.to_json();
                    ctx.set_verification(v);
                    ctx.changed.notify_waiters();
                    json_response(StatusCode::OK, &body)
                }
                Err(e) => api_error(ApiError::from(e)),
            }
        }
        (&Method::POST, ["logout"]) => {
            if let Err(r) = ctx.change(&req, &session) {
                return *r;
            }
            ctx.sessions.close(&session.id);
            let mut r = json_response(StatusCode::OK, &json!({"logged_out": true}));
            set_cookie(&mut r, &super::auth::Sessions::cookie_cleared());
            r
        }
        _ => error(StatusCode::NOT_FOUND, "not_found", format!("no such endpoint: {method} /{}", segments.join("/"))),
    }
}

impl Ctx {
    /// The checks of a state-changing request: its `Origin` is the console's own, and it
    /// carries the session's CSRF token in `X-CSRF-Token`.
    fn change(&self, req: &Request<Incoming>, session: &Session) -> Result<(), Box<Response<Body>>> {
        if !self.origins.origin_ok(header_str(req, header::ORIGIN)) {
            return Err(Box::new(error(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                format!(
                    "Origin {:?} is not the console's own: state changes come only from its page",
                    header_str(req, header::ORIGIN).unwrap_or("")
                ),
            )));
        }
        let sent = req.headers().get("x-csrf-token").and_then(|v| v.to_str().ok());
        if !csrf_matches(session, sent) {
            return Err(Box::new(error(
                StatusCode::FORBIDDEN,
                "csrf_token_invalid",
                "the X-CSRF-Token header is missing or not this session's: reload the page",
            )));
        }
        Ok(())
    }
}
