//! [`evaluate`]: the checks of docs/decisions.md ("Order of checks") in order; [`state_view`] and [`reset`] for the state API.

use super::cel::{RuleInput, RulesOutcome};
use super::detail::{echo, list, money, window_title, Line};
use super::rate::{self, RateCheck, RatePeriod};
use super::usage::{self, SpendCounter, Usage, UsageError, WindowCounter};
use super::{
    guardrail, ActionRequest, CompiledPassport, Decision, EvalOptions, Evaluation, Guardrail, HostVerdict, Reason,
};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use sluice_passport::constraints::RuleDecision;
use sluice_passport::domain::DomainPattern;
use sluice_passport::money::MAX_MILLICENTS;
use sluice_passport::Cents;
use sluice_passport::{PassportError, SpendWindow, DEFAULT_SKEW_SECS};
use std::borrow::Cow;

/// Longest action name accepted (as long as the longest permission).
const MAX_ACTION_LEN: usize = 128;
/// Longest HTTP method accepted.
const MAX_METHOD_LEN: usize = 32;
/// Longest path accepted; only CEL rules read it.
const MAX_PATH_LEN: usize = 8192;

/// The actions that are network requests by definition (see the module doc on allowlists).
const NETWORK_ACTIONS: &[&str] = &["web:fetch", "web:send"];

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// One evaluation in progress: the guardrails so far and the usage as of `now`.
struct Run {
    window: SpendWindow,
    rolled: Usage,
    spend: WindowCounter,
    guardrails: Vec<Guardrail>,
}

impl Run {
    fn pass(&mut self, name: &'static str, detail: impl Into<Cow<'static, str>>) {
        self.guardrails.push(Guardrail { name: Cow::Borrowed(name), passed: true, detail: detail.into() });
    }

    fn stop(mut self, decision: Decision, reason: Reason, name: &'static str, detail: String) -> Evaluation {
        self.guardrails.push(Guardrail {
            name: Cow::Borrowed(name),
            passed: false,
            detail: Cow::Owned(detail.clone()),
        });
        Evaluation {
            decision,
            reason,
            detail,
            guardrails: self.guardrails,
            usage_after: self.rolled,
            rule_index: None,
            spend_window: self.window,
            spend_window_start: self.spend.start,
            spend_after_millicents: self.spend.spent_millicents,
            spend_delta_millicents: 0,
        }
    }

    fn block(self, reason: Reason, name: &'static str, detail: String) -> Evaluation {
        self.stop(Decision::Block, reason, name, detail)
    }
}

