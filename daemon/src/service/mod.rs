//! The daemon's stateful core, shared by the local API and the proxy.
//!
//! Owns the registry of passports, revocations and holds, and turns each operation into exactly one
//! ledger transaction: the decision (from the pure [`crate::decide`] engine), the counters it moves
//! and the attestation record it produces become durable together, before anyone is answered.
//! Knows nothing of sockets, HTTP or the kernel; callers pass in who is asking ([`Peer`]).
//!
//! State keys in the ledger's state table (values are JSON):
//! `passport/<id>` the registered token; `revoked/<id>` who revoked it and when;
//! `usage/<id>` the passport's counters ([`crate::decide::Usage`]); `hold/<id>` a hold;
//! `stop/all` and `stop/<id>` emergency stops in force (`stops.rs`); `fleet/<id>/<limit>/<window>`
//! this host's fleet claims (`fleet.rs`).

/// `to_json` for a typed service answer: its JSON, made at the edge (API, CLI, proxy answers).
/// Defined before the modules so that each of them can use it.
macro_rules! json_at_the_edge {
    ($($t:ty),*) => {$(
        impl $t {
            /// Its JSON, for the edge (see [`to_json`]).
            pub fn to_json(&self) -> serde_json::Value {
                $crate::service::to_json(self)
            }
        }
    )*};
}

mod agent_key;
mod drafts;
mod fleet;
#[cfg(test)]
mod gate_price_tests;
mod held;
mod holds;
#[cfg(test)]
mod lane_tests;
mod lanes;
#[cfg(test)]
mod money_tests;
mod peer;
mod sandboxes;
pub(crate) mod settlement;
mod stops;
#[cfg(test)]
pub(crate) mod testkit;
mod views;

#[cfg(test)]
pub(crate) use agent_key::issue_for_test;
pub use agent_key::{AgentKey, AgentKeyText, AgentKeys};
pub use drafts::{DecisionOutcome, HeldAs};
pub use held::{HeldRequest, Hold, HoldOrigin, HoldResolution, HoldStatus};
pub use holds::{HeldRequestView, HoldList, HoldOutcome, HoldView};
pub use peer::{Actor, Peer};
pub use sandboxes::{BindTarget, Sandbox, UnixConfinement, UnixHealth, BOUND_CHECK_INTERVAL};
pub use settlement::why as settle_why;
pub use stops::{ResumeDone, StopDone, StopEnforcer, StopEntry, StopScope, StopSet};
pub use views::{AgentList, AgentView, CheckpointView, LogVerification, SandboxSummary};

use crate::decide::{self, ActionRequest, CompiledPassport, EvalOptions, HostVerdict, Usage};
use crate::domain::DomainName;
use crate::ledger::{self, Draft, Ledger, Txn, TxnError};
use crate::passport::{IssuerId, PassportId, Revocations, Verifier};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::oneshot;

pub use decide::ResetWindow;

/// Why an operation failed (not a decision: decisions, including blocks, are successes). Each
/// variant says what failed and carries what an operator needs to act; the API maps variants to
/// status codes in one place (`api::server`), the proxy answers [`ServiceError::is_unavailable`]
/// with `503` and anything else with `403`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    // What the request names does not exist.
    #[error("passport {0} is not registered")]
    PassportNotRegistered(String),
    #[error("no hold {0:?}; list them with `sluice holds`")]
    HoldNotFound(String),
    #[error("attestation {index} does not exist (log size {size})")]
    AttestationNotFound { index: u64, size: u64 },
    #[error("record {0} does not exist; nothing to settle")]
    RecordNotFound(u64),
    #[error("{} is not bound", .0.display())]
    NotBound(PathBuf),

    // The request conflicts with the current state.
    #[error("hold {id} is already {status:?}")]
    HoldAlreadyResolved { id: String, status: HoldStatus },
    #[error("the cost of decision {0} is already settled")]
    AlreadySettled(u64),
    #[error("{} is already sandbox {sandbox} (passport {passport_id}); a live cgroup is never re-bound", .cgroup.display())]
    AlreadyBound { cgroup: PathBuf, sandbox: String, passport_id: String },
    #[error("{} is the `sluice run` sandbox {sandbox}: it ends when its command exits", .cgroup.display())]
    RunSandbox { cgroup: PathBuf, sandbox: String },

    /// The request is invalid; `field` names the part at fault (`action`, `target`, `cgroup`...).
    #[error("{problem}")]
    Invalid { field: &'static str, problem: String },
    /// This daemon has no agents' cgroup.
    #[error("this daemon runs in passport-only mode ([sandbox] redirect = false): it cannot sandbox agents")]
    PassportOnlyMode,

    // The passport is refused.
    #[error("passport rejected: {0}")]
    Passport(#[from] crate::passport::PassportError),
    #[error("passport rejected: {0}")]
    ProofOfPossession(#[from] crate::passport::pop::PopError),
    #[error("passport rejected: {0}")]
    Rules(#[from] decide::RuleCompileError),
    #[error("passport rejected: passport {passport_id} {why}")]
    PassportUnusable { passport_id: String, why: &'static str },

    // The daemon cannot do it now: nothing was decided or forwarded.
    #[error("the attestation store failed: {0}; nothing was decided or forwarded")]
    Store(ledger::LedgerError),
    #[error(
        "the attestation store failed: the {0} record was not appended to the log; nothing was decided or forwarded"
    )]
    NotAppended(&'static str),
    #[error("the attestation store failed: usage of {passport_id}: {problem}; nothing was decided or forwarded")]
    UsageUnreadable { passport_id: String, problem: String },
    #[error("the attestation store failed: stored hold is unreadable: {0}; nothing was decided or forwarded")]
    HoldUnreadable(String),
    #[error("the attestation store failed: {0}; nothing was decided or forwarded")]
    Export(#[from] ledger::export::ExportError),
    #[error("the record of the approval of hold {0} cannot be found in the log; nothing was forwarded")]
    ResolutionNotFound(String),
    #[error("the daemon's {0} lock is poisoned (a thread panicked holding it); restart the daemon")]
    LockPoisoned(&'static str),
    /// The passport's counters moved under each of `attempts` evaluations of this decision (see
    /// `service::lanes`).
    #[error(
        "the counters of passport {passport_id} changed under each of {attempts} evaluations of this decision; nothing was decided or forwarded, send the request again"
    )]
    Contended { passport_id: String, attempts: u32 },
    #[error("the decision could not be evaluated: {0}; nothing was decided or forwarded")]
    Evaluation(String),
    #[error("cgroup: {0}")]
    Cgroup(String),
    /// Sandboxes are refused: agents' Unix sockets cannot be confined (the message says why and
    /// what the operator can do).
    #[error("{0}")]
    UnixUnconfined(String),
    #[error("the answer could not be serialised: {0}")]
    Serialise(#[from] serde_json::Error),
    /// The stop set is recorded and the proxy refuses every request it covers, but the kernel's
    /// stop map could not be written.
    #[error(
        "the stop is recorded and every request of the stopped passports is refused, but the kernel's stop map could not be written ({0}): new connections of their sandboxes still reach the proxy. Check the daemon's log and the pin directory, then run the command again"
    )]
    KernelStop(String),
}

impl ServiceError {
    /// A failure of the daemon, not of the request: answered `503`.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            ServiceError::Store(_)
                | ServiceError::NotAppended(_)
                | ServiceError::UsageUnreadable { .. }
                | ServiceError::HoldUnreadable(_)
                | ServiceError::Export(_)
                | ServiceError::LockPoisoned(_)
                | ServiceError::Contended { .. }
                | ServiceError::Evaluation(_)
                | ServiceError::ResolutionNotFound(_)
                | ServiceError::Cgroup(_)
                | ServiceError::Serialise(_)
                | ServiceError::KernelStop(_)
        )
    }

    fn invalid(field: &'static str, problem: impl Into<String>) -> ServiceError {
        ServiceError::Invalid { field, problem: problem.into() }
    }

    /// Aborts a ledger transaction with this error; [`From<LedgerError>`] gives it back intact.
    fn abort(self) -> TxnError {
        TxnError::abort(Aborted(self))
    }
}

