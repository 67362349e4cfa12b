//! Tests of the store, exports and the verifier working together, including one test per
//! tampering an auditor must catch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use serde_json::{json, Map, Value};

use super::export::{self, ExportBundle, ExportRequest};
use super::hex;
use super::journal;
use super::merkle::{self, leaf_hash};
use super::store::journal_path;
use super::verify::{self, Problem};
use super::*;

mod lead;
mod stream;

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("test body must be an object, got {other}"),
    }
}

const SEED: [u8; 32] = [7u8; 32];

fn host_key() -> HostKey {
    HostKey::from_signing_key(SigningKey::from_bytes(&SEED))
}

struct TestStore {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl TestStore {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger.redb");
        TestStore { _dir: dir, path }
    }

    fn open(&self) -> Ledger {
        Ledger::open(&self.path, host_key(), LedgerOptions::default()).expect("open ledger")
    }
}

/// A decision-like transaction: adds `delta` to the chain's spend in `window` (state), and
/// records it with the spend fields the verifier recomputes.
fn spend(
    chain: &str,
    delta: i64,
    window: &str,
) -> impl FnOnce(&mut Txn<'_>) -> Result<(i64, Vec<Draft>), TxnError> + Send + 'static {
    let chain = chain.to_string();
    let window = window.to_string();
    move |txn| {
        let key = format!("spend/{chain}/{window}");
        let current = match txn.get(&key)? {
            Some(b) => i64::from_be_bytes(b.as_slice().try_into().map_err(|_| TxnError::abort("bad counter"))?),
            None => 0,
        };
        let after = current + delta;
        txn.put(&key, &after.to_be_bytes())?;
        let draft = Draft::new(
            chain.clone(),
            obj(json!({
                "kind": "decision",
                "decision": "allow",
                "action": "llm:call",
                "spend_delta_cents": delta,
                "spend_window_start": window,
                "spend_after_cents": after,
            })),
        );
        Ok((after, vec![draft]))
    }
}

fn reset(chain: &str) -> impl FnOnce(&mut Txn<'_>) -> Result<((), Vec<Draft>), TxnError> + Send + 'static {
    let chain = chain.to_string();
    move |txn| {
        for (k, _) in txn.scan(&format!("spend/{chain}/"))? {
            txn.delete(&k)?;
        }
        let draft =
            Draft::new(chain.clone(), obj(json!({"kind": "counter_reset", "window": "all", "spend_after_cents": 0})));
        Ok(((), vec![draft]))
    }
}

fn host_event(what: &str) -> impl FnOnce(&mut Txn<'_>) -> Result<((), Vec<Draft>), TxnError> + Send + 'static {
    let what = what.to_string();
    move |_| Ok(((), vec![Draft::new(HOST_CHAIN, obj(json!({"kind": "event", "event": what})))]))
}

/// Fills a ledger with three passports' decisions, a reset and host events: 20 records.
async fn populate(ledger: &Ledger) {
    ledger.transact(host_event("daemon_start")).await.unwrap();
    for round in 0..5 {
        for (i, chain) in ["pA", "pB", "pC"].iter().enumerate() {
            ledger.transact(spend(chain, 100 * (i as i64 + 1) + round, "2025-01-01")).await.unwrap();
        }
    }
    ledger.transact(reset("pB")).await.unwrap();
    ledger.transact(spend("pB", 40, "2025-01-01")).await.unwrap();
    ledger.transact(spend("pA", 7, "2025-01-02")).await.unwrap();
    ledger.transact(host_event("policy_reload")).await.unwrap();
}

fn problems(report: &verify::VerifyReport) -> String {
    report.problems.iter().map(|p| format!("  - {p}\n")).collect()
}

async fn full_export(ledger: &Ledger) -> ExportBundle {
    export::export(ledger, &ExportRequest::default()).await.expect("export")
}

fn vk() -> ed25519_dalek::VerifyingKey {
    host_key().verifying_key()
}

/// Rewrites a record's JSON (keeping it canonical) in an export.
fn edit_record(bundle: &mut ExportBundle, position: usize, f: impl FnOnce(&mut Map<String, Value>)) {
    let mut v: Map<String, Value> = serde_json::from_str(&bundle.records[position].record).unwrap();
    f(&mut v);
    bundle.records[position].record = String::from_utf8(canonical::canonicalize_object(&v).unwrap()).unwrap();
}

fn position_of(bundle: &ExportBundle, chain: &str, seq: u64) -> usize {
    bundle
        .records
        .iter()
        .position(|r| {
            let v: Value = serde_json::from_str(&r.record).unwrap();
            v["chain"] == chain && v["seq"] == seq
        })
        .expect("record present")
}

// ------------------------------------------------------------------------------------------
// Store

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transactions_keep_order_links_and_root() {
    let store = TestStore::new();
    let ledger = store.open();
    const TASKS: usize = 64;
    const PER_TASK: usize = 100;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let ledger = ledger.clone();
        handles.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..PER_TASK {
                let chain = format!("p{t}");
                let (seen_total, appended) = ledger
                    .transact(move |txn| {
                        // A global counter every transaction increments: lost updates would
                        // show as a final total below TASKS * PER_TASK.
                        let total =
                            txn.get("total")?.map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8]))).unwrap_or(0);
                        txn.put("total", &(total + 1).to_be_bytes())?;
                        let next = txn.next_index();
                        Ok(((total, next), vec![Draft::new(chain, obj(json!({"task": t, "i": i})))]))
                    })
                    .await
                    .expect("transact");
                assert_eq!(appended.len(), 1);
                assert_eq!(appended[0].index, seen_total.1, "next_index() told the truth");
                assert_eq!(appended[0].seq, i as u64, "per-chain seq");
                out.push(appended[0].clone());
            }
            out
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    let n = (TASKS * PER_TASK) as u64;
    assert_eq!(ledger.size(), n);
    let total = ledger.state_get("total").unwrap().unwrap();
    assert_eq!(u64::from_be_bytes(total.try_into().unwrap()), n);

    // Indices are exactly 0..n.
    let mut indices: Vec<u64> = all.iter().map(|a| a.index).collect();
    indices.sort_unstable();
    assert_eq!(indices, (0..n).collect::<Vec<_>>());

    // Chains link, and the root matches a rebuild from the stored records.
    let mut leaves = Vec::new();
    let mut heads: HashMap<String, (u64, merkle::Hash)> = HashMap::new();
    for i in 0..n {
        let bytes = ledger.record(i).unwrap().expect("record");
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["log_index"], i);
        let chain = v["chain"].as_str().unwrap().to_string();
        let seq = v["seq"].as_u64().unwrap();
        match heads.get(&chain) {
            None => {
                assert_eq!(seq, 0);
                assert_eq!(v["prev_hash"], Value::Null);
            }
            Some((s, h)) => {
                assert_eq!(seq, s + 1);
                assert_eq!(v["prev_hash"], hex::encode(h));
            }
        }
        let leaf = leaf_hash(&bytes);
        heads.insert(chain, (seq, leaf));
        leaves.push(leaf);
    }
    let cp = ledger.checkpoint_now().await.unwrap();
    assert_eq!(cp.checkpoint.size, n);
    assert_eq!(cp.checkpoint.root, merkle::root_of_leaves(&leaves));
    // Proofs from the store verify against the checkpoint.
    for i in [0, 1, n / 2, n - 1] {
        let proof = ledger.inclusion_proof(i, n).unwrap();
        merkle::verify_inclusion(i, n, &leaves[i as usize], &proof, &cp.checkpoint.root).unwrap();
    }
    let old_root = merkle::root_of_leaves(&leaves[..1000]);
    let proof = ledger.consistency_proof(1000, n).unwrap();
    merkle::verify_consistency(1000, n, &old_root, &cp.checkpoint.root, &proof).unwrap();
    // The full export verifies.
    let report = verify::verify_export(&full_export(&ledger).await, &vk(), None);
    assert!(report.is_ok(), "{}", problems(&report));
    assert_eq!(report.chains_checked, TASKS);
}

#[tokio::test]
async fn state_written_by_a_transaction_is_visible_to_the_next() {
    let store = TestStore::new();
    let ledger = store.open();
    ledger
        .transact(|txn| {
            txn.put("hold/1", b"pending")?;
            txn.put("hold/2", b"pending")?;
            txn.put("other", b"x")?;
            Ok(((), vec![]))
        })
        .await
        .unwrap();
    // Many transactions queued at once land in one group; each must see the previous one.
    let mut futs = Vec::new();
    for i in 0..50u8 {
        let l = ledger.clone();
        futs.push(tokio::spawn(async move {
            l.transact(move |txn| {
                let seen = txn.get("hold/1")?;
                assert_eq!(seen.as_deref(), Some(&b"pending"[..]));
                let n = txn.get("n")?.map_or(0u8, |v| v[0]);
                txn.put("n", &[n + 1])?;
                Ok((i, vec![]))
            })
            .await
            .unwrap()
        }));
    }
    for f in futs {
        f.await.unwrap();
    }
    assert_eq!(ledger.state_get("n").unwrap(), Some(vec![50]));
    let ((), _) = ledger
        .transact(|txn| {
            txn.delete("hold/2")?;
            txn.put("hold/3", b"approved")?;
            // Own writes are visible inside the transaction, merged into scans.
            let scan = txn.scan("hold/")?;
            assert_eq!(
                scan,
                vec![("hold/1".to_string(), b"pending".to_vec()), ("hold/3".to_string(), b"approved".to_vec())]
            );
            Ok(((), vec![]))
        })
        .await
        .unwrap();
    assert_eq!(
        ledger.state_scan("hold/").unwrap(),
        vec![("hold/1".to_string(), b"pending".to_vec()), ("hold/3".to_string(), b"approved".to_vec())]
    );
    assert_eq!(ledger.size(), 0, "no drafts, no records");
}

