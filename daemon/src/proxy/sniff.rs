//! What does a redirected connection speak? A bounded, strict look at its first bytes.
//!
//! The proxy reads at most [`MAX_SNIFF`] bytes before deciding, and calls [`sniff`] on everything
//! read so far after each read:
//!
//! * a TLS ClientHello gives the server name (SNI) and the offered ALPN protocols;
//! * a plain HTTP/1.x request head gives the method, the request target and the `Host` header;
//! * anything else is [`Sniff::Other`], which falls to the raw-TCP policy.
//!
//! Strictness is the point: these bytes come from the agent, and the SNI or `Host` decides which
//! policy applies. Lengths that disagree, trailing bytes, duplicated extensions, more than one
//! host name, bare LF line ends, obsolete header folding and duplicate `Host` headers are all
//! `Other` rather than a best guess, so two parsers (ours and the TLS library's, ours and hyper's)
//! can never read one message two ways.
//!
//! A ClientHello may span several TLS records (large post-quantum key shares make this happen in
//! practice); it is reassembled as long as all its records fit in [`MAX_SNIFF`] bytes. Other record
//! types between its fragments, zero-length fragments and a record that continues past the end of
//! the ClientHello are `Other`.
//!
//! Monotonic by construction: once [`sniff`] gives an answer other than [`Sniff::NeedMore`] for
//! some bytes, it gives the same answer for those bytes followed by anything. `NeedMore` is only
//! returned while every byte seen so far is consistent with a valid message and fewer than
//! [`MAX_SNIFF`] bytes have been seen.

use crate::domain::{DomainError, DomainName};

/// Most bytes the proxy buffers before deciding; beyond this, `NeedMore` becomes `Other`.
pub const MAX_SNIFF: usize = 16 * 1024;
/// Most bytes of an HTTP request head (request line and headers, up to the empty line).
pub const MAX_HTTP_HEAD: usize = 8 * 1024;

/// TLS plaintext records carry at most 2^14 bytes (RFC 8446 §5.1).
const MAX_RECORD: usize = 16 * 1024;
const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniff {
    /// Consistent so far; read more and call again.
    NeedMore,
    Tls(ClientHelloInfo),
    Http(HttpStart),
    /// Not TLS, not HTTP/1.x, malformed, or too long to decide: raw-TCP policy.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The one `host_name` of the server_name extension, as sent (printable ASCII, not yet
    /// normalised: use [`ClientHelloInfo::server_name`]).
    pub sni: Option<String>,
    /// The ALPN protocol names offered, in the client's order (empty when none).
    pub alpn: Vec<Vec<u8>>,
}

