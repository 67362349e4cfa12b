//! Holds: requests that wait for a human (docs/decisions.md, "Holds").
//!
//! A `request_hold` decision creates a pending hold in the same transaction as its record.
//! Approve, deny and timeout each resolve it in one transaction that writes the resolution record
//! (linked to the hold's record, naming the approver) and, for an approval, re-checks every limit
//! and moves the counters. Waiters (the proxy) are woken after the resolution is durable.

use super::records::{self, Built, DecisionOutcome};
use super::{now, Service, ServiceError};
use crate::decide::{self, ActionRequest, Decision, EvalOptions, HostVerdict, Reason, Usage};
use crate::domain::DomainName;
use crate::ledger::{Draft, Txn, TxnError};
use crate::passport::Claims;
use crate::service::Peer;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldStatus {
    Pending,
    Approved,
    Denied,
    TimedOut,
    Abandoned,
}

/// Who is waiting for the hold: a proxied request (gone if the daemon restarts) or an API caller
/// (passport-only mode, which asks again later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldOrigin {
    Proxy,
    Api,
}

/// The request a hold is about, as stored. The cost is millicents; a hold stored before sluice
/// counted millicents carries `cost_cents` instead and is read × 1000 (see [`StoredRequest`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(try_from = "StoredRequest")]
pub struct HeldRequest {
    pub action: String,
    pub cost_millicents: u64,
    pub host: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
}

/// A held request as either format stored it: exactly one of `cost_millicents` (now) and
/// `cost_cents` (before). Neither or both is an unreadable hold, never a free request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredRequest {
    action: String,
    #[serde(default)]
    cost_millicents: Option<u64>,
    #[serde(default)]
    cost_cents: Option<u64>,
    host: Option<String>,
    method: Option<String>,
    path: Option<String>,
}

impl TryFrom<StoredRequest> for HeldRequest {
    type Error = String;

