//! The `sluice` command line. Each subcommand lives in its own module; this one parses the
//! arguments, runs the command and turns any error into one line on stderr and exit status 1.

mod audit;
mod catalog;
mod daemon;
mod detach;
mod discover;
mod fleet;
mod gate;
mod issuer;
pub mod man;
mod ops;
mod passport;
mod policy;
mod run;
mod sandbox;
mod templates;
mod util;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "sluice",
    version,
    about = "Provable network limits for AI agents: passports, kernel redirect, an intercepting proxy and an attested log.",
    long_about = None,
)]
pub struct Cli {
    /// Daemon configuration file [default: /etc/sluice/sluice.toml]. Commands that talk to the
    /// daemon take its socket from `[api] socket` here unless --socket or $SLUICE_SOCKET names one.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The daemon's local API socket [default: $SLUICE_SOCKET, else `[api] socket` of the
    /// configuration file, else /run/sluice/sluice.sock].
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create and manage passport issuers (Ed25519 signing keys).
    #[command(subcommand)]
    Issuer(issuer::IssuerCmd),
    /// Issue, inspect, verify, register and revoke passports.
    #[command(subcommand)]
    Passport(passport::PassportCmd),
    /// Run the enforcer in the foreground: eBPF redirect, intercepting proxy, DNS resolver, local API
    /// and attestation store.
    Daemon(daemon::DaemonArgs),
    /// Run CMD (and every process it starts) under enforcement with a passport; exits with CMD's
    /// status.
    Run(run::RunArgs),
    /// Passport-only mode: ask the daemon for a decision on one action (prints the decision JSON;
    /// exit status 0 allow, 3 block, 4 request_hold).
    Enforce(ops::EnforceArgs),
    /// List sandboxes; bind an existing cgroup (a systemd agent unit) to a passport, or unbind it.
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCmd),
    /// Show a passport's cumulative spend and rate counters, or reset them (attested).
    State(ops::StateArgs),
    /// List pending approvals, or approve / deny one (the approver is attested).
    Holds(ops::HoldsArgs),
    /// Emergency stop: refuse every connection and request of one passport's agents, or of all
    /// agents, at once (attested; survives restarts).
    ///
    /// New connections and DNS queries of the stopped sandboxes fail in the kernel (EPERM), open
    /// connections are closed (a streaming response is cut), pending holds are denied, and every
    /// further request is refused with reason emergency_stop. `sluice resume` lifts it; `--list`
    /// shows the stops in force.
    Stop(ops::StopArgs),
    /// Lift an emergency stop (`sluice stop`): `--passport ID` or `--all` (attested).
    ///
    /// `--all` lifts the stop of every agent; passports stopped one by one stay stopped until
    /// resumed one by one (the command names them).
    Resume(ops::ResumeArgs),
    /// Validate host policies: every error with its file, line and field.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Export, prove and verify the attestation log.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// A fleet of hosts sharing budgets through Redis: list every host's published checkpoint.
    #[command(subcommand)]
    Fleet(fleet::FleetCmd),
    /// Check a gate's permission catalogs offline (signature, hash, version chain).
    #[command(subcommand)]
    Catalog(catalog::CatalogCmd),
    /// Fetch, verify and pin a gate's catalog (through the daemon), and print its offer.
    ///
    /// The daemon fetches https://HOST[:PORT]/.well-known/sluice and the catalog versions over its
    /// own upstream path (full certificate checks, its resolver), verifies each version's
    /// signature and hash, the version chain, the inclusion proof of the version in force in the
    /// gate's log and that log's consistency with the checkpoint it pinned before, then pins the
    /// gate key, version and checkpoint for the host. A rollback, another key, a second document
    /// for a seen version or a forked log is refused, naming the gate.
    Discover(discover::DiscoverArgs),
    /// Remove the eBPF programs a stopped daemon left attached to the agents' cgroup (uninstall).
    ///
    /// A sluice daemon that stops or crashes leaves its eBPF programs attached to the agents'
    /// cgroup and pinned under [sandbox] pin_dir, on purpose: agents' connections are then
    /// refused, never sent out unchecked, and a restarted daemon takes the programs over. This
    /// command takes them off: it reads pin_dir and the agents' cgroup from --config, lists each
    /// pinned link and map it removes, and says how many processes are in the cgroup.
    ///
    /// What it means: once detached, nothing redirects the agents' cgroup. Processes in it (and
    /// anything started there later) connect and resolve names directly, and no passport is
    /// enforced on their traffic, until a daemon is started again. Stop the agents first
    /// (systemctl stop 'sluice-agent@*') if they must not run unconfined.
    ///
    /// It refuses while a daemon is running (a process holds the pinned programs or maps, or the
    /// API socket answers) unless --force is given. Nothing pinned is success: it says so and
    /// exits 0. Needs root. The package runs it when sluice is removed (not on upgrade, where the
    /// new daemon takes over the pinned programs without a gap).
    Detach(detach::DetachArgs),
    /// A gate in front of a service: checks arriving agents' passports and signed requests,
    /// applies the service's limits and attests every decision in its own log (docs/gate.md).
    #[command(subcommand)]
    Gate(gate::GateCmd),
}

/// The configuration file when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/sluice/sluice.toml";

/// A command's exit status, or the error that stopped it (printed as one line, exit status 1).
pub type CmdResult = anyhow::Result<ExitCode>;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Daemon(_) | Command::Gate(gate::GateCmd::Run(_))) {
        // A command piped into `head` should end quietly, as Unix tools do, not panic on EPIPE.
        // The daemon and a gate keep Rust's default (SIGPIPE ignored): a vanished peer must never kill it.
        crate::kernel::process::default_sigpipe();
    }
    let config_explicit = cli.config.is_some();
    let config = cli.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let env_socket = std::env::var_os("SLUICE_SOCKET").filter(|s| !s.is_empty()).map(PathBuf::from);
    let socket = ops::ApiSocket::new(cli.socket.clone(), env_socket.clone(), config.clone(), config_explicit);
    let result = match cli.command {
        Command::Issuer(cmd) => issuer::run(cmd),
        Command::Passport(cmd) => passport::run(cmd, &socket),
        Command::Daemon(args) => daemon::run(args, &config, cli.socket.as_deref()),
        Command::Enforce(args) => ops::enforce(args, &socket),
        Command::Run(args) => run::run(args, &socket),
        Command::Sandbox(cmd) => sandbox::run(cmd, &socket),
        Command::State(args) => ops::state(args, &socket),
        Command::Holds(args) => ops::holds(args, &socket),
        Command::Stop(args) => ops::stop(args, &socket),
        Command::Resume(args) => ops::resume(args, &socket),
        Command::Audit(cmd) => audit::run(cmd, &socket, &config),
        Command::Discover(args) => discover::run(args, &socket),
        Command::Fleet(cmd) => fleet::run(cmd, &config),
        Command::Catalog(cmd) => catalog::run(cmd, config_explicit.then_some(config.as_path())),
        Command::Policy(cmd) => policy::run(cmd, &config),
        Command::Gate(cmd) => gate::run(cmd, config_explicit.then_some(config.as_path())),
        Command::Detach(args) => {
            let sockets: Vec<PathBuf> = cli.socket.iter().chain(env_socket.iter()).cloned().collect();
            detach::run(args, &config, &sockets)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}
