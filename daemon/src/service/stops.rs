//! The emergency stop: `sluice stop --passport ID | --all` and `sluice resume`.
//!
//! A stop is one ledger transaction: the state key (`stop/all` or `stop/<passport id>`, with who,
//! when, the note and the index of its record) and an `emergency_stop` record (`emergency_resume`
//! for a resume) on the passport's chain, or on the `host` chain for `--all`. Then, in order:
//!
//! 1. the in-memory set changes and every watcher hears it ([`Service::stop_watch`]): the proxy
//!    closes the open connections of the stopped sandboxes;
//! 2. the kernel's stop map ([`StopEnforcer`], the pinned `sluice_stopped`) is written: new
//!    connections and DNS of those sandboxes fail with `EPERM`;
//! 3. pending holds of the stopped passports are denied with reason `emergency_stop`.
//!
//! From the moment the transaction is durable, every decision of a stopped passport is a block
//! `emergency_stop`: the lane's writer check reads the same keys (`lanes.rs`), so a decision
//! evaluated before the stop and committed after it is refused too. New sandboxes of a stopped
//! passport are refused. At start the set is read back from the store and written to the kernel
//! map again; while no daemon runs the pinned map keeps refusing (a stop fails closed).

use super::holds::Ending;
use super::peer::{Actor, Peer};
use super::{drafts, now, Service, ServiceError};
use crate::kernel::{StopMap, StopTargets};
use crate::ledger::{Draft, Txn};
use crate::passport::PassportId;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// State-table keys: the stop of every sandbox, and the prefix of one passport's (the lane's
/// writer check reads the same keys).
use super::lanes::{STOP_ALL_KEY as KEY_ALL, STOP_PREFIX as PREFIX};

/// State-table key of passport `id`'s stop.
pub(super) fn key_for(id: &str) -> String {
    format!("{PREFIX}{id}")
}

/// Notes are for people; bounded like a hold's.
const MAX_NOTE: usize = 1024;

/// Where stopped sandboxes are refused in the kernel. The daemon passes the pinned map
/// ([`StopMap`]); tests pass a recording fake.
pub trait StopEnforcer: Send + Sync + std::fmt::Debug {
    /// Makes the kernel refuse exactly `targets` (see [`StopMap::apply`]).
    fn apply(&self, targets: &StopTargets) -> std::io::Result<()>;
}

impl StopEnforcer for StopMap {
    fn apply(&self, targets: &StopTargets) -> std::io::Result<()> {
        StopMap::apply(self, targets)
    }
}

/// What a stop covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopScope {
    /// Every sandbox and every passport.
    All,
    /// One passport (and every sandbox bound to it).
    Passport(PassportId),
}

impl StopScope {
    /// From the API's `{"passport_id": ...}` or `{"all": true}`: exactly one of them.
    pub fn parse(passport_id: Option<&str>, all: bool) -> Result<StopScope, ServiceError> {
        match (passport_id, all) {
            (Some(id), false) => PassportId::parse(id)
                .map(StopScope::Passport)
                .map_err(|e| ServiceError::invalid("passport_id", format!("passport_id {id:?}: {e}"))),
            (None, true) => Ok(StopScope::All),
            (Some(_), true) => Err(ServiceError::invalid("all", "give either passport_id or \"all\": true, not both")),
            (None, false) => Err(ServiceError::invalid(
                "passport_id",
                "say what to stop or resume: \"passport_id\": \"pp_…\" or \"all\": true",
            )),
        }
    }

    fn key(&self) -> String {
        match self {
            StopScope::All => KEY_ALL.to_string(),
            StopScope::Passport(id) => key_for(id.as_str()),
        }
    }

    fn chain(&self) -> String {
        match self {
            StopScope::All => "host".to_string(),
            StopScope::Passport(id) => id.to_string(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            StopScope::All => "all",
            StopScope::Passport(_) => "passport",
        }
    }

    fn passport_id(&self) -> Option<String> {
        match self {
            StopScope::All => None,
            StopScope::Passport(id) => Some(id.to_string()),
        }
    }
}

/// One stop in force, as stored under its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopEntry {
    pub at: String,
    pub by: Actor,
    pub note: Option<String>,
    /// The log index of the stop's record.
    pub attestation_id: u64,
}

