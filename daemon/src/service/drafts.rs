//! The bodies of attestation records and of decision responses (docs/records.md, docs/decisions.md).
//!
//! One place builds them so that what the caller is told and what the log says cannot drift apart:
//! both come from the same [`Built`].
//!
//! Records are format version 2 ([`RECORD_VERSION`]): money is integer millicents in the
//! `*_millicents` fields named in [`crate::ledger::record`], which the verifier reads with the
//! same constants.
//!
//! Decisions, hold resolutions, counter resets and settlements are typed: each field is written
//! straight into a [`Members`] in its RFC 8785 form, and the ledger seals that without ever
//! building a `serde_json::Value`. Rare records (registrations, revocations, sandboxes, host
//! events) start from [`base`], a `serde_json` object, which the ledger encodes the same way.

use super::held::Hold;
use crate::decide::{self, ActionRequest, Decision, Guardrail, Reason, ResetWindow, StateView};
use crate::ledger::canonical::{self, Members};
use crate::ledger::record::{
    FIELD_ACTUAL, FIELD_COST, FIELD_ESTIMATED, FIELD_KIND, FIELD_SPEND_AFTER, FIELD_SPEND_DELTA, FIELD_SPEND_WINDOW,
    FIELD_SPEND_WINDOW_START, FIELD_TIME, FIELD_VERSION, FIELD_WINDOW, KIND_COUNTER_RESET, RECORD_VERSION,
};
use crate::passport::{Claims, PassportId};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
#[cfg(test)]
use serde_json::json;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Record fields and kinds the daemon writes and reads back itself (settlement, hold lookup);
/// the verifier's own fields (`kind`, `time`, `window`, spend and cost) are the constants of
/// [`crate::ledger::record`], used here too. docs/records.md lists every field.
pub mod field {
    pub const PASSPORT_ID: &str = "passport_id";
    pub const ISSUER: &str = "issuer";
    pub const AGENT_ID: &str = "agent_id";
    pub const DECISION: &str = "decision";
    pub const REASON: &str = "reason";
    pub const DETAIL: &str = "detail";
    pub const POLICY_DIGEST: &str = "policy_digest";
    pub const ACTION: &str = "action";
    pub const METHOD: &str = "method";
    pub const HOST: &str = "host";
    pub const PATH_DIGEST: &str = "path_digest";
    pub const REQUEST_HASH: &str = "request_hash";
    pub const SIGNED_REQUEST_HASH: &str = "signed_request_hash";
    pub const GATE_ID: &str = "gate_id";
    pub const CATALOG_VERSION: &str = "catalog_version";
    pub const HOLD_ID: &str = "hold_id";
    pub const HOLD_EXPIRES_AT: &str = "hold_expires_at";
    pub const HOLD_RECORD: &str = "hold_record";
    pub const DECISION_RECORD: &str = "decision_record";
    pub const BY: &str = "by";
    pub const NOTE: &str = "note";
    pub const SETTLED: &str = "settled";
    pub const WINDOW_CLOSED: &str = "window_closed";
}

/// Record kinds (`kind`) the daemon writes and reads back.
pub mod kind {
    pub const DECISION: &str = "decision";
    pub const HOLD_RESOLUTION: &str = "hold_resolution";
    pub const SETTLEMENT: &str = "settlement";
    pub const PASSPORT_REGISTERED: &str = "passport_registered";
    pub const REVOCATION: &str = "revocation";
    /// `sluice stop`: who stopped which passport (or all) and why.
    pub const EMERGENCY_STOP: &str = "emergency_stop";
    /// `sluice resume`: the stop lifted.
    pub const EMERGENCY_RESUME: &str = "emergency_resume";
    /// A reset of counters other than the spend window's (the verifier's sum goes on).
    pub const COUNTER_RESET_PARTIAL: &str = "counter_reset_partial";
    /// A fleet budget lease taken from Redis (docs/fleet.md).
    pub const FLEET_LEASE_TAKEN: &str = "fleet_lease_taken";
    /// A fleet budget lease renewed (more of the budget taken before the lease ran out).
    pub const FLEET_LEASE_RENEWED: &str = "fleet_lease_renewed";
    /// The unused part of a fleet budget lease given back.
    pub const FLEET_LEASE_RETURNED: &str = "fleet_lease_returned";
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::ledger::hex::encode(&Sha256::digest(bytes))
}

/// A SHA-256 digest in lowercase hex, on the stack: the two digests of every decision record
/// (`path_digest`, `request_hash`) are written into the record without a string of their own.
pub struct DigestHex([u8; 64]);

