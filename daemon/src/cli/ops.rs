//! Commands that talk to a running daemon over its local API: `passport register|revoke`,
//! `enforce`, `state`, `holds`, `stop`, `resume`.

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

/// Whole cents as dollars (`$1.50`); `-` when not a number.
fn dollars(v: &Value) -> String {
    v.as_u64().map(|c| crate::passport::Cents(c).to_string()).unwrap_or_else(|| "-".into())
}

/// An amount the API gives in `{name}_millicents` (exact) and `{name}_cents` (rounded up), as
/// dollars with its fraction (`$0.00042`): the exact field when present (a daemon from before
/// millicents has only the cents one).
fn exact_dollars(obj: &Value, name: &str) -> String {
    match obj[format!("{name}_millicents")].as_u64() {
        Some(m) => crate::money::dollars(m),
        None => dollars(&obj[format!("{name}_cents")]),
    }
}

/// `--cost-cents`: whole cents or up to three decimals, in millicents.
fn parse_cost(s: &str) -> Result<u64, String> {
    crate::money::parse_cents(s, crate::money::MAX_MILLICENTS).map_err(|e| e.to_string())
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
    /// What the action costs, in cents: whole (250) or with up to three decimals (0.005 is
    /// 5 millicents, $0.00005).
    #[arg(long = "cost-cents", value_name = "N", default_value = "0", value_parser = parse_cost)]
    cost_millicents: u64,
    /// The host the action goes to (checked against the domain allowlist).
    #[arg(long, value_name = "T")]
    target: Option<String>,
}

/// Prints the decision JSON. Exit status: 0 allow, 3 block, 4 request_hold, 1 error.
pub fn enforce(a: EnforceArgs, socket: &ApiSocket) -> CmdResult {
    let mut body = json!({"passport_id": a.passport_id, "action": a.action, "target": a.target});
    // Whole cents go as cost_cents (any daemon reads it); a fraction as exact millicents.
    if a.cost_millicents.is_multiple_of(crate::money::PER_CENT) {
        body["cost_cents"] = (a.cost_millicents / crate::money::PER_CENT).into();
    } else {
        body["cost_millicents"] = a.cost_millicents.into();
    }
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
    print!("{}", state_text(s));
}

/// The `sluice state` table: spend as dollars with its fraction (`$0.00042`), never rounded.
fn state_text(s: &Value) -> String {
    use std::fmt::Write;
    let limit = |v: &Value| if v.is_null() { "no limit".to_string() } else { dollars(v) };
    let mut out = String::new();
    let _ = writeln!(out, "passport        {}", s["passport_id"].as_str().unwrap_or_default());
    let _ =
        writeln!(out, "today           {} of {}", exact_dollars(s, "daily_cost"), limit(&s["daily_cost_limit_cents"]));
    let _ = writeln!(
        out,
        "requests today  {}{}",
        s["daily_requests"],
        s["daily_request_limit"].as_u64().map(|l| format!(" of {l}")).unwrap_or_default()
    );
    if let Some(w) = s["window"].as_str() {
        let _ = writeln!(
            out,
            "{:<15} {} of {}",
            format!("{w} window"),
            exact_dollars(s, "window_cost"),
            limit(&s["window_cost_limit_cents"])
        );
    }
    let _ = writeln!(out, "resets at       {}", s["window_resets_at"].as_str().unwrap_or("-"));
    if s["revoked"].as_bool() == Some(true) {
        let _ = writeln!(out, "REVOKED");
    }
    out
}

/// One line of `sluice holds`.
fn hold_line(h: &Value) -> String {
    format!(
        "{}  {}  {} {}  {}  expires {}",
        h["id"].as_str().unwrap_or_default(),
        h["passport_id"].as_str().unwrap_or_default(),
        h["request"]["action"].as_str().unwrap_or_default(),
        h["request"]["host"].as_str().unwrap_or_default(),
        exact_dollars(&h["request"], "cost"),
        h["expires_at"].as_str().unwrap_or_default(),
    )
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
                println!("{}", hold_line(&h));
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

// ---- stop / resume ----

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("scope").required(true).args(["passport", "all", "list"]))]
pub struct StopArgs {
    /// Stop the agents of this passport (pp_…).
    #[arg(long, value_name = "ID")]
    passport: Option<String>,
    /// Stop every agent of this host.
    #[arg(long)]
    all: bool,
    /// Show the stops in force instead.
    #[arg(long)]
    list: bool,
    /// Why: kept in the attestation.
    #[arg(long, value_name = "TEXT", conflicts_with = "list")]
    note: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("scope").required(true).args(["passport", "all"]))]
pub struct ResumeArgs {
    /// Lift the stop of this passport (pp_…).
    #[arg(long, value_name = "ID")]
    passport: Option<String>,
    /// Lift the stop of every agent (`sluice stop --all`).
    #[arg(long)]
    all: bool,
    /// Kept in the attestation.
    #[arg(long, value_name = "TEXT")]
    note: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn stop_body(passport: Option<String>, all: bool, note: Option<String>) -> Value {
    match passport {
        Some(id) => json!({"passport_id": id, "note": note}),
        None => json!({"all": all, "note": note}),
    }
}

fn stop_line(id: &str, e: &Value) -> String {
    let by = match &e["by"] {
        Value::Object(o) => o.get("user").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| {
            format!("uid {}", o.get("uid").and_then(Value::as_u64).map_or("?".into(), |u| u.to_string()))
        }),
        other => other.as_str().unwrap_or("?").to_string(),
    };
    let note = e["note"].as_str().map(|n| format!("  \"{n}\"")).unwrap_or_default();
    format!("{id}  since {}  by {by}  attestation {}{note}", e["at"].as_str().unwrap_or("?"), e["attestation_id"])
}

