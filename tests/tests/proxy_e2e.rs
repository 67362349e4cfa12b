//! The intercepting proxy end to end: a real `sluice daemon` with the eBPF redirect, agents run
//! by `sluice run` (curl and python3 urllib, every proxy variable unset), a real HTTPS upstream
//! on loopback with a test CA (`upstream_tls.extra_roots`), names through `[dns] static_hosts`.
//!
//! Each test ends with `sluice audit export` + `sluice audit verify`, and checks that what it
//! did is in the log.

use serde_json::Value;
use sluice_e2e::daemon::Daemon;
use sluice_e2e::upstream::{TestCa, Upstream};
use sluice_e2e::{free_port, python, root_or_skip, Canary, HANG_GUARD};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

const API: &str = "api.example.test";
const OTHER: &str = "other.example.test";
/// Allowed, resolvable, but nothing listens where it points.
const DOWN: &str = "down.example.test";

const POLICY: &str = r#"
[service]
name = "example"
domains = ["api.example.test"]

[[route]]
id = "pay"
method = "POST"
path = "/pay"
action = "pay:charge"
cost_cents = 60

[[route]]
id = "ws"
method = "GET"
path = "/ws"
action = "web:ws"
cost_cents = 0
"#;

struct World {
    d: Daemon,
    up: Upstream,
    dns_canary: Canary,
    rt: tokio::runtime::Runtime,
    port: u16,
    _ca_dir: tempfile::TempDir,
}

impl World {
    fn new(policy: &str, hold_timeout: u64) -> World {
        World::build(policy, hold_timeout, "", "")
    }

    /// As [`World::new`], with lines added to the daemon's `[proxy]` and `[sandbox]` sections.
    fn build(policy: &str, hold_timeout: u64, proxy_extra: &str, sandbox_extra: &str) -> World {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let ca = TestCa::new();
        let ca_dir = tempfile::tempdir().unwrap();
        let ca_path = ca.write(ca_dir.path());
        let port = free_port();
        let up = Upstream::start(&rt, SocketAddr::from(([127, 0, 0, 1], port)), &[API, OTHER], &ca);
        // The daemon's own DNS goes to a canary that never answers: an agent's query for any
        // name must never show up there.
        let dns_canary = Canary::udp(&rt, SocketAddr::from(([127, 0, 0, 1], free_port())));
        let dns_extra = format!(
            "upstream = [\"{}\"]\nstatic_hosts = {{ \"{API}\" = \"127.0.0.1\", \"{OTHER}\" = \"127.0.0.1\", \"{DOWN}\" = \"127.0.0.1\" }}",
            dns_canary.addr
        );
        let extra = format!(
            "{sandbox_extra}\n[upstream_tls]\nextra_roots = [\"{}\"]\n[holds]\ntimeout_secs = {hold_timeout}\n",
            ca_path.display()
        );
        let d = Daemon::start_full("root", proxy_extra, &dns_extra, &extra, &[("example.toml", policy)]);
        World { d, up, dns_canary, rt, port, _ca_dir: ca_dir }
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.port)
    }

    /// `sluice run --passport P -- CMD…`
    fn agent(&self, passport: &Path, cmd: &[&str]) -> Output {
        let mut args = vec!["run", "--passport", passport.to_str().unwrap(), "--"];
        args.extend_from_slice(cmd);
        self.d.cli(&args)
    }

    fn curl(&self, passport: &Path, extra: &[&str]) -> Http {
        let mut cmd = vec!["curl", "-sS", "-i", "--max-time", "60"];
        cmd.extend_from_slice(extra);
        let out = self.agent(passport, &cmd);
        Http::parse(&out).unwrap_or_else(|| {
            panic!(
                "curl {extra:?}: {:?}\nstdout: {}\nstderr: {}\ndaemon:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.d.log()
            )
        })
    }

    fn python(&self, passport: &Path, script: &str, args: &[&str]) -> Value {
        let py = python().to_str().unwrap().to_string();
        let mut cmd = vec![py.as_str(), "-c", script];
        cmd.extend_from_slice(args);
        let out = self.agent(passport, &cmd);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "python: {e}: {:?}\nstdout: {stdout}\nstderr: {}\ndaemon:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.d.log()
            )
        })
    }
}

