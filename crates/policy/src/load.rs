//! Reading the policy directory and turning files into a [`PolicySet`]: every value validated, every
//! error collected with its position, indexes built once.

use super::error::{field_at, line_col, PolicyError, PolicyErrorKind, Source};
use super::meter::{MeterKind, MeterSpec, ModelPrice, PriceTable};
use super::path::PathPattern;
use super::schema::{Number, RawFile, RawHost, RawPrices, RawRoute, RawService, RawTcp};
use super::{
    Ceiling, Cost, DenyRule, DomainIndex, HostCelRule, Method, PolicySet, RawTcpRule, Route, ServiceRoutes,
    FETCH_ACTION, SEND_ACTION,
};
use sha2::{Digest, Sha256};
use sluice_passport::constraints::RuleDecision;
use sluice_passport::domain::DomainPattern;
use sluice_passport::money;
use std::collections::HashMap;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use toml::Spanned;

/// A policy file larger than this is a mistake (the shipped ones are a few KiB).
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Most `*.toml` files read from the directory.
pub const MAX_FILES: usize = 1024;
const MAX_DOMAINS: usize = 1024;
const MAX_ROUTES: usize = 1024;
const MAX_MODELS: usize = 1024;
const MAX_RULES: usize = 64;
const MAX_CEL_EXPR_LEN: usize = 4096;
const MAX_REASON_LEN: usize = 64;
const MAX_ACTION_LEN: usize = 128;
const MAX_NAME_LEN: usize = 64;
const MAX_TOKENS_LIMIT: i64 = 100_000_000;
/// $100,000 per million tokens: far above any list price, far below overflow.
const MAX_CENTS_PER_MTOK: u64 = 10_000_000;
const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Reads the directory's policy files, sorted by name. Missing directory: no files.
pub(crate) fn read_dir(dir: &Path) -> Result<Vec<(PathBuf, String)>, Vec<PolicyError>> {
    let read_err = |p: &Path, m: String| vec![PolicyError::file(PolicyErrorKind::Read, p, m)];
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_err(dir, format!("cannot read the policy directory: {e}"))),
    };
    let mut paths = Vec::new();
    let mut errors = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| read_err(dir, format!("cannot list the policy directory: {e}")))?;
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            // Only a name that looks like a policy file matters; other files are ignored anyway.
            if name.to_string_lossy().ends_with(".toml") {
                errors.push(PolicyError::file(
                    PolicyErrorKind::Read,
                    &path,
                    "file name is not UTF-8; rename it (policy files must have UTF-8 names ending in .toml)",
                ));
            }
            continue;
        };
        if name.starts_with('.') || !name.ends_with(".toml") {
            continue;
        }
        paths.push(path);
    }
    if paths.len() > MAX_FILES {
        return Err(read_err(dir, format!("more than {MAX_FILES} .toml files; this is not a policy directory")));
    }
    paths.sort();
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        match read_file(&path) {
            Ok(text) => files.push((path, text)),
            Err(m) => errors.push(PolicyError::file(PolicyErrorKind::Read, &path, m)),
        }
    }
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(errors)
    }
}

fn read_file(path: &Path) -> Result<String, String> {
    // Follows symlinks (configuration management likes them); refuses anything but a file.
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file; policy files must be plain files".into());
    }
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("larger than {MAX_FILE_BYTES} bytes; a policy file is a few KiB"));
    }
    String::from_utf8(bytes).map_err(|e| format!("not UTF-8 (byte {}); save it as UTF-8", e.utf8_error().valid_up_to()))
}

