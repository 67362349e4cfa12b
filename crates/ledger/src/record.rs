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
//!
//! A draft's body is [`Members`]: its members already encoded, from typed builders (the
//! daemon's `service/drafts.rs`), or from a `serde_json` object for rare records. Sealing
//! sorts the writer's fields into place and writes the record in one allocation of exactly its
//! size; it never builds a `serde_json::Value`.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};

use super::canonical::{self, CanonicalError, Extra, Members};
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    pub chain: String,
    pub body: Members,
}

impl Draft {
    /// A draft of `body`: [`Members`] from a typed builder, or a `serde_json` object.
    ///
    /// Sorts the members here, on the caller's thread: sealing needs them in order (to check
    /// the reserved fields and merge the writer's), and it runs on the single writer thread,
    /// where every cycle is paid by every caller waiting for the group.
    pub fn new(chain: impl Into<String>, body: impl Into<Members>) -> Self {
        let mut body = body.into();
        body.sort();
        Self { chain: chain.into(), body }
    }
}

impl From<Map<String, Value>> for Members {
    fn from(map: Map<String, Value>) -> Members {
        Members::from_map(&map)
    }
}

impl From<&Map<String, Value>> for Members {
    fn from(map: &Map<String, Value>) -> Members {
        Members::from_map(map)
    }
}

/// The fields [`seal`] adds, written straight into the record.
enum SealField<'a> {
    Str(&'static str, &'a str),
    Uint(&'static str, u64),
    Hash(&'static str, Option<&'a Hash>),
}

impl Extra for SealField<'_> {
    fn key(&self) -> &str {
        match self {
            SealField::Str(k, _) | SealField::Uint(k, _) | SealField::Hash(k, _) => k,
        }
    }

    fn value_len(&self) -> usize {
        match self {
            SealField::Str(_, s) => canonical::string_len(s),
            SealField::Uint(_, n) => canonical::decimal_len(*n),
            SealField::Hash(_, Some(h)) => 2 + 2 * h.len(),
            SealField::Hash(_, None) => 4,
        }
    }

    fn write_value(&self, out: &mut Vec<u8>) {
        match self {
            SealField::Str(_, s) => canonical::write_string(out, s),
            SealField::Uint(_, n) => canonical::write_decimal(out, *n),
            SealField::Hash(_, Some(h)) => {
                // Written whole: a push per digit was a capacity check per byte on the writer.
                let mut text = [b'"'; 66];
                if let Some(digits) = text.get_mut(1..65) {
                    for (pair, b) in digits.chunks_exact_mut(2).zip(h.iter()) {
                        if let [hi, lo] = pair {
                            *hi = super::hex::digit(b >> 4);
                            *lo = super::hex::digit(*b);
                        }
                    }
                }
                out.extend_from_slice(&text);
            }
            SealField::Hash(_, None) => out.extend_from_slice(b"null"),
        }
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
    /// The record's RFC 8785 bytes (the Merkle leaf input), shared with the store's own copies.
    pub canonical: Arc<[u8]>,
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
    seal_owned(draft, index, head, now, &mut Vec::new()).map(|(_, appended, head)| (appended, head))
}