/// A [`ServiceError`] travelling through [`TxnError::Abort`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Aborted(ServiceError);

impl From<ledger::LedgerError> for ServiceError {
    /// Unwraps an error that aborted a transaction on purpose; other ledger errors are store
    /// failures.
    fn from(e: ledger::LedgerError) -> ServiceError {
        match e {
            ledger::LedgerError::Txn(TxnError::Abort(inner)) => match inner.downcast::<Aborted>() {
                Ok(a) => a.0,
                Err(inner) => ServiceError::Store(ledger::LedgerError::Txn(TxnError::Abort(inner))),
            },
            e => ServiceError::Store(e),
        }
    }
}

/// `POST /v1/enforce`: `{passport_id, action, cost_cents, target}`. The cost is whole cents
/// (`cost_cents`) or, exactly, millicents (`cost_millicents`, 1/1000 cent); at most one of the two,
/// and none means 0. The proxy fills in `method` and `path` too, and gives its costs in millicents.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnforceInput {
    pub passport_id: String,
    pub action: String,
    #[serde(default)]
    pub cost_cents: Option<u64>,
    #[serde(default)]
    pub cost_millicents: Option<u64>,
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    /// The destination port of a raw TCP connection or CONNECT tunnel, which a hold keeps so
    /// that its approval can check the `[[raw_tcp]]` rule again. Set by the proxy only: the API
    /// does not read it.
    #[serde(skip)]
    pub port: Option<u16>,
    /// The request hash of a request the proxy signed for a gate (lowercase hex SHA-256 of its
    /// RFC 9421 signature base), written into the decision record as `signed_request_hash`. Set by
    /// the proxy only: the API does not read it.
    #[serde(skip)]
    pub signed_request_hash: Option<String>,
    /// A request to a gate host priced by the gate's verified catalog: the cost is the catalog's
    /// price under the passport's price lock, decided where the lock is read and written (the
    /// cost fields above are then ignored). Set by the proxy only.
    #[serde(skip)]
    pub gate_price: Option<GatePrice>,
}

/// What pricing a request by a gate's catalog needs (docs/catalogs.md, "Pricing at the egress
/// daemon").
#[derive(Debug, Clone)]
pub struct GatePrice {
    /// The verified offer: the version in force and every version before it.
    pub offer: Arc<crate::discover::Offer>,
    /// The permission the catalog's routes give the request (offered by the version in force).
    pub permission: String,
}

/// State key of a passport's price lock at a gate: the catalog version in force at its first
/// allowed call there (the gate keeps its own, `catalog_lock/<passport id>`).
pub fn gate_lock_key(gate_id: &str, passport_id: &str) -> String {
    format!("gate_lock/{gate_id}/{passport_id}")
}

/// The price of a gate request: (millicents, the version whose price is paid, the lock to
/// write if this is the passport's first call there). `None` when the version in force does not
/// offer the permission.
pub fn gate_charge(g: &GatePrice, locked: Option<u64>) -> Option<(u64, u64, Option<u64>)> {
    let current = g.offer.current()?;
    let lock_snap = locked.and_then(|v| g.offer.version(v)).map(|c| &c.snapshot);
    let (price, source) = crate::catalog::effective_price(lock_snap, &current.snapshot, &g.permission)?;
    let write = if locked.is_none() { Some(current.snapshot.version) } else { None };
    Some((price.total_millicents(), source.version(), write))
}

/// The price lock a decision assumed, and the one it writes if allowed.
#[derive(Debug, Clone)]
struct LockPlan {
    key: String,
    assumed: Option<u64>,
    write: Option<u64>,
    /// `gate_id` and `catalog_version` for the record.
    gate_id: String,
    version: u64,
}

