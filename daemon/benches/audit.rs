//! `cargo xtask bench audit`: what auditing a large log costs. Builds a store of
//! `SLUICE_BENCH_AUDIT_RECORDS` (default 1,000,000) decision-sized records directly through the
//! ledger, serves it from a child process running the daemon's service and API server (the code
//! `sluice daemon` runs for its socket), pulls a full export with `sluice audit export` and checks
//! it with `sluice audit verify`. Prints the time and the peak RSS of the daemon during the export,
//! of the exporting CLI, and of the verifier. Targets (docs/testing.md): the daemon stays below
//! 64 MiB while it streams the export; the verifier below 100 MiB, at ≥ 100,000 records/s.

mod host;

use host::loadavg;
use sluice::api::access::PeerPolicy;
use sluice::api::server;
use sluice::ledger::{hostkey, Draft, Ledger, LedgerOptions};
use sluice::service::{Service, ServiceConfig};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROLE: &str = "SLUICE_BENCH_AUDIT_ROLE";
const CHAINS: usize = 1000;
/// Records built per transaction, and transactions in flight.
const PER_TXN: usize = 250;
const IN_FLIGHT: usize = 8;

fn main() {
    if std::env::var(ROLE).as_deref() == Ok("serve") {
        let args: Vec<String> = std::env::args().collect();
        let (Some(state), Some(socket)) = (args.get(1), args.get(2)) else {
            eprintln!("serve role: usage: audit STATE_DIR SOCKET");
            std::process::exit(2);
        };
        serve(Path::new(state), Path::new(socket));
        return;
    }
    let records: u64 =
        std::env::var("SLUICE_BENCH_AUDIT_RECORDS").ok().and_then(|n| n.parse().ok()).unwrap_or(1_000_000);
    let sluice = PathBuf::from(env!("CARGO_BIN_EXE_sluice"));
    let scratch = tempfile::Builder::new()
        .prefix("bench-audit-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("scratch directory under the target dir");
    let state = scratch.path().join("state");
    let load_before = loadavg();

    println!("sluice audit benchmark: {records} records (load average before: {load_before})");
    let t = Instant::now();
    build(&state, records);
    let built = t.elapsed();
    let store_bytes = dir_bytes(&state);
    println!(
        "built the store in {:.1} s ({:.0} records/s), {} on disk",
        built.as_secs_f64(),
        records as f64 / built.as_secs_f64(),
        mib(store_bytes)
    );

    // The daemon side: the service and the API server, in their own process.
    let socket = scratch.path().join("api.sock");
    let mut daemon = Command::new(std::env::current_exe().expect("own path"))
        .env(ROLE, "serve")
        .arg(&state)
        .arg(&socket)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the serving process");
    let pid = daemon.id();
    // Kept open until the child is stopped, so it never writes to a closed pipe.
    let mut from_daemon = std::io::BufReader::new(daemon.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    let ready = from_daemon.read_line(&mut line).is_ok() && line.trim() == "ready";
    assert!(ready, "the serving process did not start: {line:?}");
    let daemon_before = status_kib(pid, "VmRSS");

    let export = scratch.path().join("export.json");
    let t = Instant::now();
    let mut cli = timed(&sluice);
    cli.arg("--socket").arg(&socket).args(["audit", "export", "--out"]).arg(&export);
    let (out, export_cli_kib) = run_timed(cli);
    let exported = t.elapsed();
    let daemon_peak = status_kib(pid, "VmHWM");
    let daemon_after = status_kib(pid, "VmRSS");
    // Ours to stop: the child started above, by its id.
    let _ = daemon.kill();
    let _ = daemon.wait();
    drop(from_daemon);
    assert!(out.0, "audit export failed: {}", out.1);
    let export_bytes = std::fs::metadata(&export).map(|m| m.len()).unwrap_or(0);

    let t = Instant::now();
    let mut cli = timed(&sluice);
    cli.args(["audit", "verify"]).arg(&export).arg("--host-pub").arg(state.join("host.pub"));
    let (out, verify_kib) = run_timed(cli);
    let verified = t.elapsed();
    assert!(out.0 && out.1.contains("verified: OK"), "audit verify failed: {}", out.1);
    let load_after = loadavg();

    let rate = |d: Duration| records as f64 / d.as_secs_f64();
    println!();
    println!("{:<44} {:>10} {:>14} {:>14}", "", "time s", "records/s", "peak RSS MiB");
    println!(
        "{:<44} {:>10.2} {:>14.0} {:>14}",
        "export: daemon (service + API server)",
        exported.as_secs_f64(),
        rate(exported),
        kib_to_mib(daemon_peak)
    );
    println!("{:<44} {:>10} {:>14} {:>14}", "export: `sluice audit export` (CLI)", "", "", kib_to_mib(export_cli_kib));
    println!(
        "{:<44} {:>10.2} {:>14.0} {:>14}",
        "verify: `sluice audit verify`",
        verified.as_secs_f64(),
        rate(verified),
        kib_to_mib(verify_kib)
    );
    println!();
    println!(
        "daemon RSS: {} before the export, {} peak (VmHWM, since its start), {} after",
        kib_to_mib(daemon_before),
        kib_to_mib(daemon_peak),
        kib_to_mib(daemon_after)
    );
    println!("export file: {} ({:.0} bytes per record)", mib(export_bytes), export_bytes as f64 / records as f64);
    println!("load average: {load_before} before, {load_after} after (2 shared cores)");
    println!();
    println!("targets:");
    let check = |ok: bool| if ok { "met" } else { "NOT met" };
    let mib_of = |k: Option<u64>| k.map(|k| k as f64 / 1024.0);
    println!("  daemon < 64 MiB while exporting:        {}", check(mib_of(daemon_peak).is_some_and(|m| m < 64.0)));
    println!("  verifier < 100 MiB:                     {}", check(mib_of(verify_kib).is_some_and(|m| m < 100.0)));
    println!("  verification >= 100,000 records/s:      {}", check(rate(verified) >= 100_000.0));
}

/// The serving process: the daemon's service and API server over the built store.
fn serve(state: &Path, socket: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let key = hostkey::load_or_create(state).expect("host key");
        let ledger = Ledger::open(&state.join("ledger.redb"), key, LedgerOptions::default()).expect("ledger");
        let service = Service::start(ledger, ServiceConfig::passport_only(vec![], Duration::from_secs(60)))
            .await
            .expect("service");
        let listener = server::bind(socket, None).expect("bind the API socket");
        let policy = Arc::new(PeerPolicy::new("sluice", "sluice-agents"));
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        println!("ready");
        server::serve(listener, service, policy, stopped).await;
    });
}