/// One transaction's drafts link to each other within their chains (the writer tracks the
/// heads a transaction moves itself), and a bad draft among them leaves none of them.
#[tokio::test]
async fn drafts_of_one_transaction_chain_to_each_other() {
    let store = TestStore::new();
    let ledger = store.open();
    let bad = ledger
        .transact(|_| {
            let drafts = vec![
                Draft::new("p", obj(json!({"n": 0}))),
                Draft::new("p", obj(json!({"n": 1, "seq": 9}))),
                Draft::new("q", obj(json!({"n": 2}))),
            ];
            Ok(((), drafts))
        })
        .await;
    assert!(matches!(bad, Err(LedgerError::Draft(record::DraftError::ReservedField { field: "seq", .. }))), "{bad:?}");
    assert_eq!(ledger.size(), 0);
    let (_, one) = ledger.transact(|_| Ok(((), vec![Draft::new("p", obj(json!({"n": "first"})))]))).await.unwrap();
    let (_, appended) = ledger
        .transact(|_| {
            let drafts = ["p", "q", "p", "p", "q"].into_iter().map(|c| Draft::new(c, obj(json!({"c": c})))).collect();
            Ok(((), drafts))
        })
        .await
        .unwrap();
    assert_eq!(appended.iter().map(|a| a.seq).collect::<Vec<_>>(), vec![1, 0, 2, 3, 1]);
    assert_eq!(appended.iter().map(|a| a.index).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    let prev = |a: &record::Appended| serde_json::from_slice::<Value>(&a.canonical).unwrap()["prev_hash"].clone();
    let hex = |a: &record::Appended| Value::from(crate::hex::encode(&a.leaf_hash));
    assert_eq!(prev(&appended[0]), hex(&one[0]));
    assert_eq!(prev(&appended[1]), Value::Null);
    assert_eq!(prev(&appended[2]), hex(&appended[0]));
    assert_eq!(prev(&appended[3]), hex(&appended[2]));
    assert_eq!(prev(&appended[4]), hex(&appended[1]));
    let report = verify::verify_export(&full_export(&ledger).await, &vk(), None);
    assert!(report.is_ok(), "{}", problems(&report));
    // The next transaction follows from the heads the last one left.
    let (_, next) = ledger.transact(|_| Ok(((), vec![Draft::new("q", obj(json!({})))]))).await.unwrap();
    assert_eq!(next[0].seq, 2);
}

#[tokio::test]
async fn failed_closures_leave_no_trace_and_do_not_poison_the_group() {
    let store = TestStore::new();
    let ledger = store.open();
    let mut futs = Vec::new();
    for i in 0..40u32 {
        let l = ledger.clone();
        futs.push(tokio::spawn(async move {
            let r = l
                .transact(move |txn| {
                    txn.put(&format!("k/{i}"), b"written")?;
                    match i % 4 {
                        0 => Ok((i, vec![Draft::new("p", obj(json!({"i": i})))])),
                        1 => Err(TxnError::abort(format!("caller refused {i}"))),
                        2 => panic!("closure {i} panics"),
                        _ => Ok((i, vec![Draft::new("p", obj(json!({"cost": 1.5})))])),
                    }
                })
                .await;
            (i, r)
        }));
    }
    let mut ok = 0;
    for f in futs {
        let (i, r) = f.await.unwrap();
        match (i % 4, r) {
            (0, Ok((v, a))) => {
                assert_eq!(v, i);
                assert_eq!(a.len(), 1);
                ok += 1;
            }
            (1, Err(LedgerError::Txn(TxnError::Abort(e)))) => {
                assert_eq!(e.to_string(), format!("caller refused {i}"))
            }
            (2, Err(LedgerError::Panicked)) => {}
            (3, Err(LedgerError::Draft(record::DraftError::Canonical { .. }))) => {}
            (k, r) => panic!("transaction {i} (kind {k}) got {r:?}"),
        }
        let written = ledger.state_get(&format!("k/{i}")).unwrap();
        assert_eq!(written.is_some(), i % 4 == 0, "state of transaction {i}");
    }
    assert_eq!(ledger.size(), ok);
    // The chain has no holes despite the failures in between.
    let report = verify::verify_export(&full_export(&ledger).await, &vk(), None);
    assert!(report.is_ok(), "{}", problems(&report));
}

#[tokio::test]
async fn reopening_keeps_records_heads_state_and_checkpoints() {
    let store = TestStore::new();
    let (cp, root) = {
        let ledger = store.open();
        populate(&ledger).await;
        let cp = ledger.checkpoint_now().await.unwrap();
        let root = ledger.snapshot().unwrap().root(ledger.size()).unwrap();
        ledger.shutdown();
        (cp, root)
    };
    let ledger = store.open();
    assert_eq!(ledger.size(), 20);
    assert_eq!(ledger.latest_checkpoint().unwrap(), Some(cp.clone()));
    assert_eq!(ledger.snapshot().unwrap().root(20).unwrap(), root);
    let spent = ledger.state_get("spend/pA/2025-01-01").unwrap().unwrap();
    assert_eq!(i64::from_be_bytes(spent.try_into().unwrap()), 100 * 5 + 10);
    let head = ledger.snapshot().unwrap().chain_head("pA").unwrap().unwrap();
    // The next record of pA continues its chain.
    let (_, appended) = ledger.transact(spend("pA", 1, "2025-01-02")).await.unwrap();
    assert_eq!(appended[0].index, 20);
    assert_eq!(appended[0].seq, head.seq + 1);
    let v: Value = serde_json::from_slice(&appended[0].canonical).unwrap();
    assert_eq!(v["prev_hash"], hex::encode(&head.hash));
    assert_eq!(v["spend_after_cents"], 8);
    let report = verify::verify_export(&full_export(&ledger).await, &vk(), Some(&cp.note));
    assert!(report.is_ok(), "{}", problems(&report));
}

/// The indexer keeps the rows of every group applied since its last commit in memory and writes
/// each key and chain once at the commit: a counter moved by many groups, a key written and then
/// deleted, and a chain extended many times before one commit come out as the last group left
/// them, in the published store, after a clean reopen and after replay from the journal.
#[tokio::test]
async fn rows_of_many_groups_in_one_commit_keep_the_last_value() {
    let store = TestStore::new();
    // No timer commits: every group below lands in the indexer's one open transaction.
    let opts = || LedgerOptions {
        publish_interval: Duration::from_secs(3600),
        durable_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    let ledger = Ledger::open(&store.path, host_key(), opts()).unwrap();
    for _ in 0..20 {
        ledger.transact(spend("pA", 1, "2025-01-01")).await.unwrap();
    }
    for _ in 0..3 {
        ledger.transact(spend("pB", 5, "2025-01-01")).await.unwrap();
    }
    ledger.transact(reset("pB")).await.unwrap();
    let counter = |l: &Ledger, key: &str| l.state_get(key).unwrap().map(|b| i64::from_be_bytes(b.try_into().unwrap()));
    let check = |l: &Ledger, what: &str| {
        assert_eq!(counter(l, "spend/pA/2025-01-01"), Some(20), "{what}: the last of twenty writes");
        assert_eq!(counter(l, "spend/pB/2025-01-01"), None, "{what}: written three times, then deleted");
        let snap = l.snapshot().unwrap();
        assert_eq!(snap.chain_head("pA").unwrap().unwrap().seq, 19, "{what}: pA's tail");
        assert_eq!(snap.chain_head("pB").unwrap().unwrap().seq, 3, "{what}: pB's tail (the reset)");
    };
    check(&ledger, "published");
    // A crash image taken now holds these groups only in the journal (redb was never synced).
    let image = crash_image(&store, true);
    ledger.shutdown();
    drop(ledger);
    for (what, path) in [("reopened", &store.path), ("replayed", &image.path)] {
        let l = Ledger::open(path, host_key(), opts()).unwrap();
        check(&l, what);
        let (_, a) = l.transact(spend("pA", 1, "2025-01-01")).await.unwrap();
        assert_eq!((a[0].index, a[0].seq), (24, 20), "{what}: pA's chain goes on where it was");
        let report = verify::verify_export(&full_export(&l).await, &vk(), None);
        assert!(report.is_ok(), "{what}: {}", problems(&report));
        l.shutdown();
    }
}

#[tokio::test]
async fn checkpoints_follow_growth_without_being_asked() {
    let store = TestStore::new();
    let opts = LedgerOptions { checkpoint_interval: std::time::Duration::from_millis(20), ..LedgerOptions::default() };
    let ledger = Ledger::open(&store.path, host_key(), opts).unwrap();
    ledger.transact(host_event("one")).await.unwrap();
    ledger.transact(host_event("two")).await.unwrap();
    // Liveness, not timing: wait (bounded) until the signer covered both records.
    let mut covered = false;
    for _ in 0..1000 {
        if let Some(cp) = ledger.latest_checkpoint().unwrap() {
            if cp.checkpoint.size == 2 {
                checkpoint::open(&cp.note, &vk()).expect("periodic checkpoint verifies");
                covered = true;
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(covered, "no checkpoint for size 2 was signed");
}

#[tokio::test]
async fn shutdown_refuses_new_writes_and_keeps_reads() {
    let store = TestStore::new();
    let ledger = store.open();
    ledger.transact(host_event("one")).await.unwrap();
    let clone = ledger.clone();
    ledger.shutdown();
    assert!(matches!(clone.transact(host_event("two")).await, Err(LedgerError::Closed)));
    assert!(matches!(clone.checkpoint_now().await, Err(LedgerError::Closed)));
    assert_eq!(clone.size(), 1);
    assert!(clone.record(0).unwrap().is_some());
    // The final checkpoint covers the tail.
    assert_eq!(clone.latest_checkpoint().unwrap().unwrap().checkpoint.size, 1);
}

#[tokio::test]
async fn second_open_of_the_same_store_is_refused() {
    let store = TestStore::new();
    let _ledger = store.open();
    let err = Ledger::open(&store.path, host_key(), LedgerOptions::default()).unwrap_err();
    assert!(matches!(err, LedgerError::AlreadyOpen { .. }), "{err}");
}

#[tokio::test]
async fn open_refuses_a_store_signed_by_another_host_key() {
    let store = TestStore::new();
    {
        let ledger = store.open();
        ledger.transact(host_event("one")).await.unwrap();
        ledger.checkpoint_now().await.unwrap();
    }
    let err = Ledger::open(&store.path, HostKey::generate(), LedgerOptions::default()).unwrap_err();
    assert!(matches!(err, LedgerError::Incoherent { .. }) && err.to_string().contains("host.key"), "{err}");
}

// ------------------------------------------------------------------------------------------
// Exports and verification: happy paths

#[tokio::test]
async fn full_export_verifies() {
    let store = TestStore::new();
    let ledger = store.open();
    populate(&ledger).await;
    let bundle = full_export(&ledger).await;
    assert!(bundle.full);
    assert_eq!(bundle.records.len(), 20);
    assert!(bundle.records.iter().all(|r| r.inclusion_proof.is_empty()));
    // Round-trips through its JSON file format.
    let text = serde_json::to_string_pretty(&bundle).unwrap();
    let report = verify::verify_document(&text, &vk(), None);
    assert!(report.is_ok(), "{}", problems(&report));
    assert_eq!(report.records_checked, 20);
    assert_eq!(report.chains_checked, 4);
    assert_eq!(report.checkpoint_size, Some(20));
}

#[tokio::test]
async fn filtered_exports_verify() {
    let store = TestStore::new();
    let ledger = store.open();
    populate(&ledger).await;
    let by_passport =
        export::export(&ledger, &ExportRequest { passport: Some("pB".into()), ..Default::default() }).await.unwrap();
    assert!(!by_passport.full);
    assert_eq!(by_passport.records.len(), 7);
    let report = verify::verify_export(&by_passport, &vk(), None);
    assert!(report.is_ok(), "{}", problems(&report));

    // Records written later: a `since` cut lands mid-chain, and the verifier takes the first
    // record of each chain as the baseline.
    let cut = record::now_rfc3339();
    ledger.transact(spend("pA", 3, "2025-01-02")).await.unwrap();
    ledger.transact(spend("pC", 4, "2025-01-01")).await.unwrap();
    ledger.transact(spend("pA", 5, "2025-01-02")).await.unwrap();
    let since = export::export(&ledger, &ExportRequest { since: Some(cut), ..Default::default() }).await.unwrap();
    assert_eq!(since.records.len(), 3);
    let report = verify::verify_export(&since, &vk(), None);
    assert!(report.is_ok(), "{}", problems(&report));
}

#[tokio::test]
async fn portable_attestation_verifies_alone() {
    let store = TestStore::new();
    let ledger = store.open();
    populate(&ledger).await;
    for index in [0u64, 7, 19] {
        let att = export::proof(&ledger, index).await.unwrap();
        let text = serde_json::to_string(&att).unwrap();
        let report = verify::verify_document(&text, &vk(), None);
        assert!(report.is_ok(), "index {index}: {}", problems(&report));
    }
    assert!(export::proof(&ledger, 20).await.is_err());

    // Tampered record: the proof no longer leads to the root.
    let mut att = export::proof(&ledger, 7).await.unwrap();
    att.record = att.record.replace("\"allow\"", "\"block\"");
    let report = verify::verify_attestation(&att, &vk());
    assert!(
        report.problems.iter().any(|p| matches!(p, Problem::InclusionProofInvalid { index: 7, .. })),
        "{}",
        problems(&report)
    );
    // Another host's key: the checkpoint does not verify.
    let att = export::proof(&ledger, 7).await.unwrap();
    let report = verify::verify_attestation(&att, &HostKey::generate().verifying_key());
    assert!(matches!(report.problems.as_slice(), [Problem::CheckpointInvalid { .. }]));
}

#[tokio::test]
async fn filtered_export_with_consistency_proof_against_older_checkpoint() {
    let store = TestStore::new();
    let ledger = store.open();
    populate(&ledger).await;
    let older = ledger.checkpoint_now().await.unwrap();
    ledger.transact(spend("pB", 1, "2025-01-01")).await.unwrap();
    let req = ExportRequest {
        passport: Some("pB".into()),
        consistency_from: Some(older.checkpoint.size),
        ..Default::default()
    };
    let bundle = export::export(&ledger, &req).await.unwrap();
    let report = verify::verify_export(&bundle, &vk(), Some(&older.note));
    assert!(report.is_ok(), "{}", problems(&report));

    // Without the proof the check cannot be made, and the verifier says so.
    let mut no_proof = bundle.clone();
    no_proof.consistency = None;
    let report = verify::verify_export(&no_proof, &vk(), Some(&older.note));
    assert!(matches!(report.problems.as_slice(), [Problem::ConsistencyUnchecked { .. }]));
    // A damaged proof fails.
    let mut bad = bundle.clone();
    if let Some(c) = bad.consistency.as_mut() {
        c.proof[0] = hex::encode(&[0u8; 32]);
    }
    let report = verify::verify_export(&bad, &vk(), Some(&older.note));
    assert!(matches!(report.problems.as_slice(), [Problem::ConsistencyProofInvalid { .. }]));
}

// ------------------------------------------------------------------------------------------
// Tampering

async fn populated() -> (TestStore, Ledger, ExportBundle) {
    let store = TestStore::new();
    let ledger = store.open();
    populate(&ledger).await;
    let bundle = full_export(&ledger).await;
    let report = verify::verify_export(&bundle, &vk(), None);
    assert!(report.is_ok(), "{}", problems(&report));
    (store, ledger, bundle)
}

fn has(report: &verify::VerifyReport, pred: impl Fn(&Problem) -> bool) -> bool {
    report.problems.iter().any(pred)
}

#[tokio::test]
async fn tamper_edited_record_is_named() {
    let (_s, ledger, mut bundle) = populated().await;
    let pos = position_of(&bundle, "pA", 1);
    let index = bundle.records[pos].index;
    edit_record(&mut bundle, pos, |r| {
        r.insert("decision".into(), json!("block"));
    });
    let report = verify::verify_export(&bundle, &vk(), None);
    assert!(has(&report, |p| matches!(p, Problem::RootMismatch { .. })), "{}", problems(&report));
    // The next record of the chain no longer links to it.
    let next = bundle.records[position_of(&bundle, "pA", 2)].index;
    assert!(
        has(&report, |p| matches!(p, Problem::BrokenLink { chain, index: i, .. } if chain == "pA" && *i == next)),
        "{}",
        problems(&report)
    );
    // In a filtered export, the edited record's own inclusion proof fails.
    let mut filtered =
        export::export(&ledger, &ExportRequest { passport: Some("pA".into()), ..Default::default() }).await.unwrap();
    let fpos = filtered.records.iter().position(|r| r.index == index).unwrap();
    edit_record(&mut filtered, fpos, |r| {
        r.insert("decision".into(), json!("block"));
    });
    let report = verify::verify_export(&filtered, &vk(), None);
    assert!(
        has(&report, |p| matches!(p, Problem::InclusionProofInvalid { index: i, .. } if *i == index)),
        "{}",
        problems(&report)
    );
    // A non-canonical rewrite of the same content is named too.
    let mut spaced = full_export(&ledger).await;
    spaced.records[3].record = spaced.records[3].record.replacen(':', ": ", 1);
    let report = verify::verify_export(&spaced, &vk(), None);
    assert!(
        has(
            &report,
            |p| matches!(p, Problem::RecordMalformed { index: 3, reason, .. } if reason.contains("canonical"))
        ),
        "{}",
        problems(&report)
    );
}

#[tokio::test]
async fn tamper_deleted_record_is_named() {
    let (_s, _l, mut bundle) = populated().await;
    let pos = position_of(&bundle, "pC", 2);
    let index = bundle.records[pos].index;
    bundle.records.remove(pos);
    let report = verify::verify_export(&bundle, &vk(), None);
    assert!(
        has(&report, |p| matches!(p, Problem::MissingRecords { from, to } if *from == index && *to == index)),
        "{}",
        problems(&report)
    );
    assert!(
        has(&report, |p| matches!(p, Problem::SeqGap { chain, expected: 2, found: 3, .. } if chain == "pC")),
        "{}",
        problems(&report)
    );
    assert!(has(&report, |p| matches!(p, Problem::RootMismatch { .. })));
}

#[tokio::test]
async fn tamper_reordered_records_are_named() {
    let (_s, _l, mut bundle) = populated().await;
    bundle.records.swap(4, 5);
    let report = verify::verify_export(&bundle, &vk(), None);
    assert!(
        has(&report, |p| matches!(p, Problem::OutOfOrder { position: 5, index: 4, previous: 5 })),
        "{}",
        problems(&report)
    );
    assert!(has(&report, |p| matches!(p, Problem::RootMismatch { .. })));

    // Reordering and renumbering consistently still breaks the root and the chain links.
    let (_s, _l, mut bundle) = populated().await;
    bundle.records.swap(4, 5);
    for pos in [4usize, 5] {
        bundle.records[pos].index = pos as u64;
        edit_record(&mut bundle, pos, |r| {
            r.insert("log_index".into(), json!(pos));
        });
    }
    let report = verify::verify_export(&bundle, &vk(), None);
    assert!(has(&report, |p| matches!(p, Problem::RootMismatch { .. })), "{}", problems(&report));
}

#[tokio::test]
async fn tamper_truncation_is_named() {
    let (_s, _l, mut bundle) = populated().await;
    bundle.records.truncate(17);
    let report = verify::verify_export(&bundle, &vk(), None);
    assert!(
        has(&report, |p| matches!(p, Problem::Truncated { last_present: Some(16), checkpoint_size: 20 })),
        "{}",
        problems(&report)
    );
    assert!(has(&report, |p| matches!(p, Problem::RootMismatch { .. })));
}

#[tokio::test]
async fn tamper_forged_checkpoint_signature_is_named() {
    let (_s, _l, mut bundle) = populated().await;
    // Re-sign the same checkpoint with an attacker's key under the host's name and key id.
    let attacker = HostKey::generate();
    let cp = checkpoint::parse_unverified(&bundle.checkpoint).unwrap();
    let body = cp.body();
    let sig = attacker.sign(body.as_bytes());
    let mut blob = checkpoint::key_id(&cp.origin, &vk()).to_vec();
    blob.extend_from_slice(&sig.to_bytes());
    use base64::Engine;
    bundle.checkpoint =
        format!("{body}\n\u{2014} {} {}\n", cp.origin, base64::engine::general_purpose::STANDARD.encode(blob));
    let report = verify::verify_export(&bundle, &vk(), None);
    assert!(
        has(&report, |p| matches!(p, Problem::CheckpointInvalid { reason } if reason.contains("does not verify"))),
        "{}",
        problems(&report)
    );
}

#[tokio::test]
async fn tamper_per_passport_gap_is_named() {
    let (_s, ledger, _) = populated().await;
    let mut bundle =
        export::export(&ledger, &ExportRequest { passport: Some("pA".into()), ..Default::default() }).await.unwrap();
    // Every remaining record still has a valid inclusion proof; only the chain shows the gap.
    let removed = bundle.records.remove(2);
    let after = bundle.records[2].index;
    let report = verify::verify_export(&bundle, &vk(), None);
    assert!(
        has(
            &report,
            |p| matches!(p, Problem::SeqGap { chain, index, expected: 2, found: 3 } if chain == "pA" && *index == after)
        ),
        "{}",
        problems(&report)
    );
    assert!(
        has(&report, |p| matches!(p, Problem::BrokenLink { chain, index, .. } if chain == "pA" && *index == after)),
        "{}",
        problems(&report)
    );
    assert!(!has(&report, |p| matches!(p, Problem::InclusionProofInvalid { .. })));
    let _ = removed;
}

#[tokio::test]
async fn tamper_spend_that_does_not_add_up_is_named() {
    let (_s, ledger, _) = populated().await;
    // A record whose cumulative spend lies (a buggy or malicious writer): correctly logged and
    // signed, so only the recomputation catches it.
    let (_, appended) = ledger
        .transact(|txn| {
            let _ = txn.next_index();
            Ok((
                (),
                vec![Draft::new(
                    "pC",
                    obj(json!({
                        "kind": "decision",
                        "spend_delta_cents": 500,
                        "spend_window_start": "2025-01-01",
                        "spend_after_cents": 10,
                    })),
                )],
            ))
        })
        .await
        .unwrap();
    let bad_index = appended[0].index;
    // And one with a missing field.
    let (_, appended) = ledger
        .transact(|_| Ok(((), vec![Draft::new("pC", obj(json!({"spend_delta_cents": 1, "spend_after_cents": 11})))])))
        .await
        .unwrap();
    let missing_index = appended[0].index;
    let bundle = full_export(&ledger).await;
    let report = verify::verify_export(&bundle, &vk(), None);
    // pC spent 300+301+302+303+304 = 1510 cents in 2025-01-01 before (version 1 records, whole
    // cents: the verifier sums in millicents).
    assert!(
        has(
            &report,
            |p| matches!(p, Problem::SpendMismatch { chain, index, field, expected: 2_010_000, found: 10_000, window_start } if chain == "pC" && *index == bad_index && window_start == "2025-01-01" && field == "spend_after_cents")
        ),
        "{}",
        problems(&report)
    );
    assert!(
        has(
            &report,
            |p| matches!(p, Problem::SpendFieldInvalid { chain, index, field, .. } if chain == "pC" && *index == missing_index && field == "spend_window_start")
        ),
        "{}",
        problems(&report)
    );
    assert_eq!(report.problems.len(), 2, "{}", problems(&report));
}

// ------------------------------------------------------------------------------------------
// Money: version 1 records (whole cents) and version 2 records (millicents)

/// An export made by the daemon version that recorded whole cents (`"v": 1`): decisions, a held
/// request and its approval, a counter reset.
const V1_EXPORT: &str = include_str!("testdata/v1-export.json");
const V1_HOST_PUB: &str = include_str!("testdata/v1-host.pub");

#[test]
fn an_export_written_in_cents_still_verifies() {
    let host =
        sluice_files::keyfile::parse_public_key(Path::new("testdata/v1-host.pub"), V1_HOST_PUB).expect("host key");
    let report = verify::verify_document(V1_EXPORT, &host, None);
    assert!(report.is_ok(), "{}", problems(&report));
    assert_eq!((report.records_checked, report.chains_checked), (10, 2));

    // Its spend is still recomputed: a cents field edited by one cent is named, in dollars.
    let mut bundle: ExportBundle = serde_json::from_str(V1_EXPORT).expect("fixture");
    edit_record(&mut bundle, 7, |r| {
        r.insert("spend_after_cents".into(), 659.into());
    });
    let report = verify::verify_export(&bundle, &host, None);
    let mismatch = report
        .problems
        .iter()
        .find(|p| matches!(p, Problem::SpendMismatch { index: 7, expected: 658_000, found: 659_000, field, .. } if field == "spend_after_cents"))
        .unwrap_or_else(|| panic!("{}", problems(&report)));
    assert!(mismatch.to_string().contains("field spend_after_cents says $6.59, but the spend in window"), "{mismatch}");
    assert!(mismatch.to_string().ends_with("adds up to $6.58"), "{mismatch}");
}

/// A record body with a version and spend fields.
fn money_record(v: u64, fields: Value) -> Map<String, Value> {
    let mut m = obj(fields);
    m.insert("v".into(), v.into());
    m.insert("kind".into(), m.get("kind").cloned().unwrap_or_else(|| "decision".into()));
    m
}

async fn append(ledger: &Ledger, chain: &str, body: Map<String, Value>) -> u64 {
    let chain = chain.to_string();
    let (_, appended) = ledger.transact(move |_| Ok(((), vec![Draft::new(chain, body)]))).await.unwrap();
    appended[0].index
}

/// One chain written partly in cents (version 1) and partly in millicents (version 2), in the
/// same window and across a reset: the verifier sums it exactly, in millicents, across the switch.
#[tokio::test]
async fn spend_is_recomputed_across_the_switch_to_millicents() {
    let store = TestStore::new();
    let ledger = store.open();
    let w = "2026-12-01T00:00:00.000000Z";
    let v1 = |delta: i64, after: i64| {
        money_record(1, json!({"spend_window_start": w, "spend_delta_cents": delta, "spend_after_cents": after}))
    };
    let v2 = |delta: i64, after: i64| {
        money_record(
            2,
            json!({"spend_window_start": w, "spend_delta_millicents": delta, "spend_after_millicents": after}),
        )
    };
    append(&ledger, "pM", v1(250, 250)).await;
    append(&ledger, "pM", v1(1, 251)).await;
    append(
        &ledger,
        "pM",
        money_record(
            1,
            json!({"kind": "settlement", "spend_window_start": w, "spend_delta_cents": -4, "spend_after_cents": 247}),
        ),
    )
    .await;
    // The upgrade: 247 cents are 247,000 millicents.
    append(&ledger, "pM", v2(5, 247_005)).await;
    append(&ledger, "pM", money_record(2, json!({"kind": "settlement", "spend_window_start": w, "spend_delta_millicents": -3, "spend_after_millicents": 247_002}))).await;
    append(&ledger, "pM", v2(0, 247_002)).await; // a block records the spend unchanged
                                                 // A reset in the new format, then fractions from zero.
    append(&ledger, "pM", money_record(2, json!({"kind": "counter_reset", "window": "monthly", "spend_window_start": w, "spend_delta_millicents": 0, "spend_after_millicents": 0}))).await;
    append(&ledger, "pM", v2(42, 42)).await;
    // A chain that never saw a cents record, and one reset in cents then continued in millicents.
    append(&ledger, "pN", v2(1, 1)).await;
    append(&ledger, "pO", v1(10, 10)).await;
    append(&ledger, "pO", money_record(1, json!({"kind": "counter_reset", "window": "all", "spend_after_cents": 0})))
        .await;
    append(&ledger, "pO", v2(7, 7)).await;
    let bundle = full_export(&ledger).await;
    let report = verify::verify_export(&bundle, &vk(), None);
    assert!(report.is_ok(), "{}", problems(&report));

    // Lies and malformations after the switch, each named.
    let bad_after = append(&ledger, "pM", v2(8, 51)).await; // 42 + 8 = 50
    let both = append(&ledger, "pM", money_record(2, json!({"spend_window_start": w, "spend_delta_millicents": 1, "spend_delta_cents": 0, "spend_after_millicents": 52}))).await;
    let cents_in_v2 = append(
        &ledger,
        "pN",
        money_record(2, json!({"spend_window_start": w, "spend_delta_cents": 1, "spend_after_cents": 2})),
    )
    .await;
    let not_int = append(
        &ledger,
        "pO",
        money_record(2, json!({"spend_window_start": w, "spend_delta_millicents": "3", "spend_after_millicents": 10})),
    )
    .await;
    let reset_not_zero = append(
        &ledger,
        "pO",
        money_record(2, json!({"kind": "counter_reset", "window": "all", "spend_after_millicents": 5})),
    )
    .await;
    let report = verify::verify_export(&full_export(&ledger).await, &vk(), None);
    let named = |index: u64, field: &str| {
        has(&report, |p| match p {
            Problem::SpendMismatch { index: i, field: f, .. }
            | Problem::SpendFieldInvalid { index: i, field: f, .. } => *i == index && f == field,
            _ => false,
        })
    };
    assert!(
        has(
            &report,
            |p| matches!(p, Problem::SpendMismatch { index, expected: 50, found: 51, .. } if *index == bad_after)
        ),
        "{}",
        problems(&report)
    );
    assert!(named(both, "spend_delta_millicents"), "{}", problems(&report));
    assert!(
        named(cents_in_v2, "spend_delta_cents") && named(cents_in_v2, "spend_after_cents"),
        "{}",
        problems(&report)
    );
    assert!(named(not_int, "spend_delta_millicents"), "{}", problems(&report));
    assert!(named(reset_not_zero, "spend_after_millicents"), "{}", problems(&report));
    assert_eq!(report.problems.len(), 6, "{}", problems(&report));
    let text = problems(&report);
    assert!(text.contains("field spend_after_millicents says $0.00051, but the spend in window"), "{text}");
    assert!(
        text.contains("a version 2 record names money in millicents (spend_delta_millicents), not cents"),
        "{text}"
    );
    assert!(text.contains("the record also has spend_delta_cents"), "{text}");
    assert!(text.contains("counter_reset must carry 0, found 5 millicents"), "{text}");

    // The writer cannot record more than 2^53 - 1; a hand-edited export can. Such cents are named,
    // and every figure in the report stays a 64-bit integer (`audit verify --json` prints it).
    let mut bundle = full_export(&ledger).await;
    let last = bundle.records.len() - 1;
    let mut body: Map<String, Value> = serde_json::from_str(&bundle.records[last].record).unwrap();
    body.remove("spend_delta_millicents");
    body.remove("spend_after_millicents");
    body.insert("v".into(), 1.into());
    body.insert("spend_delta_cents".into(), i64::MAX.into());
    body.insert("spend_after_cents".into(), i64::MAX.into());
    bundle.records[last].record = Value::Object(body).to_string();
    let report = verify::verify_export(&bundle, &vk(), None);
    let text = problems(&report);
    assert!(text.contains("9223372036854775807 cents is more than 64 bits of millicents"), "{text}");
    assert!(serde_json::to_value(&report).is_ok(), "{text}");
}

/// User + system CPU of this process's thread named `name` (as `comm` shows it, 15 bytes at
/// most), in clock ticks.
fn thread_cpu_ticks(name: &str) -> Option<u64> {
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        if std::fs::read_to_string(dir.join("comm")).ok()?.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        // Fields after the `(comm)`: state is field 3, utime 14 and stime 15.
        let rest = stat.rsplit_once(") ")?.1;
        let f: Vec<&str> = rest.split(' ').collect();
        return Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?);
    }
    None
}

/// Bytes of a file, or of every file under a directory.
fn tree_bytes(path: &Path) -> u64 {
    let meta = std::fs::symlink_metadata(path).unwrap();
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path).unwrap().map(|e| tree_bytes(&e.unwrap().path())).sum()
}

fn copy_file(from: &Path, to: &Path) {
    std::fs::copy(from, to).expect("copy store file");
}

/// Copies the segment files, tiles and links of the store at `from` over those of the store at
/// `to`.
fn copy_segments(from: &Path, to: &Path) {
    let (from_store, to_store) = (from, to);
    let (from, to) = (store::segments_dir(from), store::segments_dir(to));
    // Copying a live directory is not atomic: a segment sealed between listing and copying
    // has lost its `.log` and gained a `.zst` the listing did not show. A power cut sees one
    // or the other, so such a copy is started over until no listed file vanished.
    'again: for _ in 0..1000 {
        let _ = std::fs::remove_dir_all(&to);
        std::fs::create_dir_all(&to).unwrap();
        let Ok(entries) = std::fs::read_dir(&from) else { return };
        for entry in entries {
            let entry = entry.unwrap();
            match std::fs::copy(entry.path(), to.join(entry.file_name())) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue 'again,
                Err(e) => panic!("copy {}: {e}", entry.path().display()),
            }
        }
        copy_tiles_and_links(from_store, to_store);
        return;
    }
    panic!("segments of {} kept changing while copied", from.display());
}