impl ClientHelloInfo {
    /// The SNI as a [`DomainName`]: `Ok(None)` without SNI, an error for IP literals and other
    /// names the proxy must refuse.
    pub fn server_name(&self) -> Result<Option<DomainName>, DomainError> {
        self.sni.as_deref().map(DomainName::parse).transpose()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

const METHODS: [(&[u8], HttpMethod); 9] = [
    (b"GET", HttpMethod::Get),
    (b"HEAD", HttpMethod::Head),
    (b"POST", HttpMethod::Post),
    (b"PUT", HttpMethod::Put),
    (b"DELETE", HttpMethod::Delete),
    (b"CONNECT", HttpMethod::Connect),
    (b"OPTIONS", HttpMethod::Options),
    (b"TRACE", HttpMethod::Trace),
    (b"PATCH", HttpMethod::Patch),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpStart {
    pub method: HttpMethod,
    /// The request target as sent: origin form (`/path`), absolute form (`http://h/p`, a client
    /// that thinks it talks to a proxy) or, for `CONNECT`, authority form (`host:port`).
    pub target: String,
    /// The value of the one `Host` header (optional whitespace trimmed), `None` if absent.
    pub host: Option<String>,
}

/// Classifies the first bytes of a connection. Never panics; looks at no more than [`MAX_SNIFF`]
/// bytes of `buf`.
pub fn sniff(buf: &[u8]) -> Sniff {
    let seen = buf.get(..MAX_SNIFF).unwrap_or(buf);
    let verdict = match seen.first() {
        None => Sniff::NeedMore,
        Some(&CONTENT_HANDSHAKE) => sniff_tls(seen),
        Some(b) if b.is_ascii_uppercase() => sniff_http(seen),
        Some(_) => Sniff::Other,
    };
    if verdict == Sniff::NeedMore && seen.len() >= MAX_SNIFF {
        return Sniff::Other;
    }
    verdict
}

// ---- TLS ------------------------------------------------------------------------------------

fn sniff_tls(buf: &[u8]) -> Sniff {
    let mut handshake: Vec<u8> = Vec::new();
    let mut pos = 0usize;
    loop {
        let rest = buf.get(pos..).unwrap_or_default();
        if rest.len() < RECORD_HEADER {
            return partial_record_header(rest);
        }
        let mut r = Reader::new(rest);
        let (Some(content_type), Some(version), Some(len)) = (r.u8(), r.u16(), r.u16()) else {
            return Sniff::Other;
        };
        let len = usize::from(len);
        // Record-layer version is 0x0301..=0x0303 in practice; 0x0300 (SSL 3) and others are refused.
        if content_type != CONTENT_HANDSHAKE || !(0x0301..=0x0303).contains(&version) || len == 0 || len > MAX_RECORD {
            return Sniff::Other;
        }
        let body = r.rest();
        let fragment = body.get(..len).unwrap_or(body);
        handshake.extend_from_slice(fragment);
        let record_complete = fragment.len() == len;

        if let Some(&kind) = handshake.first() {
            if kind != HANDSHAKE_CLIENT_HELLO {
                return Sniff::Other;
            }
        }
        if let Some(header) = handshake.get(..4) {
            let body_len = (usize::from(header[1]) << 16) | (usize::from(header[2]) << 8) | usize::from(header[3]);
            let needed = 4 + body_len;
            // Even in one record it could never fit in what we are willing to buffer.
            if needed + RECORD_HEADER > MAX_SNIFF {
                return Sniff::Other;
            }
            if handshake.len() >= needed {
                // The ClientHello must end exactly where its last record ends.
                if handshake.len() > needed || !record_complete {
                    return Sniff::Other;
                }
                return match handshake.get(4..needed).and_then(parse_client_hello) {
                    Some(info) => Sniff::Tls(info),
                    None => Sniff::Other,
                };
            }
        }
        if !record_complete {
            return Sniff::NeedMore;
        }
        pos += RECORD_HEADER + len;
    }
}

/// Fewer than five bytes of a record header: consistent so far, or not a handshake record.
fn partial_record_header(rest: &[u8]) -> Sniff {
    let ok = match rest {
        [] => true,
        [t] => *t == CONTENT_HANDSHAKE,
        [t, major, ..] => {
            *t == CONTENT_HANDSHAKE && *major == 3 && rest.get(2).is_none_or(|minor| (1..=3).contains(minor))
        }
    };
    if ok {
        Sniff::NeedMore
    } else {
        Sniff::Other
    }
}

/// Parses a complete ClientHello body (after the 4-byte handshake header). `None` = malformed.
fn parse_client_hello(body: &[u8]) -> Option<ClientHelloInfo> {
    let mut r = Reader::new(body);
    let legacy_version = r.u16()?;
    if !(0x0301..=0x0303).contains(&legacy_version) {
        return None;
    }
    r.take(32)?; // random
    let session_id_len = r.u8()?;
    if session_id_len > 32 {
        return None;
    }
    r.take(usize::from(session_id_len))?;
    let suites_len = usize::from(r.u16()?);
    if suites_len == 0 || suites_len % 2 != 0 {
        return None;
    }
    r.take(suites_len)?;
    let compression_len = usize::from(r.u8()?);
    // The null method must be offered (and is the only one TLS 1.3 allows).
    if !r.take(compression_len)?.contains(&0) {
        return None;
    }
    let mut info = ClientHelloInfo { sni: None, alpn: Vec::new() };
    if r.is_empty() {
        return Some(info); // TLS 1.2 without extensions
    }
    let extensions_len = usize::from(r.u16()?);
    let mut extensions = Reader::new(r.take(extensions_len)?);
    if !r.is_empty() {
        return None;
    }
    let mut seen = ExtensionSet::default();
    while !extensions.is_empty() {
        let kind = extensions.u16()?;
        let len = usize::from(extensions.u16()?);
        let data = extensions.take(len)?;
        if !seen.insert(kind) {
            return None;
        }
        match kind {
            EXT_SERVER_NAME => info.sni = Some(parse_server_name(data)?),
            EXT_ALPN => info.alpn = parse_alpn(data)?,
            _ => {}
        }
    }
    Some(info)
}

/// RFC 6066 §3: a list that must hold exactly one entry, of type host_name, non-empty, printable
/// ASCII.
fn parse_server_name(data: &[u8]) -> Option<String> {
    let mut r = Reader::new(data);
    let list_len = usize::from(r.u16()?);
    let mut list = Reader::new(r.take(list_len)?);
    if !r.is_empty() {
        return None;
    }
    let name_type = list.u8()?;
    let name_len = usize::from(list.u16()?);
    let name = list.take(name_len)?;
    if name_type != 0 || name.is_empty() || !list.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    String::from_utf8(name.to_vec()).ok()
}

/// RFC 7301 §3.1: a non-empty list of non-empty protocol names.
fn parse_alpn(data: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut r = Reader::new(data);
    let list_len = usize::from(r.u16()?);
    let mut list = Reader::new(r.take(list_len)?);
    if !r.is_empty() || list.is_empty() {
        return None;
    }
    let mut protocols = Vec::new();
    while !list.is_empty() {
        let len = usize::from(list.u8()?);
        if len == 0 {
            return None;
        }
        protocols.push(list.take(len)?.to_vec());
    }
    Some(protocols)
}

/// One bit per extension type: duplicate detection in O(1) whatever the number of extensions.
struct ExtensionSet(Box<[u64; 1024]>);

impl Default for ExtensionSet {
    fn default() -> Self {
        ExtensionSet(Box::new([0; 1024]))
    }
}

impl ExtensionSet {
    /// False if `kind` was already present.
    fn insert(&mut self, kind: u16) -> bool {
        let (word, bit) = (usize::from(kind / 64), 1u64 << (kind % 64));
        match self.0.get_mut(word) {
            Some(w) if *w & bit == 0 => {
                *w |= bit;
                true
            }
            _ => false,
        }
    }
}

/// A bounds-checked cursor: every read is `None` past the end instead of a panic.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    fn rest(&self) -> &'a [u8] {
        self.buf
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).and_then(|b| b.first().copied())
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| b.iter().fold(0u16, |acc, &x| (acc << 8) | u16::from(x)))
    }
}

