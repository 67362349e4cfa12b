//! Host policy: which action a request is and what it costs, plus the rules that bind every agent
//! on this host whatever its passport says (docs/decisions.md, "Order of checks").
//!
//! Policies live in `policies_dir` (config), one TOML file per service, plus host-wide rules. Only
//! `*.toml` files directly in the directory are read (not hidden ones, not subdirectories), in
//! byte order of their names. A missing directory is an empty policy: every request is then
//! `web:fetch`/`web:send` at cost 0, which passports still limit by domain, rate and permission.
//! The loaded set is immutable; the daemon swaps in a new one on reload through [`PolicyHandle`],
//! and keeps the old one when the new files have any error.
//!
//! # Schema (see also `policies/README.md`)
//!
//! ```toml
//! [service]                      # at most one per file
//! name = "openai"                # a-z 0-9 _ -, unique across files
//! domains = ["api.openai.com", "*.example.com"]   # *.x matches subdomains of x only;
//!                                # a domain pattern may belong to one service only
//! description = "optional text"
//!
//! [[route]]                      # tried in file order; the first match wins
//! id = "chat"                    # optional; a-z 0-9 _ . -; default "route[N]" (0-based)
//! method = "POST"                # GET HEAD POST PUT PATCH DELETE OPTIONS, or "*"
//! path = "/v1/chat/completions"  # exact; "/v1/files/*" prefix; "/v1/models/{id}" one segment
//! action = "llm:chat"            # what passports grant: segments of a-z 0-9 _ . - joined by ':'
//! cost_cents = 0                 # fixed cost (cents; up to three decimals: 0.005), or instead:
//! [route.meter]                  # metered: estimated before, settled from the response's usage
//! kind = "openai"                # "openai" | "anthropic": the usage fields the response carries
//! default_max_tokens = 4096      # output tokens assumed when the request sets no max_tokens
//!
//! [prices]                       # required when a route is metered; shared by the file's routes
//! as_of = "2025-06-01"           # the day the prices were copied from the vendor's page
//! source = "https://…"           # optional
//! unknown_model = "gpt-4o"       # optional: price for unlisted models (default: the highest
//!                                # input and output prices in the table)
//! [[prices.model]]
//! name = "gpt-4o"                # also prices "gpt-4o-…" snapshots; the longest name wins
//! input_cents_per_mtok = 250     # US cents per million tokens; up to three decimals (7.5)
//! output_cents_per_mtok = 1000
//!
//! [host]                         # host-wide rules (any file; usually host.toml)
//! deny_domains = ["*.pastebin.com"]        # refused for every agent: reason policy_denied
//! [host.ceilings]
//! max_per_action_cents = 500     # no single action may cost more, whatever the passport says
//! [[host.rule]]                  # CEL, compiled by the decision engine; shape-checked here
//! expr = "cost_cents > 100 && passport.trust_tier == 'L1'"
//! decision = "request_hold"      # "block" | "request_hold"
//! reason = "l1_expensive"        # a-z 0-9 _
//!
//! [[raw_tcp]]                    # raw TCP (non-HTTP) connections allowed; anything else is refused
//! host = "db.internal.example"   # a name or *.suffix; connections by bare IP never match
//! port = 5432                    # not 80 or 443: those are inspected as HTTP
//! action = "tcp:postgres"
//! cost_cents = 0
//! ```
//!
//! Money in a policy is US cents, a whole number or a decimal with at most three places (one
//! millicent, $0.00001, is the smallest amount sluice counts); decimals are read exactly from the
//! file's text, never through a float. Internally every amount is millicents.
//!
//! Unknown keys are errors everywhere. A request whose host belongs to no service, or that no
//! route of its service matches, is `web:fetch` (GET, HEAD, OPTIONS) or `web:send` (anything else)
//! at cost 0. How request paths are normalised before matching is in [`path`].
//!
//! # Digest
//! [`PolicySet::digest`] is `sha256:` and the lowercase hex SHA-256 of, for each file read, in
//! order: its file name, one zero byte, its length as a big-endian u64, its bytes. It is the same
//! wherever the directory lives and changes whenever a file that takes part changes.

#![forbid(unsafe_code)]
// No panics in shipped code: errors are values (tests may unwrap).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