/// `sha256:` + hex over name, NUL, u64 BE length, bytes, per file in the given order.
pub(crate) fn digest_of(files: &[(PathBuf, String)]) -> String {
    let mut h = Sha256::new();
    for (path, text) in files {
        let name = path.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default();
        h.update(name);
        h.update([0u8]);
        h.update((text.len() as u64).to_be_bytes());
        h.update(text.as_bytes());
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The toml parser's message, on one line. It gives none for some faults (a control character in
/// a comment, found by fuzzing); an operator still needs to know what to fix.
pub fn syntax_message(message: &str, text: &str, offset: usize) -> String {
    let message = message.trim().replace('\n', " ");
    if !message.is_empty() {
        return message;
    }
    match text.get(offset..).and_then(|rest| rest.chars().next()) {
        Some(c) if c.is_control() => {
            format!("control character U+{:04X} is not allowed in TOML, not even in a comment; remove it", u32::from(c))
        }
        Some(c) => format!("unexpected {c:?}: this is not valid TOML"),
        None => "unexpected end of file: this is not valid TOML".to_string(),
    }
}

/// Validates and indexes the files. The order of `files` is the load order (the directory reader
/// sorts by name), which decides which of two conflicting files is reported as the second.
pub(crate) fn build(files: &[(PathBuf, String)]) -> Result<PolicySet, Vec<PolicyError>> {
    let mut b = Builder::default();
    for (path, text) in files {
        let src = Source { path, text };
        match toml::from_str::<RawFile>(text) {
            Ok(raw) => b.file(&src, raw),
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let (line, column) = if e.span().is_some() { line_col(text, span.start) } else { (0, 0) };
                b.errors.push(PolicyError {
                    kind: PolicyErrorKind::Syntax,
                    file: path.clone(),
                    line,
                    column,
                    field: if e.span().is_some() { field_at(text, span.start) } else { String::new() },
                    message: syntax_message(e.message(), text, span.start),
                });
            }
        }
    }
    // Host rules are compiled here, once per load, so that a rule that does not compile is a
    // policy error with its file and line, and a loaded policy always enforces all of its rules.
    let compiled_rules = match compile_host_rules(&b.rules) {
        Ok(c) => c,
        Err(e) => {
            b.errors.push(e);
            None
        }
    };
    if !b.errors.is_empty() {
        return Err(b.errors);
    }
    Ok(PolicySet {
        compiled_rules,
        digest: digest_of(files),
        files: files.len(),
        services: b.services,
        service_index: b.service_index,
        deny: b.deny,
        deny_index: b.deny_index,
        ceilings: b.ceilings,
        rules: b.rules,
        raw_tcp: b.raw_tcp,
        fetch: Arc::from(FETCH_ACTION),
        send: Arc::from(SEND_ACTION),
    })
}

fn compile_host_rules(rules: &[HostCelRule]) -> Result<Option<Arc<sluice_decide::CompiledRules>>, PolicyError> {
    if rules.is_empty() {
        return Ok(None);
    }
    let cel: Vec<sluice_passport::constraints::CelRule> = rules
        .iter()
        .map(|r| sluice_passport::constraints::CelRule {
            expr: r.expr.clone(),
            decision: r.decision,
            reason: r.reason.clone(),
        })
        .collect();
    sluice_decide::CompiledRules::compile(&cel).map(|c| Some(Arc::new(c))).map_err(|e| {
        let at = rules.get(e.index);
        PolicyError {
            kind: PolicyErrorKind::Invalid,
            file: at.map(|r| r.file.clone()).unwrap_or_default(),
            line: at.map(|r| r.line).unwrap_or(0),
            column: at.map(|r| r.column).unwrap_or(0),
            field: "host.rule.expr".into(),
            message: format!("does not compile: {}", e.message.replace('\n', " ")),
        }
    })
}

/// Where something was first defined, for "already defined at" messages.
#[derive(Debug, Clone)]
struct Origin {
    at: String,
    what: String,
}

#[derive(Default)]
struct Builder {
    errors: Vec<PolicyError>,
    services: Vec<ServiceRoutes>,
    service_names: HashMap<String, Origin>,
    service_index: DomainIndex,
    /// Where each service domain pattern (as text) was claimed.
    domain_origins: HashMap<String, Origin>,
    deny: Vec<DenyRule>,
    deny_index: DomainIndex,
    ceilings: Vec<Ceiling>,
    rules: Vec<HostCelRule>,
    raw_tcp: Vec<RawTcpRule>,
    raw_tcp_origins: HashMap<(String, u16), Origin>,
}

impl Builder {
    fn err(&mut self, src: &Source<'_>, kind: PolicyErrorKind, span: Range<usize>, field: String, msg: String) {
        self.errors.push(src.error(kind, span, field, msg));
    }

    fn invalid(&mut self, src: &Source<'_>, span: Range<usize>, field: impl Into<String>, msg: impl Into<String>) {
        self.err(src, PolicyErrorKind::Invalid, span, field.into(), msg.into());
    }

    fn conflict(&mut self, src: &Source<'_>, span: Range<usize>, field: impl Into<String>, msg: impl Into<String>) {
        self.err(src, PolicyErrorKind::Conflict, span, field.into(), msg.into());
    }

    fn file(&mut self, src: &Source<'_>, raw: RawFile) {
        let prices = raw.prices.as_ref().and_then(|p| self.prices(src, p));
        match raw.service {
            Some(service) => self.service(src, service, &raw.route, prices.as_ref(), raw.prices.is_some()),
            None => {
                if let Some(r) = raw.route.first() {
                    self.invalid(src, r.span(), "route[0]", "a [[route]] needs a [service] table in the same file");
                }
                if let Some(p) = &raw.prices {
                    self.invalid(src, p.span(), "prices", "[prices] needs a [service] table in the same file");
                }
            }
        }
        if let Some(host) = raw.host {
            self.host(src, host);
        }
        for (i, rule) in raw.raw_tcp.iter().enumerate() {
            self.raw_tcp_rule(src, i, rule.get_ref());
        }
    }

    fn service(
        &mut self,
        src: &Source<'_>,
        service: Spanned<RawService>,
        routes: &[Spanned<RawRoute>],
        prices: Option<&Arc<PriceTable>>,
        has_prices_table: bool,
    ) {
        let svc = service.into_inner();
        let name = svc.name.get_ref().clone();
        let name_ok = name.len() <= MAX_NAME_LEN
            && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !name_ok {
            self.invalid(
                src,
                svc.name.span(),
                "service.name",
                format!("{name:?} must be 1 to {MAX_NAME_LEN} of a-z 0-9 _ -, starting with a letter"),
            );
        } else if let Some(first) = self.service_names.get(&name) {
            let msg = format!("service {name:?} is already defined at {}; service names must be unique", first.at);
            self.conflict(src, svc.name.span(), "service.name", msg);
        } else {
            let origin = Origin { at: src.at(&svc.name.span()), what: name.clone() };
            self.service_names.insert(name.clone(), origin);
        }
        let index = self.services.len();

        let domains = svc.domains.get_ref();
        if domains.is_empty() {
            self.invalid(
                src,
                svc.domains.span(),
                "service.domains",
                "list at least one domain, such as \"api.example.com\"",
            );
        }
        if domains.len() > MAX_DOMAINS {
            self.invalid(src, svc.domains.span(), "service.domains", format!("more than {MAX_DOMAINS} entries"));
        }
        for (i, d) in domains.iter().enumerate() {
            let field = format!("service.domains[{i}]");
            let pattern = match DomainPattern::parse(d.get_ref()) {
                Ok(p) => p,
                Err(e) => {
                    self.invalid(src, d.span(), field, format!("{:?}: {e}", d.get_ref()));
                    continue;
                }
            };
            let key = pattern.to_string();
            if let Some(first) = self.domain_origins.get(&key) {
                let msg = format!(
                    "{key} is already claimed by service {:?} at {}; a domain belongs to one service, so remove it \
                     from one of the two files",
                    first.what, first.at
                );
                self.conflict(src, d.span(), field, msg);
                continue;
            }
            self.domain_origins.insert(key, Origin { at: src.at(&d.span()), what: name.clone() });
            self.service_index.insert(&pattern, index);
        }

        if routes.len() > MAX_ROUTES {
            self.invalid(src, 0..0, "route", format!("more than {MAX_ROUTES} routes in one file"));
        }
        let mut out: Vec<Route> = Vec::with_capacity(routes.len());
        // Line of each accepted route's path, for shadowing messages.
        let mut lines: Vec<(usize, usize)> = Vec::with_capacity(routes.len());
        let mut ids: HashMap<String, usize> = HashMap::new();
        for (i, r) in routes.iter().enumerate() {
            let Some(route) = self.route(src, &name, i, r.get_ref(), prices, has_prices_table) else { continue };
            let raw = r.get_ref();
            if let Some(&first) = ids.get(route.id.as_ref()) {
                let span = raw.id.as_ref().map_or(raw.path.span(), |s| s.span());
                let msg = format!("route id {:?} is already used by route[{first}]; ids must be unique", route.id);
                self.conflict(src, span, format!("route[{i}].id"), msg);
                continue;
            }
            ids.insert(route.id.to_string(), i);
            let shadow = out.iter().zip(&lines).find(|(earlier, _)| {
                let method_covers = match (&earlier.method, &route.method) {
                    (Method::Any, _) => true,
                    (Method::One(a), Method::One(b)) => a == b,
                    (Method::One(_), Method::Any) => false,
                };
                method_covers && earlier.pattern.covers(&route.pattern)
            });
            if let Some((earlier, &(j, line))) = shadow {
                let same = earlier.method == route.method && earlier.pattern == route.pattern;
                let msg = if same {
                    format!("duplicate of route[{j}] (line {line}); remove one of them")
                } else {
                    format!(
                        "can never match: route[{j}] (line {line}, {} {}) matches every request it would; put the \
                         more specific route first",
                        method_text(&earlier.method),
                        earlier.pattern.as_str()
                    )
                };
                self.conflict(src, raw.path.span(), format!("route[{i}].path"), msg);
                continue;
            }
            lines.push((i, line_col(src.text, raw.path.span().start).0));
            out.push(route);
        }
        self.services.push(ServiceRoutes { name: Arc::from(name.as_str()), routes: out });
    }

    fn route(
        &mut self,
        src: &Source<'_>,
        service: &str,
        i: usize,
        r: &RawRoute,
        prices: Option<&Arc<PriceTable>>,
        has_prices_table: bool,
    ) -> Option<Route> {
        let before = self.errors.len();
        let f = |name: &str| format!("route[{i}].{name}");
        let id = match &r.id {
            Some(id) => {
                let s = id.get_ref();
                let ok = !s.is_empty()
                    && s.len() <= MAX_NAME_LEN
                    && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
                if !ok {
                    self.invalid(
                        src,
                        id.span(),
                        f("id"),
                        format!("{s:?} must be 1 to {MAX_NAME_LEN} of a-z 0-9 _ . -"),
                    );
                }
                s.clone()
            }
            None => format!("route[{i}]"),
        };
        let m = r.method.get_ref();
        let method = if m == "*" {
            Some(Method::Any)
        } else if METHODS.contains(&m.as_str()) {
            Some(Method::One(m.clone()))
        } else {
            let hint = if METHODS.iter().any(|k| k.eq_ignore_ascii_case(m)) { " (write it in uppercase)" } else { "" };
            self.invalid(
                src,
                r.method.span(),
                f("method"),
                format!("unknown method {m:?}{hint}; use one of {}, or \"*\"", METHODS.join(" ")),
            );
            None
        };
        let pattern = match PathPattern::parse(r.path.get_ref()) {
            Ok(p) => Some(p),
            Err(e) => {
                self.invalid(src, r.path.span(), f("path"), e);
                None
            }
        };
        if let Err(e) = check_action(r.action.get_ref()) {
            self.invalid(src, r.action.span(), f("action"), e);
        }
        let cost = match (&r.cost_cents, &r.meter) {
            (Some(c), None) => amount(self, src, c, &f("cost_cents"), CENTS).map(Cost::Fixed),
            (None, Some(meter)) => {
                let m = meter.get_ref();
                let kind = MeterKind::parse(m.kind.get_ref());
                if kind.is_none() {
                    self.invalid(
                        src,
                        m.kind.span(),
                        f("meter.kind"),
                        format!("{:?} is not \"openai\" or \"anthropic\"", m.kind.get_ref()),
                    );
                }
                let max = *m.default_max_tokens.get_ref();
                if !(1..=MAX_TOKENS_LIMIT).contains(&max) {
                    self.invalid(
                        src,
                        m.default_max_tokens.span(),
                        f("meter.default_max_tokens"),
                        format!("must be from 1 to {MAX_TOKENS_LIMIT}"),
                    );
                }
                if !has_prices_table {
                    self.invalid(
                        src,
                        meter.span(),
                        f("meter"),
                        "a metered route needs a [prices] table with [[prices.model]] entries in this file",
                    );
                }
                match (kind, prices, u64::try_from(max)) {
                    (Some(kind), Some(prices), Ok(default_max_tokens)) => {
                        Some(Cost::Metered(Arc::new(MeterSpec { kind, default_max_tokens, prices: prices.clone() })))
                    }
                    _ => None,
                }
            }
            (Some(c), Some(_)) => {
                self.invalid(src, c.span(), f("cost_cents"), "set cost_cents or [route.meter], not both");
                None
            }
            (None, None) => {
                self.invalid(
                    src,
                    r.path.span(),
                    f("cost_cents"),
                    "set cost_cents (0 for free) or a [route.meter] table",
                );
                None
            }
        };
        if self.errors.len() != before {
            return None;
        }
        Some(Route {
            id: Arc::from(format!("{service}/{id}").as_str()),
            method: method?,
            pattern: pattern?,
            action: Arc::from(r.action.get_ref().as_str()),
            cost: cost?,
        })
    }

    fn prices(&mut self, src: &Source<'_>, p: &Spanned<RawPrices>) -> Option<Arc<PriceTable>> {
        let before = self.errors.len();
        let raw = p.get_ref();
        let as_of = raw.as_of.get_ref();
        let date_ok = as_of.len() == 10 && chrono::NaiveDate::parse_from_str(as_of, "%Y-%m-%d").is_ok();
        if !date_ok {
            self.invalid(
                src,
                raw.as_of.span(),
                "prices.as_of",
                format!("{as_of:?} must be a date YYYY-MM-DD: the day these prices were checked"),
            );
        }
        if let Some(s) = &raw.source {
            if s.get_ref().len() > 512 {
                self.invalid(src, s.span(), "prices.source", "longer than 512 characters");
            }
        }
        if raw.model.is_empty() {
            self.invalid(
                src,
                p.span(),
                "prices.model",
                "list at least one [[prices.model]] with name, input_cents_per_mtok and output_cents_per_mtok",
            );
        }
        if raw.model.len() > MAX_MODELS {
            self.invalid(src, p.span(), "prices.model", format!("more than {MAX_MODELS} models"));
        }
        let mut models: Vec<ModelPrice> = Vec::with_capacity(raw.model.len());
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, m) in raw.model.iter().enumerate() {
            let m = m.get_ref();
            let name = m.name.get_ref();
            let name_ok = !name.is_empty()
                && name.len() <= super::meter::MAX_MODEL_LEN
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b));
            if !name_ok {
                self.invalid(
                    src,
                    m.name.span(),
                    format!("prices.model[{i}].name"),
                    format!("{name:?} must be 1 to 128 of A-Z a-z 0-9 . _ : / -"),
                );
            }
            let lower = name.to_ascii_lowercase();
            if let Some(first) = seen.get(&lower) {
                let msg = format!("model {name:?} is already priced by prices.model[{first}]");
                self.conflict(src, m.name.span(), format!("prices.model[{i}].name"), msg);
            }
            seen.insert(lower, i);
            let input = self.price(src, &m.input_cents_per_mtok, format!("prices.model[{i}].input_cents_per_mtok"));
            let output = self.price(src, &m.output_cents_per_mtok, format!("prices.model[{i}].output_cents_per_mtok"));
            if let (Some(input), Some(output)) = (input, output) {
                models.push(ModelPrice {
                    name: name.clone(),
                    input_millicents_per_mtok: input,
                    output_millicents_per_mtok: output,
                });
            }
        }
        let unknown = match &raw.unknown_model {
            Some(u) => match models.iter().find(|m| m.name.eq_ignore_ascii_case(u.get_ref())) {
                Some(m) => m.clone(),
                None => {
                    self.invalid(
                        src,
                        u.span(),
                        "prices.unknown_model",
                        format!("{:?} is not the name of a [[prices.model]] entry", u.get_ref()),
                    );
                    return None;
                }
            },
            None => ModelPrice {
                name: "(unknown model: highest listed prices)".into(),
                input_millicents_per_mtok: models.iter().map(|m| m.input_millicents_per_mtok).max().unwrap_or(0),
                output_millicents_per_mtok: models.iter().map(|m| m.output_millicents_per_mtok).max().unwrap_or(0),
            },
        };
        if self.errors.len() != before {
            return None;
        }
        Some(Arc::new(PriceTable {
            as_of: as_of.clone(),
            source: raw.source.as_ref().map(|s| s.get_ref().clone()),
            models,
            unknown,
        }))
    }

    /// Cents per million tokens (integer or up to three decimals) → millicents per million.
    fn price(&mut self, src: &Source<'_>, n: &Spanned<Number>, field: String) -> Option<u64> {
        amount(self, src, n, &field, (MAX_CENTS_PER_MTOK * money::PER_CENT, "cents per million tokens"))
    }

    fn host(&mut self, src: &Source<'_>, host: RawHost) {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, d) in host.deny_domains.iter().enumerate() {
            let field = format!("host.deny_domains[{i}]");
            match DomainPattern::parse(d.get_ref()) {
                Ok(pattern) => {
                    let key = pattern.to_string();
                    if let Some(first) = seen.get(&key) {
                        self.conflict(
                            src,
                            d.span(),
                            field,
                            format!("{key} is already listed as deny_domains[{first}]"),
                        );
                        continue;
                    }
                    seen.insert(key, i);
                    let (line, _) = line_col(src.text, d.span().start);
                    // A pattern another host file already denies keeps its first entry.
                    if self.deny_index.insert(&pattern, self.deny.len()).is_none() {
                        self.deny.push(DenyRule { pattern, file: src.path.to_path_buf(), line });
                    }
                }
                Err(e) => self.invalid(src, d.span(), field, format!("{:?}: {e}", d.get_ref())),
            }
        }
        if let Some(c) = host.ceilings.as_ref().and_then(|c| c.get_ref().max_per_action_cents.as_ref()) {
            if let Some(max) = amount(self, src, c, "host.ceilings.max_per_action_cents", CENTS) {
                let (line, _) = line_col(src.text, c.span().start);
                self.ceilings.push(Ceiling { max_per_action_millicents: max, file: src.path.to_path_buf(), line });
            }
        }
        if host.rule.len() > MAX_RULES {
            self.invalid(src, 0..0, "host.rule", format!("more than {MAX_RULES} rules in one file"));
        }
        for (i, r) in host.rule.iter().enumerate() {
            let r = r.get_ref();
            let before = self.errors.len();
            let expr = r.expr.get_ref();
            if expr.trim().is_empty() || expr.len() > MAX_CEL_EXPR_LEN {
                self.invalid(
                    src,
                    r.expr.span(),
                    format!("host.rule[{i}].expr"),
                    format!("must be a CEL expression of 1 to {MAX_CEL_EXPR_LEN} characters"),
                );
            }
            let decision = match r.decision.get_ref().as_str() {
                "block" => Some(RuleDecision::Block),
                "request_hold" => Some(RuleDecision::RequestHold),
                other => {
                    self.invalid(
                        src,
                        r.decision.span(),
                        format!("host.rule[{i}].decision"),
                        format!("{other:?} is not \"block\" or \"request_hold\""),
                    );
                    None
                }
            };
            let reason = r.reason.get_ref();
            let reason_ok = !reason.is_empty()
                && reason.len() <= MAX_REASON_LEN
                && reason.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !reason_ok {
                self.invalid(
                    src,
                    r.reason.span(),
                    format!("host.rule[{i}].reason"),
                    format!("{reason:?} must be 1 to {MAX_REASON_LEN} of a-z 0-9 _"),
                );
            }
            if let (Some(decision), true) = (decision, self.errors.len() == before) {
                let (line, column) = line_col(src.text, r.expr.span().start);
                self.rules.push(HostCelRule {
                    expr: expr.clone(),
                    decision,
                    reason: reason.clone(),
                    file: src.path.to_path_buf(),
                    line,
                    column,
                });
            }
        }
    }

    fn raw_tcp_rule(&mut self, src: &Source<'_>, i: usize, r: &RawTcp) {
        let before = self.errors.len();
        let f = |name: &str| format!("raw_tcp[{i}].{name}");
        let host = match DomainPattern::parse(r.host.get_ref()) {
            Ok(h) => Some(h),
            Err(e) => {
                self.invalid(src, r.host.span(), f("host"), format!("{:?}: {e}", r.host.get_ref()));
                None
            }
        };
        let port = match u16::try_from(*r.port.get_ref()) {
            Ok(p @ (80 | 443)) => {
                let msg =
                    format!("port {p} is inspected as HTTP; a raw TCP rule there would skip route and cost checks");
                self.invalid(src, r.port.span(), f("port"), msg);
                None
            }
            Ok(p) if p > 0 => Some(p),
            _ => {
                self.invalid(src, r.port.span(), f("port"), "must be a port from 1 to 65535");
                None
            }
        };
        if let Err(e) = check_action(r.action.get_ref()) {
            self.invalid(src, r.action.span(), f("action"), e);
        }
        let cost = amount(self, src, &r.cost_cents, &f("cost_cents"), CENTS);
        let (Some(host), Some(port), Some(cost_millicents), true) = (host, port, cost, self.errors.len() == before)
        else {
            return;
        };
        let key = (host.to_string(), port);
        if let Some(first) = self.raw_tcp_origins.get(&key) {
            let msg = format!("{}:{port} already has a raw_tcp rule at {}; keep one", key.0, first.at);
            self.conflict(src, r.host.span(), f("host"), msg);
            return;
        }
        self.raw_tcp_origins.insert(key, Origin { at: src.at(&r.host.span()), what: String::new() });
        self.raw_tcp.push(RawTcpRule {
            host,
            port,
            action: Arc::from(r.action.get_ref().as_str()),
            cost_millicents,
            file: src.path.to_path_buf(),
            line: line_col(src.text, r.host.span().start).0,
        });
    }
}