/// Copies the tile tree and the links file (both only grow: a copy is some prefix of them).
fn copy_tiles_and_links(from: &Path, to: &Path) {
    fn tree(from: &Path, to: &Path) {
        let _ = std::fs::remove_dir_all(to);
        std::fs::create_dir_all(to).unwrap();
        let Ok(entries) = std::fs::read_dir(from) else { return };
        for entry in entries {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                tree(&entry.path(), &to.join(entry.file_name()));
            } else {
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    }
    tree(&store::tiles_dir(from), &store::tiles_dir(to));
    if store::links_path(from).exists() {
        copy_file(&store::links_path(from), &store::links_path(to));
    }
}

#[tokio::test]
async fn tamper_restored_old_copy_of_the_store_is_named() {
    let store = TestStore::new();
    let backup = store.path.with_extension("backup");
    {
        let ledger = store.open();
        populate(&ledger).await; // 20 records
        ledger.shutdown();
    }
    copy_file(&store.path, &backup);
    let seen_by_auditor = {
        let ledger = store.open();
        for i in 0..10 {
            ledger.transact(spend("pA", 1000 + i, "2025-01-03")).await.unwrap();
        }
        let cp = ledger.checkpoint_now().await.unwrap(); // size 30
        ledger.shutdown();
        cp
    };
    assert_eq!(seen_by_auditor.checkpoint.size, 30);

    // Restore the old copy, then write different records past the auditor's size.
    copy_file(&backup, &store.path);
    {
        let ledger = store.open();
        assert_eq!(ledger.size(), 20);
        for i in 0..15 {
            ledger.transact(spend("pB", 1 + i, "2025-01-03")).await.unwrap();
        }
        let bundle = full_export(&ledger).await; // size 35, internally consistent
        let alone = verify::verify_export(&bundle, &vk(), None);
        assert!(alone.is_ok(), "{}", problems(&alone));
        let report = verify::verify_export(&bundle, &vk(), Some(&seen_by_auditor.note));
        assert!(has(&report, |p| matches!(p, Problem::Fork { older_size: 30, .. })), "{}", problems(&report));
        ledger.shutdown();
    }

    // Restore again and write fewer records than the auditor saw: a rollback.
    copy_file(&backup, &store.path);
    let ledger = store.open();
    for i in 0..5 {
        ledger.transact(spend("pC", 1 + i, "2025-01-03")).await.unwrap();
    }
    let bundle = full_export(&ledger).await; // size 25
    let report = verify::verify_export(&bundle, &vk(), Some(&seen_by_auditor.note));
    assert!(
        has(&report, |p| matches!(p, Problem::Rollback { older_size: 30, checkpoint_size: 25 })),
        "{}",
        problems(&report)
    );
    // A filtered export with a consistency proof from 30 cannot even be produced.
    let err = export::export(
        &ledger,
        &ExportRequest { passport: Some("pC".into()), consistency_from: Some(30), ..Default::default() },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, export::ExportError::ConsistencyBeyondSize { .. }));
}