impl DigestHex {
    pub fn of(digest: &[u8; 32]) -> DigestHex {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 64];
        for (pair, b) in out.chunks_exact_mut(2).zip(digest) {
            if let [hi, lo] = pair {
                *hi = DIGITS[usize::from(b >> 4)];
                *lo = DIGITS[usize::from(b & 0xf)];
            }
        }
        DigestHex(out)
    }

    pub fn as_str(&self) -> &str {
        // Hex digits only: always valid UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

pub fn time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The fields every record has, for a typed record of about `members` fields and `bytes` bytes:
/// kind, time, and (for passport records) who it concerns.
pub fn typed(kind: &str, claims: Option<&Claims>, at: DateTime<Utc>, members: usize, bytes: usize) -> Members {
    let mut m = Members::with_capacity(members, bytes);
    m.uint(FIELD_VERSION, RECORD_VERSION).str(FIELD_KIND, kind).time(FIELD_TIME, &at);
    if let Some(c) = claims {
        m.str(field::PASSPORT_ID, c.id.as_str())
            .str(field::ISSUER, c.issuer.as_str())
            .str(field::AGENT_ID, &c.agent_id);
    }
    m
}

/// [`typed`] as a `serde_json` object, for rare records built field by field.
pub fn base(kind: &str, claims: Option<&Claims>, at: DateTime<Utc>) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(FIELD_VERSION.into(), RECORD_VERSION.into());
    m.insert(FIELD_KIND.into(), kind.into());
    m.insert(FIELD_TIME.into(), time(at).into());
    if let Some(c) = claims {
        m.insert(field::PASSPORT_ID.into(), c.id.as_str().into());
        m.insert(field::ISSUER.into(), c.issuer.as_str().into());
        m.insert(field::AGENT_ID.into(), c.agent_id.clone().into());
    }
    m
}

/// A fleet lease taken, renewed or returned (docs/records.md), on the passport's chain.
pub fn fleet_lease(e: &crate::fleet::LeaseEvent, redis: &str, at: DateTime<Utc>) -> Members {
    let kind = match e.op {
        crate::fleet::LeaseOp::Taken => kind::FLEET_LEASE_TAKEN,
        crate::fleet::LeaseOp::Renewed => kind::FLEET_LEASE_RENEWED,
        crate::fleet::LeaseOp::Returned => kind::FLEET_LEASE_RETURNED,
    };
    let mut m = typed(kind, None, at, 16, 640);
    m.str(field::PASSPORT_ID, &e.passport_id)
        .str("host_id", &e.host_id)
        .str("redis", redis)
        .str("limit", &e.window.limit.name())
        .str("unit", e.window.limit.unit())
        .str("lease_window", &e.window.label())
        .time("lease_window_start", &e.window.start)
        .time("lease_window_end", &e.window.end)
        .uint("limit_amount", e.window.amount)
        .uint("amount", e.amount)
        .uint("claim", e.claim);
    if let Some(total) = e.fleet_total {
        m.uint("fleet_total", total);
    }
    if let Some(why) = e.why {
        m.str("why", why);
    }
    m
}

/// Spend figures carried by a record, recomputed by `sluice audit verify`.
#[derive(Debug, Clone)]
pub struct SpendFields {
    pub window: &'static str,
    pub window_start: DateTime<Utc>,
    /// Millicents, signed: a settlement refunds an over-estimate with a negative delta.
    pub delta_millicents: i64,
    pub after_millicents: u64,
}

impl SpendFields {
    pub(super) fn write(&self, m: &mut Members) {
        m.str(FIELD_SPEND_WINDOW, self.window)
            .time(FIELD_SPEND_WINDOW_START, &self.window_start)
            .int(FIELD_SPEND_DELTA, self.delta_millicents)
            .uint(FIELD_SPEND_AFTER, self.after_millicents);
    }
}

/// A decision as it will be answered and recorded. The passport's id is not kept here: the
/// record writes it from the claims, and the outcome takes the id the caller asked with (the
/// same text), so that a decision allocates no copy of it.
#[derive(Debug, Clone)]
pub struct Built {
    pub decision: Decision,
    pub reason: Reason,
    pub detail: String,
    pub guardrails: Vec<Guardrail>,
    pub all_passed: bool,
    pub timestamp: DateTime<Utc>,
    pub spend: Option<SpendFields>,
    pub hold: Option<Hold>,
}

/// One failed guardrail named `name` whose detail is the reason: the list of a decision made
/// around the engine (unknown or revoked passport, unreadable counters, a hold's resolution).
pub(super) fn failed(name: &'static str, reason: &Reason) -> Vec<Guardrail> {
    vec![Guardrail { name: name.into(), passed: false, detail: reason.to_string().into() }]
}

/// The hold a `request_hold` decision created, as the caller is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldAs {
    pub id: String,
    pub expires_at: DateTime<Utc>,
}

/// One enforced action's decision, as answered to the caller; its record says the same (both
/// come from one [`Built`]). The JSON (docs/decisions.md) is made at the edge by
/// [`DecisionOutcome::to_json`].
#[derive(Debug, Clone)]
pub struct DecisionOutcome {
    pub decision: Decision,
    pub reason: Reason,
    pub detail: String,
    pub passport_id: String,
    pub guardrails: Vec<Guardrail>,
    pub all_passed: bool,
    pub timestamp: DateTime<Utc>,
    /// The log index of this decision's record.
    pub attestation_id: u64,
    /// Set exactly when the decision is `request_hold`.
    pub hold: Option<HeldAs>,
}

impl DecisionOutcome {
    pub fn hold_id(&self) -> Option<&str> {
        self.hold.as_ref().map(|h| h.id.as_str())
    }

    /// The decision JSON (docs/decisions.md, "The decision JSON"), as a value (the CLI and
    /// tests read members of it).
    pub fn to_json(&self) -> Value {
        super::to_json(self)
    }

