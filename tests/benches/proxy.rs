//! `cargo xtask bench proxy`: HTTPS through sluice, side by side with the same requests sent
//! directly, through nginx as a TLS-terminating reverse proxy, and through mitmproxy (reverse
//! mode), all against one local HTTPS upstream, in one run on one machine (targets: docs/testing.md, "Targets").
//!
//! * Upstream: nginx serving two static files over TLS (`/small`, 12 bytes; `/64k`, 64 KiB)
//!   with a leaf from a test CA, on `127.0.0.1`, one worker.
//! * Load: h2load, HTTP/1.1 over TLS, time-bounded runs; p50/p99 come from its per-request log.
//!   For sluice, h2load runs as a sandboxed agent (`sluice run --passport … -- h2load …`, no
//!   proxy variables): its DNS and TCP are redirected by the kernel like any agent's, and sluice
//!   decides and durably records every request before forwarding it.
//! * Scenarios: keep-alive at 1 and 32 connections with small and 64 KiB responses; new
//!   connections (`Connection: close`, one request each) at 1 and 4 at a time.
//! * RSS: a sandboxed python agent holds 1,000 idle keep-alive TLS connections (one request
//!   each) and the daemon's `VmRSS` is read.
//! * Cost: each proxy's CPU time (user + system, from `/proc`; nginx's workers included) per
//!   successful request, and the 1-minute load average at the end of each run: the machine may
//!   be shared, so CPU per request is the figure to compare between builds, and req/s ratios
//!   only within one run. Per scenario it prints sluice ÷ direct, ÷ nginx, ÷ mitmproxy, the
//!   added p50 over direct, and checks the targets.
//! * Split: sluice's CPU per request by thread role (proxy runtimes, ledger writer, indexer,
//!   sealer, the rest) and context switches per request, proxy threads and ledger threads
//!   (`sluice_e2e::threads`): what the proxy costs against what durability costs.
//! * Durable wait: the mean time a sluice request waited for its decision to be durable (the
//!   daemon's `sluice_store_commit_seconds` histogram, read from `GET /metrics` before and after
//!   each run), and within it the mean time of the disk's durable write itself
//!   (`sluice_store_durable_write_seconds_total`) and the journal laps' waits: the part of the
//!   added latency that is durability, as against the proxy's own work.
//!
//! Needs root (eBPF), `h2load` and `nginx`; mitmproxy (`mitmdump`) is optional and reported as
//! unavailable when missing (`cargo xtask bench proxy` installs all three). Never part of
//! `cargo xtask test`: a bench target is not built or run by `cargo test`.
//!
//! Environment: `SLUICE_BIN` (the daemon to measure; xtask passes the release build),
//! `SLUICE_BENCH_SECS` (seconds per run, default 5, after a 1 s warm-up),
//! `SLUICE_BENCH_MITMDUMP` (mitmproxy's `mitmdump`; default: the one on `PATH`).
//!
//! For profiling work (the full table is the default): `SLUICE_BENCH_TARGETS` (comma-separated
//! subset of `direct,sluice,nginx,mitmproxy`), `SLUICE_BENCH_SCENARIOS` (comma-separated
//! substrings of scenario labels, e.g. `c1 small`), `SLUICE_BENCH_SKIP_RSS=1`, and
//! `SLUICE_BENCH_PERF=<dir>`: each sluice run is recorded with `perf record -g` on the daemon
//! into `<dir>/perf-<n>.data` (needs `perf`, Debian `linux-perf`); `SLUICE_BENCH_STRACE=<dir>`:
//! each sluice run is counted with `strace -c -f` on the daemon into `<dir>/strace-<n>.txt`, and
//! the daemon's system calls per request are printed (strace slows the daemon several times over:
//! take rates and CPU from a run without it; the calls per request do not depend on the speed).

#[path = "../../daemon/benches/host/mod.rs"]
mod host;

use host::loadavg;
use sluice_e2e::daemon::Daemon;
use sluice_e2e::threads::{Counters, Role, Sample};
use sluice_e2e::upstream::TestCa;
use sluice_e2e::{free_port, python};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const NAME: &str = "api.bench.test";
const IDLE_CONNECTIONS: usize = 1000;
/// `timeout(1)` around each h2load run.
const RUN_GUARD_SECS: u64 = 300;

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    if let Err(e) = run() {
        eprintln!("proxy bench: {e}");
        std::process::exit(1);
    }
}

type Result<T> = std::result::Result<T, String>;

/// A child process stopped (SIGTERM, then SIGKILL) and reaped on drop: nginx's master takes its
/// workers down with it on SIGTERM.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(tool)).find(|p| p.is_file())
}