/// Decides on `req` for passport `p` at `now`, given its stored `usage` and the host-policy
/// verdict. Pure: the same inputs give the same evaluation. See the module doc for the order.
pub fn evaluate(
    p: &CompiledPassport,
    usage: &Usage,
    req: &ActionRequest,
    host: &HostVerdict,
    now: DateTime<Utc>,
    opts: EvalOptions,
) -> Evaluation {
    let claims = &p.passport.claims;
    let c = &claims.constraints;
    let window = c.window();
    if let Err(e) = usage.check_window(window) {
        return Evaluation::usage_corrupt(p, &e, now);
    }
    let rolled = usage.rolled(window, now);
    let spend = usage.spend_at(window, now);
    let daily = usage.daily_at(now);
    let mut run = Run { window, rolled, spend, guardrails: Vec::with_capacity(guardrail::ORDER.len()) };

    // 1. The request itself.
    if let Err(problem) = check_request(req) {
        return run.block(Reason::InvalidRequest, guardrail::REQUEST, problem);
    }
    run.pass(guardrail::REQUEST, "well-formed");

    // 2. The passport is within its validity period (same skew as at verification).
    let t = now.timestamp();
    let validity = if t.saturating_add(DEFAULT_SKEW_SECS) < claims.not_before {
        Err(PassportError::NotYetValid { not_before: claims.not_before, now: t, skew: DEFAULT_SKEW_SECS })
    } else if t.saturating_sub(DEFAULT_SKEW_SECS) >= claims.expires_at {
        Err(PassportError::Expired { expires_at: claims.expires_at, now: t, skew: DEFAULT_SKEW_SECS })
    } else {
        Ok(())
    };
    if let Err(e) = validity {
        let detail = match &e {
            PassportError::NotYetValid { not_before, .. } => format!(
                "Passport {} is not valid before {} (now {}). Wait, or ask its issuer for a passport valid now.",
                claims.id,
                ts_or(*not_before),
                ts(now)
            ),
            _ => format!(
                "Passport {} expired at {} (now {}). Ask its issuer for a new passport.",
                claims.id,
                ts_or(claims.expires_at),
                ts(now)
            ),
        };
        return run.block(Reason::of_passport_error(&e), guardrail::PASSPORT_VALIDITY, detail);
    }
    run.pass(guardrail::PASSPORT_VALIDITY, p.valid_until.clone());

    // 3. A permission covers the action.
    match claims.permissions.iter().find(|perm| perm.covers(&req.action)) {
        Some(perm) => {
            // Built in one exact allocation: this runs for every request.
            let (perm, covers, action) = (perm.as_str(), " covers ", req.action.as_str());
            let mut detail = String::with_capacity(perm.len() + covers.len() + action.len());
            detail.push_str(perm);
            detail.push_str(covers);
            detail.push_str(action);
            run.pass(guardrail::PERMISSION, detail)
        }
        None => {
            let detail = format!(
                "Passport {} does not permit action {:?}. Its permissions: {}. Ask its issuer for a passport with a permission covering this action.",
                claims.id,
                req.action,
                list(claims.permissions.iter().map(|p| p.as_str().to_string()))
            );
            return run.block(Reason::PermissionDenied, guardrail::PERMISSION, detail);
        }
    }

    // 4. The host is on the allowlist.
    match (&c.domain_allowlist, &req.host) {
        (None, _) => run.pass(guardrail::DOMAIN_ALLOWLIST, "no allowlist: any host"),
        (Some(allow), Some(h)) => match allow.iter().find(|pat| pat.matches(h)) {
            Some(pat) => run.pass(guardrail::DOMAIN_ALLOWLIST, {
                let (host, (star, name)) = (
                    h.as_str(),
                    match pat {
                        DomainPattern::Exact(n) => ("", n.as_str()),
                        DomainPattern::Subdomains(n) => ("*.", n.as_str()),
                    },
                );
                Line::with_capacity(host.len() + 9 + star.len() + name.len())
                    .text(host)
                    .text(" matches ")
                    .text(star)
                    .text(name)
                    .done()
            }),
            None => {
                let detail = format!(
                    "Host {} is not in the domain allowlist of passport {}: {}.",
                    echo(h.as_str()),
                    claims.id,
                    list(allow.iter().map(|p| p.to_string()))
                );
                return run.block(Reason::DomainNotAllowed, guardrail::DOMAIN_ALLOWLIST, detail);
            }
        },
        (Some(_), None) if NETWORK_ACTIONS.contains(&req.action.as_str()) => {
            let detail = format!(
                "Action {} is a network request but names no host, and passport {} allows only listed hosts. Name the target host.",
                req.action, claims.id
            );
            return run.block(Reason::DomainNotAllowed, guardrail::DOMAIN_ALLOWLIST, detail);
        }
        (Some(_), None) => run.pass(guardrail::DOMAIN_ALLOWLIST, "not applicable: the request names no host"),
    }

    // 5. The host policy's verdict.
    match host {
        HostVerdict::Allow => run.pass(guardrail::HOST_POLICY, "allowed by host policy"),
        HostVerdict::Deny { reason: r, detail } => {
            // An empty reason (a verdict built from an empty string) is the default one.
            let r = if r.as_str().is_empty() { Reason::PolicyDenied } else { r.clone() };
            return run.block(r, guardrail::HOST_POLICY, detail.clone());
        }
    }

    // 6-8. Rate limits. New limiter states are kept aside until the decision is allow.
    let mut new_rate = run.rolled.rate;
    for period in RatePeriod::ALL {
        let (name, limit, slot) = match period {
            RatePeriod::Minute => (guardrail::RATE_PER_MINUTE, c.rate_per_minute, &mut new_rate.per_minute),
            RatePeriod::Hour => (guardrail::RATE_PER_HOUR, c.rate_per_hour, &mut new_rate.per_hour),
            RatePeriod::Day => (guardrail::RATE_PER_DAY, c.rate_per_day, &mut new_rate.per_day),
        };
        let Some(limit) = limit else {
            run.pass(name, period.no_limit());
            continue;
        };
        match rate::check(slot.as_ref(), limit, period, now) {
            RateCheck::Allowed { state, remaining } => {
                *slot = Some(state);
                let left = Line::with_capacity(64).number(remaining).text(" of ").number(limit).text(" per ");
                run.pass(name, left.text(period.as_str()).text(" left after this request").done());
            }
            RateCheck::Limited { retry_at } => {
                let when = match retry_at {
                    Some(at) => {
                        format!("The next request will be allowed in {}s, at {}.", rate::seconds_until(now, at), ts(at))
                    }
                    None => "The passport allows no requests at all.".to_string(),
                };
                let detail = format!(
                    "Rate limit of {limit} requests per {} reached for passport {}. {when}",
                    period.as_str(),
                    claims.id
                );
                return run.block(Reason::RateLimitExceeded, name, detail);
            }
        }
    }

    // 9. Per-action cost.
    let cost = req.cost_millicents;
    match c.max_per_action {
        None => run.pass(guardrail::MAX_PER_ACTION, "no per-action limit"),
        Some(max) if cost > milli(max) => {
            let detail = format!("Per-action limit of {max} exceeded. Requested: {}", money(cost));
            return run.block(Reason::PerActionLimitExceeded, guardrail::MAX_PER_ACTION, detail);
        }
        Some(max) => {
            run.pass(guardrail::MAX_PER_ACTION, Line::with_capacity(40).money(cost).text(" within ").cents(max).done())
        }
    }

    // 10. Cumulative cost in the passport's window; checked arithmetic: a sum past the largest
    // amount sluice counts (so past any amount a record can hold exactly) is a refusal.
    let title = window_title(window);
    let count = |counter: &WindowCounter| counter.spent_millicents.checked_add(cost).filter(|s| *s <= MAX_MILLICENTS);
    let (Some(spend_after), Some(daily_after)) = (count(&spend), count(&daily)) else {
        let detail = format!(
            "{title} spend counter cannot count more. Current: {}, Requested: {}",
            money(spend.spent_millicents),
            money(cost)
        );
        return run.block(Reason::SpendLimitExceeded, guardrail::MAX_CUMULATIVE, detail);
    };
    match c.max_cumulative {
        None => run.pass(
            guardrail::MAX_CUMULATIVE,
            Line::with_capacity(64)
                .text("no cumulative limit; ")
                .text(title)
                .text(" spend would be ")
                .money(spend_after)
                .done(),
        ),
        Some(max) if spend_after > milli(max) => {
            let detail = format!(
                "{title} spend limit of {max} would be exceeded. Current: {}, Requested: {}",
                money(spend.spent_millicents),
                money(cost)
            );
            return run.block(Reason::SpendLimitExceeded, guardrail::MAX_CUMULATIVE, detail);
        }
        Some(max) => run.pass(
            guardrail::MAX_CUMULATIVE,
            Line::with_capacity(64)
                .text(title)
                .text(" spend would be ")
                .money(spend_after)
                .text(" of ")
                .cents(max)
                .done(),
        ),
    }

    // 11. CEL rules: the host's first (they bind every agent), then the passport's.
    if let Some(host_rules) = opts.host_rules.as_deref().filter(|r| !r.is_empty()) {
        let input = RuleInput { passport: &p.passport, request: req, window, spend, daily, now };
        match host_rules.evaluate(&input, opts.skip_approval) {
            RulesOutcome::NoMatch { .. } => {}
            RulesOutcome::Matched { index, decision, reason: r, expr } => {
                let (decision, what) = match decision {
                    RuleDecision::Block => (Decision::Block, "blocks"),
                    RuleDecision::RequestHold => (Decision::RequestHold, "holds for approval"),
                };
                let detail = format!("Host policy rule {index} ({r}) {what} this request: {}", echo(&expr));
                return run.stop(decision, Reason::parse(&r), guardrail::CEL_RULES, detail);
            }
            RulesOutcome::Error { index, reason: r, expr, message } => {
                let detail = format!(
                    "Host policy rule {index} ({r}) could not be evaluated, so the request is blocked: {}. Expression: {}",
                    echo(&message),
                    echo(&expr)
                );
                return run.block(Reason::PolicyError, guardrail::CEL_RULES, detail);
            }
        }
    }
    let rules = p.rules();
    if rules.is_empty() {
        run.pass(guardrail::CEL_RULES, "no rules");
    } else {
        let input = RuleInput { passport: &p.passport, request: req, window, spend, daily, now };
        match rules.evaluate(&input, opts.skip_approval) {
            RulesOutcome::NoMatch { evaluated } => {
                run.pass(guardrail::CEL_RULES, format!("{evaluated} of {} rules evaluated, none matched", rules.len()))
            }
            RulesOutcome::Matched { index, decision, reason: r, expr } => {
                let (decision, what) = match decision {
                    RuleDecision::Block => (Decision::Block, "blocks"),
                    RuleDecision::RequestHold => (Decision::RequestHold, "holds for approval"),
                };
                let detail = format!("Passport rule {index} ({r}) {what} this request: {}", echo(&expr));
                let mut e = run.stop(decision, Reason::parse(&r), guardrail::CEL_RULES, detail);
                e.rule_index = Some(index);
                return e;
            }
            RulesOutcome::Error { index, reason: r, expr, message } => {
                let detail = format!(
                    "Passport rule {index} ({r}) could not be evaluated, so the request is blocked: {}. Expression: {}",
                    echo(&message),
                    echo(&expr)
                );
                let mut e = run.block(Reason::PolicyError, guardrail::CEL_RULES, detail);
                e.rule_index = Some(index);
                return e;
            }
        }
    }

    // 12-13. Approval.
    let approved = "approved by an operator";
    match (c.approval_required, opts.skip_approval) {
        (Some(true), true) => run.pass(guardrail::APPROVAL_REQUIRED, approved),
        (Some(true), false) => {
            let detail = format!(
                "Passport {} requires an operator's approval for every request. Approve with `sluice holds approve`.",
                claims.id
            );
            return run.stop(Decision::RequestHold, Reason::ApprovalRequired, guardrail::APPROVAL_REQUIRED, detail);
        }
        _ => run.pass(guardrail::APPROVAL_REQUIRED, "not required"),
    }
    match c.approval_threshold {
        None => run.pass(guardrail::APPROVAL_THRESHOLD, "no approval threshold"),
        Some(th) if cost > milli(th) && opts.skip_approval => run.pass(guardrail::APPROVAL_THRESHOLD, approved),
        Some(th) if cost > milli(th) => {
            let detail = format!(
                "Cost {} is above the approval threshold of {th} of passport {}. An operator must approve it (`sluice holds approve`).",
                money(cost),
                claims.id
            );
            return run.stop(
                Decision::RequestHold,
                Reason::ApprovalThresholdExceeded,
                guardrail::APPROVAL_THRESHOLD,
                detail,
            );
        }
        Some(th) => run
            .pass(guardrail::APPROVAL_THRESHOLD, Line::with_capacity(40).money(cost).text(" within ").cents(th).done()),
    }

    // Allowed: count it.
    let detail = Line::with_capacity(112).text("All guardrails passed. ").text(title);
    let detail = detail.text(" spend after this request: ").money(spend_after);
    let detail = match c.max_cumulative {
        Some(m) => detail.text(" (limit ").cents(m).text(").").done(),
        None => detail.text(" (no limit).").done(),
    };
    let bump = |w: WindowCounter, after: u64| WindowCounter {
        start: w.start,
        spent_millicents: after,
        requests: w.requests.saturating_add(1),
    };
    let usage_after = Usage {
        version: usage::USAGE_VERSION,
        daily: Some(bump(daily, daily_after)),
        spend: Some(SpendCounter { window, counter: bump(spend, spend_after) }),
        rate: new_rate,
    };
    Evaluation {
        decision: Decision::Allow,
        reason: Reason::Allowed,
        detail,
        guardrails: run.guardrails,
        usage_after,
        rule_index: None,
        spend_window: window,
        spend_window_start: spend.start,
        spend_after_millicents: spend_after,
        spend_delta_millicents: cost,
    }
}

