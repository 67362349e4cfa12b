//! Fleet checkpoints with a real redis-server on loopback and real daemons (passport-only: no
//! eBPF is needed for what is published): every host publishes its signed checkpoints,
//! `sluice fleet status` lists the hosts, `sluice audit verify --fleet` passes an honest export
//! and catches a rewritten history, a checkpoint forged in Redis is reported and never trusted,
//! and with Redis down the daemon keeps deciding and publishes the backlog when it returns.

use serde_json::Value;
use sluice_e2e::daemon::Daemon;
use sluice_e2e::redis::{RedisServer, Reply};
use sluice_e2e::HANG_GUARD;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A passport-only daemon in the fleet of `redis` as `host_id`.
fn fleet_daemon(redis: &RedisServer, host_id: &str) -> Daemon {
    Daemon::start(&format!("redirect = false\n[fleet]\nredis = \"{}\"\nhost_id = \"{host_id}\"\n", redis.url()))
}

/// A passport registered with `d` that allows `llm:*` at up to $10 an action. No spend cap or
/// rate limit: its decisions take no fleet lease, so what these tests see is checkpoints alone.
fn passport(d: &Daemon) -> String {
    let (file, id) = d.issue("agent", &["--permission", "llm:*", "--constraint", "core:cost:max_per_action=1000"]);
    let out = d.cli(&["passport", "register", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    id
}

fn decide(d: &Daemon, id: &str, cents: u32) {
    let out = d.cli(&["enforce", "--passport-id", id, "--action", "llm:chat", "--cost-cents", &cents.to_string()]);
    assert!(out.status.success(), "enforce: {}", text(&out));
}

fn status(d: &Daemon) -> (bool, Value) {
    let out = d.cli(&["fleet", "status", "--json"]);
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("fleet status --json ({e}): {}", text(&out)));
    (out.status.success(), v)
}

fn host<'a>(v: &'a Value, host_id: &str) -> Option<&'a Value> {
    v["hosts"].as_array()?.iter().find(|h| h["host_id"] == host_id)
}

/// The size of `d`'s log now (a fresh checkpoint through `audit export`).
fn export(d: &Daemon, name: &str) -> (PathBuf, u64) {
    let out_file = d.dir.path().join(name);
    let out = d.cli(&["audit", "export", "--out", out_file.to_str().unwrap()]);
    assert!(out.status.success(), "export: {}", text(&out));
    let doc: Value = serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
    let note = doc["checkpoint"].as_str().unwrap();
    let size: u64 = note.lines().nth(1).unwrap().parse().unwrap();
    (out_file, size)
}