/// A response as `curl -i` printed it (the last one, after any `100 Continue`).
#[derive(Debug)]
struct Http {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Http {
    fn parse(out: &Output) -> Option<Http> {
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut rest = text.as_str();
        loop {
            let (head, body) = rest.split_once("\r\n\r\n")?;
            let mut lines = head.lines();
            let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
            if status == 100 {
                rest = body;
                continue;
            }
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            return Some(Http { status, headers, body: body.to_string() });
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(self.body.trim()).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

fn decisions<'a>(records: &'a [Value], reason: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["kind"] == "decision" && r["reason"] == reason).collect()
}

#[test]
fn proxy_allows_blocks_and_refuses_bypasses() {
    if !root_or_skip("proxy_allows_blocks_and_refuses_bypasses") {
        return;
    }
    // A plain TCP echo service, reachable only through a [[raw_tcp]] rule.
    let echo_port = free_port();
    let policy =
        format!("{POLICY}\n[[raw_tcp]]\nhost = \"{API}\"\nport = {echo_port}\naction = \"tcp:echo\"\ncost_cents = 0\n");
    let w = World::new(&policy, 120);
    let echo = start_echo(&w.rt, SocketAddr::from(([127, 0, 0, 1], echo_port)));
    let (passport, passport_id) = w.d.issue(
        "agent",
        &[
            "--permission",
            "web:*",
            "--permission",
            "pay:*",
            "--permission",
            "tcp:*",
            "--constraint",
            &format!("core:scope:domain_allowlist=[\"{API}\", \"{DOWN}\"]"),
            "--constraint",
            "core:cost:max_cumulative=100",
        ],
    );

    // 1. An allowed call returns the real response (curl), with the decision's attestation.
    let r = w.curl(&passport, &[&w.url(API, "/hello")]);
    assert_eq!(r.status, 200, "{r:?}\n{}", w.d.log());
    assert!(r.body.starts_with(&format!("hello {API}:{}", w.port)), "{r:?}");
    assert!(r.header("sluice-decision").is_some_and(|v| v.starts_with("allow; attestation=")), "{r:?}");

    // ... and with python3 urllib, two requests on one keep-alive connection, each decided.
    let script = r#"
import http.client, json, ssl, sys
host, port = sys.argv[1], int(sys.argv[2])
c = http.client.HTTPSConnection(host, port, context=ssl.create_default_context(), timeout=60)
out = []
for i in range(2):
    c.request("GET", "/hello?n=%d" % i)
    r = c.getresponse()
    out.append([r.status, r.read().decode(), r.getheader("sluice-decision")])
import urllib.request
u = urllib.request.urlopen("https://%s:%d/hello?via=urllib" % (host, port), timeout=60)
out.append([u.status, u.read().decode(), u.headers.get("sluice-decision")])
print(json.dumps(out))
"#;
    let v = w.python(&passport, script, &[API, &w.port.to_string()]);
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 3);
    let ids: Vec<&str> = list
        .iter()
        .map(|e| {
            assert_eq!(e[0], 200, "{v}");
            e[2].as_str().unwrap()
        })
        .collect();
    assert!(ids[0] != ids[1], "two keep-alive requests share one decision: {ids:?}");

    // 2. A domain the passport does not allow: its DNS answer is NXDOMAIN (below), so the agent
    // dials an address itself; 403 with the decision JSON; never forwarded.
    let r = w.curl(&passport, &["--resolve", &format!("{OTHER}:{}:127.0.0.1", w.port), &w.url(OTHER, "/hello")]);
    assert_eq!(r.status, 403, "{r:?}");
    let j = r.json();
    assert_eq!(j["decision"], "block");
    assert_eq!(j["reason"], "domain_not_allowed");
    assert!(j["attestation_id"].is_u64());
    assert!(r.header("sluice-decision").unwrap().starts_with("block; reason=domain_not_allowed"), "{r:?}");
    assert!(w.up.seen().iter().all(|s| !s.host.starts_with(OTHER)), "{:?}", w.up.seen());

    // 3. Over budget: 60 of 100 cents spent, the next 60 is refused with the spend detail.
    let r = w.curl(&passport, &["-X", "POST", "--data", "x", &w.url(API, "/pay")]);
    assert_eq!(r.status, 200, "{r:?}");
    let r = w.curl(&passport, &["-X", "POST", "--data", "x", &w.url(API, "/pay")]);
    assert_eq!(r.status, 403, "{r:?}");
    let j = r.json();
    assert_eq!(j["reason"], "spend_limit_exceeded", "{j}");
    let detail = j["detail"].as_str().unwrap();
    assert!(detail.contains("$1.00") && detail.contains("$0.60"), "{detail}");
    assert_eq!(w.up.count("/pay"), 1);

