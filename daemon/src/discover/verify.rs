//! Verifying what a gate serves, from the agent's side (docs/catalogs.md, "How an agent's daemon
//! verifies a gate"): its `/.well-known/sluice`, every catalog version, the inclusion proof of the
//! version in force against a checkpoint signed by the gate key, and the consistency of that
//! checkpoint with the one pinned before. Pure of I/O: documents come from a [`Source`], so the
//! same code runs against a live gate and against a gate's answers in tests.

use super::pins::HostPin;
use crate::catalog::{chain, GateId, SignedCatalog};
use crate::ledger::checkpoint::{self, Checkpoint};
use crate::ledger::export::PortableAttestation;
use crate::ledger::{merkle, verify};
use crate::passport::b64;
use chrono::{DateTime, Utc};
use ed25519_dalek::VerifyingKey;
use serde_json::{json, Map, Value};
use std::future::Future;
use std::pin::Pin;

/// Largest `/.well-known/sluice` read.
pub const MAX_WELL_KNOWN: usize = 64 << 10;
/// Largest `/v1/catalog/versions` read, and most versions in it.
pub const MAX_VERSIONS_BYTES: usize = 16 << 20;
pub const MAX_VERSIONS: usize = 4096;
/// Largest proof document read (a portable attestation, a consistency proof).
pub const MAX_PROOF_BYTES: usize = 1 << 20;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a gate's documents come from: `get(path_and_query, max)` answers the body of a `200`,
/// at most `max` bytes, or why there is none.
pub trait Source: Send + Sync {
    fn get<'a>(&'a self, path: &'a str, max: usize) -> BoxFuture<'a, Result<Vec<u8>, String>>;
}

/// Why a gate's offer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The gate could not be reached or answered an error.
    Unreachable,
    /// A document is malformed, or its signature, hash or proof does not verify.
    Invalid,
    /// Another gate key than the one pinned (configured or first used).
    OtherKey,
    /// An older catalog version than one already accepted, or a catalog withdrawn.
    Rollback,
    /// Two different catalogs under one version, or two different logs: the gate equivocates.
    SplitView,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Unreachable => "gate_unreachable",
            ErrorKind::Invalid => "gate_invalid",
            ErrorKind::OtherKey => "gate_other_key",
            ErrorKind::Rollback => "gate_rollback",
            ErrorKind::SplitView => "gate_split_view",
        }
    }
}

/// A refusal, naming the gate host and what it did.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("gate {host}: {message}")]
pub struct DiscoverError {
    pub host: String,
    pub kind: ErrorKind,
    pub message: String,
}

/// What a verified fetch found.
#[derive(Debug, Clone)]
pub struct Offer {
    /// The host name, lower case.
    pub host: String,
    /// `https://host[:port]`, the base the documents were fetched from.
    pub url: String,
    pub name: String,
    pub gate_id: GateId,
    pub key: VerifyingKey,
    /// Every version up to the one in force, verified and chained, oldest first; empty when the
    /// gate declares no catalog.
    pub history: Vec<SignedCatalog>,
    /// The newest checkpoint of the gate's log seen (a signed note) and its size.
    pub checkpoint: String,
    pub checkpoint_size: u64,
    /// Pinned by this fetch on first use (no earlier pin, none configured).
    pub first_use: bool,
    pub fetched_at: DateTime<Utc>,
}

impl Offer {
    /// The version in force (the newest the gate serves: it serves none before its time).
    pub fn current(&self) -> Option<&SignedCatalog> {
        self.history.last()
    }

    pub fn version(&self, v: u64) -> Option<&SignedCatalog> {
        usize::try_from(v).ok().and_then(|i| i.checked_sub(1)).and_then(|i| self.history.get(i))
    }

    /// What is pinned after this fetch.
    pub fn pin(&self) -> HostPin {
        HostPin {
            url: self.url.clone(),
            gate_id: self.gate_id.as_str().to_string(),
            catalog_version: self.current().map(|c| c.snapshot.version),
            content_hash: self.current().map(|c| c.content_hash.clone()),
            checkpoint: self.checkpoint.clone(),
            pinned_at: crate::catalog::snapshot::format_time(&self.fetched_at),
        }
    }

