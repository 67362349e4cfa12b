//! `cargo bench -p sluice-ledger --bench append`: the store's own cost per record, without the
//! daemon around it. `SLUICE_BENCH_THREADS` callers (default 16) each run
//! `SLUICE_BENCH_RECORDS` transactions (default 20,000 in all) through
//! [`Ledger::transact_blocking`], each the shape of a decision: four state reads, one counter
//! write, one decision record of ~900 canonical bytes in the caller's own chain.
//!
//! Printed: records/s and CPU per record by thread (the writer
//! `sluice-ledger`, the indexer `sluice-ledger-index`, the sealer `sluice-ledger-seal`, the
//! callers), from `/proc/self/task/*/schedstat`. Under
//! `valgrind --tool=callgrind --separate-threads=yes`, each thread's instruction count divided by
//! the record count is the repeatable figure (the timing is not, on a shared machine).

use std::collections::HashMap;
use std::time::Instant;

use sluice_ledger::canonical::Members;
use sluice_ledger::hostkey::HostKey;
use sluice_ledger::record::Draft;
use sluice_ledger::{Ledger, LedgerOptions};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).filter(|n| *n > 0).unwrap_or(default)
}

/// The body of a decision record, as the daemon's record builder writes it.
fn body(agent: usize, n: u64) -> Members {
    let mut m = Members::with_capacity(24, 1024);
    m.uint("v", 2).str("kind", "decision");
    m.str("passport_id", &format!("pp_01JDX8WQ4M8Z6V7N3K2C5R{agent:04}"));
    m.str("issuer", "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK");
    m.str("agent_id", &format!("bench-{agent}"));
    m.str("decision", "allow").str("reason", "allowed").str("detail", "All guardrails passed.");
    m.str("policy_digest", "2f1c0a6b5d3e4f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8");
    m.str("action", "llm:chat").str("method", "POST").str("host", "api.example.test");
    m.str("path_digest", "9a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5061728394a5b6c7d8e9f");
    m.uint("cost_millicents", 1_000);
    m.str("request_hash", "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0");
    m.str("spend_window", "monthly").str("spend_window_start", "2026-12-01T00:00:00.000000Z");
    m.int("spend_delta_millicents", 1_000).uint("spend_after_millicents", 1_000 * (n + 1));
    m
}

fn thread_times() -> HashMap<String, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return out };
    for entry in dir.flatten() {
        let tid = entry.file_name().to_string_lossy().into_owned();
        let base = entry.path();
        let (Ok(comm), Ok(sched)) =
            (std::fs::read_to_string(base.join("comm")), std::fs::read_to_string(base.join("schedstat")))
        else {
            continue;
        };
        if let Some(ns) = sched.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()) {
            out.insert(tid, (comm.trim().to_string(), ns));
        }
    }
    out
}

/// This thread's run time so far (ns).
fn own_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn class(comm: &str) -> &'static str {
    match comm {
        "sluice-ledger" => "writer",
        c if c.starts_with("sluice-ledger-i") => "indexer",
        c if c.starts_with("sluice-ledger-s") => "sealer",
        c if c.starts_with("caller") => "callers",
        _ => "rest",
    }
}

fn main() {
    let threads = env("SLUICE_BENCH_THREADS", 16);
    let records = env("SLUICE_BENCH_RECORDS", 20_000);
    let per_thread = records.div_ceil(threads);
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger =
        Ledger::open(&dir.path().join("ledger.redb"), HostKey::generate(), LedgerOptions::default()).expect("open");
    let before = thread_times();
    let start = Instant::now();
    let callers: Vec<_> = (0..threads)
        .map(|t| {
            let ledger = ledger.clone();
            std::thread::Builder::new()
                .name(format!("caller-{t}"))
                .spawn(move || {
                    let chain = format!("pp_01JDX8WQ4M8Z6V7N3K2C5R{t:04}");
                    let usage = format!("usage/{chain}");
                    let (revoked, stop) = (format!("revoked/{chain}"), format!("stop/{chain}"));
                    let mut appended_count = 0u64;
                    for n in 0..per_thread as u64 {
                        let (chain, usage, revoked, stop) =
                            (chain.clone(), usage.clone(), revoked.clone(), stop.clone());
                        // Built by the caller, as the daemon builds its drafts before submitting.
                        let draft = Draft::new(chain, body(t, n));
                        let ((), appended) = ledger
                            .transact_blocking(move |txn| {
                                let _ = txn.get(&revoked)?;
                                let _ = txn.get("stop/all")?;
                                let _ = txn.get(&stop)?;
                                let _ = txn.get(&usage)?;
                                txn.put(&usage, &[7u8; 96])?;
                                Ok(((), vec![draft]))
                            })
                            .expect("transact");
                        appended_count += appended.len() as u64;
                    }
                    (appended_count, own_cpu_ns())
                })
                .expect("spawn caller")
        })
        .collect();
    let (mut total, mut callers_ns) = (0u64, 0u64);
    for h in callers {
        let (n, ns) = h.join().expect("caller");
        total += n;
        callers_ns += ns;
    }
    let elapsed = start.elapsed();
    let mid = thread_times();
    ledger.shutdown();
    let mut split: Vec<(&str, u64)> =
        ["writer", "indexer", "sealer", "callers", "rest"].into_iter().map(|c| (c, 0)).collect();
    // The callers have exited: they reported their own time.
    if let Some(slot) = split.iter_mut().find(|(c, _)| *c == "callers") {
        slot.1 = callers_ns;
    }
    for (tid, (comm, ns)) in &mid {
        let was = before.get(tid).map_or(0, |(_, b)| *b);
        if let Some(slot) = split.iter_mut().find(|(c, _)| *c == class(comm)) {
            slot.1 += ns.saturating_sub(was);
        }
    }
    println!(
        "{total} records from {threads} callers in {:.2} s: {:.0} records/s; load average {}",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let per: Vec<String> =
        split.iter().map(|(c, ns)| format!("{c} {:.2}", *ns as f64 / 1e3 / total.max(1) as f64)).collect();
    println!("CPU µs per record: {}", per.join(", "));
}
