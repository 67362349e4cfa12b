//! The TOML shape of a policy file, as deserialised before validation. Every value an error may
//! point at is `Spanned`, so that semantic errors carry the line of the value at fault; every table
//! refuses unknown keys. The meaning of each field is documented in `policy/mod.rs`.

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFile {
    pub service: Option<Spanned<RawService>>,
    #[serde(default)]
    pub route: Vec<Spanned<RawRoute>>,
    pub prices: Option<Spanned<RawPrices>>,
    /// Not `Spanned`: toml 0.8 cannot span a table that exists only through a dotted header
    /// (`[host.ceilings]` with no `[host]`), and nothing points at `[host]` itself.
    pub host: Option<RawHost>,
    #[serde(default)]
    pub raw_tcp: Vec<Spanned<RawTcp>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawService {
    pub name: Spanned<String>,
    pub domains: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    #[allow(dead_code)] // documentation for the reader of the file
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub id: Option<Spanned<String>>,
    pub method: Spanned<String>,
    pub path: Spanned<String>,
    pub action: Spanned<String>,
    pub cost_cents: Option<Spanned<Number>>,
    pub meter: Option<Spanned<RawMeter>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMeter {
    pub kind: Spanned<String>,
    pub default_max_tokens: Spanned<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPrices {
    pub as_of: Spanned<String>,
    pub source: Option<Spanned<String>>,
    pub unknown_model: Option<Spanned<String>>,
    #[serde(default)]
    pub model: Vec<Spanned<RawModelPrice>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModelPrice {
    pub name: Spanned<String>,
    pub input_cents_per_mtok: Spanned<Number>,
    pub output_cents_per_mtok: Spanned<Number>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHost {
    #[serde(default)]
    pub deny_domains: Vec<Spanned<String>>,
    pub ceilings: Option<Spanned<RawCeilings>>,
    #[serde(default)]
    pub rule: Vec<Spanned<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCeilings {
    pub max_per_action_cents: Option<Spanned<Number>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    pub expr: Spanned<String>,
    pub decision: Spanned<String>,
    pub reason: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTcp {
    pub host: Spanned<String>,
    pub port: Spanned<i64>,
    pub action: Spanned<String>,
    pub cost_cents: Spanned<Number>,
}

/// A TOML integer, or a TOML float whose *text* the loader reads (through the span) as an exact
/// decimal: money never goes through a binary float, so `7.5` is exactly 7500 millicents.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Number {
    Int(i64),
    Decimal,
}

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Number, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Number;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number of cents, such as 250 or 7.5")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Number, E> {
                Ok(Number::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Number, E> {
                i64::try_from(v).map(Number::Int).map_err(|_| E::custom("number too large"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Number, E> {
                Ok(Number::Decimal)
            }
        }
        d.deserialize_any(V)
    }
}
