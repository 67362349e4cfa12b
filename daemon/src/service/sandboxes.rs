//! Sandboxes: a child cgroup of the agents' cgroup, bound to one passport.
//!
//! `sluice run` asks for one; the daemon creates `run-<random>` under the agents' cgroup, records
//! it (attested), and moves the *caller* (identified by `SO_PEERCRED`, pinned with a pidfd) into
//! it. The caller then starts the agent, which inherits the cgroup and every eBPF program
//! attached above it. When the caller exits, the daemon kills whatever is left in the cgroup and
//! removes it, so "the sandbox ends with the command" holds even for daemonised grandchildren.
//!
//! Moving the caller rather than letting it write `cgroup.procs` itself is what lets a non-root
//! member of the API group run agents: it never needs write access to the agents' cgroup.
//!
//! *Bound* sandboxes have no leader: an existing cgroup below the agents' cgroup, made by someone
//! else (systemd, for a unit with `Slice=sluice-agents.slice`), is bound to a passport with
//! `POST /v1/sandboxes/bind`. The daemon neither moves processes into it nor removes it: the
//! binding ends with `POST /v1/sandboxes/unbind` or when the cgroup disappears (checked every
//! [`BOUND_CHECK_INTERVAL`], and at start). Cgroup ids are never reused on 64-bit kernels, so a
//! binding that outlives its cgroup by a few seconds cannot attach the passport to anything else.
//! A bound cgroup is never re-bound to another passport while it lives.
//!
//! Unix sockets ([`UnixConfinement`], `crates/kernel/src/unix.rs`): no sandbox is created or
//! bound unless the kernel confines agents' Unix sockets, or the operator accepted that it
//! cannot (`[sandbox] unix_sockets = "unenforced"`). A `sluice run` sandbox gets its own
//! directory (`<unix_dir>/<sandbox id>`, owned by the caller), the only place where sockets it
//! creates can be reached by name; it is removed with the sandbox. The filter allows names only
//! from the daemon's user namespace, and from the one registered for the sandbox: the caller's,
//! read from `/proc/PID/ns/user` when the sandbox is created (before the caller joins it), if it
//! is a direct child of the daemon's owned by the caller's uid that maps only that uid (not 0) to
//! itself. That is the namespace a
//! non-root `sluice run` makes before it asks, in which only `sluice run` itself and its
//! non-dumpable PID 1 hold capabilities; see `crates/kernel/src/unix.rs` for why that is safe.

use super::drafts;

/// Why a stopped passport gets no new sandbox.
const STOPPED_WHY: &str = "is under an emergency stop: no sandbox is created or bound for it until `sluice resume`";
use super::peer::{Actor, Peer};
use super::{now, Service, ServiceError};
use crate::decide::CompiledPassport;
use crate::kernel::process::{pidfd_open, process_identity, wait_exit};
use crate::kernel::userns::{self, UserNs};
use crate::kernel::{Cgroup, SandboxDirs, UnixFilter};
use crate::ledger::{Draft, Txn};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How often the daemon checks that the cgroup of a bound sandbox still exists.
pub const BOUND_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Which cgroup `POST /v1/sandboxes/bind` (or `unbind`) is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindTarget {
    /// An absolute path below the agents' cgroup, named by a caller outside any sandbox.
    Path(PathBuf),
    /// The caller's own cgroup, as `/proc/PID/cgroup` shows it (relative to the cgroup2 mount):
    /// the `ExecStartPre=+` of an agent unit, which runs inside the unit's cgroup.
    Own(String),
}

/// A live sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sandbox {
    pub id: String,
    pub passport_id: String,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    /// The process whose exit ends the sandbox (`sluice run`), and its start time in clock ticks
    /// since boot, so a recycled pid is never mistaken for it after a daemon restart. `None` for a
    /// bound sandbox, which ends with its cgroup.
    pub leader_pid: Option<i32>,
    pub leader_start: Option<u64>,
    pub created_at: String,
    /// Who made (or, in the record of its end, unbound) the sandbox.
    pub created_by: Option<Actor>,
}

/// `GET /v1/sandboxes`: the live sandboxes.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
}

/// `POST /v1/sandboxes`: the sandbox the caller is now in, and the CA bundle its agent trusts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SandboxCreated {
    pub sandbox_id: String,
    pub passport_id: String,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub ca_bundle: Option<PathBuf>,
    /// The sandbox's own directory (its agent's TMPDIR), where the sockets it may reach by name
    /// live; `None` when sandboxes get none.
    pub unix_dir: Option<PathBuf>,
    /// Set when the caller's user namespace could not be registered, so its agent reaches no
    /// Unix socket by name (not even in `unix_dir`): why. Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix_names_refused: Option<String>,
}

/// `POST /v1/sandboxes/bind`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SandboxBound {
    pub sandbox_id: String,
    pub passport_id: String,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    /// The cgroup was bound to this passport already: nothing was written.
    pub already_bound: bool,
}

/// `POST /v1/sandboxes/unbind`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SandboxUnbound {
    pub sandbox_id: String,
    pub passport_id: String,
    pub cgroup_id: u64,
    /// Always true: the API says so in so many words.
    pub unbound: bool,
}

