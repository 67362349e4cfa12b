//! The gate's published catalogs (docs/catalogs.md): publishing a version, keeping the history,
//! the version in force, and the price lock.
//!
//! Every published version is kept in the gate's store (state `catalog/v/<version>`, the served
//! document, and `catalog/record/<version>`, the log index of its record) and is one
//! `catalog_published` record in the gate's log, both written in one ledger transaction: a
//! version exists exactly when its record does. The next version is built from the store's head
//! inside that transaction, so two publishers cannot both write "version 3".
//!
//! The running gate keeps the history in memory ([`Catalogs`]); the version in force is the
//! highest one whose `effective_at` has come, computed at each request, so a version is served
//! and charged from the second its `effective_at` arrives.

use super::config::GateConfig;
use crate::catalog::{Draft, Impact, Price, SignedCatalog, Snapshot};
use crate::ledger::canonical::Members;
use crate::ledger::record::{FIELD_KIND, FIELD_TIME, FIELD_VERSION, RECORD_VERSION};
use crate::ledger::{Ledger, TxnError};
use chrono::{DateTime, Utc};
use ed25519_dalek::SigningKey;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::{Arc, RwLock};

pub const KIND_CATALOG_PUBLISHED: &str = "catalog_published";
/// The chain of `catalog_published` records.
pub const CHAIN_CATALOG: &str = "catalog";
/// The largest draft read (`catalog.toml`).
pub const MAX_DRAFT_BYTES: usize = 1 << 20;

/// The fields of a `catalog_published` record.
pub mod field {
    pub const GATE_ID: &str = "gate_id";
    pub const CATALOG_VERSION: &str = "catalog_version";
    pub const CONTENT_HASH: &str = "content_hash";
    pub const PREV_CONTENT_HASH: &str = "prev_content_hash";
    pub const EFFECTIVE_AT: &str = "effective_at";
    pub const SUMMARY: &str = "summary";
}

/// State keys in the gate's store.
pub mod key {
    pub const HEAD: &str = "catalog/head";
    pub const VERSIONS: &str = "catalog/v/";
    pub fn version(v: u64) -> String {
        format!("catalog/v/{v:020}")
    }
    pub fn record(v: u64) -> String {
        format!("catalog/record/{v:020}")
    }
    /// The catalog version a passport's first call found in force (its price lock).
    pub fn lock(pp: &str) -> String {
        format!("catalog_lock/{pp}")
    }
}

/// One published version and the log index of its `catalog_published` record.
#[derive(Debug, Clone)]
pub struct Published {
    pub signed: SignedCatalog,
    pub record_index: u64,
}

impl Published {
    pub fn version(&self) -> u64 {
        self.signed.snapshot.version
    }
}

/// The published history, in memory, oldest first.
#[derive(Debug, Default)]
pub struct Catalogs {
    versions: RwLock<Vec<Arc<Published>>>,
}

impl Catalogs {
    /// Reads the history from the store (at start, or for a command run on a stopped gate).
    pub fn load(&self, ledger: &Ledger, key: &SigningKey) -> anyhow::Result<()> {
        let mut out = Vec::new();
        for (k, bytes) in ledger.state_scan(key::VERSIONS)? {
            let signed = SignedCatalog::parse(&bytes, &key.verifying_key())
                .map_err(|e| anyhow::anyhow!("the gate's store: {k}: the stored catalog does not verify: {e}"))?;
            let v = signed.snapshot.version;
            let index = ledger
                .state_get(&key::record(v))?
                .and_then(|b| std::str::from_utf8(&b).ok().and_then(|s| s.parse::<u64>().ok()))
                .ok_or_else(|| anyhow::anyhow!("the gate's store: catalog version {v} has no record index"))?;
            out.push(Arc::new(Published { signed, record_index: index }));
        }
        out.sort_by_key(|p| p.version());
        for (i, p) in out.iter().enumerate() {
            if p.version() != i as u64 + 1 {
                anyhow::bail!("the gate's store: catalog version {} is missing", i + 1);
            }
        }
        if let Ok(mut v) = self.versions.write() {
            *v = out;
        }
        Ok(())
    }

    fn push(&self, p: Published) {
        if let Ok(mut v) = self.versions.write() {
            if v.last().map_or(0, |l| l.version()) + 1 == p.version() {
                v.push(Arc::new(p));
            }
        }
    }

    /// The newest published version, in force or not yet.
    pub fn latest(&self) -> Option<Arc<Published>> {
        self.versions.read().ok().and_then(|v| v.last().cloned())
    }

