//! The demo's second act: an agent calls a gated service.
//!
//! A mock shipping API (plain HTTP on loopback) behind `sluice gate run` (HTTPS with a leaf of the
//! mock LLM's CA, L2 with the demo issuer pinned); a visitor without a passport; a shipping agent
//! under `sluice run --key`, whose requests the daemon signs; both logs exported, verified and
//! linked; a request signed by hand outside sluice and sent twice. Every outcome is checked.

use super::{free_port, interrupted, must, sluice, step, Proc, HANG_GUARD};
use anyhow::{bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The gate's name, mapped to its loopback address by the daemon's `static_hosts`.
pub(super) const GATE_HOST: &str = "shipping.example.test";
/// The shipping agent (a client of the gated API that knows nothing about sluice).
const GATE_AGENT: &str = include_str!("../demo_gate_agent.py");
/// The service, and the calls made from outside sluice (anonymous, replayed).
const SHIPPING: &str = include_str!("../demo_shipping.py");

type Lines = Arc<Mutex<Vec<String>>>;

fn lines_of(log: &Lines) -> Vec<String> {
    log.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Runs `cmd`, printing its output as `label | …` lines; returns its `RESULT` JSON.
fn run_script(label: &str, mut cmd: Command) -> anyhow::Result<Value> {
    for var in
        ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"]
    {
        cmd.env_remove(var);
    }
    let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("cannot start the {label}"))?;
    let stdout = child.stdout.take().context("script stdout")?;
    let mut proc = Proc { child, _stdin: None };
    let result = Arc::new(Mutex::new(None::<String>));
    let result_in = result.clone();
    let label_in = label.to_string();
    let printer = std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            match l.strip_prefix("RESULT ") {
                Some(r) => *result_in.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.to_string()),
                None => println!("  {label_in} | {l}"),
            }
            let _ = std::io::stdout().flush();
        }
    });
    let deadline = Instant::now() + HANG_GUARD;
    let status = loop {
        interrupted()?;
        if let Some(status) = proc.child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("the {label} did not finish within {} s", HANG_GUARD.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = printer.join();
    if !status.success() {
        bail!("the {label} failed ({status})");
    }
    let text = result.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let text = text.with_context(|| format!("the {label} printed no RESULT line"))?;
    serde_json::from_str(&text).with_context(|| format!("the {label}'s RESULT line"))
}

/// Starts the shipping API on 127.0.0.1:`port`; its `service: …` lines are collected.
fn start_service(py: &str, script: &Path, port: u16) -> anyhow::Result<(Proc, Lines)> {
    let mut child = Command::new(py)
        .arg("-u")
        .arg(script)
        .args(["service", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start the shipping API")?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().context("service stdout")?;
    let service = Proc { child, _stdin: stdin };
    let mut lines = BufReader::new(stdout).lines();
    match lines.next() {
        Some(Ok(l)) if l == "ready" => println!("shipping API: plain HTTP on 127.0.0.1:{port}"),
        other => bail!("the shipping API did not start: {other:?}"),
    }
    let log: Lines = Arc::default();
    let sink = log.clone();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(l);
        }
    });
    Ok((service, log))
}

/// The passport's `iss` (the demo issuer's id), read from its payload.
fn issuer_of(passport: &Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(passport)?;
    let payload = token.trim().split('.').nth(1).context("the passport is not a compact JWS")?;
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).context("passport payload")?)?;
    claims["iss"].as_str().map(String::from).context("the passport has no iss")
}

fn expect(problems: &mut Vec<String>, what: &str, got: &Value, want: Value) {
    if *got != want {
        problems.push(format!("{what}: expected {want}, got {got}"));
    }
}

fn fail_if(problems: Vec<String>, ok: &str) -> anyhow::Result<()> {
    if !problems.is_empty() {
        bail!("sluice did not do its job:\n  {}", problems.join("\n  "));
    }
    println!("-> {ok}");
    Ok(())
}

/// Prints the service's lines received since `from`; returns them.
fn reached(log: &Lines, from: usize) -> Vec<String> {
    let seen: Vec<String> = lines_of(log).into_iter().skip(from).collect();
    println!("  what reached the shipping API:");
    for l in &seen {
        println!("    {l}");
    }
    if seen.is_empty() {
        println!("    nothing");
    }
    seen
}

