//! Offline verification of exports and portable attestations.
//!
//! The verifier trusts only the host public key it is given. It lists every problem it finds,
//! each naming the record (log index), chain and field at fault, rather than stopping at the
//! first: an auditor needs the whole extent of a tampering.
//!
//! Checks, for an export:
//! 1. the checkpoint's signature (`verify_strict`) and origin (derived from the host key);
//! 2. every record is canonical RFC 8785 JSON whose `log_index` matches its position;
//! 3. full export: indices are exactly `0 .. size-1` in order and the root rebuilt from the
//!    records equals the checkpoint's; filtered export: each record's inclusion proof;
//! 4. per chain: `seq` without gaps from 0 (or from the first exported record when a `since`
//!    filter cut the start) and `prev_hash` equal to the previous record's leaf hash;
//! 5. spend: `spend_after_millicents` = previous spend in that window +
//!    `spend_delta_millicents`, with `counter_reset` records zeroing the chain's spend. Records of
//!    format version 1 carry whole cents (`spend_after_cents`, `spend_delta_cents`); they are read
//!    × 1000, so a log written partly before and partly after the switch to millicents sums
//!    exactly across it. A record with both names for one amount, or (version 2 or later) a
//!    cents name at all, is refused;
//! 6. with an older checkpoint: it verifies, it is not larger than the export's (rollback), and
//!    the log at its size has its root (rebuilt from the records of a full export, or through the
//!    export's consistency proof).
//!
//! [`verify_reader`] reads a document as a stream in bounded memory (see its docs); the
//! in-memory entry points ([`verify_document`], [`verify_export`]) run the same checks.
//!
//! Known limit: a filtered export cannot show that records *after* the last exported one were
//! withheld; a full export (or the chain head in a later export) can.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{Read, Seek};
use std::sync::{mpsc, Arc, Mutex};

use chrono::{DateTime, Utc};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::canonical;
use super::checkpoint::{self, Checkpoint};
use super::docstream::{RecordSink, ScanError, Scanner};
use super::export::{
    ConsistencyEvidence, ExportBundle, ExportFilter, ExportedRecord, PortableAttestation, ATTESTATION_FORMAT,
    EXPORT_FORMAT,
};
use super::hex;
use super::hostkey::origin_for;
use super::merkle::{self, Hash, RootBuilder};
use super::record::{
    self, v1, FIELD_CHAIN, FIELD_KIND, FIELD_LOG_INDEX, FIELD_PREV_HASH, FIELD_SEQ, FIELD_SPEND_AFTER,
    FIELD_SPEND_DELTA, FIELD_SPEND_WINDOW_START, FIELD_VERSION, FIELD_WINDOW, KIND_COUNTER_RESET,
};
use sluice_passport::money::signed_dollars;

/// Bound on a document given to [`verify_document`].
pub const MAX_DOCUMENT_BYTES: usize = 1 << 30;

