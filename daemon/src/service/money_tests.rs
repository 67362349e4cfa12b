//! Money through the real service path: fractions of a cent add up in the counters, the records
//! and `audit verify`, and a store written when money was whole cents keeps its budget.

use super::testkit::{fixture_with, spent, verified};
use super::*;
use crate::decide::usage::{window_start, USAGE_VERSION};
use crate::ledger::{export, verify, HostKey, LedgerOptions};
use crate::passport::{Cents, Constraints, Permission, SpendWindow, TrustTier};
use crate::policy::meter::{self, MeterKind, MeterSpec};
use crate::service::Peer;
use ed25519_dalek::SigningKey;
use serde_json::Map;

fn peer() -> Peer {
    Peer { uid: 0, gid: 0, pid: 1, user: Some("root".into()) }
}

fn input(passport_id: &str, cost_millicents: u64) -> EnforceInput {
    EnforceInput {
        passport_id: passport_id.to_string(),
        action: "llm:chat".into(),
        cost_cents: None,
        cost_millicents: Some(cost_millicents),
        target: Some("api.example.test".into()),
        method: Some("POST".into()),
        path: Some("/v1/chat/completions".into()),
        port: None,
        signed_request_hash: None,
        gate_price: None,
    }
}

/// A model at $0.05 per million output tokens (nothing for input): a call with `max_tokens`
/// 1000 is estimated at exactly $0.00005, 5 millicents.
fn tiny_model() -> MeterSpec {
    super::testkit::one_price_meter(MeterKind::OpenAi, 0, 5_000)
}

/// 10,000 calls of a $0.00005 model cost $0.50. When every call was rounded up to a cent they
/// cost $100, and a $0.50 budget stopped after 50 calls. The budget check is exact at the edge:
/// $0.50 allows exactly 10,000 calls and blocks the 10,001st.
#[tokio::test]
async fn ten_thousand_calls_of_a_five_millicent_model_charge_fifty_cents() {
    let f = fixture_with(Constraints {
        max_cumulative: Some(Cents(50)),
        cumulative_window: Some(SpendWindow::Daily),
        ..Constraints::default()
    })
    .await;
    let cost = meter::estimate(&tiny_model(), br#"{"model":"m","max_tokens":1000,"messages":[]}"#);
    assert_eq!(cost, 5, "the estimate is 5 millicents, not a cent");

    // All at once, as a busy agent would: the group commit takes them in batches.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..10_000 {
        let service = f.service.clone();
        let input = input(&f.passport, cost);
        calls.spawn(async move { service.enforce(input).await });
    }
    let mut allowed = 0;
    while let Some(done) = calls.join_next().await {
        let decision = done.expect("task").expect("enforce").to_json();
        assert_eq!(decision["decision"], "allow", "{decision}");
        allowed += 1;
    }
    assert_eq!(allowed, 10_000);
    assert_eq!(spent(&f), (50_000, 50_000), "10,000 × $0.00005 = $0.50");
    let state = f.service.state(&f.passport).expect("state").to_json();
    assert_eq!((state["window_cost_cents"].as_u64(), state["daily_requests"].as_u64()), (Some(50), Some(10_000)));

    // The 10,001st is one millicent-multiple too many.
    let d = f.service.enforce(input(&f.passport, cost)).await.expect("enforce").to_json();
    assert_eq!((d["decision"].as_str(), d["reason"].as_str()), (Some("block"), Some("spend_limit_exceeded")), "{d}");
    assert_eq!(d["detail"], "Daily spend limit of $0.50 would be exceeded. Current: $0.50, Requested: $0.00005");
    // A free request at the limit still passes; the spend stays exactly $0.50.
    assert_eq!(f.service.enforce(input(&f.passport, 0)).await.expect("enforce").to_json()["decision"], "allow");
    assert_eq!(spent(&f), (50_000, 50_000));

    let report = verified(&f).await;
    assert!(report.is_ok(), "{:?}", report.problems);
    assert!(report.records_checked > 10_002, "{}", report.records_checked);
}

