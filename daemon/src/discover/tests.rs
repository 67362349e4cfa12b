//! The pin rules against real gates answering in process (the gate's own discovery code, its own
//! store): trust on first use, a newer version accepted, and every way a gate can lie refused —
//! a rollback, another key, a different document under a version already seen, a forked log.

use super::verify::{BoxFuture, Source};
use super::*;
use crate::gate::catalog::{publish, PublishRequest};
use crate::gate::config::GateConfig;
use crate::gate::Gate;
use crate::ledger::Ledger;
use ed25519_dalek::SigningKey;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

const HOST: &str = "shipping.example.test";
const URL: &str = "https://shipping.example.test:8443";
const ROUTES: &str = "[[route]]\nmethod = \"POST\"\npath = \"/v1/shipments\"\npermission = \"shipments:create\"\n";

fn draft(cents: &str) -> String {
    format!("[[permission]]\nkey = \"shipments:create\"\ndescription = \"Create\"\nrisk_level = \"low\"\n[permission.constraints]\n\"core:pricing:per_call_cents\" = {cents}\n")
}

struct Live {
    gate: Gate,
    ledger: Ledger,
}

impl Live {
    fn new(dir: &Path, seed: u8) -> Live {
        let text = format!(
            "name = \"shipping\"\nkey = \"gate.key\"\nstate_dir = \"{}\"\nlisten = \"127.0.0.1:1\"\nupstream = \"http://127.0.0.1:9\"\n{ROUTES}",
            dir.join("state").display()
        );
        let config = GateConfig::parse(&text, &dir.join("gate.toml")).unwrap();
        let gate = Gate::with_key(config, SigningKey::from_bytes(&[seed; 32]));
        let ledger = gate.open_ledger().unwrap();
        Live { gate, ledger }
    }

    async fn publish(&self, cents: &str) {
        let req =
            PublishRequest { draft: draft(cents), summary: cents.into(), effective_at: None, accept_breaking: true };
        publish(&self.gate, &self.ledger, req, chrono::Utc::now()).await.unwrap();
    }
}

impl Source for Live {
    fn get<'a>(&'a self, path: &'a str, max: usize) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async move {
            let (p, q) = match path.split_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (path, None),
            };
            let resp =
                crate::gate::discovery::answer(&self.gate, &self.ledger, &http::Method::GET, p, q, Some(HOST), "https")
                    .await;
            let status = resp.status();
            let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes().to_vec();
            if !status.is_success() || bytes.len() > max {
                return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)));
            }
            Ok(bytes)
        })
    }
}

/// Answers recorded from a gate at one moment, served later (a stale or replaying gate).
struct Recorded(Mutex<HashMap<String, Vec<u8>>>);

impl Recorded {
    async fn of(live: &Live) -> Recorded {
        let mut m = HashMap::new();
        let wk = live.get("/.well-known/sluice", 1 << 20).await.unwrap();
        let v: Value = serde_json::from_slice(&wk).unwrap();
        let n = v["catalog_version"].as_u64().unwrap();
        m.insert("/.well-known/sluice".to_string(), wk);
        for p in ["/v1/catalog/versions".to_string(), format!("/v1/catalog/{n}/proof")] {
            m.insert(p.clone(), live.get(&p, 1 << 24).await.unwrap());
        }
        Recorded(Mutex::new(m))
    }
}

impl Source for Recorded {
    fn get<'a>(&'a self, path: &'a str, _max: usize) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        let got = self.0.lock().unwrap().get(path).cloned();
        Box::pin(async move { got.ok_or_else(|| format!("404 {path}")) })
    }
}

use serde_json::Value;

fn catalogs(dir: &Path, configured: Vec<(DomainName, GateId)>) -> GateCatalogs {
    GateCatalogs::new(vec![DomainName::parse(HOST).unwrap()], configured, dir, None)
}

#[tokio::test]
async fn first_use_pins_and_a_newer_version_moves_the_pin() {
    let dir = tempfile::tempdir().unwrap();
    let live = Live::new(&dir.path().join("a"), 1);
    live.publish("3").await;
    let cats = catalogs(dir.path(), vec![]);
    let offer = cats.discover_with(URL, &live).await.unwrap();
    assert!(offer.first_use);
    assert_eq!(offer.host, HOST);
    assert_eq!(offer.url, URL);
    let cur = offer.current().unwrap();
    assert_eq!(cur.snapshot.version, 1);
    assert_eq!(cur.snapshot.permission_of("POST", "/v1/shipments"), "shipments:create");
    let j = offer.to_json();
    assert_eq!(j["permissions"][0]["price_millicents"], 3000);
    assert_eq!(j["routes"][0]["path"], "/v1/shipments");

    live.publish("4").await;
    let offer = cats.discover_with(URL, &live).await.unwrap();
    assert!(!offer.first_use);
    assert_eq!(offer.current().unwrap().snapshot.version, 2);
    assert_eq!(offer.history.len(), 2);
    // The pin is durable: a restarted daemon knows version 2 and the checkpoint.
    let again = catalogs(dir.path(), vec![]);
    let pin = again.pins.get(HOST).unwrap().unwrap();
    assert_eq!((pin.catalog_version, pin.url.as_str()), (Some(2), URL));
    assert_eq!(again.offer(HOST).map(|o| o.gate_id.clone()), None, "offers are fetched, not read from the pin");
    live.ledger.shutdown();
}

