//! `sluice daemon`: the enforcer in the foreground.

use super::CmdResult;
use crate::api::{access::PeerPolicy, server};
use crate::config::Config;
use crate::kernel;
use crate::ledger::{self, Ledger};
use crate::policy::PolicyHandle;
use crate::service::{Service, ServiceConfig, UnixConfinement};
use crate::wiring;
use anyhow::Context;
use clap::Args;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Validate the configuration (and the issuers it pins), print a summary, and exit.
    #[arg(long)]
    check_config: bool,
}

/// The store file inside `state_dir`.
pub fn store_path(state_dir: &Path) -> PathBuf {
    state_dir.join("ledger.redb")
}

pub fn run(args: DaemonArgs, config_path: &Path, socket: Option<&Path>) -> CmdResult {
    let mut config = Config::load(config_path)?;
    if let Some(s) = socket {
        config.api.socket = s.to_path_buf();
    }
    if args.check_config {
        println!("{}: ok", config_path.display());
        println!("state_dir     {}", config.state_dir.display());
        println!("api.socket    {}", config.api.socket.display());
        println!("proxy.port    {}", config.proxy.port);
        println!("dns.port      {}", config.dns.port);
        println!("sandbox       {}", config.sandbox.cgroup);
        match config.console.listen {
            Some(addr) => println!(
                "console       http://{addr}/ (token in {})",
                config.state_dir.join(crate::console::auth::TOKEN_FILE).display()
            ),
            None => println!("console       off"),
        }
        println!("trust         {} pinned issuer(s)", config.pinned_issuers()?.len());
        return Ok(ExitCode::SUCCESS);
    }
    let malloc = sluice_kernel::process::bound_malloc();
    init_tracing();
    log_malloc_bounds(malloc);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(config))?;
    Ok(ExitCode::SUCCESS)
}

