//! `gate.toml`: one gate's configuration (every key: docs/gate.md).
//!
//! Strict like `sluice.toml`: an unknown key anywhere is an error naming the key, line and file,
//! and every field is validated when the file is read, so `sluice gate run` never starts on a
//! configuration it would read differently from its operator.

use crate::passport::{IssuerId, Permission, TrustTier};
use crate::policy::path::PathPattern;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Most `[[route]]` plus `[[anonymous]]` entries (each request tries them in order).
pub const MAX_ROUTES: usize = 1024;

/// Errors name the file and the field, as `sluice.toml`'s do (the same type).
pub use crate::config::ConfigError as GateConfigError;

/// The file as written; [`GateConfig`] is what it means.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: String,
    key: PathBuf,
    state_dir: PathBuf,
    listen: String,
    upstream: String,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default = "default_tier")]
    trust_level: String,
    #[serde(default)]
    issuers: Vec<String>,
    #[serde(default)]
    verified_issuers: Vec<String>,
    catalog: Option<PathBuf>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    route: Vec<RawRoute>,
    #[serde(default)]
    anonymous: Vec<RawAnonymous>,
}

fn default_tier() -> String {
    "L1".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    requests_per_minute: Option<u32>,
    requests_per_day: Option<u32>,
    daily_cost_cents: Option<u64>,
    per_call_cost_cents: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    method: String,
    path: String,
    permission: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnonymous {
    method: String,
    path: String,
}

/// The gate's own guardrails, applied per passport on top of the passport's constraints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    pub requests_per_day: Option<u32>,
    pub daily_cost_cents: Option<u64>,
    pub per_call_cost_cents: Option<u64>,
}

/// A request method to match: one method, or `*` for any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MethodMatch {
    Any,
    One(http::Method),
}

impl MethodMatch {
    fn parse(s: &str) -> Result<MethodMatch, String> {
        crate::catalog::routes::check_method(s)?;
        if s == "*" {
            return Ok(MethodMatch::Any);
        }
        http::Method::from_bytes(s.as_bytes()).map(MethodMatch::One).map_err(|e| format!("{s:?}: {e}"))
    }

    pub fn as_str(&self) -> &str {
        match self {
            MethodMatch::Any => "*",
            MethodMatch::One(m) => m.as_str(),
        }
    }

    pub fn matches(&self, m: &http::Method) -> bool {
        match self {
            MethodMatch::Any => true,
            MethodMatch::One(x) => x == m,
        }
    }
}

/// `[[route]]`: a request → the permission it needs (first match wins).
#[derive(Debug, Clone)]
pub struct Route {
    pub method: MethodMatch,
    pub path: PathPattern,
    /// What a passport must grant; its price is the catalog's (`gate::catalog`).
    pub permission: Permission,
}

/// `[[anonymous]]`: served without a passport.
#[derive(Debug, Clone)]
pub struct Anonymous {
    pub method: MethodMatch,
    pub path: PathPattern,
}

#[derive(Debug, Clone)]
pub struct GateConfig {
    pub name: String,
    pub key: PathBuf,
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    pub upstream: http::Uri,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub trust_level: TrustTier,
    pub issuers: Vec<IssuerId>,
    pub verified_issuers: Vec<IssuerId>,
    pub catalog: Option<PathBuf>,
    pub limits: Limits,
    pub routes: Vec<Route>,
    pub anonymous: Vec<Anonymous>,
    /// The file this was read from.
    pub source: PathBuf,
}

impl GateConfig {
    pub fn load(path: &Path) -> Result<GateConfig, GateConfigError> {
        GateConfig::parse(&crate::config::read_config_text(path)?, path)
    }

