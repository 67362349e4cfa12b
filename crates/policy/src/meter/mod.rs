//! Metered costs for LLM APIs: an estimate before forwarding, the real cost settled from the
//! response's usage fields afterwards.
//!
//! Everything here is pure (no I/O) and bounded: the [`UsageScanner`] is fed response chunks as
//! they stream past and keeps a fixed-size state (no heap at all), whatever the body's size or
//! shape, so it can sit in the forwarding path without ever buffering a body (memory per connection stays bounded).
//!
//! ## Estimate ([`estimate`])
//! `input tokens ≈ ⌈body length / 4⌉` (about four bytes of JSON per token of English text; images
//! sent as base64 make this high, never low) plus `output tokens = max_tokens` (or
//! `max_completion_tokens`, `max_output_tokens`; the largest if several are present) or the
//! route's `default_max_tokens` when the request names none. The request body is read with a
//! tolerant scanner, so a prefix cut anywhere still yields what it contains.
//!
//! ## Settlement ([`UsageScanner`], [`cost`])
//! - OpenAI: `usage.prompt_tokens`/`completion_tokens` (Chat Completions, Embeddings),
//!   `usage.input_tokens`/`output_tokens` (Responses), in a JSON body or in SSE `data:` events
//!   (Chat Completions sends usage in its last chunk when `stream_options.include_usage` is set;
//!   Responses sends it in `response.completed` as `response.usage`).
//! - Anthropic: `usage.input_tokens`, `usage.output_tokens`, `usage.cache_creation_input_tokens`,
//!   `usage.cache_read_input_tokens` in a JSON body; in SSE, `message_start` carries
//!   `message.usage` and `message_delta` carries the cumulative `usage.output_tokens`.
//!
//! Each counter keeps the largest value seen (stream counters are cumulative). Cached input
//! tokens are charged at the full input price: Anthropic reports them apart from `input_tokens`
//! and bills cache reads below the input price (over-charged here) and cache writes above it
//! (1.25–2×: under-charged here). OpenAI's `prompt_tokens` already include cached tokens, also
//! charged at the full input price (its cache writes, 1.25×, are under-charged too). Long-context
//! surcharges and priority tiers are not modelled either: the price tables list standard prices.
//!
//! ## Prices and costs
//! Prices are integers or decimals with at most three places, in US cents per million tokens
//! (`2.5` is $0.025 per million); the policy loader reads the decimal text exactly (no float)
//! into millicents per million tokens, so that every cost computation is integer math. A cost is
//! in millicents (1/1000 cent), rounded **up** to a whole millicent per request, never to a cent:
//! a call that costs $0.00005 is charged 5 millicents. A
//! model name matches a price entry when it equals the entry's name or starts with the name
//! followed by `-` (`gpt-4o` prices `gpt-4o-2024-08-06`); the longest matching name wins, so
//! `gpt-4o-mini` beats `gpt-4o`. A model that matches no entry (or is unknown) is priced at the
//! table's `unknown_model` entry if set, otherwise at the highest input and the highest output
//! price in the table (each taken separately): an unlisted model never costs less than a listed one.

//! ## Modules
//! - this one: specs, prices, the request-side estimate and the cost of a usage;
//! - `json`: a streaming, fixed-memory JSON scanner that reports scalars at tracked paths;
//! - `usage`: [`UsageScanner`], which tells JSON from SSE, feeds `data:` payloads to the JSON
//!   scanner and keeps the token counters.

mod json;
mod usage;

pub use usage::UsageScanner;

use json::{Frame, JsonScan, Key, Scalar};

use std::sync::Arc;

/// Most bytes of a request body [`request_info`] looks at.
pub const MAX_REQUEST_SCAN: usize = 1 << 20;
/// Longest model name kept; longer names are treated as unknown.
pub const MAX_MODEL_LEN: usize = 128;

/// Which vendor's usage fields a response carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeterKind {
    OpenAi,
    Anthropic,
}

impl MeterKind {
    pub fn parse(s: &str) -> Option<MeterKind> {
        match s {
            "openai" => Some(MeterKind::OpenAi),
            "anthropic" => Some(MeterKind::Anthropic),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            MeterKind::OpenAi => "openai",
            MeterKind::Anthropic => "anthropic",
        }
    }
}

/// One model's prices, in millicents (1/1000 cent) per million tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPrice {
    pub name: String,
    pub input_millicents_per_mtok: u64,
    pub output_millicents_per_mtok: u64,
}

