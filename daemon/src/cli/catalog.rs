//! `sluice catalog verify`: the offline check of catalogs fetched from a gate.
//!
//! Needs only the files and the gate's public key: each catalog's hash and signature, its fields,
//! and that the versions given form one unbroken chain (docs/catalogs.md).

use super::CmdResult;
use crate::catalog::{chain, SignedCatalog};
use crate::files::{self, Links};
use crate::keyfile;
use crate::money::cents_text as money_text;
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum CatalogCmd {
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

pub fn run(cmd: CatalogCmd) -> CmdResult {
    match cmd {
        CatalogCmd::Verify(a) => verify(a),
    }
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
    println!("ok: {} version(s) verify and chain ({}..={})", history.len(), start, newest.version);
    Ok(ExitCode::SUCCESS)
}

fn names(versions: &[(SignedCatalog, String)]) -> String {
    versions.iter().map(|(c, at)| format!("v{} from {at}", c.snapshot.version)).collect::<Vec<_>>().join(", ")
}
