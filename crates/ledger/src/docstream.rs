//! Reading a JSON document of the export and attestation formats as a stream.
//!
//! The top-level object is scanned member by member. Every member but `records` is captured
//! whole (at most [`MAX_MEMBER_BYTES`]) and handed to serde; the `records` array is handed over
//! one element at a time (each at most [`MAX_ELEMENT_BYTES`]), to be checked and dropped. So a
//! document of any length is read in memory bounded by those two sizes.
//!
//! The scanner only finds where a value ends (strings, escapes, nesting); serde parses every
//! captured value and so rejects what is not JSON. Only the member names the formats define are
//! accepted, each once.
//!
//! Must not: interpret records (the verifier does), or hold more than one element.

use std::io::{Read, Seek, SeekFrom};

/// Bound on one top-level member other than `records` (the checkpoint note is at most 16 KiB,
/// an attestation's record at most 64 KiB before escaping).
pub const MAX_MEMBER_BYTES: usize = 1 << 20;
/// Bound on one element of `records`: a record (at most 64 KiB, at most doubled by escaping)
/// and its inclusion proof.
pub const MAX_ELEMENT_BYTES: usize = 1 << 20;
/// Member names longer than this are not ours.
const MAX_NAME_BYTES: usize = 64;
/// The member names of the export and attestation formats.
const NAMES: [&str; 11] = [
    "format",
    "origin",
    "host_vkey",
    "checkpoint",
    "full",
    "filter",
    "records",
    "consistency",
    "index",
    "record",
    "inclusion_proof",
];

const BUF: usize = 64 * 1024;

/// Why a document could not be read.
#[derive(Debug)]
pub struct ScanError {
    /// Byte offset in the document where it went wrong.
    pub offset: u64,
    pub reason: String,
}

impl std::fmt::Display for ScanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at byte {}: {}", self.offset, self.reason)
    }
}

/// What happens to the `records` array when the scanner reaches it.
pub trait RecordSink {
    /// Called when the array is reached, with the members read before it: whether to take its
    /// elements (else they are skipped, and [`TopLevel::records_at`] says where to come back).
    fn start(&mut self, members: &[(String, Vec<u8>)]) -> bool;
    /// One element's bytes, with its position from 0.
    fn element(&mut self, position: usize, bytes: &[u8]);
}

/// Skips the records.
pub struct Skip;

impl RecordSink for Skip {
    fn start(&mut self, _: &[(String, Vec<u8>)]) -> bool {
        false
    }
    fn element(&mut self, _: usize, _: &[u8]) {}
}

/// The top-level members read, in document order, and where `records` starts.
#[derive(Debug, Default)]
pub struct TopLevel {
    pub members: Vec<(String, Vec<u8>)>,
    /// Offset of the `[` of the records array, when there is one.
    pub records_at: Option<u64>,
    /// Whether the records were handed to the callback (else skipped).
    pub records_streamed: bool,
    /// Elements of `records` seen.
    pub records_count: usize,
}

impl TopLevel {
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.members.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }
}

pub struct Scanner<R> {
    r: R,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
    /// Offset of `buf[0]` in the document.
    base: u64,
}

impl<R: Read> Scanner<R> {
    pub fn new(r: R) -> Self {
        Scanner { r, buf: vec![0; BUF].into_boxed_slice(), pos: 0, len: 0, base: 0 }
    }

    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    fn err(&self, reason: impl Into<String>) -> ScanError {
        ScanError { offset: self.offset(), reason: reason.into() }
    }

    /// Refills the buffer; `false` at the end of the document.
    fn fill(&mut self) -> Result<bool, ScanError> {
        if self.pos < self.len {
            return Ok(true);
        }
        self.base += self.len as u64;
        self.pos = 0;
        self.len = 0;
        loop {
            match self.r.read(&mut self.buf) {
                Ok(n) => {
                    self.len = n;
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.err(format!("read failed: {e}"))),
            }
        }
    }

