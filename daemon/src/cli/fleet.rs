//! `sluice fleet status`: what the fleet's Redis holds, read with the `[fleet]` of the
//! configuration file (no daemon needed). Also the fleet's half of `sluice audit verify --fleet`.

use super::CmdResult;
use crate::config::Config;
use crate::files::{self, Links};
use crate::fleet::checkpoints::{self, Dump, HostView, DUMP_FORMAT};
use crate::fleet::claims::{self, Claims};
use crate::fleet::{Keys, RedisConn};
use anyhow::Context;
use chrono::Utc;
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Subcommand, Debug)]
pub enum FleetCmd {
    /// List every host of the fleet: its latest published checkpoint (size, root, time, age)
    /// and whether its signature verifies under the key registered for the host.
    ///
    /// Reads Redis with `[fleet]` of --config; no daemon needs to run. Entries that do not verify
    /// are listed as REFUSED and never believed (exit status 1).
    Status(StatusArgs),
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
    /// Also write every host's published checkpoints to this file (never overwritten), for
    /// `sluice audit verify --fleet-checkpoints FILE` without access to Redis.
    #[arg(long, value_name = "FILE")]
    checkpoints_out: Option<PathBuf>,
}

pub fn run(cmd: FleetCmd, config: &Path) -> CmdResult {
    match cmd {
        FleetCmd::Status(a) => status(a, config),
    }
}

/// The fleet's Redis, as `[fleet]` in `config` names it.
struct Fleet {
    conn: Arc<RedisConn>,
    keys: Keys,
    rt: tokio::runtime::Runtime,
    config: PathBuf,
}

impl Fleet {
    fn open(config_path: &Path) -> anyhow::Result<Fleet> {
        let config = Config::load(config_path)?;
        let Some(fleet) = config.fleet else {
            anyhow::bail!(
                "{}: has no [fleet] section; name the fleet's configuration with --config",
                config_path.display()
            );
        };
        Ok(Fleet {
            conn: Arc::new(RedisConn::new(&fleet)?),
            keys: Keys::from_config(&fleet),
            rt: tokio::runtime::Builder::new_current_thread().enable_all().build()?,
            config: config_path.to_path_buf(),
        })
    }

    fn checkpoints(&self) -> anyhow::Result<Dump> {
        let hosts = self
            .rt
            .block_on(checkpoints::read_fleet(&self.conn, &self.keys))
            .with_context(|| format!("reading the fleet's checkpoints ([fleet] of {})", self.config.display()))?;
        Ok(Dump {
            format: DUMP_FORMAT.into(),
            redis: self.conn.url().to_string(),
            prefix: self.keys.prefix().to_string(),
            taken_at: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            hosts,
        })
    }

    fn claims(&self) -> anyhow::Result<Claims> {
        self.rt
            .block_on(claims::read_claims(&self.conn, &self.keys))
            .with_context(|| format!("reading the fleet's budget claims ([fleet] of {})", self.config.display()))
    }
}

/// Reads the fleet's checkpoints from the Redis of `[fleet]` in `config`.
pub fn read_from_redis(config_path: &Path) -> anyhow::Result<Dump> {
    Fleet::open(config_path)?.checkpoints()
}

/// Bound on a dump file.
const MAX_DUMP_BYTES: u64 = 256 << 20;

/// Reads a dump written by `sluice fleet status --checkpoints-out`.
pub fn read_dump(path: &Path) -> anyhow::Result<Dump> {
    let text = files::read_text(path, MAX_DUMP_BYTES, Links::Follow)?;
    let dump: Dump = serde_json::from_str(&text).with_context(|| {
        format!("{}: not a dump of fleet checkpoints (sluice fleet status --checkpoints-out)", path.display())
    })?;
    if dump.format != DUMP_FORMAT {
        anyhow::bail!("{}: format is {:?}, expected {DUMP_FORMAT:?}", path.display(), dump.format);
    }
    Ok(dump)
}

