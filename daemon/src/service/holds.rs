//! Holds: requests that wait for a human (docs/decisions.md, "Holds").
//!
//! A `request_hold` decision creates a pending hold in the same transaction as its record.
//! Approve, deny and timeout each resolve it in one transaction that writes the resolution record
//! (linked to the hold's record, naming the approver) and, for an approval, re-checks every limit
//! and the host policy in force at approval ([`host_verdict_at_approval`]), then moves the
//! counters. Waiters (the proxy) are woken after the resolution is durable.

use super::drafts::{self, Built, DecisionOutcome};
use super::held::{Hold, HoldOrigin, HoldResolution, HoldStatus};
use super::peer::{Actor, Peer};
use super::{now, Service, ServiceError};
use crate::decide::{self, Decision, EvalOptions, HostVerdict, Reason};
use crate::domain::DomainName;
use crate::ledger::{Draft, Txn, TxnError};
use crate::passport::Claims;
use crate::policy::PolicySet;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

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

pub(super) enum Resolution {
    /// Moves the counters: evaluated in the passport's lane.
    Approve(Peer, Option<String>),
    /// Moves nothing but the hold.
    End(Ending),
}

pub(super) enum Ending {
    Deny(Peer, Option<String>),
    /// An emergency stop of the hold's passport (who stopped it, their note).
    Stop(Peer, Option<String>),
    Timeout,
    Abandon,
}

/// `GET /v1/holds/{id}`: one hold as the API shows it (JSON at the edge). The request's cost is
/// given exactly (`cost_millicents`) and in whole cents rounded up (`cost_cents`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HoldView {
    pub id: String,
    pub passport_id: String,
    pub agent_id: String,
    pub status: HoldStatus,
    pub origin: HoldOrigin,
    pub created_at: String,
    pub expires_at: String,
    pub request: HeldRequestView,
    /// The log index of the decision that created the hold.
    pub attestation_id: u64,
    pub resolution: Option<HoldResolution>,
}

/// The held request in a [`HoldView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeldRequestView {
    pub action: String,
    pub host: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub cost_cents: u64,
    pub cost_millicents: u64,
}

/// `GET /v1/holds`: the pending holds, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HoldList {
    pub holds: Vec<HoldView>,
}

impl HoldView {
    fn of(h: &Hold) -> HoldView {
        let r = &h.request;
        HoldView {
            id: h.id.clone(),
            passport_id: h.passport_id.clone(),
            agent_id: h.agent_id.clone(),
            status: h.status,
            origin: h.origin,
            created_at: drafts::time(h.created_at),
            expires_at: drafts::time(h.expires_at),
            request: HeldRequestView {
                action: r.action.clone(),
                host: r.host.clone(),
                method: r.method.clone(),
                path: r.path.clone(),
                cost_cents: crate::money::cents_up(r.cost_millicents),
                cost_millicents: r.cost_millicents,
            },
            attestation_id: h.record_index,
            resolution: h.resolution.clone(),
        }
    }
}

json_at_the_edge!(HoldView, HoldList);

impl Service {
    /// `GET /v1/holds`: pending holds, oldest first.
    pub fn holds(&self) -> Result<HoldList, ServiceError> {
        let mut holds: Vec<Hold> = self
            .ledger
            .state_scan("hold/")?
            .into_iter()
            .filter_map(|(_, b)| Hold::from_bytes(&b).ok())
            .filter(|h| h.status == HoldStatus::Pending)
            .collect();
        holds.sort_by_key(|h| h.created_at);
        Ok(HoldList { holds: holds.iter().map(HoldView::of).collect() })
    }

