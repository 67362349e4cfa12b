//! Route path patterns and the normalisation of request paths before they are matched.
//!
//! Patterns: `/v1/models` (exact), `/v1/models/{id}` (`{name}` captures one non-empty segment),
//! `/v1/files/*` (a trailing `/*` matches the prefix itself and anything below it).
//!
//! The security property is that an agent cannot dodge a priced route by spelling a path
//! differently from the pattern while the upstream server still reads it as the same path: a
//! request that misses every route falls back to `web:send` at cost 0. So a request path is
//! normalised *towards* matching before comparison: the query and fragment are cut, percent-escapes
//! are decoded once (including `%2F`), `\` counts as `/`, `;parameters` are cut from each segment
//! (servers that honour matrix parameters ignore them for routing), empty and `.` segments are
//! dropped, `..` removes the previous segment, and literal segments compare ASCII-case-insensitively. Each of
//! these can only make a request match a route that a strict server would not route there; that
//! errs on the side of charging, never of letting a request through for free.

use std::borrow::Cow;

/// Longest pattern accepted, and most segments in one.
const MAX_PATTERN_LEN: usize = 1024;
const MAX_PATTERN_SEGMENTS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param,
}

/// A parsed route path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    segments: Vec<Segment>,
    /// Ends in `/*`: the segments are a prefix.
    prefix: bool,
    text: String,
}

impl PathPattern {
    /// Parses a pattern; the error says what to write instead.
    pub fn parse(s: &str) -> Result<PathPattern, String> {
        if s.len() > MAX_PATTERN_LEN {
            return Err(format!("longer than {MAX_PATTERN_LEN} characters"));
        }
        let Some(rest) = s.strip_prefix('/') else {
            return Err(format!("{s:?} must start with '/', as in \"/v1/models\""));
        };
        if s.contains(['?', '#']) {
            return Err(format!("{s:?}: a pattern matches the path only; remove the query or fragment"));
        }
        if s.contains('%') {
            return Err(format!("{s:?}: write the decoded form; request paths are percent-decoded before matching"));
        }
        if s.contains('\\') {
            return Err(format!("{s:?}: '\\' is not allowed; request paths treat it as '/'"));
        }
        let mut segments = Vec::new();
        let mut prefix = false;
        if rest.is_empty() {
            return Ok(PathPattern { segments, prefix, text: s.to_string() });
        }
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() > MAX_PATTERN_SEGMENTS {
            return Err(format!("more than {MAX_PATTERN_SEGMENTS} segments"));
        }
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            match *part {
                "" if last => {
                    return Err(format!(
                        "{s:?} ends in '/': request paths are matched without empty segments, so remove it \
                         (or end in \"/*\" to match everything below)"
                    ))
                }
                "" => return Err(format!("{s:?} has an empty segment (\"//\")")),
                "." | ".." => return Err(format!("{s:?}: '.' and '..' segments are not allowed")),
                "*" if last => prefix = true,
                p if p.contains('*') => {
                    return Err(format!("{s:?}: '*' is only allowed as the whole last segment (\"/v1/files/*\")"))
                }
                p if p.starts_with('{') || p.ends_with('}') => {
                    let name = p.strip_prefix('{').and_then(|p| p.strip_suffix('}')).unwrap_or("");
                    let ok = name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
                        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                    if !ok {
                        return Err(format!(
                            "{s:?}: segment {p:?} must be a whole-segment capture such as {{model_id}} \
                             (lowercase letters, digits, _)"
                        ));
                    }
                    segments.push(Segment::Param);
                }
                p => {
                    if let Some(c) = p.chars().find(|c| !is_pchar(*c)) {
                        return Err(format!("{s:?}: character {c:?} is not allowed in a path segment"));
                    }
                    segments.push(Segment::Literal(p.to_ascii_lowercase()));
                }
            }
        }
        Ok(PathPattern { segments, prefix, text: s.to_string() })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Does the pattern match these (already normalised) request segments?
    pub(crate) fn matches(&self, request: &[&[u8]]) -> bool {
        let n = self.segments.len();
        let length_ok = if self.prefix { request.len() >= n } else { request.len() == n };
        length_ok
            && self.segments.iter().zip(request).all(|(seg, req)| match seg {
                Segment::Param => !req.is_empty(),
                Segment::Literal(lit) => lit.as_bytes().eq_ignore_ascii_case(req),
            })
    }

