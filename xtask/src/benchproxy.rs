//! `cargo xtask bench proxy`: installs what the proxy benchmark needs when missing (h2load and
//! nginx from Debian; mitmproxy with pip into its own virtualenv under the target dir, so the
//! system's Python packages are left alone), builds the release daemon and runs
//! `tests/benches/proxy.rs` against it. Needs root (the kernel redirect).
//!
//! mitmproxy is optional: if it cannot be installed within a few minutes the benchmark runs
//! without it and says so.

use anyhow::bail;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// (command, Debian package).
const DEBIAN: &[(&str, &str)] = &[("h2load", "nghttp2-client"), ("nginx", "nginx-light")];

/// How long pip may take to install mitmproxy before the benchmark goes on without it.
const PIP_BUDGET: Duration = Duration::from_secs(300);

fn on_path(cmd: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

fn ensure_debian() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN.iter().filter(|(cmd, _)| on_path(cmd).is_none()).map(|(_, p)| *p).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !Path::new("/etc/debian_version").exists() {
        bail!("the proxy benchmark needs {}; install them and run again", missing.join(" "));
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    super::run(Command::new("apt-get").args(["update", "-qq"]))?;
    super::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// `mitmdump` from the benchmark's own virtualenv, installed there if missing; `None` (with a
/// message) when that fails or takes longer than [`PIP_BUDGET`].
fn ensure_mitmproxy() -> Option<PathBuf> {
    let venv = super::target_dir().join("mitmproxy-venv");
    let mitmdump = venv.join("bin/mitmdump");
    if mitmdump.is_file() {
        return Some(mitmdump);
    }
    eprintln!("xtask: installing mitmproxy into {} (at most {} s)", venv.display(), PIP_BUDGET.as_secs());
    let ok = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().map(|s| s.success()).unwrap_or(false);
    if !ok {
        eprintln!("xtask: cannot create a virtualenv (python3 -m venv); benchmarking without mitmproxy");
        return None;
    }
    let child = Command::new(venv.join("bin/pip")).args(["install", "-q", "mitmproxy"]).stdout(Stdio::null()).spawn();
    let Ok(mut child) = child else {
        eprintln!("xtask: cannot run pip; benchmarking without mitmproxy");
        return None;
    };
    let deadline = Instant::now() + PIP_BUDGET;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() && mitmdump.is_file() => return Some(mitmdump),
            Ok(Some(status)) => {
                eprintln!("xtask: pip install mitmproxy failed ({status}); benchmarking without mitmproxy");
                return None;
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(500)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                eprintln!("xtask: pip install mitmproxy took too long; benchmarking without mitmproxy");
                return None;
            }
        }
    }
}

pub fn run() -> anyhow::Result<()> {
    if !super::deps::nix_is_root() {
        bail!("the proxy benchmark needs root (it attaches the kernel redirect): sudo cargo xtask bench proxy");
    }
    super::deps::ensure()?;
    ensure_debian()?;
    let mitmdump = ensure_mitmproxy();
    super::run(super::cargo().args(["build", "--release", "-p", "sluice", "--bin", "sluice"]))?;
    let mut cmd = super::cargo();
    cmd.args(["bench", "-p", "sluice-e2e", "--bench", "proxy"])
        .env("SLUICE_BIN", super::target_dir().join("release/sluice"));
    if let Some(m) = mitmdump {
        cmd.env("SLUICE_BENCH_MITMDUMP", m);
    }
    super::run(&mut cmd)
}