/// Logs what [`sluice_kernel::process::bound_malloc`] did, for a server (the daemon, a gate)
/// that called it before its threads started. A refusal is a warning: the server runs, with
/// glibc's defaults and more memory.
pub(super) fn log_malloc_bounds(done: sluice_kernel::process::MallocBounds) {
    if done.applied.is_empty() && done.refused.is_empty() {
        tracing::debug!("malloc: the environment sets every bound");
    } else if !done.applied.is_empty() {
        tracing::debug!("malloc bounded: {}", done.applied.join(", "));
    }
    if !done.refused.is_empty() {
        tracing::warn!(
            "malloc: glibc refused {}; running with its default there, which keeps more memory",
            done.refused.join(", ")
        );
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Logs go to stderr (journald and test harnesses collect it); colours only on a terminal.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

async fn serve(config: Config) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.state_dir)
        .with_context(|| format!("state_dir {}: cannot create it", config.state_dir.display()))?;
    // The kernel side first: if the programs cannot be attached, nothing else should start and
    // look as if it protected anything.
    let enforcer = if config.sandbox.redirect {
        let kc = kernel::KernelConfig {
            cgroup: config.sandbox.cgroup.clone(),
            pin_dir: config.sandbox.pin_dir.clone(),
            proxy_port: config.proxy.port,
            dns_port: config.dns.port,
            max_tcp_sockets: config.sandbox.max_tcp_sockets,
        };
        let enforcer =
            kernel::Enforcer::install(&kc).context("[sandbox] redirect = true: attaching the eBPF programs")?;
        if let Err(e) = enforcer.check_egress_backstop() {
            tracing::error!(error = %e, "the egress backstop does not behave as expected");
        }
        tracing::info!(cgroup = %enforcer.agents_cgroup().path().display(), pin_dir = %kc.pin_dir.display(), "eBPF redirect attached");
        Some(enforcer)
    } else {
        tracing::warn!("[sandbox] redirect = false: passport-only mode, agent traffic is not intercepted");
        None
    };
    let unix = enforcer.as_ref().map(|e| Arc::new(unix_confinement(&config, e)));
    // Host policy: the daemon does not start on errors (a reload keeps the old policy instead).
    let host_policy = match PolicyHandle::load(&config.policies_dir) {
        Ok(p) => Arc::new(p),
        Err(errors) => {
            let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
            anyhow::bail!("host policies in {} have errors:\n  {}", config.policies_dir.display(), list.join("\n  "));
        }
    };
    // The local CA that terminates agents' TLS, and the bundle `sluice run` points agents at.
    let ca = if enforcer.is_some() { Some(wiring::ca_and_bundle(&config.state_dir)?) } else { None };
    let host_key = ledger::hostkey::load_or_create(&config.state_dir)?;
    let ledger = Ledger::open(&store_path(&config.state_dir), host_key, ledger::LedgerOptions::default())
        .with_context(|| format!("opening the store in {}", config.state_dir.display()))?;
    // After a burst, free heap pages go back to the kernel once a second passes without a
    // durable write (every decision is in one).
    crate::heap::release_when_quiet(ledger.write_stats_reader()).context("starting the sluice-heap thread")?;
    let service = Service::start(
        ledger.clone(),
        ServiceConfig {
            pinned_issuers: config.pinned_issuers()?,
            hold_timeout: Duration::from_secs(config.holds.timeout_secs),
            agents: enforcer.as_ref().map(|e| e.agents_cgroup().clone()),
            ca_bundle: ca.as_ref().map(|(_, bundle)| bundle.clone()),
            unix: unix.clone(),
            stops: enforcer.as_ref().map(|e| e.stops() as Arc<dyn crate::service::StopEnforcer>),
        },
    )
    .await?;
    service.set_policy(host_policy.clone());
    // The fleet's budget leases ([fleet]): the password and CA files are read now (a problem
    // stops the start, naming the file); Redis itself may be down: the host then spends only what
    // its records say it holds, and blocks with fleet_unavailable beyond that. Every checkpoint
    // the log signs is published to the same Redis in the background, off the request path.
    let fleet = match &config.fleet {
        Some(fc) => {
            let conn = Arc::new(crate::fleet::RedisConn::new(fc)?);
            let leases = crate::fleet::Leases::new(conn.clone(), fc);
            service.attach_fleet(leases.clone())?;
            let (stop, stop_rx) = tokio::sync::watch::channel(false);
            tracing::info!(redis = %leases.conn().url(), host_id = %fc.host_id, "fleet budget leases on");
            let publisher = crate::fleet::checkpoints::Publisher::start(
                conn,
                crate::fleet::Keys::from_config(fc),
                fc.host_id.clone(),
                ledger.clone(),
            );
            Some((stop, tokio::spawn(leases.run(stop_rx)), publisher))
        }
        None => None,
    };
    // The sandbox check compares /proc/PID/cgroup paths: use the agents' cgroup as attached
    // (it may be a systemd slice rather than the configured name).
    let agents_rel = match &enforcer {
        Some(e) => {
            let mount = kernel::cgroup2_mount()?;
            e.agents_cgroup()
                .path()
                .strip_prefix(&mount)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| config.sandbox.cgroup.clone())
        }
        None => config.sandbox.cgroup.clone(),
    };
    let policy = Arc::new(PeerPolicy::new(&config.api.group, &agents_rel));
    if let Some(e) = &enforcer {
        crate::metrics::global().watch_conntable(e.conntable());
        // The kernel's per-sandbox slot counters of sandboxes that ended (their cgroups are gone)
        // are removed once a minute, so ended sandboxes never fill the counter map.
        let table = e.conntable();
        let agents = e.agents_cgroup().path().to_path_buf();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                every.tick().await;
                let (table, agents) = (table.clone(), agents.clone());
                match tokio::task::spawn_blocking(move || table.forget_dead_sandboxes(&agents)).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => tracing::debug!(removed = n, "slot counters of ended sandboxes removed"),
                    Ok(Err(error)) => tracing::warn!(%error, "removing the slot counters of ended sandboxes failed"),
                    Err(_) => {}
                }
            }
        });
        if let Some(f) = e.unix() {
            crate::metrics::global().watch_unix(f);
        }
    }
    // The proxy and the agents' resolver, on the ports the eBPF programs redirect to.
    let plane = match (&enforcer, ca) {
        (Some(e), Some((ca, _))) => {
            Some(wiring::start(&config, service.clone(), host_policy.clone(), e.conntable(), ca).await?)
        }
        _ => None,
    };
    if let Some(i) = &plane {
        crate::metrics::global().watch_proxy(&i.proxy);
    }
    let (reload_stop, reload_rx) = tokio::sync::watch::channel(false);
    let reloader = tokio::spawn(wiring::policy_reload::watch(host_policy.clone(), service.clone(), reload_rx));
    let listener = server::bind(&config.api.socket, policy.api_gid)
        .with_context(|| format!("[api] socket {}", config.api.socket.display()))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tracing::info!(socket = %config.api.socket.display(), state_dir = %config.state_dir.display(), "sluice daemon ready");
    // The operator's console, when `[console] listen` is set (it stops with the API).
    let console = crate::console::Console::start(&config.console, &config.state_dir, service.clone(), stop_rx.clone())
        .await?
        .map(|c| {
            if let Ok(addr) = c.local_addr() {
                tracing::info!(listen = %addr, token = %config.state_dir.join(crate::console::auth::TOKEN_FILE).display(), "console listening");
            }
            tokio::spawn(c.serve())
        });
    let api = tokio::spawn(server::serve(listener, service.clone(), policy, stop_rx));
    // Everything that enforces is in place (programs attached, listeners and API bound): only now
    // may systemd start the units ordered after sluice.service.
    // `systemctl status` shows it: Unix socket confinement is part of what "enforcing" means.
    let status = match unix.as_deref() {
        Some(UnixConfinement { gate: Err(_), .. }) => {
            "enforcing; sandboxes refused: agents' Unix sockets cannot be confined on this kernel"
        }
        Some(UnixConfinement { gate: Ok(Some(_)), .. }) => {
            "enforcing; agents' Unix sockets NOT confined ([sandbox] unix_sockets = \"unenforced\")"
        }
        Some(UnixConfinement { dirs: None, filter: Some(_), .. }) => {
            "enforcing; sandboxes get no own directory for Unix sockets ([sandbox] unix_dir is not mounted: see the log)"
        }
        _ => "enforcing",
    };
    sd_notify("READY=1", crate::sdnotify::ready(status));
    super::util::wait_for_signal().await;
    tracing::info!("stopping");
    sd_notify("STOPPING=1", crate::sdnotify::stopping("stopping"));
    let _ = stop_tx.send(true);
    let _ = api.await;
    if let Some(c) = console {
        let _ = c.await;
    }
    let _ = reload_stop.send(true);
    let _ = reloader.await;
    if let Some(i) = plane {
        i.shutdown().await;
    }
    // Unused parts of the fleet leases go back (bounded), recorded before the store closes.
    let checkpoint_publisher = match fleet {
        Some((stop, task, publisher)) => {
            let _ = stop.send(true);
            let _ = task.await;
            Some(publisher)
        }
        None => None,
    };
    // The eBPF links stay pinned: with the daemon gone, agents' connections are refused.
    drop(enforcer);
    if let Err(e) = service.record_host_event("daemon_stop", serde_json::json!({})).await {
        tracing::warn!(error = %e, "could not record the daemon's stop");
    }
    ledger.shutdown();
    if let Some(p) = checkpoint_publisher {
        p.finish().await;
    }
    let _ = std::fs::remove_file(&config.api.socket);
    Ok(())
}