impl EnforceInput {
    /// The request's cost in millicents. Cents are × 1000, saturating: an amount that large is
    /// refused by the decision as more than sluice accepts, and attested as such.
    pub fn cost(&self) -> Result<u64, ServiceError> {
        match (self.cost_cents, self.cost_millicents) {
            (Some(c), None) => Ok(crate::money::from_cents_saturating(c)),
            (None, Some(m)) => Ok(m),
            (None, None) => Ok(0),
            (Some(_), Some(_)) => {
                Err(ServiceError::invalid("cost", "give the cost as cost_cents or as cost_millicents, not both"))
            }
        }
    }
}

/// What the daemon needs from its configuration.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub pinned_issuers: Vec<IssuerId>,
    pub hold_timeout: Duration,
    /// The agents' cgroup, when the daemon redirects traffic; `None` in passport-only mode.
    pub agents: Option<crate::kernel::Cgroup>,
    /// The CA bundle agents should trust (system roots + the sluice CA), if there is one.
    pub ca_bundle: Option<std::path::PathBuf>,
    /// How agents' Unix sockets are confined; with `agents` set and this `None`, sandboxes are
    /// refused (fail closed).
    pub unix: Option<Arc<sandboxes::UnixConfinement>>,
    /// Where stopped sandboxes are refused in the kernel (the pinned stop map); `None` in
    /// passport-only mode.
    pub stops: Option<Arc<dyn StopEnforcer>>,
}

impl ServiceConfig {
    /// Passport-only mode: no sandboxes, no CA bundle.
    pub fn passport_only(pinned_issuers: Vec<IssuerId>, hold_timeout: Duration) -> ServiceConfig {
        ServiceConfig { pinned_issuers, hold_timeout, agents: None, ca_bundle: None, unix: None, stops: None }
    }
}

/// `POST /v1/passports`: the passport now registered (JSON at the edge).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Registered {
    pub passport_id: String,
    pub agent_id: String,
    pub issuer: String,
    /// `exp`, seconds since the epoch.
    pub expires_at: i64,
    /// The same passport was registered before: nothing was written.
    pub already_registered: bool,
}

/// `POST /v1/passports/{id}/revoke`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Revoked {
    pub passport_id: String,
    /// Always true: the API says so in so many words.
    pub revoked: bool,
    pub already_revoked: bool,
    /// The revocation record; `None` when the passport was already revoked (nothing written).
    pub attestation_id: Option<u64>,
}

/// `GET /v1/passports/{id}/state`: the counters' view and whether the passport is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PassportState {
    #[serde(flatten)]
    pub view: decide::StateView,
    pub revoked: bool,
}

/// `POST /v1/passports/{id}/state/reset`: the counters after the reset, and its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResetDone {
    #[serde(flatten)]
    pub view: decide::StateView,
    pub attestation_id: u64,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    pub status: &'static str,
    pub version: &'static str,
    /// The log's origin (the checkpoints' first line).
    pub origin: String,
    pub log_size: u64,
    /// Passports registered.
    pub passports: usize,
    /// Holds a proxied request is waiting on.
    pub pending_holds: usize,
    /// Whether agents' Unix sockets are confined.
    pub unix_sockets: UnixHealth,
}

/// `GET /v1/attestations`: records, oldest first; `truncated` when the limit cut older ones.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Attestations {
    pub records: Vec<Attested>,
    pub truncated: bool,
}

/// One record of [`Attestations`]: its log index and its body (a record is JSON by format).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Attested {
    pub index: u64,
    pub record: Value,
}

json_at_the_edge!(Registered, Revoked, PassportState, ResetDone, Health, Attestations);

/// The JSON of a typed service answer, made at the edge (API, CLI). These types serialise
/// without fail (strings, integers, bools); `null` would mark a bug, not hide a value.
pub fn to_json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// The log index of the one record a transaction appended. A transaction that was given a draft
/// and reports none appended is a store failure, never index 0 (a real record).
fn appended_index(appended: &[ledger::Appended], what: &'static str) -> Result<u64, ServiceError> {
    appended.first().map(|a| a.index).ok_or(ServiceError::NotAppended(what))
}

pub struct Service {
    /// A weak handle to this service, for the tasks it spawns (hold timeouts).
    me: std::sync::Weak<Service>,
    ledger: Ledger,
    config: ServiceConfig,
    passports: RwLock<HashMap<String, Arc<CompiledPassport>>>,
    revoked: RwLock<HashSet<String>>,
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<HoldOutcome>>>>,
    /// Live sandboxes by cgroup id.
    sandboxes: RwLock<HashMap<u64, Sandbox>>,
    /// Agent keys of `sluice run` sandboxes, by cgroup id (memory only; see `agent_key`).
    agent_keys: AgentKeys,
    /// The host policy in force, when the daemon has one: its digest goes into every decision
    /// record, and API decisions get its host-wide check.
    policy: RwLock<Option<Arc<crate::policy::PolicyHandle>>>,
    /// Per-passport lanes: decisions are evaluated there, outside the ledger writer.
    lanes: lanes::Lanes,
    /// Emergency stops in force (`stops.rs`); the proxy watches it.
    stops: tokio::sync::watch::Sender<Arc<StopSet>>,
    /// The verified catalogs of gate hosts (`sluice discover`), once the proxy plane made them.
    gate_catalogs: std::sync::OnceLock<Arc<crate::discover::GateCatalogs>>,
    /// The fleet's budget leases, when `[fleet]` is configured (`fleet.rs`).
    fleet: std::sync::OnceLock<Arc<crate::fleet::Leases>>,
}

/// Revocations as the ledger's state knows them, for the passport verifier.
struct RevokedSet<'a>(&'a HashSet<String>);

impl Revocations for RevokedSet<'_> {
    fn is_revoked(&self, id: &PassportId) -> bool {
        self.0.contains(id.as_str())
    }
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

