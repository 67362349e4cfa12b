//! `sluice audit export | proof | verify | link | settle`.
//!
//! `export` and `proof` ask the daemon (they need its store and a freshly signed checkpoint);
//! `verify` is offline: it needs only the file and the host's public key.

use super::ops::call;
use super::ops::ApiSocket;
use super::CmdResult;
use crate::api::client::{Client, ClientError};
use crate::files::{self, Links};
use crate::keyfile;
use crate::ledger::docstream::{Scanner, Skip};
use crate::ledger::{checkpoint, seen, verify};
use anyhow::Context;
use bytes::{Buf, Bytes};
use clap::{Args, Subcommand};
use http::Method;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Export records, their inclusion proofs and a signed checkpoint to a file.
    Export(ExportArgs),
    /// Write a portable attestation: one record, its inclusion proof and a signed checkpoint.
    Proof(ProofArgs),
    /// Verify an export or an attestation offline. Exit status 1 names every broken record, gap or
    /// inconsistency.
    Verify(AuditVerifyArgs),
    /// Match an agent host's export with a gate's export by request hash (linked attestations).
    ///
    /// Both exports are verified first, each with its own key. Then every request the daemon
    /// signed for a gate (a decision record with `signed_request_hash`) is paired with the gate's
    /// record of it (`request_hash`, with `gate_id`). Prints the matched pairs, every record
    /// present on one side only, and the requests that never left (blocked, hold not approved,
    /// upstream failed).
    ///
    /// Exit status: 0 when both exports verify and every request sent matches a gate record and
    /// every gate record matches a request; 1 otherwise (a problem in either export, a record on
    /// one side only, a request hash twice, passport ids that differ), or on an error.
    #[command(verbatim_doc_comment)]
    Link(LinkArgs),
    /// Settle an agent host's export against a gate's: each side's total, from its own log.
    ///
    /// Both exports are verified, each with its own key, and paired by request hash (as `link`).
    /// The agent's side charged what its decisions of signed requests that went out cost
    /// (`cost_millicents`); the gate's side what its allowed `gate_decision` records cost.
    /// Prints both totals (dollars and millicents, exact), the pairs that agree, and every record
    /// that does not: pairs whose charge or decision differs, requests the gate never received,
    /// gate records of this host's passports that this host never sent. Each with its evidence:
    /// its log index and leaf hash here; with --json, or written by --evidence-dir, a portable
    /// attestation that `sluice audit verify F --host-pub KEY` checks offline.
    ///
    /// Exit status: 0 when both logs verify and every record in the window pairs and agrees;
    /// 1 otherwise (the lines above say which log, which record and why), or on an error.
    #[command(verbatim_doc_comment)]
    Settle(SettleArgs),
}

/// The two exports `link` and `settle` read, and the key that verifies each.
#[derive(Args, Debug)]
pub struct ExportPair {
    /// The agent host's export (`sluice audit export`).
    agent_export: PathBuf,
    /// The gate's export (`sluice gate audit export`).
    gate_export: PathBuf,
    /// The agent host's public key (`host.pub` in the daemon's state_dir).
    #[arg(long, value_name = "F")]
    agent_pub: PathBuf,
    /// The gate's public key (`gate.pub`).
    #[arg(long, value_name = "F")]
    gate_pub: PathBuf,
}

