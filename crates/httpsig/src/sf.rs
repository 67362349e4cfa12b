//! The subset of structured field values (RFC 8941) that sluice's signature headers use, parsed
//! strictly and serialised canonically.
//!
//! Parsed: dictionaries whose member values are inner lists or bare items, each with parameters;
//! bare items of type string, integer and byte sequence. Tokens, decimals and booleans are refused
//! (the profile uses none), and so are duplicate dictionary keys and duplicate parameters, which
//! RFC 8941 would silently resolve to the last one.

use crate::{Error, Header};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// A bare item of the types the profile uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Bare {
    Int(i64),
    Str(String),
    Bytes(Vec<u8>),
}

/// Parameters, in the order received (the signature base keeps that order).
pub(crate) type Params = Vec<(String, Bare)>;

/// A dictionary member's value.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Member {
    /// `(item item ...);params`: each item with its own parameters.
    InnerList(Vec<(Bare, Params)>, Params),
    /// `item;params`.
    Item(Bare, Params),
}

/// The largest integer RFC 8941 allows (15 digits).
const MAX_INT_DIGITS: usize = 15;

struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
    header: Header,
}

/// Parses a dictionary field value. Leading and trailing spaces and tabs (HTTP's optional white
/// space around a field value) are ignored; anything else outside the grammar is an error.
pub(crate) fn parse_dictionary(header: Header, value: &str) -> Result<Vec<(String, Member)>, Error> {
    let mut p = Parser { input: value.as_bytes(), pos: 0, header };
    p.skip(|c| c == b' ' || c == b'\t');
    let mut members: Vec<(String, Member)> = Vec::new();
    if p.at_end_after_ows() {
        return Err(p.err("an empty field value"));
    }
    loop {
        let key = p.key()?;
        if p.peek() != Some(b'=') {
            return Err(p.err("a dictionary member without a value (`key=...` expected)"));
        }
        p.pos += 1;
        let member = if p.peek() == Some(b'(') { p.inner_list()? } else { p.item()? };
        if members.iter().any(|(k, _)| *k == key) {
            return Err(Error::Duplicate { header, name: key });
        }
        members.push((key, member));
        p.skip(|c| c == b' ' || c == b'\t');
        if p.at_end_after_ows() {
            return Ok(members);
        }
        if p.peek() != Some(b',') {
            return Err(p.err("`,` or the end of the value expected after a member"));
        }
        p.pos += 1;
        p.skip(|c| c == b' ' || c == b'\t');
        if p.peek().is_none() {
            return Err(p.err("a trailing `,`"));
        }
    }
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn skip(&mut self, pred: impl Fn(u8) -> bool) {
        while self.peek().is_some_and(&pred) {
            self.pos += 1;
        }
    }

    /// True at the end of input, spaces and tabs before it skipped.
    fn at_end_after_ows(&mut self) -> bool {
        self.skip(|c| c == b' ' || c == b'\t');
        self.pos == self.input.len()
    }

    fn err(&self, what: &'static str) -> Error {
        Error::Malformed { header: self.header, at: self.pos, what }
    }

    /// `key = ( lcalpha / "*" ) *( lcalpha / DIGIT / "_" / "-" / "." / "*" )`
    fn key(&mut self) -> Result<String, Error> {
        let start = self.pos;
        match self.peek() {
            Some(c) if c.is_ascii_lowercase() || c == b'*' => self.pos += 1,
            _ => return Err(self.err("a key (lowercase letter or `*` first) expected")),
        }
        self.skip(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'.' | b'*'));
        Ok(self.slice_str(start))
    }

    fn slice_str(&self, start: usize) -> String {
        // Only ASCII bytes were accepted between `start` and `pos`.
        String::from_utf8_lossy(self.input.get(start..self.pos).unwrap_or_default()).into_owned()
    }

    fn inner_list(&mut self) -> Result<Member, Error> {
        self.pos += 1; // '('
        let mut items = Vec::new();
        loop {
            self.skip(|c| c == b' ');
            match self.peek() {
                None => return Err(self.err("an inner list without `)`")),
                Some(b')') => {
                    self.pos += 1;
                    let params = self.params()?;
                    return Ok(Member::InnerList(items, params));
                }
                Some(_) => {
                    let item = self.bare()?;
                    let params = self.params()?;
                    items.push((item, params));
                    match self.peek() {
                        Some(b' ') | Some(b')') => {}
                        _ => return Err(self.err("a space or `)` expected after an inner list item")),
                    }
                }
            }
        }
    }

    fn item(&mut self) -> Result<Member, Error> {
        let bare = self.bare()?;
        let params = self.params()?;
        Ok(Member::Item(bare, params))
    }

    fn params(&mut self) -> Result<Params, Error> {
        let mut params: Params = Vec::new();
        while self.peek() == Some(b';') {
            self.pos += 1;
            self.skip(|c| c == b' ');
            let key = self.key()?;
            if self.peek() != Some(b'=') {
                return Err(self.err("a parameter without a value (`;name=value` expected)"));
            }
            self.pos += 1;
            let value = self.bare()?;
            if params.iter().any(|(k, _)| *k == key) {
                return Err(Error::Duplicate { header: self.header, name: key });
            }
            params.push((key, value));
        }
        Ok(params)
    }

    fn bare(&mut self) -> Result<Bare, Error> {
        match self.peek() {
            Some(b'"') => self.string(),
            Some(b':') => self.bytes(),
            Some(c) if c == b'-' || c.is_ascii_digit() => self.integer(),
            Some(c) if c.is_ascii_alphabetic() || c == b'*' => {
                Err(self.err("a token (only strings, integers and byte sequences are used)"))
            }
            Some(b'?') => Err(self.err("a boolean (only strings, integers and byte sequences are used)")),
            Some(_) => Err(self.err("an item (string, integer or byte sequence) expected")),
            None => Err(self.err("an item expected, found the end of the value")),
        }
    }

    fn string(&mut self) -> Result<Bare, Error> {
        self.pos += 1; // '"'
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(self.err("a string without its closing `\"`")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(Bare::Str(out));
                }
                Some(b'\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some(c @ (b'"' | b'\\')) => {
                            out.push(char::from(c));
                            self.pos += 1;
                        }
                        _ => return Err(self.err("a string escape other than `\\\"` or `\\\\`")),
                    }
                }
                Some(c @ 0x20..=0x7e) => {
                    out.push(char::from(c));
                    self.pos += 1;
                }
                Some(_) => return Err(self.err("a control or non-ASCII character in a string")),
            }
        }
    }

    fn integer(&mut self) -> Result<Bare, Error> {
        let negative = self.peek() == Some(b'-');
        if negative {
            self.pos += 1;
        }
        let start = self.pos;
        self.skip(|c| c.is_ascii_digit());
        let digits = self.pos - start;
        if digits == 0 {
            return Err(self.err("a digit expected"));
        }
        if digits > MAX_INT_DIGITS {
            return Err(self.err("an integer longer than 15 digits"));
        }
        if self.peek() == Some(b'.') {
            return Err(self.err("a decimal (only integers are used)"));
        }
        let text = self.slice_str(start);
        let n: i64 = text.parse().map_err(|_| self.err("an integer out of range"))?;
        Ok(Bare::Int(if negative { -n } else { n }))
    }

    fn bytes(&mut self) -> Result<Bare, Error> {
        self.pos += 1; // ':'
        let start = self.pos;
        self.skip(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'='));
        if self.peek() != Some(b':') {
            return Err(self.err("a byte sequence without its closing `:` or with a character outside base64"));
        }
        let text = self.slice_str(start);
        self.pos += 1;
        // Canonical padded base64 only: the same bytes have one spelling.
        let bytes = STANDARD.decode(text.as_bytes()).map_err(|_| Error::Base64 { header: self.header })?;
        Ok(Bare::Bytes(bytes))
    }
}

