//! The decision engine: passport constraints, counters, CEL rules and approvals → allow,
//! request_hold or block, with a stable reason and a detail a person (or an LLM agent) can act on.
//!
//! Pure and synchronous. It knows nothing of sockets, HTTP servers, the kernel or the store: the
//! daemon calls [`evaluate`] with the passport's [`Usage`] and the time *outside* its store
//! transaction, then commits the attestation record and, only if the decision is
//! [`Decision::Allow`], [`Evaluation::usage_after`] in one transaction that first checks the stored
//! usage is still the one evaluated against (and evaluates again if not). A blocked or held
//! request changes nothing.
//!
//! # Evaluation order (docs/decisions.md)
//! Each step is one [`Guardrail`] entry, in this order; the first that fails decides, and later
//! steps are not evaluated (nor listed).
//!
//! | # | guardrail | fails with |
//! |---|---|---|
//! | 1 | `request` — action syntax, cost ≤ $100 bn, method and path bounded | block `invalid_request` |
//! | 2 | `passport_validity` — `nbf` ≤ now < `exp` (± 60 s skew, as at verification) | block `passport_expired` / `passport_not_yet_valid` |
//! | 3 | `permission` — a permission covers the action | block `permission_denied` |
//! | 4 | `domain_allowlist` — `core:scope:domain_allowlist` | block `domain_not_allowed` |
//! | 5 | `host_policy` — the caller's [`HostVerdict`] | block with the verdict's reason (`policy_denied`) |
//! | 6–8 | `rate_per_minute`, `rate_per_hour`, `rate_per_day` | block `rate_limit_exceeded` |
//! | 9 | `max_per_action` — `core:cost:max_per_action` | block `per_action_limit_exceeded` |
//! | 10 | `max_cumulative` — current + requested ≤ `core:cost:max_cumulative` | block `spend_limit_exceeded` |
//! | 11 | `cel_rules` — first true rule decides; error or non-bool | rule's decision and reason / block `policy_error` |
//! | 12 | `approval_required` — `core:approval:required` | request_hold `approval_required` |
//! | 13 | `approval_threshold` — cost > `core:cost:approval_threshold` | request_hold `approval_threshold_exceeded` |
//!
//! Money is integer millicents (see [`sluice_passport::money`]): the request's cost, the counters and the
//! spend figures; passport limits (whole cents) are compared × 1000, exactly. Details print
//! dollars with the fraction (`$0.00042`).
//!
//! All passed: allow, reason `allowed`. A limit the passport does not set is a passing entry whose
//! detail says so, so the list has the same shape for every passport.
//!
//! Decisions made by the caller before or around this engine: revocation (the store knows it),
//! hold resolution (`hold_denied`, `hold_timeout`) and corrupt usage ([`Evaluation::usage_corrupt`]).
//!
//! ## Domain allowlist without a host
//! A request that names no host (passport-only mode, `sluice enforce` without `--target`) passes
//! the allowlist step, whose detail says it was not applicable, *except* for the actions
//! `web:fetch` and `web:send`, which are network requests by definition and are blocked
//! (`domain_not_allowed`) when the passport has an allowlist and the request names no host.
//! Requests through the proxy always carry a host.
//!
//! ## Approval
//! A held request that an operator approves is evaluated again with
//! [`EvalOptions::skip_approval`]: every limit is re-checked at the approval time (and the request
//! counted then), but steps 12 and 13 and CEL rules whose decision is `request_hold` pass, since
//! they ask for exactly the approval that was given. CEL `block` rules still apply.

#![forbid(unsafe_code)]
// No panics in shipped code: errors are values (tests may unwrap).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

pub mod cel;
pub mod detail;
mod engine;
pub mod rate;
pub mod reason;
pub mod settle;
pub mod usage;

pub use cel::{CompiledRules, RuleCompileError};
pub use engine::{evaluate, reset, state_view, RateView, ResetError, ResetWindow, StateView};
pub use reason::Reason;
pub use settle::{settle, Settled, SettledSpend};
pub use usage::{Usage, UsageError};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sluice_passport::domain::DomainName;
use sluice_passport::{Passport, PassportId};
use std::borrow::Cow;

/// Guardrail names, in evaluation order.
pub mod guardrail {
    pub const REQUEST: &str = "request";
    pub const PASSPORT_VALIDITY: &str = "passport_validity";
    pub const PERMISSION: &str = "permission";
    pub const DOMAIN_ALLOWLIST: &str = "domain_allowlist";
    pub const HOST_POLICY: &str = "host_policy";
    pub const RATE_PER_MINUTE: &str = "rate_per_minute";
    pub const RATE_PER_HOUR: &str = "rate_per_hour";
    pub const RATE_PER_DAY: &str = "rate_per_day";
    pub const MAX_PER_ACTION: &str = "max_per_action";
    pub const MAX_CUMULATIVE: &str = "max_cumulative";
    pub const CEL_RULES: &str = "cel_rules";
    pub const APPROVAL_REQUIRED: &str = "approval_required";
    pub const APPROVAL_THRESHOLD: &str = "approval_threshold";
    /// Only in [`super::Evaluation::usage_corrupt`].
    pub const USAGE: &str = "usage";

    /// Every name [`super::evaluate`] can list, in order.
    pub const ORDER: &[&str] = &[
        REQUEST,
        PASSPORT_VALIDITY,
        PERMISSION,
        DOMAIN_ALLOWLIST,
        HOST_POLICY,
        RATE_PER_MINUTE,
        RATE_PER_HOUR,
        RATE_PER_DAY,
        MAX_PER_ACTION,
        MAX_CUMULATIVE,
        CEL_RULES,
        APPROVAL_REQUIRED,
        APPROVAL_THRESHOLD,
    ];
}

