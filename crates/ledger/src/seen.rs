//! Checking an export against checkpoints of the same log that others saw (a fleet's copies of
//! what the host published, an auditor's earlier notes).
//!
//! A signed checkpoint commits the host to the whole log up to its size. A host that later
//! shows an auditor a different history (a store restored from an old copy and written again, or
//! records edited and re-signed with the same key) can make that history verify on its own, but
//! not agree with checkpoints it published before. For each checkpoint seen:
//! - its signature must verify under the host key, else it is [`Outcome::Untrusted`] (reported,
//!   never compared: anyone who can write where checkpoints are kept could have put it there);
//! - of size ≤ the export's: the export's log at that size must have its root
//!   ([`Outcome::Consistent`] or [`Outcome::Fork`]). A full export rebuilds the root at every seen
//!   size from its records in one streaming pass; a filtered export can only show it for the
//!   export's own size, or through its consistency proof from that size; otherwise
//!   [`Outcome::Unchecked`];
//! - of size > the export's: the host signed more than the export holds: the export is truncated
//!   or the log was rolled back ([`Outcome::Beyond`]).
//!
//! Memory: the seen checkpoints, plus the O(log n) Merkle frontier; records are read one at a
//! time (see [`crate::docstream`]). The export's own integrity (its records against its
//! checkpoint) is [`crate::verify`]'s job: run both.

use std::collections::BTreeMap;
use std::io::{Read, Seek};

use ed25519_dalek::VerifyingKey;
use serde::Serialize;

use super::checkpoint::{self, Checkpoint};
use super::docstream::{RecordSink, Scanner};
use super::export::{ConsistencyEvidence, ExportedRecord, EXPORT_FORMAT};
use super::hex;
use super::merkle::{self, Hash, RootBuilder};

/// Bound on the checkpoints one check takes (a fleet keeps far fewer per host).
pub const MAX_SEEN: usize = 100_000;

/// One checkpoint someone saw, with where it came from (shown in reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenNote {
    /// Where the note was seen, e.g. `redis sluice:fleet:checkpoints:web-1`.
    pub source: String,
    /// The signed note, as published.
    pub note: String,
}

/// What one seen checkpoint says about the export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The export's log at this size has this root.
    Consistent,
    /// The export's log at this size has another root (`export_root`; `None` when a filtered
    /// export's consistency proof from this size fails): the history was rewritten.
    Fork { export_root: Option<String> },
    /// The host signed a larger log than the export holds: the export is truncated, or the log
    /// was rolled back.
    Beyond { export_size: u64 },
    /// The note does not verify under the host key; nothing in it is believed.
    Untrusted { reason: String },
    /// The export cannot show its root at this size (a filtered export without a consistency
    /// proof from it).
    Unchecked { reason: String },
}

/// One seen checkpoint and its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeenResult {
    pub source: String,
    /// Size and root as the note claims them (read before any check when untrusted).
    pub size: Option<u64>,
    pub root: Option<String>,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl SeenResult {
    /// Whether this outcome means the export's history disagrees with what the host signed.
    pub fn is_conflict(&self) -> bool {
        matches!(self.outcome, Outcome::Fork { .. } | Outcome::Beyond { .. })
    }
}

impl std::fmt::Display for SeenResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let size = self.size.map_or_else(|| "?".to_string(), |s| s.to_string());
        let root = self.root.as_deref().unwrap_or("?");
        match &self.outcome {
            Outcome::Consistent => write!(f, "checkpoint of size {size} ({}): consistent with the export", self.source),
            Outcome::Fork { export_root: Some(export_root) } => write!(
                f,
                "history rewritten: the host signed root {root} at size {size} ({}), the export's log has {export_root} there",
                self.source
            ),
            Outcome::Fork { export_root: None } => write!(
                f,
                "history rewritten: the host signed root {root} at size {size} ({}), the export's consistency proof from that size fails",
                self.source
            ),
            Outcome::Beyond { export_size } => write!(
                f,
                "export truncated or log rolled back: the host signed {size} records ({}), the export holds {export_size}",
                self.source
            ),
            Outcome::Untrusted { reason } => {
                write!(f, "checkpoint claiming size {size} ({}) is not trusted: {reason}", self.source)
            }
            Outcome::Unchecked { reason } => write!(f, "checkpoint of size {size} ({}) not checked: {reason}", self.source),
        }
    }
}

