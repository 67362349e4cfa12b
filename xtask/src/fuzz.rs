//! `cargo xtask fuzz [SECONDS] [TARGET...]`: builds the fuzz targets in `fuzz/` and runs each for
//! SECONDS (default 60), one after another, then prints one row per target (executions, exec/s,
//! corpus size, result). Fails if any target found a crash, naming the input that caused it.
//!
//! * cargo-fuzz is installed with `cargo install cargo-fuzz --locked` when missing. It needs
//!   nightly flags; `RUSTC_BOOTSTRAP=1` lets the stable toolchain take them.
//! * `fuzz/` is its own workspace and builds into `fuzz/target` (even when `CARGO_TARGET_DIR`
//!   is set), so the instrumented build never touches the ordinary one.
//! * The checked-in seeds (`fuzz/corpus/TARGET/`) are only read: what libFuzzer finds goes to
//!   `fuzz/target/corpus/TARGET/`, which later runs start from. Crashing inputs are written to
//!   `fuzz/artifacts/TARGET/`.
//! * No sanitizer by default: the fuzzed crates forbid `unsafe`, and AddressSanitizer halves the
//!   executions per second and inflates stack frames (the CEL target checks evaluation on a 2 MiB
//!   stack, as in the proxy). `SLUICE_FUZZ_SANITIZER=address` (or any `cargo fuzz -s` value)
//!   selects one; each sanitizer is a separate build.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Seconds per target when none are given.
pub const DEFAULT_SECS: u64 = 60;
/// Seconds per target in `cargo xtask test`: a smoke run (the seeds, then a little search).
pub const SMOKE_SECS: u64 = 15;

/// The outcome of one target's run.
struct Row {
    target: String,
    executions: Option<u64>,
    exec_per_sec: Option<u64>,
    corpus: usize,
    result: Result<(), String>,
}

fn fuzz_dir() -> PathBuf {
    crate::root().join("fuzz")
}

/// `cargo fuzz …` in the repository root, building into `fuzz/target`.
fn cargo_fuzz() -> Command {
    let mut c = crate::cargo();
    c.arg("fuzz").env("RUSTC_BOOTSTRAP", "1").env("CARGO_TARGET_DIR", fuzz_dir().join("target"));
    c
}

fn sanitizer() -> String {
    std::env::var("SLUICE_FUZZ_SANITIZER").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "none".into())
}