#[tokio::test]
async fn enforce_takes_whole_cents_or_exact_millicents_but_not_both() {
    let f = fixture_with(Constraints::default()).await;
    let mut both = input(&f.passport, 5);
    both.cost_cents = Some(1);
    let e = f.service.enforce(both).await.unwrap_err();
    assert!(matches!(&e, ServiceError::Invalid { field: "cost", problem } if problem.contains("not both")), "{e}");

    let mut cents = input(&f.passport, 0);
    (cents.cost_cents, cents.cost_millicents) = (Some(3), None);
    let d = f.service.enforce(cents).await.expect("enforce").to_json();
    let record = super::testkit::record(&f, d["attestation_id"].as_u64().expect("id"));
    assert_eq!((record["cost_millicents"].as_u64(), record["v"].as_u64()), (Some(3_000), Some(2)));
    assert!(record.get("cost_cents").is_none(), "{record}");

    // Cents too large to count in millicents saturate and are refused as too large, attested.
    let mut huge = input(&f.passport, 0);
    (huge.cost_cents, huge.cost_millicents) = (Some(u64::MAX), None);
    let d = f.service.enforce(huge).await.expect("enforce").to_json();
    assert_eq!(d["reason"], "invalid_request", "{d}");
    assert_eq!(spent(&f), (3_000, 3_000));
}

// ---------------------------------------------------------------------------------------------
// A store written by the version that counted whole cents.

/// The log written by that version's daemon (`sluice audit export`): decisions, a hold and its
/// approval, a counter reset, all with whole-cent fields and `"v": 1`.
const V1_EXPORT: &str = include_str!("../../../crates/ledger/src/testdata/v1-export.json");

/// The body fields (besides the writer's `chain`, `log_index`, `seq`, `prev_hash`) of a version 1
/// record of `kind` with `decision`, as that daemon wrote them.
fn v1_fields(kind: &str, decision: &str) -> Vec<String> {
    let bundle: serde_json::Value = serde_json::from_str(V1_EXPORT).expect("fixture");
    let records = bundle["records"].as_array().expect("records");
    let body = records
        .iter()
        .map(|r| serde_json::from_str::<Value>(r["record"].as_str().expect("text")).expect("record"))
        .find(|r| r["kind"] == kind && (decision.is_empty() || r["decision"] == decision))
        .unwrap_or_else(|| panic!("no {kind} {decision} record in the fixture"));
    let mut keys: Vec<String> = body
        .as_object()
        .expect("object")
        .keys()
        .filter(|k| !["chain", "log_index", "seq", "prev_hash"].contains(&k.as_str()))
        .cloned()
        .collect();
    keys.sort();
    keys
}

/// What the old daemon knew about one passport.
struct OldPassport<'a> {
    claims: &'a crate::passport::Claims,
    window_start: String,
}