impl Service {
    /// Loads registered passports, revocations and pending holds from the ledger, and records the
    /// daemon's start. Holds the proxy was waiting on cannot survive a restart: they are resolved as
    /// abandoned. Holds made through the API stay pending and their timers start again.
    pub async fn start(ledger: Ledger, config: ServiceConfig) -> Result<Arc<Service>, ServiceError> {
        let revoked: HashSet<String> = ledger
            .state_scan("revoked/")?
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix("revoked/").map(str::to_string))
            .collect();
        let stop_set = StopSet::load(ledger.state_scan(lanes::STOP_PREFIX)?);
        let mut passports = HashMap::new();
        for (key, token) in ledger.state_scan("passport/")? {
            let token = String::from_utf8_lossy(&token).into_owned();
            // Verified without time or revocation checks: an expired or revoked passport stays
            // known so that its requests are blocked with the precise reason.
            match load_registered(&token, &config.pinned_issuers) {
                Ok(cp) => {
                    passports.insert(cp.passport.claims.id.to_string(), Arc::new(cp));
                }
                Err(e) => {
                    tracing::warn!(key, error = %e, "registered passport no longer loads; its requests will be blocked")
                }
            }
        }
        let service = Arc::new_cyclic(|me| Service {
            me: me.clone(),
            ledger,
            config,
            passports: RwLock::new(passports),
            revoked: RwLock::new(revoked),
            waiters: Mutex::new(HashMap::new()),
            sandboxes: RwLock::new(HashMap::new()),
            agent_keys: AgentKeys::default(),
            policy: RwLock::new(None),
            gate_catalogs: std::sync::OnceLock::new(),
            lanes: lanes::Lanes::default(),
            stops: tokio::sync::watch::Sender::new(Arc::new(stop_set)),
            fleet: std::sync::OnceLock::new(),
        });
        service
            .record_host_event("daemon_start", json!({"version": env!("CARGO_PKG_VERSION"), "pid": std::process::id()}))
            .await?;
        service.recover_holds().await?;
        service.recover_sandboxes().await?;
        // The pinned map kept the stops while no daemon ran; it gets the stored set again, for
        // the sandboxes that exist now. Failing here fails the start (the map keeps refusing).
        let stops = service.stops();
        if !stops.is_empty() {
            tracing::warn!(all = stops.all.is_some(), passports = stops.passports.len(), "emergency stops in force");
        }
        service.push_stops_to_kernel()?;
        Ok(service)
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Tells the service which host policy is in force (it follows reloads by itself).
    /// Hands the service the gates' catalogs (the proxy plane makes them; set once).
    pub fn set_gate_catalogs(&self, c: Arc<crate::discover::GateCatalogs>) {
        let _ = self.gate_catalogs.set(c);
    }

    pub fn gate_catalogs(&self) -> Option<&Arc<crate::discover::GateCatalogs>> {
        self.gate_catalogs.get()
    }

    pub fn set_policy(&self, policy: Arc<crate::policy::PolicyHandle>) {
        if let Ok(mut p) = self.policy.write() {
            *p = Some(policy);
        }
    }

    /// The host policy set in force now, if the daemon has a host policy.
    pub(crate) fn policy_set(&self) -> Option<Arc<crate::policy::PolicySet>> {
        self.policy.read().ok().and_then(|p| p.as_ref().map(|h| h.current()))
    }

    fn self_arc(&self) -> Option<Arc<Service>> {
        self.me.upgrade()
    }

    /// [`Ledger::transact`], timed for the `sluice_store_commit_seconds` histogram (submission to
    /// durable commit, queueing for the group commit included: what a request waits).
    async fn transact<T, F>(&self, f: F) -> Result<(T, Vec<ledger::Appended>), ledger::LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Txn<'_>) -> Result<(T, Vec<Draft>), TxnError> + Send + 'static,
    {
        let start = std::time::Instant::now();
        let result = self.ledger.transact(f).await;
        crate::metrics::global().store_commit(start.elapsed());
        result
    }

    /// Appends one operational record to the host chain.
    pub async fn record_host_event(&self, kind: &str, detail: Value) -> Result<u64, ServiceError> {
        let mut body = drafts::base(kind, None, now());
        if let Value::Object(extra) = detail {
            body.extend(extra);
        }
        let ((), appended) = self.transact(move |_txn| Ok(((), vec![Draft::new("host", body)]))).await?;
        appended_index(&appended, "host event")
    }

    /// `GET /v1/health`.
    pub fn health(&self) -> Health {
        Health {
            status: "ok",
            version: env!("CARGO_PKG_VERSION"),
            origin: self.ledger.origin().to_string(),
            log_size: self.ledger.size(),
            passports: self.passports.read().map(|p| p.len()).unwrap_or_default(),
            pending_holds: self.waiters.lock().map(|w| w.len()).unwrap_or_default(),
            unix_sockets: self.unix_health(),
        }
    }

    /// `GET /metrics`: the process's counters plus gauges read from the current state.
    /// Spend is exported for live (unexpired, unrevoked) passports, largest first, at most
    /// [`crate::metrics::MAX_SPEND_SERIES`] of them.
    pub fn metrics_text(&self) -> String {
        let at = now();
        let pending_holds = self.holds().map(|l| l.holds.len() as u64).unwrap_or_default();
        let passports: Vec<Arc<CompiledPassport>> =
            self.passports.read().map(|p| p.values().cloned().collect()).unwrap_or_default();
        let mut spend = Vec::new();
        for cp in &passports {
            let claims = &cp.passport.claims;
            let id = claims.id.to_string();
            if claims.expires_at <= crate::passport::now() || self.is_revoked(&id) {
                continue;
            }
            let Ok(usage) = self.load_usage(&id) else { continue };
            let Ok(view) = decide::state_view(cp, &usage, at) else { continue };
            spend.push(crate::metrics::SpendSample {
                passport_id: id,
                agent_id: claims.agent_id.clone(),
                window: view.window,
                // The gauge is in whole cents: rounded up, so a fraction of a cent still shows.
                cents: view.window_cost_cents,
                limit_cents: view.window_cost_limit_cents,
            });
        }
        spend.sort_by(|a, b| b.cents.cmp(&a.cents).then_with(|| a.passport_id.cmp(&b.passport_id)));
        let spend_omitted = spend.len().saturating_sub(crate::metrics::MAX_SPEND_SERIES) as u64;
        spend.truncate(crate::metrics::MAX_SPEND_SERIES);
        let gauges = crate::metrics::Gauges {
            pending_holds,
            passports: passports.len() as u64,
            sandboxes: self.sandboxes.read().map(|s| s.len() as u64).unwrap_or_default(),
            log_size: self.ledger.size(),
            spend,
            spend_omitted,
            store: self.ledger.write_stats(),
        };
        crate::metrics::global().render(&gauges)
    }

