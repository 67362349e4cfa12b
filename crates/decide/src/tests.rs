//! The decision engine end to end: every reason and detail, the guardrail order, windows, rate
//! edges, holds, and the attacks a budget must survive (overflow, clock steps, corrupt usage).

use super::usage::{SpendCounter, WindowCounter};
use super::*;
use chrono::TimeZone;
use ed25519_dalek::SigningKey;
use serde_json::{json, Value};
use sluice_passport::constraints::{CelRule, RuleDecision};
use sluice_passport::{Claims, SpendWindow};

const PID: &str = "pp_0123456789abcdef0123456789abcdef";

fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
}

/// 2026-05-01 12:00:00 UTC, a Friday.
fn t0() -> DateTime<Utc> {
    at(2026, 5, 1, 12, 0, 0)
}

/// A passport valid from 2025 to 2027 (through the real claims parser) with these constraints.
fn passport_with(permissions: &[&str], constraints: Value) -> CompiledPassport {
    let key = SigningKey::from_bytes(&[42u8; 32]);
    let issuer = sluice_passport::IssuerId::from_key(&key.verifying_key());
    let claims = json!({
        "iss": issuer.as_str(), "sub": "agent-1", "jti": PID,
        "iat": at(2025, 1, 1, 0, 0, 0).timestamp(), "nbf": at(2025, 1, 1, 0, 0, 0).timestamp(),
        "exp": at(2027, 1, 1, 0, 0, 0).timestamp(),
        "permissions": permissions, "trust_tier": "L1", "constraints": constraints,
        "cnf": {"jkt": "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"},
    });
    let claims = Claims::from_json(claims.as_object().unwrap()).unwrap();
    CompiledPassport::compile(Passport { token: String::new(), claims }).unwrap()
}

/// The same passport, valid until 2029 (for tests that run past 2027).
fn long_lived(p: CompiledPassport) -> CompiledPassport {
    let mut claims = p.passport.claims;
    claims.expires_at = at(2029, 1, 1, 0, 0, 0).timestamp();
    CompiledPassport::compile(Passport { token: String::new(), claims }).unwrap()
}

fn passport(constraints: Value) -> CompiledPassport {
    passport_with(&["web:*", "llm:*"], constraints)
}

/// A request costing `cents` whole cents.
fn req(action: &str, cents: u64) -> ActionRequest {
    req_mc(action, cents.saturating_mul(1000))
}

/// A request costing `millicents`.
fn req_mc(action: &str, millicents: u64) -> ActionRequest {
    ActionRequest {
        action: action.to_string(),
        cost_millicents: millicents,
        host: Some(DomainName::parse("api.example.com").unwrap()),
        method: Some("POST".to_string()),
        path: Some("/v1/chat".to_string()),
    }
}

fn eval(p: &CompiledPassport, u: &Usage, r: &ActionRequest, now: DateTime<Utc>) -> Evaluation {
    evaluate(p, u, r, &HostVerdict::Allow, now, EvalOptions::default())
}

/// Usage with `cents` whole cents already spent today (daily window) at `now`.
fn spent(window: SpendWindow, cents: u64, now: DateTime<Utc>) -> Usage {
    spent_mc(window, cents * 1000, now)
}

/// Usage with `millicents` already spent today (daily window) at `now`.
fn spent_mc(window: SpendWindow, millicents: u64, now: DateTime<Utc>) -> Usage {
    let mut u = Usage::default().rolled(window, now);
    if let Some(s) = u.spend.as_mut() {
        s.counter.spent_millicents = millicents;
        s.counter.requests = 1;
    }
    if let Some(d) = u.daily.as_mut() {
        d.spent_millicents = millicents;
        d.requests = 1;
    }
    u
}

fn names(e: &Evaluation) -> Vec<&str> {
    e.guardrails.iter().map(|g| &*g.name).collect()
}

/// A refusal at [`t0`]: the decision, the reason, the detail, the last guardrail failed and every
/// earlier one passed, in the documented order, and nothing counted.
fn assert_refused(e: &Evaluation, u: &Usage, decision: Decision, reason: &str, detail: &str) {
    assert_eq!((e.decision, e.reason.as_str()), (decision, reason), "{e:#?}");
    assert_eq!(e.detail, detail);
    let (last, before) = e.guardrails.split_last().unwrap();
    assert!(!last.passed && last.detail == e.detail, "{last:?}");
    assert!(before.iter().all(|g| g.passed), "{:?}", e.guardrails);
    assert_eq!(names(e), guardrail::ORDER[..e.guardrails.len()].to_vec());
    assert!(!e.all_passed());
    assert!(e.usage_to_persist().is_none());
    assert_eq!(e.spend_delta_millicents, 0);
    let window = e.spend_window;
    assert_eq!(e.usage_after, u.rolled(window, t0()), "a refused request changed the counters");
}

// ---------------------------------------------------------------------------------------------
// Allow

#[test]
fn allow_lists_every_guardrail_in_order_and_counts_the_request() {
    let p = passport(json!({
        "core:cost:max_per_action": 500, "core:cost:max_cumulative": 10000,
        "core:cost:approval_threshold": 400, "core:approval:required": false,
        "core:rate:max_per_minute": 60, "core:rate:max_per_hour": 1000, "core:rate:max_per_day": 10000,
        "core:scope:domain_allowlist": ["*.example.com"],
        "core:cel:rules": [{"expr": "request.method == 'DELETE'", "decision": "block", "reason": "no_deletes"}],
    }));
    let u = spent(SpendWindow::Daily, 150, t0());
    let e = eval(&p, &u, &req("llm:chat", 250), t0());
    assert_eq!((e.decision, e.reason.as_str()), (Decision::Allow, "allowed"));
    assert_eq!(e.detail, "All guardrails passed. Daily spend after this request: $4.00 (limit $100.00).");
    assert_eq!(names(&e), guardrail::ORDER.to_vec());
    assert!(e.all_passed());
    let details: Vec<&str> = e.guardrails.iter().map(|g| &*g.detail).collect();
    assert_eq!(
        details,
        [
            "well-formed",
            "valid until 2027-01-01T00:00:00Z",
            "llm:* covers llm:chat",
            "api.example.com matches *.example.com",
            "allowed by host policy",
            "59 of 60 per minute left after this request",
            "999 of 1000 per hour left after this request",
            "9999 of 10000 per day left after this request",
            "$2.50 within $5.00",
            "Daily spend would be $4.00 of $100.00",
            "1 of 1 rules evaluated, none matched",
            "not required",
            "$2.50 within $4.00",
        ]
    );
    assert_eq!(
        (e.spend_after_millicents, e.spend_delta_millicents, e.spend_window_start),
        (400_000, 250_000, at(2026, 5, 1, 0, 0, 0))
    );
    let after = e.usage_to_persist().unwrap();
    assert_eq!(after.daily.unwrap().spent_millicents, 400_000);
    assert_eq!(after.daily.unwrap().requests, 2);
    assert_eq!(after.spend.unwrap().counter.spent_millicents, 400_000);
    assert!(after.rate.per_minute.is_some() && after.rate.per_hour.is_some() && after.rate.per_day.is_some());
}

