//! The demo's second act: an agent calls a gated service.
//!
//! A mock shipping API (plain HTTP on loopback) behind `sluice gate run` (HTTPS with a leaf of the
//! mock LLM's CA, L2 with the demo issuer pinned) that publishes a priced catalog; its offer
//! fetched and verified; a visitor without a passport; a shipping agent under `sluice run --key`,
//! whose requests the daemon signs; a price increase published as a breaking change, which the
//! agent's passport does not pay (price lock); both logs exported, verified, linked and settled;
//! a request signed by hand outside sluice and sent twice, which the settlement then names. Every
//! outcome is checked.

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
/// The service, and the calls made from outside sluice (anonymous, replayed, the catalog fetched).
const SHIPPING: &str = include_str!("../demo_shipping.py");

/// The gate's first catalog: a booking costs 2.5 cents plus a 2.5 % platform fee (2.5625 cents,
/// rounded up to the millicent: 2.563); reading and anything else are free.
const CATALOG_V1: &str = r#"[[permission]]
key = "shipments:create"
description = "Create a shipment"
risk_level = "medium"
[permission.constraints]
"core:pricing:per_call_cents" = 2.5
"core:platform_fee:basis_points" = 250

[[permission]]
key = "web:fetch"
description = "Read rates"
risk_level = "low"

[[permission]]
key = "web:send"
description = "Anything else"
risk_level = "low"
"#;
/// A booking's price by version 1, fee included, in millicents.
const PRICE_V1: u64 = 2563;
/// Version 2's booking price (cents): a price increase.
const PRICE_V2_CENTS: &str = "3";

/// How the agent's refund (a permission its passport lacks) is refused: the status, the reason,
/// and the daemon's `Sluice-Decision` (`block`: refused on the agent's host, before the gate).
const REFUND_REFUSED: (u16, &str, &str) = (403, "permission_denied", "block");

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

/// Fetches `path` from the gate, anonymously, into `out`.
fn fetch(py: &str, dir: &Path, gate_ip: Ipv4Addr, path: &str, out: &Path) -> anyhow::Result<()> {
    let mut cmd = Command::new(py);
    cmd.arg("-u").arg(dir.join("shipping.py")).args(["fetch", GATE_HOST, &gate_ip.to_string()]);
    cmd.arg(dir.join("mock-ca.pem")).arg(path).arg(out);
    let r = run_script("fetch", cmd)?;
    if r["status"] != 200 {
        bail!("GET {path} from the gate answered {}", r["status"]);
    }
    Ok(())
}

/// `sluice catalog verify FILE --gate-pub KEY --json`, printed; the version it verified.
fn verify_catalog(bin: &Path, file: &str, gate_pub: &str) -> anyhow::Result<Value> {
    must(sluice(bin, &["catalog", "verify", file, "--gate-pub", gate_pub])?)?;
    let out = Command::new(bin).args(["catalog", "verify", file, "--gate-pub", gate_pub, "--json"]).output()?;
    serde_json::from_slice(&out.stdout).context("`sluice catalog verify --json`")
}

/// Exports both logs (the agent host's and the gate's) under names ending in `tag`.
fn export_both(
    bin: &Path,
    d: &dyn Fn(&str) -> String,
    cli: &dyn Fn(&[&str]) -> anyhow::Result<Output>,
    gcfg: &str,
    tag: &str,
) -> anyhow::Result<(String, String)> {
    let (agent, gate) = (d(&format!("agent-log{tag}.json")), d(&format!("gate-log{tag}.json")));
    must(cli(&["audit", "export", "--out", &agent])?)?;
    must(sluice(bin, &["--config", gcfg, "gate", "audit", "export", "--out", &gate])?)?;
    Ok((agent, gate))
}

