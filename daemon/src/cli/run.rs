//! `sluice run --passport F -- CMD [ARGS…]`: run CMD, and every process it starts, under
//! enforcement.
//!
//! 1. Register the passport with the daemon (a no-op if it already is).
//! 2. Ask for a sandbox: the daemon creates a cgroup bound to the passport and moves *this*
//!    process into it, before this process has opened any network socket.
//! 3. Point `TMPDIR` and `XDG_RUNTIME_DIR` at the sandbox's own directory (the only place where
//!    the agent's own Unix sockets can be reached), and common clients at the CA bundle (environment), and where possible (root) bind-mount
//!    it over the system bundle in a private mount namespace, for agents that ignore the
//!    environment.
//! 4. Start CMD (it inherits the cgroup), wait, and exit with its status. When this process
//!    exits the daemon kills anything left in the sandbox and removes it.

use super::ops::call;
use super::ops::ApiSocket;
use super::CmdResult;
use anyhow::{bail, Context};
use clap::Args;
use http::Method;
use serde_json::json;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Environment variables through which common clients find their trusted roots.
pub const CA_ENV: &[&str] =
    &["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO"];

/// System CA bundles that `--bind-ca` covers, where they exist.
const SYSTEM_BUNDLES: &[&str] =
    &["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The agent's passport.
    #[arg(long, value_name = "F")]
    passport: PathBuf,
    /// The agent's private key, to prove possession (required for L3 passports; default
    /// PASSPORT.key for them).
    #[arg(long, value_name = "F.key")]
    key: Option<PathBuf>,
    /// Bind-mount the sluice CA bundle over the system bundle in a private mount namespace
    /// (needs root; on by default when possible).
    #[arg(long, overrides_with = "no_bind_ca")]
    bind_ca: bool,
    /// Do not bind-mount the CA bundle; only set the environment variables.
    #[arg(long)]
    no_bind_ca: bool,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD")]
    cmd: Vec<String>,
}

pub fn run(a: RunArgs, socket: &ApiSocket) -> CmdResult {
    let token = super::util::read_token(&a.passport)?;
    // L3: prove possession of the agent key, at registration and again for the sandbox.
    let pop = super::ops::proof_of_possession(&token, a.key.as_deref(), &a.passport, socket)?;
    let reg = call(socket, Method::POST, "/v1/passports", Some(json!({"passport": token, "pop": pop})))
        .with_context(|| format!("registering {}", a.passport.display()))?;
    let passport_id = reg["passport_id"].as_str().context("the daemon did not return a passport id")?.to_string();
    let sandbox = call(socket, Method::POST, "/v1/sandboxes", Some(json!({"passport_id": passport_id, "pop": pop})))
        .context("creating the sandbox")?;
    // From here on this process is inside the sandbox: the daemon will refuse its API calls.
    let bundle = sandbox["ca_bundle"].as_str().map(PathBuf::from).filter(|p| p.is_file());
    let mut cmd = Command::new(&a.cmd[0]);
    cmd.args(&a.cmd[1..]);
    // The sandbox's own directory: the one place where Unix sockets the agent creates can be
    // reached by name (crates/kernel/src/unix.rs).
    if let Some(dir) = sandbox["unix_dir"].as_str() {
        cmd.env("TMPDIR", dir).env("XDG_RUNTIME_DIR", dir);
    }
    if let Some(b) = &bundle {
        for var in CA_ENV {
            cmd.env(var, b);
        }
        let want_bind = !a.no_bind_ca;
        if want_bind && nix::unistd::geteuid().is_root() {
            if let Err(e) = bind_ca(b) {
                if a.bind_ca {
                    bail!("--bind-ca: {e:#}");
                }
                eprintln!("sluice: note: CA bundle not bind-mounted ({e:#}); clients that ignore SSL_CERT_FILE will not trust the sluice CA");
            }
        } else if a.bind_ca {
            bail!("--bind-ca needs root (a private mount namespace); run as root or use --no-bind-ca");
        }
    }
    let status = cmd.status().with_context(|| format!("cannot start {:?}", a.cmd[0]))?;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(sig)) => ExitCode::from(128u8.wrapping_add(sig as u8)),
        _ => ExitCode::FAILURE,
    })
}

/// A private mount namespace in which `bundle` is bind-mounted read-only over each system CA
/// bundle, so agents that ignore the environment still trust the sluice CA.
fn bind_ca(bundle: &Path) -> anyhow::Result<()> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
    // Nothing mounted here may propagate back to the host.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .context("making / a slave mount")?;
    for target in SYSTEM_BUNDLES.iter().map(Path::new).filter(|p| p.is_file()) {
        mount(Some(bundle), target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .with_context(|| format!("bind-mounting over {}", target.display()))?;
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .with_context(|| format!("making {} read-only", target.display()))?;
    }
    Ok(())
}