#[tokio::test]
async fn a_rollback_is_refused_and_the_last_offer_stays() {
    let dir = tempfile::tempdir().unwrap();
    let live = Live::new(&dir.path().join("a"), 1);
    live.publish("3").await;
    let stale = Recorded::of(&live).await;
    live.publish("4").await;
    let cats = catalogs(dir.path(), vec![]);
    cats.discover_with(URL, &live).await.unwrap();
    let e = cats.discover_with(URL, &stale).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Rollback, "{e}");
    assert!(e.to_string().contains(HOST) && e.to_string().contains("rollback"), "{e}");
    assert_eq!(cats.offer(HOST).unwrap().current().unwrap().snapshot.version, 2);
    assert!(cats.failure(HOST).unwrap().contains("rollback"));
    live.ledger.shutdown();
}

#[tokio::test]
async fn another_gate_key_is_refused_pinned_or_configured() {
    let dir = tempfile::tempdir().unwrap();
    let a = Live::new(&dir.path().join("a"), 1);
    a.publish("3").await;
    let b = Live::new(&dir.path().join("b"), 2);
    b.publish("3").await;
    let cats = catalogs(&dir.path().join("d1"), vec![]);
    std::fs::create_dir_all(dir.path().join("d1")).unwrap();
    cats.discover_with(URL, &a).await.unwrap();
    let e = cats.discover_with(URL, &b).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::OtherKey, "{e}");
    assert!(e.to_string().contains(a.gate.gate_id.as_str()), "{e}");
    // A configured pin refuses another key from the first fetch, and is not "first use".
    std::fs::create_dir_all(dir.path().join("d2")).unwrap();
    let (id_a, _) = GateId::parse(&a.gate.gate_id).unwrap();
    let cats = catalogs(&dir.path().join("d2"), vec![(DomainName::parse(HOST).unwrap(), id_a)]);
    let e = cats.discover_with(URL, &b).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::OtherKey, "{e}");
    assert!(e.to_string().contains("[gates] pins"), "{e}");
    assert!(!cats.discover_with(URL, &a).await.unwrap().first_use);
    a.ledger.shutdown();
    b.ledger.shutdown();
}

#[tokio::test]
async fn a_second_document_for_a_seen_version_is_a_split_view() {
    let dir = tempfile::tempdir().unwrap();
    // Two stores under one gate key: two different "version 1"s.
    let a = Live::new(&dir.path().join("a"), 1);
    a.publish("3").await;
    let fork = Live::new(&dir.path().join("fork"), 1);
    fork.publish("1").await;
    let cats = catalogs(dir.path(), vec![]);
    cats.discover_with(URL, &a).await.unwrap();
    let e = cats.discover_with(URL, &fork).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::SplitView, "{e}");
    assert!(e.to_string().contains("SPLIT VIEW") && e.to_string().contains(HOST), "{e}");
    a.ledger.shutdown();
    fork.ledger.shutdown();
}

#[tokio::test]
async fn a_forked_log_is_a_split_view_even_with_the_same_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let a = Live::new(&dir.path().join("a"), 1);
    a.publish("3").await;
    let cats = catalogs(dir.path(), vec![]);
    cats.discover_with(URL, &a).await.unwrap();
    // The same catalog history, but the log behind it is another one: the gate serves version 1
    // from a store whose log does not extend the checkpoint pinned.
    let fork = Live::new(&dir.path().join("fork"), 1);
    let v1 = a.gate.catalogs.get(1).unwrap();
    let served = serde_json::to_vec(&v1.signed.to_json()).unwrap();
    fork.ledger
        .transact(move |txn| {
            txn.put(&crate::gate::catalog::key::version(1), &served)?;
            txn.put(&crate::gate::catalog::key::record(1), b"1")?;
            txn.put(crate::gate::catalog::key::HEAD, b"1")?;
            let mut m = crate::ledger::canonical::Members::with_capacity(2, 64);
            m.uint("v", 1).str("kind", "something_else");
            Ok((
                (),
                vec![
                    crate::ledger::Draft::new("other", m),
                    crate::gate::catalog::record(&fork_id(), &v1.signed, chrono::Utc::now()),
                ],
            ))
        })
        .await
        .unwrap();
    fork.gate.catalogs.load(&fork.ledger, &SigningKey::from_bytes(&[1; 32])).unwrap();
    fork.ledger.checkpoint_now().await.unwrap();
    let e = cats.discover_with(URL, &fork).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::SplitView, "{e}");
    assert!(e.to_string().contains("does not extend") || e.to_string().contains("two different logs"), "{e}");
    a.ledger.shutdown();
    fork.ledger.shutdown();
}

fn fork_id() -> String {
    GateId::from_key(&SigningKey::from_bytes(&[1; 32]).verifying_key()).as_str().to_string()
}

#[test]
fn urls_are_https_origins() {
    assert_eq!(parse_url("https://Shipping.Example.Test:8443/").unwrap(), (HOST.into(), URL.into()));
    assert_eq!(parse_url("https://g.test:443").unwrap().1, "https://g.test");
    for bad in
        ["http://g.test", "https://g.test/v1", "https://u@g.test", "https://127.0.0.1", "g.test", "https://g.test?x"]
    {
        assert!(parse_url(bad).is_err(), "{bad}");
    }
}