    /// `GET /v1/holds/{id}`: one hold, in any state.
    pub fn hold(&self, id: &str) -> Result<HoldView, ServiceError> {
        self.load_hold(id).map(|h| HoldView::of(&h))
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
        let how = if approve {
            Resolution::Approve(peer.clone(), note)
        } else {
            Resolution::End(Ending::Deny(peer.clone(), note))
        };
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
            match service.resolve(&id, Resolution::End(Ending::Timeout)).await {
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
                    self.resolve(&hold.id, Resolution::End(Ending::Abandon)).await?;
                }
                HoldOrigin::Api => self.schedule_hold_timeout(hold.id.clone(), hold.expires_at),
            }
        }
        Ok(())
    }

    pub(super) async fn resolve(&self, id: &str, how: Resolution) -> Result<HoldOutcome, ServiceError> {
        let hold = self.load_hold(id)?;
        let Some(cp) = self.passport(&hold.passport_id) else {
            return Err(ServiceError::Store(crate::ledger::LedgerError::Txn(TxnError::abort(format!(
                "passport {} of hold {} is not loaded",
                hold.passport_id, hold.id
            )))));
        };
        // One read of the policy in force: the approval's host verdict, its CEL host rules and
        // the digest its record names all come from it, even across a concurrent reload.
        let policy = self.policy_set();
        let digest = policy.as_ref().map(|p| p.digest());
        // An approval that arrives after the deadline is a timeout.
        let how = match how {
            Resolution::Approve(..) if now() >= hold.expires_at => Resolution::End(Ending::Timeout),
            other => other,
        };
        let key = format!("hold/{id}");
        let (outcome, appended) = match how {
            Resolution::Approve(peer, note) => {
                // Evaluated like a decision, in the passport's lane: it moves the counters.
                let blocking = super::lanes::needs_blocking_thread(
                    &cp,
                    policy.as_ref().and_then(|p| p.compiled_host_rules()).as_deref(),
                );
                let approval = Arc::new(Approval { cp: cp.clone(), hold: hold.clone(), policy });
                let (a, c) = (approval.clone(), cp.clone());
                let barred_now = {
                    let (me, pid) = (self.me.clone(), hold.passport_id.clone());
                    move || me.upgrade().map_or(Some(super::lanes::Barred::Revoked), |s| s.barred(&pid))
                };
                self.in_lane(
                    &hold.passport_id,
                    blocking,
                    move |counters, at| a.evaluate(counters, barred_now(), at),
                    move |barred, (built, at): (Built, DateTime<Utc>), txn| {
                        let claims = &c.passport.claims;
                        let built = match barred {
                            Some(b) => super::barred_block(claims, b, at),
                            None => built,
                        };
                        let status =
                            if built.decision == Decision::Allow { HoldStatus::Approved } else { HoldStatus::Denied };
                        let end = End { built, status, by: peer.actor(), note: note.clone() };
                        finish(txn, &key, claims, end, digest.as_deref(), at)
                    },
                )
                .await?
            }
            Resolution::End(how) => {
                self.transact(move |txn: &mut Txn<'_>| {
                    let at = now();
                    let claims = &cp.passport.claims;
                    let end = match how {
                        Ending::Deny(peer, note) => {
                            let detail = format!(
                                "A human denied this request ({}).",
                                peer.user.as_deref().unwrap_or("unknown user")
                            );
                            End {
                                built: block(Reason::HoldDenied, detail, at),
                                status: HoldStatus::Denied,
                                by: peer.actor(),
                                note,
                            }
                        }
                        Ending::Stop(peer, note) => End {
                            built: block(
                                Reason::EmergencyStop,
                                format!(
                                    "An operator stopped this passport (emergency stop, by {}); the held request is refused.",
                                    peer.user.as_deref().unwrap_or("unknown user")
                                ),
                                at,
                            ),
                            status: HoldStatus::Denied,
                            by: peer.actor(),
                            note,
                        },
                        Ending::Timeout => End {
                            built: block(
                                Reason::HoldTimeout,
                                "Nobody approved this request before its hold expired.".to_string(),
                                at,
                            ),
                            status: HoldStatus::TimedOut,
                            by: Actor::Daemon("timeout".into()),
                            note: None,
                        },
                        Ending::Abandon => End {
                            built: block(
                                Reason::HoldAbandoned,
                                "The daemon restarted while this request was held; the request is gone.".to_string(),
                                at,
                            ),
                            status: HoldStatus::Abandoned,
                            by: Actor::Daemon("daemon_restart".into()),
                            note: None,
                        },
                    };
                    finish(txn, &key, claims, end, digest.as_deref(), at)
                })
                .await?
            }
        };
        let (built, hold) = outcome;
        let index = super::appended_index(&appended, "hold resolution")?;
        let outcome = HoldOutcome::Resolved {
            outcome: built.outcome(&hold.passport_id, index),
            hold_id: hold.id.clone(),
            hold_status: hold.status,
        };
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