json_at_the_edge!(SandboxList, SandboxCreated, SandboxBound, SandboxUnbound);

/// `unix_sockets` in `GET /v1/health`: whether agents' Unix sockets are confined, and if not why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum UnixHealth {
    /// Passport-only mode: there are no sandboxes.
    NotApplicable,
    /// Every sandbox is refused.
    RefusingSandboxes { why: String },
    /// Sandboxes are created, agents' Unix sockets are not confined.
    Unenforced { why: String },
    /// Confined; where own directories are made (`None`: sandboxes get none).
    Enforced { own_directories: Option<String> },
}

/// How agents' Unix sockets are confined, decided once by the daemon at start.
#[derive(Debug)]
pub struct UnixConfinement {
    /// From `kernel::unix::sandbox_gate`: `Err(why)` refuses every sandbox; `Ok(Some(warning))`
    /// creates them although agents' Unix sockets are not confined.
    pub gate: Result<Option<String>, String>,
    /// The kernel filter's maps (`None` where the kernel lacks the hooks).
    pub filter: Option<Arc<UnixFilter>>,
    /// Where own directories are made (`None`: sandboxes get none, and reach only the listed
    /// addresses by name).
    pub dirs: Option<SandboxDirs>,
}

impl Service {
    /// Whether sandboxes may be created now, as far as Unix sockets go.
    fn unix_or_refuse(&self) -> Result<&UnixConfinement, ServiceError> {
        unix_gate(self.config.unix.as_deref())
    }

    /// `unix_sockets` in `GET /v1/health`.
    pub(super) fn unix_health(&self) -> UnixHealth {
        match self.config.unix.as_deref() {
            None if self.config.agents.is_none() => UnixHealth::NotApplicable,
            None => UnixHealth::RefusingSandboxes { why: "not set up".to_string() },
            Some(UnixConfinement { gate: Err(why), .. }) => UnixHealth::RefusingSandboxes { why: why.clone() },
            Some(UnixConfinement { gate: Ok(Some(warning)), .. }) => UnixHealth::Unenforced { why: warning.clone() },
            Some(u) => {
                UnixHealth::Enforced { own_directories: u.dirs.as_ref().map(|d| d.root().display().to_string()) }
            }
        }
    }

    /// Makes sandbox `id`'s own directory and tells the kernel filter about it. `Ok(None)` when
    /// sandboxes get no own directory.
    fn make_own_dir(
        &self,
        unix: &UnixConfinement,
        id: &str,
        cgroup_id: u64,
        peer: &Peer,
    ) -> Result<Option<PathBuf>, ServiceError> {
        let (Some(filter), Some(dirs)) = (&unix.filter, &unix.dirs) else { return Ok(None) };
        let dir =
            dirs.create(id, peer.uid, peer.gid).map_err(|e| ServiceError::Cgroup(format!("own directory: {e}")))?;
        filter.set_sandbox_dir(cgroup_id, &dir).map_err(|e| ServiceError::Cgroup(format!("own directory: {e}")))?;
        Ok(Some(dir))
    }

    /// The user namespace to register for a new sandbox: the caller's (process `peer.pid`, which
    /// started at `start`), if it is a direct child of the daemon's owned by the caller's uid.
    /// `Ok(Ok(None))` when the caller is in the daemon's user namespace (nothing to register);
    /// `Ok(Err(why))` when its namespace cannot be registered (its agent then reaches no Unix
    /// socket by name: logged, and told to the caller). An error when the process is no longer
    /// the caller.
    fn caller_user_namespace(&self, peer: &Peer, start: u64) -> Result<Result<Option<u32>, String>, ServiceError> {
        let seen = userns::of_process(peer.pid);
        let uid_map = userns::uid_map(peer.pid);
        // The namespace was read from the caller only if the pid still names the process that
        // started at `start` (a pid reused meanwhile would have another start time).
        match process_identity(peer.pid) {
            Some((s, uid)) if s == start && uid == peer.uid => {}
            _ => {
                return Err(ServiceError::Invalid {
                    field: "pid",
                    problem: "the calling process changed identity".into(),
                })
            }
        }
        let decided = registration(seen, &uid_map, peer);
        if let Err(why) = &decided {
            tracing::warn!(
                pid = peer.pid,
                uid = peer.uid,
                "sandbox caller's user namespace not registered ({why}); its agent reaches no Unix socket by name"
            );
        }
        Ok(decided)
    }

    /// Forgets and removes a sandbox's own directory (if it has one) and its user namespace.
    fn remove_own_dir(&self, sandbox: &Sandbox) {
        let Some(unix) = self.config.unix.as_deref() else { return };
        if let Some(filter) = &unix.filter {
            if let Err(e) = filter.remove_sandbox_dir(sandbox.cgroup_id) {
                tracing::error!(sandbox = %sandbox.id, error = %e, "could not forget the sandbox's own directory");
            }
            if let Err(e) = filter.remove_sandbox_userns(sandbox.cgroup_id) {
                tracing::error!(sandbox = %sandbox.id, error = %e, "could not forget the sandbox's user namespace");
            }
        }
        if let (Some(dirs), Some(_)) = (&unix.dirs, sandbox.leader_pid) {
            if let Err(e) = dirs.remove(&sandbox.id) {
                tracing::error!(sandbox = %sandbox.id, error = %e, "could not remove the sandbox's own directory");
            }
        }
    }

