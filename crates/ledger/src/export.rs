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
//!
//! # Portable attestation format (`sluice-attestation/v1`)
//! `{format, origin, host_vkey, checkpoint, index, record, inclusion_proof}`: one record, its
//! inclusion proof and a signed checkpoint covering it.

use serde::{Deserialize, Serialize};

use super::checkpoint::{self, SignedCheckpoint};
use super::hex;
use super::record::{self, FIELD_TIME};
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
}

fn hexes(hashes: &[super::Hash]) -> Vec<String> {
    hashes.iter().map(|h| hex::encode(h)).collect()
}

fn utf8(index: u64, bytes: &[u8]) -> Result<String, ExportError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| ExportError::NotUtf8(index))
}

/// Exports records with a fresh signed checkpoint (everything committed before the call).
pub async fn export(ledger: &Ledger, req: &ExportRequest) -> Result<ExportBundle, ExportError> {
    let since = match &req.since {
        None => None,
        Some(s) => Some(record::parse_time(s).ok_or_else(|| ExportError::BadSince(s.clone()))?),
    };
    let cp = ledger.checkpoint_now().await?;
    let snap = ledger.snapshot()?;
    export_from(&snap, &cp, req, since, ledger)
}

fn export_from(
    snap: &Snapshot,
    cp: &SignedCheckpoint,
    req: &ExportRequest,
    since: Option<chrono::DateTime<chrono::Utc>>,
    ledger: &Ledger,
) -> Result<ExportBundle, ExportError> {
    let size = cp.checkpoint.size;
    let full = req.passport.is_none() && since.is_none();
    let keep_time = |bytes: &[u8]| -> bool {
        let Some(since) = since else { return true };
        // Records are JSON objects written by us; an unreadable time is excluded from a
        // time-filtered export rather than guessed.
        serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .and_then(|v| v.get(FIELD_TIME).and_then(|t| t.as_str()).and_then(record::parse_time))
            .is_some_and(|t| t >= since)
    };
    let mut records = Vec::new();
    match &req.passport {
        None => {
            snap.for_each_record(0, size, |index, bytes| {
                if keep_time(bytes) {
                    records.push((index, bytes.to_vec()));
                }
                Ok(())
            })?;
        }
        Some(chain) => {
            for index in snap.chain_indices(chain)? {
                if index >= size {
                    break;
                }
                if let Some(bytes) = snap.record(index)? {
                    if keep_time(&bytes) {
                        records.push((index, bytes));
                    }
                }
            }
        }
    }
    let mut out = Vec::with_capacity(records.len());
    for (index, bytes) in records {
        let inclusion_proof = if full { Vec::new() } else { hexes(&snap.inclusion_proof(index, size)?) };
        out.push(ExportedRecord { index, record: utf8(index, &bytes)?, inclusion_proof });
    }
    let consistency = match req.consistency_from {
        None => None,
        Some(old) if old > size => return Err(ExportError::ConsistencyBeyondSize { old, size }),
        Some(old) => Some(ConsistencyEvidence { old_size: old, proof: hexes(&snap.consistency_proof(old, size)?) }),
    };
    Ok(ExportBundle {
        format: EXPORT_FORMAT.to_string(),
        origin: ledger.origin().to_string(),
        host_vkey: checkpoint::vkey(&ledger.host_public_key()),
        checkpoint: cp.note.clone(),
        full,
        filter: ExportFilter { passport: req.passport.clone(), since: req.since.clone() },
        records: out,
        consistency,
    })
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