    fn try_from(r: StoredRequest) -> Result<HeldRequest, String> {
        let cost_millicents = match (r.cost_millicents, r.cost_cents) {
            (Some(m), None) => m,
            (None, Some(c)) => crate::money::from_cents(c)
                .ok_or_else(|| format!("cost_cents {c} is too large to count in millicents"))?,
            _ => return Err("the request needs exactly one of cost_millicents and cost_cents".to_string()),
        };
        Ok(HeldRequest { action: r.action, cost_millicents, host: r.host, method: r.method, path: r.path })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hold {
    pub id: String,
    pub passport_id: String,
    pub agent_id: String,
    pub status: HoldStatus,
    pub origin: HoldOrigin,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub request: HeldRequest,
    /// Log index of the decision record that created the hold.
    pub record_index: u64,
    #[serde(default)]
    pub resolution: Option<Value>,
}

/// How a hold ended, for whoever waited on it (JSON at the edge: [`HoldOutcome::to_json`]).
#[derive(Debug, Clone)]
pub enum HoldOutcome {
    /// Resolved just now: the resolution's decision, recorded at `outcome.attestation_id`.
    Resolved { outcome: DecisionOutcome, hold_id: String, hold_status: HoldStatus },
    /// Found already resolved when the waiter looked (a race with the resolver): what the
    /// stored hold says. `attestation_id` is its resolution record, found on the passport's
    /// chain; `None` if it cannot be found, and then nothing may be forwarded on it.
    Found { decision: Decision, reason: Reason, hold_id: String, hold_status: HoldStatus, attestation_id: Option<u64> },
    /// The daemon stopped while the request was held: no resolution was recorded yet (the next
    /// start records it as `hold_abandoned`).
    Abandoned,
}

impl HoldOutcome {
    pub fn decision(&self) -> Decision {
        match self {
            HoldOutcome::Resolved { outcome, .. } => outcome.decision,
            HoldOutcome::Found { decision, .. } => *decision,
            HoldOutcome::Abandoned => Decision::Block,
        }
    }

    pub fn reason(&self) -> Reason {
        match self {
            HoldOutcome::Resolved { outcome, .. } => outcome.reason.clone(),
            HoldOutcome::Found { reason, .. } => reason.clone(),
            HoldOutcome::Abandoned => Reason::HoldAbandoned,
        }
    }

    /// The record of the resolution, when there is one.
    pub fn attestation_id(&self) -> Option<u64> {
        match self {
            HoldOutcome::Resolved { outcome, .. } => Some(outcome.attestation_id),
            HoldOutcome::Found { attestation_id, .. } => *attestation_id,
            HoldOutcome::Abandoned => None,
        }
    }

    /// The API's answer to approve/deny and the body of a proxied request's `403`.
    pub fn to_json(&self) -> Value {
        match self {
            HoldOutcome::Resolved { outcome, hold_id, hold_status } => {
                let mut json = outcome.to_json();
                json["hold_id"] = hold_id.clone().into();
                json["hold_status"] = serde_json::to_value(hold_status).unwrap_or(Value::Null);
                json
            }
            HoldOutcome::Found { decision, reason, hold_id, hold_status, .. } => {
                json!({"decision": decision.as_str(), "reason": reason, "hold_id": hold_id, "hold_status": hold_status})
            }
            HoldOutcome::Abandoned => json!({
                "decision": "block", "reason": Reason::HoldAbandoned,
                "detail": "The daemon stopped while the request was held.",
            }),
        }
    }
}

enum Resolution {
    Approve(Peer, Option<String>),
    Deny(Peer, Option<String>),
    Timeout,
    Abandon,
}

impl Hold {
    pub fn new(
        claims: &Claims,
        request: &ActionRequest,
        origin: HoldOrigin,
        at: DateTime<Utc>,
        timeout: Duration,
        record_index: u64,
    ) -> Hold {
        let id: [u8; 12] = rand::random();
        Hold {
            id: format!("hold_{}", crate::ledger::hex::encode(&id)),
            passport_id: claims.id.to_string(),
            agent_id: claims.agent_id.clone(),
            status: HoldStatus::Pending,
            origin,
            created_at: at,
            expires_at: at + chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::seconds(120)),
            request: HeldRequest {
                action: request.action.clone(),
                cost_millicents: request.cost_millicents,
                host: request.host.as_ref().map(|h| h.to_string()),
                method: request.method.clone(),
                path: request.path.clone(),
            },
            record_index,
            resolution: None,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    fn from_bytes(bytes: &[u8]) -> Result<Hold, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("stored hold is unreadable: {e}"))
    }

    fn action_request(&self) -> ActionRequest {
        ActionRequest {
            action: self.request.action.clone(),
            cost_millicents: self.request.cost_millicents,
            host: self.request.host.as_deref().and_then(|h| DomainName::parse(h).ok()),
            method: self.request.method.clone(),
            path: self.request.path.clone(),
        }
    }

    /// The API's view. The request's cost is given exactly (`cost_millicents`) and in whole
    /// cents rounded up (`cost_cents`).
    fn view(&self) -> Value {
        let r = &self.request;
        let request = json!({
            "action": r.action, "host": r.host, "method": r.method, "path": r.path,
            "cost_cents": crate::money::cents_up(r.cost_millicents), "cost_millicents": r.cost_millicents,
        });
        json!({
            "id": self.id, "passport_id": self.passport_id, "agent_id": self.agent_id,
            "status": self.status, "origin": self.origin,
            "created_at": records::time(self.created_at), "expires_at": records::time(self.expires_at),
            "request": request, "attestation_id": self.record_index, "resolution": self.resolution,
        })
    }
}

impl Service {
    /// `GET /v1/holds`: pending holds, oldest first.
    pub fn holds(&self) -> Result<Value, ServiceError> {
        let mut holds: Vec<Hold> = self
            .ledger
            .state_scan("hold/")?
            .into_iter()
            .filter_map(|(_, b)| Hold::from_bytes(&b).ok())
            .filter(|h| h.status == HoldStatus::Pending)
            .collect();
        holds.sort_by_key(|h| h.created_at);
        Ok(json!({"holds": holds.iter().map(Hold::view).collect::<Vec<_>>()}))
    }