/// A passport limit (whole cents) in millicents. Passport amounts are at most `MAX_CENTS`, so
/// this is exact; saturating keeps a hand-built out-of-range limit from wrapping to a small one.
fn milli(limit: Cents) -> u64 {
    sluice_passport::money::from_cents_saturating(limit.0)
}

/// The detail of a passed validity check of a passport expiring at `expires_at`.
pub(crate) fn valid_until(expires_at: i64) -> String {
    format!("valid until {}", ts_or(expires_at))
}

fn ts_or(secs: i64) -> String {
    DateTime::from_timestamp(secs, 0).map_or_else(|| secs.to_string(), ts)
}

/// Checks what the caller built from agent input: bounded, and an action that could be a
/// permission's subject. Returns what is wrong.
fn check_request(req: &ActionRequest) -> Result<(), String> {
    let a = &req.action;
    let segment_ok = |s: &str| {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
    };
    if a.is_empty() || a.len() > MAX_ACTION_LEN || !a.split(':').all(segment_ok) {
        return Err(format!(
            "Action {:?} is not valid: use 1 to {MAX_ACTION_LEN} characters of a-z, 0-9, _ . - in segments joined by ':' (e.g. web:fetch).",
            echo(a)
        ));
    }
    if req.cost_millicents > MAX_MILLICENTS {
        return Err(format!(
            "Cost of {} is more than the largest amount sluice accepts ({}).",
            money(req.cost_millicents),
            money(MAX_MILLICENTS)
        ));
    }
    if let Some(m) = &req.method {
        let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if m.is_empty() || m.len() > MAX_METHOD_LEN || !m.bytes().all(tchar) {
            return Err(format!("HTTP method {:?} is not a valid method token.", echo(m)));
        }
    }
    if let Some(p) = &req.path {
        if p.len() > MAX_PATH_LEN || p.chars().any(char::is_control) {
            return Err(format!(
                "Path is longer than {MAX_PATH_LEN} bytes or contains control characters: {}",
                echo(p)
            ));
        }
    }
    Ok(())
}

