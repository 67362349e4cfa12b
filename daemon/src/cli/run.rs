//! `sluice run --passport F -- CMD [ARGS…]`: run CMD, and every process it starts, under
//! enforcement.
//!
//! 1. Non-root (and without `--no-pid-namespace`): make the agent's user namespace, first thing
//!    (`confine::enter_user_namespace`; the caller's uid and gid mapped to themselves), so that
//!    the daemon sees it when asked for the sandbox.
//! 2. Register the passport with the daemon (a no-op if it already is).
//! 3. Ask for a sandbox (handing over the agent key given with `--key`, which the daemon keeps
//!    in memory for this sandbox only, to sign requests to gates): the daemon creates a cgroup bound to the passport, registers this
//!    process's user namespace with the Unix socket filter (the only one besides the daemon's
//!    from which the sandbox may reach Unix sockets by name), and moves *this* process into the
//!    cgroup, before this process has opened any network socket.
//! 4. Point `TMPDIR` and `XDG_RUNTIME_DIR` at the sandbox's own directory (the only place where
//!    the agent's own Unix sockets can be reached by name), and common clients at the CA bundle
//!    (environment).
//! 5. Start CMD confined (`sluice_kernel::confine`): in its own PID namespace with a fresh
//!    `/proc` (non-root: inside a user namespace that maps the caller's ids to themselves), so it
//!    cannot name, trace, signal or read any process outside the sandbox; under seccomp filters
//!    that allow only inet, Unix and route-netlink sockets and no io_uring. In that private mount
//!    namespace the CA bundle is bind-mounted over the system bundle, for agents that ignore the
//!    environment. CMD inherits the cgroup.
//! 6. Wait, passing signals on, and exit with CMD's status. When this process exits the daemon
//!    kills anything left in the sandbox and removes it.

use super::ops::call;
use super::ops::ApiSocket;
use super::CmdResult;
use crate::kernel::confine::{self, Namespaces};
use anyhow::{bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use clap::Args;
use http::Method;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use zeroize::Zeroizing;

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
    /// The agent's private key: proves possession (required for L3 passports; default
    /// PASSPORT.key for them) and, when given, is handed to the daemon for this sandbox only
    /// (kept in memory, dropped when the sandbox ends), which then signs the agent's requests to
    /// the hosts in its `[gates] hosts` (the agent never handles the key).
    #[arg(long, value_name = "F.key")]
    key: Option<PathBuf>,
    /// Bind-mount the sluice CA bundle over the system bundle in the agent's private mount
    /// namespace, and fail if that is not possible (by default it is tried, and a failure is a
    /// note).
    #[arg(long, overrides_with = "no_bind_ca")]
    bind_ca: bool,
    /// Do not bind-mount the CA bundle; only set the environment variables.
    #[arg(long)]
    no_bind_ca: bool,
    /// DANGEROUS: run CMD without its own PID, user and mount namespaces, for hosts where user
    /// namespaces cannot be enabled. CMD can then signal every process of your user and read or
    /// write their memory through /proc/PID/mem (ptrace itself stays refused).
    #[arg(long)]
    no_pid_namespace: bool,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD")]
    cmd: Vec<String>,
}

