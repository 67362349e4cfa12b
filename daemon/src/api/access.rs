//! Who is calling the local API, and may they?
//!
//! Every connection is checked with `SO_PEERCRED` before a single byte of its request is read:
//! the caller must be root or in the API group, and must not be inside an agent sandbox, whatever
//! its uid: an agent must never approve its own hold, reset its own budget or register a passport
//! for itself.

use std::path::Path;

/// The caller's identity is the service's type: the service records it and must not depend on
/// the API that checks it.
pub use crate::service::Peer;

/// Why a caller was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefusal {
    #[error("the kernel did not report the caller's process")]
    NoPid,
    #[error("uid {uid} is neither root nor a member of group {group:?}")]
    NotAuthorized { uid: u32, group: String },
    #[error("the caller (pid {pid}) runs inside the agent sandbox {cgroup}; agents may not use the local API")]
    InSandbox { pid: i32, cgroup: String },
}

/// The rule the server applies to every caller.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    /// The API group's gid, if the group exists on this host.
    pub api_gid: Option<u32>,
    pub api_group: String,
    /// The agents' cgroup as it appears in `/proc/PID/cgroup` (e.g. `/sluice-agents`).
    pub agents_cgroup: String,
}

impl PeerPolicy {
    pub fn new(api_group: &str, agents_cgroup_rel: &str) -> PeerPolicy {
        let api_gid = nix::unistd::Group::from_name(api_group).ok().flatten().map(|g| g.gid.as_raw());
        PeerPolicy {
            api_gid,
            api_group: api_group.to_string(),
            agents_cgroup: format!("/{}", agents_cgroup_rel.trim_matches('/')),
        }
    }

    /// Checks a caller's credentials. `proc` is the procfs root (`/proc` outside tests).
    pub fn check(&self, uid: u32, gid: u32, pid: Option<i32>, proc: &Path) -> Result<Peer, PeerRefusal> {
        let pid = pid.filter(|p| *p > 0).ok_or(PeerRefusal::NoPid)?;
        // The sandbox check comes first and applies to root too.
        if let Some(cgroup) = cgroup_v2_path(proc, pid) {
            if is_within(&cgroup, &self.agents_cgroup) {
                return Err(PeerRefusal::InSandbox { pid, cgroup });
            }
        }
        let in_group = |g: u32| Some(g) == self.api_gid;
        let authorized = uid == 0 || in_group(gid) || supplementary_groups(proc, pid).into_iter().any(in_group);
        if !authorized {
            return Err(PeerRefusal::NotAuthorized { uid, group: self.api_group.clone() });
        }
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten().map(|u| u.name);
        Ok(Peer { uid, gid, pid, user })
    }
}

/// A root process inside an agent cgroup. It is refused like any sandboxed caller, except for
/// binding or unbinding *its own* cgroup: that is how an agent unit's `ExecStartPre=+sluice
/// sandbox bind` (which systemd runs as root, but inside the unit's cgroup) ties the unit to its
/// passport before the agent starts (and `ExecStopPost=+sluice sandbox unbind` ends it). It
/// cannot reach anything else and cannot name another cgroup. This grants root nothing it lacks
/// (root inside a cgroup can leave it anyway, which is why agents must never run as root: the
/// units give them their own user, `NoNewPrivileges` and an empty capability bounding set), and
/// a non-root agent gets nothing at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxedRoot {
    pub peer: Peer,
    /// The caller's cgroup as `/proc/PID/cgroup` shows it.
    pub cgroup: String,
}

impl PeerPolicy {
    /// The [`SandboxedRoot`] behind a refusal, if the caller is root (by `SO_PEERCRED` and, at
    /// this moment, by `/proc/PID/status`: a pid recycled by a non-root process does not pass).
    pub fn sandboxed_root(&self, refusal: &PeerRefusal, uid: u32, gid: u32, proc: &Path) -> Option<SandboxedRoot> {
        let PeerRefusal::InSandbox { pid, cgroup } = refusal else { return None };
        if uid != 0 || real_uid(proc, *pid) != Some(0) {
            return None;
        }
        // Re-read: the same process must still be in the same cgroup.
        if cgroup_v2_path(proc, *pid).as_deref() != Some(cgroup.as_str()) {
            return None;
        }
        Some(SandboxedRoot { peer: Peer { uid, gid, pid: *pid, user: Some("root".into()) }, cgroup: cgroup.clone() })
    }
}