fn wait_listening(port: u16, what: &str, proc: &mut Proc) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            return Err(format!("{what} exited with {status} before listening on port {port}"));
        }
        if Instant::now() > deadline {
            return Err(format!("{what} is not listening on port {port} after 60 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write(path: &Path, text: &[u8]) -> Result<()> {
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Starts nginx with `conf` (written to `dir/name.conf`), prefix `dir`.
fn nginx(nginx: &Path, dir: &Path, name: &str, conf: &str, port: u16) -> Result<Proc> {
    let path = dir.join(format!("{name}.conf"));
    write(&path, conf.as_bytes())?;
    let child = Command::new(nginx)
        .args(["-p", &dir.to_string_lossy(), "-c", &path.to_string_lossy()])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", nginx.display()))?;
    let mut p = Proc { name: "nginx", child };
    wait_listening(port, &format!("nginx ({name})"), &mut p)?;
    Ok(p)
}

/// Common head of both nginx configurations (as root: the files live in a 0700 temp dir).
fn nginx_head(dir: &Path, name: &str, workers: &str) -> String {
    let d = dir.display();
    format!(
        "user root;\nworker_processes {workers};\ndaemon off;\npid {d}/{name}.pid;\nerror_log {d}/{name}.err warn;\n\
         events {{ worker_connections 8192; }}\n"
    )
}

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Direct,
    Sluice,
    Nginx,
    Mitmproxy,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Sluice => "sluice",
            Target::Nginx => "nginx",
            Target::Mitmproxy => "mitmproxy",
        }
    }
}

struct Scenario {
    label: &'static str,
    path: &'static str,
    conns: u32,
    new_conn: bool,
}

const SCENARIOS: &[Scenario] = &[
    Scenario { label: "keep-alive c1 small", path: "/small", conns: 1, new_conn: false },
    Scenario { label: "keep-alive c32 small", path: "/small", conns: 32, new_conn: false },
    Scenario { label: "keep-alive c1 64KiB", path: "/64k", conns: 1, new_conn: false },
    Scenario { label: "keep-alive c32 64KiB", path: "/64k", conns: 32, new_conn: false },
    Scenario { label: "new-conn c1 small", path: "/small", conns: 1, new_conn: true },
    Scenario { label: "new-conn c4 small", path: "/small", conns: 4, new_conn: true },
];

/// One measured run.
#[derive(Clone, Default)]
struct Figures {
    rps: f64,
    p50_us: u64,
    p99_us: u64,
    ok: u64,
    bad: u64,
    /// The proxy's CPU time (user + system, its worker processes included) per successful
    /// request: sluice's daemon, nginx's master and workers, mitmdump; none for direct.
    daemon_cpu_us: Option<u64>,
    /// sluice only: CPU time and context switches of the daemon's threads by role, summed over
    /// the run (warm-up included, like `daemon_cpu_us`).
    by_role: Option<BTreeMap<Role, Counters>>,
    /// sluice only: the daemon's store metrics over the run ([`StoreMetrics::until`]).
    store: Option<StoreRun>,
    /// The 1-minute load average when the run ended (the machine may be shared).
    load1: String,
}

struct Env {
    dir: PathBuf,
    h2load: PathBuf,
    secs: u64,
    upstream_port: u16,
    nginx_port: u16,
    mitm_port: Option<u16>,
    /// nginx (reverse proxy) and mitmdump, for their CPU per request.
    nginx_pid: u32,
    mitm_pid: Option<u32>,
    daemon: Daemon,
    passport: PathBuf,
}

