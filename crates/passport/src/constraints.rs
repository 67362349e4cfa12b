//! Passport constraints: one Rust type per `core:` key, validated when a passport is issued and
//! again whenever one is verified.
//!
//! A constraint the verifier does not understand is an error, never ignored: an issuer who wrote
//! `core:cost:max_per_acton` (sic) believes a limit exists. The same applies to keys outside the
//! `core:` namespace, because nothing in sluice would enforce them.

use crate::domain::DomainPattern;
use serde_json::{Map, Value};
use std::fmt;

pub const MAX_PER_ACTION: &str = "core:cost:max_per_action";
pub const MAX_CUMULATIVE: &str = "core:cost:max_cumulative";
pub const CUMULATIVE_WINDOW: &str = "core:cost:cumulative_window";
pub const APPROVAL_THRESHOLD: &str = "core:cost:approval_threshold";
pub const APPROVAL_REQUIRED: &str = "core:approval:required";
pub const RATE_PER_MINUTE: &str = "core:rate:max_per_minute";
pub const RATE_PER_HOUR: &str = "core:rate:max_per_hour";
pub const RATE_PER_DAY: &str = "core:rate:max_per_day";
pub const DOMAIN_ALLOWLIST: &str = "core:scope:domain_allowlist";
pub const CEL_RULES: &str = "core:cel:rules";

/// Every key this version understands, in the order they are evaluated.
pub const KNOWN_KEYS: &[&str] = &[
    DOMAIN_ALLOWLIST,
    RATE_PER_MINUTE,
    RATE_PER_HOUR,
    RATE_PER_DAY,
    MAX_PER_ACTION,
    MAX_CUMULATIVE,
    CUMULATIVE_WINDOW,
    CEL_RULES,
    APPROVAL_THRESHOLD,
    APPROVAL_REQUIRED,
];

/// Largest amount of money a passport may name: $100 billion, far from any overflow in sums.
pub const MAX_CENTS: u64 = 10_000_000_000_000;
const MAX_DOMAINS: usize = 1024;
const MAX_CEL_RULES: usize = 64;
const MAX_CEL_EXPR_LEN: usize = 4096;
const MAX_REASON_LEN: usize = 64;

/// A constraint that is malformed, out of range or unknown: names the key and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("constraint {key}: {problem}")]
pub struct ConstraintError {
    pub key: String,
    pub problem: String,
}

fn err(key: &str, problem: impl Into<String>) -> ConstraintError {
    ConstraintError { key: key.to_string(), problem: problem.into() }
}

/// Money in integer US cents. Never a float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Cents(pub u64);

impl fmt::Display for Cents {
    /// `$1,234.05`-style without the thousands separators: `$1234.05`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${}.{:02}", self.0 / 100, self.0 % 100)
    }
}

/// The calendar window a cumulative spend limit applies to, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SpendWindow {
    #[default]
    Daily,
    Weekly,
    Monthly,
}

impl SpendWindow {
    pub fn as_str(self) -> &'static str {
        match self {
            SpendWindow::Daily => "daily",
            SpendWindow::Weekly => "weekly",
            SpendWindow::Monthly => "monthly",
        }
    }
    pub fn parse(s: &str) -> Option<SpendWindow> {
        match s {
            "daily" => Some(SpendWindow::Daily),
            "weekly" => Some(SpendWindow::Weekly),
            "monthly" => Some(SpendWindow::Monthly),
            _ => None,
        }
    }
}

/// What a CEL rule does when its expression is true. Rules can only tighten a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleDecision {
    Block,
    RequestHold,
}

impl RuleDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleDecision::Block => "block",
            RuleDecision::RequestHold => "request_hold",
        }
    }
}

/// One `core:cel:rules` entry. The expression is compiled by the decision engine when the
/// passport is registered; here only its shape is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CelRule {
    pub expr: String,
    pub decision: RuleDecision,
    pub reason: String,
}

/// The typed constraints of one passport. `None` means the passport sets no such limit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Constraints {
    pub max_per_action: Option<Cents>,
    pub max_cumulative: Option<Cents>,
    pub cumulative_window: Option<SpendWindow>,
    pub approval_threshold: Option<Cents>,
    pub approval_required: Option<bool>,
    pub rate_per_minute: Option<u64>,
    pub rate_per_hour: Option<u64>,
    pub rate_per_day: Option<u64>,
    pub domain_allowlist: Option<Vec<DomainPattern>>,
    pub cel_rules: Vec<CelRule>,
}

