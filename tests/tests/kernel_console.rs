//! The operator's console is out of an agent's reach. It listens on a loopback address of the
//! host, but the kernel redirect catches every connection a sandboxed process makes, loopback
//! included, and hands it to the proxy, which decides it against the agent's passport like any
//! other request. Dialing the console's address is refused (`403 invalid_host`: an IP literal
//! names nothing); `localhost` is allowed by this passport but the daemon never dials a loopback
//! answer (`502`); and even a name the operator mapped to 127.0.0.1 only carries the agent's own
//! `Host` to the console, which refuses it (`421`, the DNS-rebinding check). The agent never gets
//! a console page, a login or a session, even holding the token. The same requests from outside
//! the sandbox reach the console (the control).

use sluice_e2e::daemon::Daemon;
use sluice_e2e::{free_port, root_or_skip};
use std::process::{Command, Output};

/// `curl -sS -i` printed output: status, lowercased head, body.
fn parse(out: &Output) -> (u16, String, String) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// What the agent sends, and what each must get instead of the console.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// sluice's own `403`: the agent dialed an IP literal, which names nothing.
    Refused,
    /// `502`: allowed by the passport, but the daemon never dials a loopback answer of a name.
    NoLoopback,
    /// The console's own `421`: a name the operator mapped to loopback reaches the port, and
    /// the console refuses the agent's `Host` (a name, never the console's address).
    WrongHost,
}

fn requests(port: u16, token: &str) -> Vec<(&'static str, Expect, Vec<String>)> {
    let origin = format!("Origin: http://127.0.0.1:{port}");
    vec![
        ("login page", Expect::Refused, vec![format!("http://127.0.0.1:{port}/login")]),
        (
            "login post",
            Expect::Refused,
            vec![
                "-H".into(),
                origin.clone(),
                "--data".into(),
                format!("token={token}"),
                format!("http://127.0.0.1:{port}/login"),
            ],
        ),
        ("overview via localhost", Expect::NoLoopback, vec![format!("http://localhost:{port}/api/overview")]),
        (
            "login post via a name mapped to 127.0.0.1",
            Expect::WrongHost,
            vec![
                "-H".into(),
                origin,
                "--data".into(),
                format!("token={token}"),
                format!("http://{MAPPED}:{port}/login"),
            ],
        ),
    ]
}

/// A name `[dns] static_hosts` maps to 127.0.0.1, as an operator might for a local service.
const MAPPED: &str = "loopback-service.example.test";

#[test]
fn a_sandboxed_agent_never_gets_a_console_page_or_session() {
    if !root_or_skip("a_sandboxed_agent_never_gets_a_console_page_or_session") {
        return;
    }
    let port = free_port();
    let d = Daemon::start_custom(
        "root",
        &format!("static_hosts = {{ \"{MAPPED}\" = \"127.0.0.1\" }}"),
        &format!("[console]\nlisten = \"127.0.0.1:{port}\"\n"),
        &[],
    );
    let token_file = d.dir.path().join("state/console.token");
    let token = std::fs::read_to_string(&token_file).expect("the daemon made console.token").trim().to_string();
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&token_file).unwrap().mode() & 0o777, 0o600);
    }
    let (passport, passport_id) = d.issue("curious", &["--permission", "web:*"]);

    // Control: the host's own curl reaches the console.
    let control = |args: &[String]| {
        parse(
            &Command::new("curl")
                .args(["-sS", "-i", "--noproxy", "*", "--max-time", "20"])
                .args(args)
                .output()
                .unwrap(),
        )
    };
    let (status, _, body) = control(&[format!("http://127.0.0.1:{port}/login")]);
    assert!(status == 200 && body.contains("sluice console"), "{status}\n{body}");
    let (status, head, _) = control(&[
        "-H".into(),
        format!("Origin: http://127.0.0.1:{port}"),
        "--data".into(),
        format!("token={token}"),
        format!("http://127.0.0.1:{port}/login"),
    ]);
    assert!(status == 303 && head.contains("set-cookie: sluice_console="), "{status} {head}");

    for (what, expect, args) in requests(port, &token) {
        let mut cmd =
            vec!["run", "--passport", passport.to_str().unwrap(), "--", "curl", "-sS", "-i", "--max-time", "20"];
        cmd.extend(args.iter().map(String::as_str));
        let out = d.cli(&cmd);
        let (status, head, body) = parse(&out);
        let why = format!("{what}: {status}\n{head}\n{body}\n{}\n{}", String::from_utf8_lossy(&out.stderr), d.log());
        assert!(!head.contains("set-cookie"), "a session reached the agent: {why}");
        assert!(
            !body.contains("sluice console") && !body.contains("login_required"),
            "the console served the agent: {why}"
        );
        match expect {
            Expect::Refused => {
                assert_eq!(status, 403, "{why}");
                assert!(head.contains("sluice-decision: block; reason=invalid_host"), "{why}");
            }
            Expect::NoLoopback => {
                assert_eq!(status, 502, "{why}");
                assert!(body.contains("upstream"), "{why}");
            }
            Expect::WrongHost => {
                assert_eq!(status, 421, "{why}");
                assert!(body.contains("host_not_allowed"), "{why}");
            }
        }
    }
    // No console session was opened for the agent: only the control's one login is in the log.
    assert_eq!(d.log().matches("console: login").count(), 1, "{}", d.log());
    // The two IP-literal requests are refusals on the agent's chain.
    let export_path = d.dir.path().join("agent.json");
    let out = d.cli(&["audit", "export", "--passport", &passport_id, "--out", export_path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let export: serde_json::Value = serde_json::from_slice(&std::fs::read(&export_path).unwrap()).unwrap();
    let blocks = export["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str::<serde_json::Value>(r["record"].as_str().unwrap()).unwrap())
        .filter(|r| r["kind"] == "decision" && r["decision"] == "block" && r["reason"] == "invalid_host")
        .count();
    assert_eq!(blocks, 2, "{export}");
}