/// One thing wrong with an export or attestation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Problem {
    /// The document is not a well-formed export/attestation.
    Malformed { reason: String },
    /// The checkpoint does not verify with the host key.
    CheckpointInvalid { reason: String },
    /// A record is not a JSON object in canonical form, or lacks a field the writer sets.
    RecordMalformed { position: usize, index: u64, reason: String },
    /// The record's `log_index` field differs from the index it is exported under.
    IndexMismatch { position: usize, index: u64, field_value: Option<u64> },
    /// Records not in strictly increasing log order.
    OutOfOrder { position: usize, index: u64, previous: u64 },
    /// A full export skips log indices.
    MissingRecords { from: u64, to: u64 },
    /// A full export ends before the checkpoint's size.
    Truncated { last_present: Option<u64>, checkpoint_size: u64 },
    /// A record claims an index the checkpoint does not cover.
    BeyondCheckpoint { index: u64, checkpoint_size: u64 },
    /// The root rebuilt from the records differs from the checkpoint's.
    RootMismatch { size: u64, rebuilt: String, checkpoint: String },
    /// A record's inclusion proof does not lead to the checkpoint's root.
    InclusionProofInvalid { index: u64, reason: String },
    /// A record outside the export's filter.
    OutsideFilter { index: u64, chain: String },
    /// A chain's sequence numbers skip or repeat.
    SeqGap { chain: String, index: u64, expected: u64, found: u64 },
    /// A record's `prev_hash` is not the previous chain record's leaf hash.
    BrokenLink { chain: String, index: u64, expected: Option<String>, found: Option<String> },
    /// A spend field is missing, of the wrong type, or out of range.
    SpendFieldInvalid { chain: String, index: u64, field: String, reason: String },
    /// The spend after the record (`field`) is not the previous spend plus the delta. Amounts are
    /// millicents, whichever unit the field has.
    SpendMismatch { chain: String, index: u64, field: String, window_start: String, expected: i64, found: i64 },
    /// The older checkpoint does not verify.
    OlderCheckpointInvalid { reason: String },
    /// The older checkpoint covers more records than the export's: the log was rolled back.
    Rollback { older_size: u64, checkpoint_size: u64 },
    /// The log at the older checkpoint's size does not have the older root: history rewritten.
    Fork { older_size: u64, older_root: String, rebuilt: String },
    /// The consistency proof to the older checkpoint does not verify.
    ConsistencyProofInvalid { older_size: u64, reason: String },
    /// Consistency with the older checkpoint cannot be checked from this export.
    ConsistencyUnchecked { older_size: u64, reason: String },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Problem::*;
        match self {
            Malformed { reason } => write!(f, "document malformed: {reason}"),
            CheckpointInvalid { reason } => write!(f, "checkpoint: {reason}"),
            RecordMalformed { position, index, reason } => {
                write!(f, "record {index} (entry #{position}): {reason}")
            }
            IndexMismatch { position, index, field_value } => match field_value {
                Some(v) => write!(
                    f,
                    "record {index} (entry #{position}): field log_index is {v}, not {index} (record moved or edited)"
                ),
                None => write!(f, "record {index} (entry #{position}): field log_index is missing"),
            },
            OutOfOrder { position, index, previous } => write!(
                f,
                "record {index} (entry #{position}) comes after record {previous}: records reordered or duplicated"
            ),
            MissingRecords { from, to } if from == to => {
                write!(f, "record {from} is missing (deleted)")
            }
            MissingRecords { from, to } => write!(f, "records {from}..={to} are missing (deleted)"),
            Truncated { last_present, checkpoint_size } => match last_present {
                Some(l) => write!(
                    f,
                    "export truncated: the checkpoint covers {checkpoint_size} records but the last one present is {l}"
                ),
                None => write!(
                    f,
                    "export truncated: the checkpoint covers {checkpoint_size} records but none are present"
                ),
            },
            BeyondCheckpoint { index, checkpoint_size } => write!(
                f,
                "record {index} is beyond the checkpoint's {checkpoint_size} records"
            ),
            RootMismatch { size, rebuilt, checkpoint } => write!(
                f,
                "root rebuilt from the records ({rebuilt}) differs from the checkpoint's root at size {size} ({checkpoint}): records edited, deleted, added or reordered"
            ),
            InclusionProofInvalid { index, reason } => {
                write!(f, "record {index}: inclusion proof invalid: {reason}")
            }
            OutsideFilter { index, chain } => write!(
                f,
                "record {index} (chain {chain}) does not match the export's filter"
            ),
            SeqGap { chain, index, expected, found } => write!(
                f,
                "chain {chain}: record {index} has seq {found}, expected {expected} (records of this chain missing or duplicated)"
            ),
            BrokenLink { chain, index, expected, found } => write!(
                f,
                "chain {chain}: record {index} field prev_hash is {}, expected {}",
                found.as_deref().unwrap_or("null"),
                expected.as_deref().unwrap_or("null")
            ),
            SpendFieldInvalid { chain, index, field, reason } => {
                write!(f, "chain {chain}: record {index} field {field}: {reason}")
            }
            SpendMismatch { chain, index, field, window_start, expected, found } => write!(
                f,
                "chain {chain}: record {index} field {field} says {}, but the spend in window {window_start} adds up to {}",
                signed_dollars(i128::from(*found)),
                signed_dollars(i128::from(*expected))
            ),
            OlderCheckpointInvalid { reason } => write!(f, "older checkpoint: {reason}"),
            Rollback { older_size, checkpoint_size } => write!(
                f,
                "rollback: the older checkpoint covers {older_size} records but this log has only {checkpoint_size}"
            ),
            Fork { older_size, older_root, rebuilt } => write!(
                f,
                "history rewritten: the log's root at size {older_size} is {rebuilt}, the older checkpoint says {older_root} (store restored from an old copy or edited)"
            ),
            ConsistencyProofInvalid { older_size, reason } => write!(
                f,
                "consistency with the older checkpoint (size {older_size}) fails: {reason}: history rewritten or rolled back"
            ),
            ConsistencyUnchecked { older_size, reason } => write!(
                f,
                "consistency with the older checkpoint (size {older_size}) not checked: {reason}"
            ),
        }
    }
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// The verified checkpoint's size and root, when its signature checked out.
    pub checkpoint_size: Option<u64>,
    pub checkpoint_root: Option<String>,
    pub records_checked: usize,
    pub chains_checked: usize,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    fn new() -> Self {
        VerifyReport {
            checkpoint_size: None,
            checkpoint_root: None,
            records_checked: 0,
            chains_checked: 0,
            problems: Vec::new(),
        }
    }
}

/// Verifies a document of either format held in memory (see [`verify_reader`]).
pub fn verify_document(text: &str, host: &VerifyingKey, older_checkpoint: Option<&str>) -> VerifyReport {
    if text.len() > MAX_DOCUMENT_BYTES {
        let mut report = VerifyReport::new();
        report.problems.push(Problem::Malformed { reason: format!("larger than {MAX_DOCUMENT_BYTES} bytes") });
        return report;
    }
    verify_reader(std::io::Cursor::new(text.as_bytes()), host, older_checkpoint)
}

/// Verifies a document of either format (dispatching on its `format` member), read as a stream.
///
/// Memory is bounded whatever the document's length: one record at a time, plus per chain its
/// head and its spend per window, plus the O(log n) frontier of the Merkle tree (see
/// [`crate::docstream`] for the bounds on each member). One pass when the members the records
/// need come before them, as the daemon writes them; otherwise the records are skipped, the
/// rest read, and the reader sought back to the records for a second pass.
///
/// What each record allows alone (its envelope, canonical form, leaf hash) is checked on worker
/// threads when the machine has several cores, in batches of [`BATCH`] records with at most
/// two batches per worker in flight; the rest, in document order on the calling thread. The
/// report is the same either way.
pub fn verify_reader<R: Read + Seek>(r: R, host: &VerifyingKey, older_checkpoint: Option<&str>) -> VerifyReport {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_WORKERS);
    if workers < 2 {
        return verify_with(r, host, older_checkpoint, None);
    }
    std::thread::scope(|scope| {
        let (work_tx, work_rx) = mpsc::sync_channel::<Batch>(workers);
        let (done_tx, done_rx) = mpsc::channel::<(u64, Vec<Element>)>();
        let work_rx = Arc::new(Mutex::new(work_rx));
        for _ in 0..workers {
            let (work_rx, done_tx) = (work_rx.clone(), done_tx.clone());
            scope.spawn(move || loop {
                let job = match work_rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                let Ok((seq, batch)) = job else { return };
                let prepared = batch.elements().map(|(position, bytes)| prepare_element(position, bytes)).collect();
                if done_tx.send((seq, prepared)).is_err() {
                    return;
                }
            });
        }
        drop(done_tx);
        let pool = Pool { work: work_tx, done: done_rx, in_flight: 2 * workers };
        verify_with(r, host, older_checkpoint, Some(pool))
        // Dropping the pool closes the work channel: the workers end and the scope joins them.
    })
}