/// One request to decide on, as the proxy (after host-policy routing) or the enforce API sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionRequest {
    /// The action, e.g. `web:fetch` or `llm:chat`: segments of `a-z 0-9 _ . -` joined by `:`.
    pub action: String,
    /// What the request costs, in millicents (0 when the host policy prices nothing).
    pub cost_millicents: u64,
    /// The normalised host, when the request goes to one.
    pub host: Option<DomainName>,
    /// The HTTP method, when known.
    pub method: Option<String>,
    /// The HTTP path (and query), when known; only CEL rules read it.
    pub path: Option<String>,
}

/// A passport with its CEL rules compiled: what the daemon caches per registered passport.
#[derive(Debug)]
pub struct CompiledPassport {
    pub passport: Passport,
    rules: CompiledRules,
    /// The passed validity check's detail (`valid until <expiry>`), formatted once: the expiry
    /// never changes.
    valid_until: String,
}

impl CompiledPassport {
    /// Compiles the passport's `core:cel:rules`. A rule that does not compile refuses the
    /// passport, with an error naming the rule's index, its expression and the compiler's message.
    pub fn compile(passport: Passport) -> Result<CompiledPassport, RuleCompileError> {
        let rules = CompiledRules::compile(&passport.claims.constraints.cel_rules)?;
        let valid_until = engine::valid_until(passport.claims.expires_at);
        Ok(CompiledPassport { passport, rules, valid_until })
    }

    pub fn id(&self) -> &PassportId {
        &self.passport.claims.id
    }

    pub fn rules(&self) -> &CompiledRules {
        &self.rules
    }
}

/// The host-policy result for this request, computed by the caller (host policies live in
/// `policy`) and passed in so that it takes its place in the evaluation order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostVerdict {
    Allow,
    /// `reason` is normally [`Reason::PolicyDenied`]; the proxy's own refusals carry theirs.
    Deny {
        reason: Reason,
        detail: String,
    },
}

/// What happens to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    RequestHold,
    Block,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::RequestHold => "request_hold",
            Decision::Block => "block",
        }
    }
}

/// One evaluated check: the API's `guardrails_evaluated` entries. Names and most details of
/// passed checks are fixed text, borrowed rather than allocated on every decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Guardrail {
    /// One of [`guardrail::ORDER`] (or a caller's own step, such as the gate's).
    pub name: Cow<'static, str>,
    pub passed: bool,
    pub detail: Cow<'static, str>,
}

/// Options for one evaluation.
#[derive(Debug, Clone, Default)]
pub struct EvalOptions {
    /// The request was held and an operator approved it: re-check every limit, but not the
    /// approval steps (see the module doc).
    pub skip_approval: bool,
    /// The host policy's `[[host.rule]]` CEL rules, compiled when the policy loaded. They bind
    /// every agent and are evaluated (same context) before the passport's own rules.
    pub host_rules: Option<std::sync::Arc<CompiledRules>>,
}

/// The decision and everything the daemon records with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    pub decision: Decision,
    /// The engine's, the host verdict's, or a CEL rule's own ([`Reason::Rule`]).
    pub reason: Reason,
    /// For people: which limit, the figures, what to do.
    pub detail: String,
    /// Each check evaluated, in order; the last one failed unless the decision is allow.
    pub guardrails: Vec<Guardrail>,
    /// The usage to store. For allow it counts this request; otherwise it is the input usage
    /// rolled to the current windows, and need not (must not, for corrupt usage) be stored. Use
    /// [`Evaluation::usage_to_persist`] to get it only when it should be stored.
    pub usage_after: Usage,
    /// Index in `core:cel:rules` of the rule that decided, if one did (matched or failed).
    pub rule_index: Option<usize>,
    /// The passport's cumulative window, its start, the spend in it after this decision, and
    /// what this decision added (0 unless allowed), in millicents: for the attestation record.
    pub spend_window: sluice_passport::SpendWindow,
    pub spend_window_start: DateTime<Utc>,
    pub spend_after_millicents: u64,
    pub spend_delta_millicents: u64,
}

impl Evaluation {
    /// Did every guardrail pass (the API's `all_passed`)? True exactly for allow.
    pub fn all_passed(&self) -> bool {
        self.guardrails.iter().all(|g| g.passed)
    }

    /// The usage to store with this decision: `Some` only for allow.
    pub fn usage_to_persist(&self) -> Option<&Usage> {
        (self.decision == Decision::Allow).then_some(&self.usage_after)
    }

    /// The decision when the passport's stored usage cannot be read: block, reason
    /// `usage_corrupt`, whatever the request. Budgets are never reset to get past a corrupt
    /// record; an operator repairs it (`sluice state reset`, which is attested). Spend figures are
    /// unknown and reported as 0.
    pub fn usage_corrupt(p: &CompiledPassport, error: &UsageError, now: DateTime<Utc>) -> Evaluation {
        let window = p.passport.claims.constraints.window();
        let detail = format!(
            "The usage record of passport {} cannot be read ({error}). Requests are blocked until an operator resets it with `sluice state reset {} --window all`.",
            p.id(),
            p.id()
        );
        Evaluation {
            decision: Decision::Block,
            reason: error.reason(),
            detail: detail.clone(),
            guardrails: vec![Guardrail {
                name: Cow::Borrowed(guardrail::USAGE),
                passed: false,
                detail: Cow::Owned(detail),
            }],
            usage_after: Usage::default(),
            rule_index: None,
            spend_window: window,
            spend_window_start: usage::window_start(window, now),
            spend_after_millicents: 0,
            spend_delta_millicents: 0,
        }
    }
}

#[cfg(test)]
mod tests;
