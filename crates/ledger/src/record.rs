//! Records: what callers hand in ([`Draft`]), what the writer adds to seal them into the log, and
//! what callers get back ([`Appended`]).
//!
//! The writer adds, to each draft body:
//! - `chain`: the draft's chain (a passport id, or [`HOST_CHAIN`] for operational events);
//! - `log_index`: the record's position in the Merkle log, which is its attestation id;
//! - `seq`: its position within its chain, from 0;
//! - `prev_hash`: lowercase hex of the previous record's leaf hash in that chain, or null;
//! - `time`: RFC 3339 UTC with microseconds, unless the body already has one.
//!
//! The record's RFC 8785 canonical bytes are the Merkle leaf, so the chain links and the log
//! both commit to every field.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};

use super::canonical::{self, CanonicalError};
use super::merkle::{leaf_hash, Hash};

/// The chain of operational events that belong to no passport.
pub const HOST_CHAIN: &str = "host";

pub const FIELD_CHAIN: &str = "chain";
pub const FIELD_LOG_INDEX: &str = "log_index";
pub const FIELD_SEQ: &str = "seq";
pub const FIELD_PREV_HASH: &str = "prev_hash";
pub const FIELD_TIME: &str = "time";
pub const FIELD_KIND: &str = "kind";
pub const FIELD_WINDOW: &str = "window";
pub const KIND_COUNTER_RESET: &str = "counter_reset";

/// The record body's format version, written by the daemon's record builders.
pub const FIELD_VERSION: &str = "v";
/// The version written now: money fields are integer millicents (1/1000 cent), named
/// `*_millicents`. Version 1 records (written before) carry whole cents in `*_cents` fields
/// ([`v1`]); the verifier reads both, telling them apart by field name, and sums spend across
/// the switch in millicents.
pub const RECORD_VERSION: u64 = 2;

/// The passport's cumulative window (`daily`, `weekly`, `monthly`) a record's spend counts in.
pub const FIELD_SPEND_WINDOW: &str = "spend_window";
pub const FIELD_SPEND_WINDOW_START: &str = "spend_window_start";
/// What the record added to the window's spend (signed: a settlement may refund).
pub const FIELD_SPEND_DELTA: &str = "spend_delta_millicents";
/// The window's spend after the record.
pub const FIELD_SPEND_AFTER: &str = "spend_after_millicents";
/// A decision's request cost.
pub const FIELD_COST: &str = "cost_millicents";
/// A settlement's estimate (what the decision spent) and real cost (null when unknown).
pub const FIELD_ESTIMATED: &str = "estimated_millicents";
pub const FIELD_ACTUAL: &str = "actual_millicents";

/// Field names of version 1 records, whose money is whole cents. Never written any more; read by
/// the verifier (× 1000) and by settlement of a decision recorded before an upgrade.
pub mod v1 {
    pub const FIELD_SPEND_DELTA: &str = "spend_delta_cents";
    pub const FIELD_SPEND_AFTER: &str = "spend_after_cents";
    pub const FIELD_COST: &str = "cost_cents";
}

/// Fields only the writer may set.
pub const RESERVED_FIELDS: [&str; 4] = [FIELD_CHAIN, FIELD_LOG_INDEX, FIELD_SEQ, FIELD_PREV_HASH];

/// Bound on one record's canonical size.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Bound on a chain name.
pub const MAX_CHAIN_BYTES: usize = 128;

/// A record to append, as a caller builds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    pub chain: String,
    pub body: Map<String, Value>,
}

impl Draft {
    pub fn new(chain: impl Into<String>, body: Map<String, Value>) -> Self {
        Self { chain: chain.into(), body }
    }
}

/// A record as appended: durable once the caller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Log index, which is the attestation id.
    pub index: u64,
    pub leaf_hash: Hash,
    /// Sequence number within the chain.
    pub seq: u64,
    /// The record's RFC 8785 bytes (the Merkle leaf input).
    pub canonical: Vec<u8>,
}

/// The last record of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: Hash,
}

/// Why a draft cannot become a record. Nothing of the transaction is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DraftError {
    #[error("draft chain {chain:?} is invalid: {reason}")]
    BadChain { chain: String, reason: &'static str },
    #[error("draft for chain {chain:?} sets the field {field:?}, which only the ledger writer may set")]
    ReservedField { chain: String, field: &'static str },
    #[error("draft for chain {chain:?}: field \"time\" must be an RFC 3339 string")]
    BadTime { chain: String },
    #[error("draft for chain {chain:?}: {source}")]
    Canonical {
        chain: String,
        #[source]
        source: CanonicalError,
    },
    #[error("draft for chain {chain:?} is {size} bytes canonical, above the {MAX_RECORD_BYTES}-byte record limit")]
    TooLarge { chain: String, size: usize },
    #[error("transaction returned {count} drafts, above the limit of {max}")]
    TooManyDrafts { count: usize, max: usize },
}

/// Checks a chain name: 1..=128 bytes of printable ASCII without spaces.
pub fn check_chain(chain: &str) -> Result<(), DraftError> {
    let bad = |reason| DraftError::BadChain { chain: chain.chars().take(MAX_CHAIN_BYTES).collect(), reason };
    if chain.is_empty() {
        return Err(bad("empty"));
    }
    if chain.len() > MAX_CHAIN_BYTES {
        return Err(bad("longer than 128 bytes"));
    }
    if !chain.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("only printable ASCII without spaces is allowed"));
    }
    Ok(())
}