/// A batch of records, numbered in document order.
type Batch = (u64, Elements);

/// Elements of the records array, their bytes one after the other in one buffer (two
/// allocations per batch, whichever thread frees them).
#[derive(Default)]
struct Elements {
    bytes: Vec<u8>,
    /// Each element's position in the array and where its bytes end in `bytes`.
    ends: Vec<(usize, usize)>,
}

impl Elements {
    fn push(&mut self, position: usize, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
        self.ends.push((position, self.bytes.len()));
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn elements(&self) -> impl Iterator<Item = (usize, &[u8])> {
        let starts = std::iter::once(0).chain(self.ends.iter().map(|&(_, end)| end));
        self.ends
            .iter()
            .zip(starts)
            .map(|(&(position, end), start)| (position, self.bytes.get(start..end).unwrap_or_default()))
    }
}

/// Records per batch handed to a worker.
const BATCH: usize = 256;
/// Most worker threads used by [`verify_reader`].
const MAX_WORKERS: usize = 4;

/// Worker threads that prepare batches of records.
pub(crate) struct Pool {
    work: mpsc::SyncSender<Batch>,
    done: mpsc::Receiver<(u64, Vec<Element>)>,
    in_flight: usize,
}

pub(crate) fn verify_with<R: Read + Seek>(
    r: R,
    host: &VerifyingKey,
    older_checkpoint: Option<&str>,
    pool: Option<Pool>,
) -> VerifyReport {
    let mut scanner = Scanner::new(r);
    let mut sink = Sink {
        host,
        older: older_checkpoint,
        verifier: None,
        pool,
        batch: Elements::default(),
        sent: 0,
        applied: 0,
        ready: BTreeMap::new(),
    };
    let top = match scanner.top_level(&mut sink) {
        Ok(top) => top,
        Err(e) => return scan_failed(sink.finish_records(), &e),
    };
    let format = top.get("format").and_then(|v| serde_json::from_slice::<String>(v).ok());
    let malformed = |reason: String| {
        let mut report = VerifyReport::new();
        report.problems.push(Problem::Malformed { reason });
        report
    };
    match format.as_deref() {
        Some(EXPORT_FORMAT) => {
            let header = match members_as::<ExportHeader>(&top.members) {
                Ok(h) => h,
                Err(e) => return malformed(e),
            };
            let Some(records_at) = top.records_at else {
                return malformed("missing field `records`".into());
            };
            if !top.records_streamed {
                sink.verifier = Some(ExportVerifier::new(&header, host, older_checkpoint));
                if let Err(e) = scanner.seek(records_at).and_then(|()| scanner.records(&mut sink, true)) {
                    return scan_failed(sink.finish_records(), &e);
                }
            }
            match sink.finish_records() {
                Some(v) => v.finish(header.consistency.as_ref()),
                None => malformed("the records could not be read".into()),
            }
        }
        Some(ATTESTATION_FORMAT) => {
            if top.records_at.is_some() {
                return malformed("unknown field `records` in an attestation".into());
            }
            let att = match members_as::<PortableAttestation>(&top.members) {
                Ok(a) => a,
                Err(e) => return malformed(e),
            };
            let mut r = verify_attestation(&att, host);
            if let Some(older) = older_checkpoint {
                if let Some(size) = r.checkpoint_size {
                    let root = r.checkpoint_root.clone();
                    check_older_without_records(&mut r, host, older, size, root, None);
                }
            }
            r
        }
        _ => malformed(format!("not JSON with \"format\": \"{EXPORT_FORMAT}\" or \"{ATTESTATION_FORMAT}\"")),
    }
}

/// The report of a document that could not be read to its end: the problems found in the
/// records read so far, and why it stopped.
fn scan_failed(verifier: Option<ExportVerifier<'_>>, e: &ScanError) -> VerifyReport {
    let (mut report, note) = match verifier {
        Some(v) => (
            v.report,
            "; the records before it were checked, the log as a whole (completeness, root, older checkpoint) was not",
        ),
        None => (VerifyReport::new(), ""),
    };
    report.problems.push(Problem::Malformed { reason: format!("{e}{note}") });
    report
}

/// The top-level members read by the scanner, as one serde value (unknown and missing members
/// are refused as serde refuses them in a whole document).
fn members_as<T: serde::de::DeserializeOwned>(members: &[(String, Vec<u8>)]) -> Result<T, String> {
    let mut map = Map::new();
    for (name, raw) in members {
        let value: Value = serde_json::from_slice(raw).map_err(|e| format!("member {name:?}: {e}"))?;
        map.insert(name.clone(), value);
    }
    serde_json::from_value(Value::Object(map)).map_err(|e| e.to_string())
}

/// An export's members other than `records`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportHeader {
    format: String,
    origin: String,
    #[allow(dead_code)] // informational: the verifier trusts only the key it is given
    host_vkey: String,
    checkpoint: String,
    full: bool,
    filter: ExportFilter,
    #[serde(default)]
    consistency: Option<ConsistencyEvidence>,
}

/// Takes the records as the scanner reaches them, once the members they need were read:
/// prepares them (on the pool's workers, if any) and applies them in document order.
struct Sink<'a> {
    host: &'a VerifyingKey,
    older: Option<&'a str>,
    verifier: Option<ExportVerifier<'a>>,
    pool: Option<Pool>,
    /// Elements not yet handed to a worker.
    batch: Elements,
    /// Batches handed out, and applied, so far.
    sent: u64,
    applied: u64,
    /// Batches prepared but waiting for an earlier one.
    ready: BTreeMap<u64, Vec<Element>>,
}

