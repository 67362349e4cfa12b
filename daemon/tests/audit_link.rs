//! `sluice audit link`: an agent host's export and a gate's export, each written by a real store
//! with its own host key, matched by request hash. The agent store has what the daemon writes for
//! requests it signed for a gate (decision records with `signed_request_hash`), the gate store
//! what a gate writes (records with `gate_id` and `request_hash`). No daemon, no root.

mod common;

use common::{p, sluice};
use ed25519_dalek::SigningKey;
use serde_json::{json, Map, Value};
use sluice::ledger::export::{export_stream, ExportRequest};
use sluice::ledger::{Draft, HostKey, Ledger, LedgerOptions};
use std::path::{Path, PathBuf};

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

/// A store of `records` (chain, body), exported to `dir/name.json`; its public key in
/// `dir/name.pub`.
fn store(dir: &Path, name: &str, seed: u8, records: Vec<(&str, Value)>) -> (PathBuf, PathBuf) {
    let signing = SigningKey::from_bytes(&[seed; 32]);
    let public = dir.join(format!("{name}.pub"));
    sluice::keyfile::write_public_key(&public, &signing.verifying_key()).unwrap();
    let ledger =
        Ledger::open(&dir.join(format!("{name}.redb")), HostKey::from_signing_key(signing), LedgerOptions::default())
            .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let out = dir.join(format!("{name}.json"));
    rt.block_on(async {
        for (chain, body) in records {
            let draft = Draft::new(chain, obj(body));
            ledger.transact(move |_| Ok(((), vec![draft]))).await.unwrap();
        }
        let mut doc = Vec::new();
        let req = ExportRequest { passport: None, since: None, consistency_from: None };
        export_stream(&ledger, &req).await.unwrap().write_to(&mut doc).unwrap();
        std::fs::write(&out, doc).unwrap();
    });
    ledger.shutdown();
    (out, public)
}

fn decision(decision: &str, hash: &str) -> (&'static str, Value) {
    let body = json!({"kind": "decision", "v": 2, "passport_id": "pp_agent", "decision": decision,
        "reason": if decision == "allow" { "allowed" } else { "permission_denied" },
        "action": "orders:write", "host": "gate.example", "method": "POST",
        "request_hash": "0".repeat(64), "signed_request_hash": hash});
    ("pp_agent", body)
}

fn gate_record(hash: &str) -> (&'static str, Value) {
    let body = json!({"kind": "gate_decision", "gate_id": "gate-1", "request_hash": hash,
        "passport_id": "pp_agent", "agent_id": "shopper-1", "permission": "orders:write",
        "decision": "allow", "reason": "allowed"});
    ("gate-1", body)
}

fn link(agent: &(PathBuf, PathBuf), gate: &(PathBuf, PathBuf), json: bool) -> (i32, String) {
    let mut args = vec!["audit", "link", p(&agent.0), p(&gate.0), "--agent-pub", p(&agent.1), "--gate-pub", p(&gate.1)];
    if json {
        args.push("--json");
    }
    let out = sluice(&args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn hash(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

#[test]
fn every_signed_request_matches_the_gate_s_record() {
    let dir = tempfile::tempdir().unwrap();
    let agent = store(
        dir.path(),
        "agent",
        1,
        vec![decision("allow", &hash(1)), decision("block", &hash(2)), decision("allow", &hash(3))],
    );
    let gate = store(
        dir.path(),
        "gate",
        2,
        vec![
            ("gate-1", json!({"kind": "gate_start", "gate_id": "gate-1"})),
            gate_record(&hash(3)),
            gate_record(&hash(1)),
        ],
    );
    let (code, out) = link(&agent, &gate, false);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("MATCHED").count(), 2, "{out}");
    assert!(out.contains(&format!("NOT SENT    {}", hash(2))), "{out}");
    assert!(out.contains("linked: OK"), "{out}");
    let (code, out) = link(&agent, &gate, true);
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["matched"].as_array().unwrap().len(), 2);
    assert_eq!(v["matched"][0][1]["at"], "gate-1");
}

#[test]
fn a_record_on_one_side_only_fails_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let agent = store(dir.path(), "agent", 1, vec![decision("allow", &hash(1)), decision("allow", &hash(4))]);
    let gate = store(dir.path(), "gate", 2, vec![gate_record(&hash(1)), gate_record(&hash(5))]);
    let (code, out) = link(&agent, &gate, false);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("AGENT ONLY  {}", hash(4))), "{out}");
    assert!(out.contains(&format!("GATE ONLY   {}", hash(5))), "{out}");
    assert!(out.contains("do not link"), "{out}");
}

#[test]
fn an_export_that_does_not_verify_fails_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let agent = store(dir.path(), "agent", 1, vec![decision("allow", &hash(1))]);
    let gate = store(dir.path(), "gate", 2, vec![gate_record(&hash(1))]);
    // The gate's export checked with the agent's key: its checkpoint does not verify.
    let (code, out) = link(&agent, &(gate.0.clone(), agent.1.clone()), false);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("PROBLEM     verification:"), "{out}");
    // A gate record edited to claim another request: the record no longer matches its log.
    let text = std::fs::read_to_string(&gate.0).unwrap().replace(&hash(1), &hash(9));
    let edited = dir.path().join("edited.json");
    std::fs::write(&edited, text).unwrap();
    let (code, out) = link(&agent, &(edited, gate.1.clone()), false);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("verification:") && out.contains("AGENT ONLY"), "{out}");
}
