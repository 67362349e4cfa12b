//! Settlement of metered costs (issue 6): after a metered request's response, the real cost
//! replaces the estimate the decision spent.
//!
//! One ledger transaction moves the counters by `actual − estimate` (see [`crate::decide::settle`]
//! for windows and bounds) and appends a `settlement` record to the passport's chain, linked to
//! the record that spent the estimate (`decision_record`: an allow `decision`, or the allow
//! `hold_resolution` of an approved hold). Its spend fields carry the *signed* delta applied, so
//! `sluice audit verify` recomputes the chain's spend through refunds and extra charges alike.
//! Amounts are millicents: `estimated_millicents`, `actual_millicents`, `spend_delta_millicents`.
//!
//! When the real cost is unknown (the connection was cut, the response reported no usage) the
//! estimate stands: the record says `settled: false` with the reason and no counter moves.
//! A decision is settled at most once (`settled/<index>` in the state).

use super::{drafts, now, Service, ServiceError};
use crate::decide::{self, Decision, Usage};
use crate::ledger::record::{v1, FIELD_COST, FIELD_KIND, FIELD_TIME};
use crate::ledger::{self, Draft, Txn, TxnError};
use crate::money::{self, MAX_MILLICENTS};
use serde::Serialize;
use serde_json::Value;

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

/// What a settlement did, as its record says (JSON at the edge; the field names are the
/// record's: `estimated_millicents`, `actual_millicents`, `spend_delta_millicents`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Settlement {
    /// The allow record whose cost this settles.
    pub decision_record: u64,
    pub estimated_millicents: u64,
    /// `None`: the real cost is unknown and the estimate stands.
    pub actual_millicents: Option<u64>,
    pub settled: bool,
    /// Why, from [`why`].
    pub reason: String,
    /// The signed change applied to the decision's window, when one was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spend_delta_millicents: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spend_after_millicents: Option<u64>,
    /// The decision's window had closed: nothing moved.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub window_closed: bool,
    /// The settlement record.
    pub attestation_id: u64,
}

json_at_the_edge!(Settlement);

/// Longest `why` accepted (it is an identifier, not prose).
const MAX_WHY: usize = 64;

impl Service {
    /// Settles the metered cost of the allowed request recorded at `decision_attestation_id`.
    ///
    /// `estimate_millicents` must be the cost that record spent (checked against it); `actual` is
    /// the real cost in millicents from the response's usage, or `None` when it is unknown (`why`
    /// then says why:
    /// [`why::NO_USAGE`], [`why::CONNECTION_CUT`], ...). Never blocks anything: it records what
    /// happened. Returns the settlement record's summary.
    pub async fn settle(
        &self,
        decision_attestation_id: u64,
        passport_id: &str,
        estimate_millicents: u64,
        actual: Option<u64>,
        why: &str,
    ) -> Result<Settlement, ServiceError> {
        if why.is_empty() || why.len() > MAX_WHY || !why.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            return Err(ServiceError::Invalid {
                field: "why",
                problem: format!("settlement reason {why:?} must be 1 to {MAX_WHY} lowercase letters or '_'"),
            });
        }
        if let Some(a) = actual.filter(|a| *a > MAX_MILLICENTS) {
            return Err(ServiceError::Invalid {
                field: "actual",
                problem: format!(
                    "actual cost of {} is more than the largest amount sluice accepts ({})",
                    money::dollars(a),
                    money::dollars(MAX_MILLICENTS)
                ),
            });
        }
        let cp =
            self.passport(passport_id).ok_or_else(|| ServiceError::PassportNotRegistered(passport_id.to_string()))?;
        let claims = cp.passport.claims.clone();
        let window = claims.constraints.window();
        let id = claims.id.to_string();
        let why = why.to_string();
        // Through the passport's lane: the counters it moves are the ones decisions compare.
        let (summary, appended) = self
            .lane_invalidating(passport_id, move |txn: &mut Txn<'_>| {
                // Read inside the writer's transaction: the decision may not be published yet,
                // and a read outside would force a redb commit for every metered request.
                let decided_at = settleable(txn, decision_attestation_id, &id, estimate_millicents)?;
                let at = now();
                let settled_key = format!("settled/{decision_attestation_id}");
                if txn.get(&settled_key)?.is_some() {
                    return Err(ServiceError::AlreadySettled(decision_attestation_id).abort());
                }
                txn.put(&settled_key, b"1")?;
                let fields = drafts::SettlementFields {
                    decision_record: decision_attestation_id,
                    estimated_millicents: estimate_millicents,
                    actual_millicents: actual,
                    reason: &why,
                };
                let mut body = drafts::settlement(&claims, &fields, at);
                let mut summary = Settlement {
                    decision_record: decision_attestation_id,
                    estimated_millicents: estimate_millicents,
                    actual_millicents: actual,
                    settled: actual.is_some(),
                    reason: why.clone(),
                    spend_delta_millicents: None,
                    spend_after_millicents: None,
                    window_closed: false,
                    attestation_id: 0,
                };
                if let Some(actual) = actual {
                    let usage_key = format!("usage/{id}");
                    let usage = match txn.get(&usage_key)? {
                        None => Usage::default(),
                        Some(bytes) => Usage::from_bytes(&bytes).map_err(|e| {
                            ServiceError::UsageUnreadable {
                                passport_id: id.clone(),
                                problem: format!("{e}; not settled"),
                            }
                            .abort()
                        })?,
                    };
                    usage.check_window(window).map_err(|e| {
                        ServiceError::UsageUnreadable { passport_id: id.clone(), problem: format!("{e}; not settled") }
                            .abort()
                    })?;
                    // Both are at most MAX_MILLICENTS (10^16; the estimate was checked by the
                    // decision), so the difference fits an i64.
                    let delta = i64::try_from(actual).unwrap_or(i64::MAX)
                        - i64::try_from(estimate_millicents).unwrap_or(i64::MAX);
                    let settled = decide::settle(&usage, window, decided_at, delta, at);
                    txn.put(&usage_key, &settled.usage.to_bytes())?;
                    match settled.spend {
                        Some(s) => {
                            drafts::SpendFields {
                                window: window.as_str(),
                                window_start: s.window_start,
                                delta_millicents: s.delta_millicents,
                                after_millicents: s.after_millicents,
                            }
                            .write(&mut body);
                            summary.spend_delta_millicents = Some(s.delta_millicents);
                            summary.spend_after_millicents = Some(s.after_millicents);
                        }
                        None => {
                            // The decision's window is over: its counter is gone and the current
                            // one never held the estimate.
                            body.bool(drafts::field::WINDOW_CLOSED, true);
                            summary.window_closed = true;
                        }
                    }
                }
                Ok((summary, vec![Draft::new(id.clone(), body)]))
            })
            .await?;
        let summary = Settlement { attestation_id: super::appended_index(&appended, "settlement")?, ..summary };
        tracing::info!(
            passport_id,
            decision_record = decision_attestation_id,
            estimate_millicents,
            actual_millicents = ?actual,
            attestation_id = summary.attestation_id,
            "metered cost settled"
        );
        Ok(summary)
    }
}

