//! `cargo bench -p sluice-ledger --bench records`: building and sealing one typical decision
//! record, the way the daemon's `service/drafts.rs` builds it, two ways:
//! - `serde_json`: the body as a `serde_json::Map` filled field by field, then sealed by
//!   inserting the writer's fields and canonicalising the object (how records were written
//!   before [`Members`]);
//! - `members`: the body written straight into [`Members`], sealed by `record::seal`.
//!
//! Both produce the same bytes (checked before timing). A plain timed loop: the median of
//! several rounds, in ns per record. The machine's load moves the figures; compare the two
//! lines of one run.

use std::hint::black_box;
use std::time::Instant;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use sluice_ledger::canonical::{self, Members};
use sluice_ledger::merkle::leaf_hash;
use sluice_ledger::record::{self, ChainHead, Draft};

const ROUNDS: usize = 7;
const PER_ROUND: usize = 20_000;

/// The inputs of one decision, as the daemon has them.
struct Input {
    passport_id: String,
    issuer: String,
    agent_id: String,
    detail: String,
    action: String,
    method: Option<String>,
    host: Option<String>,
    path: Option<String>,
    cost_millicents: u64,
    policy_digest: Option<String>,
    window_start: DateTime<Utc>,
    at: DateTime<Utc>,
}

fn input() -> Input {
    let at = DateTime::parse_from_rfc3339("2026-12-02T03:04:05.123456Z").unwrap().with_timezone(&Utc);
    Input {
        passport_id: "pp_01JDX8WQ4M8Z6V7N3K2C5R9T0Y".into(),
        issuer: "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK".into(),
        agent_id: "research-agent-7".into(),
        detail: "All guardrails passed.".into(),
        action: "llm:chat".into(),
        method: Some("POST".into()),
        host: Some("api.example.test".into()),
        path: Some("/v1/chat/completions".into()),
        cost_millicents: 1_250,
        policy_digest: Some(hex(&Sha256::digest(b"policy"))),
        window_start: at - chrono::Duration::days(1),
        at,
    }
}

fn hex(bytes: &[u8]) -> String {
    sluice_ledger::hex::encode(bytes)
}

fn time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The record as `service/drafts.rs` built it with `serde_json`.
fn build_serde_json(i: &Input) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("v".into(), 2u64.into());
    m.insert("kind".into(), "decision".into());
    m.insert("time".into(), time(i.at).into());
    m.insert("passport_id".into(), i.passport_id.as_str().into());
    m.insert("issuer".into(), i.issuer.as_str().into());
    m.insert("agent_id".into(), i.agent_id.clone().into());
    m.insert("decision".into(), "allow".into());
    m.insert("reason".into(), Value::String("allowed".to_string()));
    m.insert("detail".into(), i.detail.clone().into());
    m.insert("policy_digest".into(), i.policy_digest.as_deref().into());
    m.insert("action".into(), i.action.clone().into());
    m.insert("method".into(), i.method.clone().into());
    m.insert("host".into(), i.host.clone().into());
    m.insert("path_digest".into(), i.path.as_ref().map(|p| hex(&Sha256::digest(p.as_bytes()))).into());
    m.insert("cost_millicents".into(), Some(i.cost_millicents).into());
    let canonical = json!({
        "action": i.action, "cost_millicents": i.cost_millicents,
        "host": i.host, "method": i.method, "path": i.path,
    });
    m.insert("request_hash".into(), hex(&Sha256::digest(canonical.to_string().as_bytes())).into());
    m.insert("spend_window".into(), "monthly".into());
    m.insert("spend_window_start".into(), time(i.window_start).into());
    m.insert("spend_delta_millicents".into(), 1_250i64.into());
    m.insert("spend_after_millicents".into(), 981_250u64.into());
    m
}

/// Sealing as it was: the writer's fields inserted into the object, then canonicalised.
fn seal_serde_json(chain: &str, mut body: Map<String, Value>, index: u64, head: ChainHead, now: &str) -> Vec<u8> {
    if !body.contains_key("time") {
        body.insert("time".into(), now.into());
    }
    body.insert("log_index".into(), index.into());
    body.insert("seq".into(), (head.seq + 1).into());
    body.insert("prev_hash".into(), hex(&head.hash).into());
    body.insert("chain".into(), chain.into());
    let bytes = canonical::canonicalize_object(&body).unwrap();
    black_box(leaf_hash(&bytes));
    bytes
}