/// The current time in the record format.
pub fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Parses a record or filter time (RFC 3339, any offset).
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
}

/// Seals `draft` as log entry `index` following `head` in its chain.
pub fn seal(draft: Draft, index: u64, head: Option<ChainHead>, now: &str) -> Result<(Appended, ChainHead), DraftError> {
    check_chain(&draft.chain)?;
    let Draft { chain, mut body } = draft;
    for field in RESERVED_FIELDS {
        if body.contains_key(field) {
            return Err(DraftError::ReservedField { chain, field });
        }
    }
    match body.get(FIELD_TIME) {
        None => {
            body.insert(FIELD_TIME.into(), Value::String(now.to_string()));
        }
        Some(Value::String(t)) if parse_time(t).is_some() => {}
        Some(_) => return Err(DraftError::BadTime { chain }),
    }
    let seq = head.map_or(0, |h| h.seq + 1);
    body.insert(FIELD_LOG_INDEX.into(), Value::from(index));
    body.insert(FIELD_SEQ.into(), Value::from(seq));
    body.insert(FIELD_PREV_HASH.into(), head.map_or(Value::Null, |h| Value::String(super::hex::encode(&h.hash))));
    body.insert(FIELD_CHAIN.into(), Value::String(chain.clone()));
    let canonical = canonical::canonicalize_object(&body)
        .map_err(|source| DraftError::Canonical { chain: chain.clone(), source })?;
    if canonical.len() > MAX_RECORD_BYTES {
        return Err(DraftError::TooLarge { chain, size: canonical.len() });
    }
    let hash = leaf_hash(&canonical);
    Ok((Appended { index, leaf_hash: hash, seq, canonical }, ChainHead { seq, hash }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("test bodies are objects"),
        }
    }

    #[test]
    fn seal_adds_fields_and_links() {
        let (a, head) =
            seal(Draft::new("p1", body(json!({"decision": "allow"}))), 5, None, "2025-01-01T00:00:00.000000Z").unwrap();
        let v: Value = serde_json::from_slice(&a.canonical).unwrap();
        assert_eq!(v["log_index"], 5);
        assert_eq!(v["seq"], 0);
        assert_eq!(v["prev_hash"], Value::Null);
        assert_eq!(v["chain"], "p1");
        assert_eq!(v["time"], "2025-01-01T00:00:00.000000Z");
        assert_eq!(a.leaf_hash, leaf_hash(&a.canonical));
        let (b, _) = seal(
            Draft::new("p1", body(json!({"time": "2024-05-05T10:00:00Z"}))),
            9,
            Some(head),
            "2025-01-01T00:00:00.000000Z",
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&b.canonical).unwrap();
        assert_eq!(v["seq"], 1);
        assert_eq!(v["prev_hash"], crate::hex::encode(&a.leaf_hash));
        assert_eq!(v["time"], "2024-05-05T10:00:00Z");
    }

    #[test]
    fn seal_refuses_bad_drafts() {
        let now = now_rfc3339();
        for field in RESERVED_FIELDS {
            let mut b = Map::new();
            b.insert(field.to_string(), json!(1));
            assert!(matches!(seal(Draft::new("p", b), 0, None, &now), Err(DraftError::ReservedField { .. })));
        }
        assert!(matches!(seal(Draft::new("", Map::new()), 0, None, &now), Err(DraftError::BadChain { .. })));
        assert!(matches!(seal(Draft::new("a b", Map::new()), 0, None, &now), Err(DraftError::BadChain { .. })));
        assert!(matches!(
            seal(Draft::new("p", body(json!({"time": 5}))), 0, None, &now),
            Err(DraftError::BadTime { .. })
        ));
        assert!(matches!(
            seal(Draft::new("p", body(json!({"cost": 0.5}))), 0, None, &now),
            Err(DraftError::Canonical { .. })
        ));
        let big = "x".repeat(MAX_RECORD_BYTES);
        assert!(matches!(
            seal(Draft::new("p", body(json!({"big": big}))), 0, None, &now),
            Err(DraftError::TooLarge { .. })
        ));
    }
}