impl OldPassport<'_> {
    fn base(&self, kind: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("v".into(), 1.into());
        m.insert("kind".into(), kind.into());
        m.insert("time".into(), drafts::time(now()).into());
        m.insert("passport_id".into(), self.claims.id.as_str().into());
        m.insert("issuer".into(), self.claims.issuer.as_str().into());
        m.insert("agent_id".into(), self.claims.agent_id.clone().into());
        m
    }

    fn spend(&self, m: &mut Map<String, Value>, delta: i64, after: u64) {
        m.insert("spend_window".into(), "monthly".into());
        m.insert("spend_window_start".into(), self.window_start.clone().into());
        m.insert("spend_delta_cents".into(), delta.into());
        m.insert("spend_after_cents".into(), after.into());
    }

    /// A decision record as version 1 wrote it (whole cents).
    fn decision(&self, decision: &str, reason: &str, cost_cents: u64, delta: i64, after: u64) -> Map<String, Value> {
        let mut m = self.base("decision");
        m.insert("decision".into(), decision.into());
        m.insert("reason".into(), reason.into());
        m.insert("detail".into(), "written by the cents version".into());
        m.insert("policy_digest".into(), Value::Null);
        m.insert("action".into(), "llm:chat".into());
        m.insert("method".into(), Value::Null);
        m.insert("host".into(), Value::Null);
        m.insert("path_digest".into(), Value::Null);
        m.insert("cost_cents".into(), cost_cents.into());
        m.insert("request_hash".into(), "ab".repeat(32).into());
        self.spend(&mut m, delta, after);
        m
    }

    /// A settlement record as version 1 wrote it.
    fn settlement(&self, decision_record: u64, estimated: u64, actual: u64, after: u64) -> Map<String, Value> {
        let mut m = self.base("settlement");
        m.insert("decision_record".into(), decision_record.into());
        m.insert("estimated_cents".into(), estimated.into());
        m.insert("actual_cents".into(), actual.into());
        m.insert("settled".into(), true.into());
        m.insert("reason".into(), "usage_reported".into());
        let delta = i64::try_from(actual).expect("small") - i64::try_from(estimated).expect("small");
        self.spend(&mut m, delta, after);
        m
    }
}

