//! A static upper bound on the work one evaluation of a compiled rule can do ([`work_bound`]).
//!
//! The `cel` interpreter has no step budget and cannot be interrupted, so the bound is on the
//! expression's shape: a rule whose bound is above [`MAX_RULE_WORK`] is refused when it is
//! compiled, before it ever runs.
//!
//! The unit is one interpreter step over one element or byte. For each node the bound tracks a
//! [`Shape`]: how many elements (or bytes) a value it produces can have, how big all of it and
//! each element can be. Root variables get the largest shape the request and passport bounds
//! allow ([`root_shape`]). Then:
//! - a comprehension (`all`, `exists`, `exists_one`, `map`, `filter`) costs its range's elements
//!   × (its condition + its step), with the iteration variable as large as one element and the
//!   accumulator as large as its start plus one step's growth per element;
//! - `+` makes a value as large as both operands and costs their size (appending to the
//!   accumulator costs the appended part); `matches` costs text × pattern; any other call costs
//!   the size of its arguments (a scan: `contains`, `in`, `==`...), and those that return a
//!   scalar (comparisons, `size`, arithmetic...) return size 1;
//! - indexing gives one element; a conditional, the larger branch.
//!
//! This over-estimates (a `exists` that stops early is counted in full), never under-estimates
//! the standard library's work.

use cel::common::ast::{EntryExpr, Expr, LiteralValue};
use cel::IdedExpr;

/// Largest bound accepted for one rule: 300 × 300 nested `exists` over literal lists (a bound of
/// about 2.2 million) is accepted, 1000 × 1000 or three levels of 130 are not. The time this
/// takes has not been measured against the bound; what is accepted can take milliseconds, on a
/// blocking thread, in its own passport's lane (the daemon's `service::lanes`).
pub const MAX_RULE_WORK: u64 = 4_000_000;

/// Bounds on a value: its elements (or bytes), its whole size, and one element's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    count: u64,
    total: u64,
    elem: u64,
}

impl Shape {
    const SCALAR: Shape = Shape { count: 1, total: 1, elem: 1 };

    fn flat(n: u64) -> Shape {
        Shape { count: n, total: n, elem: n }
    }
}

/// The largest value a rule's context variable can hold (module doc of `cel`): request strings
/// are at most 8 KiB (path) and 253 bytes (host), permissions at most 256 of 128 bytes.
fn root_shape(path: &[&str]) -> Shape {
    match path {
        ["request", "path"] => Shape::flat(8192),
        ["request", "host"] => Shape::flat(253),
        ["request", "method"] => Shape::flat(32),
        ["request"] => Shape { count: 3, total: 8192 + 253 + 32, elem: 8192 },
        ["action"] => Shape::flat(128),
        ["passport", "permissions"] => Shape { count: 256, total: 256 * 128, elem: 128 },
        ["passport", _] => Shape::flat(128),
        ["passport"] => Shape { count: 5, total: 256 * 128 + 4 * 128, elem: 256 * 128 },
        ["usage", _] | ["cost_cents"] | ["cost_millicents"] | ["now"] => Shape::SCALAR,
        ["usage"] => Shape { count: 7, total: 16, elem: 8 },
        // Anything else fails at run time; bound it like the largest variable.
        _ => Shape { count: 256 * 128, total: 256 * 128, elem: 256 * 128 },
    }
}

/// Functions whose result is a bool, a number, a type, a timestamp or a duration.
const SCALAR_RESULTS: &[&str] = &[
    "_==_",
    "_!=_",
    "_<_",
    "_<=_",
    "_>_",
    "_>=_",
    "_&&_",
    "_||_",
    "!_",
    "-_",
    "_-_",
    "_*_",
    "_/_",
    "_%_",
    "@in",
    "@not_strictly_false",
    "size",
    "contains",
    "startsWith",
    "endsWith",
    "matches",
    "int",
    "uint",
    "double",
    "bool",
    "type",
    "timestamp",
    "duration",
    "getFullYear",
    "getMonth",
    "getDayOfYear",
    "getDayOfMonth",
    "getDate",
    "getDayOfWeek",
    "getHours",
    "getMinutes",
    "getSeconds",
    "getMilliseconds",
    "has",
    "max",
    "min",
];

/// What a bound is computed with: the iteration and accumulator variables in scope.
struct Scope<'a> {
    vars: Vec<(&'a str, Shape)>,
    /// The innermost accumulator's name: appending to it costs only what is appended.
    accumulator: Option<&'a str>,
}

/// An upper bound on the work of one evaluation of `root` (see the module doc); saturates.
pub fn work_bound(root: &IdedExpr) -> u64 {
    let mut scope = Scope { vars: Vec::new(), accumulator: None };
    bound(root, &mut scope).0
}

