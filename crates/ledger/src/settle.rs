//! Settlement (`sluice audit settle`): what an agent host and a gate each say was charged, from
//! their own logs, compared record by record.
//!
//! Both exports are verified and their linked records collected and paired by request hash as
//! for `audit link` ([`crate::link`]). Then each side's charge is read from its own records:
//! - agent: a decision of a signed request whose request went out (an `allow`, or a
//!   `request_hold` that was approved) charged its `cost_millicents` (or the real cost a
//!   `settlement` record set for it); a request that never left (blocked, hold not approved,
//!   upstream failed) charged nothing at the gate and is only counted;
//! - gate: a `gate_decision` `allow` charged its `cost_millicents`; a refusal charged nothing.
//!
//! A pair agrees when both sides charged the same amount, or both charged nothing; catalog
//! versions are compared only to explain a difference (the two sides may price by different
//! versions of one price for up to a refresh interval). What is
//! reported, each record with its evidence (a portable attestation: the record's exact bytes,
//! its inclusion proof and the export's signed checkpoint, which `sluice audit verify` checks
//! offline): pairs that differ, requests the agent sent that the gate has no record of ("not
//! received"), and gate records of this host's passports with no request of the agent's export
//! ("not sent by this host").
//!
//! Scope: an agent record names its gate by `gate_id` when the daemon priced the request by that
//! gate's catalog; one that names another gate is ignored, and one that names none belongs to
//! this gate when its `host` is a host the gate's records name (or when they name none, so that
//! a gate that received nothing does not settle by leaving everything out). A gate record belongs to this
//! agent host when its passport is one the agent's export names (another host's agents are
//! ignored). The window `[since, until)` is by record time: a pair by the agent's record (the
//! request was decided there first), a record on one side alone by its own.
//!
//! Memory: the exports are read as streams, like the verifier; what is kept is one small summary
//! per linked record, and for the evidence the O(log n) proof nodes of each reported record.

use crate::docstream::{RecordSink, Scanner};
use crate::export::{ExportedRecord, PortableAttestation, ATTESTATION_FORMAT, EXPORT_FORMAT};
use crate::hex;
use crate::link::{self, Linked, Side, SideRead};
use crate::merkle::{self, ProofCollector};
use crate::record::parse_time;
use crate::verify::VerifyReport;
use chrono::{DateTime, SecondsFormat, Utc};
use ed25519_dalek::VerifyingKey;
use serde::Serialize;
use sluice_passport::money::dollars;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek};

/// What to settle.
#[derive(Debug, Clone, Default)]
pub struct SettleOptions {
    /// The gate's id (`gate_` + base64url of its public key), derived from the key the gate's
    /// export is verified with.
    pub gate_id: Option<String>,
    /// Records at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Records before this time.
    pub until: Option<DateTime<Utc>>,
}

/// One side's total.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Total {
    /// Exact, in millicents (1/1000 of a cent); a JSON number, or its decimal text beyond 64 bits.
    #[serde(serialize_with = "big_number")]
    pub millicents: u128,
    /// The same in dollars, with as many decimals as it has (`$0.05126`).
    pub dollars: String,
    /// How many records charged something (an amount of 0 included).
    pub charges: usize,
}

impl Total {
    fn add(&mut self, amount: Option<u64>) {
        if let Some(m) = amount {
            self.millicents = self.millicents.saturating_add(u128::from(m));
            self.charges += 1;
        }
    }
}

/// A u128 as a JSON number when it fits 64 bits, else as decimal text (exact either way).
fn big_number<S: serde::Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
    match u64::try_from(*v) {
        Ok(n) => s.serialize_u64(n),
        Err(_) => s.serialize_str(&v.to_string()),
    }
}

/// One record (or pair) that does not settle, with its evidence.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub request_hash: String,
    /// Why it does not settle, in a sentence.
    pub why: String,
    /// The agent's record, summarised (absent: none).
    pub agent: Option<Linked>,
    /// The gate's record, summarised (absent: none).
    pub gate: Option<Linked>,
    /// What the agent's record charged (absent: nothing).
    pub agent_charged_millicents: Option<u64>,
    /// What the gate's record charged (absent: nothing).
    pub gate_charged_millicents: Option<u64>,
    /// The agent's record as a portable attestation (`sluice audit verify` it with the agent
    /// host's key); absent when the agent's log did not verify.
    pub agent_evidence: Option<PortableAttestation>,
    /// The gate's record likewise, with the gate's key.
    pub gate_evidence: Option<PortableAttestation>,
}

