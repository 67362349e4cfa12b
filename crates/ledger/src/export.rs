//! Audit exports and portable attestations: the documents auditors verify offline.
//!
//! # Export format (`sluice-audit-export/v1`)
//! One JSON document:
//! ```json
//! {
//!   "format": "sluice-audit-export/v1",
//!   "origin": "sluice/0123456789abcdef",
//!   "host_vkey": "sluice/0123456789abcdef+1a2b3c4d+AXr...",
//!   "checkpoint": "sluice/0123456789abcdef\n42\n<base64 root>\n\n— sluice/… <sig>\n",
//!   "full": true,
//!   "filter": { "passport": null, "since": null },
//!   "records": [
//!     { "index": 0, "record": "{\"chain\":\"host\",…}", "inclusion_proof": ["<hex>", …] }
//!   ],
//!   "consistency": { "old_size": 17, "proof": ["<hex>", …] }
//! }
//! ```
//! - `checkpoint` is the signed note (C2SP tlog-checkpoint) every proof refers to.
//! - `records[].record` is the record's exact RFC 8785 text, i.e. the Merkle leaf input; the
//!   leaf hash is `SHA-256(0x00 || UTF-8 bytes)`.
//! - A full export (`full: true`, no filter) holds every record `0 .. size-1` in order and no
//!   inclusion proofs: the verifier rebuilds the root. A filtered export holds the matching
//!   records, each with its RFC 6962 inclusion proof against the checkpoint.
//! - `consistency` is present when asked for (`consistency_from`): the RFC 6962 consistency
//!   proof from an older tree size to the checkpoint's size, so a filtered export can be checked
//!   against an older checkpoint. Full exports need none.
//! - `host_vkey` and `origin` are informational; the verifier trusts only the host public key
//!   it is given.
//! - [`export_stream`] writes the members in the order above but with `consistency` before
//!   `records`, and one record per line, so the document is produced from one snapshot a batch
//!   at a time and the verifier has every other member before the first record. Member order
//!   carries no meaning; the verifier accepts any.
//!
//! # Portable attestation format (`sluice-attestation/v1`)
//! `{format, origin, host_vkey, checkpoint, index, record, inclusion_proof}`: one record, its
//! inclusion proof and a signed checkpoint covering it.

use serde::{Deserialize, Serialize};

use super::checkpoint;
use super::hex;
use super::record;
use super::store::{Ledger, LedgerError, Snapshot};

pub const EXPORT_FORMAT: &str = "sluice-audit-export/v1";
pub const ATTESTATION_FORMAT: &str = "sluice-attestation/v1";

