//! The gate's records (docs/records.md, "Gate records"): one per decision, in the gate's own log.
//!
//! A decision on a verified passport goes on that passport's chain and carries the passport's
//! spend fields, which `sluice audit verify` recomputes like the daemon's. Requests without a
//! verified passport go on the chain `anonymous` (served without one, or refused for lack of
//! one) or `unverified` (a passport or signature that did not verify: who sent it is not known,
//! so the unverified claims are not written).

use crate::decide::{Decision, Reason};
use crate::ledger::canonical::Members;
use crate::ledger::record::{
    FIELD_COST, FIELD_KIND, FIELD_SPEND_AFTER, FIELD_SPEND_DELTA, FIELD_SPEND_WINDOW, FIELD_SPEND_WINDOW_START,
    FIELD_TIME, FIELD_VERSION, RECORD_VERSION,
};
use crate::ledger::Draft;
use crate::passport::Claims;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

pub const KIND_GATE_DECISION: &str = "gate_decision";
pub const CHAIN_ANONYMOUS: &str = "anonymous";
pub const CHAIN_UNVERIFIED: &str = "unverified";

/// The fields of a gate record, shared with `sluice audit link`.
pub mod field {
    pub const GATE_ID: &str = "gate_id";
    pub const GATE: &str = "gate";
    pub const REQUEST_HASH: &str = "request_hash";
    pub const PASSPORT_ID: &str = "passport_id";
    pub const ISSUER: &str = "issuer";
    pub const AGENT_ID: &str = "agent_id";
    pub const PERMISSION: &str = "permission";
    pub const DECISION: &str = "decision";
    pub const REASON: &str = "reason";
    pub const DETAIL: &str = "detail";
    pub const METHOD: &str = "method";
    pub const HOST: &str = "host";
    pub const PATH_DIGEST: &str = "path_digest";
    pub const TRUST_TIER: &str = "trust_tier";
    pub const SIGNED: &str = "signed";
    pub const CATALOG_VERSION: &str = "catalog_version";
    pub const PRICE_CENTS: &str = "price_cents";
    pub const PRICE_MILLICENTS: &str = "price_millicents";
}

/// What a call costs by the catalog: the version whose price is paid (the one in force, or the
/// passport's locked one when cheaper) and the price with the platform fee, in millicents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub catalog_version: u64,
    pub price_millicents: u64,
}

/// The spend figures of a passport's own window after a decision.
#[derive(Debug, Clone)]
pub struct Spend {
    pub window: &'static str,
    pub window_start: DateTime<Utc>,
    pub delta_millicents: u64,
    pub after_millicents: u64,
}

/// One gate decision, as recorded.
#[derive(Debug, Clone)]
pub struct GateRecord<'a> {
    pub gate_id: &'a str,
    pub gate: &'a str,
    pub claims: Option<&'a Claims>,
    pub permission: &'a str,
    pub method: &'a str,
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub request_hash: Option<&'a str>,
    pub signed: bool,
    pub trust_tier: Option<&'static str>,
    pub decision: Decision,
    pub reason: &'a Reason,
    pub detail: &'a str,
    pub cost_millicents: u64,
    pub charge: Option<Charge>,
    pub spend: Option<Spend>,
    pub at: DateTime<Utc>,
}

impl GateRecord<'_> {
    pub fn chain(&self) -> String {
        match self.claims {
            Some(c) => c.id.as_str().to_string(),
            None if matches!(self.reason, Reason::AnonymousAllowed | Reason::PassportRequired) => {
                CHAIN_ANONYMOUS.into()
            }
            None => CHAIN_UNVERIFIED.into(),
        }
    }

    pub fn draft(&self) -> Draft {
        let mut m = Members::with_capacity(24, 1024 + self.detail.len());
        m.uint(FIELD_VERSION, RECORD_VERSION)
            .str(FIELD_KIND, KIND_GATE_DECISION)
            .time(FIELD_TIME, &self.at)
            .str(field::GATE_ID, self.gate_id)
            .str(field::GATE, self.gate)
            .opt_str(field::REQUEST_HASH, self.request_hash)
            .str(field::PERMISSION, self.permission)
            .str(field::METHOD, self.method)
            .opt_str(field::HOST, self.host)
            .str(field::PATH_DIGEST, &crate::ledger::hex::encode(&Sha256::digest(self.path.as_bytes())))
            .bool(field::SIGNED, self.signed)
            .str(field::DECISION, self.decision.as_str())
            .str(field::REASON, self.reason.as_str())
            .str(field::DETAIL, self.detail)
            .uint(FIELD_COST, self.cost_millicents);
        if let Some(c) = self.claims {
            m.str(field::PASSPORT_ID, c.id.as_str())
                .str(field::ISSUER, c.issuer.as_str())
                .str(field::AGENT_ID, &c.agent_id);
        }
        if let Some(c) = self.charge {
            m.uint(field::CATALOG_VERSION, c.catalog_version)
                .str(field::PRICE_CENTS, &crate::money::cents_text(c.price_millicents))
                .uint(field::PRICE_MILLICENTS, c.price_millicents);
        }
        if let Some(t) = self.trust_tier {
            m.str(field::TRUST_TIER, t);
        }
        if let Some(s) = &self.spend {
            m.str(FIELD_SPEND_WINDOW, s.window)
                .time(FIELD_SPEND_WINDOW_START, &s.window_start)
                .uint(FIELD_SPEND_DELTA, s.delta_millicents)
                .uint(FIELD_SPEND_AFTER, s.after_millicents);
        }
        Draft::new(self.chain(), m)
    }
}