/// Decides how agents' Unix sockets are confined (`crates/kernel/src/unix.rs`), and says so
/// loudly when they are not: the kernel's hooks or the operator's `unix_sockets` decide whether
/// sandboxes are created at all; the listed addresses go into the kernel; the own directories'
/// mount is prepared (without it sandboxes get no own directory, which only refuses more).
fn unix_confinement(config: &Config, enforcer: &kernel::Enforcer) -> UnixConfinement {
    let gate = kernel::unix::sandbox_gate(config.sandbox.unix_mode(), enforcer.unix_status());
    match &gate {
        Ok(None) => {}
        Ok(Some(warning)) => tracing::warn!("{warning}"),
        Err(why) => tracing::error!("{why}"),
    }
    let Some(filter) = enforcer.unix() else {
        return UnixConfinement { gate, filter: None, dirs: None };
    };
    let mut gate = gate;
    match config.sandbox.unix_allow_addrs() {
        Ok(mut addrs) => {
            // The API socket stays reachable by name: the API itself refuses processes inside
            // the agents' cgroup, except the one call an agent unit makes as root to bind its
            // own cgroup (`sluice sandbox bind` in its ExecStartPre=), which must get there.
            match config.api.socket.to_str().map(kernel::UnixAddr::parse) {
                Some(Ok(api)) => addrs.push(api),
                _ => tracing::warn!(
                    socket = %config.api.socket.display(),
                    "[api] socket is no address the Unix socket filter can list (too long?): agent units cannot bind \
                     themselves with `sluice sandbox bind`"
                ),
            }
            if let Err(e) = filter.set_allowed(&addrs) {
                tracing::error!(error = %e, "[sandbox] unix_allow could not be written to the kernel; sandboxes are refused");
                gate =
                    Err(format!("[sandbox] unix_allow could not be written to the kernel ({e}); restart the daemon"));
            }
        }
        Err(e) => gate = Err(format!("[sandbox] unix_allow: {e}")),
    }
    let dirs = match kernel::SandboxDirs::prepare(&config.sandbox.unix_dir) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::error!(
                error = %e,
                "[sandbox] unix_dir: sandboxes get no own directory, so agents can reach no Unix socket they create by name \
                 (socketpair still works) and only the unix_allow addresses"
            );
            None
        }
    };
    tracing::info!(
        allowed = config.sandbox.unix_allow.len(),
        own_directories = ?dirs.as_ref().map(|d| d.root().display().to_string()),
        hooks = ?filter.hooks(),
        "Unix sockets confined"
    );
    UnixConfinement { gate, filter: Some(filter), dirs }
}

/// Logs the outcome of telling systemd (`Type=notify`) about the daemon's state (a no-op
/// outside systemd).
fn sd_notify(state: &str, sent: std::io::Result<bool>) {
    match sent {
        Ok(true) => tracing::debug!(state, "notified systemd"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, state, "could not notify systemd ($NOTIFY_SOCKET)"),
    }
}
