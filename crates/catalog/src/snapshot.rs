//! A published catalog version: its document, its RFC 8785 bytes, `content_hash` and the gate
//! key's signature, and the strict reading of one fetched from elsewhere.
//!
//! What is signed is exactly the RFC 8785 bytes of the `catalog` object. A reader recomputes those
//! bytes from the document it received, checks hash and signature over them, reads the typed
//! snapshot, and requires that it writes back to the same bytes: a value sluice would normalise
//! (`"0.50"` for `"0.5"`, a time with a fraction) is refused, so one hash never means two terms.

use chrono::{DateTime, SecondsFormat, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use sluice_ledger::canonical;
use sluice_passport::{b64, TrustTier};

use crate::routes::{self, Route};
use crate::terms::Terms;

/// Bounds on what a reader accepts, so a hostile gate cannot make an agent parse without end.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;
pub const MAX_PERMISSIONS: usize = 1024;
pub const MAX_DESCRIPTION_LEN: usize = 1024;
pub const MAX_SUMMARY_LEN: usize = 4096;

/// Why a snapshot was refused. Each names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("the catalog document is larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge,
    #[error("the catalog document is not valid JSON: {0}")]
    Json(String),
    #[error("catalog field {field}: {message}")]
    Field { field: String, message: String },
    #[error("content_hash {claimed} does not match the catalog's bytes (sha256 {actual})")]
    HashMismatch { claimed: String, actual: String },
    #[error("catalog_signature does not verify with the gate key {gate_id}")]
    BadSignature { gate_id: String },
    #[error("the catalog was published by {found}, not by the gate key given ({expected})")]
    WrongGate { expected: String, found: String },
    #[error("the catalog is not in canonical form (field values sluice would write differently)")]
    NotCanonical,
}

fn field(field: impl Into<String>, message: impl Into<String>) -> SnapshotError {
    SnapshotError::Field { field: field.into(), message: message.into() }
}

/// A gate's id: `gate_` and the base64url of its raw Ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GateId(String);

impl GateId {
    pub fn from_key(key: &VerifyingKey) -> GateId {
        GateId(format!("gate_{}", b64::encode(key.as_bytes())))
    }
    /// The id and the key it names; refuses anything but `gate_` + 43 base64url characters of a
    /// valid Ed25519 point.
    pub fn parse(s: &str) -> Result<(GateId, VerifyingKey), String> {
        let raw = s.strip_prefix("gate_").ok_or_else(|| format!("{s:?} is not a gate id (gate_ + base64url key)"))?;
        let bytes = b64::decode(raw).map_err(|_| format!("{s:?}: the key is not unpadded base64url"))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| format!("{s:?}: the key is not 32 bytes"))?;
        let key = VerifyingKey::from_bytes(&arr).map_err(|_| format!("{s:?}: not an Ed25519 public key"))?;
        Ok((GateId(s.to_string()), key))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How much harm a permission can do; informs approval, never decides alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RiskLevel {
    Low,
    Medium,
    High,
}

impl RiskLevel {
    pub fn parse(s: &str) -> Option<RiskLevel> {
        match s {
            "low" => Some(RiskLevel::Low),
            "medium" => Some(RiskLevel::Medium),
            "high" => Some(RiskLevel::High),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            RiskLevel::Low => "low",
            RiskLevel::Medium => "medium",
            RiskLevel::High => "high",
        }
    }
}

/// One offered permission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    /// What a passport must grant: `shipments:create`. No wildcard.
    pub key: String,
    pub description: String,
    pub risk_level: RiskLevel,
    pub terms: Terms,
}

/// Checks a permission key: the same spelling as a host policy's actions (segments of
/// `a-z 0-9 _ . -` joined by `:`, no wildcard), so a route's action and a catalog key can be one.
pub fn check_key(key: &str) -> Result<(), String> {
    sluice_policy::check_action(key)
}

/// One catalog version, as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub gate_id: GateId,
    /// 1, 2, 3, ...
    pub version: u64,
    /// `content_hash` of the previous version; `None` for version 1.
    pub prev_content_hash: Option<String>,
    pub published_at: DateTime<Utc>,
    /// When the gate starts serving it (never before `published_at`).
    pub effective_at: DateTime<Utc>,
    pub change_summary: String,
    /// The lowest passport tier the gate accepts.
    pub trust_level: TrustTier,
    /// Sorted by key, keys unique.
    pub permissions: Vec<Permission>,
    /// The gate's routes in order: which permission a request needs (first match wins).
    pub routes: Vec<Route>,
}

