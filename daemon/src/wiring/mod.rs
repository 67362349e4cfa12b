//! Wiring the interception plane into the daemon: the proxy and the agents' resolver on their
//! ports, connected to the service (passports by sandbox cgroup), the host policy, the local CA
//! and the daemon's own upstream resolution. It owns no rule of its own: the proxy, the resolver
//! and the service do the work; this module only builds them and connects them.
//!
//! * [`start`]: the proxy and the resolver, sharing one synthetic pool.
//! * [`dns_identity`]: who asks the agents' resolver (the connection table and the service).
//! * [`policy_reload`]: the host policy reloaded on SIGHUP and on file change, every attempt
//!   attested.
//!
//! `cli::daemon` calls [`start`] once the kernel redirect is attached; everything here is
//! library code so tests can run the same wiring in-process.

pub mod dns_identity;
pub mod policy_reload;

use crate::config::Config;
use crate::dns::{PoolConfig, Resolver, SyntheticPool, UpstreamResolver};
use crate::kernel::Conntable;
use crate::policy::PolicyHandle;
use crate::proxy::{self, ca::Ca, Limits, Proxy, ProxyParts};
use crate::service::Service;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The agents' CA bundle inside `state_dir` (system roots + the sluice CA).
pub const CA_BUNDLE_FILE: &str = "ca-bundle.pem";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("local CA in {dir}: {source}")]
    Ca { dir: PathBuf, source: proxy::ca::CaError },
    #[error("{0}")]
    UpstreamTls(#[from] proxy::upstream::TlsSetupError),
    #[error("[dns]: {0}")]
    Dns(#[from] crate::dns::lookup::UpstreamError),
    #[error("synthetic address pool: {0}")]
    Pool(#[from] crate::dns::pool::PoolError),
    #[error("[{section}] port {port}: {source}")]
    Bind { section: &'static str, port: u16, source: std::io::Error },
    #[error("[gates] hosts: {0}")]
    Gates(String),
}

/// The local CA and the agents' trust bundle, created at first start. The bundle is the host's
/// trust store plus the sluice CA (or the CA alone where the host has no bundle), so agents
/// trust both real services (never reached directly, but some clients pin nothing else) and the
/// proxy.
pub fn ca_and_bundle(state_dir: &Path) -> Result<(Ca, PathBuf), StartError> {
    let err = |source| StartError::Ca { dir: state_dir.to_path_buf(), source };
    let ca = Ca::load_or_create(state_dir).map_err(err)?;
    let system = Path::new(proxy::upstream::SYSTEM_BUNDLE);
    let bundle = if system.exists() {
        let out = state_dir.join(CA_BUNDLE_FILE);
        ca.write_bundle(system, &out).map_err(err)?;
        out
    } else {
        state_dir.join(proxy::ca::CA_CERT_FILE)
    };
    Ok((ca, bundle))
}

/// The running proxy and resolver.
pub struct Plane {
    pub proxy: Arc<Proxy>,
    pub pool: Arc<SyntheticPool>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// The proxy's runtime threads ([`proxy::shards`]).
    shards: Vec<std::thread::JoinHandle<()>>,
}

impl Plane {
    /// Stops accepting (connections in flight end with their runtime).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        let shards = std::mem::take(&mut self.shards);
        let _ = tokio::task::spawn_blocking(move || {
            for t in shards {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// Starts the proxy's runtime threads: each a single-threaded tokio runtime with its own
/// listeners on the proxy port (`SO_REUSEPORT`), so a connection, its requests and its upstream
/// connections stay on the thread that accepted it (no wakeups across threads but the ledger's
/// answers, which come back through the thread's relay, one wake per group). Returns once every thread listens, or the first error (the others then stop).
async fn start_shards(
    proxy: &Arc<Proxy>,
    port: u16,
    stop_rx: &watch::Receiver<bool>,
) -> Result<Vec<std::thread::JoinHandle<()>>, StartError> {
    let bind_err = |source| StartError::Bind { section: "proxy", port, source };
    proxy::check_port_free(port).map_err(bind_err)?;
    let n = proxy::shards();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<std::io::Result<()>>();
    let mut threads = Vec::with_capacity(n);
    for i in 0..n {
        let (proxy, stop_rx, ready) = (proxy.clone(), stop_rx.clone(), ready_tx.clone());
        let spawned = std::thread::Builder::new().name(format!("sluice-proxy-{i}")).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                match proxy::bind_shard(port) {
                    Ok(listeners) => {
                        let _ = ready.send(Ok(()));
                        // The ledger's answers to this thread's decisions come back in one wake
                        // per group, not one system call each.
                        crate::ledger::store::relay_replies(proxy.serve(listeners, stop_rx)).await;
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            });
            // Dropping the runtime ends the connections still in flight on this thread.
        });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => return Err(bind_err(e)),
        }
    }
    drop(ready_tx);
    for _ in 0..n {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(bind_err(e)),
            None => return Err(bind_err(std::io::Error::other("a proxy thread ended before listening"))),
        }
    }
    Ok(threads)
}

/// Binds and starts the proxy (`[proxy] port`) and the agents' resolver (`[dns] port`), both on
/// 127.0.0.1 and ::1.
pub async fn start(
    config: &Config,
    service: Arc<Service>,
    policy: Arc<PolicyHandle>,
    conntable: Arc<Conntable>,
    ca: Ca,
) -> Result<Plane, StartError> {
    let pool = Arc::new(SyntheticPool::new(&PoolConfig::default())?);
    let resolver = Arc::new(UpstreamResolver::from_config(&config.dns, Some(pool.clone()))?);
    let upstream_tls = proxy::upstream::client_config(
        &config.upstream_tls.extra_roots,
        Some(Path::new(proxy::upstream::SYSTEM_BUNDLE)),
    )?;
    let svc = service.clone();
    let keys = service.clone();
    let gate_hosts = config.gates.host_names().map_err(StartError::Gates)?;
    let gate_catalogs = Arc::new(crate::discover::GateCatalogs::new(
        gate_hosts.clone(),
        config.gates.pinned_ids().map_err(StartError::Gates)?,
        &config.state_dir,
        Some(proxy::upstream::Upstream::new(resolver.clone(), upstream_tls.clone())),
    ));
    service.set_gate_catalogs(gate_catalogs.clone());
    let gates = proxy::gate::Gates::new(
        gate_hosts,
        config.gates.max_body_bytes,
        Arc::new(move |cg| keys.agent_key_for_cgroup(cg)),
    )
    .with_catalogs(gate_catalogs.clone());
    let proxy = Proxy::new(ProxyParts {
        service: service.clone(),
        policy: policy.clone(),
        conntable: conntable.clone(),
        passports: Arc::new(move |cgroup_id| svc.passport_for_cgroup(cgroup_id)),
        pool: pool.clone(),
        ca,
        resolver,
        upstream_tls,
        proxy_port: config.proxy.port,
        dns_port: config.dns.port,
        limits: Limits {
            max_connections: config.proxy.max_connections,
            max_connections_per_sandbox: config.proxy.max_connections_per_sandbox,
            header_timeout: Duration::from_secs(config.proxy.header_timeout_secs),
            ..Limits::default()
        },
        gates,
    })
    .map_err(|source| StartError::Ca { dir: config.state_dir.clone(), source })?;

    let max_connections = config.proxy.max_connections;
    match proxy::raise_fd_limit() {
        Ok(soft) if soft < proxy::fds_needed(max_connections) => tracing::warn!(
            open_files = soft,
            max_connections,
            "the open-file limit is below what [proxy] max_connections needs (two descriptors per forwarded connection, {} in all): connections past it wait in the kernel's queue; raise LimitNOFILE or lower max_connections",
            proxy::fds_needed(max_connections)
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let (stop, stop_rx) = watch::channel(false);
    let shards = match start_shards(&proxy, config.proxy.port, &stop_rx).await {
        Ok(s) => s,
        Err(e) => {
            let _ = stop.send(true); // the threads that did start stop accepting
            return Err(e);
        }
    };
    let mut tasks = JoinSet::new();
    tasks.spawn(gate_catalogs.clone().refresh_loop());

    let agents_resolver = Arc::new(Resolver::new(pool.clone()));
    let identity = Arc::new(dns_identity::Identity::new(service, policy, conntable));
    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        let addr = SocketAddr::new(ip, config.dns.port);
        let bind_err = |source| StartError::Bind { section: "dns", port: config.dns.port, source };
        let udp = tokio::net::UdpSocket::bind(addr).await.map_err(bind_err)?;
        let tcp = tokio::net::TcpListener::bind(addr).await.map_err(bind_err)?;
        let identity = identity.clone();
        let resolver = agents_resolver.clone();
        tasks.spawn(async move {
            let who = move |peer, via| identity.allow_for(peer, via);
            if let Err(e) = crate::dns::serve(udp, tcp, resolver, who).await {
                tracing::error!(%addr, error = %e, "the agents' resolver stopped; agents' DNS now fails");
            }
        });
    }
    tracing::info!(proxy_port = config.proxy.port, dns_port = config.dns.port, "proxy and resolver listening");
    Ok(Plane { proxy, pool, stop, tasks, shards })
}