    /// The version in force at `now`: the highest whose `effective_at` has come.
    pub fn in_force(&self, now: DateTime<Utc>) -> Option<Arc<Published>> {
        let v = self.versions.read().ok()?;
        v.iter().rev().find(|p| p.signed.snapshot.effective_at <= now).cloned()
    }

    pub fn get(&self, version: u64) -> Option<Arc<Published>> {
        let v = self.versions.read().ok()?;
        usize::try_from(version).ok().and_then(|i| i.checked_sub(1)).and_then(|i| v.get(i).cloned())
    }

    /// Every version published and in force by `now` (a version announced for later is not
    /// served before its time).
    pub fn served(&self, now: DateTime<Utc>) -> Vec<Arc<Published>> {
        let Some(current) = self.in_force(now) else { return Vec::new() };
        let v = match self.versions.read() {
            Ok(v) => v,
            Err(_) => return Vec::new(),
        };
        v.iter().take_while(|p| p.version() <= current.version()).cloned().collect()
    }
}

/// A request to compare or publish: the draft's text and what the operator gave.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// The text of `catalog.toml`.
    pub draft: String,
    #[serde(default)]
    pub summary: String,
    /// RFC 3339; now when absent.
    #[serde(default)]
    pub effective_at: Option<String>,
    #[serde(default)]
    pub accept_breaking: bool,
}

/// Why a publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Draft(String),
    #[error(
        "the draft has breaking changes against version {version} (they would raise prices or take terms away from agents): {list}; publish again with --accept-breaking if you mean it"
    )]
    Breaking { version: u64, list: String, impact: Value },
    #[error("{0}")]
    Invalid(String),
    #[error("the gate's store failed: {0}")]
    Store(String),
}

impl PublishError {
    pub fn code(&self) -> &'static str {
        match self {
            PublishError::Draft(_) => "draft_invalid",
            PublishError::Breaking { .. } => "breaking_changes",
            PublishError::Invalid(_) => "invalid_request",
            PublishError::Store(_) => "store_failed",
        }
    }
}

/// Parses the draft text of the file at `path` (named in errors).
pub fn parse_draft(path: &Path, text: &str) -> Result<Draft, PublishError> {
    if text.len() > MAX_DRAFT_BYTES {
        return Err(PublishError::Draft(format!("{}: larger than {MAX_DRAFT_BYTES} bytes", path.display())));
    }
    Draft::parse(path, text).map_err(|e| PublishError::Draft(e.to_string()))
}

/// The diff from the newest published version (nothing, before version 1) to the draft with
/// `gate.toml`'s trust level and routes.
pub fn impact(latest: Option<&Published>, draft: &Draft, config: &GateConfig) -> Impact {
    let old = latest.map(|p| (p.signed.snapshot.permissions.as_slice(), p.signed.snapshot.trust_level));
    Impact::between(old, (&draft.permissions, config.trust_level))
        .with_routes(latest.map(|p| p.signed.snapshot.routes.as_slice()), &config.catalog_routes())
}

/// How `gate.toml`'s routes differ from those of the version in force, one warning line each
/// (empty when they agree). The gate authorizes by `gate.toml`; agents' daemons map requests by
/// the catalog's routes, so a difference must be published.
pub fn route_drift(config: &GateConfig, current: Option<&Published>) -> Vec<String> {
    let Some(p) = current else { return Vec::new() };
    crate::catalog::routes::differences(&config.catalog_routes(), &p.signed.snapshot.routes)
        .into_iter()
        .map(|d| {
            format!(
                "warning: {}: {d} (catalog version {} is in force): publish a new version (sluice catalog publish) so agents map requests as this gate does",
                config.source.display(),
                p.version()
            )
        })
        .collect()
}

/// What a publish did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub published: Published,
    pub impact: Impact,
}

impl Outcome {
    pub fn to_json(&self) -> Value {
        let s = &self.published.signed.snapshot;
        json!({
            "version": s.version,
            "content_hash": self.published.signed.content_hash,
            "prev_content_hash": s.prev_content_hash,
            "published_at": crate::catalog::snapshot::format_time(&s.published_at),
            "effective_at": crate::catalog::snapshot::format_time(&s.effective_at),
            "record_index": self.published.record_index,
            "impact": self.impact.to_json(),
        })
    }
}

