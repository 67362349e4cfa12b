//! Settlement of metered costs (issue 6): after a metered request's response, the real cost
//! replaces the estimate the decision spent.
//!
//! One ledger transaction moves the counters by `actual − estimate` (see [`crate::decide::settle`]
//! for windows and bounds) and appends a `settlement` record to the passport's chain, linked to
//! the record that spent the estimate (`decision_record`: an allow `decision`, or the allow
//! `hold_resolution` of an approved hold). Its spend fields carry the *signed* delta applied, so
//! `sluice audit verify` recomputes the chain's spend through refunds and extra charges alike.
//!
//! When the real cost is unknown (the connection was cut, the response reported no usage) the
//! estimate stands: the record says `settled: false` with the reason and no counter moves.
//! A decision is settled at most once (`settled/<index>` in the state).

use super::{now, records, Conflict, Invalid, Missing, Service, ServiceError};
use crate::decide::{self, Usage};
use crate::ledger::{self, Draft, Txn, TxnError};
use crate::passport::constraints::MAX_CENTS;
use serde_json::{json, Value};

/// Why a settlement could not use a real cost, as recorded in `reason`.
pub mod why {
    /// The response reported its usage: the real cost replaced the estimate.
    pub const USAGE: &str = "usage_reported";
    /// The response ended without usage fields.
    pub const NO_USAGE: &str = "no_usage";
    /// The response body failed or was dropped before its end.
    pub const CONNECTION_CUT: &str = "connection_cut";
    /// The response came with a content coding (gzip, ...) the scanner cannot read.
    pub const ENCODED: &str = "encoded_response";
}

/// Longest `why` accepted (it is an identifier, not prose).
const MAX_WHY: usize = 64;

impl Service {
    /// Settles the metered cost of the allowed request recorded at `decision_attestation_id`.
    ///
    /// `estimate_cents` must be the cost that record spent (checked against it); `actual` is the
    /// real cost from the response's usage, or `None` when it is unknown (`why` then says why:
    /// [`why::NO_USAGE`], [`why::CONNECTION_CUT`], ...). Never blocks anything: it records what
    /// happened. Returns the settlement record's summary.
    pub async fn settle(
        &self,
        decision_attestation_id: u64,
        passport_id: &str,
        estimate_cents: u64,
        actual: Option<u64>,
        why: &str,
    ) -> Result<Value, ServiceError> {
        if why.is_empty() || why.len() > MAX_WHY || !why.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            return Err(ServiceError::Invalid(format!(
                "settlement reason {why:?} must be 1 to {MAX_WHY} lowercase letters or '_'"
            )));
        }
        if let Some(a) = actual.filter(|a| *a > MAX_CENTS) {
            return Err(ServiceError::Invalid(format!(
                "actual cost of {a} cents is more than the largest amount sluice accepts ({MAX_CENTS} cents)"
            )));
        }
        let cp = self
            .passport(passport_id)
            .ok_or_else(|| ServiceError::NotFound(format!("passport {passport_id} is not registered")))?;
        let claims = cp.passport.claims.clone();
        let window = claims.constraints.window();
        let id = claims.id.to_string();
        let why = why.to_string();
        let (summary, _) = self
            .transact(move |txn: &mut Txn<'_>| {
                // Read inside the writer's transaction: the decision may not be published yet,
                // and a read outside would force a redb commit for every metered request.
                let decided_at = settleable(txn, decision_attestation_id, &id, estimate_cents)?;
                let at = now();
                let settled_key = format!("settled/{decision_attestation_id}");
                if txn.get(&settled_key)?.is_some() {
                    return Err(TxnError::abort(Conflict(format!(
                        "the cost of decision {decision_attestation_id} is already settled"
                    ))));
                }
                txn.put(&settled_key, b"1")?;
                let mut body = records::base("settlement", Some(&claims), at);
                body.insert("decision_record".into(), decision_attestation_id.into());
                body.insert("estimated_cents".into(), estimate_cents.into());
                body.insert("actual_cents".into(), actual.into());
                body.insert("settled".into(), actual.is_some().into());
                body.insert("reason".into(), why.clone().into());
                let mut summary = json!({
                    "decision_record": decision_attestation_id, "estimated_cents": estimate_cents,
                    "actual_cents": actual, "settled": actual.is_some(), "reason": why,
                });
                if let Some(actual) = actual {
                    let usage_key = format!("usage/{id}");
                    let usage = match txn.get(&usage_key)? {
                        None => Usage::default(),
                        Some(bytes) => Usage::from_bytes(&bytes).map_err(|e| {
                            TxnError::abort(Invalid(format!("usage of passport {id} is unreadable ({e}); not settled")))
                        })?,
                    };
                    usage.check_window(window).map_err(|e| {
                        TxnError::abort(Invalid(format!("usage of passport {id} is unreadable ({e}); not settled")))
                    })?;
                    // Both are at most MAX_CENTS (10^13), so the difference fits an i64.
                    let delta = i64::try_from(actual).unwrap_or(i64::MAX) - i64::try_from(estimate_cents).unwrap_or(0);
                    let settled = decide::settle(&usage, window, decided_at, delta, at);
                    txn.put(&usage_key, &settled.usage.to_bytes())?;
                    match settled.spend {
                        Some(s) => {
                            records::Spend {
                                window: window.as_str(),
                                window_start: s.window_start,
                                delta_cents: s.delta_cents,
                                after_cents: s.after_cents,
                            }
                            .write(&mut body);
                            summary["spend_delta_cents"] = s.delta_cents.into();
                            summary["spend_after_cents"] = s.after_cents.into();
                        }
                        None => {
                            // The decision's window is over: its counter is gone and the current
                            // one never held the estimate.
                            body.insert("window_closed".into(), true.into());
                            summary["window_closed"] = true.into();
                        }
                    }
                }
                Ok((summary, vec![Draft::new(id.clone(), body)]))
            })
            .await
            .map(|(mut summary, appended)| {
                summary["attestation_id"] = appended.first().map(|a| a.index).into();
                (summary, ())
            })?;
        tracing::info!(
            passport_id,
            decision_record = decision_attestation_id,
            estimate_cents,
            actual_cents = ?actual,
            attestation_id = ?summary.get("attestation_id"),
            "metered cost settled"
        );
        Ok(summary)
    }
}

