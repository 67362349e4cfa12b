//! `cargo xtask man [--out DIR]` and `cargo xtask package [--no-build] [--install-check]`.
//!
//! `man` writes `sluice.1` and one page per subcommand (`sluice-passport-issue.1`, …), rendered
//! by `sluice::cli::man` through the `sluice-man` example (xtask itself must build before clang
//! and libbpf are installed, so it cannot link the sluice crate).
//!
//! `package` builds the release binary, writes the pages gzipped into `<target>/release/man`,
//! and runs cargo-deb (installed with `cargo install cargo-deb --locked` if missing) with
//! `--strip`: the release profile keeps debug info (`debug = 1`) for profiling, which a package
//! does not ship. It then checks what the .deb holds and prints its figures.
//!
//! `--install-check` (root, Debian; what CI runs) installs the .deb with dpkg, checks the
//! binary, that every program a unit executes comes from a package the .deb depends on (or an
//! Essential one), `systemd-analyze verify` on the installed units, the man pages through
//! `man`, then runs the installed daemon on a configuration of its own so there is real pinned
//! eBPF state, installs the package again (an upgrade must keep the pins), purges it and checks
//! that the pins, the state and every file are gone. On failure everything it made is removed
//! all the same.

use crate::ports::free_port;
use anyhow::{bail, ensure, Context};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Pages are written with this name prefix; anything else in the output directory is left alone.
const PAGE_PREFIX: &str = "sluice";

fn output(cmd: &mut Command) -> anyhow::Result<Output> {
    cmd.output().with_context(|| format!("cannot start {}", super::display(cmd)))
}

fn stdout_of(cmd: &mut Command) -> anyhow::Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!("`{}` failed ({}): {}", super::display(cmd), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes every page into `out` (stale `sluice*.1` pages of removed commands are deleted first);
/// returns their paths in the order `sluice::cli::man::pages` gives them.
pub fn generate(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for entry in fs::read_dir(out)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(PAGE_PREFIX) && (name.ends_with(".1") || name.ends_with(".1.gz")) {
            fs::remove_file(entry.path())?;
        }
    }
    // The dev profile: its library build is the one `cargo test` already made (examples share
    // the test build's features); the pages do not depend on the profile.
    let listed =
        stdout_of(super::cargo().args(["run", "-q", "-p", "sluice", "--example", "sluice-man", "--"]).arg(out))?;
    let pages: Vec<PathBuf> = listed.lines().map(PathBuf::from).collect();
    ensure!(!pages.is_empty(), "the sluice-man example wrote no page");
    for p in &pages {
        ensure!(p.is_file(), "the sluice-man example listed {} but it is missing", p.display());
    }
    Ok(pages)
}

/// `gzip -9n` (no name or time stamp: the same page gives the same bytes) of each page, beside
/// it; returns the `.gz` paths.
pub fn gzip(pages: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in pages {
        let gz = PathBuf::from(format!("{}.gz", p.display()));
        let file = fs::File::create(&gz).with_context(|| format!("creating {}", gz.display()))?;
        let status = Command::new("gzip")
            .args(["-9n", "-c"])
            .arg(p)
            .stdout(file)
            .status()
            .context("cannot run gzip (Debian package gzip)")?;
        ensure!(status.success(), "gzip {} failed ({status})", p.display());
        out.push(gz);
    }
    Ok(out)
}

/// `cargo xtask man [--out DIR]`.
pub fn man(args: &[String]) -> anyhow::Result<()> {
    let mut out = super::target_dir().join("man");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = PathBuf::from(it.next().context("--out needs a directory")?),
            other => bail!("man: unknown option {other:?} (use --out DIR)"),
        }
    }
    let pages = generate(&out)?;
    eprintln!(
        "xtask: {} manual pages in {} (read one with: man -l {})",
        pages.len(),
        out.display(),
        pages[0].display()
    );
    Ok(())
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Options {
    build: bool,
    install_check: bool,
}

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options { build: true, install_check: false };
    for a in args {
        match a.as_str() {
            "--no-build" => o.build = false,
            "--install-check" => o.install_check = true,
            other => bail!("package: unknown option {other:?} (use --no-build, --install-check)"),
        }
    }
    Ok(o)
}