fn block(reason: Reason, detail: String, at: DateTime<Utc>) -> Built {
    Built {
        decision: Decision::Block,
        guardrails: drafts::failed("approval", &reason),
        reason,
        detail,
        all_passed: false,
        timestamp: at,
        spend: None,
        hold: None,
    }
}

/// How a hold ends: its resolution's decision and who ended it.
struct End {
    built: Built,
    status: HoldStatus,
    by: Actor,
    note: Option<String>,
}

/// In the writer: the hold must still be pending; records its resolution and stores it resolved.
fn finish(
    txn: &mut Txn<'_>,
    key: &str,
    claims: &Claims,
    end: End,
    digest: Option<&str>,
    at: DateTime<Utc>,
) -> Result<((Built, Hold), Vec<Draft>), TxnError> {
    let mut hold = match txn.get(key)? {
        Some(b) => Hold::from_bytes(&b).map_err(TxnError::abort)?,
        None => return Err(TxnError::abort(format!("hold {key} vanished"))),
    };
    if hold.status != HoldStatus::Pending {
        return Err(ServiceError::HoldAlreadyResolved { id: hold.id, status: hold.status }.abort());
    }
    let request = hold.action_request();
    let End { built, status, by, note } = end;
    let body = drafts::hold_resolution(claims, &hold, &request, &built, by.to_json(), note.clone(), digest, at);
    hold.status = status;
    hold.resolution = Some(HoldResolution { at: drafts::time(at), by, note, reason: built.reason.clone() });
    txn.put(key, &hold.to_bytes())?;
    Ok(((built, hold), vec![Draft::new(claims.id.to_string(), body)]))
}

/// An approval re-checks everything the decision checked (but not the approval step itself)
/// against the counters and the host policy in force now, and spends on success: revocation, the
/// counters, the passport's constraints and CEL rules, and the host policy's verdict
/// ([`host_verdict_at_approval`]) with its CEL host rules. Evaluated in the passport's lane,
/// outside the writer, like a decision.
struct Approval {
    cp: Arc<decide::CompiledPassport>,
    hold: Hold,
    policy: Option<Arc<PolicySet>>,
}

impl Approval {
    fn evaluate(
        &self,
        counters: Option<&super::lanes::Counters>,
        barred: Option<super::lanes::Barred>,
        at: DateTime<Utc>,
    ) -> super::lanes::Speculation<(Built, DateTime<Utc>)> {
        let claims = &self.cp.passport.claims;
        let plan = |built: Built| super::lanes::Speculation { writes: None, plan: (built, at) };
        if let Some(barred) = barred {
            return plan(super::barred_block(claims, barred, at));
        }
        let usage = match super::lanes::usage_of(counters) {
            Ok(u) => u,
            Err(e) => return plan(Built::state_error(claims, &e.to_string(), at)),
        };
        let policy = self.policy.as_deref();
        let verdict = host_verdict_at_approval(policy, &self.hold);
        let host_rules = policy.and_then(PolicySet::compiled_host_rules);
        let request = self.hold.action_request();
        let eval =
            decide::evaluate(&self.cp, &usage, &request, &verdict, at, EvalOptions { skip_approval: true, host_rules });
        let writes = (eval.decision == Decision::Allow).then(|| eval.usage_after.clone());
        let mut built = Built::from_eval(eval, claims, at);
        if writes.is_some() {
            built.reason = Reason::HoldApproved;
        }
        super::lanes::Speculation { writes, plan: (built, at) }
    }
}

