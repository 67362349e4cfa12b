//! `core:cel:rules`: issuer-written CEL expressions that can block or hold a request.
//!
//! Every rule is compiled once, when a passport is registered ([`CompiledRules::compile`]); a rule
//! that does not compile makes the passport unusable, with an error naming the rule, its expression
//! and the compiler's message. At decision time the rules run in order; the first one that returns
//! `true` decides. A rule can only tighten a decision (block or hold), never allow.
//!
//! Failing closed: a rule that fails at run time (an unknown variable or field, division by zero,
//! a type error, a panic inside the interpreter) or returns anything but a bool blocks the request
//! with reason `policy_error`. An issuer who wrote a broken guard believed it protected something.
//!
//! # Context
//! Each rule sees these variables (values as of *before* this request is counted):
//!
//! | variable | CEL type | value |
//! |---|---|---|
//! | `request.method` | string | HTTP method as sent (`GET`, `POST`, …); `""` when unknown |
//! | `request.host` | string | normalised host name (lowercase, no trailing dot); `""` when none |
//! | `request.path` | string | HTTP path and query as sent; `""` when unknown |
//! | `action` | string | the action, e.g. `web:fetch`, `llm:chat` |
//! | `cost_cents` | int | the request's cost in cents, rounded up |
//! | `cost_millicents` | int | the request's cost in millicents (exact) |
//! | `usage.spent_cents` | int | cents spent in the passport's cumulative window, rounded up |
//! | `usage.spent_millicents` | int | the same in millicents (exact) |
//! | `usage.window` | string | that window: `daily`, `weekly` or `monthly` |
//! | `usage.window_requests` | int | allowed requests in that window |
//! | `usage.daily_spent_cents` | int | cents spent today (UTC), rounded up |
//! | `usage.daily_spent_millicents` | int | the same in millicents (exact) |
//! | `usage.daily_requests` | int | allowed requests today (UTC) |
//! | `passport.id` | string | the passport id (`jti`) |
//! | `passport.agent_id` | string | the agent id (`sub`) |
//! | `passport.issuer` | string | the issuer id (`iss`) |
//! | `passport.trust_tier` | string | `L1`, `L2` or `L3` |
//! | `passport.permissions` | list(string) | the passport's permissions |
//! | `now` | timestamp | the decision time (UTC) |
//!
//! Integers are CEL `int` (signed 64-bit), so `cost_cents > 500` works without `u` suffixes;
//! amounts above `i64::MAX` (impossible under the passport limits) would read as `i64::MAX`.
//! The `*_cents` figures round a fraction of a cent up, so a guard such as `cost_cents > 100`
//! catches a cost of 100.5 cents; compare the `*_millicents` figures to be exact.
//! The functions are CEL's standard library (`size`, `contains`, `startsWith`, `endsWith`,
//! `matches`, timestamps and durations, the `all`/`exists`/`map`/`filter` macros).
//!
//! # Bounds
//! Expressions are at most 4096 bytes (checked when the passport is parsed). Compiling runs on a
//! thread with a large stack, and a syntax tree deeper than [`MAX_AST_DEPTH`] is refused, so
//! neither compiling nor evaluating can exhaust a stack (see [`CompiledRules::compile`]; found
//! by the hostile-expression test: the parser overflowed at 2,000 nested parentheses).
//!
//! The interpreter has no step budget and cannot be interrupted, so the work of one evaluation
//! is bounded by the expression's shape: compiling computes an upper bound on it
//! ([`cost::work_bound`]: comprehensions multiply by the size of what they range over, `matches`
//! by text × pattern...) and refuses a rule whose bound is above [`cost::MAX_RULE_WORK`], naming
//! the bound. Host policy rules are compiled the same way, so a policy with such a rule does not
//! load. What is accepted can still take milliseconds (nested comprehensions over long literal
//! lists).
//!
//! Where that time is spent: the daemon evaluates decisions outside its single ledger writer, in
//! the passport's own lane, and an evaluation that runs CEL rules runs on a blocking thread, not
//! on a runtime worker. A slow rule therefore delays its own passport's requests (they are
//! evaluated one at a time, in order) and uses a CPU; it does not hold up other passports'
//! decisions or the writer (the daemon's `service::lanes`).

pub mod cost;

use super::usage::WindowCounter;
use super::ActionRequest;
use cel::common::ast::{EntryExpr, Expr};
use cel::{Context, Env, ExecutionError, IdedExpr, Program, Value};
use chrono::{DateTime, Utc};
use sluice_passport::constraints::{CelRule, RuleDecision};
use sluice_passport::money::cents_up;
use sluice_passport::{Passport, SpendWindow};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