/// The record as `service/drafts.rs` builds it now.
fn build_members(i: &Input) -> Members {
    let mut m = Members::with_capacity(24, 768 + i.detail.len() + i.action.len());
    m.uint("v", 2).str("kind", "decision").time("time", &i.at);
    m.str("passport_id", &i.passport_id).str("issuer", &i.issuer).str("agent_id", &i.agent_id);
    m.str("decision", "allow").str("reason", "allowed").str("detail", &i.detail);
    m.opt_str("policy_digest", i.policy_digest.as_deref());
    m.str("action", &i.action).opt_str("method", i.method.as_deref()).opt_str("host", i.host.as_deref());
    match &i.path {
        Some(p) => m.str("path_digest", &hex(&Sha256::digest(p.as_bytes()))),
        None => m.null("path_digest"),
    };
    m.opt_uint("cost_millicents", Some(i.cost_millicents));
    let mut text = Vec::with_capacity(128);
    text.extend_from_slice(b"{\"action\":");
    canonical::write_string(&mut text, &i.action);
    text.extend_from_slice(b",\"cost_millicents\":");
    canonical::write_decimal(&mut text, i.cost_millicents);
    for (k, v) in [(",\"host\":", &i.host), (",\"method\":", &i.method), (",\"path\":", &i.path)] {
        text.extend_from_slice(k.as_bytes());
        match v {
            Some(s) => canonical::write_string(&mut text, s),
            None => text.extend_from_slice(b"null"),
        }
    }
    text.push(b'}');
    m.str("request_hash", &hex(&Sha256::digest(&text)));
    m.str("spend_window", "monthly").time("spend_window_start", &i.window_start);
    m.int("spend_delta_millicents", 1_250).uint("spend_after_millicents", 981_250);
    m
}

fn median_ns(mut f: impl FnMut()) -> f64 {
    let mut rounds: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..PER_ROUND {
                f();
            }
            t.elapsed().as_nanos() as f64 / PER_ROUND as f64
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[ROUNDS / 2]
}

fn main() {
    let i = input();
    let head = ChainHead { seq: 41, hash: [7; 32] };
    let now = "2026-12-02T03:04:05.123457Z";
    let chain = i.passport_id.clone();
    let old = seal_serde_json(&chain, build_serde_json(&i), 1234, head, now);
    let (new, _) = record::seal(Draft::new(chain.clone(), build_members(&i)), 1234, Some(head), now).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&new.canonical),
        String::from_utf8_lossy(&old),
        "both ways write the same record"
    );
    println!(
        "one decision record ({} bytes canonical), ns per record, median of {ROUNDS} rounds of {PER_ROUND}",
        old.len()
    );
    println!("{:<12} {:>10} {:>10} {:>10}", "", "build", "seal", "both");
    let rows: [(&str, f64, f64, f64); 2] = [
        (
            "serde_json",
            median_ns(|| {
                black_box(build_serde_json(black_box(&i)));
            }),
            {
                let body = build_serde_json(&i);
                median_ns(|| {
                    black_box(seal_serde_json(&chain, body.clone(), 1234, head, now));
                }) - median_ns(|| {
                    black_box(body.clone());
                })
            },
            median_ns(|| {
                black_box(seal_serde_json(&chain, build_serde_json(black_box(&i)), 1234, head, now));
            }),
        ),
        (
            "members",
            median_ns(|| {
                black_box(build_members(black_box(&i)));
            }),
            {
                let body = build_members(&i);
                median_ns(|| {
                    black_box(record::seal(Draft::new(chain.clone(), body.clone()), 1234, Some(head), now).unwrap());
                }) - median_ns(|| {
                    black_box((chain.clone(), body.clone()));
                })
            },
            median_ns(|| {
                black_box(
                    record::seal(Draft::new(chain.clone(), build_members(black_box(&i))), 1234, Some(head), now)
                        .unwrap(),
                );
            }),
        ),
    ];
    for (name, build, seal, both) in rows {
        println!("{name:<12} {build:>10.0} {seal:>10.0} {both:>10.0}");
    }
}