    /// The compiled passport registered under `id`, if any.
    pub fn passport(&self, id: &str) -> Option<Arc<CompiledPassport>> {
        self.passports.read().ok()?.get(id).cloned()
    }

    fn is_revoked(&self, id: &str) -> bool {
        self.revoked.read().map(|r| r.contains(id)).unwrap_or(true)
    }

    /// Why passport `id`'s decisions are refused before its counters are read, if they are.
    fn barred(&self, id: &str) -> Option<lanes::Barred> {
        if self.is_revoked(id) {
            Some(lanes::Barred::Revoked)
        } else if self.is_stopped(id) {
            Some(lanes::Barred::Stopped)
        } else {
            None
        }
    }

    /// Registers a passport: full verification (pinned issuers, revocation, time), CEL rules
    /// compiled, then stored and attested. Registering the same passport again is a no-op.
    pub async fn register(
        &self,
        token: &str,
        pop: Option<&crate::passport::pop::Proof>,
        peer: &Peer,
    ) -> Result<Registered, ServiceError> {
        let revoked = self.revoked.read().map_err(|_| ServiceError::LockPoisoned("revocations"))?.clone();
        let passport =
            Verifier::new(&self.config.pinned_issuers, &RevokedSet(&revoked)).verify(token, crate::passport::now())?;
        self.check_pop(&passport.claims, pop)?;
        let compiled = CompiledPassport::compile(passport)?;
        let claims = compiled.passport.claims.clone();
        let id = claims.id.to_string();
        let key = format!("passport/{id}");
        let token_owned = token.to_string();
        let mut body = drafts::base(drafts::kind::PASSPORT_REGISTERED, Some(&claims), now());
        body.insert("trust_tier".into(), claims.trust_tier.as_str().into());
        body.insert("expires_at".into(), claims.expires_at.into());
        body.insert("token_sha256".into(), drafts::sha256_hex(token.as_bytes()).into());
        body.insert(drafts::field::BY.into(), peer.to_json());
        let chain = id.clone();
        let (created, _) = self
            .transact(move |txn: &mut Txn<'_>| {
                if txn.get(&key)?.is_some() {
                    return Ok((false, vec![]));
                }
                txn.put(&key, token_owned.as_bytes())?;
                Ok((true, vec![Draft::new(chain, body)]))
            })
            .await?;
        self.passports
            .write()
            .map_err(|_| ServiceError::LockPoisoned("passports"))?
            .insert(id.clone(), Arc::new(compiled));
        tracing::info!(passport_id = %id, agent_id = %claims.agent_id, created, "passport registered");
        Ok(Registered {
            passport_id: id,
            agent_id: claims.agent_id,
            issuer: claims.issuer.as_str().to_string(),
            expires_at: claims.expires_at,
            already_registered: !created,
        })
    }

    /// Proof of possession: required for L3 passports, checked whenever one is given.
    pub(crate) fn check_pop(
        &self,
        claims: &crate::passport::Claims,
        pop: Option<&crate::passport::pop::Proof>,
    ) -> Result<(), ServiceError> {
        use crate::passport::{pop, TrustTier};
        match pop {
            Some(p) => pop::verify(p, claims, crate::passport::now(), self.ledger.origin()),
            None if claims.trust_tier == TrustTier::L3 => Err(pop::PopError::Missing),
            None => Ok(()),
        }
        .map_err(ServiceError::ProofOfPossession)
    }

    /// Revokes a passport (registered or not): persisted, attested, effective at once.
    pub async fn revoke(&self, id: &str, peer: &Peer, note: Option<String>) -> Result<Revoked, ServiceError> {
        let pid = PassportId::parse(id).map_err(|e| ServiceError::invalid("passport_id", e))?;
        let claims = self.passport(id).map(|cp| cp.passport.claims.clone());
        let key = format!("revoked/{id}");
        let mut body = drafts::base(drafts::kind::REVOCATION, claims.as_ref(), now());
        body.insert(drafts::field::PASSPORT_ID.into(), id.into());
        body.insert(drafts::field::BY.into(), peer.to_json());
        body.insert(drafts::field::NOTE.into(), note.clone().into());
        let entry = json!({"at": now().to_rfc3339(), "by": peer.to_json(), "note": note}).to_string();
        let chain = pid.to_string();
        let (created, appended) = self
            .transact(move |txn: &mut Txn<'_>| {
                if txn.get(&key)?.is_some() {
                    return Ok((false, vec![]));
                }
                txn.put(&key, entry.as_bytes())?;
                Ok((true, vec![Draft::new(chain, body)]))
            })
            .await?;
        self.revoked.write().map_err(|_| ServiceError::LockPoisoned("revocations"))?.insert(id.to_string());
        tracing::warn!(passport_id = %id, by = ?peer.user, "passport revoked");
        let attestation_id = if created { Some(appended_index(&appended, "revocation")?) } else { None };
        Ok(Revoked { passport_id: id.to_string(), revoked: true, already_revoked: !created, attestation_id })
    }

    /// Decides one action and makes the decision durable. Blocks are successful outcomes.
    /// API decisions get the host-wide policy check (denied domains, ceilings) for their target.
    pub async fn enforce(&self, input: EnforceInput) -> Result<DecisionOutcome, ServiceError> {
        let cost = input.cost()?;
        let target = input.target.as_deref().filter(|t| !t.is_empty()).map(DomainName::parse);
        let verdict = match (target, self.policy.read().ok().and_then(|p| p.clone())) {
            (Some(Ok(host)), Some(policy)) => policy.current().host_check(&host, cost),
            // No host to check against denied domains; the per-action ceilings still bind.
            (None, Some(policy)) => policy.current().ceiling_check(cost),
            // No policy, or a target that is not a host name (refused by `enforce_outcome`).
            _ => HostVerdict::Allow,
        };
        self.enforce_outcome(input, HoldOrigin::Api, verdict).await
    }

    /// As [`Service::enforce`], returning the full outcome (the proxy waits on holds).
    pub async fn enforce_outcome(
        &self,
        mut input: EnforceInput,
        origin: HoldOrigin,
        host_verdict: HostVerdict,
    ) -> Result<DecisionOutcome, ServiceError> {
        // A registered passport's id was parsed when it was registered (the registry is keyed by
        // it), so only an id the registry does not know is parsed here, for its error or for the
        // record of an unknown passport: the usual decision allocates no id of its own.
        let compiled: Result<Arc<CompiledPassport>, PassportId> = match self.passport(&input.passport_id) {
            Some(cp) => Ok(cp),
            None => Err(PassportId::parse(&input.passport_id).map_err(|e| ServiceError::invalid("passport_id", e))?),
        };
        let pid = input.passport_id.as_str();
        let host = match input.target.as_deref().filter(|t| !t.is_empty()) {
            Some(t) => {
                Some(DomainName::parse(t).map_err(|e| ServiceError::invalid("target", format!("target {t:?}: {e}")))?)
            }
            None => None,
        };
        if input.action.is_empty() || input.action.len() > 128 {
            return Err(ServiceError::invalid("action", "action must be 1 to 128 characters"));
        }
        let mut cost_millicents = input.cost()?;
        let mut lock = None;
        if let Some(g) = &input.gate_price {
            let gate_id = g.offer.gate_id.as_str().to_string();
            let key = gate_lock_key(&gate_id, pid);
            let assumed = match self.ledger.state_get(&key)? {
                None => None,
                Some(b) => Some(std::str::from_utf8(&b).ok().and_then(|s| s.parse::<u64>().ok()).ok_or_else(|| {
                    ServiceError::UsageUnreadable {
                        passport_id: pid.to_string(),
                        problem: format!("the price lock {key} is not a version number"),
                    }
                })?),
            };
            let Some((price, version, write)) = gate_charge(g, assumed) else {
                return Err(ServiceError::invalid("action", format!("{} is not offered by the gate", g.permission)));
            };
            cost_millicents = price;
            lock = Some(LockPlan { key, assumed, write, gate_id, version });
        }
        // The request's strings are taken over, not copied: the log line below reads them back
        // from the request.
        let request = ActionRequest {
            action: std::mem::take(&mut input.action),
            cost_millicents,
            host,
            method: input.method.take(),
            path: input.path.take(),
        };
        let held = HoldParams { origin, timeout: self.config.hold_timeout, port: input.port };
        // Read once per decision: the digest recorded and the host rules applied always come
        // from the same policy, even across a concurrent reload.
        let policy = self.policy_set();
        let host_rules = policy.as_deref().and_then(crate::policy::PolicySet::compiled_host_rules);
        // What the log line reads once the decision is made: the lane's decision (which owns the
        // request), or the request of an unknown passport.
        let logged: Result<Arc<LaneDecision>, ActionRequest>;
        let (outcome, appended) = match compiled {
            Err(pid) => {
                let recorded = request.clone();
                logged = Err(request);
                self.transact(move |_txn: &mut Txn<'_>| {
                    let at = now();
                    let body = drafts::unknown_passport(&pid, &recorded, at);
                    Ok((drafts::Built::block_unknown(&pid, at), vec![Draft::new(pid.to_string(), body)]))
                })
                .await?
            }
            Ok(cp) => {
                // Fleet leases first (outside the lane): a request the host's leases do not cover
                // waits here a short while for a lease; the lane then decides with what the host holds.
                let fleet = self.fleet().cloned();
                if let Some(f) = &fleet {
                    f.prepare(&cp, cost_millicents, now()).await;
                }
                let blocking = lanes::needs_blocking_thread(&cp, host_rules.as_deref());
                let opts = EvalOptions { skip_approval: false, host_rules };
                let signed_request_hash = input.signed_request_hash;
                let decision = Arc::new(LaneDecision {
                    cp,
                    request,
                    host_verdict,
                    held,
                    policy,
                    opts,
                    signed_request_hash,
                    lock,
                    fleet,
                });
                logged = Ok(decision.clone());
                let d = decision.clone();
                let me = self.me.clone();
                let barred_now = move |id: &str| me.upgrade().map_or(Some(lanes::Barred::Revoked), |s| s.barred(id));
                self.in_lane(
                    pid,
                    blocking,
                    move |counters, at| d.evaluate(counters, barred_now(d.cp.passport.claims.id.as_str()), at),
                    move |barred, plan, txn| decision.commit(barred, plan, txn),
                )
                .await?
            }
        };
        let (request, agent_id) = match &logged {
            Ok(d) => (&d.request, Some(d.cp.passport.claims.agent_id.as_str())),
            Err(request) => (request, None),
        };
        let index = appended_index(&appended, "decision")?;
        if let Some(hold) = &outcome.hold {
            self.schedule_hold_timeout(hold.id.clone(), hold.expires_at);
        }
        crate::metrics::global().decision(outcome.decision.as_str(), outcome.reason.as_str());
        // One line per decision, with what an operator greps for: blocks and holds at info,
        // allows (the hot path; each is in the ledger) at debug, summed up at info once a minute
        // by the metrics. `agent_id` is the passport's claim (absent for an unknown passport);
        // `host` is the request's target.
        macro_rules! decision_line {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    passport_id = %input.passport_id,
                    agent_id = %agent_id.unwrap_or("-"),
                    action = %request.action,
                    host = %input.target.as_deref().unwrap_or("-"),
                    method = %request.method.as_deref().unwrap_or("-"),
                    cost_millicents,
                    decision = %outcome.decision.as_str(),
                    reason = %outcome.reason,
                    hold_id = %outcome.hold.as_ref().map(|h| h.id.as_str()).unwrap_or("-"),
                    attestation_id = index,
                    "decision"
                )
            };
        }
        if outcome.decision == decide::Decision::Allow {
            decision_line!(tracing::Level::DEBUG);
        } else {
            decision_line!(tracing::Level::INFO);
        }
        Ok(outcome.into_outcome(std::mem::take(&mut input.passport_id), index))
    }

    /// `GET /v1/passports/{id}/state`.
    pub fn state(&self, id: &str) -> Result<PassportState, ServiceError> {
        let cp = self.passport(id).ok_or_else(|| ServiceError::PassportNotRegistered(id.to_string()))?;
        let usage = self.load_usage(id)?;
        let view = decide::state_view(&cp, &usage, now())
            .map_err(|e| ServiceError::UsageUnreadable { passport_id: id.to_string(), problem: e.to_string() })?;
        Ok(PassportState { view, revoked: self.is_revoked(id) })
    }

    fn load_usage(&self, id: &str) -> Result<Usage, ServiceError> {
        match self.ledger.state_get(&format!("usage/{id}"))? {
            None => Ok(Usage::default()),
            Some(bytes) => Usage::from_bytes(&bytes)
                .map_err(|e| ServiceError::UsageUnreadable { passport_id: id.to_string(), problem: e.to_string() }),
        }
    }

    /// `POST /v1/passports/{id}/state/reset`: attested, names who asked.
    pub async fn reset(&self, id: &str, window: ResetWindow, peer: &Peer) -> Result<ResetDone, ServiceError> {
        let cp = self.passport(id).ok_or_else(|| ServiceError::PassportNotRegistered(id.to_string()))?;
        let key = format!("usage/{id}");
        let peer_json = peer.to_json();
        let cp2 = cp.clone();
        let (view, appended) = self
            .lane_invalidating(id, move |txn: &mut Txn<'_>| {
                let at = now();
                let usage = match txn.get(&key)? {
                    None => Usage::default(),
                    Some(b) => Usage::from_bytes(&b).map_err(|e| TxnError::abort(format!("usage: {e}")))?,
                };
                let after = decide::reset(&cp2, &usage, window, at)
                    .map_err(|e| ServiceError::invalid("window", e.to_string()).abort())?;
                let view = decide::state_view(&cp2, &after, at).map_err(|e| TxnError::abort(e.to_string()))?;
                let body = drafts::counter_reset(&cp2.passport.claims, window, &view, peer_json, at);
                txn.put(&key, &after.to_bytes())?;
                Ok((view, vec![Draft::new(cp2.passport.claims.id.to_string(), body)]))
            })
            .await?;
        tracing::warn!(passport_id = %id, window = window.as_str(), by = ?peer.user, "counters reset");
        Ok(ResetDone { view, attestation_id: appended_index(&appended, "counter reset")? })
    }

    /// `GET /v1/attestations?passport_id=&since=`: the records, newest last.
    pub fn attestations(&self, passport_id: Option<&str>, since: Option<&str>) -> Result<Attestations, ServiceError> {
        const LIMIT: usize = 10_000;
        let since = parse_since(since)?;
        let snap = self.ledger.snapshot()?;
        let indices: Vec<u64> = match passport_id {
            Some(id) => snap.chain_indices(id)?,
            None => (0..snap.size()).collect(),
        };
        let mut records = Vec::new();
        let mut truncated = false;
        for index in indices.into_iter().rev() {
            let Some(bytes) = snap.record(index)? else { continue };
            let Ok(record) = serde_json::from_slice::<Value>(&bytes) else { continue };
            let time =
                record.get(ledger::record::FIELD_TIME).and_then(Value::as_str).and_then(ledger::record::parse_time);
            if since.is_some_and(|s| time.is_none_or(|t| t < s)) {
                continue;
            }
            if records.len() == LIMIT {
                truncated = true;
                break;
            }
            records.push(Attested { index, record });
        }
        records.reverse();
        Ok(Attestations { records, truncated })
    }

    /// `GET /v1/attestations/export`: records, proofs and a freshly signed checkpoint, as a
    /// stream the caller writes out part by part (the log is never held in memory).
    pub async fn export(
        &self,
        passport_id: Option<&str>,
        since: Option<&str>,
        consistency_from: Option<u64>,
    ) -> Result<ledger::export::ExportStream, ServiceError> {
        parse_since(since)?;
        let stream = ledger::export::export_stream(
            &self.ledger,
            &ledger::export::ExportRequest {
                passport: passport_id.map(str::to_string),
                since: since.map(str::to_string),
                consistency_from,
            },
        )
        .await?;
        Ok(stream)
    }

    /// `GET /v1/attestations/{id}/proof`: a portable attestation.
    pub async fn proof(&self, index: u64) -> Result<ledger::export::PortableAttestation, ServiceError> {
        if index >= self.ledger.size() {
            return Err(ServiceError::AttestationNotFound { index, size: self.ledger.size() });
        }
        Ok(ledger::export::proof(&self.ledger, index).await?)
    }
}

