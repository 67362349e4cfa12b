//! `sluice sandbox list | bind | unbind`: sandboxes the daemon knows, and binding cgroups that
//! someone else created (systemd units in `sluice-agents.slice`) to a passport.
//!
//! An agent unit runs, as root and before the agent starts:
//!
//! ```ini
//! ExecStartPre=+/usr/bin/sluice sandbox bind --passport /etc/sluice/agents/%i.jwt
//! ExecStopPost=-+/usr/bin/sluice sandbox unbind
//! ```
//!
//! Without `--cgroup`, the daemon binds the caller's own cgroup (systemd runs `ExecStartPre=` in
//! the unit's cgroup); it accepts that from root only, and for nothing else.

use super::ops::call;
use super::ops::ApiSocket;
use super::util::print_json;
use super::CmdResult;
use anyhow::Context;
use clap::{Args, Subcommand};
use http::Method;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum SandboxCmd {
    /// List live sandboxes: `sluice run` ones and bound cgroups.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Register a passport and bind a cgroup below the agents' cgroup to it. Without --cgroup,
    /// binds the caller's own cgroup (an agent unit's `ExecStartPre=+`; root only).
    Bind(BindArgs),
    /// End a binding (the cgroup and its processes are left alone; their connections are refused
    /// from then on). Without --cgroup, the caller's own cgroup (`ExecStopPost=+`; root only).
    Unbind(UnbindArgs),
}

#[derive(Args, Debug)]
pub struct BindArgs {
    /// The passport (compact JWT) to bind.
    #[arg(long, value_name = "F")]
    passport: PathBuf,
    /// The cgroup, as an absolute path (e.g.
    /// /sys/fs/cgroup/sluice.slice/sluice-agents.slice/my-agent.service).
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct UnbindArgs {
    /// The cgroup, as an absolute path.
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: SandboxCmd, socket: &ApiSocket) -> CmdResult {
    match cmd {
        SandboxCmd::List { json } => {
            let v = call(socket, Method::GET, "/v1/sandboxes", None)?;
            if json {
                print_json(&v);
                return Ok(ExitCode::SUCCESS);
            }
            let list = v["sandboxes"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no sandboxes");
            }
            for s in list {
                let kind = if s["leader_pid"].is_null() {
                    "bound".to_string()
                } else {
                    format!("run pid {}", s["leader_pid"])
                };
                println!(
                    "{}  {}  {}  {}",
                    s["id"].as_str().unwrap_or("-"),
                    s["passport_id"].as_str().unwrap_or("-"),
                    kind,
                    s["cgroup"].as_str().unwrap_or("-")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        SandboxCmd::Bind(a) => {
            let token = super::util::read_token(&a.passport)?;
            let mut body = json!({"passport": token});
            if let Some(cg) = &a.cgroup {
                body["cgroup"] = absolute(cg)?.into();
            }
            let v = call(socket, Method::POST, "/v1/sandboxes/bind", Some(body))
                .with_context(|| format!("binding {} to {}", target(&a.cgroup), a.passport.display()))?;
            report(&v, a.json, "bound")
        }
        SandboxCmd::Unbind(a) => {
            let mut body = json!({});
            if let Some(cg) = &a.cgroup {
                body["cgroup"] = absolute(cg)?.into();
            }
            let v = call(socket, Method::POST, "/v1/sandboxes/unbind", Some(body))
                .with_context(|| format!("unbinding {}", target(&a.cgroup)))?;
            report(&v, a.json, "unbound")
        }
    }
}

fn target(cgroup: &Option<PathBuf>) -> String {
    cgroup.as_ref().map(|c| c.display().to_string()).unwrap_or_else(|| "this process's cgroup".into())
}

fn absolute(p: &Path) -> anyhow::Result<String> {
    anyhow::ensure!(p.is_absolute(), "--cgroup {}: give an absolute path (under the cgroup2 mount)", p.display());
    p.to_str().map(str::to_string).with_context(|| format!("--cgroup {}: not UTF-8", p.display()))
}

fn report(v: &Value, json_out: bool, what: &str) -> CmdResult {
    if json_out {
        print_json(v);
    } else {
        println!(
            "{what} {} -> {}{}",
            v["sandbox_id"].as_str().unwrap_or("-"),
            v["passport_id"].as_str().unwrap_or("-"),
            if v["already_bound"] == true { " (already bound)" } else { "" }
        );
    }
    Ok(ExitCode::SUCCESS)
}
