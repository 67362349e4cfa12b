//! Metering tests. The response bodies are written here in the shapes the vendors document
//! (field order, nesting, `null`s and extra fields included), not captured from the network.

use super::*;
use proptest::prelude::*;

const OPENAI_JSON: &str = r#"{
  "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
  "object": "chat.completion",
  "created": 1741569952,
  "model": "gpt-4o-2024-08-06",
  "choices": [
    {
      "index": 0,
      "message": {
        "role": "assistant",
        "content": "Sure: {\"usage\": {\"prompt_tokens\": 999999, \"completion_tokens\": 999999}} \\\" and a \u00e9",
        "refusal": null,
        "annotations": [],
        "usage": {"prompt_tokens": 888888}
      },
      "logprobs": null,
      "finish_reason": "stop"
    }
  ],
  "usage": {
    "prompt_tokens": 19,
    "completion_tokens": 10,
    "total_tokens": 29,
    "prompt_tokens_details": { "cached_tokens": 0, "audio_tokens": 0 },
    "completion_tokens_details": { "reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0 }
  },
  "service_tier": "default",
  "system_fingerprint": "fp_fc9f1d7035"
}"#;

const OPENAI_SSE: &str = concat!(
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-mini-2024-07-18\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_06737a9306\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n",
    "\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello \\\"usage\\\":{\\\"prompt_tokens\\\":5}\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n",
    "\n",
    ": keep-alive comment\n",
    "\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":null}\n",
    "\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":7,\"total_tokens\":19,\"prompt_tokens_details\":{\"cached_tokens\":0,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}\n",
    "\n",
    "data: [DONE]\n",
    "\n",
);

const OPENAI_RESPONSES_SSE: &str = concat!(
    "event: response.created\n",
    "data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"created_at\":1741290958,\"status\":\"in_progress\",\"model\":\"gpt-4.1-2025-04-14\",\"output\":[],\"usage\":null}}\n",
    "\n",
    "event: response.output_text.delta\n",
    "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":4,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi\"}\n",
    "\n",
    "event: response.completed\n",
    "data: {\"type\":\"response.completed\",\"sequence_number\":9,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"model\":\"gpt-4.1-2025-04-14\",\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi\"}]}],\"usage\":{\"input_tokens\":36,\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":87,\"output_tokens_details\":{\"reasoning_tokens\":0},\"total_tokens\":123}}}\n",
    "\n",
);

const ANTHROPIC_JSON: &str = r#"{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"Hello! {\"usage\":{\"output_tokens\":1}}"},{"type":"tool_use","id":"toolu_1","name":"get","input":{"usage":{"input_tokens":777}}}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":21,"cache_creation_input_tokens":100,"cache_read_input_tokens":50,"output_tokens":34,"service_tier":"standard"}}"#;

const ANTHROPIC_SSE: &str = concat!(
    "event: message_start\n",
    "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-3-5-haiku-20241022\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":472,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":2}}}\n",
    "\n",
    "event: content_block_start\n",
    "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n",
    "\n",
    "event: ping\n",
    "data: {\"type\": \"ping\"}\n",
    "\n",
    "event: content_block_delta\n",
    "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello \\\"usage\\\": {\\\"output_tokens\\\": 99999}\"}}\n",
    "\n",
    "event: content_block_stop\n",
    "data: {\"type\":\"content_block_stop\",\"index\":0}\n",
    "\n",
    "event: message_delta\n",
    "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":89}}\n",
    "\n",
    "event: message_stop\n",
    "data: {\"type\":\"message_stop\"}\n",
    "\n",
);

fn usage(input: u64, output: u64, model: &str) -> Option<TokenUsage> {
    Some(TokenUsage { input_tokens: input, output_tokens: output, model: Some(model.to_string()) })
}

fn scan(kind: MeterKind, chunks: &[&[u8]]) -> Option<TokenUsage> {
    let mut s = UsageScanner::new(kind);
    for c in chunks {
        s.feed(c);
    }
    s.finish()
}

/// The same usage whatever the chunking: whole, byte by byte, and split in two at every byte.
fn assert_split_invariant(kind: MeterKind, body: &[u8], expected: &Option<TokenUsage>) {
    assert_eq!(&scan(kind, &[body]), expected, "whole body");
    let bytes: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(&scan(kind, &bytes), expected, "byte by byte");
    for i in 0..=body.len() {
        let (a, b) = body.split_at(i);
        assert_eq!(&scan(kind, &[a, b]), expected, "split at {i}");
    }
}