#[test]
fn a_passport_without_limits_allows_and_says_so() {
    let p = passport(json!({}));
    let e = eval(&p, &Usage::default(), &req("web:fetch", 0), t0());
    assert_eq!(e.decision, Decision::Allow);
    assert_eq!(e.detail, "All guardrails passed. Daily spend after this request: $0.00 (no limit).");
    let details: Vec<&str> = e.guardrails.iter().map(|g| &*g.detail).collect();
    assert_eq!(
        details[3..],
        [
            "no allowlist: any host",
            "allowed by host policy",
            "no per-minute limit",
            "no per-hour limit",
            "no per-day limit",
            "no per-action limit",
            "no cumulative limit; Daily spend would be $0.00",
            "no rules",
            "not required",
            "no approval threshold",
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Each refusal, its reason and its detail

#[test]
fn malformed_requests_are_refused_first() {
    let p = passport(json!({}));
    let u = Usage::default();
    let mut cases: Vec<(ActionRequest, &str)> = Vec::new();
    for action in ["", "LLM:chat", "llm::chat", "llm:*", ":x", "a b"] {
        cases.push((req(action, 0), "is not valid: use 1 to 128 characters"));
    }
    cases.push((req(&"a".repeat(129), 0), "is not valid"));
    cases.push((
        req_mc("llm:chat", u64::MAX),
        "Cost of $184467440737095.51615 is more than the largest amount sluice accepts ($90071992547.40991)",
    ));
    cases.push((req_mc("llm:chat", sluice_passport::money::MAX_MILLICENTS + 1), "Cost of $90071992547.40992 is more"));
    cases.push((ActionRequest { method: Some("GE T".into()), ..req("llm:chat", 0) }, "not a valid method token"));
    cases.push((ActionRequest { method: Some(String::new()), ..req("llm:chat", 0) }, "not a valid method token"));
    cases.push((ActionRequest { path: Some("/a\r\nHost: x".into()), ..req("llm:chat", 0) }, "control characters"));
    cases.push((ActionRequest { path: Some("/".repeat(8193)), ..req("llm:chat", 0) }, "longer than 8192"));
    for (r, needle) in cases {
        let e = eval(&p, &u, &r, t0());
        assert_eq!((e.decision, e.reason.as_str()), (Decision::Block, "invalid_request"), "{r:?}");
        assert!(e.detail.contains(needle), "{} should contain {needle}", e.detail);
        assert!(e.detail.len() < 600, "detail is bounded: {}", e.detail.len());
        assert_eq!(names(&e), ["request"]);
    }
}

#[test]
fn expired_and_not_yet_valid_passports_are_refused() {
    let p = passport(json!({}));
    let u = Usage::default();
    let late = at(2027, 1, 1, 0, 1, 0);
    let e = eval(&p, &u, &req("llm:chat", 0), late);
    assert_eq!((e.decision, e.reason.as_str()), (Decision::Block, "passport_expired"));
    assert_eq!(
        e.detail,
        format!("Passport {PID} expired at 2027-01-01T00:00:00Z (now 2027-01-01T00:01:00Z). Ask its issuer for a new passport.")
    );
    assert_eq!(names(&e), ["request", "passport_validity"]);
    // Within the 60 s skew the verifier also accepts, the passport still works.
    assert_eq!(eval(&p, &u, &req("llm:chat", 0), at(2027, 1, 1, 0, 0, 59)).decision, Decision::Allow);

    let early = at(2024, 12, 31, 23, 58, 0);
    let e = eval(&p, &u, &req("llm:chat", 0), early);
    assert_eq!((e.decision, e.reason.as_str()), (Decision::Block, "passport_not_yet_valid"));
    assert_eq!(
        e.detail,
        format!("Passport {PID} is not valid before 2025-01-01T00:00:00Z (now 2024-12-31T23:58:00Z). Wait, or ask its issuer for a passport valid now.")
    );
}

#[test]
fn an_action_no_permission_covers_is_refused() {
    let p = passport_with(&["web:fetch", "orders:*"], json!({}));
    let u = spent(SpendWindow::Daily, 0, t0());
    let e = eval(&p, &u, &req("llm:chat", 0), t0());
    assert_refused(
        &e,
        &u,
        Decision::Block,
        "permission_denied",
        &format!("Passport {PID} does not permit action \"llm:chat\". Its permissions: web:fetch, orders:*. Ask its issuer for a passport with a permission covering this action."),
    );
    // `orders:*` does not cover `orders` itself, nor `ordersx:read`.
    assert_eq!(eval(&p, &u, &req("orders", 0), t0()).reason, "permission_denied");
    assert_eq!(eval(&p, &u, &req("ordersx:read", 0), t0()).reason, "permission_denied");
    assert_eq!(eval(&p, &u, &req("orders:read", 0), t0()).decision, Decision::Allow);
}

#[test]
fn hosts_outside_the_allowlist_are_refused() {
    let p = passport(json!({"core:scope:domain_allowlist": ["api.example.com", "*.example.org"]}));
    let u = spent(SpendWindow::Daily, 0, t0());
    let with_host = |h: &str| ActionRequest { host: Some(DomainName::parse(h).unwrap()), ..req("web:fetch", 0) };
    let e = eval(&p, &u, &with_host("evil.test"), t0());
    assert_refused(
        &e,
        &u,
        Decision::Block,
        "domain_not_allowed",
        &format!("Host evil.test is not in the domain allowlist of passport {PID}: api.example.com, *.example.org."),
    );
    for h in ["evilexample.org", "example.org", "api.example.com.evil.test", "x.api.example.com"] {
        assert_eq!(eval(&p, &u, &with_host(h), t0()).reason, "domain_not_allowed", "{h}");
    }
    for h in ["API.Example.COM.", "a.example.org", "a.b.example.org"] {
        assert_eq!(eval(&p, &u, &with_host(h), t0()).decision, Decision::Allow, "{h}");
    }
    // A network action that names no host is refused; another action is not a network request.
    let no_host = |a: &str| ActionRequest { host: None, ..req(a, 0) };
    let e = eval(&p, &u, &no_host("web:send"), t0());
    assert_refused(
        &e,
        &u,
        Decision::Block,
        "domain_not_allowed",
        &format!("Action web:send is a network request but names no host, and passport {PID} allows only listed hosts. Name the target host."),
    );
    let e = eval(&p, &u, &no_host("llm:chat"), t0());
    assert_eq!(e.decision, Decision::Allow);
    assert_eq!(e.guardrails[3].detail, "not applicable: the request names no host");
}

#[test]
fn a_host_policy_denial_keeps_its_reason() {
    let p = passport(json!({}));
    let u = spent(SpendWindow::Daily, 0, t0());
    let deny = HostVerdict::Deny {
        reason: "policy_denied".into(),
        detail: "POST to /admin is denied by policy api.toml".into(),
    };
    let e = evaluate(&p, &u, &req("web:send", 0), &deny, t0(), EvalOptions::default());
    assert_refused(&e, &u, Decision::Block, "policy_denied", "POST to /admin is denied by policy api.toml");
    let deny = HostVerdict::Deny { reason: String::new().into(), detail: "denied".into() };
    let e = evaluate(&p, &u, &req("web:send", 0), &deny, t0(), EvalOptions::default());
    assert_eq!(e.reason, "policy_denied");
}

#[test]
fn rate_limits_refuse_with_the_time_to_retry_and_count_only_allowed_requests() {
    let p = passport(json!({"core:rate:max_per_minute": 2, "core:cost:max_per_action": 100}));
    let mut u = spent(SpendWindow::Daily, 0, t0());
    // A refused request (over the per-action limit) consumes no rate.
    for _ in 0..5 {
        assert_eq!(eval(&p, &u, &req("llm:chat", 101), t0()).reason, "per_action_limit_exceeded");
    }
    for _ in 0..2 {
        let e = eval(&p, &u, &req("llm:chat", 0), t0());
        assert_eq!(e.decision, Decision::Allow);
        u = e.usage_after;
    }
    let later = t0() + chrono::TimeDelta::seconds(10);
    let e = eval(&p, &u, &req("llm:chat", 0), later);
    assert_eq!((e.decision, e.reason.as_str()), (Decision::Block, "rate_limit_exceeded"));
    assert_eq!(
        e.detail,
        format!("Rate limit of 2 requests per minute reached for passport {PID}. The next request will be allowed in 20s, at 2026-05-01T12:00:30Z.")
    );
    assert_eq!(names(&e), guardrail::ORDER[..6].to_vec());
    assert_eq!(e.usage_after, u, "the refused request changed nothing");
    assert_eq!(eval(&p, &u, &req("llm:chat", 0), t0() + chrono::TimeDelta::seconds(30)).decision, Decision::Allow);
}

#[test]
fn rate_limits_stop_a_double_burst_across_a_minute_boundary() {
    let p = passport(json!({"core:rate:max_per_minute": 30}));
    let mut u = Usage::default();
    let mut allowed = 0;
    let before = at(2026, 5, 1, 12, 0, 59) + chrono::TimeDelta::milliseconds(900);
    let after = at(2026, 5, 1, 12, 1, 0) + chrono::TimeDelta::milliseconds(100);
    for now in std::iter::repeat_n(before, 30).chain(std::iter::repeat_n(after, 30)) {
        let e = eval(&p, &u, &req("llm:chat", 0), now);
        if e.decision == Decision::Allow {
            allowed += 1;
            u = e.usage_after;
        }
    }
    assert_eq!(allowed, 30, "a fixed window would have allowed 60");
}

#[test]
fn hour_and_day_limits_apply_after_the_minute_limit() {
    let p = passport(json!({"core:rate:max_per_minute": 10, "core:rate:max_per_hour": 3, "core:rate:max_per_day": 0}));
    let e = eval(&p, &Usage::default(), &req("llm:chat", 0), t0());
    assert_eq!(e.reason, "rate_limit_exceeded");
    assert_eq!(names(&e).last(), Some(&"rate_per_day"));
    assert_eq!(
        e.detail,
        format!("Rate limit of 0 requests per day reached for passport {PID}. The passport allows no requests at all.")
    );

    let p = passport(json!({"core:rate:max_per_minute": 10, "core:rate:max_per_hour": 3}));
    let mut u = Usage::default();
    for i in 0..3 {
        let e = eval(&p, &u, &req("llm:chat", 0), t0() + chrono::TimeDelta::seconds(i * 60));
        u = e.usage_after;
    }
    let e = eval(&p, &u, &req("llm:chat", 0), t0() + chrono::TimeDelta::seconds(200));
    assert_eq!(names(&e).last(), Some(&"rate_per_hour"));
    assert!(e.detail.starts_with("Rate limit of 3 requests per hour reached"), "{}", e.detail);
}

#[test]
fn per_action_limit_detail_names_the_limit_and_the_request() {
    let p = passport(json!({"core:cost:max_per_action": 500}));
    let u = spent(SpendWindow::Daily, 0, t0());
    let e = eval(&p, &u, &req("llm:chat", 750), t0());
    assert_refused(
        &e,
        &u,
        Decision::Block,
        "per_action_limit_exceeded",
        "Per-action limit of $5.00 exceeded. Requested: $7.50",
    );
    assert_eq!(eval(&p, &u, &req("llm:chat", 500), t0()).decision, Decision::Allow);
}

#[test]
fn cumulative_limit_detail_matches_the_documented_wording() {
    let p = passport(json!({"core:cost:max_cumulative": 10000}));
    let u = spent(SpendWindow::Daily, 9950, t0());
    let e = eval(&p, &u, &req("llm:chat", 500), t0());
    assert_refused(
        &e,
        &u,
        Decision::Block,
        "spend_limit_exceeded",
        "Daily spend limit of $100.00 would be exceeded. Current: $99.50, Requested: $5.00",
    );
    assert_eq!(e.spend_after_millicents, 9_950_000);
    // Exactly reaching the limit is allowed; one millicent more is not.
    let e = eval(&p, &u, &req("llm:chat", 50), t0());
    assert_eq!((e.decision, e.spend_after_millicents), (Decision::Allow, 10_000_000));
    assert_eq!(eval(&p, &e.usage_after, &req_mc("llm:chat", 1), t0()).reason, "spend_limit_exceeded");
    // A zero-cost request at the limit is still allowed.
    assert_eq!(eval(&p, &e.usage_after, &req("llm:chat", 0), t0()).decision, Decision::Allow);
}

#[test]
fn weekly_and_monthly_limits_name_their_window() {
    let p = passport(json!({"core:cost:max_cumulative": 1000, "core:cost:cumulative_window": "weekly"}));
    let u = spent(SpendWindow::Weekly, 900, t0());
    let e = eval(&p, &u, &req("llm:chat", 200), t0());
    assert_eq!(e.detail, "Weekly spend limit of $10.00 would be exceeded. Current: $9.00, Requested: $2.00");
    assert_eq!(e.spend_window_start, at(2026, 4, 27, 0, 0, 0));
    let p = passport(json!({"core:cost:max_cumulative": 1000, "core:cost:cumulative_window": "monthly"}));
    let u = spent(SpendWindow::Monthly, 900, t0());
    let e = eval(&p, &u, &req("llm:chat", 200), t0());
    assert_eq!(e.detail, "Monthly spend limit of $10.00 would be exceeded. Current: $9.00, Requested: $2.00");
    assert_eq!(e.spend_window_start, at(2026, 5, 1, 0, 0, 0));
}

#[test]
fn approval_required_and_threshold_hold_the_request() {
    let p = passport(json!({"core:approval:required": true}));
    let u = spent(SpendWindow::Daily, 0, t0());
    let e = eval(&p, &u, &req("llm:chat", 0), t0());
    assert_refused(
        &e,
        &u,
        Decision::RequestHold,
        "approval_required",
        &format!(
            "Passport {PID} requires an operator's approval for every request. Approve with `sluice holds approve`."
        ),
    );

    let p = passport(json!({"core:cost:approval_threshold": 2500}));
    let e = eval(&p, &u, &req("llm:chat", 3000), t0());
    assert_refused(
        &e,
        &u,
        Decision::RequestHold,
        "approval_threshold_exceeded",
        &format!("Cost $30.00 is above the approval threshold of $25.00 of passport {PID}. An operator must approve it (`sluice holds approve`)."),
    );
    assert_eq!(eval(&p, &u, &req("llm:chat", 2500), t0()).decision, Decision::Allow, "at the threshold is allowed");
}

// ---------------------------------------------------------------------------------------------
// Holds

#[test]
fn approving_a_hold_rechecks_every_limit_but_not_the_approval() {
    let p = passport(json!({
        "core:cost:approval_threshold": 1000, "core:cost:max_cumulative": 5000,
        "core:cel:rules": [
            {"expr": "action == 'llm:train'", "decision": "request_hold", "reason": "training_needs_approval"},
            {"expr": "request.path.startsWith('/admin')", "decision": "block", "reason": "no_admin"},
        ],
    }));
    let u = spent(SpendWindow::Daily, 1000, t0());
    let held = eval(&p, &u, &req("llm:chat", 2000), t0());
    assert_eq!((held.decision, held.reason.as_str()), (Decision::RequestHold, "approval_threshold_exceeded"));
    assert!(held.usage_to_persist().is_none());

    let approve = EvalOptions { skip_approval: true, ..Default::default() };
    let later = t0() + chrono::TimeDelta::seconds(60);
    let e = evaluate(&p, &u, &req("llm:chat", 2000), &HostVerdict::Allow, later, approve.clone());
    assert_eq!(e.decision, Decision::Allow);
    assert_eq!(e.guardrails.last().unwrap().detail, "approved by an operator");
    assert_eq!(e.usage_to_persist().unwrap().daily.unwrap().spent_millicents, 3_000_000);

    // While the request waited, other requests spent the budget: the approval does not bypass it.
    let meanwhile = spent(SpendWindow::Daily, 4000, t0());
    let e = evaluate(&p, &meanwhile, &req("llm:chat", 2000), &HostVerdict::Allow, later, approve.clone());
    assert_eq!(e.reason, "spend_limit_exceeded");

    // A CEL hold rule is an approval step too; a CEL block rule still applies.
    let train = req("llm:train", 0);
    assert_eq!(eval(&p, &u, &train, t0()).reason, "training_needs_approval");
    let e = evaluate(&p, &u, &train, &HostVerdict::Allow, later, approve.clone());
    assert_eq!(e.decision, Decision::Allow);
    assert_eq!(e.guardrails[10].detail, "1 of 2 rules evaluated, none matched");
    let admin = ActionRequest { path: Some("/admin/users".into()), ..req("llm:train", 0) };
    assert_eq!(evaluate(&p, &u, &admin, &HostVerdict::Allow, later, approve.clone()).reason, "no_admin");

    // The approval step itself: required approval is passed on approval.
    let p = passport(json!({"core:approval:required": true}));
    assert_eq!(
        evaluate(&p, &u, &req("llm:chat", 0), &HostVerdict::Allow, later, approve.clone()).decision,
        Decision::Allow
    );
}

// ---------------------------------------------------------------------------------------------
// CEL

fn rules(rules: Value) -> CompiledPassport {
    passport(json!({ "core:cel:rules": rules }))
}

#[test]
fn cel_rules_block_or_hold_with_their_own_reason() {
    let p = rules(json!([
        {"expr": "false", "decision": "block", "reason": "never"},
        {"expr": "request.method == 'DELETE'", "decision": "block", "reason": "no_deletes"},
        {"expr": "cost_cents > 1000", "decision": "request_hold", "reason": "big_spend"},
    ]));
    let u = spent(SpendWindow::Daily, 0, t0());
    let del = ActionRequest { method: Some("DELETE".into()), ..req("web:send", 0) };
    let e = eval(&p, &u, &del, t0());
    assert_refused(
        &e,
        &u,
        Decision::Block,
        "no_deletes",
        "Passport rule 1 (no_deletes) blocks this request: request.method == 'DELETE'",
    );
    assert_eq!(e.rule_index, Some(1));
    let e = eval(&p, &u, &req("web:send", 1001), t0());
    assert_refused(
        &e,
        &u,
        Decision::RequestHold,
        "big_spend",
        "Passport rule 2 (big_spend) holds for approval this request: cost_cents > 1000",
    );
    let e = eval(&p, &u, &req("web:send", 1000), t0());
    assert_eq!(e.decision, Decision::Allow);
    assert_eq!(e.guardrails[10].detail, "3 of 3 rules evaluated, none matched");
}

#[test]
fn cel_rules_see_the_documented_context() {
    let expr = [
        "request.method == 'POST'",
        "request.host == 'api.example.com'",
        "request.path == '/v1/chat'",
        "action == 'llm:chat'",
        "cost_cents == 250",
        "cost_millicents == 250000",
        "usage.spent_cents == 1000",
        "usage.spent_millicents == 1000000",
        "usage.window == 'weekly'",
        "usage.window_requests == 1",
        "usage.daily_spent_cents == 1000",
        "usage.daily_spent_millicents == 1000000",
        "usage.daily_requests == 1",
        &format!("passport.id == '{PID}'"),
        "passport.agent_id == 'agent-1'",
        "passport.issuer.startsWith('iss_')",
        "passport.trust_tier == 'L1'",
        "passport.permissions == ['web:*', 'llm:*']",
        "'llm:*' in passport.permissions",
        "now == timestamp('2026-05-01T12:00:00Z')",
        "now.getDayOfWeek() == 5",
    ]
    .join(" && ");
    let p = passport(json!({
        "core:cost:cumulative_window": "weekly",
        "core:cel:rules": [{"expr": expr, "decision": "block", "reason": "context_ok"}],
    }));
    let u = spent(SpendWindow::Weekly, 1000, t0());
    let e = eval(&p, &u, &req("llm:chat", 250), t0());
    assert_eq!((e.decision, e.reason.as_str()), (Decision::Block, "context_ok"), "{}", e.detail);

    // Unknown request fields are empty strings, never missing.
    let p = rules(
        json!([{"expr": "request.method == '' && request.host == '' && request.path == ''", "decision": "block", "reason": "empty"}]),
    );
    let bare = ActionRequest { action: "llm:chat".into(), cost_millicents: 0, host: None, method: None, path: None };
    assert_eq!(eval(&p, &Usage::default(), &bare, t0()).reason, "empty");
}

#[test]
fn cel_cents_round_fractions_up_and_millicents_are_exact() {
    // 42 millicents spent, a request of 5: in cents both round up to 1, so a guard written in
    // cents still catches a fraction above its line.
    let expr = "cost_cents == 1 && cost_millicents == 5 && usage.spent_cents == 1 && usage.spent_millicents == 42 \
                && usage.daily_spent_cents == 1 && usage.daily_spent_millicents == 42";
    let p = rules(json!([{"expr": expr, "decision": "block", "reason": "exact"}]));
    let u = spent_mc(SpendWindow::Daily, 42, t0());
    assert_eq!(eval(&p, &u, &req_mc("llm:chat", 5), t0()).reason, "exact");
    // `cost_cents > 100` holds for 100.001 cents, and not for exactly 100.
    let p = rules(json!([{"expr": "cost_cents > 100", "decision": "block", "reason": "over_a_dollar"}]));
    assert_eq!(eval(&p, &Usage::default(), &req_mc("llm:chat", 100_001), t0()).reason, "over_a_dollar");
    assert_eq!(eval(&p, &Usage::default(), &req_mc("llm:chat", 100_000), t0()).decision, Decision::Allow);
}

#[test]
fn details_show_fractions_of_a_cent() {
    let p = passport(
        json!({"core:cost:max_cumulative": 1, "core:cost:max_per_action": 1, "core:cost:approval_threshold": 0}),
    );
    let u = spent_mc(SpendWindow::Daily, 999, t0());
    let e = eval(&p, &u, &req_mc("llm:chat", 2), t0());
    assert_refused(
        &e,
        &u,
        Decision::Block,
        "spend_limit_exceeded",
        "Daily spend limit of $0.01 would be exceeded. Current: $0.00999, Requested: $0.00002",
    );
    let e = eval(&p, &u, &req_mc("llm:chat", 1_001), t0());
    assert_eq!(e.detail, "Per-action limit of $0.01 exceeded. Requested: $0.01001");
    let e = eval(&p, &u, &req_mc("llm:chat", 1), t0());
    assert_eq!(e.reason, "approval_threshold_exceeded");
    assert!(e.detail.starts_with("Cost $0.00001 is above the approval threshold of $0.00"), "{}", e.detail);
    let approve = EvalOptions { skip_approval: true, ..Default::default() };
    let e = evaluate(&p, &u, &req_mc("llm:chat", 1), &HostVerdict::Allow, t0(), approve);
    assert_eq!(e.decision, Decision::Allow);
    assert_eq!(e.detail, "All guardrails passed. Daily spend after this request: $0.01 (limit $0.01).");
    assert_eq!((e.spend_after_millicents, e.spend_delta_millicents), (1_000, 1));
}

/// Found by fuzzing (`fuzz/corpus/cel_rules/map-in-error`): the interpreter's message printed the
/// `request` map in hash order, so the same request was refused with a different detail (and
/// record) each time. Composite values are now named by their type.
#[test]
fn a_runtime_error_about_a_map_reads_the_same_every_time() {
    let p = rules(json!([{"expr": "request % 2 > 0", "decision": "block", "reason": "broken"}]));
    let u = spent(SpendWindow::Daily, 0, t0());
    let first = eval(&p, &u, &req("llm:chat", 1), t0());
    assert_eq!((first.decision, first.reason.as_str()), (Decision::Block, "policy_error"));
    assert!(first.detail.contains("Unsupported binary operator 'rem': Map, Int(2)"), "{}", first.detail);
    for _ in 0..20 {
        assert_eq!(eval(&p, &u, &req("llm:chat", 1), t0()).detail, first.detail);
    }
}

#[test]
fn cel_runtime_errors_and_non_bool_results_block_as_policy_error() {
    let cases = [
        ("unknown_variable > 3", "Undeclared reference to 'unknown_variable'"),
        ("request.nosuchfield == 'x'", "No such key: nosuchfield"),
        ("cost_cents / 0 == 1", "Division by zero"),
        ("cost_cents + 9223372036854775807 > 0", "Overflow"),
        ("action > 3", "found no matching overload"),
        ("action", "returned String, not a bool"),
        ("cost_cents", "returned Int, not a bool"),
        ("null", "returned Null, not a bool"),
    ];
    let u = spent(SpendWindow::Daily, 0, t0());
    for (expr, message) in cases {
        let p = rules(json!([
            {"expr": "false", "decision": "block", "reason": "first"},
            {"expr": expr, "decision": "request_hold", "reason": "broken"},
        ]));
        let e = eval(&p, &u, &req("llm:chat", 1), t0());
        assert_eq!((e.decision, e.reason.as_str()), (Decision::Block, "policy_error"), "{expr}: {e:#?}");
        assert!(
            e.detail.starts_with("Passport rule 1 (broken) could not be evaluated, so the request is blocked: "),
            "{}",
            e.detail
        );
        assert!(e.detail.contains(message), "{expr}: {} should contain {message}", e.detail);
        assert!(e.detail.ends_with(&format!("Expression: {}", detail::echo(expr))), "{}", e.detail);
        assert_eq!(e.rule_index, Some(1));
        assert_refused(&e, &u, Decision::Block, "policy_error", &e.detail);
    }
}

#[test]
fn a_rule_that_does_not_compile_refuses_the_passport_naming_the_rule() {
    let p = passport(json!({}));
    let mut claims = p.passport.claims.clone();
    claims.constraints.cel_rules = vec![
        CelRule { expr: "true".into(), decision: RuleDecision::Block, reason: "ok".into() },
        CelRule { expr: "request.method == ".into(), decision: RuleDecision::Block, reason: "broken".into() },
    ];
    let err = CompiledPassport::compile(Passport { token: String::new(), claims }).unwrap_err();
    assert_eq!(err.index, 1);
    assert_eq!(err.expr, "request.method == ");
    assert!(!err.message.is_empty());
    let shown = err.to_string();
    assert!(
        shown.starts_with("constraint core:cel:rules: rule 1 (\"request.method == \") does not compile: "),
        "{shown}"
    );
}

#[test]
fn hostile_expressions_neither_crash_the_compiler_nor_the_interpreter() {
    // Each fits the 4096-byte bound. Before compiling moved to a big-stack thread, the first two
    // aborted the whole process with a stack overflow inside the CEL parser.
    let cases = [
        (format!("{}true{}", "(".repeat(2040), ")".repeat(2040)), "Recursion"),
        (format!("{}1{}", "[".repeat(2047), "]".repeat(2047)), "Recursion"),
        (format!("{}1{}", "[(".repeat(1023), ")]".repeat(1023)), "Recursion"),
        (format!("{}1{}", "[".repeat(800), "][0]".repeat(800)), "Recursion"),
        (format!("{}0 == 0", "1 + ".repeat(1020)), "more than the 32 allowed"),
        (format!("request{}", ".a".repeat(2040)), "more than the 32 allowed"),
        (format!("{}x", "x.".repeat(2040)), "more than the 32 allowed"),
        ("true || ".repeat(600) + "true", "more than 4096 bytes"),
    ];
    for (expr, needle) in cases {
        let rule = CelRule { expr: expr.clone(), decision: RuleDecision::Block, reason: "x".into() };
        let err = CompiledRules::compile(&[rule]).unwrap_err();
        assert_eq!(err.index, 0);
        assert!(err.message.contains(needle), "{}…: {}", &expr[..20], err.message);
        assert!(err.to_string().len() < 1600, "the error an operator sees is bounded");
    }
    // Long but shallow expressions compile and run (`&&` chains are balanced, `!!` pairs fold).
    for expr in
        [vec!["true"; 500].join(" && "), format!("{}true", "!".repeat(4000)), format!("{}1 == 1", "-".repeat(4000))]
    {
        let p = rules(json!([{"expr": expr, "decision": "block", "reason": "x"}]));
        assert_eq!(eval(&p, &Usage::default(), &req("llm:chat", 0), t0()).decision, Decision::Block, "{}", &expr[..20]);
    }
}

#[test]
fn rules_at_the_depth_bound_evaluate_within_a_small_stack() {
    use super::cel::MAX_AST_DEPTH;
    // The deepest-recursing shapes, each just within the bound, and one level past it.
    type Shape = fn(usize) -> String;
    let shapes: [(Shape, usize); 4] = [
        (|n| format!("size({}[1]{}) == 1", "[1].map(x, ".repeat(n), ")".repeat(n)), 9),
        (|n| format!("{}true{}", "[1].all(x, ".repeat(n), ")".repeat(n)), 15),
        (|n| format!("{}1 == {}", "1 + ".repeat(n), n + 1), 30),
        (|n| format!("{}1{} == 1", "[".repeat(n), "][0]".repeat(n)), 15),
    ];
    for (shape, n) in shapes {
        let p = rules(json!([{"expr": shape(n), "decision": "block", "reason": "deep"}]));
        // 1.5 MiB: tokio's default worker stack, less room for the caller's own frames.
        let decision = std::thread::Builder::new()
            .stack_size(3 << 19)
            .spawn(move || eval(&p, &Usage::default(), &req("llm:chat", 0), t0()).reason)
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(decision, "deep", "{}", shape(n));
        let rule = CelRule { expr: shape(n + 2), decision: RuleDecision::Block, reason: "x".into() };
        let err = CompiledRules::compile(&[rule]).unwrap_err();
        assert!(err.message.contains(&format!("more than the {MAX_AST_DEPTH} allowed")), "{}", err.message);
    }
}

#[test]
fn compiled_passports_can_be_shared_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<CompiledPassport>();
    shareable::<Usage>();
    let p = std::sync::Arc::new(rules(json!([{"expr": "cost_cents > 5", "decision": "block", "reason": "big"}])));
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let p = std::sync::Arc::clone(&p);
            std::thread::spawn(move || eval(&p, &Usage::default(), &req("llm:chat", i * 3), t0()).decision)
        })
        .collect();
    let decisions: Vec<Decision> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(decisions, [Decision::Allow, Decision::Allow, Decision::Block, Decision::Block]);
}