    /// The decision JSON as the API and the proxy send it: serialised straight from the
    /// outcome, with no `Value` tree built and dropped on the way (about a fifth of the tokio
    /// workers' CPU in `bench decisions`, most of it malloc and free). The same text as
    /// `to_json().to_string()`: a test compares them.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        // Sized for the text up front (escapes aside): growing from `to_vec`'s 128 bytes to the
        // 1-2 KiB of a decision copied it about four times.
        let guardrails = self.guardrails.iter().map(|g| g.name.len() + g.detail.len() + 40).sum::<usize>();
        let mut out = Vec::with_capacity(320 + self.detail.len() + self.passport_id.len() + guardrails);
        // Strings, integers and bools only: serialising cannot fail. `null` would mark a bug.
        match serde_json::to_writer(&mut out, self) {
            Ok(()) => out,
            Err(_) => b"null".to_vec(),
        }
    }
}

/// The decision JSON's members in the order `serde_json`'s maps keep them (by name), so that
/// the bytes serialised directly and those of the `Value` are the same text.
impl Serialize for DecisionOutcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(if self.hold.is_some() { 10 } else { 8 }))?;
        m.serialize_entry("all_passed", &self.all_passed)?;
        if let Some(h) = &self.hold {
            m.serialize_entry("approval_expires_at", &time(h.expires_at))?;
            m.serialize_entry("approval_request_id", &h.id)?;
        }
        m.serialize_entry("attestation_id", &self.attestation_id)?;
        m.serialize_entry("decision", self.decision.as_str())?;
        m.serialize_entry("detail", &self.detail)?;
        m.serialize_entry("guardrails_evaluated", &Guardrails(&self.guardrails))?;
        m.serialize_entry("passport_id", &self.passport_id)?;
        m.serialize_entry("reason", self.reason.as_str())?;
        m.serialize_entry("timestamp", &time(self.timestamp))?;
        m.end()
    }
}

/// `guardrails_evaluated`: each entry's members by name, as a `serde_json` map keeps them
/// (`Guardrail`'s own derived `Serialize` writes them in declaration order).
struct Guardrails<'a>(&'a [Guardrail]);

impl Serialize for Guardrails<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(SortedGuardrail))
    }
}

struct SortedGuardrail<'a>(&'a Guardrail);

impl Serialize for SortedGuardrail<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(3))?;
        m.serialize_entry("detail", &self.0.detail)?;
        m.serialize_entry("name", &self.0.name)?;
        m.serialize_entry("passed", &self.0.passed)?;
        m.end()
    }
}

impl Built {
    fn block(reason: Reason, detail: String, at: DateTime<Utc>) -> Built {
        Built {
            decision: Decision::Block,
            guardrails: failed("passport", &reason),
            reason,
            detail,
            all_passed: false,
            timestamp: at,
            spend: None,
            hold: None,
        }
    }

    pub fn block_unknown(id: &PassportId, at: DateTime<Utc>) -> Built {
        Built::block(
            Reason::PassportUnknown,
            format!("Passport {id} is not registered with this daemon. Register it with `sluice passport register`."),
            at,
        )
    }

    pub fn revoked(claims: &Claims, at: DateTime<Utc>) -> Built {
        Built::block(
            Reason::PassportRevoked,
            format!("Passport {} was revoked. Issue the agent a new passport.", claims.id),
            at,
        )
    }

    pub fn stopped(claims: &Claims, at: DateTime<Utc>) -> Built {
        Built::block(
            Reason::EmergencyStop,
            format!(
                "An operator stopped passport {} (emergency stop): every request is refused until `sluice resume`.",
                claims.id
            ),
            at,
        )
    }

    pub fn state_error(claims: &Claims, error: &str, at: DateTime<Utc>) -> Built {
        Built::block(
            Reason::StateError,
            format!(
                "The counters of passport {} cannot be read ({error}); refusing until an operator repairs them.",
                claims.id
            ),
            at,
        )
    }

    /// An evaluation that allowed the request, refused because this host's fleet leases do not
    /// cover it: a block that spends nothing (the spend stays where it was before the request).
    pub fn fleet_refused(
        eval: decide::Evaluation,
        claims: &Claims,
        refusal: &crate::fleet::Refusal,
        at: DateTime<Utc>,
    ) -> Built {
        let spend_before = eval.spend_after_millicents.saturating_sub(eval.spend_delta_millicents);
        let mut built = Built::from_eval(eval, claims, at);
        built.decision = Decision::Block;
        built.reason = Reason::parse(refusal.reason);
        built.detail = refusal.detail.clone();
        built.guardrails.push(Guardrail {
            name: "fleet_lease".into(),
            passed: false,
            detail: refusal.detail.clone().into(),
        });
        built.all_passed = false;
        if let Some(spend) = &mut built.spend {
            spend.after_millicents = spend_before;
            spend.delta_millicents = 0;
        }
        built
    }

    /// The evaluation's decision, taken over (its guardrails and detail are moved, not copied).
    pub fn from_eval(eval: decide::Evaluation, claims: &Claims, at: DateTime<Utc>) -> Built {
        Built {
            all_passed: eval.all_passed(),
            decision: eval.decision,
            reason: eval.reason,
            detail: eval.detail,
            guardrails: eval.guardrails,
            timestamp: at,
            spend: Some(SpendFields {
                window: claims.constraints.window().as_str(),
                window_start: eval.spend_window_start,
                delta_millicents: i64::try_from(eval.spend_delta_millicents).unwrap_or(i64::MAX),
                after_millicents: eval.spend_after_millicents,
            }),
            hold: None,
        }
    }

