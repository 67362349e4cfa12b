//! The attestation log: everything the daemon writes durably goes through here.
//!
//! **Owns**
//! - the decision and event records, sealed into per-chain hash links (`seq`, `prev_hash`) and
//!   leaves of one RFC 6962 Merkle log ([`record`], [`merkle`]);
//! - a key-value state table whose values are opaque bytes owned by other modules (counters,
//!   passports, holds, revocations), written in the same durable transaction as the records
//!   that justify them; records kept in append-only segment files, indexes and state in redb
//!   ([`store`]);
//! - the host key and the signed C2SP checkpoints ([`hostkey`], [`checkpoint`]);
//! - audit exports, portable attestations and their offline verification ([`export`],
//!   [`verify`]).
//!
//! **Does not touch** sockets, HTTP, the kernel, or the meaning of passports and counters: callers
//! hand in drafts (JSON objects) and opaque state bytes. The only record fields it interprets are
//! the ones it writes (`chain`, `log_index`, `seq`, `prev_hash`, `time`) and, in the verifier,
//! the spend fields it recomputes (`spend_delta_millicents`, `spend_window_start`,
//! `spend_after_millicents`, `kind: "counter_reset"`, and the whole-cent `spend_*_cents` of
//! version 1 records, read × 1000). The field names are constants in [`record`], shared by the
//! record builders and the verifier.
//!
//! **Invariants**
//! - Append-only: records, Merkle nodes and checkpoints are only ever inserted at the end; no
//!   code path rewrites or deletes them. (Two file operations keep the same bytes: sealing
//!   replaces a full segment's `.log` by its compressed `.zst`, and open cuts an open segment
//!   back to the length redb synced, beyond which journal replay writes the same records again.)
//! - Durable before answered: a transaction's caller hears back only after its group is on
//!   stable storage: appended to the commit journal and `fdatasync`ed (or, for a group too large
//!   for the journal, committed to redb with `Durability::Immediate`). If the journal write
//!   fails, every caller of the group gets the error and the writer refuses everything until a
//!   restart; the outcome is then unknown (a partly synced entry is erased if possible, but may
//!   still be replayed). The journal is emptied only once redb is synced past every entry in it.
//!   Readers never see less than what callers were told.
//! - One writer: a single thread runs every transaction against the state it keeps in memory, so
//!   log indices, chain sequence numbers and state updates are totally ordered, and a
//!   transaction sees every earlier one. A second thread (the indexer) writes redb behind it,
//!   in the same order, never on the request path.
//! - A checkpoint is signed at least once per `checkpoint_interval` while the log grows; its root
//!   is the writer's Merkle frontier after the group that carries it, and it is made durable in
//!   that group's journal entry.

#![forbid(unsafe_code)]
// No panics in shipped code: errors are values (tests may unwrap), and byte parsers use
// `get`, patterns and iterators rather than indexing.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

pub mod canonical;
pub mod checkpoint;
pub mod docstream;
pub mod export;
pub mod hostkey;
pub mod journal;
pub mod link;
pub mod merkle;
pub mod record;
pub mod seen;
pub mod settle;
pub mod store;
mod sync;
pub mod verify;

#[cfg(test)]
mod tests;

pub use checkpoint::{Checkpoint, SignedCheckpoint};
pub use export::{ExportBundle, ExportRequest, PortableAttestation};
pub use hostkey::HostKey;
pub use merkle::Hash;
pub use record::{Appended, Draft, HOST_CHAIN};
pub use store::{
    Ledger, LedgerError, LedgerOptions, RequestInProgress, Snapshot, StorageError, Txn, TxnError, WriteStats,
    WriteStatsReader,
};
pub use verify::{Problem, VerifyReport};

/// Lowercase hex, used for `prev_hash` and proof nodes.
pub mod hex {
    /// The lowercase hex digit of the low four bits of `n`.
    pub(crate) fn digit(n: u8) -> u8 {
        match n & 0xf {
            d @ 0..=9 => b'0' + d,
            d => b'a' + (d - 10),
        }
    }

    pub fn encode(bytes: &[u8]) -> String {
        let mut s = String::with_capacity(bytes.len() * 2);
        for &b in bytes {
            s.push(char::from(digit(b >> 4)));
            s.push(char::from(digit(b)));
        }
        s
    }

    /// Decodes lowercase hex only (the form we write), so a value has exactly one spelling.
    pub fn decode(s: &str) -> Option<Vec<u8>> {
        if !s.len().is_multiple_of(2) {
            return None;
        }
        s.as_bytes()
            .chunks_exact(2)
            .map(|pair| match *pair {
                [hi, lo] => Some((nibble(hi)? << 4) | nibble(lo)?),
                _ => None,
            })
            .collect()
    }

    /// Decodes a 32-byte hash in lowercase hex.
    pub fn decode_hash(s: &str) -> Option<super::Hash> {
        let mut hash = [0u8; 32];
        let pairs = s.as_bytes().chunks_exact(2);
        if s.len() != 64 || !pairs.remainder().is_empty() {
            return None;
        }
        for (out, pair) in hash.iter_mut().zip(pairs) {
            let [hi, lo] = *pair else { return None };
            *out = (nibble(hi)? << 4) | nibble(lo)?;
        }
        Some(hash)
    }

    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trip_and_strictness() {
            assert_eq!(super::encode(&[0, 0xab, 0xff]), "00abff");
            assert_eq!(super::decode("00abff"), Some(vec![0, 0xab, 0xff]));
            assert_eq!(super::decode("00ABff"), None);
            assert_eq!(super::decode("0"), None);
            assert_eq!(super::decode("zz"), None);
            assert!(super::decode_hash(&"ab".repeat(31)).is_none());
            assert!(super::decode_hash(&"ab".repeat(33)).is_none());
            assert!(super::decode_hash(&format!("{}AB", "ab".repeat(31))).is_none());
            assert!(super::decode_hash(&format!("{}é", "ab".repeat(31))).is_none());
            let hash: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(super::decode_hash(&super::encode(&hash)).map(Vec::from), Some(hash));
        }
    }
}