#[derive(Args, Debug)]
pub struct SettleArgs {
    #[command(flatten)]
    pair: ExportPair,
    /// Only records at or after this time (RFC 3339, e.g. 2026-12-01T00:00:00Z).
    #[arg(long, value_name = "T")]
    since: Option<String>,
    /// Only records before this time (RFC 3339).
    #[arg(long, value_name = "T")]
    until: Option<String>,
    /// Write the evidence of each record that does not settle to this directory, one portable
    /// attestation per record (`agent-INDEX.json`, `gate-INDEX.json`; never overwritten).
    #[arg(long, value_name = "DIR")]
    evidence_dir: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct LinkArgs {
    #[command(flatten)]
    pair: ExportPair,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Only this passport's records.
    #[arg(long, value_name = "ID")]
    passport: Option<String>,
    /// Only records at or after this time (RFC 3339, e.g. 2026-01-31T00:00:00Z).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// An older checkpoint you hold: the export then carries a consistency proof from it.
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    /// The export file to write (never overwritten).
    #[arg(long, value_name = "F")]
    out: PathBuf,
}

#[derive(Args, Debug)]
pub struct ProofArgs {
    /// The attestation id (the record's log index).
    id: u64,
    /// The file to write (never overwritten).
    #[arg(long, value_name = "F")]
    out: PathBuf,
}

#[derive(Args, Debug)]
pub struct AuditVerifyArgs {
    /// An export or a portable attestation.
    file: PathBuf,
    /// The host's public key (`host.pub` in the daemon's state_dir).
    #[arg(long, value_name = "F")]
    host_pub: PathBuf,
    /// An older checkpoint (a signed note) to check consistency and rollback against.
    #[arg(long, value_name = "OLD")]
    checkpoint: Option<PathBuf>,
    /// Also check the export against every checkpoint the fleet's Redis holds for this host key
    /// (`[fleet]` of --config): a history rewritten or cut short since it was published fails.
    #[arg(long, conflicts_with = "fleet_checkpoints")]
    fleet: bool,
    /// The same, against a dump of the fleet's checkpoints (`sluice fleet status
    /// --checkpoints-out FILE`), without access to Redis.
    #[arg(long, value_name = "FILE")]
    fleet_checkpoints: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: AuditCmd, socket: &ApiSocket, config: &Path) -> CmdResult {
    match cmd {
        AuditCmd::Export(a) => export(a, socket),
        AuditCmd::Proof(a) => proof(a, socket),
        AuditCmd::Verify(a) => verify_cmd(a, config),
        AuditCmd::Link(a) => link_cmd(a),
        AuditCmd::Settle(a) => settle_cmd(a),
    }
}

fn write_new(path: &Path, doc: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(doc)? + "\n";
    files::create_new(path, text.as_bytes(), 0o644)?;
    Ok(())
}

/// Writes the export to the file as it arrives. A copy of each part goes to a second thread
/// that reads the document's structure, so a document the daemon cut short is refused (and no
/// file is left) and the records are counted, without holding the export in memory.
fn export(a: ExportArgs, socket: &ApiSocket) -> CmdResult {
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(p) = &a.passport {
        query.append_pair("passport_id", p);
    }
    if let Some(s) = &a.since {
        query.append_pair("since", s);
    }
    if let Some(cp) = &a.checkpoint {
        let note = files::read_text(cp, 64 * 1024, Links::Follow)?;
        let old = checkpoint::parse_unverified(&note).with_context(|| format!("{}: not a checkpoint", cp.display()))?;
        query.append_pair("consistency_from", &old.size.to_string());
    }
    let path = format!("/v1/attestations/export?{}", query.finish());
    let count = download_export(socket.path()?, &path, &a.out)?;
    println!("exported {count} record(s) to {}", a.out.display());
    Ok(ExitCode::SUCCESS)
}

/// Downloads an export from `path` on the API at `socket` into a new file `out`, and returns the
/// number of records: `out` appears only once the document is complete (the daemon's export and
/// a running gate's, `sluice gate audit export`).
pub(super) fn download_export(socket: &Path, path: &str, out_path: &Path) -> anyhow::Result<usize> {
    let mut out = files::NewFile::create(out_path, 0o644)?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(4);
    let checker = std::thread::spawn(move || {
        Scanner::new(PartsReader { rx, part: Bytes::new() }).top_level(&mut Skip).map(|top| top.records_count)
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let client = Client::new(socket);
    let downloaded = rt.block_on(client.download(path, |part| {
        out.write(&part).map_err(|e| e.to_string())?;
        // The checker stops at a broken document; its error then says why.
        let _ = tx.send(part);
        Ok(())
    }));
    drop(tx);
    let checked = checker.join();
    downloaded.map_err(|e| match e {
        ClientError::Api { message, .. } => anyhow::anyhow!(message),
        other => anyhow::anyhow!(other),
    })?;
    let count = match checked {
        Ok(Ok(count)) => count,
        Ok(Err(e)) => anyhow::bail!(
            "the export is not a complete document ({e}); {} was not written, see the log of the daemon or gate",
            out_path.display()
        ),
        Err(_) => anyhow::bail!("checking the export failed; {} was not written", out_path.display()),
    };
    out.commit()?;
    Ok(count)
}

/// The parts of a download, as a reader.
struct PartsReader {
    rx: std::sync::mpsc::Receiver<Bytes>,
    part: Bytes,
}

impl std::io::Read for PartsReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.part.is_empty() {
            match self.rx.recv() {
                Ok(part) => self.part = part,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.part.len());
        if let (Some(dst), Some(src)) = (buf.get_mut(..n), self.part.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.part.advance(n);
        Ok(n)
    }
}

fn proof(a: ProofArgs, socket: &ApiSocket) -> CmdResult {
    if a.out.exists() {
        anyhow::bail!("{}: already exists; refusing to overwrite it", a.out.display());
    }
    let att = call(socket, Method::GET, &format!("/v1/attestations/{}/proof", a.id), None)?;
    write_new(&a.out, &att)?;
    println!("attestation {} written to {}", a.id, a.out.display());
    Ok(ExitCode::SUCCESS)
}

fn verify_cmd(a: AuditVerifyArgs, config: &Path) -> CmdResult {
    let host = keyfile::load_public_key(&a.host_pub)?;
    let older = a.checkpoint.as_ref().map(|p| files::read_text(p, 64 * 1024, Links::Follow)).transpose()?;
    let older = older.as_ref().map(|s| s.as_str());
    // The fleet is read first: a Redis that cannot be read stops the command before any work.
    let fleet = match (&a.fleet_checkpoints, a.fleet) {
        (Some(path), _) => Some((super::fleet::read_dump(path)?, format!("dump {}", path.display()))),
        (None, true) => {
            let dump = super::fleet::read_from_redis(config)?;
            let source = format!("redis {} prefix {}", dump.redis, dump.prefix);
            Some((dump, source))
        }
        (None, false) => None,
    };
    // Read as a stream: memory stays bounded whatever the export's size.
    let file = files::open(&a.file, Links::Follow)?.into_file();
    let report = verify::verify_reader(file, &host, older);
    let fleet = match fleet {
        None => None,
        Some((dump, source)) => Some(check_fleet(&a.file, &host, &dump, &source)?),
    };
    let fleet_ok = fleet.as_ref().is_none_or(FleetCheck::ok);
    let ok = report.is_ok() && fleet_ok;
    if a.json {
        let mut doc = serde_json::to_value(&report)?;
        if let Some(obj) = doc.as_object_mut() {
            if let Some(f) = &fleet {
                obj.insert("fleet".into(), serde_json::to_value(f)?);
            }
            obj.insert("ok".into(), ok.into());
        }
        super::util::print_json(&doc);
    } else {
        for p in &report.problems {
            println!("PROBLEM  {p}");
        }
        if let Some(f) = &fleet {
            f.print();
        }
        println!(
            "{}: {} record(s) in {} chain(s) checked against checkpoint size {}",
            a.file.display(),
            report.records_checked,
            report.chains_checked,
            report.checkpoint_size.map(|s| s.to_string()).unwrap_or_else(|| "-".into())
        );
    }
    if !fleet_ok {
        if let Some(f) = &fleet {
            eprintln!("sluice: {}: {}", a.file.display(), f.failure());
        }
    }
    if ok {
        // With --json, standard output is exactly one JSON document (its `ok` says the same).
        if !a.json {
            println!("verified: OK");
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("sluice: {}: verification FAILED with {} problem(s)", a.file.display(), report.problems.len());
        Ok(ExitCode::FAILURE)
    }
}

/// The export checked against the checkpoints the fleet holds for its host key.
#[derive(serde::Serialize)]
struct FleetCheck {
    source: String,
    /// The host_ids registered with the host key.
    hosts: Vec<String>,
    #[serde(flatten)]
    report: Option<seen::SeenReport>,
    /// Why the export could not be checked against the fleet at all.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl FleetCheck {
    fn ok(&self) -> bool {
        self.error.is_none() && self.report.as_ref().is_some_and(seen::SeenReport::consistent)
    }

    fn failure(&self) -> String {
        match (&self.error, &self.report) {
            (Some(e), _) => format!("not checked against the fleet: {e}"),
            (None, Some(r)) => format!(
                "the export disagrees with {} checkpoint(s) the host published to the fleet",
                r.results.iter().filter(|x| x.is_conflict()).count()
            ),
            (None, None) => "not checked against the fleet".into(),
        }
    }

    fn print(&self) {
        if let Some(e) = &self.error {
            println!("PROBLEM  fleet ({}): {e}", self.source);
            return;
        }
        let Some(r) = &self.report else { return };
        let mut consistent = 0usize;
        for x in &r.results {
            match &x.outcome {
                seen::Outcome::Consistent => consistent += 1,
                seen::Outcome::Fork { .. } | seen::Outcome::Beyond { .. } => println!("PROBLEM  fleet: {x}"),
                seen::Outcome::Untrusted { .. } => println!("REFUSED  fleet: {x}"),
                seen::Outcome::Unchecked { .. } => println!("NOTE     fleet: {x}"),
            }
        }
        println!(
            "fleet ({}): {consistent} of {} published checkpoint(s) of host(s) {} consistent with the export",
            self.source,
            r.results.len(),
            self.hosts.join(", ")
        );
    }
}

fn check_fleet(
    file: &Path,
    host: &ed25519_dalek::VerifyingKey,
    dump: &crate::fleet::checkpoints::Dump,
    source: &str,
) -> anyhow::Result<FleetCheck> {
    let (notes, hosts) = crate::fleet::checkpoints::seen_for(&dump.hosts, host, source);
    let mut check = FleetCheck { source: source.to_string(), hosts, report: None, error: None };
    if notes.is_empty() {
        check.error = Some(format!(
            "the fleet holds no checkpoint of this host key ({}); is --host-pub the right key, and does the host run with [fleet]?",
            checkpoint::vkey(host)
        ));
        return Ok(check);
    }
    let reader = files::open(file, Links::Follow)?.into_file();
    match seen::check_reader(reader, host, &notes) {
        Ok(r) => check.report = Some(r),
        Err(e) => check.error = Some(e.to_string()),
    }
    Ok(check)
}

fn link_cmd(a: LinkArgs) -> CmdResult {
    use crate::ledger::link::{self, Linked, Side};
    let mut failed = Vec::new();
    let mut collected = Vec::new();
    for (side, file, key) in
        [(Side::Agent, &a.pair.agent_export, &a.pair.agent_pub), (Side::Gate, &a.pair.gate_export, &a.pair.gate_pub)]
    {
        let key = keyfile::load_public_key(key)?;
        let pinned = Pinned::new(file)?;
        let read =
            link::read_side(|| pinned.open(), &key, side).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        pinned.unchanged()?;
        for p in &read.verify.problems {
            failed.push(format!("{}: {p}", file.display()));
        }
        collected.push(read.collected);
    }
    let gate = collected.pop().unwrap_or_default();
    let agent = collected.pop().unwrap_or_default();
    let mut report = link::link(agent, gate);
    for f in failed.into_iter().rev() {
        report.problems.insert(0, format!("verification: {f}"));
    }
    let ok = report.is_ok();
    if a.json {
        let mut doc = serde_json::to_value(&report)?;
        if let Some(obj) = doc.as_object_mut() {
            obj.insert("ok".into(), ok.into());
        }
        super::util::print_json(&doc);
    } else {
        let agent = |l: &Linked| {
            format!(
                "agent #{} {} {} {} {}",
                l.index,
                l.decision.as_deref().unwrap_or("-"),
                l.reason.as_deref().unwrap_or("-"),
                l.what.as_deref().unwrap_or("-"),
                l.at.as_deref().unwrap_or("-")
            )
        };
        let gate = |l: &Linked| {
            format!(
                "gate #{} {} {} {} {}",
                l.index,
                l.at.as_deref().unwrap_or("-"),
                l.decision.as_deref().unwrap_or("-"),
                l.reason.as_deref().unwrap_or("-"),
                l.what.as_deref().unwrap_or("-")
            )
        };
        for (x, g) in &report.matched {
            println!("MATCHED     {}  {} <-> {}", x.request_hash, agent(x), gate(g));
        }
        for x in &report.agent_only {
            println!("AGENT ONLY  {}  {} (sent, but the gate's export has no record of it)", x.request_hash, agent(x));
        }
        for g in &report.gate_only {
            println!("GATE ONLY   {}  {} (no request of the agent's export has this hash)", g.request_hash, gate(g));
        }
        for x in &report.not_sent {
            println!("NOT SENT    {}  {} (never reached the gate)", x.request_hash, agent(x));
        }
        for p in &report.problems {
            println!("PROBLEM     {p}");
        }
        println!(
            "{} matched, {} agent only, {} gate only, {} not sent, {} problem(s)",
            report.matched.len(),
            report.agent_only.len(),
            report.gate_only.len(),
            report.not_sent.len(),
            report.problems.len()
        );
    }
    if ok {
        if !a.json {
            println!("linked: OK");
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("sluice: the exports do not link: see the lines above");
        Ok(ExitCode::FAILURE)
    }
}

/// An export read several times as a stream (verified, then read for what link and settle
/// need): each read must see the bytes the verifier checked, so a file replaced or written to
/// between or during the reads (its inode, size, mtime or ctime changed) is refused.
struct Pinned<'a> {
    path: &'a Path,
    stamp: [i64; 7],
}

impl<'a> Pinned<'a> {
    fn new(path: &'a Path) -> anyhow::Result<Self> {
        let file = files::open(path, Links::Follow)?.into_file();
        Ok(Pinned { path, stamp: Self::stamp_of(&file)? })
    }

    fn stamp_of(f: &std::fs::File) -> std::io::Result<[i64; 7]> {
        use std::os::unix::fs::MetadataExt;
        let m = f.metadata()?;
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Ok([n(m.dev()), n(m.ino()), n(m.size()), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()])
    }

    fn changed(&self) -> std::io::Error {
        std::io::Error::other(format!(
            "{} changed while it was being read (replaced or written to); copy it somewhere nothing writes and run again",
            self.path.display()
        ))
    }

    /// Opens the export for one more read.
    fn open(&self) -> std::io::Result<std::fs::File> {
        let file = files::open(self.path, Links::Follow)
            .map(|f| f.into_file())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        if Self::stamp_of(&file)? != self.stamp {
            return Err(self.changed());
        }
        Ok(file)
    }

    /// After the last read: the file is still the one read.
    fn unchanged(&self) -> anyhow::Result<()> {
        let file = files::open(self.path, Links::Follow)?.into_file();
        if Self::stamp_of(&file)? != self.stamp {
            return Err(self.changed().into());
        }
        Ok(())
    }
}

fn time_arg(flag: &str, value: &Option<String>) -> anyhow::Result<Option<chrono::DateTime<chrono::Utc>>> {
    value
        .as_deref()
        .map(|s| {
            crate::ledger::record::parse_time(s)
                .ok_or_else(|| anyhow::anyhow!("{flag} {s:?} is not an RFC 3339 time (e.g. 2026-12-01T00:00:00Z)"))
        })
        .transpose()
}

fn settle_cmd(a: SettleArgs) -> CmdResult {
    use crate::ledger::export::PortableAttestation;
    use crate::ledger::link::{Linked, Side};
    use crate::ledger::settle::{self, Entry, LogCheck, SettleOptions};
    let agent_key = keyfile::load_public_key(&a.pair.agent_pub)?;
    let gate_key = keyfile::load_public_key(&a.pair.gate_pub)?;
    let opts = SettleOptions {
        gate_id: Some(crate::gate::gate_id(&gate_key)),
        since: time_arg("--since", &a.since)?,
        until: time_arg("--until", &a.until)?,
    };
    if let (Some(s), Some(u)) = (opts.since, opts.until) {
        if s >= u {
            anyhow::bail!("--since {} is not before --until {}: the window is empty", s, u);
        }
    }
    let (agent, gate) = (Pinned::new(&a.pair.agent_export)?, Pinned::new(&a.pair.gate_export)?);
    let report =
        settle::settle_exports(|| agent.open(), &agent_key, || gate.open(), &gate_key, &opts).map_err(|e| {
            let file = if e.side == Side::Agent { &a.pair.agent_export } else { &a.pair.gate_export };
            anyhow::anyhow!("{}: {}", file.display(), e.reason)
        })?;
    agent.unchanged()?;
    gate.unchanged()?;
    let entries = || report.differ.iter().chain(&report.not_received).chain(&report.not_sent_by_this_host);
    let mut written = 0usize;
    if let Some(dir) = &a.evidence_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for e in entries() {
            for (name, att) in [("agent", &e.agent_evidence), ("gate", &e.gate_evidence)] {
                if let Some(att) = att {
                    let path = dir.join(format!("{name}-{}.json", att.index));
                    if path.exists() {
                        continue; // one record named by two entries
                    }
                    write_new(&path, &serde_json::to_value(att)?)?;
                    written += 1;
                }
            }
        }
    }
    if a.json {
        super::util::print_json(&serde_json::to_value(&report)?);
    } else {
        let log_line = |name: &str, file: &Path, c: &LogCheck| {
            let size = c.checkpoint_size.map_or_else(|| "-".to_string(), |s| s.to_string());
            if c.verified {
                println!(
                    "{name} log  {}: verified ({} records, checkpoint size {size})",
                    file.display(),
                    c.records_checked
                );
            } else {
                println!("{name} log  {}: verification FAILED with {} problem(s):", file.display(), c.problems.len());
                for p in &c.problems {
                    println!("  PROBLEM  {p}");
                }
            }
        };
        log_line("agent", &a.pair.agent_export, &report.agent_log);
        log_line("gate ", &a.pair.gate_export, &report.gate_log);
        println!("gate       {}", report.gate_id.as_deref().unwrap_or("-"));
        println!(
            "window     {} .. {}",
            report.since.as_deref().unwrap_or("(start)"),
            report.until.as_deref().unwrap_or("(end)")
        );
        println!();
        println!("{:<12}{:>18}{:>18}", "", "agent", "gate");
        let (at, gt) = (&report.agent_total, &report.gate_total);
        println!("{:<12}{:>18}{:>18}", "total", at.dollars, gt.dollars);
        println!("{:<12}{:>18}{:>18}", "millicents", at.millicents, gt.millicents);
        println!("{:<12}{:>18}{:>18}", "charges", at.charges, gt.charges);
        println!();
        let leaf = |att: &Option<PortableAttestation>| {
            att.as_ref().map_or_else(
                || "no evidence: its log did not verify".to_string(),
                |att| {
                    format!(
                        "leaf {}",
                        crate::ledger::hex::encode(&crate::ledger::merkle::leaf_hash(att.record.as_bytes()))
                    )
                },
            )
        };
        let record = |side: &str, l: &Option<Linked>, att: &Option<PortableAttestation>| {
            l.as_ref()
                .map(|l| format!("    {side} record {} ({}), {}", l.index, l.time.as_deref().unwrap_or("-"), leaf(att)))
        };
        let show = |label: &str, list: &[Entry]| {
            for e in list {
                println!("{label:<22}{}", e.request_hash);
                println!("    {}", e.why);
                for line in [record("agent", &e.agent, &e.agent_evidence), record("gate ", &e.gate, &e.gate_evidence)]
                    .into_iter()
                    .flatten()
                {
                    println!("{line}");
                }
            }
        };
        show("DIFFERS", &report.differ);
        show("NOT RECEIVED", &report.not_received);
        show("NOT SENT BY THIS HOST", &report.not_sent_by_this_host);
        for p in &report.problems {
            println!("PROBLEM  {p}");
        }
        let i = &report.ignored;
        println!(
            "{} agree, {} differ, {} not received, {} not sent by this host; {} never left the agent's host; ignored: {} of other gates, {} of other hosts' passports, {} outside the window",
            report.agreed,
            report.differ.len(),
            report.not_received.len(),
            report.not_sent_by_this_host.len(),
            report.never_sent,
            i.agent_other_gates,
            i.gate_other_hosts,
            i.outside_window
        );
        if let Some(dir) = &a.evidence_dir {
            println!(
                "{written} evidence file(s) in {} (check each: sluice audit verify F --host-pub KEY)",
                dir.display()
            );
        } else if entries().next().is_some() {
            println!("evidence: --json carries each record as a portable attestation, --evidence-dir writes them");
        }
    }
    if report.ok {
        if !a.json {
            println!("settled: OK");
        }
        Ok(ExitCode::SUCCESS)
    } else {
        let why = match (report.agent_log.verified, report.gate_log.verified) {
            (false, false) => "neither log verifies".to_string(),
            (false, true) => format!("the agent's log ({}) does not verify", a.pair.agent_export.display()),
            (true, false) => format!("the gate's log ({}) does not verify", a.pair.gate_export.display()),
            (true, true) => "the two sides do not agree".to_string(),
        };
        eprintln!("sluice: settlement FAILED: {why}: see the lines above");
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::Pinned;

    #[test]
    fn an_export_that_changes_between_reads_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("export.json");
        std::fs::write(&path, b"{\"format\": \"a\"}").unwrap();
        let pinned = Pinned::new(&path).unwrap();
        assert!(pinned.open().is_ok());
        pinned.unchanged().unwrap();
        // Written to in place: the size and ctime change.
        std::fs::write(&path, b"{\"format\": \"b\", \"x\": 1}").unwrap();
        let e = pinned.open().unwrap_err().to_string();
        assert!(e.contains("export.json changed while it was being read"), "{e}");
        assert!(pinned.unchanged().is_err());
        // Replaced by another file of the same size: another inode.
        let pinned = Pinned::new(&path).unwrap();
        let other = dir.path().join("other.json");
        std::fs::write(&other, b"{\"format\": \"c\", \"x\": 1}").unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert!(pinned.open().is_err());
    }
}