    /// The offer as `sluice discover --json` prints it.
    pub fn to_json(&self) -> Value {
        let current = self.current();
        let permissions: Vec<Value> = current
            .map(|c| {
                c.snapshot
                    .permissions
                    .iter()
                    .map(|p| {
                        let t = &p.terms;
                        let price = t.price();
                        json!({
                            "permission": p.key,
                            "description": p.description,
                            "risk_level": p.risk_level.as_str(),
                            "per_call_millicents": price.per_call_millicents,
                            "fee_basis_points": price.fee_basis_points,
                            "price_millicents": price.total_millicents(),
                            "price_cents": crate::money::cents_text(price.total_millicents()),
                            "uptime_basis_points": t.uptime_basis_points,
                            "response_time_ms": t.response_time_ms,
                            "rate_max_per_minute": t.rate_max_per_minute,
                            "approval_required": t.approval_required.unwrap_or(false),
                            "approval_threshold_millicents": t.approval_threshold_millicents,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut m = Map::new();
        m.insert("host".into(), self.host.clone().into());
        m.insert("url".into(), self.url.clone().into());
        m.insert("name".into(), self.name.clone().into());
        m.insert("gate_id".into(), self.gate_id.as_str().into());
        m.insert("first_use".into(), self.first_use.into());
        m.insert("catalog".into(), current.is_some().into());
        m.insert("catalog_version".into(), current.map(|c| c.snapshot.version).into());
        m.insert("content_hash".into(), current.map(|c| c.content_hash.clone()).into());
        m.insert("trust_level".into(), current.map(|c| c.snapshot.trust_level.as_str()).into());
        m.insert(
            "effective_at".into(),
            current.map(|c| crate::catalog::snapshot::format_time(&c.snapshot.effective_at)).into(),
        );
        m.insert("checkpoint_size".into(), self.checkpoint_size.into());
        m.insert("permissions".into(), Value::Array(permissions));
        m.insert(
            "routes".into(),
            Value::Array(
                current
                    .map(|c| c.snapshot.routes.iter().map(crate::catalog::Route::to_json).collect())
                    .unwrap_or_default(),
            ),
        );
        m.insert("fetched_at".into(), crate::catalog::snapshot::format_time(&self.fetched_at).into());
        Value::Object(m)
    }
}

struct Ctx<'a> {
    host: &'a str,
    src: &'a dyn Source,
}

impl Ctx<'_> {
    fn err(&self, kind: ErrorKind, message: impl Into<String>) -> DiscoverError {
        DiscoverError { host: self.host.to_string(), kind, message: message.into() }
    }

    async fn get(&self, path: &str, max: usize) -> Result<Vec<u8>, DiscoverError> {
        self.src.get(path, max).await.map_err(|e| self.err(ErrorKind::Unreachable, format!("GET {path}: {e}")))
    }

    fn object(&self, path: &str, bytes: &[u8]) -> Result<Map<String, Value>, DiscoverError> {
        crate::passport::json::parse_object(bytes)
            .map_err(|e| self.err(ErrorKind::Invalid, format!("{path} is not a JSON object sluice accepts: {e}")))
    }

    /// Checks that the log of `new` extends the log of `old` (both verified checkpoints of this
    /// gate): never smaller, the same root at the same size, else a consistency proof the gate
    /// serves. Anything else is a split view.
    async fn extends(&self, old: &Checkpoint, new: &Checkpoint, what: &str) -> Result<(), DiscoverError> {
        if new.size < old.size {
            return Err(self.err(
                ErrorKind::SplitView,
                format!(
                    "SPLIT VIEW: the gate's log has {} records now but {} in {what}: a log never shrinks; refused (keep both checkpoints as evidence)",
                    new.size, old.size
                ),
            ));
        }
        if new.size == old.size {
            if new.root != old.root {
                return Err(self.err(
                    ErrorKind::SplitView,
                    format!(
                        "SPLIT VIEW: two different logs of {} records (another root than {what}); refused (keep both checkpoints as evidence)",
                        new.size
                    ),
                ));
            }
            return Ok(());
        }
        if old.size == 0 {
            return Ok(());
        }
        let path = format!("/v1/log/consistency?from={}&to={}", old.size, new.size);
        let bytes = self.get(&path, MAX_PROOF_BYTES).await?;
        let doc = self.object(&path, &bytes)?;
        let same = doc.get("from").and_then(Value::as_u64) == Some(old.size)
            && doc.get("to").and_then(Value::as_u64) == Some(new.size);
        let proof: Option<Vec<merkle::Hash>> = doc.get("proof").and_then(Value::as_array).and_then(|a| {
            a.iter()
                .map(|h| {
                    h.as_str()
                        .and_then(crate::ledger::hex::decode)
                        .and_then(|b| <merkle::Hash>::try_from(b.as_slice()).ok())
                })
                .collect()
        });
        let Some(proof) = proof.filter(|_| same) else {
            return Err(self.err(
                ErrorKind::Invalid,
                format!("{path}: not a consistency proof from {} to {}", old.size, new.size),
            ));
        };
        merkle::verify_consistency(old.size, new.size, &old.root, &new.root, &proof).map_err(|e| {
            self.err(
                ErrorKind::SplitView,
                format!(
                    "SPLIT VIEW: the gate's log of {} records does not extend {what} ({} records): {e}; refused (keep both checkpoints as evidence)",
                    new.size, old.size
                ),
            )
        })
    }
}

/// Fetches and verifies a gate's offer from `src` (`url` is its base, `host` its name). `prior`
/// is what was pinned for the host, `configured` the gate id `[gates] pins` names for it.
pub async fn discover(
    src: &dyn Source,
    host: &str,
    url: &str,
    prior: Option<&HostPin>,
    configured: Option<&GateId>,
    now: DateTime<Utc>,
) -> Result<Offer, DiscoverError> {
    let cx = Ctx { host, src };
    let wk_path = crate::gate::discovery::WELL_KNOWN;
    let wk = cx.object(wk_path, &cx.get(wk_path, MAX_WELL_KNOWN).await?)?;
    let text = |k: &str| wk.get(k).and_then(Value::as_str);
    let id_text =
        text("gate_id").ok_or_else(|| cx.err(ErrorKind::Invalid, format!("{wk_path}: gate_id is missing")))?;
    let (gate_id, key) =
        GateId::parse(id_text).map_err(|e| cx.err(ErrorKind::Invalid, format!("{wk_path}: gate_id: {e}")))?;
    if text("public_key") != Some(b64::encode(key.as_bytes()).as_str()) {
        return Err(cx.err(ErrorKind::Invalid, format!("{wk_path}: public_key is not the key of gate_id {id_text}")));
    }
    if let Some(want) = configured.filter(|c| **c != gate_id) {
        return Err(cx.err(
            ErrorKind::OtherKey,
            format!(
                "serves gate key {id_text}, but [gates] pins names {} for it: refused (if the gate's key really changed, change the pin)",
                want.as_str()
            ),
        ));
    }
    if let Some(p) = prior.filter(|p| p.gate_id != gate_id.as_str()) {
        return Err(cx.err(
            ErrorKind::OtherKey,
            format!(
                "serves gate key {id_text}, but {} was pinned on {}: refused (if the gate's key really changed, pin it in [gates] pins or remove the host from the daemon's gate pins)",
                p.gate_id, p.pinned_at
            ),
        ));
    }
    // Printed to operators: no control characters (terminal escapes), bounded.
    let name = text("name").unwrap_or("").chars().filter(|c| !c.is_control()).take(64).collect::<String>();
    let note =
        text("checkpoint").ok_or_else(|| cx.err(ErrorKind::Invalid, format!("{wk_path}: checkpoint is missing")))?;
    let wk_cp =
        checkpoint::open(note, &key).map_err(|e| cx.err(ErrorKind::Invalid, format!("{wk_path}: checkpoint: {e}")))?;
    let prior_cp = match prior {
        Some(p) => Some(
            checkpoint::open(&p.checkpoint, &key)
                .map_err(|e| cx.err(ErrorKind::Invalid, format!("the pinned checkpoint does not verify: {e}")))?,
        ),
        None => None,
    };

    let announced = match wk.get("catalog_version") {
        Some(Value::Null) | None => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| cx.err(ErrorKind::Invalid, format!("{wk_path}: catalog_version is not a number")))?,
        ),
    };
    let mut history = Vec::new();
    let mut newest = wk_cp.clone();
    match announced {
        None => {
            if let Some(v) = prior.and_then(|p| p.catalog_version) {
                return Err(cx.err(
                    ErrorKind::Rollback,
                    format!("declares no catalog, but catalog version {v} was accepted before: a rollback; refused"),
                ));
            }
        }
        Some(announced) => {
            let path = "/v1/catalog/versions";
            let bytes = cx.get(path, MAX_VERSIONS_BYTES).await?;
            let wrapped = crate::passport::json::parse_object(&[b"{\"v\":", bytes.as_slice(), b"}"].concat())
                .map_err(|e| cx.err(ErrorKind::Invalid, format!("{path}: not JSON sluice accepts: {e}")))?;
            let items = wrapped
                .get("v")
                .and_then(Value::as_array)
                .ok_or_else(|| cx.err(ErrorKind::Invalid, format!("{path}: not an array")))?;
            if items.is_empty() || items.len() > MAX_VERSIONS {
                return Err(cx.err(
                    ErrorKind::Invalid,
                    format!("{path}: {} versions (1 to {MAX_VERSIONS} expected)", items.len()),
                ));
            }
            for (i, item) in items.iter().enumerate() {
                let bytes = serde_json::to_vec(item).map_err(|e| cx.err(ErrorKind::Invalid, e.to_string()))?;
                let c = SignedCatalog::parse(&bytes, &key)
                    .map_err(|e| cx.err(ErrorKind::Invalid, format!("{path}: item {i}: {e}")))?;
                history.push(c);
            }
            if let Some(p) = prior {
                if let (Some(v), Some(h)) = (p.catalog_version, &p.content_hash) {
                    let pin = chain::Pin { gate_id: gate_id.clone(), version: v, content_hash: h.clone() };
                    let newest_v = history.last().map_or(0, |c| c.snapshot.version);
                    if newest_v < v {
                        return Err(cx.err(
                            ErrorKind::Rollback,
                            format!("serves catalog version {newest_v}, older than version {v} accepted on {}: a rollback; refused", p.pinned_at),
                        ));
                    }
                    let seen = history.iter().find(|c| c.snapshot.version == v);
                    if let Some(c) = seen {
                        chain::check_against_pin(&pin, c).map_err(|e| chain_error(&cx, e))?;
                    }
                }
            }
            chain::verify_history(None, &history).map_err(|e| chain_error(&cx, e))?;
            let Some(current) = history.last() else {
                return Err(cx.err(ErrorKind::Invalid, format!("{path}: empty")));
            };
            let cur_v = current.snapshot.version;
            if cur_v != announced || text("catalog_content_hash") != Some(current.content_hash.as_str()) {
                return Err(cx.err(
                    ErrorKind::Invalid,
                    format!(
                        "{wk_path} announces catalog version {announced}, but {path} ends at version {cur_v} ({})",
                        current.content_hash
                    ),
                ));
            }
            // The version in force is in the gate's log.
            let path = format!("/v1/catalog/{cur_v}/proof");
            let bytes = cx.get(&path, MAX_PROOF_BYTES).await?;
            let att: PortableAttestation = serde_json::from_slice(&bytes)
                .map_err(|e| cx.err(ErrorKind::Invalid, format!("{path}: not a portable attestation: {e}")))?;
            let report = verify::verify_attestation(&att, &key);
            if !report.is_ok() {
                let problems: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
                return Err(cx.err(ErrorKind::Invalid, format!("{path} does not verify: {}", problems.join("; "))));
            }
            let record: Value = serde_json::from_str(&att.record)
                .map_err(|e| cx.err(ErrorKind::Invalid, format!("{path}: record: {e}")))?;
            let ok = record["kind"] == crate::gate::catalog::KIND_CATALOG_PUBLISHED
                && record["gate_id"] == gate_id.as_str()
                && record["catalog_version"].as_u64() == Some(cur_v)
                && record["content_hash"] == current.content_hash.as_str();
            if !ok {
                return Err(cx.err(
                    ErrorKind::Invalid,
                    format!(
                        "{path}: the proven record is not the catalog_published record of version {cur_v} ({})",
                        current.content_hash
                    ),
                ));
            }
            let proof_cp = checkpoint::open(&att.checkpoint, &key)
                .map_err(|e| cx.err(ErrorKind::Invalid, format!("{path}: checkpoint: {e}")))?;
            // The two checkpoints the gate showed must be of one log.
            let (small, large) = if proof_cp.checkpoint.size >= wk_cp.checkpoint.size {
                (&wk_cp, &proof_cp)
            } else {
                (&proof_cp, &wk_cp)
            };
            cx.extends(&small.checkpoint, &large.checkpoint, "the gate's other checkpoint").await?;
            newest = large.clone();
        }
    }
    if let Some(old) = &prior_cp {
        cx.extends(&old.checkpoint, &newest.checkpoint, "the checkpoint pinned before").await?;
    }
    Ok(Offer {
        host: host.to_string(),
        url: url.to_string(),
        name,
        gate_id,
        key,
        history,
        checkpoint: newest.note,
        checkpoint_size: newest.checkpoint.size,
        first_use: prior.is_none() && configured.is_none(),
        fetched_at: now,
    })
}

fn chain_error(cx: &Ctx<'_>, e: chain::ChainError) -> DiscoverError {
    let kind = match e {
        chain::ChainError::Rollback { .. } => ErrorKind::Rollback,
        chain::ChainError::SplitView { .. } => ErrorKind::SplitView,
        chain::ChainError::OtherGate { .. } => ErrorKind::OtherKey,
        _ => ErrorKind::Invalid,
    };
    let prefix = if kind == ErrorKind::SplitView { "SPLIT VIEW: " } else { "" };
    cx.err(kind, format!("{prefix}{e}; refused"))
}