/// One rate limit as the state API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RateView {
    /// `minute`, `hour` or `day`.
    pub period: &'static str,
    pub limit: u64,
    /// Requests that could be made right now.
    pub remaining: u64,
    /// When the limit is fully available again.
    pub full_at: DateTime<Utc>,
}

/// `GET /v1/passports/{id}/state`: spend and request figures as of `now`.
///
/// Spend is given twice: exactly in `*_cost_millicents`, and in whole cents in `*_cost_cents`,
/// rounded **up** (a spend of $0.00042 shows as 1 cent, never 0: rounding may not hide money).
/// Limits are whole cents, as the passport names them.
///
/// `daily_*` figures are for the current UTC day whatever the passport's window;
/// `daily_cost_limit_cents` is `core:cost:max_cumulative` only when that window is daily.
/// `daily_request_limit` is `core:rate:max_per_day`, which is enforced as a rolling 24-hour rate
/// (see [`super::rate`]) rather than per calendar day: `rate_limits` shows what is left of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateView {
    pub passport_id: String,
    /// Rounded up to a whole cent.
    pub daily_cost_cents: u64,
    /// Exact.
    pub daily_cost_millicents: u64,
    pub daily_cost_limit_cents: Option<u64>,
    pub daily_requests: u64,
    pub daily_request_limit: Option<u64>,
    pub daily_resets_at: DateTime<Utc>,
    /// The passport's cumulative window: `daily`, `weekly` or `monthly`.
    pub window: &'static str,
    pub window_start: DateTime<Utc>,
    /// Rounded up to a whole cent.
    pub window_cost_cents: u64,
    /// Exact.
    pub window_cost_millicents: u64,
    pub window_cost_limit_cents: Option<u64>,
    pub window_requests: u64,
    pub window_resets_at: DateTime<Utc>,
    pub max_per_action_cents: Option<u64>,
    pub approval_threshold_cents: Option<u64>,
    pub rate_limits: Vec<RateView>,
}