#[tokio::test]
async fn garbage_documents_are_reported_not_panicking() {
    for text in ["", "null", "[]", "{\"format\":\"sluice-audit-export/v1\"}", "{\"format\":5}"] {
        let report = verify::verify_document(text, &vk(), None);
        assert!(matches!(report.problems.as_slice(), [Problem::Malformed { .. }]), "{text}");
    }
    let (_s, _l, mut bundle) = populated().await;
    bundle.records[0].record = "not json".into();
    bundle.records[1].record = "[1,2]".into();
    bundle.records[2].record = r#"{"log_index":2,"x":1.5}"#.into();
    let report = verify::verify_export(&bundle, &vk(), None);
    for index in 0..3u64 {
        assert!(
            has(&report, |p| matches!(p, Problem::RecordMalformed { index: i, .. } if *i == index)),
            "record {index}: {}",
            problems(&report)
        );
    }
}

// ------------------------------------------------------------------------------------------
// Throughput (not a test: numbers for the report)

/// Measures `transact` throughput and latency at 1, 16 and 64 concurrent callers, each
/// transaction reading and writing a counter and appending one decision-sized record.
/// Run: `cargo test --release -p sluice --lib ledger::tests::bench_transact_throughput -- --ignored --nocapture`
#[test]
#[ignore = "benchmark; run explicitly in release mode"]
fn bench_transact_throughput() {
    use std::time::{Duration, Instant};
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    for concurrency in [1usize, 16, 64] {
        let store = TestStore::new();
        let ledger = store.open();
        let total = if concurrency == 1 { 3_000 } else { 40_000 };
        let per_task = total / concurrency;
        let start = Instant::now();
        let mut latencies: Vec<Duration> = rt.block_on(async {
            let mut handles = Vec::new();
            for t in 0..concurrency {
                let ledger = ledger.clone();
                handles.push(tokio::spawn(async move {
                    let chain = format!("passport-{t:032x}");
                    let mut lat = Vec::with_capacity(per_task);
                    for i in 0..per_task {
                        let chain = chain.clone();
                        let t0 = Instant::now();
                        ledger
                            .transact(move |txn| {
                                let key = format!("counter/{chain}/daily");
                                let cur = txn
                                    .get(&key)?
                                    .map(|b| i64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
                                    .unwrap_or(0);
                                txn.put(&key, &(cur + 5).to_be_bytes())?;
                                let body = obj(json!({
                                    "kind": "decision", "decision": "allow", "reason": "ok",
                                    "action": "llm:call", "method": "POST",
                                    "host": "api.example.test", "issuer": "iss_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                                    "agent": "agent-007",
                                    "path_digest": "ab".repeat(32), "policy_digest": "cd".repeat(32),
                                    "request_hash": "ef".repeat(32),
                                    "spend_delta_cents": 5, "spend_window_start": "2025-01-01",
                                    "spend_after_cents": cur + 5, "i": i,
                                }));
                                Ok(((), vec![Draft::new(chain, body)]))
                            })
                            .await
                            .unwrap();
                        lat.push(t0.elapsed());
                    }
                    lat
                }));
            }
            let mut all = Vec::new();
            for h in handles {
                all.extend(h.await.unwrap());
            }
            all
        });
        let elapsed = start.elapsed();
        latencies.sort_unstable();
        let n = latencies.len();
        let pct = |p: f64| latencies[((n as f64 * p) as usize).min(n - 1)];
        println!(
            "concurrency {concurrency:>2}: {n} transactions in {:.2}s = {:.0}/s, latency p50 {:?} p99 {:?}",
            elapsed.as_secs_f64(),
            n as f64 / elapsed.as_secs_f64(),
            pct(0.50),
            pct(0.99),
        );
        assert_eq!(ledger.size(), n as u64);
    }
}

// ---------------------------------------------------------------------------------------------
// The commit journal: groups answered before redb synced survive a crash

/// Options under which redb is never synced during a test (only the journal makes groups
/// durable), unless the journal fills up.
fn journal_only(capacity: u64) -> LedgerOptions {
    LedgerOptions { durable_interval: Duration::from_secs(3600), journal_capacity: capacity, ..Default::default() }
}

/// A crash image: the store's files as they are on disk at this instant, while it runs.
fn crash_image(store: &TestStore, with_journal: bool) -> TestStore {
    let image = TestStore::new();
    copy_file(&store.path, &image.path);
    copy_segments(&store.path, &image.path);
    if with_journal {
        copy_file(&journal_path(&store.path), &journal_path(&image.path));
    }
    image
}

#[tokio::test]
async fn a_crash_image_is_completed_from_the_journal() {
    let store = TestStore::new();
    let ledger = Ledger::open(&store.path, host_key(), journal_only(journal::DEFAULT_CAPACITY)).unwrap();
    populate(&ledger).await;
    let before = full_export(&ledger).await;
    let spend_a = ledger.state_get("spend/pA/2025-01-01").unwrap();
    assert!(spend_a.is_some());

    // Without its journal, the image is refused: the last answered groups may be only there.
    let bare = crash_image(&store, false);
    let msg = Ledger::open(&bare.path, host_key(), LedgerOptions::default()).unwrap_err().to_string();
    assert!(msg.contains("ledger.journal is missing") && msg.contains("create an empty file"), "{msg}");
    // The operator's explicit choice to go on without it: redb alone is the store's creation.
    std::fs::write(journal_path(&bare.path), b"").unwrap();
    let reopened = Ledger::open(&bare.path, host_key(), LedgerOptions::default()).unwrap();
    assert!(reopened.size() < before.records.len() as u64, "redb alone already had every group");
    reopened.shutdown();

    // With it, every answered group is back, byte for byte.
    let image = crash_image(&store, true);
    let reopened = Ledger::open(&image.path, host_key(), LedgerOptions::default()).unwrap();
    assert!(!rebuilt(&image.path), "the image's tiles and links were rebuilt, not cut back");
    assert_eq!(reopened.size(), before.records.len() as u64);
    assert_eq!(reopened.state_get("spend/pA/2025-01-01").unwrap(), spend_a);
    let after = full_export(&reopened).await;
    assert_eq!(after.records, before.records);
    let report = verify::verify_export(&after, &vk(), None);
    assert!(report.is_ok(), "{}", problems(&report));
    // And the log goes on from there.
    reopened.transact(spend("pA", 1, "2025-01-01")).await.unwrap();
    assert_eq!(reopened.size(), before.records.len() as u64 + 1);
    reopened.shutdown();
    ledger.shutdown();
}

#[tokio::test]
async fn write_stats_count_every_durable_write_and_every_lap() {
    // One group per transaction (each is awaited before the next), so each is a durable write.
    async fn run(options: LedgerOptions, groups: i64) -> WriteStats {
        let store = TestStore::new();
        let ledger = Ledger::open(&store.path, host_key(), options).unwrap();
        assert_eq!(ledger.write_stats(), WriteStats::default(), "a fresh store has written nothing");
        for i in 0..groups {
            ledger.transact(spend("pA", i, "2025-01-01")).await.unwrap();
        }
        let stats = ledger.write_stats();
        ledger.shutdown();
        stats
    }
    // A roomy journal: every group is one journal entry, and the journal never laps.
    let roomy = run(journal_only(journal::DEFAULT_CAPACITY), 10).await;
    assert!(roomy.durable_writes >= 10, "{roomy:?}");
    assert!(roomy.durable_write_ns > 0, "{roomy:?}");
    assert!(roomy.busy_ns >= roomy.durable_write_ns, "the writes are part of the busy time: {roomy:?}");
    assert_eq!((roomy.laps, roomy.lap_wait_ns), (0, 0), "{roomy:?}");
    // 8 blocks: the journal laps (redb synced, the journal started over) every few groups.
    let small = run(journal_only(8 * journal::HEADER_LEN), 40).await;
    assert!(small.durable_writes >= 40, "{small:?}");
    assert!(small.laps >= 3, "{small:?}");
    assert!(small.lap_wait_ns > 0, "{small:?}");
    assert!(small.busy_ns >= small.durable_write_ns + small.lap_wait_ns, "{small:?}");
    // No journal: every group is a durable redb commit, counted the same way.
    let none = run(LedgerOptions { journal_capacity: 0, ..Default::default() }, 10).await;
    assert!(none.durable_writes >= 10 && none.durable_write_ns > 0, "{none:?}");
    assert_eq!(none.laps, 0, "{none:?}");
}

#[tokio::test]
async fn a_store_older_than_its_journal_is_refused() {
    let store = TestStore::new();
    // A small journal: redb is synced (and the journal restarted) every few groups.
    // 8 blocks: a sync (and a new lap) after every 4 groups of one block each.
    let small = || journal_only(8 * journal::HEADER_LEN);
    // The first open makes the store; this copy is a "backup" taken before any group.
    Ledger::open(&store.path, host_key(), small()).unwrap().shutdown();
    let backup = crash_image(&store, false);
    let ledger = Ledger::open(&store.path, host_key(), small()).unwrap();
    for i in 0..10 {
        ledger.transact(spend("pA", i, "2025-01-01")).await.unwrap();
    }
    // The running store's journal, next to the old backup: groups in between are missing.
    copy_file(&journal_path(&store.path), &journal_path(&backup.path));
    let err = Ledger::open(&backup.path, host_key(), LedgerOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, LedgerError::Incoherent { .. }), "{msg}");
    assert!(msg.contains("older than its journal") && msg.contains("ledger.journal"), "{msg}");
    ledger.shutdown();
}