    /// `GET /v1/holds/{id}`: one hold, in any state.
    pub fn hold(&self, id: &str) -> Result<Value, ServiceError> {
        self.load_hold(id).map(|h| h.view())
    }

    fn load_hold(&self, id: &str) -> Result<Hold, ServiceError> {
        let bytes =
            self.ledger.state_get(&format!("hold/{id}"))?.ok_or_else(|| ServiceError::HoldNotFound(id.to_string()))?;
        Hold::from_bytes(&bytes).map_err(ServiceError::HoldUnreadable)
    }

    /// Approves or denies a pending hold on behalf of `peer`.
    pub async fn resolve_hold(
        &self,
        id: &str,
        approve: bool,
        peer: &Peer,
        note: Option<String>,
    ) -> Result<HoldOutcome, ServiceError> {
        if note.as_ref().is_some_and(|n| n.len() > 1024) {
            return Err(ServiceError::Invalid { field: "note", problem: "note is longer than 1024 characters".into() });
        }
        let how = if approve { Resolution::Approve(peer.clone(), note) } else { Resolution::Deny(peer.clone(), note) };
        self.resolve(id, how).await
    }

    /// Waits until the hold is resolved (by a human, or by its timeout).
    pub async fn wait_hold(&self, id: &str) -> HoldOutcome {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.entry(id.to_string()).or_default().push(tx);
        }
        // The hold may have been resolved before we registered: look once more.
        if let Ok(h) = self.load_hold(id) {
            if h.status != HoldStatus::Pending {
                if let Ok(mut w) = self.waiters.lock() {
                    w.remove(id);
                }
                return self.outcome_of_resolved(&h);
            }
        }
        rx.await.unwrap_or(HoldOutcome::Abandoned)
    }