impl Constraints {
    /// Parses the `constraints` claim. Every key must be known and every value well-formed.
    pub fn from_json(map: &Map<String, Value>) -> Result<Constraints, ConstraintError> {
        let mut c = Constraints::default();
        for (key, value) in map {
            match key.as_str() {
                MAX_PER_ACTION => c.max_per_action = Some(cents(key, value)?),
                MAX_CUMULATIVE => c.max_cumulative = Some(cents(key, value)?),
                APPROVAL_THRESHOLD => c.approval_threshold = Some(cents(key, value)?),
                CUMULATIVE_WINDOW => {
                    let s = value.as_str().ok_or_else(|| err(key, "must be a string: daily, weekly or monthly"))?;
                    c.cumulative_window = Some(
                        SpendWindow::parse(s)
                            .ok_or_else(|| err(key, format!("unknown window {s:?}; use daily, weekly or monthly")))?,
                    );
                }
                APPROVAL_REQUIRED => {
                    c.approval_required =
                        Some(value.as_bool().ok_or_else(|| err(key, format!("must be true or false, got {value}")))?)
                }
                RATE_PER_MINUTE => c.rate_per_minute = Some(count(key, value)?),
                RATE_PER_HOUR => c.rate_per_hour = Some(count(key, value)?),
                RATE_PER_DAY => c.rate_per_day = Some(count(key, value)?),
                DOMAIN_ALLOWLIST => c.domain_allowlist = Some(domains(key, value)?),
                CEL_RULES => c.cel_rules = cel_rules(key, value)?,
                other if other.starts_with("core:") => {
                    return Err(err(key, "unknown core constraint; this sluice cannot enforce it"));
                }
                _ => {
                    return Err(err(
                        key,
                        "unknown constraint outside the core: namespace; nothing in sluice would enforce it",
                    ));
                }
            }
        }
        Ok(c)
    }

    /// The `constraints` claim as JSON, with exactly the keys that are set.
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        if let Some(v) = self.max_per_action {
            put(MAX_PER_ACTION, v.0.into());
        }
        if let Some(v) = self.max_cumulative {
            put(MAX_CUMULATIVE, v.0.into());
        }
        if let Some(v) = self.cumulative_window {
            put(CUMULATIVE_WINDOW, v.as_str().into());
        }
        if let Some(v) = self.approval_threshold {
            put(APPROVAL_THRESHOLD, v.0.into());
        }
        if let Some(v) = self.approval_required {
            put(APPROVAL_REQUIRED, v.into());
        }
        if let Some(v) = self.rate_per_minute {
            put(RATE_PER_MINUTE, v.into());
        }
        if let Some(v) = self.rate_per_hour {
            put(RATE_PER_HOUR, v.into());
        }
        if let Some(v) = self.rate_per_day {
            put(RATE_PER_DAY, v.into());
        }
        if let Some(list) = &self.domain_allowlist {
            put(DOMAIN_ALLOWLIST, list.iter().map(|p| Value::from(p.to_string())).collect());
        }
        if !self.cel_rules.is_empty() {
            let rules = self
                .cel_rules
                .iter()
                .map(|r| serde_json::json!({"expr": r.expr, "decision": r.decision.as_str(), "reason": r.reason}))
                .collect();
            put(CEL_RULES, Value::Array(rules));
        }
        m
    }

    /// The window cumulative spend is counted in (daily unless the passport says otherwise).
    pub fn window(&self) -> SpendWindow {
        self.cumulative_window.unwrap_or_default()
    }
}

fn cents(key: &str, v: &Value) -> Result<Cents, ConstraintError> {
    match v.as_u64() {
        Some(n) if n <= MAX_CENTS => Ok(Cents(n)),
        Some(n) => Err(err(key, format!("{n} cents is more than the maximum of {MAX_CENTS}"))),
        None => Err(err(key, format!("must be a non-negative whole number of cents, got {v}"))),
    }
}

fn count(key: &str, v: &Value) -> Result<u64, ConstraintError> {
    match v.as_u64() {
        Some(n) if n <= u32::MAX as u64 => Ok(n),
        _ => Err(err(key, format!("must be a whole number of requests from 0 to {}, got {v}", u32::MAX))),
    }
}

fn domains(key: &str, v: &Value) -> Result<Vec<DomainPattern>, ConstraintError> {
    let items = v.as_array().ok_or_else(|| err(key, "must be a list of host names or *.suffix patterns"))?;
    if items.len() > MAX_DOMAINS {
        return Err(err(key, format!("more than {MAX_DOMAINS} entries")));
    }
    items
        .iter()
        .map(|item| {
            let s = item.as_str().ok_or_else(|| err(key, format!("entry {item} is not a string")))?;
            DomainPattern::parse(s).map_err(|e| err(key, format!("entry {s:?}: {e}")))
        })
        .collect()
}