/// `(work, shape)` of one node. Recursion is bounded by the tree's depth, which compiling limits
/// to `MAX_AST_DEPTH` before this runs.
fn bound<'a>(e: &'a IdedExpr, scope: &mut Scope<'a>) -> (u64, Shape) {
    match &e.expr {
        Expr::Unspecified => (1, Shape::SCALAR),
        Expr::Literal(l) => {
            let n = match l {
                LiteralValue::String(s) => s.inner().len() as u64,
                LiteralValue::Bytes(b) => b.inner().len() as u64,
                _ => 1,
            };
            (1, Shape::flat(n.max(1)))
        }
        Expr::Ident(name) => match scope.vars.iter().rev().find(|(n, _)| n == name) {
            Some((_, shape)) => (1, *shape),
            None => (1, root_shape(&[name.as_str()])),
        },
        Expr::Select(s) => {
            if let Expr::Ident(root) = &s.operand.expr {
                if !scope.vars.iter().any(|(n, _)| n == root) {
                    return (2, root_shape(&[root.as_str(), s.field.as_str()]));
                }
            }
            let (w, shape) = bound(&s.operand, scope);
            (w.saturating_add(1), Shape::flat(shape.elem))
        }
        Expr::List(l) => {
            let mut work = 1u64;
            let mut total = 0u64;
            let mut elem = 1u64;
            for x in &l.elements {
                let (w, s) = bound(x, scope);
                work = work.saturating_add(w);
                total = total.saturating_add(s.total).saturating_add(1);
                elem = elem.max(s.total);
            }
            (work, Shape { count: l.elements.len() as u64, total, elem })
        }
        Expr::Map(m) => {
            let mut work = 1u64;
            let mut total = 0u64;
            let mut elem = 1u64;
            for entry in &m.entries {
                let (k, v) = match &entry.expr {
                    EntryExpr::MapEntry(me) => (bound(&me.key, scope), bound(&me.value, scope)),
                    EntryExpr::StructField(f) => ((1, Shape::SCALAR), bound(&f.value, scope)),
                };
                work = work.saturating_add(k.0).saturating_add(v.0);
                total = total.saturating_add(k.1.total).saturating_add(v.1.total);
                elem = elem.max(k.1.total).max(v.1.total);
            }
            (work, Shape { count: m.entries.len() as u64, total, elem })
        }
        Expr::Struct(s) => {
            let mut work = 1u64;
            let mut total = 0u64;
            for entry in &s.entries {
                if let EntryExpr::StructField(f) = &entry.expr {
                    let (w, sh) = bound(&f.value, scope);
                    work = work.saturating_add(w);
                    total = total.saturating_add(sh.total);
                }
            }
            (work, Shape::flat(total.max(1)))
        }
        Expr::Call(c) => {
            let mut work = 1u64;
            let mut args: Vec<(Shape, bool)> = Vec::with_capacity(c.args.len() + 1);
            for a in c.target.iter().map(|t| t.as_ref()).chain(c.args.iter()) {
                let (w, s) = bound(a, scope);
                work = work.saturating_add(w);
                let is_accumulator = matches!(&a.expr, Expr::Ident(n) if Some(n.as_str()) == scope.accumulator);
                args.push((s, is_accumulator));
            }
            let totals = args.iter().fold(0u64, |t, (s, _)| t.saturating_add(s.total));
            let name = c.func_name.as_str();
            let (call_work, shape) = match name {
                "_+_" => {
                    // Appending to the accumulator costs what is appended.
                    let moved = args.iter().filter(|(_, acc)| !acc).fold(0u64, |t, (s, _)| t.saturating_add(s.total));
                    let count = args.iter().fold(0u64, |t, (s, _)| t.saturating_add(s.count));
                    let elem = args.iter().map(|(s, _)| s.elem).max().unwrap_or(1);
                    if args.iter().all(|(s, _)| s.total <= 1) {
                        // Numbers (or empty operands): a number.
                        (moved.saturating_add(1), Shape::SCALAR)
                    } else {
                        (moved.saturating_add(1), Shape { count, total: totals, elem })
                    }
                }
                "matches" => {
                    let (text, pattern) = match args.as_slice() {
                        [(a, _), (b, _)] => (a.total, b.total),
                        _ => (totals, totals),
                    };
                    (text.saturating_add(1).saturating_mul(pattern.saturating_add(1)), Shape::SCALAR)
                }
                "_?_:_" => {
                    let branch = |i: usize| args.get(i).map(|(s, _)| *s).unwrap_or(Shape::SCALAR);
                    let (a, b) = (branch(1), branch(2));
                    (1, Shape { count: a.count.max(b.count), total: a.total.max(b.total), elem: a.elem.max(b.elem) })
                }
                "_[_]" => {
                    let elem = args.first().map(|(s, _)| s.elem).unwrap_or(1);
                    (totals.saturating_add(1), Shape::flat(elem))
                }
                _ if SCALAR_RESULTS.contains(&name) => (totals.saturating_add(1), Shape::SCALAR),
                _ => (totals.saturating_add(1), Shape::flat(totals.max(1))),
            };
            (work.saturating_add(call_work), shape)
        }
        Expr::Comprehension(c) => {
            let (range_work, range) = bound(&c.iter_range, scope);
            let (init_work, init) = bound(&c.accu_init, scope);
            let n = range.count;
            let item = Shape::flat(range.elem);
            let outer_accumulator = scope.accumulator;
            scope.accumulator = Some(c.accu_var.as_str());
            scope.vars.push((c.iter_var.as_str(), item));
            if let Some(v2) = &c.iter_var2 {
                scope.vars.push((v2.as_str(), item));
            }
            // What one step makes of the starting accumulator: if it grows, it grows as much at
            // every element (steps only append: `map`, `filter`), else it stays that size.
            scope.vars.push((c.accu_var.as_str(), init));
            let (_, next) = bound(&c.loop_step, scope);
            let accu = if next.total <= init.total {
                Shape {
                    count: init.count.max(next.count),
                    total: init.total.max(next.total),
                    elem: init.elem.max(next.elem),
                }
            } else {
                let grow = |a: u64, b: u64| a.saturating_add(n.saturating_mul(b.saturating_sub(a)));
                Shape {
                    count: grow(init.count, next.count),
                    total: grow(init.total, next.total),
                    elem: init.elem.max(next.elem),
                }
            };
            scope.vars.pop();
            scope.vars.push((c.accu_var.as_str(), accu));
            let (cond_work, _) = bound(&c.loop_cond, scope);
            let (step_work, _) = bound(&c.loop_step, scope);
            scope.vars.pop();
            if c.iter_var2.is_some() {
                scope.vars.pop();
            }
            scope.vars.pop();
            scope.accumulator = outer_accumulator;
            scope.vars.push((c.accu_var.as_str(), accu));
            let (result_work, result) = bound(&c.result, scope);
            scope.vars.pop();
            let work = range_work
                .saturating_add(init_work)
                .saturating_add(n.saturating_mul(cond_work.saturating_add(step_work)))
                .saturating_add(result_work);
            (work, result)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::CompiledRules;
    use super::MAX_RULE_WORK;
    use sluice_passport::constraints::{CelRule, RuleDecision};

    fn rule(expr: &str) -> CelRule {
        CelRule { expr: expr.to_string(), decision: RuleDecision::Block, reason: "r".into() }
    }

    fn list(k: usize) -> String {
        format!("[{}]", vec!["0"; k].join(","))
    }

    #[test]
    fn ordinary_rules_are_well_within_the_bound() {
        let domains: Vec<String> = (0..150).map(|i| format!("\"d{i}.example.com\"")).collect();
        for expr in [
            "cost_cents > 500 && action == \"llm:chat\"".to_string(),
            "request.path.startsWith(\"/v1/admin\") || request.method == \"DELETE\"".to_string(),
            "request.path.matches(\"^/v1/(files|batches)/.*$\")".to_string(),
            "passport.permissions.exists(p, p.startsWith(\"llm:\")) && usage.spent_cents > 100".to_string(),
            format!("[{}].exists(d, request.host.endsWith(d))", domains.join(",")),
            "now.getHours() < 6 && usage.daily_requests > 1000".to_string(),
            format!("{}.map(x, x + 1).filter(y, y > 0).size() > 0", list(500)),
        ] {
            let work =
                super::work_bound(CompiledRules::compile(&[rule(&expr)]).expect(&expr).rules[0].program.expression());
            assert!(work < MAX_RULE_WORK / 4, "{expr}: {work}");
        }
    }

    #[test]
    fn nested_comprehensions_over_long_lists_are_refused_naming_the_bound() {
        // 300 × 300 passes; 1000 × 1000 (and three levels of 100) do not.
        let ok = format!("{}.exists(x, {}.exists(y, x + y > 0))", list(300), list(300));
        CompiledRules::compile(&[rule(&ok)]).expect("300 x 300");
        for expr in [
            format!("{}.exists(x, {}.exists(y, x + y > 0))", list(1000), list(1000)),
            format!("{l}.exists(x, {l}.exists(y, {l}.exists(z, x + y + z > 0)))", l = list(130)),
            // Each element of the outer list is the whole of the inner one: their product counts.
            format!(
                "[{l},{l},{l}].exists(a, a.exists(x, passport.permissions.exists(p, p.contains(\"x\"))))",
                l = list(400)
            ),
            // A regex over the path, with a pattern built from a long variable.
            "request.path.matches(request.path + request.path + request.path)".to_string(),
        ] {
            let e = CompiledRules::compile(&[rule(&expr)]).expect_err(&expr);
            assert!(e.message.contains("steps, more than the 4000000 allowed"), "{expr}: {e}");
        }
    }

    #[test]
    fn the_bound_counts_what_a_comprehension_builds() {
        // `map` over n elements builds n elements; ranging over that result again multiplies.
        let once = format!("{}.map(x, x).size() > 0", list(200));
        let twice = format!("{l}.map(x, x).exists(a, {l}.map(y, y).exists(b, a == b))", l = list(200));
        let bound =
            |e: &str| super::work_bound(CompiledRules::compile(&[rule(e)]).expect(e).rules[0].program.expression());
        assert!(bound(&once) < 10_000, "{}", bound(&once));
        assert!(bound(&twice) > 200 * 200, "{}", bound(&twice));
    }
}
