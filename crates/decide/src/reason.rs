//! Every stable decision reason, in one type.
//!
//! A reason is what the API's `reason` field, a record's `reason`, the `Sluice-Decision` header
//! and the metrics' `reason` label carry. [`Reason::as_str`] is the one place each string is
//! spelled; serde and `Display` use it, so the JSON is exactly the string. Reasons come from the
//! engine, from the daemon around it (revocation, holds, the store), from the proxy's own
//! refusals, and from CEL rules, whose reasons are their authors' ([`Reason::Rule`]).
//!
//! [`Reason::parse`] reads one back (from a stored record, say): a known string gives its variant
//! and anything else is kept as [`Reason::Rule`], never an error or a panic. Equality is by the
//! string, so `Rule("policy_denied")` equals `PolicyDenied`.

use std::fmt;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A stable decision reason. See the module doc.
#[derive(Debug, Clone)]
pub enum Reason {
    // The engine, in evaluation order (docs/decisions.md).
    /// Every guardrail passed.
    Allowed,
    /// The request itself is malformed (action syntax, cost bound, method or path size).
    InvalidRequest,
    PassportExpired,
    PassportNotYetValid,
    PermissionDenied,
    DomainNotAllowed,
    /// A host policy denies the request (the default reason of a host verdict).
    PolicyDenied,
    RateLimitExceeded,
    PerActionLimitExceeded,
    SpendLimitExceeded,
    /// A CEL rule failed to evaluate or did not return a bool.
    PolicyError,
    ApprovalRequired,
    ApprovalThresholdExceeded,
    /// The passport's stored counters cannot be read.
    UsageCorrupt,

    // Around the engine: the passport, the store, holds.
    PassportUnknown,
    PassportRevoked,
    /// An operator's emergency stop (`sluice stop`) covers the passport.
    EmergencyStop,
    PassportInvalid,
    IssuerUntrusted,
    /// The passport's state could not be read or written.
    StateError,
    HoldApproved,
    HoldDenied,
    HoldTimeout,
    /// The daemon stopped while the request was held.
    HoldAbandoned,
    /// `[fleet]`: the request does not fit in this host's budget leases and no lease could be
    /// had (Redis down or slow, or recovering from a data loss).
    FleetUnavailable,
    /// A resolved hold whose stored resolution names no reason.
    HoldResolved,

    // The proxy's own refusals, decided as a host-policy denial with this reason.
    DomainFronting,
    RequestSmuggling,
    InvalidHost,
    ConnectDenied,
    UpgradeDenied,
    MalformedRequest,
    RawTcpDenied,
    ProxyLoop,
    UnknownSyntheticAddress,
    BadServerName,
    /// A request body to a gate larger than the daemon signs (`[gates] max_body_bytes`).
    GateBodyTooLarge,
    /// The proxy's answer when no decision could be made (a store failure): never recorded.
    DecisionFailed,

    // A gate's own (docs/gate.md): the request's signature, its passport, the anonymous subset.
    /// The request's HTTP message signature, its key or its `Content-Digest` does not verify.
    SignatureInvalid,
    /// The gate's trust level needs a signed request and this one is not signed.
    SignatureRequired,
    /// The signature's `created` is outside the accepted window.
    SignatureExpired,
    /// The signature's nonce was already used by this passport within the window.
    Replay,
    /// The passport's issuer is not pinned (or not verified, at L3) by the gate.
    IssuerNotTrusted,
    /// No passport, on a route outside the anonymous subset.
    PassportRequired,
    /// Served without a passport: the route is in the anonymous subset.
    AnonymousAllowed,
    /// The gate's catalog in force does not offer the permission the request needs (or the
    /// gate has published no catalog yet).
    PermissionNotOffered,

    /// A CEL rule's own reason (its author's `a-z 0-9 _` string), or a string read back that
    /// names no reason above.
    Rule(String),
}

/// Every variant without data, for [`Reason::parse`] and the tests.
const FIXED: &[Reason] = &[
    Reason::Allowed,
    Reason::InvalidRequest,
    Reason::PassportExpired,
    Reason::PassportNotYetValid,
    Reason::PermissionDenied,
    Reason::DomainNotAllowed,
    Reason::PolicyDenied,
    Reason::RateLimitExceeded,
    Reason::PerActionLimitExceeded,
    Reason::SpendLimitExceeded,
    Reason::PolicyError,
    Reason::ApprovalRequired,
    Reason::ApprovalThresholdExceeded,
    Reason::UsageCorrupt,
    Reason::PassportUnknown,
    Reason::PassportRevoked,
    Reason::EmergencyStop,
    Reason::PassportInvalid,
    Reason::IssuerUntrusted,
    Reason::StateError,
    Reason::HoldApproved,
    Reason::HoldDenied,
    Reason::HoldTimeout,
    Reason::HoldAbandoned,
    Reason::FleetUnavailable,
    Reason::HoldResolved,
    Reason::DomainFronting,
    Reason::RequestSmuggling,
    Reason::InvalidHost,
    Reason::ConnectDenied,
    Reason::UpgradeDenied,
    Reason::MalformedRequest,
    Reason::RawTcpDenied,
    Reason::ProxyLoop,
    Reason::UnknownSyntheticAddress,
    Reason::BadServerName,
    Reason::GateBodyTooLarge,
    Reason::DecisionFailed,
    Reason::SignatureInvalid,
    Reason::SignatureRequired,
    Reason::SignatureExpired,
    Reason::Replay,
    Reason::IssuerNotTrusted,
    Reason::PassportRequired,
    Reason::AnonymousAllowed,
    Reason::PermissionNotOffered,
];

