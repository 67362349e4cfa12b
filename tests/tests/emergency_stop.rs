//! The emergency stop end to end: a real daemon with the eBPF redirect, two agents under
//! `sluice run` (python3, no proxy variables) streaming from a real HTTPS upstream on loopback.
//!
//! `sluice stop --passport A` cuts A's streaming response within 100 ms, A's next `connect(2)`
//! fails with EPERM in the kernel (the pinned stop map), B streams on and connects as before;
//! after a SIGKILL of the daemon and a restart the stop still holds in the kernel for A's live
//! sandbox; `sluice resume` lets A connect and be served again. Everything is in the log,
//! which `sluice audit verify` checks. Agents are killed and the daemon's cgroups and pins
//! removed on the way out, on failure too (drop order: agents first).

use sluice_e2e::daemon::Daemon;
use sluice_e2e::upstream::{TestCa, Upstream};
use sluice_e2e::{free_port, python, root_or_skip, HANG_GUARD};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const API: &str = "api.example.test";

/// The agent: reads commands on stdin, answers one line each on stdout.
/// `stream N`: GET /drip, `STREAMING` at the first event, `DONE N` after N events (0: until the
/// stream ends), `END <why>` when it is cut. `connect`: a plain TCP connect to 203.0.113.7:443,
/// `CONNECT ok` or `CONNECT <errno>`. `hello`: GET /hello, `HELLO <status>`.
const AGENT: &str = r#"
import sys, socket, urllib.request, urllib.error
base = sys.argv[1]
def out(*a):
    print(*a, flush=True)
for line in sys.stdin:
    cmd = line.split()
    if not cmd:
        continue
    if cmd[0] == 'stream':
        want = int(cmd[1])
        try:
            with urllib.request.urlopen(base + '/drip', timeout=30) as r:
                n = 0
                while True:
                    chunk = r.readline()
                    if not chunk:
                        out('END eof')
                        break
                    if chunk.startswith(b'data:'):
                        n += 1
                        if n == 1:
                            out('STREAMING')
                        if want and n >= want:
                            out('DONE', n)
                            break
        except Exception as e:
            out('END', type(e).__name__)
    elif cmd[0] == 'connect':
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect(('203.0.113.7', 443))
            out('CONNECT ok')
        except OSError as e:
            out('CONNECT', e.errno)
        finally:
            s.close()
    elif cmd[0] == 'hello':
        try:
            with urllib.request.urlopen(base + '/hello', timeout=10) as r:
                out('HELLO', r.status)
        except urllib.error.HTTPError as e:
            out('HELLO', e.code, e.read().decode(errors='replace').replace('\n', ' ')[:300])
        except Exception as e:
            out('HELLO error', type(e).__name__, str(e).replace('\n', ' ')[:200])
    elif cmd[0] == 'exit':
        break
"#;

/// One agent under `sluice run`; killed (with its sandbox's processes, by the daemon) on drop.
struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<(Instant, String)>,
    name: &'static str,
}