    pub(super) fn schedule_hold_timeout(&self, id: String, expires_at: DateTime<Utc>) {
        let Some(service) = self.self_arc() else { return };
        let wait = (expires_at - now()).to_std().unwrap_or(Duration::ZERO);
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            match service.resolve(&id, Resolution::Timeout).await {
                Ok(_) | Err(ServiceError::HoldAlreadyResolved { .. }) => {}
                Err(e) => tracing::error!(hold_id = %id, error = %e, "could not time out a hold"),
            }
        });
    }

    /// At start: proxy holds are abandoned (their requests are gone); API holds keep waiting.
    pub(super) async fn recover_holds(self: &Arc<Self>) -> Result<(), ServiceError> {
        for (_, bytes) in self.ledger.state_scan("hold/")? {
            let Ok(hold) = Hold::from_bytes(&bytes) else { continue };
            if hold.status != HoldStatus::Pending {
                continue;
            }
            match hold.origin {
                HoldOrigin::Proxy => {
                    self.resolve(&hold.id, Resolution::Abandon).await?;
                }
                HoldOrigin::Api => self.schedule_hold_timeout(hold.id.clone(), hold.expires_at),
            }
        }
        Ok(())
    }

    async fn resolve(&self, id: &str, how: Resolution) -> Result<HoldOutcome, ServiceError> {
        let hold = self.load_hold(id)?;
        let cp = self.passport(&hold.passport_id);
        let revoked = self.is_revoked(&hold.passport_id);
        let (digest, host_rules) = self.policy_snapshot();
        let key = format!("hold/{id}");
        let (outcome, appended) = self
            .transact(move |txn: &mut Txn<'_>| {
                let at = now();
                let mut hold = match txn.get(&key)? {
                    Some(b) => Hold::from_bytes(&b).map_err(TxnError::abort)?,
                    None => return Err(TxnError::abort(format!("hold {key} vanished"))),
                };
                if hold.status != HoldStatus::Pending {
                    return Err(ServiceError::HoldAlreadyResolved { id: hold.id, status: hold.status }.abort());
                }
                let Some(cp) = cp else {
                    return Err(TxnError::abort(format!(
                        "passport {} of hold {} is not loaded",
                        hold.passport_id, hold.id
                    )));
                };
                let claims = &cp.passport.claims;
                let request = hold.action_request();
                // An approval that arrives after the deadline is a timeout.
                let how = match how {
                    Resolution::Approve(..) if at >= hold.expires_at => Resolution::Timeout,
                    other => other,
                };
                let (built, status, by, note) = match how {
                    Resolution::Approve(peer, note) => {
                        let built = approve_in_txn(txn, &cp, &request, revoked, at, host_rules)?;
                        let status =
                            if built.decision == Decision::Allow { HoldStatus::Approved } else { HoldStatus::Denied };
                        (built, status, peer.to_json(), note)
                    }
                    Resolution::Deny(peer, note) => {
                        let detail = format!(
                            "A human denied this request ({}).",
                            peer.user.as_deref().unwrap_or("unknown user")
                        );
                        (block(claims, Reason::HoldDenied, detail, at), HoldStatus::Denied, peer.to_json(), note)
                    }
                    Resolution::Timeout => {
                        let detail = "Nobody approved this request before its hold expired.".to_string();
                        (block(claims, Reason::HoldTimeout, detail, at), HoldStatus::TimedOut, json!("timeout"), None)
                    }
                    Resolution::Abandon => {
                        let detail =
                            "The daemon restarted while this request was held; the request is gone.".to_string();
                        (
                            block(claims, Reason::HoldAbandoned, detail, at),
                            HoldStatus::Abandoned,
                            json!("daemon_restart"),
                            None,
                        )
                    }
                };
                let body = records::hold_resolution(
                    claims,
                    &hold,
                    &request,
                    &built,
                    by.clone(),
                    note.clone(),
                    digest.as_deref(),
                    at,
                );
                hold.status = status;
                hold.resolution =
                    Some(json!({"at": records::time(at), "by": by, "note": note, "reason": built.reason}));
                txn.put(&key, &hold.to_bytes())?;
                Ok(((built, hold), vec![Draft::new(claims.id.to_string(), body)]))
            })
            .await?;
        let (built, hold) = outcome;
        let index = super::appended_index(&appended, "hold resolution")?;
        let outcome =
            HoldOutcome::Resolved { outcome: built.outcome(index), hold_id: hold.id.clone(), hold_status: hold.status };
        // A resolution is the held request's final decision: counted and logged as one.
        crate::metrics::global().decision(built.decision.as_str(), built.reason.as_str());
        tracing::info!(
            hold_id = %hold.id, passport_id = %hold.passport_id, status = ?hold.status,
            decision = %built.decision.as_str(), reason = %built.reason, attestation_id = index, "hold resolved"
        );
        let waiters = self.waiters.lock().ok().and_then(|mut w| w.remove(&hold.id)).unwrap_or_default();
        for w in waiters {
            let _ = w.send(outcome.clone());
        }
        Ok(outcome)
    }
}

fn block(claims: &Claims, reason: Reason, detail: String, at: DateTime<Utc>) -> Built {
    Built {
        passport_id: claims.id.to_string(),
        decision: Decision::Block,
        guardrails: records::failed("approval", &reason),
        reason,
        detail,
        all_passed: false,
        timestamp: at,
        spend: None,
        hold: None,
    }
}

/// An approval re-checks every limit (but not the approval step itself) and spends on success.
fn approve_in_txn(
    txn: &mut Txn<'_>,
    cp: &decide::CompiledPassport,
    request: &ActionRequest,
    revoked: bool,
    at: DateTime<Utc>,
    host_rules: Option<std::sync::Arc<decide::CompiledRules>>,
) -> Result<Built, TxnError> {
    let claims = &cp.passport.claims;
    let id = claims.id.to_string();
    if revoked || txn.get(&format!("revoked/{id}"))?.is_some() {
        return Ok(Built::revoked(claims, at));
    }
    let usage_key = format!("usage/{id}");
    let usage = match txn.get(&usage_key)? {
        None => Usage::default(),
        Some(b) => match Usage::from_bytes(&b) {
            Ok(u) => u,
            Err(e) => return Ok(Built::state_error(claims, &e.to_string(), at)),
        },
    };
    let eval =
        decide::evaluate(cp, &usage, request, &HostVerdict::Allow, at, EvalOptions { skip_approval: true, host_rules });
    let mut built = Built::from_eval(&eval, claims, at);
    if eval.decision == Decision::Allow {
        built.reason = Reason::HoldApproved;
        txn.put(&usage_key, &eval.usage_after.to_bytes())?;
    }
    Ok(built)
}

