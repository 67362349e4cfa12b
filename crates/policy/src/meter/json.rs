//! A streaming, fixed-memory JSON scanner.
//!
//! It tracks just enough structure (nesting, which member each object is in, up to a small depth)
//! to report scalar values at interesting paths, byte by byte, so input can be split anywhere.
//! It does not validate JSON; on bytes no JSON value could contain it stops until `reset`.
//! Must not allocate: [`super::UsageScanner`] embeds it and promises fixed memory.

use super::MAX_MODEL_LEN;
use crate::path::hex;

pub(super) const TRACKED_DEPTH: usize = 4;
pub(super) const KEY_CAP: usize = 40;
pub(super) const NUM_CAP: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Key {
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
    pub(super) fn classify(name: &[u8]) -> Key {
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
pub(super) struct Frame {
    pub(super) array: bool,
    pub(super) key: Key,
}

pub(super) const NO_FRAME: Frame = Frame { array: false, key: Key::Other };

/// A scalar value found by the scanner.
#[derive(Debug, Clone, Copy)]
pub(super) enum Scalar<'a> {
    /// A non-negative number, rounded up to an integer, saturating.
    Number(u64),
    /// A string of at most [`MAX_MODEL_LEN`] bytes (escapes decoded when ASCII).
    Str(&'a [u8]),
    /// A string too long or with non-ASCII escapes.
    Unreadable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
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
pub(super) struct JsonScan {
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
    pub(super) fn new() -> JsonScan {
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

    pub(super) fn reset(&mut self) {
        self.state = State::Between;
        self.depth = 0;
        self.expect_key = false;
    }

    /// The frames of the current position, or `None` when deeper than tracked.
    pub(super) fn path(&self) -> Option<&[Frame]> {
        self.frames.get(..usize::try_from(self.depth).ok()?)
    }

    pub(super) fn top_mut(&mut self) -> Option<&mut Frame> {
        let d = usize::try_from(self.depth).ok()?.checked_sub(1)?;
        self.frames.get_mut(d)
    }

    pub(super) fn in_object(&self) -> bool {
        match usize::try_from(self.depth).ok().and_then(|d| d.checked_sub(1)) {
            Some(d) => self.frames.get(d).is_none_or(|f| !f.array),
            None => false,
        }
    }

    pub(super) fn push(&mut self, array: bool) {
        if let Some(f) = usize::try_from(self.depth).ok().and_then(|d| self.frames.get_mut(d)) {
            *f = Frame { array, key: Key::Other };
        }
        self.depth = self.depth.saturating_add(1);
        self.expect_key = !array;
    }

    pub(super) fn pop(&mut self) {
        match self.depth.checked_sub(1) {
            Some(d) => {
                self.depth = d;
                self.expect_key = false;
            }
            None => self.state = State::Failed,
        }
    }

    pub(super) fn feed(&mut self, bytes: &[u8], sink: &mut impl FnMut(&[Frame], Scalar<'_>)) {
        for &b in bytes {
            self.byte(b, sink);
        }
    }

    /// End of the document: a number at the very end has no delimiter after it.
    pub(super) fn finish(&mut self, sink: &mut impl FnMut(&[Frame], Scalar<'_>)) {
        if self.state == State::Number {
            self.end_number(sink);
            self.state = State::Between;
        }
    }

    pub(super) fn byte(&mut self, b: u8, sink: &mut impl FnMut(&[Frame], Scalar<'_>)) {
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

    pub(super) fn between(&mut self, b: u8) {
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

    pub(super) fn push_str_byte(&mut self, b: u8) {
        match self.buf.get_mut(self.buf_len) {
            Some(slot) => {
                *slot = b;
                self.buf_len += 1;
            }
            None => self.buf_bad = true,
        }
    }

    pub(super) fn end_string(&mut self, key: bool, sink: &mut impl FnMut(&[Frame], Scalar<'_>)) {
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

    pub(super) fn end_number(&mut self, sink: &mut impl FnMut(&[Frame], Scalar<'_>)) {
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