// ---------------------------------------------------------------------------------------------
// Windows and clocks

/// Spends `cost` cents at each time in turn, returning the window spend after each allowed
/// request, in cents (every amount here is whole cents).
fn spend_series(p: &CompiledPassport, times: &[DateTime<Utc>], cost: u64) -> Vec<(Decision, u64)> {
    let mut u = Usage::default();
    times
        .iter()
        .map(|&now| {
            let e = eval(p, &u, &req("llm:chat", cost), now);
            if e.decision == Decision::Allow {
                u = e.usage_after.clone();
            }
            (e.decision, e.spend_after_millicents / 1000)
        })
        .collect()
}

#[test]
fn daily_budgets_roll_at_midnight_utc() {
    let p = long_lived(passport(json!({"core:cost:max_cumulative": 1000})));
    let times = [at(2026, 12, 31, 23, 0, 0), at(2026, 12, 31, 23, 59, 59), at(2027, 1, 1, 0, 0, 0)];
    let got = spend_series(&p, &times, 600);
    assert_eq!(got, [(Decision::Allow, 600), (Decision::Block, 600), (Decision::Allow, 600)]);
}

#[test]
fn weekly_budgets_roll_on_iso_monday() {
    let p = long_lived(passport(json!({"core:cost:max_cumulative": 1000, "core:cost:cumulative_window": "weekly"})));
    // Monday 2026-12-28 to Sunday 2027-01-03 is one ISO week, across the new year.
    let times = [at(2026, 12, 28, 0, 0, 0), at(2027, 1, 3, 23, 59, 59), at(2027, 1, 4, 0, 0, 0)];
    let got = spend_series(&p, &times, 600);
    assert_eq!(got, [(Decision::Allow, 600), (Decision::Block, 600), (Decision::Allow, 600)]);
}