    // 4. Domain fronting: TLS for an allowed name, Host for another.
    let before = w.up.seen().len();
    let r = w.curl(&passport, &["-H", &format!("Host: {OTHER}:{}", w.port), &w.url(API, "/hello")]);
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["reason"], "domain_fronting");
    // Case and a trailing dot are the same name, not fronting.
    let r = w.curl(&passport, &["-H", &format!("Host: API.Example.Test.:{}", w.port), &w.url(API, "/hello")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(w.up.seen().len(), before + 1);

    // ... and over HTTP/2, where curl sends the Host header as :authority.
    let r = w.curl(&passport, &["--http2", "-H", &format!("Host: {OTHER}:{}", w.port), &w.url(API, "/hello")]);
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["reason"], "domain_fronting");
    assert_eq!(w.up.seen().len(), before + 1);

    // 5. An allowed SNI sent to another IP: the proxy dials what it resolves itself.
    let elsewhere = Canary::tcp(&w.rt, SocketAddr::from(([127, 0, 0, 99], w.port)));
    let r = w.curl(&passport, &["--resolve", &format!("{API}:{}:127.0.0.99", w.port), &w.url(API, "/hello?elsewhere")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(elsewhere.hits(), 0, "the agent reached the address it dialed");
    assert_eq!(w.up.count("/hello"), w.up.seen().iter().filter(|s| s.path.starts_with("/hello")).count());
    assert!(w.up.seen().iter().any(|s| s.path == "/hello?elsewhere"));

    // 6. Smuggling: Content-Length with Transfer-Encoding, a request hidden in the body.
    let script = r#"
import json, socket, ssl, sys
host, port = sys.argv[1], int(sys.argv[2])
ctx = ssl.create_default_context()
ctx.set_alpn_protocols(["http/1.1"])
s = ctx.wrap_socket(socket.create_connection((host, port), timeout=60), server_hostname=host)
hidden = "GET /smuggled HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (host, port)
body = "0\r\n\r\n" + hidden
req = ("POST /echo HTTP/1.1\r\nHost: %s:%d\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % (host, port, len(body))) + body
s.sendall(req.encode())
data = b""
while True:
    try:
        chunk = s.recv(65536)
    except Exception:
        break
    if not chunk:
        break
    data += chunk
print(json.dumps({"response": data.decode("latin1")}))
"#;
    let v = w.python(&passport, script, &[API, &w.port.to_string()]);
    let resp = v["response"].as_str().unwrap();
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("request_smuggling"), "{resp}");
    assert_eq!(w.up.count("/echo"), 0);
    assert_eq!(w.up.count("/smuggled"), 0);

    // 7. HTTP/2 with several concurrent streams on one connection: the upstream answers only
    // once three /barrier requests are in flight together.
    let barrier = w.url(API, "/barrier?n=3");
    let out = w.agent(
        &passport,
        &[
            "curl",
            "-sS",
            "--http2",
            "--parallel",
            "--parallel-max",
            "3",
            "--max-time",
            "90",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code} %{num_connects}\\n",
            &barrier,
            &barrier,
            &barrier,
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<Vec<&str>> = stdout.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines.len(), 3, "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for l in &lines {
        assert_eq!(l.first().copied(), Some("2"), "{stdout}");
        assert_eq!(l.get(1).copied(), Some("200"), "{stdout}");
    }
    let connects: u32 = lines.iter().filter_map(|l| l.get(2)?.parse::<u32>().ok()).sum();
    assert_eq!(connects, 1, "the three streams did not share one connection: {stdout}");
    assert_eq!(w.up.count("/barrier"), 3);

    // 8. A streamed (SSE) response arrives in pieces: the client acknowledges each event before
    // the upstream sends the next, so only a proxy that streams lets it finish.
    let script = r#"
import json, sys, urllib.request
base = sys.argv[1]
r = urllib.request.urlopen(base + "/sse", timeout=90)
events = []
while len(events) < 3:
    line = r.readline().decode().strip()
    if not line:
        continue
    events.append(line)
    if line == "data: timeout":
        break
    if len(events) < 3:
        urllib.request.urlopen(base + "/ack?n=%d" % len(events), timeout=60).read()
print(json.dumps({"events": events, "type": r.headers.get("content-type")}))
"#;
    let v = w.python(&passport, script, &[&format!("https://{API}:{}", w.port)]);
    assert_eq!(v["events"], serde_json::json!(["data: 1", "data: 2", "data: 3"]), "{v}");
    assert_eq!(v["type"], "text/event-stream");

    // 9. DNS: an allowed name gets a synthetic address; a disallowed one NXDOMAIN; neither
    // query leaves the host.
    let script = r#"
import json, socket, sys
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = sorted({a[4][0] for a in socket.getaddrinfo(name, 443, proto=socket.IPPROTO_TCP)})
    except socket.gaierror as e:
        out[name] = "gaierror %d" % e.errno
print(json.dumps(out))
"#;
    let v = w.python(&passport, script, &[API, "denied.example.test"]);
    let allowed = v[API].as_array().unwrap_or_else(|| panic!("{v}"));
    assert!(
        allowed.iter().any(|a| a.as_str().is_some_and(|a| a.starts_with("198.18.") || a.starts_with("198.19."))),
        "{v}"
    );
    assert_eq!(v["denied.example.test"], format!("gaierror {}", libc_eai_noname()), "{v}");
    assert_eq!(w.dns_canary.hits(), 0, "an agent's DNS query left the host");

    // 10. Non-HTTP bytes on the allowed HTTPS port: raw-TCP policy, default block (closed).
    // The same bytes to the port a [[raw_tcp]] rule allows reach the echo service, and so does
    // a CONNECT tunnel to it; a CONNECT anywhere else is refused.
    let script = r#"
import json, socket, ssl, sys
host, port, echo = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def raw(p):
    s = socket.create_connection((host, p), timeout=60)
    s.sendall(b"\x00\x01 not http\r\n")
    try:
        return s.recv(100).decode("latin1")
    except Exception as e:
        return "error: %s" % e
def connect(target):
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["http/1.1"])
    s = ctx.wrap_socket(socket.create_connection((host, port), timeout=60), server_hostname=host)
    s.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target)).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        c = s.recv(1)
        if not c:
            break
        head += c
    status = head.split(b" ")[1].decode() if head else "closed"
    if status != "200":
        return [status, head.decode("latin1")]
    s.sendall(b"through the tunnel")
    return [status, s.recv(100).decode()]
print(json.dumps({"https_port": raw(port), "echo_port": raw(echo),
                  "connect_ok": connect("%s:%d" % (host, echo)), "connect_denied": connect("%s:5432" % host)}))
"#;
    let v = w.python(&passport, script, &[API, &w.port.to_string(), &echo_port.to_string()]);
    assert_eq!(v["https_port"], "", "non-HTTP bytes got an answer: {v}");
    assert_eq!(v["echo_port"], "\u{0}\u{1} not http\r\n", "{v}");
    assert_eq!(v["connect_ok"], serde_json::json!(["200", "through the tunnel"]), "{v}");
    assert_eq!(v["connect_denied"][0], "403", "{v}");
    assert!(v["connect_denied"][1].as_str().unwrap().contains("connect_denied"), "{v}");
    drop(echo);