impl Reason {
    /// The stable string: what the API, the records, the header and the metrics carry.
    pub fn as_str(&self) -> &str {
        match self {
            Reason::Allowed => "allowed",
            Reason::InvalidRequest => "invalid_request",
            Reason::PassportExpired => "passport_expired",
            Reason::PassportNotYetValid => "passport_not_yet_valid",
            Reason::PermissionDenied => "permission_denied",
            Reason::DomainNotAllowed => "domain_not_allowed",
            Reason::PolicyDenied => "policy_denied",
            Reason::RateLimitExceeded => "rate_limit_exceeded",
            Reason::PerActionLimitExceeded => "per_action_limit_exceeded",
            Reason::SpendLimitExceeded => "spend_limit_exceeded",
            Reason::PolicyError => "policy_error",
            Reason::ApprovalRequired => "approval_required",
            Reason::ApprovalThresholdExceeded => "approval_threshold_exceeded",
            Reason::UsageCorrupt => "usage_corrupt",
            Reason::PassportUnknown => "passport_unknown",
            Reason::PassportRevoked => "passport_revoked",
            Reason::EmergencyStop => "emergency_stop",
            Reason::PassportInvalid => "passport_invalid",
            Reason::IssuerUntrusted => "issuer_untrusted",
            Reason::StateError => "state_error",
            Reason::HoldApproved => "hold_approved",
            Reason::HoldDenied => "hold_denied",
            Reason::HoldTimeout => "hold_timeout",
            Reason::HoldAbandoned => "hold_abandoned",
            Reason::FleetUnavailable => "fleet_unavailable",
            Reason::HoldResolved => "hold_resolved",
            Reason::DomainFronting => "domain_fronting",
            Reason::RequestSmuggling => "request_smuggling",
            Reason::InvalidHost => "invalid_host",
            Reason::ConnectDenied => "connect_denied",
            Reason::UpgradeDenied => "upgrade_denied",
            Reason::MalformedRequest => "malformed_request",
            Reason::RawTcpDenied => "raw_tcp_denied",
            Reason::ProxyLoop => "proxy_loop",
            Reason::UnknownSyntheticAddress => "unknown_synthetic_address",
            Reason::BadServerName => "bad_server_name",
            Reason::GateBodyTooLarge => "gate_body_too_large",
            Reason::DecisionFailed => "decision_failed",
            Reason::SignatureInvalid => "signature_invalid",
            Reason::SignatureRequired => "signature_required",
            Reason::SignatureExpired => "signature_expired",
            Reason::Replay => "replay",
            Reason::IssuerNotTrusted => "issuer_not_trusted",
            Reason::PassportRequired => "passport_required",
            Reason::AnonymousAllowed => "anonymous_allowed",
            Reason::PermissionNotOffered => "permission_not_offered",
            Reason::Rule(s) => s,
        }
    }

    /// Reads a reason back. Known strings give their variant; anything else (a CEL rule's
    /// reason, or a string from a newer or damaged record) is kept verbatim as [`Reason::Rule`].
    pub fn parse(s: &str) -> Reason {
        FIXED.iter().find(|r| r.as_str() == s).cloned().unwrap_or_else(|| Reason::Rule(s.to_string()))
    }

    /// The reason of a passport that fails verification or validity
    /// ([`sluice_passport::PassportError::reason`]).
    pub fn of_passport_error(e: &sluice_passport::PassportError) -> Reason {
        Reason::parse(e.reason())
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for Reason {
    fn eq(&self, other: &Reason) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Reason {}

impl Hash for Reason {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl PartialEq<str> for Reason {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for Reason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Reason {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Reason, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        Ok(Reason::parse(&s))
    }
}

impl From<&str> for Reason {
    fn from(s: &str) -> Reason {
        Reason::parse(s)
    }
}

impl From<String> for Reason {
    fn from(s: String) -> Reason {
        Reason::parse(&s)
    }
}

impl From<Reason> for serde_json::Value {
    fn from(r: Reason) -> serde_json::Value {
        serde_json::Value::String(r.as_str().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fixed_reason_round_trips_and_strings_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for r in FIXED {
            assert!(seen.insert(r.as_str()), "{} spelled twice", r.as_str());
            assert!(!matches!(Reason::parse(r.as_str()), Reason::Rule(_)), "{r:?}");
            assert_eq!(serde_json::to_string(r).unwrap(), format!("\"{}\"", r.as_str()));
            let back: Reason = serde_json::from_str(&serde_json::to_string(r).unwrap()).unwrap();
            assert_eq!(&back, r);
            assert_eq!(r.to_string(), r.as_str());
        }
    }

    #[test]
    fn unknown_strings_are_kept_not_refused() {
        for s in ["training_needs_approval", "", "Ünïcode", "x; evil=1\r\n"] {
            let r = Reason::parse(s);
            assert_eq!(r, Reason::Rule(s.to_string()));
            assert_eq!(r.as_str(), s);
            let back: Reason = serde_json::from_value(serde_json::json!(s)).unwrap();
            assert_eq!(back.as_str(), s);
        }
        // A rule whose reason is a built-in string is that reason.
        assert_eq!(Reason::Rule("policy_denied".into()), Reason::PolicyDenied);
        assert!(serde_json::from_value::<Reason>(serde_json::json!(7)).is_err());
    }

    #[test]
    fn today_s_strings_are_unchanged() {
        let pairs = [
            (Reason::Allowed, "allowed"),
            (Reason::SpendLimitExceeded, "spend_limit_exceeded"),
            (Reason::DomainNotAllowed, "domain_not_allowed"),
            (Reason::UnknownSyntheticAddress, "unknown_synthetic_address"),
            (Reason::HoldAbandoned, "hold_abandoned"),
            (Reason::ApprovalThresholdExceeded, "approval_threshold_exceeded"),
        ];
        for (r, s) in pairs {
            assert_eq!(r, s);
        }
    }
}
