//! Fleets: one budget across many hosts, kept in Redis (`[fleet]` in sluice.toml; docs/fleet.md).
//!
//! Each host decides alone, as without a fleet; what the hosts share is budget accounting. A host
//! spends a passport's spend caps and rate limits from *leases* it takes from Redis ahead of need,
//! so a decision never waits on Redis while the host's lease covers it. Redis is trusted with that
//! accounting only: decisions, signatures and the attested log never depend on what Redis says.
//!
//! This module owns the connection to Redis ([`conn`]) and the key layout below. It must not touch
//! the ledger's state or records directly: what it learns reaches the log through the service's
//! typed records, like every other fact.
//!
//! # Key layout
//!
//! Every key starts with `[fleet] prefix` (default `sluice`), written `P` here; `<passport>` is a
//! passport id (`pp_…`), `<host>` a `host_id`, `<window>` a UTC window's start (`2026-12-02`,
//! `2026-W49`, `2026-12`, or a rate window's `r<seconds>-<start unix>`), `<limit>` the limit's
//! name (`cap-daily`, `cap-weekly`, `cap-monthly`, `rate-<seconds>`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:budget:<passport>:<limit>:<window>` | hash | field `<host>`: what that host may spend in the window (spent + unused lease, cents or requests); expires after the window ends |
//! | `P:epoch` | string | set when the first budget is written; its absence means Redis lost its data (restart, FLUSHALL) and hosts must re-publish their holdings |
//! | `P:hosts` | hash | field `<host>`: the unix time the host last talked to Redis |
//! | `P:checkpoint:<host>` | string | the host's latest signed checkpoint (fleet checkpoints) |
//!
//! [`Keys`] builds every one of them; nothing else formats a key.

pub mod checkpoints;
pub mod claims;
pub mod conn;
pub mod lease;

pub use conn::{Health, RedisConn};
pub use lease::{LeaseEvent, LeaseOp, Leases, Limit, Refusal, Restored, Window};

use crate::config::FleetConfig;
use std::path::PathBuf;
use std::time::Duration;

/// The longest a single Redis command may take before it counts as failed. A slow Redis must
/// never stall the request path: decisions read only the host's leases, and the background task
/// that talks to Redis gives up on a command after this long.
pub const COMMAND_TIMEOUT: Duration = Duration::from_millis(200);
/// The longest a connection attempt (TCP, TLS, AUTH) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Reconnection backoff: the first wait after a failure, doubled after each failed attempt...
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// ...up to this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A password file larger than this is not a password file.
pub const MAX_PASSWORD_FILE: u64 = 4096;
/// A CA file larger than this is not a CA file.
pub const MAX_CA_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A file named in `[fleet]` cannot be used (at start: the daemon refuses to run).
    #[error("{field} {path}: {problem}", path = .path.display())]
    File { field: &'static str, path: PathBuf, problem: String },
    /// Redis cannot be reached or did not answer in time; the host spends what its leases hold.
    #[error("fleet Redis {redis} unavailable since {since}: {error}")]
    Unavailable { redis: String, since: String, error: String },
    /// Redis answered something sluice does not understand (a wrong server, a foreign key).
    #[error("fleet Redis {redis}: unexpected answer: {problem}")]
    Protocol { redis: String, problem: String },
}

/// Builds every Redis key sluice uses (layout: module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys { prefix: prefix.to_string() }
    }

    pub fn from_config(config: &FleetConfig) -> Keys {
        Keys::new(&config.prefix)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The hash of every host's holding of one limit of one passport in one window.
    pub fn budget(&self, passport: &str, limit: &str, window: &str) -> String {
        format!("{}:budget:{passport}:{limit}:{window}", self.prefix)
    }

    /// Present while Redis holds the fleet's data; gone after a restart without persistence or a
    /// FLUSHALL.
    pub fn epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }

    /// Every host's last contact (unix seconds), by `host_id`.
    pub fn hosts(&self) -> String {
        format!("{}:hosts", self.prefix)
    }

    /// One host's latest signed checkpoint.
    pub fn checkpoint(&self, host: &str) -> String {
        format!("{}:checkpoint:{host}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        let k = Keys::new("prod.sluice");
        assert_eq!(k.budget("pp_abc", "cap-daily", "2026-12-02"), "prod.sluice:budget:pp_abc:cap-daily:2026-12-02");
        assert_eq!(k.epoch(), "prod.sluice:epoch");
        assert_eq!(k.hosts(), "prod.sluice:hosts");
        assert_eq!(k.checkpoint("web-1"), "prod.sluice:checkpoint:web-1");
        assert_eq!(k.prefix(), "prod.sluice");
    }
}