/// A `core:cel:rules` entry that does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("constraint core:cel:rules: rule {index} ({:?}) does not compile: {}", cut(expr, 200), cut(message, 1000))]
pub struct RuleCompileError {
    /// Position of the rule in `core:cel:rules`, from 0.
    pub index: usize,
    pub expr: String,
    /// The CEL compiler's message (position and a caret under the fault).
    pub message: String,
}

/// `s` cut to `max` characters with a marker: an expression can be 4 KiB and
/// the compiler's message repeats it with a caret line under it.
fn cut(s: &str, max: usize) -> String {
    let total = s.chars().count();
    if total <= max {
        return s.to_string();
    }
    let head: String = s.chars().take(max).collect();
    format!("{head}… ({} more characters)", total - max)
}

/// One compiled rule with what it decides.
#[derive(Debug)]
pub struct CompiledRule {
    pub rule: CelRule,
    program: Program,
}

/// A passport's rules, compiled, in order.
#[derive(Debug, Default)]
pub struct CompiledRules {
    rules: Vec<CompiledRule>,
}

/// The outcome of running a passport's rules for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RulesOutcome {
    /// No rule returned true (or there are no rules).
    NoMatch { evaluated: usize },
    /// Rule `index` returned true: its decision and reason apply.
    Matched { index: usize, decision: RuleDecision, reason: String, expr: String },
    /// Rule `index` failed or returned a non-bool: block, `policy_error`.
    Error { index: usize, reason: String, expr: String, message: String },
}

/// Longest expression compiled (the same bound `core:cel:rules` parsing applies); the compiler
/// thread's stack is sized for it.
pub const MAX_EXPR_BYTES: usize = 4096;

/// Stack for the compiler thread. Only the pages touched are committed. The deepest-nesting
/// expressions of [`MAX_EXPR_BYTES`] (`[[[…]]]`, `[([(…)])]`, `[…][0]…`) needed between 16 and
/// 24 MiB in a debug build when measured; 64 MiB leaves a wide margin.
const COMPILE_STACK_BYTES: usize = 64 << 20;

/// Deepest syntax tree accepted. The interpreter recurses once or more per level, with frames of
/// up to ~35 KiB each in an unoptimised build; 32 levels of the worst shapes (nested `map`,
/// `all`, indexing, `+` chains) stay within 1.5 MiB there (tested), so rules can be evaluated on
/// any thread with tokio's default 2 MiB stack. Real rules are a handful of levels deep (`&&`
/// and `||` chains are balanced, so twenty conditions are five levels).
pub const MAX_AST_DEPTH: usize = 32;

fn compile_all(rules: Vec<CelRule>) -> Result<CompiledRules, RuleCompileError> {
    let env = env();
    let mut compiled = Vec::with_capacity(rules.len());
    for (index, rule) in rules.into_iter().enumerate() {
        let refuse = |message: String| RuleCompileError { index, expr: rule.expr.clone(), message };
        if rule.expr.len() > MAX_EXPR_BYTES {
            return Err(refuse(format!("the expression is more than {MAX_EXPR_BYTES} bytes")));
        }
        // The parser is not ours to trust with hostile input: a panic is a refusal too.
        let program = match catch_unwind(AssertUnwindSafe(|| env.compile(&rule.expr))) {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Err(refuse(e.to_string())),
            Err(_) => return Err(refuse("the CEL compiler failed on this expression".to_string())),
        };
        let depth = ast_depth(program.expression());
        if depth > MAX_AST_DEPTH {
            return Err(refuse(format!(
                "the expression nests {depth} levels deep, more than the {MAX_AST_DEPTH} allowed; split it into several rules"
            )));
        }
        let work = cost::work_bound(program.expression());
        if work > cost::MAX_RULE_WORK {
            return Err(refuse(format!(
                "one evaluation may take up to {work} steps, more than the {} allowed (comprehensions multiply by the \
                 size of what they range over); range over shorter lists or nest fewer comprehensions",
                cost::MAX_RULE_WORK
            )));
        }
        compiled.push(CompiledRule { rule, program });
    }
    Ok(CompiledRules { rules: compiled })
}

