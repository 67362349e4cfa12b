//! The `sluice issuer` and `sluice passport` commands, run as the real binary: exit codes,
//! messages, files and modes.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sluice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice")).args(args).output().expect("run sluice")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    issuer_key: PathBuf,
    issuer_pub: PathBuf,
    issuer_id: String,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let out = sluice(&["issuer", "init", "--dir", p(&root.join("iss")), "--name", "Test issuer"]);
    assert!(out.status.success(), "{}", stderr(&out));
    Setup {
        issuer_key: root.join("iss/issuer.key"),
        issuer_pub: root.join("iss/issuer.pub"),
        issuer_id: stdout(&out),
        root,
        _dir: dir,
    }
}

fn issue(s: &Setup, name: &str, extra: &[&str]) -> (Output, PathBuf) {
    let out_path = s.root.join(name);
    let mut args = vec!["passport", "issue", "--issuer-key", p(&s.issuer_key), "--agent-id", "agent-1", "--out"];
    args.push(p(&out_path));
    args.extend_from_slice(extra);
    (sluice(&args), out_path)
}

#[test]
fn issuer_init_writes_keys_with_safe_modes_and_prints_the_id() {
    let s = setup();
    assert!(s.issuer_id.starts_with("iss_") && s.issuer_id.len() == 47, "{}", s.issuer_id);
    assert_eq!(std::fs::metadata(&s.issuer_key).unwrap().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(s.root.join("iss")).unwrap().mode() & 0o777, 0o700);
    let key = sluice::keyfile::load_public_key(&s.issuer_pub).unwrap();
    assert_eq!(sluice::passport::IssuerId::from_key(&key).as_str(), s.issuer_id);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.root.join("iss/issuer.json")).unwrap()).unwrap();
    assert_eq!(meta["name"], "Test issuer");
}

