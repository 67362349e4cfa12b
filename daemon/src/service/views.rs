//! Read-only views for the operator's console: every registered passport with its sandboxes and
//! counters, the newest records, and a verification of the whole stored log. The console calls
//! these as the local API calls the rest of the service; nothing here decides or writes.

use super::{Attestations, Attested, Service, ServiceError};
use crate::decide;
use crate::ledger;
use serde::Serialize;
use serde_json::Value;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

/// One registered passport as the console shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentView {
    pub passport_id: String,
    pub agent_id: String,
    pub agent_name: Option<String>,
    pub issuer: String,
    pub tier: &'static str,
    /// `exp`, RFC 3339.
    pub expires_at: String,
    pub expired: bool,
    pub revoked: bool,
    pub permissions: Vec<String>,
    /// Live sandboxes bound to this passport.
    pub sandboxes: Vec<SandboxSummary>,
    /// Spend against each limit, with the windows' reset times, and the rate counters.
    pub state: Option<decide::StateView>,
    /// Why `state` is absent (unreadable counters: the passport's requests are blocked).
    pub state_error: Option<String>,
}

/// A sandbox in an [`AgentView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SandboxSummary {
    pub id: String,
    pub cgroup: String,
    pub leader_pid: Option<i32>,
    pub created_at: String,
}

/// Every registered passport (at most `limit`, ordered by agent id then passport id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentList {
    pub agents: Vec<AgentView>,
    /// Passports left out by the limit.
    pub omitted: usize,
}

json_at_the_edge!(AgentView, AgentList);

/// What "verify now" found: the ledger's own report, in the words `sluice audit verify` uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogVerification {
    pub ok: bool,
    pub checkpoint_size: Option<u64>,
    pub checkpoint_root: Option<String>,
    pub records_checked: usize,
    pub chains_checked: usize,
    /// Each problem as one sentence (at most 100; `problems_total` counts them all).
    pub problems: Vec<String>,
    pub problems_total: usize,
    /// RFC 3339, when the verification finished.
    pub verified_at: String,
}

json_at_the_edge!(LogVerification);

/// The latest signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointView {
    pub origin: String,
    pub size: u64,
    /// Base64, as in the note.
    pub root: String,
    /// The whole signed note.
    pub note: String,
}

json_at_the_edge!(CheckpointView);

const MAX_PROBLEMS_SHOWN: usize = 100;

impl Service {
    /// Every registered passport with its live sandboxes and counters.
    pub fn agents(&self, limit: usize) -> Result<AgentList, ServiceError> {
        let mut passports: Vec<_> =
            self.passports.read().map_err(|_| ServiceError::LockPoisoned("passports"))?.values().cloned().collect();
        passports.sort_by(|a, b| {
            let (a, b) = (&a.passport.claims, &b.passport.claims);
            a.agent_id.cmp(&b.agent_id).then_with(|| a.id.as_str().cmp(b.id.as_str()))
        });
        let omitted = passports.len().saturating_sub(limit);
        passports.truncate(limit);
        let sandboxes: Vec<super::Sandbox> =
            self.sandboxes.read().map_err(|_| ServiceError::LockPoisoned("sandboxes"))?.values().cloned().collect();
        let now = crate::passport::now();
        let mut agents = Vec::with_capacity(passports.len());
        for cp in passports {
            let claims = &cp.passport.claims;
            let id = claims.id.to_string();
            let (state, state_error) = match self.state(&id) {
                Ok(s) => (Some(s.view), None),
                Err(e) => (None, Some(e.to_string())),
            };
            let mut own: Vec<SandboxSummary> = sandboxes
                .iter()
                .filter(|s| s.passport_id == id)
                .map(|s| SandboxSummary {
                    id: s.id.clone(),
                    cgroup: s.cgroup.display().to_string(),
                    leader_pid: s.leader_pid,
                    created_at: s.created_at.clone(),
                })
                .collect();
            own.sort_by(|a, b| a.id.cmp(&b.id));
            agents.push(AgentView {
                passport_id: id.clone(),
                agent_id: claims.agent_id.clone(),
                agent_name: claims.agent_name.clone(),
                issuer: claims.issuer.to_string(),
                tier: claims.trust_tier.as_str(),
                expires_at: chrono::DateTime::from_timestamp(claims.expires_at, 0)
                    .map(super::drafts::time)
                    .unwrap_or_else(|| claims.expires_at.to_string()),
                expired: claims.expires_at <= now,
                revoked: self.is_revoked(&id),
                permissions: claims.permissions.iter().map(|p| p.as_str().to_string()).collect(),
                sandboxes: own,
                state,
                state_error,
            });
        }
        Ok(AgentList { agents, omitted })
    }

