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
//! A pair agrees when both sides charged the same amount, or both charged nothing. What is
//! reported, each record with its evidence (a portable attestation: the record's exact bytes,
//! its inclusion proof and the export's signed checkpoint, which `sluice audit verify` checks
//! offline): pairs that differ, requests the agent sent that the gate has no record of ("not
//! received"), and gate records of this host's passports with no request of the agent's export
//! ("not sent by this host").
//!
//! Scope: an agent record names its gate by `gate_id` when the daemon priced the request by that
//! gate's catalog; one that names another gate is ignored, and one that names none belongs to
//! this gate when its `host` is a host the gate's records name. A gate record belongs to this
//! agent host when its passport is one the agent's export names (another host's agents are
//! ignored). The window `[since, until)` is by record time: a pair by the agent's record (the
//! request was decided there first), a record on one side alone by its own.
//!
//! Memory: the exports are read as streams, like the verifier; what is kept is one small summary
//! per linked record, and for the evidence the O(log n) proof nodes of each reported record.

use crate::docstream::{RecordSink, Scanner};
use crate::export::{ExportedRecord, PortableAttestation, ATTESTATION_FORMAT, EXPORT_FORMAT};
use crate::hex;
use crate::link::{self, Collected, Linked, Side, SideRead};
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
    /// Exact, in millicents (1/1000 of a cent).
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
            (Some(_), Some(_)) => format!("the amounts differ: the agent's record {}, the gate's {}", charge_text(ac), charge_text(gc)),
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

    let ours = |x: &Linked, c: &Collected, gates_hosts: &BTreeSet<String>| match (&x.gate_id, &opts.gate_id) {
        (Some(xa), Some(id)) => xa == id,
        (Some(_), None) => true,
        (None, _) => x.at.as_ref().is_some_and(|h| gates_hosts.contains(h)) || c.passports.is_empty(),
    };
    for x in linked.agent_only {
        if !ours(&x, &a, &g.hosts) {
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
        if !ours(&x, &a, &g.hosts) {
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
                "the gate {} ({}, {} for passport {}) but no request of the agent's export has this hash",
                charge_text(gc),
                decision_text(&y),
                y.what.as_deref().unwrap_or("-"),
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
        problems.push(format!("the {side}'s record {} has no readable time; it is settled whatever the window", l.index));
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
