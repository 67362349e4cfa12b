//! `sluice catalog verify`, run as the real binary on catalogs signed by an independent
//! implementation (Python's `cryptography`, sorted-key JSON): the chain accepted, and every
//! tampering, split view, gap and wrong key refused with a message that names the file.

mod common;

use common::{p, sluice};
use std::path::{Path, PathBuf};

/// Writes `gate.pub` and catalogs v1, v2, v3 (a chain), v2-fork (another version 2), a
/// tampered v1, and all three chained versions as one array file, from Python.
fn fixtures(dir: &Path) {
    let script = r#"
import sys, json, hashlib, base64, os
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization
d = sys.argv[1]
sk = Ed25519PrivateKey.from_private_bytes(bytes([21]) * 32)
pub = sk.public_key()
open(os.path.join(d, "gate.pub"), "wb").write(pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
other = Ed25519PrivateKey.from_private_bytes(bytes([22]) * 32).public_key()
open(os.path.join(d, "other.pub"), "wb").write(other.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
gate_id = "gate_" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
def canon(v): return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
def served(cat):
    body = canon(cat)
    return {"catalog": cat, "content_hash": "sha256:" + hashlib.sha256(body).hexdigest(),
            "catalog_signature": base64.urlsafe_b64encode(sk.sign(body)).rstrip(b"=").decode()}
def cat(version, prev, price, day):
    return {"gate_id": gate_id, "version": version, "prev_content_hash": prev,
            "published_at": "2026-12-0%dT10:00:00Z" % day, "effective_at": "2026-12-0%dT10:00:00Z" % day,
            "change_summary": "v%d" % version, "trust_level": "L1",
            "routes": [{"method": "POST", "path": "/v1/shipments", "permission": "shipments:create"}],
            "permissions": [{"key": "shipments:create", "description": "Create a shipment", "risk_level": "medium",
                             "constraints": {"core:pricing:per_call_cents": price, "core:platform_fee:basis_points": 250}}]}
v1 = served(cat(1, None, "2.5", 1))
v2 = served(cat(2, v1["content_hash"], "3", 2))
v3 = served(cat(3, v2["content_hash"], "4", 3))
fork = served(cat(2, v1["content_hash"], "9", 2))
def w(name, doc): open(os.path.join(d, name), "w").write(json.dumps(doc))
w("v1.json", v1); w("v2.json", v2); w("v3.json", v3); w("v2-fork.json", fork)
w("chain.json", [v1, v2, v3])
t = json.loads(json.dumps(v1)); t["catalog"]["permissions"][0]["constraints"]["core:pricing:per_call_cents"] = "0.1"
w("v1-tampered.json", t)
open(os.path.join(d, "v1-dup.json"), "w").write(json.dumps(v1)[:-1] + ', "content_hash": "x"}')
"#;
    let out = std::process::Command::new("python3").arg("-c").arg(script).arg(dir).output().expect("python3");
    assert!(out.status.success(), "python: {}", String::from_utf8_lossy(&out.stderr));
}

fn run(dir: &Path, files: &[&str], key: &str) -> (bool, String, String) {
    let key = dir.join(key);
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    let mut args = vec!["catalog", "verify"];
    args.extend(paths.iter().map(|x| p(x)));
    args.extend(["--gate-pub", p(&key)]);
    let o = sluice(&args);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn verify_accepts_a_chain_and_refuses_every_forgery() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fixtures(d);

    let (ok, out, err) = run(d, &["v1.json"], "gate.pub");
    assert!(ok, "{err}");
    assert!(out.contains("version 1") && out.contains("shipments:create"), "{out}");
    // 2.5 cents + 2.5 % fee = 2.5625, rounded up to the millicent.
    assert!(out.contains("2.5 cents + 250 bp fee = 2.563 cents"), "{out}");
    assert!(out.contains("POST") && out.contains("/v1/shipments") && out.contains("-> shipments:create"), "{out}");

    let (ok, out, err) = run(d, &["chain.json"], "gate.pub");
    assert!(ok && out.contains("ok: 3 version(s) verify and chain (1..=3)"), "{out}{err}");
    // Files in any order, the same version twice (identical) is fine.
    let (ok, out, err) = run(d, &["v3.json", "v1.json", "v2.json", "v2.json"], "gate.pub");
    assert!(ok && out.contains("(1..=3)"), "{out}{err}");
    // A fragment is checked from its first version, and says so.
    let (ok, out, err) = run(d, &["v2.json", "v3.json"], "gate.pub");
    assert!(ok && out.contains("checked from version 2"), "{out}{err}");

    let refused = |files: &[&str], key: &str, needle: &str| {
        let (ok, out, err) = run(d, files, key);
        assert!(!ok, "{files:?} accepted: {out}");
        assert!(err.contains(needle), "{files:?}: expected {needle:?} in: {err}");
    };
    refused(&["v1.json", "v3.json"], "gate.pub", "versions grow by one");
    refused(&["v1.json", "v2.json", "v2-fork.json"], "gate.pub", "two different catalogs as version 2");
    refused(&["v1-tampered.json"], "gate.pub", "does not match the catalog's bytes");
    refused(&["v1-tampered.json"], "gate.pub", "v1-tampered.json");
    refused(&["v1.json"], "other.pub", "does not verify with the gate key");
    refused(&["v1-dup.json"], "gate.pub", "duplicate member");
}
