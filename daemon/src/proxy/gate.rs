//! Linked attestations: requests to a gate (`[gates] hosts`), signed by the daemon with the
//! agent's key so that the gate can verify who sent them and both sides can record the same
//! request hash.
//!
//! For a request from a sandbox whose agent key the daemon holds (`sluice run --key`) to a gate
//! host, after routing and pricing and before the decision:
//!
//! 1. the body is read whole, at most `[gates] max_body_bytes` (a larger one, declared or
//!    streamed, is refused as `gate_body_too_large`: the digest must be in the headers, before the
//!    body, and an unbounded buffer is not an option);
//! 2. the agent's own `Sluice-Passport`, `Sluice-Agent-Key`, `Content-Digest`, `Signature-Input`
//!    and `Signature` headers are removed and the daemon's put in their place: the passport's
//!    compact JWT, the agent's public key, the body's SHA-256, and an RFC 9421 signature (sluice's profile, `sluice-httpsig`) over
//!    `@method`, `@target-uri` and `content-digest`, `keyid` = the passport's `cnf.jkt`;
//! 3. the request hash goes into the decision record (`signed_request_hash`).
//!
//! A sandbox without a key, or a request to any other host, is untouched (said at debug for a
//! gate host). Trailers of a signed request are dropped: the signature cannot cover them.

use super::upstream::{BoxError, ProxyBody};
use crate::domain::DomainName;
use crate::service::AgentKey;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH};
use http::Method;
use http_body_util::BodyExt;
use sluice_httpsig as httpsig;
use std::collections::HashSet;
use std::sync::Arc;

/// The agent key of a sandbox, by cgroup id (the daemon passes `Service::agent_key_for_cgroup`).
pub type AgentKeyLookup = Arc<dyn Fn(u64) -> Option<Arc<AgentKey>> + Send + Sync>;

/// The header that carries the passport to a gate.
pub const PASSPORT_HEADER: &str = "sluice-passport";
/// The header that carries the agent's public key (base64url of the raw Ed25519 key): a passport
/// names the key only by its thumbprint (`cnf.jkt`), from which a gate cannot recover it. The gate
/// checks the key's thumbprint against `cnf.jkt` and the signature against the key.
pub const AGENT_KEY_HEADER: &str = "sluice-agent-key";
/// The headers the daemon sets on a signed request (the agent's own are removed first).
pub const SIGNED_HEADERS: [&str; 5] =
    [PASSPORT_HEADER, AGENT_KEY_HEADER, "content-digest", "signature-input", "signature"];

/// What the proxy knows about gates.
pub struct Gates {
    hosts: HashSet<DomainName>,
    max_body_bytes: u64,
    keys: AgentKeyLookup,
    /// The gates' verified catalogs, which map and price their requests (`None`: not priced).
    catalogs: Option<Arc<crate::discover::GateCatalogs>>,
}

impl Gates {
    pub fn new(hosts: impl IntoIterator<Item = DomainName>, max_body_bytes: u64, keys: AgentKeyLookup) -> Gates {
        Gates { hosts: hosts.into_iter().collect(), max_body_bytes, keys, catalogs: None }
    }

    /// Prices requests to gate hosts by their verified catalogs.
    pub fn with_catalogs(mut self, catalogs: Arc<crate::discover::GateCatalogs>) -> Gates {
        self.catalogs = Some(catalogs);
        self
    }

    /// The catalogs that price a request to `host`: `None` when `host` is not a gate.
    pub fn catalogs_for(&self, host: &DomainName) -> Option<&Arc<crate::discover::GateCatalogs>> {
        self.catalogs.as_ref().filter(|_| self.hosts.contains(host))
    }

    /// No gates: nothing is ever signed.
    pub fn none() -> Gates {
        Gates::new([], 1, Arc::new(|_| None))
    }

    pub fn max_body_bytes(&self) -> u64 {
        self.max_body_bytes
    }

