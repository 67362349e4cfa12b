//! Commands that talk to a running daemon over its local API: `passport register|revoke`,
//! `enforce`, `state`, `holds`.

use super::util::print_json;
use super::CmdResult;
use crate::api::client::{Client, ClientError};
use anyhow::Context;
use clap::{Args, Subcommand};
use http::Method;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit status of `sluice enforce` when the decision is `block`.
pub const EXIT_BLOCK: u8 = 3;
/// Exit status of `sluice enforce` when the decision is `request_hold`.
pub const EXIT_HOLD: u8 = 4;

/// Runs one API call on a small runtime and returns the JSON body.
pub fn call(socket: &ApiSocket, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let socket = socket.path()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let client = Client::new(socket);
    let resp = rt.block_on(client.call(method, path, body.as_ref())).map_err(|e| match e {
        ClientError::Api { message, .. } => anyhow::anyhow!(message),
        other => anyhow::anyhow!(other),
    })?;
    Ok(resp.body)
}

fn dollars(v: &Value) -> String {
    v.as_u64().map(|c| crate::passport::Cents(c).to_string()).unwrap_or_else(|| "-".into())
}

// ---- enforce ----

#[derive(Args, Debug)]
pub struct EnforceArgs {
    /// The registered passport's id (pp_…).
    #[arg(long, value_name = "ID")]
    passport_id: String,
    /// The action, e.g. `llm:chat` or `orders:read`.
    #[arg(long, value_name = "A")]
    action: String,
    /// What the action costs, in cents.
    #[arg(long, value_name = "N", default_value_t = 0)]
    cost_cents: u64,
    /// The host the action goes to (checked against the domain allowlist).
    #[arg(long, value_name = "T")]
    target: Option<String>,
}

/// Prints the decision JSON. Exit status: 0 allow, 3 block, 4 request_hold, 1 error.
pub fn enforce(a: EnforceArgs, socket: &ApiSocket) -> CmdResult {
    let body =
        json!({"passport_id": a.passport_id, "action": a.action, "cost_cents": a.cost_cents, "target": a.target});
    let d = call(socket, Method::POST, "/v1/enforce", Some(body))?;
    print_json(&d);
    let reason = d["reason"].as_str().unwrap_or("");
    let detail = d["detail"].as_str().unwrap_or("");
    Ok(match d["decision"].as_str() {
        Some("allow") => ExitCode::SUCCESS,
        Some("request_hold") => {
            eprintln!(
                "sluice: held for approval ({reason}): approve with `sluice holds approve {}`",
                d["approval_request_id"].as_str().unwrap_or("?")
            );
            ExitCode::from(EXIT_HOLD)
        }
        _ => {
            eprintln!("sluice: blocked ({reason}): {detail}");
            ExitCode::from(EXIT_BLOCK)
        }
    })
}

// ---- passport register / revoke ----

/// A proof of possession for `token` made with the agent key at `key`, for this daemon (its log
/// origin is the audience). `None` when no key is given and the passport is not L3.
pub fn proof_of_possession(
    token: &str,
    key: Option<&Path>,
    passport_file: &Path,
    socket: &ApiSocket,
) -> anyhow::Result<Option<Value>> {
    use crate::passport::{pop, Claims, TrustTier};
    let (payload, _) = crate::passport::inspect(token).with_context(|| format!("{}", passport_file.display()))?;
    let claims = Claims::from_json(&payload).with_context(|| format!("{}", passport_file.display()))?;
    let default_key = PathBuf::from(format!("{}.key", passport_file.display()));
    let key_path = match key {
        Some(k) => k.to_path_buf(),
        None if claims.trust_tier == TrustTier::L3 => default_key,
        None => return Ok(None),
    };
    let key = crate::keyfile::load_signing_key(&key_path).with_context(|| {
        format!("the agent key, needed to prove possession for an {} passport", claims.trust_tier.as_str())
    })?;
    let health = call(socket, Method::GET, "/v1/health", None)?;
    let origin = health["origin"].as_str().context("the daemon did not say its origin")?;
    let proof = pop::prove(&key, &claims, crate::passport::now(), origin);
    Ok(Some(serde_json::to_value(proof)?))
}