impl Sink<'_> {
    /// Hands the current batch to the workers, then applies finished batches in order until
    /// fewer than `keep` are in flight.
    fn flush(&mut self, keep: usize) {
        let Some(pool) = &self.pool else { return };
        if !self.batch.is_empty() {
            // The next batch is about as large: sized once, not grown record by record.
            let next = Elements {
                bytes: Vec::with_capacity(self.batch.bytes.len()),
                ends: Vec::with_capacity(self.batch.len()),
            };
            let batch = std::mem::replace(&mut self.batch, next);
            if let Err(mpsc::SendError((_, batch))) = pool.work.send((self.sent, batch)) {
                // The workers are gone: prepare the rest here, after what is in flight.
                self.batch = batch;
                self.drain_inline();
                return;
            }
            self.sent += 1;
        }
        while self.sent - self.applied > keep as u64 {
            if let Some(elements) = self.ready.remove(&self.applied) {
                if let Some(v) = &mut self.verifier {
                    for e in elements {
                        v.apply(e);
                    }
                }
                self.applied += 1;
                continue;
            }
            match pool.done.recv() {
                Ok((seq, elements)) => {
                    self.ready.insert(seq, elements);
                }
                Err(_) => {
                    // Every worker ended early; what they held is lost, so say so.
                    if let Some(v) = &mut self.verifier {
                        v.report.problems.push(Problem::Malformed {
                            reason: "internal: the verifier's worker threads stopped; verify again".into(),
                        });
                    }
                    self.pool = None;
                    return;
                }
            }
        }
    }

    /// Without workers: applies the batches already prepared, then prepares and applies the
    /// current one here.
    fn drain_inline(&mut self) {
        if let Some(pool) = self.pool.take() {
            while let Ok((seq, elements)) = pool.done.try_recv() {
                self.ready.insert(seq, elements);
            }
        }
        let complete = self.ready.keys().copied().eq(self.applied..self.sent);
        if let (false, Some(v)) = (complete, &mut self.verifier) {
            v.report.problems.push(Problem::Malformed {
                reason: "internal: the verifier's worker threads stopped; verify again".into(),
            });
        }
        let ready = std::mem::take(&mut self.ready);
        let batch = std::mem::take(&mut self.batch);
        if let Some(v) = &mut self.verifier {
            for e in ready.into_values().flatten() {
                v.apply(e);
            }
            for (position, bytes) in batch.elements() {
                v.apply(prepare_element(position, bytes));
            }
        }
    }

    /// Applies everything still in flight and returns the verifier.
    fn finish_records(&mut self) -> Option<ExportVerifier<'_>> {
        self.flush(0);
        self.pool = None;
        self.verifier.take()
    }
}

impl<'a> RecordSink for Sink<'a> {
    fn start(&mut self, members: &[(String, Vec<u8>)]) -> bool {
        const NEEDED: [&str; 6] = ["format", "origin", "host_vkey", "checkpoint", "full", "filter"];
        if self.verifier.is_some() {
            return true;
        }
        if !NEEDED.iter().all(|n| members.iter().any(|(m, _)| m == n)) {
            return false;
        }
        let is_export = members
            .iter()
            .find(|(m, _)| m == "format")
            .is_some_and(|(_, v)| serde_json::from_slice::<String>(v).ok().as_deref() == Some(EXPORT_FORMAT));
        match members_as::<ExportHeader>(members) {
            Ok(header) if is_export => {
                self.verifier = Some(ExportVerifier::new(&header, self.host, self.older));
                true
            }
            // Judged again, with every member, once the document is read.
            _ => false,
        }
    }

    fn element(&mut self, position: usize, bytes: &[u8]) {
        match &self.pool {
            None => {
                if let Some(v) = &mut self.verifier {
                    v.apply(prepare_element(position, bytes));
                }
            }
            Some(pool) => {
                self.batch.push(position, bytes);
                if self.batch.len() >= BATCH {
                    let keep = pool.in_flight;
                    self.flush(keep);
                }
            }
        }
    }
}

/// A record parsed for checking.
struct Parsed {
    position: usize,
    index: u64,
    leaf: Hash,
    body: Fields,
}

/// The slot of member `name` in [`Fields`] if the checks read it; the other members only count
/// for the record's canonical form and leaf hash.
fn checked_slot(name: &str) -> Option<usize> {
    Some(match name {
        FIELD_LOG_INDEX => 0,
        FIELD_CHAIN => 1,
        record::FIELD_TIME => 2,
        FIELD_SEQ => 3,
        FIELD_PREV_HASH => 4,
        FIELD_VERSION => 5,
        FIELD_KIND => 6,
        FIELD_WINDOW => 7,
        FIELD_SPEND_WINDOW_START => 8,
        FIELD_SPEND_DELTA => 9,
        FIELD_SPEND_AFTER => 10,
        v1::FIELD_SPEND_DELTA => 11,
        v1::FIELD_SPEND_AFTER => 12,
        _ => return None,
    })
}

/// The members of a record the checks read (see [`checked_slot`]), without their names: a
/// record crosses from a worker thread to the checking thread with few allocations.
#[derive(Default)]
struct Fields([Option<Value>; 13]);

impl Fields {
    fn get(&self, name: &str) -> Option<&Value> {
        let slot = checked_slot(name);
        debug_assert!(slot.is_some(), "{name} is read but has no slot in checked_slot");
        self.0.get(slot?)?.as_ref()
    }

    fn set(&mut self, name: &str, value: Value) {
        if let Some(place) = checked_slot(name).and_then(|slot| self.0.get_mut(slot)) {
            *place = Some(value);
        }
    }
}

fn open_checkpoint(report: &mut VerifyReport, note: &str, host: &VerifyingKey) -> Option<Checkpoint> {
    match checkpoint::open(note, host) {
        Ok(s) => {
            report.checkpoint_size = Some(s.checkpoint.size);
            report.checkpoint_root = Some(hex::encode(&s.checkpoint.root));
            Some(s.checkpoint)
        }
        Err(e) => {
            report.problems.push(Problem::CheckpointInvalid { reason: e.to_string() });
            None
        }
    }
}