    /// The next byte that is not JSON whitespace, not consumed; `None` at the end.
    fn peek(&mut self) -> Result<Option<u8>, ScanError> {
        loop {
            if !self.fill()? {
                return Ok(None);
            }
            while let Some(&b) = self.buf.get(self.pos).filter(|_| self.pos < self.len) {
                if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                    self.pos += 1;
                } else {
                    return Ok(Some(b));
                }
            }
        }
    }

    fn expect(&mut self, want: u8, what: &str) -> Result<(), ScanError> {
        match self.peek()? {
            Some(b) if b == want => {
                self.pos += 1;
                Ok(())
            }
            Some(b) => Err(self.err(format!("expected {what}, found {:?}", char::from(b)))),
            None => Err(self.err(format!("the document ends where {what} was expected (cut short?)"))),
        }
    }

    /// Reads one JSON value's bytes into `out` (cleared first), at most `max` bytes when
    /// `out` is given; skips it otherwise.
    fn value(
        &mut self,
        mut out: Option<&mut Vec<u8>>,
        max: usize,
        what: &dyn std::fmt::Display,
    ) -> Result<(), ScanError> {
        if let Some(o) = out.as_deref_mut() {
            o.clear();
        }
        let Some(first) = self.peek()? else {
            return Err(self.err(format!("the document ends where {what} was expected (cut short?)")));
        };
        let start = self.offset();
        let mut depth: usize = 0;
        let mut in_string = false;
        let mut escaped = false;
        let scalar = !matches!(first, b'"' | b'{' | b'[');
        loop {
            if !self.fill()? {
                if scalar && depth == 0 && !in_string {
                    return Ok(());
                }
                return Err(
                    self.err(format!("the document ends inside {what} that starts at byte {start} (cut short?)"))
                );
            }
            let chunk_start = self.pos;
            let mut done = false;
            while self.pos < self.len {
                if in_string && !escaped {
                    // Most of a document is inside strings: skip to the next quote or backslash.
                    let rest = self.buf.get(self.pos..self.len).unwrap_or_default();
                    match memchr::memchr2(b'"', b'\\', rest) {
                        Some(skip) => self.pos += skip,
                        None => {
                            self.pos = self.len;
                            break;
                        }
                    }
                }
                let Some(&b) = self.buf.get(self.pos) else { break };
                if in_string {
                    if escaped {
                        escaped = false;
                    } else if b == b'\\' {
                        escaped = true;
                    } else if b == b'"' {
                        in_string = false;
                        if depth == 0 {
                            self.pos += 1;
                            done = true;
                            break;
                        }
                    }
                } else if scalar {
                    if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        done = true;
                        break;
                    }
                } else {
                    match b {
                        b'"' => in_string = true,
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth = depth.saturating_sub(1);
                            if depth == 0 {
                                self.pos += 1;
                                done = true;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                self.pos += 1;
            }
            if let Some(o) = out.as_deref_mut() {
                let piece = self.buf.get(chunk_start..self.pos).unwrap_or_default();
                if o.len() + piece.len() > max {
                    return Err(ScanError {
                        offset: start,
                        reason: format!("{what} is larger than {max} bytes, more than any valid document holds"),
                    });
                }
                o.extend_from_slice(piece);
            }
            if done {
                return Ok(());
            }
        }
    }

    /// Reads the top-level object. `records` decides what happens to the records array.
    pub fn top_level(&mut self, sink: &mut dyn RecordSink) -> Result<TopLevel, ScanError> {
        let mut top = TopLevel::default();
        self.expect(b'{', "a JSON object")?;
        let mut name_buf = Vec::new();
        if self.peek()? == Some(b'}') {
            self.pos += 1;
        } else {
            loop {
                let at = self.offset();
                if self.peek()? != Some(b'"') {
                    return Err(self.err("expected a member name"));
                }
                self.value(Some(&mut name_buf), MAX_NAME_BYTES, &"a member name")?;
                let name: String = serde_json::from_slice(&name_buf)
                    .map_err(|e| ScanError { offset: at, reason: format!("member name: {e}") })?;
                if !NAMES.contains(&name.as_str()) {
                    return Err(ScanError { offset: at, reason: format!("unknown member {name:?}") });
                }
                if top.members.iter().any(|(n, _)| *n == name) || (name == "records" && top.records_at.is_some()) {
                    return Err(ScanError { offset: at, reason: format!("duplicate member {name:?}") });
                }
                self.expect(b':', "':' after a member name")?;
                if name == "records" {
                    self.peek()?;
                    top.records_at = Some(self.offset());
                    top.records_streamed = sink.start(&top.members);
                    top.records_count = self.records(sink, top.records_streamed)?;
                } else {
                    let mut v = Vec::new();
                    self.value(Some(&mut v), MAX_MEMBER_BYTES, &format!("member {name:?}"))?;
                    top.members.push((name, v));
                }
                match self.peek()? {
                    Some(b',') => self.pos += 1,
                    Some(b'}') => {
                        self.pos += 1;
                        break;
                    }
                    Some(b) => {
                        return Err(self.err(format!("expected ',' or '}}' after a member, found {:?}", char::from(b))))
                    }
                    None => return Err(self.err("the document ends inside the top-level object (cut short?)")),
                }
            }
        }
        if let Some(b) = self.peek()? {
            return Err(self.err(format!("unexpected {:?} after the document", char::from(b))));
        }
        Ok(top)
    }

    /// Reads the records array at the current position, handing its elements to `sink` if
    /// `take`; returns the number of elements.
    pub fn records(&mut self, sink: &mut dyn RecordSink, take: bool) -> Result<usize, ScanError> {
        self.expect(b'[', "'[' (records is an array)")?;
        let mut count = 0usize;
        if self.peek()? == Some(b']') {
            self.pos += 1;
            return Ok(0);
        }
        let mut element = Vec::new();
        loop {
            let what = Entry(count);
            if take {
                self.value(Some(&mut element), MAX_ELEMENT_BYTES, &what)?;
                sink.element(count, &element);
            } else {
                self.value(None, 0, &what)?;
            }
            count += 1;
            match self.peek()? {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(count);
                }
                Some(b) => return Err(self.err(format!("expected ',' or ']' after {what}, found {:?}", char::from(b)))),
                None => return Err(self.err(format!("the document ends after {what} (cut short?)"))),
            }
        }
    }
}

