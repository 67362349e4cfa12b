//! The Debian packages sluice needs to build (clang and libbpf headers for the eBPF objects, and
//! libbpf's static library with libelf and zlib, which load the Unix socket filter) and to
//! test (curl, python3, iproute2, liburing for the bypass suites; git, node and `script` for the
//! programs run inside a sandbox; openssl and Python's cryptography for the key-format tests;
//! Chromium for the console's browser test; redis-server for the fleet tests).
//! The C compiler (`cc`) also builds aws-lc, rustls's crypto provider in the daemon: aws-lc-sys
//! compiles it with the `cc` crate and ships pre-generated bindings for x86_64 and aarch64 Linux,
//! so no cmake, nasm, Go or libclang is needed there.
//! Installed with apt-get when running as root on Debian; otherwise the exact command is printed
//! and the task fails.

use anyhow::bail;
use std::path::Path;
use std::process::Command;

/// (what must exist, the package that provides it). A path starting with '/' is a file, anything
/// else a command on PATH.
const NEEDS: &[(&str, &str)] = &[
    ("clang", "clang"),
    ("/usr/include/bpf/bpf_helpers.h", "libbpf-dev"),
    ("/usr/include/libelf.h", "libelf-dev"),
    ("/usr/include/zlib.h", "zlib1g-dev"),
    ("/usr/include/liburing.h", "liburing-dev"),
    ("cc", "gcc"),
    // libFuzzer, which `cargo xtask fuzz` (and so `cargo xtask test`) links, is C++.
    ("c++", "g++"),
    ("curl", "curl"),
    ("python3", "python3"),
    ("/usr/bin/python3", "python3"),
    ("ip", "iproute2"),
    ("unshare", "util-linux"),
    // tests/tests/kernel_unix.rs runs an agent as another user.
    ("setpriv", "util-linux"),
    // tests/tests/run_confine.rs: ordinary programs inside a `sluice run` sandbox (git, node, and
    // `script` for a shell with job control on a pseudo-terminal).
    ("git", "git"),
    ("node", "nodejs"),
    ("script", "bsdutils"),
    // `systemd-analyze verify` checks the shipped units (daemon/tests/ops.rs).
    ("systemd-analyze", "systemd"),
    // tests/tests/console_browser.rs drives the web console in headless Chromium.
    ("/usr/bin/chromium", "chromium"),
    // `kill` (the demo stops what it started with it).
    ("/usr/bin/kill", "procps"),
    // daemon/tests/keys_interop.rs: other tools read the keys sluice writes, and the reverse.
    ("openssl", "openssl"),
    // `cargo xtask test-systemd` boots a Debian root file system under a real systemd.
    ("systemd-nspawn", "systemd-container"),
    ("debootstrap", "debootstrap"),
    ("nsenter", "util-linux"),
    // The fleet tests (tests/src/redis.rs) start their own redis-server on a loopback port; the
    // package's system service is never started by sluice or its tests.
    ("redis-server", "redis-server"),
];

/// (Python module, the package that provides it): present when `import MODULE` succeeds in
/// [`PYTHON`], the interpreter the tests run.
const PYTHON_MODULES: &[(&str, &str)] = &[("cryptography", "python3-cryptography")];

fn present(what: &str) -> bool {
    if what.starts_with('/') {
        return Path::new(what).exists();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(what).is_file()))
        .unwrap_or(false)
}

/// Debian's interpreter, which Debian's `python3-*` packages serve (a `python3` earlier on PATH,
/// pyenv's say, would not see them); daemon/tests/keys_interop.rs uses the same one.
pub const PYTHON: &str = "/usr/bin/python3";

fn python_module_present(module: &str) -> bool {
    Command::new(PYTHON)
        .args(["-c", &format!("import {module}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn missing(needs: &[(&str, &'static str)], modules: &[(&str, &'static str)]) -> Vec<&'static str> {
    let mut pkgs: Vec<&str> = needs.iter().filter(|(what, _)| !present(what)).map(|(_, pkg)| *pkg).collect();
    pkgs.extend(modules.iter().filter(|(module, _)| !python_module_present(module)).map(|(_, pkg)| *pkg));
    pkgs.dedup();
    pkgs
}

/// The build and test packages.
pub fn ensure() -> anyhow::Result<()> {
    install(NEEDS, PYTHON_MODULES)
}

/// `needs` as in [`NEEDS`] (the packaging tools, say): installs what is missing (root on Debian)
/// or says what to run.
pub fn ensure_tools(needs: &[(&str, &'static str)]) -> anyhow::Result<()> {
    install(needs, &[])
}

fn install(needs: &[(&str, &'static str)], modules: &[(&str, &'static str)]) -> anyhow::Result<()> {
    let pkgs = missing(needs, modules);
    if pkgs.is_empty() {
        return Ok(());
    }
    let is_root = nix_is_root();
    let is_debian = Path::new("/etc/debian_version").exists();
    let cmd = format!("apt-get update && apt-get install -y {}", pkgs.join(" "));
    if !(is_root && is_debian) {
        bail!("missing build or test packages; run as root:\n    {cmd}");
    }
    eprintln!("xtask: installing {}", pkgs.join(" "));
    super::run(Command::new("apt-get").arg("update").arg("-qq"))?;
    super::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still = missing(needs, modules);
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(" "));
    }
    Ok(())
}

pub fn nix_is_root() -> bool {
    // SAFETY-free: read the effective uid from /proc rather than pulling in libc for one call.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
