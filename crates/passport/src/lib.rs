//! Passports: Ed25519-signed JWTs that carry an agent's identity, permissions and constraints.
//!
//! Owns the token format (a narrow compact JWS, [`jws`]), the claims and their validation
//! ([`claims`], [`constraints`]), issuer identities, and the verification rules of docs/passports.md.
//! Knows nothing of sockets, the kernel or the store: the daemon passes in what it knows (pinned
//! issuers, revocations, the time), so the same code serves the CLI, the daemon and a future gate.

#![forbid(unsafe_code)]
// No panics in shipped code: errors are values (tests may unwrap).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

pub mod b64;
pub mod claims;
pub mod constraints;
pub mod domain;
pub mod ids;
pub mod json;
pub mod jwk;
pub mod jws;
pub mod money;
pub mod pop;
pub mod revocation;

pub use claims::Claims;
pub use constraints::{Cents, ConstraintError, Constraints, SpendWindow};
pub use ids::{IssuerId, PassportId, Permission, TrustTier};
pub use revocation::{NoRevocations, RevocationList, Revocations};

use ed25519_dalek::SigningKey;

/// Clock skew tolerated on `nbf` and `exp`, in seconds.
pub const DEFAULT_SKEW_SECS: i64 = 60;
/// The longest lifetime `issue` accepts: a passport is a credential, not a certificate authority.
pub const MAX_LIFETIME_SECS: i64 = 400 * 86_400;

/// Why a token is not a valid passport. Each variant maps to a stable decision `reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PassportError {
    #[error("token is {len} bytes, more than the {max} allowed")]
    TooLarge { len: usize, max: usize },
    #[error("JSON-serialized JWS is not accepted; a passport is a compact JWS (header.payload.signature)")]
    JsonSerialization,
    #[error("a compact JWS has 3 dot-separated parts, this token has {0}")]
    Segments(usize),
    #[error("the {0} is not strict unpadded base64url")]
    Base64(&'static str),
    #[error("the {0} is not acceptable JSON: {1}")]
    Json(&'static str, String),
    #[error("header parameter {0:?} is refused (keys and extensions are never taken from a token)")]
    ForbiddenHeader(String),
    #[error("unknown header parameter {0:?}")]
    UnknownHeader(String),
    #[error("alg \"none\" (unsigned token) is refused")]
    AlgNone,
    #[error("alg {0:?} (HMAC) is refused: passports are verified with the issuer's public key, never used as an HMAC secret")]
    AlgHmac(String),
    #[error("alg {0} is refused; only EdDSA is accepted")]
    AlgUnsupported(String),
    #[error("typ {0} is refused; a passport has typ \"agent-passport+jwt\"")]
    Typ(String),
    #[error("claim {name}: {problem}")]
    Claim { name: &'static str, problem: String },
    #[error("unknown claim {0:?}; a restriction this verifier does not understand is never ignored")]
    UnknownClaim(String),
    #[error(transparent)]
    Constraint(ConstraintError),
    #[error("header kid {kid:?} does not name the issuer {issuer}")]
    KidMismatch { kid: String, issuer: String },
    #[error("the signature is not 64 bytes")]
    SignatureLength,
    #[error("the issuer key is a small-order (weak) Ed25519 key")]
    WeakKey,
    #[error("the signature does not verify (the token was altered, or not signed by its issuer)")]
    BadSignature,
    #[error("passport expired at {expires_at} (now {now}, skew {skew}s)")]
    Expired { expires_at: i64, now: i64, skew: i64 },
    #[error("passport is not valid before {not_before} (now {now}, skew {skew}s)")]
    NotYetValid { not_before: i64, now: i64, skew: i64 },
    #[error("issuer {issuer} is not one of the trusted issuers")]
    UntrustedIssuer { issuer: String },
    #[error("passport requires trust tier {tier}, which needs pinned issuers; none are configured (pass --issuer-pub, or set [trust] issuers)")]
    TierNeedsPinnedIssuers { tier: &'static str },
    #[error("passport {0} is revoked")]
    Revoked(String),
}

impl PassportError {
    /// The stable decision reason for this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            PassportError::Expired { .. } => "passport_expired",
            PassportError::NotYetValid { .. } => "passport_not_yet_valid",
            PassportError::Revoked(_) => "passport_revoked",
            PassportError::UntrustedIssuer { .. } | PassportError::TierNeedsPinnedIssuers { .. } => "issuer_untrusted",
            _ => "passport_invalid",
        }
    }
}

/// A passport whose signature, claims and validity have been checked.
#[derive(Debug, Clone)]
pub struct Passport {
    pub token: String,
    pub claims: Claims,
}

/// What a verifier trusts. Built by the CLI from flags and by the daemon from its config.
pub struct Verifier<'a> {
    /// Pinned issuers. Empty means L1: any issuer whose signature verifies.
    pub pinned_issuers: &'a [IssuerId],
    pub revocations: &'a dyn Revocations,
    pub skew_secs: i64,
}

