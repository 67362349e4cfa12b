//! `sluice gate init | run | check | audit export` (docs/gate.md).

use super::CmdResult;
use crate::gate::config::GateConfig;
use crate::gate::decide::{self, Arrival, Step};
use crate::gate::{server, Gate};
use crate::keyfile;
use crate::ledger::export::{export_stream, ExportRequest};
use anyhow::Context;
use clap::{Args, Subcommand};
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Subcommand, Debug)]
pub enum GateCmd {
    /// Create a gate key: DIR/gate.key (PKCS#8 v1 PEM, mode 0600) and DIR/gate.pub (SPKI PEM).
    /// Prints the gate id (gate_ + base64url of the public key). Never overwrites a key.
    Init(InitArgs),
    /// Run the gate of `--config gate.toml` in the foreground: the reverse proxy in front of
    /// `upstream` and /check, until SIGTERM or SIGINT.
    Run(RunArgs),
    /// Dry run: decide one request as the gate would, printing the decision and every guardrail
    /// evaluated. Nothing is forwarded, counted or recorded. Exit status 0 allow, 3 block.
    Check(CheckArgs),
    /// The gate's attestation log.
    #[command(subcommand)]
    Audit(GateAuditCmd),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Directory for the key files (created with mode 0700 if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The gate's name (the `name` of its gate.toml), kept in DIR/gate.json.
    #[arg(long, value_name = "NAME")]
    name: String,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct RunArgs {}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The passport (compact JWT) the request carries.
    #[arg(long, value_name = "F")]
    passport: PathBuf,
    /// The agent's private key: the request is then signed with it, as an agent would.
    #[arg(long, value_name = "F.key")]
    key: Option<PathBuf>,
    /// The request's method.
    #[arg(long, value_name = "M")]
    method: String,
    /// The request's full URL as the agent addresses the service (http://host:port/path?query).
    #[arg(long, value_name = "U")]
    url: String,
    /// The request's body (at most 1 MiB).
    #[arg(long, value_name = "F")]
    body: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum GateAuditCmd {
    /// Export every record of the gate's log with a freshly signed checkpoint; verify it with
    /// `sluice audit verify F --host-pub gate.pub`. A running gate answers on its socket
    /// (state_dir/gate.sock); a stopped gate's store is opened directly.
    Export(ExportArgs),
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The export file to write (never overwritten).
    #[arg(long, value_name = "F")]
    out: PathBuf,
}

/// `config` is the global `--config`, which gate commands (but `init`) require: the gate's
/// `gate.toml`, never the daemon's default.
pub fn run(cmd: GateCmd, config: Option<&std::path::Path>) -> CmdResult {
    let need = || {
        config.ok_or_else(|| anyhow::anyhow!("this command needs --config FILE: the gate's gate.toml (docs/gate.md)"))
    };
    match cmd {
        GateCmd::Init(a) => init(a),
        GateCmd::Run(a) => run_gate(a, need()?),
        GateCmd::Check(a) => check(a, need()?),
        GateCmd::Audit(GateAuditCmd::Export(a)) => export(a, need()?),
    }
}

fn init(a: InitArgs) -> CmdResult {
    if !a.dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&a.dir)
            .with_context(|| format!("{}: cannot create directory", a.dir.display()))?;
    }
    let key_path = a.dir.join("gate.key");
    let pub_path = a.dir.join("gate.pub");
    let meta_path = a.dir.join("gate.json");
    for p in [&key_path, &pub_path, &meta_path] {
        if p.exists() {
            anyhow::bail!("{}: already exists; refusing to overwrite a gate key (choose another --dir)", p.display());
        }
    }
    let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let id = crate::gate::gate_id(&key.verifying_key());
    keyfile::write_signing_key(&key_path, &key)?;
    keyfile::write_public_key(&pub_path, &key.verifying_key())?;
    let meta = serde_json::json!({
        "gate_id": id,
        "name": a.name,
        "created_at": super::util::rfc3339(crate::passport::now()),
    });
    crate::files::create_new(&meta_path, format!("{}\n", serde_json::to_string_pretty(&meta)?).as_bytes(), 0o644)?;
    if a.json {
        super::util::print_json(&serde_json::json!({"gate_id": id, "key": key_path, "public_key": pub_path}));
    } else {
        println!("{id}");
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn load(path: &std::path::Path) -> anyhow::Result<Gate> {
    Gate::new(GateConfig::load(path)?)
}

fn run_gate(_: RunArgs, config: &std::path::Path) -> CmdResult {
    let malloc = sluice_kernel::process::bound_malloc();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    super::daemon::log_malloc_bounds(malloc);
    let gate = Arc::new(load(config)?);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let ledger = gate.open_ledger()?;
        // As the daemon does: free heap pages go back after a second without a durable write.
        crate::heap::release_when_quiet(ledger.write_stats_reader()).context("starting the sluice-heap thread")?;
        for w in crate::gate::catalog::route_drift(&gate.config, gate.catalogs.in_force(chrono::Utc::now()).as_deref()) {
            tracing::warn!("{w}");
        }
        let listen = gate.config.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("{}: listen {listen}: cannot bind", gate.config.source.display()))?;
        let server = Arc::new(server::Server::new(gate.clone(), ledger.clone())?);
        let socket = crate::gate::admin::socket_path(&gate.config.state_dir);
        let admin = crate::gate::admin::bind(&socket)
            .with_context(|| format!("{}: cannot bind the gate's export socket", socket.display()))?;
        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin = tokio::spawn(crate::gate::admin::serve(admin, gate.clone(), ledger.clone(), async move {
            let _ = admin_stopped.await;
        }));
        tracing::info!(gate = %gate.config.name, gate_id = %gate.gate_id, %listen, upstream = %gate.config.upstream, "gate ready");
        let _ = crate::sdnotify::ready("gate ready");
        server
            .serve(listener, async {
                super::util::wait_for_signal().await;
                let drain_secs = crate::gate::server::DRAIN.as_secs();
                tracing::info!(drain_secs, "gate stopping: new connections refused, open ones draining");
                let _ = crate::sdnotify::stopping("gate stopping");
            })
            .await;
        let _ = admin_stop.send(());
        let _ = admin.await;
        let _ = std::fs::remove_file(&socket);
        ledger.shutdown();
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn check(a: CheckArgs, config: &std::path::Path) -> CmdResult {
    let gate = load(config)?;
    let token = super::util::read_token(&a.passport)?;
    let method = http::Method::from_bytes(a.method.as_bytes())
        .map_err(|_| anyhow::anyhow!("--method {:?} is not a method", a.method))?;
    let uri: http::Uri = a.url.parse().map_err(|e| anyhow::anyhow!("--url {:?}: {e}", a.url))?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        anyhow::bail!("--url {:?} must be absolute (http://host/path or https://...)", a.url);
    };
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    let body = match &a.body {
        Some(p) => {
            use std::io::Read;
            let mut bytes = Vec::new();
            crate::files::open(p, crate::files::Links::Follow)?
                .into_file()
                .take(server::MAX_SIGNED_BODY as u64 + 1)
                .read_to_end(&mut bytes)
                .with_context(|| format!("--body {}: cannot read", p.display()))?;
            if bytes.len() > server::MAX_SIGNED_BODY {
                anyhow::bail!("--body {}: larger than the {} bytes a gate reads", p.display(), server::MAX_SIGNED_BODY);
            }
            bytes
        }
        None => Vec::new(),
    };
    let mut arrival = Arrival::bare(method, path);
    arrival.target_uri = crate::gate::sig::target_uri(scheme, authority.as_str(), &arrival.path)
        .ok_or_else(|| anyhow::anyhow!("--url {:?}: the scheme must be http or https", a.url))?;
    arrival.host = Some(authority.host().to_string());
    arrival.passport = Some(token);
    if let Some(key_path) = &a.key {
        let key = keyfile::load_signing_key(key_path)?;
        let signed = crate::gate::sig::sign_for_check(&key, arrival.method.as_str(), &arrival.target_uri, &body)
            .map_err(|e| anyhow::anyhow!(e))?;
        arrival.agent_key = Some(crate::passport::b64::encode(key.verifying_key().as_bytes()));
        arrival.content_digest = Some(signed.content_digest);
        arrival.signature_input = Some(signed.signature_input);
        arrival.signature = Some(signed.signature);
        arrival.body_digest = Some(crate::gate::sig::ContentDigest::of(&body));
    }
    let decided = match decide::precheck(&gate, &arrival, crate::passport::now()) {
        Step::Decided(d) => *d,
        Step::Evaluate(r) => {
            let snapshot = gate.open_ledger().and_then(|l| Ok(l.snapshot()?));
            let snapshot = match snapshot {
                Ok(s) => Some(s),
                Err(e) => {
                    eprintln!("sluice: the store was not read (counters evaluated as if nothing was spent yet, no catalog in force): {e:#}");
                    None
                }
            };
            for w in
                crate::gate::catalog::route_drift(&gate.config, gate.catalogs.in_force(chrono::Utc::now()).as_deref())
            {
                eprintln!("sluice: {w}");
            }
            let mut read = |k: &str| match &snapshot {
                Some(s) => s.state_get(k).map_err(|e| e.to_string()),
                None => Ok(None),
            };
            decide::evaluate(&gate, &r, &mut read, chrono::Utc::now())
        }
    };
    let mut doc = server::decision_json(&gate, &decided, 0);
    doc["attestation_id"] = serde_json::Value::Null;
    doc["dry_run"] = true.into();
    super::util::print_json(&doc);
    Ok(if decided.decision == crate::decide::Decision::Allow {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::ops::EXIT_BLOCK)
    })
}

fn export(a: ExportArgs, config: &std::path::Path) -> CmdResult {
    let gate = load(config)?;
    // A running gate answers on its socket; otherwise the store is opened here.
    let socket = crate::gate::admin::socket_path(&gate.config.state_dir);
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        let count = super::audit::download_export(&socket, "/export", &a.out)?;
        println!("exported {count} record(s) of gate {} to {}", gate.config.name, a.out.display());
        return Ok(ExitCode::SUCCESS);
    }
    let ledger = gate.open_ledger()?;
    let mut out = crate::files::NewFile::create(&a.out, 0o644)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut stream = rt.block_on(async {
        ledger.checkpoint_now().await?;
        anyhow::Ok(export_stream(&ledger, &ExportRequest::default()).await?)
    })?;
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        buf.clear();
        let more = stream.fill(&mut buf, 64 * 1024)?;
        out.write(&buf)?;
        if !more {
            break;
        }
    }
    let count = stream.records_written();
    out.commit()?;
    ledger.shutdown();
    println!("exported {count} record(s) of gate {} to {}", gate.config.name, a.out.display());
    Ok(ExitCode::SUCCESS)
}