/// One log's verification, in short.
#[derive(Debug, Clone, Serialize)]
pub struct LogCheck {
    pub verified: bool,
    pub checkpoint_size: Option<u64>,
    pub checkpoint_root: Option<String>,
    pub records_checked: usize,
    /// Every problem the verifier found, each naming the record and field at fault.
    pub problems: Vec<String>,
}

impl From<&VerifyReport> for LogCheck {
    fn from(r: &VerifyReport) -> Self {
        LogCheck {
            verified: r.is_ok(),
            checkpoint_size: r.checkpoint_size,
            checkpoint_root: r.checkpoint_root.clone(),
            records_checked: r.records_checked,
            problems: r.problems.iter().map(ToString::to_string).collect(),
        }
    }
}

/// Records left out, by why.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ignored {
    /// Agent records of requests to other gates.
    pub agent_other_gates: usize,
    /// Gate records of passports the agent's export does not name (other hosts' agents).
    pub gate_other_hosts: usize,
    /// Records (or pairs) outside `[since, until)`.
    pub outside_window: usize,
}

/// The outcome of a settlement.
#[derive(Debug, Clone, Serialize)]
pub struct SettleReport {
    /// Both logs verify and every record in the window pairs and agrees.
    pub ok: bool,
    pub gate_id: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub agent_log: LogCheck,
    pub gate_log: LogCheck,
    pub agent_total: Total,
    pub gate_total: Total,
    /// Pairs in which both sides charged the same.
    pub agreed: usize,
    /// Pairs whose charge (or decision: charged on one side only) differs.
    pub differ: Vec<Entry>,
    /// Requests the agent sent (and charged) that the gate's export has no record of.
    pub not_received: Vec<Entry>,
    /// Gate records of this host's passports that no request of the agent's export accounts for.
    pub not_sent_by_this_host: Vec<Entry>,
    /// Agent decisions of signed requests that never left the host (blocked, hold not approved,
    /// upstream failed): nothing to settle.
    pub never_sent: usize,
    pub ignored: Ignored,
    /// Anything else wrong: a request hash twice on one side, passports that differ within a
    /// pair, a record without a readable time, unreadable records.
    pub problems: Vec<String>,
}

impl SettleReport {
    fn decide(&mut self) {
        self.ok = self.agent_log.verified
            && self.gate_log.verified
            && self.differ.is_empty()
            && self.not_received.is_empty()
            && self.not_sent_by_this_host.is_empty()
            && self.problems.is_empty();
    }
}

/// Why a settlement could not be made at all (a document that cannot be read); which side.
#[derive(Debug)]
pub struct SettleError {
    pub side: Side,
    pub reason: String,
}

/// Verifies both exports, pairs and compares their charges, and attaches the evidence of every
/// record that does not settle. Each export is read as a stream, three times at most (verify,
/// collect, evidence).
pub fn settle_exports<RA, FA, RG, FG>(
    agent: FA,
    agent_key: &VerifyingKey,
    gate: FG,
    gate_key: &VerifyingKey,
    opts: &SettleOptions,
) -> Result<SettleReport, SettleError>
where
    RA: Read + Seek,
    FA: Fn() -> std::io::Result<RA>,
    RG: Read + Seek,
    FG: Fn() -> std::io::Result<RG>,
{
    let err = |side| move |reason| SettleError { side, reason };
    let a = link::read_side(&agent, agent_key, Side::Agent).map_err(err(Side::Agent))?;
    let g = link::read_side(&gate, gate_key, Side::Gate).map_err(err(Side::Gate))?;
    let mut report = settle(a, g, opts);
    if report.agent_log.verified {
        attach(&mut report, Side::Agent, &agent).map_err(err(Side::Agent))?;
    }
    if report.gate_log.verified {
        attach(&mut report, Side::Gate, &gate).map_err(err(Side::Gate))?;
    }
    Ok(report)
}

