//! `cargo xtask demo`: sluice's main job, step by step, with the real binary in a temporary
//! directory that is removed at the end.

use anyhow::{bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn step(n: u32, text: &str) {
    println!("\n== {n}. {text}");
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
    super::run(super::cargo().args(["build", "--quiet", "-p", "sluice", "--bin", "sluice"]))?;
    let bin = super::target_dir().join("debug/sluice");
    let dir = TempDir(std::env::temp_dir().join(format!("sluice-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let d = |name: &str| dir.0.join(name).to_string_lossy().into_owned();

    step(1, "Create an issuer (an Ed25519 signing key; its id is derived from the public key)");
    must(sluice(&bin, &["issuer", "init", "--dir", &d("issuer"), "--name", "Demo issuer"])?)?;

    step(2, "Issue a passport: permissions, a spend limit per action, a daily budget, a domain allowlist");
    must(sluice(
        &bin,
        &[
            "passport",
            "issue",
            "--issuer-key",
            &d("issuer/issuer.key"),
            "--agent-id",
            "shopper-1",
            "--agent-name",
            "Shopping agent",
            "--permission",
            "orders:read",
            "--permission",
            "llm:*",
            "--constraint",
            "core:cost:max_per_action=500",
            "--constraint",
            "core:cost:max_cumulative=2000",
            "--constraint",
            "core:cost:approval_threshold=300",
            "--constraint",
            "core:scope:domain_allowlist=api.openai.com,*.shop.example",
            "--expires-in",
            "7d",
            "--out",
            &d("shopper.jwt"),
        ],
    )?)?;

    step(3, "Inspect it (claims as written, not yet trusted)");
    must(sluice(&bin, &["passport", "inspect", &d("shopper.jwt")])?)?;

    step(4, "Verify it, pinning the issuer");
    must(sluice(&bin, &["passport", "verify", &d("shopper.jwt"), "--issuer-pub", &d("issuer/issuer.pub")])?)?;

    step(5, "Tamper with it: raise the per-action limit from $5.00 to $5000.00, keep the signature");
    let token = std::fs::read_to_string(d("shopper.jwt"))?;
    let forged = tamper(token.trim())?;
    std::fs::write(d("tampered.jwt"), forged)?;
    let out = sluice(&bin, &["passport", "verify", &d("tampered.jwt")])?;
    if out.status.success() {
        bail!("the tampered passport verified: this is a bug");
    }
    println!("-> rejected, as it must be (exit status {})", out.status.code().unwrap_or(-1));

    if !is_root() {
        println!("\nThe daemon steps need root (eBPF, cgroups): run `sudo cargo xtask demo` for the rest.");
        return Ok(());
    }
    daemon_steps(&bin, &dir.0)?;
    println!("\nDemo complete. (A mock LLM API with metered spend joins this demo with issue 6.)");
    Ok(())
}

/// `sluice enforce`, summarised to one line per decision (the full JSON is in the log).
fn decide(
    bin: &Path,
    cfg: &str,
    sock: &str,
    id: &str,
    action: &str,
    cost: &str,
    target: &str,
) -> anyhow::Result<serde_json::Value> {
    println!("$ sluice enforce --passport-id {id} --action {action} --cost-cents {cost} --target {target}");
    let out = Command::new(bin)
        .args(["--config", cfg, "--socket", sock, "enforce", "--passport-id", id, "--action", action])
        .args(["--cost-cents", cost, "--target", target])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("decision JSON")?;
    println!(
        "-> {} ({}): {}  [attestation {}, exit status {}]",
        v["decision"].as_str().unwrap_or("?"),
        v["reason"].as_str().unwrap_or("?"),
        v["detail"].as_str().unwrap_or(""),
        v["attestation_id"],
        out.status.code().unwrap_or(-1)
    );
    Ok(v)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The daemon on a temporary config, its own cgroup, pins and ports; stopped and removed on drop.
struct DemoDaemon {
    child: Option<std::process::Child>,
    pin_dir: PathBuf,
    cgroup: PathBuf,
}

impl Drop for DemoDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
        // Removing the pins detaches the programs (nothing else holds them); then the cgroup.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir(&self.cgroup);
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

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn daemon_steps(bin: &Path, dir: &Path) -> anyhow::Result<()> {
    let d = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let name = format!("sluice-demo-{}", std::process::id());
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{name}"));
    let socket = dir.join("run/sluice.sock");
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\npolicies_dir = \"{}\"\n[api]\nsocket = \"{}\"\ngroup = \"root\"\n[proxy]\nport = {}\n[dns]\nport = {}\n[sandbox]\ncgroup = \"{name}\"\npin_dir = \"{}\"\n[holds]\ntimeout_secs = 60\n",
            d("state"), d("policies"), socket.display(), free_port()?, free_port()?, pin_dir.display()
        ),
    )?;
    let cfg = config.to_string_lossy().into_owned();
    let sock = socket.to_string_lossy().into_owned();
    let cli = |args: &[&str]| -> anyhow::Result<Output> {
        let mut all = vec!["--config", cfg.as_str(), "--socket", sock.as_str()];
        all.extend_from_slice(args);
        sluice(bin, &all)
    };

    step(6, "Start the daemon: eBPF redirect on a fresh agents cgroup, the attestation store, the local API");
    let log = std::fs::File::create(dir.join("daemon.log"))?;
    let child = Command::new(bin).args(["--config", &cfg, "daemon"]).env("RUST_LOG", "info").stderr(log).spawn()?;
    let _daemon = DemoDaemon { child: Some(child), pin_dir, cgroup: cgroup2_mount()?.join(&name) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !Command::new(bin).args(["--socket", &sock, "holds"]).output()?.status.success() {
        if std::time::Instant::now() > deadline {
            bail!("the daemon did not start:\n{}", std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    println!("daemon ready; eBPF programs pinned, agents' cgroup {name}");

    step(7, "Run an agent that ignores every proxy setting: it resolves names and dials 127.0.0.77 directly");
    let canary = std::net::TcpListener::bind("127.0.0.77:0")?;
    canary.set_nonblocking(true)?;
    let port = canary.local_addr()?.port();
    let script = format!(
        r#"import socket
for name in ("api.openai.com", "exfil.example.net"):
    try:
        print("agent: DNS", name, "->", socket.getaddrinfo(name, 443, socket.AF_INET)[0][4][0])
    except socket.gaierror as e:
        print("agent: DNS", name, "->", e)
s = socket.create_connection(("127.0.0.77", {port}), timeout=20)
s.sendall(b"GET /steal HTTP/1.1\r\nHost: 127.0.0.77\r\nConnection: close\r\n\r\n")
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
print("agent: got", head.splitlines()[0])
print("agent: body", body[:300])
"#
    );
    must(cli(&["run", "--passport", &d("shopper.jwt"), "--", "python3", "-c", &script])?)?;
    let reached = canary.accept().is_ok();
    println!(
        "-> the outside listener was {}",
        if reached {
            "REACHED (bug!)"
        } else {
            "never reached: the kernel sent the connection to sluice, which refused it"
        }
    );
    if reached {
        bail!("the agent's connection escaped the redirect");
    }

    step(8, "Decisions (passport-only API): allowed, over the per-action limit, forbidden domain, over the approval threshold");
    let id = must(cli(&["passport", "register", &d("shopper.jwt")])?)?;
    for (action, cost, target) in [
        ("llm:chat", "250", "api.openai.com"),
        ("llm:chat", "800", "api.openai.com"),
        ("llm:chat", "10", "exfil.example.net"),
        ("orders:write", "0", "api.shop.example"),
    ] {
        decide(bin, &cfg, &sock, &id, action, cost, target)?;
    }
    let held = decide(bin, &cfg, &sock, &id, "llm:chat", "400", "api.openai.com")?;
    let hold = held["approval_request_id"].as_str().context("the over-threshold call was not held")?.to_string();

    step(9, "A human approves the held call from outside the sandbox (limits are checked again)");
    must(cli(&["holds"])?)?;
    must(cli(&["holds", "approve", &hold, "--note", "approved in the demo"])?)?;

    step(10, "Spend state");
    must(cli(&["state", &id])?)?;

    step(11, "Export the attestation log and verify it offline with only the host's public key");
    must(cli(&["audit", "export", "--out", &d("audit.json")])?)?;
    must(sluice(bin, &["audit", "verify", &d("audit.json"), "--host-pub", &d("state/host.pub")])?)?;
    Ok(())
}

/// Rewrites `"core:cost:max_per_action":500` in the payload to 500000 and re-encodes it.
fn tamper(token: &str) -> anyhow::Result<String> {
    let parts: Vec<&str> = token.split('.').collect();
    let [h, p, s] = parts[..] else { bail!("not a compact JWS") };
    let payload = URL_SAFE_NO_PAD.decode(p).context("payload")?;
    let text =
        String::from_utf8(payload)?.replace("\"core:cost:max_per_action\":500", "\"core:cost:max_per_action\":500000");
    Ok(format!("{h}.{}.{s}", URL_SAFE_NO_PAD.encode(text.as_bytes())))
}