#[test]
fn openai_json_body() {
    let expected = usage(19, 10, "gpt-4o-2024-08-06");
    assert_split_invariant(MeterKind::OpenAi, OPENAI_JSON.as_bytes(), &expected);
}

#[test]
fn openai_sse_with_usage_in_the_last_chunk() {
    let expected = usage(12, 7, "gpt-4o-mini-2024-07-18");
    assert_split_invariant(MeterKind::OpenAi, OPENAI_SSE.as_bytes(), &expected);
    // The same stream with CRLF and with CR line ends.
    let crlf = OPENAI_SSE.replace('\n', "\r\n");
    assert_split_invariant(MeterKind::OpenAi, crlf.as_bytes(), &expected);
    let cr = OPENAI_SSE.replace('\n', "\r");
    assert_eq!(scan(MeterKind::OpenAi, &[cr.as_bytes()]), expected);
}

#[test]
fn openai_responses_sse_usage_in_response_completed() {
    let expected = usage(36, 87, "gpt-4.1-2025-04-14");
    assert_split_invariant(MeterKind::OpenAi, OPENAI_RESPONSES_SSE.as_bytes(), &expected);
}

#[test]
fn anthropic_json_body_counts_cache_tokens_as_input() {
    let expected = usage(21 + 100 + 50, 34, "claude-sonnet-4-5-20250929");
    assert_split_invariant(MeterKind::Anthropic, ANTHROPIC_JSON.as_bytes(), &expected);
}

#[test]
fn anthropic_sse_input_from_message_start_output_from_message_delta() {
    let expected = usage(472, 89, "claude-3-5-haiku-20241022");
    assert_split_invariant(MeterKind::Anthropic, ANTHROPIC_SSE.as_bytes(), &expected);
    let crlf = ANTHROPIC_SSE.replace('\n', "\r\n");
    assert_split_invariant(MeterKind::Anthropic, crlf.as_bytes(), &expected);
}

#[test]
fn three_way_splits_at_many_points() {
    for (kind, body, expected) in [
        (MeterKind::OpenAi, OPENAI_SSE, usage(12, 7, "gpt-4o-mini-2024-07-18")),
        (MeterKind::Anthropic, ANTHROPIC_SSE, usage(472, 89, "claude-3-5-haiku-20241022")),
    ] {
        let b = body.as_bytes();
        for i in (0..b.len()).step_by(7) {
            for j in (i..b.len()).step_by(13) {
                assert_eq!(scan(kind, &[&b[..i], &b[i..j], &b[j..]]), expected, "{i} {j}");
            }
        }
    }
}

#[test]
fn a_vendor_kind_reads_only_its_own_envelope() {
    // Anthropic's message_start envelope means nothing to an OpenAI meter, and vice versa.
    assert_eq!(scan(MeterKind::OpenAi, &[ANTHROPIC_SSE.as_bytes()]).map(|u| u.input_tokens), Some(0));
    assert_eq!(scan(MeterKind::Anthropic, &[OPENAI_RESPONSES_SSE.as_bytes()]), None);
}

#[test]
fn stream_without_usage_is_none() {
    let no_usage: String = OPENAI_SSE
        .split("\n\n")
        .filter(|event| !event.contains("\"prompt_tokens\":12"))
        .map(|e| format!("{e}\n\n"))
        .collect();
    assert!(no_usage.contains("[DONE]"));
    assert_eq!(scan(MeterKind::OpenAi, &[no_usage.as_bytes()]), None);
    assert_eq!(scan(MeterKind::OpenAi, &[b""]), None);
    assert_eq!(scan(MeterKind::OpenAi, &[b"{\"error\":{\"message\":\"rate limited\",\"type\":\"x\"}}"]), None);
    assert_eq!(scan(MeterKind::Anthropic, &[b"<html>502 Bad Gateway</html>"]), None);
}