impl<'a> Verifier<'a> {
    pub fn new(pinned_issuers: &'a [IssuerId], revocations: &'a dyn Revocations) -> Self {
        Verifier { pinned_issuers, revocations, skew_secs: DEFAULT_SKEW_SECS }
    }

    /// Verifies `token` at time `now` (seconds since the epoch). The signature is checked before
    /// any claim other than `iss` is interpreted, so a tampered token reports a bad signature.
    pub fn verify(&self, token: &str, now: i64) -> Result<Passport, PassportError> {
        let unverified = jws::decode(token)?;
        let (issuer, key) = Claims::issuer_of(&unverified.payload)?;
        if let Some(kid) = &unverified.kid {
            if kid != issuer.as_str() {
                return Err(PassportError::KidMismatch { kid: kid.clone(), issuer: issuer.to_string() });
            }
        }
        unverified.verify_signature(token, &key)?;
        let claims = Claims::from_json(&unverified.payload)?;
        self.check_trust(&claims)?;
        self.check_time(&claims, now)?;
        if self.revocations.is_revoked(&claims.id) {
            return Err(PassportError::Revoked(claims.id.to_string()));
        }
        Ok(Passport { token: token.to_string(), claims })
    }

    fn check_trust(&self, claims: &Claims) -> Result<(), PassportError> {
        if self.pinned_issuers.is_empty() {
            if claims.trust_tier > TrustTier::L1 {
                return Err(PassportError::TierNeedsPinnedIssuers { tier: claims.trust_tier.as_str() });
            }
            return Ok(());
        }
        if self.pinned_issuers.contains(&claims.issuer) {
            Ok(())
        } else {
            Err(PassportError::UntrustedIssuer { issuer: claims.issuer.to_string() })
        }
    }

    fn check_time(&self, claims: &Claims, now: i64) -> Result<(), PassportError> {
        let skew = self.skew_secs;
        if now.saturating_add(skew) < claims.not_before {
            return Err(PassportError::NotYetValid { not_before: claims.not_before, now, skew });
        }
        if now.saturating_sub(skew) >= claims.expires_at {
            return Err(PassportError::Expired { expires_at: claims.expires_at, now, skew });
        }
        Ok(())
    }
}

/// Decodes a token without verifying it, for `sluice passport inspect`.
pub fn inspect(token: &str) -> Result<(serde_json::Map<String, serde_json::Value>, Option<String>), PassportError> {
    let u = jws::decode(token)?;
    Ok((u.payload, u.kid))
}

/// What an issuer fills in for a new passport.
pub struct IssueRequest {
    pub agent_id: String,
    pub agent_name: Option<String>,
    pub permissions: Vec<Permission>,
    pub constraints: Constraints,
    pub trust_tier: TrustTier,
    pub lifetime_secs: i64,
    pub now: i64,
}

/// A newly issued passport and the agent's new private key (for proof of possession).
pub struct Issued {
    pub token: String,
    pub claims: Claims,
    pub agent_key: SigningKey,
}

/// Issues a passport signed by `issuer_key`, with a fresh agent keypair bound through `cnf.jkt`.
pub fn issue(req: IssueRequest, issuer_key: &SigningKey) -> Result<Issued, PassportError> {
    ids::check_agent_id(&req.agent_id).map_err(|p| PassportError::Claim { name: "sub", problem: p })?;
    if let Some(n) = &req.agent_name {
        ids::check_agent_name(n).map_err(|p| PassportError::Claim { name: "agent_name", problem: p })?;
    }
    if !(1..=MAX_LIFETIME_SECS).contains(&req.lifetime_secs) {
        return Err(PassportError::Claim {
            name: "exp",
            problem: format!("lifetime must be between 1 second and {} days", MAX_LIFETIME_SECS / 86_400),
        });
    }
    let agent_key = SigningKey::generate(&mut rand::rngs::OsRng);
    let issuer = IssuerId::from_key(&issuer_key.verifying_key());
    let claims = Claims {
        issuer: issuer.clone(),
        agent_id: req.agent_id,
        id: PassportId::random(),
        issued_at: req.now,
        not_before: req.now,
        expires_at: req.now + req.lifetime_secs,
        agent_name: req.agent_name,
        permissions: req.permissions,
        trust_tier: req.trust_tier,
        constraints: req.constraints,
        cnf_jkt: jwk::okp_thumbprint(&agent_key.verifying_key()),
    };
    // Round-trip the claims through the verifier's parser: what we sign must be what we accept.
    let json = claims.to_json();
    Claims::from_json(&json)?;
    let token = jws::sign(&json, issuer.as_str(), issuer_key);
    Ok(Issued { token, claims, agent_key })
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests;