/// The bound (millicents) and unit of a money field other than a price.
const CENTS: (u64, &str) = (money::MAX_MILLICENTS, "cents");

/// An amount of cents from 0 to `max` millicents, whole or with up to three decimals (`0.005`
/// is 5 millicents), in millicents. A decimal is read from the file's own text at the value's span,
/// digit by digit ([`money::parse_cents`]): never through a binary float.
fn amount(
    b: &mut Builder,
    src: &Source<'_>,
    n: &Spanned<Number>,
    field: &str,
    (max, unit): (u64, &str),
) -> Option<u64> {
    let too_large = |i: i64| money::AmountError::TooLarge { text: i.to_string(), max_millicents: max };
    let result = match *n.get_ref() {
        Number::Int(i) => match u64::try_from(i) {
            Ok(c) => money::from_cents(c).filter(|m| *m <= max).ok_or_else(|| too_large(i)),
            Err(_) => Err(money::AmountError::Negative(i.to_string())),
        },
        Number::Decimal => match src.text.get(n.span()) {
            Some(text) => money::parse_cents(text.trim(), max),
            None => Err(money::AmountError::Syntax(String::new())),
        },
    };
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            b.invalid(
                src,
                n.span(),
                field,
                format!("must be from 0 to {} {unit}, whole or with up to three decimals: {e}", money::cents_text(max)),
            );
            None
        }
    }
}

/// Actions are what permissions name: `llm:chat`, segments of a-z 0-9 _ . - joined by ':'. No
/// wildcard: an action is one thing.
pub fn check_action(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= MAX_ACTION_LEN
        && s.split(':').all(|seg| {
            !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "action {s:?} must be segments of a-z 0-9 _ . - joined by ':' (such as \"llm:chat\"), at most {MAX_ACTION_LEN} characters"
        ))
    }
}

fn method_text(m: &Method) -> &str {
    match m {
        Method::Any => "*",
        Method::One(s) => s,
    }
}