/// Serialises a bare item (RFC 8941 §4.1.3).
pub(crate) fn serialize_bare(out: &mut String, item: &Bare) {
    match item {
        Bare::Int(n) => out.push_str(&n.to_string()),
        Bare::Str(s) => {
            out.push('"');
            for c in s.chars() {
                if c == '"' || c == '\\' {
                    out.push('\\');
                }
                out.push(c);
            }
            out.push('"');
        }
        Bare::Bytes(b) => {
            out.push(':');
            out.push_str(&STANDARD.encode(b));
            out.push(':');
        }
    }
}

/// Serialises parameters (RFC 8941 §4.1.1.2).
pub(crate) fn serialize_params(out: &mut String, params: &[(String, Bare)]) {
    for (name, value) in params {
        out.push(';');
        out.push_str(name);
        out.push('=');
        serialize_bare(out, value);
    }
}

/// Serialises an inner list of strings with parameters (RFC 8941 §4.1.1.1): the value of
/// `@signature-params` and of a `Signature-Input` member.
pub(crate) fn serialize_inner_list(items: &[&str], params: &[(String, Bare)]) -> String {
    let mut out = String::from("(");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        serialize_bare(&mut out, &Bare::Str((*item).to_string()));
    }
    out.push(')');
    serialize_params(&mut out, params);
    out
}