pub fn stop(a: StopArgs, socket: &ApiSocket) -> CmdResult {
    if a.list {
        let s = call(socket, Method::GET, "/v1/stops", None)?;
        if a.json {
            print_json(&s);
            return Ok(ExitCode::SUCCESS);
        }
        let passports = s["passports"].as_array().cloned().unwrap_or_default();
        if s["all"].is_null() && passports.is_empty() {
            println!("no emergency stop in force");
        }
        if !s["all"].is_null() {
            println!("{}", stop_line("ALL AGENTS", &s["all"]));
        }
        for p in passports {
            println!("{}", stop_line(p["passport_id"].as_str().unwrap_or("?"), &p));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let what = a.passport.clone().unwrap_or_else(|| "every agent".into());
    let r = call(socket, Method::POST, "/v1/stop", Some(stop_body(a.passport, a.all, a.note)))?;
    if a.json {
        print_json(&r);
        return Ok(ExitCode::SUCCESS);
    }
    if r["already_stopped"].as_bool() == Some(true) {
        println!("{what} was already stopped");
    } else {
        println!("{what} stopped (attestation {})", r["attestation_id"]);
    }
    let holds = r["holds_denied"].as_array().map_or(0, Vec::len);
    let sandboxes = r["sandboxes"].as_array().map_or(0, Vec::len);
    let refused =
        if r["scope"] == "all" { "every sandbox".to_string() } else { format!("{sandboxes} live sandbox(es)") };
    if r["kernel"].as_bool() == Some(true) {
        println!("  new connections of {refused} refused in the kernel; open connections closed; {holds} pending hold(s) denied");
    } else {
        println!("  passport-only daemon (no kernel redirect): every request refused; {holds} pending hold(s) denied");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn resume(a: ResumeArgs, socket: &ApiSocket) -> CmdResult {
    let what = a.passport.clone().unwrap_or_else(|| "every agent".into());
    let r = call(socket, Method::POST, "/v1/resume", Some(stop_body(a.passport, a.all, a.note)))?;
    if a.json {
        print_json(&r);
        return Ok(ExitCode::SUCCESS);
    }
    if r["was_stopped"].as_bool() == Some(true) {
        println!("{what} resumed (attestation {})", r["attestation_id"]);
    } else {
        println!("{what} was not stopped; nothing changed");
    }
    let still: Vec<&str> =
        r["still_stopped"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    if !still.is_empty() {
        println!(
            "  still stopped: {} (by `sluice stop --all` or their own stop; resume them by name)",
            still.join(", ")
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn state_shows_spend_with_its_fraction() {
        let s = json!({
            "passport_id": "pp_x", "daily_cost_cents": 1, "daily_cost_millicents": 42,
            "daily_cost_limit_cents": 500, "daily_requests": 7, "daily_request_limit": null,
            "window": "monthly", "window_cost_cents": 1001, "window_cost_millicents": 1_000_050,
            "window_cost_limit_cents": null, "window_resets_at": "2026-06-01T00:00:00Z", "revoked": false,
        });
        let text = state_text(&s);
        assert!(text.contains("today           $0.00042 of $5.00\n"), "{text}");
        assert!(text.contains("monthly window  $10.0005 of no limit\n"), "{text}");
        assert!(text.contains("requests today  7\n"), "{text}");
        // A daemon from before millicents: whole cents only.
        let old = json!({"passport_id": "pp_x", "daily_cost_cents": 250, "daily_cost_limit_cents": null});
        assert!(state_text(&old).contains("today           $2.50 of no limit"), "{}", state_text(&old));
    }

    #[test]
    fn holds_show_the_exact_cost() {
        let h = json!({
            "id": "hold_1", "passport_id": "pp_x", "expires_at": "2026-06-01T00:00:00Z",
            "request": {"action": "llm:chat", "host": "api.example", "cost_cents": 1, "cost_millicents": 5},
        });
        assert_eq!(hold_line(&h), "hold_1  pp_x  llm:chat api.example  $0.00005  expires 2026-06-01T00:00:00Z");
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        enforce: EnforceArgs,
    }

    #[test]
    fn cost_cents_takes_up_to_three_decimals_exactly() {
        let parse = |c: &str| {
            Cli::try_parse_from(["sluice", "--passport-id", "pp_x", "--action", "llm:chat", "--cost-cents", c])
                .map(|cli| cli.enforce.cost_millicents)
        };
        assert_eq!(parse("250").ok(), Some(250_000));
        assert_eq!(parse("0.005").ok(), Some(5));
        assert_eq!(parse("7.5").ok(), Some(7_500));
        let e = parse("0.0001").unwrap_err().to_string();
        assert!(e.contains("0.001 cent"), "{e}");
        assert!(parse("-1").is_err());
        assert!(parse("9007199254740.992").is_err());
        assert_eq!(parse("9007199254740.991").ok(), Some(crate::money::MAX_MILLICENTS));
        let default = Cli::try_parse_from(["sluice", "--passport-id", "pp_x", "--action", "a"]).expect("parses");
        assert_eq!(default.enforce.cost_millicents, 0);
    }
}
