//! A narrow JWS compact serialisation (RFC 7515 §7.1): one algorithm, one type, nothing optional.
//!
//! Written here rather than taken from a general JOSE library on purpose: every knob such a library
//! offers (algorithm lists, embedded keys, key URLs, critical extensions, JSON serialisation) is a
//! way to get a forged token accepted. This module accepts exactly
//! `base64url(header) "." base64url(payload) "." base64url(signature)` with header
//! `{"alg":"EdDSA","typ":"agent-passport+jwt","kid":…}`, and verifies with `verify_strict`.

use super::{b64, json, PassportError};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde_json::{Map, Value};

pub const ALG: &str = "EdDSA";
pub const TYP: &str = "agent-passport+jwt";
/// Passports are a few KiB at most; refuse anything larger before decoding it.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Header parameters that carry or point at keys, or demand extensions: a verifier that honoured
/// any of them could be handed the attacker's key.
const FORBIDDEN_HEADERS: &[&str] = &["crit", "jwk", "jku", "x5u", "x5c", "x5t", "x5t#S256", "b64", "zip"];

/// The decoded parts of a structurally valid token whose signature is not yet checked.
pub struct Unverified {
    pub kid: Option<String>,
    pub payload: Map<String, Value>,
    signing_input_len: usize,
    signature: [u8; 64],
}

/// Splits and decodes a compact JWS and checks its header. Does not check the signature.
pub fn decode(token: &str) -> Result<Unverified, PassportError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(PassportError::TooLarge { len: token.len(), max: MAX_TOKEN_LEN });
    }
    if token.trim_start().starts_with('{') {
        return Err(PassportError::JsonSerialization);
    }
    let parts: Vec<&str> = token.split('.').collect();
    let [header_b64, payload_b64, sig_b64] = parts[..] else {
        return Err(PassportError::Segments(parts.len()));
    };
    let header_bytes = b64::decode(header_b64).map_err(|_| PassportError::Base64("header"))?;
    let payload_bytes = b64::decode(payload_b64).map_err(|_| PassportError::Base64("payload"))?;
    let sig_bytes = b64::decode(sig_b64).map_err(|_| PassportError::Base64("signature"))?;
    let header = json::parse_object(&header_bytes).map_err(|e| PassportError::Json("header", e.to_string()))?;
    let kid = check_header(&header)?;
    let payload = json::parse_object(&payload_bytes).map_err(|e| PassportError::Json("payload", e.to_string()))?;
    let signature: [u8; 64] = sig_bytes.try_into().map_err(|_| PassportError::SignatureLength)?;
    Ok(Unverified { kid, payload, signing_input_len: header_b64.len() + 1 + payload_b64.len(), signature })
}

fn check_header(header: &Map<String, Value>) -> Result<Option<String>, PassportError> {
    for name in header.keys() {
        if FORBIDDEN_HEADERS.contains(&name.as_str()) {
            return Err(PassportError::ForbiddenHeader(name.clone()));
        }
        if !matches!(name.as_str(), "alg" | "typ" | "kid") {
            return Err(PassportError::UnknownHeader(name.clone()));
        }
    }
    match header.get("alg") {
        Some(Value::String(alg)) if alg == ALG => {}
        Some(Value::String(alg)) if alg.eq_ignore_ascii_case("none") => return Err(PassportError::AlgNone),
        Some(Value::String(alg)) if alg.to_ascii_uppercase().starts_with("HS") => {
            return Err(PassportError::AlgHmac(alg.clone()))
        }
        other => return Err(PassportError::AlgUnsupported(other.map(|v| v.to_string()).unwrap_or_default())),
    }
    match header.get("typ") {
        Some(Value::String(typ)) if typ == TYP => {}
        other => return Err(PassportError::Typ(other.map(|v| v.to_string()).unwrap_or_else(|| "none".into()))),
    }
    match header.get("kid") {
        None => Ok(None),
        Some(Value::String(kid)) => Ok(Some(kid.clone())),
        Some(_) => Err(PassportError::Claim { name: "kid", problem: "must be a string".into() }),
    }
}

impl Unverified {
    /// Verifies the signature over the exact bytes received (`token` must be the string this was
    /// decoded from). Small-order keys and non-canonical signatures are refused (`verify_strict`).
    pub fn verify_signature(&self, token: &str, key: &VerifyingKey) -> Result<(), PassportError> {
        if key.is_weak() {
            return Err(PassportError::WeakKey);
        }
        let input = token.as_bytes().get(..self.signing_input_len).ok_or(PassportError::BadSignature)?;
        let sig = Signature::from_bytes(&self.signature);
        key.verify_strict(input, &sig).map_err(|_| PassportError::BadSignature)
    }
}

/// Signs `payload` into a compact JWS with the pinned header.
pub fn sign(payload: &Map<String, Value>, kid: &str, key: &SigningKey) -> String {
    let header = serde_json::json!({"alg": ALG, "typ": TYP, "kid": kid});
    let input = format!(
        "{}.{}",
        b64::encode(header.to_string().as_bytes()),
        b64::encode(Value::Object(payload.clone()).to_string().as_bytes())
    );
    let sig = key.sign(input.as_bytes());
    format!("{input}.{}", b64::encode(&sig.to_bytes()))
}