#[test]
fn monthly_budgets_roll_on_the_first_including_leap_february_and_december() {
    let p = long_lived(passport(json!({"core:cost:max_cumulative": 1000, "core:cost:cumulative_window": "monthly"})));
    let times = [
        at(2028, 2, 1, 0, 0, 0),
        at(2028, 2, 29, 23, 59, 59), // leap day: still February
        at(2028, 3, 1, 0, 0, 0),
        at(2028, 12, 31, 23, 0, 0),
        at(2028, 12, 31, 23, 59, 59),
    ];
    let got = spend_series(&p, &times, 600);
    assert_eq!(
        got,
        [
            (Decision::Allow, 600),
            (Decision::Block, 600),
            (Decision::Allow, 600),
            (Decision::Allow, 600),
            (Decision::Block, 600)
        ]
    );
    let e = eval(&p, &Usage::default(), &req("llm:chat", 0), at(2028, 12, 31, 23, 59, 59));
    let view = state_view(&p, &e.usage_after, at(2028, 12, 31, 23, 59, 59)).unwrap();
    assert_eq!(view.window_resets_at, at(2029, 1, 1, 0, 0, 0));
}

#[test]
fn a_clock_stepping_back_never_unspends() {
    let p = passport(json!({"core:cost:max_cumulative": 1000}));
    let e = eval(&p, &Usage::default(), &req("llm:chat", 900), at(2026, 5, 2, 10, 0, 0));
    assert_eq!(e.decision, Decision::Allow);
    // The clock jumps back to the previous day: yesterday's window is not reopened empty.
    let back = at(2026, 5, 1, 10, 0, 0);
    let e2 = eval(&p, &e.usage_after, &req("llm:chat", 200), back);
    assert_eq!((e2.reason.as_str(), e2.spend_after_millicents), ("spend_limit_exceeded", 900_000));
    assert_eq!(e2.spend_window_start, at(2026, 5, 2, 0, 0, 0));
}