    /// [`Built::outcome`], taking the decision (and the caller's copy of the passport id) over
    /// rather than copying them.
    pub fn into_outcome(self, passport_id: String, attestation_id: u64) -> DecisionOutcome {
        DecisionOutcome {
            decision: self.decision,
            reason: self.reason,
            detail: self.detail,
            passport_id,
            guardrails: self.guardrails,
            all_passed: self.all_passed,
            timestamp: self.timestamp,
            attestation_id,
            hold: self.hold.map(|h| HeldAs { id: h.id, expires_at: h.expires_at }),
        }
    }

    /// The outcome the caller is told about passport `passport_id`, once the record is in the
    /// log at `attestation_id`.
    pub fn outcome(&self, passport_id: &str, attestation_id: u64) -> DecisionOutcome {
        DecisionOutcome {
            decision: self.decision,
            reason: self.reason.clone(),
            detail: self.detail.clone(),
            passport_id: passport_id.to_string(),
            guardrails: self.guardrails.clone(),
            all_passed: self.all_passed,
            timestamp: self.timestamp,
            attestation_id,
            hold: self.hold.as_ref().map(|h| HeldAs { id: h.id.clone(), expires_at: h.expires_at }),
        }
    }
}

fn request_fields(m: &mut Members, request: &ActionRequest) {
    m.str(field::ACTION, &request.action).opt_str(field::METHOD, request.method.as_deref());
    m.opt_str(field::HOST, request.host.as_ref().map(|h| h.as_str()));
    match &request.path {
        Some(p) => m.str(field::PATH_DIGEST, DigestHex::of(&Sha256::digest(p.as_bytes()).into()).as_str()),
        None => m.null(field::PATH_DIGEST),
    };
    // A cost past the largest amount sluice counts was refused (invalid_request) and cannot be
    // written exactly: the record says null, the detail names the amount.
    m.opt_uint(FIELD_COST, Some(request.cost_millicents).filter(|c| *c <= crate::money::MAX_MILLICENTS));
    m.str(field::REQUEST_HASH, DigestHex::of(&request_digest(request)).as_str());
}

/// The request hash in hex, as a string (the tests compare it with the `serde_json` text's).
#[cfg(test)]
pub fn request_hash(request: &ActionRequest) -> String {
    DigestHex::of(&request_digest(request)).as_str().to_string()
}