fn ensure_cargo_deb() -> anyhow::Result<()> {
    let ok = super::cargo().args(["deb", "--version"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    if ok.is_ok_and(|s| s.success()) {
        return Ok(());
    }
    eprintln!("xtask: cargo-deb is missing; installing it from crates.io");
    super::run(super::cargo().args(["install", "cargo-deb", "--locked"]))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// `cargo xtask package`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let o = parse(args)?;
    let (deb, man_pages) = build(o.build)?;
    println!("{}", deb.display());
    if o.install_check {
        install_check(&deb, &man_pages)?;
    }
    Ok(())
}

/// Builds the package (the release binary first, unless `build_binary` is false) and checks what
/// it holds; returns its path and the names of its man pages. `cargo xtask test-systemd` installs
/// what this makes.
pub fn build(build_binary: bool) -> anyhow::Result<(PathBuf, Vec<String>)> {
    super::deps::ensure_tools(&[
        ("gzip", "gzip"),
        ("strip", "binutils"),
        ("readelf", "binutils"),
        ("dpkg-deb", "dpkg"),
    ])?;
    ensure_cargo_deb()?;
    let target = super::target_dir();
    if build_binary {
        super::run(super::cargo().args(["build", "--release", "-p", "sluice", "--bin", "sluice"]))?;
    }
    let binary = target.join("release/sluice");
    ensure!(binary.is_file(), "{} is missing: run without --no-build", binary.display());
    let pages = generate(&target.join("release/man"))?;
    let gz = gzip(&pages)?;
    for p in &pages {
        fs::remove_file(p)?;
    }
    let listed = stdout_of(super::cargo().args(["deb", "-p", "sluice", "--no-build", "--strip"]))?;
    let deb = listed
        .lines()
        .rev()
        .map(|l| PathBuf::from(l.trim()))
        .find(|p| p.extension().is_some_and(|e| e == "deb") && p.is_file())
        .with_context(|| format!("cargo deb did not name the package it wrote:\n{listed}"))?;

    let names: Vec<String> =
        gz.iter().filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).collect();
    let figures = check_contents(&deb, &binary, &names)?;
    eprintln!("xtask: {figures}");
    Ok((deb, names))
}

/// What the package must hold, checked in `dpkg-deb -c`; the shipped binary must carry no debug
/// sections. Returns the figures line.
fn check_contents(deb: &Path, binary: &Path, man_pages: &[String]) -> anyhow::Result<String> {
    let listing = stdout_of(Command::new("dpkg-deb").arg("-c").arg(deb))?;
    let mut files: Vec<(String, u64)> = Vec::new();
    for line in listing.lines() {
        // -rwxr-xr-x root/root  12345 2026-01-01 00:00 ./usr/bin/sluice
        let cols: Vec<&str> = line.split_whitespace().collect();
        if let (Some(size), Some(path)) = (cols.get(2), cols.get(5)) {
            files.push((path.trim_start_matches('.').to_owned(), size.parse().unwrap_or(0)));
        }
    }
    let has = |p: &str| files.iter().any(|(f, _)| f == p);
    let mut want: Vec<String> = [
        "/usr/bin/sluice",
        "/usr/lib/systemd/system/sluice.service",
        "/usr/lib/systemd/system/sluice-agents.slice",
        "/usr/lib/systemd/system/sluice-agent@.service",
        "/usr/lib/systemd/system/sluice-gate@.service",
        "/usr/lib/sysusers.d/sluice.conf",
        "/etc/sluice/sluice.toml",
        "/etc/sluice/policies/openai.toml",
        "/etc/sluice/policies/anthropic.toml",
        "/usr/share/doc/sluice/README.md",
        "/usr/share/doc/sluice/systemd.md",
        "/usr/share/doc/sluice/docs/README.md",
        "/usr/share/doc/sluice/docs/cli.md",
        "/usr/share/doc/sluice/docs/records.md",
        "/usr/share/doc/sluice/sluice.toml.example",
        "/usr/share/doc/sluice/gate.toml.example",
        "/usr/share/doc/sluice/docs/gate.md",
        "/usr/share/doc/sluice/copyright",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    want.extend(man_pages.iter().map(|n| format!("/usr/share/man/man1/{n}")));
    let missing: Vec<&String> = want.iter().filter(|w| !has(w)).collect();
    ensure!(missing.is_empty(), "{} lacks {missing:?}; it holds:\n{listing}", deb.display());

    // The binary as shipped: no debug sections.
    let dir = std::env::temp_dir().join(format!("xtask-deb-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    super::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&dir))?;
    let shipped = dir.join("usr/bin/sluice");
    let sections = stdout_of(Command::new("readelf").args(["-S", "--wide"]).arg(&shipped));
    let shipped_size = fs::metadata(&shipped).map(|m| m.len()).unwrap_or(0);
    let _ = fs::remove_dir_all(&dir);
    let sections = sections?;
    ensure!(
        !sections.contains(".debug_info") && !sections.contains(".symtab"),
        "/usr/bin/sluice in {} is not stripped (cargo deb --strip): its sections:\n{sections}",
        deb.display()
    );
    let built = fs::metadata(binary).map(|m| m.len()).unwrap_or(0);
    let deb_size = fs::metadata(deb).map(|m| m.len()).unwrap_or(0);
    Ok(format!(
        "{}: {} files, {} man pages; /usr/bin/sluice {} stripped (target/release/sluice {} with debug info); .deb {}",
        deb.display(),
        files.iter().filter(|(f, _)| !f.ends_with('/')).count(),
        man_pages.len(),
        mib(shipped_size),
        mib(built),
        mib(deb_size)
    ))
}

// ---- --install-check ----

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", "sluice"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "installed")
        .unwrap_or(false)
}

/// Undoes the install check's changes on the way out, on failure too.
struct Cleanup {
    daemon: Option<Child>,
    pin_dir: PathBuf,
    cgroup: Option<PathBuf>,
    /// The daemon's `[sandbox] unix_dir`, on which it mounts a tmpfs.
    unix_dir: PathBuf,
    purge: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        if self.purge && installed() {
            eprintln!("xtask: cleanup: dpkg --purge sluice");
            let _ = Command::new("dpkg").args(["--purge", "sluice"]).status();
        }
        if self.pin_dir.exists() {
            eprintln!("xtask: cleanup: removing {}", self.pin_dir.display());
            let _ = fs::remove_dir_all(&self.pin_dir);
        }
        if let Some(cg) = &self.cgroup {
            let _ = fs::remove_dir(cg);
        }
        if let Ok(c) = std::ffi::CString::new(self.unix_dir.as_os_str().as_encoded_bytes()) {
            // SAFETY: c is a NUL-terminated path; umount2 only reads it.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = fs::remove_dir(&self.unix_dir);
    }
}

fn step(what: &str) {
    eprintln!("\nxtask: == {what}");
}

pub fn install_check(deb: &Path, man_pages: &[String]) -> anyhow::Result<()> {
    ensure!(super::deps::nix_is_root(), "--install-check installs the package: run it as root");
    ensure!(Path::new("/etc/debian_version").exists(), "--install-check needs Debian (dpkg)");
    super::deps::ensure_tools(&[("man", "man-db"), ("systemd-analyze", "systemd")])?;
    ensure!(!installed(), "the sluice package is already installed here; --install-check installs and purges it: remove it first (dpkg --purge sluice)");
    ensure!(
        !Path::new("/etc/sluice").exists(),
        "/etc/sluice exists (an earlier cargo xtask install?); --install-check would take it over and purge it: move it away first"
    );
    // Minimised images tell dpkg to drop man pages; the man checks would then fail for that.
    let mut dpkg_cfg: Vec<PathBuf> = vec![PathBuf::from("/etc/dpkg/dpkg.cfg")];
    if let Ok(rd) = fs::read_dir("/etc/dpkg/dpkg.cfg.d") {
        dpkg_cfg.extend(rd.flatten().map(|e| e.path()));
    }
    for cfg in dpkg_cfg {
        let text = fs::read_to_string(&cfg).unwrap_or_default();
        if let Some(line) =
            text.lines().find(|l| l.trim_start().starts_with("path-exclude") && l.contains("/usr/share/man"))
        {
            bail!(
                "{}: `{line}` makes dpkg skip man pages, so the install check cannot check them: comment it out",
                cfg.display()
            );
        }
    }
    let tag = format!("sluice-pkgcheck-{}", std::process::id());
    let pin_dir = PathBuf::from("/sys/fs/bpf").join(&tag);
    let unix_dir = std::env::temp_dir().join(format!("{tag}-own"));
    let mut cleanup = Cleanup { daemon: None, pin_dir: pin_dir.clone(), cgroup: None, unix_dir, purge: true };

    step(&format!("dpkg -i {}", deb.display()));
    let status = Command::new("dpkg").arg("-i").arg(deb).status().context("cannot run dpkg")?;
    if !status.success() {
        eprintln!("xtask: dpkg -i failed ({status}); installing the missing dependencies with apt-get install -f");
        super::run(
            Command::new("apt-get").args(["install", "-f", "-y", "-qq"]).env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    ensure!(installed(), "the sluice package is not installed after dpkg -i");

    step("/usr/bin/sluice --version");
    let version = stdout_of(Command::new("/usr/bin/sluice").arg("--version"))?;
    eprint!("{version}");
    ensure!(version.starts_with("sluice "), "unexpected version output: {version:?}");

    step("every program the units execute comes from a package sluice depends on");
    for line in check_exec_dependencies()? {
        eprintln!("  {line}");
    }

    step("systemd-analyze verify on the installed units");
    let out = output(Command::new("systemd-analyze").args([
        "verify",
        "--man=no",
        "sluice.service",
        "sluice-agents.slice",
        "sluice-agent@ci-test.service",
        "sluice-gate@ci-test.service",
    ]))?;
    let complaints: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .filter(|l| l.contains("sluice"))
        .map(str::to_owned)
        .collect();
    ensure!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify ({}):\n{}",
        out.status,
        complaints.join("\n")
    );
    eprintln!("  no complaints");

    step("man pages");
    for name in man_pages {
        let page = name.trim_end_matches(".1.gz");
        let found = stdout_of(Command::new("man").args(["-w", page]))?;
        ensure!(found.trim() == format!("/usr/share/man/man1/{name}"), "man -w {page} found {found:?}");
    }
    let text =
        stdout_of(Command::new("man").args(["-l", "/usr/share/man/man1/sluice-run.1.gz"]).env("MANWIDTH", "100"))?;
    ensure!(text.contains("sluice-run") && text.contains("--passport"), "man -l sluice-run.1.gz rendered:\n{text}");
    eprintln!("  man -w finds all {} pages; man sluice-run renders", man_pages.len());

    step("the installed daemon pins its eBPF programs (on a configuration of this check's own)");
    let (proxy, dns) = (free_port()?, free_port()?);
    fs::write(
        "/etc/sluice/sluice.toml",
        format!(
            "# written by cargo xtask package --install-check\nstate_dir = \"/var/lib/sluice\"\n\
             [api]\nsocket = \"/run/sluice/{tag}.sock\"\n[proxy]\nport = {proxy}\n[dns]\nport = {dns}\n\
             [sandbox]\ncgroup = \"{tag}\"\npin_dir = \"{}\"\nunix_dir = \"{}\"\n",
            pin_dir.display(),
            cleanup.unix_dir.display()
        ),
    )?;
    let log = std::env::temp_dir().join(format!("{tag}.log"));
    let child = Command::new("/usr/bin/sluice")
        .args(["--config", "/etc/sluice/sluice.toml", "daemon"])
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?)
        .spawn()
        .context("starting /usr/bin/sluice daemon")?;
    cleanup.daemon = Some(child);
    let socket = format!("/run/sluice/{tag}.sock");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = Command::new("/usr/bin/sluice").args(["--socket", &socket, "holds"]).output();
        if up.is_ok_and(|o| o.status.success()) {
            break;
        }
        if let Some(Ok(Some(status))) = cleanup.daemon.as_mut().map(Child::try_wait) {
            bail!("the installed daemon exited ({status}):\n{}", fs::read_to_string(&log).unwrap_or_default());
        }
        ensure!(
            Instant::now() < deadline,
            "the installed daemon is not ready after 60 s:\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let cgroup = fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .find_map(|l| {
            let (_, rest) = l.split_once(" - ")?;
            rest.starts_with("cgroup2 ").then(|| PathBuf::from(l.split_whitespace().nth(4).unwrap_or("")))
        })
        .map(|m| m.join(&tag));
    cleanup.cgroup = cgroup;
    let links: Vec<_> = fs::read_dir(pin_dir.join("links"))?.flatten().map(|e| e.path()).collect();
    ensure!(!links.is_empty(), "no links pinned in {}", pin_dir.display());
    // SIGTERM: a clean stop, which leaves the programs pinned (fail closed).
    if let Some(mut d) = cleanup.daemon.take() {
        let pid = i32::try_from(d.id()).context("daemon pid")?;
        // SAFETY: kill(2) on our own child, which has not been waited for yet.
        ensure!(
            unsafe { libc::kill(pid, libc::SIGTERM) } == 0,
            "kill -TERM {pid}: {}",
            std::io::Error::last_os_error()
        );
        let status = d.wait()?;
        ensure!(status.success(), "the daemon exited with {status} on SIGTERM");
    }
    for l in &links {
        ensure!(l.exists(), "{} vanished when the daemon stopped: pins must outlive it", l.display());
    }
    eprintln!("  {} links pinned in {}, still there after the daemon stopped", links.len(), pin_dir.display());

    step("dpkg -i again (an upgrade): the pinned programs stay for the next daemon to take over");
    let out = output(Command::new("sh").arg("-c").arg("dpkg -i \"$0\" 2>&1").arg(deb))?;
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
    ensure!(out.status.success(), "dpkg -i over the installed package failed ({})", out.status);
    for l in &links {
        ensure!(l.exists(), "{} was removed by an upgrade: agents would be unredirected", l.display());
    }
    eprintln!("  all {} links still pinned", links.len());

    step("dpkg --purge sluice");
    let out = output(Command::new("sh").arg("-c").arg("dpkg --purge sluice 2>&1"))?;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    eprint!("{said}");
    ensure!(out.status.success(), "dpkg --purge sluice failed ({})", out.status);
    ensure!(!installed(), "sluice is still installed after the purge");
    for l in &links {
        ensure!(
            said.contains(&format!("removed {}  (link", l.display())),
            "the removal did not say it removed {}",
            l.display()
        );
    }
    ensure!(!pin_dir.exists(), "{} is still pinned after the purge", pin_dir.display());
    let left: Vec<&str> = [
        "/usr/bin/sluice",
        "/usr/lib/systemd/system/sluice.service",
        "/usr/lib/systemd/system/sluice-agent@.service",
        "/usr/lib/systemd/system/sluice-gate@.service",
        "/usr/lib/systemd/system/sluice-agents.slice",
        "/usr/lib/sysusers.d/sluice.conf",
        "/usr/share/man/man1/sluice.1.gz",
        "/usr/share/man/man1/sluice-run.1.gz",
        "/usr/share/doc/sluice",
        "/etc/sluice",
        "/var/lib/sluice",
    ]
    .into_iter()
    .filter(|p| Path::new(p).exists())
    .collect();
    ensure!(left.is_empty(), "left behind by the purge: {left:?}");
    cleanup.purge = false;
    let _ = fs::remove_file(&log);
    eprintln!("\nxtask: install check passed: installed, verified, pins detached on removal, purge left nothing");
    Ok(())
}

/// The programs a unit executes: (`Exec…` key, absolute path), prefixes (`-@:+!`) removed.
/// A relative program is an error (systemd would search a path we do not check).
fn exec_programs(unit: &str, text: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.trim().split_once('=') else { continue };
        let key = key.trim();
        if !key.starts_with("Exec") {
            continue;
        }
        let program =
            value.trim().trim_start_matches(['-', '@', ':', '+', '!', '|']).split_whitespace().next().unwrap_or("");
        ensure!(program.starts_with('/'), "{unit}: {key}={value}: the program must be an absolute path");
        out.push((key.to_owned(), program.to_owned()));
    }
    Ok(out)
}

/// Why a program from package `owner` may be run by sluice's units, or `None` when the package
/// is not guaranteed to be installed with sluice.
fn allowed_because(owner: &str, depends: &[String], essential: bool) -> Option<&'static str> {
    if owner == "sluice" {
        Some("this package")
    } else if depends.iter().any(|d| d == owner) {
        Some("in Depends")
    } else if essential {
        Some("Essential")
    } else {
        None
    }
}