mod error;
mod load;
pub mod meter;
pub mod path;
mod schema;
#[cfg(test)]
mod tests;

pub use error::{PolicyError, PolicyErrorKind};
/// Shared with other TOML readers (catalogs): the one spelling of an action name, and a TOML
/// syntax message that is never empty.
pub use load::{check_action, syntax_message};
pub use meter::{MeterKind, MeterSpec, ModelPrice, PriceTable, TokenUsage, UsageScanner};

use path::{PathPattern, RequestPath};
use sluice_decide::Reason;
use sluice_passport::constraints::RuleDecision;
use sluice_passport::domain::{DomainName, DomainPattern};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The action of a request no route matched, by method.
pub const FETCH_ACTION: &str = "web:fetch";
pub const SEND_ACTION: &str = "web:send";
/// The decision reason for host-policy refusals (docs/decisions.md, "Stable reasons").
pub const POLICY_DENIED: Reason = Reason::PolicyDenied;

/// What a request costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cost {
    /// A fixed cost, in millicents.
    Fixed(u64),
    /// Estimated from the request, settled from the response ([`meter`]).
    Metered(Arc<MeterSpec>),
}

/// The outcome of [`PolicySet::route`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    /// The service owning the host, if any (also set when no route of it matched).
    pub service: Option<Arc<str>>,
    pub action: Arc<str>,
    pub cost: Cost,
    /// `service/id` of the route that matched; `None` when none did.
    pub route_id: Option<Arc<str>>,
}

/// Host-wide verdict on a request before passport limits are considered: the engine's own type,
/// so the verdict the policy gives is the one the engine decides with.
pub use sluice_decide::HostVerdict;

/// A `[[host.rule]]` entry. The decision engine compiles `expr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCelRule {
    pub expr: String,
    pub decision: RuleDecision,
    pub reason: String,
    pub file: PathBuf,
    /// Line and column (1-based) of `expr`, where a compile error points.
    pub line: usize,
    pub column: usize,
}

/// A `[[raw_tcp]]` allow rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawTcpRule {
    pub host: DomainPattern,
    pub port: u16,
    pub action: Arc<str>,
    /// Charged per connection, in millicents.
    pub cost_millicents: u64,
    pub file: PathBuf,
    pub line: usize,
}

/// Counts for `sluice policy check` and the reload attestation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub files: usize,
    /// Service name and its number of routes, in load order.
    pub services: Vec<(String, usize)>,
    pub routes: usize,
    pub raw_tcp_rules: usize,
    pub deny_domains: usize,
    pub host_rules: usize,
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Method {
    Any,
    One(String),
}

#[derive(Debug)]
struct Route {
    id: Arc<str>,
    method: Method,
    pattern: PathPattern,
    action: Arc<str>,
    cost: Cost,
}

#[derive(Debug)]
struct ServiceRoutes {
    name: Arc<str>,
    routes: Vec<Route>,
}

#[derive(Debug)]
struct DenyRule {
    pattern: DomainPattern,
    file: PathBuf,
    line: usize,
}

#[derive(Debug)]
struct Ceiling {
    max_per_action_millicents: u64,
    file: PathBuf,
    line: usize,
}

/// Exact names and `*.suffix` patterns → an index, looked up with at most one hash probe per
/// label of the host and no allocation.
#[derive(Debug, Default)]
struct DomainIndex {
    exact: HashMap<DomainName, usize>,
    /// Suffix of a `*.suffix` pattern.
    below: HashMap<String, usize>,
}

impl DomainIndex {
    /// Adds a pattern; returns the index it already had if any.
    fn insert(&mut self, pattern: &DomainPattern, value: usize) -> Option<usize> {
        match pattern {
            DomainPattern::Exact(n) => self.exact.get(n).copied().or_else(|| {
                self.exact.insert(n.clone(), value);
                None
            }),
            DomainPattern::Subdomains(s) => self.below.get(s.as_str()).copied().or_else(|| {
                self.below.insert(s.as_str().to_string(), value);
                None
            }),
        }
    }

