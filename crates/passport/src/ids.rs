//! Identifiers and small claim types: issuer ids, passport ids, agent ids, permissions, tiers.

use super::b64;
use ed25519_dalek::VerifyingKey;
use std::fmt;

/// `iss_` + base64url of the raw 32-byte Ed25519 public key: an L1 verifier needs nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IssuerId(String);

impl IssuerId {
    pub const PREFIX: &'static str = "iss_";

    pub fn from_key(key: &VerifyingKey) -> IssuerId {
        IssuerId(format!("{}{}", Self::PREFIX, b64::encode(key.as_bytes())))
    }

    /// Parses an issuer id and returns the key it names. Fails for anything that is not exactly
    /// `iss_` + 43 characters of strict base64url encoding a valid curve point.
    pub fn parse(s: &str) -> Result<(IssuerId, VerifyingKey), String> {
        let raw =
            s.strip_prefix(Self::PREFIX).ok_or_else(|| format!("issuer id must start with {:?}", Self::PREFIX))?;
        let bytes = b64::decode(raw).map_err(|_| "issuer id is not strict base64url".to_string())?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| "issuer id must encode a 32-byte key".to_string())?;
        let key =
            VerifyingKey::from_bytes(&bytes).map_err(|_| "issuer id is not a valid Ed25519 public key".to_string())?;
        if key.is_weak() {
            return Err("issuer id is a small-order (weak) Ed25519 key".to_string());
        }
        Ok((IssuerId(s.to_string()), key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IssuerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `pp_` + 32 lowercase hex digits (128 random bits): the JWT `jti`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PassportId(String);

impl PassportId {
    pub fn random() -> PassportId {
        let bytes: [u8; 16] = rand::random();
        PassportId(format!("pp_{}", hex(&bytes)))
    }

    pub fn parse(s: &str) -> Result<PassportId, String> {
        let ok = s.len() == 35
            && s.starts_with("pp_")
            && s.bytes().skip(3).all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(PassportId(s.to_string()))
        } else {
            Err(format!("{s:?} is not a passport id (pp_ followed by 32 lowercase hex digits)"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PassportId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks an agent id: 1 to 128 characters of letters, digits and `._:@-`.
pub fn check_agent_id(s: &str) -> Result<(), String> {
    let ok = !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("agent id {s:?} must be 1 to 128 characters of letters, digits and . _ : @ -"))
    }
}

/// Checks a display name: at most 256 characters, no control characters.
pub fn check_agent_name(s: &str) -> Result<(), String> {
    if s.chars().count() > 256 || s.chars().any(char::is_control) {
        Err("agent name must be at most 256 characters with no control characters".to_string())
    } else {
        Ok(())
    }
}

/// A permission: `*`, or colon-separated segments (`orders:read`) optionally ending in `:*`
/// (`llm:*`), which covers every action below that prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Permission(String);

impl Permission {
    pub fn parse(s: &str) -> Result<Permission, String> {
        let bad = || {
            format!(
                "permission {s:?} must be `*` or segments of a-z 0-9 _ . - separated by ':', optionally ending in `:*`"
            )
        };
        if s == "*" {
            return Ok(Permission(s.to_string()));
        }
        if s.len() > 128 {
            return Err(bad());
        }
        let body = s.strip_suffix(":*").unwrap_or(s);
        let segment_ok = |seg: &str| {
            !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
        };
        if body.split(':').all(segment_ok) {
            Ok(Permission(s.to_string()))
        } else {
            Err(bad())
        }
    }

    /// Does this permission cover `action`? `llm:*` covers `llm:chat` and `llm:chat:stream`, not
    /// `llm` itself nor `llmx:chat`.
    pub fn covers(&self, action: &str) -> bool {
        if self.0 == "*" {
            return true;
        }
        match self.0.strip_suffix('*') {
            Some(prefix) => action.len() > prefix.len() && action.starts_with(prefix),
            None => self.0 == action,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How much a verifier must trust the issuer (docs/passports.md, "Trust tiers").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum TrustTier {
    /// Any valid issuer.
    #[default]
    L1,
    /// Only issuers the verifier pins; revocation checked on every request.
    L2,
    /// L2 plus proof of possession of the agent key.
    L3,
}

impl TrustTier {
    pub fn parse(s: &str) -> Option<TrustTier> {
        match s {
            "L1" => Some(TrustTier::L1),
            "L2" => Some(TrustTier::L2),
            "L3" => Some(TrustTier::L3),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            TrustTier::L1 => "L1",
            TrustTier::L2 => "L2",
            TrustTier::L3 => "L3",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_wildcards_respect_segments() {
        let p = Permission::parse("llm:*").unwrap();
        assert!(p.covers("llm:chat"));
        assert!(p.covers("llm:chat:stream"));
        assert!(!p.covers("llm"));
        assert!(!p.covers("llm:"));
        assert!(!p.covers("llmx:chat"));
        assert!(Permission::parse("*").unwrap().covers("anything:at_all"));
        assert!(Permission::parse("orders:read").unwrap().covers("orders:read"));
        assert!(!Permission::parse("orders:read").unwrap().covers("orders:readall"));
    }

    #[test]
    fn permission_syntax_is_strict() {
        for bad in ["", "llm*", "llm:*:x", "LLM:chat", "a::b", ":a", "a b", "*:*", "llm:**"] {
            assert!(Permission::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn passport_ids_are_random_and_strict() {
        let a = PassportId::random();
        assert_ne!(a, PassportId::random());
        assert_eq!(PassportId::parse(a.as_str()).unwrap(), a);
        assert!(PassportId::parse("pp_ABCDEF0123456789abcdef0123456789").is_err());
        assert!(PassportId::parse("pp_123").is_err());
    }

    #[test]
    fn issuer_ids_refuse_weak_and_malformed_keys() {
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let id = format!("iss_{}", b64::encode(&identity));
        assert!(IssuerId::parse(&id).unwrap_err().contains("small-order"));
        assert!(IssuerId::parse("iss_abc").is_err());
        assert!(IssuerId::parse("issuer").is_err());
    }
}