    /// The newest `limit` records of the whole log, oldest first (`truncated` when older ones
    /// exist).
    pub fn recent_records(&self, limit: usize) -> Result<Attestations, ServiceError> {
        let snap = self.ledger.snapshot()?;
        let size = snap.size();
        let first = size.saturating_sub(limit as u64);
        let mut records = Vec::with_capacity(limit.min(size as usize));
        for index in first..size {
            let Some(bytes) = snap.record(index)? else { continue };
            let Ok(record) = serde_json::from_slice::<Value>(&bytes) else { continue };
            records.push(Attested { index, record });
        }
        Ok(Attestations { records, truncated: first > 0 })
    }

    /// The latest signed checkpoint, if the log has one.
    pub fn checkpoint(&self) -> Result<Option<CheckpointView>, ServiceError> {
        use base64::Engine;
        Ok(self.ledger.latest_checkpoint()?.map(|cp| CheckpointView {
            origin: cp.checkpoint.origin.clone(),
            size: cp.checkpoint.size,
            root: base64::engine::general_purpose::STANDARD.encode(cp.checkpoint.root),
            note: cp.note,
        }))
    }

    /// Verifies the whole stored log as an auditor would: a full export with a fresh signed
    /// checkpoint, streamed to an unlinked scratch file in `scratch_dir` (the log is never held
    /// in memory), then `ledger::verify` with the host's public key. Runs on a blocking thread.
    pub async fn verify_log(&self, scratch_dir: &Path) -> Result<LogVerification, ServiceError> {
        let stream = self.export(None, None, None).await?;
        let host = self.ledger.host_public_key();
        let scratch = scratch_dir.join(format!(".console-verify-{}.json", std::process::id()));
        let report = tokio::task::spawn_blocking(move || -> Result<ledger::verify::VerifyReport, String> {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode_0600()
                .open(&scratch)
                .map_err(|e| format!("{}: {e}", scratch.display()))?;
            // Unlinked at once: the scratch file disappears with the descriptor, even on a crash.
            let _ = std::fs::remove_file(&scratch);
            let mut w = std::io::BufWriter::new(&mut file);
            stream.write_to(&mut w).map_err(|e| e.to_string())?;
            w.flush().map_err(|e| e.to_string())?;
            drop(w);
            file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
            Ok(ledger::verify::verify_reader(std::io::BufReader::new(file), &host, None))
        })
        .await
        .map_err(|e| ServiceError::invalid("verify", format!("the verification task failed: {e}")))?
        .map_err(|e| ServiceError::invalid("verify", format!("writing the log's export for verification: {e}")))?;
        Ok(LogVerification {
            ok: report.is_ok(),
            checkpoint_size: report.checkpoint_size,
            checkpoint_root: report.checkpoint_root.clone(),
            records_checked: report.records_checked,
            chains_checked: report.chains_checked,
            problems: report.problems.iter().take(MAX_PROBLEMS_SHOWN).map(ToString::to_string).collect(),
            problems_total: report.problems.len(),
            verified_at: super::drafts::time(chrono::Utc::now()),
        })
    }
}

/// `OpenOptions` with mode 0600 (the export holds every record).
trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600).custom_flags(libc::O_NOFOLLOW)
    }
}

#[cfg(test)]
mod tests {
    use crate::service::testkit;

    #[tokio::test]
    async fn the_console_views_show_a_registered_passport_the_newest_records_and_a_verified_log() {
        let kit = testkit::fixture().await;
        testkit::allow(&kit, 1500).await;
        let list = kit.service.agents(10).unwrap();
        assert_eq!(list.agents.len(), 1, "{list:?}");
        let a = &list.agents[0];
        assert_eq!(a.passport_id, kit.passport);
        assert_eq!(a.state.as_ref().map(|s| s.window_cost_millicents), Some(1500), "{a:?}");
        assert!(!a.revoked && !a.expired);
        assert!(a.state.is_some(), "{a:?}");
        assert_eq!(kit.service.agents(0).unwrap().omitted, 1);

        let size = kit.service.ledger().size();
        let recent = kit.service.recent_records(2).unwrap();
        assert_eq!(recent.records.len(), 2);
        assert_eq!(recent.records[1].index, size - 1);
        assert_eq!(recent.truncated, size > 2);

        let dir = tempfile::tempdir().unwrap();
        let v = kit.service.verify_log(dir.path()).await.unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!(v.records_checked as u64, v.checkpoint_size.unwrap());
        assert!(v.records_checked as u64 >= size);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the scratch export is left behind");
        let cp = kit.service.checkpoint().unwrap().expect("a checkpoint after the export");
        assert!(cp.size >= size && cp.note.contains(&cp.root), "{cp:?}");
    }
}