/// Every stop in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopSet {
    pub all: Option<StopEntry>,
    pub passports: BTreeMap<String, StopEntry>,
}

impl StopSet {
    /// Whether passport `id` is stopped (by its own stop or by the stop of everything).
    pub fn covers(&self, passport_id: &str) -> bool {
        self.all.is_some() || self.passports.contains_key(passport_id)
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_none() && self.passports.is_empty()
    }

    /// `GET /v1/stops`: `{"all": entry|null, "passports": [{"passport_id", ...entry}]}`, passports
    /// sorted by id.
    pub fn to_json(&self) -> Value {
        let passports: Vec<Value> = self
            .passports
            .iter()
            .map(|(id, e)| {
                let mut v = super::to_json(e);
                if let Some(o) = v.as_object_mut() {
                    o.insert("passport_id".into(), id.clone().into());
                }
                v
            })
            .collect();
        json!({"all": self.all.as_ref().map(super::to_json), "passports": passports})
    }

    /// Reads the set back from the store's `stop/` keys. An entry that does not parse still
    /// stops its scope (fail closed), with a placeholder the log names as unreadable.
    pub(super) fn load(entries: Vec<(String, Vec<u8>)>) -> StopSet {
        let mut set = StopSet::default();
        for (key, bytes) in entries {
            let entry = serde_json::from_slice::<StopEntry>(&bytes).unwrap_or_else(|e| {
                tracing::error!(key, error = %e, "stored emergency stop is unreadable; it stays in force");
                StopEntry {
                    at: String::new(),
                    by: Actor::Daemon("unreadable".into()),
                    note: Some(format!("stored entry unreadable: {e}")),
                    attestation_id: 0,
                }
            });
            if key == KEY_ALL {
                set.all = Some(entry);
            } else if let Some(id) = key.strip_prefix(PREFIX) {
                set.passports.insert(id.to_string(), entry);
            }
        }
        set
    }
}

/// `POST /v1/stop`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StopDone {
    /// `all` or `passport`.
    pub scope: &'static str,
    pub passport_id: Option<String>,
    /// The scope was already stopped: nothing was written.
    pub already_stopped: bool,
    /// The stop's record; `None` when it was already stopped.
    pub attestation_id: Option<u64>,
    /// Pending holds this stop denied (`emergency_stop`).
    pub holds_denied: Vec<String>,
    /// Sandboxes (cgroup ids) the kernel now refuses for this stop's passports.
    pub sandboxes: Vec<u64>,
    /// Whether the kernel refuses their new connections (`false` in passport-only mode).
    pub kernel: bool,
}

/// `POST /v1/resume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResumeDone {
    pub scope: &'static str,
    pub passport_id: Option<String>,
    /// `false`: the scope was not stopped, nothing was written.
    pub was_stopped: bool,
    pub attestation_id: Option<u64>,
    /// Whether the passport is still stopped afterwards (by the stop of everything, for a
    /// passport; by passports' own stops, `--all` lifts only the stop of everything).
    pub still_stopped: Vec<String>,
}

json_at_the_edge!(StopDone, ResumeDone);

impl Service {
    /// Every stop in force now.
    pub fn stops(&self) -> Arc<StopSet> {
        self.stops.borrow().clone()
    }

    /// A receiver that sees every change of the stop set (the proxy closes stopped sandboxes'
    /// connections when it changes).
    pub fn stop_watch(&self) -> tokio::sync::watch::Receiver<Arc<StopSet>> {
        self.stops.subscribe()
    }

    /// Whether passport `id` is stopped now.
    pub fn is_stopped(&self, passport_id: &str) -> bool {
        self.stops.borrow().covers(passport_id)
    }

