//! `cargo xtask demo`: sluice's whole job, step by step, with the real binaries in a temporary
//! directory.
//!
//! Without root: the passport steps (issuer, issue, inspect, verify, tamper). As root, then: a
//! mock LLM API over HTTPS on loopback (`sluice-mock-llm`, which answers with real `usage`), the
//! daemon with the eBPF redirect on a temporary config that maps `api.openai.com` to the mock,
//! one agent script under `sluice run` that makes allowed, streamed, held, over-budget,
//! forbidden-domain, DNS-exfiltration and direct-IP calls, a hold approved from outside the
//! sandbox, then the decisions, the spend state and `sluice audit verify` on the exported log.
//! Then a second act: a gated service. A mock shipping API behind `sluice gate run` (HTTPS, L2,
//! the issuer pinned) that publishes a priced catalog, fetched and verified; a visitor without a
//! passport; a shipping agent under `sluice run --key`, whose requests the daemon signs and the
//! gate verifies and charges; a price increase published as a breaking change, which the agent's
//! passport does not pay (price lock); both logs exported, verified, linked by `sluice audit
//! link` and settled by `sluice audit settle`; and a request signed by hand, outside sluice, sent
//! twice: the gate serves it once and refuses the copy as a replay, and settling again names it.
//! The demo fails if any of those calls is not answered as sluice promises.
//!
//! Everything it starts is stopped and removed on the way out, failure included (Drop guards):
//! processes, the temporary directory, the agents' cgroup, the pinned eBPF programs.

mod gate;

