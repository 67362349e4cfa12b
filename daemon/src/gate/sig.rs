//! The gate's one door to HTTP message signatures (RFC 9421, sluice's profile) and
//! `Content-Digest` (RFC 9530).
//!
//! Everything the gate needs from a signature goes through [`verify`] and [`digest_matches`],
//! so the implementation behind them lives in one library (`sluice-httpsig`), shared with the
//! egress daemon's signer. Until that library is linked into this build, both fail closed:
//! a signed request is refused as `signature_invalid`, never accepted unchecked.

use ed25519_dalek::VerifyingKey;

/// The parts of a request a signature covers, as the gate received them.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    pub method: &'a str,
    /// `scheme://authority/path?query` as the client addressed it.
    pub target_uri: &'a str,
    pub content_digest: Option<&'a str>,
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

const NOT_LINKED: &str =
    "this build of sluice cannot verify HTTP message signatures yet (the sluice-httpsig library is not linked)";

/// Verifies the request's `Signature-Input`/`Signature` with the agent's key.
pub fn verify(req: &SignedRequest<'_>, key: &VerifyingKey) -> Result<Verified, String> {
    let _ = (req, key);
    Err(NOT_LINKED.to_string())
}

/// Does a received `Content-Digest` header name this SHA-256 of the body?
pub fn digest_matches(header: &str, body_sha256: &[u8; 32]) -> Result<(), String> {
    let _ = (header, body_sha256);
    Err(NOT_LINKED.to_string())
}

/// The headers an agent adds to a signed request.
#[derive(Debug, Clone)]
pub struct Signed {
    pub content_digest: String,
    pub signature_input: String,
    pub signature: String,
}

/// Signs a request as an agent would (for `sluice gate check --key`): a fresh nonce, `created`
/// now, `keyid` the key's thumbprint.
pub fn sign_for_check(
    key: &ed25519_dalek::SigningKey,
    method: &str,
    target_uri: &str,
    body: &[u8],
) -> Result<Signed, String> {
    let _ = (key, method, target_uri, body);
    Err(NOT_LINKED.to_string())
}