    /// The key to sign a request from `cgroup_id` to `host` with: `None` when `host` is not a gate
    /// or the sandbox has no key (then the request goes out as the agent sent it).
    pub fn key_for(&self, cgroup_id: u64, host: &DomainName) -> Option<Arc<AgentKey>> {
        if !self.hosts.contains(host) {
            return None;
        }
        let key = (self.keys)(cgroup_id);
        if key.is_none() {
            tracing::debug!(%host, cgroup_id, "request to a gate forwarded unsigned: its sandbox has no agent key (sluice run --key)");
        }
        key
    }
}

/// Why a body could not be read for signing.
#[derive(Debug)]
pub enum BodyError {
    /// Larger than the bound: declared (`Content-Length`) or seen while reading.
    TooLarge { max: u64, at_least: u64 },
    /// The agent's body failed (cut connection, framing error).
    Read(BoxError),
}

/// Reads a whole body, refusing it as soon as it is known to exceed `max` bytes (before reading
/// anything when `declared` already does). Trailers are dropped.
pub async fn read_bounded(mut body: ProxyBody, declared: Option<u64>, max: u64) -> Result<Bytes, BodyError> {
    if let Some(n) = declared.filter(|n| *n > max) {
        return Err(BodyError::TooLarge { max, at_least: n });
    }
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Read)?;
        if let Ok(data) = frame.into_data() {
            let len = (buf.len() as u64).saturating_add(data.len() as u64);
            if len > max {
                return Err(BodyError::TooLarge { max, at_least: len });
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// Signs a request: removes the agent's copies of [`SIGNED_HEADERS`] and sets the daemon's, for a
/// request `method` to `target_uri` with `body`; returns the request hash.
pub fn sign_headers(
    headers: &mut HeaderMap,
    key: &AgentKey,
    method: &Method,
    target_uri: &str,
    body: &[u8],
    created: u64,
    nonce: &str,
) -> Result<String, SignError> {
    let digest = httpsig::ContentDigest::of(body);
    let target = httpsig::Target { method: method.as_str(), target_uri };
    let params = httpsig::SignParams { created, nonce, keyid: key.keyid() };
    let signed = httpsig::sign(key.signing_key(), target, &digest, params).map_err(SignError::Sign)?;
    let value = |v: &str| HeaderValue::from_str(v).map_err(|_| SignError::Header);
    let values = [
        value(key.token())?,
        value(&URL_SAFE_NO_PAD.encode(key.signing_key().verifying_key().as_bytes()))?,
        value(&signed.content_digest)?,
        value(&signed.signature_input)?,
        value(&signed.signature)?,
    ];
    for (name, v) in SIGNED_HEADERS.iter().zip(values) {
        let name = HeaderName::from_static(name);
        headers.remove(&name);
        headers.insert(name, v);
    }
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len() as u64));
    Ok(signed.request_hash)
}