/// "records entry #N", written only into an error.
struct Entry(usize);

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "records entry #{}", self.0)
    }
}

impl<R: Read + Seek> Scanner<R> {
    /// Moves to `offset` in the document (for a second pass over the records).
    pub fn seek(&mut self, offset: u64) -> Result<(), ScanError> {
        self.r.seek(SeekFrom::Start(offset)).map_err(|e| ScanError { offset, reason: format!("seek failed: {e}") })?;
        self.base = offset;
        self.pos = 0;
        self.len = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[derive(Default)]
    struct Collect(Vec<String>);

    impl RecordSink for Collect {
        fn start(&mut self, _: &[(String, Vec<u8>)]) -> bool {
            true
        }
        fn element(&mut self, position: usize, bytes: &[u8]) {
            assert_eq!(position, self.0.len());
            self.0.push(String::from_utf8_lossy(bytes).into_owned());
        }
    }

    fn scan(doc: &str) -> Result<(TopLevel, Vec<String>), ScanError> {
        let mut seen = Collect::default();
        let top = Scanner::new(Cursor::new(doc.as_bytes())).top_level(&mut seen)?;
        Ok((top, seen.0))
    }

    #[test]
    fn members_and_elements_are_cut_where_they_end() {
        let doc =
            r#" { "format" : "x\"}]" , "full":true,"records":[ {"a":"]}\\"}, [1,[2]] ,3 ,"s"],"filter":{"p":null} } "#;
        let (top, seen) = scan(doc).unwrap();
        assert_eq!(top.get("format"), Some(br#""x\"}]""#.as_slice()));
        assert_eq!(top.get("full"), Some(b"true".as_slice()));
        assert_eq!(top.get("filter"), Some(br#"{"p":null}"#.as_slice()));
        assert_eq!(seen, [r#"{"a":"]}\\"}"#, "[1,[2]]", "3", r#""s""#]);
        assert_eq!(top.records_count, 4);
        assert!(top.records_streamed);
    }

    #[test]
    fn small_buffers_and_a_second_pass_read_the_same() {
        let mut doc = String::from(r#"{"records":["#);
        for i in 0..5000 {
            doc.push_str(&format!(
                "{}{{\"index\":{i},\"record\":\"{}\"}}",
                if i > 0 { "," } else { "" },
                "\\\"x".repeat(i % 50)
            ));
        }
        doc.push_str(r#"],"format":"f"}"#);
        let mut s = Scanner::new(Cursor::new(doc.as_bytes()));
        let top = s.top_level(&mut Skip).unwrap();
        assert_eq!(top.records_count, 5000);
        assert!(!top.records_streamed);
        s.seek(top.records_at.unwrap()).unwrap();
        let mut seen = Collect::default();
        assert_eq!(s.records(&mut seen, true).unwrap(), 5000);
        for (pos, e) in seen.0.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(e).unwrap();
            assert_eq!(v["index"], pos);
        }
    }

    #[test]
    fn broken_documents_are_refused_with_an_offset() {
        for (doc, says) in [
            ("", "ends"),
            ("[]", "expected a JSON object"),
            (r#"{"format":"x""#, "ends inside the top-level"),
            (r#"{"records":[{"a":1},"#, "ends"),
            (r#"{"records":[{"a":"#, "cut short"),
            (r#"{"bogus":1}"#, "unknown member"),
            (r#"{"format":1,"format":2}"#, "duplicate member"),
            (r#"{"records":[],"records":[]}"#, "duplicate member"),
            (r#"{"format":1} x"#, "after the document"),
            (r#"{"format" 1}"#, "':'"),
        ] {
            let err = scan(doc).map(|_| ()).unwrap_err();
            assert!(err.to_string().contains(says), "{doc}: {err}");
        }
    }

    #[test]
    fn oversized_members_and_elements_are_refused() {
        let big = format!(r#"{{"origin":"{}"}}"#, "a".repeat(MAX_MEMBER_BYTES));
        assert!(scan(&big).unwrap_err().reason.contains("larger than"));
        let big = format!(r#"{{"records":[{{"record":"{}"}}]}}"#, "a".repeat(MAX_ELEMENT_BYTES));
        assert!(scan(&big).unwrap_err().reason.contains("larger than"));
    }
}
