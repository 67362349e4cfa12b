//! `cargo xtask bench decisions`: decisions per second and latency through the service (cached
//! passport + evaluation + counter update + durable group-committed record + the JSON bytes
//! `POST /v1/enforce` answers with), at several concurrencies. Target (docs/testing.md,
//! Targets): ≥ 20,000/s on 2 cores, p99 < 2 ms.
//!
//! `SLUICE_BENCH_FLEET=1` (`cargo xtask bench decisions --fleet`) measures the cost of `[fleet]`
//! budget leases (against a `redis-server` the bench starts on a loopback port; the goal: within
//! 10%). On a shared machine one run of each says little, so each concurrency runs interleaved
//! rounds, without and with leases (off, on, off, on, …; `SLUICE_BENCH_PAIRS`, default 3), and
//! the verdict comes from the medians. Each round also reports the CPU time the process (the
//! service and its ledger writer) used per decision, from `/proc/self/stat` (utime + stime), and
//! the redis-server's: CPU per decision stays honest when other work takes the cores.
//!
//! Each round also splits the process's CPU per decision by thread (`threads µs/d` line), from
//! `/proc/self/task/*/schedstat` (nanoseconds of run time) and `comm`: the ledger's writer
//! (`sluice-ledger`), indexer (`sluice-ledger-index`) and segment sealer (`sluice-ledger-seal`),
//! the tokio workers (the service's own work), and the rest. Which thread costs what is the
//! figure to compare when tuning one of them. A `ledger` line gives, over the same span, the
//! store's own counters (`Ledger::write_stats`): the mean durable write (the disk), decisions per
//! write, the journal laps and how long they stalled the writer, and the writer's utilisation;
//! the tail at high concurrency is read against them.
//!
//! `SLUICE_BENCH_SECS` sets a round's measured time (default 4 s, after 0.5 s of warm-up);
//! `SLUICE_BENCH_CONCURRENCY=1,16` runs a subset.

mod host;

use host::loadavg;
use sluice::ledger::{hostkey::HostKey, Ledger, LedgerOptions, WriteStats};
use sluice::passport::{self, Constraints, IssueRequest, Permission, TrustTier};
use sluice::service::Peer;
use sluice::service::{EnforceInput, Service, ServiceConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WARMUP: Duration = Duration::from_millis(500);
/// The fleet's goal: decisions/s with leases at least this share of decisions/s without.
const FLEET_GOAL: f64 = 0.90;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let secs = std::env::var("SLUICE_BENCH_SECS").ok().and_then(|s| s.parse::<f64>().ok()).filter(|s| *s > 0.0);
    let run_for = Duration::from_secs_f64(secs.unwrap_or(4.0).min(3600.0));
    println!(
        "sluice decisions benchmark: service.enforce with durability on (journal group commit, log-structured store)"
    );
    println!("load average at start: {}", loadavg());
    println!("idle CPUs: {}", host::idle_policy());
    // SLUICE_BENCH_CONCURRENCY=1,16 runs a subset (for profiling).
    let levels: Vec<usize> = match std::env::var("SLUICE_BENCH_CONCURRENCY") {
        Ok(list) => list.split(',').filter_map(|c| c.trim().parse().ok()).filter(|c| *c > 0).collect(),
        Err(_) => vec![1, 16, 64],
    };
    let header = || {
        println!(
            "{:>11} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "concurrency", "decisions/s", "p50 µs", "p90 µs", "p99 µs", "max µs", "CPU µs/d", "redis µs/d"
        )
    };
    if std::env::var("SLUICE_BENCH_FLEET").as_deref() != Ok("1") {
        header();
        for concurrency in levels {
            let r = rt.block_on(run(concurrency, None, run_for, None));
            r.print(&concurrency.to_string());
        }
        return;
    }
    let pairs =
        std::env::var("SLUICE_BENCH_PAIRS").ok().and_then(|s| s.parse::<usize>().ok()).unwrap_or(3).clamp(1, 50);
    let redis = BenchRedis::start();
    println!("fleet: {pairs} interleaved pairs of rounds (without, with leases) per concurrency, {run_for:?} each");
    let mut summary = Vec::new();
    for concurrency in levels {
        header();
        let (mut off, mut on) = (Vec::new(), Vec::new());
        for _ in 0..pairs {
            let r = rt.block_on(run(concurrency, None, run_for, Some(redis.pid())));
            r.print(&format!("{concurrency} off"));
            off.push(r);
            let f = rt.block_on(run(concurrency, Some(&redis.url), run_for, Some(redis.pid())));
            f.print(&format!("{concurrency} fleet"));
            on.push(f);
        }
        println!("load average: {}", loadavg());
        summary.push(Comparison::of(concurrency, &off, &on));
    }
    println!();
    println!("fleet leases, medians of {pairs} interleaved rounds each (load average now: {}):", loadavg());
    println!(
        "{:>11} {:>12} {:>12} {:>8} {:>10} {:>10} {:>8} {:>10}  verdict (decisions/s, goal ≥ {:.0}%)",
        "concurrency",
        "off dec/s",
        "fleet dec/s",
        "ratio",
        "off CPU/d",
        "fleet CPU/d",
        "CPU",
        "redis/d",
        FLEET_GOAL * 100.0
    );
    for c in summary {
        c.print();
    }
}

