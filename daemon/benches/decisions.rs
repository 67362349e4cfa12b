//! `cargo xtask bench decisions`: decisions per second and latency through the service (cached
//! passport + evaluation + counter update + durable group-committed record), at several
//! concurrencies. Target (docs/testing.md, Targets): ≥ 20,000/s on 2 cores, p99 < 2 ms.
//!
//! `SLUICE_BENCH_FLEET=1` (`cargo xtask bench decisions --fleet`) runs every concurrency twice,
//! without and with `[fleet]` budget leases against a `redis-server` the bench starts on a
//! loopback port: the cost of leasing (the goal: within 10%).

use sluice::ledger::{hostkey::HostKey, Ledger, LedgerOptions};
use sluice::passport::{self, Constraints, IssueRequest, Permission, TrustTier};
use sluice::service::Peer;
use sluice::service::{EnforceInput, Service, ServiceConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RUN: Duration = Duration::from_secs(4);
const WARMUP: Duration = Duration::from_millis(500);

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    println!(
        "sluice decisions benchmark: service.enforce with durability on (journal group commit, log-structured store)"
    );
    println!(
        "{:>11} {:>12} {:>10} {:>10} {:>10} {:>10}",
        "concurrency", "decisions/s", "p50 µs", "p90 µs", "p99 µs", "max µs"
    );
    // SLUICE_BENCH_CONCURRENCY=1,16 runs a subset (for profiling).
    let levels: Vec<usize> = match std::env::var("SLUICE_BENCH_CONCURRENCY") {
        Ok(list) => list.split(',').filter_map(|c| c.trim().parse().ok()).collect(),
        Err(_) => vec![1, 16, 64],
    };
    let redis = (std::env::var("SLUICE_BENCH_FLEET").as_deref() == Ok("1")).then(BenchRedis::start);
    for concurrency in levels {
        let r = rt.block_on(run(concurrency, None));
        println!("{:>11} {:>12.0} {:>10} {:>10} {:>10} {:>10}", concurrency, r.rate, r.p50, r.p90, r.p99, r.max);
        if let Some(redis) = &redis {
            let f = rt.block_on(run(concurrency, Some(&redis.url)));
            println!(
                "{:>11} {:>12.0} {:>10} {:>10} {:>10} {:>10}  [fleet: {:+.1}% decisions/s]",
                format!("{concurrency} fleet"),
                f.rate,
                f.p50,
                f.p90,
                f.p99,
                f.max,
                (f.rate / r.rate - 1.0) * 100.0
            );
        }
    }
}

/// A `redis-server` on a free loopback port without persistence, killed on drop.
struct BenchRedis {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl BenchRedis {
    fn start() -> BenchRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let dir = tempfile::tempdir().expect("tempdir");
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (cargo xtask deps installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        BenchRedis { child, url: format!("redis://127.0.0.1:{port}"), _dir: dir }
    }
}

impl Drop for BenchRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Result {
    rate: f64,
    p50: u128,
    p90: u128,
    p99: u128,
    max: u128,
}

async fn run(concurrency: usize, fleet: Option<&str>) -> Result {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = LedgerOptions::default();
    // For comparisons: SLUICE_BENCH_JOURNAL=0 makes every group a durable redb commit.
    if std::env::var("SLUICE_BENCH_JOURNAL").as_deref() == Ok("0") {
        opts.journal_capacity = 0;
    }
    let ledger = Ledger::open(&dir.path().join("ledger.redb"), HostKey::generate(), opts).expect("ledger");
    let service = Service::start(ledger.clone(), ServiceConfig::passport_only(vec![], Duration::from_secs(60)))
        .await
        .expect("service");
    let fleet_task = fleet.map(|url| {
        let config = sluice::config::FleetConfig {
            redis: url.to_string(),
            password_file: None,
            ca_file: None,
            host_id: format!("bench-{concurrency}"),
            // Leases sized for the rate: a renewal every few thousand decisions.
            lease_cents: 10_000,
            lease_requests: 10_000,
            lease_secs: 60,
            prefix: format!("bench{}", rand::random::<u32>()),
        };
        let conn = Arc::new(sluice::fleet::RedisConn::plain(url).expect("redis url"));
        let leases = sluice::fleet::Leases::new(conn, &config);
        service.attach_fleet(leases.clone()).expect("fleet");
        let (stop, rx) = tokio::sync::watch::channel(false);
        (stop, tokio::spawn(leases.run(rx)))
    });
    let issuer = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let mut constraints = Constraints::default();
    constraints.max_per_action = Some(passport::Cents(1_000));
    constraints.max_cumulative = Some(passport::Cents(passport::constraints::MAX_CENTS));
    constraints.rate_per_minute = Some(u32::MAX as u64);
    // One passport per worker, as on a host with many agents.
    let mut ids = Vec::new();
    for w in 0..concurrency {
        let issued = passport::issue(
            IssueRequest {
                agent_id: format!("bench-{w}"),
                agent_name: None,
                permissions: vec![Permission::parse("llm:*").unwrap()],
                constraints: constraints.clone(),
                trust_tier: TrustTier::L1,
                lifetime_secs: 86_400,
                now: passport::now(),
            },
            &issuer,
        )
        .expect("issue");
        let peer = Peer { uid: 0, gid: 0, pid: 1, user: Some("root".into()) };
        service.register(&issued.token, None, &peer).await.expect("register");
        ids.push(issued.claims.id.to_string());
    }
    let start = Instant::now();
    let tasks: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let service: Arc<Service> = service.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(100_000);
                loop {
                    let t = Instant::now();
                    if t.duration_since(start) > WARMUP + RUN {
                        break;
                    }
                    let input = EnforceInput {
                        passport_id: id.clone(),
                        action: "llm:chat".into(),
                        cost_cents: Some(1),
                        cost_millicents: None,
                        target: Some("api.example.test".into()),
                        method: Some("POST".into()),
                        path: Some("/v1/chat/completions".into()),
                        port: None,
                        signed_request_hash: None,
                    };
                    let v = service.enforce(input).await.expect("enforce").to_json();
                    assert_eq!(v["decision"], "allow", "{v}");
                    if t.duration_since(start) > WARMUP {
                        lat.push(t.elapsed().as_micros());
                    }
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    if let Some((stop, task)) = fleet_task {
        let _ = stop.send(true);
        let _ = task.await;
    }
    ledger.shutdown();
    all.sort_unstable();
    let pct =
        |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0);
    Result {
        rate: all.len() as f64 / RUN.as_secs_f64(),
        p50: pct(0.50),
        p90: pct(0.90),
        p99: pct(0.99),
        max: all.last().copied().unwrap_or(0),
    }
}
