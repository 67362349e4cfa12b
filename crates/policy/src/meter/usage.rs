//! The usage scanner: tells a JSON body from an SSE stream, routes `data:` payloads into the JSON
//! scanner and keeps the token counters a response reports. Must not allocate or buffer a body.

use super::json::{Frame, JsonScan, Key, Scalar};
use super::{MeterKind, TokenUsage, MAX_MODEL_LEN};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// Nothing but whitespace seen yet.
    Detect,
    /// One JSON document (the body starts with `{`).
    Json,
    /// `text/event-stream`: events of `field: value` lines separated by blank lines.
    Sse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SseLine {
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

pub(super) const FIELD_CAP: usize = 8;

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
pub(super) struct Counts {
    input: Option<u64>,
    output: Option<u64>,
    cache_creation: Option<u64>,
    cache_read: Option<u64>,
    model: [u8; MAX_MODEL_LEN],
    model_len: usize,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Counter {
    Input,
    Output,
    CacheCreation,
    CacheRead,
}

impl Counts {
    pub(super) fn record(&mut self, which: Counter, n: u64) {
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
            if self.framing == Framing::Detect {
                // The first non-whitespace byte decides: `{` is one JSON document, anything else
                // an event stream. That byte is then read like every later one.
                self.framing = match b {
                    b' ' | b'\t' | b'\r' | b'\n' => continue,
                    b'{' => Framing::Json,
                    _ => Framing::Sse,
                };
            }
            match self.framing {
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
                // Decided just above.
                Framing::Detect => {}
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

    pub(super) fn end(&mut self) {
        let kind = self.kind;
        let counts = &mut self.counts;
        let mut sink = |path: &[Frame], value: Scalar<'_>| record(kind, counts, path, value);
        self.json.finish(&mut sink);
    }

    pub(super) fn usage(&self) -> Option<TokenUsage> {
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
pub(super) fn sse_byte(
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
pub(super) fn record(kind: MeterKind, counts: &mut Counts, path: &[Frame], value: Scalar<'_>) {
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
