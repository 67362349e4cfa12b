//! The console over real TCP on loopback, against a service on a fresh store: every check of
//! `routes` refused in turn (host, session, origin, CSRF, sizes, login failures), then the
//! actions a logged-in operator takes, and what the log says about them.

use super::*;
use crate::config::ConsoleConfig;
use crate::passport::{Cents, Constraints};
use crate::service::testkit;
use crate::service::EnforceInput;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Running {
    addr: SocketAddr,
    token: String,
    fixture: testkit::Fixture,
    dir: tempfile::TempDir,
    _stop: tokio::sync::watch::Sender<bool>,
}

#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }
}

async fn start() -> Running {
    let constraints = Constraints { approval_threshold: Some(Cents(50)), ..Constraints::default() };
    let fixture = testkit::fixture_with(constraints).await;
    let dir = tempfile::tempdir().unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let config = ConsoleConfig { listen: Some("127.0.0.1:0".parse().unwrap()), ..ConsoleConfig::default() };
    let console = Console::start(&config, dir.path(), fixture.service.clone(), rx).await.unwrap().unwrap();
    let addr = console.local_addr().unwrap();
    tokio::spawn(console.serve());
    let token = std::fs::read_to_string(dir.path().join(auth::TOKEN_FILE)).unwrap().trim().to_string();
    Running { addr, token, fixture, dir, _stop: stop }
}

impl Running {
    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// One request on its own connection; `headers` are full lines.
    async fn raw(&self, method: &str, path: &str, headers: &[String], body: &[u8]) -> Reply {
        let mut s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
        if !headers.iter().any(|h| h.to_ascii_lowercase().starts_with("host:")) {
            req.push_str(&format!("Host: {}\r\n", self.addr));
        }
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        Reply { status, head: head.to_string(), body: body.to_string() }
    }

    async fn login_with(&self, token: &str) -> Reply {
        let form = format!("token={}", form_urlencoded::byte_serialize(token.as_bytes()).collect::<String>());
        let headers = [format!("Origin: {}", self.origin()), "Content-Type: application/x-www-form-urlencoded".into()];
        self.raw("POST", "/login", &headers, form.as_bytes()).await
    }

    /// Logs in; the cookie header line and the session's CSRF token.
    async fn login(&self) -> (String, String) {
        let r = self.login_with(&self.token).await;
        assert_eq!(r.status, 303, "{r:?}");
        let set = r.header("set-cookie").expect("a session cookie");
        let pair = set.split(';').next().unwrap().to_string();
        let cookie = format!("Cookie: {pair}");
        let s = self.raw("GET", "/api/session", std::slice::from_ref(&cookie), b"").await;
        assert_eq!(s.status, 200, "{s:?}");
        (cookie, s.json()["csrf"].as_str().unwrap().to_string())
    }

    async fn post(&self, path: &str, cookie: &str, csrf: &str, body: &[u8]) -> Reply {
        let headers = [cookie.to_string(), format!("Origin: {}", self.origin()), format!("X-CSRF-Token: {csrf}")];
        self.raw("POST", path, &headers, body).await
    }

    /// A request decided `request_hold` through the service; its hold id.
    async fn hold(&self) -> String {
        let input = EnforceInput {
            passport_id: self.fixture.passport.clone(),
            action: "llm:chat".into(),
            cost_cents: Some(80),
            cost_millicents: None,
            target: Some("api.openai.com".into()),
            method: None,
            path: None,
            port: None,
            signed_request_hash: None,
            gate_price: None,
        };
        let o = self.fixture.service.enforce(input).await.unwrap();
        o.hold_id().expect("a hold").to_string()
    }
}

#[tokio::test]
async fn without_a_session_only_the_login_page_and_assets_are_served_and_other_hosts_are_refused() {
    let c = start().await;
    let r = c.raw("GET", "/", &[], b"").await;
    assert_eq!((r.status, r.header("location").as_deref()), (303, Some("/login")), "{r:?}");
    let r = c.raw("GET", "/login", &[], b"").await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("name=\"token\""), "{r:?}");
    let csp = r.header("content-security-policy").unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    assert_eq!(r.header("x-frame-options").as_deref(), Some("DENY"));
    assert_eq!(c.raw("GET", "/assets/console.js", &[], b"").await.status, 200);
    for path in ["/api/overview", "/api/events", "/api/session"] {
        let r = c.raw("GET", path, &[], b"").await;
        assert_eq!(r.status, 401, "{path}: {r:?}");
        assert!(!r.body.contains("passport"), "{path} leaked data: {r:?}");
    }
    let r = c.raw("POST", "/api/verify", &[format!("Origin: {}", c.origin())], b"").await;
    assert_eq!(r.status, 401);
    // DNS rebinding: a page on attacker.example resolved to 127.0.0.1 sends its own Host.
    let (cookie, _) = c.login().await;
    for host in ["attacker.example:1234", "attacker.example", "127.0.0.1", "localhost:1"] {
        let r = c.raw("GET", "/api/overview", &[format!("Host: {host}"), cookie.clone()], b"").await;
        assert_eq!(r.status, 421, "{host}: {r:?}");
        assert!(r.body.contains("host_not_allowed"), "{r:?}");
    }
    let r = c.raw("GET", "/api/overview", &[format!("Host: localhost:{}", c.addr.port()), cookie.clone()], b"").await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = c.raw("GET", "/api/overview", &["Cookie: sluice_console=forged".into()], b"").await;
    assert_eq!(r.status, 401, "{r:?}");
}

