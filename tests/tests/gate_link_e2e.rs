//! Both sides of a gated request, end to end: a real `sluice gate run` (HTTPS, L2, pinned issuer)
//! in front of a loopback service, and an agent under `sluice run --passport P --key P.key` whose
//! daemon signs its requests to the gate. Anonymous browsing is served without a passport; a
//! credentialed call is verified and forwarded; an action the passport does not grant is refused
//! on the agent's host (the daemon maps it by the gate's catalog); an unsigned call outside the anonymous subset gets the 401 hint. Then both logs
//! are exported and `sluice audit link` matches the daemon's records with the gate's by request
//! hash, and `sluice audit settle` compares what each side charged: the gate prices the booking
//! by its catalog (2.5 cents + 2.5 % fee), the daemon by the same verified catalog. Then
//! the exports are edited: a record removed, a price altered, a window cut; settle says so.

use serde_json::Value;
use sluice_e2e::gate::{start_daemon, start_service, GATE};
use sluice_e2e::upstream::TestCa;
use sluice_e2e::{free_port, root_or_skip, ChildGuard};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The gate's catalog: a booking costs 2.5 cents plus a 2.5 % fee, 2,563 millicents (the fee is
/// rounded up to a millicent); refunds are offered (so a passport without them is refused
/// `permission_denied`), reading and anything else are free.
const CATALOG: &str = r#"
[[permission]]
key = "shipments:create"
description = "Create a shipment"
risk_level = "medium"
[permission.constraints]
"core:pricing:per_call_cents" = 2.5
"core:platform_fee:basis_points" = 250

[[permission]]
key = "refunds:create"
description = "Refund a shipment"
risk_level = "high"
[permission.constraints]
"core:pricing:per_call_cents" = 1

[[permission]]
key = "web:fetch"
description = "Read"
risk_level = "low"

[[permission]]
key = "web:send"
description = "Anything else"
risk_level = "low"
"#;