/// The outcome of [`check_reader`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeenReport {
    pub export_size: u64,
    pub export_root: String,
    pub full: bool,
    pub results: Vec<SeenResult>,
}

impl SeenReport {
    /// No seen checkpoint contradicts the export (untrusted and unchecked ones do not count:
    /// they are reported, not believed).
    pub fn consistent(&self) -> bool {
        !self.results.iter().any(SeenResult::is_conflict)
    }
}

/// Why an export could not be checked at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeenError {
    #[error("not an export: {0}")]
    NotAnExport(String),
    #[error("the export's checkpoint does not verify with the host key: {0}")]
    ExportCheckpoint(String),
    #[error("more than {MAX_SEEN} checkpoints to check")]
    TooMany,
}

/// Checks the export read from `r` against the `seen` checkpoints, trusting only `host` (see the
/// module docs). Results are in order of size, untrusted notes last.
pub fn check_reader<R: Read + Seek>(r: R, host: &VerifyingKey, seen: &[SeenNote]) -> Result<SeenReport, SeenError> {
    if seen.len() > MAX_SEEN {
        return Err(SeenError::TooMany);
    }
    let mut trusted: Vec<(usize, Checkpoint)> = Vec::new();
    let mut untrusted = Vec::new();
    for (i, s) in seen.iter().enumerate() {
        match checkpoint::open(&s.note, host) {
            Ok(c) => trusted.push((i, c.checkpoint)),
            Err(e) => {
                let claimed = checkpoint::parse_unverified(&s.note).ok();
                untrusted.push(SeenResult {
                    source: s.source.clone(),
                    size: claimed.as_ref().map(|c| c.size),
                    root: claimed.as_ref().map(|c| hex::encode(&c.root)),
                    outcome: Outcome::Untrusted { reason: e.to_string() },
                });
            }
        }
    }
    trusted.sort_by_key(|(i, c)| (c.size, *i));

    let mut scanner = Scanner::new(r);
    let wanted: BTreeMap<u64, Option<Hash>> = trusted.iter().map(|(_, c)| (c.size, None)).collect();
    let mut sink = Leaves { wanted, builder: RootBuilder::new(), broken: None, header: None };
    let top = scanner.top_level(&mut sink).map_err(|e| SeenError::NotAnExport(e.to_string()))?;
    let header = match sink.header.take() {
        Some(h) => h,
        None => {
            let h = Header::read(&top.members)?;
            if let (Some(at), true) = (top.records_at, h.full) {
                sink.header = Some(h);
                scanner.seek(at).map_err(|e| SeenError::NotAnExport(e.to_string()))?;
                scanner.records(&mut sink, true).map_err(|e| SeenError::NotAnExport(e.to_string()))?;
                sink.header.take().ok_or_else(|| SeenError::NotAnExport("internal: header lost".into()))?
            } else {
                h
            }
        }
    };
    let cp =
        checkpoint::open(&header.checkpoint, host).map_err(|e| SeenError::ExportCheckpoint(e.to_string()))?.checkpoint;
    if header.full && sink.broken.is_none() && sink.builder.size() != cp.size {
        sink.broken = Some(format!("the export holds {} records, its checkpoint {}", sink.builder.size(), cp.size));
    }

    let mut results = Vec::with_capacity(seen.len());
    for (i, c) in &trusted {
        let source = seen.get(*i).map(|s| s.source.clone()).unwrap_or_default();
        let root_hex = hex::encode(&c.root);
        let outcome = if c.size > cp.size {
            Outcome::Beyond { export_size: cp.size }
        } else if c.size == cp.size {
            same_root(&c.root, &cp.root)
        } else if c.size == 0 {
            same_root(&c.root, &merkle::empty_root())
        } else if header.full {
            match (&sink.broken, sink.wanted.get(&c.size).copied().flatten()) {
                (None, Some(rebuilt)) => same_root(&c.root, &rebuilt),
                (Some(why), _) => Outcome::Unchecked { reason: format!("the export's records are not usable: {why}") },
                (None, None) => Outcome::Unchecked { reason: "internal: no root rebuilt at this size".into() },
            }
        } else {
            by_consistency(c, &cp, header.consistency.as_ref())
        };
        results.push(SeenResult { source, size: Some(c.size), root: Some(root_hex), outcome });
    }
    results.extend(untrusted);
    Ok(SeenReport { export_size: cp.size, export_root: hex::encode(&cp.root), full: header.full, results })
}