#[tokio::test]
async fn login_needs_the_token_and_the_consoles_origin_and_failures_are_limited() {
    let c = start().await;
    let r = c.raw("POST", "/login", &[], format!("token={}", c.token).as_bytes()).await;
    assert_eq!(r.status, 403, "no Origin: {r:?}");
    assert!(r.header("set-cookie").is_none());
    let r = c
        .raw("POST", "/login", &["Origin: http://attacker.example".into()], format!("token={}", c.token).as_bytes())
        .await;
    assert_eq!(r.status, 403, "foreign Origin: {r:?}");
    let big = format!("token={}", "a".repeat(2000));
    let r = c.raw("POST", "/login", &[format!("Origin: {}", c.origin())], big.as_bytes()).await;
    assert_eq!(r.status, 413, "{r:?}");

    let r = c.login().await;
    assert!(!r.0.is_empty());
    let ok = c.login_with(&c.token).await;
    let cookie = ok.header("set-cookie").unwrap();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="] {
        assert!(cookie.contains(part), "{cookie}");
    }

    for wrong in ["", "x", &c.token[1..], &format!("{}A", c.token)] {
        let r = c.login_with(wrong).await;
        assert_eq!(r.status, 401, "{wrong:?}: {r:?}");
        assert!(r.header("set-cookie").is_none() && r.body.contains("Wrong token"), "{r:?}");
    }
    // One more failure reaches the limit; then even the right token waits.
    assert_eq!(c.login_with("y").await.status, 401);
    let r = c.login_with(&c.token).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert!(r.header("retry-after").is_some() && r.header("set-cookie").is_none(), "{r:?}");
}

