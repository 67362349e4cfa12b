//! `sluice policy check [DIR]`: validate host policies the way the daemon loads them.

use super::util::print_json;
use super::CmdResult;
use crate::config::{Config, ConfigError};
use crate::policy::{PolicyError, PolicyErrorKind, PolicySet, Summary};
use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Where policies live when neither DIR nor a readable config says otherwise.
pub const DEFAULT_POLICIES_DIR: &str = "/etc/sluice/policies";

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Validate host policies: every error is printed as FILE:LINE:COL: FIELD: message and the
    /// exit status is 1 if there is any; otherwise prints services, routes, raw-TCP rules and the
    /// policy digest the daemon will attest.
    Check(CheckArgs),
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The policy directory. Default: `policies_dir` of the config file, or /etc/sluice/policies
    /// when the config file cannot be read.
    dir: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: PolicyCmd, config_path: &Path) -> CmdResult {
    match cmd {
        PolicyCmd::Check(args) => check(args, config_path),
    }
}

/// Which directory to check, and a note for stderr when it was not named on the command line.
pub fn resolve_dir(explicit: Option<&Path>, config_path: &Path) -> anyhow::Result<(PathBuf, Option<String>)> {
    if let Some(dir) = explicit {
        return Ok((dir.to_path_buf(), None));
    }
    match Config::load(config_path) {
        Ok(config) => Ok((config.policies_dir, None)),
        Err(ConfigError::Read { path, source }) => Ok((
            PathBuf::from(DEFAULT_POLICIES_DIR),
            Some(format!(
                "note: cannot read {} ({source}); checking {DEFAULT_POLICIES_DIR} (pass DIR to check another)",
                path.display()
            )),
        )),
        // A config that exists but is wrong would also stop the daemon: say so rather than guess.
        Err(e) => bail!("{e}; fix the configuration or pass the policy directory as DIR"),
    }
}

fn check(args: CheckArgs, config_path: &Path) -> CmdResult {
    let (dir, note) = resolve_dir(args.dir.as_deref(), config_path)?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    let exists = dir.exists();
    if !exists && args.dir.is_some() {
        bail!("{}: no such directory; pass an existing policy directory", dir.display());
    }
    match PolicySet::load_dir(&dir) {
        Ok(set) => {
            let summary = set.summary();
            if args.json {
                print_json(&summary_json(&dir, &summary));
            } else {
                if !exists {
                    eprintln!("note: {} does not exist: the daemon would run with no host policy", dir.display());
                }
                print!("{}", summary_text(&dir, &summary));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            if args.json {
                print_json(&errors_json(&dir, &errors));
            } else {
                for e in &errors {
                    println!("{e}");
                }
                eprintln!(
                    "sluice: {} error{} in {}; a running daemon keeps its current policy until they are fixed",
                    errors.len(),
                    if errors.len() == 1 { "" } else { "s" },
                    dir.display()
                );
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The human summary of a valid policy directory.
pub fn summary_text(dir: &Path, s: &Summary) -> String {
    let mut out = format!("{}: OK, {} file{}\n", dir.display(), s.files, if s.files == 1 { "" } else { "s" });
    for (name, routes) in &s.services {
        out.push_str(&format!("  service {name}: {routes} route{}\n", if *routes == 1 { "" } else { "s" }));
    }
    out.push_str(&format!(
        "services: {}  routes: {}  raw-TCP rules: {}  denied domains: {}  host rules: {}\n",
        s.services.len(),
        s.routes,
        s.raw_tcp_rules,
        s.deny_domains,
        s.host_rules
    ));
    out.push_str(&format!("digest: {}\n", s.digest));
    out
}

pub fn summary_json(dir: &Path, s: &Summary) -> serde_json::Value {
    json!({
        "ok": true,
        "dir": dir.display().to_string(),
        "files": s.files,
        "services": s.services.iter().map(|(n, r)| json!({"name": n, "routes": r})).collect::<Vec<_>>(),
        "routes": s.routes,
        "raw_tcp_rules": s.raw_tcp_rules,
        "deny_domains": s.deny_domains,
        "host_rules": s.host_rules,
        "digest": s.digest,
    })
}

pub fn errors_json(dir: &Path, errors: &[PolicyError]) -> serde_json::Value {
    let kind = |k: PolicyErrorKind| match k {
        PolicyErrorKind::Read => "read",
        PolicyErrorKind::Syntax => "syntax",
        PolicyErrorKind::Invalid => "invalid",
        PolicyErrorKind::Conflict => "conflict",
    };
    json!({
        "ok": false,
        "dir": dir.display().to_string(),
        "errors": errors.iter().map(|e| json!({
            "file": e.file.display().to_string(),
            "line": e.line,
            "column": e.column,
            "field": e.field,
            "kind": kind(e.kind),
            "message": e.message,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_comes_from_the_argument_the_config_or_the_default() {
        let tmp = tempfile::tempdir().unwrap();
        let (d, note) = resolve_dir(Some(Path::new("/x/p")), Path::new("/nonexistent.toml")).unwrap();
        assert_eq!((d, note), (PathBuf::from("/x/p"), None));

        let (d, note) = resolve_dir(None, &tmp.path().join("missing.toml")).unwrap();
        assert_eq!(d, PathBuf::from(DEFAULT_POLICIES_DIR));
        assert!(note.unwrap().contains("missing.toml"));

        let cfg = tmp.path().join("sluice.toml");
        std::fs::write(&cfg, "state_dir = \"/s\"\npolicies_dir = \"/srv/policies\"\n").unwrap();
        assert_eq!(resolve_dir(None, &cfg).unwrap(), (PathBuf::from("/srv/policies"), None));

        std::fs::write(&cfg, "state_dir = \"/s\"\npolicy_dir = \"/srv/policies\"\n").unwrap();
        let e = resolve_dir(None, &cfg).unwrap_err().to_string();
        assert!(e.contains("policy_dir") && e.contains("pass the policy directory"), "{e}");
    }

    #[test]
    fn summary_and_error_output() {
        let files = vec![(
            PathBuf::from("/p/a.toml"),
            "[service]\nname = \"a\"\ndomains = [\"a.com\"]\n[[route]]\nmethod = \"GET\"\npath = \"/\"\naction = \"a:b\"\ncost_cents = 0\n"
                .to_string(),
        )];
        let s = PolicySet::from_texts(&files).unwrap().summary();
        let text = summary_text(Path::new("/p"), &s);
        assert!(
            text.contains("service a: 1 route\n") && text.contains("routes: 1") && text.contains(&s.digest),
            "{text}"
        );
        assert_eq!(summary_json(Path::new("/p"), &s)["services"][0]["routes"], 1);

        let bad = vec![(PathBuf::from("/p/a.toml"), files[0].1.replace("cost_cents = 0", "cost_cents = -1"))];
        let errs = PolicySet::from_texts(&bad).unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            "/p/a.toml:8:14: route[0].cost_cents: must be from 0 to 9007199254740.991 cents, whole or with up to three decimals: \"-1\" is negative; amounts are never below 0"
        );
        let j = errors_json(Path::new("/p"), &errs);
        assert_eq!((j["ok"].as_bool(), j["errors"][0]["line"].as_u64()), (Some(false), Some(8)));
        assert_eq!(j["errors"][0]["kind"], "invalid");
    }
}
