//! The gate's one door to HTTP message signatures (RFC 9421, sluice's profile) and
//! `Content-Digest` (RFC 9530), both implemented once in `sluice-httpsig` (shared with the egress
//! daemon's signer). This module only adapts it to what the gate read from a request.

use ed25519_dalek::{SigningKey, VerifyingKey};
pub use sluice_httpsig::ContentDigest;
use sluice_httpsig::{Parsed, SignParams, Target};

/// The parts of a request a signature covers, as the gate received them.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    pub method: &'a str,
    /// `scheme://authority/path?query` as the client addressed it.
    pub target_uri: &'a str,
    pub content_digest: &'a str,
    pub signature_input: &'a str,
    pub signature: &'a str,
}

/// A signature that verified: what the caller checks next (time window, replay, key binding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub created: i64,
    pub nonce: String,
    /// The `keyid` parameter: the passport's `cnf.jkt` for a sluice signature.
    pub keyid: String,
    /// Lowercase hex SHA-256 of the signature base.
    pub request_hash: String,
}

/// Why a signature was refused. `DigestMismatch` is the body's fault, the rest the headers'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SigError {
    DigestMismatch,
    Invalid(String),
}

impl std::fmt::Display for SigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SigError::DigestMismatch => f.write_str("the body does not match its Content-Digest"),
            SigError::Invalid(e) => f.write_str(e),
        }
    }
}

/// Verifies the request's `Signature-Input`/`Signature` with the agent's key. `body` is the
/// digest of the body the gate received; `None` (at `/check` without the body) checks the
/// signature over the received `Content-Digest` only, and the service must check the body.
pub fn verify(req: &SignedRequest<'_>, key: &VerifyingKey, body: Option<&ContentDigest>) -> Result<Verified, SigError> {
    let invalid = |e: sluice_httpsig::Error| match e {
        sluice_httpsig::Error::DigestMismatch => SigError::DigestMismatch,
        other => SigError::Invalid(other.to_string()),
    };
    let parsed = Parsed::parse(req.signature_input, req.signature).map_err(invalid)?;
    let claimed;
    let body = match body {
        Some(b) => b,
        None => {
            claimed = ContentDigest::parse(req.content_digest).map_err(invalid)?;
            &claimed
        }
    };
    let target = Target { method: req.method, target_uri: req.target_uri };
    let v = parsed.verify(key, target, req.content_digest, body).map_err(invalid)?;
    let created = i64::try_from(v.created).map_err(|_| SigError::Invalid("created is out of range".into()))?;
    Ok(Verified { created, nonce: v.nonce, keyid: v.keyid, request_hash: v.request_hash })
}

/// The `@target-uri` of a received request, spelt as sluice's signer spells it:
/// `scheme://host[:port]/path?query`, scheme and host lowercased, the port omitted when it is the
/// scheme's default (80, 443). `authority` is what `Host` or `:authority` holds; `None` when it is
/// not a `host[:port]`. The rule itself is `sluice_httpsig::target_uri`, which the daemon's
/// signer uses too, so the two sides cannot drift.
pub fn target_uri(scheme: &str, authority: &str, path_and_query: &str) -> Option<String> {
    sluice_httpsig::target_uri(scheme, authority, path_and_query).ok()
}

/// The headers an agent adds to a signed request.
#[derive(Debug, Clone)]
pub struct Signed {
    pub content_digest: String,
    pub signature_input: String,
    pub signature: String,
    pub request_hash: String,
}

/// Signs a request as an agent would (for `sluice gate check --key`): a fresh nonce, `created`
/// now, `keyid` the key's thumbprint.
pub fn sign_for_check(key: &SigningKey, method: &str, target_uri: &str, body: &[u8]) -> Result<Signed, String> {
    use rand::RngCore;
    let mut raw = [0u8; 18];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let nonce = crate::passport::b64::encode(&raw);
    let keyid = crate::passport::jwk::okp_thumbprint(&key.verifying_key());
    let created = u64::try_from(crate::passport::now()).unwrap_or(0);
    let s = sluice_httpsig::sign(
        key,
        Target { method, target_uri },
        &ContentDigest::of(body),
        SignParams { created, nonce: &nonce, keyid: &keyid },
    )
    .map_err(|e| e.to_string())?;
    Ok(Signed {
        content_digest: s.content_digest,
        signature_input: s.signature_input,
        signature: s.signature,
        request_hash: s.request_hash,
    })
}

#[cfg(test)]
mod tests {
    use super::target_uri;

    #[test]
    fn target_uris_are_spelt_one_way() {
        let t = |s, a, p| target_uri(s, a, p);
        assert_eq!(t("https", "API.Example.com:443", "/v1/x?y=Z").as_deref(), Some("https://api.example.com/v1/x?y=Z"));
        assert_eq!(t("HTTP", "example.com:80", "").as_deref(), Some("http://example.com/"));
        assert_eq!(t("http", "127.0.0.1:8080", "/a").as_deref(), Some("http://127.0.0.1:8080/a"));
        assert_eq!(t("https", "[::1]:8443", "/a").as_deref(), Some("https://[::1]:8443/a"));
        assert_eq!(t("https", "[::1]", "/a").as_deref(), Some("https://[::1]/a"));
        assert_eq!(t("ftp", "example.com", "/"), None);
        assert_eq!(t("http", "user@example.com", "/"), None);
        assert_eq!(t("http", "exa mple.com", "/"), None);
    }
}
