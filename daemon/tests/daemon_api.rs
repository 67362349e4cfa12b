//! The daemon and its local API, driven through the CLI and raw HTTP: decisions and their
//! reasons, counters across restarts, revocation, holds, and the audit commands.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}
fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

fn register(d: &TestDaemon, i: &Issued) {
    let out = d.cli(&["passport", "register", p(&i.passport)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), i.id);
}

fn enforce(d: &TestDaemon, id: &str, action: &str, cost: u64, target: Option<&str>) -> Value {
    let (status, v) = d
        .call(
            "POST",
            "/v1/enforce",
            Some(json!({"passport_id": id, "action": action, "cost_cents": cost, "target": target})),
        )
        .unwrap();
    assert_eq!(status, 200, "{v}");
    v
}

const SHOPPER: &[&str] = &[
    "--permission",
    "llm:*",
    "--permission",
    "orders:read",
    "--constraint",
    "core:cost:max_per_action=500",
    "--constraint",
    "core:cost:max_cumulative=1000",
    "--constraint",
    "core:cost:approval_threshold=300",
    "--constraint",
    "core:scope:domain_allowlist=api.example.test,*.shop.test",
];

#[test]
fn decisions_carry_stable_reasons_and_actionable_details() {
    let d = TestDaemon::start("");
    let i = issue(d.dir.path(), "shopper", SHOPPER);
    register(&d, &i);

    let v = enforce(&d, &i.id, "llm:chat", 200, Some("api.example.test"));
    assert_eq!(v["decision"], "allow", "{v}");
    assert_eq!(v["all_passed"], true);
    assert!(v["attestation_id"].as_u64().is_some());
    assert!(v["guardrails_evaluated"].as_array().is_some_and(|g| !g.is_empty()));

    let v = enforce(&d, &i.id, "orders:write", 0, Some("api.example.test"));
    assert_eq!((v["decision"].as_str(), v["reason"].as_str()), (Some("block"), Some("permission_denied")), "{v}");

    let v = enforce(&d, &i.id, "llm:chat", 10, Some("evil.example"));
    assert_eq!(v["reason"], "domain_not_allowed", "{v}");
    let v = enforce(&d, &i.id, "llm:chat", 10, Some("evilshop.test"));
    assert_eq!(v["reason"], "domain_not_allowed", "{v}");
    let v = enforce(&d, &i.id, "llm:chat", 10, Some("a.shop.test"));
    assert_eq!(v["decision"], "allow", "{v}");

    let v = enforce(&d, &i.id, "llm:chat", 600, Some("api.example.test"));
    assert_eq!(v["reason"], "per_action_limit_exceeded", "{v}");

    let v = enforce(&d, &i.id, "llm:chat", 250, Some("api.example.test"));
    assert_eq!(v["decision"], "allow", "{v}");
    // 200 + 10 + 250 = 460 spent; 460 + 290 = 750 fine, then 750 + 290 > 1000.
    assert_eq!(enforce(&d, &i.id, "llm:chat", 290, None)["decision"], "allow");
    let v = enforce(&d, &i.id, "llm:chat", 290, None);
    assert_eq!(v["reason"], "spend_limit_exceeded", "{v}");
    let detail = v["detail"].as_str().unwrap();
    assert!(detail.contains("$10.00") && detail.contains("$7.50") && detail.contains("$2.90"), "{detail}");

    let (status, state) = d.call("GET", &format!("/v1/passports/{}/state", i.id), None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(state["daily_cost_cents"], 750, "{state}");
    assert_eq!(state["daily_cost_limit_cents"], 1000, "{state}");

    // A passport nobody registered.
    let v = enforce(&d, "pp_00000000000000000000000000000000", "llm:chat", 1, None);
    assert_eq!(v["reason"], "passport_unknown", "{v}");
    // Malformed input is an error, not a decision.
    let (status, _) = d.call("POST", "/v1/enforce", Some(json!({"passport_id": "nope", "action": "x"}))).unwrap();
    assert_eq!(status, 400);
    let (status, e) =
        d.call("POST", "/v1/enforce", Some(json!({"passport_id": i.id, "action": "x", "bogus": 1}))).unwrap();
    assert_eq!(status, 400, "{e}");
}

#[test]
fn counters_and_revocations_survive_restarts() {
    let mut d = TestDaemon::start("");
    let i = issue(d.dir.path(), "keeper", &["--permission", "*", "--constraint", "core:cost:max_cumulative=500"]);
    register(&d, &i);
    assert_eq!(enforce(&d, &i.id, "x:y", 400, None)["decision"], "allow");
    d.kill();
    d.spawn();
    let v = enforce(&d, &i.id, "x:y", 200, None);
    assert_eq!(v["reason"], "spend_limit_exceeded", "a restart must never reset a budget: {v}");

    let out = d.cli(&["passport", "revoke", &i.id, "--note", "compromised"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(enforce(&d, &i.id, "x:y", 1, None)["reason"], "passport_revoked");
    d.stop();
    d.spawn();
    assert_eq!(enforce(&d, &i.id, "x:y", 1, None)["reason"], "passport_revoked");
    // Registering a revoked passport again is refused.
    let out = d.cli(&["passport", "register", p(&i.passport)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("revoked"), "{}", stderr(&out));
}

#[test]
fn state_and_reset_through_the_cli() {
    let d = TestDaemon::start("");
    let i = issue(d.dir.path(), "resetter", &["--permission", "*", "--constraint", "core:cost:max_cumulative=300"]);
    register(&d, &i);
    assert_eq!(enforce(&d, &i.id, "a:b", 300, None)["decision"], "allow");
    assert_eq!(enforce(&d, &i.id, "a:b", 1, None)["reason"], "spend_limit_exceeded");
    let out = d.cli(&["state", &i.id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("$3.00 of $3.00"), "{}", stdout(&out));
    let out = d.cli(&["state", "reset", &i.id, "--window", "all"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(enforce(&d, &i.id, "a:b", 1, None)["decision"], "allow");
    let out = d.cli(&["state", "reset", &i.id, "--window", "yearly"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("yearly"));
}

/// Client commands find the daemon through `--config` alone (its `[api] socket`), with
/// `--socket` and `$SLUICE_SOCKET` still taking precedence, and say which file is at fault when
/// the configuration cannot be read.
#[test]
fn client_commands_find_the_socket_from_the_config() {
    let d = TestDaemon::start("");
    let i = issue(d.dir.path(), "located", &["--permission", "*"]);
    let run = |args: &[&str], env: Option<&str>| {
        let mut c = std::process::Command::new(bin());
        c.args(args).env_remove("SLUICE_SOCKET");
        if let Some(v) = env {
            c.env("SLUICE_SOCKET", v);
        }
        c.output().unwrap()
    };
    let out = run(&["--config", p(&d.config), "passport", "register", p(&i.passport)], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), i.id);
    let out = run(&["--config", p(&d.config), "state", &i.id], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&i.id), "{}", stdout(&out));

    // The flag and the variable come before the configuration.
    let nowhere = d.dir.path().join("nowhere.sock");
    let out = run(&["--config", p(&d.config), "--socket", p(&nowhere), "state", &i.id], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nowhere.sock"), "{}", stderr(&out));
    let out = run(&["--config", p(&d.config), "state", &i.id], Some(p(&nowhere)));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nowhere.sock"), "{}", stderr(&out));
    let out = run(&["--config", "/nonexistent/sluice.toml", "--socket", p(&d.socket), "state", &i.id], None);
    assert!(out.status.success(), "--socket needs no readable config: {}", stderr(&out));

    // A named configuration that cannot be read is an error naming it, never a silent default.
    let out = run(&["--config", "/nonexistent/sluice.toml", "state", &i.id], None);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("/nonexistent/sluice.toml") && err.contains("--socket"), "{err}");
    let broken = d.dir.path().join("broken.toml");
    std::fs::write(&broken, "state_dir = 7\n").unwrap();
    let out = run(&["--config", p(&broken), "holds"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("broken.toml"), "{}", stderr(&out));
    // Commands that never talk to the daemon do not read it.
    let out = run(&["--config", p(&broken), "passport", "inspect", p(&i.passport)], None);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Fractions of a cent through the binary: `--cost-cents 0.005` and `cost_millicents`, the
/// state's exact and rounded-up figures, the CLI's dollars, a fractional hold, and a restart that
/// neither resets nor rounds the spend.
#[test]
fn fractions_of_a_cent_through_the_api_and_the_cli() {
    let mut d = TestDaemon::start("");
    let i = issue(
        d.dir.path(),
        "frugal",
        &[
            "--permission",
            "llm:*",
            "--constraint",
            "core:cost:max_cumulative=1",
            "--constraint",
            "core:cost:approval_threshold=0",
        ],
    );
    register(&d, &i);
    let out = d.cli(&["enforce", "--passport-id", &i.id, "--action", "llm:chat", "--cost-cents", "0.005"]);
    // The threshold is 0 cents: any cost above it waits for an operator.
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let out = d.cli(&["holds"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("llm:chat   $0.00005  expires"), "{}", stdout(&out));
    let (_, holds) = d.call("GET", "/v1/holds", None).unwrap();
    let request = &holds["holds"][0]["request"];
    assert_eq!((request["cost_cents"].as_u64(), request["cost_millicents"].as_u64()), (Some(1), Some(5)), "{holds}");
    let hold = holds["holds"][0]["id"].as_str().unwrap().to_string();
    let out = d.cli(&["holds", "approve", &hold]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Exact millicents through the API: 5 + 37 = 42 millicents spent.
    let i2 = issue(d.dir.path(), "frugal2", &["--permission", "llm:*", "--constraint", "core:cost:max_cumulative=1"]);
    register(&d, &i2);
    let cost = |m: u64| json!({"passport_id": i2.id, "action": "llm:chat", "cost_millicents": m});
    assert_eq!(d.call("POST", "/v1/enforce", Some(cost(5))).unwrap().1["decision"], "allow");
    assert_eq!(d.call("POST", "/v1/enforce", Some(cost(37))).unwrap().1["decision"], "allow");
    let (status, e) = d
        .call(
            "POST",
            "/v1/enforce",
            Some(json!({"passport_id": i2.id, "action": "llm:chat", "cost_cents": 1, "cost_millicents": 5})),
        )
        .unwrap();
    assert_eq!(status, 400, "both units at once is an error: {e}");

    let show = |d: &TestDaemon, id: &str| {
        let (_, state) = d.call("GET", &format!("/v1/passports/{id}/state"), None).unwrap();
        let out = d.cli(&["state", id]);
        assert!(out.status.success(), "{}", stderr(&out));
        (state, stdout(&out))
    };
    let (state, text) = show(&d, &i2.id);
    assert_eq!(
        (state["daily_cost_millicents"].as_u64(), state["daily_cost_cents"].as_u64()),
        (Some(42), Some(1)),
        "{state}"
    );
    assert!(text.contains("today           $0.00042 of $0.01"), "{text}");
    // 42 + 958 reaches the 1-cent budget exactly; one millicent more does not fit.
    assert_eq!(d.call("POST", "/v1/enforce", Some(cost(958))).unwrap().1["decision"], "allow");
    let (_, v) = d.call("POST", "/v1/enforce", Some(cost(1))).unwrap();
    assert_eq!(v["reason"], "spend_limit_exceeded", "{v}");
    assert_eq!(v["detail"], "Daily spend limit of $0.01 would be exceeded. Current: $0.01, Requested: $0.00001");

    // A restart keeps every millicent.
    d.kill();
    d.spawn();
    let (state, _) = show(&d, &i2.id);
    assert_eq!(state["daily_cost_millicents"].as_u64(), Some(1_000), "{state}");
    let (state, text) = show(&d, &i.id);
    assert_eq!(state["daily_cost_millicents"].as_u64(), Some(5), "{state}");
    assert!(text.contains("today           $0.00005 of $0.01"), "{text}");
}

#[test]
fn enforce_cli_exit_codes() {
    let d = TestDaemon::start("");
    let i = issue(d.dir.path(), "cli", SHOPPER);
    register(&d, &i);
    let out = d.cli(&["enforce", "--passport-id", &i.id, "--action", "llm:chat", "--cost-cents", "100"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["decision"], "allow");
    let out = d.cli(&["enforce", "--passport-id", &i.id, "--action", "nope:x"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("permission_denied"));
    let out = d.cli(&["enforce", "--passport-id", &i.id, "--action", "llm:chat", "--cost-cents", "400"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(stderr(&out).contains("sluice holds approve hold_"), "{}", stderr(&out));
}

#[test]
fn holds_are_approved_denied_and_time_out_with_attested_approvers() {
    let d = TestDaemon::start("[holds]\ntimeout_secs = 2\n");
    let i = issue(d.dir.path(), "holder", SHOPPER);
    register(&d, &i);

    let v = enforce(&d, &i.id, "llm:chat", 400, None);
    assert_eq!(
        (v["decision"].as_str(), v["reason"].as_str()),
        (Some("request_hold"), Some("approval_threshold_exceeded")),
        "{v}"
    );
    let hold = v["approval_request_id"].as_str().unwrap().to_string();
    let out = d.cli(&["holds"]);
    assert!(stdout(&out).contains(&hold), "{}", stdout(&out));
    let out = d.cli(&["holds", "approve", &hold, "--note", "fine", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!((r["decision"].as_str(), r["reason"].as_str()), (Some("allow"), Some("hold_approved")), "{r}");
    // Approving twice is refused.
    let out = d.cli(&["holds", "approve", &hold]);
    assert_eq!(out.status.code(), Some(1));
    let (_, state) = d.call("GET", &format!("/v1/passports/{}/state", i.id), None).unwrap();
    assert_eq!(state["daily_cost_cents"], 400, "approval spends: {state}");

    let v = enforce(&d, &i.id, "llm:chat", 350, None);
    let hold2 = v["approval_request_id"].as_str().unwrap().to_string();
    let out = d.cli(&["holds", "deny", &hold2, "--json"]);
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(r["reason"], "hold_denied", "{r}");

    // Approval re-checks limits: spend 400 + 350 + a 290 allow = 1040 > 1000 once approved.
    let v = enforce(&d, &i.id, "llm:chat", 350, None);
    let hold3 = v["approval_request_id"].as_str().unwrap().to_string();
    assert_eq!(enforce(&d, &i.id, "llm:chat", 290, None)["decision"], "allow");
    let out = d.cli(&["holds", "approve", &hold3, "--json"]);
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(r["reason"], "spend_limit_exceeded", "{r}");

    let v = enforce(&d, &i.id, "llm:chat", 310, None);
    let hold4 = v["approval_request_id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(3500));
    let (_, h) = d.call("GET", &format!("/v1/holds/{hold4}"), None).unwrap();
    assert_eq!(h["status"], "timed_out", "{h}");

    // The log has each resolution, linked to its hold record and naming who resolved it.
    let (_, recs) = d.call("GET", &format!("/v1/attestations?passport_id={}", i.id), None).unwrap();
    let recs: Vec<Value> = recs["records"].as_array().unwrap().iter().map(record).collect();
    let resolutions: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "hold_resolution").collect();
    assert_eq!(resolutions.len(), 4, "{recs:?}");
    let approved = resolutions.iter().find(|r| r["hold_id"] == hold.as_str()).unwrap();
    assert_eq!(approved["note"], "fine");
    assert_eq!(approved["by"]["uid"], nix::unistd::getuid().as_raw());
    assert!(approved["hold_record"].as_u64().is_some());
}

/// Records come back either as objects or as canonical JSON strings; read both.
fn record(r: &Value) -> Value {
    match r.get("record") {
        Some(Value::String(s)) => serde_json::from_str(s).unwrap(),
        Some(v) => v.clone(),
        None => r.clone(),
    }
}

#[test]
fn bad_cel_rules_are_refused_at_registration() {
    let d = TestDaemon::start("");
    let f = d.dir.path().join("rules.json");
    std::fs::write(&f, r#"{"core:cel:rules": [{"expr": "cost_cents > ", "decision": "block", "reason": "broken"}]}"#)
        .unwrap();
    let i = issue(d.dir.path(), "celbad", &["--permission", "*", "--constraints-file", p(&f)]);
    let out = d.cli(&["passport", "register", p(&i.passport)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cost_cents >"), "{}", stderr(&out));
}

#[test]
fn audit_export_proof_and_verify_round_trip() {
    let d = TestDaemon::start("");
    let i = issue(d.dir.path(), "auditee", SHOPPER);
    register(&d, &i);
    for cost in [10, 20, 600, 30] {
        enforce(&d, &i.id, "llm:chat", cost, None);
    }
    let host_pub = d.state_dir().join("host.pub");
    let export = d.dir.path().join("export.json");
    let out = d.cli(&["audit", "export", "--out", p(&export)]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Streamed: the members first, then one record per line; the CLI counted them on the way.
    let text = std::fs::read_to_string(&export).unwrap();
    let records = text.lines().filter(|l| l.starts_with(r#"{"index":"#)).count();
    assert!(text.starts_with(r#"{"format":"sluice-audit-export/v1","#), "{text}");
    assert!(stdout(&out).contains(&format!("exported {records} record(s)")), "{}", stdout(&out));
    // Never overwritten, and nothing else is left behind.
    let again = d.cli(&["audit", "export", "--out", p(&export)]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("already exists"), "{}", stderr(&again));
    assert_eq!(std::fs::read_to_string(&export).unwrap(), text);
    let out = d.cli(&["audit", "verify", p(&export), "--host-pub", p(&host_pub)]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("verified: OK"));
    // --json: standard output is one JSON document, nothing after it.
    let out = d.cli(&["audit", "verify", p(&export), "--host-pub", p(&host_pub), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("--json prints only JSON");
    assert_eq!(report["ok"], true);
    assert_eq!(report["problems"], json!([]));

    let one = d.dir.path().join("one.json");
    let out = d.cli(&["audit", "export", "--passport", &i.id, "--out", p(&one)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(d.cli(&["audit", "verify", p(&one), "--host-pub", p(&host_pub)]).status.success());

    let v = enforce(&d, &i.id, "llm:chat", 5, None);
    let proof = d.dir.path().join("proof.json");
    let id = v["attestation_id"].to_string();
    let out = d.cli(&["audit", "proof", &id, "--out", p(&proof)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.cli(&["audit", "verify", p(&proof), "--host-pub", p(&host_pub)]);
    assert!(out.status.success(), "{}", stdout(&out));

    // Raise a cost inside the export: verification must fail and say where.
    let text = std::fs::read_to_string(&export).unwrap();
    let tampered = text.replacen("\\\"cost_millicents\\\":10000", "\\\"cost_millicents\\\":1000", 1);
    assert_ne!(tampered, text, "the export should contain the cost to tamper with");
    let bad = d.dir.path().join("bad.json");
    std::fs::write(&bad, tampered).unwrap();
    let out = d.cli(&["audit", "verify", p(&bad), "--host-pub", p(&host_pub)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("PROBLEM"), "{}", stdout(&out));
}

#[test]
fn callers_outside_the_api_group_are_refused() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("SKIPPED: needs root to run a caller as another uid");
        return;
    }
    let d = TestDaemon::start("");
    // Let "nobody" reach the socket file, so the refusal tested is the daemon's own check.
    use std::os::unix::fs::PermissionsExt;
    for dir in [d.dir.path().to_path_buf(), d.dir.path().join("run")] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new(bin())
        .args(["--socket", p(&d.socket), "holds"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("neither root nor a member"), "{}", stderr(&out));
}

#[test]
fn l3_passports_register_only_with_proof_of_possession() {
    let d = TestDaemon::start("");
    let i = issue(d.dir.path(), "l3agent", &["--permission", "*", "--tier", "L3"]);
    // Pin the issuer: an L3 passport needs a verifier with pinned issuers.
    let text =
        std::fs::read_to_string(&d.config).unwrap() + &format!("[trust]\nissuers = [\"{}\"]\n", p(&i.issuer_pub));
    std::fs::write(&d.config, text).unwrap();
    let mut d = d;
    d.kill();
    d.spawn();
    let key = format!("{}.key", i.passport.display());
    let hidden = format!("{key}.hidden");
    std::fs::rename(&key, &hidden).unwrap();
    let out = d.cli(&["passport", "register", p(&i.passport)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("agent key"), "{}", stderr(&out));
    // Without the CLI's help: a raw registration without a proof is refused by the daemon itself.
    let token = std::fs::read_to_string(&i.passport).unwrap();
    let (status, e) = d.call("POST", "/v1/passports", Some(json!({"passport": token.trim()}))).unwrap();
    assert_eq!(status, 400, "{e}");
    assert!(e["message"].as_str().unwrap().contains("proof of possession"), "{e}");
    // Another agent's key does not prove anything.
    let other = issue(d.dir.path(), "other", &["--permission", "*"]);
    let out = d.cli(&["passport", "register", p(&i.passport), "--key", &format!("{}.key", other.passport.display())]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not the one the passport names"), "{}", stderr(&out));
    std::fs::rename(&hidden, &key).unwrap();
    let out = d.cli(&["passport", "register", p(&i.passport)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), i.id);
}

#[test]
fn host_policy_denials_and_cel_rules_bind_api_decisions_and_records_carry_the_policy_digest() {
    let d = TestDaemon::start("");
    let policies = d.dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("host.toml"),
        "[host]\ndeny_domains = [\"pastebin.example\"]\n\n[host.ceilings]\nmax_per_action_cents = 500\n\n[[host.rule]]\nexpr = \"cost_cents > 100\"\ndecision = \"request_hold\"\nreason = \"costly_action\"\n\n[[host.rule]]\nexpr = \"request.method == 'DELETE' || action == 'files:delete'\"\ndecision = \"block\"\nreason = \"no_deletes\"\n",
    )
    .unwrap();
    let mut d = d;
    d.kill();
    d.spawn();
    let i = issue(d.dir.path(), "hosted", &["--permission", "*"]);
    register(&d, &i);
    let v = enforce(&d, &i.id, "web:fetch", 0, Some("pastebin.example"));
    assert_eq!((v["decision"].as_str(), v["reason"].as_str()), (Some("block"), Some("policy_denied")), "{v}");
    let v = enforce(&d, &i.id, "llm:chat", 150, Some("api.example.test"));
    assert_eq!((v["decision"].as_str(), v["reason"].as_str()), (Some("request_hold"), Some("costly_action")), "{v}");
    let v = enforce(&d, &i.id, "files:delete", 0, Some("api.example.test"));
    assert_eq!((v["decision"].as_str(), v["reason"].as_str()), (Some("block"), Some("no_deletes")), "{v}");
    let v = enforce(&d, &i.id, "llm:chat", 50, Some("api.example.test"));
    assert_eq!(v["decision"], "allow", "{v}");
    // The host-wide ceiling binds with or without a target.
    let v = enforce(&d, &i.id, "llm:chat", 600, Some("api.example.test"));
    assert_eq!((v["decision"].as_str(), v["reason"].as_str()), (Some("block"), Some("policy_denied")), "{v}");
    let v = enforce(&d, &i.id, "llm:chat", 600, None);
    assert_eq!((v["decision"].as_str(), v["reason"].as_str()), (Some("block"), Some("policy_denied")), "{v}");
    assert!(v["detail"].as_str().unwrap().contains("host-wide ceiling"), "{v}");
    let (_, recs) = d.call("GET", &format!("/v1/attestations?passport_id={}", i.id), None).unwrap();
    let decisions: Vec<Value> =
        recs["records"].as_array().unwrap().iter().map(record).filter(|r| r["kind"] == "decision").collect();
    assert_eq!(decisions.len(), 6);
    for r in &decisions {
        assert!(r["policy_digest"].as_str().is_some_and(|s| s.starts_with("sha256:")), "{r}");
    }
    // A host rule that does not compile stops the daemon from starting, naming file and line.
    std::fs::write(
        policies.join("bad.toml"),
        "[host]\n[[host.rule]]\nexpr = \"cost_cents >\"\ndecision = \"block\"\nreason = \"broken\"\n",
    )
    .unwrap();
    d.kill();
    let out = d.cli(&["daemon"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("bad.toml:3"), "{}", stderr(&out));
}

/// Issue 14: a hold approved after a reload that tightened the host policy is decided under the
/// policy in force at approval, through the daemon's own reload path (SIGHUP), and the log says
/// so: the approval is a block with the policy's reason, under the new policy's digest.
#[test]
fn an_approval_after_a_policy_reload_is_decided_under_the_new_policy() {
    let mut d = TestDaemon::start("");
    let policies = d.dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("host.toml"), "[host]\ndeny_domains = [\"pastebin.example\"]\n").unwrap();
    d.kill();
    d.spawn();
    let i = issue(d.dir.path(), "reloaded", SHOPPER);
    register(&d, &i);
    let held = |d: &TestDaemon| {
        let v = enforce(d, &i.id, "llm:chat", 400, Some("api.example.test"));
        assert_eq!(v["decision"], "request_hold", "{v}");
        v["approval_request_id"].as_str().unwrap().to_string()
    };
    let first = held(&d);
    let second = held(&d);

    // The operator denies the host while both requests wait, and tells the daemon.
    std::fs::write(policies.join("host.toml"), "[host]\ndeny_domains = [\"pastebin.example\", \"api.example.test\"]\n")
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(d.pid().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let new_digest = loop {
        let (_, recs) = d.call("GET", "/v1/attestations", None).unwrap();
        let reload = recs["records"].as_array().unwrap().iter().map(record).find(|r| r["kind"] == "policy_reload");
        if let Some(r) = reload {
            assert_eq!(r["ok"], true, "{r}");
            break r["policy_digest"].as_str().unwrap().to_string();
        }
        assert!(std::time::Instant::now() < deadline, "no policy_reload record: {}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    };

    let out = d.cli(&["holds", "approve", &first, "--note", "was fine before", "--json"]);
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!((r["decision"].as_str(), r["reason"].as_str()), (Some("block"), Some("policy_denied")), "{r}");
    assert_eq!(r["hold_status"], "denied", "{r}");
    let detail = r["detail"].as_str().unwrap();
    assert!(detail.contains("at approval") && detail.contains("host.toml"), "{detail}");
    let (_, h) = d.call("GET", &format!("/v1/holds/{first}"), None).unwrap();
    assert_eq!((h["status"].as_str(), h["resolution"]["reason"].as_str()), (Some("denied"), Some("policy_denied")));
    let (_, state) = d.call("GET", &format!("/v1/passports/{}/state", i.id), None).unwrap();
    assert_eq!(state["daily_cost_cents"], 0, "a refused approval spends nothing: {state}");

    // The resolution is attested under the policy it was checked against.
    let (_, recs) = d.call("GET", &format!("/v1/attestations?passport_id={}", i.id), None).unwrap();
    let recs: Vec<Value> = recs["records"].as_array().unwrap().iter().map(record).collect();
    let resolution = recs.iter().find(|r| r["kind"] == "hold_resolution" && r["hold_id"] == first.as_str()).unwrap();
    assert_eq!(
        (resolution["decision"].as_str(), resolution["policy_digest"].as_str()),
        (Some("block"), Some(new_digest.as_str())),
        "{resolution}"
    );
    assert_eq!(resolution["note"], "was fine before");

    // Loosened again, the other waiting request is approved under the policy in force then.
    std::fs::write(policies.join("host.toml"), "[host]\ndeny_domains = [\"pastebin.example\"]\n").unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, recs) = d.call("GET", "/v1/attestations", None).unwrap();
        let reloads = recs["records"].as_array().unwrap().iter().map(record).filter(|r| r["kind"] == "policy_reload");
        if reloads.count() >= 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no second policy_reload record: {}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = d.cli(&["holds", "approve", &second, "--json"]);
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!((r["decision"].as_str(), r["reason"].as_str()), (Some("allow"), Some("hold_approved")), "{r}");
    let export = d.dir.path().join("export.json");
    assert!(d.cli(&["audit", "export", "--out", p(&export)]).status.success());
    let host_pub = d.state_dir().join("host.pub");
    let out = d.cli(&["audit", "verify", p(&export), "--host-pub", p(&host_pub)]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
}

/// The emergency stop through the CLI and the API: a stopped passport's requests and holds are
/// refused with `emergency_stop`, another passport is unaffected, both commands are attested,
/// the stop survives a restart (and a SIGKILL), and `resume` lifts it. Bad bodies name the field.
#[test]
fn emergency_stop_and_resume_through_the_cli_and_the_api() {
    let mut d = TestDaemon::start("");
    let a = issue(d.dir.path(), "stopped", SHOPPER);
    let b = issue(d.dir.path(), "bystander", SHOPPER);
    register(&d, &a);
    register(&d, &b);
    let held = enforce(&d, &a.id, "llm:chat", 400, None);
    let hold = held["approval_request_id"].as_str().unwrap().to_string();

    let out = d.cli(&["stop", "--passport", &a.id, "--note", "runaway loop", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!((r["scope"].as_str(), r["already_stopped"].as_bool()), (Some("passport"), Some(false)), "{r}");
    assert_eq!(r["holds_denied"], json!([hold]), "{r}");
    assert_eq!(r["kernel"], false, "a passport-only daemon has no kernel map: {r}");
    let (_, h) = d.call("GET", &format!("/v1/holds/{hold}"), None).unwrap();
    assert_eq!(h["status"], "denied", "{h}");

    let v = enforce(&d, &a.id, "llm:chat", 1, None);
    assert_eq!((v["decision"].as_str(), v["reason"].as_str()), (Some("block"), Some("emergency_stop")), "{v}");
    assert_eq!(enforce(&d, &b.id, "llm:chat", 1, None)["decision"], "allow");

    let (status, stops) = d.call("GET", "/v1/stops", None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(stops["passports"][0]["passport_id"], a.id.as_str(), "{stops}");
    assert_eq!(stops["passports"][0]["note"], "runaway loop", "{stops}");
    let out = d.cli(&["stop", "--list"]);
    assert!(stdout(&out).contains(&a.id) && stdout(&out).contains("runaway loop"), "{}", stdout(&out));

    // Durable: a SIGKILL and a restart keep it.
    d.kill();
    d.spawn();
    assert_eq!(enforce(&d, &a.id, "llm:chat", 1, None)["reason"], "emergency_stop");

    // --all stops b too; resume --all leaves a stopped by name.
    let out = d.cli(&["stop", "--all"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(enforce(&d, &b.id, "llm:chat", 1, None)["reason"], "emergency_stop");
    let out = d.cli(&["resume", "--all"]);
    assert!(stdout(&out).contains("still stopped") && stdout(&out).contains(&a.id), "{}", stdout(&out));
    assert_eq!(enforce(&d, &b.id, "llm:chat", 1, None)["decision"], "allow");
    let out = d.cli(&["resume", "--passport", &a.id, "--note", "fixed"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(enforce(&d, &a.id, "llm:chat", 1, None)["decision"], "allow");

    // Attested: on a's chain and the host chain, with who and why.
    let (_, recs) = d.call("GET", &format!("/v1/attestations?passport_id={}", a.id), None).unwrap();
    let recs: Vec<Value> = recs["records"].as_array().unwrap().iter().map(record).collect();
    let kinds: Vec<&str> = recs.iter().filter_map(|r| r["kind"].as_str()).collect();
    assert!(kinds.contains(&"emergency_stop") && kinds.contains(&"emergency_resume"), "{kinds:?}");
    let stop = recs.iter().find(|r| r["kind"] == "emergency_stop").unwrap();
    assert_eq!((stop["note"].as_str(), stop["scope"].as_str()), (Some("runaway loop"), Some("passport")));
    assert_eq!(stop["by"]["uid"], nix::unistd::getuid().as_raw());
    let out = d.cli(&["audit", "export", "--out", p(&d.dir.path().join("log.json"))]);
    assert!(out.status.success(), "{}", stderr(&out));
    let host_pub = d.state_dir().join("host.pub");
    let out = d.cli(&["audit", "verify", p(&d.dir.path().join("log.json")), "--host-pub", p(&host_pub)]);
    assert!(out.status.success(), "{} {}", stdout(&out), stderr(&out));

    // Bad requests name what is wrong.
    for (body, field) in [
        (json!({}), "passport_id"),
        (json!({"all": true, "passport_id": a.id}), "either"),
        (json!({"passport_id": "nonsense"}), "passport_id"),
        (json!({"all": true, "extra": 1}), "unknown field"),
    ] {
        let (status, v) = d.call("POST", "/v1/stop", Some(body.clone())).unwrap();
        assert_eq!(status, 400, "{body}: {v}");
        assert!(v["message"].as_str().unwrap().contains(field), "{body}: {v}");
    }
    let out = d.cli(&["stop"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses a stop without a scope");
}