/// The package names of a `Depends` field (alternatives and versions dropped).
fn depends_names(field: &str) -> Vec<String> {
    field
        .split([',', '|'])
        .filter_map(|d| d.split_whitespace().next())
        .map(|d| d.split(':').next().unwrap_or(d).to_owned())
        .collect()
}

/// Every `Exec*=` program of the installed units: where it comes from. Fails when one is missing,
/// or comes from a package that is neither sluice, Essential, nor in sluice's Depends.
fn check_exec_dependencies() -> anyhow::Result<Vec<String>> {
    let depends = depends_names(&stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Depends}", "sluice"]))?);
    let mut report = Vec::new();
    for unit in ["sluice.service", "sluice-agents.slice", "sluice-agent@.service", "sluice-gate@.service"] {
        let path = Path::new("/usr/lib/systemd/system").join(unit);
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        for (key, program) in exec_programs(unit, &text)? {
            ensure!(Path::new(&program).is_file(), "{unit}: {key} runs {program}, which does not exist here");
            let owner =
                owner_of(&program).with_context(|| format!("{unit}: {key} runs {program}, which no package owns"))?;
            let essential =
                stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Essential}", &owner]))?.trim() == "yes";
            let Some(why) = allowed_because(&owner, &depends, essential) else {
                bail!(
                    "{unit}: {key} runs {program} from the package {owner}, which sluice does not depend on: add it to \
                     depends in daemon/Cargo.toml"
                );
            };
            report.push(format!("{unit}: {key} {program} <- {owner} ({why})"));
        }
    }
    Ok(report)
}

