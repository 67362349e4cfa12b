//! sluice-httpsig against an independent implementation (tests/interop.py: Python's hashlib,
//! base64 and `cryptography`, with the signature base built by hand), in both directions: what
//! Python signs verifies here with the same request hash and the same header bytes (Ed25519 is
//! deterministic), what this crate signs verifies in Python, and a tampered request fails in both.
//!
//! Needs /usr/bin/python3 with the `cryptography` module (the Debian package
//! `python3-cryptography`, installed by `cargo xtask deps`). Without it the test fails: it never
//! skips.

use ed25519_dalek::SigningKey;
use serde_json::{json, Value};
use sluice_httpsig::{sign, verify, ContentDigest, ContentDigestHasher, Received, SignParams, Target};
use std::io::Write;
use std::process::{Command, Stdio};

const PYTHON: &str = "/usr/bin/python3";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs interop.py over `requests`, one answer per request.
fn python(requests: &[Value]) -> Vec<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop.py");
    let mut child = Command::new(PYTHON)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {PYTHON}: {e}; install python3-cryptography (`cargo xtask deps`)"));
    let mut stdin = child.stdin.take().unwrap();
    let text: String = requests.iter().map(|r| r.to_string() + "\n").collect();
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "interop.py failed (is python3-cryptography installed?)");
    let answers: Vec<Value> = out
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(answers.len(), requests.len());
    answers
}

struct Case {
    seed: [u8; 32],
    method: &'static str,
    uri: String,
    body: Vec<u8>,
    created: u64,
    nonce: String,
    keyid: String,
}

/// Deterministic variety: bodies from empty to 70 KB, several methods and URIs.
fn cases() -> Vec<Case> {
    let methods = ["GET", "POST", "PUT", "DELETE", "PATCH"];
    (0u32..40)
        .map(|i| {
            let len = match i % 5 {
                0 => 0,
                1 => 1,
                2 => 100,
                3 => 4096 + i as usize,
                _ => 70_000,
            };
            Case {
                seed: [i as u8 + 1; 32],
                method: methods[i as usize % methods.len()],
                uri: format!("https://api{i}.example.com:8443/v1/orders/{i}?q=a%20b&n={}", i * 7),
                body: (0..len).map(|j| (j as u32).wrapping_mul(31).wrapping_add(i) as u8).collect(),
                created: 1_700_000_000 + u64::from(i) * 997,
                nonce: format!("nonce-{i:04}-abcdefghijklmnop_~.+/="),
                keyid: format!("jkt-{}", hex(&[i as u8; 16])),
            }
        })
        .collect()
}

fn sign_here(c: &Case) -> sluice_httpsig::Signed {
    let key = SigningKey::from_bytes(&c.seed);
    let mut h = ContentDigestHasher::new();
    for chunk in c.body.chunks(1000) {
        h.update(chunk);
    }
    let params = SignParams { created: c.created, nonce: &c.nonce, keyid: &c.keyid };
    sign(&key, Target { method: c.method, target_uri: &c.uri }, &h.finish(), params).unwrap()
}

#[test]
fn python_signs_and_sluice_verifies() {
    let cases = cases();
    let requests: Vec<Value> = cases
        .iter()
        .map(|c| {
            json!({"op": "sign", "seed": hex(&c.seed), "method": c.method, "uri": c.uri, "body": hex(&c.body),
                   "created": c.created, "nonce": c.nonce, "keyid": c.keyid})
        })
        .collect();
    for (c, py) in cases.iter().zip(python(&requests)) {
        let received = Received {
            content_digest: py["content_digest"].as_str().unwrap(),
            signature_input: py["signature_input"].as_str().unwrap(),
            signature: py["signature"].as_str().unwrap(),
        };
        let key = SigningKey::from_bytes(&c.seed).verifying_key();
        let target = Target { method: c.method, target_uri: &c.uri };
        let v = verify(&key, target, received, &ContentDigest::of(&c.body)).unwrap();
        assert_eq!(v.request_hash, py["request_hash"].as_str().unwrap());
        assert_eq!((v.created, v.nonce.as_str(), v.keyid.as_str()), (c.created, c.nonce.as_str(), c.keyid.as_str()));
        // Same inputs, same bytes: both implementations build the same base.
        let here = sign_here(c);
        assert_eq!(here.content_digest, received.content_digest);
        assert_eq!(here.signature_input, received.signature_input);
        assert_eq!(here.signature, received.signature);
        // Python's signature over a body it did not hash is refused here.
        let mut other = c.body.clone();
        other.push(b'!');
        let d = ContentDigest::of(&other);
        assert!(verify(&key, target, Received { content_digest: &d.header_value(), ..received }, &d).is_err());
    }
}

#[test]
fn sluice_signs_and_python_verifies() {
    let cases = cases();
    let mut requests = Vec::new();
    let mut signed = Vec::new();
    for c in &cases {
        let s = sign_here(c);
        let public = hex(SigningKey::from_bytes(&c.seed).verifying_key().as_bytes());
        let req = |method: &str, uri: &str, body: &[u8], public: &str| {
            json!({"op": "verify", "public": public, "method": method, "uri": uri, "body": hex(body),
                   "content_digest": s.content_digest, "signature_input": s.signature_input, "signature": s.signature})
        };
        requests.push(req(c.method, &c.uri, &c.body, &public));
        // The same headers on a tampered request: another body, method, URI, key.
        requests.push(req(c.method, &c.uri, &[c.body.as_slice(), b"x"].concat(), &public));
        requests.push(req("HEAD", &c.uri, &c.body, &public));
        requests.push(req(c.method, &format!("{}&x=1", c.uri), &c.body, &public));
        requests.push(req(
            c.method,
            &c.uri,
            &c.body,
            &hex(SigningKey::from_bytes(&[0xee; 32]).verifying_key().as_bytes()),
        ));
        signed.push(s);
    }
    let answers = python(&requests);
    for ((c, s), group) in cases.iter().zip(&signed).zip(answers.chunks(5)) {
        let ok = &group[0];
        assert_eq!(ok["ok"], true, "{}: {ok}", c.uri);
        assert_eq!(ok["request_hash"].as_str().unwrap(), s.request_hash);
        assert_eq!(ok["created"].as_u64().unwrap(), c.created);
        assert_eq!(ok["nonce"].as_str().unwrap(), c.nonce);
        assert_eq!(ok["keyid"].as_str().unwrap(), c.keyid);
        for bad in &group[1..] {
            assert_eq!(bad["ok"], false, "{}: a tampered request verified in Python: {bad}", c.uri);
        }
    }
}