/// Parses `--effective-at`: RFC 3339; absent means `now`. A time in the past is refused (it
/// would rewrite what agents were charged).
pub fn effective_at(text: Option<&str>, now: DateTime<Utc>) -> Result<DateTime<Utc>, PublishError> {
    let Some(t) = text else { return Ok(now) };
    let at = DateTime::parse_from_rfc3339(t)
        .map_err(|e| {
            PublishError::Invalid(format!("--effective-at {t:?} is not an RFC 3339 time (2026-12-24T00:00:00Z): {e}"))
        })?
        .with_timezone(&Utc);
    if at.timestamp() < now.timestamp() {
        return Err(PublishError::Invalid(format!(
            "--effective-at {t} is in the past; a new version can only take effect now or later"
        )));
    }
    Ok(at)
}

/// Publishes the draft as the next version: in one ledger transaction, the snapshot built on the
/// store's newest version, signed, stored and recorded as `catalog_published`.
pub async fn publish(
    gate: &super::Gate,
    ledger: &Ledger,
    req: PublishRequest,
    now: DateTime<Utc>,
) -> Result<Outcome, PublishError> {
    let path = gate.config.catalog.clone().unwrap_or_else(|| "catalog.toml".into());
    let draft = parse_draft(&path, &req.draft)?;
    let at = effective_at(req.effective_at.as_deref(), now)?;
    let key = gate.key.clone();
    let gate_id = crate::catalog::GateId::from_key(&key.verifying_key());
    let trust = gate.config.trust_level;
    let routes = gate.config.catalog_routes();
    let gate_id_text = gate.gate_id.clone();
    let result = ledger
        .transact(move |txn| {
            let head = match txn.get(key::HEAD)? {
                None => None,
                Some(b) => {
                    let v = std::str::from_utf8(&b).ok().and_then(|s| s.parse::<u64>().ok()).ok_or_else(|| {
                        TxnError::abort(PublishError::Store("catalog/head is not a version number".into()))
                    })?;
                    let bytes = txn.get(&key::version(v))?.ok_or_else(|| {
                        TxnError::abort(PublishError::Store(format!("catalog version {v} is missing")))
                    })?;
                    let signed = SignedCatalog::parse(&bytes, &key.verifying_key()).map_err(|e| {
                        TxnError::abort(PublishError::Store(format!("stored catalog version {v}: {e}")))
                    })?;
                    Some(signed)
                }
            };
            let old = head.as_ref().map(|h| (h.snapshot.permissions.as_slice(), h.snapshot.trust_level));
            let imp = Impact::between(old, (&draft.permissions, trust))
                .with_routes(head.as_ref().map(|h| h.snapshot.routes.as_slice()), &routes);
            if imp.has_breaking_changes() && !req.accept_breaking {
                let list = imp
                    .changes
                    .iter()
                    .filter(|c| c.breaking())
                    .map(|c| format!("{} {}", c.kind.as_str(), c.subject()))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(TxnError::abort(PublishError::Breaking {
                    version: head.as_ref().map_or(0, |h| h.snapshot.version),
                    list,
                    impact: imp.to_json(),
                }));
            }
            let snap = Snapshot::next(
                head.as_ref(),
                gate_id.clone(),
                draft.permissions.clone(),
                routes.clone(),
                trust,
                &req.summary,
                now,
                at,
            )
            .map_err(|e| TxnError::abort(PublishError::Invalid(format!("the new version: {e}"))))?;
            let signed = snap.sign(&key).map_err(|e| TxnError::abort(PublishError::Invalid(e.to_string())))?;
            let v = signed.snapshot.version;
            let served = serde_json::to_vec(&signed.to_json())
                .map_err(|e| TxnError::abort(PublishError::Store(e.to_string())))?;
            let index = txn.next_index();
            txn.put(&key::version(v), &served)?;
            txn.put(&key::record(v), index.to_string().as_bytes())?;
            txn.put(key::HEAD, v.to_string().as_bytes())?;
            let record = record(&gate_id_text, &signed, now);
            Ok(((Published { signed, record_index: index }, imp), vec![record]))
        })
        .await;
    match result {
        Ok(((published, impact), appended)) => {
            let mut published = published;
            if let Some(a) = appended.first() {
                published.record_index = a.index;
            }
            gate.catalogs.push(published.clone());
            Ok(Outcome { published, impact })
        }
        Err(crate::ledger::LedgerError::Txn(TxnError::Abort(b))) => Err(match b.downcast::<PublishError>() {
            Ok(p) => *p,
            Err(other) => PublishError::Store(other.to_string()),
        }),
        Err(e) => Err(PublishError::Store(e.to_string())),
    }
}