// ---- HTTP/1.x -------------------------------------------------------------------------------

fn sniff_http(buf: &[u8]) -> Sniff {
    // The method and its space first: a prefix of a known method is worth waiting for.
    let Some(space) = buf.iter().position(|&b| b == b' ') else {
        let prefix_of_method = METHODS.iter().any(|(m, _)| m.starts_with(buf));
        return if prefix_of_method { Sniff::NeedMore } else { Sniff::Other };
    };
    let Some(method) = buf.get(..space).and_then(|m| METHODS.iter().find(|(name, _)| *name == m)).map(|(_, m)| *m)
    else {
        return Sniff::Other;
    };
    let head = buf.get(..MAX_HTTP_HEAD).unwrap_or(buf);
    let mut lines = Lines { buf: head };
    let request_line = match lines.next_line() {
        Line::Complete(line) => line,
        Line::Partial(partial) => {
            return if partial_request_line_ok(partial, space) { need_more_http(buf) } else { Sniff::Other };
        }
        Line::Bad => return Sniff::Other,
    };
    let Some(target) = parse_request_line(request_line, space) else {
        return Sniff::Other;
    };
    let mut host: Option<String> = None;
    loop {
        match lines.next_line() {
            Line::Complete([]) => return Sniff::Http(HttpStart { method, target, host }),
            Line::Complete(line) => match parse_header(line) {
                Some((name, value)) if name.eq_ignore_ascii_case(b"host") => {
                    if host.is_some() {
                        return Sniff::Other; // two Host headers: which one would policy see?
                    }
                    // A host is ASCII; obs-text in it is refused rather than guessed at.
                    match std::str::from_utf8(value) {
                        Ok(v) if v.is_ascii() => host = Some(v.to_string()),
                        _ => return Sniff::Other,
                    }
                }
                Some(_) => {}
                None => return Sniff::Other,
            },
            Line::Partial(partial) => {
                return if partial_header_ok(partial) { need_more_http(buf) } else { Sniff::Other };
            }
            Line::Bad => return Sniff::Other,
        }
    }
}

/// Waiting is only worth it while the head may still end within [`MAX_HTTP_HEAD`].
fn need_more_http(buf: &[u8]) -> Sniff {
    if buf.len() >= MAX_HTTP_HEAD {
        Sniff::Other
    } else {
        Sniff::NeedMore
    }
}

enum Line<'a> {
    /// A line without its CRLF.
    Complete(&'a [u8]),
    /// The rest of the buffer, no line end yet (possibly ending in a lone CR).
    Partial(&'a [u8]),
    /// A bare LF or a CR not followed by LF.
    Bad,
}

struct Lines<'a> {
    buf: &'a [u8],
}

impl<'a> Lines<'a> {
    fn next_line(&mut self) -> Line<'a> {
        let Some(i) = self.buf.iter().position(|&b| b == b'\r' || b == b'\n') else {
            return Line::Partial(self.buf);
        };
        let (line, rest) = self.buf.split_at(i);
        match rest {
            [b'\r', b'\n', tail @ ..] => {
                self.buf = tail;
                Line::Complete(line)
            }
            [b'\r'] => Line::Partial(line),
            _ => Line::Bad,
        }
    }
}