impl Env {
    fn measure(&self, target: Target, s: &Scenario, n: usize) -> Result<Figures> {
        let log = self.dir.join(format!("h2load-{}-{n}.log", target.label()));
        let port = match target {
            Target::Direct | Target::Sluice => self.upstream_port,
            Target::Nginx => self.nginx_port,
            Target::Mitmproxy => self.mitm_port.ok_or("mitmproxy is unavailable")?,
        };
        // A hang guard, not a measurement: h2load must never outlive the bench.
        let mut args: Vec<String> = vec![
            "timeout".into(),
            RUN_GUARD_SECS.to_string(),
            self.h2load.to_string_lossy().into_owned(),
            "--h1".into(),
            "-c".into(),
            s.conns.to_string(),
            format!("--log-file={}", log.display()),
        ];
        if s.new_conn {
            // h2load reconnects after `Connection: close` only in count mode (with `-D` it
            // stalls), so new-connection runs are a fixed number of requests sized to last
            // about `secs` at the rates this machine reaches.
            let per_sec = if target == Target::Mitmproxy { 20 } else { 400 };
            let n = (per_sec * self.secs).max(u64::from(s.conns));
            args.extend(["-n".into(), n.to_string(), "-H".into(), "Connection: close".into()]);
        } else {
            args.extend(["-D".into(), self.secs.to_string(), "--warm-up-time=1".into()]);
        }
        if target != Target::Sluice {
            // Same name (SNI, Host) as the agent uses; the address given directly.
            args.push(format!("--connect-to=127.0.0.1:{port}"));
        }
        args.push(format!("https://{NAME}:{port}{}", s.path));
        let proxy_pid = match target {
            Target::Direct => None,
            Target::Sluice => self.daemon.pid(),
            Target::Nginx => Some(self.nginx_pid),
            Target::Mitmproxy => self.mitm_pid,
        };
        let cpu_before = proxy_pid.and_then(tree_cpu_ticks);
        let store_before = if target == Target::Sluice { StoreMetrics::read(&self.daemon) } else { None };
        let threads_before = if target == Target::Sluice { proxy_pid.and_then(Sample::take) } else { None };
        let _perf = match (target, std::env::var_os("SLUICE_BENCH_PERF"), self.daemon.pid()) {
            (Target::Sluice, Some(dir), Some(pid)) => Some(perf_record(Path::new(&dir), n, pid)?),
            _ => None,
        };
        let strace = match (target, std::env::var_os("SLUICE_BENCH_STRACE"), self.daemon.pid()) {
            (Target::Sluice, Some(dir), Some(pid)) => Some(strace_count(Path::new(&dir), n, pid)?),
            _ => None,
        };
        let out: Output = if target == Target::Sluice {
            let mut full = vec!["run".to_string(), "--passport".into(), self.passport.to_string_lossy().into_owned()];
            full.push("--".into());
            full.extend(args);
            let refs: Vec<&str> = full.iter().map(String::as_str).collect();
            self.daemon.cli(&refs)
        } else {
            Command::new(&args[0]).args(&args[1..]).output().map_err(|e| format!("running h2load: {e}"))?
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "h2load for {} / {} failed ({}):\n{stdout}\n{}",
                target.label(),
                s.label,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let cpu_after = proxy_pid.and_then(tree_cpu_ticks);
        let store_after = store_before.as_ref().and_then(|_| StoreMetrics::read(&self.daemon));
        let threads_after = threads_before.as_ref().and(proxy_pid).and_then(Sample::take);
        let mut f = parse_h2load(&stdout).ok_or_else(|| format!("cannot read h2load's summary:\n{stdout}"))?;
        if let Some(strace) = strace {
            let (path, calls) = strace.finish()?;
            // Includes the warm-up second's calls but not its requests: an upper bound, as the CPU.
            let per = if f.ok > 0 { calls as f64 / f.ok as f64 } else { f64::NAN };
            eprintln!("{}: {calls} daemon system calls, {per:.1} per request ({})", s.label, path.display());
        }
        f.load1 = loadavg().split_whitespace().next().unwrap_or("?").to_string();
        if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
            // Includes the warm-up second's requests in the CPU but not in `ok`: an upper bound.
            f.daemon_cpu_us = (f.ok > 0).then(|| b.saturating_sub(a) * 1_000_000 / ticks_per_sec() / f.ok);
        }
        if let (Some(a), Some(b)) = (&threads_before, &threads_after) {
            f.by_role = Some(a.until(b));
        }
        if let (Some(a), Some(b)) = (&store_before, &store_after) {
            f.store = Some(a.until(b));
        }
        let text = std::fs::read_to_string(&log).map_err(|e| format!("reading {}: {e}", log.display()))?;
        let mut lat: Vec<u64> = text
            .lines()
            .filter_map(|l| {
                let mut cols = l.split('\t');
                let _start = cols.next()?;
                let status: u16 = cols.next()?.trim().parse().ok()?;
                let us: u64 = cols.next()?.trim().parse().ok()?;
                (200..300).contains(&status).then_some(us)
            })
            .collect();
        lat.sort_unstable();
        f.p50_us = percentile(&lat, 0.50);
        f.p99_us = percentile(&lat, 0.99);
        let _ = std::fs::remove_file(&log);
        Ok(f)
    }
}

/// `perf record -g` on the daemon until dropped (SIGINT makes perf write its file).
fn perf_record(dir: &Path, n: usize, pid: u32) -> Result<PerfGuard> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let out = dir.join(format!("perf-{n}.data"));
    let child = Command::new("perf")
        .args(["record", "-q", "-F", "1999", "-g", "--call-graph", "dwarf,16384", "-p", &pid.to_string(), "-o"])
        .arg(&out)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("perf record (apt-get install linux-perf): {e}"))?;
    eprintln!("recording the daemon with perf into {}", out.display());
    Ok(PerfGuard(child))
}

struct PerfGuard(Child);

/// `strace -c -f` on the daemon (every thread) until [`StraceGuard::finish`].
fn strace_count(dir: &Path, n: usize, pid: u32) -> Result<StraceGuard> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let out = dir.join(format!("strace-{n}.txt"));
    let child = Command::new("strace")
        .args(["-c", "-f", "-p", &pid.to_string(), "-o"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("strace (apt-get install strace): {e}"))?;
    // strace attaches to each thread in turn; give it a moment before the load starts.
    std::thread::sleep(Duration::from_millis(500));
    Ok(StraceGuard { child: Some(child), out })
}

