//! `sluice audit verify` (`sluice_ledger::verify::verify_document`): an export bundle or a
//! portable attestation, checked against the host key and optionally an older checkpoint. The
//! document is what an auditor is handed; it may have been edited by anyone.
//!
//! The input is `document 0xff older-checkpoint` (the second part optional); the host key is the
//! one of `crates/ledger/src/testdata/v1-export.json`, the seed, so mutations of a document that
//! verifies reach every check. Checks, beyond "never panics": the report is deterministic and
//! serialises to JSON; a clean report names a checkpoint that opens with the host key and no more
//! records than its size; the number of problems is bounded by the document's size.
#![no_main]

use ed25519_dalek::VerifyingKey;
use libfuzzer_sys::fuzz_target;
use sluice_ledger::checkpoint;
use sluice_ledger::verify::verify_document;

const V1_HOST_KEY: [u8; 32] = [
    184, 78, 103, 128, 180, 147, 100, 154, 205, 168, 112, 66, 83, 65, 19, 227, 67, 36, 84, 10, 39, 41, 196, 46, 31, 2,
    12, 13, 149, 248, 174, 235,
];

fuzz_target!(|data: &[u8]| {
    let host = VerifyingKey::from_bytes(&V1_HOST_KEY).expect("the v1 host key");
    let mut parts = data.splitn(2, |b| *b == 0xff);
    let Ok(text) = std::str::from_utf8(parts.next().unwrap_or_default()) else { return };
    let older = parts.next().map(String::from_utf8_lossy);
    let report = verify_document(text, &host, older.as_deref());
    assert_eq!(report, verify_document(text, &host, older.as_deref()), "not deterministic");
    serde_json::to_string(&report).expect("the report serialises");
    assert!(
        report.problems.len() <= 2 * text.len() + 16,
        "{} problems for {} bytes",
        report.problems.len(),
        text.len()
    );
    for p in &report.problems {
        assert!(!p.to_string().is_empty());
    }
    if report.is_ok() {
        let size = report.checkpoint_size.expect("a clean report names its checkpoint");
        assert!(report.checkpoint_root.is_some());
        assert!(
            report.records_checked as u64 <= size,
            "{} records under a checkpoint of {size}",
            report.records_checked
        );
        let doc: serde_json::Value = serde_json::from_str(text).expect("a clean document is JSON");
        let note = doc.get("checkpoint").and_then(|c| c.as_str()).expect("a clean document carries its checkpoint");
        let opened = checkpoint::open(note, &host).expect("its checkpoint opens");
        assert_eq!(opened.checkpoint.size, size);
    }
});