    /// Does the pattern match this request-target, normalised as routes are (see the module
    /// doc)? For callers outside this crate, such as the gate's routes.
    pub fn matches_request(&self, target: &str) -> bool {
        RequestPath::new(target).is_some_and(|p| self.matches(&p.segments()))
    }

    /// The opposite bias, for paths that are served *without* a check: the path (before `?`)
    /// must already be in normal form, with no escape, `\`, `;`, empty, `.` or `..` segment,
    /// and literal segments compare case-sensitively. A spelling a server might route
    /// elsewhere never matches.
    pub fn matches_strict(&self, target: &str) -> bool {
        let Some(path) = target.strip_prefix('/') else { return false };
        let path = path.split(['?', '#']).next().unwrap_or("");
        let segs: Vec<&str> = if path.is_empty() { Vec::new() } else { path.split('/').collect() };
        if segs.iter().any(|s| s.is_empty() || *s == "." || *s == ".." || s.contains(['%', '\\', ';'])) {
            return false;
        }
        let n = self.segments.len();
        let length_ok = if self.prefix { segs.len() >= n } else { segs.len() == n };
        length_ok
            && self.segments.iter().zip(&segs).all(|(seg, req)| match seg {
                Segment::Param => !req.is_empty(),
                Segment::Literal(lit) => lit == req,
            })
    }

    /// True when every path this pattern's sibling `other` matches is also matched by `self`, so a
    /// route with `other` placed after one with `self` could never be reached.
    pub(crate) fn covers(&self, other: &PathPattern) -> bool {
        let n = self.segments.len();
        let length_ok =
            if self.prefix { other.segments.len() >= n } else { !other.prefix && other.segments.len() == n };
        length_ok
            && self.segments.iter().zip(&other.segments).all(|(a, b)| match (a, b) {
                (Segment::Param, _) => true,
                (Segment::Literal(x), Segment::Literal(y)) => x == y,
                (Segment::Literal(_), Segment::Param) => false,
            })
    }
}

/// RFC 3986 `pchar` minus `%` (patterns are written decoded) and `;` (cut from request segments).
fn is_pchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()+,=:@".contains(c)
}

/// A request path reduced to the segments routes are matched against (see the module doc).
pub(crate) struct RequestPath<'a> {
    bytes: Cow<'a, [u8]>,
}