#[tokio::test]
async fn a_journal_of_another_store_is_refused() {
    let a = TestStore::new();
    let b = TestStore::new();
    Ledger::open(&a.path, host_key(), LedgerOptions::default()).unwrap().shutdown();
    Ledger::open(&b.path, host_key(), LedgerOptions::default()).unwrap().shutdown();
    copy_file(&journal_path(&a.path), &journal_path(&b.path));
    let msg = Ledger::open(&b.path, host_key(), LedgerOptions::default()).unwrap_err().to_string();
    assert!(msg.contains("journal id"), "{msg}");
}

#[tokio::test]
async fn a_clean_shutdown_leaves_nothing_to_replay() {
    let store = TestStore::new();
    let ledger = Ledger::open(&store.path, host_key(), journal_only(journal::DEFAULT_CAPACITY)).unwrap();
    populate(&ledger).await;
    let size = ledger.size();
    ledger.shutdown();
    drop(ledger);
    // redb alone has everything after a clean stop.
    let bare = crash_image(&store, false);
    let reopened = Ledger::open(&bare.path, host_key(), LedgerOptions::default()).unwrap();
    assert_eq!(reopened.size(), size);
    reopened.shutdown();
}

/// A thread watching the store's activity holds a `WriteStatsReader`, which must not keep the
/// store open: dropping the last `Ledger` still stops it cleanly (redb alone then has every
/// record, and the store opens again), and the reader reads on.
#[tokio::test]
async fn a_write_stats_reader_does_not_keep_the_store_open() {
    let store = TestStore::new();
    let ledger = Ledger::open(&store.path, host_key(), journal_only(journal::DEFAULT_CAPACITY)).unwrap();
    let reader = ledger.write_stats_reader();
    populate(&ledger).await;
    let size = ledger.size();
    let writes = reader.read().durable_writes;
    assert!(writes > 0, "populate made no durable write");
    assert_eq!(writes, ledger.write_stats().durable_writes);
    drop(ledger); // No shutdown(): the last handle's drop stops the store.
    let bare = crash_image(&store, false);
    let reopened = Ledger::open(&bare.path, host_key(), LedgerOptions::default()).unwrap();
    assert_eq!(reopened.size(), size);
    reopened.shutdown();
    let again = Ledger::open(&store.path, host_key(), LedgerOptions::default()).unwrap();
    assert_eq!(again.size(), size);
    again.shutdown();
    assert!(reader.read().durable_writes >= writes);
}

