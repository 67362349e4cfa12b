//! Host policy reload: on SIGHUP and when a policy file changes, read the directory again; keep
//! the old policy on any error; attest every attempt (`policy_reload` host records with the
//! previous and new digests, or the errors).
//!
//! File changes are noticed by polling a cheap fingerprint of the directory (name, length,
//! modification time of each `*.toml` file) every [`POLL`]: no inotify dependency, works on any
//! filesystem, and an editor's write-then-rename is seen like any other change. A change that
//! leaves the files byte-for-byte identical (same digest) is not recorded.

use crate::policy::PolicyHandle;
use crate::service::Service;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

pub const POLL: Duration = Duration::from_secs(2);

/// What triggered a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    FileChange,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::FileChange => "file_change",
        }
    }
}

type Fingerprint = Vec<(std::ffi::OsString, u64, Option<SystemTime>)>;

fn fingerprint(dir: &Path) -> Fingerprint {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Fingerprint = rd
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .map(|e| {
            let meta = e.metadata().ok();
            (e.file_name(), meta.as_ref().map_or(0, |m| m.len()), meta.and_then(|m| m.modified().ok()))
        })
        .collect();
    out.sort();
    out
}

/// Reloads once and attests the outcome. Returns whether the new policy is in force.
pub async fn reload_once(policy: &Arc<PolicyHandle>, service: &Service, trigger: Trigger) -> bool {
    let dir = policy.dir().to_path_buf();
    // Files may be slow to read: off the runtime's worker threads.
    let outcome = match tokio::task::spawn_blocking({
        let policy = policy.clone();
        move || policy.reload()
    })
    .await
    {
        Ok(r) => r,
        Err(join) => {
            tracing::error!(error = %join, "policy reload task failed; keeping the old policy");
            return false;
        }
    };
    match outcome {
        Ok(r) => {
            if r.changed() || trigger == Trigger::Signal {
                tracing::info!(digest = %r.digest, previous = %r.previous_digest, trigger = trigger.as_str(), "host policy reloaded");
                let detail = json!({
                    "ok": true, "trigger": trigger.as_str(), "dir": dir.display().to_string(),
                    "policy_digest": r.digest, "previous_digest": r.previous_digest,
                });
                if let Err(e) = service.record_host_event("policy_reload", detail).await {
                    tracing::error!(error = %e, "could not record the policy reload");
                }
            }
            true
        }
        Err(errors) => {
            let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
            for e in &list {
                tracing::error!(error = %e, "host policy reload failed; the previous policy stays in force");
            }
            let detail = json!({
                "ok": false, "trigger": trigger.as_str(), "dir": dir.display().to_string(),
                "policy_digest": policy.current().digest(), "errors": list,
            });
            if let Err(e) = service.record_host_event("policy_reload", detail).await {
                tracing::error!(error = %e, "could not record the failed policy reload");
            }
            false
        }
    }
}

/// Runs until `stop` turns true: reloads on SIGHUP and on file changes.
pub async fn watch(policy: Arc<PolicyHandle>, service: Arc<Service>, mut stop: watch::Receiver<bool>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; policy reload only on file change");
            None
        }
    };
    let mut seen = fingerprint(policy.dir());
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let trigger = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => Trigger::Signal,
            _ = tick.tick() => {
                let now = fingerprint(policy.dir());
                if now == seen { continue; }
                seen = now;
                Trigger::FileChange
            }
        };
        if trigger == Trigger::Signal {
            seen = fingerprint(policy.dir());
        }
        reload_once(&policy, &service, trigger).await;
    }
}