/// CPU time (utime + stime) of process `pid` so far, from `/proc/<pid>/stat`; `None` when it
/// cannot be read.
fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime and stime are fields 14 and 15.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Some(Duration::from_micros(ticks.saturating_mul(1_000_000) / hz))
}

/// Run time (ns) of every thread of this process so far, by thread id, with its name; from
/// `/proc/self/task/<tid>/schedstat` (first field: nanoseconds on a CPU). Threads that cannot be
/// read (they exited meanwhile) are left out.
fn thread_times() -> std::collections::HashMap<String, (String, u64)> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return out };
    for entry in dir.flatten() {
        let tid = entry.file_name().to_string_lossy().into_owned();
        let base = entry.path();
        let Ok(comm) = std::fs::read_to_string(base.join("comm")) else { continue };
        let Ok(sched) = std::fs::read_to_string(base.join("schedstat")) else { continue };
        let Some(ns) = sched.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()) else { continue };
        out.insert(tid, (comm.trim().to_string(), ns));
    }
    out
}

/// The classes a thread's CPU is reported under, in print order.
const THREAD_CLASSES: [&str; 5] = ["writer", "indexer", "sealer", "tokio", "rest"];

/// Which class a thread is, by its `comm` (thread names are cut to 15 bytes there:
/// `sluice-ledger-index` reads `sluice-ledger-i`).
fn thread_class(comm: &str) -> usize {
    match comm {
        "sluice-ledger" => 0,
        c if c.starts_with("sluice-ledger-i") => 1,
        c if c.starts_with("sluice-ledger-s") => 2,
        c if c.starts_with("tokio-") => 3,
        _ => 4,
    }
}

/// CPU (ns) per thread class between two [`thread_times`] samples. A thread born between them
/// counts from zero; one that exited before the second sample is lost (the ledger's threads and
/// the runtime's workers live across a round).
fn thread_split(
    before: &std::collections::HashMap<String, (String, u64)>,
    after: &std::collections::HashMap<String, (String, u64)>,
) -> [u64; 5] {
    let mut split = [0u64; 5];
    for (tid, (comm, ns)) in after {
        let was = before.get(tid).map_or(0, |(_, b)| *b);
        split[thread_class(comm)] += ns.saturating_sub(was);
    }
    split
}

/// A `redis-server` on a free loopback port without persistence, killed on drop.
struct BenchRedis {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl BenchRedis {
    fn pid(&self) -> u32 {
        self.child.id()
    }

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
    /// This process's CPU time per decision over the measured time (µs).
    cpu_per_decision: Option<f64>,
    /// The redis-server's CPU time per decision over the measured time (µs).
    redis_per_decision: Option<f64>,
    /// This process's CPU per decision by thread class ([`THREAD_CLASSES`], µs).
    threads: [f64; 5],
    /// The ledger's write statistics at the start and the end of the measured span.
    store: Option<(WriteStats, WriteStats)>,
    /// The measured span.
    span: Duration,
}

impl Result {
    fn print(&self, label: &str) {
        let us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        println!(
            "{:>11} {:>12.0} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            label,
            self.rate,
            self.p50,
            self.p90,
            self.p99,
            self.max,
            us(self.cpu_per_decision),
            us(self.redis_per_decision)
        );
        let split: Vec<String> =
            THREAD_CLASSES.iter().zip(self.threads).map(|(name, us)| format!("{name} {us:.1}")).collect();
        println!("{:>11} threads µs/d: {}", "", split.join(", "));
        if let Some((a, b)) = &self.store {
            let writes = b.durable_writes.saturating_sub(a.durable_writes);
            let per = |n: u64, d: u64| if d == 0 { f64::NAN } else { n as f64 / d as f64 };
            let write_us = per(b.durable_write_ns.saturating_sub(a.durable_write_ns), writes) / 1e3;
            let decisions = self.rate * self.span.as_secs_f64();
            let busy = b.busy_ns.saturating_sub(a.busy_ns) as f64 / self.span.as_nanos().max(1) as f64;
            println!(
                "{:>11} ledger: durable write {write_us:.0} µs, {:.1} decisions per write, {} laps stalling {:.1} ms, writer busy {:.0} %",
                "",
                decisions / writes.max(1) as f64,
                b.laps.saturating_sub(a.laps),
                b.lap_wait_ns.saturating_sub(a.lap_wait_ns) as f64 / 1e6,
                busy * 100.0
            );
        }
    }
}

/// One concurrency's rounds without and with leases, by their medians.
struct Comparison {
    concurrency: usize,
    off_rate: f64,
    on_rate: f64,
    off_cpu: Option<f64>,
    on_cpu: Option<f64>,
    on_redis: Option<f64>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

impl Comparison {
    fn of(concurrency: usize, off: &[Result], on: &[Result]) -> Comparison {
        Comparison {
            concurrency,
            off_rate: median(off.iter().map(|r| r.rate).collect()).unwrap_or(0.0),
            on_rate: median(on.iter().map(|r| r.rate).collect()).unwrap_or(0.0),
            off_cpu: median(off.iter().filter_map(|r| r.cpu_per_decision).collect()),
            on_cpu: median(on.iter().filter_map(|r| r.cpu_per_decision).collect()),
            on_redis: median(on.iter().filter_map(|r| r.redis_per_decision).collect()),
        }
    }

