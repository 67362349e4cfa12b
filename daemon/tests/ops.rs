//! Running sluice as operators do: configuration errors, the shipped example configuration, the
//! console's start and its token file, the systemd readiness protocol, `/metrics`, and the systemd units (`systemd-analyze verify`, and
//! the hardening that the agents' isolation depends on).

mod common;

use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn example_config() -> String {
    std::fs::read_to_string(repo().join("config/sluice.toml.example")).unwrap()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

// ---- configuration ----

#[test]
fn check_config_names_the_unknown_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sluice.toml");
    // A plausible typo in a section: an operator believes the hold timeout is 30 s.
    std::fs::write(&file, "state_dir = \"/var/lib/sluice\"\n[holds]\ntimeout_sec = 30\n").unwrap();
    let out = sluice(&["--config", p(&file), "daemon", "--check-config"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let e = stderr(&out);
    assert!(e.contains(p(&file)), "file not named: {e}");
    assert!(e.contains("timeout_sec"), "key not named: {e}");
    assert!(e.contains("line 3"), "line not named: {e}");
    assert_eq!(e.lines().count(), 1, "one line: {e}");
    assert!(out.stdout.is_empty());

    // A wrong value names the field.
    std::fs::write(&file, "[proxy]\nport = 15053\n").unwrap();
    let out = sluice(&["--config", p(&file), "daemon", "--check-config"]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(e.contains(p(&file)) && e.contains("dns.port"), "{e}");

    // A missing file names the file.
    let missing = dir.path().join("nope.toml");
    let out = sluice(&["--config", p(&missing), "daemon", "--check-config"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(p(&missing)), "{}", stderr(&out));
}

#[test]
fn check_config_accepts_the_shipped_example() {
    let file = repo().join("config/sluice.toml.example");
    let out = sluice(&["--config", p(&file), "daemon", "--check-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(": ok"), "{text}");
    assert!(text.contains("/var/lib/sluice"), "{text}");
}

/// A copy of the shipped example with every path under `prefix`, passport-only mode (no eBPF,
/// so no root needed) and the current user's group for the API.
/// `GET path` on the console at `port`: the status, or `None` when nothing answers.
fn console_get(port: u16, path: &str) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn the_console_starts_with_the_daemon_and_a_token_file_others_can_read_stops_it() {
    let port = listen_port();
    let mut d = TestDaemon::start(&format!("[console]\nlisten = \"127.0.0.1:{port}\"\n"));
    let token = d.state_dir().join("console.token");
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&token).unwrap().permissions().mode() & 0o777, 0o600);
    }
    assert_eq!(console_get(port, "/login"), Some(200));
    assert_eq!(console_get(port, "/api/overview"), Some(401));
    let out = sluice(&["--config", p(&d.config), "daemon", "--check-config"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("http://127.0.0.1:{port}/")), "{out:?}");
    d.stop();
    assert_eq!(console_get(port, "/login"), None, "the console outlived the daemon");

    // A token file group or others may read: the daemon refuses to start, naming the file and the fix.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let mut child = Command::new(bin())
        .args(["--config", p(&d.config), "daemon"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the daemon started with a console token others can read");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("console.token") && err.contains("chmod 600"), "{err}");
    assert_eq!(console_get(port, "/login"), None);

    // A console on a network address is a configuration error.
    std::fs::write(&d.config, format!("state_dir = \"/tmp/x\"\n[console]\nlisten = \"0.0.0.0:{port}\"\n")).unwrap();
    let out = sluice(&["--config", p(&d.config), "daemon", "--check-config"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("console.listen") && stderr(&out).contains("loopback"), "{}", stderr(&out));
}

fn example_under(prefix: &Path) -> PathBuf {
    let mut text = example_config();
    for dir in ["/var/lib/sluice", "/etc/sluice", "/run/sluice"] {
        text = text.replace(&format!("\"{dir}"), &format!("\"{}{dir}", prefix.display()));
    }
    text = text.replace("redirect = true", "redirect = false");
    let gid = nix::unistd::getgid();
    let group = nix::unistd::Group::from_gid(gid).ok().flatten().map(|g| g.name).unwrap_or_else(|| "root".into());
    text = text.replace("group = \"sluice\"", &format!("group = \"{group}\""));
    assert!(!text.contains("\"/var/lib") && !text.contains("\"/run/"), "a path escaped the prefix:\n{text}");
    let file = prefix.join("etc/sluice/sluice.toml");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, text).unwrap();
    file
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The shipped example, under a temporary prefix, started as systemd would (`$NOTIFY_SOCKET`):
/// READY=1 arrives only once the API answers, and STOPPING=1 when it is told to stop.
#[test]
fn the_daemon_from_the_shipped_example_notifies_ready_and_answers_health() {
    let prefix = tempfile::tempdir().unwrap();
    let config = example_under(prefix.path());
    let notify_path = prefix.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let log = std::fs::File::create(prefix.path().join("daemon.log")).unwrap();
    let child = Command::new(bin())
        .args(["--config", p(&config), "daemon"])
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let log = || std::fs::read_to_string(prefix.path().join("daemon.log")).unwrap_or_default();
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).unwrap_or_else(|e| panic!("no READY=1 ({e}):\n{}", log()));
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    // Ready means ready: no retry loop here.
    let socket = prefix.path().join("run/sluice/sluice.sock");
    let (status, health) = raw_call(&socket, "GET", "/v1/health", None).unwrap();
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")), "{health}");
    assert!(prefix.path().join("var/lib/sluice/ledger.redb").is_file(), "store not under the prefix");

    // Blocks (and holds) get one info line each, carrying what an operator looks for; allows
    // are at debug only (each is in the ledger), summed up at info once a minute.
    let i = issue(prefix.path(), "logged", &["--permission", "llm:*"]);
    let token = std::fs::read_to_string(&i.passport).unwrap();
    let (status, v) = raw_call(&socket, "POST", "/v1/passports", Some(json!({"passport": token.trim()}))).unwrap();
    assert_eq!(status, 200, "{v}");
    let body = json!({"passport_id": i.id, "action": "llm:chat", "cost_cents": 7, "target": "api.example.test"});
    let (_, v) = raw_call(&socket, "POST", "/v1/enforce", Some(body)).unwrap();
    assert_eq!(v["decision"], "allow", "{v}");
    let body = json!({"passport_id": i.id, "action": "orders:write", "cost_cents": 7, "target": "api.example.test"});
    let (_, v) = raw_call(&socket, "POST", "/v1/enforce", Some(body)).unwrap();
    assert_eq!(v["decision"], "block", "{v}");
    let attestation = v["attestation_id"].as_u64().unwrap();
    let text = log();
    let decision_lines: Vec<&str> =
        text.lines().filter(|l| l.contains(" decision ") || l.ends_with(" decision")).collect();
    assert_eq!(decision_lines.len(), 1, "one info line, the block's:\n{text}");
    let line = decision_lines[0];
    for field in [
        format!("passport_id={}", i.id),
        "agent_id=logged".into(),
        "action=orders:write".into(),
        "host=api.example.test".into(),
        "cost_millicents=7000".into(),
        "decision=block".into(),
        format!("attestation_id={attestation}"),
    ] {
        assert!(line.contains(&field), "{field} missing from: {line}");
    }
    assert!(line.contains("reason="), "{line}");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.0.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let n = notify.recv(&mut buf).unwrap_or_else(|e| panic!("no STOPPING=1 ({e}):\n{}", log()));
    assert!(String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "STOPPING=1"));
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status}:\n{}", log());
    assert!(!socket.exists(), "the socket outlived the daemon");
}

// ---- metrics ----

/// `GET path` over the Unix socket, returning (status, content-type, body text).
fn get_text(socket: &Path, path: &str) -> (u16, String, String) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let ctype = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    (status, ctype, body)
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_show_the_expected_series_after_a_scripted_run() {
    let d = TestDaemon::start("[sandbox]\nredirect = false\n");
    let i = issue(
        d.dir.path(),
        "metered",
        &[
            "--permission",
            "llm:*",
            "--constraint",
            "core:cost:max_cumulative=1000",
            "--constraint",
            "core:cost:approval_threshold=300",
            "--constraint",
            "core:scope:domain_allowlist=api.example.test",
        ],
    );
    let out = d.cli(&["passport", "register", p(&i.passport)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let enforce = |action: &str, cost: u64, target: &str| {
        let body = json!({"passport_id": i.id, "action": action, "cost_cents": cost, "target": target});
        let (status, v) = d.call("POST", "/v1/enforce", Some(body)).unwrap();
        assert_eq!(status, 200, "{v}");
        v
    };
    let allowed = [enforce("llm:chat", 120, "api.example.test"), enforce("llm:chat", 80, "api.example.test")];
    assert!(allowed.iter().all(|v| v["decision"] == "allow"), "{allowed:?}");
    let allow_reason = allowed[0]["reason"].as_str().unwrap().to_string();
    assert_eq!(enforce("llm:chat", 10, "evil.example")["reason"], "domain_not_allowed");
    assert_eq!(enforce("orders:write", 0, "api.example.test")["reason"], "permission_denied");
    let held = enforce("llm:chat", 400, "api.example.test");
    assert_eq!(held["decision"], "request_hold", "{held}");
    let hold_reason = held["reason"].as_str().unwrap().to_string();

    let (status, ctype, text) = get_text(&d.socket, "/metrics");
    assert_eq!(status, 200, "{text}");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let dec = |decision: &str, reason: &str| {
        sample(&text, &format!("sluice_decisions_total{{decision=\"{decision}\",reason=\"{reason}\"}}"))
    };
    assert_eq!(dec("allow", &allow_reason), Some(2.0), "{text}");
    assert_eq!(dec("block", "domain_not_allowed"), Some(1.0), "{text}");
    assert_eq!(dec("block", "permission_denied"), Some(1.0), "{text}");
    assert_eq!(dec("request_hold", &hold_reason), Some(1.0), "{text}");
    assert_eq!(sample(&text, "sluice_holds_pending"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "sluice_passports_registered"), Some(1.0), "{text}");
    let spend = format!("sluice_spend_cents{{passport_id=\"{}\",agent_id=\"metered\",window=\"daily\"}}", i.id);
    assert_eq!(sample(&text, &spend), Some(200.0), "{text}");
    let limit = format!("sluice_spend_limit_cents{{passport_id=\"{}\",agent_id=\"metered\",window=\"daily\"}}", i.id);
    assert_eq!(sample(&text, &limit), Some(1000.0), "{text}");
    // Every durable operation (start, registration, five decisions) went through a timed commit.
    let commits = sample(&text, "sluice_store_commit_seconds_count").unwrap();
    assert!(commits >= 7.0, "{commits} commits:\n{text}");
    assert_eq!(sample(&text, "sluice_store_commit_seconds_bucket{le=\"+Inf\"}"), Some(commits));
    // Those commits were made durable by the writer's group writes, each timed. This little load
    // never fills the journal.
    let writes = sample(&text, "sluice_store_durable_writes_total").unwrap();
    assert!(writes >= 1.0, "{writes} durable writes for {commits} commits:\n{text}");
    let written = sample(&text, "sluice_store_durable_write_seconds_total").unwrap();
    assert!(written > 0.0, "{text}");
    assert!(sample(&text, "sluice_store_writer_busy_seconds_total").unwrap() >= written, "{text}");
    assert_eq!(sample(&text, "sluice_store_journal_laps_total"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "sluice_store_journal_lap_wait_seconds_total"), Some(0.0), "{text}");
    // The proxy's counter is announced even before any upstream error.
    assert!(text.contains("# TYPE sluice_upstream_errors_total counter"), "{text}");

    // Approving the hold resolves it: one more decision, no pending hold, more spend.
    let hold_id = held["approval_request_id"].as_str().or(held["hold_id"].as_str()).unwrap().to_string();
    let out = d.cli(&["holds", "approve", &hold_id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (_, _, text) = get_text(&d.socket, "/metrics");
    assert_eq!(sample(&text, "sluice_holds_pending"), Some(0.0), "{text}");
    assert_eq!(sample(&text, &spend), Some(600.0), "{text}");
}

/// The daemon hands its free heap pages back once after each pause (a second without a durable
/// write), never while decisions keep coming: each release holds the allocator's arenas.
#[test]
fn free_heap_pages_go_back_after_a_pause_and_never_under_load() {
    let d = TestDaemon::start("[sandbox]\nredirect = false\n");
    let i = issue(d.dir.path(), "steady", &["--permission", "orders:read"]);
    let out = d.cli(&["passport", "register", p(&i.passport)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let releases = || {
        let (_, _, text) = get_text(&d.socket, "/metrics");
        let n = sample(&text, "sluice_heap_releases_total").unwrap_or_else(|| panic!("no release counter:\n{text}"));
        (n, sample(&text, "sluice_heap_release_seconds_total").unwrap())
    };
    let pause = |from: f64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (n, secs) = releases();
            if n > from {
                return (n, secs);
            }
            assert!(std::time::Instant::now() < deadline, "no release within 10 s of quiet\n{}", d.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // What starting up and registering left is released in the first quiet seconds.
    let (first, first_secs) = pause(0.0);
    // Decisions every 100 ms for 3.5 s: every one-second look sees new writes, so no release.
    let body = json!({"passport_id": i.id, "action": "orders:read", "cost_cents": 0, "target": "api.example.test"});
    let busy_until = std::time::Instant::now() + Duration::from_millis(3500);
    let mut made = 0;
    while std::time::Instant::now() < busy_until {
        let (status, v) = d.call("POST", "/v1/enforce", Some(body.clone())).unwrap();
        assert_eq!(status, 200, "{v}");
        made += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(made >= 10, "only {made} decisions in 3.5 s");
    // At most one release in that time: the registration's, had its pause ended just as the
    // decisions began.
    let (during, _) = releases();
    assert!(during <= first + 1.0, "{during} releases after {first}: released while decisions kept coming");
    // Then quiet again: one more release, timed.
    let (after, secs) = pause(during);
    assert!(secs > first_secs, "the release after the decisions was not timed ({secs} s in all)");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(releases().0, after, "released again with nothing written since");
}

// ---- systemd units ----

fn units_dir() -> PathBuf {
    repo().join("systemd")
}

const UNITS: &[&str] = &["sluice.service", "sluice-agents.slice", "sluice-agent@.service", "sluice-gate@.service"];

/// Copies a tree, keeping symlinks as symlinks (systemd's unit directory is full of them).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let ft = entry.file_type().unwrap();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if ft.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// A root directory for `systemd-analyze verify --root`: the host's systemd units (so targets
/// such as sysinit.target resolve), `units` in /etc/systemd/system, and the binaries the units
/// execute at the paths they name.
fn verify_root(units: &[(&str, String)]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let system = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .iter()
        .map(Path::new)
        .find(|p| p.join("sysinit.target").exists())
        .expect("no systemd unit directory on this host: install the `systemd` package (cargo xtask deps)");
    copy_tree(system, &root.path().join("usr/lib/systemd/system"));
    let etc = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&etc).unwrap();
    for (name, text) in units {
        std::fs::write(etc.join(name), text).unwrap();
    }
    let usr_bin = root.path().join("usr/bin");
    std::fs::create_dir_all(&usr_bin).unwrap();
    if std::fs::hard_link(bin(), usr_bin.join("sluice")).is_err() {
        std::fs::copy(bin(), usr_bin.join("sluice")).unwrap();
    }
    std::fs::copy("/usr/bin/env", usr_bin.join("env")).unwrap();
    std::fs::copy("/usr/bin/systemctl", usr_bin.join("systemctl")).unwrap();
    // sluice.service mounts the sandboxes' directories with a shell step.
    std::fs::create_dir_all(root.path().join("bin")).unwrap();
    std::fs::copy("/bin/sh", root.path().join("bin/sh")).unwrap();
    std::fs::copy("/usr/bin/nsenter", usr_bin.join("nsenter")).unwrap();
    root
}

/// `systemd-analyze verify` of `names` in `root`: its complaints about sluice's units. It exits 0
/// on unknown keys and bad values (it only warns), so its output is what is checked.
fn verify(root: &Path, names: &[&str]) -> Vec<String> {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .args(names)
        .output()
        .expect("systemd-analyze is missing: install the `systemd` package (cargo xtask deps)");
    let mut problems: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .filter(|l| l.contains("sluice"))
        .map(str::to_string)
        .collect();
    if !out.status.success() {
        problems.push(format!("systemd-analyze verify exited with {}", out.status));
    }
    problems
}

fn shipped_units() -> Vec<(&'static str, String)> {
    UNITS.iter().map(|n| (*n, std::fs::read_to_string(units_dir().join(n)).unwrap())).collect()
}

#[test]
fn every_unit_verifies() {
    let root = verify_root(&shipped_units());
    // The template is verified as an instance, as systemd would load it.
    let problems = verify(
        root.path(),
        &["sluice.service", "sluice-agents.slice", "sluice-agent@ci-test.service", "sluice-gate@ci-test.service"],
    );
    assert!(problems.is_empty(), "systemd-analyze verify:\n{}", problems.join("\n"));

    // The check is not vacuous: a misspelt key and a missing binary are caught.
    let mut broken = shipped_units();
    broken[1].1.push_str("\nTasksMaxx=1\n");
    broken[2].1 = broken[2].1.replace("ExecStartPre=+/usr/bin/sluice", "ExecStartPre=+/usr/bin/sluicex");
    let root = verify_root(&broken);
    let problems = verify(root.path(), &["sluice-agents.slice", "sluice-agent@ci-test.service"]);
    assert!(problems.iter().any(|p| p.contains("TasksMaxx")), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("sluicex")), "{problems:?}");
}

/// `[Section] Key=Value` entries of a unit file, in order.
fn entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
        } else if let Some((k, v)) = line.split_once('=') {
            out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

fn values(text: &str, section: &str, key: &str) -> Vec<String> {
    entries(text).into_iter().filter(|(s, k, _)| s == section && k == key).map(|(_, _, v)| v).collect()
}

fn one(text: &str, section: &str, key: &str) -> String {
    let v = values(text, section, key);
    assert_eq!(v.len(), 1, "[{section}] {key}: {v:?}");
    v[0].clone()
}

/// What the agents' isolation depends on, checked in the unit as shipped: each line here closes a
/// way out (see ebpf/README.md and ARCHITECTURE-ops.md).
#[test]
fn the_agent_unit_confines_its_agent() {
    let text = std::fs::read_to_string(units_dir().join("sluice-agent@.service")).unwrap();
    let s = "Service";
    // In the redirected slice, bound to its passport before the agent starts.
    assert_eq!(one(&text, s, "Slice"), "sluice-agents.slice");
    assert_eq!(one(&text, s, "ExecStartPre"), "+/usr/bin/sluice sandbox bind --passport /etc/sluice/agents/%i.jwt");
    assert_eq!(one(&text, s, "LoadCredential"), "passport:/etc/sluice/agents/%i.jwt");
    // Never root (root can leave its cgroup), never regaining privileges or capabilities.
    assert_eq!(one(&text, s, "DynamicUser"), "yes");
    assert!(values(&text, s, "User").is_empty(), "a fixed User= could be root");
    assert_eq!(one(&text, s, "NoNewPrivileges"), "yes");
    assert_eq!(one(&text, s, "CapabilityBoundingSet"), "");
    assert_eq!(one(&text, s, "AmbientCapabilities"), "");
    assert!(values(&text, s, "SupplementaryGroups").is_empty(), "the agent must not be in the API group");
    // No packet/netlink/vsock sockets, none made through io_uring either (IORING_OP_SOCKET
    // bypasses the family filter), no namespaces, no own cgroup management.
    assert_eq!(one(&text, s, "RestrictAddressFamilies"), "AF_INET AF_INET6 AF_UNIX");
    let filters = values(&text, s, "SystemCallFilter");
    assert!(filters.iter().any(|f| f == "@system-service"), "{filters:?}");
    let refused: Vec<&str> =
        filters.iter().filter_map(|f| f.strip_prefix('~')).flat_map(str::split_whitespace).collect();
    for call in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        assert!(refused.contains(&call), "{call} is not refused: {filters:?}");
    }
    assert_eq!(one(&text, s, "RestrictNamespaces"), "yes");
    assert_eq!(one(&text, s, "Delegate"), "no");
    assert_eq!(one(&text, s, "ProtectControlGroups"), "yes");
    assert_eq!(one(&text, s, "PrivateTmp"), "yes");
    // The daemon's socket, state and configuration are out of reach.
    let hidden = one(&text, s, "InaccessiblePaths");
    for path in ["/run/sluice", "/var/lib/sluice", "/etc/sluice"] {
        assert!(hidden.split_whitespace().any(|p| p.trim_start_matches('-') == path), "{path} reachable: {hidden}");
    }
    // The CA bundle replaces the system bundle, read-only.
    let bind = one(&text, s, "BindReadOnlyPaths");
    assert!(bind.ends_with(":/etc/ssl/certs/ca-certificates.crt"), "{bind}");
    assert!(values(&text, s, "BindPaths").is_empty());
}

#[test]
fn the_daemon_unit_is_ready_only_when_enforcing_and_keeps_few_capabilities() {
    let text = std::fs::read_to_string(units_dir().join("sluice.service")).unwrap();
    let s = "Service";
    assert_eq!(one(&text, s, "Type"), "notify");
    assert_eq!(one(&text, s, "Restart"), "on-failure");
    assert_eq!(one(&text, s, "ExecStart"), "/usr/bin/sluice --config /etc/sluice/sluice.toml daemon");
    let caps: Vec<String> = one(&text, s, "CapabilityBoundingSet").split_whitespace().map(str::to_string).collect();
    assert_eq!(caps, ["CAP_BPF", "CAP_NET_ADMIN", "CAP_CHOWN", "CAP_SYS_PTRACE", "CAP_PERFMON"]);
    // Sandboxes' own directories: mounted before the daemon starts (it may not mount), at the
    // default `[sandbox] unix_dir`, and writable in the daemon's namespace.
    let pre = values(&text, s, "ExecStartPre");
    assert!(
        pre.iter().any(|v| v.starts_with("+/usr/bin/nsenter --target 1 --mount -- /bin/sh")
            && v.contains("nosymfollow")
            && v.contains("/run/sluice-sandboxes")),
        "{pre:?}"
    );
    assert_eq!(one(&text, s, "BindPaths"), "-/run/sluice-sandboxes");
    assert!(example_config().contains("unix_dir = \"/run/sluice-sandboxes\""));
    assert_eq!(one(&text, s, "ProtectSystem"), "strict");
    assert_eq!(one(&text, s, "StateDirectory"), "sluice");
    assert_eq!(one(&text, s, "RuntimeDirectory"), "sluice");
    assert_eq!(one(&text, s, "ConfigurationDirectory"), "sluice");
    // The slice's cgroup exists before the daemon attaches to it.
    assert!(values(&text, "Unit", "Wants").iter().any(|v| v.contains("sluice-agents.slice")));
    assert!(values(&text, "Unit", "After").iter().any(|v| v.contains("sluice-agents.slice")));
    // The paths the unit creates are the ones the shipped configuration uses.
    let example = example_config();
    assert!(example.contains("state_dir = \"/var/lib/sluice\""));
    assert!(example.contains("socket = \"/run/sluice/sluice.sock\""));
    assert!(example.contains("pin_dir = \"/sys/fs/bpf/sluice\""));
    let rw = one(&text, s, "ReadWritePaths");
    assert!(rw.split_whitespace().any(|p| p == "/sys/fs/bpf"), "{rw}");
    // ProtectKernelTunables=yes mounts /sys/fs/bpf read-only by name, and ReadWritePaths= cannot
    // undo that (booted: the daemon cannot pin). The same protection is spelt out instead.
    assert_eq!(one(&text, s, "ProtectKernelTunables"), "no");
    let ro: Vec<String> = values(&text, s, "ReadOnlyPaths")
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect();
    for path in ["/sys", "/proc/sys"] {
        assert!(ro.iter().any(|p| p == path), "{path} is writable: ReadOnlyPaths={ro:?}");
    }
    // Reload needs nothing but systemd (minimal systems have no `kill`).
    assert_eq!(one(&text, s, "ExecReload"), "/usr/bin/systemctl kill --kill-whom=main --signal=SIGHUP %n");
}

/// The gate unit: one gate per config under /etc/sluice/gates, ready only once it serves, no
/// privilege but a low port, its state only writable.
#[test]
fn the_gate_unit_runs_one_gate_per_config_with_no_privilege_but_its_port() {
    let text = std::fs::read_to_string(units_dir().join("sluice-gate@.service")).unwrap();
    let s = "Service";
    assert_eq!(one(&text, s, "Type"), "notify");
    assert_eq!(one(&text, s, "ExecStart"), "/usr/bin/sluice --config /etc/sluice/gates/%i.toml gate run");
    assert_eq!(one(&text, "Unit", "AssertPathExists"), "/etc/sluice/gates/%i.toml");
    assert_eq!(one(&text, s, "StateDirectory"), "sluice-gate/%i");
    assert_eq!(one(&text, s, "StateDirectoryMode"), "0700");
    assert_eq!(one(&text, s, "CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    assert_eq!(one(&text, s, "AmbientCapabilities"), "");
    assert_eq!(one(&text, s, "NoNewPrivileges"), "yes");
    assert_eq!(one(&text, s, "ProtectSystem"), "strict");
    assert_eq!(one(&text, s, "ProtectProc"), "invisible");
    assert_eq!(one(&text, s, "RestrictAddressFamilies"), "AF_UNIX AF_INET AF_INET6");
    assert_eq!(one(&text, s, "MemoryDenyWriteExecute"), "yes");
    assert!(values(&text, s, "ReadWritePaths").is_empty(), "only its StateDirectory is writable");
    // The shipped example is a valid gate.toml (its catalog aside, which sits beside a real one).
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(repo().join("policies/gate.toml.example")).unwrap();
    std::fs::write(dir.path().join("catalog.toml"), "").unwrap();
    let config = dir.path().join("gate.toml");
    let absent = dir.path().join("absent.key");
    let example = example.replace("/var/lib/sluice-gate/shipping-api/gate.key", absent.to_str().unwrap());
    std::fs::write(&config, example).unwrap();
    let out = Command::new(bin()).args(["--config", config.to_str().unwrap(), "gate", "run"]).output().unwrap();
    // It parses: what fails is reading the key, which does not exist here.
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains(": key:") && err.contains("absent.key"), "{err}");
}