/// The request hash: SHA-256 of `{"action","cost_millicents","host","method","path"}` in that
/// order, strings escaped as JSON, the cost in plain decimal whatever its size (docs/records.md).
/// Its keys and text are part of the hash's format, so they never change with the record's.
///
/// The text is fed to the hash piece by piece rather than built first: a string that needs no
/// escape (every usual action, host, method and path) goes in as it is between its quotes; one
/// that does is escaped into a scratch buffer.
fn request_digest(request: &ActionRequest) -> [u8; 32] {
    let mut hash = Sha256::new();
    let mut scratch = Vec::new();
    let mut string = |hash: &mut Sha256, s: Option<&str>| match s {
        None => hash.update(b"null"),
        Some(s) if canonical::string_len(s) == s.len() + 2 => {
            hash.update(b"\"");
            hash.update(s.as_bytes());
            hash.update(b"\"");
        }
        Some(s) => {
            scratch.clear();
            canonical::write_string(&mut scratch, s);
            hash.update(&scratch);
        }
    };
    hash.update(b"{\"action\":");
    string(&mut hash, Some(&request.action));
    hash.update(b",\"cost_millicents\":");
    // Plain decimal, as `canonical::write_decimal` writes it (u64::MAX has 20 digits).
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = request.cost_millicents;
    while at > 0 {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    hash.update(&digits[at..]);
    hash.update(b",\"host\":");
    string(&mut hash, request.host.as_ref().map(|h| h.as_str()));
    hash.update(b",\"method\":");
    string(&mut hash, request.method.as_deref());
    hash.update(b",\"path\":");
    string(&mut hash, request.path.as_deref());
    hash.update(b"}");
    hash.finalize().into()
}

/// A decision record.
/// `policy_digest` is the digest of the host policy in force (null when the daemon has none).
pub fn decision(
    claims: &Claims,
    request: &ActionRequest,
    built: &Built,
    policy_digest: Option<&str>,
    at: DateTime<Utc>,
) -> Members {
    // The buffer holds each name twice (raw, then quoted) besides the values: a decision of the
    // proxy's shape needed more than the 768 bytes once guessed here and grew (a copy of the
    // whole record) on every decision. Room for it once, with the variable strings on top.
    let strings = built.detail.len()
        + request.action.len()
        + request.host.as_ref().map_or(0, |h| h.as_str().len())
        + request.method.as_ref().map_or(0, String::len)
        + claims.agent_id.len()
        + policy_digest.map_or(0, str::len);
    let mut m = typed(kind::DECISION, Some(claims), at, 24, 1152 + strings);
    m.str(field::DECISION, built.decision.as_str())
        .str(field::REASON, built.reason.as_str())
        .str(field::DETAIL, &built.detail)
        .opt_str(field::POLICY_DIGEST, policy_digest);
    request_fields(&mut m, request);
    if let Some(s) = &built.spend {
        s.write(&mut m);
    }
    if let Some(h) = &built.hold {
        m.str(field::HOLD_ID, &h.id).time(field::HOLD_EXPIRES_AT, &h.expires_at);
    }
    m
}

/// A request the proxy signed for a gate: its RFC 9421 request hash, which the gate's record
/// carries as `request_hash` (`sluice audit link` matches the two). Absent for other requests.
pub fn signed_request_hash(m: &mut Members, hash: Option<&str>) {
    if let Some(h) = hash {
        m.str(field::SIGNED_REQUEST_HASH, h);
    }
}

/// A request priced by a gate's catalog: the gate and the catalog version whose price applied
/// (under the passport's price lock), as the gate's own record names them.
pub fn gate_catalog(m: &mut Members, gate_id: &str, version: u64) {
    m.str(field::GATE_ID, gate_id).uint(field::CATALOG_VERSION, version);
}

/// A decision for a passport id this daemon does not know: recorded on that id's chain.
pub fn unknown_passport(id: &PassportId, request: &ActionRequest, at: DateTime<Utc>) -> Members {
    let mut m = typed(kind::DECISION, None, at, 16, 512 + request.action.len());
    m.str(field::PASSPORT_ID, id.as_str())
        .str(field::DECISION, Decision::Block.as_str())
        .str(field::REASON, Reason::PassportUnknown.as_str());
    request_fields(&mut m, request);
    m
}

/// A counter reset, with who asked. A reset that clears the passport's spend window (or `all`)
/// is a `counter_reset` and the verifier starts its spend sum again from zero; a reset of other
/// counters only (the daily figures of a monthly passport, say) is a `counter_reset_partial`
/// and leaves the spend sum alone.
pub fn counter_reset(claims: &Claims, window: ResetWindow, view: &StateView, by: Value, at: DateTime<Utc>) -> Members {
    let spend_window = claims.constraints.window();
    let clears_spend = window == ResetWindow::All || window.as_str() == spend_window.as_str();
    let kind = if clears_spend { KIND_COUNTER_RESET } else { kind::COUNTER_RESET_PARTIAL };
    let mut m = typed(kind, Some(claims), at, 12, 512);
    m.str(FIELD_WINDOW, window.as_str()).value(field::BY, &by);
    if clears_spend {
        SpendFields {
            window: spend_window.as_str(),
            window_start: view.window_start,
            delta_millicents: 0,
            after_millicents: 0,
        }
        .write(&mut m);
    }
    m
}

/// The resolution of a hold: linked to the hold's decision record, naming the approver.
#[allow(clippy::too_many_arguments)]
pub fn hold_resolution(
    claims: &Claims,
    hold: &Hold,
    request: &ActionRequest,
    built: &Built,
    by: Value,
    note: Option<String>,
    policy_digest: Option<&str>,
    at: DateTime<Utc>,
) -> Members {
    let bytes = 896 + built.detail.len() + request.action.len() + note.as_ref().map_or(0, |n| n.len());
    let mut m = typed(kind::HOLD_RESOLUTION, Some(claims), at, 26, bytes);
    m.str(field::HOLD_ID, &hold.id)
        .uint(field::HOLD_RECORD, hold.record_index)
        .str(field::DECISION, built.decision.as_str())
        .str(field::REASON, built.reason.as_str())
        .str(field::DETAIL, &built.detail)
        .value(field::BY, &by)
        .opt_str(field::NOTE, note.as_deref())
        .opt_str(field::POLICY_DIGEST, policy_digest);
    request_fields(&mut m, request);
    if let Some(s) = &built.spend {
        s.write(&mut m);
    }
    m
}

/// What a settlement records (the spend figures follow when the real cost moved the window).
#[derive(Debug, Clone)]
pub struct SettlementFields<'a> {
    pub decision_record: u64,
    pub estimated_millicents: u64,
    pub actual_millicents: Option<u64>,
    pub reason: &'a str,
}

/// A settlement record: the real cost of an allowed decision, linked to that decision's record.
/// The caller adds the spend figures ([`SpendFields::write`]) or `window_closed`.
pub fn settlement(claims: &Claims, s: &SettlementFields<'_>, at: DateTime<Utc>) -> Members {
    let mut m = typed(kind::SETTLEMENT, Some(claims), at, 18, 640 + s.reason.len());
    m.uint(field::DECISION_RECORD, s.decision_record)
        .uint(FIELD_ESTIMATED, s.estimated_millicents)
        .opt_uint(FIELD_ACTUAL, s.actual_millicents)
        .bool(field::SETTLED, s.actual_millicents.is_some())
        .str(field::REASON, s.reason);
    m
}

#[cfg(test)]
mod tests {
    //! The typed builders write byte for byte what the `serde_json` builders they replaced wrote
    //! (kept here as the reference), once sealed.
    use super::*;
    use crate::decide::Guardrail;
    use crate::ledger::record::{seal, ChainHead, Draft};
    use crate::passport::{self, Constraints, IssueRequest, Permission, SpendWindow, TrustTier};
    use crate::service::held::HoldOrigin;
    use proptest::prelude::*;

    /// The builders as they were before records were typed.
    mod generic {
        use super::super::*;

        /// [`DecisionOutcome::to_json`] as it was, through `json!`.
        pub fn outcome_json(o: &DecisionOutcome) -> Value {
            let mut v = json!({
                "decision": o.decision.as_str(),
                "reason": o.reason,
                "detail": o.detail,
                "attestation_id": o.attestation_id,
                "passport_id": o.passport_id,
                "guardrails_evaluated": o.guardrails,
                "all_passed": o.all_passed,
                "timestamp": time(o.timestamp),
            });
            if let Some(h) = &o.hold {
                v["approval_request_id"] = h.id.clone().into();
                v["approval_expires_at"] = time(h.expires_at).into();
            }
            v
        }