use crate::ports::free_port;
use anyhow::{bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use gate::GATE_HOST;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The agent (an ordinary OpenAI client that ignores proxies).
const AGENT: &str = include_str!("demo_agent.py");

/// Passport limits, in cents. Kept in step with the agent's max_tokens (model gpt-6-astra at
/// $10/$50 per million tokens): 1200 → ~$0.06, 7900 → ~$0.40 (held), 5700 → ~$0.29 (under the
/// threshold).
const DAILY_BUDGET_CENTS: u64 = 50;
const APPROVAL_THRESHOLD_CENTS: u64 = 30;
/// Upper bound on any wait, so a broken step fails the demo instead of hanging it.
const HANG_GUARD: Duration = Duration::from_secs(60);

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM set a flag instead of killing the demo, so the next check returns an
/// error and every Drop guard runs: the daemon's pins and cgroups are removed, not left behind.
pub(crate) fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

pub(crate) fn interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

fn step(n: u32, text: &str) -> anyhow::Result<()> {
    interrupted()?;
    println!("\n== {n}. {text}");
    Ok(())
}

fn sluice(bin: &Path, args: &[&str]) -> anyhow::Result<Output> {
    println!("$ sluice {}", args.join(" "));
    let out = Command::new(bin).args(args).output().with_context(|| format!("cannot run {}", bin.display()))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    Ok(out)
}

fn must(out: Output) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!("the command above failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn run() -> anyhow::Result<()> {
    // The same step as `cargo xtask test`: building needs clang and libbpf's headers (the eBPF
    // object), the agent needs python3. Installs them as root on Debian, else names the command.
    super::deps::ensure()?;
    catch_interrupts();
    let started = Instant::now();
    let root = is_root();
    let mut build = super::cargo();
    build.args(["build", "--quiet", "-p", "sluice", "--bin", "sluice"]);
    if root {
        build.args(["-p", "sluice-e2e", "--bin", "sluice-mock-llm"]);
    }
    super::run(&mut build)?;
    let built = Instant::now();
    let bin = super::target_dir().join("debug/sluice");
    let dir = TempDir(std::env::temp_dir().join(format!("sluice-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let d = |name: &str| dir.0.join(name).to_string_lossy().into_owned();

    step(1, "Create an issuer (an Ed25519 signing key; its id is derived from the public key)")?;
    must(sluice(&bin, &["issuer", "init", "--dir", &d("issuer"), "--name", "Demo issuer"])?)?;

    step(2, "Issue a passport: LLM calls on api.openai.com only, a $0.50 daily budget, approval above $0.30")?;
    let passport_id = must(sluice(
        &bin,
        &[
            "passport",
            "issue",
            "--issuer-key",
            &d("issuer/issuer.key"),
            "--agent-id",
            "research-agent-1",
            "--agent-name",
            "Research agent",
            "--permission",
            "llm:*",
            "--constraint",
            &format!("core:cost:max_cumulative={DAILY_BUDGET_CENTS}"),
            "--constraint",
            "core:cost:cumulative_window=daily",
            "--constraint",
            &format!("core:cost:approval_threshold={APPROVAL_THRESHOLD_CENTS}"),
            "--constraint",
            "core:scope:domain_allowlist=api.openai.com",
            "--expires-in",
            "7d",
            "--out",
            &d("agent.jwt"),
        ],
    )?)?;

    step(3, "Inspect it (claims as written, not yet trusted)")?;
    must(sluice(&bin, &["passport", "inspect", &d("agent.jwt")])?)?;

    step(4, "Verify it, pinning the issuer")?;
    must(sluice(&bin, &["passport", "verify", &d("agent.jwt"), "--issuer-pub", &d("issuer/issuer.pub")])?)?;

    step(5, "Tamper with it: raise the daily budget from $0.50 to $50,000.00, keep the signature")?;
    let token = std::fs::read_to_string(d("agent.jwt"))?;
    std::fs::write(d("tampered.jwt"), tamper(token.trim())?)?;
    let out = sluice(&bin, &["passport", "verify", &d("tampered.jwt")])?;
    if out.status.success() {
        bail!("the tampered passport verified: this is a bug");
    }
    println!("-> rejected, as it must be (exit status {})", out.status.code().unwrap_or(-1));

    if !root {
        println!("\nThe daemon steps need root (eBPF, cgroups): run `sudo cargo xtask demo` for the rest.");
        return Ok(());
    }
    daemon_steps(&bin, &dir.0, &passport_id)?;
    println!(
        "\nDemo complete in {:.1} s (plus {:.1} s of cargo build); everything it started is being removed.",
        built.elapsed().as_secs_f64(),
        (built - started).as_secs_f64()
    );
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A child process killed and reaped on drop.
struct Proc {
    child: Child,
    /// Held open: the mock exits when its standard input closes, even if we are SIGKILLed.
    _stdin: Option<ChildStdin>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The daemon's kernel state: pinned programs and the agents' cgroup, removed on drop (after
/// the daemon's [`Proc`] is gone).
struct KernelState {
    pin_dir: PathBuf,
    cgroup: PathBuf,
    /// `[sandbox] unix_dir`, on which the daemon mounted a tmpfs.
    unix_dir: PathBuf,
}

impl Drop for KernelState {
    fn drop(&mut self) {
        // Removing the pins detaches the programs (nothing else holds them).
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        // Any sandbox left (an agent killed half-way): kill what is in it, then remove it.
        if let Ok(rd) = std::fs::read_dir(&self.cgroup) {
            for sub in rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
                let _ = std::fs::write(sub.join("cgroup.kill"), "1");
                let deadline = Instant::now() + Duration::from_secs(5);
                while std::fs::remove_dir(&sub).is_err() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let _ = std::fs::remove_dir(&self.cgroup);
        if let Ok(c) = std::ffi::CString::new(self.unix_dir.as_os_str().as_encoded_bytes()) {
            // SAFETY: c is a NUL-terminated path; umount2 only reads it.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find(|l| l.split(" - ").nth(1).is_some_and(|t| t.starts_with("cgroup2 ")))
        .and_then(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from)
        .context("no cgroup2 mount found")
}

/// A loopback address whose port 443 is free (agents dial port 443), other than `not`: one for
/// the mock API, one for the gate.
fn free_ip_443(not: Option<Ipv4Addr>, what: &str) -> anyhow::Result<Ipv4Addr> {
    let start = std::process::id() % 150;
    (0..150)
        .map(|i| Ipv4Addr::new(127, 0, 0, 60 + ((start + i) % 150) as u8))
        .find(|ip| Some(*ip) != not && TcpListener::bind((*ip, 443)).is_ok())
        .with_context(|| format!("no 127.0.0.x address with port 443 free for {what}"))
}

/// The real python3 (not a pyenv shim), so the sandboxed agent execs it directly.
fn python() -> anyhow::Result<String> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .context("python3 is needed for the demo's agent")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Starts `sluice-mock-llm` and waits for its `ready` line; later lines are collected.
fn start_mock(dir: &Path, ip: Ipv4Addr) -> anyhow::Result<(Proc, Arc<Mutex<Vec<String>>>)> {
    let bin = super::target_dir().join("debug/sluice-mock-llm");
    let mut child = Command::new(&bin)
        .args(["--listen", &SocketAddr::from((ip, 443)).to_string(), "--ca-out"])
        .arg(dir.join("mock-ca.pem"))
        .args(["--name", "api.openai.com"])
        // The gate's certificate, from the same CA (trusted by the daemon through extra_roots).
        .arg("--leaf")
        .arg(format!("{GATE_HOST}={}", dir.join("gate-tls").display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().context("mock stdout")?;
    let mock = Proc { child, _stdin: stdin };
    let mut lines = BufReader::new(stdout).lines();
    match lines.next() {
        Some(Ok(l)) if l.starts_with("ready ") => println!("mock API: {l}"),
        other => bail!("the mock API did not start: {other:?}"),
    }
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(l);
        }
    });
    Ok((mock, log))
}

fn daemon_steps(bin: &Path, dir: &Path, passport_id: &str) -> anyhow::Result<()> {
    let d = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let name = format!("sluice-demo-{}", std::process::id());
    let socket = dir.join("run/sluice.sock");
    let config = dir.join("sluice.toml");
    let cfg = config.to_string_lossy().into_owned();
    let sock = socket.to_string_lossy().into_owned();
    let cli = |args: &[&str]| -> anyhow::Result<Output> {
        let mut all = vec!["--config", cfg.as_str(), "--socket", sock.as_str()];
        all.extend_from_slice(args);
        sluice(bin, &all)
    };
    let quiet = |args: &[&str]| -> anyhow::Result<Output> {
        Ok(Command::new(bin).args(["--config", &cfg, "--socket", &sock]).args(args).output()?)
    };

    step(6, "Start a mock OpenAI API on loopback (HTTPS, h2 + HTTP/1.1, real usage numbers, streaming)")?;
    let ip = free_ip_443(None, "the mock API")?;
    let gate_ip = free_ip_443(Some(ip), "the gate")?;
    let (_mock, mock_log) = start_mock(dir, ip)?;

    step(7, "Start the daemon: eBPF redirect on a fresh agents cgroup, resolver, proxy, attestation store")?;
    std::fs::create_dir_all(dir.join("policies"))?;
    std::fs::copy(super::root().join("policies/openai.toml"), dir.join("policies/openai.toml"))
        .context("copying policies/openai.toml")?;
    // The gated shipping API of act two, priced like its gate's catalog.
    // The daemon's own DNS goes to a canary that never answers: an agent's query must never
    // reach it. api.openai.com is mapped to the mock, as an operator would for an air-gapped
    // host; its certificate is trusted through upstream_tls.extra_roots.
    let dns_canary = UdpSocket::bind("127.0.0.1:0")?;
    dns_canary.set_nonblocking(true)?;
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{name}"));
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{state}\"\npolicies_dir = \"{pol}\"\n\
             [api]\nsocket = \"{sock}\"\ngroup = \"root\"\n\
             [proxy]\nport = {proxy}\n\
             [dns]\nport = {dns}\nupstream = [\"{canary}\"]\nstatic_hosts = {{ \"api.openai.com\" = \"{ip}\", \"{GATE_HOST}\" = \"{gate_ip}\" }}\n\
             [sandbox]\ncgroup = \"{name}\"\npin_dir = \"{pins}\"\nunix_dir = \"{own}\"\n\
             [upstream_tls]\nextra_roots = [\"{ca}\"]\n\
             [holds]\ntimeout_secs = 60\n\
             [gates]\nhosts = [\"{GATE_HOST}\"]\n",
            state = d("state"),
            pol = d("policies"),
            proxy = free_port()?,
            dns = free_port()?,
            canary = dns_canary.local_addr()?,
            pins = pin_dir.display(),
            own = d("own"),
            ca = d("mock-ca.pem"),
        ),
    )?;
    println!("config: {}", config.display());
    print!("{}", std::fs::read_to_string(&config)?.lines().map(|l| format!("  {l}\n")).collect::<String>());
    let log = std::fs::File::create(dir.join("daemon.log"))?;
    let child = Command::new(bin)
        .args(["--config", &cfg, "daemon"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    // Field order: the kernel state is removed after the daemon is stopped.
    let _kernel = KernelState { pin_dir, cgroup: cgroup2_mount()?.join(&name), unix_dir: dir.join("own") };
    let daemon = Proc { child, _stdin: None };
    let deadline = Instant::now() + HANG_GUARD;
    while !quiet(&["holds"])?.status.success() {
        interrupted()?;
        if Instant::now() > deadline {
            bail!("the daemon did not start:\n{}", std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("daemon ready: eBPF programs pinned under /sys/fs/bpf/{name}, agents' cgroup {name}");

    step(8, "Run the agent under `sluice run`: no proxy settings, it just calls https://api.openai.com")?;
    std::fs::write(dir.join("agent.py"), AGENT)?;
    let results = run_agent(bin, &cfg, &sock, &python()?, &d("agent.jwt"), &d("agent.py"), ip, &cli)?;

    step(9, "What reached the API server, and the daemon's own DNS")?;
    let seen = mock_log.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for l in &seen {
        println!("  {l}");
    }
    let mut buf = [0u8; 512];
    let dns_hits = std::iter::from_fn(|| dns_canary.recv(&mut buf).ok()).count();
    println!("  daemon's upstream DNS server: {dns_hits} queries received");
    check_results(&results, &seen, dns_hits, ip)?;

    step(10, "The attestation log: every decision, settlement and event (from `sluice audit export`)")?;
    must(cli(&["audit", "export", "--out", &d("audit.json")])?)?;
    print_decisions(Path::new(&d("audit.json")))?;

    step(11, "Spend state")?;
    must(cli(&["state", passport_id])?)?;

    step(12, "Verify the exported log offline, with only the host's public key")?;
    must(sluice(bin, &["audit", "verify", &d("audit.json"), "--host-pub", &d("state/host.pub")])?)?;

    gate::act(bin, dir, &cli, &cfg, &sock, gate_ip)?;
    drop(daemon);
    Ok(())
}

/// Runs the agent, approving its held call from outside the sandbox while it waits; returns its
/// `RESULT` JSON.
#[allow(clippy::too_many_arguments)]
fn run_agent(
    bin: &Path,
    cfg: &str,
    sock: &str,
    python: &str,
    passport: &str,
    script: &str,
    ip: Ipv4Addr,
    cli: &dyn Fn(&[&str]) -> anyhow::Result<Output>,
) -> anyhow::Result<Value> {
    let ip = ip.to_string();
    println!("$ sluice run --passport {passport} -- {python} -u {script} {ip}");
    let mut cmd = Command::new(bin);
    cmd.args(["--config", cfg, "--socket", sock, "run", "--passport", passport, "--", python, "-u", script, &ip]);
    for var in
        ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"]
    {
        cmd.env_remove(var);
    }
    let mut child = cmd.stdout(Stdio::piped()).spawn().context("cannot start `sluice run`")?;
    let stdout = child.stdout.take().context("agent stdout")?;
    let mut agent = Proc { child, _stdin: None };
    let result = Arc::new(Mutex::new(None::<String>));
    let result_in = result.clone();
    let printer = std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            match l.strip_prefix("RESULT ") {
                Some(r) => *result_in.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.to_string()),
                None => println!("  agent | {l}"),
            }
            let _ = std::io::stdout().flush();
        }
    });
    // Watch for the held call from outside the sandbox; approve it as a human would.
    let deadline = Instant::now() + HANG_GUARD;
    let mut approved = false;
    let status = loop {
        interrupted()?;
        if let Some(status) = agent.child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("the agent did not finish within {} s", HANG_GUARD.as_secs());
        }
        if !approved {
            let out = Command::new(bin).args(["--config", cfg, "--socket", sock, "holds", "--json"]).output()?;
            let holds: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if let Some(id) = holds["holds"].get(0).and_then(|h| h["id"].as_str()) {
                println!("\n  -- outside the sandbox, an operator looks at the pending holds:");
                must(cli(&["holds"])?)?;
                must(cli(&["holds", "approve", id, "--note", "approved by the operator in the demo"])?)?;
                println!();
                approved = true;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = printer.join();
    if !status.success() {
        bail!("the agent failed ({status})");
    }
    if !approved {
        bail!("the over-threshold call was never held");
    }
    let text = result.lock().unwrap_or_else(|e| e.into_inner()).clone().context("the agent printed no RESULT line")?;
    serde_json::from_str(&text).context("the agent's RESULT line")
}

/// The demo fails loudly if sluice did not answer every call as it promises.
fn check_results(r: &Value, mock_log: &[String], dns_hits: usize, ip: Ipv4Addr) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for (call, what) in [("a", "the allowed call"), ("b", "the streamed call"), ("c", "the approved call")] {
        if r[call] != 200 {
            problems.push(format!("{what} ({call}) got {}", r[call]));
        }
    }
    let d = r["d"].as_array().cloned().unwrap_or_default();
    let last = d.last().cloned().unwrap_or(Value::Null);
    if last[0] != 403 || last[1] != "spend_limit_exceeded" {
        problems.push(format!("the budget calls (d) did not end in 403 spend_limit_exceeded: {d:?}"));
    }
    if r["e"] != "dns" {
        problems.push(format!("the forbidden domain (e): {}", r["e"]));
    }
    if r["f"] != "dns" {
        problems.push(format!("the exfiltration name (f): {}", r["f"]));
    }
    if r["g"] != 403 && r["g"] != "closed" && r["g"] != "refused" {
        problems.push(format!("the direct dial (g): {}", r["g"]));
    }
    let reached_directly =
        mock_log.iter().any(|l| l.contains(&format!(" {ip}/")) || l.contains(&format!(" {ip}:443/")));
    if reached_directly {
        problems.push("the direct dial reached the API server".to_string());
    }
    if dns_hits != 0 {
        problems.push(format!("{dns_hits} DNS queries reached the daemon's upstream DNS server"));
    }
    if !problems.is_empty() {
        bail!("sluice did not do its job:\n  {}", problems.join("\n  "));
    }
    println!("-> every call was answered as sluice promises; nothing left the host but the allowed calls");
    Ok(())
}

/// A record's amount `name` as dollars with its fraction (`$0.00042`): records count money in
/// millicents (`{name}_millicents`); those of an older daemon in whole cents (`{name}_cents`).
fn dollars(r: &Value, name: &str) -> String {
    let millicents = r[format!("{name}_millicents")]
        .as_u64()
        .or_else(|| r[format!("{name}_cents")].as_u64().and_then(|c| c.checked_mul(1000)));
    match millicents {
        Some(m) => {
            let digits = format!("{:05}", m % 100_000);
            let keep = digits.trim_end_matches('0').len().max(2);
            format!("${}.{}", m / 100_000, &digits[..keep])
        }
        None => "-".to_string(),
    }
}

/// One line per attestation record of the export: decisions with their estimated cost,
/// settlements with estimate → actual, and the events around them.
fn print_decisions(export: &Path) -> anyhow::Result<()> {
    let bundle: Value = serde_json::from_slice(&std::fs::read(export)?).context("the exported log")?;
    let records = bundle["records"].as_array().context("the export has no records")?;
    let row =
        |log: &str, kind: &str, action: &str, result: &str, reason: &str, cost: &str, spend: &str, detail: &str| {
            let line =
                format!("{log:>3}  {kind:<19} {action:<8} {result:<13} {reason:<27} {cost:>17} {spend:>8}  {detail}");
            println!("{}", line.trim_end());
        };
    row("log", "kind", "action", "result", "reason", "cost", "spend", "detail");
    for entry in records {
        let r: Value = entry["record"].as_str().and_then(|s| serde_json::from_str(s).ok()).unwrap_or(Value::Null);
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        let kind = s("kind");
        let (result, cost, detail) = match kind.as_str() {
            "decision" | "hold_resolution" => (
                s("decision"),
                dollars(&r, "cost"),
                match r["host"].as_str() {
                    Some(h) => format!("{} {h}", s("method")),
                    None => format!("{} (no host name: an address dialed directly)", s("method")),
                },
            ),
            "settlement" => (
                if r["settled"] == true { "settled" } else { "estimate kept" }.to_string(),
                format!("{}→{}", dollars(&r, "estimated"), dollars(&r, "actual")),
                format!("settles record {}", r["decision_record"]),
            ),
            "dns_denied" => (s("answer"), String::new(), format!("{} ({})", s("name"), s("via"))),
            "sandbox_created" | "sandbox_removed" => {
                (String::new(), String::new(), format!("{} {}", s("sandbox_id"), s("why")))
            }
            "passport_registered" => (String::new(), String::new(), format!("{} {}", s("passport_id"), s("agent_id"))),
            "daemon_start" => (String::new(), String::new(), format!("sluice {} pid {}", s("version"), r["pid"])),
            _ => (String::new(), String::new(), String::new()),
        };
        let spend = match dollars(&r, "spend_after") {
            d if d == "-" => String::new(),
            d => d,
        };
        row(&r["log_index"].to_string(), &kind, &s("action"), &result, &s("reason"), &cost, &spend, &detail);
    }
    Ok(())
}

/// Raises `core:cost:max_cumulative` in the payload and re-encodes it; the signature stays.
fn tamper(token: &str) -> anyhow::Result<String> {
    let parts: Vec<&str> = token.split('.').collect();
    let [h, p, s] = parts[..] else { bail!("not a compact JWS") };
    let mut claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).context("payload")?)?;
    claims["constraints"]["core:cost:max_cumulative"] = Value::from(5_000_000u64);
    Ok(format!("{h}.{}.{s}", URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?)))
}

#[cfg(test)]
mod tests {
    use super::dollars;
    use serde_json::json;

    #[test]
    fn record_amounts_show_their_fraction_in_either_unit() {
        let r = json!({"cost_millicents": 42, "spend_after_millicents": 39_614, "estimated_cents": 40});
        assert_eq!(dollars(&r, "cost"), "$0.00042");
        assert_eq!(dollars(&r, "spend_after"), "$0.39614");
        assert_eq!(dollars(&r, "estimated"), "$0.40");
        assert_eq!(dollars(&r, "actual"), "-");
        assert_eq!(dollars(&json!({"cost_millicents": 1_250_000}), "cost"), "$12.50");
    }
}