/// The booking's price, fee included, in millicents.
const PRICE: u64 = 2563;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn an_agent_calls_a_gate_and_both_logs_link_and_settle() {
    if !root_or_skip("an_agent_calls_a_gate_and_both_logs_link_and_settle") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ca = TestCa::new();
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_path = ca.write(ca_dir.path());
    let (service_port, seen) = start_service(&rt);

    let d = start_daemon(&ca_path);
    let (passport, passport_id) = d.issue(
        "shipper",
        &[
            "--permission",
            "web:*",
            "--permission",
            "shipments:*",
            "--constraint",
            &format!("core:scope:domain_allowlist=[\"{GATE}\"]"),
        ],
    );
    let key = PathBuf::from(format!("{}.key", passport.display()));
    let token = std::fs::read_to_string(&passport).unwrap().trim().to_string();
    let issuer = sluice::passport::inspect(&token).unwrap().0["iss"].as_str().unwrap().to_string();

    // The gate: its own key, TLS for its name, L2 with the passport's issuer pinned.
    let gdir = d.dir.path().join("gate");
    let out = d.cli(&["gate", "init", "--dir", p(&gdir), "--name", "shipping-api"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (cert, tls_key) = ca.leaf_pem(&[GATE]);
    std::fs::write(gdir.join("tls.crt"), cert).unwrap();
    std::fs::write(gdir.join("tls.key"), tls_key).unwrap();
    let gate_port = free_port();
    let config = gdir.join("gate.toml");
    std::fs::write(
        &config,
        format!(
            r#"name = "shipping-api"
key = "{dir}/gate.key"
state_dir = "{dir}/state"
listen = "127.0.0.1:{gate_port}"
tls_cert = "{dir}/tls.crt"
tls_key = "{dir}/tls.key"
upstream = "http://127.0.0.1:{service_port}"
trust_level = "L2"
issuers = ["{issuer}"]
catalog = "{dir}/catalog.toml"
[[route]]
method = "POST"
path = "/v1/shipments"
permission = "shipments:create"
[[route]]
method = "POST"
path = "/v1/refunds"
permission = "refunds:create"
[[anonymous]]
method = "GET"
path = "/v1/rates"
"#,
            dir = gdir.display()
        ),
    )
    .unwrap();
    std::fs::write(gdir.join("catalog.toml"), CATALOG).unwrap();
    let out = std::process::Command::new(sluice_e2e::daemon::sluice_bin())
        .args(["--config", p(&config), "catalog", "publish", "--summary", "first prices"])
        .output()
        .unwrap();
    assert!(out.status.success(), "catalog publish: {}", String::from_utf8_lossy(&out.stderr));
    let mut gate = ChildGuard(Some(
        std::process::Command::new(sluice_e2e::daemon::sluice_bin())
            .args(["--config", p(&config), "gate", "run"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", gate_port)).is_err() {
        let child = gate.0.as_mut().unwrap();
        if child.try_wait().unwrap().is_some() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("sluice gate run exited: {err}");
        }
        assert!(Instant::now() < deadline, "sluice gate run did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The daemon maps and prices requests to a gate host by the gate's verified catalog (no host
    // policy for it here), and refuses them until it has one.
    let out = d.cli(&["discover", &format!("https://{GATE}:{gate_port}")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "discover: {text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("catalog version 1") && text.contains("2.563"), "{text}");

    let url = |path: &str| format!("https://{GATE}:{gate_port}{path}");
    let curl = |with_key: bool, extra: &[&str]| {
        let mut args = vec!["run", "--passport", p(&passport)];
        if with_key {
            args.extend(["--key", p(&key)]);
        }
        args.extend(["--", "curl", "-sS", "--max-time", "60", "-w", "\n%{http_code}"]);
        args.extend_from_slice(extra);
        let out = d.cli(&args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
        (code.to_string(), body.to_string(), String::from_utf8_lossy(&out.stderr).into_owned())
    };

    // 1. Anonymous browsing: served without a passport.
    let (code, body, err) = curl(false, &[&url("/v1/rates")]);
    assert_eq!((code.as_str(), body.as_str()), ("200", "ok /v1/rates"), "{err}\n{}", d.log());
    // 2. Unsigned, outside the anonymous subset: the 401 hint, nothing forwarded.
    let (code, body, _) = curl(false, &["-X", "POST", "--data-binary", "{}", &url("/v1/shipments")]);
    assert_eq!(code, "401", "{body}");
    let hint: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(hint["reason"], "passport_required", "{hint}");
    assert_eq!(hint["hint"]["permission"], "shipments:create", "{hint}");
    // 3. Credentialed: the daemon signs, the gate verifies and forwards with the passport's id.
    let (code, body, err) = curl(
        true,
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data-binary",
            r#"{"to":"Lyon"}"#,
            &url("/v1/shipments"),
        ],
    );
    assert_eq!((code.as_str(), body.as_str()), ("200", "ok /v1/shipments"), "{err}\n{}", d.log());
    // Between the booking and the refund: the settlement windows below are cut here.
    std::thread::sleep(Duration::from_millis(20));
    let cut = sluice::ledger::record::now_rfc3339();
    std::thread::sleep(Duration::from_millis(20));
    // 4. An action the passport does not grant: refused on the agent's host (the gate's catalog
    // maps it to refunds:create), never sent.
    let (code, body, _) = curl(true, &["-X", "POST", "--data-binary", "{}", &url("/v1/refunds")]);
    assert_eq!(code, "403", "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["reason"], "permission_denied", "{body}");
    let reached: Vec<(String, Option<String>)> = seen.lock().unwrap().clone();
    assert_eq!(
        reached,
        vec![("/v1/rates".to_string(), None), ("/v1/shipments".to_string(), Some(passport_id.clone()))],
        "what reached the service"
    );

    // Both logs, each verified with its own key, then linked.
    let agent_export = d.dir.path().join("agent-export.json");
    let out = d.cli(&["audit", "export", "--out", p(&agent_export)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let gate_export = d.dir.path().join("gate-export.json");
    let out = std::process::Command::new(sluice_e2e::daemon::sluice_bin())
        .args(["--config", p(&config), "gate", "audit", "export", "--out", p(&gate_export)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let host_pub = d.dir.path().join("state/host.pub");
    let gate_pub = gdir.join("gate.pub");
    let out = d.cli(&["audit", "verify", p(&gate_export), "--host-pub", p(&gate_pub)]);
    assert!(out.status.success(), "gate export: {}", String::from_utf8_lossy(&out.stdout));
    let out = d.cli(&[
        "audit",
        "link",
        p(&agent_export),
        p(&gate_export),
        "--agent-pub",
        p(&host_pub),
        "--gate-pub",
        p(&gate_pub),
        "--json",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "audit link: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let matched = report["matched"].as_array().unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(matched.len(), 1, "the credentialed call: {report:#}");
    drop(gate);

    // Settlement: both logs verify; the booking agrees at the catalog's price on both sides.
    let keys = ["--agent-pub", p(&host_pub), "--gate-pub", p(&gate_pub)];
    let settle = |agent: &Path, gate: &Path, extra: &[&str]| {
        let mut args = vec!["audit", "settle", p(agent), p(gate)];
        args.extend_from_slice(&keys);
        args.extend_from_slice(extra);
        let out = d.cli(&args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let json = args.contains(&"--json");
        let report: Value =
            if json { serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")) } else { Value::Null };
        (out.status.success(), report, format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
    };
    let (ok, r, text) = settle(&agent_export, &gate_export, &["--until", &cut, "--json"]);
    assert!(ok, "settle up to the booking: {text}");
    assert_eq!(r["agent_total"]["millicents"], PRICE, "{r:#}");
    assert_eq!(r["gate_total"]["millicents"], PRICE, "{r:#}");
    assert_eq!(r["agent_total"]["dollars"], "$0.02563", "{r:#}");
    assert_eq!(r["agreed"], 1, "{r:#}");
    let (ok, _, text) = settle(&agent_export, &gate_export, &["--until", &cut]);
    assert!(ok && text.contains("$0.02563") && text.contains("settled: OK"), "{text}");
    // The whole logs agree too: the refund never left the agent's host, so neither side charged it.
    let (ok, r, text) = settle(&agent_export, &gate_export, &["--json"]);
    assert!(ok, "{text}");
    assert_eq!((r["agreed"].as_u64(), r["differ"].as_array().map(Vec::len)), (Some(1), Some(0)), "{r:#}");

    // A record removed from the gate's export: its log does not verify, and settle says which
    // (the booking is the gate's last record when nothing after it reached the gate: then the
    // export is short of its checkpoint).
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&gate_export).unwrap()).unwrap();
    let booking = doc["records"]
        .as_array()
        .unwrap()
        .iter()
        .position(|r| {
            let text = r["record"].as_str().unwrap();
            text.contains("\"permission\":\"shipments:create\"") && text.contains("\"decision\":\"allow\"")
        })
        .expect("the gate's record of the booking");
    let mut cut_doc = doc.clone();
    cut_doc["records"].as_array_mut().unwrap().remove(booking);
    let edited = d.dir.path().join("gate-edited.json");
    std::fs::write(&edited, serde_json::to_vec(&cut_doc).unwrap()).unwrap();
    let (ok, _, text) = settle(&agent_export, &edited, &["--until", &cut]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("gate-edited.json: verification FAILED")
            && (text.contains(&format!("record {booking} is missing"))
                || (booking + 1 == doc["records"].as_array().unwrap().len() && text.contains("export truncated"))),
        "{text}"
    );
    assert!(text.contains("the gate's log") && text.contains("does not verify"), "{text}");

    // A price altered in the agent's export (still canonical JSON): its log does not verify.
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&agent_export).unwrap()).unwrap();
    let mut cheap = doc.clone();
    let mut altered = 0;
    for r in cheap["records"].as_array_mut().unwrap() {
        let text = r["record"].as_str().unwrap();
        if text.contains("\"action\":\"shipments:create\"") && text.contains("signed_request_hash") {
            r["record"] = text.replace(&format!("\"cost_millicents\":{PRICE}"), "\"cost_millicents\":1000").into();
            altered += 1;
        }
    }
    assert_eq!(altered, 1);
    let edited = d.dir.path().join("agent-edited.json");
    std::fs::write(&edited, serde_json::to_vec(&cheap).unwrap()).unwrap();
    let (ok, _, text) = settle(&edited, &gate_export, &["--until", &cut]);
    assert!(!ok, "{text}");
    assert!(text.contains("agent-edited.json: verification FAILED") && text.contains("root rebuilt"), "{text}");

    // An export cut by time (the agent's, since the cut): the gate's booking has no request in
    // it, and settle over the whole gate log names it with its evidence; from the cut on, both
    // sides agree (nothing charged).
    let since_cut = d.dir.path().join("agent-since.json");
    let out = d.cli(&["audit", "export", "--since", &cut, "--out", p(&since_cut)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let evidence = d.dir.path().join("evidence");
    let (ok, r, text) = settle(&since_cut, &gate_export, &["--json", "--evidence-dir", p(&evidence)]);
    assert!(!ok, "{text}");
    let one_sided = r["not_sent_by_this_host"].as_array().unwrap();
    assert_eq!(one_sided.len(), 1, "{r:#}");
    assert_eq!(one_sided[0]["gate"]["index"].as_u64(), Some(booking as u64), "{r:#}");
    assert_eq!(one_sided[0]["gate_charged_millicents"], PRICE, "{r:#}");
    assert!(one_sided[0]["gate_evidence"]["inclusion_proof"].is_array(), "{r:#}");
    let att = evidence.join(format!("gate-{booking}.json"));
    let out = d.cli(&["audit", "verify", p(&att), "--host-pub", p(&gate_pub)]);
    assert!(
        out.status.success(),
        "the evidence verifies with the gate's key: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let (ok, r, text) = settle(&since_cut, &gate_export, &["--since", &cut, "--json"]);
    assert!(ok, "{text}");
    assert_eq!((r["agreed"].as_u64(), r["differ"].as_array().map(Vec::len)), (Some(0), Some(0)), "{r:#}");
}