fn status(a: StatusArgs, config: &Path) -> CmdResult {
    let fleet = Fleet::open(config)?;
    let dump = fleet.checkpoints()?;
    let claims = fleet.claims()?;
    if let Some(out) = &a.checkpoints_out {
        let text = serde_json::to_string_pretty(&dump)? + "\n";
        files::create_new(out, text.as_bytes(), 0o644)?;
    }
    let now = Utc::now();
    let mut views: Vec<HostView> = dump.hosts.iter().map(|h| checkpoints::judge(h, now)).collect();
    // Hosts that hold claims but never published a checkpoint nor said hello are listed too.
    for c in &claims.claims {
        if !views.iter().any(|v| v.host_id == c.host) {
            views.push(checkpoints::judge(
                &checkpoints::HostCheckpoints {
                    host_id: c.host.clone(),
                    vkey: None,
                    entries: Vec::new(),
                    unreadable: Vec::new(),
                },
                now,
            ));
        }
    }
    let refused: usize = views.iter().map(|v| v.refused.len()).sum();
    if a.json {
        let mut hosts = serde_json::to_value(&views)?;
        for h in hosts.as_array_mut().into_iter().flatten() {
            let id = h["host_id"].as_str().unwrap_or_default().to_string();
            let mine: Vec<&claims::Claim> = claims.claims.iter().filter(|c| c.host == id).collect();
            if let Some(obj) = h.as_object_mut() {
                obj.insert("claims".into(), serde_json::to_value(mine)?);
            }
        }
        let doc = serde_json::json!({
            "redis": dump.redis,
            "prefix": dump.prefix,
            "taken_at": dump.taken_at,
            "hosts": hosts,
            "claims_truncated": claims.truncated,
            "claims_unreadable": claims.unreadable,
            "ok": refused == 0,
        });
        super::util::print_json(&doc);
    } else {
        print_table(&dump, &views);
        print_claims(&claims);
        if let Some(out) = &a.checkpoints_out {
            println!("checkpoints of {} host(s) written to {}", dump.hosts.len(), out.display());
        }
    }
    if refused > 0 {
        eprintln!(
            "sluice: {refused} published checkpoint(s) do not verify under their host's registered key: someone \
             other than the host wrote them to Redis (see REFUSED above)"
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(dump: &Dump, views: &[HostView]) {
    println!("fleet {} (prefix {}), {} host(s), read at {}", dump.redis, dump.prefix, views.len(), dump.taken_at);
    println!(
        "{:<24} {:>10}  {:<16}  {:<20}  {:>8}  {:<9}  {:>5}",
        "HOST", "SIZE", "ROOT", "PUBLISHED", "AGE", "SIGNATURE", "KEPT"
    );
    for v in views {
        let (size, root, at, age) = match &v.latest {
            Some(l) => (
                l.size.to_string(),
                l.root.get(..16).unwrap_or(&l.root).to_string(),
                l.published_at.clone(),
                l.age_secs.map(age).unwrap_or_else(|| "-".into()),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let signature = match (&v.key_problem, &v.latest) {
            (Some(_), _) if v.vkey.is_none() => "no key",
            (Some(_), _) => "bad key",
            (None, Some(_)) => "ok",
            (None, None) => "none",
        };
        println!("{:<24} {size:>10}  {root:<16}  {at:<20}  {age:>8}  {signature:<9}  {:>5}", v.host_id, v.verified);
    }
    for v in views {
        if let (Some(problem), Some(_)) = (&v.key_problem, &v.vkey) {
            println!("KEY      {}: {problem}", v.host_id);
        }
        for r in &v.refused {
            println!(
                "REFUSED  {}: checkpoint claiming size {} published {}: {}",
                v.host_id,
                r.size.map(|s| s.to_string()).unwrap_or_else(|| "?".into()),
                r.published_at.as_deref().unwrap_or("?"),
                r.reason
            );
        }
    }
}

/// The budget claims, one line per (passport, limit, window) and host, with the window's total.
fn print_claims(c: &Claims) {
    if c.claims.is_empty() {
        println!("no budget claims (no host holds a lease of a shared spend cap or rate limit)");
    } else {
        println!("claims: what each host may spend in the window (spent + unused lease)");
        println!("{:<36} {:<12} {:<24} {:<24} {:>12}", "PASSPORT", "LIMIT", "WINDOW", "HOST", "CLAIM");
        let mut i = 0;
        while let Some(first) = c.claims.get(i) {
            let group: Vec<&claims::Claim> = c.claims[i..]
                .iter()
                .take_while(|x| x.passport == first.passport && x.limit == first.limit && x.window == first.window)
                .collect();
            for x in &group {
                println!(
                    "{:<36} {:<12} {:<24} {:<24} {:>12}",
                    x.passport,
                    x.limit,
                    x.window,
                    x.host,
                    amount(x.claim, x.unit)
                );
            }
            if group.len() > 1 {
                let total = group.iter().fold(0u64, |t, x| t.saturating_add(x.claim));
                println!("{:<36} {:<12} {:<24} {:<24} {:>12}", "", "", "", "(all hosts)", amount(total, first.unit));
            }
            i += group.len();
        }
    }
    if c.truncated {
        println!("NOTE     more than {} budget keys: the list above is cut short", claims::MAX_BUDGET_KEYS);
    }
    for u in &c.unreadable {
        println!("SKIPPED  {u}");
    }
}

fn amount(n: u64, unit: &str) -> String {
    if unit == "cents" {
        format!("${}.{:02}", n / 100, n % 100)
    } else {
        format!("{n} req")
    }
}

/// `3s`, `4m10s`, `2h3m`, `5d2h`.
fn age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ages_read_at_a_glance() {
        assert_eq!(super::age(-4), "0s");
        assert_eq!(super::age(59), "59s");
        assert_eq!(super::age(250), "4m10s");
        assert_eq!(super::age(7380), "2h3m");
        assert_eq!(super::age(5 * 86_400 + 7200), "5d2h");
    }
}