// ---------------------------------------------------------------------------------------------
// Overflow and corrupt state

#[test]
fn counters_near_overflow_refuse_instead_of_wrapping() {
    use sluice_passport::money::MAX_MILLICENTS;
    let p = passport(json!({}));
    let mut u = Usage::default().rolled(SpendWindow::Daily, t0());
    let near =
        WindowCounter { start: at(2026, 5, 1, 0, 0, 0), spent_millicents: MAX_MILLICENTS - 5, requests: u64::MAX };
    u.daily = Some(near);
    u.spend = Some(SpendCounter { window: SpendWindow::Daily, counter: near });
    let e = eval(&p, &u, &req_mc("llm:chat", 10), t0());
    assert_refused(
        &e,
        &u,
        Decision::Block,
        "spend_limit_exceeded",
        "Daily spend counter cannot count more. Current: $90071992547.40986, Requested: $0.0001",
    );
    // Up to the bound exactly; the request counter saturates rather than wraps.
    let e = eval(&p, &u, &req_mc("llm:chat", 5), t0());
    assert_eq!(e.decision, Decision::Allow);
    assert_eq!(e.usage_after.daily.unwrap().requests, u64::MAX);
    assert_eq!(e.spend_after_millicents, MAX_MILLICENTS);
    // A counter past the bound (only a hand-built one can be: stored usage is refused) or at
    // u64::MAX refuses too, never wraps.
    u.daily = Some(WindowCounter { spent_millicents: u64::MAX, ..near });
    u.spend = Some(SpendCounter {
        window: SpendWindow::Daily,
        counter: WindowCounter { spent_millicents: u64::MAX, ..near },
    });
    assert_eq!(eval(&p, &u, &req_mc("llm:chat", 1), t0()).reason, "spend_limit_exceeded");
    assert_eq!(eval(&p, &u, &req_mc("llm:chat", 0), t0()).reason, "spend_limit_exceeded");

    // The largest cost sluice counts against the largest limit a passport can name.
    let max = sluice_passport::constraints::MAX_CENTS;
    let p = passport(json!({"core:cost:max_cumulative": max, "core:cost:max_per_action": max}));
    let e = eval(&p, &Usage::default(), &req_mc("llm:chat", MAX_MILLICENTS), t0());
    assert_eq!(e.decision, Decision::Allow);
    assert_eq!(eval(&p, &e.usage_after, &req_mc("llm:chat", 1), t0()).reason, "spend_limit_exceeded");
    assert_eq!(eval(&p, &Usage::default(), &req("llm:chat", max), t0()).reason, "invalid_request");
    assert_eq!(eval(&p, &e.usage_after, &req("llm:chat", u64::MAX), t0()).reason, "invalid_request");
}

