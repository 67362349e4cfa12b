//! `cargo xtask test-systemd [--deb FILE]`: sluice's systemd units booted under a real systemd.
//!
//! `systemd-analyze verify` only reads the units; this boots them. A Debian bookworm root file
//! system (debootstrap, cached under `target/systemd-root-cache/`) is booted with
//! `systemd-nspawn -b`, sluice is installed in it the way an operator installs it, and then, with
//! the shipped units and `systemctl` only:
//!
//! 1. `sluice.service` starts and becomes active once its eBPF programs are attached (READY),
//!    pinned on the host's bpffs, and its mount namespace has /sys and /proc/sys read-only with
//!    /sys/fs/bpf and /sys/fs/cgroup writable;
//! 2. one `sluice-agent@probe` unit runs an agent script whose allowed fetch is answered by a
//!    plain HTTP server inside the container, and whose forbidden fetches are refused (the name
//!    does not resolve; a direct dial with the forbidden `Host` gets 403 `domain_not_allowed`);
//!    the agent also reports its confinement (uid, capabilities, hidden daemon paths, which
//!    socket families it can create, io_uring refused);
//! 3. `sluice audit export` / `sluice audit verify` show the allow, the refusals and the binding;
//! 4. `systemctl reload sluice` attests a `policy_reload` (trigger `sighup`) without a restart;
//! 5. everything stops cleanly (the pins stay, by design), systemd logged no warning about the
//!    units;
//! 6. with the package: `dpkg --purge sluice` while the daemon runs stops it, detaches the pins
//!    (`sluice detach` in prerm), deletes the state and the package's files and keeps the
//!    operator's passport; then the container powers off.
//!
//! It needs root (eBPF, cgroups, nspawn), installs `systemd-container` and `debootstrap` when
//! missing (`deps.rs`), and fails, never skips, when it cannot run. Each step is printed with its
//! duration; a failing step prints the journal of the units involved.
//!
//! What it leaves on the host, and removes on the way out (failure and Ctrl-C included): the
//! container's cgroups (all under `<cgroup2>/xtask-systemd-boot`, and the same name in the v1
//! `name=systemd` hierarchy of a hybrid host), the daemon's pins (bpffs is the host's, bound into
//! the container; the test's configuration pins under `/sys/fs/bpf/sluice-boottest`), and the
//! run's root: an overlayfs mount whose lower layer is the cached root file system (which is
//! never written) and whose upper layer holds everything the run changed. A run killed before
//! its cleanup (SIGKILL) is cleaned up by the next one, before it touches anything. If the host
//! has no bpffs at /sys/fs/bpf it is mounted there (as systemd does at boot) and left mounted.

use anyhow::{bail, Context};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

const SUITE: &str = "bookworm";
/// Besides debootstrap's minbase: systemd as PID 1 (dbus for logind), what the sluice package
/// depends on (systemd, procps, libelf1: libbpf, linked in statically, needs it), and what the
/// test's agent and upstream run (curl, python3).
const BASE_PACKAGES: &[&str] =
    &["systemd", "systemd-sysv", "dbus", "procps", "ca-certificates", "curl", "python3", "libelf1"];
