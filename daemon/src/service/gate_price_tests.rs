//! Pricing a gate request by its verified catalog on the daemon's side: the catalog's price is
//! the cost the passport's caps see, and the price lock mirrors the gate's (the version in force
//! at the first allowed call; then the lower of that version's price and the current one).

use super::testkit;
use super::{gate_lock_key, EnforceInput, GatePrice, HoldOrigin};
use crate::catalog::{Draft, GateId, Route, SignedCatalog, Snapshot};
use crate::decide::{Decision, HostVerdict, Reason};
use crate::discover::Offer;
use crate::passport::{Cents, Constraints, SpendWindow, TrustTier};
use ed25519_dalek::SigningKey;
use std::path::Path;
use std::sync::Arc;

fn version(prev: Option<&SignedCatalog>, cents: &str) -> SignedCatalog {
    let key = SigningKey::from_bytes(&[5; 32]);
    let text = format!(
        "[[permission]]\nkey = \"llm:ship\"\ndescription = \"Ship\"\nrisk_level = \"low\"\n[permission.constraints]\n\"core:pricing:per_call_cents\" = {cents}\n"
    );
    let d = Draft::parse(Path::new("catalog.toml"), &text).unwrap();
    let routes = vec![Route::parse("POST", "/v1/ship", "llm:ship").unwrap()];
    let at = chrono::Utc::now();
    Snapshot::next(prev, GateId::from_key(&key.verifying_key()), d.permissions, routes, TrustTier::L1, cents, at, at)
        .unwrap()
        .sign(&key)
        .unwrap()
}

fn offer(history: Vec<SignedCatalog>) -> Arc<Offer> {
    let key = SigningKey::from_bytes(&[5; 32]).verifying_key();
    Arc::new(Offer {
        host: "gate.example".into(),
        url: "https://gate.example".into(),
        name: "g".into(),
        gate_id: GateId::from_key(&key),
        key,
        history,
        checkpoint: String::new(),
        checkpoint_size: 0,
        first_use: false,
        fetched_at: chrono::Utc::now(),
    })
}

fn input(passport: &str, offer: &Arc<Offer>) -> EnforceInput {
    EnforceInput {
        passport_id: passport.to_string(),
        action: "llm:ship".into(),
        // What the proxy passes (the price in force): the service decides the locked price.
        cost_millicents: Some(offer.current().unwrap().snapshot.permissions[0].terms.price().total_millicents()),
        target: Some("gate.example".into()),
        method: Some("POST".into()),
        path: Some("/v1/ship".into()),
        gate_price: Some(GatePrice { offer: offer.clone(), permission: "llm:ship".into() }),
        ..Default::default()
    }
}

fn capped(cents: u64) -> Constraints {
    Constraints {
        max_cumulative: Some(Cents(cents)),
        cumulative_window: Some(SpendWindow::Monthly),
        ..Constraints::default()
    }
}

#[tokio::test]
async fn a_spend_cap_holds_against_the_catalog_price_and_records_name_the_version() {
    let f = testkit::fixture_with(capped(10)).await;
    let v1 = offer(vec![version(None, "3")]);
    for i in 0..3 {
        let o =
            f.service.enforce_outcome(input(&f.passport, &v1), HoldOrigin::Proxy, HostVerdict::Allow).await.unwrap();
        assert_eq!(o.decision, Decision::Allow, "call {i}: {}", o.to_json());
        let r = testkit::record(&f, o.attestation_id);
        assert_eq!(r["cost_millicents"], 3000, "{r}");
        assert_eq!(r["gate_id"], v1.gate_id.as_str(), "{r}");
        assert_eq!(r["catalog_version"], 1, "{r}");
        assert_eq!(r["action"], "llm:ship", "{r}");
    }
    let o = f.service.enforce_outcome(input(&f.passport, &v1), HoldOrigin::Proxy, HostVerdict::Allow).await.unwrap();
    assert_eq!(o.decision, Decision::Block, "{}", o.to_json());
    assert_eq!(o.reason, Reason::SpendLimitExceeded);
    assert_eq!(testkit::spent(&f).0, 9000);
    assert!(testkit::verified(&f).await.is_ok());
}