struct StraceGuard {
    child: Option<Child>,
    out: PathBuf,
}

impl StraceGuard {
    /// Stops strace (SIGINT: it detaches and writes its table) and reads the total calls.
    fn finish(mut self) -> Result<(PathBuf, u64)> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
        let text = std::fs::read_to_string(&self.out).map_err(|e| format!("{}: {e}", self.out.display()))?;
        // `100.00    0.123456           1     12345       123 total`: calls are the 4th column.
        let calls = text
            .lines()
            .find(|l| l.trim_end().ends_with(" total"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("no total in {}", self.out.display()))?;
        Ok((self.out.clone(), calls))
    }
}

impl Drop for StraceGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }
}

impl Drop for PerfGuard {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

/// Whether `SLUICE_BENCH_<var>` (a comma-separated list) selects `label`; unset selects all.
fn selected(var: &str, label: &str, exact: bool) -> bool {
    match std::env::var(format!("SLUICE_BENCH_{var}")) {
        Ok(list) => list.split(',').map(str::trim).any(|w| if exact { w == label } else { label.contains(w) }),
        Err(_) => true,
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied().unwrap_or(0)
}

/// `finished in 5.00s, 1337.33 req/s, …` and the request/status lines of h2load's summary.
fn parse_h2load(out: &str) -> Option<Figures> {
    let mut f = Figures::default();
    let mut seen = false;
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("finished in ") {
            let rps = rest.split(", ").nth(1)?.strip_suffix(" req/s")?;
            f.rps = rps.trim().parse().ok()?;
            seen = true;
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            for part in rest.split(", ") {
                let (n, class) = part.split_once(' ')?;
                let n: u64 = n.parse().ok()?;
                if class == "2xx" {
                    f.ok = n;
                } else {
                    f.bad += n;
                }
            }
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            for part in rest.split(", ") {
                if let Some(n) = part.strip_suffix(" errored").or_else(|| part.strip_suffix(" timeout")) {
                    f.bad += n.parse::<u64>().ok()?;
                }
            }
        }
    }
    seen.then_some(f)
}

/// utime + stime of a process, in clock ticks (`/proc/PID/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count fields after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// [`cpu_ticks`] of `pid` and of its children (nginx's workers), read from `/proc`.
fn tree_cpu_ticks(pid: u32) -> Option<u64> {
    let mut total = cpu_ticks(pid)?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        let ppid = stat.get(stat.rfind(')').unwrap_or(0) + 1..).and_then(|r| r.split_whitespace().nth(1));
        if ppid.and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            total += cpu_ticks(child).unwrap_or(0);
        }
    }
    Some(total)
}

fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// The daemon's store series at one instant, from `GET /metrics` on its API socket.
struct StoreMetrics {
    /// `sluice_store_commit_seconds` sum and count: every commit's wait, queueing included.
    commit_secs: f64,
    commits: f64,
    /// The disk's durable writes (one per group) and the time spent in them.
    write_secs: f64,
    writes: f64,
    /// Journal laps and the time the writer waited in them.
    lap_secs: f64,
    laps: f64,
    /// The writer's busy time, and when it was read.
    busy_secs: f64,
    /// Groups a proxy thread committed itself (its request alone there, the writer idle).
    led: f64,
    at: Instant,
}

/// What a run added to [`StoreMetrics`], as means.
#[derive(Clone, Copy)]
struct StoreRun {
    /// Mean wait of a commit (a decision's record), submission to durable, in µs.
    commit_us: f64,
    /// Mean time of one durable write (one group), in µs.
    write_us: f64,
    /// Commits per durable write: how many decisions shared each sync.
    per_write: f64,
    laps: f64,
    lap_ms: f64,
    /// The writer's busy time over the run's wall time.
    busy: f64,
    /// Share of the durable writes that a proxy thread led.
    led: f64,
}

