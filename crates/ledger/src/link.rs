//! Linked attestations (`sluice audit link`): an agent host's export and a gate's export, matched
//! by request hash.
//!
//! On the agent's side, a decision record of a request the daemon signed for a gate carries
//! `signed_request_hash` (the lowercase hex SHA-256 of the request's RFC 9421 signature base); on
//! the gate's side, the gate's record of that request carries the same value as `request_hash`,
//! next to its `gate_id`. [`collect`] reads those records out of one export (as a stream: what it
//! keeps is one small summary per linked record), and [`link`] pairs them.
//!
//! An agent record is *expected* at the gate when the request went out: an `allow`, or a
//! `request_hold` whose hold was approved (a `hold_resolution` allow naming it). A block, a hold
//! that was not approved, or an allow whose upstream failed (an `upstream_error` record naming
//! it) never reached the gate: those are listed as not sent, and are no problem.
//!
//! [`read_side`] verifies an export and collects its linked records, for `audit link` and
//! `audit settle` ([`crate::settle`]) alike.
//!
//! Must not: know HTTP.

use crate::docstream::{RecordSink, ScanError, Scanner};
use crate::export::ExportedRecord;
use crate::verify::{self, VerifyReport};
use ed25519_dalek::VerifyingKey;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{Read, Seek};

/// The agent-side field.
pub const FIELD_SIGNED_REQUEST_HASH: &str = "signed_request_hash";
/// The gate-side field.
pub const FIELD_REQUEST_HASH: &str = "request_hash";
/// The gate-side field that marks a gate's record.
pub const FIELD_GATE_ID: &str = "gate_id";

/// Which export is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Agent,
    Gate,
}

/// One linked record, summarised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Linked {
    /// Its log index in its own export.
    pub index: u64,
    pub request_hash: String,
    pub kind: Option<String>,
    pub passport_id: Option<String>,
    pub decision: Option<String>,
    pub reason: Option<String>,
    /// Agent side: `host`; gate side: `gate_id`.
    pub at: Option<String>,
    /// Agent side: `action`; gate side: `permission`.
    pub what: Option<String>,
    /// The record's `time`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// The record's `cost_millicents` (what it charged, for an allow).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_millicents: Option<u64>,
    /// The record's `gate_id`: always on the gate's side; on the agent's, when the daemon priced
    /// the request by that gate's catalog.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gate_id: Option<String>,
    /// The catalog version whose price applied, when the record names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub catalog_version: Option<u64>,
    /// Gate side: the request's `host`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// What one export holds that linking needs.
#[derive(Debug, Default)]
pub struct Collected {
    pub records: Vec<Linked>,
    /// Agent side: indices of `request_hold` decisions whose hold was approved.
    approved_holds: HashSet<u64>,
    /// Agent side: indices of allows whose upstream failed.
    undelivered: HashSet<u64>,
    /// Agent side: the real cost a `settlement` record set for a decision (by the index of the
    /// decision, or of the request_hold an approved `hold_resolution` names).
    settled: HashMap<u64, u64>,
    /// Agent side: `hold_resolution` index → the `request_hold` it resolved.
    resolutions: HashMap<u64, u64>,
    /// Agent side: every `passport_id` its records name (the passports this host holds).
    pub passports: BTreeSet<String>,
    /// Gate side: every request `host` its records name.
    pub hosts: BTreeSet<String>,
    /// Records that could not be read (the verifier reports them too).
    pub unreadable: usize,
}

impl Collected {
    /// Agent side: whether the request of decision `l` went out (an allow whose upstream did not
    /// fail, or a request_hold that was approved).
    pub fn sent(&self, l: &Linked) -> bool {
        match l.decision.as_deref() {
            Some("allow") => !self.undelivered.contains(&l.index),
            Some("request_hold") => self.approved_holds.contains(&l.index),
            _ => false,
        }
    }

    /// Agent side: whether the request of decision `l` failed upstream after it was allowed.
    pub fn undelivered(&self, l: &Linked) -> bool {
        self.undelivered.contains(&l.index)
    }