/// Parses one exported record whose leaf hash is `leaf`; `None` (with problems noted) if it
/// cannot be used at all.
fn parse_record(problems: &mut Vec<Problem>, position: usize, index: u64, text: &str, leaf: Hash) -> Option<Parsed> {
    let malformed = |reason: String| Problem::RecordMalformed { position, index, reason };
    // The common case, in one pass: a canonical record, of which only the checked members are
    // parsed. Anything else takes the generic path below, which names what is wrong.
    let mut body = Fields::default();
    let mut parsed_all = true;
    let canonical = canonical::scan_canonical_object(text, |name, value| {
        if checked_slot(name).is_some() {
            match serde_json::from_str(value) {
                Ok(v) => body.set(name, v),
                Err(_) => parsed_all = false,
            }
        }
    });
    if canonical && parsed_all {
        let field_value = body.get(FIELD_LOG_INDEX).and_then(Value::as_u64);
        if field_value != Some(index) {
            problems.push(Problem::IndexMismatch { position, index, field_value });
        }
        return Some(Parsed { position, index, leaf, body });
    }
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            problems.push(malformed(format!("not JSON: {e}")));
            return None;
        }
    };
    let Value::Object(body) = value else {
        problems.push(malformed("not a JSON object".into()));
        return None;
    };
    match canonical::canonicalize_object(&body) {
        Ok(c) if c == text.as_bytes() => {}
        Ok(_) => problems.push(malformed("not in RFC 8785 canonical form (edited by hand?)".into())),
        Err(e) => problems.push(malformed(e.to_string())),
    }
    let mut fields = Fields::default();
    for (name, value) in body {
        fields.set(&name, value);
    }
    let body = fields;
    let field_value = body.get(FIELD_LOG_INDEX).and_then(Value::as_u64);
    if field_value != Some(index) {
        problems.push(Problem::IndexMismatch { position, index, field_value });
    }
    Some(Parsed { position, index, leaf, body })
}

fn decode_proof(hexes: &[String]) -> Result<Vec<Hash>, String> {
    if hexes.len() > merkle::MAX_PROOF_LEN {
        return Err(format!("{} hashes, more than any valid proof", hexes.len()));
    }
    hexes
        .iter()
        .enumerate()
        .map(|(i, h)| hex::decode_hash(h).ok_or_else(|| format!("node {i} is not 64 lowercase hex digits")))
        .collect()
}

/// Verifies an export bundle held in memory against the host key and, optionally, an older
/// checkpoint: the same checks, in the same order, as [`verify_reader`].
pub fn verify_export(bundle: &ExportBundle, host: &VerifyingKey, older_checkpoint: Option<&str>) -> VerifyReport {
    let header = ExportHeader {
        format: bundle.format.clone(),
        origin: bundle.origin.clone(),
        host_vkey: bundle.host_vkey.clone(),
        checkpoint: bundle.checkpoint.clone(),
        full: bundle.full,
        filter: bundle.filter.clone(),
        consistency: None,
    };
    let mut v = ExportVerifier::new(&header, host, older_checkpoint);
    for (position, r) in bundle.records.iter().enumerate() {
        v.record(position, r);
    }
    v.finish(bundle.consistency.as_ref())
}

/// What can be checked of one record alone, with no state: its envelope, canonical form,
/// `log_index` and leaf hash. The expensive part of verification, so it runs on worker threads
/// when there are cores for it ([`verify_reader`]).
struct Prepared {
    position: usize,
    index: u64,
    leaf: Hash,
    inclusion_proof: Vec<String>,
    parsed: Option<Parsed>,
    problems: Vec<Problem>,
}

/// One element of the records array, prepared.
// Records are the common case and travel in a batch's vector: boxing them would add an
// allocation per record freed on another thread, which is what the layout avoids.
#[allow(clippy::large_enum_variant)]
enum Element {
    Record(Prepared),
    /// Not an `{index, record, inclusion_proof}` object.
    Malformed(Problem),
}

fn prepare(position: usize, r: &ExportedRecord) -> Prepared {
    let leaf = merkle::leaf_hash(r.record.as_bytes());
    let mut problems = Vec::new();
    let parsed = parse_record(&mut problems, position, r.index, &r.record, leaf);
    Prepared { position, index: r.index, leaf, inclusion_proof: r.inclusion_proof.clone(), parsed, problems }
}

fn prepare_element(position: usize, bytes: &[u8]) -> Element {
    match serde_json::from_slice::<ExportedRecord>(bytes) {
        Ok(r) => Element::Record(prepare(position, &r)),
        Err(e) => Element::Malformed(Problem::Malformed { reason: format!("records entry #{position}: {e}") }),
    }
}

/// A chain's state as the verifier walks it: its head and its spend.
struct ChainState {
    last_seq: u64,
    last_hash: Hash,
    spend: Spend,
}

/// An export being verified one record at a time. What it keeps is bounded by the number of
/// chains (and their spend windows), the depth of the tree, and the problems found; never by
/// the number of records.
struct ExportVerifier<'a> {
    report: VerifyReport,
    host: &'a VerifyingKey,
    cp: Option<Checkpoint>,
    older: Option<Checkpoint>,
    full: bool,
    passport: Option<String>,
    since: Option<DateTime<Utc>>,
    /// The highest index seen so far.
    previous: Option<u64>,
    /// Full export: the root over the records in document order.
    builder: RootBuilder,
    rebuilt_at_older: Option<(u64, Hash)>,
    /// Full export: one past the highest index present below the checkpoint's size.
    next_present: u64,
    /// Full export: runs of indices skipped so far (start → end, inclusive), closed again by a
    /// record that comes late, so a reordering is not also called a deletion.
    gaps: BTreeMap<u64, u64>,
    chains: HashMap<String, ChainState>,
}

