//! Files sluice writes and reads: [`files`] (exclusive, crash-safe creation and whole-file
//! replacement; bounded reads that refuse what is not a regular file) and [`keyfile`] (the
//! Ed25519 private and public key formats, on top of [`files`]).
//!
//! Must not: know what a key is used for (passports, the ledger, the CA), or do network I/O.

pub mod files;
pub mod keyfile;
