//! What a new catalog version changes for the agents already using the gate, and which of those
//! changes break their terms. One deterministic diff, used by `sluice catalog impact`, by
//! `publish` (which refuses breaking changes unless told otherwise) and by an agent checking a
//! version it fetched.
//!
//! Breaking means worse for an agent that agreed to the old terms: a permission gone, a higher
//! price or fee, a weaker SLA, a lower rate, an approval newly required or required sooner, a
//! higher minimum trust tier. The price lock keeps running passports on their old prices, but the
//! rest of a breaking change reaches them, which is why it needs `--accept-breaking`.
//!
//! Routes (request → permission) are compared by their method and path pattern: a route gone
//! (`route_removed`) or pointing at another permission (`route_changed`) is breaking, since a
//! request an agent was granted and priced for would now need another permission; a new route
//! (`route_added`) is not. Order matters to the gate (first match wins) but a reordering alone is
//! not listed.

use serde_json::{Map, Value};
use sluice_passport::{money, TrustTier};

use crate::routes::Route;
use crate::snapshot::Permission;
use crate::terms::Terms;

/// The kinds of change, in the order a diff lists them for one permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChangeType {
    PermissionRemoved,
    PermissionAdded,
    PriceIncrease,
    PriceDecrease,
    FeeIncrease,
    FeeDecrease,
    SlaDowngrade,
    SlaUpgrade,
    RateDecrease,
    RateIncrease,
    ApprovalTightened,
    ApprovalRelaxed,
    RiskChange,
    DescriptionChange,
    TrustRaise,
    TrustLower,
    RouteRemoved,
    RouteAdded,
    RouteChanged,
}

impl ChangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::PermissionRemoved => "permission_removed",
            ChangeType::PermissionAdded => "permission_added",
            ChangeType::PriceIncrease => "price_increase",
            ChangeType::PriceDecrease => "price_decrease",
            ChangeType::FeeIncrease => "fee_increase",
            ChangeType::FeeDecrease => "fee_decrease",
            ChangeType::SlaDowngrade => "sla_downgrade",
            ChangeType::SlaUpgrade => "sla_upgrade",
            ChangeType::RateDecrease => "rate_decrease",
            ChangeType::RateIncrease => "rate_increase",
            ChangeType::ApprovalTightened => "approval_tightened",
            ChangeType::ApprovalRelaxed => "approval_relaxed",
            ChangeType::RiskChange => "risk_change",
            ChangeType::DescriptionChange => "description_change",
            ChangeType::TrustRaise => "trust_raise",
            ChangeType::TrustLower => "trust_lower",
            ChangeType::RouteRemoved => "route_removed",
            ChangeType::RouteAdded => "route_added",
            ChangeType::RouteChanged => "route_changed",
        }
    }

    /// Whether an agent on the old terms is worse off.
    pub fn breaking(self) -> bool {
        matches!(
            self,
            ChangeType::PermissionRemoved
                | ChangeType::PriceIncrease
                | ChangeType::FeeIncrease
                | ChangeType::SlaDowngrade
                | ChangeType::RateDecrease
                | ChangeType::ApprovalTightened
                | ChangeType::TrustRaise
                | ChangeType::RouteRemoved
                | ChangeType::RouteChanged
        )
    }
}

/// One change. `permission_key` is `None` for a catalog-wide change (the trust tier); for a
/// route change it is the route's permission (the old one, if it had one), and the values are
/// the routes (`{method, path, permission}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: ChangeType,
    pub permission_key: Option<String>,
    pub old_value: Value,
    pub new_value: Value,
}

impl Change {
    pub fn breaking(&self) -> bool {
        self.kind.breaking()
    }
    /// What the change is about, for a message: the permission, `METHOD PATH` for a route, or
    /// `(catalog)`.
    pub fn subject(&self) -> String {
        if matches!(self.kind, ChangeType::RouteAdded | ChangeType::RouteRemoved | ChangeType::RouteChanged) {
            let r = if self.old_value.is_null() { &self.new_value } else { &self.old_value };
            return format!(
                "{} {}",
                r.get("method").and_then(Value::as_str).unwrap_or("?"),
                r.get("path").and_then(Value::as_str).unwrap_or("?")
            );
        }
        self.permission_key.clone().unwrap_or_else(|| "(catalog)".into())
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), Value::String(self.kind.as_str().into()));
        m.insert("permission_key".into(), self.permission_key.clone().map_or(Value::Null, Value::String));
        m.insert("old_value".into(), self.old_value.clone());
        m.insert("new_value".into(), self.new_value.clone());
        m.insert("breaking".into(), Value::Bool(self.breaking()));
        Value::Object(m)
    }
}