/// Checks that `index` is an allow record on `passport_id`'s chain that spent exactly
/// `estimate_cents`, and returns when it was decided (its window is the settlement's).
fn settleable(
    txn: &Txn<'_>,
    index: u64,
    passport_id: &str,
    estimate_cents: u64,
) -> Result<chrono::DateTime<chrono::Utc>, TxnError> {
    let bytes = txn
        .record(index)?
        .ok_or_else(|| TxnError::abort(Missing(format!("record {index} does not exist; nothing to settle"))))?;
    let record: Value =
        serde_json::from_slice(&bytes).map_err(|e| TxnError::abort(format!("record {index} is not JSON: {e}")))?;
    let field = |name: &str| record.get(name);
    let kind = field("kind").and_then(Value::as_str).unwrap_or_default();
    if !matches!(kind, "decision" | "hold_resolution")
        || field("decision").and_then(Value::as_str) != Some("allow")
        || field("passport_id").and_then(Value::as_str) != Some(passport_id)
    {
        return Err(TxnError::abort(Invalid(format!(
            "record {index} is not an allowed request of passport {passport_id}; only those can be settled"
        ))));
    }
    let spent = field("cost_cents").and_then(Value::as_u64);
    if spent != Some(estimate_cents) {
        return Err(TxnError::abort(Invalid(format!(
            "record {index} spent {spent:?} cents, not the estimate of {estimate_cents} given to settle it"
        ))));
    }
    field("time")
        .and_then(Value::as_str)
        .and_then(ledger::record::parse_time)
        .ok_or_else(|| TxnError::abort(format!("record {index} has no readable time")))
}

#[cfg(test)]
pub(crate) mod testkit {
    use super::*;
    use crate::api::peer::Peer;
    use crate::decide::HostVerdict;
    use crate::ledger::{export, verify};
    use crate::ledger::{HostKey, Ledger, LedgerOptions};
    use crate::passport::{Cents, Constraints, IssuerId, Permission, SpendWindow, TrustTier};
    use crate::service::{EnforceInput, HoldOrigin, ServiceConfig};
    use ed25519_dalek::SigningKey;
    use std::sync::Arc;
    use std::time::Duration;