/// Installs cargo-fuzz if `cargo fuzz` does not run.
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let present = crate::cargo()
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        eprintln!("xtask: cargo-fuzz is missing; installing it");
        crate::run(crate::cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

/// The targets, as `cargo fuzz list` names them.
fn targets() -> anyhow::Result<Vec<String>> {
    let out = cargo_fuzz().arg("list").output().context("cannot run cargo fuzz list")?;
    if !out.status.success() {
        bail!("cargo fuzz list failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// `cargo xtask fuzz [SECONDS] [TARGET...]`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut secs = DEFAULT_SECS;
    let mut chosen = Vec::new();
    for (i, a) in args.iter().enumerate() {
        match a.parse::<u64>() {
            Ok(n) if i == 0 && n > 0 => secs = n,
            _ if a.starts_with('-') => {
                bail!("fuzz: unknown option {a:?} (usage: cargo xtask fuzz [SECONDS] [TARGET...])")
            }
            _ => chosen.push(a.clone()),
        }
    }
    run_targets(secs, &chosen)
}

/// Builds every target, runs the chosen ones (all when empty) for `secs` each, prints the table.
pub fn run_targets(secs: u64, chosen: &[String]) -> anyhow::Result<()> {
    ensure_cargo_fuzz()?;
    let all = targets()?;
    if let Some(unknown) = chosen.iter().find(|t| !all.contains(t)) {
        bail!("fuzz: no target {unknown:?}; the targets are: {}", all.join(", "));
    }
    let selected: Vec<String> = if chosen.is_empty() { all } else { chosen.to_vec() };
    let san = sanitizer();
    eprintln!("xtask: building the fuzz targets (sanitizer: {san}) into fuzz/target");
    // `cargo fuzz build` takes one target or none (all of them).
    if chosen.is_empty() {
        crate::run(cargo_fuzz().args(["build", "-s", &san]))?;
    } else {
        for target in &selected {
            crate::run(cargo_fuzz().args(["build", "-s", &san, target]))?;
        }
    }

    let mut rows = Vec::new();
    for target in &selected {
        eprintln!("xtask: fuzzing {target} for {secs} s");
        rows.push(run_one(target, secs, &san)?);
    }
    print_table(&rows, secs);
    let crashed: Vec<String> =
        rows.iter().filter_map(|r| r.result.as_ref().err().map(|e| format!("  {}: {e}", r.target))).collect();
    if !crashed.is_empty() {
        bail!(
            "fuzzing found {} failing target(s):\n{}\nreproduce with: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -s {san} TARGET INPUT; \
             once fixed, keep the input as a unit test next to the parser and in fuzz/corpus/TARGET/",
            crashed.len(),
            crashed.join("\n")
        );
    }
    Ok(())
}

fn run_one(target: &str, secs: u64, san: &str) -> anyhow::Result<Row> {
    let dir = fuzz_dir();
    let work = dir.join("target/corpus").join(target);
    let seeds = dir.join("corpus").join(target);
    let logs = dir.join("target/logs");
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    std::fs::create_dir_all(&seeds).with_context(|| format!("cannot create {}", seeds.display()))?;
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let log_path = logs.join(format!("{target}.log"));
    let log = std::fs::File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let started = Instant::now();
    let status = cargo_fuzz()
        .args(["run", "-s", san, target])
        .arg(&work)
        .arg(&seeds)
        .args([
            "--",
            &format!("-max_total_time={secs}"),
            // One input taking this long is a finding too (a hang on hostile input).
            "-timeout=20",
            "-print_final_stats=1",
        ])
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("cannot run cargo fuzz run {target}"))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let stat = |name: &str| {
        text.lines().rev().find_map(|l| {
            l.trim().strip_prefix(name).and_then(|v| v.trim_start_matches(':').trim().parse::<u64>().ok())
        })
    };
    let corpus = std::fs::read_dir(&work).map(|d| d.count()).unwrap_or(0);
    let result = if status.success() {
        Ok(())
    } else {
        let artifact = text
            .lines()
            .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim().to_string()))
            .map(|p| if Path::new(&p).is_absolute() { p } else { dir.join(&p).display().to_string() });
        // The panic's location and its message (the next line), or libFuzzer's own summary.
        let lines: Vec<&str> = text.lines().collect();
        let what = match lines.iter().position(|l| l.contains("panicked at")) {
            Some(i) => format!("{} {}", lines[i].trim(), lines.get(i + 1).map_or("", |l| l.trim())),
            None => lines
                .iter()
                .find(|l| l.contains("==ERROR") || l.contains("deadly signal") || l.contains("Timeout"))
                .map_or_else(|| "the target failed".to_string(), |l| l.trim().to_string()),
        };
        Err(match artifact {
            Some(a) => format!("{what}; input: {a}; log: {}", log_path.display()),
            None => format!("{what} ({status}); log: {}", log_path.display()),
        })
    };
    let executions = stat("stat::number_of_executed_units");
    let elapsed = started.elapsed().as_secs().max(1);
    Ok(Row {
        target: target.to_string(),
        executions,
        exec_per_sec: stat("stat::average_exec_per_sec").or(executions.map(|n| n / elapsed)),
        corpus,
        result,
    })
}

fn print_table(rows: &[Row], secs: u64) {
    let num = |n: Option<u64>| n.map_or_else(|| "?".to_string(), |n| n.to_string());
    println!("\nfuzzing, {secs} s per target:\n");
    println!("| target | executions | exec/s | corpus | result |");
    println!("|---|---:|---:|---:|---|");
    for r in rows {
        let result = match &r.result {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("FAILED: {e}"),
        };
        println!("| {} | {} | {} | {} | {result} |", r.target, num(r.executions), num(r.exec_per_sec), r.corpus);
    }
}