fn cel_rules(key: &str, v: &Value) -> Result<Vec<CelRule>, ConstraintError> {
    let items = v.as_array().ok_or_else(|| err(key, "must be a list of {expr, decision, reason} objects"))?;
    if items.len() > MAX_CEL_RULES {
        return Err(err(key, format!("more than {MAX_CEL_RULES} rules")));
    }
    let mut rules = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let obj = item.as_object().ok_or_else(|| err(key, format!("rule {i} is not an object")))?;
        if let Some(extra) = obj.keys().find(|k| !matches!(k.as_str(), "expr" | "decision" | "reason")) {
            return Err(err(key, format!("rule {i} has unknown member {extra:?}")));
        }
        let field = |name: &str| {
            obj.get(name).and_then(Value::as_str).ok_or_else(|| err(key, format!("rule {i} needs a string {name:?}")))
        };
        let expr = field("expr")?;
        if expr.trim().is_empty() || expr.len() > MAX_CEL_EXPR_LEN {
            return Err(err(key, format!("rule {i}: expr must be 1 to {MAX_CEL_EXPR_LEN} characters")));
        }
        let decision = match field("decision")? {
            "block" => RuleDecision::Block,
            "request_hold" => RuleDecision::RequestHold,
            other => {
                return Err(err(key, format!("rule {i}: decision {other:?} is not block or request_hold")));
            }
        };
        let reason = field("reason")?;
        let reason_ok = !reason.is_empty()
            && reason.len() <= MAX_REASON_LEN
            && reason.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !reason_ok {
            return Err(err(
                key,
                format!("rule {i}: reason {reason:?} must be 1 to {MAX_REASON_LEN} characters of a-z, 0-9 and _"),
            ));
        }
        rules.push(CelRule { expr: expr.to_string(), decision, reason: reason.to_string() });
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Constraints, ConstraintError> {
        Constraints::from_json(v.as_object().unwrap())
    }

    #[test]
    fn every_key_round_trips() {
        let doc = json!({
            MAX_PER_ACTION: 500, MAX_CUMULATIVE: 10000, CUMULATIVE_WINDOW: "weekly",
            APPROVAL_THRESHOLD: 2500, APPROVAL_REQUIRED: false,
            RATE_PER_MINUTE: 60, RATE_PER_HOUR: 1000, RATE_PER_DAY: 10000,
            DOMAIN_ALLOWLIST: ["api.example.com", "*.example.org"],
            CEL_RULES: [{"expr": "request.method == 'DELETE'", "decision": "block", "reason": "no_deletes"}],
        });
        let c = parse(doc.clone()).unwrap();
        assert_eq!(c.max_per_action, Some(Cents(500)));
        assert_eq!(c.window(), SpendWindow::Weekly);
        assert_eq!(c.domain_allowlist.as_ref().map(Vec::len), Some(2));
        assert_eq!(Value::Object(c.to_json()), doc);
    }

    #[test]
    fn errors_name_the_key_and_the_bad_value() {
        let cases = [
            (json!({MAX_PER_ACTION: -5}), MAX_PER_ACTION, "-5"),
            (json!({MAX_CUMULATIVE: 1.5}), MAX_CUMULATIVE, "1.5"),
            (json!({APPROVAL_THRESHOLD: "100"}), APPROVAL_THRESHOLD, "\"100\""),
            (json!({CUMULATIVE_WINDOW: "yearly"}), CUMULATIVE_WINDOW, "yearly"),
            (json!({APPROVAL_REQUIRED: "yes"}), APPROVAL_REQUIRED, "yes"),
            (json!({RATE_PER_MINUTE: -1}), RATE_PER_MINUTE, "-1"),
            (json!({DOMAIN_ALLOWLIST: ["*.com"]}), DOMAIN_ALLOWLIST, "*.com"),
            (json!({DOMAIN_ALLOWLIST: ["10.0.0.1"]}), DOMAIN_ALLOWLIST, "10.0.0.1"),
            (json!({DOMAIN_ALLOWLIST: "example.com"}), DOMAIN_ALLOWLIST, "list"),
            (json!({CEL_RULES: [{"expr": "true", "decision": "allow", "reason": "x"}]}), CEL_RULES, "allow"),
            (
                json!({CEL_RULES: [{"expr": "true", "decision": "block", "reason": "Bad Reason"}]}),
                CEL_RULES,
                "Bad Reason",
            ),
            (json!({CEL_RULES: [{"expr": "true", "decision": "block", "reason": "x", "x": 1}]}), CEL_RULES, "\"x\""),
            (json!({"core:cost:max_per_acton": 5}), "core:cost:max_per_acton", "unknown core"),
            (json!({"acme:budget": 5}), "acme:budget", "outside the core"),
        ];
        for (doc, key, needle) in cases {
            let e = parse(doc.clone()).unwrap_err();
            assert_eq!(e.key, key, "{doc}");
            assert!(e.to_string().contains(needle), "{e} should mention {needle}");
        }
    }

    #[test]
    fn money_is_bounded() {
        assert!(parse(json!({MAX_PER_ACTION: MAX_CENTS})).is_ok());
        assert!(parse(json!({MAX_PER_ACTION: MAX_CENTS + 1})).is_err());
    }

    #[test]
    fn cents_display_as_dollars() {
        assert_eq!(Cents(10050).to_string(), "$100.50");
        assert_eq!(Cents(5).to_string(), "$0.05");
    }
}