    /// Parses and validates; relative paths in the file are taken relative to its directory.
    pub fn parse(text: &str, path: &Path) -> Result<GateConfig, GateConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let mut message = crate::config::toml_message(&e);
            if message.contains("unknown field `price_cents`") {
                message.push_str(
                    " | a route has no price of its own any more: prices come from the catalog (`catalog = \"catalog.toml\"`, `sluice catalog publish`, docs/catalogs.md)",
                );
            }
            GateConfigError::Parse { path: path.into(), message }
        })?;
        let bad = |field: &str, problem: String| GateConfigError::Invalid {
            path: path.into(),
            field: field.to_string(),
            problem,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };

        if raw.name.is_empty()
            || raw.name.len() > 64
            || !raw.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(bad("name", "must be 1 to 64 characters of A-Z a-z 0-9 - _ .".into()));
        }
        let listen: SocketAddr = raw.listen.parse().map_err(|_| {
            bad("listen", format!("{:?} is not an address:port such as \"127.0.0.1:8080\"", raw.listen))
        })?;
        let upstream: http::Uri =
            raw.upstream.parse().map_err(|e| bad("upstream", format!("{:?} is not a URL: {e}", raw.upstream)))?;
        match upstream.scheme_str() {
            Some("http") | Some("https") => {}
            _ => return Err(bad("upstream", format!("{:?} must start with http:// or https://", raw.upstream))),
        }
        if upstream.host().is_none() {
            return Err(bad("upstream", format!("{:?} names no host", raw.upstream)));
        }
        if upstream.path_and_query().is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty()) {
            return Err(bad("upstream", "must be scheme://host[:port] only; requests keep their own path".into()));
        }
        let tls = match (raw.tls_cert, raw.tls_key) {
            (None, None) => None,
            (Some(c), Some(k)) => Some((resolve(&c), resolve(&k))),
            _ => return Err(bad("tls_cert", "tls_cert and tls_key go together: set both (HTTPS) or neither".into())),
        };
        let trust_level = TrustTier::parse(&raw.trust_level)
            .ok_or_else(|| bad("trust_level", format!("{:?} is not one of L1, L2, L3", raw.trust_level)))?;
        let parse_issuers = |field: &str, list: &[String]| -> Result<Vec<IssuerId>, GateConfigError> {
            list.iter()
                .enumerate()
                .map(|(i, s)| {
                    IssuerId::parse(s)
                        .map(|(id, _)| id)
                        .map_err(|p| bad(&format!("{field}[{i}]"), format!("{s:?}: {p}")))
                })
                .collect()
        };
        let issuers = parse_issuers("issuers", &raw.issuers)?;
        let verified_issuers = parse_issuers("verified_issuers", &raw.verified_issuers)?;
        if trust_level >= TrustTier::L2 && issuers.is_empty() {
            return Err(bad(
                "issuers",
                format!("trust_level {} accepts pinned issuers only: list their ids (iss_...)", trust_level.as_str()),
            ));
        }
        if trust_level == TrustTier::L3 && verified_issuers.is_empty() {
            return Err(bad("verified_issuers", "trust_level L3 needs at least one verified issuer".into()));
        }
        if let Some(v) = verified_issuers.iter().find(|v| !issuers.contains(v)) {
            return Err(bad(
                "verified_issuers",
                format!("{v} is not also in issuers (a verified issuer is a pinned one)"),
            ));
        }
        let catalog = raw.catalog.as_deref().map(resolve);
        if let Some(c) = &catalog {
            if !c.is_file() {
                return Err(bad("catalog", format!("{}: no such file", c.display())));
            }
        }
        let l = raw.limits;
        if l.requests_per_minute == Some(0) || l.requests_per_day == Some(0) {
            return Err(bad("limits", "a request limit of 0 refuses everything: remove the key for no limit".into()));
        }
        let money_max = crate::money::MAX_MILLICENTS / 1000;
        for (field, v) in
            [("limits.daily_cost_cents", l.daily_cost_cents), ("limits.per_call_cost_cents", l.per_call_cost_cents)]
        {
            if v.is_some_and(|v| v > money_max) {
                return Err(bad(field, format!("must be at most {money_max} cents")));
            }
        }
        if raw.route.len() + raw.anonymous.len() > MAX_ROUTES {
            return Err(bad("route", format!("at most {MAX_ROUTES} [[route]] and [[anonymous]] entries")));
        }
        let mut routes = Vec::with_capacity(raw.route.len());
        for (i, r) in raw.route.iter().enumerate() {
            let f = |k: &str| format!("route[{i}].{k}");
            routes.push(Route {
                method: MethodMatch::parse(&r.method).map_err(|p| bad(&f("method"), p))?,
                path: PathPattern::parse(&r.path).map_err(|p| bad(&f("path"), p))?,
                permission: Permission::parse(&r.permission).map_err(|p| bad(&f("permission"), p))?,
            });
        }
        let mut anonymous = Vec::with_capacity(raw.anonymous.len());
        for (i, a) in raw.anonymous.iter().enumerate() {
            let f = |k: &str| format!("anonymous[{i}].{k}");
            anonymous.push(Anonymous {
                method: MethodMatch::parse(&a.method).map_err(|p| bad(&f("method"), p))?,
                path: PathPattern::parse(&a.path).map_err(|p| bad(&f("path"), p))?,
            });
        }
        Ok(GateConfig {
            name: raw.name,
            key: resolve(&raw.key),
            state_dir: resolve(&raw.state_dir),
            listen,
            upstream,
            tls,
            trust_level,
            issuers,
            verified_issuers,
            catalog,
            limits: Limits {
                requests_per_minute: l.requests_per_minute,
                requests_per_day: l.requests_per_day,
                daily_cost_cents: l.daily_cost_cents,
                per_call_cost_cents: l.per_call_cost_cents,
            },
            routes,
            anonymous,
            source: path.to_path_buf(),
        })
    }

    /// The permission a request needs: the first `[[route]]` that matches (paths normalised as
    /// host policies do, so a respelt path cannot dodge its route), else `web:fetch` for
    /// GET/HEAD/OPTIONS and `web:send` otherwise. Its price is the catalog's.
    pub fn route_of(&self, method: &http::Method, path: &str) -> String {
        for r in &self.routes {
            if r.method.matches(method) && r.path.matches_request(path) {
                return r.permission.as_str().to_string();
            }
        }
        let default = if matches!(*method, http::Method::GET | http::Method::HEAD | http::Method::OPTIONS) {
            "web:fetch"
        } else {
            "web:send"
        };
        default.to_string()
    }

    /// The `[[route]]` table as a catalog publishes it (same order, same patterns).
    pub fn catalog_routes(&self) -> Vec<crate::catalog::Route> {
        self.routes
            .iter()
            .map(|r| crate::catalog::Route {
                method: r.method.as_str().to_string(),
                path: r.path.clone(),
                permission: r.permission.as_str().to_string(),
            })
            .collect()
    }

    /// The first `[[route]]` a request matches, for the 401 hint.
    pub fn route_for_hint(&self, method: &http::Method, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.method.matches(method) && r.path.matches_request(path))
    }

    /// Is the request in the anonymous subset? Matched strictly: the path must already be in
    /// normal form (no escapes, `;`, `\`, empty, `.` or `..` segments) and literal segments
    /// match case-sensitively, so no spelling of a protected path can pass as a public one.
    pub fn is_anonymous(&self, method: &http::Method, path: &str) -> bool {
        self.anonymous.iter().any(|a| a.method.matches(method) && a.path.matches_strict(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISS: &str = "iss_11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";

    fn parse(text: &str) -> Result<GateConfig, GateConfigError> {
        GateConfig::parse(text, Path::new("/etc/sluice/gates/test.toml"))
    }

    const BASE: &str = r#"
name = "shipping-api"
key = "/var/lib/sluice-gate/gate.key"
state_dir = "/var/lib/sluice-gate"
listen = "127.0.0.1:8080"
upstream = "http://127.0.0.1:9000"
"#;

    #[test]
    fn the_documented_example_parses() {
        // The catalog is checked to exist; the example's sits beside a real config only.
        let text: String = include_str!("../../../policies/gate.toml.example")
            .lines()
            .filter(|l| !l.starts_with("catalog ="))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = parse(&text).unwrap();
        assert_eq!(c.name, "shipping-api");
        assert_eq!(c.trust_level, TrustTier::L2);
        assert_eq!(c.limits.requests_per_minute, Some(60));
        assert_eq!(c.route_of(&http::Method::POST, "/v1/shipments"), "shipments:create");
        assert_eq!(c.route_of(&http::Method::POST, "/V1/%73hipments;x"), "shipments:create");
        assert_eq!(c.route_of(&http::Method::DELETE, "/v1/x"), "web:send");
        assert!(c.is_anonymous(&http::Method::GET, "/v1/rates"));
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let e = parse(&format!("{BASE}trust_levle = \"L2\"\n")).unwrap_err().to_string();
        assert!(e.contains("trust_levle") && e.contains("line 7") && e.contains("test.toml"), "{e}");
        let e = parse(&format!("{BASE}[limits]\nrequests_per_hour = 5\n")).unwrap_err().to_string();
        assert!(e.contains("requests_per_hour"), "{e}");
        let e = parse(&format!("{BASE}[[route]]\nmethod = \"GET\"\npath = \"/x\"\npermission = \"a:b\"\ncost = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cost"), "{e}");
        // The old per-route price says where prices went.
        let e = parse(&format!(
            "{BASE}[[route]]\nmethod = \"GET\"\npath = \"/x\"\npermission = \"a:b\"\nprice_cents = 1\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("price_cents") && e.contains("sluice catalog publish"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let cases = [
            ("trust_level = \"L2\"\n", "issuers"),
            (&format!("trust_level = \"L3\"\nissuers = [\"{ISS}\"]\n"), "verified_issuers"),
            ("issuers = [\"iss_nope\"]\n", "issuers[0]"),
            ("trust_level = \"L9\"\n", "trust_level"),
            ("tls_cert = \"c.pem\"\n", "tls_cert"),
            ("catalog = \"/nonexistent/catalog.toml\"\n", "catalog"),
            ("[limits]\nrequests_per_minute = 0\n", "limits"),
            ("[[route]]\nmethod = \"get\"\npath = \"/x\"\npermission = \"a:b\"\n", "route[0].method"),
            ("[[route]]\nmethod = \"GET\"\npath = \"x\"\npermission = \"a:b\"\n", "route[0].path"),
            ("[[anonymous]]\nmethod = \"GET\"\npath = \"/{x\"\n", "anonymous[0].path"),
        ];
        for (extra, field) in cases {
            let e = parse(&format!("{BASE}{extra}")).unwrap_err().to_string();
            assert!(e.contains(field), "{extra}: {e}");
        }
        let e = parse(&BASE.replace("http://127.0.0.1:9000", "ftp://x")).unwrap_err().to_string();
        assert!(e.contains("upstream"), "{e}");
        let e = parse(&BASE.replace("http://127.0.0.1:9000", "http://x/base")).unwrap_err().to_string();
        assert!(e.contains("upstream"), "{e}");
        let e = parse(&BASE.replace("127.0.0.1:8080", "localhost")).unwrap_err().to_string();
        assert!(e.contains("listen"), "{e}");
    }

    #[test]
    fn anonymous_paths_match_only_in_normal_form() {
        let c = parse(&format!("{BASE}[[anonymous]]\nmethod = \"GET\"\npath = \"/v1/rates\"\n")).unwrap();
        assert!(c.is_anonymous(&http::Method::GET, "/v1/rates"));
        assert!(c.is_anonymous(&http::Method::GET, "/v1/rates?from=x"));
        for p in
            ["/v1/rates;x", "/V1/rates", "/v1/%72ates", "/v1//rates", "/v1/./rates", "/v1/x/../rates", "/v1\\rates"]
        {
            assert!(!c.is_anonymous(&http::Method::GET, p), "{p}");
        }
        assert!(!c.is_anonymous(&http::Method::POST, "/v1/rates"));
    }
}
