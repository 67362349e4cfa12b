//! Catalogs from both sides, end to end: a real `sluice gate run` (HTTPS) publishing a priced
//! catalog, a daemon with the gate in `[gates] hosts` and no host policy for it, and agents under
//! `sluice run --passport P --key P.key`. `sluice discover` verifies and pins the gate's catalog;
//! then the daemon maps and prices each request by it, so a passport's spend cap holds against the
//! gate (the call over the cap never reaches it), a permission the passport lacks is refused on
//! the agent's host, the price lock is the same on both sides after a price rise, and a gate that
//! shows a forked catalog is refused by `sluice discover`.

use serde_json::Value;
use sluice_e2e::gate::{start_daemon, start_service, GATE};
use sluice_e2e::upstream::TestCa;
use sluice_e2e::{free_port, root_or_skip, ChildGuard};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn catalog(cents: &str) -> String {
    format!(
        r#"[[permission]]
key = "shipments:create"
description = "Create a shipment"
risk_level = "medium"
[permission.constraints]
"core:pricing:per_call_cents" = {cents}
"core:sla:uptime_basis_points" = 9990

[[permission]]
key = "refunds:create"
description = "Refund a shipment"
risk_level = "high"
[permission.constraints]
"core:pricing:per_call_cents" = 1
"#
    )
}

