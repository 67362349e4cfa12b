//! `sluice daemon`: the enforcer in the foreground.

use super::CmdResult;
use crate::api::{peer::PeerPolicy, server};
use crate::config::Config;
use crate::ledger::{self, Ledger};
use crate::service::{Service, ServiceConfig};
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
        println!("trust         {} pinned issuer(s)", config.pinned_issuers()?.len());
        return Ok(ExitCode::SUCCESS);
    }
    init_tracing();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(config))?;
    Ok(ExitCode::SUCCESS)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).try_init();
}

async fn serve(config: Config) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.state_dir)
        .with_context(|| format!("state_dir {}: cannot create it", config.state_dir.display()))?;
    let host_key = ledger::hostkey::load_or_create(&config.state_dir)?;
    let ledger = Ledger::open(&store_path(&config.state_dir), host_key, ledger::LedgerOptions::default())
        .with_context(|| format!("opening the store in {}", config.state_dir.display()))?;
    let service = Service::start(
        ledger.clone(),
        ServiceConfig {
            pinned_issuers: config.pinned_issuers()?,
            hold_timeout: Duration::from_secs(config.holds.timeout_secs),
        },
    )
    .await?;
    let policy = Arc::new(PeerPolicy::new(&config.api.group, &config.sandbox.cgroup));
    let listener = server::bind(&config.api.socket, policy.api_gid)
        .with_context(|| format!("[api] socket {}", config.api.socket.display()))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tracing::info!(socket = %config.api.socket.display(), state_dir = %config.state_dir.display(), "sluice daemon ready");
    let api = tokio::spawn(server::serve(listener, service.clone(), policy, stop_rx));
    wait_for_signal().await;
    tracing::info!("stopping");
    let _ = stop_tx.send(true);
    let _ = api.await;
    if let Err(e) = service.record_host_event("daemon_stop", serde_json::json!({})).await {
        tracing::warn!(error = %e, "could not record the daemon's stop");
    }
    ledger.shutdown();
    let _ = std::fs::remove_file(&config.api.socket);
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