        pub fn spend(s: &SpendFields, m: &mut Map<String, Value>) {
            m.insert(FIELD_SPEND_WINDOW.into(), s.window.into());
            m.insert(FIELD_SPEND_WINDOW_START.into(), time(s.window_start).into());
            m.insert(FIELD_SPEND_DELTA.into(), s.delta_millicents.into());
            m.insert(FIELD_SPEND_AFTER.into(), s.after_millicents.into());
        }

        pub fn request_hash(request: &ActionRequest) -> String {
            let canonical = json!({
                "action": request.action, FIELD_COST: request.cost_millicents,
                "host": request.host.as_ref().map(|h| h.to_string()), "method": request.method, "path": request.path,
            });
            sha256_hex(canonical.to_string().as_bytes())
        }

        fn request_fields(m: &mut Map<String, Value>, request: &ActionRequest) {
            m.insert(field::ACTION.into(), request.action.clone().into());
            m.insert(field::METHOD.into(), request.method.clone().into());
            m.insert(field::HOST.into(), request.host.as_ref().map(|h| h.to_string()).into());
            m.insert(field::PATH_DIGEST.into(), request.path.as_ref().map(|p| sha256_hex(p.as_bytes())).into());
            let cost = Some(request.cost_millicents).filter(|c| *c <= crate::money::MAX_MILLICENTS);
            m.insert(FIELD_COST.into(), cost.into());
            m.insert(field::REQUEST_HASH.into(), request_hash(request).into());
        }

        pub fn decision(
            claims: &Claims,
            request: &ActionRequest,
            built: &Built,
            policy_digest: Option<&str>,
            at: DateTime<Utc>,
        ) -> Map<String, Value> {
            let mut m = base(kind::DECISION, Some(claims), at);
            m.insert(field::DECISION.into(), built.decision.as_str().into());
            m.insert(field::REASON.into(), built.reason.clone().into());
            m.insert(field::DETAIL.into(), built.detail.clone().into());
            m.insert(field::POLICY_DIGEST.into(), policy_digest.into());
            request_fields(&mut m, request);
            if let Some(s) = &built.spend {
                spend(s, &mut m);
            }
            if let Some(h) = &built.hold {
                m.insert(field::HOLD_ID.into(), h.id.clone().into());
                m.insert(field::HOLD_EXPIRES_AT.into(), time(h.expires_at).into());
            }
            m
        }

        pub fn unknown_passport(id: &PassportId, request: &ActionRequest, at: DateTime<Utc>) -> Map<String, Value> {
            let mut m = base(kind::DECISION, None, at);
            m.insert(field::PASSPORT_ID.into(), id.as_str().into());
            m.insert(field::DECISION.into(), "block".into());
            m.insert(field::REASON.into(), Reason::PassportUnknown.into());
            request_fields(&mut m, request);
            m
        }

        pub fn counter_reset(
            claims: &Claims,
            window: ResetWindow,
            view: &StateView,
            by: Value,
            at: DateTime<Utc>,
        ) -> Map<String, Value> {
            let spend_window = claims.constraints.window();
            let clears_spend = window == ResetWindow::All || window.as_str() == spend_window.as_str();
            let kind = if clears_spend { KIND_COUNTER_RESET } else { kind::COUNTER_RESET_PARTIAL };
            let mut m = base(kind, Some(claims), at);
            m.insert(FIELD_WINDOW.into(), window.as_str().into());
            m.insert(field::BY.into(), by);
            if clears_spend {
                let s = SpendFields {
                    window: spend_window.as_str(),
                    window_start: view.window_start,
                    delta_millicents: 0,
                    after_millicents: 0,
                };
                spend(&s, &mut m);
            }
            m
        }

        #[allow(clippy::too_many_arguments)]
        pub fn hold_resolution(
            claims: &Claims,
            hold: &Hold,
            request: &ActionRequest,
            built: &Built,
            by: Value,
            note: Option<String>,
            policy_digest: Option<&str>,
            at: DateTime<Utc>,
        ) -> Map<String, Value> {
            let mut m = base(kind::HOLD_RESOLUTION, Some(claims), at);
            m.insert(field::HOLD_ID.into(), hold.id.clone().into());
            m.insert(field::HOLD_RECORD.into(), hold.record_index.into());
            m.insert(field::DECISION.into(), built.decision.as_str().into());
            m.insert(field::REASON.into(), built.reason.clone().into());
            m.insert(field::DETAIL.into(), built.detail.clone().into());
            m.insert(field::BY.into(), by);
            m.insert(field::NOTE.into(), note.into());
            m.insert(field::POLICY_DIGEST.into(), policy_digest.into());
            request_fields(&mut m, request);
            if let Some(s) = &built.spend {
                spend(s, &mut m);
            }
            m
        }

        pub fn settlement(claims: &Claims, s: &SettlementFields<'_>, at: DateTime<Utc>) -> Map<String, Value> {
            let mut body = base(kind::SETTLEMENT, Some(claims), at);
            body.insert(field::DECISION_RECORD.into(), s.decision_record.into());
            body.insert(FIELD_ESTIMATED.into(), s.estimated_millicents.into());
            body.insert(FIELD_ACTUAL.into(), s.actual_millicents.into());
            body.insert("settled".into(), s.actual_millicents.is_some().into());
            body.insert(field::REASON.into(), s.reason.into());
            body
        }
    }