    /// The passport bound to the sandbox whose cgroup id this is.
    pub fn passport_for_cgroup(&self, cgroup_id: u64) -> Option<Arc<CompiledPassport>> {
        let passport_id = self.sandboxes.read().ok()?.get(&cgroup_id).map(|s| s.passport_id.clone())?;
        self.passport(&passport_id)
    }

    /// `GET /v1/sandboxes`.
    pub fn sandboxes(&self) -> Result<SandboxList, ServiceError> {
        let sandboxes = self.sandboxes.read().map(|m| m.values().cloned().collect()).unwrap_or_default();
        Ok(SandboxList { sandboxes })
    }

    /// `POST /v1/sandboxes`: creates a sandbox for `passport_id` and moves the caller into it.
    pub async fn create_sandbox(
        &self,
        passport_id: &str,
        pop: Option<&crate::passport::pop::Proof>,
        peer: &Peer,
    ) -> Result<SandboxCreated, ServiceError> {
        let agents = self.agents_or_refuse()?;
        let unix = self.unix_or_refuse()?;
        let cp =
            self.passport(passport_id).ok_or_else(|| ServiceError::PassportNotRegistered(passport_id.to_string()))?;
        if self.is_revoked(passport_id) {
            return Err(ServiceError::PassportUnusable { passport_id: passport_id.to_string(), why: "is revoked" });
        }
        if self.is_stopped(passport_id) {
            return Err(ServiceError::PassportUnusable { passport_id: passport_id.to_string(), why: STOPPED_WHY });
        }
        // An L3 agent proves possession of its key for every sandbox, not only at registration.
        self.check_pop(&cp.passport.claims, pop)?;
        if cp.passport.claims.expires_at <= crate::passport::now() {
            return Err(ServiceError::PassportUnusable { passport_id: passport_id.to_string(), why: "has expired" });
        }
        let (leader_start, uid) = process_identity(peer.pid).ok_or_else(|| ServiceError::Invalid {
            field: "pid",
            problem: format!("the calling process {} is gone", peer.pid),
        })?;
        if uid != peer.uid {
            return Err(ServiceError::Invalid { field: "pid", problem: "the calling process changed identity".into() });
        }
        let pidfd = pidfd_open(peer.pid)
            .map_err(|e| ServiceError::Invalid { field: "pid", problem: format!("pidfd_open({}): {e}", peer.pid) })?;
        // The caller made its user namespace before asking (sluice run): registered below, before
        // the caller joins the cgroup. Only where the kernel filter runs.
        let (userns, unix_names_refused) = match unix.filter {
            Some(_) => match self.caller_user_namespace(peer, leader_start)? {
                Ok(inode) => (inode, None),
                Err(why) => (None, Some(why)),
            },
            None => (None, None),
        };
        let suffix: [u8; 8] = rand::random();
        let name = format!("run-{}", crate::ledger::hex::encode(&suffix));
        let cgroup = agents.create_child(&name).map_err(|e| ServiceError::Cgroup(e.to_string()))?;
        let sandbox = Sandbox {
            id: name,
            passport_id: passport_id.to_string(),
            cgroup: cgroup.path().to_path_buf(),
            cgroup_id: cgroup.id(),
            leader_pid: Some(peer.pid),
            leader_start: Some(leader_start),
            created_at: drafts::time(now()),
            created_by: Some(peer.actor()),
        };
        // Durable before anything runs inside it.
        if let Err(e) = self.record_sandbox(&cp, &sandbox, true, "created").await {
            let _ = cgroup.remove();
            return Err(e);
        }
        // The own directory exists (and the kernel knows it) before anything runs inside.
        let unix_dir = match self.make_own_dir(unix, &sandbox.id, sandbox.cgroup_id, peer) {
            Ok(d) => d,
            Err(e) => {
                self.end_sandbox(&cp, sandbox, cgroup, "own_directory_failed").await;
                return Err(e);
            }
        };
        if let (Some(filter), Some(inode)) = (&unix.filter, userns) {
            if let Err(e) = filter.set_sandbox_userns(sandbox.cgroup_id, inode) {
                self.end_sandbox(&cp, sandbox, cgroup, "user_namespace_failed").await;
                return Err(ServiceError::Cgroup(format!("registering the caller's user namespace: {e}")));
            }
            tracing::debug!(sandbox = %sandbox.id, userns = inode, "caller's user namespace registered");
        }
        if let Err(e) = cgroup.add_pid(peer.pid as u32) {
            self.end_sandbox(&cp, sandbox, cgroup, "join_failed").await;
            return Err(ServiceError::Invalid {
                field: "pid",
                problem: format!("cannot move the caller into its sandbox: {e}"),
            });
        }
        if let Ok(mut m) = self.sandboxes.write() {
            m.insert(sandbox.cgroup_id, sandbox.clone());
        }
        // A stop that came between the check above and now missed this sandbox.
        self.stop_late_sandbox(passport_id);
        tracing::info!(sandbox = %sandbox.id, passport_id, pid = peer.pid, cgroup_id = sandbox.cgroup_id, "sandbox created");
        self.watch_leader(pidfd, sandbox.clone(), cgroup);
        Ok(SandboxCreated {
            sandbox_id: sandbox.id,
            passport_id: passport_id.to_string(),
            cgroup: sandbox.cgroup,
            cgroup_id: sandbox.cgroup_id,
            ca_bundle: self.config.ca_bundle.clone(),
            unix_dir,
            unix_names_refused,
        })
    }

