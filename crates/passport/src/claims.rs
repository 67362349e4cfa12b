//! The claims of a passport, parsed strictly from the JWS payload.

use super::constraints::Constraints;
use super::ids::{check_agent_id, check_agent_name, IssuerId, PassportId, Permission, TrustTier};
use super::PassportError;
use serde_json::{Map, Value};

const MAX_PERMISSIONS: usize = 256;
/// Timestamps beyond this (year ~36812) are refused rather than risk overflow in arithmetic.
const MAX_TIMESTAMP: i64 = 1 << 40;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// `iss`
    pub issuer: IssuerId,
    /// `sub`
    pub agent_id: String,
    /// `jti`
    pub id: PassportId,
    /// `iat`, `nbf`, `exp`: seconds since the Unix epoch.
    pub issued_at: i64,
    pub not_before: i64,
    pub expires_at: i64,
    pub agent_name: Option<String>,
    pub permissions: Vec<Permission>,
    pub trust_tier: TrustTier,
    pub constraints: Constraints,
    /// `cnf.jkt`: RFC 7638 thumbprint of the agent's Ed25519 key.
    pub cnf_jkt: String,
}

fn claim_err(name: &'static str, problem: impl Into<String>) -> PassportError {
    PassportError::Claim { name, problem: problem.into() }
}

fn string<'a>(m: &'a Map<String, Value>, name: &'static str) -> Result<&'a str, PassportError> {
    match m.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(claim_err(name, format!("must be a string, got {other}"))),
        None => Err(claim_err(name, "is missing")),
    }
}

fn timestamp(m: &Map<String, Value>, name: &'static str) -> Result<i64, PassportError> {
    match m.get(name) {
        Some(Value::Number(n)) => match n.as_i64() {
            Some(t) if (0..MAX_TIMESTAMP).contains(&t) => Ok(t),
            _ => Err(claim_err(name, format!("must be whole seconds since 1970 within range, got {n}"))),
        },
        Some(other) => Err(claim_err(name, format!("must be a number (NumericDate), got {other}"))),
        None => Err(claim_err(name, "is missing")),
    }
}

impl Claims {
    /// The issuer id alone, read before the signature is checked (it names the verification key).
    pub fn issuer_of(payload: &Map<String, Value>) -> Result<(IssuerId, ed25519_dalek::VerifyingKey), PassportError> {
        let iss = string(payload, "iss")?;
        IssuerId::parse(iss).map_err(|p| claim_err("iss", p))
    }

    pub fn from_json(m: &Map<String, Value>) -> Result<Claims, PassportError> {
        const KNOWN: &[&str] = &[
            "iss",
            "sub",
            "jti",
            "iat",
            "nbf",
            "exp",
            "agent_name",
            "permissions",
            "trust_tier",
            "constraints",
            "cnf",
        ];
        if let Some(unknown) = m.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(PassportError::UnknownClaim(unknown.clone()));
        }
        let (issuer, _) = Self::issuer_of(m)?;
        let agent_id = string(m, "sub")?;
        check_agent_id(agent_id).map_err(|p| claim_err("sub", p))?;
        let id = PassportId::parse(string(m, "jti")?).map_err(|p| claim_err("jti", p))?;
        let issued_at = timestamp(m, "iat")?;
        let not_before = timestamp(m, "nbf")?;
        let expires_at = timestamp(m, "exp")?;
        if expires_at <= not_before {
            return Err(claim_err("exp", "must be later than nbf"));
        }
        let agent_name = match m.get("agent_name") {
            None => None,
            Some(_) => {
                let n = string(m, "agent_name")?;
                check_agent_name(n).map_err(|p| claim_err("agent_name", p))?;
                Some(n.to_string())
            }
        };
        let perms = match m.get("permissions") {
            Some(Value::Array(items)) if items.len() <= MAX_PERMISSIONS => items,
            Some(Value::Array(_)) => {
                return Err(claim_err("permissions", format!("more than {MAX_PERMISSIONS} entries")))
            }
            Some(_) => return Err(claim_err("permissions", "must be a list of strings")),
            None => return Err(claim_err("permissions", "is missing")),
        };
        let permissions = perms
            .iter()
            .map(|p| {
                let s = p.as_str().ok_or_else(|| claim_err("permissions", format!("entry {p} is not a string")))?;
                Permission::parse(s).map_err(|e| claim_err("permissions", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tier = string(m, "trust_tier")?;
        let trust_tier =
            TrustTier::parse(tier).ok_or_else(|| claim_err("trust_tier", format!("{tier:?} is not L1, L2 or L3")))?;
        let constraints = match m.get("constraints") {
            Some(Value::Object(c)) => Constraints::from_json(c).map_err(PassportError::Constraint)?,
            Some(_) => return Err(claim_err("constraints", "must be an object")),
            None => return Err(claim_err("constraints", "is missing")),
        };
        let cnf_jkt = match m.get("cnf") {
            Some(Value::Object(cnf)) if cnf.len() == 1 => match cnf.get("jkt") {
                Some(Value::String(j)) if j.len() == 43 && super::b64::decode(j).is_ok() => j.clone(),
                _ => return Err(claim_err("cnf", "jkt must be a base64url SHA-256 thumbprint")),
            },
            _ => return Err(claim_err("cnf", "must be an object with exactly one member, jkt")),
        };
        Ok(Claims {
            issuer,
            agent_id: agent_id.to_string(),
            id,
            issued_at,
            not_before,
            expires_at,
            agent_name,
            permissions,
            trust_tier,
            constraints,
            cnf_jkt,
        })
    }

    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("iss".into(), self.issuer.as_str().into());
        m.insert("sub".into(), self.agent_id.clone().into());
        m.insert("jti".into(), self.id.as_str().into());
        m.insert("iat".into(), self.issued_at.into());
        m.insert("nbf".into(), self.not_before.into());
        m.insert("exp".into(), self.expires_at.into());
        if let Some(n) = &self.agent_name {
            m.insert("agent_name".into(), n.clone().into());
        }
        m.insert("permissions".into(), self.permissions.iter().map(|p| Value::from(p.as_str())).collect());
        m.insert("trust_tier".into(), self.trust_tier.as_str().into());
        m.insert("constraints".into(), Value::Object(self.constraints.to_json()));
        m.insert("cnf".into(), serde_json::json!({"jkt": self.cnf_jkt}));
        m
    }

    /// Does any permission cover `action`?
    pub fn permits(&self, action: &str) -> bool {
        self.permissions.iter().any(|p| p.covers(action))
    }
}