/// The container's machine name (nspawn's lock and propagation directories use it).
const MACHINE: &str = "sluice-boottest";
/// The cgroup nspawn runs in, below the cgroup2 root (and the v1 `name=systemd` root).
const CGROUP: &str = "xtask-systemd-boot";
/// The daemon's pin directory in the test's configuration: on the host's bpffs.
const PIN_DIR: &str = "/sys/fs/bpf/sluice-boottest";
/// The agent unit's instance name.
const AGENT: &str = "probe";
/// The plain HTTP upstream inside the container (loopback of its private network namespace).
const UPSTREAM_IP: &str = "127.0.0.20";
const UPSTREAM_PORT: u16 = 8080;
const UPSTREAM_UNIT: &str = "boottest-upstream.service";
const ALLOWED: &str = "allowed.test";
const FORBIDDEN: &str = "forbidden.test";
/// The agent's program (written into the container, outside /etc/sluice which agents cannot see).
const AGENT_PROGRAM: &str = "/usr/local/libexec/sluice-boottest/agent";
const AGENT_SCRIPT: &str = r#"#!/bin/sh
# The agent of `cargo xtask test-systemd`: one allowed fetch, two forbidden ones, and what it can
# see of its confinement. Results as key=value lines in $STATE_DIRECTORY/results.
set -u
out="$STATE_DIRECTORY"
rm -f "$out"/*
res="$out/results.new"
fetch() { # NAME CURL-ARGS...
    name=$1; shift
    code=$(curl -sS -m 20 -D "$out/$name.headers" -o "$out/$name.body" -w '%{http_code}' "$@" 2>"$out/$name.err")
    echo "$name.exit=$?" >>"$res"
    echo "$name.http=$code" >>"$res"
    echo "$name.decision=$(tr -d '\r' <"$out/$name.headers" 2>/dev/null | sed -n 's/^sluice-decision: //Ip' | head -n 1)" >>"$res"
    echo "$name.body=$(head -c 200 "$out/$name.body" 2>/dev/null | tr -d '\n')" >>"$res"
    echo "$name.error=$(head -c 200 "$out/$name.err" | tr -d '\n')" >>"$res"
}
fetch allowed http://@ALLOWED@:@PORT@/
fetch forbidden http://@FORBIDDEN@:@PORT@/
fetch direct -H 'Host: @FORBIDDEN@' http://@IP@:@PORT@/
echo "uid=$(id -u)" >>"$res"
echo "capeff=$(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status)" >>"$res"
if ls /etc/sluice >/dev/null 2>&1; then echo "etc_sluice=visible" >>"$res"; else echo "etc_sluice=hidden" >>"$res"; fi
if [ -e /run/sluice/sluice.sock ]; then echo "api_socket=visible" >>"$res"; else echo "api_socket=hidden" >>"$res"; fi
# Socket families and io_uring (IORING_OP_SOCKET would dodge the family filter): ok or errno name.
python3 - >>"$res" <<'PY'
import ctypes, errno, os, socket
def attempt(*args):
    try:
        socket.socket(*args).close()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
for name, args in [("inet", (2, 1)), ("inet6", (10, 2)), ("unix", (1, 1)), ("vsock", (40, 1)), ("packet", (17, 2)),
                   ("netlink_route", (16, 3, 0)), ("netlink_audit", (16, 3, 9))]:
    print("sock.%s=%s" % (name, attempt(*args)))
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.syscall(ctypes.c_long(425), ctypes.c_long(4), ctypes.create_string_buffer(120))
print("io_uring=%s" % ("ok" if fd >= 0 else errno.errorcode.get(ctypes.get_errno())))
PY
cat "$res"
mv "$res" "$out/results"
"#;

const HANG_GUARD: Duration = Duration::from_secs(60);

/// What the test installs into the container. `Payload::choose` is the one place that decides.
#[derive(Debug)]
enum Payload {
    /// The Debian package (`target/debian/sluice_<version>…_amd64.deb`): `dpkg -i` inside the
    /// booted container, so its maintainer scripts run under systemd.
    Deb(PathBuf),
    /// No package: the release build staged with `cargo xtask install --prefix /usr --destdir
    /// ROOT` (the package's layout) before boot, then what the package's postinst does
    /// (`systemd-sysusers sluice.conf`, `systemctl daemon-reload`) inside the booted container.
    Staged,
}

impl Payload {
    /// `--deb FILE` when given; `--staged` for a staged release build (no cargo-deb needed);
    /// else the package `cargo xtask package` builds (`package::build`: the release binary, the
    /// man pages, cargo-deb), so what boots is what an operator installs.
    fn choose(explicit: Option<PathBuf>, staged: bool) -> anyhow::Result<Payload> {
        if let Some(deb) = explicit {
            if !deb.is_file() {
                bail!("--deb {}: no such file", deb.display());
            }
            return Ok(Payload::Deb(deb));
        }
        if staged {
            super::run(super::cargo().args(["build", "--release", "-p", "sluice", "--bin", "sluice"]))?;
            return Ok(Payload::Staged);
        }
        let (deb, _) = super::package::build(true)?;
        Ok(Payload::Deb(deb))
    }
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut deb = None;
    let mut staged = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--deb" => deb = Some(PathBuf::from(it.next().context("--deb needs a file")?)),
            "--staged" => staged = true,
            other => bail!("test-systemd: unknown option {other:?} (use --deb FILE or --staged)"),
        }
    }
    if staged && deb.is_some() {
        bail!("test-systemd: --deb and --staged exclude each other");
    }
    super::demo::catch_interrupts();
    let started = Instant::now();
    let mut t = Test::new();
    let result = t.all(deb, staged);
    let failed = result.is_err();
    t.shutdown_and_clean(failed);
    t.summary(started.elapsed(), failed);
    result
}

/// The container and everything it leaves on the host; `Drop` removes what is left.
struct Test {
    cache: PathBuf,
    /// This run's files: `root` (the container's root, an overlay mount whose lower layer is the
    /// cached root file system, so the cache is never written), `upper` and `work` (overlayfs').
    run_dir: PathBuf,
    root: PathBuf,
    console: PathBuf,
    nspawn: Option<Child>,
    /// The container's PID 1, as seen from the host.
    pid1: Option<u32>,
    /// Our cgroups (cgroup2, and the v1 `name=systemd` one on a hybrid host).
    cgroups: Vec<PathBuf>,
    timings: Vec<(String, Duration)>,
    /// Exports of the attested log so far (each to its own file).
    exports: u32,
    cleaned: bool,
}

impl Drop for Test {
    fn drop(&mut self) {
        self.shutdown_and_clean(true);
    }
}

impl Test {
    fn new() -> Test {
        let cache = super::target_dir().join("systemd-root-cache");
        Test {
            run_dir: cache.join("run"),
            root: cache.join("run/root"),
            console: cache.join("console.log"),
            cache,
            nspawn: None,
            pid1: None,
            cgroups: Vec::new(),
            timings: Vec::new(),
            exports: 0,
            cleaned: false,
        }
    }

    /// Runs one step, printing its name and duration; on failure prints what the container's
    /// journal says about it.
    fn step<T>(&mut self, name: &str, f: impl FnOnce(&mut Test) -> anyhow::Result<T>) -> anyhow::Result<T> {
        super::demo::interrupted()?;
        println!("\n== {name}");
        let start = Instant::now();
        let result = f(self);
        let took = start.elapsed();
        self.timings.push((name.to_string(), took));
        match result {
            Ok(v) => {
                println!("-- ok ({:.1} s)", took.as_secs_f64());
                Ok(v)
            }
            Err(e) => {
                println!("-- FAILED after {:.1} s: {e:#}", took.as_secs_f64());
                self.diagnose();
                Err(e.context(format!("test-systemd: step \"{name}\" failed")))
            }
        }
    }

    fn all(&mut self, deb: Option<PathBuf>, staged: bool) -> anyhow::Result<()> {
        let payload = self.step("host: root, packages, cgroup2 and bpffs", |t| {
            host_ready()?;
            t.remove_run_dir()?;
            Ok(deb)
        })?;
        let payload = self.step("sluice: the package, or a release build to stage", |_| {
            let p = Payload::choose(payload, staged)?;
            match &p {
                Payload::Deb(deb) => println!("installing the package {}", deb.display()),
                Payload::Staged => {
                    println!("staging a release build, laid out as the package (cargo xtask install --prefix /usr)")
                }
            }
            Ok(p)
        })?;
        self.step(&format!("root file system: Debian {SUITE} (cached in target/systemd-root-cache)"), |t| t.rootfs())?;
        self.step("this run's root: an overlay on the cached one, with sluice (or its package) in it", |t| {
            t.overlay(&payload)
        })?;
        self.step("boot: systemd-nspawn -b, until systemctl is-system-running", |t| t.boot())?;
        self.step("install in the booted system", |t| t.install(&payload))?;
        let nonce = self.step("configure: issuer, passport, sluice.toml, agent, upstream", |t| t.configure())?;
        self.step("systemctl start sluice.service (active once READY)", |t| t.start_daemon())?;
        self.step(&format!("systemctl start sluice-agent@{AGENT}: allowed, refused, confined"), |t| {
            t.run_agent(&nonce)
        })?;
        self.step("sluice audit export / verify: the allow, the refusals, the binding", |t| t.audit())?;
        self.step("systemctl reload sluice: an attested policy_reload", |t| t.reload())?;
        self.step("systemctl stop: the agent and the daemon", |t| t.stop_units())?;
        if matches!(payload, Payload::Deb(_)) {
            self.step("dpkg --purge sluice, the daemon running: stopped, pins detached, state gone", |t| t.purge())?;
        }
        self.step("systemctl poweroff: the container exits", |t| t.poweroff())?;
        Ok(())
    }

    // ---- steps ----

    fn rootfs(&mut self) -> anyhow::Result<()> {
        let base = self.base();
        let stamp = base.join(".sluice-rootfs");
        let want = format!("suite={SUITE}\nvariant=minbase\ninclude={}\n", BASE_PACKAGES.join(","));
        if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
            println!("cached: {}", base.display());
            return Ok(());
        }
        if base.exists() {
            println!("{} is incomplete or for another package list: making it again", base.display());
            std::fs::remove_dir_all(&base).with_context(|| format!("removing {}", base.display()))?;
        }
        std::fs::create_dir_all(&self.cache)?;
        let mirror = debian_mirror();
        let partial = self.cache.join(format!("{SUITE}.partial"));
        if partial.exists() {
            std::fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
        }
        let log = self.cache.join("debootstrap.log");
        println!("debootstrap {SUITE} from {mirror} (log: {})", log.display());
        let out = bounded(
            Command::new("debootstrap")
                .arg("--variant=minbase")
                .arg(format!("--include={}", BASE_PACKAGES.join(",")))
                .arg(SUITE)
                .arg(&partial)
                .arg(&mirror),
            Duration::from_secs(1200),
            true,
        )?;
        std::fs::write(&log, [out.stdout.as_slice(), out.stderr.as_slice()].concat())?;
        if !out.status.success() {
            bail!("debootstrap failed ({}); the end of {}:\n{}", out.status, log.display(), tail(&out.stdout, 15));
        }
        std::fs::write(partial.join(".sluice-rootfs"), want)?;
        std::fs::rename(&partial, &base)?;
        Ok(())
    }

    fn base(&self) -> PathBuf {
        self.cache.join(SUITE)
    }

    /// Unmounts this run's root (left mounted by a run killed before its cleanup, too) and
    /// removes the run's files. Never while the container runs: its root is in there.
    fn remove_run_dir(&mut self) -> anyhow::Result<()> {
        if self.nspawn.is_some() {
            bail!("not removing {}: the container still runs", self.run_dir.display());
        }
        let root = self.root.to_string_lossy().into_owned();
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_mount_point(&root) {
            let out = Command::new("umount").arg(&root).output().context("cannot run umount")?;
            if !out.status.success() && Instant::now() > deadline {
                // Busy past the deadline: detach it; it goes once nothing uses it.
                super::run(Command::new("umount").arg("--lazy").arg(&root))?;
                break;
            }
            if !out.status.success() {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        remove_tree(&self.run_dir)
    }

    /// Mounts this run's root: the cached root file system under a fresh writable layer.
    fn overlay(&mut self, payload: &Payload) -> anyhow::Result<()> {
        self.remove_run_dir()?;
        let (upper, work) = (self.run_dir.join("upper"), self.run_dir.join("work"));
        for d in [&upper, &work, &self.root] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let opts =
            format!("lowerdir={},upperdir={},workdir={}", self.base().display(), upper.display(), work.display());
        if self.cache.to_string_lossy().contains([',', ':']) {
            bail!("{}: overlayfs options cannot name a path with ',' or ':'", self.cache.display());
        }
        super::run(Command::new("mount").args(["-t", "overlay", "overlay", "-o", &opts]).arg(&self.root))?;
        match payload {
            Payload::Deb(deb) => {
                let dest = self.root.join("var/cache/sluice-boottest/sluice.deb");
                std::fs::create_dir_all(dest.parent().unwrap_or(&self.root))?;
                std::fs::copy(deb, &dest).with_context(|| format!("copying {}", deb.display()))?;
            }
            Payload::Staged => {
                let destdir = self.root.to_string_lossy().into_owned();
                let args = ["--prefix", "/usr", "--destdir", &destdir, "--no-build"].map(str::to_string);
                super::install::run(&args)?;
            }
        }
        Ok(())
    }

    fn boot(&mut self) -> anyhow::Result<()> {
        let (cg2, v1) = cgroup_roots()?;
        let mut procs = Vec::new();
        for root in std::iter::once(cg2).chain(v1) {
            let dir = root.join(CGROUP);
            std::fs::create_dir(&dir).with_context(|| format!("creating the cgroup {}", dir.display()))?;
            procs.push(dir.join("cgroup.procs"));
            self.cgroups.push(dir);
        }
        let console = std::fs::File::create(&self.console)?;
        // nspawn starts in our cgroup (so everything it creates is below it, and removed with it),
        // without machined (--register=no) or the host's systemd (--keep-unit). The bind gives the
        // container the host's bpffs (pins must outlive the daemon); the capability and syscall
        // flags let the daemon load eBPF (nspawn's defaults drop CAP_BPF and filter bpf(2)). A
        // private network namespace: the container's loopback, its ports, nothing of the host's.
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"set -e; for f in "$1" "$2"; do [ -z "$f" ] || echo $$ > "$f"; done; shift 2; exec "$@""#)
            .arg("sh")
            .arg(&procs[0])
            .arg(procs.get(1).map(PathBuf::as_path).unwrap_or(Path::new("")))
            .arg("systemd-nspawn")
            .args(["--register=no", "--keep-unit", "--bind=/sys/fs/bpf", "--capability=all"])
            .args(["--system-call-filter=bpf perf_event_open", "--private-network", "--console=read-only"])
            .arg(format!("--machine={MACHINE}"))
            .arg("--directory")
            .arg(&self.root)
            .arg("--boot")
            .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .env("TERM", "dumb")
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console);
        println!("$ {} (console: {})", super::display(&cmd), self.console.display());
        self.nspawn = Some(cmd.spawn().context("cannot start systemd-nspawn")?);
        let deadline = Instant::now() + Duration::from_secs(120);
        let pid1 = loop {
            self.nspawn_alive()?;
            if let Some(p) = self.find_pid1() {
                break p;
            }
            wait_until(deadline, "the container's systemd to start")?;
        };
        self.pid1 = Some(pid1);
        println!("the container's systemd is pid {pid1} on the host");
        let state = loop {
            self.nspawn_alive()?;
            let out = self.exec(&["systemctl", "is-system-running"], Duration::from_secs(15));
            let state = out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
            if state == "running" || state == "degraded" {
                break state;
            }
            wait_until(deadline, &format!("systemctl is-system-running (last: {state:?})"))?;
        };
        println!("systemctl is-system-running: {state}");
        if state == "degraded" {
            let failed = self.check(&["systemctl", "--failed", "--no-legend", "--plain", "--no-pager"])?;
            println!("failed units at boot (unrelated to sluice, which is not started yet):\n{failed}");
        }
        Ok(())
    }

    fn install(&mut self, payload: &Payload) -> anyhow::Result<()> {
        match payload {
            Payload::Deb(_) => {
                let out =
                    self.check_long(&["dpkg", "-i", "/var/cache/sluice-boottest/sluice.deb"], HANG_GUARD * 2).context(
                        "the container has no network: a dependency dpkg names as missing must be added to \
                         BASE_PACKAGES in xtask/src/systemd_boot.rs (the root file system is then made again)",
                    )?;
                println!("{out}");
                let status = self.check(&["dpkg-query", "-W", "-f=${Status} ${Version}", "sluice"])?;
                if !status.starts_with("install ok installed") {
                    bail!("dpkg-query says sluice is {status:?} after dpkg -i");
                }
                println!("dpkg: sluice {status}");
                // The package starts nothing: an enforcer must not run on a configuration nobody wrote
                // (and here it would pin outside the test's pin_dir).
                let active = self.exec(&["systemctl", "is-active", "sluice.service"], Duration::from_secs(15))?;
                let state = String::from_utf8_lossy(&active.stdout).trim().to_string();
                if state != "inactive" {
                    bail!("sluice.service is {state:?} right after dpkg -i: the package must not start it");
                }
            }
            Payload::Staged => {
                self.check(&["systemd-sysusers", "sluice.conf"])?;
                self.check(&["systemctl", "daemon-reload"])?;
            }
        }
        println!("{}", self.check(&["sluice", "--version"])?);
        self.check(&["getent", "group", "sluice"]).context("the `sluice` group (sysusers) is missing")?;
        for unit in ["sluice.service", "sluice-agents.slice", &format!("sluice-agent@{AGENT}.service")] {
            let state = self.check(&["systemctl", "show", "-p", "LoadState", "--value", unit])?;
            if state != "loaded" {
                bail!("{unit}: LoadState={state}, expected loaded");
            }
        }
        Ok(())
    }

    /// Writes the configuration and the agent, makes the issuer and the passport with the
    /// installed binary, starts the upstream; returns the upstream's page (a per-run nonce).
    fn configure(&mut self) -> anyhow::Result<String> {
        let nonce = format!("sluice-boottest-{}-{}", std::process::id(), now_nanos());
        let write = |path: &str, text: &str, mode: u32| -> anyhow::Result<()> {
            use std::os::unix::fs::PermissionsExt;
            let p = self.root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap_or(&self.root))?;
            std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
            Ok(())
        };
        self.check(&["sluice", "issuer", "init", "--dir", "/etc/sluice/issuer", "--name", "systemd boot test"])?;
        write(
            "/etc/sluice/sluice.toml",
            &format!(
                "# Written by cargo xtask test-systemd.\n\
                 state_dir = \"/var/lib/sluice\"\n\n\
                 [dns]\n\
                 # Both names resolve for the daemon: only the passport refuses the forbidden one.\n\
                 static_hosts = {{ \"{ALLOWED}\" = \"{UPSTREAM_IP}\", \"{FORBIDDEN}\" = \"{UPSTREAM_IP}\" }}\n\n\
                 [sandbox]\n\
                 pin_dir = \"{PIN_DIR}\"\n\n\
                 [trust]\n\
                 issuers = [\"/etc/sluice/issuer/issuer.pub\"]\n"
            ),
            0o644,
        )?;
        self.check(&["sluice", "daemon", "--check-config"])?;
        let passport = format!("/etc/sluice/agents/{AGENT}.jwt");
        let id = self.check(&[
            "sluice",
            "passport",
            "issue",
            "--issuer-key",
            "/etc/sluice/issuer/issuer.key",
            "--agent-id",
            "boottest-probe",
            "--agent-name",
            "systemd boot test probe",
            "--permission",
            "web:fetch",
            "--constraint",
            &format!("core:scope:domain_allowlist={ALLOWED}"),
            "--expires-in",
            "1d",
            "--out",
            &passport,
        ])?;
        self.check(&["chmod", "600", &passport])?;
        println!("passport {id}: web:fetch on {ALLOWED} only");
        write(&format!("/etc/sluice/agents/{AGENT}.env"), &format!("SLUICE_AGENT_COMMAND={AGENT_PROGRAM}\n"), 0o600)?;
        let script = AGENT_SCRIPT
            .replace("@ALLOWED@", ALLOWED)
            .replace("@FORBIDDEN@", FORBIDDEN)
            .replace("@IP@", UPSTREAM_IP)
            .replace("@PORT@", &UPSTREAM_PORT.to_string());
        write(AGENT_PROGRAM, &script, 0o755)?;
        write("/srv/sluice-boottest/index.html", &nonce, 0o644)?;
        let port = UPSTREAM_PORT.to_string();
        self.check(&[
            "systemd-run",
            &format!("--unit={UPSTREAM_UNIT}"),
            "-p",
            "DynamicUser=yes",
            "python3",
            "-m",
            "http.server",
            "--bind",
            UPSTREAM_IP,
            "--directory",
            "/srv/sluice-boottest",
            &port,
        ])?;
        // Readiness on another path, so the upstream's log of `GET /` counts the agent's only.
        let ready = format!("http://{UPSTREAM_IP}:{UPSTREAM_PORT}/ready");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.exec(&["curl", "-s", "-o", "/dev/null", &ready], Duration::from_secs(10))?.status.success() {
            wait_until(deadline, &format!("the upstream {UPSTREAM_UNIT} to answer"))?;
        }
        println!("upstream {UPSTREAM_UNIT} answers on {UPSTREAM_IP}:{UPSTREAM_PORT}");
        Ok(nonce)
    }

    fn start_daemon(&mut self) -> anyhow::Result<()> {
        self.check_long(&["systemctl", "start", "sluice.service"], HANG_GUARD * 2)?;
        let props = self.props("sluice.service", &["ActiveState", "SubState", "StatusText", "MainPID"])?;
        println!("sluice.service: {props:?}");
        if props["ActiveState"] != "active" || props["SubState"] != "running" {
            bail!("sluice.service is {}/{} after systemctl start", props["ActiveState"], props["SubState"]);
        }
        // Sandboxes' own directories: the tmpfs the unit mounts, as the daemon and the rest of
        // the system see it (it must be nosymfollow in both).
        for pid in [props["MainPID"].as_str(), "1"] {
            let mounts = self.check(&["cat", &format!("/proc/{pid}/mountinfo")])?;
            let line = mounts.lines().find(|l| l.split(' ').nth(4) == Some("/run/sluice-sandboxes"));
            println!("/run/sluice-sandboxes as pid {pid} sees it: {}", line.unwrap_or("not a mount point"));
        }
        if props["StatusText"] != "enforcing" {
            bail!("sluice.service's status text is {:?}, expected \"enforcing\"", props["StatusText"]);
        }
        // The unit's file system protection as the daemon sees it: kernel tunables read-only,
        // the two trees it writes (bpffs for pins, cgroupfs for sandboxes) writable.
        let mounts = self.check(&["cat", &format!("/proc/{}/mountinfo", props["MainPID"])])?;
        let mut wrong = Vec::new();
        for (path, want) in [("/sys", "ro"), ("/proc/sys", "ro"), ("/sys/fs/bpf", "rw"), ("/sys/fs/cgroup", "rw")] {
            let got = mount_access(&mounts, path).unwrap_or("not a mount point");
            println!("the daemon sees {path}: {got}");
            if got != want {
                wrong.push(format!("{path} is {got}, expected {want}"));
            }
        }
        if !wrong.is_empty() {
            bail!("sluice.service's mount namespace: {}", wrong.join("; "));
        }
        // The pins are on the host's bpffs: the daemon's programs outlive it, as designed.
        let links = Path::new(PIN_DIR).join("links");
        if !links.is_dir() {
            bail!("{} does not exist on the host: the daemon did not pin on the host's bpffs", links.display());
        }
        println!("pinned on the host's bpffs: {}", links.display());
        Ok(())
    }

    fn run_agent(&mut self, nonce: &str) -> anyhow::Result<()> {
        let unit = format!("sluice-agent@{AGENT}.service");
        self.check_long(&["systemctl", "start", &unit], HANG_GUARD)?;
        let deadline = Instant::now() + HANG_GUARD;
        let props = loop {
            let p = self.props(&unit, &["ActiveState", "Result", "ExecMainStatus", "NRestarts"])?;
            if p["ActiveState"] == "inactive" || p["ActiveState"] == "failed" {
                break p;
            }
            wait_until(deadline, &format!("{unit} to finish (state {})", p["ActiveState"]))?;
        };
        println!("{unit}: {props:?}");
        if props["Result"] != "success" || props["ExecMainStatus"] != "0" || props["NRestarts"] != "0" {
            bail!("{unit} did not run once and succeed: {props:?}");
        }
        let text = self.check(&["cat", &format!("/var/lib/sluice-agents/{AGENT}/results")])?;
        println!("the agent's results:\n{text}");
        let r: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let get = |k: &str| r.get(k).copied().unwrap_or("(missing)");
        let mut problems = Vec::new();
        let mut expect = |ok: bool, what: String| {
            if !ok {
                problems.push(what);
            }
        };
        expect(
            get("allowed.exit") == "0" && get("allowed.http") == "200",
            format!(
                "the allowed fetch of http://{ALLOWED}:{UPSTREAM_PORT}/ got exit {} HTTP {} ({})",
                get("allowed.exit"),
                get("allowed.http"),
                get("allowed.error")
            ),
        );
        expect(
            get("allowed.body") == nonce,
            format!("the allowed fetch's body is {:?}, not the upstream's page", get("allowed.body")),
        );
        expect(
            get("allowed.decision").starts_with("allow;"),
            format!("the allowed answer's Sluice-Decision is {:?}", get("allowed.decision")),
        );
        // curl exit 6: could not resolve the host (the agents' resolver answers NXDOMAIN).
        expect(
            get("forbidden.exit") == "6",
            format!(
                "{FORBIDDEN} was not refused at resolution: exit {} HTTP {} ({})",
                get("forbidden.exit"),
                get("forbidden.http"),
                get("forbidden.error")
            ),
        );
        expect(
            get("direct.http") == "403" && get("direct.decision").starts_with("block; reason=domain_not_allowed;"),
            format!(
                "the direct dial with Host: {FORBIDDEN} got HTTP {} decision {:?}",
                get("direct.http"),
                get("direct.decision")
            ),
        );
        expect(get("uid") != "0" && get("uid") != "(missing)", format!("the agent ran as uid {}", get("uid")));
        expect(get("capeff") == "0000000000000000", format!("the agent had capabilities {}", get("capeff")));
        expect(get("etc_sluice") == "hidden", "the agent could list /etc/sluice".to_string());
        expect(get("api_socket") == "hidden", "the agent could see /run/sluice/sluice.sock".to_string());
        // The unit's RestrictAddressFamilies= and SystemCallFilter=: inet and Unix sockets only.
        for (k, want) in [
            ("sock.inet", "ok"),
            ("sock.inet6", "ok"),
            ("sock.unix", "ok"),
            ("sock.vsock", "EAFNOSUPPORT"),
            ("sock.packet", "EAFNOSUPPORT"),
            ("sock.netlink_route", "EAFNOSUPPORT"),
            ("sock.netlink_audit", "EAFNOSUPPORT"),
            ("io_uring", "EPERM"),
        ] {
            expect(get(k) == want, format!("{k} in the agent unit: {} (expected {want})", get(k)));
        }
        // Only the allowed request reached the upstream (python's http.server logs each request).
        let log = self.check(&["journalctl", "-u", UPSTREAM_UNIT, "-o", "cat", "--no-pager"])?;
        let served = log.lines().filter(|l| l.contains("\"GET / HTTP/")).count();
        expect(
            served == 1,
            format!("the upstream served GET / {served} times, expected once (the allowed fetch):\n{log}"),
        );
        if !problems.is_empty() {
            bail!("sluice-agent@{AGENT} was not answered as sluice promises:\n  {}", problems.join("\n  "));
        }
        println!(
            "allowed: 200 from the upstream; {FORBIDDEN}: NXDOMAIN, and 403 domain_not_allowed when dialed directly"
        );
        Ok(())
    }

    /// Exports the log in the container, verifies it there, and returns its records.
    fn export(&mut self) -> anyhow::Result<Vec<Value>> {
        self.exports += 1;
        // `audit export` never overwrites a file: one per export.
        let file = format!("/root/sluice-boottest-log-{}.json", self.exports);
        let file = file.as_str();
        self.check(&["sluice", "audit", "export", "--out", file])?;
        let verdict = self.check(&["sluice", "audit", "verify", file, "--host-pub", "/var/lib/sluice/host.pub"])?;
        println!("{}", verdict.lines().last().unwrap_or(""));
        let path = self.root.join(file.trim_start_matches('/'));
        let bundle: Value =
            serde_json::from_slice(&std::fs::read(&path)?).with_context(|| path.display().to_string())?;
        let records = bundle["records"].as_array().with_context(|| format!("{}: no \"records\"", path.display()))?;
        Ok(records
            .iter()
            .map(|e| e["record"].as_str().and_then(|s| serde_json::from_str(s).ok()).unwrap_or(Value::Null))
            .collect())
    }

    fn audit(&mut self) -> anyhow::Result<()> {
        let records = self.export()?;
        for r in &records {
            let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
            println!(
                "  {:>3} {:<20} {:<6} {:<20} {}",
                r["log_index"],
                s("kind"),
                s("decision"),
                s("reason"),
                [s("host"), s("name"), s("sandbox_id")].join(" ").trim()
            );
        }
        let has = |f: &dyn Fn(&Value) -> bool| records.iter().any(f);
        let mut missing = Vec::new();
        let mut want = |ok: bool, what: &str| {
            if !ok {
                missing.push(what.to_string());
            }
        };
        want(
            has(&|r| r["kind"] == "decision" && r["decision"] == "allow" && r["host"] == ALLOWED),
            "a decision allow for the allowed host",
        );
        want(has(&|r| r["kind"] == "dns_denied" && r["name"] == FORBIDDEN), "a dns_denied for the forbidden name");
        want(
            has(&|r| {
                r["kind"] == "decision"
                    && r["decision"] == "block"
                    && r["reason"] == "domain_not_allowed"
                    && r["host"] == FORBIDDEN
            }),
            "a decision block domain_not_allowed for the forbidden host",
        );
        want(has(&|r| r["kind"] == "sandbox_created"), "sandbox_created (the unit's binding)");
        want(has(&|r| r["kind"] == "sandbox_removed"), "sandbox_removed (the unit's unbinding when it stopped)");
        if !missing.is_empty() {
            bail!("the attested log lacks: {}", missing.join("; "));
        }
        Ok(())
    }

    fn reload(&mut self) -> anyhow::Result<()> {
        let sighup = |records: &[Value]| {
            records.iter().filter(|r| r["kind"] == "policy_reload" && r["trigger"] == "sighup").count()
        };
        let before = sighup(&self.export()?);
        let pid = self.props("sluice.service", &["MainPID"])?["MainPID"].clone();
        self.check_long(&["systemctl", "reload", "sluice.service"], HANG_GUARD)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let records = loop {
            let records = self.export()?;
            if sighup(&records) > before {
                break records;
            }
            wait_until(deadline, "a policy_reload record with trigger sighup")?;
        };
        let last = records.iter().rev().find(|r| r["kind"] == "policy_reload").cloned().unwrap_or(Value::Null);
        println!("policy_reload: {last}");
        if last["ok"] != true {
            bail!("the reload was attested as failed: {last}");
        }
        let after = self.props("sluice.service", &["ActiveState", "MainPID"])?;
        if after["ActiveState"] != "active" || after["MainPID"] != pid {
            bail!("sluice.service after reload: {after:?} (main pid before: {pid}); a reload must not restart it");
        }
        Ok(())
    }

    fn stop_units(&mut self) -> anyhow::Result<()> {
        let agent = format!("sluice-agent@{AGENT}.service");
        self.check_long(&["systemctl", "stop", &agent, "sluice.service"], HANG_GUARD)?;
        for unit in [agent.as_str(), "sluice.service"] {
            let p = self.props(unit, &["ActiveState", "Result"])?;
            if p["ActiveState"] != "inactive" || p["Result"] != "success" {
                bail!("{unit} after systemctl stop: {p:?}");
            }
        }
        // Stopping leaves the programs pinned (agents are refused, never let out): by design.
        if !Path::new(PIN_DIR).join("links").is_dir() {
            bail!("{PIN_DIR}/links vanished when the daemon stopped: agents would go out unredirected");
        }
        let failed = self.check(&["systemctl", "--failed", "--no-legend", "--plain", "--no-pager"])?;
        if failed.contains("sluice") {
            bail!("failed sluice units:\n{failed}");
        }
        // systemd's own complaints about the units while loading and running them (unknown keys,
        // bad values, missing paths): none is acceptable.
        let warnings = self.check(&["journalctl", "-b", "_PID=1", "-p", "warning", "-o", "cat", "--no-pager"])?;
        let ours: Vec<&str> = warnings.lines().filter(|l| l.contains("sluice")).collect();
        if !ours.is_empty() {
            bail!("systemd warned about sluice's units:\n  {}", ours.join("\n  "));
        }
        println!("both inactive; the pins stay on bpffs until removed; no systemd warning about the units");
        Ok(())
    }

    /// The package's removal under a real systemd, with the enforcer running again: prerm stops
    /// it (and any agent unit) and runs `sluice detach`, which removes the pins; purge deletes
    /// the state and the package's files and leaves what the operator made in /etc/sluice.
    fn purge(&mut self) -> anyhow::Result<()> {
        self.check_long(&["systemctl", "start", "sluice.service"], HANG_GUARD)?;
        let out = self.check_long(&["sh", "-c", "dpkg --purge sluice 2>&1"], HANG_GUARD * 2)?;
        println!("{out}");
        if !out.contains(&format!("removed {PIN_DIR}/links/sl_connect4  (link")) {
            bail!("the removal did not say it detached {PIN_DIR}/links/sl_connect4");
        }
        if Path::new(PIN_DIR).exists() {
            bail!("{PIN_DIR} is still pinned after dpkg --purge");
        }
        let state = self.check(&["systemctl", "show", "-p", "ActiveState", "--value", "sluice.service"])?;
        if state != "inactive" {
            bail!("sluice.service is {state:?} after dpkg --purge");
        }
        for gone in
            ["/usr/bin/sluice", "/usr/lib/systemd/system/sluice.service", "/etc/sluice/sluice.toml", "/var/lib/sluice"]
        {
            if self.exec(&["test", "-e", gone], Duration::from_secs(10))?.status.success() {
                bail!("{gone} is still there after dpkg --purge");
            }
        }
        if !self
            .exec(&["test", "-e", &format!("/etc/sluice/agents/{AGENT}.jwt")], Duration::from_secs(10))?
            .status
            .success()
        {
            bail!("dpkg --purge deleted the operator's passport /etc/sluice/agents/{AGENT}.jwt");
        }
        println!("the daemon stopped, every pin detached, state and package files gone, the operator's passport kept");
        Ok(())
    }

    fn poweroff(&mut self) -> anyhow::Result<()> {
        // The connection may drop as systemd goes down: the exit status says nothing.
        let _ = self.exec(&["systemctl", "poweroff"], Duration::from_secs(20));
        let status = self.wait_nspawn(HANG_GUARD)?.context("the container did not power off within 60 s")?;
        if !status.success() {
            bail!("systemd-nspawn exited with {status} after poweroff");
        }
        println!("systemd-nspawn exited: {status}");
        Ok(())
    }

    // ---- the container ----

    fn nspawn_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.nspawn.as_mut() {
            if let Some(status) = child.try_wait()? {
                self.nspawn = None;
                bail!(
                    "systemd-nspawn exited ({status}); the end of {}:\n{}",
                    self.console.display(),
                    tail(&std::fs::read(&self.console).unwrap_or_default(), 30)
                );
            }
        }
        Ok(())
    }

    /// nspawn's child whose command is systemd.
    fn find_pid1(&self) -> Option<u32> {
        let nspawn = self.nspawn.as_ref()?.id();
        let children = std::fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children")).ok()?;
        children
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .find(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "systemd"))
    }

    /// A command inside the container (all its namespaces), bounded in time.
    fn exec(&self, argv: &[&str], timeout: Duration) -> anyhow::Result<Output> {
        let pid = self.pid1.context("the container is not running")?;
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(pid.to_string())
            .arg("-a")
            .arg("--")
            .args(argv)
            .env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C.UTF-8")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("SYSTEMD_COLORS", "0")
            .env("SYSTEMD_PAGER", "");
        bounded(&mut cmd, timeout, true)
    }

    /// Like `exec`, failing with the command's output if it fails; returns its trimmed stdout.
    fn check(&self, argv: &[&str]) -> anyhow::Result<String> {
        self.check_long(argv, Duration::from_secs(30))
    }

    fn check_long(&self, argv: &[&str], timeout: Duration) -> anyhow::Result<String> {
        println!("# {}", argv.join(" "));
        let out = self.exec(argv, timeout)?;
        if !out.status.success() {
            bail!(
                "`{}` in the container failed ({}):\n{}{}",
                argv.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn props(&self, unit: &str, names: &[&str]) -> anyhow::Result<BTreeMap<String, String>> {
        let out = self.check(&["systemctl", "show", unit, "-p", &names.join(",")])?;
        let mut map: BTreeMap<String, String> = names.iter().map(|n| (n.to_string(), String::new())).collect();
        for line in out.lines() {
            if let Some((k, v)) = line.split_once('=') {
                map.insert(k.to_string(), v.to_string());
            }
        }
        Ok(map)
    }

    /// After a failed step: the failed units and the journal of the units the test uses.
    fn diagnose(&self) {
        if super::demo::interrupted().is_err() {
            return;
        }
        if self.pid1.is_none() || self.nspawn.is_none() {
            if self.console.exists() {
                let text = std::fs::read(&self.console).unwrap_or_default();
                println!("--- the end of the container's console ({}):\n{}", self.console.display(), tail(&text, 30));
            }
            return;
        }
        let show = |argv: &[&str]| match self.exec(argv, Duration::from_secs(20)) {
            Ok(o) => format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
            Err(e) => format!("({e:#})"),
        };
        let failed = show(&["systemctl", "--failed", "--no-legend", "--plain", "--no-pager"]);
        println!("--- failed units in the container:\n{}", if failed.trim().is_empty() { "(none)" } else { &failed });
        let mut units: Vec<String> =
            failed.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect();
        for u in ["sluice.service", &format!("sluice-agent@{AGENT}.service"), UPSTREAM_UNIT] {
            if !units.iter().any(|x| x == u) {
                units.push(u.to_string());
            }
        }
        for u in units {
            let journal = show(&["journalctl", "-u", &u, "-n", "25", "--no-pager", "-o", "short-precise"]);
            println!("--- journalctl -u {u} (last 25 lines):\n{}", journal.trim_end());
        }
    }

    /// Waits for nspawn to exit; `None` if it is still running after `timeout`.
    fn wait_nspawn(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let Some(child) = self.nspawn.as_mut() else { return Ok(None) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                self.nspawn = None;
                self.pid1 = None;
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Powers the container off if it still runs (killing it after a timeout), then removes the
    /// pins, our cgroups and this run's root. Runs once; every part is tried even if one fails.
    fn shutdown_and_clean(&mut self, verbose: bool) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        let started = Instant::now();
        if verbose {
            println!("\n== cleanup: the container, cgroups, pins, this run's root");
        }
        let mut notes = Vec::new();
        if self.nspawn.is_some() {
            if let Some(pid) = self.pid1 {
                // Not `exec`: it gives up at once after Ctrl-C, and this must still run.
                let _ = bounded(
                    Command::new("nsenter").args(["-t", &pid.to_string(), "-a", "--", "systemctl", "poweroff"]),
                    Duration::from_secs(20),
                    false,
                );
            }
            if !matches!(self.wait_nspawn(Duration::from_secs(45)), Ok(Some(_))) {
                notes.push("the container did not power off: killed".to_string());
                if let Some(child) = self.nspawn.as_mut() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                self.nspawn = None;
                self.pid1 = None;
            }
        }
        // Whatever is still in our cgroups (a container whose nspawn was killed) is killed.
        for cg in &self.cgroups {
            if let Err(e) = remove_cgroup(cg) {
                notes.push(format!("{e:#}"));
            }
        }
        // Removing the pins detaches the programs (nothing else holds them once the daemon is gone).
        if let Err(e) = remove_tree(Path::new(PIN_DIR)) {
            notes.push(format!("{e:#}"));
        }
        if let Err(e) = self.remove_run_dir() {
            notes.push(format!("{e:#}"));
        }
        let took = started.elapsed();
        if !verbose && !notes.is_empty() {
            println!("\n== cleanup");
        }
        for n in &notes {
            println!("   {n}");
        }
        if verbose || !notes.is_empty() {
            println!("-- {} ({:.1} s)", if notes.is_empty() { "ok" } else { "INCOMPLETE" }, took.as_secs_f64());
        }
        self.timings.push(("cleanup: the container, cgroups, pins, this run's root".to_string(), took));
    }

    fn summary(&self, total: Duration, failed: bool) {
        println!("\n== test-systemd {} in {:.1} s", if failed { "FAILED" } else { "passed" }, total.as_secs_f64());
        for (name, took) in &self.timings {
            println!("  {:>7.1} s  {name}", took.as_secs_f64());
        }
    }
}

// ---- host ----

fn host_ready() -> anyhow::Result<()> {
    if !super::deps::nix_is_root() {
        bail!("test-systemd needs root (systemd-nspawn, eBPF, cgroups): run it as root");
    }
    super::deps::ensure()?;
    for tool in ["systemd-nspawn", "debootstrap", "nsenter", "cp"] {
        if !on_path(tool) {
            bail!("{tool} is missing after `cargo xtask deps`");
        }
    }
    let (cg2, v1) = cgroup_roots()?;
    println!(
        "cgroup2 at {}{}",
        cg2.display(),
        v1.as_ref().map(|p| format!(", name=systemd at {}", p.display())).unwrap_or_default()
    );
    if !cg2.join("cgroup.procs").exists() {
        bail!("{}: not a cgroup2 mount (no cgroup.procs)", cg2.display());
    }
    if !is_bpffs("/sys/fs/bpf") {
        println!("/sys/fs/bpf is not bpffs: mounting it (as systemd does at boot)");
        super::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    // A run killed before its cleanup (SIGKILL) leaves its container running in our cgroup, and
    // its pins: both go before anything else is touched.
    for root in std::iter::once(cg2).chain(v1) {
        let dir = root.join(CGROUP);
        if dir.exists() {
            println!("removing {} (and what runs in it), left by an earlier run", dir.display());
            remove_cgroup(&dir)?;
        }
    }
    if Path::new(PIN_DIR).exists() {
        println!("removing {PIN_DIR}, left by an earlier run");
        remove_tree(Path::new(PIN_DIR))?;
    }
    Ok(())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
}

fn mountinfo() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()
}

/// "ro" or "rw": the access of the topmost mount at `path` in a mountinfo text.
fn mount_access<'a>(mountinfo: &'a str, path: &str) -> Option<&'a str> {
    mountinfo
        .lines()
        .rfind(|l| l.split_whitespace().nth(4) == Some(path))
        .and_then(|l| l.split_whitespace().nth(5))
        .and_then(|opts| opts.split(',').find(|o| *o == "ro" || *o == "rw"))
}

fn is_mount_point(path: &str) -> bool {
    mountinfo().lines().any(|l| l.split_whitespace().nth(4) == Some(path))
}

fn is_bpffs(path: &str) -> bool {
    mountinfo().lines().any(|l| {
        let mut f = l.split_whitespace();
        f.nth(4) == Some(path) && l.split(" - ").nth(1).is_some_and(|t| t.starts_with("bpf "))
    })
}

/// The cgroup2 mount and, on a hybrid host, the v1 `name=systemd` mount (nspawn uses both).
fn cgroup_roots() -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    let info = mountinfo();
    let mount_of = |pred: &dyn Fn(&str) -> bool| {
        info.lines()
            .find(|l| l.split(" - ").nth(1).is_some_and(pred))
            .and_then(|l| l.split_whitespace().nth(4))
            .map(PathBuf::from)
    };
    let cg2 = mount_of(&|t| t.starts_with("cgroup2 ")).context("no cgroup2 mount on this host")?;
    let v1 = mount_of(&|t| t.starts_with("cgroup ") && t.split(',').any(|o| o == "name=systemd"));
    Ok((cg2, v1))
}

/// Kills what is in a cgroup tree (`cgroup.kill` where the kernel has it, else each process of
/// each `cgroup.procs`) and removes it, deepest first.
fn remove_cgroup(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let mut dirs = Vec::new();
    collect_dirs(dir, &mut dirs);
    let kill = dir.join("cgroup.kill");
    if !(kill.exists() && std::fs::write(&kill, "1").is_ok()) {
        for d in &dirs {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.split_whitespace().filter_map(|p| p.parse::<libc::pid_t>().ok()).filter(|p| *p > 1) {
                // SAFETY: kill(2) on a pid read from our own cgroup; no memory is involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    let deadline = Instant::now() + Duration::from_secs(10);
    for d in dirs {
        while let Err(e) = std::fs::remove_dir(&d) {
            if e.kind() == std::io::ErrorKind::NotFound {
                break;
            }
            if Instant::now() > deadline {
                return Err(e).with_context(|| format!("removing the cgroup {}", d.display()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

fn remove_tree(p: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", p.display()))
        }
        _ => Ok(()),
    }
}

/// The host's Debian mirror (the `URIs:` of a deb822 source, or a `deb` line of sources.list),
/// else deb.debian.org.
fn debian_mirror() -> String {
    let from_deb822 = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").ok().and_then(|text| {
        text.split("\n\n")
            .filter(|stanza| !stanza.contains("-security"))
            .find_map(|stanza| stanza.lines().find_map(|l| l.strip_prefix("URIs:")))
            .and_then(|uris| uris.split_whitespace().next().map(str::to_string))
    });
    let from_list = || {
        std::fs::read_to_string("/etc/apt/sources.list").ok().and_then(|text| {
            text.lines().map(str::trim).filter(|l| l.starts_with("deb ") && !l.contains("security")).find_map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .find(|w| w.starts_with("http://") || w.starts_with("https://"))
                    .map(str::to_string)
            })
        })
    };
    from_deb822.or_else(from_list).unwrap_or_else(|| "http://deb.debian.org/debian".to_string())
}

// ---- small helpers ----

/// Runs a command with its output captured, killing it after `timeout`.
/// `interruptible`: give up at once after Ctrl-C / SIGTERM (cleanup commands are not).
fn bounded(cmd: &mut Command, timeout: Duration, interruptible: bool) -> anyhow::Result<Output> {
    let what = super::display(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = reader(child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let err = reader(child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let interrupted = if interruptible { super::demo::interrupted() } else { Ok(()) };
        if Instant::now() > deadline || interrupted.is_err() {
            let _ = child.kill();
            let _ = child.wait();
            interrupted?;
            // The readers are left behind: a grandchild may still hold the pipes.
            bail!("`{what}` did not finish within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok(Output { status, stdout, stderr })
}

fn wait_until(deadline: Instant, what: &str) -> anyhow::Result<()> {
    super::demo::interrupted()?;
    if Instant::now() > deadline {
        bail!("timed out waiting for {what}");
    }
    std::thread::sleep(Duration::from_millis(250));
    Ok(())
}

fn tail(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn now_nanos() -> u128 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_access_of_the_topmost_mount() {
        let info = "\
30 29 0:26 / /sys ro,nosuid,nodev,noexec,relatime - tmpfs tmpfs ro
31 30 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw
32 31 0:40 / /sys/fs/bpf ro,relatime - bpf bpf rw
33 30 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup rw
";
        assert_eq!(mount_access(info, "/sys"), Some("ro"));
        assert_eq!(mount_access(info, "/sys/fs/bpf"), Some("ro"), "a read-only mount stacked on top wins");
        assert_eq!(mount_access(info, "/sys/fs/cgroup"), Some("rw"));
        assert_eq!(mount_access(info, "/proc/sys"), None);
    }
}