#[test]
fn issuer_init_refuses_to_overwrite() {
    let s = setup();
    let before = std::fs::read(&s.issuer_key).unwrap();
    let out = sluice(&["issuer", "init", "--dir", p(&s.root.join("iss"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("refusing to overwrite"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&s.issuer_key).unwrap(), before);
}

#[test]
fn issue_then_verify_then_tamper() {
    let s = setup();
    let (out, path) = issue(
        &s,
        "a.jwt",
        &[
            "--permission",
            "llm:*",
            "--constraint",
            "core:cost:max_per_action=500",
            "--constraint",
            "core:scope:domain_allowlist=api.example.com,*.example.org",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out);
    assert!(id.starts_with("pp_"), "{id}");
    let key_path = PathBuf::from(format!("{}.key", path.display()));
    assert_eq!(std::fs::metadata(&key_path).unwrap().mode() & 0o777, 0o600);

    let v = sluice(&["passport", "verify", p(&path), "--json"]);
    assert!(v.status.success(), "{}", stderr(&v));
    let j: serde_json::Value = serde_json::from_str(&stdout(&v)).unwrap();
    assert_eq!(j["passport_id"], id.as_str());
    assert_eq!(j["claims"]["constraints"]["core:scope:domain_allowlist"][1], "*.example.org");
    // cnf.jkt binds the agent key written beside the passport.
    let agent = sluice::keyfile::load_signing_key(&key_path).unwrap();
    assert_eq!(j["claims"]["cnf"]["jkt"], sluice::passport::jwk::okp_thumbprint(&agent.verifying_key()).as_str());

    // Raise the spend limit in the payload, keep the signature.
    let token = std::fs::read_to_string(&path).unwrap();
    let parts: Vec<&str> = token.trim().split('.').collect();
    let payload = sluice::passport::b64::decode(parts[1]).unwrap();
    let forged_payload = String::from_utf8(payload).unwrap().replace(":500", ":500000");
    let forged = format!("{}.{}.{}", parts[0], sluice::passport::b64::encode(forged_payload.as_bytes()), parts[2]);
    let forged_path = s.root.join("forged.jwt");
    std::fs::write(&forged_path, forged).unwrap();
    let v = sluice(&["passport", "verify", p(&forged_path)]);
    assert_eq!(v.status.code(), Some(1));
    assert!(stderr(&v).contains("signature does not verify"), "{}", stderr(&v));
}

#[test]
fn inspect_marks_claims_unverified() {
    let s = setup();
    let (out, path) = issue(&s, "a.jwt", &["--agent-name", "Shopper"]);
    assert!(out.status.success());
    let i = sluice(&["passport", "inspect", p(&path)]);
    assert!(i.status.success());
    assert!(stdout(&i).starts_with("UNVERIFIED"), "{}", stdout(&i));
    assert!(stdout(&i).contains("Shopper"));
    let j = sluice(&["passport", "inspect", p(&path), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&j)).unwrap();
    assert_eq!(v["verified"], false);
    assert_eq!(v["claims"]["sub"], "agent-1");
}

#[test]
fn verify_pins_issuers_when_asked() {
    let s = setup();
    let (_, path) = issue(&s, "a.jwt", &[]);
    let other = s.root.join("other");
    assert!(sluice(&["issuer", "init", "--dir", p(&other)]).status.success());
    let v = sluice(&["passport", "verify", p(&path), "--issuer-pub", p(&other.join("issuer.pub"))]);
    assert_eq!(v.status.code(), Some(1));
    assert!(stderr(&v).contains("not one of the trusted issuers"), "{}", stderr(&v));
    let v = sluice(&[
        "passport",
        "verify",
        p(&path),
        "--issuer-pub",
        p(&other.join("issuer.pub")),
        "--issuer-pub",
        p(&s.issuer_pub),
    ]);
    assert!(v.status.success(), "{}", stderr(&v));
}

#[test]
fn l2_passports_need_a_pinned_issuer() {
    let s = setup();
    let (out, path) = issue(&s, "a.jwt", &["--tier", "L2"]);
    assert!(out.status.success());
    let v = sluice(&["passport", "verify", p(&path)]);
    assert_eq!(v.status.code(), Some(1));
    assert!(stderr(&v).contains("--issuer-pub"), "{}", stderr(&v));
    assert!(sluice(&["passport", "verify", p(&path), "--issuer-pub", p(&s.issuer_pub)]).status.success());
}

#[test]
fn a_key_file_readable_by_others_is_refused() {
    let s = setup();
    std::fs::set_permissions(&s.issuer_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (out, path) = issue(&s, "a.jwt", &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("chmod 600") && err.contains("issuer.key"), "{err}");
    assert!(!path.exists());
}

#[test]
fn an_existing_output_file_is_not_overwritten() {
    let s = setup();
    let existing = s.root.join("a.jwt");
    std::fs::write(&existing, "keep me").unwrap();
    let (out, _) = issue(&s, "a.jwt", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("refusing to overwrite"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&existing).unwrap(), "keep me");
    // Nor the key beside it.
    let s2 = setup();
    std::fs::write(s2.root.join("b.jwt.key"), "keep").unwrap();
    let (out, path) = issue(&s2, "b.jwt", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!path.exists());
}

#[test]
fn bad_constraints_name_the_key_and_value() {
    let s = setup();
    for (flag, needle) in [
        ("core:cost:max_per_action=-5", "core:cost:max_per_action"),
        ("core:cost:cumulative_window=yearly", "yearly"),
        ("core:cost:max_per_acton=5", "core:cost:max_per_acton"),
        ("core:scope:domain_allowlist=*.com", "*.com"),
        ("no-equals-sign", "KEY=VALUE"),
    ] {
        let (out, path) = issue(&s, "c.jwt", &["--constraint", flag]);
        assert_eq!(out.status.code(), Some(1), "{flag}");
        assert!(stderr(&out).contains(needle), "{flag}: {}", stderr(&out));
        assert!(!path.exists());
    }
}

#[test]
fn constraints_file_merges_and_refuses_duplicates() {
    let s = setup();
    let f = s.root.join("c.json");
    std::fs::write(&f, r#"{"core:cost:max_cumulative": 10000, "core:cost:cumulative_window": "weekly"}"#).unwrap();
    let (out, path) = issue(&s, "a.jwt", &["--constraints-file", p(&f), "--constraint", "core:rate:max_per_minute=10"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = sluice(&["passport", "verify", p(&path), "--json"]);
    let j: serde_json::Value = serde_json::from_str(&stdout(&v)).unwrap();
    assert_eq!(j["claims"]["constraints"]["core:cost:cumulative_window"], "weekly");
    assert_eq!(j["claims"]["constraints"]["core:rate:max_per_minute"], 10);
    let (out, _) = issue(&s, "b.jwt", &["--constraints-file", p(&f), "--constraint", "core:cost:max_cumulative=5"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("given twice"));
    std::fs::write(&f, r#"{"core:cost:max_cumulative": 1, "core:cost:max_cumulative": 2}"#).unwrap();
    let (out, _) = issue(&s, "d.jwt", &["--constraints-file", p(&f)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("duplicate"), "{}", stderr(&out));
}

#[test]
fn bad_flags_are_refused_with_a_reason() {
    let s = setup();
    for (extra, needle) in [
        (vec!["--tier", "L9"], "--tier"),
        (vec!["--expires-in", "30w"], "--expires-in"),
        (vec!["--expires-in", "500d"], "400 days"),
        (vec!["--permission", "LLM:*"], "--permission"),
    ] {
        let (out, _) = issue(&s, "x.jwt", &extra);
        assert_eq!(out.status.code(), Some(1), "{extra:?}");
        assert!(stderr(&out).contains(needle), "{extra:?}: {}", stderr(&out));
    }
    let out = sluice(&["passport", "verify", p(&s.root.join("missing.jwt"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("missing.jwt"));
}

#[test]
fn every_command_has_help() {
    for cmd in [
        vec!["--help"],
        vec!["issuer", "--help"],
        vec!["issuer", "init", "--help"],
        vec!["passport", "--help"],
        vec!["passport", "issue", "--help"],
        vec!["passport", "inspect", "--help"],
        vec!["passport", "verify", "--help"],
    ] {
        let out = sluice(&cmd);
        assert!(out.status.success(), "{cmd:?}");
        assert!(stdout(&out).contains("Usage:"), "{cmd:?}");
    }
}

/// `--template` starts from a built-in template; `--constraint` overrides its values key by key,
/// `--permission` replaces its permissions; the passport verifies; an unknown name is refused.
#[test]
fn issue_from_a_template_with_overrides() {
    let s = setup();
    let list = sluice(&["passport", "templates"]);
    assert!(list.status.success(), "{}", stderr(&list));
    for name in ["llm-researcher", "web-readonly", "internal-tools"] {
        assert!(stdout(&list).contains(name), "{}", stdout(&list));
    }
    let shown = sluice(&["passport", "templates", "llm-researcher"]);
    assert!(stdout(&shown).contains("\"core:cost:approval_threshold\" = 100"), "{}", stdout(&shown));

    let (out, path) =
        issue(&s, "tpl.jwt", &["--template", "llm-researcher", "--constraint", "core:cost:max_cumulative=500"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = sluice(&["passport", "verify", p(&path), "--issuer-pub", p(&s.issuer_pub), "--json"]);
    assert!(v.status.success(), "{}", stderr(&v));
    let claims: serde_json::Value = serde_json::from_str(&stdout(&v)).unwrap();
    let c = &claims["claims"]["constraints"];
    assert_eq!(c["core:cost:max_cumulative"], 500, "{c}");
    assert_eq!(c["core:cost:approval_threshold"], 100, "{c}");
    assert_eq!(c["core:cost:cumulative_window"], "daily", "{c}");
    assert_eq!(c["core:scope:domain_allowlist"], serde_json::json!(["api.openai.com", "api.anthropic.com"]), "{c}");
    assert_eq!(claims["claims"]["permissions"], serde_json::json!(["llm:*"]));

    let (out, path) = issue(&s, "tpl2.jwt", &["--template", "web-readonly", "--permission", "docs:read"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = sluice(&["passport", "verify", p(&path), "--json"]);
    let claims: serde_json::Value = serde_json::from_str(&stdout(&v)).unwrap();
    assert_eq!(claims["claims"]["permissions"], serde_json::json!(["docs:read"]));

    let (out, _) = issue(&s, "tpl3.jwt", &["--template", "nope"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no such template") && stderr(&out).contains("llm-researcher"), "{}", stderr(&out));
    // An override that breaks a constraint names it.
    let (out, _) =
        issue(&s, "tpl4.jwt", &["--template", "llm-researcher", "--constraint", "core:cost:cumulative_window=hourly"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("template llm-researcher"), "{}", stderr(&out));
}