/// Appends `records` decision-like records over [`CHAINS`] passports, whose spend adds up.
fn build(state: &Path, records: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let key = hostkey::load_or_create(state).expect("host key");
        let ledger = Ledger::open(&state.join("ledger.redb"), key, LedgerOptions::default()).expect("ledger");
        let per_task = records / IN_FLIGHT as u64;
        let tasks: Vec<_> = (0..IN_FLIGHT)
            .map(|task| {
                let ledger = ledger.clone();
                let count = if task == 0 { records - per_task * (IN_FLIGHT as u64 - 1) } else { per_task };
                tokio::spawn(async move {
                    // Each task owns its chains, so a chain's records are appended in order.
                    let chains: Vec<usize> = (0..CHAINS).filter(|c| c % IN_FLIGHT == task).collect();
                    let mut spent = vec![0i64; chains.len()];
                    let mut done = 0u64;
                    let mut n = 0usize;
                    while done < count {
                        let batch = (count - done).min(PER_TXN as u64) as usize;
                        let mut drafts = Vec::with_capacity(batch);
                        for _ in 0..batch {
                            let slot = n % chains.len();
                            let cost = 1_000 + (n as i64 % 97) * 1_000;
                            spent[slot] += cost;
                            drafts.push(decision(chains[slot], cost, spent[slot], n));
                            n += 1;
                        }
                        ledger.transact(move |_| Ok(((), drafts))).await.expect("append");
                        done += batch as u64;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("build task");
        }
        ledger.checkpoint_now().await.expect("checkpoint");
        ledger.shutdown();
    });
}

/// A record shaped like an allowed decision (about 1 KB of canonical JSON).
fn decision(chain: usize, cost: i64, after: i64, n: usize) -> Draft {
    let id = format!("pp_{chain:032x}");
    let body = serde_json::json!({
        "v": 2,
        "kind": "decision",
        "action": "llm:chat",
        "agent_id": format!("agent-{chain}"),
        "cost_millicents": cost,
        "decision": "allow",
        "detail": format!("All guardrails passed. Daily spend after this request: ${}.{:05} (limit $100000.00).", after / 100_000, after % 100_000),
        "host": "api.openai.com",
        "issuer": "iss_efua1_I9IogdUc_eBqLDIQbd30r3PffqaOcu3n6X-Zc",
        "method": "POST",
        "passport_id": id,
        "path_digest": format!("{:064x}", n),
        "policy_digest": "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "reason": "allowed",
        "request_hash": format!("{:064x}", n.wrapping_mul(2_654_435_761)),
        "spend_window": "daily",
        "spend_window_start": "2026-12-01T00:00:00.000000Z",
        "spend_delta_millicents": cost,
        "spend_after_millicents": after,
    });
    let serde_json::Value::Object(body) = body else { unreachable!("a JSON object") };
    Draft::new(id, body)
}

/// `cmd` under `/usr/bin/time -v` when it is there (for the peak RSS of a process we do not
/// run ourselves).
fn timed(program: &Path) -> Command {
    if Path::new("/usr/bin/time").is_file() {
        let mut c = Command::new("/usr/bin/time");
        c.arg("-v").arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Runs `cmd` to its end; returns (success, its output) and its peak RSS in KiB (from
/// `/usr/bin/time -v`), and prints its CPU time (user + system), which a shared machine does not
/// stretch as it stretches wall time.
fn run_timed(mut cmd: Command) -> ((bool, String), Option<u64>) {
    let out = cmd.output().expect("run the CLI");
    let err = String::from_utf8_lossy(&out.stderr);
    let secs =
        |name: &str| err.lines().find_map(|l| l.trim().strip_prefix(name)).and_then(|v| v.trim().parse::<f64>().ok());
    if let (Some(user), Some(sys)) = (secs("User time (seconds):"), secs("System time (seconds):")) {
        let mut args = cmd.get_args().map(|a| a.to_string_lossy().into_owned());
        let name = args.find(|a| a == "audit").and_then(|_| args.next()).unwrap_or_default();
        println!("`sluice audit {name}`: CPU {user:.2} s user + {sys:.2} s system");
    }
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let peak = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("Maximum resident set size (kbytes):"))
        .and_then(|v| v.trim().parse().ok());
    ((out.status.success(), format!("{stdout}{stderr}")), peak)
}

/// A field of `/proc/PID/status` in KiB.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse().ok())
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| it.filter_map(Result::ok).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn kib_to_mib(kib: Option<u64>) -> String {
    kib.map(|k| format!("{:.1}", k as f64 / 1024.0)).unwrap_or_else(|| "-".into())
}