/// Depth of a syntax tree, walked with an explicit stack (no recursion of our own).
fn ast_depth(root: &IdedExpr) -> usize {
    let mut max = 0;
    let mut todo: Vec<(&IdedExpr, usize)> = vec![(root, 1)];
    while let Some((e, depth)) = todo.pop() {
        max = max.max(depth);
        let d = depth + 1;
        match &e.expr {
            Expr::Call(c) => {
                todo.extend(c.target.iter().map(|t| (t.as_ref(), d)));
                todo.extend(c.args.iter().map(|a| (a, d)));
            }
            Expr::Comprehension(c) => {
                for part in [&c.iter_range, &c.accu_init, &c.loop_cond, &c.loop_step, &c.result] {
                    todo.push((part, d));
                }
            }
            Expr::List(l) => todo.extend(l.elements.iter().map(|x| (x, d))),
            Expr::Map(m) => todo.extend(m.entries.iter().flat_map(|x| entry(&x.expr, d))),
            Expr::Struct(s) => todo.extend(s.entries.iter().flat_map(|x| entry(&x.expr, d))),
            Expr::Select(s) => todo.push((&s.operand, d)),
            Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => {}
        }
    }
    max
}

fn entry(e: &EntryExpr, depth: usize) -> Vec<(&IdedExpr, usize)> {
    match e {
        EntryExpr::StructField(f) => vec![(&f.value, depth)],
        EntryExpr::MapEntry(m) => vec![(&m.key, depth), (&m.value, depth)],
    }
}

/// The standard CEL environment, built once: building it registers every standard function.
fn env() -> Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    Arc::clone(ENV.get_or_init(|| Arc::new(Env::stdlib())))
}

impl CompiledRules {
    /// Compiles every rule; the first that fails is reported.
    ///
    /// Compiling runs on a dedicated thread with a large stack: the CEL parser (ANTLR) recurses
    /// once per nesting level *before* its own depth limit applies, and 2,000 nested parentheses
    /// (well within the 4096-byte bound) overflow an ordinary 2 MiB stack, which aborts the
    /// process. Each compiled program is then refused if its syntax tree is deeper than
    /// [`MAX_AST_DEPTH`], so evaluating (and dropping) it on any thread stays shallow.
    pub fn compile(rules: &[CelRule]) -> Result<CompiledRules, RuleCompileError> {
        if rules.is_empty() {
            return Ok(CompiledRules::default());
        }
        let owned = rules.to_vec();
        let worker = std::thread::Builder::new()
            .name("sluice-cel-compile".to_string())
            .stack_size(COMPILE_STACK_BYTES)
            .spawn(move || compile_all(owned));
        let failed = |message: &str| RuleCompileError {
            index: 0,
            expr: rules.first().map(|r| r.expr.clone()).unwrap_or_default(),
            message: message.to_string(),
        };
        match worker {
            Ok(handle) => handle.join().unwrap_or_else(|_| Err(failed("the CEL compiler failed"))),
            Err(e) => Err(failed(&format!("could not start the CEL compiler thread: {e}"))),
        }
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Runs the rules in order for one request. `skip_hold` ignores rules whose decision is
    /// `request_hold` (the request has been approved by an operator); block rules still apply.
    pub fn evaluate(&self, input: &RuleInput<'_>, skip_hold: bool) -> RulesOutcome {
        if self.rules.is_empty() {
            return RulesOutcome::NoMatch { evaluated: 0 };
        }
        let mut ctx = Context::with_env(env());
        input.bind(&mut ctx);
        let mut evaluated = 0;
        for (index, r) in self.rules.iter().enumerate() {
            if skip_hold && r.rule.decision == RuleDecision::RequestHold {
                continue;
            }
            evaluated += 1;
            let result = catch_unwind(AssertUnwindSafe(|| r.program.execute(&ctx)));
            let error = |message: String| RulesOutcome::Error {
                index,
                reason: r.rule.reason.clone(),
                expr: r.rule.expr.clone(),
                message,
            };
            match result {
                Ok(Ok(Value::Bool(true))) => {
                    return RulesOutcome::Matched {
                        index,
                        decision: r.rule.decision,
                        reason: r.rule.reason.clone(),
                        expr: r.rule.expr.clone(),
                    }
                }
                Ok(Ok(Value::Bool(false))) => {}
                Ok(Ok(other)) => return error(format!("the rule returned {:?}, not a bool", other.type_of())),
                Ok(Err(e)) => return error(message_of(&e)),
                Err(_) => return error("the CEL interpreter failed on this rule".to_string()),
            }
        }
        RulesOutcome::NoMatch { evaluated }
    }
}

/// The interpreter's error message, with lists, maps and other composite values named by their
/// type. Its own messages print values with `{:?}`, and a map prints in hash order, so the same
/// request got a different (attested) detail each time. Found by fuzzing (`fuzz/corpus/cel_rules/
/// map-in-error`).
fn message_of(e: &ExecutionError) -> String {
    let v = |v: &Value| match v {
        Value::Int(_) | Value::UInt(_) | Value::Float(_) | Value::Bool(_) | Value::Null | Value::String(_) => {
            format!("{v:?}")
        }
        Value::Duration(_) | Value::Timestamp(_) => format!("{v:?}"),
        other => format!("{:?}", other.type_of()),
    };
    #[allow(deprecated)] // the deprecated variants are still raised by the interpreter
    match e {
        ExecutionError::UnsupportedTargetType { target } => format!("Invalid argument type: {}", v(target)),
        ExecutionError::NotSupportedAsMethod { method, target } => {
            format!("Method '{method}' not supported on type '{}'", v(target))
        }
        ExecutionError::UnsupportedKeyType(a) => format!("Unable to use value '{}' as a key", v(a)),
        ExecutionError::ValuesNotComparable(a, b) => format!("{} can not be compared to {}", v(a), v(b)),
        ExecutionError::UnsupportedUnaryOperator(op, a) => format!("Unsupported unary operator '{op}': {}", v(a)),
        ExecutionError::UnsupportedBinaryOperator(op, a, b) => {
            format!("Unsupported binary operator '{op}': {}, {}", v(a), v(b))
        }
        ExecutionError::UnsupportedMapIndex(a) => format!("Cannot use value as map index: {}", v(a)),
        ExecutionError::UnsupportedListIndex(a) => format!("Cannot use value as list index: {}", v(a)),
        ExecutionError::UnsupportedIndex(a, b) => format!("Cannot use value {} to index {}", v(a), v(b)),
        ExecutionError::DivisionByZero(a) => format!("Division by zero of {}", v(a)),
        ExecutionError::RemainderByZero(a) => format!("Remainder by zero of {}", v(a)),
        ExecutionError::Overflow(op, a, b) => format!("Overflow from binary operator '{op}': {}, {}", v(a), v(b)),
        ExecutionError::IndexOutOfBounds(a) => format!("Index out of bounds: {}", v(a)),
        ExecutionError::DuplicateKey(a) => format!("Failed with repeated key: {}", v(a)),
        other => other.to_string(),
    }
}

/// What a rule can see: see the module doc's table.
pub struct RuleInput<'a> {
    pub passport: &'a Passport,
    pub request: &'a ActionRequest,
    pub window: SpendWindow,
    pub spend: WindowCounter,
    pub daily: WindowCounter,
    pub now: DateTime<Utc>,
}

