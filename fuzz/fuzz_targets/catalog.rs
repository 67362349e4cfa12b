//! Catalogs: the draft parser (`sluice_catalog::Draft::parse`, operator TOML) and the reader of a
//! served catalog (`SignedCatalog::parse`, hostile JSON from a gate).
//!
//! The input is a draft and a served document separated by `0xff`. Checks, beyond "never panics":
//! * a draft error list is never empty and every problem names the file and a line within it (or 0),
//!   with a column exactly when it has a line; parsing is deterministic;
//! * a draft that parses publishes as version 1, signs, and the served form reads back to exactly
//!   the same catalog (hash, signature, terms), and any one changed byte of it is refused or reads
//!   back to the same bytes;
//! * the served document, read against the fixed key, is either refused or, once accepted,
//!   writes back to exactly the bytes its hash covers.
#![no_main]

use chrono::DateTime;
use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use sluice_catalog::{Draft, GateId, SignedCatalog, Snapshot};
use sluice_passport::TrustTier;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(2, |b| *b == 0xff);
    let draft_text = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let served = parts.next().unwrap_or_default();
    let key = SigningKey::from_bytes(&[42; 32]);

    let file = Path::new("/fuzz/catalog.toml");
    match Draft::parse(file, &draft_text) {
        Err(e) => {
            assert!(!e.0.is_empty(), "failed without a problem");
            for p in &e.0 {
                assert_eq!(p.file, file);
                assert!(p.line <= draft_text.lines().count() + 1, "line {} past the end: {p}", p.line);
                assert_eq!(p.line == 0, p.column == 0, "{p}");
                assert!(!p.message.is_empty());
            }
            assert_eq!(Draft::parse(file, &draft_text).unwrap_err(), e);
        }
        Ok(d) => {
            let t = DateTime::from_timestamp(1_800_000_000, 0).expect("a time");
            let id = GateId::from_key(&key.verifying_key());
            let signed = Snapshot::next(None, id, d.permissions, Vec::new(), TrustTier::L2, "fuzz", t, t)
                .expect("a parsed draft publishes")
                .sign(&key)
                .expect("and signs");
            let bytes = serde_json::to_vec(&signed.to_json()).expect("serialises");
            let back = SignedCatalog::parse(&bytes, &key.verifying_key()).expect("reads back");
            assert_eq!(back, signed);
            if !bytes.is_empty() {
                let mut flipped = bytes.clone();
                let i = draft_text.len() % flipped.len();
                flipped[i] ^= 0x01;
                if let Ok(c) = SignedCatalog::parse(&flipped, &key.verifying_key()) {
                    assert_eq!(c.canonical, signed.canonical, "a changed byte changed the terms");
                }
            }
        }
    }

    if let Ok(c) = SignedCatalog::parse(served, &key.verifying_key()) {
        assert_eq!(c.snapshot.canonical_bytes().expect("canonical"), c.canonical);
    }
});