#[tokio::test]
async fn a_replayed_group_is_not_replayed_again_and_readers_see_answered_groups() {
    let store = TestStore::new();
    let ledger = Ledger::open(&store.path, host_key(), journal_only(journal::DEFAULT_CAPACITY)).unwrap();
    populate(&ledger).await;
    // Answered, so visible to a reader at once (the reader publishes the open transaction).
    let size = ledger.size();
    assert!(ledger.record(size - 1).unwrap().is_some());
    let image = crash_image(&store, true);
    ledger.shutdown();
    // Open the image twice: the second open has nothing left to replay and the same log.
    let first = Ledger::open(&image.path, host_key(), LedgerOptions::default()).unwrap();
    let exported = full_export(&first).await;
    first.shutdown();
    drop(first);
    let second = Ledger::open(&image.path, host_key(), LedgerOptions::default()).unwrap();
    assert_eq!(second.size(), size);
    assert_eq!(full_export(&second).await.records, exported.records);
    second.shutdown();
}

// ---------------------------------------------------------------------------------------------
// Power loss: only what was synced survives

/// A store's files as a power cut would leave them: redb as of its last sync (copied by the
/// indexer's test hook right after each sync, before the journal may start over), and the
/// journal as it is at the cut (every journal write is synced before the writer goes on, so
/// whatever of it is on disk at the cut is what a power cut keeps; a write in flight may be
/// torn, which replay must survive too).
struct PowerCut {
    /// redb as of its last sync.
    synced: TestStore,
    /// Held while the hook copies redb and while a cut copies both files, so that a cut is one
    /// instant.
    lock: std::sync::Arc<std::sync::Mutex<()>>,
    source: PathBuf,
}

impl PowerCut {
    fn watch(source: &Path) -> PowerCut {
        let synced = TestStore::new();
        let lock = std::sync::Arc::new(std::sync::Mutex::new(()));
        let (to, l) = (synced.path.clone(), lock.clone());
        // The store was synced at creation: that is the image until the first sync.
        copy_file(source, &to);
        copy_segments(source, &to);
        // The segments are synced right before redb, and only the indexer (running this hook)
        // writes them: they are copied as synced too.
        let hook = move |from: &Path| {
            let _g = l.lock().unwrap();
            copy_file(from, &to);
            copy_segments(from, &to);
        };
        crate::store::ON_SYNC.lock().unwrap().push((source.to_path_buf(), Box::new(hook)));
        PowerCut { synced, lock, source: source.to_path_buf() }
    }

    /// A cut now: a new store made of the synced redb and the journal as it is, and the
    /// segments as synced or, with `unsynced_kept`, with every byte written to them so far (a
    /// power cut may keep unsynced writes too).
    fn cut(&self, unsynced_kept: bool) -> TestStore {
        let image = TestStore::new();
        let _g = self.lock.lock().unwrap();
        copy_file(&self.synced.path, &image.path);
        copy_segments(if unsynced_kept { &self.source } else { &self.synced.path }, &image.path);
        copy_file(&journal_path(&self.source), &journal_path(&image.path));
        image
    }
}

impl Drop for PowerCut {
    fn drop(&mut self) {
        if let Ok(mut hooks) = crate::store::ON_SYNC.lock() {
            hooks.retain(|(p, _)| p != &self.source);
        }
    }
}

/// Eight clients spend on their own passports while the power is cut again and again (each cut
/// a separate image, taken while groups, journal laps and redb syncs go on): every image
/// reopens, verifies, holds every transaction answered before its cut, and its counters agree
/// with its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_loss_loses_no_answered_transaction() {
    power_loss_loses_nothing_answered(Clients::Queue).await;
}

/// The same with every client alone on its thread: groups led by callers and groups of the
/// writer thread interleave, and a cut between them loses nothing answered either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_loses_no_answered_transaction_when_clients_lead() {
    power_loss_loses_nothing_answered(Clients::Lead).await;
}