/// `METHOD SP target SP HTTP/1.x`; returns the target.
fn parse_request_line(line: &[u8], space: usize) -> Option<String> {
    let rest = line.get(space + 1..)?;
    let target_end = rest.iter().position(|&b| b == b' ')?;
    let (target, version) = (rest.get(..target_end)?, rest.get(target_end + 1..)?);
    if target.is_empty() || !target.iter().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        return None;
    }
    String::from_utf8(target.to_vec()).ok()
}

/// An incomplete request line that could still become a valid one.
fn partial_request_line_ok(partial: &[u8], space: usize) -> bool {
    let Some(rest) = partial.get(space + 1..) else { return true };
    match rest.iter().position(|&b| b == b' ') {
        None => rest.iter().all(|b| b.is_ascii_graphic()),
        Some(end) => {
            let (target, version) = (rest.get(..end).unwrap_or_default(), rest.get(end + 1..).unwrap_or_default());
            !target.is_empty()
                && target.iter().all(|b| b.is_ascii_graphic())
                && (b"HTTP/1.1".starts_with(version) || b"HTTP/1.0".starts_with(version))
        }
    }
}

/// `name: OWS value OWS` with a token name (no space before the colon, no folding) and a value
/// free of control characters. Returns the name and the trimmed value.
fn parse_header(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = line.iter().position(|&b| b == b':')?;
    let (name, value) = (line.get(..colon)?, line.get(colon + 1..)?);
    if name.is_empty() || !name.iter().all(|&b| is_token(b)) || !value.iter().all(|&b| is_field_byte(b)) {
        return None;
    }
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !ows(b)).unwrap_or(value.len());
    let end = value.iter().rposition(|b| !ows(b)).map_or(start, |i| i + 1);
    Some((name, value.get(start..end).unwrap_or_default()))
}

/// An incomplete header line that could still become a valid one.
fn partial_header_ok(partial: &[u8]) -> bool {
    match partial.iter().position(|&b| b == b':') {
        None => partial.iter().all(|&b| is_token(b)),
        Some(colon) => {
            let (name, value) =
                (partial.get(..colon).unwrap_or_default(), partial.get(colon + 1..).unwrap_or_default());
            !name.is_empty() && name.iter().all(|&b| is_token(b)) && value.iter().all(|&b| is_field_byte(b))
        }
    }
}

