//! Proof of possession of the agent key (trust tier L3).
//!
//! A passport names its agent's key only by thumbprint (`cnf.jkt`). To register an L3 passport,
//! the caller proves it holds that key: it signs
//! `sluice-pop/v1 \n <passport id> \n <unix time> \n <audience>` with the agent key and sends the
//! public key and the signature. The verifier checks that the key's RFC 7638 thumbprint is the
//! passport's `cnf.jkt`, that the time is within [`POP_MAX_AGE_SECS`] of now, and the signature
//! (`verify_strict`). The audience is the daemon's log origin, so a proof made for one daemon is
//! useless to another.

use super::{b64, jwk, Claims};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// How old (or how far in the future) a proof may be.
pub const POP_MAX_AGE_SECS: i64 = 120;

/// A proof as carried in `POST /v1/passports` (`"pop": {...}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proof {
    /// The agent's public key, base64url (the JWK `x`).
    pub x: String,
    /// When the proof was made, seconds since the epoch.
    pub iat: i64,
    /// The signature, base64url.
    pub sig: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PopError {
    #[error("this passport is trust tier L3: registering it needs proof of possession of the agent key (pass --key)")]
    Missing,
    #[error("proof of possession: the key is not a valid Ed25519 public key")]
    BadKey,
    #[error("proof of possession: the key is not the one the passport names (cnf.jkt)")]
    WrongKey,
    #[error("proof of possession: made at {iat}, more than {POP_MAX_AGE_SECS}s from now ({now}); check the clock")]
    Stale { iat: i64, now: i64 },
    #[error("proof of possession: the signature does not verify")]
    BadSignature,
}

fn message(claims: &Claims, iat: i64, audience: &str) -> String {
    format!("sluice-pop/v1\n{}\n{iat}\n{audience}", claims.id)
}

/// Makes a proof with the agent key.
pub fn prove(key: &SigningKey, claims: &Claims, now: i64, audience: &str) -> Proof {
    let sig = key.sign(message(claims, now, audience).as_bytes());
    Proof { x: b64::encode(key.verifying_key().as_bytes()), iat: now, sig: b64::encode(&sig.to_bytes()) }
}

/// Checks a proof for `claims` at `now`.
pub fn verify(proof: &Proof, claims: &Claims, now: i64, audience: &str) -> Result<(), PopError> {
    let raw: [u8; 32] = b64::decode(&proof.x).ok().and_then(|b| b.try_into().ok()).ok_or(PopError::BadKey)?;
    let key = VerifyingKey::from_bytes(&raw).map_err(|_| PopError::BadKey)?;
    if key.is_weak() {
        return Err(PopError::BadKey);
    }
    if jwk::okp_thumbprint(&key) != claims.cnf_jkt {
        return Err(PopError::WrongKey);
    }
    if (now - proof.iat).abs() > POP_MAX_AGE_SECS {
        return Err(PopError::Stale { iat: proof.iat, now });
    }
    let sig: [u8; 64] = b64::decode(&proof.sig).ok().and_then(|b| b.try_into().ok()).ok_or(PopError::BadSignature)?;
    key.verify_strict(message(claims, proof.iat, audience).as_bytes(), &Signature::from_bytes(&sig))
        .map_err(|_| PopError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{issue, Constraints, IssueRequest, TrustTier};

    const NOW: i64 = 1_800_000_000;

    fn issued() -> crate::Issued {
        issue(
            IssueRequest {
                agent_id: "a".into(),
                agent_name: None,
                permissions: vec![],
                constraints: Constraints::default(),
                trust_tier: TrustTier::L3,
                lifetime_secs: 3600,
                now: NOW,
            },
            &SigningKey::from_bytes(&[5u8; 32]),
        )
        .unwrap()
    }

    #[test]
    fn a_proof_by_the_agent_key_verifies() {
        let i = issued();
        let p = prove(&i.agent_key, &i.claims, NOW, "sluice/abc");
        assert_eq!(verify(&p, &i.claims, NOW + 5, "sluice/abc"), Ok(()));
    }

    #[test]
    fn another_key_another_audience_a_stale_or_altered_proof_are_refused() {
        let i = issued();
        let other = SigningKey::from_bytes(&[6u8; 32]);
        assert_eq!(verify(&prove(&other, &i.claims, NOW, "d"), &i.claims, NOW, "d"), Err(PopError::WrongKey));
        let p = prove(&i.agent_key, &i.claims, NOW, "d");
        assert_eq!(verify(&p, &i.claims, NOW, "another-daemon"), Err(PopError::BadSignature));
        assert!(matches!(verify(&p, &i.claims, NOW + POP_MAX_AGE_SECS + 1, "d"), Err(PopError::Stale { .. })));
        let mut later = p.clone();
        later.iat += 1;
        assert_eq!(verify(&later, &i.claims, NOW, "d"), Err(PopError::BadSignature));
        let mut garbage = p;
        garbage.x = "AAAA".into();
        assert_eq!(verify(&garbage, &i.claims, NOW, "d"), Err(PopError::BadKey));
    }

    #[test]
    fn a_proof_for_another_passport_of_the_same_key_is_refused() {
        let i = issued();
        let mut other_claims = i.claims.clone();
        other_claims.id = crate::PassportId::random();
        let p = prove(&i.agent_key, &other_claims, NOW, "d");
        assert_eq!(verify(&p, &i.claims, NOW, "d"), Err(PopError::BadSignature));
    }
}