/// The diff between two catalogs' terms.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Impact {
    pub changes: Vec<Change>,
}

impl Impact {
    pub fn has_breaking_changes(&self) -> bool {
        self.changes.iter().any(Change::breaking)
    }

    /// `{has_breaking_changes, changes: [{type, permission_key, old_value, new_value, breaking}]}`.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("has_breaking_changes".into(), Value::Bool(self.has_breaking_changes()));
        m.insert("changes".into(), Value::Array(self.changes.iter().map(Change::to_json).collect()));
        Value::Object(m)
    }

    /// Compares `new` with `old` (`None`: nothing published yet, so every permission is added).
    /// Both permission lists must be sorted by key (as [`crate::Draft`] and [`crate::Snapshot`]
    /// keep them). Catalog-wide changes come first, then each permission's in key order.
    pub fn between(old: Option<(&[Permission], TrustTier)>, new: (&[Permission], TrustTier)) -> Impact {
        let mut changes = Vec::new();
        let (old_perms, old_trust) = old.unwrap_or((&[], new.1));
        if new.1 > old_trust {
            changes.push(Change {
                kind: ChangeType::TrustRaise,
                permission_key: None,
                old_value: old_trust.as_str().into(),
                new_value: new.1.as_str().into(),
            });
        } else if new.1 < old_trust {
            changes.push(Change {
                kind: ChangeType::TrustLower,
                permission_key: None,
                old_value: old_trust.as_str().into(),
                new_value: new.1.as_str().into(),
            });
        }
        let (mut i, mut j) = (0, 0);
        loop {
            match (old_perms.get(i), new.0.get(j)) {
                (None, None) => break,
                (Some(o), n) if n.is_none_or(|n| o.key < n.key) => {
                    changes.push(whole(ChangeType::PermissionRemoved, o, true));
                    i += 1;
                }
                (o, Some(n)) if o.is_none_or(|o| n.key < o.key) => {
                    changes.push(whole(ChangeType::PermissionAdded, n, false));
                    j += 1;
                }
                (Some(o), Some(n)) => {
                    terms(&mut changes, o, n);
                    i += 1;
                    j += 1;
                }
                // Unreachable: the arms above cover every case; kept total without a panic.
                _ => break,
            }
        }
        Impact { changes }
    }

    /// Adds the route changes from `old` (`None`: nothing published yet) to `new`, after the
    /// permissions' changes, in the order of `old` then of `new`.
    pub fn with_routes(mut self, old: Option<&[Route]>, new: &[Route]) -> Impact {
        let old = old.unwrap_or(&[]);
        let same = |a: &Route, b: &Route| a.method == b.method && a.path.as_str() == b.path.as_str();
        // The first route of a method and path decides; a later duplicate never matches.
        let first = |list: &[Route], r: &Route| list.iter().find(|x| same(x, r)).cloned();
        for (i, o) in old.iter().enumerate() {
            if old.iter().take(i).any(|x| same(x, o)) {
                continue;
            }
            match first(new, o) {
                None => self.changes.push(Change {
                    kind: ChangeType::RouteRemoved,
                    permission_key: Some(o.permission.clone()),
                    old_value: o.to_json(),
                    new_value: Value::Null,
                }),
                Some(n) if n.permission != o.permission => self.changes.push(Change {
                    kind: ChangeType::RouteChanged,
                    permission_key: Some(o.permission.clone()),
                    old_value: o.to_json(),
                    new_value: n.to_json(),
                }),
                Some(_) => {}
            }
        }
        for (i, n) in new.iter().enumerate() {
            if new.iter().take(i).any(|x| same(x, n)) || first(old, n).is_some() {
                continue;
            }
            self.changes.push(Change {
                kind: ChangeType::RouteAdded,
                permission_key: Some(n.permission.clone()),
                old_value: Value::Null,
                new_value: n.to_json(),
            });
        }
        self
    }
}

fn whole(kind: ChangeType, p: &Permission, removed: bool) -> Change {
    let terms = Value::Object(p.terms.to_json());
    let (old_value, new_value) = if removed { (terms, Value::Null) } else { (Value::Null, terms) };
    Change { kind, permission_key: Some(p.key.clone()), old_value, new_value }
}

