//! The bodies of attestation records and of decision responses (docs/records.md, docs/decisions.md).
//!
//! One place builds them so that what the caller is told and what the log says cannot drift apart:
//! both come from the same [`Built`].
//!
//! Records are format version 2 ([`RECORD_VERSION`]): money is integer millicents in the
//! `*_millicents` fields named in [`crate::ledger::record`], which the verifier reads with the
//! same constants.

use super::held::Hold;
use crate::decide::{self, ActionRequest, Decision, Guardrail, Reason, ResetWindow, StateView};
use crate::ledger::record::{
    FIELD_COST, FIELD_KIND, FIELD_SPEND_AFTER, FIELD_SPEND_DELTA, FIELD_SPEND_WINDOW, FIELD_SPEND_WINDOW_START,
    FIELD_TIME, FIELD_VERSION, FIELD_WINDOW, KIND_COUNTER_RESET, RECORD_VERSION,
};
use crate::passport::{Claims, PassportId};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};
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
    pub const HOLD_ID: &str = "hold_id";
    pub const HOLD_EXPIRES_AT: &str = "hold_expires_at";
    pub const HOLD_RECORD: &str = "hold_record";
    pub const DECISION_RECORD: &str = "decision_record";
    pub const BY: &str = "by";
    pub const NOTE: &str = "note";
}

/// Record kinds (`kind`) the daemon writes and reads back.
pub mod kind {
    pub const DECISION: &str = "decision";
    pub const HOLD_RESOLUTION: &str = "hold_resolution";
    pub const SETTLEMENT: &str = "settlement";
    pub const PASSPORT_REGISTERED: &str = "passport_registered";
    pub const REVOCATION: &str = "revocation";
    /// A reset of counters other than the spend window's (the verifier's sum goes on).
    pub const COUNTER_RESET_PARTIAL: &str = "counter_reset_partial";
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::ledger::hex::encode(&Sha256::digest(bytes))
}

pub fn time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The fields every record has: kind, time, and (for passport records) who it concerns.
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
    pub(super) fn write(&self, m: &mut Map<String, Value>) {
        m.insert(FIELD_SPEND_WINDOW.into(), self.window.into());
        m.insert(FIELD_SPEND_WINDOW_START.into(), time(self.window_start).into());
        m.insert(FIELD_SPEND_DELTA.into(), self.delta_millicents.into());
        m.insert(FIELD_SPEND_AFTER.into(), self.after_millicents.into());
    }
}

/// A decision as it will be answered and recorded.
#[derive(Debug, Clone)]
pub struct Built {
    pub passport_id: String,
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
pub(super) fn failed(name: &str, reason: &Reason) -> Vec<Guardrail> {
    vec![Guardrail { name: name.to_string(), passed: false, detail: reason.to_string() }]
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

    /// The decision JSON (docs/decisions.md, "The decision JSON").
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "decision": self.decision.as_str(),
            "reason": self.reason,
            "detail": self.detail,
            "attestation_id": self.attestation_id,
            "passport_id": self.passport_id,
            "guardrails_evaluated": self.guardrails,
            "all_passed": self.all_passed,
            "timestamp": time(self.timestamp),
        });
        if let Some(h) = &self.hold {
            v["approval_request_id"] = h.id.clone().into();
            v["approval_expires_at"] = time(h.expires_at).into();
        }
        v
    }
}

impl Built {
    fn block(passport_id: &str, reason: Reason, detail: String, at: DateTime<Utc>) -> Built {
        Built {
            passport_id: passport_id.to_string(),
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
            id.as_str(),
            Reason::PassportUnknown,
            format!("Passport {id} is not registered with this daemon. Register it with `sluice passport register`."),
            at,
        )
    }

    pub fn revoked(claims: &Claims, at: DateTime<Utc>) -> Built {
        Built::block(
            claims.id.as_str(),
            Reason::PassportRevoked,
            format!("Passport {} was revoked. Issue the agent a new passport.", claims.id),
            at,
        )
    }

    pub fn state_error(claims: &Claims, error: &str, at: DateTime<Utc>) -> Built {
        Built::block(
            claims.id.as_str(),
            Reason::StateError,
            format!(
                "The counters of passport {} cannot be read ({error}); refusing until an operator repairs them.",
                claims.id
            ),
            at,
        )
    }

    pub fn from_eval(eval: &decide::Evaluation, claims: &Claims, at: DateTime<Utc>) -> Built {
        Built {
            passport_id: claims.id.to_string(),
            decision: eval.decision,
            reason: eval.reason.clone(),
            detail: eval.detail.clone(),
            guardrails: eval.guardrails.clone(),
            all_passed: eval.guardrails.iter().all(|g| g.passed),
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

    /// The outcome the caller is told, once the record is in the log at `attestation_id`.
    pub fn outcome(&self, attestation_id: u64) -> DecisionOutcome {
        DecisionOutcome {
            decision: self.decision,
            reason: self.reason.clone(),
            detail: self.detail.clone(),
            passport_id: self.passport_id.clone(),
            guardrails: self.guardrails.clone(),
            all_passed: self.all_passed,
            timestamp: self.timestamp,
            attestation_id,
            hold: self.hold.as_ref().map(|h| HeldAs { id: h.id.clone(), expires_at: h.expires_at }),
        }
    }
}

fn request_fields(m: &mut Map<String, Value>, request: &ActionRequest) {
    m.insert(field::ACTION.into(), request.action.clone().into());
    m.insert(field::METHOD.into(), request.method.clone().into());
    m.insert(field::HOST.into(), request.host.as_ref().map(|h| h.to_string()).into());
    m.insert(field::PATH_DIGEST.into(), request.path.as_ref().map(|p| sha256_hex(p.as_bytes())).into());
    // A cost past the largest amount sluice counts was refused (invalid_request) and cannot be
    // written exactly: the record says null, the detail names the amount.
    let cost = Some(request.cost_millicents).filter(|c| *c <= crate::money::MAX_MILLICENTS);
    m.insert(FIELD_COST.into(), cost.into());
    // The request hash's own input, not record fields: its keys are part of the hash's format.
    let canonical = json!({
        "action": request.action, FIELD_COST: request.cost_millicents,
        "host": request.host.as_ref().map(|h| h.to_string()), "method": request.method, "path": request.path,
    });
    m.insert(field::REQUEST_HASH.into(), sha256_hex(canonical.to_string().as_bytes()).into());
}

/// A decision record.
/// `policy_digest` is the digest of the host policy in force (null when the daemon has none).
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
        s.write(&mut m);
    }
    if let Some(h) = &built.hold {
        m.insert(field::HOLD_ID.into(), h.id.clone().into());
        m.insert(field::HOLD_EXPIRES_AT.into(), time(h.expires_at).into());
    }
    m
}

/// A decision for a passport id this daemon does not know: recorded on that id's chain.
pub fn unknown_passport(id: &PassportId, request: &ActionRequest, at: DateTime<Utc>) -> Map<String, Value> {
    let mut m = base(kind::DECISION, None, at);
    m.insert(field::PASSPORT_ID.into(), id.as_str().into());
    m.insert(field::DECISION.into(), "block".into());
    m.insert(field::REASON.into(), Reason::PassportUnknown.into());
    request_fields(&mut m, request);
    m
}

/// A counter reset, with who asked. A reset that clears the passport's spend window (or `all`)
/// is a `counter_reset` and the verifier starts its spend sum again from zero; a reset of other
/// counters only (the daily figures of a monthly passport, say) is a `counter_reset_partial`
/// and leaves the spend sum alone.
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
        s.write(&mut m);
    }
    m
}