/// A dated price table (`[prices]` in a service file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceTable {
    /// The date the prices were copied from the vendor's page (`YYYY-MM-DD`).
    pub as_of: String,
    pub source: Option<String>,
    pub models: Vec<ModelPrice>,
    /// What a model that matches no entry costs (see the module doc).
    pub unknown: ModelPrice,
}

impl PriceTable {
    /// The price for `model` (see the module doc for the matching rule).
    pub fn price_for(&self, model: Option<&str>) -> &ModelPrice {
        let Some(model) = model else { return &self.unknown };
        self.models
            .iter()
            .filter(|p| {
                let name = p.name.as_bytes();
                let m = model.as_bytes();
                m.get(..name.len()).is_some_and(|head| head.eq_ignore_ascii_case(name))
                    && matches!(m.get(name.len()), None | Some(b'-'))
            })
            .max_by_key(|p| p.name.len())
            .unwrap_or(&self.unknown)
    }
}

/// How a metered route is charged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterSpec {
    pub kind: MeterKind,
    /// Output tokens assumed when the request names no `max_tokens`.
    pub default_max_tokens: u64,
    pub prices: Arc<PriceTable>,
}

/// Token usage reported by a response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The model the response names, if it names one.
    pub model: Option<String>,
}

/// What the estimate reads from a request body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestInfo {
    /// The top-level `model`; `None` when absent, too long, not a plain string, or given twice with
    /// different values (the unknown-model price then applies).
    pub model: Option<String>,
    /// The largest of the top-level `max_tokens`, `max_completion_tokens`, `max_output_tokens`.
    pub max_tokens: Option<u64>,
}

/// Reads `model` and the output-token limit from (a prefix of) a JSON request body.
pub fn request_info(body_prefix: &[u8]) -> RequestInfo {
    let body = body_prefix.get(..MAX_REQUEST_SCAN).unwrap_or(body_prefix);
    let mut info = RequestInfo::default();
    let mut model_conflict = false;
    let mut scan = JsonScan::new();
    let mut sink = |path: &[Frame], value: Scalar<'_>| {
        let [Frame { array: false, key }] = path else { return };
        match (key, value) {
            (Key::MaxTokens | Key::MaxCompletionTokens | Key::MaxOutputTokens, Scalar::Number(n)) => {
                info.max_tokens = Some(info.max_tokens.map_or(n, |m| m.max(n)));
            }
            (Key::Model, Scalar::Str(s)) => match (&info.model, std::str::from_utf8(s)) {
                (None, Ok(s)) if !model_conflict => info.model = Some(s.to_string()),
                (Some(m), Ok(s)) if m == s => {}
                _ => {
                    model_conflict = true;
                    info.model = None;
                }
            },
            (Key::Model, Scalar::Unreadable) => {
                model_conflict = true;
                info.model = None;
            }
            _ => {}
        }
    };
    scan.feed(body, &mut sink);
    scan.finish(&mut sink);
    info
}

/// The estimated cost in millicents of a request whose whole body is `body_prefix`.
pub fn estimate(spec: &MeterSpec, body_prefix: &[u8]) -> u64 {
    estimate_with_len(spec, body_prefix, body_prefix.len() as u64)
}

/// The estimated cost in millicents of a request of `body_len` bytes whose first bytes are
/// `body_prefix` (the proxy knows the length from `Content-Length` before it has the body).
pub fn estimate_with_len(spec: &MeterSpec, body_prefix: &[u8], body_len: u64) -> u64 {
    let info = request_info(body_prefix);
    let body_len = body_len.max(body_prefix.len() as u64);
    let usage = TokenUsage {
        input_tokens: body_len.div_ceil(4),
        output_tokens: info.max_tokens.unwrap_or(spec.default_max_tokens),
        model: info.model,
    };
    cost(spec, &usage)
}

/// The cost in millicents of `usage`, rounded up to a whole millicent, saturating at `u64::MAX`
/// (the decision then refuses it as more than any amount sluice accepts).
pub fn cost(spec: &MeterSpec, usage: &TokenUsage) -> u64 {
    let price = spec.prices.price_for(usage.model.as_deref());
    // Each product is below 2^64 × 2^64, and so is their sum: no overflow in u128.
    let micro = u128::from(usage.input_tokens) * u128::from(price.input_millicents_per_mtok)
        + u128::from(usage.output_tokens) * u128::from(price.output_millicents_per_mtok);
    // millicents per million tokens × tokens = 10^-6 millicents.
    let millicents = micro.div_ceil(1_000_000);
    u64::try_from(millicents).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
