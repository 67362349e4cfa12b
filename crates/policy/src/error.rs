//! Policy errors that point at a file, a line, a column and a field.
//!
//! An operator fixing a policy should never have to guess which of forty routes is wrong, so every
//! error carries the position of the offending value (from the toml crate's spans) and a field path
//! such as `route[2].path`, and the loader collects every error instead of stopping at the first.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// What sort of problem an error is; the message says the specifics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyErrorKind {
    /// The directory or a file could not be read, is too large or is not UTF-8.
    Read,
    /// TOML syntax, an unknown key, a missing key or a value of the wrong type. The toml parser
    /// stops at the first of these in a file, so a file reports at most one.
    Syntax,
    /// A value of the right type that is not acceptable (bad domain, path, method, cost…).
    Invalid,
    /// Two definitions that cannot both hold (duplicate route, domain claimed twice…).
    Conflict,
}

/// One problem in one policy file. Displays as `FILE:LINE:COL: FIELD: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    pub kind: PolicyErrorKind,
    pub file: PathBuf,
    /// 1-based; 0 when the error concerns the file as a whole.
    pub line: usize,
    /// 1-based, in characters; 0 when `line` is 0.
    pub column: usize,
    /// Field path such as `route[2].path` (`route` is 0-based, as in the file's order); may be empty.
    pub field: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl PolicyError {
    /// An error about a whole file or directory (no position).
    pub(crate) fn file(kind: PolicyErrorKind, file: &Path, message: impl Into<String>) -> PolicyError {
        PolicyError {
            kind,
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            field: String::new(),
            message: message.into(),
        }
    }
}

impl PolicyError {
    /// An error at byte `offset` of `text` (the file's contents), or about the whole file when
    /// `offset` is `None`. For other TOML readers that report problems the same way (catalogs).
    pub fn located(
        kind: PolicyErrorKind,
        file: &Path,
        text: &str,
        offset: Option<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> PolicyError {
        let (line, column) = offset.map_or((0, 0), |o| line_col(text, o));
        PolicyError { kind, file: file.to_path_buf(), line, column, field: field.into(), message: message.into() }
    }
}

/// A file's text plus its name, for turning byte offsets into positions.
pub(crate) struct Source<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl Source<'_> {
    pub fn error(
        &self,
        kind: PolicyErrorKind,
        span: Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> PolicyError {
        let (line, column) = line_col(self.text, span.start);
        PolicyError { kind, file: self.path.to_path_buf(), line, column, field: field.into(), message: message.into() }
    }

    /// Where a position was defined, for messages that refer to another definition.
    pub fn at(&self, span: &Range<usize>) -> String {
        let (line, _) = line_col(self.text, span.start);
        format!("{}:{line}", self.path.display())
    }
}

/// 1-based line and column (in characters) of a byte offset; offsets past the end or inside a
/// character are clamped, never a panic.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Best-effort field path of the key at `offset`, for errors from the toml parser itself, which
/// carry a span but no path. Tracks `[table]` and `[[array]]` headers (counting array entries) and
/// takes the key written before `=` on the error's line. Multi-line strings and inline tables can
/// fool it; the line and column stay exact regardless.
pub(crate) fn field_at(text: &str, offset: usize) -> String {
    let (target_line, _) = line_col(text, offset);
    let mut table = String::new();
    let mut counts: Vec<(String, usize)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let is_target = i + 1 == target_line;
        if let Some(inner) = line.strip_prefix("[[").and_then(|l| l.split("]]").next()) {
            let name = inner.trim().to_string();
            match counts.iter_mut().find(|(n, _)| *n == name) {
                Some((_, c)) => *c += 1,
                None => counts.push((name.clone(), 1)),
            }
            table = header_path(&name, &counts);
        } else if let Some(inner) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            table = header_path(inner.trim(), &counts);
        } else if is_target {
            if let Some((key, _)) = line.split_once('=') {
                let key = key.trim().trim_matches('"');
                return if table.is_empty() { key.to_string() } else { format!("{table}.{key}") };
            }
        }
        if is_target {
            break;
        }
    }
    table
}

/// `route.meter` → `route[1].meter` when `[[route]]` has been seen twice.
fn header_path(name: &str, counts: &[(String, usize)]) -> String {
    let mut out = String::new();
    let mut prefix = String::new();
    for part in name.split('.').map(str::trim) {
        if !prefix.is_empty() {
            prefix.push('.');
            out.push('.');
        }
        prefix.push_str(part);
        out.push_str(part);
        if let Some((_, c)) = counts.iter().find(|(n, _)| *n == prefix) {
            out.push_str(&format!("[{}]", c - 1));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters_and_clamps() {
        let t = "ab\nc\u{e9}d\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 3), (2, 1));
        assert_eq!(line_col(t, 6), (2, 3)); // after the two-byte é
        assert_eq!(line_col(t, 5), (2, 2)); // inside é: clamped back
        assert_eq!(line_col(t, 999), (3, 1));
    }

    #[test]
    fn field_at_tracks_array_tables() {
        let t =
            "[service]\nname = \"x\"\n[[route]]\npath = \"/a\"\n[[route]]\nmethod = \"GET\"\n[route.meter]\nkind = 1\n";
        assert_eq!(field_at(t, t.find("name").unwrap()), "service.name");
        assert_eq!(field_at(t, t.find("path").unwrap()), "route[0].path");
        assert_eq!(field_at(t, t.find("method").unwrap()), "route[1].method");
        assert_eq!(field_at(t, t.find("kind").unwrap()), "route[1].meter.kind");
        assert_eq!(field_at("x = 1", 0), "x");
    }

    #[test]
    fn display_has_the_documented_shape() {
        let e = PolicyError {
            kind: PolicyErrorKind::Invalid,
            file: "/p/a.toml".into(),
            line: 3,
            column: 8,
            field: "route[0].path".into(),
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "/p/a.toml:3:8: route[0].path: bad");
        let e = PolicyError::file(PolicyErrorKind::Read, Path::new("/p/b.toml"), "cannot read");
        assert_eq!(e.to_string(), "/p/b.toml: cannot read");
    }
}