    fn print(&self) {
        let ratio = if self.off_rate > 0.0 { self.on_rate / self.off_rate } else { 0.0 };
        let cpu = match (self.off_cpu, self.on_cpu) {
            (Some(off), Some(on)) if off > 0.0 => format!("{:+.1}%", (on / off - 1.0) * 100.0),
            _ => "-".to_string(),
        };
        let us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} µs"));
        let verdict = if ratio >= FLEET_GOAL {
            format!("within 10% ({:+.1}%)", (ratio - 1.0) * 100.0)
        } else {
            format!("NOT within 10% ({:+.1}%)", (ratio - 1.0) * 100.0)
        };
        println!(
            "{:>11} {:>12.0} {:>12.0} {:>8.3} {:>10} {:>10} {:>8} {:>10}  {verdict}",
            self.concurrency,
            self.off_rate,
            self.on_rate,
            ratio,
            us(self.off_cpu),
            us(self.on_cpu),
            cpu,
            us(self.on_redis)
        );
    }
}

async fn run(concurrency: usize, fleet: Option<&str>, run_for: Duration, redis_pid: Option<u32>) -> Result {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = LedgerOptions::default();
    // For comparisons: SLUICE_BENCH_JOURNAL=<bytes> sets the journal's size (0 turns it off: every
    // group is then a durable redb commit).
    if let Some(bytes) = std::env::var("SLUICE_BENCH_JOURNAL").ok().and_then(|s| s.parse::<u64>().ok()) {
        opts.journal_capacity = bytes;
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
    // CPU time over the measured span (after the warm-up), this process's and redis-server's.
    let stats = ledger.clone();
    let sampler = std::thread::spawn(move || {
        let redis = redis_pid.map(|p| p.to_string());
        let sample = || (cpu_time("self"), redis.as_deref().and_then(cpu_time), thread_times(), stats.write_stats());
        std::thread::sleep((start + WARMUP).saturating_duration_since(Instant::now()));
        let before = sample();
        std::thread::sleep((start + WARMUP + run_for).saturating_duration_since(Instant::now()));
        let after = sample();
        let delta = |a: Option<Duration>, b: Option<Duration>| Some(b?.saturating_sub(a?));
        (
            delta(before.0, after.0),
            delta(before.1, after.1),
            thread_split(&before.2, &after.2),
            Some((before.3, after.3)),
        )
    });
    let tasks: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let service: Arc<Service> = service.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(100_000);
                loop {
                    let t = Instant::now();
                    if t.duration_since(start) > WARMUP + run_for {
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
                        gate_price: None,
                    };
                    let outcome = service.enforce(input).await.expect("enforce");
                    assert_eq!(outcome.decision, sluice::decide::Decision::Allow, "{}", outcome.to_json());
                    // The bytes `POST /v1/enforce` answers with: the API's share of a decision.
                    std::hint::black_box(outcome.to_json_bytes());
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
    let (cpu, redis_cpu, threads, store) = sampler.join().unwrap_or((None, None, [0; 5], None));
    ledger.shutdown();
    all.sort_unstable();
    let decisions = all.len().max(1) as f64;
    let per_decision = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e6 / decisions);
    let pct =
        |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0);
    Result {
        rate: all.len() as f64 / run_for.as_secs_f64(),
        p50: pct(0.50),
        p90: pct(0.90),
        p99: pct(0.99),
        max: all.last().copied().unwrap_or(0),
        cpu_per_decision: per_decision(cpu),
        redis_per_decision: per_decision(redis_cpu),
        threads: threads.map(|ns| ns as f64 / 1e3 / decisions),
        store,
        span: run_for,
    }
}