/// Seconds-precision RFC 3339 in UTC with `Z`: the only time form a snapshot holds.
pub fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// `sha256:` and the lowercase hex SHA-256 of `bytes`.
pub fn content_hash_of(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl Snapshot {
    pub fn permission(&self, key: &str) -> Option<&Permission> {
        self.permissions.binary_search_by(|p| p.key.as_str().cmp(key)).ok().and_then(|i| self.permissions.get(i))
    }

    /// The version after `previous` (or version 1), offering `permissions`.
    #[allow(clippy::too_many_arguments)]
    pub fn next(
        previous: Option<&SignedCatalog>,
        gate_id: GateId,
        permissions: Vec<Permission>,
        routes: Vec<Route>,
        trust_level: TrustTier,
        change_summary: &str,
        published_at: DateTime<Utc>,
        effective_at: DateTime<Utc>,
    ) -> Result<Snapshot, SnapshotError> {
        let (version, prev_content_hash) = match previous {
            None => (1, None),
            Some(p) => {
                if p.snapshot.gate_id != gate_id {
                    return Err(SnapshotError::WrongGate {
                        expected: gate_id.0.clone(),
                        found: p.snapshot.gate_id.0.clone(),
                    });
                }
                let v = p.snapshot.version.checked_add(1).ok_or_else(|| field("version", "out of versions"))?;
                (v, Some(p.content_hash.clone()))
            }
        };
        let trunc = |t: DateTime<Utc>| DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t);
        let snap = Snapshot {
            gate_id,
            version,
            prev_content_hash,
            published_at: trunc(published_at),
            effective_at: trunc(effective_at),
            change_summary: change_summary.to_string(),
            trust_level,
            permissions,
            routes,
        };
        if previous.is_some_and(|p| snap.published_at < p.snapshot.published_at) {
            return Err(field("published_at", "is before the previous version's (is the clock right?)"));
        }
        snap.check()?;
        Ok(snap)
    }

    /// The snapshot as the JSON document that is hashed and signed.
    pub fn to_json(&self) -> Value {
        let permissions: Vec<Value> = self
            .permissions
            .iter()
            .map(|p| {
                let mut m = Map::new();
                m.insert("key".into(), Value::String(p.key.clone()));
                m.insert("description".into(), Value::String(p.description.clone()));
                m.insert("risk_level".into(), Value::String(p.risk_level.as_str().into()));
                m.insert("constraints".into(), Value::Object(p.terms.to_json()));
                Value::Object(m)
            })
            .collect();
        let mut m = Map::new();
        m.insert("gate_id".into(), Value::String(self.gate_id.as_str().into()));
        m.insert("version".into(), Value::from(self.version));
        m.insert("prev_content_hash".into(), self.prev_content_hash.clone().map_or(Value::Null, Value::String));
        m.insert("published_at".into(), Value::String(format_time(&self.published_at)));
        m.insert("effective_at".into(), Value::String(format_time(&self.effective_at)));
        m.insert("change_summary".into(), Value::String(self.change_summary.clone()));
        m.insert("trust_level".into(), Value::String(self.trust_level.as_str().into()));
        m.insert("permissions".into(), Value::Array(permissions));
        m.insert("routes".into(), Value::Array(self.routes.iter().map(Route::to_json).collect()));
        Value::Object(m)
    }

    /// The RFC 8785 bytes that `content_hash` and the signature cover.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, SnapshotError> {
        canonical::canonicalize(&self.to_json()).map_err(|e| field("catalog", e.to_string()))
    }

    /// Signs the snapshot with the gate key. Refuses a key that is not the snapshot's gate's.
    pub fn sign(&self, key: &SigningKey) -> Result<SignedCatalog, SnapshotError> {
        let id = GateId::from_key(&key.verifying_key());
        if id != self.gate_id {
            return Err(SnapshotError::WrongGate { expected: self.gate_id.0.clone(), found: id.0 });
        }
        self.check()?;
        let canonical = self.canonical_bytes()?;
        let signature = b64::encode(&key.sign(&canonical).to_bytes());
        Ok(SignedCatalog { content_hash: content_hash_of(&canonical), signature, snapshot: self.clone(), canonical })
    }

    /// The rules every snapshot keeps, whoever wrote it.
    pub fn check(&self) -> Result<(), SnapshotError> {
        if self.version == 0 {
            return Err(field("version", "versions start at 1"));
        }
        match (&self.prev_content_hash, self.version) {
            (None, 1) => {}
            (Some(_), 1) => return Err(field("prev_content_hash", "must be null for version 1")),
            (None, _) => return Err(field("prev_content_hash", "is required after version 1")),
            (Some(h), _) => check_hash(h).map_err(|m| field("prev_content_hash", m))?,
        }
        if self.effective_at < self.published_at {
            return Err(field("effective_at", "is before published_at"));
        }
        if self.change_summary.chars().count() > MAX_SUMMARY_LEN {
            return Err(field("change_summary", format!("longer than {MAX_SUMMARY_LEN} characters")));
        }
        if self.permissions.len() > MAX_PERMISSIONS {
            return Err(field("permissions", format!("more than {MAX_PERMISSIONS}")));
        }
        for (i, p) in self.permissions.iter().enumerate() {
            check_key(&p.key).map_err(|m| field(format!("permissions[{i}].key"), m))?;
            if p.description.chars().count() > MAX_DESCRIPTION_LEN {
                return Err(field(format!("permissions[{i}].description"), "too long"));
            }
            if i > 0 && self.permissions.get(i - 1).is_some_and(|prev| prev.key >= p.key) {
                return Err(field(format!("permissions[{i}].key"), "permissions must be sorted by key, each key once"));
            }
        }
        if self.routes.len() > routes::MAX_ROUTES {
            return Err(field("routes", format!("more than {}", routes::MAX_ROUTES)));
        }
        Ok(())
    }

    /// The permission a request needs at this gate: the first route that matches, else
    /// `web:fetch` (GET, HEAD, OPTIONS) or `web:send`.
    pub fn permission_of(&self, method: &str, target: &str) -> &str {
        routes::permission_of(&self.routes, method, target)
    }

    /// Reads a snapshot document strictly: every field, no other, each of its type.
    pub fn from_json(v: &Value) -> Result<Snapshot, SnapshotError> {
        let obj = v.as_object().ok_or_else(|| field("catalog", "must be an object"))?;
        const FIELDS: &[&str] = &[
            "gate_id",
            "version",
            "prev_content_hash",
            "published_at",
            "effective_at",
            "change_summary",
            "trust_level",
            "permissions",
            "routes",
        ];
        for k in obj.keys() {
            if !FIELDS.contains(&k.as_str()) {
                return Err(field(k.clone(), "is not a catalog field"));
            }
        }
        let s = |k: &str| obj.get(k).and_then(Value::as_str).ok_or_else(|| field(k, "must be a string"));
        let (gate_id, _) = GateId::parse(s("gate_id")?).map_err(|m| field("gate_id", m))?;
        let version =
            obj.get("version").and_then(Value::as_u64).ok_or_else(|| field("version", "must be a whole number"))?;
        let prev_content_hash = match obj.get("prev_content_hash") {
            Some(Value::Null) => None,
            Some(Value::String(h)) => Some(h.clone()),
            _ => return Err(field("prev_content_hash", "must be a string or null")),
        };
        let time = |k: &str| -> Result<DateTime<Utc>, SnapshotError> {
            let text = s(k)?;
            DateTime::parse_from_rfc3339(text)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| field(k, format!("{text:?} is not an RFC 3339 time: {e}")))
        };
        let trust_text = s("trust_level")?;
        let trust_level = TrustTier::parse(trust_text)
            .ok_or_else(|| field("trust_level", format!("{trust_text:?} is not L1, L2 or L3")))?;
        let list =
            obj.get("permissions").and_then(Value::as_array).ok_or_else(|| field("permissions", "must be an array"))?;
        if list.len() > MAX_PERMISSIONS {
            return Err(field("permissions", format!("more than {MAX_PERMISSIONS}")));
        }
        let mut permissions = Vec::with_capacity(list.len());
        for (i, p) in list.iter().enumerate() {
            let at = |f: &str| format!("permissions[{i}].{f}");
            let po = p.as_object().ok_or_else(|| field(format!("permissions[{i}]"), "must be an object"))?;
            for k in po.keys() {
                if !["key", "description", "risk_level", "constraints"].contains(&k.as_str()) {
                    return Err(field(at(k), "is not a permission field"));
                }
            }
            let ps = |f: &str| po.get(f).and_then(Value::as_str).ok_or_else(|| field(at(f), "must be a string"));
            let risk = ps("risk_level")?;
            let constraints = po
                .get("constraints")
                .and_then(Value::as_object)
                .ok_or_else(|| field(at("constraints"), "must be an object"))?;
            permissions.push(Permission {
                key: ps("key")?.to_string(),
                description: ps("description")?.to_string(),
                risk_level: RiskLevel::parse(risk)
                    .ok_or_else(|| field(at("risk_level"), format!("{risk:?} is not low, medium or high")))?,
                terms: Terms::from_json(constraints).map_err(|m| field(at("constraints"), m))?,
            });
        }
        let routes = routes::from_json(obj.get("routes")).map_err(|(f, m)| field(f, m))?;
        let snap = Snapshot {
            gate_id,
            version,
            prev_content_hash,
            published_at: time("published_at")?,
            effective_at: time("effective_at")?,
            change_summary: s("change_summary")?.to_string(),
            trust_level,
            permissions,
            routes,
        };
        snap.check()?;
        Ok(snap)
    }
}