/// The state API's view of `usage` at `now`. Fails only if the usage belongs to another window.
pub fn state_view(p: &CompiledPassport, usage: &Usage, now: DateTime<Utc>) -> Result<StateView, UsageError> {
    let c = &p.passport.claims.constraints;
    let window = c.window();
    usage.check_window(window)?;
    let daily = usage.daily_at(now);
    let spend = usage.spend_at(window, now);
    let rate_limits = RatePeriod::ALL
        .into_iter()
        .filter_map(|period| {
            let (limit, state) = match period {
                RatePeriod::Minute => (c.rate_per_minute?, usage.rate.per_minute),
                RatePeriod::Hour => (c.rate_per_hour?, usage.rate.per_hour),
                RatePeriod::Day => (c.rate_per_day?, usage.rate.per_day),
            };
            Some(RateView {
                period: period.as_str(),
                limit,
                remaining: rate::remaining(state.as_ref(), limit, period, now),
                full_at: rate::full_at(state.as_ref(), limit, now),
            })
        })
        .collect();
    Ok(StateView {
        passport_id: p.id().to_string(),
        daily_cost_cents: sluice_passport::money::cents_up(daily.spent_millicents),
        daily_cost_millicents: daily.spent_millicents,
        daily_cost_limit_cents: if window == SpendWindow::Daily { c.max_cumulative.map(|m| m.0) } else { None },
        daily_requests: daily.requests,
        daily_request_limit: c.rate_per_day,
        daily_resets_at: usage::window_end(SpendWindow::Daily, daily.start),
        window: window.as_str(),
        window_start: spend.start,
        window_cost_cents: sluice_passport::money::cents_up(spend.spent_millicents),
        window_cost_millicents: spend.spent_millicents,
        window_cost_limit_cents: c.max_cumulative.map(|m| m.0),
        window_requests: spend.requests,
        window_resets_at: usage::window_end(window, spend.start),
        max_per_action_cents: c.max_per_action.map(|m| m.0),
        approval_threshold_cents: c.approval_threshold.map(|m| m.0),
        rate_limits,
    })
}

