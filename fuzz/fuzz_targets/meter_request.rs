//! The metered estimate (`sluice_policy::meter::request_info`, `estimate_with_len`): `model` and
//! `max_tokens` read from the first bytes of an agent's request body, before it is decided.
//!
//! Checks, beyond "never panics": a model name is at most 128 bytes; on a body serde_json reads as
//! an object (without escapes, repeated keys or signs, where the two readings are meant to
//! agree), the same top-level `model` and largest `max_*tokens` (rounded up, saturating); the estimate never decreases as
//! the declared body length grows and equals the cost of the tokens it assumes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_policy::meter::{cost, estimate_with_len, request_info, MAX_MODEL_LEN};
use sluice_policy::{MeterKind, MeterSpec, ModelPrice, PriceTable, TokenUsage};
use std::sync::Arc;

fn spec() -> MeterSpec {
    let price = |name: &str, i: u64, o: u64| ModelPrice {
        name: name.to_string(),
        input_millicents_per_mtok: i,
        output_millicents_per_mtok: o,
    };
    MeterSpec {
        kind: MeterKind::OpenAi,
        default_max_tokens: 4096,
        prices: Arc::new(PriceTable {
            as_of: "2026-01-01".into(),
            source: None,
            models: vec![price("gpt-4o", 250_000, 1_000_000), price("gpt-4o-mini", 15_000, 60_000)],
            unknown: price("unknown", 500_000, 2_000_000),
        }),
    }
}

/// The meter's reading of a token count: a non-negative number rounded up to an integer,
/// saturating (digits beyond `u64`, like `2e19`, read as `u64::MAX`: the worst case, not none).
fn tokens(n: &serde_json::Number) -> Option<u64> {
    n.as_u64().or_else(|| n.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f.ceil() as u64))
}

fuzz_target!(|data: &[u8]| {
    let info = request_info(data);
    if let Some(m) = &info.model {
        assert!(m.len() <= MAX_MODEL_LEN, "{} byte model", m.len());
    }
    // An independent reading of the whole body, where it is unambiguous.
    let text = String::from_utf8_lossy(data);
    let once = |k: &str| text.matches(&format!("\"{k}\"")).count() <= 1;
    // A number's text longer than the scanner's 32-byte buffer that is not all digits (a long
    // fraction or exponent) is left unread by the meter, by design: not compared.
    let long_fraction = data
        .split(|b| !matches!(b, b'0'..=b'9' | b'.' | b'e' | b'E' | b'+'))
        .any(|run| run.len() > 32 && !run.iter().all(u8::is_ascii_digit));
    let plain = !text.contains(['\\', '-'])
        && !long_fraction
        && ["model", "max_tokens", "max_completion_tokens", "max_output_tokens"].iter().all(|k| once(k));
    if let (true, Ok(serde_json::Value::Object(o))) = (plain, serde_json::from_slice::<serde_json::Value>(data)) {
        match o.get("model").and_then(|m| m.as_str()) {
            Some(m) if m.len() <= MAX_MODEL_LEN => assert_eq!(info.model.as_deref(), Some(m)),
            _ => assert_eq!(info.model, None),
        }
        let max = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
            .iter()
            .filter_map(|k| o.get(*k).and_then(serde_json::Value::as_number).and_then(tokens))
            .max();
        assert_eq!(info.max_tokens, max);
    }
    let spec = spec();
    let len = data.len() as u64;
    let mut last = 0;
    for declared in [0, len, len + 1, len * 4 + 3, 1 << 20, 1 << 40, u64::MAX] {
        let e = estimate_with_len(&spec, data, declared);
        assert!(e >= last, "estimate fell from {last} to {e} at declared length {declared}");
        last = e;
        let floor = TokenUsage {
            input_tokens: declared.max(len).div_ceil(4),
            output_tokens: info.max_tokens.unwrap_or(spec.default_max_tokens),
            model: info.model.clone(),
        };
        assert_eq!(e, cost(&spec, &floor));
    }
});