pub(super) fn act(
    bin: &Path,
    dir: &Path,
    cli: &dyn Fn(&[&str]) -> anyhow::Result<Output>,
    cfg: &str,
    sock: &str,
    gate_ip: Ipv4Addr,
) -> anyhow::Result<()> {
    let d = |name: &str| dir.join(name).to_string_lossy().into_owned();
    // The interpreter `deps::ensure` checked for Python's cryptography (the replay signs with it).
    let py = crate::deps::PYTHON.to_string();
    println!("\n======== Act two: an agent calls a gated service ========");

    step(13, &format!("Issue a passport for a shipping agent: shipments:create and web browsing on {GATE_HOST} only"))?;
    let passport_id = must(sluice(
        bin,
        &[
            "passport",
            "issue",
            "--issuer-key",
            &d("issuer/issuer.key"),
            "--agent-id",
            "shipping-agent-1",
            "--agent-name",
            "Shipping agent",
            "--permission",
            "shipments:create",
            "--permission",
            "web:*",
            "--constraint",
            &format!("core:scope:domain_allowlist={GATE_HOST}"),
            "--expires-in",
            "7d",
            "--out",
            &d("shipper.jwt"),
        ],
    )?)?;
    println!("(its agent key, whose thumbprint the passport names in cnf.jkt: {})", d("shipper.jwt.key"));

    step(
        14,
        "Start a shipping API on loopback, and a sluice gate in front of it (HTTPS, L2: only passports of the demo issuer, every request signed)",
    )?;
    std::fs::write(dir.join("shipping.py"), SHIPPING)?;
    let service_port = free_port()?;
    let (_service, service_log) = start_service(&py, &dir.join("shipping.py"), service_port)?;
    let gdir = dir.join("gate");
    must(sluice(bin, &["gate", "init", "--dir", &d("gate"), "--name", "shipping-api"])?)?;
    let config = gdir.join("gate.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"shipping-api\"\nkey = \"gate.key\"\nstate_dir = \"state\"\n\
             listen = \"{gate_ip}:443\"\n\
             tls_cert = \"{tls}/tls.crt\"\ntls_key = \"{tls}/tls.key\"\n\
             upstream = \"http://127.0.0.1:{service_port}\"\n\
             trust_level = \"L2\"\nissuers = [\"{issuer}\"]\n\
             [[anonymous]]\nmethod = \"GET\"\npath = \"/v1/rates\"\n\
             [[route]]\nmethod = \"POST\"\npath = \"/v1/shipments\"\npermission = \"shipments:create\"\n\
             [[route]]\nmethod = \"POST\"\npath = \"/v1/refunds\"\npermission = \"refunds:create\"\n",
            tls = d("gate-tls"),
            issuer = issuer_of(&dir.join("shipper.jwt"))?,
        ),
    )?;
    let gcfg = config.to_string_lossy().into_owned();
    println!(
        "gate config: {gcfg} (the certificate for {GATE_HOST} is from the mock API's CA, which the daemon trusts)"
    );
    print!("{}", std::fs::read_to_string(&config)?.lines().map(|l| format!("  {l}\n")).collect::<String>());
    let glog = std::fs::File::create(dir.join("gate.log"))?;
    println!("$ sluice --config {gcfg} gate run");
    let child = Command::new(bin)
        .args(["--config", &gcfg, "gate", "run"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(glog)
        .spawn()
        .context("cannot start `sluice gate run`")?;
    let mut gate = Proc { child, _stdin: None };
    let deadline = Instant::now() + HANG_GUARD;
    while TcpStream::connect((gate_ip, 443)).is_err() {
        interrupted()?;
        if gate.child.try_wait()?.is_some() || Instant::now() > deadline {
            bail!("the gate did not start:\n{}", std::fs::read_to_string(dir.join("gate.log")).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("gate ready on {gate_ip}:443, which the daemon's resolver gives agents for {GATE_HOST}");

    step(15, "Outside sluice, a visitor with no passport: the public rates are served, a booking gets the 401 hint")?;
    let ca = d("mock-ca.pem");
    let mut cmd = Command::new(&py);
    cmd.arg("-u").arg(dir.join("shipping.py")).args(["anonymous", GATE_HOST, &gate_ip.to_string(), &ca]);
    let r = run_script("visitor", cmd)?;
    let seen = reached(&service_log, 0);
    let mut problems = Vec::new();
    expect(&mut problems, "the anonymous GET /v1/rates (k)", &r["k"], Value::from(200));
    expect(
        &mut problems,
        "the unsigned POST /v1/shipments (l)",
        &r["l"],
        serde_json::json!([401, "passport_required"]),
    );
    if seen.len() != 1 || !seen[0].contains("GET /v1/rates") {
        problems.push(format!("the service should have received only the anonymous GET: {seen:?}"));
    }
    fail_if(problems, "anyone may read the public part; nothing else passes without a passport")?;

    step(
        16,
        &format!(
            "Run the shipping agent under `sluice run --key`: no proxy settings, no signing code; it just calls https://{GATE_HOST}"
        ),
    )?;
    std::fs::write(dir.join("gate_agent.py"), GATE_AGENT)?;
    let (passport, key, script) = (d("shipper.jwt"), d("shipper.jwt.key"), d("gate_agent.py"));
    println!("$ sluice run --passport {passport} --key {key} -- {py} -u {script} {GATE_HOST}");
    println!("  (with --key, the daemon signs this sandbox's requests to the [gates] hosts with the agent's key)");
    let mut cmd = Command::new(bin);
    cmd.args(["--config", cfg, "--socket", sock, "run", "--passport", &passport, "--key", &key, "--"]);
    cmd.args([py.as_str(), "-u", &script, GATE_HOST]);
    let before = lines_of(&service_log).len();
    let r = run_script("agent", cmd)?;
    let seen = reached(&service_log, before);
    let mut problems = Vec::new();
    expect(&mut problems, "the signed GET /v1/rates (h)", &r["h"], Value::from(200));
    expect(&mut problems, "the signed POST /v1/shipments (i)", &r["i"], Value::from(201));
    expect(&mut problems, "the POST /v1/refunds (j)", &r["j"], serde_json::json!([403, "permission_denied"]));
    let want = [format!("GET /v1/rates from {passport_id}"), format!("POST /v1/shipments from {passport_id}")];
    if seen.len() != 2 || !seen.iter().zip(&want).all(|(l, w)| l.ends_with(w.as_str())) {
        problems.push(format!("the service should have received {want:?} (the gate names the passport): {seen:?}"));
    }
    fail_if(
        problems,
        "the gate verified the daemon's signatures and served the passport's permissions; the refund never reached the service",
    )?;

    step(17, "Both sides' logs: export each, verify each with its own public key, then link them by request hash")?;
    must(cli(&["audit", "export", "--out", &d("agent-log.json")])?)?;
    must(sluice(bin, &["--config", &gcfg, "gate", "audit", "export", "--out", &d("gate-log.json")])?)?;
    must(sluice(bin, &["audit", "verify", &d("gate-log.json"), "--host-pub", &d("gate/gate.pub")])?)?;
    let link_args = [
        "audit",
        "link",
        &d("agent-log.json"),
        &d("gate-log.json"),
        "--agent-pub",
        &d("state/host.pub"),
        "--gate-pub",
        &d("gate/gate.pub"),
    ];
    must(sluice(bin, &link_args)?)?;
    let out = Command::new(bin).args(link_args).arg("--json").output()?;
    let report: Value = serde_json::from_slice(&out.stdout).context("`sluice audit link --json`")?;
    let count = |k: &str| report[k].as_array().map_or(0, Vec::len);
    let mut problems = Vec::new();
    if report["ok"] != true || count("matched") != 3 || count("agent_only") + count("gate_only") != 0 {
        problems.push(format!(
            "expected the agent's 3 signed requests matched and nothing else: {}",
            serde_json::to_string(&report)?
        ));
    }
    fail_if(problems, "each of the agent's requests is in both logs, under the same request hash")?;

    step(
        18,
        "A captured request cannot be sent again: sign one booking by hand outside sluice (Python, the agent's key file), send it twice",
    )?;
    let before = lines_of(&service_log).len();
    let mut cmd = Command::new(&py);
    cmd.arg("-u").arg(dir.join("shipping.py")).args(["replay", GATE_HOST, &gate_ip.to_string(), &ca, &passport, &key]);
    let r = run_script("replayer", cmd)?;
    let seen = reached(&service_log, before);
    let mut problems = Vec::new();
    expect(&mut problems, "the hand-signed booking, first time (m1)", &r["m1"], Value::from(201));
    expect(&mut problems, "the same booking, again (m2)", &r["m2"], serde_json::json!([403, "replay"]));
    if seen.len() != 1 {
        problems.push(format!("the service should have received the booking exactly once: {seen:?}"));
    }
    fail_if(
        problems,
        "the gate served the signed request once and refused the identical copy: its nonce was used up (the gate keeps each nonce, durably, for as long as the signature's ±60 s window could accept it)",
    )?;
    drop(gate);
    Ok(())
}