    fn claims(agent: &str, window: SpendWindow) -> Claims {
        let issuer = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let constraints = Constraints { cumulative_window: Some(window), ..Constraints::default() };
        passport::issue(
            IssueRequest {
                agent_id: agent.to_string(),
                agent_name: None,
                permissions: vec![Permission::parse("llm:*").unwrap()],
                constraints,
                trust_tier: TrustTier::L1,
                lifetime_secs: 3600,
                now: passport::now(),
            },
            &issuer,
        )
        .unwrap()
        .claims
    }

    /// Both bodies sealed the same way; `seal` of a `serde_json` object goes through
    /// [`Members::from_map`], itself checked against the generic canonicaliser in the ledger.
    fn sealed(body: impl Into<Members>) -> Vec<u8> {
        let head = ChainHead { seq: 41, hash: [7; 32] };
        seal(Draft::new("p_chain", body), 1234, Some(head), "2026-12-02T03:04:05.000006Z").unwrap().0.canonical.to_vec()
    }

    /// And the reference once more, as the ledger sealed before: fields inserted into the object,
    /// then the generic canonicaliser.
    fn sealed_generic(mut body: Map<String, Value>) -> Vec<u8> {
        body.insert("chain".into(), "p_chain".into());
        body.insert("log_index".into(), 1234.into());
        body.insert("seq".into(), 42.into());
        body.insert("prev_hash".into(), crate::ledger::hex::encode(&[7; 32]).into());
        body.entry("time").or_insert_with(|| "2026-12-02T03:04:05.000006Z".into());
        canonical::canonicalize_object(&body).unwrap()
    }

    fn same(typed: Members, generic: Map<String, Value>) -> Result<(), TestCaseError> {
        let want = sealed_generic(generic.clone());
        prop_assert_eq!(String::from_utf8(sealed(typed)).unwrap(), String::from_utf8(want.clone()).unwrap());
        prop_assert_eq!(sealed(generic), want);
        Ok(())
    }

    fn request() -> impl Strategy<Value = ActionRequest> {
        (
            "[a-z]{1,8}(:[a-z_.-]{1,8}){0,2}",
            prop_oneof![0..1_000_000u64, Just(crate::money::MAX_MILLICENTS), Just(u64::MAX)],
            proptest::option::of(prop_oneof![Just("api.example.test"), Just("xn--bcher-kva.example"), Just("a.b")]),
            proptest::option::of(prop_oneof![Just("GET".to_string()), "\\PC{0,6}"]),
            proptest::option::of("(\\PC|[\\x00-\\x1f\"\\\\])*"),
        )
            .prop_map(|(action, cost_millicents, host, method, path)| ActionRequest {
                action,
                cost_millicents,
                host: host.map(|h| crate::passport::domain::DomainName::parse(h).unwrap()),
                method,
                path,
            })
    }

    fn time_at() -> impl Strategy<Value = DateTime<Utc>> {
        (0i64..4_102_444_800, 0u32..1_000_000_000).prop_map(|(s, n)| DateTime::from_timestamp(s, n).unwrap())
    }

    fn built() -> impl Strategy<Value = Built> {
        (
            prop_oneof![Just(Decision::Allow), Just(Decision::Block), Just(Decision::RequestHold)],
            prop_oneof![Just(Reason::Allowed), Just(Reason::SpendLimitExceeded), "\\PC{1,12}".prop_map(Reason::Rule)],
            "(\\PC|[\\x00-\\x1f\"\\\\\u{1f600}])*",
            proptest::option::of((time_at(), -1_000_000i64..1_000_000, 0u64..9_007_199_254_740_991)),
            proptest::option::of(time_at()),
            time_at(),
        )
            .prop_map(move |(decision, reason, detail, spend, hold, at)| Built {
                decision,
                reason,
                detail,
                guardrails: vec![Guardrail { name: "x".into(), passed: true, detail: "".into() }],
                all_passed: true,
                timestamp: at,
                spend: spend.map(|(window_start, delta_millicents, after_millicents)| SpendFields {
                    window: "monthly",
                    window_start,
                    delta_millicents,
                    after_millicents,
                }),
                hold: hold.map(|expires_at| Hold {
                    expires_at,
                    ..Hold::new(
                        &claims_for_hold(),
                        &ActionRequest { action: "a".into(), cost_millicents: 0, host: None, method: None, path: None },
                        None,
                        HoldOrigin::Api,
                        expires_at,
                        std::time::Duration::from_secs(60),
                        7,
                    )
                }),
            })
    }

    fn claims_for_hold() -> Claims {
        claims("holder", SpendWindow::Monthly)
    }

    fn by() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(json!("daemon_restart")),
            ("\\PC{0,8}", 0u32..70_000, 1u32..4_000_000)
                .prop_map(|(u, uid, pid)| json!({"uid": uid, "user": u, "pid": pid})),
            (0u32..70_000, 1u32..4_000_000).prop_map(|(uid, pid)| json!({"uid": uid, "user": null, "pid": pid})),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn decisions_are_what_the_serde_json_builder_wrote(
            request in request(),
            built in built(),
            digest in proptest::option::of("[0-9a-f]{64}"),
            at in time_at(),
        ) {
            let c = claims("agent-1", SpendWindow::Monthly);
            let typed = decision(&c, &request, &built, digest.as_deref(), at);
            same(typed, generic::decision(&c, &request, &built, digest.as_deref(), at))?;
            prop_assert_eq!(request_hash(&request), generic::request_hash(&request));
            let id = c.id.clone();
            same(unknown_passport(&id, &request, at), generic::unknown_passport(&id, &request, at))?;
        }

