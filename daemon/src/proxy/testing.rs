//! A [`Proxy`] built from stand-ins, for the unit tests of the connection steps (`conn`, `raw`):
//! the service is a [`FakeDecide`], the kernel's connection table a [`FakeRedirects`], the
//! daemon's resolution a static host table. No root, kernel, store or network beyond loopback.

use super::decider::fake::FakeDecide;
use super::{ca, upstream, Limits, PassportLookup, Proxy, Redirects, Stats};
use crate::config::DnsConfig;
use crate::decide::CompiledPassport;
use crate::dns::{PoolConfig, SyntheticPool, UpstreamResolver};
use crate::kernel::{OrigDst, Transport};
use crate::passport::{Constraints, IssuerId, Permission, TrustTier};
use crate::policy::PolicyHandle;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The cgroup of the one sandbox the harness knows.
pub const CGROUP: u64 = 77;
/// The proxy's and the resolver's own ports, as the harness's proxy believes them to be.
pub const OWN_PORTS: [u16; 2] = [15001, 15053];

/// The kernel's connection table, scripted: each entry is taken once, as the kernel's is.
#[derive(Default)]
pub struct FakeRedirects(pub Mutex<HashMap<SocketAddr, OrigDst>>);

impl FakeRedirects {
    /// The agent at `client` connected to `dst` from cgroup `cgroup_id` (the harness's sandbox
    /// is [`CGROUP`]).
    pub fn redirect(&self, client: SocketAddr, dst: SocketAddr, cgroup_id: u64) {
        let orig = OrigDst { dst, transport: Transport::Tcp, pid: 4242, cgroup_id, netns_cookie: 1, socket_cookie: 2 };
        self.0.lock().unwrap().insert(client, orig);
    }
}

impl Redirects for FakeRedirects {
    fn lookup(&self, client: SocketAddr) -> Option<OrigDst> {
        self.0.lock().unwrap().remove(&client)
    }
}

pub struct Harness {
    pub proxy: Arc<Proxy>,
    pub decide: Arc<FakeDecide>,
    pub redirects: Arc<FakeRedirects>,
    pub pool: Arc<SyntheticPool>,
    /// Emergency stops as the proxy sees them: tests send a set to stop a passport.
    pub stops: tokio::sync::watch::Sender<Arc<crate::service::StopSet>>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// A registered passport (`*`) for the harness's sandbox.
fn passport() -> Arc<CompiledPassport> {
    let issuer = ed25519_dalek::SigningKey::from_bytes(&[5u8; 32]);
    let now = crate::passport::now();
    let issued = crate::passport::issue(
        crate::passport::IssueRequest {
            agent_id: "raw-test".into(),
            agent_name: None,
            permissions: vec![Permission::parse("*").expect("permission")],
            constraints: Constraints::default(),
            trust_tier: TrustTier::L1,
            lifetime_secs: 3600,
            now,
        },
        &issuer,
    )
    .expect("issue");
    let pinned = [IssuerId::from_key(&issuer.verifying_key())];
    let verified = crate::passport::Verifier::new(&pinned, &crate::passport::NoRevocations)
        .verify(&issued.token, now)
        .expect("verify");
    Arc::new(CompiledPassport::compile(verified).expect("compile"))
}

/// A proxy deciding through `decide`, under the host policy `policy` (one file's text), whose
/// own resolution knows exactly `static_hosts`. Connections are classified within 300 ms.
pub fn harness(decide: FakeDecide, policy: &str, static_hosts: &[(&str, IpAddr)]) -> Harness {
    let limits = Limits { sniff_timeout: Duration::from_millis(300), ..Limits::default() };
    harness_with_limits(decide, policy, static_hosts, limits)
}

/// [`harness`] with the given limits.
pub fn harness_with_limits(
    decide: FakeDecide,
    policy: &str,
    static_hosts: &[(&str, IpAddr)],
    limits: Limits,
) -> Harness {
    let policy_dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(policy_dir.path().join("test.toml"), policy).expect("policy");
    let policy = Arc::new(PolicyHandle::load(policy_dir.path()).expect("policy loads"));
    let state = tempfile::tempdir().expect("tempdir");
    let ca = ca::Ca::load_or_create(state.path()).expect("ca");
    let pool = Arc::new(SyntheticPool::new(&PoolConfig::default()).expect("pool"));
    let dns = DnsConfig {
        port: OWN_PORTS[1],
        upstream: Vec::new(),
        static_hosts: static_hosts.iter().map(|(n, ip)| (n.to_string(), *ip)).collect::<BTreeMap<_, _>>(),
    };
    let resolver = Arc::new(UpstreamResolver::from_config(&dns, Some(pool.clone())).expect("resolver"));
    let upstream_tls = upstream::client_config(&[], None).expect("client tls");
    let cp = passport();
    let passports: PassportLookup = Arc::new(move |cgroup_id| (cgroup_id == CGROUP).then(|| cp.clone()));
    let decide = Arc::new(decide);
    let redirects = Arc::new(FakeRedirects::default());
    let stops = tokio::sync::watch::Sender::new(Arc::new(crate::service::StopSet::default()));
    let proxy = Arc::new(Proxy {
        service: decide.clone(),
        policy,
        conntable: redirects.clone(),
        passports,
        pool: pool.clone(),
        tls: ca.server_config().expect("server tls"),
        resolver: resolver.clone(),
        upstream: upstream::Upstream::new(resolver, upstream_tls),
        own_ports: OWN_PORTS,
        slots: Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1))),
        sandboxes: Arc::new(super::SandboxSlots {
            limit: limits.max_connections_per_sandbox,
            state: std::sync::Mutex::default(),
        }),
        limits,
        stats: Stats::default(),
        gates: super::gate::Gates::none(),
        refusal_log: crate::throttle::Throttle::new(Duration::from_secs(1)),
        stops: stops.subscribe(),
        draining: tokio::sync::watch::Sender::new(false),
    });
    Harness { proxy, decide, redirects, pool, stops, _dirs: (policy_dir, state) }
}

/// A connected pair on loopback: (the agent's end, the proxy's accepted end).
pub async fn agent_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let agent = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
    let (accepted, _) = listener.accept().await.expect("accept");
    (agent, accepted)
}

/// A loopback upstream: records every connection's bytes (until its client closes, or 2 s),
/// and answers `PONG` to the first bytes it reads.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn upstream() -> Upstream {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let index = {
                    let mut l = log.lock().unwrap();
                    l.push(Vec::new());
                    l.len() - 1
                };
                let mut buf = [0u8; 1024];
                let mut answered = false;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                    if n == 0 {
                        break;
                    }
                    log.lock().unwrap()[index].extend_from_slice(&buf[..n]);
                    if !answered {
                        answered = true;
                        let _ = s.write_all(b"PONG").await;
                    }
                }
            });
        }
    });
    Upstream { addr, seen, task }
}

/// Everything the agent's end reads until the proxy closes it (at most 5 s).
pub async fn read_to_close(agent: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), agent.read_to_end(&mut out))
        .await
        .expect("the proxy closes the agent's connection")
        .ok();
    out
}

/// The raw TCP rule of the tests: `db.example.test` at `port`, action `tcp:postgres`, 2 cents.
pub fn raw_rule(port: u16) -> String {
    format!("[[raw_tcp]]\nhost = \"db.example.test\"\nport = {port}\naction = \"tcp:postgres\"\ncost_cents = 2\n")
}