#[test]
fn usage_of_another_window_or_unreadable_usage_blocks() {
    let p = passport(json!({"core:cost:cumulative_window": "weekly"}));
    let u = spent(SpendWindow::Monthly, 0, t0());
    let e = eval(&p, &u, &req("llm:chat", 0), t0());
    assert_eq!((e.decision, e.reason.as_str()), (Decision::Block, "usage_corrupt"));
    assert!(
        e.detail.contains("spend was counted in a monthly window but the passport's window is weekly"),
        "{}",
        e.detail
    );
    assert!(e.usage_to_persist().is_none());
    assert!(state_view(&p, &u, t0()).is_err());

    let err = Usage::from_bytes(b"{\"version\":1}").unwrap_err();
    let e = Evaluation::usage_corrupt(&p, &err, t0());
    assert_eq!((e.decision, e.reason.as_str()), (Decision::Block, "usage_corrupt"));
    assert_eq!(names(&e), ["usage"]);
    assert!(e.detail.contains(&format!("sluice state reset {PID} --window all")), "{}", e.detail);
    assert!(e.usage_to_persist().is_none());
}

// ---------------------------------------------------------------------------------------------
// State and reset

#[test]
fn state_view_shows_daily_and_window_figures() {
    let p = passport(json!({
        "core:cost:max_cumulative": 5000, "core:cost:cumulative_window": "weekly",
        "core:rate:max_per_minute": 10, "core:rate:max_per_day": 100, "core:cost:max_per_action": 700,
    }));
    let mut u = Usage::default();
    for now in [at(2026, 4, 30, 9, 0, 0), t0(), t0()] {
        u = eval(&p, &u, &req("llm:chat", 300), now).usage_after;
    }
    let v = state_view(&p, &u, t0()).unwrap();
    let json = serde_json::to_value(&v).unwrap();
    assert_eq!(
        json,
        json!({
            "passport_id": PID,
            "daily_cost_cents": 600, "daily_cost_millicents": 600_000, "daily_cost_limit_cents": null,
            "daily_requests": 2, "daily_request_limit": 100,
            "daily_resets_at": "2026-05-02T00:00:00Z",
            "window": "weekly", "window_start": "2026-04-27T00:00:00Z",
            "window_cost_cents": 900, "window_cost_millicents": 900_000, "window_cost_limit_cents": 5000,
            "window_requests": 3,
            "window_resets_at": "2026-05-04T00:00:00Z",
            "max_per_action_cents": 700, "approval_threshold_cents": null,
            "rate_limits": [
                {"period": "minute", "limit": 10, "remaining": 8, "full_at": "2026-05-01T12:00:12Z"},
                {"period": "day", "limit": 100, "remaining": 98, "full_at": "2026-05-01T12:28:48Z"},
            ],
        })
    );
    // Next Monday the weekly figures start again; the daily ones rolled already.
    let v = state_view(&p, &u, at(2026, 5, 4, 0, 0, 0)).unwrap();
    assert_eq!((v.window_cost_cents, v.daily_cost_cents, v.daily_requests), (0, 0, 0));
}

