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
