//! A gate's routes, published in its catalog: which permission a request needs. The gate's
//! `[[route]]` table in order; the first route whose method and path match decides, and a
//! request no route matches needs `web:fetch` (GET, HEAD, OPTIONS) or `web:send` (any other
//! method). Publishing them lets an agent's daemon map its own requests to the gate's
//! permissions and price them before they leave the host.
//!
//! Methods are one upper-case method or `*`; paths use the host policies' pattern syntax and
//! normalisation (`sluice_policy::path`), so the agent's side and the gate match a request the
//! same way.

use serde_json::{Map, Value};
use sluice_passport::Permission as PermissionId;
use sluice_policy::path::PathPattern;

/// Most routes in one catalog (the gate's own bound on `[[route]]` plus `[[anonymous]]`).
pub const MAX_ROUTES: usize = 1024;
/// Longest method name.
pub const MAX_METHOD_LEN: usize = 32;

/// The permission of a request no route matches.
pub fn default_permission(method: &str) -> &'static str {
    if matches!(method, "GET" | "HEAD" | "OPTIONS") {
        "web:fetch"
    } else {
        "web:send"
    }
}

/// Checks a route's method: `*` (any) or one method in upper case (`GET`, `POST`, an extension
/// method of upper-case letters). The gate's `gate.toml` and a catalog reader use this one rule.
pub fn check_method(s: &str) -> Result<(), String> {
    if s == "*" {
        return Ok(());
    }
    if s.is_empty() || s.len() > MAX_METHOD_LEN || !s.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!("{s:?} is not a method: write it in upper case (GET, POST, ...) or \"*\""));
    }
    Ok(())
}

/// One route: a request → the permission it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `*` or one upper-case method.
    pub method: String,
    pub path: PathPattern,
    pub permission: String,
}

impl Route {
    /// Parses and checks one route; errors say which part is wrong.
    pub fn parse(method: &str, path: &str, permission: &str) -> Result<Route, (&'static str, String)> {
        check_method(method).map_err(|m| ("method", m))?;
        let path = PathPattern::parse(path).map_err(|m| ("path", m))?;
        PermissionId::parse(permission).map_err(|m| ("permission", m))?;
        Ok(Route { method: method.to_string(), path, permission: permission.to_string() })
    }

    /// Does the route match a request (`method` as sent, `target` its request-target)?
    pub fn matches(&self, method: &str, target: &str) -> bool {
        (self.method == "*" || self.method == method) && self.path.matches_request(target)
    }

    /// `{method, path, permission}`.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("method".into(), Value::String(self.method.clone()));
        m.insert("path".into(), Value::String(self.path.as_str().into()));
        m.insert("permission".into(), Value::String(self.permission.clone()));
        Value::Object(m)
    }

    /// `METHOD PATH`, how messages name a route.
    pub fn label(&self) -> String {
        format!("{} {}", self.method, self.path.as_str())
    }
}

/// The permission a request needs under `routes`: the first match, else the default.
pub fn permission_of<'a>(routes: &'a [Route], method: &str, target: &str) -> &'a str {
    routes.iter().find(|r| r.matches(method, target)).map_or_else(|| default_permission(method), |r| &r.permission)
}

/// Reads the `routes` member of a snapshot strictly: an array of at most [`MAX_ROUTES`] objects
/// with exactly `method`, `path` and `permission`, each checked.
pub fn from_json(v: Option<&Value>) -> Result<Vec<Route>, (String, String)> {
    let list = v.and_then(Value::as_array).ok_or_else(|| {
        (
            "routes".to_string(),
            "must be an array (a catalog without routes was published before routes were part of it: publish a new version)"
                .to_string(),
        )
    })?;
    if list.len() > MAX_ROUTES {
        return Err(("routes".into(), format!("more than {MAX_ROUTES}")));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, r) in list.iter().enumerate() {
        let at = |f: &str| format!("routes[{i}].{f}");
        let o = r.as_object().ok_or_else(|| (format!("routes[{i}]"), "must be an object".to_string()))?;
        for k in o.keys() {
            if !["method", "path", "permission"].contains(&k.as_str()) {
                return Err((at(k), "is not a route field".into()));
            }
        }
        let s = |f: &str| o.get(f).and_then(Value::as_str).ok_or_else(|| (at(f), "must be a string".to_string()));
        let route = Route::parse(s("method")?, s("path")?, s("permission")?).map_err(|(f, m)| (at(f), m))?;
        out.push(route);
    }
    Ok(out)
}

/// Where two route tables differ, for a warning: the routes of `a` not in `b` and of `b` not
/// in `a`, compared in order (first match wins, so order is part of the table).
pub fn differences(a: &[Route], b: &[Route]) -> Vec<String> {
    let mut out = Vec::new();
    let n = a.len().max(b.len());
    for i in 0..n {
        match (a.get(i), b.get(i)) {
            (Some(x), Some(y)) if x == y => {}
            (Some(x), Some(y)) => out.push(format!(
                "route[{i}] is {} -> {} here but {} -> {} in the catalog",
                x.label(),
                x.permission,
                y.label(),
                y.permission
            )),
            (Some(x), None) => out.push(format!("route[{i}] {} -> {} is not in the catalog", x.label(), x.permission)),
            (None, Some(y)) => {
                out.push(format!("the catalog's route[{i}] {} -> {} is not here", y.label(), y.permission))
            }
            (None, None) => {}
        }
    }
    out
}