impl<'a> RequestPath<'a> {
    /// `path` is the request-target: origin-form (`/v1/x?y`) or absolute-form
    /// (`https://host/v1/x`); anything else (`*`, authority-form) has no segments to match and
    /// returns `None`.
    pub fn new(path: &'a str) -> Option<RequestPath<'a>> {
        let path = if path.starts_with('/') {
            path
        } else {
            let after_scheme = path.split_once("://")?.1;
            let slash = after_scheme.find('/')?;
            after_scheme.get(slash..)?
        };
        let end = path.find(['?', '#']).unwrap_or(path.len());
        let path = path.get(..end)?.as_bytes();
        if !path.iter().any(|&b| b == b'%' || b == b'\\') {
            return Some(RequestPath { bytes: Cow::Borrowed(path) });
        }
        let mut out = Vec::with_capacity(path.len());
        let mut i = 0;
        while let Some(&b) = path.get(i) {
            let decoded = match (b, path.get(i + 1).and_then(|h| hex(*h)), path.get(i + 2).and_then(|l| hex(*l))) {
                (b'%', Some(h), Some(l)) => {
                    i += 3;
                    (h << 4) | l
                }
                _ => {
                    i += 1;
                    b
                }
            };
            out.push(if decoded == b'\\' { b'/' } else { decoded });
        }
        Some(RequestPath { bytes: Cow::Owned(out) })
    }

    /// The segments after cutting `;parameters`, dropping empty and `.` segments and resolving `..`.
    pub fn segments(&self) -> Vec<&[u8]> {
        let mut segs: Vec<&[u8]> = Vec::with_capacity(8);
        for seg in self.bytes.split(|&b| b == b'/') {
            let seg = seg.split(|&b| b == b';').next().unwrap_or(seg);
            match seg {
                b"" | b"." => {}
                b".." => {
                    segs.pop();
                }
                s => segs.push(s),
            }
        }
        segs
    }
}

/// The value of one hex digit, either case (shared with `meter`).
pub(super) fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, path: &str) -> bool {
        let p = PathPattern::parse(pattern).unwrap();
        let r = RequestPath::new(path).unwrap();
        p.matches(&r.segments())
    }

    #[test]
    fn exact_param_and_prefix() {
        assert!(m("/v1/models", "/v1/models"));
        assert!(!m("/v1/models", "/v1/models/x"));
        assert!(!m("/v1/models", "/v1"));
        assert!(m("/v1/models/{id}", "/v1/models/gpt-4o"));
        assert!(!m("/v1/models/{id}", "/v1/models"));
        assert!(!m("/v1/models/{id}", "/v1/models/a/b"));
        assert!(m("/v1/files/*", "/v1/files"));
        assert!(m("/v1/files/*", "/v1/files/a/b/c"));
        assert!(!m("/v1/files/*", "/v1/filesx"));
        assert!(m("/*", "/anything/at/all"));
        assert!(m("/", "/"));
        assert!(!m("/", "/x"));
    }

    #[test]
    fn spelling_tricks_still_match() {
        for path in [
            "/v1/chat/completions?x=1",
            "/v1/chat/completions#frag",
            "//v1//chat/completions/",
            "/v1/./chat/completions",
            "/v1/x/../chat/completions",
            "/v1/chat%2Fcompletions",
            "/v1/chat/%63ompletions",
            "/V1/Chat/Completions",
            "/v1\\chat\\completions",
            "/v1/chat%5ccompletions",
            "/v1/chat/completions;jsessionid=1",
            "/v1;x/chat/completions",
            "/v1/chat/completions%3Bx",
            "https://api.openai.com/v1/chat/completions",
        ] {
            assert!(m("/v1/chat/completions", path), "{path}");
        }
        assert!(!m("/v1/chat/completions", "/v1/chat/completions2"));
        assert!(!m("/v1/chat/completions", "/v1/chat/../completions"));
        assert!(RequestPath::new("*").is_none());
        assert!(RequestPath::new("api.openai.com:443").is_none());
    }

    #[test]
    fn malformed_escapes_are_kept_literally() {
        assert!(m("/a/{x}", "/a/%zz"));
        assert!(m("/a/{x}", "/a/%"));
        assert!(m("/a/{x}", "/a/%4"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for p in [
            "",
            "v1/models",
            "/v1/models/",
            "/v1//models",
            "/v1/*/x",
            "/v1/files*",
            "/v1/{}",
            "/v1/{ID}",
            "/v1/x{id}",
            "/v1/{id",
            "/v1/a?b",
            "/v1/%41",
            "/v1/./a",
            "/v1/../a",
            "/v1/a b",
            "/v1\\a",
        ] {
            assert!(PathPattern::parse(p).is_err(), "{p:?}");
        }
        assert!(PathPattern::parse(&format!("/{}", "a/".repeat(40))).is_err());
    }

    #[test]
    fn covers_is_sound_for_shadowing() {
        let p = |s| PathPattern::parse(s).unwrap();
        assert!(p("/v1/*").covers(&p("/v1/models")));
        assert!(p("/v1/*").covers(&p("/v1/files/*")));
        assert!(p("/v1/*").covers(&p("/v1")));
        assert!(p("/v1/{x}").covers(&p("/v1/models")));
        assert!(!p("/v1/models").covers(&p("/v1/{x}")));
        assert!(!p("/v1/{x}").covers(&p("/v1/*")));
        assert!(!p("/v1/models").covers(&p("/v1/models/*")));
        assert!(p("/v1/models").covers(&p("/V1/Models")));
    }
}