fn time_text(t: &Option<DateTime<Utc>>) -> Option<String> {
    t.map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

fn charge_text(c: Option<u64>) -> String {
    match c {
        Some(m) => format!("charged {} ({m} millicents)", dollars(m)),
        None => "charged nothing".to_string(),
    }
}

/// Why two amounts may differ, when the records say: the catalog versions each side priced the
/// request by, if they are not the same (a price lock taken at another version, or a daemon
/// whose view of the version in force was behind the gate's). Versions alone are not a
/// disagreement: both sides may price by different versions of the same price.
fn versions_text(x: &Linked, y: &Linked) -> String {
    match (x.catalog_version, y.catalog_version) {
        (Some(a), Some(g)) if a != g => {
            format!(" (the agent's record priced it by catalog version {a}, the gate's by version {g})")
        }
        (None, Some(g)) => format!(" (the agent's record names no catalog version, the gate's version {g})"),
        (Some(a), None) => format!(" (the agent's record priced it by catalog version {a}, the gate's names none)"),
        _ => String::new(),
    }
}

/// What the gate's record charged: an allow, its `cost_millicents`.
fn gate_charged(g: &Linked) -> Option<u64> {
    (g.decision.as_deref() == Some("allow")).then(|| g.cost_millicents.unwrap_or(0))
}

fn decision_text(l: &Linked) -> String {
    format!("{} {}", l.decision.as_deref().unwrap_or("-"), l.reason.as_deref().unwrap_or("-"))
}

/// Compares the two sides' collected records (see the module docs). No evidence yet.
pub fn settle(agent: SideRead, gate: SideRead, opts: &SettleOptions) -> SettleReport {
    let SideRead { verify: agent_verify, collected: mut a } = agent;
    let SideRead { verify: gate_verify, collected: mut g } = gate;
    let linked = link::pair(&mut a, &mut g);
    let mut r = SettleReport {
        ok: false,
        gate_id: opts.gate_id.clone(),
        since: time_text(&opts.since),
        until: time_text(&opts.until),
        agent_log: LogCheck::from(&agent_verify),
        gate_log: LogCheck::from(&gate_verify),
        agent_total: Total::default(),
        gate_total: Total::default(),
        agreed: 0,
        differ: Vec::new(),
        not_received: Vec::new(),
        not_sent_by_this_host: Vec::new(),
        never_sent: 0,
        ignored: Ignored::default(),
        problems: linked.problems,
    };
    let mut outside = 0usize;

    if let Some(id) = &opts.gate_id {
        let others: Vec<u64> = linked
            .matched
            .iter()
            .map(|(_, y)| y)
            .chain(&linked.gate_only)
            .filter(|y| y.gate_id.as_deref().is_some_and(|gid| gid != id))
            .map(|y| y.index)
            .collect();
        if let Some(first) = others.first() {
            r.problems.push(format!(
                "the gate's export has {} record(s) of another gate than the key's {id} (first: record {first})",
                others.len()
            ));
        }
    }

    for (x, y) in linked.matched {
        let when = if x.time.is_some() { &x } else { &y };
        if !in_window(opts, "agent", when, &mut r.problems) {
            outside += 1;
            continue;
        }
        let ac = a.charged(&x);
        let gc = gate_charged(&y);
        r.agent_total.add(ac);
        r.gate_total.add(gc);
        let other_gate = match (&x.gate_id, &y.gate_id) {
            (Some(xa), Some(ya)) if xa != ya => Some(format!("the agent's record names gate {xa}, the gate's is {ya}")),
            _ => None,
        };
        if ac == gc && other_gate.is_none() {
            r.agreed += 1;
            continue;
        }
        let why = match (ac, gc) {
            _ if ac == gc => other_gate.unwrap_or_default(),
            (Some(_), Some(_)) => format!(
                "the amounts differ: the agent's record {}, the gate's {}{}",
                charge_text(ac),
                charge_text(gc),
                versions_text(&x, &y)
            ),
            (Some(_), None) => format!(
                "the agent's record {} ({}), the gate refused it ({}) and charged nothing",
                charge_text(ac),
                decision_text(&x),
                decision_text(&y)
            ),
            (None, _) => format!(
                "the gate {} ({}) for a request the agent's record shows as not sent ({})",
                charge_text(gc),
                decision_text(&y),
                decision_text(&x)
            ),
        };
        r.differ.push(Entry {
            request_hash: x.request_hash.clone(),
            why,
            agent_charged_millicents: ac,
            gate_charged_millicents: gc,
            agent: Some(x),
            gate: Some(y),
            agent_evidence: None,
            gate_evidence: None,
        });
    }

    // An agent record names its gate by `gate_id`; one without (a daemon that did not price the
    // request by a catalog) by its host, and when the gate's records name no host at all, it is
    // counted as this gate's rather than left out.
    let ours = |x: &Linked, gate_hosts: &BTreeSet<String>| match (&x.gate_id, &opts.gate_id) {
        (Some(xa), Some(id)) => xa == id,
        (Some(_), None) => true,
        (None, _) => gate_hosts.is_empty() || x.at.as_ref().is_some_and(|h| gate_hosts.contains(h)),
    };
    for x in linked.agent_only {
        if !ours(&x, &g.hosts) {
            r.ignored.agent_other_gates += 1;
            continue;
        }
        if !in_window(opts, "agent", &x, &mut r.problems) {
            outside += 1;
            continue;
        }
        let ac = a.charged(&x);
        r.agent_total.add(ac);
        r.not_received.push(Entry {
            request_hash: x.request_hash.clone(),
            why: format!(
                "the agent sent it ({}, {}) and {}; the gate's export has no record of it",
                x.what.as_deref().unwrap_or("-"),
                x.at.as_deref().unwrap_or("-"),
                charge_text(ac)
            ),
            agent_charged_millicents: ac,
            gate_charged_millicents: None,
            agent: Some(x),
            gate: None,
            agent_evidence: None,
            gate_evidence: None,
        });
    }
    for x in linked.not_sent {
        if !ours(&x, &g.hosts) {
            r.ignored.agent_other_gates += 1;
        } else if !in_window(opts, "agent", &x, &mut r.problems) {
            outside += 1;
        } else {
            r.never_sent += 1;
        }
    }
    for y in linked.gate_only {
        let mine = y.passport_id.as_ref().is_some_and(|p| a.passports.contains(p));
        if !mine {
            r.ignored.gate_other_hosts += 1;
            continue;
        }
        if !in_window(opts, "gate", &y, &mut r.problems) {
            outside += 1;
            continue;
        }
        let gc = gate_charged(&y);
        r.gate_total.add(gc);
        r.not_sent_by_this_host.push(Entry {
            request_hash: y.request_hash.clone(),
            why: format!(
                "the gate {} for {} ({}, passport {}), but no request of the agent's export has this hash",
                charge_text(gc),
                y.what.as_deref().unwrap_or("-"),
                decision_text(&y),
                y.passport_id.as_deref().unwrap_or("-")
            ),
            agent_charged_millicents: None,
            gate_charged_millicents: gc,
            agent: None,
            gate: Some(y),
            agent_evidence: None,
            gate_evidence: None,
        });
    }
    r.ignored.outside_window = outside;
    for t in [&mut r.agent_total, &mut r.gate_total] {
        t.dollars = money(t.millicents);
    }
    r.decide();
    r
}

/// Whether a record's time is in the window. A record without a readable time is a problem, and
/// kept, so that nothing is left out unseen.
fn in_window(opts: &SettleOptions, side: &str, l: &Linked, problems: &mut Vec<String>) -> bool {
    if opts.since.is_none() && opts.until.is_none() {
        return true;
    }
    let Some(t) = l.time.as_deref().and_then(parse_time) else {
        problems
            .push(format!("the {side}'s record {} has no readable time; it is settled whatever the window", l.index));
        return true;
    };
    opts.since.is_none_or(|s| t >= s) && opts.until.is_none_or(|u| t < u)
}

/// Dollars of a total that may exceed 64 bits.
fn money(m: u128) -> String {
    match u64::try_from(m) {
        Ok(m) => dollars(m),
        Err(_) => format!("{m} millicents"),
    }
}

/// Reads the export `open` gives once more and sets `side`'s evidence of every entry.
fn attach<R: Read + Seek, F: Fn() -> std::io::Result<R>>(
    report: &mut SettleReport,
    side: Side,
    open: &F,
) -> Result<(), String> {
    let pick = |e: &Entry| match side {
        Side::Agent => e.agent.as_ref().map(|l| l.index),
        Side::Gate => e.gate.as_ref().map(|l| l.index),
    };
    let entries = || report.differ.iter().chain(&report.not_received).chain(&report.not_sent_by_this_host);
    let wanted: BTreeSet<u64> = entries().filter_map(pick).collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let found = evidence(open, &wanted)?;
    for e in report.differ.iter_mut().chain(&mut report.not_received).chain(&mut report.not_sent_by_this_host) {
        let Some(index) = pick(e) else { continue };
        // (`get`, not `remove`: a request hash twice may name one record twice.)
        let att = found.get(&index).cloned();
        match side {
            Side::Agent => e.agent_evidence = att,
            Side::Gate => e.gate_evidence = att,
        }
    }
    Ok(())
}

/// The portable attestations of the records `wanted` (by log index) of one export: a filtered
/// export carries each record's inclusion proof; for a full one, the proofs are computed from
/// the records' leaf hashes as they stream past ([`ProofCollector`]).
pub fn evidence<R: Read + Seek, F: Fn() -> std::io::Result<R>>(
    open: &F,
    wanted: &BTreeSet<u64>,
) -> Result<BTreeMap<u64, PortableAttestation>, String> {
    struct Sink<'a> {
        wanted: &'a BTreeSet<u64>,
        header: Option<Header>,
        collector: Option<ProofCollector>,
        found: BTreeMap<u64, (String, Vec<String>)>,
        error: Option<String>,
    }
    struct Header {
        origin: String,
        host_vkey: String,
        checkpoint: String,
        full: bool,
    }
    impl Sink<'_> {
        fn header(&mut self, members: &[(String, Vec<u8>)]) -> Result<bool, String> {
            let get = |name: &str| members.iter().find(|(m, _)| m == name).map(|(_, v)| v.as_slice());
            let (Some(format), Some(origin), Some(vkey), Some(cp), Some(full)) =
                (get("format"), get("origin"), get("host_vkey"), get("checkpoint"), get("full"))
            else {
                return Ok(false);
            };
            let text = |v: &[u8]| serde_json::from_slice::<String>(v).map_err(|e| e.to_string());
            if text(format)? != EXPORT_FORMAT {
                return Err(format!("not an export ({EXPORT_FORMAT})"));
            }
            let header = Header {
                origin: text(origin)?,
                host_vkey: text(vkey)?,
                checkpoint: text(cp)?,
                full: serde_json::from_slice::<bool>(full).map_err(|e| e.to_string())?,
            };
            if header.full {
                let size = crate::checkpoint::parse_unverified(&header.checkpoint).map_err(|e| e.to_string())?.size;
                let targets = self.wanted.iter().copied().filter(|&i| i < size);
                self.collector = Some(ProofCollector::new(size, targets).map_err(|e| e.to_string())?);
            }
            self.header = Some(header);
            Ok(true)
        }
    }
    impl RecordSink for Sink<'_> {
        fn start(&mut self, members: &[(String, Vec<u8>)]) -> bool {
            if self.header.is_some() {
                return true;
            }
            match self.header(members) {
                Ok(taken) => taken,
                Err(e) => {
                    self.error = Some(e);
                    false
                }
            }
        }
        fn element(&mut self, _: usize, bytes: &[u8]) {
            let Ok(r) = serde_json::from_slice::<ExportedRecord>(bytes) else { return };
            if let Some(c) = &mut self.collector {
                c.push(merkle::leaf_hash(r.record.as_bytes()));
            }
            if self.wanted.contains(&r.index) {
                self.found.insert(r.index, (r.record, r.inclusion_proof));
            }
        }
    }
    let mut sink = Sink { wanted, header: None, collector: None, found: BTreeMap::new(), error: None };
    let mut scanner = Scanner::new(open().map_err(|e| e.to_string())?);
    let top = scanner.top_level(&mut sink).map_err(|e| e.to_string())?;
    if sink.header.is_none() && sink.error.is_none() {
        // The members the records need came after them: read the records again.
        match sink.header(&top.members) {
            Ok(true) => {
                let at = top.records_at.ok_or("no records")?;
                scanner.seek(at).and_then(|()| scanner.records(&mut sink, true)).map_err(|e| e.to_string())?;
            }
            Ok(false) => return Err("not an export: members missing".into()),
            Err(e) => sink.error = Some(e),
        }
    }
    if let Some(e) = sink.error {
        return Err(e);
    }
    let Some(header) = sink.header else { return Err("not an export".into()) };
    let mut out = BTreeMap::new();
    for (index, (record, proof)) in sink.found {
        let proof = match &sink.collector {
            Some(c) => c.proof(index).map_err(|e| e.to_string())?.iter().map(|h| hex::encode(h)).collect(),
            None => proof,
        };
        out.insert(
            index,
            PortableAttestation {
                format: ATTESTATION_FORMAT.to_string(),
                origin: header.origin.clone(),
                host_vkey: header.host_vkey.clone(),
                checkpoint: header.checkpoint.clone(),
                index,
                record,
                inclusion_proof: proof,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{self, ExportBundle, ExportRequest};
    use crate::{verify, Draft, HostKey, Ledger, LedgerOptions};
    use ed25519_dalek::SigningKey;
    use serde_json::{json, Map, Value};
    use std::io::Cursor;

    const GATE_HOST: &str = "shipping.example.test";
    const PRICE: u64 = 2563;

    fn key(seed: u8) -> HostKey {
        HostKey::from_signing_key(SigningKey::from_bytes(&[seed; 32]))
    }

    /// The gate's id (the tests do not check it against the key).
    fn gate_id() -> String {
        "gate_2".to_string()
    }

    /// A log of these `(chain, record)` drafts under `seed`'s key, exported.
    async fn log(seed: u8, records: Vec<(&str, Value)>, since: Option<&str>) -> ExportBundle {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("l.redb"), key(seed), LedgerOptions::default()).unwrap();
        for (chain, body) in records {
            let Value::Object(body) = body else { panic!("{body}") };
            let chain = chain.to_string();
            ledger.transact(move |_| Ok(((), vec![Draft::new(chain, body)]))).await.unwrap();
        }
        let req = ExportRequest { since: since.map(String::from), ..ExportRequest::default() };
        export::export(&ledger, &req).await.unwrap()
    }

    /// The agent daemon's decision of a signed request to the gate.
    fn agent(hash: &str, decision: &str, cost: u64, time: &str) -> (&'static str, Value) {
        (
            "pp_a",
            json!({"kind": "decision", "passport_id": "pp_a", "decision": decision, "reason": "allowed",
            "action": "shipments:create", "host": GATE_HOST, "cost_millicents": cost, "request_hash": "00",
            "signed_request_hash": hash, "time": time}),
        )
    }

    /// The gate's record of a request.
    fn gate(hash: &str, passport: &str, decision: &str, cost: u64, time: &str) -> (&'static str, Value) {
        (
            "gate",
            json!({"kind": "gate_decision", "gate_id": gate_id(), "request_hash": hash, "passport_id": passport,
            "permission": "shipments:create", "decision": decision, "reason": "allowed", "host": GATE_HOST,
            "cost_millicents": cost, "catalog_version": 1, "price_millicents": PRICE, "time": time}),
        )
    }

    const T1: &str = "2026-12-02T10:00:00Z";
    const T2: &str = "2026-12-02T11:00:00Z";
    const T3: &str = "2026-12-02T12:00:00Z";

    fn bytes(b: &ExportBundle) -> Vec<u8> {
        serde_json::to_vec(b).unwrap()
    }

    fn run(a: &ExportBundle, g: &ExportBundle, opts: SettleOptions) -> SettleReport {
        let (a, g) = (bytes(a), bytes(g));
        let opts = SettleOptions { gate_id: Some(gate_id()), ..opts };
        settle_exports(
            || Ok(Cursor::new(a.clone())),
            &key(1).verifying_key(),
            || Ok(Cursor::new(g.clone())),
            &key(2).verifying_key(),
            &opts,
        )
        .unwrap()
    }

    /// An evidence attestation verifies with `seed`'s key and carries the record `index`.
    fn check_evidence(att: &Option<PortableAttestation>, seed: u8, index: u64) {
        let att = att.as_ref().expect("evidence");
        assert_eq!(att.index, index);
        let r = verify::verify_attestation(att, &key(seed).verifying_key());
        assert!(r.is_ok(), "{:?}", r.problems);
        let doc = serde_json::to_string(att).unwrap();
        assert!(verify::verify_document(&doc, &key(seed).verifying_key(), None).is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_sides_agree_with_exact_totals() {
        let a = log(
            1,
            vec![agent("h1", "allow", PRICE, T1), agent("h2", "allow", PRICE, T2), agent("h0", "block", 0, T2)],
            None,
        )
        .await;
        let g = log(
            2,
            vec![
                ("catalog", json!({"kind": "catalog_published", "gate_id": gate_id(), "catalog_version": 1})),
                gate("h1", "pp_a", "allow", PRICE, T1),
                gate("h2", "pp_a", "allow", PRICE, T2),
                gate("other", "pp_other_host", "allow", PRICE, T2),
            ],
            None,
        )
        .await;
        let r = run(&a, &g, SettleOptions::default());
        assert!(r.ok, "{r:#?}");
        assert_eq!((r.agreed, r.never_sent, r.ignored.gate_other_hosts), (2, 1, 1));
        assert_eq!(r.agent_total, Total { millicents: 5126, dollars: "$0.05126".into(), charges: 2 });
        assert_eq!(r.gate_total, r.agent_total);
        assert!(r.agent_log.verified && r.gate_log.verified);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_on_one_side_only_both_ways_with_evidence() {
        let mut other_gate = agent("elsewhere", "allow", 500, T1);
        other_gate.1["gate_id"] = json!("gate_another");
        let a =
            log(1, vec![agent("h1", "allow", PRICE, T1), agent("lost", "allow", PRICE, T1), other_gate], None).await;
        let g =
            log(2, vec![gate("h1", "pp_a", "allow", PRICE, T1), gate("forged", "pp_a", "allow", 900, T2)], None).await;
        let r = run(&a, &g, SettleOptions::default());
        assert!(!r.ok);
        assert_eq!((r.agreed, r.ignored.agent_other_gates), (1, 1));
        assert_eq!(r.not_received.len(), 1, "{r:#?}");
        let lost = &r.not_received[0];
        assert_eq!(lost.request_hash, "lost");
        assert!(lost.why.contains("no record"), "{}", lost.why);
        check_evidence(&lost.agent_evidence, 1, 1);
        assert!(lost.gate_evidence.is_none());
        assert_eq!(r.not_sent_by_this_host.len(), 1);
        let forged = &r.not_sent_by_this_host[0];
        assert!(forged.why.contains("$0.009") && forged.why.contains("pp_a"), "{}", forged.why);
        check_evidence(&forged.gate_evidence, 2, 1);
        assert_eq!(
            (r.agent_total.millicents, r.gate_total.millicents),
            (2 * u128::from(PRICE), u128::from(PRICE) + 900)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_without_gate_id_is_this_gates_by_host() {
        let mut elsewhere = agent("elsewhere", "allow", 500, T1);
        elsewhere.1["host"] = json!("other.example");
        let a = log(1, vec![agent("h1", "allow", PRICE, T1), elsewhere.clone()], None).await;
        let g = log(2, vec![gate("h1", "pp_a", "allow", PRICE, T1)], None).await;
        let r = run(&a, &g, SettleOptions::default());
        assert!(r.ok && r.ignored.agent_other_gates == 1, "{r:#?}");
        // A gate that received nothing names no host: nothing is left out.
        let a = log(1, vec![elsewhere], None).await;
        let g = log(2, vec![("catalog", json!({"kind": "catalog_published", "gate_id": gate_id()}))], None).await;
        let r = run(&a, &g, SettleOptions::default());
        assert!(!r.ok && r.not_received.len() == 1, "{r:#?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amounts_and_decisions_that_differ() {
        let a = log(
            1,
            vec![agent("h1", "allow", PRICE, T1), agent("h2", "allow", PRICE, T1), agent("h3", "block", 0, T1)],
            None,
        )
        .await;
        let g = log(
            2,
            vec![
                gate("h1", "pp_a", "allow", 3075, T1),
                gate("h2", "pp_a", "block", 0, T1),
                gate("h3", "pp_a", "allow", PRICE, T1),
            ],
            None,
        )
        .await;
        let r = run(&a, &g, SettleOptions::default());
        assert!(!r.ok);
        assert_eq!((r.agreed, r.differ.len()), (0, 3), "{r:#?}");
        assert!(r.differ[0].why.contains("amounts differ") && r.differ[0].why.contains("3075"), "{}", r.differ[0].why);
        assert!(r.differ[1].why.contains("refused"), "{}", r.differ[1].why);
        assert!(r.differ[2].why.contains("not sent"), "{}", r.differ[2].why);
        for (i, e) in r.differ.iter().enumerate() {
            check_evidence(&e.agent_evidence, 1, i as u64);
            check_evidence(&e.gate_evidence, 2, i as u64);
        }
        assert_eq!((r.agent_total.millicents, r.gate_total.millicents), (2 * 2563, 3075 + 2563));
    }

    /// The agent's decision of a request it priced by the gate's catalog `version`.
    fn agent_at(hash: &str, cost: u64, version: u64) -> (&'static str, Value) {
        let (chain, mut v) = agent(hash, "allow", cost, T1);
        v["gate_id"] = json!(gate_id());
        v["catalog_version"] = json!(version);
        (chain, v)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn catalog_versions_explain_a_difference_and_alone_are_none() {
        // h1: same price by versions 2 and 1 (the daemon's view of the version in force ahead of
        // the gate's): agreed. h2: the agent priced by version 2, the gate by its lock at 1, and
        // the amounts differ: the reason names both versions. h3: no version on the agent's side.
        // h4: the gate's record names no version (a gate without a catalog).
        let a = log(
            1,
            vec![
                agent_at("h1", PRICE, 2),
                agent_at("h2", 9000, 2),
                agent("h3", "allow", 9000, T1),
                agent_at("h4", 9000, 2),
            ],
            None,
        )
        .await;
        let (chain, mut unpriced) = gate("h4", "pp_a", "allow", PRICE, T1);
        unpriced.as_object_mut().unwrap().remove("catalog_version");
        let g = log(
            2,
            vec![
                gate("h1", "pp_a", "allow", PRICE, T1),
                gate("h2", "pp_a", "allow", PRICE, T1),
                gate("h3", "pp_a", "allow", PRICE, T1),
                (chain, unpriced),
            ],
            None,
        )
        .await;
        let r = run(&a, &g, SettleOptions::default());
        assert!(!r.ok);
        assert_eq!((r.agreed, r.differ.len()), (1, 3), "{r:#?}");
        let why = &r.differ[0].why;
        assert_eq!(r.differ[0].request_hash, "h2");
        assert!(why.contains("catalog version 2") && why.contains("by version 1"), "{why}");
        let why = &r.differ[1].why;
        assert!(why.contains("names no catalog version") && why.contains("version 1"), "{why}");
        let why = &r.differ[2].why;
        assert!(why.contains("catalog version 2") && why.contains("the gate's names none"), "{why}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_window_is_since_inclusive_until_exclusive() {
        let a = log(
            1,
            vec![agent("h1", "allow", 1, T1), agent("h2", "allow", 20, T2), agent("h3", "allow", 300, T3)],
            None,
        )
        .await;
        // The gate has h1 (before the window) and h2; h3 is outside the window, so missing it is fine.
        let g = log(2, vec![gate("h2", "pp_a", "allow", 20, T2), gate("late", "pp_a", "allow", 4000, T3)], None).await;
        let t = |s: &str| Some(parse_time(s).unwrap());
        let r = run(&a, &g, SettleOptions { since: t(T2), until: t(T3), ..SettleOptions::default() });
        assert!(r.ok, "{r:#?}");
        assert_eq!((r.agreed, r.ignored.outside_window), (1, 3));
        assert_eq!((r.agent_total.millicents, r.gate_total.millicents), (20, 20));
        assert_eq!(r.since.as_deref(), Some(T2));
        // Widened to the end, the one-sided records appear.
        let r = run(&a, &g, SettleOptions { since: t(T2), ..SettleOptions::default() });
        assert_eq!((r.not_received.len(), r.not_sent_by_this_host.len()), (1, 1), "{r:#?}");
        // A filtered export (since T2): evidence from the proofs it carries.
        let g2 = log(2, vec![gate("h1", "pp_a", "allow", 1, T1), gate("h2", "pp_a", "allow", 21, T2)], Some(T2)).await;
        assert!(!g2.full);
        let r = run(&a, &g2, SettleOptions { since: t(T2), until: t(T3), ..SettleOptions::default() });
        assert_eq!(r.differ.len(), 1, "{r:#?}");
        check_evidence(&r.differ[0].gate_evidence, 2, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tampered_record_fails_verification_and_is_named() {
        let a = log(1, vec![agent("h1", "allow", PRICE, T1)], None).await;
        let mut g = log(2, vec![gate("h1", "pp_a", "allow", PRICE, T1)], None).await;
        // The gate's operator lowers the price in its record, keeping it canonical JSON.
        let mut v: Map<String, Value> = serde_json::from_str(&g.records[0].record).unwrap();
        v.insert("cost_millicents".into(), json!(1));
        g.records[0].record = String::from_utf8(crate::canonical::canonicalize_object(&v).unwrap()).unwrap();
        let r = run(&a, &g, SettleOptions::default());
        assert!(!r.ok);
        assert!(r.agent_log.verified && !r.gate_log.verified);
        assert!(r.gate_log.problems.iter().any(|p| p.contains("root rebuilt")), "{:?}", r.gate_log.problems);
        // Unverified, its record gives no evidence.
        assert!(r.differ[0].gate_evidence.is_none() && r.differ[0].agent_evidence.is_some());
        // A record removed: the log does not verify either.
        let mut g =
            log(2, vec![gate("h0", "pp_a", "allow", 1, T1), gate("h1", "pp_a", "allow", PRICE, T1)], None).await;
        g.records.remove(0);
        let r = run(&a, &g, SettleOptions::default());
        assert!(!r.ok && !r.gate_log.verified);
        assert!(r.gate_log.problems.iter().any(|p| p.contains("record 0 is missing")), "{:?}", r.gate_log.problems);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn evidence_from_a_document_whose_records_come_first() {
        let g = log(2, vec![gate("h0", "pp_a", "allow", 1, T1), gate("h1", "pp_a", "allow", 2, T1)], None).await;
        // The members in another order: records before the checkpoint they need.
        let records = serde_json::to_string(&g.records).unwrap();
        let mut header = serde_json::to_value(&g).unwrap();
        header.as_object_mut().unwrap().remove("records");
        let header = serde_json::to_string(&header).unwrap();
        let bytes = format!("{{\"records\":{records},{}", &header[1..]).into_bytes();
        assert!(bytes.starts_with(b"{\"records\""));
        let found = evidence(&|| Ok(Cursor::new(bytes.clone())), &BTreeSet::from([1])).unwrap();
        check_evidence(&found.get(&1).cloned(), 2, 1);
        assert_eq!(found.len(), 1);
    }

    #[test]
    fn an_unreadable_export_names_its_side() {
        let e = settle_exports(
            || Ok(Cursor::new(b"{\"records\": [1".to_vec())),
            &key(1).verifying_key(),
            || Ok(Cursor::new(Vec::new())),
            &key(2).verifying_key(),
            &SettleOptions::default(),
        )
        .unwrap_err();
        assert_eq!(e.side, Side::Agent);
    }
}
