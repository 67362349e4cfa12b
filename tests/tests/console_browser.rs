//! The console in a real browser: headless Chromium (Debian's `chromium`, driven over the
//! DevTools protocol by `sluice_e2e::browser`) against a real daemon with the eBPF redirect.
//!
//! The operator logs in with the token; a sandboxed agent (curl, no proxy variables) makes a
//! request over the approval threshold; the hold appears on the page by itself (server-sent
//! events; a marker set in the page before proves there was no reload); the operator approves it
//! with the page's button; the agent's request completes upstream, and the approval's record
//! appears on the page, attested as the console user; "verify now" verifies the stored log.
//!
//! Screenshots of the views are written to `$SLUICE_SCREENSHOT_DIR` when it is set (the ones in
//! `docs/console/` come from `SLUICE_SCREENSHOT_DIR=docs/console`).

use serde_json::Value;
use sluice_e2e::browser::Browser;
use sluice_e2e::daemon::Daemon;
use sluice_e2e::upstream::{TestCa, Upstream};
use sluice_e2e::{free_port, root_or_skip, ChildGuard};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

const API: &str = "shop.example.test";

const POLICY: &str = r#"
[service]
name = "shop"
domains = ["shop.example.test"]

[[route]]
id = "pay"
method = "POST"
path = "/pay"
action = "pay:charge"
cost_cents = 60

[[route]]
id = "browse"
method = "GET"
path = "/hello"
action = "shop:browse"
cost_cents = 1
"#;

const WAIT: Duration = Duration::from_secs(30);

fn shot(b: &mut Browser, name: &str, full: bool) {
    if let Some(dir) = std::env::var_os("SLUICE_SCREENSHOT_DIR") {
        b.screenshot(&PathBuf::from(dir).join(name), full);
    }
}

