//! The terms of one permission: the `core:` keys a catalog may set, one Rust field each.
//!
//! Unknown keys are refused rather than carried along: a term sluice does not understand could
//! not be priced, diffed or locked, and an agent would be bound by something nobody checks.

use serde_json::{Map, Value};
use sluice_passport::money;

pub const PER_CALL_CENTS: &str = "core:pricing:per_call_cents";
pub const PRICING_MODEL: &str = "core:pricing:model";
pub const UPTIME_BASIS_POINTS: &str = "core:sla:uptime_basis_points";
pub const RESPONSE_TIME_MS: &str = "core:sla:response_time_ms";
pub const RATE_MAX_PER_MINUTE: &str = "core:rate:max_per_minute";
pub const APPROVAL_REQUIRED: &str = "core:approval:required";
pub const APPROVAL_THRESHOLD: &str = "core:cost:approval_threshold";
pub const PLATFORM_FEE_BASIS_POINTS: &str = "core:platform_fee:basis_points";

/// Every key a catalog permission may carry, in the order `--help` and the docs list them.
pub const KEYS: &[&str] = &[
    PER_CALL_CENTS,
    PRICING_MODEL,
    UPTIME_BASIS_POINTS,
    RESPONSE_TIME_MS,
    RATE_MAX_PER_MINUTE,
    APPROVAL_REQUIRED,
    APPROVAL_THRESHOLD,
    PLATFORM_FEE_BASIS_POINTS,
];

/// 100.00 %: the bound of uptime and of a fee in basis points.
pub const MAX_BASIS_POINTS: u64 = 10_000;
/// A price or threshold above $10,000 a call is a typo, not a price.
pub const MAX_PRICE_MILLICENTS: u64 = 1_000_000 * money::PER_CENT;
/// Upper bounds of the other numbers, so every value fits RFC 8785 exactly and stays sane.
pub const MAX_RESPONSE_TIME_MS: u64 = 86_400_000;
pub const MAX_RATE_PER_MINUTE: u64 = 1_000_000;

/// How a permission is priced. Only per call today; the key exists so a later model is a new
/// value, not a silent reinterpretation of `per_call_cents`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PricingModel {
    PerCall,
}

/// The terms of one permission. `None` means the catalog does not set the term.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Terms {
    /// The price of one call, before the platform fee. `None` is free.
    pub per_call_millicents: Option<u64>,
    pub pricing_model: Option<PricingModel>,
    pub uptime_basis_points: Option<u64>,
    pub response_time_ms: Option<u64>,
    pub rate_max_per_minute: Option<u64>,
    pub approval_required: Option<bool>,
    pub approval_threshold_millicents: Option<u64>,
    pub platform_fee_basis_points: Option<u64>,
}