    pub(crate) struct Fixture {
        pub _dir: tempfile::TempDir,
        pub service: Arc<Service>,
        pub passport: String,
    }

    fn peer() -> Peer {
        Peer { uid: 0, gid: 0, pid: 1, user: Some("root".into()) }
    }

    /// A service on a fresh store with one registered passport (`llm:*`, $100 a month).
    pub(crate) async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = HostKey::from_signing_key(SigningKey::from_bytes(&[9u8; 32]));
        let ledger = Ledger::open(&dir.path().join("ledger.redb"), host, LedgerOptions::default()).expect("ledger");
        let issuer = SigningKey::from_bytes(&[3u8; 32]);
        let config =
            ServiceConfig::passport_only(vec![IssuerId::from_key(&issuer.verifying_key())], Duration::from_secs(60));
        let service = Service::start(ledger, config).await.expect("service");
        let constraints = Constraints {
            max_cumulative: Some(Cents(10_000)),
            cumulative_window: Some(SpendWindow::Monthly),
            ..Constraints::default()
        };
        let issued = crate::passport::issue(
            crate::passport::IssueRequest {
                agent_id: "meter-test".into(),
                agent_name: None,
                permissions: vec![Permission::parse("llm:*").expect("permission")],
                constraints,
                trust_tier: TrustTier::L1,
                lifetime_secs: 3600,
                now: crate::passport::now(),
            },
            &issuer,
        )
        .expect("issue");
        service.register(&issued.token, None, &peer()).await.expect("register");
        Fixture { _dir: dir, service, passport: issued.claims.id.to_string() }
    }

    pub(crate) async fn allow(f: &Fixture, cost: u64) -> u64 {
        let input = EnforceInput {
            passport_id: f.passport.clone(),
            action: "llm:chat".into(),
            cost_cents: cost,
            target: Some("api.openai.com".into()),
            method: Some("POST".into()),
            path: Some("/v1/chat/completions".into()),
        };
        let o = f.service.enforce_outcome(input, HoldOrigin::Proxy, HostVerdict::Allow).await.expect("enforce");
        assert_eq!(o.decision, decide::Decision::Allow, "{}", o.json);
        o.attestation_id
    }

    pub(crate) fn spent(f: &Fixture) -> (u64, u64) {
        let s = f.service.state(&f.passport).expect("state");
        (
            s["window_cost_cents"].as_u64().expect("window_cost_cents"),
            s["daily_cost_cents"].as_u64().expect("daily_cost_cents"),
        )
    }

    pub(crate) async fn verified(f: &Fixture) -> verify::VerifyReport {
        let bundle = export::export(
            f.service.ledger(),
            &export::ExportRequest { passport: None, since: None, consistency_from: None },
        )
        .await
        .expect("export");
        verify::verify_export(&bundle, &f.service.ledger().host_public_key(), None)
    }

    pub(crate) fn record(f: &Fixture, index: u64) -> Value {
        serde_json::from_slice(&f.service.ledger().record(index).expect("read").expect("exists")).expect("json")
    }
}

#[cfg(test)]
mod tests {
    use super::testkit::{allow, fixture, record, spent, verified};
    use super::*;
    use crate::ledger::verify;