impl StoreMetrics {
    /// `None` (the columns show n/a) if the socket or a series cannot be read.
    fn read(daemon: &Daemon) -> Option<StoreMetrics> {
        let text = daemon.api_get("/metrics").ok()?;
        let value = |name: &str| -> Option<f64> {
            text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))?.trim().parse().ok()
        };
        Some(StoreMetrics {
            commit_secs: value("sluice_store_commit_seconds_sum")?,
            commits: value("sluice_store_commit_seconds_count")?,
            write_secs: value("sluice_store_durable_write_seconds_total")?,
            writes: value("sluice_store_durable_writes_total")?,
            lap_secs: value("sluice_store_journal_lap_wait_seconds_total")?,
            laps: value("sluice_store_journal_laps_total")?,
            busy_secs: value("sluice_store_writer_busy_seconds_total")?,
            // Absent from a daemon older than leading: none led.
            led: value("sluice_store_led_groups_total").unwrap_or(0.0),
            at: Instant::now(),
        })
    }

    /// The run from `self` to `later`. Both count the warm-up second: true means of the run's
    /// commits and writes.
    fn until(&self, later: &StoreMetrics) -> StoreRun {
        let mean = |secs: f64, n: f64| if n > 0.0 { secs * 1e6 / n } else { f64::NAN };
        let (commits, writes) = (later.commits - self.commits, later.writes - self.writes);
        StoreRun {
            commit_us: mean(later.commit_secs - self.commit_secs, commits),
            write_us: mean(later.write_secs - self.write_secs, writes),
            per_write: if writes > 0.0 { commits / writes } else { f64::NAN },
            laps: later.laps - self.laps,
            lap_ms: (later.lap_secs - self.lap_secs) * 1e3,
            busy: (later.busy_secs - self.busy_secs) / later.at.duration_since(self.at).as_secs_f64(),
            led: if writes > 0.0 { (later.led - self.led) / writes } else { f64::NAN },
        }
    }
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading /proc/{pid}/status: {e}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// The sandboxed agent holding idle connections: one request each, then silence until stdin
/// closes.
const IDLE_AGENT: &str = r#"
import http.client, resource, ssl, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ctx = ssl.create_default_context()
conns = []
for i in range(n):
    c = http.client.HTTPSConnection(host, port, context=ctx, timeout=60)
    c.request("GET", "/small")
    r = c.getresponse()
    r.read()
    if r.status != 200:
        print("status", r.status, file=sys.stderr)
        sys.exit(1)
    conns.append(c)
print("ready", len(conns), flush=True)
sys.stdin.read()
"#;

/// How long the bench lets the daemon sit idle before reading its RSS again: it hands its
/// allocator's free pages back one to two seconds after its last durable write
/// (`daemon/src/heap.rs`), up to three once the checkpoint signed after the last records counts
/// as a write, so a figure read at once still holds what the last requests freed.
const SETTLE: Duration = Duration::from_secs(4);

/// `VmRSS` of a process now and [`SETTLE`] later, with `VmHWM` as of now, in KiB.
fn rss_now_and_settled(pid: u32) -> Result<(u64, u64, u64)> {
    let (at_once, peak) = rss_kib(pid)?;
    std::thread::sleep(SETTLE);
    let (settled, _) = rss_kib(pid)?;
    Ok((at_once, settled, peak))
}