/// `sluice audit settle` of the two exports, printed; then its JSON report and exit status.
fn settle(bin: &Path, d: &dyn Fn(&str) -> String, agent: &str, gate: &str) -> anyhow::Result<(Value, bool)> {
    let (agent_pub, gate_pub) = (d("state/host.pub"), d("gate/gate.pub"));
    let args = ["audit", "settle", agent, gate, "--agent-pub", &agent_pub, "--gate-pub", &gate_pub];
    let shown = sluice(bin, &args)?;
    let out = Command::new(bin).args(args).arg("--json").output()?;
    let report: Value = serde_json::from_slice(&out.stdout).context("`sluice audit settle --json`")?;
    if shown.status.success() != out.status.success() {
        bail!("`sluice audit settle` answered differently with --json");
    }
    Ok((report, out.status.success()))
}

/// The gate's records of bookings in its export `file`: `(catalog_version, cost_millicents)`.
fn gate_bookings(file: &str) -> anyhow::Result<Vec<(Value, Value)>> {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(file)?)?;
    let mut out = Vec::new();
    for r in doc["records"].as_array().context("records")? {
        let rec: Value = serde_json::from_str(r["record"].as_str().unwrap_or("null"))?;
        if rec["kind"] == "gate_decision" && rec["permission"] == "shipments:create" && rec["decision"] == "allow" {
            out.push((rec["catalog_version"].clone(), rec["cost_millicents"].clone()));
        }
    }
    Ok(out)
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
        "Start a shipping API on loopback, and a sluice gate in front of it (HTTPS, L2: only passports of the demo issuer, every request signed) that publishes catalog version 1",
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
             catalog = \"catalog.toml\"\n\
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
    std::fs::write(gdir.join("catalog.toml"), CATALOG_V1)?;
    println!("its catalog draft, {}:", d("gate/catalog.toml"));
    print!("{}", CATALOG_V1.lines().map(|l| format!("  {l}\n")).collect::<String>());
    must(sluice(bin, &["--config", &gcfg, "catalog", "publish", "--summary", "first prices"])?)?;
    println!(
        "the daemon has no host policy for {GATE_HOST}: it maps and prices requests to this gate by the gate's own signed catalog"
    );
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

    step(15, "The offer: fetch the gate's catalog (anyone may) and verify it offline with only the gate's public key")?;
    fetch(&py, dir, gate_ip, "/v1/catalog", &dir.join("catalog-v1.json"))?;
    let v = verify_catalog(bin, &d("catalog-v1.json"), &d("gate/gate.pub"))?;
    let mut problems = Vec::new();
    expect(&mut problems, "the verified catalog's version", &v["newest_version"], Value::from(1));
    fail_if(problems, "the catalog is signed by the gate's key, hashed and chained: version 1 prices a booking at 2.5 cents + 2.5 % = 2.563 cents")?;
    println!(
        "The agent's daemon fetches the same offer over its own upstream path, verifies it (signature, chain, the"
    );
    println!("version's inclusion in the gate's log) and pins the gate; from now on it prices requests to {GATE_HOST} by it:");
    let url = format!("https://{GATE_HOST}");
    must(cli(&["discover", &url])?)?;
    let out = Command::new(bin).args(["--config", cfg, "--socket", sock, "discover", &url, "--json"]).output()?;
    let offer: Value = serde_json::from_slice(&out.stdout).context("`sluice discover --json`")?;
    let mut problems = Vec::new();
    expect(&mut problems, "the discovered catalog version", &offer["catalog_version"], Value::from(1));
    let booking =
        offer["permissions"].as_array().and_then(|ps| ps.iter().find(|p| p["permission"] == "shipments:create"));
    match booking {
        Some(p) => expect(
            &mut problems,
            "the discovered booking price (millicents)",
            &p["price_millicents"],
            Value::from(PRICE_V1),
        ),
        None => problems.push(format!("the discovered offer lacks shipments:create: {offer}")),
    }
    fail_if(problems, "the daemon holds the gate's verified offer, pinned to the gate's key")?;

    step(16, "Outside sluice, a visitor with no passport: the public rates are served, a booking gets the 401 hint")?;
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
        17,
        &format!(
            "Run the shipping agent under `sluice run --key`: no proxy settings, no signing code; it just calls https://{GATE_HOST}"
        ),
    )?;
    std::fs::write(dir.join("gate_agent.py"), GATE_AGENT)?;
    let (passport, key, script) = (d("shipper.jwt"), d("shipper.jwt.key"), d("gate_agent.py"));
    println!("$ sluice run --passport {passport} --key {key} -- {py} -u {script} {GATE_HOST}");
    println!("  (with --key, the daemon signs this sandbox's requests to the [gates] hosts with the agent's key)");
    let agent = |extra: &[&str]| {
        let mut cmd = Command::new(bin);
        cmd.args(["--config", cfg, "--socket", sock, "run", "--passport", &passport, "--key", &key, "--"]);
        cmd.args([py.as_str(), "-u", &script, GATE_HOST]).args(extra);
        run_script("agent", cmd)
    };
    let before = lines_of(&service_log).len();
    let r = agent(&[])?;
    let seen = reached(&service_log, before);
    let mut problems = Vec::new();
    expect(&mut problems, "the signed GET /v1/rates (h)", &r["h"], Value::from(200));
    expect(&mut problems, "the signed POST /v1/shipments (i)", &r["i"], Value::from(201));
    let (status, reason, by) = REFUND_REFUSED;
    expect(&mut problems, "the POST /v1/refunds (j)", &r["j"], serde_json::json!([status, reason, by]));
    let want = [format!("GET /v1/rates from {passport_id}"), format!("POST /v1/shipments from {passport_id}")];
    if seen.len() != 2 || !seen.iter().zip(&want).all(|(l, w)| l.ends_with(w.as_str())) {
        problems.push(format!("the service should have received {want:?} (the gate names the passport): {seen:?}"));
    }
    fail_if(
        problems,
        "the gate verified the daemon's signatures, served the passport's permissions and charged the booking by catalog version 1; the refund, a permission the passport lacks, never left the agent's host",
    )?;

    step(18, "The operator raises the price to 3 cents: `catalog impact` shows a breaking change; `publish` refuses it without --accept-breaking")?;
    std::fs::write(
        gdir.join("catalog.toml"),
        CATALOG_V1.replace(
            "\"core:pricing:per_call_cents\" = 2.5",
            &format!("\"core:pricing:per_call_cents\" = {PRICE_V2_CENTS}"),
        ),
    )?;
    let impact = sluice(bin, &["--config", &gcfg, "catalog", "impact"])?;
    let diff: Value = serde_json::from_slice(&impact.stdout).context("`sluice catalog impact`")?;
    let refused = sluice(bin, &["--config", &gcfg, "catalog", "publish", "--summary", "bookings now 3 cents"])?;
    let mut problems = Vec::new();
    let increase =
        diff["changes"].as_array().into_iter().flatten().any(|c| {
            c["type"] == "price_increase" && c["permission_key"] == "shipments:create" && c["breaking"] == true
        });
    if impact.status.success() || diff["has_breaking_changes"] != true || !increase {
        problems.push(format!("impact should exit 1 with a breaking price_increase of shipments:create: {diff}"));
    }
    if refused.status.success() {
        problems.push("publish accepted a breaking change without --accept-breaking".into());
    }
    fail_if(problems, "a price increase is breaking; it is not published by accident")?;
    must(sluice(
        bin,
        &["--config", &gcfg, "catalog", "publish", "--summary", "bookings now 3 cents", "--accept-breaking"],
    )?)?;
    fetch(&py, dir, gate_ip, "/v1/catalog/versions", &dir.join("catalog-versions.json"))?;
    let v = verify_catalog(bin, &d("catalog-versions.json"), &d("gate/gate.pub"))?;
    let mut problems = Vec::new();
    expect(&mut problems, "the newest version the running gate serves", &v["newest_version"], Value::from(2));
    fail_if(problems, "the running gate serves version 2 at once, chained to version 1")?;

    step(
        19,
        "The same agent (its passport started at version 1) books again: it still pays version 1's price (price lock)",
    )?;
    let before = lines_of(&service_log).len();
    let r = agent(&["again"])?;
    let seen = reached(&service_log, before);
    let mut problems = Vec::new();
    expect(&mut problems, "the second booking (n)", &r["n"], Value::from(201));
    if seen.len() != 1 {
        problems.push(format!("the service should have received the second booking: {seen:?}"));
    }
    fail_if(problems, "booked; what it was charged is in both logs, next step")?;

    step(
        20,
        "Both sides' logs: export each, verify each with its own public key, link them by request hash, and settle",
    )?;
    let (agent_log, gate_log) = export_both(bin, &d, cli, &gcfg, "")?;
    must(sluice(bin, &["audit", "verify", &gate_log, "--host-pub", &d("gate/gate.pub")])?)?;
    let link_args = [
        "audit",
        "link",
        &agent_log,
        &gate_log,
        "--agent-pub",
        &d("state/host.pub"),
        "--gate-pub",
        &d("gate/gate.pub"),
    ];
    must(sluice(bin, &link_args)?)?;
    let out = Command::new(bin).args(link_args).arg("--json").output()?;
    let linked: Value = serde_json::from_slice(&out.stdout).context("`sluice audit link --json`")?;
    let count = |k: &str| linked[k].as_array().map_or(0, Vec::len);
    let mut problems = Vec::new();
    if linked["ok"] != true || count("matched") != 3 || count("agent_only") + count("gate_only") != 0 {
        problems.push(format!(
            "expected the agent's 3 signed requests that left (rates, two bookings) matched and nothing else: {}",
            serde_json::to_string(&linked)?
        ));
    }
    let (report, settled) = settle(bin, &d, &agent_log, &gate_log)?;
    let bookings = gate_bookings(&gate_log)?;
    let locked = (Value::from(1), Value::from(PRICE_V1));
    if bookings != [locked.clone(), locked] {
        problems.push(format!(
            "the gate should have charged both bookings version 1's {PRICE_V1} millicents: {bookings:?}"
        ));
    }
    let total = Value::from(2 * PRICE_V1);
    if !settled || report["ok"] != true || report["agreed"] != 3 {
        problems.push(format!("the settlement should agree on 3 pairs: {report}"));
    }
    expect(&mut problems, "the agent's total (millicents)", &report["agent_total"]["millicents"], total.clone());
    expect(&mut problems, "the gate's total (millicents)", &report["gate_total"]["millicents"], total);
    fail_if(
        problems,
        "each request is in both logs under one request hash; both charged the two bookings version 1's price, $0.02563 each, $0.05126 in all",
    )?;

    step(
        21,
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

    step(22, "Settle again: the gate charged a booking that this host never sent")?;
    let (agent_log, gate_log) = export_both(bin, &d, cli, &gcfg, "-2")?;
    let (report, settled) = settle(bin, &d, &agent_log, &gate_log)?;
    let mut problems = Vec::new();
    let one_sided = report["not_sent_by_this_host"].as_array().cloned().unwrap_or_default();
    let named = one_sided.iter().any(|e| e["request_hash"] == r["hash"] && e["gate_charged_millicents"] == PRICE_V1);
    if settled || one_sided.len() != 2 || !named {
        problems.push(format!(
            "settle should fail naming the hand-signed booking (charged) and its refused copy: {}",
            serde_json::to_string(&report["not_sent_by_this_host"])?
        ));
    }
    fail_if(
        problems,
        "the settlement does not agree: it names the booking signed outside sluice, charged by the gate, with the gate's record as evidence",
    )?;
    drop(gate);
    Ok(())
}