    // 11. WebSocket: an upgrade on a path with a policy route is decided and tunnelled; an
    // upgrade elsewhere is refused.
    let script = r#"
import json, socket, ssl, sys
host, port = sys.argv[1], int(sys.argv[2])
def upgrade(path):
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["http/1.1"])
    s = ctx.wrap_socket(socket.create_connection((host, port), timeout=60), server_hostname=host)
    s.sendall(("GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" % (path, host, port)).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        c = s.recv(1)
        if not c:
            break
        head += c
    status = head.split(b" ")[1].decode() if head else "closed"
    if status != "101":
        return [status, head.decode("latin1")]
    s.sendall(b"frames go both ways")
    return [status, s.recv(100).decode()]
print(json.dumps({"ws": upgrade("/ws"), "elsewhere": upgrade("/hello")}))
"#;
    let v = w.python(&passport, script, &[API, &w.port.to_string()]);
    assert_eq!(v["ws"], serde_json::json!(["101", "frames go both ways"]), "{v}");
    assert_eq!(v["elsewhere"][0], "403", "{v}");
    assert!(v["elsewhere"][1].as_str().unwrap().contains("upgrade_denied"), "{v}");

    // 12. An allowed name whose service is down: 502 with a JSON body, attested.
    let closed = free_port();
    let r = w.curl(&passport, &[&format!("https://{DOWN}:{closed}/hello")]);
    assert_eq!(r.status, 502, "{r:?}");
    let j = r.json();
    assert_eq!(j["error"], "upstream_failed", "{j}");
    assert!(j["decision_attestation_id"].is_u64() && j["attestation_id"].is_u64(), "{j}");

    // Everything is in the log, and the log verifies.
    let records = w.d.verified_records();
    let mine: Vec<&Value> = records.iter().filter(|r| r["passport_id"] == passport_id.as_str()).collect();
    assert!(mine.iter().filter(|r| r["decision"] == "allow").count() >= 8, "{mine:#?}");
    for reason in [
        "domain_not_allowed",
        "spend_limit_exceeded",
        "domain_fronting",
        "request_smuggling",
        "raw_tcp_denied",
        "connect_denied",
    ] {
        assert!(!decisions(&records, reason).is_empty(), "no {reason} decision in the log");
    }
    assert!(
        records.iter().any(|r| r["kind"] == "dns_denied" && r["name"] == "denied.example.test"),
        "the NXDOMAIN is not in the log"
    );
    assert!(records.iter().any(|r| r["kind"] == "upstream_error" && r["host"] == DOWN), "the 502 is not in the log");
}