/// Daemon RSS (KiB) with [`IDLE_CONNECTIONS`] idle agent connections open: as the last one is
/// open, and [`SETTLE`] later with them still open.
fn rss_at_idle_connections(env: &Env, pid: u32) -> Result<(u64, u64)> {
    let py = python().to_string_lossy().into_owned();
    let mut agent = env
        .daemon
        .cli_command(&[
            "run",
            "--passport",
            &env.passport.to_string_lossy(),
            "--",
            &py,
            "-c",
            IDLE_AGENT,
            NAME,
            &env.upstream_port.to_string(),
            &IDLE_CONNECTIONS.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the idle-connection agent: {e}"))?;
    let stdout = agent.stdout.take().ok_or("no agent stdout")?;
    let mut line = String::new();
    let read = BufReader::new(stdout).read_line(&mut line);
    let result = match read {
        Ok(_) if line.starts_with("ready") => rss_now_and_settled(pid).map(|(at_once, settled, _)| (at_once, settled)),
        _ => Err(format!("the idle-connection agent did not get ready: {line:?}")),
    };
    drop(agent.stdin.take()); // EOF: the agent exits and its connections close.
    let _ = agent.wait();
    result
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn run() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (the kernel redirect); run `sudo cargo xtask bench proxy`".into());
    }
    let h2load = which("h2load").ok_or("h2load is missing: apt-get install nghttp2-client")?;
    let nginx_bin = which("nginx").or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()));
    let nginx_bin = nginx_bin.ok_or("nginx is missing: apt-get install nginx-light")?;
    let mitmdump = std::env::var_os("SLUICE_BENCH_MITMDUMP").map(PathBuf::from).or_else(|| which("mitmdump"));
    let secs: u64 = std::env::var("SLUICE_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let load_start = loadavg();

    let tmp = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let dir = tmp.path().to_path_buf();
    let ca = TestCa::new();
    let ca_path = ca.write(&dir);
    let (cert, key) = ca.leaf_pem(&[NAME, "127.0.0.1"]);
    write(&dir.join("leaf.pem"), cert.as_bytes())?;
    write(&dir.join("leaf.key"), key.as_bytes())?;
    std::fs::create_dir_all(dir.join("www")).map_err(|e| format!("www dir: {e}"))?;
    write(&dir.join("www/small"), b"hello bench\n")?;
    write(&dir.join("www/64k"), &vec![b'x'; 64 * 1024])?;
    let d = dir.display();

    // The upstream: static files over TLS.
    let upstream_port = free_port();
    let up_conf = format!(
        "{}http {{\n access_log off;\n keepalive_requests 10000000;\n keepalive_timeout 300s;\n \
         server {{\n  listen 127.0.0.1:{upstream_port} ssl;\n  ssl_certificate {d}/leaf.pem;\n  \
         ssl_certificate_key {d}/leaf.key;\n  root {d}/www;\n  default_type application/octet-stream;\n }}\n}}\n",
        nginx_head(&dir, "upstream", "1")
    );
    let _upstream = nginx(&nginx_bin, &dir, "upstream", &up_conf, upstream_port)?;

    // nginx as a TLS-terminating reverse proxy: verifies the upstream, keeps connections to it.
    let nginx_port = free_port();
    let ng_conf = format!(
        "{}http {{\n access_log off;\n keepalive_requests 10000000;\n keepalive_timeout 300s;\n \
         upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}\n \
         server {{\n  listen 127.0.0.1:{nginx_port} ssl;\n  ssl_certificate {d}/leaf.pem;\n  \
         ssl_certificate_key {d}/leaf.key;\n  location / {{\n   proxy_pass https://up;\n   \
         proxy_http_version 1.1;\n   proxy_set_header Connection \"\";\n   proxy_set_header Host {NAME};\n   \
         proxy_ssl_server_name on;\n   proxy_ssl_name {NAME};\n   proxy_ssl_verify on;\n   \
         proxy_ssl_trusted_certificate {ca};\n   proxy_ssl_session_reuse on;\n   proxy_buffering off;\n  }}\n \
         }}\n}}\n",
        nginx_head(&dir, "proxy", "auto"),
        ca = ca_path.display()
    );
    let nginx_proxy = nginx(&nginx_bin, &dir, "proxy", &ng_conf, nginx_port)?;
    let nginx_pid = nginx_proxy.child.id();

    // mitmproxy in reverse mode, verifying the upstream against the test CA.
    let mut _mitm = None;
    let mut mitm_port = None;
    let mut mitm_pid = None;
    let mut mitm_note = String::new();
    match &mitmdump {
        None => mitm_note = "mitmproxy unavailable (mitmdump not found; pip install mitmproxy)".into(),
        Some(bin) => {
            let port = free_port();
            let confdir = dir.join("mitm");
            let child = Command::new(bin)
                .args([
                    "-q",
                    "--listen-host",
                    "127.0.0.1",
                    "--mode",
                    &format!("reverse:https://127.0.0.1:{upstream_port}@{port}"),
                    "--set",
                    &format!("confdir={}", confdir.display()),
                    "--set",
                    &format!("ssl_verify_upstream_trusted_ca={}", ca_path.display()),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            match child {
                Ok(child) => {
                    let mut p = Proc { name: "mitmdump", child };
                    match wait_listening(port, "mitmdump", &mut p) {
                        Ok(()) => {
                            mitm_port = Some(port);
                            mitm_pid = Some(p.child.id());
                            _mitm = Some(p);
                        }
                        Err(e) => mitm_note = format!("mitmproxy unavailable: {e}"),
                    }
                }
                Err(e) => mitm_note = format!("mitmproxy unavailable: {e}"),
            }
        }
    }

    // sluice: the real daemon with the kernel redirect; the name resolves to the upstream.
    let dns_extra = format!("static_hosts = {{ \"{NAME}\" = \"127.0.0.1\" }}");
    let extra = format!("[upstream_tls]\nextra_roots = [\"{}\"]\n", ca_path.display());
    let daemon = Daemon::start_custom("root", &dns_extra, &extra, &[]);
    let pid = daemon.pid().ok_or("the daemon is not running")?;
    let (passport, _) = daemon.issue(
        "bench",
        &[
            "--permission",
            "*",
            "--constraint",
            &format!("core:scope:domain_allowlist=[\"{NAME}\"]"),
            "--constraint",
            "core:cost:max_cumulative=1000000000000",
        ],
    );
    let (rss_start, _) = rss_kib(pid)?;
    let env = Env {
        dir: dir.clone(),
        h2load,
        secs,
        upstream_port,
        nginx_port,
        mitm_port,
        nginx_pid,
        mitm_pid,
        daemon,
        passport,
    };

    // First, on the fresh daemon, so the figure is the connections' cost and not what the
    // allocator kept from the load runs.
    eprintln!("opening {IDLE_CONNECTIONS} idle connections through sluice");
    let rss_idle = if std::env::var_os("SLUICE_BENCH_SKIP_RSS").is_some() {
        Err("skipped (SLUICE_BENCH_SKIP_RSS)".to_string())
    } else {
        rss_at_idle_connections(&env, pid)
    };

    let targets = [Target::Direct, Target::Sluice, Target::Nginx, Target::Mitmproxy];
    let mut results: Vec<Vec<Option<Figures>>> = Vec::new();
    let mut errors = Vec::new();
    for (i, s) in SCENARIOS.iter().enumerate() {
        let mut row = Vec::new();
        for t in targets {
            if (t == Target::Mitmproxy && mitm_port.is_none())
                || !selected("TARGETS", t.label(), true)
                || !selected("SCENARIOS", s.label, false)
            {
                row.push(None);
                continue;
            }
            eprintln!("running {} / {} ({secs} s)", s.label, t.label());
            match env.measure(t, s, i) {
                Ok(f) => row.push(Some(f)),
                Err(e) => {
                    errors.push(e);
                    row.push(None);
                }
            }
        }
        results.push(row);
    }
    let (rss_after_load_at_once, rss_after_load, hwm_after_load) = rss_now_and_settled(pid)?;
    let load_end = loadavg();

    // The table.
    let mut o = String::new();
    o.push_str(&format!(
        "\nproxy benchmark: h2load --h1 over TLS, {secs} s per run after 1 s warm-up; sluice = {}\n\
         load average (1/5/15 min) at start: {load_start}; at end: {load_end}; {} cores\n\
         idle CPUs: {}\n\n",
        sluice_e2e::daemon::sluice_bin().display(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        host::idle_policy(),
    ));
    o.push_str(&format!(
        "{:<22} {:<10} {:>10} {:>9} {:>9} {:>9} {:>14} {:>6}\n",
        "scenario", "through", "req/s", "p50 µs", "p99 µs", "errors", "proxy CPU µs", "load"
    ));
    for (s, row) in SCENARIOS.iter().zip(&results) {
        for (t, f) in targets.iter().zip(row) {
            match f {
                Some(f) => o.push_str(&format!(
                    "{:<22} {:<10} {:>10.0} {:>9} {:>9} {:>9} {:>14} {:>6}\n",
                    s.label,
                    t.label(),
                    f.rps,
                    f.p50_us,
                    f.p99_us,
                    f.bad,
                    f.daemon_cpu_us.map(|c| format!("{c}/req")).unwrap_or_default(),
                    f.load1
                )),
                None => o.push_str(&format!("{:<22} {:<10} {:>10}\n", s.label, t.label(), "n/a")),
            }
        }
    }
    o.push_str(&format!(
        "\n{:<22} {:>10} {:>10} {:>12} {:>13} {:>17}\n",
        "sluice req/s ratio", "÷ direct", "÷ nginx", "÷ mitmproxy", "added p50 µs", "sluice CPU µs/req"
    ));
    let ratio = |a: &Option<Figures>, b: &Option<Figures>| match (a, b) {
        (Some(a), Some(b)) if b.rps > 0.0 => format!("{:.2}", a.rps / b.rps),
        _ => "n/a".into(),
    };
    for (s, row) in SCENARIOS.iter().zip(&results) {
        let added = match (&row[1], &row[0]) {
            (Some(sl), Some(di)) => format!("{}", sl.p50_us as i64 - di.p50_us as i64),
            _ => "n/a".into(),
        };
        let cpu = row[1].as_ref().and_then(|f| f.daemon_cpu_us).map_or_else(|| "n/a".into(), |c| c.to_string());
        o.push_str(&format!(
            "{:<22} {:>10} {:>10} {:>12} {:>13} {:>17}\n",
            s.label,
            ratio(&row[1], &row[0]),
            ratio(&row[1], &row[2]),
            ratio(&row[1], &row[3]),
            added,
            cpu
        ));
    }
    // What durability adds to a request's latency, from the daemon's own metrics.
    o.push_str(&format!(
        "\n{:<22} {:>15} {:>15} {:>15} {:>7} {:>10} {:>12} {:>8}\n",
        "sluice durability",
        "commit wait µs",
        "disk write µs",
        "decisions/sync",
        "laps",
        "lap ms",
        "writer busy",
        "led"
    ));
    for (s, row) in SCENARIOS.iter().zip(&results) {
        let Some(st) = row[1].as_ref().and_then(|f| f.store) else { continue };
        o.push_str(&format!(
            "{:<22} {:>15.0} {:>15.0} {:>15.1} {:>7.0} {:>10.1} {:>11.0}% {:>7.0}%\n",
            s.label,
            st.commit_us,
            st.write_us,
            st.per_write,
            st.laps,
            st.lap_ms,
            st.busy * 100.0,
            st.led * 100.0
        ));
    }
    o.push_str(
        "(means over the run: commit wait = a decision's record from submission to durable, queueing \
         and the group's write included; disk write = one group's durable journal write; laps = moves \
         to the journal's other half when one is full, in the commit wait of the groups that met \
         them; writer busy = the writer's busy time over the run's, warm-up included, groups led by \
         proxy threads too; led = share of the groups a proxy thread committed itself, its request \
         alone there and the writer idle)\n",
    );
    // The daemon's CPU split by thread: the proxy's own work against the ledger's (the writer's
    // group commits, the indexer, the sealer), and how often threads hand work to each other.
    o.push_str(&format!(
        "\n{:<22} {:>7} {:>7} {:>8} {:>7} {:>6} {:>15} {:>15}\n",
        "sluice per request", "proxy", "writer", "indexer", "sealer", "rest", "switches proxy", "switches ledger"
    ));
    for (s, row) in SCENARIOS.iter().zip(&results) {
        let Some((by_role, ok)) =
            row[1].as_ref().and_then(|f| Some((f.by_role.as_ref()?, f.ok))).filter(|(_, ok)| *ok > 0)
        else {
            continue;
        };
        let cpu = |r: Role| format!("{:.1}", by_role[&r].cpu_ns as f64 / 1e3 / ok as f64);
        let switches = |roles: &[Role]| {
            format!("{:.2}", roles.iter().map(|r| by_role[r].switches).sum::<u64>() as f64 / ok as f64)
        };
        o.push_str(&format!(
            "{:<22} {:>7} {:>7} {:>8} {:>7} {:>6} {:>15} {:>15}\n",
            s.label,
            cpu(Role::Proxy),
            cpu(Role::Writer),
            cpu(Role::Indexer),
            cpu(Role::Sealer),
            cpu(Role::Rest),
            switches(&[Role::Proxy]),
            switches(&[Role::Writer, Role::Indexer, Role::Sealer]),
        ));
    }
    o.push_str("(CPU in µs from each thread's schedstat; context switches voluntary + involuntary)\n");
    o.push_str(&format!(
        "\nsluice RSS: {:.1} MiB at start; after the load runs {:.1} MiB, {:.1} MiB {} s later (peak {:.1} MiB); ",
        mib(rss_start),
        mib(rss_after_load_at_once),
        mib(rss_after_load),
        SETTLE.as_secs(),
        mib(hwm_after_load)
    ));
    match &rss_idle {
        Ok((at_once, settled)) => o.push_str(&format!(
            "with {IDLE_CONNECTIONS} idle connections open (fresh daemon, before the load runs) {:.1} MiB as the last opened, {:.1} MiB {} s later\n\
             (the daemon hands free heap pages back after a second without a durable write; the targets are checked on the later figures)\n",
            mib(*at_once),
            mib(*settled),
            SETTLE.as_secs()
        )),
        Err(e) => o.push_str(&format!("at {IDLE_CONNECTIONS} idle connections: not measured ({e})\n")),
    }

    // The targets of docs/testing.md ("Targets"), checked against this run.
    o.push_str("\ntargets (docs/testing.md):\n");
    let check = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "n/a",
    };
    for (s, row) in SCENARIOS.iter().zip(&results) {
        let vs = |j: usize, factor: f64| match (&row[1], &row[j]) {
            (Some(a), Some(b)) => Some(a.rps >= factor * b.rps),
            _ => None,
        };
        if s.new_conn {
            o.push_str(&format!("  {}: sluice ≥ 0.7× nginx: {}\n", s.label, check(vs(2, 0.7))));
            continue;
        }
        let mut line = format!("  {}: sluice ≥ 20× mitmproxy: {}", s.label, check(vs(3, 20.0)));
        if s.conns > 1 {
            let cpu = row[1].as_ref().and_then(|f| f.daemon_cpu_us).map(|c| c <= 60);
            line.push_str(&format!("; sluice ≥ nginx: {}; daemon CPU ≤ 60 µs/req: {}", check(vs(2, 1.0)), check(cpu)));
        }
        o.push_str(&line);
        o.push('\n');
    }
    let added_p50 = match (&results[0][1], &results[0][0]) {
        (Some(sl), Some(di)) => Some(sl.p50_us.saturating_sub(di.p50_us) < 200),
        _ => None,
    };
    o.push_str(&format!("  added p50 < 200 µs at one connection (durability on): {}\n", check(added_p50)));
    o.push_str(&format!(
        "  RSS < 64 MiB at {IDLE_CONNECTIONS} connections: {}; after the load runs: {}\n",
        check(rss_idle.as_ref().ok().map(|(_, settled)| *settled < 64 * 1024)),
        check(Some(rss_after_load < 64 * 1024))
    ));
    if !mitm_note.is_empty() {
        o.push_str(&format!("\nnote: {mitm_note}\n"));
    }
    for e in &errors {
        o.push_str(&format!("\nerror: {e}\n"));
    }
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(o.as_bytes());
    let _ = stdout.flush();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{} run(s) failed (see above); daemon log:\n{}", errors.len(), env.daemon.log()))
    }
}
