//! Fleet checkpoints: every host publishes the checkpoints its log signs to Redis, so the fleet,
//! its operators and auditors hold copies a host cannot take back. A host that later shows an
//! auditor another history (a store restored from an old copy, records rewritten and re-signed
//! with the same key) disagrees with what it published (`sluice audit verify --fleet`).
//!
//! # Publishing
//!
//! [`Publisher`] is a background task: once a second it reads the ledger's latest checkpoint
//! (never the writer's path: a decision never waits on it or on Redis) and, when it is new,
//! publishes it; at shutdown it publishes the final one. While Redis is down the checkpoints
//! queue up (at most [`BACKLOG`]; beyond that every other one is dropped, the newest always kept)
//! and go out together when it returns. A failure is logged once per outage, not per checkpoint.
//!
//! Before its first publication the task compares the log with the newest checkpoint the host
//! published before: a log that does not extend it (a state directory restored from an old copy,
//! a rewritten history) is logged as an error at once, rather than found at the next audit.
//!
//! One Lua script makes each publication atomic: it registers the host's key on first use and
//! refuses (without writing anything) when `host_id` is already registered with another key, so
//! a host never overwrites another host's checkpoints or key.
//!
//! # Key layout (besides [`super::Keys`]; `P` is `[fleet] prefix`)
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:checkpoint-keys` | hash | field `<host>`: the host key (C2SP vkey) first registered for that `host_id` |
//! | `P:checkpoints:<host>` | sorted set | score: tree size; member: an [`Entry`]; the last [`RECENT_KEPT`] |
//! | `P:checkpoints-hourly:<host>` | sorted set | the first entry published in each UTC hour; the last [`HOURLY_KEPT`] (90 days) |
//! | `P:checkpoint-hour:<host>` | string | the UTC hour of the last hourly entry |
//! | `P:checkpoint:<host>` | string | the latest entry |
//!
//! # Reading
//!
//! Redis is trusted with nothing: readers verify every entry under the key registered for its
//! host (and, for an audit, only under the key the auditor holds). An entry that does not verify
//! is reported and never believed; anyone with write access to Redis can add entries or delete
//! them, so an auditor who needs a record that cannot be taken back keeps a dump
//! (`sluice fleet status --checkpoints-out FILE`).

use super::{FleetError, Keys, RedisConn};
use crate::ledger::checkpoint::{self, MAX_NOTE_BYTES};
use crate::ledger::hex;
use crate::ledger::seen::SeenNote;
use crate::ledger::{Ledger, SignedCheckpoint};
use chrono::{DateTime, Utc};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Entries kept per host in `P:checkpoints:<host>` (the most recent by tree size).
pub const RECENT_KEPT: usize = 1024;
/// Hourly entries kept per host: 90 days.
pub const HOURLY_KEPT: usize = 24 * 90;
/// How often the publisher looks for a new checkpoint.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// Checkpoints held while Redis is down.
pub const BACKLOG: usize = 256;
/// Bound on one entry as read from Redis (a note is at most a few hundred bytes).
pub const MAX_ENTRY_BYTES: usize = MAX_NOTE_BYTES + 1024;
/// Bound on the hosts a reader lists.
pub const MAX_HOSTS: usize = 10_000;
/// How long the final publication at shutdown may take.
pub const FINAL_PUBLISH: Duration = Duration::from_secs(2);
/// The format of a dump of the fleet's checkpoints.
pub const DUMP_FORMAT: &str = "sluice-fleet-checkpoints/v1";

/// Keys of the checkpoint layout (module docs).
pub fn registry_key(keys: &Keys) -> String {
    format!("{}:checkpoint-keys", keys.prefix())
}
pub fn recent_key(keys: &Keys, host: &str) -> String {
    format!("{}:checkpoints:{host}", keys.prefix())
}
pub fn hourly_key(keys: &Keys, host: &str) -> String {
    format!("{}:checkpoints-hourly:{host}", keys.prefix())
}
pub fn hour_key(keys: &Keys, host: &str) -> String {
    format!("{}:checkpoint-hour:{host}", keys.prefix())
}

/// One published checkpoint: the signed note as the log signed it, the key it claims, and when
/// it was published (the publisher's clock; not signed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub note: String,
    pub vkey: String,
    pub published_at: String,
}

impl Entry {
    /// Reads an entry as stored in Redis; bounded.
    pub fn parse(text: &str) -> Result<Entry, String> {
        if text.len() > MAX_ENTRY_BYTES {
            return Err(format!("entry is larger than {MAX_ENTRY_BYTES} bytes"));
        }
        serde_json::from_str(text).map_err(|e| format!("entry is not a checkpoint entry: {e}"))
    }

    fn new(signed: &SignedCheckpoint, vkey: &str, now: DateTime<Utc>) -> Entry {
        Entry {
            note: signed.note.clone(),
            vkey: vkey.to_string(),
            published_at: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }
    }

    fn text(&self) -> String {
        // Serialising three strings cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Publishes atomically (module docs). KEYS: registry, recent, hourly, hour marker, latest.
/// ARGV: host, vkey, recent kept, hourly kept, this hour, then (size, entry) pairs in order of
/// size. Answers `{"ok"}` or `{"conflict", <registered vkey>}`.
const PUBLISH_LUA: &str = r#"
local registered = redis.call('HGET', KEYS[1], ARGV[1])
if registered and registered ~= ARGV[2] then
  return {'conflict', registered}
end
if not registered then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
local newest = nil
for i = 6, #ARGV, 2 do
  redis.call('ZADD', KEYS[2], ARGV[i], ARGV[i + 1])
  newest = ARGV[i + 1]
end
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[3]) + 1))
local top = redis.call('ZRANGE', KEYS[2], -1, -1)
if top[1] then
  redis.call('SET', KEYS[5], top[1])
end
if newest and redis.call('GET', KEYS[4]) ~= ARGV[5] then
  redis.call('ZADD', KEYS[3], ARGV[#ARGV - 1], newest)
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[4]) + 1))
  redis.call('SET', KEYS[4], ARGV[5])
end
return {'ok'}
"#;

/// Why a publication did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Redis(#[from] FleetError),
    #[error(
        "fleet host_id {host:?} is registered in Redis with another host key ({registered}); this host's key is \
         {ours}. Its checkpoints are not published: give this host its own [fleet] host_id, or, if the old host \
         is gone for good, remove its registration (HDEL {registry} {host})"
    )]
    KeyConflict { host: String, registered: String, ours: String, registry: String },
}

/// Publishes `entries` (in order of tree size) for `host`.
pub async fn publish(conn: &RedisConn, keys: &Keys, host: &str, entries: &[Entry]) -> Result<(), PublishError> {
    if entries.is_empty() {
        return Ok(());
    }
    let vkey = entries.first().map(|e| e.vkey.clone()).unwrap_or_default();
    let hour = Utc::now().format("%Y-%m-%dT%H").to_string();
    let script = redis::Script::new(PUBLISH_LUA);
    let mut call = script.prepare_invoke();
    call.key(registry_key(keys))
        .key(recent_key(keys, host))
        .key(hourly_key(keys, host))
        .key(hour_key(keys, host))
        .key(keys.checkpoint(host))
        .arg(host)
        .arg(&vkey)
        .arg(RECENT_KEPT)
        .arg(HOURLY_KEPT)
        .arg(&hour);
    for e in entries {
        let size = checkpoint::parse_unverified(&e.note).map(|c| c.size).unwrap_or(0);
        call.arg(size).arg(e.text());
    }
    let answer: Vec<String> = conn.invoke(&call).await?;
    match answer.as_slice() {
        [ok] if ok == "ok" => Ok(()),
        [c, registered] if c == "conflict" => Err(PublishError::KeyConflict {
            host: host.to_string(),
            registered: registered.chars().take(200).collect(),
            ours: vkey,
            registry: registry_key(keys),
        }),
        other => Err(FleetError::Protocol {
            redis: conn.url().to_string(),
            problem: format!("the checkpoint script answered {} value(s), not ok or conflict", other.len()),
        }
        .into()),
    }
}

/// Checkpoints waiting to be published, in order of size: at most [`BACKLOG`]; when full, every
/// other older one is dropped (the spread over time is kept, and the newest always).
#[derive(Debug, Default)]
pub struct Backlog {
    pending: Vec<Entry>,
    /// The size of the newest checkpoint queued or published.
    last_size: Option<u64>,
}

impl Backlog {
    /// Queues `signed` unless it is not newer than the last one queued.
    pub fn offer(&mut self, signed: &SignedCheckpoint, vkey: &str, now: DateTime<Utc>) -> bool {
        let size = signed.checkpoint.size;
        if self.last_size.is_some_and(|last| size <= last) {
            return false;
        }
        self.last_size = Some(size);
        self.pending.push(Entry::new(signed, vkey, now));
        if self.pending.len() > BACKLOG {
            let newest = self.pending.pop();
            let mut i = 0usize;
            self.pending.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            self.pending.extend(newest);
        }
        true
    }

    pub fn pending(&self) -> &[Entry] {
        &self.pending
    }

    pub fn clear(&mut self) {
        self.pending.clear();
    }
}

/// The background task that publishes this host's checkpoints (module docs).
pub struct Publisher {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    pub fn start(conn: Arc<RedisConn>, keys: Keys, host: String, ledger: Ledger) -> Publisher {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let vkey = checkpoint::vkey(&ledger.host_public_key());
            let mut state = PublishState { backlog: Backlog::default(), failing: None, compared: false };
            let mut every = tokio::time::interval(PUBLISH_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = stopped.changed() => break,
                }
                state.round(&conn, &keys, &host, &ledger, &vkey).await;
            }
            // The ledger has signed its final checkpoint: publish it if Redis answers in time.
            let _ = tokio::time::timeout(FINAL_PUBLISH, state.round(&conn, &keys, &host, &ledger, &vkey)).await;
            if !state.backlog.pending().is_empty() {
                tracing::warn!(
                    redis = %conn.url(),
                    unpublished = state.backlog.pending().len(),
                    "fleet checkpoints not published at shutdown; the next start publishes the latest"
                );
            }
        });
        Publisher { stop, task }
    }

    /// Publishes the final checkpoint and ends the task. Call after the ledger shut down (it
    /// signs its final checkpoint then); bounded by [`FINAL_PUBLISH`].
    pub async fn finish(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(FINAL_PUBLISH + Duration::from_secs(1), self.task).await;
    }
}

struct PublishState {
    backlog: Backlog,
    /// Since when publishing fails, and why (logged once per outage).
    failing: Option<String>,
    /// Whether this log was compared with what the host published before (once, before its
    /// first publication).
    compared: bool,
}

impl PublishState {
    async fn round(&mut self, conn: &RedisConn, keys: &Keys, host: &str, ledger: &Ledger, vkey: &str) {
        let reader = ledger.clone();
        let latest = match tokio::task::spawn_blocking(move || reader.latest_checkpoint()).await {
            Ok(Ok(latest)) => latest,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "fleet checkpoints: reading the latest checkpoint failed");
                None
            }
            Err(_) => None,
        };
        if let Some(latest) = &latest {
            if !self.compared {
                match compare_with_published(conn, keys, host, ledger, latest).await {
                    Ok(None) => self.compared = true,
                    Ok(Some(problem)) => {
                        tracing::error!("{problem}");
                        self.compared = true;
                    }
                    // Redis down: compared once it answers, before anything is published.
                    Err(_) => return,
                }
            }
            self.backlog.offer(latest, vkey, Utc::now());
        }
        if self.backlog.pending().is_empty() {
            return;
        }
        match publish(conn, keys, host, self.backlog.pending()).await {
            Ok(()) => {
                if let Some(since) = self.failing.take() {
                    tracing::info!(
                        redis = %conn.url(),
                        published = self.backlog.pending().len(),
                        failing_since = %since,
                        "fleet checkpoints published again, with the backlog"
                    );
                }
                self.backlog.clear();
            }
            Err(e) => {
                if self.failing.is_none() {
                    let conflict = matches!(e, PublishError::KeyConflict { .. });
                    if conflict {
                        tracing::error!("{e}");
                    } else {
                        tracing::warn!(error = %e, "fleet checkpoints cannot be published; they are kept and retried");
                    }
                    self.failing = Some(Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                }
            }
        }
    }
}

/// Compares this log with the newest checkpoint this host published before (under its own key):
/// a published checkpoint this log does not extend means the state was restored from an old
/// copy or rewritten, which every audit against the fleet will show; the operator hears it at
/// start. `Some(problem)` to log, `None` when the log extends it (or nothing was published).
async fn compare_with_published(
    conn: &RedisConn,
    keys: &Keys,
    host: &str,
    ledger: &Ledger,
    latest: &SignedCheckpoint,
) -> Result<Option<String>, FleetError> {
    let newest: Vec<String> = conn.query(redis::cmd("ZRANGE").arg(recent_key(keys, host)).arg(-1).arg(-1)).await?;
    let key = ledger.host_public_key();
    let Some(published) = newest
        .first()
        .and_then(|m| Entry::parse(m).ok())
        .and_then(|e| checkpoint::open(&e.note, &key).ok())
        .map(|s| s.checkpoint)
    else {
        return Ok(None);
    };
    let cur = &latest.checkpoint;
    let rewritten = || {
        format!(
            "this host's log does not extend the checkpoint it published to the fleet (size {}, root {}): its state was restored from an old copy or its history rewritten; `sluice audit verify --fleet` will report it",
            published.size,
            hex::encode(&published.root)
        )
    };
    if published.size > cur.size {
        return Ok(Some(format!(
            "this host published a checkpoint of {} records to the fleet but its log holds {}: its state was restored from an old copy (rolled back); `sluice audit verify --fleet` will report it",
            published.size, cur.size
        )));
    }
    let (old, new) = (published.size, cur.size);
    let reader = ledger.clone();
    let proof = match tokio::task::spawn_blocking(move || reader.consistency_proof(old, new)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Ok(Some(format!("{} (no consistency proof: {e})", rewritten()))),
        Err(_) => return Ok(None),
    };
    match crate::ledger::merkle::verify_consistency(old, new, &published.root, &cur.root, &proof) {
        Ok(()) => Ok(None),
        Err(_) => Ok(Some(rewritten())),
    }
}

/// One host's checkpoints as read from Redis or a dump: nothing in it is trusted yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostCheckpoints {
    pub host_id: String,
    /// The key registered for this host_id, as stored.
    pub vkey: Option<String>,
    /// Entries of the recent and hourly sets, in order of size, each once.
    pub entries: Vec<Entry>,
    /// Members of the sets that are not entries (reported, never used).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreadable: Vec<String>,
}

/// A dump of the fleet's checkpoints, for offline audits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dump {
    pub format: String,
    /// Where it was read from (no secret in it) and when.
    pub redis: String,
    pub prefix: String,
    pub taken_at: String,
    pub hosts: Vec<HostCheckpoints>,
}

/// Reads every host's checkpoints (hosts registered with a key, and hosts that only appear in
/// the fleet's host list), bounded by [`MAX_HOSTS`] and the kept counts.
pub async fn read_fleet(conn: &RedisConn, keys: &Keys) -> Result<Vec<HostCheckpoints>, FleetError> {
    let registered: Vec<(String, String)> = conn.query(redis::cmd("HGETALL").arg(registry_key(keys))).await?;
    let contacts: Vec<(String, String)> = conn.query(redis::cmd("HGETALL").arg(keys.hosts())).await?;
    let mut hosts: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (host, _) in contacts {
        hosts.entry(host).or_insert(None);
    }
    for (host, vkey) in registered {
        hosts.insert(host, Some(vkey));
    }
    if hosts.len() > MAX_HOSTS {
        return Err(FleetError::Protocol {
            redis: conn.url().to_string(),
            problem: format!("more than {MAX_HOSTS} hosts under prefix {:?}", keys.prefix()),
        });
    }
    let mut out = Vec::with_capacity(hosts.len());
    for (host, vkey) in hosts {
        let mut members: Vec<String> = Vec::new();
        for (key, kept) in [(recent_key(keys, &host), RECENT_KEPT), (hourly_key(keys, &host), HOURLY_KEPT)] {
            // The newest `kept` (a writer may have added more; they are not read).
            let last = -(kept as isize);
            let got: Vec<String> = conn.query(redis::cmd("ZRANGE").arg(&key).arg(last).arg(-1)).await?;
            members.extend(got);
        }
        out.push(host_checkpoints(host, vkey, members));
    }
    Ok(out)
}

fn host_checkpoints(host_id: String, vkey: Option<String>, members: Vec<String>) -> HostCheckpoints {
    let mut entries: Vec<(u64, Entry)> = Vec::new();
    let mut unreadable = Vec::new();
    for m in members {
        match Entry::parse(&m) {
            Ok(e) => {
                let size = checkpoint::parse_unverified(&e.note).map(|c| c.size).unwrap_or(0);
                if !entries.iter().any(|(_, x)| x.note == e.note) {
                    entries.push((size, e));
                }
            }
            Err(reason) => unreadable.push(reason),
        }
    }
    entries.sort_by_key(|(size, _)| *size);
    HostCheckpoints { host_id, vkey, entries: entries.into_iter().map(|(_, e)| e).collect(), unreadable }
}

/// What one host's published checkpoints show, judged under its registered key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostView {
    pub host_id: String,
    pub vkey: Option<String>,
    /// Why the registered key cannot be used, if it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_problem: Option<String>,
    /// The newest entry that verifies.
    pub latest: Option<Latest>,
    /// Entries that verify.
    pub verified: usize,
    /// Entries that do not, each with why (never believed).
    pub refused: Vec<Refused>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Latest {
    pub size: u64,
    pub root: String,
    pub published_at: String,
    pub age_secs: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refused {
    /// What the entry claims, unverified.
    pub size: Option<u64>,
    pub published_at: Option<String>,
    pub reason: String,
}

/// Judges one host's entries: each must carry the registered key and verify under it.
pub fn judge(h: &HostCheckpoints, now: DateTime<Utc>) -> HostView {
    let key = match h.vkey.as_deref().map(checkpoint::parse_vkey) {
        None => Err("no key registered for this host_id (it has published no checkpoint)".to_string()),
        Some(Err(e)) => Err(format!("the registered key is unusable: {e}")),
        Some(Ok(k)) => Ok(k),
    };
    let mut view = HostView {
        host_id: h.host_id.clone(),
        vkey: h.vkey.clone(),
        key_problem: key.as_ref().err().cloned(),
        latest: None,
        verified: 0,
        refused: h.unreadable.iter().map(|r| Refused { size: None, published_at: None, reason: r.clone() }).collect(),
    };
    for e in &h.entries {
        let claimed = checkpoint::parse_unverified(&e.note).ok();
        let verdict = match &key {
            Err(why) => Err(why.clone()),
            Ok(_) if Some(&e.vkey) != h.vkey.as_ref() => {
                Err("published with another key than the one registered for this host_id".to_string())
            }
            Ok(k) => checkpoint::open(&e.note, k).map_err(|err| err.to_string()),
        };
        match verdict {
            Ok(signed) => {
                view.verified += 1;
                let newer = view.latest.as_ref().is_none_or(|l| signed.checkpoint.size >= l.size);
                if newer {
                    let age = DateTime::parse_from_rfc3339(&e.published_at)
                        .ok()
                        .map(|t| (now - t.with_timezone(&Utc)).num_seconds());
                    view.latest = Some(Latest {
                        size: signed.checkpoint.size,
                        root: hex::encode(&signed.checkpoint.root),
                        published_at: e.published_at.clone(),
                        age_secs: age,
                    });
                }
            }
            Err(reason) => view.refused.push(Refused {
                size: claimed.map(|c| c.size),
                published_at: Some(e.published_at.clone()),
                reason,
            }),
        }
    }
    view
}

/// The notes the fleet holds for the log of `host` (by key, whatever the host_id), for
/// [`crate::ledger::seen::check_reader`]; and the host_ids they came from. Entries of those
/// hosts that do not verify are passed on too: the check reports them as untrusted.
pub fn seen_for(hosts: &[HostCheckpoints], host: &VerifyingKey, source: &str) -> (Vec<SeenNote>, Vec<String>) {
    let mut notes = Vec::new();
    let mut ids = Vec::new();
    for h in hosts {
        let ours = h.vkey.as_deref().and_then(|v| checkpoint::parse_vkey(v).ok()).is_some_and(|k| &k == host);
        if !ours {
            continue;
        }
        ids.push(h.host_id.clone());
        for e in &h.entries {
            notes.push(SeenNote {
                source: format!("{source} host {} published {}", h.host_id, e.published_at),
                note: e.note.clone(),
            });
        }
        for r in &h.unreadable {
            tracing::debug!(host = %h.host_id, reason = %r, "unreadable fleet checkpoint entry");
        }
    }
    (notes, ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Checkpoint, HostKey};

    fn signed(key: &HostKey, size: u64) -> SignedCheckpoint {
        let root = crate::ledger::merkle::leaf_hash(&size.to_be_bytes());
        checkpoint::sign(Checkpoint { origin: key.origin().to_string(), size, root }, key)
    }

    #[test]
    fn backlog_keeps_the_newest_and_a_spread_when_full() {
        let key = HostKey::generate();
        let vkey = checkpoint::vkey(&key.verifying_key());
        let mut b = Backlog::default();
        assert!(b.offer(&signed(&key, 5), &vkey, Utc::now()));
        assert!(!b.offer(&signed(&key, 5), &vkey, Utc::now()), "the same size twice is one checkpoint");
        assert!(!b.offer(&signed(&key, 3), &vkey, Utc::now()), "an older checkpoint is not queued");
        for size in 6..2000u64 {
            b.offer(&signed(&key, size), &vkey, Utc::now());
            assert!(b.pending().len() <= BACKLOG);
        }
        let sizes: Vec<u64> = b.pending().iter().map(|e| checkpoint::parse_unverified(&e.note).unwrap().size).collect();
        assert_eq!(sizes.last(), Some(&1999), "the newest is always kept");
        assert!(sizes.first().is_some_and(|&s| s < 1000), "older ones are thinned, not all dropped: {sizes:?}");
        assert!(sizes.windows(2).all(|w| w[0] < w[1]));
        b.clear();
        assert!(b.pending().is_empty());
        assert!(!b.offer(&signed(&key, 1999), &vkey, Utc::now()), "published sizes are not queued again");
    }

    #[test]
    fn judging_believes_only_entries_that_verify_under_the_registered_key() {
        let key = HostKey::generate();
        let other = HostKey::generate();
        let vkey = checkpoint::vkey(&key.verifying_key());
        let now = Utc::now();
        let good = |size| Entry::new(&signed(&key, size), &vkey, now);
        let mut forged = good(40);
        forged.note = forged.note.replacen("\n40\n", "\n41\n", 1);
        let foreign = Entry::new(&signed(&other, 50), &vkey, now);
        let relabelled = Entry::new(&signed(&other, 60), &checkpoint::vkey(&other.verifying_key()), now);
        let members = vec![
            good(10).text(),
            good(30).text(),
            good(30).text(),
            forged.text(),
            foreign.text(),
            relabelled.text(),
            "not json".to_string(),
            "x".repeat(MAX_ENTRY_BYTES + 1),
        ];
        let h = host_checkpoints("web-1".into(), Some(vkey.clone()), members);
        assert_eq!(h.entries.len(), 5, "the duplicate is read once");
        assert_eq!(h.unreadable.len(), 2);
        let v = judge(&h, now);
        assert_eq!(v.verified, 2);
        assert_eq!(v.latest.as_ref().map(|l| l.size), Some(30));
        assert_eq!(v.refused.len(), 5);
        assert!(v.refused.iter().any(|r| r.size == Some(41) && r.reason.contains("does not verify")), "{v:?}");
        assert!(v.refused.iter().any(|r| r.size == Some(60) && r.reason.contains("another key")), "{v:?}");
        // No key registered: nothing is believed.
        let unkeyed = judge(&host_checkpoints("web-2".into(), None, vec![good(10).text()]), now);
        assert_eq!((unkeyed.verified, unkeyed.refused.len()), (0, 1));
        assert!(unkeyed.key_problem.is_some());
    }

    #[test]
    fn seen_for_selects_hosts_by_key_not_by_name() {
        let key = HostKey::generate();
        let other = HostKey::generate();
        let now = Utc::now();
        let ours = checkpoint::vkey(&key.verifying_key());
        let theirs = checkpoint::vkey(&other.verifying_key());
        let hosts = vec![
            host_checkpoints("a".into(), Some(ours.clone()), vec![Entry::new(&signed(&key, 3), &ours, now).text()]),
            host_checkpoints(
                "b".into(),
                Some(theirs.clone()),
                vec![Entry::new(&signed(&other, 9), &theirs, now).text()],
            ),
            // The same key under a second host_id (a host renamed): both count.
            host_checkpoints("a-old".into(), Some(ours.clone()), vec![Entry::new(&signed(&key, 2), &ours, now).text()]),
        ];
        let (notes, ids) = seen_for(&hosts, &key.verifying_key(), "redis");
        assert_eq!(ids, vec!["a".to_string(), "a-old".to_string()]);
        assert_eq!(notes.len(), 2);
        assert!(notes[0].source.contains("host a "), "{}", notes[0].source);
    }

    #[test]
    fn keys_follow_the_documented_layout() {
        let k = Keys::new("p");
        assert_eq!(registry_key(&k), "p:checkpoint-keys");
        assert_eq!(recent_key(&k, "web-1"), "p:checkpoints:web-1");
        assert_eq!(hourly_key(&k, "web-1"), "p:checkpoints-hourly:web-1");
        assert_eq!(hour_key(&k, "web-1"), "p:checkpoint-hour:web-1");
    }
}