    /// The exact entry, else the longest `*.suffix` below which `host` lies.
    fn get(&self, host: &DomainName) -> Option<usize> {
        if let Some(&i) = self.exact.get(host) {
            return Some(i);
        }
        if self.below.is_empty() {
            return None;
        }
        let name = host.as_str();
        name.match_indices('.').find_map(|(dot, _)| name.get(dot + 1..).and_then(|s| self.below.get(s)).copied())
    }
}

/// An immutable, indexed set of host policies.
#[derive(Debug)]
pub struct PolicySet {
    digest: String,
    files: usize,
    services: Vec<ServiceRoutes>,
    service_index: DomainIndex,
    deny: Vec<DenyRule>,
    deny_index: DomainIndex,
    ceilings: Vec<Ceiling>,
    rules: Vec<HostCelRule>,
    /// `rules`, compiled for the decision engine when the set was built.
    compiled_rules: Option<Arc<sluice_decide::CompiledRules>>,
    raw_tcp: Vec<RawTcpRule>,
    fetch: Arc<str>,
    send: Arc<str>,
}

impl PolicySet {
    /// No policy at all: every request is `web:fetch`/`web:send` at cost 0.
    pub fn empty() -> PolicySet {
        PolicySet {
            digest: load::digest_of(&[]),
            files: 0,
            services: Vec::new(),
            service_index: DomainIndex::default(),
            deny: Vec::new(),
            deny_index: DomainIndex::default(),
            ceilings: Vec::new(),
            rules: Vec::new(),
            compiled_rules: None,
            raw_tcp: Vec::new(),
            fetch: Arc::from(FETCH_ACTION),
            send: Arc::from(SEND_ACTION),
        }
    }

    /// Loads every `*.toml` file in `dir` (see the module doc). A missing directory is an empty
    /// set. Returns every error of every file, or the set if there are none.
    pub fn load_dir(dir: &Path) -> Result<PolicySet, Vec<PolicyError>> {
        let files = load::read_dir(dir)?;
        load::build(&files)
    }

    /// Builds a set from `(path, text)` pairs as if they were the directory's files (the digest
    /// uses each path's file name). Used by tests and by callers that read files themselves.
    pub fn from_texts(files: &[(PathBuf, String)]) -> Result<PolicySet, Vec<PolicyError>> {
        load::build(files)
    }

    /// `sha256:<hex>` over the files' names and contents (module doc): the `policy_digest` of
    /// every attestation record.
    pub fn digest(&self) -> String {
        self.digest.clone()
    }

    /// [`PolicySet::digest`], borrowed (a decision record writes it without a copy).
    pub fn digest_str(&self) -> &str {
        &self.digest
    }

    /// The action and cost of a request. `path` is the request-target (origin-form, or
    /// absolute-form); see [`path`] for how it is normalised.
    pub fn route(&self, host: &DomainName, method: &str, path: &str) -> RouteMatch {
        let service = self.service_index.get(host).and_then(|i| self.services.get(i));
        if let (Some(svc), Some(req)) = (service, RequestPath::new(path)) {
            let segments = req.segments();
            for r in &svc.routes {
                let method_ok = match &r.method {
                    Method::Any => true,
                    Method::One(m) => m.eq_ignore_ascii_case(method),
                };
                if method_ok && r.pattern.matches(&segments) {
                    return RouteMatch {
                        service: Some(svc.name.clone()),
                        action: r.action.clone(),
                        cost: r.cost.clone(),
                        route_id: Some(r.id.clone()),
                    };
                }
            }
        }
        let read_only = ["GET", "HEAD", "OPTIONS"].iter().any(|m| m.eq_ignore_ascii_case(method));
        RouteMatch {
            service: service.map(|s| s.name.clone()),
            action: if read_only { self.fetch.clone() } else { self.send.clone() },
            cost: Cost::Fixed(0),
            route_id: None,
        }
    }

    /// Host-wide rules that need no counters: denied domains, then per-action ceilings.
    /// `cost_millicents` is the request's cost.
    pub fn host_check(&self, host: &DomainName, cost_millicents: u64) -> HostVerdict {
        if let Some(rule) = self.deny_index.get(host).and_then(|i| self.deny.get(i)) {
            return HostVerdict::Deny {
                reason: POLICY_DENIED,
                detail: format!(
                    "{host} is denied for every agent by host policy {}:{} (deny_domains entry \"{}\"); \
                     ask the host's operator if it should be reachable",
                    rule.file.display(),
                    rule.line,
                    rule.pattern
                ),
            };
        }
        self.ceiling_check(cost_millicents)
    }

