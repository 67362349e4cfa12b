//! Project tasks: `cargo xtask test | layers | demo | deps | install | man | package | bench | fuzz |
//! test-systemd`.
//!
//! `test` is what CI runs: formatting, clippy with warnings as errors, then every test of the
//! workspace (the kernel and end-to-end suites run for real as root and fail, never skip, when they
//! cannot). `demo` walks through sluice's main job with the real binary.

mod benchproxy;
mod demo;
mod deps;
mod fuzz;
mod install;
mod layers;
mod package;
mod ports;
mod systemd_boot;

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Command;

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  test [--quick]
          every test (as root: the kernel suites, the package and systemd stages
          need it): fmt check, layers, clippy -D warnings, unit, CLI, kernel and end-to-end
          suites, a short run of every fuzz target, then `package --install-check`
          and `test-systemd` on the built package; --quick stops after the suites
  layers  check the crate layering from `cargo metadata`: passport, decide,
          policy, ledger and files use no tokio, hyper, rustls, h2 or aya; no
          library crate depends on the daemon; ARCHITECTURE.md names every crate
  demo    run sluice's main job end to end, printing each step
  bench [decisions [--fleet]|proxy|audit]
          benchmarks (release build); prints a table per benchmark. `decisions
          --fleet` runs each row again with [fleet] leases on a local redis-server
          and prints the difference. `proxy` needs
          root and installs h2load, nginx and mitmproxy (own virtualenv) if missing;
          `audit` exports and verifies a log of 1M records (about 4 GB of scratch
          space under the target dir, removed after)
  fuzz [SECONDS] [TARGET...]
          build the fuzz targets in fuzz/ (cargo-fuzz, installed if missing) and
          run each for SECONDS (default 60), one after another; prints executions,
          exec/s and corpus size per target and fails on a crash, naming the input
  deps    install the Debian packages sluice needs to build and test (as root),
          or print the command to run
  install [--prefix DIR] [--destdir DIR] [--no-build]
          release build, then the binary, systemd units, example config, shipped
          policies and man pages in the standard places (prefix /usr/local; config
          never overwritten)
  man [--out DIR]
          the manual pages, sluice(1) and one per subcommand (default target/man;
          read one with man -l target/man/sluice-run.1)
  package [--no-build] [--install-check]
          target/debian/sluice_<version>_amd64.deb with cargo-deb (installed if
          missing): stripped binary, units, config, policies, man pages, docs.
          --install-check (root): install it, check it, run its daemon, purge it
          and check that nothing is left (pins included)
  test-systemd [--deb FILE | --staged]
          boot a Debian container with a real systemd (as root), install the package
          (built by `package`) in it and check its units: daemon READY, an agent unit
          allowed and refused, the attested log, reload, clean stop (minutes)
";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(args.get(1..).unwrap_or_default()),
        Some("layers") => layers::run(),
        Some("demo") => demo::run(),
        Some("deps") => deps::ensure(),
        Some("install") => install::run(args.get(1..).unwrap_or_default()),
        Some("man") => package::man(args.get(1..).unwrap_or_default()),
        Some("package") => package::run(args.get(1..).unwrap_or_default()),
        Some("test-systemd") => systemd_boot::run(args.get(1..).unwrap_or_default()),
        Some("bench") => bench(args.get(1..).unwrap_or_default()),
        Some("fuzz") => fuzz::run(args.get(1..).unwrap_or_default()),
        Some("-h" | "--help" | "help") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => {
            eprint!("unknown task {other:?}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// Where cargo puts build output.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    // `cargo run` handed xtask its own CARGO_PKG_* and CARGO_MANIFEST_* variables. Build scripts
    // that watch them (ring's does) would otherwise rebuild, with everything above them, at every
    // switch between a plain `cargo build` and one started here.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || matches!(key, "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE")
        {
            c.env_remove(key);
        }
    }
    c
}

/// Runs a command, echoing it, and fails if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("$ {}", display(cmd));
    let status = cmd.status().with_context(|| format!("cannot start {}", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

pub fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Benchmarks run in release mode, one at a time (they share two cores with nothing else).
fn bench(args: &[String]) -> anyhow::Result<()> {
    const ALL: &[&str] = &["decisions", "proxy", "audit"];
    let fleet = args.iter().any(|a| a == "--fleet");
    let rest: Vec<&str> = args.iter().map(String::as_str).filter(|a| *a != "--fleet").collect();
    let which = match rest.as_slice() {
        [] => None,
        [one] => Some(*one),
        more => bail!("bench: unexpected arguments {more:?}"),
    };
    if fleet && which != Some("decisions") {
        bail!("bench: --fleet goes with `decisions` only (cargo xtask bench decisions --fleet)");
    }
    let selected: Vec<&str> = match which {
        None | Some("all") => ALL.to_vec(),
        Some(name) if ALL.contains(&name) => vec![name],
        Some(other) => bail!("unknown benchmark {other:?}; choose one of: {}", ALL.join(", ")),
    };
    for name in selected {
        match name {
            "proxy" => benchproxy::run()?,
            _ => {
                let mut cmd = cargo();
                cmd.args(["bench", "-p", "sluice", "--bench", name]);
                if fleet {
                    deps::ensure()?;
                    cmd.env("SLUICE_BENCH_FLEET", "1");
                }
                run(&mut cmd)?
            }
        }
    }
    Ok(())
}

/// Every test. After the workspace's suites, a smoke run of every fuzz target
/// ([`fuzz::SMOKE_SECS`] each), then the shipped form: the release package is built, installed on
/// this machine and purged (`package --install-check`), then booted under a real systemd in a
/// container (`test-systemd`). `--quick` stops after the suites, for a developer's edit-test
/// loop; CI never passes it.
fn test(args: &[String]) -> anyhow::Result<()> {
    let quick = match args {
        [] => false,
        [flag] if flag == "--quick" => true,
        other => bail!("test: unknown arguments {other:?} (the only option is --quick)"),
    };
    deps::ensure()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    layers::run()?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    // Build every binary first so the end-to-end suites find them.
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    run(cargo().args(["test", "--workspace", "--no-fail-fast"]).env("SLUICE_BIN", target_dir().join("debug/sluice")))?;
    if quick {
        eprintln!("xtask: all suites passed (--quick: the fuzz, package and systemd stages were not run)");
        return Ok(());
    }
    eprintln!("xtask: every fuzz target for {} s", fuzz::SMOKE_SECS);
    fuzz::run_targets(fuzz::SMOKE_SECS, &[])?;
    eprintln!("xtask: the package: build, install on this machine, purge");
    let (deb, man_pages) = package::build(true)?;
    package::install_check(&deb, &man_pages)?;
    eprintln!("xtask: the package under a real systemd");
    systemd_boot::run(&["--deb".to_string(), deb.display().to_string()])?;
    eprintln!("xtask: all checks passed");
    Ok(())
}