#[test]
fn an_operator_approves_a_hold_in_the_browser_and_the_agent_completes() {
    if !root_or_skip("an_operator_approves_a_hold_in_the_browser_and_the_agent_completes") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ca = TestCa::new();
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_path = ca.write(ca_dir.path());
    let up_port = free_port();
    let up = Upstream::start(&rt, SocketAddr::from(([127, 0, 0, 1], up_port)), &[API], &ca);
    let console_port = free_port();
    let d = Daemon::start_custom(
        "root",
        &format!("static_hosts = {{ \"{API}\" = \"127.0.0.1\" }}"),
        &format!(
            "[upstream_tls]\nextra_roots = [\"{}\"]\n[holds]\ntimeout_secs = 120\n[console]\nlisten = \"127.0.0.1:{console_port}\"\n",
            ca_path.display()
        ),
        &[("shop.toml", POLICY)],
    );
    let token = std::fs::read_to_string(d.dir.path().join("state/console.token")).unwrap().trim().to_string();
    let (passport, passport_id) = d.issue(
        "shopper-1",
        &[
            "--agent-name",
            "Shopping agent",
            "--permission",
            "pay:*",
            "--permission",
            "shop:*",
            "--constraint",
            "core:cost:approval_threshold=50",
            "--constraint",
            "core:cost:max_cumulative=500",
            "--constraint",
            "core:cost:cumulative_window=daily",
            "--constraint",
            "core:rate:max_per_minute=30",
        ],
    );
    let p = passport.to_str().unwrap();
    let curl = |method: &str, path: &str| {
        d.cli_command(&[
            "run",
            "--passport",
            p,
            "--",
            "curl",
            "-sS",
            "-i",
            "--max-time",
            "90",
            "-X",
            method,
            &format!("https://{API}:{up_port}{path}"),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
    };
    // Some history first: an allowed request.
    let out = ChildGuard(Some(curl("GET", "/hello")));
    let out = sluice_e2e::wait_output(out);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("HTTP/2 200"), "{}", String::from_utf8_lossy(&out.stderr));

    let base = format!("http://127.0.0.1:{console_port}");
    let mut b = Browser::launch(1400, 1000);
    b.navigate(&format!("{base}/"));
    b.wait_for("location.pathname === '/login' && document.getElementById('token')", WAIT);
    shot(&mut b, "login.png", false);
    // A wrong token first: refused, still on the login page.
    b.eval("document.getElementById('token').value = 'not-the-token'; document.querySelector('form').submit(); true");
    b.wait_for(
        "document.querySelector('.error') && document.querySelector('.error').textContent.includes('Wrong token')",
        WAIT,
    );
    let typed = serde_json::to_string(&token).unwrap();
    b.eval(&format!("document.getElementById('token').value = {typed}; document.querySelector('form').submit(); true"));
    b.wait_for("location.pathname === '/' && document.getElementById('status').textContent === 'live'", WAIT);
    b.wait_for(&format!("document.querySelector('[data-passport=\"{passport_id}\"]')"), WAIT);
    // The session cookie is invisible to scripts (HttpOnly).
    assert_eq!(b.eval("document.cookie"), Value::String(String::new()));
    // Set in the page now: still there later only if the page never reloaded.
    b.eval("window.__noReload = 42; true");

    // The agent's request over the approval threshold waits; the page shows it by itself.
    let agent = ChildGuard(Some(curl("POST", "/pay")));
    b.wait_for("document.querySelector('#holds tr[data-hold-id]')", WAIT);
    assert_eq!(up.count("/pay"), 0, "a held request reached the upstream");
    b.eval("document.querySelector('#holds input[data-hold]').value = 'approved in the browser test'; true");
    shot(&mut b, "holds.png", false);
    b.eval("document.querySelector('#holds button[data-action=approve]').click(); true");

    let out = sluice_e2e::wait_output(agent);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/2 200") && text.ends_with("paid\n"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(up.count("/pay"), 1);

    // The approval's record appears, the hold is gone, and the page was never reloaded.
    b.wait_for("document.querySelector('#records tr[data-kind=hold_resolution]')", WAIT);
    b.wait_for("document.getElementById('holds-empty').hidden === false", WAIT);
    assert_eq!(b.eval("window.__noReload"), Value::from(42), "the page reloaded");

    b.eval("document.getElementById('verify').click(); true");
    b.wait_for("document.getElementById('verify-result').classList.contains('ok')", WAIT);
    let verdict = b.eval("document.getElementById('verify-result').textContent");
    assert!(verdict.as_str().is_some_and(|v| v.starts_with("OK: ")), "{verdict}");
    shot(&mut b, "overview.png", true);

    // The emergency stop from the page: the agent's card shows it stopped, the agent cannot run,
    // and Resume lets it run again.
    let card = format!("document.querySelector('[data-passport=\"{passport_id}\"]')");
    b.eval("document.getElementById('stop-note').value = 'stopped from the browser test'; true");
    b.eval(&format!("{card}.querySelector('button[data-action=stop]').click(); true"));
    b.wait_for(
        &format!("{card}.querySelector('button[data-action=resume]') && {card}.textContent.includes('stopped')"),
        WAIT,
    );
    let out = sluice_e2e::wait_output(ChildGuard(Some(curl("GET", "/hello"))));
    assert!(!out.status.success(), "a stopped agent ran: {}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop"), "{}", String::from_utf8_lossy(&out.stderr));
    b.wait_for("document.querySelector('#records tr[data-kind=emergency_stop]')", WAIT);
    shot(&mut b, "stopped.png", false);
    b.eval(&format!("{card}.querySelector('button[data-action=resume]').click(); true"));
    b.wait_for(&format!("{card}.querySelector('button[data-action=stop]')"), WAIT);
    let out = sluice_e2e::wait_output(ChildGuard(Some(curl("GET", "/hello"))));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("HTTP/2 200"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(b.eval("window.__noReload"), Value::from(42), "the page reloaded");

    // Logging out ends the session: the page goes back to the login form, and the API refuses.
    b.eval("document.getElementById('logout').click(); true");
    b.wait_for("location.pathname === '/login' && document.getElementById('token')", WAIT);
    let status = b.eval("fetch('/api/overview').then(r => r.status)");
    assert_eq!(status, Value::from(401));

    // The log names the console user as the approver, with the operator's note.
    let export = d.dir.path().join("export.json");
    let out = d.cli(&["audit", "export", "--out", export.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = d.cli(&[
        "audit",
        "verify",
        export.to_str().unwrap(),
        "--host-pub",
        d.dir.path().join("state/host.pub").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let bundle: Value = serde_json::from_slice(&std::fs::read(&export).unwrap()).unwrap();
    let resolution = bundle["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str::<Value>(r["record"].as_str().unwrap()).unwrap())
        .find(|r| r["kind"] == "hold_resolution")
        .expect("a hold_resolution record");
    assert_eq!(resolution["decision"], "allow", "{resolution}");
    assert_eq!(resolution["by"]["user"], "console", "{resolution}");
    assert_eq!(resolution["note"], "approved in the browser test", "{resolution}");
}
