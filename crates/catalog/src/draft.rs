//! `catalog.toml`: the draft an operator edits before `sluice catalog publish`.
//!
//! ```toml
//! [[permission]]
//! key = "shipments:create"
//! description = "Create a shipment"
//! risk_level = "medium"                       # low | medium | high
//! [permission.constraints]
//! "core:pricing:per_call_cents" = 2.5         # exact: read from the file's text, never a float
//! "core:platform_fee:basis_points" = 250
//! ```
//!
//! Parsing is strict (unknown keys and terms refused) and collects every error, each with the
//! file, line, column and field.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use sluice_policy::PolicyErrorKind as Kind;
use toml::Spanned;

use crate::snapshot::{check_key, Permission, RiskLevel, MAX_DESCRIPTION_LEN, MAX_PERMISSIONS};
use crate::terms::{Raw, Terms};

/// Largest draft read: the same bound a reader puts on a served catalog.
pub const MAX_DRAFT_BYTES: usize = crate::snapshot::MAX_DOCUMENT_BYTES;

/// One problem in a draft, located.
/// One problem in a draft, located: `FILE:LINE:COL: FIELD: message`, the same type and form as a
/// host policy's errors.
pub use sluice_policy::PolicyError as DraftProblem;

/// Every problem found in a draft.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct DraftError(pub Vec<DraftProblem>);

/// A parsed draft: permissions sorted by key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Draft {
    pub permissions: Vec<Permission>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    #[serde(default)]
    permission: Vec<Spanned<PermissionToml>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PermissionToml {
    key: Spanned<String>,
    description: Spanned<String>,
    risk_level: Spanned<String>,
    #[serde(default)]
    constraints: BTreeMap<String, Spanned<toml::Value>>,
}

struct Collect<'a> {
    path: &'a Path,
    text: &'a str,
    problems: Vec<DraftProblem>,
}

impl Collect<'_> {
    fn at(&mut self, kind: Kind, span: Option<Range<usize>>, field: &str, message: impl Into<String>) {
        let offset = span.map(|s| s.start);
        self.problems.push(DraftProblem::located(kind, self.path, self.text, offset, field, message));
    }
}

impl Draft {
    /// Reads and parses the draft at `path`.
    pub fn load(path: &Path) -> Result<Draft, DraftError> {
        let one = |message: String| DraftError(vec![DraftProblem::located(Kind::Read, path, "", None, "", message)]);
        let text = sluice_files::files::read_text(path, MAX_DRAFT_BYTES as u64, sluice_files::files::Links::Follow)
            .map_err(|e| one(e.to_string()))?;
        Draft::parse(path, &text)
    }

    /// Parses draft `text`; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Draft, DraftError> {
        let mut c = Collect { path, text, problems: Vec::new() };
        if text.len() > MAX_DRAFT_BYTES {
            c.at(Kind::Read, None, "", format!("is larger than {MAX_DRAFT_BYTES} bytes"));
            return Err(DraftError(c.problems));
        }
        let file: FileToml = match toml::from_str(text) {
            Ok(f) => f,
            Err(e) => {
                let offset = e.span().map_or(0, |s| s.start);
                c.at(Kind::Syntax, e.span(), "", sluice_policy::syntax_message(e.message(), text, offset));
                return Err(DraftError(c.problems));
            }
        };
        if file.permission.len() > MAX_PERMISSIONS {
            c.at(Kind::Invalid, None, "permission", format!("more than {MAX_PERMISSIONS} permissions"));
        }
        let mut permissions: Vec<(Permission, Range<usize>)> = Vec::new();
        for p in file.permission {
            let span = p.span();
            let p = p.into_inner();
            let key = p.key.get_ref().clone();
            if let Err(m) = check_key(&key) {
                c.at(Kind::Invalid, Some(p.key.span()), "key", m);
            }
            if p.description.get_ref().chars().count() > MAX_DESCRIPTION_LEN {
                c.at(
                    Kind::Invalid,
                    Some(p.description.span()),
                    "description",
                    format!("longer than {MAX_DESCRIPTION_LEN} characters"),
                );
            }
            let risk = RiskLevel::parse(p.risk_level.get_ref()).unwrap_or_else(|| {
                c.at(
                    Kind::Invalid,
                    Some(p.risk_level.span()),
                    "risk_level",
                    format!("{:?} is not low, medium or high", p.risk_level.get_ref()),
                );
                RiskLevel::High
            });
            let mut terms = Terms::default();
            for (name, value) in &p.constraints {
                let vspan = value.span();
                let raw = match value.get_ref() {
                    toml::Value::Integer(i) => Raw::Int(*i),
                    toml::Value::Float(_) => Raw::Decimal(text.get(vspan.clone()).unwrap_or("").trim()),
                    toml::Value::String(s) => Raw::Str(s),
                    toml::Value::Boolean(b) => Raw::Bool(*b),
                    toml::Value::Datetime(_) => Raw::Other("a date"),
                    toml::Value::Array(_) => Raw::Other("an array"),
                    toml::Value::Table(_) => Raw::Other("a table"),
                };
                if let Err(m) = terms.set(name, raw) {
                    c.at(Kind::Invalid, Some(vspan), &format!("constraints.{name:?}"), m);
                }
            }
            permissions
                .push((Permission { key, description: p.description.into_inner(), risk_level: risk, terms }, span));
        }
        permissions.sort_by(|a, b| a.0.key.cmp(&b.0.key));
        for pair in permissions.windows(2) {
            if let [(a, _), (b, second)] = pair {
                if a.key == b.key {
                    c.at(
                        Kind::Conflict,
                        Some(second.clone()),
                        "key",
                        format!("{:?} is offered twice; each permission once", b.key),
                    );
                }
            }
        }
        if c.problems.is_empty() {
            Ok(Draft { permissions: permissions.into_iter().map(|(p, _)| p).collect() })
        } else {
            Err(DraftError(c.problems))
        }
    }
}