impl Agent {
    fn start(d: &Daemon, name: &'static str, passport: &Path, base: &str) -> Agent {
        let py = python().to_str().unwrap().to_string();
        let mut child = d
            .cli_command(&["run", "--passport", passport.to_str().unwrap(), "--", &py, "-c", AGENT, base])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("sluice run");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send((Instant::now(), line)).is_err() {
                    return;
                }
            }
        });
        Agent { stdin: child.stdin.take(), child, lines, name }
    }

    fn send(&mut self, cmd: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{cmd}").and_then(|()| stdin.flush()).unwrap_or_else(|e| panic!("{}: {cmd}: {e}", self.name));
    }

    /// The next line and when it arrived.
    fn next(&self, d: &Daemon) -> (Instant, String) {
        self.lines
            .recv_timeout(HANG_GUARD)
            .unwrap_or_else(|e| panic!("{}: no answer ({e}); daemon log:\n{}", self.name, d.log()))
    }

    fn expect(&self, d: &Daemon, want: &str) -> Instant {
        let (at, line) = self.next(d);
        assert_eq!(line, want, "{}; daemon log:\n{}", self.name, d.log());
        at
    }

    fn ask(&mut self, d: &Daemon, cmd: &str) -> String {
        self.send(cmd);
        self.next(d).1
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn emergency_stop_cuts_refuses_in_the_kernel_survives_a_restart_and_resumes() {
    if !root_or_skip("emergency_stop_cuts_refuses_in_the_kernel_survives_a_restart_and_resumes") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ca = TestCa::new();
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_path = ca.write(ca_dir.path());
    let port = free_port();
    let up = Upstream::start(&rt, SocketAddr::from(([127, 0, 0, 1], port)), &[API], &ca);
    let dns_extra = format!("static_hosts = {{ \"{API}\" = \"127.0.0.1\" }}");
    let extra = format!("[upstream_tls]\nextra_roots = [\"{}\"]\n", ca_path.display());
    let mut d = Daemon::start_full("root", "", &dns_extra, &extra, &[]);
    let grant = ["--permission", "*", "--constraint", "core:scope:domain_allowlist=api.example.test"];
    let (pa, a_id) = d.issue("agent-a", &grant);
    let (pb, b_id) = d.issue("agent-b", &grant);
    let base = format!("https://{API}:{port}");
    // Declared after the daemon: dropped (killed) before it.
    let mut a = Agent::start(&d, "agent A", &pa, &base);
    let mut b = Agent::start(&d, "agent B", &pb, &base);

    assert_eq!(a.ask(&d, "connect"), "CONNECT ok", "before the stop, connects reach the proxy");
    a.send("stream 0");
    a.expect(&d, "STREAMING");
    b.send("stream 100");
    b.expect(&d, "STREAMING");

    // The stop, timed from the moment the command starts.
    let t0 = Instant::now();
    let out = d.cli(&["stop", "--passport", &a_id, "--note", "e2e", "--json"]);
    let answered = t0.elapsed();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["kernel"], true, "{r}");
    assert_eq!(r["sandboxes"].as_array().map(Vec::len), Some(1), "A's sandbox refused in the kernel: {r}");
    let (cut_at, line) = a.next(&d);
    let cut = cut_at.duration_since(t0);
    assert!(line.starts_with("END"), "A's stream was not cut: {line}");
    eprintln!("emergency stop: command answered in {answered:?}, A's stream cut {cut:?} after the command started");
    assert!(cut < Duration::from_millis(100), "A's stream was cut {cut:?} after `sluice stop` (limit 100 ms)");

    // A's next connect is refused in the kernel: EPERM (1), before any redirect.
    assert_eq!(a.ask(&d, "connect"), "CONNECT 1");
    // B streams on to its 100th event, then connects and is served as before.
    b.expect(&d, "DONE 100");
    assert_eq!(b.ask(&d, "connect"), "CONNECT ok");
    assert_eq!(b.ask(&d, "hello"), "HELLO 200");
    // A new `sluice run` of A is refused (no sandbox for a stopped passport).
    let out = d.cli(&["run", "--passport", pa.to_str().unwrap(), "--", "true"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("emergency stop"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A crash and a restart: the pinned map held meanwhile, and the restarted daemon reloads
    // the stop and writes it again for A's sandbox (its agent still runs).
    d.kill();
    d.spawn();
    assert_eq!(a.ask(&d, "connect"), "CONNECT 1", "after a restart");
    assert_eq!(b.ask(&d, "connect"), "CONNECT ok", "after a restart");
    let out = d.cli(&["stop", "--list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&a_id), "{}", String::from_utf8_lossy(&out.stdout));

    let out = d.cli(&["resume", "--passport", &a_id, "--note", "e2e done"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(a.ask(&d, "connect"), "CONNECT ok", "after resume");
    assert_eq!(a.ask(&d, "hello"), "HELLO 200", "after resume");
    a.send("exit");
    b.send("exit");
    drop((a, b));

    // The log: both commands on A's chain, B's chain untouched by them; the whole log verifies.
    let records = d.verified_records();
    let of = |kind: &str, id: &str| records.iter().filter(|r| r["kind"] == kind && r["passport_id"] == id).count();
    assert_eq!((of("emergency_stop", &a_id), of("emergency_resume", &a_id)), (1, 1));
    assert_eq!((of("emergency_stop", &b_id), of("emergency_resume", &b_id)), (0, 0));
    assert!(up.count("/drip") >= 2, "both streams reached the upstream");
    drop(ca_dir);
}
