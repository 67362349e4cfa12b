//! Test fixtures for the service and the proxy's tests: a service on a fresh store with one
//! registered passport, an allowed request, the spend it shows, the audit verdict, a record.

use super::{decide, Service};
use crate::decide::HostVerdict;
use crate::ledger::{export, verify};
use crate::ledger::{HostKey, Ledger, LedgerOptions};
use crate::passport::{Cents, Constraints, IssuerId, Permission, SpendWindow, TrustTier};
use crate::service::Peer;
use crate::service::{EnforceInput, HoldOrigin, ServiceConfig};
use ed25519_dalek::SigningKey;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

pub(crate) struct Fixture {
    pub _dir: tempfile::TempDir,
    pub service: Arc<Service>,
    pub passport: String,
}

fn peer() -> Peer {
    Peer { uid: 0, gid: 0, pid: 1, user: Some("root".into()) }
}

/// A service on a fresh store with one registered passport (`llm:*`, $100 a month).
pub(crate) async fn fixture() -> Fixture {
    let constraints = Constraints {
        max_cumulative: Some(Cents(10_000)),
        cumulative_window: Some(SpendWindow::Monthly),
        ..Constraints::default()
    };
    fixture_with(constraints).await
}

/// A service on a fresh store with one registered passport (`llm:*`) with these constraints.
pub(crate) async fn fixture_with(constraints: Constraints) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = HostKey::from_signing_key(SigningKey::from_bytes(&[9u8; 32]));
    let ledger = Ledger::open(&dir.path().join("ledger.redb"), host, LedgerOptions::default()).expect("ledger");
    let issuer = SigningKey::from_bytes(&[3u8; 32]);
    let config =
        ServiceConfig::passport_only(vec![IssuerId::from_key(&issuer.verifying_key())], Duration::from_secs(60));
    let service = Service::start(ledger, config).await.expect("service");
    let passport = register(&service, "meter-test", constraints).await;
    Fixture { _dir: dir, service, passport }
}

/// Registers a passport (`llm:*`) of `agent` with `constraints`, issued by the key the fixture's
/// service pins; its id.
pub(crate) async fn register(service: &Service, agent: &str, constraints: Constraints) -> String {
    let issuer = SigningKey::from_bytes(&[3u8; 32]);
    let issued = crate::passport::issue(
        crate::passport::IssueRequest {
            agent_id: agent.into(),
            agent_name: None,
            permissions: vec![Permission::parse("llm:*").expect("permission")],
            constraints,
            trust_tier: TrustTier::L1,
            lifetime_secs: 3600,
            now: crate::passport::now(),
        },
        &issuer,
    )
    .expect("issue");
    service.register(&issued.token, None, &peer()).await.expect("register");
    issued.claims.id.to_string()
}

/// An allowed `llm:chat` request costing `cost` millicents; its attestation id.
pub(crate) async fn allow(f: &Fixture, cost: u64) -> u64 {
    let input = EnforceInput {
        passport_id: f.passport.clone(),
        action: "llm:chat".into(),
        cost_cents: None,
        cost_millicents: Some(cost),
        target: Some("api.openai.com".into()),
        method: Some("POST".into()),
        path: Some("/v1/chat/completions".into()),
        port: None,
        signed_request_hash: None,
        gate_price: None,
    };
    let o = f.service.enforce_outcome(input, HoldOrigin::Proxy, HostVerdict::Allow).await.expect("enforce");
    assert_eq!(o.decision, decide::Decision::Allow, "{}", o.to_json());
    o.attestation_id
}

/// The window's and today's spend, exactly, in millicents. Checks on the way that the
/// API's whole-cent figures are those rounded up.
pub(crate) fn spent(f: &Fixture) -> (u64, u64) {
    let s = f.service.state(&f.passport).expect("state").to_json();
    let exact = |name: &str| {
        let m = s[format!("{name}_millicents")].as_u64().expect("millicents");
        assert_eq!(s[format!("{name}_cents")].as_u64(), Some(m.div_ceil(1000)), "{name}: {s}");
        m
    };
    (exact("window_cost"), exact("daily_cost"))
}

pub(crate) async fn verified(f: &Fixture) -> verify::VerifyReport {
    let bundle = export::export(
        f.service.ledger(),
        &export::ExportRequest { passport: None, since: None, consistency_from: None },
    )
    .await
    .expect("export");
    verify::verify_export(&bundle, &f.service.ledger().host_public_key(), None)
}

pub(crate) fn record(f: &Fixture, index: u64) -> Value {
    serde_json::from_slice(&f.service.ledger().record(index).expect("read").expect("exists")).expect("json")
}

/// A meter with one price, used for every model: `input` and `output` millicents per million
/// tokens, `max_tokens` 1000 when a request names none.
pub fn one_price_meter(
    kind: crate::policy::meter::MeterKind,
    input: u64,
    output: u64,
) -> crate::policy::meter::MeterSpec {
    use crate::policy::meter::{MeterSpec, ModelPrice, PriceTable};
    let price = ModelPrice { name: "m".into(), input_millicents_per_mtok: input, output_millicents_per_mtok: output };
    MeterSpec {
        kind,
        default_max_tokens: 1000,
        prices: Arc::new(PriceTable {
            as_of: "2026-01-01".into(),
            source: None,
            models: vec![price.clone()],
            unknown: price,
        }),
    }
}