/// Starts `sluice gate run` on `config` and waits until it listens on `port`.
fn run_gate(config: &Path, port: u16) -> ChildGuard {
    let mut gate = ChildGuard(Some(
        std::process::Command::new(sluice_e2e::daemon::sluice_bin())
            .args(["--config", p(config), "gate", "run"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        let child = gate.0.as_mut().unwrap();
        if child.try_wait().unwrap().is_some() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("sluice gate run exited: {err}");
        }
        assert!(Instant::now() < deadline, "sluice gate run did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    gate
}

fn gate_cli(config: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(sluice_e2e::daemon::sluice_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

/// Writes `gate.toml` (and its `catalog.toml` at `cents`) into `gdir`, state in `state`.
fn write_gate(gdir: &Path, state: &str, port: u16, service_port: u16, cents: &str) -> PathBuf {
    let config = gdir.join(format!("{state}.toml"));
    std::fs::write(gdir.join(format!("{state}-catalog.toml")), catalog(cents)).unwrap();
    std::fs::write(
        &config,
        format!(
            r#"name = "shipping-api"
key = "{dir}/gate.key"
state_dir = "{dir}/{state}"
listen = "127.0.0.1:{port}"
tls_cert = "{dir}/tls.crt"
tls_key = "{dir}/tls.key"
upstream = "http://127.0.0.1:{service_port}"
catalog = "{dir}/{state}-catalog.toml"
[[route]]
method = "POST"
path = "/v1/shipments"
permission = "shipments:create"
[[route]]
method = "POST"
path = "/v1/refunds"
permission = "refunds:create"
"#,
            dir = gdir.display()
        ),
    )
    .unwrap();
    config
}

#[test]
fn discover_pins_and_the_daemon_prices_gate_requests_by_the_catalog() {
    if !root_or_skip("discover_pins_and_the_daemon_prices_gate_requests_by_the_catalog") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ca = TestCa::new();
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_path = ca.write(ca_dir.path());
    let (service_port, seen) = start_service(&rt);

    let d = start_daemon(&ca_path);
    let issue = |name: &str, cap: &str, permissions: &[&str]| {
        let mut args = vec![];
        for perm in permissions {
            args.extend(["--permission", perm]);
        }
        let allow = format!("core:scope:domain_allowlist=[\"{GATE}\"]");
        let cap = format!("core:cost:max_cumulative={cap}");
        args.extend(["--constraint", allow.as_str(), "--constraint", cap.as_str()]);
        let (passport, id) = d.issue(name, &args);
        let key = PathBuf::from(format!("{}.key", passport.display()));
        (passport, key, id)
    };
    // Capped at 10 cents, at 3 cents a call: three calls, not four. No refunds. (`web:*` so that
    // the refusal before discovery, recorded with the unmapped default action `web:send`, shows
    // its own reason rather than the permission check's.)
    let (capped, capped_key, capped_id) = issue("capped", "10", &["shipments:create", "web:*"]);

    let gdir = d.dir.path().join("gate");
    let out = d.cli(&["gate", "init", "--dir", p(&gdir), "--name", "shipping-api"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (cert, tls_key) = ca.leaf_pem(&[GATE]);
    std::fs::write(gdir.join("tls.crt"), cert).unwrap();
    std::fs::write(gdir.join("tls.key"), tls_key).unwrap();
    let gate_port = free_port();
    let config = write_gate(&gdir, "state", gate_port, service_port, "3");
    let gate = run_gate(&config, gate_port);
    let out = gate_cli(&config, &["catalog", "publish", "--summary", "3 cents"]);
    assert!(out.status.success(), "publish: {}", String::from_utf8_lossy(&out.stderr));

    let origin = format!("https://{GATE}:{gate_port}");
    let url = |path: &str| format!("{origin}{path}");
    let curl = |passport: &Path, key: &Path, path: &str| {
        let args = [
            "run",
            "--passport",
            p(passport),
            "--key",
            p(key),
            "--",
            "curl",
            "-sS",
            "--max-time",
            "60",
            "-w",
            "\n%{http_code}",
            "-X",
            "POST",
            "--data-binary",
            "{}",
            &url(path),
        ];
        let out = d.cli(&args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
        (code.to_string(), body.to_string())
    };

    // Before discovery (the start-up refresh tried https://HOST, port 443): fail closed.
    let (code, body) = curl(&capped, &capped_key, "/v1/shipments");
    assert_eq!(code, "403", "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["reason"], "gate_catalog_unavailable", "{body}");
    assert!(seen.lock().unwrap().is_empty());

    // Discover: verified, pinned on first use, the offer printed.
    let out = d.cli(&["discover", &origin]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "discover: {text}{}\n{}", String::from_utf8_lossy(&out.stderr), d.log());
    assert!(text.contains("trust on first use"), "{text}");
    assert!(text.contains("catalog version 1"), "{text}");
    assert!(text.contains("shipments:create") && text.contains("99.90%"), "{text}");
    assert!(text.contains("/v1/refunds") && text.contains("-> refunds:create"), "{text}");
    let out = d.cli(&["discover", &origin, "--json"]);
    let offer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(offer["first_use"], false, "{offer}");
    let price = offer["permissions"].as_array().unwrap().iter().find(|p| p["permission"] == "shipments:create");
    assert_eq!(price.unwrap()["price_millicents"], 3000, "{offer}");
    let gate_id = offer["gate_id"].as_str().unwrap().to_string();

    // The cap holds against the gate: three calls at 3 cents, the fourth refused by the daemon.
    for i in 0..3 {
        let (code, body) = curl(&capped, &capped_key, "/v1/shipments");
        assert_eq!((code.as_str(), body.as_str()), ("200", "ok /v1/shipments"), "call {i}\n{}", d.log());
    }
    let (code, body) = curl(&capped, &capped_key, "/v1/shipments");
    assert_eq!(code, "403", "{body}");
    let refusal: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(refusal["reason"], "spend_limit_exceeded", "{body}");
    // A permission the passport lacks: refused on the agent's host.
    let (code, body) = curl(&capped, &capped_key, "/v1/refunds");
    assert_eq!(code, "403", "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["reason"], "permission_denied", "{body}");
    assert_eq!(seen.lock().unwrap().len(), 3, "only the three paid calls reached the service");

    // The price lock, both sides: a passport that called at version 1 keeps its price after
    // version 2 raises it; a new passport pays version 2's.
    let (early, early_key, early_id) = issue("early", "100", &["shipments:create"]);
    let (code, _) = curl(&early, &early_key, "/v1/shipments");
    assert_eq!(code, "200");
    std::fs::write(gdir.join("state-catalog.toml"), catalog("4")).unwrap();
    let out = gate_cli(&config, &["catalog", "publish", "--summary", "4 cents", "--accept-breaking"]);
    assert!(out.status.success(), "publish v2: {}", String::from_utf8_lossy(&out.stderr));
    let out = d.cli(&["discover", &origin]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (late, late_key, late_id) = issue("late", "100", &["shipments:create"]);
    assert_eq!(curl(&early, &early_key, "/v1/shipments").0, "200");
    assert_eq!(curl(&late, &late_key, "/v1/shipments").0, "200");

    let records = d.verified_records();
    let priced = |id: &str| -> Vec<(u64, u64)> {
        records
            .iter()
            .filter(|r| r["passport_id"] == id && r["decision"] == "allow" && r["gate_id"] == gate_id.as_str())
            .map(|r| (r["cost_millicents"].as_u64().unwrap(), r["catalog_version"].as_u64().unwrap()))
            .collect()
    };
    assert_eq!(priced(&capped_id), vec![(3000, 1); 3]);
    assert_eq!(priced(&early_id), vec![(3000, 1), (3000, 1)]);
    assert_eq!(priced(&late_id), vec![(4000, 2)]);
    let blocked = records.iter().filter(|r| r["passport_id"] == capped_id.as_str() && r["decision"] == "block");
    let reasons: Vec<&str> = blocked.map(|r| r["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["gate_catalog_unavailable", "spend_limit_exceeded", "permission_denied"]);

    // The gate's own records price the same requests the same way.
    let gate_export = d.dir.path().join("gate-export.json");
    let out = gate_cli(&config, &["gate", "audit", "export", "--out", p(&gate_export)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bundle: Value = serde_json::from_slice(&std::fs::read(&gate_export).unwrap()).unwrap();
    let gate_records: Vec<Value> = bundle["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str(r["record"].as_str().unwrap()).unwrap())
        .collect();
    let gate_priced = |id: &str| -> Vec<(u64, u64)> {
        gate_records
            .iter()
            .filter(|r| r["passport_id"] == id && r["decision"] == "allow")
            .map(|r| (r["price_millicents"].as_u64().unwrap_or(0), r["catalog_version"].as_u64().unwrap_or(0)))
            .collect()
    };
    assert_eq!(gate_priced(&early_id), priced(&early_id), "{gate_records:#?}");
    assert_eq!(gate_priced(&late_id), priced(&late_id));
    assert_eq!(gate_priced(&capped_id), priced(&capped_id));
    drop(gate);

    // A fork: the same gate key serving another history (a different version 1) on the same
    // address. discover refuses it, naming the gate, and the pin stays.
    let forked = write_gate(&gdir, "forked", gate_port, service_port, "1");
    let fork = run_gate(&forked, gate_port);
    let out = gate_cli(&forked, &["catalog", "publish", "--summary", "cheaper, forked"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = d.cli(&["discover", &origin]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "a forked catalog was accepted: {}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains(GATE) && (err.contains("rollback") || err.contains("SPLIT VIEW")), "{err}");
    // The daemon keeps pricing by what it verified before (version 2, 4 cents).
    let pins: Value =
        serde_json::from_slice(&std::fs::read(d.dir.path().join("state/gate-pins.json")).unwrap()).unwrap();
    assert_eq!(pins["gates"][GATE]["catalog_version"], 2, "{pins}");
    drop(fork);
}