#[tokio::test]
async fn a_hold_is_approved_from_the_console_only_with_origin_and_csrf_and_attested_as_the_console_user() {
    let c = start().await;
    let (cookie, csrf) = c.login().await;
    let hold = c.hold().await;
    let overview = c.raw("GET", "/api/overview", std::slice::from_ref(&cookie), b"").await.json();
    assert_eq!(overview["holds"]["holds"][0]["id"], hold.as_str(), "{overview}");
    assert_eq!(overview["agents"]["agents"][0]["passport_id"], c.fixture.passport.as_str(), "{overview}");
    assert!(overview["records"]["records"].as_array().is_some_and(|r| !r.is_empty()), "{overview}");
    assert_eq!(overview["errors"], serde_json::json!([]), "{overview}");

    let path = format!("/api/holds/{hold}/approve");
    // Without the CSRF token, with another one, from another origin, without an origin.
    let refusals = [
        vec![cookie.clone(), format!("Origin: {}", c.origin())],
        vec![cookie.clone(), format!("Origin: {}", c.origin()), "X-CSRF-Token: forged".into()],
        vec![cookie.clone(), "Origin: http://attacker.example".into(), format!("X-CSRF-Token: {csrf}")],
        vec![cookie.clone(), format!("X-CSRF-Token: {csrf}")],
    ];
    for headers in refusals {
        let r = c.raw("POST", &path, &headers, b"{}").await;
        assert_eq!(r.status, 403, "{headers:?}: {r:?}");
    }
    assert_eq!(c.fixture.service.hold(&hold).unwrap().status, crate::service::HoldStatus::Pending);
    let r = c.post(&path, &cookie, &csrf, &vec![b' '; 5000]).await;
    assert_eq!(r.status, 413, "{r:?}");
    let r = c.post(&path, &cookie, &csrf, br#"{"note":"a","note":"b"}"#).await;
    assert_eq!(r.status, 400, "duplicate members: {r:?}");

    let r = c.post(&path, &cookie, &csrf, br#"{"note":"looked fine"}"#).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["decision"], "allow", "{r:?}");
    let index = r.json()["attestation_id"].as_u64().unwrap();
    let record = testkit::record(&c.fixture, index);
    assert_eq!(record["kind"], "hold_resolution", "{record}");
    assert_eq!(record["by"]["user"], CONSOLE_USER, "{record}");
    assert_eq!(record["by"]["pid"], std::process::id(), "{record}");
    assert_eq!(record["note"], "looked fine", "{record}");
    // Again: already resolved, the API's own answer.
    let r = c.post(&path, &cookie, &csrf, b"").await;
    assert_eq!(r.status, 409, "{r:?}");

    let other = c.hold().await;
    let r = c.post(&format!("/api/holds/{other}/deny"), &cookie, &csrf, b"").await;
    assert_eq!((r.status, r.json()["reason"].as_str()), (200, Some("hold_denied")), "{r:?}");
    let r = c.post("/api/holds/hold_nope/approve", &cookie, &csrf, b"").await;
    assert_eq!(r.status, 404, "{r:?}");
}

#[tokio::test]
async fn verify_now_checks_the_stored_log_and_logout_ends_the_session() {
    let c = start().await;
    let (cookie, csrf) = c.login().await;
    let r = c.raw("POST", "/api/verify", &[cookie.clone(), format!("Origin: {}", c.origin())], b"").await;
    assert_eq!(r.status, 403, "{r:?}");
    let r = c.post("/api/verify", &cookie, &csrf, b"").await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["records_checked"].as_u64().unwrap() >= 2, "{v}");
    let overview = c.raw("GET", "/api/overview", std::slice::from_ref(&cookie), b"").await.json();
    assert_eq!(overview["verification"]["ok"], true, "{overview}");
    assert!(overview["checkpoint"]["size"].as_u64().is_some(), "{overview}");
    assert_eq!(std::fs::read_dir(c.dir.path()).unwrap().count(), 1, "only console.token stays in the state dir");

    let r = c.post("/logout", &cookie, &csrf, b"").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(c.raw("GET", "/api/overview", std::slice::from_ref(&cookie), b"").await.status, 401);
}

#[tokio::test]
async fn the_event_stream_sends_the_overview_and_then_each_new_hold() {
    let c = start().await;
    let (cookie, _) = c.login().await;
    let mut s = tokio::net::TcpStream::connect(c.addr).await.unwrap();
    let req = format!("GET /api/events HTTP/1.1\r\nHost: {}\r\n{cookie}\r\n\r\n", c.addr);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut seen = String::new();
    read_until(&mut s, &mut seen, "event: overview").await;
    let hold = c.hold().await;
    read_until(&mut s, &mut seen, &hold).await;
    assert!(seen.contains("text/event-stream"), "{seen}");

    // Streams are bounded.
    let mut open = Vec::new();
    for _ in 0..sse::MAX_STREAMS {
        let mut t = tokio::net::TcpStream::connect(c.addr).await.unwrap();
        t.write_all(req.as_bytes()).await.unwrap();
        open.push(t);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = c.raw("GET", "/api/events", std::slice::from_ref(&cookie), b"").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("too_many_streams"), "{r:?}");
}

/// Reads the stream into `seen` until it holds `needle`.
async fn read_until(s: &mut tokio::net::TcpStream, seen: &mut String, needle: &str) {
    let mut buf = vec![0u8; 65536];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen.contains(needle) {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf)).await.expect("no event in time").unwrap();
        assert!(n > 0, "stream closed: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[tokio::test]
async fn the_emergency_stop_works_from_the_console_only_with_origin_and_csrf_and_is_attested() {
    let c = start().await;
    let (cookie, csrf) = c.login().await;
    let hold = c.hold().await;
    let body = format!(r#"{{"passport_id":"{}","note":"runaway spend"}}"#, c.fixture.passport);
    // Refused without the CSRF token or from another origin; nothing is stopped.
    for headers in [
        vec![cookie.clone(), format!("Origin: {}", c.origin())],
        vec![cookie.clone(), "Origin: http://attacker.example".into(), format!("X-CSRF-Token: {csrf}")],
    ] {
        let r = c.raw("POST", "/api/stop", &headers, body.as_bytes()).await;
        assert_eq!(r.status, 403, "{headers:?}: {r:?}");
    }
    assert!(c.fixture.service.stops().passports.is_empty());
    // Bad bodies: both scopes, neither, unknown or duplicate members.
    for bad in [
        format!(r#"{{"passport_id":"{}","all":true}}"#, c.fixture.passport),
        "{}".to_string(),
        r#"{"all":true,"force":1}"#.to_string(),
        r#"{"all":true,"all":false}"#.to_string(),
    ] {
        let r = c.post("/api/stop", &cookie, &csrf, bad.as_bytes()).await;
        assert_eq!(r.status, 400, "{bad}: {r:?}");
    }

    let r = c.post("/api/stop", &cookie, &csrf, body.as_bytes()).await;
    assert_eq!(r.status, 200, "{r:?}");
    let answer = r.json();
    assert_eq!(answer["holds_denied"], serde_json::json!([hold]), "{answer}");
    let record = testkit::record(&c.fixture, answer["attestation_id"].as_u64().unwrap());
    assert_eq!(record["kind"], "emergency_stop", "{record}");
    assert_eq!(record["by"]["user"], CONSOLE_USER, "{record}");
    assert_eq!(record["note"], "runaway spend", "{record}");
    assert!(c.fixture.service.stops().passports.contains_key(&c.fixture.passport));
    // The overview the page draws from shows it.
    let overview = c.raw("GET", "/api/overview", std::slice::from_ref(&cookie), b"").await.json();
    assert_eq!(overview["stops"]["passports"][0]["passport_id"], c.fixture.passport.as_str(), "{overview}");

    let r = c.post("/api/resume", &cookie, &csrf, body.as_bytes()).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(c.fixture.service.stops().passports.is_empty());
    let r = c.post("/api/stop", &cookie, &csrf, br#"{"all":true}"#).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(c.fixture.service.stops().all.is_some());
    let r = c.post("/api/resume", &cookie, &csrf, br#"{"all":true}"#).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(c.fixture.service.stops().all.is_none());
}
