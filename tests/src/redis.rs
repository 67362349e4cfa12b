//! A real `redis-server` for the fleet tests: on a free loopback port, with its own temporary
//! directory and no persistence (`--save "" --appendonly no`), so a restart starts empty like a
//! FLUSHALL. Killed on drop, also when the test panics. Never touches the system service.
//!
//! Commands go through `redis-cli`-free plain RESP over a `TcpStream`, so the harness does not
//! depend on the client library the daemon uses (a bug there cannot hide itself here).

use crate::free_port;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long `redis-server` may take to answer PING after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The binary: `$SLUICE_REDIS_SERVER`, else `redis-server` on PATH (`cargo xtask deps`).
pub fn redis_server_bin() -> PathBuf {
    std::env::var_os("SLUICE_REDIS_SERVER").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("redis-server"))
}

/// Whether `redis-server` can be run here.
pub fn available() -> bool {
    Command::new(redis_server_bin())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A redis-server process owned by the test.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// A RESP reply, as far as the tests need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// A bulk or status reply as text.
    pub fn text(&self) -> Option<String> {
        match self {
            Reply::Status(s) => Some(s.clone()),
            Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    pub fn int(&self) -> Option<i64> {
        match self {
            Reply::Int(i) => Some(*i),
            Reply::Bulk(Some(b)) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }
}

impl RedisServer {
    /// Starts one; panics (with its log) if it does not answer PING within 10 s.
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("redis tempdir");
        let mut server = RedisServer { port: free_port(), dir, child: None };
        server.spawn();
        server
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("redis log");
        let child = Command::new(redis_server_bin())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("redis log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e} (run `cargo xtask deps`)", redis_server_bin().display()));
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Reply::Status(s)) = self.try_command(&["PING"]) {
                if s == "PONG" {
                    return;
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("redis-server exited ({status}):\n{}", self.log());
            }
            if Instant::now() > deadline {
                panic!("redis-server on port {} did not answer PING within 10 s:\n{}", self.port, self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Kills it (SIGKILL): clients see their connections drop and new ones refused.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether it is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts it again on the same port, empty (no persistence).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// FLUSHALL: every key gone, as after an operator's mistake or a restart without persistence.
    pub fn flushall(&self) {
        assert_eq!(self.command(&["FLUSHALL"]), Reply::Status("OK".into()));
    }

    /// Runs one command; panics if the server cannot be reached.
    pub fn command(&self, args: &[&str]) -> Reply {
        self.try_command(args).unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    /// Runs one command on a new connection.
    pub fn try_command(&self, args: &[&str]) -> std::io::Result<Reply> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        s.write_all(&out)?;
        read_reply(&mut BufReader::new(s))
    }
}

fn bad(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

fn read_reply(r: &mut impl BufRead) -> std::io::Result<Reply> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(bad("connection closed"));
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at_checked(1).ok_or_else(|| bad("empty reply"))?;
    let num = || rest.parse::<i64>().map_err(|_| bad(format!("bad length {rest:?}")));
    Ok(match kind {
        "+" => Reply::Status(rest.into()),
        "-" => Reply::Error(rest.into()),
        ":" => Reply::Int(num()?),
        "$" => match num()? {
            n if n < 0 => Reply::Bulk(None),
            n => {
                let len = usize::try_from(n).map_err(|_| bad("length"))?;
                if len > 64 << 20 {
                    return Err(bad("bulk reply over 64 MiB"));
                }
                let mut buf = vec![0; len + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(len);
                Reply::Bulk(Some(buf))
            }
        },
        "*" => match num()? {
            n if n < 0 => Reply::Array(None),
            n => {
                let mut items = Vec::new();
                for _ in 0..n.min(1 << 20) {
                    items.push(read_reply(r)?);
                }
                Reply::Array(Some(items))
            }
        },
        other => return Err(bad(format!("unknown reply type {other:?}"))),
    })
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_flushes_restarts_empty_and_dies_on_drop() {
        if !available() {
            assert!(std::env::var_os("CI").is_none(), "redis-server is missing in CI: run `cargo xtask deps`");
            eprintln!("SKIPPED: redis-server not installed (cargo xtask deps)");
            return;
        }
        let mut r = RedisServer::start();
        assert_eq!(r.command(&["SET", "k", "v"]), Reply::Status("OK".into()));
        assert_eq!(r.command(&["GET", "k"]).text().as_deref(), Some("v"));
        assert_eq!(r.command(&["HINCRBY", "h", "a", "5"]).int(), Some(5));
        r.flushall();
        assert_eq!(r.command(&["GET", "k"]), Reply::Bulk(None));
        r.command(&["SET", "k", "v"]);
        r.kill();
        assert!(r.try_command(&["PING"]).is_err(), "a killed server refuses connections");
        r.restart();
        assert_eq!(r.command(&["GET", "k"]), Reply::Bulk(None), "restarted empty");
        let port = r.port;
        drop(r);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "dropped: the server is gone");
    }
}