        #[test]
        fn outcome_json_is_what_json_wrote(
            built in built(),
            index in 0u64..1 << 53,
            guardrails in proptest::collection::vec(
                ("[a-z_]{1,12}", any::<bool>(), "(\\PC|[\\x00-\\x1f\"\\\\])*"),
                0..14,
            ),
        ) {
            let mut outcome = built.into_outcome("pp_0123456789abcdef0123456789abcdef".into(), index);
            outcome.guardrails = guardrails
                .into_iter()
                .map(|(name, passed, detail)| Guardrail { name: name.into(), passed, detail: detail.into() })
                .collect();
            // The same value, and the same text (member order included).
            prop_assert_eq!(outcome.to_json(), generic::outcome_json(&outcome));
            prop_assert_eq!(outcome.to_json().to_string(), generic::outcome_json(&outcome).to_string());
            // What the API and the proxy send, serialised without the value: the same text.
            let sent = String::from_utf8(outcome.to_json_bytes()).expect("UTF-8");
            prop_assert_eq!(sent, generic::outcome_json(&outcome).to_string());
        }

        #[test]
        fn hold_resolutions_are_what_the_serde_json_builder_wrote(
            request in request(),
            built in built(),
            by in by(),
            note in proptest::option::of("(\\PC|[\\x00-\\x1f\"\\\\])*"),
            at in time_at(),
        ) {
            let c = claims("agent-2", SpendWindow::Daily);
            let hold = Hold::new(&c, &request, Some(443), HoldOrigin::Proxy, at, std::time::Duration::from_secs(90), 99);
            let typed = hold_resolution(&c, &hold, &request, &built, by.clone(), note.clone(), Some("d"), at);
            same(typed, generic::hold_resolution(&c, &hold, &request, &built, by, note, Some("d"), at))?;
        }

        #[test]
        fn resets_and_settlements_are_what_the_serde_json_builder_wrote(
            window in prop_oneof![Just(ResetWindow::Daily), Just(ResetWindow::Weekly), Just(ResetWindow::Monthly), Just(ResetWindow::All)],
            by in by(),
            start in time_at(),
            at in time_at(),
            estimated in 0u64..9_007_199_254_740_991,
            actual in proptest::option::of(0u64..9_007_199_254_740_991),
            reason in "\\PC{0,20}",
            spend in proptest::option::of((-1_000_000i64..1_000_000, 0u64..1_000_000)),
        ) {
            let c = claims("agent-3", SpendWindow::Weekly);
            let view = StateView {
                passport_id: c.id.to_string(),
                daily_cost_cents: 0,
                daily_cost_millicents: 0,
                daily_cost_limit_cents: None,
                daily_requests: 0,
                daily_request_limit: None,
                daily_resets_at: at,
                window: "weekly",
                window_start: start,
                window_cost_cents: 0,
                window_cost_millicents: 0,
                window_cost_limit_cents: None,
                window_requests: 0,
                window_resets_at: at,
                max_per_action_cents: None,
                approval_threshold_cents: None,
                rate_limits: vec![],
            };
            same(counter_reset(&c, window, &view, by.clone(), at), generic::counter_reset(&c, window, &view, by, at))?;
            let fields = SettlementFields { decision_record: 5, estimated_millicents: estimated, actual_millicents: actual, reason: &reason };
            let (mut typed, mut generic) = (settlement(&c, &fields, at), generic::settlement(&c, &fields, at));
            match spend {
                Some((delta_millicents, after_millicents)) => {
                    let s = SpendFields { window: "weekly", window_start: start, delta_millicents, after_millicents };
                    s.write(&mut typed);
                    generic::spend(&s, &mut generic);
                }
                None => {
                    typed.bool(field::WINDOW_CLOSED, true);
                    generic.insert("window_closed".into(), true.into());
                }
            }
            same(typed, generic)?;
        }
    }

    /// A cost past the largest amount counted is written null; a figure RFC 8785 cannot carry
    /// exactly (above 2^53 − 1) stops the record at sealing, as it did when records were
    /// `serde_json` objects.
    #[test]
    fn unrepresentable_amounts_are_null_or_refused() {
        let c = claims("agent-4", SpendWindow::Monthly);
        let request = ActionRequest {
            action: "llm:chat".into(),
            cost_millicents: u64::MAX,
            host: None,
            method: None,
            path: None,
        };
        let mut built = Built::block_unknown(&c.id, Utc::now());
        let record = sealed(decision(&c, &request, &built, None, Utc::now()));
        let record: Value = serde_json::from_slice(&record).unwrap();
        assert!(record[FIELD_COST].is_null(), "{record}");
        built.spend = Some(SpendFields {
            window: "monthly",
            window_start: Utc::now(),
            delta_millicents: 0,
            after_millicents: crate::ledger::canonical::MAX_SAFE_INTEGER + 1,
        });
        let body = decision(&c, &request, &built, None, Utc::now());
        let sealed = seal(Draft::new(c.id.to_string(), body), 0, None, "2026-01-01T00:00:00Z");
        assert!(matches!(sealed, Err(crate::ledger::record::DraftError::Canonical { .. })), "{sealed:?}");
    }
}