/// How the clients of a power-loss test submit: always to the writer thread, or each alone on
/// its own thread, so that its transactions lead their own groups whenever the writer is idle
/// (and queue when it is not).
#[derive(Clone, Copy, PartialEq)]
enum Clients {
    Queue,
    Lead,
}

async fn power_loss_loses_nothing_answered(clients: Clients) {
    let store = TestStore::new();
    // redb synced often and a small journal (a lap every dozen groups), so cuts land between
    // syncs, laps and journal writes.
    let opts = LedgerOptions {
        durable_interval: Duration::from_millis(7),
        publish_interval: Duration::from_millis(2),
        journal_capacity: 24 * journal::HEADER_LEN,
        // Segments sealed every 64 records, so cuts also land around sealing.
        segment_records: 64,
        ..Default::default()
    };
    let ledger = Ledger::open(&store.path, host_key(), opts).unwrap();
    let power = PowerCut::watch(&store.path);
    // (chain, counter after, record bytes) of every answered transaction.
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, i64, Vec<u8>)>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (ledger, answered, stop) = (ledger.clone(), answered.clone(), stop.clone());
        // Each client on a thread of its own: counted as one request in progress there when it
        // is to lead.
        tasks.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let client = async move {
                let chain = format!("p{t}");
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    match ledger.transact(spend(&chain, 1, "2025-01-01")).await {
                        Ok((after, appended)) => {
                            answered.lock().unwrap().push((chain.clone(), after, appended[0].canonical.to_vec()));
                        }
                        Err(e) => panic!("transaction failed: {e}"),
                    }
                }
            };
            match clients {
                Clients::Lead => rt.block_on(RequestInProgress::serve(client)),
                Clients::Queue => rt.block_on(client),
            }
        }));
    }
    let mut cuts = Vec::new();
    let mut last = 0;
    while cuts.len() < 30 {
        // A few transactions between cuts, however loaded the machine is.
        while answered.lock().unwrap().len() < last + 8 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Everything answered before the cut must survive it.
        last = answered.lock().unwrap().len();
        cuts.push((last, power.cut(cuts.len() % 2 == 1)));
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    for t in tasks {
        t.join().unwrap();
    }
    let stats = ledger.write_stats();
    match clients {
        Clients::Queue => assert_eq!(stats.led_groups, 0, "no client counts a request in progress"),
        Clients::Lead => assert!(stats.led_groups > 0, "no group was led: {stats:?}"),
    }
    ledger.shutdown();
    let answered = answered.lock().unwrap().clone();
    assert!(answered.len() >= 240, "too few transactions to cut between: {}", answered.len());

    for (n, (survived, image)) in cuts.iter().enumerate() {
        let reopened = Ledger::open(&image.path, host_key(), LedgerOptions::default())
            .unwrap_or_else(|e| panic!("cut {n}: the image does not reopen: {e}"));
        assert!(!rebuilt(&image.path), "cut {n}: the image's tiles and links were rebuilt, not cut back");
        let exported = full_export(&reopened).await;
        let report = verify::verify_export(&exported, &vk(), None);
        assert!(report.is_ok(), "cut {n}: {}", problems(&report));
        let records: std::collections::HashSet<&[u8]> = exported.records.iter().map(|r| r.record.as_bytes()).collect();
        let mut highest: HashMap<&str, i64> = HashMap::new();
        for (chain, after, bytes) in &answered[..*survived] {
            assert!(records.contains(bytes.as_slice()), "cut {n}: a record of {chain} answered before the cut is lost");
            let h = highest.entry(chain).or_default();
            *h = (*h).max(*after);
        }
        for t in 0..8 {
            let chain = format!("p{t}");
            let counter = reopened
                .state_get(&format!("spend/{chain}/2025-01-01"))
                .unwrap()
                .map(|c| i64::from_be_bytes(c.try_into().unwrap()))
                .unwrap_or(0);
            let in_log =
                exported.records.iter().filter(|r| r.record.contains(&format!("\"chain\":\"{chain}\""))).count();
            let want = highest.get(chain.as_str()).copied().unwrap_or(0);
            assert!(counter >= want, "cut {n}: {chain} counter {counter} < {want} answered before the cut");
            assert_eq!(counter as usize, in_log, "cut {n}: {chain} counter and log disagree");
        }
        // And the log goes on from there.
        reopened.transact(spend("p0", 1, "2025-01-01")).await.unwrap();
        reopened.shutdown();
    }
}

/// With almost nothing allowed in flight to the indexer, the writer waits for it instead of
/// queueing without bound, and nothing is lost or stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_writer_ahead_of_the_indexer_waits_for_it() {
    let store = TestStore::new();
    let opts = LedgerOptions { max_unindexed: 1, publish_interval: Duration::from_secs(3600), ..Default::default() };
    let ledger = Ledger::open(&store.path, host_key(), opts).unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                ledger.transact(spend(&format!("p{t}"), 1, "2025-01-01")).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(ledger.size(), 200);
    let exported = full_export(&ledger).await;
    assert_eq!(exported.records.len(), 200);
    let report = verify::verify_export(&exported, &vk(), None);
    assert!(report.is_ok(), "{}", problems(&report));
    ledger.shutdown();
}

/// A transaction reads records through its `Txn` whether the indexer has published them or not
/// (the writer keeps the unpublished ones in memory), and never past the log's end.
#[tokio::test]
async fn a_transaction_reads_published_and_unpublished_records() {
    let store = TestStore::new();
    // Nothing is published unless a reader asks.
    let opts = LedgerOptions { publish_interval: Duration::from_secs(3600), ..Default::default() };
    let ledger = Ledger::open(&store.path, host_key(), opts).unwrap();
    let (_, first) = ledger.transact(spend("pA", 1, "2025-01-01")).await.unwrap();
    // Published now (a reader asked).
    assert_eq!(ledger.record(0).unwrap().unwrap(), first[0].canonical.to_vec());
    let (_, second) = ledger.transact(spend("pA", 2, "2025-01-01")).await.unwrap();
    let (expect0, expect1) = (first[0].canonical.clone(), second[0].canonical.clone());
    let ((r0, r1, r2), _) =
        ledger.transact(move |txn| Ok(((txn.record(0)?, txn.record(1)?, txn.record(2)?), vec![]))).await.unwrap();
    assert_eq!(r0.as_deref(), Some(&*expect0), "published record");
    assert_eq!(r1.as_deref(), Some(&*expect1), "answered, unpublished record");
    assert_eq!(r2, None, "beyond the log");
    ledger.shutdown();
}