pub fn run(a: RunArgs, socket: &ApiSocket) -> CmdResult {
    let ns = if a.no_pid_namespace {
        eprintln!(
            "sluice: WARNING: --no-pid-namespace: the agent shares your PID namespace: it can signal every process of \
             your user and read or write their memory through /proc/PID/mem (ptrace itself is refused). Use it only \
             where user namespaces cannot be enabled, with the agent running as a user of its own."
        );
        Namespaces::Off
    } else {
        Namespaces::for_caller()
    };
    // Before the sandbox is asked for (and before anything could start a thread): the daemon
    // registers the user namespace the caller is in when it creates the sandbox.
    if ns == Namespaces::User {
        confine::enter_user_namespace()?;
    }
    let token = super::util::read_token(&a.passport)?;
    // L3: prove possession of the agent key, at registration and again for the sandbox.
    let pop = super::ops::proof_of_possession(&token, a.key.as_deref(), &a.passport, socket)?;
    let reg = call(socket, Method::POST, "/v1/passports", Some(json!({"passport": token, "pop": pop})))
        .with_context(|| format!("registering {}", a.passport.display()))?;
    let passport_id = reg["passport_id"].as_str().context("the daemon did not return a passport id")?.to_string();
    // An explicit --key is handed over for signing requests to gates (see `agent_key_field`).
    let agent_key = a.key.as_deref().map(agent_key_field).transpose()?;
    let mut body = json!({"passport_id": passport_id, "pop": pop});
    if let Some(k) = agent_key {
        body["agent_key"] = Value::String(k.to_string());
    }
    let sandbox = call(socket, Method::POST, "/v1/sandboxes", Some(body)).context("creating the sandbox")?;
    // From here on this process is inside the sandbox: the daemon will refuse its API calls.
    if let Some(why) = sandbox["unix_names_refused"].as_str() {
        eprintln!(
            "sluice: note: the daemon did not register this sandbox's user namespace ({why}): the agent can reach \
             no Unix socket by name, not even in its TMPDIR (socketpair still works)"
        );
    }
    if a.key.is_some() && sandbox["signs_for_gates"] != Value::Bool(true) {
        eprintln!(
            "sluice: note: the daemon did not take the agent key (an older daemon?): requests to gates go out unsigned"
        );
    }
    let bundle = sandbox["ca_bundle"].as_str().map(PathBuf::from).filter(|p| p.is_file());
    let mut cmd = Command::new(&a.cmd[0]);
    cmd.args(&a.cmd[1..]);
    // The sandbox's own directory: the one place where Unix sockets the agent creates can be
    // reached by name (crates/kernel/src/unix.rs).
    if let Some(dir) = sandbox["unix_dir"].as_str() {
        cmd.env("TMPDIR", dir).env("XDG_RUNTIME_DIR", dir);
    }
    // A private mount namespace exists for the agent unless there are no namespaces and no root.
    let can_bind = ns != Namespaces::Off || nix::unistd::geteuid().is_root();
    if a.bind_ca && !can_bind {
        bail!(
            "--bind-ca needs a private mount namespace, which --no-pid-namespace gives only to root; drop one of them"
        );
    }
    let explicit = a.bind_ca;
    let bind = |b: &Path| {
        let b = b.to_path_buf();
        move || match bind_ca(&b) {
            Err(e) if explicit => Err(format!("--bind-ca: {e}")),
            Err(e) => {
                eprintln!("sluice: note: CA bundle not bind-mounted ({e}); clients that ignore SSL_CERT_FILE will not trust the sluice CA");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    };
    let mut mounts = None;
    if let Some(b) = &bundle {
        for var in CA_ENV {
            cmd.env(var, b);
        }
        if !a.no_bind_ca && can_bind {
            mounts = Some(bind(b));
        }
    }
    let code = confine::run(cmd, ns, mounts.as_mut().map(|m| m as confine::Mounts<'_>))?;
    Ok(ExitCode::from(code))
}

/// The agent's private key as the API takes it (`agent_key`): unpadded base64url of the 32-byte
/// Ed25519 key. The daemon checks that it is the key the passport is bound to (`cnf.jkt`).
fn agent_key_field(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    let key = crate::keyfile::load_signing_key(path)
        .with_context(|| format!("the agent key {}, to sign requests to gates", path.display()))?;
    Ok(Zeroizing::new(URL_SAFE_NO_PAD.encode(key.to_bytes())))
}

/// Bind-mounts `bundle` read-only over each system CA bundle, in the agent's private mount
/// namespace (made by `confine::run`), so agents that ignore the environment still trust the
/// sluice CA.
fn bind_ca(bundle: &Path) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    use nix::sys::statvfs::{statvfs, FsFlags};
    for target in SYSTEM_BUNDLES.iter().map(Path::new).filter(|p| p.is_file()) {
        mount(Some(bundle), target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(|e| format!("bind-mounting {} over {}: {e}", bundle.display(), target.display()))?;
        // The read-only remount must repeat the flags the bind mount has: inside a user namespace
        // the kernel locks those that came from the host's mount, and refuses to clear them.
        let have = statvfs(target).map_err(|e| format!("statvfs {}: {e}", target.display()))?.flags();
        let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        for (st, ms) in [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        ] {
            if have.contains(st) {
                flags |= ms;
            }
        }
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
            .map_err(|e| format!("making {} read-only: {e}", target.display()))?;
    }
    Ok(())
}