/// Waits until the fleet shows `host_id`'s latest checkpoint at `size` or more.
fn wait_published(d: &Daemon, host_id: &str, size: u64) -> Value {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let (_, v) = status(d);
        if let Some(h) = host(&v, host_id) {
            if h["latest"]["size"].as_u64().is_some_and(|s| s >= size) {
                return h.clone();
            }
        }
        assert!(Instant::now() < deadline, "{host_id} never published size {size}: {v}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn verify(d: &Daemon, export: &Path, extra: &[&str]) -> Output {
    let host_pub = d.dir.path().join("state/host.pub");
    let mut args = vec!["audit", "verify", export.to_str().unwrap(), "--host-pub", host_pub.to_str().unwrap()];
    args.extend_from_slice(extra);
    d.cli(&args)
}

#[test]
fn two_daemons_publish_and_fleet_status_lists_both_hosts() {
    let redis = RedisServer::start();
    let mut a = fleet_daemon(&redis, "web-1");
    let b = fleet_daemon(&redis, "web-2");
    let id = passport(&a);
    for _ in 0..3 {
        decide(&a, &id, 5);
    }
    let (_, size_a) = export(&a, "a.json");
    let (_, size_b) = export(&b, "b.json");
    let ha = wait_published(&a, "web-1", size_a);
    let hb = wait_published(&b, "web-2", size_b);
    for h in [&ha, &hb] {
        assert!(h["verified"].as_u64().unwrap() >= 1, "{h}");
        assert_eq!(h["refused"].as_array().unwrap().len(), 0, "{h}");
        assert!(h["latest"]["age_secs"].as_i64().unwrap() < 60, "{h}");
        assert_eq!(h["latest"]["root"].as_str().unwrap().len(), 64);
    }
    assert_ne!(ha["vkey"], hb["vkey"], "each host registers its own key");
    // The table for people: both hosts, signature ok.
    let out = a.cli(&["fleet", "status"]);
    assert!(out.status.success(), "{}", text(&out));
    let table = text(&out);
    for h in ["web-1", "web-2"] {
        let line = table.lines().find(|l| l.starts_with(h)).unwrap_or_else(|| panic!("no line for {h}:\n{table}"));
        assert!(line.contains(" ok "), "{line}");
    }
    // Redis holds what the module docs say, and nothing more per host than the bounds.
    let registered = redis.command(&["HGET", "sluice:checkpoint-keys", "web-1"]).text().unwrap();
    assert_eq!(Value::String(registered), ha["vkey"]);
    let latest = redis.command(&["GET", "sluice:checkpoint:web-1"]).text().unwrap();
    assert!(latest.contains("\"note\"") && latest.contains("\"published_at\""), "{latest}");

    // Budget claims: a passport with a daily cap, used on both hosts, has a claim (spent + unused
    // lease) of each host on its window, listed per host.
    let (capped, capped_id) = a.issue(
        "capped",
        &[
            "--permission",
            "llm:*",
            "--constraint",
            "core:cost:max_cumulative=10000",
            "--constraint",
            "core:cost:cumulative_window=daily",
        ],
    );
    for d in [&a, &b] {
        let out = d.cli(&["passport", "register", capped.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
        decide(d, &capped_id, 7);
    }
    let (_, v) = status(&a);
    for h in ["web-1", "web-2"] {
        let claims = host(&v, h).unwrap()["claims"].as_array().unwrap().clone();
        let c = claims.iter().find(|c| c["passport"] == capped_id.as_str()).unwrap_or_else(|| panic!("{h}: {v}"));
        assert_eq!(c["limit"], "cap-daily", "{c}");
        assert_eq!(c["unit"], "cents", "{c}");
        assert!(c["claim"].as_u64().unwrap() >= 7, "a claim covers what was spent: {c}");
    }
    let table = text(&a.cli(&["fleet", "status"]));
    assert!(table.contains("cap-daily") && table.contains("(all hosts)"), "{table}");

    // At shutdown the final checkpoint (it covers the daemon_stop record) is published.
    let (_, size_a) = export(&a, "a-final.json");
    let pid = a.pid().unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + HANG_GUARD;
    while a.alive() {
        assert!(Instant::now() < deadline, "the daemon did not stop:\n{}", a.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, v) = status(&b);
    let final_size = host(&v, "web-1").and_then(|h| h["latest"]["size"].as_u64()).unwrap_or(0);
    assert!(final_size > size_a, "no final checkpoint published at shutdown ({size_a} before): {v}\n{}", a.log());
}

#[test]
fn audit_verify_fleet_passes_an_honest_export_and_catches_a_rewritten_history() {
    let redis = RedisServer::start();
    let mut d = fleet_daemon(&redis, "web-1");
    let id = passport(&d);
    for _ in 0..4 {
        decide(&d, &id, 10);
    }
    let (early, _) = export(&d, "early.json");
    // The state as a backup would keep it.
    d.kill();
    let state = d.dir.path().join("state");
    let backup = d.dir.path().join("state-backup");
    copy_dir(&state, &backup);
    d.spawn();
    for _ in 0..6 {
        decide(&d, &id, 20);
    }
    let (honest, size) = export(&d, "honest.json");
    wait_published(&d, "web-1", size);
    let out = verify(&d, &honest, &["--fleet"]);
    assert!(out.status.success(), "an honest export against the fleet: {}", text(&out));
    assert!(text(&out).contains("consistent with the export"), "{}", text(&out));
    // An auditor's copy of what the fleet saw, for later and for offline use.
    let dump = d.dir.path().join("fleet-dump.json");
    let out = d.cli(&["fleet", "status", "--checkpoints-out", dump.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = verify(&d, &honest, &["--fleet-checkpoints", dump.to_str().unwrap()]);
    assert!(out.status.success(), "offline: {}", text(&out));

    // The host restores its store from the backup and writes another history, with the same key,
    // longer than the one it published: alone, the new log verifies.
    d.kill();
    std::fs::remove_dir_all(&state).unwrap();
    copy_dir(&backup, &state);
    d.spawn();
    for _ in 0..12 {
        decide(&d, &id, 1);
    }
    let (rewritten, new_size) = export(&d, "rewritten.json");
    assert!(new_size > size, "the rewritten log ({new_size}) is longer than the published one ({size})");
    // The host's operator hears it at start, before any audit (here the restored log was first
    // shorter than what the host had published: rolled back).
    let deadline = Instant::now() + HANG_GUARD;
    while !d.log().contains("restored from an old copy (rolled back)") {
        assert!(Instant::now() < deadline, "the restored host did not notice:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let alone = verify(&d, &rewritten, &[]);
    assert!(alone.status.success(), "the rewritten log is self-consistent: {}", text(&alone));
    for extra in [vec!["--fleet"], vec!["--fleet-checkpoints", dump.to_str().unwrap()]] {
        let out = verify(&d, &rewritten, &extra);
        assert!(!out.status.success(), "{extra:?} must catch the rewrite: {}", text(&out));
        assert!(text(&out).contains("history rewritten"), "{extra:?}: {}", text(&out));
    }
    let out = verify(&d, &rewritten, &["--fleet", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["fleet"]["results"].as_array().unwrap().iter().any(|r| r["outcome"] == "fork"), "{v}");

    // Restarted on the rewritten log when the newest checkpoint Redis holds for it is an honest
    // one of smaller size (the rewritten host's later ones deleted): same key, other root at that
    // size, and the host says so at start.
    d.kill();
    let _ = redis.command(&["ZREMRANGEBYSCORE", "sluice:checkpoints:web-1", &format!("({size}"), "+inf"]);
    d.spawn();
    let deadline = Instant::now() + HANG_GUARD;
    while !d.log().contains("does not extend the checkpoint it published") {
        assert!(Instant::now() < deadline, "the rewritten host did not notice:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }

    // An export that stops short of what the host had published (as a log rolled back to it
    // would): the larger published checkpoints show it.
    let out = verify(&d, &early, &["--fleet"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("export truncated or log rolled back"), "{}", text(&out));
}

#[test]
fn a_checkpoint_forged_in_redis_is_reported_and_never_trusted() {
    let redis = RedisServer::start();
    let d = fleet_daemon(&redis, "web-1");
    let id = passport(&d);
    decide(&d, &id, 3);
    let (honest, size) = export(&d, "honest.json");
    wait_published(&d, "web-1", size);
    // Someone with write access to Redis adds a checkpoint under web-1: a real entry with its
    // tree size changed (the signature no longer verifies), claiming a larger log.
    let real = redis.command(&["GET", "sluice:checkpoint:web-1"]).text().unwrap();
    let mut entry: Value = serde_json::from_str(&real).unwrap();
    let note = entry["note"].as_str().unwrap().to_string();
    let forged_size = size + 1000;
    let forged = note.replacen(&format!("\n{size}\n"), &format!("\n{forged_size}\n"), 1);
    assert_ne!(forged, note);
    entry["note"] = Value::String(forged);
    let reply = redis.command(&["ZADD", "sluice:checkpoints:web-1", &forged_size.to_string(), &entry.to_string()]);
    assert_eq!(reply, Reply::Int(1));

    let (ok, v) = status(&d);
    assert!(!ok, "fleet status exits 1 when an entry does not verify: {v}");
    let h = host(&v, "web-1").unwrap();
    assert!(h["latest"]["size"].as_u64().unwrap() < forged_size, "the forged size is never the latest: {h}");
    let refused = h["refused"].as_array().unwrap();
    assert!(
        refused.iter().any(|r| r["size"] == forged_size && r["reason"].as_str().unwrap().contains("does not verify")),
        "{h}"
    );
    let out = d.cli(&["fleet", "status"]);
    assert!(text(&out).contains("REFUSED  web-1"), "{}", text(&out));

    // The audit reports it as untrusted, and does not let it fail (or pass) the export.
    let out = verify(&d, &honest, &["--fleet"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("REFUSED  fleet") && text(&out).contains("not trusted"), "{}", text(&out));

    // A second host that claims the same host_id with another key is refused by Redis's script:
    // it never replaces web-1's key or writes its checkpoints.
    let registered = redis.command(&["HGET", "sluice:checkpoint-keys", "web-1"]).text().unwrap();
    let impostor = fleet_daemon(&redis, "web-1");
    let deadline = Instant::now() + HANG_GUARD;
    while !impostor.log().contains("is registered in Redis with another host key") {
        assert!(Instant::now() < deadline, "no conflict logged:\n{}", impostor.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(redis.command(&["HGET", "sluice:checkpoint-keys", "web-1"]).text().unwrap(), registered);
    let out = verify(&d, &honest, &["--fleet"]);
    assert!(out.status.success(), "the impostor wrote nothing under web-1: {}", text(&out));
}

#[test]
fn with_redis_down_the_daemon_keeps_deciding_and_publishes_the_backlog_when_it_returns() {
    let mut redis = RedisServer::start();
    let d = fleet_daemon(&redis, "web-1");
    let id = passport(&d);
    decide(&d, &id, 1);
    let (_, before) = export(&d, "before.json");
    wait_published(&d, "web-1", before);

    redis.kill();
    // Decisions over a few seconds: several checkpoints are signed while Redis is down.
    let started = Instant::now();
    let mut decided = 0;
    while started.elapsed() < Duration::from_secs(4) {
        let t = Instant::now();
        decide(&d, &id, 1);
        assert!(t.elapsed() < Duration::from_secs(2), "a decision waited on Redis: {:?}", t.elapsed());
        decided += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(decided >= 5);
    let (_, during) = export(&d, "during.json");
    assert!(during > before);

    // Redis comes back empty (no persistence): the backlog goes out.
    redis.restart();
    let h = wait_published(&d, "web-1", during);
    assert_eq!(h["refused"].as_array().unwrap().len(), 0, "{h}");
    let members = match redis.command(&["ZRANGE", "sluice:checkpoints:web-1", "0", "-1", "WITHSCORES"]) {
        Reply::Array(Some(items)) => items,
        other => panic!("{other:?}"),
    };
    let sizes: Vec<u64> = members.chunks(2).filter_map(|p| p.get(1).and_then(Reply::int)).map(|s| s as u64).collect();
    let after_outage = sizes.iter().filter(|&&s| s > before).count();
    assert!(after_outage >= 2, "the checkpoints signed during the outage are published, not only the last: {sizes:?}");
    // The outage is logged once, not once per checkpoint.
    let log = d.log();
    assert_eq!(log.matches("fleet checkpoints cannot be published").count(), 1, "{log}");
    assert!(log.contains("fleet checkpoints published again"), "{log}");
}

fn copy_dir(from: &Path, to: &Path) {
    let out = std::process::Command::new("cp").arg("-a").arg(from).arg(to).output().expect("cp");
    assert!(out.status.success(), "cp -a: {}", String::from_utf8_lossy(&out.stderr));
}