    /// The kernel's targets for the stop set now: every live sandbox of a stopped passport.
    fn stop_targets(&self, set: &StopSet) -> StopTargets {
        let cgroups = self
            .sandboxes
            .read()
            .map(|m| m.values().filter(|s| set.covers(&s.passport_id)).map(|s| s.cgroup_id).collect())
            .unwrap_or_default();
        // A poisoned sandbox map cannot say which sandboxes to refuse: refuse them all.
        let all = set.all.is_some() || self.sandboxes.read().is_err();
        StopTargets { all, cgroups }
    }

    /// Writes the stop set into the kernel's map (when the daemon has one). Returns the cgroup
    /// ids refused for passports' stops, and whether the kernel was written.
    pub(super) fn push_stops_to_kernel(&self) -> Result<(Vec<u64>, bool), ServiceError> {
        let set = self.stops();
        let targets = self.stop_targets(&set);
        let cgroups = targets.cgroups.iter().copied().collect();
        let Some(kernel) = &self.config.stops else { return Ok((cgroups, false)) };
        kernel.apply(&targets).map_err(|e| ServiceError::KernelStop(e.to_string()))?;
        Ok((cgroups, true))
    }

    /// Called once a new sandbox of `passport_id` is in the sandbox map: if a stop covers the
    /// passport by now (it came after the sandbox's own check), the kernel map gets the sandbox.
    pub(super) fn stop_late_sandbox(&self, passport_id: &str) {
        if self.is_stopped(passport_id) {
            if let Err(e) = self.push_stops_to_kernel() {
                tracing::error!(passport_id, error = %e, "a sandbox made during an emergency stop is not refused in the kernel");
            }
        }
    }