    #[tokio::test]
    async fn refunds_extra_charges_and_unknown_usage_are_recorded_and_add_up() {
        let f = fixture().await;
        // An over-estimate: 500 spent, 180 real → refund of 320.
        let d1 = allow(&f, 500).await;
        assert_eq!(spent(&f), (500, 500));
        let s = f.service.settle(d1, &f.passport, 500, Some(180), why::USAGE).await.expect("settle");
        assert_eq!(s["spend_delta_cents"], -320);
        assert_eq!(spent(&f), (180, 180));
        let r = record(&f, s["attestation_id"].as_u64().expect("index"));
        assert_eq!(r["kind"], "settlement");
        assert_eq!(r["decision_record"], d1);
        assert_eq!((r["estimated_cents"].as_u64(), r["actual_cents"].as_u64()), (Some(500), Some(180)));
        assert_eq!((r["settled"].as_bool(), r["spend_delta_cents"].as_i64()), (Some(true), Some(-320)));
        assert_eq!(r["spend_after_cents"], 180);

        // An under-estimate: 300 spent, 900 real → 600 more.
        let d2 = allow(&f, 300).await;
        f.service.settle(d2, &f.passport, 300, Some(900), why::USAGE).await.expect("settle");
        assert_eq!(spent(&f), (1080, 1080));

        // No usage: the estimate stands and the record says why.
        let d3 = allow(&f, 70).await;
        let s = f.service.settle(d3, &f.passport, 70, None, why::NO_USAGE).await.expect("settle");
        assert_eq!(spent(&f), (1150, 1150));
        let r = record(&f, s["attestation_id"].as_u64().expect("index"));
        assert_eq!((r["settled"].as_bool(), r["reason"].as_str()), (Some(false), Some("no_usage")));
        assert!(r["actual_cents"].is_null());
        assert!(r.get("spend_delta_cents").is_none(), "{r}");

        let report = verified(&f).await;
        assert!(report.is_ok(), "{:?}", report.problems);
    }

    #[tokio::test]
    async fn a_decision_is_settled_once_and_only_as_recorded() {
        let f = fixture().await;
        let d = allow(&f, 400).await;
        // Not the estimate the decision spent: a caller cannot refund more than was charged.
        let e = f.service.settle(d, &f.passport, 4_000, Some(0), why::USAGE).await.unwrap_err();
        assert!(matches!(e, ServiceError::Invalid(_)), "{e}");
        // Not this passport's record.
        let other = "pp_AAAAAAAAAAAAAAAAAAAAAA";
        assert!(f.service.settle(d, other, 400, Some(0), why::USAGE).await.is_err());
        // Not an allow decision: the passport's registration record.
        let e = f.service.settle(d - 1, &f.passport, 400, Some(0), why::USAGE).await.unwrap_err();
        assert!(matches!(e, ServiceError::Invalid(_)), "{e}");
        // A record that does not exist.
        let e = f.service.settle(d + 1000, &f.passport, 400, Some(0), why::USAGE).await.unwrap_err();
        assert!(matches!(e, ServiceError::NotFound(_)), "{e}");
        // Hostile figures and reasons.
        assert!(f.service.settle(d, &f.passport, 400, Some(MAX_CENTS + 1), why::USAGE).await.is_err());
        assert!(f.service.settle(d, &f.passport, 400, Some(1), "Bad Reason").await.is_err());
        assert_eq!(spent(&f), (400, 400));

        f.service.settle(d, &f.passport, 400, Some(100), why::USAGE).await.expect("settle");
        let e = f.service.settle(d, &f.passport, 400, Some(0), why::USAGE).await.unwrap_err();
        assert!(matches!(e, ServiceError::Conflict(_)), "{e}");
        assert_eq!(spent(&f), (100, 100));
    }

    #[tokio::test]
    async fn a_lying_settlement_is_named_by_the_verifier() {
        let f = fixture().await;
        let d = allow(&f, 500).await;
        f.service.settle(d, &f.passport, 500, Some(200), why::USAGE).await.expect("settle");
        // A writer that records a refund but claims the spend did not drop.
        let chain = f.passport.clone();
        let window = record(&f, d)["spend_window_start"].clone();
        let (_, appended) = f
            .service
            .ledger()
            .transact(move |_txn| {
                let body = serde_json::from_value(json!({
                    "kind": "settlement", "decision_record": d, "estimated_cents": 500, "actual_cents": 100,
                    "settled": true, "spend_window": "monthly", "spend_window_start": window,
                    "spend_delta_cents": -100, "spend_after_cents": 200,
                }))
                .map_err(TxnError::abort)?;
                Ok(((), vec![Draft::new(chain, body)]))
            })
            .await
            .expect("append");
        let lie = appended[0].index;
        let report = verified(&f).await;
        assert!(
            report.problems.iter().any(|p| matches!(p, verify::Problem::SpendMismatch { index, expected: 100, found: 200, .. } if *index == lie)),
            "{:?}",
            report.problems
        );
    }
}