/// A fresh nonce: 128 random bits, base64url (22 characters).
pub fn nonce() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())
}

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("{0}")]
    Sign(httpsig::Error),
    #[error("a signature header value is not a valid HTTP header value")]
    Header,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passport::Passport;
    use ed25519_dalek::SigningKey;
    use http_body_util::Full;

    /// An agent key, and its signing key, for a freshly issued passport.
    pub(crate) fn agent_key() -> (AgentKey, SigningKey) {
        let issued = crate::service::issue_for_test("gate-test");
        let passport = Passport { claims: issued.claims, token: issued.token };
        let text = URL_SAFE_NO_PAD.encode(issued.agent_key.to_bytes());
        (AgentKey::from_api(&text, &passport).unwrap(), issued.agent_key)
    }

    fn body(b: &'static [u8]) -> ProxyBody {
        Full::new(Bytes::from_static(b)).map_err(|e| match e {}).boxed()
    }

    #[test]
    fn the_daemon_s_headers_replace_the_agent_s_and_verify() {
        let (key, sk) = agent_key();
        let mut h = HeaderMap::new();
        h.insert("signature", HeaderValue::from_static("sluice=:forged:"));
        h.append("signature", HeaderValue::from_static("other=:x:"));
        h.insert("signature-input", HeaderValue::from_static("sluice=()"));
        h.insert("content-digest", HeaderValue::from_static("sha-256=:AAAA:"));
        h.insert(PASSPORT_HEADER, HeaderValue::from_static("someone.else's.token"));
        h.insert(AGENT_KEY_HEADER, HeaderValue::from_static("someone-else-s-key"));
        h.insert("x-agent", HeaderValue::from_static("kept"));
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("999"));
        let uri = "https://gate.example/v1/orders?id=7";
        let hash = sign_headers(&mut h, &key, &Method::POST, uri, b"{\"qty\":1}", 1_800_000_000, &nonce()).unwrap();
        for name in SIGNED_HEADERS {
            assert_eq!(h.get_all(name).iter().count(), 1, "{name}");
        }
        assert_eq!(h.get(PASSPORT_HEADER).unwrap(), key.token());
        assert_eq!(
            h.get(AGENT_KEY_HEADER).unwrap().to_str().unwrap(),
            URL_SAFE_NO_PAD.encode(sk.verifying_key().as_bytes())
        );
        assert_eq!(h.get("x-agent").unwrap(), "kept");
        assert_eq!(h.get(CONTENT_LENGTH).unwrap(), "9");
        let s = |n: &str| h.get(n).unwrap().to_str().unwrap().to_string();
        let received = httpsig::Received {
            content_digest: &s("content-digest"),
            signature_input: &s("signature-input"),
            signature: &s("signature"),
        };
        let target = httpsig::Target { method: "POST", target_uri: uri };
        let body_digest = httpsig::ContentDigest::of(b"{\"qty\":1}");
        let v = httpsig::verify(&sk.verifying_key(), target, received, &body_digest).unwrap();
        assert_eq!(v.request_hash, hash);
        assert_eq!(v.keyid, key.keyid());
        assert_eq!(v.created, 1_800_000_000);
        // Another body, another method: refused.
        assert!(httpsig::verify(&sk.verifying_key(), target, received, &httpsig::ContentDigest::of(b"{}")).is_err());
        let get = httpsig::Target { method: "GET", target_uri: uri };
        assert!(httpsig::verify(&sk.verifying_key(), get, received, &body_digest).is_err());
    }

    #[test]
    fn nonces_are_fresh_and_in_the_profile_s_alphabet() {
        let (a, b) = (nonce(), nonce());
        assert_ne!(a, b);
        assert_eq!(a.len(), 22);
        let (key, _) = agent_key();
        let mut h = HeaderMap::new();
        sign_headers(&mut h, &key, &Method::GET, "https://gate.example/", b"", 1, &a).unwrap();
    }

    #[test]
    fn only_gate_hosts_from_sandboxes_with_a_key_are_signed() {
        let (key, _) = agent_key();
        let key = Arc::new(key);
        let k = key.clone();
        let gates = Gates::new(
            [DomainName::parse("gate.example").unwrap()],
            16,
            Arc::new(move |cgroup| (cgroup == 7).then(|| k.clone())),
        );
        assert!(gates.key_for(7, &DomainName::parse("gate.example").unwrap()).is_some());
        assert!(gates.key_for(8, &DomainName::parse("gate.example").unwrap()).is_none(), "no key: unsigned");
        assert!(gates.key_for(7, &DomainName::parse("other.example").unwrap()).is_none(), "not a gate");
        assert!(Gates::none().key_for(7, &DomainName::parse("gate.example").unwrap()).is_none());
    }

    #[tokio::test]
    async fn bodies_are_read_within_the_bound_only() {
        assert_eq!(read_bounded(body(b"12345"), Some(5), 5).await.unwrap(), "12345");
        assert_eq!(read_bounded(body(b""), None, 5).await.unwrap(), "");
        // Declared too large: refused before reading.
        assert!(matches!(read_bounded(body(b"1"), Some(6), 5).await, Err(BodyError::TooLarge { max: 5, at_least: 6 })));
        // Declared nothing (chunked), streamed too much.
        assert!(matches!(
            read_bounded(body(b"123456"), None, 5).await,
            Err(BodyError::TooLarge { max: 5, at_least: 6 })
        ));
        // Declared small, sent more (HTTP/2 does not enforce content-length for us).
        assert!(matches!(read_bounded(body(b"123456"), Some(1), 5).await, Err(BodyError::TooLarge { .. })));
    }
}
