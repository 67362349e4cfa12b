//! `sluice catalog`: a gate operator's `impact` and `publish`, and `verify`, the offline check of
//! catalogs fetched from a gate.
//!
//! `impact` and `publish` read the gate's `gate.toml` (global `--config`) and its `catalog`
//! draft. A running gate holds its store, so they go through its admin socket
//! (`state_dir/gate.sock`); a stopped gate's store is opened here. `verify` needs only the files
//! and the gate's public key: each catalog's hash and signature, its fields, and that the versions
//! given form one unbroken chain (docs/catalogs.md).

use super::CmdResult;
use crate::api::client::{Client, ClientError};
use crate::catalog::{chain, SignedCatalog};
use crate::files::{self, Links};
use crate::gate::catalog::{self as gate_catalog, PublishRequest};
use crate::keyfile;
use crate::money::cents_text as money_text;
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum CatalogCmd {
    /// Compare the gate's draft (`catalog` in gate.toml) with its newest published version.
    ///
    /// Prints `{has_breaking_changes, changes: [{type, permission_key, old_value, new_value,
    /// breaking}]}`. Exit status 0 when nothing would break agents' terms, 1 when something would
    /// (publish then needs --accept-breaking).
    Impact,
    /// Publish the gate's draft as its next catalog version.
    ///
    /// Signs the version with the gate key, stores it in the gate's state and records it
    /// (`catalog_published`) in the gate's log, in one transaction. Refuses breaking changes
    /// (price or fee increases, removed permissions, weaker SLAs, ...) without --accept-breaking.
    /// Works while the gate runs (through its socket). Prints the version and its content hash.
    Publish(PublishArgs),
    /// Check catalogs fetched from a gate, offline: hash, signature, fields and version chain.
    ///
    /// Each FILE holds one served catalog (`{catalog, content_hash, catalog_signature}`, as
    /// `GET /v1/catalog` answers) or a JSON array of them. All versions given, from every file,
    /// must be from the gate whose key is --gate-pub and form one chain: versions growing by one,
    /// each naming the previous one's content hash. A chain that does not start at version 1 is
    /// checked from its first version on (the output says so). Prints each version and what it
    /// offers at what price. Exit status 0 when everything verifies, 1 otherwise (the error
    /// names the file and the version at fault).
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Catalog files (one served catalog or a JSON array of them each).
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    /// The gate's public key (`gate.pub`, written by `sluice gate init`).
    #[arg(long, value_name = "F")]
    gate_pub: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct PublishArgs {
    /// What changed, for agents (shown in the catalog as `change_summary`).
    #[arg(long, value_name = "TEXT")]
    summary: String,
    /// When the version takes effect (RFC 3339, e.g. 2026-12-24T00:00:00Z) [default: now].
    #[arg(long, value_name = "TIME")]
    effective_at: Option<String>,
    /// Publish even if the draft breaks agents' terms (see `sluice catalog impact`).
    #[arg(long)]
    accept_breaking: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: CatalogCmd, config: Option<&Path>) -> CmdResult {
    let need = || {
        config.ok_or_else(|| anyhow::anyhow!("this command needs --config FILE: the gate's gate.toml (docs/gate.md)"))
    };
    match cmd {
        CatalogCmd::Verify(a) => verify(a),
        CatalogCmd::Impact => impact(need()?),
        CatalogCmd::Publish(a) => publish(a, need()?),
    }
}

/// The gate and the text of its draft.
fn gate_and_draft(config: &Path) -> anyhow::Result<(crate::gate::Gate, PublishRequest)> {
    let gate = super::gate::load(config)?;
    let Some(path) = gate.config.catalog.clone() else {
        bail!("{}: no `catalog = \"catalog.toml\"`: the gate has no draft to publish", config.display());
    };
    let text = files::read_text(&path, gate_catalog::MAX_DRAFT_BYTES as u64, Links::Follow)?;
    // Checked here too, so problems are reported before anything is sent to a running gate.
    gate_catalog::parse_draft(&path, text.as_str())?;
    let req = PublishRequest {
        draft: text.as_str().to_string(),
        summary: String::new(),
        effective_at: None,
        accept_breaking: false,
    };
    Ok((gate, req))
}

/// Sends `req` to a running gate's socket; `None` when no gate runs on this state_dir.
fn via_socket(gate: &crate::gate::Gate, path: &str, req: &PublishRequest) -> anyhow::Result<Option<Value>> {
    let socket = crate::gate::admin::socket_path(&gate.config.state_dir);
    if std::os::unix::net::UnixStream::connect(&socket).is_err() {
        return Ok(None);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let body = serde_json::to_value(req)?;
    let client = Client::new(&socket);
    match rt.block_on(client.call(http::Method::POST, path, Some(&body))) {
        Ok(r) => Ok(Some(r.body)),
        Err(ClientError::Api { message, .. }) => bail!("gate {}: {message}", gate.config.name),
        Err(e) => bail!("gate {}: {} : {e}", gate.config.name, socket.display()),
    }
}

fn impact(config: &Path) -> CmdResult {
    let (gate, req) = gate_and_draft(config)?;
    let doc = match via_socket(&gate, "/catalog/impact", &req)? {
        Some(doc) => doc,
        None => {
            let ledger = gate.open_ledger()?;
            let path = gate.config.catalog.clone().unwrap_or_default();
            let draft = gate_catalog::parse_draft(&path, &req.draft)?;
            let doc = gate_catalog::impact(gate.catalogs.latest().as_deref(), &draft, &gate.config).to_json();
            ledger.shutdown();
            doc
        }
    };
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(if doc.get("has_breaking_changes").and_then(Value::as_bool) == Some(false) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn publish(a: PublishArgs, config: &Path) -> CmdResult {
    let (gate, mut req) = gate_and_draft(config)?;
    req.summary = a.summary;
    req.effective_at = a.effective_at;
    req.accept_breaking = a.accept_breaking;
    let doc = match via_socket(&gate, "/catalog/publish", &req)? {
        Some(doc) => doc,
        None => {
            let ledger = gate.open_ledger()?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let out = rt.block_on(gate_catalog::publish(&gate, &ledger, req, chrono::Utc::now()));
            ledger.shutdown();
            out.map_err(|e| anyhow::anyhow!("gate {}: {e}", gate.config.name))?.to_json()
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "published catalog version {} of gate {}: {} (effective {}, log index {})",
            doc["version"],
            gate.config.name,
            doc["content_hash"].as_str().unwrap_or(""),
            doc["effective_at"].as_str().unwrap_or(""),
            doc["record_index"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The most versions read from all files together.
const MAX_VERSIONS: usize = 10_000;
/// The largest file read: a thousand versions of the largest catalog would not fit, and that is
/// not what this command is for.
const MAX_FILE: u64 = 64 << 20;

fn verify(a: VerifyArgs) -> CmdResult {
    let key = keyfile::load_public_key(&a.gate_pub)?;
    let mut versions: Vec<(SignedCatalog, String)> = Vec::new();
    for path in &a.files {
        let text = files::read_text(path, MAX_FILE, Links::Follow)?;
        // Duplicate member names are refused at every depth before anything is read (wrapping the
        // document lets the strict object parser see an array too).
        let wrapped = crate::passport::json::parse_object(format!("{{\"v\":{}}}", text.as_str()).as_bytes())
            .with_context(|| format!("{}: not a JSON document sluice accepts", path.display()))?;
        let value = wrapped.get("v").cloned().unwrap_or(Value::Null);
        let items: Vec<Value> = match value {
            Value::Array(items) => items,
            one => vec![one],
        };
        for (i, item) in items.into_iter().enumerate() {
            let at = if text.trim_start().starts_with('[') {
                format!("{} (item {i})", path.display())
            } else {
                path.display().to_string()
            };
            let bytes = serde_json::to_vec(&item).context("re-serialising a catalog")?;
            let c = SignedCatalog::parse(&bytes, &key).with_context(|| at.clone())?;
            versions.push((c, at));
            if versions.len() > MAX_VERSIONS {
                bail!("more than {MAX_VERSIONS} catalog versions given");
            }
        }
    }
    versions.sort_by_key(|(c, _)| c.snapshot.version);
    versions.dedup_by(|b, a| a.0 == b.0);
    let history: Vec<SignedCatalog> = versions.iter().map(|(c, _)| c.clone()).collect();
    let first = history.first().context("no catalogs in the files given")?;
    let start = first.snapshot.version;
    let pin = if start == 1 { None } else { Some(chain::Pin::of(first)) };
    let newest = chain::verify_history(pin.as_ref(), &history)
        .map_err(|e| anyhow::anyhow!("the versions given do not form one chain: {e} (files: {})", names(&versions)))?;

    if a.json {
        let out = json!({
            "ok": true,
            "gate_id": newest.gate_id.as_str(),
            "first_version": start,
            "newest_version": newest.version,
            "newest_content_hash": newest.content_hash,
            "versions": history.iter().map(|c| json!({
                "version": c.snapshot.version,
                "content_hash": c.content_hash,
                "published_at": crate::catalog::snapshot::format_time(&c.snapshot.published_at),
                "effective_at": crate::catalog::snapshot::format_time(&c.snapshot.effective_at),
                "change_summary": c.snapshot.change_summary,
            })).collect::<Vec<_>>(),
            "routes": history.last().map(|c| c.snapshot.routes.iter().map(crate::catalog::Route::to_json).collect::<Vec<_>>()),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("gate {}", newest.gate_id.as_str());
    if start != 1 {
        println!("note: the chain is checked from version {start}; versions before it were not given");
    }
    for c in &history {
        let s = &c.snapshot;
        println!(
            "version {}  {}  published {}  effective {}  {}",
            s.version,
            c.content_hash,
            crate::catalog::snapshot::format_time(&s.published_at),
            crate::catalog::snapshot::format_time(&s.effective_at),
            s.change_summary
        );
    }
    if let Some(c) = history.last() {
        println!(
            "offer of version {} (minimum passport tier {}):",
            c.snapshot.version,
            c.snapshot.trust_level.as_str()
        );
        for p in &c.snapshot.permissions {
            let price = p.terms.price();
            let fee = if price.fee_basis_points > 0 {
                format!(" + {} bp fee = {} cents", price.fee_basis_points, money_text(price.total_millicents()))
            } else {
                String::new()
            };
            println!(
                "  {:<32} {:>10} cents{fee}  risk {}  {}",
                p.key,
                money_text(price.per_call_millicents),
                p.risk_level.as_str(),
                p.description
            );
        }
    }
    if let Some(c) = history.last() {
        println!(
            "routes of version {} (first match wins; no match: web:fetch for GET, HEAD, OPTIONS, web:send otherwise):",
            c.snapshot.version
        );
        for r in &c.snapshot.routes {
            println!("  {:<8} {:<40} -> {}", r.method, r.path.as_str(), r.permission);
        }
    }
    println!("ok: {} version(s) verify and chain ({}..={})", history.len(), start, newest.version);
    Ok(ExitCode::SUCCESS)
}

fn names(versions: &[(SignedCatalog, String)]) -> String {
    versions.iter().map(|(c, at)| format!("v{} from {at}", c.snapshot.version)).collect::<Vec<_>>().join(", ")
}
