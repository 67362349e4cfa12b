//! CEL rules (`sluice_decide::cel::CompiledRules`): `core:cel:rules` expressions from a passport
//! and `[[host.rule]]` expressions from host policies, compiled once and run per request.
//!
//! The first byte picks the rule's decision; the rest is the expression. Checks, beyond "never
//! panics":
//! * compiling never takes the process down (the parser recurses without limit: it runs on its
//!   own large stack, and a tree deeper than `MAX_AST_DEPTH` is refused); an error names rule 0
//!   and its expression, and longer than `MAX_EXPR_BYTES` is always refused;
//! * a compiled rule evaluates on a thread with tokio's default 2 MiB stack (where the proxy runs
//!   it) without overflowing it, to the same outcome twice, and an error outcome names the rule.
#![no_main]

use chrono::{TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use sluice_decide::cel::{CompiledRules, RuleInput, RulesOutcome, MAX_EXPR_BYTES};
use sluice_decide::usage::WindowCounter;
use sluice_decide::ActionRequest;
use sluice_passport::constraints::{CelRule, RuleDecision};
use sluice_passport::domain::DomainName;
use sluice_passport::{
    claims::Claims, Constraints, IssuerId, Passport, PassportId, Permission, SpendWindow, TrustTier,
};

fn passport() -> Passport {
    let issuer = IssuerId::from_key(&ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]).verifying_key());
    Passport {
        token: String::new(),
        claims: Claims {
            issuer,
            agent_id: "agent-1".into(),
            id: PassportId::parse("pp_0123456789abcdef0123456789abcdef").expect("an id"),
            issued_at: 1_800_000_000,
            not_before: 1_800_000_000,
            expires_at: 1_800_003_600,
            agent_name: None,
            permissions: vec![Permission::parse("llm:*").expect("a permission")],
            trust_tier: TrustTier::L1,
            constraints: Constraints::default(),
            cnf_jkt: "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k".into(),
        },
    }
}

/// libFuzzer's panic hook aborts on every panic, even one `catch_unwind` stops. sluice catches
/// panics of the CEL crate (compile: a refused rule; evaluate: `policy_error`), so panics raised
/// in a dependency's code are let through silently here; any other panic (sluice's own code, this
/// target's assertions, a panic that escapes) still aborts and is reported.
fn quiet_dependency_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_dependency = info.location().is_some_and(|l| l.file().contains("/.cargo/registry/"));
            if !in_dependency {
                abort(info);
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    quiet_dependency_panics();
    let Some((&pick, expr)) = data.split_first() else { return };
    let expr = String::from_utf8_lossy(expr).into_owned();
    let decision = if pick & 1 == 0 { RuleDecision::Block } else { RuleDecision::RequestHold };
    let rule = CelRule { expr: expr.clone(), decision, reason: "fuzz_rule".into() };
    let compiled = match CompiledRules::compile(std::slice::from_ref(&rule)) {
        Err(e) => {
            assert_eq!((e.index, e.expr.as_str()), (0, expr.as_str()));
            assert!(!e.message.is_empty());
            return;
        }
        Ok(c) => c,
    };
    assert!(expr.len() <= MAX_EXPR_BYTES, "a {} byte expression compiled", expr.len());
    assert_eq!(compiled.len(), 1);

    let outcome = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let passport = passport();
            let request = ActionRequest {
                action: "llm:chat".into(),
                cost_millicents: 150_500,
                host: Some(DomainName::parse("api.openai.com").expect("a name")),
                method: Some("POST".into()),
                path: Some("/v1/chat/completions".into()),
            };
            let now = Utc.timestamp_opt(1_800_000_100, 0).single().expect("a time");
            let counter = WindowCounter { start: now, spent_millicents: 1_000_000, requests: 7 };
            let input = RuleInput {
                passport: &passport,
                request: &request,
                window: SpendWindow::default(),
                spend: counter,
                daily: counter,
                now,
            };
            let first = compiled.evaluate(&input, false);
            assert_eq!(compiled.evaluate(&input, false), first, "not deterministic");
            let skipped = compiled.evaluate(&input, true);
            if decision == RuleDecision::RequestHold {
                assert_eq!(skipped, RulesOutcome::NoMatch { evaluated: 0 });
            } else {
                assert_eq!(skipped, first);
            }
            first
        })
        .expect("a thread")
        .join()
        .expect("evaluating on a 2 MiB stack");
    match outcome {
        RulesOutcome::NoMatch { evaluated } => assert_eq!(evaluated, 1),
        RulesOutcome::Matched { index, expr: e, .. } | RulesOutcome::Error { index, expr: e, .. } => {
            assert_eq!((index, e.as_str()), (0, expr.as_str()));
        }
    }
});
