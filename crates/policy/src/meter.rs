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
//! and bills cache writes above and cache reads below the input price, so this over-charges
//! cache reads a little and never under-charges. OpenAI's `prompt_tokens` already include cached
//! tokens.
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

use super::path::hex;
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

// ---------------------------------------------------------------------------------------------
// A streaming, fixed-memory JSON scanner.
//
// It tracks just enough structure (nesting, which member each object is in, up to a small depth)
// to report scalar values at interesting paths, byte by byte, so input can be split anywhere.
// It does not validate JSON; on bytes no JSON value could contain it stops until `reset`.

const TRACKED_DEPTH: usize = 4;
const KEY_CAP: usize = 40;
const NUM_CAP: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Other,
    TokenUsage,
    Message,
    Response,
    Model,
    PromptTokens,
    CompletionTokens,
    InputTokens,
    OutputTokens,
    CacheCreationInputTokens,
    CacheReadInputTokens,
    MaxTokens,
    MaxCompletionTokens,
    MaxOutputTokens,
}

impl Key {
    fn classify(name: &[u8]) -> Key {
        match name {
            b"usage" => Key::TokenUsage,
            b"message" => Key::Message,
            b"response" => Key::Response,
            b"model" => Key::Model,
            b"prompt_tokens" => Key::PromptTokens,
            b"completion_tokens" => Key::CompletionTokens,
            b"input_tokens" => Key::InputTokens,
            b"output_tokens" => Key::OutputTokens,
            b"cache_creation_input_tokens" => Key::CacheCreationInputTokens,
            b"cache_read_input_tokens" => Key::CacheReadInputTokens,
            b"max_tokens" => Key::MaxTokens,
            b"max_completion_tokens" => Key::MaxCompletionTokens,
            b"max_output_tokens" => Key::MaxOutputTokens,
            _ => Key::Other,
        }
    }
}

/// One level of nesting: an array, or an object and the member whose value is being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Frame {
    array: bool,
    key: Key,
}

const NO_FRAME: Frame = Frame { array: false, key: Key::Other };

/// A scalar value found by the scanner.
#[derive(Debug, Clone, Copy)]
enum Scalar<'a> {
    /// A non-negative number, rounded up to an integer, saturating.
    Number(u64),
    /// A string of at most [`MAX_MODEL_LEN`] bytes (escapes decoded when ASCII).
    Str(&'a [u8]),
    /// A string too long or with non-ASCII escapes.
    Unreadable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between tokens.
    Between,
    /// Inside a string; `key` says whether it is an object member name.
    Str {
        key: bool,
    },
    /// After a backslash in a string.
    Escape {
        key: bool,
    },
    /// Inside `\uXXXX`: digits read so far and their value.
    Unicode {
        key: bool,
        n: u8,
        acc: u16,
    },
    Number,
    /// `true`, `false`, `null`.
    Literal,
    /// Not JSON; ignore everything until `reset`.
    Failed,
}

#[derive(Clone)]
struct JsonScan {
    state: State,
    /// Total nesting depth (only the first `TRACKED_DEPTH` levels are remembered).
    depth: u32,
    frames: [Frame; TRACKED_DEPTH],
    /// An object at the top of the stack expects a member name next.
    expect_key: bool,
    buf: [u8; MAX_MODEL_LEN],
    buf_len: usize,
    /// The current string is too long or has a non-ASCII escape.
    buf_bad: bool,
    num: [u8; NUM_CAP],
    num_len: usize,
    num_long: bool,
}

impl JsonScan {
    fn new() -> JsonScan {
        JsonScan {
            state: State::Between,
            depth: 0,
            frames: [NO_FRAME; TRACKED_DEPTH],
            expect_key: false,
            buf: [0; MAX_MODEL_LEN],
            buf_len: 0,
            buf_bad: false,
            num: [0; NUM_CAP],
            num_len: 0,
            num_long: false,
        }
    }

    fn reset(&mut self) {
        self.state = State::Between;
        self.depth = 0;
        self.expect_key = false;
    }

    /// The frames of the current position, or `None` when deeper than tracked.
    fn path(&self) -> Option<&[Frame]> {
        self.frames.get(..usize::try_from(self.depth).ok()?)
    }

    fn top_mut(&mut self) -> Option<&mut Frame> {
        let d = usize::try_from(self.depth).ok()?.checked_sub(1)?;
        self.frames.get_mut(d)
    }

    fn in_object(&self) -> bool {
        match usize::try_from(self.depth).ok().and_then(|d| d.checked_sub(1)) {
            Some(d) => self.frames.get(d).is_none_or(|f| !f.array),
            None => false,
        }
    }

    fn push(&mut self, array: bool) {
        if let Some(f) = usize::try_from(self.depth).ok().and_then(|d| self.frames.get_mut(d)) {
            *f = Frame { array, key: Key::Other };
        }
        self.depth = self.depth.saturating_add(1);
        self.expect_key = !array;
    }