    /// Writes (or deletes) the sandbox's state entry with its attestation.
    async fn record_sandbox(
        &self,
        cp: &CompiledPassport,
        sandbox: &Sandbox,
        alive: bool,
        what: &str,
    ) -> Result<(), ServiceError> {
        let key = format!("sandbox/{}", sandbox.cgroup_id);
        let value = serde_json::to_vec(sandbox)?;
        let mut body =
            drafts::base(if alive { "sandbox_created" } else { "sandbox_removed" }, Some(&cp.passport.claims), now());
        body.insert("sandbox_id".into(), sandbox.id.clone().into());
        body.insert("cgroup_id".into(), sandbox.cgroup_id.into());
        body.insert("leader_pid".into(), sandbox.leader_pid.into());
        body.insert("cgroup".into(), sandbox.cgroup.display().to_string().into());
        body.insert(
            drafts::field::BY.into(),
            sandbox.created_by.as_ref().map_or(serde_json::Value::Null, Actor::to_json),
        );
        body.insert("why".into(), what.into());
        let chain = cp.passport.claims.id.to_string();
        self.transact(move |txn: &mut Txn<'_>| {
            if alive {
                txn.put(&key, &value)?;
            } else {
                txn.delete(&key)?;
            }
            Ok(((), vec![Draft::new(chain, body)]))
        })
        .await?;
        Ok(())
    }

    /// Kills what is left in the sandbox, removes its cgroup and records the end.
    async fn end_sandbox(&self, cp: &CompiledPassport, sandbox: Sandbox, cgroup: Cgroup, why: &str) {
        if let Ok(mut m) = self.sandboxes.write() {
            m.remove(&sandbox.cgroup_id);
        }
        let removed = tokio::task::spawn_blocking(move || cgroup.remove()).await;
        self.remove_own_dir(&sandbox);
        if !matches!(removed, Ok(Ok(()))) {
            tracing::error!(sandbox = %sandbox.id, ?removed, "could not remove the sandbox's cgroup; its processes may linger (still redirected)");
        }
        if let Err(e) = self.record_sandbox(cp, &sandbox, false, why).await {
            tracing::error!(sandbox = %sandbox.id, error = %e, "could not record the sandbox's end");
        }
        tracing::info!(sandbox = %sandbox.id, why, "sandbox removed");
    }

    /// Ends the sandbox when its leader exits.
    fn watch_leader(&self, pidfd: OwnedFd, sandbox: Sandbox, cgroup: Cgroup) {
        let Some(service) = self.self_arc() else { return };
        tokio::spawn(async move {
            if let Err(e) = wait_exit(pidfd).await {
                tracing::error!(error = %e, "cannot watch a sandbox's leader; ending the sandbox now");
            }
            let Some(cp) = service.passport(&sandbox.passport_id) else { return };
            service.end_sandbox(&cp, sandbox, cgroup, "leader_exited").await;
        });
    }

    /// `POST /v1/sandboxes/bind`: registers `token` and binds an existing cgroup below the
    /// agents' cgroup to it. Binding a cgroup again to the same passport is a no-op; to another
    /// passport, or below another sandbox, a conflict.
    pub async fn bind_sandbox(
        &self,
        token: &str,
        target: BindTarget,
        peer: &Peer,
    ) -> Result<SandboxBound, ServiceError> {
        let agents = self.agents_or_refuse()?;
        self.unix_or_refuse()?;
        let cgroup = resolve_target(&agents, &target)?;
        let registered = self.register(token, None, peer).await?;
        let passport_id = registered.passport_id;
        let cp = self.passport(&passport_id).ok_or_else(|| ServiceError::PassportNotRegistered(passport_id.clone()))?;
        if self.is_revoked(&passport_id) {
            return Err(ServiceError::PassportUnusable { passport_id: passport_id.to_string(), why: "is revoked" });
        }
        if self.is_stopped(&passport_id) {
            return Err(ServiceError::PassportUnusable { passport_id: passport_id.to_string(), why: STOPPED_WHY });
        }
        let sandbox = Sandbox {
            id: cgroup.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            passport_id: passport_id.clone(),
            cgroup: cgroup.path().to_path_buf(),
            cgroup_id: cgroup.id(),
            leader_pid: None,
            leader_start: None,
            created_at: drafts::time(now()),
            created_by: Some(peer.actor()),
        };
        // Check and reserve under one lock, so two concurrent binds cannot both win.
        {
            let mut m = self.sandboxes.write().map_err(|_| ServiceError::LockPoisoned("sandboxes"))?;
            if let Some(existing) = bound_at_or_above(&m, &cgroup) {
                if existing.cgroup_id == cgroup.id()
                    && existing.passport_id == passport_id
                    && existing.leader_pid.is_none()
                {
                    return Ok(bound(existing, true));
                }
                return Err(ServiceError::AlreadyBound {
                    cgroup: cgroup.path().to_path_buf(),
                    sandbox: existing.id.clone(),
                    passport_id: existing.passport_id.clone(),
                });
            }
            m.insert(sandbox.cgroup_id, sandbox.clone());
        }
        self.stop_late_sandbox(&passport_id);
        // Durable before the caller is told (and before the unit's agent starts).
        if let Err(e) = self.record_sandbox(&cp, &sandbox, true, "bound").await {
            if let Ok(mut m) = self.sandboxes.write() {
                m.remove(&sandbox.cgroup_id);
            }
            return Err(e);
        }
        tracing::info!(sandbox = %sandbox.id, passport_id, cgroup = %sandbox.cgroup.display(), cgroup_id = sandbox.cgroup_id, "cgroup bound to passport");
        self.watch_bound(sandbox.clone());
        Ok(bound(&sandbox, false))
    }

    /// `POST /v1/sandboxes/unbind`: ends a bound sandbox (not a `sluice run` one, which ends with
    /// its command). The cgroup and its processes are left alone; their connections are refused
    /// from now on (no passport).
    pub async fn unbind_sandbox(&self, target: BindTarget, peer: &Peer) -> Result<SandboxUnbound, ServiceError> {
        let agents = self.agents_or_refuse()?;
        self.unix_or_refuse()?;
        let cgroup = resolve_target(&agents, &target)?;
        let sandbox = {
            let mut m = self.sandboxes.write().map_err(|_| ServiceError::LockPoisoned("sandboxes"))?;
            match m.get(&cgroup.id()) {
                None => return Err(ServiceError::NotBound(cgroup.path().to_path_buf())),
                Some(s) if s.leader_pid.is_some() => {
                    return Err(ServiceError::RunSandbox {
                        cgroup: cgroup.path().to_path_buf(),
                        sandbox: s.id.clone(),
                    });
                }
                Some(_) => m.remove(&cgroup.id()),
            }
        };
        let Some(sandbox) = sandbox else {
            return Err(ServiceError::NotBound(cgroup.path().to_path_buf()));
        };
        if let Some(cp) = self.passport(&sandbox.passport_id) {
            let mut ended = sandbox.clone();
            ended.created_by = Some(peer.actor());
            self.record_sandbox(&cp, &ended, false, "unbound").await?;
        }
        tracing::info!(sandbox = %sandbox.id, passport_id = %sandbox.passport_id, "cgroup unbound");
        Ok(SandboxUnbound {
            sandbox_id: sandbox.id,
            passport_id: sandbox.passport_id,
            cgroup_id: sandbox.cgroup_id,
            unbound: true,
        })
    }

    fn agents_or_refuse(&self) -> Result<Cgroup, ServiceError> {
        self.config.agents.clone().ok_or(ServiceError::PassportOnlyMode)
    }

    /// Ends a bound sandbox once its cgroup is gone.
    fn watch_bound(&self, sandbox: Sandbox) {
        let Some(service) = self.self_arc() else { return };
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(BOUND_CHECK_INTERVAL).await;
                let still_bound = service.sandboxes.read().map(|m| m.contains_key(&sandbox.cgroup_id)).unwrap_or(false);
                if !still_bound {
                    return; // unbound through the API, which recorded it
                }
                let alive = Cgroup::open(&sandbox.cgroup).is_ok_and(|c| c.id() == sandbox.cgroup_id);
                if alive {
                    continue;
                }
                let removed = service.sandboxes.write().ok().and_then(|mut m| m.remove(&sandbox.cgroup_id));
                if removed.is_some() {
                    if let Some(cp) = service.passport(&sandbox.passport_id) {
                        if let Err(e) = service.record_sandbox(&cp, &sandbox, false, "cgroup_removed").await {
                            tracing::error!(sandbox = %sandbox.id, error = %e, "could not record the sandbox's end");
                        }
                    }
                    tracing::info!(sandbox = %sandbox.id, "bound cgroup removed; binding ended");
                }
                return;
            }
        });
    }

    /// At start: sandboxes whose leader still runs are watched again; the others are removed.
    pub(super) async fn recover_sandboxes(&self) -> Result<(), ServiceError> {
        self.recover_sandboxes_inner().await?;
        // Own directories of sandboxes that ended while no daemon ran are forgotten (the kernel
        // map is pinned); those of live sandboxes are written again.
        if let Some(UnixConfinement { filter: Some(filter), dirs, .. }) = self.config.unix.as_deref() {
            let live: Vec<Sandbox> = self.sandboxes.read().map(|m| m.values().cloned().collect()).unwrap_or_default();
            let ids: HashSet<u64> = live.iter().map(|s| s.cgroup_id).collect();
            if let Err(e) = filter.retain_sandbox_dirs(&ids) {
                tracing::error!(error = %e, "could not prune the own directories of ended sandboxes");
            }
            // Registered user namespaces live in a pinned map too: those of live sandboxes stay
            // (their leader, which keeps the namespace alive, still runs).
            if let Err(e) = filter.retain_sandbox_userns(&ids) {
                tracing::error!(error = %e, "could not prune the user namespaces of ended sandboxes");
            }
            for s in live.iter().filter(|s| s.leader_pid.is_some()) {
                let Some(dir) = dirs.as_ref().map(|d| d.dir(&s.id)).filter(|d| d.is_dir()) else { continue };
                if let Err(e) = filter.set_sandbox_dir(s.cgroup_id, &dir) {
                    tracing::error!(sandbox = %s.id, error = %e, "could not restore the sandbox's own directory");
                }
            }
        }
        Ok(())
    }

    async fn recover_sandboxes_inner(&self) -> Result<(), ServiceError> {
        for (_, bytes) in self.ledger.state_scan("sandbox/")? {
            let Ok(sandbox) = serde_json::from_slice::<Sandbox>(&bytes) else { continue };
            let Some(cp) = self.passport(&sandbox.passport_id) else { continue };
            let cgroup = Cgroup::open(&sandbox.cgroup).ok().filter(|c| c.id() == sandbox.cgroup_id);
            let (Some(leader_pid), Some(leader_start)) = (sandbox.leader_pid, sandbox.leader_start) else {
                // A bound sandbox: it lives as long as its cgroup.
                match cgroup {
                    Some(_) => {
                        if let Ok(mut m) = self.sandboxes.write() {
                            m.insert(sandbox.cgroup_id, sandbox.clone());
                        }
                        self.watch_bound(sandbox);
                    }
                    None => {
                        if let Err(e) = self.record_sandbox(&cp, &sandbox, false, "cgroup_gone_at_restart").await {
                            tracing::error!(error = %e, "could not record a vanished sandbox");
                        }
                    }
                }
                continue;
            };
            let leader = process_identity(leader_pid)
                .filter(|(start, _)| *start == leader_start)
                .and_then(|_| pidfd_open(leader_pid).ok());
            match (cgroup, leader) {
                (Some(cgroup), Some(pidfd)) => {
                    if let Ok(mut m) = self.sandboxes.write() {
                        m.insert(sandbox.cgroup_id, sandbox.clone());
                    }
                    self.watch_leader(pidfd, sandbox, cgroup);
                }
                (Some(cgroup), None) => self.end_sandbox(&cp, sandbox, cgroup, "leader_gone_at_restart").await,
                (None, _) => {
                    if let Err(e) = self.record_sandbox(&cp, &sandbox, false, "cgroup_gone_at_restart").await {
                        tracing::error!(error = %e, "could not record a vanished sandbox");
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether `uid_map` maps exactly one uid, `uid`, to itself, and it is not 0: the shape of the
/// namespace `sluice run` makes, where no process that `exec`ed holds a capability. A caller that
/// is root inside its namespace (`unshare -r`, a rootless container) would start agents that
/// keep every capability there, and could mount.
fn maps_only_itself(uid_map: &str, uid: u32) -> bool {
    let mut lines = uid_map.lines().filter(|l| !l.trim().is_empty());
    let (Some(line), None) = (lines.next(), lines.next()) else { return false };
    let fields: Vec<&str> = line.split_whitespace().collect();
    let want = uid.to_string();
    uid != 0 && matches!(fields.as_slice(), [inside, outside, "1"] if *inside == want && *outside == want)
}

/// Which user namespace to register for a sandbox, given the caller's as seen from the daemon
/// and its `uid_map`: `Ok(None)` for the daemon's own (nothing to register), `Ok(Some(inode))`
/// for a direct child owned by the caller's uid that maps only that uid, to itself; else why none
/// is (the sandbox then reaches no name).
fn registration(seen: std::io::Result<UserNs>, uid_map: &str, peer: &Peer) -> Result<Option<u32>, String> {
    match seen {
        Ok(UserNs::Own) => Ok(None),
        Ok(UserNs::Child { inode, owner }) if owner == peer.uid => {
            if maps_only_itself(uid_map, peer.uid) {
                Ok(Some(inode))
            } else {
                Err(format!(
                    "its user namespace maps uids {:?}, not only the caller's uid {} to itself (as sluice run's does)",
                    uid_map.trim(),
                    peer.uid
                ))
            }
        }
        Ok(UserNs::Child { owner, .. }) => Err(format!("its user namespace is owned by uid {owner}, not the caller's")),
        Ok(UserNs::Other { .. }) => Err("its user namespace is not a direct child of the daemon's".to_string()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)) => Err(format!(
            "cannot read /proc/{}/ns/user ({e}): the daemon needs CAP_SYS_PTRACE to read another user's",
            peer.pid
        )),
        Err(e) => Err(format!("cannot read /proc/{}/ns/user: {e}", peer.pid)),
    }
}

/// Sandboxes are created only with Unix socket confinement set up and its gate open.
fn unix_gate(unix: Option<&UnixConfinement>) -> Result<&UnixConfinement, ServiceError> {
    let unix = unix.ok_or_else(|| {
        ServiceError::UnixUnconfined("the daemon has not set up Unix socket confinement; no sandbox is created".into())
    })?;
    match &unix.gate {
        Ok(_) => Ok(unix),
        Err(why) => Err(ServiceError::UnixUnconfined(why.clone())),
    }
}

/// The live sandbox at `cgroup` or at one of its ancestors.
fn bound_at_or_above<'a>(m: &'a HashMap<u64, Sandbox>, cgroup: &Cgroup) -> Option<&'a Sandbox> {
    m.values().find(|s| s.cgroup_id == cgroup.id() || cgroup.path().starts_with(&s.cgroup))
}

fn bound(s: &Sandbox, already: bool) -> SandboxBound {
    SandboxBound {
        sandbox_id: s.id.clone(),
        passport_id: s.passport_id.clone(),
        cgroup: s.cgroup.clone(),
        cgroup_id: s.cgroup_id,
        already_bound: already,
    }
}

/// The cgroup a bind request names, checked to lie strictly below the agents' cgroup: only plain
/// path components (no `.`, `..`, `//`), an existing cgroup2 directory, not the agents' cgroup
/// itself (that would put every agent under one passport).
fn resolve_target(agents: &Cgroup, target: &BindTarget) -> Result<Cgroup, ServiceError> {
    let path = match target {
        BindTarget::Path(p) => p.clone(),
        BindTarget::Own(rel) => {
            let mount = crate::kernel::cgroup2_mount().map_err(|e| ServiceError::Cgroup(e.to_string()))?;
            let rel = rel.strip_suffix(" (deleted)").unwrap_or(rel);
            mount.join(rel.trim_start_matches('/'))
        }
    };
    check_below(agents.path(), &path)?;
    let cgroup = Cgroup::open(&path)
        .map_err(|e| ServiceError::Invalid { field: "cgroup", problem: format!("cgroup {}: {e}", path.display()) })?;
    Ok(cgroup)
}

fn check_below(agents: &Path, path: &Path) -> Result<(), ServiceError> {
    let text = path.to_string_lossy();
    let plain = path.is_absolute()
        && !text.contains("//")
        && path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && !text.split('/').any(|part| part == "." || part == "..");
    if !plain {
        return Err(ServiceError::Invalid {
            field: "cgroup",
            problem: format!("cgroup {}: give an absolute path without `.`, `..` or `//`", path.display()),
        });
    }
    match path.strip_prefix(agents) {
        Ok(rest) if rest.components().next().is_some() => Ok(()),
        _ => Err(ServiceError::Invalid {
            field: "cgroup",
            problem: format!(
                "cgroup {} is not below the agents' cgroup {}: only cgroups whose traffic sluice redirects can be bound",
                path.display(),
                agents.display()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel probe's verdict, injected: a closed gate or no setup at all refuses sandboxes
    /// with the reason; an open gate (enforced, or unenforced by the operator's choice) admits.
    #[test]
    fn sandboxes_need_the_unix_gate_open() {
        use crate::kernel::unix::{sandbox_gate, Hooks, UnixMode, UnixStatus};
        let with = |gate| UnixConfinement { gate, filter: None, dirs: None };
        let missing = UnixStatus::Missing("no cgroup/connect_unix hook".into());
        let refused = with(sandbox_gate(UnixMode::Enforced, &missing));
        let err = unix_gate(Some(&refused)).unwrap_err();
        assert!(matches!(err, ServiceError::UnixUnconfined(_)));
        assert!(err.to_string().contains("no cgroup/connect_unix hook"), "{err}");
        assert!(matches!(unix_gate(None), Err(ServiceError::UnixUnconfined(_))));
        let unenforced = with(sandbox_gate(UnixMode::Unenforced, &missing));
        assert!(unix_gate(Some(&unenforced)).is_ok());
        let enforced =
            with(sandbox_gate(UnixMode::Enforced, &UnixStatus::Enforced(Hooks { connect: 49, sendmsg: 50 })));
        assert!(unix_gate(Some(&enforced)).is_ok());
    }

    /// Only a direct child of the daemon's user namespace owned by the caller is registered; the
    /// daemon's own needs nothing; anything else (someone else's, nested deeper, unreadable) is
    /// not registered, with the reason.
    #[test]
    fn only_the_callers_direct_child_user_namespace_is_registered() {
        let peer = Peer { uid: 1000, gid: 1000, pid: 42, user: None };
        let map = "      1000       1000          1\n";
        let child = |owner| Ok(UserNs::Child { inode: 7, owner });
        assert_eq!(registration(Ok(UserNs::Own), "", &peer), Ok(None));
        assert_eq!(registration(child(1000), map, &peer), Ok(Some(7)));
        let other_owner = registration(child(1001), map, &peer).unwrap_err();
        assert!(other_owner.contains("uid 1001"), "{other_owner}");
        // Root inside (unshare -r, a rootless container), more than one uid, none yet: agents
        // there could hold capabilities.
        for bad in ["0 1000 1\n", "1000 1000 1\n1 100000 65536\n", "1000 1000 2\n", "1001 1000 1\n", ""] {
            let e = registration(child(1000), bad, &peer).unwrap_err();
            assert!(e.contains("not only the caller's uid 1000"), "{bad:?}: {e}");
        }
        let root = Peer { uid: 0, ..peer.clone() };
        assert!(registration(child(0), "0 0 1\n", &root).is_err());
        let nested = registration(Ok(UserNs::Other { inode: 8 }), map, &peer).unwrap_err();
        assert!(nested.contains("not a direct child"), "{nested}");
        let denied = registration(Err(std::io::Error::from_raw_os_error(libc::EACCES)), map, &peer).unwrap_err();
        assert!(denied.contains("CAP_SYS_PTRACE") && denied.contains("/proc/42/ns/user"), "{denied}");
        let gone = registration(Err(std::io::Error::from_raw_os_error(libc::ENOENT)), map, &peer).unwrap_err();
        assert!(gone.contains("/proc/42/ns/user"), "{gone}");
    }

    #[test]
    fn bind_targets_must_lie_strictly_below_the_agents_cgroup() {
        let agents = Path::new("/sys/fs/cgroup/sluice.slice/sluice-agents.slice");
        let ok = agents.join("sluice-agent@shop.service");
        check_below(agents, &ok).unwrap();
        check_below(agents, &agents.join("team.slice/a.service")).unwrap();
        for bad in [
            agents.to_path_buf(),
            PathBuf::from("/sys/fs/cgroup/sluice.slice/sluice-agents.slice-evil/x.service"),
            PathBuf::from("/sys/fs/cgroup/system.slice/sshd.service"),
            agents.join("../../system.slice/sshd.service"),
            agents.join("./x.service"),
            PathBuf::from("sluice.slice/sluice-agents.slice/x.service"),
            PathBuf::from(format!("{}//x.service", agents.display())),
        ] {
            assert!(check_below(agents, &bad).is_err(), "{} accepted", bad.display());
        }
    }

    /// The typed answers make exactly the JSON the untyped ones made (the API's bytes, keys
    /// sorted as `serde_json::Value` sorts them).
    #[test]
    fn typed_sandbox_answers_make_the_same_json_as_before() {
        use serde_json::json;
        let peer = Peer { uid: 1000, gid: 1000, pid: 42, user: Some("ada".into()) };
        let s = Sandbox {
            id: "run-1".into(),
            passport_id: "pp_x".into(),
            cgroup: PathBuf::from("/sys/fs/cgroup/a/run-1"),
            cgroup_id: 7,
            leader_pid: Some(42),
            leader_start: Some(99),
            created_at: "2026-05-01T00:00:00.000000Z".into(),
            created_by: Some(peer.actor()),
        };
        let list = SandboxList { sandboxes: vec![s.clone()] }.to_json().to_string();
        let before = json!({"sandboxes": [{
            "id": "run-1", "passport_id": "pp_x", "cgroup": "/sys/fs/cgroup/a/run-1", "cgroup_id": 7,
            "leader_pid": 42, "leader_start": 99, "created_at": "2026-05-01T00:00:00.000000Z",
            "created_by": peer.to_json(),
        }]});
        assert_eq!(list, before.to_string());
        assert_eq!(
            bound(&s, true).to_json().to_string(),
            json!({"sandbox_id": s.id, "passport_id": s.passport_id, "cgroup": s.cgroup, "cgroup_id": 7,
                   "already_bound": true})
            .to_string()
        );
        let created = SandboxCreated {
            sandbox_id: s.id.clone(),
            passport_id: s.passport_id.clone(),
            cgroup: s.cgroup.clone(),
            cgroup_id: 7,
            ca_bundle: None,
            unix_dir: Some("/run/sluice-sandboxes/run-1".into()),
            unix_names_refused: None,
        };
        assert_eq!(
            created.to_json().to_string(),
            json!({"sandbox_id": "run-1", "passport_id": "pp_x", "cgroup": s.cgroup, "cgroup_id": 7,
                   "ca_bundle": null, "unix_dir": "/run/sluice-sandboxes/run-1"})
            .to_string()
        );
        let unbound =
            SandboxUnbound { sandbox_id: "a".into(), passport_id: "pp_x".into(), cgroup_id: 8, unbound: true };
        assert_eq!(
            unbound.to_json().to_string(),
            json!({"sandbox_id": "a", "passport_id": "pp_x", "cgroup_id": 8, "unbound": true}).to_string()
        );
    }

    #[test]
    fn old_and_bound_sandbox_records_both_parse() {
        let run = r#"{"id":"run-1","passport_id":"pp_x","cgroup":"/c/run-1","cgroup_id":7,"leader_pid":42,
            "leader_start":99,"created_at":"t","created_by":null}"#;
        let s: Sandbox = serde_json::from_str(run).unwrap();
        assert_eq!((s.leader_pid, s.leader_start), (Some(42), Some(99)));
        let bound = r#"{"id":"a.service","passport_id":"pp_x","cgroup":"/c/a.service","cgroup_id":8,
            "leader_pid":null,"leader_start":null,"created_at":"t","created_by":null}"#;
        let s: Sandbox = serde_json::from_str(bound).unwrap();
        assert_eq!(s.leader_pid, None);
    }
}
