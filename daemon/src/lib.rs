//! sluice: provable network limits for AI agents on one Linux host.
//!
//! See ARCHITECTURE.md for the map. A request's path: `kernel` → `proxy` → `policy` → `decide` →
//! `ledger`; around it `passport`, `api`, `config`, `cli`.

#![forbid(unsafe_code)]

// The layers below the daemon, under the names the daemon's modules use.
pub use sluice_catalog as catalog;
pub use sluice_decide as decide;
pub use sluice_files::{files, keyfile};
pub use sluice_kernel as kernel;
pub use sluice_ledger as ledger;
pub use sluice_passport as passport;
pub use sluice_passport::{domain, money};
pub use sluice_policy as policy;

pub mod api;
pub mod cli;
pub mod config;
pub mod console;
pub mod discover;
pub mod dns;
pub mod fleet;
pub mod gate;
pub(crate) mod heap;
pub mod httpbody;
pub(crate) mod idle;
pub mod metrics;
pub mod proxy;
pub mod sdnotify;
pub mod service;
pub(crate) mod throttle;
pub mod tls;
pub mod unixsock;
pub mod wiring;