fn money_value(m: Option<u64>) -> Value {
    m.map_or(Value::Null, |m| Value::String(money::cents_text(m)))
}

fn num(m: Option<u64>) -> Value {
    m.map_or(Value::Null, Value::from)
}

/// Pushes the changes between one permission's old and new terms.
fn terms(out: &mut Vec<Change>, o: &Permission, n: &Permission) {
    let key = Some(o.key.clone());
    let mut push = |kind, old_value, new_value| {
        out.push(Change { kind, permission_key: key.clone(), old_value, new_value });
    };
    let (ot, nt): (&Terms, &Terms) = (&o.terms, &n.terms);

    // Prices: absent is free.
    let (op, np) = (ot.per_call_millicents.unwrap_or(0), nt.per_call_millicents.unwrap_or(0));
    if np != op {
        let kind = if np > op { ChangeType::PriceIncrease } else { ChangeType::PriceDecrease };
        push(kind, money_value(ot.per_call_millicents), money_value(nt.per_call_millicents));
    }
    let (of, nf) = (ot.platform_fee_basis_points.unwrap_or(0), nt.platform_fee_basis_points.unwrap_or(0));
    if nf != of {
        let kind = if nf > of { ChangeType::FeeIncrease } else { ChangeType::FeeDecrease };
        push(kind, num(ot.platform_fee_basis_points), num(nt.platform_fee_basis_points));
    }

    // SLA: a promise withdrawn is a downgrade; a new promise an upgrade.
    if let Some(worse) = compare_promise(ot.uptime_basis_points, nt.uptime_basis_points, |a, b| b < a) {
        let kind = if worse { ChangeType::SlaDowngrade } else { ChangeType::SlaUpgrade };
        push(kind, num(ot.uptime_basis_points), num(nt.uptime_basis_points));
    }
    if let Some(worse) = compare_promise(ot.response_time_ms, nt.response_time_ms, |a, b| b > a) {
        let kind = if worse { ChangeType::SlaDowngrade } else { ChangeType::SlaUpgrade };
        push(kind, num(ot.response_time_ms), num(nt.response_time_ms));
    }

    // Rate: no limit is the most generous; a new limit or a lower one is a decrease.
    if ot.rate_max_per_minute != nt.rate_max_per_minute {
        let worse = match (ot.rate_max_per_minute, nt.rate_max_per_minute) {
            (None, Some(_)) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => b < a,
            (None, None) => false,
        };
        let kind = if worse { ChangeType::RateDecrease } else { ChangeType::RateIncrease };
        push(kind, num(ot.rate_max_per_minute), num(nt.rate_max_per_minute));
    }

    // Approval: required, or required from a lower amount, is tighter.
    let (oreq, nreq) = (ot.approval_required.unwrap_or(false), nt.approval_required.unwrap_or(false));
    if oreq != nreq {
        let kind = if nreq { ChangeType::ApprovalTightened } else { ChangeType::ApprovalRelaxed };
        push(kind, Value::Bool(oreq), Value::Bool(nreq));
    }
    if ot.approval_threshold_millicents != nt.approval_threshold_millicents {
        let tighter = match (ot.approval_threshold_millicents, nt.approval_threshold_millicents) {
            (None, Some(_)) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => b < a,
            (None, None) => false,
        };
        let kind = if tighter { ChangeType::ApprovalTightened } else { ChangeType::ApprovalRelaxed };
        push(kind, money_value(ot.approval_threshold_millicents), money_value(nt.approval_threshold_millicents));
    }

    if o.risk_level != n.risk_level {
        push(ChangeType::RiskChange, o.risk_level.as_str().into(), n.risk_level.as_str().into());
    }
    if o.description != n.description {
        push(ChangeType::DescriptionChange, o.description.clone().into(), n.description.clone().into());
    }
}

/// `Some(true)` if the promise got worse (by `worse(old, new)`, or withdrawn), `Some(false)` if
/// it got better (or was added), `None` if unchanged.
fn compare_promise(old: Option<u64>, new: Option<u64>, worse: impl Fn(u64, u64) -> bool) -> Option<bool> {
    match (old, new) {
        (a, b) if a == b => None,
        (Some(_), None) => Some(true),
        (None, Some(_)) => Some(false),
        (Some(a), Some(b)) => Some(worse(a, b)),
        (None, None) => None,
    }
}
