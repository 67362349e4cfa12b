//! The streamed export and the streaming verifier: the document the daemon writes, and that
//! reading it as a stream finds exactly what checking it in memory finds, whatever the member
//! order, and names a document that stops early.

use super::*;
use crate::export::ExportStream;

/// The export as the daemon streams it, in parts of at most about `part` bytes.
async fn streamed(ledger: &Ledger, req: &ExportRequest, part: usize) -> String {
    let mut stream: ExportStream = export::export_stream(ledger, req).await.unwrap();
    let mut doc = Vec::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let more = stream.fill(&mut buf, part).unwrap();
        doc.extend_from_slice(&buf);
        if !more {
            break;
        }
    }
    String::from_utf8(doc).unwrap()
}

fn streamed_report(doc: &str) -> verify::VerifyReport {
    verify::verify_reader(std::io::Cursor::new(doc.as_bytes()), &vk(), None)
}

#[tokio::test]
async fn the_stream_writes_members_first_and_one_record_per_line() {
    let (_s, ledger, bundle) = populated().await;
    let doc = streamed(&ledger, &ExportRequest::default(), 1).await;
    let lines: Vec<&str> = doc.lines().collect();
    assert!(lines[0].starts_with(r#"{"format":"sluice-audit-export/v1","origin":"#), "{}", lines[0]);
    assert!(lines[0].ends_with(r#""records":["#), "{}", lines[0]);
    assert_eq!(lines.len(), 20 + 2, "{doc}");
    assert_eq!(*lines.last().unwrap(), "]}");
    // Parts of any size make the same document, and it is the v1 format.
    assert_eq!(doc, streamed(&ledger, &ExportRequest::default(), 1 << 20).await);
    let parsed: ExportBundle = serde_json::from_str(&doc).unwrap();
    assert_eq!(parsed.records, bundle.records);
    let report = streamed_report(&doc);
    assert!(report.is_ok(), "{}", problems(&report));
    assert_eq!((report.records_checked, report.chains_checked), (20, 4));

    // Filtered, with a consistency proof: the proof comes before the records.
    let req = ExportRequest { passport: Some("pB".into()), consistency_from: Some(5), ..Default::default() };
    let doc = streamed(&ledger, &req, 64).await;
    let first = doc.lines().next().unwrap();
    assert!(first.contains(r#""consistency":{"old_size":5"#), "{first}");
    let root = ledger.snapshot().unwrap().root(5).unwrap();
    let older = checkpoint::sign(Checkpoint { origin: ledger.origin().to_string(), size: 5, root }, &host_key());
    let report = verify::verify_reader(std::io::Cursor::new(doc.as_bytes()), &vk(), Some(&older.note));
    assert!(report.is_ok(), "{}", problems(&report));
    // Against an older checkpoint of another history at that size: a failed consistency proof.
    let other =
        checkpoint::sign(Checkpoint { origin: ledger.origin().to_string(), size: 5, root: [9; 32] }, &host_key());
    let report = verify::verify_reader(std::io::Cursor::new(doc.as_bytes()), &vk(), Some(&other.note));
    assert!(
        has(&report, |p| matches!(p, Problem::ConsistencyProofInvalid { older_size: 5, .. })),
        "{}",
        problems(&report)
    );
}

/// Every tampering of the in-memory tests, read as a stream: the same report, in the same order.
#[tokio::test]
async fn streamed_and_in_memory_verification_agree_on_every_tampering() {
    let (_s, ledger, bundle) = populated().await;
    let mut cases: Vec<(&str, ExportBundle)> = vec![("untouched", bundle.clone())];
    let mut edited = bundle.clone();
    edit_record(&mut edited, 3, |r| {
        r.insert("decision".into(), json!("block"));
    });
    cases.push(("edited", edited));
    let mut deleted = bundle.clone();
    deleted.records.remove(7);
    cases.push(("deleted", deleted));
    let mut reordered = bundle.clone();
    reordered.records.swap(4, 5);
    cases.push(("reordered", reordered));
    let mut truncated = bundle.clone();
    truncated.records.truncate(11);
    cases.push(("truncated", truncated));
    let mut duplicated = bundle.clone();
    duplicated.records.insert(6, duplicated.records[5].clone());
    cases.push(("duplicated", duplicated));
    let mut lying = bundle.clone();
    let pos = position_of(&lying, "pA", 2);
    edit_record(&mut lying, pos, |r| {
        r.insert("spend_after_cents".into(), json!(1));
    });
    cases.push(("spend", lying));
    let mut forged = bundle.clone();
    forged.checkpoint = forged.checkpoint.replacen('\n', "\n1", 1);
    cases.push(("checkpoint", forged));
    let mut filtered =
        export::export(&ledger, &ExportRequest { passport: Some("pA".into()), ..Default::default() }).await.unwrap();
    filtered.records.remove(1);
    filtered.records[0].inclusion_proof.pop();
    cases.push(("filtered", filtered));
    for (name, bundle) in cases {
        let in_memory = verify::verify_export(&bundle, &vk(), None);
        let text = serde_json::to_string(&bundle).unwrap();
        assert_eq!(streamed_report(&text), in_memory, "{name}");
        // Without worker threads (a one-core machine): the same.
        let alone = verify::verify_with(std::io::Cursor::new(text.as_bytes()), &vk(), None, None);
        assert_eq!(alone, in_memory, "{name}");
        assert_eq!(verify::verify_document(&text, &vk(), None), in_memory, "{name}");
        if name != "untouched" {
            assert!(!in_memory.is_ok(), "{name}");
        }
    }
}

#[tokio::test]
async fn any_member_order_verifies_the_same() {
    let (_s, _l, mut bundle) = populated().await;
    bundle.records.remove(2);
    let expected = verify::verify_export(&bundle, &vk(), None);
    // Sorted keys, as the CLI wrote exports before they were streamed: records last.
    let sorted = serde_json::to_string_pretty(&serde_json::to_value(&bundle).unwrap()).unwrap();
    assert_eq!(streamed_report(&sorted), expected);
    // Records first: the verifier comes back for them (a second pass).
    let v = serde_json::to_value(&bundle).unwrap();
    let mut reversed = String::from("{");
    let obj = v.as_object().unwrap();
    let mut keys: Vec<&String> = obj.keys().collect();
    keys.sort_by_key(|k| (k.as_str() != "records", std::cmp::Reverse(k.as_str())));
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            reversed.push(',');
        }
        reversed.push_str(&format!("{}:{}", serde_json::to_string(k).unwrap(), obj[*k]));
    }
    reversed.push('}');
    assert!(reversed.starts_with(r#"{"records":["#), "{reversed}");
    assert_eq!(streamed_report(&reversed), expected);
}

#[tokio::test]
async fn a_document_that_stops_early_is_named_with_what_was_found_before() {
    let (_s, ledger, _) = populated().await;
    let doc = streamed(&ledger, &ExportRequest::default(), 1).await;
    // Every cut of the document is refused, never accepted and never a panic.
    for cut in (0..doc.len()).step_by(61) {
        let report = streamed_report(&doc[..cut]);
        assert!(
            matches!(report.problems.last(), Some(Problem::Malformed { reason }) if reason.contains("byte")),
            "cut at {cut}: {}",
            problems(&report)
        );
    }
    // Cut inside the records: the records before the cut are checked, and a tampered one named.
    let line = doc.lines().nth(4).unwrap();
    let tampered = doc.replacen(line, &line.replacen("\\\"allow\\\"", "\\\"block\\\"", 1), 1);
    assert_ne!(tampered, doc);
    let cut = tampered.len() - 200;
    let report = streamed_report(&tampered[..cut]);
    assert!(has(&report, |p| matches!(p, Problem::BrokenLink { .. })), "{}", problems(&report));
    assert!(
        has(&report, |p| matches!(p, Problem::Malformed { reason } if reason.contains("was not"))),
        "{}",
        problems(&report)
    );
    assert!(!has(&report, |p| matches!(p, Problem::RootMismatch { .. } | Problem::Truncated { .. })));
    // A broken entry in the middle is named by position and the rest still checked.
    let line = doc.lines().nth(3).unwrap();
    assert!(line.starts_with(r#"{"index":2,"#) && line.ends_with(','), "{line}");
    let broken = doc.replacen(line, r#"{"index":2,"record":5},"#, 1);
    let report = streamed_report(&broken);
    assert!(
        has(&report, |p| matches!(p, Problem::Malformed { reason } if reason.contains("records entry #2"))),
        "{}",
        problems(&report)
    );
    assert!(has(&report, |p| matches!(p, Problem::MissingRecords { from: 2, to: 2 })), "{}", problems(&report));
    assert_eq!(report.records_checked, 19);
}

#[tokio::test]
async fn a_deletion_is_one_range_and_a_late_record_closes_its_gap() {
    let (_s, _l, bundle) = populated().await;
    let mut cut = bundle.clone();
    cut.records.drain(3..15);
    let report = verify::verify_export(&cut, &vk(), None);
    let missing: Vec<_> = report.problems.iter().filter(|p| matches!(p, Problem::MissingRecords { .. })).collect();
    assert_eq!(missing, [&Problem::MissingRecords { from: 3, to: 14 }], "{}", problems(&report));
    // Moved far down the document: out of order, but not missing.
    let mut moved = bundle.clone();
    let r = moved.records.remove(2);
    moved.records.insert(17, r);
    let report = verify::verify_export(&moved, &vk(), None);
    assert!(has(&report, |p| matches!(p, Problem::OutOfOrder { index: 2, .. })), "{}", problems(&report));
    assert!(!has(&report, |p| matches!(p, Problem::MissingRecords { .. })), "{}", problems(&report));
    assert!(has(&report, |p| matches!(p, Problem::RootMismatch { .. })));
}

#[tokio::test]
async fn exports_filtered_by_time_stream_and_verify() {
    let (_s, ledger, bundle) = populated().await;
    let time: Value = serde_json::from_str(&bundle.records[10].record).unwrap();
    let since = time["time"].as_str().unwrap().to_string();
    let req = ExportRequest { since: Some(since), ..Default::default() };
    let doc = streamed(&ledger, &req, 100).await;
    let report = streamed_report(&doc);
    assert!(report.is_ok(), "{}", problems(&report));
    assert!(report.records_checked >= 10 && report.records_checked < 20, "{}", report.records_checked);
}
