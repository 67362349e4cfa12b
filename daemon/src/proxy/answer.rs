//! What the per-connection and per-request code share: the connection's identity ([`ConnInfo`])
//! and the proxy's own answers (a recorded refusal, the `403` decision response, the `503` of a
//! failed store). It depends on nothing else in the proxy but [`Proxy`] itself, so [`super::conn`],
//! [`super::http`] and [`super::raw`] all use it without using each other.

use super::checks::Refusal;
use super::upstream::ProxyBody;
use super::Proxy;
use crate::decide::{self, Decision, Reason};
use crate::domain::DomainName;
use crate::service::{EnforceInput, ServiceError};
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::net::SocketAddr;

/// The response header that carries the decision (docs/decisions.md, "What the agent receives"): `block; reason=<reason>;
/// attestation=<log index>` on refusals, `allow; attestation=<log index>` on forwarded
/// responses.
pub const DECISION_HEADER: &str = "sluice-decision";

/// What the proxy knows about a connection once it is accepted and classified.
#[derive(Debug, Clone)]
pub(super) struct ConnInfo {
    pub passport_id: String,
    pub client: SocketAddr,
    /// What the agent dialed (IPv4-mapped addresses made IPv4).
    pub dialed: SocketAddr,
    pub pid: u32,
    pub cgroup_id: u64,
    /// The name behind a synthetic destination, if the agent dialed one.
    pub dialed_name: Option<DomainName>,
    /// The TLS server name, for TLS connections.
    pub sni: Option<DomainName>,
    pub tls: bool,
    /// The connection's places in the budgets (`None` in tests that serve a connection
    /// directly): a tunnel that outlives the connection's task keeps a copy.
    pub slot: Option<super::Slot>,
}

impl ConnInfo {
    /// The name the connection itself is for (SNI, else the dialed name), for records of
    /// refusals that happen before a request names a host.
    pub fn conn_name(&self) -> Option<&DomainName> {
        self.sni.as_ref().or(self.dialed_name.as_ref())
    }
}

/// Records a proxy refusal as a decision: a host-policy denial carrying the refusal's reason, so
/// it is attested on the passport's chain like any other block.
pub(super) async fn record_refusal(
    proxy: &Proxy,
    info: &ConnInfo,
    target: Option<&DomainName>,
    action: &str,
    method: Option<&str>,
    path: Option<&str>,
    refusal: &Refusal,
) -> Result<crate::service::DecisionOutcome, ServiceError> {
    let input = EnforceInput {
        passport_id: info.passport_id.clone(),
        action: action.to_string(),
        cost_cents: None,
        cost_millicents: None,
        target: target.map(ToString::to_string),
        method: method.map(str::to_string),
        path: path.map(str::to_string),
        port: None,
        signed_request_hash: None,
        gate_price: None,
    };
    let verdict = decide::HostVerdict::Deny { reason: refusal.reason.clone(), detail: refusal.detail.clone() };
    let outcome = proxy.service.enforce(input, verdict).await?;
    if outcome.decision != Decision::Block {
        // A host denial always blocks; anything else is a bug we must not forward through.
        tracing::error!(decision = outcome.decision.as_str(), "a proxy refusal was not a block");
    }
    Ok(outcome)
}

/// `403` with the decision JSON (its bytes: [`DecisionOutcome::to_json_bytes`], or a value's
/// text) and the `Sluice-Decision` header.
///
/// [`DecisionOutcome::to_json_bytes`]: crate::service::DecisionOutcome::to_json_bytes
pub(super) fn decision_response(json: Vec<u8>, reason: &Reason, attestation_id: u64) -> Response<ProxyBody> {
    let mut resp = simple_bytes(StatusCode::FORBIDDEN, json);
    let value = format!("block; reason={}; attestation={attestation_id}", token(reason.as_str()));
    if let Ok(v) = HeaderValue::from_str(&value) {
        resp.headers_mut().insert(HeaderName::from_static(DECISION_HEADER), v);
    }
    resp
}

/// Reasons are `a-z 0-9 _` by construction; anything else is replaced so the header stays one
/// well-formed token.
fn token(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).take(64).collect()
}

/// The store failed: nothing was decided, nothing is forwarded.
pub(super) fn service_failure(e: &ServiceError) -> Response<ProxyBody> {
    tracing::error!(error = %e, "decision failed; refusing the request");
    let status = if e.is_unavailable() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::FORBIDDEN };
    simple(status, json!({"decision": "block", "reason": Reason::DecisionFailed, "detail": e.to_string()}))
}

pub(super) fn simple(status: StatusCode, body: Value) -> Response<ProxyBody> {
    simple_bytes(status, body.to_string().into_bytes())
}

/// [`simple`] with the JSON already serialised.
fn simple_bytes(status: StatusCode, mut json: Vec<u8>) -> Response<ProxyBody> {
    json.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(json)).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
