//! sluice: provable network limits for AI agents on one Linux host.
//!
//! See ARCHITECTURE.md for the map. A request's path: `kernel` → `proxy` → `policy` → `decide` →
//! `ledger`; around it `passport`, `api`, `config`, `cli`.

pub mod api;
pub mod cli;
pub mod config;
pub mod decide;
pub mod dns;
pub mod domain;
pub mod files;
pub mod intercept;
pub mod kernel;
pub mod keyfile;
pub mod ledger;
pub mod metrics;
pub mod money;
pub mod passport;
pub mod policy;
pub mod proxy;
pub mod sdnotify;
pub mod service;