#[tokio::test]
async fn the_price_lock_keeps_a_running_passport_on_its_first_version() {
    let f = testkit::fixture().await;
    let first = version(None, "3");
    let v1 = offer(vec![first.clone()]);
    let o = f.service.enforce_outcome(input(&f.passport, &v1), HoldOrigin::Proxy, HostVerdict::Allow).await.unwrap();
    assert_eq!(o.decision, Decision::Allow);
    let lock = f.service.ledger().state_get(&gate_lock_key(v1.gate_id.as_str(), &f.passport)).unwrap();
    assert_eq!(lock.as_deref(), Some(&b"1"[..]));

    // Version 2 raises the price: the running passport keeps version 1's, a new one pays 4.
    let v2 = offer(vec![first.clone(), version(Some(&first), "4")]);
    let o = f.service.enforce_outcome(input(&f.passport, &v2), HoldOrigin::Proxy, HostVerdict::Allow).await.unwrap();
    let r = testkit::record(&f, o.attestation_id);
    assert_eq!((r["cost_millicents"].as_u64(), r["catalog_version"].as_u64()), (Some(3000), Some(1)), "{r}");
    let fresh = testkit::register(&f.service, "new-agent", Constraints::default()).await;
    let o = f.service.enforce_outcome(input(&fresh, &v2), HoldOrigin::Proxy, HostVerdict::Allow).await.unwrap();
    let r = testkit::record(&f, o.attestation_id);
    assert_eq!((r["cost_millicents"].as_u64(), r["catalog_version"].as_u64()), (Some(4000), Some(2)), "{r}");

    // A decrease reaches a locked passport at once.
    let second = v2.history[1].clone();
    let v3 = offer(vec![first, second.clone(), version(Some(&second), "1")]);
    let o = f.service.enforce_outcome(input(&f.passport, &v3), HoldOrigin::Proxy, HostVerdict::Allow).await.unwrap();
    let r = testkit::record(&f, o.attestation_id);
    assert_eq!((r["cost_millicents"].as_u64(), r["catalog_version"].as_u64()), (Some(1000), Some(3)), "{r}");
}

#[tokio::test]
async fn a_blocked_first_call_locks_nothing_and_a_permission_outside_the_passport_is_refused() {
    let f = testkit::fixture_with(capped(1)).await;
    let v1 = offer(vec![version(None, "3")]);
    let o = f.service.enforce_outcome(input(&f.passport, &v1), HoldOrigin::Proxy, HostVerdict::Allow).await.unwrap();
    assert_eq!(o.decision, Decision::Block);
    assert!(f.service.ledger().state_get(&gate_lock_key(v1.gate_id.as_str(), &f.passport)).unwrap().is_none());
    // The testkit's passports grant llm:* only: another permission is the passport's refusal.
    let mut other = input(&f.passport, &v1);
    let key = SigningKey::from_bytes(&[5; 32]);
    let text = "[[permission]]\nkey = \"refunds:create\"\ndescription = \"R\"\nrisk_level = \"high\"\n";
    let d = Draft::parse(Path::new("c.toml"), text).unwrap();
    let at = chrono::Utc::now();
    let refunds =
        Snapshot::next(None, GateId::from_key(&key.verifying_key()), d.permissions, vec![], TrustTier::L1, "", at, at)
            .unwrap()
            .sign(&key)
            .unwrap();
    other.action = "refunds:create".into();
    other.gate_price = Some(GatePrice { offer: offer(vec![refunds]), permission: "refunds:create".into() });
    let o = f.service.enforce_outcome(other, HoldOrigin::Proxy, HostVerdict::Allow).await.unwrap();
    assert_eq!(o.decision, Decision::Block);
    assert_eq!(o.reason, Reason::PermissionDenied, "{}", o.to_json());
}