impl<'a> ExportVerifier<'a> {
    fn new(header: &ExportHeader, host: &'a VerifyingKey, older_checkpoint: Option<&str>) -> Self {
        let mut report = VerifyReport::new();
        if header.format != EXPORT_FORMAT {
            report.problems.push(Problem::Malformed {
                reason: format!("format is {:?}, expected {EXPORT_FORMAT:?}", header.format),
            });
        }
        let full = header.filter.passport.is_none() && header.filter.since.is_none();
        if header.full != full {
            report.problems.push(Problem::Malformed { reason: "field full contradicts the filter".into() });
        }
        let cp = open_checkpoint(&mut report, &header.checkpoint, host);
        if header.origin != origin_for(host) {
            report.problems.push(Problem::Malformed {
                reason: format!("origin {:?} is not the host key's origin {:?}", header.origin, origin_for(host)),
            });
        }
        let since = match &header.filter.since {
            None => None,
            Some(s) => {
                let t = record::parse_time(s);
                if t.is_none() {
                    report
                        .problems
                        .push(Problem::Malformed { reason: format!("filter.since {s:?} is not an RFC 3339 time") });
                }
                t
            }
        };
        let older = older_checkpoint.and_then(|note| match checkpoint::open(note, host) {
            Ok(s) => Some(s.checkpoint),
            Err(e) => {
                report.problems.push(Problem::OlderCheckpointInvalid { reason: e.to_string() });
                None
            }
        });
        let rebuilt_at_older = match (&cp, &older) {
            (Some(_), Some(o)) if full && o.size == 0 => Some((0, merkle::empty_root())),
            _ => None,
        };
        ExportVerifier {
            report,
            host,
            cp,
            older,
            full,
            passport: header.filter.passport.clone(),
            since,
            previous: None,
            builder: RootBuilder::new(),
            rebuilt_at_older,
            next_present: 0,
            gaps: BTreeMap::new(),
            chains: HashMap::new(),
        }
    }

    fn record(&mut self, position: usize, r: &ExportedRecord) {
        self.apply(Element::Record(prepare(position, r)));
    }

    /// Applies what was found of one record alone to the state of the whole export: order,
    /// completeness and root (or inclusion), filter, chains and spend.
    fn apply(&mut self, element: Element) {
        let p = match element {
            Element::Record(p) => p,
            Element::Malformed(problem) => {
                self.report.problems.push(problem);
                return;
            }
        };
        let (position, index, leaf) = (p.position, p.index, p.leaf);
        if let Some(prev) = self.previous {
            if index <= prev {
                self.report.problems.push(Problem::OutOfOrder { position, index, previous: prev });
            }
        }
        self.previous = Some(self.previous.map_or(index, |prev| prev.max(index)));
        if let Some(cp) = &self.cp {
            if index >= cp.size {
                self.report.problems.push(Problem::BeyondCheckpoint { index, checkpoint_size: cp.size });
            } else if self.full {
                self.present(index);
            } else {
                let result = decode_proof(&p.inclusion_proof).and_then(|proof| {
                    merkle::verify_inclusion(index, cp.size, &leaf, &proof, &cp.root).map_err(|e| e.to_string())
                });
                if let Err(reason) = result {
                    self.report.problems.push(Problem::InclusionProofInvalid { index, reason });
                }
            }
            if self.full {
                self.builder.push(leaf);
                if let Some(o) = &self.older {
                    if self.builder.size() == o.size {
                        self.rebuilt_at_older = Some((o.size, self.builder.root()));
                    }
                }
            }
        }
        self.report.problems.extend(p.problems);
        let Some(parsed) = p.parsed else {
            return;
        };
        self.report.records_checked += 1;
        self.check_filter(&parsed);
        self.check_chain(&parsed);
    }

    /// Full export: notes that `index` (below the checkpoint's size) is present.
    fn present(&mut self, index: u64) {
        if index >= self.next_present {
            if index > self.next_present {
                self.gaps.insert(self.next_present, index - 1);
            }
            self.next_present = index + 1;
            return;
        }
        // A late record: it may close (part of) a gap.
        let Some((&start, &end)) = self.gaps.range(..=index).next_back() else { return };
        if index > end {
            return;
        }
        self.gaps.remove(&start);
        if start < index {
            self.gaps.insert(start, index - 1);
        }
        if index < end {
            self.gaps.insert(index + 1, end);
        }
    }

    fn check_filter(&mut self, p: &Parsed) {
        let chain = p.body.get(FIELD_CHAIN).and_then(Value::as_str).unwrap_or("");
        let chain_ok = self.passport.as_deref().is_none_or(|want| chain == want);
        let time_ok = self.since.is_none_or(|s| {
            p.body.get(record::FIELD_TIME).and_then(Value::as_str).and_then(record::parse_time).is_some_and(|t| t >= s)
        });
        if !chain_ok || !time_ok {
            self.report.problems.push(Problem::OutsideFilter { index: p.index, chain: chain.to_string() });
        }
    }