/// [`seal`], giving the draft's chain back (the writer keeps it for the chain heads and the
/// journal rather than copying it), and writing the record in `scratch` first (the writer's,
/// reused record after record, so the record's one allocation is its shared copy).
pub(crate) fn seal_owned(
    draft: Draft,
    index: u64,
    head: Option<ChainHead>,
    now: &str,
    scratch: &mut Vec<u8>,
) -> Result<(String, Appended, ChainHead), DraftError> {
    check_chain(&draft.chain)?;
    let Draft { chain, mut body } = draft;
    for field in RESERVED_FIELDS {
        if body.get(field).is_some() {
            return Err(DraftError::ReservedField { chain, field });
        }
    }
    // A time in the draft is kept if it is an RFC 3339 string (which never needs an escape).
    let keep_time = body.get(FIELD_TIME).is_some();
    if keep_time && body.get_plain_str(FIELD_TIME).and_then(parse_time).is_none() {
        return Err(DraftError::BadTime { chain });
    }
    let seq = head.map_or(0, |h| h.seq + 1);
    let canonical_err = |source| DraftError::Canonical { chain: chain.clone(), source };
    for (field, value) in [(FIELD_LOG_INDEX, index), (FIELD_SEQ, seq)] {
        if value > canonical::MAX_SAFE_INTEGER {
            let path = format!("/{field}");
            return Err(canonical_err(CanonicalError::IntegerOutOfRange { path, value: value.to_string() }));
        }
    }
    let fields = [
        SealField::Str(FIELD_CHAIN, &chain),
        SealField::Uint(FIELD_LOG_INDEX, index),
        SealField::Hash(FIELD_PREV_HASH, head.as_ref().map(|h| &h.hash)),
        SealField::Uint(FIELD_SEQ, seq),
        SealField::Str(FIELD_TIME, now),
    ];
    // Already in RFC 8785 order; `time` last, so dropping it keeps the order.
    let extra: [&dyn Extra; 5] = [&fields[0], &fields[1], &fields[2], &fields[3], &fields[4]];
    let extra = if keep_time { &extra[..4] } else { &extra[..] };
    body.write_merged_into(extra, scratch).map_err(canonical_err)?;
    if scratch.len() > MAX_RECORD_BYTES {
        return Err(DraftError::TooLarge { chain, size: scratch.len() });
    }
    let hash = leaf_hash(scratch);
    let canonical = Arc::from(scratch.as_slice());
    Ok((chain, Appended { index, leaf_hash: hash, seq, canonical }, ChainHead { seq, hash }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;
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

    /// What sealing wrote before drafts were [`Members`]: the writer's fields inserted into the
    /// `serde_json` object, then the generic canonicaliser.
    fn seal_generic(
        chain: &str,
        mut body: Map<String, Value>,
        index: u64,
        head: Option<ChainHead>,
        now: &str,
    ) -> Vec<u8> {
        if !body.contains_key(FIELD_TIME) {
            body.insert(FIELD_TIME.into(), now.into());
        }
        body.insert(FIELD_LOG_INDEX.into(), index.into());
        body.insert(FIELD_SEQ.into(), head.map_or(0, |h| h.seq + 1).into());
        body.insert(FIELD_PREV_HASH.into(), head.map_or(Value::Null, |h| crate::hex::encode(&h.hash).into()));
        body.insert(FIELD_CHAIN.into(), chain.into());
        canonical::canonicalize_object(&body).unwrap()
    }

    proptest::proptest! {
        /// Sealing merges the writer's fields into the encoded members exactly where the generic
        /// canonicaliser puts them, with or without a time of the draft's own and a chain head.
        #[test]
        fn seal_writes_what_the_generic_canonicaliser_writes(
            fields in proptest::collection::btree_map(
                "[a-z_]{1,12}|\\PC{1,3}",
                proptest::prop_oneof![
                    "\\PC*".prop_map(Value::from),
                    (0..canonical::MAX_SAFE_INTEGER).prop_map(Value::from),
                    proptest::bool::ANY.prop_map(Value::from),
                ],
                0..20,
            ),
            own_time in proptest::option::of(0i64..4_000_000_000),
            index in 0..canonical::MAX_SAFE_INTEGER,
            head in proptest::option::of((0..canonical::MAX_SAFE_INTEGER - 1, proptest::array::uniform32(0u8..))),
            chain in "[!-~]{1,128}",
        ) {
            let mut body: Map<String, Value> =
                fields.into_iter().filter(|(k, _)| !RESERVED_FIELDS.contains(&k.as_str()) && k != FIELD_TIME).collect();
            if let Some(t) = own_time {
                let at = DateTime::from_timestamp(t, 0).unwrap_or_default();
                body.insert(FIELD_TIME.into(), at.to_rfc3339_opts(SecondsFormat::Secs, true).into());
            }
            let head = head.map(|(seq, hash)| ChainHead { seq, hash });
            let now = "2026-12-02T03:04:05.123456Z";
            let want = seal_generic(&chain, body.clone(), index, head, now);
            let (a, new_head) = seal(Draft::new(chain.clone(), body), index, head, now).unwrap();
            proptest::prop_assert_eq!(&*a.canonical, want.as_slice());
            proptest::prop_assert_eq!(a.leaf_hash, leaf_hash(&want));
            proptest::prop_assert_eq!(new_head.seq, head.map_or(0, |h| h.seq + 1));
        }
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
        // A time that is a string but not RFC 3339, or one written with escapes.
        for t in ["yesterday", "2025-01-01T00:00:00Z\n"] {
            assert!(matches!(
                seal(Draft::new("p", body(json!({"time": t}))), 0, None, &now),
                Err(DraftError::BadTime { .. })
            ));
        }
        // Typed drafts are checked as generic ones are.
        let mut m = Members::default();
        m.str("a", "1").str("a", "2");
        assert!(matches!(
            seal(Draft::new("p", m), 0, None, &now),
            Err(DraftError::Canonical { source: CanonicalError::DuplicateKey { .. }, .. })
        ));
        let mut m = Members::default();
        m.uint(FIELD_SEQ, 3);
        assert!(matches!(seal(Draft::new("p", m), 0, None, &now), Err(DraftError::ReservedField { field: "seq", .. })));
        assert!(matches!(
            seal(Draft::new("p", Members::default()), canonical::MAX_SAFE_INTEGER + 1, None, &now),
            Err(DraftError::Canonical { .. })
        ));
        let big = "x".repeat(MAX_RECORD_BYTES);
        assert!(matches!(
            seal(Draft::new("p", body(json!({"big": big}))), 0, None, &now),
            Err(DraftError::TooLarge { .. })
        ));
    }
}