/// Bytes on disk per decision: 20,000 (or `SLUICE_MEASURE_RECORDS`) decision records shaped like the daemon's (about 1 KB of
/// canonical JSON each, docs/records.md) over 50 passports, each with its usage counter
/// written in the same transaction.
/// Run: `cargo test --release -p sluice-ledger measure_disk_per_decision -- --ignored --nocapture`
#[test]
#[ignore = "measurement; run explicitly in release mode"]
fn measure_disk_per_decision() {
    let store = TestStore::new();
    let ledger = store.open();
    let total: u64 = std::env::var("SLUICE_MEASURE_RECORDS").ok().and_then(|n| n.parse().ok()).unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let mut handles = Vec::new();
        for t in 0..50u64 {
            let ledger = ledger.clone();
            handles.push(tokio::spawn(async move {
                let chain = format!("pp_{:032x}", t * 0x9e37_79b9_7f4a_7c15);
                for i in 0..total / 50 {
                    let chain = chain.clone();
                    ledger
                        .transact(move |txn| {
                            let key = format!("usage/{chain}");
                            let spent = txn
                                .get(&key)?
                                .map(|b| u64::from_be_bytes(b[..8].try_into().unwrap_or([0; 8])))
                                .unwrap_or(0)
                                + 250_000;
                            let mut usage = spent.to_be_bytes().to_vec();
                            usage.extend_from_slice(
                                format!(r#"{{"v":2,"daily":{{"start":"2026-12-01","spent":{spent}}},"rate":{{"tat":{i}}}}}"#)
                                    .as_bytes(),
                            );
                            txn.put(&key, &usage)?;
                            let request_hash = hex::encode(&leaf_hash(format!("{chain}/{i}").as_bytes()));
                            let body = obj(json!({
                                "action": "llm:chat", "agent_id": "shopper-1", "cost_millicents": 250000,
                                "decision": "allow",
                                "detail": format!("All guardrails passed. Daily spend after this request: ${}.{:02} (limit $100000.00).", spent / 100_000, (spent / 1000) % 100),
                                "host": "api.openai.com",
                                "issuer": "iss_efua1_I9IogdUc_eBqLDIQbd30r3PffqaOcu3n6X-Zc",
                                "kind": "decision", "method": null, "passport_id": chain,
                                "path_digest": null,
                                "policy_digest": "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                                "reason": "allowed", "request_hash": request_hash,
                                "spend_after_millicents": spent, "spend_delta_millicents": 250000,
                                "spend_window": "daily", "spend_window_start": "2026-12-01T00:00:00.000000Z",
                                "v": 2,
                            }));
                            Ok(((), vec![Draft::new(chain, body)]))
                        })
                        .await
                        .unwrap();
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
    });
    let indexer_cpu = thread_cpu_ticks("sluice-ledger-i");
    let mut record_bytes = 0u64;
    ledger
        .snapshot()
        .unwrap()
        .for_each_record(0, total, |_, b| {
            record_bytes += b.len() as u64;
            Ok(())
        })
        .unwrap();
    ledger.shutdown();
    drop(ledger);
    // Every file of the store, each directory summed (the tiles are many small files).
    let mut files = Vec::new();
    let dir = store.path.parent().unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        files.push((entry.file_name().to_string_lossy().into_owned(), tree_bytes(&entry.path())));
    }
    files.sort();
    println!("{total} decisions, {} canonical bytes per record on average", record_bytes / total);
    let mut per_record = 0;
    for (name, len) in &files {
        println!("  {name}: {len} bytes = {} per decision", len / total);
        if !name.ends_with(".journal") {
            per_record += len;
        }
    }
    println!("  total without the journal (a fixed size): {} per decision", per_record / total);
    if let Some(ticks) = indexer_cpu {
        // Clock ticks are 10 ms on Linux (USER_HZ = 100).
        println!("indexer thread CPU: {} µs per record", ticks * 10_000 / total);
    }
}

/// Full segments are sealed (compressed) once redb is synced past them; their records read back
/// byte for byte, also after a reopen, and a damaged sealed frame is named, never decoded into
/// other bytes.
#[tokio::test]
async fn sealed_segments_read_back_and_damage_is_named() {
    let store = TestStore::new();
    let opts = || LedgerOptions { segment_records: 8, ..Default::default() };
    let ledger = Ledger::open(&store.path, host_key(), opts()).unwrap();
    let mut written = Vec::new();
    for i in 0..30 {
        let (_, a) = ledger.transact(spend(["pA", "pB"][i % 2], 1, "2025-01-01")).await.unwrap();
        written.push(a[0].canonical.clone());
    }
    ledger.shutdown();
    drop(ledger);
    let dir = store::segments_dir(&store.path);
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(
        names,
        ["0000000000000000.zst", "0000000000000001.zst", "0000000000000002.zst", "0000000000000003.log"],
        "three full segments sealed, the fourth open"
    );
    let ledger = Ledger::open(&store.path, host_key(), opts()).unwrap();
    for (i, bytes) in written.iter().enumerate() {
        assert_eq!(ledger.record(i as u64).unwrap().unwrap(), bytes.to_vec(), "record {i}");
    }
    let exported = full_export(&ledger).await;
    assert_eq!(exported.records.len(), 30);
    let report = verify::verify_export(&exported, &vk(), None);
    assert!(report.is_ok(), "{}", problems(&report));
    ledger.shutdown();
    drop(ledger);

    // One byte of segment 1's compressed frame flipped.
    let sealed = dir.join("0000000000000001.zst");
    let mut bytes = std::fs::read(&sealed).unwrap();
    bytes[40] ^= 0x40;
    std::fs::write(&sealed, &bytes).unwrap();
    let ledger = Ledger::open(&store.path, host_key(), opts()).unwrap();
    assert_eq!(ledger.record(3).unwrap().unwrap(), written[3].to_vec(), "other segments still read");
    let err = ledger.record(9).unwrap_err().to_string();
    assert!(err.contains("0000000000000001.zst") && err.contains("damaged"), "{err}");
    ledger.shutdown();
}

// ---------------------------------------------------------------------------------------------
// Tiles and links: cut back, rebuilt, tampered, migrated

fn rebuilt(path: &Path) -> bool {
    crate::store::REBUILT.lock().unwrap().iter().any(|p| p == path)
}

/// `n` spends over three chains.
async fn spends(ledger: &Ledger, n: u64) {
    for i in 0..n {
        ledger.transact(spend(["pA", "pB", "pC"][(i % 3) as usize], 1, "2025-01-01")).await.unwrap();
    }
}

/// A tile file as a crash leaves it: torn beyond what redb synced (cut back at open, no rebuild)
/// or below it (rebuilt from the records); the log, its root and its chains come back the same
/// each time. The links file likewise. (Every byte is torn in the unit tests of `tiles` and
/// `links`, without a whole store's open and its syncs each time.)
#[tokio::test]
async fn tiles_and_links_torn_by_a_crash_reopen() {
    let store = TestStore::new();
    let small = || LedgerOptions { journal_capacity: 64 * journal::HEADER_LEN, ..Default::default() };
    let ledger = Ledger::open(&store.path, host_key(), small()).unwrap();
    spends(&ledger, 260).await;
    let root = ledger.snapshot().unwrap().root(260).unwrap();
    let chain_b = ledger.snapshot().unwrap().chain_indices("pB").unwrap();
    ledger.shutdown();
    drop(ledger);
    // What the next records would have appended before a crash: taken from a copy that goes on.
    let ahead = TestStore::new();
    copy_file(&store.path, &ahead.path);
    copy_segments(&store.path, &ahead.path);
    copy_file(&journal_path(&store.path), &journal_path(&ahead.path));
    let l = Ledger::open(&ahead.path, host_key(), small()).unwrap();
    spends(&l, 30).await;
    l.shutdown();
    drop(l);
    let tile = store::tiles_dir(&store.path).join(store::tile_path(0, 1));
    let full_tile = std::fs::read(store::tiles_dir(&ahead.path).join(store::tile_path(0, 1))).unwrap();
    let links = std::fs::read(store::links_path(&ahead.path)).unwrap();
    assert_eq!(full_tile.len(), 34 * 32);
    assert_eq!(links.len(), 290 * 8);
    let check = |what: &str, cut: usize| {
        crate::store::REBUILT.lock().unwrap().retain(|p| p != &store.path);
        let l = Ledger::open(&store.path, host_key(), small()).unwrap_or_else(|e| panic!("{what} torn at {cut}: {e}"));
        let snap = l.snapshot().unwrap();
        assert_eq!(snap.size(), 260, "{what} torn at {cut}");
        assert_eq!(snap.root(260).unwrap(), root, "{what} torn at {cut}");
        assert_eq!(snap.chain_indices("pB").unwrap(), chain_b, "{what} torn at {cut}");
        let synced = if what == "tile" { 4 * 32 } else { 260 * 8 };
        assert_eq!(rebuilt(&store.path), cut < synced, "{what} torn at {cut}");
        l.shutdown();
    };
    for cut in [0, 1, 31, 32, 127, 128, 129, 159, 160, 161, 500, 1087, 1088] {
        std::fs::write(&tile, &full_tile[..cut]).unwrap();
        check("tile", cut);
    }
    for cut in [0, 7, 8, 2079, 2080, 2081, 2087, 2088, 2300, 2320] {
        std::fs::write(store::links_path(&store.path), &links[..cut]).unwrap();
        check("links", cut);
    }
}

/// A hash changed in a full tile, off the path the open check hashes: the inclusion proofs
/// served from it no longer lead to the signed root, and the verifier says so.
#[tokio::test]
async fn a_tampered_tile_is_caught_by_the_verifier() {
    let store = TestStore::new();
    let ledger = store.open();
    spends(&ledger, 300).await;
    ledger.checkpoint_now().await.unwrap();
    let clean =
        export::export(&ledger, &ExportRequest { passport: Some("pB".into()), ..Default::default() }).await.unwrap();
    assert!(verify::verify_export(&clean, &vk(), None).is_ok());
    ledger.shutdown();
    drop(ledger);
    // Record 10 is pB's (10 % 3 == 1): its leaf hash in tile 0 is flipped.
    let tile = store::tiles_dir(&store.path).join(store::tile_path(0, 0));
    let mut bytes = std::fs::read(&tile).unwrap();
    bytes[10 * 32] ^= 0x80;
    std::fs::write(&tile, &bytes).unwrap();
    let ledger = store.open();
    let tampered =
        export::export(&ledger, &ExportRequest { passport: Some("pB".into()), ..Default::default() }).await.unwrap();
    let report = verify::verify_export(&tampered, &vk(), None);
    assert!(!report.is_ok(), "a tampered tile went unnoticed");
    let text = problems(&report);
    assert!(text.contains("expected root"), "{text}");
}

/// A store of format 2 (Merkle nodes, chain heads and the chain index in redb) is migrated in
/// place at open: tiles and links built from the records, the old tables removed, format 3.
#[tokio::test]
async fn a_format_2_store_is_migrated() {
    use redb::{TableDefinition, TableHandle as _};
    let store = TestStore::new();
    let ledger = store.open();
    spends(&ledger, 40).await;
    ledger.checkpoint_now().await.unwrap();
    let before = full_export(&ledger).await;
    let chain_c = ledger.snapshot().unwrap().chain_indices("pC").unwrap();
    ledger.shutdown();
    drop(ledger);
    // Turn it into what format 2 left on disk.
    let nodes: TableDefinition<u64, [u8; 32]> = TableDefinition::new("merkle_nodes");
    let heads: TableDefinition<&str, (u64, [u8; 32])> = TableDefinition::new("chain_heads");
    let index: TableDefinition<(&str, u64), u64> = TableDefinition::new("chain_index");
    let tails: TableDefinition<&str, (u64, [u8; 32], u64)> = TableDefinition::new("chain_tails");
    let meta: TableDefinition<&str, u64> = TableDefinition::new("meta");
    {
        let db = redb::Database::create(&store.path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut n = txn.open_table(nodes).unwrap();
            let mut mem = merkle::MemNodes::new();
            for (i, r) in before.records.iter().enumerate() {
                merkle::append(&mut mem, i as u64, leaf_hash(r.record.as_bytes())).unwrap();
                n.insert(merkle::node_key(0, i as u64), leaf_hash(r.record.as_bytes())).unwrap();
            }
            let mut h = txn.open_table(heads).unwrap();
            h.insert("pA", (13u64, [0u8; 32])).unwrap();
            let mut x = txn.open_table(index).unwrap();
            x.insert(("pA", 0u64), 0u64).unwrap();
            txn.open_table(meta).unwrap().insert("format", 2u64).unwrap();
        }
        txn.delete_table(tails).unwrap();
        txn.commit().unwrap();
    }
    std::fs::remove_dir_all(store::tiles_dir(&store.path)).unwrap();
    std::fs::remove_file(store::links_path(&store.path)).unwrap();

    let ledger = store.open();
    assert!(rebuilt(&store.path));
    let after = full_export(&ledger).await;
    assert_eq!(after.records, before.records);
    let report = verify::verify_export(&after, &vk(), None);
    assert!(report.is_ok(), "{}", problems(&report));
    assert_eq!(ledger.snapshot().unwrap().chain_indices("pC").unwrap(), chain_c);
    // The log goes on, chains included.
    ledger.transact(spend("pC", 1, "2025-01-01")).await.unwrap();
    assert_eq!(ledger.snapshot().unwrap().chain_indices("pC").unwrap().len(), chain_c.len() + 1);
    ledger.shutdown();
    drop(ledger);
    let db = redb::Database::create(&store.path).unwrap();
    let txn = db.begin_read().unwrap();
    assert_eq!(txn.open_table(meta).unwrap().get("format").unwrap().unwrap().value(), 3);
    let names: Vec<String> = txn.list_tables().unwrap().map(|t| t.name().to_string()).collect();
    for gone in ["merkle_nodes", "chain_heads", "chain_index"] {
        assert!(!names.iter().any(|n| n == gone), "{gone} still in {names:?}");
    }
}