/// The `catalog_published` record of a version.
pub fn record(gate_id: &str, c: &SignedCatalog, at: DateTime<Utc>) -> crate::ledger::Draft {
    let s = &c.snapshot;
    let mut m = Members::with_capacity(10, 512 + s.change_summary.len());
    m.uint(FIELD_VERSION, RECORD_VERSION)
        .str(FIELD_KIND, KIND_CATALOG_PUBLISHED)
        .time(FIELD_TIME, &at)
        .str(field::GATE_ID, gate_id)
        .uint(field::CATALOG_VERSION, s.version)
        .str(field::CONTENT_HASH, &c.content_hash)
        .opt_str(field::PREV_CONTENT_HASH, s.prev_content_hash.as_deref())
        .str(field::EFFECTIVE_AT, &crate::catalog::snapshot::format_time(&s.effective_at))
        .str(field::SUMMARY, &s.change_summary);
    crate::ledger::Draft::new(CHAIN_CATALOG, m)
}

/// The price a passport pays for `permission`, as decided inside the decision's transaction:
/// the lock (the version its first call found in force, stored then) against the version in
/// force. Returns the price, the version whose price is paid, and the lock to write when this is
/// the passport's first priced call. `None` when the version in force does not offer it.
pub fn price_for(
    catalogs: &Catalogs,
    current: &Published,
    locked: Option<u64>,
    permission: &str,
) -> Option<(Price, u64)> {
    let lock = locked.and_then(|v| catalogs.get(v));
    let lock_snap: Option<&Snapshot> = lock.as_ref().map(|p| &p.signed.snapshot);
    crate::catalog::effective_price(lock_snap, &current.signed.snapshot, permission).map(|(p, src)| (p, src.version()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::config::GateConfig;
    use crate::gate::Gate;

    const DRAFT: &str = "[[permission]]\nkey = \"a:b\"\ndescription = \"A\"\nrisk_level = \"low\"\n[permission.constraints]\n\"core:pricing:per_call_cents\" = 2\n";

    fn gate(dir: &Path) -> Gate {
        gate_with(dir, "")
    }

    fn gate_with(dir: &Path, routes: &str) -> Gate {
        let text = format!(
            "name = \"g\"\nkey = \"gate.key\"\nstate_dir = \"{}\"\nlisten = \"127.0.0.1:1\"\nupstream = \"http://127.0.0.1:9\"\n{routes}",
            dir.join("state").display()
        );
        let config = GateConfig::parse(&text, &dir.join("gate.toml")).unwrap();
        Gate::with_key(config, SigningKey::from_bytes(&[7; 32]))
    }

    fn request(draft: &str, effective_at: Option<String>, accept_breaking: bool) -> PublishRequest {
        PublishRequest { draft: draft.into(), summary: "s".into(), effective_at, accept_breaking }
    }

    #[tokio::test]
    async fn versions_chain_are_in_force_by_effective_at_and_reload_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let g = gate(dir.path());
        let ledger = g.open_ledger().unwrap();
        let now = Utc::now();
        let v1 = publish(&g, &ledger, request(DRAFT, None, false), now).await.unwrap();
        assert_eq!(v1.published.version(), 1);
        // A dearer version is breaking: refused, nothing stored; accepted with the flag.
        let dearer = DRAFT.replace("= 2", "= 3");
        let e = publish(&g, &ledger, request(&dearer, None, false), now).await.unwrap_err();
        assert!(matches!(e, PublishError::Breaking { version: 1, .. }), "{e}");
        assert!(e.to_string().contains("price_increase a:b"), "{e}");
        let later = (now + chrono::Duration::seconds(60)).to_rfc3339();
        let v2 = publish(&g, &ledger, request(&dearer, Some(later), true), now).await.unwrap();
        assert_eq!(
            v2.published.signed.snapshot.prev_content_hash.as_deref(),
            Some(v1.published.signed.content_hash.as_str())
        );
        // Version 2 is announced, not in force: version 1 is served and charged until its time.
        assert_eq!(g.catalogs.in_force(now).unwrap().version(), 1);
        assert_eq!(g.catalogs.served(now).len(), 1);
        assert_eq!(g.catalogs.in_force(now + chrono::Duration::seconds(60)).unwrap().version(), 2);
        // The lock: version 1's price for a passport locked there, version 2's for a new one.
        let current = g.catalogs.in_force(now + chrono::Duration::seconds(61)).unwrap();
        let (p, v) = price_for(&g.catalogs, &current, Some(1), "a:b").unwrap();
        assert_eq!((p.total_millicents(), v), (2000, 1));
        let (p, v) = price_for(&g.catalogs, &current, None, "a:b").unwrap();
        assert_eq!((p.total_millicents(), v), (3000, 2));
        assert!(price_for(&g.catalogs, &current, Some(1), "x:y").is_none());
        // The record of each version is in the log, and the store reloads the same history.
        let rec: Value = serde_json::from_slice(&ledger.record(v2.published.record_index).unwrap().unwrap()).unwrap();
        assert_eq!((rec["kind"].as_str(), rec["catalog_version"].as_u64()), (Some(KIND_CATALOG_PUBLISHED), Some(2)));
        let reloaded = Catalogs::default();
        reloaded.load(&ledger, &SigningKey::from_bytes(&[7; 32])).unwrap();
        assert_eq!(reloaded.latest().unwrap().signed, v2.published.signed);
        // Another key cannot read the history as its own.
        assert!(Catalogs::default().load(&ledger, &SigningKey::from_bytes(&[8; 32])).is_err());
        ledger.shutdown();
    }

    #[tokio::test]
    async fn bad_drafts_and_times_are_refused_with_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let g = gate(dir.path());
        let ledger = g.open_ledger().unwrap();
        let now = Utc::now();
        let e = publish(&g, &ledger, request("[[permission]]\nkey = \"a:*\"\n", None, false), now).await.unwrap_err();
        assert!(matches!(e, PublishError::Draft(_)), "{e}");
        let past = (now - chrono::Duration::seconds(5)).to_rfc3339();
        let e = publish(&g, &ledger, request(DRAFT, Some(past), false), now).await.unwrap_err();
        assert!(e.to_string().contains("in the past"), "{e}");
        let e = publish(&g, &ledger, request(DRAFT, Some("tomorrow".into()), false), now).await.unwrap_err();
        assert!(e.to_string().contains("RFC 3339"), "{e}");
        let big = "#".repeat(MAX_DRAFT_BYTES + 1);
        let e = publish(&g, &ledger, request(&big, None, false), now).await.unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        assert!(g.catalogs.latest().is_none());
        assert!(ledger.state_get(key::HEAD).unwrap().is_none());
        ledger.shutdown();
    }

    const ROUTES: &str = "[[route]]\nmethod = \"POST\"\npath = \"/v1/b\"\npermission = \"a:b\"\n[[route]]\nmethod = \"*\"\npath = \"/v1/c/*\"\npermission = \"a:c\"\n";

    #[tokio::test]
    async fn publish_copies_the_routes_and_a_removed_or_repointed_route_is_breaking() {
        let dir = tempfile::tempdir().unwrap();
        let g = gate_with(dir.path(), ROUTES);
        let ledger = g.open_ledger().unwrap();
        let now = Utc::now();
        let v1 = publish(&g, &ledger, request(DRAFT, None, false), now).await.unwrap();
        let s = &v1.published.signed.snapshot;
        let got: Vec<String> = s.routes.iter().map(|r| format!("{} -> {}", r.label(), r.permission)).collect();
        assert_eq!(got, ["POST /v1/b -> a:b", "* /v1/c/* -> a:c"]);
        assert_eq!(s.permission_of("PATCH", "/v1/c/9"), "a:c");
        assert!(route_drift(&g.config, g.catalogs.in_force(now).as_deref()).is_empty());

        // gate.toml now sends /v1/b to another permission: the gate warns, naming the route, and
        // publishing it is a breaking change.
        let g = gate_with(dir.path(), &ROUTES.replacen("permission = \"a:b\"", "permission = \"a:z\"", 1));
        g.catalogs.load(&ledger, &SigningKey::from_bytes(&[7; 32])).unwrap();
        let drift = route_drift(&g.config, g.catalogs.in_force(now).as_deref());
        assert_eq!(drift.len(), 1, "{drift:?}");
        assert!(drift[0].contains("POST /v1/b -> a:z") && drift[0].contains("publish a new version"), "{drift:?}");
        let imp = impact(g.catalogs.latest().as_deref(), &parse_draft(Path::new("c.toml"), DRAFT).unwrap(), &g.config);
        assert_eq!(imp.changes.iter().map(|c| c.kind.as_str()).collect::<Vec<_>>(), ["route_changed"]);
        let e = publish(&g, &ledger, request(DRAFT, None, false), now).await.unwrap_err();
        assert!(e.to_string().contains("route_changed POST /v1/b"), "{e}");
        publish(&g, &ledger, request(DRAFT, None, true), now).await.unwrap();
        assert!(route_drift(&g.config, g.catalogs.in_force(now).as_deref()).is_empty());
        ledger.shutdown();
    }
}
