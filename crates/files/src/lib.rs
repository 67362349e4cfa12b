//! Files sluice writes and reads: [`files`] (exclusive, crash-safe creation and whole-file
//! replacement; bounded reads that refuse what is not a regular file) and [`keyfile`] (the
//! Ed25519 private and public key formats, on top of [`files`]).
//!
//! Must not: know what a key is used for (passports, the ledger, the CA), or do network I/O.

#![forbid(unsafe_code)]
// No panics in shipped code: errors are values (tests may unwrap).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

pub mod files;
pub mod keyfile;