fn parse_since(since: Option<&str>) -> Result<Option<DateTime<Utc>>, ServiceError> {
    since
        .map(|s| {
            DateTime::parse_from_rfc3339(s)
                .map(|d| d.with_timezone(&Utc))
                .map_err(|e| ServiceError::invalid("since", format!("since {s:?} is not an RFC 3339 time: {e}")))
        })
        .transpose()
}

/// Verifies a stored token for loading at start: signature, claims, issuer pinning; not time or
/// revocation (those are decided per request, with precise reasons).
fn load_registered(token: &str, pinned: &[IssuerId]) -> Result<CompiledPassport, String> {
    let mut verifier = Verifier::new(pinned, &crate::passport::NoRevocations);
    verifier.skew_secs = i64::MAX / 4;
    let passport = verifier.verify(token, crate::passport::now()).map_err(|e| e.to_string())?;
    CompiledPassport::compile(passport).map_err(|e| e.to_string())
}

/// What a `request_hold` decision needs to make its hold.
#[derive(Debug, Clone, Copy)]
struct HoldParams {
    origin: HoldOrigin,
    timeout: Duration,
    /// See [`EnforceInput::port`].
    port: Option<u16>,
}

/// One decision of a registered passport, evaluated in its lane (see [`lanes`]).
struct LaneDecision {
    cp: Arc<CompiledPassport>,
    request: ActionRequest,
    host_verdict: HostVerdict,
    held: HoldParams,
    /// The host policy in force when the decision was asked for: its digest is recorded.
    policy: Option<Arc<crate::policy::PolicySet>>,
    opts: EvalOptions,
    /// See [`EnforceInput::signed_request_hash`].
    signed_request_hash: Option<String>,
    /// A gate request's price lock (see [`EnforceInput::gate_price`]).
    lock: Option<LockPlan>,
    /// The fleet's leases: an allow must also fit in what this host holds.
    fleet: Option<Arc<crate::fleet::Leases>>,
}