fn same_root(seen: &Hash, export: &Hash) -> Outcome {
    if seen == export {
        Outcome::Consistent
    } else {
        Outcome::Fork { export_root: Some(hex::encode(export)) }
    }
}

fn by_consistency(seen: &Checkpoint, cp: &Checkpoint, ev: Option<&ConsistencyEvidence>) -> Outcome {
    let Some(ev) = ev.filter(|e| e.old_size == seen.size) else {
        return Outcome::Unchecked {
            reason: format!(
                "a filtered export shows its log only at its own size; export everything, or with a consistency proof from size {}",
                seen.size
            ),
        };
    };
    let proof: Option<Vec<Hash>> = if ev.proof.len() > merkle::MAX_PROOF_LEN {
        None
    } else {
        ev.proof.iter().map(|h| hex::decode_hash(h)).collect()
    };
    let Some(proof) = proof else {
        return Outcome::Unchecked { reason: "the export's consistency proof is malformed".into() };
    };
    match merkle::verify_consistency(seen.size, cp.size, &seen.root, &cp.root, &proof) {
        Ok(()) => Outcome::Consistent,
        // The host signed both roots: a proof that fails is a proof of a fork, or a broken export
        // (which the verifier reports); either way this checkpoint does not agree with it.
        Err(_) => Outcome::Fork { export_root: None },
    }
}

/// The export's members the check reads.
#[derive(Debug)]
struct Header {
    checkpoint: String,
    full: bool,
    consistency: Option<ConsistencyEvidence>,
}

impl Header {
    fn read(members: &[(String, Vec<u8>)]) -> Result<Header, SeenError> {
        let get = |name: &str| members.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice());
        let bad = |what: &str| SeenError::NotAnExport(what.to_string());
        let format: String = get("format")
            .and_then(|v| serde_json::from_slice(v).ok())
            .ok_or_else(|| bad("missing or malformed member \"format\""))?;
        if format != EXPORT_FORMAT {
            return Err(bad(&format!("format is {format:?}, expected {EXPORT_FORMAT:?}")));
        }
        let checkpoint: String = get("checkpoint")
            .and_then(|v| serde_json::from_slice(v).ok())
            .ok_or_else(|| bad("missing or malformed member \"checkpoint\""))?;
        let full: bool = get("full")
            .and_then(|v| serde_json::from_slice(v).ok())
            .ok_or_else(|| bad("missing or malformed member \"full\""))?;
        let consistency = match get("consistency") {
            None => None,
            Some(v) => Some(
                serde_json::from_slice::<ConsistencyEvidence>(v)
                    .map_err(|e| bad(&format!("member \"consistency\": {e}")))?,
            ),
        };
        Ok(Header { checkpoint, full, consistency })
    }
}

/// Rebuilds the root at each wanted size from a full export's records, in document order.
struct Leaves {
    wanted: BTreeMap<u64, Option<Hash>>,
    builder: RootBuilder,
    /// Why the records cannot give roots (out of order, malformed): the first reason.
    broken: Option<String>,
    header: Option<Header>,
}

impl RecordSink for Leaves {
    fn start(&mut self, members: &[(String, Vec<u8>)]) -> bool {
        if self.header.is_some() {
            return true;
        }
        match Header::read(members) {
            Ok(h) if h.full => {
                self.header = Some(h);
                true
            }
            // A filtered export's records give no roots; a header not read yet is read again
            // after the document, and the records a second time.
            _ => false,
        }
    }