    fn pop(&mut self) {
        match self.depth.checked_sub(1) {
            Some(d) => {
                self.depth = d;
                self.expect_key = false;
            }
            None => self.state = State::Failed,
        }
    }

    fn feed(&mut self, bytes: &[u8], sink: &mut impl FnMut(&[Frame], Scalar<'_>)) {
        for &b in bytes {
            self.byte(b, sink);
        }
    }

    /// End of the document: a number at the very end has no delimiter after it.
    fn finish(&mut self, sink: &mut impl FnMut(&[Frame], Scalar<'_>)) {
        if self.state == State::Number {
            self.end_number(sink);
            self.state = State::Between;
        }
    }

    fn byte(&mut self, b: u8, sink: &mut impl FnMut(&[Frame], Scalar<'_>)) {
        match self.state {
            State::Failed => {}
            State::Str { key } => match b {
                b'"' => self.end_string(key, sink),
                b'\\' => self.state = State::Escape { key },
                _ => self.push_str_byte(b),
            },
            State::Escape { key } => {
                self.state = State::Str { key };
                match b {
                    b'"' | b'\\' | b'/' => self.push_str_byte(b),
                    b'b' => self.push_str_byte(0x08),
                    b'f' => self.push_str_byte(0x0c),
                    b'n' => self.push_str_byte(b'\n'),
                    b'r' => self.push_str_byte(b'\r'),
                    b't' => self.push_str_byte(b'\t'),
                    b'u' => self.state = State::Unicode { key, n: 0, acc: 0 },
                    _ => self.state = State::Failed,
                }
            }
            State::Unicode { key, n, acc } => {
                let Some(h) = hex(b) else {
                    self.state = State::Failed;
                    return;
                };
                let acc = (acc << 4) | u16::from(h);
                if n < 3 {
                    self.state = State::Unicode { key, n: n + 1, acc };
                } else {
                    self.state = State::Str { key };
                    match u8::try_from(acc) {
                        Ok(ascii) if ascii < 0x80 => self.push_str_byte(ascii),
                        _ => self.buf_bad = true,
                    }
                }
            }
            State::Number => {
                if b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-') {
                    match self.num.get_mut(self.num_len) {
                        Some(slot) => {
                            *slot = b;
                            self.num_len += 1;
                        }
                        None => self.num_long = true,
                    }
                } else {
                    self.end_number(sink);
                    self.state = State::Between;
                    self.between(b);
                }
            }
            State::Literal => {
                if !b.is_ascii_alphabetic() {
                    self.state = State::Between;
                    self.between(b);
                }
            }
            State::Between => self.between(b),
        }
    }

    fn between(&mut self, b: u8) {
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => {}
            b'{' => self.push(false),
            b'[' => self.push(true),
            b'}' | b']' => self.pop(),
            b':' => self.expect_key = false,
            b',' => {
                if self.in_object() {
                    self.expect_key = true;
                    if let Some(top) = self.top_mut() {
                        top.key = Key::Other;
                    }
                }
            }
            b'"' => {
                self.buf_len = 0;
                self.buf_bad = false;
                self.state = State::Str { key: self.in_object() && self.expect_key };
            }
            b'-' | b'0'..=b'9' => {
                self.num_len = 0;
                self.num_long = false;
                if let Some(slot) = self.num.first_mut() {
                    *slot = b;
                    self.num_len = 1;
                }
                self.state = State::Number;
            }
            b't' | b'f' | b'n' => self.state = State::Literal,
            _ => self.state = State::Failed,
        }
    }

    fn push_str_byte(&mut self, b: u8) {
        match self.buf.get_mut(self.buf_len) {
            Some(slot) => {
                *slot = b;
                self.buf_len += 1;
            }
            None => self.buf_bad = true,
        }
    }

    fn end_string(&mut self, key: bool, sink: &mut impl FnMut(&[Frame], Scalar<'_>)) {
        self.state = State::Between;
        let text = self.buf.get(..self.buf_len).unwrap_or(&[]);
        if key {
            let k = if self.buf_bad || text.len() > KEY_CAP { Key::Other } else { Key::classify(text) };
            if let Some(top) = self.top_mut() {
                top.key = k;
            }
            self.expect_key = false;
        } else if let Some(path) = self.path() {
            let value = if self.buf_bad { Scalar::Unreadable } else { Scalar::Str(text) };
            sink(path, value);
        }
    }

    fn end_number(&mut self, sink: &mut impl FnMut(&[Frame], Scalar<'_>)) {
        let text = self.num.get(..self.num_len).unwrap_or(&[]);
        let value = if text.iter().all(u8::is_ascii_digit) {
            if self.num_long {
                Some(u64::MAX)
            } else {
                // Digits only: parse saturating.
                Some(text.iter().fold(0u64, |acc, d| acc.saturating_mul(10).saturating_add(u64::from(d - b'0'))))
            }
        } else if self.num_long {
            None
        } else {
            // Fractions and exponents (`1000.0`, `1e3`): round up; negative and non-finite ignored.
            std::str::from_utf8(text)
                .ok()
                .and_then(|s| s.parse::<f64>().ok())
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f.ceil() as u64)
        };
        if let (Some(n), Some(path)) = (value, self.path()) {
            sink(path, Scalar::Number(n));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The usage scanner: detects JSON vs SSE and routes `data:` payloads into the JSON scanner.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Nothing but whitespace seen yet.
    Detect,
    /// One JSON document (the body starts with `{`).
    Json,
    /// `text/event-stream`: events of `field: value` lines separated by blank lines.
    Sse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SseLine {
    /// At the start of a line.
    Start,
    /// Reading a field name; the bytes so far are in `field`.
    Field,
    /// Just after `data:`; one space may follow.
    DataStart,
    /// Inside a `data:` value, passed to the JSON scanner.
    Data,
    /// Inside any other line (comment, `event:`, `id:`, unknown or overlong field).
    Skip,
}

const FIELD_CAP: usize = 8;

/// Incremental usage extraction from an LLM API response body. Feed each chunk as it passes,
/// then call [`UsageScanner::finish`]. Memory is fixed (`size_of::<UsageScanner>()`, no heap),
/// however long the body, its lines or its nesting.
///
/// The body is SSE unless its first non-whitespace byte is `{`; the caller need not know the
/// content type.
#[derive(Clone)]
pub struct UsageScanner {
    kind: MeterKind,
    framing: Framing,
    json: JsonScan,
    line: SseLine,
    field: [u8; FIELD_CAP],
    field_len: usize,
    /// The previous byte was `\r` (a following `\n` belongs to the same line end).
    after_cr: bool,
    counts: Counts,
}

#[derive(Debug, Clone, Copy)]
struct Counts {
    input: Option<u64>,
    output: Option<u64>,
    cache_creation: Option<u64>,
    cache_read: Option<u64>,
    model: [u8; MAX_MODEL_LEN],
    model_len: usize,
}

#[derive(Debug, Clone, Copy)]
enum Counter {
    Input,
    Output,
    CacheCreation,
    CacheRead,
}

impl Counts {
    fn record(&mut self, which: Counter, n: u64) {
        let slot = match which {
            Counter::Input => &mut self.input,
            Counter::Output => &mut self.output,
            Counter::CacheCreation => &mut self.cache_creation,
            Counter::CacheRead => &mut self.cache_read,
        };
        *slot = Some(slot.map_or(n, |m| m.max(n)));
    }
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            input: None,
            output: None,
            cache_creation: None,
            cache_read: None,
            model: [0; MAX_MODEL_LEN],
            model_len: 0,
        }
    }
}

impl UsageScanner {
    pub fn new(kind: MeterKind) -> UsageScanner {
        UsageScanner {
            kind,
            framing: Framing::Detect,
            json: JsonScan::new(),
            line: SseLine::Start,
            field: [0; FIELD_CAP],
            field_len: 0,
            after_cr: false,
            counts: Counts::default(),
        }
    }

    /// Feeds the next chunk of the response body.
    pub fn feed(&mut self, chunk: &[u8]) {
        let kind = self.kind;
        let counts = &mut self.counts;
        let mut sink = |path: &[Frame], value: Scalar<'_>| record(kind, counts, path, value);
        for &b in chunk {
            match self.framing {
                Framing::Detect => match b {
                    b' ' | b'\t' | b'\r' | b'\n' => {}
                    b'{' => {
                        self.framing = Framing::Json;
                        self.json.byte(b, &mut sink);
                    }
                    _ => {
                        self.framing = Framing::Sse;
                        sse_byte(
                            &mut self.line,
                            &mut self.field,
                            &mut self.field_len,
                            &mut self.after_cr,
                            &mut self.json,
                            b,
                            &mut sink,
                        );
                    }
                },
                Framing::Json => self.json.byte(b, &mut sink),
                Framing::Sse => sse_byte(
                    &mut self.line,
                    &mut self.field,
                    &mut self.field_len,
                    &mut self.after_cr,
                    &mut self.json,
                    b,
                    &mut sink,
                ),
            }
        }
    }

    /// The usage seen so far (for a stream cut short), without ending the scan.
    pub fn current(&self) -> Option<TokenUsage> {
        let mut copy = self.clone();
        copy.end();
        copy.usage()
    }

    /// Ends the body and returns its usage, or `None` when it reported no token counts (for
    /// example an OpenAI stream without `stream_options.include_usage`): the caller then keeps
    /// the estimate.
    pub fn finish(mut self) -> Option<TokenUsage> {
        self.end();
        self.usage()
    }

    fn end(&mut self) {
        let kind = self.kind;
        let counts = &mut self.counts;
        let mut sink = |path: &[Frame], value: Scalar<'_>| record(kind, counts, path, value);
        self.json.finish(&mut sink);
    }

    fn usage(&self) -> Option<TokenUsage> {
        let c = &self.counts;
        if c.input.is_none() && c.output.is_none() && c.cache_creation.is_none() && c.cache_read.is_none() {
            return None;
        }
        let input = [c.input, c.cache_creation, c.cache_read].iter().flatten().fold(0u64, |a, n| a.saturating_add(*n));
        let model = c.model.get(..c.model_len).and_then(|m| std::str::from_utf8(m).ok()).filter(|m| !m.is_empty());
        Some(TokenUsage { input_tokens: input, output_tokens: c.output.unwrap_or(0), model: model.map(str::to_string) })
    }
}

/// One byte of an SSE stream. A free function over the fields so the JSON sink can borrow the
/// counts at the same time.
fn sse_byte(
    line: &mut SseLine,
    field: &mut [u8; FIELD_CAP],
    field_len: &mut usize,
    after_cr: &mut bool,
    json: &mut JsonScan,
    b: u8,
    sink: &mut impl FnMut(&[Frame], Scalar<'_>),
) {
    let was_cr = std::mem::replace(after_cr, false);
    if b == b'\n' && was_cr {
        return; // the `\n` of a `\r\n`
    }
    if b == b'\n' || b == b'\r' {
        *after_cr = b == b'\r';
        match *line {
            // A blank line ends the event.
            SseLine::Start => {
                json.finish(sink);
                json.reset();
            }
            // Data lines of one event join with a newline, which JSON reads as whitespace.
            SseLine::Data | SseLine::DataStart => json.byte(b'\n', sink),
            SseLine::Field | SseLine::Skip => {}
        }
        *line = SseLine::Start;
        *field_len = 0;
        return;
    }
    match *line {
        SseLine::Start | SseLine::Field => {
            if b == b':' {
                let name = field.get(..*field_len).unwrap_or(&[]);
                *line = if *line == SseLine::Field && name == b"data" { SseLine::DataStart } else { SseLine::Skip };
            } else {
                match field.get_mut(*field_len) {
                    Some(slot) => {
                        *slot = b;
                        *field_len += 1;
                        *line = SseLine::Field;
                    }
                    None => *line = SseLine::Skip,
                }
            }
        }
        SseLine::DataStart => {
            *line = SseLine::Data;
            if b != b' ' {
                json.byte(b, sink);
            }
        }
        SseLine::Data => json.byte(b, sink),
        SseLine::Skip => {}
    }
}

/// Files a scalar found at `path` under the counter it feeds, per vendor.
fn record(kind: MeterKind, counts: &mut Counts, path: &[Frame], value: Scalar<'_>) {
    // Paths are object members only: a value inside any array (`choices[0]…`) never counts.
    if path.iter().any(|f| f.array) {
        return;
    }
    let keys: [Key; 3] = match path {
        [a] => [a.key, Key::Other, Key::Other],
        [a, b] => [a.key, b.key, Key::Other],
        [a, b, c] => [a.key, b.key, c.key],
        _ => return,
    };
    // The usage object is at the top level, or inside the event's envelope.
    let envelope = match kind {
        MeterKind::OpenAi => Key::Response,
        MeterKind::Anthropic => Key::Message,
    };
    let (field, in_usage) = match keys {
        [Key::TokenUsage, f, Key::Other] => (f, true),
        [e, Key::TokenUsage, f] if e == envelope => (f, true),
        [Key::Model, Key::Other, Key::Other] => (Key::Model, false),
        [e, Key::Model, Key::Other] if e == envelope => (Key::Model, false),
        _ => return,
    };
    match (value, in_usage) {
        (Scalar::Number(n), true) => {
            let counter = match (kind, field) {
                (MeterKind::OpenAi, Key::PromptTokens | Key::InputTokens) => Counter::Input,
                (MeterKind::OpenAi, Key::CompletionTokens | Key::OutputTokens) => Counter::Output,
                (MeterKind::Anthropic, Key::InputTokens) => Counter::Input,
                (MeterKind::Anthropic, Key::OutputTokens) => Counter::Output,
                (MeterKind::Anthropic, Key::CacheCreationInputTokens) => Counter::CacheCreation,
                (MeterKind::Anthropic, Key::CacheReadInputTokens) => Counter::CacheRead,
                _ => return,
            };
            counts.record(counter, n);
        }
        (Scalar::Str(s), false) => {
            if let Some(dst) = counts.model.get_mut(..s.len()) {
                dst.copy_from_slice(s);
                counts.model_len = s.len();
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests;
