//! A hold as stored in the ledger's state (`hold/<id>`): the held request, its status and how
//! it ended.
//!
//! Both the hold workflow ([`super::holds`]) and the record bodies ([`super::drafts`]) use these
//! types; this module uses neither, so the two do not depend on each other.

use super::peer::Actor;
use crate::decide::{ActionRequest, Reason};
use crate::domain::DomainName;
use crate::passport::Claims;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldStatus {
    Pending,
    Approved,
    Denied,
    TimedOut,
    Abandoned,
}

/// Who is waiting for the hold: a proxied request (gone if the daemon restarts) or an API caller
/// (passport-only mode, which asks again later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldOrigin {
    Proxy,
    Api,
}

/// The request a hold is about, as stored. The cost is millicents; a hold stored before sluice
/// counted millicents carries `cost_cents` instead and is read × 1000 (see [`StoredRequest`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(try_from = "StoredRequest")]
pub struct HeldRequest {
    pub action: String,
    pub cost_millicents: u64,
    pub host: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    /// The destination port of a raw TCP connection or a CONNECT tunnel: the approval checks
    /// that a `[[raw_tcp]]` rule still allows it. Absent for HTTP requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// A held request as either format stored it: exactly one of `cost_millicents` (now) and
/// `cost_cents` (before). Neither or both is an unreadable hold, never a free request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredRequest {
    action: String,
    #[serde(default)]
    cost_millicents: Option<u64>,
    #[serde(default)]
    cost_cents: Option<u64>,
    host: Option<String>,
    method: Option<String>,
    path: Option<String>,
    #[serde(default)]
    port: Option<u16>,
}

impl TryFrom<StoredRequest> for HeldRequest {
    type Error = String;

    fn try_from(r: StoredRequest) -> Result<HeldRequest, String> {
        let cost_millicents = match (r.cost_millicents, r.cost_cents) {
            (Some(m), None) => m,
            (None, Some(c)) => crate::money::from_cents(c)
                .ok_or_else(|| format!("cost_cents {c} is too large to count in millicents"))?,
            _ => return Err("the request needs exactly one of cost_millicents and cost_cents".to_string()),
        };
        Ok(HeldRequest {
            action: r.action,
            cost_millicents,
            host: r.host,
            method: r.method,
            path: r.path,
            port: r.port,
        })
    }
}

/// How a hold ended: when, by whom (a caller, or the daemon: `timeout`, `daemon_restart`), the
/// caller's note and the resolution's reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldResolution {
    pub at: String,
    pub by: Actor,
    pub note: Option<String>,
    pub reason: Reason,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hold {
    pub id: String,
    pub passport_id: String,
    pub agent_id: String,
    pub status: HoldStatus,
    pub origin: HoldOrigin,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub request: HeldRequest,
    /// Log index of the decision record that created the hold.
    pub record_index: u64,
    #[serde(default)]
    pub resolution: Option<HoldResolution>,
}

impl Hold {
    /// A pending hold of `request`; `port` is the destination port of a raw TCP connection or a
    /// CONNECT tunnel (see [`HeldRequest::port`]).
    pub fn new(
        claims: &Claims,
        request: &ActionRequest,
        port: Option<u16>,
        origin: HoldOrigin,
        at: DateTime<Utc>,
        timeout: Duration,
        record_index: u64,
    ) -> Hold {
        let id: [u8; 12] = rand::random();
        Hold {
            id: format!("hold_{}", crate::ledger::hex::encode(&id)),
            passport_id: claims.id.to_string(),
            agent_id: claims.agent_id.clone(),
            status: HoldStatus::Pending,
            origin,
            created_at: at,
            expires_at: at + chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::seconds(120)),
            request: HeldRequest {
                action: request.action.clone(),
                cost_millicents: request.cost_millicents,
                host: request.host.as_ref().map(|h| h.to_string()),
                method: request.method.clone(),
                path: request.path.clone(),
                port,
            },
            record_index,
            resolution: None,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Hold, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("stored hold is unreadable: {e}"))
    }

    /// The held request as the engine decides it.
    pub fn action_request(&self) -> ActionRequest {
        ActionRequest {
            action: self.request.action.clone(),
            cost_millicents: self.request.cost_millicents,
            host: self.request.host.as_deref().and_then(|h| DomainName::parse(h).ok()),
            method: self.request.method.clone(),
            path: self.request.path.clone(),
        }
    }
}