struct Echo {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A plain TCP echo service (the "outside" raw-TCP destination).
fn start_echo(rt: &tokio::runtime::Runtime, addr: SocketAddr) -> Echo {
    let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).expect("bind echo");
    let task = rt.spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Echo { task }
}

fn libc_eai_noname() -> i32 {
    -2 // EAI_NONAME in glibc
}

/// Polls `sluice holds --json` until a hold is pending; returns its id.
fn wait_for_hold(d: &Daemon) -> String {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let out = d.cli(&["holds", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(id) = v["holds"].as_array().and_then(|a| a.first()).and_then(|h| h["id"].as_str()) {
            return id.to_string();
        }
        assert!(Instant::now() < deadline, "no hold appeared:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn_curl(w: &World, passport: &Path, url: &str) -> std::process::Child {
    let p = passport.to_str().unwrap();
    w.d.cli_command(&[
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
        "POST",
        "--data",
        "x",
        url,
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap()
}

fn finish(child: std::process::Child) -> Http {
    let guard = sluice_e2e::ChildGuard(Some(child));
    let mut guard = guard;
    let child = guard.0.take().unwrap();
    let out = child.wait_with_output().unwrap();
    Http::parse(&out).unwrap_or_else(|| panic!("curl failed: {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn proxy_holds_wait_for_an_operator() {
    if !root_or_skip("proxy_holds_wait_for_an_operator") {
        return;
    }
    let w = World::new(POLICY, 120);
    let (passport, _) = w.d.issue(
        "held",
        &["--permission", "pay:*", "--permission", "web:*", "--constraint", "core:cost:approval_threshold=50"],
    );
    let url = w.url(API, "/pay");

    // Approved from outside with `sluice holds approve`, then forwarded.
    let child = spawn_curl(&w, &passport, &url);
    let hold = wait_for_hold(&w.d);
    assert_eq!(w.up.count("/pay"), 0, "a held request reached the upstream");
    let out = w.d.cli(&["holds", "approve", &hold, "--note", "e2e"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = finish(child);
    assert_eq!(r.status, 200, "{r:?}\n{}", w.d.log());
    assert_eq!(r.body, "paid\n");
    assert_eq!(w.up.count("/pay"), 1);

    // Denied: 403 with hold_denied; never forwarded.
    let child = spawn_curl(&w, &passport, &url);
    let hold = wait_for_hold(&w.d);
    let out = w.d.cli(&["holds", "deny", &hold, "--note", "no"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = finish(child);
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["reason"], "hold_denied", "{r:?}");
    assert_eq!(w.up.count("/pay"), 1);

    let records = w.d.verified_records();
    let resolutions: Vec<&Value> = records.iter().filter(|r| r["kind"] == "hold_resolution").collect();
    assert_eq!(resolutions.len(), 2, "{resolutions:#?}");
}

/// `systemctl stop` in the middle of a request: the request in flight is answered in full (the
/// check that fails without the drain: curl saw its HTTP/2 stream cut), the daemon exits within
/// the drain without cutting anything, and the log, verified after a restart, holds the
/// request's decision before the `daemon_stop` record.
#[test]
fn a_request_in_flight_when_the_daemon_stops_is_answered() {
    if !root_or_skip("a_request_in_flight_when_the_daemon_stops_is_answered") {
        return;
    }
    let mut w = World::new(POLICY, 120);
    let (passport, _) = w.d.issue("slow", &["--permission", "web:*"]);
    let p = passport.to_str().unwrap().to_string();
    let url = w.url(API, "/slow?ms=1500");
    let child =
        w.d.cli_command(&["run", "--passport", &p, "--", "curl", "-sS", "-i", "--max-time", "60", &url])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    // Decided and forwarded: the upstream holds it for 1.5 s.
    let deadline = Instant::now() + HANG_GUARD;
    while w.up.count("/slow") == 0 {
        assert!(Instant::now() < deadline, "the request never reached the upstream:\n{}", w.d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let stopped = Instant::now();
    w.d.term();
    let r = finish(child);
    assert_eq!(r.status, 200, "{r:?}\n{}", w.d.log());
    assert_eq!(r.body, "slow 1500\n");
    while w.d.alive() {
        assert!(stopped.elapsed() < Duration::from_secs(30), "the daemon did not stop:\n{}", w.d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = w.d.log();
    assert!(log.contains("letting the connections in flight finish"), "{log}");
    assert!(!log.contains("drain are cut"), "{log}");

    // The decision (the only one; recorded before forwarding, as always) and then the stop, in
    // the log a restarted daemon exports and verifies.
    w.d.spawn();
    let records = w.d.verified_records();
    let decided = records
        .iter()
        .position(|r| r["kind"] == "decision" && r["decision"] == "allow" && r["host"] == API)
        .unwrap_or_else(|| panic!("no decision of /slow: {records:#?}"));
    let stop = records.iter().position(|r| r["kind"] == "daemon_stop").expect("a daemon_stop record");
    assert!(decided < stop, "the decision ({decided}) is recorded before the stop ({stop})");
}

#[test]
fn proxy_hold_times_out() {
    if !root_or_skip("proxy_hold_times_out") {
        return;
    }
    let w = World::new(POLICY, 1);
    let (passport, _) =
        w.d.issue("slow", &["--permission", "pay:*", "--constraint", "core:cost:approval_threshold=50"]);
    let r = finish(spawn_curl(&w, &passport, &w.url(API, "/pay")));
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["reason"], "hold_timeout", "{r:?}");
    assert_eq!(w.up.count("/pay"), 0);
    let records = w.d.verified_records();
    assert!(records.iter().any(|r| r["kind"] == "hold_resolution" && r["reason"] == "hold_timeout"));
}

#[test]
fn proxy_policy_reloads_on_sighup_and_keeps_the_old_one_on_errors() {
    if !root_or_skip("proxy_policy_reloads_on_sighup_and_keeps_the_old_one_on_errors") {
        return;
    }
    let w = World::new(POLICY, 120);
    let (passport, _) = w.d.issue("reload", &["--permission", "web:*", "--permission", "pay:*"]);
    let policy_file: PathBuf = w.d.dir.path().join("policies/host.toml");

    // A broken file: the reload fails, the old policy stays, the failure is attested.
    std::fs::write(&policy_file, "[host]\ndeny_domains = [\"api.example.test\"]\nbogus = 1\n").unwrap();
    w.d.hup();
    wait_log(&w.d, "host policy reload failed");
    let r = w.curl(&passport, &[&w.url(API, "/hello")]);
    assert_eq!(r.status, 200, "{r:?}");

    // A valid file: the next request is refused by host policy.
    std::fs::write(&policy_file, "[host]\ndeny_domains = [\"api.example.test\"]\n").unwrap();
    w.d.hup();
    wait_log(&w.d, "host policy reloaded");
    // Its name no longer resolves for agents, and dialing an address directly is refused.
    let r = w.curl(&passport, &["--resolve", &format!("{API}:{}:127.0.0.1", w.port), &w.url(API, "/hello")]);
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["reason"], "policy_denied");

    let records = w.d.verified_records();
    let reloads: Vec<&Value> = records.iter().filter(|r| r["kind"] == "policy_reload").collect();
    assert!(reloads.iter().any(|r| r["ok"] == false), "{reloads:#?}");
    assert!(reloads.iter().any(|r| r["ok"] == true), "{reloads:#?}");
}

fn wait_log(d: &Daemon, needle: &str) {
    let deadline = Instant::now() + HANG_GUARD;
    while !d.log().contains(needle) {
        assert!(Instant::now() < deadline, "never logged {needle:?}:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn proxy_dns_answers_each_sandbox_for_its_own_passport() {
    if !root_or_skip("proxy_dns_answers_each_sandbox_for_its_own_passport") {
        return;
    }
    let w = World::new(POLICY, 120);
    let (pa, _) =
        w.d.issue("a", &["--permission", "web:*", "--constraint", &format!("core:scope:domain_allowlist=[\"{API}\"]")]);
    let (pb, pb_id) = w
        .d
        .issue("b", &["--permission", "web:*", "--constraint", &format!("core:scope:domain_allowlist=[\"{OTHER}\"]")]);
    // Sandbox A stays alive while B asks, so an answer "allowed for some live sandbox" would
    // show up as a leak.
    let a =
        w.d.cli_command(&["run", "--passport", pa.to_str().unwrap(), "--", "sleep", "120"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
    let _a = sluice_e2e::ChildGuard(Some(a));
    let deadline = Instant::now() + HANG_GUARD;
    while w.d.sandbox_cgroups().is_empty() {
        assert!(Instant::now() < deadline, "sandbox A never appeared:\n{}", w.d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let script = r#"
import json, socket, struct, sys
def ask(name, tcp):
    qname = b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
    msg = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + qname + struct.pack(">HH", 1, 1)
    if tcp:
        s = socket.create_connection(("127.0.0.53", 53), timeout=20)
        s.sendall(struct.pack(">H", len(msg)) + msg)
        n = struct.unpack(">H", s.recv(2))[0]
        data = b""
        while len(data) < n:
            data += s.recv(n - len(data))
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(20)
        s.sendto(msg, ("127.0.0.53", 53))
        data, _ = s.recvfrom(4096)
    return [data[3] & 0x0f, struct.unpack(">H", data[6:8])[0]]
out = {}
for name in sys.argv[1:]:
    out[name] = {"udp": ask(name, False), "tcp": ask(name, True)}
print(json.dumps(out))
"#;
    let v = w.python(&pb, script, &[API, OTHER]);
    // rcode 3 = NXDOMAIN with no answer; rcode 0 with one synthetic A record.
    assert_eq!(v[API], serde_json::json!({"udp": [3, 0], "tcp": [3, 0]}), "{v}");
    assert_eq!(v[OTHER], serde_json::json!({"udp": [0, 1], "tcp": [0, 1]}), "{v}");
    assert_eq!(w.dns_canary.hits(), 0, "an agent's DNS query left the host");
    drop(_a);
    let records = w.d.verified_records();
    assert!(
        records.iter().any(|r| r["kind"] == "dns_denied" && r["name"] == API && r["passport_id"] == pb_id.as_str()),
        "B's refused query is not in the log"
    );
}

const METERED_POLICY: &str = r#"
[service]
name = "llm"
domains = ["api.example.test"]

[[route]]
id = "openai"
method = "POST"
path = "/llm/openai/*"
action = "llm:chat"
[route.meter]
kind = "openai"
default_max_tokens = 1000

[[route]]
id = "no-usage"
method = "POST"
path = "/llm/no-usage"
action = "llm:chat"
[route.meter]
kind = "openai"
default_max_tokens = 1000

[[route]]
id = "anthropic"
method = "POST"
path = "/llm/anthropic/*"
action = "llm:chat"
[route.meter]
kind = "anthropic"
default_max_tokens = 1000

[prices]
as_of = "2026-01-01"

[[prices.model]]
name = "m"
input_cents_per_mtok = 100
output_cents_per_mtok = 200
"#;

/// Metered routes settle from the response (issue 6): OpenAI JSON and SSE, Anthropic JSON and
/// SSE, and a stream without usage (estimate stands). Spend after = the settled amounts.
#[test]
fn proxy_settles_metered_costs_from_responses() {
    if !root_or_skip("proxy_settles_metered_costs_from_responses") {
        return;
    }
    let w = World::new(METERED_POLICY, 120);
    let (passport, _) = w.d.issue("metered", &["--permission", "llm:*"]);
    // (path, real cost in millicents at $1/$2 per million tokens, or None: no usage)
    let cases = [
        ("/llm/openai/json", Some(100_000)),
        ("/llm/openai/sse", Some(200_000)),
        ("/llm/anthropic/json", Some(300_000)),
        ("/llm/anthropic/sse", Some(500_000)),
        ("/llm/no-usage", None),
    ];
    for (path, _) in &cases {
        let r = w.curl(
            &passport,
            &["-H", "content-type: application/json", "-d", r#"{"model":"m","max_tokens":100}"#, &w.url(API, path)],
        );
        assert_eq!(r.status, 200, "{path}: {r:?}\n{}", w.d.log());
        assert!(r.body.contains("hi") || path.ends_with("no-usage"), "{path}: {r:?}");
    }
    // Settlement runs after the response; wait for all five records (a hang guard only).
    let start = Instant::now();
    let records = loop {
        let records = w.d.verified_records();
        if records.iter().filter(|r| r["kind"] == "settlement").count() == cases.len() {
            break records;
        }
        assert!(start.elapsed() < HANG_GUARD, "settlements missing:\n{}", w.d.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    let decisions: Vec<&Value> =
        records.iter().filter(|r| r["kind"] == "decision" && r["decision"] == "allow").collect();
    let settlements: Vec<&Value> = records.iter().filter(|r| r["kind"] == "settlement").collect();
    assert_eq!(decisions.len(), cases.len(), "{records:#?}");
    let mut expected = 0;
    for ((path, actual), (decision, settlement)) in cases.iter().zip(decisions.iter().zip(&settlements)) {
        // 30 bytes (8 tokens) at $1/M plus 100 output tokens at $2/M: 20.8 millicents, charged
        // 21 ($0.00021), not a whole cent.
        let estimate = decision["cost_millicents"].as_u64().unwrap();
        assert_eq!(estimate, 21, "{path}: {decision}");
        assert_eq!(settlement["decision_record"], decision["log_index"], "{path}: {settlement}");
        assert_eq!(settlement["estimated_millicents"].as_u64(), Some(estimate), "{path}");
        assert_eq!(settlement["actual_millicents"].as_u64(), *actual, "{path}: {settlement}");
        assert_eq!(settlement["settled"].as_bool(), Some(actual.is_some()), "{path}");
        expected += actual.unwrap_or(estimate);
        if actual.is_some() {
            assert_eq!(settlement["spend_after_millicents"].as_u64(), Some(expected), "{path}: {settlement}");
        } else {
            assert_eq!(settlement["reason"], "no_usage", "{path}");
        }
    }
    // The counters the next decision sees moved by the settled amounts.
    let id = decisions[0]["passport_id"].as_str().unwrap();
    let out = w.d.cli(&["state", id, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let state: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(expected, 1_100_021);
    assert_eq!(state["daily_cost_millicents"].as_u64(), Some(expected), "{state}");
    assert_eq!(state["window_cost_millicents"].as_u64(), Some(expected), "{state}");
    assert_eq!(state["window_cost_cents"].as_u64(), Some(1_101), "rounded up: {state}");
}

/// The value of the series `series` (name and labels, exactly as printed) in a scrape.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// One agent floods the proxy with idle connections and holds them, next to a quiet agent: the
/// kernel refuses the flooder beyond `[sandbox] max_tcp_sockets` (EPERM), the proxy admits only
/// `[proxy] max_connections_per_sandbox` of the rest and closes the others at accept (counted
/// for that sandbox), and the quiet agent's requests are served as usual.
#[test]
fn a_flooding_agent_is_held_to_its_share_and_the_quiet_one_is_served() {
    if !root_or_skip("a_flooding_agent_is_held_to_its_share_and_the_quiet_one_is_served") {
        return;
    }
    const SOCKETS: usize = 16;
    const PER_SANDBOX: usize = 8;
    let w = World::build(
        POLICY,
        120,
        &format!("max_connections_per_sandbox = {PER_SANDBOX}"),
        &format!("max_tcp_sockets = {SOCKETS}"),
    );
    let allow = format!("core:scope:domain_allowlist=[\"{API}\"]");
    let (flooder, _) = w.d.issue("flooder", &["--permission", "web:*", "--constraint", &allow]);
    let (quiet, _) = w.d.issue("quiet", &["--permission", "web:*", "--constraint", &allow]);

    let py = python().to_str().unwrap().to_string();
    let port = w.port.to_string();
    let script = r#"
import json, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
held, refused = [], []
for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(addr)
        held.append(s)
    except OSError as e:
        refused.append(e.errno)
        s.close()
print(json.dumps({"held": len(held), "refused": refused}), flush=True)
sys.stdin.readline()
"#;
    let n = (3 * SOCKETS).to_string();
    let mut cmd =
        w.d.cli_command(&["run", "--passport", flooder.to_str().unwrap(), "--", &py, "-c", script, API, &port, &n]);
    cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
    let mut guard = sluice_e2e::ChildGuard(Some(cmd.spawn().expect("sluice run the flooder")));
    let child = guard.0.as_mut().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let v: Value = serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line:?}\n{}", w.d.log()));
    assert_eq!(v["held"].as_u64(), Some(SOCKETS as u64), "{v}");
    let refused = v["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 2 * SOCKETS, "{v}");
    assert!(refused.iter().all(|e| e.as_i64() == Some(i64::from(libc::EPERM))), "{v}");

    // The flooder still holds everything: the quiet agent is served.
    for _ in 0..3 {
        let r = w.curl(&quiet, &[&w.url(API, "/hello")]);
        assert_eq!(r.status, 200, "{r:?}\n{}", w.d.log());
    }
    assert!(child.try_wait().unwrap().is_none(), "the flooder let go too early");

    // Metrics: the kernel's refusals and the proxy's closes, both for the flooder's sandbox.
    let scrape = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--unix-socket", w.d.socket.to_str().unwrap(), "http://sluice/metrics"])
        .output()
        .expect("curl the metrics");
    let text = String::from_utf8_lossy(&scrape.stdout).into_owned();
    // Non-zero series only: each `sluice run` of the quiet agent is a sandbox of its own.
    let per_sandbox = |name: &str| -> Vec<f64> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{cgroup_id=")))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .filter(|v| *v != 0.0)
            .collect()
    };
    assert_eq!(per_sandbox("sluice_sandbox_tcp_refused_total"), [2.0 * SOCKETS as f64], "{text}");
    assert_eq!(per_sandbox("sluice_proxy_sandbox_over_limit_total"), [(SOCKETS - PER_SANDBOX) as f64], "{text}");
    assert!(metric(&text, "sluice_kernel_events_total{event=\"quota_refused\"}") >= Some(2.0 * SOCKETS as f64));
    assert_eq!(metric(&text, "sluice_proxy_over_limit_total"), Some(0.0), "{text}");

    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"done\n").unwrap();
    let _ = guard.0.take().unwrap().wait();
    assert_eq!(w.dns_canary.hits(), 0);
}