    /// The host-wide per-action ceilings alone: they bind every action, whether or not it names
    /// a host (`POST /v1/enforce` without a `target`).
    pub fn ceiling_check(&self, cost_millicents: u64) -> HostVerdict {
        if let Some(c) = self.ceilings.iter().find(|c| cost_millicents > c.max_per_action_millicents) {
            return HostVerdict::Deny {
                reason: POLICY_DENIED,
                detail: format!(
                    "This action costs {}, above the host-wide ceiling of {} per action set in {}:{} \
                     (host.ceilings.max_per_action_cents)",
                    sluice_passport::money::dollars(cost_millicents),
                    sluice_passport::money::dollars(c.max_per_action_millicents),
                    c.file.display(),
                    c.line
                ),
            };
        }
        HostVerdict::Allow
    }

    /// The raw-TCP rule allowing a connection to `host:port`, the most specific if several match
    /// (an exact name over `*.suffix`, a longer suffix over a shorter). A connection with no
    /// host name (dialled by bare IP) matches nothing.
    pub fn raw_tcp(&self, host: Option<&DomainName>, port: u16) -> Option<RawTcpRule> {
        let host = host?;
        self.raw_tcp
            .iter()
            .filter(|r| r.port == port && r.host.matches(host))
            .max_by_key(|r| match &r.host {
                DomainPattern::Exact(_) => usize::MAX,
                DomainPattern::Subdomains(s) => s.as_str().len(),
            })
            .cloned()
    }

    /// Host-wide CEL rules, in file order.
    /// The host rules compiled for [`sluice_decide::EvalOptions::host_rules`]; `None` without rules.
    pub fn compiled_host_rules(&self) -> Option<Arc<sluice_decide::CompiledRules>> {
        self.compiled_rules.clone()
    }

    pub fn host_rules(&self) -> &[HostCelRule] {
        &self.rules
    }

    /// The lowest host-wide per-action ceiling, in millicents, if any.
    pub fn max_per_action_millicents(&self) -> Option<u64> {
        self.ceilings.iter().map(|c| c.max_per_action_millicents).min()
    }

    pub fn summary(&self) -> Summary {
        Summary {
            files: self.files,
            services: self.services.iter().map(|s| (s.name.to_string(), s.routes.len())).collect(),
            routes: self.services.iter().map(|s| s.routes.len()).sum(),
            raw_tcp_rules: self.raw_tcp.len(),
            deny_domains: self.deny.len(),
            host_rules: self.rules.len(),
            digest: self.digest.clone(),
        }
    }
}

/// What a successful reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub previous_digest: String,
    pub digest: String,
}

impl Reloaded {
    /// False when the files are byte-for-byte what was already loaded.
    pub fn changed(&self) -> bool {
        self.previous_digest != self.digest
    }
}

/// The daemon's current policy: read lock-free-ish per request (an `Arc` clone under a read
/// lock), replaced whole on reload, never half-updated. The daemon calls [`PolicyHandle::reload`]
/// on SIGHUP and when it notices a file change, and attests the outcome; on error the previous
/// policy stays in force.
#[derive(Debug)]
pub struct PolicyHandle {
    dir: PathBuf,
    current: RwLock<Arc<PolicySet>>,
}

impl PolicyHandle {
    /// Loads the directory for the first time; the daemon must not start on errors.
    pub fn load(dir: &Path) -> Result<PolicyHandle, Vec<PolicyError>> {
        let set = PolicySet::load_dir(dir)?;
        Ok(PolicyHandle { dir: dir.to_path_buf(), current: RwLock::new(Arc::new(set)) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<PolicySet> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the directory again. On success the new set replaces the old one atomically; on any
    /// error the old one stays and the errors are returned.
    pub fn reload(&self) -> Result<Reloaded, Vec<PolicyError>> {
        let new = PolicySet::load_dir(&self.dir)?;
        let digest = new.digest();
        let mut guard = self.current.write().unwrap_or_else(|p| p.into_inner());
        let previous_digest = guard.digest();
        *guard = Arc::new(new);
        Ok(Reloaded { previous_digest, digest })
    }
}