    /// Agent side: what decision `l` charged, in millicents: its `cost_millicents`, or the real
    /// cost a settlement record set; `None` when its request did not go out.
    pub fn charged(&self, l: &Linked) -> Option<u64> {
        if !self.sent(l) {
            return None;
        }
        Some(self.settled.get(&l.index).copied().or(l.cost_millicents).unwrap_or(0))
    }
}

/// One export read: its verification and its linked records.
#[derive(Debug)]
pub struct SideRead {
    pub verify: VerifyReport,
    pub collected: Collected,
}

/// Verifies the export `open` gives (twice: it is read as a stream, in bounded memory, by the
/// verifier and then by [`collect`]) against `key`, and collects its linked records. An error
/// only when the document cannot be read at all; problems of the log are in `verify`.
pub fn read_side<R, F>(open: F, key: &VerifyingKey, side: Side) -> Result<SideRead, String>
where
    R: Read + Seek,
    F: Fn() -> std::io::Result<R>,
{
    let verify = verify::verify_reader(open().map_err(|e| e.to_string())?, key, None);
    let collected = collect(open().map_err(|e| e.to_string())?, side).map_err(|e| format!("not an export: {e}"))?;
    Ok(SideRead { verify, collected })
}

/// Reads the linked records of one export.
pub fn collect<R: Read>(r: R, side: Side) -> Result<Collected, ScanError> {
    struct Sink {
        side: Side,
        out: Collected,
    }
    impl RecordSink for Sink {
        fn start(&mut self, _: &[(String, Vec<u8>)]) -> bool {
            true
        }
        fn element(&mut self, _: usize, bytes: &[u8]) {
            let Ok(r) = serde_json::from_slice::<ExportedRecord>(bytes) else {
                self.out.unreadable += 1;
                return;
            };
            let Ok(Value::Object(m)) = serde_json::from_str::<Value>(&r.record) else {
                self.out.unreadable += 1;
                return;
            };
            take(&mut self.out, self.side, r.index, &m);
        }
    }
    let mut sink = Sink { side, out: Collected::default() };
    Scanner::new(r).top_level(&mut sink)?;
    Ok(sink.out)
}

fn string(m: &Map<String, Value>, name: &str) -> Option<String> {
    m.get(name).and_then(Value::as_str).map(str::to_string)
}

fn take(out: &mut Collected, side: Side, index: u64, m: &Map<String, Value>) {
    let kind = string(m, "kind");
    if side == Side::Agent {
        if let Some(p) = string(m, "passport_id") {
            if !out.passports.contains(&p) {
                out.passports.insert(p);
            }
        }
        match kind.as_deref() {
            Some("hold_resolution") if m.get("decision").and_then(Value::as_str) == Some("allow") => {
                if let Some(i) = m.get("hold_record").and_then(Value::as_u64) {
                    out.approved_holds.insert(i);
                    out.resolutions.insert(index, i);
                }
            }
            Some("settlement") if m.get("settled").and_then(Value::as_bool) == Some(true) => {
                let actual = m.get("actual_millicents").and_then(Value::as_u64);
                if let (Some(i), Some(actual)) = (m.get("decision_record").and_then(Value::as_u64), actual) {
                    let decision = out.resolutions.get(&i).copied().unwrap_or(i);
                    out.settled.insert(decision, actual);
                }
            }
            Some("upstream_error") => {
                if let Some(i) = m.get("decision_attestation_id").and_then(Value::as_u64) {
                    out.undelivered.insert(i);
                }
            }
            _ => {}
        }
    }
    let (hash_field, at, what, host) = match side {
        Side::Agent => (FIELD_SIGNED_REQUEST_HASH, string(m, "host"), string(m, "action"), None),
        Side::Gate => {
            if !m.contains_key(FIELD_GATE_ID) {
                return;
            }
            let host = string(m, "host");
            if let Some(h) = &host {
                if !out.hosts.contains(h) {
                    out.hosts.insert(h.clone());
                }
            }
            (FIELD_REQUEST_HASH, string(m, FIELD_GATE_ID), string(m, "permission"), host)
        }
    };
    let Some(hash) = string(m, hash_field) else { return };
    out.records.push(Linked {
        index,
        request_hash: hash,
        kind,
        passport_id: string(m, "passport_id"),
        decision: string(m, "decision"),
        reason: string(m, "reason"),
        at,
        what,
        time: string(m, "time"),
        cost_millicents: m.get("cost_millicents").and_then(Value::as_u64),
        gate_id: string(m, FIELD_GATE_ID),
        catalog_version: m.get("catalog_version").and_then(Value::as_u64),
        host,
    });
}