/// RFC 9110 §5.6.2 tchar.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 9110 §5.5 field-value bytes: visible characters, obs-text, space and tab.
fn is_field_byte(b: u8) -> bool {
    b == b' ' || b == b'\t' || b.is_ascii_graphic() || b >= 0x80
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};
    use std::sync::Arc;

    /// The first flight of a real rustls client: its ClientHello record(s).
    fn rustls_hello(server: &str, alpn: &[&[u8]], tls12_only: bool) -> Vec<u8> {
        let builder = ClientConfig::builder_with_provider(crate::tls::crypto_provider());
        let builder = if tls12_only {
            builder.with_protocol_versions(&[&rustls::version::TLS12])
        } else {
            builder.with_safe_default_protocol_versions()
        };
        let mut config = builder.unwrap().with_root_certificates(RootCertStore::empty()).with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = ServerName::try_from(server.to_string()).unwrap();
        let mut conn = ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    fn u16be(n: usize) -> [u8; 2] {
        u16::try_from(n).unwrap().to_be_bytes()
    }

    /// A ClientHello body with the given raw extensions block (None: no extensions at all).
    fn hello_body_raw(extensions: Option<Vec<u8>>) -> Vec<u8> {
        let mut b = vec![0x03, 0x03];
        b.extend([7u8; 32]); // random
        b.push(32);
        b.extend([9u8; 32]); // session id
        b.extend([0x00, 0x04, 0x13, 0x01, 0x13, 0x02]); // two suites
        b.extend([0x01, 0x00]); // null compression
        if let Some(e) = extensions {
            b.extend(u16be(e.len()));
            b.extend(e);
        }
        b
    }

    fn ext(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut e = kind.to_be_bytes().to_vec();
        e.extend(u16be(data.len()));
        e.extend(data);
        e
    }

    fn sni_data(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, name) in entries {
            list.push(*kind);
            list.extend(u16be(name.len()));
            list.extend(*name);
        }
        let mut d = u16be(list.len()).to_vec();
        d.extend(list);
        d
    }

    fn alpn_data(protocols: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for p in protocols {
            list.push(u8::try_from(p.len()).unwrap());
            list.extend(*p);
        }
        let mut d = u16be(list.len()).to_vec();
        d.extend(list);
        d
    }

    fn handshake_msg(body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        let mut m = vec![HANDSHAKE_CLIENT_HELLO, len[1], len[2], len[3]];
        m.extend(body);
        m
    }

    /// Wraps handshake bytes in records of at most `chunk` bytes.
    fn records(handshake: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in handshake.chunks(chunk) {
            out.extend([CONTENT_HANDSHAKE, 0x03, 0x01]);
            out.extend(u16be(piece.len()));
            out.extend(piece);
        }
        out
    }

    fn hello(extensions: &[Vec<u8>]) -> Vec<u8> {
        records(&handshake_msg(&hello_body_raw(Some(extensions.concat()))), MAX_RECORD)
    }

    fn tls(sni: Option<&str>, alpn: &[&[u8]]) -> Sniff {
        Sniff::Tls(ClientHelloInfo { sni: sni.map(str::to_string), alpn: alpn.iter().map(|p| p.to_vec()).collect() })
    }

    // -- TLS: real ClientHellos ---------------------------------------------------------------

    #[test]
    fn real_client_hellos_give_sni_and_alpn() {
        let h13 = rustls_hello("API.example.com", &[b"h2", b"http/1.1"], false);
        // Reported as sent; normalisation is DomainName's job.
        assert_eq!(sniff(&h13), tls(Some("API.example.com"), &[b"h2", b"http/1.1"]));
        let h12 = rustls_hello("example.org", &[], true);
        assert_eq!(sniff(&h12), tls(Some("example.org"), &[]));
        // rustls sends no SNI for an IP address.
        assert_eq!(sniff(&rustls_hello("192.0.2.1", &[b"h2"], false)), tls(None, &[b"h2"]));
        // Bytes after the ClientHello (early data, the next flight) do not change the answer.
        let mut more = h12.clone();
        more.extend([0x17, 0x03, 0x03, 0x00, 0x01, 0xff]);
        assert_eq!(sniff(&more), sniff(&h12));
    }

    #[test]
    fn every_truncation_of_a_real_client_hello_is_need_more() {
        for (server, tls12) in [("api.example.com", false), ("example.org", true)] {
            let full = rustls_hello(server, &[b"h2"], tls12);
            assert!(matches!(sniff(&full), Sniff::Tls(_)));
            for cut in 0..full.len() {
                assert_eq!(sniff(&full[..cut]), Sniff::NeedMore, "{server}: prefix of {cut} bytes");
            }
        }
    }

    #[test]
    fn client_hello_spanning_records_is_reassembled_and_its_prefixes_wait() {
        let real = rustls_hello("split.example.com", &[b"http/1.1"], false);
        let handshake = &real[RECORD_HEADER..];
        for chunk in [1, 2, 3, 50, 200] {
            let split = records(handshake, chunk);
            assert_eq!(sniff(&split), tls(Some("split.example.com"), &[b"http/1.1"]), "chunk {chunk}");
            for cut in 0..split.len() {
                assert_eq!(sniff(&split[..cut]), Sniff::NeedMore, "chunk {chunk}, prefix {cut}");
            }
        }
    }

    #[test]
    fn records_that_interleave_or_overrun_the_client_hello_are_refused() {
        let real = rustls_hello("a.example.com", &[], false);
        let handshake = &real[RECORD_HEADER..];
        // An alert record between two fragments.
        let (one, two) = handshake.split_at(40);
        let mut mixed = records(one, MAX_RECORD);
        mixed.extend([0x15, 0x03, 0x03, 0x00, 0x02, 0x01, 0x00]);
        mixed.extend(records(two, MAX_RECORD));
        assert_eq!(sniff(&mixed), Sniff::Other);
        // A zero-length fragment.
        let mut empty = records(one, MAX_RECORD);
        empty.extend([CONTENT_HANDSHAKE, 0x03, 0x01, 0x00, 0x00]);
        assert_eq!(sniff(&empty), Sniff::Other);
        // The record continues past the ClientHello (a second handshake message smuggled in it).
        let mut longer = handshake.to_vec();
        longer.extend(handshake);
        assert_eq!(sniff(&records(&longer, MAX_RECORD)), Sniff::Other);
        // ... even when those bytes have not arrived yet.
        let mut claims_more = real.clone();
        let len = u16::from_be_bytes([real[3], real[4]]) + 10;
        claims_more[3..5].copy_from_slice(&len.to_be_bytes());
        assert_eq!(sniff(&claims_more), Sniff::Other);
    }

    // -- TLS: hand-built ClientHellos ----------------------------------------------------------

    #[test]
    fn hand_built_hellos_without_sni_or_extensions() {
        assert_eq!(sniff(&hello(&[ext(EXT_ALPN, &alpn_data(&[b"h2"]))])), tls(None, &[b"h2"]));
        let no_ext = records(&handshake_msg(&hello_body_raw(None)), MAX_RECORD);
        assert_eq!(sniff(&no_ext), tls(None, &[]));
        // An empty extensions block is also well formed.
        assert_eq!(sniff(&hello(&[])), tls(None, &[]));
    }

    #[test]
    fn sni_with_two_names_or_other_entry_types_is_refused() {
        let one = ext(EXT_SERVER_NAME, &sni_data(&[(0, b"a.example.com")]));
        assert_eq!(sniff(&hello(std::slice::from_ref(&one))), tls(Some("a.example.com"), &[]));
        for bad in [
            sni_data(&[(0, b"a.example.com"), (0, b"b.example.com")]),
            sni_data(&[(0, b"a.example.com"), (1, b"x")]),
            sni_data(&[(1, b"a.example.com")]),
            sni_data(&[(0, b"")]),
            sni_data(&[]),
            sni_data(&[(0, b"a.exa mple.com")]),
            sni_data(&[(0, b"a.example.com\0")]),
            sni_data(&[(0, "ex\u{e4}mple.com".as_bytes())]),
            Vec::new(), // the empty form only servers send
        ] {
            assert_eq!(sniff(&hello(&[ext(EXT_SERVER_NAME, &bad)])), Sniff::Other, "{bad:?}");
        }
        // Two server_name extensions, each with one name: which would policy see?
        let two = ext(EXT_SERVER_NAME, &sni_data(&[(0, b"b.example.com")]));
        assert_eq!(sniff(&hello(&[one.clone(), two])), Sniff::Other);
    }

    #[test]
    fn duplicate_extensions_of_any_type_are_refused() {
        for kind in [EXT_ALPN, 0x000a, 0xfe0d, 0xffff] {
            let e = ext(kind, &alpn_data(&[b"h2"]));
            assert_eq!(sniff(&hello(&[e.clone(), e])), Sniff::Other, "type {kind:#x}");
        }
        // Distinct unknown types (GREASE) are fine.
        assert_eq!(sniff(&hello(&[ext(0x0a0a, &[]), ext(0x1a1a, &[0])])), tls(None, &[]));
    }

    #[test]
    fn ip_literal_sni_is_reported_and_refused_as_a_domain_name() {
        for ip in ["127.0.0.1", "10.1.2.3", "[::1]", "0x7f.1"] {
            let Sniff::Tls(info) = sniff(&hello(&[ext(EXT_SERVER_NAME, &sni_data(&[(0, ip.as_bytes())]))])) else {
                panic!("{ip}: not TLS");
            };
            assert_eq!(info.sni.as_deref(), Some(ip));
            assert!(matches!(info.server_name(), Err(DomainError::IpLiteral(_))), "{ip}");
        }
        let ok = ClientHelloInfo { sni: Some("Example.COM.".into()), alpn: vec![] };
        assert_eq!(ok.server_name().unwrap().unwrap().as_str(), "example.com");
    }

    #[test]
    fn lengths_that_disagree_are_refused() {
        let sni = ext(EXT_SERVER_NAME, &sni_data(&[(0, b"a.example.com")]));
        let good_body = hello_body_raw(Some(sni.clone()));
        assert!(matches!(sniff(&records(&handshake_msg(&good_body), MAX_RECORD)), Sniff::Tls(_)));
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        // Extensions block length one too long / too short.
        let mut b = good_body.clone();
        let at = b.len() - sni.len() - 2;
        b[at + 1] += 1;
        cases.push(("extensions length +1", b));
        let mut b = good_body.clone();
        b[at + 1] -= 1;
        cases.push(("extensions length -1", b));
        // Server name list length disagreeing with the extension length.
        let mut d = sni_data(&[(0, b"a.example.com")]);
        d[1] += 1;
        cases.push(("sni list +1", hello_body_raw(Some(ext(EXT_SERVER_NAME, &d)))));
        let mut d = sni_data(&[(0, b"a.example.com")]);
        d[1] -= 1;
        cases.push(("sni list -1", hello_body_raw(Some(ext(EXT_SERVER_NAME, &d)))));
        // Name length disagreeing with the list.
        let mut d = sni_data(&[(0, b"a.example.com")]);
        d[4] -= 1;
        cases.push(("host_name -1", hello_body_raw(Some(ext(EXT_SERVER_NAME, &d)))));
        // ALPN with an empty protocol name, an empty list, a list length off by one.
        cases.push(("alpn empty name", hello_body_raw(Some(ext(EXT_ALPN, &[0, 1, 0])))));
        cases.push(("alpn empty list", hello_body_raw(Some(ext(EXT_ALPN, &[0, 0])))));
        cases.push(("alpn list +1", hello_body_raw(Some(ext(EXT_ALPN, &[0, 4, 2, b'h', b'2'])))));
        // Trailing byte after the extensions.
        let mut b = good_body.clone();
        b.push(0);
        cases.push(("trailing byte", b));
        // Odd cipher suite length, session id of 33, no compression methods, no null method.
        let mut b = good_body.clone();
        b[2 + 32 + 1 + 32 + 1] = 3;
        cases.push(("odd suites", b));
        let mut b = good_body.clone();
        b[2 + 32] = 33;
        cases.push(("session id 33", b));
        let mut b = good_body.clone();
        let comp = 2 + 32 + 1 + 32 + 2 + 4;
        b[comp + 1] = 1;
        cases.push(("compression without null", b));
        // Legacy versions SSL 3 and "TLS 1.4".
        let mut b = good_body.clone();
        b[1] = 0;
        cases.push(("ssl3", b));
        let mut b = good_body.clone();
        b[1] = 4;
        cases.push(("0x0304 legacy", b));
        for (what, body) in cases {
            assert_eq!(sniff(&records(&handshake_msg(&body), MAX_RECORD)), Sniff::Other, "{what}");
        }
        // Handshake length shorter than its record: the record runs past the ClientHello.
        let mut msg = handshake_msg(&good_body);
        msg[3] -= 1;
        assert_eq!(sniff(&records(&msg, MAX_RECORD)), Sniff::Other);
    }

    #[test]
    fn record_and_handshake_headers_are_checked_early() {
        assert_eq!(sniff(&[]), Sniff::NeedMore);
        assert_eq!(sniff(&[0x16]), Sniff::NeedMore);
        assert_eq!(sniff(&[0x16, 0x03, 0x01]), Sniff::NeedMore);
        assert_eq!(sniff(&[0x16, 0x02]), Sniff::Other);
        assert_eq!(sniff(&[0x16, 0x03, 0x00]), Sniff::Other, "SSL 3 record");
        assert_eq!(sniff(&[0x16, 0x03, 0x01, 0x40, 0x01]), Sniff::Other, "record over 2^14");
        assert_eq!(sniff(&[0x16, 0x03, 0x01, 0x00, 0x10, 0x02]), Sniff::Other, "ServerHello");
        assert_eq!(sniff(&[0x16, 0x03, 0x01, 0x00, 0x10, 0x01, 0x00]), Sniff::NeedMore);
        // A ClientHello that says it is larger than we buffer is refused at once.
        assert_eq!(sniff(&[0x16, 0x03, 0x01, 0x00, 0x10, 0x01, 0x00, 0x40, 0x00]), Sniff::Other);
        // SSLv2-style hello, application data, an SSH banner.
        assert_eq!(sniff(&[0x80, 0x2e, 0x01]), Sniff::Other);
        assert_eq!(sniff(&[0x17, 0x03, 0x03]), Sniff::Other);
        assert_eq!(sniff(b"SSH-2.0-OpenSSH_9.6\r\n"), Sniff::Other);
    }

    #[test]
    fn a_client_hello_that_never_completes_within_the_bound_is_other() {
        // Declares 16,000 bytes, sends them 100 at a time: records' headers push it past 16 KiB.
        let mut msg = handshake_msg(&[0u8; 16_000]);
        msg.truncate(msg.len() - 1);
        let split = records(&msg, 100);
        assert!(split.len() > MAX_SNIFF);
        assert_eq!(sniff(&split[..MAX_SNIFF - 1]), Sniff::NeedMore);
        assert_eq!(sniff(&split[..MAX_SNIFF]), Sniff::Other);
        assert_eq!(sniff(&split), Sniff::Other);
    }

    // -- HTTP ----------------------------------------------------------------------------------

    fn http(method: HttpMethod, target: &str, host: Option<&str>) -> Sniff {
        Sniff::Http(HttpStart { method, target: target.into(), host: host.map(str::to_string) })
    }

    #[test]
    fn http_request_heads() {
        let get =
            b"GET /v1/models HTTP/1.1\r\nUser-Agent: x\r\nhOsT:  API.example.com:8080 \t\r\nAccept: */*\r\n\r\nbody";
        assert_eq!(sniff(get), http(HttpMethod::Get, "/v1/models", Some("API.example.com:8080")));
        assert_eq!(
            sniff(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n"),
            http(HttpMethod::Connect, "evil.example:443", Some("evil.example:443"))
        );
        assert_eq!(sniff(b"POST http://a.test/x HTTP/1.0\r\n\r\n"), http(HttpMethod::Post, "http://a.test/x", None));
        assert_eq!(sniff(b"PATCH / HTTP/1.1\r\nHost:\r\n\r\n"), http(HttpMethod::Patch, "/", Some("")));
    }

    #[test]
    fn every_truncation_of_an_http_head_is_need_more() {
        let head = b"DELETE /a?b=c HTTP/1.1\r\nHost: a.example.com\r\nX-Y: z\r\n\r\n";
        assert_eq!(sniff(head), http(HttpMethod::Delete, "/a?b=c", Some("a.example.com")));
        for cut in 0..head.len() {
            assert_eq!(
                sniff(&head[..cut]),
                Sniff::NeedMore,
                "prefix {cut}: {:?}",
                String::from_utf8_lossy(&head[..cut])
            );
        }
    }

    #[test]
    fn malformed_http_heads_are_other() {
        for bad in [
            &b"get / HTTP/1.1\r\n\r\n"[..],
            b"FOO / HTTP/1.1\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1 \r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\n\n",
            b"GET / HTTP/1.1\r\nHost: a\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : a.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test\r\nhost: a.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\x00.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: \xc3\xa4.test\r\n\r\n",
            b"GET / HTTP/1.1\r\n: empty-name\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
        ] {
            assert_eq!(sniff(bad), Sniff::Other, "{:?}", String::from_utf8_lossy(bad));
        }
        // Incomplete but already wrong: no need to wait.
        assert_eq!(sniff(b"GEX"), Sniff::Other);
        assert_eq!(sniff(b"GET / HTTP/2"), Sniff::Other);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nBad Name"), Sniff::Other);
    }

    #[test]
    fn http_head_is_bounded() {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        while head.len() < MAX_HTTP_HEAD {
            head.extend(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(sniff(&head[..MAX_HTTP_HEAD - 1]), Sniff::NeedMore);
        assert_eq!(sniff(&head), Sniff::Other);
        head.extend(b"Host: a.test\r\n\r\n");
        assert_eq!(sniff(&head), Sniff::Other);
        // A head that ends within the bound is fine, whatever follows it.
        let mut ok = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n".to_vec();
        ok.extend(vec![b'x'; 2 * MAX_SNIFF]);
        assert_eq!(sniff(&ok), http(HttpMethod::Get, "/", Some("a.test")));
    }

    /// Figures, not assertions: `cargo test --release -p sluice sniff_figures -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn sniff_figures() {
        let hello = rustls_hello("api.example.com", &[b"h2", b"http/1.1"], false);
        let head = b"GET /v1/models HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: x\r\nAccept: */*\r\n\r\n";
        let n = 200_000u32;
        let t = std::time::Instant::now();
        for _ in 0..n {
            assert!(matches!(sniff(std::hint::black_box(&hello)), Sniff::Tls(_)));
        }
        let tls = t.elapsed() / n;
        let t = std::time::Instant::now();
        for _ in 0..n {
            assert!(matches!(sniff(std::hint::black_box(head)), Sniff::Http(_)));
        }
        let http = t.elapsed() / n;
        println!("sniff: ClientHello of {} bytes {tls:?}; HTTP head of {} bytes {http:?}", hello.len(), head.len());
    }

    // -- properties ----------------------------------------------------------------------------

    /// Once decided, more bytes never change the answer (so `NeedMore` never hides a wrong one).
    fn check_monotonic(a: &[u8], b: &[u8]) -> Result<(), TestCaseError> {
        let first = sniff(a);
        if first != Sniff::NeedMore {
            let mut ab = a.to_vec();
            ab.extend_from_slice(b);
            prop_assert_eq!(sniff(&ab), first);
        }
        Ok(())
    }

    fn interesting_prefix() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(Vec::new()),
            Just(vec![0x16, 0x03, 0x01]),
            Just(vec![0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00, 0x00, 0x3c, 0x03, 0x03]),
            Just(b"GET / HTTP/1.1\r\n".to_vec()),
            Just(b"CONNECT ".to_vec()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic_and_answers_are_monotonic(
            prefix in interesting_prefix(),
            a in proptest::collection::vec(any::<u8>(), 0..600),
            b in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut buf = prefix;
            buf.extend(a);
            check_monotonic(&buf, &b)?;
        }

        #[test]
        fn mutated_real_client_hellos_never_panic(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            cut in any::<prop::sample::Index>(),
            split in prop_oneof![Just(MAX_RECORD), 1usize..300],
            tail in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let real = rustls_hello("fuzz.example.com", &[b"h2", b"http/1.1"], false);
            let mut buf = records(&real[RECORD_HEADER..], split);
            for (at, byte) in flips {
                let i = at.index(buf.len());
                buf[i] = byte;
            }
            buf.truncate(cut.index(buf.len() + 1));
            if let Sniff::Tls(info) = sniff(&buf) {
                prop_assert!(info.sni.iter().all(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())));
                prop_assert!(info.alpn.iter().all(|p| !p.is_empty()));
            }
            check_monotonic(&buf, &tail)?;
        }

        #[test]
        fn large_inputs_are_decided_within_the_bound(fill in any::<u8>(), len in MAX_SNIFF..MAX_SNIFF + 100) {
            let mut buf = vec![0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x3f, 0xf0, 0x03];
            buf.resize(len, fill);
            prop_assert_ne!(sniff(&buf), Sniff::NeedMore);
        }
    }
}
