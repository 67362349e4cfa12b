//! `cargo bench -p sluice-ledger --bench verify`: what `sluice audit verify` costs per record,
//! without the daemon. Builds a store of `SLUICE_BENCH_VERIFY_RECORDS` (default 200,000)
//! decision-sized records over 1,000 chains (the records `cargo xtask bench audit` writes),
//! exports it as the daemon streams it, then verifies the file with
//! [`verify::verify_reader`], the CLI's code path.
//!
//! Prints the CPU time (user + system, every thread of the process) per record, which a shared
//! machine does not stretch as it stretches wall time, and the wall-clock rate. Under
//! `taskset -c 0` the verifier runs without worker threads. `SLUICE_BENCH_VERIFY_FILE=PATH` keeps
//! the export at PATH and reuses it on the next run (to profile only the verification, e.g.
//! under `perf stat -e instructions`), with its host key at PATH.pub.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_ledger::export::{export_stream, ExportRequest};
use sluice_ledger::hostkey::HostKey;
use sluice_ledger::verify;
use sluice_ledger::{Draft, Ledger, LedgerOptions};

const CHAINS: usize = 1000;
const PER_TXN: usize = 250;

fn main() {
    let records: u64 =
        std::env::var("SLUICE_BENCH_VERIFY_RECORDS").ok().and_then(|n| n.parse().ok()).unwrap_or(200_000);
    let scratch = tempfile::tempdir().expect("scratch directory");
    let export = std::env::var_os("SLUICE_BENCH_VERIFY_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| scratch.path().join("export.json"));
    let key_file = PathBuf::from(format!("{}.pub", export.display()));
    if !export.is_file() || !key_file.is_file() {
        let t = Instant::now();
        build_and_export(&scratch.path().join("state"), records, &export, &key_file);
        println!("built and exported {records} records in {:.1} s", t.elapsed().as_secs_f64());
    }
    let key_bytes: [u8; 32] =
        std::fs::read(&key_file).expect("host key").try_into().expect("a 32-byte Ed25519 public key");
    let host = ed25519_dalek::VerifyingKey::from_bytes(&key_bytes).expect("host key");
    let bytes = std::fs::metadata(&export).map(|m| m.len()).unwrap_or(0);

    let cpu_before = cpu_time();
    let t = Instant::now();
    let file = std::fs::File::open(&export).expect("export file");
    let report = verify::verify_reader(std::io::BufReader::new(file), &host, None);
    let wall = t.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    assert!(report.is_ok(), "verification failed: {:?}", report.problems.first());
    let n = report.records_checked as f64;
    println!(
        "verified {} records ({:.0} bytes each): {:.2} µs CPU per record ({:.0} records per CPU second), \
         wall {:.2} s ({:.0} records/s), {} threads available",
        report.records_checked,
        bytes as f64 / n,
        cpu.as_secs_f64() * 1e6 / n,
        n / cpu.as_secs_f64(),
        wall.as_secs_f64(),
        n / wall.as_secs_f64(),
        std::thread::available_parallelism().map_or(1, |p| p.get()),
    );
}

/// The process's user + system CPU time so far, every thread included.
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage only writes the struct it is given, which is ours and zeroed (a valid
    // rusage) whether or not the call succeeds.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn build_and_export(state: &Path, records: u64, export: &Path, key_file: &Path) {
    std::fs::create_dir_all(state).expect("state directory");
    let key = HostKey::generate();
    std::fs::write(key_file, key.verifying_key().as_bytes()).expect("write the host key");
    let ledger = Ledger::open(&state.join("ledger.redb"), key, LedgerOptions::default()).expect("ledger");
    let mut spent = vec![0i64; CHAINS];
    let mut n = 0usize;
    while (n as u64) < records {
        let batch = (records - n as u64).min(PER_TXN as u64) as usize;
        let mut drafts = Vec::with_capacity(batch);
        for _ in 0..batch {
            let chain = n % CHAINS;
            let cost = 1_000 + (n as i64 % 97) * 1_000;
            spent[chain] += cost;
            drafts.push(decision(chain, cost, spent[chain], n));
            n += 1;
        }
        ledger.transact_blocking(move |_| Ok(((), drafts))).expect("append");
    }
    let stream = futures_executor::block_on(export_stream(&ledger, &ExportRequest::default())).expect("export");
    let mut out = std::io::BufWriter::new(std::fs::File::create(export).expect("export file"));
    stream.write_to(&mut out).expect("write the export");
    drop(out);
    ledger.shutdown();
}

/// A record shaped like an allowed decision (about 1 KB of canonical JSON), as
/// `cargo xtask bench audit` writes them.
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