fn real_uid(proc: &Path, pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(proc.join(pid.to_string()).join("status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()
}

/// `cgroup` is `base` or below it, on a path-component boundary.
fn is_within(cgroup: &str, base: &str) -> bool {
    cgroup == base || cgroup.strip_prefix(base).is_some_and(|rest| rest.starts_with('/'))
}

/// The process's cgroup v2 path: the `0::/path` line of `/proc/PID/cgroup`.
pub fn cgroup_v2_path(proc: &Path, pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(proc.join(pid.to_string()).join("cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_string)
}

fn supplementary_groups(proc: &Path, pid: i32) -> Vec<u32> {
    std::fs::read_to_string(proc.join(pid.to_string()).join("status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .map(|g| g.split_whitespace().filter_map(|n| n.parse().ok()).collect())
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_proc(pid: i32, cgroup: &str, groups: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(pid.to_string());
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("cgroup"), format!("12:pids:/x\n0::{cgroup}\n")).unwrap();
        std::fs::write(p.join("status"), format!("Name:\tx\nUid:\t0\t0\t0\t0\nGroups:\t{groups}\n")).unwrap();
        dir
    }

    fn policy() -> PeerPolicy {
        PeerPolicy { api_gid: Some(990), api_group: "sluice".into(), agents_cgroup: "/sluice-agents".into() }
    }

    #[test]
    fn root_and_group_members_outside_sandboxes_are_allowed() {
        let proc = fake_proc(100, "/user.slice/session-1.scope", "4 990");
        assert!(policy().check(0, 0, Some(100), proc.path()).is_ok());
        assert!(policy().check(1000, 1000, Some(100), proc.path()).is_ok(), "supplementary group");
        assert!(policy().check(1000, 990, Some(100), proc.path()).is_ok(), "primary group");
    }

    #[test]
    fn others_are_refused() {
        let proc = fake_proc(100, "/user.slice", "4 27");
        assert!(matches!(policy().check(1000, 1000, Some(100), proc.path()), Err(PeerRefusal::NotAuthorized { .. })));
        assert!(matches!(policy().check(0, 0, None, proc.path()), Err(PeerRefusal::NoPid)));
    }

    #[test]
    fn a_process_in_an_agent_sandbox_is_refused_even_as_root() {
        for cg in ["/sluice-agents", "/sluice-agents/run-1", "/sluice-agents/run-1/child"] {
            let proc = fake_proc(100, cg, "990");
            assert!(matches!(policy().check(0, 0, Some(100), proc.path()), Err(PeerRefusal::InSandbox { .. })), "{cg}");
        }
        // Root in a sandbox may only bind its own cgroup; anyone else gets nothing.
        let proc = fake_proc(100, "/sluice-agents/sluice-agent@shop.service", "");
        let refusal = policy().check(0, 0, Some(100), proc.path()).unwrap_err();
        let root = policy().sandboxed_root(&refusal, 0, 0, proc.path()).unwrap();
        assert_eq!(root.cgroup, "/sluice-agents/sluice-agent@shop.service");
        assert_eq!(policy().sandboxed_root(&refusal, 1000, 1000, proc.path()), None, "non-root caller");
        let p = proc.path().join("100/status");
        std::fs::write(&p, "Name:\tx\nUid:\t1000\t1000\t1000\t1000\n").unwrap();
        assert_eq!(policy().sandboxed_root(&refusal, 0, 0, proc.path()), None, "pid recycled by a non-root process");
        let other = PeerRefusal::NotAuthorized { uid: 0, group: "sluice".into() };
        assert_eq!(policy().sandboxed_root(&other, 0, 0, proc.path()), None);
        // A sibling whose name merely starts the same is not inside.
        let proc = fake_proc(100, "/sluice-agents-other", "");
        assert!(policy().check(0, 0, Some(100), proc.path()).is_ok());
    }
}