#[test]
fn a_number_at_the_very_end_of_the_body_counts() {
    assert_eq!(
        scan(MeterKind::OpenAi, &[b"data: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":41"]),
        Some(TokenUsage { input_tokens: 3, output_tokens: 41, model: None })
    );
}

#[test]
fn current_reports_usage_of_a_cut_stream_without_ending_it() {
    let mut s = UsageScanner::new(MeterKind::Anthropic);
    let cut = ANTHROPIC_SSE.find("event: content_block_start").unwrap();
    s.feed(&ANTHROPIC_SSE.as_bytes()[..cut]);
    assert_eq!(s.current(), usage(472, 2, "claude-3-5-haiku-20241022"));
    s.feed(&ANTHROPIC_SSE.as_bytes()[cut..]);
    assert_eq!(s.finish(), usage(472, 89, "claude-3-5-haiku-20241022"));
}

#[test]
fn scanner_memory_is_fixed_and_huge_input_is_survived() {
    // No heap: the whole state is inline and small.
    assert!(std::mem::size_of::<UsageScanner>() < 1024, "{}", std::mem::size_of::<UsageScanner>());

    let mut s = UsageScanner::new(MeterKind::OpenAi);
    // A 16 MiB data line inside one string, fed in 64 KiB chunks.
    s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"");
    let chunk = vec![b'a'; 64 * 1024];
    for _ in 0..256 {
        s.feed(&chunk);
    }
    s.feed(b"\"}}]}\n\n");
    // A huge field name, a huge key, a huge number, a huge model name, deep nesting.
    s.feed(&vec![b'x'; 1 << 20]);
    s.feed(b": v\n\n");
    s.feed(format!("data: {{\"{}\":1}}\n\n", "k".repeat(1 << 20)).as_bytes());
    s.feed(format!("data: {{\"usage\":{{\"total_tokens\":{}}}}}\n\n", "9".repeat(1 << 20)).as_bytes());
    s.feed(format!("data: {{\"model\":\"{}\"}}\n\n", "m".repeat(1 << 20)).as_bytes());
    s.feed(b"data: ");
    s.feed(&vec![b'['; 1 << 20]);
    s.feed(b"\n\n");
    // After all that, a normal final chunk is still read.
    s.feed(b"data: {\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6}}\n\ndata: [DONE]\n\n");
    assert_eq!(s.finish(), usage(5, 6, "gpt-4o"));
}

#[test]
fn overlong_token_counts_saturate_instead_of_wrapping() {
    let body = format!("{{\"usage\":{{\"prompt_tokens\":{},\"completion_tokens\":1}}}}", "9".repeat(40));
    let u = scan(MeterKind::OpenAi, &[body.as_bytes()]).unwrap();
    assert_eq!(u.input_tokens, u64::MAX);
    // At 1 millicent per million tokens, u64::MAX tokens cost ⌈u64::MAX / 10^6⌉ millicents (+1).
    let mut cheap = spec();
    cheap.prices = Arc::new(PriceTable {
        as_of: "2025-06-01".into(),
        source: None,
        models: vec![],
        unknown: ModelPrice { name: "x".into(), input_millicents_per_mtok: 1, output_millicents_per_mtok: 1 },
    });
    let expected = (u128::from(u64::MAX) + 1).div_ceil(1_000_000);
    assert_eq!(u128::from(cost(&cheap, &u)), expected);
    // A cost beyond u64 saturates (the decision then refuses it as too large).
    assert_eq!(cost(&spec(), &u), u64::MAX);
    let mut dear = spec();
    dear.prices = Arc::new(PriceTable {
        as_of: "2025-06-01".into(),
        source: None,
        models: vec![],
        unknown: price("x", 10_000_000, 10_000_000),
    });
    assert_eq!(cost(&dear, &u), u64::MAX);
    // Negative, fractional and exponent counts.
    let u = scan(MeterKind::OpenAi, &[b"{\"usage\":{\"prompt_tokens\":-5,\"completion_tokens\":2.5e1}}"]).unwrap();
    assert_eq!((u.input_tokens, u.output_tokens), (0, 25));
}

fn price(name: &str, input_cents: u64, output_cents: u64) -> ModelPrice {
    ModelPrice {
        name: name.to_string(),
        input_millicents_per_mtok: input_cents * 1000,
        output_millicents_per_mtok: output_cents * 1000,
    }
}

fn spec() -> MeterSpec {
    let models = vec![price("gpt-4o", 250, 1000), price("gpt-4o-mini", 15, 60), price("o1", 1500, 6000)];
    let unknown =
        ModelPrice { name: "max".into(), input_millicents_per_mtok: 1_500_000, output_millicents_per_mtok: 6_000_000 };
    MeterSpec {
        kind: MeterKind::OpenAi,
        default_max_tokens: 2000,
        prices: Arc::new(PriceTable { as_of: "2025-06-01".into(), source: None, models, unknown }),
    }
}

#[test]
fn model_prices_match_snapshots_longest_name_first() {
    let s = spec();
    let p = |m: &str| s.prices.price_for(Some(m)).name.clone();
    assert_eq!(p("gpt-4o"), "gpt-4o");
    assert_eq!(p("gpt-4o-2024-08-06"), "gpt-4o");
    assert_eq!(p("gpt-4o-mini"), "gpt-4o-mini");
    assert_eq!(p("gpt-4o-mini-2024-07-18"), "gpt-4o-mini");
    assert_eq!(p("GPT-4o"), "gpt-4o");
    assert_eq!(p("o1-preview"), "o1");
    // Not on a '-' boundary, or not listed: the unknown price (the highest ones).
    assert_eq!(p("gpt-4omni"), "max");
    assert_eq!(p("gpt-4"), "max");
    assert_eq!(p("o10"), "max");
    assert_eq!(s.prices.price_for(None).name, "max");
}

#[test]
fn cost_rounds_up_to_a_millicent_with_integer_math() {
    let s = spec();
    let u = |i, o, m: &str| TokenUsage { input_tokens: i, output_tokens: o, model: Some(m.to_string()) };
    assert_eq!(cost(&s, &u(0, 0, "gpt-4o")), 0);
    assert_eq!(cost(&s, &u(1, 0, "gpt-4o")), 1); // 0.25 millicent → 1, not a whole cent
    assert_eq!(cost(&s, &u(4, 0, "gpt-4o")), 1); // exactly 1 millicent
    assert_eq!(cost(&s, &u(5, 0, "gpt-4o")), 2); // 1.25 → 2
    assert_eq!(cost(&s, &u(1_000_000, 0, "gpt-4o")), 250_000);
    assert_eq!(cost(&s, &u(1_000_000, 1_000_000, "gpt-4o")), 1_250_000);
    assert_eq!(cost(&s, &u(4_000_000, 1, "gpt-4o")), 1_000_001); // $10 + 1 output token (1 millicent)
    assert_eq!(cost(&s, &u(1_000_000, 1_000_000, "gpt-4o-mini-2024-07-18")), 75_000);
    assert_eq!(cost(&s, &u(1_000_000, 0, "mystery-model")), 1_500_000);
    // A small call: 100 input and 20 output tokens of gpt-4o-mini cost 2.7 millicents
    // ($0.000027): charged 3 millicents, where whole cents charged 1000.
    assert_eq!(cost(&s, &u(100, 20, "gpt-4o-mini")), 3);
    // 20 input tokens at $2.50/M = $0.00005 = 5 millicents (charged 5, not a cent).
    assert_eq!(cost(&s, &u(20, 0, "gpt-4o")), 5);
    // Fractional prices: 7.5 cents per million.
    let mut frac = spec();
    frac.prices = Arc::new(PriceTable {
        as_of: "2025-06-01".into(),
        source: None,
        models: vec![ModelPrice { name: "m".into(), input_millicents_per_mtok: 7_500, output_millicents_per_mtok: 0 }],
        unknown: price("x", 0, 0),
    });
    assert_eq!(cost(&frac, &u(2_000_000, 0, "m")), 15_000);
    assert_eq!(cost(&frac, &u(2_000_001, 0, "m")), 15_001);
    assert_eq!(cost(&frac, &u(400, 0, "m")), 3); // 400 × 7.5 cents / 10^6 = 0.003 cent
}

#[test]
fn estimate_uses_max_tokens_or_the_default() {
    let s = spec();
    // Output: max_tokens 1,000,000 at 1000 c/M = 1000 cents; input: 83 bytes → 21 tokens at
    // 250 c/M = 5.25 millicents → 6.
    let body = br#"{"model":"gpt-4o","max_tokens":1000000,"messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(estimate(&s, body), 1_000_006);
    // No max_tokens: default 2000 tokens → 2 cents, + 8 input tokens = 2 millicents.
    let body = br#"{"model":"gpt-4o","messages":[]}"#;
    assert_eq!(estimate(&s, body), 2_002);
    // max_completion_tokens and max_output_tokens count too; the largest wins.
    let body = br#"{"model":"gpt-4o-mini","max_completion_tokens":1000000,"max_tokens":10}"#;
    assert_eq!(estimate(&s, body), 60_001);
    let body = br#"{"model":"gpt-4o","max_output_tokens":2000000}"#;
    assert_eq!(estimate(&s, body), 2_000_003);
    // The body length comes from Content-Length when only a prefix is at hand:
    // 4,000,000 bytes → 1,000,000 input tokens → 250 cents, plus 2 for the default output.
    assert_eq!(estimate_with_len(&s, br#"{"model":"gpt-4o","#, 4_000_000), 252_000);
    // Unknown model: the highest prices.
    let body = br#"{"model":"new-model","max_tokens":1000000}"#;
    assert_eq!(estimate(&s, body), 6_000_017);
}

#[test]
fn request_info_is_read_tolerantly_and_conservatively() {
    // A fractional count near 2^60 (found by fuzzing): the nearest f64, rounded up, as a
    // correctly rounded parse gives it (Python's float() agrees: 1000000000000045568).
    let info = request_info(br#"{"model":"gp2d4o","max_completion_tokens":1000000000000045618.58601}"#);
    assert_eq!(info.max_tokens, Some(1_000_000_000_000_045_568));
    let info = request_info(br#"{"messages":[{"model":"fake","max_tokens":1}],"model":"gpt-4o","max_tokens":50}"#);
    assert_eq!(info, RequestInfo { model: Some("gpt-4o".into()), max_tokens: Some(50) });
    // Truncated anywhere: what was seen is kept.
    let info = request_info(br#"{"model":"gpt-4o","max_tokens":77,"messages":[{"role":"user","content":"aaa"#);
    assert_eq!(info, RequestInfo { model: Some("gpt-4o".into()), max_tokens: Some(77) });
    // A key spelled with escapes is the same key (as the upstream's JSON parser reads it).
    let info = request_info(br#"{"max_tok\u0065ns":900,"\u006dodel":"o1"}"#);
    assert_eq!(info, RequestInfo { model: Some("o1".into()), max_tokens: Some(900) });
    // Duplicates: the largest limit; two different models are an unknown model.
    let info = request_info(br#"{"max_tokens":10,"model":"gpt-4o-mini","max_tokens":100000,"model":"o1"}"#);
    assert_eq!(info, RequestInfo { model: None, max_tokens: Some(100000) });
    let info = request_info(br#"{"model":"gpt-4o","model":"gpt-4o"}"#);
    assert_eq!(info.model.as_deref(), Some("gpt-4o"));
    // Numbers written as floats or with exponents.
    assert_eq!(request_info(br#"{"max_tokens":1e3}"#).max_tokens, Some(1000));
    assert_eq!(request_info(br#"{"max_tokens":1000.5}"#).max_tokens, Some(1001));
    // Not JSON at all.
    assert_eq!(request_info(b"max_tokens=5"), RequestInfo::default());
    // A model given as a non-ASCII escape or overlong is unknown.
    assert_eq!(request_info(br#"{"model":"gpt-\u00e9"}"#).model, None);
    assert_eq!(request_info(format!("{{\"model\":\"{}\"}}", "a".repeat(200)).as_bytes()).model, None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn scanner_never_panics_and_ignores_chunking(
        body in proptest::collection::vec(any::<u8>(), 0..2048),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        anthropic in any::<bool>(),
    ) {
        let kind = if anthropic { MeterKind::Anthropic } else { MeterKind::OpenAi };
        let whole = scan(kind, &[&body]);
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(body.len() + 1)).collect();
        points.sort_unstable();
        let mut chunks = Vec::new();
        let mut prev = 0;
        for p in points {
            chunks.push(&body[prev..p]);
            prev = p;
        }
        chunks.push(&body[prev..]);
        prop_assert_eq!(scan(kind, &chunks), whole);
        let _ = request_info(&body);
    }

    #[test]
    fn scanner_never_panics_on_json_like_noise(
        parts in proptest::collection::vec(
            prop::sample::select(vec![
                "{", "}", "[", "]", ":", ",", "\"", "\\", "\\u00", "usage", "\"usage\"", "\"prompt_tokens\"",
                "\"input_tokens\"", "\"message\"", "\"model\"", "123", "-", "1e99", "null", "data: ", "data:",
                "\n", "\r", "\r\n", "\n\n", "event: x", " ", "\u{e9}",
            ]),
            0..200,
        ),
    ) {
        let body: String = parts.concat();
        for kind in [MeterKind::OpenAi, MeterKind::Anthropic] {
            let whole = scan(kind, &[body.as_bytes()]);
            let bytes: Vec<&[u8]> = body.as_bytes().chunks(3).collect();
            prop_assert_eq!(scan(kind, &bytes), whole);
        }
        let _ = request_info(body.as_bytes());
    }
}
