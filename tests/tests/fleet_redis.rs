//! The fleet's Redis connection against a real `redis-server` (tests/src/redis.rs): commands
//! work, a killed server is reported `Unavailable` at once (with the URL and since when), never a
//! stall, and the connection comes back by itself when the server does.

use sluice::fleet::{FleetError, Health, RedisConn, COMMAND_TIMEOUT, CONNECT_TIMEOUT};
use sluice_e2e::redis::{available, RedisServer};
use std::time::{Duration, Instant};

fn redis_or_skip(test: &str) -> Option<RedisServer> {
    if available() {
        return Some(RedisServer::start());
    }
    assert!(std::env::var_os("CI").is_none(), "{test}: redis-server is missing in CI: run `cargo xtask deps`");
    eprintln!("\n**************** SKIPPED: redis-server not installed ({test}) ****************\n");
    None
}

#[tokio::test]
async fn commands_run_and_a_lost_server_is_unavailable_then_recovers() {
    let Some(mut server) = redis_or_skip("commands_run_and_a_lost_server_is_unavailable_then_recovers") else {
        return;
    };
    let conn = RedisConn::plain(&server.url()).unwrap();
    conn.ping().await.unwrap();
    assert!(conn.health().is_up());
    let n: i64 = conn.query(redis::cmd("HINCRBY").arg("sluice:t").arg("a").arg(5)).await.unwrap();
    assert_eq!(n, 5);

    server.kill();
    let started = Instant::now();
    let e = conn.ping().await.unwrap_err();
    assert!(started.elapsed() < CONNECT_TIMEOUT + COMMAND_TIMEOUT * 2, "took {:?}", started.elapsed());
    let FleetError::Unavailable { redis, since, .. } = &e else { panic!("{e}") };
    assert_eq!(redis, &server.url());
    assert!(since.ends_with('Z'), "{since}");
    let Health::Down { since: down_since, .. } = conn.health() else { panic!("still up after a failure") };
    // Every later failure of this outage keeps the first "since".
    let _ = conn.ping().await;
    assert_eq!(conn.health().since(), down_since);

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while conn.ping().await.is_err() {
        assert!(Instant::now() < deadline, "the connection never came back: {:?}", conn.health());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(conn.health().is_up());
    let v: Option<i64> = conn.query(redis::cmd("HGET").arg("sluice:t").arg("a")).await.unwrap();
    assert_eq!(v, None, "restarted empty (no persistence)");
}

#[tokio::test]
async fn a_server_error_is_a_protocol_error_and_keeps_the_connection() {
    let Some(server) = redis_or_skip("a_server_error_is_a_protocol_error_and_keeps_the_connection") else {
        return;
    };
    let conn = RedisConn::plain(&server.url()).unwrap();
    let _: () = conn.query(redis::cmd("SET").arg("sluice:s").arg("x")).await.unwrap();
    let e = conn.query::<i64>(redis::cmd("HINCRBY").arg("sluice:s").arg("a").arg(1)).await.unwrap_err();
    assert!(matches!(e, FleetError::Protocol { .. }), "{e}");
    assert!(conn.health().is_up(), "a WRONGTYPE answer is not an outage");
    conn.ping().await.unwrap();
}

/// The lease script's arithmetic, on a real Redis.
mod scripts {
    use super::*;
    use sluice::fleet::lease::{HELLO_SCRIPT, LEASE_SCRIPT, RETURN_SCRIPT};

    const BUDGET: &str = "t:budget:pp_x:cap-daily:2026-12-02";
    const EPOCH: &str = "t:epoch";
    const HOSTS: &str = "t:hosts";
    const EXPIRE_AT: i64 = 4_102_444_800; // 2100-01-01

    async fn lease(conn: &RedisConn, host: &str, limit: u64, want: u64, held: u64) -> Vec<i64> {
        let script = redis::Script::new(LEASE_SCRIPT);
        let mut call = script.prepare_invoke();
        call.key(BUDGET).key(EPOCH).arg(host).arg(limit).arg(want).arg(held).arg(EXPIRE_AT);
        conn.invoke(&call).await.unwrap()
    }

    async fn hello(conn: &RedisConn, host: &str, has_claims: bool, recovery_ms: u64) -> (i64, i64) {
        let script = redis::Script::new(HELLO_SCRIPT);
        let mut call = script.prepare_invoke();
        call.key(EPOCH).key(HOSTS).arg(host).arg(u8::from(has_claims)).arg(recovery_ms);
        conn.invoke(&call).await.unwrap()
    }

    async fn give_back(conn: &RedisConn, host: &str, claim: u64) -> (i64, i64) {
        let script = redis::Script::new(RETURN_SCRIPT);
        let mut call = script.prepare_invoke();
        call.key(BUDGET).arg(host).arg(claim);
        conn.invoke(&call).await.unwrap()
    }

    #[tokio::test]
    async fn grants_never_exceed_the_limit_and_returns_never_raise_a_claim() {
        let Some(server) = redis_or_skip("grants_never_exceed_the_limit_and_returns_never_raise_a_claim") else {
            return;
        };
        let conn = RedisConn::plain(&server.url()).unwrap();
        // No epoch yet: nothing is granted, the host must say hello first.
        assert_eq!(lease(&conn, "a", 100, 10, 0).await, vec![-1, 0, 0, 0]);
        assert_eq!(hello(&conn, "a", false, 5000).await, (0, 1), "a new fleet: no recovery period");
        assert_eq!(hello(&conn, "b", false, 5000).await, (0, 0), "the epoch exists: unchanged");
        // {grant, claim, fleet total, recovering}
        assert_eq!(lease(&conn, "a", 100, 40, 0).await, vec![40, 40, 40, 0]);
        assert_eq!(lease(&conn, "b", 100, 40, 0).await, vec![40, 40, 80, 0]);
        assert_eq!(lease(&conn, "a", 100, 40, 40).await, vec![20, 60, 100, 0], "at most what is left");
        assert_eq!(lease(&conn, "b", 100, 40, 40).await, vec![0, 40, 100, 0], "nothing left");
        // A limit lowered below what is claimed grants nothing (never a negative grant).
        assert_eq!(lease(&conn, "b", 50, 40, 40).await, vec![0, 40, 100, 0]);
        // Returning: the claim becomes what was spent; a "return" above the claim changes nothing.
        assert_eq!(give_back(&conn, "a", 25).await, (60, 25));
        assert_eq!(give_back(&conn, "a", 90).await, (25, 25));
        assert_eq!(lease(&conn, "b", 100, 100, 40).await, vec![35, 75, 100, 0]);
        // A host that spent everything returns to 0: its field is gone.
        assert_eq!(give_back(&conn, "a", 0).await, (25, 0));
        assert_eq!(server.command(&["HEXISTS", BUDGET, "a"]).int(), Some(0));
        assert!(server.command(&["TTL", BUDGET]).int().unwrap() > 0, "budget keys expire");
    }

    #[tokio::test]
    async fn after_a_flush_claims_are_re_published_and_nothing_is_granted_while_recovering() {
        let Some(server) = redis_or_skip("after_a_flush_claims_are_re_published") else {
            return;
        };
        let conn = RedisConn::plain(&server.url()).unwrap();
        hello(&conn, "a", false, 0).await;
        assert_eq!(lease(&conn, "a", 100, 60, 0).await, vec![60, 60, 60, 0]);
        assert_eq!(lease(&conn, "b", 100, 30, 0).await, vec![30, 30, 90, 0]);
        server.flushall();
        // Host b notices first: it holds claims, so the new epoch starts a recovery period.
        let (epoch, created) = hello(&conn, "b", true, 60_000).await;
        assert_eq!(created, 1);
        assert!(epoch > 0);
        // b re-publishes (want 0, held 30); a host asking for more meanwhile gets nothing.
        assert_eq!(lease(&conn, "b", 100, 0, 30).await, vec![0, 30, 30, 1]);
        assert_eq!(lease(&conn, "c", 100, 50, 0).await, vec![0, 0, 30, 1], "recovering: no grant");
        // a re-publishes what it holds: the total is back where it was, not reset.
        assert_eq!(lease(&conn, "a", 100, 0, 60).await, vec![0, 60, 90, 1]);
        // Recovery over (epoch moved to the past by hand): at most what the limit leaves.
        server.command(&["SET", EPOCH, "0"]);
        assert_eq!(lease(&conn, "c", 100, 50, 0).await, vec![10, 10, 100, 0]);
    }
}

#[tokio::test]
async fn auth_uses_the_password_file_and_never_shows_the_password() {
    use std::os::unix::fs::PermissionsExt;
    let Some(server) = redis_or_skip("auth_uses_the_password_file_and_never_shows_the_password") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("redis.password");
    std::fs::write(&pass, "correct-horse\n").unwrap();
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = |password_file: Option<std::path::PathBuf>| sluice::config::FleetConfig {
        redis: server.url(),
        password_file,
        ca_file: None,
        host_id: "a".into(),
        lease_cents: 1,
        lease_requests: 1,
        lease_secs: 60,
        prefix: "sluice".into(),
    };
    assert_eq!(server.command(&["CONFIG", "SET", "requirepass", "correct-horse"]).text().as_deref(), Some("OK"));
    // With the file: AUTH, then commands.
    let conn = RedisConn::new(&config(Some(pass.clone()))).unwrap();
    conn.ping().await.unwrap();
    // Without it, or with a wrong one: refused, and no message carries a password.
    let e = RedisConn::new(&config(None)).unwrap().ping().await.unwrap_err().to_string();
    assert!(!e.contains("correct-horse"), "{e}");
    std::fs::write(&pass, "wrong-horse\n").unwrap();
    let e = RedisConn::new(&config(Some(pass))).unwrap().ping().await.unwrap_err().to_string();
    assert!(!e.contains("wrong-horse") && !e.contains("correct-horse"), "{e}");
}

/// A `redis-server` serving TLS only, with a leaf of `ca` for `names`; killed on drop.
struct TlsRedis {
    port: u16,
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl TlsRedis {
    fn start(ca: &sluice_e2e::upstream::TestCa, names: &[&str]) -> TlsRedis {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ca.leaf_pem(names);
        std::fs::write(dir.path().join("tls.crt"), cert).unwrap();
        std::fs::write(dir.path().join("tls.key"), key).unwrap();
        let ca_path = ca.write(dir.path());
        let port = sluice_e2e::free_port();
        let log = std::fs::File::create(dir.path().join("redis.log")).unwrap();
        let child = std::process::Command::new(sluice_e2e::redis::redis_server_bin())
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--tls-auth-clients", "no"])
            .arg("--tls-cert-file")
            .arg(dir.path().join("tls.crt"))
            .arg("--tls-key-file")
            .arg(dir.path().join("tls.key"))
            .arg("--tls-ca-cert-file")
            .arg(&ca_path)
            .arg("--dir")
            .arg(dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let server = TlsRedis { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let log = std::fs::read_to_string(server.dir.path().join("redis.log")).unwrap_or_default();
            assert!(Instant::now() < deadline, "redis-server with TLS did not listen:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `rediss://` against a real TLS `redis-server`: the server's certificate is verified against
/// `ca_file` and the URL's host name; another CA or another name is refused, never used.
#[tokio::test]
async fn rediss_verifies_the_server_certificate_against_the_ca_file() {
    if !available() {
        assert!(std::env::var_os("CI").is_none(), "redis-server is missing in CI: run `cargo xtask deps`");
        eprintln!("\n**************** SKIPPED: redis-server not installed (rediss) ****************\n");
        return;
    }
    let ca = sluice_e2e::upstream::TestCa::new();
    let server = TlsRedis::start(&ca, &["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path());
    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = sluice_e2e::upstream::TestCa::new().write(other_dir.path());
    let config = |url: String, ca_file: std::path::PathBuf| sluice::config::FleetConfig {
        redis: url,
        password_file: None,
        ca_file: Some(ca_file),
        host_id: "a".into(),
        lease_cents: 1,
        lease_requests: 1,
        lease_secs: 60,
        prefix: "sluice".into(),
    };
    let good = format!("rediss://localhost:{}", server.port);
    let conn = RedisConn::new(&config(good.clone(), ca_file.clone())).unwrap();
    conn.ping().await.unwrap_or_else(|e| panic!("TLS with the right CA: {e}"));
    let n: i64 = conn.query(redis::cmd("INCR").arg("sluice:tls")).await.unwrap();
    assert_eq!(n, 1);
    // A server certificate from another CA: refused.
    let e = RedisConn::new(&config(good, other_ca)).unwrap().ping().await.unwrap_err();
    assert!(matches!(e, FleetError::Unavailable { .. } | FleetError::Protocol { .. }), "{e}");
    // The right CA, but the certificate does not name the host the URL names: refused.
    let wrong_name = format!("rediss://127.0.0.1:{}", server.port);
    let e = RedisConn::new(&config(wrong_name, ca_file)).unwrap().ping().await.unwrap_err();
    assert!(matches!(e, FleetError::Unavailable { .. } | FleetError::Protocol { .. }), "{e}");
    // Nothing was written by the refused connections.
    let n: i64 = conn.query(redis::cmd("GET").arg("sluice:tls")).await.unwrap();
    assert_eq!(n, 1);
}