pub fn register(file: &Path, key: Option<&Path>, socket: &ApiSocket, json_out: bool) -> CmdResult {
    let token = super::util::read_token(file)?;
    let pop = proof_of_possession(&token, key, file, socket)?;
    let r = call(socket, Method::POST, "/v1/passports", Some(json!({"passport": token, "pop": pop})))
        .with_context(|| format!("registering {}", file.display()))?;
    if json_out {
        print_json(&r);
    } else {
        println!("{}", r["passport_id"].as_str().unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn revoke(id: &str, note: Option<String>, socket: &ApiSocket, json_out: bool) -> CmdResult {
    let r = call(socket, Method::POST, &format!("/v1/passports/{}/revoke", encode(id)), Some(json!({"note": note})))?;
    if json_out {
        print_json(&r);
    } else if r["already_revoked"].as_bool() == Some(true) {
        println!("{id} was already revoked");
    } else {
        println!("{id} revoked (attestation {})", r["attestation_id"]);
    }
    Ok(ExitCode::SUCCESS)
}

fn encode(segment: &str) -> String {
    form_urlencoded::byte_serialize(segment.as_bytes()).collect()
}

// ---- state ----

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct StateArgs {
    #[command(subcommand)]
    cmd: Option<StateCmd>,
    /// The passport id whose counters to show.
    id: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub enum StateCmd {
    /// Reset a passport's counters (attested, with who asked).
    Reset {
        /// The passport id.
        id: String,
        /// Which counters: daily, weekly, monthly or all.
        #[arg(long, value_name = "daily|weekly|monthly|all")]
        window: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn state(a: StateArgs, socket: &ApiSocket) -> CmdResult {
    match (a.cmd, a.id) {
        (Some(StateCmd::Reset { id, window, json }), _) => {
            let r = call(
                socket,
                Method::POST,
                &format!("/v1/passports/{}/state/reset", encode(&id)),
                Some(json!({"window": window})),
            )?;
            if json {
                print_json(&r);
            } else {
                println!("{id}: {window} counters reset (attestation {})", r["attestation_id"]);
            }
            Ok(ExitCode::SUCCESS)
        }
        (None, Some(id)) => {
            let s = call(socket, Method::GET, &format!("/v1/passports/{}/state", encode(&id)), None)?;
            if a.json {
                print_json(&s);
            } else {
                print_state(&s);
            }
            Ok(ExitCode::SUCCESS)
        }
        (None, None) => anyhow::bail!("give a passport id (`sluice state pp_…`) or `sluice state reset ID --window W`"),
    }
}

fn print_state(s: &Value) {
    let limit = |v: &Value| if v.is_null() { "no limit".to_string() } else { dollars(v) };
    println!("passport        {}", s["passport_id"].as_str().unwrap_or_default());
    println!("today           {} of {}", dollars(&s["daily_cost_cents"]), limit(&s["daily_cost_limit_cents"]));
    println!(
        "requests today  {}{}",
        s["daily_requests"],
        s["daily_request_limit"].as_u64().map(|l| format!(" of {l}")).unwrap_or_default()
    );
    if let Some(w) = s["window"].as_str() {
        println!(
            "{:<15} {} of {}",
            format!("{w} window"),
            dollars(&s["window_cost_cents"]),
            limit(&s["window_cost_limit_cents"])
        );
    }
    println!("resets at       {}", s["window_resets_at"].as_str().unwrap_or("-"));
    if s["revoked"].as_bool() == Some(true) {
        println!("REVOKED");
    }
}

// ---- holds ----

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct HoldsArgs {
    #[command(subcommand)]
    cmd: Option<HoldsCmd>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub enum HoldsCmd {
    /// Approve a held request: the limits are checked again, then it is forwarded.
    Approve {
        id: String,
        /// A note kept in the attestation.
        #[arg(long, value_name = "T")]
        note: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Deny a held request: the agent gets 403 hold_denied.
    Deny {
        id: String,
        /// A note kept in the attestation.
        #[arg(long, value_name = "T")]
        note: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

pub fn holds(a: HoldsArgs, socket: &ApiSocket) -> CmdResult {
    let (id, approve, note, json_out) = match a.cmd {
        None => {
            let h = call(socket, Method::GET, "/v1/holds", None)?;
            if a.json {
                print_json(&h);
                return Ok(ExitCode::SUCCESS);
            }
            let list = h["holds"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no pending holds");
            }
            for h in list {
                println!(
                    "{}  {}  {} {}  {}  expires {}",
                    h["id"].as_str().unwrap_or_default(),
                    h["passport_id"].as_str().unwrap_or_default(),
                    h["request"]["action"].as_str().unwrap_or_default(),
                    h["request"]["host"].as_str().unwrap_or_default(),
                    dollars(&h["request"]["cost_cents"]),
                    h["expires_at"].as_str().unwrap_or_default(),
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        Some(HoldsCmd::Approve { id, note, json }) => (id, true, note, json),
        Some(HoldsCmd::Deny { id, note, json }) => (id, false, note, json),
    };
    let verb = if approve { "approve" } else { "deny" };
    let r = call(socket, Method::POST, &format!("/v1/holds/{}/{verb}", encode(&id)), Some(json!({"note": note})))?;
    if json_out {
        print_json(&r);
    } else {
        println!(
            "{id}: {} ({}) attestation {}",
            r["decision"].as_str().unwrap_or_default(),
            r["reason"].as_str().unwrap_or_default(),
            r["attestation_id"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Where a client command reaches the daemon: `--socket`, else `$SLUICE_SOCKET`, else `[api] socket`
/// of the configuration file, else the built-in default. Resolved only when a command first
/// talks to the daemon, so commands that never do (`issuer init`, `passport issue`) never read the
/// configuration.
#[derive(Debug)]
pub struct ApiSocket {
    flag: Option<PathBuf>,
    env: Option<PathBuf>,
    config: PathBuf,
    /// `--config` was given: a file that cannot be read is an error, not a fallback.
    config_explicit: bool,
    resolved: std::sync::OnceLock<PathBuf>,
}

impl ApiSocket {
    pub fn new(flag: Option<PathBuf>, env: Option<PathBuf>, config: PathBuf, config_explicit: bool) -> ApiSocket {
        ApiSocket { flag, env, config, config_explicit, resolved: std::sync::OnceLock::new() }
    }

    /// The socket path, reading the configuration if neither the flag nor the variable names one.
    pub fn path(&self) -> anyhow::Result<&Path> {
        if let Some(p) = self.resolved.get() {
            return Ok(p);
        }
        let p = self.resolve()?;
        Ok(self.resolved.get_or_init(|| p))
    }

    fn resolve(&self) -> anyhow::Result<PathBuf> {
        if let Some(p) = self.flag.as_ref().or(self.env.as_ref()) {
            return Ok(p.clone());
        }
        match crate::config::Config::load(&self.config) {
            Ok(config) => Ok(config.api.socket),
            // No configuration at the default place: the daemon runs with built-in defaults too.
            Err(crate::config::ConfigError::Read { source, .. })
                if !self.config_explicit && source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(PathBuf::from(crate::config::DEFAULT_SOCKET))
            }
            Err(e) => Err(anyhow::anyhow!(
                "{e}; the daemon's socket is read from [api] socket of this file: fix it, name another with \
                 --config FILE, or name the socket with --socket PATH (or $SLUICE_SOCKET)"
            )),
        }
    }
}
