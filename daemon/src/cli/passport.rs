//! `sluice passport issue | inspect | verify`.

use super::ops::ApiSocket;
use super::util::{parse_duration, print_json, read_token, rfc3339};
use super::CmdResult;
use crate::keyfile;
use crate::passport::{
    self, constraints, Constraints, IssueRequest, IssuerId, NoRevocations, Passport, Permission, TrustTier, Verifier,
};
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum PassportCmd {
    /// Issue a passport: writes the token to --out and the agent's new private key to --out.key
    /// (mode 0600). Prints the passport id.
    Issue(IssueArgs),
    /// Show a passport's header and claims WITHOUT verifying them.
    Inspect(InspectArgs),
    /// List the built-in passport templates (for `issue --template NAME`), or print one.
    Templates {
        /// Print this template's TOML (its permissions, constraints and comments).
        name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify a passport fully (signature, claims, constraints, validity). Exit status 1 with the
    /// reason if it is not valid.
    Verify(PassportVerifyArgs),
    /// Register a passport with the running daemon (passport-only mode; `sluice run` does this
    /// itself). Prints its id.
    Register {
        /// The passport file.
        file: PathBuf,
        /// The agent's key, to prove possession (required for L3; default FILE.key for L3).
        #[arg(long, value_name = "F.key")]
        key: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a passport through the daemon. Revocation is attested and survives restarts.
    Revoke {
        /// The passport id (pp_…).
        id: String,
        /// A note kept in the attestation.
        #[arg(long, value_name = "T")]
        note: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct IssueArgs {
    /// The issuer's private key (from `sluice issuer init`).
    #[arg(long, value_name = "FILE")]
    issuer_key: PathBuf,
    /// The agent's id (the JWT `sub`): letters, digits and . _ : @ -
    #[arg(long, value_name = "ID")]
    agent_id: String,
    /// A human-readable agent name.
    #[arg(long, value_name = "NAME")]
    agent_name: Option<String>,
    /// Start from a built-in template (`sluice passport templates`): its permissions and
    /// constraints. --permission replaces the template's permissions; --constraint and
    /// --constraints-file override its constraints key by key.
    #[arg(long, value_name = "NAME")]
    template: Option<String>,
    /// A permission such as `orders:read` or `llm:*` (repeatable).
    #[arg(long = "permission", value_name = "P")]
    permissions: Vec<String>,
    /// A constraint such as `core:cost:max_per_action=500` (repeatable). VALUE is JSON when it
    /// parses as JSON, else a string; for the domain allowlist a comma-separated list works too.
    #[arg(long = "constraint", value_name = "KEY=VALUE")]
    constraints: Vec<String>,
    /// A JSON object of constraints, merged with --constraint (a key given twice is an error).
    #[arg(long, value_name = "F.json")]
    constraints_file: Option<PathBuf>,
    /// Trust tier: L1 (any issuer), L2 (pinned issuers only), L3 (L2 + proof of possession).
    #[arg(long, value_name = "L1|L2|L3", default_value = "L1")]
    tier: String,
    /// Lifetime, e.g. 30d, 12h, 15m.
    #[arg(long, value_name = "DURATION", default_value = "30d")]
    expires_in: String,
    /// Where to write the passport; the agent key goes to the same path plus `.key`.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The passport file.
    file: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct PassportVerifyArgs {
    /// The passport file.
    file: PathBuf,
    /// Require the passport to come from this issuer (public key PEM; repeatable: any of them).
    #[arg(long = "issuer-pub", value_name = "FILE")]
    issuer_pubs: Vec<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: PassportCmd, socket: &ApiSocket) -> CmdResult {
    match cmd {
        PassportCmd::Issue(a) => issue(a),
        PassportCmd::Inspect(a) => inspect(a),
        PassportCmd::Templates { name, json } => templates(name.as_deref(), json),
        PassportCmd::Verify(a) => verify(a),
        PassportCmd::Register { file, key, json } => super::ops::register(&file, key.as_deref(), socket, json),
        PassportCmd::Revoke { id, note, json } => super::ops::revoke(&id, note, socket, json),
    }
}

fn key_path_for(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".key");
    PathBuf::from(s)
}

fn issue(a: IssueArgs) -> CmdResult {
    let key_out = key_path_for(&a.out);
    for p in [&a.out, &key_out] {
        if p.exists() {
            bail!("{}: already exists; refusing to overwrite it (choose another --out)", p.display());
        }
    }
    let issuer_key = keyfile::load_signing_key(&a.issuer_key)?;
    let template = a.template.as_deref().map(super::templates::named).transpose()?;
    let permissions = match &template {
        Some(t) if a.permissions.is_empty() => t.permissions.clone(),
        _ => a.permissions.clone(),
    };
    let permissions = permissions
        .iter()
        .map(|p| Permission::parse(p).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()
        .context("--permission")?;
    let base = template.as_ref().map(|t| t.constraints.clone()).unwrap_or_default();
    let constraints =
        build_constraints(base, &a.constraints, a.constraints_file.as_deref()).with_context(|| match &a.template {
            Some(t) => format!("constraints of template {t} with the given overrides"),
            None => "constraints".into(),
        })?;
    let trust_tier = TrustTier::parse(&a.tier).with_context(|| format!("--tier {:?}: use L1, L2 or L3", a.tier))?;
    let lifetime_secs = parse_duration(&a.expires_in).context("--expires-in")?;
    let issued = passport::issue(
        IssueRequest {
            agent_id: a.agent_id,
            agent_name: a.agent_name,
            permissions,
            constraints,
            trust_tier,
            lifetime_secs,
            now: passport::now(),
        },
        &issuer_key,
    )?;
    keyfile::write_signing_key(&key_out, &issued.agent_key)?;
    if let Err(e) = crate::files::create_new(&a.out, format!("{}\n", issued.token).as_bytes(), 0o600) {
        let _ = std::fs::remove_file(&key_out);
        return Err(e.into());
    }
    if a.json {
        print_json(&serde_json::json!({
            "passport_id": issued.claims.id.as_str(),
            "passport": a.out, "agent_key": key_out,
            "expires_at": rfc3339(issued.claims.expires_at),
        }));
    } else {
        println!("{}", issued.claims.id);
    }
    Ok(ExitCode::SUCCESS)
}

/// Merges a template's constraints (`base`), then `--constraints-file`, then `--constraint
/// KEY=VALUE` flags into typed constraints: the file and the flags override the template key by
/// key; a key in both the file and a flag (or in two flags) is an error.
fn build_constraints(base: Map<String, Value>, flags: &[String], file: Option<&Path>) -> anyhow::Result<Constraints> {
    let mut map = Map::new();
    if let Some(path) = file {
        let text = crate::files::read_text(path, 1 << 20, crate::files::Links::Follow)?;
        let parsed = passport::json::parse_object(text.as_bytes())
            .with_context(|| format!("{}: expected a JSON object of constraints", path.display()))?;
        map = parsed;
    }
    let mut given = Map::new();
    for flag in flags {
        let (key, raw) = flag.split_once('=').with_context(|| format!("--constraint {flag:?}: expected KEY=VALUE"))?;
        let value = match serde_json::from_str::<Value>(raw) {
            Ok(v) => v,
            Err(_) if key == constraints::DOMAIN_ALLOWLIST => {
                Value::Array(raw.split(',').map(|s| Value::from(s.trim())).collect())
            }
            Err(_) => Value::from(raw),
        };
        if map.contains_key(key) || given.insert(key.to_string(), value).is_some() {
            bail!("constraint {key} is given twice (--constraint and --constraints-file, or repeated)");
        }
    }
    let mut merged = base;
    merged.extend(map);
    merged.extend(given);
    Ok(Constraints::from_json(&merged)?)
}

fn templates(name: Option<&str>, json: bool) -> CmdResult {
    let list = match name {
        Some(n) => vec![super::templates::named(n)?],
        None => super::templates::all()?,
    };
    if json {
        let items: Vec<Value> = list
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name, "description": t.description,
                    "permissions": t.permissions, "constraints": t.constraints,
                })
            })
            .collect();
        print_json(&serde_json::json!({"templates": items}));
    } else if let [one] = list.as_slice() {
        if name.is_some() {
            print!("{}", one.text);
        } else {
            println!("{:<16} {}", one.name, one.description);
        }
    } else {
        for t in &list {
            println!("{:<16} {}", t.name, t.description);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect(a: InspectArgs) -> CmdResult {
    let token = read_token(&a.file)?;
    let (claims, kid) = passport::inspect(&token).with_context(|| format!("{}", a.file.display()))?;
    if a.json {
        print_json(&serde_json::json!({"verified": false, "kid": kid, "claims": claims}));
        return Ok(ExitCode::SUCCESS);
    }
    println!("UNVERIFIED: shown as written; run `sluice passport verify` to check it.");
    for (k, v) in &claims {
        let shown = match (k.as_str(), v) {
            ("iat" | "nbf" | "exp", Value::Number(n)) => n.as_i64().map(rfc3339).unwrap_or_else(|| n.to_string()),
            (_, Value::String(s)) => s.clone(),
            _ => v.to_string(),
        };
        println!("{k:<12} {shown}");
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(a: PassportVerifyArgs) -> CmdResult {
    let token = read_token(&a.file)?;
    let pinned = a
        .issuer_pubs
        .iter()
        .map(|p| keyfile::load_public_key(p).map(|k| IssuerId::from_key(&k)))
        .collect::<Result<Vec<_>, _>>()?;
    match Verifier::new(&pinned, &NoRevocations).verify(&token, passport::now()) {
        Ok(p) => {
            report_valid(&p, a.json);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if a.json {
                print_json(
                    &serde_json::json!({"valid": false, "reason": crate::decide::Reason::of_passport_error(&e), "detail": e.to_string()}),
                );
            }
            eprintln!("sluice: {}: passport is not valid: {e}", a.file.display());
            Ok(ExitCode::FAILURE)
        }
    }
}

fn report_valid(p: &Passport, json: bool) {
    let c = &p.claims;
    if json {
        print_json(&serde_json::json!({"valid": true, "passport_id": c.id.as_str(), "claims": c.to_json()}));
        return;
    }
    println!("valid        passport {}", c.id);
    println!("agent        {}{}", c.agent_id, c.agent_name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default());
    println!("issuer       {}", c.issuer);
    println!("tier         {}", c.trust_tier.as_str());
    println!("valid from   {}", rfc3339(c.not_before));
    println!("expires      {}", rfc3339(c.expires_at));
    let perms: Vec<&str> = c.permissions.iter().map(Permission::as_str).collect();
    println!("permissions  {}", if perms.is_empty() { "(none)".to_string() } else { perms.join(", ") });
    for (k, v) in c.constraints.to_json() {
        println!("constraint   {k} = {v}");
    }
    if c.trust_tier == TrustTier::L3 {
        println!("note         L3: proof of possession of the agent key is checked when the agent runs");
    }
}