#[test]
fn reset_clears_what_it_names_and_refuses_what_the_passport_has_not() {
    let p = passport(
        json!({"core:cost:max_cumulative": 5000, "core:cost:cumulative_window": "weekly", "core:rate:max_per_minute": 1}),
    );
    let mut u = Usage::default();
    for now in [at(2026, 4, 30, 9, 0, 0), t0()] {
        u = eval(&p, &u, &req("llm:chat", 300), now).usage_after;
    }
    let daily = reset(&p, &u, ResetWindow::Daily, t0()).unwrap();
    assert_eq!((daily.daily.unwrap().spent_millicents, daily.spend.unwrap().counter.spent_millicents), (0, 600_000));
    assert_eq!(daily.rate, u.rate);
    let weekly = reset(&p, &u, ResetWindow::Weekly, t0()).unwrap();
    assert_eq!((weekly.daily.unwrap().spent_millicents, weekly.spend.unwrap().counter.spent_millicents), (300_000, 0));
    assert_eq!(weekly.spend.unwrap().counter.start, at(2026, 4, 27, 0, 0, 0));
    let err = reset(&p, &u, ResetWindow::Monthly, t0()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("passport {PID} counts spend per weekly window, so there is no monthly budget to reset; use --window weekly or --window all")
    );
    // `all` also refills the rate limit, so the next request is allowed at once.
    assert_eq!(eval(&p, &u, &req("llm:chat", 0), t0()).reason, "rate_limit_exceeded");
    let all = reset(&p, &u, ResetWindow::All, t0()).unwrap();
    assert_eq!(all.rate, Default::default());
    assert_eq!(eval(&p, &all, &req("llm:chat", 0), t0()).decision, Decision::Allow);
    assert_eq!(ResetWindow::parse("all"), Some(ResetWindow::All));
    assert_eq!(ResetWindow::parse("yearly"), None);

    // A daily passport's budget is its daily counter.
    let p = passport(json!({"core:cost:max_cumulative": 5000}));
    let u = spent(SpendWindow::Daily, 4000, t0());
    let r = reset(&p, &u, ResetWindow::Daily, t0()).unwrap();
    assert_eq!(eval(&p, &r, &req("llm:chat", 5000), t0()).decision, Decision::Allow);
}