/// What to export.
#[derive(Debug, Clone, Default)]
pub struct ExportRequest {
    /// Only the records of this chain (passport id, or "host").
    pub passport: Option<String>,
    /// Only records whose `time` is at or after this instant (RFC 3339).
    pub since: Option<String>,
    /// Include a consistency proof from this older tree size (e.g. an auditor's last
    /// checkpoint) to the exported checkpoint.
    pub consistency_from: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportFilter {
    pub passport: Option<String>,
    pub since: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportedRecord {
    pub index: u64,
    pub record: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inclusion_proof: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyEvidence {
    pub old_size: u64,
    pub proof: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportBundle {
    pub format: String,
    pub origin: String,
    pub host_vkey: String,
    pub checkpoint: String,
    pub full: bool,
    pub filter: ExportFilter,
    pub records: Vec<ExportedRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<ConsistencyEvidence>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortableAttestation {
    pub format: String,
    pub origin: String,
    pub host_vkey: String,
    pub checkpoint: String,
    pub index: u64,
    pub record: String,
    pub inclusion_proof: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("--since {0:?} is not an RFC 3339 time (e.g. 2025-01-31T00:00:00Z)")]
    BadSince(String),
    #[error("consistency requested from size {old}, but the exported checkpoint covers only {size} records: the older checkpoint is from a longer log (rollback?)")]
    ConsistencyBeyondSize { old: u64, size: u64 },
    #[error("record {0} is not in the log (log size {1})")]
    NoSuchRecord(u64, u64),
    #[error("record {0} is not valid UTF-8 in the store (store damaged)")]
    NotUtf8(u64),
    #[error("writing the export: {0}")]
    Encode(String),
}

fn hexes(hashes: &[super::Hash]) -> Vec<String> {
    hashes.iter().map(|h| hex::encode(h)).collect()
}

fn utf8(index: u64, bytes: &[u8]) -> Result<String, ExportError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| ExportError::NotUtf8(index))
}

/// Records read from the store per step of an export stream.
const BATCH: u64 = 256;

/// An export being written: the checkpoint, filter and consistency proof are fixed when it is
/// made (so every error that can be answered as an error comes before the first byte), then the
/// records are read from one snapshot a batch at a time as the document is written. Memory is a
/// batch of records and the caller's output buffer, whatever the size of the log.
pub struct ExportStream {
    snap: Snapshot,
    header: Vec<u8>,
    size: u64,
    since: Option<chrono::DateTime<chrono::Utc>>,
    full: bool,
    /// Next log index to read (no passport filter).
    next: u64,
    /// The chain's record indices and how many of them were written (passport filter).
    chain: Option<(Vec<u64>, usize)>,
    written: u64,
    state: StreamState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StreamState {
    Header,
    Records,
    Done,
}

/// Prepares a streamed export with a fresh signed checkpoint (everything committed before the
/// call). Nothing is read beyond the checkpoint and the consistency proof yet.
pub async fn export_stream(ledger: &Ledger, req: &ExportRequest) -> Result<ExportStream, ExportError> {
    let since = match &req.since {
        None => None,
        Some(s) => Some(record::parse_time(s).ok_or_else(|| ExportError::BadSince(s.clone()))?),
    };
    let cp = ledger.checkpoint_now().await?;
    let snap = ledger.snapshot()?;
    let size = cp.checkpoint.size;
    let full = req.passport.is_none() && since.is_none();
    let consistency = match req.consistency_from {
        None => None,
        Some(old) if old > size => return Err(ExportError::ConsistencyBeyondSize { old, size }),
        Some(old) => Some(ConsistencyEvidence { old_size: old, proof: hexes(&snap.consistency_proof(old, size)?) }),
    };
    let chain = match &req.passport {
        None => None,
        Some(chain) => Some((snap.chain_indices(chain)?.into_iter().take_while(|&i| i < size).collect(), 0)),
    };
    let head = Header {
        format: EXPORT_FORMAT,
        origin: ledger.origin(),
        host_vkey: &checkpoint::vkey(&ledger.host_public_key()),
        checkpoint: &cp.note,
        full,
        filter: &ExportFilter { passport: req.passport.clone(), since: req.since.clone() },
        consistency: consistency.as_ref(),
    };
    let mut header = serde_json::to_vec(&head).map_err(|e| ExportError::Encode(e.to_string()))?;
    // `{…}` → `{…,"records":[` : the records member comes last, so a reader has everything it
    // needs before the first record.
    header.pop();
    header.extend_from_slice(b",\"records\":[");
    Ok(ExportStream { snap, header, size, since, full, next: 0, chain, written: 0, state: StreamState::Header })
}

/// The members of an export before its records, in the order they are written.
#[derive(Serialize)]
struct Header<'a> {
    format: &'a str,
    origin: &'a str,
    host_vkey: &'a str,
    checkpoint: &'a str,
    full: bool,
    filter: &'a ExportFilter,
    #[serde(skip_serializing_if = "Option::is_none")]
    consistency: Option<&'a ConsistencyEvidence>,
}

impl ExportStream {
    /// The size of the exported checkpoint.
    pub fn checkpoint_size(&self) -> u64 {
        self.size
    }

    /// Records written so far.
    pub fn records_written(&self) -> u64 {
        self.written
    }

    /// Appends the next part of the document to `out`, stopping once `out` holds at least
    /// `target` bytes or the document is complete. Returns `false` when the document is complete.
    pub fn fill(&mut self, out: &mut Vec<u8>, target: usize) -> Result<bool, ExportError> {
        loop {
            match self.state {
                StreamState::Header => {
                    out.extend_from_slice(&self.header);
                    self.header = Vec::new();
                    self.state = StreamState::Records;
                }
                StreamState::Records => {
                    if !self.next_batch(out)? {
                        out.extend_from_slice(b"\n]}\n");
                        self.state = StreamState::Done;
                    }
                }
                StreamState::Done => return Ok(false),
            }
            if out.len() >= target {
                return Ok(self.state != StreamState::Done);
            }
        }
    }

    /// Writes the whole document to `w`.
    pub fn write_to(mut self, w: &mut impl std::io::Write) -> Result<(), ExportError> {
        let mut buf = Vec::with_capacity(64 * 1024);
        loop {
            buf.clear();
            let more = self.fill(&mut buf, 64 * 1024)?;
            w.write_all(&buf).map_err(|e| ExportError::Encode(e.to_string()))?;
            if !more {
                return Ok(());
            }
        }
    }

    /// One batch of records; `false` when there are no more.
    fn next_batch(&mut self, out: &mut Vec<u8>) -> Result<bool, ExportError> {
        let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
        match &mut self.chain {
            None => {
                if self.next >= self.size {
                    return Ok(false);
                }
                let to = self.size.min(self.next.saturating_add(BATCH));
                let since = self.since;
                self.snap.for_each_record(self.next, to, |index, bytes| {
                    if keep_time(since, bytes) {
                        batch.push((index, bytes.to_vec()));
                    }
                    Ok(())
                })?;
                self.next = to;
            }
            Some((indices, done)) => {
                let Some(rest) = indices.get(*done..).filter(|r| !r.is_empty()) else {
                    return Ok(false);
                };
                let take = rest.len().min(BATCH as usize);
                for &index in rest.iter().take(take) {
                    if let Some(bytes) = self.snap.record(index)? {
                        if keep_time(self.since, &bytes) {
                            batch.push((index, bytes));
                        }
                    }
                }
                *done += take;
            }
        }
        for (index, bytes) in batch {
            let inclusion_proof =
                if self.full { Vec::new() } else { hexes(&self.snap.inclusion_proof(index, self.size)?) };
            let entry = ExportedRecord { index, record: utf8(index, &bytes)?, inclusion_proof };
            out.extend_from_slice(if self.written == 0 { b"\n" } else { b",\n" });
            serde_json::to_writer(&mut *out, &entry).map_err(|e| ExportError::Encode(e.to_string()))?;
            self.written += 1;
        }
        Ok(true)
    }
}

/// Whether a record is kept by a `since` filter. Records are JSON objects written by us; an
/// unreadable time is excluded from a time-filtered export rather than guessed.
fn keep_time(since: Option<chrono::DateTime<chrono::Utc>>, bytes: &[u8]) -> bool {
    let Some(since) = since else { return true };
    #[derive(serde::Deserialize)]
    struct Time<'a> {
        #[serde(borrow)]
        time: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<Time>(bytes)
        .ok()
        .and_then(|t| t.time.as_deref().and_then(record::parse_time))
        .is_some_and(|t| t >= since)
}

/// Exports records with a fresh signed checkpoint, as one value in memory: for tests and small
/// logs. The daemon streams ([`export_stream`]); this parses what the stream writes, so both are
/// the same document.
pub async fn export(ledger: &Ledger, req: &ExportRequest) -> Result<ExportBundle, ExportError> {
    let mut doc = Vec::new();
    export_stream(ledger, req).await?.write_to(&mut doc)?;
    serde_json::from_slice(&doc).map_err(|e| ExportError::Encode(e.to_string()))
}

/// A portable attestation of record `index`: the record, its inclusion proof, and a signed
/// checkpoint covering it (the latest one if it does, else a fresh one).
pub async fn proof(ledger: &Ledger, index: u64) -> Result<PortableAttestation, ExportError> {
    let size = ledger.size();
    if index >= size {
        return Err(ExportError::NoSuchRecord(index, size));
    }
    let cp = match ledger.latest_checkpoint()? {
        Some(cp) if cp.checkpoint.size > index => cp,
        _ => ledger.checkpoint_now().await?,
    };
    let snap = ledger.snapshot()?;
    let bytes = snap.record(index)?.ok_or(ExportError::NoSuchRecord(index, snap.size()))?;
    let inclusion_proof = hexes(&snap.inclusion_proof(index, cp.checkpoint.size)?);
    Ok(PortableAttestation {
        format: ATTESTATION_FORMAT.to_string(),
        origin: ledger.origin().to_string(),
        host_vkey: checkpoint::vkey(&ledger.host_public_key()),
        checkpoint: cp.note,
        index,
        record: utf8(index, &bytes)?,
        inclusion_proof,
    })
}