/// The host policy's verdict on a held request under `policy`, the policy in force at approval:
/// the checks its decision passed, made again, so that a reload that tightened the policy while
/// the request waited refuses it (attested as a block with the policy's reason).
///
/// * A proxied raw TCP connection or CONNECT tunnel: a `[[raw_tcp]]` rule must still allow the
///   name and port, with the action and cost that were held.
/// * A proxied HTTP request: its route must still give the action that was held and, for a
///   fixed price, the cost (a metered estimate stands: the body it was read from is gone).
/// * Every request: the host-wide checks (denied domains, per-action ceilings), as at decision
///   time: for its host, or the ceilings alone for an API request without a target.
///
/// No policy (a daemon run without one): `Allow`, as at decision time.
pub(super) fn host_verdict_at_approval(policy: Option<&PolicySet>, hold: &Hold) -> HostVerdict {
    let Some(policy) = policy else { return HostVerdict::Allow };
    let r = &hold.request;
    let cost = r.cost_millicents;
    let deny = |reason: Reason, detail: String| HostVerdict::Deny {
        reason,
        detail: format!("Checked again at approval against the host policy in force now: {detail}"),
    };
    let host = match r.host.as_deref().map(DomainName::parse) {
        None => return policy.ceiling_check(cost),
        Some(Ok(host)) => host,
        Some(Err(e)) => {
            return deny(Reason::InvalidHost, format!("the held request's host {:?} is not a host name: {e}", r.host));
        }
    };
    let money = crate::money::dollars;
    if hold.origin == HoldOrigin::Proxy {
        let connect = r.method.as_deref() == Some("CONNECT");
        match (r.method.as_deref(), r.path.as_deref(), r.port) {
            (None, _, Some(port)) | (Some("CONNECT"), _, Some(port)) => match policy.raw_tcp(Some(&host), port) {
                None => {
                    let reason = if connect { Reason::ConnectDenied } else { Reason::RawTcpDenied };
                    return deny(reason, format!("no [[raw_tcp]] rule allows {host}:{port} any more."));
                }
                Some(rule) if *rule.action != *r.action || rule.cost_millicents != cost => {
                    return deny(
                        Reason::PolicyDenied,
                        format!(
                            "the [[raw_tcp]] rule for {host}:{port} ({}:{}) now gives action {} at {}, not {} at {} as \
                             when the connection was held; connect again.",
                            rule.file.display(),
                            rule.line,
                            rule.action,
                            money(rule.cost_millicents),
                            r.action,
                            money(cost)
                        ),
                    );
                }
                Some(_) => {}
            },
            (Some(method), Some(path), None) if !connect => {
                let route = policy.route(&host, method, path);
                let fixed = match &route.cost {
                    crate::policy::Cost::Fixed(c) => Some(*c),
                    crate::policy::Cost::Metered(_) => None,
                };
                if *route.action != *r.action || fixed.is_some_and(|c| c != cost) {
                    let now = match fixed {
                        Some(c) => format!("action {} at {}", route.action, money(c)),
                        None => format!("action {} (metered)", route.action),
                    };
                    return deny(
                        Reason::PolicyDenied,
                        format!(
                            "{method} {host}{path} is now routed to {now}, not {} at {} as when it was held; \
                             send the request again.",
                            r.action,
                            money(cost)
                        ),
                    );
                }
            }
            _ => {
                return deny(
                    Reason::PolicyDenied,
                    "the held request does not say how the proxy routed it, so it cannot be checked again.".into(),
                );
            }
        }
    }
    match policy.host_check(&host, cost) {
        HostVerdict::Allow => HostVerdict::Allow,
        HostVerdict::Deny { reason, detail } => deny(reason, detail),
    }
}