    /// Per-chain `seq`/`prev_hash` links and spend.
    fn check_chain(&mut self, p: &Parsed) {
        let report = &mut self.report;
        let index = p.index;
        let malformed =
            |reason: &str| Problem::RecordMalformed { position: p.position, index, reason: reason.to_string() };
        let Some(chain) = p.body.get(FIELD_CHAIN).and_then(Value::as_str) else {
            report.problems.push(malformed("field chain is missing or not a string"));
            return;
        };
        let Some(seq) = p.body.get(FIELD_SEQ).and_then(Value::as_u64) else {
            report.problems.push(malformed("field seq is missing or not an integer"));
            return;
        };
        let prev = match p.body.get(FIELD_PREV_HASH) {
            Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.as_str()),
            _ => {
                report.problems.push(malformed("field prev_hash is missing or not a string/null"));
                return;
            }
        };
        let Some(state) = self.chains.get_mut(chain) else {
            let known_from_start = seq == 0;
            if seq == 0 {
                if let Some(found) = prev {
                    report.problems.push(Problem::BrokenLink {
                        chain: chain.to_string(),
                        index,
                        expected: None,
                        found: Some(found.to_string()),
                    });
                }
            } else if self.since.is_none() {
                report.problems.push(Problem::SeqGap { chain: chain.to_string(), index, expected: 0, found: seq });
            }
            let mut spend = Spend { windows: HashMap::new(), known_from_start, reset_seen: false };
            check_spend(report, chain, p, &mut spend);
            self.chains.insert(chain.to_string(), ChainState { last_seq: seq, last_hash: p.leaf, spend });
            return;
        };
        let expected_seq = state.last_seq.saturating_add(1);
        if seq != expected_seq {
            report.problems.push(Problem::SeqGap {
                chain: chain.to_string(),
                index,
                expected: expected_seq,
                found: seq,
            });
        }
        if prev.and_then(hex::decode_hash) != Some(state.last_hash) {
            report.problems.push(Problem::BrokenLink {
                chain: chain.to_string(),
                index,
                expected: Some(hex::encode(&state.last_hash)),
                found: prev.map(str::to_string),
            });
        }
        state.last_seq = seq;
        state.last_hash = p.leaf;
        check_spend(report, chain, p, &mut state.spend);
    }

    /// The checks that need every record: completeness and root (full export), the older
    /// checkpoint.
    fn finish(mut self, consistency: Option<&ConsistencyEvidence>) -> VerifyReport {
        let report = &mut self.report;
        if let (Some(cp), true) = (&self.cp, self.full) {
            for (&from, &to) in &self.gaps {
                report.problems.push(Problem::MissingRecords { from, to });
            }
            if self.next_present < cp.size {
                report.problems.push(Problem::Truncated {
                    last_present: self.next_present.checked_sub(1),
                    checkpoint_size: cp.size,
                });
            }
            let rebuilt = self.builder.root();
            if rebuilt != cp.root {
                report.problems.push(Problem::RootMismatch {
                    size: cp.size,
                    rebuilt: hex::encode(&rebuilt),
                    checkpoint: hex::encode(&cp.root),
                });
            }
        }
        report.chains_checked = self.chains.len();
        if let (Some(cp), Some(older)) = (&self.cp, &self.older) {
            if older.size > cp.size {
                report.problems.push(Problem::Rollback { older_size: older.size, checkpoint_size: cp.size });
            } else if let Some((size, rebuilt)) = self.rebuilt_at_older {
                if size == older.size && rebuilt != older.root {
                    report.problems.push(Problem::Fork {
                        older_size: older.size,
                        older_root: hex::encode(&older.root),
                        rebuilt: hex::encode(&rebuilt),
                    });
                }
            } else {
                check_consistency(report, cp, older, consistency);
            }
        }
        let _ = self.host;
        self.report
    }
}

fn check_consistency(
    report: &mut VerifyReport,
    cp: &Checkpoint,
    older: &Checkpoint,
    evidence: Option<&ConsistencyEvidence>,
) {
    if older.size == cp.size {
        if older.root != cp.root {
            report.problems.push(Problem::Fork {
                older_size: older.size,
                older_root: hex::encode(&older.root),
                rebuilt: hex::encode(&cp.root),
            });
        }
        return;
    }
    let Some(ev) = evidence.filter(|e| e.old_size == older.size) else {
        report.problems.push(Problem::ConsistencyUnchecked {
            older_size: older.size,
            reason: format!(
                "the export carries no consistency proof from size {}; export again with the older checkpoint (consistency from size {})",
                older.size, older.size
            ),
        });
        return;
    };
    let result = decode_proof(&ev.proof).and_then(|proof| {
        merkle::verify_consistency(older.size, cp.size, &older.root, &cp.root, &proof).map_err(|e| e.to_string())
    });
    if let Err(reason) = result {
        report.problems.push(Problem::ConsistencyProofInvalid { older_size: older.size, reason });
    }
}

/// For an attestation: the older checkpoint must not be larger, and at equal size equal.
fn check_older_without_records(
    report: &mut VerifyReport,
    host: &VerifyingKey,
    older_note: &str,
    size: u64,
    root_hex: Option<String>,
    evidence: Option<&ConsistencyEvidence>,
) {
    let older = match checkpoint::open(older_note, host) {
        Ok(s) => s.checkpoint,
        Err(e) => {
            report.problems.push(Problem::OlderCheckpointInvalid { reason: e.to_string() });
            return;
        }
    };
    let Some(root) = root_hex.as_deref().and_then(hex::decode_hash) else {
        return;
    };
    if older.size > size {
        report.problems.push(Problem::Rollback { older_size: older.size, checkpoint_size: size });
        return;
    }
    let cp = Checkpoint { origin: older.origin.clone(), size, root };
    check_consistency(report, &cp, &older, evidence);
}