/// Checks that `index` is an allow record on `passport_id`'s chain that spent exactly
/// `estimate_millicents`, and returns when it was decided (its window is the settlement's). A
/// version 1 record (cost in whole cents, written before an upgrade) is read × 1000.
fn settleable(
    txn: &Txn<'_>,
    index: u64,
    passport_id: &str,
    estimate_millicents: u64,
) -> Result<chrono::DateTime<chrono::Utc>, TxnError> {
    let bytes = txn.record(index)?.ok_or_else(|| ServiceError::RecordNotFound(index).abort())?;
    let record: Value =
        serde_json::from_slice(&bytes).map_err(|e| TxnError::abort(format!("record {index} is not JSON: {e}")))?;
    let field = |name: &str| record.get(name);
    let kind = field(FIELD_KIND).and_then(Value::as_str).unwrap_or_default();
    if ![drafts::kind::DECISION, drafts::kind::HOLD_RESOLUTION].contains(&kind)
        || field(drafts::field::DECISION).and_then(Value::as_str) != Some(Decision::Allow.as_str())
        || field(drafts::field::PASSPORT_ID).and_then(Value::as_str) != Some(passport_id)
    {
        return Err(ServiceError::Invalid {
            field: "decision_record",
            problem: format!(
                "record {index} is not an allowed request of passport {passport_id}; only those can be settled"
            ),
        }
        .abort());
    }
    let spent = match (field(FIELD_COST), field(v1::FIELD_COST)) {
        (Some(m), None) => m.as_u64(),
        (None, Some(c)) => c.as_u64().and_then(money::from_cents),
        _ => None,
    };
    if spent != Some(estimate_millicents) {
        let spent = spent.map_or_else(|| "an unreadable amount".to_string(), money::dollars);
        return Err(ServiceError::Invalid {
            field: "estimate",
            problem: format!(
                "record {index} spent {spent}, not the estimate of {} given to settle it",
                money::dollars(estimate_millicents)
            ),
        }
        .abort());
    }
    field(FIELD_TIME)
        .and_then(Value::as_str)
        .and_then(ledger::record::parse_time)
        .ok_or_else(|| TxnError::abort(format!("record {index} has no readable time")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::record::{FIELD_ACTUAL, FIELD_ESTIMATED};
    use crate::ledger::verify;
    use crate::service::testkit::{allow, fixture, record, spent, verified};
    use serde_json::json;

    /// The summary's amounts carry the names the record and the verifier use; what did not
    /// happen is absent, not `null` (as before it was typed).
    #[test]
    fn a_settlement_names_its_amounts_as_its_record_does() {
        use crate::ledger::record::{FIELD_SPEND_AFTER, FIELD_SPEND_DELTA};
        let s = Settlement {
            decision_record: 1,
            estimated_millicents: 2,
            actual_millicents: Some(3),
            settled: true,
            reason: why::USAGE.into(),
            spend_delta_millicents: Some(1),
            spend_after_millicents: Some(4),
            window_closed: true,
            attestation_id: 5,
        };
        let j = s.to_json();
        for (name, value) in [
            (drafts::field::DECISION_RECORD, 1),
            (FIELD_ESTIMATED, 2),
            (FIELD_ACTUAL, 3),
            (FIELD_SPEND_DELTA, 1),
            (FIELD_SPEND_AFTER, 4),
            ("attestation_id", 5),
        ] {
            assert_eq!(j[name], value, "{name}: {j}");
        }
        assert_eq!((j["window_closed"].as_bool(), j["reason"].as_str()), (Some(true), Some(why::USAGE)));
        let unknown = Settlement {
            actual_millicents: None,
            settled: false,
            spend_delta_millicents: None,
            spend_after_millicents: None,
            window_closed: false,
            ..s
        }
        .to_json();
        assert!(unknown[FIELD_ACTUAL].is_null(), "{unknown}");
        for absent in [FIELD_SPEND_DELTA, FIELD_SPEND_AFTER, "window_closed"] {
            assert!(unknown.get(absent).is_none(), "{absent}: {unknown}");
        }
    }

    #[tokio::test]
    async fn refunds_extra_charges_and_unknown_usage_are_recorded_and_add_up() {
        let f = fixture().await;
        // An over-estimate: 500 cents spent, 180 real → refund of 320 cents (in millicents).
        let d1 = allow(&f, 500_000).await;
        assert_eq!(spent(&f), (500_000, 500_000));
        let s = f.service.settle(d1, &f.passport, 500_000, Some(180_000), why::USAGE).await.expect("settle").to_json();
        assert_eq!(s["spend_delta_millicents"], -320_000);
        assert_eq!(spent(&f), (180_000, 180_000));
        let r = record(&f, s["attestation_id"].as_u64().expect("index"));
        assert_eq!(r["kind"], "settlement");
        assert_eq!(r["v"], 2);
        assert_eq!(r["decision_record"], d1);
        assert_eq!(
            (r["estimated_millicents"].as_u64(), r["actual_millicents"].as_u64()),
            (Some(500_000), Some(180_000))
        );
        assert_eq!((r["settled"].as_bool(), r["spend_delta_millicents"].as_i64()), (Some(true), Some(-320_000)));
        assert_eq!(r["spend_after_millicents"], 180_000);
        assert!(r.get("spend_after_cents").is_none() && r.get("estimated_cents").is_none(), "{r}");

        // An under-estimate: 300 cents spent, 900 real → 600 more.
        let d2 = allow(&f, 300_000).await;
        f.service.settle(d2, &f.passport, 300_000, Some(900_000), why::USAGE).await.expect("settle").to_json();
        assert_eq!(spent(&f), (1_080_000, 1_080_000));

        // No usage: the estimate stands and the record says why.
        let d3 = allow(&f, 70_000).await;
        let s = f.service.settle(d3, &f.passport, 70_000, None, why::NO_USAGE).await.expect("settle").to_json();
        assert_eq!(spent(&f), (1_150_000, 1_150_000));
        let r = record(&f, s["attestation_id"].as_u64().expect("index"));
        assert_eq!((r["settled"].as_bool(), r["reason"].as_str()), (Some(false), Some("no_usage")));
        assert!(r["actual_millicents"].is_null());
        assert!(r.get("spend_delta_millicents").is_none(), "{r}");

        let report = verified(&f).await;
        assert!(report.is_ok(), "{:?}", report.problems);
    }

    /// Fractions of a cent, both ways: an estimate of $0.00021 settled at $0.00008, then one of
    /// $0.00005 settled at $0.00042. Every step adds up in the counters and in `audit verify`.
    #[tokio::test]
    async fn fractional_actual_costs_settle_exactly() {
        let f = fixture().await;
        let d1 = allow(&f, 21).await;
        assert_eq!(spent(&f), (21, 21));
        let s = f.service.settle(d1, &f.passport, 21, Some(8), why::USAGE).await.expect("settle").to_json();
        assert_eq!((s["spend_delta_millicents"].as_i64(), s["spend_after_millicents"].as_u64()), (Some(-13), Some(8)));
        assert_eq!(spent(&f), (8, 8));
        // The API still shows whole cents, rounded up: 8 millicents is 1 cent, never 0.
        let state = f.service.state(&f.passport).expect("state").to_json();
        assert_eq!((state["window_cost_cents"].as_u64(), state["window_cost_millicents"].as_u64()), (Some(1), Some(8)));

        let d2 = allow(&f, 5).await;
        let s = f.service.settle(d2, &f.passport, 5, Some(42), why::USAGE).await.expect("settle").to_json();
        assert_eq!((s["spend_delta_millicents"].as_i64(), s["spend_after_millicents"].as_u64()), (Some(37), Some(50)));
        assert_eq!(spent(&f), (50, 50));
        let r = record(&f, s["attestation_id"].as_u64().expect("index"));
        assert_eq!((r["estimated_millicents"].as_u64(), r["actual_millicents"].as_u64()), (Some(5), Some(42)));
        let decision = record(&f, d2);
        assert_eq!(
            (decision["cost_millicents"].as_u64(), decision["spend_after_millicents"].as_u64()),
            (Some(5), Some(13))
        );

        let report = verified(&f).await;
        assert!(report.is_ok(), "{:?}", report.problems);
    }

    #[tokio::test]
    async fn a_decision_is_settled_once_and_only_as_recorded() {
        let f = fixture().await;
        let d = allow(&f, 400_005).await;
        // Not the estimate the decision spent: a caller cannot refund more than was charged.
        let e = f.service.settle(d, &f.passport, 400_000, Some(0), why::USAGE).await.unwrap_err();
        assert!(matches!(e, ServiceError::Invalid { .. }), "{e}");
        assert!(e.to_string().contains("spent $4.00005, not the estimate of $4.00 given"), "{e}");
        // Not this passport's record.
        let other = "pp_AAAAAAAAAAAAAAAAAAAAAA";
        assert!(f.service.settle(d, other, 400_005, Some(0), why::USAGE).await.is_err());
        // Not an allow decision: the passport's registration record.
        let e = f.service.settle(d - 1, &f.passport, 400_005, Some(0), why::USAGE).await.unwrap_err();
        assert!(matches!(e, ServiceError::Invalid { .. }), "{e}");
        // A record that does not exist.
        let e = f.service.settle(d + 1000, &f.passport, 400_005, Some(0), why::USAGE).await.unwrap_err();
        assert!(matches!(e, ServiceError::RecordNotFound(_)), "{e}");
        // Hostile figures and reasons.
        assert!(f.service.settle(d, &f.passport, 400_005, Some(MAX_MILLICENTS + 1), why::USAGE).await.is_err());
        assert!(f.service.settle(d, &f.passport, 400_005, Some(1), "Bad Reason").await.is_err());
        assert_eq!(spent(&f), (400_005, 400_005));

        f.service.settle(d, &f.passport, 400_005, Some(100_000), why::USAGE).await.expect("settle").to_json();
        let e = f.service.settle(d, &f.passport, 400_005, Some(0), why::USAGE).await.unwrap_err();
        assert!(matches!(e, ServiceError::AlreadySettled(_)), "{e}");
        assert_eq!(spent(&f), (100_000, 100_000));
    }

    #[tokio::test]
    async fn a_lying_settlement_is_named_by_the_verifier() {
        let f = fixture().await;
        let d = allow(&f, 500_000).await;
        f.service.settle(d, &f.passport, 500_000, Some(200_000), why::USAGE).await.expect("settle").to_json();
        // A writer that records a refund but claims the spend did not drop.
        let chain = f.passport.clone();
        let window = record(&f, d)["spend_window_start"].clone();
        let (_, appended) = f
            .service
            .ledger()
            .transact(move |_txn| {
                let body: serde_json::Map<String, Value> = serde_json::from_value(json!({
                    "v": 2, "kind": "settlement", "decision_record": d, "estimated_millicents": 500_000,
                    "actual_millicents": 100_000, "settled": true, "spend_window": "monthly",
                    "spend_window_start": window, "spend_delta_millicents": -100_000,
                    "spend_after_millicents": 200_000,
                }))
                .map_err(TxnError::abort)?;
                Ok(((), vec![Draft::new(chain, body)]))
            })
            .await
            .expect("append");
        let lie = appended[0].index;
        let report = verified(&f).await;
        assert!(
            report.problems.iter().any(|p| matches!(p, verify::Problem::SpendMismatch { index, expected: 100_000, found: 200_000, .. } if *index == lie)),
            "{:?}",
            report.problems
        );
    }
}