/// The outcome of linking two exports.
#[derive(Debug, Default, Serialize)]
pub struct LinkReport {
    /// Pairs: the agent's record and the gate's.
    pub matched: Vec<(Linked, Linked)>,
    /// Requests that went out to a gate and that the gate's export does not have.
    pub agent_only: Vec<Linked>,
    /// Gate records that no request of the agent's export accounts for.
    pub gate_only: Vec<Linked>,
    /// Agent records of requests that never reached a gate (blocked, hold not approved, upstream
    /// failed): listed, not a problem.
    pub not_sent: Vec<Linked>,
    /// Anything else wrong: one request hash twice on one side, a pair whose passport ids differ,
    /// unreadable records.
    pub problems: Vec<String>,
}

impl LinkReport {
    /// Everything sent is at the gate, everything at the gate was sent, and nothing is amiss.
    pub fn is_ok(&self) -> bool {
        self.agent_only.is_empty() && self.gate_only.is_empty() && self.problems.is_empty()
    }
}

/// Pairs the agent's and the gate's linked records by request hash.
pub fn link(mut agent: Collected, mut gate: Collected) -> LinkReport {
    pair(&mut agent, &mut gate)
}

/// [`link`], taking the records out of both sides and leaving the rest of what was collected
/// (whether a request went out, what it charged) to the caller.
pub fn pair(agent: &mut Collected, gate: &mut Collected) -> LinkReport {
    let mut report = LinkReport::default();
    for (side, c) in [("agent", &agent), ("gate", &gate)] {
        if c.unreadable > 0 {
            report.problems.push(format!("{} record(s) of the {side} export could not be read", c.unreadable));
        }
    }
    let mut gate_by_hash: BTreeMap<String, Linked> = BTreeMap::new();
    for g in std::mem::take(&mut gate.records) {
        if let Some(first) = gate_by_hash.get(&g.request_hash) {
            report.problems.push(format!(
                "the gate's export has request hash {} twice (records {} and {}): one signed request answered twice",
                g.request_hash, first.index, g.index
            ));
            report.gate_only.push(g);
            continue;
        }
        gate_by_hash.insert(g.request_hash.clone(), g);
    }
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    for a in std::mem::take(&mut agent.records) {
        if let Some(first) = seen.insert(a.request_hash.clone(), a.index) {
            report.problems.push(format!(
                "the agent's export has request hash {} twice (records {first} and {})",
                a.request_hash, a.index
            ));
        }
        let sent = agent.sent(&a);
        match gate_by_hash.remove(&a.request_hash) {
            Some(g) => {
                if a.passport_id.is_some() && g.passport_id.is_some() && a.passport_id != g.passport_id {
                    report.problems.push(format!(
                        "request hash {}: the agent's record {} is for passport {}, the gate's record {} for {}",
                        a.request_hash,
                        a.index,
                        a.passport_id.as_deref().unwrap_or("-"),
                        g.index,
                        g.passport_id.as_deref().unwrap_or("-")
                    ));
                }
                report.matched.push((a, g));
            }
            None if sent => report.agent_only.push(a),
            None => report.not_sent.push(a),
        }
    }
    report.gate_only.extend(gate_by_hash.into_values());
    report.gate_only.sort_by_key(|g| g.index);
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn export(records: &[Value]) -> Vec<u8> {
        let records: Vec<Value> = records
            .iter()
            .enumerate()
            .map(|(i, r)| json!({"index": i, "record": r.to_string(), "inclusion_proof": []}))
            .collect();
        serde_json::to_vec(&json!({"format": "x", "checkpoint": "c", "records": records})).unwrap()
    }

    /// An agent decision (`_i`: its index, for the reader).
    fn agent(_i: u64, hash: &str, decision: &str) -> Value {
        json!({"kind": "decision", "passport_id": "pp_a", "decision": decision, "reason": "allowed",
               "host": "gate.example", "action": "orders:write", "request_hash": "00", "signed_request_hash": hash})
    }

    fn gate(hash: &str, passport: &str) -> Value {
        json!({"kind": "gate_decision", "gate_id": "gate-1", "request_hash": hash, "passport_id": passport,
               "agent_id": "a", "permission": "orders:write", "decision": "allow", "reason": "allowed"})
    }

    fn run(a: &[Value], g: &[Value]) -> LinkReport {
        let a = collect(export(a).as_slice(), Side::Agent).unwrap();
        let g = collect(export(g).as_slice(), Side::Gate).unwrap();
        link(a, g)
    }

    #[test]
    fn every_sent_request_matches_its_gate_record() {
        let r = run(
            &[agent(0, "h1", "allow"), json!({"kind": "decision", "request_hash": "h2"}), agent(2, "h2", "allow")],
            &[json!({"kind": "gate_start", "gate_id": "gate-1"}), gate("h2", "pp_a"), gate("h1", "pp_a")],
        );
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.matched.len(), 2);
        assert_eq!((r.matched[0].0.index, r.matched[0].1.index), (0, 2));
        assert_eq!(r.matched[0].1.at.as_deref(), Some("gate-1"));
    }

    #[test]
    fn one_sided_records_duplicates_and_mismatches_fail() {
        let r = run(&[agent(0, "h1", "allow")], &[]);
        assert_eq!(r.agent_only.len(), 1);
        assert!(!r.is_ok());
        let r = run(&[], &[gate("h9", "pp_a")]);
        assert_eq!(r.gate_only.len(), 1);
        assert!(!r.is_ok());
        let r = run(&[agent(0, "h1", "allow")], &[gate("h1", "pp_a"), gate("h1", "pp_a")]);
        assert_eq!(r.matched.len(), 1);
        assert!(!r.is_ok() && r.problems[0].contains("twice"), "{r:?}");
        let r = run(&[agent(0, "h1", "allow")], &[gate("h1", "pp_other")]);
        assert!(!r.is_ok() && r.problems[0].contains("pp_other"), "{r:?}");
        let r = run(&[agent(0, "h1", "allow"), agent(1, "h1", "allow")], &[gate("h1", "pp_a")]);
        assert!(!r.is_ok() && r.problems[0].contains("agent's export"), "{r:?}");
    }

    #[test]
    fn requests_that_never_left_are_not_sent_not_missing() {
        let r = run(
            &[
                agent(0, "blocked", "block"),
                agent(1, "held-denied", "request_hold"),
                agent(2, "held-approved", "request_hold"),
                json!({"kind": "hold_resolution", "decision": "allow", "hold_record": 2}),
                agent(4, "upstream-down", "allow"),
                json!({"kind": "upstream_error", "decision_attestation_id": 4}),
            ],
            &[],
        );
        let not_sent: Vec<u64> = r.not_sent.iter().map(|l| l.index).collect();
        assert_eq!(not_sent, [0, 1, 4]);
        let missing: Vec<u64> = r.agent_only.iter().map(|l| l.index).collect();
        assert_eq!(missing, [2], "an approved hold went out");
        assert!(!r.is_ok());
    }

    #[test]
    fn a_broken_document_is_an_error_and_an_unreadable_record_a_problem() {
        assert!(collect(&b"{\"records\": [1"[..], Side::Agent).is_err());
        let doc = serde_json::to_vec(&json!({"format": "x", "records": [{"index": 0, "record": "not json"}]})).unwrap();
        let c = collect(doc.as_slice(), Side::Gate).unwrap();
        assert_eq!(c.unreadable, 1);
        assert!(!link(Collected::default(), c).is_ok());
    }
}