fn check_hash(h: &str) -> Result<(), String> {
    match h.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) => Ok(()),
        _ => Err(format!("{h:?} is not sha256: and 64 lowercase hex digits")),
    }
}

/// A snapshot with its hash and signature: what a gate serves and an agent keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCatalog {
    pub snapshot: Snapshot,
    /// `sha256:` + hex of `canonical`.
    pub content_hash: String,
    /// base64url (unpadded) Ed25519 signature of `canonical` by the gate key.
    pub signature: String,
    /// The RFC 8785 bytes of the snapshot.
    pub canonical: Vec<u8>,
}

impl SignedCatalog {
    /// `{catalog, content_hash, catalog_signature}`, as served.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("catalog".into(), self.snapshot.to_json());
        m.insert("content_hash".into(), Value::String(self.content_hash.clone()));
        m.insert("catalog_signature".into(), Value::String(self.signature.clone()));
        Value::Object(m)
    }

    /// Reads a served catalog (`to_json`'s form) and checks it against the gate key: bounded,
    /// duplicate members refused, hash and signature over the canonical bytes, the gate id
    /// naming that key, every field strict, and the document in canonical form.
    pub fn parse(bytes: &[u8], gate_key: &VerifyingKey) -> Result<SignedCatalog, SnapshotError> {
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(SnapshotError::TooLarge);
        }
        let doc = sluice_passport::json::parse_object(bytes).map_err(|e| SnapshotError::Json(e.to_string()))?;
        for k in doc.keys() {
            if !["catalog", "content_hash", "catalog_signature"].contains(&k.as_str()) {
                return Err(field(k.clone(), "is not a member of a served catalog"));
            }
        }
        let catalog = doc.get("catalog").ok_or_else(|| field("catalog", "is missing"))?;
        let claimed =
            doc.get("content_hash").and_then(Value::as_str).ok_or_else(|| field("content_hash", "must be a string"))?;
        let sig_text = doc
            .get("catalog_signature")
            .and_then(Value::as_str)
            .ok_or_else(|| field("catalog_signature", "must be a string"))?;
        let canonical = canonical::canonicalize(catalog).map_err(|e| field("catalog", e.to_string()))?;
        let actual = content_hash_of(&canonical);
        if claimed != actual {
            return Err(SnapshotError::HashMismatch { claimed: claimed.to_string(), actual });
        }
        let expected = GateId::from_key(gate_key);
        let sig_bytes = b64::decode(sig_text).map_err(|_| field("catalog_signature", "is not unpadded base64url"))?;
        let sig_arr: [u8; 64] = sig_bytes.try_into().map_err(|_| field("catalog_signature", "is not 64 bytes"))?;
        gate_key
            .verify_strict(&canonical, &Signature::from_bytes(&sig_arr))
            .map_err(|_| SnapshotError::BadSignature { gate_id: expected.0.clone() })?;
        let snapshot = Snapshot::from_json(catalog)?;
        if snapshot.gate_id != expected {
            return Err(SnapshotError::WrongGate { expected: expected.0, found: snapshot.gate_id.0 });
        }
        if snapshot.canonical_bytes()? != canonical {
            return Err(SnapshotError::NotCanonical);
        }
        Ok(SignedCatalog { snapshot, content_hash: actual, signature: sig_text.to_string(), canonical })
    }
}
