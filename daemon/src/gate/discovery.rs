//! The gate's public, anonymous documents (docs/catalogs.md, "What a gate serves"):
//! `GET /.well-known/sluice`, `GET /v1/catalog`, `GET /v1/catalog/versions`,
//! `GET /v1/catalog/{version}`, `GET /v1/catalog/{version}/proof` and
//! `GET /v1/log/consistency?from=N&to=M`. Served by the gate itself, never forwarded, never
//! recorded (they reveal nothing a passport protects).
//!
//! Only versions in force are served: a version published with a later `effective_at` appears
//! the second that time comes (the version in force is computed at each request).

use super::catalog::Published;
use super::upstream::GateBody;
use super::Gate;
use crate::ledger::Ledger;
use crate::passport::b64;
use bytes::Bytes;
use http::{header, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::sync::Arc;

pub const WELL_KNOWN: &str = "/.well-known/sluice";
pub const CATALOG: &str = "/v1/catalog";
pub const CONSISTENCY: &str = "/v1/log/consistency";

/// Whether `path` is one of the gate's public documents (any method: they are never forwarded).
pub fn is_public(path: &str) -> bool {
    path == WELL_KNOWN || path == CATALOG || path.starts_with("/v1/catalog/") || path == CONSISTENCY
}

/// Answers a request for one of the public documents.
pub async fn answer(
    gate: &Gate,
    ledger: &Ledger,
    method: &Method,
    path: &str,
    query: Option<&str>,
    authority: Option<&str>,
    scheme: &str,
) -> http::Response<GateBody> {
    if method != Method::GET && method != Method::HEAD {
        let mut r = error(StatusCode::METHOD_NOT_ALLOWED, &format!("{path} is the gate's own document: GET only"));
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if path == CONSISTENCY {
        return consistency(ledger, query);
    }
    let now = chrono::Utc::now();
    let current = gate.catalogs.in_force(now);
    if path == WELL_KNOWN {
        return well_known(gate, ledger, current.as_deref(), authority, scheme).await;
    }
    let Some(current) = current else {
        return error(StatusCode::NOT_FOUND, &format!("gate {:?} has published no catalog in force", gate.config.name));
    };
    let rest = path.strip_prefix(CATALOG).unwrap_or("");
    match rest {
        "" | "/" => served(&current),
        "/versions" => {
            let all: Vec<Value> = gate.catalogs.served(now).iter().map(|p| p.signed.to_json()).collect();
            json_response(StatusCode::OK, &Value::Array(all))
        }
        _ => {
            let rest = rest.trim_start_matches('/');
            let (v, proof) = match rest.strip_suffix("/proof") {
                Some(v) => (v, true),
                None => (rest, false),
            };
            let version = match v.parse::<u64>() {
                Ok(n) if n >= 1 && !v.starts_with('0') => n,
                _ => {
                    return error(
                        StatusCode::NOT_FOUND,
                        "no such document: /v1/catalog, /v1/catalog/versions, /v1/catalog/N or /v1/catalog/N/proof",
                    )
                }
            };
            let Some(p) = gate.catalogs.get(version).filter(|_| version <= current.version()) else {
                return error(
                    StatusCode::NOT_FOUND,
                    &format!("catalog version {version} is not published (version {} is in force)", current.version()),
                );
            };
            if proof {
                proof_of(ledger, &p).await
            } else {
                served(&p)
            }
        }
    }
}

fn served(p: &Arc<Published>) -> http::Response<GateBody> {
    let mut r = json_response(StatusCode::OK, &p.signed.to_json());
    if let Ok(v) = HeaderValue::from_str(&format!("{CATALOG}/{}/proof", p.version())) {
        r.headers_mut().insert("sluice-catalog-proof", v);
    }
    r
}

/// The `catalog_published` record of a version with its inclusion proof and a signed checkpoint
/// (`sluice-attestation/v1`, what `sluice audit proof` writes; `sluice audit verify` checks it).
async fn proof_of(ledger: &Ledger, p: &Published) -> http::Response<GateBody> {
    match crate::ledger::export::proof(ledger, p.record_index).await {
        Ok(att) => match serde_json::to_value(&att) {
            Ok(v) => json_response(StatusCode::OK, &v),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        },
        Err(e) => {
            tracing::error!(error = %e, version = p.version(), "gate: the proof of a catalog version failed");
            error(StatusCode::SERVICE_UNAVAILABLE, "the gate's store failed")
        }
    }
}

/// `?from=N&to=M` (each once, nothing else): the RFC 9162 consistency proof that the log's
/// first `to` records extend its first `from` records (0 ≤ from ≤ to ≤ the log's size), so an
/// agent holding a checkpoint of size N can check that a later one of size M extends it.
pub fn parse_range(query: Option<&str>) -> Result<(u64, u64), String> {
    const USAGE: &str = "ask for /v1/log/consistency?from=N&to=M (two tree sizes, from <= to)";
    let (mut from, mut to) = (None, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| format!("{pair:?} is not name=value: {USAGE}"))?;
        let n = match v.parse::<u64>() {
            Ok(n) if v.len() <= 20 && (v == "0" || !v.starts_with('0')) => n,
            _ => return Err(format!("{k}={v:?} is not a tree size: {USAGE}")),
        };
        let slot = match k {
            "from" => &mut from,
            "to" => &mut to,
            _ => return Err(format!("{k:?} is not a parameter: {USAGE}")),
        };
        if slot.replace(n).is_some() {
            return Err(format!("{k} is given twice: {USAGE}"));
        }
    }
    match (from, to) {
        (Some(f), Some(t)) if f <= t => Ok((f, t)),
        (Some(f), Some(t)) => Err(format!("from={f} is larger than to={t}: {USAGE}")),
        _ => Err(format!("from and to are both required: {USAGE}")),
    }
}

fn consistency(ledger: &Ledger, query: Option<&str>) -> http::Response<GateBody> {
    let (from, to) = match parse_range(query) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let size = ledger.size();
    if to > size {
        return error(StatusCode::NOT_FOUND, &format!("to={to} is beyond the log's size ({size} records)"));
    }
    match ledger.consistency_proof(from, to) {
        Ok(proof) => json_response(
            StatusCode::OK,
            &json!({
                "origin": ledger.origin(),
                "from": from,
                "to": to,
                "proof": proof.iter().map(|h| crate::ledger::hex::encode(h)).collect::<Vec<_>>(),
            }),
        ),
        Err(e) => {
            tracing::error!(error = %e, from, to, "gate: a consistency proof failed");
            error(StatusCode::SERVICE_UNAVAILABLE, "the gate's store failed")
        }
    }
}

async fn well_known(
    gate: &Gate,
    ledger: &Ledger,
    current: Option<&Published>,
    authority: Option<&str>,
    scheme: &str,
) -> http::Response<GateBody> {
    let checkpoint = match ledger.latest_checkpoint() {
        Ok(Some(cp)) => Some(cp.note),
        _ => ledger.checkpoint_now().await.ok().map(|cp| cp.note),
    };
    let catalog_url = catalog_url(authority, scheme);
    let doc = json!({
        "gate_id": gate.gate_id,
        "name": gate.config.name,
        "public_key": b64::encode(gate.public_key().as_bytes()),
        "trust_level": gate.config.trust_level.as_str(),
        "catalog_version": current.map(Published::version),
        "catalog_content_hash": current.map(|p| p.signed.content_hash.clone()),
        "catalog_url": catalog_url,
        "log_origin": ledger.origin(),
        "checkpoint": checkpoint,
    });
    json_response(StatusCode::OK, &doc)
}

/// `scheme://authority/v1/catalog` from the request's own authority (checked to be one), else
/// the path alone.
pub fn catalog_url(authority: Option<&str>, scheme: &str) -> String {
    match authority.and_then(|a| a.parse::<http::uri::Authority>().ok()) {
        Some(a) if a.as_str().len() <= 255 && !a.as_str().contains('@') => {
            format!("{scheme}://{}{CATALOG}", a.as_str().to_ascii_lowercase())
        }
        _ => CATALOG.to_string(),
    }
}

fn json_response(status: StatusCode, doc: &Value) -> http::Response<GateBody> {
    let body = serde_json::to_vec(doc).unwrap_or_default();
    let mut resp = http::Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, detail: &str) -> http::Response<GateBody> {
    json_response(status, &json!({"error": status.canonical_reason().unwrap_or("error"), "detail": detail}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistency_ranges_are_read_strictly() {
        assert_eq!(parse_range(Some("from=3&to=9")), Ok((3, 9)));
        assert_eq!(parse_range(Some("to=9&from=0")), Ok((0, 9)));
        assert_eq!(parse_range(Some("from=4&to=4")), Ok((4, 4)));
        for bad in [
            None,
            Some(""),
            Some("from=3"),
            Some("from=9&to=3"),
            Some("from=1&to=2&to=3"),
            Some("from=01&to=2"),
            Some("from=-1&to=2"),
            Some("from=1&to=2&x=3"),
            Some("from&to=2"),
            Some("from=1&to=99999999999999999999999"),
        ] {
            let e = parse_range(bad).unwrap_err();
            assert!(e.contains("/v1/log/consistency?from=N&to=M"), "{bad:?}: {e}");
        }
    }
}
