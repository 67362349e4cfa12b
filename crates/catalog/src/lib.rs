//! Permission catalogs: what a gate offers, at what price and on what terms, as signed,
//! versioned snapshots that anyone holding the gate's public key can check offline.
//!
//! **Owns**
//! - the draft an operator edits (`catalog.toml`, [`draft`]) and its strict parsing;
//! - the typed terms of one permission (`core:pricing:*`, `core:sla:*`, ... — [`terms`]);
//! - the published snapshot: its RFC 8785 bytes, `content_hash`, the gate key's signature, and the
//!   strict reading of a snapshot fetched from somewhere else ([`snapshot`]);
//! - the version chain and the rules a client follows so a gate cannot roll it back or show two
//!   different "version 3"s ([`chain`]);
//! - the deterministic diff that says which changes break agents' terms ([`impact`]);
//! - the gate's routes, request → permission, as published ([`routes`]);
//! - the price lock: which version's price a passport pays ([`lock`]).
//!
//! **Does not touch** files other than the draft it is handed, the network, the store or the
//! clock: callers pass the time, the published history and the gate key. Logging each version in
//! the gate's Merkle log (the `catalog_published` record) and serving it are the gate's job.
//!
//! **Invariants**
//! - Money is integer millicents end to end (`sluice_passport::money`); a sub-cent price is
//!   written in a snapshot as exact decimal text (`"0.005"`), never as a binary float.
//! - A snapshot is accepted only in its canonical form: the bytes the signature covers are the
//!   RFC 8785 bytes of the received document, and the typed snapshot read from them must write
//!   back to exactly those bytes, so two readers can never see different terms under one hash.
//! - Versions start at 1, grow by one, and each names the previous one's `content_hash`.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

pub mod chain;
pub mod draft;
pub mod impact;
pub mod lock;
pub mod routes;
pub mod snapshot;
pub mod terms;

#[cfg(test)]
mod tests;

pub use chain::{ChainError, Pin};
pub use draft::{Draft, DraftError};
pub use impact::{Change, ChangeType, Impact};
pub use lock::{effective_price, Price, PriceSource};
pub use routes::Route;
pub use snapshot::{GateId, Permission, RiskLevel, SignedCatalog, Snapshot, SnapshotError};
pub use terms::Terms;
