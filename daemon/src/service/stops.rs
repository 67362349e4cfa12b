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