impl Service {
    /// A hold found resolved: its decision and reason from the stored hold, and its resolution
    /// record from the passport's chain (newest first, back to the hold's own decision).
    fn outcome_of_resolved(&self, h: &Hold) -> HoldOutcome {
        let reason = h
            .resolution
            .as_ref()
            .and_then(|r| r.get("reason"))
            .and_then(Value::as_str)
            // A stored string this version does not know is kept as it is (`Reason::parse`).
            .map_or(Reason::HoldResolved, Reason::parse);
        let decision = if h.status == HoldStatus::Approved { Decision::Allow } else { Decision::Block };
        let attestation_id = self.resolution_record(h).unwrap_or_else(|e| {
            tracing::error!(hold_id = %h.id, error = %e, "cannot find the hold's resolution record");
            None
        });
        HoldOutcome::Found { decision, reason, hold_id: h.id.clone(), hold_status: h.status, attestation_id }
    }

    fn resolution_record(&self, h: &Hold) -> Result<Option<u64>, ServiceError> {
        let snap = self.ledger.snapshot()?;
        for index in snap.chain_indices(&h.passport_id)?.into_iter().rev() {
            if index <= h.record_index {
                break;
            }
            let Some(bytes) = snap.record(index)? else { continue };
            let Ok(record) = serde_json::from_slice::<Value>(&bytes) else { continue };
            if record.get(crate::ledger::record::FIELD_KIND).and_then(Value::as_str)
                == Some(records::kind::HOLD_RESOLUTION)
                && record.get(records::field::HOLD_ID).and_then(Value::as_str) == Some(h.id.as_str())
            {
                return Ok(Some(index));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> Peer {
        Peer { uid: 0, gid: 0, pid: 1, user: Some("root".into()) }
    }

    /// A proxied request held for approval: the fixture and the outcome of its decision.
    async fn held() -> (super::super::settle::testkit::Fixture, DecisionOutcome) {
        use crate::passport::Constraints;
        let constraints = Constraints { approval_required: Some(true), ..Constraints::default() };
        let f = super::super::settle::testkit::fixture_with(constraints).await;
        let input = super::super::EnforceInput {
            passport_id: f.passport.clone(),
            action: "llm:chat".into(),
            cost_millicents: Some(1_000),
            ..Default::default()
        };
        let o = f.service.enforce_outcome(input, HoldOrigin::Proxy, HostVerdict::Allow).await.expect("enforce");
        assert_eq!((o.decision, o.reason.as_str()), (Decision::RequestHold, "approval_required"));
        (f, o)
    }

    #[tokio::test]
    async fn an_approval_cites_its_own_record_typed_and_in_json() {
        let (f, o) = held().await;
        let id = o.hold_id().expect("hold id").to_string();
        let r = f.service.resolve_hold(&id, true, &root(), None).await.expect("approve");
        assert_eq!((r.decision(), r.reason().as_str()), (Decision::Allow, "hold_approved"));
        let at = r.attestation_id().expect("resolution record");
        assert!(at > o.attestation_id, "the resolution, not the hold's decision: {at} vs {}", o.attestation_id);
        let json = r.to_json();
        assert_eq!(json["attestation_id"], at);
        assert_eq!((json["hold_id"].as_str(), json["hold_status"].as_str()), (Some(id.as_str()), Some("approved")));
        let record: Value =
            serde_json::from_slice(&f.service.ledger().record(at).expect("read").expect("exists")).expect("json");
        assert_eq!((record["kind"].as_str(), record["hold_id"].as_str()), (Some("hold_resolution"), Some(id.as_str())));
    }

    /// A waiter that finds the hold already resolved (it raced the approver) is told the
    /// resolution's record, found on the chain: never the hold's own `request_hold` record,
    /// which the proxy used to cite (and settle against) when the JSON had no id.
    #[tokio::test]
    async fn a_hold_found_resolved_cites_its_resolution_record() {
        let (f, o) = held().await;
        let id = o.hold_id().expect("hold id").to_string();
        let resolved = f.service.resolve_hold(&id, true, &root(), None).await.expect("approve");
        // Records after the resolution must not be mistaken for it.
        f.service.record_host_event("test_event", json!({})).await.expect("host event");
        let found = f.service.wait_hold(&id).await;
        assert!(matches!(found, HoldOutcome::Found { .. }), "{found:?}");
        assert_eq!(found.decision(), Decision::Allow);
        assert_eq!(found.attestation_id(), resolved.attestation_id());
        assert_eq!(found.to_json()["reason"], "hold_approved");
        // A denied hold is found as a block, with its reason.
        let (f, o) = held().await;
        let id = o.hold_id().expect("hold id").to_string();
        f.service.resolve_hold(&id, false, &root(), Some("no".into())).await.expect("deny");
        let found = f.service.wait_hold(&id).await;
        assert_eq!((found.decision(), found.reason().as_str()), (Decision::Block, "hold_denied"));
        assert!(found.attestation_id().is_some_and(|a| a > o.attestation_id));
    }

    #[test]
    fn a_stored_resolution_reason_this_version_does_not_know_is_kept() {
        let r = Reason::parse("some_future_reason");
        assert_eq!(
            HoldOutcome::Found {
                decision: Decision::Block,
                reason: r.clone(),
                hold_id: "hold_1".into(),
                hold_status: HoldStatus::Denied,
                attestation_id: None,
            }
            .to_json()["reason"],
            "some_future_reason"
        );
        assert_eq!(HoldOutcome::Abandoned.attestation_id(), None);
        assert_eq!(HoldOutcome::Abandoned.to_json()["reason"], "hold_abandoned");
    }

    fn hold_with(request: Value) -> Result<Hold, String> {
        let stored = json!({
            "id": "hold_1", "passport_id": "pp_x", "agent_id": "a", "status": "pending", "origin": "api",
            "created_at": "2026-05-01T00:00:00Z", "expires_at": "2026-05-01T00:02:00Z",
            "request": request, "record_index": 3, "resolution": null,
        });
        Hold::from_bytes(stored.to_string().as_bytes())
    }

    #[test]
    fn held_costs_are_millicents_and_old_holds_in_cents_are_read_exactly() {
        let base = |cost: (&str, u64)| json!({"action": "llm:chat", cost.0: cost.1, "host": null, "method": null, "path": null});
        let new = hold_with(base(("cost_millicents", 5))).expect("current format");
        assert_eq!(new.request.cost_millicents, 5);
        assert_eq!(new.action_request().cost_millicents, 5);
        // Written back, it is the current format.
        let back: Value = serde_json::from_slice(&new.to_bytes()).expect("json");
        assert_eq!(back["request"]["cost_millicents"], 5);
        assert!(back["request"].get("cost_cents").is_none(), "{back}");
        // A hold stored before millicents: cents × 1000.
        let old = hold_with(base(("cost_cents", 400))).expect("previous format");
        assert_eq!(old.request.cost_millicents, 400_000);
        // The API view gives both, cents rounded up.
        let view = new.view();
        assert_eq!(
            (view["request"]["cost_cents"].as_u64(), view["request"]["cost_millicents"].as_u64()),
            (Some(1), Some(5))
        );
    }

    #[test]
    fn a_hold_without_exactly_one_cost_is_unreadable_never_free() {
        let none = json!({"action": "llm:chat", "host": null, "method": null, "path": null});
        let both = json!({"action": "llm:chat", "cost_cents": 1, "cost_millicents": 1000, "host": null, "method": null, "path": null});
        let huge = json!({"action": "llm:chat", "cost_cents": u64::MAX, "host": null, "method": null, "path": null});
        let extra =
            json!({"action": "llm:chat", "cost_millicents": 1, "host": null, "method": null, "path": null, "x": 1});
        for (request, needle) in
            [(none, "exactly one"), (both, "exactly one"), (huge, "too large"), (extra, "unknown field")]
        {
            let e = hold_with(request.clone()).unwrap_err();
            assert!(e.contains(needle), "{request}: {e}");
        }
    }
}