// ---------------------------------------------------------------------------------------------
// Property: a budget is never exceeded

mod properties {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Whatever the costs (whole cents or fractions of one) and however the clock moves
        /// (forwards across windows, or backwards), the allowed costs counted in any one window
        /// never exceed `max_cumulative`, and the reported spend is exactly their sum.
        #[test]
        fn allowed_spend_in_a_window_never_exceeds_the_limit(
            limit in 0u64..5_000,
            window in prop_oneof![Just("daily"), Just("weekly"), Just("monthly")],
            steps in proptest::collection::vec(
                (prop_oneof![0u64..3_000_000, 0u64..50], -100_000i64..200_000),
                1..60,
            ),
        ) {
            let p = passport(json!({"core:cost:max_cumulative": limit, "core:cost:cumulative_window": window}));
            let limit = limit * 1000;
            let mut u = Usage::default();
            let mut now = t0();
            let mut per_window: HashMap<DateTime<Utc>, u64> = HashMap::new();
            for (cost, step) in steps {
                now += chrono::TimeDelta::seconds(step);
                let e = eval(&p, &u, &req_mc("llm:chat", cost), now);
                if e.decision == Decision::Allow {
                    let sum = per_window.entry(e.spend_window_start).or_default();
                    *sum += cost;
                    prop_assert!(*sum <= limit, "window {} spent {} > {}", e.spend_window_start, sum, limit);
                    prop_assert_eq!(e.spend_after_millicents, *sum);
                    u = e.usage_after;
                } else {
                    prop_assert_eq!(e.reason.as_str(), "spend_limit_exceeded");
                    prop_assert!(e.spend_after_millicents + cost > limit);
                }
            }
        }

        /// Sums never overflow or panic, whatever is stored and whatever is asked: counting is
        /// checked (an allowed request adds exactly its cost; a sum that would not fit is refused,
        /// never wrapped or clamped), the request counter saturates, the state view and a
        /// settlement of any delta stay in range, and usage round-trips through its stored form.
        #[test]
        fn sums_never_overflow_or_panic(
            spent in prop_oneof![any::<u64>(), (u64::MAX - 1_000_000)..=u64::MAX, 0u64..1_000_000],
            requests in any::<u64>(),
            cost in prop_oneof![any::<u64>(), 0u64..=sluice_passport::money::MAX_MILLICENTS, 0u64..100],
            limit in prop_oneof![Just(None), (0u64..=sluice_passport::constraints::MAX_CENTS).prop_map(Some)],
            delta in any::<i64>(),
        ) {
            let p = match limit {
                Some(l) => passport(json!({"core:cost:max_cumulative": l})),
                None => passport(json!({})),
            };
            let mut u = Usage::default().rolled(SpendWindow::Daily, t0());
            u.daily = Some(WindowCounter { start: at(2026, 5, 1, 0, 0, 0), spent_millicents: spent, requests });
            u.spend = Some(SpendCounter { window: SpendWindow::Daily, counter: u.daily.unwrap() });
            let e = eval(&p, &u, &req_mc("llm:chat", cost), t0());
            let fits = spent.checked_add(cost).filter(|s| *s <= sluice_passport::money::MAX_MILLICENTS);
            match e.decision {
                Decision::Allow => {
                    prop_assert_eq!(Some(e.spend_after_millicents), fits);
                    prop_assert_eq!(e.spend_delta_millicents, cost);
                    prop_assert!(cost <= sluice_passport::money::MAX_MILLICENTS);
                    prop_assert!(limit.is_none_or(|l| e.spend_after_millicents <= l * 1000));
                    prop_assert_eq!(e.usage_after.daily.unwrap().requests, requests.saturating_add(1));
                }
                _ => {
                    prop_assert!(
                        e.reason == "invalid_request" || e.reason == "spend_limit_exceeded",
                        "{}: {}", e.reason, e.detail
                    );
                    prop_assert_eq!(e.spend_after_millicents, spent);
                    prop_assert_eq!(e.spend_delta_millicents, 0);
                }
            }
            let view = state_view(&p, &e.usage_after, t0()).unwrap();
            prop_assert_eq!(view.daily_cost_cents, e.usage_after.daily.unwrap().spent_millicents.div_ceil(1000));
            let settled = super::super::settle(&e.usage_after, SpendWindow::Daily, t0(), delta, t0());
            let s = settled.spend.unwrap();
            let before = i128::from(e.usage_after.daily.unwrap().spent_millicents);
            prop_assert_eq!(i128::from(s.after_millicents), before + i128::from(s.delta_millicents));
            // Stored usage reads back exactly, or (a hand-built count past the bound) not at all.
            let back = Usage::from_bytes(&settled.usage.to_bytes());
            let in_range = [settled.usage.daily, settled.usage.spend.map(|s| s.counter)]
                .iter()
                .flatten()
                .all(|c| c.spent_millicents <= sluice_passport::money::MAX_MILLICENTS);
            if in_range {
                prop_assert_eq!(back, Ok(settled.usage.clone()));
            } else {
                prop_assert!(back.is_err());
            }
        }
    }
}