/// A value of a term, before it is checked: what both the TOML draft and a JSON snapshot reduce
/// to. `Decimal` keeps the exact text of a number with a fraction.
#[derive(Debug, Clone, PartialEq)]
pub enum Raw<'a> {
    Int(i64),
    Decimal(&'a str),
    Str(&'a str),
    Bool(bool),
    Other(&'static str),
}

impl Terms {
    /// Sets `key` from `raw`; the error says what the key accepts.
    pub fn set(&mut self, key: &str, raw: Raw<'_>) -> Result<(), String> {
        match key {
            PER_CALL_CENTS => self.per_call_millicents = Some(cents(raw)?),
            APPROVAL_THRESHOLD => self.approval_threshold_millicents = Some(cents(raw)?),
            PRICING_MODEL => match raw {
                Raw::Str("per_call") => self.pricing_model = Some(PricingModel::PerCall),
                _ => return Err("must be \"per_call\" (the only pricing model)".into()),
            },
            UPTIME_BASIS_POINTS => self.uptime_basis_points = Some(whole(raw, MAX_BASIS_POINTS, "basis points")?),
            PLATFORM_FEE_BASIS_POINTS => {
                self.platform_fee_basis_points = Some(whole(raw, MAX_BASIS_POINTS, "basis points")?)
            }
            RESPONSE_TIME_MS => self.response_time_ms = Some(whole(raw, MAX_RESPONSE_TIME_MS, "milliseconds")?),
            RATE_MAX_PER_MINUTE => {
                let n = whole(raw, MAX_RATE_PER_MINUTE, "calls a minute")?;
                if n == 0 {
                    return Err("must be at least 1 (remove the permission to offer none)".into());
                }
                self.rate_max_per_minute = Some(n)
            }
            APPROVAL_REQUIRED => match raw {
                Raw::Bool(b) => self.approval_required = Some(b),
                _ => return Err("must be true or false".into()),
            },
            other => return Err(format!("{other:?} is not a catalog term (known: {})", KEYS.join(", "))),
        }
        Ok(())
    }

    /// The terms as the JSON object a snapshot carries: money as exact decimal text of cents.
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put(PER_CALL_CENTS, self.per_call_millicents.map(|c| Value::String(money::cents_text(c))));
        put(PRICING_MODEL, self.pricing_model.map(|_| Value::String("per_call".into())));
        put(UPTIME_BASIS_POINTS, self.uptime_basis_points.map(Value::from));
        put(RESPONSE_TIME_MS, self.response_time_ms.map(Value::from));
        put(RATE_MAX_PER_MINUTE, self.rate_max_per_minute.map(Value::from));
        put(APPROVAL_REQUIRED, self.approval_required.map(Value::Bool));
        put(APPROVAL_THRESHOLD, self.approval_threshold_millicents.map(|c| Value::String(money::cents_text(c))));
        put(PLATFORM_FEE_BASIS_POINTS, self.platform_fee_basis_points.map(Value::from));
        m
    }

    /// Reads the terms of a snapshot (`to_json`'s form), refusing unknown keys and other types.
    pub fn from_json(obj: &Map<String, Value>) -> Result<Terms, String> {
        let mut t = Terms::default();
        for (k, v) in obj {
            let raw = match v {
                Value::Bool(b) => Raw::Bool(*b),
                Value::String(s) => Raw::Str(s),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => Raw::Int(i),
                    None => Raw::Other("a number that is not a whole number"),
                },
                Value::Null => Raw::Other("null"),
                Value::Array(_) => Raw::Other("an array"),
                Value::Object(_) => Raw::Other("an object"),
            };
            // In a snapshot money is always decimal text, never a JSON number.
            let raw = match (k.as_str(), raw) {
                (PER_CALL_CENTS | APPROVAL_THRESHOLD, Raw::Str(s)) => Raw::Decimal(s),
                (PER_CALL_CENTS | APPROVAL_THRESHOLD, _) => {
                    return Err(format!("{k}: must be a string of cents such as \"2\" or \"0.005\""))
                }
                (_, Raw::Str(s)) if k != PRICING_MODEL => {
                    return Err(format!("{k}: must not be a string (got {s:?})"));
                }
                (_, r) => r,
            };
            t.set(k, raw).map_err(|e| format!("{k}: {e}"))?;
        }
        Ok(t)
    }

    /// The price of one call with the platform fee, if the permission has one.
    pub fn price(&self) -> crate::lock::Price {
        crate::lock::Price {
            per_call_millicents: self.per_call_millicents.unwrap_or(0),
            fee_basis_points: self.platform_fee_basis_points.unwrap_or(0),
        }
    }
}

fn cents(raw: Raw<'_>) -> Result<u64, String> {
    let bad = |got: String| {
        format!(
            "must be an amount of cents from 0 to {}, whole or with up to three decimals (got {got})",
            money::cents_text(MAX_PRICE_MILLICENTS)
        )
    };
    match raw {
        Raw::Int(i) => u64::try_from(i)
            .ok()
            .and_then(money::from_cents)
            .filter(|m| *m <= MAX_PRICE_MILLICENTS)
            .ok_or_else(|| bad(i.to_string())),
        Raw::Decimal(text) => {
            let m = money::parse_cents(text, MAX_PRICE_MILLICENTS).map_err(|e| bad(e.to_string()))?;
            Ok(m)
        }
        Raw::Str(s) => Err(bad(format!("the string {s:?}"))),
        Raw::Bool(b) => Err(bad(b.to_string())),
        Raw::Other(what) => Err(bad(what.to_string())),
    }
}

fn whole(raw: Raw<'_>, max: u64, unit: &str) -> Result<u64, String> {
    match raw {
        Raw::Int(i) => u64::try_from(i)
            .ok()
            .filter(|n| *n <= max)
            .ok_or_else(|| format!("must be a whole number of {unit} from 0 to {max} (got {i})")),
        Raw::Decimal(t) => Err(format!("must be a whole number of {unit} (got {t})")),
        Raw::Str(s) => Err(format!("must be a whole number of {unit} (got the string {s:?})")),
        Raw::Bool(b) => Err(format!("must be a whole number of {unit} (got {b})")),
        Raw::Other(what) => Err(format!("must be a whole number of {unit} (got {what})")),
    }
}
