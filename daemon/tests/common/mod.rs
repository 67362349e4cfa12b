//! A daemon for tests: its own state dir, socket and config; killed and cleaned up on drop.
#![allow(dead_code)]

#[path = "../../../tests/src/ports.rs"]
mod ports;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice")
}

pub fn sluice(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("run sluice")
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A port for a daemon or gate the test starts, which binds it itself: free on the loopbacks,
/// from below the kernel's ephemeral range, so no other test's socket takes it first.
pub fn listen_port() -> u16 {
    ports::free_port().unwrap_or_else(|e| panic!("listen_port: {e}"))
}

/// The name of the current user's primary group, so a non-root developer can use the API too.
fn my_group() -> String {
    let gid = nix::unistd::getgid();
    nix::unistd::Group::from_gid(gid).ok().flatten().map(|g| g.name).unwrap_or_else(|| "root".into())
}

pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
}

impl TestDaemon {
    /// Writes a config (with `extra` TOML appended) and starts the daemon. Passport-only
    /// (`[sandbox] redirect = false`) unless `extra` has its own `[sandbox]`: these tests run in
    /// parallel and must not share the default proxy port, pin dir and agents' cgroup (the kernel
    /// suites in tests/ give each daemon its own).
    pub fn start(extra: &str) -> TestDaemon {
        let sandbox = if extra.contains("[sandbox]") { "" } else { "[sandbox]\nredirect = false\n" };
        let extra = format!("{extra}\n{sandbox}");
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/sluice.sock");
        let config = dir.path().join("sluice.toml");
        let text = format!(
            "state_dir = \"{}\"\npolicies_dir = \"{}\"\n[api]\nsocket = \"{}\"\ngroup = \"{}\"\n{extra}",
            dir.path().join("state").display(),
            dir.path().join("policies").display(),
            socket.display(),
            my_group(),
        );
        std::fs::write(&config, text).unwrap();
        let mut d = TestDaemon { dir, config, socket, child: None };
        d.spawn();
        d
    }

    /// (Re)starts the daemon process on the same state and waits until it answers.
    pub fn spawn(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("daemon.log")).unwrap();
        let child = Command::new(bin())
            .args(["--config", p(&self.config), "daemon"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.call("GET", "/v1/health", None).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("daemon exited with {status}: {}", self.log());
            }
            assert!(Instant::now() < deadline, "daemon did not answer within 30 s: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// One API call; `Err` when the daemon cannot be reached or answers an error.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value), String> {
        raw_call(&self.socket, method, path, body)
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut all = vec!["--socket", p(&self.socket), "--config", p(&self.config)];
        all.extend_from_slice(args);
        sluice(&all)
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal blocking HTTP/1.1 client over a Unix socket (one request per connection), so tests
/// do not depend on the code under test to talk to it.
pub fn raw_call(socket: &Path, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value), String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&resp);
    let (head, rest) = text.split_once("\r\n\r\n").ok_or("no HTTP header")?;
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("bad status line")?;
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    let json = serde_json::from_str(&body).map_err(|e| format!("bad JSON ({e}): {body}"))?;
    Ok((status, json))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// An issuer and a passport file with the given extra `passport issue` arguments.
pub struct Issued {
    pub passport: PathBuf,
    pub id: String,
    pub issuer_pub: PathBuf,
}

pub fn issue(dir: &Path, name: &str, extra: &[&str]) -> Issued {
    let iss = dir.join(format!("{name}-issuer"));
    let out = sluice(&["issuer", "init", "--dir", p(&iss)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let passport = dir.join(format!("{name}.jwt"));
    let key = iss.join("issuer.key");
    let mut args = vec!["passport", "issue", "--issuer-key", p(&key), "--agent-id", name, "--out", p(&passport)];
    args.extend_from_slice(extra);
    let out = sluice(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Issued { passport, id, issuer_pub: iss.join("issuer.pub") }
}