/// What a [`LaneDecision`] commits: the decision and, except for a hold (whose record names the
/// hold, made in the writer), its record, both built outside the writer.
struct DecisionPlan {
    built: drafts::Built,
    draft: Option<Draft>,
    at: DateTime<Utc>,
}

impl LaneDecision {
    /// The decision record of `built`.
    fn record(&self, built: &drafts::Built, at: DateTime<Utc>) -> ledger::canonical::Members {
        let claims = &self.cp.passport.claims;
        let digest = self.policy.as_deref().map(crate::policy::PolicySet::digest_str);
        let mut body = drafts::decision(claims, &self.request, built, digest, at);
        drafts::signed_request_hash(&mut body, self.signed_request_hash.as_deref());
        if let Some(l) = &self.lock {
            drafts::gate_catalog(&mut body, &l.gate_id, l.version);
        }
        body
    }

    /// Evaluates against the stored counters `counters` (outside the writer). Revoked, stopped
    /// and unreadable counters are decided here, as before the engine.
    fn evaluate(
        &self,
        counters: Option<&lanes::Counters>,
        barred: Option<lanes::Barred>,
        at: DateTime<Utc>,
    ) -> lanes::Speculation<DecisionPlan> {
        let claims = &self.cp.passport.claims;
        let (built, writes) = if let Some(barred) = barred {
            (barred_block(claims, barred, at), None)
        } else {
            match lanes::usage_of(counters) {
                Err(e) => {
                    // Corrupt counters must never read as zero spend: block, loudly.
                    tracing::error!(passport_id = %claims.id, error = %e, "usage state is unreadable; blocking");
                    (drafts::Built::state_error(claims, &e.to_string(), at), None)
                }
                Ok(usage) => {
                    let eval =
                        decide::evaluate(&self.cp, &usage, &self.request, &self.host_verdict, at, self.opts.clone());
                    let fleet_refusal = match &self.fleet {
                        Some(f) if eval.decision == decide::Decision::Allow => {
                            f.admit(&self.cp, eval.spend_after_millicents, at).err()
                        }
                        _ => None,
                    };
                    match fleet_refusal {
                        Some(refusal) => (drafts::Built::fleet_refused(eval, claims, &refusal, at), None),
                        None => {
                            let writes = (eval.decision == decide::Decision::Allow).then(|| eval.usage_after.clone());
                            (drafts::Built::from_eval(eval, claims, at), writes)
                        }
                    }
                }
            }
        };
        let draft = (built.decision != decide::Decision::RequestHold)
            .then(|| Draft::new(claims.id.to_string(), self.record(&built, at)));
        lanes::Speculation { writes, plan: DecisionPlan { built, draft, at } }
    }