impl Service {
    /// A hold found resolved: its decision and reason from the stored hold, and its resolution
    /// record from the passport's chain (newest first, back to the hold's own decision).
    fn outcome_of_resolved(&self, h: &Hold) -> HoldOutcome {
        // A stored reason this version does not know is kept as it is (`Reason::parse`).
        let reason = h.resolution.as_ref().map_or(Reason::HoldResolved, |r| r.reason.clone());
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
                == Some(drafts::kind::HOLD_RESOLUTION)
                && record.get(drafts::field::HOLD_ID).and_then(Value::as_str) == Some(h.id.as_str())
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

    use super::super::testkit::Fixture;

    /// A proxied request held for approval: the fixture and the outcome of its decision.
    async fn held() -> (Fixture, DecisionOutcome) {
        use crate::passport::Constraints;
        let constraints = Constraints { approval_required: Some(true), ..Constraints::default() };
        let f = super::super::testkit::fixture_with(constraints).await;
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

    /// The host policy of the reload tests: `api.example.test` with one fixed-price route
    /// (`POST /v1/chat` → `llm:chat`, 1 cent), and a `[[raw_tcp]]` rule for `db.example.test:5432`.
    const SERVICE_POLICY: &str = r#"
[service]
name = "example"
domains = ["api.example.test"]

[[route]]
id = "chat"
method = "POST"
path = "/v1/chat"
action = "llm:chat"
cost_cents = 1

[[raw_tcp]]
host = "db.example.test"
port = 5432
action = "tcp:postgres"
cost_cents = 0
"#;

    /// A policy directory holding `files`, loaded, and the directory.
    fn policy(files: &[(&str, &str)]) -> (tempfile::TempDir, Arc<crate::policy::PolicyHandle>) {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write policy");
        }
        let handle = crate::policy::PolicyHandle::load(dir.path()).expect("policy loads");
        (dir, Arc::new(handle))
    }

    /// A proxied `POST https://api.example.test/v1/chat` (1 cent) held for approval under the
    /// service policy; the policy's directory, to tighten it, and the hold's id.
    async fn held_under_policy() -> (Fixture, tempfile::TempDir, Arc<crate::policy::PolicyHandle>, String) {
        use crate::passport::Constraints;
        let constraints = Constraints { approval_required: Some(true), ..Constraints::default() };
        let f = super::super::testkit::fixture_with(constraints).await;
        let (dir, handle) = policy(&[("example.toml", SERVICE_POLICY)]);
        f.service.set_policy(handle.clone());
        let host = DomainName::parse("api.example.test").expect("host");
        // What the proxy's route step hands the decision.
        let route = handle.current().route(&host, "POST", "/v1/chat");
        assert_eq!(&*route.action, "llm:chat");
        let verdict = handle.current().host_check(&host, 1_000);
        assert_eq!(verdict, HostVerdict::Allow);
        let input = super::super::EnforceInput {
            passport_id: f.passport.clone(),
            action: route.action.to_string(),
            cost_millicents: Some(1_000),
            target: Some(host.to_string()),
            method: Some("POST".into()),
            path: Some("/v1/chat".into()),
            ..Default::default()
        };
        let o = f.service.enforce_outcome(input, HoldOrigin::Proxy, verdict).await.expect("enforce");
        assert_eq!(o.decision, Decision::RequestHold, "{}", o.to_json());
        let id = o.hold_id().expect("hold id").to_string();
        (f, dir, handle, id)
    }

    /// Issue 14: a reload that denies the host while the request waits turns its approval into
    /// a block with the policy's reason, attested under the new policy's digest; nothing is spent.
    #[tokio::test]
    async fn an_approval_after_a_reload_that_denies_the_host_is_a_block() {
        let (f, dir, handle, id) = held_under_policy().await;
        let before = handle.current().digest();
        std::fs::write(dir.path().join("host.toml"), "[host]\ndeny_domains = [\"api.example.test\"]\n")
            .expect("tighten");
        let reloaded = handle.reload().expect("reload");
        assert!(reloaded.changed());
        let r = f.service.resolve_hold(&id, true, &root(), Some("looks fine".into())).await.expect("approve");
        assert_eq!((r.decision(), r.reason().as_str()), (Decision::Block, "policy_denied"), "{}", r.to_json());
        let json = r.to_json();
        assert_eq!(json["hold_status"], "denied");
        let detail = json["detail"].as_str().expect("detail");
        assert!(detail.contains("at approval") && detail.contains("host.toml"), "{detail}");
        let at = r.attestation_id().expect("resolution record");
        let record = super::super::testkit::record(&f, at);
        assert_eq!(
            (record["kind"].as_str(), record["decision"].as_str(), record["reason"].as_str()),
            (Some("hold_resolution"), Some("block"), Some("policy_denied"))
        );
        assert_eq!(record["policy_digest"].as_str(), Some(reloaded.digest.as_str()));
        assert_ne!(record["policy_digest"].as_str(), Some(before.as_str()));
        assert_eq!(super::super::testkit::spent(&f), (0, 0), "a refused approval spends nothing");
        // The stored hold says so too, and a late waiter is told the block.
        let view = f.service.hold(&id).expect("hold").to_json();
        assert_eq!(
            (view["status"].as_str(), view["resolution"]["reason"].as_str()),
            (Some("denied"), Some("policy_denied"))
        );
        let found = f.service.wait_hold(&id).await;
        assert_eq!((found.decision(), found.attestation_id()), (Decision::Block, Some(at)));
        let report = super::super::testkit::verified(&f).await;
        assert!(report.is_ok(), "{:?}", report.problems);
    }

    /// A reload that routes the held request to another action refuses the approval; a reload
    /// that changes nothing the request needs does not.
    #[tokio::test]
    async fn an_approval_checks_the_route_again_and_allows_what_still_holds() {
        let (f, dir, handle, id) = held_under_policy().await;
        // A change elsewhere (a ceiling far above the cost): the approval goes through.
        std::fs::write(
            dir.path().join("host.toml"),
            "[host]\ndeny_domains = []\n[host.ceilings]\nmax_per_action_cents = 500\n",
        )
        .expect("write");
        handle.reload().expect("reload");
        let r = f.service.resolve_hold(&id, true, &root(), None).await.expect("approve");
        assert_eq!((r.decision(), r.reason().as_str()), (Decision::Allow, "hold_approved"), "{}", r.to_json());
        assert_eq!(super::super::testkit::spent(&f), (1_000, 1_000));

        let (f, dir, handle, id) = held_under_policy().await;
        let moved = SERVICE_POLICY.replace("action = \"llm:chat\"", "action = \"llm:chat:costly\"");
        std::fs::write(dir.path().join("example.toml"), moved).expect("write");
        handle.reload().expect("reload");
        let r = f.service.resolve_hold(&id, true, &root(), None).await.expect("approve");
        assert_eq!((r.decision(), r.reason().as_str()), (Decision::Block, "policy_denied"));
        let detail = r.to_json()["detail"].as_str().expect("detail").to_string();
        assert!(detail.contains("llm:chat:costly") && detail.contains("send the request again"), "{detail}");
        assert_eq!(super::super::testkit::spent(&f), (0, 0));
    }

    /// A stored hold as the proxy or the API made it.
    fn stored(
        origin: HoldOrigin,
        host: Option<&str>,
        method: Option<&str>,
        path: Option<&str>,
        port: Option<u16>,
        cost: u64,
    ) -> Hold {
        let request = crate::service::HeldRequest {
            action: if port.is_some() { "tcp:postgres" } else { "llm:chat" }.into(),
            cost_millicents: cost,
            host: host.map(str::to_string),
            method: method.map(str::to_string),
            path: path.map(str::to_string),
            port,
        };
        let mut h = hold_with(json!({"action": "x", "cost_millicents": 0, "host": null, "method": null, "path": null}))
            .expect("hold");
        h.origin = origin;
        h.request = request;
        h
    }

    fn denied(v: &HostVerdict) -> Option<&str> {
        match v {
            HostVerdict::Allow => None,
            HostVerdict::Deny { reason, .. } => Some(reason.as_str()),
        }
    }

    #[test]
    fn the_approval_verdict_checks_what_the_decision_checked() {
        let (_d, now) = policy(&[("example.toml", SERVICE_POLICY)]);
        let now = now.current();
        let db = Some("db.example.test");
        let api = Some("api.example.test");
        let post = (Some("POST"), Some("/v1/chat"));
        let cases = [
            // Raw TCP and CONNECT: the rule must still allow name and port, same action and cost.
            (stored(HoldOrigin::Proxy, db, None, None, Some(5432), 0), None),
            (stored(HoldOrigin::Proxy, db, None, None, Some(5433), 0), Some("raw_tcp_denied")),
            (stored(HoldOrigin::Proxy, db, Some("CONNECT"), Some("db.example.test:5432"), Some(5432), 0), None),
            (
                stored(HoldOrigin::Proxy, db, Some("CONNECT"), Some("db.example.test:22"), Some(22), 0),
                Some("connect_denied"),
            ),
            (stored(HoldOrigin::Proxy, db, None, None, Some(5432), 1), Some("policy_denied")),
            // A raw connection without its port cannot be checked: refused, never waved through.
            (stored(HoldOrigin::Proxy, db, None, None, None, 0), Some("policy_denied")),
            // HTTP: same route, action and fixed price.
            (stored(HoldOrigin::Proxy, api, post.0, post.1, None, 1_000), None),
            (stored(HoldOrigin::Proxy, api, post.0, post.1, None, 2_000), Some("policy_denied")),
            (stored(HoldOrigin::Proxy, api, Some("GET"), post.1, None, 1_000), Some("policy_denied")),
            // The API: the host-wide checks only, as `enforce` made them.
            (stored(HoldOrigin::Api, api, None, None, None, 2_000), None),
            (stored(HoldOrigin::Api, None, None, None, None, 2_000), None),
        ];
        for (hold, want) in &cases {
            let got = host_verdict_at_approval(Some(&now), hold);
            assert_eq!(denied(&got), *want, "{:?}: {got:?}", hold.request);
        }
        // No host policy at all: nothing to check, as at decision time.
        assert_eq!(host_verdict_at_approval(None, &cases[1].0), HostVerdict::Allow);
        // Host-wide rules bind every origin, hosts and ceilings alike.
        let (_d, tight) = policy(&[
            ("example.toml", SERVICE_POLICY),
            ("host.toml", "[host]\ndeny_domains = [\"*.example.test\"]\n[host.ceilings]\nmax_per_action_cents = 1\n"),
        ]);
        let tight = tight.current();
        for (hold, _) in &cases {
            let got = host_verdict_at_approval(Some(&tight), hold);
            if hold.request.host.is_some() || hold.request.cost_millicents > 1_000 {
                assert!(denied(&got).is_some(), "{:?}: {got:?}", hold.request);
            }
        }
        let ceiling = host_verdict_at_approval(Some(&tight), &cases[10].0);
        assert_eq!(denied(&ceiling), Some("policy_denied"));
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
        let view = HoldView::of(&new).to_json();
        assert_eq!(
            (view["request"]["cost_cents"].as_u64(), view["request"]["cost_millicents"].as_u64()),
            (Some(1), Some(5))
        );
    }

    /// A hold's view makes exactly the JSON the untyped view made, resolved or not.
    #[test]
    fn the_typed_hold_view_makes_the_same_json_as_before() {
        let mut h = hold_with(json!({"action": "llm:chat", "cost_millicents": 1_500, "host": "api.example.test",
                                     "method": "POST", "path": "/v1/chat", "port": 8443}))
        .expect("hold");
        let old = |h: &Hold, resolution: Value| {
            let r = &h.request;
            json!({
                "id": h.id, "passport_id": h.passport_id, "agent_id": h.agent_id,
                "status": h.status, "origin": h.origin,
                "created_at": drafts::time(h.created_at), "expires_at": drafts::time(h.expires_at),
                "request": {"action": r.action, "host": r.host, "method": r.method, "path": r.path,
                            "cost_cents": 2, "cost_millicents": 1_500},
                "attestation_id": h.record_index, "resolution": resolution,
            })
            .to_string()
        };
        assert_eq!(HoldView::of(&h).to_json().to_string(), old(&h, Value::Null));
        let by = root().actor();
        h.status = HoldStatus::Approved;
        h.resolution = Some(HoldResolution {
            at: "2026-05-01T00:01:00.000000Z".into(),
            by: by.clone(),
            note: Some("ok".into()),
            reason: Reason::HoldApproved,
        });
        let resolution = json!({"at": "2026-05-01T00:01:00.000000Z", "by": by.to_json(), "note": "ok",
                                "reason": "hold_approved"});
        assert_eq!(HoldView::of(&h).to_json().to_string(), old(&h, resolution.clone()));
        // Stored and read back, the typed resolution is the same; a daemon's `by` too.
        let back = Hold::from_bytes(&h.to_bytes()).expect("read back");
        assert_eq!(back.resolution, h.resolution);
        assert_eq!(back.request.port, Some(8443));
        let stored: Value = serde_json::from_slice(&h.to_bytes()).expect("json");
        assert_eq!(stored["resolution"], resolution);
        h.resolution = Some(HoldResolution {
            at: "t".into(),
            by: Actor::Daemon("timeout".into()),
            note: None,
            reason: Reason::HoldTimeout,
        });
        let stored: Value = serde_json::from_slice(&h.to_bytes()).expect("json");
        assert_eq!(stored["resolution"]["by"], "timeout");
        assert_eq!(Hold::from_bytes(&h.to_bytes()).expect("read back").resolution, h.resolution);
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
