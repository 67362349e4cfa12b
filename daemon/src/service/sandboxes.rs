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

use super::records;
use super::{now, Service, ServiceError};
use crate::api::peer::Peer;
use crate::decide::CompiledPassport;
use crate::kernel::Cgroup;
use crate::ledger::{Draft, Txn};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

/// A live sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sandbox {
    pub id: String,
    pub passport_id: String,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    /// The process whose exit ends the sandbox (`sluice run`), and its start time in clock ticks
    /// since boot, so a recycled pid is never mistaken for it after a daemon restart.
    pub leader_pid: i32,
    pub leader_start: u64,
    pub created_at: String,
    pub created_by: Value,
}

/// `pidfd_open(2)`: a handle on exactly this process, immune to pid reuse.
fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain syscall with integer arguments; the returned fd is owned by us.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Field 22 of `/proc/PID/stat` (start time), and the real uid from `/proc/PID/status`.
fn process_identity(pid: i32) -> Option<(u64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    let start = after.split_whitespace().nth(19)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()?;
    Some((start, uid))
}

impl Service {
    /// The passport bound to the sandbox whose cgroup id this is.
    pub fn passport_for_cgroup(&self, cgroup_id: u64) -> Option<Arc<CompiledPassport>> {
        let passport_id = self.sandboxes.read().ok()?.get(&cgroup_id).map(|s| s.passport_id.clone())?;
        self.passport(&passport_id)
    }

    /// `GET /v1/sandboxes`.
    pub fn sandboxes(&self) -> Result<Value, ServiceError> {
        let list: Vec<Sandbox> = self.sandboxes.read().map(|m| m.values().cloned().collect()).unwrap_or_default();
        Ok(json!({"sandboxes": list}))
    }

    /// `POST /v1/sandboxes`: creates a sandbox for `passport_id` and moves the caller into it.
    pub async fn create_sandbox(&self, passport_id: &str, peer: &Peer) -> Result<Value, ServiceError> {
        let agents = self.config.agents.clone().ok_or_else(|| {
            ServiceError::Invalid(
                "this daemon runs in passport-only mode ([sandbox] redirect = false): it cannot sandbox agents".into(),
            )
        })?;
        let cp = self
            .passport(passport_id)
            .ok_or_else(|| ServiceError::NotFound(format!("passport {passport_id} is not registered")))?;
        if self.is_revoked(passport_id) {
            return Err(ServiceError::Passport(format!("passport {passport_id} is revoked")));
        }
        if cp.passport.claims.expires_at <= crate::passport::now() {
            return Err(ServiceError::Passport(format!("passport {passport_id} has expired")));
        }
        let (leader_start, uid) = process_identity(peer.pid)
            .ok_or_else(|| ServiceError::Invalid(format!("the calling process {} is gone", peer.pid)))?;
        if uid != peer.uid {
            return Err(ServiceError::Invalid("the calling process changed identity".into()));
        }
        let pidfd =
            pidfd_open(peer.pid).map_err(|e| ServiceError::Invalid(format!("pidfd_open({}): {e}", peer.pid)))?;
        let suffix: [u8; 8] = rand::random();
        let name = format!("run-{}", suffix.iter().map(|b| format!("{b:02x}")).collect::<String>());
        let cgroup = agents.create_child(&name).map_err(|e| ServiceError::Store(e.to_string()))?;
        let sandbox = Sandbox {
            id: name,
            passport_id: passport_id.to_string(),
            cgroup: cgroup.path().to_path_buf(),
            cgroup_id: cgroup.id(),
            leader_pid: peer.pid,
            leader_start,
            created_at: records::time(now()),
            created_by: peer.to_json(),
        };
        // Durable before anything runs inside it.
        if let Err(e) = self.record_sandbox(&cp, &sandbox, true, "created").await {
            let _ = cgroup.remove();
            return Err(e);
        }
        if let Err(e) = cgroup.add_pid(peer.pid as u32) {
            self.end_sandbox(&cp, sandbox, cgroup, "join_failed").await;
            return Err(ServiceError::Invalid(format!("cannot move the caller into its sandbox: {e}")));
        }
        if let Ok(mut m) = self.sandboxes.write() {
            m.insert(sandbox.cgroup_id, sandbox.clone());
        }
        tracing::info!(sandbox = %sandbox.id, passport_id, pid = peer.pid, cgroup_id = sandbox.cgroup_id, "sandbox created");
        self.watch_leader(pidfd, sandbox.clone(), cgroup);
        Ok(json!({
            "sandbox_id": sandbox.id, "passport_id": passport_id, "cgroup": sandbox.cgroup,
            "cgroup_id": sandbox.cgroup_id, "ca_bundle": self.config.ca_bundle,
        }))
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
        let value = serde_json::to_vec(sandbox).map_err(|e| ServiceError::Store(e.to_string()))?;
        let mut body =
            records::base(if alive { "sandbox_created" } else { "sandbox_removed" }, Some(&cp.passport.claims), now());
        body.insert("sandbox_id".into(), sandbox.id.clone().into());
        body.insert("cgroup_id".into(), sandbox.cgroup_id.into());
        body.insert("leader_pid".into(), sandbox.leader_pid.into());
        body.insert("by".into(), sandbox.created_by.clone());
        body.insert("why".into(), what.into());
        let chain = cp.passport.claims.id.to_string();
        self.ledger
            .transact(move |txn: &mut Txn<'_>| {
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
            // SAFETY: the AsyncFd takes ownership of the OwnedFd, which stays open and refers to the
            // same pidfd until the AsyncFd is dropped.
            let registered =
                unsafe { tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) };
            match registered {
                Ok(fd) => {
                    // A pidfd becomes readable when the process exits.
                    let _ = fd.readable().await;
                }
                Err(e) => tracing::error!(error = %e, "cannot watch a sandbox's leader; ending the sandbox now"),
            }
            let Some(cp) = service.passport(&sandbox.passport_id) else { return };
            service.end_sandbox(&cp, sandbox, cgroup, "leader_exited").await;
        });
    }

    /// At start: sandboxes whose leader still runs are watched again; the others are removed.
    pub(super) async fn recover_sandboxes(&self) -> Result<(), ServiceError> {
        for (_, bytes) in self.ledger.state_scan("sandbox/")? {
            let Ok(sandbox) = serde_json::from_slice::<Sandbox>(&bytes) else { continue };
            let Some(cp) = self.passport(&sandbox.passport_id) else { continue };
            let cgroup = Cgroup::open(&sandbox.cgroup).ok().filter(|c| c.id() == sandbox.cgroup_id);
            let leader = process_identity(sandbox.leader_pid)
                .filter(|(start, _)| *start == sandbox.leader_start)
                .and_then(|_| pidfd_open(sandbox.leader_pid).ok());
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