/// Recomputes spend for one record (see the crate docs and docs/records.md, "What `sluice audit verify` checks").
///
/// When the export does not start at the chain's first record (a `since` filter), the first
/// record seen in each window sets the baseline instead of being checked.
fn check_spend(report: &mut VerifyReport, chain: &str, p: &Parsed, spend: &mut Spend) {
    let index = p.index;
    let invalid = |field: &str, reason: String| Problem::SpendFieldInvalid {
        chain: chain.to_string(),
        index,
        field: field.to_string(),
        reason,
    };
    // Records of version 2 and later name money in millicents only.
    let version = p.body.get(FIELD_VERSION).and_then(Value::as_u64).unwrap_or(1);
    let amount = |which: Amount| read_amount(&p.body, which, version).map_err(|(field, reason)| invalid(field, reason));
    if p.body.get(FIELD_KIND).and_then(Value::as_str) == Some(KIND_COUNTER_RESET) {
        match p.body.get(FIELD_WINDOW).and_then(Value::as_str) {
            Some("daily" | "weekly" | "monthly" | "all") => {}
            _ => report
                .problems
                .push(invalid(FIELD_WINDOW, "counter_reset must name window daily|weekly|monthly|all".into())),
        }
        match amount(AFTER) {
            Ok(Some((0, _))) => {}
            Ok(Some((v, field))) => {
                report.problems.push(invalid(field, format!("counter_reset must carry 0, found {} millicents", v)))
            }
            Ok(None) => {
                report.problems.push(invalid(FIELD_SPEND_AFTER, "counter_reset must carry 0, field missing".into()))
            }
            Err(e) => report.problems.push(e),
        }
        for v in spend.windows.values_mut() {
            *v = 0;
        }
        // Windows first seen after the reset start from 0 too.
        spend.reset_seen = true;
        return;
    }
    let delta = amount(DELTA);
    let after = amount(AFTER);
    let window = p.body.get(FIELD_SPEND_WINDOW_START);
    let present = [
        delta.as_ref().is_ok_and(Option::is_some) || delta.is_err(),
        after.as_ref().is_ok_and(Option::is_some) || after.is_err(),
        window.is_some(),
    ];
    if present.iter().all(|x| !x) {
        return;
    }
    let mut ok = true;
    let mut take = |r: Result<Option<(i64, &'static str)>, Problem>, field: &str| -> Option<(i64, &'static str)> {
        match r {
            Ok(Some(v)) => Some(v),
            Ok(None) => {
                report.problems.push(invalid(field, "missing while other spend fields are present".into()));
                ok = false;
                None
            }
            Err(e) => {
                report.problems.push(e);
                ok = false;
                None
            }
        }
    };
    let delta = take(delta, FIELD_SPEND_DELTA);
    let after = take(after, FIELD_SPEND_AFTER);
    let window = match window {
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            report.problems.push(invalid(FIELD_SPEND_WINDOW_START, "not a string".into()));
            None
        }
        None => {
            report
                .problems
                .push(invalid(FIELD_SPEND_WINDOW_START, "missing while other spend fields are present".into()));
            None
        }
    };
    let (Some((delta, delta_field)), Some((after, after_field)), Some(window), true) = (delta, after, window, ok)
    else {
        return;
    };
    let baseline = match spend.windows.get(&window) {
        Some(v) => Some(*v),
        None if spend.known_from_start || spend.reset_seen => Some(0),
        None => None,
    };
    if let Some(prev) = baseline {
        match prev.checked_add(delta) {
            Some(expected) if expected == after => {}
            Some(expected) => report.problems.push(Problem::SpendMismatch {
                chain: chain.to_string(),
                index,
                field: after_field.to_string(),
                window_start: window.clone(),
                expected,
                found: after,
            }),
            None => report.problems.push(invalid(delta_field, format!("{prev} + {delta} millicents overflows"))),
        }
    }
    // Continue from the recorded value so each broken step is named once.
    spend.windows.insert(window, after);
}

/// One money amount a record may carry, under its version 2 name (millicents) or its version 1
/// name (whole cents).
#[derive(Clone, Copy)]
struct Amount {
    millicents: &'static str,
    cents: &'static str,
}

const DELTA: Amount = Amount { millicents: FIELD_SPEND_DELTA, cents: v1::FIELD_SPEND_DELTA };
const AFTER: Amount = Amount { millicents: FIELD_SPEND_AFTER, cents: v1::FIELD_SPEND_AFTER };

/// The amount in millicents and the field it came from; `Ok(None)` when the record has neither
/// name. A cents value is × 1000, checked. Both names at once, a cents name in a record of version
/// 2 or later, a value that is not a 64-bit integer, or cents whose millicents are not, is an
/// error naming the field. (Sums are then checked `i64` too, so every figure a report carries is
/// a 64-bit integer.)
fn read_amount(
    body: &Fields,
    which: Amount,
    version: u64,
) -> Result<Option<(i64, &'static str)>, (&'static str, String)> {
    let int = |field: &'static str, v: &Value| v.as_i64().ok_or_else(|| (field, "not a 64-bit integer".to_string()));
    match (body.get(which.millicents), body.get(which.cents)) {
        (None, None) => Ok(None),
        (Some(m), None) => Ok(Some((int(which.millicents, m)?, which.millicents))),
        (None, Some(_)) if version >= record::RECORD_VERSION => Err((
            which.cents,
            format!("a version {version} record names money in millicents ({}), not cents", which.millicents),
        )),
        (None, Some(c)) => {
            let cents = int(which.cents, c)?;
            let millicents = cents
                .checked_mul(1000)
                .ok_or_else(|| (which.cents, format!("{cents} cents is more than 64 bits of millicents")))?;
            Ok(Some((millicents, which.cents)))
        }
        (Some(_), Some(_)) => {
            Err((which.millicents, format!("the record also has {}; an amount has one field", which.cents)))
        }
    }
}

/// A chain's running spend as the verifier recomputes it.
struct Spend {
    /// Cumulative spend in millicents per window start, as of the last record seen.
    windows: HashMap<String, i64>,
    /// The export holds the chain from seq 0, so an unseen window starts at 0.
    known_from_start: bool,
    /// A counter_reset was seen, so windows first seen after it start at 0.
    reset_seen: bool,
}

/// Verifies a portable attestation against the host key.
pub fn verify_attestation(att: &PortableAttestation, host: &VerifyingKey) -> VerifyReport {
    let mut report = VerifyReport::new();
    if att.format != ATTESTATION_FORMAT {
        report.problems.push(Problem::Malformed {
            reason: format!("format is {:?}, expected {ATTESTATION_FORMAT:?}", att.format),
        });
    }
    let cp = open_checkpoint(&mut report, &att.checkpoint, host);
    let leaf = merkle::leaf_hash(att.record.as_bytes());
    if parse_record(&mut report.problems, 0, att.index, &att.record, leaf).is_some() {
        report.records_checked = 1;
    }
    if let Some(cp) = cp {
        let result = decode_proof(&att.inclusion_proof).and_then(|proof| {
            merkle::verify_inclusion(att.index, cp.size, &leaf, &proof, &cp.root).map_err(|e| e.to_string())
        });
        if let Err(reason) = result {
            report.problems.push(Problem::InclusionProofInvalid { index: att.index, reason });
        }
    }
    report
}
