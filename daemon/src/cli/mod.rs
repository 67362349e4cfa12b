//! The `sluice` command line. Each subcommand lives in its own module; this one parses the
//! arguments, runs the command and turns any error into one line on stderr and exit status 1.

mod issuer;
mod passport;
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
    /// Daemon configuration file.
    #[arg(long, global = true, value_name = "FILE", default_value = "/etc/sluice/sluice.toml")]
    pub config: PathBuf,
    /// The daemon's local API socket.
    #[arg(long, global = true, value_name = "PATH", default_value = "/run/sluice/sluice.sock")]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create and manage passport issuers (Ed25519 signing keys).
    #[command(subcommand)]
    Issuer(issuer::IssuerCmd),
    /// Issue, inspect and verify passports.
    #[command(subcommand)]
    Passport(passport::PassportCmd),
}

/// A command's failure. `Failed` is a verdict (exit 1, e.g. a passport that does not verify);
/// anything else is an error running the command (also exit 1).
pub type CmdResult = anyhow::Result<ExitCode>;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Issuer(cmd) => issuer::run(cmd),
        Command::Passport(cmd) => passport::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}