    /// In the writer, after the counters were compared (and written, for an allow); `barred`:
    /// the store says the passport is revoked or stopped, and nothing was compared or written.
    fn commit(
        &self,
        barred: Option<lanes::Barred>,
        plan: DecisionPlan,
        txn: &mut Txn<'_>,
    ) -> Result<(drafts::Built, Vec<Draft>), TxnError> {
        let claims = &self.cp.passport.claims;
        // The chain's name, written out only where it is used: this runs on the ledger's writer,
        // and an allowed decision's draft already names its chain.
        let id = || claims.id.to_string();
        let DecisionPlan { mut built, draft, at } = plan;
        if let Some(barred) = barred.filter(|b| built.reason != barred_reason(*b)) {
            built = barred_block(claims, barred, at);
            let body = self.record(&built, at);
            return Ok((built, vec![Draft::new(id(), body)]));
        }
        if let Some(l) = &self.lock {
            // The price was decided on the lock read before the lane; a lock written since (a
            // concurrent first call at a version switch) would make it another price.
            let stored =
                txn.get(&l.key)?.and_then(|b| std::str::from_utf8(&b).ok().and_then(|s| s.parse::<u64>().ok()));
            let consistent = stored == l.assumed || (l.assumed.is_none() && stored.is_some() && stored == l.write);
            if !consistent {
                return Err(ServiceError::Contended { passport_id: id(), attempts: 1 }.abort());
            }
            if built.decision == decide::Decision::Allow && stored.is_none() {
                if let Some(v) = l.write {
                    txn.put(&l.key, v.to_string().as_bytes())?;
                }
            }
        }
        let draft = match draft {
            Some(draft) => draft,
            None => {
                let held = self.held;
                let hold = Hold::new(claims, &self.request, held.port, held.origin, at, held.timeout, txn.next_index());
                txn.put(&format!("hold/{}", hold.id), &hold.to_bytes())?;
                built.hold = Some(hold);
                Draft::new(id(), self.record(&built, at))
            }
        };
        Ok((built, vec![draft]))
    }
}

/// The block of a passport refused before its counters are read.
fn barred_block(claims: &crate::passport::Claims, barred: lanes::Barred, at: DateTime<Utc>) -> drafts::Built {
    match barred {
        lanes::Barred::Revoked => drafts::Built::revoked(claims, at),
        lanes::Barred::Stopped => drafts::Built::stopped(claims, at),
    }
}

fn barred_reason(barred: lanes::Barred) -> decide::Reason {
    match barred {
        lanes::Barred::Revoked => decide::Reason::PassportRevoked,
        lanes::Barred::Stopped => decide::Reason::EmergencyStop,
    }
}