    /// `POST /v1/stop`: see the module docs. Stopping what is already stopped writes nothing and
    /// still closes connections, writes the kernel map and denies pending holds (idempotent).
    pub async fn stop(&self, scope: StopScope, peer: &Peer, note: Option<String>) -> Result<StopDone, ServiceError> {
        check_note(note.as_deref())?;
        let claims = match &scope {
            StopScope::Passport(id) => self.passport(id.as_str()).map(|cp| cp.passport.claims.clone()),
            StopScope::All => None,
        };
        let at = now();
        let mut body = drafts::base(drafts::kind::EMERGENCY_STOP, claims.as_ref(), at);
        body.insert("scope".into(), scope.name().into());
        if let Some(id) = scope.passport_id() {
            body.insert(drafts::field::PASSPORT_ID.into(), id.into());
        }
        body.insert(drafts::field::BY.into(), peer.to_json());
        body.insert(drafts::field::NOTE.into(), note.clone().into());
        let (key, chain, actor, note2) = (scope.key(), scope.chain(), peer.actor(), note.clone());
        let (written, appended) = self
            .transact(move |txn: &mut Txn<'_>| {
                if let Some(existing) = txn.get(&key)? {
                    return Ok((serde_json::from_slice::<StopEntry>(&existing).ok(), vec![]));
                }
                let entry =
                    StopEntry { at: drafts::time(at), by: actor, note: note2, attestation_id: txn.next_index() };
                let bytes = serde_json::to_vec(&entry).map_err(|e| ServiceError::Serialise(e).abort())?;
                txn.put(&key, &bytes)?;
                Ok((Some(entry), vec![Draft::new(chain, body)]))
            })
            .await?;
        let created = !appended.is_empty();
        let attestation_id = if created { Some(super::appended_index(&appended, "emergency stop")?) } else { None };
        // The set as the store has it (an entry that did not parse stays a stop).
        let entry = written.unwrap_or(StopEntry {
            at: drafts::time(at),
            by: Actor::Daemon("unreadable".into()),
            note: None,
            attestation_id: 0,
        });
        self.stops.send_modify(|set| {
            let mut next = (**set).clone();
            match &scope {
                StopScope::All => next.all = Some(entry),
                StopScope::Passport(id) => {
                    next.passports.insert(id.to_string(), entry);
                }
            }
            *set = Arc::new(next);
        });
        tracing::warn!(scope = scope.name(), passport_id = ?scope.passport_id(), by = ?peer.user, created, "emergency stop");
        let kernel = self.push_stops_to_kernel();
        let holds_denied = self.deny_stopped_holds(peer, note).await;
        let (sandboxes, kernel) = kernel?;
        Ok(StopDone {
            scope: scope.name(),
            passport_id: scope.passport_id(),
            already_stopped: !created,
            attestation_id,
            holds_denied: holds_denied?,
            sandboxes,
            kernel,
        })
    }

    /// `POST /v1/resume`: lifts the stop of `scope`. `--all` lifts the stop of everything only;
    /// passports stopped one by one stay stopped (listed in the answer).
    pub async fn resume(
        &self,
        scope: StopScope,
        peer: &Peer,
        note: Option<String>,
    ) -> Result<ResumeDone, ServiceError> {
        check_note(note.as_deref())?;
        let claims = match &scope {
            StopScope::Passport(id) => self.passport(id.as_str()).map(|cp| cp.passport.claims.clone()),
            StopScope::All => None,
        };
        let at = now();
        let mut body = drafts::base(drafts::kind::EMERGENCY_RESUME, claims.as_ref(), at);
        body.insert("scope".into(), scope.name().into());
        if let Some(id) = scope.passport_id() {
            body.insert(drafts::field::PASSPORT_ID.into(), id.into());
        }
        body.insert(drafts::field::BY.into(), peer.to_json());
        body.insert(drafts::field::NOTE.into(), note.into());
        let (key, chain) = (scope.key(), scope.chain());
        let ((), appended) = self
            .transact(move |txn: &mut Txn<'_>| {
                if txn.get(&key)?.is_none() {
                    return Ok(((), vec![]));
                }
                txn.delete(&key)?;
                Ok(((), vec![Draft::new(chain, body)]))
            })
            .await?;
        let was_stopped = !appended.is_empty();
        let attestation_id =
            if was_stopped { Some(super::appended_index(&appended, "emergency resume")?) } else { None };
        self.stops.send_modify(|set| {
            let mut next = (**set).clone();
            match &scope {
                StopScope::All => next.all = None,
                StopScope::Passport(id) => {
                    next.passports.remove(id.as_str());
                }
            }
            *set = Arc::new(next);
        });
        tracing::warn!(scope = scope.name(), passport_id = ?scope.passport_id(), by = ?peer.user, was_stopped, "emergency stop lifted");
        // Removing keys only lets more through: a failure here leaves the kernel refusing more.
        self.push_stops_to_kernel()?;
        let set = self.stops();
        let still_stopped = match &scope {
            StopScope::All => set.passports.keys().cloned().collect(),
            StopScope::Passport(id) if set.covers(id.as_str()) => vec![id.to_string()],
            StopScope::Passport(_) => vec![],
        };
        Ok(ResumeDone {
            scope: scope.name(),
            passport_id: scope.passport_id(),
            was_stopped,
            attestation_id,
            still_stopped,
        })
    }

    /// Denies every pending hold of a stopped passport (`emergency_stop`), naming who stopped.
    /// A hold resolved meanwhile is skipped. Returns the ids denied.
    async fn deny_stopped_holds(&self, peer: &Peer, note: Option<String>) -> Result<Vec<String>, ServiceError> {
        let set = self.stops();
        let pending = self.holds()?;
        let mut denied = Vec::new();
        for hold in pending.holds.iter().filter(|h| set.covers(&h.passport_id)) {
            match self.resolve(&hold.id, super::holds::Resolution::End(Ending::Stop(peer.clone(), note.clone()))).await
            {
                Ok(_) => denied.push(hold.id.clone()),
                Err(ServiceError::HoldAlreadyResolved { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(denied)
    }
}

fn check_note(note: Option<&str>) -> Result<(), ServiceError> {
    if note.is_some_and(|n| n.len() > MAX_NOTE) {
        return Err(ServiceError::invalid("note", format!("note is longer than {MAX_NOTE} bytes")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{Decision, HostVerdict, Reason};
    use crate::ledger::{HostKey, Ledger, LedgerOptions};
    use crate::passport::{Cents, Constraints, IssuerId};
    use crate::service::testkit::{register, verified};
    use crate::service::{EnforceInput, HoldOrigin, ServiceConfig};
    use ed25519_dalek::SigningKey;
    use std::path::Path;
    use std::sync::Mutex;
    use std::time::Duration;

    /// The kernel map as a list of every write, and an optional failure.
    #[derive(Debug, Default)]
    struct FakeKernel {
        applied: Mutex<Vec<StopTargets>>,
        fail: std::sync::atomic::AtomicBool,
    }

    impl StopEnforcer for FakeKernel {
        fn apply(&self, targets: &StopTargets) -> std::io::Result<()> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::other("map update refused"));
            }
            self.applied.lock().unwrap().push(targets.clone());
            Ok(())
        }
    }

    impl FakeKernel {
        fn last(&self) -> Option<StopTargets> {
            self.applied.lock().unwrap().last().cloned()
        }
    }

    fn root() -> Peer {
        Peer { uid: 0, gid: 0, pid: 1, user: Some("root".into()) }
    }

    async fn service_at(dir: &Path, kernel: Arc<FakeKernel>) -> Arc<Service> {
        let host = HostKey::from_signing_key(SigningKey::from_bytes(&[9u8; 32]));
        let ledger = Ledger::open(&dir.join("ledger.redb"), host, LedgerOptions::default()).expect("ledger");
        let issuer = SigningKey::from_bytes(&[3u8; 32]);
        let mut config =
            ServiceConfig::passport_only(vec![IssuerId::from_key(&issuer.verifying_key())], Duration::from_secs(60));
        config.stops = Some(kernel);
        Service::start(ledger, config).await.expect("service")
    }

    /// Approval above $1.
    fn held_above_a_dollar() -> Constraints {
        Constraints { approval_threshold: Some(Cents(100)), ..Constraints::default() }
    }

    async fn decide(service: &Service, passport: &str, cents: u64) -> crate::service::DecisionOutcome {
        let input = EnforceInput {
            passport_id: passport.into(),
            action: "llm:chat".into(),
            cost_cents: Some(cents),
            cost_millicents: None,
            target: Some("api.openai.com".into()),
            method: None,
            path: None,
            port: None,
            signed_request_hash: None,
            gate_price: None,
        };
        service.enforce_outcome(input, HoldOrigin::Api, HostVerdict::Allow).await.expect("enforce")
    }

    fn record(service: &Service, index: u64) -> Value {
        serde_json::from_slice(&service.ledger().record(index).expect("read").expect("exists")).expect("json")
    }

    #[tokio::test]
    async fn a_stop_refuses_the_passports_requests_denies_its_holds_is_attested_and_resume_lifts_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = Arc::new(FakeKernel::default());
        let service = service_at(dir.path(), kernel.clone()).await;
        let a = register(&service, "agent-a", held_above_a_dollar()).await;
        let b = register(&service, "agent-b", held_above_a_dollar()).await;
        let held = decide(&service, &a, 500).await;
        assert_eq!(held.decision, Decision::RequestHold);
        let hold_id = held.hold.as_ref().expect("hold").id.clone();
        let mut watch = service.stop_watch();

        let scope = StopScope::parse(Some(&a), false).expect("scope");
        let done = service.stop(scope.clone(), &root(), Some("runaway spend".into())).await.expect("stop");
        assert_eq!(
            (done.scope, done.passport_id.as_deref(), done.already_stopped),
            ("passport", Some(a.as_str()), false)
        );
        assert_eq!(done.holds_denied, vec![hold_id.clone()]);
        assert!(done.kernel);
        assert!(watch.has_changed().expect("watch"), "the proxy was not told");
        assert!(watch.borrow_and_update().covers(&a));

        // The record: who, why, what.
        let r = record(&service, done.attestation_id.expect("record"));
        assert_eq!(r["kind"], "emergency_stop");
        assert_eq!((r["scope"].as_str(), r["passport_id"].as_str()), (Some("passport"), Some(a.as_str())));
        assert_eq!((r["note"].as_str(), r["by"]["user"].as_str()), (Some("runaway spend"), Some("root")));

        // The hold: denied with the stable reason, by the operator who stopped.
        let hold = service.hold(&hold_id).expect("hold").to_json();
        assert_eq!(hold["status"], "denied", "{hold}");
        let outcome = service.wait_hold(&hold_id).await.to_json();
        assert_eq!(outcome["reason"], "emergency_stop", "{outcome}");

        // Every request of a is refused, b's are not.
        let refused = decide(&service, &a, 1).await;
        assert_eq!((refused.decision, refused.reason.clone()), (Decision::Block, Reason::EmergencyStop));
        assert!(refused.to_json()["detail"].as_str().unwrap().contains("sluice resume"));
        assert_eq!(decide(&service, &b, 1).await.decision, Decision::Allow);

        // Stopping again writes nothing.
        let again = service.stop(scope.clone(), &root(), None).await.expect("stop again");
        assert!(again.already_stopped && again.attestation_id.is_none());

        let resumed = service.resume(scope.clone(), &root(), Some("fixed".into())).await.expect("resume");
        assert!(resumed.was_stopped && resumed.still_stopped.is_empty());
        assert_eq!(record(&service, resumed.attestation_id.expect("record"))["kind"], "emergency_resume");
        assert_eq!(decide(&service, &a, 1).await.decision, Decision::Allow);
        assert_eq!(kernel.last(), Some(StopTargets::default()));
        let not = service.resume(scope, &root(), None).await.expect("resume again");
        assert!(!not.was_stopped && not.attestation_id.is_none());
        let report = verified_service(&service).await;
        assert!(report.is_ok(), "{report:?}");
    }

    async fn verified_service(service: &Arc<Service>) -> crate::ledger::verify::VerifyReport {
        let f = crate::service::testkit::Fixture {
            _dir: tempfile::tempdir().expect("tempdir"),
            service: service.clone(),
            passport: String::new(),
        };
        verified(&f).await
    }

    #[tokio::test]
    async fn stop_all_covers_every_passport_and_resume_all_leaves_passports_stopped_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = Arc::new(FakeKernel::default());
        let service = service_at(dir.path(), kernel.clone()).await;
        let a = register(&service, "agent-a", Constraints::default()).await;
        let b = register(&service, "agent-b", Constraints::default()).await;
        service.stop(StopScope::parse(Some(&a), false).unwrap(), &root(), None).await.expect("stop a");
        let all = service.stop(StopScope::All, &root(), Some("incident".into())).await.expect("stop all");
        assert_eq!(record(&service, all.attestation_id.expect("record"))["chain"], "host");
        assert_eq!(kernel.last().map(|t| t.all), Some(true));
        for id in [&a, &b] {
            assert_eq!(decide(&service, id, 1).await.reason, Reason::EmergencyStop);
        }
        let listed = service.stops().to_json();
        assert_eq!(listed["all"]["note"], "incident");
        assert_eq!(listed["passports"][0]["passport_id"], a.as_str());

        let resumed = service.resume(StopScope::All, &root(), None).await.expect("resume all");
        assert_eq!(resumed.still_stopped, vec![a.clone()]);
        assert_eq!(kernel.last().map(|t| t.all), Some(false));
        assert_eq!(decide(&service, &a, 1).await.reason, Reason::EmergencyStop);
        assert_eq!(decide(&service, &b, 1).await.decision, Decision::Allow);
    }

    #[tokio::test]
    async fn stops_survive_a_restart_and_are_pushed_to_the_kernel_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = Arc::new(FakeKernel::default());
        let service = service_at(dir.path(), kernel.clone()).await;
        let a = register(&service, "agent-a", Constraints::default()).await;
        service.stop(StopScope::parse(Some(&a), false).unwrap(), &root(), Some("n".into())).await.expect("stop");
        service.stop(StopScope::All, &root(), None).await.expect("stop all");
        service.ledger().shutdown();
        drop(service);

        let kernel = Arc::new(FakeKernel::default());
        let service = service_at(dir.path(), kernel.clone()).await;
        assert!(service.is_stopped(&a));
        assert_eq!(service.stops().passports[&a].note.as_deref(), Some("n"));
        assert_eq!(kernel.last().map(|t| t.all), Some(true), "the start did not write the kernel map");
        assert_eq!(decide(&service, &a, 1).await.reason, Reason::EmergencyStop);
    }

    #[tokio::test]
    async fn a_kernel_that_refuses_the_map_fails_the_command_but_the_stop_holds_in_the_daemon() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = Arc::new(FakeKernel::default());
        let service = service_at(dir.path(), kernel.clone()).await;
        let a = register(&service, "agent-a", Constraints::default()).await;
        kernel.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let err = service.stop(StopScope::parse(Some(&a), false).unwrap(), &root(), None).await.unwrap_err();
        assert!(matches!(err, ServiceError::KernelStop(_)), "{err}");
        assert!(err.to_string().contains("could not be written"), "{err}");
        assert_eq!(decide(&service, &a, 1).await.reason, Reason::EmergencyStop);
    }

    /// A decision evaluated before the stop and committed after it is refused by the writer's
    /// check: the lane's evaluation waits (on a blocking thread, as with CEL rules) until the
    /// stop is durable, then its commit is told the passport is stopped.
    #[tokio::test]
    async fn a_decision_evaluated_before_a_stop_and_committed_after_it_is_refused() {
        use super::super::lanes::{Barred, Speculation};
        let dir = tempfile::tempdir().expect("tempdir");
        let service = service_at(dir.path(), Arc::new(FakeKernel::default())).await;
        let a = register(&service, "agent-a", Constraints::default()).await;
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (evaluating, evaluated) = std::sync::mpsc::channel::<()>();
        let wait = Arc::new(Mutex::new(wait));
        let evaluating = Arc::new(Mutex::new(evaluating));
        let lane = {
            let (service, a) = (service.clone(), a.clone());
            tokio::spawn(async move {
                service
                    .in_lane(
                        &a,
                        true,
                        move |_counters, _at| {
                            let _ = evaluating.lock().unwrap().send(());
                            let _ = wait.lock().unwrap().recv_timeout(Duration::from_secs(10));
                            Speculation { writes: None, plan: () }
                        },
                        |barred, (), _txn| Ok((barred, vec![])),
                    )
                    .await
            })
        };
        tokio::task::spawn_blocking(move || evaluated.recv_timeout(Duration::from_secs(10)))
            .await
            .unwrap()
            .expect("the evaluation started");
        service.stop(StopScope::parse(Some(&a), false).unwrap(), &root(), None).await.expect("stop");
        go.send(()).unwrap();
        let (barred, _) = lane.await.unwrap().expect("committed");
        assert_eq!(barred, Some(Barred::Stopped));
    }

    #[test]
    fn scopes_are_exactly_one_of_a_passport_and_all() {
        assert_eq!(StopScope::parse(None, true).unwrap(), StopScope::All);
        let id = crate::passport::PassportId::random().to_string();
        assert!(matches!(StopScope::parse(Some(&id), false), Ok(StopScope::Passport(_))));
        for (p, all, field) in
            [(Some(id.as_str()), true, "all"), (None, false, "passport_id"), (Some("pp_../../x"), false, "passport_id")]
        {
            match StopScope::parse(p, all) {
                Err(ServiceError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{p:?} {all}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn notes_are_bounded_and_an_unreadable_stored_stop_still_stops() {
        let dir = tempfile::tempdir().expect("tempdir");
        let service = service_at(dir.path(), Arc::new(FakeKernel::default())).await;
        let long = "x".repeat(MAX_NOTE + 1);
        assert!(matches!(
            service.stop(StopScope::All, &root(), Some(long)).await,
            Err(ServiceError::Invalid { field: "note", .. })
        ));
        assert!(!service.is_stopped("pp_anything"));
        let set = StopSet::load(vec![(KEY_ALL.to_string(), b"{not json".to_vec())]);
        assert!(set.covers("pp_anything"));
    }
}
