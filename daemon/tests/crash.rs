//! Crash safety (durable before answered; docs/records.md, "Storage"): the daemon is SIGKILLed at random moments while concurrent
//! clients ask for decisions. After every restart: each decision a client was *answered* is in the
//! log as answered, the spend counters equal the sum of allowed costs in the log, and the whole log
//! verifies offline.

mod common;

use common::*;
use rand::Rng;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ROUNDS: usize = 20;
const CLIENTS: usize = 8;

#[derive(Debug, Clone)]
struct Answered {
    decision: String,
    cost: u64,
}

#[test]
fn sigkill_at_random_moments_loses_no_answered_decision() {
    let mut d = TestDaemon::start("");
    // A budget that runs out part-way, so both allows and blocks are answered and counted.
    let i = issue(
        d.dir.path(),
        "crashy",
        &[
            "--permission",
            "*",
            "--constraint",
            "core:cost:max_per_action=90",
            "--constraint",
            "core:cost:max_cumulative=100000000",
        ],
    );
    let out = d.cli(&["passport", "register", p(&i.passport)]);
    assert!(out.status.success());

    let answered: Arc<Mutex<HashMap<u64, Answered>>> = Arc::default();
    let mut rng = rand::thread_rng();
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..CLIENTS)
            .map(|w| {
                let (stop, answered, socket, id) = (stop.clone(), answered.clone(), d.socket.clone(), i.id.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        // Costs 1..=100: those above 90 are blocked per action.
                        let cost = (round as u64 * 7 + w as u64 * 13 + n * 31) % 100 + 1;
                        n += 1;
                        let body = json!({"passport_id": id, "action": "crash:test", "cost_cents": cost});
                        match raw_call(&socket, "POST", "/v1/enforce", Some(body)) {
                            Ok((200, v)) => {
                                let idx = v["attestation_id"].as_u64().expect("attestation id");
                                let decision = v["decision"].as_str().unwrap_or_default().to_string();
                                answered.lock().unwrap().insert(idx, Answered { decision, cost });
                            }
                            Ok((status, v)) => panic!("unexpected answer {status}: {v}"),
                            Err(_) => std::thread::sleep(Duration::from_millis(2)),
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.gen_range(30..400)));
        d.kill();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().expect("client thread");
        }
        d.spawn();
    }

    let answered = answered.lock().unwrap().clone();
    assert!(answered.len() > ROUNDS, "the clients got too few answers ({}) to test anything", answered.len());
    let allowed_answers = answered.values().filter(|a| a.decision == "allow").count();
    assert!(allowed_answers > 0 && allowed_answers < answered.len(), "need both allows and blocks");
    eprintln!("{} answered decisions ({allowed_answers} allowed) across {ROUNDS} SIGKILLs", answered.len());
    // Groups are durable in the commit journal before redb syncs them: with SIGKILLs under load,
    // some restarts must have completed the store from the journal (and everything below holds
    // after that).
    let replays = d.log().matches("applied the journal's last groups").count();
    eprintln!("{replays} of {ROUNDS} restarts replayed the journal");
    assert!(replays > 0, "no restart replayed the journal: the crash path of the journal went untested");

    // Every answered decision is in the log, exactly as answered.
    let export = d.dir.path().join("export.json");
    let out = d.cli(&["audit", "export", "--out", p(&export)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bundle: Value = serde_json::from_str(&std::fs::read_to_string(&export).unwrap()).unwrap();
    let records: HashMap<u64, Value> = bundle["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), serde_json::from_str(r["record"].as_str().unwrap()).unwrap()))
        .collect();
    for (idx, a) in &answered {
        let r = records.get(idx).unwrap_or_else(|| panic!("answered decision {idx} is missing from the log"));
        assert_eq!(r["decision"], a.decision.as_str(), "record {idx}");
        assert_eq!(r["cost_millicents"], a.cost * 1000, "record {idx}");
    }

    // Counters equal the allowed costs in the log.
    let allowed: u64 = records
        .values()
        .filter(|r| r["kind"] == "decision" && r["decision"] == "allow" && r["passport_id"] == i.id.as_str())
        .map(|r| r["cost_millicents"].as_u64().unwrap())
        .sum();
    let (_, state) = d.call("GET", &format!("/v1/passports/{}/state", i.id), None).unwrap();
    assert_eq!(state["daily_cost_millicents"].as_u64(), Some(allowed), "{state}");
    assert_eq!(state["daily_cost_cents"].as_u64(), Some(allowed / 1000), "{state}");

    // And the whole log verifies offline.
    let out = d.cli(&["audit", "verify", p(&export), "--host-pub", p(&d.state_dir().join("host.pub"))]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}