/// What `sluice state reset --window` resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetWindow {
    /// Today's spend and request count (and the cumulative budget if the passport's window is
    /// daily).
    Daily,
    /// The weekly cumulative budget (passports with a weekly window only).
    Weekly,
    /// The monthly cumulative budget (passports with a monthly window only).
    Monthly,
    /// Every counter and every rate limit.
    All,
}

impl ResetWindow {
    pub fn parse(s: &str) -> Option<ResetWindow> {
        match s {
            "daily" => Some(ResetWindow::Daily),
            "weekly" => Some(ResetWindow::Weekly),
            "monthly" => Some(ResetWindow::Monthly),
            "all" => Some(ResetWindow::All),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ResetWindow::Daily => "daily",
            ResetWindow::Weekly => "weekly",
            ResetWindow::Monthly => "monthly",
            ResetWindow::All => "all",
        }
    }
}

/// Why a reset was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResetError {
    #[error("passport {passport} counts spend per {window} window, so there is no {requested} budget to reset; use --window {window} or --window all")]
    WindowMismatch { passport: String, window: &'static str, requested: &'static str },
    #[error(transparent)]
    Usage(#[from] UsageError),
}

/// `usage` with the counters named by `what` set to zero, as of `now`. Reset counters start at the
/// current window (or stay at a later stored one, if the clock stepped back).
pub fn reset(p: &CompiledPassport, usage: &Usage, what: ResetWindow, now: DateTime<Utc>) -> Result<Usage, ResetError> {
    let window = p.passport.claims.constraints.window();
    usage.check_window(window)?;
    let mut out = usage.rolled(window, now);
    let zero = |w: Option<WindowCounter>, kind: SpendWindow| {
        let start = usage::roll(w, kind, now).start;
        Some(WindowCounter { start, spent_millicents: 0, requests: 0 })
    };
    let zero_spend = |out: &mut Usage| {
        out.spend = zero(out.spend.map(|s| s.counter), window).map(|counter| SpendCounter { window, counter })
    };
    match what {
        ResetWindow::Daily => {
            out.daily = zero(out.daily, SpendWindow::Daily);
            if window == SpendWindow::Daily {
                zero_spend(&mut out);
            }
        }
        ResetWindow::Weekly | ResetWindow::Monthly => {
            let requested = if what == ResetWindow::Weekly { SpendWindow::Weekly } else { SpendWindow::Monthly };
            if requested != window {
                return Err(ResetError::WindowMismatch {
                    passport: p.id().to_string(),
                    window: window.as_str(),
                    requested: requested.as_str(),
                });
            }
            zero_spend(&mut out);
        }
        ResetWindow::All => {
            out.daily = zero(out.daily, SpendWindow::Daily);
            zero_spend(&mut out);
            out.rate = Default::default();
        }
    }
    Ok(out)
}
