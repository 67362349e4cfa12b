//! The rules an agent follows when it accepts a catalog version, so a gate can neither roll it
//! back nor show it a different history than it shows others.
//!
//! An agent pins the last version it accepted per gate (`gate_id`, `version`, `content_hash`).
//! Later it accepts only that version again with the same hash, or newer versions that chain
//! back to it: each version's `prev_content_hash` names the one before, and versions grow by
//! one. A second, different "version 3" is a split view and is refused loudly; so is a lower
//! version (rollback). (That every version is also in the gate's Merkle log, proved by an
//! inclusion proof against a signed checkpoint, is checked by the caller with the ledger's
//! verifier; this module owns the catalog's own chain.)

use crate::snapshot::{GateId, SignedCatalog};

/// What an agent remembers of the last catalog it accepted from one gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub gate_id: GateId,
    pub version: u64,
    pub content_hash: String,
}

impl Pin {
    pub fn of(c: &SignedCatalog) -> Pin {
        Pin { gate_id: c.snapshot.gate_id.clone(), version: c.snapshot.version, content_hash: c.content_hash.clone() }
    }
}

/// Why a version (or a history) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("catalog version {offered} is older than version {pinned}, which was already accepted (a rollback)")]
    Rollback { pinned: u64, offered: u64 },
    #[error(
        "the gate shows two different catalogs as version {version}: {pinned_hash} was accepted before, \
         now {offered_hash} (a split view: keep both documents as evidence)"
    )]
    SplitView { version: u64, pinned_hash: String, offered_hash: String },
    #[error("catalog version {version} does not follow version {previous}: versions grow by one")]
    Gap { previous: u64, version: u64 },
    #[error("catalog version {version} names {claimed} as its predecessor, but version {previous} is {actual}")]
    BrokenLink { version: u64, previous: u64, claimed: String, actual: String },
    #[error("catalog version {version} is from gate {found}, not {expected}")]
    OtherGate { version: u64, expected: String, found: String },
    #[error("catalog version {version} was published before version {previous}")]
    TimeBackwards { version: u64, previous: u64 },
    #[error("no catalog versions given")]
    Empty,
}

/// Checks that `history` (signature-checked versions, oldest first) is one unbroken chain that
/// extends `pin` (if any), and returns the pin of its newest version.
///
/// With a pin, `history` must start at the pinned version (same hash) or right after it. Without
/// one, it must start at version 1 (trust on first use of the whole history, never of a tail).
pub fn verify_history(pin: Option<&Pin>, history: &[SignedCatalog]) -> Result<Pin, ChainError> {
    let first = history.first().ok_or(ChainError::Empty)?;
    let mut prev: Option<Pin> = None;
    let mut prev_published = None;
    match pin {
        None if first.snapshot.version != 1 => {
            return Err(ChainError::Gap { previous: 0, version: first.snapshot.version });
        }
        None => {}
        Some(p) => {
            check_against_pin(p, first)?;
            if first.snapshot.version > p.version + 1 {
                return Err(ChainError::Gap { previous: p.version, version: first.snapshot.version });
            }
            if first.snapshot.version == p.version + 1 {
                prev = Some(p.clone());
            }
        }
    }
    for c in history {
        let s = &c.snapshot;
        if let Some(p) = &prev {
            if s.gate_id != p.gate_id {
                return Err(ChainError::OtherGate {
                    version: s.version,
                    expected: p.gate_id.as_str().into(),
                    found: s.gate_id.as_str().into(),
                });
            }
            if s.version == p.version && c.content_hash != p.content_hash {
                return Err(ChainError::SplitView {
                    version: s.version,
                    pinned_hash: p.content_hash.clone(),
                    offered_hash: c.content_hash.clone(),
                });
            }
            if s.version != p.version + 1 {
                return Err(ChainError::Gap { previous: p.version, version: s.version });
            }
            let claimed = s.prev_content_hash.clone().unwrap_or_default();
            if claimed != p.content_hash {
                return Err(ChainError::BrokenLink {
                    version: s.version,
                    previous: p.version,
                    claimed,
                    actual: p.content_hash.clone(),
                });
            }
            if prev_published.is_some_and(|t| s.published_at < t) {
                return Err(ChainError::TimeBackwards { version: s.version, previous: p.version });
            }
        }
        prev_published = Some(s.published_at);
        prev = Some(Pin::of(c));
    }
    prev.ok_or(ChainError::Empty)
}

/// Checks one offered version against a pin: same gate, not older, and the same bytes if it is
/// the pinned version. It does not check that a newer version chains back (that needs the
/// versions between; see [`verify_history`]).
pub fn check_against_pin(pin: &Pin, offered: &SignedCatalog) -> Result<(), ChainError> {
    let s = &offered.snapshot;
    if s.gate_id != pin.gate_id {
        return Err(ChainError::OtherGate {
            version: s.version,
            expected: pin.gate_id.as_str().into(),
            found: s.gate_id.as_str().into(),
        });
    }
    if s.version < pin.version {
        return Err(ChainError::Rollback { pinned: pin.version, offered: s.version });
    }
    if s.version == pin.version && offered.content_hash != pin.content_hash {
        return Err(ChainError::SplitView {
            version: s.version,
            pinned_hash: pin.content_hash.clone(),
            offered_hash: offered.content_hash.clone(),
        });
    }
    Ok(())
}