    fn element(&mut self, position: usize, bytes: &[u8]) {
        if self.broken.is_some() {
            return;
        }
        let r = match serde_json::from_slice::<ExportedRecord>(bytes) {
            Ok(r) => r,
            Err(e) => {
                self.broken = Some(format!("records entry #{position}: {e}"));
                return;
            }
        };
        if r.index != self.builder.size() {
            self.broken =
                Some(format!("records entry #{position} has index {}, expected {}", r.index, self.builder.size()));
            return;
        }
        self.builder.push(merkle::leaf_hash(r.record.as_bytes()));
        let size = self.builder.size();
        if let Some(slot) = self.wanted.get_mut(&size) {
            *slot = Some(self.builder.root());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::sign;
    use crate::export::{ExportBundle, ExportFilter};
    use crate::hostkey::HostKey;
    use crate::merkle::MemNodes;
    use std::io::Cursor;

    /// A log of `records` (any strings: the check reads only leaves) with its nodes.
    fn log(records: &[String]) -> MemNodes {
        let mut nodes = MemNodes::new();
        for (i, r) in records.iter().enumerate() {
            merkle::append(&mut nodes, i as u64, merkle::leaf_hash(r.as_bytes())).unwrap();
        }
        nodes
    }

    fn note_at(key: &HostKey, records: &[String], size: u64) -> String {
        let nodes = log(records);
        let root = merkle::root(&nodes, size).unwrap();
        sign(Checkpoint { origin: key.origin().to_string(), size, root }, key).note
    }

    fn export_doc(key: &HostKey, records: &[String], filtered: bool, consistency_from: Option<u64>) -> String {
        let size = records.len() as u64;
        let nodes = log(records);
        let consistency = consistency_from.map(|old| ConsistencyEvidence {
            old_size: old,
            proof: merkle::consistency_proof(&nodes, old, size).unwrap().iter().map(|h| hex::encode(h)).collect(),
        });
        let bundle = ExportBundle {
            format: EXPORT_FORMAT.into(),
            origin: key.origin().into(),
            host_vkey: checkpoint::vkey(&key.verifying_key()),
            checkpoint: note_at(key, records, size),
            full: !filtered,
            filter: ExportFilter { passport: filtered.then(|| "pA".to_string()), since: None },
            records: records
                .iter()
                .enumerate()
                .filter(|(i, _)| !filtered || i % 2 == 0)
                .map(|(i, r)| ExportedRecord { index: i as u64, record: r.clone(), inclusion_proof: vec![] })
                .collect(),
            consistency,
        };
        serde_json::to_string(&bundle).unwrap()
    }

    fn records(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{{\"r\":\"{prefix}{i}\"}}")).collect()
    }

    fn seen(notes: &[String]) -> Vec<SeenNote> {
        notes.iter().enumerate().map(|(i, n)| SeenNote { source: format!("seen#{i}"), note: n.clone() }).collect()
    }

    fn outcomes(r: &SeenReport) -> Vec<(Option<u64>, &'static str)> {
        r.results
            .iter()
            .map(|x| {
                let o = match x.outcome {
                    Outcome::Consistent => "consistent",
                    Outcome::Fork { .. } => "fork",
                    Outcome::Beyond { .. } => "beyond",
                    Outcome::Untrusted { .. } => "untrusted",
                    Outcome::Unchecked { .. } => "unchecked",
                };
                (x.size, o)
            })
            .collect()
    }

    #[test]
    fn honest_export_agrees_with_every_checkpoint_the_host_published() {
        let key = HostKey::generate();
        let recs = records("a", 37);
        let notes: Vec<String> = [0u64, 1, 5, 16, 17, 36, 37].iter().map(|&s| note_at(&key, &recs, s)).collect();
        let doc = export_doc(&key, &recs, false, None);
        let report = check_reader(Cursor::new(doc), &key.verifying_key(), &seen(&notes)).unwrap();
        assert!(report.consistent());
        assert_eq!((report.export_size, report.full), (37, true));
        assert!(report.results.iter().all(|r| r.outcome == Outcome::Consistent), "{:?}", outcomes(&report));
        assert_eq!(report.results.len(), 7);
    }

    #[test]
    fn rewritten_history_with_the_same_key_is_a_fork() {
        let key = HostKey::generate();
        let mut published = records("a", 30);
        let notes = vec![note_at(&key, &published, 10), note_at(&key, &published, 25), note_at(&key, &published, 30)];
        // Restored from a copy at 20 records, then other records written: 35 in all, self-consistent.
        published.truncate(20);
        let mut rewritten = published.clone();
        rewritten.extend(records("b", 15));
        let doc = export_doc(&key, &rewritten, false, None);
        let report = check_reader(Cursor::new(doc), &key.verifying_key(), &seen(&notes)).unwrap();
        assert!(!report.consistent());
        assert_eq!(outcomes(&report), vec![(Some(10), "consistent"), (Some(25), "fork"), (Some(30), "fork")]);
        let text = report.results[1].to_string();
        assert!(text.contains("history rewritten") && text.contains("size 25") && text.contains("seen#1"), "{text}");
    }

    #[test]
    fn export_shorter_than_a_published_checkpoint_is_truncated_or_rolled_back() {
        let key = HostKey::generate();
        let recs = records("a", 30);
        let notes = vec![note_at(&key, &recs, 30)];
        let doc = export_doc(&key, &recs[..22], false, None);
        let report = check_reader(Cursor::new(doc), &key.verifying_key(), &seen(&notes)).unwrap();
        assert_eq!(report.results[0].outcome, Outcome::Beyond { export_size: 22 });
        assert!(!report.consistent());
    }

    #[test]
    fn checkpoints_that_do_not_verify_are_reported_and_never_compared() {
        let key = HostKey::generate();
        let other = HostKey::generate();
        let recs = records("a", 12);
        let good = note_at(&key, &recs, 12);
        // Signed by another key, and a forged signature under our key id.
        let foreign = note_at(&other, &records("x", 40), 40);
        let forged = good.replacen("\n12\n", "\n11\n", 1);
        let doc = export_doc(&key, &recs, false, None);
        let report =
            check_reader(Cursor::new(doc), &key.verifying_key(), &seen(&[foreign, forged, good, "junk".into()]))
                .unwrap();
        assert!(report.consistent(), "untrusted notes never make an export fail or pass");
        assert_eq!(
            outcomes(&report),
            vec![(Some(12), "consistent"), (Some(40), "untrusted"), (Some(11), "untrusted"), (None, "untrusted")]
        );
    }

    #[test]
    fn filtered_export_checks_its_own_size_and_its_consistency_proof_only() {
        let key = HostKey::generate();
        let recs = records("a", 20);
        let notes = vec![note_at(&key, &recs, 8), note_at(&key, &recs, 13), note_at(&key, &recs, 20)];
        let doc = export_doc(&key, &recs, true, Some(13));
        let report = check_reader(Cursor::new(doc), &key.verifying_key(), &seen(&notes)).unwrap();
        assert_eq!(outcomes(&report), vec![(Some(8), "unchecked"), (Some(13), "consistent"), (Some(20), "consistent")]);
        // The same filtered export of a rewritten log: the proof from 13 does not hold.
        let mut rewritten = recs[..10].to_vec();
        rewritten.extend(records("b", 10));
        let doc = export_doc(&key, &rewritten, true, Some(13));
        let report = check_reader(Cursor::new(doc), &key.verifying_key(), &seen(&notes[1..2])).unwrap();
        assert_eq!(outcomes(&report), vec![(Some(13), "fork")]);
    }

    #[test]
    fn records_before_the_header_are_read_in_a_second_pass() {
        let key = HostKey::generate();
        let recs = records("a", 9);
        let notes = vec![note_at(&key, &recs, 4)];
        let doc: serde_json::Value = serde_json::from_str(&export_doc(&key, &recs, false, None)).unwrap();
        // serde_json's map is sorted: put "records" first by hand.
        let obj = doc.as_object().unwrap();
        let mut text = format!("{{\"records\":{}", obj["records"]);
        for (k, v) in obj.iter().filter(|(k, _)| *k != "records") {
            text.push_str(&format!(",{}:{}", serde_json::to_string(k).unwrap(), v));
        }
        text.push('}');
        let report = check_reader(Cursor::new(text), &key.verifying_key(), &seen(&notes)).unwrap();
        assert_eq!(outcomes(&report), vec![(Some(4), "consistent")]);
    }

    #[test]
    fn unusable_inputs_are_errors_or_unchecked_never_consistent() {
        let key = HostKey::generate();
        let other = HostKey::generate();
        let recs = records("a", 6);
        let notes = seen(&[note_at(&key, &recs, 3)]);
        let doc = export_doc(&key, &recs, false, None);
        assert!(matches!(
            check_reader(Cursor::new(doc.clone()), &other.verifying_key(), &notes),
            Err(SeenError::ExportCheckpoint(_))
        ));
        assert!(matches!(
            check_reader(Cursor::new("[]"), &key.verifying_key(), &notes),
            Err(SeenError::NotAnExport(_))
        ));
        // Records out of order: no root is believed.
        let mut bundle: ExportBundle = serde_json::from_str(&doc).unwrap();
        bundle.records.swap(0, 1);
        let report =
            check_reader(Cursor::new(serde_json::to_string(&bundle).unwrap()), &key.verifying_key(), &notes).unwrap();
        assert_eq!(outcomes(&report), vec![(Some(3), "unchecked")]);
    }
}