/// The previous version's daemon ran on this store: it registered a passport ($10 a month,
/// approval above $3), allowed 250 + 1 cents, held a 400-cent request for approval (made through
/// the API, so it survives a restart), allowed a metered request estimated at 7 cents and settled
/// it at 3. Its counters say 254 cents. Everything it wrote has whole-cent fields.
///
/// The new daemon starts on that store: the budget is exactly what it was (254 cents, now
/// 254,000 millicents), fractions of a cent count from there, the old hold is approved at its
/// cost, an old decision can still be settled, and `audit verify` sums the chain's spend across
/// the switch without a problem.
#[tokio::test]
async fn a_store_written_in_cents_keeps_its_budget_and_verifies_across_the_switch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ledger.redb");
    let host = || HostKey::from_signing_key(SigningKey::from_bytes(&[11u8; 32]));
    let issuer = SigningKey::from_bytes(&[12u8; 32]);
    let issued = crate::passport::issue(
        crate::passport::IssueRequest {
            agent_id: "old-agent".into(),
            agent_name: None,
            permissions: vec![Permission::parse("llm:*").expect("permission")],
            constraints: Constraints {
                max_cumulative: Some(Cents(1_000)),
                cumulative_window: Some(SpendWindow::Monthly),
                approval_threshold: Some(Cents(300)),
                ..Constraints::default()
            },
            trust_tier: TrustTier::L1,
            lifetime_secs: 3600,
            now: crate::passport::now(),
        },
        &issuer,
    )
    .expect("issue");
    let claims = issued.claims.clone();
    let id = claims.id.to_string();
    let start = now();
    let old = OldPassport { claims: &claims, window_start: drafts::time(window_start(SpendWindow::Monthly, start)) };

    // The old daemon's writes, each in its own transaction as it made them.
    let (d_250, d_7, hold_id) = {
        let ledger = Ledger::open(&path, host(), LedgerOptions::default()).expect("ledger");
        let append = |body: Map<String, Value>, state: Vec<(String, Vec<u8>)>| {
            let chain = id.clone();
            let ledger = &ledger;
            async move {
                let ((), appended) = ledger
                    .transact(move |txn: &mut Txn<'_>| {
                        for (k, v) in &state {
                            txn.put(k, v)?;
                        }
                        Ok(((), vec![Draft::new(chain, body)]))
                    })
                    .await
                    .expect("append");
                appended[0].index
            }
        };
        let mut registered = old.base("passport_registered");
        registered.insert("trust_tier".into(), "L1".into());
        registered.insert("expires_at".into(), claims.expires_at.into());
        registered.insert("token_sha256".into(), drafts::sha256_hex(issued.token.as_bytes()).into());
        registered.insert("by".into(), peer().to_json());
        append(registered, vec![(format!("passport/{id}"), issued.token.as_bytes().to_vec())]).await;
        let d_250 = append(old.decision("allow", "allowed", 250, 250, 250), vec![]).await;
        append(old.decision("allow", "allowed", 1, 1, 251), vec![]).await;

        let hold_id = "hold_0123456789abcdef01234567".to_string();
        let mut held = old.decision("request_hold", "approval_threshold_exceeded", 400, 0, 251);
        held.insert("hold_id".into(), hold_id.clone().into());
        held.insert("hold_expires_at".into(), drafts::time(start + chrono::Duration::hours(1)).into());
        let hold_record = ledger.size();
        let stored_hold = json!({
            "id": hold_id, "passport_id": id, "agent_id": "old-agent", "status": "pending", "origin": "api",
            "created_at": start, "expires_at": start + chrono::Duration::hours(1),
            "request": {"action": "llm:chat", "cost_cents": 400, "host": null, "method": null, "path": null},
            "record_index": hold_record, "resolution": null,
        });
        append(held, vec![(format!("hold/{hold_id}"), stored_hold.to_string().into_bytes())]).await;

        let d_7 = append(old.decision("allow", "allowed", 7, 7, 258), vec![]).await;
        // The settlement moved the counters to 254 cents: version 1 usage, whole cents.
        let day = drafts::time(window_start(SpendWindow::Daily, start)).replace(".000000Z", "Z");
        let month = old.window_start.replace(".000000Z", "Z");
        let usage = format!(
            r#"{{"version":1,"daily":{{"start":"{day}","spent_cents":254,"requests":3}},"spend":{{"window":"monthly","counter":{{"start":"{month}","spent_cents":254,"requests":3}}}},"rate":{{"per_minute":null,"per_hour":null,"per_day":null}}}}"#
        );
        let settled = vec![(format!("usage/{id}"), usage.into_bytes()), (format!("settled/{d_7}"), b"1".to_vec())];
        append(old.settlement(d_7, 7, 3, 254), settled).await;
        ledger.shutdown();
        (d_250, d_7, hold_id)
    };

    // The records built here have exactly the fields the old daemon wrote (see the fixture).
    let ledger = Ledger::open(&path, host(), LedgerOptions::default()).expect("reopen");
    let body = |index: u64| -> Value {
        serde_json::from_slice(&ledger.record(index).expect("read").expect("exists")).expect("json")
    };
    let keys = |v: &Value, extra: &[&str]| {
        let mut k: Vec<String> = v
            .as_object()
            .expect("object")
            .keys()
            .filter(|k| {
                !["chain", "log_index", "seq", "prev_hash"].contains(&k.as_str()) && !extra.contains(&k.as_str())
            })
            .cloned()
            .collect();
        k.sort();
        k
    };
    assert_eq!(keys(&body(d_250), &[]), v1_fields("decision", "allow"));
    assert_eq!(keys(&body(d_250 - 1), &[]), v1_fields("passport_registered", ""));
    assert_eq!(keys(&body(d_250 + 2), &[]), v1_fields("decision", "request_hold"));

    // The new daemon starts on it.
    let config = ServiceConfig::passport_only(
        vec![crate::passport::IssuerId::from_key(&issuer.verifying_key())],
        Duration::from_secs(3600),
    );
    let service = Service::start(ledger, config).await.expect("service");
    let state = service.state(&id).expect("state").to_json();
    assert_eq!(
        (state["window_cost_millicents"].as_u64(), state["window_cost_cents"].as_u64()),
        (Some(254_000), Some(254)),
        "the budget survives the upgrade exactly: {state}"
    );

    // The old hold is listed with its cost in both units.
    let holds = service.holds().expect("holds").to_json();
    let listed = &holds["holds"][0];
    assert_eq!(listed["id"], hold_id);
    assert_eq!(
        (listed["request"]["cost_cents"].as_u64(), listed["request"]["cost_millicents"].as_u64()),
        (Some(400), Some(400_000))
    );

    // Fractions of a cent from here on: 5 millicents, settled at 42.
    let d = service.enforce_outcome(input(&id, 5), HoldOrigin::Proxy, HostVerdict::Allow).await.expect("enforce");
    assert_eq!(d.decision, decide::Decision::Allow, "{}", d.to_json());
    let new_record: Value =
        serde_json::from_slice(&service.ledger().record(d.attestation_id).expect("read").expect("exists"))
            .expect("json");
    assert_eq!(
        (
            new_record["v"].as_u64(),
            new_record["cost_millicents"].as_u64(),
            new_record["spend_after_millicents"].as_u64()
        ),
        (Some(2), Some(5), Some(254_005)),
        "{new_record}"
    );
    service.settle(d.attestation_id, &id, 5, Some(42), settlement::why::USAGE).await.expect("settle").to_json();
    // The old hold, approved now at its whole-cent cost.
    let approved = service.resolve_hold(&hold_id, true, &peer(), None).await.expect("approve").to_json();
    assert_eq!(approved["decision"], "allow", "{approved}");
    // An old decision settled after the upgrade: its cents are read exactly (250 → 249.999).
    let s =
        service.settle(d_250, &id, 250_000, Some(249_999), settlement::why::USAGE).await.expect("settle old").to_json();
    assert_eq!(s["spend_delta_millicents"], -1);
    // And a whole-cent request through the API.
    let mut whole = input(&id, 0);
    (whole.cost_cents, whole.cost_millicents) = (Some(1), None);
    assert_eq!(service.enforce(whole).await.expect("enforce").to_json()["decision"], "allow");
    // The old decision already settled by the old daemon stays settled.
    assert!(matches!(
        service.settle(d_7, &id, 7_000, Some(1), settlement::why::USAGE).await,
        Err(ServiceError::AlreadySettled(_))
    ));

    let expected = 254_000 + 42 + 400_000 - 1 + 1_000;
    let state = service.state(&id).expect("state").to_json();
    assert_eq!(state["window_cost_millicents"].as_u64(), Some(expected), "{state}");
    assert_eq!(state["window_cost_cents"].as_u64(), Some(expected.div_ceil(1000)), "rounded up: {state}");
    // Stored as version 2, exactly.
    let stored = Usage::from_bytes(&service.ledger().state_get(&format!("usage/{id}")).expect("get").expect("usage"))
        .expect("usage");
    assert_eq!(stored.version, USAGE_VERSION);
    assert_eq!(stored.spend.map(|s| s.counter.spent_millicents), Some(expected));

    // `audit verify` recomputes the chain's spend through both formats.
    let bundle = export::export(
        service.ledger(),
        &export::ExportRequest { passport: None, since: None, consistency_from: None },
    )
    .await
    .expect("export");
    let report = verify::verify_export(&bundle, &service.ledger().host_public_key(), None);
    assert!(report.is_ok(), "{:?}", report.problems);
    let last: Value = serde_json::from_str(&bundle.records.last().expect("records").record).expect("json");
    assert_eq!(last["spend_after_millicents"].as_u64(), Some(expected), "{last}");

    // A lie after the switch is still caught, in millicents.
    let mut forged = bundle.clone();
    let n = forged.records.len() - 1;
    let mut body: Map<String, Value> = serde_json::from_str(&forged.records[n].record).expect("json");
    body.insert("spend_after_millicents".into(), (expected + 1).into());
    forged.records[n].record =
        String::from_utf8(crate::ledger::canonical::canonicalize_object(&body).expect("canonical")).expect("utf8");
    let report = verify::verify_export(&forged, &service.ledger().host_public_key(), None);
    let wanted = i64::try_from(expected).expect("small");
    assert!(
        report.problems.iter().any(|p| matches!(p,
            verify::Problem::SpendMismatch { expected: e, found: f, field, .. }
                if *e == wanted && *f == wanted + 1 && field == "spend_after_millicents")),
        "{:?}",
        report.problems
    );
}