fn int(n: u64) -> Value {
    Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    let m: HashMap<String, Value> = entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    Value::from(m)
}

impl RuleInput<'_> {
    fn bind(&self, ctx: &mut Context<'_, '_>) {
        let r = self.request;
        let text = |s: &Option<String>| Value::from(s.clone().unwrap_or_default());
        ctx.add_variable_from_value(
            "request",
            map(vec![
                ("method", text(&r.method)),
                ("host", Value::from(r.host.as_ref().map(|h| h.as_str().to_string()).unwrap_or_default())),
                ("path", text(&r.path)),
            ]),
        );
        ctx.add_variable_from_value("action", Value::from(r.action.clone()));
        ctx.add_variable_from_value("cost_cents", int(cents_up(r.cost_millicents)));
        ctx.add_variable_from_value("cost_millicents", int(r.cost_millicents));
        ctx.add_variable_from_value(
            "usage",
            map(vec![
                ("spent_cents", int(cents_up(self.spend.spent_millicents))),
                ("spent_millicents", int(self.spend.spent_millicents)),
                ("window", Value::from(self.window.as_str())),
                ("window_requests", int(self.spend.requests)),
                ("daily_spent_cents", int(cents_up(self.daily.spent_millicents))),
                ("daily_spent_millicents", int(self.daily.spent_millicents)),
                ("daily_requests", int(self.daily.requests)),
            ]),
        );
        let c = &self.passport.claims;
        let permissions: Vec<Value> = c.permissions.iter().map(|p| Value::from(p.as_str())).collect();
        ctx.add_variable_from_value(
            "passport",
            map(vec![
                ("id", Value::from(c.id.as_str())),
                ("agent_id", Value::from(c.agent_id.as_str())),
                ("issuer", Value::from(c.issuer.as_str())),
                ("trust_tier", Value::from(c.trust_tier.as_str())),
                ("permissions", Value::from(permissions)),
            ]),
        );
        ctx.add_variable_from_value("now", Value::Timestamp(self.now.fixed_offset()));
    }
}