/// The package that owns `path`, trying the merged-/usr aliases (`/usr/bin/kill` is registered
/// as `/bin/kill` on Debian 12).
fn owner_of(path: &str) -> Option<String> {
    let mut candidates = vec![path.to_owned()];
    for (usr, root) in [("/usr/bin/", "/bin/"), ("/usr/sbin/", "/sbin/")] {
        if let Some(rest) = path.strip_prefix(usr) {
            candidates.push(format!("{root}{rest}"));
        } else if let Some(rest) = path.strip_prefix(root) {
            candidates.push(format!("{usr}{rest}"));
        }
    }
    candidates.into_iter().find_map(|c| {
        let out = Command::new("dpkg-query").args(["-S", &c]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        // "procps: /bin/kill" (diversions print other lines first).
        text.lines()
            .filter(|l| !l.starts_with("diversion"))
            .find_map(|l| l.split_once(": ").map(|(p, _)| p.split(':').next().unwrap_or(p).trim().to_owned()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_parsed_strictly() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(parse(&s(&[])).unwrap(), Options { build: true, install_check: false });
        assert_eq!(
            parse(&s(&["--no-build", "--install-check"])).unwrap(),
            Options { build: false, install_check: true }
        );
        assert!(parse(&s(&["--install"])).is_err());
    }

    #[test]
    fn exec_lines_are_read_with_their_prefixes_stripped() {
        let unit = "[Service]\nExecStartPre=+/usr/bin/sluice sandbox bind\nExecStart=/usr/bin/env -- $X\n\
                    ExecStopPost=-+/usr/bin/sluice sandbox unbind\nExecReload=/usr/bin/kill -HUP $MAINPID\n\
                    Environment=ExecStart=/not/a/key\n# ExecStart=/commented\n";
        let got = exec_programs("u", unit).unwrap();
        let programs: Vec<&str> = got.iter().map(|(_, p)| p.as_str()).collect();
        assert_eq!(programs, ["/usr/bin/sluice", "/usr/bin/env", "/usr/bin/sluice", "/usr/bin/kill"]);
        let err = exec_programs("u", "ExecReload=kill -HUP $MAINPID\n").unwrap_err().to_string();
        assert!(err.contains("absolute path"), "{err}");
    }

    #[test]
    fn a_program_from_a_package_outside_depends_is_refused() {
        let depends = depends_names("libc6 (>= 2.34), procps, systemd (>= 250) | systemd-standalone:amd64");
        assert_eq!(depends, ["libc6", "procps", "systemd", "systemd-standalone"]);
        assert_eq!(allowed_because("procps", &depends, false), Some("in Depends"));
        assert_eq!(allowed_because("coreutils", &depends, true), Some("Essential"));
        assert_eq!(allowed_because("sluice", &depends, false), Some("this package"));
        // What the first package lacked: /usr/bin/kill's package was not in Depends.
        assert_eq!(allowed_because("procps", &depends_names("libc6, systemd"), false), None);
    }

    #[test]
    fn the_owner_of_a_merged_usr_path_is_found() {
        // On Debian 12 dpkg knows /bin/kill, not /usr/bin/kill; both must resolve the same.
        if Path::new("/usr/bin/kill").exists() && Path::new("/var/lib/dpkg/status").exists() {
            assert_eq!(owner_of("/usr/bin/kill").as_deref(), Some("procps"));
            assert_eq!(owner_of("/usr/bin/env").as_deref(), Some("coreutils"));
        }
        assert_eq!(owner_of("/nonexistent/xtask-test"), None);
    }
}
